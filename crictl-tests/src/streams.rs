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

/// What a remotecommand session gave back.
#[derive(Debug, Default)]
pub struct Collected {
    /// Bytes on stdout.
    pub stdout: Vec<u8>,
    /// Bytes on stderr.
    pub stderr: Vec<u8>,
    /// What the error channel carried.
    pub status: Vec<u8>,
}

impl Collected {
    /// The exit code a v4/v5 status says (0 for Success).
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_slice(&self.status).ok()?;
        if v["status"] == "Success" {
            return Some(0);
        }
        v["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

/// Runs a remotecommand session over WebSocket (binary channels): sends a resize first when
/// given, then `stdin` and, with v5, the close signal for stdin; collects everything until the
/// server closes.
pub async fn ws_session(
    mut socket: WebSocket<TcpStream>,
    stdin: Option<&[u8]>,
    resize: Option<(u16, u16)>,
) -> Collected {
    use streaming::ws::Message;
    if let Some((w, h)) = resize {
        let mut m = vec![4u8];
        m.extend_from_slice(format!("{{\"Width\":{w},\"Height\":{h}}}").as_bytes());
        socket
            .send(Message::Binary(m.into()))
            .await
            .expect("resize");
    }
    if let Some(data) = stdin {
        let mut m = vec![0u8];
        m.extend_from_slice(data);
        socket.send(Message::Binary(m.into())).await.expect("stdin");
        socket
            .send(Message::Binary(vec![255u8, 0].into()))
            .await
            .expect("close stdin");
    }
    let mut out = Collected::default();
    while let Ok(Ok(Some(msg))) =
        tokio::time::timeout(std::time::Duration::from_secs(30), socket.recv()).await
    {
        if let Message::Binary(b) = msg
            && let Some((&ch, data)) = b.split_first()
        {
            match ch {
                1 => out.stdout.extend_from_slice(data),
                2 => out.stderr.extend_from_slice(data),
                3 => out.status.extend_from_slice(data),
                _ => {}
            }
        }
    }
    out
}

/// Runs a remotecommand session over SPDY as client-go does: opens the error stream, then the
/// others `kinds` names (`stdin`, `stdout`, `stderr`, `resize`), sends a resize and `stdin`
/// (then FIN), and collects until the error stream ends.
pub async fn spdy_session(
    session: &streaming::spdy::Session,
    kinds: &[&str],
    stdin: Option<&[u8]>,
    resize: Option<(u16, u16)>,
) -> Collected {
    use streaming::spdy::Headers;
    let open = |kind: &str| session.open(Headers::new().with("streamtype", kind));
    let mut error = open("error").await.expect("error stream");
    let mut streams = std::collections::HashMap::new();
    for k in kinds {
        streams.insert(*k, open(k).await.expect("stream"));
    }
    if let (Some((w, h)), Some(s)) = (resize, streams.get_mut("resize")) {
        s.write_all(format!("{{\"Width\":{w},\"Height\":{h}}}").as_bytes())
            .await
            .expect("resize");
    }
    if let Some(mut s) = streams.remove("stdin") {
        s.write_all(stdin.unwrap_or_default()).await.expect("stdin");
        s.shutdown().await.expect("close stdin");
        streams.insert("stdin", s);
    }
    let read_all = |s: Option<streaming::spdy::Stream>| async move {
        let mut buf = Vec::new();
        if let Some(mut s) = s {
            let _ = s.read_to_end(&mut buf).await;
        }
        buf
    };
    let (stdout, stderr) = tokio::join!(
        read_all(streams.remove("stdout")),
        read_all(streams.remove("stderr"))
    );
    let mut status = Vec::new();
    let _ = error.read_to_end(&mut status).await;
    Collected {
        stdout,
        stderr,
        status,
    }
}
