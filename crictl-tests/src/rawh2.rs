//! A minimal raw HTTP/2 gRPC client, for sending what stock clients cannot: an arbitrary
//! `:authority`, such as the socket path that kubelet/crictl ≤ 1.30 (grpc-go) send.
//!
//! One unary call per connection on stream 1. Request headers are encoded as HPACK literals
//! without indexing and without Huffman, so no encoder state is needed; response headers are not
//! decoded at all (callers check the DATA payload instead), so no decoder is needed either.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
/// The default SETTINGS_MAX_FRAME_SIZE, which we never change.
const MAX_FRAME: usize = 16_384;
const TIMEOUT: Duration = Duration::from_secs(10);

/// What came back on stream 1 of a [`unary_call`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The DATA payload of stream 1, concatenated, minus the 5-byte gRPC prefix (compressed
    /// flag, length) of the first message: for a unary call, the encoded response message.
    pub data: Vec<u8>,
    /// The RST_STREAM error code, if the server reset stream 1 (1 is PROTOCOL_ERROR).
    pub rst_stream: Option<u32>,
    /// The GOAWAY error code, if the server sent GOAWAY.
    pub goaway: Option<u32>,
    /// Whether stream 1 ended with a HEADERS frame (trailers, or a trailers-only response).
    pub got_trailers: bool,
}

/// Makes one unary gRPC call over a fresh connection to the unix socket `socket`, sending
/// `authority` verbatim as `:authority`, `path` as `:path` (`/package.Service/Method`) and
/// `request` (an encoded protobuf message) as the single message.
///
/// Returns once stream 1 ends (END_STREAM), is reset, or the server sends GOAWAY; fails if the
/// connection closes first or after 10 s overall. Requests must fit the initial 64 KiB window.
pub async fn unary_call(
    socket: &Path,
    authority: &str,
    path: &str,
    request: &[u8],
) -> anyhow::Result<RawResponse> {
    tokio::time::timeout(TIMEOUT, call(socket, authority, path, request))
        .await
        .with_context(|| format!("raw h2 call {path} on {} timed out", socket.display()))?
}

async fn call(
    socket: &Path,
    authority: &str,
    path: &str,
    request: &[u8],
) -> anyhow::Result<RawResponse> {
    let mut conn = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))?;

    let mut out = PREFACE.to_vec();
    put_frame(&mut out, SETTINGS, 0, 0, &[]);
    put_frame(
        &mut out,
        HEADERS,
        END_HEADERS,
        1,
        &request_headers(authority, path),
    );
    let mut message = Vec::with_capacity(5 + request.len());
    message.push(0);
    message.extend_from_slice(&u32::try_from(request.len())?.to_be_bytes());
    message.extend_from_slice(request);
    let chunks: Vec<&[u8]> = message.chunks(MAX_FRAME).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { END_STREAM } else { 0 };
        put_frame(&mut out, DATA, flags, 1, chunk);
    }
    conn.write_all(&out).await.context("send request")?;

    let mut resp = RawResponse::default();
    let mut data = Vec::new();
    // END_STREAM on a HEADERS frame only takes effect once its block is complete.
    let mut ending_headers = false;
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .await
            .context("connection closed before stream 1 ended")?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (ty, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload)
            .await
            .context("read frame payload")?;
        match (ty, stream) {
            (SETTINGS, 0) if flags & ACK == 0 => {
                let mut ack = Vec::new();
                put_frame(&mut ack, SETTINGS, ACK, 0, &[]);
                send_best_effort(&mut conn, &ack).await;
            }
            (PING, 0) if flags & ACK == 0 => {
                let mut pong = Vec::new();
                put_frame(&mut pong, PING, ACK, 0, &payload);
                send_best_effort(&mut conn, &pong).await;
            }
            (GOAWAY, 0) => {
                resp.goaway = Some(code_at(&payload, 4)?);
                break;
            }
            (RST_STREAM, 1) => {
                resp.rst_stream = Some(code_at(&payload, 0)?);
                break;
            }
            (DATA, 1) => {
                let body = if flags & PADDED != 0 {
                    let pad = usize::from(*payload.first().context("empty padded data")?);
                    payload
                        .get(1..len - pad.min(len))
                        .context("bad data padding")?
                } else {
                    &payload[..]
                };
                data.extend_from_slice(body);
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            (HEADERS, 1) | (CONTINUATION, 1) => {
                if ty == HEADERS && flags & END_STREAM != 0 {
                    ending_headers = true;
                }
                if ending_headers && flags & END_HEADERS != 0 {
                    resp.got_trailers = true;
                    break;
                }
            }
            _ => {}
        }
    }
    resp.data = data.get(5..).unwrap_or_default().to_vec();
    Ok(resp)
}

/// Sends an ACK, ignoring failure: a server may close right after its last frame, and what it
/// sent before closing is still there to read; a real problem shows up as a read error.
async fn send_best_effort(conn: &mut UnixStream, frame: &[u8]) {
    let _ = conn.write_all(frame).await;
}

/// The request header block: literals without indexing, literal names, no Huffman.
fn request_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        put_string(&mut block, name);
        put_string(&mut block, value);
    }
    block
}

/// An HPACK string literal without Huffman: 7-bit-prefix length (RFC 7541 §5.1), then bytes.
fn put_string(out: &mut Vec<u8>, s: &str) {
    let mut len = s.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

fn put_frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("frame payloads here are under 16 MiB");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn code_at(payload: &[u8], at: usize) -> anyhow::Result<u32> {
    match payload.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => bail!("short frame: {} bytes", payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_plain_literals_without_indexing() {
        let block = request_headers("/tmp/x/berth.sock", "/runtime.v1.RuntimeService/Version");
        let mut expected = Vec::new();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/Version"),
            (":authority", "/tmp/x/berth.sock"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            expected.push(0x00);
            expected.push(n.len() as u8);
            expected.extend_from_slice(n.as_bytes());
            expected.push(v.len() as u8);
            expected.extend_from_slice(v.as_bytes());
        }
        assert_eq!(block, expected);
    }

    #[test]
    fn long_strings_use_integer_continuation() {
        let mut out = Vec::new();
        put_string(&mut out, &"a".repeat(1337));
        // 1337 - 127 = 1210 = 0x4ba: 0xba | 0x80, then 0x09.
        assert_eq!(&out[..3], &[0x7f, 0xba, 0x09]);
        assert_eq!(out.len(), 3 + 1337);
        let mut out = Vec::new();
        put_string(&mut out, &"a".repeat(127));
        assert_eq!(&out[..2], &[0x7f, 0x00]);
    }

    #[test]
    fn frame_header_layout() {
        let mut out = Vec::new();
        put_frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 1, b"abc");
        assert_eq!(out, [0, 0, 3, 1, 5, 0, 0, 0, 1, b'a', b'b', b'c']);
    }
}
