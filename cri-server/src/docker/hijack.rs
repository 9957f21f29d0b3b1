//! Hijacked connections (`attach`, `exec start`): the client asks for `Upgrade: tcp`, gets
//! 101, and the connection carries stdin one way and the output the other, in docker's
//! multiplexed frames (`[stream, 0, 0, 0, size BE u32] payload`) or raw with a terminal. The
//! client half-closes to end stdin; the server closes when the output ends.

use std::future::Future;

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::{ApiResult, Req, channel_body, empty};

/// Size of one read from an output pipe.
const CHUNK: usize = 32 * 1024;

/// One multiplexed frame: `kind` 1 stdout, 2 stderr.
pub(super) fn frame(kind: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + payload.len());
    b.extend_from_slice(&[kind, 0, 0, 0]);
    b.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    b.extend_from_slice(payload);
    b.freeze()
}

/// The streams of a session, berthd's ends.
pub(super) struct Streams {
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
}

impl Streams {
    /// Pipes of an attach or a non-terminal exec.
    pub fn pipes(
        stdin: Option<pipe::Sender>,
        stdout: Option<pipe::Receiver>,
        stderr: Option<pipe::Receiver>,
    ) -> Streams {
        Streams {
            stdin: stdin.map(|s| Box::new(s) as Box<dyn AsyncWrite + Send + Unpin>),
            stdout: stdout.map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
            stderr: stderr.map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        }
    }
}

/// Answers `req` by hijacking its connection: 101 when the client asked to upgrade, then
/// `run` with the connection. A client that did not ask to upgrade (old clients) gets a 200
/// whose body is the output; it has no stdin.
pub(super) fn serve<F, Fut>(req: Req, tty: bool, run: F) -> ApiResult
where
    F: FnOnce(Conn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let content_type = if tty {
        "application/vnd.docker.raw-stream"
    } else {
        "application/vnd.docker.multiplexed-stream"
    };
    let upgrade = req
        .inner
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| !v.is_empty());
    if upgrade {
        let on_upgrade = hyper::upgrade::on(req.inner);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(io) => run(Conn::Upgraded(TokioIo::new(io))).await,
                Err(e) => tracing::debug!(error = %e, "docker API upgrade failed"),
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "tcp")
            .header(header::CONTENT_TYPE, content_type)
            .body(empty())
            .expect("static response parts"));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(run(Conn::Body(tx)));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(channel_body(rx))
        .expect("static response parts"))
}

/// The client's side of a hijacked session.
pub(super) enum Conn {
    /// The upgraded connection.
    Upgraded(TokioIo<Upgraded>),
    /// Output only, as a response body.
    Body(mpsc::Sender<std::io::Result<Bytes>>),
}

impl Conn {
    /// Writes an error the way docker does once a stream is hijacked: as text on the stream.
    pub async fn fail(self, message: &str, tty: bool) {
        let text = format!("Error: {message}\n");
        let bytes = if tty {
            Bytes::from(text)
        } else {
            frame(2, text.as_bytes())
        };
        match self {
            Conn::Upgraded(mut io) => {
                let _ = io.write_all(&bytes).await;
                let _ = io.shutdown().await;
            }
            Conn::Body(tx) => {
                let _ = tx.send(Ok(bytes)).await;
            }
        }
    }

    /// Copies the client's input into `stdin` and the outputs to the client until the
    /// outputs end (the process closed them) or the client goes away. `done` (the process's
    /// exit, recorded) completes before the connection is closed, so a client that looks
    /// right after the end of the stream finds the exit; output still coming after it gets a
    /// short grace to drain.
    pub async fn pump(self, s: Streams, tty: bool, done: impl Future<Output = ()>) {
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(8);
        let mut readers = Vec::new();
        for (kind, pipe) in [(1u8, s.stdout), (2u8, s.stderr)] {
            if let Some(p) = pipe {
                readers.push(tokio::spawn(read_output(p, kind, tty, out_tx.clone())));
            }
        }
        drop(out_tx);
        let mut done = std::pin::pin!(done);
        let mut finished = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        let (mut writer, stdin_task): (Option<tokio::io::WriteHalf<TokioIo<Upgraded>>>, _) =
            match self {
                Conn::Upgraded(io) => {
                    let (mut rd, wr) = tokio::io::split(io);
                    let task = s.stdin.map(|mut stdin| {
                        tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut rd, &mut stdin).await;
                            // Client half-closed (or went away): the process sees end of input.
                            let _ = stdin.shutdown().await;
                        })
                    });
                    (Some(wr), Sends::Upgraded(task))
                }
                Conn::Body(tx) => (None, Sends::Body(tx)),
            };
        let mut client_gone = false;
        loop {
            let grace = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                b = out_rx.recv() => {
                    let Some(b) = b else { break };
                    let sent = match (&mut writer, &stdin_task) {
                        (Some(w), _) => w.write_all(&b).await.is_ok(),
                        (None, Sends::Body(tx)) => tx.send(Ok(b)).await.is_ok(),
                        (None, _) => false,
                    };
                    if !sent {
                        client_gone = true;
                        break;
                    }
                }
                _ = &mut done, if !finished => {
                    finished = true;
                    deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_millis(500));
                }
                _ = grace => break,
            }
        }
        if !finished && !client_gone {
            done.await;
        }
        if let Some(mut w) = writer {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
        if let Sends::Upgraded(Some(t)) = stdin_task {
            t.abort();
        }
        for r in readers {
            r.abort();
        }
    }
}

/// Where the output goes besides the upgraded connection's writer, and the stdin copier.
enum Sends {
    Upgraded(Option<tokio::task::JoinHandle<()>>),
    Body(mpsc::Sender<std::io::Result<Bytes>>),
}

async fn read_output(mut p: impl AsyncRead + Unpin, kind: u8, tty: bool, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match p.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let b = if tty {
                    Bytes::copy_from_slice(&buf[..n])
                } else {
                    frame(kind, &buf[..n])
                };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_stream_and_length() {
        let f = frame(2, b"hi");
        assert_eq!(&f[..], &[2, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']);
    }
}
