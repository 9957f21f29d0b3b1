//! Dockerfile builds with the semantics of docker's classic builder (the one `POST /build`
//! serves): every step makes an image — RUN by running a container of the core on the step's
//! parent and committing its diff, COPY/ADD/WORKDIR by writing into a snapshot of the parent,
//! the rest by changing only the config — and every step's image is found again by its cache
//! key (parent image, instruction, inputs) the next time.

pub mod cache;
pub mod commit;
pub mod config;
mod context;
mod steps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use api::Digest;
use api::dockerfile::{self, Dockerfile, Instruction, Kind};
use api::dockerignore::DockerIgnore;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

pub use self::cache::BuildCache;
use crate::engine::Engine;
use crate::error::Error;
use crate::image::{ImageRecord, NamedImage};

/// The label of the containers RUN steps run in.
pub const BUILD_LABEL: &str = "io.berth.build";

/// Largest Dockerfile read.
const MAX_DOCKERFILE: u64 = 4 << 20;

/// What a build is asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The Dockerfile's path in the context (`Dockerfile` when empty).
    pub dockerfile: String,
    /// References to tag the result with (normalized).
    pub tags: Vec<String>,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to stop at.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--label`s for the image.
    pub labels: BTreeMap<String, String>,
    /// Network mode of RUN containers (`bridge` when empty).
    pub network_mode: String,
    /// `--pull`: pull base images even when present.
    pub pull: bool,
    /// Credentials for base images, by registry host (docker's `X-Registry-Config`).
    pub auths: BTreeMap<String, api::cri::AuthConfig>,
}

/// What a build tells its client as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Text for the build's output (docker's `stream`).
    Stream(String),
    /// docker's `aux` message (the built image's id).
    Aux(Value),
}

/// Why a build failed: a message for the user and docker's error code (a failed RUN's exit
/// status, else 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// The code the docker client exits with.
    pub code: i32,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(e.to_string())
    }
}

type Outcome<T> = std::result::Result<T, Failure>;

/// The builder: the engine it runs steps on, and its cache.
pub struct Builder {
    engine: Arc<Engine>,
    cache: BuildCache,
    /// Where builds keep their scratch files (`<root>/builds`).
    dir: PathBuf,
}

/// Where a stage is, between steps.
#[derive(Clone)]
struct State {
    /// The image of the last step (None: `FROM scratch` and nothing stored yet).
    image: Option<ImageRecord>,
    /// Its whole image config.
    config: Value,
    /// ARGs in scope, with their values.
    args: BTreeMap<String, String>,
    /// Whether the stage set CMD yet.
    cmd_set: bool,
}

impl State {
    fn cfg(&mut self) -> &mut serde_json::Map<String, Value> {
        if !self.config["config"].is_object() {
            self.config["config"] = json!({});
        }
        self.config["config"]
            .as_object_mut()
            .expect("made an object above")
    }

    fn cache_parent(&self) -> String {
        self.image
            .as_ref()
            .map_or_else(|| "scratch".to_owned(), |i| i.id.to_string())
    }
}

/// One build in progress: what every step needs.
struct Run<'a> {
    opts: &'a Options,
    file: &'a Dockerfile,
    file_name: String,
    context: PathBuf,
    ignore: Option<DockerIgnore>,
    out: &'a mpsc::Sender<Progress>,
    step: usize,
    steps: usize,
    /// Build args some ARG declared.
    consumed: BTreeSet<String>,
    /// Built stages: name (if any) and result.
    stages: Vec<(Option<String>, State)>,
    /// This build's scratch directory.
    scratch: PathBuf,
    /// The COPY/ADD the current step planned while working out its cache key.
    pending_copy: Option<steps::CopyPlan>,
    /// What the build relies on (every image it stands on or made, its scratch snapshots and
    /// new blobs), kept from the collector until the build ends. Locked on blocking threads
    /// only.
    hold: Arc<std::sync::Mutex<crate::image::compose::Hold>>,
    /// Turns true when the client has gone: the build stops at the next step, and a running
    /// RUN is killed.
    cancel: tokio::sync::watch::Receiver<bool>,
}

/// Resolves once `rx` says the build is cancelled (never, if its sender is gone without).
pub(crate) async fn cancelled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Run<'_> {
    fn check_cancelled(&self) -> Outcome<()> {
        if *self.cancel.borrow() {
            return Err(Failure::new(
                "the build was cancelled: its client went away",
            ));
        }
        Ok(())
    }

    async fn say(&self, text: impl Into<String>) {
        let _ = self.out.send(Progress::Stream(text.into())).await;
    }

    fn fail_at(&self, ins: &Instruction, message: impl std::fmt::Display) -> Failure {
        Failure::new(format!(
            "{}:{}: {}: {message}",
            self.file_name,
            ins.line,
            ins.keyword()
        ))
    }
}

/// The first 12 hex digits of an id.
pub fn short(id: &Digest) -> &str {
    &id.hex()[..12]
}

fn scratch_config() -> Value {
    let (os, arch) = crate::image::registry::host_platform();
    json!({
        "architecture": arch,
        "os": os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    })
}

fn now() -> String {
    api::time::rfc3339_nano(crate::sandbox::now_ns())
}

/// The cache key of a step: its parent, what it says and what it reads.
fn cache_key(parent: &str, what: &str, args: &BTreeMap<String, String>, inputs: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [parent.as_bytes(), what.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (k, v) in args {
        for part in [k, v] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.update(inputs);
    hex::encode(h.finalize())
}

impl Builder {
    /// A builder over `engine`, its cache in the engine's database.
    pub fn new(engine: Arc<Engine>, root: &std::path::Path) -> crate::error::Result<Builder> {
        let dir = root.join("builds");
        // Scratch files of builds a crash cut short.
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Builder {
            cache: BuildCache::open(engine.db().clone())?,
            engine,
            dir,
        })
    }

    /// Removes the RUN containers of builds a crash of berthd cut short.
    pub async fn remove_leftovers(&self) {
        let Ok(records) = self.engine.list() else {
            return;
        };
        for r in records {
            if r.config
                .labels
                .get(BUILD_LABEL)
                .is_some_and(|v| v == "true")
            {
                match self.engine.remove(&r.id, true).await {
                    Ok(()) => {
                        tracing::info!(container_id = %r.id, "removed a cut-short build's container")
                    }
                    Err(e) => {
                        tracing::warn!(container_id = %r.id, error = %e, "remove a cut-short build's container")
                    }
                }
            }
        }
    }

    /// Those of `ids` no docker container is made from (they stay, as docker keeps an image
    /// a container uses).
    fn unused(&self, mut ids: BTreeSet<Digest>) -> crate::error::Result<BTreeSet<Digest>> {
        for r in self.engine.list()? {
            ids.retain(|id| id.as_str() != r.image_id);
        }
        Ok(ids)
    }

    /// The cache.
    pub fn cache(&self) -> &BuildCache {
        &self.cache
    }

    /// Forgets the cache and removes the untagged images only it kept. Returns (images
    /// removed, bytes their records held).
    pub async fn prune(&self) -> crate::error::Result<(Vec<Digest>, u64)> {
        let ids = self.unused(self.cache.clear()?)?;
        let images = self.engine.images().clone();
        tokio::task::spawn_blocking(move || images.remove_untagged(&ids))
            .await
            .map_err(|e| Error::Internal(format!("prune thread: {e}")))?
    }

    /// Builds the context in `context` (an extracted directory this build may change) and
    /// returns the image, tagged as asked. Progress goes to `out` as it happens.
    pub async fn build(
        &self,
        context: PathBuf,
        opts: Options,
        out: mpsc::Sender<Progress>,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Outcome<Digest> {
        let scratch = self
            .dir
            .join(format!("build-{}", hex::encode(rand::random::<[u8; 8]>())));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Failure::new(format!("create the build's scratch directory: {e}")))?;
        let hold = Arc::new(std::sync::Mutex::new(self.engine.images().new_hold()));
        let hold_for_run = hold.clone();
        let result = self
            .build_in(context, &opts, &out, scratch.clone(), hold_for_run, cancel)
            .await;
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        // The last reference: its lease goes on a blocking thread.
        let _ = tokio::task::spawn_blocking(move || drop(hold)).await;
        result
    }

    async fn build_in(
        &self,
        context: PathBuf,
        opts: &Options,
        out: &mpsc::Sender<Progress>,
        scratch: PathBuf,
        hold: Arc<std::sync::Mutex<crate::image::compose::Hold>>,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Outcome<Digest> {
        let file_name = if opts.dockerfile.is_empty() {
            "Dockerfile".to_owned()
        } else {
            opts.dockerfile.clone()
        };
        // Reading (up to 4 MiB) and parsing are blocking work: off the async workers.
        let (file, ignore) = {
            let (context, file_name) = (context.clone(), file_name.clone());
            tokio::task::spawn_blocking(move || {
                let (text, ignore) = read_inputs(&context, &file_name)?;
                let file = dockerfile::parse(&file_name, &text)
                    .map_err(|e| Failure::new(e.to_string()))?;
                Ok::<_, Failure>((file, ignore))
            })
            .await
            .map_err(|e| Failure::new(format!("parse thread: {e}")))??
        };
        let target = match &opts.target {
            None => file.stages.len() - 1,
            Some(t) => file
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(&t.to_ascii_lowercase()))
                .ok_or_else(|| Failure::new(format!("target stage {t:?} could not be found")))?,
        };
        let steps = file.stages[..=target]
            .iter()
            .map(|s| 1 + s.instructions.len())
            .sum::<usize>()
            + usize::from(!opts.labels.is_empty());
        let mut run = Run {
            opts,
            file: &file,
            file_name,
            context,
            ignore,
            out,
            step: 0,
            steps,
            consumed: BTreeSet::new(),
            stages: Vec::new(),
            scratch,
            pending_copy: None,
            hold,
            cancel,
        };
        for note in &file.notes {
            run.say(format!("{note}\n")).await;
        }
        let meta = self.meta_args(&mut run)?;
        for (i, stage) in file.stages[..=target].iter().enumerate() {
            let mut st = self.from(&mut run, i, &meta).await?;
            for ins in &stage.instructions {
                run.step += 1;
                run.say(format!(
                    "Step {}/{} : {}\n",
                    run.step, run.steps, ins.original
                ))
                .await;
                self.step(&mut run, &mut st, ins, &meta).await?;
            }
            if i == target && !opts.labels.is_empty() {
                run.step += 1;
                let pairs: Vec<(String, String)> = opts
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let text = pairs
                    .iter()
                    .map(|(k, v)| format!("{k:?}={v:?}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let ins = Instruction {
                    line: 0,
                    original: format!("LABEL {text}"),
                    kind: Kind::Label(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (quote(&k), quote(&v)))
                            .collect(),
                    ),
                };
                run.say(format!(
                    "Step {}/{} : {}\n",
                    run.step, run.steps, ins.original
                ))
                .await;
                self.step(&mut run, &mut st, &ins, &meta).await?;
            }
            if st.image.is_none() {
                // A stage of only `FROM scratch` still makes an (empty) image.
                let parent = None;
                let record = self.store(parent, st.config.clone()).await?;
                st.image = Some(record);
            }
            run.stages.push((stage.name.clone(), st));
        }
        let unused: Vec<&String> = opts
            .build_args
            .keys()
            .filter(|k| !run.consumed.contains(*k) && !is_predefined_arg(k))
            .collect();
        if !unused.is_empty() {
            run.say(format!(
                "[Warning] One or more build-args {unused:?} were not consumed\n"
            ))
            .await;
        }
        let (_, last) = run
            .stages
            .last()
            .ok_or_else(|| Failure::new("the Dockerfile has no stage"))?;
        let image = last
            .image
            .clone()
            .ok_or_else(|| Failure::new("the last stage made no image"))?;
        let id = image.id.clone();
        let _ = out.send(Progress::Aux(json!({"ID": id.to_string()}))).await;
        run.say(format!("Successfully built {}\n", short(&id)))
            .await;
        for t in &opts.tags {
            self.engine.images().tag(id.as_str(), t)?;
            run.say(format!("Successfully tagged {}\n", t)).await;
        }
        Ok(id)
    }

    /// Values of the ARGs before the first FROM.
    fn meta_args(&self, run: &mut Run<'_>) -> Outcome<BTreeMap<String, String>> {
        let mut meta = BTreeMap::new();
        for a in &run.file.meta_args {
            let value = match run.opts.build_args.get(&a.name) {
                Some(v) => Some(v.clone()),
                None => match &a.default {
                    Some(d) => {
                        let vars = config::Vars {
                            escape: run.file.escape,
                            env: Vec::new(),
                            args: &meta,
                        };
                        Some(vars.expand(d).map_err(|e| {
                            Failure::new(format!("{}: ARG {}: {e}", run.file_name, a.name))
                        })?)
                    }
                    None => None,
                },
            };
            run.consumed.insert(a.name.clone());
            if let Some(v) = value {
                meta.insert(a.name.clone(), v);
            }
        }
        Ok(meta)
    }

    /// The FROM of stage `i`.
    async fn from(
        &self,
        run: &mut Run<'_>,
        i: usize,
        meta: &BTreeMap<String, String>,
    ) -> Outcome<State> {
        let file: &Dockerfile = run.file;
        let stage = &file.stages[i];
        run.step += 1;
        let mut line = format!("FROM {}", stage.base);
        if let Some(n) = &stage.name {
            line.push_str(&format!(" AS {n}"));
        }
        run.say(format!("Step {}/{} : {line}\n", run.step, run.steps))
            .await;
        let vars = config::Vars {
            escape: run.file.escape,
            env: Vec::new(),
            args: meta,
        };
        let base = vars
            .expand(&stage.base)
            .map_err(|e| Failure::new(format!("{}:{}: FROM: {e}", run.file_name, stage.line)))?;
        if let Some(p) = &stage.platform {
            let p = vars.expand(p).map_err(|e| {
                Failure::new(format!("{}:{}: FROM: {e}", run.file_name, stage.line))
            })?;
            let (os, arch) = crate::image::registry::host_platform();
            if !p.is_empty() && p != format!("{os}/{arch}") && p != os {
                return Err(Failure::new(format!(
                    "{}:{}: FROM: platform {p:?} is not this host's ({os}/{arch}); berth builds for the host only",
                    run.file_name, stage.line
                )));
            }
        }
        if base.is_empty() {
            return Err(Failure::new(format!(
                "{}:{}: FROM: the base image name is empty",
                run.file_name, stage.line
            )));
        }
        let lower = base.to_ascii_lowercase();
        if let Some((_, st)) = run
            .stages
            .iter()
            .rev()
            .find(|(n, _)| n.as_deref() == Some(lower.as_str()))
        {
            let mut st = st.clone();
            st.args = BTreeMap::new();
            st.cmd_set = false;
            if let Some(img) = &st.image {
                run.say(format!(" ---> {}\n", short(&img.id))).await;
            }
            // A stage's ONBUILD runs where it is built on, as an image's does.
            self.triggers(run, &mut st, meta).await?;
            return Ok(st);
        }
        if lower == "scratch" {
            run.say(" ---> \n").await;
            return Ok(State {
                image: None,
                config: scratch_config(),
                args: BTreeMap::new(),
                cmd_set: false,
            });
        }
        let named = self.base_image(run, &base).await?;
        run.say(format!(" ---> {}\n", short(&named.record.id)))
            .await;
        let config = object_config(self.engine.images().config_json(&named)?, &base)?;
        let mut st = State {
            image: Some(named.record),
            config,
            args: BTreeMap::new(),
            cmd_set: false,
        };
        self.triggers(run, &mut st, meta).await?;
        Ok(st)
    }

    /// Runs the base's ONBUILD triggers on `st` (and clears them, as docker does).
    async fn triggers(
        &self,
        run: &mut Run<'_>,
        st: &mut State,
        meta: &BTreeMap<String, String>,
    ) -> Outcome<()> {
        let triggers: Vec<String> = st
            .cfg()
            .get("OnBuild")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if !triggers.is_empty() {
            st.cfg().insert("OnBuild".into(), Value::Null);
            run.say(format!("# Executing {} build trigger(s)\n", triggers.len()))
                .await;
            for t in triggers {
                let ins = dockerfile::parse_trigger(&run.file_name, &t, run.file.escape)
                    .map_err(|e| Failure::new(format!("ONBUILD trigger {t:?}: {e}")))?;
                run.say(format!(" ---> Running trigger: {}\n", ins.original))
                    .await;
                self.step(run, st, &ins, meta).await?;
            }
        }
        Ok(())
    }

    /// The base image `name`: here already (unless `--pull`), else pulled.
    async fn base_image(&self, run: &Run<'_>, name: &str) -> Outcome<NamedImage> {
        let images = self.engine.images();
        if !run.opts.pull
            && let Some(i) = images.resolve(name)?
        {
            self.hold(run, &i.record).await?;
            return Ok(i);
        }
        run.say(format!("Pulling {name}\n")).await;
        let auth = crate::image::reference::Reference::parse(name)
            .ok()
            .and_then(|r| run.opts.auths.get(&r.registry));
        let id = images.pull(name, auth).await.map_err(|e| {
            Failure::new(format!(
                "pull access denied or image not found for {name}: {e}"
            ))
        })?;
        let i = images
            .resolve(id.as_str())?
            .ok_or_else(|| Failure::new(format!("{name} vanished after its pull")))?;
        self.hold(run, &i.record).await?;
        Ok(i)
    }

    /// Keeps `image`'s content for the rest of the build.
    async fn hold(&self, run: &Run<'_>, image: &ImageRecord) -> Outcome<()> {
        let images = self.engine.images().clone();
        let hold = run.hold.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            let mut h = hold.lock().unwrap_or_else(|p| p.into_inner());
            images.hold_image(&mut h, &image);
        })
        .await
        .map_err(|e| Failure::new(format!("hold thread: {e}")))
    }

    /// Stores a config-only image on `parent`.
    async fn store(&self, parent: Option<ImageRecord>, config: Value) -> Outcome<ImageRecord> {
        let images = self.engine.images().clone();
        Ok(
            tokio::task::spawn_blocking(move || images.compose(parent.as_ref(), None, config, &[]))
                .await
                .map_err(|e| Failure::new(format!("store thread: {e}")))??,
        )
    }

    /// Runs one instruction on `st`.
    async fn step(
        &self,
        run: &mut Run<'_>,
        st: &mut State,
        ins: &Instruction,
        meta: &BTreeMap<String, String>,
    ) -> Outcome<()> {
        run.check_cancelled()?;
        if let Kind::Arg(decls) = &ins.kind {
            for a in decls {
                let vars = config::Vars {
                    escape: run.file.escape,
                    env: config::env_of(st.cfg()),
                    args: &st.args,
                };
                let value = match run.opts.build_args.get(&a.name) {
                    Some(v) => Some(v.clone()),
                    None => match &a.default {
                        Some(d) => Some(vars.expand(d).map_err(|e| run.fail_at(ins, e))?),
                        None => meta.get(&a.name).cloned(),
                    },
                };
                run.consumed.insert(a.name.clone());
                if let Some(v) = value {
                    st.args.insert(a.name.clone(), v);
                }
            }
            if let Some(i) = &st.image {
                run.say(format!(" ---> {}\n", short(&i.id))).await;
            }
            return Ok(());
        }
        // The inputs a step reads beyond its text (COPY sources), for its cache key; the
        // steps module works them out.
        let inputs = steps::inputs(self, run, st, ins).await?;
        // Whether CMD was set matters to what ENTRYPOINT leaves of it.
        let what = format!("{}\n{}", u8::from(st.cmd_set), ins.original);
        let key = cache_key(&st.cache_parent(), &what, &st.args, &inputs);
        if !run.opts.no_cache
            && let Some(id) = self.cache.get(&key)?
            && let Some(found) = self.engine.images().resolve(id.as_str())?
        {
            self.hold(run, &found.record).await?;
            st.config = object_config(self.engine.images().config_json(&found)?, id.as_str())?;
            st.image = Some(found.record);
            if matches!(ins.kind, Kind::Cmd(_)) {
                st.cmd_set = true;
            }
            run.say(" ---> Using cache (CACHED)\n").await;
            run.say(format!(" ---> {}\n", short(&id))).await;
            return Ok(());
        }
        let record = steps::execute(self, run, st, ins).await?;
        self.hold(run, &record).await?;
        let replaced = self.cache.get(&key)?.filter(|old| *old != record.id);
        self.cache.put(&key, &record.id)?;
        if let Some(old) = replaced {
            // A `--no-cache` step's predecessor: nothing finds it any more; gone unless tagged.
            let images = self.engine.images().clone();
            let ids = self.unused(BTreeSet::from([old]))?;
            tokio::task::spawn_blocking(move || images.remove_untagged(&ids))
                .await
                .map_err(|e| Failure::new(format!("prune thread: {e}")))??;
        }
        run.say(format!(" ---> {}\n", short(&record.id))).await;
        st.config = self.engine.images().config_json(&NamedImage {
            record: record.clone(),
            tags: Vec::new(),
            digests: Vec::new(),
        })?;
        st.image = Some(record);
        if matches!(ins.kind, Kind::Cmd(_)) {
            st.cmd_set = true;
        }
        Ok(())
    }
}

/// An image config as the builder changes it: a JSON object (a hostile one is refused).
fn object_config(mut config: Value, name: &str) -> Outcome<Value> {
    if !config.is_object() {
        return Err(Failure::new(format!(
            "the config of {name} is not a JSON object"
        )));
    }
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    if !config["config"].is_object() {
        config["config"] = json!({});
    }
    Ok(config)
}

/// Build args docker lets through without an ARG (proxies).
pub(crate) fn is_predefined_arg(k: &str) -> bool {
    matches!(
        k.to_ascii_lowercase().as_str(),
        "http_proxy" | "https_proxy" | "ftp_proxy" | "no_proxy" | "all_proxy"
    )
}

/// `s` as a double-quoted Dockerfile word.
fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '$') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The Dockerfile's text and the context's `.dockerignore`, read inside the context.
fn read_inputs(
    context: &std::path::Path,
    file_name: &str,
) -> Outcome<(String, Option<DockerIgnore>)> {
    let root = crate::inroot::open_root(context)?;
    let rel = context::clean(file_name).map_err(Failure::new)?;
    let text = crate::inroot::read_small(std::os::fd::AsFd::as_fd(&root), &rel, MAX_DOCKERFILE)
        .map_err(|e| Failure::new(format!("read the Dockerfile {file_name}: {e}")))?
        .ok_or_else(|| Failure::new(format!("Cannot locate specified Dockerfile: {file_name}")))?;
    let ignore = match crate::inroot::read_small(
        std::os::fd::AsFd::as_fd(&root),
        ".dockerignore",
        MAX_DOCKERFILE,
    )? {
        Some(t) => {
            Some(DockerIgnore::parse(&t).map_err(|e| Failure::new(format!(".dockerignore: {e}")))?)
        }
        None => None,
    };
    Ok((text, ignore.filter(|i| !i.is_empty())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_every_part() {
        let none = BTreeMap::new();
        let a = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let base = cache_key("p", "RUN x", &none, b"");
        assert_eq!(base, cache_key("p", "RUN x", &none, b""));
        assert_ne!(base, cache_key("q", "RUN x", &none, b""));
        assert_ne!(base, cache_key("p", "RUN y", &none, b""));
        assert_ne!(base, cache_key("p", "RUN x", &a, b""));
        assert_ne!(base, cache_key("p", "RUN x", &none, b"i"));
        // Parts are length-prefixed: moving bytes between them changes the key.
        assert_ne!(cache_key("pR", "UN x", &none, b""), base);
    }

    #[test]
    fn quoted_words_escape_what_expansion_reads() {
        assert_eq!(quote(r#"a "b" $c\"#), r#""a \"b\" \$c\\""#);
    }
}
