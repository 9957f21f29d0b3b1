//! The error type of berth's CNI plugins and its mapping onto CNI error codes.

use std::io;
use std::path::PathBuf;

/// A failed plugin operation. Converted into the CNI error JSON (code, msg, details) that
/// the runtime reads from the plugin's stdout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The network configuration is malformed or inconsistent (CNI code 7).
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// A required CNI environment variable is missing or invalid (CNI code 4).
    #[error("invalid environment: {0}")]
    InvalidEnv(String),
    /// A file operation failed (CNI code 5).
    #[error("{op} {path:?}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Every address of a range set is allocated (CNI code 100).
    #[error("no IP addresses available in range set {0}")]
    RangeExhausted(String),
    /// An explicitly requested address cannot be handed out (CNI code 101).
    #[error("requested IP address {0}")]
    RequestedIp(String),
    /// CHECK found the state different from what ADD set up (CNI code 102).
    #[error("check failed: {0}")]
    Check(String),
    /// A netlink request failed (CNI code 103).
    #[error("netlink: {op}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer or the socket error.
        #[source]
        source: io::Error,
    },
    /// Programming nftables failed (CNI code 104).
    #[error("nftables: {op}: {detail}")]
    Nft {
        /// What was being done.
        op: String,
        /// nft's stderr or the exec error.
        detail: String,
    },
    /// Entering or opening a network namespace failed (CNI code 105).
    #[error("netns {path:?}: {op}")]
    Netns {
        /// What was being done.
        op: &'static str,
        /// The namespace path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Several teardown steps failed (CNI code 106); every failure is listed.
    #[error("teardown failed: {}", .0.iter().map(Error::chain).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Error>),
    /// A delegated plugin (the IPAM plugin of `berth-bridge`, the bridge plugin of
    /// `berth-vxlan`) failed; its own code is kept.
    #[error("{plugin}: {msg}")]
    Delegate {
        /// The delegated plugin's type.
        plugin: String,
        /// The CNI error code it returned.
        code: u32,
        /// Its message.
        msg: String,
        /// Its details.
        details: String,
    },
}

/// Result of the plugins' operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The CNI error code this error is reported with.
    pub fn code(&self) -> u32 {
        match self {
            Error::InvalidConfig(_) => 7,
            Error::InvalidEnv(_) => 4,
            Error::Io { .. } => 5,
            Error::RangeExhausted(_) => 100,
            Error::RequestedIp(_) => 101,
            Error::Check(_) => 102,
            Error::Netlink { .. } => 103,
            Error::Nft { .. } => 104,
            Error::Netns { .. } => 105,
            Error::Teardown(_) => 106,
            Error::Delegate { code, .. } => *code,
        }
    }

    /// Shorthand for an [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The message and its whole chain of causes, `: `-separated.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            source = cause.source();
        }
        out
    }
}

impl From<Error> for rscni_plugin::error::Error {
    fn from(err: Error) -> Self {
        use rscni_plugin::error::Error as Cni;
        let details = err.chain();
        match err.code() {
            4 => Cni::InvalidEnvValue(details),
            5 => Cni::IOFailure(details),
            7 => Cni::InvalidNetworkConfig(details),
            11 => Cni::TryAgainLater(details),
            code if code >= 100 => Cni::Custom(code, err.to_string(), details),
            // A delegate's standard code other than the ones above: keep code and text.
            code => Cni::Custom(code, err.to_string(), details),
        }
    }
}
