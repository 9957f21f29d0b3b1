//! berthd's side of the shim protocol (see [`api::shim`]): start a shim, then talk JSON lines to
//! it over the socket in the bundle dir.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::shim::{Created, EXIT_FILE_NAME, ExitStatus, Request, Response, SOCKET_NAME};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest answer line accepted from a shim.
const MAX_ANSWER: usize = 64 * 1024;
/// File descriptors kept from a shim's answers until taken (a tty exec's answer carries one).
const MAX_RECEIVED_FDS: usize = 4;

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
#[derive(Debug, Clone)]
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

    /// Connects to the shim's socket.
    pub async fn connect(&self) -> Result<ShimConn> {
        let sock = self.bundle.join(SOCKET_NAME);
        // Socket paths are limited to 108 bytes; a long state dir plus a 64-digit id can exceed
        // that. Going through an fd of the bundle dir keeps the path short.
        let dir = std::fs::File::open(&self.bundle).map_err(|e| {
            Error::Unavailable(format!("shim bundle {}: {e}", self.bundle.display()))
        })?;
        let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd());
        let stream = UnixStream::connect(&short)
            .await
            .map_err(|e| Error::Unavailable(format!("shim at {}: {e}", sock.display())))?;
        Ok(ShimConn::from_stream(stream))
    }

    /// Sends one request and reads its answer. `timeout` bounds the whole exchange (`Wait` may
    /// legitimately take long; pass `None` to wait for ever).
    pub async fn call(&self, req: &Request, timeout: Option<Duration>) -> Result<Response> {
        let exchange = async {
            let mut conn = self.connect().await?;
            conn.send(req, &[]).await?;
            conn.recv().await
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| Error::Unavailable(format!("shim did not answer within {t:?}")))?,
            None => exchange.await,
        }
    }

    /// The exit record the shim wrote, if the container has exited.
    pub fn exit_record(&self) -> Option<ExitStatus> {
        let bytes = std::fs::read(self.bundle.join(EXIT_FILE_NAME)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// One connection to a shim: requests out, answers back in order.
pub struct ShimConn {
    stream: UnixStream,
    /// Received bytes not yet parsed.
    buf: Vec<u8>,
    /// File descriptors that came with answers (`SCM_RIGHTS`), not yet taken.
    fds: VecDeque<OwnedFd>,
}

impl ShimConn {
    fn from_stream(stream: UnixStream) -> ShimConn {
        ShimConn {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// The oldest file descriptor a shim's answer carried and nobody took yet (the pty master
    /// comes with the answer to a tty `Exec`).
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Sends one request line; `fds` travel with its first byte (`SCM_RIGHTS`).
    pub async fn send(&mut self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| Error::internal("encode shim request", e))?;
        line.push(b'\n');
        let mut sent = 0;
        while sent < line.len() {
            let pending = &line[sent..];
            let with_fds = sent == 0 && !fds.is_empty();
            let res = self.stream.async_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(pending)];
                let rights = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage] = if with_fds { &rights } else { &[] };
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            sent += res
                .await
                .map_err(|e| Error::Unavailable(format!("write to shim: {e}")))?;
        }
        Ok(())
    }

    /// Reads the next answer; a shim error becomes [`Error::FailedPrecondition`].
    pub async fn recv(&mut self) -> Result<Response> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let resp = serde_json::from_slice::<Response>(&line).map_err(|e| {
                    Error::Internal(format!(
                        "shim answered {:?}: {e}",
                        String::from_utf8_lossy(&line)
                    ))
                })?;
                return match resp {
                    Response::Error { message } => Err(Error::FailedPrecondition(message)),
                    other => Ok(other),
                };
            }
            if self.buf.len() > MAX_ANSWER {
                return Err(Error::Internal("shim answer too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .read_some(&mut chunk)
                .await
                .map_err(|e| Error::Unavailable(format!("read from shim: {e}")))?;
            if n == 0 {
                return Err(Error::Unavailable("shim closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One `recvmsg`: bytes into `chunk`, passed fds onto the queue (beyond its bound they are
    /// closed).
    async fn read_some(&mut self, chunk: &mut [u8]) -> std::io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let fds = &mut self.fds;
        self.stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(chunk)];
                let mut space = nix::cmsg_space!([RawFd; MAX_RECEIVED_FDS]);
                let msg = recvmsg::<()>(
                    fd,
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(std::io::Error::from)?;
                let n = msg.bytes;
                for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        for raw in received {
                            // SAFETY: the kernel just installed this fd in our table for us
                            // alone.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            if fds.len() < MAX_RECEIVED_FDS {
                                fds.push_back(owned);
                            }
                        }
                    }
                }
                Ok(n)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_carry_file_descriptors() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let mut conn = ShimConn::from_stream(UnixStream::from_std(ours).expect("tokio stream"));
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let line = b"{\"result\":\"exec\",\"pid\":7}\n{\"result\":\"ok\"}\n";
        let rights = [r.as_raw_fd()];
        sendmsg::<()>(
            theirs.as_raw_fd(),
            &[IoSlice::new(line)],
            &[ControlMessage::ScmRights(&rights)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(r);
        assert_eq!(conn.recv().await.expect("recv"), Response::Exec { pid: 7 });
        let got = conn.take_fd().expect("the fd came along");
        assert!(conn.take_fd().is_none());
        assert_eq!(conn.recv().await.expect("recv"), Response::Ok);
        // It is the pipe's read end.
        nix::unistd::write(&w, b"x").expect("write");
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(&got, &mut b).expect("read"), 1);
    }
}
