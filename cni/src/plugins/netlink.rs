//! A small synchronous rtnetlink client: just the link, address and route requests the
//! bridge plugin needs.
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

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
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
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(mac) => {
                    link.mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::Controller(index) => link.master = Some(*index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
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

    /// The routes of the main table for `v4`'s family.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<RouteEntry>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
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
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
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
