//! Masquerading of pod traffic with nftables, one chain per attachment.
//!
//! Rules live in berth's own tables, `table ip berth-nat` and `table ip6 berth-nat`, never
//! in anyone else's:
//!
//! ```text
//! table ip berth-nat {
//!     map masq { type ipv4_addr : verdict }         # pod address -> its chain
//!     chain postrouting { type nat hook postrouting priority srcnat; ip saddr vmap @masq }
//!     chain n<network hash>-<attachment hash> {     # one per (network, container, ifname)
//!         ip daddr 10.88.0.0/16 accept              # traffic inside the pod subnet is not NATed
//!         ip daddr 10.244.0.0/16 accept             # nor to any `nonMasqueradeCIDRs` network
//!         ip daddr != 224.0.0.0/4 masquerade
//!     }
//! }
//! ```
//!
//! So DEL removes exactly one attachment's chain and map elements, GC finds a network's
//! chains by their prefix, and adding a pod is one atomic `nft -f -` transaction. When the last
//! attachment goes, the table goes too: nothing of berth's stays in the ruleset. Plugins hold
//! [`LOCK_FILE`] (as iptables holds /run/xtables.lock) from reading the table to changing it, so
//! a removal never deletes a table a concurrent ADD just filled.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::ipnet::IpNet;
use super::{Error, Result};

/// The name of berth's NAT tables (one per address family).
pub const TABLE: &str = "berth-nat";
/// Serialises berth's nftables changes across plugin processes.
pub const LOCK_FILE: &str = "/run/berth-nat.lock";
const MAP: &str = "masq";
const POSTROUTING: &str = "postrouting";

/// An nftables address family of berth's tables: `ip` or `ip6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub(crate) fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// The nftables family keyword (`ip`, `ip6`), also the address match keyword.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

/// FNV-1a: a stable short hash for chain names (no cryptographic need).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The prefix of all chain names of `network`.
pub fn network_prefix(network: &str) -> String {
    format!("n{:08x}-", fnv(&[network]) as u32)
}

/// The chain name of one attachment.
pub fn chain_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!(
        "{}{:016x}",
        network_prefix(network),
        fnv(&[network, container_id, ifname])
    )
}

/// Masquerades traffic from each of `addrs` (pod address and subnet) to outside its subnet
/// and outside every network of `keep` (destinations reached with the pod's own address).
pub fn add(
    network: &str,
    container_id: &str,
    ifname: &str,
    addrs: &[IpNet],
    keep: &[IpNet],
) -> Result<()> {
    let _lock = lock()?;
    let chain = chain_name(network, container_id, ifname);
    let mut script = String::new();
    for family in Family::ALL {
        let mine: Vec<&IpNet> = addrs
            .iter()
            .filter(|a| Family::of(a.addr) == family)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (t, f) = (TABLE, family.table());
        // Re-declaring the base chain and re-writing its one rule keeps setup idempotent
        // and atomic however many plugins run at once.
        script.push_str(&format!(
            "add table {f} {t}\n\
             add map {f} {t} {MAP} {{ type {ty} : verdict; }}\n\
             add chain {f} {t} {POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain {f} {t} {POSTROUTING}\n\
             add rule {f} {t} {POSTROUTING} {f} saddr vmap @{MAP}\n\
             add chain {f} {t} {chain}\n\
             flush chain {f} {t} {chain}\n",
            ty = family.addr_type()
        ));
        let own = keep.iter().filter(|k| Family::of(k.addr) == family);
        for a in mine.iter().copied().chain(own) {
            script.push_str(&format!(
                "add rule {f} {t} {chain} {f} daddr {} accept\n",
                a.canonical()
            ));
        }
        script.push_str(&format!(
            "add rule {f} {t} {chain} {f} daddr != {} masquerade\n",
            family.multicast()
        ));
        for a in &mine {
            script.push_str(&format!(
                "add element {f} {t} {MAP} {{ {} : jump {chain} }}\n",
                a.addr
            ));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    nft_script(&script, "add masquerade rules")
}

/// Removes one attachment's chain and map elements. Nothing there is success.
pub fn del(network: &str, container_id: &str, ifname: &str) -> Result<()> {
    let chain = chain_name(network, container_id, ifname);
    remove_chains(|name| name == chain)
}

/// Removes every chain of `network` whose attachment is not in `valid`.
pub fn gc(network: &str, valid: &[(String, String)]) -> Result<()> {
    let prefix = network_prefix(network);
    let keep: Vec<String> = valid
        .iter()
        .map(|(id, ifname)| chain_name(network, id, ifname))
        .collect();
    remove_chains(|name| name.starts_with(&prefix) && !keep.iter().any(|k| k == name))
}

/// The pod addresses that jump to the attachment's chain (empty if it has none).
pub fn addresses(network: &str, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
    let chain = chain_name(network, container_id, ifname);
    let mut out = Vec::new();
    for family in Family::ALL {
        let Some(state) = list(family)? else {
            continue;
        };
        if state.chains.contains(&chain) {
            out.extend(
                state
                    .elements
                    .iter()
                    .filter(|(_, c)| *c == chain)
                    .map(|(ip, _)| *ip),
            );
        }
    }
    Ok(out)
}

fn remove_chains(matches: impl Fn(&str) -> bool) -> Result<()> {
    let _lock = lock()?;
    let mut script = String::new();
    for family in Family::ALL {
        let Some(state) = list(family)? else {
            continue;
        };
        let (t, f) = (TABLE, family.table());
        let last = state.chains.iter().all(|c| c == POSTROUTING || matches(c))
            && state.elements.iter().all(|(_, chain)| matches(chain));
        if last {
            script.push_str(&format!("delete table {f} {t}\n"));
            continue;
        }
        let elements: Vec<String> = state
            .elements
            .iter()
            .filter(|(_, chain)| matches(chain))
            .map(|(ip, _)| ip.to_string())
            .collect();
        if !elements.is_empty() {
            script.push_str(&format!(
                "delete element {f} {t} {MAP} {{ {} }}\n",
                elements.join(", ")
            ));
        }
        for chain in state.chains.iter().filter(|c| matches(c)) {
            script.push_str(&format!(
                "flush chain {f} {t} {chain}\ndelete chain {f} {t} {chain}\n"
            ));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    nft_script(&script, "remove masquerade rules")
}

/// Takes berth's nftables lock (blocking); released when the file is dropped.
pub(crate) fn lock() -> Result<std::fs::File> {
    let err = |e: std::io::Error| Error::Nft {
        op: format!("lock {LOCK_FILE}"),
        detail: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_FILE)
        .map_err(err)?;
    file.lock().map_err(err)?;
    Ok(file)
}

struct TableState {
    chains: Vec<String>,
    elements: Vec<(IpAddr, String)>,
}

/// Table `table` of `family` as `nft -j` prints it (with rule handles if `handles`);
/// `None` if there is no such table.
pub(crate) fn list_json(family: Family, table: &str, handles: bool) -> Result<Option<Value>> {
    let mut cmd = Command::new("nft");
    if handles {
        cmd.arg("-a");
    }
    let out = cmd
        .args(["-j", "list", "table", family.table(), table])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Nft {
            op: "run nft list".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(Error::Nft {
            op: format!("list table {} {table}", family.table()),
            detail: stderr.trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Nft {
            op: "parse nft -j output".into(),
            detail: e.to_string(),
        })
}

/// The chains and map elements of our table of `family`; `None` if there is no table.
fn list(family: Family) -> Result<Option<TableState>> {
    let Some(json) = list_json(family, TABLE, false)? else {
        return Ok(None);
    };
    let mut state = TableState {
        chains: Vec::new(),
        elements: Vec::new(),
    };
    for item in json["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item["chain"]["name"].as_str() {
            state.chains.push(name.to_string());
        }
        if item["map"]["name"] == MAP {
            for elem in item["map"]["elem"].as_array().into_iter().flatten() {
                let ip = elem[0].as_str().and_then(|s| s.parse().ok());
                let target = elem[1]["jump"]["target"].as_str();
                if let (Some(ip), Some(target)) = (ip, target) {
                    state.elements.push((ip, target.to_string()));
                }
            }
        }
    }
    Ok(Some(state))
}

/// Runs `script` with `nft -f -`: one atomic transaction. `op` names it in errors.
pub(crate) fn nft_script(script: &str, op: &str) -> Result<()> {
    let err = |detail: String| Error::Nft {
        op: op.to_string(),
        detail,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(format!("write nft script: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("wait for nft: {e}")))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_stable_and_grouped_by_network() {
        let a = chain_name("net", "c1", "eth0");
        assert_eq!(a, chain_name("net", "c1", "eth0"));
        assert_ne!(a, chain_name("net", "c1", "eth1"));
        assert_ne!(a, chain_name("net", "c2", "eth0"));
        assert!(a.starts_with(&network_prefix("net")));
        assert!(!chain_name("other", "c1", "eth0").starts_with(&network_prefix("net")));
        assert_eq!(a.len(), 1 + 8 + 1 + 16);
    }
}
