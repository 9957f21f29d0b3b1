//! `cp`: docker cp both ways, with docker's rules for where things land (into an existing
//! directory, or created/renamed after the destination path; a trailing `/.` copies a
//! directory's contents) and its messages. The archive streams both ways: the host's tree is
//! read into the upload as it goes, and a download is extracted as it arrives.
//!
//! Extraction on the host trusts nothing in the container's archive: every name must stay
//! under the destination (no `..`, no absolute names), nothing is ever written through a
//! symbolic link (the archive's own or one already there), hard links must point inside, and
//! device nodes are not made.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use futures::StreamExt;

use crate::args::CpArgs;
use crate::body::{ChannelReader, produced, read_stream};

/// Go's `os.FileMode` bits the daemon's path stat carries.
const MODE_DIR: u64 = 1 << 31;
const MODE_SYMLINK: u64 = 1 << 27;
const MODE_DEVICE: u64 = 1 << 26;
const MODE_PIPE: u64 = 1 << 25;
const MODE_SOCKET: u64 = 1 << 24;
const MODE_IRREGULAR: u64 = 1 << 19;

/// `CONTAINER:PATH` → (container, path), as docker splits it: an absolute path or one
/// starting with `.` is local, whatever colons it holds.
fn split_container_path(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('/') {
        return None;
    }
    match s.split_once(':') {
        Some((c, _)) if c.starts_with('.') => None,
        other => other,
    }
}

pub async fn cp(d: &Docker, a: CpArgs) -> Result<i32> {
    if a.src.is_empty() {
        bail!("source can not be empty");
    }
    if a.dest.is_empty() {
        bail!("destination can not be empty");
    }
    let quiet = a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    match (split_container_path(&a.src), split_container_path(&a.dest)) {
        (Some((c, path)), None) => {
            let n = copy_from(d, c, path, &a.dest, a.follow_link).await?;
            if !quiet && a.dest != "-" {
                eprintln!(
                    "Successfully copied {} to {}",
                    crate::format::human_size(n as i64),
                    a.dest
                );
            }
            Ok(0)
        }
        (None, Some((c, path))) => {
            let n = copy_to(d, &a.src, c, path, a.follow_link, a.archive).await?;
            if !quiet {
                eprintln!(
                    "Successfully copied {} to {c}:{path}",
                    crate::format::human_size(n as i64)
                );
            }
            Ok(0)
        }
        (Some(_), Some(_)) => bail!("copying between containers is not supported"),
        (None, None) => bail!("must specify at least one container source"),
    }
}

// ---- docker's path rules (its pkg/archive copy.go), on `/`-separated strings ----

/// Go's `filepath.Clean`.
fn clean(p: &str) -> String {
    let abs = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !abs {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let joined = out.join("/");
    match (abs, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

fn specifies_current_dir(p: &str) -> bool {
    p == "." || p.ends_with("/.")
}

fn has_trailing_separator(p: &str) -> bool {
    p.len() > 1 && p.ends_with('/')
}

/// A path that must be a directory (`dir/` or `dir/.`).
fn asserts_directory(p: &str) -> bool {
    has_trailing_separator(p) || specifies_current_dir(p)
}

/// Go's `filepath.Dir` and `filepath.Base` of a cleaned path.
fn dir_and_base(cleaned: &str) -> (String, String) {
    match cleaned.rsplit_once('/') {
        Some(("", "")) => ("/".into(), "/".into()),
        Some(("", b)) => ("/".into(), b.into()),
        Some((d, b)) => (d.into(), b.into()),
        None => (".".into(), cleaned.into()),
    }
}

/// docker's `SplitPathDirEntry`: the directory and the entry in it, `.` kept as the entry of
/// a path that names a directory's contents.
fn split_path_dir_entry(p: &str) -> (String, String) {
    let mut cleaned = clean(p);
    if specifies_current_dir(p) {
        cleaned.push_str("/.");
    }
    dir_and_base(&cleaned)
}

/// docker's `PreserveTrailingDotOrSeparator`.
fn preserve_trailing(cleaned: String, original: &str) -> String {
    let mut p = cleaned;
    if specifies_current_dir(original) && !specifies_current_dir(&p) {
        p.push_str("/.");
    }
    if has_trailing_separator(original) && !has_trailing_separator(&p) {
        p.push('/');
    }
    p
}

fn join(dir: &str, rel: &str) -> String {
    clean(&format!("{dir}/{rel}"))
}

/// An absolute local path for `p`, its trailing `/` or `/.` kept (they change the meaning).
fn resolve_local(p: &str) -> Result<String> {
    let abs = if p.starts_with('/') {
        p.to_owned()
    } else {
        let cwd = std::env::current_dir().context("the current directory")?;
        format!("{}/{p}", cwd.display())
    };
    Ok(preserve_trailing(clean(&abs), p))
}

/// docker's `GetRebaseName`: the resolved path with the asked one's trailing `/.` or `/`,
/// and the name entries must be given when resolving changed the last component.
fn rebase_name(asked: &str, resolved: &str) -> (String, Option<String>) {
    let resolved = preserve_trailing(resolved.to_owned(), asked);
    let (_, asked_base) = split_path_dir_entry(asked);
    let (_, resolved_base) = split_path_dir_entry(&resolved);
    let rebase = (asked_base != resolved_base).then_some(asked_base);
    (resolved, rebase)
}

/// What is known of a copy's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DestInfo {
    path: String,
    exists: bool,
    is_dir: bool,
}

/// docker's `PrepareArchiveCopy`: the directory to extract into and the name the archive's
/// top entry must take there (`.` for a directory's contents straight into it).
fn prepare_copy(src_base: &str, src_is_dir: bool, dst: &DestInfo) -> Result<(String, String)> {
    let (dst_dir, dst_base) = split_path_dir_entry(&dst.path);
    if dst.exists && dst.is_dir {
        return Ok((clean(&dst.path), src_base.to_owned()));
    }
    if dst.exists && src_is_dir {
        bail!("cannot copy directory");
    }
    if !dst.exists && !src_is_dir && asserts_directory(&dst.path) {
        bail!("no such directory");
    }
    Ok((dst_dir, dst_base))
}

/// The entry the archive of `src` starts with, as docker names it: `.` for a directory's
/// contents, `rebase` when a followed link renamed it.
fn source_base(src: &str, rebase: Option<&str>) -> String {
    if specifies_current_dir(src) {
        return ".".into();
    }
    match rebase {
        Some(r) => r.to_owned(),
        None => match split_path_dir_entry(src).1.as_str() {
            "/" => ".".into(),
            b => b.to_owned(),
        },
    }
}

// ---- container → host ----

/// Copies `path` of container `c` to local `dest` (`-`: the tar to stdout). Returns the
/// archive's size.
async fn copy_from(d: &Docker, c: &str, path: &str, dest: &str, follow: bool) -> Result<u64> {
    let dst = if dest == "-" {
        None
    } else {
        let p = resolve_local(dest)?;
        validate_output_path(&p)?;
        Some(p)
    };
    let mut src = path.to_owned();
    let mut rebase = None;
    if follow
        && let Ok(st) = crate::raw::path_stat(c, path).await
        && st["mode"].as_u64().unwrap_or(0) & MODE_SYMLINK != 0
    {
        let mut target = st["linkTarget"].as_str().unwrap_or_default().to_owned();
        if !target.starts_with('/') {
            target = join(&split_path_dir_entry(path).0, &target);
        }
        (src, rebase) = rebase_name(path, &target);
    }
    let mut s =
        d.download_from_container(c, Some(DownloadFromContainerOptions { path: src.clone() }));
    // The daemon's refusal (no such container or file) is the first thing the stream says.
    let first = match s.next().await {
        Some(r) => r.with_context(|| format!("copy from {c}:{path}"))?,
        None => bytes::Bytes::new(),
    };
    let mut total = first.len() as u64;
    let Some(dst) = dst else {
        let mut out = std::io::stdout().lock();
        out.write_all(&first).context("write stdout")?;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.with_context(|| format!("copy from {c}:{path}"))?;
            total += chunk.len() as u64;
            out.write_all(&chunk).context("write stdout")?;
        }
        out.flush().context("write stdout")?;
        return Ok(total);
    };
    let (tx, reader) = ChannelReader::new();
    let base = source_base(&src, rebase.as_deref());
    let extract = tokio::task::spawn_blocking(move || extract(reader, &base, Path::new(&dst)));
    let mut fed = tx.send(first).await.is_ok();
    while fed {
        let Some(chunk) = s.next().await else { break };
        let chunk = chunk.with_context(|| format!("copy from {c}:{path}"))?;
        total += chunk.len() as u64;
        // A closed channel: extraction stopped, and says why below.
        fed = tx.send(chunk).await.is_ok();
    }
    drop(tx);
    extract.await.context("the extracting thread")??;
    Ok(total)
}

/// docker's `ValidateOutputPath`: the parent must exist; an existing path must be a directory
/// or a regular file.
fn validate_output_path(p: &str) -> Result<()> {
    let (dir, _) = dir_and_base(&clean(p));
    if !Path::new(&dir).exists() {
        bail!("invalid output path: directory {dir:?} does not exist");
    }
    if let Ok(m) = std::fs::metadata(p)
        && !m.is_dir()
        && !m.is_file()
    {
        bail!("invalid output path: {p:?} must be a directory or a regular file");
    }
    Ok(())
}

/// Go's wording of a failed system call on a path.
fn os_error(op: &str, path: &str, e: &std::io::Error) -> anyhow::Error {
    let what = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        std::io::ErrorKind::NotADirectory => "not a directory".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    };
    anyhow::anyhow!("{op} {path}: {what}")
}

/// docker's `CopyInfoDestinationPath`: the destination after following symlinks at its end
/// (it is the user's own path); when it does not exist its parent must be a directory.
fn destination_info(p: &str) -> Result<DestInfo> {
    let mut path = p.to_owned();
    let mut st = std::fs::symlink_metadata(&path);
    let mut hops = 0;
    while let Ok(m) = &st {
        if !m.file_type().is_symlink() {
            break;
        }
        hops += 1;
        if hops > 10 {
            bail!("too many symlinks in {p}");
        }
        let target = std::fs::read_link(&path).map_err(|e| os_error("readlink", &path, &e))?;
        let target = target.to_string_lossy().into_owned();
        path = if target.starts_with('/') {
            target
        } else {
            join(&split_path_dir_entry(&path).0, &target)
        };
        st = std::fs::symlink_metadata(&path);
    }
    match st {
        Ok(m) => Ok(DestInfo {
            path,
            exists: true,
            is_dir: m.is_dir(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (parent, _) = split_path_dir_entry(&path);
            let pm = std::fs::metadata(&parent).map_err(|e| os_error("stat", &parent, &e))?;
            if !pm.is_dir() {
                bail!("not a directory");
            }
            Ok(DestInfo {
                path,
                exists: false,
                is_dir: false,
            })
        }
        Err(e) => Err(os_error("lstat", &path, &e)),
    }
}

/// Extracts the container's archive (its top entry named `src_base` by docker's rules) to
/// local `dst`, with docker's placement rules and our safety rules.
fn extract(input: impl Read, src_base: &str, dst: &Path) -> Result<()> {
    let dst_info = destination_info(&dst.to_string_lossy())?;
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries().context("read the archive")?;
    let mut first = match entries.next() {
        Some(e) => e.context("read the archive")?,
        None => bail!("invalid copy source content"),
    };
    let src_is_dir = first.header().entry_type().is_dir();
    // The daemon names the top entry as it likes (`etc` for `/etc/.`); it is renamed here.
    let prefix = first_component(&first.path().context("read the archive")?)?;
    let (dir, top) = prepare_copy(src_base, src_is_dir, &dst_info)?;
    let dir = PathBuf::from(dir);
    unpack(&mut first, &dir, &prefix, &top)?;
    for e in entries {
        let mut e = e.context("read the archive")?;
        unpack(&mut e, &dir, &prefix, &top)?;
    }
    Ok(())
}

fn first_component(p: &Path) -> Result<String> {
    match p.components().next() {
        Some(Component::Normal(c)) => Ok(c.to_string_lossy().into_owned()),
        Some(Component::CurDir) => Ok(".".into()),
        _ => bail!(
            "refusing archive entry {}: not a relative name",
            p.display()
        ),
    }
}

/// An archive name under the top entry `prefix`, renamed to `top`, as a path relative to the
/// extraction directory (empty: the directory itself). Anything that could leave it is refused.
fn renamed(name: &Path, prefix: &str, top: &str) -> Result<PathBuf> {
    let refuse = || anyhow::anyhow!("refusing archive entry {}", name.display());
    let mut comps = name.components().peekable();
    while comps.peek() == Some(&Component::CurDir) && prefix != "." {
        comps.next();
    }
    if prefix != "." {
        match comps.next() {
            Some(Component::Normal(c)) if c.to_string_lossy() == prefix => {}
            _ => return Err(refuse()),
        }
    }
    let mut out = PathBuf::new();
    if top != "." {
        if top.is_empty() || top.contains('/') || top == ".." {
            return Err(refuse());
        }
        out.push(top);
    }
    for c in comps {
        match c {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            _ => return Err(refuse()),
        }
    }
    Ok(out)
}

/// Makes the missing directories leading to `rel` under `dir`, refusing to go through a
/// symbolic link or anything not a directory.
fn ensure_parents(dir: &Path, rel: &Path) -> Result<()> {
    let mut at = dir.to_owned();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                bail!(
                    "refusing to write through the symbolic link {}",
                    at.display()
                )
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{}: not a directory", at.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).with_context(|| format!("create {}", at.display()))?;
            }
            Err(e) => return Err(os_error("lstat", &at.to_string_lossy(), &e)),
        }
    }
    Ok(())
}

/// Clears the way for a non-directory at `target`: an existing file or link goes (it is
/// replaced, never written through); a directory stays and is an error.
fn remove_non_dir(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => bail!(
            "cannot overwrite directory {:?} with non-directory",
            target.display().to_string()
        ),
        Ok(_) => {
            std::fs::remove_file(target).with_context(|| format!("replace {}", target.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(os_error("lstat", &target.to_string_lossy(), &e)),
    }
}

fn unpack<R: Read>(e: &mut tar::Entry<'_, R>, dir: &Path, prefix: &str, top: &str) -> Result<()> {
    let name = e.path().context("read the archive")?.into_owned();
    let rel = renamed(&name, prefix, top)?;
    let kind = e.header().entry_type();
    let target = dir.join(&rel);
    if rel.as_os_str().is_empty() {
        // The extraction directory itself (a directory's contents copied into it).
        if !kind.is_dir() {
            bail!("refusing archive entry {}", name.display());
        }
        return Ok(());
    }
    ensure_parents(dir, &rel)?;
    let ctx = || format!("extract {}", target.display());
    match kind {
        tar::EntryType::Directory => {
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!(
                    "cannot overwrite non-directory {:?} with directory",
                    target.display().to_string()
                ),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&target).with_context(ctx)?
                }
                Err(err) => return Err(os_error("lstat", &target.to_string_lossy(), &err)),
            }
            let mode = e.header().mode().unwrap_or(0o755) & 0o7777;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .with_context(ctx)?;
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Symlink => {
            remove_non_dir(&target)?;
            // The file is created anew (O_EXCL), so it cannot be a link followed elsewhere.
            e.unpack(&target).with_context(ctx)?;
        }
        tar::EntryType::Link => {
            let link = e
                .link_name()
                .context("read the archive")?
                .with_context(|| format!("hard link {} without a target", name.display()))?
                .into_owned();
            let src_rel = renamed(&link, prefix, top)?;
            ensure_parents(dir, &src_rel)?;
            let src = dir.join(&src_rel);
            let m = std::fs::symlink_metadata(&src)
                .map_err(|err| os_error("lstat", &src.to_string_lossy(), &err))?;
            if m.is_dir() {
                bail!(
                    "refusing archive entry {}: a hard link to a directory",
                    name.display()
                );
            }
            remove_non_dir(&target)?;
            std::fs::hard_link(&src, &target).with_context(ctx)?;
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            eprintln!(
                "berth cp: not creating the special file {}",
                target.display()
            );
        }
        // Extension headers are read by the tar crate; anything else has no file to make.
        _ => {}
    }
    Ok(())
}

// ---- host → container ----

/// docker's `ResolveHostSourcePath`: the local source with its parent's links resolved (and
/// the source's own with `-L`), plus the name its entries must keep.
fn resolve_host_source(p: &str, follow: bool) -> Result<(String, Option<String>)> {
    if follow {
        let real = std::fs::canonicalize(p).map_err(|e| os_error("lstat", p, &e))?;
        return Ok(rebase_name(p, &real.to_string_lossy()));
    }
    let (dir, base) = match p.rsplit_once('/') {
        Some((d, b)) => (if d.is_empty() { "/" } else { d }, b),
        None => (".", p),
    };
    let real_dir = std::fs::canonicalize(dir).map_err(|e| os_error("lstat", dir, &e))?;
    let real_dir = real_dir.to_string_lossy();
    let resolved = if real_dir == "/" {
        format!("/{base}")
    } else {
        format!("{real_dir}/{base}")
    };
    let rebase = if has_trailing_separator(p) {
        let asked = dir_and_base(&clean(p)).1;
        let got = dir_and_base(&clean(&resolved)).1;
        (asked != got).then_some(asked)
    } else {
        None
    };
    Ok((resolved, rebase))
}

/// Copies local `src` (`-`: a tar on stdin) to `path` in container `c`. Returns the bytes
/// sent.
async fn copy_to(
    d: &Docker,
    src: &str,
    c: &str,
    path: &str,
    follow: bool,
    archive: bool,
) -> Result<u64> {
    let mut dst = DestInfo {
        path: path.to_owned(),
        exists: false,
        is_dir: false,
    };
    let mut st = crate::raw::path_stat(c, path).await;
    if let Ok(s) = &st
        && s["mode"].as_u64().unwrap_or(0) & MODE_SYMLINK != 0
    {
        let mut target = s["linkTarget"].as_str().unwrap_or_default().to_owned();
        if !target.starts_with('/') {
            target = join(&split_path_dir_entry(path).0, &target);
        }
        st = crate::raw::path_stat(c, &target).await;
        dst.path = target;
    }
    // A failed stat is no error yet: the path may simply be missing, with its parent there.
    if let Ok(s) = &st {
        let mode = s["mode"].as_u64().unwrap_or(0);
        let bad = if mode & MODE_DEVICE != 0 {
            Some("got a device")
        } else if mode & (MODE_IRREGULAR | MODE_PIPE | MODE_SOCKET) != 0 {
            Some("got an irregular file")
        } else {
            None
        };
        if let Some(bad) = bad {
            bail!("destination \"{c}:{path}\" must be a directory or a regular file: {bad}");
        }
        dst.exists = true;
        dst.is_dir = mode & MODE_DIR != 0;
    }
    let (target_dir, (stream, producer)) = if src == "-" {
        if !dst.is_dir {
            bail!("destination \"{c}:{path}\" must be a directory");
        }
        (dst.path.clone(), read_stream(std::io::stdin()))
    } else {
        let local = resolve_local(src)?;
        let (resolved, rebase) = resolve_host_source(&local, follow)?;
        let meta =
            std::fs::symlink_metadata(&resolved).map_err(|e| os_error("lstat", &resolved, &e))?;
        let base = source_base(&resolved, rebase.as_deref());
        let (dir, top) = prepare_copy(&base, meta.is_dir(), &dst)?;
        (
            dir,
            produced(move |w| write_tree(w, Path::new(&resolved), &top, archive)),
        )
    };
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let stream = stream.inspect(move |c| {
        if let Ok(b) = c {
            counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let uploaded = d
        .upload_to_container(
            c,
            Some(UploadToContainerOptions {
                path: target_dir,
                no_overwrite_dir_non_dir: Some("true".into()),
                copy_uidgid: archive.then(|| "true".into()),
            }),
            bollard::body_try_stream(stream),
        )
        .await;
    // A failure reading the host's side says more than the broken upload it caused.
    let produced = producer.await.context("the archiving thread")?;
    if uploaded.is_err() {
        produced?;
    }
    uploaded.with_context(|| format!("copy to {c}:{path}"))?;
    Ok(sent.load(std::sync::atomic::Ordering::Relaxed))
}

/// Writes a tar of local `src` to `out`, its top entry named `top` (`.`: only what is in the
/// directory). Without `archive` everything is owned by root, as docker's daemon makes it.
fn write_tree(out: impl Write, src: &Path, top: &str, archive: bool) -> Result<()> {
    let mut b = tar::Builder::new(out);
    let meta = std::fs::symlink_metadata(src)
        .map_err(|e| os_error("lstat", &src.to_string_lossy(), &e))?;
    let mut tree = Tree {
        archive,
        links: HashMap::new(),
    };
    if top == "." {
        if !meta.is_dir() {
            bail!("{}: not a directory", src.display());
        }
        tree.children(&mut b, src, Path::new(""))?;
    } else {
        tree.append(&mut b, src, &meta, Path::new(top))?;
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .context("finish the archive")?;
    Ok(())
}

struct Tree {
    archive: bool,
    /// Files with more than one link, by (device, inode): the name they went in under.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Tree {
    fn children<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        dir: &Path,
        name: &Path,
    ) -> Result<()> {
        let mut kids: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| os_error("open", &dir.to_string_lossy(), &e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        kids.sort();
        for k in kids {
            let p = dir.join(&k);
            let m = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                // Gone meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(os_error("lstat", &p.to_string_lossy(), &e)),
            };
            self.append(b, &p, &m, &name.join(&k))?;
        }
        Ok(())
    }

    fn append<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        path: &Path,
        m: &std::fs::Metadata,
        name: &Path,
    ) -> Result<()> {
        let ft = m.file_type();
        if std::os::unix::fs::FileTypeExt::is_socket(&ft) {
            // Sockets have no tar form.
            return Ok(());
        }
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(m, tar::HeaderMode::Complete);
        if !self.archive {
            h.set_uid(0);
            h.set_gid(0);
            let _ = h.set_username("");
            let _ = h.set_groupname("");
        }
        let ctx = || format!("archive {}", path.display());
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, name, std::io::empty())
                .with_context(ctx)?;
            return self.children(b, path, name);
        }
        if ft.is_symlink() {
            let target = std::fs::read_link(path).with_context(ctx)?;
            h.set_size(0);
            return b.append_link(&mut h, name, &target).with_context(ctx);
        }
        if ft.is_file() {
            if m.nlink() > 1 {
                let key = (m.dev(), m.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    return b.append_link(&mut h, name, first).with_context(ctx);
                }
                self.links.insert(key, name.to_owned());
            }
            let f = std::fs::File::open(path)
                .map_err(|e| os_error("open", &path.to_string_lossy(), &e))?;
            // The size at open, and exactly that many bytes: a file changing meanwhile must
            // not corrupt the rest of the archive.
            let size = f.metadata().with_context(ctx)?.len();
            h.set_size(size);
            return b
                .append_data(&mut h, name, Exactly::new(f, size))
                .with_context(ctx);
        }
        // FIFOs and device nodes: their header is all there is.
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty())
            .with_context(ctx)
    }
}

/// `n` bytes of a reader: its own while it has them, zeros after an early end.
struct Exactly<R> {
    inner: std::io::Take<R>,
    left: u64,
}

impl<R: Read> Exactly<R> {
    fn new(inner: R, n: u64) -> Self {
        Exactly {
            inner: inner.take(n),
            left: n,
        }
    }
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_as_docker_splits_them() {
        assert_eq!(clean("/a/./b/../c/"), "/a/c");
        assert_eq!(clean("a/.."), ".");
        assert_eq!(clean("/.."), "/");
        assert_eq!(split_path_dir_entry("/etc/."), ("/etc".into(), ".".into()));
        assert_eq!(split_path_dir_entry("/etc/"), ("/".into(), "etc".into()));
        assert_eq!(split_path_dir_entry("/x"), ("/".into(), "x".into()));
        assert_eq!(split_path_dir_entry("x"), (".".into(), "x".into()));
        assert_eq!(preserve_trailing(clean("/a/b/."), "/a/b/."), "/a/b/.");
        assert_eq!(source_base("/", None), ".");
        assert_eq!(source_base("/etc/.", None), ".");
        assert_eq!(source_base("/etc/hostname", Some("h")), "h");
        assert_eq!(split_container_path("c:/x"), Some(("c", "/x")));
        assert_eq!(split_container_path("./a:b"), None);
        assert_eq!(split_container_path("/a:b"), None);
        assert_eq!(split_container_path("plain"), None);
    }

    #[test]
    fn destination_rules() {
        let dir = DestInfo {
            path: "/d".into(),
            exists: true,
            is_dir: true,
        };
        let file = DestInfo {
            path: "/f".into(),
            exists: true,
            is_dir: false,
        };
        let new = |p: &str| DestInfo {
            path: p.into(),
            exists: false,
            is_dir: false,
        };
        assert_eq!(
            prepare_copy("x", false, &dir).expect("into"),
            ("/d".into(), "x".into())
        );
        assert_eq!(
            prepare_copy(".", true, &dir).expect("contents"),
            ("/d".into(), ".".into())
        );
        assert_eq!(
            prepare_copy("x", false, &file).expect("over"),
            ("/".into(), "f".into())
        );
        assert_eq!(
            prepare_copy("x", true, &file)
                .expect_err("dir over file")
                .to_string(),
            "cannot copy directory"
        );
        assert_eq!(
            prepare_copy("x", true, &new("/n")).expect("renamed"),
            ("/".into(), "n".into())
        );
        assert_eq!(
            prepare_copy("x", false, &new("/n/"))
                .expect_err("file as dir")
                .to_string(),
            "no such directory"
        );
    }

    #[test]
    fn names_are_renamed_and_escapes_refused() {
        let r = |n: &str, p: &str, t: &str| renamed(Path::new(n), p, t);
        assert_eq!(
            r("etc/a/b", "etc", "new").expect("rename"),
            PathBuf::from("new/a/b")
        );
        assert_eq!(
            r("etc/a", "etc", ".").expect("contents"),
            PathBuf::from("a")
        );
        assert_eq!(r("./a", ".", "x").expect("dot"), PathBuf::from("x/a"));
        assert_eq!(r("etc", "etc", ".").expect("top"), PathBuf::new());
        assert!(r("etc/../x", "etc", ".").is_err());
        assert!(r("other/x", "etc", ".").is_err());
        assert!(r("/etc/x", "etc", ".").is_err());
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, name, data).expect("link");
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, data.as_bytes())
                        .expect("append");
                }
            }
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn extraction_never_writes_through_a_link() {
        use tar::EntryType::*;
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        let archive = tar_of(&[
            ("d", Directory, ""),
            ("d/esc", Symlink, outside.to_str().expect("utf-8")),
            ("d/esc/pwned", Regular, "x"),
        ]);
        let err = extract(&archive[..], "d", &dest).expect_err("refused");
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert!(!outside.join("pwned").exists());
        // A link's name reused for a file replaces the link, never follows it.
        let archive = tar_of(&[
            ("d", Directory, ""),
            (
                "d/f",
                Symlink,
                outside.join("target").to_str().expect("utf-8"),
            ),
            ("d/f", Regular, "mine"),
            ("d/h", Link, "d/f"),
        ]);
        extract(&archive[..], "d", &dest.join("fresh")).expect("extract");
        assert!(!outside.join("target").exists());
        assert_eq!(std::fs::read(dest.join("fresh/h")).expect("read"), b"mine");
        let archive = tar_of(&[("d", Directory, ""), ("d/h", Link, "../../etc/passwd")]);
        assert!(extract(&archive[..], "d", &dest.join("again")).is_err());
    }

    #[test]
    fn a_tree_round_trips() {
        let t = tempfile::tempdir().expect("tempdir");
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        std::fs::write(src.join("sub/a"), "aaa").expect("write");
        std::fs::hard_link(src.join("sub/a"), src.join("b")).expect("link");
        std::os::unix::fs::symlink("sub/a", src.join("l")).expect("symlink");
        let mut tar = Vec::new();
        write_tree(&mut tar, &src, "copy", false).expect("tar");
        let out = t.path().join("out");
        extract(&tar[..], "copy", &out).expect("extract");
        assert_eq!(std::fs::read(out.join("sub/a")).expect("read"), b"aaa");
        assert_eq!(std::fs::read(out.join("b")).expect("read"), b"aaa");
        assert_eq!(
            std::fs::read_link(out.join("l")).expect("link"),
            PathBuf::from("sub/a")
        );
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(&out.join("b")), ino(&out.join("sub/a")));
    }
}
