//! Images in and out of tar archives: `docker save` archives (Docker's `manifest.json` layout,
//! with an OCI `index.json` and `oci-layout` beside it, as docker ≥ 25 writes them), loading
//! those or plain OCI layout tars, importing a rootfs tar as a one-layer image, and tagging.
//!
//! Loading reads an archive that is already on disk (the API streams the upload there first):
//! everything is located and checked (paths, JSON, that every blob is there) before anything is
//! written, layers are unpacked through the same snapshot path as pulls, and the image records
//! are stored last, in one go per image. A failure leaves only unreferenced content behind,
//! which the lease-aware GC removes: nothing half-imported is ever visible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use api::Digest;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use snapshotter::DiffMode;

use super::reference::Reference;
use super::{
    DOCKER_CONFIG, EXTRACT_PREFIX, ImageManager, ImageRecord, LAYER_TYPES, LayerRecord, Lease,
    MAX_LAYERS, NamedImage, OCI_CONFIG, chain_ids, is_index, registry, resolve_in, sha256, syncfs,
    total_size, unpack,
};
use crate::error::{Error, Result};

/// Largest JSON file (manifest.json, index.json, a manifest or config) read from an archive.
pub const MAX_ARCHIVE_JSON: u64 = 4 << 20;
/// Most entries an archive may have: a save of many images has a few per layer.
const MAX_ENTRIES: usize = 100_000;
/// Bytes of entry names (and link targets) an archive's index may hold: the index is in
/// memory, and each name may be up to 4 KiB.
const MAX_NAME_BYTES: usize = 32 << 20;
/// Symlinks followed to find one file (docker's legacy layout links shared layers).
const MAX_LINKS: usize = 8;
/// Bytes buffered before a chunk of a saved archive goes to the client.
const SAVE_CHUNK: usize = 256 << 10;

const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The annotation containerd and docker put the full image name in.
const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation for a reference (a tag, or a full name as docker writes it).
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("invalid archive: {msg}"))
}

/// An archive entry: file data at an offset, or a link to another entry.
#[derive(Debug, Clone)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// The entries of an archive on disk, by normalised path.
pub struct Archive {
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

/// A link target `target` of the entry `from`, resolved inside the archive: `..` may climb
/// up to the archive's root but not past it (docker's legacy layout links `../<id>/layer.tar`).
fn resolve_link(from_dir: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = from_dir.split('/').filter(|c| !c.is_empty()).collect();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// `./a//b/` → `a/b`; None for absolute paths and `..` (entries must stay inside).
fn normalise(p: &str) -> Option<String> {
    if p.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// Adds one entry of an archive being opened to its index.
fn index_entry<R: Read>(
    entries: &mut HashMap<String, Entry>,
    name_bytes: &mut usize,
    e: &tar::Entry<'_, R>,
    names: snapshotter::unpack::EntryNames,
) -> Result<()> {
    let raw = String::from_utf8_lossy(&names.path).into_owned();
    let name = normalise(&raw).ok_or_else(|| {
        bad(format_args!(
            "entry {raw:?} points outside the archive (path traversal)"
        ))
    })?;
    let kind = e.header().entry_type();
    let entry = match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => Entry::File {
            offset: e.raw_file_position(),
            size: e.size(),
        },
        tar::EntryType::Symlink | tar::EntryType::Link => {
            let target = names
                .link
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            // Symlinks are relative to their directory, hard links to the root.
            let dir = if kind == tar::EntryType::Symlink {
                name.rsplit_once('/').map_or("", |(d, _)| d)
            } else {
                ""
            };
            Entry::Link(resolve_link(dir, &target).ok_or_else(|| {
                bad(format_args!(
                    "link {raw:?} → {target:?} points outside the archive (path traversal)"
                ))
            })?)
        }
        tar::EntryType::Directory => return Ok(()),
        other => {
            return Err(bad(format_args!(
                "entry {raw:?} is a {other:?}, not a file"
            )));
        }
    };
    *name_bytes += name.len()
        + match &entry {
            Entry::Link(t) => t.len(),
            Entry::File { .. } => 0,
        };
    entries.insert(name, entry);
    if entries.len() > MAX_ENTRIES {
        return Err(bad(format_args!("more than {MAX_ENTRIES} entries")));
    }
    if *name_bytes > MAX_NAME_BYTES {
        return Err(bad(format_args!(
            "its entry names add up to more than {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

impl Archive {
    /// Indexes the tar at `path`; refuses entries that escape it and kinds that have no place
    /// in an image archive.
    pub fn open(path: &Path) -> Result<Archive> {
        let f = File::open(path).map_err(|e| Error::internal("open archive", e))?;
        let mut entries = HashMap::new();
        let mut name_bytes = 0usize;
        let mut refused: Option<Error> = None;
        // The layer unpacker's walk: long names and PAX records are size-checked before they
        // are read, where the tar crate's own would read any size into memory.
        let walked = snapshotter::unpack::for_each_entry(f, |e, names| {
            index_entry(&mut entries, &mut name_bytes, e, names).map_err(|err| {
                refused = Some(err);
                snapshotter::Error::ReadLayer(std::io::Error::other("entry refused"))
            })
        });
        if let Some(err) = refused {
            return Err(err);
        }
        walked.map_err(|e| {
            bad(format_args!(
                "not a tar archive: {}",
                crate::error::chain(&e)
            ))
        })?;
        Ok(Archive {
            path: path.to_owned(),
            entries,
        })
    }

    /// Where the file `name` lies: (offset, size), following links.
    fn locate(&self, name: &str) -> Result<Option<(u64, u64)>> {
        let Some(mut cur) = normalise(name) else {
            return Err(bad(format_args!(
                "{name:?} points outside the archive (path traversal)"
            )));
        };
        for _ in 0..MAX_LINKS {
            match self.entries.get(&cur) {
                None => return Ok(None),
                Some(Entry::File { offset, size }) => return Ok(Some((*offset, *size))),
                Some(Entry::Link(t)) => cur = t.clone(),
            }
        }
        Err(bad(format_args!("too many links to reach {name:?}")))
    }

    fn has(&self, name: &str) -> bool {
        self.locate(name).is_ok_and(|l| l.is_some())
    }

    /// A reader of file `name`.
    fn reader(&self, name: &str) -> Result<std::io::Take<File>> {
        let (offset, size) = self
            .locate(name)?
            .ok_or_else(|| bad(format_args!("{name} is missing")))?;
        let mut f = File::open(&self.path).map_err(|e| Error::internal("open archive", e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::internal("seek in archive", e))?;
        Ok(f.take(size))
    }

    /// A small (JSON) file, whole; refused past [`MAX_ARCHIVE_JSON`].
    fn small(&self, name: &str) -> Result<Vec<u8>> {
        let (_, size) = self
            .locate(name)?
            .ok_or_else(|| bad(format_args!("{name} is missing")))?;
        if size > MAX_ARCHIVE_JSON {
            return Err(bad(format_args!(
                "{name} is too large ({size} bytes; at most {MAX_ARCHIVE_JSON})"
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.reader(name)?
            .read_to_end(&mut buf)
            .map_err(|e| Error::internal("read archive", e))?;
        Ok(buf)
    }
}

/// A compressed archive may expand to this many times its size on disk…
const EXPAND_RATIO: u64 = 32;
/// …or to this many bytes, whichever is more.
const MIN_EXPAND_LIMIT: u64 = 1 << 30;

/// The most bytes a compressed archive of `compressed` bytes may expand to: a decompression
/// bomb must not fill the root's disk.
fn expand_limit(compressed: u64) -> u64 {
    compressed
        .saturating_mul(EXPAND_RATIO)
        .max(MIN_EXPAND_LIMIT)
}

/// Decompresses the (gzip or zstd) archive at `from` into `to`, refusing it once it passes
/// `limit` bytes.
fn expand(from: &Path, to: &Path, limit: u64) -> Result<()> {
    let f = File::open(from).map_err(|e| Error::internal("open archive", e))?;
    let r =
        snapshotter::unpack::decompressed(f).map_err(|e| bad(format_args!("decompress: {e}")))?;
    let mut w = File::create(to).map_err(|e| Error::internal("expand archive", e))?;
    let n = std::io::copy(&mut r.take(limit.saturating_add(1)), &mut w)
        .map_err(|e| bad(format_args!("decompress: {e}")))?;
    if n > limit {
        return Err(bad(format_args!(
            "it expands to more than {limit} bytes (at most {EXPAND_RATIO} times its compressed size, or {MIN_EXPAND_LIMIT} bytes)"
        )));
    }
    Ok(())
}

/// A scratch file, removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| bad(format_args!("{what}: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    media_type: String,
    digest: Digest,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<super::Platform>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

/// One layer to bring in: where its blob is, and what is known of it.
struct PlannedLayer {
    path: String,
    /// Known from an OCI manifest; hashed from the archive otherwise.
    digest: Option<Digest>,
    media_type: Option<String>,
}

/// One image of an archive, checked, ready to import.
struct Planned {
    config: Vec<u8>,
    diff_ids: Vec<Digest>,
    user: String,
    /// The manifest blob (OCI layouts); one is written for legacy archives.
    manifest: Option<(Digest, String, Vec<u8>)>,
    layers: Vec<PlannedLayer>,
    refs: Vec<String>,
}

/// What a load brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The image id.
    pub id: Digest,
    /// The names it got, normalised (`docker.io/library/busybox:latest`).
    pub tags: Vec<String>,
}

/// The normalised form of a tag; InvalidArgument when it is not one.
fn tag_ref(tag: &str) -> Result<String> {
    let r =
        Reference::parse(tag).map_err(|e| bad(format_args!("invalid image name {tag:?}: {e}")))?;
    if r.digest().is_some() {
        return Err(bad(format_args!("{tag:?} is a digest, not a tag")));
    }
    Ok(r.to_string())
}

#[derive(Deserialize)]
struct ConfigCheck {
    #[serde(default)]
    config: Option<ConfigUser>,
    rootfs: super::RootFs,
}

#[derive(Deserialize)]
struct ConfigUser {
    #[serde(rename = "User", default)]
    user: Option<String>,
}

fn check_config(what: &str, bytes: &[u8], layers: usize) -> Result<(Vec<Digest>, String)> {
    let c: ConfigCheck = parse_json(what, bytes)?;
    if layers > MAX_LAYERS {
        return Err(bad(format_args!(
            "{what}: {layers} layers; at most {MAX_LAYERS} are allowed"
        )));
    }
    if c.rootfs.diff_ids.len() != layers {
        return Err(bad(format_args!(
            "{what} lists {} diff ids for {layers} layers",
            c.rootfs.diff_ids.len()
        )));
    }
    Ok((
        c.rootfs.diff_ids,
        c.config.and_then(|c| c.user).unwrap_or_default(),
    ))
}

fn plan_legacy(a: &Archive) -> Result<Vec<Planned>> {
    let list: Vec<LegacyManifest> = parse_json("manifest.json", &a.small("manifest.json")?)?;
    let mut out = Vec::new();
    for m in list {
        let config = a.small(&m.config)?;
        let (diff_ids, user) =
            check_config(&format!("config {}", m.config), &config, m.layers.len())?;
        let mut layers = Vec::new();
        for l in &m.layers {
            if !a.has(l) {
                return Err(bad(format_args!("layer {l} is missing")));
            }
            layers.push(PlannedLayer {
                path: l.clone(),
                digest: None,
                media_type: None,
            });
        }
        let refs = m
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| tag_ref(t))
            .collect::<Result<Vec<_>>>()?;
        out.push(Planned {
            config,
            diff_ids,
            user,
            manifest: None,
            layers,
            refs,
        });
    }
    Ok(out)
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// A blob of an OCI layout, verified against its digest.
fn oci_blob(a: &Archive, d: &Digest) -> Result<Vec<u8>> {
    let bytes = a.small(&blob_path(d))?;
    if sha256(&bytes) != *d {
        return Err(bad(format_args!("blob {d} does not match its digest")));
    }
    Ok(bytes)
}

fn plan_oci(a: &Archive) -> Result<Vec<Planned>> {
    let index: OciIndex = parse_json("index.json", &a.small("index.json")?)?;
    let mut out: Vec<Planned> = Vec::new();
    for d in index.manifests {
        let name = d
            .annotations
            .get(NAME_ANNOTATION)
            .or_else(|| {
                d.annotations
                    .get(REF_ANNOTATION)
                    .filter(|r| r.contains(':') || r.contains('/'))
            })
            .map(|n| tag_ref(n))
            .transpose()?;
        let (digest, media_type, bytes) = if is_index(&d.media_type) {
            let inner: OciIndex =
                parse_json(&format!("index {}", d.digest), &oci_blob(a, &d.digest)?)?;
            let (os, arch) = registry::host_platform();
            let chosen = inner
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == os && p.architecture == arch)
                        && a.has(&blob_path(&m.digest))
                })
                .or_else(|| {
                    inner
                        .manifests
                        .iter()
                        .find(|m| m.platform.is_none() && a.has(&blob_path(&m.digest)))
                })
                .ok_or_else(|| {
                    bad(format_args!(
                        "index {} has no manifest for {os}/{arch}",
                        d.digest
                    ))
                })?;
            (
                chosen.digest.clone(),
                chosen.media_type.clone(),
                oci_blob(a, &chosen.digest)?,
            )
        } else {
            (
                d.digest.clone(),
                d.media_type.clone(),
                oci_blob(a, &d.digest)?,
            )
        };
        // docker writes one index entry per tag of the same manifest.
        if let Some(p) = out
            .iter_mut()
            .find(|p| p.manifest.as_ref().is_some_and(|m| m.0 == digest))
        {
            p.refs.extend(name);
            continue;
        }
        let m: OciManifest = parse_json(&format!("manifest {digest}"), &bytes)?;
        if m.config.media_type != OCI_CONFIG && m.config.media_type != DOCKER_CONFIG {
            return Err(bad(format_args!(
                "manifest {digest}: unsupported config media type {:?}",
                m.config.media_type
            )));
        }
        let config = oci_blob(a, &m.config.digest)?;
        let (diff_ids, user) = check_config(
            &format!("config {}", m.config.digest),
            &config,
            m.layers.len(),
        )?;
        let mut layers = Vec::new();
        for l in &m.layers {
            if !LAYER_TYPES.contains(&l.media_type.as_str()) {
                return Err(bad(format_args!(
                    "layer {} has unsupported media type {:?}",
                    l.digest, l.media_type
                )));
            }
            let path = blob_path(&l.digest);
            if !a.has(&path) {
                return Err(bad(format_args!("layer blob {} is missing", l.digest)));
            }
            layers.push(PlannedLayer {
                path,
                digest: Some(l.digest.clone()),
                media_type: Some(l.media_type.clone()),
            });
        }
        out.push(Planned {
            config,
            diff_ids,
            user,
            manifest: Some((digest, media_type, bytes)),
            layers,
            refs: name.into_iter().collect(),
        });
    }
    Ok(out)
}

/// The layer media type of a blob, by its first bytes.
fn sniff_media_type(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        OCI_LAYER_GZIP
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        OCI_LAYER_ZSTD
    } else {
        OCI_LAYER_TAR
    }
}

/// Hashes a reader to its end: (digest, bytes, first bytes).
fn hash_reader(mut r: impl Read) -> Result<(Digest, u64, Vec<u8>)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n_total = 0u64;
    let mut head = Vec::new();
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| Error::internal("read archive", e))?;
        if n == 0 {
            break;
        }
        if head.len() < 8 {
            head.extend_from_slice(&buf[..n.min(8 - head.len())]);
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((
        Digest::from_sha256_bytes(&h.finalize().into()),
        n_total,
        head,
    ))
}

/// Sends a saved archive to the client in chunks; a client that went away ends the save.
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    /// A writer into `tx`.
    pub fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(SAVE_CHUNK),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SAVE_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(SAVE_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

fn append(b: &mut tar::Builder<impl Write>, path: &str, size: u64, data: impl Read) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .map_err(|e| Error::internal("archive entry name", e))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, data)
        .map_err(|e| Error::internal("write archive", e))
}

fn append_dir(b: &mut tar::Builder<impl Write>, path: &str) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .map_err(|e| Error::internal("archive entry name", e))?;
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    h.set_cksum();
    b.append(&h, std::io::empty())
        .map_err(|e| Error::internal("write archive", e))
}

fn familiar(reference: &str) -> String {
    let r = reference
        .strip_prefix("docker.io/")
        .map(|r| r.strip_prefix("library/").unwrap_or(r))
        .unwrap_or(reference);
    r.to_owned()
}

impl ImageManager {
    pub(super) fn lease_now(&self, lease: &mut Lease, names: Vec<String>) {
        let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        for n in &names {
            *map.entry(n.clone()).or_default() += 1;
        }
        lease.names.extend(names);
    }

    /// Points `reference` at `image`; a tag that named another image moves, as docker's does.
    pub fn tag(&self, image: &str, reference: &str) -> Result<NamedImage> {
        let found = resolve_in(&self.store, image)?
            .ok_or_else(|| Error::NotFound(format!("No such image: {image}")))?;
        let r = Reference::parse(reference)
            .map_err(|e| Error::InvalidArgument(format!("invalid reference format: {e}")))?;
        if r.digest().is_some() {
            return Err(Error::InvalidArgument(
                "refusing to create a tag with a digest reference".into(),
            ));
        }
        let orphans = self.store.put(&found.record, &[r.to_string()])?;
        if !orphans.is_empty() {
            self.gc_in_background(None);
        }
        Ok(found)
    }

    /// Removes the tag `reference` names, when it is a tag of an image that has others
    /// (docker's `rmi` of one name of several). Returns the removed tag, or None when the
    /// image should go as a whole.
    pub fn untag_if_shared(&self, reference: &str) -> Result<Option<String>> {
        let Ok(r) = Reference::parse(reference) else {
            return Ok(None);
        };
        let full = r.to_string();
        let Some(id) = self.store.resolve(&full)? else {
            return Ok(None);
        };
        let Some(image) = self.store.get(&id)? else {
            return Ok(None);
        };
        if image.tags.len() < 2 || !image.tags.contains(&full) {
            return Ok(None);
        }
        self.store.remove_ref(&full)?;
        Ok(Some(full))
    }

    /// Writes a `docker save` archive of `images` (each with the tags to record for it) to
    /// `out`: blobs under `blobs/sha256/`, `manifest.json` and `repositories` for docker's
    /// loader, `index.json` and `oci-layout` for OCI tools. Blocking.
    pub fn save(&self, images: &[(NamedImage, Vec<String>)], out: impl Write) -> Result<()> {
        let mut b = tar::Builder::new(out);
        append_dir(&mut b, "blobs/")?;
        append_dir(&mut b, "blobs/sha256/")?;
        let mut written: BTreeSet<Digest> = BTreeSet::new();
        let mut manifests = Vec::new();
        let mut index = Vec::new();
        let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (image, tags) in images {
            let rec = &image.record;
            let blobs = [&rec.id, &rec.manifest_digest]
                .into_iter()
                .chain(rec.layers.iter().map(|l| &l.digest));
            for d in blobs {
                if !written.insert(d.clone()) {
                    continue;
                }
                let f = self.content.open_blob(d)?;
                let size = f
                    .metadata()
                    .map_err(|e| Error::internal("stat blob", e))?
                    .len();
                append(&mut b, &blob_path(d), size, f)?;
            }
            let shown: Vec<String> = tags.iter().map(|t| familiar(t)).collect();
            manifests.push(json!({
                "Config": blob_path(&rec.id),
                "RepoTags": shown,
                "Layers": rec.layers.iter().map(|l| blob_path(&l.digest)).collect::<Vec<_>>(),
            }));
            let manifest_size = self.content.size(&rec.manifest_digest)?;
            let descriptor = |annotations: Value| {
                json!({
                    "mediaType": rec.manifest_media_type,
                    "digest": rec.manifest_digest.to_string(),
                    "size": manifest_size,
                    "annotations": annotations,
                })
            };
            if tags.is_empty() {
                index.push(descriptor(json!({})));
            }
            for t in tags {
                let tag = Reference::parse(t)
                    .ok()
                    .and_then(|r| r.tag().map(str::to_owned))
                    .unwrap_or_else(|| "latest".into());
                index.push(descriptor(json!({NAME_ANNOTATION: t, REF_ANNOTATION: tag})));
                if let Some(last) = rec.chain_ids.last() {
                    let repo = familiar(t);
                    let repo = repo.rsplit_once(':').map_or(repo.as_str(), |(r, _)| r);
                    repositories
                        .entry(repo.to_owned())
                        .or_default()
                        .insert(tag, last.hex().to_owned());
                }
            }
        }
        let files = [
            ("oci-layout", json!({"imageLayoutVersion": "1.0.0"})),
            (
                "index.json",
                json!({
                    "schemaVersion": 2,
                    "mediaType": registry::OCI_INDEX,
                    "manifests": index,
                }),
            ),
            ("manifest.json", json!(manifests)),
            ("repositories", json!(repositories)),
        ];
        for (name, v) in files {
            let bytes = serde_json::to_vec(&v).map_err(|e| Error::internal("encode JSON", e))?;
            append(&mut b, name, bytes.len() as u64, bytes.as_slice())?;
        }
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| Error::internal("write archive", e))
    }

    /// Loads a `docker save` archive or an OCI layout tar at `path`. Blocking.
    pub fn load_archive(&self, path: &Path) -> Result<Vec<Loaded>> {
        let mut head = [0u8; 4];
        let n = File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|e| Error::internal("read archive", e))?;
        let compressed =
            head[..n].starts_with(&[0x1f, 0x8b]) || head[..n] == [0x28, 0xb5, 0x2f, 0xfd];
        // Entries are read by offset, so a compressed archive is expanded beside it first.
        let _expanded;
        let path = if compressed {
            let out = path.with_extension("expanded");
            _expanded = RemoveOnDrop(out.clone());
            let compressed_len = std::fs::metadata(path)
                .map_err(|e| Error::internal("stat archive", e))?
                .len();
            expand(path, &out, expand_limit(compressed_len))?;
            out
        } else {
            path.to_owned()
        };
        let a = Archive::open(&path)?;
        let planned = if a.has("manifest.json") {
            plan_legacy(&a)?
        } else if a.has("index.json") {
            plan_oci(&a)?
        } else {
            return Err(bad(
                "neither manifest.json (docker save) nor index.json (OCI layout) is in it",
            ));
        };
        if planned.is_empty() {
            return Err(bad("it holds no image"));
        }
        self.import_planned(&a, planned)
    }

    /// Imports the planned images; records are stored only once every image's content is in.
    fn import_planned(&self, a: &Archive, planned: Vec<Planned>) -> Result<Vec<Loaded>> {
        let mut lease = self.lease();
        let mut extract_keys = Vec::new();
        let done = (|| -> Result<Vec<(ImageRecord, Vec<String>)>> {
            let mut out = Vec::new();
            for p in planned {
                out.push((
                    self.import_one(a, &p, &mut lease, &mut extract_keys)?,
                    p.refs,
                ));
            }
            Ok(out)
        })();
        let records = match done {
            Ok(r) => r,
            Err(e) => {
                for key in extract_keys {
                    let _ = self.snapshots.remove(&key);
                }
                // Already on a blocking thread: collect now, so a refused archive has left
                // nothing once the client hears of it.
                drop(lease);
                if let Err(gc) = self.gc_handle().run() {
                    tracing::warn!(error = %gc, "collect after a failed load");
                }
                return Err(e);
            }
        };
        let mut loaded = Vec::new();
        let mut orphans = false;
        for (rec, refs) in records {
            orphans |= !self.store.put(&rec, &refs)?.is_empty();
            tracing::info!(image_id = %rec.id, "image loaded");
            loaded.push(Loaded {
                id: rec.id,
                tags: refs,
            });
        }
        drop(lease);
        if orphans && let Err(gc) = self.gc_handle().run() {
            tracing::warn!(error = %gc, "collect images a load displaced");
        }
        Ok(loaded)
    }

    fn import_one(
        &self,
        a: &Archive,
        p: &Planned,
        lease: &mut Lease,
        extract_keys: &mut Vec<String>,
    ) -> Result<ImageRecord> {
        let id = sha256(&p.config);
        let chain = chain_ids(&p.diff_ids);
        self.lease_now(
            lease,
            std::iter::once(id.to_string())
                .chain(chain.iter().map(ToString::to_string))
                .collect(),
        );
        let mut layers = Vec::with_capacity(p.layers.len());
        for (i, l) in p.layers.iter().enumerate() {
            let (digest, size, head) = hash_reader(a.reader(&l.path)?)?;
            if let Some(want) = &l.digest
                && *want != digest
            {
                return Err(bad(format_args!(
                    "layer blob {want} does not match its digest (it is {digest})"
                )));
            }
            self.lease_now(lease, vec![digest.to_string()]);
            let media_type = l
                .media_type
                .clone()
                .unwrap_or_else(|| sniff_media_type(&head).to_owned());
            let name = chain[i].to_string();
            let parent = i.checked_sub(1).map(|j| chain[j].to_string());
            let present = matches!(self.snapshots.stat(&name), Ok(info) if info.kind == snapshotter::Kind::Committed);
            if present {
                // The snapshot is trusted by its chain id; the blob stored for it must be
                // what the config says, or a later save would hand out a lie.
                let got = snapshotter::unpack::diff_id(a.reader(&l.path)?)
                    .map_err(|e| bad(format_args!("layer {}: {e}", l.path)))?
                    .diff_id;
                if got != p.diff_ids[i] {
                    return Err(bad(format_args!(
                        "layer {} uncompresses to {got}, but the config says {}",
                        l.path, p.diff_ids[i]
                    )));
                }
                if !self.content.exists(&digest) {
                    let mut w = self.content.writer(&digest)?;
                    std::io::copy(&mut a.reader(&l.path)?, &mut w)
                        .map_err(|e| Error::internal("store layer blob", e))?;
                    w.commit()?;
                }
            } else {
                let key = format!(
                    "{EXTRACT_PREFIX}{}-{}",
                    rand::random::<u64>(),
                    chain[i].hex()
                );
                self.lease_now(lease, vec![key.clone()]);
                extract_keys.push(key.clone());
                let mode = self.snapshots.diff_mode();
                match mode {
                    DiffMode::Overlay => self.snapshots.prepare(&key, None)?,
                    DiffMode::Apply => self.snapshots.prepare(&key, parent.as_deref())?,
                };
                let dir = self.snapshots.diff_dir(&key)?;
                let mut w = self.content.writer(&digest)?;
                let unpacked = unpack(
                    mode,
                    super::TeeReader {
                        inner: a.reader(&l.path)?,
                        blob: &mut w,
                    },
                    &dir,
                )
                .map_err(|e| bad(format_args!("layer {}: {e}", l.path)))?;
                if unpacked.diff_id != p.diff_ids[i] {
                    return Err(bad(format_args!(
                        "layer {} uncompresses to {}, but the config says {}",
                        l.path, unpacked.diff_id, p.diff_ids[i]
                    )));
                }
                w.commit()?;
                syncfs(&self.snapshots_dir)?;
                self.commit_unpacked(mode, &name, &key, parent.as_deref())?;
            }
            layers.push(LayerRecord {
                digest,
                media_type,
                size,
                diff_id: p.diff_ids[i].clone(),
            });
        }
        let (manifest_digest, manifest_media_type, manifest) = match &p.manifest {
            Some(m) => m.clone(),
            None => {
                let m = json!({
                    "schemaVersion": 2,
                    "mediaType": registry::OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": id.to_string(), "size": p.config.len()},
                    "layers": layers.iter().map(|l| json!({
                        "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size,
                    })).collect::<Vec<_>>(),
                });
                let bytes =
                    serde_json::to_vec(&m).map_err(|e| Error::internal("encode manifest", e))?;
                (sha256(&bytes), registry::OCI_MANIFEST.to_owned(), bytes)
            }
        };
        self.lease_now(lease, vec![manifest_digest.to_string()]);
        self.content.put(&id, &p.config)?;
        self.content.put(&manifest_digest, &manifest)?;
        let size = total_size(
            [manifest.len() as u64, p.config.len() as u64]
                .into_iter()
                .chain(layers.iter().map(|l| l.size)),
        )
        .ok_or_else(|| bad("layer sizes add up past 2^64"))?;
        Ok(ImageRecord {
            id,
            manifest_digest,
            manifest_media_type,
            index_digest: None,
            layers,
            chain_ids: chain,
            size,
            user: p.user.clone(),
        })
    }

    /// Imports the rootfs tar at `path` (plain, gzip or zstd) as a one-layer image with the
    /// container config `config`, named `refs`. Blocking.
    pub fn import_rootfs(
        &self,
        path: &Path,
        config: Value,
        comment: &str,
        refs: Vec<String>,
    ) -> Result<Digest> {
        // The diff id is only known after reading the tar: unpack once into a scratch
        // snapshot (to learn it and to check the tar), then import as an archive of one layer.
        let f = File::open(path).map_err(|e| Error::internal("open upload", e))?;
        let diff_id = snapshotter::unpack::diff_id(f)
            .map_err(|e| bad(format_args!("read the rootfs tar: {e}")))?
            .diff_id;
        let (os, arch) = registry::host_platform();
        let created = api::time::rfc3339_nano(crate::sandbox::now_ns());
        let image_config = json!({
            "architecture": arch,
            "os": os,
            "created": created,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
            "history": [{"created": created, "comment": if comment.is_empty() { "Imported from -" } else { comment }}],
        });
        let config_bytes =
            serde_json::to_vec(&image_config).map_err(|e| Error::internal("encode config", e))?;
        let user = config["User"].as_str().unwrap_or_default().to_owned();
        let len = std::fs::metadata(path)
            .map_err(|e| Error::internal("stat upload", e))?
            .len();
        let a = Archive {
            path: path.to_owned(),
            entries: HashMap::from([(
                "rootfs.tar".to_owned(),
                Entry::File {
                    offset: 0,
                    size: len,
                },
            )]),
        };
        let planned = Planned {
            config: config_bytes,
            diff_ids: vec![diff_id],
            user,
            manifest: None,
            layers: vec![PlannedLayer {
                path: "rootfs.tar".into(),
                digest: None,
                media_type: None,
            }],
            refs,
        };
        let loaded = self.import_planned(&a, vec![planned])?;
        loaded
            .into_iter()
            .next()
            .map(|l| l.id)
            .ok_or_else(|| Error::Internal("import made no image".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; hostile archives are written raw.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("a.tar");
        std::fs::write(&p, bytes).expect("write");
        p
    }

    #[test]
    fn archive_paths_are_normalised_and_traversal_refused() {
        assert_eq!(normalise("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(normalise("/etc/passwd"), None);
        assert_eq!(normalise("a/../../b"), None);
        let dir = tempfile::tempdir().expect("dir");
        let p = write(dir.path(), &tar_of(&[("../evil", b"x")]));
        let err = Archive::open(&p).err().expect("refused").to_string();
        assert!(err.contains("path traversal"), "{err}");
    }

    #[test]
    fn giant_extension_records_are_refused_before_they_are_read() {
        let dir = tempfile::tempdir().expect("dir");
        // A GNU long name far past the record limit: refused from its header alone.
        let mut b = tar::Builder::new(Vec::new());
        let name = vec![b'n'; (snapshotter::unpack::MAX_EXTENSION_RECORD + 10) as usize];
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(name.len() as u64);
        h.set_cksum();
        b.append(&h, &name[..]).expect("append");
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "short", &b"x"[..]).expect("append");
        let p = write(dir.path(), &b.into_inner().expect("tar"));
        let err = Archive::open(&p).err().expect("refused").to_string();
        assert!(err.contains("gnu long name"), "{err}");

        // The same for a PAX header.
        let mut b = tar::Builder::new(Vec::new());
        let big = vec![b'v'; (snapshotter::unpack::MAX_EXTENSION_RECORD + 10) as usize];
        b.append_pax_extensions([("comment", &big[..])])
            .expect("pax");
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        b.append_data(&mut h, "short", &b"x"[..]).expect("append");
        let p = write(dir.path(), &b.into_inner().expect("tar"));
        let err = Archive::open(&p).err().expect("refused").to_string();
        assert!(err.contains("pax"), "{err}");

        // Long names that fit still name their entries.
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/manifest.json", "d".repeat(200));
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"[]"[..]).expect("append");
        let p = write(dir.path(), &b.into_inner().expect("tar"));
        let a = Archive::open(&p).expect("open");
        assert_eq!(a.small(&long).expect("read"), b"[]");
    }

    #[test]
    fn compressed_archives_expand_only_so_far() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("dir");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![0u8; 4 << 20]).expect("gzip");
        let bomb = dir.path().join("bomb.gz");
        std::fs::write(&bomb, gz.finish().expect("gzip")).expect("write");
        let out = dir.path().join("out");
        let err = expand(&bomb, &out, 1 << 20)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("expands to more than 1048576 bytes"), "{err}");
        expand(&bomb, &out, 4 << 20).expect("within the limit");
        assert_eq!(std::fs::metadata(&out).expect("stat").len(), 4 << 20);
        assert_eq!(expand_limit(1), MIN_EXPAND_LIMIT);
        assert_eq!(expand_limit(1 << 30), 32 << 30);
        // Through the load itself: refused as a 400, and no expanded copy is left behind.
        let m = manager(dir.path());
        let err = m.load_archive(&bomb).expect_err("not an archive");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(!bomb.with_extension("expanded").exists());
    }

    #[test]
    fn links_resolve_inside_the_archive_only() {
        assert_eq!(
            resolve_link("a", "../b/layer.tar").as_deref(),
            Some("b/layer.tar")
        );
        assert_eq!(resolve_link("", "b/./x").as_deref(), Some("b/x"));
        assert_eq!(resolve_link("a", "../../etc/passwd"), None);
        assert_eq!(resolve_link("a", "/etc/passwd"), None);
    }

    #[test]
    fn archive_files_are_found_read_and_capped() {
        let dir = tempfile::tempdir().expect("dir");
        let p = write(
            dir.path(),
            &tar_of(&[("./manifest.json", b"[]"), ("blobs/sha256/x", b"hello")]),
        );
        let a = Archive::open(&p).expect("open");
        assert_eq!(a.small("manifest.json").expect("read"), b"[]");
        let mut s = String::new();
        a.reader("blobs/sha256/x")
            .expect("reader")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "hello");
        assert!(!a.has("nope"));
        assert!(a.small("nope").is_err());
        assert!(plan_legacy(&a).is_ok_and(|v| v.is_empty()));
    }

    #[test]
    fn hostile_manifests_are_refused_with_clear_messages() {
        let dir = tempfile::tempdir().expect("dir");
        let p = write(dir.path(), &tar_of(&[("manifest.json", b"{not json")]));
        let a = Archive::open(&p).expect("open");
        let err = plan_legacy(&a).err().expect("bad json").to_string();
        assert!(err.contains("manifest.json"), "{err}");

        let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
        let manifest = br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]"#;
        let p = write(
            dir.path(),
            &tar_of(&[("manifest.json", manifest), ("c.json", config)]),
        );
        let a = Archive::open(&p).expect("open");
        let err = plan_legacy(&a).err().expect("missing layer").to_string();
        assert!(err.contains("l/layer.tar is missing"), "{err}");

        let big = vec![b' '; (MAX_ARCHIVE_JSON + 1) as usize];
        let p = write(dir.path(), &tar_of(&[("manifest.json", &big)]));
        let a = Archive::open(&p).expect("open");
        let err = plan_legacy(&a).err().expect("too big").to_string();
        assert!(err.contains("too large"), "{err}");
    }

    fn manager(dir: &Path) -> ImageManager {
        let db = Arc::new(redb::Database::create(dir.join("meta.db")).expect("db"));
        let snaps = Arc::new(
            snapshotter::native::NativeSnapshotter::new(&dir.join("snapshots"), db.clone())
                .expect("snapshotter"),
        );
        let content = snapshotter::content::ContentStore::open(dir).expect("content");
        ImageManager::new(db, content, snaps, Arc::default()).expect("manager")
    }

    /// A rootfs tar with one file, built by hand.
    fn rootfs_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("hello.txt").expect("path");
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"hi\n"[..]).expect("append");
        b.into_inner().expect("tar")
    }

    #[test]
    fn import_save_and_load_round_trip() {
        let dir = tempfile::tempdir().expect("dir");
        let m = manager(dir.path());
        let tar = write(dir.path(), &rootfs_tar());
        let id = m
            .import_rootfs(
                &tar,
                json!({"Cmd": ["cat", "/hello.txt"]}),
                "",
                vec!["docker.io/library/hello:1".into()],
            )
            .expect("import");
        let image = resolve_in(&m.store, "hello:1")
            .expect("resolve")
            .expect("there");
        assert_eq!(image.record.id, id);
        assert_eq!(image.record.layers.len(), 1);

        let mut saved = Vec::new();
        m.save(&[(image.clone(), image.tags.clone())], &mut saved)
            .expect("save");
        let archive = dir.path().join("saved.tar");
        std::fs::write(&archive, &saved).expect("write");
        let a = Archive::open(&archive).expect("open");
        for f in ["manifest.json", "index.json", "oci-layout", "repositories"] {
            assert!(a.has(f), "{f}");
        }
        let manifest: Value =
            serde_json::from_slice(&a.small("manifest.json").expect("read")).expect("json");
        assert_eq!(manifest[0]["RepoTags"], json!(["hello:1"]));

        m.store.remove(&id).expect("remove");
        m.gc().expect("gc");
        let loaded = m.load_archive(&archive).expect("load");
        assert_eq!(
            loaded,
            vec![Loaded {
                id: id.clone(),
                tags: vec!["docker.io/library/hello:1".into()]
            }]
        );
        let again = resolve_in(&m.store, "hello:1")
            .expect("resolve")
            .expect("there");
        assert_eq!(again.record.layers, image.record.layers);

        // The same archive as a bare OCI layout (no manifest.json) loads too.
        let mut b = tar::Builder::new(Vec::new());
        let mut t = tar::Archive::new(saved.as_slice());
        for e in t.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").display().to_string();
            if path == "manifest.json" || path == "repositories" {
                continue;
            }
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            b.append(&h, data.as_slice()).expect("append");
        }
        let oci = dir.path().join("oci.tar");
        std::fs::write(&oci, b.into_inner().expect("tar")).expect("write");
        m.store.remove(&id).expect("remove");
        m.gc().expect("gc");
        let loaded = m.load_archive(&oci).expect("load oci");
        assert_eq!(loaded[0].id, id);
        assert_eq!(loaded[0].tags, vec!["docker.io/library/hello:1".to_owned()]);
    }

    #[test]
    fn a_failed_load_leaves_no_image_and_no_content() {
        let dir = tempfile::tempdir().expect("dir");
        let m = manager(dir.path());
        let layer = rootfs_tar();
        let diff = sha256(&layer);
        let config =
            json!({"rootfs": {"type": "layers", "diff_ids": [diff.to_string(), diff.to_string()]}})
                .to_string();
        let manifest =
            json!([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["a.tar", "b.tar"]}])
                .to_string();
        let p = write(
            dir.path(),
            &tar_of(&[
                ("manifest.json", manifest.as_bytes()),
                ("c.json", config.as_bytes()),
                ("a.tar", &layer),
                ("b.tar", b"garbage"),
            ]),
        );
        let err = m.load_archive(&p).expect_err("refused").to_string();
        assert!(err.contains("b.tar"), "{err}");
        assert!(m.store.list().expect("list").is_empty());
        assert!(m.content.list().expect("blobs").is_empty());
        assert!(
            m.snapshots
                .list()
                .expect("snapshots")
                .iter()
                .all(|s| !s.key.starts_with("sha256:"))
        );
    }

    #[test]
    fn saved_chunks_reach_the_channel() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut w = ChannelWriter::new(tx);
        let t = std::thread::spawn(move || {
            w.write_all(b"abc").expect("write");
            w.flush().expect("flush");
        });
        let got = rx.blocking_recv().expect("chunk").expect("ok");
        assert_eq!(&got[..], b"abc");
        t.join().expect("thread");
        assert_eq!(sniff_media_type(&[0x1f, 0x8b, 8]), OCI_LAYER_GZIP);
        assert_eq!(sniff_media_type(b"usta"), OCI_LAYER_TAR);
    }
}
