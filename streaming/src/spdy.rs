//! SPDY/3.1, as the Kubernetes streaming API speaks it.
//!
//! kubectl, kubelet and crictl (up to Kubernetes 1.30, later ones as a fallback) reach exec,
//! attach and port-forward with an HTTP request carrying `Upgrade: SPDY/3.1`; after the
//! `101 Switching Protocols` the connection carries raw SPDY frames, one SPDY stream per channel
//! (stdin, stdout, stderr, error, resize; or data and error per forwarded port), told apart by a
//! `streamtype` header. The HTTP exchange is the server's business; this module starts after
//! it, on any `AsyncRead + AsyncWrite` byte stream.
//!
//! The peer is Go's `github.com/moby/spdystream` (its `spdy` framer is a fork of the old
//! `golang.org/x/net/spdy`). What we do to get along with it:
//! - header blocks as SPDY/3 defines them (32-bit counts and lengths, lowercase names, values
//!   of one name joined by NUL), one zlib stream per direction primed with the SPDY/3
//!   dictionary, each block ended by a sync flush (as Go's `zlib.Writer.Flush` does);
//! - we never send what its framer cannot read: no unknown frame types, no uppercase or
//!   duplicate header names, none of the connection-specific headers (any of these makes it
//!   drop the whole connection);
//! - a stream we accept gets its SYN_REPLY before any DATA (spdystream drops DATA on a stream
//!   not yet replied to); PINGs of the peer's parity are echoed; GOAWAY ends the session once
//!   the open streams are done, as spdystream's `Close` does;
//! - flow control is lenient both ways, because spdystream has none (see [`Session`]'s module
//!   notes in `session.rs`): it never waits for our WINDOW_UPDATEs and never sends any.
//!
//! [`frame`] is the codec; [`Session`], [`IncomingStream`] and [`Stream`] the session layer.

/// The protocol token of the HTTP upgrade: `Upgrade: SPDY/3.1` in the request and the
/// `101 Switching Protocols` response.
pub const UPGRADE_PROTOCOL: &str = "SPDY/3.1";

mod dictionary;
mod error;
pub mod frame;
mod session;

pub use dictionary::{DICTIONARY, DICTIONARY_ID};
pub use error::{Error, Result};
pub use frame::{Frame, GoAwayStatus, Headers, RstStatus};
pub use session::{Config, IncomingStream, Session, Stream};
