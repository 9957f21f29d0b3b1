//! berthd's streaming server: where the URLs of Exec, Attach and PortForward lead.
//!
//! kubelet (proxying for kubectl) and crictl connect to the URL a streaming RPC returned and
//! upgrade the connection to SPDY/3.1 or WebSocket; see `berth_streaming` for the framings. The
//! server listens on TCP (`[streaming] address`, loopback with a random port by default, as
//! containerd). Each URL is `http://<address>/<exec|attach|portforward>/<token>`, the token
//! single-use and valid for a minute ([`cache`]); anything else gets 404.
//!
//! The protocols above the framing (remotecommand for exec and attach, portforward) are in
//! [`remotecommand`] and [`portforward`]. What runs in the container is the [`Backend`]'s
//! business, which sees only [`StdStreams`]: bounded channels, so a slow client slows the
//! process down (exec) or is dropped by the shim (attach), and nothing queues without bound.

pub mod backend;
pub mod cache;
pub mod portforward;
pub mod remotecommand;
mod spdy_session;
mod ws_session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::streaming::{spdy, ws};
use api::cri;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use self::cache::{Pending, TokenCache};
use self::remotecommand::{Protocol, TerminalSize};
use crate::config::StreamingSection;
use crate::container::stream::StreamOpts;
use crate::error::{Error, Result};

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The process side of an exec or attach session. Closed channels mean end of stream: the
/// backend drops `stdout`/`stderr` when the process's output ends, and `stdin` yields None when
/// the client is done writing.
#[derive(Debug, Default)]
pub struct StdStreams {
    /// Input for the process.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// The process's standard output (with a tty: all its output).
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// The process's standard error.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal size changes (tty only).
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// What the streaming server asks of the runtime.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `req`'s command with `io` and returns its exit code. Dropping the future (the
    /// client went away) kills the process.
    async fn exec(&self, req: &cri::ExecRequest, io: StdStreams) -> Result<i32>;
    /// Attaches `io` to the container's main process until its output ends or (dropped) the
    /// client goes away.
    async fn attach(&self, req: &cri::AttachRequest, io: StdStreams) -> Result<()>;
    /// A TCP connection to `port` on the loopback of pod `pod_sandbox_id`'s network namespace.
    async fn dial(&self, pod_sandbox_id: &str, port: u16) -> Result<TcpStream>;
}

/// The running streaming server.
pub struct StreamingServer {
    addr: SocketAddr,
    tokens: Arc<TokenCache>,
}

impl StreamingServer {
    /// Binds `cfg.address` and serves connections in the background with `backend`.
    pub async fn start(cfg: &StreamingSection, backend: Arc<dyn Backend>) -> Result<Self> {
        let listener = TcpListener::bind(&cfg.address).await.map_err(|e| {
            Error::Internal(format!("bind the streaming server to {}: {e}", cfg.address))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("streaming server address: {e}")))?;
        let tokens = Arc::new(TokenCache::default());
        let conn = Arc::new(ConnCtx {
            tokens: tokens.clone(),
            backend,
            idle: Duration::from_secs(cfg.idle_timeout_secs),
        });
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((io, peer)) => {
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let _ = io.set_nodelay(true);
                            conn.serve(io, peer).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server: accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(%addr, "streaming server listening");
        Ok(StreamingServer { addr, tokens })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A URL for `req`, good for one connection within a minute.
    pub fn url(&self, req: Pending) -> Result<String> {
        let kind = match &req {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        };
        let token = self.tokens.insert(req)?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }
}

/// What every connection needs.
struct ConnCtx {
    tokens: Arc<TokenCache>,
    backend: Arc<dyn Backend>,
    /// A connection with no traffic for this long is closed.
    idle: Duration,
}

/// Which framing the client asked for.
enum Upgrade {
    WebSocket,
    Spdy,
}

impl ConnCtx {
    async fn serve(&self, mut io: TcpStream, peer: SocketAddr) {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, ws::read_request(&mut io)).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "streaming server: bad request");
                let _ = respond(&mut io, StatusCode::BAD_REQUEST, &e.to_string()).await;
                return;
            }
            Err(_) => return,
        };
        let path = head.path_and_query.split('?').next().unwrap_or_default();
        let (kind, token) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or_default();
        // A request that is no upgrade at all is refused before its token is looked at, so it
        // does not spend a good token...
        let upgrade = match upgrade_of(&head.headers) {
            Some(u) => u,
            None => {
                let _ = respond(
                    &mut io,
                    StatusCode::BAD_REQUEST,
                    "streaming needs an upgrade to SPDY/3.1 or websocket",
                )
                .await;
                return;
            }
        };
        // ...but any upgrade request spends it, as in kubelet.
        let pending = match (kind, self.tokens.take(token)) {
            ("exec", Some(p @ Pending::Exec(_)))
            | ("attach", Some(p @ Pending::Attach(_)))
            | ("portforward", Some(p @ Pending::PortForward(_))) => p,
            _ => {
                tracing::debug!(%peer, path, "streaming server: unknown, used or expired token");
                let _ = respond(&mut io, StatusCode::NOT_FOUND, "404 page not found").await;
                return;
            }
        };
        match upgrade {
            Upgrade::WebSocket => self.serve_ws(io, head, pending).await,
            Upgrade::Spdy => self.serve_spdy(io, head, pending).await,
        }
    }

    async fn serve_spdy(&self, mut io: TcpStream, head: ws::RequestHead, pending: Pending) {
        let supported: &[&str] = match pending {
            Pending::PortForward(_) => &portforward::SPDY_PROTOCOLS,
            _ => &remotecommand::SPDY_PROTOCOLS,
        };
        let offered: Vec<&str> = head
            .headers
            .get_all(spdy_session::PROTOCOL_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let protocol = match spdy_session::negotiate(&offered, supported) {
            Ok(p) => p,
            Err(msg) => {
                let _ = respond(&mut io, StatusCode::FORBIDDEN, &msg).await;
                return;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        if let Some(p) = protocol {
            headers.insert(spdy_session::PROTOCOL_HEADER, HeaderValue::from_static(p));
        }
        if ws::write_response(&mut io, StatusCode::SWITCHING_PROTOCOLS, &headers, &[])
            .await
            .is_err()
        {
            return;
        }
        let mut config = spdy::Config::default();
        config.idle_timeout = Some(self.idle);
        let session = spdy::Session::server(::streaming::Prefixed::new(head.leftover, io), config);
        let backend = self.backend.clone();
        let proto = Protocol::parse(protocol);
        match pending {
            Pending::Exec(req) => {
                let opts = StreamOpts::of_exec(&req);
                spdy_session::remotecommand(session, proto, opts, |io| async move {
                    backend.exec(&req, io).await
                })
                .await;
            }
            Pending::Attach(req) => {
                let opts = StreamOpts::of_attach(&req);
                spdy_session::remotecommand(session, proto, opts, |io| async move {
                    backend.attach(&req, io).await.map(|()| 0)
                })
                .await;
            }
            Pending::PortForward(req) => {
                spdy_session::portforward(session, |port| {
                    let backend = backend.clone();
                    let pod = req.pod_sandbox_id.clone();
                    async move { backend.dial(&pod, port).await }
                })
                .await;
            }
        }
    }

    async fn serve_ws(&self, mut io: TcpStream, head: ws::RequestHead, pending: Pending) {
        let protocols: &[&str] = match pending {
            Pending::PortForward(_) => &portforward::WS_PROTOCOLS,
            _ => &remotecommand::WS_PROTOCOLS,
        };
        let hs = match ws::server_handshake(&head.method, &head.headers, protocols) {
            Ok(hs) => hs,
            Err(e) => {
                let mut headers = e.response_headers();
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                let _ =
                    ws::write_response(&mut io, e.status(), &headers, format!("{e}\n").as_bytes())
                        .await;
                return;
            }
        };
        if ws::write_response(
            &mut io,
            StatusCode::SWITCHING_PROTOCOLS,
            &hs.response_headers(),
            &[],
        )
        .await
        .is_err()
        {
            return;
        }
        let config = ws::Config {
            idle_timeout: Some(self.idle),
            ..ws::Config::default()
        };
        let socket = ws::WebSocket::from_upgraded(io, ws::Role::Server, config, head.leftover);
        let protocol = hs.protocol().map(str::to_owned);
        let backend = self.backend.clone();
        match pending {
            Pending::Exec(req) => {
                let opts = StreamOpts::of_exec(&req);
                let proto = Protocol::parse(protocol.as_deref());
                ws_session::remotecommand(socket, proto, opts, |io| async move {
                    backend.exec(&req, io).await
                })
                .await;
            }
            Pending::Attach(req) => {
                let opts = StreamOpts::of_attach(&req);
                let proto = Protocol::parse(protocol.as_deref());
                ws_session::remotecommand(socket, proto, opts, |io| async move {
                    backend.attach(&req, io).await.map(|()| 0)
                })
                .await;
            }
            Pending::PortForward(req) => {
                let ports = query_ports(&head.path_and_query, &req.port);
                let base64 = protocol.as_deref().is_some_and(|p| p.contains("base64"));
                ws_session::portforward(socket, base64, ports, |port| {
                    let backend = backend.clone();
                    let pod = req.pod_sandbox_id.clone();
                    async move { backend.dial(&pod, port).await }
                })
                .await;
            }
        }
    }
}

/// The framing the request asks for.
fn upgrade_of(headers: &HeaderMap) -> Option<Upgrade> {
    let upgrade = headers.get(header::UPGRADE)?.to_str().ok()?;
    if upgrade.eq_ignore_ascii_case("websocket") {
        Some(Upgrade::WebSocket)
    } else if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        Some(Upgrade::Spdy)
    } else {
        None
    }
}

/// The ports to forward: the request's `port` query parameters (kubectl names them there), else
/// the ports of the PortForward request.
fn query_ports(path_and_query: &str, requested: &[i32]) -> Vec<u16> {
    let from_query: Vec<u16> = path_and_query
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .filter_map(|p| p.parse().ok())
        .collect();
    if !from_query.is_empty() {
        return from_query;
    }
    requested
        .iter()
        .filter_map(|p| u16::try_from(*p).ok())
        .collect()
}

/// Answers with `status` and a text body, then the connection ends.
async fn respond(io: &mut TcpStream, status: StatusCode, body: &str) -> std::io::Result<()> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    ws::write_response(io, status, &headers, format!("{body}\n").as_bytes()).await
}
