//! berth's image storage: the content store (blobs by digest), layer unpack, and snapshots.
//!
//! - [`content::ContentStore`]: blobs under `<root>/content/sha256/<hex>`, written through a
//!   temp file in `<root>/content/ingest/`, verified, fsynced and renamed into place.
//! - [`unpack::unpack_layer`]: writes one (possibly compressed) layer tar to an empty directory
//!   in overlayfs form; [`unpack::apply_layer`]: applies one onto an existing tree (whiteouts
//!   delete). Both refuse anything that would write outside the directory and return the
//!   layer's diffID; [`unpack::sync_filesystem`] then flushes it once before the snapshot is
//!   committed. Which one a store takes is its [`DiffMode`].
//! - [`diff::diff`]: the reverse, an active snapshot's changes as an uncompressed layer tar;
//!   [`diff::layer_blob`] compresses it into the content store.
//! - [`Snapshotter`]: the contract of a snapshot store; [`overlay::OverlaySnapshotter`]
//!   implements it with overlayfs, [`native::NativeSnapshotter`] with plain copies where
//!   overlayfs is unavailable. Both keep their metadata in tables named `snapshots.*` of the
//!   daemon's shared redb database.
//! - `testsuite` (tests, or the `testsuite` feature): the conformance suite every
//!   [`Snapshotter`] passes.
#![warn(missing_docs)]

pub mod content;
pub mod diff;
pub mod error;
pub mod native;
pub mod overlay;
mod store;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;
pub mod unpack;

use std::path::PathBuf;

pub use api::Mount;
use serde::{Deserialize, Serialize};

pub use crate::error::{Error, Result};

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Writable, not yet committed; its mounts are read-write.
    Active,
    /// Read-only view of a parent; never committed.
    View,
    /// Immutable; can be a parent.
    Committed,
}

/// The recorded facts of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The snapshot's key (active, view) or name (committed).
    pub key: String,
    /// The committed snapshot it sits on, if any.
    pub parent: Option<String>,
    /// Its kind.
    pub kind: Kind,
}

/// Disk usage of one snapshot's own layer (not its parents').
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of file content (apparent size of regular files, plus directories and symlinks as
    /// the filesystem reports them).
    pub size: u64,
    /// Number of inodes.
    pub inodes: u64,
}

/// How a snapshot store takes layer diffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffMode {
    /// A layer's diff stands alone in overlay form (whiteouts as 0/0 character devices, opaque
    /// dirs as xattrs): each layer is unpacked into a parentless active snapshot and committed
    /// onto its parent with [`Snapshotter::commit_with_parent`], so all layers of an image can
    /// unpack at once.
    Overlay,
    /// A layer is applied onto a full copy of its parent (whiteouts delete), so layers go one
    /// after another: prepare on the committed parent, apply, commit.
    Apply,
}

/// A store of layered filesystem snapshots, as containerd's snapshotter API defines them.
///
/// Keys and names share one namespace: no two snapshots have the same key, whatever their kind.
/// Every method is safe to call from several threads at once; each call is atomic with
/// respect to a crash (a snapshot either exists completely or not at all after restart).
/// Methods block on disk I/O: async callers run them on a blocking thread.
pub trait Snapshotter: Send + Sync {
    /// Facts of `key`. Errors with [`Error::NotFound`] if no snapshot has that key.
    fn stat(&self, key: &str) -> Result<Info>;

    /// Creates an active snapshot `key` on top of the committed snapshot `parent` (or empty when
    /// `None`) and returns the mounts that give its read-write view. Errors with
    /// [`Error::AlreadyExists`] if `key` is taken, [`Error::NotFound`] if `parent` does not exist
    /// and [`Error::InvalidState`] if `parent` is not committed.
    fn prepare(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>>;

    /// Like [`prepare`](Self::prepare) but read-only: the snapshot is a view and can never be
    /// committed.
    fn view(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>>;

    /// The mounts of an existing active snapshot or view, the same as `prepare`/`view` returned.
    /// For a committed snapshot, read-only mounts of its contents. [`Error::NotFound`] if absent.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// How layer diffs get into this store; see [`DiffMode`].
    fn diff_mode(&self) -> DiffMode;

    /// Where a layer diff is written for the active snapshot `key`. In [`DiffMode::Overlay`] it
    /// holds only the snapshot's own changes (the overlay upperdir), written in overlay form by
    /// [`unpack::unpack_layer`]. In [`DiffMode::Apply`] it is the snapshot's whole tree (its
    /// parent's contents included), changed by [`unpack::apply_layer`].
    /// [`Error::InvalidState`] for a view or committed snapshot.
    fn diff_dir(&self, key: &str) -> Result<PathBuf>;

    /// Where the committed snapshot `key`'s contents are kept, for reading only (never write
    /// there): in [`DiffMode::Apply`] its whole tree, its parents' contents included; in
    /// [`DiffMode::Overlay`] only its own layer, in overlay form (the upper dir it was committed
    /// from, whiteouts and opaque xattrs included). It exists as long as the snapshot does.
    /// [`Error::NotFound`] if absent, [`Error::InvalidState`] for an active snapshot or a view.
    fn committed_dir(&self, key: &str) -> Result<PathBuf>;

    /// Turns the active snapshot `key` into the committed snapshot `name`, with the parent given
    /// at prepare. `key` ceases to exist. [`Error::AlreadyExists`] if `name` is taken,
    /// [`Error::InvalidState`] if `key` is not active.
    fn commit(&self, name: &str, key: &str) -> Result<()>;

    /// Like [`commit`](Self::commit), but sets the committed snapshot's parent to `parent`
    /// instead of the one given at prepare. Only meaningful when the contents were written as a
    /// diff through [`diff_dir`](Self::diff_dir) (never through a mount): this is what lets a
    /// puller unpack every layer of an image at once, before its parents are committed.
    /// `parent` must be committed.
    fn commit_with_parent(&self, name: &str, key: &str, parent: Option<&str>) -> Result<()>;

    /// Removes `key` and its contents. [`Error::NotFound`] if absent; [`Error::InvalidState`]
    /// (and nothing removed) if another snapshot has it as parent.
    fn remove(&self, key: &str) -> Result<()>;

    /// Disk usage of the snapshot's own layer. [`Error::NotFound`] if absent.
    fn usage(&self, key: &str) -> Result<Usage>;

    /// Every snapshot, in no particular order.
    fn list(&self) -> Result<Vec<Info>>;

    /// Total usage of the whole store, on the filesystem that holds it: (bytes, inodes) of all
    /// snapshots, plus where it lives (for ImageFsInfo).
    fn total_usage(&self) -> Result<(Usage, PathBuf)>;
}
