//! The result of a CNI ADD, parsed, with the raw JSON kept.
//!
//! Results of spec 0.3.0 and newer (`interfaces`, `ips`, `routes`, `dns`) are read as they are;
//! the 0.1/0.2 form (`ip4`, `ip6`) is converted to the same shape.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a network's plugin chain set up for an attachment: the final ADD result.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    /// The spec version the result is written in.
    pub cni_version: String,
    /// Interfaces created or used, host and sandbox side.
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes set up.
    pub routes: Vec<Route>,
    /// DNS settings the network wants, if any.
    pub dns: Dns,
    /// The result exactly as the last plugin printed it (what DEL and CHECK get as `prevResult`).
    pub raw: Value,
}

/// An interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its hardware address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its MTU (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for a sandbox interface; `None` or empty for a host interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A vhost-user or similar socket (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// A PCI device id (spec 1.1).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

impl Interface {
    /// Whether the interface is inside the sandbox (has a non-empty `sandbox`).
    pub fn is_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length (`10.88.0.5/16`); [`IpNet::addr`] is the address.
    pub address: IpNet,
    /// The default gateway for this subnet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface the address is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The destination.
    pub dst: IpNet,
    /// The next hop; the default gateway if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Route priority (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// DNS settings in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Current {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Option<Dns>,
}

/// The 0.1.0/0.2.0 result: one optional config per address family.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Legacy {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    ip4: Option<LegacyIp>,
    #[serde(default)]
    ip6: Option<LegacyIp>,
    #[serde(default)]
    dns: Option<Dns>,
}

#[derive(Deserialize)]
struct LegacyIp {
    ip: IpNet,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<Route>,
}

impl CniResult {
    /// Parses a result printed by a plugin.
    ///
    /// Fails with a description when it is not a JSON object or a field has the wrong form (an
    /// address without a prefix, say).
    pub fn from_value(raw: Value) -> Result<Self, String> {
        if !raw.is_object() {
            return Err("not a JSON object".to_owned());
        }
        let legacy = raw.get("ip4").is_some() || raw.get("ip6").is_some();
        if legacy && raw.get("ips").is_none() {
            let l = Legacy::deserialize(&raw).map_err(|e| e.to_string())?;
            let mut ips = Vec::new();
            let mut routes = Vec::new();
            for ip in [l.ip4, l.ip6].into_iter().flatten() {
                ips.push(IpConfig {
                    address: ip.ip,
                    gateway: ip.gateway,
                    interface: None,
                });
                routes.extend(ip.routes);
            }
            return Ok(CniResult {
                cni_version: l.cni_version,
                interfaces: Vec::new(),
                ips,
                routes,
                dns: l.dns.unwrap_or_default(),
                raw,
            });
        }
        let c = Current::deserialize(&raw).map_err(|e| e.to_string())?;
        if let Some(bad) = c
            .ips
            .iter()
            .find(|ip| ip.interface.is_some_and(|i| i >= c.interfaces.len()))
        {
            return Err(format!(
                "ip {} names interface {} but there are {} interfaces",
                bad.address,
                bad.interface.unwrap_or_default(),
                c.interfaces.len()
            ));
        }
        Ok(CniResult {
            cni_version: c.cni_version,
            interfaces: c.interfaces,
            ips: c.ips,
            routes: c.routes,
            dns: c.dns.unwrap_or_default(),
            raw,
        })
    }

    /// The addresses on sandbox interfaces (what a pod's IPs are), in result order.
    ///
    /// An address that names no interface counts too: IPAM-style results and old versions do
    /// not say where an address is, and it is then the container's.
    pub fn sandbox_ips(&self) -> impl Iterator<Item = &IpConfig> {
        self.ips.iter().filter(|ip| match ip.interface {
            Some(i) => self.interfaces.get(i).is_some_and(Interface::is_sandbox),
            None => true,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn parses_a_bridge_result() {
        let raw = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/x", "mtu": 1400}
            ],
            "ips": [
                {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2},
                {"address": "fd00::5/64", "interface": 2},
                {"address": "192.168.9.1/24", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1", "priority": 10}],
            "dns": {"nameservers": ["10.88.0.1"], "search": ["svc.local"]}
        });
        let r = CniResult::from_value(raw.clone()).unwrap();
        assert_eq!(r.cni_version, "1.0.0");
        assert_eq!(r.interfaces.len(), 3);
        assert!(r.interfaces[2].is_sandbox() && !r.interfaces[0].is_sandbox());
        assert_eq!(r.interfaces[2].mtu, Some(1400));
        assert_eq!(r.ips[0].address.addr().to_string(), "10.88.0.5");
        assert_eq!(r.ips[0].address.prefix_len(), 16);
        assert_eq!(r.ips[0].gateway, Some("10.88.0.1".parse().unwrap()));
        let pod: Vec<String> = r.sandbox_ips().map(|ip| ip.address.to_string()).collect();
        assert_eq!(pod, ["10.88.0.5/16", "fd00::5/64"]);
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r.routes[0].priority, Some(10));
        assert_eq!(r.dns.nameservers, ["10.88.0.1"]);
        assert_eq!(r.raw, raw);
    }

    #[test]
    fn converts_a_legacy_result() {
        let r = CniResult::from_value(json!({
            "cniVersion": "0.2.0",
            "ip4": {"ip": "10.1.0.2/24", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0"}]}
        }))
        .unwrap();
        assert_eq!(r.ips.len(), 1);
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        assert_eq!(r.sandbox_ips().count(), 1);
        assert_eq!(r.routes.len(), 1);
    }

    #[test]
    fn refuses_malformed_results() {
        for (bad, why) in [
            (json!([]), "not a JSON object"),
            (
                json!({"ips": [{"address": "10.1.0.2"}]}),
                "invalid IP address syntax",
            ),
            (
                json!({"ips": [{"address": "10.1.0.2/24", "interface": 1}]}),
                "names interface 1",
            ),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                "missing field `name`",
            ),
        ] {
            let e = CniResult::from_value(bad.clone()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
