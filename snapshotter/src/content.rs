//! The content store: immutable blobs addressed by digest.
//!
//! Layout under the root given to [`ContentStore::open`]:
//! `content/sha256/<hex>` (committed blobs) and `content/ingest/` (temp files being written).
//! A blob becomes visible only once complete, verified and fsynced: partial downloads never
//! appear under `sha256/`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use api::Digest;

use crate::{Result, Usage};

/// Blobs by digest on a local filesystem.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// A blob being written. Hashes what is written; [`BlobWriter::commit`] verifies and publishes.
/// Dropped without commit, it removes its temp file.
pub struct BlobWriter {
    _private: (),
}

impl ContentStore {
    /// Opens (creating) the store under `root` (its `content/` subdirectory). Leftover ingest
    /// files from a crash are removed.
    pub fn open(root: &Path) -> Result<Self> {
        todo!("{root:?}")
    }

    /// Where the blob lives (whether it exists or not).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn exists(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    /// Starts writing a blob that must hash to `expected`.
    pub fn writer(&self, expected: &Digest) -> Result<BlobWriter> {
        todo!("{expected}")
    }

    /// Writes a small blob at once (manifests, configs), verifying its digest.
    pub fn put(&self, expected: &Digest, data: &[u8]) -> Result<()> {
        todo!("{expected} {}", data.len())
    }

    /// Reads a whole blob (for small ones: manifests, configs). [`crate::Error::NotFound`] if absent.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        todo!("{digest}")
    }

    /// Opens a blob for streaming reads. [`crate::Error::NotFound`] if absent.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        todo!("{digest}")
    }

    /// Size in bytes of a blob. [`crate::Error::NotFound`] if absent.
    pub fn size(&self, digest: &Digest) -> Result<u64> {
        todo!("{digest}")
    }

    /// Removes a blob; removing an absent blob is not an error.
    pub fn delete(&self, digest: &Digest) -> Result<()> {
        todo!("{digest}")
    }

    /// Every committed blob.
    pub fn list(&self) -> Result<Vec<Digest>> {
        todo!()
    }

    /// Bytes and inodes used by committed blobs.
    pub fn usage(&self) -> Result<Usage> {
        todo!()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        todo!()
    }

    /// Verifies the digest, fsyncs, and renames into place (fsyncing the directory).
    /// [`crate::Error::DigestMismatch`] (and the temp file removed) if the content does not
    /// hash to the expected digest. Committing a blob that already exists succeeds.
    pub fn commit(self) -> Result<u64> {
        todo!()
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        todo!("{}", buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        todo!()
    }
}
