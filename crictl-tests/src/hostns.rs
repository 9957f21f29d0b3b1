//! A network namespace that stands in for the host, one per test daemon.
//!
//! berthd runs in it, so everything pod networking does "on the host" — the bridge, the veths'
//! host ends, nftables rules, forwarding sysctls — happens there and vanishes with it: tests
//! never change the real host's network, and every daemon can use berth's default bridge and
//! subnet. Servers the tests run on the real host's loopback (registries, token servers) are
//! made reachable at the same address inside every stand-in by [`expose_everywhere`]: a proxy
//! thread listens there and connects out from the host namespace.

use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use anyhow::{Context, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Every live stand-in, and every host address they all expose.
struct Hub {
    namespaces: Vec<Weak<HostNs>>,
    addrs: Vec<SocketAddr>,
}

static HUB: Mutex<Hub> = Mutex::new(Hub {
    namespaces: Vec::new(),
    addrs: Vec::new(),
});

/// Makes the host's TCP server `addr` (a loopback address) reachable at the same address
/// inside every stand-in namespace, those of daemons running now and those started later.
pub fn expose_everywhere(addr: SocketAddr) {
    let mut hub = HUB.lock().unwrap_or_else(|p| p.into_inner());
    if hub.addrs.contains(&addr) {
        return;
    }
    hub.addrs.push(addr);
    hub.namespaces.retain(|w| w.strong_count() > 0);
    for ns in hub.namespaces.iter().filter_map(Weak::upgrade) {
        if let Err(e) = ns.expose(addr) {
            eprintln!("expose {addr} in {}: {e:#}", ns.name);
        }
    }
}

/// A named network namespace (`/run/netns/berth-test-…`) with loopback up; deleted on drop.
pub struct HostNs {
    name: String,
    path: PathBuf,
    proxies: Mutex<Vec<Proxy>>,
}

impl HostNs {
    /// Creates the namespace and exposes every address [`expose_everywhere`] was given.
    pub fn new() -> anyhow::Result<Arc<HostNs>> {
        let name = format!(
            "berth-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ip(&["netns", "add", &name])?;
        let ns = Arc::new(HostNs {
            path: Path::new("/run/netns").join(&name),
            name,
            proxies: Mutex::default(),
        });
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let mut hub = HUB.lock().unwrap_or_else(|p| p.into_inner());
        for addr in hub.addrs.clone() {
            ns.expose(addr)?;
        }
        hub.namespaces.retain(|w| w.strong_count() > 0);
        hub.namespaces.push(Arc::downgrade(&ns));
        Ok(ns)
    }

    /// The namespace's name, for `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pinned file, for `setns` and `nsenter --net=`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates stay there) and returns
    /// what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(&self.path).expect("open the stand-in namespace");
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&file).expect("enter the stand-in namespace");
                f()
            })
            .join()
            .expect("thread inside the stand-in namespace panicked")
        })
    }

    fn expose(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let file = File::open(&self.path).context("open the stand-in namespace")?;
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TcpListener> {
                enter(&file)?;
                TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))
            })
            .join()
            .expect("listener thread")
        })?;
        let listener = Arc::new(listener);
        let accept = listener.clone();
        // A new thread starts in its creator's namespace (the host's): the connections out
        // are made from there.
        let thread = std::thread::spawn(move || {
            for conn in accept.incoming() {
                let Ok(conn) = conn else { break };
                std::thread::spawn(move || splice(conn, addr));
            }
        });
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Proxy {
                listener,
                thread: Some(thread),
            });
        Ok(())
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        // Proxies first: their sockets would keep the namespace alive.
        self.proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// A listener in a stand-in and the thread accepting on it.
struct Proxy {
    listener: Arc<TcpListener>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes the blocked accept with an error.
        // SAFETY: the fd is valid for as long as `listener` lives.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways between a stand-in's client and the host server at `addr`. A server that
/// is down resets the client's connection.
fn splice(client: TcpStream, addr: SocketAddr) {
    let Ok(server) = TcpStream::connect(addr) else {
        // Linger 0: the close sends RST, the nearest thing to "connection refused".
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on an open socket with a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(Shutdown::Write);
    });
    let (mut c, mut s) = (client, server);
    let _ = io::copy(&mut s, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// Moves the calling thread into the network namespace `file`.
fn enter(file: &File) -> anyhow::Result<()> {
    // SAFETY: setns on an open namespace fd affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {args:?}"))?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
