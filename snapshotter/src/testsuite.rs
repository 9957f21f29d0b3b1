//! The conformance suite every [`crate::Snapshotter`] passes, after containerd's
//! `core/snapshots/testsuite`.
//!
//! [`run`] needs root: it mounts what the snapshotter returns, as a runtime would, inside a
//! private mount namespace of a dedicated thread (so no mount outlives the suite or leaks to the
//! host, even on panic). Each case gets a fresh temp dir and a fresh snapshotter from `make`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, ErrorKind};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::unpack::{apply_layer, sync_filesystem, unpack_layer};
use crate::{DiffMode, Error, Info, Kind, Mount, Result, Snapshotter};

/// Panics unless running as root: root-only tests are never skipped silently.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it mounts filesystems): run the test suite as root"
    );
}

/// Runs `f` on a new thread that has its own mount namespace, with `/` made recursively private.
/// Every mount made by `f` disappears with the thread. Panics in `f` propagate.
pub fn in_private_mount_ns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    require_root();
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            // A thread may unshare its mount namespace: CLONE_NEWNS implies CLONE_FS, which
            // gives this thread its own cwd/root copy and leaves the others alone.
            nix::sched::unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make / rprivate");
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// Mounts made by [`mount_all`]; unmounted (lazily) on drop.
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
    count: usize,
}

impl MountGuard {
    /// Unmounts now, reporting errors.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<()> {
        while self.count > 0 {
            nix::mount::umount2(&self.target, MntFlags::MNT_DETACH).map_err(|e| Error::Mount {
                target: self.target.clone(),
                source: e.into(),
            })?;
            self.count -= 1;
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            tracing::warn!(error = %e, "unmount");
        }
    }
}

/// Mounts `mounts` on `target` the way a runtime does: `bind`/`rbind`, `ro`, `rw` become mount
/// flags, other options are the filesystem's data.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<MountGuard> {
    let mut guard = MountGuard {
        target: target.to_owned(),
        count: 0,
    };
    for m in mounts {
        let ro = m.is_readonly();
        let mount_err = |e: nix::Error| Error::Mount {
            target: target.to_owned(),
            source: e.into(),
        };
        if m.fstype == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
            let mut flags = MsFlags::MS_BIND;
            if m.options.iter().any(|o| o == "rbind") {
                flags |= MsFlags::MS_REC;
            }
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                flags,
                None::<&str>,
            )
            .map_err(mount_err)?;
            guard.count += 1;
            if ro {
                // A bind mount ignores MS_RDONLY until remounted.
                nix::mount::mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(mount_err)?;
            }
        } else {
            let data: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "ro" && *o != "rw")
                .collect();
            let flags = if ro {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                Some(m.fstype.as_str()),
                flags,
                Some(data.join(",").as_str()),
            )
            .map_err(mount_err)?;
            guard.count += 1;
        }
    }
    Ok(guard)
}

/// One conformance case: the snapshotter and a scratch dir for mount points.
type Case<S> = fn(&S, &Path);

/// Runs every conformance case against snapshotters made by `make(root)`, each with a fresh
/// empty `root`. Needs root. Panics listing every failed case.
pub fn run<S: Snapshotter>(make: impl Fn(&Path) -> S + Send) {
    let cases: Vec<(&str, Case<S>)> = vec![
        ("prepare_commit_view_chain", prepare_commit_view_chain),
        ("stat_and_kinds", stat_and_kinds),
        ("already_exists", already_exists),
        ("not_found", not_found),
        ("invalid_state", invalid_state),
        ("remove_parent_with_children", remove_parent_with_children),
        ("remove_kinds_and_reuse_key", remove_kinds_and_reuse_key),
        ("mount_kinds", mount_kinds),
        ("view_without_parent", view_without_parent),
        ("deep_chain", deep_chain),
        ("usage", usage),
        ("list", list),
        ("concurrent_prepares", concurrent_prepares),
        ("layer_diffs", layer_diffs),
        ("diff_round_trip", diff_round_trip),
    ];
    let failures = in_private_mount_ns(move || {
        let mut failures = Vec::new();
        for (name, case) in cases {
            let tmp = tempfile::tempdir().expect("create temp dir");
            let root = tmp.path().join("root");
            fs::create_dir(&root).expect("create root");
            let scratch = tmp.path().join("scratch");
            fs::create_dir(&scratch).expect("create scratch");
            let result = catch_unwind(AssertUnwindSafe(|| {
                let s = make(&root);
                case(&s, &scratch);
            }));
            if let Err(payload) = result {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".into());
                failures.push(format!("{name}: {msg}"));
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "snapshotter conformance failures:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Mounts `mounts` on a fresh dir under `scratch` and runs `f` with its path.
fn with_mounted<T>(mounts: &[Mount], scratch: &Path, f: impl FnOnce(&Path) -> T) -> T {
    let target = tempfile::tempdir_in(scratch).expect("create mount point");
    let guard = mount_all(mounts, target.path()).expect("mount snapshot");
    let out = f(target.path());
    guard.unmount().expect("unmount snapshot");
    out
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parent dirs");
    }
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
}

fn read(root: &Path, rel: &str) -> Option<Vec<u8>> {
    match fs::read(root.join(rel)) {
        Ok(d) => Some(d),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("read {rel}: {e}"),
    }
}

/// Every regular file below `root` with its contents.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let entry = entry.expect("read dir entry");
            let t = entry.file_type().expect("file type");
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .expect("below root")
                    .display()
                    .to_string();
                out.insert(rel, fs::read(entry.path()).expect("read file"));
            }
        }
    }
    out
}

/// Every entry below `root` (not following symlinks), by relative path: `dir <mode>`,
/// `file <mode> <contents>` (lossy UTF-8), `link -> <target>`, `char <rdev>`, `block <rdev>`,
/// `fifo`, or `other`. Modes are the permission bits in octal.
pub fn listing(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("read dir entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let md = fs::symlink_metadata(&path).expect("lstat");
            let t = md.file_type();
            let mode = md.mode() & 0o7777;
            let what = if t.is_dir() {
                stack.push(path);
                format!("dir {mode:o}")
            } else if t.is_file() {
                let data = fs::read(&path).expect("read file");
                format!("file {mode:o} {}", String::from_utf8_lossy(&data))
            } else if t.is_symlink() {
                format!(
                    "link -> {}",
                    fs::read_link(&path).expect("readlink").display()
                )
            } else if t.is_char_device() {
                format!("char {}", md.rdev())
            } else if t.is_block_device() {
                format!("block {}", md.rdev())
            } else if t.is_fifo() {
                "fifo".to_owned()
            } else {
                "other".to_owned()
            };
            out.insert(rel, what);
        }
    }
    out
}

fn files(pairs: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(r: Result<T>, what: &str) {
    match r {
        Err(Error::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

#[track_caller]
fn assert_exists<T: std::fmt::Debug>(r: Result<T>, what: &str) {
    match r {
        Err(Error::AlreadyExists(_)) => {}
        other => panic!("{what}: expected AlreadyExists, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<T>, what: &str) {
    match r {
        Err(Error::InvalidState { .. }) => {}
        other => panic!("{what}: expected InvalidState, got {other:?}"),
    }
}

/// Prepares `key` on `parent`, writes `files` through its mount, commits it as `name`.
fn layer<S: Snapshotter>(
    s: &S,
    scratch: &Path,
    name: &str,
    parent: Option<&str>,
    files: &[(&str, &[u8])],
) {
    let key = format!("{name}-active");
    let mounts = s.prepare(&key, parent).expect("prepare");
    with_mounted(&mounts, scratch, |root| {
        for (rel, data) in files {
            write(root, rel, data);
        }
    });
    s.commit(name, &key).expect("commit");
}

// ---------------------------------------------------------------------------------------------
// Cases.

fn prepare_commit_view_chain<S: Snapshotter>(s: &S, scratch: &Path) {
    let mounts = s.prepare("p1", None).expect("prepare p1");
    with_mounted(&mounts, scratch, |root| {
        write(root, "dir/a", b"a1");
        write(root, "b", b"b1");
    });
    s.commit("c1", "p1").expect("commit c1");
    assert_eq!(
        s.stat("c1").expect("stat c1"),
        Info {
            key: "c1".into(),
            parent: None,
            kind: Kind::Committed
        }
    );
    assert_not_found(s.stat("p1"), "active key gone after commit");

    let mounts = s.prepare("p2", Some("c1")).expect("prepare p2");
    with_mounted(&mounts, scratch, |root| {
        assert_eq!(tree(root), files(&[("dir/a", b"a1"), ("b", b"b1")]));
        write(root, "dir/a", b"a2");
        fs::remove_file(root.join("b")).expect("remove b");
        write(root, "c", b"c2");
    });
    s.commit("c2", "p2").expect("commit c2");

    let mounts = s.view("v", Some("c2")).expect("view");
    with_mounted(&mounts, scratch, |root| {
        assert_eq!(tree(root), files(&[("dir/a", b"a2"), ("c", b"c2")]));
        let err = fs::write(root.join("new"), b"x").expect_err("a view is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    });
    // The parent is untouched.
    with_mounted(&s.mounts("c1").expect("mounts c1"), scratch, |root| {
        assert_eq!(tree(root), files(&[("dir/a", b"a1"), ("b", b"b1")]));
    });
    // A committed snapshot is read-only.
    with_mounted(&s.mounts("c2").expect("mounts c2"), scratch, |root| {
        assert_eq!(tree(root), files(&[("dir/a", b"a2"), ("c", b"c2")]));
        assert!(
            fs::write(root.join("new"), b"x").is_err(),
            "committed is read-only"
        );
    });
}

fn stat_and_kinds<S: Snapshotter>(s: &S, scratch: &Path) {
    layer(s, scratch, "base", None, &[("f", b"x")]);
    s.prepare("active", Some("base")).expect("prepare");
    s.view("view", Some("base")).expect("view");
    assert_eq!(
        s.stat("active").expect("stat"),
        Info {
            key: "active".into(),
            parent: Some("base".into()),
            kind: Kind::Active
        }
    );
    assert_eq!(
        s.stat("view").expect("stat"),
        Info {
            key: "view".into(),
            parent: Some("base".into()),
            kind: Kind::View
        }
    );
    assert_eq!(s.stat("base").expect("stat").kind, Kind::Committed);
    s.commit("top", "active").expect("commit");
    assert_eq!(
        s.stat("top").expect("stat"),
        Info {
            key: "top".into(),
            parent: Some("base".into()),
            kind: Kind::Committed
        }
    );
}

fn already_exists<S: Snapshotter>(s: &S, _scratch: &Path) {
    s.prepare("a", None).expect("prepare");
    assert_exists(s.prepare("a", None), "prepare twice");
    assert_exists(s.view("a", None), "view over an active key");
    s.commit("c", "a").expect("commit");
    // Keys and names share one namespace.
    assert_exists(s.prepare("c", None), "prepare with a committed name");
    assert_exists(s.view("c", Some("c")), "view with a committed name");
    s.prepare("b", Some("c")).expect("prepare b");
    assert_exists(s.commit("c", "b"), "commit onto an existing name");
    s.prepare("d", None).expect("prepare d");
    assert_exists(s.commit("b", "d"), "commit onto an active key");
    // The failed commits left both intact.
    assert_eq!(s.stat("b").expect("stat b").kind, Kind::Active);
    assert_eq!(s.stat("d").expect("stat d").kind, Kind::Active);
}

fn not_found<S: Snapshotter>(s: &S, _scratch: &Path) {
    assert_not_found(s.stat("nope"), "stat");
    assert_not_found(s.prepare("a", Some("nope")), "prepare on missing parent");
    assert_not_found(s.view("v", Some("nope")), "view on missing parent");
    assert_not_found(s.stat("a"), "failed prepare left nothing");
    assert_not_found(s.mounts("nope"), "mounts");
    assert_not_found(s.commit("c", "nope"), "commit");
    assert_not_found(s.remove("nope"), "remove");
    assert_not_found(s.usage("nope"), "usage");
    assert_not_found(s.diff_dir("nope"), "diff_dir");
    assert_not_found(s.committed_dir("nope"), "committed_dir");
    assert!(s.list().expect("list").is_empty());
}

fn invalid_state<S: Snapshotter>(s: &S, _scratch: &Path) {
    s.prepare("active", None).expect("prepare");
    s.view("view", None).expect("view");
    assert_invalid(
        s.prepare("child", Some("active")),
        "prepare on an active parent",
    );
    assert_invalid(s.view("child", Some("view")), "view on a view");
    assert_invalid(s.commit("c", "view"), "commit a view");
    assert_invalid(s.diff_dir("view"), "diff_dir of a view");
    assert_invalid(s.committed_dir("view"), "committed_dir of a view");
    assert_invalid(
        s.committed_dir("active"),
        "committed_dir of an active snapshot",
    );
    s.commit("committed", "active").expect("commit");
    assert!(
        s.committed_dir("committed")
            .expect("committed_dir")
            .is_dir()
    );
    assert_invalid(s.commit("c2", "committed"), "commit a committed snapshot");
    assert_invalid(s.diff_dir("committed"), "diff_dir of a committed snapshot");
    assert_not_found(s.stat("child"), "failed prepare left nothing");
    assert_not_found(s.stat("c"), "failed commit left nothing");
}

fn remove_parent_with_children<S: Snapshotter>(s: &S, scratch: &Path) {
    layer(s, scratch, "base", None, &[("keep", b"me")]);
    s.prepare("child", Some("base")).expect("prepare");
    s.view("view", Some("base")).expect("view");
    assert_invalid(s.remove("base"), "remove a parent");
    with_mounted(&s.mounts("base").expect("mounts"), scratch, |root| {
        assert_eq!(
            read(root, "keep").as_deref(),
            Some(&b"me"[..]),
            "nothing removed"
        );
    });
    s.remove("child").expect("remove child");
    assert_invalid(s.remove("base"), "remove a parent of a view");
    s.remove("view").expect("remove view");
    s.remove("base").expect("remove base");
    assert!(s.list().expect("list").is_empty());
}

fn remove_kinds_and_reuse_key<S: Snapshotter>(s: &S, scratch: &Path) {
    layer(s, scratch, "base", None, &[("f", b"1")]);
    let mounts = s.prepare("a", Some("base")).expect("prepare");
    with_mounted(&mounts, scratch, |root| write(root, "g", b"2"));
    s.remove("a").expect("remove active");
    assert_not_found(s.stat("a"), "removed");
    assert_not_found(s.remove("a"), "remove twice");
    // The key can be used again, and starts fresh.
    let mounts = s.prepare("a", Some("base")).expect("prepare again");
    with_mounted(&mounts, scratch, |root| {
        assert_eq!(tree(root), files(&[("f", b"1")]));
    });
    s.remove("a").expect("remove");
    s.remove("base").expect("remove committed");
    let (total, _) = s.total_usage().expect("total usage");
    assert!(total.inodes <= 1, "removed snapshots left {total:?}");
}

fn mount_kinds<S: Snapshotter>(s: &S, scratch: &Path) {
    let m = s.prepare("a", None).expect("prepare");
    assert!(!m.is_empty());
    assert!(
        m.iter().all(|m| !m.is_readonly()),
        "active mounts are rw: {m:?}"
    );
    assert_eq!(
        s.mounts("a").expect("mounts"),
        m,
        "mounts() repeats prepare()"
    );
    s.commit("c", "a").expect("commit");
    let mc = s.mounts("c").expect("mounts committed");
    assert!(
        mc.iter().any(Mount::is_readonly),
        "committed mounts are ro: {mc:?}"
    );
    let v = s.view("v", Some("c")).expect("view");
    assert!(
        v.iter().any(Mount::is_readonly),
        "view mounts are ro: {v:?}"
    );
    assert_eq!(s.mounts("v").expect("mounts"), v);
    let p = s.prepare("p", Some("c")).expect("prepare on parent");
    assert!(
        p.iter().all(|m| !m.is_readonly()),
        "active mounts are rw: {p:?}"
    );
    assert_eq!(s.mounts("p").expect("mounts"), p);
    with_mounted(&p, scratch, |root| write(root, "x", b"x"));
}

fn view_without_parent<S: Snapshotter>(s: &S, scratch: &Path) {
    let m = s.view("v", None).expect("view");
    with_mounted(&m, scratch, |root| {
        assert!(tree(root).is_empty());
        assert!(
            fs::write(root.join("x"), b"x").is_err(),
            "views are read-only"
        );
    });
    assert_eq!(
        s.stat("v").expect("stat"),
        Info {
            key: "v".into(),
            parent: None,
            kind: Kind::View
        }
    );
}

fn deep_chain<S: Snapshotter>(s: &S, scratch: &Path) {
    let mut parent: Option<String> = None;
    for i in 0..6 {
        let name = format!("l{i}");
        let own = format!("file{i}");
        let layer_files: [(&str, &[u8]); 2] =
            [(own.as_str(), name.as_bytes()), ("shared", name.as_bytes())];
        layer(s, scratch, &name, parent.as_deref(), &layer_files);
        parent = Some(name);
    }
    let m = s.view("top", parent.as_deref()).expect("view");
    with_mounted(&m, scratch, |root| {
        let t = tree(root);
        assert_eq!(t.len(), 7, "{t:?}");
        assert_eq!(t["shared"], b"l5");
        for i in 0..6 {
            assert_eq!(t[&format!("file{i}")], format!("l{i}").into_bytes());
        }
    });
    assert_eq!(s.stat("l5").expect("stat").parent.as_deref(), Some("l4"));
}

fn usage<S: Snapshotter>(s: &S, scratch: &Path) {
    let m = s.prepare("a", None).expect("prepare");
    let empty = s.usage("a").expect("usage");
    assert_eq!(
        empty.inodes, 1,
        "an empty snapshot is its root dir: {empty:?}"
    );
    with_mounted(&m, scratch, |root| {
        write(root, "dir/one", &[1u8; 1000]);
        write(root, "two", &[2u8; 20_000]);
        fs::hard_link(root.join("two"), root.join("two-again")).expect("hardlink");
        std::os::unix::fs::symlink("two", root.join("link")).expect("symlink");
    });
    let u = s.usage("a").expect("usage");
    // root, dir, one, two (hardlinked: once), link
    assert_eq!(u.inodes, 5, "{u:?}");
    assert!(u.size >= 21_000 + 3, "{u:?}");
    assert!(u.size < 21_000 + 3 + 64 * 1024, "{u:?}");
    s.commit("c", "a").expect("commit");
    assert_eq!(s.usage("c").expect("usage"), u, "commit keeps usage");

    layer(s, scratch, "d", Some("c"), &[("three", &[3u8; 5000])]);
    let d = s.usage("d").expect("usage");
    assert!(d.size >= 5000 && d.inodes >= 2, "{d:?}");
    let (total, path) = s.total_usage().expect("total usage");
    assert!(path.is_dir(), "{path:?}");
    assert!(total.size >= u.size + 5000, "{total:?}");
    assert!(total.inodes >= u.inodes + 2, "{total:?}");
}

fn list<S: Snapshotter>(s: &S, scratch: &Path) {
    layer(s, scratch, "base", None, &[]);
    s.prepare("active", Some("base")).expect("prepare");
    s.view("view", None).expect("view");
    let mut got = s.list().expect("list");
    got.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        got,
        vec![
            Info {
                key: "active".into(),
                parent: Some("base".into()),
                kind: Kind::Active
            },
            Info {
                key: "base".into(),
                parent: None,
                kind: Kind::Committed
            },
            Info {
                key: "view".into(),
                parent: None,
                kind: Kind::View
            },
        ]
    );
}

fn concurrent_prepares<S: Snapshotter>(s: &S, scratch: &Path) {
    layer(s, scratch, "base", None, &[("f", b"x")]);
    let results: Vec<Result<Vec<Mount>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|i| sc.spawn(move || s.prepare(&format!("k{i}"), Some("base"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut seen = std::collections::HashSet::new();
    for r in results {
        let m = r.expect("concurrent prepare");
        assert!(
            seen.insert(format!("{m:?}")),
            "two snapshots share mounts: {m:?}"
        );
    }
    // Racing on one key: exactly one wins.
    let results: Vec<Result<Vec<Mount>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| s.prepare("same", None)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert_eq!(s.list().expect("list").len(), 10);
}

/// Appends one entry (mode 0755 for directories, 0644 otherwise; `data` is the link target for
/// links) to a layer tar.
fn tar_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, data: &str) {
    use tar::EntryType;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if matches!(kind, EntryType::Symlink | EntryType::Link) {
        h.set_size(0);
        b.append_link(&mut h, path, data).expect("append link");
    } else {
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data.as_bytes())
            .expect("append entry");
    }
}

fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        tar_entry(&mut b, path, *kind, data);
    }
    b.into_inner().expect("finish tar")
}

/// Builds a three-layer image (whiteouts of a file, a directory and a symlink, an opaque
/// directory with entries before and after its marker, type changes, a hardlink) the way this
/// store's [`DiffMode`] says, and checks the view of the top layer shows what overlayfs would.
fn layer_diffs<S: Snapshotter>(s: &S, scratch: &Path) {
    use sha2::Digest as _;
    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};
    let layers = [
        tar_of(&[
            ("etc", D, ""),
            ("etc/hosts", F, "h1"),
            ("etc/gone", F, "g"),
            ("etc/passwd", F, "p1"),
            ("olddir", D, ""),
            ("olddir/a", F, "a"),
            ("olddir/sub/b", F, "b"),
            ("opq", D, ""),
            ("opq/old", F, "o"),
            ("opq/keepdir", D, ""),
            ("opq/keepdir/old", F, "ko"),
            ("lnk", L, "etc/hosts"),
            ("bin", D, ""),
            ("bin/tool", F, "t"),
        ]),
        tar_of(&[
            ("etc/.wh.gone", F, ""),
            (".wh.olddir", F, ""),
            (".wh.lnk", F, ""),
            (".wh.missing", F, ""),
            ("opq", D, ""),
            ("opq/pre", F, "pre"),
            ("opq/.wh..wh..opq", F, ""),
            ("opq/keepdir", D, ""),
            ("opq/keepdir/new", F, "n"),
            ("opq/post", F, "post"),
            ("bin/tool", D, ""),
            ("bin/tool/inner", F, "i"),
            ("etc/passwd", L, "hosts"),
        ]),
        tar_of(&[
            ("etc/hosts", F, "h3"),
            ("etc/hosts2", H, "etc/hosts"),
            ("olddir", D, ""),
            ("olddir/fresh", F, "f"),
        ]),
    ];
    let mode = s.diff_mode();
    let mut parent: Option<String> = None;
    for (i, tar) in layers.iter().enumerate() {
        let key = format!("extract-{i}");
        let name = format!("layer-{i}");
        let prepared_on = match mode {
            DiffMode::Overlay => None,
            DiffMode::Apply => parent.as_deref(),
        };
        s.prepare(&key, prepared_on).expect("prepare");
        let dir = s.diff_dir(&key).expect("diff_dir");
        let out = match mode {
            DiffMode::Overlay => unpack_layer(&tar[..], &dir),
            DiffMode::Apply => apply_layer(&tar[..], &dir),
        }
        .unwrap_or_else(|e| panic!("layer {i}: {e}"));
        let want: [u8; 32] = sha2::Sha256::digest(tar).into();
        assert_eq!(
            out.diff_id,
            api::Digest::from_sha256_bytes(&want),
            "layer {i}"
        );
        sync_filesystem(&dir).expect("syncfs");
        match mode {
            DiffMode::Overlay => s.commit_with_parent(&name, &key, parent.as_deref()),
            DiffMode::Apply => s.commit(&name, &key),
        }
        .expect("commit");
        assert_eq!(s.stat(&name).expect("stat").parent, parent, "{name}");
        parent = Some(name);
    }
    let m = s.view("image", parent.as_deref()).expect("view");
    let (got, hosts_ino) = with_mounted(&m, scratch, |root| {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| fs::metadata(root.join(p)).expect("stat").ino();
        (listing(root), (ino("etc/hosts"), ino("etc/hosts2")))
    });
    let want: BTreeMap<String, String> = [
        ("bin", "dir 755"),
        ("bin/tool", "dir 755"),
        ("bin/tool/inner", "file 644 i"),
        ("etc", "dir 755"),
        ("etc/hosts", "file 644 h3"),
        ("etc/hosts2", "file 644 h3"),
        ("etc/passwd", "link -> hosts"),
        ("olddir", "dir 755"),
        ("olddir/fresh", "file 644 f"),
        ("opq", "dir 755"),
        ("opq/keepdir", "dir 755"),
        ("opq/keepdir/new", "file 644 n"),
        ("opq/post", "file 644 post"),
        ("opq/pre", "file 644 pre"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(got, want, "{mode:?}");
    assert_eq!(hosts_ino.0, hosts_ino.1, "hardlink kept");
}

/// Every entry below `root` (not following symlinks) with what a layer carries of it, times
/// aside: `<type> <mode> <uid>:<gid> <contents | -> target | rdev>` and its xattrs
/// (`trusted.overlay.*` left out) as ` name=value`. Sockets are left out: no layer holds one.
pub fn full_listing(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("read dir entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let md = fs::symlink_metadata(&path).expect("lstat");
            let t = md.file_type();
            let what = if t.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if t.is_file() {
                let data = fs::read(&path).expect("read file");
                format!("file {}", String::from_utf8_lossy(&data))
            } else if t.is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                format!("link -> {}", target.display())
            } else if t.is_char_device() {
                format!("char {}", md.rdev())
            } else if t.is_block_device() {
                format!("block {}", md.rdev())
            } else if t.is_fifo() {
                "fifo".to_owned()
            } else {
                continue;
            };
            let mut line = format!("{what} {:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
            let mut attrs: Vec<_> = xattr::list(&path)
                .expect("list xattrs")
                .filter(|a| !a.as_bytes().starts_with(b"trusted.overlay."))
                .collect();
            attrs.sort();
            for a in attrs {
                let v = xattr::get(&path, &a)
                    .expect("get xattr")
                    .unwrap_or_default();
                line.push_str(&format!(" {}={v:?}", a.to_string_lossy()));
            }
            out.insert(rel, line);
        }
    }
    out
}

/// One entry of a tar, as [`tar_entries`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The path, its PAX record applied.
    pub path: String,
    /// The type flag (`'0'` file, `'5'` dir, `'1'` hardlink, `'2'` symlink...).
    pub kind: char,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Data size.
    pub size: u64,
    /// A link's target.
    pub link: Option<String>,
    /// `SCHILY.xattr.*` records, by xattr name.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// The entries of an uncompressed tar, read with the `tar` crate (an independent reader).
pub fn tar_entries(tar: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(tar);
    let mut out = Vec::new();
    for entry in archive.entries().expect("read tar") {
        let mut e = entry.expect("tar entry");
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().expect("pax records") {
            for ext in exts {
                let ext = ext.expect("pax record");
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(
                        String::from_utf8_lossy(name).into_owned(),
                        ext.value_bytes().to_vec(),
                    );
                }
            }
        }
        let h = e.header();
        out.push(TarEntry {
            path: String::from_utf8_lossy(&e.path_bytes()).into_owned(),
            kind: char::from(h.entry_type().as_byte()),
            mode: h.mode().expect("mode"),
            uid: h.uid().expect("uid"),
            gid: h.gid().expect("gid"),
            size: h.size().expect("size"),
            link: e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            xattrs,
        });
    }
    out
}

/// `security.capability` granting cap_net_bind_service (VFS_CAP_REVISION_2, effective).
const NET_BIND_CAP: [u8; 20] = [
    0x01, 0, 0, 0x02, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A parent with files, dirs, symlinks (one to the host's `/etc`), a hardlinked pair and
/// xattrs; an active snapshot on it changed through its mount in every way a container can
/// change it; then [`crate::diff::diff`], its tar checked entry by entry, and unpacked the way
/// this store's [`DiffMode`] says onto the same parent: the result must show what the changed
/// snapshot showed.
fn diff_round_trip<S: Snapshotter>(s: &S, scratch: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use sha2::Digest as _;

    use crate::diff::diff;
    let chown = |p: &Path, uid: u32, gid: u32| {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("chown");
    };
    let long_name = "l".repeat(120);
    let long_target = "t".repeat(150);

    let mounts = s.prepare("base-active", None).expect("prepare base");
    with_mounted(&mounts, scratch, |root| {
        for (rel, data) in [
            ("etc/hosts", "h"),
            ("etc/gone", "g"),
            ("etc/passwd", "p"),
            ("keep", "k"),
            ("modme", "old"),
            ("chmodme", "c"),
            ("chownme", "o"),
            ("deldir/a", "a"),
            ("deldir/sub/b", "b"),
            ("dir2file/x", "x"),
            ("recreate/old1", "1"),
            ("recreate/sub/old2", "2"),
            ("hard1", "hh"),
            ("xattr-target", "x"),
        ] {
            write(root, rel, data.as_bytes());
        }
        fs::set_permissions(root.join("chmodme"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        std::os::unix::fs::symlink("etc/hosts", root.join("lnk")).expect("symlink");
        std::os::unix::fs::symlink("/etc", root.join("hostetc")).expect("symlink");
        fs::hard_link(root.join("hard1"), root.join("hard2")).expect("hardlink");
        xattr::set(root.join("keep"), "user.base", b"1").expect("xattr");
    });
    s.commit("base", "base-active").expect("commit base");
    assert!(
        s.committed_dir("base")
            .expect("committed_dir")
            .join("keep")
            .is_file()
    );

    // An unchanged snapshot has an empty diff: a tar of no entries.
    s.prepare("untouched", Some("base")).expect("prepare");
    let mut empty = Vec::new();
    let d = diff(s, "untouched", &mut empty).expect("diff untouched");
    assert_eq!(empty, vec![0u8; 1024], "empty diff");
    assert_eq!(d.uncompressed_size, 1024);
    assert!(tar_entries(&empty).is_empty());

    let mounts = s.prepare("work", Some("base")).expect("prepare work");
    let target = tempfile::tempdir_in(scratch).expect("mount point");
    let guard = mount_all(&mounts, target.path()).expect("mount work");
    let root = target.path();
    let p = |rel: &str| root.join(rel);
    write(root, "etc/newfile", b"n");
    fs::set_permissions(p("etc/newfile"), fs::Permissions::from_mode(0o600)).expect("chmod");
    chown(&p("etc/newfile"), 1000, 1000);
    write(root, "modme", b"new content");
    fs::set_permissions(p("chmodme"), fs::Permissions::from_mode(0o755)).expect("chmod");
    chown(&p("chownme"), 1234, 5678);
    fs::remove_file(p("etc/gone")).expect("rm");
    fs::remove_dir_all(p("deldir")).expect("rm -r");
    fs::remove_dir_all(p("dir2file")).expect("rm -r");
    write(root, "dir2file", b"now a file");
    fs::remove_dir_all(p("recreate")).expect("rm -r");
    write(root, "recreate/new", b"fresh");
    std::os::unix::fs::symlink("../../outside", p("newlink")).expect("symlink");
    std::os::unix::fs::symlink("hosts", p("etc/rel")).expect("symlink");
    write(root, "nh1", b"pair");
    fs::hard_link(p("nh1"), p("nh2")).expect("hardlink");
    fs::hard_link(p("keep"), p("keep-link")).expect("hardlink");
    xattr::set(p("xattr-target"), "user.added", b"v").expect("xattr");
    write(root, "capfile", b"cap");
    xattr::set(p("capfile"), "security.capability", &NET_BIND_CAP).expect("set capability");
    nix::unistd::mkfifo(&p("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o640))
        .expect("mkfifo");
    nix::sys::stat::mknod(
        &p("chardev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
    drop(std::os::unix::net::UnixListener::bind(p("sock")).expect("bind socket"));
    write(root, &long_name, b"long");
    std::os::unix::fs::symlink(&long_target, p("longlink")).expect("symlink");
    write(root, "bigid", b"big");
    chown(&p("bigid"), 3_000_000, 3_000_001);
    let want_tree = full_listing(root);
    assert!(!want_tree.contains_key("sock"), "sockets are not listed");

    // Diffed while mounted and after: the same bytes.
    let mut mounted = Vec::new();
    diff(s, "work", &mut mounted).expect("diff while mounted");
    guard.unmount().expect("unmount work");
    let mut tar = Vec::new();
    let d = diff(s, "work", &mut tar).expect("diff");
    assert!(mounted == tar, "diff differs between mounted and unmounted");
    let want_id: [u8; 32] = sha2::Sha256::digest(&tar).into();
    assert_eq!(d.diff_id, api::Digest::from_sha256_bytes(&want_id));
    assert_eq!(d.uncompressed_size, tar.len() as u64);

    // (a) The entries.
    let entries = tar_entries(&tar);
    let names: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let mut want: Vec<String> = [
        "bigid",
        "capfile",
        "chardev",
        "chmodme",
        "chownme",
        ".wh.deldir",
        "dir2file",
        "etc/",
        "etc/.wh.gone",
        "etc/newfile",
        "etc/rel",
        "keep",
        "keep-link",
        "longlink",
        "modme",
        "newlink",
        "nh1",
        "nh2",
        "pipe",
        "recreate/",
        "recreate/new",
        "xattr-target",
        long_name.as_str(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match s.diff_mode() {
        DiffMode::Overlay => want.push("recreate/.wh..wh..opq".into()),
        DiffMode::Apply => {
            want.extend(["recreate/.wh.old1".into(), "recreate/.wh.sub".into()]);
        }
    }
    let mut sorted: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "{:?}", s.diff_mode());
    // Parents before children, every path relative.
    for (i, e) in entries.iter().enumerate() {
        assert!(
            !e.path.starts_with('/') && !e.path.starts_with("./"),
            "{}",
            e.path
        );
        if let Some((parent, _)) = e.path.trim_end_matches('/').rsplit_once('/') {
            let dir = format!("{parent}/");
            assert!(
                names[..i].contains(&dir.as_str()),
                "{} before {dir}",
                e.path
            );
        }
    }
    let by_name = |n: &str| entries.iter().find(|e| e.path == n).expect("entry");
    for e in &entries {
        assert!(
            e.xattrs.keys().all(|k| !k.starts_with("trusted.overlay.")),
            "{}: {:?}",
            e.path,
            e.xattrs
        );
        if e.path.contains(".wh.") {
            assert_eq!((e.kind, e.size, e.mode), ('0', 0, 0), "{}", e.path);
        }
    }
    assert_eq!(by_name("nh2").kind, '1');
    assert_eq!(by_name("nh2").link.as_deref(), Some("nh1"));
    assert_eq!(by_name("keep-link").kind, '1');
    assert_eq!(by_name("keep-link").link.as_deref(), Some("keep"));
    assert_eq!((by_name("keep").kind, by_name("keep").size), ('0', 1));
    assert_eq!(
        by_name("keep").xattrs.get("user.base").map(Vec::as_slice),
        Some(&b"1"[..])
    );
    assert_eq!(
        by_name("xattr-target")
            .xattrs
            .get("user.added")
            .map(Vec::as_slice),
        Some(&b"v"[..])
    );
    assert_eq!(
        by_name("capfile")
            .xattrs
            .get("security.capability")
            .map(Vec::as_slice),
        Some(&NET_BIND_CAP[..])
    );
    assert_eq!(by_name("etc/").kind, '5');
    assert_eq!(by_name("chardev").kind, '3');
    assert_eq!(by_name("pipe").kind, '6');
    assert_eq!(
        (by_name("pipe").mode, by_name("chmodme").mode),
        (0o640, 0o755)
    );
    assert_eq!(
        (by_name("chownme").uid, by_name("chownme").gid),
        (1234, 5678)
    );
    assert_eq!(
        (by_name("bigid").uid, by_name("bigid").gid),
        (3_000_000, 3_000_001)
    );
    assert_eq!(by_name("newlink").link.as_deref(), Some("../../outside"));
    assert_eq!(
        by_name("longlink").link.as_deref(),
        Some(long_target.as_str())
    );
    assert_eq!(by_name("dir2file").kind, '0');

    // (b) Round trip: the diff unpacked onto the same parent shows the changed tree.
    match s.diff_mode() {
        DiffMode::Overlay => {
            s.prepare("rt-extract", None).expect("prepare");
            let dir = s.diff_dir("rt-extract").expect("diff_dir");
            unpack_layer(&tar[..], &dir).expect("unpack diff");
            sync_filesystem(&dir).expect("syncfs");
            s.commit_with_parent("rt", "rt-extract", Some("base"))
                .expect("commit");
            // Only its own layer.
            assert!(
                !s.committed_dir("rt")
                    .expect("committed_dir")
                    .join("hard1")
                    .exists()
            );
        }
        DiffMode::Apply => {
            s.prepare("rt-apply", Some("base")).expect("prepare");
            let dir = s.diff_dir("rt-apply").expect("diff_dir");
            apply_layer(&tar[..], &dir).expect("apply diff");
            sync_filesystem(&dir).expect("syncfs");
            s.commit("rt", "rt-apply").expect("commit");
            assert!(
                s.committed_dir("rt")
                    .expect("committed_dir")
                    .join("hard1")
                    .is_file()
            );
        }
    }
    let m = s.view("rt-view", Some("rt")).expect("view");
    let (got, inos) = with_mounted(&m, scratch, |root| {
        let ino = |p: &str| fs::symlink_metadata(root.join(p)).expect("lstat").ino();
        (
            full_listing(root),
            [
                (ino("nh1"), ino("nh2")),
                (ino("keep"), ino("keep-link")),
                (ino("hard1"), ino("hard2")),
            ],
        )
    });
    let diffs: Vec<_> = want_tree
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v:?}, got {:?}", got.get(k)))
        .chain(
            got.keys()
                .filter(|k| !want_tree.contains_key(*k))
                .map(|k| format!("{k}: unexpected {:?}", got[k])),
        )
        .collect();
    assert!(
        diffs.is_empty(),
        "{:?}: round trip differs:\n{}",
        s.diff_mode(),
        diffs.join("\n")
    );
    for (a, b) in inos {
        assert_eq!(a, b, "hardlinks kept");
    }

    // A second diff of the same changes is the same bytes; committed and unknown keys are
    // refused.
    let mut again = Vec::new();
    diff(s, "work", &mut again).expect("diff again");
    assert!(again == tar, "diff is deterministic");
    s.commit("work-c", "work").expect("commit work");
    assert_invalid(
        diff(s, "work-c", io::sink()),
        "diff of a committed snapshot",
    );
    assert_invalid(diff(s, "rt-view", io::sink()), "diff of a view");
    assert_not_found(diff(s, "nope", io::sink()), "diff of an unknown key");
}
