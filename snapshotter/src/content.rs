//! The content store: immutable blobs addressed by digest.
//!
//! Layout under the root given to [`ContentStore::open`]:
//! `content/sha256/<hex>` (committed blobs) and `content/ingest/` (temp files being written).
//! A blob becomes visible only once complete, verified and fsynced: partial downloads never
//! appear under `sha256/`.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use api::Digest;
use sha2::{Digest as _, Sha256};

use crate::{Error, Result, Usage};

/// Write buffer of a [`BlobWriter`]: registry bodies arrive in small chunks, the disk prefers
/// big writes.
const WRITE_BUFFER: usize = 256 * 1024;

/// Blobs by digest on a local filesystem.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// A temp file in the ingest dir being written and hashed. Dropped unpublished, it removes
/// itself.
struct TempBlob {
    /// `None` once published (or failed to be): nothing left to clean up.
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    hasher: Sha256,
    written: u64,
}

impl TempBlob {
    fn new(file: File, temp: PathBuf) -> TempBlob {
        TempBlob {
            file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            temp,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The digest of what was written so far.
    fn digest(&self) -> Digest {
        Digest::from_sha256_bytes(&self.hasher.clone().finalize().into())
    }

    /// fsyncs and renames the file to `target`, then fsyncs `target`'s directory. With
    /// `keep_existing`, a `target` already there stays and the temp file goes.
    fn publish(mut self, target: &Path, keep_existing: bool) -> Result<u64> {
        let Some(buffered) = self.file.take() else {
            return Err(Error::InvalidState {
                key: self.temp.display().to_string(),
                reason: "blob writer already failed".into(),
            });
        };
        let synced = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all());
        if let Err(e) = synced {
            remove_temp(&self.temp);
            return Err(Error::io("fsync ingest file", &self.temp, e));
        }
        if keep_existing && target.is_file() {
            remove_temp(&self.temp);
            return Ok(self.written);
        }
        if let Err(e) = fs::rename(&self.temp, target) {
            remove_temp(&self.temp);
            return Err(Error::io("rename blob into place", target, e));
        }
        if let Some(dir) = target.parent() {
            fsync_dir(dir)?;
        }
        Ok(self.written)
    }
}

impl Write for TempBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            remove_temp(&self.temp);
        }
    }
}

/// A blob being written. Hashes what is written; [`BlobWriter::commit`] verifies and publishes.
/// Dropped without commit, it removes its temp file.
pub struct BlobWriter {
    blob: TempBlob,
    target: PathBuf,
    expected: Digest,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("temp", &self.blob.temp)
            .field("expected", &self.expected)
            .field("written", &self.blob.written)
            .finish_non_exhaustive()
    }
}

/// A blob being written whose digest is not known in advance (a layer being diffed and
/// compressed): hashes what is written; [`Ingest::commit`] publishes it under that hash.
/// Dropped without commit, it removes its temp file.
pub struct Ingest {
    blob: TempBlob,
    /// `content/sha256`, where the blob goes.
    blobs: PathBuf,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("temp", &self.blob.temp)
            .field("written", &self.blob.written)
            .finish_non_exhaustive()
    }
}

fn not_found(digest: &Digest) -> Error {
    Error::NotFound {
        what: "blob",
        key: digest.to_string(),
    }
}

/// fsyncs a directory, so that a rename into it survives a crash.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync dir", dir, e))
}

/// A name nobody else picks: 64 random bits from the std hasher's per-process random keys.
pub(crate) fn random_name(prefix: &str) -> String {
    let n = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{prefix}{n:016x}")
}

impl ContentStore {
    /// Opens (creating) the store under `root` (its `content/` subdirectory). Leftover ingest
    /// files from a crash are removed.
    pub fn open(root: &Path) -> Result<Self> {
        let store = ContentStore {
            root: root.join("content"),
        };
        for dir in [store.root.join("sha256"), store.ingest_dir()] {
            fs::create_dir_all(&dir).map_err(|e| Error::io("create dir", &dir, e))?;
        }
        let ingest = store.ingest_dir();
        let entries = fs::read_dir(&ingest).map_err(|e| Error::io("read dir", &ingest, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read dir", &ingest, e))?;
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match removed {
                Ok(()) => tracing::debug!(path = %path.display(), "removed leftover ingest file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove leftover ingest file", path, e)),
            }
        }
        Ok(store)
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Where the blob lives (whether it exists or not).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn exists(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    /// Creates a new temp file in the ingest dir, named `<prefix><random>`.
    fn create_temp(&self, prefix: &str) -> Result<(File, PathBuf)> {
        let ingest = self.ingest_dir();
        // A collision of 64 random bits is next to impossible; create_new makes it harmless.
        let mut attempts = 0;
        loop {
            let temp = ingest.join(random_name(prefix));
            match OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(f) => return Ok((f, temp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
                Err(e) => return Err(Error::io("create ingest file", temp, e)),
            }
        }
    }

    /// Starts writing a blob that must hash to `expected`.
    pub fn writer(&self, expected: &Digest) -> Result<BlobWriter> {
        let (file, temp) = self.create_temp(&format!("{}-", &expected.hex()[..12]))?;
        Ok(BlobWriter {
            blob: TempBlob::new(file, temp),
            target: self.path(expected),
            expected: expected.clone(),
        })
    }

    /// Starts writing a blob whose digest is whatever its content hashes to, known only at
    /// [`Ingest::commit`].
    pub fn ingest(&self) -> Result<Ingest> {
        let (file, temp) = self.create_temp("unknown-")?;
        Ok(Ingest {
            blob: TempBlob::new(file, temp),
            blobs: self.root.join("sha256"),
        })
    }

    /// Writes a small blob at once (manifests, configs), verifying its digest.
    pub fn put(&self, expected: &Digest, data: &[u8]) -> Result<()> {
        let mut w = self.writer(expected)?;
        w.write_all(data)
            .map_err(|e| Error::io("write ingest file", &w.blob.temp, e))?;
        w.commit().map(drop)
    }

    /// Reads a whole blob (for small ones: manifests, configs). [`crate::Error::NotFound`] if absent.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_found(digest),
            _ => Error::io("read blob", path, e),
        })
    }

    /// Opens a blob for streaming reads. [`crate::Error::NotFound`] if absent.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_found(digest),
            _ => Error::io("open blob", path, e),
        })
    }

    /// Size in bytes of a blob. [`crate::Error::NotFound`] if absent.
    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(digest)),
            Err(e) => Err(Error::io("stat blob", path, e)),
        }
    }

    /// Removes a blob; removing an absent blob is not an error.
    pub fn delete(&self, digest: &Digest) -> Result<()> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove blob", path, e)),
        }
    }

    /// Every committed blob. Files under `sha256/` whose name is not 64 lowercase hex digits
    /// (put there by hand) are skipped.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        self.for_each_blob(|digest, _| out.push(digest))?;
        Ok(out)
    }

    /// Bytes and inodes used by committed blobs. Bytes are the blobs' apparent sizes (their
    /// lengths), the same measure as [`Usage::size`] elsewhere, not the blocks they occupy.
    pub fn usage(&self) -> Result<Usage> {
        let mut usage = Usage::default();
        self.for_each_blob(|_, meta| {
            usage.size += meta.len();
            usage.inodes += 1;
        })?;
        Ok(usage)
    }

    fn for_each_blob(&self, mut f: impl FnMut(Digest, fs::Metadata)) -> Result<()> {
        let dir = self.root.join("sha256");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("read dir", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read dir", &dir, e))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|name| format!("sha256:{name}").parse::<Digest>().ok())
            else {
                continue;
            };
            match entry.metadata() {
                Ok(meta) if meta.is_file() => f(digest, meta),
                Ok(_) => {}
                // Deleted while we listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat blob", entry.path(), e)),
            }
        }
        Ok(())
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.blob.written
    }

    /// Verifies the digest, fsyncs, and renames into place (fsyncing the directory).
    /// [`crate::Error::DigestMismatch`] (and the temp file removed) if the content does not
    /// hash to the expected digest. Committing a blob that already exists succeeds.
    pub fn commit(self) -> Result<u64> {
        let actual = self.blob.digest();
        if actual != self.expected {
            // Dropping the temp blob removes its file.
            return Err(Error::DigestMismatch {
                expected: self.expected.to_string(),
                actual: actual.to_string(),
            });
        }
        self.blob.publish(&self.target, false)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.blob.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.blob.flush()
    }
}

impl Ingest {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.blob.written
    }

    /// fsyncs, and renames into place under the digest of what was written (fsyncing the
    /// directory); returns that digest and the size. If a blob with that digest already exists
    /// it is kept and the temp file removed: committing the same content twice succeeds.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let digest = self.blob.digest();
        let target = self.blobs.join(digest.hex());
        let written = self.blob.publish(&target, true)?;
        Ok((digest, written))
    }
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.blob.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.blob.flush()
    }
}

fn remove_temp(temp: &Path) {
    if let Err(e) = fs::remove_file(temp)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %temp.display(), error = %e, "remove ingest file");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn digest_of(data: &[u8]) -> Digest {
        Digest::from_sha256_bytes(&Sha256::digest(data).into())
    }

    fn ingest_count(root: &Path) -> usize {
        fs::read_dir(root.join("content/ingest")).unwrap().count()
    }

    #[test]
    fn write_and_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let data = b"hello blob".repeat(100_000);
        let d = digest_of(&data);
        assert!(!store.exists(&d));
        let mut w = store.writer(&d).unwrap();
        for chunk in data.chunks(7777) {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(w.written(), data.len() as u64);
        assert_eq!(ingest_count(tmp.path()), 1);
        assert_eq!(w.commit().unwrap(), data.len() as u64);
        assert!(store.exists(&d));
        assert_eq!(store.read(&d).unwrap(), data);
        assert_eq!(store.size(&d).unwrap(), data.len() as u64);
        assert_eq!(
            store.path(&d),
            tmp.path().join("content/sha256").join(d.hex())
        );
        assert_eq!(ingest_count(tmp.path()), 0);
        // Committing the same blob again is fine.
        store.put(&d, &data).unwrap();
        let mut read = Vec::new();
        io::Read::read_to_end(&mut store.open_blob(&d).unwrap(), &mut read).unwrap();
        assert_eq!(read, data);
    }

    #[test]
    fn mismatch_rejected_and_temp_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let d = digest_of(b"expected");
        let mut w = store.writer(&d).unwrap();
        w.write_all(b"something else").unwrap();
        let err = w.commit().unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
        assert_eq!(ingest_count(tmp.path()), 0);
        assert!(!store.exists(&d));
        assert!(matches!(
            store.put(&d, b"nope"),
            Err(Error::DigestMismatch { .. })
        ));
        assert_eq!(ingest_count(tmp.path()), 0);
    }

    #[test]
    fn drop_removes_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let d = digest_of(b"x");
        let mut w = store.writer(&d).unwrap();
        w.write_all(b"partial").unwrap();
        assert_eq!(ingest_count(tmp.path()), 1);
        drop(w);
        assert_eq!(ingest_count(tmp.path()), 0);
        assert!(!store.exists(&d));
    }

    #[test]
    fn ingest_commit_drop_and_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let data = b"unknown in advance".repeat(50_000);
        let d = digest_of(&data);
        let mut w = store.ingest().unwrap();
        for chunk in data.chunks(4099) {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(w.written(), data.len() as u64);
        assert_eq!(ingest_count(tmp.path()), 1);
        assert!(!store.exists(&d), "nothing visible before commit");
        assert_eq!(w.commit().unwrap(), (d.clone(), data.len() as u64));
        assert_eq!(store.read(&d).unwrap(), data);
        assert_eq!(ingest_count(tmp.path()), 0);

        // The same content again: the existing blob stays, the temp file goes.
        let before = fs::metadata(store.path(&d)).unwrap();
        let mut w = store.ingest().unwrap();
        w.write_all(&data).unwrap();
        assert_eq!(w.commit().unwrap(), (d.clone(), data.len() as u64));
        let after = fs::metadata(store.path(&d)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(before.ino(), after.ino());
        assert_eq!(ingest_count(tmp.path()), 0);

        // Dropped uncommitted: gone, nothing published.
        let mut w = store.ingest().unwrap();
        w.write_all(b"partial").unwrap();
        assert_eq!(ingest_count(tmp.path()), 1);
        drop(w);
        assert_eq!(ingest_count(tmp.path()), 0);
        assert!(!store.exists(&digest_of(b"partial")));

        // An empty blob is a blob.
        let (empty, size) = store.ingest().unwrap().commit().unwrap();
        assert_eq!((empty.clone(), size), (digest_of(b""), 0));
        assert_eq!(store.read(&empty).unwrap(), b"");
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn open_cleans_ingest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let d = digest_of(b"x");
        let mut w = store.writer(&d).unwrap();
        w.write_all(b"x").unwrap();
        // A crash: the writer never runs its drop.
        std::mem::forget(w);
        fs::create_dir(tmp.path().join("content/ingest/olddir")).unwrap();
        assert_eq!(ingest_count(tmp.path()), 2);
        ContentStore::open(tmp.path()).unwrap();
        assert_eq!(ingest_count(tmp.path()), 0);
    }

    #[test]
    fn put_read_delete_list_usage() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        assert_eq!(store.list().unwrap(), vec![]);
        assert_eq!(store.usage().unwrap(), Usage::default());
        let a = digest_of(b"aaa");
        let b = digest_of(b"bbbbb");
        store.put(&a, b"aaa").unwrap();
        store.put(&b, b"bbbbb").unwrap();
        // Junk that is not a blob.
        fs::write(tmp.path().join("content/sha256/junk"), b"junk").unwrap();
        fs::write(
            tmp.path().join("content/sha256").join("A".repeat(64)),
            b"junk",
        )
        .unwrap();
        let mut listed = store.list().unwrap();
        listed.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(listed, want);
        assert_eq!(store.usage().unwrap(), Usage { size: 8, inodes: 2 });
        assert_eq!(store.read(&a).unwrap(), b"aaa");
        store.delete(&a).unwrap();
        store.delete(&a).unwrap();
        assert!(matches!(
            store.read(&a),
            Err(Error::NotFound { what: "blob", .. })
        ));
        assert!(matches!(store.size(&a), Err(Error::NotFound { .. })));
        assert!(matches!(store.open_blob(&a), Err(Error::NotFound { .. })));
        assert_eq!(store.list().unwrap(), vec![b]);
        assert_eq!(store.usage().unwrap(), Usage { size: 5, inodes: 1 });
    }
}
