//! Errors of the CNI runtime side.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A CNI operation (the `CNI_COMMAND` a plugin is run with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach a container to a network.
    Add,
    /// Detach a container from a network.
    Del,
    /// Verify an attachment is as ADD left it.
    Check,
    /// Ask whether a plugin is ready to serve ADDs (spec 1.1).
    Status,
    /// Clean up resources of attachments that no longer exist (spec 1.1).
    Gc,
    /// Ask which spec versions a plugin supports.
    Version,
}

impl Command {
    /// The value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// No usable network configuration: why pod networking is not ready.
///
/// berthd reports this as `NetworkReady=false` with [`NotReady::reason`] as the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network not ready: {reason}")]
pub struct NotReady {
    /// What is missing or wrong, naming the conf dirs and each skipped file with its reason.
    pub reason: String,
}

/// A plugin that ran and reported failure (non-zero exit).
///
/// The fields come from the plugin's error JSON (`{"code":..,"msg":..,"details":..}`) when it
/// printed one; otherwise `msg` describes the exit and what the plugin printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// The plugin's `type`.
    pub plugin: String,
    /// What it was asked to do.
    pub command: Command,
    /// The CNI error code, if the plugin printed error JSON with one.
    pub code: Option<u32>,
    /// The plugin's message.
    pub msg: String,
    /// The plugin's details, empty if none.
    pub details: String,
    /// What the plugin wrote to stderr, bounded in size, empty if nothing.
    pub stderr: String,
}

impl PluginError {
    /// What the CNI spec says a well-known error code means.
    pub fn code_meaning(code: u32) -> Option<&'static str> {
        Some(match code {
            1 => "incompatible CNI version",
            2 => "unsupported field in network configuration",
            3 => "container unknown or does not exist",
            4 => "invalid necessary environment variables",
            5 => "I/O failure",
            6 => "failed to decode content",
            7 => "invalid network config",
            11 => "try again later",
            50 => "plugin not available",
            51 => "plugin not available, existing containers may have limited connectivity",
            _ => return None,
        })
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CNI plugin {:?} failed {}: {}",
            self.plugin, self.command, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        if let Some(code) = self.code {
            match Self::code_meaning(code) {
                Some(meaning) => write!(f, " [code {code}: {meaning}]")?,
                None => write!(f, " [code {code}]")?,
            }
        }
        if !self.stderr.is_empty() {
            write!(f, "; stderr: {:?}", self.stderr)?;
        }
        Ok(())
    }
}

impl std::error::Error for PluginError {}

/// Errors of the CNI runtime side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No valid network configuration exists.
    #[error(transparent)]
    NotReady(#[from] NotReady),

    /// A network configuration is not valid.
    #[error("invalid CNI network config{}: {reason}", path.as_ref().map(|p| format!(" {p:?}")).unwrap_or_default())]
    InvalidConfig {
        /// The file it came from, if any.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },

    /// The caller's attachment parameters (container id, ifname, netns, args) are not valid.
    #[error("invalid CNI attachment: {reason}")]
    InvalidAttachment {
        /// What is wrong with them.
        reason: String,
    },

    /// The network's spec version has no such operation.
    #[error("network {network:?} has cniVersion {version}; {command} needs {needs} or newer")]
    Unsupported {
        /// The network.
        network: String,
        /// The operation asked for.
        command: Command,
        /// The network's version.
        version: String,
        /// The first version with the operation.
        needs: String,
    },

    /// No executable for a plugin type in any bin dir.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound {
        /// The plugin's `type`.
        plugin: String,
        /// The dirs searched, in order.
        dirs: Vec<PathBuf>,
    },

    /// A plugin could not be started or waited for.
    #[error("run CNI plugin {plugin:?} ({path:?}) for {command}")]
    ExecPlugin {
        /// The plugin's `type`.
        plugin: String,
        /// Its executable.
        path: PathBuf,
        /// What it was asked to do.
        command: Command,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A plugin ran longer than the per-call timeout and was killed.
    #[error("CNI plugin {plugin:?} did not finish {command} within {timeout:?}; killed it")]
    Timeout {
        /// The plugin's `type`.
        plugin: String,
        /// What it was asked to do.
        command: Command,
        /// The limit.
        timeout: Duration,
    },

    /// A plugin reported failure.
    #[error(transparent)]
    Plugin(#[from] PluginError),

    /// A plugin succeeded but printed something that is not a valid answer.
    #[error(
        "CNI plugin {plugin:?} {command} printed an invalid result: {reason}; output: {output:?}"
    )]
    InvalidResult {
        /// The plugin's `type`.
        plugin: String,
        /// What it was asked to do.
        command: Command,
        /// What is wrong with the output.
        reason: String,
        /// The start of the output.
        output: String,
    },

    /// CHECK was asked for an attachment with no cached ADD result.
    #[error(
        "no cached CNI result for network {network:?}, container {container_id:?}, ifname {ifname:?}"
    )]
    NotAttached {
        /// The network.
        network: String,
        /// The container.
        container_id: String,
        /// The interface.
        ifname: String,
    },

    /// The result cache could not be read.
    #[error("read CNI result cache {path:?}")]
    ReadCache {
        /// The cache file or dir.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The result cache could not be written or removed.
    #[error("write CNI result cache {path:?}")]
    WriteCache {
        /// The cache file or dir.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Teardown (DEL, GC) went through every step and some failed: all failures, in order.
    #[error("{} of network {network:?} failed: {}", command, join_errors(errors))]
    Teardown {
        /// The network.
        network: String,
        /// DEL or GC.
        command: Command,
        /// Every failure, each with its cause chain in its message.
        errors: Vec<Error>,
    },
}

impl Error {
    /// The CNI error code of a plugin failure, if the plugin gave one (STATUS 50/51 mean "not
    /// ready").
    pub fn plugin_code(&self) -> Option<u32> {
        match self {
            Error::Plugin(e) => e.code,
            _ => None,
        }
    }
}

/// `e` and its causes, joined by ": ".
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn join_errors(errors: &[Error]) -> String {
    errors
        .iter()
        .map(|e| error_chain(e))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result of the CNI runtime side.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn plugin_error_reads_like_a_sentence() {
        let e = PluginError {
            plugin: "bridge".into(),
            command: Command::Add,
            code: Some(7),
            msg: "bad bridge name".into(),
            details: "name too long".into(),
            stderr: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "CNI plugin \"bridge\" failed ADD: bad bridge name (name too long) [code 7: invalid network config]"
        );
        let e = PluginError {
            code: Some(999),
            details: String::new(),
            stderr: "oops\n".into(),
            ..e
        };
        assert_eq!(
            e.to_string(),
            "CNI plugin \"bridge\" failed ADD: bad bridge name [code 999]; stderr: \"oops\\n\""
        );
    }

    #[test]
    fn teardown_lists_every_error_with_its_cause() {
        let e = Error::Teardown {
            network: "net".into(),
            command: Command::Del,
            errors: vec![
                Error::ExecPlugin {
                    plugin: "a".into(),
                    path: "/bin/a".into(),
                    command: Command::Del,
                    source: std::io::Error::from_raw_os_error(libc_eacces()),
                },
                Error::PluginNotFound {
                    plugin: "b".into(),
                    dirs: vec!["/opt/cni/bin".into()],
                },
            ],
        };
        let s = e.to_string();
        assert!(
            s.starts_with("DEL of network \"net\" failed: run CNI plugin \"a\""),
            "{s}"
        );
        assert!(s.contains("Permission denied"), "{s}");
        assert!(
            s.contains("; CNI plugin \"b\" not found in [\"/opt/cni/bin\"]"),
            "{s}"
        );
    }

    fn libc_eacces() -> i32 {
        nix::errno::Errno::EACCES as i32
    }
}
