//! Errors of the SPDY codec and sessions.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::frame::RstStatus;

/// Why a SPDY frame, stream or connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from the underlying connection failed.
    #[error("read from the spdy connection")]
    Read(#[source] io::Error),
    /// Writing to the underlying connection failed.
    #[error("write to the spdy connection")]
    Write(#[source] io::Error),
    /// A control frame carried a version other than 3.
    #[error("unsupported spdy version {0}")]
    UnsupportedVersion(u16),
    /// A control frame was longer than we accept.
    #[error("spdy control frame of type {frame_type} too large: {len} bytes")]
    FrameTooLarge {
        /// The control frame type.
        frame_type: u16,
        /// Its announced length.
        len: usize,
    },
    /// A received frame does not follow the SPDY/3 frame layout.
    #[error("malformed spdy frame: {0}")]
    MalformedFrame(&'static str),
    /// A frame we were asked to send cannot be encoded.
    #[error("invalid spdy frame to send: {0}")]
    InvalidFrame(&'static str),
    /// A received header block decompresses to more than we accept.
    #[error("spdy header block larger than {limit} bytes")]
    HeaderBlockTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A received header block does not follow the SPDY/3 name/value layout.
    #[error("malformed spdy header block: {0}")]
    MalformedHeaderBlock(&'static str),
    /// A header cannot be sent: connection-specific headers are forbidden in SPDY (and make
    /// Go's framer drop the whole connection), names must be non-empty and free of NUL, values
    /// free of NUL.
    #[error("header {name:?} cannot be sent over spdy")]
    HeaderNotAllowed {
        /// The offending header name.
        name: String,
    },
    /// zlib failed to compress a header block.
    #[error("compress spdy header block")]
    Compress(#[source] flate2::CompressError),
    /// zlib failed to decompress a received header block.
    #[error("decompress spdy header block")]
    Decompress(#[source] flate2::DecompressError),
    /// The peer broke the session rules (stream ids, flow-control limits, ...).
    #[error("spdy protocol violation by the peer: {0}")]
    Protocol(&'static str),
    /// The peer reset the stream with RST_STREAM.
    #[error("spdy stream {id} reset by the peer: {status}")]
    ResetByPeer {
        /// The stream id.
        id: u32,
        /// The status the peer gave.
        status: RstStatus,
    },
    /// This side reset the stream (explicitly, or because the peer broke its flow control).
    #[error("spdy stream {id} was reset locally: {status}")]
    ResetLocally {
        /// The stream id.
        id: u32,
        /// The status sent to the peer.
        status: RstStatus,
    },
    /// The stream was opened after the peer's GOAWAY, or the GOAWAY says the peer never
    /// processed it.
    #[error("the peer sent GOAWAY: no new spdy streams")]
    GoneAway,
    /// This side sent GOAWAY (or is closing): no new streams.
    #[error("spdy session is going away: no new streams")]
    GoingAway,
    /// All 2^30 stream ids of this side are used up.
    #[error("spdy stream ids exhausted")]
    StreamIdsExhausted,
    /// No frame went either way for the configured idle timeout.
    #[error("no spdy frame in either direction for {0:?}")]
    IdleTimeout(Duration),
    /// The peer closed the connection.
    #[error("the peer closed the spdy connection")]
    PeerClosed,
    /// The connection was closed after GOAWAY once its streams were done.
    #[error("the spdy connection was closed after GOAWAY")]
    Finished,
    /// [`Session::abort`](super::Session::abort) was called.
    #[error("the spdy connection was aborted")]
    Aborted,
    /// The peer keeps sending frames that need an answer but does not read the answers.
    #[error("the peer does not read: too many spdy control frames queued")]
    PeerNotReading,
    /// The connection has ended; the source says why.
    #[error("spdy connection closed")]
    Closed(#[source] Arc<Error>),
}

/// A `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
