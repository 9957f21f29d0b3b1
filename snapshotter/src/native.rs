//! Copy-based snapshots for hosts where overlayfs is unavailable.
//!
//! A snapshot with a parent starts as a full copy of the parent's tree (`cp -a
//! --reflink=auto`, so copy-on-write filesystems share the blocks). Every mount is a bind mount
//! of the snapshot's own `fs`: `rbind,rw` for active snapshots, `rbind,ro` for views and
//! committed ones.
//!
//! Layer diffs in overlay form (whiteout devices, opaque xattrs) mean nothing in a plain copy, so
//! [`Snapshotter::diff_dir`] and [`Snapshotter::commit_with_parent`] are not supported: they
//! return [`Error::InvalidState`]. To build an image on this snapshotter, prepare each layer on
//! its committed parent and apply the layer through the snapshot's mount.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::store::{Resolved, Store, Tables, disk_usage};
use crate::{Error, Info, Kind, Mount, Result, Snapshotter, Usage};

const TABLES: Tables = Tables {
    records: "snapshots.native.records",
    counters: "snapshots.native.counters",
};

const NO_DIFFS: &str =
    "native snapshotter cannot apply overlay diffs; unpack into a prepared snapshot's mount";

/// Snapshots as full directory copies of their parent; mounts are bind mounts.
pub struct NativeSnapshotter {
    store: Store,
}

impl NativeSnapshotter {
    /// Opens the store under `root` (its `snapshots/` subdirectory) with metadata in `db`
    /// (tables `snapshots.native.*`). Removes leftovers of a crash.
    pub fn new(root: &Path, db: Arc<redb::Database>) -> Result<Self> {
        Ok(NativeSnapshotter {
            store: Store::open(root, db, TABLES)?,
        })
    }

    fn mounts_of(&self, s: &Resolved) -> Vec<Mount> {
        let rw = s.info.kind == Kind::Active;
        vec![Mount {
            fstype: "bind".into(),
            source: self.store.fs_dir(s.id).to_string_lossy().into_owned(),
            options: vec!["rbind".into(), if rw { "rw" } else { "ro" }.into()],
        }]
    }

    fn create(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Vec<Mount>> {
        let s = self.store.create(key, parent, kind, |dir, parent| {
            let fs_dir = dir.join("fs");
            match parent {
                None => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&fs_dir)
                    .map_err(|e| Error::io("create dir", &fs_dir, e)),
                Some(p) => copy_tree(&self.store.fs_dir(p.id), &fs_dir),
            }
        })?;
        tracing::debug!(snapshot_key = %key, id = s.id, "snapshot created");
        Ok(self.mounts_of(&s))
    }
}

/// Copies `from` to `to` (which must not exist), preserving everything `cp -a` does: ownership,
/// modes, times, xattrs, hardlinks, device nodes.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| Error::io("run cp -a", from, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::io(
        "copy snapshot tree",
        from,
        std::io::Error::other(format!(
            "cp -a {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    ))
}

impl Snapshotter for NativeSnapshotter {
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

    /// Not supported: [`Error::InvalidState`] for every existing snapshot.
    fn diff_dir(&self, key: &str) -> Result<PathBuf> {
        self.store.resolve(key)?;
        Err(Error::InvalidState {
            key: key.to_owned(),
            reason: NO_DIFFS.into(),
        })
    }

    fn commit(&self, name: &str, key: &str) -> Result<()> {
        self.store.commit(name, key, None)
    }

    /// Not supported: [`Error::InvalidState`] for every existing snapshot.
    fn commit_with_parent(&self, _name: &str, key: &str, _parent: Option<&str>) -> Result<()> {
        self.store.resolve(key)?;
        Err(Error::InvalidState {
            key: key.to_owned(),
            reason: NO_DIFFS.into(),
        })
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.store.remove(key)
    }

    /// Usage of the snapshot's whole tree: with copies, a snapshot's own layer is all of it.
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

    use super::*;
    use crate::testsuite;

    fn open(root: &Path) -> NativeSnapshotter {
        let db = redb::Database::create(root.join("meta.db")).unwrap();
        NativeSnapshotter::new(root, Arc::new(db)).unwrap()
    }

    #[test]
    fn conformance() {
        testsuite::run(open);
    }

    #[test]
    fn copies_parent_and_refuses_diffs() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let m = s.prepare("a", None).unwrap();
        let src = PathBuf::from(&m[0].source);
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/f"), b"data").unwrap();
        std::os::unix::fs::symlink("d/f", src.join("l")).unwrap();
        s.commit("c", "a").unwrap();
        let m = s.prepare("b", Some("c")).unwrap();
        let copy = PathBuf::from(&m[0].source);
        assert_ne!(copy, src);
        assert_eq!(fs::read(copy.join("d/f")).unwrap(), b"data");
        assert_eq!(fs::read_link(copy.join("l")).unwrap(), Path::new("d/f"));
        assert_eq!(m[0].options, vec!["rbind", "rw"]);
        assert!(s.mounts("c").unwrap()[0].is_readonly());
        assert!(matches!(s.diff_dir("b"), Err(Error::InvalidState { .. })));
        assert!(matches!(
            s.commit_with_parent("x", "b", Some("c")),
            Err(Error::InvalidState { .. })
        ));
        assert!(matches!(s.diff_dir("nope"), Err(Error::NotFound { .. })));
    }

    #[test]
    fn new_removes_crash_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let s = open(tmp.path());
            s.prepare("a", None).unwrap();
        }
        let snaps = tmp.path().join("snapshots");
        fs::create_dir_all(snaps.join("new-x/fs")).unwrap();
        fs::create_dir_all(snaps.join("7/fs")).unwrap();
        let s = open(tmp.path());
        let names: Vec<_> = fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["1"]);
        assert_eq!(s.stat("a").unwrap().kind, Kind::Active);
    }
}
