//! `berth build` and `berth commit`. The build context is sent as docker's client sends it: a
//! tar of the directory without what `.dockerignore` excludes (the Dockerfile and the
//! `.dockerignore` always go), owners reset to root; a Dockerfile from elsewhere (or stdin)
//! rides along under a generated name.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use api::dockerignore::DockerIgnore;
use bollard::Docker;
use bollard::query_parameters::{BuildImageOptions, CommitContainerOptions, TagImageOptions};
use futures::StreamExt;

use crate::args::{BuildArgs, CommitArgs};
use crate::client::StatusError;
use crate::image::split_reference;

/// What goes in the context tar.
struct BuildContext {
    /// The context directory (None: stdin gave only a Dockerfile).
    dir: Option<PathBuf>,
    ignore: DockerIgnore,
    /// The Dockerfile's path in the context.
    dockerfile: String,
    /// A Dockerfile that is not in the directory: its name in the tar and its text.
    extra: Option<(String, Vec<u8>)>,
}

fn is_tar(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || head.len() >= 262 && &head[257..262] == b"ustar"
}

/// `a/./b/` → `a/b`; None when it climbs out.
fn clean_rel(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn plan_context(a: &BuildArgs) -> Result<(BuildContext, Option<Vec<u8>>)> {
    let generated = || format!(".dockerfile.{:012x}", rand_u64() & 0xffff_ffff_ffff);
    if a.path == "-" {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("read the build context from stdin")?;
        if is_tar(&input) {
            let dockerfile = a.file.clone().unwrap_or_else(|| "Dockerfile".into());
            return Ok((
                BuildContext {
                    dir: None,
                    ignore: DockerIgnore::default(),
                    dockerfile,
                    extra: None,
                },
                Some(input),
            ));
        }
        let name = "Dockerfile".to_owned();
        return Ok((
            BuildContext {
                dir: None,
                ignore: DockerIgnore::default(),
                dockerfile: name.clone(),
                extra: Some((name, input)),
            },
            None,
        ));
    }
    let dir = PathBuf::from(&a.path);
    if !dir.is_dir() {
        bail!("unable to prepare context: path {:?} not found", a.path);
    }
    let ignore = match fs::read_to_string(dir.join(".dockerignore")) {
        Ok(t) => DockerIgnore::parse(&t).map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(e).context("read .dockerignore"),
    };
    let (dockerfile, extra) = match a.file.as_deref() {
        None => ("Dockerfile".to_owned(), None),
        Some("-") => {
            let mut text = Vec::new();
            std::io::stdin()
                .read_to_end(&mut text)
                .context("read the Dockerfile from stdin")?;
            let name = generated();
            (name.clone(), Some((name, text)))
        }
        Some(f) => {
            let abs = fs::canonicalize(f).with_context(|| {
                format!("unable to prepare context: the Dockerfile {f:?} cannot be read")
            })?;
            let root = fs::canonicalize(&dir).context("resolve the context directory")?;
            match abs.strip_prefix(&root) {
                Ok(rel) => (rel.to_string_lossy().into_owned(), None),
                Err(_) => {
                    let text = fs::read(&abs).with_context(|| format!("read {f}"))?;
                    let name = generated();
                    (name.clone(), Some((name, text)))
                }
            }
        }
    };
    Ok((
        BuildContext {
            dir: Some(dir),
            ignore,
            dockerfile,
            extra,
        },
        None,
    ))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Writes the context tar to `out`.
fn write_context(ctx: &BuildContext, out: impl Write) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    if let Some(dir) = &ctx.dir {
        let keep = |rel: &str| {
            rel == ctx.dockerfile || rel == ".dockerignore" || !ctx.ignore.excluded(rel)
        };
        let keep_under = |dir: &str| ctx.dockerfile.starts_with(&format!("{dir}/"));
        walk(&mut tar, dir, "", &ctx.ignore, &keep, &keep_under)?;
    }
    if let Some((name, text)) = &ctx.extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, text.as_slice())?;
    }
    tar.finish()?;
    Ok(())
}

fn walk<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    rel: &str,
    ignore: &DockerIgnore,
    keep: &dyn Fn(&str) -> bool,
    keep_under: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let kept = keep(&child_rel);
        if kept {
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
            let ft = meta.file_type();
            if ft.is_dir() {
                h.set_size(0);
                tar.append_data(&mut h, format!("{child_rel}/"), std::io::empty())?;
            } else if ft.is_symlink() {
                h.set_size(0);
                tar.append_link(&mut h, &child_rel, fs::read_link(&path)?)?;
            } else if ft.is_file() {
                let f =
                    fs::File::open(&path).with_context(|| format!("read {}", path.display()))?;
                tar.append_data(&mut h, &child_rel, f.take(meta.len()))?;
            }
        }
        // The Dockerfile always goes, even from inside an excluded directory.
        if meta.is_dir() && (kept || ignore.may_include_under(&child_rel) || keep_under(&child_rel))
        {
            walk(tar, &path, &child_rel, ignore, keep, keep_under)?;
        }
    }
    Ok(())
}

/// `KEY=value` pairs (`KEY` alone: from our environment, left out when unset).
fn pairs(list: &[String], from_env: bool) -> HashMap<String, String> {
    list.iter()
        .filter_map(|kv| match kv.split_once('=') {
            Some((k, v)) => Some((k.to_owned(), v.to_owned())),
            None if from_env => std::env::var(kv).ok().map(|v| (kv.clone(), v)),
            None => Some((kv.clone(), String::new())),
        })
        .collect()
}

/// The exit code in a failed RUN's message (`… returned a non-zero code: 3`).
fn run_code(message: &str) -> Option<i32> {
    let (_, code) = message.rsplit_once("returned a non-zero code: ")?;
    code.trim().parse().ok().filter(|c| *c != 0)
}

pub async fn build(d: &Docker, a: BuildArgs) -> Result<i32> {
    for t in &a.tags {
        crate::image::check_reference(t)?;
    }
    let (ctx, raw_tar) = plan_context(&a)?;
    if let Some(dir) = &ctx.dir
        && ctx.extra.is_none()
    {
        let rel = clean_rel(&ctx.dockerfile).unwrap_or_default();
        if !dir.join(&rel).is_file() {
            bail!(
                "unable to prepare context: unable to evaluate symlinks in Dockerfile path: lstat {}: no such file or directory",
                dir.join(&rel).display()
            );
        }
    }
    let dockerfile = ctx.dockerfile.clone();
    let (body, writer) = match raw_tar {
        Some(bytes) => crate::body::read_stream(std::io::Cursor::new(bytes)),
        None => crate::body::produced(move |w| write_context(&ctx, w)),
    };
    let options = BuildImageOptions {
        dockerfile,
        t: a.tags.first().cloned(),
        q: a.quiet,
        nocache: a.no_cache,
        pull: a.pull.then(|| "1".to_owned()),
        rm: a.rm,
        buildargs: Some(pairs(&a.build_args, true)).filter(|m| !m.is_empty()),
        labels: Some(pairs(&a.labels, false)).filter(|m| !m.is_empty()),
        networkmode: a.network.clone(),
        target: a.target.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut s = d.build_image(options, None, Some(bollard::body_try_stream(body)));
    let mut id: Option<String> = None;
    let mut out = std::io::stdout();
    while let Some(item) = s.next().await {
        let info = match item {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                // bollard keeps the message of docker's errorDetail, not its code: a failed
                // RUN says its code in the message.
                return Err(StatusError {
                    code: run_code(&error).unwrap_or(1),
                    error: anyhow::anyhow!(error),
                }
                .into());
            }
            Err(e) => {
                if let Ok(Err(w)) = writer.await {
                    return Err(w.context("send the build context"));
                }
                return Err(anyhow::Error::new(e).context("build"));
            }
        };
        if let Some(e) = &info.error_detail {
            let message = e
                .message
                .clone()
                .unwrap_or_else(|| "the build failed".into());
            let code = e.code.filter(|c| *c != 0).unwrap_or(1) as i32;
            return Err(StatusError {
                code,
                error: anyhow::anyhow!(message),
            }
            .into());
        }
        if let Some(text) = &info.stream {
            if a.quiet {
                id = Some(text.trim().to_owned());
            } else {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
        }
        if let Some(aux) = info.aux.as_ref().and_then(|x| x.id.clone()) {
            id = Some(aux);
        }
    }
    let id = id.context("the daemon said nothing of the built image")?;
    for t in a.tags.iter().skip(1) {
        let (repo, tag, _) = split_reference(t);
        d.tag_image(
            &id,
            Some(TagImageOptions {
                repo: Some(repo),
                tag: Some(tag),
            }),
        )
        .await
        .with_context(|| format!("tag {t}"))?;
        if !a.quiet {
            println!("Successfully tagged {t}");
        }
    }
    if a.quiet {
        println!("{id}");
    }
    if let Some(f) = &a.iidfile {
        fs::write(f, &id).with_context(|| format!("write {f}"))?;
    }
    Ok(0)
}

pub async fn commit(d: &Docker, a: CommitArgs) -> Result<i32> {
    let (repo, tag) = match &a.reference {
        Some(r) => {
            crate::image::check_reference(r)?;
            let (repo, tag, _) = split_reference(r);
            (Some(repo), Some(tag))
        }
        None => (None, None),
    };
    // bollard sends one `changes` value: newline-joined, as docker's daemon also splits them.
    let options = CommitContainerOptions {
        container: Some(a.container.clone()),
        repo,
        tag,
        comment: a.message.clone(),
        author: a.author.clone(),
        pause: a.pause,
        changes: Some(a.change.join("\n")).filter(|c| !c.is_empty()),
    };
    let r = d
        .commit_container(options, bollard::models::ContainerConfig::default())
        .await
        .context("commit")?;
    println!("{}", r.id);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_leaves_out_what_dockerignore_says_but_never_the_dockerfile() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path();
        fs::create_dir_all(p.join("src/keep")).expect("mkdir");
        fs::write(p.join("Dockerfile"), "FROM scratch\n").expect("write");
        fs::write(
            p.join(".dockerignore"),
            "Dockerfile\n*.log\nsrc\n!src/keep\n",
        )
        .expect("write");
        fs::write(p.join("a.log"), "x").expect("write");
        fs::write(p.join("b.txt"), "x").expect("write");
        fs::write(p.join("src/gone.txt"), "x").expect("write");
        fs::write(p.join("src/keep/k.txt"), "x").expect("write");
        let a = BuildArgs {
            file: None,
            tags: vec![],
            build_args: vec![],
            target: None,
            no_cache: false,
            labels: vec![],
            quiet: false,
            pull: false,
            network: None,
            iidfile: None,
            rm: true,
            path: p.display().to_string(),
        };
        let (ctx, raw) = plan_context(&a).expect("plan");
        assert!(raw.is_none());
        let mut bytes = Vec::new();
        write_context(&ctx, &mut bytes).expect("tar");
        let mut ar = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ".dockerignore",
                "Dockerfile",
                "b.txt",
                "src/keep/",
                "src/keep/k.txt"
            ]
        );
    }

    #[test]
    fn build_args_without_a_value_come_from_the_environment() {
        // SAFETY: this test alone reads or writes this variable.
        unsafe { std::env::set_var("BERTH_TEST_BUILD_ARG", "from-env") };
        let m = pairs(
            &[
                "A=1".into(),
                "BERTH_TEST_BUILD_ARG".into(),
                "BERTH_UNSET_ARG_X".into(),
            ],
            true,
        );
        assert_eq!(m.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            m.get("BERTH_TEST_BUILD_ARG").map(String::as_str),
            Some("from-env")
        );
        assert!(!m.contains_key("BERTH_UNSET_ARG_X"));
    }
}
