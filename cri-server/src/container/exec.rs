//! ExecSync: a command run to completion in a running container, its output collected.
//!
//! berthd makes the stdout/stderr pipes and passes their write ends to the shim with the `Exec`
//! request; the shim starts the process and reaps it. berthd reads the pipes while it waits for
//! the exit. Two things must not hang the call:
//! - the deadline: at `timeout` the process is killed and the call fails with DeadlineExceeded
//!   (kubelet tells a timed-out probe by that code);
//! - a background child that inherited stdout and keeps it open: once the process has exited,
//!   what it wrote is already in the pipes, so the readers get [`DRAIN_AFTER_EXIT`] to finish and
//!   are then dropped, with or without end of file.
//!
//! Output beyond [`MAX_OUTPUT`] per stream is read and thrown away, so the process never blocks
//! on a full pipe and the answer stays under the 16 MiB gRPC message limit of kubelet and crictl.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::shim::{Request, Response};
use tokio::io::AsyncReadExt;

use super::shim_client::ShimClient;
use crate::error::{Error, Result};

/// Bytes kept per output stream.
pub const MAX_OUTPUT: usize = 8 * 1024 * 1024 - 64 * 1024;
/// How long readers may go on after the process exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// Deadline of the shim's answer to `Exec` (the process is running or failed by then).
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What an ExecSync returns.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// stdout, at most [`MAX_OUTPUT`] bytes.
    pub stdout: Vec<u8>,
    /// stderr, at most [`MAX_OUTPUT`] bytes.
    pub stderr: Vec<u8>,
    /// Exit code; 128 + signal number when a signal killed it.
    pub exit_code: i32,
}

/// Runs `args` in the container served by `shim` and collects its output. `timeout` zero means
/// no deadline.
pub async fn exec_sync(
    shim: &ShimClient,
    container_id: &str,
    args: Vec<String>,
    timeout: Duration,
) -> Result<ExecOutput> {
    if args.is_empty() {
        return Err(Error::InvalidArgument("exec needs a command".into()));
    }
    let exec_id = hex::encode(rand::random::<[u8; 16]>());
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut conn = shim.connect().await?;
    let req = Request::Exec {
        exec_id: exec_id.clone(),
        args,
        stdin: false,
        stdout: true,
        stderr: true,
        tty: false,
        overrides: Default::default(),
    };
    conn.send(&req, &[out_w.as_raw_fd(), err_w.as_raw_fd()])
        .await?;
    // The shim has its own copies now; ours would keep the readers from ever seeing EOF.
    drop((out_w, err_w));
    let readers = Readers::spawn(out_r, err_r);
    match tokio::time::timeout(START_TIMEOUT, conn.recv()).await {
        Ok(Ok(Response::Exec { pid })) => {
            tracing::debug!(%container_id, %exec_id, pid, "exec started");
        }
        Ok(Ok(other)) => {
            return Err(Error::Internal(format!(
                "shim answered exec with {other:?}"
            )));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::Unavailable(format!(
                "shim did not start the exec within {START_TIMEOUT:?}"
            )));
        }
    }
    // From here on the process runs: if this call goes away (deadline, client cancelled), kill it.
    let mut guard = KillOnDrop {
        shim: shim.clone(),
        exec_id: exec_id.clone(),
        armed: true,
    };
    let wait = async {
        conn.send(
            &Request::WaitExec {
                exec_id: exec_id.clone(),
            },
            &[],
        )
        .await?;
        conn.recv().await
    };
    let exit = if timeout.is_zero() {
        wait.await
    } else {
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(%container_id, %exec_id, ?timeout, "exec timed out: killing it");
                drop(guard);
                return Err(Error::DeadlineExceeded(format!(
                    "command timed out after {timeout:?}"
                )));
            }
        }
    };
    let exit_code = match exit? {
        Response::ExecExit { code, .. } => code,
        other => {
            return Err(Error::Internal(format!(
                "shim answered wait_exec with {other:?}"
            )));
        }
    };
    guard.armed = false;
    let (stdout, stderr) = readers.finish().await;
    Ok(ExecOutput {
        stdout,
        stderr,
        exit_code,
    })
}

/// The two output readers; aborted when dropped.
struct Readers {
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// What each has read so far: a reader blocked on a pipe a background child holds open
    /// never returns, but its output counts.
    bufs: [Arc<Mutex<Vec<u8>>>; 2],
}

impl Readers {
    fn spawn(stdout: OwnedFd, stderr: OwnedFd) -> Readers {
        let bufs: [Arc<Mutex<Vec<u8>>>; 2] = Default::default();
        let tasks = [
            tokio::spawn(read_capped(stdout, bufs[0].clone())),
            tokio::spawn(read_capped(stderr, bufs[1].clone())),
        ];
        Readers { tasks, bufs }
    }

    /// What each reader got, giving them [`DRAIN_AFTER_EXIT`] to reach end of file.
    async fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        let deadline = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
        for t in self.tasks.iter_mut() {
            let _ = tokio::time::timeout_at(deadline, &mut *t).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        let take = |b: &Arc<Mutex<Vec<u8>>>| {
            std::mem::take(&mut *b.lock().unwrap_or_else(|p| p.into_inner()))
        };
        (take(&self.bufs[0]), take(&self.bufs[1]))
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Kills the exec'd process unless disarmed (and collects its exit, so the shim forgets it).
#[derive(Debug)]
pub(super) struct KillOnDrop {
    pub(super) shim: ShimClient,
    pub(super) exec_id: String,
    pub(super) armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shim = self.shim.clone();
        let exec_id = self.exec_id.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%exec_id, "no runtime to kill the exec on");
            return;
        };
        rt.spawn(async move {
            let kill = Request::KillExec {
                exec_id: exec_id.clone(),
                signal: libc::SIGKILL,
            };
            if let Err(e) = shim.call(&kill, Some(Duration::from_secs(5))).await {
                tracing::warn!(%exec_id, error = %e, "kill exec");
                return;
            }
            // Collect its exit so the shim forgets it.
            let wait = Request::WaitExec { exec_id };
            let _ = shim.call(&wait, Some(Duration::from_secs(5))).await;
        });
    }
}

pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal("exec output pipe", std::io::Error::from(e)))
}

/// Reads the pipe to its end into `kept`, up to [`MAX_OUTPUT`] bytes; the rest is discarded.
async fn read_capped(fd: OwnedFd, kept: Arc<Mutex<Vec<u8>>>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                let room = MAX_OUTPUT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_capped_and_drained() {
        let (r, w) = pipe().expect("pipe");
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::from(w);
            let chunk = vec![b'x'; 1024 * 1024];
            for _ in 0..(MAX_OUTPUT / chunk.len() + 3) {
                f.write_all(&chunk).expect("write");
            }
        });
        let got = Arc::new(Mutex::new(Vec::new()));
        read_capped(r, got.clone()).await;
        writer.join().expect("writer");
        assert_eq!(got.lock().expect("lock").len(), MAX_OUTPUT);
    }
}
