//! Layer unpack: one OCI/Docker layer tar (uncompressed, gzip or zstd, detected from its first
//! bytes) written to a directory, in one of two ways (see [`crate::DiffMode`]):
//!
//! - [`unpack_layer`] writes it to an empty directory in overlayfs form: `.wh.<name>` whiteouts
//!   become `<name>` character devices 0/0; `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its
//!   directory.
//! - [`apply_layer`] applies it onto an existing tree (its parent layers' contents), as docker
//!   and containerd "apply" a layer: `.wh.<name>` removes `<name>` (a whole directory tree, a
//!   file or a symlink, never followed) if it exists and creates nothing; `.wh..wh..opq` in a
//!   directory removes everything that was in it before this layer, keeping what this layer
//!   itself writes there (before or after the marker).
//!
//! Both share one engine, so everything below holds for both:
//!
//! - Other `.wh..wh.*` names (aufs metadata) are skipped.
//! - Regular files, directories, symlinks, hardlinks, device nodes and fifos are created with
//!   the tar's mode (incl. setuid/setgid/sticky), numeric ownership, mtime and xattrs (PAX
//!   `SCHILY.xattr.*`). Directory times are set last, once their children exist. A hardlink's
//!   target must exist in the directory written to: within the layer for [`unpack_layer`],
//!   anywhere in the tree (lower layers included) for [`apply_layer`].
//! - An entry whose path already exists replaces it (as containerd does), except that a
//!   directory entry over an existing directory keeps it and only updates its metadata. A
//!   directory replaced by a non-directory is removed with everything in it first.
//! - Entries that would write outside the directory are refused with
//!   [`crate::Error::UnsafeEntry`]: `..` components, absolute paths, a path through a symlink
//!   (one the layer made or, for [`apply_layer`], one already in the tree), a hardlink whose
//!   target is outside or missing, a whiteout through a symlink. Paths are resolved one
//!   component at a time with `O_NOFOLLOW`, so no symlink is ever followed, whatever the layer
//!   or the tree put where.
//! - Also refused: paths over [`MAX_PATH_LEN`] bytes, GNU long-name and PAX records over
//!   [`MAX_EXTENSION_RECORD`] bytes (both would be read into memory), GNU sparse files, and
//!   entry types other than the standard ones (as containerd does).
//!
//! Xattrs: a failure to set one is an error, except `EOPNOTSUPP` outside the `trusted.`
//! namespace and `EPERM` for `user.*` on symlinks and device nodes (the kernel never allows
//! those); both are skipped with a warning, as the image still works without them.
//! `trusted.overlay.*` xattrs found in a tar are skipped: they would change how overlayfs reads
//! this layer (redirects, metacopy) and no image format carries them.
//!
//! Nothing is fsynced per entry: call [`sync_filesystem`] once before committing the snapshot.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use api::Digest;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use sha2::{Digest as _, Sha256};
use tar::EntryType;
use xattr::FileExt;

use crate::{Error, Result};

/// Longest path (or link target) accepted in a layer, in bytes: Linux's `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;
/// Largest GNU long-name/long-link or PAX extended header record accepted, in bytes.
pub const MAX_EXTENSION_RECORD: u64 = 1 << 20;
/// Read and copy buffer size.
pub(crate) const BUF_SIZE: usize = 256 * 1024;

pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
pub(crate) const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// What an unpack found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// sha256 of the uncompressed tar stream: the layer's diffID.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar stream.
    pub uncompressed_size: u64,
}

/// Writes the layer read from `reader` (compressed or not) into `dest` in overlay form
/// ([`crate::DiffMode::Overlay`]); `dest` must exist and be empty. Reads `reader` to its end,
/// so a hashing reader around it sees the whole blob. On error `dest` may hold partial
/// contents: the caller removes it.
///
/// The diffID covers the whole decompressed stream, including whatever follows the tar's
/// end-of-archive blocks, so it equals `sha256sum` of the uncompressed blob.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<Unpacked> {
    run_layer(reader, dest, Form::Overlay)
}

/// Applies the layer read from `reader` (compressed or not) onto the existing tree `root`, the
/// full contents of its parent layers ([`crate::DiffMode::Apply`]): whiteouts remove what they
/// name, opaque markers empty their directory of what lower layers put there, other entries
/// create or replace. Same detection, limits, safety rules, diffID and full read of `reader` as
/// [`unpack_layer`]. On error `root` may be partly changed: the caller removes the snapshot.
pub fn apply_layer<R: Read>(reader: R, root: &Path) -> Result<Unpacked> {
    run_layer(reader, root, Form::Apply)
}

/// The engine behind [`unpack_layer`] and [`apply_layer`].
fn run_layer<R: Read>(reader: R, dest: &Path, form: Form) -> Result<Unpacked> {
    let decoder = Decoder::new(reader).map_err(Error::ReadLayer)?;
    let mut hashing = HashingReader {
        inner: decoder,
        hasher: Sha256::new(),
        count: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut unpacker = Unpacker::new(dest, form)?;
        unpacker.run(&mut archive)?;
        unpacker.finish();
    }
    // Trailing zero blocks (and anything else) after the end-of-archive are part of the diffID.
    io::copy(&mut hashing, &mut io::sink()).map_err(Error::ReadLayer)?;
    let HashingReader {
        inner,
        hasher,
        count,
    } = hashing;
    inner.drain().map_err(Error::ReadLayer)?;
    Ok(Unpacked {
        diff_id: Digest::from_sha256_bytes(&hasher.finalize().into()),
        uncompressed_size: count,
    })
}

/// `reader` decompressed by its magic bytes (gzip, zstd, or passed through): for archives
/// that may come compressed, as `docker load` takes them.
pub fn decompressed<R: Read>(reader: R) -> io::Result<impl Read> {
    Decoder::new(reader)
}

/// The diffID (and uncompressed size) of the layer read from `reader`, compressed or not,
/// without unpacking it: for importers that must name a layer before they unpack it.
pub fn diff_id<R: Read>(reader: R) -> Result<Unpacked> {
    let decoder = Decoder::new(reader).map_err(Error::ReadLayer)?;
    let mut hashing = HashingReader {
        inner: decoder,
        hasher: Sha256::new(),
        count: 0,
    };
    io::copy(&mut hashing, &mut io::sink()).map_err(Error::ReadLayer)?;
    Ok(Unpacked {
        diff_id: Digest::from_sha256_bytes(&hashing.hasher.finalize().into()),
        uncompressed_size: hashing.count,
    })
}

/// Extracts a plain tar (what `docker cp` sends, not a layer) onto the existing tree `root`:
/// [`apply_layer`]'s detection, limits and safety rules, but a `.wh.` name is written as the
/// file it is, never taken for a whiteout.
pub fn extract_plain<R: Read>(reader: R, root: &Path) -> Result<Unpacked> {
    run_layer(reader, root, Form::Plain)
}

/// Flushes the whole filesystem holding `path` to disk (`syncfs(2)`). [`unpack_layer`] and
/// [`apply_layer`] do no per-file fsync; call this once after unpacking, before committing the
/// snapshot.
pub fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = File::open(path).map_err(|e| Error::io("open for syncfs", path, e))?;
    nix::unistd::syncfs(dir.as_fd()).map_err(|e| Error::io("syncfs", path, e.into()))
}

// ---------------------------------------------------------------------------------------------
// Decompression and hashing.

type Source<R> = BufReader<io::Chain<io::Cursor<Vec<u8>>, R>>;

/// The layer stream, decompressed according to its magic bytes.
enum Decoder<R: Read> {
    Plain(Source<R>),
    Gzip(Box<flate2::bufread::MultiGzDecoder<Source<R>>>),
    Zstd(zstd::stream::read::Decoder<'static, Source<R>>),
}

impl<R: Read> Decoder<R> {
    fn new(mut reader: R) -> io::Result<Self> {
        let mut magic = [0u8; 4];
        let mut n = 0;
        while n < magic.len() {
            match reader.read(&mut magic[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let prefix = magic[..n].to_vec();
        let source = BufReader::with_capacity(BUF_SIZE, io::Cursor::new(prefix).chain(reader));
        Ok(match magic[..n] {
            [0x1f, 0x8b, ..] => {
                Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(source)))
            }
            [0x28, 0xb5, 0x2f, 0xfd] => {
                Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(source)?)
            }
            _ => Decoder::Plain(source),
        })
    }

    /// Reads the compressed stream to its end (after the decompressed one ended).
    fn drain(self) -> io::Result<()> {
        let mut source = match self {
            Decoder::Plain(s) => s,
            Decoder::Gzip(d) => (*d).into_inner(),
            Decoder::Zstd(d) => d.finish(),
        };
        io::copy(&mut source, &mut io::sink()).map(drop)
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Entry metadata.

/// Extension records seen before the entry they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// What kind of node an entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One entry, with its extension records applied.
struct Meta {
    /// The path as the tar names it, for messages.
    name: String,
    /// The path normalised: components joined by `/`, no `.`, no `..`, empty for the root.
    rel: Vec<u8>,
    kind: NodeKind,
    link: Option<Vec<u8>>,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    size: u64,
    dev: (u32, u32),
}

fn refuse(entry: &str, reason: impl Into<String>) -> Error {
    Error::UnsafeEntry {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::ReadLayer(io::Error::new(io::ErrorKind::InvalidData, msg.into()))
}

pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Normalises a tar path: refuses absolute paths, `..`, NULs and over-long paths; drops `.` and
/// empty components (`./etc//passwd` is `etc/passwd`).
fn normalize(raw: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if raw.len() > MAX_PATH_LEN {
        return Err(format!(
            "path of {} bytes exceeds the {MAX_PATH_LEN}-byte limit",
            raw.len()
        ));
    }
    if raw.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component".into()),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// `(parent, name)` of a normalised non-empty path.
pub(crate) fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// Parses PAX extended header records: `"<len> <key>=<value>\n"`, where values may hold any
/// byte, newlines included (so splitting on newlines, as the `tar` crate does, is wrong).
/// One PAX record: key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

fn parse_pax(mut data: &[u8]) -> std::result::Result<Vec<PaxRecord<'_>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("pax record without length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("pax record with a bad length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("pax record with a bad length".into());
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("pax record without '='")?;
        out.push((&record[..eq], &record[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

/// Parses a PAX time (`"1700000000.123456789"`, possibly negative).
fn parse_pax_time(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if neg {
        if nanos == 0 {
            TimeSpec::new(-secs, 0)
        } else {
            TimeSpec::new(-secs - 1, 1_000_000_000 - nanos)
        }
    } else {
        TimeSpec::new(secs, nanos)
    })
}

/// A numeric header field; all-blank (NUL or space) reads as 0, as Go's `archive/tar` (which
/// wrote most layers) has it, where the `tar` crate would error.
fn numeric<T: Default>(raw: &[u8], parse: impl FnOnce() -> io::Result<T>) -> Result<T> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        return Ok(T::default());
    }
    parse().map_err(|e| corrupt(e.to_string()))
}

/// Reads an extension record's data, refusing big ones before reading them.
fn read_extension<R: Read>(entry: &mut tar::Entry<'_, R>, what: &str) -> Result<Vec<u8>> {
    let size = entry.size();
    if size > MAX_EXTENSION_RECORD {
        return Err(refuse(
            &lossy(&entry.header().path_bytes()),
            format!("{what} record of {size} bytes exceeds the {MAX_EXTENSION_RECORD}-byte limit"),
        ));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(Error::ReadLayer)?;
    if data.len() as u64 != size {
        return Err(Error::ReadLayer(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{what} record truncated"),
        )));
    }
    Ok(data)
}

impl Meta {
    fn new<R: Read>(entry: &tar::Entry<'_, R>, pending: Pending) -> Result<Meta> {
        let header = entry.header();
        let mut raw_path = match pending.long_name {
            Some(n) => strip_nuls(n),
            None => header.path_bytes().into_owned(),
        };
        let mut link = match pending.long_link {
            Some(l) => Some(strip_nuls(l)),
            None => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let old = header.as_old();
        let mut uid = numeric(&old.uid, || header.uid())?;
        let mut gid = numeric(&old.gid, || header.gid())?;
        let header_mtime = numeric(&old.mtime, || header.mtime())?;
        let mut mtime = TimeSpec::new(i64::try_from(header_mtime).unwrap_or(i64::MAX), 0);
        let mut atime = None;
        let mut xattrs = Vec::new();
        let size = entry.size();

        if let Some(pax) = &pending.pax {
            let name = lossy(&raw_path);
            let records = parse_pax(pax).map_err(|e| corrupt(format!("entry {name:?}: {e}")))?;
            let number = |v: &[u8], key: &str| -> Result<u64> {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt(format!("entry {name:?}: bad pax {key} {:?}", lossy(v))))
            };
            for (key, value) in records {
                match key {
                    b"path" => raw_path = value.to_vec(),
                    b"linkpath" => link = Some(value.to_vec()),
                    b"uid" => uid = number(value, "uid")?,
                    b"gid" => gid = number(value, "gid")?,
                    // The tar crate (raw mode) walks the archive by the header's size; a
                    // different PAX size would make it parse file data as headers.
                    b"size" if number(value, "size")? != size => {
                        return Err(refuse(
                            &name,
                            "pax size record differs from the header size",
                        ));
                    }
                    b"mtime" => {
                        mtime = parse_pax_time(value)
                            .ok_or_else(|| corrupt(format!("entry {name:?}: bad pax mtime")))?;
                    }
                    b"atime" => atime = parse_pax_time(value),
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(refuse(&name, "gnu sparse files are not supported"));
                    }
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        xattrs.push((k[b"SCHILY.xattr.".len()..].to_vec(), value.to_vec()));
                    }
                    _ => {}
                }
            }
        }

        let name = lossy(&raw_path);
        let raw_type = header.as_bytes()[156];
        let kind = match header.entry_type() {
            // Pre-POSIX tars mark directories with a trailing slash on a `\0`-typed entry.
            EntryType::Regular if raw_type == 0 && raw_path.ends_with(b"/") => NodeKind::Dir,
            EntryType::Regular | EntryType::Continuous => NodeKind::File,
            EntryType::Directory => NodeKind::Dir,
            EntryType::Symlink => NodeKind::Symlink,
            EntryType::Link => NodeKind::Hardlink,
            EntryType::Char => NodeKind::Char,
            EntryType::Block => NodeKind::Block,
            EntryType::Fifo => NodeKind::Fifo,
            EntryType::GNUSparse => {
                return Err(refuse(&name, "gnu sparse files are not supported"));
            }
            other => {
                return Err(refuse(
                    &name,
                    format!("unsupported entry type {:?}", char::from(other.as_byte())),
                ));
            }
        };
        let rel = normalize(&raw_path).map_err(|reason| refuse(&name, reason))?;
        let uid =
            u32::try_from(uid).map_err(|_| refuse(&name, format!("uid {uid} out of range")))?;
        let gid =
            u32::try_from(gid).map_err(|_| refuse(&name, format!("gid {gid} out of range")))?;
        let mode = numeric(&old.mode, || header.mode())? & 0o7777;
        let dev = if matches!(kind, NodeKind::Char | NodeKind::Block) {
            let fields = match (header.as_ustar(), header.as_gnu()) {
                (Some(u), _) => Some((u.dev_major, u.dev_minor)),
                (None, Some(g)) => Some((g.dev_major, g.dev_minor)),
                (None, None) => None,
            };
            match fields {
                Some((major, minor)) => (
                    numeric(&major, || {
                        header.device_major().map(Option::unwrap_or_default)
                    })?,
                    numeric(&minor, || {
                        header.device_minor().map(Option::unwrap_or_default)
                    })?,
                ),
                None => return Err(refuse(&name, "device node in a pre-ustar header")),
            }
        } else {
            (0, 0)
        };
        if matches!(kind, NodeKind::Symlink | NodeKind::Hardlink) {
            match &link {
                None => return Err(refuse(&name, "link without a target")),
                Some(l) if l.len() > MAX_PATH_LEN => {
                    return Err(refuse(
                        &name,
                        format!("link target exceeds the {MAX_PATH_LEN}-byte limit"),
                    ));
                }
                Some(l) if l.is_empty() || l.contains(&0) => {
                    return Err(refuse(&name, "empty link target or one with a NUL byte"));
                }
                Some(_) => {}
            }
        }
        Ok(Meta {
            name,
            rel,
            kind,
            link,
            mode,
            uid,
            gid,
            atime: atime.unwrap_or(mtime),
            mtime,
            xattrs,
            size,
            dev,
        })
    }
}

/// Walks a tar in raw mode, handing each real entry to `visit` with the extension records
/// (GNU long name/link, PAX) that precede it. The `tar` crate would read those records into
/// memory whatever their size; here each is checked against [`MAX_EXTENSION_RECORD`] first.
fn each_entry<R: Read>(
    archive: &mut tar::Archive<R>,
    mut visit: impl FnMut(&mut tar::Entry<'_, R>, Pending) -> Result<()>,
) -> Result<()> {
    let mut pending = Pending::default();
    let entries = archive.entries().map_err(Error::ReadLayer)?.raw(true);
    for entry in entries {
        let mut entry = entry.map_err(Error::ReadLayer)?;
        let entry_type = entry.header().entry_type();
        let slot = match entry_type {
            EntryType::GNULongName => Some((&mut pending.long_name, "gnu long name")),
            EntryType::GNULongLink => Some((&mut pending.long_link, "gnu long link")),
            EntryType::XHeader => Some((&mut pending.pax, "pax extended header")),
            _ => None,
        };
        if let Some((slot, what)) = slot {
            if slot.is_some() {
                return Err(corrupt(format!("two {what} records for one entry")));
            }
            *slot = Some(read_extension(&mut entry, what)?);
            continue;
        }
        if entry_type == EntryType::XGlobalHeader {
            // Global PAX headers carry nothing we apply (containerd ignores them too).
            read_extension(&mut entry, "pax global header")?;
            continue;
        }
        visit(&mut entry, std::mem::take(&mut pending))?;
    }
    if !pending.is_empty() {
        return Err(Error::ReadLayer(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "extension record without the entry it describes",
        )));
    }
    Ok(())
}

/// The names of one entry of a tar walked by [`for_each_entry`], its extension records
/// applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryNames {
    /// The entry's path, as the tar names it (not normalised; at most [`MAX_PATH_LEN`] bytes).
    pub path: Vec<u8>,
    /// A link's target (at most [`MAX_PATH_LEN`] bytes), if the entry has one.
    pub link: Option<Vec<u8>>,
}

/// Walks every entry of the (uncompressed) tar `reader` with the same bounds as a layer
/// unpack: GNU long-name/long-link and PAX records over [`MAX_EXTENSION_RECORD`] bytes, paths
/// and link targets over [`MAX_PATH_LEN`] bytes, a PAX size that differs from the header's and
/// GNU sparse files are refused before anything big is read into memory. Extension records
/// themselves are not handed to `visit`; the entry is, in raw mode (its data is what
/// `header().size()` says, at `raw_file_position()`).
pub fn for_each_entry<R: Read>(
    reader: R,
    mut visit: impl FnMut(&mut tar::Entry<'_, R>, EntryNames) -> Result<()>,
) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    each_entry(&mut archive, |entry, pending| {
        let names = entry_names(entry, pending)?;
        visit(entry, names)
    })
}

fn entry_names<R: Read>(entry: &tar::Entry<'_, R>, pending: Pending) -> Result<EntryNames> {
    let header = entry.header();
    let mut path = match pending.long_name {
        Some(n) => strip_nuls(n),
        None => header.path_bytes().into_owned(),
    };
    let mut link = match pending.long_link {
        Some(l) => Some(strip_nuls(l)),
        None => header.link_name_bytes().map(|l| l.into_owned()),
    };
    if let Some(pax) = &pending.pax {
        let name = lossy(&path);
        let records = parse_pax(pax).map_err(|e| corrupt(format!("entry {name:?}: {e}")))?;
        for (key, value) in records {
            match key {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = Some(value.to_vec()),
                b"size"
                    if std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
                        != Some(entry.size()) =>
                {
                    return Err(refuse(
                        &name,
                        "pax size record differs from the header size",
                    ));
                }
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err(refuse(&name, "gnu sparse files are not supported"));
                }
                _ => {}
            }
        }
    }
    let name = lossy(&path[..path.len().min(256)]);
    if header.entry_type() == EntryType::GNUSparse {
        return Err(refuse(&name, "gnu sparse files are not supported"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(refuse(
            &name,
            format!("path exceeds the {MAX_PATH_LEN}-byte limit"),
        ));
    }
    if link.as_ref().is_some_and(|l| l.len() > MAX_PATH_LEN) {
        return Err(refuse(
            &name,
            format!("link target exceeds the {MAX_PATH_LEN}-byte limit"),
        ));
    }
    Ok(EntryNames { path, link })
}

// ---------------------------------------------------------------------------------------------
// Applying entries.

pub(crate) const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens `rel` (normalised, possibly empty) below `start`, one component at a time, never
/// following a symlink. Raw errno: `ELOOP`/`ENOTDIR` when a component is a symlink or not a
/// directory, `ENOENT` when missing.
pub(crate) fn open_dir_nofollow(start: BorrowedFd<'_>, rel: &[u8]) -> nix::Result<OwnedFd> {
    let mut cur: Option<OwnedFd> = None;
    for comp in rel.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        let at = cur.as_ref().map_or(start, |f| f.as_fd());
        cur = Some(openat(
            at,
            OsStr::from_bytes(comp),
            DIR_FLAGS,
            Mode::empty(),
        )?);
    }
    match cur {
        Some(fd) => Ok(fd),
        None => openat(start, ".", DIR_FLAGS, Mode::empty()),
    }
}

/// Parent directories, opened safely, with the last one cached: tar entries come grouped by
/// directory, so most entries reuse it. An entry only ever removes its own path (or, for an
/// opaque marker, what is below its directory); before that, [`Dirs::forget`] drops the cache if
/// it lies there, so the cache never points into a removed directory.
struct Dirs {
    root: OwnedFd,
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl Dirs {
    /// The directory `rel` (normalised), created (mode 0755, root-owned) where missing.
    fn get(&mut self, rel: &[u8], entry: &str) -> Result<BorrowedFd<'_>> {
        match self.lookup(rel, entry, true)? {
            Some(fd) => Ok(fd),
            None => unreachable!("missing directories are created"),
        }
    }

    /// Drops the cached directory if it is `rel` or below it: `rel` is about to be removed.
    fn forget(&mut self, rel: &[u8]) {
        let below = |p: &[u8]| {
            p.starts_with(rel) && (p.len() == rel.len() || rel.is_empty() || p[rel.len()] == b'/')
        };
        if self.cached.as_ref().is_some_and(|(p, _)| below(p)) {
            self.cached = None;
        }
    }

    /// The directory `rel` (normalised) if it exists, `None` if a component is missing. Creates
    /// nothing.
    fn find(&mut self, rel: &[u8], entry: &str) -> Result<Option<BorrowedFd<'_>>> {
        self.lookup(rel, entry, false)
    }

    fn lookup(&mut self, rel: &[u8], entry: &str, create: bool) -> Result<Option<BorrowedFd<'_>>> {
        if rel.is_empty() {
            return Ok(Some(self.root.as_fd()));
        }
        let hit = self.cached.as_ref().is_some_and(|(p, _)| p == rel);
        if !hit {
            let Some(fd) = self.walk(rel, entry, create)? else {
                return Ok(None);
            };
            self.cached = Some((rel.to_vec(), fd));
        }
        match &self.cached {
            Some((_, fd)) => Ok(Some(fd.as_fd())),
            None => unreachable!("cache filled above"),
        }
    }

    /// Opens `rel` one component at a time without following symlinks, creating missing
    /// components if `create` (else `None` for a missing one).
    fn walk(&self, rel: &[u8], entry: &str, create: bool) -> Result<Option<OwnedFd>> {
        let mut cur: Option<OwnedFd> = None;
        let mut end = 0;
        for comp in rel.split(|b| *b == b'/') {
            end += comp.len();
            let prefix = &rel[..end];
            end += 1;
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let name = OsStr::from_bytes(comp);
            let fd = match openat(at, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if !create => return Ok(None),
                Err(Errno::ENOENT) => {
                    mkdirat(at, name, Mode::from_bits_truncate(0o755))
                        .map_err(|e| Error::io("create parent dir", lossy(prefix), e.into()))?;
                    let fd = openat(at, name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| Error::io("open parent dir", lossy(prefix), e.into()))?;
                    // Independent of the umask.
                    fchmod(fd.as_fd(), Mode::from_bits_truncate(0o755))
                        .map_err(|e| Error::io("chmod parent dir", lossy(prefix), e.into()))?;
                    fd
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let is_link = fstatat(at, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
                        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
                    });
                    let what = if is_link {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(refuse(
                        entry,
                        format!("parent {:?} is {what}", lossy(prefix)),
                    ));
                }
                Err(e) => return Err(Error::io("open parent dir", lossy(prefix), e.into())),
            };
            cur = Some(fd);
        }
        cur.map(Some)
            .ok_or_else(|| refuse(entry, "empty parent path"))
    }
}

/// How whiteouts are written: the two entry points of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// [`unpack_layer`]: whiteout devices and opaque xattrs.
    Overlay,
    /// [`apply_layer`]: whiteouts remove.
    Apply,
    /// [`extract_plain`]: no whiteouts; a `.wh.` name is a file like any other.
    Plain,
}

struct Unpacker {
    dest: PathBuf,
    form: Form,
    dirs: Dirs,
    /// [`Form::Apply`]: every path this layer wrote, with all its ancestors, which an opaque
    /// marker must keep. Empty for [`Form::Overlay`].
    written: HashSet<Vec<u8>>,
    /// Directory times, applied at the end: creating children changes them.
    dir_times: Vec<(Vec<u8>, TimeSpec, TimeSpec)>,
    buf: Vec<u8>,
}

pub(crate) fn file_type(st: &nix::sys::stat::FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// `/proc/self/fd/<dir>/<name>`: a path to `name` in an open directory, for the calls that have
/// no `*at` form (`lsetxattr`). Only the final component is looked up, without following it.
pub(crate) fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name));
    p
}

impl Unpacker {
    fn new(dest: &Path, form: Form) -> Result<Self> {
        // `dest` is the caller's, not the layer's: it may be a symlink, such as the
        // `/proc/self/fd/<n>` link of a directory the caller opened safely itself. Only what is
        // below it is the layer's, and that is never followed.
        let root = nix::fcntl::open(dest, DIR_FLAGS & !OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(|e| Error::io("open layer dir", dest, e.into()))?;
        Ok(Unpacker {
            dest: dest.to_owned(),
            form,
            dirs: Dirs { root, cached: None },
            written: HashSet::new(),
            dir_times: Vec::new(),
            buf: vec![0; BUF_SIZE],
        })
    }

    fn run<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<()> {
        each_entry(archive, |entry, pending| {
            let meta = Meta::new(entry, pending)?;
            self.apply(entry, &meta)
        })
    }

    /// Sets the directory times recorded during the unpack. A directory replaced since is
    /// skipped: its path may now lead elsewhere, and it is opened without following symlinks.
    fn finish(&mut self) {
        for (rel, atime, mtime) in std::mem::take(&mut self.dir_times) {
            let set = open_dir_nofollow(self.dirs.root.as_fd(), &rel)
                .and_then(|fd| futimens(fd.as_fd(), &atime, &mtime));
            if let Err(e) = set {
                tracing::debug!(path = %lossy(&rel), error = %e, "directory gone before its times were set");
            }
        }
    }

    fn path_of(&self, rel: &[u8]) -> PathBuf {
        self.dest.join(OsStr::from_bytes(rel))
    }

    /// What a hardlink target must exist in, for messages.
    fn scope(&self) -> &'static str {
        match self.form {
            Form::Overlay => "the layer",
            Form::Apply | Form::Plain => "the tree",
        }
    }

    /// Records that this layer wrote `rel` (and so its ancestors), for opaque markers.
    fn mark_written(&mut self, rel: &[u8]) {
        if self.form != Form::Apply {
            return;
        }
        let mut cur = rel;
        // A path already recorded has its ancestors recorded too.
        while !cur.is_empty() && self.written.insert(cur.to_vec()) {
            cur = split_last(cur).0;
        }
    }

    fn apply<R: Read>(&mut self, entry: &mut R, m: &Meta) -> Result<()> {
        if m.rel.is_empty() {
            // `./`: the layer root itself; only a directory can describe it.
            if m.kind != NodeKind::Dir {
                return Err(refuse(&m.name, "non-directory entry for the layer root"));
            }
            let dir = File::from(
                self.dirs
                    .root
                    .try_clone()
                    .map_err(|e| Error::io("dup layer dir", &self.dest, e))?,
            );
            self.set_dir_meta(&dir, m)?;
            return Ok(());
        }
        let (parent, name) = split_last(&m.rel);
        if name.starts_with(WHITEOUT_PREFIX) && self.form != Form::Plain {
            return self.apply_whiteout(m, parent, name);
        }
        let path = self.path_of(&m.rel);
        self.mark_written(&m.rel);
        self.dirs.forget(&m.rel);

        // A hardlink target is resolved before the parent lookup below borrows the cache.
        let link_target = if m.kind == NodeKind::Hardlink {
            Some(self.resolve_hardlink(m)?)
        } else {
            None
        };
        let dir = self.dirs.get(parent, &m.name)?;
        let osname = OsStr::from_bytes(name);

        match fstatat(dir, osname, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = file_type(&st) == SFlag::S_IFDIR;
                if let Some((_, _, target_rel)) = &link_target
                    && *target_rel == m.rel
                {
                    // A hardlink to itself: nothing to do.
                    return Ok(());
                }
                if !(is_dir && m.kind == NodeKind::Dir) {
                    remove_at(dir, name, is_dir, &path)?;
                }
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::io("stat", path, e.into())),
        }

        match m.kind {
            NodeKind::File => {
                let fd = openat(
                    dir,
                    osname,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| Error::io("create file", &path, e.into()))?;
                let mut file = File::from(fd);
                copy_exact(entry, &mut file, m.size, &mut self.buf, &path)?;
                fchown(
                    &file,
                    Some(Uid::from_raw(m.uid)),
                    Some(Gid::from_raw(m.gid)),
                )
                .map_err(|e| Error::io("chown", &path, e.into()))?;
                // After chown, which clears setuid/setgid.
                fchmod(&file, Mode::from_bits_truncate(m.mode))
                    .map_err(|e| Error::io("chmod", &path, e.into()))?;
                set_xattrs_fd(&file, m, &path)?;
                futimens(&file, &m.atime, &m.mtime)
                    .map_err(|e| Error::io("set times", &path, e.into()))?;
            }
            NodeKind::Dir => {
                match mkdirat(dir, osname, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(Error::io("create dir", &path, e.into())),
                }
                let fd = openat(dir, osname, DIR_FLAGS, Mode::empty())
                    .map_err(|e| Error::io("open dir", &path, e.into()))?;
                let rel = m.rel.clone();
                self.set_dir_meta_at(&File::from(fd), m, rel, &path)?;
            }
            NodeKind::Symlink => {
                let target = OsStr::from_bytes(m.link.as_deref().unwrap_or_default());
                symlinkat(target, dir, osname)
                    .map_err(|e| Error::io("create symlink", &path, e.into()))?;
                self.set_node_meta(m, &path, false)?;
            }
            NodeKind::Hardlink => {
                let Some((target_dir, target_name, _)) = &link_target else {
                    unreachable!("resolved above");
                };
                linkat(
                    target_dir,
                    OsStr::from_bytes(target_name),
                    dir,
                    osname,
                    AtFlags::empty(),
                )
                .map_err(|e| Error::io("create hardlink", &path, e.into()))?;
            }
            NodeKind::Char | NodeKind::Block | NodeKind::Fifo => {
                let kind = match m.kind {
                    NodeKind::Char => SFlag::S_IFCHR,
                    NodeKind::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = makedev(u64::from(m.dev.0), u64::from(m.dev.1));
                mknodat(dir, osname, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| Error::io("create device node", &path, e.into()))?;
                self.set_node_meta(m, &path, true)?;
            }
        }
        Ok(())
    }

    /// Resolves a hardlink's target inside the layer (or, applying, the tree): `(its dir, its
    /// name, its normalised path)`.
    fn resolve_hardlink(&self, m: &Meta) -> Result<(OwnedFd, Vec<u8>, Vec<u8>)> {
        let raw = m.link.as_deref().unwrap_or_default();
        let target = normalize(raw)
            .map_err(|r| refuse(&m.name, format!("hardlink target {:?}: {r}", lossy(raw))))?;
        if target.is_empty() {
            return Err(refuse(&m.name, "hardlink to the layer root"));
        }
        let (parent, name) = split_last(&target);
        let dir = open_dir_nofollow(self.dirs.root.as_fd(), parent).map_err(|e| {
            let reason = match e {
                Errno::ENOENT => format!("does not exist in {}", self.scope()),
                Errno::ELOOP | Errno::ENOTDIR => {
                    "is reached through a symlink or a non-directory".to_owned()
                }
                e => format!("cannot be opened: {e}"),
            };
            refuse(
                &m.name,
                format!("hardlink target {:?} {reason}", lossy(raw)),
            )
        })?;
        match fstatat(
            dir.as_fd(),
            OsStr::from_bytes(name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if file_type(&st) == SFlag::S_IFDIR => Err(refuse(
                &m.name,
                format!("hardlink target {:?} is a directory", lossy(raw)),
            )),
            Ok(_) => Ok((dir, name.to_vec(), target)),
            Err(Errno::ENOENT) => Err(refuse(
                &m.name,
                format!(
                    "hardlink target {:?} does not exist in {}",
                    lossy(raw),
                    self.scope()
                ),
            )),
            Err(e) => Err(Error::io(
                "stat hardlink target",
                self.path_of(&target),
                e.into(),
            )),
        }
    }

    fn apply_whiteout(&mut self, m: &Meta, parent: &[u8], name: &[u8]) -> Result<()> {
        if name == OPAQUE_WHITEOUT && self.form == Form::Apply {
            return self.clear_opaque(m, parent);
        }
        if name == OPAQUE_WHITEOUT {
            let path = self.path_of(parent);
            let dir = self.dirs.get(parent, &m.name)?;
            let file = File::from(
                dir.try_clone_to_owned()
                    .map_err(|e| Error::io("dup dir", &path, e))?,
            );
            return file
                .set_xattr("trusted.overlay.opaque", b"y")
                .map_err(|e| Error::io("set opaque xattr on", path, e));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            tracing::debug!(entry = %m.name, "skipping aufs whiteout metadata");
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(refuse(&m.name, "whiteout of an invalid name"));
        }
        let mut rel = parent.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(target);
        let path = self.path_of(&rel);
        self.dirs.forget(&rel);
        let form = self.form;
        let dir = match form {
            Form::Overlay => self.dirs.get(parent, &m.name)?,
            // Nothing to remove below a missing directory, and nothing is created.
            Form::Apply | Form::Plain => match self.dirs.find(parent, &m.name)? {
                Some(dir) => dir,
                None => return Ok(()),
            },
        };
        let osname = OsStr::from_bytes(target);
        match fstatat(dir, osname, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => remove_at(dir, target, file_type(&st) == SFlag::S_IFDIR, &path)?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::io("stat", path, e.into())),
        }
        if form == Form::Apply {
            return Ok(());
        }
        mknodat(dir, osname, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| Error::io("create whiteout", &path, e.into()))?;
        fchownat(
            dir,
            osname,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io("chown", &path, e.into()))
    }

    /// [`Form::Apply`], `.wh..wh..opq` in `dir_rel`: removes everything below it that this layer
    /// has not written (what lower layers put there). Directories this layer wrote, explicitly
    /// or as parents of its entries, stay, emptied of their lower contents the same way. Entries
    /// after the marker are written after this, so they stay too.
    fn clear_opaque(&mut self, m: &Meta, dir_rel: &[u8]) -> Result<()> {
        // Resolved like any entry's parent (symlinks refused); a missing directory has nothing
        // to clear. The cache then holds `dir_rel` (or nothing, for the root), which stays: only
        // its descendants go.
        self.dirs.forget(dir_rel);
        if self.dirs.find(dir_rel, &m.name)?.is_none() {
            return Ok(());
        }
        let mut pending = vec![dir_rel.to_vec()];
        while let Some(rel) = pending.pop() {
            let path = self.path_of(&rel);
            let dir = open_dir_nofollow(self.dirs.root.as_fd(), &rel)
                .map_err(|e| Error::io("open opaque dir", &path, e.into()))?;
            let names = std::fs::read_dir(proc_path(dir.as_fd(), b""))
                .and_then(|it| {
                    it.map(|e| e.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<_>>>()
                })
                .map_err(|e| Error::io("read dir", &path, e))?;
            for name in names {
                let name = name.as_bytes();
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(name);
                let st = match fstatat(
                    dir.as_fd(),
                    OsStr::from_bytes(name),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(Error::io("stat", self.path_of(&child), e.into())),
                };
                let is_dir = file_type(&st) == SFlag::S_IFDIR;
                if !self.written.contains(&child) {
                    remove_at(dir.as_fd(), name, is_dir, &self.path_of(&child))?;
                } else if is_dir {
                    pending.push(child);
                }
            }
        }
        Ok(())
    }

    fn set_dir_meta(&mut self, dir: &File, m: &Meta) -> Result<()> {
        let path = self.dest.clone();
        self.set_dir_meta_at(dir, m, Vec::new(), &path)
    }

    fn set_dir_meta_at(&mut self, dir: &File, m: &Meta, rel: Vec<u8>, path: &Path) -> Result<()> {
        fchown(dir, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid)))
            .map_err(|e| Error::io("chown", path, e.into()))?;
        fchmod(dir, Mode::from_bits_truncate(m.mode))
            .map_err(|e| Error::io("chmod", path, e.into()))?;
        set_xattrs_fd(dir, m, path)?;
        self.dir_times.push((rel, m.atime, m.mtime));
        Ok(())
    }

    /// Ownership, mode (unless a symlink), xattrs and times of a node that cannot be opened
    /// (symlink, device, fifo), by name in its (cached) parent.
    fn set_node_meta(&mut self, m: &Meta, path: &Path, chmod: bool) -> Result<()> {
        let (parent, name) = split_last(&m.rel);
        let dir = self.dirs.get(parent, &m.name)?;
        let osname = OsStr::from_bytes(name);
        fchownat(
            dir,
            osname,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io("chown", path, e.into()))?;
        if chmod {
            // Not a symlink (we just made it), so following is moot.
            fchmodat(
                dir,
                osname,
                Mode::from_bits_truncate(m.mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| Error::io("chmod", path, e.into()))?;
        }
        if !m.xattrs.is_empty() {
            let p = proc_path(dir, name);
            set_xattrs(m, path, |k, v| xattr::set(&p, k, v))?;
        }
        utimensat(
            dir,
            osname,
            &m.atime,
            &m.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io("set times", path, e.into()))
    }
}

fn set_xattrs_fd(file: &File, m: &Meta, path: &Path) -> Result<()> {
    set_xattrs(m, path, |k, v| file.set_xattr(k, v))
}

fn set_xattrs(
    m: &Meta,
    path: &Path,
    mut set: impl FnMut(&OsStr, &[u8]) -> io::Result<()>,
) -> Result<()> {
    for (key, value) in &m.xattrs {
        let shown = lossy(key);
        if key.starts_with(b"trusted.overlay.") {
            tracing::warn!(entry = %m.name, xattr = %shown, "skipping overlayfs xattr found in layer");
            continue;
        }
        match set(OsStr::from_bytes(key), value) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) && !key.starts_with(b"trusted.")
                    || e.raw_os_error() == Some(libc::EPERM)
                        && key.starts_with(b"user.")
                        && !matches!(m.kind, NodeKind::File | NodeKind::Dir) =>
            {
                tracing::warn!(entry = %m.name, xattr = %shown, error = %e, "xattr not supported here, skipped");
            }
            Err(e) => return Err(Error::io("set xattr", path, e)),
        }
    }
    Ok(())
}

/// Removes `name` in `dir`: a file, or a whole directory tree (without following symlinks).
fn remove_at(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool, path: &Path) -> Result<()> {
    let osname = OsStr::from_bytes(name);
    if is_dir {
        // std's remove_dir_all opens each level with O_NOFOLLOW: a symlink inside is removed,
        // never followed. `/proc/self/fd/<dir>/<name>` names the directory without re-walking.
        std::fs::remove_dir_all(proc_path(dir, name)).map_err(|e| Error::io("remove dir", path, e))
    } else {
        unlinkat(dir, osname, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| Error::io("remove", path, e.into()))
    }
}

/// Copies exactly `size` bytes of entry data; fewer means the stream was truncated.
fn copy_exact<R: Read>(
    src: &mut R,
    dst: &mut File,
    size: u64,
    buf: &mut [u8],
    path: &Path,
) -> Result<()> {
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::ReadLayer(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("layer ended inside {path:?}"),
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::ReadLayer(e)),
        };
        dst.write_all(&buf[..n])
            .map_err(|e| Error::io("write file", path, e))?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::{Builder, Header};

    use super::*;

    /// Appends an entry with the exact name and link bytes given (the `tar` builder refuses
    /// `..` and absolute paths, which hostile tests need).
    #[allow(clippy::too_many_arguments)]
    fn raw(
        b: &mut Builder<Vec<u8>>,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        mode: u32,
        uid: u64,
        mtime: u64,
        data: &[u8],
    ) {
        let mut h = Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(mtime);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn file(b: &mut Builder<Vec<u8>>, name: &str, data: &[u8]) {
        raw(
            b,
            name.as_bytes(),
            EntryType::Regular,
            b"",
            0o644,
            0,
            1_600_000_000,
            data,
        );
    }

    fn dir(b: &mut Builder<Vec<u8>>, name: &str) {
        raw(
            b,
            name.as_bytes(),
            EntryType::Directory,
            b"",
            0o755,
            0,
            1_600_000_000,
            b"",
        );
    }

    fn link(b: &mut Builder<Vec<u8>>, name: &str, kind: EntryType, target: &str) {
        raw(
            b,
            name.as_bytes(),
            kind,
            target.as_bytes(),
            0o777,
            0,
            1_600_000_000,
            b"",
        );
    }

    fn finish(b: Builder<Vec<u8>>) -> Vec<u8> {
        b.into_inner().unwrap()
    }

    fn unpack_bytes(tar: &[u8], dest: &Path) -> Result<Unpacked> {
        unpack_layer(tar, dest)
    }

    fn sha(data: &[u8]) -> Digest {
        Digest::from_sha256_bytes(&Sha256::digest(data).into())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd_compress(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 3).unwrap()
    }

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (chown, mknod, trusted.* xattrs): run the test suite as root"
        );
    }

    fn mtime(p: &Path) -> i64 {
        fs::symlink_metadata(p).unwrap().mtime()
    }

    #[test]
    fn unpacks_every_entry_type_with_metadata() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"./",
            EntryType::Directory,
            b"",
            0o751,
            0,
            1_000,
            b"",
        );
        raw(
            &mut b,
            b"./etc/",
            EntryType::Directory,
            b"",
            0o750,
            1000,
            1_111,
            b"",
        );
        raw(
            &mut b,
            b"./etc/passwd",
            EntryType::Regular,
            b"",
            0o4755,
            1000,
            2_222,
            b"root:x:0:0\n",
        );
        raw(
            &mut b,
            b"etc/sticky",
            EntryType::Directory,
            b"",
            0o1777,
            0,
            3_333,
            b"",
        );
        raw(
            &mut b,
            b"etc/sgid",
            EntryType::Regular,
            b"",
            0o2711,
            5,
            4_444,
            b"",
        );
        raw(
            &mut b,
            b"etc/link",
            EntryType::Symlink,
            b"passwd",
            0o777,
            7,
            5_555,
            b"",
        );
        raw(
            &mut b,
            b"etc/dangling",
            EntryType::Symlink,
            b"/nonexistent/x",
            0o777,
            0,
            5_555,
            b"",
        );
        raw(
            &mut b,
            b"etc/hard",
            EntryType::Link,
            b"./etc/passwd",
            0o644,
            0,
            0,
            b"",
        );
        raw(&mut b, b"fifo", EntryType::Fifo, b"", 0o620, 3, 6_666, b"");
        let mut h = Header::new_gnu();
        h.set_path("dev/null").unwrap();
        h.set_entry_type(EntryType::Char);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_mode(0o666);
        h.set_size(0);
        h.set_mtime(7_777);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        // Implicit parents: no entry for deep/er.
        file(&mut b, "deep/er/file", &vec![7u8; 1_000_000]);
        // xattrs through PAX records, a binary value with a newline in it included.
        b.append_pax_extensions([
            ("SCHILY.xattr.user.greeting", &b"hi\nthere"[..]),
            (
                "SCHILY.xattr.security.capability",
                &[
                    1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ][..],
            ),
        ])
        .unwrap();
        file(&mut b, "xattr-file", b"x");
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.berth", &b"t"[..]),
            ("mtime", &b"8888.5"[..]),
        ])
        .unwrap();
        dir(&mut b, "xattr-dir");
        let tar = finish(b);

        let out = unpack_bytes(&tar, tmp.path()).unwrap();
        assert_eq!(out.diff_id, sha(&tar));
        assert_eq!(out.uncompressed_size, tar.len() as u64);

        let p = |s: &str| tmp.path().join(s);
        let root = fs::metadata(tmp.path()).unwrap();
        assert_eq!(root.mode() & 0o7777, 0o751);
        assert_eq!(root.mtime(), 1_000);

        let etc = fs::metadata(p("etc")).unwrap();
        assert!(etc.is_dir());
        assert_eq!(
            (etc.mode() & 0o7777, etc.uid(), etc.gid()),
            (0o750, 1000, 1001)
        );
        // Set after its children were created.
        assert_eq!(etc.mtime(), 1_111);

        let passwd = fs::metadata(p("etc/passwd")).unwrap();
        assert_eq!(fs::read(p("etc/passwd")).unwrap(), b"root:x:0:0\n");
        assert_eq!(
            (passwd.mode() & 0o7777, passwd.uid(), passwd.gid()),
            (0o4755, 1000, 1001)
        );
        assert_eq!(passwd.mtime(), 2_222);
        assert_eq!(passwd.nlink(), 2);
        assert_eq!(fs::metadata(p("etc/hard")).unwrap().ino(), passwd.ino());

        assert_eq!(
            fs::metadata(p("etc/sticky")).unwrap().mode() & 0o7777,
            0o1777
        );
        let sgid = fs::metadata(p("etc/sgid")).unwrap();
        assert_eq!(
            (sgid.mode() & 0o7777, sgid.uid(), sgid.gid()),
            (0o2711, 5, 6)
        );

        let l = fs::symlink_metadata(p("etc/link")).unwrap();
        assert!(l.file_type().is_symlink());
        assert_eq!(fs::read_link(p("etc/link")).unwrap(), Path::new("passwd"));
        assert_eq!((l.uid(), l.gid(), l.mtime()), (7, 8, 5_555));
        assert_eq!(
            fs::read_link(p("etc/dangling")).unwrap(),
            Path::new("/nonexistent/x")
        );

        let fifo = fs::symlink_metadata(p("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(
            (fifo.mode() & 0o7777, fifo.uid(), fifo.mtime()),
            (0o620, 3, 6_666)
        );

        let null = fs::symlink_metadata(p("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!((null.mode() & 0o7777, null.mtime()), (0o666, 7_777));

        assert_eq!(fs::read(p("deep/er/file")).unwrap().len(), 1_000_000);
        assert_eq!(fs::metadata(p("deep/er")).unwrap().mode() & 0o7777, 0o755);

        assert_eq!(
            xattr::get(p("xattr-file"), "user.greeting")
                .unwrap()
                .unwrap(),
            b"hi\nthere"
        );
        assert!(
            xattr::get(p("xattr-file"), "security.capability")
                .unwrap()
                .is_some()
        );
        assert_eq!(
            xattr::get(p("xattr-dir"), "trusted.berth")
                .unwrap()
                .unwrap(),
            b"t"
        );
        let xd = fs::metadata(p("xattr-dir")).unwrap();
        assert_eq!((xd.mtime(), xd.mtime_nsec()), (8888, 500_000_000));
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Vec::new());
        dir(&mut b, "a");
        file(&mut b, "a/.wh.gone", b"");
        file(&mut b, "b/.wh..wh..opq", b"");
        file(&mut b, "b/kept", b"k");
        file(&mut b, ".wh..wh.plnk", b"");
        file(&mut b, ".wh.top", b"");
        let tar = finish(b);
        unpack_bytes(&tar, tmp.path()).unwrap();

        let wh = fs::symlink_metadata(tmp.path().join("a/gone")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(
            fs::symlink_metadata(tmp.path().join("top"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert!(!tmp.path().join("a/.wh.gone").exists());
        assert_eq!(
            xattr::get(tmp.path().join("b"), "trusted.overlay.opaque")
                .unwrap()
                .unwrap(),
            b"y"
        );
        assert!(!tmp.path().join("b/.wh..wh..opq").exists());
        assert!(tmp.path().join("b/kept").exists());
        assert!(!tmp.path().join(".wh..wh.plnk").exists());
        assert_eq!(mtime(&tmp.path().join("a")), 1_600_000_000);
    }

    #[test]
    fn plain_extraction_keeps_whiteout_names_as_files() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("gone"), b"still here").unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("d/old"), b"old").unwrap();
        let mut b = Builder::new(Vec::new());
        file(&mut b, ".wh.gone", b"a file named so");
        file(&mut b, "d/.wh..wh..opq", b"");
        let tar = finish(b);
        extract_plain(&tar[..], tmp.path()).unwrap();
        assert_eq!(fs::read(tmp.path().join("gone")).unwrap(), b"still here");
        assert_eq!(
            fs::read(tmp.path().join(".wh.gone")).unwrap(),
            b"a file named so"
        );
        assert!(tmp.path().join("d/old").exists());
        assert!(tmp.path().join("d/.wh..wh..opq").exists());
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "f", b"one");
        file(&mut b, "f", b"two");
        file(&mut b, "d/child", b"c");
        dir(&mut b, "d");
        file(&mut b, "x/child", b"c");
        file(&mut b, "x", b"now a file");
        file(&mut b, "y", b"file");
        dir(&mut b, "y");
        link(&mut b, "s", EntryType::Symlink, "f");
        file(&mut b, "s", b"no longer a link");
        file(&mut b, "self", b"me");
        link(&mut b, "self", EntryType::Link, "self");
        let tar = finish(b);
        unpack_bytes(&tar, tmp.path()).unwrap();
        let p = |s: &str| tmp.path().join(s);
        assert_eq!(fs::read(p("f")).unwrap(), b"two");
        assert_eq!(fs::read(p("d/child")).unwrap(), b"c");
        assert_eq!(fs::read(p("x")).unwrap(), b"now a file");
        assert!(fs::metadata(p("y")).unwrap().is_dir());
        assert!(fs::symlink_metadata(p("s")).unwrap().is_file());
        assert_eq!(fs::read(p("self")).unwrap(), b"me");
    }

    #[test]
    fn diff_id_is_sha256_of_uncompressed_stream() {
        let mut b = Builder::new(Vec::new());
        file(&mut b, "a", &vec![1u8; 300_000]);
        dir(&mut b, "d");
        let mut tar = finish(b);
        // Padding after end-of-archive, as many tar writers leave (block-size rounding).
        tar.extend(vec![0u8; 10 * 1024]);
        let want = sha(&tar);

        struct Counting<'a>(&'a [u8], usize);
        impl Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n;
                Ok(n)
            }
        }

        for (name, blob) in [
            ("plain", tar.clone()),
            ("gzip", gzip(&tar)),
            ("zstd", zstd_compress(&tar)),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut reader = Counting(&blob, 0);
            let out = unpack_layer(&mut reader, tmp.path()).unwrap();
            assert_eq!(out.diff_id, want, "{name}");
            assert_eq!(out.uncompressed_size, tar.len() as u64, "{name}");
            assert_eq!(
                reader.1,
                blob.len(),
                "{name}: compressed stream not read to its end"
            );
            assert_eq!(
                fs::read(tmp.path().join("a")).unwrap().len(),
                300_000,
                "{name}"
            );
        }
    }

    #[test]
    fn truncated_streams_are_read_errors() {
        let mut b = Builder::new(Vec::new());
        file(
            &mut b,
            "a",
            &(0..400_000u32)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        );
        let tar = finish(b);
        let gz = gzip(&tar);
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_bytes(&gz[..gz.len() / 2], tmp.path()).unwrap_err();
        assert!(matches!(err, Error::ReadLayer(_)), "{err:?}");
        let zst = zstd_compress(&tar);
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_bytes(&zst[..zst.len() - 10], tmp.path()).unwrap_err();
        assert!(matches!(err, Error::ReadLayer(_)), "{err:?}");
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_bytes(&tar[..tar.len() / 2], tmp.path()).unwrap_err();
        assert!(matches!(err, Error::ReadLayer(_)), "{err:?}");
        let tmp = tempfile::tempdir().unwrap();
        let mut corrupt = tar.clone();
        corrupt[10] ^= 0xff;
        let err = unpack_bytes(&corrupt, tmp.path()).unwrap_err();
        assert!(matches!(err, Error::ReadLayer(_)), "{err:?}");
    }

    fn assert_refused(tar: &[u8], dest: &Path, needle: &str) {
        match unpack_bytes(tar, dest) {
            Err(Error::UnsafeEntry { reason, .. }) => {
                assert!(
                    reason.contains(needle),
                    "reason {reason:?} lacks {needle:?}"
                );
            }
            other => panic!("expected UnsafeEntry ({needle}), got {other:?}"),
        }
    }

    /// A tempdir with `dest/` (the layer) and room around it for escapes to land in.
    fn sandbox() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        (tmp, dest)
    }

    #[test]
    fn refuses_path_traversal() {
        let (tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"../escape",
            EntryType::Regular,
            b"",
            0o644,
            0,
            0,
            b"x",
        );
        assert_refused(&finish(b), &dest, "'..'");
        assert!(!tmp.path().join("escape").exists());

        let abs = tmp.path().join("abs");
        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            abs.as_os_str().as_bytes(),
            EntryType::Regular,
            b"",
            0o644,
            0,
            0,
            b"x",
        );
        assert_refused(&finish(b), &dest, "absolute");
        assert!(!abs.exists());

        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"a/../../x",
            EntryType::Regular,
            b"",
            0o644,
            0,
            0,
            b"x",
        );
        assert_refused(&finish(b), &dest, "'..'");
        assert!(!tmp.path().join("x").exists());

        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"./ok/../../x",
            EntryType::Directory,
            b"",
            0o755,
            0,
            0,
            b"",
        );
        assert_refused(&finish(b), &dest, "'..'");
    }

    #[test]
    fn refuses_writes_through_symlinks() {
        let (tmp, dest) = sandbox();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut b = Builder::new(Vec::new());
        link(&mut b, "lnk", EntryType::Symlink, outside.to_str().unwrap());
        file(&mut b, "lnk/file", b"x");
        assert_refused(&finish(b), &dest, "symlink");
        assert!(!outside.join("file").exists());

        let (tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        link(&mut b, "lnk", EntryType::Symlink, "..");
        file(&mut b, "lnk/x", b"x");
        assert_refused(&finish(b), &dest, "symlink");
        assert!(!tmp.path().join("x").exists());

        // Deeper: a symlinked directory in the middle of the path, and a whiteout through it.
        let (tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        dir(&mut b, "a");
        link(&mut b, "a/b", EntryType::Symlink, "../..");
        file(&mut b, "a/b/.wh.victim", b"");
        assert_refused(&finish(b), &dest, "symlink");
        assert!(!tmp.path().join("victim").exists());
    }

    #[test]
    fn refuses_escaping_hardlinks() {
        let (tmp, dest) = sandbox();
        fs::write(tmp.path().join("outside"), b"secret").unwrap();
        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"h",
            EntryType::Link,
            b"../outside",
            0o644,
            0,
            0,
            b"",
        );
        assert_refused(&finish(b), &dest, "'..'");
        assert!(!dest.join("h").exists());

        let mut b = Builder::new(Vec::new());
        raw(
            &mut b,
            b"h",
            EntryType::Link,
            b"/etc/passwd",
            0o644,
            0,
            0,
            b"",
        );
        assert_refused(&finish(b), &dest, "absolute");
        assert!(!dest.join("h").exists());

        let mut b = Builder::new(Vec::new());
        raw(&mut b, b"h", EntryType::Link, b"missing", 0o644, 0, 0, b"");
        assert_refused(&finish(b), &dest, "does not exist");

        let (tmp, dest) = sandbox();
        let outside = tmp.path().join("outdir");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        let mut b = Builder::new(Vec::new());
        link(&mut b, "d", EntryType::Symlink, outside.to_str().unwrap());
        raw(&mut b, b"h", EntryType::Link, b"d/secret", 0o644, 0, 0, b"");
        assert_refused(&finish(b), &dest, "symlink");
        assert!(!dest.join("h").exists());
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn refuses_giant_long_names() {
        let (_tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        let name = vec![b'n'; (MAX_EXTENSION_RECORD + 10) as usize];
        let mut h = Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(EntryType::GNULongName);
        h.set_size(name.len() as u64);
        h.set_cksum();
        b.append(&h, &name[..]).unwrap();
        file(&mut b, "short", b"x");
        assert_refused(&finish(b), &dest, "gnu long name");

        // Under the record limit but over PATH_MAX.
        let (_tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, "a/".repeat(3000), &b"x"[..]).unwrap();
        assert_refused(&finish(b), &dest, "limit");

        // Long names that fit work.
        let (_tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        let long = format!("{}/f", "d".repeat(200));
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, &long, &b"x"[..]).unwrap();
        unpack_bytes(&finish(b), &dest).unwrap();
        assert!(dest.join(long).exists());
    }

    #[test]
    fn for_each_entry_applies_long_names_and_refuses_giant_ones() {
        let mut b = Builder::new(Vec::new());
        let long = format!("{}/f", "d".repeat(200));
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, &long, &b"x"[..]).unwrap();
        b.append_pax_extensions([("path", &b"pax/name"[..])])
            .unwrap();
        file(&mut b, "short", b"y");
        let mut seen = Vec::new();
        for_each_entry(finish(b).as_slice(), |e, names| {
            seen.push((lossy(&names.path), e.size()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(long, 1), ("pax/name".to_owned(), 1)]);

        let mut b = Builder::new(Vec::new());
        let name = vec![b'n'; (MAX_EXTENSION_RECORD + 10) as usize];
        let mut h = Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(EntryType::GNULongLink);
        h.set_size(name.len() as u64);
        h.set_cksum();
        b.append(&h, &name[..]).unwrap();
        file(&mut b, "short", b"x");
        let err = for_each_entry(finish(b).as_slice(), |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("gnu long link"), "{err}");
    }

    #[test]
    fn refuses_sparse_and_unknown_types() {
        let (_tmp, dest) = sandbox();
        let mut b = Builder::new(Vec::new());
        raw(&mut b, b"s", EntryType::new(b'V'), b"", 0o644, 0, 0, b"");
        assert_refused(&finish(b), &dest, "unsupported entry type");
        let mut b = Builder::new(Vec::new());
        b.append_pax_extensions([("GNU.sparse.major", &b"1"[..])])
            .unwrap();
        file(&mut b, "s", b"x");
        assert_refused(&finish(b), &dest, "sparse");
    }

    #[test]
    fn pax_parsing() {
        let recs = parse_pax(b"11 key=a\nb\n12 path=p/q\n").unwrap();
        assert_eq!(
            recs,
            vec![(&b"key"[..], &b"a\nb"[..]), (&b"path"[..], &b"p/q"[..])]
        );
        assert!(parse_pax(b"99 key=v\n").is_err());
        assert!(parse_pax(b"x key=v\n").is_err());
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(TimeSpec::new(12, 500_000_000))
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(TimeSpec::new(-2, 750_000_000))
        );
        assert_eq!(parse_pax_time(b"7"), Some(TimeSpec::new(7, 0)));
        assert_eq!(parse_pax_time(b"1.x"), None);
        assert_eq!(normalize(b"./etc//passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize(b"./").unwrap(), b"");
    }

    fn assert_apply_refused(tar: &[u8], root: &Path, needle: &str) {
        match apply_layer(tar, root) {
            Err(Error::UnsafeEntry { reason, .. }) => {
                assert!(
                    reason.contains(needle),
                    "reason {reason:?} lacks {needle:?}"
                );
            }
            other => panic!("expected UnsafeEntry ({needle}), got {other:?}"),
        }
    }

    /// Every entry below `root` that is a character device, or has an overlay xattr.
    fn overlay_artifacts(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    if xattr::get(&p, "trusted.overlay.opaque").unwrap().is_some() {
                        out.push(p.clone());
                    }
                    stack.push(p);
                } else if md.file_type().is_char_device() {
                    out.push(p);
                }
            }
        }
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn apply_whiteouts_opaque_dirs_and_replacements() {
        require_root();
        let (tmp, root) = sandbox();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();

        let mut b = Builder::new(Vec::new());
        dir(&mut b, "a");
        file(&mut b, "a/f", b"f");
        file(&mut b, "a/stays", b"s");
        dir(&mut b, "d");
        file(&mut b, "d/sub/y", b"y");
        link(
            &mut b,
            "lnkdir",
            EntryType::Symlink,
            outside.to_str().unwrap(),
        );
        dir(&mut b, "opq");
        file(&mut b, "opq/old", b"o");
        file(&mut b, "opq/rewritten", b"lower");
        dir(&mut b, "opq/kept");
        file(&mut b, "opq/kept/old", b"ko");
        file(&mut b, "opq/implicit/old", b"io");
        link(&mut b, "opq/oldlink", EntryType::Symlink, "/etc");
        file(&mut b, "dir2file/c", b"c");
        file(&mut b, "file2dir", b"x");
        file(&mut b, "big", b"lower file");
        let l1 = finish(b);
        let out = apply_layer(&l1[..], &root).unwrap();
        assert_eq!(out.diff_id, sha(&l1));

        let mut b = Builder::new(Vec::new());
        file(&mut b, "a/.wh.f", b"");
        file(&mut b, ".wh.d", b"");
        file(&mut b, ".wh.lnkdir", b"");
        file(&mut b, ".wh.missing", b"");
        file(&mut b, "nodir/deeper/.wh.x", b"");
        // The opaque marker is not the first entry of its directory.
        file(&mut b, "opq/before", b"b");
        dir(&mut b, "opq/kept");
        file(&mut b, "opq/.wh..wh..opq", b"");
        file(&mut b, "opq/implicit/new", b"n");
        file(&mut b, "opq/rewritten", b"upper");
        file(&mut b, "opq/after", b"a");
        file(&mut b, "dir2file", b"now a file");
        dir(&mut b, "file2dir");
        file(&mut b, "file2dir/c", b"c");
        link(&mut b, "hard", EntryType::Link, "big");
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        dir(&mut b, "xdir");
        let l2 = finish(b);
        let out = apply_layer(&l2[..], &root).unwrap();
        assert_eq!(out.diff_id, sha(&l2));

        let p = |s: &str| root.join(s);
        assert_eq!(
            names(&root),
            ["a", "big", "dir2file", "file2dir", "hard", "opq", "xdir"]
        );
        assert_eq!(names(&p("a")), ["stays"]);
        // The symlink itself went, not what it pointed at.
        assert_eq!(names(&outside), ["keep"]);
        assert_eq!(
            names(&p("opq")),
            ["after", "before", "implicit", "kept", "rewritten"]
        );
        assert!(names(&p("opq/kept")).is_empty());
        assert_eq!(names(&p("opq/implicit")), ["new"]);
        assert_eq!(fs::read(p("opq/rewritten")).unwrap(), b"upper");
        assert_eq!(fs::read(p("dir2file")).unwrap(), b"now a file");
        assert_eq!(names(&p("file2dir")), ["c"]);
        let big = fs::metadata(p("big")).unwrap();
        assert_eq!(big.ino(), fs::metadata(p("hard")).unwrap().ino());
        assert_eq!(big.nlink(), 2);
        assert!(
            overlay_artifacts(&root).is_empty(),
            "{:?}",
            overlay_artifacts(&root)
        );
    }

    #[test]
    fn apply_opaque_marker_at_the_root_and_twice() {
        require_root();
        let (_tmp, root) = sandbox();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "x", b"x");
        file(&mut b, "d/y", b"y");
        apply_layer(&finish(b)[..], &root).unwrap();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "d/z", b"z");
        file(&mut b, ".wh..wh..opq", b"");
        file(&mut b, "d/.wh..wh..opq", b"");
        file(&mut b, "d/.wh..wh..opq", b"");
        file(&mut b, "w", b"w");
        // A marker in a directory that does not exist creates nothing.
        file(&mut b, "none/.wh..wh..opq", b"");
        apply_layer(&finish(b)[..], &root).unwrap();
        assert_eq!(names(&root), ["d", "w"]);
        assert_eq!(names(&root.join("d")), ["z"]);
    }

    #[test]
    fn apply_refuses_hostile_entries() {
        require_root();
        let (tmp, root) = sandbox();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"v").unwrap();
        fs::write(tmp.path().join("x"), b"sibling").unwrap();
        // Symlinks left by a lower layer.
        let mut b = Builder::new(Vec::new());
        link(&mut b, "lnk", EntryType::Symlink, outside.to_str().unwrap());
        dir(&mut b, "real");
        link(&mut b, "real/up", EntryType::Symlink, "../..");
        apply_layer(&finish(b)[..], &root).unwrap();

        let one = |name: &[u8], kind: EntryType, target: &[u8]| {
            let mut b = Builder::new(Vec::new());
            raw(&mut b, name, kind, target, 0o644, 0, 0, b"data");
            finish(b)
        };
        let abs = tmp.path().join("abs");
        for (tar, needle) in [
            (one(b"lnk/x", EntryType::Regular, b""), "symlink"),
            (one(b"real/up/x", EntryType::Regular, b""), "symlink"),
            (one(b"lnk/sub/x", EntryType::Directory, b""), "symlink"),
            (one(b"../x", EntryType::Regular, b""), "'..'"),
            (
                one(abs.as_os_str().as_bytes(), EntryType::Regular, b""),
                "absolute",
            ),
            (one(b"../.wh.x", EntryType::Regular, b""), "'..'"),
            (one(b"real/../../.wh.x", EntryType::Regular, b""), "'..'"),
            (one(b".wh...", EntryType::Regular, b""), "invalid name"),
            (one(b"lnk/.wh.victim", EntryType::Regular, b""), "symlink"),
            (one(b"real/up/.wh.x", EntryType::Regular, b""), "symlink"),
            (one(b"lnk/.wh..wh..opq", EntryType::Regular, b""), "symlink"),
            (one(b"h", EntryType::Link, b"lnk/victim"), "symlink"),
            (one(b"h", EntryType::Link, b"../x"), "'..'"),
            (
                one(b"h", EntryType::Link, b"missing"),
                "does not exist in the tree",
            ),
        ] {
            assert_apply_refused(&tar, &root, needle);
        }
        assert_eq!(names(&outside), ["victim"]);
        assert_eq!(fs::metadata(outside.join("victim")).unwrap().nlink(), 1);
        assert_eq!(fs::read(tmp.path().join("x")).unwrap(), b"sibling");
        assert!(!abs.exists());
        assert_eq!(names(&root), ["lnk", "real"]);
        assert_eq!(names(&root.join("real")), ["up"]);
    }

    #[test]
    fn apply_diff_id_matches_unpack() {
        let mut b = Builder::new(Vec::new());
        file(&mut b, "a", &vec![1u8; 300_000]);
        dir(&mut b, "d");
        let mut tar = finish(b);
        tar.extend(vec![0u8; 10 * 1024]);
        let want = sha(&tar);
        struct Counting<'a>(&'a [u8], usize);
        impl Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n;
                Ok(n)
            }
        }
        for (name, blob) in [
            ("plain", tar.clone()),
            ("gzip", gzip(&tar)),
            ("zstd", zstd_compress(&tar)),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut reader = Counting(&blob, 0);
            let applied = apply_layer(&mut reader, tmp.path()).unwrap();
            assert_eq!(reader.1, blob.len(), "{name}: not read to its end");
            let tmp2 = tempfile::tempdir().unwrap();
            let unpacked = unpack_layer(&blob[..], tmp2.path()).unwrap();
            assert_eq!(applied, unpacked, "{name}");
            assert_eq!(applied.diff_id, want, "{name}");
            assert_eq!(applied.uncompressed_size, tar.len() as u64, "{name}");
            assert_eq!(names(tmp.path()), ["a", "d"], "{name}");
        }
    }

    /// A root-level removal must not leave the parent cache pointing into what it removed.
    #[test]
    fn removals_do_not_leave_a_stale_parent() {
        require_root();
        let (_tmp, root) = sandbox();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "a/b/f", b"f");
        file(&mut b, ".wh.a", b"");
        file(&mut b, "a/b/x", b"x");
        apply_layer(&finish(b)[..], &root).unwrap();
        assert_eq!(names(&root), ["a"]);
        assert_eq!(names(&root.join("a/b")), ["x"]);

        let (_tmp, root) = sandbox();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "a/b/f", b"f");
        file(&mut b, "a", b"now a file");
        file(&mut b, "a/b/x", b"x");
        let tar = finish(b);
        assert_apply_refused(&tar, &root, "not a directory");
        let (_tmp, dest) = sandbox();
        assert_refused(&tar, &dest, "not a directory");
    }
}
