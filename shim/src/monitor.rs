//! The long-lived monitor: one poll loop over the SIGCHLD signalfd, the protocol socket, its
//! connections and the container's output.
//!
//! No async runtime: a poll loop is a few hundred lines and keeps the process far below its
//! 2 MiB RSS budget. libcontainer is only ever called in helper children ([`crate::runtime`]).

use std::fs::File;
use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use api::shim::{
    Created, EXIT_FILE_NAME, ExitStatus, PID_FILE_NAME, Request, Response, SOCKET_NAME, Status,
};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::attach::{Pump, Sink, StdinCopy};
use crate::crilog::{CriLog, LineSplitter, now_ns};
use crate::runtime::{self, InitStdio};
use crate::{Args, Error, Result};

/// The console socket libcontainer's init sends the pty master to (`--tty`).
const CONSOLE_SOCKET_NAME: &str = "console.sock";
/// After this long without events the monitor counts as idle and drops the clean code pages
/// that serving touched (see [`crate::footprint`]).
const IDLE_AFTER_MS: u16 = 500;
/// A request line longer than this closes the connection.
const MAX_REQUEST: usize = 64 * 1024;
/// Exited exec'd processes whose exit nobody collected are forgotten beyond this many (berthd
/// may have died before it asked).
const MAX_UNCLAIMED_EXECS: usize = 64;
/// File descriptors a connection may have sent ahead of the requests that use them.
const MAX_QUEUED_FDS: usize = 3;

/// The monitor of one container.
#[derive(Debug)]
pub struct Monitor {
    id: String,
    bundle: PathBuf,
    pid: i32,
    status: Status,
    started_at_ns: Option<i64>,
    exit: Option<ExitStatus>,
    oom_file: Option<PathBuf>,
    log: CriLog,
    outputs: Vec<Output>,
    /// The container was created with `--stdin`.
    has_stdin: bool,
    /// The container was created with `--tty`.
    tty: bool,
    /// The container's stdin, held for attach: the write end of its stdin pipe, or (`--tty`) a
    /// copy of the pty master. `None` without `--stdin`, and once closed.
    stdin: Option<File>,
    /// The pty master (`--tty`), for `Resize`; `None` once hung up.
    console: Option<File>,
    /// Attached readers of the container's output.
    sinks: Vec<Sink>,
    /// The attached writer of the container's stdin.
    stdin_copy: Option<StdinCopy>,
    /// An fd that goes with the answer being produced (the pty master of a tty exec).
    reply_fd: Option<OwnedFd>,
    signals: SignalFd,
    listener: UnixListener,
    conns: Vec<Conn>,
    /// Processes started with `Exec`, until their exit is collected.
    execs: Vec<ExecProc>,
    shutdown: bool,
}

/// A process started in the container by `Exec`.
#[derive(Debug)]
struct ExecProc {
    id: String,
    pid: i32,
    /// (code, signal) once reaped.
    exit: Option<(i32, Option<i32>)>,
}

/// What a connection's pending request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    /// The container's init to exit (`Wait`).
    Init,
    /// This exec'd process to exit (`WaitExec`).
    Exec(String),
}

/// One output stream of the container (a pipe, or the pty master with `--tty`).
#[derive(Debug)]
struct Output {
    file: File,
    /// `stdout` or `stderr`.
    stream: &'static str,
    split: LineSplitter,
    /// End of stream seen; removed at the end of the loop iteration.
    eof: bool,
}

/// A protocol connection: JSON lines in, JSON lines out, in order.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// File descriptors received (`SCM_RIGHTS`) and not yet taken by a request.
    fds: std::collections::VecDeque<OwnedFd>,
    /// File descriptors to send, each with the byte at its offset in the output stream.
    out_fds: std::collections::VecDeque<(u64, OwnedFd)>,
    /// Bytes written so far.
    sent: u64,
    /// A `Wait`/`WaitExec` is pending: later requests queue behind it.
    waiting: Option<Waiting>,
    /// The peer stopped sending (or broke the connection).
    eof: bool,
}

impl Monitor {
    /// Creates the container in the *created* state and the monitor's socket. On error nothing
    /// is left: no container state, no cgroup, no process.
    pub fn create(args: &Args) -> Result<Monitor> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        let setup = |what, e: nix::Error| Error::Setup {
            what,
            source: e.into(),
        };
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .map_err(|e| setup("signal mask", e))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| setup("signalfd", e))?;
        let log = CriLog::open(&args.log).map_err(|source| Error::Open {
            path: args.log.clone(),
            source,
        })?;

        let console_path = args.bundle.join(CONSOLE_SOCKET_NAME);
        let mut init_stdio = InitStdio::default();
        let mut outputs = Vec::new();
        let mut stdin = None;
        let mut console = None;
        if args.tty {
            let _ = std::fs::remove_file(&console_path);
            let l = UnixListener::bind(CONSOLE_SOCKET_NAME).map_err(|source| Error::Setup {
                what: "console socket",
                source,
            })?;
            console = Some(l);
            init_stdio.console_socket = Some(console_path.clone());
        } else {
            let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| setup("stdio pipe", e));
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            outputs.push(Output::new(out_r, "stdout"));
            outputs.push(Output::new(err_r, "stderr"));
            init_stdio.stdout = Some(out_w);
            init_stdio.stderr = Some(err_w);
            if args.stdin {
                let (in_r, in_w) = pipe()?;
                init_stdio.stdin = Some(in_r);
                stdin = Some(in_w);
            }
        }

        let created = runtime::create(&args.id, &args.bundle, init_stdio);
        if args.tty {
            let _ = std::fs::remove_file(&console_path);
        }
        let created = match created {
            Ok(c) => c,
            Err(msg) => {
                // libcontainer cleaned its state and cgroups; collect what is left of its
                // processes (an init that failed re-parents to us) and our own files.
                reap_leftovers();
                let _ = std::fs::remove_dir(runtime::state_root(&args.bundle));
                let _ = std::fs::remove_file(args.bundle.join(PID_FILE_NAME));
                return Err(Error::Create(msg));
            }
        };
        let delete_on_error = |e: Error| {
            if let Err(msg) = runtime::delete(&args.id, &args.bundle) {
                tracing::error!(container_id = %args.id, error = %msg, "delete after failed setup");
            }
            reap_leftovers();
            let _ = std::fs::remove_file(args.bundle.join(PID_FILE_NAME));
            e
        };
        let mut pty = None;
        if let Some(console) = console {
            let master = receive_pty_master(&console).map_err(|source| {
                delete_on_error(Error::Setup {
                    what: "pty master",
                    source,
                })
            })?;
            let copies = (master.try_clone(), master.try_clone());
            let (Ok(for_resize), Ok(for_stdin)) = copies else {
                return Err(delete_on_error(Error::Setup {
                    what: "pty master",
                    source: std::io::Error::last_os_error(),
                }));
            };
            outputs.push(Output::new(master, "stdout"));
            pty = Some(File::from(for_resize));
            if args.stdin {
                stdin = Some(for_stdin);
            }
        }
        let stdin = stdin.map(|fd| {
            let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
            File::from(fd)
        });
        // Relative to the bundle, the shim's working dir: socket paths are limited to 108
        // bytes, which a long state dir plus a 64-digit container id can exceed.
        let listener = bind_socket(std::path::Path::new(SOCKET_NAME)).map_err(|source| {
            delete_on_error(Error::Setup {
                what: "shim socket",
                source,
            })
        })?;
        Ok(Monitor {
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            pid: created.pid,
            status: Status::Created,
            started_at_ns: None,
            exit: None,
            oom_file: created.oom_file,
            log,
            outputs,
            has_stdin: args.stdin,
            tty: args.tty,
            stdin,
            console: pty,
            sinks: Vec::new(),
            stdin_copy: None,
            reply_fd: None,
            signals,
            listener,
            conns: Vec::new(),
            execs: Vec::new(),
            shutdown: false,
        })
    }

    /// The report for berthd.
    pub fn created(&self) -> Created {
        Created {
            shim_pid: std::process::id().try_into().unwrap_or(i32::MAX),
            pid: self.pid,
        }
    }

    /// The init's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Serves until a `Shutdown` has been answered.
    pub fn run(&mut self) {
        // What ran to create the container is not needed any more.
        crate::footprint::drop_clean_file_pages();
        // The init may have exited before the signalfd was polled the first time.
        self.reap();
        // Code run since the last drop of clean pages: dropped again once idle (see footprint).
        let mut dirty = false;
        while !self.shutdown {
            let timeout = if dirty {
                PollTimeout::from(IDLE_AFTER_MS)
            } else {
                PollTimeout::NONE
            };
            // What is polled, in order; handling the first ones may add connections.
            let (n_outputs, n_conns, n_sinks) =
                (self.outputs.len(), self.conns.len(), self.sinks.len());
            let revents = match self.poll(timeout) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "poll");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            if revents.iter().all(|r| r.is_empty()) {
                if dirty {
                    crate::footprint::drop_clean_file_pages();
                    dirty = false;
                }
                continue;
            }
            dirty = true;
            let mut it = revents.into_iter();
            if it.next().is_some_and(|r| !r.is_empty()) {
                while let Ok(Some(_)) = self.signals.read_signal() {}
                self.reap();
            }
            if it.next().is_some_and(|r| !r.is_empty()) {
                self.accept();
            }
            let out_events: Vec<PollFlags> = it.by_ref().take(n_outputs).collect();
            for (i, r) in out_events.into_iter().enumerate() {
                if !r.is_empty() {
                    self.read_output(i, false);
                }
            }
            let conn_events: Vec<PollFlags> = it.by_ref().take(n_conns).collect();
            // Attach fds come last: serving a connection may add some.
            let sink_events: Vec<PollFlags> = it.by_ref().take(n_sinks).collect();
            for (sink, r) in self.sinks.iter_mut().zip(sink_events) {
                if r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                    sink.kill("the attached reader closed its pipe");
                } else if r.contains(PollFlags::POLLOUT) {
                    sink.flush();
                }
            }
            // The attached writer's input (when polled), then the container's stdin.
            let stdin_events: Vec<PollFlags> = it.collect();
            if stdin_events.iter().any(|r| !r.is_empty()) {
                let refused = stdin_events
                    .last()
                    .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
                self.pump_stdin(refused);
            }
            for i in (0..conn_events.len()).rev() {
                if !conn_events[i].is_empty() {
                    self.serve(i, conn_events[i]);
                }
            }
            self.outputs.retain(|o| !o.eof);
            self.drop_finished_sinks();
            // Half-closed connections whose last answer went out on exit.
            self.conns
                .retain(|c| !(c.eof && c.wbuf.is_empty() && c.waiting.is_none()));
        }
        let _ = std::fs::remove_file(self.bundle.join(SOCKET_NAME));
        let _ = std::fs::remove_file(self.bundle.join(PID_FILE_NAME));
    }

    /// Polls every fd; returns revents in the order signalfd, listener, outputs, connections,
    /// attached readers, attached writer (its input, the container's stdin).
    fn poll(&self, timeout: PollTimeout) -> nix::Result<Vec<PollFlags>> {
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            self.outputs
                .iter()
                .map(|o| PollFd::new(o.file.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(self.conns.iter().map(|c| {
            let mut ev = PollFlags::empty();
            if !c.eof {
                ev |= PollFlags::POLLIN;
            }
            if !c.wbuf.is_empty() {
                ev |= PollFlags::POLLOUT;
            }
            PollFd::new(c.stream.as_fd(), ev)
        }));
        // POLLERR (the reader went away) is reported even when not asked for.
        fds.extend(self.sinks.iter().map(|s| {
            let ev = if s.pending() {
                PollFlags::POLLOUT
            } else {
                PollFlags::empty()
            };
            PollFd::new(s.fd(), ev)
        }));
        if let (Some(copy), Some(stdin)) = (&self.stdin_copy, &self.stdin) {
            // Left out while not wanted: its POLLHUP would wake every poll.
            if copy.wants_read() {
                fds.push(PollFd::new(copy.src(), PollFlags::POLLIN));
            }
            let ev = if copy.wants_write() {
                PollFlags::POLLOUT
            } else {
                PollFlags::empty()
            };
            fds.push(PollFd::new(stdin.as_fd(), ev));
        }
        loop {
            match poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        Ok(fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect())
    }

    /// Reaps every exited child; only the container's init counts.
    fn reap(&mut self) {
        loop {
            let (pid, code, signal) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code, None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32, Some(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waitpid");
                    return;
                }
            };
            if pid.as_raw() == self.pid && self.exit.is_none() {
                self.init_exited(code, signal);
            } else if let Some(i) = self
                .execs
                .iter()
                .position(|e| e.pid == pid.as_raw() && e.exit.is_none())
            {
                self.exec_exited(i, code, signal);
            }
        }
    }

    /// Records the exit on disk, then answers whoever waits for it.
    fn init_exited(&mut self, code: i32, signal: Option<i32>) {
        let exited_at_ns = now_ns();
        // What the container wrote before it exited is in the pipes already: log it first, so
        // the log is complete when berthd learns about the exit.
        for i in 0..self.outputs.len() {
            self.read_output(i, true);
        }
        let exit = ExitStatus {
            code,
            signal,
            exited_at_ns,
            oom_killed: self.oom_file.as_deref().is_some_and(oom_killed),
        };
        if let Err(e) = write_exit_file(&self.bundle, &exit) {
            tracing::error!(container_id = %self.id, error = %e, "write exit file");
        }
        tracing::info!(container_id = %self.id, code, ?signal, oom_killed = exit.oom_killed, "container exited");
        self.exit = Some(exit);
        self.status = Status::Stopped;
        // Nobody reads the container's stdin any more: the attached writer's pipe closes.
        self.stdin_copy = None;
        self.wake(&Waiting::Init);
    }

    /// Records an exec'd process's exit and answers whoever waits for it.
    fn exec_exited(&mut self, i: usize, code: i32, signal: Option<i32>) {
        tracing::debug!(container_id = %self.id, exec_id = %self.execs[i].id, code, ?signal, "exec exited");
        self.execs[i].exit = Some((code, signal));
        let id = self.execs[i].id.clone();
        self.wake(&Waiting::Exec(id));
        // Bound what nobody collects: drop the oldest unclaimed exits.
        let unclaimed = self.execs.iter().filter(|e| e.exit.is_some()).count();
        if unclaimed > MAX_UNCLAIMED_EXECS
            && let Some(oldest) = self.execs.iter().position(|e| e.exit.is_some())
        {
            self.execs.remove(oldest);
        }
    }

    /// Answers the connections waiting for `what`, then lets them go on with their next requests.
    fn wake(&mut self, what: &Waiting) {
        for i in 0..self.conns.len() {
            if self.conns[i].waiting.as_ref() == Some(what) {
                self.conns[i].waiting = None;
                let r = match what {
                    Waiting::Init => Some(self.state()),
                    Waiting::Exec(id) => self.collect_exec(id),
                };
                if let Some(r) = r {
                    self.conns[i].push(&r);
                }
                self.process(i);
                self.conns[i].flush();
            }
        }
    }

    /// The exit of exec `id` (forgetting it), `None` while it runs.
    fn collect_exec(&mut self, id: &str) -> Option<Response> {
        let i = self.execs.iter().position(|e| e.id == id)?;
        let (code, signal) = self.execs[i].exit?;
        self.execs.remove(i);
        Some(Response::ExecExit { code, signal })
    }

    /// Reads what output is available; `drain` reads until nothing is left. At end of stream
    /// the splitter's tail is logged and the output marked for removal.
    fn read_output(&mut self, i: usize, drain: bool) {
        let mut buf = [0u8; 16 * 1024];
        while !self.outputs[i].eof {
            let out = &mut self.outputs[i];
            match out.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = out.split.feed(&mut self.log, &buf[..n]) {
                        tracing::warn!(container_id = %self.id, error = %e, "write container log");
                    }
                    let stream = out.stream;
                    for sink in self.sinks.iter_mut().filter(|s| s.stream() == stream) {
                        sink.feed(&buf[..n]);
                    }
                    if !drain {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // EIO: the pty's last slave fd closed.
                Err(_) => break,
            }
        }
        let out = &mut self.outputs[i];
        if !out.eof {
            out.eof = true;
            if let Err(e) = out.split.finish(&mut self.log) {
                tracing::warn!(container_id = %self.id, error = %e, "write container log");
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.conns.push(Conn {
                            stream,
                            rbuf: Vec::new(),
                            wbuf: Vec::new(),
                            fds: Default::default(),
                            out_fds: Default::default(),
                            sent: 0,
                            waiting: None,
                            eof: false,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads, handles and answers what connection `i` sent; drops it when it is done or the
    /// peer is gone (POLLHUP is reported even when not asked for, so keeping it would spin).
    fn serve(&mut self, i: usize, revents: PollFlags) {
        self.conns[i].read();
        self.process(i);
        self.conns[i].flush();
        let c = &self.conns[i];
        let hangup = revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR);
        if hangup || (c.eof && c.wbuf.is_empty() && c.waiting.is_none()) {
            self.conns.remove(i);
        }
    }

    /// Handles complete request lines of connection `i` until one must wait.
    fn process(&mut self, i: usize) {
        while self.conns[i].waiting.is_none() && !self.shutdown {
            let Some(nl) = self.conns[i].rbuf.iter().position(|&b| b == b'\n') else {
                if self.conns[i].rbuf.len() > MAX_REQUEST {
                    self.conns[i].rbuf.clear();
                    self.conns[i].eof = true;
                }
                return;
            };
            let line: Vec<u8> = self.conns[i].rbuf.drain(..=nl).collect();
            let response = match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    tracing::debug!(container_id = %self.id, request = ?req, "request");
                    self.handle(req, i)
                }
                Err(e) => Ok(error(format!("bad request: {e}"))),
            };
            match response {
                Ok(r) => {
                    if let Some(fd) = self.reply_fd.take() {
                        self.conns[i].push_fd(fd);
                    }
                    self.conns[i].push(&r);
                }
                Err(w) => self.conns[i].waiting = Some(w),
            }
            if self.shutdown {
                self.conns[i].flush_blocking();
            }
        }
    }

    /// Answers one request of connection `conn`; `Err` names what the answer waits for.
    fn handle(&mut self, req: Request, conn: usize) -> std::result::Result<Response, Waiting> {
        Ok(match req {
            Request::State => self.state(),
            Request::Wait if self.status == Status::Stopped => self.state(),
            Request::Wait => return Err(Waiting::Init),
            Request::Exec {
                exec_id,
                args,
                stdin,
                stdout,
                stderr,
                tty,
                overrides,
            } => {
                let [stdin, stdout, stderr] = self.conns[conn].take_fds([stdin, stdout, stderr]);
                if tty && (stdin.is_some() || stdout.is_some() || stderr.is_some()) {
                    error("a tty exec takes no stdio fds: the terminal is its stdio".to_owned())
                } else {
                    let stdio = runtime::ExecStdio {
                        stdin,
                        stdout,
                        stderr,
                        console_socket: None,
                    };
                    self.exec(exec_id, &args, &overrides, stdio, tty)
                }
            }
            Request::Attach {
                stdin,
                stdout,
                stderr,
                close_stdin_on_eof,
            } => {
                let wanted = [stdin, stdout, stderr];
                let fds = self.conns[conn].take_fds(wanted);
                self.attach(wanted, fds, close_stdin_on_eof)
            }
            Request::Resize { width, height } => self.resize(width, height),
            Request::WaitExec { exec_id } => match self.collect_exec(&exec_id) {
                Some(r) => r,
                None if self.execs.iter().any(|e| e.id == exec_id) => {
                    return Err(Waiting::Exec(exec_id));
                }
                None => error(format!("no exec {exec_id:?}")),
            },
            Request::KillExec { exec_id, signal } => self.kill_exec(&exec_id, signal),
            Request::Start => self.start(),
            Request::Kill { signal, all } => self.kill(signal, all),
            Request::ReopenLog => match self.log.reopen() {
                Ok(()) => Response::Ok,
                Err(e) => error(format!("reopen log: {e}")),
            },
            Request::Shutdown => self.delete(),
        })
    }

    fn state(&self) -> Response {
        Response::State {
            status: self.status,
            pid: self.pid,
            started_at_ns: self.started_at_ns,
            exit: self.exit.clone(),
        }
    }

    fn start(&mut self) -> Response {
        if self.status != Status::Created || self.started_at_ns.is_some() {
            return error(format!(
                "cannot start a container in state {:?}",
                self.status
            ));
        }
        match runtime::start(&self.id, &self.bundle) {
            Ok(()) => {
                self.started_at_ns = Some(now_ns());
                self.status = Status::Running;
                tracing::info!(container_id = %self.id, "container started");
                // It may have exited already; the SIGCHLD is pending then.
                self.reap();
                Response::Ok
            }
            Err(msg) => error(format!("start: {msg}")),
        }
    }

    fn exec(
        &mut self,
        exec_id: String,
        args: &[String],
        overrides: &api::shim::ExecOverrides,
        mut stdio: runtime::ExecStdio,
        tty: bool,
    ) -> Response {
        if self.status != Status::Running {
            return error(format!(
                "cannot exec in a container in state {:?}",
                self.status
            ));
        }
        if self.execs.iter().any(|e| e.id == exec_id) {
            return error(format!("exec id {exec_id:?} is in use"));
        }
        if let Err(msg) = runtime::check_exec_id(&exec_id) {
            return error(format!("exec: {msg}"));
        }
        // Relative to the bundle (the shim's working dir), as the container's console socket.
        let console_name = format!("tty-{exec_id}.sock");
        let console = if tty {
            let _ = std::fs::remove_file(&console_name);
            match UnixListener::bind(&console_name) {
                Ok(l) => {
                    stdio.console_socket = Some(self.bundle.join(&console_name));
                    Some(l)
                }
                Err(e) => return error(format!("exec: console socket: {e}")),
            }
        } else {
            None
        };
        let started = runtime::exec(&self.id, &self.bundle, &exec_id, args, overrides, stdio);
        if tty {
            let _ = std::fs::remove_file(&console_name);
        }
        let pid = match started {
            Ok(pid) => pid,
            Err(msg) => return error(format!("exec: {msg}")),
        };
        tracing::debug!(container_id = %self.id, %exec_id, pid, tty, "exec started");
        self.execs.push(ExecProc {
            id: exec_id,
            pid,
            exit: None,
        });
        if let Some(console) = console {
            match receive_pty_master(&console) {
                Ok(master) => self.reply_fd = Some(master),
                Err(e) => {
                    // Without its terminal nobody can talk to it: end it (its exit is kept
                    // like any other, for a WaitExec).
                    // SAFETY: kill(2) has no memory effects; the process is our child and not
                    // reaped yet, so the pid cannot have been reused.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return error(format!("exec: receive the pty master: {e}"));
                }
            }
        }
        // It may have exited already; the SIGCHLD is pending then.
        self.reap();
        Response::Exec { pid }
    }

    /// Connects attached readers to the container's output and an attached writer to its stdin.
    /// `fds` are those the request came with, in the order of `wanted` (stdin, stdout, stderr).
    fn attach(
        &mut self,
        wanted: [bool; 3],
        fds: [Option<OwnedFd>; 3],
        close_stdin_on_eof: bool,
    ) -> Response {
        let [stdin, stdout, stderr] = fds;
        if self.status == Status::Stopped {
            return error("cannot attach to a stopped container".to_owned());
        }
        if !wanted.iter().any(|&w| w) {
            return error("attach needs at least one of stdin, stdout and stderr".to_owned());
        }
        let got = [&stdin, &stdout, &stderr];
        if wanted.iter().zip(got).any(|(&w, fd)| w != fd.is_some()) {
            return error("attach: a file descriptor is missing for a stream it names".to_owned());
        }
        if stderr.is_some() && self.tty {
            return error(
                "the container has a terminal: its output comes on stdout alone, there is no \
                 stderr to attach to"
                    .to_owned(),
            );
        }
        if let Some(fd) = stdin {
            if !self.has_stdin {
                return error("the container was created without stdin".to_owned());
            }
            if self.stdin.is_none() {
                return error("the container's stdin is closed".to_owned());
            }
            if self.stdin_copy.is_some() {
                return error(
                    "another attacher is writing to the container's stdin; only one may".to_owned(),
                );
            }
            self.stdin_copy = Some(StdinCopy::new(fd, close_stdin_on_eof));
        }
        if let Some(fd) = stdout {
            self.sinks.push(Sink::new(fd, "stdout"));
        }
        if let Some(fd) = stderr {
            self.sinks.push(Sink::new(fd, "stderr"));
        }
        tracing::debug!(container_id = %self.id, ?wanted, close_stdin_on_eof, "attached");
        Response::Ok
    }

    /// Copies what the attached writer sent into the container's stdin; `refused`: poll said
    /// the container's stdin is gone.
    fn pump_stdin(&mut self, refused: bool) {
        let (Some(copy), Some(stdin)) = (&mut self.stdin_copy, &mut self.stdin) else {
            return;
        };
        let state = if refused {
            Pump::Broken
        } else {
            copy.pump(stdin)
        };
        match state {
            Pump::Going => {}
            Pump::Broken => {
                tracing::debug!(container_id = %self.id, "the container's stdin is closed: attached stdin detached");
                self.stdin_copy = None;
            }
            Pump::Ended => {
                let close = copy.close_on_eof;
                self.stdin_copy = None;
                if close {
                    tracing::debug!(container_id = %self.id, "attached stdin ended: closing the container's stdin");
                    self.stdin = None;
                    if self.console.is_some() {
                        self.hang_up();
                    }
                }
            }
        }
    }

    /// Closes every copy of the pty master, as containerd does when a terminal's stdin closes:
    /// the container's session gets SIGHUP. What it wrote before is logged first.
    fn hang_up(&mut self) {
        self.console = None;
        self.stdin = None;
        for i in 0..self.outputs.len() {
            self.read_output(i, true);
            let out = &mut self.outputs[i];
            if !out.eof {
                out.eof = true;
                if let Err(e) = out.split.finish(&mut self.log) {
                    tracing::warn!(container_id = %self.id, error = %e, "write container log");
                }
            }
        }
    }

    /// Drops attached readers that are dead, and those with nothing left to write once their
    /// stream ended (or the container stopped).
    fn drop_finished_sinks(&mut self) {
        let stopped = self.status == Status::Stopped;
        let outputs = &self.outputs;
        let id = &self.id;
        self.sinks.retain(|s| {
            if let Some(why) = s.dead() {
                tracing::info!(container_id = %id, stream = s.stream(), reason = why, "attached reader dropped");
                return false;
            }
            let open = outputs.iter().any(|o| o.stream == s.stream() && !o.eof);
            s.pending() || (open && !stopped)
        });
    }

    /// Sets the size of the container's terminal.
    fn resize(&mut self, width: u16, height: u16) -> Response {
        let Some(console) = &self.console else {
            return error("the container has no terminal to resize".to_owned());
        };
        match set_window_size(console.as_fd(), width, height) {
            Ok(()) => Response::Ok,
            Err(e) => error(format!("resize the terminal: {e}")),
        }
    }

    fn kill_exec(&mut self, exec_id: &str, signal: i32) -> Response {
        let Some(e) = self.execs.iter().find(|e| e.id == exec_id) else {
            return error(format!("no exec {exec_id:?}"));
        };
        if e.exit.is_some() {
            return Response::Ok;
        }
        // SAFETY: kill(2) has no memory effects; the process is our child and not reaped yet, so
        // the pid cannot have been reused.
        match unsafe { libc::kill(e.pid, signal) } {
            0 => Response::Ok,
            _ => error(format!("kill exec: {}", std::io::Error::last_os_error())),
        }
    }

    fn kill(&mut self, signal: i32, all: bool) -> Response {
        if Signal::try_from(signal).is_err()
            && !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal)
        {
            return error(format!("invalid signal {signal}"));
        }
        if all {
            // Also after the init exited: without a pid namespace its children may live on.
            return match runtime::kill_all(&self.id, &self.bundle, signal) {
                Ok(()) => Response::Ok,
                Err(_) if self.status == Status::Stopped => Response::Ok,
                Err(msg) => error(format!("kill: {msg}")),
            };
        }
        if self.status == Status::Stopped {
            return Response::Ok;
        }
        // SAFETY: kill(2) has no memory effects; the init is our child and not reaped yet
        // (status is not stopped), so the pid cannot have been reused.
        match unsafe { libc::kill(self.pid, signal) } {
            0 => Response::Ok,
            _ => error(format!("kill: {}", std::io::Error::last_os_error())),
        }
    }

    fn delete(&mut self) -> Response {
        if self.status == Status::Running {
            return error("cannot delete a running container".to_owned());
        }
        match runtime::delete(&self.id, &self.bundle) {
            Ok(()) => {
                self.shutdown = true;
                tracing::info!(container_id = %self.id, "container deleted");
                Response::Ok
            }
            Err(msg) => error(format!("delete: {msg}")),
        }
    }
}

impl Output {
    fn new(fd: OwnedFd, stream: &'static str) -> Output {
        let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        Output {
            file: File::from(fd),
            stream,
            split: LineSplitter::new(stream),
            eof: false,
        }
    }
}

impl Conn {
    /// Reads what the peer sent, with any file descriptors passed along.
    fn read(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.recv(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    self.wbuf.clear();
                    self.out_fds.clear();
                    self.rbuf.clear();
                    return;
                }
            }
        }
    }

    /// One `recvmsg`: bytes into `buf`, passed fds onto the queue (beyond the queue's bound they
    /// are closed).
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_QUEUED_FDS]);
        let msg = recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        let n = msg.bytes;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel just installed this fd in our table for us alone.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if self.fds.len() < MAX_QUEUED_FDS {
                        self.fds.push_back(fd);
                    }
                }
            }
        }
        Ok(n)
    }

    /// Takes the fds a request names, in order (a missing one is `None`).
    fn take_fds(&mut self, wanted: [bool; 3]) -> [Option<OwnedFd>; 3] {
        wanted.map(|w| if w { self.fds.pop_front() } else { None })
    }

    /// Sends `fd` with the next byte pushed.
    fn push_fd(&mut self, fd: OwnedFd) {
        let at = self.sent + self.wbuf.len() as u64;
        self.out_fds.push_back((at, fd));
    }

    fn push(&mut self, r: &Response) {
        match serde_json::to_vec(r) {
            Ok(v) => self.wbuf.extend_from_slice(&v),
            Err(e) => tracing::error!(error = %e, "encode response"),
        }
        self.wbuf.push(b'\n');
    }

    /// Writes what the socket takes now; queued fds go with their bytes.
    fn flush(&mut self) {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        while !self.wbuf.is_empty() {
            // Up to the next byte that carries an fd; from it, with the fd.
            let mut len = self.wbuf.len();
            let mut fd = None;
            for (k, (at, f)) in self.out_fds.iter().enumerate().take(2) {
                if k == 0 && *at == self.sent {
                    fd = Some(f.as_raw_fd());
                } else {
                    len = len.min(usize::try_from(at - self.sent).unwrap_or(usize::MAX));
                    break;
                }
            }
            let chunk = &self.wbuf[..len];
            let res = match fd {
                Some(fd) => sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &[std::io::IoSlice::new(chunk)],
                    &[ControlMessage::ScmRights(&[fd])],
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from),
                None => self.stream.write(chunk),
            };
            match res {
                Ok(n) => {
                    self.wbuf.drain(..n);
                    self.sent += n as u64;
                    if fd.is_some() {
                        // Ours is closed: the peer holds the only copy now.
                        self.out_fds.pop_front();
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.wbuf.clear();
                    self.out_fds.clear();
                    self.eof = true;
                    self.rbuf.clear();
                    return;
                }
            }
        }
    }

    /// The last answer before the shim exits: wait until it is written.
    fn flush_blocking(&mut self) {
        let _ = self.stream.set_nonblocking(false);
        self.flush();
        self.wbuf.clear();
    }
}

fn error(message: String) -> Response {
    Response::Error { message }
}

/// `TIOCSWINSZ` on a terminal: the foreground process group gets SIGWINCH.
fn set_window_size(
    fd: std::os::fd::BorrowedFd<'_>,
    width: u16,
    height: u16,
) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    match unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Binds the protocol socket, 0660 (root-owned, like berthd's).
fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts libcontainer's connection on the console socket and takes the pty master from it.
/// The init sent it before it reported ready, so it is queued by now.
fn receive_pty_master(console: &UnixListener) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    console.set_nonblocking(true)?;
    let (conn, _) = console.accept()?;
    let mut byte = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this fd in our table for us alone.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(std::io::Error::new(
        ErrorKind::InvalidData,
        "no pty master on the console socket",
    ))
}

/// `oom_kill N` with N > 0 in a cgroup's `memory.oom_control` (v1) or `memory.events` (v2).
fn oom_killed(file: &Path) -> bool {
    std::fs::read_to_string(file).is_ok_and(|text| {
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

/// `<bundle>/exit.json`, atomically: temp file, fsync, rename, fsync of the dir.
fn write_exit_file(bundle: &Path, exit: &ExitStatus) -> std::io::Result<()> {
    let tmp = bundle.join(".exit.json.tmp");
    let json = serde_json::to_vec(exit).map_err(std::io::Error::other)?;
    let mut f = File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, bundle.join(EXIT_FILE_NAME))?;
    File::open(bundle)?.sync_all()
}

/// Reaps children left by a failed creation, waiting up to a second for them to exit.
fn reap_leftovers() {
    for _ in 0..100 {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(nix::errno::Errno::ECHILD) => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oom_counters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("memory.oom_control");
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").expect("write");
        assert!(!oom_killed(&f));
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").expect("write");
        assert!(oom_killed(&f));
        assert!(!oom_killed(&dir.path().join("missing")));
    }

    #[test]
    fn exit_file_is_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = ExitStatus {
            code: 137,
            signal: Some(9),
            exited_at_ns: 5,
            oom_killed: false,
        };
        write_exit_file(dir.path(), &e).expect("write");
        let back: ExitStatus =
            serde_json::from_slice(&std::fs::read(dir.path().join(EXIT_FILE_NAME)).expect("read"))
                .expect("parse");
        assert_eq!(back, e);
    }
}
