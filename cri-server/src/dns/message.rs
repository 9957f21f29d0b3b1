//! The few DNS messages (RFC 1035) the embedded resolver reads and writes: a query's header
//! and question, and answers of A, AAAA and PTR records. Our own ~200 lines rather than a
//! crate: the resolver needs a fraction of what the DNS crates carry (hickory-proto pulls in
//! dozens of dependencies for a full protocol stack), and everything else it only forwards
//! byte for byte.

use std::net::IpAddr;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type PTR.
pub const TYPE_PTR: u16 = 12;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response code: no error.
pub const NOERROR: u8 = 0;
/// Response code: the server could not answer (no upstream reachable).
pub const SERVFAIL: u8 = 2;
/// Response code: the name does not exist.
pub const NXDOMAIN: u8 = 3;
/// Response code: the query kind is not supported.
pub const NOTIMP: u8 = 4;

const HEADER_LEN: usize = 12;
/// Longest name (RFC 1035 2.3.4), dots and length bytes counted.
const MAX_NAME: usize = 255;
/// Compression pointers followed before a name is called a loop.
const MAX_POINTERS: usize = 16;

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// It ends in the middle of something.
    #[error("message truncated")]
    Truncated,
    /// A name is malformed: too long, a bad label type, or a compression loop.
    #[error("malformed name")]
    BadName,
    /// It is an answer, not a query, or holds no question.
    #[error("not a query with one question")]
    NotAQuery,
}

/// A query's header and first question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The message id.
    pub id: u16,
    /// Opcode (0: standard query).
    pub opcode: u8,
    /// Recursion desired.
    pub rd: bool,
    /// The name asked for, lowercase, without the trailing dot.
    pub name: String,
    /// The record type asked for.
    pub qtype: u16,
    /// The class asked for.
    pub qclass: u16,
    /// The question as it was on the wire, case and all (echoed in the answer).
    question: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ParseError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(ParseError::Truncated)
}

/// Reads the name at `at`; returns it lowercase, its labels as they were on the wire
/// (uncompressed, ending in the root label) and the offset after it (after the first pointer,
/// if it is compressed).
fn read_name(b: &[u8], mut at: usize) -> Result<(String, Vec<u8>, usize), ParseError> {
    let mut labels: Vec<String> = Vec::new();
    let mut wire: Vec<u8> = Vec::new();
    let mut len = 0usize;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let n = *b.get(at).ok_or(ParseError::Truncated)?;
        match n & 0xc0 {
            0x00 if n == 0 => {
                wire.push(0);
                return Ok((labels.join("."), wire, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let n = usize::from(n);
                let label = b.get(at + 1..at + 1 + n).ok_or(ParseError::Truncated)?;
                len += n + 1;
                if len > MAX_NAME {
                    return Err(ParseError::BadName);
                }
                labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                wire.push(n as u8);
                wire.extend_from_slice(label);
                at += n + 1;
            }
            0xc0 => {
                let target = usize::from(u16_at(b, at)? & 0x3fff);
                pointers += 1;
                if pointers > MAX_POINTERS || target >= b.len() {
                    return Err(ParseError::BadName);
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(ParseError::BadName),
        }
    }
}

impl Query {
    /// Reads a query: its header and first question (others, if any, are ignored).
    pub fn parse(b: &[u8]) -> Result<Query, ParseError> {
        if b.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        let id = u16_at(b, 0)?;
        let flags = u16_at(b, 2)?;
        if flags & 0x8000 != 0 || u16_at(b, 4)? == 0 {
            return Err(ParseError::NotAQuery);
        }
        let (name, mut question, after) = read_name(b, HEADER_LEN)?;
        let qtype = u16_at(b, after)?;
        let qclass = u16_at(b, after + 2)?;
        // The question goes back as asked: resolvers randomise its case (DNS 0x20) and drop
        // answers that do not echo it.
        question.extend_from_slice(&qtype.to_be_bytes());
        question.extend_from_slice(&qclass.to_be_bytes());
        Ok(Query {
            id,
            opcode: ((flags >> 11) & 0x0f) as u8,
            rd: flags & 0x0100 != 0,
            name,
            qtype,
            qclass,
            question,
        })
    }
}

fn write_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Labels over 63 bytes cannot come from a parsed name; cut rather than corrupt.
        let l = &label.as_bytes()[..label.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// One answer record, for the question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An address (A or AAAA by its family).
    Addr(IpAddr),
    /// A name (PTR).
    Ptr(String),
}

/// The answer to `q`: `rcode` and `answers`, each for the question's name with `ttl`.
pub fn response(q: &Query, rcode: u8, answers: &[Answer], ttl: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + 32 * answers.len());
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, the query's opcode, AA (the names are ours), its RD, RA, the rcode.
    let flags: u16 = 0x8000
        | (u16::from(q.opcode) << 11)
        | 0x0400
        | if q.rd { 0x0100 } else { 0 }
        | 0x0080
        | u16::from(rcode & 0x0f);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in answers {
        // The name is the question's, at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (rtype, data) = match a {
            Answer::Addr(IpAddr::V4(ip)) => (TYPE_A, ip.octets().to_vec()),
            Answer::Addr(IpAddr::V6(ip)) => (TYPE_AAAA, ip.octets().to_vec()),
            Answer::Ptr(name) => {
                let mut d = Vec::new();
                write_name(&mut d, name);
                (TYPE_PTR, d)
            }
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// A minimal error answer for a message that parsed only as far as its id (FORMERR-style
/// replies are not worth it: resolvers retry or give up either way), or None when not even
/// the header is there.
pub fn servfail_for(b: &[u8]) -> Option<Vec<u8>> {
    let id = b.get(0..2)?;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(id);
    out.extend_from_slice(&(0x8080u16 | u16::from(SERVFAIL)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa`, nibbles `.ip6.arpa`) stands for.
pub fn reverse_addr(name: &str) -> Option<IpAddr> {
    if let Some(v4) = name.strip_suffix(".in-addr.arpa") {
        let mut parts: Vec<u8> = v4
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        if parts.len() != 4 {
            return None;
        }
        parts.reverse();
        return Some(IpAddr::from([parts[0], parts[1], parts[2], parts[3]]));
    }
    let v6 = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles
        .iter()
        .rev()
        .collect::<Vec<_>>()
        .chunks(2)
        .enumerate()
    {
        bytes[i] = (pair[0] << 4) | pair[1];
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut b = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        write_name(&mut b, name);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&CLASS_IN.to_be_bytes());
        b
    }

    #[test]
    fn a_query_parses_and_its_answer_reads_back() {
        let q = Query::parse(&query("Web.Example", TYPE_A)).expect("parse");
        assert_eq!((q.id, q.rd, q.qtype), (0x1234, true, TYPE_A));
        assert_eq!(q.name, "web.example");
        let r = response(
            &q,
            NOERROR,
            &[Answer::Addr("172.18.0.2".parse().expect("ip"))],
            600,
        );
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, NOERROR);
        assert_eq!(u16_at(&r, 6).expect("ancount"), 1);
        assert_eq!(&r[r.len() - 4..], &[172, 18, 0, 2]);
        // The answer's name is a pointer to the question's.
        let (name, _, _) = read_name(&r, r.len() - 16).expect("answer name");
        assert_eq!(name, "web.example");
        // The question is echoed in the case it was asked in (DNS 0x20).
        assert_eq!(&r[13..16], b"Web");
        assert_eq!(&r[17..24], b"Example");
    }

    #[test]
    fn ptr_and_aaaa_answers_encode() {
        let q = Query::parse(&query("2.0.18.172.in-addr.arpa", TYPE_PTR)).expect("parse");
        assert_eq!(
            reverse_addr(&q.name),
            Some("172.18.0.2".parse().expect("ip"))
        );
        let r = response(&q, NOERROR, &[Answer::Ptr("web".into())], 600);
        assert_eq!(&r[r.len() - 5..], &[3, b'w', b'e', b'b', 0]);
        let q6 = Query::parse(&query("web", TYPE_AAAA)).expect("parse");
        let r6 = response(
            &q6,
            NOERROR,
            &[Answer::Addr("fd00::1".parse().expect("ip"))],
            1,
        );
        assert_eq!(r6[r6.len() - 1], 1);
        let rev6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(reverse_addr(rev6), Some("fd00::1".parse().expect("ip")));
        assert_eq!(reverse_addr("1.2.3.in-addr.arpa"), None);
    }

    #[test]
    fn malformed_messages_are_refused_not_panicked_on() {
        let good = query("web", TYPE_A);
        for cut in 0..good.len() {
            assert!(Query::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A compression pointer to itself.
        let mut looped = good[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert_eq!(Query::parse(&looped), Err(ParseError::BadName));
        // A pointer past the end.
        let mut past = good[..12].to_vec();
        past.extend_from_slice(&[0xc0, 0xff, 0, 1, 0, 1]);
        assert_eq!(Query::parse(&past), Err(ParseError::BadName));
        // Reserved label type 0x40.
        let mut reserved = good[..12].to_vec();
        reserved.extend_from_slice(&[0x41, b'a', 0, 0, 1, 0, 1]);
        assert_eq!(Query::parse(&reserved), Err(ParseError::BadName));
        // A name over 255 bytes.
        let mut long = good[..12].to_vec();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(Query::parse(&long), Err(ParseError::BadName));
        // A response, and a query without questions.
        let mut answer = good.clone();
        answer[2] |= 0x80;
        assert_eq!(Query::parse(&answer), Err(ParseError::NotAQuery));
        let mut empty = good.clone();
        empty[5] = 0;
        assert_eq!(Query::parse(&empty), Err(ParseError::NotAQuery));
        assert_eq!(servfail_for(&[1]), None);
        let sf = servfail_for(&good).expect("servfail");
        assert_eq!((sf.len(), sf[3] & 0x0f), (12, SERVFAIL));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 * 8) & 0xff) as u8)
                .collect();
            let _ = Query::parse(&bytes);
        }
    }
}
