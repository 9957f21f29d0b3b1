//! The steps that change a filesystem (RUN, COPY, ADD, WORKDIR) and those that change only the
//! config, each ending in a stored image.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use api::dockerfile::{Command, CopyArgs, Instruction, Kind};
use api::dockerignore::DockerIgnore;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use super::config::{self, Vars};
use super::context::{self, Owner, Source};
use super::{Builder, Failure, Outcome, Progress, Run, State, now};
use crate::container::stream::StreamOpts;
use crate::engine::WaitCondition;
use crate::engine::spec::{Config, HostConfig};
use crate::image::ImageRecord;
use crate::image::compose::NewLayer;

/// A COPY or ADD with its words expanded and its sources gathered: worked out once, for the
/// cache key and then for the copy.
pub(super) struct CopyPlan {
    add: bool,
    /// Local source patterns.
    patterns: Vec<String>,
    /// Downloaded URL sources (ADD): files in `downloads`.
    urls: Vec<String>,
    /// Heredoc sources, written as files in `inline`.
    inline: Vec<String>,
    /// Where URL downloads and heredoc bodies were written.
    downloads: PathBuf,
    /// The destination, absolute.
    dest: String,
    /// Whether the destination was written as a directory (a trailing `/`).
    dest_is_dir: bool,
    /// `--from` resolved to an image (a stage's or a named one).
    from: Option<ImageRecord>,
    chown: Option<String>,
    chmod: Option<u32>,
}

/// What the step reads beyond its own text, for its cache key: the content of COPY/ADD
/// sources (or the image they come from). Plans the copy for [`execute`].
pub(super) async fn inputs(
    b: &Builder,
    run: &mut Run<'_>,
    st: &mut State,
    ins: &Instruction,
) -> Outcome<Vec<u8>> {
    let (args, add) = match &ins.kind {
        Kind::Copy(a) => (a, false),
        Kind::Add(a) => (a, true),
        _ => return Ok(Vec::new()),
    };
    let plan = plan_copy(b, run, st, ins, args, add).await?;
    let mut h = Sha256::new();
    h.update(plan.dest.as_bytes());
    for (name, dir) in [("url", &plan.urls), ("inline", &plan.inline)] {
        for n in dir {
            h.update(name.as_bytes());
            h.update(n.as_bytes());
        }
    }
    let downloads = plan.downloads.clone();
    let extra: Vec<String> = plan.urls.iter().chain(&plan.inline).cloned().collect();
    let patterns = plan.patterns.clone();
    let from = plan.from.as_ref().map(|i| i.id.to_string());
    let context_dir = run.context.clone();
    let ignore = run.ignore.clone();
    let digest = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut h = h;
        if let Some(id) = from {
            // An image's content is its id.
            h.update(id.as_bytes());
            for p in &patterns {
                h.update(p.as_bytes());
            }
        } else {
            let root = crate::inroot::open_root(&context_dir).map_err(|e| e.to_string())?;
            for p in &patterns {
                for s in context::resolve(root.as_fd(), p, ignore.as_ref())? {
                    h.update(s.rel.as_bytes());
                    context::hash_source(root.as_fd(), &s, ignore.as_ref(), &mut h)
                        .map_err(|e| format!("read {}: {e}", s.rel))?;
                }
            }
        }
        if !extra.is_empty() {
            let root = crate::inroot::open_root(&downloads).map_err(|e| e.to_string())?;
            for n in &extra {
                let s = Source {
                    rel: n.clone(),
                    is_dir: false,
                };
                context::hash_source(root.as_fd(), &s, None, &mut h)
                    .map_err(|e| format!("read {n}: {e}"))?;
            }
        }
        Ok(h.finalize().to_vec())
    })
    .await
    .map_err(|e| Failure::new(format!("hash thread: {e}")))?
    .map_err(|e| run.fail_at(ins, e))?;
    run.pending_copy = Some(plan);
    Ok(digest)
}

async fn plan_copy(
    b: &Builder,
    run: &mut Run<'_>,
    st: &mut State,
    ins: &Instruction,
    a: &CopyArgs,
    add: bool,
) -> Outcome<CopyPlan> {
    let workdir = st
        .cfg()
        .get("WorkingDir")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let args = st.args.clone();
    let v = Vars {
        escape: run.file.escape,
        env: config::env_of(st.cfg()),
        args: &args,
    };
    let ex = |w: &str| v.expand(w).map_err(|e| run.fail_at(ins, e));
    let dest_raw = ex(&a.dest)?;
    if dest_raw.is_empty() {
        return Err(run.fail_at(ins, "the destination is empty"));
    }
    let dest_is_dir = dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.");
    let dest = config::join_workdir(&workdir, &dest_raw);
    let chown = a.chown.as_deref().map(&ex).transpose()?;
    let chmod = match a.chmod.as_deref().map(&ex).transpose()? {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(&m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| run.fail_at(ins, format!("invalid --chmod {m:?}: want octal")))?,
        ),
    };
    let from_word = a.from.as_deref().map(&ex).transpose()?;
    let mut patterns = Vec::new();
    let mut url_sources = Vec::new();
    for s in &a.sources {
        let s = ex(s)?;
        if s.starts_with("http://") || s.starts_with("https://") {
            if !add {
                return Err(run.fail_at(ins, "source can't be a URL for COPY (ADD fetches URLs)"));
            }
            url_sources.push(s);
        } else if s.starts_with("git@") || s.ends_with(".git") && s.contains("://") {
            return Err(run.fail_at(ins, "git sources are not supported by berth"));
        } else {
            patterns.push(s);
        }
    }
    let mut inline_bodies = Vec::new();
    for h in &a.heredocs {
        let body = if h.expand {
            // Inside double quotes only `$`, `"` and the escape are special: escape the
            // latter two and only variables are expanded.
            let quoted = format!(
                "\"{}\"",
                h.content.replace('\\', "\\\\").replace('"', "\\\"")
            );
            ex(&quoted)?
        } else {
            h.content.clone()
        };
        inline_bodies.push((h.name.clone(), body));
    }
    let from = match from_word {
        None => None,
        Some(f) => {
            if !url_sources.is_empty() || !inline_bodies.is_empty() {
                return Err(run.fail_at(ins, "--from takes only paths as sources"));
            }
            Some(resolve_from(b, run, ins, &f).await?)
        }
    };
    let downloads = run.scratch.join(format!("step-{}", run.step));
    fs::create_dir_all(&downloads)
        .map_err(|e| Failure::new(format!("create a scratch directory: {e}")))?;
    // Each source in a directory of its own: two with the same name never overwrite each
    // other. The names are paths relative to `downloads`.
    let mut urls = Vec::new();
    for (i, u) in url_sources.iter().enumerate() {
        let sub = format!("url-{i}");
        let dir = downloads.join(&sub);
        fs::create_dir_all(&dir)
            .map_err(|e| Failure::new(format!("create a scratch directory: {e}")))?;
        let name = download(run, ins, u, &dir).await?;
        urls.push(format!("{sub}/{name}"));
    }
    let mut inline = Vec::new();
    for (i, (name, body)) in inline_bodies.into_iter().enumerate() {
        let clean = context::clean(&name).map_err(|e| run.fail_at(ins, e))?;
        if clean.is_empty() || clean.contains('/') {
            return Err(run.fail_at(ins, format!("bad heredoc name {name:?}")));
        }
        let sub = format!("inline-{i}");
        fs::create_dir_all(downloads.join(&sub))
            .map_err(|e| Failure::new(format!("create a scratch directory: {e}")))?;
        fs::write(downloads.join(&sub).join(&clean), body)
            .map_err(|e| Failure::new(format!("write a heredoc: {e}")))?;
        inline.push(format!("{sub}/{clean}"));
    }
    if patterns.is_empty() && urls.is_empty() && inline.is_empty() {
        return Err(run.fail_at(ins, "no source files were specified"));
    }
    Ok(CopyPlan {
        add,
        patterns,
        urls,
        inline,
        downloads,
        dest,
        dest_is_dir,
        from,
        chown,
        chmod,
    })
}

/// `--from=`: a stage by name or index, else an image.
async fn resolve_from(
    b: &Builder,
    run: &Run<'_>,
    ins: &Instruction,
    word: &str,
) -> Outcome<ImageRecord> {
    let lower = word.to_ascii_lowercase();
    let by_name = run
        .stages
        .iter()
        .rev()
        .find(|(n, _)| n.as_deref() == Some(lower.as_str()));
    let by_index = word.parse::<usize>().ok().and_then(|i| run.stages.get(i));
    if let Some((_, st)) = by_name.or(by_index) {
        return st
            .image
            .clone()
            .ok_or_else(|| run.fail_at(ins, format!("stage {word} has no image")));
    }
    if word.parse::<usize>().is_ok() {
        return Err(run.fail_at(ins, format!("stage {word} is not an earlier stage")));
    }
    Ok(b.base_image(run, word).await?.record)
}

/// Fetches an ADD URL into `dir`; returns the file's name there.
async fn download(run: &Run<'_>, ins: &Instruction, url: &str, dir: &Path) -> Outcome<String> {
    let name = url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains("://"))
        .ok_or_else(|| run.fail_at(ins, format!("cannot determine a file name from {url}")))?
        .to_owned();
    run.say(format!("Downloading {url}\n")).await;
    // No deadline for the whole download (big files are fine), but a stalled server is given
    // up on.
    let client = reqwest::Client::builder()
        .read_timeout(std::time::Duration::from_secs(60))
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::new(format!("http client: {e}")))?;
    let mut resp = client.get(url).send().await.map_err(|e| {
        run.fail_at(
            ins,
            format!("cannot fetch {url}: {}", crate::error::chain(&e)),
        )
    })?;
    if !resp.status().is_success() {
        return Err(run.fail_at(
            ins,
            format!("cannot fetch {url}: the server answered {}", resp.status()),
        ));
    }
    let mut f = tokio::fs::File::create(dir.join(&name))
        .await
        .map_err(|e| Failure::new(format!("write the download: {e}")))?;
    use tokio::io::AsyncWriteExt;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| run.fail_at(ins, format!("cannot fetch {url}: {e}")))?
    {
        f.write_all(&chunk)
            .await
            .map_err(|e| Failure::new(format!("write the download: {e}")))?;
    }
    f.flush()
        .await
        .map_err(|e| Failure::new(format!("write the download: {e}")))?;
    // docker gives downloads mode 0600.
    let _ = tokio::fs::set_permissions(
        dir.join(&name),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .await;
    Ok(name)
}

/// Runs the step and stores its image.
pub(super) async fn execute(
    b: &Builder,
    run: &mut Run<'_>,
    st: &mut State,
    ins: &Instruction,
) -> Outcome<ImageRecord> {
    match &ins.kind {
        Kind::Run { command, heredocs } => {
            let shell = config::shell_of(st.cfg());
            let argv = match (command, heredocs.is_empty()) {
                (Command::Exec(v), _) => v.clone(),
                (Command::Shell(s), true) => config::argv(&Command::Shell(s.clone()), &shell),
                (Command::Shell(s), false) => {
                    let only_markers = s.split_whitespace().all(|w| w.starts_with("<<"));
                    let script = if only_markers {
                        heredocs[0].content.clone()
                    } else {
                        let mut script = format!("{s}\n");
                        for h in heredocs {
                            script.push_str(&h.content);
                            script.push_str(&h.name);
                            script.push('\n');
                        }
                        script
                    };
                    config::argv(&Command::Shell(script), &shell)
                }
            };
            run_step(b, run, st, argv).await
        }
        Kind::Copy(_) | Kind::Add(_) => {
            let plan = run
                .pending_copy
                .take()
                .ok_or_else(|| Failure::new("internal: the copy was not planned"))?;
            copy_step(b, run, st, ins, plan).await
        }
        Kind::Workdir(_) => {
            let mut config = st.config.clone();
            apply_meta(run, st, ins, &mut config)?;
            let dir = config["config"]["WorkingDir"]
                .as_str()
                .unwrap_or("/")
                .to_owned();
            push_history(&mut config, &ins.original, false);
            let parent = st.image.clone();
            let layer = write_step(b, run, parent.as_ref(), None, move |root, _| {
                mkdir_all(root, &dir, 0, 0).map_err(|e| format!("mkdir {dir}: {e}"))
            })
            .await
            .map_err(|e| run.fail_at(ins, e))?;
            if layer.is_none() {
                // It existed: no layer, only the config changes.
                set_last_history_empty(&mut config);
            }
            compose(b, parent, layer, config).await
        }
        _ => {
            let mut config = st.config.clone();
            apply_meta(run, st, ins, &mut config)?;
            push_history(&mut config, &ins.original, true);
            b.store(st.image.clone(), config).await
        }
    }
}

fn apply_meta(run: &Run<'_>, st: &mut State, ins: &Instruction, config: &mut Value) -> Outcome<()> {
    if !config["config"].is_object() {
        config["config"] = json!({});
    }
    let cmd_set = st.cmd_set;
    let args = st.args.clone();
    let v = Vars {
        escape: run.file.escape,
        env: config::env_of(st.cfg()),
        args: &args,
    };
    let cfg = config["config"].as_object_mut().expect("made an object");
    let applied = config::apply(cfg, &ins.kind, &v, cmd_set).map_err(|e| run.fail_at(ins, e))?;
    if let Some(a) = applied.author {
        config["author"] = json!(a);
    }
    Ok(())
}

fn push_history(config: &mut Value, original: &str, empty_layer: bool) {
    push_history_by(
        config,
        &format!("/bin/sh -c #(nop) {original}"),
        empty_layer,
    );
}

fn push_history_by(config: &mut Value, created_by: &str, empty_layer: bool) {
    let at = now();
    config["created"] = json!(at);
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    let mut h = json!({"created": at, "created_by": created_by});
    if empty_layer {
        h["empty_layer"] = json!(true);
    }
    if let Some(a) = config["history"].as_array_mut() {
        a.push(h);
    }
}

fn set_last_history_empty(config: &mut Value) {
    if let Some(last) = config["history"].as_array_mut().and_then(|a| a.last_mut()) {
        last["empty_layer"] = json!(true);
    }
}

async fn compose(
    b: &Builder,
    parent: Option<ImageRecord>,
    layer: Option<NewLayer>,
    config: Value,
) -> Outcome<ImageRecord> {
    let images = b.engine.images().clone();
    Ok(
        tokio::task::spawn_blocking(move || images.compose(parent.as_ref(), layer, config, &[]))
            .await
            .map_err(|e| Failure::new(format!("store thread: {e}")))??,
    )
}

/// RUN: a container of the core on the parent image, its output streamed, its diff the
/// layer.
async fn run_step(
    b: &Builder,
    run: &mut Run<'_>,
    st: &mut State,
    argv: Vec<String>,
) -> Outcome<ImageRecord> {
    if st.image.is_none() {
        st.image = Some(b.store(None, st.config.clone()).await?);
    }
    let parent = st.image.clone().expect("stored above");
    let env_names: Vec<String> = config::env_of(st.cfg())
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    let build_env: Vec<String> = st
        .args
        .iter()
        .filter(|(k, _)| !env_names.contains(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let shown = argv.join(" ");
    // Proxy args reach RUN without an ARG, and stay out of the history (and the cache key),
    // as docker's predefined args do.
    let proxies: Vec<String> = run
        .opts
        .build_args
        .iter()
        .filter(|(k, _)| super::is_predefined_arg(k) && !st.args.contains_key(*k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let created_by = if build_env.is_empty() {
        shown.clone()
    } else {
        format!("|{} {} {shown}", build_env.len(), build_env.join(" "))
    };
    let engine = b.engine.clone();
    let c = Config {
        image: parent.id.to_string(),
        entrypoint: Some(argv),
        cmd: Some(Vec::new()),
        env: build_env.iter().chain(&proxies).cloned().collect(),
        attach_stdout: true,
        attach_stderr: true,
        labels: BTreeMap::from([(super::BUILD_LABEL.to_owned(), "true".to_owned())]),
        ..Default::default()
    };
    let h = HostConfig {
        network_mode: run.opts.network_mode.clone(),
        ..Default::default()
    };
    let created = engine.create(None, c, h).await?;
    let id = created.id.clone();
    run.say(format!(" ---> Running in {}\n", &id[..12])).await;
    let outcome = run_container(b, run, &id).await;
    let layer = match outcome {
        Ok(0) => match engine.get(&id) {
            Ok(r) => {
                let key = r.snapshot_key();
                let images = engine.images().clone();
                let hold = run.hold.clone();
                tokio::task::spawn_blocking(move || {
                    let mut h = hold.lock().unwrap_or_else(|p| p.into_inner());
                    images.layer_from_snapshot(&key, false, &mut h)
                })
                .await
                .map_err(|e| Failure::new(format!("diff thread: {e}")))
                .and_then(|r| r.map_err(Failure::from))
            }
            Err(e) => Err(Failure::from(e)),
        },
        Ok(code) => Err(Failure {
            message: format!("The command '{shown}' returned a non-zero code: {code}"),
            code,
        }),
        Err(e) => Err(e),
    };
    let removed = engine.remove(&id, true).await;
    let layer = layer?;
    removed?;
    run.say(format!(
        " ---> Removed intermediate container {}\n",
        &id[..12]
    ))
    .await;
    let mut config = st.config.clone();
    push_history_by(&mut config, &created_by, false);
    compose(b, Some(parent), Some(layer), config).await
}

/// Starts container `id`, streams its output to the build's client and returns its exit
/// code.
async fn run_container(b: &Builder, run: &Run<'_>, id: &str) -> Outcome<i32> {
    let engine = &b.engine;
    let attach = engine
        .attach(
            id,
            StreamOpts {
                stdin: false,
                stdout: true,
                stderr: true,
                tty: false,
            },
        )
        .await?;
    let waiting = engine.wait_start(id, WaitCondition::NextExit)?;
    engine.start(id).await?;
    let session = attach.session().await?;
    let mut readers = Vec::new();
    for pipe in [session.stdout, session.stderr].into_iter().flatten() {
        let out = run.out.clone();
        readers.push(tokio::spawn(async move {
            let mut pipe = pipe;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if out.send(Progress::Stream(text)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    let drained = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let mut cancel = run.cancel.clone();
    let gone = tokio::select! {
        () = drained => false,
        () = super::cancelled(&mut cancel) => true,
    };
    if gone {
        // The readers end with the process.
        let _ = engine.kill(id, "KILL").await;
    }
    let code = engine.wait_from(waiting).await?;
    if gone {
        return Err(Failure::new(
            "the build was cancelled: its client went away",
        ));
    }
    Ok(code)
}

/// COPY and ADD: the sources written into a snapshot of the parent.
async fn copy_step(
    b: &Builder,
    run: &mut Run<'_>,
    st: &mut State,
    ins: &Instruction,
    plan: CopyPlan,
) -> Outcome<ImageRecord> {
    let mut config = st.config.clone();
    push_history(&mut config, &ins.original, false);
    let parent = st.image.clone();
    let context_dir = run.context.clone();
    let ignore = run.ignore.clone();
    let from = plan.from.clone();
    let layer = write_step(b, run, parent.as_ref(), from.as_ref(), move |dest, src| {
        let context_root;
        let src_root = match src {
            Some(s) => s,
            None => {
                context_root = crate::inroot::open_root(&context_dir).map_err(|e| e.to_string())?;
                context_root.as_fd()
            }
        };
        let ignore = if plan.from.is_some() {
            None
        } else {
            ignore.as_ref()
        };
        copy_into(dest, src_root, ignore, &plan).map(|()| true)
    })
    .await
    .map_err(|e| run.fail_at(ins, format!("COPY failed: {e}")))?;
    compose(b, parent, layer, config).await
}

/// Runs `f` on the root of a fresh snapshot of `parent` (and of `src`'s filesystem, read-only,
/// when given), mounted in the own mount namespace of a thread of its own (never a pooled
/// one). `f` says whether it changed anything; the snapshot becomes the layer, or goes when
/// nothing changed. Everything blocking — leases, snapshots, mounts, the diff — happens on that
/// thread, and the mounts are gone before the diff reads the snapshot.
async fn write_step(
    b: &Builder,
    run: &Run<'_>,
    parent: Option<&ImageRecord>,
    src: Option<&ImageRecord>,
    f: impl FnOnce(BorrowedFd<'_>, Option<BorrowedFd<'_>>) -> Result<bool, String> + Send + 'static,
) -> Result<Option<NewLayer>, String> {
    let images = b.engine.images().clone();
    let hold = run.hold.clone();
    let parent = parent.cloned();
    let src = src.cloned();
    let at = run
        .scratch
        .join(format!("mnt-{}", hex::encode(rand::random::<[u8; 6]>())));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let at2 = at.clone();
    std::thread::Builder::new()
        .name("build-write".into())
        .spawn(move || {
            let lock = || hold.lock().unwrap_or_else(|p| p.into_inner());
            let key = images.scratch_snapshot_key(&mut lock());
            let result = (|| {
                let mounts = images
                    .prepare_scratch(&key, parent.as_ref())
                    .map_err(|e| e.to_string())?;
                let src_mounts = match &src {
                    Some(i) => Some(images.image_mounts(i).map_err(|e| e.to_string())?),
                    None => None,
                };
                let (dest_at, src_at) = (at2.join("dest"), at2.join("src"));
                let changed = (|| {
                    let dest = crate::engine::mounted_privately(&mounts, &dest_at)
                        .map_err(|e| e.to_string())?;
                    let src_root = match &src_mounts {
                        Some(m) => Some(
                            crate::engine::mounted_privately(m, &src_at)
                                .map_err(|e| e.to_string())?,
                        ),
                        None => None,
                    };
                    f(dest.as_fd(), src_root.as_ref().map(AsFd::as_fd))
                })();
                // The roots are closed: the mounts go now, not when the thread's namespace
                // does.
                for m in [&src_at, &dest_at] {
                    let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
                }
                match changed? {
                    true => images
                        .layer_from_snapshot(&key, true, &mut lock())
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    false => images
                        .drop_scratch(&key)
                        .map(|()| None)
                        .map_err(|e| e.to_string()),
                }
            })();
            if result.is_err() {
                let _ = images.drop_scratch(&key);
            }
            drop(hold);
            let _ = tx.send(result);
        })
        .map_err(|e| format!("start a build thread: {e}"))?;
    let result = rx
        .await
        .unwrap_or_else(|_| Err("the build thread died".into()));
    let _ = fs::remove_dir(at.join("dest"));
    let _ = fs::remove_dir(at.join("src"));
    let _ = fs::remove_dir(&at);
    result
}

/// Creates `path` (absolute, in the root) and its missing parents, owned by uid:gid, every
/// symlink resolved inside the root. Returns whether it created anything.
pub(super) fn mkdir_all(root: BorrowedFd<'_>, path: &str, uid: u32, gid: u32) -> io::Result<bool> {
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let mut created = false;
    let mut prefix = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        let parent = if prefix.is_empty() {
            "."
        } else {
            prefix.as_str()
        }
        .to_owned();
        prefix = if prefix.is_empty() {
            part.to_owned()
        } else {
            format!("{prefix}/{part}")
        };
        match openat2(root, prefix.as_str(), how()) {
            Ok(_) => continue,
            Err(Errno::ENOENT) => {}
            Err(Errno::ENOTDIR) => {
                return Err(io::Error::other(format!("/{prefix} is not a directory")));
            }
            Err(e) => return Err(e.into()),
        }
        let dir = openat2(root, parent.as_str(), how())?;
        match nix::sys::stat::mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        nix::unistd::fchownat(
            &dir,
            part,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        created = true;
    }
    Ok(created)
}

/// `--chown=user[:group]` against the destination's /etc/passwd and /etc/group.
fn owner_of(
    root: BorrowedFd<'_>,
    chown: Option<&str>,
    chmod: Option<u32>,
) -> Result<Owner, String> {
    let Some(spec) = chown else {
        return Ok(Owner {
            uid: 0,
            gid: 0,
            mode: chmod,
        });
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let read = |p: &str| {
        crate::inroot::read_small(root, p, 4 << 20)
            .map_err(|e| e.to_string())
            .map(Option::unwrap_or_default)
    };
    let uid: u32 = match user.parse() {
        Ok(n) => n,
        Err(_) => crate::spec::user::parse_passwd(&read("/etc/passwd")?)
            .into_iter()
            .find(|e| e.name == user)
            .map(|e| e.uid)
            .ok_or_else(|| {
                format!("unable to find user {user}: no matching entries in passwd file")
            })?,
    };
    let gid: u32 = match group {
        None => uid,
        Some(g) => match g.parse() {
            Ok(n) => n,
            Err(_) => crate::spec::user::parse_group(&read("/etc/group")?)
                .into_iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
    };
    Ok(Owner {
        uid: u64::from(uid),
        gid: u64::from(gid),
        mode: chmod,
    })
}

/// Whether the file `s` in `root` is a tar archive (plain, gzip or zstd), which ADD unpacks.
fn is_archive(root: BorrowedFd<'_>, s: &Source) -> bool {
    // Only a regular file is opened: a FIFO would block, a device node do what opening it
    // does.
    let Ok(fd) = open_regular(root, &s.rel) else {
        return false;
    };
    let Ok(mut r) = snapshotter::unpack::decompressed(fs::File::from(fd)) else {
        return false;
    };
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got == 512 && &head[257..262] == b"ustar"
}

/// Opens `rel` in `root` for reading if it is a regular file (never opening anything else).
fn open_regular(root: BorrowedFd<'_>, rel: &str) -> Result<OwnedFd, String> {
    let path = crate::inroot::open_in(root, rel, OFlag::O_PATH, true).map_err(|e| e.to_string())?;
    let st = nix::sys::stat::fstat(&path).map_err(|e| format!("stat {rel}: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("{rel} is not a regular file"));
    }
    let fd = nix::fcntl::open(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&path)).as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {rel}: {e}"))?;
    let again = nix::sys::stat::fstat(&fd).map_err(|e| format!("stat {rel}: {e}"))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(format!("{rel} changed while it was opened"));
    }
    Ok(fd)
}

/// Opens the directory `path` (absolute, in the root) with every symlink resolved inside the
/// root.
fn open_dir_in(root: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(openat2(root, if rel.is_empty() { "." } else { rel }, how)?)
}

/// Makes room for a new non-directory `name` in `dir`: what is there goes, unless it is a
/// directory.
fn clear_slot(dir: BorrowedFd<'_>, name: &str, shown: &str) -> io::Result<()> {
    match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Err(io::Error::other(format!(
            "cannot overwrite directory {shown} with a non-directory"
        ))),
        Ok(_) => Ok(nix::unistd::unlinkat(
            dir,
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )?),
    }
}

fn set_times(dir: BorrowedFd<'_>, name: &str, mtime: i64) -> io::Result<()> {
    let t = nix::sys::time::TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        dir,
        name,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Writes one entry met walking a source at `full` (absolute, in `dest`), its parents made as
/// needed. Every directory on the way is resolved inside the root, symlinks included (a
/// merged-`/usr` image's `/bin`), as BuildKit does; the entry itself replaces what was there.
fn write_entry(
    dest: BorrowedFd<'_>,
    full: &str,
    e: &context::Entry<'_>,
    owner: Owner,
) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let (uid, gid) = (owner.uid as u32, owner.gid as u32);
    let ft = e.meta.file_type();
    let mode = owner.mode.unwrap_or(e.meta.mode() & 0o7777);
    let mtime = e.meta.mtime();
    if ft.is_dir() {
        mkdir_all(dest, full, uid, gid)?;
        let d = open_dir_in(dest, full)?;
        nix::unistd::fchown(
            &d,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
        nix::sys::stat::fchmod(&d, Mode::from_bits_truncate(mode))?;
        let t = nix::sys::time::TimeSpec::new(mtime, 0);
        nix::sys::stat::futimens(&d, &t, &t)?;
        return Ok(());
    }
    let (parent, name) = crate::inroot::split(full.trim_start_matches('/'));
    let parent = format!("/{}", if parent == "." { "" } else { parent });
    mkdir_all(dest, &parent, uid, gid)?;
    let dir = open_dir_in(dest, &parent)?;
    clear_slot(dir.as_fd(), name, full)?;
    let ids = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    );
    if ft.is_file() {
        let out = nix::fcntl::openat(
            &dir,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut out = fs::File::from(out);
        let mut input = fs::File::open(e.path)?;
        io::copy(&mut (&mut input).take(e.meta.len()), &mut out)?;
        nix::unistd::fchown(&out, ids.0, ids.1)?;
        // After the chown, which clears set-id bits.
        nix::sys::stat::fchmod(&out, Mode::from_bits_truncate(mode))?;
        let t = nix::sys::time::TimeSpec::new(mtime, 0);
        nix::sys::stat::futimens(&out, &t, &t)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(e.path)?;
        nix::unistd::symlinkat(target.as_path(), &dir, name)?;
        nix::unistd::fchownat(
            &dir,
            name,
            ids.0,
            ids.1,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        set_times(dir.as_fd(), name, mtime)?;
    } else if ft.is_fifo() {
        nix::sys::stat::mknodat(
            &dir,
            name,
            nix::sys::stat::SFlag::S_IFIFO,
            Mode::from_bits_truncate(mode),
            0,
        )?;
        nix::unistd::fchownat(
            &dir,
            name,
            ids.0,
            ids.1,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        set_times(dir.as_fd(), name, mtime)?;
    }
    // Sockets and devices do not travel in a build.
    Ok(())
}

/// Copies `src` from `root` into `dest`: a directory's contents into `dir`, a file as
/// `dir/name`.
fn copy_source(
    dest: BorrowedFd<'_>,
    root: BorrowedFd<'_>,
    src: &Source,
    dir: &str,
    name: &str,
    owner: Owner,
    ignore: Option<&DockerIgnore>,
) -> Result<(), String> {
    let base = dir.trim_end_matches('/');
    context::walk(root, src, ignore, &mut |e| {
        let rel = match (e.sub.is_empty(), src.is_dir) {
            // The directory itself: its contents go into `dir`, made already.
            (true, true) => return Ok(()),
            (true, false) => name.to_owned(),
            (false, _) => e.sub.to_owned(),
        };
        let full = format!("{base}/{rel}");
        write_entry(dest, &full, &e, owner)
            .map_err(|err| io::Error::other(format!("{full}: {err}")))
    })
    .map_err(|e| e.to_string())
}

fn copy_into(
    dest: BorrowedFd<'_>,
    src: BorrowedFd<'_>,
    ignore: Option<&DockerIgnore>,
    plan: &CopyPlan,
) -> Result<(), String> {
    let owner = owner_of(dest, plan.chown.as_deref(), plan.chmod)?;
    let (uid, gid) = (owner.uid as u32, owner.gid as u32);
    let extra_root = crate::inroot::open_root(&plan.downloads).map_err(|e| e.to_string())?;
    // (root, source, whether ADD may unpack it)
    let mut sources: Vec<(BorrowedFd<'_>, Source, bool)> = Vec::new();
    for p in &plan.patterns {
        for s in context::resolve(src, p, ignore)? {
            sources.push((src, s, plan.add));
        }
    }
    for n in plan.urls.iter().chain(&plan.inline) {
        sources.push((
            extra_root.as_fd(),
            Source {
                rel: n.clone(),
                is_dir: false,
            },
            false,
        ));
    }
    let dest_exists_dir =
        crate::inroot::open_in(dest, &plan.dest, OFlag::O_PATH | OFlag::O_DIRECTORY, true).is_ok();
    let into_dir = plan.dest_is_dir || dest_exists_dir;
    if sources.len() > 1 && !into_dir {
        return Err(
            "When using COPY with more than one source file, the destination must be a directory and end with a /"
                .into(),
        );
    }
    for (root, s, may_unpack) in &sources {
        if s.is_dir {
            mkdir_all(dest, &plan.dest, uid, gid)
                .map_err(|e| format!("mkdir {}: {e}", plan.dest))?;
            copy_source(dest, *root, s, &plan.dest, "", owner, ignore)?;
        } else if *may_unpack && is_archive(*root, s) {
            mkdir_all(dest, &plan.dest, uid, gid)
                .map_err(|e| format!("mkdir {}: {e}", plan.dest))?;
            let fd = open_regular(*root, &s.rel)?;
            crate::engine::archive::extract_tar(dest, &plan.dest, fs::File::from(fd))
                .map_err(|e| e.to_string())?;
        } else {
            let (dir, name) = if into_dir {
                (plan.dest.clone(), s.base_name().to_owned())
            } else {
                let (d, n) = crate::inroot::split(plan.dest.trim_start_matches('/'));
                (format!("/{d}"), n.to_owned())
            };
            mkdir_all(dest, &dir, uid, gid).map_err(|e| format!("mkdir {dir}: {e}"))?;
            copy_source(dest, *root, s, &dir, &name, owner, None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mkdir_all_creates_parents_inside_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/", t.path().join("up")).expect("symlink");
        let root = crate::inroot::open_root(t.path()).expect("root");
        assert!(mkdir_all(root.as_fd(), "/a/b/c", 0, 0).expect("mkdir"));
        assert!(t.path().join("a/b/c").is_dir());
        assert!(!mkdir_all(root.as_fd(), "/a/b", 0, 0).expect("again"));
        // Through a symlink to `/`: still inside the root.
        assert!(mkdir_all(root.as_fd(), "/up/x", 0, 0).expect("via link"));
        assert!(t.path().join("x").is_dir());
        std::fs::write(t.path().join("f"), "").expect("file");
        assert!(mkdir_all(root.as_fd(), "/f/g", 0, 0).is_err());
    }

    #[test]
    fn a_copied_directory_lands_through_symlinked_parents_with_the_owner_asked_for() {
        let src = tempfile::tempdir().expect("src");
        std::fs::create_dir_all(src.path().join("tree/bin")).expect("mkdir");
        std::fs::write(src.path().join("tree/bin/tool"), "#!/bin/sh\n").expect("write");
        std::os::unix::fs::symlink("tool", src.path().join("tree/bin/alias")).expect("symlink");
        let dest = tempfile::tempdir().expect("dest");
        // A merged-/usr image: /bin is a symlink into /usr.
        std::fs::create_dir_all(dest.path().join("usr/bin")).expect("mkdir");
        std::os::unix::fs::symlink("usr/bin", dest.path().join("bin")).expect("symlink");
        std::fs::write(dest.path().join("usr/bin/alias"), "old").expect("write");
        let src_root = crate::inroot::open_root(src.path()).expect("root");
        let dest_root = crate::inroot::open_root(dest.path()).expect("root");
        let s = &context::resolve(src_root.as_fd(), "tree", None).expect("resolve")[0];
        let owner = Owner {
            uid: 1000,
            gid: 1001,
            mode: None,
        };
        copy_source(dest_root.as_fd(), src_root.as_fd(), s, "/", "", owner, None).expect("copy");
        let tool = dest.path().join("usr/bin/tool");
        assert_eq!(std::fs::read_to_string(&tool).expect("read"), "#!/bin/sh\n");
        let meta = std::fs::metadata(&tool).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
        assert_eq!(
            std::fs::read_link(dest.path().join("usr/bin/alias")).expect("link"),
            Path::new("tool")
        );
        assert!(
            std::fs::symlink_metadata(dest.path().join("bin"))
                .expect("stat")
                .file_type()
                .is_symlink(),
            "/bin stays a symlink"
        );
        // A directory in the way of a file is an error, not a silent replacement.
        std::fs::create_dir_all(dest.path().join("d/x")).expect("mkdir");
        std::fs::write(src.path().join("x"), "file").expect("write");
        let f = &context::resolve(src_root.as_fd(), "x", None).expect("resolve")[0];
        let err = copy_source(
            dest_root.as_fd(),
            src_root.as_fd(),
            f,
            "/d",
            "x",
            owner,
            None,
        )
        .expect_err("dir in the way");
        assert!(err.contains("cannot overwrite directory"), "{err}");
    }

    #[test]
    fn chown_takes_names_and_numbers() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("etc")).expect("etc");
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(t.path().join("etc/group"), "root:x:0:\nstaff:x:50:app\n").expect("group");
        let root = crate::inroot::open_root(t.path()).expect("root");
        let o = owner_of(root.as_fd(), Some("app:staff"), None).expect("names");
        assert_eq!((o.uid, o.gid), (1000, 50));
        let o = owner_of(root.as_fd(), Some("7"), Some(0o640)).expect("number");
        assert_eq!((o.uid, o.gid, o.mode), (7, 7, Some(0o640)));
        let e = owner_of(root.as_fd(), Some("nobody"), None).expect_err("unknown");
        assert!(e.contains("unable to find user nobody"), "{e}");
    }
}
