//! berthd's streaming sessions (`container::stream`) against a real `berth-shim` and a busybox
//! container (root only): exec with pipes and with a terminal, the kill on drop, attach.
//!
//! The shim binary is `$BERTH_BIN_DIR/berth-shim`, else the one in this test's target dir:
//! `cargo build -p berth-shim` first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::shim::{Request, Response, Status};
use cri_server::container::shim_client::{ShimClient, ShimLaunch, launch};
use cri_server::container::stream::{self, StreamOpts};
use cri_server::error::Error;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test must run as root");
}

fn shim_binary() -> PathBuf {
    let dir = match std::env::var_os("BERTH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            let mut dir = exe.parent().expect("exe dir").to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let bin = dir.join("berth-shim");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p berth-shim` first",
        bin.display()
    );
    bin
}

/// A busybox container run by a real shim; dropping it kills and removes everything.
struct Container {
    dir: tempfile::TempDir,
    id: String,
    cgroup: String,
    shim_pid: Option<i32>,
}

impl Container {
    /// Creates and starts a container running `args`.
    async fn start(args: &[&str], stdin: bool, tty: bool) -> Container {
        let dir = tempfile::Builder::new()
            .prefix("berth-stream-test")
            .tempdir()
            .expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "cat", "echo", "sleep", "tty", "stty", "head", "true"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("symlink");
        }
        let unique = format!("{}-{}", std::process::id(), rand_suffix());
        let cgroup = format!("berth-stream-test-{unique}");
        let spec = spec(args, tty, &cgroup);
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&spec).expect("json"),
        )
        .expect("config.json");
        let mut c = Container {
            id: format!("s-{unique}"),
            cgroup,
            shim_pid: None,
            dir,
        };
        let created = launch(&ShimLaunch {
            binary: shim_binary(),
            id: c.id.clone(),
            bundle: c.dir.path().to_owned(),
            log: c.dir.path().join("container.log"),
            stdin,
            tty,
        })
        .await
        .expect("shim creates the container");
        c.shim_pid = Some(created.shim_pid);
        let r = c.shim().call(&Request::Start, None).await.expect("start");
        assert_eq!(r, Response::Ok);
        c
    }

    fn shim(&self) -> ShimClient {
        ShimClient::new(self.dir.path())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("container.log")).unwrap_or_default()
    }

    /// The container's state, as its shim says.
    async fn status(&self) -> Status {
        match self
            .shim()
            .call(&Request::State, None)
            .await
            .expect("state")
        {
            Response::State { status, .. } => status,
            other => panic!("state: {other:?}"),
        }
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        roots.push(PathBuf::from("/sys/fs/cgroup"));
        roots
            .into_iter()
            .map(|r| r.join(&self.cgroup))
            .filter(|p| p.exists())
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        for d in self.cgroup_dirs() {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Some(pid) = self.shim_pid {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let end = Instant::now() + Duration::from_secs(5);
        for d in self.cgroup_dirs() {
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

fn spec(args: &[&str], tty: bool, cgroup: &str) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_KILL",
    ];
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": tty,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs" },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "mode=755"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }
        ],
        "linux": {
            "cgroupsPath": format!("/{cgroup}"),
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                { "type": "mount" }, { "type": "network" }
            ]
        }
    })
}

/// Reads until `needle` shows up `times` times or the stream ends; panics after 10 s.
async fn read_until(r: &mut (impl AsyncRead + Unpin), needle: &str, times: usize) -> String {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&out).matches(needle).count() < times {
            match r.read(&mut buf).await.expect("read") {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within 10 s"));
    String::from_utf8_lossy(&out).into_owned()
}

/// `f`, or a panic after 10 s.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("done within 10 s")
}

fn opts(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> StreamOpts {
    StreamOpts {
        stdin,
        stdout,
        stderr,
        tty,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sessions_with_pipes_and_with_a_terminal() {
    require_root();
    let c = Container::start(&["sleep", "3600"], false, false).await;
    let shim = c.shim();

    // Pipes: stdin goes in, both outputs come out, the exit code comes back.
    let script = "read x; echo out:$x; echo err:$x >&2; exit 5";
    let mut s = stream::exec(
        &shim,
        &c.id,
        vec!["sh".into(), "-c".into(), script.into()],
        opts(true, true, true, false),
        Default::default(),
    )
    .await
    .expect("exec");
    assert!(s.pty.is_none());
    assert!(matches!(
        s.resize(80, 24).await,
        Err(Error::FailedPrecondition(_))
    ));
    let mut stdin = s.stdin.take().expect("stdin");
    stdin.write_all(b"hi\n").await.expect("write");
    drop(stdin);
    let mut out = String::new();
    let mut err = String::new();
    s.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("read stdout");
    s.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .await
        .expect("read stderr");
    assert_eq!((out.as_str(), err.as_str()), ("out:hi\n", "err:hi\n"));
    assert_eq!(within(s.wait()).await.expect("wait"), 5);

    // A terminal: one duplex master, sized by berthd.
    let mut s = stream::exec(
        &shim,
        &c.id,
        vec![
            "sh".into(),
            "-c".into(),
            "read x; tty; stty size; exec cat".into(),
        ],
        opts(true, true, false, true),
        Default::default(),
    )
    .await
    .expect("tty exec");
    assert!(s.stdin.is_none() && s.stdout.is_none() && s.stderr.is_none());
    let mut pty = s.pty.take().expect("pty");
    s.resize(90, 33).await.expect("resize");
    pty.write_all(b"go\n").await.expect("write");
    let got = read_until(&mut pty, "33 90\r\n", 1).await;
    assert!(got.contains("/dev/pts/"), "{got:?}");
    pty.write_all(b"echo-me\n").await.expect("write");
    let got = read_until(&mut pty, "echo-me\r\n", 2).await;
    assert_eq!(got.matches("echo-me\r\n").count(), 2, "{got:?}");
    // Dropping the master hangs the terminal up: SIGHUP.
    drop(pty);
    assert!(matches!(
        s.resize(80, 24).await,
        Err(Error::FailedPrecondition(_))
    ));
    let code = within(s.wait()).await.expect("wait");
    assert_eq!(code, 128 + libc::SIGHUP);

    // Bad flags never reach the shim.
    assert!(matches!(
        stream::exec(
            &shim,
            &c.id,
            vec!["true".into()],
            opts(false, true, true, true),
            Default::default(),
        )
        .await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        stream::exec(
            &shim,
            &c.id,
            vec![],
            opts(false, true, false, false),
            Default::default()
        )
        .await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(c.status().await, Status::Running);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_an_exec_session_kills_the_process_and_collects_it() {
    require_root();
    let c = Container::start(&["sleep", "3600"], false, false).await;
    let shim = c.shim();
    let s = stream::exec(
        &shim,
        &c.id,
        vec!["sleep".into(), "1000".into()],
        opts(false, true, false, false),
        Default::default(),
    )
    .await
    .expect("exec");
    let (pid, exec_id) = (s.pid(), s.exec_id().to_owned());
    drop(s);
    // Killed, reaped, and forgotten by the shim.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = !Path::new(&format!("/proc/{pid}")).exists();
        let r = shim
            .call(
                &Request::KillExec {
                    exec_id: exec_id.clone(),
                    signal: 0,
                },
                None,
            )
            .await;
        let forgotten = matches!(r, Err(Error::FailedPrecondition(ref m)) if m.contains("no exec"));
        if gone && forgotten {
            break;
        }
        assert!(Instant::now() < end, "gone {gone}, forgotten {forgotten}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_sessions_share_output_and_resize_the_terminal() {
    require_root();
    // Plain pipes: input echoed by cat to every reader and the log.
    let c = Container::start(&["cat"], true, false).await;
    let shim = c.shim();
    let mut a = stream::attach(&shim, &c.id, opts(true, true, true, false), false)
        .await
        .expect("attach");
    let mut b = stream::attach(&shim, &c.id, opts(false, true, false, false), false)
        .await
        .expect("second reader");
    assert!(matches!(
        stream::attach(&shim, &c.id, opts(true, false, false, false), false).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        a.resize(80, 24).await,
        Err(Error::FailedPrecondition(_))
    ));
    let mut stdin = a.stdin.take().expect("stdin");
    stdin.write_all(b"shared\n").await.expect("write");
    for s in [&mut a, &mut b] {
        let got = read_until(s.stdout.as_mut().expect("stdout"), "shared\n", 1).await;
        assert_eq!(got, "shared\n");
    }
    drop((stdin, a, b));
    assert!(c.log().contains(" stdout F shared\n"), "{}", c.log());
    assert_eq!(c.status().await, Status::Running);

    // A terminal, resized through the shim; stdin_once ends it.
    let t = Container::start(&["sh", "-c", "read x; stty size"], true, true).await;
    let shim = t.shim();
    let mut a = stream::attach(&shim, &t.id, opts(true, true, false, true), true)
        .await
        .expect("attach tty");
    a.resize(101, 27).await.expect("resize");
    a.stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"\n")
        .await
        .expect("write");
    let got = read_until(a.stdout.as_mut().expect("stdout"), "27 101", 1).await;
    assert!(got.contains("27 101\r\n"), "{got:?}");
    assert_eq!(within(a.wait()).await.expect("wait"), 0);
}
