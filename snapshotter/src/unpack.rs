//! Layer unpack: one OCI/Docker layer tar (uncompressed, gzip or zstd, detected from its first
//! bytes) applied to an empty directory in overlayfs form.
//!
//! - `.wh.<name>` whiteouts become `<name>` character devices 0/0; `.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` on its directory.
//! - Regular files, directories, symlinks, hardlinks (within the layer), device nodes and fifos
//!   are created with the tar's mode (incl. setuid/setgid/sticky), ownership, mtime and xattrs.
//! - Entries that would write outside the directory are refused with
//!   [`crate::Error::UnsafeEntry`]: `..` components, absolute paths, a path through a symlink,
//!   a hardlink whose target is outside or missing.

use std::io::Read;
use std::path::Path;

use api::Digest;

use crate::Result;

/// What an unpack found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// sha256 of the uncompressed tar stream: the layer's diffID.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar stream.
    pub uncompressed_size: u64,
}

/// Applies the layer read from `reader` (compressed or not) into `dest`, which must exist and be
/// empty. Reads `reader` to its end, so a hashing reader around it sees the whole blob. On error
/// `dest` may hold partial contents: the caller removes it.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<Unpacked> {
    let _ = reader;
    todo!("{dest:?}")
}
