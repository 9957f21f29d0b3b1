//! Helpers for the WebSocket tests: a raw peer that writes and reads frames byte by byte, so
//! the implementation is checked against the wire format rather than against itself.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use berth_streaming::ws::{Config, Role, WebSocket};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, DuplexStream};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The masking key of RFC 6455 section 5.7's examples.
pub const RFC_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame as a peer would write it; `mask` decides whether it is masked (as clients do).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(m | n as u8),
        n @ 126..=0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A client's (masked) frame.
pub fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, Some(RFC_MASK))
}

/// A server's (unmasked) frame.
pub fn unmasked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, None)
}

/// A close frame's payload.
pub fn close_body(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A frame read off the wire, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Reads one frame; `None` at EOF before its first byte. Panics after 10 s.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<RawFrame> {
    tokio::time::timeout(Duration::from_secs(10), read_frame_inner(r))
        .await
        .expect("a frame within 10 s")
}

async fn read_frame_inner<R: AsyncRead + Unpin>(r: &mut R) -> Option<RawFrame> {
    let mut h = [0u8; 2];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("read frame: {e}"),
    }
    let len = match h[1] & 0x7F {
        126 => u64::from(r.read_u16().await.unwrap()),
        127 => r.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let masked = h[1] & 0x80 != 0;
    let mut key = [0u8; 4];
    if masked {
        r.read_exact(&mut key).await.unwrap();
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await.unwrap();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some(RawFrame {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0F,
        masked,
        payload,
    })
}

/// Reads frames until EOF, skipping pings; panics on anything else.
pub async fn expect_eof<R: AsyncRead + Unpin>(r: &mut R) {
    while let Some(f) = read_frame(r).await {
        assert_eq!(f.opcode, OP_PING, "expected EOF, got {f:?}");
    }
}

/// A socket under test as `role`, and the raw peer's end of the pipe.
pub fn pair(role: Role, config: Config) -> (WebSocket<DuplexStream>, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    (
        WebSocket::from_upgraded(ours, role, config, Bytes::new()),
        theirs,
    )
}

/// Waits at most 10 s for `fut`.
pub async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("done within 10 s")
}
