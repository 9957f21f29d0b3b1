//! berthd's TOML configuration. Every key has a default, so no file is needed.
//!
//! ```toml
//! snapshotter = "overlay"          # or "native", or "auto" (overlay where the kernel has it)
//! max_concurrent_downloads = 3
//! pod_namespace_pool = 4           # pod namespaces made ahead of time (0: none)
//!
//! [registry."docker.io"]
//! mirrors = ["http://127.0.0.1:5000"]
//!
//! [registry."10.0.0.5:5000"]
//! insecure = true                  # plain HTTP
//!
//! [push]
//! chunk_bytes = 8388608            # blobs larger than this go up in chunks of this size
//!
//! [streaming]
//! address = "127.0.0.1:0"          # exec/attach/port-forward URLs lead here; port 0 = any
//! idle_timeout_secs = 14400
//!
//! [cni]
//! conf_dirs = ["/etc/cni/net.d"]   # then berth's managed dir, <root>/networks
//! bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]   # then berthd's own dir
//! plugin_timeout_secs = 60
//! default_bridge = "berth0"        # the network berthd writes when there is none
//! default_subnet = "10.88.0.0/16"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which snapshotter stores image layers.
    pub snapshotter: SnapshotterKind,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// Per-registry settings, keyed by registry host (`docker.io`, `host:port`).
    pub registry: BTreeMap<String, RegistryConfig>,
    /// Pod networking.
    pub cni: CniSection,
    /// The streaming server (exec, attach, port-forward).
    pub streaming: StreamingSection,
    /// How many sets of pod namespaces (network, IPC, UTS) berthd keeps made ahead of time,
    /// so pod starts do not wait for them. 0 makes them on demand.
    pub pod_namespace_pool: usize,
    /// Image pushes.
    pub push: PushSection,
}

/// How images are pushed to registries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushSection {
    /// A blob larger than this is pushed in chunks of this size (`PATCH` with
    /// `Content-Range`); smaller ones in one `PUT`.
    pub chunk_bytes: u64,
}

impl Default for PushSection {
    fn default() -> Self {
        PushSection {
            chunk_bytes: 8 << 20,
        }
    }
}

/// Where CNI network configs and plugins are found, and berth's own default network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniSection {
    /// Dirs of `.conflist`/`.conf` files, searched in order before berth's managed dir
    /// (`<root>/networks`); the first valid network is the pods' network.
    pub conf_dirs: Vec<PathBuf>,
    /// Dirs of plugin binaries, searched in order before the dir berthd itself is in (where
    /// berth's own plugins are installed).
    pub bin_dirs: Vec<PathBuf>,
    /// How long one plugin run may take.
    pub plugin_timeout_secs: u64,
    /// The bridge of the `berth` network berthd writes into its managed dir when no network
    /// config exists anywhere.
    pub default_bridge: String,
    /// The IPv4 subnet of that network.
    pub default_subnet: String,
}

impl Default for CniSection {
    fn default() -> Self {
        CniSection {
            conf_dirs: vec![PathBuf::from("/etc/cni/net.d")],
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            plugin_timeout_secs: 60,
            default_bridge: "berth0".into(),
            default_subnet: "10.88.0.0/16".into(),
        }
    }
}

/// Where the streaming server listens, and its timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingSection {
    /// `host:port` to listen on; port 0 picks a free one. Loopback by default, as containerd:
    /// kubelet proxies the streams to the API server.
    pub address: String,
    /// A streaming connection with no traffic for this long is closed (kubelet's default is
    /// 4 hours).
    pub idle_timeout_secs: u64,
}

impl Default for StreamingSection {
    fn default() -> Self {
        StreamingSection {
            address: "127.0.0.1:0".into(),
            idle_timeout_secs: 4 * 60 * 60,
        }
    }
}

/// Snapshotter choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotterKind {
    /// overlayfs if the kernel supports it on the root's filesystem, else native.
    Auto,
    /// overlayfs.
    Overlay,
    /// Plain copies.
    Native,
}

/// Settings of one registry host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Endpoints tried in order before the registry itself, as URLs (`http://host:port`,
    /// `https://host`). A plain host means https.
    pub mirrors: Vec<String>,
    /// Talk to the registry itself over plain HTTP.
    pub insecure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            snapshotter: SnapshotterKind::Auto,
            max_concurrent_downloads: 3,
            registry: BTreeMap::new(),
            cni: CniSection::default(),
            streaming: StreamingSection::default(),
            pod_namespace_pool: 4,
            push: PushSection::default(),
        }
    }
}

impl Config {
    /// Loads `path`; a missing file gives the defaults, a malformed one an error naming it.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).with_context(|| format!("read config {}", path.display())),
        };
        let config: Config =
            toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))?;
        if config.pod_namespace_pool > 64 {
            anyhow::bail!(
                "config {}: pod_namespace_pool must be at most 64",
                path.display()
            );
        }
        if config.cni.plugin_timeout_secs == 0 {
            anyhow::bail!(
                "config {}: cni.plugin_timeout_secs must be at least 1",
                path.display()
            );
        }
        if config.push.chunk_bytes < 1024 {
            anyhow::bail!(
                "config {}: push.chunk_bytes must be at least 1024",
                path.display()
            );
        }
        if config.max_concurrent_downloads == 0 {
            anyhow::bail!(
                "config {}: max_concurrent_downloads must be at least 1",
                path.display()
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_registry_table() {
        let c: Config = toml::from_str(
            r#"
            [registry."docker.io"]
            mirrors = ["http://127.0.0.1:5000"]
            [registry."10.0.0.5:5000"]
            insecure = true
            "#,
        )
        .expect("parse");
        assert_eq!(c.snapshotter, SnapshotterKind::Auto);
        assert_eq!(c.registry["docker.io"].mirrors, ["http://127.0.0.1:5000"]);
        assert!(c.registry["10.0.0.5:5000"].insecure);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        assert_eq!(c.push.chunk_bytes, 8 << 20);
        let c: Config = toml::from_str("[push]\nchunk_bytes = 1048576").expect("parse");
        assert_eq!(c.push.chunk_bytes, 1 << 20);
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Path::new("/nonexistent/berth.toml")).expect("defaults");
        assert_eq!(c.max_concurrent_downloads, 3);
    }
}
