//! The embedded DNS of docker's user-defined networks. Docker answers at 127.0.0.11 inside
//! each container, DNATed to a resolver in the container's netns; berth takes a simpler
//! route to the same behaviour: berthd listens on UDP and TCP port 53 of each user network's
//! gateway address (the bridge's IP, so the host's side of every container on it), and those
//! containers' resolv.conf names that gateway. The asking container is known by its source
//! address; it gets the names (container name, aliases, short id) of containers it shares a
//! network with, and everything else is forwarded to the host's resolvers.
//!
//! The sockets are bound with `IP_FREEBIND`: a network's bridge (and so its address) only
//! appears with its first container, and the listener should be there before that.

pub mod message;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use cni::plugins::ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use message::{Answer, Query};

/// TTL of berth's own answers: short, as containers come and go (docker uses 600 s).
const TTL: u32 = 10;
/// How long an upstream resolver gets per query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The DNS port.
const PORT: u16 = 53;
/// Largest message over TCP accepted.
const MAX_TCP_MESSAGE: usize = 16 << 10;
/// UDP queries answered at once, over all networks: a flood waits instead of piling up tasks
/// (each forward may wait [`UPSTREAM_TIMEOUT`] per upstream).
const MAX_IN_FLIGHT: usize = 256;
/// TCP sessions at once per network: each may stay open a while, so they have permits of
/// their own, per network, and a container keeping many open stalls only its own network's
/// TCP, never UDP nor other networks.
const MAX_TCP_SESSIONS: usize = 16;
/// How long a TCP session may take to send the next message (or the rest of one).
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a TCP session stays open.
const TCP_SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// The host's resolv.conf.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of the real upstreams, for hosts whose resolv.conf names only its
/// loopback stub (dockerd reads it then too).
const RESOLVED_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// What the resolver knows: the names containers may resolve.
pub trait Names: Send + Sync {
    /// Addresses of `name` (lowercase, no trailing dot) for the container at `asker`; None
    /// when the name is none of berth's (it is forwarded upstream).
    fn lookup(&self, asker: IpAddr, name: &str) -> Option<Vec<IpAddr>>;
    /// The container name of `addr` as `asker` sees it, if it shares a network with it.
    fn reverse(&self, asker: IpAddr, addr: IpAddr) -> Option<String>;
}

/// The listeners, one pair (UDP, TCP) per gateway address.
pub struct DnsServer {
    names: OnceLock<Weak<dyn Names>>,
    upstreams: Vec<SocketAddr>,
    listeners: Mutex<HashMap<IpAddr, Vec<JoinHandle<()>>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl DnsServer {
    /// A server forwarding to the resolvers of the host's `/etc/resolv.conf` (systemd-resolved's
    /// upstreams when that names only loopback ones).
    pub fn new() -> Arc<DnsServer> {
        Arc::new(DnsServer {
            names: OnceLock::new(),
            upstreams: host_upstreams(Path::new(RESOLV_CONF), Path::new(RESOLVED_CONF)),
            listeners: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Sets where names are looked up (once; later calls are ignored).
    pub fn set_names(&self, names: Weak<dyn Names>) {
        let _ = self.names.set(names);
    }

    /// Listens on `addr` port 53 (UDP and TCP) for clients in `subnet`. Listening twice on
    /// one address is a no-op.
    ///
    /// Clients outside the subnet get nothing: the gateway address is one of the host's, and
    /// Linux accepts packets for it on every interface, so without this berthd would be an
    /// open resolver to anyone routing to it.
    pub fn listen(self: &Arc<Self>, addr: IpAddr, subnet: IpNet) -> Result<()> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if listeners.contains_key(&addr) {
            return Ok(());
        }
        let sa = SocketAddr::new(addr, PORT);
        let udp = bind(sa, false)?;
        let tcp = bind(sa, true)?;
        let udp = std::net::UdpSocket::from(udp);
        udp.set_nonblocking(true)
            .map_err(|e| Error::internal("DNS socket", e))?;
        let udp =
            tokio::net::UdpSocket::from_std(udp).map_err(|e| Error::internal("DNS socket", e))?;
        let tcp = std::net::TcpListener::from(tcp);
        tcp.set_nonblocking(true)
            .map_err(|e| Error::internal("DNS socket", e))?;
        let tcp =
            tokio::net::TcpListener::from_std(tcp).map_err(|e| Error::internal("DNS socket", e))?;
        let weak = Arc::downgrade(self);
        let u = tokio::spawn(serve_udp(weak.clone(), Arc::new(udp), subnet));
        let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_SESSIONS));
        let t = tokio::spawn(serve_tcp(weak, tcp, subnet, sessions));
        listeners.insert(addr, vec![u, t]);
        tracing::debug!(listen = %sa, "embedded DNS listening");
        Ok(())
    }

    /// Stops listening on `addr`.
    pub fn stop(&self, addr: IpAddr) {
        let tasks = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    }

    /// The answer to one message from `asker` (over TCP with `tcp`), or None to drop it.
    async fn answer(&self, asker: IpAddr, msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let q = match Query::parse(msg) {
            Ok(q) => q,
            Err(_) => return message::servfail_for(msg),
        };
        if q.opcode != 0 || q.qclass != message::CLASS_IN {
            return Some(message::response(&q, message::NOTIMP, &[], 0));
        }
        let names = self.names.get().and_then(Weak::upgrade);
        if let Some(names) = &names {
            match q.qtype {
                message::TYPE_A | message::TYPE_AAAA => {
                    if let Some(ips) = names.lookup(asker, &q.name) {
                        let want_v4 = q.qtype == message::TYPE_A;
                        let answers: Vec<Answer> = ips
                            .into_iter()
                            .filter(|ip| ip.is_ipv4() == want_v4)
                            .map(Answer::Addr)
                            .collect();
                        // A name of ours without an address of that family: NODATA, never a
                        // forward (the upstream would say NXDOMAIN for a name that exists).
                        return Some(message::response(&q, message::NOERROR, &answers, TTL));
                    }
                }
                message::TYPE_PTR => {
                    if let Some(name) =
                        message::reverse_addr(&q.name).and_then(|addr| names.reverse(asker, addr))
                    {
                        return Some(message::response(
                            &q,
                            message::NOERROR,
                            &[Answer::Ptr(name)],
                            TTL,
                        ));
                    }
                }
                _ => {}
            }
        }
        match self.forward(msg, tcp).await {
            Some(reply) => Some(reply),
            None => Some(message::response(&q, message::SERVFAIL, &[], 0)),
        }
    }

    /// Asks the host's resolvers in turn; the first answer wins. A TCP query goes on over TCP:
    /// its answer may be larger than UDP carries, and a truncated one would only come back.
    async fn forward(&self, msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
        for up in &self.upstreams {
            if tcp {
                match tokio::time::timeout(UPSTREAM_TIMEOUT, forward_tcp(*up, msg)).await {
                    Ok(Some(reply)) => return Some(reply),
                    _ => continue,
                }
            }
            let local: SocketAddr = if up.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = tokio::net::UdpSocket::bind(local).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(msg).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }
}

/// The upstreams of `resolv_conf`, or of `resolved_conf` when it has none berthd may use (the
/// host's resolv.conf names only systemd-resolved's stub).
fn host_upstreams(resolv_conf: &Path, resolved_conf: &Path) -> Vec<SocketAddr> {
    let conf = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    let ups = upstreams(&conf);
    if !ups.is_empty() {
        return ups;
    }
    let resolved = std::fs::read_to_string(resolved_conf).unwrap_or_default();
    upstreams(&resolved)
}

/// One query to `up` over TCP, and its answer.
async fn forward_tcp(up: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let mut conn = tokio::net::TcpStream::connect(up).await.ok()?;
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await.ok()?;
    let rlen = usize::from(conn.read_u16().await.ok()?);
    let mut reply = vec![0u8; rlen];
    conn.read_exact(&mut reply).await.ok()?;
    Some(reply)
}

/// The host's resolvers that berthd can reach for a container. Loopback ones are left out:
/// a stub like systemd-resolved's 127.0.0.53 answers the host, and a forward to it from the
/// host's side would make berthd a way around whatever the container was meant to see; they
/// are also unreachable when berthd runs in a network namespace of its own.
fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|s| s.trim().split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_link_local_v6(ip))
        .map(|ip| SocketAddr::new(ip, PORT))
        .collect()
}

/// fe80::/10: needs a scope (`%eth0`) that a plain socket address cannot carry.
fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn bind(addr: SocketAddr, stream: bool) -> Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fail = |what: &str, e: nix::Error| {
        Error::Internal(format!(
            "embedded DNS on {addr}: {what}: {}",
            std::io::Error::from(e)
        ))
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let kind = if stream {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).map_err(|e| fail("socket", e))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| fail("SO_REUSEADDR", e))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| fail("IP_FREEBIND", e))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .map_err(|e| fail("bind", e))?;
    if stream {
        listen(
            &fd,
            nix::sys::socket::Backlog::new(64).map_err(|e| fail("listen", e))?,
        )
        .map_err(|e| fail("listen", e))?;
    }
    Ok(fd)
}

async fn serve_udp(server: Weak<DnsServer>, sock: Arc<tokio::net::UdpSocket>, subnet: IpNet) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "embedded DNS receive");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if !subnet.contains(from.ip()) {
            continue;
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        let Ok(permit) = server.in_flight.clone().acquire_owned().await else {
            return;
        };
        let msg = buf[..n].to_vec();
        let sock = sock.clone();
        // Forwards wait for upstreams: never hold the next query up for one.
        tokio::spawn(async move {
            if let Some(reply) = server.answer(from.ip(), &msg, false).await {
                let _ = sock.send_to(&reply, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(
    server: Weak<DnsServer>,
    listener: tokio::net::TcpListener,
    subnet: IpNet,
    sessions: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let Ok((mut conn, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if !subnet.contains(from.ip()) {
            continue;
        }
        // All of this network's sessions busy: this one is closed at once rather than queued
        // (the client retries), so the accept loop never waits on a slow client.
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            continue;
        };
        let Some(server) = server.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let session = async {
                loop {
                    let len = tokio::time::timeout(TCP_READ_TIMEOUT, conn.read_u16())
                        .await
                        .ok()?
                        .ok()?;
                    let len = usize::from(len);
                    if len == 0 || len > MAX_TCP_MESSAGE {
                        return None;
                    }
                    let mut msg = vec![0u8; len];
                    tokio::time::timeout(TCP_READ_TIMEOUT, conn.read_exact(&mut msg))
                        .await
                        .ok()?
                        .ok()?;
                    let reply = server.answer(from.ip(), &msg, true).await?;
                    let rlen = u16::try_from(reply.len()).ok()?;
                    conn.write_all(&rlen.to_be_bytes()).await.ok()?;
                    conn.write_all(&reply).await.ok()?;
                }
            };
            let _: Option<()> = tokio::time::timeout(TCP_SESSION_TIMEOUT, session)
                .await
                .ok()
                .flatten();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Names for Fixed {
        fn lookup(&self, asker: IpAddr, name: &str) -> Option<Vec<IpAddr>> {
            (asker == IpAddr::from([172, 18, 0, 3]) && name == "web")
                .then(|| vec![IpAddr::from([172, 18, 0, 2])])
        }
        fn reverse(&self, _: IpAddr, addr: IpAddr) -> Option<String> {
            (addr == IpAddr::from([172, 18, 0, 2])).then(|| "web.net".to_owned())
        }
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut b = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            b.push(l.len() as u8);
            b.extend_from_slice(l.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&message::CLASS_IN.to_be_bytes());
        b
    }

    #[tokio::test]
    async fn own_names_are_answered_and_the_rest_forwarded() {
        // A stand-in upstream on loopback that answers everything with a fixed reply.
        let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up_addr = upstream.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                let _ = upstream.send_to(&reply, from).await;
            }
        });
        let server = Arc::new(DnsServer {
            names: OnceLock::new(),
            upstreams: vec![up_addr],
            listeners: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        });
        let names: Arc<dyn Names> = Arc::new(Fixed);
        server.set_names(Arc::downgrade(&names));
        let asker = IpAddr::from([172, 18, 0, 3]);

        let a = server
            .answer(asker, &query("web", message::TYPE_A), false)
            .await
            .expect("a");
        assert_eq!((a[3] & 0x0f, a[7]), (message::NOERROR, 1));
        assert_eq!(&a[a.len() - 4..], &[172, 18, 0, 2]);
        // Our name without an IPv6 address: NODATA, not forwarded.
        let aaaa = server
            .answer(asker, &query("web", message::TYPE_AAAA), false)
            .await
            .expect("aaaa");
        assert_eq!((aaaa[3] & 0x0f, aaaa[7]), (message::NOERROR, 0));
        let ptr = server
            .answer(
                asker,
                &query("2.0.18.172.in-addr.arpa", message::TYPE_PTR),
                false,
            )
            .await
            .expect("ptr");
        assert_eq!(ptr[7], 1);
        // Another asker does not see the name: forwarded, the upstream's reply comes back.
        let other = IpAddr::from([172, 18, 0, 9]);
        let q = query("web", message::TYPE_A);
        let fwd = server.answer(other, &q, false).await.expect("forwarded");
        assert_eq!(&fwd[..2], &q[..2]);
        assert_eq!(fwd.len(), q.len(), "the stand-in upstream's echo");
        // Garbage gets a SERVFAIL when it has an id, nothing when it has not.
        let bad = server
            .answer(asker, &[1, 2, 3], false)
            .await
            .expect("servfail");
        assert_eq!(bad[3] & 0x0f, message::SERVFAIL);
        assert!(server.answer(asker, &[1], false).await.is_none());
        // No upstream answering: SERVFAIL.
        let lonely = Arc::new(DnsServer {
            names: OnceLock::new(),
            upstreams: vec![],
            listeners: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        let sf = lonely.answer(asker, &q, false).await.expect("servfail");
        assert_eq!(sf[3] & 0x0f, message::SERVFAIL);
    }

    #[test]
    fn loopback_resolvers_are_not_forwarded_to() {
        let conf = "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fe80::1%eth0\nnameserver fd00::53\nsearch example\nnameserver bogus\n";
        assert_eq!(
            upstreams(conf),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().expect("addr"),
                "[fd00::53]:53".parse().expect("addr"),
            ]
        );
    }

    #[test]
    fn systemd_resolved_upstreams_stand_in_for_its_stub() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("resolv.conf");
        let resolved = dir.path().join("resolved.conf");
        std::fs::write(&etc, "nameserver 127.0.0.53\noptions edns0\n").expect("write");
        std::fs::write(&resolved, "nameserver 192.0.2.53\n").expect("write");
        let want: SocketAddr = "192.0.2.53:53".parse().expect("addr");
        assert_eq!(host_upstreams(&etc, &resolved), vec![want]);
        // A resolv.conf with a usable resolver is taken as it is.
        std::fs::write(&etc, "nameserver 10.0.0.2\n").expect("write");
        let own: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        assert_eq!(host_upstreams(&etc, &resolved), vec![own]);
        assert!(host_upstreams(&dir.path().join("no"), &dir.path().join("ne")).is_empty());
    }

    #[tokio::test]
    async fn tcp_queries_are_forwarded_over_tcp() {
        // An upstream on TCP only, answering with a reply too large for UDP.
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up_addr = upstream.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = upstream.accept().await {
                let len = usize::from(conn.read_u16().await.expect("len"));
                let mut q = vec![0u8; len];
                conn.read_exact(&mut q).await.expect("query");
                let mut reply = q.clone();
                reply[2] |= 0x80;
                reply.resize(6000, 0);
                conn.write_all(&6000u16.to_be_bytes()).await.expect("write");
                conn.write_all(&reply).await.expect("write");
            }
        });
        let server = Arc::new(DnsServer {
            names: OnceLock::new(),
            upstreams: vec![up_addr],
            listeners: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        });
        let q = query("big.example", message::TYPE_A);
        let reply = server
            .answer(IpAddr::from([172, 18, 0, 3]), &q, true)
            .await
            .expect("reply");
        assert_eq!(reply.len(), 6000);
        assert_eq!(&reply[..2], &q[..2]);
    }

    #[tokio::test]
    async fn tcp_sessions_are_capped_per_network_and_leave_udp_alone() {
        let server = Arc::new(DnsServer {
            names: OnceLock::new(),
            upstreams: vec![],
            listeners: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        });
        let names: Arc<dyn Names> = Arc::new(Fixed);
        server.set_names(Arc::downgrade(&names));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let subnet: IpNet = "127.0.0.0/8".parse().expect("subnet");
        let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_SESSIONS));
        tokio::spawn(serve_tcp(
            Arc::downgrade(&server),
            listener,
            subnet,
            sessions.clone(),
        ));
        // Idle sessions, as a container holding them open would keep them.
        let mut idle = Vec::new();
        for _ in 0..MAX_TCP_SESSIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        for _ in 0..100 {
            if sessions.available_permits() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sessions.available_permits(), 0);
        // One more is closed at once instead of waiting for a permit.
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed, not left waiting");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // UDP answers still: its permits are its own.
        assert_eq!(server.in_flight.available_permits(), MAX_IN_FLIGHT);
        let a = server
            .answer(
                IpAddr::from([172, 18, 0, 3]),
                &query("web", message::TYPE_A),
                false,
            )
            .await
            .expect("a");
        assert_eq!(a[7], 1);
        drop(idle);
    }
}
