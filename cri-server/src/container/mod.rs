//! Containers: each one an active snapshot mounted as its rootfs, an OCI bundle, and a
//! `berth-shim` process that owns its life. berthd holds records; the shim holds the truth of a
//! live container (and its exit record once it stops).
//!
//! Crash safety: a container is recorded as `Creating` before anything is made for it; at start,
//! `Creating` records are rolled back (shim killed, rootfs unmounted, snapshot and bundle
//! removed). Created ones are reattached through their shim's socket or exit record.

pub mod cgroup_stats;
pub mod exec;
mod exits;
pub mod hugetlb;
mod pod_stats;
pub mod resources;
pub mod shim_client;
mod stats;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::cri;
use api::shim::{ExitStatus, Request, Response, Status};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use snapshotter::Snapshotter;

use self::shim_client::{ShimClient, ShimLaunch};
use crate::error::{Error, Result};
use crate::events::{EventBus, EventKind};
use crate::image::ImageManager;
use crate::sandbox::{SandboxManager, SandboxRecord, State as SandboxState, now_ns};
use crate::spec::{self, HostInfo, SandboxFiles, SandboxNamespaces, SpecInput};

/// container id → JSON [`ContainerRecord`].
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
/// `name_attempt_<sandbox id>` → container id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("container_names");
/// Prefix of container rootfs snapshot keys.
const SNAPSHOT_PREFIX: &str = "ctr-";
/// Exit code berth reports when a container's shim vanished without recording an exit.
const LOST_EXIT_CODE: i32 = 255;

/// Lifecycle of a container record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Being set up; invisible to clients.
    Creating,
    /// Its shim exists; the live state comes from the shim.
    Created,
}

/// What berthd records of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex digits.
    pub id: String,
    /// Its pod.
    pub sandbox_id: String,
    /// The config kubelet gave.
    pub config: cri::ContainerConfig,
    /// Image id (config digest).
    pub image_id: String,
    /// The image as the request named it.
    pub image_name: String,
    /// Creation time.
    pub created_at_ns: i64,
    /// CRI log file.
    pub log_path: PathBuf,
    /// Lifecycle phase of the record.
    pub phase: Phase,
    /// Start time once started (learned from the shim).
    pub started_at_ns: Option<i64>,
    /// Exit, once known (from the shim or its exit record).
    pub exit: Option<ExitStatus>,
    /// Why the container ended, when berth decided it (e.g. its shim died).
    pub reason: Option<String>,
    /// A rootfs snapshot the caller owns (the engine's docker-style containers keep theirs
    /// across runs): mounted, never created nor removed here. `None`: the container's own.
    #[serde(default)]
    pub rootfs_snapshot: Option<String>,
}

impl ContainerRecord {
    /// The key of the snapshot its rootfs is mounted from.
    pub fn snapshot_key(&self) -> String {
        self.rootfs_snapshot
            .clone()
            .unwrap_or_else(|| format!("{SNAPSHOT_PREFIX}{}", self.id))
    }
}

/// The live view of a container.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The record.
    pub record: ContainerRecord,
    /// CRI state.
    pub state: cri::ContainerState,
}

fn name_key(c: &cri::ContainerConfig, sandbox_id: &str) -> String {
    let m = c.metadata.clone().unwrap_or_default();
    format!("{}_{}_{sandbox_id}", m.name, m.attempt)
}

/// Containers, their shims and their root filesystems.
pub struct ContainerManager {
    db: Arc<Database>,
    state_dir: PathBuf,
    shim_binary: PathBuf,
    images: Arc<ImageManager>,
    sandboxes: Arc<SandboxManager>,
    snapshots: Arc<dyn Snapshotter>,
    host: HostInfo,
    locks: crate::locks::IdLocks,
    events: EventBus,
    /// Held while an exit is recorded and its stopped event sent (see `exits.rs`).
    exit_lock: Mutex<()>,
    /// The previous CPU sample of each container and pod, for usage rates.
    cpu_samples: stats::CpuSamples,
}

impl ContainerManager {
    /// Opens the records and rolls back containers a crash left half-created.
    pub fn new(
        db: Arc<Database>,
        state_dir: &Path,
        shim_binary: PathBuf,
        images: Arc<ImageManager>,
        sandboxes: Arc<SandboxManager>,
        snapshots: Arc<dyn Snapshotter>,
        events: EventBus,
    ) -> Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(CONTAINERS)?;
        tx.open_table(NAMES)?;
        tx.commit()?;
        let m = ContainerManager {
            db,
            state_dir: state_dir.to_owned(),
            shim_binary,
            images,
            sandboxes,
            snapshots,
            host: HostInfo::probe(),
            locks: crate::locks::IdLocks::default(),
            events,
            exit_lock: Mutex::default(),
            cpu_samples: Default::default(),
        };
        for r in m.all()? {
            if r.phase == Phase::Creating {
                tracing::info!(container_id = %r.id, "rolling back a container a crash left half-created");
                m.teardown_sync(&r);
                m.delete_record(&r)?;
            }
        }
        Ok(m)
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(id)
    }

    /// The container's cgroup (`<pod parent>/<id>`); the default parent when the pod is gone.
    fn cgroup_of(&self, r: &ContainerRecord) -> String {
        let parent = match self.sandboxes.get(&r.sandbox_id) {
            Ok(s) => pod_cgroup_parent(&s),
            Err(_) => default_cgroup_parent(&r.sandbox_id),
        };
        format!("{parent}/{}", r.id)
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.state_dir.join("containers").join(id)
    }

    fn all(&self) -> Result<Vec<ContainerRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CONTAINERS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (id, v) = e?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                Error::Internal(format!("container record {} is corrupt: {e}", id.value()))
            })?);
        }
        Ok(out)
    }

    fn put(&self, r: &ContainerRecord) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode container", e))?;
        let tx = self.db.begin_write()?;
        tx.open_table(CONTAINERS)?
            .insert(r.id.as_str(), json.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn reserve(&self, r: &ContainerRecord) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode container", e))?;
        let key = name_key(&r.config, &r.sandbox_id);
        let tx = self.db.begin_write()?;
        {
            let mut names = tx.open_table(NAMES)?;
            if let Some(other) = names.get(key.as_str())? {
                return Err(Error::AlreadyExists(format!(
                    "container name {key:?} is reserved for {}",
                    other.value()
                )));
            }
            names.insert(key.as_str(), r.id.as_str())?;
            tx.open_table(CONTAINERS)?
                .insert(r.id.as_str(), json.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_record(&self, r: &ContainerRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(CONTAINERS)?.remove(r.id.as_str())?;
            let mut names = tx.open_table(NAMES)?;
            let key = name_key(&r.config, &r.sandbox_id);
            let ours = names.get(key.as_str())?.is_some_and(|v| v.value() == r.id);
            if ours {
                names.remove(key.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The container `id` names (full id or unique prefix); Creating ones are invisible.
    pub fn get(&self, id: &str) -> Result<ContainerRecord> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("container id is required".into()));
        }
        let mut found: Vec<ContainerRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.phase != Phase::Creating && r.id.starts_with(id))
            .collect();
        match found.len() {
            0 => Err(Error::NotFound(format!("container {id:?} not found"))),
            1 => Ok(found.remove(0)),
            _ => Err(Error::InvalidArgument(format!(
                "container id prefix {id:?} is ambiguous"
            ))),
        }
    }

    /// Creates a container in a ready pod: rootfs snapshot mounted, OCI spec written, shim
    /// started with the container created but not running. Rolled back fully on failure.
    pub async fn create(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox_config: Option<cri::PodSandboxConfig>,
    ) -> Result<String> {
        self.create_with(sandbox_id, config, sandbox_config, None)
            .await
    }

    /// [`create`](Self::create) on the existing snapshot `rootfs_snapshot` when given: the
    /// caller prepared it from the image and keeps it after the container is removed.
    pub async fn create_with(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox_config: Option<cri::PodSandboxConfig>,
        rootfs_snapshot: Option<String>,
    ) -> Result<String> {
        let meta = config
            .metadata
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("container config needs metadata".into()))?;
        if meta.name.is_empty() {
            return Err(Error::InvalidArgument(
                "container metadata needs a name".into(),
            ));
        }
        let sandbox = self.sandboxes.get(sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready: cannot create containers in it",
                sandbox.id
            )));
        }
        self.sandboxes.check_pid_namespace(&sandbox)?;
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Error::InvalidArgument("container config needs an image".into()))?;
        let image = self.images.resolve(&image_name)?.ok_or_else(|| {
            Error::NotFound(format!("image {image_name:?} not found: pull it first"))
        })?;
        let image_config = self.images.config_json(&image)?;
        let top = image
            .record
            .chain_ids
            .last()
            .ok_or_else(|| Error::FailedPrecondition(format!("image {image_name} has no layers")))?
            .to_string();

        let id = hex::encode(rand::random::<[u8; 32]>());
        let log_dir = sandbox_config
            .as_ref()
            .map(|c| c.log_directory.clone())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| sandbox.config.log_directory.clone());
        let log_path = if log_dir.is_empty() || config.log_path.is_empty() {
            self.bundle(&id).join("container.log")
        } else {
            Path::new(&log_dir).join(&config.log_path)
        };
        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            config,
            image_id: image.record.id.to_string(),
            image_name,
            created_at_ns: now_ns(),
            log_path,
            phase: Phase::Creating,
            started_at_ns: None,
            exit: None,
            reason: None,
            rootfs_snapshot,
        };
        self.reserve(&record)?;
        let lock = self.lock(&id);
        let _held = lock.lock().await;
        match self.build(&record, &sandbox, &top, &image_config).await {
            Ok(()) => {
                let record = ContainerRecord {
                    phase: Phase::Created,
                    ..record
                };
                if let Err(e) = self.put(&record) {
                    self.teardown(&record).await;
                    let _ = self.delete_record(&record);
                    return Err(e);
                }
                tracing::info!(container_id = %id, sandbox_id = %sandbox.id, "container created");
                self.emit(EventKind::Created, &id, &sandbox.id).await;
                Ok(id)
            }
            Err(e) => {
                self.teardown(&record).await;
                self.delete_record(&record)?;
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        r: &ContainerRecord,
        sandbox: &SandboxRecord,
        top_layer: &str,
        image_config: &serde_json::Value,
    ) -> Result<()> {
        let bundle = self.bundle(&r.id);
        let rootfs = bundle.join("rootfs");
        let snapshots = self.snapshots.clone();
        let owned = r.rootfs_snapshot.clone();
        let key = format!("{SNAPSHOT_PREFIX}{}", r.id);
        let top = top_layer.to_owned();
        let (b, rf) = (bundle.clone(), rootfs.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::create_dir_all(&rf).map_err(|e| Error::internal("create bundle", e))?;
            let mounts = match &owned {
                Some(k) => snapshots.mounts(k)?,
                None => snapshots.prepare(&key, Some(&top))?,
            };
            mount_all(&mounts, &rf)?;
            let _ = b;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("rootfs thread: {e}")))??;

        // The image's files: a symlink in it must not make berthd read one of the host's.
        let (passwd, group) = stream::read_users(rootfs.clone()).await?;
        let files = self.sandboxes.files_dir(&sandbox.id);
        let (hostname, hosts, resolv) = (
            files.join("hostname"),
            files.join("hosts"),
            files.join("resolv.conf"),
        );
        let cgroup_parent = pod_cgroup_parent(sandbox);
        let input = SpecInput {
            container_id: &r.id,
            sandbox_id: &sandbox.id,
            image_name: &r.image_name,
            image_config,
            rootfs: &rootfs,
            image_passwd: passwd.as_deref(),
            image_group: group.as_deref(),
            config: &r.config,
            sandbox: &sandbox.config,
            namespaces: SandboxNamespaces {
                network: sandbox.ns_path("net"),
                ipc: sandbox.ns_path("ipc"),
                uts: sandbox.ns_path("uts"),
                pid: sandbox.ns_path(crate::sandbox::pod_init::PIN),
                target_pid: None,
            },
            cgroup_parent: &cgroup_parent,
            host: &self.host,
            sandbox_files: SandboxFiles {
                hostname: Some(&hostname),
                hosts: Some(&hosts),
                resolv_conf: Some(&resolv),
                shm: None,
            },
        };
        let (mut oci, clamped) = spec::generate(&input)?;
        // Binds of the container's own cgroups (cgroup v1, joined PID namespace: see `spec`).
        for dir in spec::cgroup_v1_bind_sources(&input)? {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(&format!("create cgroup {}", dir.display()), e))?;
        }
        for c in clamped {
            tracing::warn!(container_id = %r.id, clamped = %c, "not granted on this host");
        }
        // The shim runs in the bundle dir: a relative root keeps config.json portable.
        if let Some(root) = oci.root_mut() {
            root.set_path(PathBuf::from("rootfs"));
        }
        oci.save(bundle.join("config.json"))
            .map_err(|e| Error::Internal(format!("write config.json: {e}")))?;
        if let Some(dir) = r.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::internal("create log dir", e))?;
        }
        let created = shim_client::launch(&ShimLaunch {
            binary: self.shim_binary.clone(),
            id: r.id.clone(),
            bundle,
            log: r.log_path.clone(),
            stdin: r.config.stdin,
            tty: r.config.tty,
        })
        .await?;
        // Created, not started: the init joins its hugetlb cgroup before the user process runs.
        let hugepages = r.config.linux.as_ref().and_then(|l| l.resources.as_ref());
        let limits = hugetlb::hybrid_limits(
            &self.host,
            hugepages.map_or(&[][..], |r| &r.hugepage_limits),
        );
        if let (Some(root), false) = (self.host.hugetlb_hybrid.clone(), limits.is_empty()) {
            let cgroup = format!("{cgroup_parent}/{}", r.id);
            let pid = created.pid;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let dir = hugetlb::apply(&root, &cgroup, &limits)?;
                hugetlb::join(&dir, pid).map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "move init {pid} into {}: {e}",
                        dir.display()
                    ))
                })
            })
            .await
            .map_err(|e| Error::Internal(format!("hugetlb cgroup thread: {e}")))??;
        }
        Ok(())
    }

    /// Undoes everything a container holds: its shim (killed), rootfs mount, snapshot and
    /// bundle. Safe to call twice; logs what it could not undo.
    async fn teardown(&self, r: &ContainerRecord) {
        let client = ShimClient::new(&self.bundle(&r.id));
        if client
            .call(&Request::State, Some(Duration::from_secs(2)))
            .await
            .is_ok()
        {
            let _ = client
                .call(
                    &Request::Kill {
                        signal: libc::SIGKILL,
                        all: true,
                    },
                    Some(Duration::from_secs(5)),
                )
                .await;
            let _ = client
                .call(&Request::Wait, Some(Duration::from_secs(10)))
                .await;
            let _ = client
                .call(&Request::Shutdown, Some(Duration::from_secs(10)))
                .await;
        }
        // Whatever the shim could not clean up (it died, or never answered): kill what is left
        // in the container's cgroup and remove it.
        let cgroup = self.cgroup_of(r);
        let this_bundle = self.bundle(&r.id);
        let snapshots = self.snapshots.clone();
        let id = r.id.clone();
        let owned = r.rootfs_snapshot.is_some();
        let _ = tokio::task::spawn_blocking(move || {
            kill_cgroup(&cgroup);
            remove_cgroup_dirs(&cgroup);
            release_storage(&this_bundle, snapshots.as_ref(), &id, owned)
        })
        .await;
    }

    /// Teardown for startup, before any runtime tasks: kills a shim by its pid file (its
    /// helper child, if it was still creating the container, dies with it), then whatever the
    /// shim had already started in the container's cgroup.
    fn teardown_sync(&self, r: &ContainerRecord) {
        let bundle = self.bundle(&r.id);
        if let Some(pid) = shim_pid(&bundle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let cgroup = self.cgroup_of(r);
        kill_cgroup(&cgroup);
        remove_cgroup_dirs(&cgroup);
        release_storage(
            &bundle,
            self.snapshots.as_ref(),
            &r.id,
            r.rootfs_snapshot.is_some(),
        );
    }

    /// Starts a created container, and watches for its exit.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<()> {
        let r = self.get(id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let sandbox = self.sandboxes.get(&r.sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let client = ShimClient::new(&self.bundle(&r.id));
        client
            .call(&Request::Start, Some(Duration::from_secs(30)))
            .await?;
        tracing::info!(container_id = %r.id, "container started");
        self.emit(EventKind::Started, &r.id, &r.sandbox_id).await;
        // Only now: the waiter's stopped event must come after the started one.
        self.spawn_exit_waiter(&r.id);
        Ok(())
    }

    /// Stops a container: its stop signal (the image's STOPSIGNAL or SIGTERM), then SIGKILL
    /// after `timeout`. Stopping a stopped container succeeds.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        let r = self.get(id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        self.stop_locked(&r, timeout).await
    }

    async fn stop_locked(&self, r: &ContainerRecord, timeout: Duration) -> Result<()> {
        let observed = self.observe(r.clone()).await;
        if observed.state != cri::ContainerState::ContainerRunning {
            if observed.state == cri::ContainerState::ContainerExited {
                self.finish(&observed.record).await;
            }
            return Ok(());
        }
        let client = ShimClient::new(&self.bundle(&r.id));
        if !timeout.is_zero() {
            let signal = self.stop_signal(r);
            client
                .call(
                    &Request::Kill { signal, all: false },
                    Some(Duration::from_secs(5)),
                )
                .await?;
            if let Ok(waited) = client.call(&Request::Wait, Some(timeout)).await {
                self.finish_waited(r, waited).await;
                return Ok(());
            }
            tracing::info!(container_id = %r.id, "stop signal timed out: killing");
        }
        client
            .call(
                &Request::Kill {
                    signal: libc::SIGKILL,
                    all: true,
                },
                Some(Duration::from_secs(5)),
            )
            .await?;
        let waited = client
            .call(&Request::Wait, Some(Duration::from_secs(30)))
            .await?;
        self.finish_waited(r, waited).await;
        Ok(())
    }

    fn stop_signal(&self, r: &ContainerRecord) -> i32 {
        let from_image = self
            .images
            .resolve(&r.image_id)
            .ok()
            .flatten()
            .and_then(|i| self.images.config_json(&i).ok())
            .and_then(|c| c["config"]["StopSignal"].as_str().map(str::to_owned));
        from_image
            .and_then(|s| parse_signal(&s))
            .unwrap_or(libc::SIGTERM)
    }

    /// Removes a container, killing it if it still runs. Removing an unknown container succeeds.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let r = match self.get(id) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let Ok(r) = self.get(&r.id) else {
            return Ok(());
        };
        // A removed container that ran has stopped first, and says so before it is deleted.
        self.stop_before_remove(&r).await;
        self.teardown(&r).await;
        self.delete_record(&r)?;
        tracing::info!(container_id = %r.id, "container removed");
        self.forget(&r.id);
        self.emit(EventKind::Deleted, &r.id, &r.sandbox_id).await;
        Ok(())
    }

    /// The live state of a container: asks its shim; without a shim, its exit record; without
    /// either, exited with [`LOST_EXIT_CODE`]. An exit learned that way is recorded.
    pub async fn observe(&self, r: ContainerRecord) -> Observed {
        let (observed, learned_exit) = self.probe(r).await;
        if learned_exit {
            // Remember it: the answer must not change if the bundle goes away later.
            self.finish(&observed.record).await;
        }
        observed
    }

    /// [`observe`](Self::observe) without recording anything; also says whether the container
    /// turned out to have exited without its record knowing (its shim is gone).
    async fn probe(&self, mut r: ContainerRecord) -> (Observed, bool) {
        let mut learned_exit = false;
        let client = ShimClient::new(&self.bundle(&r.id));
        let state = match client
            .call(&Request::State, Some(Duration::from_secs(5)))
            .await
        {
            Ok(Response::State {
                status,
                started_at_ns,
                exit,
                ..
            }) => {
                r.started_at_ns = started_at_ns.or(r.started_at_ns);
                r.exit = exit.or(r.exit);
                match status {
                    Status::Created => cri::ContainerState::ContainerCreated,
                    Status::Running => cri::ContainerState::ContainerRunning,
                    Status::Stopped => cri::ContainerState::ContainerExited,
                }
            }
            _ => {
                learned_exit = r.exit.is_none();
                if r.exit.is_none() {
                    r.exit = client.exit_record();
                }
                if r.exit.is_none() {
                    r.reason = Some("ShimDied".into());
                    r.exit = Some(ExitStatus {
                        code: LOST_EXIT_CODE,
                        signal: None,
                        exited_at_ns: now_ns(),
                        oom_killed: false,
                    });
                }
                cri::ContainerState::ContainerExited
            }
        };
        (Observed { record: r, state }, learned_exit)
    }

    /// Every visible container with its live state.
    pub async fn list(&self) -> Result<Vec<Observed>> {
        let mut out = Vec::new();
        for r in self
            .all()?
            .into_iter()
            .filter(|r| r.phase != Phase::Creating)
        {
            out.push(self.observe(r).await);
        }
        Ok(out)
    }

    /// Stops every container of a pod, then the pod. Idempotent.
    pub async fn stop_sandbox(&self, sandbox_id: &str) -> Result<()> {
        let sandbox = self.sandboxes.get(sandbox_id)?;
        // Pod and container ids never collide: the pod's lock orders its stopped event.
        let pod_lock = self.lock(&sandbox.id);
        let _pod_held = pod_lock.lock().await;
        for r in self
            .all()?
            .into_iter()
            .filter(|r| r.sandbox_id == sandbox.id && r.phase == Phase::Created)
        {
            let lock = self.lock(&r.id);
            let _held = lock.lock().await;
            self.stop_locked(&r, Duration::ZERO).await?;
        }
        let was_ready = self.sandboxes.get(&sandbox.id)?.state == SandboxState::Ready;
        self.sandboxes.stop(&sandbox.id).await?;
        if was_ready {
            self.emit(EventKind::Stopped, &sandbox.id, &sandbox.id)
                .await;
        }
        Ok(())
    }

    /// Removes every container of a pod, then the pod. Removing an unknown pod succeeds.
    pub async fn remove_sandbox(&self, sandbox_id: &str) -> Result<()> {
        let sandbox = match self.sandboxes.get(sandbox_id) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if sandbox.state == SandboxState::Ready {
            // A pod is stopped before it is deleted, and its events say so in that order.
            self.stop_sandbox(&sandbox.id).await?;
        }
        let pod_lock = self.lock(&sandbox.id);
        let _pod_held = pod_lock.lock().await;
        for r in self
            .all()?
            .into_iter()
            .filter(|r| r.sandbox_id == sandbox.id)
        {
            self.remove(&r.id).await?;
        }
        let last = match self.sandboxes.get(&sandbox.id) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.sandboxes.remove(&sandbox.id).await?;
        // The pod cgroup is berth's only when berth chose it; kubelet's parents are kubelet's.
        if pod_cgroup_parent(&sandbox) == default_cgroup_parent(&sandbox.id) {
            remove_cgroup_dirs(&default_cgroup_parent(&sandbox.id));
        }
        self.forget(&sandbox.id);
        self.emit_with(EventKind::Deleted, &sandbox.id, Some(last))
            .await;
        Ok(())
    }

    /// Applies new resources to a created or running container and records them.
    pub async fn update_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<()> {
        let r = self.get(id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let observed = self.observe(r.clone()).await;
        if observed.state == cri::ContainerState::ContainerExited {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                r.id
            )));
        }
        let parent = pod_cgroup_parent(&self.sandboxes.get(&r.sandbox_id)?);
        let cgroup = format!("{parent}/{}", r.id);
        let res = resources.clone();
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || resources::apply(&cgroup, &res, &host))
            .await
            .map_err(|e| Error::Internal(format!("cgroup update thread: {e}")))??;
        let mut updated = observed.record;
        updated
            .config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(resources);
        self.put(&updated)?;
        tracing::info!(container_id = %r.id, "container resources updated");
        Ok(())
    }

    /// Runs a command in a running container to completion (ExecSync).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<exec::ExecOutput> {
        let r = self.get(id)?;
        // The shim refuses an exec in a container that is not running; only when it cannot
        // be reached is the container's state worth a look, for a clearer error.
        match exec::exec_sync(&ShimClient::new(&self.bundle(&r.id)), &r.id, cmd, timeout).await {
            Err(Error::Unavailable(msg))
                if self.observe(r.clone()).await.state != cri::ContainerState::ContainerRunning =>
            {
                Err(Error::FailedPrecondition(format!(
                    "container {} is not running ({msg})",
                    r.id
                )))
            }
            other => other,
        }
    }

    /// Asks a running container's shim to reopen its log file (after rotation).
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let r = self.get(id)?;
        let observed = self.observe(r.clone()).await;
        if observed.state != cri::ContainerState::ContainerRunning {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                r.id
            )));
        }
        ShimClient::new(&self.bundle(&r.id))
            .call(&Request::ReopenLog, Some(Duration::from_secs(5)))
            .await?;
        Ok(())
    }

    /// The pid of a created or running container's process, as berthd sees it; 0 otherwise.
    pub async fn pid(&self, id: &str) -> Result<i32> {
        let r = self.get(id)?;
        match ShimClient::new(&self.bundle(&r.id))
            .call(&Request::State, Some(Duration::from_secs(5)))
            .await
        {
            Ok(Response::State {
                status: Status::Created | Status::Running,
                pid,
                ..
            }) => Ok(pid),
            _ => Ok(0),
        }
    }

    /// Sends `signal` to a running container's process (docker's `kill`). FailedPrecondition
    /// when it is not running.
    pub async fn signal(&self, id: &str, signal: i32) -> Result<()> {
        let r = self.running(id).await?;
        ShimClient::new(&self.bundle(&r.id))
            .call(
                &Request::Kill { signal, all: false },
                Some(Duration::from_secs(5)),
            )
            .await
            .map(drop)
    }

    /// CRI status of one container.
    pub async fn status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let r = self.get(id)?;
        Ok(to_status(&self.observe(r).await))
    }

    /// What `ContainerStatus` with `verbose` adds, under the key `info`, in containerd's shape
    /// (`sandboxID`, `pid`, `snapshotKey`, `snapshotter`, `runtimeType`, `config`,
    /// `runtimeSpec`) plus berth's own `bundle`, `shimPid` and `logPath`.
    pub async fn verbose_info(&self, id: &str) -> Result<serde_json::Value> {
        let r = self.get(id)?;
        let bundle = self.bundle(&r.id);
        let pid = match ShimClient::new(&bundle)
            .call(&Request::State, Some(Duration::from_secs(5)))
            .await
        {
            Ok(Response::State {
                status: Status::Created | Status::Running,
                pid,
                ..
            }) => pid,
            _ => 0,
        };
        let read_json = |name: &str| {
            std::fs::read(bundle.join(name))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        };
        let shim_pid = shim_pid(&bundle);
        Ok(serde_json::json!({
            "sandboxID": r.sandbox_id,
            "pid": pid,
            "removing": false,
            "snapshotKey": r.snapshot_key(),
            "snapshotter": match self.snapshots.diff_mode() {
                snapshotter::DiffMode::Overlay => "overlayfs",
                snapshotter::DiffMode::Apply => "native",
            },
            "runtimeType": "io.berth.shim.v1",
            "config": r.config,
            "runtimeSpec": read_json("config.json"),
            "bundle": bundle,
            "shimPid": shim_pid,
            "logPath": r.log_path,
        }))
    }
}

/// The pid the shim of `bundle` recorded, if any.
fn shim_pid(bundle: &Path) -> Option<i32> {
    std::fs::read_to_string(bundle.join(api::shim::PID_FILE_NAME))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// The cgroup berth gives a pod when kubelet names none.
fn default_cgroup_parent(sandbox_id: &str) -> String {
    format!("/berth/{sandbox_id}")
}

/// The cgroupfs parent of a pod's containers.
fn pod_cgroup_parent(sandbox: &SandboxRecord) -> String {
    sandbox
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| default_cgroup_parent(&sandbox.id))
}

/// Removes an (empty) cgroup from every hierarchy mounted under /sys/fs/cgroup: v1
/// controllers, the hybrid unified mount, or a pure v2 root.
fn remove_cgroup_dirs(cgroup: &str) {
    let rel = cgroup.trim_start_matches('/');
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(rel)];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join(rel)));
    }
    for d in dirs {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => tracing::warn!(cgroup = %d.display(), error = %e, "remove pod cgroup"),
        }
    }
}

/// SIGKILLs every process in `cgroup` (in whichever hierarchy lists them) until none is left,
/// for up to two seconds.
fn kill_cgroup(cgroup: &str) {
    let rel = cgroup.trim_start_matches('/');
    let procs_files: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join(rel).join("cgroup.procs"))
                .collect()
        })
        .unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let pids: Vec<i32> = procs_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Unmounts the rootfs, removes the container's snapshot and its bundle dir.
fn release_storage(bundle: &Path, snapshots: &dyn Snapshotter, id: &str, owned_elsewhere: bool) {
    let rootfs = bundle.join("rootfs");
    match nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(container_id = %id, error = %e, "unmount rootfs"),
    }
    let key = format!("{SNAPSHOT_PREFIX}{id}");
    if owned_elsewhere {
        tracing::debug!(container_id = %id, "rootfs snapshot kept: its owner removes it");
    } else {
        match snapshots.remove(&key) {
            Ok(()) | Err(snapshotter::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(container_id = %id, error = %e, "remove rootfs snapshot"),
        }
    }
    match std::fs::remove_dir_all(bundle) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(container_id = %id, error = %e, "remove bundle"),
    }
}

/// Mounts what a snapshotter described at `target`.
pub(crate) fn mount_all(mounts: &[api::Mount], target: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    for m in mounts {
        let (fstype, mut flags) = if m.fstype == "bind" {
            (None, MsFlags::MS_BIND | MsFlags::MS_REC)
        } else {
            (Some(m.fstype.as_str()), MsFlags::empty())
        };
        let data: Vec<&str> = m
            .options
            .iter()
            .map(String::as_str)
            .filter(|o| match *o {
                "ro" => {
                    flags |= MsFlags::MS_RDONLY;
                    false
                }
                "rw" | "rbind" | "bind" => false,
                _ => true,
            })
            .collect();
        let data = data.join(",");
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            if data.is_empty() {
                None
            } else {
                Some(data.as_str())
            },
        )
        .map_err(|e| Error::Internal(format!("mount rootfs at {}: {e}", target.display())))?;
    }
    Ok(())
}

/// A signal by number or name (`9`, `KILL`, `SIGKILL`, any case).
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    nix::sys::signal::Signal::iterator()
        .find(|sig| sig.as_str().trim_start_matches("SIG") == name)
        .map(|sig| sig as i32)
}

/// The CRI status of an observed container.
pub fn to_status(o: &Observed) -> cri::ContainerStatus {
    let r = &o.record;
    let (exit_code, finished_at, reason, message) = match (&r.exit, o.state) {
        (Some(e), cri::ContainerState::ContainerExited) => {
            let reason = if let Some(reason) = &r.reason {
                reason.clone()
            } else if e.oom_killed {
                "OOMKilled".to_owned()
            } else if e.code == 0 {
                "Completed".to_owned()
            } else {
                "Error".to_owned()
            };
            let message = match &r.reason {
                Some(_) => "the container's shim exited without recording an exit".to_owned(),
                None => String::new(),
            };
            (e.code, e.exited_at_ns, reason, message)
        }
        _ => (0, 0, String::new(), String::new()),
    };
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: r.config.metadata.clone(),
        state: o.state as i32,
        created_at: r.created_at_ns,
        started_at: r.started_at_ns.unwrap_or(0),
        finished_at,
        exit_code,
        image: Some(cri::ImageSpec {
            image: r.image_name.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        reason,
        message,
        labels: r.config.labels.clone(),
        annotations: r.config.annotations.clone(),
        mounts: r.config.mounts.clone(),
        log_path: r.log_path.display().to_string(),
        resources: r
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                windows: None,
            }),
        image_id: r.image_id.clone(),
        user: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("usr1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
