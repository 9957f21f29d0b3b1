//! docker's networks: user-defined bridge networks, and containers attached to several of
//! them.
//!
//! - **A user network** is a record here (id, name, subnet, gateway, internal, labels) plus a
//!   CNI conflist of its own in berth's managed dir (`docker-<12 hex of id>.conflist`, so the
//!   CNI runtime finds it by name like any other network; [`crate::network`] never takes one
//!   as the pods' default): `berth-bridge` on a bridge of its own (`br-<12 hex>`), addresses
//!   from `berth-host-local`, host ports by `berth-portmap`.
//! - **docker's `bridge` network is the CRI default network** (`berth`, on `berth0`). Why not a
//!   network of its own: containers with the default NetworkMode have always run there (their
//!   published ports, and the addresses people see in inspect, stay as they were), the default
//!   network is what berthd guarantees to exist and be ready, and docker's rules for the
//!   default bridge (no embedded DNS, links only by `/etc/hosts`) ask nothing of it that a CRI
//!   network lacks. `host` and `none` are NetworkModes, listed as docker lists them.
//! - **Containers**: the record keeps the networks a container is connected to (the first is
//!   its primary: the pod's `eth0`, with the default route and published ports); each run
//!   attaches the pod to the others as `eth1`, `eth2`… (CNI ADD in its pinned netns, the result
//!   cached per network+pod+ifname), and those are DELed before the pod is torn down (which
//!   DELs `eth0`) — from the run's record, so also after a restart of berthd.
//! - **DNS**: containers on a user network get its gateway as their resolver, where
//!   [`crate::dns`] answers with the names of containers sharing a network with the asker.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use api::cri;
use cni::plugins::ipnet::IpNet;
use cni::runtime::{CniResult, Network};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{Engine, Record, Run};
use crate::error::{Error, Result};
use crate::network::{DOCKER_NETWORK_KEY, DOCKER_NETWORK_PREFIX, POD_IFNAME};
use crate::sandbox::{NETWORK_ANNOTATION, now_ns};

/// network id → JSON [`NetworkRecord`].
pub(super) const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_networks");

/// The networks docker always has.
pub const PREDEFINED: [&str; 3] = ["bridge", "host", "none"];

/// A docker network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRecord {
    /// 64 hex digits.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `bridge` (`host`, `null` for the predefined ones).
    pub driver: String,
    /// Its subnet (empty for `host` and `none`).
    pub subnet: String,
    /// The gateway: the bridge's address.
    pub gateway: String,
    /// No way out of the subnet (no default route, no masquerading).
    pub internal: bool,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options, as docker shows them.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
    /// The CNI network's name (empty for `host` and `none`).
    pub cni_name: String,
}

impl NetworkRecord {
    /// One of `bridge`, `host`, `none`.
    pub fn is_predefined(&self) -> bool {
        PREDEFINED.contains(&self.name.as_str()) && self.id == predefined_id(&self.name)
    }

    /// A user-defined network (one with embedded DNS).
    pub fn is_user(&self) -> bool {
        !self.is_predefined()
    }
}

/// A container's connection to a network (kept while it is stopped, as docker keeps it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// The network's id.
    pub network_id: String,
    /// Its name when connected (shown if the network is gone).
    pub network_name: String,
    /// Names the container also has on this network.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// A run's interface on one network.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    /// The network's id.
    pub network_id: String,
    /// The CNI network attached to.
    pub cni_name: String,
    /// The interface in the pod (`eth0` is the pod's own, set up with the pod).
    pub ifname: String,
    /// Its IPv4 address, if any.
    pub ip: String,
    /// The address's prefix length.
    pub prefix: u8,
    /// The gateway.
    pub gateway: String,
    /// The interface's MAC address.
    pub mac: String,
}

/// What `POST /networks/create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NetworkSpec {
    /// The name.
    pub name: String,
    /// The driver (`bridge` or empty).
    pub driver: String,
    /// Subnet, if chosen.
    pub subnet: Option<String>,
    /// Gateway, if chosen.
    pub gateway: Option<String>,
    /// No external connectivity.
    pub internal: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The id docker's predefined networks have here: fixed, so clients that remember it (and
/// records that name it) stay right across restarts.
pub fn predefined_id(name: &str) -> String {
    hex::encode(sha2::Sha256::digest(format!(
        "berth predefined network {name}"
    )))
}

/// Where berth picks user networks' subnets from when none is given, in order (docker's
/// default pools, without 172.17.0.0/16, which docker's own bridge holds on most hosts).
fn pool() -> impl Iterator<Item = IpNet> {
    let b16 = (18u8..=31).map(|b| IpNet {
        addr: IpAddr::from([172, b, 0, 0]),
        prefix: 16,
    });
    let c20 = (0u8..16).map(|i| IpNet {
        addr: IpAddr::from([192, 168, i * 16, 0]),
        prefix: 20,
    });
    b16.chain(c20)
}

/// The first pool subnet overlapping none of `taken`.
pub fn pick_subnet(taken: &[IpNet]) -> Option<IpNet> {
    pool().find(|c| !taken.iter().any(|t| t.overlaps(c)))
}

/// docker's network name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn check_network_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid network name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// The conflist of a user network.
fn conflist(n: &NetworkRecord, ipam_dir: &Path) -> serde_json::Value {
    let mut range = serde_json::json!({ "subnet": n.subnet });
    if !n.gateway.is_empty() {
        range["gateway"] = serde_json::json!(n.gateway);
    }
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": n.cni_name,
        DOCKER_NETWORK_KEY: n.id,
        "plugins": [
            {
                "type": "berth-bridge",
                "bridge": bridge_name(&n.id),
                "isGateway": true,
                "isDefaultGateway": !n.internal,
                "ipMasq": !n.internal,
                "hairpinMode": true,
                "ipam": {
                    "type": "berth-host-local",
                    "ranges": [[range]],
                    "dataDir": ipam_dir,
                },
            },
            { "type": "berth-portmap", "capabilities": { "portMappings": true } },
        ],
    })
}

/// berth's table isolating docker's bridge networks from each other.
pub const ISOLATION_TABLE: &str = "berth-isolation";

/// The nft script that makes the isolation table say exactly this: traffic forwarded from
/// one of `bridges` to another is dropped (docker's DOCKER-ISOLATION rules), so containers
/// reach other networks only through interfaces of their own on them. Without two bridges
/// there is nothing to isolate and the table goes.
pub fn isolation_script(bridges: &[String]) -> String {
    // Declaring the table before deleting it makes the delete succeed when it is absent.
    let mut s = format!("table inet {ISOLATION_TABLE}\ndelete table inet {ISOLATION_TABLE}\n");
    if bridges.len() < 2 {
        return s;
    }
    s.push_str(&format!(
        "table inet {ISOLATION_TABLE} {{\n  chain forward {{\n    type filter hook forward priority filter - 1; policy accept;\n"
    ));
    for b in bridges {
        let others: Vec<String> = bridges
            .iter()
            .filter(|o| *o != b)
            .map(|o| format!("\"{o}\""))
            .collect();
        s.push_str(&format!(
            "    iifname \"{b}\" oifname {{ {} }} drop\n",
            others.join(", ")
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// The bridge device of a user network: `br-` and 12 hex digits of its id, as docker names
/// it (15 bytes, IFNAMSIZ's limit).
pub fn bridge_name(id: &str) -> String {
    format!("br-{}", &id[..12])
}

/// `net` for an interface other than the pod's first: no default route through it (the pod
/// has one already, and a second would fail the ADD), no host ports.
fn secondary(net: &Network) -> Result<Network> {
    let mut v: serde_json::Value = serde_json::from_slice(&net.to_conflist_bytes())
        .map_err(|e| Error::internal("read a network's conflist", e))?;
    if let Some(plugins) = v["plugins"].as_array_mut() {
        plugins.retain(|p| !matches!(p["type"].as_str(), Some("berth-portmap" | "portmap")));
        for p in plugins {
            if p.get("isDefaultGateway").is_some() {
                p["isDefaultGateway"] = serde_json::json!(false);
            }
        }
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| Error::internal("encode conflist", e))?;
    Network::from_conflist_bytes(&bytes).map_err(|e| Error::internal("secondary network", e))
}

/// The interface `ifname`'s address, gateway and MAC from an ADD result.
fn attached_from(r: &CniResult, network_id: &str, cni_name: &str, ifname: &str) -> Attached {
    let idx = r
        .interfaces
        .iter()
        .position(|i| i.is_sandbox() && i.name == ifname);
    let ip = r
        .ips
        .iter()
        .filter(|c| idx.is_none() || c.interface == idx)
        .find(|c| c.address.addr().is_ipv4())
        .or_else(|| r.ips.first());
    Attached {
        network_id: network_id.to_owned(),
        cni_name: cni_name.to_owned(),
        ifname: ifname.to_owned(),
        ip: ip.map(|c| c.address.addr().to_string()).unwrap_or_default(),
        prefix: ip.map_or(0, |c| c.address.prefix_len()),
        gateway: ip
            .and_then(|c| c.gateway)
            .map(|g| g.to_string())
            .unwrap_or_default(),
        mac: idx
            .and_then(|i| r.interfaces[i].mac.clone())
            .unwrap_or_default(),
    }
}

/// The host resolver's `search` and `options` lines, for containers whose nameserver is
/// berth's.
fn host_search_and_options() -> (Vec<String>, Vec<String>) {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut search = Vec::new();
    let mut options = Vec::new();
    for line in conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search" | "domain") => search = words.map(str::to_owned).collect(),
            Some("options") => options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    (search, options)
}

/// A network a run joins, resolved.
pub(super) struct Joined {
    pub net: NetworkRecord,
}

impl Engine {
    fn network_records(&self) -> Result<Vec<NetworkRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(NETWORKS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (id, v) = e?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                Error::Internal(format!("network record {} is corrupt: {e}", id.value()))
            })?);
        }
        Ok(out)
    }

    /// docker's predefined networks; `bridge` as the default CNI network is configured.
    fn predefined(&self) -> Vec<NetworkRecord> {
        let mut bridge = NetworkRecord {
            id: predefined_id("bridge"),
            name: "bridge".into(),
            driver: "bridge".into(),
            subnet: String::new(),
            gateway: String::new(),
            internal: false,
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            created_ns: 0,
            cni_name: String::new(),
        };
        if let Ok(net) = self.sandboxes.network().network() {
            bridge.cni_name = net.name().to_owned();
            if let Some(p) = net.plugins().first() {
                let raw = p.raw();
                if let Some(b) = raw.get("bridge").and_then(|b| b.as_str()) {
                    bridge
                        .options
                        .insert("com.docker.network.bridge.name".into(), b.to_owned());
                }
                let range = &raw
                    .get("ipam")
                    .map(|i| i["ranges"][0][0].clone())
                    .unwrap_or_default();
                if let Some(s) = range["subnet"].as_str() {
                    bridge.subnet = s.to_owned();
                    bridge.gateway = match range["gateway"].as_str() {
                        Some(g) => g.to_owned(),
                        None => s
                            .parse::<IpNet>()
                            .ok()
                            .and_then(|n| cni::plugins::ipnet::add(n.network(), 1))
                            .map(|g| g.to_string())
                            .unwrap_or_default(),
                    };
                }
            }
        }
        let other = |name: &str, driver: &str| NetworkRecord {
            id: predefined_id(name),
            name: name.into(),
            driver: driver.into(),
            subnet: String::new(),
            gateway: String::new(),
            internal: false,
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            created_ns: 0,
            cni_name: String::new(),
        };
        vec![bridge, other("host", "host"), other("none", "null")]
    }

    /// Every network: the predefined ones first, then the user's by creation.
    pub fn networks(&self) -> Result<Vec<NetworkRecord>> {
        let mut user = self.network_records()?;
        user.sort_by_key(|n| n.created_ns);
        let mut all = self.predefined();
        all.extend(user);
        Ok(all)
    }

    /// The network `name_or_id` names: a full id, a name, or a unique id prefix, in that
    /// order as docker looks.
    pub fn network(&self, name_or_id: &str) -> Result<NetworkRecord> {
        let all = self.networks()?;
        if let Some(n) = all.iter().find(|n| n.id == name_or_id) {
            return Ok(n.clone());
        }
        if let Some(n) = all.iter().find(|n| n.name == name_or_id) {
            return Ok(n.clone());
        }
        let found: Vec<&NetworkRecord> =
            if !name_or_id.is_empty() && name_or_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                all.iter()
                    .filter(|n| n.id.starts_with(name_or_id))
                    .collect()
            } else {
                Vec::new()
            };
        match found.as_slice() {
            [n] => Ok((*n).clone()),
            [] => Err(Error::NotFound(format!("network {name_or_id} not found"))),
            _ => Err(Error::InvalidArgument(format!(
                "network {name_or_id} is ambiguous ({} matches found based on ID prefix)",
                found.len()
            ))),
        }
    }

    /// Creates a user-defined bridge network: its conflist, then its record, then its DNS.
    pub async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkRecord> {
        check_network_name(&spec.name)?;
        if !matches!(spec.driver.as_str(), "" | "bridge") {
            return Err(Error::NotFound(format!(
                "plugin \"{}\" not found",
                spec.driver
            )));
        }
        let _held = self.net_lock.write().await;
        let all = self.networks()?;
        if PREDEFINED.contains(&spec.name.as_str()) {
            return Err(Error::Forbidden(format!(
                "{} is a pre-defined network and cannot be created",
                spec.name
            )));
        }
        if all.iter().any(|n| n.name == spec.name) {
            return Err(Error::AlreadyExists(format!(
                "network with name {} already exists",
                spec.name
            )));
        }
        let mut taken: Vec<IpNet> = all.iter().filter_map(|n| n.subnet.parse().ok()).collect();
        taken.extend(host_subnets().await);
        let subnet = match &spec.subnet {
            Some(s) => {
                let net: IpNet = s.parse().map_err(|e| {
                    Error::InvalidArgument(format!("invalid subnet {s:?}: {e}"))
                })?;
                if !net.addr.is_ipv4() {
                    return Err(Error::InvalidArgument(
                        "berth's networks take IPv4 subnets only".into(),
                    ));
                }
                let net = net.canonical();
                if all
                    .iter()
                    .filter_map(|n| n.subnet.parse::<IpNet>().ok())
                    .any(|t| t.overlaps(&net))
                {
                    return Err(Error::Forbidden(
                        "Pool overlaps with other one on this address space".into(),
                    ));
                }
                net
            }
            None => pick_subnet(&taken).ok_or_else(|| {
                Error::FailedPrecondition(
                    "could not find an available, non-overlapping IPv4 address pool among the defaults to assign to the network".into(),
                )
            })?,
        };
        let gateway = match &spec.gateway {
            Some(g) => {
                let ip: IpAddr = g
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("invalid gateway {g:?}")))?;
                if !subnet.contains(ip) {
                    return Err(Error::InvalidArgument(format!(
                        "gateway {g} is not in subnet {subnet}"
                    )));
                }
                ip
            }
            None => cni::plugins::ipnet::add(subnet.network(), 1)
                .ok_or_else(|| Error::InvalidArgument(format!("subnet {subnet} is too small")))?,
        };
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut options = BTreeMap::new();
        options.insert("com.docker.network.bridge.name".into(), bridge_name(&id));
        let n = NetworkRecord {
            cni_name: format!("{DOCKER_NETWORK_PREFIX}{}", &id[..12]),
            id,
            name: spec.name.clone(),
            driver: "bridge".into(),
            subnet: subnet.to_string(),
            gateway: gateway.to_string(),
            internal: spec.internal,
            labels: spec.labels,
            options,
            created_ns: now_ns(),
        };
        let network = self.sandboxes.network();
        let dir = network.managed_dir().to_owned();
        // The conflist first: a crash before the record leaves a conflist without one, which
        // the next start removes (see reconcile_networks).
        let file = conflist_path(&dir, &n);
        let bytes = serde_json::to_vec_pretty(&conflist(&n, &network.ipam_dir()))
            .map_err(|e| Error::internal("encode conflist", e))?;
        write_atomic(&dir, &file, &bytes)?;
        let json = serde_json::to_vec(&n).map_err(|e| Error::internal("encode network", e))?;
        let stored = (|| -> Result<()> {
            let tx = self.db.begin_write()?;
            tx.open_table(NETWORKS)?
                .insert(n.id.as_str(), json.as_slice())?;
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = stored {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        self.changed.send_modify(|v| *v += 1);
        self.apply_isolation().await;
        if let Err(e) = self.dns.listen(gateway, subnet) {
            tracing::warn!(network = %n.name, error = %e, "embedded DNS");
        }
        tracing::info!(network = %n.name, network_id = %n.id, subnet = %n.subnet, "network created");
        self.events
            .emit("network", "create", &n.id, network_attrs(&n, None));
        Ok(n)
    }

    /// Brings the isolation table in line with the networks now (under `net_lock`). A
    /// failure is logged: a network without isolation still works.
    async fn apply_isolation(&self) {
        let Ok(all) = self.networks() else { return };
        let mut bridges: Vec<String> = all
            .iter()
            .filter_map(|n| n.options.get("com.docker.network.bridge.name").cloned())
            .filter(|b| cni::plugins::netlink::is_valid_ifname(b))
            .collect();
        bridges.dedup();
        let script = isolation_script(&bridges);
        let run = async {
            use tokio::io::AsyncWriteExt;
            let mut child = tokio::process::Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(script.as_bytes()).await?;
            }
            let out = child.wait_with_output().await?;
            if out.status.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                ))
            }
        };
        match run.await {
            Ok(()) => {}
            // Nothing to isolate: only a stale table could be there, and without nft none is.
            Err(e) if bridges.len() < 2 => {
                tracing::debug!(error = %e, "clear the docker network isolation table");
            }
            Err(e) => {
                tracing::warn!(error = %e, "isolate docker networks from each other (nftables)");
            }
        }
    }

    /// Containers now running with an interface on `network_id`.
    fn active_on(&self, network_id: &str) -> Result<Vec<Record>> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|r| {
                r.run
                    .as_ref()
                    .is_some_and(|run| run.attachments.iter().any(|a| a.network_id == network_id))
            })
            .collect())
    }

    /// Removes a user network: refused while a running container is on it (docker's "active
    /// endpoints"). Its conflist, record, DNS listener and bridge go.
    pub async fn remove_network(&self, name_or_id: &str) -> Result<()> {
        let _held = self.net_lock.write().await;
        let n = self.network(name_or_id)?;
        if n.is_predefined() {
            return Err(Error::Forbidden(format!(
                "{} is a pre-defined network and cannot be removed",
                n.name
            )));
        }
        if !self.active_on(&n.id)?.is_empty() {
            return Err(Error::Forbidden(format!(
                "error while removing network: network {} id {} has active endpoints",
                n.name, n.id
            )));
        }
        let network = self.sandboxes.network();
        // The record first: a crash before the conflist goes leaves a marked conflist without
        // a record, which the next start removes (see reconcile_networks).
        let tx = self.db.begin_write()?;
        tx.open_table(NETWORKS)?.remove(n.id.as_str())?;
        tx.commit()?;
        self.changed.send_modify(|v| *v += 1);
        let file = conflist_path(network.managed_dir(), &n);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(network = %n.name, error = %e, "remove the network's conflist (removed at the next start)");
            }
        }
        if let Ok(gw) = n.gateway.parse() {
            self.dns.stop(gw);
        }
        let ipam = network.ipam_dir().join(&n.cni_name);
        let bridge = bridge_name(&n.id);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&ipam);
            delete_link(&bridge);
        })
        .await;
        self.apply_isolation().await;
        tracing::info!(network = %n.name, network_id = %n.id, "network removed");
        self.events
            .emit("network", "destroy", &n.id, network_attrs(&n, None));
        Ok(())
    }

    /// Removes the user networks no running container uses and whose labels match; returns
    /// their names.
    pub async fn prune_networks(
        &self,
        keep: impl Fn(&NetworkRecord) -> bool,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for n in self.network_records()? {
            if keep(&n) || !self.active_on(&n.id)?.is_empty() {
                continue;
            }
            if self.remove_network(&n.id).await.is_ok() {
                out.push(n.name);
            }
        }
        Ok(out)
    }

    /// Makes the managed dir's docker conflists and the network records agree again after a
    /// crash between writing one and the other: a record without its conflist (or with one
    /// from before the mark) gets it written, a marked conflist without a record goes (a
    /// create that never answered, or a remove cut short). Runs before anything is served.
    pub fn reconcile_networks(&self) -> Result<()> {
        let network = self.sandboxes.network();
        let dir = network.managed_dir().to_owned();
        let records = self.network_records()?;
        for n in &records {
            let file = conflist_path(&dir, n);
            let marked = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v[DOCKER_NETWORK_KEY].as_str() == Some(n.id.as_str()));
            if !marked {
                tracing::info!(network = %n.name, path = %file.display(), "writing a network's missing conflist");
                let bytes = serde_json::to_vec_pretty(&conflist(n, &network.ipam_dir()))
                    .map_err(|e| Error::internal("encode conflist", e))?;
                write_atomic(&dir, &file, &bytes)?;
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "conflist") {
                continue;
            }
            let Some(id) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v[DOCKER_NETWORK_KEY].as_str().map(str::to_owned))
            else {
                continue;
            };
            if records.iter().any(|n| n.id == id) {
                continue;
            }
            tracing::info!(path = %path.display(), "removing the conflist of a network that has no record");
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "remove an orphan network conflist");
            }
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                let _ = std::fs::remove_dir_all(
                    network
                        .ipam_dir()
                        .join(format!("{DOCKER_NETWORK_PREFIX}{}", &id[..12])),
                );
                // A remove cut short may have left its bridge too.
                delete_link(&bridge_name(&id));
            }
        }
        Ok(())
    }

    /// Starts the embedded DNS of every user network (berthd's start).
    pub fn start_dns(self: &Arc<Self>) -> Result<()> {
        if let Err(e) = self.reconcile_networks() {
            tracing::warn!(error = %e, "reconcile the docker networks' conflists");
        }
        self.spawn_dns_refresher();
        // The isolation table outlives berthd in the kernel, but not a reboot; and networks
        // may have changed under a berthd that was killed mid-way.
        let this = self.clone();
        tokio::spawn(async move {
            let _held = this.net_lock.write().await;
            this.apply_isolation().await;
        });
        for n in self.network_records()? {
            if let (Ok(gw), Ok(subnet)) = (n.gateway.parse(), n.subnet.parse())
                && let Err(e) = self.dns.listen(gw, subnet)
            {
                tracing::warn!(network = %n.name, error = %e, "embedded DNS");
            }
        }
        Ok(())
    }

    /// The container's networks: what the record keeps, or (records from before networks)
    /// what its NetworkMode says.
    pub fn endpoints(&self, r: &Record) -> Vec<Endpoint> {
        if !r.networks.is_empty() {
            return r.networks.clone();
        }
        match r.host_config.network() {
            "bridge" => vec![Endpoint {
                network_id: predefined_id("bridge"),
                network_name: "bridge".into(),
                aliases: Vec::new(),
            }],
            _ => Vec::new(),
        }
    }

    /// The endpoints of a new container: its NetworkMode's network first, then the others of
    /// `EndpointsConfig` (name → aliases). NotFound for a network that does not exist.
    pub(super) fn plan_endpoints(
        &self,
        mode: &str,
        wanted: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Endpoint>> {
        let mode = match mode {
            "" | "default" => "bridge",
            m => m,
        };
        if mode == "host" || mode == "none" {
            return Ok(Vec::new());
        }
        if mode.starts_with("container:") {
            return Err(Error::InvalidArgument(format!(
                "network mode {mode:?} is not supported by berth"
            )));
        }
        // The docker client names the default network `default` in EndpointsConfig too.
        let wanted: BTreeMap<&str, &Vec<String>> = wanted
            .iter()
            .map(|(k, v)| (if k == "default" { "bridge" } else { k.as_str() }, v))
            .collect();
        let mut out: Vec<Endpoint> = Vec::new();
        let primary = self.network(mode)?;
        let mut add = |n: &NetworkRecord, aliases: Vec<String>| -> Result<()> {
            if n.name == "host" || n.name == "none" {
                return Err(Error::InvalidArgument(format!(
                    "container cannot be connected to network {} and another one",
                    n.name
                )));
            }
            if !aliases.is_empty() && n.is_predefined() {
                return Err(Error::InvalidArgument(
                    "network-scoped alias is supported only for containers in user defined networks".into(),
                ));
            }
            if !out.iter().any(|e| e.network_id == n.id) {
                out.push(Endpoint {
                    network_id: n.id.clone(),
                    network_name: n.name.clone(),
                    aliases,
                });
            }
            Ok(())
        };
        let primary_aliases = wanted
            .iter()
            .find(|(k, _)| **k == mode || **k == primary.name || **k == primary.id)
            .map(|(_, a)| (*a).clone())
            .unwrap_or_default();
        add(&primary, primary_aliases)?;
        for (name, aliases) in wanted {
            let n = self.network(name)?;
            if n.id != primary.id {
                add(&n, aliases.clone())?;
            }
        }
        Ok(out)
    }

    /// The networks a run of `r` joins, each resolved; NotFound when one is gone.
    pub(super) fn joined(&self, r: &Record) -> Result<Vec<Joined>> {
        let all = self.networks()?;
        self.endpoints(r)
            .into_iter()
            .map(|e| {
                let net = all
                    .iter()
                    .find(|n| n.id == e.network_id)
                    .cloned()
                    .ok_or_else(|| {
                        Error::NotFound(format!("network {} not found", e.network_name))
                    })?;
                Ok(Joined { net })
            })
            .collect()
    }

    /// Points the pod at its primary network and, with a user network among its networks,
    /// its resolver at that network's embedded DNS (unless the container set `--dns`).
    pub(super) fn apply_networks(
        &self,
        r: &Record,
        joined: &[Joined],
        pod: &mut cri::PodSandboxConfig,
    ) {
        match joined.first() {
            Some(first) if first.net.is_user() => {
                pod.annotations
                    .insert(NETWORK_ANNOTATION.to_owned(), first.net.cni_name.clone());
            }
            Some(_) => {}
            // Disconnected from every network: loopback only, as docker leaves it.
            None if r.host_config.network() != "host" => {
                pod.annotations
                    .insert(NETWORK_ANNOTATION.to_owned(), "none".to_owned());
            }
            None => {}
        }
        let user_dns = joined.iter().find(|j| j.net.is_user());
        if let Some(j) = user_dns
            && r.host_config.dns.is_empty()
        {
            let (mut search, mut options) = host_search_and_options();
            if !r.host_config.dns_search.is_empty() {
                search = r.host_config.dns_search.clone();
            }
            if !r.host_config.dns_options.is_empty() {
                options = r.host_config.dns_options.clone();
            }
            // As docker's embedded DNS: names of other containers are tried as they are.
            if !options.iter().any(|o| o.starts_with("ndots:")) {
                options.push("ndots:0".into());
            }
            pod.dns_config = Some(cri::DnsConfig {
                servers: vec![j.net.gateway.clone()],
                searches: search,
                options,
            });
        }
    }

    /// After the pod is up: what `eth0` got, and the other networks attached as `eth1`…
    /// On failure every interface this added is gone again (the pod's own is the caller's).
    pub(super) async fn attach_networks(
        &self,
        sandbox_id: &str,
        joined: &[Joined],
    ) -> Result<Vec<Attached>> {
        let mut out = Vec::new();
        let Some((first, rest)) = joined.split_first() else {
            return Ok(out);
        };
        let sandbox = self.sandboxes.get(sandbox_id)?;
        let network = self.sandboxes.network();
        if let Some(cni_name) = &sandbox.network
            && let Some(res) = network
                .cached_result(cni_name, sandbox_id, POD_IFNAME)
                .await
        {
            out.push(attached_from(&res, &first.net.id, cni_name, POD_IFNAME));
        }
        let netns = sandbox
            .ns_path("net")
            .ok_or_else(|| Error::Internal("the pod has no network namespace".into()))?
            .to_path_buf();
        for (i, j) in rest.iter().enumerate() {
            let ifname = format!("eth{}", i + 1);
            match self.attach_one(sandbox_id, &netns, &j.net, &ifname).await {
                Ok(a) => out.push(a),
                Err(e) => {
                    self.detach_attachments(sandbox_id, Some(&netns), &out)
                        .await;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    async fn attach_one(
        &self,
        sandbox_id: &str,
        netns: &Path,
        n: &NetworkRecord,
        ifname: &str,
    ) -> Result<Attached> {
        let network = self.sandboxes.network();
        let net = secondary(&*network.named(&n.cni_name)?)?;
        match network.attach_ifname(&net, sandbox_id, netns, ifname).await {
            Ok(res) => Ok(attached_from(&res, &n.id, &n.cni_name, ifname)),
            Err(e) => {
                // A failed ADD caches nothing and may have left a veth or an address.
                if let Err(de) = network
                    .detach_ifname(&net, sandbox_id, Some(netns), ifname)
                    .await
                {
                    tracing::warn!(sandbox_id, network = %n.name, error = %de, "roll back a failed attach");
                }
                Err(Error::Internal(format!(
                    "failed to attach to network {}: {e}",
                    n.name
                )))
            }
        }
    }

    /// DELs the run's interfaces other than the pod's own `eth0` (the pod's teardown DELs
    /// that one). From the result cache, so it works with the network gone. Logs failures.
    pub(super) async fn detach_attachments(
        &self,
        sandbox_id: &str,
        netns: Option<&Path>,
        attachments: &[Attached],
    ) {
        let network = self.sandboxes.network();
        for a in attachments.iter().filter(|a| a.ifname != POD_IFNAME) {
            if let Err(e) = detach_cached(network, &a.cni_name, sandbox_id, netns, &a.ifname).await
            {
                tracing::warn!(sandbox_id, network = %a.cni_name, ifname = %a.ifname, error = %e, "detach a network");
            }
        }
    }

    /// The run's extra interfaces, DELed before its pod goes.
    pub(super) async fn detach_run(&self, run: &Run) {
        if run.attachments.iter().all(|a| a.ifname == POD_IFNAME) {
            return;
        }
        let netns = self
            .sandboxes
            .get(&run.sandbox_id)
            .ok()
            .and_then(|s| s.ns_path("net").map(Path::to_path_buf));
        self.detach_attachments(&run.sandbox_id, netns.as_deref(), &run.attachments)
            .await;
    }

    /// `docker network connect`: the container joins `network` (at once, if it runs).
    pub async fn connect(
        &self,
        network: &str,
        container: &str,
        aliases: Vec<String>,
    ) -> Result<()> {
        let r = self.get(container)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        // Shared until the ADD is done: the network cannot be removed in between.
        let _networks = self.net_lock.read().await;
        let n = self.network(network)?;
        let mut r = self.get(&r.id)?;
        let mode = r.host_config.network();
        if mode == "host" || mode == "none" || n.name == "host" || n.name == "none" {
            return Err(Error::Forbidden(
                "container cannot be disconnected from host network or connected to host network"
                    .into(),
            ));
        }
        let mut endpoints = self.endpoints(&r);
        if endpoints.iter().any(|e| e.network_id == n.id) {
            return Err(Error::Forbidden(format!(
                "endpoint with name {} already exists in network {}",
                r.name, n.name
            )));
        }
        if !aliases.is_empty() && n.is_predefined() {
            return Err(Error::InvalidArgument(
                "network-scoped alias is supported only for containers in user defined networks"
                    .into(),
            ));
        }
        let endpoint = Endpoint {
            network_id: n.id.clone(),
            network_name: n.name.clone(),
            aliases,
        };
        if r.running()
            && let Some(run) = r.run.clone()
        {
            let sandbox = self.sandboxes.get(&run.sandbox_id)?;
            let netns = sandbox
                .ns_path("net")
                .ok_or_else(|| Error::Internal("the pod has no network namespace".into()))?
                .to_path_buf();
            // Never `eth0`, even when the primary network was disconnected: `eth0` is the
            // pod's own, which its teardown DELs on the pod's network, and which
            // detach_attachments leaves to it.
            let ifname = (1..)
                .map(|i| format!("eth{i}"))
                .find(|name| !run.attachments.iter().any(|a| &a.ifname == name))
                .unwrap_or_default();
            // Recorded before the ADD: a crash in the middle leaves an interface the run's
            // teardown knows to DEL (a DEL of what never got set up is harmless).
            let pending = Attached {
                network_id: n.id.clone(),
                cni_name: n.cni_name.clone(),
                ifname: ifname.clone(),
                ..Attached::default()
            };
            let with = |a: Option<Attached>| {
                let mut r = r.clone();
                if let Some(run) = r.run.as_mut() {
                    run.attachments.extend(a);
                }
                r
            };
            self.put(&with(Some(pending)))?;
            match self.attach_one(&run.sandbox_id, &netns, &n, &ifname).await {
                Ok(a) => r = with(Some(a)),
                Err(e) => {
                    self.put(&with(None))?;
                    return Err(e);
                }
            }
        }
        endpoints.push(endpoint);
        r.networks = endpoints;
        if let Err(e) = self.put(&r) {
            if let Some(run) = &r.run
                && let Some(a) = run.attachments.last().filter(|a| a.network_id == n.id)
            {
                self.detach_attachments(&run.sandbox_id, None, std::slice::from_ref(a))
                    .await;
            }
            return Err(e);
        }
        self.events
            .emit("network", "connect", &n.id, network_attrs(&n, Some(&r.id)));
        Ok(())
    }

    /// `docker network disconnect`: the container leaves `network` (its interface goes at
    /// once, if it runs).
    pub async fn disconnect(&self, network: &str, container: &str, force: bool) -> Result<()> {
        let n = self.network(network)?;
        let r = match self.get(container) {
            Ok(r) => r,
            // docker: force disconnects an endpoint whose container is gone.
            Err(Error::NotFound(_)) if force => return Ok(()),
            Err(e) => return Err(e),
        };
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let mut r = self.get(&r.id)?;
        let mut endpoints = self.endpoints(&r);
        let before = endpoints.len();
        endpoints.retain(|e| e.network_id != n.id);
        if endpoints.len() == before {
            return Err(Error::Forbidden(format!(
                "container {} is not connected to network {}",
                r.id, n.name
            )));
        }
        if let Some(run) = r.run.as_mut() {
            let gone: Vec<Attached> = run
                .attachments
                .iter()
                .filter(|a| a.network_id == n.id)
                .cloned()
                .collect();
            let netns = self
                .sandboxes
                .get(&run.sandbox_id)
                .ok()
                .and_then(|s| s.ns_path("net").map(Path::to_path_buf));
            let network = self.sandboxes.network();
            for a in &gone {
                detach_cached(
                    network,
                    &a.cni_name,
                    &run.sandbox_id,
                    netns.as_deref(),
                    &a.ifname,
                )
                .await?;
            }
            run.attachments.retain(|a| a.network_id != n.id);
        }
        r.networks = endpoints;
        if r.networks.is_empty() {
            // An empty list reads as "NetworkMode's network" (records from before networks).
            r.host_config.network_mode = "none".into();
        }
        self.put(&r)?;
        self.events.emit(
            "network",
            "disconnect",
            &n.id,
            network_attrs(&n, Some(&r.id)),
        );
        Ok(())
    }

    /// The running containers with an interface on `network_id`, and that interface.
    pub fn network_containers(&self, network_id: &str) -> Result<Vec<(Record, Attached)>> {
        let mut out = Vec::new();
        for r in self.all()? {
            let Some(run) = &r.run else { continue };
            if let Some(a) = run.attachments.iter().find(|a| a.network_id == network_id) {
                let a = a.clone();
                out.push((r, a));
            }
        }
        Ok(out)
    }
}

impl Engine {
    /// `/etc/hosts` lines of the container's `--link`s (`/db:/web/alias` or `db:alias`):
    /// the linked container's address with the alias and its name. Links to containers that
    /// do not run are left out, as their addresses are unknown.
    pub(super) fn link_hosts(&self, r: &Record) -> String {
        let mut out = String::new();
        for link in &r.host_config.links {
            let (name, alias) = link.split_once(':').unwrap_or((link, link));
            let name = name.trim_start_matches('/');
            let alias = alias.rsplit('/').next().unwrap_or(alias);
            let Ok(other) = self.get(name) else { continue };
            let Some(run) = &other.run else { continue };
            let ip = run
                .attachments
                .first()
                .map(|a| a.ip.clone())
                .or_else(|| run.ips.first().cloned())
                .unwrap_or_default();
            if ip.is_empty() {
                continue;
            }
            if alias == other.name {
                out.push_str(&format!("{ip}\t{alias} {}\n", &other.id[..12]));
            } else {
                out.push_str(&format!(
                    "{ip}\t{alias} {} {}\n",
                    &other.id[..12],
                    other.name
                ));
            }
        }
        out
    }
}

/// The names the embedded DNS answers, by network: built from the records in one pass, so a
/// query is a few hash lookups and never reads the store.
#[derive(Debug)]
pub struct DnsIndex {
    /// The value of the engine's `changed` it was built at.
    version: u64,
    /// A container's address → the user networks that container is on.
    nets_of: HashMap<IpAddr, Vec<String>>,
    /// (network id, lowercase name, short id or alias) → the addresses of running containers.
    names: HashMap<(String, String), Vec<IpAddr>>,
    /// (network id, address) → `<container name>.<network name>`.
    ptr: HashMap<(String, IpAddr), String>,
}

impl Default for DnsIndex {
    fn default() -> Self {
        DnsIndex {
            // Stale whatever `changed` says: the first query builds it.
            version: u64::MAX,
            nets_of: HashMap::new(),
            names: HashMap::new(),
            ptr: HashMap::new(),
        }
    }
}

impl DnsIndex {
    /// The index of `records` on the user networks `users`.
    pub fn build(version: u64, records: &[Record], users: &[NetworkRecord]) -> DnsIndex {
        let user_name = |id: &str| users.iter().find(|n| n.id == id).map(|n| n.name.as_str());
        let mut index = DnsIndex {
            version,
            ..DnsIndex::default()
        };
        // Running containers first: an address a stopped run still lists is the live one's.
        let mut ordered: Vec<&Record> = records.iter().filter(|r| r.run.is_some()).collect();
        ordered.sort_by_key(|r| !r.running());
        for r in ordered {
            let Some(run) = &r.run else { continue };
            let mine: Vec<String> = run
                .attachments
                .iter()
                .filter(|a| user_name(&a.network_id).is_some())
                .map(|a| a.network_id.clone())
                .collect();
            for a in &run.attachments {
                let (Some(net_name), Ok(ip)) = (user_name(&a.network_id), a.ip.parse::<IpAddr>())
                else {
                    continue;
                };
                index.nets_of.entry(ip).or_insert_with(|| mine.clone());
                index
                    .ptr
                    .entry((a.network_id.clone(), ip))
                    .or_insert_with(|| format!("{}.{net_name}", r.name));
                if !r.running() {
                    continue;
                }
                let aliases = r
                    .networks
                    .iter()
                    .find(|e| e.network_id == a.network_id)
                    .map(|e| e.aliases.as_slice())
                    .unwrap_or_default();
                let short = r.id.get(..12).unwrap_or(&r.id);
                let mut names: Vec<String> = [r.name.as_str(), short]
                    .into_iter()
                    .chain(aliases.iter().map(String::as_str))
                    .map(str::to_ascii_lowercase)
                    .collect();
                names.dedup();
                for name in names {
                    let ips = index.names.entry((a.network_id.clone(), name)).or_default();
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
        index
    }

    /// Addresses of `name` for the container at `asker`.
    pub fn lookup(&self, asker: IpAddr, name: &str) -> Option<Vec<IpAddr>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut ips: Vec<IpAddr> = Vec::new();
        for net in self.nets_of.get(&asker)? {
            if let Some(found) = self.names.get(&(net.clone(), name.clone())) {
                for ip in found {
                    if !ips.contains(ip) {
                        ips.push(*ip);
                    }
                }
            }
        }
        (!ips.is_empty()).then_some(ips)
    }

    /// The name of `addr` for the container at `asker`.
    pub fn reverse(&self, asker: IpAddr, addr: IpAddr) -> Option<String> {
        self.nets_of
            .get(&asker)?
            .iter()
            .find_map(|net| self.ptr.get(&(net.clone(), addr)).cloned())
    }
}

impl Engine {
    /// The DNS index as of now. Rebuilt here only when a change has not reached it yet (the
    /// refresher started by [`Engine::start_dns`] rebuilds it after every change).
    fn dns_index(&self) -> Arc<DnsIndex> {
        let now = *self.changed.borrow();
        let current = self
            .dns_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.version == now {
            return current;
        }
        self.rebuild_dns_index().unwrap_or(current)
    }

    /// Builds the DNS index from the store and installs it (unless a newer one is there).
    fn rebuild_dns_index(&self) -> Option<Arc<DnsIndex>> {
        // Read before the records: a change in between leaves the index marked stale.
        let version = *self.changed.borrow();
        let records = self
            .all()
            .inspect_err(|e| tracing::warn!(error = %e, "embedded DNS: read the containers"))
            .ok()?;
        let users = self
            .network_records()
            .inspect_err(|e| tracing::warn!(error = %e, "embedded DNS: read the networks"))
            .ok()?;
        let index = Arc::new(DnsIndex::build(version, &records, &users));
        let mut slot = self.dns_index.write().unwrap_or_else(|p| p.into_inner());
        if slot.version == u64::MAX || slot.version <= version {
            *slot = index.clone();
        }
        Some(index)
    }

    /// Keeps the DNS index up to date with the records: one rebuild per batch of changes, off
    /// the async workers.
    fn spawn_dns_refresher(self: &Arc<Self>) {
        let mut changed = self.changed.subscribe();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            // Once now, then after each change (changes made during a rebuild make one more).
            changed.mark_changed();
            while changed.changed().await.is_ok() {
                let Some(engine) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || engine.rebuild_dns_index()).await;
            }
        });
    }
}

impl crate::dns::Names for Engine {
    fn lookup(&self, asker: IpAddr, name: &str) -> Option<Vec<IpAddr>> {
        self.dns_index().lookup(asker, name)
    }

    fn reverse(&self, asker: IpAddr, addr: IpAddr) -> Option<String> {
        self.dns_index().reverse(asker, addr)
    }
}

fn network_attrs(n: &NetworkRecord, container: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("name".into(), n.name.clone());
    m.insert("type".into(), n.driver.clone());
    if let Some(c) = container {
        m.insert("container".into(), c.to_owned());
    }
    m
}

/// DEL of one interface from its cache entry, else with the network's current config.
async fn detach_cached(
    network: &crate::network::PodNetwork,
    cni_name: &str,
    sandbox_id: &str,
    netns: Option<&Path>,
    ifname: &str,
) -> Result<()> {
    match network.named(cni_name) {
        Ok(net) => {
            let net = secondary(&net)?;
            network.detach_ifname(&net, sandbox_id, netns, ifname).await
        }
        // The conflist is gone: only the cache entry can tell the plugins what to undo.
        Err(_) => {
            network
                .detach_cached_ifname(cni_name, sandbox_id, netns, ifname)
                .await
        }
    }
}

/// The subnets of the host's addresses (berthd's network namespace), which a new network
/// must not overlap.
async fn host_subnets() -> Vec<IpNet> {
    tokio::task::spawn_blocking(|| {
        cni::plugins::netlink::Netlink::new()
            .and_then(|mut nl| nl.all_addresses())
            .map(|addrs| {
                addrs
                    .into_iter()
                    .map(|(_, a)| a.canonical())
                    .filter(|a| a.addr.is_ipv4() && !a.addr.is_loopback())
                    .collect()
            })
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// Deletes a network device, if it is there.
fn delete_link(name: &str) {
    let deleted =
        cni::plugins::netlink::Netlink::new().and_then(|mut nl| match nl.link_by_name(name)? {
            Some(link) => nl.del_link(link.index),
            None => Ok(()),
        });
    if let Err(e) = deleted {
        tracing::warn!(bridge = name, error = %e, "delete a network's bridge");
    }
}

/// Where a user network's conflist is.
fn conflist_path(managed: &Path, n: &NetworkRecord) -> std::path::PathBuf {
    managed.join(format!("{}.conflist", n.cni_name))
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::internal(what, e);
    std::fs::create_dir_all(dir).map_err(|e| io("create the managed network dir", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| io("write a network conflist", e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("sync a network conflist", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("install a network conflist", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("subnet")
    }

    #[test]
    fn subnets_are_picked_free_in_pool_order() {
        assert_eq!(pick_subnet(&[]), Some(net("172.18.0.0/16")));
        assert_eq!(
            pick_subnet(&[net("172.18.0.0/16"), net("172.19.5.0/24")]),
            Some(net("172.20.0.0/16"))
        );
        // A host address inside a candidate takes it out.
        assert_eq!(
            pick_subnet(&[net("172.16.0.0/12")]),
            Some(net("192.168.0.0/20"))
        );
        let everything = [net("172.16.0.0/12"), net("192.168.0.0/16")];
        assert_eq!(pick_subnet(&everything), None);
    }

    #[test]
    fn isolation_drops_traffic_between_bridges_only() {
        let none = isolation_script(&["berth0".into()]);
        assert_eq!(
            none,
            "table inet berth-isolation\ndelete table inet berth-isolation\n"
        );
        let two = isolation_script(&["berth0".into(), "br-1".into(), "br-2".into()]);
        assert!(
            two.contains("iifname \"berth0\" oifname { \"br-1\", \"br-2\" } drop"),
            "{two}"
        );
        assert!(
            two.contains("iifname \"br-2\" oifname { \"berth0\", \"br-1\" } drop"),
            "{two}"
        );
        assert!(two.contains("policy accept"));
    }

    #[test]
    fn names_and_ids() {
        for ok in ["a", "my-net", "n.1_x"] {
            assert!(check_network_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a b", "a/b"] {
            assert!(check_network_name(bad).is_err(), "{bad}");
        }
        assert_eq!(predefined_id("bridge").len(), 64);
        assert_ne!(predefined_id("bridge"), predefined_id("host"));
        assert_eq!(bridge_name(&predefined_id("x")).len(), 15);
    }

    #[test]
    fn secondary_attachments_have_no_default_route_or_ports() {
        let n = NetworkRecord {
            id: predefined_id("x"),
            name: "x".into(),
            driver: "bridge".into(),
            subnet: "172.18.0.0/16".into(),
            gateway: "172.18.0.1".into(),
            internal: false,
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            created_ns: 0,
            cni_name: "docker-x".into(),
        };
        let bytes = serde_json::to_vec(&conflist(&n, Path::new("/run/ipam"))).expect("json");
        let primary = Network::from_conflist_bytes(&bytes).expect("network");
        assert_eq!(primary.plugins().len(), 2);
        let s = secondary(&primary).expect("secondary");
        assert_eq!(s.name(), "docker-x");
        assert_eq!(s.plugins().len(), 1);
        assert_eq!(s.plugins()[0].raw()["isDefaultGateway"], false);
    }

    fn user_net(name: &str) -> NetworkRecord {
        NetworkRecord {
            id: predefined_id(&format!("user {name}")),
            name: name.into(),
            driver: "bridge".into(),
            subnet: String::new(),
            gateway: String::new(),
            internal: false,
            labels: BTreeMap::new(),
            options: BTreeMap::new(),
            created_ns: 0,
            cni_name: format!("docker-{name}"),
        }
    }

    fn container(name: &str, running: bool, on: &[(&NetworkRecord, &str, &[&str])]) -> Record {
        let id = predefined_id(&format!("container {name}"));
        Record {
            id,
            name: name.into(),
            created_ns: 0,
            image: String::new(),
            image_id: String::new(),
            config: Default::default(),
            host_config: Default::default(),
            state: super::super::RunState {
                status: if running {
                    super::super::Status::Running
                } else {
                    super::super::Status::Exited
                },
                ..Default::default()
            },
            restart_count: 0,
            manual_stop: false,
            run: Some(Run {
                sandbox_id: String::new(),
                container_id: String::new(),
                ips: vec![],
                ports: vec![],
                attachments: on
                    .iter()
                    .map(|(n, ip, _)| Attached {
                        network_id: n.id.clone(),
                        ip: (*ip).to_owned(),
                        ..Attached::default()
                    })
                    .collect(),
            }),
            log_path: Default::default(),
            networks: on
                .iter()
                .map(|(n, _, aliases)| Endpoint {
                    network_id: n.id.clone(),
                    network_name: n.name.clone(),
                    aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn dns_index_answers_names_on_shared_networks_only() {
        let (a, b) = (user_net("a"), user_net("b"));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let records = vec![
            container("web", true, &[(&a, "172.18.0.2", &["Svc"])]),
            container(
                "db",
                true,
                &[(&a, "172.18.0.3", &[]), (&b, "172.19.0.2", &[])],
            ),
            container("lone", true, &[(&b, "172.19.0.3", &[])]),
            container("gone", false, &[(&a, "172.18.0.9", &[])]),
        ];
        // A network that is not a user network (the default bridge) is not indexed.
        let index = DnsIndex::build(7, &records, &[a.clone(), b.clone()]);
        let web = ip("172.18.0.2");
        assert_eq!(index.lookup(web, "db"), Some(vec![ip("172.18.0.3")]));
        assert_eq!(index.lookup(web, "SVC."), Some(vec![web]));
        let short = &records[0].id[..12];
        assert_eq!(
            index.lookup(ip("172.19.0.3"), short),
            None,
            "lone shares no network with web"
        );
        // A container's networks are all its interfaces' networks, whichever address asks.
        assert_eq!(index.lookup(ip("172.19.0.2"), short), Some(vec![web]));
        assert_eq!(index.lookup(ip("172.18.0.3"), short), Some(vec![web]));
        // Not sharing a network, and a stopped container's name.
        assert_eq!(index.lookup(web, "lone"), None);
        assert_eq!(index.lookup(web, "gone"), None);
        assert_eq!(index.lookup(ip("10.0.0.1"), "web"), None);
        assert_eq!(
            index.reverse(web, ip("172.18.0.3")),
            Some("db.a".to_owned())
        );
        assert_eq!(index.reverse(web, ip("172.19.0.3")), None);
        assert_eq!(index.version, 7);
        assert_eq!(DnsIndex::build(0, &records, &[]).lookup(web, "db"), None);
    }
}
