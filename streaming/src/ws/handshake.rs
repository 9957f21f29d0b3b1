//! The opening handshake (RFC 6455 section 4): server-side validation, a raw-stream server
//! accept, and the client side.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, StatusCode};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Config, Error, Role, WebSocket};

/// The GUID that RFC 6455 section 1.3 appends to the key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version (section 4.1).
const VERSION: &str = "13";

/// Caps on an HTTP head we read.
const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` (section 4.2.2): base64 of the
/// SHA-1 of the key (surrounding whitespace removed) followed by the protocol's GUID.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Why a server refuses an upgrade request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request is not a GET.
    #[error("websocket upgrade needs a GET request, not {0}")]
    Method(String),
    /// No `Upgrade: websocket` header.
    #[error("no `Upgrade: websocket` header")]
    NoUpgrade,
    /// The `Connection` header lacks the `upgrade` token.
    #[error("`Connection` header lacks the `upgrade` token")]
    NoConnectionUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13.
    #[error("unsupported Sec-WebSocket-Version {} (only 13 is spoken)", .0.as_deref().unwrap_or("(none)"))]
    Version(Option<String>),
    /// `Sec-WebSocket-Key` is missing or not 16 bytes in base64.
    #[error("Sec-WebSocket-Key is missing or not 16 base64-encoded bytes")]
    Key,
    /// The client offered subprotocols, none of them supported.
    #[error("none of the offered subprotocols {offered:?} is supported (supported: {supported:?})")]
    NoCommonProtocol {
        /// What the client offered.
        offered: Vec<String>,
        /// What the server supports.
        supported: Vec<String>,
    },
}

impl HandshakeError {
    /// The status to answer with: 426 Upgrade Required for a version mismatch, else 400.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Version(_) => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Headers the refusal must carry: `Sec-WebSocket-Version: 13` with a 426 (section 4.4).
    pub fn response_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Self::Version(_) = self {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static(VERSION),
            );
        }
        h
    }
}

/// An accepted upgrade request: what to answer with `101 Switching Protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHandshake {
    accept: HeaderValue,
    protocol: Option<String>,
}

impl ServerHandshake {
    /// The chosen subprotocol, if the client offered any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The headers of the 101 response: `Upgrade`, `Connection`, `Sec-WebSocket-Accept` and,
    /// when one was chosen, `Sec-WebSocket-Protocol`.
    pub fn response_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept.clone());
        if let Some(p) = &self.protocol
            && let Ok(v) = HeaderValue::from_str(p)
        {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
        h
    }
}

/// The comma-separated tokens of every `name` header, trimmed, empty ones skipped.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Validates a client's upgrade request (section 4.2.1) and picks its subprotocol: the first of
/// `protocols` (the server's preference order) that the client offered in any
/// `Sec-WebSocket-Protocol` header. A client that offers none gets none; one that offers only
/// unsupported ones is refused.
pub fn server_handshake(
    method: &Method,
    headers: &HeaderMap,
    protocols: &[&str],
) -> Result<ServerHandshake, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::Method(method.to_string()));
    }
    if !tokens(headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::NoUpgrade);
    }
    if !tokens(headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    let version: Vec<&str> = tokens(headers, &header::SEC_WEBSOCKET_VERSION).collect();
    if version != [VERSION] {
        return Err(HandshakeError::Version(
            (!version.is_empty()).then(|| version.join(", ")),
        ));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.to_str().map_err(|_| HandshakeError::Key)?.trim(),
        _ => return Err(HandshakeError::Key),
    };
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::Key),
    }
    let offered: Vec<&str> = tokens(headers, &header::SEC_WEBSOCKET_PROTOCOL).collect();
    let protocol = if offered.is_empty() {
        None
    } else {
        match protocols.iter().find(|p| offered.contains(p)) {
            Some(p) => Some((*p).to_owned()),
            None => {
                return Err(HandshakeError::NoCommonProtocol {
                    offered: offered.iter().map(|s| (*s).to_owned()).collect(),
                    supported: protocols.iter().map(|s| (*s).to_owned()).collect(),
                });
            }
        }
    };
    let accept = HeaderValue::from_str(&accept_key(key)).expect("base64 is a valid header value");
    Ok(ServerHandshake { accept, protocol })
}

/// The request a server accepted with [`accept`].
#[derive(Clone, Debug)]
pub struct AcceptedRequest {
    /// The request target, e.g. `/exec/abc?cmd=sh`.
    pub path_and_query: String,
    /// All request headers.
    pub headers: HeaderMap,
    /// The chosen subprotocol.
    pub protocol: Option<String>,
}

/// Serves the handshake on a raw stream: reads the HTTP/1.1 request head, validates it with
/// [`server_handshake`], answers 101 and returns the socket, or answers 400/426 and returns the
/// error ([`Error::Handshake`], [`Error::BadHead`]).
pub async fn accept<S>(
    mut io: S,
    protocols: &[&str],
    config: Config,
) -> Result<(WebSocket<S>, AcceptedRequest), Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut buf, end) = match read_head(&mut io).await {
        Ok(v) => v,
        Err(e @ Error::BadHead(_)) => {
            refuse(&mut io, &e).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let parsed = parse_request(&buf[..end]).and_then(|(method, path, headers)| {
        server_handshake(&method, &headers, protocols)
            .map(|hs| (hs, path, headers))
            .map_err(Error::Handshake)
    });
    let (hs, path_and_query, headers) = match parsed {
        Ok(v) => v,
        Err(e) => {
            refuse(&mut io, &e).await;
            return Err(e);
        }
    };
    let mut head = String::from("HTTP/1.1 101 Switching Protocols\r\n");
    write_headers(&mut head, &hs.response_headers());
    head.push_str("\r\n");
    io.write_all(head.as_bytes())
        .await
        .map_err(|source| Error::Io {
            op: "handshake write",
            source,
        })?;
    io.flush().await.map_err(|source| Error::Io {
        op: "handshake write",
        source,
    })?;
    let leftover = buf.split_off(end).freeze();
    let ws = WebSocket::from_upgraded(io, Role::Server, config, leftover);
    Ok((
        ws,
        AcceptedRequest {
            path_and_query,
            headers,
            protocol: hs.protocol,
        },
    ))
}

/// Answers a refused request with its status and the error as text, then shuts the stream down.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, e: &Error) {
    let (status, extra, body) = match e {
        Error::Handshake(h) => (h.status(), h.response_headers(), format!("{h}\n")),
        _ => (StatusCode::BAD_REQUEST, HeaderMap::new(), format!("{e}\n")),
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    write_headers(&mut head, &extra);
    head.push_str("\r\n");
    head.push_str(&body);
    // The refusal is a courtesy to the client; the caller gets the error itself.
    let _ = io.write_all(head.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// A client's upgrade request.
#[derive(Clone, Debug, Default)]
pub struct ClientRequest {
    /// The `Host` header, e.g. `127.0.0.1:10010`.
    pub host: String,
    /// The request target, e.g. `/exec/abc?cmd=sh`.
    pub path_and_query: String,
    /// Subprotocols to offer, most preferred first.
    pub protocols: Vec<String>,
    /// More headers (e.g. `Authorization`); the handshake's own headers among them are ignored.
    pub headers: HeaderMap,
}

/// What the server answered to [`connect`].
#[derive(Clone, Debug)]
pub struct ClientResponse {
    /// The subprotocol the server chose (one of those offered), if any.
    pub protocol: Option<String>,
    /// All response headers.
    pub headers: HeaderMap,
}

/// Opens a WebSocket as a client on a connected stream: writes the upgrade request, checks the
/// `101` response (accept key, upgrade headers, chosen subprotocol), and keeps any bytes that
/// arrived after the response head for the socket.
pub async fn connect<S>(
    mut io: S,
    request: &ClientRequest,
    config: Config,
) -> Result<(WebSocket<S>, ClientResponse), Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let host: Authority = request
        .host
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("host {:?}: {e}", request.host)))?;
    let path: PathAndQuery = request
        .path_and_query
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("path {:?}: {e}", request.path_and_query)))?;
    if !path.as_str().starts_with('/') {
        return Err(Error::InvalidRequest(format!(
            "path {:?} does not start with '/'",
            request.path_and_query
        )));
    }
    for p in &request.protocols {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(Error::InvalidRequest(format!("subprotocol {p:?}")));
        }
    }
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {VERSION}\r\n"
    );
    if !request.protocols.is_empty() {
        let _ = write!(
            head,
            "Sec-WebSocket-Protocol: {}\r\n",
            request.protocols.join(", ")
        );
    }
    let mut extra = request.headers.clone();
    for own in [
        header::HOST,
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ] {
        extra.remove(own);
    }
    write_headers(&mut head, &extra);
    head.push_str("\r\n");
    let hs_write = |source| Error::Io {
        op: "handshake write",
        source,
    };
    io.write_all(head.as_bytes()).await.map_err(hs_write)?;
    io.flush().await.map_err(hs_write)?;

    let (mut buf, end) = read_head(&mut io).await?;
    let (status, headers) = parse_response(&buf[..end])?;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::BadResponse(format!("status {status}, not 101")));
    }
    if !tokens(&headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket")) {
        return Err(Error::BadResponse("no `Upgrade: websocket` header".into()));
    }
    if !tokens(&headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(Error::BadResponse(
            "`Connection` header lacks the `upgrade` token".into(),
        ));
    }
    let expected = accept_key(&key);
    let got = headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if got != Some(expected.as_str()) {
        return Err(Error::BadResponse(format!(
            "Sec-WebSocket-Accept {got:?}, expected {expected:?}"
        )));
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err(Error::BadResponse(
            "extensions in the response, none were offered".into(),
        ));
    }
    let chosen: Vec<&str> = tokens(&headers, &header::SEC_WEBSOCKET_PROTOCOL).collect();
    let protocol = match chosen[..] {
        [] => None,
        [p] if request.protocols.iter().any(|o| o == p) => Some(p.to_owned()),
        _ => {
            return Err(Error::BadResponse(format!(
                "subprotocol {chosen:?} was not offered (offered {:?})",
                request.protocols
            )));
        }
    };
    let leftover: Bytes = buf.split_off(end).freeze();
    let ws = WebSocket::from_upgraded(io, Role::Client, config, leftover);
    Ok((ws, ClientResponse { protocol, headers }))
}

fn write_headers(out: &mut String, headers: &HeaderMap) {
    for (name, value) in headers {
        // HeaderValue forbids CR and LF, so no header can end the head early.
        let value = String::from_utf8_lossy(value.as_bytes());
        let _ = write!(out, "{name}: {value}\r\n");
    }
}

/// Reads until the blank line that ends an HTTP head; returns what was read (the head may be
/// followed by more) and the head's length.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> Result<(BytesMut, usize), Error> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut searched = 0;
    loop {
        if let Some(at) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((buf, searched + at + 4));
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return Err(Error::BadHead(format!("longer than {MAX_HEAD} bytes")));
        }
        buf.reserve(1024);
        let n = io.read_buf(&mut buf).await.map_err(|source| Error::Io {
            op: "handshake read",
            source,
        })?;
        if n == 0 {
            return Err(Error::Io {
                op: "handshake read",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
}

fn header_map(raw: &[httparse::Header<'_>]) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::with_capacity(raw.len());
    for h in raw {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::BadHead(format!("header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::BadHead(format!("value of header {:?}", h.name)))?;
        map.append(name, value);
    }
    Ok(map)
}

fn parse_request(head: &[u8]) -> Result<(Method, String, HeaderMap), Error> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Error::BadHead("incomplete request".into())),
        Err(e) => return Err(Error::BadHead(format!("request: {e}"))),
    }
    if req.version != Some(1) {
        return Err(Error::BadHead("websocket needs HTTP/1.1".into()));
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Error::BadHead("request method".into()))?;
    let path = req.path.unwrap_or_default().to_owned();
    Ok((method, path, header_map(req.headers)?))
}

fn parse_response(head: &[u8]) -> Result<(StatusCode, HeaderMap), Error> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Error::BadHead("incomplete response".into())),
        Err(e) => return Err(Error::BadHead(format!("response: {e}"))),
    }
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::BadHead("response status".into()))?;
    Ok((status, header_map(resp.headers)?))
}

/// An HTTP/1.1 request head read by [`read_request`].
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request target, e.g. `/exec/abc?cmd=sh`.
    pub path_and_query: String,
    /// All headers.
    pub headers: HeaderMap,
    /// Bytes the client sent after the head (the start of a body or of an upgraded protocol).
    pub leftover: Bytes,
}

/// Reads one HTTP/1.1 request head from `io`, for servers that route before they upgrade
/// (the same limits as [`accept`]: 16 KiB, 64 headers).
pub async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Result<RequestHead, Error> {
    let (mut buf, end) = read_head(io).await?;
    let (method, path_and_query, headers) = parse_request(&buf[..end])?;
    Ok(RequestHead {
        method,
        path_and_query,
        headers,
        leftover: buf.split_off(end).freeze(),
    })
}

/// Writes an HTTP/1.1 response head with `headers`, then `body` (with its Content-Length unless
/// the status is 101) and flushes.
pub async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    write_headers(&mut head, headers);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes()).await?;
    io.write_all(body).await?;
    io.flush().await
}
