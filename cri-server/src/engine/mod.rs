//! The engine: docker-style containers on the core. A docker container is a record here (its
//! name, docker-shaped config, state, restart count) plus a rootfs snapshot it keeps for its
//! whole life; each run of it is a single-container pod of the core, made at start and torn
//! down when it stops, so the network and namespaces are held only while it runs. The Docker
//! API front door translates HTTP into calls on [`Engine`] and holds no container logic.
//!
//! Docker semantics kept here: unique names usable wherever an id is, short id prefixes,
//! restart policies (also across berthd restarts), `AutoRemove`, attach before start.

pub mod archive;
pub mod events;
pub mod logs;
pub mod networks;
pub mod spec;
pub mod translate;
pub mod volumes;

pub(crate) use archive::mounted_privately;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use api::cri;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use snapshotter::Snapshotter;
use tokio::sync::{oneshot, watch};

use crate::container::ContainerManager;
use crate::container::stream::{AttachSession, StreamOpts};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::image::ImageManager;
use crate::sandbox::{SandboxManager, now_ns};
use events::EngineEvents;
use spec::{Config, HostConfig};

/// docker container id → JSON [`Record`].
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_containers");
/// Container name (without `/`) → id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("engine_names");
/// Label on the pods and containers the engine runs: the CRI front door leaves them out.
pub const ENGINE_LABEL: &str = "io.berth.engine";
/// Label with the docker container's id, on its pods.
pub const ENGINE_ID_LABEL: &str = "io.berth.engine.id";
/// The pod namespace of engine pods.
pub const POD_NAMESPACE: &str = "berth-engine";
/// Prefix of the keys of engine containers' rootfs snapshots.
const SNAPSHOT_PREFIX: &str = "eng-";
/// Longest wait between restarts of a container that keeps failing (docker's cap).
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A run at least this long resets the restart delay.
const RESET_RESTART_DELAY_AFTER: Duration = Duration::from_secs(10);

/// A docker container's state, as docker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, never started (or failed to start).
    #[default]
    Created,
    /// Its process runs.
    Running,
    /// Stopped, and waiting to be started again by its restart policy.
    Restarting,
    /// Stopped.
    Exited,
    /// Being removed.
    Removing,
}

impl Status {
    /// Docker's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Restarting => "restarting",
            Status::Exited => "exited",
            Status::Removing => "removing",
        }
    }
}

/// The state docker's inspect shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// The state.
    pub status: Status,
    /// The process's pid while it runs.
    pub pid: i32,
    /// The last exit code.
    pub exit_code: i32,
    /// Why the last start failed, if it did.
    pub error: String,
    /// The last start, ns since the epoch (0: never).
    pub started_at_ns: i64,
    /// The last exit, ns since the epoch (0: never).
    pub finished_at_ns: i64,
    /// The kernel's OOM killer ended the last run.
    pub oom_killed: bool,
}

/// A port published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// In the container.
    pub container_port: u16,
    /// `tcp`, `udp`, `sctp`.
    pub proto: String,
    /// Host address; empty for all.
    pub host_ip: String,
    /// On the host.
    pub host_port: u16,
}

/// The pod and CRI container of the current run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// The pod.
    pub sandbox_id: String,
    /// The CRI container.
    pub container_id: String,
    /// The pod's addresses, the primary first.
    pub ips: Vec<String>,
    /// The ports published for this run.
    pub ports: Vec<PublishedPort>,
    /// Its interface on each network, `eth0` first.
    #[serde(default)]
    pub attachments: Vec<networks::Attached>,
}

/// What the engine records of a docker container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// 64 hex digits.
    pub id: String,
    /// Its name, without docker's leading `/`.
    pub name: String,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
    /// The image as the request named it.
    pub image: String,
    /// The image's id (`sha256:…`).
    pub image_id: String,
    /// Its config (the image's defaults are applied when it runs, not stored here).
    pub config: Config,
    /// How the host runs it.
    pub host_config: HostConfig,
    /// Its state.
    pub state: RunState,
    /// Restarts by its restart policy.
    pub restart_count: u32,
    /// Stopped by a user (restart policies other than `always` leave it stopped).
    pub manual_stop: bool,
    /// The current run, while there is one.
    pub run: Option<Run>,
    /// The ports of the last run (kept after it for `inspect`, as docker shows none then).
    #[serde(default)]
    pub log_path: PathBuf,
    /// The networks it is connected to, its primary first (empty in records from before
    /// networks: see [`Engine::endpoints`]).
    #[serde(default)]
    pub networks: Vec<networks::Endpoint>,
}

impl Record {
    /// The rootfs snapshot key.
    pub fn snapshot_key(&self) -> String {
        format!("{SNAPSHOT_PREFIX}{}", self.id)
    }

    /// Whether its process runs.
    pub fn running(&self) -> bool {
        self.state.status == Status::Running
    }
}

/// What `create` gives back.
#[derive(Debug, Clone)]
pub struct Created {
    /// The new container's id.
    pub id: String,
    /// Things the client should know (docker prints them).
    pub warnings: Vec<String>,
}

/// What `start` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// It was started.
    Started,
    /// It already ran (docker answers 304).
    AlreadyRunning,
}

/// Which change `wait` waits for, as docker's `condition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// Until it is not running (at once if it is not).
    NotRunning,
    /// Until its next exit.
    NextExit,
    /// Until it is removed.
    Removed,
}

/// A wait's starting point (see [`Engine::wait_start`]).
pub struct WaitStart {
    id: String,
    condition: WaitCondition,
    changed: watch::Receiver<u64>,
    finished_at: i64,
    last_code: i32,
}

/// An attach waiting for its container to start.
struct PendingAttach {
    opts: StreamOpts,
    reply: oneshot::Sender<Result<AttachSession>>,
}

/// An attach: connected, or waiting for its container to start.
pub enum AttachHandle {
    /// Attached to the running container.
    Ready(AttachSession),
    /// Attached when the container starts.
    Pending(oneshot::Receiver<Result<AttachSession>>),
}

impl AttachHandle {
    /// The session, once there is one.
    pub async fn session(self) -> Result<AttachSession> {
        match self {
            AttachHandle::Ready(s) => Ok(s),
            AttachHandle::Pending(rx) => rx
                .await
                .map_err(|_| Error::FailedPrecondition("the container did not start".into()))?,
        }
    }
}

/// docker-style containers over the core's pods and containers.
pub struct Engine {
    db: Arc<Database>,
    root: PathBuf,
    images: Arc<ImageManager>,
    sandboxes: Arc<SandboxManager>,
    containers: Arc<ContainerManager>,
    snapshots: Arc<dyn Snapshotter>,
    locks: crate::locks::IdLocks,
    /// Bumped at every change of any record: waiters look again.
    changed: watch::Sender<u64>,
    pending: Mutex<HashMap<String, Vec<PendingAttach>>>,
    /// docker-style events.
    pub events: EngineEvents,
    /// The embedded DNS of user-defined networks.
    dns: Arc<crate::dns::DnsServer>,
    /// Network creation and removal take it exclusively, one at a time (names and subnets stay
    /// unique); a start or connect holds it shared from resolving its networks to their ADDs,
    /// so no network goes (conflist, bridge) under a container joining it.
    net_lock: tokio::sync::RwLock<()>,
    /// What the embedded DNS answers from, as of a value of `changed`.
    dns_index: std::sync::RwLock<Arc<networks::DnsIndex>>,
}

impl Engine {
    /// Opens the engine's records. `root` is berthd's persistent root (logs live under
    /// `<root>/containers/<id>/`).
    pub fn new(
        db: Arc<Database>,
        root: &Path,
        images: Arc<ImageManager>,
        sandboxes: Arc<SandboxManager>,
        containers: Arc<ContainerManager>,
        snapshots: Arc<dyn Snapshotter>,
    ) -> Result<Arc<Engine>> {
        let tx = db.begin_write()?;
        tx.open_table(RECORDS)?;
        tx.open_table(NAMES)?;
        tx.open_table(networks::NETWORKS)?;
        tx.commit()?;
        volumes::init(&db, root, &*snapshots)?;
        let engine = Arc::new(Engine {
            db,
            root: root.to_owned(),
            images,
            sandboxes,
            containers,
            snapshots,
            locks: crate::locks::IdLocks::default(),
            changed: watch::channel(0).0,
            pending: Mutex::default(),
            events: EngineEvents::default(),
            dns: crate::dns::DnsServer::new(),
            net_lock: tokio::sync::RwLock::new(()),
            dns_index: std::sync::RwLock::default(),
        });
        let names: Weak<dyn crate::dns::Names> =
            Arc::downgrade(&engine) as Weak<dyn crate::dns::Names>;
        engine.dns.set_names(names);
        Ok(engine)
    }

    /// The images the engine runs from.
    pub fn images(&self) -> &Arc<ImageManager> {
        &self.images
    }

    /// The shared metadata database (for the build cache).
    pub fn db(&self) -> &Arc<Database> {
        &self.db
    }

    /// The core's containers.
    pub fn containers(&self) -> &Arc<ContainerManager> {
        &self.containers
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(id)
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    fn all(&self) -> Result<Vec<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (id, v) = e?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                Error::Internal(format!("container record {} is corrupt: {e}", id.value()))
            })?);
        }
        Ok(out)
    }

    fn put(&self, r: &Record) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode container", e))?;
        let tx = self.db.begin_write()?;
        tx.open_table(RECORDS)?
            .insert(r.id.as_str(), json.as_slice())?;
        tx.commit()?;
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Every container.
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut all = self.all()?;
        all.sort_by_key(|r| std::cmp::Reverse(r.created_ns));
        Ok(all)
    }

    /// The container `name_or_id` names: a full id, a name (with or without `/`), or a unique
    /// id prefix, tried in that order as docker does.
    pub fn get(&self, name_or_id: &str) -> Result<Record> {
        let key = name_or_id.strip_prefix('/').unwrap_or(name_or_id);
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "container name or id is required".into(),
            ));
        }
        let tx = self.db.begin_read()?;
        let records = tx.open_table(RECORDS)?;
        let decode = |v: &[u8]| {
            serde_json::from_slice::<Record>(v)
                .map_err(|e| Error::Internal(format!("container record is corrupt: {e}")))
        };
        if let Some(v) = records.get(key)? {
            return decode(v.value());
        }
        if let Some(id) = tx.open_table(NAMES)?.get(key)?
            && let Some(v) = records.get(id.value())?
        {
            return decode(v.value());
        }
        let mut found = Vec::new();
        if key.bytes().all(|b| b.is_ascii_hexdigit()) {
            for e in records.range(key..)? {
                let (id, v) = e?;
                if !id.value().starts_with(key) {
                    break;
                }
                found.push(decode(v.value())?);
            }
        }
        match found.len() {
            0 => Err(Error::NotFound(format!("No such container: {name_or_id}"))),
            1 => Ok(found.remove(0)),
            _ => Err(Error::InvalidArgument(format!(
                "multiple containers match the id prefix {name_or_id:?}"
            ))),
        }
    }

    fn emit(&self, action: &str, r: &Record, extra: &[(&str, String)]) {
        let mut attributes: BTreeMap<String, String> =
            r.config.labels.clone().into_iter().collect();
        attributes.insert("name".into(), r.name.clone());
        attributes.insert("image".into(), r.image.clone());
        for (k, v) in extra {
            attributes.insert((*k).to_owned(), v.clone());
        }
        self.events.emit("container", action, &r.id, attributes);
    }

    /// Creates a container: checks the name and image, prepares its rootfs from the image, and
    /// records it, not started. NotFound (`No such image`) when the image is not here: the
    /// client pulls it and asks again.
    pub async fn create(
        &self,
        name: Option<&str>,
        config: Config,
        host_config: HostConfig,
    ) -> Result<Created> {
        self.create_with_networks(name, config, host_config, &BTreeMap::new())
            .await
    }

    /// [`create`](Self::create) with docker's `NetworkingConfig.EndpointsConfig`: network
    /// (name or id) → aliases on it.
    pub async fn create_with_networks(
        &self,
        name: Option<&str>,
        mut config: Config,
        host_config: HostConfig,
        endpoints: &BTreeMap<String, Vec<String>>,
    ) -> Result<Created> {
        let mut warnings = Vec::new();
        spec::check_restart_policy(&host_config.restart_policy).map_err(Error::InvalidArgument)?;
        if host_config.auto_remove && !matches!(host_config.restart_policy.name.as_str(), "" | "no")
        {
            return Err(Error::InvalidArgument(
                "can't create 'AutoRemove' container with restart policy".into(),
            ));
        }
        if config.image.is_empty() {
            return Err(Error::InvalidArgument("config needs an Image".into()));
        }
        for b in &host_config.binds {
            translate::parse_bind(b)?;
        }
        translate::wanted_ports(&config, &host_config)?;
        let networks = self.plan_endpoints(&host_config.network_mode, endpoints)?;
        let image = self
            .images
            .resolve(&config.image)?
            .ok_or_else(|| Error::NotFound(format!("No such image: {}", config.image)))?;
        if host_config.memory > 0 && host_config.memory < 6 * 1024 * 1024 {
            return Err(Error::InvalidArgument(
                "Minimum memory limit allowed is 6MB".into(),
            ));
        }
        let id = hex::encode(rand::random::<[u8; 32]>());
        let name = match name.map(|n| n.strip_prefix('/').unwrap_or(n)) {
            Some(n) if !n.is_empty() => {
                check_name(n)?;
                n.to_owned()
            }
            _ => self.generate_name()?,
        };
        if config.hostname.len() > 63 {
            warnings.push("hostname longer than 63 characters".into());
        }
        // The image's exposed ports count for -P, as docker's create merges them.
        let image_config = self.images.config_json(&image)?;
        if let Some(ports) = image_config["config"]["ExposedPorts"].as_object() {
            for p in ports.keys() {
                config.exposed_ports.entry(p.clone()).or_default();
            }
        }
        let top = image
            .record
            .chain_ids
            .last()
            .map(ToString::to_string)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("image {} has no layers", config.image))
            })?;
        let r = Record {
            id: id.clone(),
            name: name.clone(),
            created_ns: now_ns(),
            image: config.image.clone(),
            image_id: image.record.id.to_string(),
            log_path: self.container_dir(&id).join("container.log"),
            config,
            host_config,
            state: RunState::default(),
            restart_count: 0,
            manual_stop: false,
            run: None,
            networks,
        };
        // Volumes are made at create, as docker does: `volume ls` shows them from then on.
        let image_volumes = image_config["config"]["Volumes"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        // Name first (atomic with the record), then the volumes and the snapshot; a crash in
        // between leaves a record whose volumes and snapshot `start` makes on demand. The
        // volume lock is held from the record to its volumes, so a volume rm or prune never
        // takes a volume this container was just given.
        let volumes = {
            let _held = volumes::lock();
            self.reserve(&r)?;
            self.create_volumes_locked(&r, image_volumes)
        };
        if let Err(e) = volumes {
            self.forget(&r).await;
            self.remove_anonymous_volumes(&r);
            return Err(e);
        }
        let snapshots = self.snapshots.clone();
        let key = r.snapshot_key();
        let dir = self.container_dir(&id);
        let prepared = tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal("create container dir", e))?;
            snapshots.prepare(&key, Some(&top))?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("rootfs thread: {e}")))?;
        if let Err(e) = prepared {
            self.forget(&r).await;
            self.remove_anonymous_volumes(&r);
            return Err(e);
        }
        tracing::info!(container_id = %id, name = %name, image = %r.image, "container created");
        self.emit("create", &r, &[]);
        Ok(Created { id, warnings })
    }

    fn reserve(&self, r: &Record) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode container", e))?;
        let tx = self.db.begin_write()?;
        {
            let mut names = tx.open_table(NAMES)?;
            if let Some(other) = names.get(r.name.as_str())? {
                return Err(Error::AlreadyExists(format!(
                    "Conflict. The container name \"/{}\" is already in use by container \"{}\". You have to remove (or rename) that container to be able to reuse that name.",
                    r.name,
                    other.value()
                )));
            }
            names.insert(r.name.as_str(), r.id.as_str())?;
            tx.open_table(RECORDS)?
                .insert(r.id.as_str(), json.as_slice())?;
        }
        tx.commit()?;
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Deletes the record, its name, rootfs snapshot and files.
    async fn forget(&self, r: &Record) {
        let snapshots = self.snapshots.clone();
        let key = r.snapshot_key();
        let dir = self.container_dir(&r.id);
        let id = r.id.clone();
        let _ = tokio::task::spawn_blocking(move || {
            match snapshots.remove(&key) {
                Ok(()) | Err(snapshotter::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(container_id = %id, error = %e, "remove rootfs snapshot"),
            }
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(container_id = %id, error = %e, "remove container dir");
            }
        })
        .await;
        let deleted = (|| -> Result<()> {
            let tx = self.db.begin_write()?;
            {
                tx.open_table(RECORDS)?.remove(r.id.as_str())?;
                let mut names = tx.open_table(NAMES)?;
                let ours = names
                    .get(r.name.as_str())?
                    .is_some_and(|v| v.value() == r.id);
                if ours {
                    names.remove(r.name.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = deleted {
            tracing::error!(container_id = %r.id, error = %e, "delete container record");
        }
        self.changed.send_modify(|n| *n += 1);
        self.fail_pending(&r.id, "the container was removed");
    }

    fn generate_name(&self) -> Result<String> {
        const LEFT: [&str; 12] = [
            "brave", "calm", "eager", "fervent", "gallant", "happy", "keen", "lucid", "nimble",
            "quiet", "steady", "witty",
        ];
        const RIGHT: [&str; 12] = [
            "anchor", "beacon", "buoy", "cove", "harbor", "jetty", "keel", "mooring", "pier",
            "quay", "rudder", "wharf",
        ];
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        for _ in 0..64 {
            let [a, b, n]: [u8; 3] = rand::random();
            let name = format!(
                "{}_{}{}",
                LEFT[usize::from(a) % LEFT.len()],
                RIGHT[usize::from(b) % RIGHT.len()],
                n % 100
            );
            if names.get(name.as_str())?.is_none() {
                return Ok(name);
            }
        }
        Ok(format!("berth_{}", hex::encode(rand::random::<[u8; 6]>())))
    }

    /// Renames a container; AlreadyExists when the new name is taken.
    pub async fn rename(&self, name_or_id: &str, new_name: &str) -> Result<()> {
        let new_name = new_name.strip_prefix('/').unwrap_or(new_name);
        check_name(new_name)?;
        let r = self.get(name_or_id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let mut r = self.get(&r.id)?;
        if r.name == new_name {
            return Err(Error::InvalidArgument(
                "Renaming a container with the same name as its current name".into(),
            ));
        }
        let old = std::mem::replace(&mut r.name, new_name.to_owned());
        let json = serde_json::to_vec(&r).map_err(|e| Error::internal("encode container", e))?;
        let tx = self.db.begin_write()?;
        {
            let mut names = tx.open_table(NAMES)?;
            if let Some(other) = names.get(new_name)? {
                return Err(Error::AlreadyExists(format!(
                    "Error when allocating new name: Conflict. The container name \"/{new_name}\" is already in use by container \"{}\". You have to remove (or rename) that container to be able to reuse that name.",
                    other.value()
                )));
            }
            names.remove(old.as_str())?;
            names.insert(new_name, r.id.as_str())?;
            tx.open_table(RECORDS)?
                .insert(r.id.as_str(), json.as_slice())?;
        }
        tx.commit()?;
        self.changed.send_modify(|n| *n += 1);
        self.emit("rename", &r, &[("oldName", format!("/{old}"))]);
        Ok(())
    }

    /// Starts a container: a pod of its own, the CRI container on its kept rootfs, waiting
    /// attaches connected, then the process. On failure nothing of the run is left and the
    /// error is recorded in its state.
    pub async fn start(self: &Arc<Self>, name_or_id: &str) -> Result<Started> {
        let r = self.get(name_or_id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let mut r = self.get(&r.id)?;
        if r.running() {
            return Ok(Started::AlreadyRunning);
        }
        if r.state.status == Status::Removing {
            return Err(Error::FailedPrecondition(format!(
                "container {} is marked for removal and cannot be started",
                r.id
            )));
        }
        r.manual_stop = false;
        match self.start_locked(&mut r).await {
            Ok(()) => Ok(Started::Started),
            Err(e) => {
                let message = e.to_string();
                r.state.error = message.clone();
                // As docker: 127 when the command is not there, 126 when it cannot run.
                r.state.exit_code =
                    if message.contains("No such file") || message.contains("not found") {
                        127
                    } else if message.contains("ermission denied") {
                        126
                    } else {
                        128
                    };
                r.state.finished_at_ns = now_ns();
                if r.state.started_at_ns != 0 {
                    r.state.status = Status::Exited;
                }
                let _ = self.put(&r);
                self.fail_pending(&r.id, &message);
                // Worded as runc words it: docker clients pick their exit code (127, 126)
                // from these words.
                let e = match r.state.exit_code {
                    127 => Error::InvalidArgument(format!(
                        "failed to create task for container: exec: executable file not found in $PATH: {message}"
                    )),
                    126 => Error::InvalidArgument(format!(
                        "failed to create task for container: exec: permission denied: {message}"
                    )),
                    _ => e,
                };
                if r.host_config.auto_remove {
                    r.state.status = Status::Removing;
                    let _ = self.put(&r);
                    self.forget(&r).await;
                    self.remove_anonymous_volumes(&r);
                    self.emit("destroy", &r, &[]);
                }
                Err(e)
            }
        }
    }

    async fn start_locked(self: &Arc<Self>, r: &mut Record) -> Result<()> {
        let ports = self.pick_ports(r)?;
        // Filling a fresh volume copies the image's files: disk work, off the runtime.
        let mounts = {
            let engine = self.clone();
            let rec = r.clone();
            tokio::task::spawn_blocking(move || engine.resolve_mounts(&rec))
                .await
                .map_err(|e| Error::Internal(format!("volume thread: {e}")))??
        };
        let log_dir = self.container_dir(&r.id);
        // Held until the networks are attached: a network rm waits, then finds this container
        // on it.
        let _networks = self.net_lock.read().await;
        let joined = self.joined(r)?;
        let mut plan = translate::plan(r, &log_dir, &ports, mounts)?;
        self.apply_networks(r, &joined, &mut plan.pod);
        // The snapshot is made at create; a crash between record and snapshot, or a snapshot
        // lost with its storage, is made good here.
        let key = r.snapshot_key();
        let image = self
            .images
            .resolve(&r.image_id)?
            .ok_or_else(|| Error::NotFound(format!("No such image: {}", r.image)))?;
        let snapshots = self.snapshots.clone();
        let top = image.record.chain_ids.last().map(ToString::to_string);
        let dir = log_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal("create container dir", e))?;
            if snapshots.stat(&key).is_err() {
                snapshots.prepare(&key, top.as_deref())?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("rootfs thread: {e}")))??;

        let sandbox_id = self.sandboxes.run_engine(plan.pod.clone()).await?;
        let attachments = match self.attach_networks(&sandbox_id, &joined).await {
            Ok(a) => a,
            Err(e) => {
                if let Err(te) = self.containers.remove_sandbox(&sandbox_id).await {
                    tracing::warn!(container_id = %r.id, error = %te, "tear down a failed start");
                }
                return Err(e);
            }
        };
        let result = self
            .start_in_pod(r, &sandbox_id, plan, ports.clone(), attachments.clone())
            .await;
        if let Err(e) = result {
            self.detach_attachments(&sandbox_id, None, &attachments)
                .await;
            if let Err(te) = self.containers.remove_sandbox(&sandbox_id).await {
                tracing::warn!(container_id = %r.id, error = %te, "tear down a failed start");
            }
            r.run = None;
            return Err(e);
        }
        Ok(())
    }

    async fn start_in_pod(
        self: &Arc<Self>,
        r: &mut Record,
        sandbox_id: &str,
        plan: translate::Plan,
        ports: Vec<PublishedPort>,
        attachments: Vec<networks::Attached>,
    ) -> Result<()> {
        let sandbox = self.sandboxes.get(sandbox_id)?;
        self.write_hosts(r, sandbox_id, &sandbox.ips)?;
        let cri_id = self
            .containers
            .create_with(
                sandbox_id,
                plan.container,
                Some(plan.pod),
                Some(r.snapshot_key()),
            )
            .await?;
        r.run = Some(Run {
            sandbox_id: sandbox_id.to_owned(),
            container_id: cri_id.clone(),
            ips: sandbox.ips.clone(),
            ports,
            attachments,
        });
        // Recorded before the process runs: its exit always finds the run.
        self.put(r)?;
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&r.id)
            .unwrap_or_default();
        for p in pending {
            let session = self.containers.attach_early(&cri_id, p.opts).await;
            let _ = p.reply.send(session);
        }
        self.containers.start(&cri_id).await?;
        r.state = RunState {
            status: Status::Running,
            pid: self.containers.pid(&cri_id).await.unwrap_or(0),
            started_at_ns: now_ns(),
            ..RunState::default()
        };
        self.put(r)?;
        tracing::info!(container_id = %r.id, sandbox_id, "container started");
        self.emit("start", r, &[]);
        // It may have exited already, before the watcher knew its CRI id.
        let observed = self.containers.status(&cri_id).await?;
        if observed.state == cri::ContainerState::ContainerExited as i32 {
            let this = self.clone();
            let id = r.id.clone();
            tokio::spawn(async move { this.handle_exit(&id).await });
        }
        Ok(())
    }

    /// docker's /etc/hosts: localhost lines, the container's own address and name, and
    /// `--add-host` entries.
    fn write_hosts(&self, r: &Record, sandbox_id: &str, ips: &[String]) -> Result<()> {
        if r.host_config.network() == "host" {
            return Ok(());
        }
        let mut hosts = String::from(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        );
        for entry in &r.host_config.extra_hosts {
            let (name, ip) = entry
                .split_once(':')
                .or_else(|| entry.split_once('='))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("invalid extra host {entry:?}: want name:ip"))
                })?;
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(Error::InvalidArgument(format!(
                    "invalid IP address in add-host: {ip:?}"
                )));
            }
            hosts.push_str(&format!("{ip}\t{name}\n"));
        }
        let hostname = translate::hostname(r);
        for ip in ips {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        hosts.push_str(&self.link_hosts(r));
        let path = self.sandboxes.files_dir(sandbox_id).join("hosts");
        std::fs::write(&path, hosts).map_err(|e| Error::internal("write hosts", e))
    }

    /// Host ports for this run: the asked ones checked free, 0 replaced by a free one.
    fn pick_ports(&self, r: &Record) -> Result<Vec<PublishedPort>> {
        let mut ports = translate::wanted_ports(&r.config, &r.host_config)?;
        if matches!(r.host_config.network(), "host" | "none") {
            return Ok(Vec::new());
        }
        let taken: Vec<(u16, String)> = self
            .all()?
            .into_iter()
            .filter(|o| o.id != r.id)
            .filter_map(|o| o.run)
            .flat_map(|run| run.ports)
            .map(|p| (p.host_port, p.proto))
            .collect();
        for p in &mut ports {
            let ip = if p.host_ip.is_empty() {
                "0.0.0.0"
            } else {
                p.host_ip.as_str()
            };
            let ip: std::net::IpAddr = ip
                .parse()
                .map_err(|_| Error::InvalidArgument(format!("invalid host IP {:?}", p.host_ip)))?;
            if p.host_port == 0 {
                p.host_port = free_port(ip, &p.proto)?;
                continue;
            }
            let addr = std::net::SocketAddr::new(ip, p.host_port);
            let in_use = taken
                .iter()
                .any(|(port, proto)| *port == p.host_port && *proto == p.proto)
                || match p.proto.as_str() {
                    "udp" => std::net::UdpSocket::bind(addr).is_err(),
                    _ => std::net::TcpListener::bind(addr).is_err(),
                };
            if in_use {
                return Err(Error::FailedPrecondition(format!(
                    "driver failed programming external connectivity on endpoint {}: Bind for {addr} failed: port is already allocated",
                    r.name
                )));
            }
        }
        Ok(ports)
    }

    /// The container's binds and volumes as CRI mounts (see [`volumes`]).
    fn resolve_mounts(&self, r: &Record) -> Result<Vec<cri::Mount>> {
        self.volume_mounts(r)
    }

    /// Stops a running container: its stop signal, SIGKILL after `timeout` (its own
    /// `StopTimeout`, else 10 s). Returns false when it was not running (docker's 304).
    pub async fn stop(&self, name_or_id: &str, timeout: Option<Duration>) -> Result<bool> {
        let r = self.get(name_or_id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let mut r = self.get(&r.id)?;
        if r.state.status == Status::Restarting {
            r.manual_stop = true;
            r.state.status = Status::Exited;
            self.put(&r)?;
            return Ok(true);
        }
        let Some(run) = r.run.clone() else {
            return Ok(false);
        };
        r.manual_stop = true;
        self.put(&r)?;
        let timeout = timeout.unwrap_or_else(|| {
            Duration::from_secs(r.config.stop_timeout.map_or(10, |t| t.max(0) as u64))
        });
        self.emit("kill", &r, &[("signal", "15".into())]);
        self.containers.stop(&run.container_id, timeout).await?;
        self.finish_run(r).await?;
        Ok(true)
    }

    /// Sends a signal to a running container (docker's `kill`; SIGKILL by default).
    pub async fn kill(&self, name_or_id: &str, signal: &str) -> Result<()> {
        let r = self.get(name_or_id)?;
        let sig = if signal.is_empty() {
            libc::SIGKILL
        } else {
            crate::container::parse_signal(signal)
                .filter(|s| (1..=64).contains(s))
                .ok_or_else(|| Error::InvalidArgument(format!("Invalid signal: {signal}")))?
        };
        let Some(run) = r.run.clone().filter(|_| r.running()) else {
            return Err(Error::FailedPrecondition(format!(
                "Cannot kill container: {name_or_id}: container {} is not running",
                r.id
            )));
        };
        self.emit("kill", &r, &[("signal", sig.to_string())]);
        self.containers.signal(&run.container_id, sig).await
    }

    /// Removes a container: its record, name, rootfs and logs. A running one only with
    /// `force` (killed first); otherwise FailedPrecondition, as docker's 409.
    pub async fn remove(&self, name_or_id: &str, force: bool) -> Result<()> {
        let r = self.get(name_or_id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let mut r = self.get(&r.id)?;
        if r.running() && !force {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove container \"/{}\": container is running: stop the container before removing or force remove",
                r.name
            )));
        }
        r.manual_stop = true;
        if let Some(run) = r.run.clone() {
            self.containers
                .stop(&run.container_id, Duration::ZERO)
                .await?;
            r = self.finish_run(r).await?;
        }
        r.state.status = Status::Removing;
        self.put(&r)?;
        self.forget(&r).await;
        tracing::info!(container_id = %r.id, "container removed");
        self.emit("destroy", &r, &[]);
        Ok(())
    }

    /// Records the end of the current run and tears its pod down. Returns the updated record.
    /// Applies no restart policy: callers decide.
    async fn finish_run(&self, mut r: Record) -> Result<Record> {
        let Some(run) = r.run.clone() else {
            return Ok(r);
        };
        let status = self.containers.status(&run.container_id).await;
        let (code, finished, oom) = match &status {
            Ok(s) if s.state == cri::ContainerState::ContainerExited as i32 => {
                (s.exit_code, s.finished_at, s.reason == "OOMKilled")
            }
            Ok(_) => return Err(Error::Internal(format!("container {} still runs", r.id))),
            // The CRI container is gone (a crash during a previous teardown): lost.
            Err(_) => (255, now_ns(), false),
        };
        self.detach_run(&run).await;
        if let Err(e) = self.containers.remove_sandbox(&run.sandbox_id).await {
            tracing::warn!(container_id = %r.id, error = %e, "tear down the container's pod");
        }
        r.run = None;
        r.state.status = Status::Exited;
        r.state.pid = 0;
        r.state.exit_code = code;
        r.state.finished_at_ns = finished;
        r.state.oom_killed = oom;
        self.put(&r)?;
        tracing::info!(container_id = %r.id, exit_code = code, "container exited");
        self.emit("die", &r, &[("exitCode", code.to_string())]);
        Ok(r)
    }

    /// The container's process ended on its own (or was killed): the run is torn down, then
    /// its restart policy or AutoRemove applies.
    async fn handle_exit(self: &Arc<Self>, id: &str) {
        let lock = self.lock(id);
        let held = lock.lock().await;
        let Ok(r) = self.get(id) else { return };
        let Some(run) = r.run.clone() else { return };
        match self.containers.status(&run.container_id).await {
            Ok(s) if s.state != cri::ContainerState::ContainerExited as i32 => return,
            _ => {}
        }
        let ran_for =
            Duration::from_nanos(u64::try_from(now_ns() - r.state.started_at_ns).unwrap_or(0));
        let r = match self.finish_run(r).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(container_id = %id, error = %e, "record a container's exit");
                return;
            }
        };
        if self.should_restart(&r) {
            let mut r = r;
            r.state.status = Status::Restarting;
            r.restart_count += 1;
            if self.put(&r).is_err() {
                return;
            }
            let delay = restart_delay(r.restart_count, ran_for);
            drop(held);
            self.schedule_start(&r.id, delay);
        } else if r.host_config.auto_remove {
            drop(held);
            // As docker's `--rm`: its anonymous volumes go with it.
            if let Err(e) = self.remove_with_volumes(id, true, true).await {
                tracing::warn!(container_id = %id, error = %e, "auto-remove");
            }
        }
    }

    fn should_restart(&self, r: &Record) -> bool {
        let p = &r.host_config.restart_policy;
        match p.name.as_str() {
            "always" => !r.manual_stop,
            "unless-stopped" => !r.manual_stop,
            "on-failure" => {
                !r.manual_stop
                    && r.state.exit_code != 0
                    && (p.maximum_retry_count == 0
                        || i64::from(r.restart_count) < p.maximum_retry_count)
            }
            _ => false,
        }
    }

    fn schedule_start(self: &Arc<Self>, id: &str, delay: Duration) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(engine) = weak.upgrade() else { return };
            // Stopped or removed meanwhile: nothing to do.
            let Ok(r) = engine.get(&id) else { return };
            if r.state.status != Status::Restarting {
                return;
            }
            if let Err(e) = engine.restart_by_policy(&id).await {
                tracing::warn!(container_id = %id, error = %e, "restart by policy");
            }
        });
    }

    async fn restart_by_policy(self: &Arc<Self>, id: &str) -> Result<()> {
        let lock = self.lock(id);
        let _held = lock.lock().await;
        let mut r = self.get(id)?;
        if r.state.status != Status::Restarting && !r.state.status.eq(&Status::Exited) {
            return Ok(());
        }
        if let Err(e) = self.start_locked(&mut r).await {
            r.state.status = Status::Exited;
            r.state.error = e.to_string();
            self.put(&r)?;
            return Err(e);
        }
        self.emit("restart", &r, &[]);
        Ok(())
    }

    /// Restarts a container: stop (if running), then start.
    pub async fn restart(
        self: &Arc<Self>,
        name_or_id: &str,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.stop(name_or_id, timeout).await?;
        self.start(name_or_id).await.map(drop)
    }

    /// Waits for `condition` and returns the exit code then.
    pub async fn wait(&self, name_or_id: &str, condition: WaitCondition) -> Result<i32> {
        let start = self.wait_start(name_or_id, condition)?;
        self.wait_from(start).await
    }

    /// Where a wait for `condition` starts from, taken now: a change after this call counts
    /// even if [`wait_from`](Self::wait_from) runs later (the Docker API sends its headers,
    /// and the client starts the container, before the waiting task gets to run). NotFound
    /// when there is no such container now.
    pub fn wait_start(&self, name_or_id: &str, condition: WaitCondition) -> Result<WaitStart> {
        // Subscribed first, so no change between the look and the wait goes unseen.
        let changed = self.changed.subscribe();
        let r = self.get(name_or_id)?;
        Ok(WaitStart {
            id: r.id.clone(),
            condition,
            changed,
            finished_at: r.state.finished_at_ns,
            last_code: r.state.exit_code,
        })
    }

    /// Waits from `start` until its condition holds and returns the exit code then.
    pub async fn wait_from(&self, start: WaitStart) -> Result<i32> {
        let WaitStart {
            id,
            condition,
            mut changed,
            finished_at,
            mut last_code,
        } = start;
        loop {
            let current = match self.get(&id) {
                Ok(r) => Some(r),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            match (condition, &current) {
                (WaitCondition::Removed, None) => return Ok(last_code),
                (_, None) => return Ok(last_code),
                (WaitCondition::NotRunning, Some(r))
                    if !matches!(r.state.status, Status::Running | Status::Restarting) =>
                {
                    return Ok(r.state.exit_code);
                }
                (WaitCondition::NextExit, Some(r)) if r.state.finished_at_ns != finished_at => {
                    return Ok(r.state.exit_code);
                }
                _ => {}
            }
            if let Some(r) = &current {
                last_code = r.state.exit_code;
            }
            if changed.changed().await.is_err() {
                return Err(Error::Unavailable("berthd is shutting down".into()));
            }
        }
    }

    /// Attaches to a container's stdio. A container that does not run yet gets the attach
    /// when it starts (docker clients attach, then start), so nothing it writes is missed: the
    /// handle is registered when this returns.
    pub async fn attach(&self, name_or_id: &str, opts: StreamOpts) -> Result<AttachHandle> {
        let r = self.get(name_or_id)?;
        if opts.tty != r.config.tty {
            return Err(Error::InvalidArgument(format!(
                "attach asks for tty={} but the container has tty={}",
                opts.tty, r.config.tty
            )));
        }
        if let Some(run) = r.run.clone().filter(|_| r.running()) {
            return Ok(AttachHandle::Ready(
                self.containers.attach(&run.container_id, opts).await?,
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(r.id.clone())
            .or_default()
            .push(PendingAttach { opts, reply: tx });
        Ok(AttachHandle::Pending(rx))
    }

    fn fail_pending(&self, id: &str, why: &str) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default();
        for p in pending {
            let _ = p.reply.send(Err(Error::FailedPrecondition(why.to_owned())));
        }
    }

    /// Resizes the terminal of a running container.
    pub async fn resize(&self, name_or_id: &str, width: u16, height: u16) -> Result<()> {
        let r = self.get(name_or_id)?;
        let Some(run) = r.run.clone().filter(|_| r.running()) else {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                r.id
            )));
        };
        self.containers
            .resize_tty(&run.container_id, width, height)
            .await
    }

    /// Whether the container `id` runs now (for log followers).
    pub fn is_running(&self, id: &str) -> bool {
        self.get(id)
            .is_ok_and(|r| matches!(r.state.status, Status::Running | Status::Restarting))
    }

    /// Watches the core's container exits for the engine's containers, and brings every
    /// record in line with what happened while berthd was away (restart policies apply).
    pub fn watch(self: &Arc<Self>) -> Result<()> {
        let mut sub = self.containers.events().subscribe();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let next = sub.next().await;
                let Some(engine) = weak.upgrade() else { return };
                match next {
                    Ok(Some(ev)) if ev.kind == EventKind::Stopped => {
                        let owner = engine
                            .all()
                            .ok()
                            .and_then(|all| {
                                all.into_iter().find(|r| {
                                    r.run.as_ref().is_some_and(|run| run.container_id == ev.id)
                                })
                            })
                            .map(|r| r.id);
                        if let Some(id) = owner {
                            let e = engine.clone();
                            tokio::spawn(async move { e.handle_exit(&id).await });
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(_) => {
                        // Fell behind: look at every running container.
                        sub = engine.containers.events().subscribe();
                        engine.reconcile().await;
                    }
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move { this.reconcile().await });
        Ok(())
    }

    /// After a restart of berthd (or lost events): runs that ended are finished (their
    /// policies apply), containers restarting are started, `always` and `unless-stopped`
    /// containers that do not run are started, and pods of the engine no record owns are
    /// removed.
    async fn reconcile(self: &Arc<Self>) {
        let Ok(all) = self.all() else { return };
        let owned: Vec<String> = all
            .iter()
            .filter_map(|r| r.run.as_ref().map(|run| run.sandbox_id.clone()))
            .collect();
        if let Ok(pods) = self.sandboxes.list() {
            for p in pods {
                if p.config.labels.contains_key(ENGINE_LABEL) && !owned.contains(&p.id) {
                    tracing::info!(sandbox_id = %p.id, "removing an engine pod no container owns");
                    // Its record is gone with the list of its networks: the cache knows them.
                    self.sandboxes
                        .network()
                        .detach_others(&p.id, p.ns_path("net"))
                        .await;
                    let _ = self.containers.remove_sandbox(&p.id).await;
                }
            }
        }
        for r in all {
            if let Some(run) = &r.run {
                let running = self
                    .containers
                    .status(&run.container_id)
                    .await
                    .is_ok_and(|s| s.state == cri::ContainerState::ContainerRunning as i32);
                if !running {
                    self.handle_exit(&r.id).await;
                }
                continue;
            }
            let policy = r.host_config.restart_policy.name.as_str();
            let wanted = r.state.status == Status::Restarting
                || (r.state.status == Status::Exited
                    && (policy == "always" || (policy == "unless-stopped" && !r.manual_stop))
                    && r.state.started_at_ns > 0);
            if wanted {
                let mut r = r;
                r.state.status = Status::Restarting;
                // An `always` container stopped by hand comes back with the daemon, as docker's
                // does, and from then on it is running as if started: its next exit restarts it.
                r.manual_stop = false;
                if self.put(&r).is_ok() {
                    self.schedule_start(&r.id, Duration::ZERO);
                }
            }
        }
    }
}

/// Docker's back-off: 100 ms doubling per restart, at most a minute; reset after a run of
/// 10 s or more.
fn restart_delay(restarts: u32, ran_for: Duration) -> Duration {
    if ran_for >= RESET_RESTART_DELAY_AFTER {
        return Duration::from_millis(100);
    }
    let exp = restarts.saturating_sub(1).min(10);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_RESTART_DELAY)
}

/// docker's name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn check_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

fn free_port(ip: std::net::IpAddr, proto: &str) -> Result<u16> {
    let addr = std::net::SocketAddr::new(ip, 0);
    let port = match proto {
        "udp" => std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr()),
        _ => std::net::TcpListener::bind(addr).and_then(|s| s.local_addr()),
    }
    .map_err(|e| Error::internal("pick a free host port", e))?
    .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rule() {
        for ok in ["web", "a1", "my_app.v2-1"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "-x", "_x", "a b", "a/b", "ü1"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restart_delays_double_and_reset() {
        assert_eq!(restart_delay(1, Duration::ZERO), Duration::from_millis(100));
        assert_eq!(restart_delay(3, Duration::ZERO), Duration::from_millis(400));
        assert_eq!(restart_delay(30, Duration::ZERO), MAX_RESTART_DELAY);
        assert_eq!(
            restart_delay(30, Duration::from_secs(11)),
            Duration::from_millis(100)
        );
    }
}
