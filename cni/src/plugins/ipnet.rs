//! IP networks (`10.1.0.0/16`, `fd00::/64`) and address arithmetic for IPAM.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address with a prefix length, as CNI writes it (`10.1.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address (not necessarily the network address).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl IpNet {
    /// Builds a network, checking the prefix length against the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= bits(addr)).then_some(Self { addr, prefix })
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        from_u128(to_u128(self.addr) & self.mask(), self.addr.is_ipv4())
    }

    /// The last address of the network (the IPv4 broadcast address).
    pub fn last(&self) -> IpAddr {
        from_u128(to_u128(self.addr) | self.host_mask(), self.addr.is_ipv4())
    }

    /// This network with host bits cleared.
    pub fn canonical(&self) -> Self {
        Self {
            addr: self.network(),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && to_u128(ip) & self.mask() == to_u128(self.network())
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &IpNet) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    fn mask(&self) -> u128 {
        max(self.addr) & !self.host_mask()
    }

    fn host_mask(&self) -> u128 {
        let host_bits = u32::from(bits(self.addr) - self.prefix);
        if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        IpNet::new(addr, prefix).ok_or_else(|| format!("{s:?}: prefix length too long"))
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The number of address bits of `ip`'s family.
pub fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn max(ip: IpAddr) -> u128 {
    if ip.is_ipv4() {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    }
}

/// The address as an integer (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of the given family with integer value `v` (truncated for IPv4).
pub fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// `ip + n` in its family, or `None` past the end of the address space.
pub fn add(ip: IpAddr, n: u128) -> Option<IpAddr> {
    let v = to_u128(ip).checked_add(n)?;
    (v <= max(ip)).then(|| from_u128(v, ip.is_ipv4()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_last_contains() {
        let n: IpNet = "10.1.2.3/16".parse().expect("parse");
        assert_eq!(n.network().to_string(), "10.1.0.0");
        assert_eq!(n.last().to_string(), "10.1.255.255");
        assert!(n.contains("10.1.200.1".parse().expect("ip")));
        assert!(!n.contains("10.2.0.1".parse().expect("ip")));
        assert!(!n.contains("::1".parse().expect("ip")));
        let v6: IpNet = "fd00:1::5/64".parse().expect("parse");
        assert_eq!(v6.network().to_string(), "fd00:1::");
        assert_eq!(v6.last().to_string(), "fd00:1::ffff:ffff:ffff:ffff");
        let host: IpNet = "10.0.0.7/32".parse().expect("parse");
        assert_eq!(host.network().to_string(), "10.0.0.7");
        let all: IpNet = "0.0.0.0/0".parse().expect("parse");
        assert_eq!(all.last().to_string(), "255.255.255.255");
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.0".parse::<IpNet>().is_err());
    }
}
