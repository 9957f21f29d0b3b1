//! CNI spec versions: parsing, ordering, and which ones berth speaks.

use std::fmt;
use std::str::FromStr;

/// A CNI spec version (`major.minor.patch`), ordered numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpecVersion {
    /// Major part.
    pub major: u16,
    /// Minor part.
    pub minor: u16,
    /// Patch part.
    pub patch: u16,
}

impl SpecVersion {
    /// A version from its three parts.
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Whether berth can run a configuration of this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED_VERSIONS.contains(&self)
    }
}

/// CHECK and `prevResult` on DEL appeared in 0.4.0.
pub(crate) const V0_4_0: SpecVersion = SpecVersion::new(0, 4, 0);
/// STATUS and GC appeared in 1.1.0.
pub(crate) const V1_1_0: SpecVersion = SpecVersion::new(1, 1, 0);

/// The newest spec version berth speaks; sent with VERSION.
pub const LATEST: SpecVersion = V1_1_0;

/// Every spec version berth can run a configuration of.
pub const SUPPORTED_VERSIONS: &[SpecVersion] = &[
    SpecVersion::new(0, 1, 0),
    SpecVersion::new(0, 2, 0),
    SpecVersion::new(0, 3, 0),
    SpecVersion::new(0, 3, 1),
    V0_4_0,
    SpecVersion::new(1, 0, 0),
    V1_1_0,
];

/// A version string that is not `major.minor.patch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version of the form major.minor.patch")]
pub struct ParseVersionError(String);

impl FromStr for SpecVersion {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.to_owned());
        let mut parts = s.split('.');
        let mut next = || -> Result<u16, ParseVersionError> {
            let p = parts.next().ok_or_else(err)?;
            // Leading '+' or empty parts are not versions, though u16::from_str takes '+'.
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let v = SpecVersion::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_orders_and_prints() {
        let v: SpecVersion = "0.3.1".parse().unwrap();
        assert_eq!(v, SpecVersion::new(0, 3, 1));
        assert_eq!(v.to_string(), "0.3.1");
        assert!(v < V0_4_0);
        assert!("0.10.0".parse::<SpecVersion>().unwrap() > V0_4_0);
        assert!(V1_1_0 > "1.0.0".parse().unwrap());
        for bad in [
            "", "1", "1.0", "1.0.0.0", "1.x.0", "+1.0.0", "1..0", "v1.0.0",
        ] {
            assert!(bad.parse::<SpecVersion>().is_err(), "{bad:?} parsed");
        }
        assert!(LATEST.is_supported());
        assert!(!SpecVersion::new(2, 0, 0).is_supported());
    }
}
