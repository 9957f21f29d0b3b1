//! Network configurations: parsing and validating conflists, and loading them from conf dirs.
//!
//! As libcni (containerd, CRI-O) does: files ending in `.conflist`, `.conf` or `.json` are read
//! in lexicographic order of their names; a `.conflist` holds a list, a `.conf` one plugin's
//! config (wrapped into a list of one), a `.json` either. The first valid file is the default
//! network. Invalid files are skipped, each with its reason kept for the "not ready" message.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::error::{Error, NotReady, Result};
use super::version::{SUPPORTED_VERSIONS, SpecVersion};

/// Config files larger than this are skipped: no real conflist comes near it.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A network: a named, versioned chain of plugins (a conflist).
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    name: String,
    version: SpecVersion,
    plugins: Vec<PluginConf>,
    disable_check: bool,
    disable_gc: bool,
    source: Option<PathBuf>,
    raw: Map<String, Value>,
}

/// One plugin's configuration in a network.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    plugin_type: String,
    capabilities: BTreeSet<String>,
    raw: Map<String, Value>,
}

impl PluginConf {
    /// The plugin's `type`: the executable's name.
    pub fn plugin_type(&self) -> &str {
        &self.plugin_type
    }

    /// The capabilities the plugin declares as `true` (`portMappings`, `bandwidth`, ...): which
    /// capability args it is given as `runtimeConfig`.
    pub fn capabilities(&self) -> &BTreeSet<String> {
        &self.capabilities
    }

    /// The plugin's config as written.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }
}

impl Network {
    /// Parses a conflist (`{"cniVersion", "name", "plugins": [..]}`).
    pub fn from_conflist_bytes(bytes: &[u8]) -> Result<Self> {
        parse_conflist(bytes).map_err(|reason| Error::InvalidConfig { path: None, reason })
    }

    /// Parses a single plugin's config (a `.conf` file) and wraps it into a network of one plugin.
    pub fn from_conf_bytes(bytes: &[u8]) -> Result<Self> {
        parse_conf(bytes).map_err(|reason| Error::InvalidConfig { path: None, reason })
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The spec version the network is run with: its `cniVersion`, or the newest supported
    /// entry of `cniVersions` when it has that list (spec 1.1).
    pub fn version(&self) -> SpecVersion {
        self.version
    }

    /// The plugin chain, in ADD order.
    pub fn plugins(&self) -> &[PluginConf] {
        &self.plugins
    }

    /// Whether the network asks runtimes not to run CHECK (`disableCheck`).
    pub fn disable_check(&self) -> bool {
        self.disable_check
    }

    /// Whether the network asks runtimes not to run GC (`disableGC`).
    pub fn disable_gc(&self) -> bool {
        self.disable_gc
    }

    /// The conflist as written, top-level keys a runtime may have added included.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// The file the network was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The conflist as JSON (a `.conf` appears wrapped in a list): what the result cache keeps,
    /// so DEL after a restart runs the config ADD ran with.
    pub fn to_conflist_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.raw).expect("a JSON map always serializes")
    }
}

/// Whether `name` is a valid network name per the spec: an alphanumeric first character, then
/// alphanumerics, `_`, `.` or `-`. The same rule holds for container ids.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_object(bytes: &[u8]) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("not a JSON object".to_owned()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn parse_name(m: &Map<String, Value>) -> std::result::Result<String, String> {
    match m.get("name") {
        None => Err("no \"name\"".to_owned()),
        Some(Value::String(n)) if is_valid_name(n) => Ok(n.clone()),
        Some(Value::String(n)) => Err(format!(
            "invalid name {n:?}: must start with a letter or digit, then letters, digits, '_', '.' or '-'"
        )),
        Some(_) => Err("\"name\" is not a string".to_owned()),
    }
}

fn supported_list() -> String {
    SUPPORTED_VERSIONS
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The version to run a config with: the newest supported entry of `cniVersions` if the list is
/// there (spec 1.1 version selection), else `cniVersion`, which must be supported.
fn parse_version(m: &Map<String, Value>) -> std::result::Result<SpecVersion, String> {
    if let Some(list) = m.get("cniVersions") {
        let list = list
            .as_array()
            .ok_or_else(|| "\"cniVersions\" is not a list".to_owned())?;
        let mut best = None;
        for v in list {
            let s = v
                .as_str()
                .ok_or_else(|| "\"cniVersions\" has a non-string entry".to_owned())?;
            let v: SpecVersion = s.parse().map_err(|e| format!("\"cniVersions\": {e}"))?;
            if v.is_supported() && best.is_none_or(|b| v > b) {
                best = Some(v);
            }
        }
        if let Some(best) = best {
            return Ok(best);
        }
        if !list.is_empty() {
            return Err(format!(
                "no version in \"cniVersions\" {} is supported (supported: {})",
                Value::Array(list.clone()),
                supported_list()
            ));
        }
    }
    let s = match m.get("cniVersion") {
        None => return Err("no \"cniVersion\"".to_owned()),
        Some(Value::String(s)) => s,
        Some(_) => return Err("\"cniVersion\" is not a string".to_owned()),
    };
    let v: SpecVersion = s.parse().map_err(|e| format!("\"cniVersion\": {e}"))?;
    if !v.is_supported() {
        return Err(format!(
            "cniVersion {v} is not supported (supported: {})",
            supported_list()
        ));
    }
    Ok(v)
}

/// A boolean field, also accepted as the strings "true"/"false" as libcni does.
fn parse_flag(m: &Map<String, Value>, key: &str) -> std::result::Result<bool, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(format!("{key:?} is not a boolean: {other}")),
    }
}

fn parse_plugin(i: usize, v: &Value) -> std::result::Result<PluginConf, String> {
    let m = v
        .as_object()
        .ok_or_else(|| format!("plugins[{i}] is not an object"))?;
    let plugin_type = match m.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(Value::String(_)) | None => return Err(format!("plugins[{i}] has no \"type\"")),
        Some(_) => return Err(format!("plugins[{i}] \"type\" is not a string")),
    };
    // The type names an executable in the bin dirs; a path would escape them.
    if plugin_type.contains('/') || plugin_type == "." || plugin_type == ".." {
        return Err(format!("plugins[{i}] has an invalid type {plugin_type:?}"));
    }
    let capabilities = match m.get("capabilities") {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(Value::Object(caps)) => caps
            .iter()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .map(|(k, _)| k.clone())
            .collect(),
        Some(_) => return Err(format!("plugins[{i}] \"capabilities\" is not an object")),
    };
    Ok(PluginConf {
        plugin_type,
        capabilities,
        raw: m.clone(),
    })
}

fn parse_conflist(bytes: &[u8]) -> std::result::Result<Network, String> {
    let raw = parse_object(bytes)?;
    let name = parse_name(&raw)?;
    let version = parse_version(&raw)?;
    let plugins = match raw.get("plugins") {
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, p)| parse_plugin(i, p))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) | None => return Err("no plugins in the list".to_owned()),
        Some(_) => return Err("\"plugins\" is not a list".to_owned()),
    };
    Ok(Network {
        name,
        version,
        plugins,
        disable_check: parse_flag(&raw, "disableCheck")?,
        disable_gc: parse_flag(&raw, "disableGC")?,
        source: None,
        raw,
    })
}

fn parse_conf(bytes: &[u8]) -> std::result::Result<Network, String> {
    let conf = parse_object(bytes)?;
    if !conf.contains_key("type") && conf.contains_key("plugins") {
        return Err("no \"type\"; this looks like a conflist, name it *.conflist".to_owned());
    }
    let name = parse_name(&conf)?;
    let version = parse_version(&conf)?;
    let plugin = parse_plugin(0, &Value::Object(conf.clone()))?;
    let mut raw = Map::new();
    raw.insert("cniVersion".into(), Value::String(version.to_string()));
    raw.insert("name".into(), Value::String(name.clone()));
    raw.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok(Network {
        name,
        version,
        plugins: vec![plugin],
        disable_check: false,
        disable_gc: false,
        source: None,
        raw,
    })
}

/// A config file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedConfig {
    /// The file (or conf dir, when the dir itself could not be read).
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// What the conf dirs held at the last look: valid networks in priority order and skipped files.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfigs {
    /// Valid networks, the default first.
    pub networks: Vec<Arc<Network>>,
    /// Files that were skipped, with reasons, in the order they were read.
    pub skipped: Vec<SkippedConfig>,
    /// The dirs searched, in priority order.
    pub conf_dirs: Vec<PathBuf>,
}

impl NetworkConfigs {
    /// The default network (the first valid one), or why there is none.
    pub fn default_network(&self) -> std::result::Result<Arc<Network>, NotReady> {
        if let Some(n) = self.networks.first() {
            return Ok(n.clone());
        }
        let dirs = self
            .conf_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let reason = if self.skipped.is_empty() {
            format!("no CNI network config found in {dirs}")
        } else {
            let why = self
                .skipped
                .iter()
                .map(|s| format!("{}: {}", s.path.display(), s.reason))
                .collect::<Vec<_>>()
                .join("; ");
            format!("no valid CNI network config in {dirs}: {why}")
        };
        Err(NotReady { reason })
    }

    /// The first valid network with this name.
    pub fn network(&self, name: &str) -> Option<Arc<Network>> {
        self.networks.iter().find(|n| n.name == name).cloned()
    }
}

/// Loads a config file by its extension; `None` when the extension is not a config's.
fn load_file(path: &Path, size: u64) -> Option<std::result::Result<Network, String>> {
    let ext = path.extension()?.to_str()?;
    if !matches!(ext, "conflist" | "conf" | "json") {
        return None;
    }
    if size > MAX_CONFIG_BYTES {
        return Some(Err(format!(
            "{size} bytes, larger than the {MAX_CONFIG_BYTES} a config may have"
        )));
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Some(Err(format!("read: {e}"))),
    };
    let parsed = match ext {
        "conflist" => parse_conflist(&bytes),
        "conf" => parse_conf(&bytes),
        // .json holds either form; a list has "plugins".
        _ => match parse_object(&bytes) {
            Ok(m) if m.contains_key("plugins") => parse_conflist(&bytes),
            Ok(_) => parse_conf(&bytes),
            Err(e) => Err(e),
        },
    };
    Some(parsed.map(|mut n| {
        n.source = Some(path.to_owned());
        n
    }))
}

/// What identifies a version of a conf dir's contents without reading files: each candidate
/// file's name, inode, size, mtime and ctime. A writer that renames a new file into place changes
/// the inode; one that rewrites in place changes mtime (or, within one timestamp tick, usually the
/// size).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    File {
        path: PathBuf,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// Something that could not be looked at, with why (part of the reload key so a fix shows).
    Unreadable { path: PathBuf, reason: String },
}

fn is_candidate(name: &OsString) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "conflist" | "conf" | "json"))
}

/// Looks at the conf dirs: dirs in order, each dir's candidate files in lexicographic order.
/// A missing dir holds nothing.
fn scan(dirs: &[PathBuf]) -> Vec<Stamp> {
    let mut stamps = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                stamps.push(Stamp::Unreadable {
                    path: dir.clone(),
                    reason: format!("read conf dir: {e}"),
                });
                continue;
            }
        };
        let mut names: Vec<OsString> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(is_candidate)
            .collect();
        names.sort();
        for name in names {
            let path = dir.join(name);
            // Follows symlinks: a link to a config is a config.
            match std::fs::metadata(&path) {
                Ok(md) if md.is_file() => stamps.push(Stamp::File {
                    path,
                    ino: md.ino(),
                    size: md.size(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ctime: (md.ctime(), md.ctime_nsec()),
                }),
                Ok(_) => {}
                Err(e) => stamps.push(Stamp::Unreadable {
                    path,
                    reason: format!("stat: {e}"),
                }),
            }
        }
    }
    stamps
}

fn load(dirs: &[PathBuf], stamps: &[Stamp]) -> NetworkConfigs {
    let mut out = NetworkConfigs {
        conf_dirs: dirs.to_vec(),
        ..Default::default()
    };
    for s in stamps {
        match s {
            Stamp::Unreadable { path, reason } => out.skipped.push(SkippedConfig {
                path: path.clone(),
                reason: reason.clone(),
            }),
            Stamp::File { path, size, .. } => match load_file(path, *size) {
                None => {}
                Some(Ok(n)) => out.networks.push(Arc::new(n)),
                Some(Err(reason)) => out.skipped.push(SkippedConfig {
                    path: path.clone(),
                    reason,
                }),
            },
        }
    }
    out
}

/// Keeps the last load of the conf dirs and reloads when a cheap look shows a change.
#[derive(Debug)]
pub(crate) struct Loader {
    dirs: Vec<PathBuf>,
    last: Option<(Vec<Stamp>, Arc<NetworkConfigs>)>,
}

impl Loader {
    pub(crate) fn new(dirs: Vec<PathBuf>) -> Self {
        Self { dirs, last: None }
    }

    /// The current configs: a readdir and a stat per candidate file, and a reload only if those
    /// changed since the last call.
    pub(crate) fn current(&mut self) -> Arc<NetworkConfigs> {
        let stamps = scan(&self.dirs);
        if let Some((last, configs)) = &self.last
            && *last == stamps
        {
            return configs.clone();
        }
        let configs = Arc::new(load(&self.dirs, &stamps));
        tracing::debug!(
            networks = configs.networks.len(),
            skipped = configs.skipped.len(),
            "loaded CNI network configs"
        );
        for s in &configs.skipped {
            tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipped CNI network config");
        }
        self.last = Some((stamps, configs.clone()));
        configs
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn reason(bytes: &str, conf: bool) -> String {
        let r = if conf {
            parse_conf(bytes.as_bytes())
        } else {
            parse_conflist(bytes.as_bytes())
        };
        r.unwrap_err()
    }

    #[test]
    fn parses_a_conflist() {
        let n = Network::from_conflist_bytes(
            br#"{"cniVersion":"1.0.0","name":"net1","disableCheck":"true","plugins":[
                {"type":"bridge","bridge":"cni0","capabilities":{"ips":false,"dns":true}},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        assert_eq!(n.name(), "net1");
        assert_eq!(n.version().to_string(), "1.0.0");
        assert!(n.disable_check() && !n.disable_gc());
        let types: Vec<_> = n.plugins().iter().map(|p| p.plugin_type()).collect();
        assert_eq!(types, ["bridge", "portmap"]);
        assert_eq!(
            n.plugins()[0].capabilities().iter().collect::<Vec<_>>(),
            ["dns"]
        );
        assert_eq!(n.plugins()[0].raw()["bridge"], "cni0");
        // What the cache keeps parses back to the same network.
        assert_eq!(
            Network::from_conflist_bytes(&n.to_conflist_bytes()).unwrap(),
            n
        );
    }

    #[test]
    fn wraps_a_single_conf() {
        let n = Network::from_conf_bytes(
            br#"{"cniVersion":"0.4.0","name":"one","type":"bridge","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        assert_eq!(n.plugins().len(), 1);
        let raw: Value = serde_json::from_slice(&n.to_conflist_bytes()).unwrap();
        assert_eq!(raw["name"], "one");
        assert_eq!(raw["cniVersion"], "0.4.0");
        assert_eq!(raw["plugins"][0]["ipam"]["type"], "host-local");
        assert_eq!(
            Network::from_conflist_bytes(&n.to_conflist_bytes()).unwrap(),
            n
        );
    }

    #[test]
    fn picks_the_newest_supported_of_cni_versions() {
        let n = Network::from_conflist_bytes(
            br#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.1.0","7.0.0"],"name":"n","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(n.version().to_string(), "1.1.0");
    }

    #[test]
    fn invalid_configs_say_why() {
        let cases = [
            ("{", false, "invalid JSON"),
            ("[]", false, "not a JSON object"),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#,
                false,
                "no \"name\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"-x","plugins":[{"type":"a"}]}"#,
                false,
                "invalid name \"-x\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"a b","plugins":[{"type":"a"}]}"#,
                false,
                "invalid name",
            ),
            (
                r#"{"name":"n","plugins":[{"type":"a"}]}"#,
                false,
                "no \"cniVersion\"",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"a"}]}"#,
                false,
                "cniVersion 9.9.9 is not supported (supported: 0.1.0,",
            ),
            (
                r#"{"cniVersion":"latest","name":"n","plugins":[{"type":"a"}]}"#,
                false,
                "not a version",
            ),
            (
                r#"{"cniVersion":"1.0.0","cniVersions":["3.0.0"],"name":"n","plugins":[{"type":"a"}]}"#,
                false,
                "no version in \"cniVersions\"",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, false, "no plugins"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                false,
                "no plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},{}]}"#,
                false,
                "plugins[1] has no \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":""}]}"#,
                false,
                "plugins[0] has no \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../sbin/x"}]}"#,
                false,
                "invalid type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a","capabilities":[]}]}"#,
                false,
                "\"capabilities\" is not an object",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","disableCheck":3,"plugins":[{"type":"a"}]}"#,
                false,
                "\"disableCheck\" is not a boolean",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                true,
                "has no \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"}]}"#,
                true,
                "looks like a conflist",
            ),
        ];
        for (text, conf, want) in cases {
            let got = reason(text, conf);
            assert!(got.contains(want), "{text}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn names_follow_the_spec() {
        for ok in ["a", "Net-1", "k8s.pod_network", "9"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", ".a", "a/b", "a b", "a:b", "ä"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    fn write(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(name), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn list(name: &str) -> Value {
        json!({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": "x"}]})
    }

    #[test]
    fn loads_in_lexicographic_order_and_keeps_reasons() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("00-broken.conflist"), "{").unwrap();
        write(
            d,
            "05-noname.conflist",
            &json!({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}),
        );
        // Lexicographic, not numeric: "10-" sorts before "9-".
        write(d, "9-later.conflist", &list("later"));
        write(d, "10-first.conflist", &list("first"));
        write(
            d,
            "20-single.conf",
            &json!({"cniVersion": "0.3.1", "name": "single", "type": "y"}),
        );
        write(d, "30-either.json", &list("either"));
        write(
            d,
            "40-eitherconf.json",
            &json!({"cniVersion": "1.0.0", "name": "ec", "type": "z"}),
        );
        write(d, "README.md", &list("ignored"));
        std::fs::create_dir(d.join("50-dir.conflist")).unwrap();

        let mut loader = Loader::new(vec![d.to_owned(), d.join("missing")]);
        let c = loader.current();
        let names: Vec<_> = c.networks.iter().map(|n| n.name()).collect();
        assert_eq!(names, ["first", "single", "either", "ec", "later"]);
        assert_eq!(c.default_network().unwrap().name(), "first");
        assert_eq!(c.network("single").unwrap().plugins()[0].plugin_type(), "y");
        assert_eq!(
            c.networks[0].source(),
            Some(d.join("10-first.conflist").as_path())
        );
        let skipped: Vec<_> = c
            .skipped
            .iter()
            .map(|s| {
                (
                    s.path.file_name().unwrap().to_str().unwrap(),
                    s.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].0, "00-broken.conflist");
        assert!(skipped[0].1.starts_with("invalid JSON"), "{skipped:?}");
        assert_eq!(skipped[1], ("05-noname.conflist", "no \"name\""));
    }

    #[test]
    fn not_ready_reasons_name_dirs_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut loader = Loader::new(vec![d.to_owned()]);
        let r = loader.current().default_network().unwrap_err().reason;
        assert_eq!(r, format!("no CNI network config found in {}", d.display()));

        write(
            d,
            "10-bad.conflist",
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
        );
        let r = loader.current().default_network().unwrap_err().reason;
        assert_eq!(
            r,
            format!(
                "no valid CNI network config in {0}: {0}/10-bad.conflist: no plugins in the list",
                d.display()
            )
        );
    }

    #[test]
    fn earlier_dirs_win() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(b.path(), "00-b.conflist", &list("from-b"));
        write(a.path(), "99-a.conflist", &list("from-a"));
        let mut loader = Loader::new(vec![a.path().to_owned(), b.path().to_owned()]);
        let names: Vec<_> = loader
            .current()
            .networks
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        assert_eq!(names, ["from-a", "from-b"]);
    }

    #[test]
    fn reloads_on_change_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "20-b.conflist", &list("b"));
        let mut loader = Loader::new(vec![d.to_owned()]);
        let first = loader.current();
        assert_eq!(first.default_network().unwrap().name(), "b");
        // Unchanged: the same load comes back, nothing re-read.
        assert!(Arc::ptr_eq(&first, &loader.current()));

        write(d, "10-a.conflist", &list("a"));
        assert_eq!(loader.current().default_network().unwrap().name(), "a");

        // Rewritten in place (a longer file, so the size shows the change within a tick).
        write(d, "10-a.conflist", &list("a-changed"));
        assert_eq!(
            loader.current().default_network().unwrap().name(),
            "a-changed"
        );

        // Replaced by rename.
        write(d, "tmp", &list("a-renamed"));
        std::fs::rename(d.join("tmp"), d.join("10-a.conflist")).unwrap();
        assert_eq!(
            loader.current().default_network().unwrap().name(),
            "a-renamed"
        );

        std::fs::remove_file(d.join("10-a.conflist")).unwrap();
        assert_eq!(loader.current().default_network().unwrap().name(), "b");
        std::fs::remove_file(d.join("20-b.conflist")).unwrap();
        assert!(loader.current().default_network().is_err());
    }
}
