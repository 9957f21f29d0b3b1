//! Images made here rather than pulled: a build step or a commit stores a parent image's layers
//! plus, maybe, one new layer, under a new config. Same crash ordering as a pull: the layer's
//! blob and snapshot, then the config and manifest blobs, then the record, all leased until the
//! record holds them.

use api::Digest;
use serde_json::{Value, json};
use snapshotter::{DiffMode, Kind};

use super::store::{ImageRecord, LayerRecord};
use super::{
    EXTRACT_PREFIX, ImageManager, Lease, MAX_LAYERS, OCI_CONFIG, chain_ids, keep_first, registry,
    sha256, syncfs, total_size, unpack,
};
use crate::error::{Error, Result};

/// A layer to add on top of the parent's.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// Its blob, already in the content store.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The digest of its uncompressed tar.
    pub diff_id: Digest,
    /// The blob's media type.
    pub media_type: String,
    /// An active snapshot (prepared on the parent's top layer) whose changes are exactly this
    /// layer, to commit as the layer's snapshot instead of unpacking the blob again. It is
    /// consumed: committed, or removed when the layer's snapshot already exists.
    pub snapshot: Option<String>,
}

impl ImageManager {
    /// An empty hold, for a build or commit to put the names it relies on in.
    pub fn new_hold(&self) -> Hold {
        Hold(self.lease())
    }

    /// Keeps `image`'s blobs and layer snapshots from the collector while `hold` lives, even if
    /// its record goes (a prune, a cache entry replaced). Blocking (the lease lock).
    pub fn hold_image(&self, hold: &mut Hold, image: &ImageRecord) {
        let names = image
            .blobs()
            .map(ToString::to_string)
            .chain(image.chain_ids.iter().map(ToString::to_string))
            .collect();
        self.lease_now(&mut hold.0, names);
    }

    /// A fresh key for an active snapshot a builder writes into, held by `hold`: named like a
    /// pull's extract snapshots, so the collector removes it if a crash leaves it behind.
    /// Blocking (the lease lock).
    pub fn scratch_snapshot_key(&self, hold: &mut Hold) -> String {
        let key = format!(
            "{EXTRACT_PREFIX}build-{}",
            hex::encode(rand::random::<[u8; 8]>())
        );
        self.lease_now(&mut hold.0, vec![key.clone()]);
        key
    }

    /// Prepares the active snapshot `key` (from [`scratch_snapshot_key`]) on `parent`'s top
    /// layer (empty without one) and returns its mounts.
    ///
    /// [`scratch_snapshot_key`]: Self::scratch_snapshot_key
    pub fn prepare_scratch(
        &self,
        key: &str,
        parent: Option<&ImageRecord>,
    ) -> Result<Vec<api::Mount>> {
        let top = parent.and_then(Self::top_snapshot);
        Ok(self.snapshots.prepare(key, top.as_deref())?)
    }

    /// Removes a scratch snapshot nothing was written to.
    pub fn drop_scratch(&self, key: &str) -> Result<()> {
        match self.snapshots.remove(key) {
            Ok(()) | Err(snapshotter::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Read-only mounts of `image`'s filesystem (an empty image has none to give: an error).
    pub fn image_mounts(&self, image: &ImageRecord) -> Result<Vec<api::Mount>> {
        let top = Self::top_snapshot(image).ok_or_else(|| {
            Error::InvalidArgument(format!("image {} has no files to copy from", image.id))
        })?;
        Ok(self.snapshots.mounts(&top)?)
    }

    /// The changes of the active snapshot `key` as a new gzip layer in the content store, held
    /// by `hold`. `consume`: the snapshot is the builder's own and becomes the layer's snapshot
    /// in [`compose`](Self::compose); otherwise (a container's) it is left alone. Blocking.
    pub fn layer_from_snapshot(
        &self,
        key: &str,
        consume: bool,
        hold: &mut Hold,
    ) -> Result<NewLayer> {
        let blob = snapshotter::diff::layer_blob(
            &*self.snapshots,
            key,
            &self.content,
            snapshotter::diff::Compression::Gzip,
        )?;
        // Held from here to the record; a collector that ran in the instant before the lease
        // took the blob: say so rather than store an image without it.
        self.lease_now(&mut hold.0, vec![blob.digest.to_string()]);
        if !self.content.exists(&blob.digest) {
            return Err(Error::Internal(
                "the new layer's blob was collected before it was held; build again".into(),
            ));
        }
        Ok(NewLayer {
            digest: blob.digest,
            size: blob.size,
            diff_id: blob.diff_id,
            media_type: blob.media_type.to_owned(),
            snapshot: consume.then(|| key.to_owned()),
        })
    }

    /// Removes those of `ids` that no reference names (build cache images). Returns those that
    /// went and the bytes their records counted. Blocking.
    pub fn remove_untagged(
        &self,
        ids: &std::collections::BTreeSet<Digest>,
    ) -> Result<(Vec<Digest>, u64)> {
        let mut removed = Vec::new();
        let mut bytes = 0;
        for i in self.store.list()? {
            if ids.contains(&i.record.id) && i.tags.is_empty() && i.digests.is_empty() {
                self.store.remove(&i.record.id)?;
                bytes += i.record.size;
                removed.push(i.record.id);
            }
        }
        if !removed.is_empty() {
            self.gc_handle().run()?;
        }
        Ok((removed, bytes))
    }

    /// The snapshot name of the top layer of `image` (None: no layers).
    pub fn top_snapshot(image: &ImageRecord) -> Option<String> {
        image.chain_ids.last().map(ToString::to_string)
    }

    /// Stores a new image: `parent`'s layers (none: from scratch), then `layer`, with `config`
    /// (the whole image config; its `rootfs` is set here), named `refs` (often none: build
    /// steps). Blocking.
    pub fn compose(
        &self,
        parent: Option<&ImageRecord>,
        layer: Option<NewLayer>,
        mut config: Value,
        refs: &[String],
    ) -> Result<ImageRecord> {
        let mut layers: Vec<LayerRecord> = parent.map(|p| p.layers.clone()).unwrap_or_default();
        let mut lease = self.lease();
        let consumed = layer.as_ref().and_then(|l| l.snapshot.clone());
        let result = (|| {
            if let Some(l) = &layer {
                if layers.len() >= MAX_LAYERS {
                    return Err(Error::InvalidArgument(format!(
                        "an image has at most {MAX_LAYERS} layers"
                    )));
                }
                self.lease_now(&mut lease, vec![l.digest.to_string()]);
                layers.push(LayerRecord {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                    diff_id: l.diff_id.clone(),
                });
            }
            let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
            let chain = chain_ids(&diff_ids);
            self.lease_now(&mut lease, chain.iter().map(ToString::to_string).collect());
            if let Some(l) = &layer {
                self.layer_snapshot(&chain, l)?;
            }
            config["rootfs"] = json!({
                "type": "layers",
                "diff_ids": diff_ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            let config_bytes =
                serde_json::to_vec(&config).map_err(|e| Error::internal("encode config", e))?;
            let id = sha256(&config_bytes);
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": registry::OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": id.to_string(), "size": config_bytes.len()},
                "layers": layers.iter().map(|l| json!({
                    "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size,
                })).collect::<Vec<_>>(),
            });
            let manifest =
                serde_json::to_vec(&manifest).map_err(|e| Error::internal("encode manifest", e))?;
            let manifest_digest = sha256(&manifest);
            self.lease_now(
                &mut lease,
                vec![id.to_string(), manifest_digest.to_string()],
            );
            self.content.put(&id, &config_bytes)?;
            self.content.put(&manifest_digest, &manifest)?;
            let size = total_size(
                [manifest.len() as u64, config_bytes.len() as u64]
                    .into_iter()
                    .chain(layers.iter().map(|l| l.size)),
            )
            .ok_or_else(|| Error::InvalidArgument("layer sizes add up past 2^64".into()))?;
            let record = ImageRecord {
                id,
                manifest_digest,
                manifest_media_type: registry::OCI_MANIFEST.to_owned(),
                index_digest: None,
                layers,
                chain_ids: chain,
                size,
                user: config["config"]["User"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            };
            let orphans = self.store.put(&record, refs)?;
            Ok((record, orphans))
        })();
        if result.is_err()
            && let Some(key) = &consumed
            && matches!(self.snapshots.stat(key), Ok(i) if i.kind == Kind::Active)
        {
            let _ = self.snapshots.remove(key);
        }
        drop(lease);
        let (record, orphans) = result?;
        if !orphans.is_empty()
            && let Err(e) = self.gc_handle().run()
        {
            tracing::warn!(error = %e, "collect images a build displaced");
        }
        Ok(record)
    }

    /// Makes the committed snapshot of the new top layer `chain.last()`: from the given active
    /// snapshot, or by unpacking the blob.
    fn layer_snapshot(&self, chain: &[Digest], l: &NewLayer) -> Result<()> {
        let name = chain
            .last()
            .map(ToString::to_string)
            .ok_or_else(|| Error::Internal("a new layer with no chain id".into()))?;
        let parent = chain.len().checked_sub(2).map(|i| chain[i].to_string());
        let present = matches!(self.snapshots.stat(&name), Ok(i) if i.kind == Kind::Committed);
        if let Some(key) = &l.snapshot {
            if present {
                self.snapshots.remove(key)?;
                return Ok(());
            }
            syncfs(&self.snapshots_dir)?;
            let committed = self.snapshots.commit(&name, key);
            return keep_first(&*self.snapshots, committed, key);
        }
        if present {
            return Ok(());
        }
        let key = format!(
            "{EXTRACT_PREFIX}{}-{}",
            rand::random::<u64>(),
            &name["sha256:".len()..]
        );
        let mut lease = self.lease();
        self.lease_now(&mut lease, vec![key.clone()]);
        let mode = self.snapshots.diff_mode();
        match mode {
            DiffMode::Overlay => self.snapshots.prepare(&key, None)?,
            DiffMode::Apply => self.snapshots.prepare(&key, parent.as_deref())?,
        };
        let done = (|| {
            let dir = self.snapshots.diff_dir(&key)?;
            let blob = self.content.open_blob(&l.digest)?;
            let unpacked = unpack(mode, blob, &dir)
                .map_err(|e| Error::Internal(format!("unpack the new layer: {e}")))?;
            if unpacked.diff_id != l.diff_id {
                return Err(Error::Internal(format!(
                    "the new layer unpacks to {}, not {}",
                    unpacked.diff_id, l.diff_id
                )));
            }
            syncfs(&self.snapshots_dir)?;
            self.commit_unpacked(mode, &name, &key, parent.as_deref())
        })();
        if done.is_err() {
            let _ = self.snapshots.remove(&key);
        }
        done
    }
}

/// Names (blobs, snapshots) a build or commit relies on, kept from the collector until it is
/// dropped. Drop it on a blocking thread: the lease lock may be held by a collector's sweep.
pub struct Hold(Lease);
