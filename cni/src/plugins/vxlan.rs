//! `berth-vxlan`: one flat pod network over several hosts, tunnelled through a VXLAN
//! overlay. It is flannel's vxlan backend without etcd: every host's configuration lists its
//! peers (underlay address and pod subnet) and the plugin derives all the rest.
//!
//! # Configuration
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0", "name": "ovl", "type": "berth-vxlan",
//!   "vni": 42, "port": 4789, "device": "berth.42",
//!   "localIP": "192.168.1.10", "subnet": "10.244.1.0/24", "clusterCIDR": "10.244.0.0/16",
//!   "bridge": "berthvx42", "mtu": 1450, "ipMasq": true,
//!   "peers": [{"ip": "192.168.1.11", "subnet": "10.244.2.0/24"}],
//!   "ipam": {"type": "berth-host-local", "dataDir": "/var/lib/cni/networks"}
//! }
//! ```
//!
//! - `vni` (required, 1..=16777215) and `port` (UDP, default 4789) of the overlay;
//! - `device`: the VXLAN device (default `berth.<vni>`); `bridge`: the pods' bridge (default
//!   `berthvx<vni>`); both at most 15 bytes;
//! - `localIP` (required): this host's underlay address; IPv4 or IPv6, and every peer's of the
//!   same family;
//! - `subnet` (required): this host's pod subnet, inside `clusterCIDR` (required), both IPv4;
//!   the peers' subnets lie in `clusterCIDR` too and are disjoint from it and each other;
//! - `mtu`: of the device, the bridge and the pods (default: the MTU of the underlay link that
//!   holds `localIP`, less the 50 bytes of VXLAN over IPv4, or 70 over IPv6);
//! - `ipMasq`: masquerade pod traffic that leaves `clusterCIDR` (and only that);
//! - `ipam`: the pods' IPAM (default `{"type": "berth-host-local"}`); `subnet` is filled in
//!   when the section has neither `subnet` nor `ranges`, and any it has must lie in `subnet`.
//!
//! # Data path
//!
//! Pods attach to a bridge on their host, exactly as with `berth-bridge` (the plugin delegates
//! that part to it, found in `CNI_PATH`): the bridge holds the gateway (the subnet's first
//! address) and pods have their default route through it. For the other hosts' subnets the
//! host has, per peer, on one VXLAN device:
//!
//! ```text
//! berth.42  vxlan id 42 local 192.168.1.10 dstport 4789 nolearning, MAC 0e:be:c0:a8:01:0a,
//!           address 10.244.1.0/32
//! route 10.244.2.0/24 via 10.244.2.0 dev berth.42 onlink   # the peer's subnet
//! neigh 10.244.2.0 lladdr 0e:be:c0:a8:01:0b PERMANENT       # its VTEP's MAC
//! fdb   0e:be:c0:a8:01:0b dev berth.42 dst 192.168.1.11 self permanent
//! ```
//!
//! A VTEP's MAC is a function of its underlay address (`0e:be` and the IPv4 address, or
//! `0e` and 5 bytes of a hash of an IPv6 one, see [`vtep_mac`]), so a peer list is all a host
//! needs to know: what flannel keeps in etcd is computed here. Learning is off, so nothing
//! but this configuration decides where a frame goes. The device's /32 is its subnet's
//! network address: packets the host itself sends to remote pods take it as their source,
//! and the replies find their way back through the peer's route for this subnet.
//!
//! Pods on different hosts see each other's real addresses: with `ipMasq`, `berth-bridge`
//! is given `clusterCIDR` as `nonMasqueradeCIDRs`, so only traffic leaving the cluster is
//! masqueraded, by per-pod rules that go with the pod.
//!
//! # Commands
//!
//! - ADD sets up the overlay (idempotent, under [`LOCK_FILE`] so concurrent ADDs on a host
//!   queue up): creates the device, or re-creates it when its VNI, port, local address, MAC or
//!   MTU differ from the configuration; sets its address and each peer's fdb entry,
//!   neighbour and route (replacing what differs); and removes what a peer no longer in
//!   the list left: routes on the device into `clusterCIDR`, permanent neighbours there,
//!   fdb entries. Then it runs `berth-bridge` ADD and returns its result.
//! - DEL runs `berth-bridge` DEL only (idempotent, works without the netns). The device stays,
//!   as the bridge does: other pods use it. A host leaving the overlay deletes it by hand.
//! - CHECK verifies the device and every peer's route, neighbour and fdb entry, then runs
//!   `berth-bridge` CHECK.
//! - STATUS fails while `localIP` is on none of the host's links, else asks `berth-bridge`
//!   (which asks the IPAM plugin). GC is `berth-bridge`'s.

use std::fs::File;
use std::net::IpAddr;

use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error as CniError;
use rscni_plugin::types::{Args, CNIResult};
use serde_json::{Map, Value, json};

use super::ipnet::IpNet;
use super::netlink::{self, Link, Netlink, VxlanInfo};
use super::{Error, Result, delegate, runner};

/// The plugin that attaches the pods on each host.
pub const BRIDGE_PLUGIN: &str = "berth-bridge";
/// The UDP port used when the configuration names none (IANA's VXLAN port).
pub const DEFAULT_PORT: u16 = 4789;
/// Serialises overlay setup across concurrent plugin runs on a host.
pub const LOCK_FILE: &str = "/run/berth-vxlan.lock";
/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Our keys, which the generated `berth-bridge` configuration does not carry over.
const OWN_KEYS: &[&str] = &[
    "vni",
    "port",
    "device",
    "localIP",
    "subnet",
    "clusterCIDR",
    "peers",
];

/// A peer host of the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its underlay address (the VXLAN packets' destination).
    pub ip: IpAddr,
    /// Its pod subnet.
    pub subnet: IpNet,
}

impl Peer {
    /// The address the route to its subnet goes via: the subnet's network address, which
    /// the peer has on its own VXLAN device.
    pub fn gateway(&self) -> IpAddr {
        self.subnet.network()
    }
}

/// A resolved and validated `berth-vxlan` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network name.
    pub network: String,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The VXLAN UDP port.
    pub port: u16,
    /// The VXLAN device name.
    pub device: String,
    /// This host's underlay address.
    pub local_ip: IpAddr,
    /// This host's pod subnet.
    pub subnet: IpNet,
    /// The whole pod network.
    pub cluster_cidr: IpNet,
    /// The pods' bridge.
    pub bridge: String,
    /// The MTU, if configured.
    pub mtu: Option<u32>,
    /// Masquerade traffic leaving the cluster CIDR.
    pub ip_masq: bool,
    /// The other hosts.
    pub peers: Vec<Peer>,
    /// The IPAM section handed to the bridge plugin (defaults applied).
    pub ipam: Value,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidConfig(msg.into())
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
    }
}

fn get_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{key} must be a non-negative integer, not {v}"))),
    }
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    get_str(obj, key)?.ok_or_else(|| invalid(format!("{key} is required")))
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| invalid(format!("{what}: {s:?} is not an IP address")))
}

/// Parses an IPv4 network given with its host bits cleared.
fn parse_v4_net(s: &str, what: &str) -> Result<IpNet> {
    let net: IpNet = s.parse().map_err(|e| invalid(format!("{what}: {e}")))?;
    if !net.addr.is_ipv4() {
        return Err(invalid(format!(
            "{what} {net}: the overlay carries IPv4 pod networks only"
        )));
    }
    if net.canonical() != net {
        return Err(invalid(format!(
            "{what} {net} has host bits set (the network is {})",
            net.canonical()
        )));
    }
    Ok(net)
}

fn check_ifname(name: &str, key: &str) -> Result<()> {
    if netlink::is_valid_ifname(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{key} {name:?} is not a valid interface name (1 to 15 bytes, no '/', ' ' or ':')"
        )))
    }
}

impl Config {
    /// Resolves and validates the network configuration `raw` (the plugin's stdin).
    pub fn from_json(raw: &Value) -> Result<Self> {
        let obj = raw
            .as_object()
            .ok_or_else(|| invalid("the network configuration is not a JSON object"))?;
        let network = required(obj, "name")?.to_string();

        let vni = get_u64(obj, "vni")?.ok_or_else(|| invalid("vni is required"))?;
        let vni = u32::try_from(vni)
            .ok()
            .filter(|v| (1..=MAX_VNI).contains(v))
            .ok_or_else(|| invalid(format!("vni {vni} is not in 1..={MAX_VNI}")))?;
        let port = match get_u64(obj, "port")? {
            None => DEFAULT_PORT,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("port {p} is not in 1..=65535")))?,
        };
        let device = get_str(obj, "device")?.map_or_else(|| format!("berth.{vni}"), str::to_string);
        check_ifname(&device, "device")?;
        let bridge =
            get_str(obj, "bridge")?.map_or_else(|| format!("berthvx{vni}"), str::to_string);
        check_ifname(&bridge, "bridge")?;
        if bridge == device {
            return Err(invalid(format!(
                "bridge and device are both {bridge:?}: they must differ"
            )));
        }

        let local_ip = parse_ip(required(obj, "localIP")?, "localIP")?;
        if local_ip.is_unspecified() || local_ip.is_loopback() || local_ip.is_multicast() {
            return Err(invalid(format!(
                "localIP {local_ip} cannot be a VXLAN endpoint (unspecified, loopback or multicast)"
            )));
        }
        let cluster_cidr = parse_v4_net(required(obj, "clusterCIDR")?, "clusterCIDR")?;
        let subnet = parse_v4_net(required(obj, "subnet")?, "subnet")?;
        if !cluster_cidr.contains(subnet.addr) || subnet.prefix < cluster_cidr.prefix {
            return Err(invalid(format!(
                "subnet {subnet} is not inside clusterCIDR {cluster_cidr}"
            )));
        }
        if subnet.prefix > 30 {
            return Err(invalid(format!(
                "subnet {subnet} is too small for a gateway and pods (at most /30)"
            )));
        }

        let mtu = match get_u64(obj, "mtu")? {
            None | Some(0) => None,
            Some(m) => Some(
                u32::try_from(m)
                    .ok()
                    .filter(|m| (68..=65535).contains(m))
                    .ok_or_else(|| invalid(format!("mtu {m} is not in 68..=65535")))?,
            ),
        };
        let ip_masq = match obj.get("ipMasq") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(invalid(format!("ipMasq must be a boolean, not {other}"))),
        };

        let peers = Self::peers(obj, local_ip, subnet, cluster_cidr)?;
        let ipam = Self::ipam(obj, subnet)?;
        Ok(Config {
            network,
            vni,
            port,
            device,
            local_ip,
            subnet,
            cluster_cidr,
            bridge,
            mtu,
            ip_masq,
            peers,
            ipam,
        })
    }

    fn peers(
        obj: &Map<String, Value>,
        local_ip: IpAddr,
        subnet: IpNet,
        cluster_cidr: IpNet,
    ) -> Result<Vec<Peer>> {
        let list = match obj.get("peers") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(other) => return Err(invalid(format!("peers must be a list, not {other}"))),
        };
        let mut peers: Vec<Peer> = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            let entry = entry
                .as_object()
                .ok_or_else(|| invalid(format!("peers[{i}] is not an object")))?;
            let what = |key: &str| format!("peers[{i}].{key}");
            let ip = get_str(entry, "ip")?
                .ok_or_else(|| invalid(format!("{} is required", what("ip"))))?;
            let ip = parse_ip(ip, &what("ip"))?;
            let peer_subnet = get_str(entry, "subnet")?
                .ok_or_else(|| invalid(format!("{} is required", what("subnet"))))?;
            let peer_subnet = parse_v4_net(peer_subnet, &what("subnet"))?;
            if ip.is_ipv4() != local_ip.is_ipv4() {
                return Err(invalid(format!(
                    "{} {ip} is not of the family of localIP {local_ip}",
                    what("ip")
                )));
            }
            if ip == local_ip {
                return Err(invalid(format!(
                    "{} {ip} is this host's localIP: a host is not its own peer",
                    what("ip")
                )));
            }
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(invalid(format!(
                    "{} {ip} cannot be a VXLAN endpoint",
                    what("ip")
                )));
            }
            if !cluster_cidr.contains(peer_subnet.addr) || peer_subnet.prefix < cluster_cidr.prefix
            {
                return Err(invalid(format!(
                    "{} {peer_subnet} is not inside clusterCIDR {cluster_cidr}",
                    what("subnet")
                )));
            }
            if peer_subnet.overlaps(&subnet) {
                return Err(invalid(format!(
                    "{} {peer_subnet} overlaps this host's subnet {subnet}",
                    what("subnet")
                )));
            }
            for (j, other) in peers.iter().enumerate() {
                if other.ip == ip {
                    return Err(invalid(format!(
                        "peers[{j}] and peers[{i}] both have ip {ip}"
                    )));
                }
                if vtep_mac(other.ip) == vtep_mac(ip) {
                    return Err(invalid(format!(
                        "peers[{j}] and peers[{i}] would share a VTEP MAC; use other addresses"
                    )));
                }
                if other.subnet.overlaps(&peer_subnet) {
                    return Err(invalid(format!(
                        "the subnets of peers[{j}] ({}) and peers[{i}] ({peer_subnet}) overlap",
                        other.subnet
                    )));
                }
            }
            peers.push(Peer {
                ip,
                subnet: peer_subnet,
            });
        }
        if peers.iter().any(|p| vtep_mac(p.ip) == vtep_mac(local_ip)) {
            return Err(invalid(
                "a peer would share this host's VTEP MAC; use other addresses",
            ));
        }
        Ok(peers)
    }

    /// The user's IPAM section (or berth-host-local's), with `subnet` filled in.
    fn ipam(obj: &Map<String, Value>, subnet: IpNet) -> Result<Value> {
        let mut ipam = match obj.get("ipam") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => return Err(invalid(format!("ipam must be an object, not {other}"))),
        };
        if get_str(&ipam, "type")?.is_none_or(str::is_empty) {
            ipam.insert("type".into(), json!("berth-host-local"));
        }
        let mut subnets: Vec<(String, &str)> = Vec::new();
        if let Some(s) = get_str(&ipam, "subnet")? {
            subnets.push(("ipam.subnet".into(), s));
        }
        if let Some(sets) = ipam.get("ranges").and_then(Value::as_array) {
            for (i, set) in sets.iter().enumerate() {
                for (j, range) in set.as_array().into_iter().flatten().enumerate() {
                    if let Some(s) = range.get("subnet").and_then(Value::as_str) {
                        subnets.push((format!("ipam.ranges[{i}][{j}].subnet"), s));
                    }
                }
            }
        }
        for (what, s) in &subnets {
            let net: IpNet = s.parse().map_err(|e| invalid(format!("{what}: {e}")))?;
            if !subnet.contains(net.addr) || net.prefix < subnet.prefix {
                return Err(invalid(format!(
                    "{what} {net} is not inside this host's subnet {subnet}: \
                     other hosts route only {subnet} here"
                )));
            }
        }
        if subnets.is_empty() && !ipam.contains_key("ranges") {
            ipam.insert("subnet".into(), json!(subnet.to_string()));
        }
        Ok(Value::Object(ipam))
    }

    /// The `berth-bridge` configuration for the same network: everything of `raw` but our
    /// own keys (so `runtimeConfig`, `args`, `prevResult`, `dns` and GC's attachments pass
    /// through), with the bridge, gateway, MTU, masquerading and IPAM of the overlay.
    pub fn bridge_conf(&self, raw: &Value, mtu: Option<u32>) -> Value {
        let mut conf = raw.as_object().cloned().unwrap_or_default();
        for key in OWN_KEYS {
            conf.remove(*key);
        }
        conf.insert("type".into(), json!(BRIDGE_PLUGIN));
        conf.insert("bridge".into(), json!(self.bridge));
        conf.insert("isGateway".into(), json!(true));
        conf.insert("isDefaultGateway".into(), json!(true));
        conf.insert("ipMasq".into(), json!(self.ip_masq));
        conf.insert(
            "nonMasqueradeCIDRs".into(),
            json!([self.cluster_cidr.to_string()]),
        );
        match mtu.or(self.mtu) {
            Some(mtu) => conf.insert("mtu".into(), json!(mtu)),
            None => conf.remove("mtu"),
        };
        conf.insert("ipam".into(), self.ipam.clone());
        Value::Object(conf)
    }

    /// The device's parameters as the kernel reports them.
    fn vxlan_info(&self) -> VxlanInfo {
        VxlanInfo {
            vni: self.vni,
            local: Some(self.local_ip),
            port: self.port,
            learning: false,
        }
    }

    /// The device's own address: the subnet's network address, alone.
    fn device_address(&self) -> IpNet {
        IpNet {
            addr: self.subnet.network(),
            prefix: 32,
        }
    }
}

/// FNV-1a, a stable hash for IPv6 VTEP MACs.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The MAC of the VTEP (VXLAN device) of the host with underlay address `ip`: unicast and
/// locally administered; `0e:be:` and the IPv4 address, or `0e:` and 5 bytes of a hash of the
/// IPv6 address. Every host computes every peer's from the peer list.
pub fn vtep_mac(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            [0x0e, 0xbe, a, b, c, d]
        }
        IpAddr::V6(v6) => {
            let h = fnv(&v6.octets()).to_be_bytes();
            [0x0e, h[0], h[1], h[2], h[3], h[4]]
        }
    }
}

/// VXLAN's encapsulation overhead: outer IP, UDP, VXLAN and inner Ethernet headers.
fn overhead(underlay: IpAddr) -> u32 {
    if underlay.is_ipv4() { 50 } else { 70 }
}

/// Takes the overlay lock (blocking); released when the file is dropped.
fn lock() -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_FILE)
        .map_err(|e| Error::io("open lock file", LOCK_FILE, e))?;
    file.lock().map_err(|e| Error::io("lock", LOCK_FILE, e))?;
    Ok(file)
}

/// The link that holds `ip`.
fn underlay_link(nl: &mut Netlink, ip: IpAddr) -> Result<Option<Link>> {
    let index = nl
        .all_addresses()?
        .into_iter()
        .find(|(_, a)| a.addr == ip)
        .map(|(index, _)| index);
    match index {
        Some(index) => nl.link_by_index(index),
        None => Ok(None),
    }
}

fn not_local(ip: IpAddr) -> Error {
    invalid(format!(
        "localIP {ip} is not an address of this host: the overlay needs it as its endpoint"
    ))
}

/// Creates or repairs the VXLAN device and its peers' entries; returns the MTU for the pods.
fn ensure_overlay(conf: &Config) -> Result<u32> {
    let _lock = lock()?;
    let mut nl = Netlink::new()?;
    let underlay =
        underlay_link(&mut nl, conf.local_ip)?.ok_or_else(|| not_local(conf.local_ip))?;
    let mtu = match conf.mtu {
        Some(mtu) => mtu,
        None => underlay
            .mtu
            .unwrap_or(1500)
            .checked_sub(overhead(conf.local_ip))
            .filter(|m| *m >= 68)
            .ok_or_else(|| {
                invalid(format!(
                    "the MTU of {} is too small for VXLAN; set mtu",
                    underlay.name
                ))
            })?,
    };
    let dev = ensure_device(&mut nl, conf, mtu)?;
    nl.set_link(dev.index, None, false)?;

    let want = conf.device_address();
    for addr in nl.addresses(dev.index)? {
        if addr.addr.is_ipv4() && addr != want {
            nl.del_address(dev.index, addr)?;
        }
    }
    nl.add_address(dev.index, want)?;

    // Per peer: where its MAC lives, its gateway's MAC, the route; in this order, so a
    // route is never there before what it needs.
    for peer in &conf.peers {
        let mac = vtep_mac(peer.ip);
        nl.replace_fdb(dev.index, mac, peer.ip)?;
        nl.replace_neighbour(dev.index, peer.gateway(), mac)?;
        nl.replace_onlink_route(peer.subnet, peer.gateway(), dev.index)?;
    }
    reconcile(&mut nl, conf, dev.index)?;
    Ok(mtu)
}

/// The device named in `conf` with its parameters, created (or re-created) as needed.
fn ensure_device(nl: &mut Netlink, conf: &Config, mtu: u32) -> Result<Link> {
    let info = conf.vxlan_info();
    let mac = vtep_mac(conf.local_ip);
    if let Some(link) = nl.link_by_name(&conf.device)? {
        if link.kind.as_deref() != Some("vxlan") {
            return Err(invalid(format!(
                "{} exists and is not a vxlan device ({})",
                conf.device,
                link.kind.as_deref().unwrap_or("unknown kind")
            )));
        }
        if device_matches(&link, &info, mac, Some(mtu)).is_ok() {
            return Ok(link);
        }
        // Its parameters are derived from the configuration alone: a device that differs
        // is from an older configuration, and the routes on it go with it.
        nl.del_link(link.index)?;
    }
    nl.add_vxlan(&conf.device, &info, mac, Some(mtu))?;
    nl.link_by_name(&conf.device)?.ok_or_else(|| {
        invalid(format!(
            "vxlan device {} could not be created: does another device use VNI {} on port {}?",
            conf.device, conf.vni, conf.port
        ))
    })
}

/// Whether `link` is the device `info`, `mac`, `mtu` describe; else what differs.
fn device_matches(
    link: &Link,
    info: &VxlanInfo,
    mac: [u8; 6],
    mtu: Option<u32>,
) -> std::result::Result<(), String> {
    let have = link.vxlan.as_ref().ok_or("it has no vxlan parameters")?;
    if have != info {
        return Err(format!("it has {have:?}, the configuration says {info:?}"));
    }
    let mac = netlink::format_mac(&mac);
    if !link.mac.eq_ignore_ascii_case(&mac) {
        return Err(format!("its MAC is {}, not {mac}", link.mac));
    }
    if let Some(mtu) = mtu
        && link.mtu != Some(mtu)
    {
        return Err(format!("its MTU is {:?}, not {mtu}", link.mtu));
    }
    Ok(())
}

/// Removes the entries of peers that are no longer configured.
fn reconcile(nl: &mut Netlink, conf: &Config, index: u32) -> Result<()> {
    let cluster = conf.cluster_cidr;
    for route in nl.routes(true)? {
        let stale = route.oif == Some(index)
            && route.gw.is_some()
            && cluster.contains(route.dst.addr)
            && !conf
                .peers
                .iter()
                .any(|p| p.subnet == route.dst.canonical() && Some(p.gateway()) == route.gw);
        if stale {
            nl.del_route(route.dst, route.gw, index)?;
        }
    }
    for neigh in nl.neighbours(true)? {
        let stale = neigh.index == index
            && neigh.permanent
            && cluster.contains(neigh.ip)
            && !conf.peers.iter().any(|p| p.gateway() == neigh.ip);
        if stale {
            nl.del_neighbour(index, neigh.ip)?;
        }
    }
    let macs: Vec<String> = conf
        .peers
        .iter()
        .map(|p| netlink::format_mac(&vtep_mac(p.ip)))
        .collect();
    for entry in nl.fdb()? {
        if entry.index != index || macs.contains(&entry.mac) {
            continue;
        }
        if let Some(mac) = parse_mac(&entry.mac) {
            nl.del_fdb(index, mac)?;
        }
    }
    Ok(())
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Verifies the device and every peer's entries (CHECK).
fn check_overlay(conf: &Config) -> Result<()> {
    let mut nl = Netlink::new()?;
    let dev = nl
        .link_by_name(&conf.device)?
        .ok_or_else(|| Error::Check(format!("vxlan device {} does not exist", conf.device)))?;
    device_matches(&dev, &conf.vxlan_info(), vtep_mac(conf.local_ip), conf.mtu)
        .map_err(|e| Error::Check(format!("vxlan device {}: {e}", conf.device)))?;
    if !dev.up {
        return Err(Error::Check(format!("{} is down", conf.device)));
    }
    let want = conf.device_address();
    if !nl.addresses(dev.index)?.contains(&want) {
        return Err(Error::Check(format!(
            "{} lacks address {want}",
            conf.device
        )));
    }
    let routes = nl.routes(true)?;
    let neighbours = nl.neighbours(true)?;
    let fdb = nl.fdb()?;
    for peer in &conf.peers {
        let mac = netlink::format_mac(&vtep_mac(peer.ip));
        if !routes.iter().any(|r| {
            r.dst.canonical() == peer.subnet
                && r.gw == Some(peer.gateway())
                && r.oif == Some(dev.index)
        }) {
            return Err(Error::Check(format!(
                "no route to peer subnet {} via {} dev {}",
                peer.subnet,
                peer.gateway(),
                conf.device
            )));
        }
        if !neighbours
            .iter()
            .any(|n| n.index == dev.index && n.ip == peer.gateway() && n.mac == mac && n.permanent)
        {
            return Err(Error::Check(format!(
                "no permanent neighbour {} lladdr {mac} on {}",
                peer.gateway(),
                conf.device
            )));
        }
        if !fdb
            .iter()
            .any(|e| e.index == dev.index && e.mac == mac && e.dst == Some(peer.ip))
        {
            return Err(Error::Check(format!(
                "no fdb entry {mac} dst {} on {}",
                peer.ip, conf.device
            )));
        }
    }
    Ok(())
}

/// The network configuration the plugin was run with, and its resolved form.
fn load() -> Result<(Value, Config)> {
    let raw: Value = serde_json::from_slice(runner::stdin_data())
        .map_err(|e| invalid(format!("network configuration is not JSON: {e}")))?;
    let conf = Config::from_json(&raw)?;
    Ok((raw, conf))
}

/// Runs `berth-bridge` for `command` with the configuration derived from ours.
fn bridge(
    command: &str,
    args: &Args,
    raw: &Value,
    conf: &Config,
    mtu: Option<u32>,
) -> Result<Option<CNIResult>> {
    let stdin = serde_json::to_vec(&conf.bridge_conf(raw, mtu))
        .map_err(|e| invalid(format!("serialize the bridge configuration: {e}")))?;
    delegate::exec(BRIDGE_PLUGIN, command, args.path(), &stdin)
}

/// The `berth-vxlan` plugin.
#[derive(Debug, Default)]
pub struct Vxlan;

impl Cni for Vxlan {
    fn add(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (raw, conf) = load()?;
        let mtu = ensure_overlay(&conf)?;
        let result = bridge("ADD", &args, &raw, &conf, Some(mtu))?
            .ok_or_else(|| invalid(format!("{BRIDGE_PLUGIN} printed no result")))?;
        Ok(result)
    }

    fn del(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (raw, conf) = load()?;
        bridge("DEL", &args, &raw, &conf, None)?;
        Ok(CNIResult::default())
    }

    fn check(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (raw, conf) = load()?;
        check_overlay(&conf)?;
        bridge("CHECK", &args, &raw, &conf, None)?;
        Ok(CNIResult::default())
    }

    fn status(&self, args: Args) -> std::result::Result<(), CniError> {
        let (raw, conf) = load()?;
        let mut nl = Netlink::new()?;
        if underlay_link(&mut nl, conf.local_ip)?.is_none() {
            return Err(CniError::PluginNotAvailable(
                not_local(conf.local_ip).chain(),
            ));
        }
        bridge("STATUS", &args, &raw, &conf, None)
            .map_err(|e| CniError::PluginNotAvailable(format!("{BRIDGE_PLUGIN}: {}", e.chain())))?;
        Ok(())
    }

    fn gc(&self, args: Args) -> std::result::Result<(), CniError> {
        let (raw, conf) = load()?;
        bridge("GC", &args, &raw, &conf, None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "ovl", "type": "berth-vxlan",
            "vni": 42, "localIP": "192.168.1.10",
            "subnet": "10.244.1.0/24", "clusterCIDR": "10.244.0.0/16",
            "peers": [{"ip": "192.168.1.11", "subnet": "10.244.2.0/24"}]
        })
    }

    fn with(changes: Value) -> Value {
        let mut conf = base();
        for (k, v) in changes.as_object().expect("object") {
            conf[k] = v.clone();
        }
        conf
    }

    fn error(conf: Value) -> String {
        match Config::from_json(&conf) {
            Ok(c) => panic!("accepted {conf}: {c:?}"),
            Err(e) => {
                assert_eq!(e.code(), 7, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn defaults() {
        let c = Config::from_json(&base()).expect("config");
        assert_eq!(c.device, "berth.42");
        assert_eq!(c.bridge, "berthvx42");
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.mtu, None);
        assert!(!c.ip_masq);
        assert_eq!(c.peers[0].gateway().to_string(), "10.244.2.0");
        assert_eq!(
            c.ipam,
            json!({"type": "berth-host-local", "subnet": "10.244.1.0/24"})
        );
        let long_vni = Config::from_json(&with(json!({"vni": MAX_VNI}))).expect("max vni");
        assert_eq!(long_vni.device, "berth.16777215");
        assert_eq!(long_vni.bridge, "berthvx16777215");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (changes, needle) in [
            (json!({"vni": 0}), "vni 0 is not in 1..=16777215"),
            (json!({"vni": 16_777_216}), "vni 16777216"),
            (json!({"vni": "42"}), "vni must be a non-negative integer"),
            (json!({"port": 70000}), "port 70000"),
            (
                json!({"device": "a-much-too-long-name"}),
                "device \"a-much-too-long-name\"",
            ),
            (json!({"bridge": "bad/name"}), "bridge \"bad/name\""),
            (json!({"bridge": "berth.42"}), "must differ"),
            (
                json!({"localIP": "nope"}),
                "localIP: \"nope\" is not an IP address",
            ),
            (
                json!({"localIP": "127.0.0.1"}),
                "cannot be a VXLAN endpoint",
            ),
            (json!({"subnet": "10.245.1.0/24"}), "not inside clusterCIDR"),
            (json!({"subnet": "10.244.1.5/24"}), "host bits set"),
            (json!({"subnet": "10.244.1.0/31"}), "too small"),
            (
                json!({"clusterCIDR": "fd00::/48"}),
                "IPv4 pod networks only",
            ),
            (json!({"mtu": 20}), "mtu 20"),
            (json!({"ipMasq": "yes"}), "ipMasq must be a boolean"),
            (
                json!({"peers": [{"ip": "192.168.1.11", "subnet": "10.244.1.128/25"}]}),
                "overlaps this host's subnet",
            ),
            (
                json!({"peers": [
                    {"ip": "192.168.1.11", "subnet": "10.244.2.0/24"},
                    {"ip": "192.168.1.12", "subnet": "10.244.2.0/23"}
                ]}),
                "the subnets of peers[0] (10.244.2.0/24) and peers[1] (10.244.2.0/23) overlap",
            ),
            (
                json!({"peers": [
                    {"ip": "192.168.1.11", "subnet": "10.244.2.0/24"},
                    {"ip": "192.168.1.11", "subnet": "10.244.3.0/24"}
                ]}),
                "both have ip 192.168.1.11",
            ),
            (
                json!({"peers": [{"ip": "192.168.1.10", "subnet": "10.244.2.0/24"}]}),
                "is this host's localIP",
            ),
            (
                json!({"peers": [{"ip": "fd00::1", "subnet": "10.244.2.0/24"}]}),
                "not of the family of localIP",
            ),
            (
                json!({"peers": [{"ip": "192.168.1.11", "subnet": "10.99.0.0/24"}]}),
                "peers[0].subnet 10.99.0.0/24 is not inside clusterCIDR",
            ),
            (
                json!({"peers": [{"subnet": "10.244.2.0/24"}]}),
                "peers[0].ip is required",
            ),
            (
                json!({"ipam": {"type": "berth-host-local", "subnet": "10.244.9.0/24"}}),
                "ipam.subnet 10.244.9.0/24 is not inside this host's subnet",
            ),
        ] {
            let msg = error(with(changes.clone()));
            assert!(msg.contains(needle), "{changes}: {msg:?} lacks {needle:?}");
        }
        for key in ["vni", "localIP", "subnet", "clusterCIDR"] {
            let mut conf = base();
            conf.as_object_mut().expect("object").remove(key);
            let msg = error(conf);
            assert!(msg.contains(&format!("{key} is required")), "{msg}");
        }
    }

    #[test]
    fn vtep_macs_are_unicast_local_and_follow_the_address() {
        let v4 = vtep_mac("192.168.1.10".parse().expect("ip"));
        assert_eq!(netlink::format_mac(&v4), "0e:be:c0:a8:01:0a");
        let v6a = vtep_mac("fd00::1".parse().expect("ip"));
        let v6b = vtep_mac("fd00::2".parse().expect("ip"));
        assert_ne!(v6a, v6b);
        for mac in [v4, v6a, v6b] {
            assert_eq!(mac[0] & 0x01, 0, "unicast");
            assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
        }
        assert_eq!(parse_mac("0e:be:c0:a8:01:0a"), Some(v4));
        assert_eq!(parse_mac("0e:be"), None);
    }

    #[test]
    fn bridge_conf_keeps_runtime_keys_and_sets_the_overlay_ones() {
        let raw = with(json!({
            "ipMasq": true, "mtu": 1400,
            "runtimeConfig": {"portMappings": []},
            "ipam": {"type": "host-local", "dataDir": "/tmp/x"}
        }));
        let c = Config::from_json(&raw).expect("config");
        let b = c.bridge_conf(&raw, None);
        assert_eq!(b["type"], BRIDGE_PLUGIN);
        assert_eq!(b["name"], "ovl");
        assert_eq!(b["bridge"], "berthvx42");
        assert_eq!(b["isDefaultGateway"], true);
        assert_eq!(b["ipMasq"], true);
        assert_eq!(b["nonMasqueradeCIDRs"], json!(["10.244.0.0/16"]));
        assert_eq!(b["mtu"], 1400);
        assert_eq!(b["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(
            b["ipam"],
            json!({"type": "host-local", "dataDir": "/tmp/x", "subnet": "10.244.1.0/24"})
        );
        for key in OWN_KEYS {
            assert!(b.get(*key).is_none(), "{key} leaked into {b}");
        }
        assert_eq!(c.bridge_conf(&raw, Some(1450))["mtu"], 1450);
    }
}
