//! COPY and ADD sources: matched (paths and globs) inside a root — the build context or a
//! stage's filesystem — with every symlink resolved inside that root, filtered by
//! `.dockerignore`, hashed for the cache and written as the tar the step extracts.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use api::dockerignore::DockerIgnore;
use nix::fcntl::OFlag;
use sha2::{Digest as _, Sha256};

use crate::inroot::open_in;

/// One matched source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its path in the root, clean, without a leading `/` (empty: the root itself).
    pub rel: String,
    /// Whether it is a directory (after following a symlink at its end).
    pub is_dir: bool,
}

impl Source {
    /// The last component of its path (what a file is called at its destination).
    pub fn base_name(&self) -> &str {
        self.rel.rsplit('/').next().unwrap_or("")
    }
}

/// Cleans a source pattern as docker does: no leading `/` or `./`, `.` and `..` resolved;
/// Err when it climbs out of the root.
pub fn clean(pattern: &str) -> Result<String, String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in pattern.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "forbidden path outside the build context: {pattern}"
                    ));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Go's `filepath.Match` on one path component: `*`, `?`, `[…]` (ranges, `^` negation) and
/// `\` escapes.
pub fn component_matches(pattern: &str, name: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // p starts after '['; returns (matched, length consumed including ']').
        let mut i = 0;
        let negate = p.first() == Some(&'^');
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while i < p.len() {
            if p[i] == ']' && !first {
                return Some((matched != negate, i + 1));
            }
            first = false;
            let mut lo = p[i];
            if lo == '\\' {
                i += 1;
                lo = *p.get(i)?;
            }
            i += 1;
            let mut hi = lo;
            if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
                hi = p[i + 1];
                if hi == '\\' {
                    hi = *p.get(i + 2)?;
                    i += 1;
                }
                i += 2;
            }
            if lo <= c && c <= hi {
                matched = true;
            }
        }
        None
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match (
                n.first(),
                class(&p[1..], n.first().copied().unwrap_or('\0')),
            ) {
                (Some(_), Some((true, len))) => go(&p[1 + len..], &n[1..]),
                _ => false,
            },
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

fn excluded(ignore: Option<&DockerIgnore>, rel: &str) -> bool {
    ignore.is_some_and(|i| !rel.is_empty() && i.excluded(rel))
}

fn open_dir(root: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    open_in(
        root,
        if rel.is_empty() { "." } else { rel },
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        true,
    )
    .map_err(|e| io::Error::other(e.to_string()))
}

fn stat_in(root: BorrowedFd<'_>, rel: &str) -> Option<Metadata> {
    let fd = open_in(
        root,
        if rel.is_empty() { "." } else { rel },
        OFlag::O_PATH,
        true,
    )
    .ok()?;
    fs::metadata(fd_path(&fd)).ok()
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn names_in(root: BorrowedFd<'_>, rel: &str) -> io::Result<Vec<String>> {
    let dir = open_dir(root, rel)?;
    let mut names: Vec<String> = fs::read_dir(fd_path(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The sources `pattern` names in `root`, sorted. A plain path that is missing (or excluded)
/// and a glob that matches nothing are errors, with docker's words.
pub fn resolve(
    root: BorrowedFd<'_>,
    pattern: &str,
    ignore: Option<&DockerIgnore>,
) -> Result<Vec<Source>, String> {
    let rel = clean(pattern)?;
    let not_found = || {
        format!(
            "file not found in build context or excluded by .dockerignore: stat {pattern}: file does not exist"
        )
    };
    if !has_glob(&rel) {
        if excluded(ignore, &rel) {
            return Err(not_found());
        }
        let meta = stat_in(root, &rel).ok_or_else(not_found)?;
        return Ok(vec![Source {
            rel,
            is_dir: meta.is_dir(),
        }]);
    }
    let comps: Vec<&str> = rel.split('/').collect();
    let mut out = Vec::new();
    glob(root, String::new(), &comps, ignore, &mut out);
    if out.is_empty() {
        return Err(format!("no source files were specified by {pattern:?}"));
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn glob(
    root: BorrowedFd<'_>,
    at: String,
    comps: &[&str],
    ignore: Option<&DockerIgnore>,
    out: &mut Vec<Source>,
) {
    let Some((first, rest)) = comps.split_first() else {
        return;
    };
    let join = |name: &str| {
        if at.is_empty() {
            name.to_owned()
        } else {
            format!("{at}/{name}")
        }
    };
    let candidates: Vec<String> = if has_glob(first) {
        names_in(root, &at)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| component_matches(first, n))
            .collect()
    } else {
        vec![(*first).to_owned()]
    };
    for name in candidates {
        let rel = join(&name);
        let Some(meta) = stat_in(root, &rel) else {
            continue;
        };
        if rest.is_empty() {
            if !excluded(ignore, &rel) {
                out.push(Source {
                    rel,
                    is_dir: meta.is_dir(),
                });
            }
        } else if meta.is_dir() {
            glob(root, rel, rest, ignore, out);
        }
    }
}

/// One entry met while walking a source.
pub struct Entry<'a> {
    /// Its path relative to the source (empty: the source itself).
    pub sub: &'a str,
    /// Where to read it (a `/proc/self/fd/…` path resolved inside the root).
    pub path: &'a Path,
    /// Its metadata (not following a symlink at the end, except for the source itself).
    pub meta: &'a Metadata,
}

/// Calls `f` for the source and, for a directory, everything under it (parents before
/// children, names sorted), leaving out what `.dockerignore` excludes. Symlinks below the
/// source are entries, never followed.
pub fn walk(
    root: BorrowedFd<'_>,
    src: &Source,
    ignore: Option<&DockerIgnore>,
    f: &mut dyn FnMut(Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let fd = open_in(
        root,
        if src.rel.is_empty() { "." } else { &src.rel },
        OFlag::O_PATH,
        true,
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let top = fd_path(&fd);
    let meta = fs::metadata(&top)?;
    f(Entry {
        sub: "",
        path: &top,
        meta: &meta,
    })?;
    if meta.is_dir() {
        walk_dir(&top, &src.rel, "", ignore, f)?;
    }
    Ok(())
}

fn walk_dir(
    dir: &Path,
    ctx_rel: &str,
    sub: &str,
    ignore: Option<&DockerIgnore>,
    f: &mut dyn FnMut(Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let child_sub = if sub.is_empty() {
            name.clone()
        } else {
            format!("{sub}/{name}")
        };
        let child_ctx = if ctx_rel.is_empty() {
            name.clone()
        } else {
            format!("{ctx_rel}/{name}")
        };
        let skip = excluded(ignore, &child_ctx);
        if !skip {
            f(Entry {
                sub: &child_sub,
                path: &path,
                meta: &meta,
            })?;
        }
        if meta.is_dir() && (!skip || ignore.is_some_and(|i| i.may_include_under(&child_ctx))) {
            walk_dir(&path, &child_ctx, &child_sub, ignore, f)?;
        }
    }
    Ok(())
}

/// Feeds what a COPY of `src` depends on into `h`: names, types, modes, link targets and
/// contents (not owners or times, which a context upload does not keep stable).
pub fn hash_source(
    root: BorrowedFd<'_>,
    src: &Source,
    ignore: Option<&DockerIgnore>,
    h: &mut Sha256,
) -> io::Result<()> {
    walk(root, src, ignore, &mut |e| {
        h.update(e.sub.as_bytes());
        h.update([0]);
        h.update(e.meta.mode().to_le_bytes());
        let ft = e.meta.file_type();
        if ft.is_symlink() {
            h.update(fs::read_link(e.path)?.as_os_str().as_encoded_bytes());
        } else if ft.is_file() {
            h.update(e.meta.len().to_le_bytes());
            let mut f = File::open(e.path)?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        h.update([1]);
        Ok(())
    })
}

/// Who owns what a COPY writes, and its mode when `--chmod` says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Owner {
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// `--chmod`, if given.
    pub mode: Option<u32>,
}

/// Writes `src` into `tar`: a file as the entry `name`; a directory's contents under `name`
/// (empty: at the top), the directory itself not included.
pub fn append_source<W: Write>(
    tar: &mut tar::Builder<W>,
    root: BorrowedFd<'_>,
    src: &Source,
    name: &str,
    owner: Owner,
    ignore: Option<&DockerIgnore>,
) -> io::Result<()> {
    walk(root, src, ignore, &mut |e| {
        let tar_name = match (e.sub.is_empty(), name.is_empty()) {
            (true, _) if e.meta.is_dir() => return Ok(()),
            (true, _) => name.to_owned(),
            (false, true) => e.sub.to_owned(),
            (false, false) => format!("{name}/{}", e.sub),
        };
        append_entry(tar, &tar_name, e.path, e.meta, owner)
    })
}

fn append_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    path: &Path,
    meta: &Metadata,
    owner: Owner,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_uid(owner.uid);
    h.set_gid(owner.gid);
    h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    let perm = owner.mode.unwrap_or(meta.mode() & 0o7777);
    h.set_mode(perm);
    let ft = meta.file_type();
    if ft.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        tar.append_data(&mut h, format!("{name}/"), io::empty())
    } else if ft.is_symlink() {
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        let target = fs::read_link(path)?;
        tar.append_link(&mut h, name, target)
    } else if ft.is_file() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(meta.len());
        let f = File::open(path)?;
        tar.append_data(&mut h, name, f.take(meta.len()))
    } else if ft.is_fifo() {
        h.set_entry_type(tar::EntryType::Fifo);
        h.set_size(0);
        tar.append_data(&mut h, name, io::empty())
    } else {
        // Sockets and devices do not travel in a build.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    use super::*;

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path();
        fs::create_dir_all(p.join("src/sub")).expect("mkdir");
        fs::write(p.join("src/a.txt"), "a").expect("write");
        fs::write(p.join("src/b.txt"), "b").expect("write");
        fs::write(p.join("src/sub/c.md"), "c").expect("write");
        fs::write(p.join("top.txt"), "top").expect("write");
        symlink("/etc", p.join("escape")).expect("symlink");
        symlink("src", p.join("srclink")).expect("symlink");
        let fd = crate::inroot::open_root(p).expect("open root");
        (t, fd)
    }

    #[test]
    fn components_match_as_go_does() {
        assert!(component_matches("*.txt", "a.txt"));
        assert!(component_matches("*", ".hidden"));
        assert!(!component_matches("*.txt", "a.md"));
        assert!(component_matches("?.t[a-x]t", "a.txt"));
        assert!(!component_matches("[^a]*", "abc"));
        assert!(component_matches("[^a]*", "bc"));
        assert!(component_matches("\\*", "*"));
        assert!(!component_matches("[", "["));
    }

    #[test]
    fn sources_resolve_inside_the_root() {
        let (_t, fd) = root();
        let r = resolve(fd.as_fd(), "src/*.txt", None).expect("glob");
        let rels: Vec<_> = r.iter().map(|s| s.rel.as_str()).collect();
        assert_eq!(rels, vec!["src/a.txt", "src/b.txt"]);
        let d = resolve(fd.as_fd(), "./srclink/", None).expect("dir via link");
        assert!(d[0].is_dir);
        // /etc of the host is not reachable: the link resolves inside the root, where there is
        // no etc.
        let e = resolve(fd.as_fd(), "escape/passwd", None).expect_err("escape");
        assert!(e.contains("file not found in build context"), "{e}");
        let up = resolve(fd.as_fd(), "../x", None).expect_err("climb");
        assert!(up.contains("outside the build context"), "{up}");
        let none = resolve(fd.as_fd(), "*.nope", None).expect_err("empty glob");
        assert!(none.contains("no source files"), "{none}");
    }

    #[test]
    fn a_directory_source_writes_its_contents_with_the_owner_asked_for() {
        let (_t, fd) = root();
        let src = &resolve(fd.as_fd(), "src", None).expect("src")[0];
        let mut tar = tar::Builder::new(Vec::new());
        let owner = Owner {
            uid: 1000,
            gid: 1001,
            mode: Some(0o600),
        };
        append_source(&mut tar, fd.as_fd(), src, "", owner, None).expect("append");
        let bytes = tar.into_inner().expect("tar");
        let mut a = tar::Archive::new(bytes.as_slice());
        let mut names = Vec::new();
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            assert_eq!(e.header().uid().expect("uid"), 1000);
            assert_eq!(e.header().gid().expect("gid"), 1001);
            assert_eq!(e.header().mode().expect("mode"), 0o600);
            names.push(e.path().expect("path").display().to_string());
        }
        assert_eq!(names, vec!["a.txt", "b.txt", "sub/", "sub/c.md"]);
    }

    #[test]
    fn hashes_change_with_content_only() {
        let (t, fd) = root();
        let src = &resolve(fd.as_fd(), "src", None).expect("src")[0];
        let digest = || {
            let mut h = Sha256::new();
            hash_source(fd.as_fd(), src, None, &mut h).expect("hash");
            h.finalize()
        };
        let first = digest();
        assert_eq!(first, digest());
        fs::write(t.path().join("src/sub/c.md"), "changed").expect("write");
        assert_ne!(first, digest());
    }
}
