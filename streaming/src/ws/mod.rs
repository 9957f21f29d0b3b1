//! WebSocket (RFC 6455): the handshakes and the framing, server and client side.
//!
//! What flows inside the messages (the `*.channel.k8s.io` channel byte, base64 text frames) is
//! the caller's business; this module moves whole messages.
//!
//! # Handshake
//! - Server behind an HTTP server of its own (hyper): [`server_handshake`] validates the request
//!   headers and yields the `101 Switching Protocols` headers; after the upgrade,
//!   [`WebSocket::from_upgraded`] with [`Role::Server`] and the bytes the HTTP server read past the
//!   request head.
//! - Server on a raw stream: [`accept`] reads the request head, answers it, and returns the socket.
//! - Client: [`connect`] writes the request, checks the `101` answer, and returns the socket.
//!
//! # Connection
//! A [`WebSocket`] owns the stream. Reading happens in the caller's task, in [`WsReader::recv`];
//! writing happens in one task per connection, spawned by [`WebSocket::from_upgraded`], that owns
//! the stream's write half and is fed by a bounded channel. [`WsWriter::send`] returns once its
//! message is written to the stream, so a slow peer slows the sender down and nothing queues up
//! without bound. The reader never writes: it hands pongs and close replies to the writer task
//! through a one-slot mailbox (only the latest unanswered ping is answered, which RFC 6455
//! section 5.5.3 allows). So a reader stays free to read while the writer is stuck on a full
//! socket, and two peers that both write big messages and answer each other's pings cannot
//! deadlock. Outgoing messages are cut into frames of [`Config::write_fragment_size`] bytes, so
//! pongs and close frames slip in between the frames of a large message.
//!
//! [`WebSocket::split`] gives a [`WsReader`] and a (cloneable) [`WsWriter`] for use from two tasks.
//!
//! # Closing
//! - The peer sends Close: [`WsReader::recv`] returns [`Message::Close`], the writer task answers
//!   with a Close carrying the same code (as gorilla/websocket does), shuts the write side down and
//!   ends; `recv` then returns `Ok(None)`, `send` [`Error::Closed`].
//! - We close ([`WsWriter::close`]): the Close frame is written and the write side shut down;
//!   `recv` goes on until the peer's Close (returned as [`Message::Close`]), then `Ok(None)`.
//! - The peer breaks the protocol: `recv` returns [`Error::Protocol`] once (the writer task sends
//!   a Close with its code: 1002, 1007 or 1009), then `Ok(None)`.
//! - The peer vanishes (EOF without a Close, as kubectl does: gorilla's `Conn.Close` only closes the
//!   TCP connection): `recv` returns [`Error::AbnormalClosure`] once, then `Ok(None)`; the writer
//!   task stops at once and pending and later sends fail.
//! - Everything dropped: the writer task ends and the stream is dropped, without a Close frame.
//!
//! Kubernetes clients (client-go's WebSocket executor) ping every 5 s and give up after 61 s
//! without a pong; pings are answered automatically. [`Config::ping_interval`] and
//! [`Config::idle_timeout`] give the same liveness check in the other direction.

use std::io;
use std::time::Duration;

use bytes::Bytes;

mod conn;
mod frame;
mod handshake;

pub use conn::{WebSocket, WsReader, WsWriter};
pub use handshake::{
    AcceptedRequest, ClientRequest, ClientResponse, HandshakeError, RequestHead, ServerHandshake,
    accept, accept_key, connect, read_request, server_handshake, write_response,
};

/// Close codes of RFC 6455 section 7.4.1 that this module sends or callers commonly need.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, idle timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (e.g. text where only binary makes sense).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Data inconsistent with the message type (invalid UTF-8 in a text message).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A policy was violated.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Which end of the connection we are; it decides the masking (section 5.3): clients mask every
/// frame they send, servers never do, and each refuses frames masked the wrong way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The end that accepted the connection.
    Server,
    /// The end that opened it.
    Client,
}

/// Limits and timers of a connection.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest message accepted, after reassembly of its fragments; a bigger one (or a frame
    /// header announcing one) fails the connection with close code 1009 before any of it is
    /// buffered. Default 16 MiB.
    pub max_message_size: usize,
    /// Outgoing messages longer than this go out as several frames of at most this many payload
    /// bytes, so control frames can be sent between them. Default 64 KiB (so a 64 KiB message is
    /// still one frame).
    pub write_fragment_size: usize,
    /// Send a Ping this often (none by default).
    pub ping_interval: Option<Duration>,
    /// Fail `recv` with [`Error::IdleTimeout`] when, while it waits, nothing at all (not even a
    /// pong) arrives for this long (no limit by default). Pair it with `ping_interval`.
    pub idle_timeout: Option<Duration>,
    /// How long the writer task tries to get a Close frame out to a peer that does not read before
    /// it gives up and drops the stream. Default 5 s.
    pub close_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_size: 16 << 20,
            write_fragment_size: 64 << 10,
            ping_interval: None,
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Code and reason of a Close frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    /// Status code (section 7.4).
    pub code: u16,
    /// UTF-8 reason; cut to 123 bytes when sent.
    pub reason: String,
}

/// One WebSocket message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8; `base64.channel.k8s.io` uses these).
    Text(String),
    /// A binary message (the `*channel.k8s.io` protocols use these).
    Binary(Bytes),
    /// A ping; received ones are already answered, so callers may ignore them. At most 125 bytes.
    Ping(Bytes),
    /// A pong. At most 125 bytes.
    Pong(Bytes),
    /// A close frame, with no payload (`None`) or a code and reason. Sending one closes the
    /// connection for writing.
    Close(Option<CloseFrame>),
}

/// What can go wrong on a WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the underlying stream failed.
    #[error("websocket {op}")]
    Io {
        /// What was being done: "read", "write", "handshake read", "handshake write".
        op: &'static str,
        /// The stream's error.
        #[source]
        source: io::Error,
    },
    /// The server refused the client's handshake request (an answer with its status was sent).
    #[error("refuse websocket handshake")]
    Handshake(#[source] HandshakeError),
    /// An HTTP request or response head could not be parsed or was too large.
    #[error("malformed http head: {0}")]
    BadHead(String),
    /// The client refused the server's handshake response.
    #[error("websocket handshake response refused: {0}")]
    BadResponse(String),
    /// A client request that cannot be written as given.
    #[error("invalid websocket request: {0}")]
    InvalidRequest(String),
    /// The peer broke the protocol; a Close frame with `code` was sent to it.
    #[error("peer broke the websocket protocol ({code}): {reason}")]
    Protocol {
        /// The close code sent: 1002 protocol error, 1007 invalid UTF-8, 1009 too big.
        code: u16,
        /// What was wrong.
        reason: String,
    },
    /// The stream ended without a Close frame (close code 1006).
    #[error("websocket connection ended without a close frame")]
    AbnormalClosure,
    /// Nothing arrived within [`Config::idle_timeout`].
    #[error("nothing received on the websocket for {0:?}")]
    IdleTimeout(Duration),
    /// The connection is closed for writing (a Close was sent or the connection failed).
    #[error("websocket is closed")]
    Closed,
    /// A message that cannot be sent as given (an oversized control frame, a bad close code).
    #[error("invalid websocket message: {0}")]
    InvalidMessage(String),
}

impl From<frame::Violation> for Error {
    fn from(v: frame::Violation) -> Self {
        Self::Protocol {
            code: v.code,
            reason: v.reason,
        }
    }
}
