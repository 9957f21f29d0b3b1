//! Streaming exec and attach: the process side of CRI `Exec` and `Attach` (`kubectl exec -it`,
//! `crictl exec -it`, `kubectl attach`), for the streaming server to call.
//!
//! Without a terminal each stream is a pipe: berthd keeps one end as a tokio pipe and passes the
//! other to the shim (see [`api::shim`]). With a terminal:
//! - an exec'd process gets its own pty; the shim hands the master to berthd and keeps no copy,
//!   so the session's [`Pty`] carries input and output, resizes with `TIOCSWINSZ`, and dropping
//!   every clone of it hangs the terminal up (the process gets SIGHUP);
//! - an attach gets pipes to and from the container's pty, which the shim holds; resizing asks
//!   the shim.
//!
//! A session that is dropped cleans up: an exec'd process still running is killed (SIGKILL) and
//! its exit collected, so the shim forgets it. That is the "client disconnected" path.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use api::cri;
use api::shim::{ExecOverrides, ExecUser, Request, Response};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

use super::ContainerManager;
use super::exec::{KillOnDrop, START_TIMEOUT, pipe};
use super::shim_client::ShimClient;
use crate::error::{Error, Result};

/// Deadline of the shim's answer to `Attach` and `Resize`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which streams a session carries (the CRI request's flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOpts {
    /// The client sends input.
    pub stdin: bool,
    /// The client reads stdout (with `tty`: the terminal's output).
    pub stdout: bool,
    /// The client reads stderr (never with `tty`: the terminal carries both outputs).
    pub stderr: bool,
    /// The process talks to a terminal.
    pub tty: bool,
}

impl StreamOpts {
    /// The streams of an Exec request.
    pub fn of_exec(req: &cri::ExecRequest) -> Self {
        StreamOpts {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        }
    }

    /// The streams of an Attach request.
    pub fn of_attach(req: &cri::AttachRequest) -> Self {
        StreamOpts {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        }
    }

    /// Checks the flags as kubelet's streaming server does for exec and attach alike: at least
    /// one stream, and no stderr with a terminal. [`Error::InvalidArgument`] otherwise.
    pub fn validate(&self) -> Result<()> {
        if !(self.stdin || self.stdout || self.stderr) {
            return Err(Error::InvalidArgument(
                "one of stdin, stdout, or stderr must be set".into(),
            ));
        }
        if self.tty && self.stderr {
            return Err(Error::InvalidArgument(
                "tty and stderr cannot both be true: the terminal carries both outputs".into(),
            ));
        }
        Ok(())
    }

    /// [`validate`](Self::validate), plus what an attach needs of the container's config:
    /// stdin only to a container created with `stdin`, and a terminal exactly when the
    /// container has one. [`Error::InvalidArgument`] otherwise.
    pub fn validate_attach(&self, config: &cri::ContainerConfig) -> Result<()> {
        self.validate()?;
        if self.stdin && !config.stdin {
            return Err(Error::InvalidArgument(
                "cannot attach stdin: the container was created without stdin".into(),
            ));
        }
        if self.tty != config.tty {
            return Err(Error::InvalidArgument(format!(
                "tty is {} but the container was created with tty {}",
                self.tty, config.tty
            )));
        }
        Ok(())
    }
}

/// berthd's end of a pseudo terminal (the master): read the terminal's output, write its input.
/// Clones share the one master; the terminal hangs up when the last clone is dropped. Reading
/// after the terminal's last user closed it yields end of file.
#[derive(Debug, Clone)]
pub struct Pty {
    fd: Arc<AsyncFd<File>>,
}

impl Pty {
    /// Wraps a master; makes it non-blocking. Needs a tokio runtime.
    pub fn new(master: OwnedFd) -> Result<Pty> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&master, FcntlArg::F_GETFL)
            .map_err(|e| Error::internal("pty master flags", std::io::Error::from(e)))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&master, FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::internal("pty master non-blocking", std::io::Error::from(e)))?;
        // SAFETY: the File owns the fd and stays inside the AsyncFd, unchanged, for its whole
        // life.
        let fd = unsafe { AsyncFd::register(File::from(master)) }
            .map_err(|e| Error::internal("register the pty master", std::io::Error::from(e)))?;
        Ok(Pty { fd: Arc::new(fd) })
    }

    /// Sets the terminal's size (`TIOCSWINSZ`); the foreground process group gets SIGWINCH.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        let size = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(Error::internal(
                "resize the terminal",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| (&mut f.get_ref()).read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Every slave fd closed (the process and its children are gone): end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| (&mut f.get_ref()).write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A terminal has no half close: input ends with the terminal's EOF character or by
    /// dropping the session.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A process started in a running container with streams (CRI `Exec`). Take the streams out of
/// the fields; [`wait`](Self::wait) for the exit code. Dropping the session before the exit was
/// collected kills the process (SIGKILL) and collects its exit.
///
/// Output can go on after the process exited when a background child holds it open, so end the
/// session on [`wait`](Self::wait), not on end of output.
#[derive(Debug)]
pub struct ExecSession {
    /// Input for the process (with `stdin` and no `tty`); drop it to close the process's stdin.
    pub stdin: Option<pipe::Sender>,
    /// The process's stdout (with `stdout` and no `tty`).
    pub stdout: Option<pipe::Receiver>,
    /// The process's stderr (with `stderr` and no `tty`).
    pub stderr: Option<pipe::Receiver>,
    /// The terminal (with `tty`): input and output both.
    pub pty: Option<Pty>,
    /// For resizing once `pty` was taken, without keeping the terminal open.
    resize_pty: Option<Weak<AsyncFd<File>>>,
    pid: i32,
    kill_on_drop: KillOnDrop,
}

impl ExecSession {
    /// The process's pid (host pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The id the shim knows the process by.
    pub fn exec_id(&self) -> &str {
        &self.kill_on_drop.exec_id
    }

    /// Sets the terminal's size; [`Error::FailedPrecondition`] without a terminal, or once
    /// every clone of [`pty`](Self::pty) was dropped (the terminal hung up).
    pub async fn resize(&self, width: u16, height: u16) -> Result<()> {
        match self.resize_pty.as_ref().and_then(Weak::upgrade) {
            Some(fd) => Pty { fd }.resize(width, height),
            None => Err(Error::FailedPrecondition(
                "the exec session has no open terminal to resize".into(),
            )),
        }
    }

    /// Waits until the process exits and returns its exit code (128 + signal number when a
    /// signal killed it). Once this returned, dropping the session kills nothing.
    pub async fn wait(&mut self) -> Result<i32> {
        let req = Request::WaitExec {
            exec_id: self.kill_on_drop.exec_id.clone(),
        };
        match self.kill_on_drop.shim.call(&req, None).await? {
            Response::ExecExit { code, .. } => {
                self.kill_on_drop.armed = false;
                Ok(code)
            }
            other => Err(Error::Internal(format!(
                "shim answered wait_exec with {other:?}"
            ))),
        }
    }

    /// Kills the process (SIGKILL); [`wait`](Self::wait) then returns 137. Killing a process
    /// that already exited is not an error.
    pub async fn kill(&self) -> Result<()> {
        let req = Request::KillExec {
            exec_id: self.kill_on_drop.exec_id.clone(),
            signal: libc::SIGKILL,
        };
        self.kill_on_drop
            .shim
            .call(&req, Some(CALL_TIMEOUT))
            .await
            .map(drop)
    }
}

/// A connection to the stdio of a container's process (CRI `Attach`). Take the streams out of
/// the fields. Output ends (end of file) once the container's output ends or it stops; an
/// attacher that reads too slowly is cut off by the shim (end of file as well). Dropping the
/// session detaches; the container runs on.
#[derive(Debug)]
pub struct AttachSession {
    /// Input for the container's stdin. Dropping it closes the container's stdin when the
    /// container was created with `stdin_once` (with a terminal, that hangs it up).
    pub stdin: Option<pipe::Sender>,
    /// The container's stdout (with a terminal: the terminal's output).
    pub stdout: Option<pipe::Receiver>,
    /// The container's stderr (never with a terminal).
    pub stderr: Option<pipe::Receiver>,
    shim: ShimClient,
    tty: bool,
}

impl AttachSession {
    /// Sets the size of the container's terminal; [`Error::FailedPrecondition`] without one.
    pub async fn resize(&self, width: u16, height: u16) -> Result<()> {
        if !self.tty {
            return Err(Error::FailedPrecondition(
                "the attach session has no terminal to resize".into(),
            ));
        }
        self.shim
            .call(&Request::Resize { width, height }, Some(CALL_TIMEOUT))
            .await
            .map(drop)
    }

    /// Waits until the container exits and returns its exit code.
    pub async fn wait(&self) -> Result<i32> {
        match self.shim.call(&Request::Wait, None).await? {
            Response::State {
                exit: Some(exit), ..
            } => Ok(exit.code),
            other => Err(Error::Internal(format!(
                "shim answered wait with {other:?}"
            ))),
        }
    }
}

/// Starts `cmd` in the container served by `shim` with the streams `opts` names. Checks only
/// what the shim cannot: the flags ([`StreamOpts::validate`]) and a non-empty command.
pub async fn exec(
    shim: &ShimClient,
    container_id: &str,
    cmd: Vec<String>,
    opts: StreamOpts,
    overrides: ExecOverrides,
) -> Result<ExecSession> {
    opts.validate()?;
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("exec needs a command".into()));
    }
    let exec_id = hex::encode(rand::random::<[u8; 16]>());
    let (mut ours, theirs) = Ends::make(
        opts.stdin && !opts.tty,
        [opts.stdout && !opts.tty, opts.stderr && !opts.tty],
    )?;
    let mut conn = shim.connect().await?;
    let req = Request::Exec {
        exec_id: exec_id.clone(),
        args: cmd,
        stdin: theirs[0].is_some(),
        stdout: theirs[1].is_some(),
        stderr: theirs[2].is_some(),
        tty: opts.tty,
        overrides,
    };
    let raw: Vec<i32> = theirs.iter().flatten().map(|f| f.as_raw_fd()).collect();
    conn.send(&req, &raw).await?;
    // The shim has its own copies now; ours would keep our readers from seeing end of file.
    drop(theirs);
    let pid = match tokio::time::timeout(START_TIMEOUT, conn.recv()).await {
        Ok(Ok(Response::Exec { pid })) => pid,
        Ok(Ok(other)) => {
            return Err(Error::Internal(format!(
                "shim answered exec with {other:?}"
            )));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::Unavailable(format!(
                "shim did not start the exec within {START_TIMEOUT:?}"
            )));
        }
    };
    tracing::debug!(%container_id, %exec_id, pid, tty = opts.tty, "streaming exec started");
    // From here on the process runs: every early return kills it.
    let kill_on_drop = KillOnDrop {
        shim: shim.clone(),
        exec_id,
        armed: true,
    };
    let pty = if opts.tty {
        let master = conn.take_fd().ok_or_else(|| {
            Error::Internal("the shim's answer to a tty exec came without the pty master".into())
        })?;
        Some(Pty::new(master)?)
    } else {
        None
    };
    Ok(ExecSession {
        stdin: ours.stdin.take(),
        stdout: ours.stdout.take(),
        stderr: ours.stderr.take(),
        resize_pty: pty.as_ref().map(|p| Arc::downgrade(&p.fd)),
        pty,
        pid,
        kill_on_drop,
    })
}

/// Attaches to the stdio of the container served by `shim`. `tty` must be the container's;
/// `close_stdin_on_eof` is its `stdin_once`. Checks only the flags
/// ([`StreamOpts::validate`]); the shim refuses what the container cannot do.
pub async fn attach(
    shim: &ShimClient,
    container_id: &str,
    opts: StreamOpts,
    close_stdin_on_eof: bool,
) -> Result<AttachSession> {
    opts.validate()?;
    let (mut ours, theirs) = Ends::make(opts.stdin, [opts.stdout, opts.stderr])?;
    let mut conn = shim.connect().await?;
    let req = Request::Attach {
        stdin: opts.stdin,
        stdout: opts.stdout,
        stderr: opts.stderr,
        close_stdin_on_eof,
    };
    let raw: Vec<i32> = theirs.iter().flatten().map(|f| f.as_raw_fd()).collect();
    conn.send(&req, &raw).await?;
    drop(theirs);
    match tokio::time::timeout(CALL_TIMEOUT, conn.recv()).await {
        Ok(Ok(Response::Ok)) => {}
        Ok(Ok(other)) => {
            return Err(Error::Internal(format!(
                "shim answered attach with {other:?}"
            )));
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::Unavailable(format!(
                "shim did not answer attach within {CALL_TIMEOUT:?}"
            )));
        }
    }
    tracing::debug!(%container_id, ?opts, "attached");
    Ok(AttachSession {
        stdin: ours.stdin.take(),
        stdout: ours.stdout.take(),
        stderr: ours.stderr.take(),
        shim: shim.clone(),
        tty: opts.tty,
    })
}

/// berthd's ends of a session's pipes.
#[derive(Default)]
struct Ends {
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
}

impl Ends {
    /// Pipes for the streams wanted; returns ours and the shim's (stdin read end, stdout and
    /// stderr write ends, in that order).
    fn make(stdin: bool, outputs: [bool; 2]) -> Result<(Ends, [Option<OwnedFd>; 3])> {
        let mut ours = Ends::default();
        let mut theirs: [Option<OwnedFd>; 3] = Default::default();
        let register = |e: std::io::Error| Error::internal("register a stream pipe", e);
        if stdin {
            let (r, w) = pipe()?;
            ours.stdin = Some(pipe::Sender::from_owned_fd(w).map_err(register)?);
            theirs[0] = Some(r);
        }
        for (i, wanted) in outputs.into_iter().enumerate() {
            if wanted {
                let (r, w) = pipe()?;
                let rx = pipe::Receiver::from_owned_fd(r).map_err(register)?;
                if i == 0 {
                    ours.stdout = Some(rx);
                } else {
                    ours.stderr = Some(rx);
                }
                theirs[i + 1] = Some(w);
            }
        }
        Ok((ours, theirs))
    }
}

impl ContainerManager {
    /// Starts `cmd` in running container `id` with streams (CRI `Exec`, once the client
    /// connected to the streaming server). Errors: [`Error::NotFound`] for an unknown id,
    /// [`Error::FailedPrecondition`] when the container is not running,
    /// [`Error::InvalidArgument`] for bad flags ([`StreamOpts::validate`]) or an empty command.
    pub async fn exec_stream(
        &self,
        id: &str,
        cmd: Vec<String>,
        opts: StreamOpts,
        overrides: ExecOverrides,
    ) -> Result<ExecSession> {
        let r = self.running(id).await?;
        let shim = ShimClient::new(&self.bundle(&r.id));
        exec(&shim, &r.id, cmd, opts, overrides).await
    }

    /// docker's `exec -e -u -w` for container `id` as shim overrides: `user` (`name`, `uid`,
    /// `name:group`, `uid:gid`…) is resolved against the container's own `/etc/passwd` and
    /// `/etc/group` as they are now, as docker does. InvalidArgument for a user or group the
    /// container does not know, or a relative working dir.
    pub async fn exec_overrides(
        &self,
        id: &str,
        env: Vec<String>,
        user: &str,
        working_dir: &str,
    ) -> Result<ExecOverrides> {
        if let Some(bad) = env
            .iter()
            .find(|e| e.split('=').next().unwrap_or("").is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "invalid environment variable {bad:?}"
            )));
        }
        if !working_dir.is_empty() && !working_dir.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "the working directory {working_dir:?} is invalid, it needs to be an absolute path"
            )));
        }
        let user = if user.is_empty() {
            None
        } else {
            let (passwd, group) = read_users(self.bundle(id).join("rootfs")).await?;
            let member = user.split(':').next();
            let r =
                crate::spec::user::resolve(user, passwd.as_deref(), group.as_deref(), member, &[])
                    .map_err(|e| Error::InvalidArgument(format!("exec user {user:?}: {e}")))?;
            Some(ExecUser {
                uid: r.uid,
                gid: r.gid,
                additional_gids: r.additional_gids,
            })
        };
        Ok(ExecOverrides {
            env,
            cwd: (!working_dir.is_empty()).then(|| working_dir.to_owned()),
            user,
        })
    }

    /// Attaches to the stdio of running container `id` (CRI `Attach`). Errors:
    /// [`Error::NotFound`] for an unknown id, [`Error::FailedPrecondition`] when it is not
    /// running, [`Error::InvalidArgument`] for flags that do not fit the request or the
    /// container ([`StreamOpts::validate_attach`]). The container's `stdin_once` decides whether
    /// the end of this session's input closes the container's stdin.
    pub async fn attach(&self, id: &str, opts: StreamOpts) -> Result<AttachSession> {
        let r = self.running(id).await?;
        opts.validate_attach(&r.config)?;
        let shim = ShimClient::new(&self.bundle(&r.id));
        attach(&shim, &r.id, opts, r.config.stdin_once).await
    }

    /// [`attach`](Self::attach) also to a container created but not started yet, so that
    /// nothing it writes is missed (docker clients attach before they start).
    pub async fn attach_early(&self, id: &str, opts: StreamOpts) -> Result<AttachSession> {
        let r = self.get(id)?;
        let observed = self.observe(r).await;
        if !matches!(
            observed.state,
            cri::ContainerState::ContainerRunning | cri::ContainerState::ContainerCreated
        ) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                observed.record.id
            )));
        }
        opts.validate_attach(&observed.record.config)?;
        let shim = ShimClient::new(&self.bundle(&observed.record.id));
        attach(
            &shim,
            &observed.record.id,
            opts,
            observed.record.config.stdin_once,
        )
        .await
    }

    /// Sets the size of running container `id`'s own terminal.
    pub async fn resize_tty(&self, id: &str, width: u16, height: u16) -> Result<()> {
        let r = self.running(id).await?;
        if !r.config.tty {
            return Err(Error::FailedPrecondition(format!(
                "container {} has no terminal to resize",
                r.id
            )));
        }
        ShimClient::new(&self.bundle(&r.id))
            .call(&Request::Resize { width, height }, Some(CALL_TIMEOUT))
            .await
            .map(drop)
    }

    /// The record of `id`, which must be running.
    pub(crate) async fn running(&self, id: &str) -> Result<super::ContainerRecord> {
        let r = self.get(id)?;
        let observed = self.observe(r).await;
        if observed.state != cri::ContainerState::ContainerRunning {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                observed.record.id
            )));
        }
        Ok(observed.record)
    }
}

/// The container's `/etc/passwd` and `/etc/group` under `rootfs` as the container sees them
/// (symlinks resolved inside it; a FIFO, device or huge file not read), off the async workers.
pub(crate) async fn read_users(
    rootfs: std::path::PathBuf,
) -> Result<(Option<String>, Option<String>)> {
    /// Far above any real passwd file, far below what would hurt berthd.
    const MAX: u64 = 4 << 20;
    tokio::task::spawn_blocking(move || {
        let root = crate::inroot::open_root(&rootfs)?;
        let r = std::os::fd::AsFd::as_fd(&root);
        Ok((
            crate::inroot::read_small(r, "/etc/passwd", MAX)?,
            crate::inroot::read_small(r, "/etc/group", MAX)?,
        ))
    })
    .await
    .map_err(|e| Error::Internal(format!("read the container's users: {e}")))?
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn opts(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> StreamOpts {
        StreamOpts {
            stdin,
            stdout,
            stderr,
            tty,
        }
    }

    fn invalid(r: Result<()>) -> bool {
        matches!(r, Err(Error::InvalidArgument(_)))
    }

    #[test]
    fn flags_are_checked_as_kubelet_does() {
        assert!(invalid(opts(false, false, false, false).validate()));
        assert!(invalid(opts(false, false, false, true).validate()));
        assert!(invalid(opts(true, true, true, true).validate()));
        assert!(opts(true, true, false, true).validate().is_ok());
        assert!(opts(false, false, true, false).validate().is_ok());
    }

    #[test]
    fn attach_must_fit_the_container() {
        let plain = cri::ContainerConfig::default();
        let interactive = cri::ContainerConfig {
            stdin: true,
            tty: true,
            ..Default::default()
        };
        assert!(
            opts(false, true, true, false)
                .validate_attach(&plain)
                .is_ok()
        );
        assert!(invalid(
            opts(true, true, true, false).validate_attach(&plain)
        ));
        assert!(invalid(
            opts(false, true, false, true).validate_attach(&plain)
        ));
        assert!(invalid(
            opts(true, true, false, false).validate_attach(&interactive)
        ));
        assert!(
            opts(true, true, false, true)
                .validate_attach(&interactive)
                .is_ok()
        );
    }

    /// A pty pair: (master, slave).
    fn openpty() -> (OwnedFd, File) {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt returns a new fd or -1; nothing else is touched.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(m >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: m is ours alone.
        let master = unsafe { OwnedFd::from_raw_fd(m) };
        // SAFETY: plain calls on the master fd; ptsname_r writes at most buf.len() bytes.
        let name = unsafe {
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut buf = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
            std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name)
            .expect("open slave");
        (master, slave)
    }

    #[tokio::test]
    async fn pty_reads_writes_resizes_and_ends() {
        let (master, slave) = openpty();
        let mut pty = Pty::new(master).expect("pty");
        // Raw mode on the slave: bytes pass unchanged, no echo.
        // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw edits it, tcsetattr reads
        // it, all on an open terminal fd.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
        }
        (&slave).write_all(b"out").expect("write slave");
        let mut buf = [0u8; 3];
        pty.read_exact(&mut buf).await.expect("read master");
        assert_eq!(&buf, b"out");
        pty.write_all(b"in").await.expect("write master");
        let mut got = [0u8; 2];
        (&slave).read_exact(&mut got).expect("read slave");
        assert_eq!(&got, b"in");
        pty.resize(132, 43).expect("resize");
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into ws.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_col, ws.ws_row), (132, 43));
        // The last slave fd closed: end of file, not an error.
        drop(slave);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), pty.read_to_end(&mut rest))
            .await
            .expect("end of file in time")
            .expect("read to end");
        assert_eq!(n, 0);
    }
}
