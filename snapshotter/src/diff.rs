//! Layer diff: the changes of an active snapshot as an OCI layer tar, the reverse of
//! [`crate::unpack`] (for `docker commit` and a build's RUN/COPY steps).
//!
//! How the changes are found depends on the store's [`DiffMode`]:
//!
//! - [`DiffMode::Overlay`]: [`Snapshotter::diff_dir`] is the overlay upper dir, which holds
//!   exactly the changes. Every entry in it goes into the layer; a 0/0 character device (an
//!   overlay whiteout) becomes `.wh.<name>`, a directory with `trusted.overlay.opaque=y` gets a
//!   `<dir>/.wh..wh..opq` marker right after it. (The overlay snapshotter mounts without
//!   `userxattr`, so `user.overlay.*` are a user's xattrs like any other.) An upper dir written
//!   with `redirect_dir` or `metacopy` (which this crate never turns on) is refused with
//!   [`Error::DiffEntry`]: its changes are not all in the upper dir.
//! - [`DiffMode::Apply`]: the diff dir is the snapshot's whole tree; it is compared with its
//!   parent's ([`Snapshotter::committed_dir`]). An entry is added or changed when its type,
//!   mode, owner, mtime (to the nanosecond), xattrs, symlink target, device number or (not for
//!   directories) size differ, or, when all of those match and the mtime has no sub-second
//!   part (a filesystem or tool that keeps whole seconds), its content does. Each entry of the
//!   parent that is gone gets one whiteout (one for a removed directory, not one per child; a
//!   directory replaced by a file needs none). The directories above a change are written too.
//!   When a changed file has other hardlinks in the tree, they all go into the layer, so the
//!   layer's hardlinks never point into a lower layer.
//!
//! The tar: entries sorted by path, component by component (parents before children), names
//! relative (`etc/passwd`, `etc/` for a directory); ustar headers with numeric owner, mode
//! (setuid/setgid/sticky kept) and mtime in whole seconds; PAX records for what a ustar header
//! cannot hold (paths and link targets over 100 bytes, big ids, sizes and times, which also get
//! a base-256 header field for readers without PAX) and for xattrs (`SCHILY.xattr.<name>`). All
//! xattrs are kept except overlayfs's own (`trusted.overlay.*`) and `security.selinux` (a host's
//! label, which docker and containerd never put in layers either). A file seen again under
//! another name (same inode) is a hardlink entry to the first name. Sockets are skipped (no tar
//! can hold one); fifos and device nodes are written as such. Whiteouts and opaque markers are
//! empty regular files, mode 0, owned by 0:0, mtime 0, so equal trees give equal tars.
//! No symlink below the snapshot's directory is ever followed: the walk opens one component at
//! a time with `O_NOFOLLOW` and reads xattrs with the `l*` calls.
//!
//! The snapshot may be mounted or not; while it is being written to, the diff is whatever the
//! walk saw (a file that shrinks while it is read is an error, not a corrupt tar).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use api::Digest;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, major, minor};
use sha2::{Digest as _, Sha256};

use crate::content::ContentStore;
use crate::unpack::{
    BUF_SIZE, DIR_FLAGS, OPAQUE_WHITEOUT, WHITEOUT_PREFIX, file_type, lossy, open_dir_nofollow,
    proc_path, split_last,
};
use crate::{DiffMode, Error, Result, Snapshotter};

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const SELINUX_XATTR: &[u8] = b"security.selinux";
/// ustar name and linkname fields.
const NAME_FIELD: usize = 100;

/// What [`diff`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diffed {
    /// sha256 of exactly the bytes written: the layer's diffID.
    pub diff_id: Digest,
    /// How many bytes were written.
    pub uncompressed_size: u64,
}

/// Writes the changes of the active snapshot `key`, relative to its parent, as an uncompressed
/// OCI layer tar into `out` (see the module docs for what goes in), and returns the sha256 and
/// size of exactly what was written. `out` may be a compressor; it is flushed, not finished.
/// [`Error::NotFound`] for an unknown key, [`Error::InvalidState`] for a view or a committed
/// snapshot. On error `out` holds a partial tar.
pub fn diff(snapshots: &dyn Snapshotter, key: &str, out: impl Write) -> Result<Diffed> {
    let dir = snapshots.diff_dir(key)?;
    let mode = snapshots.diff_mode();
    let changes = match mode {
        DiffMode::Overlay => overlay_changes(&dir)?,
        DiffMode::Apply => {
            let base = match snapshots.stat(key)?.parent {
                Some(parent) => Some(snapshots.committed_dir(&parent)?),
                None => None,
            };
            apply_changes(&dir, base.as_deref())?
        }
    };
    tracing::debug!(snapshot_key = %key, entries = changes.len(), "diff walked");
    write_layer(&dir, &changes, mode, out)
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip, at a fast level: see [`GZIP_LEVEL`].
    Gzip,
    /// zstd, at its default level 3.
    Zstd,
}

/// The gzip level [`layer_blob`] uses. Measured with flate2 1.1 on zlib-rs 0.6, one core of
/// this 2-core VM, release build, on 200 MB of /usr/bin, perl and docs (and on 100 MB of text
/// only): level 1 ran 131 MB/s (139) for 56% of the input (54%), level 3 73 MB/s (77) for 48.2%
/// (47.0%), level 6, the default, 43 MB/s (59) for 47.3% (46.2%). Level 3 is within 2% of the
/// default's size at 1.3-1.7x its speed; level 1 is faster again but 14-18% bigger, and a layer
/// is compressed once and then pushed and pulled many times.
pub const GZIP_LEVEL: u32 = 3;

/// zstd's default level.
const ZSTD_LEVEL: i32 = 3;

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A layer blob in the content store, as a manifest and an image config name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the (compressed) blob: the manifest's layer digest.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar: the config's `rootfs.diff_ids` entry.
    pub diff_id: Digest,
    /// The blob's media type ([`Compression::media_type`]).
    pub media_type: &'static str,
}

/// [`diff`]s the active snapshot `key`, compressed with `c`, into a new blob of `content`.
/// Committing a layer that is already there succeeds (same digest). On error nothing is added.
///
/// One thread walks, hashes, compresses and writes. Measured on 312 MB of /usr/bin and perl in a
/// native snapshot (page cache warm, release build, 2-core VM shared with other builds): the
/// diff alone 650 MB/s; the blob, fsync included, 181 MB/s plain, 41 MB/s gzip (39% of the
/// size), 50 MB/s zstd (34%). Compression dominates, so a compressor on a second thread is the
/// next step if commits get slow.
pub fn layer_blob(
    snapshots: &dyn Snapshotter,
    key: &str,
    content: &ContentStore,
    c: Compression,
) -> Result<LayerBlob> {
    let mut ingest = content.ingest()?;
    let diffed = match c {
        Compression::None => diff(snapshots, key, &mut ingest)?,
        Compression::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(&mut ingest, flate2::Compression::new(GZIP_LEVEL));
            let d = diff(snapshots, key, &mut enc)?;
            enc.finish().map_err(Error::WriteLayer)?;
            d
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(&mut ingest, ZSTD_LEVEL)
                .map_err(Error::WriteLayer)?;
            let d = diff(snapshots, key, &mut enc)?;
            enc.finish().map_err(Error::WriteLayer)?;
            d
        }
    };
    let (digest, size) = ingest.commit()?;
    Ok(LayerBlob {
        digest,
        size,
        diff_id: diffed.diff_id,
        media_type: c.media_type(),
    })
}

// ---------------------------------------------------------------------------------------------
// Finding the changes.

/// One change, by where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The entry as it is now (added, changed, or a directory above a change).
    Add,
    /// A directory as it is now, hiding everything lower layers had in it.
    Opaque,
    /// Gone.
    Whiteout,
}

/// Changes by path, with `/` written as NUL: NUL sorts below every name byte, so the map's
/// order is component by component, each directory right before what is in it.
type Changes = BTreeMap<Vec<u8>, Change>;

fn child_key(key: &[u8], name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1 + name.len());
    k.extend_from_slice(key);
    if !key.is_empty() {
        k.push(0);
    }
    k.extend_from_slice(name);
    k
}

fn key_to_rel(key: &[u8]) -> Vec<u8> {
    key.iter()
        .map(|b| if *b == 0 { b'/' } else { *b })
        .collect()
}

/// Opens the snapshot's directory. It is the store's path, not the snapshot's content, so it
/// may be followed; nothing below it is.
fn open_root(root: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(root, DIR_FLAGS & !OFlag::O_NOFOLLOW, Mode::empty())
        .map_err(|e| Error::io("open snapshot dir", root, e.into()))
}

/// The names in the open directory `dir`, sorted.
fn names_in(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut names = std::fs::read_dir(proc_path(dir, b""))
        .and_then(|it| {
            it.map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| Error::io("read dir", path, e))?;
    names.sort();
    Ok(names)
}

/// `lstat` of `name` in `dir`; `None` if it is gone.
fn lstat_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: impl FnOnce() -> PathBuf,
) -> Result<Option<FileStat>> {
    match fstatat(dir, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(Error::io("stat", path(), e.into())),
    }
}

fn open_subdir(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: impl FnOnce() -> PathBuf,
) -> Result<OwnedFd> {
    openat(dir, OsStr::from_bytes(name), DIR_FLAGS, Mode::empty())
        .map_err(|e| Error::io("open dir", path(), e.into()))
}

/// The xattrs of `name` in `dir` that go into a layer, sorted by name; without following it.
fn xattrs_at(dir: BorrowedFd<'_>, name: &[u8], path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = proc_path(dir, name);
    let names = match xattr::list(&p) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list xattrs", path, e)),
    };
    let mut out = Vec::new();
    for attr in names {
        let key = attr.as_bytes();
        if key.starts_with(OVERLAY_XATTR_PREFIX) || key == SELINUX_XATTR {
            continue;
        }
        match xattr::get(&p, &attr) {
            Ok(Some(v)) => out.push((key.to_vec(), v)),
            // Removed since it was listed.
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(Error::io("read xattr", path, e)),
        }
    }
    out.sort();
    Ok(out)
}

/// [`DiffMode::Overlay`]: everything in the upper dir `root`.
fn overlay_changes(root: &Path) -> Result<Changes> {
    let fd = open_root(root)?;
    let mut changes = Changes::new();
    walk_upper(root, fd.as_fd(), &[], &mut changes)?;
    Ok(changes)
}

fn walk_upper(root: &Path, dir: BorrowedFd<'_>, key: &[u8], changes: &mut Changes) -> Result<()> {
    let path_of = |k: &[u8]| root.join(OsStr::from_bytes(&key_to_rel(k)));
    for name in names_in(dir, &path_of(key))? {
        let child = child_key(key, &name);
        let Some(st) = lstat_at(dir, &name, || path_of(&child))? else {
            continue;
        };
        match file_type(&st) {
            SFlag::S_IFCHR if st.st_rdev == 0 => {
                changes.insert(child, Change::Whiteout);
            }
            SFlag::S_IFSOCK => {}
            SFlag::S_IFDIR => {
                let opaque = match xattr::get(proc_path(dir, &name), OPAQUE_XATTR) {
                    Ok(v) => v.as_deref() == Some(b"y"),
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
                    Err(e) => return Err(Error::io("read opaque xattr", path_of(&child), e)),
                };
                let sub = open_subdir(dir, &name, || path_of(&child))?;
                walk_upper(root, sub.as_fd(), &child, changes)?;
                changes.insert(child, if opaque { Change::Opaque } else { Change::Add });
            }
            _ => {
                changes.insert(child, Change::Add);
            }
        }
    }
    Ok(())
}

/// [`DiffMode::Apply`]: the tree `root` compared with its parent's tree `base` (none: empty).
fn apply_changes(root: &Path, base: Option<&Path>) -> Result<Changes> {
    let new = open_root(root)?;
    let old = base.map(open_root).transpose()?;
    let mut cmp = Comparer {
        root,
        base: base.unwrap_or(root),
        changes: Changes::new(),
        inodes: HashMap::new(),
        buf: (vec![0; BUF_SIZE], vec![0; BUF_SIZE]),
    };
    cmp.dir(&[], new.as_fd(), old.as_ref().map(|f| f.as_fd()))?;
    let Comparer {
        mut changes,
        inodes,
        ..
    } = cmp;
    // Hardlinks of a changed file go in with it.
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        if !names.iter().any(|n| changes.contains_key(n)) {
            continue;
        }
        for name in names {
            let mut cur: &[u8] = &name;
            loop {
                changes.entry(cur.to_vec()).or_insert(Change::Add);
                match cur.iter().rposition(|b| *b == 0) {
                    Some(i) => cur = &cur[..i],
                    None => break,
                }
            }
        }
    }
    Ok(changes)
}

struct Comparer<'a> {
    root: &'a Path,
    base: &'a Path,
    changes: Changes,
    /// (dev, ino) -> names, of the new tree's non-directories with more than one link.
    inodes: HashMap<(u64, u64), Vec<Vec<u8>>>,
    buf: (Vec<u8>, Vec<u8>),
}

impl Comparer<'_> {
    fn new_path(&self, key: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(&key_to_rel(key)))
    }

    fn old_path(&self, key: &[u8]) -> PathBuf {
        self.base.join(OsStr::from_bytes(&key_to_rel(key)))
    }

    /// Compares the directory `key`, `new` in the tree and `old` (if it was a directory) in the
    /// parent's; records changes below it. Whether anything below it changed.
    fn dir(
        &mut self,
        key: &[u8],
        new: BorrowedFd<'_>,
        old: Option<BorrowedFd<'_>>,
    ) -> Result<bool> {
        let mut names = names_in(new, &self.new_path(key))?;
        if let Some(old) = old {
            names.extend(names_in(old, &self.old_path(key))?);
            names.sort();
            names.dedup();
        }
        let mut changed = false;
        for name in names {
            let child = child_key(key, &name);
            let n = lstat_at(new, &name, || self.new_path(&child))?
                .filter(|st| file_type(st) != SFlag::S_IFSOCK);
            let o = match old {
                Some(old) => lstat_at(old, &name, || self.old_path(&child))?
                    .filter(|st| file_type(st) != SFlag::S_IFSOCK)
                    .map(|st| (old, st)),
                None => None,
            };
            let Some(n) = n else {
                if o.is_some() {
                    self.changes.insert(child, Change::Whiteout);
                    changed = true;
                }
                continue;
            };
            let differs = match o {
                None => true,
                Some((old, o)) => self.differs(&child, new, &n, old, &o, &name)?,
            };
            if file_type(&n) == SFlag::S_IFDIR {
                let sub_new = open_subdir(new, &name, || self.new_path(&child))?;
                let sub_old = match o {
                    Some((old, o)) if file_type(&o) == SFlag::S_IFDIR => {
                        Some(open_subdir(old, &name, || self.old_path(&child))?)
                    }
                    _ => None,
                };
                let below =
                    self.dir(&child, sub_new.as_fd(), sub_old.as_ref().map(|f| f.as_fd()))?;
                if differs || below {
                    self.changes.insert(child, Change::Add);
                    changed = true;
                }
            } else {
                if n.st_nlink > 1 {
                    self.inodes
                        .entry((n.st_dev, n.st_ino))
                        .or_default()
                        .push(child.clone());
                }
                if differs {
                    self.changes.insert(child, Change::Add);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// Whether `name` differs between the new directory and the old one (both exist).
    fn differs(
        &mut self,
        key: &[u8],
        new: BorrowedFd<'_>,
        n: &FileStat,
        old: BorrowedFd<'_>,
        o: &FileStat,
        name: &[u8],
    ) -> Result<bool> {
        let kind = file_type(n);
        if n.st_mode != o.st_mode
            || n.st_uid != o.st_uid
            || n.st_gid != o.st_gid
            || n.st_mtime != o.st_mtime
            || n.st_mtime_nsec != o.st_mtime_nsec
            || (kind != SFlag::S_IFDIR && n.st_size != o.st_size)
            || (matches!(kind, SFlag::S_IFCHR | SFlag::S_IFBLK) && n.st_rdev != o.st_rdev)
        {
            return Ok(true);
        }
        if kind == SFlag::S_IFLNK {
            let a = readlinkat(new, OsStr::from_bytes(name))
                .map_err(|e| Error::io("read symlink", self.new_path(key), e.into()))?;
            let b = readlinkat(old, OsStr::from_bytes(name))
                .map_err(|e| Error::io("read symlink", self.old_path(key), e.into()))?;
            if a != b {
                return Ok(true);
            }
        }
        if xattrs_at(new, name, &self.new_path(key))? != xattrs_at(old, name, &self.old_path(key))?
        {
            return Ok(true);
        }
        if kind == SFlag::S_IFREG && n.st_mtime_nsec == 0 {
            return self.contents_differ(key, new, old, name);
        }
        Ok(false)
    }

    fn contents_differ(
        &mut self,
        key: &[u8],
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<bool> {
        let mut a = open_file(new, name).map_err(|e| Error::io("open", self.new_path(key), e))?;
        let mut b = open_file(old, name).map_err(|e| Error::io("open", self.old_path(key), e))?;
        let (ba, bb) = (&mut self.buf.0, &mut self.buf.1);
        loop {
            let na = read_full(&mut a, ba).map_err(|e| Error::io("read", self.root, e))?;
            let nb = read_full(&mut b, bb).map_err(|e| Error::io("read", self.base, e))?;
            if na != nb || ba[..na] != bb[..nb] {
                return Ok(true);
            }
            if na == 0 {
                return Ok(false);
            }
        }
    }
}

fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = openat(
        dir,
        OsStr::from_bytes(name),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Writing the tar.

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One tar entry's header facts.
struct Header<'a> {
    path: &'a [u8],
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    link: Option<&'a [u8]>,
    dev: (u64, u64),
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> Header<'a> {
    /// A whiteout or opaque marker: an empty file, mode 0, root's, at time 0.
    fn marker(path: &'a [u8]) -> Self {
        Header {
            path,
            kind: b'0',
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            dev: (0, 0),
            xattrs: &[],
        }
    }
}

/// Writes `v` as zero-padded octal filling `field` but its last byte (a NUL). False if it does
/// not fit.
fn octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

/// Writes `v` in GNU base-256 (first byte 0x80, big-endian), for numbers octal cannot hold.
fn base256(field: &mut [u8], v: u64) {
    field.fill(0);
    field[0] = 0x80;
    let n = field.len();
    for (i, b) in v.to_be_bytes().iter().rev().enumerate() {
        if i + 1 < n {
            field[n - 1 - i] = *b;
        }
    }
}

/// Appends one PAX record `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

const ZEROS: [u8; 512] = [0; 512];

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// Fills a ustar header block; returns the PAX records it needs.
fn ustar_block(h: &Header<'_>, block: &mut [u8; 512]) -> Vec<u8> {
    let mut pax = Vec::new();
    if h.path.len() > NAME_FIELD {
        pax_record(&mut pax, b"path", h.path);
    }
    let n = h.path.len().min(NAME_FIELD);
    block[..n].copy_from_slice(&h.path[..n]);
    octal(&mut block[100..108], u64::from(h.mode & 0o7777));
    for (field, v, key) in [(108..116, h.uid, "uid"), (116..124, h.gid, "gid")] {
        if !octal(&mut block[field.clone()], v) {
            base256(&mut block[field], v);
            pax_record(&mut pax, key.as_bytes(), v.to_string().as_bytes());
        }
    }
    if !octal(&mut block[124..136], h.size) {
        base256(&mut block[124..136], h.size);
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
    }
    match u64::try_from(h.mtime) {
        Ok(t) if octal(&mut block[136..148], t) => {}
        Ok(t) => {
            base256(&mut block[136..148], t);
            pax_record(&mut pax, b"mtime", t.to_string().as_bytes());
        }
        Err(_) => {
            octal(&mut block[136..148], 0);
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
        }
    }
    block[156] = h.kind;
    if let Some(link) = h.link {
        if link.len() > NAME_FIELD {
            pax_record(&mut pax, b"linkpath", link);
        }
        let n = link.len().min(NAME_FIELD);
        block[157..157 + n].copy_from_slice(&link[..n]);
    }
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    if matches!(h.kind, b'3' | b'4') {
        if !octal(&mut block[329..337], h.dev.0) {
            base256(&mut block[329..337], h.dev.0);
        }
        if !octal(&mut block[337..345], h.dev.1) {
            base256(&mut block[337..345], h.dev.1);
        }
    } else {
        octal(&mut block[329..337], 0);
        octal(&mut block[337..345], 0);
    }
    for (key, value) in h.xattrs {
        let mut k = b"SCHILY.xattr.".to_vec();
        k.extend_from_slice(key);
        pax_record(&mut pax, &k, value);
    }
    pax
}

fn checksum(block: &mut [u8; 512]) {
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|b| u64::from(*b)).sum();
    let s = format!("{sum:06o}");
    block[148..154].copy_from_slice(s.as_bytes());
    block[154] = 0;
    block[155] = b' ';
}

/// Writes `h`'s header blocks (a PAX header first if needed). Data follows from the caller.
fn write_header(w: &mut impl Write, h: &Header<'_>) -> io::Result<()> {
    let mut block = [0u8; 512];
    let pax = ustar_block(h, &mut block);
    checksum(&mut block);
    if !pax.is_empty() {
        let mut name = b"PaxHeaders/".to_vec();
        let base = split_last(h.path.strip_suffix(b"/").unwrap_or(h.path)).1;
        name.extend_from_slice(&base[..base.len().min(NAME_FIELD - name.len())]);
        let mut x = [0u8; 512];
        ustar_block(
            &Header {
                path: &name,
                kind: b'x',
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: pax.len() as u64,
                mtime: 0,
                link: None,
                dev: (0, 0),
                xattrs: &[],
            },
            &mut x,
        );
        checksum(&mut x);
        w.write_all(&x)?;
        w.write_all(&pax)?;
        w.write_all(&ZEROS[..padding(pax.len() as u64)])?;
    }
    w.write_all(&block)
}

/// The open parent directories of the entries being written, the last one cached (entries come
/// grouped by directory).
struct Parents {
    root: OwnedFd,
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl Parents {
    fn get(&mut self, rel: &[u8], path: &Path) -> Result<BorrowedFd<'_>> {
        if rel.is_empty() {
            return Ok(self.root.as_fd());
        }
        if self.cached.as_ref().is_none_or(|(p, _)| p != rel) {
            let fd = open_dir_nofollow(self.root.as_fd(), rel)
                .map_err(|e| Error::io("open dir", path, e.into()))?;
            self.cached = Some((rel.to_vec(), fd));
        }
        match &self.cached {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => unreachable!("cache filled above"),
        }
    }
}

fn vanished(rel: &[u8]) -> Error {
    Error::DiffEntry {
        entry: lossy(rel),
        reason: "changed while the diff was written".into(),
    }
}

fn write_layer(root: &Path, changes: &Changes, mode: DiffMode, out: impl Write) -> Result<Diffed> {
    let mut w = BufWriter::with_capacity(
        BUF_SIZE,
        HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            count: 0,
        },
    );
    let mut parents = Parents {
        root: open_root(root)?,
        cached: None,
    };
    // (dev, ino) -> the name it was first written under.
    let mut written: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; BUF_SIZE];
    for (key, change) in changes {
        let rel = key_to_rel(key);
        let path = root.join(OsStr::from_bytes(&rel));
        let (parent, name) = split_last(&rel);
        if *change == Change::Whiteout {
            let mut wh = parent.to_vec();
            if !wh.is_empty() {
                wh.push(b'/');
            }
            wh.extend_from_slice(WHITEOUT_PREFIX);
            wh.extend_from_slice(name);
            write_header(&mut w, &Header::marker(&wh)).map_err(Error::WriteLayer)?;
            continue;
        }
        let dir = parents.get(parent, &path)?;
        let Some(st) = lstat_at(dir, name, || path.clone())? else {
            return Err(vanished(&rel));
        };
        let kind = file_type(&st);
        if kind == SFlag::S_IFSOCK {
            continue;
        }
        let xattrs = xattrs_at(dir, name, &path)?;
        if let Some((k, _)) = xattrs.iter().find(|(k, _)| k.contains(&b'=')) {
            return Err(Error::DiffEntry {
                entry: lossy(&rel),
                reason: format!(
                    "xattr name {:?} has a '=', which no PAX record holds",
                    lossy(k)
                ),
            });
        }
        if mode == DiffMode::Overlay {
            check_overlay_features(dir, name, &rel, &path)?;
        }
        let mut h = Header {
            path: &rel,
            kind: b'0',
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            size: 0,
            mtime: st.st_mtime,
            link: None,
            dev: (0, 0),
            xattrs: &xattrs,
        };
        let target;
        let dir_path;
        let first = if kind != SFlag::S_IFDIR && st.st_nlink > 1 {
            written.get(&(st.st_dev, st.st_ino)).cloned()
        } else {
            None
        };
        if let Some(first) = &first {
            target = first.clone();
            h.kind = b'1';
            h.link = Some(&target);
            write_header(&mut w, &h).map_err(Error::WriteLayer)?;
            continue;
        }
        match kind {
            SFlag::S_IFDIR => {
                dir_path = [&rel[..], b"/"].concat();
                h.path = &dir_path;
                h.kind = b'5';
                write_header(&mut w, &h).map_err(Error::WriteLayer)?;
                if *change == Change::Opaque {
                    let marker = [&dir_path[..], OPAQUE_WHITEOUT].concat();
                    write_header(&mut w, &Header::marker(&marker)).map_err(Error::WriteLayer)?;
                }
            }
            SFlag::S_IFREG => {
                let mut file = open_file(dir, name).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT | libc::ELOOP) => vanished(&rel),
                    _ => Error::io("open", &path, e),
                })?;
                let fst = fstat(&file).map_err(|e| Error::io("stat", &path, e.into()))?;
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(vanished(&rel));
                }
                h.size = u64::try_from(fst.st_size).unwrap_or_default();
                write_header(&mut w, &h).map_err(Error::WriteLayer)?;
                copy_file(&mut file, &mut w, h.size, &mut buf, &rel, &path)?;
                w.write_all(&ZEROS[..padding(h.size)])
                    .map_err(Error::WriteLayer)?;
            }
            SFlag::S_IFLNK => {
                target = readlinkat(dir, OsStr::from_bytes(name))
                    .map_err(|e| Error::io("read symlink", &path, e.into()))?
                    .into_vec();
                h.kind = b'2';
                h.link = Some(&target);
                write_header(&mut w, &h).map_err(Error::WriteLayer)?;
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK => {
                h.kind = if kind == SFlag::S_IFCHR { b'3' } else { b'4' };
                h.dev = (major(st.st_rdev), minor(st.st_rdev));
                write_header(&mut w, &h).map_err(Error::WriteLayer)?;
            }
            SFlag::S_IFIFO => {
                h.kind = b'6';
                write_header(&mut w, &h).map_err(Error::WriteLayer)?;
            }
            _ => {
                return Err(Error::DiffEntry {
                    entry: lossy(&rel),
                    reason: format!("unknown file type {:o}", st.st_mode),
                });
            }
        }
        if kind != SFlag::S_IFDIR && st.st_nlink > 1 {
            written.insert((st.st_dev, st.st_ino), rel.clone());
        }
    }
    w.write_all(&ZEROS).map_err(Error::WriteLayer)?;
    w.write_all(&ZEROS).map_err(Error::WriteLayer)?;
    let mut hashing = w
        .into_inner()
        .map_err(|e| Error::WriteLayer(e.into_error()))?;
    hashing.flush().map_err(Error::WriteLayer)?;
    Ok(Diffed {
        diff_id: Digest::from_sha256_bytes(&hashing.hasher.finalize().into()),
        uncompressed_size: hashing.count,
    })
}

/// Refuses what overlayfs wrote with `redirect_dir` or `metacopy`: part of such a change lives
/// in a lower layer, and the upper dir alone would give a wrong layer.
fn check_overlay_features(dir: BorrowedFd<'_>, name: &[u8], rel: &[u8], path: &Path) -> Result<()> {
    let names = match xattr::list(proc_path(dir, name)) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(Error::io("list xattrs", path, e)),
    };
    for attr in names {
        let feature = match attr.as_bytes() {
            b"trusted.overlay.redirect" => "redirect_dir",
            b"trusted.overlay.metacopy" => "metacopy",
            _ => continue,
        };
        return Err(Error::DiffEntry {
            entry: lossy(rel),
            reason: format!(
                "written by overlayfs with {feature}=on: the upper dir does not hold the whole \
                 change (mount with {feature}=off)"
            ),
        });
    }
    Ok(())
}

/// Copies exactly `size` bytes of `file` (its size when the header was written).
fn copy_file(
    file: &mut File,
    w: &mut impl Write,
    size: u64,
    buf: &mut [u8],
    rel: &[u8],
    path: &Path,
) -> Result<()> {
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::DiffEntry {
                    entry: lossy(rel),
                    reason: "file shrank while it was read".into(),
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read file", path, e)),
        };
        w.write_all(&buf[..n]).map_err(Error::WriteLayer)?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::sync::Arc;

    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;

    use super::*;
    use crate::native::NativeSnapshotter;
    use crate::testsuite::{full_listing, require_root, tar_entries};
    use crate::unpack::{decompressed, unpack_layer};

    /// The layer of `root`'s changes over `base` (none: everything), as [`diff`] writes it.
    fn diff_trees(root: &Path, base: Option<&Path>) -> Vec<u8> {
        let changes = apply_changes(root, base).unwrap();
        let mut out = Vec::new();
        write_layer(root, &changes, DiffMode::Apply, &mut out).unwrap();
        out
    }

    fn diff_upper(upper: &Path) -> Result<Vec<u8>> {
        let changes = overlay_changes(upper)?;
        let mut out = Vec::new();
        write_layer(upper, &changes, DiffMode::Overlay, &mut out)?;
        Ok(out)
    }

    fn paths(tar: &[u8]) -> Vec<String> {
        tar_entries(tar).into_iter().map(|e| e.path).collect()
    }

    fn set_mtime(p: &Path, secs: i64, nsecs: i64) {
        let t = TimeSpec::new(secs, nsecs);
        utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    /// What needs PAX records (long paths and link targets, big ids, times before 1970) and
    /// deep trees come back the same through our own unpack, with their times.
    #[test]
    fn pax_records_and_times_round_trip() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let deep = src.join(format!("{}/{}", "d".repeat(90), "e".repeat(90)));
        fs::create_dir_all(&deep).unwrap();
        let long_file = deep.join("f".repeat(200));
        fs::write(&long_file, b"long").unwrap();
        fs::hard_link(&long_file, src.join("hl")).unwrap();
        fs::write(src.join("old"), b"1969").unwrap();
        set_mtime(&src.join("old"), -86_400, 0);
        fs::write(src.join("future"), b"2300").unwrap();
        set_mtime(&src.join("future"), 10_500_000_000, 0);
        std::os::unix::fs::lchown(src.join("future"), Some(4_000_000_000), Some(7)).unwrap();
        symlink("x".repeat(300), src.join("ll")).unwrap();
        let tar = diff_trees(&src, None);

        let entries = tar_entries(&tar);
        let deep_rel = format!("{}/{}/", "d".repeat(90), "e".repeat(90));
        let long_rel = format!("{deep_rel}{}", "f".repeat(200));
        let names: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            names,
            [
                &format!("{}/", "d".repeat(90)),
                deep_rel.as_str(),
                long_rel.as_str(),
                "future",
                "hl",
                "ll",
                "old",
            ]
        );
        let hl = &entries[4];
        assert_eq!(
            (hl.kind, hl.link.as_deref()),
            ('1', Some(long_rel.as_str()))
        );
        assert_eq!(entries[3].uid, 4_000_000_000);

        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let out = unpack_layer(&tar[..], &dest).unwrap();
        assert_eq!(out.uncompressed_size, tar.len() as u64);
        assert_eq!(full_listing(&dest), full_listing(&src));
        for name in ["old", "future"] {
            let (a, b) = (
                fs::metadata(src.join(name)).unwrap(),
                fs::metadata(dest.join(name)).unwrap(),
            );
            assert_eq!(a.mtime(), b.mtime(), "{name}");
        }
        assert_eq!(
            fs::metadata(dest.join("hl")).unwrap().ino(),
            fs::metadata(dest.join(&long_rel)).unwrap().ino()
        );
    }

    /// A symlink where the parent had a directory, or pointing out of the tree, is written as
    /// the link it is: the walk never goes through it.
    #[test]
    fn symlinks_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("secret"), b"s").unwrap();
        let base = tmp.path().join("base");
        fs::create_dir_all(base.join("d")).unwrap();
        fs::write(base.join("d/f"), b"f").unwrap();
        symlink(&outside, base.join("out")).unwrap();
        let new = tmp.path().join("new");
        fs::create_dir(&new).unwrap();
        symlink(&outside, new.join("d")).unwrap();
        symlink(&outside, new.join("out")).unwrap();
        let out_mtime = fs::symlink_metadata(base.join("out")).unwrap().mtime();
        set_mtime(&new.join("out"), out_mtime, 0);
        set_mtime(&base.join("out"), out_mtime, 0);
        let tar = diff_trees(&new, Some(&base));
        let entries = tar_entries(&tar);
        assert_eq!(paths(&tar), ["d"]);
        assert_eq!(entries[0].kind, '2');

        // The same in an upper dir; the snapshot dir itself may be reached through a link.
        let upper = tmp.path().join("upper");
        fs::create_dir(&upper).unwrap();
        symlink(&outside, upper.join("d")).unwrap();
        symlink(&upper, tmp.path().join("upper-link")).unwrap();
        let tar = diff_upper(&tmp.path().join("upper-link")).unwrap();
        assert_eq!(paths(&tar), ["d"]);
    }

    /// Files that keep their size and a whole-second mtime are compared by content.
    #[test]
    fn whole_second_mtimes_compare_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, new) = (tmp.path().join("base"), tmp.path().join("new"));
        for (root, same, other) in [(&base, "same", "aaaa"), (&new, "same", "bbbb")] {
            fs::create_dir(root).unwrap();
            fs::write(root.join("same"), same).unwrap();
            fs::write(root.join("other"), other).unwrap();
            fs::write(root.join("ns"), other).unwrap();
            set_mtime(&root.join("same"), 1_700_000_000, 0);
            set_mtime(&root.join("other"), 1_700_000_000, 0);
            // With nanoseconds, an equal mtime is trusted.
            set_mtime(&root.join("ns"), 1_700_000_000, 5);
            set_mtime(root, 1_700_000_000, 0);
        }
        assert_eq!(paths(&diff_trees(&new, Some(&base))), ["other"]);
    }

    /// Parts of a change that overlayfs keeps in a lower layer (redirect_dir, metacopy) are
    /// refused, not silently dropped.
    #[test]
    fn overlay_redirect_and_metacopy_refused() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path();
        fs::create_dir(upper.join("moved")).unwrap();
        xattr::set(upper.join("moved"), "trusted.overlay.redirect", b"/orig").unwrap();
        match diff_upper(upper) {
            Err(Error::DiffEntry { entry, reason }) => {
                assert_eq!(entry, "moved");
                assert!(reason.contains("redirect_dir"), "{reason}");
            }
            other => panic!("expected DiffEntry, got {other:?}"),
        }
        xattr::remove(upper.join("moved"), "trusted.overlay.redirect").unwrap();
        fs::write(upper.join("moved/f"), b"").unwrap();
        xattr::set(upper.join("moved/f"), "trusted.overlay.metacopy", b"").unwrap();
        assert!(matches!(diff_upper(upper), Err(Error::DiffEntry { .. })));
        // Other overlay xattrs are fine, and never copied.
        xattr::remove(upper.join("moved/f"), "trusted.overlay.metacopy").unwrap();
        xattr::set(upper.join("moved/f"), "trusted.overlay.origin", b"x").unwrap();
        let tar = diff_upper(upper).unwrap();
        assert_eq!(paths(&tar), ["moved/", "moved/f"]);
        assert!(tar_entries(&tar).iter().all(|e| e.xattrs.is_empty()));
    }

    #[test]
    fn xattr_names_no_pax_record_holds_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"").unwrap();
        xattr::set(tmp.path().join("f"), "user.a=b", b"v").unwrap();
        let changes = apply_changes(tmp.path(), None).unwrap();
        match write_layer(tmp.path(), &changes, DiffMode::Apply, io::sink()) {
            Err(Error::DiffEntry { entry, reason }) => {
                assert_eq!(entry, "f");
                assert!(reason.contains("'='"), "{reason}");
            }
            other => panic!("expected DiffEntry, got {other:?}"),
        }
    }

    #[test]
    fn layer_blob_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let db = redb::Database::create(tmp.path().join("meta.db")).unwrap();
        let s = NativeSnapshotter::new(tmp.path(), Arc::new(db)).unwrap();
        let content = ContentStore::open(tmp.path()).unwrap();
        s.prepare("k", None).unwrap();
        let dir = s.diff_dir("k").unwrap();
        fs::create_dir(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/data"), "layer data ".repeat(10_000)).unwrap();
        let mut plain = Vec::new();
        let want = diff(&s, "k", &mut plain).unwrap();
        let mut seen = Vec::new();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let blob = layer_blob(&s, "k", &content, c).unwrap();
            assert_eq!(blob.media_type, c.media_type());
            assert_eq!(blob.diff_id, want.diff_id, "{c:?}");
            let bytes = fs::read(content.path(&blob.digest)).unwrap();
            let sha: [u8; 32] = Sha256::digest(&bytes).into();
            assert_eq!(blob.digest, Digest::from_sha256_bytes(&sha), "{c:?}");
            assert_eq!(blob.size, bytes.len() as u64);
            let mut tar = Vec::new();
            decompressed(&bytes[..])
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
            assert!(tar == plain, "{c:?} decompresses to the diff");
            if c != Compression::None {
                assert!(blob.size < plain.len() as u64 / 10, "{c:?}: {}", blob.size);
            }
            // Again: the same blob, committed idempotently.
            assert_eq!(layer_blob(&s, "k", &content, c).unwrap(), blob);
            seen.push(blob.digest);
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(content.list().unwrap().len(), 3);
        assert_eq!(
            fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            Compression::Gzip.media_type(),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            Compression::Zstd.media_type(),
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        // A failed diff adds nothing.
        s.commit("c", "k").unwrap();
        assert!(matches!(
            layer_blob(&s, "c", &content, Compression::Gzip),
            Err(Error::InvalidState { .. })
        ));
        assert_eq!(content.list().unwrap().len(), 3);
        assert_eq!(
            fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
