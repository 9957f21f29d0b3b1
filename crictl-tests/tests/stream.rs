//! The process side of streaming exec and attach in a container berthd made (its generated spec:
//! user, seccomp, capabilities, devpts): a terminal exec and an attach with resize, spoken to the
//! container's shim the way berthd's streaming sessions do, fds passed over its socket. CRI
//! `Exec`/`Attach` themselves answer with streaming URLs, served elsewhere.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api::cri;
use api::shim::{Request, Response, SOCKET_NAME};
use crictl_tests::pods::{
    assert_clean, create, env, read_cri_log, remove_pod, run_pod, sh_config, start, status,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// A connection to one shim, passing fds both ways.
struct ShimConn {
    s: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Keeps `/proc/self/fd/<n>` of the socket path valid.
    _dir: File,
}

impl ShimConn {
    fn connect(bundle: &std::path::Path) -> ShimConn {
        // The bundle path can pass the 108 bytes of a socket address: go through a dir fd.
        let dir = File::open(bundle).expect("bundle dir");
        let path = format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd());
        let s = UnixStream::connect(path).expect("connect to the shim");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        ShimConn {
            s,
            buf: Vec::new(),
            fds: Vec::new(),
            _dir: dir,
        }
    }

    fn call(&mut self, req: &Request, fds: &[RawFd]) -> Response {
        let mut line = serde_json::to_vec(req).expect("json");
        line.push(b'\n');
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            self.s.as_raw_fd(),
            &[IoSlice::new(&line)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return serde_json::from_slice(&line).expect("answer");
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
}

fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (File::from(r), File::from(w))
}

/// Reads until `needle` shows up `times` times or end of file (EIO from a hung-up master);
/// panics after 10 s.
fn read_until(f: &File, needle: &str, times: usize) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if !needle.is_empty() && text.matches(needle).count() >= times {
            return text;
        }
        assert!(Instant::now() < end, "no {needle:?} within 10 s: {text:?}");
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(200u16)).expect("poll");
        if fds[0].revents().unwrap_or(PollFlags::empty()).is_empty() {
            continue;
        }
        let mut buf = [0u8; 4096];
        match (&*f).read(&mut buf) {
            Ok(0) | Err(_) => return text,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_exec_and_attach_in_a_berthd_container() {
    let env = env().await;
    let pod = run_pod(&env, "stream").await;
    let cfg = cri::ContainerConfig {
        tty: true,
        stdin: true,
        ..sh_config(&env, "interactive", "read x; busybox stty size; exec cat")
    };
    let ctr = create(&env, &pod, cfg).await.expect("create");
    start(&env, &ctr).await;
    let bundle = env.d.state().join("containers").join(&ctr);

    // A terminal exec: the master comes back over the socket.
    let mut conn = ShimConn::connect(&bundle);
    let script = "read x; busybox tty; busybox stty size; id -un; exit 4";
    let r = conn.call(
        &Request::Exec {
            exec_id: "tty-e2e".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            stdin: false,
            stdout: false,
            stderr: false,
            tty: true,
            overrides: Default::default(),
        },
        &[],
    );
    assert!(matches!(r, Response::Exec { .. }), "{r:?}");
    let master = File::from(conn.fds.pop().expect("pty master"));
    let ws = libc::winsize {
        ws_row: 22,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize that lives across the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    (&master).write_all(b"\n").expect("write");
    let out = read_until(&master, "", 1);
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("22 77\r\n"), "{out:?}");
    // The image's user, as for the container itself.
    assert!(out.contains("app\r\n"), "{out:?}");
    let r = conn.call(
        &Request::WaitExec {
            exec_id: "tty-e2e".into(),
        },
        &[],
    );
    assert_eq!(
        r,
        Response::ExecExit {
            code: 4,
            signal: None
        }
    );

    // Attach to the container's own terminal, resize it, talk to it.
    let (in_r, mut in_w) = pipe();
    let (out_r, out_w) = pipe();
    let r = conn.call(
        &Request::Attach {
            stdin: true,
            stdout: true,
            stderr: false,
            close_stdin_on_eof: false,
        },
        &[in_r.as_raw_fd(), out_w.as_raw_fd()],
    );
    assert_eq!(r, Response::Ok);
    drop((in_r, out_w));
    let r = conn.call(
        &Request::Resize {
            width: 100,
            height: 30,
        },
        &[],
    );
    assert_eq!(r, Response::Ok);
    in_w.write_all(b"\n").expect("write");
    read_until(&out_r, "30 100\r\n", 1);
    in_w.write_all(b"typed\n").expect("write");
    let out = read_until(&out_r, "typed\r\n", 2);
    assert_eq!(out.matches("typed\r\n").count(), 2, "{out:?}");
    // The CRI log has it all too (the terminal's echo included).
    let st = status(&env, &ctr).await.expect("status");
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    let (log, _) = read_cri_log(std::path::Path::new(&st.log_path));
    assert_eq!(log, "\n30 100\ntyped\ntyped\n");

    drop((in_w, out_r, conn));
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
