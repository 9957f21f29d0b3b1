//! Changing a running container's resources: written straight into its cgroup files, v1 (and
//! this host's hybrid layout) or v2, in an order the kernel accepts.

use std::path::{Path, PathBuf};

use api::cri;

use crate::error::{Error, Result};

const ROOT: &str = "/sys/fs/cgroup";

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| {
        Error::FailedPrecondition(format!("write {value:?} to {}: {e}", path.display()))
    })
}

fn read_i64(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Applies `r` to the container cgroup `cgroup` (`/berth/<pod>/<ctr>`). Zero/empty fields are
/// left as they are, as the CRI defines.
pub fn apply(cgroup: &str, r: &cri::LinuxContainerResources) -> Result<()> {
    apply_at(Path::new(ROOT), cgroup, r)
}

/// [`apply`] with cgroupfs mounted at `root` (v2 when `root` holds `cgroup.controllers`, else
/// one v1 hierarchy per controller below it).
pub fn apply_at(root: &Path, cgroup: &str, r: &cri::LinuxContainerResources) -> Result<()> {
    let rel = cgroup.trim_start_matches('/');
    let unified = root.join("cgroup.controllers").exists();
    if unified {
        apply_v2(&root.join(rel), r)
    } else {
        apply_v1(&|controller: &str| root.join(controller).join(rel), r)
    }
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
}
