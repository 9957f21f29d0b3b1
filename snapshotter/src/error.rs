//! The snapshotter crate's error type.

use std::path::PathBuf;

/// Errors of the content store, unpacker and snapshotters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot or blob with that key or digest.
    #[error("{what} {key:?} not found")]
    NotFound {
        /// `snapshot` or `blob`.
        what: &'static str,
        /// The missing key or digest.
        key: String,
    },
    /// The key or name is already taken.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The operation does not fit the snapshot's kind or its children.
    #[error("snapshot {key:?}: {reason}")]
    InvalidState {
        /// The snapshot.
        key: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// A blob's content does not hash to the digest it was fetched by.
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A layer tar entry was refused (path traversal, link escape, unsupported type...).
    #[error("layer entry {entry:?} refused: {reason}")]
    UnsafeEntry {
        /// The entry's path as the tar names it.
        entry: String,
        /// Why.
        reason: String,
    },
    /// The layer stream is not a valid (compressed) tar: truncated, corrupt.
    #[error("read layer stream")]
    ReadLayer(#[source] std::io::Error),
    /// Writing a layer tar (a snapshot's diff) to its output failed.
    #[error("write layer stream")]
    WriteLayer(#[source] std::io::Error),
    /// A snapshot's change cannot go into a layer tar as it is (a file changed while it was
    /// read, a name or number no tar header holds, an overlay feature the diff cannot follow).
    #[error("diff entry {entry:?}: {reason}")]
    DiffEntry {
        /// The entry's path, relative to the snapshot.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("{op} {path:?}")]
    Io {
        /// The operation, as a verb phrase (`create dir`, `rename`).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Mounting or unmounting failed.
    #[error("mount {target:?}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The metadata database holds something we cannot read.
    #[error("snapshot metadata: {0}")]
    Metadata(String),
    /// A metadata database operation failed.
    #[error("snapshot metadata: {op}")]
    Database {
        /// The operation (`begin write`, `commit`, `open table`...).
        op: &'static str,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
}

impl Error {
    /// Builds an [`Error::Database`] for `op` from any redb error.
    pub(crate) fn db<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Error::Database {
            op,
            source: Box::new(e.into()),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
