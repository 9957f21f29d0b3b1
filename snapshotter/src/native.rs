//! Copy-based snapshots for hosts where overlayfs is unavailable.
//!
//! A snapshot with a parent starts as a full copy of the parent's tree (`cp -a
//! --reflink=auto`, so copy-on-write filesystems share the blocks). Every mount is a bind mount
//! of the snapshot's own `fs`: `rbind,rw` for active snapshots, `rbind,ro` for views and
//! committed ones.
//!
//! Layer diffs in overlay form (whiteout devices, opaque xattrs) mean nothing in a plain copy, so
//! this store works in [`DiffMode::Apply`]: an image is built one layer after another, each
//! prepared on its committed parent, applied onto the whole tree [`Snapshotter::diff_dir`]
//! returns (the directory the active snapshot's bind mount points at) with
//! [`crate::unpack::apply_layer`], then committed. [`Snapshotter::commit_with_parent`] is not
//! supported ([`Error::InvalidState`]): a copy cannot change parents after the fact.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::store::{Resolved, Store, Tables, disk_usage};
use crate::{DiffMode, Error, Info, Kind, Mount, Result, Snapshotter, Usage};

const TABLES: Tables = Tables {
    records: "snapshots.native.records",
    counters: "snapshots.native.counters",
};

const NO_REPARENT: &str = "native snapshotter cannot change a snapshot's parent (it works in \
     DiffMode::Apply: prepare on the committed parent, apply the layer, commit)";

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

    /// [`DiffMode::Apply`]: a snapshot is a full copy of its parent, so a layer is applied onto
    /// it (whiteouts delete) after the parent is committed.
    fn diff_mode(&self) -> DiffMode {
        DiffMode::Apply
    }

    /// The active snapshot's whole tree (its parent's contents included): the `fs` directory its
    /// bind mount points at, for [`crate::unpack::apply_layer`]. [`Error::InvalidState`] for a
    /// view or committed snapshot.
    fn diff_dir(&self, key: &str) -> Result<PathBuf> {
        self.store.active_fs_dir(key)
    }

    fn committed_dir(&self, key: &str) -> Result<PathBuf> {
        self.store.committed_fs_dir(key)
    }

    fn commit(&self, name: &str, key: &str) -> Result<()> {
        self.store.commit(name, key, None)
    }

    /// Not supported: [`Error::InvalidState`] for every existing snapshot. This store is
    /// [`DiffMode::Apply`]: a snapshot's tree already holds its parent's contents, so its parent
    /// is the one given at prepare; prepare each layer on its committed parent, apply, and
    /// [`commit`](Snapshotter::commit).
    fn commit_with_parent(&self, _name: &str, key: &str, _parent: Option<&str>) -> Result<()> {
        self.store.resolve(key)?;
        Err(Error::InvalidState {
            key: key.to_owned(),
            reason: NO_REPARENT.into(),
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

    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    use sha2::Digest as _;
    use tar::{Builder, EntryType, Header};

    use super::*;
    use crate::testsuite::{self, listing, require_root};
    use crate::unpack::{apply_layer, sync_filesystem};

    fn open(root: &Path) -> NativeSnapshotter {
        let db = redb::Database::create(root.join("meta.db")).unwrap();
        NativeSnapshotter::new(root, Arc::new(db)).unwrap()
    }

    #[test]
    fn conformance() {
        testsuite::run(open);
    }

    #[test]
    fn copies_parent_and_diffs_into_the_whole_tree() {
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
        assert_eq!(s.diff_mode(), DiffMode::Apply);
        // The diff dir is the whole tree, the one the mount shows.
        assert_eq!(s.diff_dir("b").unwrap(), copy);
        assert!(matches!(s.diff_dir("c"), Err(Error::InvalidState { .. })));
        s.view("v", Some("c")).unwrap();
        assert!(matches!(s.diff_dir("v"), Err(Error::InvalidState { .. })));
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

    fn tar_of(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            if matches!(kind, EntryType::Symlink | EntryType::Link) {
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            } else {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    /// Prepares `key` on `parent`, applies `tar` onto its diff dir, commits it as `name`.
    fn apply(s: &NativeSnapshotter, key: &str, parent: Option<&str>, tar: &[u8], name: &str) {
        s.prepare(key, parent).unwrap();
        let dir = s.diff_dir(key).unwrap();
        let out = apply_layer(tar, &dir).unwrap();
        let want: [u8; 32] = sha2::Sha256::digest(tar).into();
        assert_eq!(out.diff_id, api::Digest::from_sha256_bytes(&want));
        assert_eq!(out.uncompressed_size, tar.len() as u64);
        sync_filesystem(&dir).unwrap();
        s.commit(name, key).unwrap();
    }

    /// A puller's view of this store: layers applied in order through the trait, with
    /// whiteouts, an opaque directory and a hardlink to a lower layer's file.
    #[test]
    fn applies_a_layer_chain_as_overlay_would_show_it() {
        require_root();
        use EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let l1 = tar_of(&[
            ("etc", D, ""),
            ("etc/passwd", F, "root"),
            ("etc/gone", F, "x"),
            ("var", D, ""),
            ("var/cache", D, ""),
            ("var/cache/big", F, "cached"),
            ("opq", D, ""),
            ("opq/old", F, "o"),
            ("opq/olddir/deep", F, "d"),
            ("lib", L, "usr/lib"),
        ]);
        let l2 = tar_of(&[
            ("etc/.wh.gone", F, ""),
            ("var/.wh.cache", F, ""),
            ("opq/new", F, "n"),
            ("opq/.wh..wh..opq", F, ""),
            ("etc/passwd-hard", H, "etc/passwd"),
            ("etc/.wh.never-existed", F, ""),
        ]);
        let l3 = tar_of(&[("etc/passwd", F, "root3"), ("opq/newer", F, "n3")]);
        apply(&s, "k1", None, &l1, "c1");
        apply(&s, "k2", Some("c1"), &l2, "c2");
        apply(&s, "k3", Some("c2"), &l3, "c3");
        assert_eq!(s.stat("c3").unwrap().parent.as_deref(), Some("c2"));

        let want = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let c2 = PathBuf::from(&s.mounts("c2").unwrap()[0].source);
        assert_eq!(
            listing(&c2),
            want(&[
                ("etc", "dir 755"),
                ("etc/passwd", "file 644 root"),
                ("etc/passwd-hard", "file 644 root"),
                ("lib", "link -> usr/lib"),
                ("opq", "dir 755"),
                ("opq/new", "file 644 n"),
                ("var", "dir 755"),
            ])
        );
        // A hardlink to the lower layer's file (in c2's own copy).
        let ino = |root: &Path, p: &str| fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(ino(&c2, "etc/passwd"), ino(&c2, "etc/passwd-hard"));

        let c3 = PathBuf::from(&s.mounts("c3").unwrap()[0].source);
        let top = listing(&c3);
        assert_eq!(
            top,
            want(&[
                ("etc", "dir 755"),
                // Replaced in layer 3: the new file, so the hardlink keeps layer 2's contents,
                // as overlayfs (which copies up) shows it too.
                ("etc/passwd", "file 644 root3"),
                ("etc/passwd-hard", "file 644 root"),
                ("lib", "link -> usr/lib"),
                ("opq", "dir 755"),
                ("opq/new", "file 644 n"),
                ("opq/newer", "file 644 n3"),
                ("var", "dir 755"),
            ])
        );
        // No whiteout devices or overlay xattrs anywhere, in any snapshot.
        for c in ["c1", "c2", "c3"] {
            let root = PathBuf::from(&s.mounts(c).unwrap()[0].source);
            for (rel, what) in listing(&root) {
                assert!(!what.starts_with("char"), "{c}: {rel} is {what}");
                let attrs: Vec<_> = xattr::list(root.join(&rel)).unwrap().collect();
                assert!(
                    attrs
                        .iter()
                        .all(|a| !a.to_string_lossy().starts_with("trusted.overlay.")),
                    "{c}: {rel} has {attrs:?}"
                );
            }
        }
        // The parents are untouched by their children's layers.
        let c1 = PathBuf::from(&s.mounts("c1").unwrap()[0].source);
        assert_eq!(fs::read(c1.join("var/cache/big")).unwrap(), b"cached");
        assert_eq!(fs::read(c1.join("opq/olddir/deep")).unwrap(), b"d");
    }

    /// A symlink from a lower layer is never followed by a later layer's entries or whiteouts.
    #[test]
    fn apply_refuses_paths_through_a_lower_layer_symlink() {
        require_root();
        use EntryType::{Regular as F, Symlink as L};
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"v").unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        let s = open(&store);
        let target = outside.to_str().unwrap();
        apply(&s, "k1", None, &tar_of(&[("lnk", L, target)]), "c1");
        for (i, layer) in [
            tar_of(&[("lnk/x", F, "escaped")]),
            tar_of(&[("lnk/.wh.victim", F, "")]),
            tar_of(&[("lnk/.wh..wh..opq", F, "")]),
        ]
        .iter()
        .enumerate()
        {
            let key = format!("k2-{i}");
            s.prepare(&key, Some("c1")).unwrap();
            let dir = s.diff_dir(&key).unwrap();
            match apply_layer(&layer[..], &dir) {
                Err(Error::UnsafeEntry { reason, .. }) => {
                    assert!(reason.contains("symlink"), "layer {i}: {reason}");
                }
                other => panic!("layer {i}: expected UnsafeEntry, got {other:?}"),
            }
            s.remove(&key).unwrap();
        }
        assert!(!outside.join("x").exists());
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"v");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }
}
