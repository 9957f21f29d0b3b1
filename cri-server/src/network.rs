//! Pod networking: attaching pod sandboxes to the default CNI network, as containerd's and
//! CRI-O's CRI plugins do.
//!
//! - **Networks** come from the configured conf dirs, then berth's managed dir
//!   (`<root>/networks`). The first valid network is the pods' network. When no config file
//!   exists at all, berthd writes its own `berth` network there at start ([`DEFAULT_FILE`]:
//!   `berth-bridge` on `berth0`, `10.88.0.0/16` from `berth-host-local`, host ports by
//!   `berth-portmap`), so a fresh install has pod networking with no set-up. A broken config
//!   is never replaced: the runtime reports NetworkReady=false with the reason instead.
//! - **Plugins** are looked up in the configured bin dirs, then in the dir berthd runs from.
//! - **Attach** (RunPodSandbox) runs the chain's ADDs for interface `eth0` of the pod's pinned
//!   network namespace with the Kubernetes `CNI_ARGS`, the pod's host ports (`portMappings`),
//!   DNS config (`dns`) and the node's pod CIDR (`ipRanges`, from UpdateRuntimeConfig).
//!   **Detach** (StopPodSandbox, rollback, recovery) runs DEL from the result cache, so it
//!   tears down what ADD set up even when the config changed since or berthd restarted.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::cri;
use cni::plugins::bridge::NETNS_DISPOSED_ARG;
use cni::runtime::{
    Attachment, Bandwidth, Cni, CniConfig, CniResult, DnsConfig, GcAttachment, IpRange, Network,
    NotReady, PortMapping,
};
use serde_json::json;

use crate::config::CniSection;
use crate::error::{Error, Result};

/// The pod's interface name, as every CRI runtime names it.
pub const POD_IFNAME: &str = "eth0";
/// The name of the network berthd writes when none exists.
pub const DEFAULT_NETWORK: &str = "berth";
/// Its file in the managed dir.
pub const DEFAULT_FILE: &str = "10-berth.conflist";

/// The pods' CNI networks.
pub struct PodNetwork {
    cni: Cni,
    /// berth's managed conf dir: networks there are berth's own, so GC may run their plugins.
    managed: PathBuf,
    /// `ipRanges` from the node's pod CIDR, one range set per CIDR.
    pod_cidrs: Mutex<Vec<String>>,
}

impl PodNetwork {
    /// The networks of `cfg`, with berth's managed dir under `root` and the result cache and
    /// IP allocations of berth's default network under `state`. Writes the default network if
    /// there is no network config anywhere.
    pub fn new(
        cfg: &CniSection,
        root: &Path,
        state: &Path,
        own_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let managed = root.join("networks");
        let mut conf_dirs = cfg.conf_dirs.clone();
        conf_dirs.push(managed.clone());
        let mut bin_dirs = cfg.bin_dirs.clone();
        bin_dirs.extend(own_dir);
        let cni = Cni::new(CniConfig {
            conf_dirs,
            bin_dirs,
            cache_dir: state.join("cni").join("cache"),
            timeout: Duration::from_secs(cfg.plugin_timeout_secs),
        });
        let configs = cni.configs();
        // docker's user-defined networks live in the managed dir too, but are never the pods'
        // network: with only those, the default is still missing.
        let only_docker = configs
            .networks
            .iter()
            .all(|n| is_docker_network(n, &managed));
        if only_docker && configs.skipped.is_empty() {
            write_default(cfg, &managed, &state.join("cni").join("ipam"))?;
            tracing::info!(path = %managed.join(DEFAULT_FILE).display(), bridge = %cfg.default_bridge, subnet = %cfg.default_subnet, "no CNI network config found: wrote berth's default network");
        }
        Ok(PodNetwork {
            cni,
            managed,
            pod_cidrs: Mutex::default(),
        })
    }

    /// Whether pods can be attached now: a valid network exists, all its plugins are installed
    /// and answer STATUS. The error says why not, for NetworkReady's message.
    pub async fn ready(&self) -> std::result::Result<(), String> {
        let net = self
            .default_network()
            .map_err(|NotReady { reason }| reason)?;
        self.cni
            .status(&net)
            .await
            .map_err(|e| format!("network {:?}: {e}", net.name()))
    }

    /// Sets the node's pod CIDR(s) (`UpdateRuntimeConfig`): a comma-separated list of subnets,
    /// handed to plugins as the `ipRanges` capability. Empty clears it.
    pub fn set_pod_cidr(&self, cidr: &str) -> Result<()> {
        let mut cidrs = Vec::new();
        for c in cidr.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            c.parse::<cni::plugins::ipnet::IpNet>().map_err(|e| {
                Error::InvalidArgument(format!("pod CIDR {c:?} is not a subnet: {e}"))
            })?;
            cidrs.push(c.to_owned());
        }
        tracing::info!(pod_cidrs = ?cidrs, "pod CIDR updated");
        *self.pod_cidrs.lock().unwrap_or_else(|p| p.into_inner()) = cidrs;
        Ok(())
    }

    /// The pods' network now, or FailedPrecondition saying why there is none.
    pub fn network(&self) -> Result<Arc<Network>> {
        self.default_network().map_err(|NotReady { reason }| {
            Error::FailedPrecondition(format!("pod networking is not ready: {reason}"))
        })
    }

    /// The first valid network that is not one of docker's user-defined ones.
    fn default_network(&self) -> std::result::Result<Arc<Network>, NotReady> {
        let configs = self.cni.configs();
        match configs
            .networks
            .iter()
            .find(|n| !is_docker_network(n, &self.managed))
        {
            Some(n) => Ok(n.clone()),
            None => match configs.default_network() {
                Ok(_) => {
                    // The files skipped are why there is no pods' network: say so.
                    let mut reason =
                        "only docker's user-defined networks are configured".to_owned();
                    if !configs.skipped.is_empty() {
                        let why: Vec<String> = configs
                            .skipped
                            .iter()
                            .map(|s| format!("{}: {}", s.path.display(), s.reason))
                            .collect();
                        reason = format!("{reason}; skipped: {}", why.join("; "));
                    }
                    Err(NotReady { reason })
                }
                Err(e) => Err(e),
            },
        }
    }

    /// The network named `name`, or NotFound.
    pub fn named(&self, name: &str) -> Result<Arc<Network>> {
        self.cni
            .network(name)
            .ok_or_else(|| Error::NotFound(format!("network {name} not found")))
    }

    /// berth's managed conf dir (`<root>/networks`).
    pub fn managed_dir(&self) -> &Path {
        &self.managed
    }

    /// Where `berth-host-local` keeps the allocations of berth's networks: beside the result
    /// cache, on the state tmpfs, so a reboot frees them with the pods that held them.
    pub fn ipam_dir(&self) -> PathBuf {
        let cache = &self.cni.config().cache_dir;
        cache.parent().unwrap_or(cache).join("ipam")
    }

    /// Attaches pod `id` to `net` as interface `ifname` (a docker container's second and
    /// further networks). Ports are published only through the pod's first interface, so
    /// none are passed here. A failure may leave part of the chain set up: roll it back with
    /// [`PodNetwork::detach_ifname`].
    pub async fn attach_ifname(
        &self,
        net: &Network,
        id: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<CniResult> {
        let att = Attachment::new(id, Some(netns.to_path_buf()), ifname);
        self.cni.add(net, &att).await.map_err(|e| {
            Error::Internal(format!(
                "attach to network {:?}: {}",
                net.name(),
                crate::error::chain(&e)
            ))
        })
    }

    /// Detaches interface `ifname` of pod `id` from `net`: DEL from the cache entry if there
    /// is one, else with `net`. Idempotent.
    pub async fn detach_ifname(
        &self,
        net: &Network,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
    ) -> Result<()> {
        let att = Attachment::new(id, netns.map(Path::to_path_buf), ifname);
        self.cni.del(net, &att).await.map_err(|e| {
            Error::Internal(format!(
                "detach from network {:?}: {}",
                net.name(),
                crate::error::chain(&e)
            ))
        })
    }

    /// DEL of interface `ifname` of pod `id` on network `name` from its cache entry alone (the
    /// network's conflist is gone). Nothing cached: nothing to do.
    pub async fn detach_cached_ifname(
        &self,
        name: &str,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
    ) -> Result<()> {
        let fail = |e: cni::runtime::Error| {
            Error::Internal(format!(
                "detach from network {name:?}: {}",
                crate::error::chain(&e)
            ))
        };
        let Some(mut entry) = self
            .cni
            .cached_attachment(name, id, ifname)
            .await
            .map_err(fail)?
        else {
            return Ok(());
        };
        if netns.is_some() {
            entry.netns = netns.map(Path::to_path_buf);
        }
        self.cni.del_cached(&entry).await.map_err(fail)
    }

    /// DELs every cached attachment of pod `id` other than its `eth0` (which the pod's own
    /// teardown DELs): for pods whose owner no longer knows which networks it attached.
    /// Reads the whole cache, so it is for rare paths. Logs failures and goes on.
    pub async fn detach_others(&self, id: &str, netns: Option<&Path>) {
        let cached = match self.cni.cached_attachments().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %e, "list the CNI result cache");
                return;
            }
        };
        for mut entry in cached
            .into_iter()
            .filter(|e| e.container_id == id && e.ifname != POD_IFNAME)
        {
            if netns.is_some() {
                entry.netns = netns.map(Path::to_path_buf);
            }
            if let Err(e) = self.cni.del_cached(&entry).await {
                tracing::warn!(sandbox_id = %id, network = %entry.network_name, ifname = %entry.ifname, error = %e, "detach a network");
            }
        }
    }

    /// The cached ADD result of interface `ifname` of pod `id` on network `name`, if any.
    pub async fn cached_result(&self, name: &str, id: &str, ifname: &str) -> Option<CniResult> {
        let entry = self.cni.cached_attachment(name, id, ifname).await.ok()??;
        CniResult::from_value(entry.result?).ok()
    }

    fn attachment(
        &self,
        id: &str,
        netns: Option<&Path>,
        config: &cri::PodSandboxConfig,
    ) -> Attachment {
        let meta = config.metadata.clone().unwrap_or_default();
        let mut att = Attachment::new(id, netns.map(Path::to_path_buf), POD_IFNAME).with_pod(
            &meta.namespace,
            &meta.name,
            &meta.uid,
        );
        // As containerd: only mappings with a host port become hostPorts.
        let ports: Vec<PortMapping> = config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| PortMapping {
                host_port: p.host_port as u16,
                container_port: p.container_port as u16,
                protocol: match cri::Protocol::try_from(p.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                }
                .to_owned(),
                host_ip: p.host_ip.clone(),
            })
            .collect();
        if !ports.is_empty() {
            att = att.with_port_mappings(&ports);
        }
        if let Some(d) = &config.dns_config {
            att = att.with_dns(&DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            });
        }
        if let Ok(Some(bw)) = bandwidth(config) {
            att = att.with_bandwidth(&bw);
        }
        let cidrs = self
            .pod_cidrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !cidrs.is_empty() {
            let ranges: Vec<Vec<IpRange>> = cidrs
                .into_iter()
                .map(|subnet| {
                    vec![IpRange {
                        subnet,
                        ..Default::default()
                    }]
                })
                .collect();
            att = att.with_ip_ranges(&ranges);
        }
        att
    }

    /// Releases what berthd's networks hold for pods it no longer knows: `pods` are the sandbox
    /// ids with a network. Cached attachments of other pods are deleted (the cache is berth's
    /// alone), and the plugins of networks in berth's managed dir get CNI GC with the valid
    /// attachments. Networks from shared conf dirs get no plugin GC: their plugins' state (an
    /// IPAM data dir, say) may be another runtime's too. Runs before berthd serves, so no ADD
    /// is in flight. Errors are logged, not returned: a stale allocation is no reason to fail
    /// a start.
    pub async fn gc(&self, pods: &[String]) {
        let mut valid: Vec<GcAttachment> = pods
            .iter()
            .map(|id| GcAttachment {
                container_id: id.clone(),
                ifname: POD_IFNAME.to_owned(),
            })
            .collect();
        let cached = match self.cni.cached_attachments().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "CNI GC: list the result cache");
                Vec::new()
            }
        };
        for entry in cached {
            // A docker container on several networks has an interface on each (eth1, ...):
            // those of a known pod are its owner's (the engine's) to tear down.
            if pods.contains(&entry.container_id) {
                if entry.ifname != POD_IFNAME {
                    valid.push(GcAttachment {
                        container_id: entry.container_id.clone(),
                        ifname: entry.ifname.clone(),
                    });
                }
                continue;
            }
            tracing::info!(network = %entry.network_name, sandbox_id = %entry.container_id, "CNI GC: tearing down an attachment of a pod berthd does not know");
            if let Err(e) = self.cni.del_cached(&entry).await {
                tracing::warn!(network = %entry.network_name, sandbox_id = %entry.container_id, error = %e, "CNI GC: delete a stale attachment");
            }
        }
        for net in self.cni.configs().networks.iter() {
            if !net.source().is_some_and(|p| p.starts_with(&self.managed)) {
                continue;
            }
            if let Err(e) = self.cni.gc(net, &valid).await {
                tracing::warn!(network = net.name(), error = %e, "CNI GC");
            }
        }
    }

    /// Checks the port mappings and bandwidth annotations before anything is set up.
    pub fn validate(config: &cri::PodSandboxConfig) -> Result<()> {
        bandwidth(config)?;
        for p in &config.port_mappings {
            let bad = |what: &str| {
                Err(Error::InvalidArgument(format!(
                    "port mapping {}:{} is invalid: {what}",
                    p.host_port, p.container_port
                )))
            };
            if p.host_port > 0 && !(1..=65535).contains(&p.container_port) {
                return bad("the container port must be 1-65535");
            }
            if !(0..=65535).contains(&p.host_port) {
                return bad("the host port must be 0-65535");
            }
            if !p.host_ip.is_empty() && p.host_ip.parse::<IpAddr>().is_err() {
                return bad("the host IP is not an address");
            }
        }
        Ok(())
    }

    /// Attaches pod `id` (network namespace `netns`) to `net` and returns the pod's addresses,
    /// the primary (IPv4 if any, as kubelet expects) first. A failure may leave part of the
    /// chain set up: the caller rolls it back with [`PodNetwork::detach`].
    pub async fn attach(
        &self,
        net: &Network,
        id: &str,
        netns: &Path,
        config: &cri::PodSandboxConfig,
    ) -> Result<Vec<String>> {
        let att = self.attachment(id, Some(netns), config);
        let result = self.cni.add(net, &att).await.map_err(|e| {
            Error::Internal(format!(
                "set up the pod network {:?}: {}",
                net.name(),
                crate::error::chain(&e)
            ))
        })?;
        Ok(pod_ips(&result))
    }

    /// Detaches pod `id` from network `name`: DEL from the result cache when there is an
    /// entry, else with the network's current config (an ADD that failed or was cut short
    /// cached nothing). Succeeds when there is nothing to tear down. A `netns` given is one the
    /// caller destroys right after, and plugins are told so (see [`NETNS_DISPOSED_ARG`]).
    pub async fn detach(
        &self,
        name: &str,
        id: &str,
        netns: Option<&Path>,
        config: &cri::PodSandboxConfig,
    ) -> Result<()> {
        let fail = |e: cni::runtime::Error| {
            Error::Internal(format!(
                "tear down the pod network {name:?}: {}",
                crate::error::chain(&e)
            ))
        };
        let cached = self
            .cni
            .cached_attachment(name, id, POD_IFNAME)
            .await
            .map_err(fail)?;
        // berthd unpins the netns right after: berth-bridge may leave the veth to the kernel.
        let disposed = (NETNS_DISPOSED_ARG.to_owned(), "true".to_owned());
        if let Some(mut entry) = cached {
            if netns.is_some() {
                entry.netns = netns.map(Path::to_path_buf);
                entry.args.push(disposed);
            }
            return self.cni.del_cached(&entry).await.map_err(fail);
        }
        match self.cni.network(name) {
            Some(net) => {
                let mut att = self.attachment(id, netns, config);
                if netns.is_some() {
                    att.args.push(disposed);
                }
                self.cni.del(&net, &att).await.map_err(fail)
            }
            None => {
                tracing::warn!(sandbox_id = %id, network = name, "network config and cache entry are both gone: nothing to tear down with");
                Ok(())
            }
        }
    }
}

/// Prefix of the CNI names of docker's user-defined networks (engine/networks.rs).
pub const DOCKER_NETWORK_PREFIX: &str = "docker-";

/// Top-level key of the conflists of docker's user-defined networks: the network's id. Plugins
/// never see it (they get their own config, the network's name and version).
pub const DOCKER_NETWORK_KEY: &str = "io.berth.docker-network";

/// Whether a CNI network is one of docker's user-defined networks: a conflist in berth's
/// managed dir `managed` marked with [`DOCKER_NETWORK_KEY`] (or, written before the mark
/// existed, a `docker-*.conflist` there). An operator's network, wherever it is and whatever
/// its name, is never one.
pub fn is_docker_network(net: &Network, managed: &Path) -> bool {
    if !net.source().is_some_and(|p| p.starts_with(managed)) {
        return false;
    }
    if net.raw().contains_key(DOCKER_NETWORK_KEY) {
        return true;
    }
    let file = net
        .source()
        .and_then(|p| p.file_name())
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    file.starts_with(DOCKER_NETWORK_PREFIX) && net.name().starts_with(DOCKER_NETWORK_PREFIX)
}

/// The pod annotation limiting traffic into the pod, in bits per second.
pub const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
/// The pod annotation limiting traffic out of the pod, in bits per second.
pub const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// The `bandwidth` capability from the pod's annotations, as kubelet and containerd read them:
/// each rate a quantity from 1k to 1P bits per second, the burst unlimited (as containerd).
fn bandwidth(config: &cri::PodSandboxConfig) -> Result<Option<Bandwidth>> {
    let rate = |key: &str| -> Result<Option<u64>> {
        let Some(v) = config.annotations.get(key) else {
            return Ok(None);
        };
        let bits = crate::quantity::parse_value(v)
            .map_err(|e| Error::InvalidArgument(format!("annotation {key}: {e}")))?;
        if !(1_000..=1_000_000_000_000_000).contains(&bits) {
            return Err(Error::InvalidArgument(format!(
                "annotation {key}: {v} is outside 1k..1P bits per second"
            )));
        }
        Ok(Some(bits))
    };
    let (ingress, egress) = (rate(INGRESS_BANDWIDTH)?, rate(EGRESS_BANDWIDTH)?);
    if ingress.is_none() && egress.is_none() {
        return Ok(None);
    }
    let burst = |r: Option<u64>| r.map(|_| u64::from(u32::MAX));
    Ok(Some(Bandwidth {
        ingress_rate: ingress,
        ingress_burst: burst(ingress),
        egress_rate: egress,
        egress_burst: burst(egress),
    }))
}

/// The pod's addresses from a result: those of the sandbox interfaces (all, when the result
/// names no interfaces), IPv4 first as kubelet takes the first as the pod IP.
fn pod_ips(r: &CniResult) -> Vec<String> {
    let mut ips: Vec<IpAddr> = r.sandbox_ips().map(|c| c.address.addr()).collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips.dedup();
    ips.into_iter().map(|ip| ip.to_string()).collect()
}

/// Writes berth's default network into `dir`, atomically.
fn write_default(cfg: &CniSection, dir: &Path, ipam_dir: &Path) -> Result<()> {
    cfg.default_subnet
        .parse::<cni::plugins::ipnet::IpNet>()
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "cni.default_subnet {:?} is not a subnet: {e}",
                cfg.default_subnet
            ))
        })?;
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": DEFAULT_NETWORK,
        "plugins": [
            {
                "type": "berth-bridge",
                "bridge": cfg.default_bridge,
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "capabilities": { "ipRanges": true },
                "ipam": {
                    "type": "berth-host-local",
                    "ranges": [[{ "subnet": cfg.default_subnet }]],
                    "dataDir": ipam_dir,
                },
            },
            { "type": "berth-portmap", "capabilities": { "portMappings": true } },
        ],
    });
    let io = |what: &str, e: std::io::Error| Error::internal(what, e);
    std::fs::create_dir_all(dir).map_err(|e| io("create the managed network dir", e))?;
    let path = dir.join(DEFAULT_FILE);
    let tmp = dir.join(format!(".{DEFAULT_FILE}.tmp"));
    let bytes =
        serde_json::to_vec_pretty(&conflist).map_err(|e| Error::internal("encode conflist", e))?;
    std::fs::write(&tmp, bytes).map_err(|e| io("write the default network", e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("sync the default network", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("install the default network", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflist(name: &str, marker: Option<&str>) -> String {
        let mut v = json!({
            "cniVersion": "1.1.0",
            "name": name,
            "plugins": [{ "type": "berth-bridge", "bridge": "brx" }],
        });
        if let Some(id) = marker {
            v[DOCKER_NETWORK_KEY] = json!(id);
        }
        v.to_string()
    }

    fn setup(
        conf: &[(&str, String)],
        managed: &[(&str, String)],
    ) -> (tempfile::TempDir, PodNetwork) {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf_dir = dir.path().join("conf");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&conf_dir).expect("conf dir");
        std::fs::create_dir_all(root.join("networks")).expect("managed dir");
        for (f, body) in conf {
            std::fs::write(conf_dir.join(f), body).expect("write");
        }
        for (f, body) in managed {
            std::fs::write(root.join("networks").join(f), body).expect("write");
        }
        let cfg = CniSection {
            conf_dirs: vec![conf_dir],
            bin_dirs: vec![],
            ..CniSection::default()
        };
        let net = PodNetwork::new(&cfg, &root, &dir.path().join("state"), None).expect("network");
        (dir, net)
    }

    #[test]
    fn an_operators_docker_named_network_can_be_the_pods_network() {
        let id = "ab".repeat(32);
        let (_dir, net) = setup(
            &[("10-docker-ops.conflist", conflist("docker-ops", None))],
            &[(
                "docker-abababababab.conflist",
                conflist("docker-abababababab", Some(&id)),
            )],
        );
        assert_eq!(net.network().expect("network").name(), "docker-ops");
    }

    #[test]
    fn berths_docker_networks_are_never_the_pods_network() {
        let id = "ab".repeat(32);
        // Marked, whatever its name; and one from before the mark, by its file name.
        let (dir, net) = setup(
            &[],
            &[
                ("00-mine.conflist", conflist("mine", Some(&id))),
                (
                    "docker-cdcdcdcdcdcd.conflist",
                    conflist("docker-cdcdcdcdcdcd", None),
                ),
            ],
        );
        // The default network is written beside them and is the pods'.
        assert_eq!(net.network().expect("network").name(), DEFAULT_NETWORK);
        drop(net);
        // With only docker networks and a broken file, the reason names the broken file.
        std::fs::remove_file(dir.path().join("root/networks").join(DEFAULT_FILE)).expect("rm");
        std::fs::write(dir.path().join("conf/05-broken.conflist"), "{").expect("write");
        let cfg = CniSection {
            conf_dirs: vec![dir.path().join("conf")],
            bin_dirs: vec![],
            ..CniSection::default()
        };
        let net = PodNetwork::new(
            &cfg,
            &dir.path().join("root"),
            &dir.path().join("state"),
            None,
        )
        .expect("network");
        let reason = net.default_network().expect_err("not ready").reason;
        assert!(reason.contains("only docker's"), "{reason}");
        assert!(reason.contains("05-broken.conflist"), "{reason}");
    }
}
