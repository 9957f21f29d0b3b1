//! COPY and ADD sources: matched (paths and globs) inside a root — the build context or a
//! stage's filesystem — with every symlink resolved inside that root, filtered by
//! `.dockerignore`, hashed for the cache and written as the tar the step extracts.

use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
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

/// Longest source pattern taken: matching costs grow with it.
pub const MAX_PATTERN: usize = 4096;

/// One unit of a compiled component pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    /// `*`.
    Star,
    /// `?`.
    Any,
    /// A literal character.
    Char(char),
    /// `[…]`: ranges, negated or not.
    Class(bool, Vec<(char, char)>),
}

/// Compiles a component pattern; None when it is malformed (an unclosed `[`).
fn compile(pattern: &str) -> Option<Vec<Unit>> {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => {
                if out.last() != Some(&Unit::Star) {
                    out.push(Unit::Star);
                }
                i += 1;
            }
            '?' => {
                out.push(Unit::Any);
                i += 1;
            }
            '\\' => {
                out.push(Unit::Char(*p.get(i + 1)?));
                i += 2;
            }
            '[' => {
                i += 1;
                let negate = p.get(i) == Some(&'^');
                if negate {
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let c = *p.get(i)?;
                    if c == ']' && !first {
                        i += 1;
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        i += 1;
                        *p.get(i)?
                    } else {
                        c
                    };
                    i += 1;
                    let mut hi = lo;
                    if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
                        i += 1;
                        hi = if p[i] == '\\' {
                            i += 1;
                            *p.get(i)?
                        } else {
                            p[i]
                        };
                        i += 1;
                    }
                    ranges.push((lo, hi));
                }
                out.push(Unit::Class(negate, ranges));
            }
            c => {
                out.push(Unit::Char(c));
                i += 1;
            }
        }
    }
    Some(out)
}

fn unit_matches(u: &Unit, c: char) -> bool {
    match u {
        Unit::Star => true,
        Unit::Any => true,
        Unit::Char(x) => *x == c,
        Unit::Class(negate, ranges) => {
            ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negate
        }
    }
}

/// Go's `filepath.Match` on one path component: `*`, `?`, `[…]` (ranges, `^` negation) and
/// `\` escapes. Linear backtracking to the last star only, so no pattern costs more than
/// (pattern × name) steps.
pub fn component_matches(pattern: &str, name: &str) -> bool {
    if pattern.len() > MAX_PATTERN {
        return false;
    }
    let Some(p) = compile(pattern) else {
        return false;
    };
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(Unit::Star) => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(u) if unit_matches(u, n[ni]) => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|u| *u == Unit::Star)
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
    if pattern.len() > MAX_PATTERN {
        return Err(format!("a source pattern is over {MAX_PATTERN} bytes"));
    }
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
        assert!(component_matches("a*b*c", "axxbyyc"));
        assert!(!component_matches("a*b*c", "axxbyy"));
        assert!(component_matches("*", ""));
        // No exponential blow-up, no deep recursion.
        let hostile = format!("{}b", "*a".repeat(40));
        assert!(!component_matches(&hostile, &"a".repeat(200)));
        assert!(!component_matches(&"*".repeat(MAX_PATTERN + 1), "x"));
        assert!(component_matches(&"*".repeat(MAX_PATTERN), "x"));
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
