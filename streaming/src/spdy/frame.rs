//! SPDY/3.1 frames: their in-memory form, the wire encoder and the decoder.
//!
//! Every frame starts with 8 bytes. A control frame: `1 | version(15) | type(16)`, then
//! `flags(8) | length(24)`; a DATA frame: `0 | stream id(31)`, then `flags(8) | length(24)`.
//! SYN_STREAM, SYN_REPLY and HEADERS carry a name/value header block (SPDY/3: 32-bit counts and
//! lengths, lowercase names, several values of one name joined by NUL) compressed with zlib. Each
//! direction of a connection has one zlib stream, primed with the SPDY dictionary and flushed
//! with a sync flush after each block, so [`Encoder`] and [`Decoder`] are stateful and one of
//! each belongs to a connection.
//!
//! The decoder is written for hostile input: frame lengths, decompressed header blocks and
//! header counts are capped, nothing is allocated from an announced length before the bytes
//! arrive, and every malformed frame is an [`Error`], never a panic. Control frames of unknown
//! types are skipped, as the specification asks.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::{DICTIONARY, DICTIONARY_ID};
use super::error::{Error, Result};

/// The protocol version in every control frame we send and accept.
pub const VERSION: u16 = 3;
/// Largest payload of any frame: the length field has 24 bits.
pub const MAX_FRAME_LEN: usize = 0xff_ffff;
/// Largest control frame we accept. Real ones are tiny; the limit keeps a hostile peer from
/// making us buffer a 16 MiB header block.
pub const MAX_CONTROL_FRAME_LEN: usize = 1024 * 1024;
/// Largest decompressed header block we accept (a zlib bomb ends here).
pub const MAX_HEADER_BLOCK_LEN: usize = 256 * 1024;
/// Most name/value pairs in one header block.
pub const MAX_HEADER_COUNT: usize = 1024;
/// Largest stream id (31 bits).
pub const MAX_STREAM_ID: u32 = 0x7fff_ffff;
/// Largest flow-control window and WINDOW_UPDATE delta (31 bits).
pub const MAX_WINDOW: u32 = 0x7fff_ffff;

/// SETTINGS id of the initial per-stream flow-control window.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// SETTINGS id of the maximum number of concurrent streams.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u32 = 4;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// Headers that SPDY forbids; Go's framer (moby/spdystream) fails the whole connection when a
/// header block contains one, so we refuse to send them.
const FORBIDDEN_HEADERS: [&str; 5] = [
    "connection",
    "host",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
];

/// Status code of a RST_STREAM frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RstStatus(pub u32);

impl RstStatus {
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: Self = Self(1);
    /// INVALID_STREAM: a frame for a stream that is not open.
    pub const INVALID_STREAM: Self = Self(2);
    /// REFUSED_STREAM: the stream was not processed.
    pub const REFUSED_STREAM: Self = Self(3);
    /// UNSUPPORTED_VERSION.
    pub const UNSUPPORTED_VERSION: Self = Self(4);
    /// CANCEL: the stream is no longer needed.
    pub const CANCEL: Self = Self(5);
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: Self = Self(6);
    /// FLOW_CONTROL_ERROR.
    pub const FLOW_CONTROL_ERROR: Self = Self(7);
    /// STREAM_IN_USE.
    pub const STREAM_IN_USE: Self = Self(8);
    /// STREAM_ALREADY_CLOSED.
    pub const STREAM_ALREADY_CLOSED: Self = Self(9);
    /// INVALID_CREDENTIALS.
    pub const INVALID_CREDENTIALS: Self = Self(10);
    /// FRAME_TOO_LARGE.
    pub const FRAME_TOO_LARGE: Self = Self(11);
}

impl fmt::Display for RstStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "PROTOCOL_ERROR",
            2 => "INVALID_STREAM",
            3 => "REFUSED_STREAM",
            4 => "UNSUPPORTED_VERSION",
            5 => "CANCEL",
            6 => "INTERNAL_ERROR",
            7 => "FLOW_CONTROL_ERROR",
            8 => "STREAM_IN_USE",
            9 => "STREAM_ALREADY_CLOSED",
            10 => "INVALID_CREDENTIALS",
            11 => "FRAME_TOO_LARGE",
            other => return write!(f, "status {other}"),
        };
        f.write_str(name)
    }
}

/// Status code of a GOAWAY frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GoAwayStatus(pub u32);

impl GoAwayStatus {
    /// Normal session teardown.
    pub const OK: Self = Self(0);
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1);
    /// An internal error of the sender.
    pub const INTERNAL_ERROR: Self = Self(2);
}

/// One entry of a SETTINGS frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Per-entry flags (0x1 persist value, 0x2 persisted).
    pub flags: u8,
    /// The setting id (24 bits), e.g. [`SETTINGS_INITIAL_WINDOW_SIZE`].
    pub id: u32,
    /// The value.
    pub value: u32,
}

/// A SPDY header block: name/value pairs, names lowercase.
///
/// Several values of one name are several entries; on the wire they travel as one value joined
/// by NUL, in the order of the name's first entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// An empty header block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value; the name is lowercased (SPDY requires lowercase names).
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = name.into();
        name.make_ascii_lowercase();
        self.entries.push((name, value.into()));
    }

    /// Builder form of [`Headers::append`].
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.append(name, value);
        self
    }

    /// The first value of `name` (compared case-insensitively).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of `name` (compared case-insensitively), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of entries (values).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks that the block can be sent: names non-empty, printable lowercase ASCII (Go's
    /// framer fails the connection on a name `strings.ToLower` would change) and not one of the
    /// connection-specific headers SPDY forbids; values without NUL (it separates values).
    pub fn validate(&self) -> Result<()> {
        for (name, value) in &self.entries {
            let bad_name = name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase());
            if bad_name || value.contains('\0') || FORBIDDEN_HEADERS.contains(&name.as_str()) {
                return Err(Error::HeaderNotAllowed { name: name.clone() });
            }
        }
        Ok(())
    }

    /// The uncompressed SPDY/3 name/value block.
    fn to_block(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in &self.entries {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        let mut block = Vec::new();
        put_len(&mut block, names.len())?;
        for name in names {
            put_len(&mut block, name.len())?;
            block.extend_from_slice(name.as_bytes());
            let values: Vec<&str> = self.get_all(name).collect();
            let joined = values.join("\0");
            put_len(&mut block, joined.len())?;
            block.extend_from_slice(joined.as_bytes());
        }
        Ok(block)
    }

    /// Parses an uncompressed SPDY/3 name/value block.
    fn from_block(mut block: &[u8]) -> Result<Self> {
        let mut headers = Headers::new();
        if block.is_empty() {
            return Ok(headers);
        }
        let count = take_u32(&mut block)? as usize;
        // Each pair needs at least 8 bytes, so a count beyond that is a lie.
        if count > MAX_HEADER_COUNT || count > block.len() / 8 {
            return Err(Error::MalformedHeaderBlock("too many headers"));
        }
        for _ in 0..count {
            let name = take_string(&mut block)?;
            if name.contains('\0') {
                return Err(Error::MalformedHeaderBlock("NUL in header name"));
            }
            let value = take_string(&mut block)?;
            for part in value.split('\0') {
                if headers.entries.len() >= MAX_HEADER_COUNT {
                    return Err(Error::MalformedHeaderBlock("too many header values"));
                }
                headers.append(name.clone(), part);
            }
        }
        if !block.is_empty() {
            return Err(Error::MalformedHeaderBlock("trailing bytes"));
        }
        Ok(headers)
    }
}

fn put_len(block: &mut Vec<u8>, len: usize) -> Result<()> {
    let len = u32::try_from(len).map_err(|_| Error::InvalidFrame("header too long"))?;
    block.put_u32(len);
    Ok(())
}

fn take_u32(block: &mut &[u8]) -> Result<u32> {
    if block.len() < 4 {
        return Err(Error::MalformedHeaderBlock("truncated"));
    }
    Ok(block.get_u32())
}

fn take_string(block: &mut &[u8]) -> Result<String> {
    let len = take_u32(block)? as usize;
    if len > block.len() {
        return Err(Error::MalformedHeaderBlock("length beyond the block"));
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// A SPDY/3.1 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// The new stream's id: odd from the client, even from the server.
        stream_id: u32,
        /// The stream this one is associated with (server push), or 0.
        associated_to: u32,
        /// Priority, 0 (highest) to 7.
        priority: u8,
        /// Credential slot (unused, 0).
        slot: u8,
        /// The sender sends nothing more on this stream.
        fin: bool,
        /// The recipient may not send on this stream.
        unidirectional: bool,
        /// The request headers.
        headers: Headers,
    },
    /// Accepts a stream opened by the peer.
    SynReply {
        /// The stream id.
        stream_id: u32,
        /// The sender sends nothing more on this stream.
        fin: bool,
        /// The reply headers.
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// The stream id.
        stream_id: u32,
        /// Why.
        status: RstStatus,
    },
    /// Session settings.
    Settings {
        /// FLAG_SETTINGS_CLEAR_SETTINGS: forget persisted settings.
        clear: bool,
        /// The entries.
        settings: Vec<Setting>,
    },
    /// Liveness check; the recipient echoes a PING the peer initiated.
    Ping {
        /// Odd when the client initiated it, even when the server did.
        id: u32,
    },
    /// Ends the session: no new streams.
    GoAway {
        /// The last stream id the sender accepted from the recipient.
        last_good_stream_id: u32,
        /// Why.
        status: GoAwayStatus,
    },
    /// Additional headers on a stream.
    Headers {
        /// The stream id.
        stream_id: u32,
        /// The sender sends nothing more on this stream.
        fin: bool,
        /// The headers.
        headers: Headers,
    },
    /// Grows a flow-control window; stream 0 is the session window of SPDY/3.1.
    WindowUpdate {
        /// The stream id, or 0 for the session.
        stream_id: u32,
        /// Bytes added to the window (1 to 2^31-1).
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// The stream id.
        stream_id: u32,
        /// The sender sends nothing more on this stream.
        fin: bool,
        /// The payload.
        data: Bytes,
    },
}

fn check_stream_id(id: u32) -> Result<()> {
    if id == 0 || id > MAX_STREAM_ID {
        return Err(Error::InvalidFrame("stream id out of range"));
    }
    Ok(())
}

fn control_header(dst: &mut BytesMut, frame_type: u16, flags: u8, len: usize) -> Result<()> {
    if len > MAX_FRAME_LEN {
        return Err(Error::InvalidFrame("frame too long"));
    }
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(frame_type);
    // The check above keeps len within 24 bits.
    dst.put_u32(u32::from(flags) << 24 | len as u32);
    Ok(())
}

fn flag(set: bool, bit: u8) -> u8 {
    if set { bit } else { 0 }
}

/// Encodes frames for one direction of one connection (it owns that direction's zlib stream,
/// so frames must be written in the order they are encoded).
pub struct Encoder {
    deflate: Compress,
    dictionary_set: bool,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// A new encoder, at the start of a connection.
    pub fn new() -> Self {
        Self {
            // Best compression, as Go's framer uses; header blocks are tiny.
            deflate: Compress::new(Compression::best(), true),
            dictionary_set: false,
        }
    }

    /// Appends `frame` in wire format to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                check_stream_id(*stream_id)?;
                if *associated_to > MAX_STREAM_ID || *priority > 7 {
                    return Err(Error::InvalidFrame("SYN_STREAM field out of range"));
                }
                let block = self.compress(headers)?;
                let flags = flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL);
                control_header(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(*stream_id);
                dst.put_u32(*associated_to);
                dst.put_u8(priority << 5);
                dst.put_u8(*slot);
                dst.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => self.encode_headers(TYPE_SYN_REPLY, *stream_id, *fin, headers, dst)?,
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => self.encode_headers(TYPE_HEADERS, *stream_id, *fin, headers, dst)?,
            Frame::RstStream { stream_id, status } => {
                check_stream_id(*stream_id)?;
                if status.0 == 0 {
                    return Err(Error::InvalidFrame("RST_STREAM status 0"));
                }
                control_header(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(*stream_id);
                dst.put_u32(status.0);
            }
            Frame::Settings { clear, settings } => {
                let len = settings
                    .len()
                    .checked_mul(8)
                    .and_then(|n| n.checked_add(4))
                    .ok_or(Error::InvalidFrame("too many settings"))?;
                control_header(dst, TYPE_SETTINGS, flag(*clear, FLAG_SETTINGS_CLEAR), len)?;
                // len fits in 24 bits, so the count does too.
                dst.put_u32(settings.len() as u32);
                for setting in settings {
                    if setting.id > 0xff_ffff {
                        return Err(Error::InvalidFrame("setting id beyond 24 bits"));
                    }
                    dst.put_u32(u32::from(setting.flags) << 24 | setting.id);
                    dst.put_u32(setting.value);
                }
            }
            Frame::Ping { id } => {
                control_header(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                if *last_good_stream_id > MAX_STREAM_ID {
                    return Err(Error::InvalidFrame("stream id out of range"));
                }
                control_header(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(*last_good_stream_id);
                dst.put_u32(status.0);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                if *stream_id > MAX_STREAM_ID || *delta == 0 || *delta > MAX_WINDOW {
                    return Err(Error::InvalidFrame("WINDOW_UPDATE field out of range"));
                }
                control_header(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(*stream_id);
                dst.put_u32(*delta);
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                check_stream_id(*stream_id)?;
                if data.len() > MAX_FRAME_LEN {
                    return Err(Error::InvalidFrame("frame too long"));
                }
                dst.put_u32(*stream_id);
                dst.put_u32(u32::from(flag(*fin, FLAG_FIN)) << 24 | data.len() as u32);
                dst.extend_from_slice(data);
            }
        }
        Ok(())
    }

    fn encode_headers(
        &mut self,
        frame_type: u16,
        stream_id: u32,
        fin: bool,
        headers: &Headers,
        dst: &mut BytesMut,
    ) -> Result<()> {
        check_stream_id(stream_id)?;
        let block = self.compress(headers)?;
        control_header(dst, frame_type, flag(fin, FLAG_FIN), 4 + block.len())?;
        dst.put_u32(stream_id);
        dst.extend_from_slice(&block);
        Ok(())
    }

    /// Compresses a header block with a sync flush, continuing this direction's zlib stream.
    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>> {
        let input = headers.to_block()?;
        if !self.dictionary_set {
            self.deflate
                .set_dictionary(&DICTIONARY)
                .map_err(Error::Compress)?;
            self.dictionary_set = true;
        }
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let start = self.deflate.total_in();
        loop {
            let consumed = (self.deflate.total_in() - start) as usize;
            self.deflate
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .map_err(Error::Compress)?;
            let consumed = (self.deflate.total_in() - start) as usize;
            // zlib's rule: a flush is complete when it left output space unused.
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

/// Decodes the frames of one direction of one connection (it owns that direction's zlib
/// stream, so it must see every frame in order).
pub struct Decoder {
    inflate: Decompress,
    /// Bytes of an unknown control frame still to be skipped.
    skip: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A new decoder, at the start of a connection.
    pub fn new() -> Self {
        Self {
            inflate: Decompress::new(true),
            skip: 0,
        }
    }

    /// Takes the next complete frame off the front of `src`; `Ok(None)` when more bytes are
    /// needed. Control frames of unknown types are consumed and skipped. After an error the
    /// connection is unusable (the zlib stream may be out of step).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(src.len());
                src.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if src.len() < 8 {
                return Ok(None);
            }
            let first = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
            let second = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
            let flags = (second >> 24) as u8;
            let len = (second & 0xff_ffff) as usize;
            if first & 0x8000_0000 == 0 {
                if src.len() < 8 + len {
                    return Ok(None);
                }
                let stream_id = first & MAX_STREAM_ID;
                if stream_id == 0 {
                    return Err(Error::MalformedFrame("DATA frame for stream 0"));
                }
                src.advance(8);
                let data = src.split_to(len).freeze();
                return Ok(Some(Frame::Data {
                    stream_id,
                    fin: flags & FLAG_FIN != 0,
                    data,
                }));
            }
            let version = ((first >> 16) & 0x7fff) as u16;
            let frame_type = (first & 0xffff) as u16;
            if version != VERSION {
                return Err(Error::UnsupportedVersion(version));
            }
            if !matches!(frame_type, 1..=4 | 6..=9) {
                // Unknown (or retired, like SPDY/2's NOOP) control frame: skip it.
                src.advance(8);
                self.skip = len;
                continue;
            }
            if len > MAX_CONTROL_FRAME_LEN {
                return Err(Error::FrameTooLarge { frame_type, len });
            }
            if src.len() < 8 + len {
                return Ok(None);
            }
            src.advance(8);
            let payload = src.split_to(len).freeze();
            return self.control(frame_type, flags, &payload).map(Some);
        }
    }

    fn control(&mut self, frame_type: u16, flags: u8, mut p: &[u8]) -> Result<Frame> {
        let fin = flags & FLAG_FIN != 0;
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                if p.len() < 10 {
                    return Err(Error::MalformedFrame("SYN_STREAM shorter than 10 bytes"));
                }
                let stream_id = p.get_u32() & MAX_STREAM_ID;
                let associated_to = p.get_u32() & MAX_STREAM_ID;
                let priority = p.get_u8() >> 5;
                let slot = p.get_u8();
                let headers = self.header_block(p)?;
                Frame::SynStream {
                    stream_id: nonzero(stream_id)?,
                    associated_to,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                if p.len() < 4 {
                    return Err(Error::MalformedFrame("header frame shorter than 4 bytes"));
                }
                let stream_id = nonzero(p.get_u32() & MAX_STREAM_ID)?;
                let headers = self.header_block(p)?;
                if frame_type == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                if p.len() != 8 {
                    return Err(Error::MalformedFrame("RST_STREAM length is not 8"));
                }
                let stream_id = nonzero(p.get_u32() & MAX_STREAM_ID)?;
                let status = p.get_u32();
                if status == 0 {
                    return Err(Error::MalformedFrame("RST_STREAM status 0"));
                }
                Frame::RstStream {
                    stream_id,
                    status: RstStatus(status),
                }
            }
            TYPE_SETTINGS => {
                if p.len() < 4 {
                    return Err(Error::MalformedFrame("SETTINGS shorter than 4 bytes"));
                }
                let count = p.get_u32() as usize;
                if count.checked_mul(8) != Some(p.len()) {
                    return Err(Error::MalformedFrame(
                        "SETTINGS count does not match length",
                    ));
                }
                let settings = (0..count)
                    .map(|_| {
                        let id = p.get_u32();
                        Setting {
                            flags: (id >> 24) as u8,
                            id: id & 0xff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    settings,
                }
            }
            TYPE_PING => {
                if p.len() != 4 {
                    return Err(Error::MalformedFrame("PING length is not 4"));
                }
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                if p.len() != 8 {
                    return Err(Error::MalformedFrame("GOAWAY length is not 8"));
                }
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & MAX_STREAM_ID,
                    status: GoAwayStatus(p.get_u32()),
                }
            }
            TYPE_WINDOW_UPDATE => {
                if p.len() != 8 {
                    return Err(Error::MalformedFrame("WINDOW_UPDATE length is not 8"));
                }
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & MAX_STREAM_ID,
                    delta: p.get_u32() & MAX_WINDOW,
                }
            }
            _ => return Err(Error::MalformedFrame("unknown control frame type")),
        };
        Ok(frame)
    }

    /// Decompresses (continuing this direction's zlib stream) and parses a header block.
    fn header_block(&mut self, compressed: &[u8]) -> Result<Headers> {
        if compressed.is_empty() {
            return Ok(Headers::new());
        }
        let block = self.decompress(compressed)?;
        Headers::from_block(&block)
    }

    fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>> {
        let limit = MAX_HEADER_BLOCK_LEN;
        let mut out: Vec<u8> = Vec::with_capacity((input.len() * 4).clamp(256, 16 * 1024));
        let start = self.inflate.total_in();
        loop {
            if out.len() >= out.capacity() {
                if out.len() >= limit {
                    return Err(Error::HeaderBlockTooLarge { limit });
                }
                out.reserve_exact(out.len().clamp(1024, limit - out.len()));
            }
            let consumed = (self.inflate.total_in() - start) as usize;
            let produced = out.len();
            match self
                .inflate
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(Error::MalformedHeaderBlock("zlib stream ended"));
                }
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ID) => {
                        self.inflate
                            .set_dictionary(&DICTIONARY)
                            .map_err(Error::Decompress)?;
                        continue;
                    }
                    Some(_) => {
                        return Err(Error::MalformedHeaderBlock("not the SPDY/3 dictionary"));
                    }
                    None => return Err(Error::Decompress(e)),
                },
            }
            if out.len() > limit {
                return Err(Error::HeaderBlockTooLarge { limit });
            }
            let now_consumed = (self.inflate.total_in() - start) as usize;
            if out.len() < out.capacity() {
                if now_consumed == input.len() {
                    return Ok(out);
                }
                if now_consumed == consumed && out.len() == produced {
                    return Err(Error::MalformedHeaderBlock("zlib made no progress"));
                }
            }
        }
    }
}

fn nonzero(stream_id: u32) -> Result<u32> {
    if stream_id == 0 {
        return Err(Error::MalformedFrame("stream id 0"));
    }
    Ok(stream_id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bar_foo() -> Headers {
        Headers::new().with("bar", "foo").with("foo", "bar")
    }

    /// Chromium's `CreateSynStreamCompressed` vector (net/spdy/spdy_framer_test.cc): SYN_STREAM
    /// of stream 1, priority 4, headers bar: foo and foo: bar, from a fresh zlib stream.
    const CHROMIUM_SYN_STREAM: [u8; 63] = [
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x37, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x80, 0x00, 0x38, 0xEA, 0xE3, 0xC6, 0xA7, 0xC2, 0x02, 0xE5, 0x0E, 0x50, 0xC2, 0x4B,
        0x4A, 0x04, 0xE5, 0x0B, 0x66, 0x80, 0x00, 0x4A, 0xCB, 0xCF, 0x07, 0x08, 0x20, 0x10, 0x95,
        0x96, 0x9F, 0x0F, 0xA2, 0x00, 0x02, 0x28, 0x29, 0xB1, 0x08, 0x20, 0x80, 0x00, 0x00, 0x00,
        0x00, 0xFF, 0xFF,
    ];

    /// Chromium's `CreateSynReplyCompressed` vector, SIMD-zlib variant.
    const CHROMIUM_SYN_REPLY_SIMD: [u8; 52] = [
        0x80, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x01, 0x38, 0xea, 0xe3,
        0xc6, 0xa7, 0xc2, 0x02, 0xe5, 0x0e, 0x50, 0xc2, 0x4b, 0x4a, 0x04, 0xe5, 0x0b, 0x66, 0x80,
        0x00, 0x4a, 0xcb, 0xcf, 0x07, 0x08, 0x20, 0x24, 0x0a, 0x20, 0x80, 0x92, 0x12, 0x8b, 0x00,
        0x02, 0x08, 0x00, 0x00, 0x00, 0xff, 0xff,
    ];

    /// The uncompressed block of bar: foo, foo: bar (Chromium's `CreateSynStreamUncompressed`).
    const BAR_FOO_BLOCK: [u8; 32] = [
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x03, b'b', b'a', b'r', 0x00, 0x00, 0x00, 0x03,
        b'f', b'o', b'o', 0x00, 0x00, 0x00, 0x03, b'f', b'o', b'o', 0x00, 0x00, 0x00, 0x03, b'b',
        b'a', b'r',
    ];

    fn encode(frame: &Frame) -> BytesMut {
        let mut dst = BytesMut::new();
        Encoder::new().encode(frame, &mut dst).expect("encode");
        dst
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>> {
        let mut decoder = Decoder::new();
        let mut src = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut src)? {
            frames.push(frame);
        }
        assert!(src.is_empty(), "left over: {src:?}");
        Ok(frames)
    }

    fn decode_one(bytes: &[u8]) -> Result<Frame> {
        let mut frames = decode_all(bytes)?;
        assert_eq!(frames.len(), 1);
        Ok(frames.remove(0))
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for &byte in DICTIONARY.iter() {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(b << 16 | a, DICTIONARY_ID);
        assert_eq!(&DICTIONARY[..11], b"\0\0\0\x07options");
        assert!(DICTIONARY.ends_with(b"utf-,*,enq=0."));
    }

    #[test]
    fn decodes_chromium_compressed_syn_stream() {
        let frame = decode_one(&CHROMIUM_SYN_STREAM).unwrap();
        assert_eq!(
            frame,
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 4,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: bar_foo(),
            }
        );
    }

    #[test]
    fn decodes_chromium_compressed_syn_reply() {
        let frame = decode_one(&CHROMIUM_SYN_REPLY_SIMD).unwrap();
        assert_eq!(
            frame,
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: bar_foo()
            }
        );
    }

    /// Three SYN_STREAMs as kubectl opens an exec's channels, compressed by C zlib (not
    /// zlib-rs) the way Go's framer does it: level 9, the dictionary, one zlib stream across
    /// the frames, a sync flush after each block. The 2nd and 3rd blocks only decode with the
    /// context of the ones before.
    const C_ZLIB_SYN_STREAMS: [u8; 109] = [
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xa6, 0x23, 0x46, 0x70, 0x3a,
        0x2b, 0x29, 0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x06, 0x00, 0x00,
        0x00, 0xff, 0xff, 0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x19, 0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc2, 0x2a, 0x05, 0x4c, 0xcc, 0x29, 0xf9, 0xa5, 0x25,
        0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x14, 0x00,
        0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc2, 0x29, 0x07, 0xd4, 0x09, 0x00,
        0x00, 0x00, 0xff, 0xff,
    ];

    #[test]
    fn decodes_a_zlib_stream_carried_across_frames() {
        let frames = decode_all(&C_ZLIB_SYN_STREAMS).unwrap();
        let types: Vec<(u32, &str)> = frames
            .iter()
            .map(|f| match f {
                Frame::SynStream {
                    stream_id, headers, ..
                } => (*stream_id, headers.get("streamtype").unwrap()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(types, [(1, "error"), (3, "stdout"), (5, "stderr")]);
        // Out of context, the second block is not decodable.
        assert!(decode_all(&C_ZLIB_SYN_STREAMS[48..]).is_err());
    }

    #[test]
    fn encodes_syn_stream_per_spec() {
        let frame = Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 4,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: bar_foo(),
        };
        let bytes = encode(&frame);
        let len = bytes.len() - 8;
        let mut header = vec![0x80, 0x03, 0x00, 0x01, 0x00];
        header.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        header.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x80, 0x00]);
        assert_eq!(&bytes[..18], &header[..]);
        // zlib header: deflate/32K window, best compression, FDICT, then the dictionary id.
        assert_eq!(&bytes[18..24], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
        // A sync flush ends every block.
        assert_eq!(&bytes[bytes.len() - 4..], &[0x00, 0x00, 0xff, 0xff]);
        // The block inflates (with an independent zlib context) to the spec's layout.
        let mut inflate = Decompress::new(true);
        let mut out = Vec::with_capacity(1024);
        let err = inflate
            .decompress_vec(&bytes[18..], &mut out, FlushDecompress::Sync)
            .unwrap_err();
        assert_eq!(err.needs_dictionary(), Some(DICTIONARY_ID));
        inflate.set_dictionary(&DICTIONARY).unwrap();
        let used = inflate.total_in() as usize;
        inflate
            .decompress_vec(&bytes[18 + used..], &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, BAR_FOO_BLOCK);
        assert_eq!(decode_one(&bytes).unwrap(), frame);
    }

    #[test]
    fn encodes_control_frames_per_spec() {
        // Byte vectors from Chromium's spdy_framer_test.cc (SPDY/3 variants).
        let cases: Vec<(Frame, Vec<u8>)> = vec![
            (
                Frame::RstStream {
                    stream_id: 1,
                    status: RstStatus::PROTOCOL_ERROR,
                },
                vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 1],
            ),
            (
                Frame::RstStream {
                    stream_id: 0x7fff_ffff,
                    status: RstStatus::INTERNAL_ERROR,
                },
                vec![
                    0x80, 3, 0, 3, 0, 0, 0, 8, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 6,
                ],
            ),
            (
                Frame::Settings {
                    clear: false,
                    settings: vec![Setting {
                        flags: 1,
                        id: SETTINGS_INITIAL_WINDOW_SIZE,
                        value: 0x0a0b_0c0d,
                    }],
                },
                vec![
                    0x80, 3, 0, 4, 0, 0, 0, 0x0c, 0, 0, 0, 1, 1, 0, 0, 7, 0x0a, 0x0b, 0x0c, 0x0d,
                ],
            ),
            (
                Frame::Settings {
                    clear: false,
                    settings: vec![],
                },
                vec![0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 0],
            ),
            (
                Frame::Ping { id: 0x1234_5678 },
                vec![0x80, 3, 0, 6, 0, 0, 0, 4, 0x12, 0x34, 0x56, 0x78],
            ),
            (
                Frame::GoAway {
                    last_good_stream_id: 0,
                    status: GoAwayStatus::OK,
                },
                vec![0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Frame::GoAway {
                    last_good_stream_id: 0x7fff_ffff,
                    status: GoAwayStatus::PROTOCOL_ERROR,
                },
                vec![
                    0x80, 3, 0, 7, 0, 0, 0, 8, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1,
                ],
            ),
            (
                Frame::WindowUpdate {
                    stream_id: 1,
                    delta: 0x7fff_ffff,
                },
                vec![
                    0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff,
                ],
            ),
            (
                Frame::WindowUpdate {
                    stream_id: 0,
                    delta: 1,
                },
                vec![0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            (
                Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: Bytes::from_static(b"hello"),
                },
                vec![0, 0, 0, 1, 1, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'],
            ),
            (
                Frame::Data {
                    stream_id: 0x7fff_ffff,
                    fin: false,
                    data: Bytes::new(),
                },
                vec![0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            ),
        ];
        for (frame, bytes) in cases {
            assert_eq!(&encode(&frame)[..], &bytes[..], "{frame:?}");
            assert_eq!(decode_one(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn round_trips_every_frame_through_one_zlib_stream() {
        let headers = Headers::new()
            .with("streamType", "stdout")
            .with("requestid", "0")
            .with("x-multi", "a")
            .with("X-Multi", "")
            .with("x-multi", "c");
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 7,
                slot: 3,
                fin: true,
                unidirectional: true,
                headers: headers.clone(),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: true,
                headers: headers.clone(),
            },
            Frame::Headers {
                stream_id: 3,
                fin: false,
                headers: Headers::new(),
            },
            Frame::SynStream {
                stream_id: 5,
                associated_to: 1,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: headers.clone(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: RstStatus::CANCEL,
            },
            Frame::Settings {
                clear: true,
                settings: vec![
                    Setting {
                        flags: 0,
                        id: SETTINGS_INITIAL_WINDOW_SIZE,
                        value: 1 << 20,
                    },
                    Setting {
                        flags: 2,
                        id: SETTINGS_MAX_CONCURRENT_STREAMS,
                        value: 100,
                    },
                ],
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good_stream_id: 5,
                status: GoAwayStatus::INTERNAL_ERROR,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 12345,
            },
            Frame::Data {
                stream_id: 1,
                fin: false,
                data: Bytes::from(vec![7u8; 70_000]),
            },
        ];
        let mut encoder = Encoder::new();
        let mut wire = BytesMut::new();
        for frame in &frames {
            encoder.encode(frame, &mut wire).unwrap();
        }
        // Feed the decoder one byte at a time: partial frames must wait, not fail.
        let mut decoder = Decoder::new();
        let mut src = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire.iter() {
            src.put_u8(*byte);
            while let Some(frame) = decoder.decode(&mut src).unwrap() {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, frames);
        let Frame::SynStream { headers, .. } = &decoded[0] else {
            panic!("not a SYN_STREAM");
        };
        assert_eq!(headers.get("STREAMTYPE"), Some("stdout"));
        assert_eq!(
            headers.get_all("x-multi").collect::<Vec<_>>(),
            ["a", "", "c"]
        );
    }

    #[test]
    fn skips_unknown_control_frames() {
        let mut bytes = vec![0x80, 3, 0, 10, 0, 0, 0, 5, 1, 2, 3, 4, 5];
        bytes.extend_from_slice(&[0x80, 3, 0, 5, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 9]);
        assert_eq!(decode_all(&bytes).unwrap(), [Frame::Ping { id: 9 }]);
    }

    #[test]
    fn refuses_headers_go_would_choke_on() {
        for name in [
            "Connection",
            "host",
            "transfer-encoding",
            "",
            "a b",
            "\u{c4}rger",
        ] {
            let frame = Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: Headers::new().with(name, "x"),
            };
            let err = Encoder::new()
                .encode(&frame, &mut BytesMut::new())
                .unwrap_err();
            assert!(matches!(err, Error::HeaderNotAllowed { .. }), "{err}");
        }
        let nul = Headers::new().with("a", "b\0c");
        assert!(nul.validate().is_err());
    }

    #[test]
    fn hostile_frames_are_errors() {
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("spdy/2", vec![0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
            ("version 0", vec![0x80, 0, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
            ("huge control", vec![0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff]),
            ("short syn", vec![0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1]),
            ("rst len", vec![0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1]),
            (
                "rst status 0",
                vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
            (
                "rst stream 0",
                vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            (
                "settings count",
                vec![
                    0x80, 3, 0, 4, 0, 0, 0, 0x0c, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 7, 0, 0, 0, 1,
                ],
            ),
            ("ping len", vec![0x80, 3, 0, 6, 0, 0, 0, 2, 0, 1]),
            ("goaway len", vec![0x80, 3, 0, 7, 0, 0, 0, 4, 0, 0, 0, 1]),
            ("data stream 0", vec![0, 0, 0, 0, 0, 0, 0, 1, 9]),
            (
                "garbage header block",
                vec![
                    0x80, 3, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef,
                ],
            ),
        ];
        for (what, bytes) in bad {
            assert!(decode_all(&bytes).is_err(), "{what} was accepted");
        }
        // moby/spdystream's TestReadMalformedZlibHeader fixture (SPDY/2 framing, corrupt zlib).
        let fixture = [
            0x80, 0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x17, 0xf9, 0xdf, 0xa2, 0x51, 0xb2, 0x62, 0x60, 0x00, 0x00,
            0x00, 0x00, 0xff, 0xff,
        ];
        assert!(decode_all(&fixture).is_err());
        // The same with the version patched to 3: the zlib header is corrupt.
        let mut patched = fixture;
        patched[1] = 3;
        assert!(decode_all(&patched).is_err());
    }

    #[test]
    fn truncated_frames_wait_for_more_bytes() {
        let bytes = encode(&Frame::Ping { id: 1 });
        for cut in 0..bytes.len() {
            let mut src = BytesMut::from(&bytes[..cut]);
            assert_eq!(Decoder::new().decode(&mut src).unwrap(), None);
        }
        // An announced 16 MiB DATA frame allocates nothing until its bytes arrive.
        let mut src = BytesMut::from(&[0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert_eq!(Decoder::new().decode(&mut src).unwrap(), None);
        assert!(src.capacity() < 1024);
    }

    /// Wraps a raw (uncompressed) header block into a SYN_REPLY compressed the way a peer would.
    fn syn_reply_with_block(block: &[u8]) -> Vec<u8> {
        let mut deflate = Compress::new(Compression::fast(), true);
        deflate.set_dictionary(&DICTIONARY).unwrap();
        let mut out = Vec::with_capacity(block.len() + 1024);
        deflate
            .compress_vec(block, &mut out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(deflate.total_in() as usize, block.len());
        let mut frame = vec![0x80, 3, 0, 2];
        frame.extend_from_slice(&((out.len() + 4) as u32).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 1]);
        frame.extend_from_slice(&out);
        frame
    }

    #[test]
    fn header_block_bombs_and_lies_are_errors() {
        // 1 MiB of zeros compresses to ~1 KiB: the decompression limit must stop it.
        let mut bomb = vec![0, 0, 0, 1, 0, 0, 0, 1, b'a'];
        bomb.extend_from_slice(&(1u32 << 20).to_be_bytes());
        bomb.resize(bomb.len() + (1 << 20), b'x');
        let frame = syn_reply_with_block(&bomb);
        assert!(frame.len() < MAX_CONTROL_FRAME_LEN);
        assert!(matches!(
            decode_all(&frame),
            Err(Error::HeaderBlockTooLarge { .. })
        ));
        // A count of 4 billion headers.
        let frame = syn_reply_with_block(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert!(matches!(
            decode_all(&frame),
            Err(Error::MalformedHeaderBlock(_))
        ));
        // A name length beyond the block.
        let frame = syn_reply_with_block(&[0, 0, 0, 1, 0x7f, 0, 0, 0, b'a', 0, 0, 0, 0]);
        assert!(decode_all(&frame).is_err());
        // Trailing garbage after the announced pairs.
        let mut block = BAR_FOO_BLOCK.to_vec();
        block.push(0);
        assert!(decode_all(&syn_reply_with_block(&block)).is_err());
        // A well-formed block through the same helper decodes.
        assert_eq!(
            decode_one(&syn_reply_with_block(&BAR_FOO_BLOCK)).unwrap(),
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: bar_foo()
            }
        );
    }

    #[test]
    fn wrong_dictionary_is_an_error() {
        let mut deflate = Compress::new(Compression::fast(), true);
        deflate.set_dictionary(b"not the spdy dictionary").unwrap();
        let mut out = Vec::with_capacity(1024);
        deflate
            .compress_vec(&BAR_FOO_BLOCK, &mut out, FlushCompress::Sync)
            .unwrap();
        let mut frame = vec![0x80, 3, 0, 2];
        frame.extend_from_slice(&((out.len() + 4) as u32).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 1]);
        frame.extend_from_slice(&out);
        assert!(decode_all(&frame).is_err());
    }
}
