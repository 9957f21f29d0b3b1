//! Clients of berthd's streaming server for tests: connections made from inside the daemon's
//! stand-in host namespace (the server listens on its loopback).

use std::net::SocketAddr;

use streaming::ws::{self, ClientRequest, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::daemon::Daemon;

/// The address and path of a streaming URL (`http://127.0.0.1:1234/exec/token`).
pub fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (addr, path) = rest.split_once('/').expect("a path");
    (addr.parse().expect("host:port"), format!("/{path}"))
}

/// A TCP connection to `addr` made inside the daemon's network namespace.
pub fn connect(d: &Daemon, addr: SocketAddr) -> TcpStream {
    let std = d
        .netns()
        .run(|| std::net::TcpStream::connect(addr))
        .expect("connect to the streaming server");
    std.set_nonblocking(true).expect("nonblocking");
    TcpStream::from_std(std).expect("tokio stream")
}

/// Opens `url` (plus `query`) as a WebSocket offering `protocols`; returns the socket and the
/// protocol the server chose.
pub async fn open_ws(
    d: &Daemon,
    url: &str,
    query: &str,
    protocols: &[&str],
) -> Result<(WebSocket<TcpStream>, Option<String>), ws::Error> {
    let (addr, path) = split_url(url);
    let io = connect(d, addr);
    let req = ClientRequest {
        host: addr.to_string(),
        path_and_query: format!("{path}{query}"),
        protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
        ..ClientRequest::default()
    };
    let (socket, resp) = ws::connect(io, &req, ws::Config::default()).await?;
    Ok((socket, resp.protocol))
}

/// A plain HTTP request to `url` with `upgrade` as its Upgrade header; returns the status line
/// and everything after it.
pub async fn plain_request(d: &Daemon, url: &str, upgrade: &str) -> String {
    let (addr, path) = split_url(url);
    let mut io = connect(d, addr);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await.expect("write request");
    let mut out = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `url` with an HTTP `Upgrade: SPDY/3.1`, offering `protocols` in
/// `X-Stream-Protocol-Version` headers as client-go does; returns the session and the protocol
/// the server chose, or the refusal's status line and body.
pub async fn open_spdy(
    d: &Daemon,
    url: &str,
    protocols: &[&str],
) -> Result<(streaming::spdy::Session, Option<String>), String> {
    let (addr, path) = split_url(url);
    let mut io = connect(d, addr);
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = io.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        let _ = io.read_to_end(&mut buf).await;
        return Err(String::from_utf8_lossy(&buf).into_owned());
    }
    let protocol = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-stream-protocol-version")
            .then(|| v.trim().to_owned())
    });
    let rest = bytes::Bytes::copy_from_slice(&buf[end..]);
    let io = streaming::Prefixed::new(rest, io);
    Ok((
        streaming::spdy::Session::client(io, streaming::spdy::Config::default()),
        protocol,
    ))
}
