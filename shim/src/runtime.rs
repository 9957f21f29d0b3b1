//! libcontainer operations, each run in a short-lived forked child ("helper").
//!
//! `build()` forks and blocks, and every libcontainer call pulls its code and its heap into the
//! calling process. Running them in a child keeps the long-lived monitor small: the monitor only
//! forks, waits for the helper and reads its one-line answer from a pipe.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use api::shim::ExecOverrides;
use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{Capability as SpecCapability, LinuxSeccomp, Process, Spec};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal as NixSignal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

/// Longest helper answer; one `write` under `PIPE_BUF` is atomic and never blocks on an empty
/// pipe.
const MAX_ANSWER: usize = 4000;

/// Where libcontainer keeps this container's state: `<bundle>/runtime` (one root per container).
pub fn state_root(bundle: &Path) -> PathBuf {
    bundle.join("runtime")
}

/// What the creating helper reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedInit {
    /// The init's pid in the host pid namespace.
    pub pid: i32,
    /// The file whose `oom_kill` counter tells whether the OOM killer hit the container
    /// (`memory.oom_control` on cgroup v1, `memory.events` on v2), if there is one.
    pub oom_file: Option<PathBuf>,
}

/// The container-side ends of stdio, handed to the container's init.
#[derive(Debug, Default)]
pub struct InitStdio {
    /// stdin (None: /dev/null, the shim's own stdin).
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: Option<OwnedFd>,
    /// stderr.
    pub stderr: Option<OwnedFd>,
    /// Console socket path, for `--tty`: the init sends its pty master there.
    pub console_socket: Option<PathBuf>,
}

/// Creates the container (state *created*) with libcontainer in a helper child. Every fd of the
/// monitor except `stdio` is closed in the helper, so the container's processes hold none of
/// them.
pub fn create(id: &str, bundle: &Path, stdio: InitStdio) -> Result<CreatedInit, String> {
    let keep = raw_fds([&stdio.stdin, &stdio.stdout, &stdio.stderr]);
    let answer = in_helper(&keep, || {
        let mut builder = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(state_root(bundle))
            .map_err(|e| chain(&e))?
            .with_console_socket(stdio.console_socket.as_ref());
        builder = with_stdio(builder, stdio.stdin, stdio.stdout, stdio.stderr);
        let container = builder
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| chain(&e))?;
        let pid = container
            .pid()
            .ok_or_else(|| "container created without an init pid".to_owned())?;
        let oom = oom_file(pid.as_raw()).unwrap_or_default();
        Ok(format!("{pid}\n{}", oom.display()))
    })?;
    let (pid, oom) = answer.split_once('\n').unwrap_or((&answer, ""));
    Ok(CreatedInit {
        pid: pid
            .parse()
            .map_err(|_| format!("bad answer from the create helper: {answer:?}"))?,
        oom_file: (!oom.is_empty()).then(|| PathBuf::from(oom)),
    })
}

/// The process-side ends of an exec'd process's stdio; `None` inherits the shim's (/dev/null for
/// stdin; never used for output: berthd always passes stdout and stderr).
#[derive(Debug, Default)]
pub struct ExecStdio {
    /// stdin.
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: Option<OwnedFd>,
    /// stderr.
    pub stderr: Option<OwnedFd>,
    /// Console socket path: the process gets a pseudo terminal (`process.terminal`) and sends its
    /// master there; the other fields are unused then.
    pub console_socket: Option<PathBuf>,
}

/// Starts `args` in the running container with the container's own process settings and returns
/// its pid once its `execve` succeeded. The process re-parents to the shim (child subreaper) when
/// libcontainer's intermediate processes exit.
///
/// libcontainer's tenant path rebuilds `linux` from namespaces and cgroups only, so it would run
/// the process without the container's seccomp filter. [`SeccompExecutor`] loads the filter just
/// before `execve` instead. Without `no_new_privs` the kernel only lets a process holding
/// CAP_SYS_ADMIN load a filter, so the process keeps CAP_SYS_ADMIN in its permitted set (never in
/// its bounding set, so `execve` could not keep it anyway) until the filter is loaded, then drops
/// it: what runc does by loading the filter before it drops privileges.
///
/// The tenant path joins only the cgroups libcontainer manages; on a hybrid host the helper
/// first joins the init's cgroup2 cgroup (see [`join_init_cgroup2`]).
pub fn exec(
    id: &str,
    bundle: &Path,
    exec_id: &str,
    args: &[String],
    overrides: &ExecOverrides,
    stdio: ExecStdio,
) -> Result<i32, String> {
    check_exec_id(exec_id)?;
    if args.is_empty() {
        return Err("exec needs a command".to_owned());
    }
    let keep = raw_fds([&stdio.stdin, &stdio.stdout, &stdio.stderr]);
    let process_file = bundle.join(format!("exec-{exec_id}.json"));
    let answer = in_helper(&keep, || {
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| chain(&e))?;
        let mut process = spec
            .process()
            .clone()
            .ok_or_else(|| "the container's spec has no process".to_owned())?;
        process.set_args(Some(args.to_vec()));
        apply_overrides(&mut process, overrides)?;
        let tty = stdio.console_socket.is_some();
        process.set_terminal(Some(tty));
        process.set_console_size(None);
        if tty {
            // As containerd does for a terminal exec: programs look at TERM to drive it.
            let mut env = process.env().clone().unwrap_or_default();
            env.retain(|e| !e.starts_with("TERM="));
            env.push("TERM=xterm".to_owned());
            process.set_env(Some(env));
        }
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let mut raise_admin = false;
        if seccomp.is_some()
            && process.no_new_privileges() != Some(true)
            && let Some(mut caps) = process.capabilities().clone()
        {
            let effective = caps.effective().clone().unwrap_or_default();
            if !effective.contains(&SpecCapability::SysAdmin) {
                let mut permitted = caps.permitted().clone().unwrap_or_default();
                permitted.insert(SpecCapability::SysAdmin);
                caps.set_permitted(Some(permitted));
                process.set_capabilities(Some(caps));
                raise_admin = true;
            }
        }
        let json = serde_json::to_vec(&process).map_err(|e| format!("encode process: {e}"))?;
        std::fs::write(&process_file, json)
            .map_err(|e| format!("write {}: {e}", process_file.display()))?;
        if let Some(init) = load(id, bundle)?.pid() {
            join_init_cgroup2(init.as_raw())?;
        }
        let mut builder = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(state_root(bundle))
            .map_err(|e| chain(&e))?
            .with_executor(SeccompExecutor {
                seccomp,
                raise_admin,
            })
            .with_console_socket(stdio.console_socket.as_ref());
        builder = with_stdio(builder, stdio.stdin, stdio.stdout, stdio.stderr);
        let built = builder
            .as_tenant()
            .with_process(Some(&process_file))
            .with_detach(true)
            .build();
        let _ = std::fs::remove_file(&process_file);
        if tty {
            remove_tty_links(&state_root(bundle).join(id));
        }
        let pid = built.map_err(|e| chain(&e))?;
        Ok(pid.to_string())
    });
    // The helper removes it; a helper that died half-way cannot.
    let _ = std::fs::remove_file(&process_file);
    let answer = answer?;
    answer
        .trim()
        .parse()
        .map_err(|_| format!("bad answer from the exec helper: {answer:?}"))
}

/// Applies docker's `exec -e -u -w` to the container's process settings.
fn apply_overrides(process: &mut Process, o: &ExecOverrides) -> Result<(), String> {
    if !o.env.is_empty() {
        let mut env = process.env().clone().unwrap_or_default();
        for e in &o.env {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            if key.is_empty() {
                return Err(format!("invalid environment entry {e:?}"));
            }
            env.retain(|old| old.split_once('=').map_or(old.as_str(), |(k, _)| k) != key);
            env.push(e.clone());
        }
        process.set_env(Some(env));
    }
    if let Some(cwd) = &o.cwd {
        if !cwd.starts_with('/') {
            return Err(format!("the working directory {cwd:?} is not absolute"));
        }
        process.set_cwd(PathBuf::from(cwd));
    }
    if let Some(u) = &o.user {
        let mut user = process.user().clone();
        user.set_uid(u.uid);
        user.set_gid(u.gid);
        user.set_additional_gids(Some(u.additional_gids.clone()));
        process.set_user(user);
    }
    Ok(())
}

/// libcontainer's tenant path links the console socket into the container's state dir for each
/// terminal exec and leaves the link behind. Execs run one at a time, so none is in use here.
fn remove_tty_links(container_dir: &Path) {
    for e in std::fs::read_dir(container_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("tenant-tty-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An exec id names files in the bundle: 1 to 64 ASCII letters, digits and `-`.
pub fn check_exec_id(exec_id: &str) -> Result<(), String> {
    if exec_id.is_empty()
        || exec_id.len() > 64
        || !exec_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!("invalid exec id {exec_id:?}"));
    }
    Ok(())
}

/// Runs in the exec'd process just before `execve`: loads the container's seccomp filter (see
/// [`exec`]), then hands over to libcontainer's default executor.
#[derive(Clone)]
struct SeccompExecutor {
    seccomp: Option<LinuxSeccomp>,
    /// CAP_SYS_ADMIN is permitted only to load the filter: raise it for that, drop it after.
    raise_admin: bool,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            let admin = caps::Capability::CAP_SYS_ADMIN;
            let fail = |what: &str, e: &dyn std::fmt::Display| {
                ExecutorError::Other(format!("{what}: {e}"))
            };
            if self.raise_admin {
                caps::raise(None, caps::CapSet::Effective, admin)
                    .map_err(|e| fail("raise CAP_SYS_ADMIN to load seccomp", &e))?;
            }
            libcontainer::seccomp::initialize_seccomp(seccomp)
                .map_err(|e| fail("load the seccomp filter", &e))?;
            if self.raise_admin {
                for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
                    caps::drop(None, set, admin)
                        .map_err(|e| fail("drop CAP_SYS_ADMIN after seccomp", &e))?;
                }
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Runs the user process of the created container.
pub fn start(id: &str, bundle: &Path) -> Result<(), String> {
    in_helper(&[], || {
        load(id, bundle)?.start().map_err(|e| chain(&e))?;
        Ok(String::new())
    })
    .map(drop)
}

/// Sends `signal` to every process of the container (its cgroup).
///
/// libcontainer marks the container stopped after any `kill`, even a harmless signal; the
/// monitor keeps its own state, so that only matters for a later `start` (refused).
pub fn kill_all(id: &str, bundle: &Path, signal: i32) -> Result<(), String> {
    in_helper(&[], || {
        let signal = Signal::try_from(signal).map_err(|e| chain(&e))?;
        load(id, bundle)?
            .kill(signal, true)
            .map_err(|e| chain(&e))?;
        Ok(String::new())
    })
    .map(drop)
}

/// Deletes the container: kills what is left in its cgroup, removes the cgroups and
/// libcontainer's state dir.
pub fn delete(id: &str, bundle: &Path) -> Result<(), String> {
    in_helper(&[], || {
        load(id, bundle)?.delete(true).map_err(|e| chain(&e))?;
        // The per-container root is ours; it is empty now.
        let _ = std::fs::remove_dir(state_root(bundle));
        Ok(String::new())
    })
    .map(drop)
}

/// Hands the given stdio fds to the process libcontainer starts.
fn with_stdio(
    mut builder: ContainerBuilder,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> ContainerBuilder {
    if let Some(fd) = stdin {
        builder = builder.with_stdin(fd);
    }
    if let Some(fd) = stdout {
        builder = builder.with_stdout(fd);
    }
    if let Some(fd) = stderr {
        builder = builder.with_stderr(fd);
    }
    builder
}

/// The raw numbers of the fds that are set (a helper keeps them open).
fn raw_fds(fds: [&Option<OwnedFd>; 3]) -> Vec<RawFd> {
    fds.into_iter().flatten().map(|f| f.as_raw_fd()).collect()
}

fn load(id: &str, bundle: &Path) -> Result<Container, String> {
    Container::load(state_root(bundle).join(id)).map_err(|e| chain(&e))
}

/// The error and its sources, `: `-separated (the helper's error crosses a process boundary as
/// text).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Where a hybrid host mounts cgroup2 (v1 controllers everywhere else).
const HYBRID_CGROUP2: &str = "/sys/fs/cgroup/unified";

/// Moves the calling process into the cgroup2 cgroup of the container's init, on a hybrid host.
///
/// berthd sets hugepage limits there itself when hugetlb lives only in the cgroup2 mount
/// (libcontainer's v1 manager never looks there) and moves the init in before it starts.
/// libcontainer's tenant path joins only the v1 cgroups, so an exec'd process would stay in the
/// shim's cgroup2 cgroup, outside the limits. Joining here, before libcontainer forks, makes the
/// process start inside. A no-op on v1-only and pure v2 hosts (where the tenant path joins the
/// init's cgroup itself) and when the init never left the shim's cgroup.
fn join_init_cgroup2(init: i32) -> Result<(), String> {
    let mount = Path::new(HYBRID_CGROUP2);
    let Some(target) = cgroup2_path(&format!("/proc/{init}/cgroup")) else {
        return Ok(());
    };
    if !mount.join("cgroup.controllers").exists()
        || cgroup2_path("/proc/self/cgroup").as_deref() == Some(target.as_str())
    {
        return Ok(());
    }
    let procs = mount
        .join(target.trim_start_matches('/'))
        .join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| format!("join {}: {e}", procs.display()))
}

/// The cgroup2 path (the `0::` line) of a `/proc/<pid>/cgroup` file.
fn cgroup2_path(file: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The OOM counter file of `pid`'s memory cgroup, from `/proc/<pid>/cgroup`.
fn oom_file(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some(
                Path::new("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.oom_control"),
            );
        }
        if controllers.is_empty() {
            v2 = Some(Path::new("/sys/fs/cgroup").join(path).join("memory.events"));
        }
    }
    v2.filter(|p| p.exists())
}

/// Forks a helper that runs `f` and reports its answer through a pipe; waits for it.
///
/// The helper closes every fd ≥ 3 but `keep` and its answer pipe, and restores the default
/// signal mask and SIGPIPE disposition (which the container's processes inherit).
fn in_helper(keep: &[RawFd], f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the monitor is single-threaded, so the child may run any code after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork helper: {e}"))? {
        ForkResult::Child => {
            drop(r);
            // A helper must not outlive the shim: berthd rolls a half-created container back
            // by killing the shim, and an orphaned helper would go on creating it.
            let _ = nix::sys::prctl::set_pdeathsig(NixSignal::SIGKILL);
            if nix::unistd::getppid() != parent {
                // SAFETY: as below.
                unsafe { libc::_exit(1) }
            }
            let mut keep = keep.to_vec();
            keep.push(w.as_raw_fd());
            close_fds_except(&mut keep);
            let _ = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            );
            // SAFETY: restoring a default disposition installs no handler.
            let _ = unsafe { nix::sys::signal::signal(NixSignal::SIGPIPE, SigHandler::SigDfl) };
            let (code, msg) = match f() {
                Ok(m) => (0, m),
                Err(m) => (1, m),
            };
            let msg = &msg.as_bytes()[..msg.len().min(MAX_ANSWER)];
            let _ = nix::unistd::write(&w, msg);
            // SAFETY: _exit skips atexit handlers and destructors that belong to the monitor.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let status = wait_for(child);
            // Other processes (the container's init) may still hold the write end, so read only
            // what is there instead of waiting for EOF.
            let mut answer = String::new();
            let mut file = std::fs::File::from(r);
            let _ = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
            let _ = file.read_to_string(&mut answer);
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(answer),
                Ok(WaitStatus::Exited(_, _)) if !answer.is_empty() => Err(answer),
                other => Err(format!("helper died: {other:?}")),
            }
        }
    }
}

fn wait_for(pid: Pid) -> nix::Result<WaitStatus> {
    loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// Closes every fd ≥ 3 that is not in `keep`.
pub fn close_fds_except(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut lo: u32 = 3;
    for &fd in keep.iter() {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd >= lo {
            if fd > lo {
                // SAFETY: close_range only closes descriptors; none in this range is in use.
                unsafe { libc::close_range(lo, fd - 1, 0) };
            }
            lo = fd + 1;
        }
    }
    // SAFETY: as above.
    unsafe { libc::close_range(lo, u32::MAX, 0) };
}
