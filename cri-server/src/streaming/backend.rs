//! The streaming server's [`Backend`] on berthd's core.

use std::sync::Arc;
use std::time::Duration;

use api::cri;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::remotecommand::TerminalSize;
use super::{Backend, StdStreams};
use crate::container::ContainerManager;
use crate::container::stream::StreamOpts;
use crate::error::Result;
use crate::sandbox::SandboxManager;

/// How long output may go on after an exec'd process exited (a background child holding it
/// open does not keep the session alive).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// Bytes read from the process per message.
const CHUNK: usize = 32 * 1024;

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Copies the process's output to the client until end of file or the client is gone.
async fn copy_out(from: Option<Reader>, to: Option<mpsc::Sender<Bytes>>) {
    let (Some(mut from), Some(to)) = (from, to) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies the client's input to the process until the client's end of file, then closes the
/// process's input (by dropping the writer).
async fn copy_in(from: Option<mpsc::Receiver<Bytes>>, to: Option<Writer>) {
    let (Some(mut from), Some(mut to)) = (from, to) else {
        return;
    };
    while let Some(data) = from.recv().await {
        if to.write_all(&data).await.is_err() {
            return;
        }
    }
}

/// Exec and attach through the containers' shims, port forwarding into pod namespaces.
pub struct CoreBackend {
    /// The pods.
    pub sandboxes: Arc<SandboxManager>,
    /// The containers.
    pub containers: Arc<ContainerManager>,
}

#[async_trait]
impl Backend for CoreBackend {
    async fn exec(&self, req: &cri::ExecRequest, io: StdStreams) -> Result<i32> {
        let mut session = self
            .containers
            .exec_stream(
                &req.container_id,
                req.cmd.clone(),
                StreamOpts::of_exec(req),
                Default::default(),
            )
            .await?;
        let StdStreams {
            stdin,
            stdout,
            stderr,
            resize,
        } = io;
        let pty = session.pty.take();
        let (input, output): (Option<Writer>, Option<Reader>) = match &pty {
            Some(p) => (Some(Box::new(p.clone())), Some(Box::new(p.clone()))),
            None => (
                session.stdin.take().map(|w| Box::new(w) as Writer),
                session.stdout.take().map(|r| Box::new(r) as Reader),
            ),
        };
        let errors = session.stderr.take().map(|r| Box::new(r) as Reader);
        let resizing = {
            let pty = pty.clone();
            async move {
                let (Some(mut sizes), Some(pty)) = (resize, pty) else {
                    return;
                };
                while let Some(TerminalSize { width, height }) = sizes.recv().await {
                    if let Err(e) = pty.resize(width, height) {
                        tracing::debug!(error = %e, "resize an exec terminal");
                    }
                }
            }
        };
        drop(pty);
        // Input and resizes go on while the process runs; the session ends with the process.
        let side = async {
            tokio::join!(copy_in(stdin, input), resizing);
            std::future::pending::<()>().await
        };
        let outputs = async {
            tokio::join!(copy_out(output, stdout), copy_out(errors, stderr));
        };
        tokio::pin!(side, outputs);
        let waiting = session.wait();
        tokio::pin!(waiting);
        let mut outputs_done = false;
        let code = loop {
            tokio::select! {
                code = &mut waiting => break code?,
                () = &mut outputs, if !outputs_done => outputs_done = true,
                () = &mut side => {}
            }
        };
        if !outputs_done {
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut outputs).await;
        }
        Ok(code)
    }

    async fn attach(&self, req: &cri::AttachRequest, io: StdStreams) -> Result<()> {
        let opts = StreamOpts::of_attach(req);
        let mut session = self.containers.attach(&req.container_id, opts).await?;
        let StdStreams {
            stdin,
            stdout,
            stderr,
            resize,
        } = io;
        let input = session.stdin.take().map(|w| Box::new(w) as Writer);
        let output = session.stdout.take().map(|r| Box::new(r) as Reader);
        let errors = session.stderr.take().map(|r| Box::new(r) as Reader);
        let session = &session;
        let resizing = async move {
            let Some(mut sizes) = resize else {
                return;
            };
            while let Some(TerminalSize { width, height }) = sizes.recv().await {
                if let Err(e) = session.resize(width, height).await {
                    tracing::debug!(error = %e, "resize an attached terminal");
                }
            }
        };
        let side = async {
            tokio::join!(copy_in(stdin, input), resizing);
            std::future::pending::<()>().await
        };
        // The session lasts as long as the container's output (it ends when the container
        // stops, or when the shim cuts off a reader that fell behind).
        let reads = output.is_some() || errors.is_some();
        let outputs = async {
            if reads {
                tokio::join!(copy_out(output, stdout), copy_out(errors, stderr));
            } else {
                // Input only: until the container exits.
                let _ = session.wait().await;
            }
        };
        tokio::select! {
            () = outputs => {}
            () = side => {}
        }
        Ok(())
    }

    async fn dial(&self, pod_sandbox_id: &str, port: u16) -> Result<TcpStream> {
        self.sandboxes.dial(pod_sandbox_id, port).await
    }
}
