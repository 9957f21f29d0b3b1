//! Copy-based snapshots for hosts where overlayfs is unavailable.

use std::path::Path;
use std::sync::Arc;

use crate::Result;

/// Snapshots as full directory copies of their parent; mounts are bind mounts.
pub struct NativeSnapshotter {
    _private: (),
}

impl NativeSnapshotter {
    /// Opens the store under `root` (its `snapshots/` subdirectory) with metadata in `db`.
    pub fn new(root: &Path, db: Arc<redb::Database>) -> Result<Self> {
        todo!("{root:?} {}", Arc::strong_count(&db))
    }
}
