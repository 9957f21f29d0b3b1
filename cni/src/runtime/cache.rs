//! The on-disk result cache: what each successful ADD set up, so DEL (even after a restart, with
//! the conflist since changed or removed) runs with the same config, args and `prevResult`.
//!
//! The layout and format are libcni's: `<cache dir>/results/<network>-<container id>-<ifname>`,
//! a JSON object of kind `cniCacheV1` with the conflist bytes base64-encoded in `config`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::Network;
use super::error::{Error, Result};

const KIND: &str = "cniCacheV1";
/// Cache files larger than this are not ours.
const MAX_ENTRY_BYTES: u64 = 4 << 20;

/// One cached attachment: what an ADD was run with and what it returned.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAttachment {
    /// The network's name.
    pub network_name: String,
    /// The container id the ADD was for.
    pub container_id: String,
    /// The interface name in the container.
    pub ifname: String,
    /// The netns path the ADD was given.
    pub netns: Option<PathBuf>,
    /// The `CNI_ARGS` pairs the caller gave (without `IgnoreUnknown`).
    pub args: Vec<(String, String)>,
    /// The capability args the caller gave.
    pub capability_args: Map<String, Value>,
    /// The network config the ADD ran, as a conflist.
    pub config: Vec<u8>,
    /// The final ADD result, as printed.
    pub result: Option<Value>,
}

impl CachedAttachment {
    /// The cached config parsed as a network.
    pub fn network(&self) -> Result<Network> {
        Network::from_conflist_bytes(&self.config)
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    kind: String,
    #[serde(rename = "containerId")]
    container_id: String,
    config: String,
    #[serde(rename = "ifName")]
    ifname: String,
    #[serde(rename = "networkName")]
    network_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    netns: String,
    #[serde(rename = "cniArgs", default, skip_serializing_if = "Vec::is_empty")]
    cni_args: Vec<[String; 2]>,
    #[serde(
        rename = "capabilityArgs",
        default,
        skip_serializing_if = "Map::is_empty"
    )]
    capability_args: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
}

impl From<&CachedAttachment> for Entry {
    fn from(a: &CachedAttachment) -> Self {
        Entry {
            kind: KIND.to_owned(),
            container_id: a.container_id.clone(),
            config: BASE64.encode(&a.config),
            ifname: a.ifname.clone(),
            network_name: a.network_name.clone(),
            netns: a
                .netns
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cni_args: a.args.iter().map(|(k, v)| [k.clone(), v.clone()]).collect(),
            capability_args: a.capability_args.clone(),
            result: a.result.clone(),
        }
    }
}

impl TryFrom<Entry> for CachedAttachment {
    type Error = String;

    fn try_from(e: Entry) -> std::result::Result<Self, String> {
        if e.kind != KIND {
            return Err(format!("unknown kind {:?}", e.kind));
        }
        let config = BASE64
            .decode(e.config.as_bytes())
            .map_err(|err| format!("config is not base64: {err}"))?;
        Ok(CachedAttachment {
            network_name: e.network_name,
            container_id: e.container_id,
            ifname: e.ifname,
            netns: (!e.netns.is_empty()).then(|| PathBuf::from(e.netns)),
            args: e.cni_args.into_iter().map(|[k, v]| (k, v)).collect(),
            capability_args: e.capability_args,
            config,
            result: e.result,
        })
    }
}

/// The cache under one dir. Callers keep names valid (network names, container ids and ifnames
/// are checked before they get here), so a key never holds a `/`.
#[derive(Debug, Clone)]
pub(crate) struct ResultCache {
    results: PathBuf,
}

impl ResultCache {
    pub(crate) fn new(cache_dir: &Path) -> Self {
        Self {
            results: cache_dir.join("results"),
        }
    }

    pub(crate) fn path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.results
            .join(format!("{network}-{container_id}-{ifname}"))
    }

    /// Writes an entry atomically (temp file, fsync, rename, fsync of the dir).
    pub(crate) fn put(&self, a: &CachedAttachment) -> Result<()> {
        let path = self.path(&a.network_name, &a.container_id, &a.ifname);
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::WriteCache { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.results)
            .map_err(werr(&self.results))?;
        let bytes = serde_json::to_vec(&Entry::from(a)).expect("cache entries always serialize");
        let file_name = path
            .file_name()
            .expect("cache paths end in a file name")
            .to_string_lossy();
        let tmp = self.results.join(format!(".{file_name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr(&tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(werr(&tmp))?;
        drop(f);
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(&path)(e));
        }
        std::fs::File::open(&self.results)
            .and_then(|d| d.sync_all())
            .map_err(werr(&self.results))
    }

    /// Reads an entry; `Ok(None)` when there is none. A file that is not a valid entry is an
    /// `InvalidData` read error.
    pub(crate) fn get(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CachedAttachment>> {
        let path = self.path(network, container_id, ifname);
        match read_entry(&path) {
            Ok(a) => Ok(Some(a)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::ReadCache { path, source }),
        }
    }

    /// Removes an entry; a missing one is fine.
    pub(crate) fn remove(&self, network: &str, container_id: &str, ifname: &str) -> Result<()> {
        let path = self.path(network, container_id, ifname);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::WriteCache { path, source }),
        }
    }

    /// Every valid entry, sorted by file name. Entries that cannot be read are logged and left
    /// out: one bad file must not hide the others from GC and recovery.
    pub(crate) fn list(&self) -> Result<Vec<CachedAttachment>> {
        let dir = match std::fs::read_dir(&self.results) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::ReadCache {
                    path: self.results.clone(),
                    source,
                });
            }
        };
        let mut paths: Vec<PathBuf> = dir
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect();
        paths.sort();
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            match read_entry(&path) {
                Ok(a) => out.push(a),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable CNI cache entry")
                }
            }
        }
        Ok(out)
    }
}

fn read_entry(path: &Path) -> std::io::Result<CachedAttachment> {
    let md = std::fs::metadata(path)?;
    if !md.is_file() || md.len() > MAX_ENTRY_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a cache entry (not a file, or too large)",
        ));
    }
    let bytes = std::fs::read(path)?;
    let entry: Entry = serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    CachedAttachment::try_from(entry)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn sample(cid: &str) -> CachedAttachment {
        let mut caps = Map::new();
        caps.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        CachedAttachment {
            network_name: "net-a".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/x".into()),
            args: vec![("K8S_POD_NAME".into(), "p".into())],
            capability_args: caps,
            config: br#"{"cniVersion":"1.0.0","name":"net-a","plugins":[{"type":"x"}]}"#.to_vec(),
            result: Some(json!({"cniVersion": "1.0.0", "ips": []})),
        }
    }

    #[test]
    fn round_trips_lists_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ResultCache::new(tmp.path());
        assert_eq!(c.get("net-a", "c1", "eth0").unwrap(), None);
        assert!(c.list().unwrap().is_empty());
        c.put(&sample("c1")).unwrap();
        c.put(&sample("c2")).unwrap();
        let p = tmp.path().join("results/net-a-c1-eth0");
        let on_disk: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        // libcni's field names, so its tools can read our cache and the other way round.
        assert_eq!(on_disk["kind"], "cniCacheV1");
        assert_eq!(on_disk["containerId"], "c1");
        assert_eq!(on_disk["ifName"], "eth0");
        assert_eq!(on_disk["networkName"], "net-a");
        assert_eq!(on_disk["cniArgs"], json!([["K8S_POD_NAME", "p"]]));
        assert!(on_disk["config"].is_string());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let got = c.get("net-a", "c1", "eth0").unwrap().unwrap();
        assert_eq!(got, sample("c1"));
        assert_eq!(got.network().unwrap().name(), "net-a");

        // A broken entry is skipped by list, reported by get.
        std::fs::write(tmp.path().join("results/net-a-c3-eth0"), "{").unwrap();
        let ids: Vec<_> = c
            .list()
            .unwrap()
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert!(matches!(
            c.get("net-a", "c3", "eth0"),
            Err(Error::ReadCache { .. })
        ));

        c.remove("net-a", "c1", "eth0").unwrap();
        c.remove("net-a", "c1", "eth0").unwrap();
        assert_eq!(c.get("net-a", "c1", "eth0").unwrap(), None);
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("results"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}
