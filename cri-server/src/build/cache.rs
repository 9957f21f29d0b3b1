//! The build cache: which image a build step made, by the step's key (its parent image, its
//! instruction and the digests of its inputs). The images themselves are ordinary untagged
//! image records, so the collector keeps their layers; the table only finds them again.

use std::collections::BTreeSet;
use std::sync::Arc;

use api::Digest;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

/// step key (64 hex digits) → image id.
const CACHE: TableDefinition<&str, &str> = TableDefinition::new("build_cache");

/// The cache table of the shared database.
#[derive(Clone)]
pub struct BuildCache {
    db: Arc<Database>,
}

impl BuildCache {
    /// Opens the table, creating it on first use.
    pub fn open(db: Arc<Database>) -> Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(CACHE)?;
        tx.commit()?;
        Ok(BuildCache { db })
    }

    /// The image a step with this key made, if recorded.
    pub fn get(&self, key: &str) -> Result<Option<Digest>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CACHE)?;
        let Some(v) = t.get(key)? else {
            return Ok(None);
        };
        v.value()
            .parse()
            .map(Some)
            .map_err(|e| Error::internal("build cache table", e))
    }

    /// Records that the step `key` made `image`.
    pub fn put(&self, key: &str, image: &Digest) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(CACHE)?.insert(key, image.as_str())?;
        tx.commit()?;
        Ok(())
    }

    /// Every image the cache names.
    pub fn images(&self) -> Result<BTreeSet<Digest>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CACHE)?;
        let mut out = BTreeSet::new();
        for e in t.iter()? {
            let (_, v) = e?;
            if let Ok(d) = v.value().parse() {
                out.insert(d);
            }
        }
        Ok(out)
    }

    /// Forgets every step; returns the images it named.
    pub fn clear(&self) -> Result<BTreeSet<Digest>> {
        let images = self.images()?;
        let tx = self.db.begin_write()?;
        tx.open_table(CACHE)?.retain(|_, _| false)?;
        tx.commit()?;
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_found_again_and_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Database::create(dir.path().join("meta.db")).expect("db"));
        let c = BuildCache::open(db).expect("open");
        let id = Digest::from_sha256_bytes(&[7; 32]);
        assert_eq!(c.get("k").expect("get"), None);
        c.put("k", &id).expect("put");
        assert_eq!(c.get("k").expect("get"), Some(id.clone()));
        assert_eq!(c.clear().expect("clear"), BTreeSet::from([id]));
        assert_eq!(c.get("k").expect("get"), None);
    }
}
