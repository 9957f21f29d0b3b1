//! berthd's side of the shim protocol (see [`api::shim`]): start a shim, then talk JSON lines to
//! it over the socket in the bundle dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::shim::{Created, EXIT_FILE_NAME, ExitStatus, Request, Response, SOCKET_NAME};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// How to start one shim.
#[derive(Debug, Clone)]
pub struct ShimLaunch {
    /// The `berth-shim` binary.
    pub binary: PathBuf,
    /// Container id.
    pub id: String,
    /// Bundle dir holding config.json and the mounted rootfs.
    pub bundle: PathBuf,
    /// CRI log file.
    pub log: PathBuf,
    /// Keep the container's stdin open.
    pub stdin: bool,
    /// Give the container a terminal.
    pub tty: bool,
}

/// Starts a shim and waits until it reports the container created (or failed).
pub async fn launch(l: &ShimLaunch) -> Result<Created> {
    let mut cmd = tokio::process::Command::new(&l.binary);
    cmd.arg("--id")
        .arg(&l.id)
        .arg("--bundle")
        .arg(&l.bundle)
        .arg("--log")
        .arg(&l.log);
    if l.stdin {
        cmd.arg("--stdin");
    }
    if l.tty {
        cmd.arg("--tty");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::internal(&format!("run {}", l.binary.display()), e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::FailedPrecondition(format!(
            "create container {}: {msg}",
            l.id
        )));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .map_err(|e| Error::Internal(format!("shim of {} printed {line:?}: {e}", l.id)))
}

/// A connection to one container's shim.
pub struct ShimClient {
    bundle: PathBuf,
}

impl ShimClient {
    /// The shim of the container whose bundle is `bundle`.
    pub fn new(bundle: &Path) -> Self {
        ShimClient {
            bundle: bundle.to_owned(),
        }
    }

    /// Sends one request and reads its answer. `timeout` bounds the whole exchange (`Wait` may
    /// legitimately take long; pass `None` to wait for ever).
    pub async fn call(&self, req: &Request, timeout: Option<Duration>) -> Result<Response> {
        let exchange = async {
            let sock = self.bundle.join(SOCKET_NAME);
            // Socket paths are limited to 108 bytes; a long state dir plus a 64-digit id can
            // exceed that. Going through an fd of the bundle dir keeps the path short.
            let dir = std::fs::File::open(&self.bundle).map_err(|e| {
                Error::Unavailable(format!("shim bundle {}: {e}", self.bundle.display()))
            })?;
            let short = format!(
                "/proc/self/fd/{}/{SOCKET_NAME}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            );
            let stream = UnixStream::connect(&short)
                .await
                .map_err(|e| Error::Unavailable(format!("shim at {}: {e}", sock.display())))?;
            drop(dir);
            let (r, mut w) = stream.into_split();
            let mut line =
                serde_json::to_vec(req).map_err(|e| Error::internal("encode shim request", e))?;
            line.push(b'\n');
            w.write_all(&line)
                .await
                .map_err(|e| Error::Unavailable(format!("write to shim: {e}")))?;
            let mut answer = String::new();
            BufReader::new(r)
                .read_line(&mut answer)
                .await
                .map_err(|e| Error::Unavailable(format!("read from shim: {e}")))?;
            if answer.is_empty() {
                return Err(Error::Unavailable("shim closed the connection".into()));
            }
            serde_json::from_str::<Response>(&answer)
                .map_err(|e| Error::Internal(format!("shim answered {answer:?}: {e}")))
        };
        let resp = match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| Error::Unavailable(format!("shim did not answer within {t:?}")))??,
            None => exchange.await?,
        };
        match resp {
            Response::Error { message } => Err(Error::FailedPrecondition(message)),
            other => Ok(other),
        }
    }

    /// The exit record the shim wrote, if the container has exited.
    pub fn exit_record(&self) -> Option<ExitStatus> {
        let bytes = std::fs::read(self.bundle.join(EXIT_FILE_NAME)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}
