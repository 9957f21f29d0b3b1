//! berthd's TOML configuration. Every key has a default, so no file is needed.
//!
//! ```toml
//! snapshotter = "overlay"          # or "native", or "auto" (overlay where the kernel has it)
//! max_concurrent_downloads = 3
//!
//! [registry."docker.io"]
//! mirrors = ["http://127.0.0.1:5000"]
//!
//! [registry."10.0.0.5:5000"]
//! insecure = true                  # plain HTTP
//! ```

use std::collections::BTreeMap;
use std::path::Path;

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
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Path::new("/nonexistent/berth.toml")).expect("defaults");
        assert_eq!(c.max_concurrent_downloads, 3);
    }
}
