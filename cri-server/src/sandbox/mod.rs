//! Pod sandboxes: pinned namespaces, the pod's hostname/hosts/resolv.conf files, and their
//! records. A sandbox has no process of its own.
//!
//! Crash safety: a sandbox is recorded as `Creating` before anything is made for it and becomes
//! `Ready` only when everything exists; at start, `Creating` records are rolled back, and
//! `Ready` ones whose pins vanished (the state dir is a tmpfs) become `NotReady`.
//!
//! A pod whose PID mode is POD also has an init process ([`pod_init`]), PID 1 of its PID
//! namespace, which lives until StopPodSandbox; the pod is shown NotReady if it dies earlier.

pub mod cgroup_linux;
pub mod ns_linux;
pub mod pod_init;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api::cri;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{Event, EventBus, EventKind};
use crate::network::PodNetwork;

/// sandbox id → JSON [`SandboxRecord`].
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
/// `name_namespace_uid_attempt` → sandbox id: the names kubelet may not reuse.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("sandbox_names");

/// Lifecycle of a sandbox record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Being set up; never shown to clients.
    Creating,
    /// Namespaces pinned, ready for containers.
    Ready,
    /// Stopped: network torn down, containers stopped.
    NotReady,
}

/// What berthd knows of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// 64 hex digits.
    pub id: String,
    /// The config kubelet gave.
    pub config: cri::PodSandboxConfig,
    /// Runtime handler asked for.
    pub runtime_handler: String,
    /// Lifecycle state.
    pub state: State,
    /// Creation time, ns since the epoch.
    pub created_at_ns: i64,
    /// Pinned namespace files (net, ipc, uts that are not the host's; pid in PID mode POD).
    pub pins: Vec<PathBuf>,
    /// The pod's hostname.
    pub hostname: String,
    /// Pid of the init of the pod's PID namespace (pod PID mode POD), as berthd sees it.
    #[serde(default)]
    pub init_pid: Option<i32>,
    /// The CNI network the pod is (or, while Creating, may be partly) attached to; None once
    /// torn down, and for pods on the host network.
    #[serde(default)]
    pub network: Option<String>,
    /// The pod's addresses on that network, the primary first.
    #[serde(default)]
    pub ips: Vec<String>,
}

impl SandboxRecord {
    fn name_key(&self) -> String {
        name_key(self.config.metadata.as_ref())
    }

    /// Namespace options, defaulted as CRI defines them (everything POD).
    pub fn namespace_options(&self) -> cri::NamespaceOption {
        namespace_options(&self.config)
    }

    /// Path of the pinned namespace of `kind` (`net`, `ipc`, `uts`, `pid`), if the pod has its
    /// own.
    pub fn ns_path(&self, kind: &str) -> Option<&Path> {
        self.pins
            .iter()
            .map(PathBuf::as_path)
            .find(|p| p.file_name().is_some_and(|n| n == kind))
    }
}

fn namespace_options(c: &cri::PodSandboxConfig) -> cri::NamespaceOption {
    c.linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

fn name_key(m: Option<&cri::PodSandboxMetadata>) -> String {
    let m = m.cloned().unwrap_or_default();
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// Pod annotation: `none` gives the pod a network namespace with only loopback (docker's
/// `--network none`), attached to no CNI network. On the engine's own pods (and only there)
/// any other value names the CNI network its `eth0` joins instead of the default one
/// (docker's user-defined networks): CRI pods' annotations are the kubelet user's to set, and
/// a tenant choosing its network would get around the isolation between networks, so there
/// other values are ignored.
pub const NETWORK_ANNOTATION: &str = "io.berth.network";

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn is_node(mode: i32) -> bool {
    mode == cri::NamespaceMode::Node as i32
}

/// Pod sandboxes and their records.
pub struct SandboxManager {
    db: Arc<Database>,
    state_dir: PathBuf,
    /// `berth-shim`, whose `pod-init` mode is the init of pod PID namespaces.
    shim_binary: PathBuf,
    /// One lock per sandbox id: stop/remove of one pod never interleave.
    locks: crate::locks::IdLocks,
    /// Where a new pod's created and started events go (ContainerManager, which stops and
    /// removes pods with their containers, sends the others).
    events: EventBus,
    /// The pods' CNI networks.
    network: Arc<PodNetwork>,
    /// Pod namespaces made ahead of time.
    ns_pool: Arc<ns_linux::NsPool>,
}

impl SandboxManager {
    /// Opens the records and reconciles them with what survived a crash or reboot.
    pub fn new(
        db: Arc<Database>,
        state_dir: &Path,
        shim_binary: PathBuf,
        events: EventBus,
        network: Arc<PodNetwork>,
        ns_pool_size: usize,
    ) -> Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(SANDBOXES)?;
        tx.open_table(NAMES)?;
        tx.commit()?;
        let ns_root = state_dir.join("ns");
        std::fs::create_dir_all(&ns_root)
            .map_err(|e| Error::Internal(format!("create {}: {e}", ns_root.display())))?;
        let m = SandboxManager {
            db,
            state_dir: state_dir.to_owned(),
            shim_binary,
            locks: crate::locks::IdLocks::default(),
            events,
            network,
            ns_pool: ns_linux::NsPool::new(&ns_root, ns_pool_size),
        };
        m.recover()?;
        m.ns_pool.refill();
        Ok(m)
    }

    /// Runs on a blocking thread of the runtime (berthd's start), so it may wait for the
    /// network teardown's futures.
    fn recover(&self) -> Result<()> {
        let rt = tokio::runtime::Handle::current();
        for r in self.all()? {
            match r.state {
                State::Creating => {
                    tracing::info!(sandbox_id = %r.id, "rolling back a sandbox a crash left half-created");
                    rt.block_on(self.teardown(&r));
                    self.delete_record(&r)?;
                }
                State::Ready if !r.pins.iter().all(|p| ns_linux::is_pinned(p)) => {
                    tracing::warn!(sandbox_id = %r.id, "sandbox namespaces are gone (reboot?): marking it not ready");
                    if let Some(pid) = r.init_pid {
                        let pidfile = self.ns_dir(&r.id).join(pod_init::PIDFILE);
                        let _ = pod_init::kill(pid, &pidfile, None);
                    }
                    // The interfaces went with the namespace; the addresses are still
                    // allocated until DEL (without a netns) releases them.
                    if let Some(net) = &r.network
                        && let Err(e) =
                            rt.block_on(self.network.detach(net, &r.id, None, &r.config))
                    {
                        tracing::warn!(sandbox_id = %r.id, error = %e, "release the network of a pod whose namespaces are gone");
                    }
                    let _ = ns_linux::unpin(&r.pins);
                    self.put(&SandboxRecord {
                        state: State::NotReady,
                        pins: vec![],
                        network: None,
                        ips: vec![],
                        ..r
                    })?;
                }
                _ => {}
            }
        }
        let attached: Vec<String> = self
            .all()?
            .into_iter()
            .filter(|r| r.network.is_some())
            .map(|r| r.id)
            .collect();
        rt.block_on(self.network.gc(&attached));
        Ok(())
    }

    /// Releases what the manager holds for pods to come (berthd's shutdown).
    pub fn shutdown(&self) {
        self.ns_pool.drain();
    }

    /// The pods' networks.
    pub fn network(&self) -> &PodNetwork {
        &self.network
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(id)
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    fn ns_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("ns").join(id)
    }

    /// Where the pod's `hostname`, `hosts` and `resolv.conf` files live.
    pub fn files_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id)
    }

    fn all(&self) -> Result<Vec<SandboxRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SANDBOXES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (id, v) = e?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                Error::Internal(format!("sandbox record {} is corrupt: {e}", id.value()))
            })?);
        }
        Ok(out)
    }

    fn put(&self, r: &SandboxRecord) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode sandbox", e))?;
        let tx = self.db.begin_write()?;
        tx.open_table(SANDBOXES)?
            .insert(r.id.as_str(), json.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Records a new sandbox under its name, atomically: AlreadyExists if the name is taken.
    fn reserve(&self, r: &SandboxRecord) -> Result<()> {
        let json = serde_json::to_vec(r).map_err(|e| Error::internal("encode sandbox", e))?;
        let key = r.name_key();
        let tx = self.db.begin_write()?;
        {
            let mut names = tx.open_table(NAMES)?;
            if let Some(other) = names.get(key.as_str())? {
                return Err(Error::AlreadyExists(format!(
                    "pod sandbox name {key:?} is reserved for {}",
                    other.value()
                )));
            }
            names.insert(key.as_str(), r.id.as_str())?;
            tx.open_table(SANDBOXES)?
                .insert(r.id.as_str(), json.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_record(&self, r: &SandboxRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(SANDBOXES)?.remove(r.id.as_str())?;
            let mut names = tx.open_table(NAMES)?;
            let key = r.name_key();
            let ours = names.get(key.as_str())?.is_some_and(|v| v.value() == r.id);
            if ours {
                names.remove(key.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The sandbox `id` names: a full id or a unique prefix of one. Creating ones are invisible.
    pub fn get(&self, id: &str) -> Result<SandboxRecord> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("pod sandbox id is required".into()));
        }
        let mut found: Vec<SandboxRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.state != State::Creating && r.id.starts_with(id))
            .collect();
        match found.len() {
            0 => Err(Error::NotFound(format!("pod sandbox {id:?} not found"))),
            1 => Ok(found.remove(0)),
            _ => Err(Error::InvalidArgument(format!(
                "pod sandbox id prefix {id:?} is ambiguous"
            ))),
        }
    }

    /// Creates a sandbox for the CRI front door: namespaces pinned, pod files written. Rolled
    /// back fully on failure. The pod joins the default network (none with the
    /// [`NETWORK_ANNOTATION`] `none`).
    pub async fn run(
        &self,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        self.run_as(config, runtime_handler, false).await
    }

    /// As [`SandboxManager::run`], for the engine's pods: a [`NETWORK_ANNOTATION`] naming a
    /// network is honoured when the pod also carries [`crate::engine::ENGINE_LABEL`].
    pub async fn run_engine(&self, config: cri::PodSandboxConfig) -> Result<String> {
        self.run_as(config, "", true).await
    }

    async fn run_as(
        &self,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
        engine: bool,
    ) -> Result<String> {
        let meta = config
            .metadata
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("pod sandbox config needs metadata".into()))?;
        if meta.name.is_empty() || meta.uid.is_empty() || meta.namespace.is_empty() {
            return Err(Error::InvalidArgument(
                "pod sandbox metadata needs name, uid and namespace".into(),
            ));
        }
        if !runtime_handler.is_empty() && runtime_handler != "berth" {
            return Err(Error::InvalidArgument(format!(
                "unknown runtime handler {runtime_handler:?}: berth has only the default handler"
            )));
        }
        let ns = namespace_options(&config);
        if ns.network == cri::NamespaceMode::Target as i32
            || ns.ipc == cri::NamespaceMode::Target as i32
        {
            return Err(Error::InvalidArgument(
                "TARGET namespace mode applies to pid only".into(),
            ));
        }
        let mut sysctls = checked_sysctls(&config, &ns)?;
        if !is_node(ns.network) {
            // As containerd 2 (enable_unprivileged_icmp/ports): in a pod's own network
            // namespace, any user may ping and bind low ports, unless the pod says otherwise.
            for (k, v) in [
                ("net.ipv4.ping_group_range", "0 2147483647"),
                ("net.ipv4.ip_unprivileged_port_start", "0"),
            ] {
                if !sysctls.iter().any(|(key, _)| key == k) {
                    sysctls.push((k.to_owned(), v.to_owned()));
                }
            }
        }
        PodNetwork::validate(&config)?;
        let id = hex::encode(rand::random::<[u8; 32]>());
        let host_net = is_node(ns.network);
        let named = config
            .annotations
            .get(NETWORK_ANNOTATION)
            .map(String::as_str);
        let engine_pod = engine && config.labels.contains_key(crate::engine::ENGINE_LABEL);
        // Without a usable network config the pod fails before anything is made for it.
        let network = match named {
            _ if host_net => None,
            Some("none") => None,
            Some(name) if engine_pod => Some(self.network.named(name)?),
            _ => Some(self.network.network()?),
        };
        let hostname = if host_net {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .map_err(|e| Error::internal("read host name", std::io::Error::from(e)))?
        } else if !config.hostname.is_empty() {
            config.hostname.clone()
        } else {
            meta.name.clone()
        };
        let mut record = SandboxRecord {
            id: id.clone(),
            config,
            runtime_handler: runtime_handler.to_owned(),
            state: State::Creating,
            created_at_ns: now_ns(),
            pins: vec![],
            hostname,
            init_pid: None,
            // Recorded from the start: a crash in the middle of ADD is rolled back with a DEL
            // at the next start (a DEL of what never ran is harmless).
            network: network.as_ref().map(|n| n.name().to_owned()),
            ips: vec![],
        };
        self.reserve(&record)?;
        let lock = self.lock(&id);
        let _held = lock.lock().await;

        // Stage one makes the namespaces. Then the pod's PID namespace init and its network
        // are set up side by side: neither needs the other, and each takes milliseconds.
        let ns_dir = self.ns_dir(&id);
        let pins = {
            let files_dir = self.sandbox_dir(&id);
            let ns_dir = ns_dir.clone();
            let req = ns_linux::NsRequest {
                net: !host_net,
                ipc: !is_node(ns.ipc),
                uts: !host_net,
                hostname: Some(record.hostname.clone()),
                sysctls,
            };
            let record = record.clone();
            let pool = self.ns_pool.clone();
            let pins = tokio::task::spawn_blocking(move || -> Result<Vec<PathBuf>> {
                write_pod_files(&files_dir, &record, host_net)?;
                pool.take(&ns_dir, &req)
                    .unwrap_or_else(|| ns_linux::pin(&ns_dir, &req))
                    .map_err(Error::Internal)
            })
            .await
            .map_err(|e| Error::Internal(format!("sandbox setup thread: {e}")))?;
            self.ns_pool.refill();
            pins
        };
        let setup = match pins {
            Err(e) => Err(e),
            Ok(pins) => {
                record.pins = pins;
                let pid_ns = ns.pid == cri::NamespaceMode::Pod as i32;
                let cgroup = owned_cgroup(&record);
                let limits = record
                    .config
                    .linux
                    .as_ref()
                    .and_then(cgroup_linux::pod_limits);
                let shim = self.shim_binary.clone();
                let init_dir = ns_dir.clone();
                // Whatever fails from here on, teardown finds the pins, the init (by its pid
                // file), the cgroup and the network (by the record) on its own.
                let init = tokio::task::spawn_blocking(
                    move || -> Result<(Option<PathBuf>, Option<i32>)> {
                        if let Some(cg) = &cgroup
                            && (pid_ns || limits.is_some())
                        {
                            cg.create(limits.as_ref())?;
                        }
                        if !pid_ns {
                            return Ok((None, None));
                        }
                        let pidfile = init_dir.join(pod_init::PIDFILE);
                        let pid = pod_init::spawn(&shim, &pidfile).map_err(Error::Internal)?;
                        if let Some(cg) = &cgroup {
                            cg.add(pid)?;
                        }
                        let pin = pod_init::pin(pid, &pidfile, &init_dir.join(pod_init::PIN))
                            .map_err(Error::Internal)?;
                        Ok((Some(pin), Some(pid)))
                    },
                );
                let attach = async {
                    let Some(net) = &network else {
                        return Ok(vec![]);
                    };
                    let netns = record.ns_path("net").ok_or_else(|| {
                        Error::Internal("the pod's network namespace was not pinned".into())
                    })?;
                    self.network.attach(net, &id, netns, &record.config).await
                };
                let (init, ips) = tokio::join!(init, attach);
                let init = init
                    .map_err(|e| Error::Internal(format!("pod init thread: {e}")))
                    .and_then(|r| r);
                match (init, ips) {
                    (Ok((pid_pin, init_pid)), Ok(ips)) => {
                        record.pins.extend(pid_pin);
                        record.init_pid = init_pid;
                        record.ips = ips;
                        Ok(())
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        };
        match setup {
            Ok(()) => {
                record.state = State::Ready;
                if let Err(e) = self.put(&record) {
                    self.teardown(&record).await;
                    let _ = self.delete_record(&record);
                    return Err(e);
                }
                tracing::info!(sandbox_id = %id, "pod sandbox ready");
                for kind in [EventKind::Created, EventKind::Started] {
                    self.events.send(Event {
                        id: id.clone(),
                        kind,
                        at_ns: now_ns(),
                        sandbox: Some(record.clone()),
                        containers: vec![],
                    });
                }
                Ok(id)
            }
            Err(e) => {
                self.teardown(&record).await;
                self.delete_record(&record)?;
                Err(e)
            }
        }
    }

    /// Releases what a sandbox holds on the host: its network, pins and files. Safe to call
    /// twice; logs what it could not undo and goes on.
    async fn teardown(&self, r: &SandboxRecord) {
        let ns_dir = self.ns_dir(&r.id);
        // DEL first: plugins need the namespace to undo what they did inside it.
        if let Some(net) = &r.network {
            let netns = ns_dir.join("net");
            let netns = ns_linux::is_pinned(&netns).then_some(netns.as_path());
            if let Err(e) = self.network.detach(net, &r.id, netns, &r.config).await {
                tracing::warn!(sandbox_id = %r.id, error = %e, "tear down the pod network");
            }
        }
        // The init goes first: its pid file is in the namespace dir, and its cgroup cannot be
        // removed while it lives.
        let pidfile = ns_dir.join(pod_init::PIDFILE);
        let pid_pin = ns_dir.join(pod_init::PIN);
        if let Some(pid) = pod_init::read_pidfile(&pidfile).or(r.init_pid) {
            let pin = ns_linux::is_pinned(&pid_pin).then_some(pid_pin.as_path());
            if let Err(e) = pod_init::kill(pid, &pidfile, pin) {
                tracing::warn!(sandbox_id = %r.id, error = %e, "kill the pod's init");
            }
        }
        let pins: Vec<PathBuf> = ns_linux::KINDS
            .iter()
            .map(|k| ns_dir.join(k))
            .chain([pid_pin.clone()])
            .collect();
        if let Err(e) = ns_linux::unpin(&pins) {
            tracing::warn!(sandbox_id = %r.id, error = %e, "unpin namespaces");
        }
        for dir in [self.ns_dir(&r.id), self.sandbox_dir(&r.id)] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(sandbox_id = %r.id, error = %e, path = %dir.display(), "remove sandbox dir")
                }
            }
        }
        if let Some(cg) = owned_cgroup(r)
            && let Err(e) = cg.remove()
        {
            tracing::warn!(sandbox_id = %r.id, error = %e, "remove pod cgroup");
        }
    }

    /// Stops a sandbox: its network goes, it becomes NotReady. Stopping a stopped sandbox
    /// succeeds; an unknown id is NotFound.
    pub async fn stop(&self, id: &str) -> Result<()> {
        let r = self.get(id)?;
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let r = self.get(&r.id)?;
        if r.state == State::NotReady {
            return Ok(());
        }
        // Containers are stopped by now (the caller stopped them). Killing the init ends what
        // is left in the pod's PID namespace; its pin stays until the pod is removed.
        if let Some(pid) = r.init_pid {
            let pidfile = self.ns_dir(&r.id).join(pod_init::PIDFILE);
            // Without its pin (unmounted by hand?) the command line alone identifies the init.
            let pin = r
                .ns_path(pod_init::PIN)
                .filter(|p| ns_linux::is_pinned(p))
                .map(Path::to_path_buf);
            tokio::task::spawn_blocking(move || pod_init::kill(pid, &pidfile, pin.as_deref()))
                .await
                .map_err(|e| Error::Internal(format!("pod init kill thread: {e}")))?
                .map_err(Error::Internal)?;
        }
        // The network namespace goes with the network, as in containerd. A failed DEL keeps
        // both, so the stop can be tried again.
        if let Some(name) = &r.network {
            let netns = r.ns_path("net").filter(|p| ns_linux::is_pinned(p));
            self.network.detach(name, &r.id, netns, &r.config).await?;
        }
        let net: Vec<PathBuf> = r
            .ns_path("net")
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        ns_linux::unpin(&net).map_err(Error::Internal)?;
        let pins = r
            .pins
            .iter()
            .filter(|p| !net.contains(p))
            .cloned()
            .collect();
        self.put(&SandboxRecord {
            state: State::NotReady,
            pins,
            network: None,
            ips: vec![],
            ..r
        })?;
        tracing::info!(sandbox_id = %id, "pod sandbox stopped");
        Ok(())
    }

    /// A TCP connection to `port` on the loopback of a ready pod's network namespace (the
    /// host's, for a pod on the host network): port forwarding.
    pub async fn dial(&self, id: &str, port: u16) -> Result<tokio::net::TcpStream> {
        let r = self.get(id)?;
        if r.state != State::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                r.id
            )));
        }
        let netns = r.ns_path("net").map(Path::to_path_buf);
        let pod = r.id.clone();
        let conn = tokio::task::spawn_blocking(move || {
            ns_linux::connect_loopback(netns.as_deref(), port, Duration::from_secs(10))
        })
        .await
        .map_err(|e| Error::Internal(format!("dial thread: {e}")))?
        .map_err(|e| Error::Unavailable(format!("pod {pod}: {e}")))?;
        conn.set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(conn))
            .map_err(|e| Error::Internal(format!("forwarded connection: {e}")))
    }

    /// Removes a sandbox, stopping it first if needed. Removing an unknown sandbox succeeds.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let r = match self.get(id) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if r.state == State::Ready {
            self.stop(&r.id).await?;
        }
        let lock = self.lock(&r.id);
        let _held = lock.lock().await;
        let r = match self.get(&r.id) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.teardown(&r).await;
        self.delete_record(&r)?;
        tracing::info!(sandbox_id = %r.id, "pod sandbox removed");
        Ok(())
    }

    /// Every visible sandbox, as [`SandboxManager::get_observed`] shows it.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|r| r.state != State::Creating)
            .map(|r| self.observed(r))
            .collect())
    }

    /// [`SandboxManager::get`] as clients see it: a Ready pod whose PID namespace init died is
    /// NotReady (nothing can join its PID namespace any more).
    pub fn get_observed(&self, id: &str) -> Result<SandboxRecord> {
        self.get(id).map(|r| self.observed(r))
    }

    fn observed(&self, mut r: SandboxRecord) -> SandboxRecord {
        if r.state == State::Ready && self.dead_init(&r).is_some() {
            r.state = State::NotReady;
        }
        r
    }

    /// The pid of the pod's PID namespace init if the pod has one and it is gone.
    fn dead_init(&self, r: &SandboxRecord) -> Option<i32> {
        let pid = r.init_pid?;
        let pidfile = self.ns_dir(&r.id).join(pod_init::PIDFILE);
        (!pod_init::is_ours(pid, &pidfile, r.ns_path(pod_init::PIN))).then_some(pid)
    }

    /// FailedPrecondition when the pod's PID namespace init is gone, so containers can no
    /// longer join the pod's PID namespace.
    pub fn check_pid_namespace(&self, r: &SandboxRecord) -> Result<()> {
        match self.dead_init(r) {
            None => Ok(()),
            Some(pid) => Err(Error::FailedPrecondition(format!(
                "pod sandbox {}: the init of its PID namespace (pid {pid}) is gone, so no \
                 container can join that namespace; stop and remove the pod, then run it again",
                r.id
            ))),
        }
    }
}

/// The pod cgroup berth owns for `r`: none when kubelet named a `cgroup_parent` (that one is
/// kubelet's to create, size and remove).
fn owned_cgroup(r: &SandboxRecord) -> Option<cgroup_linux::PodCgroup> {
    let kubelets = r
        .config
        .linux
        .as_ref()
        .is_some_and(|l| !l.cgroup_parent.is_empty());
    (!kubelets).then(|| cgroup_linux::PodCgroup::new(&cgroup_linux::default_path(&r.id)))
}

/// Namespaced sysctls only, and only for namespaces the pod owns: anything else would change
/// the host.
fn checked_sysctls(
    config: &cri::PodSandboxConfig,
    ns: &cri::NamespaceOption,
) -> Result<Vec<(String, String)>> {
    let Some(linux) = &config.linux else {
        return Ok(vec![]);
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in &linux.sysctls {
        let net = k.starts_with("net.");
        let ipc = k.starts_with("kernel.shm")
            || k.starts_with("kernel.msg")
            || k == "kernel.sem"
            || k.starts_with("fs.mqueue.");
        let ok = (net && !is_node(ns.network)) || (ipc && !is_node(ns.ipc));
        if !ok || k.contains('/') || k.contains("..") {
            return Err(Error::InvalidArgument(format!(
                "sysctl {k:?} is not namespaced in this pod (only net.* without host network and IPC sysctls without host IPC)"
            )));
        }
        out.push((k.clone(), v.clone()));
    }
    out.sort();
    Ok(out)
}

const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nff00::1\tip6-allnodes\nff00::2\tip6-allrouters\n";

/// Writes `hostname`, `hosts` and `resolv.conf` for the pod's containers to bind-mount.
fn write_pod_files(dir: &Path, r: &SandboxRecord, host_net: bool) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::internal(what, e);
    std::fs::create_dir_all(dir).map_err(|e| io("create sandbox dir", e))?;
    std::fs::write(dir.join("hostname"), format!("{}\n", r.hostname))
        .map_err(|e| io("write hostname", e))?;
    let hosts = if host_net {
        std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| DEFAULT_HOSTS.to_owned())
    } else {
        DEFAULT_HOSTS.to_owned()
    };
    std::fs::write(dir.join("hosts"), hosts).map_err(|e| io("write hosts", e))?;
    let resolv = match &r.config.dns_config {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            let mut s = String::new();
            if !d.searches.is_empty() {
                s.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for server in &d.servers {
                s.push_str(&format!("nameserver {server}\n"));
            }
            if !d.options.is_empty() {
                s.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            s
        }
        // As containerd: without DNS config the pod gets the host's resolver.
        _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    std::fs::write(dir.join("resolv.conf"), resolv).map_err(|e| io("write resolv.conf", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sysctls: &[(&str, &str)], network: cri::NamespaceMode) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                sysctls: sysctls
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_namespaced_sysctls_pass() {
        let c = config(
            &[("net.ipv4.ip_forward", "1"), ("kernel.shmmax", "1024")],
            cri::NamespaceMode::Pod,
        );
        let ok = checked_sysctls(&c, &namespace_options(&c)).expect("namespaced");
        assert_eq!(ok.len(), 2);
        for bad in ["kernel.panic", "vm.swappiness", "net/../../kernel/panic"] {
            let c = config(&[(bad, "1")], cri::NamespaceMode::Pod);
            assert!(
                checked_sysctls(&c, &namespace_options(&c)).is_err(),
                "{bad}"
            );
        }
        let host = config(&[("net.ipv4.ip_forward", "1")], cri::NamespaceMode::Node);
        assert!(
            checked_sysctls(&host, &namespace_options(&host)).is_err(),
            "host network"
        );
    }

    #[test]
    fn name_key_has_every_part() {
        let m = cri::PodSandboxMetadata {
            name: "n".into(),
            uid: "u".into(),
            namespace: "ns".into(),
            attempt: 2,
        };
        assert_eq!(name_key(Some(&m)), "n_ns_u_2");
    }
}
