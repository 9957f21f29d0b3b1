//! The image half of the core: pull into the content store and snapshots, list, inspect,
//! remove, garbage-collect, and recover after a crash.
//!
//! Crash safety comes from ordering: blobs and layer snapshots are committed before the image
//! record that references them, in one metadata transaction; whatever a crash leaves without
//! a record (ingest files, `extract-*` snapshots, unreferenced layers and blobs) is collected by
//! [`ImageManager::gc`] at start.

pub mod archive;
pub mod compose;
pub mod push;
pub mod reference;
pub mod registry;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use api::Digest;
use bytes::Bytes;
use futures::StreamExt;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use snapshotter::content::ContentStore;
use snapshotter::{DiffMode, Kind, Snapshotter};
use tokio::sync::mpsc;

use self::reference::{Reference, Target};
use self::registry::{Endpoint, Fetched};
pub use self::store::{ImageRecord, ImageStore, LayerRecord, NamedImage};
use crate::bridge::ChannelReader;
use crate::config::Config;
use crate::error::{Error, Result};

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];
/// Prefix of the active snapshots a pull unpacks into; any left at start are crash leftovers.
const EXTRACT_PREFIX: &str = "extract-";
/// Most layers an image may have. Docker and containerd stop at 127 in practice (overlayfs's
/// lowerdir limit); more is hostile.
pub const MAX_LAYERS: usize = 128;

/// Images: pulls, metadata and their storage.
pub struct ImageManager {
    store: ImageStore,
    content: ContentStore,
    snapshots: Arc<dyn Snapshotter>,
    snapshots_dir: PathBuf,
    config: Arc<Config>,
    /// Names (snapshot keys, blob digests) that in-flight pulls are creating or relying on,
    /// counted. GC holds this lock for its whole sweep and never removes a leased name, so it is
    /// only ever taken on blocking threads.
    leases: Arc<Mutex<HashMap<String, usize>>>,
    /// One lock per platform manifest digest: concurrent pulls of one image do the work once.
    pulls: tokio::sync::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

/// Names held by a pull until it ends. Dropping it takes the lease lock, which GC may hold for
/// a whole sweep: drop it on a blocking thread (see [`ImageManager::pull_detached`]).
struct Lease {
    map: Arc<Mutex<HashMap<String, usize>>>,
    names: Vec<String>,
}

impl Lease {
    /// Takes `names`, on a blocking thread (GC may hold the lock for a whole sweep).
    ///
    /// Not cancel-safe: a pull runs in its own task and is never dropped half-way.
    async fn add(&mut self, names: Vec<String>) -> Result<()> {
        let map = self.map.clone();
        let taken = names.clone();
        blocking(move || {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            for n in taken {
                *map.entry(n).or_default() += 1;
            }
            Ok(())
        })
        .await?;
        self.names.extend(names);
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            if let Some(c) = map.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    map.remove(n);
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: Digest,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct ContainerConfig {
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<Digest>,
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_sha256_bytes(&Sha256::digest(bytes).into())
}

/// Snapshot names of a layer chain: chain[0] = diff[0], chain[i] = sha256(chain[i-1] + " " + diff[i]).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

fn is_index(media_type: &str) -> bool {
    media_type == registry::OCI_INDEX || media_type == registry::DOCKER_LIST
}

fn parse<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadContent(format!("{what}: {e}")))
}

fn blocking_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("worker thread failed: {e}"))
}

/// Runs disk work (snapshotter, content store, metadata) on a blocking thread, off the async
/// workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(blocking_err)?
}

/// The sum of blob sizes, or None if hostile descriptors make it overflow.
fn total_size(sizes: impl IntoIterator<Item = u64>) -> Option<u64> {
    sizes.into_iter().try_fold(0u64, u64::checked_add)
}

/// A descriptor's size, which must not be negative.
fn descriptor_size(r: &Reference, d: &Descriptor) -> Result<u64> {
    u64::try_from(d.size)
        .map_err(|_| Error::BadContent(format!("{r}: {} has negative size {}", d.digest, d.size)))
}

/// Copies everything read into the blob being written.
struct TeeReader<'a, R> {
    inner: R,
    blob: &'a mut snapshotter::content::BlobWriter,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        std::io::Write::write_all(self.blob, &buf[..n])?;
        Ok(n)
    }
}

/// One layer a pull must fetch and unpack.
struct LayerJob {
    index: usize,
    layer: LayerRecord,
    key: String,
}

/// A platform manifest that passed its checks, with its config.
struct Candidate {
    manifest: Fetched,
    m: Manifest,
    config_bytes: Bytes,
    config: ImageConfig,
}

impl Candidate {
    /// Whether the config is for this host (a config that names no OS is taken as such).
    fn for_host(&self) -> bool {
        let (os, arch) = registry::host_platform();
        self.config.os.is_empty() || (self.config.os == os && self.config.architecture == arch)
    }
}

/// The outcome of committing a layer: if another pull sharing the layer committed it first,
/// ours is dropped.
fn keep_first(
    snapshots: &dyn Snapshotter,
    committed: snapshotter::Result<()>,
    key: &str,
) -> Result<()> {
    match committed {
        Ok(()) => Ok(()),
        Err(snapshotter::Error::AlreadyExists(_)) => Ok(snapshots.remove(key)?),
        Err(e) => Err(e.into()),
    }
}

impl ImageManager {
    /// Opens the image store over the given storage and cleans up after any crash.
    pub fn new(
        db: Arc<redb::Database>,
        content: ContentStore,
        snapshots: Arc<dyn Snapshotter>,
        config: Arc<Config>,
    ) -> Result<Self> {
        let (_, snapshots_dir) = snapshots.total_usage()?;
        let m = ImageManager {
            store: ImageStore::open(db)?,
            content,
            snapshots,
            snapshots_dir,
            config,
            leases: Arc::default(),
            pulls: Default::default(),
        };
        let (snaps, blobs) = m.gc()?;
        if snaps + blobs > 0 {
            tracing::info!(
                snapshots = snaps,
                blobs,
                "removed unreferenced image content"
            );
        }
        Ok(m)
    }

    fn lease(&self) -> Lease {
        Lease {
            map: self.leases.clone(),
            names: Vec::new(),
        }
    }

    /// Pulls `image` and returns its id (the config digest).
    ///
    /// The pull runs in a task of its own: a client that goes away does not stop it half-way
    /// (between writing content and cleaning up after a failure).
    pub async fn pull(
        self: &Arc<Self>,
        image: &str,
        auth: Option<&api::cri::AuthConfig>,
    ) -> Result<Digest> {
        let this = self.clone();
        let image = image.to_owned();
        let auth = auth.cloned();
        tokio::spawn(async move { this.pull_detached(&image, auth.as_ref()).await })
            .await
            .map_err(|e| Error::Internal(format!("pull task failed: {e}")))?
    }

    async fn pull_detached(
        &self,
        image: &str,
        auth: Option<&api::cri::AuthConfig>,
    ) -> Result<Digest> {
        let r = Reference::parse(image).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let auth = registry::auth_from_cri(auth)?;
        let eps = registry::endpoints(&self.config, &r.registry)?;
        let (ep, top) = registry::fetch_manifest(&eps, &r, &r.target, &auth).await?;
        let (chosen, index) = if is_index(&top.media_type) {
            (
                self.select_platform(&ep, &r, &auth, &top).await?,
                Some(top.clone()),
            )
        } else {
            let c = self.inspect(&ep, &r, &auth, top.clone()).await?;
            if !c.for_host() {
                let (os, arch) = registry::host_platform();
                return Err(Error::NotFound(format!(
                    "{r}: no image for {os}/{arch} (it is an image for {}/{})",
                    c.config.os, c.config.architecture
                )));
            }
            (c, None)
        };

        let lock = {
            let mut pulls = self.pulls.lock().await;
            pulls.retain(|_, l| Arc::strong_count(l) > 1);
            pulls
                .entry(chosen.manifest.digest.clone())
                .or_default()
                .clone()
        };
        let _serialised = lock.lock().await;

        let mut lease = self.lease();
        let record = match self
            .fetch_image(&ep, &r, &auth, chosen, index.as_ref(), &mut lease)
            .await
        {
            Ok(rec) => rec,
            Err(e) => {
                self.gc_in_background(Some(lease));
                return Err(e);
            }
        };
        let mut refs = vec![r.with_digest(&top.digest).to_string()];
        if r.tag().is_some() {
            refs.push(r.to_string());
        }
        let store = self.store.clone();
        let rec = record.clone();
        // The lease ends once the record holds what it protected, on the blocking thread.
        let put = blocking(move || {
            let put = store.put(&rec, &refs);
            drop(lease);
            put
        })
        .await;
        match put {
            Ok(orphans) if orphans.is_empty() => {}
            Ok(_) => self.gc_in_background(None),
            Err(e) => {
                self.gc_in_background(None);
                return Err(e);
            }
        }
        tracing::info!(image = %r, image_id = %record.id, "pulled");
        Ok(record.id)
    }

    /// The manifest of `index` for this host: the first entry whose platform is this host's
    /// and whose config agrees; failing that, the first entry without a platform whose config
    /// is for this host. NotFound if none.
    async fn select_platform(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        index: &Fetched,
    ) -> Result<Candidate> {
        let idx: Index = parse(&format!("index of {r}"), &index.bytes)?;
        let (os, arch) = registry::host_platform();
        let labelled = idx.manifests.iter().filter(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == os
                    && p.architecture == arch
                    // amd64 has no variants worth choosing among; arm64 images say v8 or nothing.
                    && p.variant.as_deref().is_none_or(|v| arch != "arm" || v == "v7")
            })
        });
        let unlabelled = idx.manifests.iter().filter(|m| {
            m.platform.is_none()
                && (m.media_type == registry::OCI_MANIFEST
                    || m.media_type == registry::DOCKER_MANIFEST)
        });
        let mut have: Vec<String> = idx
            .manifests
            .iter()
            .filter_map(|m| {
                m.platform
                    .as_ref()
                    .map(|p| format!("{}/{}", p.os, p.architecture))
            })
            .collect();
        for (d, has_platform) in labelled
            .map(|d| (d, true))
            .chain(unlabelled.map(|d| (d, false)))
        {
            let m =
                registry::fetch_manifest_at(ep, r, &Target::Digest(d.digest.clone()), auth).await?;
            let c = self.inspect(ep, r, auth, m).await?;
            if c.for_host() {
                return Ok(c);
            }
            tracing::debug!(image = %r, manifest = %d.digest, os = %c.config.os, arch = %c.config.architecture, "index entry is for another platform");
            if !has_platform {
                have.push(format!(
                    "{}/{} (by its config)",
                    c.config.os, c.config.architecture
                ));
            }
        }
        let msg = format!(
            "{r}: no image for {os}/{arch} in the index (it has: {})",
            if have.is_empty() {
                "no platforms".to_owned()
            } else {
                have.join(", ")
            }
        );
        Err(Error::NotFound(msg))
    }

    /// Checks a platform manifest and fetches its config.
    async fn inspect(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        manifest: Fetched,
    ) -> Result<Candidate> {
        if is_index(&manifest.media_type) {
            return Err(Error::BadContent(format!(
                "{r}: index points at another index"
            )));
        }
        let m: Manifest = parse(&format!("manifest of {r}"), &manifest.bytes)?;
        if m.config.media_type != OCI_CONFIG && m.config.media_type != DOCKER_CONFIG {
            return Err(Error::BadContent(format!(
                "{r}: unsupported config media type {:?} (not a container image)",
                m.config.media_type
            )));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(Error::BadContent(format!(
                "{r}: manifest has {} layers; at most {MAX_LAYERS} are allowed",
                m.layers.len()
            )));
        }
        if let Some(l) = m
            .layers
            .iter()
            .find(|l| !LAYER_TYPES.contains(&l.media_type.as_str()))
        {
            return Err(Error::BadContent(format!(
                "{r}: layer {} has unsupported media type {:?}",
                l.digest, l.media_type
            )));
        }
        descriptor_size(r, &m.config)?;
        for l in &m.layers {
            descriptor_size(r, l)?;
        }
        let config_bytes = self.fetch_small_blob(ep, r, auth, &m.config).await?;
        let config: ImageConfig = parse(&format!("config of {r}"), &config_bytes)?;
        Ok(Candidate {
            manifest,
            m,
            config_bytes,
            config,
        })
    }

    /// Fetches the layers of one platform manifest; everything committed on success.
    async fn fetch_image(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        c: Candidate,
        index: Option<&Fetched>,
        lease: &mut Lease,
    ) -> Result<ImageRecord> {
        let Candidate {
            manifest,
            m,
            config_bytes,
            config,
        } = c;
        lease
            .add(
                [manifest.digest.to_string(), m.config.digest.to_string()]
                    .into_iter()
                    .chain(index.iter().map(|i| i.digest.to_string()))
                    .chain(m.layers.iter().map(|l| l.digest.to_string()))
                    .collect(),
            )
            .await?;

        if config.rootfs.diff_ids.len() != m.layers.len() {
            return Err(Error::BadContent(format!(
                "{r}: config lists {} diff ids for {} layers",
                config.rootfs.diff_ids.len(),
                m.layers.len()
            )));
        }
        let chain = chain_ids(&config.rootfs.diff_ids);
        let mut layers = Vec::with_capacity(m.layers.len());
        for (l, d) in m.layers.iter().zip(&config.rootfs.diff_ids) {
            layers.push(LayerRecord {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: descriptor_size(r, l)?,
                diff_id: d.clone(),
            });
        }
        let size = total_size(
            [manifest.bytes.len() as u64, config_bytes.len() as u64]
                .into_iter()
                .chain(layers.iter().map(|l| l.size)),
        )
        .ok_or_else(|| Error::BadContent(format!("{r}: layer sizes add up past 2^64")))?;

        // Which layers are missing? Leased first, so GC cannot take a present one away.
        lease
            .add(chain.iter().map(|c| c.to_string()).collect())
            .await?;
        let snapshots = self.snapshots.clone();
        let names: Vec<String> = chain.iter().map(|c| c.to_string()).collect();
        let missing: Vec<bool> = blocking(move || {
            names
                .iter()
                .map(|c| match snapshots.stat(c) {
                    Ok(info) if info.kind == Kind::Committed => Ok(false),
                    Ok(_) => Err(Error::Internal(format!(
                        "snapshot {c} exists but is not committed"
                    ))),
                    Err(snapshotter::Error::NotFound { .. }) => Ok(true),
                    Err(e) => Err(e.into()),
                })
                .collect()
        })
        .await?;
        let mut jobs = Vec::new();
        for (i, c) in chain.iter().enumerate() {
            if !missing[i] {
                continue;
            }
            let key = format!("{EXTRACT_PREFIX}{}-{}", rand::random::<u64>(), c.hex());
            jobs.push(LayerJob {
                index: i,
                layer: layers[i].clone(),
                key,
            });
        }
        lease
            .add(jobs.iter().map(|j| j.key.clone()).collect())
            .await?;

        let committed = match self.snapshots.diff_mode() {
            DiffMode::Overlay => self.unpack_all_at_once(ep, r, auth, &jobs, &chain).await,
            DiffMode::Apply => self.apply_in_order(ep, r, auth, &jobs, &chain).await,
        };
        if let Err(e) = committed {
            let snapshots = self.snapshots.clone();
            let keys: Vec<String> = jobs.iter().map(|j| j.key.clone()).collect();
            blocking(move || {
                for key in keys {
                    if let Err(err) = snapshots.remove(&key)
                        && !matches!(err, snapshotter::Error::NotFound { .. })
                    {
                        tracing::warn!(snapshot_key = %key, error = %err, "cleanup after failed pull");
                    }
                }
                Ok(())
            })
            .await?;
            return Err(e);
        }

        let content = self.content.clone();
        let mut blobs = vec![
            (manifest.digest.clone(), manifest.bytes.clone()),
            (m.config.digest.clone(), config_bytes),
        ];
        if let Some(i) = index {
            blobs.push((i.digest.clone(), i.bytes.clone()));
        }
        blocking(move || {
            for (d, b) in blobs {
                content.put(&d, &b)?;
            }
            Ok(())
        })
        .await?;
        Ok(ImageRecord {
            id: m.config.digest.clone(),
            manifest_digest: manifest.digest.clone(),
            manifest_media_type: manifest.media_type.clone(),
            index_digest: index.map(|i| i.digest.clone()),
            layers,
            chain_ids: chain,
            size,
            user: config.config.and_then(|c| c.user).unwrap_or_default(),
        })
    }

    /// Overlay mode: every missing layer downloads and unpacks into its own parentless
    /// snapshot at once; then they are committed onto each other in chain order.
    async fn unpack_all_at_once(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        jobs: &[LayerJob],
        chain: &[Digest],
    ) -> Result<()> {
        // By index: a closure taking `&LayerJob` trips the compiler's Send check on
        // higher-ranked lifetimes.
        let results = futures::stream::iter(0..jobs.len())
            .map(|i| async move {
                let snapshots = self.snapshots.clone();
                let key = jobs[i].key.clone();
                blocking(move || Ok(snapshots.prepare(&key, None).map(drop)?)).await?;
                self.fetch_layer(ep, r, auth, &jobs[i], DiffMode::Overlay)
                    .await
            })
            .buffer_unordered(self.config.max_concurrent_downloads)
            .collect::<Vec<_>>()
            .await;
        for res in results {
            res?;
        }
        // Unpacked files reach the disk before any snapshot naming them is committed.
        self.sync_snapshots().await?;
        let snapshots = self.snapshots.clone();
        let commits: Vec<(String, String, Option<String>)> = jobs
            .iter()
            .map(|job| {
                let parent = job.index.checked_sub(1).map(|p| chain[p].to_string());
                (chain[job.index].to_string(), job.key.clone(), parent)
            })
            .collect();
        blocking(move || {
            for (name, key, parent) in commits {
                keep_first(
                    &*snapshots,
                    snapshots.commit_with_parent(&name, &key, parent.as_deref()),
                    &key,
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Apply mode: each layer is applied onto a copy of its committed parent, one after
    /// another.
    async fn apply_in_order(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        jobs: &[LayerJob],
        chain: &[Digest],
    ) -> Result<()> {
        for job in jobs {
            let parent = job.index.checked_sub(1).map(|p| chain[p].to_string());
            let (snapshots, key) = (self.snapshots.clone(), job.key.clone());
            blocking(move || Ok(snapshots.prepare(&key, parent.as_deref()).map(drop)?)).await?;
            self.fetch_layer(ep, r, auth, job, DiffMode::Apply).await?;
            self.sync_snapshots().await?;
            let (snapshots, key) = (self.snapshots.clone(), job.key.clone());
            let name = chain[job.index].to_string();
            blocking(move || keep_first(&*snapshots, snapshots.commit(&name, &key), &key)).await?;
        }
        Ok(())
    }

    async fn sync_snapshots(&self) -> Result<()> {
        let dir = self.snapshots_dir.clone();
        blocking(move || syncfs(&dir)).await
    }

    /// A config blob, from the content store or the registry, of exactly the descriptor's size
    /// and digest.
    async fn fetch_small_blob(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        d: &Descriptor,
    ) -> Result<Bytes> {
        let content = self.content.clone();
        let digest = d.digest.clone();
        if let Ok(b) = blocking(move || Ok(content.read(&digest)?)).await {
            return Ok(b.into());
        }
        let size = descriptor_size(r, d)?;
        if size > registry::MAX_MANIFEST_BYTES as u64 {
            return Err(Error::BadContent(format!(
                "{r}: config {} is too large ({size} bytes)",
                d.digest
            )));
        }
        let size = size as usize;
        let (_, mut stream) = registry::blob_stream(ep, r, &d.digest, auth).await?;
        let mut buf = Vec::with_capacity(size);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| stream_error(ep, &d.digest, &e))?;
            if chunk.len() > size - buf.len() {
                return Err(Error::BadContent(format!(
                    "{r}: config {} from {ep:?} is longer than the {size} bytes its descriptor says",
                    d.digest
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() != size {
            return Err(Error::BadContent(format!(
                "{r}: config {} from {ep:?} has {} bytes; its descriptor says {size}",
                d.digest,
                buf.len()
            )));
        }
        let got = sha256(&buf);
        if got != d.digest {
            return Err(Error::BadContent(format!(
                "{r}: config blob digest mismatch: expected {}, got {got}",
                d.digest
            )));
        }
        Ok(buf.into())
    }

    /// Downloads one layer (or reads it from the content store) and unpacks it while it
    /// streams into a fresh `extract-*` snapshot, verifying the blob's size and digest and the
    /// diffID.
    async fn fetch_layer(
        &self,
        ep: &Endpoint,
        r: &Reference,
        auth: &RegistryAuth,
        job: &LayerJob,
        mode: DiffMode,
    ) -> Result<()> {
        let layer = &job.layer;
        let snapshots = self.snapshots.clone();
        let key = job.key.clone();
        let content = self.content.clone();
        let digest = layer.digest.clone();

        let unpacked = if self.content.exists(&digest) {
            blocking(move || {
                let dir = snapshots.diff_dir(&key)?;
                let blob = content.open_blob(&digest)?;
                Ok(unpack(mode, blob, &dir)?)
            })
            .await
        } else {
            let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(32);
            let worker = tokio::task::spawn_blocking(move || -> Result<_> {
                let dir = snapshots.diff_dir(&key)?;
                let mut blob = content.writer(&digest)?;
                let reader = TeeReader {
                    inner: ChannelReader::new(rx),
                    blob: &mut blob,
                };
                let unpacked = unpack(mode, reader, &dir)?;
                blob.commit()?;
                Ok(unpacked)
            });
            let download = async {
                let (_, mut stream) = registry::blob_stream(ep, r, &layer.digest, auth).await?;
                let mut received: u64 = 0;
                let mut hasher = Sha256::new();
                // When the unpacker stops early (it found the layer bad), the rest is still
                // read, within the descriptor's size, so that a corrupt blob is reported as one.
                let mut unpacking = true;
                let mut problem = None;
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) => {
                            let err = stream_error(ep, &layer.digest, &e);
                            if unpacking {
                                let _ = tx.send(Err(e)).await;
                            }
                            return Err(err);
                        }
                    };
                    received = received.saturating_add(chunk.len() as u64);
                    if received > layer.size {
                        problem = Some(format!(
                            "is longer than the {} bytes its descriptor says",
                            layer.size
                        ));
                        break;
                    }
                    hasher.update(&chunk);
                    if unpacking && tx.send(Ok(chunk)).await.is_err() {
                        unpacking = false;
                    }
                }
                if problem.is_none() && received != layer.size {
                    problem = Some(format!(
                        "has {received} bytes; its descriptor says {}",
                        layer.size
                    ));
                }
                if problem.is_none() {
                    let got = Digest::from_sha256_bytes(&hasher.finalize().into());
                    if got != layer.digest {
                        problem = Some(format!("has digest {got} (digest mismatch)"));
                    }
                }
                match problem {
                    None => Ok(()),
                    Some(p) => {
                        // The unpacker must not take what arrived as the whole layer.
                        if unpacking {
                            let _ = tx.send(Err(std::io::Error::other("bad blob"))).await;
                        }
                        Err(Error::BadContent(format!(
                            "{r}: layer {} from {ep:?} {p}",
                            layer.digest
                        )))
                    }
                }
            };
            let downloaded = download.await;
            drop(tx);
            let unpacked = worker.await.map_err(blocking_err)?;
            // A network, size or digest failure explains a broken stream better than the unpacker.
            downloaded?;
            unpacked
        };
        let unpacked = unpacked.map_err(|e| match e {
            Error::BadContent(m) => Error::BadContent(format!("{r}: layer {}: {m}", layer.digest)),
            other => other,
        })?;
        if unpacked.diff_id != layer.diff_id {
            return Err(Error::BadContent(format!(
                "{r}: layer {} uncompresses to {}, but the config says {}",
                layer.digest, unpacked.diff_id, layer.diff_id
            )));
        }
        tracing::debug!(snapshot_key = %job.key, layer = %layer.digest, bytes = unpacked.uncompressed_size, "layer unpacked");
        Ok(())
    }

    /// The image that `image` names: an id (`sha256:<hex>` or bare hex), a reference, or a
    /// unique prefix of an id (at least [`MIN_ID_PREFIX`] hex digits, with or without
    /// `sha256:`), tried in that order as containerd does. A name that is none of these is
    /// absent, not an error; an ambiguous prefix is InvalidArgument.
    pub fn resolve(&self, image: &str) -> Result<Option<NamedImage>> {
        resolve_in(&self.store, image)
    }

    /// Every image.
    pub fn list(&self) -> Result<Vec<NamedImage>> {
        self.store.list()
    }

    /// The image config of `image`, as stored.
    pub fn config_json(&self, image: &NamedImage) -> Result<serde_json::Value> {
        let bytes = self.content.read(&image.record.id)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::internal("stored image config", e))
    }

    /// Removes the image and every name of it; content no other image uses is collected.
    /// Removing an absent image succeeds.
    pub async fn remove(&self, image: &str) -> Result<()> {
        let store = self.store.clone();
        let image = image.to_owned();
        let removed = blocking(move || {
            let Some(found) = resolve_in(&store, &image)? else {
                return Ok(None);
            };
            store.remove(&found.record.id)?;
            Ok(Some(found.record.id))
        })
        .await?;
        let Some(id) = removed else {
            return Ok(());
        };
        tracing::info!(image_id = %id, "image removed");
        self.gc_blocking().await?;
        Ok(())
    }

    /// Where the snapshot store lives: the filesystem ImageFsInfo reports for containers too.
    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots_dir
    }

    /// Bytes and inodes of the snapshot store, and where it lives.
    pub fn fs_usage(&self) -> Result<(snapshotter::Usage, PathBuf)> {
        Ok(self.snapshots.total_usage()?)
    }

    async fn gc_blocking(&self) -> Result<(usize, usize)> {
        let this = self.gc_handle();
        blocking(move || this.run()).await
    }

    /// Ends `lease` (if any) and collects what nothing holds any more, on a blocking thread.
    fn gc_in_background(&self, lease: Option<Lease>) {
        let this = self.gc_handle();
        tokio::task::spawn_blocking(move || {
            drop(lease);
            if let Err(e) = this.run() {
                tracing::warn!(error = %e, "image garbage collection failed");
            }
        });
    }

    fn gc_handle(&self) -> Gc {
        Gc {
            store: self.store.clone(),
            content: self.content.clone(),
            snapshots: self.snapshots.clone(),
            leases: self.leases.clone(),
        }
    }

    /// Removes layer snapshots and blobs that no image references and no pull holds, and
    /// `extract-*` leftovers. Returns (snapshots, blobs) removed.
    pub fn gc(&self) -> Result<(usize, usize)> {
        self.gc_handle().run()
    }
}

/// Fewest hex digits of an id prefix that [`ImageManager::resolve`] takes.
pub const MIN_ID_PREFIX: usize = 3;

fn resolve_in(store: &ImageStore, image: &str) -> Result<Option<NamedImage>> {
    let image = image.trim();
    if image.is_empty() {
        return Err(Error::InvalidArgument("image reference is empty".into()));
    }
    let as_id = if image.len() == 64 {
        format!("sha256:{image}")
    } else {
        image.to_owned()
    };
    if let Ok(id) = as_id.parse::<Digest>()
        && let Some(i) = store.get(&id)?
    {
        return Ok(Some(i));
    }
    if let Ok(r) = Reference::parse(image)
        && let Some(id) = store.resolve(&r.to_string())?
    {
        return store.get(&id);
    }
    let Some(prefix) = id_prefix(image) else {
        return Ok(None);
    };
    let mut matches = store
        .list()?
        .into_iter()
        .filter(|i| i.record.id.hex().starts_with(prefix));
    match (matches.next(), matches.next()) {
        (Some(i), None) => Ok(Some(i)),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(Error::InvalidArgument(format!(
            "image id prefix {prefix:?} is ambiguous: {} images match",
            2 + matches.count()
        ))),
    }
}

/// The hex digits of `s` if it can be a short image id: `[sha256:]<hex>`, 3 to 63 digits.
fn id_prefix(s: &str) -> Option<&str> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (hex.len() >= MIN_ID_PREFIX
        && hex.len() < 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    .then_some(hex)
}

/// What garbage collection needs, detached from the manager so it can run on any thread.
struct Gc {
    store: ImageStore,
    content: ContentStore,
    snapshots: Arc<dyn Snapshotter>,
    leases: Arc<Mutex<HashMap<String, usize>>>,
}

impl Gc {
    fn run(&self) -> Result<(usize, usize)> {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let images = self.store.list()?;
        let mut live: BTreeSet<String> = BTreeSet::new();
        for i in &images {
            live.extend(i.record.chain_ids.iter().map(|c| c.to_string()));
            live.extend(i.record.blobs().map(|d| d.to_string()));
        }
        let keep = |k: &str| live.contains(k) || leases.contains_key(k);

        let mut doomed: Vec<String> = self
            .snapshots
            .list()?
            .into_iter()
            .filter(|s| match s.kind {
                Kind::Committed => s.key.starts_with("sha256:") && !keep(&s.key),
                Kind::Active => s.key.starts_with(EXTRACT_PREFIX) && !keep(&s.key),
                Kind::View => false,
            })
            .map(|s| s.key)
            .collect();
        // Children before parents: retry what was refused until nothing more goes.
        let mut removed = 0;
        loop {
            let before = doomed.len();
            doomed.retain(|k| match self.snapshots.remove(k) {
                Ok(()) | Err(snapshotter::Error::NotFound { .. }) => {
                    removed += 1;
                    false
                }
                Err(_) => true,
            });
            if doomed.is_empty() || doomed.len() == before {
                break;
            }
        }
        for k in &doomed {
            tracing::debug!(snapshot_key = %k, "unreferenced snapshot kept: still a parent");
        }
        let mut blobs = 0;
        for d in self.content.list()? {
            if !keep(d.as_str()) {
                self.content.delete(&d)?;
                blobs += 1;
            }
        }
        Ok((removed, blobs))
    }
}

/// A blob stream that broke: the registry or the network failing.
fn stream_error(ep: &Endpoint, digest: &Digest, e: &std::io::Error) -> Error {
    Error::Unavailable(format!(
        "blob {digest} from {ep:?}: {}",
        crate::error::chain(e)
    ))
}

/// Writes a layer into a snapshot the way its store takes diffs.
fn unpack<R: Read>(
    mode: DiffMode,
    reader: R,
    dir: &std::path::Path,
) -> snapshotter::Result<snapshotter::unpack::Unpacked> {
    match mode {
        DiffMode::Overlay => snapshotter::unpack::unpack_layer(reader, dir),
        DiffMode::Apply => snapshotter::unpack::apply_layer(reader, dir),
    }
}

impl ImageManager {
    /// Commits the extract snapshot `key`, unpacked the way `mode` takes diffs, as the layer
    /// snapshot `name` on `parent`. Another importer's commit of the same layer first wins.
    fn commit_unpacked(
        &self,
        mode: DiffMode,
        name: &str,
        key: &str,
        parent: Option<&str>,
    ) -> Result<()> {
        let committed = match mode {
            DiffMode::Overlay => self.snapshots.commit_with_parent(name, key, parent),
            DiffMode::Apply => self.snapshots.commit(name, key),
        };
        keep_first(&*self.snapshots, committed, key)
    }
}

fn syncfs(dir: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::internal("open snapshots dir", e))?;
    nix::unistd::syncfs(&f).map_err(|e| Error::internal("syncfs", std::io::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a: Digest = format!("sha256:{}", "a".repeat(64))
            .parse()
            .expect("digest");
        let b: Digest = format!("sha256:{}", "b".repeat(64))
            .parse()
            .expect("digest");
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn hostile_sizes_do_not_overflow() {
        let max = i64::MAX as u64;
        assert_eq!(total_size([1, 2, 3]), Some(6));
        assert_eq!(total_size([max, max]), Some(u64::MAX - 1));
        assert_eq!(total_size([100, 200, max, max]), None);
    }

    fn record(id: Digest) -> ImageRecord {
        ImageRecord {
            manifest_digest: id.clone(),
            id,
            manifest_media_type: registry::OCI_MANIFEST.into(),
            index_digest: None,
            layers: vec![],
            chain_ids: vec![],
            size: 1,
            user: String::new(),
        }
    }

    #[test]
    fn resolve_takes_ids_names_and_unique_id_prefixes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb::Database::create(dir.path().join("meta.db")).expect("db");
        let store = ImageStore::open(Arc::new(db)).expect("open");
        let id = |hex: &str| -> Digest { format!("sha256:{hex:0<64}").parse().expect("digest") };
        let (a, b) = (id("abc1"), id("abc2"));
        store
            .put(
                &record(a.clone()),
                &["docker.io/library/busybox:latest".into()],
            )
            .expect("put");
        store
            .put(&record(b.clone()), &["docker.io/library/abc:latest".into()])
            .expect("put");
        let found = |s: &str| resolve_in(&store, s).expect(s).map(|i| i.record.id);
        assert_eq!(found(a.as_str()), Some(a.clone()));
        assert_eq!(found(a.hex()), Some(a.clone()));
        assert_eq!(found("busybox"), Some(a.clone()));
        assert_eq!(found("abc1"), Some(a.clone()));
        assert_eq!(found("sha256:abc2"), Some(b.clone()));
        // A name wins over an id prefix, as in containerd.
        assert_eq!(found("abc"), Some(b.clone()));
        assert!(matches!(
            resolve_in(&store, "sha256:abc"),
            Err(Error::InvalidArgument(m)) if m.contains("ambiguous")
        ));
        assert_eq!(found("ab"), None, "too short for a prefix");
        assert_eq!(found("abc3"), None);
        assert_eq!(found("Not A Reference"), None, "unparsable is absent");
        assert_eq!(found(&format!("sha256:{}", "f".repeat(64))), None);
        assert!(matches!(
            resolve_in(&store, " "),
            Err(Error::InvalidArgument(_))
        ));
    }
}
