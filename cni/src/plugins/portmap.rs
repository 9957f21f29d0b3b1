//! `berth-portmap`: host ports forwarded to pods with nftables DNAT. A chained plugin: it
//! runs after the plugin that gives the pod its addresses (`berth-bridge`, or the reference
//! `bridge`/`ptp`), takes the pod addresses from `prevResult` (those of the `CNI_IFNAME`
//! interface, the first of each family) and passes `prevResult` on unchanged.
//!
//! The mappings come from the `portMappings` capability, `runtimeConfig.portMappings`:
//! `[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]`, protocol
//! `tcp` (the default), `udp` or `sctp`, `hostIP` empty (every local address of both
//! families), an unspecified address (`0.0.0.0`: every local IPv4 address) or one address
//! (only that family). A mapping whose `hostIP` is of a family the pod has no address of is
//! skipped, as the reference plugin does.
//!
//! Configuration keys (those of the reference `portmap` plugin):
//! - `snat` (default true): masquerade forwarded connections from the host's loopback and
//!   from the pod's own subnet (the pod itself, or its neighbours on the bridge, through a
//!   host port), so that the pod's replies go back through the host and get un-NATed. The
//!   whole subnet, as the reference iptables backend does, not only the pod as its nftables
//!   backend does: without `br_netfilter` a neighbour's reply would otherwise go straight
//!   over the bridge, un-NATed, and the connection hang;
//! - `masqAll` (default false, only with `snat`): masquerade every forwarded connection,
//!   whatever its source;
//! - `markMasqBit` (0-31) and `externalSetMarkChain` are accepted (and checked as the
//!   reference plugin checks them) but not used: the reference plugin marks packets because
//!   an iptables rule cannot see in POSTROUTING that PREROUTING DNATed the connection,
//!   while an nftables rule can (`ct status dnat`);
//! - `backend` is ignored (this plugin only speaks nftables); `conditionsV4`/`conditionsV6`
//!   (iptables matches) are refused rather than silently dropped.
//!
//! Rules live in berth's own tables, `table ip berth-portmap` and `table ip6 berth-portmap`:
//!
//! ```text
//! table ip berth-portmap {
//!     chain prerouting {                          # traffic from other hosts and namespaces
//!         type nat hook prerouting priority dstnat; policy accept;
//!         fib daddr type local jump n<net>-<att>-dnat         # one rule per attachment
//!     }
//!     chain output {                              # connections the host itself makes
//!         type nat hook output priority -100; policy accept;   # dstnat (nft 1.0.6 has no
//!                                                              # name for it on output)
//!         fib daddr type local jump n<net>-<att>-dnat
//!     }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip daddr 10.88.0.5 ct status dnat jump n<net>-<att>-snat
//!     }
//!     chain n<net>-<att>-dnat {                   # one per (network, container, ifname)
//!         ip daddr 192.0.2.10 tcp dport 8443 dnat to 10.88.0.5:443   # hostIP ones first
//!         tcp dport 8080 dnat to 10.88.0.5:80
//!     }
//!     chain n<net>-<att>-snat {                   # only with `snat`
//!         ip saddr { 10.88.0.0/16, 127.0.0.0/8 } tcp dport 80 masquerade
//!     }
//! }
//! ```
//!
//! `n<net>-<att>` is the attachment's name as in [`nft`] (hashes of the network name and of
//! network, container id and ifname), so DEL removes exactly one attachment's chains and
//! jump rules, and GC finds a network's chains by their prefix. Each call is one atomic
//! `nft -f -` transaction under [`nft::LOCK_FILE`], and when the last attachment goes its
//! table goes too: nothing of berth's stays in the ruleset.
//!
//! Reaching `127.0.0.1:hostPort` from the host needs `route_localnet` on the interface that
//! routes to the pod (a packet from 127.0.0.1 may not leave the host otherwise) and the
//! masquerade above; ADD sets that sysctl in the network namespace it runs in, as the
//! reference plugin does. IPv6 has no such switch, so `[::1]` is never forwarded.
//!
//! After ADD, conntrack entries of UDP flows to a mapped local host port that began before
//! the mapping existed are deleted (see [`conntrack`]), as the reference plugin does.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error as CniError;
use rscni_plugin::types::{Args, CNIResult};
use serde::Deserialize;
use serde_json::Value;

use super::ipnet::IpNet;
use super::netlink::Netlink;
use super::nft::{self, Family};
use super::{Error, Result, conntrack, runner};

/// The name of berth's port-mapping tables (one per address family).
pub const TABLE: &str = "berth-portmap";
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";
const BASE_CHAINS: [&str; 3] = [PREROUTING, OUTPUT, POSTROUTING];
const DNAT_SUFFIX: &str = "-dnat";
const SNAT_SUFFIX: &str = "-snat";

/// The transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The name as CNI and nftables write it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "" | "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// One validated entry of `runtimeConfig.portMappings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// The port on the host.
    pub host_port: u16,
    /// The port in the pod.
    pub container_port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
    /// `hostIP`; `None` when empty.
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    /// The host address the mapping is restricted to in `family`: `Some(None)` for every
    /// local address, `None` if the mapping is not for that family at all.
    fn host_addr(&self, family: Family) -> Option<Option<IpAddr>> {
        match self.host_ip {
            None => Some(None),
            Some(ip) if Family::of(ip) != family => None,
            Some(ip) if ip.is_unspecified() => Some(None),
            Some(ip) => Some(Some(ip)),
        }
    }

    /// Whether the two map the same host port of one family to different pod ports.
    fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && self.container_port != other.container_port
            && Family::ALL
                .into_iter()
                .any(|f| match (self.host_addr(f), other.host_addr(f)) {
                    (Some(a), Some(b)) => a.is_none() || b.is_none() || a == b,
                    _ => false,
                })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMapping {
    host_port: i64,
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default, rename = "hostIP")]
    host_ip: Option<String>,
}

impl RawMapping {
    fn validate(&self) -> Result<PortMapping> {
        let port = |v: i64, what: &str| {
            u16::try_from(v).ok().filter(|p| *p != 0).ok_or_else(|| {
                Error::InvalidConfig(format!("{what} {v} is not a port number (1-65535)"))
            })
        };
        let proto = self.protocol.as_deref().unwrap_or_default();
        let host_ip =
            match self.host_ip.as_deref().unwrap_or_default() {
                "" => None,
                s => Some(s.parse().map_err(|_| {
                    Error::InvalidConfig(format!("hostIP {s:?} is not an IP address"))
                })?),
            };
        Ok(PortMapping {
            host_port: port(self.host_port, "hostPort")?,
            container_port: port(self.container_port, "containerPort")?,
            protocol: Protocol::parse(proto).ok_or_else(|| {
                Error::InvalidConfig(format!("protocol {proto:?} is not one of tcp, udp, sctp"))
            })?,
            host_ip,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Section {
    #[serde(default)]
    name: String,
    snat: Option<bool>,
    #[serde(default)]
    masq_all: bool,
    mark_masq_bit: Option<i64>,
    external_set_mark_chain: Option<String>,
    #[serde(default)]
    conditions_v4: Option<Vec<String>>,
    #[serde(default)]
    conditions_v6: Option<Vec<String>>,
    #[serde(default)]
    runtime_config: Option<RuntimeSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeSection {
    #[serde(default)]
    port_mappings: Option<Vec<RawMapping>>,
}

/// A resolved `berth-portmap` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network name.
    pub network: String,
    /// Masquerade forwarded connections from loopback and from the pod's subnet.
    pub snat: bool,
    /// Masquerade every forwarded connection (with `snat`).
    pub masq_all: bool,
    /// The port mappings, validated, without duplicates.
    pub mappings: Vec<PortMapping>,
}

impl Config {
    /// Resolves the network configuration `conf` as the plugin got it on stdin (the
    /// mappings are not read from rscni's `NetConf`: see [`runner`]).
    pub fn from_json(conf: &Value) -> Result<Self> {
        let section: Section = serde_json::from_value(conf.clone())
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        if let Some(bit) = section.mark_masq_bit {
            if !(0..=31).contains(&bit) {
                return Err(Error::InvalidConfig(format!(
                    "markMasqBit {bit} is not a bit number (0-31)"
                )));
            }
            if section.external_set_mark_chain.is_some() {
                return Err(Error::InvalidConfig(
                    "markMasqBit and externalSetMarkChain exclude each other".into(),
                ));
            }
        }
        if section.conditions_v4.is_some_and(|c| !c.is_empty())
            || section.conditions_v6.is_some_and(|c| !c.is_empty())
        {
            return Err(Error::InvalidConfig(
                "conditionsV4/conditionsV6 (iptables matches) are not supported".into(),
            ));
        }
        let mut mappings: Vec<PortMapping> = Vec::new();
        let raw = section
            .runtime_config
            .and_then(|rc| rc.port_mappings)
            .unwrap_or_default();
        for (i, m) in raw.iter().enumerate() {
            let m = m
                .validate()
                .map_err(|e| Error::InvalidConfig(format!("portMappings[{i}]: {e}")))?;
            if let Some(other) = mappings.iter().find(|o| o.conflicts_with(&m)) {
                return Err(Error::InvalidConfig(format!(
                    "portMappings[{i}]: host port {}/{} is already mapped to container port {}",
                    m.protocol.name(),
                    m.host_port,
                    other.container_port
                )));
            }
            if !mappings.contains(&m) {
                mappings.push(m);
            }
        }
        Ok(Config {
            network: section.name,
            snat: section.snat.unwrap_or(true),
            masq_all: section.masq_all,
            mappings,
        })
    }
}

/// One DNAT rule: `[daddr host_ip] proto dport host_port dnat to to:to_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Dnat {
    /// `None` sorts after `Some`: rules for one host address go before catch-all ones.
    any_host: bool,
    host_ip: Option<IpAddr>,
    protocol: Protocol,
    host_port: u16,
    to: IpAddr,
    to_port: u16,
}

impl Dnat {
    fn rule(&self, family: Family) -> String {
        let f = family.table();
        let target = match self.to {
            IpAddr::V4(a) => format!("{a}:{}", self.to_port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.to_port),
        };
        let daddr = self
            .host_ip
            .map(|ip| format!("{f} daddr {ip} "))
            .unwrap_or_default();
        format!(
            "{daddr}{} dport {} dnat to {target}",
            self.protocol.name(),
            self.host_port
        )
    }

    fn from_rule(rule: &ParsedRule) -> Option<Self> {
        let (protocol, host_port) = rule.dport?;
        let (to, to_port) = rule.dnat?;
        Some(Dnat {
            any_host: rule.daddr.is_none(),
            host_ip: rule.daddr,
            protocol,
            host_port,
            to,
            to_port,
        })
    }
}

/// What one attachment gets in one family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    family: Family,
    /// The pod's address with the prefix length of its subnet.
    pod: IpNet,
    /// Sorted, without duplicates.
    dnat: Vec<Dnat>,
    /// `(protocol, container port)` pairs to masquerade; empty without `snat`.
    snat: Vec<(Protocol, u16)>,
    /// Masquerade whatever the source (`masqAll`).
    masq_all: bool,
    /// Forward connections from loopback (IPv4 with `snat` only).
    loopback: bool,
}

impl Plan {
    /// Whether some rule forwards connections the host makes to 127.0.0.1.
    fn needs_route_localnet(&self) -> bool {
        self.loopback
            && self
                .dnat
                .iter()
                .any(|d| d.host_ip.is_none_or(|ip| ip.is_loopback()))
    }
}

/// The plans for `pods` (at most one address per family), one per family that has both a
/// pod address and a mapping.
fn plans(conf: &Config, pods: &[IpNet]) -> Vec<Plan> {
    let mut out = Vec::new();
    for pod in pods {
        let family = Family::of(pod.addr);
        let mut dnat: Vec<Dnat> = conf
            .mappings
            .iter()
            .filter_map(|m| {
                let host_ip = m.host_addr(family)?;
                Some(Dnat {
                    any_host: host_ip.is_none(),
                    host_ip,
                    protocol: m.protocol,
                    host_port: m.host_port,
                    to: pod.addr,
                    to_port: m.container_port,
                })
            })
            .collect();
        if dnat.is_empty() {
            continue;
        }
        dnat.sort();
        dnat.dedup();
        let snat: Vec<(Protocol, u16)> = if conf.snat {
            dnat.iter()
                .map(|d| (d.protocol, d.to_port))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            Vec::new()
        };
        out.push(Plan {
            family,
            pod: *pod,
            dnat,
            snat,
            masq_all: conf.masq_all,
            loopback: conf.snat && family == Family::V4,
        });
    }
    out
}

/// The addresses of the `ifname` interface in `prev`, the first of each family.
fn pod_addresses(prev: &CNIResult, ifname: &str) -> Result<Vec<IpNet>> {
    let index = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()));
    let mut out: Vec<IpNet> = Vec::new();
    for ip in &prev.ips {
        if let (Some(want), Some(i)) = (index, ip.interface)
            && i as usize != want
        {
            continue;
        }
        let addr: IpNet = ip.address.parse().map_err(|e| {
            Error::InvalidConfig(format!("prevResult address {:?}: {e}", ip.address))
        })?;
        if !out.iter().any(|a| a.addr.is_ipv4() == addr.addr.is_ipv4()) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "prevResult has no address for {ifname}"
        )));
    }
    Ok(out)
}

/// A rule of our tables as far as this plugin reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ParsedRule {
    daddr: Option<IpAddr>,
    dport: Option<(Protocol, u16)>,
    dnat: Option<(IpAddr, u16)>,
    masquerade: bool,
    jump: Option<String>,
}

impl ParsedRule {
    /// Reads the `expr` list of a rule in `nft -j` form.
    fn from_json(expr: &Value) -> Self {
        let mut rule = ParsedRule::default();
        for e in expr.as_array().into_iter().flatten() {
            if let Some(m) = e.get("match") {
                let payload = &m["left"]["payload"];
                let proto = payload["protocol"].as_str().unwrap_or_default();
                let field = payload["field"].as_str().unwrap_or_default();
                if m["op"] != "==" {
                    continue;
                }
                match (proto, field) {
                    ("ip" | "ip6", "daddr") => {
                        rule.daddr = m["right"].as_str().and_then(|s| s.parse().ok());
                    }
                    (p, "dport") => {
                        let port = m["right"].as_u64().and_then(|p| u16::try_from(p).ok());
                        if let (Some(p), Some(port)) = (Protocol::parse(p), port) {
                            rule.dport = Some((p, port));
                        }
                    }
                    _ => {}
                }
            } else if let Some(d) = e.get("dnat") {
                let addr = d["addr"].as_str().and_then(|s| s.parse().ok());
                let port = d["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                if let (Some(addr), Some(port)) = (addr, port) {
                    rule.dnat = Some((addr, port));
                }
            } else if e.get("masquerade").is_some() {
                rule.masquerade = true;
            } else if let Some(target) = e["jump"]["target"].as_str() {
                rule.jump = Some(target.to_string());
            }
        }
        rule
    }
}

/// One rule of a table with the chain it is in and its handle.
#[derive(Debug, Clone)]
struct RuleEntry {
    chain: String,
    handle: u64,
    rule: ParsedRule,
}

/// The chains and rules of one of our tables.
#[derive(Debug, Clone, Default)]
struct TableState {
    chains: Vec<String>,
    rules: Vec<RuleEntry>,
}

impl TableState {
    fn from_json(json: &Value) -> Self {
        let mut state = TableState::default();
        for item in json["nftables"].as_array().into_iter().flatten() {
            if let Some(name) = item["chain"]["name"].as_str() {
                state.chains.push(name.to_string());
            }
            let rule = &item["rule"];
            if let (Some(chain), Some(handle)) = (rule["chain"].as_str(), rule["handle"].as_u64()) {
                state.rules.push(RuleEntry {
                    chain: chain.to_string(),
                    handle,
                    rule: ParsedRule::from_json(&rule["expr"]),
                });
            }
        }
        state
    }

    fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a ParsedRule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.chain == chain)
            .map(|r| &r.rule)
    }

    fn jumps_to(&self, base: &str, target: &str) -> bool {
        self.rules_of(base)
            .any(|r| r.jump.as_deref() == Some(target))
    }
}

fn list(family: Family) -> Result<Option<TableState>> {
    Ok(nft::list_json(family, TABLE, true)?.map(|json| TableState::from_json(&json)))
}

/// The attachment name (`n<net>-<att>`) of one of its chains; `None` for other chains.
fn attachment_of(chain: &str) -> Option<&str> {
    chain
        .strip_suffix(DNAT_SUFFIX)
        .or_else(|| chain.strip_suffix(SNAT_SUFFIX))
}

/// The nft commands that, in `family`'s table as `state` shows it, remove the chains (and
/// the jumps to them) of the attachments `remove` selects by name, then add `add` for the
/// attachment named `add.0`. An attachment that is removed and added again keeps its
/// chains (flushed), so one transaction can replace it.
fn script(
    family: Family,
    state: Option<&TableState>,
    remove: &dyn Fn(&str) -> bool,
    add: Option<(&str, &Plan)>,
) -> String {
    let (f, t) = (family.table(), TABLE);
    let mut s = String::new();
    let mut added: Vec<String> = Vec::new();
    if let Some((name, plan)) = add {
        added.push(format!("{name}{DNAT_SUFFIX}"));
        if !plan.snat.is_empty() {
            added.push(format!("{name}{SNAT_SUFFIX}"));
        }
    }
    if let Some(state) = state {
        let doomed = |c: &str| attachment_of(c).is_some_and(remove);
        let others_left = state
            .chains
            .iter()
            .any(|c| !BASE_CHAINS.contains(&c.as_str()) && !doomed(c));
        if !others_left && add.is_none() {
            // The last attachment goes, or a table of only base chains was left behind.
            s.push_str(&format!("delete table {f} {t}\n"));
            return s;
        }
        for r in &state.rules {
            if BASE_CHAINS.contains(&r.chain.as_str())
                && r.rule
                    .jump
                    .as_deref()
                    .is_some_and(|j| doomed(j) || added.iter().any(|a| a == j))
            {
                s.push_str(&format!(
                    "delete rule {f} {t} {} handle {}\n",
                    r.chain, r.handle
                ));
            }
        }
        for chain in state.chains.iter().filter(|c| doomed(c)) {
            s.push_str(&format!("flush chain {f} {t} {chain}\n"));
            if !added.contains(chain) {
                s.push_str(&format!("delete chain {f} {t} {chain}\n"));
            }
        }
    }
    let Some((name, plan)) = add else {
        return s;
    };
    let dnat_chain = format!("{name}{DNAT_SUFFIX}");
    let snat_chain = format!("{name}{SNAT_SUFFIX}");
    s.push_str(&format!(
        "add table {f} {t}\n\
         add chain {f} {t} {PREROUTING} {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain {f} {t} {OUTPUT} {{ type nat hook output priority -100; policy accept; }}\n\
         add chain {f} {t} {dnat_chain}\n\
         flush chain {f} {t} {dnat_chain}\n"
    ));
    for d in &plan.dnat {
        s.push_str(&format!(
            "add rule {f} {t} {dnat_chain} {}\n",
            d.rule(family)
        ));
    }
    s.push_str(&format!(
        "add rule {f} {t} {PREROUTING} fib daddr type local jump {dnat_chain}\n"
    ));
    // Packets from loopback may only leave the host with route_localnet and a masquerade;
    // without them a forwarded connection would hang where a host listener may answer.
    let not_loopback = match family {
        Family::V4 if plan.loopback => "",
        Family::V4 => "ip daddr != 127.0.0.0/8 ",
        Family::V6 => "ip6 daddr != ::1 ",
    };
    s.push_str(&format!(
        "add rule {f} {t} {OUTPUT} fib daddr type local {not_loopback}jump {dnat_chain}\n"
    ));
    if !plan.snat.is_empty() {
        s.push_str(&format!(
            "add chain {f} {t} {POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             add chain {f} {t} {snat_chain}\n\
             flush chain {f} {t} {snat_chain}\n"
        ));
        let mut sources = vec![plan.pod.canonical().to_string()];
        if plan.loopback {
            sources.push("127.0.0.0/8".into());
        }
        let saddr = if plan.masq_all {
            String::new()
        } else {
            format!("{f} saddr {{ {} }} ", sources.join(", "))
        };
        for (proto, port) in &plan.snat {
            s.push_str(&format!(
                "add rule {f} {t} {snat_chain} {saddr}{} dport {port} masquerade\n",
                proto.name()
            ));
        }
        s.push_str(&format!(
            "add rule {f} {t} {POSTROUTING} {f} daddr {} ct status dnat jump {snat_chain}\n",
            plan.pod.addr
        ));
    }
    s
}

/// Under the lock, in both families: removes the attachments `remove` selects and adds
/// `plans` for attachment `name`.
fn apply(remove: &dyn Fn(&str) -> bool, name: &str, plans: &[Plan], op: &str) -> Result<()> {
    let _lock = nft::lock()?;
    let mut s = String::new();
    for family in Family::ALL {
        let plan = plans.iter().find(|p| p.family == family);
        let state = list(family)?;
        if state.is_none() && plan.is_none() {
            continue;
        }
        s.push_str(&script(
            family,
            state.as_ref(),
            remove,
            plan.map(|p| (name, p)),
        ));
    }
    if s.is_empty() {
        return Ok(());
    }
    nft::nft_script(&s, op)
}

/// Lets packets from 127.0.0.1 leave through the host interface that routes to `pod`.
fn enable_route_localnet(pod: IpAddr) -> Result<()> {
    let mut nl = Netlink::new()?;
    let route = nl
        .routes(true)?
        .into_iter()
        .filter(|r| r.oif.is_some() && r.dst.contains(pod))
        .max_by_key(|r| r.dst.prefix);
    // No route to the pod: nothing can reach it from here, with or without the sysctl.
    let Some(oif) = route.and_then(|r| r.oif) else {
        return Ok(());
    };
    let Some(link) = nl.link_by_index(oif)? else {
        return Ok(());
    };
    let path = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", link.name);
    if fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    fs::write(&path, "1").map_err(|e| Error::io("enable route_localnet", &path, e))
}

/// Everything an ADD/DEL/CHECK call is about.
struct Call {
    network: String,
    container_id: String,
    ifname: String,
    prev: Option<CNIResult>,
}

impl Call {
    fn from_args(args: &Args) -> Result<Self> {
        let netconf = args
            .config()
            .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
        let non_empty = |v: Option<&str>, name: &str| {
            v.filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| Error::InvalidEnv(format!("{name} is empty")))
        };
        Ok(Call {
            network: netconf.name.clone(),
            container_id: non_empty(args.container_id(), "CNI_CONTAINERID")?,
            ifname: non_empty(args.ifname(), "CNI_IFNAME")?,
            prev: netconf.prev_result.clone(),
        })
    }

    /// The attachment's name, the prefix of its chains.
    fn name(&self) -> String {
        nft::chain_name(&self.network, &self.container_id, &self.ifname)
    }

    fn prev(&self, command: &str) -> Result<&CNIResult> {
        self.prev.as_ref().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{command} needs prevResult: berth-portmap runs chained after the plugin that \
                 sets up the pod's interface"
            ))
        })
    }
}

fn stdin_config() -> Result<Config> {
    let raw: Value = serde_json::from_slice(runner::stdin_data())
        .map_err(|e| Error::InvalidConfig(format!("network configuration: {e}")))?;
    Config::from_json(&raw)
}

fn add(call: &Call, conf: &Config) -> Result<CNIResult> {
    let prev = call.prev("ADD")?;
    if conf.mappings.is_empty() {
        return Ok(prev.clone());
    }
    let plans = plans(conf, &pod_addresses(prev, &call.ifname)?);
    for plan in plans.iter().filter(|p| p.needs_route_localnet()) {
        enable_route_localnet(plan.pod.addr)?;
    }
    let name = call.name();
    apply(&|a| a == name, &name, &plans, "add port mappings")?;
    // Best effort, as in the reference plugin: the mappings work for every new flow anyway.
    let _ = forget_stale_udp_flows(&plans);
    Ok(prev.clone())
}

/// Deletes the conntrack entries of UDP flows to the host ports of `plans` that began
/// before the mappings existed (see [`conntrack`]).
fn forget_stale_udp_flows(plans: &[Plan]) -> Result<()> {
    let udp = |p: &Plan| {
        p.dnat
            .iter()
            .filter(|d| d.protocol == Protocol::Udp)
            .copied()
            .collect::<Vec<_>>()
    };
    if plans.iter().all(|p| udp(p).is_empty()) {
        return Ok(());
    }
    let local: Vec<IpAddr> = Netlink::new()?
        .all_addresses()?
        .into_iter()
        .map(|(_, a)| a.addr)
        .collect();
    for plan in plans {
        let rules = udp(plan);
        if rules.is_empty() {
            continue;
        }
        conntrack::delete_udp(plan.family == Family::V4, |dst, port| {
            rules.iter().any(|d| {
                d.host_port == port
                    && match d.host_ip {
                        Some(ip) => ip == dst,
                        None => dst.is_loopback() || local.contains(&dst),
                    }
            })
        })?;
    }
    Ok(())
}

fn del(call: &Call) -> Result<()> {
    let name = call.name();
    apply(&|a| a == name, &name, &[], "remove port mappings")
}

fn check(call: &Call, conf: &Config) -> Result<()> {
    let prev = call.prev("CHECK")?;
    if conf.mappings.is_empty() {
        return Ok(());
    }
    let name = call.name();
    let dnat_chain = format!("{name}{DNAT_SUFFIX}");
    let snat_chain = format!("{name}{SNAT_SUFFIX}");
    for plan in plans(conf, &pod_addresses(prev, &call.ifname)?) {
        let f = plan.family.table();
        let state = list(plan.family)?
            .ok_or_else(|| Error::Check(format!("table {f} {TABLE} does not exist")))?;
        if !state.chains.contains(&dnat_chain) {
            return Err(Error::Check(format!(
                "no chain {dnat_chain} in table {f} {TABLE}"
            )));
        }
        let have: BTreeSet<Dnat> = state
            .rules_of(&dnat_chain)
            .filter_map(Dnat::from_rule)
            .collect();
        let want: BTreeSet<Dnat> = plan.dnat.iter().copied().collect();
        if have != want {
            let show = |set: &BTreeSet<Dnat>| {
                set.iter()
                    .map(|d| d.rule(plan.family))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            return Err(Error::Check(format!(
                "chain {dnat_chain} has [{}], expected [{}]",
                show(&have),
                show(&want)
            )));
        }
        for base in [PREROUTING, OUTPUT] {
            if !state.jumps_to(base, &dnat_chain) {
                return Err(Error::Check(format!(
                    "chain {base} of table {f} {TABLE} does not jump to {dnat_chain}"
                )));
            }
        }
        if plan.snat.is_empty() {
            continue;
        }
        let have: BTreeSet<(Protocol, u16)> = state
            .rules_of(&snat_chain)
            .filter(|r| r.masquerade)
            .filter_map(|r| r.dport)
            .collect();
        if have != plan.snat.iter().copied().collect() || !state.jumps_to(POSTROUTING, &snat_chain)
        {
            return Err(Error::Check(format!(
                "masquerade rules of {} in chain {snat_chain} are missing",
                plan.pod.addr
            )));
        }
    }
    Ok(())
}

fn gc(network: &str, valid: &[(String, String)]) -> Result<()> {
    let prefix = nft::network_prefix(network);
    let keep: Vec<String> = valid
        .iter()
        .map(|(id, ifname)| nft::chain_name(network, id, ifname))
        .collect();
    apply(
        &|a| a.starts_with(&prefix) && !keep.iter().any(|k| k == a),
        "",
        &[],
        "remove stale port mappings",
    )
}

/// The `berth-portmap` plugin.
#[derive(Debug, Default)]
pub struct Portmap;

impl Cni for Portmap {
    fn add(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        Ok(add(&Call::from_args(&args)?, &stdin_config()?)?)
    }

    fn del(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        // The mappings are not needed to find an attachment's rules: a DEL with a broken or
        // empty runtimeConfig still cleans up.
        del(&Call::from_args(&args)?)?;
        Ok(CNIResult::default())
    }

    fn check(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        check(&Call::from_args(&args)?, &stdin_config()?)?;
        Ok(CNIResult::default())
    }

    fn status(&self, _args: Args) -> std::result::Result<(), CniError> {
        let out = Command::new("nft")
            .args(["list", "tables"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| CniError::PluginNotAvailable(format!("run nft: {e}")))?;
        if !out.status.success() {
            return Err(CniError::PluginNotAvailable(format!(
                "nft list tables: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    fn gc(&self, args: Args) -> std::result::Result<(), CniError> {
        let netconf = args
            .config()
            .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
        let valid = runner::valid_attachments(runner::stdin_data())
            .ok_or_else(|| Error::InvalidConfig("GC without cni.dev/valid-attachments".into()))?;
        gc(&netconf.name, &valid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn conf(mappings: Value, extra: Value) -> Result<Config> {
        let mut c = json!({"cniVersion": "1.0.0", "name": "net", "type": "berth-portmap",
            "runtimeConfig": {"portMappings": mappings}});
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        Config::from_json(&c)
    }

    fn err(mappings: Value, extra: Value) -> String {
        conf(mappings, extra).expect_err("must fail").to_string()
    }

    #[test]
    fn mappings_are_validated() {
        let c = conf(
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
                   {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                   {"hostPort": 53, "containerPort": 53, "protocol": "udp", "hostIP": "10.0.0.1"},
                   {"hostPort": 99, "containerPort": 99, "protocol": "sctp", "hostIP": ""},
                   {"hostPort": 1, "containerPort": 2}]),
            json!({}),
        )
        .expect("valid");
        assert!(c.snat && !c.masq_all);
        assert_eq!(
            c.mappings.len(),
            4,
            "the duplicate is dropped: {:?}",
            c.mappings
        );
        assert_eq!(c.mappings[1].host_ip, Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(c.mappings[2].protocol, Protocol::Sctp);
        assert_eq!(c.mappings[3].protocol, Protocol::Tcp, "tcp is the default");

        assert!(
            err(json!([{"hostPort": 0, "containerPort": 80}]), json!({})).contains("hostPort 0")
        );
        assert!(
            err(json!([{"hostPort": 70000, "containerPort": 80}]), json!({}))
                .contains("hostPort 70000")
        );
        assert!(
            err(json!([{"hostPort": 1, "containerPort": -1}]), json!({}))
                .contains("containerPort -1")
        );
        assert!(
            err(
                json!([{"hostPort": 1, "containerPort": 1, "protocol": "icmp"}]),
                json!({})
            )
            .contains("\"icmp\"")
        );
        assert!(
            err(
                json!([{"hostPort": 1, "containerPort": 1, "hostIP": "x"}]),
                json!({})
            )
            .contains("hostIP \"x\"")
        );
        assert!(err(json!([]), json!({"markMasqBit": 32})).contains("markMasqBit"));
        assert!(
            err(
                json!([]),
                json!({"markMasqBit": 1, "externalSetMarkChain": "KUBE-MARK"})
            )
            .contains("exclude")
        );
        assert!(err(json!([]), json!({"conditionsV4": ["-s", "1.2.3.4"]})).contains("conditions"));
        conf(
            json!([]),
            json!({"markMasqBit": 13, "backend": "iptables", "snat": false}),
        )
        .expect("accepted and ignored");
    }

    #[test]
    fn a_host_port_maps_to_one_container_port_per_address() {
        let m = |host_ip: &str, cport: u16| json!({"hostPort": 80, "containerPort": cport, "hostIP": host_ip});
        for (a, b) in [
            ("", ""),
            ("", "10.0.0.1"),
            ("0.0.0.0", "10.0.0.1"),
            ("::", "fd00::1"),
            ("10.0.0.1", "10.0.0.1"),
        ] {
            let e = err(json!([m(a, 1), m(b, 2)]), json!({}));
            assert!(
                e.contains("tcp/80 is already mapped to container port 1"),
                "{a} {b}: {e}"
            );
        }
        for (a, b) in [
            ("10.0.0.1", "10.0.0.2"),
            ("0.0.0.0", "::"),
            ("10.0.0.1", "fd00::1"),
            ("0.0.0.0", "fd00::1"),
        ] {
            conf(json!([m(a, 1), m(b, 2)]), json!({})).unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
        // Other protocol, same port: no conflict.
        conf(
            json!([{"hostPort": 80, "containerPort": 1}, {"hostPort": 80, "containerPort": 2, "protocol": "udp"}]),
            json!({}),
        )
        .expect("tcp and udp");
    }

    fn prev() -> CNIResult {
        serde_json::from_value(json!({
            "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                           {"name": "vethx", "mac": "aa:bb:cc:dd:ee:fe"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:fd", "sandbox": "/run/netns/x"},
                           {"name": "eth1", "mac": "aa:bb:cc:dd:ee:fc", "sandbox": "/run/netns/x"}],
            "ips": [{"interface": 3, "address": "10.9.0.9/24"},
                    {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
                    {"interface": 2, "address": "10.88.0.6/16"},
                    {"interface": 2, "address": "fd00::5/64"}]
        }))
        .expect("result")
    }

    #[test]
    fn pod_addresses_are_those_of_the_interface_first_per_family() {
        let ips = pod_addresses(&prev(), "eth0").expect("addresses");
        assert_eq!(
            ips,
            vec![
                "10.88.0.5/16".parse().expect("net"),
                "fd00::5/64".parse().expect("net")
            ]
        );
        assert_eq!(
            pod_addresses(&prev(), "eth1").expect("eth1"),
            vec!["10.9.0.9/24".parse().expect("net")]
        );
        assert!(pod_addresses(&CNIResult::default(), "eth0").is_err());
    }

    #[test]
    fn script_adds_one_attachment_and_removes_it_again() {
        let c = conf(
            json!([{"hostPort": 8080, "containerPort": 80},
                   {"hostPort": 8443, "containerPort": 443, "hostIP": "192.0.2.10"},
                   {"hostPort": 9000, "containerPort": 9000, "hostIP": "fd00::1"}]),
            json!({}),
        )
        .expect("conf");
        let pods = pod_addresses(&prev(), "eth0").expect("pods");
        let plans = plans(&c, &pods);
        assert_eq!(plans.len(), 2);
        assert!(plans[0].needs_route_localnet() && !plans[1].needs_route_localnet());
        let s = script(Family::V4, None, &|_| false, Some(("nA", &plans[0])));
        let dnat = s
            .lines()
            .filter(|l| l.starts_with("add rule ip berth-portmap nA-dnat"))
            .collect::<Vec<_>>();
        assert_eq!(
            dnat,
            [
                "add rule ip berth-portmap nA-dnat ip daddr 192.0.2.10 tcp dport 8443 dnat to 10.88.0.5:443",
                "add rule ip berth-portmap nA-dnat tcp dport 8080 dnat to 10.88.0.5:80",
            ],
            "{s}"
        );
        assert!(
            s.contains("nA-snat ip saddr { 10.88.0.0/16, 127.0.0.0/8 } tcp dport 80 masquerade"),
            "{s}"
        );
        assert!(
            s.contains("postrouting ip daddr 10.88.0.5 ct status dnat jump nA-snat"),
            "{s}"
        );
        assert!(
            !s.contains("9000"),
            "the IPv6 hostIP mapping is not for IPv4: {s}"
        );
        let s6 = script(Family::V6, None, &|_| false, Some(("nA", &plans[1])));
        assert!(
            s6.contains("nA-dnat ip6 daddr fd00::1 tcp dport 9000 dnat to [fd00::5]:9000"),
            "{s6}"
        );
        assert!(
            s6.contains("output fib daddr type local ip6 daddr != ::1 jump nA-dnat"),
            "{s6}"
        );
        assert!(
            s6.contains("ip6 saddr { fd00::/64 } tcp dport 80 masquerade"),
            "{s6}"
        );

        // The state nft would then print, with a second attachment.
        let rule = |chain: &str, handle: u64, jump: &str| RuleEntry {
            chain: chain.into(),
            handle,
            rule: ParsedRule {
                jump: Some(jump.into()),
                ..ParsedRule::default()
            },
        };
        let state = TableState {
            chains: [
                "prerouting",
                "output",
                "postrouting",
                "nA-dnat",
                "nA-snat",
                "nB-dnat",
            ]
            .map(String::from)
            .to_vec(),
            rules: vec![
                rule("prerouting", 5, "nA-dnat"),
                rule("prerouting", 6, "nB-dnat"),
                rule("output", 7, "nA-dnat"),
                rule("postrouting", 8, "nA-snat"),
            ],
        };
        let del = script(Family::V4, Some(&state), &|a| a == "nA", None);
        assert_eq!(
            del,
            "delete rule ip berth-portmap prerouting handle 5\n\
             delete rule ip berth-portmap output handle 7\n\
             delete rule ip berth-portmap postrouting handle 8\n\
             flush chain ip berth-portmap nA-dnat\ndelete chain ip berth-portmap nA-dnat\n\
             flush chain ip berth-portmap nA-snat\ndelete chain ip berth-portmap nA-snat\n"
        );
        let last = script(Family::V4, Some(&state), &|a| a == "nA" || a == "nB", None);
        assert_eq!(last, "delete table ip berth-portmap\n");
        assert_eq!(script(Family::V4, Some(&state), &|_| false, None), "");
        // ADD again replaces: jumps re-added once, chains flushed and kept.
        let again = script(
            Family::V4,
            Some(&state),
            &|a| a == "nA",
            Some(("nA", &plans[0])),
        );
        assert!(!again.contains("delete chain"), "{again}");
        assert!(
            again.contains("delete rule ip berth-portmap prerouting handle 5"),
            "{again}"
        );
        assert!(!again.contains("handle 6"), "{again}");
    }

    #[test]
    fn without_snat_there_is_no_masquerade_and_no_loopback() {
        let c = conf(
            json!([{"hostPort": 8080, "containerPort": 80}]),
            json!({"snat": false}),
        )
        .expect("conf");
        let plans = plans(&c, &["10.88.0.5/16".parse().expect("net")]);
        assert!(!plans[0].needs_route_localnet());
        let s = script(Family::V4, None, &|_| false, Some(("nA", &plans[0])));
        assert!(
            !s.contains("masquerade") && !s.contains("postrouting"),
            "{s}"
        );
        assert!(
            s.contains("output fib daddr type local ip daddr != 127.0.0.0/8 jump nA-dnat"),
            "{s}"
        );
        let all = conf(
            json!([{"hostPort": 8080, "containerPort": 80}]),
            json!({"masqAll": true}),
        )
        .expect("conf");
        let all = super::plans(&all, &["10.88.0.5/16".parse().expect("net")]);
        let s = script(Family::V4, None, &|_| false, Some(("nA", &all[0])));
        assert!(
            s.contains("add rule ip berth-portmap nA-snat tcp dport 80 masquerade"),
            "{s}"
        );
    }

    #[test]
    fn rules_are_read_back_from_nft_json() {
        let json = json!({"nftables": [
            {"chain": {"family": "ip6", "table": "berth-portmap", "name": "nA-dnat", "handle": 2}},
            {"rule": {"family": "ip6", "table": "berth-portmap", "chain": "nA-dnat", "handle": 6, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "fd00::1"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}},
                {"dnat": {"addr": "fd00::5", "port": 80}}]}},
            {"rule": {"family": "ip6", "table": "berth-portmap", "chain": "prerouting", "handle": 5, "expr": [
                {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "::1"}},
                {"jump": {"target": "nA-dnat"}}]}},
            {"rule": {"family": "ip6", "table": "berth-portmap", "chain": "nA-snat", "handle": 8, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                           "right": {"prefix": {"addr": "fd00::", "len": 64}}}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}},
                {"masquerade": null}]}}
        ]});
        let state = TableState::from_json(&json);
        assert_eq!(state.chains, ["nA-dnat"]);
        let dnat: Vec<Dnat> = state
            .rules_of("nA-dnat")
            .filter_map(Dnat::from_rule)
            .collect();
        assert_eq!(dnat.len(), 1);
        assert_eq!(
            dnat[0].rule(Family::V6),
            "ip6 daddr fd00::1 tcp dport 8080 dnat to [fd00::5]:80"
        );
        let jump = state.rules_of("prerouting").next().expect("jump");
        assert_eq!(jump.jump.as_deref(), Some("nA-dnat"));
        assert_eq!(jump.daddr, None, "a != match is not a host address");
        assert!(state.jumps_to("prerouting", "nA-dnat"));
        let snat = state.rules_of("nA-snat").next().expect("snat");
        assert!(snat.masquerade);
        assert_eq!(snat.dport, Some((Protocol::Udp, 53)));
        assert_eq!(state.rules[0].handle, 6);
    }

    #[test]
    fn chains_name_their_attachment() {
        assert_eq!(attachment_of("nA-dnat"), Some("nA"));
        assert_eq!(attachment_of("nA-snat"), Some("nA"));
        assert_eq!(attachment_of("prerouting"), None);
    }
}
