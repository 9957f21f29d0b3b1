//! Streaming stdio end to end (root only): exec on a pseudo terminal whose master comes back over
//! the socket, attach to the container's own stdio, and resizing the container's terminal.

mod common;

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api::shim::{ATTACH_BUFFER, Request, Response, SOCKET_NAME, Status};
use common::*;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// A protocol connection that passes file descriptors both ways, as berthd's does.
struct FdConn {
    s: UnixStream,
    buf: Vec<u8>,
    /// fds received, in order.
    fds: Vec<OwnedFd>,
}

impl FdConn {
    fn new(b: &Bundle) -> FdConn {
        let s = UnixStream::connect(b.path().join(SOCKET_NAME)).expect("connect shim.sock");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        FdConn {
            s,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn send(&mut self, req: &Request, fds: &[RawFd]) {
        let mut line = serde_json::to_vec(req).expect("json");
        line.push(b'\n');
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &[IoSlice::new(&line)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(n, line.len());
    }

    fn recv(&mut self) -> Response {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("bad response {:?}: {e}", String::from_utf8_lossy(&line))
                });
            }
            let mut chunk = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let msg = recvmsg::<()>(
                self.s.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .expect("recvmsg");
            let n = msg.bytes;
            assert!(n > 0, "the shim closed the connection");
            for c in msg.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: the kernel just installed these fds for us alone.
                    self.fds.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, req: &Request, fds: &[RawFd]) -> Response {
        self.send(req, fds);
        self.recv()
    }
}

fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (File::from(r), File::from(w))
}

/// Reads until the output holds `needle` `times` times, or end of file (EIO on a pty master
/// whose slave closed), or `timeout`. Returns what was read and whether it ended.
fn read_until(f: &File, needle: &str, times: usize, timeout: Duration) -> (String, bool) {
    let end = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if !needle.is_empty() && text.matches(needle).count() >= times {
            return (text, false);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (text, false);
        }
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis().min(10_000)).unwrap_or(10_000);
        poll(&mut fds, PollTimeout::from(ms)).expect("poll");
        if fds[0].revents().unwrap_or(PollFlags::empty()).is_empty() {
            continue;
        }
        let mut buf = [0u8; 65536];
        match (&*f).read(&mut buf) {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads to end of file.
fn read_to_eof(f: &File, timeout: Duration) -> String {
    let (text, eof) = read_until(f, "", 1, timeout);
    assert!(eof, "no end of file within {timeout:?}; got {text:?}");
    text
}

fn set_window_size(fd: &impl AsRawFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize that lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

fn exec_tty(id: &str, args: &[&str]) -> Request {
    Request::Exec {
        exec_id: id.to_owned(),
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: false,
        stdout: false,
        stderr: false,
        tty: true,
        overrides: Default::default(),
    }
}

fn wait_exec(b: &Bundle, id: &str) -> (i32, Option<i32>) {
    match b.call(&Request::WaitExec {
        exec_id: id.to_owned(),
    }) {
        Response::ExecExit { code, signal } => (code, signal),
        other => panic!("wait_exec: {other:?}"),
    }
}

/// fds of `pid` that are a pty master.
fn pty_masters(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.contains("ptmx"))
        .collect()
}

fn is_error(r: &Response, part: &str) -> bool {
    matches!(r, Response::Error { message } if message.contains(part))
}

fn attach(stdin: bool, stdout: bool, stderr: bool, close_stdin_on_eof: bool) -> Request {
    Request::Attach {
        stdin,
        stdout,
        stderr,
        close_stdin_on_eof,
    }
}

fn wait_stopped(b: &Bundle) -> api::shim::ExitStatus {
    match b.call(&Request::Wait) {
        Response::State {
            status: Status::Stopped,
            exit: Some(exit),
            ..
        } => exit,
        other => panic!("wait: {other:?}"),
    }
}

fn shutdown(b: &Bundle) {
    assert_eq!(b.call(&Request::Shutdown), Response::Ok);
    b.wait_shim_gone();
    assert!(b.processes().is_empty(), "left: {:?}", b.processes());
}

fn log_text(b: &Bundle) -> String {
    b.log_records()
        .iter()
        .map(|r| format!("{} {}\n", r.1, r.3))
        .collect()
}

#[test]
fn exec_with_a_tty_sizes_echoes_and_hangs_up() {
    require_root();
    let mut b = Bundle::new(&["sleep", "3600"], false);
    let created = b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);

    let mut c = FdConn::new(&b);
    let script = "read x; tty; [ -c \"$(tty)\" ] && echo in-container; stty size; \
                  echo TERM=$TERM end; exec cat";
    let pid = match c.call(&exec_tty("t1", &["sh", "-c", script]), &[]) {
        Response::Exec { pid } => pid,
        other => panic!("exec: {other:?}"),
    };
    let master = File::from(c.fds.pop().expect("the pty master comes with the answer"));
    assert!(c.fds.is_empty());
    // The shim closes its copy right after it sent it.
    wait_until(Duration::from_secs(2), || {
        pty_masters(created.shim_pid).is_empty()
    });
    assert!(
        pty_masters(created.shim_pid).is_empty(),
        "the shim keeps no copy of the master: {:?}",
        pty_masters(created.shim_pid)
    );
    set_window_size(&master, 100, 30);
    (&master).write_all(b"go\n").expect("write");
    let (out, _) = read_until(&master, " end", 1, Duration::from_secs(10));
    let tty = out
        .lines()
        .find(|l| l.starts_with("/dev/"))
        .unwrap_or_else(|| panic!("no tty name in {out:?}"));
    assert!(tty.trim_end().starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("in-container\r\n"), "{out:?}");
    assert!(out.contains("\r\n30 100\r\n"), "stty size: {out:?}");
    assert!(out.contains("TERM=xterm end"), "{out:?}");
    // The terminal echoes the line, then cat writes it back.
    (&master).write_all(b"ping\n").expect("write");
    let (out, _) = read_until(&master, "ping", 2, Duration::from_secs(10));
    assert_eq!(out.matches("ping\r\n").count(), 2, "{out:?}");
    assert!(is_alive(pid));
    // berthd closing the master hangs the terminal up: SIGHUP.
    drop(master);
    assert_eq!(
        wait_exec(&b, "t1"),
        (128 + libc::SIGHUP, Some(libc::SIGHUP))
    );

    // stdio fds have no place in a tty exec.
    let r = c.call(
        &Request::Exec {
            exec_id: "t2".into(),
            args: vec!["true".into()],
            stdin: false,
            stdout: true,
            stderr: false,
            tty: true,
            overrides: Default::default(),
        },
        &[pipe().1.as_raw_fd()],
    );
    assert!(is_error(&r, "tty"), "{r:?}");
    // No console socket or link is left behind.
    let state = b.path().join("runtime").join(&b.id);
    for dir in [b.path(), state.as_path()] {
        for e in dir.read_dir().expect("read dir").flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.contains("tty-") && !n.starts_with("exec-"), "left: {n}");
        }
    }
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    wait_stopped(&b);
    shutdown(&b);
}

#[test]
fn interactive_shell_on_a_tty_has_job_control_and_exit_code() {
    require_root();
    let mut b = Bundle::new(&["sleep", "3600"], false);
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let mut c = FdConn::new(&b);
    assert!(matches!(
        c.call(&exec_tty("sh1", &["sh", "-i"]), &[]),
        Response::Exec { .. }
    ));
    let master = File::from(c.fds.pop().expect("pty master"));
    (&master)
        .write_all(b"echo jc-$((40+2))\nexit 3\n")
        .expect("write");
    let out = read_to_eof(&master, Duration::from_secs(10));
    assert!(out.contains("jc-42\r\n"), "{out:?}");
    assert!(!out.contains("job control"), "{out:?}");
    assert_eq!(wait_exec(&b, "sh1"), (3, None));
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    wait_stopped(&b);
    shutdown(&b);
}

#[test]
fn attach_copies_stdin_and_output_to_many_readers() {
    require_root();
    let mut b = Bundle::new(&["cat"], false);
    b.create(&["--stdin"]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let mut c = FdConn::new(&b);

    let (in_r, mut in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    assert_eq!(c.call(&attach(true, true, true, false), &fds), Response::Ok);
    drop((in_r, out_w, err_w));
    in_w.write_all(b"hello\n").expect("write");
    let (out, _) = read_until(&out_r, "hello\n", 1, Duration::from_secs(10));
    assert_eq!(out, "hello\n");

    // A second reader sees what follows, as does the first.
    let (out2_r, out2_w) = pipe();
    assert_eq!(
        c.call(&attach(false, true, false, false), &[out2_w.as_raw_fd()]),
        Response::Ok
    );
    drop(out2_w);
    in_w.write_all(b"two\n").expect("write");
    for r in [&out_r, &out2_r] {
        let (out, _) = read_until(r, "two\n", 1, Duration::from_secs(10));
        assert_eq!(out, "two\n");
    }
    // One writer at a time.
    let (in2_r, in2_w) = pipe();
    let r = c.call(&attach(true, false, false, false), &[in2_r.as_raw_fd()]);
    assert!(is_error(&r, "only one"), "{r:?}");
    drop((in2_r, in2_w));
    let r = c.call(
        &Request::Resize {
            width: 80,
            height: 24,
        },
        &[],
    );
    assert!(is_error(&r, "no terminal"), "{r:?}");
    let r = c.call(&attach(false, false, false, false), &[]);
    assert!(is_error(&r, "at least one"), "{r:?}");

    // The end of this attacher's input leaves the container's stdin open.
    drop(in_w);
    // A reader that goes away is dropped; the others go on.
    drop(out2_r);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.status(), Status::Running);
    let (in_r, mut in_w) = pipe();
    assert_eq!(
        c.call(&attach(true, false, false, true), &[in_r.as_raw_fd()]),
        Response::Ok
    );
    drop(in_r);
    in_w.write_all(b"three\n").expect("write");
    // stdin_once: its end closes the container's stdin, and cat ends.
    drop(in_w);
    assert_eq!(wait_stopped(&b).code, 0);
    // Readers' pipes close once the container is gone.
    assert_eq!(read_to_eof(&out_r, Duration::from_secs(10)), "three\n");
    assert_eq!(read_to_eof(&err_r, Duration::from_secs(10)), "");
    assert_eq!(log_text(&b), "stdout hello\nstdout two\nstdout three\n");

    let (_r, w) = pipe();
    let r = c.call(&attach(false, true, false, false), &[w.as_raw_fd()]);
    assert!(is_error(&r, "stopped"), "{r:?}");
    // Without --stdin there is nothing to write to.
    let mut b2 = Bundle::new(&["sleep", "3600"], false);
    b2.create(&[]);
    let (r, _w) = pipe();
    let resp = FdConn::new(&b2).call(&attach(true, false, false, false), &[r.as_raw_fd()]);
    assert!(is_error(&resp, "without stdin"), "{resp:?}");
    shutdown(&b2);
    shutdown(&b);
}

#[test]
fn a_reader_that_never_reads_does_not_block_the_container() {
    require_root();
    const TOTAL: usize = 50 * 1024 * 1024;
    let mut b = Bundle::new(
        &[
            "sh",
            "-c",
            &format!("head -c {TOTAL} /dev/zero | tr '\\0' x"),
        ],
        false,
    );
    b.create(&[]);
    // Attached before the start, so it misses nothing: it just never reads.
    let (stuck_r, stuck_w) = pipe();
    assert_eq!(
        FdConn::new(&b).call(&attach(false, true, false, false), &[stuck_w.as_raw_fd()]),
        Response::Ok
    );
    drop(stuck_w);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let exit = wait_stopped(&b);
    assert_eq!(exit.code, 0);
    let recs = b.log_records();
    let logged: usize = recs.iter().map(|r| r.3.len()).sum();
    assert_eq!(logged, TOTAL, "the log is complete");
    assert!(
        recs.iter()
            .all(|r| r.1 == "stdout" && r.3.bytes().all(|c| c == b'x'))
    );
    assert_eq!(recs.last().map(|r| r.2.as_str()), Some("F"));
    // The reader was cut off: the pipe holds what fit, then ends.
    let got = read_to_eof(&stuck_r, Duration::from_secs(10));
    assert!(got.len() <= 64 * 1024 + ATTACH_BUFFER, "{}", got.len());
    let shim_log = std::fs::read_to_string(b.path().join("shim.log")).expect("shim.log");
    assert!(shim_log.contains("fell behind"), "{shim_log}");
    shutdown(&b);
}

#[test]
fn tty_container_resize_and_stdin_once_hang_up() {
    require_root();
    let mut b = Bundle::new(&["sh", "-c", "read x; stty size; exec cat"], true);
    b.create(&["--tty", "--stdin"]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let mut c = FdConn::new(&b);
    // The terminal carries both outputs: no stderr to attach to.
    let (_r, w) = pipe();
    let r = c.call(&attach(false, false, true, false), &[w.as_raw_fd()]);
    assert!(is_error(&r, "terminal"), "{r:?}");

    let (in_r, mut in_w) = pipe();
    let (out_r, out_w) = pipe();
    assert_eq!(
        c.call(
            &attach(true, true, false, true),
            &[in_r.as_raw_fd(), out_w.as_raw_fd()]
        ),
        Response::Ok
    );
    drop((in_r, out_w));
    assert_eq!(
        c.call(
            &Request::Resize {
                width: 120,
                height: 40
            },
            &[]
        ),
        Response::Ok
    );
    in_w.write_all(b"\n").expect("write");
    let (out, _) = read_until(&out_r, "40 120", 1, Duration::from_secs(10));
    assert!(out.contains("40 120\r\n"), "{out:?}");
    in_w.write_all(b"hi\n").expect("write");
    let (out, _) = read_until(&out_r, "hi\r\n", 2, Duration::from_secs(10));
    assert_eq!(out.matches("hi\r\n").count(), 2, "{out:?}");
    // stdin_once on a terminal: the end of input hangs the terminal up.
    drop(in_w);
    // As the pid namespace's init cat is spared the SIGHUP; it reads end of file (or EIO,
    // depending on where the hang-up caught it) from the hung-up terminal and exits.
    let exit = wait_stopped(&b);
    assert!(
        exit.signal.is_none() && matches!(exit.code, 0 | 1),
        "{exit:?}"
    );
    read_to_eof(&out_r, Duration::from_secs(10));
    assert!(
        log_text(&b).contains("stdout 40 120\r\n"),
        "{}",
        log_text(&b)
    );
    let r = c.call(
        &Request::Resize {
            width: 1,
            height: 1,
        },
        &[],
    );
    assert!(is_error(&r, "no terminal"), "{r:?}");
    shutdown(&b);
}
