//! `berth-shim`: the per-container monitor process of berth.
//!
//! One shim owns one container: it creates it from an OCI bundle with youki's `libcontainer`
//! (in short-lived helper children, see [`runtime`]), holds its stdio and writes the CRI log
//! ([`crilog`]), reaps it, records its exit in the bundle and answers berthd over a unix socket
//! ([`monitor`]). The protocol and the command line are in `api::shim`.
//!
//! Startup order: parse args, create the report pipe, detach ([`daemon`]), close inherited fds,
//! become child subreaper, write the pid file, create the container, report, then serve.

pub mod args;
pub mod attach;
pub mod crilog;
pub mod daemon;
pub mod footprint;
pub mod monitor;
pub mod podinit;
pub mod runtime;

use std::path::PathBuf;

pub use args::Args;

/// Errors of the shim.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line.
    #[error("usage: {0}")]
    Usage(String),
    /// The bundle dir is unusable.
    #[error("bundle {path:?}")]
    Bundle {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Detaching from berthd failed.
    #[error("detach")]
    Detach(#[source] nix::Error),
    /// A file of the shim could not be written or opened.
    #[error("open {path:?}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting up the monitor (signals, pipes, sockets) failed.
    #[error("set up {what}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// libcontainer could not create the container (message from the helper child).
    #[error("create container: {0}")]
    Create(String),
}

/// Result of the shim's operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The error with its sources, for the one line berthd gets on stderr.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// Runs the shim: detaches, creates the container, reports to the calling process and serves
/// until `Shutdown`. Returns the exit code of whichever process returns here (the calling
/// process after the report, or the shim when it is done).
pub fn run(args: Args) -> std::process::ExitCode {
    let report = match daemon::detach(&args.bundle) {
        Ok(daemon::Detached::Caller(code)) => return code,
        Ok(daemon::Detached::Shim(report)) => report,
        Err(e) => {
            eprintln!("berth-shim: {}", e.chain());
            return std::process::ExitCode::FAILURE;
        }
    };
    init_logging();
    match monitor::Monitor::create(&args) {
        Ok(mut m) => {
            report.created(&m.created());
            tracing::info!(container_id = %args.id, pid = m.pid(), "container created");
            m.run();
            tracing::info!(container_id = %args.id, "shim exits");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = e.chain();
            tracing::error!(container_id = %args.id, error = %msg, "creation failed");
            report.failed(&msg);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, which the daemonized shim points at `<bundle>/shim.log`.
/// `BERTH_SHIM_LOG=debug|trace|warn|error` changes the level (default info).
fn init_logging() {
    let level = match std::env::var("BERTH_SHIM_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .init();
}
