//! Helpers for the shim's root-only integration tests: a busybox bundle, a guard that removes
//! every trace of a test's container (processes, cgroups) also on failure, and a protocol client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use api::shim::{Created, Request, Response, SOCKET_NAME, Status};
use serde_json::json;

/// Root-only tests fail loudly when not run as root (never skipped).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test must run as root");
}

/// The parent of every test container's cgroup.
/// Prefix of each test's own top-level cgroup.
pub const CGROUP_PARENT: &str = "berth-test";

/// A bundle with a busybox rootfs and a shim for it; dropping it kills and removes everything.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub id: String,
    /// `linux.cgroupsPath` without the leading slash.
    pub cgroup: String,
    pub shim_pid: Option<i32>,
    pub init_pid: Option<i32>,
    /// The binary to run instead of [`shim_bin`].
    pub shim_bin: Option<PathBuf>,
}

/// Which binary the tests run (`BERTH_SHIM_BIN` overrides, e.g. for a release build).
pub fn shim_bin() -> PathBuf {
    std::env::var_os("BERTH_SHIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_berth-shim")))
}

impl Bundle {
    /// A bundle whose container runs `args`; `tty` sets `process.terminal`.
    pub fn new(args: &[&str], tty: bool) -> Bundle {
        Bundle::with_spec(args, tty, |_| {})
    }

    /// Like [`Bundle::new`], with a change to the spec.
    pub fn with_spec(
        args: &[&str],
        tty: bool,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Bundle {
        static N: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix("berth-shim-test")
            .tempdir()
            .expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir rootfs");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in [
            "sh", "echo", "sleep", "cat", "id", "true", "false", "printf", "head", "tr", "ls",
            "kill", "test", "[", "wc", "tty", "stty", "seq",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("symlink applet");
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
            .expect("passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
        // A top-level cgroup per test: tests run in parallel, and a shared parent removed by
        // one test's cleanup races another test creating a child in it.
        let cgroup = format!("{CGROUP_PARENT}-{unique}");
        let mut spec = spec(args, tty, &cgroup);
        edit(&mut spec);
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("json"),
        )
        .expect("write config.json");
        Bundle {
            dir,
            id: format!("c-{unique}"),
            cgroup,
            shim_pid: None,
            init_pid: None,
            shim_bin: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.path().join("container.log")
    }

    /// Runs `berth-shim` with extra flags; returns its output (it exits once created).
    pub fn run_shim(&mut self, extra: &[&str]) -> Output {
        let out = Command::new(self.shim_bin.clone().unwrap_or_else(shim_bin))
            .args(["--id", &self.id, "--bundle"])
            .arg(self.path())
            .arg("--log")
            .arg(self.log_path())
            .args(extra)
            .output()
            .expect("run berth-shim");
        if out.status.success()
            && let Ok(c) = serde_json::from_slice::<Created>(&out.stdout)
        {
            self.shim_pid = Some(c.shim_pid);
            self.init_pid = Some(c.pid);
        }
        out
    }

    /// Runs the shim and expects success; returns the `Created` report.
    pub fn create(&mut self, extra: &[&str]) -> Created {
        let out = self.run_shim(extra);
        assert!(
            out.status.success(),
            "berth-shim failed: {}\nshim.log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.path().join("shim.log")).unwrap_or_default()
        );
        let stdout = String::from_utf8(out.stdout).expect("utf8");
        assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout:?}");
        serde_json::from_str(&stdout).expect("Created JSON")
    }

    pub fn connect(&self) -> Client {
        let s = UnixStream::connect(self.path().join(SOCKET_NAME)).expect("connect shim.sock");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        }
    }

    /// One request on a fresh connection.
    pub fn call(&self, req: &Request) -> Response {
        self.connect().call(req)
    }

    pub fn status(&self) -> Status {
        match self.call(&Request::State) {
            Response::State { status, .. } => status,
            other => panic!("state: {other:?}"),
        }
    }

    /// Cgroup dirs of the container that exist now (one per v1 controller).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_roots()
            .into_iter()
            .map(|r| r.join(&self.cgroup))
            .filter(|p| p.exists())
            .collect()
    }

    /// Pids of processes whose command line mentions this bundle (the shim and libcontainer's
    /// processes, which are forks of it) or that live in the container's cgroup.
    pub fn processes(&self) -> Vec<i32> {
        let needle = self.path().to_string_lossy().into_owned();
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect();
        for d in self.cgroup_dirs() {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&p| is_alive(p));
        pids
    }

    /// Waits until the shim process is gone.
    pub fn wait_shim_gone(&self) {
        let pid = self.shim_pid.expect("shim pid");
        wait_until(Duration::from_secs(10), || !is_alive(pid));
    }

    pub fn log_records(&self) -> Vec<(String, String, String, String)> {
        records(&self.log_path())
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "shim.log of {}:\n{}",
                self.id,
                std::fs::read_to_string(self.path().join("shim.log")).unwrap_or_default()
            );
        }
        for pid in self.shim_pid.into_iter().chain(self.processes()) {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(pid) = self.init_pid {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_until(Duration::from_secs(5), || self.processes().is_empty());
        for d in self.cgroup_dirs() {
            for _ in 0..50 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A protocol connection.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    pub fn send(&mut self, req: &Request) {
        let mut line = serde_json::to_vec(req).expect("json");
        line.push(b'\n');
        self.w.write_all(&line).expect("send request");
    }

    pub fn recv(&mut self) -> Response {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read response");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }

    pub fn call(&mut self, req: &Request) -> Response {
        self.send(req);
        self.recv()
    }
}

/// The v1 controller hierarchies (and the v2 one) of this host.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.push(PathBuf::from("/sys/fs/cgroup"));
    v
}

pub fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Parses a CRI log: (timestamp, stream, tag, content) per record.
pub fn records(path: &Path) -> Vec<(String, String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .map(|l| {
            let l = l.strip_suffix('\n').expect("record ends with a newline");
            let mut p = l.splitn(4, ' ');
            let mut next = || p.next().expect("record field").to_owned();
            (next(), next(), next(), next())
        })
        .collect()
}

/// `2016-10-06T00:17:09.669794202Z`
pub fn is_rfc3339_nano_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    b.len() == 30
        && ts.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 29].contains(&i) || c.is_ascii_digit())
}

fn spec(args: &[&str], tty: bool, cgroup: &str) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": tty,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "berth-test",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "cgroupsPath": format!("/{cgroup}"),
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                { "type": "mount" }, { "type": "network" }
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware"
            ],
            "readonlyPaths": [
                "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"
            ]
        }
    })
}
