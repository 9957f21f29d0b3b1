//! Paths inside a container's root, as the container sees them: every symlink resolves inside
//! the root (`openat2(RESOLVE_IN_ROOT)`), so a link an image or a container made can never make
//! berthd open or read a file of the host.

use std::io::Read;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use crate::error::{Error, Result};

/// NotFound as dockerd words it for `docker cp` (callers add the container).
pub fn not_found(path: &str) -> Error {
    Error::NotFound(format!("Could not find the file {path} in container"))
}

/// An errno of a lookup of `path`: a missing path is NotFound.
pub fn os_err(what: &str, path: &str, e: Errno) -> Error {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => not_found(path),
        e => Error::Internal(format!("{what} {path}: {e}")),
    }
}

/// Opens `path` (the container's, absolute or not) under `root` as the container would see
/// it, every symlink resolved inside the root. The last component is not followed when
/// `follow_last` is false.
pub fn open_in(
    root: BorrowedFd<'_>,
    path: &str,
    flags: OFlag,
    follow_last: bool,
) -> Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    if follow_last || rel.is_empty() {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        return openat2(root, if rel.is_empty() { "." } else { rel }, how)
            .map_err(|e| os_err("open", path, e));
    }
    let (parent, base) = split(rel);
    let dir = open_in(root, parent, OFlag::O_PATH | OFlag::O_DIRECTORY, true)?;
    openat(
        dir,
        base,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os_err("open", path, e))
}

/// `a/b/c` → (`a/b`, `c`); `c` → (`.`, `c`). Trailing slashes go first.
pub fn split(rel: &str) -> (&str, &str) {
    let rel = rel.trim_end_matches('/');
    match rel.rsplit_once('/') {
        Some((p, b)) => (if p.is_empty() { "." } else { p }, b),
        None => (".", rel),
    }
}

/// The text of the small regular file `path` in the container (`/etc/passwd`, say), or None
/// when it is missing or not a regular file (a FIFO would block, a device never end). Longer
/// than `max` bytes is an InvalidArgument.
pub fn read_small(root: BorrowedFd<'_>, path: &str, max: u64) -> Result<Option<String>> {
    let fd = match open_in(root, path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, true) {
        Ok(fd) => fd,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = fstat(&fd).map_err(|e| os_err("stat", path, e))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Ok(None);
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::InvalidArgument(format!("read {path} in the container: {e}")))?;
    if text.len() as u64 > max {
        return Err(Error::InvalidArgument(format!(
            "{path} in the container is over {max} bytes"
        )));
    }
    Ok(Some(text))
}

/// An `O_PATH` directory fd of `dir` (a container's root on the host), for the lookups above.
pub fn open_root(dir: &std::path::Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Internal(format!("open the container's root {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn small_files_are_read_inside_the_root_only() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("etc")).expect("mkdir");
        std::fs::write(t.path().join("etc/group"), "root:x:0:\n").expect("write");
        // An image's passwd pointing at the host's: read as the container's own path.
        symlink("/etc/hostname-of-the-host", t.path().join("etc/passwd")).expect("symlink");
        symlink("../../../../etc/group", t.path().join("etc/up")).expect("symlink");
        symlink("/dev/zero", t.path().join("etc/zero")).expect("symlink");
        let root = open_root(t.path()).expect("root");
        let r = root.as_fd();
        assert_eq!(read_small(r, "/etc/passwd", 100).expect("missing"), None);
        assert_eq!(
            read_small(r, "/etc/up", 100).expect("up").as_deref(),
            Some("root:x:0:\n")
        );
        // /dev/zero of the container's root does not exist here; nothing is read.
        assert_eq!(read_small(r, "/etc/zero", 100).expect("zero"), None);
        assert!(matches!(
            read_small(r, "/etc/group", 3),
            Err(Error::InvalidArgument(_))
        ));
    }
}
