//! Pod namespaces: created once in a short-lived thread and pinned by bind mounts of
//! `/proc/thread-self/ns/<kind>`, so they live without any process (no pause container).
//!
//! net, ipc and uts can be unshared by one thread of a multi-threaded process; the thread then
//! pins them, configures them from inside (hostname, loopback, namespaced sysctls) and exits.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Which namespaces to create, and what to set up inside them.
#[derive(Debug, Clone, Default)]
pub struct NsRequest {
    /// A new network namespace (else the host's).
    pub net: bool,
    /// A new IPC namespace.
    pub ipc: bool,
    /// A new UTS namespace.
    pub uts: bool,
    /// Hostname to set in the new UTS namespace.
    pub hostname: Option<String>,
    /// Sysctls (`net.ipv4.ip_forward` form) to write inside the new namespaces.
    pub sysctls: Vec<(String, String)>,
}

/// The kinds of namespaces berth pins, by their `/proc/<pid>/ns/` name.
pub const KINDS: [&str; 3] = ["net", "ipc", "uts"];

/// Creates the namespaces `req` asks for and pins each at `<dir>/<kind>`. On failure nothing is
/// left pinned. Returns the pinned paths.
pub fn pin(dir: &Path, req: &NsRequest) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let dir = dir.to_path_buf();
    let req = req.clone();
    std::thread::Builder::new()
        .name("berth-ns".into())
        .spawn(move || pin_in_this_thread(&dir, &req))
        .map_err(|e| format!("spawn namespace thread: {e}"))?
        .join()
        .map_err(|_| "namespace thread panicked".to_owned())?
}

fn pin_in_this_thread(dir: &Path, req: &NsRequest) -> Result<Vec<PathBuf>, String> {
    let mut flags = CloneFlags::empty();
    let mut kinds = Vec::new();
    if req.net {
        flags |= CloneFlags::CLONE_NEWNET;
        kinds.push("net");
    }
    if req.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
        kinds.push("ipc");
    }
    if req.uts {
        flags |= CloneFlags::CLONE_NEWUTS;
        kinds.push("uts");
    }
    if flags.is_empty() {
        return Ok(Vec::new());
    }
    nix::sched::unshare(flags).map_err(|e| format!("unshare {kinds:?} namespaces: {e}"))?;
    let mut pinned = Vec::new();
    let result = (|| {
        for kind in &kinds {
            let target = dir.join(kind);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|e| format!("create pin {}: {e}", target.display()))?;
            pinned.push(target.clone());
            let source = format!("/proc/thread-self/ns/{kind}");
            nix::mount::mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("pin {kind} namespace at {}: {e}", target.display()))?;
        }
        if let (true, Some(h)) = (req.uts, req.hostname.as_deref()) {
            nix::unistd::sethostname(h).map_err(|e| format!("set hostname {h:?}: {e}"))?;
        }
        if req.net {
            loopback_up()?;
        }
        write_sysctls(&req.sysctls)
    })();
    match result {
        Ok(()) => Ok(pinned),
        Err(e) => {
            let _ = unpin(&pinned);
            Err(e)
        }
    }
}

/// Brings `lo` up in the calling thread's network namespace.
fn loopback_up() -> Result<(), String> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket for loopback setup: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a valid socket fd and a properly initialised ifreq naming "lo"; the kernel fills
    // ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(format!(
            "read lo flags: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the flags member of the union is the initialised one.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: same fd and ifreq, now with IFF_UP set.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(format!("bring lo up: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Unmounts and removes pins. Safe to call twice: missing pins are fine. Keeps going after a
/// failure and reports every one.
pub fn unpin(pins: &[PathBuf]) -> Result<(), String> {
    let mut errors = Vec::new();
    for p in pins {
        match nix::mount::umount2(p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => errors.push(format!("unmount {}: {e}", p.display())),
        }
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", p.display())),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Whether `path` is a live namespace pin (an nsfs bind mount).
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// The name prefix of pool entries in the namespace root.
const POOL_PREFIX: &str = ".pool-";

/// Network, IPC and UTS namespaces made ahead of time, so a pod start does not wait for
/// `unshare` (a new network namespace alone costs milliseconds: every pernet subsystem
/// initialises). Each entry is a directory `<root>/.pool-<n>/` holding the three pins, `lo`
/// up, nothing else set. A pod takes one by renaming the directory to its own namespace dir
/// (the bind mounts move with it), then sets its hostname and sysctls from inside. A refill
/// thread keeps the pool full in the background.
#[derive(Debug)]
pub struct NsPool {
    root: PathBuf,
    size: usize,
    ready: std::sync::Mutex<Vec<PathBuf>>,
    filling: std::sync::atomic::AtomicBool,
    next: std::sync::atomic::AtomicU64,
}

impl NsPool {
    /// A pool of `size` entries under `root` (0: no pool). Entries a previous berthd left are
    /// released first: their namespaces may be from before a reboot. Fill it with
    /// [`NsPool::refill`].
    pub fn new(root: &Path, size: usize) -> std::sync::Arc<Self> {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(POOL_PREFIX) {
                release(&e.path());
            }
        }
        std::sync::Arc::new(NsPool {
            root: root.to_owned(),
            size,
            ready: std::sync::Mutex::default(),
            filling: std::sync::atomic::AtomicBool::new(false),
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries ready now.
    pub fn len(&self) -> usize {
        self.ready().len()
    }

    /// Whether no entry is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a background thread that tops the pool up, unless one runs already.
    pub fn refill(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.len() >= self.size || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-ns-pool".into())
            .spawn(move || {
                while pool.len() < pool.size {
                    let n = pool.next.fetch_add(1, Ordering::Relaxed);
                    let dir = pool.root.join(format!("{POOL_PREFIX}{n}"));
                    let req = NsRequest {
                        net: true,
                        ipc: true,
                        uts: true,
                        ..NsRequest::default()
                    };
                    match pin(&dir, &req) {
                        Ok(_) => pool.ready().push(dir),
                        Err(e) => {
                            let _ = std::fs::remove_dir(&dir);
                            tracing::warn!(error = %e, "namespace pool: cannot make namespaces");
                            break;
                        }
                    }
                }
                pool.filling.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            self.filling.store(false, Ordering::Release);
            tracing::warn!(error = %e, "namespace pool: cannot start the refill thread");
        }
    }

    /// Moves a ready entry to `dir` (which must not exist) and configures it as `req` asks:
    /// the pins, or None when the pool is empty or the entry could not be used (the caller
    /// then makes fresh namespaces). Only for requests of all three kinds.
    pub fn take(&self, dir: &Path, req: &NsRequest) -> Option<Result<Vec<PathBuf>, String>> {
        if !(req.net && req.ipc && req.uts) {
            return None;
        }
        let entry = self.ready().pop()?;
        if let Err(e) = std::fs::rename(&entry, dir) {
            tracing::warn!(entry = %entry.display(), error = %e, "namespace pool: cannot take an entry");
            release(&entry);
            return None;
        }
        let pins: Vec<PathBuf> = KINDS.iter().map(|k| dir.join(k)).collect();
        let configured = {
            let (pins, req) = (pins.clone(), req.clone());
            std::thread::Builder::new()
                .name("berth-ns".into())
                .spawn(move || configure_in_this_thread(&pins, &req))
                .map_err(|e| format!("spawn namespace thread: {e}"))
                .and_then(|t| {
                    t.join()
                        .map_err(|_| "namespace thread panicked".to_owned())?
                })
        };
        Some(match configured {
            Ok(()) => Ok(pins),
            Err(e) => {
                let _ = unpin(&pins);
                Err(e)
            }
        })
    }

    /// Releases every ready entry (berthd's shutdown).
    pub fn drain(&self) {
        for entry in std::mem::take(&mut *self.ready()) {
            release(&entry);
        }
    }
}

/// Unpins a pool entry's namespaces and removes its directory.
fn release(entry: &Path) {
    let pins: Vec<PathBuf> = KINDS.iter().map(|k| entry.join(k)).collect();
    if let Err(e) = unpin(&pins) {
        tracing::warn!(entry = %entry.display(), error = %e, "namespace pool: release an entry");
    }
    let _ = std::fs::remove_dir(entry);
}

/// Joins the pinned namespaces (`pins` in [`KINDS`] order) and sets the hostname and sysctls
/// `req` asks for.
fn configure_in_this_thread(pins: &[PathBuf], req: &NsRequest) -> Result<(), String> {
    for (pin, flag) in pins.iter().zip([
        CloneFlags::CLONE_NEWNET,
        CloneFlags::CLONE_NEWIPC,
        CloneFlags::CLONE_NEWUTS,
    ]) {
        let f = std::fs::File::open(pin).map_err(|e| format!("open {}: {e}", pin.display()))?;
        nix::sched::setns(&f, flag).map_err(|e| format!("join {}: {e}", pin.display()))?;
    }
    if let Some(h) = req.hostname.as_deref() {
        nix::unistd::sethostname(h).map_err(|e| format!("set hostname {h:?}: {e}"))?;
    }
    write_sysctls(&req.sysctls)
}

/// Writes namespaced sysctls (`net.ipv4.ip_forward` form) in the calling thread's namespaces.
fn write_sysctls(sysctls: &[(String, String)]) -> Result<(), String> {
    for (key, value) in sysctls {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| format!("set sysctl {key}={value}: {e}"))?;
    }
    Ok(())
}

/// Connects to `port` on loopback inside the network namespace pinned at `netns` (the calling
/// process's own when None): IPv4 first, then IPv6, as containerd does for port forwarding.
/// The socket stays in that namespace, whatever thread uses it later.
pub fn connect_loopback(
    netns: Option<&Path>,
    port: u16,
    timeout: std::time::Duration,
) -> Result<std::net::TcpStream, String> {
    let netns = netns.map(Path::to_path_buf);
    let connect = move || -> Result<std::net::TcpStream, String> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
            nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("join {}: {e}", ns.display()))?;
        }
        let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        std::net::TcpStream::connect_timeout(&v4, timeout).or_else(|e4| {
            std::net::TcpStream::connect_timeout(&v6, timeout)
                .map_err(|e6| format!("connect to localhost:{port}: {e4} (IPv6: {e6})"))
        })
    };
    // A thread of its own: setns changes the thread for good.
    std::thread::Builder::new()
        .name("berth-dial".into())
        .spawn(connect)
        .map_err(|e| format!("spawn dial thread: {e}"))?
        .join()
        .map_err(|_| "dial thread panicked".to_owned())?
}
