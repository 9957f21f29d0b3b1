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
        for (key, value) in &req.sysctls {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(value.as_bytes()))
                .map_err(|e| format!("set sysctl {key}={value}: {e}"))?;
        }
        Ok(())
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
