//! Content digests (`sha256:<64 hex>`), as OCI names blobs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A validated `sha256:<hex>` digest. Only sha256 is accepted: it is what every registry and
/// image we meet uses, and one algorithm keeps on-disk paths unambiguous.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct InvalidDigest(pub String);

impl Digest {
    /// Builds a digest from 32 raw sha256 bytes.
    pub fn from_sha256_bytes(bytes: &[u8; 32]) -> Self {
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        Digest(s)
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(Digest(s.to_owned()))
        } else {
            Err(InvalidDigest(s.to_owned()))
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDigest;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let s = format!("sha256:{}", "ab".repeat(32));
        let d: Digest = s.parse().expect("valid");
        assert_eq!(d.to_string(), s);
        assert_eq!(d.hex(), "ab".repeat(32));
        assert_eq!(Digest::from_sha256_bytes(&[0xab; 32]), d);
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "sha256:../../etc",
            &format!("sha256:{}", "AB".repeat(32)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
