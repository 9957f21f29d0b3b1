//! The init of a pod's shared PID namespace (pod PID mode POD): `berth-shim pod-init`, whose
//! contract is in `api::pod_init`.
//!
//! berthd holds no handle on the init: it is found again (after a restart, or a crash half-way
//! through RunPodSandbox) through its pid file and recognised by its command line, which names
//! that pid file, and, once pinned, by its PID namespace being the pinned one. A pid that fails
//! either test belongs to somebody else now and is never signalled.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

/// The init's pid file, in the pod's namespace dir.
pub const PIDFILE: &str = "init.pid";
/// The PID namespace pin, in the pod's namespace dir.
pub const PIN: &str = "pid";

/// Starts the init with `shim`; it writes its pid to `pidfile`. Returns the pid.
pub fn spawn(shim: &Path, pidfile: &Path) -> Result<i32, String> {
    let out = std::process::Command::new(shim)
        .arg(api::pod_init::COMMAND)
        .arg(api::pod_init::PIDFILE_FLAG)
        .arg(pidfile)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", shim.display()))?;
    if !out.status.success() {
        return Err(format!(
            "start the pod's init: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|_| format!("{} pod-init printed {text:?}", shim.display()))
}

/// The pid recorded in `pidfile`, if any.
pub fn read_pidfile(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Pins the PID namespace of the init `pid` at `target`, then checks the init is still alive
/// and ours, so the pin is its namespace. On failure nothing is left pinned.
pub fn pin(pid: i32, pidfile: &Path, target: &Path) -> Result<PathBuf, String> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(|e| format!("create pin {}: {e}", target.display()))?;
    let source = format!("/proc/{pid}/ns/pid");
    let pinned = nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("pin pid namespace at {}: {e}", target.display()));
    let checked = pinned.and_then(|()| {
        if is_ours(pid, pidfile, Some(target)) {
            Ok(())
        } else {
            Err(format!(
                "the pod's init (pid {pid}) died while it was set up"
            ))
        }
    });
    match checked {
        Ok(()) => Ok(target.to_owned()),
        Err(e) => {
            let _ = super::ns_linux::unpin(&[target.to_owned()]);
            Err(e)
        }
    }
}

/// Whether `pid` is a live init started with `pidfile` and, when `pin` is given, whether its
/// PID namespace is the pinned one.
pub fn is_ours(pid: i32, pidfile: &Path, pin: Option<&Path>) -> bool {
    if pid <= 0 || !is_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if !cmdline_matches(&cmdline, pidfile) {
        return false;
    }
    match pin {
        None => true,
        Some(pin) => match (
            std::fs::metadata(pin),
            std::fs::metadata(format!("/proc/{pid}/ns/pid")),
        ) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        },
    }
}

/// `[<binary>, "pod-init", "--pidfile", <pidfile>]`, NUL-separated as in /proc/<pid>/cmdline.
fn cmdline_matches(cmdline: &[u8], pidfile: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(cmdline)
        .split(|b| *b == 0)
        .collect();
    args.len() == 4
        && args[1] == api::pod_init::COMMAND.as_bytes()
        && args[2] == api::pod_init::PIDFILE_FLAG.as_bytes()
        && args[3] == pidfile.as_os_str().as_bytes()
}

/// Whether `pid` exists and has not exited (a zombie has).
fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| process_state(&s))
        .is_some_and(|c| c != 'Z' && c != 'X')
}

/// The state letter of a `/proc/<pid>/stat` line (after the parenthesised command name, which
/// may itself hold spaces and parentheses).
fn process_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// SIGKILLs the init `pid` if it is still ours (which ends its namespace: the kernel kills what
/// is left in it) and waits up to two seconds for it to be gone. Ok when it is gone already.
pub fn kill(pid: i32, pidfile: &Path, pin: Option<&Path>) -> Result<(), String> {
    if !is_ours(pid, pidfile, pin) {
        return Ok(());
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill the pod's init (pid {pid}): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while is_alive(pid) {
        if Instant::now() > deadline {
            return Err(format!(
                "the pod's init (pid {pid}) outlived SIGKILL for 2 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_command_line() {
        let pf = Path::new("/run/berth/ns/abc/init.pid");
        assert!(cmdline_matches(
            b"/usr/bin/berth-shim\0pod-init\0--pidfile\0/run/berth/ns/abc/init.pid\0",
            pf
        ));
        for other in [
            &b""[..],
            b"/usr/bin/berth-shim\0pod-init\0--pidfile\0/run/berth/ns/abd/init.pid\0",
            b"/usr/bin/berth-shim\0--id\0x\0--bundle\0/run/berth/ns/abc/init.pid\0",
            b"sleep\0pod-init\0--pidfile\0/run/berth/ns/abc/init.pid\0extra\0",
        ] {
            assert!(!cmdline_matches(other, pf), "{other:?}");
        }
    }

    #[test]
    fn state_letter_after_odd_names() {
        assert_eq!(process_state("12 (sh) S 1 12"), Some('S'));
        assert_eq!(process_state("12 (a) b) Z 1 12"), Some('Z'));
        assert_eq!(process_state("garbage"), None);
    }

    #[test]
    fn a_stranger_is_never_ours() {
        let me = std::process::id() as i32;
        assert!(!is_ours(me, Path::new("/nonexistent/init.pid"), None));
        assert!(!is_ours(0, Path::new("/x"), None));
        assert!(kill(me, Path::new("/nonexistent/init.pid"), None).is_ok());
    }
}
