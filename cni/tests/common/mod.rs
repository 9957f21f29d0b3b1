//! Running CNI plugin binaries the way a runtime does, for the plugin tests.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// What a plugin run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The stdout parsed as JSON (panics with the whole output if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }

    /// Panics with the output unless the plugin succeeded.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(self.ok, "{what} failed: {self:?}");
        self
    }
}

/// One invocation's environment.
pub struct Call<'a> {
    pub plugin: &'a Path,
    pub command: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns: &'a str,
    pub cni_path: String,
    pub cni_args: &'a str,
    /// Run the plugin in this named netns (`ip netns exec`, which also gives it that
    /// netns's /sys), as a runtime on that host would.
    pub host_netns: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn new(plugin: &'a Path, command: &'a str) -> Self {
        Call {
            plugin,
            command,
            container_id: "",
            ifname: "eth0",
            netns: "",
            cni_path: plugin_dir(),
            cni_args: "",
            host_netns: None,
        }
    }

    pub fn host(mut self, netns: &'a str) -> Self {
        self.host_netns = Some(netns);
        self
    }

    pub fn id(mut self, id: &'a str) -> Self {
        self.container_id = id;
        self
    }

    pub fn ifname(mut self, ifname: &'a str) -> Self {
        self.ifname = ifname;
        self
    }

    pub fn netns(mut self, netns: &'a str) -> Self {
        self.netns = netns;
        self
    }

    pub fn args(mut self, args: &'a str) -> Self {
        self.cni_args = args;
        self
    }

    pub fn path(mut self, path: String) -> Self {
        self.cni_path = path;
        self
    }

    /// Runs the plugin with `conf` on stdin.
    pub fn run(&self, conf: &Value) -> Run {
        let mut cmd = match self.host_netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(self.plugin);
                cmd
            }
            None => Command::new(self.plugin),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", self.command)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in [
            ("CNI_CONTAINERID", self.container_id),
            ("CNI_IFNAME", self.ifname),
            ("CNI_NETNS", self.netns),
            ("CNI_ARGS", self.cni_args),
        ] {
            if !v.is_empty() {
                cmd.env(k, v);
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.plugin));
        let input = serde_json::to_vec(conf).expect("serialize conf");
        // A plugin that does not read stdin (VERSION) may be gone before the write ends.
        if let Err(e) = child.stdin.take().expect("stdin").write_all(&input) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
        let out = child.wait_with_output().expect("wait plugin");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn host_local() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-host-local"))
}

/// The directory of our built plugins, then the reference plugins.
pub fn plugin_dir() -> String {
    let ours = host_local();
    let dir = ours.parent().expect("bin dir");
    format!("{}:/usr/lib/cni", dir.display())
}

/// The addresses (without prefix) of an ADD result.
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no ips in {result}"))
        .iter()
        .map(|ip| {
            let addr = ip["address"].as_str().expect("address");
            addr.split('/').next().expect("addr").to_string()
        })
        .collect()
}

/// The allocation files (addresses) in `dir`, sorted.
pub fn allocation_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    out.sort();
    out
}

/// Panics unless running as root (root-only tests are never skipped silently).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, bridges, nftables)"
    );
}

/// Moves the calling test thread into a network namespace of its own that stands in for the
/// host: the bridge, the veths' host ends, the nftables rules and the forwarding sysctls the
/// plugin sets all live there and vanish with it, and the real host is never changed.
pub fn private_host_netns() {
    use nix::mount::{MsFlags, mount};
    use nix::sched::CloneFlags;
    // A mount namespace of the thread's own too (CLONE_FS lets one thread have it), with a
    // sysfs of the new network namespace: the plugin reads /sys/class/net of its own netns.
    nix::sched::unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
        .expect("unshare mount and network namespaces for this test thread");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make mounts private");
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount the new netns's sysfs");
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip");
    assert!(up.success(), "ip link set lo up");
}
