//! A small synchronous rtnetlink client: just the link, address, route, neighbour and
//! forwarding-database requests the bridge and vxlan plugins need.
//!
//! A netlink socket stays in the network namespace it was created in, so
//! [`Netlink::in_netns`] creates one on a short-lived thread that `setns`es into the
//! container's namespace; the socket is then used from the calling thread, and the
//! process itself never leaves the host namespace.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use netlink_packet_core::NLM_F_REPLACE;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::ipnet::IpNet;
use super::{Error, Result};

/// A link as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:..` form (empty if none).
    pub mac: String,
    /// MTU.
    pub mtu: Option<u32>,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    /// `IFF_UP` is set.
    pub up: bool,
    /// The link kind (`bridge`, `veth`, ...), if the kernel reported one.
    pub kind: Option<String>,
    /// The VXLAN parameters, for a link of kind `vxlan`.
    pub vxlan: Option<VxlanInfo>,
}

/// The parameters of a VXLAN link that the vxlan plugin sets and compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The local underlay address (source of the encapsulated packets).
    pub local: Option<IpAddr>,
    /// The UDP destination port.
    pub port: u16,
    /// Whether the device learns remote MACs from received packets.
    pub learning: bool,
}

/// A neighbour (ARP or NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// The interface index.
    pub index: u32,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its link-layer address, `aa:bb:..` form (empty if unresolved).
    pub mac: String,
    /// The entry is `NUD_PERMANENT`.
    pub permanent: bool,
}

/// A forwarding-database entry of a device itself (`bridge fdb ... self`), as VXLAN
/// devices keep them: which underlay address a MAC is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// The interface index.
    pub index: u32,
    /// The MAC, `aa:bb:..` form.
    pub mac: String,
    /// The remote underlay address.
    pub dst: Option<IpAddr>,
}

/// Whether `name` is usable as an interface name (at most 15 bytes, no `/`, space, `:`).
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name.contains(['/', ' ', '\0', ':'])
        && name != "."
        && name != ".."
}

/// `aa:bb:cc:dd:ee:ff` form of a MAC.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: String::new(),
            mtu: None,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(mac) => link.mac = format_mac(mac),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::Controller(index) => link.master = Some(*index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                                link.vxlan = Some(VxlanInfo::from_attributes(attrs));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

impl VxlanInfo {
    fn from_attributes(attrs: &[InfoVxlan]) -> Self {
        let mut info = VxlanInfo {
            vni: 0,
            local: None,
            port: 0,
            learning: true,
        };
        for attr in attrs {
            match attr {
                InfoVxlan::Id(id) => info.vni = *id,
                InfoVxlan::Local(ip) if !ip.is_unspecified() => info.local = Some((*ip).into()),
                InfoVxlan::Local6(ip) if !ip.is_unspecified() => info.local = Some((*ip).into()),
                InfoVxlan::Port(port) => info.port = *port,
                InfoVxlan::Learning(on) => info.learning = *on,
                _ => {}
            }
        }
        info
    }
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination (`0.0.0.0/0` for the default route).
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
}

/// An rtnetlink socket in one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let socket = Self::socket().map_err(|e| nl_err("open socket", e))?;
        Ok(Netlink { socket, seq: 0 })
    }

    fn socket() -> io::Result<Socket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Report errors of the request itself, not of a later one.
        socket.set_ext_ack(true).ok();
        Ok(socket)
    }

    /// A socket in the network namespace of the open namespace file `netns` (named
    /// `path` in errors).
    pub fn in_netns(netns: &File, path: &Path) -> Result<Self> {
        let fd = netns.as_raw_fd();
        let socket = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<Socket> {
                // SAFETY: `fd` is an open namespace file for the whole scope; setns only
                // changes this short-lived thread's network namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Self::socket()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
        })
        .map_err(|e| Error::Netns {
            op: "enter and open netlink socket",
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `msg` and collects the replies until the ACK (or the end of a dump).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.header.length as usize];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(err) => {
                        return if err.code.is_none() {
                            Ok(out)
                        } else {
                            Err(err.to_io())
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        // A non-dump request without ACK is answered by one message.
                        if flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, NLM_F_ACK | flags).map(|_| ())
    }

    /// The link called `name`, if any.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, name)
    }

    /// The link with index `index`, if any.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg, &format!("#{index}"))
    }

    fn get_link(&mut self, msg: LinkMessage, what: &str) -> Result<Option<Link>> {
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(&format!("get link {what}"), e)),
        }
    }

    /// Creates bridge `name` with MAC `mac` (and `mtu` if given). An existing link of that
    /// name is left alone (the caller checks its kind).
    ///
    /// A bridge without an explicitly set MAC takes the lowest MAC of its ports and so
    /// changes it when that port leaves: every pod's ARP entry for the gateway goes stale
    /// and the pods lose the gateway for up to a minute. A MAC given at creation sticks.
    pub fn add_bridge(&mut self, name: &str, mac: [u8; 6], mtu: Option<u32>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                Err(nl_err(&format!("create bridge {name}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Creates veth `host` here with its peer `peer` directly in the namespace `peer_netns`.
    pub fn add_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: RawFd,
        mtu: Option<u32>,
    ) -> io::Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_netns));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(host.to_string()));
        if let Some(mtu) = mtu {
            peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Creates VXLAN device `name` with the parameters of `info`, MAC `mac` and `mtu`. An
    /// existing link of that name is left alone (the caller compares it).
    pub fn add_vxlan(
        &mut self,
        name: &str,
        info: &VxlanInfo,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut data = vec![
            InfoVxlan::Id(info.vni),
            InfoVxlan::Port(info.port),
            InfoVxlan::Learning(info.learning),
        ];
        match info.local {
            Some(IpAddr::V4(ip)) => data.push(InfoVxlan::Local(ip)),
            Some(IpAddr::V6(ip)) => data.push(InfoVxlan::Local6(ip)),
            None => {}
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        match self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                Err(nl_err(&format!("create vxlan device {name}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Sets link `index` up, optionally enslaving it to `master` and setting promiscuous mode.
    pub fn set_link(&mut self, index: u32, master: Option<u32>, promisc: bool) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if promisc {
            msg.header.flags |= LinkFlags::Promisc;
            msg.header.change_mask |= LinkFlags::Promisc;
        }
        if let Some(master) = master {
            msg.attributes.push(LinkAttribute::Controller(master));
        }
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| nl_err(&format!("set link #{index} up"), e))
    }

    /// Turns hairpin mode on for bridge port `index` (traffic may leave the port it came in
    /// on), as `bridge link set dev X hairpin on` does: RTM_SETLINK of family AF_BRIDGE with a
    /// nested IFLA_PROTINFO holding IFLA_BRPORT_MODE. Unlike writing
    /// `/sys/class/net/X/brport/hairpin_mode`, this works whatever network namespace the
    /// mounted sysfs belongs to.
    pub fn set_hairpin(&mut self, index: u32) -> Result<()> {
        const IFLA_PROTINFO: u16 = 12;
        const IFLA_BRPORT_MODE: u16 = 4;
        // One nested attribute: length 5 (header + u8), type, value, 3 bytes of padding.
        let mut nested = Vec::with_capacity(8);
        nested.extend_from_slice(&5u16.to_ne_bytes());
        nested.extend_from_slice(&IFLA_BRPORT_MODE.to_ne_bytes());
        nested.extend_from_slice(&[1, 0, 0, 0]);
        let mut msg = LinkMessage::default();
        msg.header.interface_family = AddressFamily::Bridge;
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::Other(netlink_packet_core::DefaultNla::new(
                IFLA_PROTINFO | netlink_packet_core::NLA_F_NESTED,
                nested,
            )));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| nl_err(&format!("set hairpin mode on bridge port #{index}"), e))
    }

    /// Deletes link `index`; a link already gone is success.
    pub fn del_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(msg), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
                Err(nl_err(&format!("delete link #{index}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Adds `addr` to link `index`; an address already there is success.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr);
        msg.header.prefix_len = addr.prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.addr));
        msg.attributes.push(AddressAttribute::Address(addr.addr));
        if let IpAddr::V4(bcast) = addr.last()
            && addr.prefix < 31
        {
            msg.attributes.push(AddressAttribute::Broadcast(bcast));
        }
        if addr.addr.is_ipv6() {
            // The address is ours by IPAM: duplicate address detection would only keep it
            // tentative (unusable) for a second or two after the pod starts.
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.ack(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                Err(nl_err(&format!("add address {addr} to link #{index}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Removes `addr` from link `index`; an address not there is success.
    pub fn del_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr);
        msg.header.prefix_len = addr.prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.addr));
        msg.attributes.push(AddressAttribute::Address(addr.addr));
        match self.ack(RouteNetlinkMessage::DelAddress(msg), 0) {
            Err(e) if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) => Err(nl_err(
                &format!("remove address {addr} from link #{index}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// The addresses on link `index`.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>> {
        Ok(self
            .all_addresses()?
            .into_iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, addr)| addr)
            .collect())
    }

    /// Every address of every link, with the link's index.
    pub fn all_addresses(&mut self) -> Result<Vec<(u32, IpNet)>> {
        let msg = AddressMessage::default();
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)
            .map_err(|e| nl_err("list addresses", e))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(a) = reply else {
                continue;
            };
            let addr = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((
                    a.header.index,
                    IpNet {
                        addr: ip,
                        prefix: a.header.prefix_len,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Adds a route to `dst` via `gw` out of `oif` in the main table; an existing one is
    /// success.
    pub fn add_route(&mut self, dst: IpNet, gw: Option<IpAddr>, oif: u32) -> Result<()> {
        let msg = route_message(dst, gw, oif);
        match self.ack(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
                Err(nl_err(&format!("add route {dst}{via}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Sets the main table's route to `dst` to go via `gw` out of `oif`, with the gateway
    /// taken as directly reachable on `oif` (`onlink`) whatever the link's addresses; it
    /// replaces a route to `dst` that went elsewhere.
    pub fn replace_onlink_route(&mut self, dst: IpNet, gw: IpAddr, oif: u32) -> Result<()> {
        let mut msg = route_message(dst, Some(gw), oif);
        msg.header.flags = RouteFlags::Onlink;
        self.ack(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| nl_err(&format!("set route {dst} via {gw} onlink"), e))
    }

    /// Deletes the main table's route to `dst` via `gw` out of `oif`; none is success.
    pub fn del_route(&mut self, dst: IpNet, gw: Option<IpAddr>, oif: u32) -> Result<()> {
        let mut msg = route_message(dst, gw, oif);
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match self.ack(RouteNetlinkMessage::DelRoute(msg), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                Err(nl_err(&format!("delete route {dst}"), e))
            }
            _ => Ok(()),
        }
    }

    /// The neighbour entries (ARP for `v4`, else NDP) of every link.
    pub fn neighbours(&mut self, v4: bool) -> Result<Vec<Neighbour>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_v4(v4);
        let replies = self
            .request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)
            .map_err(|e| nl_err("list neighbours", e))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = reply else {
                continue;
            };
            let mut ip = None;
            let mut mac = String::new();
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::Destination(a) => ip = neighbour_ip(a),
                    NeighbourAttribute::LinkLayerAddress(m) => mac = format_mac(m),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.push(Neighbour {
                    index: n.header.ifindex,
                    ip,
                    mac,
                    permanent: n.header.state == NeighbourState::Permanent,
                });
            }
        }
        Ok(out)
    }

    /// Sets a permanent neighbour entry `ip` → `mac` on link `index` (replacing another).
    pub fn replace_neighbour(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_addr(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| {
            nl_err(
                &format!("set neighbour {ip} lladdr {} on #{index}", format_mac(&mac)),
                e,
            )
        })
    }

    /// Deletes the neighbour entry `ip` on link `index`; none is success.
    pub fn del_neighbour(&mut self, index: u32, ip: IpAddr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_addr(ip)));
        match self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                Err(nl_err(&format!("delete neighbour {ip} on #{index}"), e))
            }
            _ => Ok(()),
        }
    }

    /// The forwarding-database entries of every device.
    pub fn fdb(&mut self) -> Result<Vec<FdbEntry>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        let replies = self
            .request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)
            .map_err(|e| nl_err("list forwarding database", e))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = reply else {
                continue;
            };
            let mut entry = FdbEntry {
                index: n.header.ifindex,
                mac: String::new(),
                dst: None,
            };
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::Destination(a) => entry.dst = neighbour_ip(a),
                    NeighbourAttribute::LinkLayerAddress(m) => entry.mac = format_mac(m),
                    _ => {}
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Sets the permanent forwarding entry of device `index` itself for `mac` to `dst`
    /// (`bridge fdb replace <mac> dev <index> dst <dst> self permanent`).
    pub fn replace_fdb(&mut self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_addr(dst)));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| {
            nl_err(
                &format!("set fdb {} dst {dst} on #{index}", format_mac(&mac)),
                e,
            )
        })
    }

    /// Deletes device `index`'s own forwarding entry for `mac` (all its destinations);
    /// none is success.
    pub fn del_fdb(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        match self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(nl_err(
                &format!("delete fdb {} on #{index}", format_mac(&mac)),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// The routes of the main table for `v4`'s family.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<RouteEntry>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family_v4(v4);
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)
            .map_err(|e| nl_err("list routes", e))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewRoute(r) = reply else {
                continue;
            };
            let mut table = u32::from(r.header.table);
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(a) => dst = ip_of(a),
                    RouteAttribute::Gateway(a) => gw = ip_of(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            let unspecified = if v4 {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u8; 16])
            };
            out.push(RouteEntry {
                dst: IpNet {
                    addr: dst.unwrap_or(unspecified),
                    prefix: r.header.destination_prefix_length,
                },
                gw,
                oif,
            });
        }
        Ok(out)
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    family_v4(ip.is_ipv4())
}

fn family_v4(v4: bool) -> AddressFamily {
    if v4 {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A main-table unicast route message (scope link without a gateway).
fn route_message(dst: IpNet, gw: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst.addr);
    msg.header.destination_prefix_length = dst.prefix;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if gw.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if dst.prefix > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(route_addr(dst.network())));
    }
    if let Some(gw) = gw {
        msg.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

fn neighbour_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// The IP of a neighbour attribute; forwarding entries carry it as raw bytes.
fn neighbour_ip(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn nl_err(op: &str, source: io::Error) -> Error {
    Error::Netlink {
        op: op.to_string(),
        source,
    }
}
