//! Moving bytes between the local stdio and an attached container or exec session.

use std::io::{Read, Write};
use std::pin::Pin;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::{ResizeContainerTTYOptions, ResizeExecOptions};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// What a window-size change resizes.
#[derive(Clone)]
pub enum ResizeTarget {
    Container(String),
    Exec(String),
}

impl ResizeTarget {
    async fn resize(&self, d: &Docker, (h, w): (u16, u16)) -> Result<()> {
        match self {
            ResizeTarget::Container(id) => d
                .resize_container_tty(
                    id,
                    ResizeContainerTTYOptions {
                        h: i32::from(h),
                        w: i32::from(w),
                    },
                )
                .await
                .context("resize the container's tty"),
            ResizeTarget::Exec(id) => d
                .resize_exec(
                    id,
                    ResizeExecOptions {
                        h: i32::from(h),
                        w: i32::from(w),
                    },
                )
                .await
                .context("resize the exec's tty"),
        }
    }

    /// Sends the terminal's size now and again on every SIGWINCH, until the task is dropped.
    /// The first resize may come before the process has its tty; it is retried briefly, as
    /// docker does.
    pub fn follow(self, d: Docker) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if let Some(size) = crate::tty::size() {
                for _ in 0..10 {
                    if self.resize(&d, size).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(size) = crate::tty::size() {
                    let _ = self.resize(&d, size).await;
                }
            }
        })
    }
}

/// Forwards the signals a user sends us to the container (docker's `--sig-proxy`), until the
/// task is dropped. With a raw terminal, ^C arrives as a byte instead and goes by stdin.
pub fn proxy_signals(d: Docker, id: String) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let kinds = [
            (SignalKind::interrupt(), "SIGINT"),
            (SignalKind::terminate(), "SIGTERM"),
            (SignalKind::hangup(), "SIGHUP"),
            (SignalKind::quit(), "SIGQUIT"),
            (SignalKind::user_defined1(), "SIGUSR1"),
            (SignalKind::user_defined2(), "SIGUSR2"),
        ];
        let mut streams = Vec::new();
        for (k, name) in kinds {
            if let Ok(s) = signal(k) {
                streams.push((s, name));
            }
        }
        loop {
            let next = futures::future::select_all(
                streams
                    .iter_mut()
                    .map(|(s, name)| Box::pin(async move { s.recv().await.map(|_| *name) })),
            );
            let (got, _, _) = next.await;
            let Some(name) = got else { return };
            let _ = d
                .kill_container(
                    &id,
                    Some(bollard::query_parameters::KillContainerOptions {
                        signal: name.to_owned(),
                    }),
                )
                .await;
        }
    })
}

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// Our stdin, read on a thread of its own: a blocking read of a terminal cannot be
/// cancelled, and the process exits without waiting for it.
fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Copies `output` to our stdout/stderr until it ends, and (with `stdin`) our stdin into
/// `input`. Without a tty, the end of our stdin half-closes the connection, so a `cat` in the
/// container sees its EOF and output still flows back.
pub async fn pump(mut output: Output, mut input: Input, stdin: bool, tty: bool) -> Result<()> {
    let feeder = stdin.then(|| {
        tokio::spawn(async move {
            let mut rx = stdin_chunks();
            while let Some(chunk) = rx.recv().await {
                if input.write_all(&chunk).await.is_err() || input.flush().await.is_err() {
                    return;
                }
            }
            if !tty {
                let _ = input.shutdown().await;
            }
            // With a tty the session ends when the process does; keep the write half open.
            std::future::pending::<()>().await;
        })
    });
    let result = async {
        while let Some(item) = output.next().await {
            match item.context("read the container's output")? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&message).context("write stdout")?;
                    out.flush().context("write stdout")?;
                }
                LogOutput::StdErr { message } => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&message).context("write stderr")?;
                    err.flush().context("write stderr")?;
                }
                LogOutput::StdIn { .. } => {}
            }
        }
        Ok(())
    }
    .await;
    if let Some(f) = feeder {
        f.abort();
    }
    result
}
