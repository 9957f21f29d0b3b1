//! The WebSocket opening handshake: server validation and subprotocol choice, the raw-stream
//! server, the client, and bytes that follow the heads.
#![allow(clippy::unwrap_used)]

mod ws_support;

use base64::Engine as _;
use berth_streaming::ws::{
    ClientRequest, Config, Error, HandshakeError, Message, accept, accept_key, connect,
    server_handshake,
};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use ws_support::*;

const K8S: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
    "portforward.k8s.io",
];

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn good(extra: &[(&str, &str)]) -> HeaderMap {
    let mut h = headers(&[
        ("Host", "server.example.com"),
        ("Upgrade", "WebSocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]);
    for (k, v) in extra {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn without(mut h: HeaderMap, name: &str) -> HeaderMap {
    h.remove(name);
    h
}

fn with(mut h: HeaderMap, name: &'static str, value: &str) -> HeaderMap {
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h
}

#[test]
fn rfc_accept_key() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(
        accept_key(" dGhlIHNhbXBsZSBub25jZQ== "),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn server_handshake_gives_the_101_headers() {
    let hs = server_handshake(&Method::GET, &good(&[]), K8S).unwrap();
    assert_eq!(hs.protocol(), None, "none offered, none chosen");
    let h = hs.response_headers();
    assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["connection"], "Upgrade");
    assert!(!h.contains_key("sec-websocket-protocol"));
}

#[test]
fn subprotocol_is_the_servers_first_choice_among_those_offered() {
    let offered = good(&[
        (
            "Sec-WebSocket-Protocol",
            "base64.channel.k8s.io, v4.channel.k8s.io",
        ),
        ("Sec-WebSocket-Protocol", "channel.k8s.io"),
    ]);
    let hs = server_handshake(&Method::GET, &offered, K8S).unwrap();
    assert_eq!(hs.protocol(), Some("v4.channel.k8s.io"));
    assert_eq!(
        hs.response_headers()["sec-websocket-protocol"],
        "v4.channel.k8s.io"
    );

    let spaced = good(&[(
        "Sec-WebSocket-Protocol",
        " x ,v5.channel.k8s.io , v4.channel.k8s.io",
    )]);
    let hs = server_handshake(&Method::GET, &spaced, K8S).unwrap();
    assert_eq!(hs.protocol(), Some("v5.channel.k8s.io"));

    // The server's order wins over the client's.
    let hs = server_handshake(
        &Method::GET,
        &good(&[(
            "Sec-WebSocket-Protocol",
            "channel.k8s.io, v5.channel.k8s.io",
        )]),
        K8S,
    )
    .unwrap();
    assert_eq!(hs.protocol(), Some("v5.channel.k8s.io"));

    // kubectl's bearer-token pseudo-protocol is ignored.
    let hs = server_handshake(
        &Method::GET,
        &good(&[(
            "Sec-WebSocket-Protocol",
            "base64url.bearer.authorization.k8s.io.dG9rZW4, portforward.k8s.io",
        )]),
        K8S,
    )
    .unwrap();
    assert_eq!(hs.protocol(), Some("portforward.k8s.io"));

    let err = server_handshake(
        &Method::GET,
        &good(&[("Sec-WebSocket-Protocol", "mqtt, wamp")]),
        K8S,
    )
    .unwrap_err();
    assert!(
        matches!(&err, HandshakeError::NoCommonProtocol { offered, .. } if offered == &["mqtt", "wamp"]),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn server_handshake_errors() {
    let hs = |m: Method, h: HeaderMap| server_handshake(&m, &h, K8S).unwrap_err();
    assert_eq!(
        hs(Method::POST, good(&[])),
        HandshakeError::Method("POST".into())
    );
    assert_eq!(
        hs(Method::GET, without(good(&[]), "upgrade")),
        HandshakeError::NoUpgrade
    );
    assert_eq!(
        hs(Method::GET, with(good(&[]), "upgrade", "h2c")),
        HandshakeError::NoUpgrade
    );
    assert_eq!(
        hs(Method::GET, with(good(&[]), "connection", "keep-alive")),
        HandshakeError::NoConnectionUpgrade
    );
    assert_eq!(
        hs(Method::GET, with(good(&[]), "connection", "upgraded")),
        HandshakeError::NoConnectionUpgrade
    );
    let v8 = hs(Method::GET, with(good(&[]), "sec-websocket-version", "8"));
    assert_eq!(v8, HandshakeError::Version(Some("8".into())));
    assert_eq!(v8.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(v8.response_headers()["sec-websocket-version"], "13");
    assert_eq!(
        hs(Method::GET, without(good(&[]), "sec-websocket-version")),
        HandshakeError::Version(None)
    );
    for key in ["", "AAAA", "not base64!", "AAAAAAAAAAAAAAAAAAAAAAAAAA=="] {
        assert_eq!(
            hs(Method::GET, with(good(&[]), "sec-websocket-key", key)),
            HandshakeError::Key,
            "{key:?}"
        );
    }
    assert_eq!(
        hs(Method::GET, without(good(&[]), "sec-websocket-key")),
        HandshakeError::Key
    );
    assert_eq!(
        hs(
            Method::GET,
            good(&[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
        ),
        HandshakeError::Key,
        "two keys"
    );
    assert_eq!(HandshakeError::Key.status(), StatusCode::BAD_REQUEST);
    assert!(HandshakeError::Key.response_headers().is_empty());
}

/// Reads an HTTP head off `raw`, returning it and what came after it in the same reads.
async fn read_head(raw: &mut DuplexStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(at + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let mut chunk = [0u8; 1024];
        let n = within(raw.read(&mut chunk)).await.unwrap();
        assert!(
            n > 0,
            "EOF inside a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn raw_accept_keeps_pipelined_frames() {
    let (server_io, mut raw) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { accept(server_io, K8S, Config::default()).await });
    let mut req = b"GET /exec/abc?command=sh&stdin=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
        .to_vec();
    // A client that does not wait for the 101: its first frame comes in the same write.
    req.extend_from_slice(&masked(true, OP_BINARY, &[0, b'h', b'i']));
    raw.write_all(&req).await.unwrap();

    let (mut ws, request) = within(server).await.unwrap().unwrap();
    assert_eq!(request.path_and_query, "/exec/abc?command=sh&stdin=1");
    assert_eq!(request.protocol.as_deref(), Some("v4.channel.k8s.io"));
    assert_eq!(request.headers["host"], "x");
    let (head, rest) = read_head(&mut raw).await;
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(
        lower.contains("sec-websocket-protocol: v4.channel.k8s.io"),
        "{head}"
    );
    assert!(rest.is_empty());
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Binary(Bytes::from_static(&[0, b'h', b'i'])))
    );
}

#[tokio::test]
async fn raw_accept_answers_426_to_a_wrong_version() {
    let (server_io, mut raw) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { accept(server_io, K8S, Config::default()).await });
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, mut body) = read_head(&mut raw).await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
    within(raw.read_to_end(&mut body)).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("Sec-WebSocket-Version 8 "), "{body}");
    assert!(matches!(
        within(server).await.unwrap(),
        Err(Error::Handshake(HandshakeError::Version(_)))
    ));
}

#[tokio::test]
async fn raw_accept_answers_400_to_garbage_and_huge_heads() {
    for junk in [
        b"HELLO THERE\r\n\r\n".to_vec(),
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n".to_vec(),
        [b"GET / HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; 20 << 10]].concat(),
    ] {
        let (server_io, mut raw) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { accept(server_io, K8S, Config::default()).await });
        let _ = raw.write_all(&junk).await;
        let (head, _) = read_head(&mut raw).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        assert!(matches!(
            within(server).await.unwrap(),
            Err(Error::BadHead(_))
        ));
    }
}

#[tokio::test]
async fn client_and_server_agree() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { accept(server_io, K8S, Config::default()).await });
    let request = ClientRequest {
        host: "127.0.0.1:10010".into(),
        path_and_query: "/attach/xyz?stdout=1".into(),
        protocols: vec!["v5.channel.k8s.io".into(), "v4.channel.k8s.io".into()],
        headers: headers(&[
            ("Authorization", "Bearer t"),
            ("Sec-WebSocket-Key", "ignored"),
        ]),
    };
    let (client, response) = within(connect(client_io, &request, Config::default()))
        .await
        .unwrap();
    let (mut server, accepted) = within(server).await.unwrap().unwrap();
    assert_eq!(response.protocol.as_deref(), Some("v5.channel.k8s.io"));
    assert_eq!(accepted.protocol.as_deref(), Some("v5.channel.k8s.io"));
    assert_eq!(accepted.path_and_query, "/attach/xyz?stdout=1");
    assert_eq!(accepted.headers["authorization"], "Bearer t");
    assert_eq!(accepted.headers["host"], "127.0.0.1:10010");
    assert_eq!(
        accepted.headers.get_all("sec-websocket-key").iter().count(),
        1
    );

    client
        .send(Message::Binary(Bytes::from_static(b"\x00ping")))
        .await
        .unwrap();
    assert_eq!(
        within(server.recv()).await.unwrap(),
        Some(Message::Binary(Bytes::from_static(b"\x00ping")))
    );
}

#[tokio::test]
async fn client_refuses_a_refusal() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { accept(server_io, K8S, Config::default()).await });
    let request = ClientRequest {
        host: "h".into(),
        path_and_query: "/".into(),
        protocols: vec!["mqtt".into()],
        ..ClientRequest::default()
    };
    let got = within(connect(client_io, &request, Config::default())).await;
    assert!(
        matches!(&got, Err(Error::BadResponse(m)) if m.contains("400")),
        "{:?}",
        got.err()
    );
    assert!(matches!(
        within(server).await.unwrap(),
        Err(Error::Handshake(HandshakeError::NoCommonProtocol { .. }))
    ));
}

/// A hand-written server: answers the client's request with `respond(accept)` in one write.
async fn fake_server(
    protocols: Vec<String>,
    respond: impl FnOnce(String) -> Vec<u8> + Send + 'static,
) -> Result<(berth_streaming::ws::WebSocket<DuplexStream>, Option<String>), Error> {
    let (client_io, mut raw) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let (head, _) = read_head(&mut raw).await;
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key")
            .to_owned();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&key)
                .unwrap()
                .len(),
            16
        );
        raw.write_all(&respond(accept_key(&key))).await.unwrap();
        // Keep the pipe open until the client is done.
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink).await;
    });
    let request = ClientRequest {
        host: "h".into(),
        path_and_query: "/".into(),
        protocols,
        ..ClientRequest::default()
    };
    within(connect(client_io, &request, Config::default()))
        .await
        .map(|(ws, r)| (ws, r.protocol))
}

fn response(accept: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn client_keeps_bytes_after_the_response_head() {
    let (mut ws, protocol) = fake_server(vec!["channel.k8s.io".into()], |accept| {
        let mut r = response(&accept, "Sec-WebSocket-Protocol: channel.k8s.io\r\n");
        r.extend_from_slice(&unmasked(true, OP_BINARY, b"\x01early"));
        r.extend_from_slice(&unmasked(true, OP_TEXT, b"second"));
        r
    })
    .await
    .unwrap();
    assert_eq!(protocol.as_deref(), Some("channel.k8s.io"));
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Binary(Bytes::from_static(b"\x01early")))
    );
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Text("second".into()))
    );
}

#[tokio::test]
async fn client_checks_the_response() {
    let bad_accept = fake_server(vec![], |_| response("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "")).await;
    assert!(matches!(bad_accept, Err(Error::BadResponse(m)) if m.contains("Accept")));

    let forbidden = fake_server(vec![], |_| {
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec()
    })
    .await;
    assert!(matches!(forbidden, Err(Error::BadResponse(m)) if m.contains("403")));

    let unoffered = fake_server(vec!["v4.channel.k8s.io".into()], |accept| {
        response(&accept, "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n")
    })
    .await;
    assert!(matches!(unoffered, Err(Error::BadResponse(m)) if m.contains("not offered")));

    let no_upgrade = fake_server(vec![], |accept| {
        format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
            .into_bytes()
    })
    .await;
    assert!(matches!(no_upgrade, Err(Error::BadResponse(m)) if m.contains("Upgrade")));

    let extensions = fake_server(vec![], |accept| {
        response(&accept, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    })
    .await;
    assert!(matches!(extensions, Err(Error::BadResponse(m)) if m.contains("extensions")));

    // A server that picks nothing leaves the choice empty (client-go then falls back to v1).
    let (_, none) = fake_server(vec!["v4.channel.k8s.io".into()], |accept| {
        response(&accept, "")
    })
    .await
    .unwrap();
    assert_eq!(none, None);
}

#[tokio::test]
async fn client_refuses_requests_it_cannot_write() {
    for (host, path, protocol) in [
        ("h", "no-slash", "p"),
        ("bad host", "/", "p"),
        ("h", "/a b", "p"),
        ("h", "/", "two words"),
        ("h", "/", "a,b"),
    ] {
        let (io, _peer) = tokio::io::duplex(1024);
        let request = ClientRequest {
            host: host.into(),
            path_and_query: path.into(),
            protocols: vec![protocol.into()],
            ..ClientRequest::default()
        };
        let got = connect(io, &request, Config::default()).await;
        assert!(
            matches!(got, Err(Error::InvalidRequest(_))),
            "{host:?} {path:?} {protocol:?}"
        );
    }
}
