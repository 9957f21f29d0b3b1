//! Our WebSocket client against our server, over an in-memory pipe and over TCP loopback.
#![allow(clippy::unwrap_used)]

mod ws_support;

use std::time::Duration;

use berth_streaming::ws::{ClientRequest, CloseFrame, Config, Error, Message, accept, connect};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ws_support::within;

const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

type Ws<S> = berth_streaming::ws::WebSocket<S>;

async fn open<S>(client_io: S, server_io: S, config: Config) -> (Ws<S>, Ws<S>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let server_config = config.clone();
    let server = tokio::spawn(async move { accept(server_io, PROTOCOLS, server_config).await });
    let request = ClientRequest {
        host: "localhost".into(),
        path_and_query: "/exec/t".into(),
        protocols: vec!["v5.channel.k8s.io".into()],
        ..ClientRequest::default()
    };
    let (client, response) = within(connect(client_io, &request, config)).await.unwrap();
    assert_eq!(response.protocol.as_deref(), Some("v5.channel.k8s.io"));
    let (server, _) = within(server).await.unwrap().unwrap();
    (client, server)
}

async fn tcp_pair(config: Config) -> (Ws<TcpStream>, Ws<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client_io, server_io) = tokio::join!(TcpStream::connect(addr), async {
        listener.accept().await.unwrap().0
    });
    open(client_io.unwrap(), server_io, config).await
}

/// Receives the next message that is not a ping or pong.
async fn next_data<S: AsyncRead>(ws: &mut berth_streaming::ws::WsReader<S>) -> Option<Message> {
    loop {
        match within(ws.recv()).await.unwrap() {
            Some(Message::Ping(_) | Message::Pong(_)) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn duplex_roundtrip_of_every_message_kind() {
    let config = Config {
        write_fragment_size: 1000,
        ..Config::default()
    };
    let (a, b) = tokio::io::duplex(8192);
    let (client, server) = open(a, b, config).await;
    let (mut client_rx, client_tx) = client.split();
    let (mut server_rx, server_tx) = server.split();

    let big: Bytes = (0..(1 << 20) + 17).map(|i: u32| (i % 251) as u8).collect();
    let sent = vec![
        Message::Binary(Bytes::from_static(b"\x00stdin")),
        Message::Text("\u{1F980} base64 lives here".into()),
        Message::Binary(Bytes::new()),
        Message::Text(String::new()),
        Message::Binary(big.clone()),
    ];
    for m in &sent {
        // Sending waits for the socket, so the other end reads at the same time.
        let (sent, got) = tokio::join!(client_tx.send(m.clone()), next_data(&mut server_rx));
        sent.unwrap();
        assert_eq!(got.as_ref(), Some(m));
        let (sent, got) = tokio::join!(server_tx.send(m.clone()), next_data(&mut client_rx));
        sent.unwrap();
        assert_eq!(got.as_ref(), Some(m));
    }

    // A ping comes back as a pong with the same payload.
    within(client_tx.send(Message::Ping(Bytes::from_static(b"are you there"))))
        .await
        .unwrap();
    assert_eq!(
        within(server_rx.recv()).await.unwrap(),
        Some(Message::Ping(Bytes::from_static(b"are you there")))
    );
    assert_eq!(
        within(client_rx.recv()).await.unwrap(),
        Some(Message::Pong(Bytes::from_static(b"are you there")))
    );

    // Close handshake: both ends see the other's Close, then the end.
    within(client_tx.close(1000, "exit 0")).await.unwrap();
    assert_eq!(
        next_data(&mut server_rx).await,
        Some(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "exit 0".into()
        })))
    );
    assert_eq!(
        next_data(&mut client_rx).await,
        Some(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: String::new()
        })))
    );
    assert_eq!(within(server_rx.recv()).await.unwrap(), None);
    assert_eq!(within(client_rx.recv()).await.unwrap(), None);
    assert!(matches!(
        within(server_tx.send(Message::Text("late".into()))).await,
        Err(Error::Closed)
    ));
}

/// Deterministic message sizes: mostly small and medium, now and then large.
fn sizes(seed: u64, total: usize) -> Vec<usize> {
    let mut x = seed;
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = match x % 16 {
            0 => 3 << 20,
            1..=4 => (x >> 8) as usize % (256 << 10),
            _ => (x >> 8) as usize % 4096,
        }
        .min(left);
        out.push(n);
        left -= n;
    }
    out
}

fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
        .collect()
}

const TOTAL: usize = 20 << 20;

/// Sends `TOTAL` bytes as messages of varied sizes.
async fn send_all(tx: berth_streaming::ws::WsWriter, seed: u8) {
    let mut offset = 0;
    for n in sizes(u64::from(seed) + 1, TOTAL) {
        tx.send(Message::Binary(pattern(seed, offset, n).into()))
            .await
            .unwrap();
        offset += n;
    }
}

/// Receives `TOTAL` bytes and checks every one.
async fn receive_all<S: AsyncRead>(rx: &mut berth_streaming::ws::WsReader<S>, seed: u8) -> usize {
    let mut offset = 0;
    let mut pongs = 0;
    while offset < TOTAL {
        match rx.recv().await.unwrap() {
            Some(Message::Binary(b)) => {
                assert!(
                    b[..] == pattern(seed, offset, b.len())[..],
                    "data differs in the message at {offset}"
                );
                offset += b.len();
            }
            Some(Message::Pong(_)) => pongs += 1,
            Some(Message::Ping(_)) => {}
            other => panic!("unexpected {other:?} at {offset}"),
        }
    }
    pongs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_20_mb_each_way_at_once_with_pings() {
    let config = Config {
        ping_interval: Some(Duration::from_millis(2)),
        idle_timeout: Some(Duration::from_secs(30)),
        ..Config::default()
    };
    let (client, server) = tcp_pair(config).await;
    let (mut client_rx, client_tx) = client.split();
    let (mut server_rx, server_tx) = server.split();

    let client_send = tokio::spawn(send_all(client_tx.clone(), 1));
    let server_send = tokio::spawn(send_all(server_tx.clone(), 2));
    let server_recv = tokio::spawn(async move {
        let pongs = receive_all(&mut server_rx, 1).await;
        (server_rx, pongs)
    });
    let client_pongs =
        tokio::time::timeout(Duration::from_secs(120), receive_all(&mut client_rx, 2))
            .await
            .expect("client received everything");
    let (mut server_rx, server_pongs) = tokio::time::timeout(Duration::from_secs(120), server_recv)
        .await
        .expect("server received everything")
        .unwrap();
    client_send.await.unwrap();
    server_send.await.unwrap();
    // Pings flowed (and were answered) while both directions were busy.
    assert!(
        client_pongs + server_pongs > 0,
        "no pong seen in either direction"
    );

    within(server_tx.close(1000, "")).await.unwrap();
    assert!(matches!(
        next_data(&mut client_rx).await,
        Some(Message::Close(Some(CloseFrame { code: 1000, .. })))
    ));
    assert!(matches!(
        next_data(&mut server_rx).await,
        Some(Message::Close(Some(CloseFrame { code: 1000, .. })))
    ));
    assert_eq!(within(client_rx.recv()).await.unwrap(), None);
    assert_eq!(within(server_rx.recv()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peer_vanishing_mid_message_fails_both_directions() {
    let config = Config {
        max_message_size: 32 << 20,
        ..Config::default()
    };
    // The peer is a raw socket, so the test sees the message start on the wire. A sleep cannot
    // tell that the server is mid-message: under load the send may not have been issued yet when
    // the peer goes, and a send issued after the connection failed rightly fails with `Closed`.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (peer, server_io) = tokio::join!(TcpStream::connect(addr), async {
        listener.accept().await.unwrap().0
    });
    let mut peer = peer.unwrap();
    let server = tokio::spawn(async move { accept(server_io, PROTOCOLS, config).await });
    within(peer.write_all(
        b"GET /exec/t HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n",
    ))
    .await
    .unwrap();
    let (server, _) = within(server).await.unwrap().unwrap();
    // Byte by byte, so nothing past the response head is read.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within(peer.read_u8()).await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{head:?}");

    let (mut server_rx, server_tx) = server.split();
    let message = Message::Binary(vec![7u8; TOTAL].into());
    let sending = tokio::spawn(async move { server_tx.send(message).await });
    let receiving = tokio::spawn(async move { server_rx.recv().await });
    // The first frame's first bytes: a binary message in fragments is on its way.
    let mut first = [0u8; 2];
    within(peer.read_exact(&mut first)).await.unwrap();
    assert_eq!(first[0], 0x02, "binary frame without FIN: {first:?}");
    // The peer reads no more, so the server is stuck mid-message when the peer goes.
    assert!(!sending.is_finished(), "20 MB cannot fit in socket buffers");
    drop(peer);
    let sent = within(sending).await.unwrap();
    assert!(matches!(sent, Err(Error::Io { .. })), "{sent:?}");
    let got = within(receiving).await.unwrap();
    assert!(
        matches!(got, Err(Error::AbnormalClosure | Error::Io { .. })),
        "{got:?}"
    );
}

#[tokio::test]
async fn tcp_client_vanishing_between_messages_ends_server_recv() {
    let (client, server) = tcp_pair(Config::default()).await;
    let (mut server_rx, server_tx) = server.split();
    within(client.send(Message::Text("only one".into())))
        .await
        .unwrap();
    assert_eq!(
        within(server_rx.recv()).await.unwrap(),
        Some(Message::Text("only one".into()))
    );
    // What kubectl does when done: close the TCP connection without a Close frame.
    drop(client);
    assert!(matches!(
        within(server_rx.recv()).await,
        Err(Error::AbnormalClosure)
    ));
    assert_eq!(within(server_rx.recv()).await.unwrap(), None);
    assert!(
        within(server_tx.send(Message::Text("x".into())))
            .await
            .is_err()
    );
}
