//! overlayfs snapshots.
//!
//! Mount descriptions follow containerd's overlay snapshotter:
//! - active, no parent: bind mount of its `fs`, options `rbind`, `rw`;
//! - active with parents: `overlay` with `workdir=<n>/work`, `upperdir=<n>/fs` and
//!   `lowerdir=<parent fs>:<grandparent fs>:...` (nearest first);
//! - view (and committed, through [`Snapshotter::mounts`], as a view of itself): one layer is a
//!   read-only bind mount of it, more is an `overlay` with only `lowerdir` (read-only by nature;
//!   the `ro` option is there too, for callers that check [`crate::Mount::is_readonly`]).
//!
//! Paths in mount options are absolute. overlayfs takes at most one page (4096 bytes) of mount
//! data, which with `/var/lib/berth/snapshots/NNN/fs` is about 120 layers; containerd goes further
//! by mounting from inside the snapshots dir with relative paths, which callers can do too.
//!
//! Mount options are `mount(8)`-style: a caller turns `ro`, `rw` and `rbind` into mount flags and
//! passes the rest as data.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{MntFlags, MsFlags};

use crate::store::{Resolved, Store, Tables, disk_usage};
use crate::{DiffMode, Error, Info, Kind, Mount, Result, Snapshotter, Usage};

const TABLES: Tables = Tables {
    records: "snapshots.overlay.records",
    counters: "snapshots.overlay.counters",
};

/// Snapshots as directories `<root>/snapshots/<n>/{fs,work}` mounted with overlayfs; metadata in
/// the shared redb database (tables `snapshots.overlay.*`).
///
/// Do not call its methods while holding a redb write transaction on the same database in the
/// same thread: each method opens its own, and redb serialises write transactions.
pub struct OverlaySnapshotter {
    store: Store,
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| Error::io("create dir", path, e))
}

fn bind(source: PathBuf, rw: bool) -> Mount {
    Mount {
        fstype: "bind".into(),
        source: source.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), if rw { "rw" } else { "ro" }.into()],
    }
}

impl OverlaySnapshotter {
    /// Opens the store under `root` (its `snapshots/` subdirectory) with metadata in `db`.
    /// Removes leftovers of a crash: directories with no committed metadata.
    pub fn new(root: &Path, db: Arc<redb::Database>) -> Result<Self> {
        Ok(OverlaySnapshotter {
            store: Store::open(root, db, TABLES)?,
        })
    }

    /// Whether this kernel and filesystem support overlayfs for `root` (try-mounts once).
    /// Needs `CAP_SYS_ADMIN`; false without it.
    pub fn supported(root: &Path) -> bool {
        match try_overlay(root) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(root = %root.display(), error = %e, "overlayfs not usable");
                false
            }
        }
    }

    fn mounts_of(&self, s: &Resolved) -> Vec<Mount> {
        let lowers: Vec<u64> = match s.info.kind {
            Kind::Active if s.parents.is_empty() => {
                return vec![bind(self.store.fs_dir(s.id), true)];
            }
            Kind::Active => {
                let lower = self.lowerdir(&s.parents);
                return vec![Mount {
                    fstype: "overlay".into(),
                    source: "overlay".into(),
                    options: vec![
                        format!(
                            "workdir={}",
                            self.store.snapshot_dir(s.id).join("work").display()
                        ),
                        format!("upperdir={}", self.store.fs_dir(s.id).display()),
                        format!("lowerdir={lower}"),
                    ],
                }];
            }
            Kind::View => s.parents.clone(),
            Kind::Committed => std::iter::once(s.id)
                .chain(s.parents.iter().copied())
                .collect(),
        };
        match lowers.as_slice() {
            // A view of nothing: its own (empty) fs.
            [] => vec![bind(self.store.fs_dir(s.id), false)],
            [one] => vec![bind(self.store.fs_dir(*one), false)],
            many => vec![Mount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec!["ro".into(), format!("lowerdir={}", self.lowerdir(many))],
            }],
        }
    }

    fn lowerdir(&self, ids: &[u64]) -> String {
        ids.iter()
            .map(|id| self.store.fs_dir(*id).display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn create(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Vec<Mount>> {
        let s = self.store.create(key, parent, kind, |dir, _| {
            mkdir(&dir.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir(&dir.join("work"), 0o711)?;
            }
            Ok(())
        })?;
        tracing::debug!(snapshot_key = %key, id = s.id, "snapshot created");
        Ok(self.mounts_of(&s))
    }
}

fn try_overlay(root: &Path) -> Result<()> {
    let probe = root.join(crate::content::random_name("overlay-probe-"));
    mkdir(&probe, 0o700)?;
    let result = (|| {
        for d in ["lower", "upper", "work", "merged"] {
            mkdir(&probe.join(d), 0o755)?;
        }
        let merged = probe.join("merged");
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            probe.join("lower").display(),
            probe.join("upper").display(),
            probe.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| Error::Mount {
            target: merged.clone(),
            source: e.into(),
        })?;
        nix::mount::umount2(&merged, MntFlags::MNT_DETACH).map_err(|e| Error::Mount {
            target: merged.clone(),
            source: e.into(),
        })
    })();
    if let Err(e) = fs::remove_dir_all(&probe) {
        tracing::warn!(path = %probe.display(), error = %e, "remove overlay probe dir");
    }
    result
}

impl Snapshotter for OverlaySnapshotter {
    fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.store.resolve(key)?.info)
    }

    fn prepare(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>> {
        self.create(key, parent, Kind::Active)
    }

    fn view(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>> {
        self.create(key, parent, Kind::View)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Ok(self.mounts_of(&self.store.resolve(key)?))
    }

    /// [`DiffMode::Overlay`]: each layer unpacks alone into its snapshot's upper dir.
    fn diff_mode(&self) -> DiffMode {
        DiffMode::Overlay
    }

    fn diff_dir(&self, key: &str) -> Result<PathBuf> {
        self.store.active_fs_dir(key)
    }

    fn committed_dir(&self, key: &str) -> Result<PathBuf> {
        self.store.committed_fs_dir(key)
    }

    fn commit(&self, name: &str, key: &str) -> Result<()> {
        self.store.commit(name, key, None)
    }

    fn commit_with_parent(&self, name: &str, key: &str, parent: Option<&str>) -> Result<()> {
        self.store.commit(name, key, Some(parent))
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.store.remove(key)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let s = self.store.resolve(key)?;
        disk_usage(&self.store.fs_dir(s.id))
    }

    fn list(&self) -> Result<Vec<Info>> {
        self.store.list()
    }

    fn total_usage(&self) -> Result<(Usage, PathBuf)> {
        Ok((disk_usage(self.store.dir())?, self.store.dir().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::os::unix::fs::FileTypeExt;

    use tar::{Builder, EntryType, Header};

    use super::*;
    use crate::testsuite::{self, in_private_mount_ns, mount_all, require_root};
    use crate::unpack::{sync_filesystem, unpack_layer};

    fn open(root: &Path) -> OverlaySnapshotter {
        let db = redb::Database::create(root.join("meta.db")).unwrap();
        OverlaySnapshotter::new(root, Arc::new(db)).unwrap()
    }

    #[test]
    fn conformance() {
        testsuite::run(open);
    }

    #[test]
    fn supported_on_this_machine() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        assert!(OverlaySnapshotter::supported(tmp.path()));
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "probe dir removed"
        );
    }

    #[test]
    fn mount_options() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let snaps = tmp.path().join("snapshots");
        let fs_of = |n: u64| snaps.join(n.to_string()).join("fs").display().to_string();
        assert_eq!(
            s.prepare("a", None).unwrap(),
            vec![Mount {
                fstype: "bind".into(),
                source: fs_of(1),
                options: vec!["rbind".into(), "rw".into()]
            }]
        );
        s.commit("c1", "a").unwrap();
        s.prepare("b", Some("c1")).unwrap();
        s.commit("c2", "b").unwrap();
        let m = s.prepare("top", Some("c2")).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].fstype, "overlay");
        assert_eq!(
            m[0].option("lowerdir"),
            Some(format!("{}:{}", fs_of(2), fs_of(1)).as_str())
        );
        assert_eq!(m[0].option("upperdir"), Some(fs_of(3).as_str()));
        let work = snaps.join("3/work").display().to_string();
        assert_eq!(m[0].option("workdir"), Some(work.as_str()));
        assert_eq!(
            s.view("v1", Some("c1")).unwrap(),
            vec![Mount {
                fstype: "bind".into(),
                source: fs_of(1),
                options: vec!["rbind".into(), "ro".into()]
            }]
        );
        let v2 = s.view("v2", Some("c2")).unwrap();
        assert_eq!(
            v2[0].option("lowerdir"),
            Some(format!("{}:{}", fs_of(2), fs_of(1)).as_str())
        );
        assert!(v2[0].is_readonly() && v2[0].option("upperdir").is_none());
        assert_eq!(s.mounts("c2").unwrap(), v2);
        assert_eq!(s.diff_dir("top").unwrap(), PathBuf::from(fs_of(3)));
    }

    #[test]
    fn new_removes_crash_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let snaps = tmp.path().join("snapshots");
        {
            let s = open(tmp.path());
            s.prepare("a", None).unwrap();
            s.commit("c", "a").unwrap();
            s.prepare("b", Some("c")).unwrap();
            s.remove("b").unwrap();
            s.prepare("d", Some("c")).unwrap();
        }
        // What a crash can leave: a dir being built, one renamed but not recorded, one being
        // removed.
        for d in ["new-0123", "99", "rm-4567"] {
            fs::create_dir_all(snaps.join(d).join("fs/sub")).unwrap();
        }
        fs::write(snaps.join("stray-file"), b"x").unwrap();
        let s = open(tmp.path());
        let mut names: Vec<String> = fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["1", "3"]);
        assert_eq!(s.stat("d").unwrap().parent.as_deref(), Some("c"));
        // Ids are never reused.
        s.prepare("e", None).unwrap();
        assert!(snaps.join("4").is_dir());
    }

    #[test]
    fn commit_with_parent_sets_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        s.prepare("x1", None).unwrap();
        s.prepare("x2", None).unwrap();
        fs::write(s.diff_dir("x2").unwrap().join("f"), b"2").unwrap();
        assert!(matches!(
            s.commit_with_parent("l2", "x2", Some("x1")),
            Err(Error::InvalidState { .. })
        ));
        assert!(matches!(
            s.commit_with_parent("l2", "x2", Some("nope")),
            Err(Error::NotFound { .. })
        ));
        s.commit_with_parent("l1", "x1", None).unwrap();
        s.commit_with_parent("l2", "x2", Some("l1")).unwrap();
        assert_eq!(
            s.stat("l2").unwrap(),
            Info {
                key: "l2".into(),
                parent: Some("l1".into()),
                kind: Kind::Committed
            }
        );
        assert!(matches!(s.remove("l1"), Err(Error::InvalidState { .. })));
    }

    fn tar_layer(build: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn add(b: &mut Builder<Vec<u8>>, path: &str, kind: EntryType, data: &[u8]) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data).unwrap();
    }

    /// Three layers unpacked in parallel-puller style (diff_dir + commit_with_parent), with a
    /// whiteout and an opaque directory, mounted for real.
    #[test]
    fn layers_with_whiteouts_merge_in_overlay() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let layers = [
            tar_layer(|b| {
                add(b, "etc", EntryType::Directory, b"");
                add(b, "etc/hosts", EntryType::Regular, b"hosts1");
                add(b, "etc/gone", EntryType::Regular, b"gone");
                add(b, "opq", EntryType::Directory, b"");
                add(b, "opq/old1", EntryType::Regular, b"o1");
                add(b, "opq/old2", EntryType::Regular, b"o2");
            }),
            tar_layer(|b| {
                add(b, "etc/.wh.gone", EntryType::Regular, b"");
                add(b, "opq/.wh..wh..opq", EntryType::Regular, b"");
                add(b, "opq/new", EntryType::Regular, b"n2");
            }),
            tar_layer(|b| {
                add(b, "etc/hosts", EntryType::Regular, b"hosts3");
                add(b, "bin", EntryType::Directory, b"");
                add(b, "bin/sh", EntryType::Regular, b"#!");
            }),
        ];
        // Unpack all first, in any order, then commit bottom-up with explicit parents.
        for (i, tar) in layers.iter().enumerate().rev() {
            s.prepare(&format!("extract-{i}"), None).unwrap();
            let dir = s.diff_dir(&format!("extract-{i}")).unwrap();
            unpack_layer(&tar[..], &dir).unwrap();
            sync_filesystem(&dir).unwrap();
        }
        let whiteout =
            fs::symlink_metadata(s.diff_dir("extract-1").unwrap().join("etc/gone")).unwrap();
        assert!(whiteout.file_type().is_char_device());
        let mut parent: Option<String> = None;
        for i in 0..layers.len() {
            let name = format!("layer-{i}");
            s.commit_with_parent(&name, &format!("extract-{i}"), parent.as_deref())
                .unwrap();
            parent = Some(name);
        }
        let view = s.view("rootfs-view", Some("layer-2")).unwrap();
        let rw = s.prepare("rootfs", Some("layer-2")).unwrap();
        let target = tmp.path().join("mnt");
        fs::create_dir(&target).unwrap();
        let (merged, after_write) = in_private_mount_ns(|| {
            let read_tree = |root: &Path| {
                let mut out = BTreeMap::new();
                for rel in [
                    "etc/hosts",
                    "etc/gone",
                    "opq/old1",
                    "opq/old2",
                    "opq/new",
                    "bin/sh",
                ] {
                    if let Ok(d) = fs::read(root.join(rel)) {
                        out.insert(rel.to_owned(), String::from_utf8(d).unwrap());
                    }
                }
                let mut opq: Vec<String> = fs::read_dir(root.join("opq"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                opq.sort();
                out.insert("ls opq".into(), opq.join(","));
                out
            };
            let guard = mount_all(&view, &target).unwrap();
            let merged = read_tree(&target);
            guard.unmount().unwrap();
            let guard = mount_all(&rw, &target).unwrap();
            fs::remove_file(target.join("etc/hosts")).unwrap();
            let after = read_tree(&target);
            guard.unmount().unwrap();
            (merged, after)
        });
        let want: BTreeMap<String, String> = [
            ("etc/hosts", "hosts3"),
            ("opq/new", "n2"),
            ("bin/sh", "#!"),
            ("ls opq", "new"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(merged, want);
        assert!(!after_write.contains_key("etc/hosts"));
        // The deletion is recorded as a whiteout in the container's upper dir only.
        let upper = s.diff_dir("rootfs").unwrap();
        assert!(
            fs::symlink_metadata(upper.join("etc/hosts"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert!(fs::symlink_metadata(s.diff_dir("rootfs").unwrap().join("bin")).is_err());
    }
}
