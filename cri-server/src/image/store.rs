//! Image metadata in redb: image records by id, and the references (tags, digests) that name
//! them. Every change is one write transaction, so a crash leaves either the old or the new
//! state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use api::Digest;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// image id → JSON [`ImageRecord`].
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
/// reference (`registry/repo:tag`, `registry/repo@sha256:…`) → image id.
const REFS: TableDefinition<&str, &str> = TableDefinition::new("image_refs");

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
}

/// What berthd knows of a pulled image. Its id is the config digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Config digest.
    pub id: Digest,
    /// Digest of the platform manifest.
    pub manifest_digest: Digest,
    /// Media type of the platform manifest.
    pub manifest_media_type: String,
    /// Digest of the index the manifest was chosen from, if any.
    pub index_digest: Option<Digest>,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Snapshot names (chain ids), bottom first.
    pub chain_ids: Vec<Digest>,
    /// Bytes of all blobs (manifest, config, layers), as containerd reports image size.
    pub size: u64,
    /// The config's `User`.
    pub user: String,
}

impl ImageRecord {
    /// Every blob this image holds in the content store.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.id, &self.manifest_digest]
            .into_iter()
            .chain(self.index_digest.as_ref())
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// An image with the references that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedImage {
    /// The record.
    pub record: ImageRecord,
    /// Tag references, sorted.
    pub tags: Vec<String>,
    /// Digest references, sorted.
    pub digests: Vec<String>,
}

/// The image metadata tables of the shared database.
#[derive(Clone)]
pub struct ImageStore {
    db: Arc<Database>,
}

fn decode(id: &str, bytes: &[u8]) -> Result<ImageRecord> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Internal(format!("image record {id} is corrupt: {e}")))
}

fn is_digest_ref(r: &str) -> bool {
    r.contains('@')
}

impl ImageStore {
    /// Opens the tables, creating them on first use.
    pub fn open(db: Arc<Database>) -> Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(IMAGES)?;
        tx.open_table(REFS)?;
        tx.commit()?;
        Ok(ImageStore { db })
    }

    /// The id a reference names, if any.
    pub fn resolve(&self, reference: &str) -> Result<Option<Digest>> {
        let tx = self.db.begin_read()?;
        let refs = tx.open_table(REFS)?;
        let Some(id) = refs.get(reference)? else {
            return Ok(None);
        };
        let id = id
            .value()
            .parse()
            .map_err(|e| Error::internal("image ref table", e))?;
        Ok(Some(id))
    }

    /// The image with this id, with its names.
    pub fn get(&self, id: &Digest) -> Result<Option<NamedImage>> {
        Ok(self.list()?.into_iter().find(|i| &i.record.id == id))
    }

    /// Every image, with its names.
    pub fn list(&self) -> Result<Vec<NamedImage>> {
        let tx = self.db.begin_read()?;
        let images = tx.open_table(IMAGES)?;
        let refs = tx.open_table(REFS)?;
        let mut names: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for entry in refs.iter()? {
            let (r, id) = entry?;
            let slot = names.entry(id.value().to_owned()).or_default();
            if is_digest_ref(r.value()) {
                slot.1.push(r.value().to_owned());
            } else {
                slot.0.push(r.value().to_owned());
            }
        }
        let mut out = Vec::new();
        for entry in images.iter()? {
            let (id, bytes) = entry?;
            let record = decode(id.value(), bytes.value())?;
            let (tags, digests) = names.remove(id.value()).unwrap_or_default();
            out.push(NamedImage {
                record,
                tags,
                digests,
            });
        }
        Ok(out)
    }

    /// Stores `record` and points each of `references` at it, in one transaction. A reference
    /// that named another image moves; an image left with no reference is deleted. Returns
    /// the ids of deleted images (their content is for the caller's GC).
    pub fn put(&self, record: &ImageRecord, references: &[String]) -> Result<Vec<Digest>> {
        let json = serde_json::to_vec(record).map_err(|e| Error::internal("encode image", e))?;
        let tx = self.db.begin_write()?;
        let mut orphaned = Vec::new();
        {
            let mut images = tx.open_table(IMAGES)?;
            let mut refs = tx.open_table(REFS)?;
            images.insert(record.id.as_str(), json.as_slice())?;
            let mut displaced = BTreeSet::new();
            for r in references {
                if let Some(old) = refs.insert(r.as_str(), record.id.as_str())?
                    && old.value() != record.id.as_str()
                {
                    displaced.insert(old.value().to_owned());
                }
            }
            for old in displaced {
                let still_named = refs
                    .iter()?
                    .any(|e| e.is_ok_and(|(_, id)| id.value() == old));
                if !still_named {
                    images.remove(old.as_str())?;
                    orphaned.push(old.parse().map_err(|e| Error::internal("image table", e))?);
                }
            }
        }
        tx.commit()?;
        Ok(orphaned)
    }

    /// Deletes one reference; the image stays (it has others: callers check).
    pub fn remove_ref(&self, reference: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(REFS)?.remove(reference)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes the image and every reference to it. Returns whether it existed.
    pub fn remove(&self, id: &Digest) -> Result<bool> {
        let tx = self.db.begin_write()?;
        let existed;
        {
            let mut images = tx.open_table(IMAGES)?;
            let mut refs = tx.open_table(REFS)?;
            existed = images.remove(id.as_str())?.is_some();
            refs.retain(|_, v| v != id.as_str())?;
        }
        tx.commit()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::from_sha256_bytes(&[n; 32])
    }

    fn record(n: u8) -> ImageRecord {
        ImageRecord {
            id: digest(n),
            manifest_digest: digest(n + 100),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            layers: vec![],
            chain_ids: vec![],
            size: 1,
            user: String::new(),
        }
    }

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("meta.db")).expect("db");
        (dir, ImageStore::open(Arc::new(db)).expect("open"))
    }

    #[test]
    fn tags_move_and_orphans_go() {
        let (_dir, s) = store();
        let tag = "docker.io/library/a:latest".to_string();
        assert!(
            s.put(&record(1), std::slice::from_ref(&tag))
                .expect("put")
                .is_empty()
        );
        assert_eq!(s.resolve(&tag).expect("resolve"), Some(digest(1)));
        // The tag moves to image 2; image 1 has no other name and is deleted.
        assert_eq!(
            s.put(&record(2), std::slice::from_ref(&tag)).expect("put"),
            vec![digest(1)]
        );
        assert_eq!(s.list().expect("list").len(), 1);
        // An image that keeps a digest reference stays, untagged.
        let dref = "docker.io/library/a@sha256:ab".to_string();
        assert_eq!(
            s.put(&record(3), &[tag.clone(), dref.clone()])
                .expect("put"),
            vec![digest(2)]
        );
        assert!(
            s.put(&record(4), std::slice::from_ref(&tag))
                .expect("put")
                .is_empty()
        );
        let three = s.get(&digest(3)).expect("get").expect("present");
        assert!(three.tags.is_empty());
        assert_eq!(three.digests, vec![dref]);
    }

    #[test]
    fn remove_drops_refs() {
        let (_dir, s) = store();
        s.put(&record(1), &["x:1".into(), "x@sha256:1".into()])
            .expect("put");
        assert!(s.remove(&digest(1)).expect("remove"));
        assert!(!s.remove(&digest(1)).expect("remove again"));
        assert_eq!(s.resolve("x:1").expect("resolve"), None);
        assert!(s.list().expect("list").is_empty());
    }
}
