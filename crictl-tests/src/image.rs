//! Test images built from host binaries, and a small OCI distribution client to push them.
//!
//! - [`LayerBuilder`] writes a layer tar in memory (regular files, dirs, symlinks, hardlinks,
//!   whiteouts, opaque markers, xattrs, host files, and raw hostile entries) and compresses it
//!   ([`Compression`]) into a [`Layer`].
//! - [`ImageBuilder`] holds layers plus the image config and builds an [`Image`] (manifest,
//!   config, layers, digests) in OCI or Docker schema 2 format ([`ManifestFormat`]).
//! - [`Index`] is a multi-platform OCI index or Docker manifest list over several images.
//! - [`RegistryClient`] (and the free functions [`push_image`], [`push_index`],
//!   [`push_raw_manifest`], [`push_blob`]) pushes to a registry over plain HTTP with the OCI
//!   distribution API: `HEAD` blob, `POST` upload, `PUT <location>&digest=`, `PUT` manifest.
//!
//! Ready-made images: [`busybox_image`] (multi-layer, exercises hardlinks, whiteouts, opaque dirs,
//! setuid, xattrs, users), [`big_image`] (for benchmarks) and the platform-index helpers
//! [`multi_platform_index`], [`single_platform_index`] and [`foreign_platform`].
//!
//! Everything is deterministic: fixed mtimes, entries in insertion order, fixed `created`
//! timestamps and gzip headers without a time, so digests are stable across runs (as long as the
//! host files copied in do not change).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker uncompressed layer media type.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker zstd layer media type (not in the Docker spec; the name containerd uses).
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// Every manifest media type, for `Accept` headers.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The mtime of every entry written by [`LayerBuilder`] (2023-11-14T22:13:20Z).
pub const LAYER_MTIME: u64 = 1_700_000_000;
/// The `created` time of every config and history entry.
pub const CREATED: &str = "2023-11-14T22:13:20Z";

/// The busybox applets [`busybox_image`] links to `/bin/busybox` under `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "echo", "sleep", "true", "false", "id", "env", "pwd", "mkdir", "rm",
    "touch", "stat", "ps", "wc", "head", "tail", "grep", "test", "whoami", "uname", "hostname",
    "ln", "readlink", "printf", "mount", "kill", "cp", "mv", "chmod", "date", "sync", "df", "du",
    "ip", "ifconfig", "nc", "wget", "getfattr", "setfattr", "dd", "find", "xargs", "sed", "tee",
    "yes", "nproc", "free", "top",
];

/// The `sha256:<hex>` digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (flate2, default level, no mtime in the header).
    Gzip,
    /// zstd (level 3).
    Zstd,
}

/// Which manifest family an image or index uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ManifestFormat {
    /// OCI image manifest / OCI image index.
    Oci,
    /// Docker image manifest v2 schema 2 / Docker manifest list.
    Docker2,
}

impl ManifestFormat {
    /// Media type of an image manifest in this format.
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_MANIFEST,
            ManifestFormat::Docker2 => DOCKER_MANIFEST,
        }
    }

    /// Media type of an index / manifest list in this format.
    pub fn index_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_INDEX,
            ManifestFormat::Docker2 => DOCKER_MANIFEST_LIST,
        }
    }

    /// Media type of the image config in this format.
    pub fn config_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_CONFIG,
            ManifestFormat::Docker2 => DOCKER_CONFIG,
        }
    }

    /// Media type of a layer compressed with `compression` in this format.
    pub fn layer_media_type(self, compression: Compression) -> &'static str {
        match (self, compression) {
            (ManifestFormat::Oci, Compression::None) => OCI_LAYER_TAR,
            (ManifestFormat::Oci, Compression::Gzip) => OCI_LAYER_GZIP,
            (ManifestFormat::Oci, Compression::Zstd) => OCI_LAYER_ZSTD,
            (ManifestFormat::Docker2, Compression::None) => DOCKER_LAYER_TAR,
            (ManifestFormat::Docker2, Compression::Gzip) => DOCKER_LAYER_GZIP,
            (ManifestFormat::Docker2, Compression::Zstd) => DOCKER_LAYER_ZSTD,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// A tar entry with arbitrary, unvalidated header fields, for hostile-layer tests.
///
/// The name and link name are written into the header bytes as given (`../x`, `/abs`, NUL-free
/// garbage), bypassing the `tar` crate's path checks. Longer than 100 bytes, they also go into a
/// PAX `path` / `linkpath` record (the header keeps the first 100 bytes).
#[derive(Clone, Debug)]
pub struct RawEntry {
    /// Header name bytes.
    pub name: Vec<u8>,
    /// Header link-name bytes (symlink target or hardlink source).
    pub link_name: Vec<u8>,
    /// Header type flag: `b'0'` file, `b'1'` hardlink, `b'2'` symlink, `b'3'` char device,
    /// `b'4'` block device, `b'5'` dir, `b'6'` fifo, or anything else.
    pub entry_type: u8,
    /// Mode bits, setuid/setgid/sticky included.
    pub mode: u32,
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// Device numbers for char/block devices.
    pub device: Option<(u32, u32)>,
    /// Entry contents; the header size is `data.len()`.
    pub data: Vec<u8>,
    /// Extra PAX records written in an `x` header before this entry.
    pub pax: Vec<(String, Vec<u8>)>,
}

impl RawEntry {
    /// An entry named `name` of type `entry_type`, mode 0644, root-owned, empty.
    pub fn new(name: impl Into<Vec<u8>>, entry_type: u8) -> Self {
        RawEntry {
            name: name.into(),
            link_name: Vec::new(),
            entry_type,
            mode: 0o644,
            uid: 0,
            gid: 0,
            device: None,
            data: Vec::new(),
            pax: Vec::new(),
        }
    }

    /// Sets the link name.
    pub fn link(mut self, link_name: impl Into<Vec<u8>>) -> Self {
        self.link_name = link_name.into();
        self
    }

    /// Sets the contents.
    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = data.into();
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(Bytes),
    HostFile(PathBuf, Option<u32>),
    Symlink(String),
    Hardlink(String),
    Raw(RawEntry),
}

#[derive(Clone, Debug)]
struct Entry {
    path: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Builds one layer tar in memory. Entries are written in the order they are added (so a test
/// controls, e.g., whether a hardlink comes before its target); paths are made relative (the
/// leading `/` is dropped), as in images built by Docker and BuildKit.
#[derive(Clone, Debug, Default)]
pub struct LayerBuilder {
    entries: Vec<Entry>,
    errors: Vec<String>,
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, path: &str, kind: Kind, mode: u32, uid: u64, gid: u64) -> Self {
        self.entries.push(Entry {
            path: relative(path),
            kind,
            mode,
            uid,
            gid,
            xattrs: Vec::new(),
        });
        self
    }

    /// A root-owned directory.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.push(path, Kind::Dir, mode, 0, 0)
    }

    /// A directory owned by `uid:gid`.
    pub fn dir_owned(self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        self.push(path, Kind::Dir, mode, uid, gid)
    }

    /// A root-owned regular file.
    pub fn file(self, path: &str, contents: &[u8], mode: u32) -> Self {
        self.file_owned(path, contents, mode, 0, 0)
    }

    /// A regular file owned by `uid:gid`.
    pub fn file_owned(self, path: &str, contents: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        self.push(
            path,
            Kind::File(Bytes::copy_from_slice(contents)),
            mode,
            uid,
            gid,
        )
    }

    /// A regular file from an owned buffer (no copy; for big generated contents).
    pub fn file_bytes(self, path: &str, contents: Bytes, mode: u32) -> Self {
        self.push(path, Kind::File(contents), mode, 0, 0)
    }

    /// A symlink `path -> target`; the target is written verbatim.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(path, Kind::Symlink(target.to_owned()), 0o777, 0, 0)
    }

    /// A hardlink `path` to the earlier entry `target` (both relative to the layer root).
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.push(path, Kind::Hardlink(relative(target)), 0o644, 0, 0)
    }

    /// A whiteout deleting `path` from lower layers: an empty file `<parent>/.wh.<name>`.
    pub fn whiteout(self, path: &str) -> Self {
        let rel = relative(path);
        let rel = rel.trim_end_matches('/');
        let wh = match rel.rsplit_once('/') {
            Some((parent, name)) => format!("{parent}/.wh.{name}"),
            None => format!(".wh.{rel}"),
        };
        self.file(&wh, b"", 0o644)
    }

    /// An opaque marker `<dir>/.wh..wh..opq` hiding everything below `dir` in lower layers.
    /// Only the marker is written; add the directory entry itself with [`LayerBuilder::dir`].
    pub fn opaque(self, dir: &str) -> Self {
        let rel = relative(dir);
        let rel = rel.trim_end_matches('/');
        self.file(&format!("{rel}/.wh..wh..opq"), b"", 0o644)
    }

    /// A root-owned copy of a host file (read at [`LayerBuilder::build`]) with the host file's
    /// permission bits, e.g. `host_file("/bin/busybox", "/bin/busybox")`.
    pub fn host_file(self, path: &str, host_path: impl AsRef<Path>) -> Self {
        self.push(
            path,
            Kind::HostFile(host_path.as_ref().to_owned(), None),
            0,
            0,
            0,
        )
    }

    /// Like [`LayerBuilder::host_file`] but with an explicit mode.
    pub fn host_file_mode(self, path: &str, host_path: impl AsRef<Path>, mode: u32) -> Self {
        self.push(
            path,
            Kind::HostFile(host_path.as_ref().to_owned(), Some(mode)),
            mode,
            0,
            0,
        )
    }

    /// Adds an extended attribute to the most recently added entry, written as a PAX
    /// `SCHILY.xattr.<name>` record (what Docker and BuildKit produce).
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        match self.entries.last_mut() {
            Some(entry) => entry.xattrs.push((name.to_owned(), value.to_vec())),
            None => self
                .errors
                .push(format!("xattr {name:?} added before any entry")),
        }
        self
    }

    /// A raw entry written byte for byte; see [`RawEntry`].
    pub fn raw_entry(mut self, entry: RawEntry) -> Self {
        self.entries.push(Entry {
            path: String::new(),
            kind: Kind::Raw(entry),
            mode: 0,
            uid: 0,
            gid: 0,
            xattrs: Vec::new(),
        });
        self
    }

    /// The uncompressed tar.
    pub fn tar(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(err) = self.errors.first() {
            bail!("layer builder: {err}");
        }
        let mut out = tar::Builder::new(Vec::new());
        for entry in &self.entries {
            write_entry(&mut out, entry)
                .with_context(|| format!("write tar entry {:?}", entry.path))?;
        }
        out.into_inner().context("finish tar")
    }

    /// Writes and compresses the layer.
    pub fn build(&self, compression: Compression) -> anyhow::Result<Layer> {
        Layer::from_tar(self.tar()?, compression)
    }
}

fn relative(path: &str) -> String {
    path.trim_start_matches('/').to_owned()
}

struct Fields<'a> {
    name: &'a [u8],
    link: &'a [u8],
    entry_type: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    device: Option<(u32, u32)>,
    pax: Vec<(String, Vec<u8>)>,
}

fn write_entry<W: Write>(out: &mut tar::Builder<W>, entry: &Entry) -> anyhow::Result<()> {
    let mut pax: Vec<(String, Vec<u8>)> = entry
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
        .collect();
    let dir_name;
    let (entry_type, link, data, mode): (u8, &[u8], Bytes, u32) = match &entry.kind {
        Kind::Dir => (b'5', b"", Bytes::new(), entry.mode),
        Kind::File(data) => (b'0', b"", data.clone(), entry.mode),
        Kind::HostFile(host, mode) => {
            let data = std::fs::read(host).with_context(|| format!("read host file {host:?}"))?;
            let mode = match mode {
                Some(mode) => *mode,
                None => {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::metadata(host)
                        .with_context(|| format!("stat host file {host:?}"))?
                        .permissions()
                        .mode()
                        & 0o7777
                }
            };
            (b'0', b"", Bytes::from(data), mode)
        }
        Kind::Symlink(target) => (b'2', target.as_bytes(), Bytes::new(), entry.mode),
        Kind::Hardlink(target) => (b'1', target.as_bytes(), Bytes::new(), entry.mode),
        Kind::Raw(raw) => {
            pax.extend(raw.pax.iter().cloned());
            return write_raw(
                out,
                Fields {
                    name: &raw.name,
                    link: &raw.link_name,
                    entry_type: raw.entry_type,
                    mode: raw.mode,
                    uid: raw.uid,
                    gid: raw.gid,
                    device: raw.device,
                    pax,
                },
                &raw.data,
            );
        }
    };
    // Directory names carry a trailing slash, as Go's archive/tar writes them.
    let name: &[u8] = if entry_type == b'5' && !entry.path.ends_with('/') {
        dir_name = format!("{}/", entry.path);
        dir_name.as_bytes()
    } else {
        entry.path.as_bytes()
    };
    write_raw(
        out,
        Fields {
            name,
            link,
            entry_type,
            mode,
            uid: entry.uid,
            gid: entry.gid,
            device: None,
            pax,
        },
        &data,
    )
}

/// Writes a ustar header with the given bytes (no path validation), preceded by a PAX `x` header
/// when there are PAX records or a name/link longer than the 100-byte fields.
fn write_raw<W: Write>(
    out: &mut tar::Builder<W>,
    f: Fields<'_>,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut pax = f.pax;
    if f.name.len() > 100 {
        pax.push(("path".to_owned(), f.name.to_vec()));
    }
    if f.link.len() > 100 {
        pax.push(("linkpath".to_owned(), f.link.to_vec()));
    }
    if !pax.is_empty() {
        let mut body = Vec::new();
        for (key, value) in &pax {
            body.extend(pax_record(key, value));
        }
        let base = f
            .name
            .rsplit(|b| *b == b'/')
            .find(|s| !s.is_empty())
            .unwrap_or(b"entry");
        let mut pax_name = b"PaxHeaders.0/".to_vec();
        pax_name.extend_from_slice(base);
        let mut header = tar::Header::new_ustar();
        set_bytes(&mut header.as_old_mut().name, &pax_name);
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_mode(0o644);
        header.set_mtime(LAYER_MTIME);
        header.set_size(body.len() as u64);
        header.set_cksum();
        out.append(&header, &body[..])
            .context("append pax header")?;
    }

    let mut header = tar::Header::new_ustar();
    set_bytes(&mut header.as_old_mut().name, f.name);
    set_bytes(&mut header.as_old_mut().linkname, f.link);
    header.set_entry_type(tar::EntryType::new(f.entry_type));
    header.set_mode(f.mode);
    header.set_uid(f.uid);
    header.set_gid(f.gid);
    header.set_mtime(LAYER_MTIME);
    header.set_size(data.len() as u64);
    if let Some((major, minor)) = f.device {
        header.set_device_major(major).context("set device major")?;
        header.set_device_minor(minor).context("set device minor")?;
    }
    header.set_cksum();
    out.append(&header, data).context("append entry")?;
    Ok(())
}

/// Copies up to `field.len()` bytes into a NUL-padded header field.
fn set_bytes(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    loop {
        let total = rest + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// A built layer blob.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The (possibly compressed) blob as pushed.
    pub blob: Bytes,
    /// `sha256:` digest of `blob`.
    pub digest: String,
    /// `sha256:` digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// How `blob` is compressed.
    pub compression: Compression,
}

impl Layer {
    /// Compresses an existing tar into a layer.
    pub fn from_tar(tar: Vec<u8>, compression: Compression) -> anyhow::Result<Layer> {
        let diff_id = sha256_digest(&tar);
        let blob = match compression {
            Compression::None => tar,
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(&tar).context("gzip layer")?;
                enc.finish().context("finish gzip")?
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).context("zstd layer")?,
        };
        Ok(Layer {
            digest: sha256_digest(&blob),
            blob: Bytes::from(blob),
            diff_id,
            compression,
        })
    }

    /// The same tar compressed differently (same `diff_id`, new blob and digest).
    pub fn recompress(&self, compression: Compression) -> anyhow::Result<Layer> {
        Layer::from_tar(self.uncompressed()?, compression)
    }

    /// The layer's media type in `format`.
    pub fn media_type(&self, format: ManifestFormat) -> &'static str {
        format.layer_media_type(self.compression)
    }

    /// The blob size in bytes.
    pub fn size(&self) -> usize {
        self.blob.len()
    }

    /// Decompresses the blob back into the tar.
    pub fn uncompressed(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        match self.compression {
            Compression::None => out.extend_from_slice(&self.blob),
            Compression::Gzip => {
                flate2::read::GzDecoder::new(&self.blob[..])
                    .read_to_end(&mut out)
                    .context("gunzip layer")?;
            }
            Compression::Zstd => {
                out = zstd::decode_all(&self.blob[..]).context("unzstd layer")?;
            }
        }
        Ok(out)
    }

    /// Lists the tar entries (PAX `path`/`linkpath` and xattr records applied).
    pub fn entries(&self) -> anyhow::Result<Vec<TarEntry>> {
        list_tar(&self.uncompressed()?)
    }
}

/// One entry of a layer tar, as read back by [`Layer::entries`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Entry path bytes (lossily decoded).
    pub path: String,
    /// Header type flag (`b'0'`, `b'1'`, `b'2'`, `b'5'`, ...).
    pub entry_type: u8,
    /// Link name, for links.
    pub link_name: Option<String>,
    /// Mode bits.
    pub mode: u32,
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// Contents size.
    pub size: u64,
    /// `SCHILY.xattr.*` records, name without the prefix.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Lists the entries of an uncompressed tar.
pub fn list_tar(tar: &[u8]) -> anyhow::Result<Vec<TarEntry>> {
    let mut archive = tar::Archive::new(tar);
    let mut out = Vec::new();
    for entry in archive.entries().context("read tar")? {
        let mut entry = entry.context("read tar entry")?;
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().context("read pax records")? {
            for ext in exts {
                let ext = ext.context("read pax record")?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((
                        String::from_utf8_lossy(name).into_owned(),
                        ext.value_bytes().to_vec(),
                    ));
                }
            }
        }
        let header = entry.header();
        out.push(TarEntry {
            path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
            entry_type: header.entry_type().as_byte(),
            link_name: entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            mode: header.mode().context("read mode")?,
            uid: header.uid().context("read uid")?,
            gid: header.gid().context("read gid")?,
            size: header.size().context("read size")?,
            xattrs,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// An OCI platform (`os`/`architecture`/`variant`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `os`, e.g. `linux`.
    pub os: String,
    /// `architecture` in GOARCH terms: `amd64`, `arm64`, ...
    pub architecture: String,
    /// `variant`, e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/<arch>` without a variant.
    pub fn linux(arch: &str) -> Self {
        Platform {
            os: "linux".to_owned(),
            architecture: arch.to_owned(),
            variant: None,
        }
    }

    /// The platform of this machine (`linux/amd64` on x86_64, `linux/arm64` on aarch64).
    pub fn host() -> Self {
        Platform::linux(goarch(std::env::consts::ARCH))
    }

    /// The JSON `platform` object of an index entry.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn goarch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// A platform that is not this machine's: `linux/arm64`, or `linux/amd64` on an arm64 host.
pub fn foreign_platform() -> Platform {
    if Platform::host().architecture == "arm64" {
        Platform::linux("amd64")
    } else {
        Platform::linux("arm64")
    }
}

/// Layers plus image config; builds an [`Image`]. The fields are public for tests that want to
/// tweak one thing; the methods are shorthands.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// `config.User`.
    pub user: Option<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `config.Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `config.Env`, `KEY=value`.
    pub env: Vec<String>,
    /// `config.WorkingDir`.
    pub working_dir: Option<String>,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
    /// `config.StopSignal`.
    pub stop_signal: Option<String>,
    /// Extra keys merged into the `config` object (`ExposedPorts`, `Volumes`, ...).
    pub extra_config: serde_json::Map<String, Value>,
    /// Image platform (config `os`/`architecture`/`variant`, and the index entry).
    pub platform: Platform,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder {
            layers: Vec::new(),
            user: None,
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            working_dir: None,
            labels: BTreeMap::new(),
            stop_signal: None,
            extra_config: serde_json::Map::new(),
            platform: Platform::host(),
        }
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl ImageBuilder {
    /// An empty image for the host platform.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a layer on top.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Sets `User`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets `Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(strings(args));
        self
    }

    /// Sets `Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(strings(args));
        self
    }

    /// Appends `KEY=value` to `Env`.
    pub fn env(mut self, key_value: &str) -> Self {
        self.env.push(key_value.to_owned());
        self
    }

    /// Sets `WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_owned());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets `StopSignal`.
    pub fn stop_signal(mut self, signal: &str) -> Self {
        self.stop_signal = Some(signal.to_owned());
        self
    }

    /// Sets the platform.
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// The OCI image config JSON (also valid as a Docker image config).
    pub fn config_json(&self) -> Value {
        let mut config = serde_json::Map::new();
        if let Some(user) = &self.user {
            config.insert("User".into(), json!(user));
        }
        if let Some(ep) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(ep));
        }
        if let Some(cmd) = &self.cmd {
            config.insert("Cmd".into(), json!(cmd));
        }
        if !self.env.is_empty() {
            config.insert("Env".into(), json!(self.env));
        }
        if let Some(wd) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(wd));
        }
        if !self.labels.is_empty() {
            config.insert("Labels".into(), json!(self.labels));
        }
        if let Some(sig) = &self.stop_signal {
            config.insert("StopSignal".into(), json!(sig));
        }
        for (k, v) in &self.extra_config {
            config.insert(k.clone(), v.clone());
        }
        let history: Vec<Value> = (0..self.layers.len())
            .map(|i| json!({ "created": CREATED, "created_by": format!("berth-test layer {i}") }))
            .collect();
        let mut v = json!({
            "created": CREATED,
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": config,
            "rootfs": {
                "type": "layers",
                "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": history,
        });
        if let Some(variant) = &self.platform.variant {
            v["variant"] = json!(variant);
        }
        v
    }

    /// Builds the config blob and manifest in `format`.
    ///
    /// Docker schema 2 has no zstd layer type (skopeo and containerd's Docker parsers reject
    /// one), so for [`ManifestFormat::Docker2`] zstd layers are re-compressed with gzip; the
    /// config (diff ids) stays the same. Use [`Image::from_parts`] to force
    /// [`DOCKER_LAYER_ZSTD`].
    pub fn build(&self, format: ManifestFormat) -> anyhow::Result<Image> {
        let config = serde_json::to_vec(&self.config_json()).context("serialize image config")?;
        let layers = match format {
            ManifestFormat::Oci => self.layers.clone(),
            ManifestFormat::Docker2 => self
                .layers
                .iter()
                .map(|l| match l.compression {
                    Compression::Zstd => l.recompress(Compression::Gzip),
                    _ => Ok(l.clone()),
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Image::from_parts(
            format,
            config,
            layers,
            self.platform.clone(),
        ))
    }
}

/// A built image: manifest, config and layers, ready to push.
#[derive(Clone, Debug)]
pub struct Image {
    /// Manifest family.
    pub format: ManifestFormat,
    /// Manifest bytes, exactly as pushed.
    pub manifest: Vec<u8>,
    /// `sha256:` digest of `manifest`.
    pub manifest_digest: String,
    /// Manifest media type.
    pub manifest_media_type: String,
    /// Config blob bytes.
    pub config: Vec<u8>,
    /// `sha256:` digest of `config`.
    pub config_digest: String,
    /// Config media type.
    pub config_media_type: String,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Platform for index entries.
    pub platform: Platform,
}

impl Image {
    /// Builds the manifest around arbitrary config bytes (which need not be valid JSON) and
    /// layers.
    pub fn from_parts(
        format: ManifestFormat,
        config: Vec<u8>,
        layers: Vec<Layer>,
        platform: Platform,
    ) -> Image {
        let config_digest = sha256_digest(&config);
        let manifest_media_type = format.manifest_media_type();
        let config_media_type = format.config_media_type();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": {
                "mediaType": config_media_type,
                "size": config.len(),
                "digest": config_digest,
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type(format),
                "size": l.size(),
                "digest": l.digest,
            })).collect::<Vec<_>>(),
        });
        // Serializing a `Value` built from strings and numbers cannot fail.
        let manifest = manifest.to_string().into_bytes();
        Image {
            format,
            manifest_digest: sha256_digest(&manifest),
            manifest,
            manifest_media_type: manifest_media_type.to_owned(),
            config_digest,
            config,
            config_media_type: config_media_type.to_owned(),
            layers,
            platform,
        }
    }

    /// The index-entry descriptor of this image (with `platform`).
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.manifest_media_type,
            "size": self.manifest.len(),
            "digest": self.manifest_digest,
            "platform": self.platform.to_json(),
        })
    }

    /// Total size of the layer blobs.
    pub fn layers_size(&self) -> usize {
        self.layers.iter().map(Layer::size).sum()
    }
}

/// A multi-platform OCI image index or Docker manifest list.
#[derive(Clone, Debug)]
pub struct Index {
    /// Family.
    pub format: ManifestFormat,
    /// Index bytes, exactly as pushed.
    pub manifest: Vec<u8>,
    /// `sha256:` digest of `manifest`.
    pub digest: String,
    /// Index media type.
    pub media_type: String,
}

impl Index {
    /// An index over `images`, each entry carrying the image's platform.
    pub fn new(format: ManifestFormat, images: &[Image]) -> Index {
        Index::from_descriptors(format, images.iter().map(Image::descriptor).collect())
    }

    /// An index over hand-written descriptors (for odd platforms or dangling entries).
    pub fn from_descriptors(format: ManifestFormat, manifests: Vec<Value>) -> Index {
        let media_type = format.index_media_type();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        })
        .to_string()
        .into_bytes();
        Index {
            format,
            digest: sha256_digest(&manifest),
            manifest,
            media_type: media_type.to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ready-made images
// ---------------------------------------------------------------------------------------------

/// `/etc/passwd` of [`busybox_image`].
pub const BUSYBOX_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    app:x:1000:1000:app:/home/app:/bin/sh\n\
    nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group` of [`busybox_image`].
pub const BUSYBOX_GROUP: &str = "root:x:0:\napp:x:1000:\nnobody:x:65534:\n";
/// `/etc/motd` of [`busybox_image`].
pub const BUSYBOX_MOTD: &str = "welcome to berth\n";

/// Layer 1 of [`busybox_image`]: `/bin/busybox` from the host with applet symlinks
/// ([`BUSYBOX_APPLETS`]), users, base dirs, and the files layer 2 deletes.
pub fn busybox_base_layer() -> LayerBuilder {
    let mut l = LayerBuilder::new().dir("/bin", 0o755).host_file_mode(
        "/bin/busybox",
        "/bin/busybox",
        0o755,
    );
    for applet in BUSYBOX_APPLETS {
        l = l.symlink(&format!("/bin/{applet}"), "busybox");
    }
    l.dir("/etc", 0o755)
        .file("/etc/passwd", BUSYBOX_PASSWD.as_bytes(), 0o644)
        .file("/etc/group", BUSYBOX_GROUP.as_bytes(), 0o644)
        .dir("/tmp", 0o1777)
        .dir("/root", 0o700)
        .dir("/home", 0o755)
        .dir_owned("/home/app", 0o755, 1000, 1000)
        .dir("/usr", 0o755)
        .dir("/usr/bin", 0o755)
        .dir("/var", 0o755)
        .dir("/var/lib", 0o755)
        .dir("/var/lib/gone", 0o755)
        .file("/var/lib/gone/file", b"deleted by layer 2\n", 0o644)
        .dir("/opq", 0o755)
        .file("/opq/old1", b"hidden by the opaque dir\n", 0o644)
        .file("/opq/old2", b"hidden by the opaque dir\n", 0o644)
}

/// A realistic three-layer image for the host platform:
///
/// 1. gzip: [`busybox_base_layer`]: `/bin/busybox` + applet symlinks, `/etc/passwd` (root, `app`
///    uid/gid 1000, nobody), `/etc/group`, `/tmp` (1777), `/root`, `/home/app` (1000:1000),
///    `/var/lib/gone/file`, `/opq/old1`, `/opq/old2`.
/// 2. zstd: `/data/a` and hardlink `/data/b` → `data/a`; whiteout of `/var/lib/gone`; opaque
///    `/opq` with `/opq/new`; setuid `/usr/bin/suid` (04755); `/data/xattr` with
///    `user.berth=test`; `/data/owned` owned by 1000:1000 mode 0600.
/// 3. plain tar: `/etc/motd` ([`BUSYBOX_MOTD`]).
///
/// Config: User `app`, Entrypoint `["/bin/sh","-c"]`, Cmd `["echo hello"]`,
/// Env `PATH=/bin:/usr/bin`, `GREETING=hi`, WorkingDir `/home/app`, label
/// `org.berth.test=busybox`.
pub fn busybox_image() -> anyhow::Result<ImageBuilder> {
    let layer1 = busybox_base_layer()
        .build(Compression::Gzip)
        .context("build busybox layer 1")?;
    let layer2 = LayerBuilder::new()
        .dir("/data", 0o755)
        .file("/data/a", b"hardlinked content\n", 0o644)
        .hardlink("/data/b", "/data/a")
        .file("/data/xattr", b"has an xattr\n", 0o644)
        .xattr("user.berth", b"test")
        .file_owned("/data/owned", b"private\n", 0o600, 1000, 1000)
        .whiteout("/var/lib/gone")
        .dir("/opq", 0o755)
        .opaque("/opq")
        .file("/opq/new", b"new\n", 0o644)
        .dir("/usr", 0o755)
        .dir("/usr/bin", 0o755)
        .file("/usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755)
        .build(Compression::Zstd)
        .context("build busybox layer 2")?;
    let layer3 = LayerBuilder::new()
        .dir("/etc", 0o755)
        .file("/etc/motd", BUSYBOX_MOTD.as_bytes(), 0o644)
        .build(Compression::None)
        .context("build busybox layer 3")?;
    Ok(ImageBuilder::new()
        .layer(layer1)
        .layer(layer2)
        .layer(layer3)
        .user("app")
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo hello"])
        .env("PATH=/bin:/usr/bin")
        .env("GREETING=hi")
        .working_dir("/home/app")
        .label("org.berth.test", "busybox"))
}

/// [`busybox_image`] for `platform`, plus a top layer with `/etc/berth-platform` holding
/// `"<platform>\n"` so that each platform's image has distinct layers and config. The binary is
/// still the host's busybox: only the host platform's variant runs.
pub fn platform_image(platform: &Platform) -> anyhow::Result<ImageBuilder> {
    let marker = LayerBuilder::new()
        .dir("/etc", 0o755)
        .file(
            "/etc/berth-platform",
            format!("{platform}\n").as_bytes(),
            0o644,
        )
        .build(Compression::Gzip)
        .context("build platform marker layer")?;
    Ok(busybox_image()?
        .layer(marker)
        .platform(platform.clone())
        .label("org.berth.platform", &platform.to_string()))
}

/// An index with one [`platform_image`] per platform in `platforms`; returns the index and the
/// images to push with it ([`push_index`]).
pub fn platform_index(
    platforms: &[Platform],
    format: ManifestFormat,
) -> anyhow::Result<(Index, Vec<Image>)> {
    let images = platforms
        .iter()
        .map(|p| platform_image(p)?.build(format))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((Index::new(format, &images), images))
}

/// A `linux/amd64` + `linux/arm64` index (plus the host platform if it is neither). The entry for
/// the host platform runs; the others carry the same host binary but a different config arch
/// and `/etc/berth-platform`.
pub fn multi_platform_index(format: ManifestFormat) -> anyhow::Result<(Index, Vec<Image>)> {
    let mut platforms = vec![Platform::linux("amd64"), Platform::linux("arm64")];
    let host = Platform::host();
    if !platforms.contains(&host) {
        platforms.push(host);
    }
    platform_index(&platforms, format)
}

/// An index with a single entry for `platform`; with [`foreign_platform`] this is the
/// "arm64-only" image no host-platform pull may resolve.
pub fn single_platform_index(
    platform: &Platform,
    format: ManifestFormat,
) -> anyhow::Result<(Index, Vec<Image>)> {
    platform_index(std::slice::from_ref(platform), format)
}

/// A `linux/arm64`-only index (see [`single_platform_index`]).
pub fn arm64_only_index(format: ManifestFormat) -> anyhow::Result<(Index, Vec<Image>)> {
    single_platform_index(&Platform::linux("arm64"), format)
}

/// Deterministic PRNG (splitmix64) for generated contents.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `len` bytes from `seed`, about half compressible: each 8 KiB block is 4 KiB of random bytes
/// followed by 4 KiB of repeated text.
pub fn generated_content(seed: u64, len: usize) -> Vec<u8> {
    const TEXT: &[u8] =
        b"berth benchmark filler line: the quick brown fox jumps over the lazy dog\n";
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        for _ in 0..512 {
            out.extend_from_slice(&rng.next().to_le_bytes());
        }
        let start = (rng.next() % TEXT.len() as u64) as usize;
        out.extend(TEXT.iter().cycle().skip(start).take(4096));
    }
    out.truncate(len);
    out
}

/// An image of about `total_mb` MiB (uncompressed) in `layers` gzip layers of generated files
/// ([`generated_content`], files of at most 4 MiB under `/big/l<i>/`) on top of
/// [`busybox_base_layer`], so containers from it can run `/bin/sh`. Layers are generated in
/// parallel and streamed ([`generated_layer`]): memory holds only the compressed blobs (about
/// half of `total_mb`).
pub fn big_image(total_mb: usize, layers: usize) -> anyhow::Result<ImageBuilder> {
    const FILE_MAX: usize = 4 << 20;
    let layers = layers.max(1);
    let per_layer = (total_mb << 20) / layers;
    let base = busybox_base_layer()
        .build(Compression::Gzip)
        .context("build base layer")?;
    let built: Vec<anyhow::Result<Layer>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..layers)
            .map(|i| {
                s.spawn(move || {
                    generated_layer(i as u64, per_layer, FILE_MAX)
                        .with_context(|| format!("build big layer {i}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("layer thread panicked")))
            })
            .collect()
    });
    let mut image = ImageBuilder::new()
        .layer(base)
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["sleep 3600"])
        .env("PATH=/bin:/usr/bin")
        .label("org.berth.test", "big");
    for layer in built {
        image = image.layer(layer?);
    }
    Ok(image)
}

/// A `Write` that hashes what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A gzip layer of `bytes` bytes of [`generated_content`] in files of at most `file_max` bytes
/// under `/big/l<seed>/`, streamed: only the compressed blob is kept in memory.
pub fn generated_layer(seed: u64, bytes: usize, file_max: usize) -> anyhow::Result<Layer> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut out = tar::Builder::new(HashingWriter {
        inner: enc,
        hasher: Sha256::new(),
    });
    let dir = |name: String| Entry {
        path: name,
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        xattrs: Vec::new(),
    };
    write_entry(&mut out, &dir("big".to_owned()))?;
    write_entry(&mut out, &dir(format!("big/l{seed}")))?;
    let mut left = bytes;
    let mut j = 0u64;
    while left > 0 {
        let n = left.min(file_max.max(1));
        let data = generated_content((seed << 32) | j, n);
        let name = format!("big/l{seed}/f{j}");
        write_raw(
            &mut out,
            Fields {
                name: name.as_bytes(),
                link: b"",
                entry_type: b'0',
                mode: 0o644,
                uid: 0,
                gid: 0,
                device: None,
                pax: Vec::new(),
            },
            &data,
        )?;
        left -= n;
        j += 1;
    }
    let hashing = out.into_inner().context("finish tar")?;
    let diff_id = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    let blob = hashing.inner.finish().context("finish gzip")?;
    Ok(Layer {
        digest: sha256_digest(&blob),
        blob: Bytes::from(blob),
        diff_id,
        compression: Compression::Gzip,
    })
}

// ---------------------------------------------------------------------------------------------
// Registry client
// ---------------------------------------------------------------------------------------------

/// A manifest as served by the registry.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// Body bytes.
    pub bytes: Bytes,
    /// `Content-Type` header.
    pub content_type: String,
    /// `Docker-Content-Digest` header, if present.
    pub digest: Option<String>,
}

/// A minimal OCI distribution client over plain HTTP, for pushing test images and checking what
/// the registry serves. Optional HTTP Basic credentials or a bearer token are sent on every
/// request.
#[derive(Clone, Debug)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    auth: Option<ClientAuth>,
}

/// What [`RegistryClient`] sends as `Authorization`.
#[derive(Clone, Debug)]
enum ClientAuth {
    Basic(String, String),
    Bearer(String),
}

impl RegistryClient {
    /// A client for the registry at `addr` (`127.0.0.1:PORT`).
    pub fn new(addr: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
            .build()
            .context("build http client")?;
        Ok(RegistryClient {
            base: format!("http://{addr}"),
            http,
            auth: None,
        })
    }

    /// Sends `user`/`pass` as HTTP Basic credentials on every request.
    pub fn with_basic_auth(mut self, user: &str, pass: &str) -> Self {
        self.auth = Some(ClientAuth::Basic(user.to_owned(), pass.to_owned()));
        self
    }

    /// Sends `Authorization: Bearer <token>` on every request (replacing Basic credentials), for
    /// registries with token auth. The token must cover every action the requests need (a push
    /// needs `pull,push` on the repository).
    pub fn with_bearer_token(mut self, token: &str) -> Self {
        self.auth = Some(ClientAuth::Bearer(token.to_owned()));
        self
    }

    /// A request to `http://addr<path>` (`path` starts with `/v2/`), with credentials.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_url(method, &format!("{}{path}", self.base))
    }

    fn request_url(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some(ClientAuth::Basic(user, pass)) => req.basic_auth(user, Some(pass)),
            Some(ClientAuth::Bearer(token)) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Whether blob `digest` exists in `repo` (`HEAD /v2/<repo>/blobs/<digest>`).
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> anyhow::Result<bool> {
        let resp = self
            .request(reqwest::Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .with_context(|| format!("HEAD blob {digest}"))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            code => bail!("HEAD blob {digest}: unexpected status {code}"),
        }
    }

    /// Uploads `bytes` as a blob unless it exists; returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: Bytes) -> anyhow::Result<String> {
        let digest = sha256_digest(&bytes);
        if !self.blob_exists(repo, &digest).await? {
            self.upload_blob(repo, &digest, bytes).await?;
        }
        Ok(digest)
    }

    /// Uploads `bytes` claiming `digest` (which may be wrong, for hostile tests): `POST` an
    /// upload session, then `PUT <location>?digest=`.
    pub async fn upload_blob(&self, repo: &str, digest: &str, bytes: Bytes) -> anyhow::Result<()> {
        let resp = self
            .request(reqwest::Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .context("start blob upload")?;
        let status = resp.status();
        if status.as_u16() != 202 {
            bail!(
                "start blob upload in {repo}: status {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .context("upload response without Location")?
            .to_str()
            .context("non-ASCII Location")?;
        let base = reqwest::Url::parse(&self.base).context("parse base url")?;
        let mut url = base
            .join(location)
            .with_context(|| format!("resolve upload location {location:?}"))?;
        url.query_pairs_mut().append_pair("digest", digest);
        let resp = self
            .request_url(reqwest::Method::PUT, url.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .with_context(|| format!("upload blob {digest}"))?;
        let status = resp.status();
        if status.as_u16() != 201 {
            bail!(
                "upload blob {digest} to {repo}: status {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `media_type`; returns the registry's
    /// `Docker-Content-Digest` (or the computed digest if the header is missing).
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> anyhow::Result<String> {
        let resp = self
            .request(
                reqwest::Method::PUT,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .with_context(|| format!("put manifest {repo}:{reference}"))?;
        let status = resp.status();
        if status.as_u16() != 201 {
            bail!(
                "put manifest {repo}:{reference}: status {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| sha256_digest(bytes)))
    }

    /// Pushes the config and layer blobs, then the manifest under `reference` (a tag, or the
    /// manifest digest to push it untagged).
    pub async fn push_image(
        &self,
        repo: &str,
        reference: &str,
        image: &Image,
    ) -> anyhow::Result<()> {
        self.push_blob(repo, Bytes::from(image.config.clone()))
            .await
            .context("push config")?;
        for layer in &image.layers {
            if !self.blob_exists(repo, &layer.digest).await? {
                self.upload_blob(repo, &layer.digest, layer.blob.clone())
                    .await
                    .with_context(|| format!("push layer {}", layer.digest))?;
            }
        }
        self.push_manifest(repo, reference, &image.manifest_media_type, &image.manifest)
            .await?;
        Ok(())
    }

    /// Pushes every image by digest, then the index under `tag`.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        index: &Index,
        images: &[Image],
    ) -> anyhow::Result<()> {
        for image in images {
            self.push_image(repo, &image.manifest_digest, image)
                .await
                .with_context(|| format!("push {} image", image.platform))?;
        }
        self.push_manifest(repo, tag, &index.media_type, &index.manifest)
            .await?;
        Ok(())
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type; `None` on 404.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<Option<FetchedManifest>> {
        let resp = self
            .request(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .with_context(|| format!("get manifest {repo}:{reference}"))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            code => bail!("get manifest {repo}:{reference}: status {code}"),
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let digest = header("docker-content-digest");
        let bytes = resp.bytes().await.context("read manifest body")?;
        Ok(Some(FetchedManifest {
            bytes,
            content_type,
            digest,
        }))
    }

    /// `GET /v2/<repo>/blobs/<digest>`; `None` on 404.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Option<Bytes>> {
        let resp = self
            .request(reqwest::Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .with_context(|| format!("get blob {digest}"))?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp.bytes().await.context("read blob body")?)),
            404 => Ok(None),
            code => bail!("get blob {digest}: status {code}"),
        }
    }

    /// `DELETE /v2/<repo>/manifests/<digest>` (the test registry has deletes enabled).
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> anyhow::Result<()> {
        let resp = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v2/{repo}/manifests/{digest}"),
            )
            .send()
            .await
            .with_context(|| format!("delete manifest {digest}"))?;
        if resp.status().as_u16() != 202 {
            bail!("delete manifest {digest}: status {}", resp.status());
        }
        Ok(())
    }

    /// `DELETE /v2/<repo>/blobs/<digest>`.
    pub async fn delete_blob(&self, repo: &str, digest: &str) -> anyhow::Result<()> {
        let resp = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v2/{repo}/blobs/{digest}"),
            )
            .send()
            .await
            .with_context(|| format!("delete blob {digest}"))?;
        if resp.status().as_u16() != 202 {
            bail!("delete blob {digest}: status {}", resp.status());
        }
        Ok(())
    }

    /// The tags of `repo` (`GET /v2/<repo>/tags/list`).
    pub async fn tags(&self, repo: &str) -> anyhow::Result<Vec<String>> {
        let resp = self
            .request(reqwest::Method::GET, &format!("/v2/{repo}/tags/list"))
            .send()
            .await
            .context("list tags")?;
        if !resp.status().is_success() {
            bail!("list tags of {repo}: status {}", resp.status());
        }
        let body: Value = serde_json::from_slice(&resp.bytes().await.context("read tags")?)
            .context("parse tag list")?;
        Ok(body["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Pushes `image` to the anonymous registry at `registry_addr` as `repo:reference`; see
/// [`RegistryClient::push_image`].
pub async fn push_image(
    registry_addr: &str,
    repo: &str,
    reference: &str,
    image: &Image,
) -> anyhow::Result<()> {
    RegistryClient::new(registry_addr)?
        .push_image(repo, reference, image)
        .await
}

/// Pushes `images` by digest and `index` as `repo:tag`; see [`RegistryClient::push_index`].
pub async fn push_index(
    registry_addr: &str,
    repo: &str,
    tag: &str,
    index: &Index,
    images: &[Image],
) -> anyhow::Result<()> {
    RegistryClient::new(registry_addr)?
        .push_index(repo, tag, index, images)
        .await
}

/// Pushes arbitrary manifest bytes under `reference` with `media_type`; returns the digest.
/// Note the registry itself validates manifests it knows (referenced blobs must exist).
pub async fn push_raw_manifest(
    registry_addr: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> anyhow::Result<String> {
    RegistryClient::new(registry_addr)?
        .push_manifest(repo, reference, media_type, bytes)
        .await
}

/// Pushes one blob; returns its digest.
pub async fn push_blob(
    registry_addr: &str,
    repo: &str,
    bytes: impl Into<Bytes>,
) -> anyhow::Result<String> {
    RegistryClient::new(registry_addr)?
        .push_blob(repo, bytes.into())
        .await
}
