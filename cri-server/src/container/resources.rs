//! Changing a running container's resources: written straight into its cgroup files, v1 (and
//! this host's hybrid layout) or v2, in an order the kernel accepts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use api::cri;

use super::hugetlb;
use crate::error::{Error, Result};
use crate::spec::{Clamped, HostInfo};

const ROOT: &str = "/sys/fs/cgroup";

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| {
        Error::FailedPrecondition(format!("write {value:?} to {}: {e}", path.display()))
    })
}

fn read_i64(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Applies `r` to the container cgroup `cgroup` (`/berth/<pod>/<ctr>`) on `host`. Zero/empty
/// fields are left as they are, as the CRI defines; hugepage limits are written as given (0
/// forbids that size).
pub fn apply(cgroup: &str, r: &cri::LinuxContainerResources, host: &HostInfo) -> Result<()> {
    let root = Path::new(ROOT);
    apply_at(root, cgroup, r)?;
    let unified = root.join("cgroup.controllers").exists();
    apply_hugepages(root, unified, cgroup, r, host)
}

/// [`apply`] without hugepages, with cgroupfs mounted at `root` (v2 when `root` holds
/// `cgroup.controllers`, else one v1 hierarchy per controller below it).
pub fn apply_at(root: &Path, cgroup: &str, r: &cri::LinuxContainerResources) -> Result<()> {
    let rel = cgroup.trim_start_matches('/');
    if root.join("cgroup.controllers").exists() {
        apply_v2(&root.join(rel), r)
    } else {
        apply_v1(&|controller: &str| root.join(controller).join(rel), r)
    }
}

/// Hugepage limits: into the container's v2 cgroup, its v1 hugetlb cgroup, or on a hybrid host
/// the cgroup2 cgroup berthd keeps for it ([`hugetlb`]). Sizes the kernel lacks, and limits
/// without a hugetlb controller, are skipped with a warning as at creation.
fn apply_hugepages(
    root: &Path,
    unified: bool,
    cgroup: &str,
    r: &cri::LinuxContainerResources,
    host: &HostInfo,
) -> Result<()> {
    if r.hugepage_limits.is_empty() {
        return Ok(());
    }
    let rel = cgroup.trim_start_matches('/');
    let (limits, unknown) = hugetlb::known_limits(&host.hugepage_sizes_kb, &r.hugepage_limits);
    for page_size in unknown {
        let c = Clamped::HugepageSize { page_size };
        tracing::warn!(cgroup, clamped = %c, "not granted on this host");
    }
    if let (Some(mount), false) = (&host.hugetlb_hybrid, unified) {
        if limits.is_empty() {
            return Ok(());
        }
        let dir = hugetlb::apply(mount, cgroup, &limits)?;
        // Created without hugepage limits, the container had no cgroup here and its processes
        // are elsewhere: move every process of its v1 cgroups in (a no-op for those inside).
        for pid in v1_pids(root, rel, mount) {
            match hugetlb::join(&dir, pid) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    return Err(Error::FailedPrecondition(format!(
                        "move {pid} into {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        return Ok(());
    }
    let (dir, suffix) = if unified {
        (root.join(rel), "max")
    } else {
        (root.join("hugetlb").join(rel), "limit_in_bytes")
    };
    for l in limits {
        let file = dir.join(format!("hugetlb.{}.{suffix}", l.size));
        if file.exists() {
            write(&file, &l.bytes.to_string())?;
        } else {
            let c = Clamped::HugepageLimit { page_size: l.size };
            tracing::warn!(cgroup, clamped = %c, "not granted on this host");
        }
    }
    Ok(())
}

/// Every process in the v1 cgroups `rel` (each hierarchy under `root` but `skip`).
fn v1_pids(root: &Path, rel: &str, skip: &Path) -> BTreeSet<i32> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return BTreeSet::new();
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p != skip)
        .filter_map(|p| std::fs::read_to_string(p.join(rel).join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

fn apply_v1(dir: &dyn Fn(&str) -> PathBuf, r: &cri::LinuxContainerResources) -> Result<()> {
    if !dir("memory").exists() && !dir("cpu").exists() {
        return Err(Error::FailedPrecondition(format!(
            "the container's cgroup {} does not exist (is it running?)",
            dir("memory").display()
        )));
    }
    if r.cpu_shares != 0 {
        write(&dir("cpu").join("cpu.shares"), &r.cpu_shares.to_string())?;
    }
    if r.cpu_period != 0 {
        write(
            &dir("cpu").join("cpu.cfs_period_us"),
            &r.cpu_period.to_string(),
        )?;
    }
    if r.cpu_quota != 0 {
        write(
            &dir("cpu").join("cpu.cfs_quota_us"),
            &r.cpu_quota.to_string(),
        )?;
    }
    if !r.cpuset_cpus.is_empty() {
        write(&dir("cpuset").join("cpuset.cpus"), &r.cpuset_cpus)?;
    }
    if !r.cpuset_mems.is_empty() {
        write(&dir("cpuset").join("cpuset.mems"), &r.cpuset_mems)?;
    }
    if r.memory_limit_in_bytes != 0 {
        let mem = dir("memory");
        let limit = r.memory_limit_in_bytes;
        // Without a swap limit the container gets none, as containerd does: memsw = memory.
        let memsw = if r.memory_swap_limit_in_bytes != 0 {
            r.memory_swap_limit_in_bytes
        } else {
            limit
        };
        let memsw_file = mem.join("memory.memsw.limit_in_bytes");
        let has_memsw = memsw_file.exists();
        // memory.limit may never exceed memsw.limit: raise memsw first when growing.
        let current_memsw = if has_memsw {
            read_i64(&memsw_file)
        } else {
            None
        };
        if has_memsw && current_memsw.is_some_and(|c| memsw > c) {
            write(&memsw_file, &memsw.to_string())?;
            write(&mem.join("memory.limit_in_bytes"), &limit.to_string())?;
        } else {
            write(&mem.join("memory.limit_in_bytes"), &limit.to_string())?;
            if has_memsw {
                write(&memsw_file, &memsw.to_string())?;
            }
        }
    }
    Ok(())
}

fn apply_v2(dir: &Path, r: &cri::LinuxContainerResources) -> Result<()> {
    if !dir.exists() {
        return Err(Error::FailedPrecondition(format!(
            "the container's cgroup {} does not exist (is it running?)",
            dir.display()
        )));
    }
    if r.cpu_shares != 0 {
        // The kernel/runc conversion from v1 shares [2, 262144] to v2 weight [1, 10000].
        let weight = 1 + ((r.cpu_shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
        write(&dir.join("cpu.weight"), &weight.to_string())?;
    }
    if r.cpu_quota != 0 || r.cpu_period != 0 {
        let period = if r.cpu_period != 0 {
            r.cpu_period
        } else {
            100_000
        };
        let quota = if r.cpu_quota > 0 {
            r.cpu_quota.to_string()
        } else {
            "max".to_owned()
        };
        write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
    }
    if !r.cpuset_cpus.is_empty() {
        write(&dir.join("cpuset.cpus"), &r.cpuset_cpus)?;
    }
    if !r.cpuset_mems.is_empty() {
        write(&dir.join("cpuset.mems"), &r.cpuset_mems)?;
    }
    if r.memory_limit_in_bytes != 0 {
        write(
            &dir.join("memory.max"),
            &r.memory_limit_in_bytes.to_string(),
        )?;
        let swap = if r.memory_swap_limit_in_bytes != 0 {
            (r.memory_swap_limit_in_bytes - r.memory_limit_in_bytes).max(0)
        } else {
            0
        };
        let swap_file = dir.join("memory.swap.max");
        if swap_file.exists() {
            write(&swap_file, &swap.to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v1(root: &Path, memsw: i64) {
        for c in ["cpu", "cpuset", "memory"] {
            std::fs::create_dir_all(root.join(c)).expect("dir");
        }
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "67108864").expect("w");
        std::fs::write(
            root.join("memory/memory.memsw.limit_in_bytes"),
            memsw.to_string(),
        )
        .expect("w");
    }

    #[test]
    fn v1_writes_only_what_is_set_and_keeps_memsw_above_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        fake_v1(dir.path(), 67_108_864);
        let r = cri::LinuxContainerResources {
            cpu_shares: 1024,
            memory_limit_in_bytes: 134_217_728,
            ..Default::default()
        };
        apply_v1(&|c: &str| dir.path().join(c), &r).expect("apply");
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).expect("read");
        assert_eq!(read("cpu/cpu.shares"), "1024");
        assert!(
            !dir.path().join("cpu/cpu.cfs_quota_us").exists(),
            "unset fields untouched"
        );
        assert_eq!(read("memory/memory.limit_in_bytes"), "134217728");
        assert_eq!(read("memory/memory.memsw.limit_in_bytes"), "134217728");
    }

    fn hugepages(limits: &[(&str, u64)]) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            hugepage_limits: limits
                .iter()
                .map(|(size, limit)| cri::HugepageLimit {
                    page_size: size.to_string(),
                    limit: *limit,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn touch(path: &Path, contents: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, contents).expect("write");
    }

    #[test]
    fn hugepages_go_to_the_v1_or_v2_controller_files() {
        let host = HostInfo::default();
        let r = hugepages(&[("2Mi", 4 << 20), ("1GB", 0), ("4MB", 1)]);

        let v1 = tempfile::tempdir().expect("tmp");
        let f = v1
            .path()
            .join("hugetlb/berth/p/c/hugetlb.2MB.limit_in_bytes");
        touch(&f, "0");
        apply_hugepages(v1.path(), false, "/berth/p/c", &r, &host).expect("v1");
        assert_eq!(std::fs::read_to_string(&f).expect("read"), "4194304");
        assert!(
            !v1.path()
                .join("hugetlb/berth/p/c/hugetlb.1GB.limit_in_bytes")
                .exists(),
            "no file, no write"
        );

        let v2 = tempfile::tempdir().expect("tmp");
        for size in ["2MB", "1GB"] {
            touch(
                &v2.path().join(format!("berth/p/c/hugetlb.{size}.max")),
                "max",
            );
        }
        apply_hugepages(v2.path(), true, "/berth/p/c", &r, &host).expect("v2");
        let read = |s: &str| std::fs::read_to_string(v2.path().join(s)).expect("read");
        assert_eq!(read("berth/p/c/hugetlb.2MB.max"), "4194304");
        assert_eq!(read("berth/p/c/hugetlb.1GB.max"), "0");
    }

    #[test]
    fn hybrid_hosts_get_a_cgroup2_cgroup_holding_the_container() {
        let root = tempfile::tempdir().expect("tmp");
        let r = root.path();
        let mount = r.join("unified");
        touch(&mount.join("cgroup.subtree_control"), "");
        for dir in ["berth", "berth/p"] {
            touch(&mount.join(dir).join("cgroup.subtree_control"), "");
        }
        touch(&r.join("memory/berth/p/c/cgroup.procs"), "7\n8\n");
        touch(&r.join("pids/berth/p/c/cgroup.procs"), "8\n9\n");
        let host = HostInfo {
            hugetlb_controller: false,
            hugetlb_hybrid: Some(mount.clone()),
            ..HostInfo::default()
        };
        let res = hugepages(&[("2MB", 2 << 20)]);
        apply_hugepages(r, false, "/berth/p/c", &res, &host).expect("hybrid");
        let read = |s: &str| std::fs::read_to_string(mount.join(s)).expect("read");
        assert_eq!(read("berth/p/c/hugetlb.2MB.max"), "2097152");
        assert_eq!(read("berth/p/cgroup.subtree_control"), "+hugetlb");
        // Each write moves one process; a file keeps the last.
        assert_eq!(read("berth/p/c/cgroup.procs"), "9");
        assert_eq!(v1_pids(r, "berth/p/c", &mount), BTreeSet::from([7, 8, 9]));

        // Without hugepage limits nothing is made.
        let none = tempfile::tempdir().expect("tmp");
        let host = HostInfo {
            hugetlb_hybrid: Some(none.path().join("unified")),
            ..host
        };
        apply_hugepages(none.path(), false, "/berth/p/c", &hugepages(&[]), &host).expect("none");
        apply_hugepages(
            none.path(),
            false,
            "/berth/p/c",
            &hugepages(&[("4MB", 1)]),
            &host,
        )
        .expect("unknown sizes only");
        assert!(!none.path().join("unified").exists());
    }
}
