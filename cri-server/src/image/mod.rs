//! The image half of the core: pull into the content store and snapshots, list, inspect,
//! remove, garbage-collect, and recover after a crash.
//!
//! Crash safety comes from ordering: blobs and layer snapshots are committed before the image
//! record that references them, in one metadata transaction; whatever a crash leaves without
//! a record (ingest files, `extract-*` snapshots, unreferenced layers and blobs) is collected by
//! [`ImageManager::gc`] at start.

pub mod reference;
pub mod registry;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::Digest;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use snapshotter::content::ContentStore;
use snapshotter::{DiffMode, Kind, Snapshotter};
use tokio::sync::mpsc;

use self::reference::{Reference, Target};
use self::registry::{Endpoint, Fetched};
pub use self::store::{ImageRecord, ImageStore, LayerRecord, NamedImage};
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

/// Images: pulls, metadata and their storage.
pub struct ImageManager {
    store: ImageStore,
    content: ContentStore,
    snapshots: Arc<dyn Snapshotter>,
    snapshots_dir: PathBuf,
    config: Arc<Config>,
    /// Names (snapshot keys, blob digests) that in-flight pulls are creating or relying on,
    /// counted. GC holds this lock for its whole sweep and never removes a leased name.
    leases: Arc<Mutex<HashMap<String, usize>>>,
    /// One lock per platform manifest digest: concurrent pulls of one image do the work once.
    pulls: tokio::sync::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

/// Names held by a pull until it ends.
struct Lease {
    map: Arc<Mutex<HashMap<String, usize>>>,
    names: Vec<String>,
}

impl Lease {
    fn add(&mut self, names: impl IntoIterator<Item = String>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for n in names {
            *map.entry(n.clone()).or_default() += 1;
            self.names.push(n);
        }
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

/// Reads chunks sent by the async download into the blocking unpacker.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
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
    pub async fn pull(&self, image: &str, auth: Option<&api::cri::AuthConfig>) -> Result<Digest> {
        let r = Reference::parse(image).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let auth = registry::auth_from_cri(auth)?;
        let eps = registry::endpoints(&self.config, &r.registry);
        let (ep, top) = registry::fetch_manifest(&eps, &r, &r.target, &auth).await?;
        let (manifest, index_digest) = if is_index(&top.media_type) {
            let digest = select_platform(&r, &top)?;
            let m = registry::fetch_manifest_at(&ep, &r, &Target::Digest(digest), &auth).await?;
            if is_index(&m.media_type) {
                return Err(Error::BadContent(format!(
                    "{r}: index points at another index"
                )));
            }
            (m, Some(top.digest.clone()))
        } else {
            (top.clone(), None)
        };

        let lock = {
            let mut pulls = self.pulls.lock().await;
            pulls.retain(|_, l| Arc::strong_count(l) > 1);
            pulls.entry(manifest.digest.clone()).or_default().clone()
        };
        let _serialised = lock.lock().await;

        let mut lease = self.lease();
        let record = self
            .fetch_image(&ep, &r, &manifest, index_digest, &mut lease)
            .await;
        let record = match record {
            Ok(rec) => rec,
            Err(e) => {
                drop(lease);
                self.gc_in_background();
                return Err(e);
            }
        };
        let mut refs = vec![r.with_digest(&top.digest).to_string()];
        if r.tag().is_some() {
            refs.push(r.to_string());
        }
        let orphans = self.store.put(&record, &refs)?;
        drop(lease);
        if !orphans.is_empty() {
            self.gc_in_background();
        }
        tracing::info!(image = %r, image_id = %record.id, "pulled");
        Ok(record.id)
    }

    /// Fetches config and layers of one platform manifest; everything committed on success.
    async fn fetch_image(
        &self,
        ep: &Endpoint,
        r: &Reference,
        manifest: &Fetched,
        index_digest: Option<Digest>,
        lease: &mut Lease,
    ) -> Result<ImageRecord> {
        let m: Manifest = parse(&format!("manifest of {r}"), &manifest.bytes)?;
        if m.config.media_type != OCI_CONFIG && m.config.media_type != DOCKER_CONFIG {
            return Err(Error::BadContent(format!(
                "{r}: unsupported config media type {:?} (not a container image)",
                m.config.media_type
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
        if m.layers.iter().any(|l| l.size < 0) || m.config.size < 0 {
            return Err(Error::BadContent(format!("{r}: negative descriptor size")));
        }
        lease.add(
            [manifest.digest.to_string(), m.config.digest.to_string()]
                .into_iter()
                .chain(index_digest.iter().map(|d| d.to_string()))
                .chain(m.layers.iter().map(|l| l.digest.to_string())),
        );

        let config_bytes = self.fetch_small_blob(ep, r, &m.config).await?;
        let config: ImageConfig = parse(&format!("config of {r}"), &config_bytes)?;
        let (os, arch) = registry::host_platform();
        if !config.os.is_empty() && (config.os != os || config.architecture != arch) {
            return Err(Error::FailedPrecondition(format!(
                "{r} is an image for {}/{}; this host runs {os}/{arch}",
                config.os, config.architecture
            )));
        }
        if config.rootfs.diff_ids.len() != m.layers.len() {
            return Err(Error::BadContent(format!(
                "{r}: config lists {} diff ids for {} layers",
                config.rootfs.diff_ids.len(),
                m.layers.len()
            )));
        }
        let chain = chain_ids(&config.rootfs.diff_ids);
        let layers: Vec<LayerRecord> = m
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(l, d)| LayerRecord {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size as u64,
                diff_id: d.clone(),
            })
            .collect();

        // Which layers are missing? Leased first, so GC cannot take a present one away.
        lease.add(chain.iter().map(|c| c.to_string()));
        let mut jobs = Vec::new();
        for (i, c) in chain.iter().enumerate() {
            match self.snapshots.stat(c.as_str()) {
                Ok(info) if info.kind == Kind::Committed => continue,
                Ok(_) => {
                    return Err(Error::Internal(format!(
                        "snapshot {c} exists but is not committed"
                    )));
                }
                Err(snapshotter::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let key = format!("{EXTRACT_PREFIX}{}-{}", rand::random::<u64>(), c.hex());
            lease.add([key.clone()]);
            jobs.push(LayerJob {
                index: i,
                layer: layers[i].clone(),
                key,
            });
        }

        let committed = match self.snapshots.diff_mode() {
            DiffMode::Overlay => self.unpack_all_at_once(ep, r, &jobs, &chain).await,
            DiffMode::Apply => self.apply_in_order(ep, r, &jobs, &chain).await,
        };
        if let Err(e) = committed {
            for job in &jobs {
                if let Err(err) = self.snapshots.remove(&job.key)
                    && !matches!(err, snapshotter::Error::NotFound { .. })
                {
                    tracing::warn!(snapshot_key = %job.key, error = %err, "cleanup after failed pull");
                }
            }
            return Err(e);
        }

        self.content.put(&manifest.digest, &manifest.bytes)?;
        self.content.put(&m.config.digest, &config_bytes)?;
        let size = manifest.bytes.len() as u64
            + config_bytes.len() as u64
            + layers.iter().map(|l| l.size).sum::<u64>();
        Ok(ImageRecord {
            id: m.config.digest.clone(),
            manifest_digest: manifest.digest.clone(),
            manifest_media_type: manifest.media_type.clone(),
            index_digest,
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
        jobs: &[LayerJob],
        chain: &[Digest],
    ) -> Result<()> {
        // By index: a closure taking `&LayerJob` trips the compiler's Send check on
        // higher-ranked lifetimes.
        let results = futures::stream::iter(0..jobs.len())
            .map(|i| async move {
                self.snapshots.prepare(&jobs[i].key, None)?;
                self.fetch_layer(ep, r, &jobs[i], DiffMode::Overlay).await
            })
            .buffer_unordered(self.config.max_concurrent_downloads)
            .collect::<Vec<_>>()
            .await;
        for res in results {
            res?;
        }
        // Unpacked files reach the disk before any snapshot naming them is committed.
        self.sync_snapshots().await?;
        for job in jobs {
            let parent = job.index.checked_sub(1).map(|p| chain[p].as_str());
            let name = chain[job.index].as_str();
            self.keep_first(
                self.snapshots.commit_with_parent(name, &job.key, parent),
                &job.key,
            )?;
        }
        Ok(())
    }

    /// Apply mode: each layer is applied onto a copy of its committed parent, one after
    /// another.
    async fn apply_in_order(
        &self,
        ep: &Endpoint,
        r: &Reference,
        jobs: &[LayerJob],
        chain: &[Digest],
    ) -> Result<()> {
        for job in jobs {
            let parent = job.index.checked_sub(1).map(|p| chain[p].as_str());
            self.snapshots.prepare(&job.key, parent)?;
            self.fetch_layer(ep, r, job, DiffMode::Apply).await?;
            self.sync_snapshots().await?;
            self.keep_first(
                self.snapshots.commit(chain[job.index].as_str(), &job.key),
                &job.key,
            )?;
        }
        Ok(())
    }

    /// The outcome of committing a layer: if another pull sharing the layer committed it first,
    /// ours is dropped.
    fn keep_first(&self, committed: snapshotter::Result<()>, key: &str) -> Result<()> {
        match committed {
            Ok(()) => Ok(()),
            Err(snapshotter::Error::AlreadyExists(_)) => Ok(self.snapshots.remove(key)?),
            Err(e) => Err(e.into()),
        }
    }

    async fn sync_snapshots(&self) -> Result<()> {
        let dir = self.snapshots_dir.clone();
        tokio::task::spawn_blocking(move || syncfs(&dir))
            .await
            .map_err(blocking_err)?
    }

    async fn fetch_small_blob(
        &self,
        ep: &Endpoint,
        r: &Reference,
        d: &Descriptor,
    ) -> Result<Bytes> {
        if let Ok(b) = self.content.read(&d.digest) {
            return Ok(b.into());
        }
        if d.size as usize > registry::MAX_MANIFEST_BYTES {
            return Err(Error::BadContent(format!(
                "{r}: config {} is too large",
                d.digest
            )));
        }
        let (_, mut stream) = registry::blob_stream(ep, r, &d.digest).await?;
        let mut buf = Vec::with_capacity(d.size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| stream_error(ep, r, &d.digest, &e))?;
            buf.extend_from_slice(&chunk);
            if buf.len() > registry::MAX_MANIFEST_BYTES {
                return Err(Error::BadContent(format!(
                    "{r}: config {} is too large",
                    d.digest
                )));
            }
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
    /// streams into a fresh `extract-*` snapshot, verifying the blob digest and the diffID.
    async fn fetch_layer(
        &self,
        ep: &Endpoint,
        r: &Reference,
        job: &LayerJob,
        mode: DiffMode,
    ) -> Result<()> {
        let layer = &job.layer;
        let dir = self.snapshots.diff_dir(&job.key)?;
        let content = self.content.clone();
        let digest = layer.digest.clone();

        let unpacked = if self.content.exists(&digest) {
            let blob = content.open_blob(&digest)?;
            tokio::task::spawn_blocking(move || unpack(mode, blob, &dir))
                .await
                .map_err(blocking_err)?
                .map_err(Error::from)
        } else {
            let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(32);
            let worker = tokio::task::spawn_blocking(move || -> Result<_> {
                let mut blob = content.writer(&digest)?;
                let reader = TeeReader {
                    inner: ChannelReader {
                        rx,
                        cur: Bytes::new(),
                    },
                    blob: &mut blob,
                };
                let unpacked = unpack(mode, reader, &dir)?;
                blob.commit()?;
                Ok(unpacked)
            });
            let download = async {
                let (_, mut stream) = registry::blob_stream(ep, r, &layer.digest).await?;
                while let Some(chunk) = stream.next().await {
                    let failed = chunk
                        .as_ref()
                        .err()
                        .map(|e| stream_error(ep, r, &layer.digest, e));
                    if tx.send(chunk).await.is_err() {
                        break; // the unpacker stopped; its error says why
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                Ok(())
            };
            let downloaded = download.await;
            drop(tx);
            let unpacked = worker.await.map_err(blocking_err)?;
            // A network failure explains a broken stream better than the unpacker does.
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

    /// The image that `image` names: an id (`sha256:<hex>` or bare hex) or a reference.
    pub fn resolve(&self, image: &str) -> Result<Option<NamedImage>> {
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
            && let Some(i) = self.store.get(&id)?
        {
            return Ok(Some(i));
        }
        let r = Reference::parse(image).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        match self.store.resolve(&r.to_string())? {
            Some(id) => self.store.get(&id),
            None => Ok(None),
        }
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
        let Some(found) = self.resolve(image)? else {
            return Ok(());
        };
        self.store.remove(&found.record.id)?;
        tracing::info!(image_id = %found.record.id, "image removed");
        self.gc_blocking().await?;
        Ok(())
    }

    /// Bytes and inodes of the snapshot store, and where it lives.
    pub fn fs_usage(&self) -> Result<(snapshotter::Usage, PathBuf)> {
        Ok(self.snapshots.total_usage()?)
    }

    async fn gc_blocking(&self) -> Result<(usize, usize)> {
        let this = self.gc_handle();
        tokio::task::spawn_blocking(move || this.run())
            .await
            .map_err(blocking_err)?
    }

    fn gc_in_background(&self) {
        let this = self.gc_handle();
        tokio::task::spawn_blocking(move || {
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

/// A failed blob stream: a digest the registry client itself found wrong is bad content; anything
/// else is the registry or the network failing.
fn stream_error(ep: &Endpoint, r: &Reference, digest: &Digest, e: &std::io::Error) -> Error {
    let bad = e.get_ref().is_some_and(|inner| {
        inner
            .downcast_ref::<oci_client::errors::DigestError>()
            .is_some()
    });
    if bad {
        Error::BadContent(format!("{r}: blob {digest} from {ep:?}: {e}"))
    } else {
        Error::Unavailable(format!("blob {digest} from {ep:?}: {e}"))
    }
}

fn select_platform(r: &Reference, index: &Fetched) -> Result<Digest> {
    let idx: Index = parse(&format!("index of {r}"), &index.bytes)?;
    let (os, arch) = registry::host_platform();
    let found = idx.manifests.iter().find(|m| {
        m.platform.as_ref().is_some_and(|p| {
            p.os == os
                && p.architecture == arch
                // amd64 has no variants worth choosing among; arm64 images say v8 or nothing.
                && p.variant.as_deref().is_none_or(|v| arch != "arm" || v == "v7")
        })
    });
    match found {
        Some(m) => Ok(m.digest.clone()),
        None => {
            let have: Vec<String> = idx
                .manifests
                .iter()
                .filter_map(|m| {
                    m.platform
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                })
                .collect();
            Err(Error::NotFound(format!(
                "{r}: no image for {os}/{arch} in the index (it has: {})",
                if have.is_empty() {
                    "no platforms".to_owned()
                } else {
                    have.join(", ")
                }
            )))
        }
    }
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
}
