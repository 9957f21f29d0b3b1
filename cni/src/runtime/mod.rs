//! The CNI runtime side: what berthd uses to attach pods to networks by running CNI plugins
//! (spec 1.0/1.1), as containerd and CRI-O do through libcni.
//!
//! - **Config**: [`Cni`] loads `.conflist`/`.conf`/`.json` files from [`CniConfig::conf_dirs`]
//!   (dirs in order, each dir's files in lexicographic order of name). The first valid one is
//!   the default network ([`Cni::default_network`]); invalid files are skipped with a reason,
//!   which ends up in [`NotReady::reason`] when no file is valid. Every call looks at the dirs
//!   again (a readdir and a stat per file) and reloads only when something changed.
//! - **Plugins** are found in [`CniConfig::bin_dirs`], first hit wins; they get the spec's
//!   environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`,
//!   `CNI_PATH`) and on stdin their config with `name`, `cniVersion`, `prevResult` and a
//!   `runtimeConfig` holding the capability args they declare in `capabilities`. Each plugin
//!   run is limited by [`CniConfig::timeout`]; past it the plugin's process group is killed.
//! - **Operations**: [`Cni::add`] runs the chain in order, each plugin given the previous one's
//!   result; [`Cni::del`] runs it in reverse with the cached result; [`Cni::check`],
//!   [`Cni::status`], [`Cni::gc`] and [`Cni::version`] as the spec says.
//! - **Result cache** under [`CniConfig::cache_dir`] (libcni's layout and format): written
//!   atomically after a successful ADD, removed after a successful DEL. DEL uses the cached
//!   config, args and result, so it tears down what ADD set up even when the conflist has
//!   changed or gone since, and across berthd restarts.
//!
//! Callers must not run two operations for the same (network, container id, ifname) at once
//! (the spec forbids it); operations for different attachments may run in parallel.
//!
//! A failed ADD may have left part of the chain set up, and caches nothing: the caller rolls it
//! back with [`Cni::del`], which needs no cache entry.

mod cache;
mod capability;
mod config;
mod error;
mod exec;
mod result;
mod version;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::cache::CachedAttachment;
use self::cache::ResultCache;
pub use self::capability::{Bandwidth, DnsConfig, IpRange, PortMapping};
use self::config::{Loader, is_valid_name};
pub use self::config::{Network, NetworkConfigs, PluginConf, SkippedConfig};
use self::error::error_chain;
pub use self::error::{Command, Error, NotReady, PluginError, Result};
use self::exec::{EnvAttachment, Invocation};
pub use self::result::{CniResult, Dns, Interface, IpConfig, Route};
pub use self::version::{LATEST, SUPPORTED_VERSIONS, SpecVersion};
use self::version::{V0_4_0, V1_1_0};

/// How long one plugin run may take unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the CNI runtime looks for things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    /// Dirs holding network configs, in priority order (e.g. `/etc/cni/net.d`).
    pub conf_dirs: Vec<PathBuf>,
    /// Dirs holding plugin executables, in search order (e.g. `/opt/cni/bin`); also `CNI_PATH`.
    pub bin_dirs: Vec<PathBuf>,
    /// Dir of the result cache (`results/` is made under it).
    pub cache_dir: PathBuf,
    /// Limit for one plugin run.
    pub timeout: Duration,
}

/// A container's attachment to a network: the per-call parameters of ADD, CHECK and DEL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`: for a pod, its sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`: the netns path. Needed by ADD and CHECK; DEL may go without (the netns is
    /// gone), and plugins then release what they can.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the interface in the container, e.g. `eth0`.
    pub ifname: String,
    /// `CNI_ARGS` pairs, in order; `IgnoreUnknown=1` is put first unless given.
    pub args: Vec<(String, String)>,
    /// Capability args (`portMappings`, `dns`, `bandwidth`, `ipRanges`, ...); each plugin gets,
    /// as `runtimeConfig`, those it declares in its `capabilities`.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// An attachment with no args.
    pub fn new(
        container_id: impl Into<String>,
        netns: Option<PathBuf>,
        ifname: impl Into<String>,
    ) -> Self {
        Self {
            container_id: container_id.into(),
            netns,
            ifname: ifname.into(),
            ..Default::default()
        }
    }

    /// Adds the Kubernetes args CRI runtimes pass: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_INFRA_CONTAINER_ID` (the container id) and `K8S_POD_UID`.
    pub fn with_pod(mut self, namespace: &str, name: &str, uid: &str) -> Self {
        let infra = self.container_id.clone();
        self.args.extend([
            ("K8S_POD_NAMESPACE".to_owned(), namespace.to_owned()),
            ("K8S_POD_NAME".to_owned(), name.to_owned()),
            ("K8S_POD_INFRA_CONTAINER_ID".to_owned(), infra),
            ("K8S_POD_UID".to_owned(), uid.to_owned()),
        ]);
        self
    }

    /// Adds one `CNI_ARGS` pair.
    pub fn with_arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.args.push((key.into(), value.into()));
        self
    }

    /// Sets a capability arg.
    pub fn with_capability(mut self, name: impl Into<String>, value: Value) -> Self {
        self.capability_args.insert(name.into(), value);
        self
    }

    /// Sets `portMappings`.
    pub fn with_port_mappings(self, mappings: &[PortMapping]) -> Self {
        self.with_capability("portMappings", to_value(mappings))
    }

    /// Sets `dns`.
    pub fn with_dns(self, dns: &DnsConfig) -> Self {
        self.with_capability("dns", to_value(dns))
    }

    /// Sets `bandwidth`.
    pub fn with_bandwidth(self, bandwidth: &Bandwidth) -> Self {
        self.with_capability("bandwidth", to_value(bandwidth))
    }

    /// Sets `ipRanges`: a list of range sets, each a list of ranges.
    pub fn with_ip_ranges(self, ranges: &[Vec<IpRange>]) -> Self {
        self.with_capability("ipRanges", to_value(ranges))
    }

    /// The `CNI_ARGS` value.
    pub fn cni_args(&self) -> String {
        let mut parts = Vec::with_capacity(self.args.len() + 1);
        if !self.args.iter().any(|(k, _)| k == "IgnoreUnknown") {
            parts.push("IgnoreUnknown=1".to_owned());
        }
        parts.extend(self.args.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(";")
    }

    fn validate(&self, needs_netns: bool) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidAttachment { reason });
        if !is_valid_name(&self.container_id) {
            return bad(format!(
                "container id {:?} must start with a letter or digit, then letters, digits, '_', '.' or '-'",
                self.container_id
            ));
        }
        let ifname = &self.ifname;
        if ifname.is_empty()
            || ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return bad(format!(
                "interface name {ifname:?} must be 1-15 bytes, not \".\" or \"..\", without '/', ':' or spaces"
            ));
        }
        if needs_netns
            && self
                .netns
                .as_deref()
                .is_none_or(|p| p.as_os_str().is_empty())
        {
            return bad("a netns path is needed".to_owned());
        }
        for (k, v) in &self.args {
            if k.is_empty() || k.contains(['=', ';']) || v.contains(';') {
                return bad(format!(
                    "CNI_ARGS pair {k:?}={v:?}: keys must be non-empty without '=' or ';', values without ';'"
                ));
            }
        }
        Ok(())
    }

    fn env<'a>(&'a self, cni_args: &'a str) -> EnvAttachment<'a> {
        EnvAttachment {
            container_id: &self.container_id,
            netns: self.netns.as_deref(),
            ifname: &self.ifname,
            cni_args,
        }
    }
}

fn to_value<T: Serialize + ?Sized>(v: &T) -> Value {
    serde_json::to_value(v).expect("capability types have string keys and always serialize")
}

/// An attachment that is still in use, for [`Cni::gc`] (`cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GcAttachment {
    /// The container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    pub ifname: String,
}

/// What a plugin answers to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// The version the answer is written in.
    #[serde(default)]
    pub cni_version: String,
    /// The spec versions the plugin supports.
    #[serde(default)]
    pub supported_versions: Vec<String>,
}

/// The CNI runtime: loads network configs and runs plugin chains. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Cni {
    cfg: CniConfig,
    cni_path: OsString,
    loader: Mutex<Loader>,
    cache: ResultCache,
}

impl Cni {
    /// A runtime over these dirs. Nothing is read until first used.
    pub fn new(cfg: CniConfig) -> Self {
        let mut cni_path = OsString::new();
        for (i, d) in cfg.bin_dirs.iter().enumerate() {
            if i > 0 {
                cni_path.push(":");
            }
            cni_path.push(d);
        }
        Self {
            loader: Mutex::new(Loader::new(cfg.conf_dirs.clone())),
            cache: ResultCache::new(&cfg.cache_dir),
            cni_path,
            cfg,
        }
    }

    /// The dirs and timeout in use.
    pub fn config(&self) -> &CniConfig {
        &self.cfg
    }

    /// The networks in the conf dirs now, and the files skipped with reasons. Reloads if the
    /// dirs changed since the last call.
    pub fn configs(&self) -> Arc<NetworkConfigs> {
        self.loader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .current()
    }

    /// The default network (the first valid config), or why there is none.
    pub fn default_network(&self) -> std::result::Result<Arc<Network>, NotReady> {
        self.configs().default_network()
    }

    /// The first valid network of this name.
    pub fn network(&self, name: &str) -> Option<Arc<Network>> {
        self.configs().network(name)
    }

    /// The executable of a plugin type: the first bin dir that has it.
    pub fn find_plugin(&self, plugin_type: &str) -> Result<PathBuf> {
        exec::find_plugin(plugin_type, &self.cfg.bin_dirs)
    }

    fn find_all(&self, net: &Network) -> Result<Vec<PathBuf>> {
        net.plugins()
            .iter()
            .map(|p| self.find_plugin(p.plugin_type()))
            .collect()
    }

    async fn run(
        &self,
        command: Command,
        plugin: &PluginConf,
        path: &Path,
        env: Option<EnvAttachment<'_>>,
        stdin: &[u8],
    ) -> Result<Vec<u8>> {
        exec::invoke(Invocation {
            command,
            plugin: plugin.plugin_type(),
            path,
            attachment: env,
            cni_path: &self.cni_path,
            stdin,
            timeout: self.cfg.timeout,
        })
        .await
    }

    /// Attaches a container: runs the chain's ADDs in order, each plugin given the previous
    /// plugin's result as `prevResult`, and returns the last result. On success the config,
    /// args and result are cached for DEL and CHECK.
    ///
    /// Every plugin binary is looked up before any runs, so a missing one fails with nothing set
    /// up. A plugin failing mid-chain leaves the earlier ones' work in place and caches nothing:
    /// call [`Cni::del`] to roll back.
    pub async fn add(&self, net: &Network, att: &Attachment) -> Result<CniResult> {
        att.validate(true)?;
        let paths = self.find_all(net)?;
        let cni_args = att.cni_args();
        let mut prev: Option<CniResult> = None;
        for (plugin, path) in net.plugins().iter().zip(&paths) {
            let stdin = plugin_stdin(
                net,
                plugin,
                prev.as_ref().map(|r| &r.raw),
                Some(&att.capability_args),
            );
            let out = self
                .run(Command::Add, plugin, path, Some(att.env(&cni_args)), &stdin)
                .await?;
            prev = Some(parse_result(plugin, &out)?);
        }
        let result = prev.expect("a network has at least one plugin");
        let entry = CachedAttachment {
            network_name: net.name().to_owned(),
            container_id: att.container_id.clone(),
            ifname: att.ifname.clone(),
            netns: att.netns.clone(),
            args: att.args.clone(),
            capability_args: att.capability_args.clone(),
            config: net.to_conflist_bytes(),
            result: Some(result.raw.clone()),
        };
        let cache = self.cache.clone();
        blocking(&self.cfg.cache_dir, move || cache.put(&entry)).await?;
        tracing::debug!(network = net.name(), container_id = %att.container_id, ifname = %att.ifname, "CNI ADD done");
        Ok(result)
    }

    /// Detaches a container: runs the chain's DELs in reverse order. Idempotent.
    ///
    /// If ADD's cache entry exists, DEL runs the cached config (not `net`: the conflist may
    /// have changed since), the cached `CNI_ARGS` and capability args, and the cached result as
    /// `prevResult`; `att` gives only the netns. Without an entry (DEL twice, or after a failed
    /// ADD) it runs `net` with `att` and no `prevResult`, and the plugins release what they can.
    /// Every plugin runs even if one fails; all failures come back together
    /// ([`Error::Teardown`]) and the cache entry stays for a retry. On success it is removed.
    pub async fn del(&self, net: &Network, att: &Attachment) -> Result<()> {
        att.validate(false)?;
        let cache = self.cache.clone();
        let (name, cid, ifname) = (
            net.name().to_owned(),
            att.container_id.clone(),
            att.ifname.clone(),
        );
        let cached = match blocking(&self.cfg.cache_dir, move || cache.get(&name, &cid, &ifname))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(network = net.name(), container_id = %att.container_id, error = %error_chain(&e), "unreadable CNI cache entry; running DEL with the current config");
                None
            }
        };
        let Some(entry) = cached else {
            return self.del_with(net, att, None).await;
        };
        let cached_att = Attachment {
            container_id: att.container_id.clone(),
            netns: att.netns.clone(),
            ifname: att.ifname.clone(),
            args: entry.args.clone(),
            capability_args: entry.capability_args.clone(),
        };
        match entry.network() {
            Ok(cached_net) => self.del_with(&cached_net, &cached_att, entry.result).await,
            Err(e) => {
                tracing::warn!(network = net.name(), container_id = %att.container_id, error = %error_chain(&e), "cached CNI config does not parse; running DEL with the current config");
                self.del_with(net, &cached_att, entry.result).await
            }
        }
    }

    /// Runs DEL for a cache entry alone, with no current config: for GC and for recovery of
    /// attachments whose network is gone. The cached netns is passed only if it still exists.
    pub async fn del_cached(&self, entry: &CachedAttachment) -> Result<()> {
        let net = entry.network().map_err(|e| match e {
            Error::InvalidConfig { reason, .. } => Error::InvalidConfig {
                path: Some(self.cache.path(
                    &entry.network_name,
                    &entry.container_id,
                    &entry.ifname,
                )),
                reason,
            },
            other => other,
        })?;
        let att = Attachment {
            container_id: entry.container_id.clone(),
            netns: entry.netns.clone().filter(|p| p.exists()),
            ifname: entry.ifname.clone(),
            args: entry.args.clone(),
            capability_args: entry.capability_args.clone(),
        };
        att.validate(false)?;
        self.del_with(&net, &att, entry.result.clone()).await
    }

    async fn del_with(&self, net: &Network, att: &Attachment, prev: Option<Value>) -> Result<()> {
        // prevResult on DEL arrived with 0.4.0; older plugins may choke on it.
        let prev = prev.filter(|_| net.version() >= V0_4_0);
        let cni_args = att.cni_args();
        let mut errors = Vec::new();
        for plugin in net.plugins().iter().rev() {
            let path = match self.find_plugin(plugin.plugin_type()) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let stdin = plugin_stdin(net, plugin, prev.as_ref(), Some(&att.capability_args));
            if let Err(e) = self
                .run(
                    Command::Del,
                    plugin,
                    &path,
                    Some(att.env(&cni_args)),
                    &stdin,
                )
                .await
            {
                errors.push(e);
            }
        }
        if !errors.is_empty() {
            return Err(Error::Teardown {
                network: net.name().to_owned(),
                command: Command::Del,
                errors,
            });
        }
        let cache = self.cache.clone();
        let (name, cid, ifname) = (
            net.name().to_owned(),
            att.container_id.clone(),
            att.ifname.clone(),
        );
        blocking(&self.cfg.cache_dir, move || {
            cache.remove(&name, &cid, &ifname)
        })
        .await?;
        tracing::debug!(network = net.name(), container_id = %att.container_id, ifname = %att.ifname, "CNI DEL done");
        Ok(())
    }

    /// Checks an attachment is as ADD left it: runs the chain's CHECKs in order with `net`, the
    /// caller's args and the cached result as `prevResult`, stopping at the first failure.
    ///
    /// Needs cniVersion 0.4.0 or newer; does nothing when the network sets `disableCheck`;
    /// fails with [`Error::NotAttached`] when there is no cached ADD result.
    pub async fn check(&self, net: &Network, att: &Attachment) -> Result<()> {
        att.validate(true)?;
        if net.version() < V0_4_0 {
            return Err(unsupported(net, Command::Check, V0_4_0));
        }
        if net.disable_check() {
            return Ok(());
        }
        let cache = self.cache.clone();
        let (name, cid, ifname) = (
            net.name().to_owned(),
            att.container_id.clone(),
            att.ifname.clone(),
        );
        let entry = blocking(&self.cfg.cache_dir, move || cache.get(&name, &cid, &ifname))
            .await?
            .ok_or_else(|| Error::NotAttached {
                network: net.name().to_owned(),
                container_id: att.container_id.clone(),
                ifname: att.ifname.clone(),
            })?;
        let paths = self.find_all(net)?;
        let cni_args = att.cni_args();
        for (plugin, path) in net.plugins().iter().zip(&paths) {
            let stdin = plugin_stdin(
                net,
                plugin,
                entry.result.as_ref(),
                Some(&att.capability_args),
            );
            self.run(
                Command::Check,
                plugin,
                path,
                Some(att.env(&cni_args)),
                &stdin,
            )
            .await?;
        }
        Ok(())
    }

    /// Whether the network can take ADDs: every plugin binary exists, and (cniVersion 1.1.0 and
    /// newer) every plugin answers STATUS with success. A plugin's "not available" answer comes
    /// back as [`Error::Plugin`] with code 50 or 51 ([`Error::plugin_code`]).
    pub async fn status(&self, net: &Network) -> Result<()> {
        let paths = self.find_all(net)?;
        if net.version() < V1_1_0 {
            return Ok(());
        }
        for (plugin, path) in net.plugins().iter().zip(&paths) {
            let stdin = plugin_stdin(net, plugin, None, None);
            self.run(Command::Status, plugin, path, None, &stdin)
                .await?;
        }
        Ok(())
    }

    /// Garbage-collects the network as libcni does: every cached attachment of this network not
    /// in `valid` is DELeted from its cache entry, then (cniVersion 1.1.0 and newer) every
    /// plugin gets GC with `cni.dev/valid-attachments` so it can drop resources of attachments
    /// it knows and the runtime no longer does. Does nothing when the network sets `disableGC`.
    /// Keeps going past failures and returns them all together.
    pub async fn gc(&self, net: &Network, valid: &[GcAttachment]) -> Result<()> {
        if net.disable_gc() {
            return Ok(());
        }
        let keep: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut errors = Vec::new();
        for entry in self.cached_attachments().await? {
            if entry.network_name != net.name()
                || keep.contains(&(entry.container_id.as_str(), entry.ifname.as_str()))
            {
                continue;
            }
            tracing::debug!(network = net.name(), container_id = %entry.container_id, ifname = %entry.ifname, "GC: deleting stale CNI attachment");
            if let Err(e) = self.del_cached(&entry).await {
                errors.push(e);
            }
        }
        if net.version() >= V1_1_0 {
            let list = to_value(valid);
            for plugin in net.plugins() {
                let path = match self.find_plugin(plugin.plugin_type()) {
                    Ok(p) => p,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                let mut conf = plugin_conf(net, plugin, None, None);
                conf.insert("cni.dev/valid-attachments".into(), list.clone());
                // libcni also sends the name an early draft of the spec used.
                conf.insert("cni.dev/attachments".into(), list.clone());
                let stdin = serde_json::to_vec(&conf).expect("a JSON map always serializes");
                if let Err(e) = self.run(Command::Gc, plugin, &path, None, &stdin).await {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown {
                network: net.name().to_owned(),
                command: Command::Gc,
                errors,
            })
        }
    }

    /// Asks a plugin which spec versions it supports. A plugin that prints nothing predates
    /// VERSION and supports 0.1.0 only.
    pub async fn version(&self, plugin_type: &str) -> Result<VersionInfo> {
        let path = self.find_plugin(plugin_type)?;
        let stdin = serde_json::to_vec(&serde_json::json!({ "cniVersion": LATEST.to_string() }))
            .expect("a JSON object always serializes");
        let out = exec::invoke(Invocation {
            command: Command::Version,
            plugin: plugin_type,
            path: &path,
            attachment: None,
            cni_path: &self.cni_path,
            stdin: &stdin,
            timeout: self.cfg.timeout,
        })
        .await?;
        if out.iter().all(u8::is_ascii_whitespace) {
            return Ok(VersionInfo {
                cni_version: "0.1.0".to_owned(),
                supported_versions: vec!["0.1.0".to_owned()],
            });
        }
        serde_json::from_slice(&out).map_err(|e| Error::InvalidResult {
            plugin: plugin_type.to_owned(),
            command: Command::Version,
            reason: e.to_string(),
            output: exec::excerpt(&out, out.len(), 2048),
        })
    }

    /// Every attachment in the result cache (all networks), for GC and for recovery after a
    /// restart. Unreadable entries are logged and left out.
    pub async fn cached_attachments(&self) -> Result<Vec<CachedAttachment>> {
        let cache = self.cache.clone();
        blocking(&self.cfg.cache_dir, move || cache.list()).await
    }

    /// The cache entry of one attachment, if any.
    pub async fn cached_attachment(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CachedAttachment>> {
        if !is_valid_name(network) || !is_valid_name(container_id) || ifname.contains('/') {
            return Ok(None);
        }
        let cache = self.cache.clone();
        let (name, cid, ifname) = (
            network.to_owned(),
            container_id.to_owned(),
            ifname.to_owned(),
        );
        blocking(&self.cfg.cache_dir, move || cache.get(&name, &cid, &ifname)).await
    }
}

/// A plugin's config as it is sent: its own, with the network's `name` and `cniVersion`, the
/// `prevResult`, and a `runtimeConfig` of the capability args it declares.
fn plugin_conf(
    net: &Network,
    plugin: &PluginConf,
    prev: Option<&Value>,
    capability_args: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut conf = plugin.raw().clone();
    conf.insert("name".into(), Value::String(net.name().to_owned()));
    conf.insert(
        "cniVersion".into(),
        Value::String(net.version().to_string()),
    );
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    if let Some(args) = capability_args {
        let rc: Map<String, Value> = plugin
            .capabilities()
            .iter()
            .filter_map(|c| args.get(c).map(|v| (c.clone(), v.clone())))
            .collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
    }
    conf
}

fn plugin_stdin(
    net: &Network,
    plugin: &PluginConf,
    prev: Option<&Value>,
    capability_args: Option<&Map<String, Value>>,
) -> Vec<u8> {
    serde_json::to_vec(&plugin_conf(net, plugin, prev, capability_args))
        .expect("a JSON map always serializes")
}

fn parse_result(plugin: &PluginConf, out: &[u8]) -> Result<CniResult> {
    let invalid = |reason: String| Error::InvalidResult {
        plugin: plugin.plugin_type().to_owned(),
        command: Command::Add,
        reason,
        output: exec::excerpt(out, out.len(), 2048),
    };
    if out.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("no result".to_owned()));
    }
    let v: Value = serde_json::from_slice(out).map_err(|e| invalid(e.to_string()))?;
    CniResult::from_value(v).map_err(invalid)
}

fn unsupported(net: &Network, command: Command, needs: SpecVersion) -> Error {
    Error::Unsupported {
        network: net.name().to_owned(),
        command,
        version: net.version().to_string(),
        needs: needs.to_string(),
    }
}

/// Runs cache I/O (small files, but an fsync) off the async threads.
async fn blocking<T: Send + 'static>(
    cache_dir: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::WriteCache {
            path: cache_dir.to_owned(),
            source: std::io::Error::other(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn cni_args_lead_with_ignore_unknown() {
        let a = Attachment::new("abc", None, "eth0").with_pod("ns", "pod", "uid-1");
        assert_eq!(
            a.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"
        );
        let a = Attachment::new("abc", None, "eth0")
            .with_arg("IgnoreUnknown", "0")
            .with_arg("X", "y");
        assert_eq!(a.cni_args(), "IgnoreUnknown=0;X=y");
    }

    #[test]
    fn attachments_are_validated() {
        let ns = Some(PathBuf::from("/run/netns/x"));
        assert!(
            Attachment::new("abc", ns.clone(), "eth0")
                .validate(true)
                .is_ok()
        );
        assert!(Attachment::new("abc", None, "eth0").validate(false).is_ok());
        let cases = [
            (Attachment::new("abc", None, "eth0"), true, "netns"),
            (
                Attachment::new("", ns.clone(), "eth0"),
                true,
                "container id",
            ),
            (
                Attachment::new("../x", ns.clone(), "eth0"),
                true,
                "container id",
            ),
            (
                Attachment::new("abc", ns.clone(), ""),
                true,
                "interface name",
            ),
            (
                Attachment::new("abc", ns.clone(), "a234567890123456"),
                true,
                "interface name",
            ),
            (
                Attachment::new("abc", ns.clone(), "a/b"),
                true,
                "interface name",
            ),
            (
                Attachment::new("abc", ns.clone(), "a b"),
                true,
                "interface name",
            ),
            (
                Attachment::new("abc", ns.clone(), ".."),
                true,
                "interface name",
            ),
            (
                Attachment::new("abc", ns.clone(), "eth0").with_arg("A;B", "1"),
                true,
                "CNI_ARGS",
            ),
            (
                Attachment::new("abc", ns.clone(), "eth0").with_arg("A", "1;B=2"),
                true,
                "CNI_ARGS",
            ),
            (
                Attachment::new("abc", ns.clone(), "eth0").with_arg("", "1"),
                true,
                "CNI_ARGS",
            ),
        ];
        for (a, needs_netns, want) in cases {
            let e = a.validate(needs_netns).unwrap_err().to_string();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }

    #[test]
    fn capability_helpers_write_the_conventional_json() {
        let a = Attachment::new("abc", None, "eth0")
            .with_port_mappings(&[PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }])
            .with_dns(&DnsConfig {
                servers: vec!["10.0.0.10".into()],
                ..Default::default()
            })
            .with_bandwidth(&Bandwidth {
                ingress_rate: Some(1000),
                ..Default::default()
            })
            .with_ip_ranges(&[vec![IpRange {
                subnet: "10.244.1.0/24".into(),
                ..Default::default()
            }]]);
        assert_eq!(
            Value::Object(a.capability_args),
            json!({
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                "dns": {"servers": ["10.0.0.10"]},
                "bandwidth": {"ingressRate": 1000},
                "ipRanges": [[{"subnet": "10.244.1.0/24"}]]
            })
        );
    }

    #[test]
    fn plugin_conf_injects_name_version_prev_result_and_declared_capabilities() {
        let net = Network::from_conflist_bytes(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[
                {"type":"a","name":"ignored","cniVersion":"0.1.0","capabilities":{"portMappings":true,"dns":false}},
                {"type":"b","runtimeConfig":{"keep":1}}]}"#,
        )
        .unwrap();
        let mut caps = Map::new();
        caps.insert("portMappings".into(), json!([1]));
        caps.insert("dns".into(), json!({}));
        let prev = json!({"cniVersion": "1.0.0"});
        let a = plugin_conf(&net, &net.plugins()[0], Some(&prev), Some(&caps));
        assert_eq!(a["name"], "n");
        assert_eq!(a["cniVersion"], "1.0.0");
        assert_eq!(a["prevResult"], prev);
        assert_eq!(a["runtimeConfig"], json!({"portMappings": [1]}));
        let b = plugin_conf(&net, &net.plugins()[1], None, Some(&caps));
        assert!(b.get("prevResult").is_none());
        // Nothing declared: a runtimeConfig of the plugin's own is left alone.
        assert_eq!(b["runtimeConfig"], json!({"keep": 1}));
    }

    #[test]
    fn futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let cni = Cni::new(CniConfig {
            conf_dirs: vec![],
            bin_dirs: vec![],
            cache_dir: PathBuf::from("/nonexistent"),
            timeout: DEFAULT_TIMEOUT,
        });
        let net =
            Network::from_conf_bytes(br#"{"cniVersion":"1.0.0","name":"n","type":"x"}"#).unwrap();
        let att = Attachment::new("c", None, "eth0");
        is_send(&cni.add(&net, &att));
        is_send(&cni.del(&net, &att));
        is_send(&cni.check(&net, &att));
        is_send(&cni.status(&net));
        is_send(&cni.gc(&net, &[]));
        is_send(&cni.version("x"));
    }
}
