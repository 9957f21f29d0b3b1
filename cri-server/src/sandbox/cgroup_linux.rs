//! The pod cgroup berth owns: `/berth/<sandbox-id>`, used when kubelet names no
//! `cgroup_parent`. It holds the pod's containers (libcontainer creates their cgroups below it)
//! and the init of the pod's PID namespace, and carries the pod's limits.
//!
//! When kubelet names a `cgroup_parent`, that cgroup is kubelet's: kubelet creates it and sizes
//! it from the pod's containers plus its overhead, so berth writes nothing there (as containerd
//! and CRI-O, whose runc pods leave `overhead`/`resources` to kubelet's pod cgroup).

use std::path::{Path, PathBuf};

use api::cri;

use crate::container::resources;
use crate::error::{Error, Result};

/// v1 hierarchies the pod cgroup is made in (when mounted): the ones its limits and its init
/// use. libcontainer makes the containers' cgroups in whichever others they need.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
/// Controllers a v2 pod cgroup needs enabled by its ancestors.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// On cgroup v2 a cgroup with enabled controllers may hold no process: the init lives in this
/// leaf below the pod cgroup, as a pause container would.
const V2_INIT_LEAF: &str = "init";
/// kubelet's minimum cpu.shares.
const MIN_SHARES: i64 = 2;
/// The CFS period kubelet uses when it names none.
const DEFAULT_PERIOD: i64 = 100_000;

/// The cgroupfs path of the cgroup berth owns for `sandbox_id`.
pub fn default_path(sandbox_id: &str) -> String {
    format!("/berth/{sandbox_id}")
}

/// The limits of a pod cgroup: the pod's `resources` (the sum of its containers') plus its
/// `overhead`, the way kubelet sizes a pod cgroup. A limit the containers do not all have
/// (memory or CPU quota 0 in `resources`) stays unlimited: the overhead alone must not cap a
/// pod whose containers are unbounded. `None` when nothing is to be written.
pub fn pod_limits(linux: &cri::LinuxPodSandboxConfig) -> Option<cri::LinuxContainerResources> {
    let r = linux.resources.clone().unwrap_or_default();
    let o = linux.overhead.clone().unwrap_or_default();
    let mut out = cri::LinuxContainerResources::default();
    if r.memory_limit_in_bytes > 0 {
        out.memory_limit_in_bytes = r.memory_limit_in_bytes + o.memory_limit_in_bytes.max(0);
    }
    if r.cpu_quota > 0 {
        let period = if r.cpu_period > 0 {
            r.cpu_period
        } else {
            DEFAULT_PERIOD
        };
        let overhead = match (o.cpu_quota, o.cpu_period) {
            (q, _) if q <= 0 => 0,
            (q, p) if p > 0 && p != period => q * period / p,
            (q, _) => q,
        };
        out.cpu_period = period;
        out.cpu_quota = r.cpu_quota + overhead;
    }
    let shares = r.cpu_shares.max(0) + o.cpu_shares.max(0);
    if shares > 0 {
        out.cpu_shares = shares.max(MIN_SHARES);
    }
    out.cpuset_cpus = r.cpuset_cpus;
    out.cpuset_mems = r.cpuset_mems;
    (out != cri::LinuxContainerResources::default()).then_some(out)
}

/// One pod cgroup in the cgroupfs mounted at `root` (`/sys/fs/cgroup`; a temp dir in tests).
#[derive(Debug, Clone)]
pub struct PodCgroup {
    root: PathBuf,
    rel: String,
}

impl PodCgroup {
    /// The cgroup `path` (`/berth/<id>`) under the host's cgroupfs.
    pub fn new(path: &str) -> Self {
        Self::with_root(Path::new("/sys/fs/cgroup"), path)
    }

    /// The cgroup `path` under cgroupfs mounted at `root`.
    pub fn with_root(root: &Path, path: &str) -> Self {
        PodCgroup {
            root: root.to_owned(),
            rel: path.trim_start_matches('/').to_owned(),
        }
    }

    fn unified(&self) -> bool {
        self.root.join("cgroup.controllers").exists()
    }

    /// The pod cgroup's directories: one per v1 hierarchy berth uses, or the v2 one.
    fn dirs(&self) -> Vec<PathBuf> {
        if self.unified() {
            return vec![self.root.join(&self.rel)];
        }
        V1_CONTROLLERS
            .iter()
            .map(|c| self.root.join(c))
            .filter(|h| h.is_dir())
            .map(|h| h.join(&self.rel))
            .collect()
    }

    /// Creates the cgroup and applies `limits`. On v2 the controllers it needs are enabled in
    /// its ancestors first (their `cgroup.subtree_control`).
    pub fn create(&self, limits: Option<&cri::LinuxContainerResources>) -> Result<()> {
        let io = |what: String, e: std::io::Error| Error::Internal(format!("{what}: {e}"));
        if self.unified() {
            let mut dir = self.root.clone();
            for part in Path::new(&self.rel).components() {
                let available =
                    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                for c in V2_CONTROLLERS {
                    if available.split_whitespace().any(|a| a == c) {
                        let f = dir.join("cgroup.subtree_control");
                        std::fs::write(&f, format!("+{c}"))
                            .map_err(|e| io(format!("enable {c} in {}", f.display()), e))?;
                    }
                }
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(format!("create cgroup {}", dir.display()), e)),
                }
            }
        } else {
            for d in self.dirs() {
                std::fs::create_dir_all(&d)
                    .map_err(|e| io(format!("create cgroup {}", d.display()), e))?;
            }
        }
        if let Some(l) = limits {
            resources::apply_at(&self.root, &self.rel, l).map_err(|e| match e {
                Error::FailedPrecondition(m) => {
                    Error::InvalidArgument(format!("pod cgroup limits: {m}"))
                }
                e => e,
            })?;
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup (on v2 into its `init` leaf).
    pub fn add(&self, pid: i32) -> Result<()> {
        let dirs = if self.unified() {
            let leaf = self.root.join(&self.rel).join(V2_INIT_LEAF);
            match std::fs::create_dir(&leaf) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "create cgroup {}: {e}",
                        leaf.display()
                    )));
                }
            }
            vec![leaf]
        } else {
            self.dirs()
        };
        for d in dirs {
            let f = d.join("cgroup.procs");
            std::fs::write(&f, pid.to_string()).map_err(|e| {
                Error::Internal(format!("move pid {pid} into {}: {e}", f.display()))
            })?;
        }
        Ok(())
    }

    /// Removes the cgroup (it must hold no live process by now) from every hierarchy under the
    /// root. Safe to call twice; returns what it could not remove.
    pub fn remove(&self) -> std::result::Result<(), String> {
        let mut dirs = vec![self.root.join(&self.rel)];
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join(&self.rel)));
        }
        let mut errors = Vec::new();
        for d in dirs {
            for dir in [d.join(V2_INIT_LEAF), d] {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                        ) => {}
                    Err(e) => errors.push(format!("remove cgroup {}: {e}", dir.display())),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(mem: i64, quota: i64, period: i64, shares: i64) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            memory_limit_in_bytes: mem,
            cpu_quota: quota,
            cpu_period: period,
            cpu_shares: shares,
            ..Default::default()
        }
    }

    fn linux(
        r: Option<cri::LinuxContainerResources>,
        o: Option<cri::LinuxContainerResources>,
    ) -> cri::LinuxPodSandboxConfig {
        cri::LinuxPodSandboxConfig {
            resources: r,
            overhead: o,
            ..Default::default()
        }
    }

    #[test]
    fn limits_are_resources_plus_overhead() {
        let l = pod_limits(&linux(
            Some(res(256 << 20, 50_000, 100_000, 512)),
            Some(res(64 << 20, 10_000, 100_000, 100)),
        ))
        .expect("limits");
        assert_eq!(l.memory_limit_in_bytes, 320 << 20);
        assert_eq!((l.cpu_quota, l.cpu_period), (60_000, 100_000));
        assert_eq!(l.cpu_shares, 612);
    }

    #[test]
    fn overhead_never_caps_an_unlimited_pod() {
        let l = pod_limits(&linux(
            Some(res(0, 0, 0, 256)),
            Some(res(64 << 20, 10_000, 100_000, 100)),
        ))
        .expect("shares");
        assert_eq!(l.memory_limit_in_bytes, 0);
        assert_eq!(l.cpu_quota, 0);
        assert_eq!(l.cpu_shares, 356);
        assert!(pod_limits(&linux(None, None)).is_none());
        assert!(pod_limits(&linux(Some(res(0, 0, 0, 0)), None)).is_none());
    }

    #[test]
    fn overhead_quota_is_scaled_to_the_pod_period() {
        let l = pod_limits(&linux(
            Some(res(0, 20_000, 0, 0)),
            Some(res(0, 5_000, 50_000, 0)),
        ))
        .expect("quota");
        // Default period 100 ms; 5 ms per 50 ms of overhead is 10 ms per 100 ms.
        assert_eq!((l.cpu_quota, l.cpu_period), (30_000, 100_000));
        let only_overhead = pod_limits(&linux(None, Some(res(0, 0, 0, 1)))).expect("shares");
        assert_eq!(only_overhead.cpu_shares, MIN_SHARES);
    }

    #[test]
    fn v1_pod_cgroup_in_each_used_hierarchy() {
        let root = tempfile::tempdir().expect("tmp");
        for c in ["memory", "cpu", "pids", "devices"] {
            std::fs::create_dir(root.path().join(c)).expect("hierarchy");
        }
        let cg = PodCgroup::with_root(root.path(), "/berth/p1");
        cg.create(Some(&res(128 << 20, 20_000, 100_000, 0)))
            .expect("create");
        let read = |f: &str| std::fs::read_to_string(root.path().join(f)).expect(f);
        assert_eq!(read("memory/berth/p1/memory.limit_in_bytes"), "134217728");
        assert_eq!(read("cpu/berth/p1/cpu.cfs_quota_us"), "20000");
        assert_eq!(read("cpu/berth/p1/cpu.cfs_period_us"), "100000");
        assert!(!root.path().join("cpu/berth/p1/cpu.shares").exists());
        assert!(
            !root.path().join("devices/berth").exists(),
            "only used ones"
        );
        assert!(!root.path().join("cpuacct").exists(), "only mounted ones");
        cg.add(42).expect("add");
        assert_eq!(read("pids/berth/p1/cgroup.procs"), "42");
        assert_eq!(read("memory/berth/p1/cgroup.procs"), "42");
        // Fake cgroup dirs hold files, so only the real removal of empty dirs can be checked.
        for c in ["memory", "cpu", "pids"] {
            let d = root.path().join(c).join("berth/p1");
            std::fs::remove_dir_all(&d).expect("clear");
            std::fs::create_dir(&d).expect("empty");
        }
        cg.remove().expect("remove");
        cg.remove().expect("remove twice");
        assert!(!root.path().join("memory/berth/p1").exists());
    }

    #[test]
    fn v2_enables_controllers_and_puts_the_init_in_a_leaf() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu io memory pids").expect("w");
        let cg = PodCgroup::with_root(root.path(), "/berth/p2");
        cg.create(Some(&res(64 << 20, 0, 0, 0))).expect("create");
        let read = |f: &str| std::fs::read_to_string(root.path().join(f)).expect(f);
        // A fake file keeps only the last write; the real one accumulates.
        assert_eq!(read("cgroup.subtree_control"), "+pids");
        assert_eq!(read("berth/p2/memory.max"), "67108864");
        cg.add(7).expect("add");
        assert_eq!(read("berth/p2/init/cgroup.procs"), "7");
        assert!(!root.path().join("berth/p2/cgroup.procs").exists());
    }
}
