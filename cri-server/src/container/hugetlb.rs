//! Hugepage limits on hybrid hosts, set by berthd itself.
//!
//! On a hybrid host (v1 controllers under `/sys/fs/cgroup/<controller>`, a cgroup2 mount at
//! `/sys/fs/cgroup/unified`) the hugetlb controller may be bound to the cgroup2 mount only.
//! libcontainer then uses its v1 manager, which never looks there, so a container's hugepage
//! limits would be lost. berthd does what runc does on a v2 host instead: it makes the
//! container's cgroup in the cgroup2 mount at the same relative path as its v1 cgroups
//! (`<pod parent>/<container id>`), enables `+hugetlb` in `cgroup.subtree_control` of every
//! ancestor from the mount's root down, writes `hugetlb.<size>.max`, and moves the container's
//! init into it after the shim created the container and before the user process runs (the
//! user process is the init after `execve`, so it starts inside).
//!
//! Processes exec'd into the container (ExecSync, Exec) are started by the shim with
//! libcontainer's tenant path, which joins only the v1 cgroups; the shim's exec helper joins
//! the init's cgroup2 cgroup first (`shim/src/runtime.rs`, `exec`), so they start inside too.
//!
//! The cgroup2 dirs go with the container and the pod like the v1 ones: `kill_cgroup` and
//! `remove_cgroup_dirs` walk every hierarchy under `/sys/fs/cgroup`, the cgroup2 mount
//! included. `+hugetlb` stays enabled in the ancestors' `cgroup.subtree_control`, as runc
//! leaves controllers it enabled.
//!
//! On a pure v2 host, or a v1 host with a hugetlb v1 controller, libcontainer applies the
//! limits itself and nothing here runs ([`HostInfo::hugetlb_hybrid`] is `None`).

use std::path::{Component, Path, PathBuf};

use api::cri;

use crate::error::{Error, Result};
use crate::spec::HostInfo;
use crate::spec::hugepages::kernel_page_size;

/// One hugepage limit as the kernel's files name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The kernel's size name (`2MB`, `1GB`).
    pub size: String,
    /// Bytes; the CRI's 0 means no hugepages of that size at all (kubelet sends every size
    /// the node has, with 0 for those the pod did not ask for).
    pub bytes: u64,
}

/// Splits CRI hugepage limits into those the kernel has a size for, by kernel name (a later
/// limit for the same size wins), and the page sizes it does not have.
pub fn known_limits(
    sizes_kb: &[u64],
    requested: &[cri::HugepageLimit],
) -> (Vec<Limit>, Vec<String>) {
    let mut known: Vec<Limit> = Vec::new();
    let mut unknown = Vec::new();
    for h in requested {
        match kernel_page_size(&h.page_size, sizes_kb) {
            Some(size) => {
                known.retain(|l| l.size != size);
                known.push(Limit {
                    size,
                    bytes: h.limit,
                });
            }
            None => unknown.push(h.page_size.clone()),
        }
    }
    (known, unknown)
}

/// The limits berthd must set itself for a container asking for `requested` on `host`: empty
/// unless the host is hybrid with hugetlb in its cgroup2 mount. Unknown sizes are left out
/// (the spec reports them as clamped).
pub fn hybrid_limits(host: &HostInfo, requested: &[cri::HugepageLimit]) -> Vec<Limit> {
    if host.hugetlb_hybrid.is_none() {
        return Vec::new();
    }
    known_limits(&host.hugepage_sizes_kb, requested).0
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| {
        Error::FailedPrecondition(format!("write {value:?} to {}: {e}", path.display()))
    })
}

/// Makes the cgroup `cgroup` (cgroupfs style, `/berth/<pod>/<ctr>`) in the cgroup2 mount
/// `root` with hugetlb enabled for it, and writes `limits`. Returns its directory. Idempotent.
pub fn apply(root: &Path, cgroup: &str, limits: &[Limit]) -> Result<PathBuf> {
    let rel = Path::new(cgroup.trim_start_matches('/'));
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cgroup path {cgroup:?} must be absolute, without . or .."
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "cgroup path {cgroup:?} names the root"
        )));
    }
    let mut dir = root.to_owned();
    for p in parts {
        // A controller is usable in a cgroup only when its parent enables it for children.
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control)
            .map_err(|e| Error::FailedPrecondition(format!("read {}: {e}", control.display())))?;
        if !enabled.split_whitespace().any(|c| c == "hugetlb") {
            write(&control, "+hugetlb")?;
        }
        dir.push(p);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::FailedPrecondition(format!(
                    "create cgroup {}: {e}",
                    dir.display()
                )));
            }
        }
    }
    for l in limits {
        write(
            &dir.join(format!("hugetlb.{}.max", l.size)),
            &l.bytes.to_string(),
        )?;
    }
    Ok(dir)
}

/// Moves process `pid` into the cgroup2 cgroup `dir`.
pub fn join(dir: &Path, pid: i32) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(page_size: &str, limit: u64) -> cri::HugepageLimit {
        cri::HugepageLimit {
            page_size: page_size.into(),
            limit,
        }
    }

    #[test]
    fn limits_are_named_as_the_kernel_names_sizes() {
        let (known, unknown) = known_limits(
            &[2048, 1_048_576],
            &[
                limit("2Mi", 1),
                limit("1GB", 0),
                limit("4MB", 7),
                limit("2MB", 4 << 20),
            ],
        );
        assert_eq!(
            known,
            vec![
                Limit {
                    size: "1GB".into(),
                    bytes: 0
                },
                Limit {
                    size: "2MB".into(),
                    bytes: 4 << 20
                },
            ]
        );
        assert_eq!(unknown, vec!["4MB".to_string()]);
    }

    #[test]
    fn only_hybrid_hosts_get_limits_from_berthd() {
        let mut host = HostInfo::default();
        assert!(hybrid_limits(&host, &[limit("2MB", 1)]).is_empty());
        host.hugetlb_hybrid = Some("/sys/fs/cgroup/unified".into());
        assert_eq!(hybrid_limits(&host, &[limit("2MB", 1)]).len(), 1);
    }

    /// A cgroup2 mount as files: `cgroup.subtree_control` in each existing dir.
    fn fake_mount() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("cgroup.subtree_control"), "").expect("w");
        root
    }

    #[test]
    fn apply_enables_hugetlb_down_the_path_and_writes_limits() {
        let root = fake_mount();
        let r = root.path();
        // The pod's dir exists already with hugetlb enabled (a second container of the pod).
        std::fs::create_dir(r.join("berth")).expect("mkdir");
        std::fs::write(r.join("berth/cgroup.subtree_control"), "hugetlb\n").expect("w");
        let limits = [Limit {
            size: "2MB".into(),
            bytes: 4 << 20,
        }];
        // A real cgroupfs creates the control files with the dir; a tempdir does not, so the
        // pod level fails after the dir is made: make its file and go again (idempotent).
        assert!(apply(r, "/berth/pod/ctr", &limits).is_err());
        std::fs::write(r.join("berth/pod/cgroup.subtree_control"), "").expect("w");
        let dir = apply(r, "/berth/pod/ctr", &limits).expect("apply");
        assert_eq!(dir, r.join("berth/pod/ctr"));
        let read = |p: &str| std::fs::read_to_string(r.join(p)).expect("read");
        assert_eq!(read("cgroup.subtree_control"), "+hugetlb");
        assert_eq!(
            read("berth/cgroup.subtree_control"),
            "hugetlb\n",
            "untouched"
        );
        assert_eq!(read("berth/pod/cgroup.subtree_control"), "+hugetlb");
        assert_eq!(read("berth/pod/ctr/hugetlb.2MB.max"), (4 << 20).to_string());
        assert!(
            !r.join("berth/pod/ctr/cgroup.subtree_control").exists(),
            "the leaf enables nothing"
        );
        join(&dir, 42).expect("join");
        assert_eq!(read("berth/pod/ctr/cgroup.procs"), "42");
    }

    #[test]
    fn apply_refuses_paths_leaving_the_mount() {
        let root = fake_mount();
        for bad in ["/berth/../../etc", "/", ""] {
            assert!(
                matches!(apply(root.path(), bad, &[]), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
