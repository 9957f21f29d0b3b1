//! Detaching from berthd: double fork, own session, stdio away from the caller.
//!
//! The calling process stays until the shim reports through a pipe, so berthd's command
//! finishes only once the container is created (or creation failed and was cleaned up).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use api::shim::{Created, PID_FILE_NAME, SHIM_LOG_NAME};
use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::ForkResult;

use crate::{Error, Result};

/// Which process returned from [`detach`].
#[derive(Debug)]
pub enum Detached {
    /// The process berthd ran: the report was printed; exit with this code.
    Caller(ExitCode),
    /// The detached shim; it must report once through this.
    Shim(Report),
}

/// The shim's end of the report pipe.
#[derive(Debug)]
pub struct Report(File);

impl Report {
    /// Tells the caller the container was created (it prints `c` as a JSON line on stdout).
    pub fn created(mut self, c: &Created) {
        let json = serde_json::to_string(c).unwrap_or_default();
        self.send(&format!("ok {json}\n"));
    }

    /// Tells the caller creation failed (it prints `message` on stderr and exits non-zero).
    ///
    /// The pipe stays open until this process exits: the caller reads to EOF, so when it exits
    /// the shim is gone too, as the contract promises ("nothing left behind").
    pub fn failed(mut self, message: &str) {
        self.send(&format!("err {message}\n"));
        std::mem::forget(self);
    }

    fn send(&mut self, msg: &str) {
        // Nobody to tell if the caller is gone.
        let _ = self.0.write_all(msg.as_bytes());
    }
}

/// Forks twice and detaches; see [`Detached`]. In the shim: own session, cwd = `bundle`, stdin
/// and stdout on /dev/null, stderr on `<bundle>/shim.log`, no other inherited fd, child
/// subreaper, `<bundle>/shim.pid` written.
pub fn detach(bundle: &Path) -> Result<Detached> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::Detach)?;
    // SAFETY: nothing but the main thread runs yet (no runtime, no logging thread).
    match unsafe { nix::unistd::fork() }.map_err(Error::Detach)? {
        ForkResult::Parent { child } => {
            drop(w);
            let _ = waitpid(child, None);
            let mut answer = String::new();
            let _ = File::from(r).read_to_string(&mut answer);
            Ok(Detached::Caller(relay(&answer)))
        }
        ForkResult::Child => {
            drop(r);
            let report = Report(File::from(w));
            if let Err(e) = nix::unistd::setsid() {
                fail(report, &Error::Detach(e));
            }
            // SAFETY: still single-threaded.
            match unsafe { nix::unistd::fork() } {
                // SAFETY: the middle process has done its job; _exit runs no destructors.
                Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
                Ok(ForkResult::Child) => {}
                Err(e) => fail(report, &Error::Detach(e)),
            }
            match setup_shim(bundle, &report.0) {
                Ok(()) => Ok(Detached::Shim(report)),
                Err(e) => fail(report, &e),
            }
        }
    }
}

/// Reports `e` and leaves a forked process that has created nothing yet.
fn fail(report: Report, e: &Error) -> ! {
    report.failed(&e.chain());
    // SAFETY: _exit runs none of the caller's destructors or atexit handlers in the fork.
    unsafe { libc::_exit(1) }
}

/// Prints the shim's report as the calling process, and picks its exit code.
fn relay(answer: &str) -> ExitCode {
    let line = answer.lines().next().unwrap_or("");
    if let Some(json) = line.strip_prefix("ok ") {
        println!("{json}");
        ExitCode::SUCCESS
    } else if let Some(msg) = line.strip_prefix("err ") {
        eprintln!("berth-shim: {msg}");
        ExitCode::FAILURE
    } else {
        eprintln!("berth-shim: the shim exited without reporting (see {SHIM_LOG_NAME})");
        ExitCode::FAILURE
    }
}

fn setup_shim(bundle: &Path, report: &File) -> Result<()> {
    std::env::set_current_dir(bundle).map_err(|source| Error::Bundle {
        path: bundle.to_owned(),
        source,
    })?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| Error::Open {
            path: "/dev/null".into(),
            source,
        })?;
    let log_path = bundle.join(SHIM_LOG_NAME);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|source| Error::Open {
            path: log_path,
            source,
        })?;
    let dup = |r: nix::Result<()>| {
        r.map_err(|e| Error::Setup {
            what: "stdio",
            source: e.into(),
        })
    };
    dup(nix::unistd::dup2_stdin(&null))?;
    dup(nix::unistd::dup2_stdout(&null))?;
    dup(nix::unistd::dup2_stderr(&log))?;
    drop((null, log));
    crate::runtime::close_fds_except(&mut [report.as_raw_fd()]);
    // Orphaned processes of the container are re-parented to us, so the container's init
    // (whose parent, libcontainer's intermediate process, exits) becomes our child.
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| Error::Setup {
        what: "child subreaper",
        source: e.into(),
    })?;
    let pid_path = bundle.join(PID_FILE_NAME);
    std::fs::write(&pid_path, std::process::id().to_string()).map_err(|source| Error::Open {
        path: pid_path,
        source,
    })?;
    Ok(())
}
