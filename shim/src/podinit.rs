//! `berth-shim pod-init --pidfile <path>`: PID 1 of a pod's shared PID namespace (what a pause
//! container is elsewhere). See `api::pod_init` for the contract berthd relies on.
//!
//! The calling process unshares a PID namespace and forks: its child is PID 1 there. The caller
//! writes the child's pid (as berthd sees it) to the pid file, prints it and exits. The child
//! detaches (own session, cwd `/`, stdio on /dev/null, no other fd), blocks every signal and
//! then only waits for signals: SIGCHLD reaps every zombie the namespace hands it, SIGTERM and
//! SIGINT end it (which ends the namespace), everything else is ignored. It mounts nothing and
//! allocates nothing after the fork, so its resident set stays far below the shim's.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::WaitPidFlag;
use nix::unistd::{ForkResult, Pid};

use crate::{Error, Result};

/// Parses `--pidfile <path>` (the words after `pod-init`).
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<PathBuf> {
    let mut it = args.into_iter();
    let mut pidfile = None;
    while let Some(flag) = it.next() {
        match flag.to_str() {
            Some(api::pod_init::PIDFILE_FLAG) => {
                let v = it
                    .next()
                    .ok_or_else(|| Error::Usage("--pidfile needs a value".into()))?;
                pidfile = Some(PathBuf::from(v));
            }
            _ => return Err(Error::Usage(format!("unknown pod-init flag {flag:?}"))),
        }
    }
    let pidfile = pidfile.ok_or_else(|| Error::Usage("pod-init needs --pidfile".into()))?;
    if !pidfile.is_absolute() {
        return Err(Error::Usage(format!(
            "pod-init --pidfile must be absolute: {pidfile:?}"
        )));
    }
    Ok(pidfile)
}

/// Runs `pod-init`: returns in the calling process only (the init never returns).
pub fn run(pidfile: &Path) -> ExitCode {
    match start(pidfile) {
        Ok(pid) => {
            println!("{pid}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-shim pod-init: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}

fn start(pidfile: &Path) -> Result<i32> {
    // SAFETY: unshare only changes which PID namespace this process's future children get.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(Error::Setup {
            what: "pid namespace",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the shim is single-threaded here (no runtime, no logging thread), and the child
    // only makes async-signal-safe calls before it settles into its loop.
    match unsafe { nix::unistd::fork() }.map_err(Error::Detach)? {
        ForkResult::Child => init(),
        ForkResult::Parent { child } => {
            if let Err(e) = write_pidfile(pidfile, child.as_raw()) {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                return Err(e);
            }
            Ok(child.as_raw())
        }
    }
}

/// Writes `pid` to `path` atomically (temp file, rename): a reader sees all or nothing. No
/// fsync: a pid means nothing after a reboot, which is all an fsync would survive.
fn write_pidfile(path: &Path, pid: i32) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let open = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(open)?;
    f.write_all(pid.to_string().as_bytes()).map_err(open)?;
    std::fs::rename(&tmp, path).map_err(open)
}

/// PID 1 of the pod: never returns.
fn init() -> ! {
    // Own session: no terminal, no process group of berthd's. Cannot fail for a new child.
    let _ = nix::unistd::setsid();
    let _ = nix::unistd::chdir("/");
    // SAFETY: opening /dev/null and dup2-ing it onto 0..=2 only touches descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..=2 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    // SAFETY: close_range only closes descriptors; nothing above stderr is in use here.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    let all = SigSet::all();
    // Blocked signals stay pending for sigwaitinfo. The kernel drops signals sent to a
    // namespace's PID 1 from inside it only while they are unblocked with the default action.
    let _ = all.thread_block();
    drop_startup_pages();
    loop {
        // SAFETY: `all` is a valid, initialised sigset; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(all.as_ref(), std::ptr::null_mut()) };
        match sig {
            libc::SIGCHLD => reap_all(),
            // SAFETY: _exit ends the init at once; the kernel then kills the namespace.
            libc::SIGTERM | libc::SIGINT => unsafe { libc::_exit(0) },
            _ => {}
        }
    }
}

/// Unmaps the clean pages of the read-only file mappings (code, read-only data) that the shim's
/// startup faulted in: they would count against the init's RSS for ever. Like
/// `footprint::drop_clean_file_pages`, but nothing runs between the unmapping and the wait loop
/// except the `madvise` loop itself (no free, no parsing), because every page touched afterwards
/// faults its 64 KiB neighbourhood back in.
fn drop_startup_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    // (start, len, clean) of the file mapping being read; clean until an Anonymous line says no.
    let mut current: Option<(usize, usize, bool)> = None;
    let mut flush = |c: Option<(usize, usize, bool)>| {
        if let Some((start, len, true)) = c {
            ranges.push((start, len));
        }
    };
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Anonymous:") {
            if let Some(c) = current.as_mut() {
                c.2 &= kb.trim().trim_end_matches("kB").trim() == "0";
            }
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        flush(current.take());
        let file = f.nth(3).is_some_and(|p| p.starts_with('/'));
        if file && !perms.contains('w') && hi > lo {
            current = Some((lo, hi - lo, true));
        }
    }
    flush(current);
    drop(smaps);
    for &(start, len) in &ranges {
        // SAFETY: the mapping is read-only and holds no private page, so dropping its page
        // table entries loses nothing: later accesses refault the same file contents.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    }
    // Freeing would run allocator code that was just unmapped.
    std::mem::forget(ranges);
}

/// Reaps every child that has exited; signals coalesce, so one SIGCHLD may stand for many.
fn reap_all() {
    while let Ok(status) = nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<PathBuf> {
        parse(v.iter().map(OsString::from))
    }

    #[test]
    fn parses_pidfile() {
        assert_eq!(
            p(&["--pidfile", "/run/x/init.pid"]).expect("parse"),
            PathBuf::from("/run/x/init.pid")
        );
        assert!(p(&[]).is_err());
        assert!(p(&["--pidfile"]).is_err());
        assert!(p(&["--pidfile", "rel.pid"]).is_err());
        assert!(p(&["--bogus", "x"]).is_err());
    }
}
