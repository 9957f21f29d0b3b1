//! `berth-bridge`: pods on a Linux bridge, one veth pair each, addresses from the IPAM
//! plugin named in `ipam.type`, optional masquerading with nftables.
//!
//! Configuration keys (those of the reference `bridge` plugin): `bridge` (default `cni0`),
//! `mtu`, `isGateway` (the gateway address goes on the bridge), `isDefaultGateway`
//! (implies `isGateway`; a default route via the gateway in the pod), `hairpinMode`,
//! `promiscMode`, `ipMasq`, `ipam`; and berth's own `nonMasqueradeCIDRs`: destinations
//! besides the pod subnet that `ipMasq` leaves alone (`berth-vxlan` passes its cluster CIDR,
//! so pods on different hosts see each other's real addresses).
//!
//! Like the reference plugin it leaves the bridge in place on DEL: other pods use it.
//!
//! A runtime that destroys the network namespace right after DEL may say so with
//! [`NETNS_DISPOSED_ARG`]`=true` in `CNI_ARGS`. DEL then removes the pod interface's addresses
//! (so an address IPAM hands out again answers nowhere else) but leaves the veth pair to the
//! kernel, which deletes it with the namespace in the background, batched with others. Deleting
//! it here costs ~15-20 ms of waiting for RCU grace periods on every pod stop.

use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error as CniError;
use rscni_plugin::types::{Args, CNIResult, Interface, IpConfig, NetConf, Route};
use serde::Deserialize;
use serde_json::Value;

use super::ipnet::IpNet;
use super::netlink::{self, Link, Netlink};
use super::{Error, Result, delegate, nft, runner};

/// The `CNI_ARGS` key by which a runtime says it destroys the netns right after DEL.
pub const NETNS_DISPOSED_ARG: &str = "BERTH_NETNS_DISPOSED";

/// The bridge used when the configuration names none.
pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BridgeSection {
    bridge: Option<String>,
    mtu: Option<u32>,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    #[serde(default, rename = "nonMasqueradeCIDRs")]
    non_masquerade_cidrs: Vec<IpNet>,
}

/// A resolved `berth-bridge` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network name.
    pub network: String,
    /// The bridge device name.
    pub bridge: String,
    /// MTU for the bridge (when created) and the veth pair.
    pub mtu: Option<u32>,
    /// Put the gateway address on the bridge.
    pub is_gateway: bool,
    /// Add a default route via the gateway in the pod.
    pub is_default_gateway: bool,
    /// Let traffic leave a bridge port and come back on it (pod to itself via a service).
    pub hairpin_mode: bool,
    /// Set the bridge promiscuous.
    pub promisc_mode: bool,
    /// Masquerade pod traffic leaving the pod subnet.
    pub ip_masq: bool,
    /// Destinations besides the pod subnet that masquerading leaves alone (an overlay's
    /// cluster CIDR, where pods must see each other's real addresses).
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// The IPAM plugin type.
    pub ipam: String,
    /// DNS settings passed through to the result.
    pub dns: Option<rscni_plugin::types::Dns>,
}

impl Config {
    /// Resolves `conf`.
    pub fn from_netconf(conf: &NetConf) -> Result<Self> {
        let section: BridgeSection =
            serde_json::from_value(Value::Object(conf.custom.clone().into_iter().collect()))
                .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        let bridge = section.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        if !netlink::is_valid_ifname(&bridge) {
            return Err(Error::InvalidConfig(format!(
                "bridge name {bridge:?} is not a valid interface name"
            )));
        }
        let ipam = conf
            .ipam
            .as_ref()
            .map(|i| i.r#type.clone())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::InvalidConfig("ipam.type is required".into()))?;
        Ok(Config {
            network: conf.name.clone(),
            bridge,
            mtu: section.mtu.filter(|m| *m > 0),
            is_gateway: section.is_gateway || section.is_default_gateway,
            is_default_gateway: section.is_default_gateway,
            hairpin_mode: section.hairpin_mode,
            promisc_mode: section.promisc_mode,
            ip_masq: conf.ip_masq.unwrap_or(false),
            non_masquerade_cidrs: section.non_masquerade_cidrs,
            ipam,
            dns: conf.dns.clone(),
        })
    }
}

/// Everything an ADD/DEL/CHECK call is about.
struct Call {
    conf: Config,
    container_id: String,
    ifname: String,
    netns: Option<PathBuf>,
    cni_path: Vec<PathBuf>,
    prev: Option<CNIResult>,
    /// The runtime destroys the netns right after DEL ([`NETNS_DISPOSED_ARG`]).
    netns_disposed: bool,
}

impl Call {
    fn from_args(args: &Args) -> Result<Self> {
        let netconf = args
            .config()
            .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
        let conf = Config::from_netconf(netconf)?;
        let non_empty = |v: Option<&str>, name: &str| {
            v.filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| Error::InvalidEnv(format!("{name} is empty")))
        };
        let ifname = non_empty(args.ifname(), "CNI_IFNAME")?;
        if ifname.len() > 15 || ifname.contains(['/', ' ', ':']) {
            return Err(Error::InvalidEnv(format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name"
            )));
        }
        Ok(Call {
            conf,
            container_id: non_empty(args.container_id(), "CNI_CONTAINERID")?,
            ifname,
            netns: args.netns().filter(|p| !p.as_os_str().is_empty()).cloned(),
            cni_path: args.path().to_vec(),
            prev: netconf.prev_result.clone(),
            netns_disposed: args.args().is_some_and(|a| {
                a.split(';')
                    .any(|kv| kv.split_once('=') == Some((NETNS_DISPOSED_ARG, "true")))
            }),
        })
    }

    fn ipam(&self, command: &str) -> Result<Option<CNIResult>> {
        delegate::exec(
            &self.conf.ipam,
            command,
            &self.cni_path,
            runner::stdin_data(),
        )
    }

    fn open_netns(&self) -> Result<Option<(File, PathBuf)>> {
        let Some(path) = &self.netns else {
            return Ok(None);
        };
        match File::open(path) {
            Ok(file) => Ok(Some((file, path.clone()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Netns {
                op: "open",
                path: path.clone(),
                source: e,
            }),
        }
    }
}

/// Creates the bridge if needed, checks it is one, and sets it up.
fn ensure_bridge(host: &mut Netlink, conf: &Config) -> Result<Link> {
    if host.link_by_name(&conf.bridge)?.is_none() {
        host.add_bridge(&conf.bridge, random_mac(), conf.mtu)?;
    }
    let bridge = host.link_by_name(&conf.bridge)?.ok_or_else(|| {
        Error::InvalidConfig(format!("bridge {} vanished after creation", conf.bridge))
    })?;
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(Error::InvalidConfig(format!(
            "{} exists and is not a bridge ({:?})",
            conf.bridge, bridge.kind
        )));
    }
    host.set_link(bridge.index, None, conf.promisc_mode)?;
    Ok(bridge)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // SAFETY: the buffer is valid for its length; a short read only makes the value less
    // random (names that clash are retried, MACs only need to differ locally).
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    bytes
}

fn random_veth_name() -> String {
    format!("veth{:08x}", u32::from_ne_bytes(random_bytes()))
}

/// A random unicast, locally administered MAC.
fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = random_bytes();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Creates the veth pair (container end named `ifname` directly in the pod's namespace),
/// enslaves the host end to the bridge and sets both up.
fn create_veth(
    host: &mut Netlink,
    cont: &mut Netlink,
    netns: &File,
    call: &Call,
    bridge: &Link,
) -> Result<(Link, Link)> {
    if cont.link_by_name(&call.ifname)?.is_some() {
        return Err(Error::InvalidConfig(format!(
            "interface {} already exists in the container's namespace",
            call.ifname
        )));
    }
    let mut attempt = 0;
    let host_name = loop {
        let name = random_veth_name();
        match host.add_veth(&name, &call.ifname, netns.as_raw_fd(), call.conf.mtu) {
            Ok(()) => break name,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && attempt < 5 => attempt += 1,
            Err(e) => {
                return Err(Error::Netlink {
                    op: format!("create veth {name} with peer {}", call.ifname),
                    source: e,
                });
            }
        }
    };
    let result = (|| {
        let host_link = host.link_by_name(&host_name)?.ok_or_else(|| {
            Error::InvalidConfig(format!("veth {host_name} vanished after creation"))
        })?;
        host.set_link(host_link.index, Some(bridge.index), false)?;
        if call.conf.hairpin_mode {
            host.set_hairpin(host_link.index)?;
        }
        let cont_link = cont.link_by_name(&call.ifname)?.ok_or_else(|| {
            Error::InvalidConfig(format!("{} vanished from the container", call.ifname))
        })?;
        cont.set_link(cont_link.index, None, false)?;
        Ok((host_link, cont_link))
    })();
    if result.is_err()
        && let Ok(Some(link)) = host.link_by_name(&host_name)
    {
        let _ = host.del_link(link.index);
    }
    result
}

fn enable_forwarding(ip: IpAddr) -> Result<()> {
    let path = if ip.is_ipv4() {
        "/proc/sys/net/ipv4/ip_forward"
    } else {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    };
    if fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    fs::write(path, "1").map_err(|e| Error::io("enable forwarding", path, e))
}

fn parse_net(s: &str, what: &str) -> Result<IpNet> {
    s.parse()
        .map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::InvalidConfig(format!("{what}: {s:?} is not an address")))
}

/// Addresses, routes, gateway and masquerading on a freshly created pair; returns the
/// result to print.
fn configure(
    host: &mut Netlink,
    cont: &mut Netlink,
    call: &Call,
    bridge: &Link,
    host_veth: &Link,
    cont_link: &Link,
    ipam: CNIResult,
) -> Result<CNIResult> {
    if ipam.ips.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "IPAM plugin {} returned no addresses",
            call.conf.ipam
        )));
    }
    let mut addrs = Vec::new();
    let mut gateways: Vec<IpNet> = Vec::new();
    for ip in &ipam.ips {
        let addr = parse_net(&ip.address, "IPAM address")?;
        cont.add_address(cont_link.index, addr)?;
        addrs.push(addr);
        if let Some(gw) = &ip.gateway {
            let gw = parse_ip(gw, "IPAM gateway")?;
            gateways.push(IpNet {
                addr: gw,
                prefix: addr.prefix,
            });
        }
    }

    let mut routes = ipam.routes.clone();
    if call.conf.is_default_gateway {
        for gw in &gateways {
            let default = if gw.addr.is_ipv4() {
                "0.0.0.0/0"
            } else {
                "::/0"
            };
            let has_default = routes.iter().any(|r| {
                parse_net(&r.dst, "route")
                    .is_ok_and(|d| d.prefix == 0 && d.addr.is_ipv4() == gw.addr.is_ipv4())
            });
            if !has_default {
                routes.push(Route {
                    dst: default.to_string(),
                    gw: Some(gw.addr.to_string()),
                    mtu: None,
                    advmss: None,
                    priority: None,
                    table: None,
                    scope: None,
                });
            }
        }
    }
    for route in &routes {
        let dst = parse_net(&route.dst, "route dst")?;
        let gw = match &route.gw {
            Some(gw) => Some(parse_ip(gw, "route gw")?),
            None => gateways
                .iter()
                .find(|g| g.addr.is_ipv4() == dst.addr.is_ipv4())
                .map(|g| g.addr),
        };
        cont.add_route(dst, gw, cont_link.index)?;
    }

    if call.conf.is_gateway {
        for gw in &gateways {
            host.add_address(bridge.index, *gw)?;
            enable_forwarding(gw.addr)?;
        }
    }
    if call.conf.ip_masq {
        nft::add(
            &call.conf.network,
            &call.container_id,
            &call.ifname,
            &addrs,
            &call.conf.non_masquerade_cidrs,
        )?;
    }

    // The bridge takes a port's MAC when it has none of its own: read it again.
    let bridge_mac = host
        .link_by_index(bridge.index)?
        .map_or_else(|| bridge.mac.clone(), |b| b.mac);
    let iface = |name: &str, mac: &str, sandbox: Option<String>| Interface {
        name: name.to_string(),
        mac: mac.to_string(),
        mtu: None,
        sandbox,
        socket_path: None,
        pci_id: None,
    };
    Ok(CNIResult {
        interfaces: vec![
            iface(&call.conf.bridge, &bridge_mac, None),
            iface(&host_veth.name, &host_veth.mac, None),
            iface(
                &call.ifname,
                &cont_link.mac,
                call.netns.as_ref().map(|p| p.display().to_string()),
            ),
        ],
        ips: ipam
            .ips
            .iter()
            .map(|ip| IpConfig {
                interface: Some(2),
                address: ip.address.clone(),
                gateway: ip.gateway.clone(),
            })
            .collect(),
        routes,
        dns: call.conf.dns.clone().or(ipam.dns),
    })
}

fn add(call: &Call) -> Result<CNIResult> {
    let (netns, netns_path) = call.open_netns()?.ok_or_else(|| Error::Netns {
        op: "open",
        path: call.netns.clone().unwrap_or_default(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let mut host = Netlink::new()?;
    let mut cont = Netlink::in_netns(&netns, &netns_path)?;
    let bridge = ensure_bridge(&mut host, &call.conf)?;
    let (host_veth, cont_link) = create_veth(&mut host, &mut cont, &netns, call, &bridge)?;

    let result = call
        .ipam("ADD")
        .and_then(|r| r.ok_or_else(|| Error::InvalidConfig("IPAM plugin printed no result".into())))
        .and_then(|ipam| {
            configure(
                &mut host, &mut cont, call, &bridge, &host_veth, &cont_link, ipam,
            )
            .inspect_err(|_| {
                // Undo in reverse: rules, then the addresses of the IPAM plugin.
                if call.conf.ip_masq {
                    let _ = nft::del(&call.conf.network, &call.container_id, &call.ifname);
                }
                let _ = call.ipam("DEL");
            })
        });
    if result.is_err() {
        let _ = cont.del_link(cont_link.index);
    }
    result
}

/// Tears everything down, continuing past failures; reports them all.
fn del(call: &Call) -> Result<()> {
    let mut errors: Vec<Error> = Vec::new();
    if let Err(e) = call.ipam("DEL") {
        errors.push(e);
    }
    match call.open_netns() {
        Ok(Some((netns, path))) => {
            let res = Netlink::in_netns(&netns, &path).and_then(|mut cont| {
                match cont.link_by_name(&call.ifname)? {
                    Some(link) if call.netns_disposed => {
                        for addr in cont.addresses(link.index)? {
                            cont.del_address(link.index, addr)?;
                        }
                        Ok(())
                    }
                    Some(link) => cont.del_link(link.index),
                    None => Ok(()),
                }
            });
            if let Err(e) = res {
                errors.push(e);
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(e),
    }
    if call.conf.ip_masq
        && let Err(e) = nft::del(&call.conf.network, &call.container_id, &call.ifname)
    {
        errors.push(e);
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Teardown(errors)),
    }
}

fn check(call: &Call) -> Result<()> {
    let prev = call
        .prev
        .as_ref()
        .ok_or_else(|| Error::InvalidConfig("CHECK needs prevResult".into()))?;
    call.ipam("CHECK")?;

    let mut host = Netlink::new()?;
    let bridge = host
        .link_by_name(&call.conf.bridge)?
        .ok_or_else(|| Error::Check(format!("bridge {} does not exist", call.conf.bridge)))?;

    let (netns, path) = call.open_netns()?.ok_or_else(|| {
        Error::Check(format!("network namespace {:?} does not exist", call.netns))
    })?;
    let mut cont = Netlink::in_netns(&netns, &path)?;
    let link = cont
        .link_by_name(&call.ifname)?
        .ok_or_else(|| Error::Check(format!("{} does not exist in the container", call.ifname)))?;
    if !link.up {
        return Err(Error::Check(format!("{} is down", call.ifname)));
    }
    let cont_index = prev
        .interfaces
        .iter()
        .position(|i| i.name == call.ifname && i.sandbox.is_some());
    if let Some(i) = cont_index
        && !prev.interfaces[i].mac.is_empty()
        && !prev.interfaces[i].mac.eq_ignore_ascii_case(&link.mac)
    {
        return Err(Error::Check(format!(
            "{} has MAC {}, the result says {}",
            call.ifname, link.mac, prev.interfaces[i].mac
        )));
    }

    // The host end: the result's interface that is neither the bridge nor in the sandbox.
    if let Some(veth) = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none() && i.name != call.conf.bridge)
    {
        let host_link = host
            .link_by_name(&veth.name)?
            .ok_or_else(|| Error::Check(format!("host veth {} does not exist", veth.name)))?;
        if host_link.master != Some(bridge.index) {
            return Err(Error::Check(format!(
                "host veth {} is not on bridge {}",
                veth.name, call.conf.bridge
            )));
        }
    }

    let have = cont.addresses(link.index)?;
    let mut ips = Vec::new();
    for ip in &prev.ips {
        if ip.interface.is_some() && ip.interface.map(|i| i as usize) != cont_index {
            continue;
        }
        let addr = parse_net(&ip.address, "prevResult address")?;
        if !have.contains(&addr) {
            return Err(Error::Check(format!(
                "{} is not on {} (has {:?})",
                addr,
                call.ifname,
                have.iter().map(ToString::to_string).collect::<Vec<_>>()
            )));
        }
        ips.push(addr.addr);
    }

    for route in &prev.routes {
        let dst = parse_net(&route.dst, "prevResult route")?;
        let gw = route
            .gw
            .as_deref()
            .map(|g| parse_ip(g, "prevResult route gw"))
            .transpose()?;
        let routes = cont.routes(dst.addr.is_ipv4())?;
        let found = routes
            .iter()
            .any(|r| r.dst.canonical() == dst.canonical() && (gw.is_none() || r.gw == gw));
        if !found {
            return Err(Error::Check(format!(
                "route to {dst} is missing in the container"
            )));
        }
    }

    if call.conf.ip_masq {
        let masq = nft::addresses(&call.conf.network, &call.container_id, &call.ifname)?;
        for ip in &ips {
            if !masq.contains(ip) {
                return Err(Error::Check(format!("no masquerade rule for {ip}")));
            }
        }
    }
    Ok(())
}

/// The `berth-bridge` plugin.
#[derive(Debug, Default)]
pub struct Bridge;

fn netconf(args: &Args) -> Result<&NetConf> {
    args.config()
        .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))
}

impl Cni for Bridge {
    fn add(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        Ok(add(&Call::from_args(&args)?)?)
    }

    fn del(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        del(&Call::from_args(&args)?)?;
        Ok(CNIResult::default())
    }

    fn check(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        check(&Call::from_args(&args)?)?;
        Ok(CNIResult::default())
    }

    fn status(&self, args: Args) -> std::result::Result<(), CniError> {
        let conf = Config::from_netconf(netconf(&args)?)?;
        delegate::exec(&conf.ipam, "STATUS", args.path(), runner::stdin_data()).map_err(|e| {
            CniError::PluginNotAvailable(format!("IPAM plugin {}: {}", conf.ipam, e.chain()))
        })?;
        Ok(())
    }

    fn gc(&self, args: Args) -> std::result::Result<(), CniError> {
        let conf = Config::from_netconf(netconf(&args)?)?;
        let valid = runner::valid_attachments(runner::stdin_data())
            .ok_or_else(|| Error::InvalidConfig("GC without cni.dev/valid-attachments".into()))?;
        // Both halves run even if the first fails.
        let ipam = delegate::exec(&conf.ipam, "GC", args.path(), runner::stdin_data());
        let masq = if conf.ip_masq {
            nft::gc(&conf.network, &valid)
        } else {
            Ok(())
        };
        ipam?;
        masq?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let conf: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "berth-bridge",
            "isDefaultGateway": true, "ipMasq": true,
            "ipam": {"type": "berth-host-local", "subnet": "10.1.0.0/24"}
        }))
        .expect("netconf");
        let c = Config::from_netconf(&conf).expect("config");
        assert_eq!(c.bridge, DEFAULT_BRIDGE);
        assert!(c.is_gateway && c.is_default_gateway && c.ip_masq);
        assert_eq!(c.ipam, "berth-host-local");

        let long: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "berth-bridge",
            "bridge": "a-much-too-long-bridge", "ipam": {"type": "x"}
        }))
        .expect("netconf");
        assert!(Config::from_netconf(&long).is_err());

        let keep: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "berth-bridge", "ipMasq": true,
            "nonMasqueradeCIDRs": ["10.244.0.0/16"], "ipam": {"type": "x"}
        }))
        .expect("netconf");
        let c = Config::from_netconf(&keep).expect("config");
        assert_eq!(
            c.non_masquerade_cidrs,
            ["10.244.0.0/16".parse().expect("net")]
        );
        let bad: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "berth-bridge",
            "nonMasqueradeCIDRs": ["10.244.0.0"], "ipam": {"type": "x"}
        }))
        .expect("netconf");
        assert!(Config::from_netconf(&bad).is_err());
    }

    #[test]
    fn veth_names_fit_ifnamsiz() {
        let name = random_veth_name();
        assert!(name.starts_with("veth") && name.len() == 12, "{name}");
    }
}
