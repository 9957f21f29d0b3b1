//! `docker cp`: a container's files read out as a tar and a tar written into a container, as
//! dockerd's `/containers/{id}/archive` does.
//!
//! Paths are the container's, so a symlink in it points into the container, never at the host:
//! the path asked for is resolved with `openat2(RESOLVE_IN_ROOT)` against the container's root,
//! and below it nothing is ever followed (every entry is opened relative to its directory's fd
//! with `O_NOFOLLOW`; extraction goes through the layer unpacker, which does the same). A
//! container process swapping a directory for a symlink mid-copy therefore cannot point berthd
//! outside the container (the race of CVE-2018-15664).
//!
//! The root of a running container is its init's `/proc/<pid>/root`, which sees its volumes
//! too. A stopped container's rootfs snapshot is mounted for the copy in a mount namespace of
//! the copying thread's own, so the mount goes away with the thread whatever happens, crash
//! included.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

use super::Engine;
use crate::error::{Error, Result};
use crate::inroot::{open_in, open_root, os_err, split};

impl Engine {
    /// Runs `f` with the root directory of container `name_or_id`, on a thread of its own (the
    /// copy is blocking file I/O, and a stopped container's rootfs is mounted in that thread's
    /// own mount namespace). A stopped container is held locked meanwhile, so it cannot start
    /// with its rootfs mounted twice.
    pub async fn with_root<T: Send + 'static>(
        &self,
        name_or_id: &str,
        f: impl FnOnce(BorrowedFd<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let r = self.get(name_or_id)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(run) = r.run.clone().filter(|_| r.running() && r.state.pid > 0) {
            let root = open_root(std::path::Path::new(&format!("/proc/{}/root", r.state.pid)))
                .map_err(|_| {
                    Error::FailedPrecondition(format!("container {} is not running", r.id))
                })?;
            // A pid is only a number: had the container exited and the number been reused, the
            // root opened would be another process's (the host's /, say). It is the
            // container's if the container's process still has that pid now, after the open.
            if self.containers.pid(&run.container_id).await? != r.state.pid {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not running",
                    r.id
                )));
            }
            std::thread::Builder::new()
                .name("cp-live".into())
                .spawn(move || {
                    let _ = tx.send(f(root.as_fd()));
                })
                .map_err(|e| Error::internal("start a copy thread", e))?;
        } else {
            let lock = self.lock(&r.id).lock_owned().await;
            let r = self.get(&r.id)?;
            if r.running() {
                drop(lock);
                return Box::pin(self.with_root(&r.id, f)).await;
            }
            let mounts = self.snapshots.mounts(&r.snapshot_key())?;
            let at = self
                .container_dir(&r.id)
                .join(format!("cp-{}", hex::encode(rand::random::<[u8; 6]>())));
            std::thread::Builder::new()
                .name("cp-stopped".into())
                .spawn(move || {
                    let _held = lock;
                    let result = mounted_privately(&mounts, &at).and_then(|root| f(root.as_fd()));
                    let _ = std::fs::remove_dir(&at);
                    let _ = tx.send(result);
                })
                .map_err(|e| Error::internal("start a copy thread", e))?;
        }
        rx.await
            .map_err(|_| Error::Internal("the copy thread died".into()))?
    }
}

/// Mounts `mounts` at `at` in a mount namespace of the calling thread's own (unshared with
/// its fs attributes, so the rest of berthd keeps the host's) and opens it. The mount ends
/// with the thread.
pub(crate) fn mounted_privately(mounts: &[api::Mount], at: &Path) -> Result<OwnedFd> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::Internal(format!("unshare a mount namespace for the copy: {e}")))?;
    // Nothing mounted here may reach the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::Internal(format!("make the copy's mounts private: {e}")))?;
    std::fs::create_dir_all(at).map_err(|e| Error::internal("create the copy's mount point", e))?;
    crate::container::mount_all(mounts, at)?;
    open_root(at)
}

/// What dockerd reports of a path (`X-Docker-Container-Path-Stat`, base64 JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathStat {
    /// The last component of the path.
    pub name: String,
    /// Size in bytes.
    pub size: i64,
    /// Go's `os.FileMode` bits, which the docker client decodes.
    pub mode: u32,
    /// Modification time, RFC 3339.
    pub mtime: String,
    /// For a symlink, the path it resolves to in the container.
    #[serde(rename = "linkTarget")]
    pub link_target: String,
}

/// Go's `os.FileMode` of a stat: permission bits plus Go's type and special bits.
fn go_mode(st: &FileStat) -> u32 {
    const DIR: u32 = 1 << 31;
    const SYMLINK: u32 = 1 << 27;
    const DEVICE: u32 = 1 << 26;
    const PIPE: u32 = 1 << 25;
    const SOCKET: u32 = 1 << 24;
    const SETUID: u32 = 1 << 23;
    const SETGID: u32 = 1 << 22;
    const CHAR: u32 = 1 << 21;
    const STICKY: u32 = 1 << 20;
    let m = st.st_mode;
    let mut out = m & 0o777;
    out |= match SFlag::from_bits_truncate(m & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => DIR,
        SFlag::S_IFLNK => SYMLINK,
        SFlag::S_IFBLK => DEVICE,
        SFlag::S_IFCHR => DEVICE | CHAR,
        SFlag::S_IFIFO => PIPE,
        SFlag::S_IFSOCK => SOCKET,
        _ => 0,
    };
    if m & 0o4000 != 0 {
        out |= SETUID;
    }
    if m & 0o2000 != 0 {
        out |= SETGID;
    }
    if m & 0o1000 != 0 {
        out |= STICKY;
    }
    out
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// The stat docker shows for `path` in the container (its last component not followed).
pub fn stat(root: BorrowedFd<'_>, path: &str) -> Result<PathStat> {
    let fd = open_in(root, path, OFlag::O_PATH, false)?;
    let st = fstat(&fd).map_err(|e| os_err("stat", path, e))?;
    let name = Path::new(path.trim_end_matches('/'))
        .file_name()
        .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned());
    let link_target = if kind(&st) == SFlag::S_IFLNK {
        let target = readlinkat(&fd, "").map_err(|e| os_err("readlink", path, e))?;
        let target = target.to_string_lossy().into_owned();
        if target.starts_with('/') {
            target
        } else {
            let (parent, _) = split(path.trim_start_matches('/'));
            format!("/{}", Path::new(parent).join(target).display()).replace("/./", "/")
        }
    } else {
        String::new()
    };
    Ok(PathStat {
        name,
        size: st.st_size,
        mode: go_mode(&st),
        mtime: api::time::rfc3339_nano(
            st.st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec),
        ),
        link_target,
    })
}

/// Writes `path` (a file, a symlink itself, or a directory with everything under it) as a
/// tar to `out`, named by its last component as dockerd names it.
pub fn write_tar(root: BorrowedFd<'_>, path: &str, out: impl Write) -> Result<()> {
    let fd = open_in(root, path, OFlag::O_PATH, false)?;
    let st = fstat(&fd).map_err(|e| os_err("stat", path, e))?;
    let name = Path::new(path.trim_end_matches('/'))
        .file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let mut tar = tar::Builder::new(out);
    let fail = |e: std::io::Error| Error::Internal(format!("write the archive of {path}: {e}"));
    if kind(&st) == SFlag::S_IFDIR {
        let dir = reopen_dir(&fd).map_err(|e| os_err("open", path, e))?;
        append_dir(&mut tar, &dir, &st, &name, 0).map_err(fail)?;
    } else {
        let (parent, base) = split(path.trim_start_matches('/'));
        let pdir = open_in(root, parent, OFlag::O_DIRECTORY | OFlag::O_RDONLY, true)?;
        append_entry(&mut tar, pdir.as_fd(), OsStr::new(base), &st, &name, 0).map_err(fail)?;
    }
    tar.into_inner().map_err(fail)?.flush().map_err(fail)
}

/// A readable directory fd for an `O_PATH` one (readdir needs a real open).
fn reopen_dir(fd: &OwnedFd) -> std::result::Result<OwnedFd, Errno> {
    openat(
        fd,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn header_for(st: &FileStat, entry_type: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(entry_type);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(size);
    h
}

/// Directory levels a copy goes down at most: each level holds an fd and a stack frame, and
/// a container can nest directories as deep as it likes.
const MAX_DEPTH: usize = 256;

fn append_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &OwnedFd,
    st: &FileStat,
    name: &Path,
    depth: usize,
) -> std::io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "{} is more than {MAX_DEPTH} directories deep",
            name.display()
        )));
    }
    let mut h = header_for(st, tar::EntryType::Directory, 0);
    tar.append_data(&mut h, name, std::io::empty())?;
    // Names first, then each one looked at relative to this fd: the listing goes through the
    // fd itself (`/proc/self/fd`), never through a path in the container.
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    for n in names {
        let n = OsStr::from_bytes(&n);
        let child_st = match fstatat(dir, n, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            // Gone meanwhile: a live container changes under a copy.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        append_entry(tar, dir.as_fd(), n, &child_st, &name.join(n), depth + 1)?;
    }
    Ok(())
}

fn append_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: BorrowedFd<'_>,
    base: &OsStr,
    st: &FileStat,
    name: &Path,
    depth: usize,
) -> std::io::Result<()> {
    match kind(st) {
        SFlag::S_IFDIR => {
            let fd = openat(
                dir,
                base,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            append_dir(tar, &fd, st, name, depth)
        }
        SFlag::S_IFREG => {
            let fd = openat(
                dir,
                base,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let file = File::from(fd);
            // A live container may change the file while it is copied: the header's size is
            // the one at open, and exactly that many bytes follow it (cut or zero-padded), or
            // the archive would be corrupt from there on.
            let size = file.metadata()?.len();
            let mut h = header_for(st, tar::EntryType::Regular, size);
            tar.append_data(&mut h, name, Exactly::new(file, size))
        }
        SFlag::S_IFLNK => {
            let target = readlinkat(dir, base)?;
            let mut h = header_for(st, tar::EntryType::Symlink, 0);
            tar.append_link(&mut h, name, Path::new(&target))
        }
        SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO => {
            let t = match kind(st) {
                SFlag::S_IFCHR => tar::EntryType::Char,
                SFlag::S_IFBLK => tar::EntryType::Block,
                _ => tar::EntryType::Fifo,
            };
            let mut h = header_for(st, t, 0);
            let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
            h.set_device_major(major)?;
            h.set_device_minor(minor)?;
            tar.append_data(&mut h, name, std::io::empty())
        }
        // Sockets have no tar form; dockerd skips them too.
        _ => Ok(()),
    }
}

/// `n` bytes of a reader: its own while it has them, zeros after an early end.
struct Exactly<R> {
    inner: std::io::Take<R>,
    left: u64,
}

impl<R: Read> Exactly<R> {
    fn new(inner: R, n: u64) -> Self {
        Exactly {
            inner: inner.take(n),
            left: n,
        }
    }
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Extracts the tar read from `input` into directory `path` of the container, with the layer
/// unpacker's safety rules (no `..`, no absolute names, nothing through a symlink). A path that
/// is not a directory is InvalidArgument, as dockerd's "extraction point is not a directory".
pub fn extract_tar(root: BorrowedFd<'_>, path: &str, input: impl Read) -> Result<()> {
    let dir = open_in(root, path, OFlag::O_PATH, true)?;
    let st = fstat(&dir).map_err(|e| os_err("stat", path, e))?;
    if kind(&st) != SFlag::S_IFDIR {
        return Err(Error::InvalidArgument(format!(
            "extraction point is not a directory: {path}"
        )));
    }
    // The unpacker opens its root by path; the fd's magic link is that directory, resolved
    // once, with no component of the container's in between.
    let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    snapshotter::unpack::extract_plain(input, &at).map_err(|e| match e {
        snapshotter::Error::UnsafeEntry { .. } => {
            Error::InvalidArgument(format!("refused archive: {}", crate::error::chain(&e)))
        }
        e => Error::Internal(format!("extract into {path}: {}", crate::error::chain(&e))),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("etc/sub")).expect("mkdir");
        std::fs::write(t.path().join("etc/hostname"), "box\n").expect("write");
        std::fs::write(t.path().join("etc/sub/a"), "aaa").expect("write");
        symlink("/etc/hostname", t.path().join("etc/link")).expect("symlink");
        // Escapes that must stay inside the root.
        symlink("/", t.path().join("up")).expect("symlink");
        symlink("../../../../../..", t.path().join("dots")).expect("symlink");
        let fd = nix::fcntl::open(
            t.path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .expect("open root");
        (t, fd)
    }

    fn entries(tar_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").display().to_string();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read");
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_file_and_a_directory_come_out_named_by_their_last_component() {
        let (_t, fd) = root();
        let mut out = Vec::new();
        write_tar(fd.as_fd(), "/etc/hostname", &mut out).expect("file");
        assert_eq!(entries(&out), vec![("hostname".into(), b"box\n".to_vec())]);
        let mut out = Vec::new();
        write_tar(fd.as_fd(), "/etc", &mut out).expect("dir");
        let names: Vec<String> = entries(&out).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            ["etc", "etc/hostname", "etc/link", "etc/sub", "etc/sub/a"]
        );
        let s = stat(fd.as_fd(), "/etc/link").expect("stat");
        assert_eq!(s.link_target, "/etc/hostname");
        assert_ne!(s.mode & (1 << 27), 0, "a symlink");
        let d = stat(fd.as_fd(), "/etc").expect("stat");
        assert_ne!(d.mode & (1 << 31), 0, "a directory");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (t, fd) = root();
        // `/up/etc/hostname` is the container's /etc/hostname, not the host's.
        let mut out = Vec::new();
        write_tar(fd.as_fd(), "/up/etc/hostname", &mut out).expect("via /");
        assert_eq!(entries(&out)[0].1, b"box\n");
        let mut out = Vec::new();
        write_tar(fd.as_fd(), "/dots/etc/hostname", &mut out).expect("via ..");
        assert_eq!(entries(&out)[0].1, b"box\n");
        assert!(matches!(stat(fd.as_fd(), "/nope"), Err(Error::NotFound(_))));
        // Extraction through a symlink to / lands in the root too.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "new", &b"hi"[..]).expect("append");
        let archive = b.into_inner().expect("tar");
        extract_tar(fd.as_fd(), "/up/etc", &archive[..]).expect("extract");
        assert_eq!(
            std::fs::read(t.path().join("etc/new")).expect("written inside"),
            b"hi"
        );
        assert!(matches!(
            extract_tar(fd.as_fd(), "/etc/hostname", &archive[..]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_tree_too_deep_is_refused_not_followed_to_the_end() {
        let (t, fd) = root();
        let mut p = t.path().join("deep");
        for _ in 0..MAX_DEPTH + 5 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).expect("deep tree");
        let err = write_tar(fd.as_fd(), "/deep", std::io::sink()).expect_err("too deep");
        assert!(err.to_string().contains("directories deep"), "{err}");
    }

    #[test]
    fn hostile_archives_are_refused() {
        let (t, fd) = root();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        // `append_data` refuses `..`; the raw name goes in the header directly.
        h.as_gnu_mut().expect("gnu").name[..11].copy_from_slice(b"../../escap");
        h.set_cksum();
        b.append(&h, &b"x"[..]).expect("append");
        let archive = b.into_inner().expect("tar");
        let err = extract_tar(fd.as_fd(), "/etc/sub", &archive[..]).expect_err("refused");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(!t.path().join("escap").exists());
    }
}
