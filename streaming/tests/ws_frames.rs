//! WebSocket framing against a raw peer: RFC 6455 vectors, fragmentation, control frames,
//! the close handshake, limits and protocol violations.
#![allow(clippy::unwrap_used)]

mod ws_support;

use std::time::Duration;

use berth_streaming::ws::{CloseFrame, Config, Error, Message, Role};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ws_support::*;

fn text(s: &str) -> Message {
    Message::Text(s.to_owned())
}

fn binary(b: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(b))
}

async fn expect_violation(
    ws: &mut berth_streaming::ws::WebSocket<tokio::io::DuplexStream>,
    code: u16,
) {
    match within(ws.recv()).await {
        Err(Error::Protocol { code: got, .. }) if got == code => {}
        other => panic!("expected a protocol violation {code}, got {other:?}"),
    }
    assert!(within(ws.recv()).await.unwrap().is_none(), "ends after it");
}

/// The socket answers a violation with a Close of that code, then ends the stream.
async fn expect_close_then_eof(raw: &mut tokio::io::DuplexStream, code: u16, masked: bool) {
    let f = read_frame(raw).await.expect("a close frame");
    assert_eq!(f.opcode, OP_CLOSE);
    assert_eq!(f.masked, masked);
    assert_eq!(f.close_code(), Some(code));
    expect_eof(raw).await;
}

#[tokio::test]
async fn rfc_masked_hello_reaches_server() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    raw.write_all(&[
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ])
    .await
    .unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(text("Hello")));
}

#[tokio::test]
async fn rfc_unmasked_hello_from_server_on_the_wire() {
    let (ws, mut raw) = pair(Role::Server, Config::default());
    within(ws.send(text("Hello"))).await.unwrap();
    let mut got = [0u8; 7];
    raw.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
}

#[tokio::test]
async fn rfc_unmasked_hello_reaches_client_and_client_masks() {
    let (mut ws, mut raw) = pair(Role::Client, Config::default());
    raw.write_all(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f])
        .await
        .unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(text("Hello")));

    within(ws.send(text("Hello"))).await.unwrap();
    let mut head = [0u8; 2];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head, [0x81, 0x85], "masked, 5 bytes");
    let mut rest = [0u8; 9];
    raw.read_exact(&mut rest).await.unwrap();
    let (key, body) = rest.split_at(4);
    let plain: Vec<u8> = body
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect();
    assert_eq!(plain, b"Hello");
}

#[tokio::test]
async fn rfc_fragmented_hello_reassembled() {
    let (mut ws, mut raw) = pair(Role::Client, Config::default());
    raw.write_all(&[0x01, 0x03, 0x48, 0x65, 0x6c])
        .await
        .unwrap();
    raw.write_all(&[0x80, 0x02, 0x6c, 0x6f]).await.unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(text("Hello")));
}

#[tokio::test]
async fn rfc_ping_answered_with_masked_pong() {
    let (mut ws, mut raw) = pair(Role::Client, Config::default());
    raw.write_all(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f])
        .await
        .unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Ping(Bytes::from_static(b"Hello")))
    );
    let pong = read_frame(&mut raw).await.unwrap();
    assert_eq!(
        pong,
        RawFrame {
            fin: true,
            opcode: OP_PONG,
            masked: true,
            payload: b"Hello".to_vec()
        }
    );
}

#[tokio::test]
async fn rfc_length_encodings_256_and_64k() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    let small: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
    let big: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();

    within(ws.send(binary(&small))).await.unwrap();
    let mut head = [0u8; 4];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head, [0x82, 0x7E, 0x01, 0x00]);
    let mut body = vec![0u8; 256];
    raw.read_exact(&mut body).await.unwrap();
    assert_eq!(body, small);

    within(ws.send(binary(&big))).await.unwrap();
    let mut head = [0u8; 10];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head, [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
    let mut body = vec![0u8; 65536];
    raw.read_exact(&mut body).await.unwrap();
    assert_eq!(body, big);

    // And the other way, masked.
    raw.write_all(&masked(true, OP_BINARY, &small))
        .await
        .unwrap();
    raw.write_all(&masked(true, OP_BINARY, &big)).await.unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(binary(&small)));
    assert_eq!(within(ws.recv()).await.unwrap(), Some(binary(&big)));
}

#[tokio::test]
async fn fragments_with_interleaved_control_frames() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    for f in [
        masked(false, OP_BINARY, b"ab"),
        masked(true, OP_PING, b"p"),
        masked(false, OP_CONT, b""),
        masked(false, OP_CONT, b"cd"),
        masked(true, OP_PONG, b"q"),
        masked(true, OP_CONT, b"ef"),
    ] {
        raw.write_all(&f).await.unwrap();
    }
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Ping(Bytes::from_static(b"p")))
    );
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Pong(Bytes::from_static(b"q")))
    );
    assert_eq!(within(ws.recv()).await.unwrap(), Some(binary(b"abcdef")));
    let pong = read_frame(&mut raw).await.unwrap();
    assert_eq!(
        (pong.opcode, pong.masked, &pong.payload[..]),
        (OP_PONG, false, &b"p"[..])
    );
}

#[tokio::test]
async fn utf8_split_across_fragments_is_fine() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    let e = "é".as_bytes();
    raw.write_all(&masked(false, OP_TEXT, &e[..1]))
        .await
        .unwrap();
    raw.write_all(&masked(true, OP_CONT, &e[1..]))
        .await
        .unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(text("é")));
}

#[tokio::test]
async fn outgoing_messages_are_fragmented() {
    let config = Config {
        write_fragment_size: 4,
        ..Config::default()
    };
    let (ws, mut raw) = pair(Role::Server, config);
    within(ws.send(binary(b"0123456789"))).await.unwrap();
    let mut frames = Vec::new();
    for _ in 0..3 {
        let f = read_frame(&mut raw).await.unwrap();
        frames.push((f.fin, f.opcode, f.payload));
    }
    assert_eq!(
        frames,
        [
            (false, OP_BINARY, b"0123".to_vec()),
            (false, OP_CONT, b"4567".to_vec()),
            (true, OP_CONT, b"89".to_vec()),
        ]
    );
    // Empty messages are one empty frame.
    within(ws.send(text(""))).await.unwrap();
    let f = read_frame(&mut raw).await.unwrap();
    assert_eq!((f.fin, f.opcode, f.payload.len()), (true, OP_TEXT, 0));
}

#[tokio::test]
async fn close_started_by_peer_is_answered_then_ends() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    raw.write_all(&masked(true, OP_CLOSE, &close_body(1000, "bye")))
        .await
        .unwrap();
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "bye".into()
        })))
    );
    let reply = read_frame(&mut raw).await.unwrap();
    assert_eq!(reply.close_code(), Some(1000));
    assert!(!reply.masked);
    expect_eof(&mut raw).await;
    assert_eq!(within(ws.recv()).await.unwrap(), None);
    assert!(matches!(
        within(ws.send(text("late"))).await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn empty_close_is_answered_with_empty_close() {
    let (mut ws, mut raw) = pair(Role::Client, Config::default());
    raw.write_all(&unmasked(true, OP_CLOSE, b"")).await.unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(Message::Close(None)));
    let reply = read_frame(&mut raw).await.unwrap();
    assert_eq!(
        (reply.opcode, reply.masked, reply.payload.len()),
        (OP_CLOSE, true, 0)
    );
    expect_eof(&mut raw).await;
}

#[tokio::test]
async fn close_started_by_us_waits_for_the_peer() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    within(ws.close(1000, "done")).await.unwrap();
    let f = read_frame(&mut raw).await.unwrap();
    assert_eq!(f.close_code(), Some(1000));
    assert_eq!(&f.payload[2..], b"done");
    expect_eof(&mut raw).await;
    assert!(matches!(
        within(ws.send(text("late"))).await,
        Err(Error::Closed)
    ));
    // Data the peer sent before its Close still arrives, then the Close.
    raw.write_all(&masked(true, OP_TEXT, b"last words"))
        .await
        .unwrap();
    raw.write_all(&masked(true, OP_CLOSE, &close_body(1000, "")))
        .await
        .unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(text("last words")));
    assert_eq!(
        within(ws.recv()).await.unwrap(),
        Some(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: String::new()
        })))
    );
    assert_eq!(within(ws.recv()).await.unwrap(), None);
}

#[tokio::test]
async fn hostile_length_is_refused_without_allocating() {
    let config = Config {
        max_message_size: 1024,
        ..Config::default()
    };
    let (mut ws, mut raw) = pair(Role::Server, config);
    let mut f = vec![0x82, 0xFF];
    f.extend_from_slice(&(1u64 << 40).to_be_bytes());
    f.extend_from_slice(&RFC_MASK);
    raw.write_all(&f).await.unwrap();
    expect_violation(&mut ws, 1009).await;
    expect_close_then_eof(&mut raw, 1009, false).await;
}

#[tokio::test]
async fn oversized_message_in_fragments_is_refused() {
    let config = Config {
        max_message_size: 1024,
        ..Config::default()
    };
    let (mut ws, mut raw) = pair(Role::Server, config);
    raw.write_all(&masked(false, OP_BINARY, &[1; 600]))
        .await
        .unwrap();
    raw.write_all(&masked(true, OP_CONT, &[2; 600]))
        .await
        .unwrap();
    expect_violation(&mut ws, 1009).await;
    expect_close_then_eof(&mut raw, 1009, false).await;
}

#[tokio::test]
async fn message_at_the_limit_passes() {
    let config = Config {
        max_message_size: 1024,
        ..Config::default()
    };
    let (mut ws, mut raw) = pair(Role::Server, config);
    raw.write_all(&masked(false, OP_BINARY, &[1; 1000]))
        .await
        .unwrap();
    raw.write_all(&masked(true, OP_CONT, &[1; 24]))
        .await
        .unwrap();
    assert_eq!(within(ws.recv()).await.unwrap(), Some(binary(&[1; 1024])));
}

#[tokio::test]
async fn length_with_high_bit_is_a_protocol_error() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    let mut f = vec![0x82, 0xFF];
    f.extend_from_slice(&u64::MAX.to_be_bytes());
    f.extend_from_slice(&RFC_MASK);
    raw.write_all(&f).await.unwrap();
    expect_violation(&mut ws, 1002).await;
    expect_close_then_eof(&mut raw, 1002, false).await;
}

#[tokio::test]
async fn unmasked_client_frame_is_refused() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    raw.write_all(&unmasked(true, OP_TEXT, b"Hello"))
        .await
        .unwrap();
    expect_violation(&mut ws, 1002).await;
    expect_close_then_eof(&mut raw, 1002, false).await;
}

#[tokio::test]
async fn masked_server_frame_is_refused() {
    let (mut ws, mut raw) = pair(Role::Client, Config::default());
    raw.write_all(&masked(true, OP_TEXT, b"Hello"))
        .await
        .unwrap();
    expect_violation(&mut ws, 1002).await;
    expect_close_then_eof(&mut raw, 1002, true).await;
}

#[tokio::test]
async fn invalid_utf8_text_is_refused() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    raw.write_all(&masked(true, OP_TEXT, &[b'o', 0xff, 0xfe]))
        .await
        .unwrap();
    expect_violation(&mut ws, 1007).await;
    expect_close_then_eof(&mut raw, 1007, false).await;
}

#[tokio::test]
async fn invalid_utf8_close_reason_is_refused() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    raw.write_all(&masked(true, OP_CLOSE, &[0x03, 0xE8, 0xC3]))
        .await
        .unwrap();
    expect_violation(&mut ws, 1007).await;
    expect_close_then_eof(&mut raw, 1007, false).await;
}

#[tokio::test]
async fn frame_sequence_violations() {
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("continuation first", vec![masked(true, OP_CONT, b"x")]),
        (
            "text inside a fragmented message",
            vec![masked(false, OP_TEXT, b"a"), masked(true, OP_TEXT, b"b")],
        ),
        ("fragmented ping", vec![masked(false, OP_PING, b"x")]),
        ("ping of 126 bytes", vec![masked(true, OP_PING, &[0; 126])]),
        ("reserved bit", {
            let mut f = masked(true, OP_TEXT, b"x");
            f[0] |= 0x40;
            vec![f]
        }),
        ("reserved opcode", vec![masked(true, 0x3, b"x")]),
        (
            "close code 1005 on the wire",
            vec![masked(true, OP_CLOSE, &close_body(1005, ""))],
        ),
        ("one-byte close", vec![masked(true, OP_CLOSE, &[3])]),
    ];
    for (what, frames) in cases {
        let (mut ws, mut raw) = pair(Role::Server, Config::default());
        for f in frames {
            raw.write_all(&f).await.unwrap();
        }
        match within(ws.recv()).await {
            Err(Error::Protocol { code: 1002, .. }) => {}
            other => panic!("{what}: expected 1002, got {other:?}"),
        }
        expect_close_then_eof(&mut raw, 1002, false).await;
    }
}

#[tokio::test]
async fn peer_dropping_mid_message_ends_recv_and_send() {
    let (mut ws, mut raw) = pair(Role::Server, Config::default());
    let f = masked(true, OP_BINARY, &[9; 100]);
    raw.write_all(&f[..30]).await.unwrap();
    drop(raw);
    assert!(matches!(
        within(ws.recv()).await,
        Err(Error::AbnormalClosure)
    ));
    assert_eq!(within(ws.recv()).await.unwrap(), None);
    assert!(within(ws.send(binary(b"x"))).await.is_err());
}

#[tokio::test]
async fn pending_recv_ends_when_peer_vanishes() {
    let (ws, raw) = pair(Role::Client, Config::default());
    let (mut reader, writer) = ws.split();
    let pending = tokio::spawn(async move { reader.recv().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(raw);
    let got = within(pending).await.unwrap();
    assert!(matches!(got, Err(Error::AbnormalClosure)), "{got:?}");
    assert!(within(writer.send(binary(b"x"))).await.is_err());
}

#[tokio::test]
async fn send_fails_when_peer_vanishes_mid_send() {
    // A small pipe, so the message cannot be written before the peer goes.
    let (ours, mut raw) = tokio::io::duplex(4096);
    let ws = berth_streaming::ws::WebSocket::from_upgraded(
        ours,
        Role::Server,
        Config::default(),
        Bytes::new(),
    );
    let (_reader, writer) = ws.split();
    let sending = tokio::spawn(async move { writer.send(binary(&vec![5u8; 1 << 20])).await });
    let mut some = [0u8; 1000];
    raw.read_exact(&mut some).await.unwrap();
    drop(raw);
    let got = within(sending).await.unwrap();
    assert!(matches!(got, Err(Error::Io { .. })), "{got:?}");
}

#[tokio::test]
async fn idle_timeout_fails_recv() {
    let config = Config {
        idle_timeout: Some(Duration::from_millis(100)),
        ..Config::default()
    };
    let (mut ws, mut raw) = pair(Role::Server, config);
    // Traffic keeps it alive.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        raw.write_all(&masked(true, OP_PONG, b"")).await.unwrap();
        assert!(matches!(
            within(ws.recv()).await,
            Ok(Some(Message::Pong(_)))
        ));
    }
    let started = std::time::Instant::now();
    assert!(matches!(
        within(ws.recv()).await,
        Err(Error::IdleTimeout(_))
    ));
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(within(ws.recv()).await.unwrap(), None);
}

#[tokio::test]
async fn pings_are_sent_on_the_interval() {
    let config = Config {
        ping_interval: Some(Duration::from_millis(30)),
        ..Config::default()
    };
    let (_ws, mut raw) = pair(Role::Server, config);
    for _ in 0..3 {
        let f = read_frame(&mut raw).await.unwrap();
        assert_eq!((f.opcode, f.masked), (OP_PING, false));
    }
}

#[tokio::test]
async fn pings_answered_after_writer_is_dropped() {
    let (ws, mut raw) = pair(Role::Server, Config::default());
    let (mut reader, writer) = ws.split();
    drop(writer);
    raw.write_all(&masked(true, OP_PING, b"one")).await.unwrap();
    assert!(matches!(
        within(reader.recv()).await,
        Ok(Some(Message::Ping(_)))
    ));
    let pong = read_frame(&mut raw).await.unwrap();
    assert_eq!((pong.opcode, &pong.payload[..]), (OP_PONG, &b"one"[..]));
    // With the reader gone too, the writer task ends and the stream closes.
    drop(reader);
    expect_eof(&mut raw).await;
}

#[tokio::test]
async fn invalid_outgoing_messages_are_refused() {
    let (ws, _raw) = pair(Role::Server, Config::default());
    assert!(matches!(
        within(ws.send(Message::Ping(Bytes::from(vec![0; 126])))).await,
        Err(Error::InvalidMessage(_))
    ));
    assert!(matches!(
        within(ws.close(1005, "")).await,
        Err(Error::InvalidMessage(_))
    ));
    // The connection is still usable.
    within(ws.send(Message::Ping(Bytes::from(vec![0; 125]))))
        .await
        .unwrap();
}
