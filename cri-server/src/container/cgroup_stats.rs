//! Reading a cgroup's usage the way containerd and CRI-O report it: cgroup v1 (and this host's
//! hybrid layout, whose v2 mount holds no cpu or memory controller) or a pure v2 root, chosen by
//! what exists under the cgroupfs root. Readers are plain file parsers over a root directory, so
//! tests point them at fixtures.

use std::path::{Path, PathBuf};

/// Where cgroupfs is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

/// Above this a memory limit means "none": v1 reports an unlimited cgroup as the largest
/// page-aligned i64, not as a marker, and kubelet/cAdvisor draw the line here too.
const UNLIMITED: u64 = 1 << 62;

/// One sample of a cgroup's usage; `None` where the controller or file is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// Cumulative CPU time of every task, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// Memory counters.
    pub memory: Option<Memory>,
    /// Tasks in the cgroup and its descendants.
    pub pids: Option<u64>,
}

/// Memory counters of one cgroup, in CRI's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Everything charged to the cgroup (page cache included).
    pub usage: u64,
    /// `usage` minus inactive file pages: what the kernel could not easily reclaim.
    pub working_set: u64,
    /// Anonymous and swap-cache memory.
    pub rss: u64,
    /// Minor page faults, cumulative.
    pub page_faults: u64,
    /// Major page faults, cumulative.
    pub major_page_faults: u64,
    /// The memory limit, when one is set.
    pub limit: Option<u64>,
}

impl Memory {
    /// Limit minus working set, when there is a limit (CRI's `available_bytes`).
    pub fn available(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.working_set))
    }
}

/// Which layout a cgroupfs root has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy per controller: `<root>/<controller>/<cgroup>`.
    V1,
    /// The unified hierarchy at the root: `<root>/<cgroup>`.
    V2,
}

impl Layout {
    /// The layout of the cgroupfs mounted at `root`: v2 when the root itself is a cgroup2 mount
    /// (it has `cgroup.controllers`). A hybrid host's v2 mount lives in a subdirectory and
    /// carries no cpu or memory controller, so it counts as v1.
    pub fn probe(root: &Path) -> Layout {
        if root.join("cgroup.controllers").exists() {
            Layout::V2
        } else {
            Layout::V1
        }
    }
}

/// A cgroup under a cgroupfs root.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    layout: Layout,
    /// Path below the root (and below the controller dir on v1), no leading `/`.
    rel: String,
}

impl Cgroup {
    /// The cgroupfs-style path `cgroup` (`/berth/<pod>/<ctr>`) under the host's cgroupfs.
    pub fn host(cgroup: &str) -> Cgroup {
        Cgroup::under(Path::new(ROOT), cgroup)
    }

    /// The cgroup `cgroup` under the cgroupfs mounted at `root`.
    pub fn under(root: &Path, cgroup: &str) -> Cgroup {
        Cgroup {
            root: root.to_owned(),
            layout: Layout::probe(root),
            rel: cgroup.trim_matches('/').to_owned(),
        }
    }

    fn dir(&self, controller: &str) -> PathBuf {
        match self.layout {
            Layout::V1 => self.root.join(controller).join(&self.rel),
            Layout::V2 => self.root.join(&self.rel),
        }
    }

    /// Whether the cgroup exists (in the memory hierarchy on v1).
    pub fn exists(&self) -> bool {
        self.dir("memory").is_dir()
    }

    /// Reads CPU, memory and task counters; what cannot be read stays `None`.
    pub fn sample(&self) -> Sample {
        match self.layout {
            Layout::V1 => Sample {
                cpu_usage_ns: read_u64(&self.dir("cpuacct").join("cpuacct.usage")),
                memory: memory_v1(&self.dir("memory")),
                pids: read_u64(&self.dir("pids").join("pids.current"))
                    .or_else(|| count_procs(&self.dir("memory"))),
            },
            Layout::V2 => {
                let dir = self.dir("");
                Sample {
                    cpu_usage_ns: read(&dir.join("cpu.stat"))
                        .and_then(|s| stat_value(&s, "usage_usec"))
                        .map(|us| us.saturating_mul(1000)),
                    memory: memory_v2(&dir),
                    pids: read_u64(&dir.join("pids.current")).or_else(|| count_procs(&dir)),
                }
            }
        }
    }

    /// The processes (host pids) in the cgroup and its descendants, from `cgroup.procs` (of the
    /// memory hierarchy on v1), sorted; empty when the cgroup is gone.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = procs_under(&self.dir("memory"));
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`memory.stat`, `cpu.stat`: `key value` lines).
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// v1: `memory.usage_in_bytes`, `memory.limit_in_bytes` and the hierarchical (`total_*`)
/// counters of `memory.stat`, so a pod cgroup counts its containers.
fn memory_v1(dir: &Path) -> Option<Memory> {
    let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let stat = read(&dir.join("memory.stat")).unwrap_or_default();
    let get = |k: &str| stat_value(&stat, k).unwrap_or(0);
    Some(Memory {
        usage,
        working_set: usage.saturating_sub(get("total_inactive_file")),
        rss: get("total_rss"),
        page_faults: get("total_pgfault"),
        major_page_faults: get("total_pgmajfault"),
        limit: read_u64(&dir.join("memory.limit_in_bytes")).filter(|&l| l < UNLIMITED),
    })
}

/// v2: `memory.current`, `memory.max` (`max` when unlimited) and `memory.stat`, whose counters
/// are hierarchical already. RSS is `anon`, as cAdvisor and containerd report it on v2.
fn memory_v2(dir: &Path) -> Option<Memory> {
    let usage = read_u64(&dir.join("memory.current"))?;
    let stat = read(&dir.join("memory.stat")).unwrap_or_default();
    let get = |k: &str| stat_value(&stat, k).unwrap_or(0);
    Some(Memory {
        usage,
        working_set: usage.saturating_sub(get("inactive_file")),
        rss: get("anon"),
        page_faults: get("pgfault"),
        major_page_faults: get("pgmajfault"),
        limit: read(&dir.join("memory.max"))
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&l| l < UNLIMITED),
    })
}

/// Processes in `dir` and its descendants, from their `cgroup.procs` (no pids controller).
fn count_procs(dir: &Path) -> Option<u64> {
    dir.is_dir().then(|| procs_under(dir).len() as u64)
}

/// The pids in the `cgroup.procs` of `dir` and its descendants. A pod's cgroup tree is two
/// levels deep; the depth bound only guards against surprises.
fn procs_under(dir: &Path) -> Vec<i32> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<i32>) {
        if let Some(t) = read(&dir.join("cgroup.procs")) {
            out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if depth == 0 {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 4, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    const V1_MEMORY_STAT: &str = "cache 4096\nrss 1000\ninactive_file 7\ntotal_cache 40960\n\
        total_rss 31457280\ntotal_pgfault 1234\ntotal_pgmajfault 5\ntotal_inactive_file 4096\n\
        total_active_file 36864\n";

    #[test]
    fn v1_reads_each_controller_hierarchy() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "cpuacct/berth/p/c/cpuacct.usage", "123456789\n");
        write(root, "memory/berth/p/c/memory.usage_in_bytes", "33554432\n");
        write(root, "memory/berth/p/c/memory.limit_in_bytes", "67108864\n");
        write(root, "memory/berth/p/c/memory.stat", V1_MEMORY_STAT);
        write(root, "pids/berth/p/c/pids.current", "3\n");
        // The hybrid host's cgroup2 mount: not a v2 root.
        write(root, "unified/cgroup.controllers", "hugetlb\n");

        let cg = Cgroup::under(root, "/berth/p/c");
        assert_eq!(cg.layout, Layout::V1);
        assert!(cg.exists());
        let s = cg.sample();
        assert_eq!(s.cpu_usage_ns, Some(123_456_789));
        assert_eq!(s.pids, Some(3));
        let m = s.memory.expect("memory");
        assert_eq!(
            m,
            Memory {
                usage: 33_554_432,
                working_set: 33_554_432 - 4096,
                rss: 31_457_280,
                page_faults: 1234,
                major_page_faults: 5,
                limit: Some(67_108_864),
            }
        );
        assert_eq!(m.available(), Some(67_108_864 - (33_554_432 - 4096)));
    }

    #[test]
    fn v1_unlimited_memory_has_no_limit_and_no_available_bytes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "memory/x/memory.usage_in_bytes", "100\n");
        write(
            root,
            "memory/x/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        // More inactive file than usage (racing counters): the working set is 0, not a wrap.
        write(root, "memory/x/memory.stat", "total_inactive_file 200\n");
        let m = Cgroup::under(root, "x").sample().memory.expect("memory");
        assert_eq!((m.limit, m.available(), m.working_set), (None, None, 0));
    }

    #[test]
    fn v1_counts_processes_of_the_subtree_without_a_pids_controller() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "memory/pod/cgroup.procs", "");
        write(root, "memory/pod/a/cgroup.procs", "10\n11\n");
        write(root, "memory/pod/b/cgroup.procs", "12\n");
        let s = Cgroup::under(root, "/pod").sample();
        assert_eq!(s.pids, Some(3));
        assert_eq!(s.cpu_usage_ns, None);
        assert_eq!(s.memory, None);
    }

    #[test]
    fn v2_reads_the_unified_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        write(root, "cgroup.controllers", "cpuset cpu io memory pids\n");
        write(
            root,
            "berth/p/c/cpu.stat",
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        );
        write(root, "berth/p/c/memory.current", "5000000\n");
        write(root, "berth/p/c/memory.max", "max\n");
        write(
            root,
            "berth/p/c/memory.stat",
            "anon 3000000\nfile 2000000\ninactive_file 1500000\npgfault 77\npgmajfault 2\n",
        );
        write(root, "berth/p/c/pids.current", "4\n");
        let cg = Cgroup::under(root, "/berth/p/c");
        assert_eq!(cg.layout, Layout::V2);
        let s = cg.sample();
        assert_eq!(s.cpu_usage_ns, Some(2_500_000));
        assert_eq!(s.pids, Some(4));
        assert_eq!(
            s.memory.expect("memory"),
            Memory {
                usage: 5_000_000,
                working_set: 3_500_000,
                rss: 3_000_000,
                page_faults: 77,
                major_page_faults: 2,
                limit: None,
            }
        );
        write(root, "berth/p/c/memory.max", "8000000\n");
        let m = cg.sample().memory.expect("memory");
        assert_eq!(m.available(), Some(4_500_000));
    }

    #[test]
    fn missing_cgroup_reads_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cg = Cgroup::under(tmp.path(), "/berth/gone");
        assert!(!cg.exists());
        assert_eq!(cg.sample(), Sample::default());
    }

    #[test]
    fn stat_values_match_whole_keys() {
        let s = "total_rss 5\nrss 7\nrss_huge 9\n";
        assert_eq!(stat_value(s, "rss"), Some(7));
        assert_eq!(stat_value(s, "total_rss"), Some(5));
        assert_eq!(stat_value(s, "swap"), None);
    }
}
