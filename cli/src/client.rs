//! The connection to berthd and the way its errors reach the user.

use anyhow::{Context, Result, bail};
use bollard::{ClientVersion, Docker};

/// The API version berthd speaks; newer ones it may not know.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 44,
};

/// Long enough for a pull of a large image or a `wait`; streams that may last longer (logs -f,
/// attach) are not bound by it in bollard.
const TIMEOUT_SECS: u64 = 24 * 3600;

/// Exit quietly with this code: what was to be said is said.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// A failure with docker's exit code for it (125, 126, 127 for `run`).
#[derive(Debug)]
pub struct StatusError {
    pub code: i32,
    pub error: anyhow::Error,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", message(&self.error))
    }
}

impl std::error::Error for StatusError {}

/// Connects to `host` (`unix:///path` or a bare path).
pub fn connect(host: &str) -> Result<Docker> {
    let path = match host.strip_prefix("unix://") {
        Some(p) => p,
        None if host.starts_with('/') => host,
        None => bail!("unsupported host {host:?}: berth speaks to berthd over unix:// sockets"),
    };
    if !std::path::Path::new(path).exists() {
        bail!("Cannot connect to the berth daemon at unix://{path}. Is berthd running?");
    }
    crate::raw::set_socket(std::path::Path::new(path));
    Docker::connect_with_unix(path, TIMEOUT_SECS, &API_VERSION)
        .with_context(|| format!("connect to unix://{path}"))
}

/// The daemon's answer in `e`'s chain, if it got that far.
pub fn daemon_error(e: &anyhow::Error) -> Option<(u16, &str)> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<bollard::errors::Error>() {
            Some(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            }) => Some((*status_code, message.as_str())),
            _ => None,
        })
}

/// Whether `e` is the daemon's 404.
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// What to print for `e`: docker's `Error response from daemon: …` when the daemon answered,
/// otherwise the chain of what failed.
pub fn message(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<StatusError>() {
        return message(&s.error);
    }
    if let Some((_, m)) = daemon_error(e) {
        return format!("Error response from daemon: {}", m.trim_end());
    }
    if let Some(stream) = e
        .chain()
        .find_map(|c| match c.downcast_ref::<bollard::errors::Error>() {
            Some(bollard::errors::Error::DockerStreamError { error }) => Some(error.clone()),
            _ => None,
        })
    {
        return stream;
    }
    if e.chain().any(|c| {
        c.downcast_ref::<bollard::errors::Error>()
            .is_some_and(|b| matches!(b, bollard::errors::Error::HyperResponseError { .. }))
    }) {
        return format!("Cannot connect to the berth daemon: {e:#}");
    }
    format!("{e:#}")
}

/// Prints `e` on stderr.
pub fn report(e: &anyhow::Error) {
    eprintln!("{}", message(e));
}

/// The exit code `e` asks for, if it names one.
pub fn exit_code_of(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<StatusError>().map(|s| s.code)
}

/// docker's exit code for a failed start: 127 when the command is not there, 126 when it
/// cannot be run, 125 for everything else (the daemon's own failures).
pub fn start_failure_code(message: &str) -> i32 {
    let m = message.to_ascii_lowercase();
    if m.contains("executable file not found")
        || m.contains("no such file or directory")
        || m.contains("system cannot find the file specified")
    {
        127
    } else if m.contains("permission denied") || m.contains("is a directory") {
        126
    } else {
        125
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_map_to_dockers_codes() {
        assert_eq!(
            start_failure_code(
                "failed to create task for container: exec: executable file not found in $PATH: x"
            ),
            127
        );
        assert_eq!(
            start_failure_code("failed to create task for container: exec: permission denied: x"),
            126
        );
        assert_eq!(start_failure_code("cgroup: out of memory"), 125);
    }

    #[test]
    fn daemon_answers_read_like_dockers() {
        let e = anyhow::Error::new(bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message: "No such container: x".into(),
        })
        .context("inspect x");
        assert_eq!(
            message(&e),
            "Error response from daemon: No such container: x"
        );
        assert_eq!(daemon_error(&e), Some((404, "No such container: x")));
        let plain = anyhow::anyhow!("read file").context("load");
        assert_eq!(message(&plain), "load: read file");
    }
}
