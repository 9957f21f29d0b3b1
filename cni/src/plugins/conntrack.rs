//! Deleting stale conntrack entries over ctnetlink (`NETLINK_NETFILTER`).
//!
//! A UDP flow that reached a host port before the port's mapping existed has a conntrack
//! entry without NAT. The nat chains only see a flow's first packet and every datagram of
//! the flow refreshes the entry, so a client that keeps sending would never reach the pod.
//! [`delete_udp`] removes such entries after ADD, as the reference `portmap` plugin does.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::{Error, Result};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER_LEN: usize = 16;
const IPPROTO_UDP: u8 = 17;

/// Deletes the conntrack entries of IPv4 (`v4`) or IPv6 UDP flows whose original
/// destination address and port `matches`; returns how many it deleted. Entries that expire
/// meanwhile are not an error.
pub fn delete_udp(v4: bool, matches: impl Fn(IpAddr, u16) -> bool) -> Result<usize> {
    let err = |op: &str, e: io::Error| Error::Netlink {
        op: format!("conntrack: {op}"),
        source: e,
    };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| err("open socket", e))?;
    socket.bind_auto().map_err(|e| err("bind", e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| err("connect", e))?;
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;

    let mut seq = 1;
    let dump = message(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        &[],
    );
    socket.send(&dump, 0).map_err(|e| err("dump", e))?;
    let mut stale: Vec<Vec<u8>> = Vec::new();
    receive(&socket, seq, |ty, payload| {
        if ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
            && let Some(key) = stale_key(payload, &matches)
        {
            stale.push(key);
        }
    })
    .map_err(|e| err("dump", e))?;

    let mut deleted = 0;
    for key in stale {
        seq += 1;
        let del = message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            &key,
        );
        socket.send(&del, 0).map_err(|e| err("delete", e))?;
        match receive(&socket, seq, |_, _| {}) {
            Ok(()) => deleted += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(err("delete", e)),
        }
    }
    Ok(deleted)
}

/// An nfnetlink request of ctnetlink message type `msg` carrying `attrs`.
fn message(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + 4 + attrs.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, version (NFNETLINK_V0), resource id (big endian).
    buf.extend_from_slice(&[family, 0, 0, 0]);
    buf.extend_from_slice(attrs);
    buf
}

/// Reads the replies to request `seq` until its end (the ACK, or DONE for a dump), handing
/// each other message's type and payload to `each`.
fn receive(socket: &Socket, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut off = 0;
        while off + HEADER_LEN <= data.len() {
            let len = u32::from_ne_bytes(bytes(&data[off..off + 4])) as usize;
            if len < HEADER_LEN || off + len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let ty = u16::from_ne_bytes(bytes(&data[off + 4..off + 6]));
            let msg_seq = u32::from_ne_bytes(bytes(&data[off + 8..off + 12]));
            let payload = &data[off + HEADER_LEN..off + len];
            off += align(len);
            if msg_seq != seq {
                continue;
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = payload.get(..4).map_or(0, |b| i32::from_ne_bytes(bytes(b)));
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => each(ty, payload.get(4..).unwrap_or_default()),
            }
        }
    }
}

/// The attributes that name the entry in `payload` (its original tuple and zone) if it is a
/// UDP flow to a destination `matches` accepts.
fn stale_key(payload: &[u8], matches: &impl Fn(IpAddr, u16) -> bool) -> Option<Vec<u8>> {
    let mut tuple = None;
    let mut zone: &[u8] = &[];
    for (ty, body, whole) in attrs(payload) {
        match ty {
            CTA_TUPLE_ORIG => tuple = Some((body, whole)),
            CTA_ZONE => zone = whole,
            _ => {}
        }
    }
    let (body, whole) = tuple?;
    let (mut dst, mut proto, mut port) = (None, None, None);
    for (ty, inner, _) in attrs(body) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v, _) in attrs(inner) {
                    match (ty, v.len()) {
                        (CTA_IP_V4_DST, 4) => dst = Some(IpAddr::from(Ipv4Addr::from(bytes(v)))),
                        (CTA_IP_V6_DST, 16) => {
                            dst = Some(IpAddr::from(Ipv6Addr::from(bytes::<16>(v))));
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v, _) in attrs(inner) {
                    match (ty, v.len()) {
                        (CTA_PROTO_NUM, 1) => proto = Some(v[0]),
                        (CTA_PROTO_DST_PORT, 2) => port = Some(u16::from_be_bytes(bytes(v))),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (proto? == IPPROTO_UDP && matches(dst?, port?)).then(|| {
        let mut key = Vec::new();
        for attr in [whole, zone] {
            key.extend_from_slice(attr);
            key.resize(align(key.len()), 0);
        }
        key
    })
}

/// The netlink attributes in `buf`: (type without flags, payload, whole attribute).
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes(bytes(&buf[..2])));
        let ty = u16::from_ne_bytes(bytes(&buf[2..4])) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len], &buf[..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The first `N` bytes of `b` (zero-padded if shorter; callers check lengths).
fn bytes<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + body.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(body);
        out.resize(align(out.len()), 0);
        out
    }

    const NESTED: u16 = 0x8000;

    fn entry(proto: u8, dst: [u8; 4], port: u16) -> Vec<u8> {
        let ip = [attr(1, &[10, 0, 0, 1]), attr(CTA_IP_V4_DST, &dst)].concat();
        let l4 = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(2, &4000u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &port.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            attr(CTA_TUPLE_IP | NESTED, &ip),
            attr(CTA_TUPLE_PROTO | NESTED, &l4),
        ]
        .concat();
        [
            attr(CTA_TUPLE_ORIG | NESTED, &tuple),
            attr(2 | NESTED, &tuple), // the reply tuple: not part of the key
            attr(CTA_ZONE, &7u16.to_be_bytes()),
        ]
        .concat()
    }

    #[test]
    fn stale_udp_entries_are_keyed_by_their_original_tuple_and_zone() {
        let local = |ip: IpAddr, port: u16| ip == IpAddr::from([192, 0, 2, 1]) && port == 5353;
        let e = entry(IPPROTO_UDP, [192, 0, 2, 1], 5353);
        let key = stale_key(&e, &local).expect("stale");
        let orig_len = usize::from(u16::from_ne_bytes([e[0], e[1]]));
        assert_eq!(&key[..orig_len], &e[..orig_len]);
        assert_eq!(
            &key[orig_len..],
            attr(CTA_ZONE, &7u16.to_be_bytes()).as_slice()
        );
        assert!(
            stale_key(&entry(6, [192, 0, 2, 1], 5353), &local).is_none(),
            "tcp"
        );
        assert!(stale_key(&entry(IPPROTO_UDP, [192, 0, 2, 2], 5353), &local).is_none());
        assert!(stale_key(&entry(IPPROTO_UDP, [192, 0, 2, 1], 53), &local).is_none());
        assert!(stale_key(&[1, 2, 3], &local).is_none(), "garbage");
    }
}
