//! The frame layer of RFC 6455 (section 5): header parsing and encoding, masking.
//!
//! Pure functions on byte slices; the connection code in `conn.rs` drives them.

use bytes::{BufMut, BytesMut};

use super::{CloseFrame, close_code};

/// Largest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
pub(crate) const MAX_HEADER: usize = 14;

/// Largest payload of a control frame (section 5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes (section 5.2); the reserved ones are refused when parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub(crate) fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    /// Payload length as the peer claims it; check it before trusting it.
    pub len: u64,
    /// Bytes the header itself takes.
    pub size: usize,
}

/// A peer's breach of the protocol, with the close code to answer it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    pub code: u16,
    pub reason: String,
}

pub(crate) fn violation(code: u16, reason: impl Into<String>) -> Violation {
    Violation {
        code,
        reason: reason.into(),
    }
}

/// Parses the frame header at the start of `buf`; `Ok(None)` while more bytes are needed.
///
/// Checks what the header alone can tell (reserved bits and opcodes, control frame rules, the
/// 64-bit length's high bit); masking and size limits depend on the role and the config and are
/// the caller's.
pub(crate) fn parse_header(buf: &[u8]) -> Result<Option<Header>, Violation> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        // No extension is ever negotiated, so RSV1-3 must be clear (section 5.2).
        return Err(violation(
            close_code::PROTOCOL_ERROR,
            "reserved bits set in frame header",
        ));
    }
    let Some(opcode) = OpCode::from_bits(b0 & 0x0F) else {
        return Err(violation(
            close_code::PROTOCOL_ERROR,
            format!("reserved opcode {:#x}", b0 & 0x0F),
        ));
    };
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                "fragmented control frame",
            ));
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                "control frame payload longer than 125 bytes",
            ));
        }
    }
    let (len, mut size) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(b);
            let len = u64::from_be_bytes(be);
            if len >> 63 != 0 {
                return Err(violation(
                    close_code::PROTOCOL_ERROR,
                    "64-bit payload length with the most significant bit set",
                ));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let Some(b) = buf.get(size..size + 4) else {
            return Ok(None);
        };
        size += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len,
        size,
    }))
}

/// Appends one frame to `out`: header, then `payload`, masked with `mask` when given.
pub(crate) fn encode_frame(
    out: &mut BytesMut,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(MAX_HEADER + payload.len());
    out.put_u8(if fin { 0x80 } else { 0 } | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    // The shortest length form is mandatory (section 5.2).
    match payload.len() {
        n @ 0..=125 => out.put_u8(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(key) => {
            out.put_slice(&key);
            let start = out.len();
            out.put_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.put_slice(payload),
    }
}

/// XORs `data` with the masking key (section 5.3); applying it twice restores the data.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = data.chunks_exact_mut(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // Every whole word is 8 bytes long, so the tail starts at mask offset 0 again.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Whether a peer may send `code` in a close frame (section 7.4 and the IANA registry):
/// 1004-1006 and 1015 are reserved for local use and never go on the wire.
pub(crate) fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes a close frame's payload: empty, or a code and a UTF-8 reason.
pub(crate) fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(violation(
            close_code::PROTOCOL_ERROR,
            "close frame with a one-byte payload",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(violation(
                    close_code::PROTOCOL_ERROR,
                    format!("invalid close code {code}"),
                ));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| {
                violation(
                    close_code::INVALID_PAYLOAD,
                    "close reason is not valid UTF-8",
                )
            })?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// Encodes a close frame's payload; the reason is cut to fit the 125-byte control limit.
pub(crate) fn close_payload(frame: Option<&CloseFrame>) -> Vec<u8> {
    let Some(frame) = frame else {
        return Vec::new();
    };
    let mut reason = frame.reason.as_str();
    if reason.len() > MAX_CONTROL_PAYLOAD - 2 {
        let mut end = MAX_CONTROL_PAYLOAD - 2;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    let mut out = Vec::with_capacity(2 + reason.len());
    out.extend_from_slice(&frame.code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const RFC_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn encoded(fin: bool, op: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(&mut out, fin, op, payload, mask);
        out.to_vec()
    }

    #[test]
    fn rfc_5_7_unmasked_hello() {
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(encoded(true, OpCode::Text, b"Hello", None), bytes);
        let h = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                fin: true,
                opcode: OpCode::Text,
                mask: None,
                len: 5,
                size: 2
            }
        );
    }

    #[test]
    fn rfc_5_7_masked_hello() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(encoded(true, OpCode::Text, b"Hello", Some(RFC_MASK)), bytes);
        let h = parse_header(&bytes).unwrap().unwrap();
        assert_eq!((h.mask, h.len, h.size), (Some(RFC_MASK), 5, 6));
        let mut payload = bytes[6..].to_vec();
        apply_mask(&mut payload, RFC_MASK);
        assert_eq!(payload, b"Hello");
    }

    #[test]
    fn rfc_5_7_fragments_and_control_frames() {
        assert_eq!(
            encoded(false, OpCode::Text, b"Hel", None),
            [0x01, 0x03, 0x48, 0x65, 0x6c]
        );
        assert_eq!(
            encoded(true, OpCode::Continuation, b"lo", None),
            [0x80, 0x02, 0x6c, 0x6f]
        );
        assert_eq!(
            encoded(true, OpCode::Ping, b"Hello", None),
            [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        assert_eq!(
            encoded(true, OpCode::Pong, b"Hello", Some(RFC_MASK)),
            [
                0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
    }

    #[test]
    fn rfc_5_7_length_encodings() {
        let f = encoded(true, OpCode::Binary, &[7u8; 256], None);
        assert_eq!(f[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(f.len(), 4 + 256);
        let h = parse_header(&f).unwrap().unwrap();
        assert_eq!((h.len, h.size), (256, 4));

        let f = encoded(true, OpCode::Binary, &[7u8; 65536], None);
        assert_eq!(
            f[..10],
            [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
        );
        assert_eq!(f.len(), 10 + 65536);
        let h = parse_header(&f).unwrap().unwrap();
        assert_eq!((h.len, h.size), (65536, 10));

        // Boundaries of the three forms.
        assert_eq!(encoded(true, OpCode::Binary, &[0; 125], None)[1], 125);
        assert_eq!(encoded(true, OpCode::Binary, &[0; 126], None)[1], 126);
        assert_eq!(encoded(true, OpCode::Binary, &[0; 65535], None)[1], 126);
    }

    #[test]
    fn header_needs_all_its_bytes() {
        let f = encoded(true, OpCode::Binary, &[1u8; 300], Some(RFC_MASK));
        for cut in 0..8 {
            assert_eq!(parse_header(&f[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse_header(&f[..8]).unwrap().is_some());
    }

    #[test]
    fn header_violations() {
        let code = |b: &[u8]| parse_header(b).unwrap_err().code;
        assert_eq!(code(&[0xC1, 0x00]), 1002, "rsv1");
        assert_eq!(code(&[0x83, 0x00]), 1002, "reserved data opcode");
        assert_eq!(code(&[0x8B, 0x00]), 1002, "reserved control opcode");
        assert_eq!(code(&[0x09, 0x00]), 1002, "fragmented ping");
        assert_eq!(code(&[0x89, 0x7E, 0x00, 0x7E]), 1002, "long ping");
        let mut huge = vec![0x82, 0x7F];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(code(&huge), 1002, "64-bit length msb");
    }

    #[test]
    fn mask_roundtrip_every_length_and_alignment() {
        let key = [1, 2, 3, 250];
        let data: Vec<u8> = (0..100u8).collect();
        for start in 0..9 {
            for len in 0..40 {
                let mut d = data[start..start + len].to_vec();
                apply_mask(&mut d, key);
                for (i, b) in d.iter().enumerate() {
                    assert_eq!(*b, data[start + i] ^ key[i % 4]);
                }
                apply_mask(&mut d, key);
                assert_eq!(d, &data[start..start + len]);
            }
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]).unwrap(), None);
        assert_eq!(parse_close(&[0x03]).unwrap_err().code, 1002);
        assert_eq!(
            parse_close(&[0x03, 0xE8, b'o', b'k']).unwrap(),
            Some(CloseFrame {
                code: 1000,
                reason: "ok".into()
            })
        );
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()).unwrap_err().code,
                1002,
                "{bad}"
            );
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xff]).unwrap_err().code, 1007);

        let long = CloseFrame {
            code: 1001,
            reason: "é".repeat(100),
        };
        let p = close_payload(Some(&long));
        assert!(p.len() <= 125);
        assert!(parse_close(&p).is_ok(), "cut on a char boundary");
        assert!(close_payload(None).is_empty());
    }
}
