//! What the metadata instructions (CMD, ENV, LABEL, …) do to an image's container config: the
//! build's steps and `commit --change` both go through [`apply`].

use std::collections::BTreeMap;

use api::dockerfile::{Command, Healthcheck, Kind, expand};
use serde_json::{Map, Value, json};

/// The shell of shell-form commands when no `SHELL` says otherwise.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// What variables mean at one step: the image's `Env` (which wins) and the `ARG`s in scope.
pub struct Vars<'a> {
    /// The escape character of the Dockerfile.
    pub escape: char,
    /// `KEY=value` entries of the config's `Env`.
    pub env: Vec<String>,
    /// ARGs in scope with their values.
    pub args: &'a BTreeMap<String, String>,
}

impl Vars<'_> {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<String> {
        self.env
            .iter()
            .rev()
            .find_map(|e| {
                e.split_once('=')
                    .filter(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_owned())
            })
            .or_else(|| self.args.get(name).cloned())
    }

    /// `word` expanded.
    pub fn expand(&self, word: &str) -> Result<String, String> {
        expand(word, self.escape, &|n| self.get(n))
    }
}

/// The config's `Env`, as strings.
pub fn env_of(cfg: &Map<String, Value>) -> Vec<String> {
    cfg.get("Env")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The shell in effect: the config's `Shell`, or `/bin/sh -c`.
pub fn shell_of(cfg: &Map<String, Value>) -> Vec<String> {
    cfg.get("Shell")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SHELL.iter().map(|s| (*s).to_owned()).collect())
}

/// A command's argv: exec form as written, shell form run by `shell`.
pub fn argv(c: &Command, shell: &[String]) -> Vec<String> {
    match c {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => shell.iter().cloned().chain([s.clone()]).collect(),
    }
}

/// Joins a WORKDIR onto the current one and cleans it: `/a` + `b/../c` → `/a/c`.
pub fn join_workdir(current: &str, dir: &str) -> String {
    let joined = if dir.starts_with('/') {
        dir.to_owned()
    } else {
        format!("{}/{dir}", if current.is_empty() { "/" } else { current })
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn set_env(env: &mut Vec<Value>, key: &str, value: &str) {
    let entry = Value::String(format!("{key}={value}"));
    let prefix = format!("{key}=");
    match env.iter_mut().find(|e| {
        e.as_str()
            .is_some_and(|s| s.starts_with(&prefix) || s == key)
    }) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// Ports of one EXPOSE word: `80`, `80/udp`, `8000-8002/tcp` → `80/tcp`, ….
fn exposed(word: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = word.split_once('/').unwrap_or((word, "tcp"));
    let proto = proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let port = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("invalid containerPort: {s}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if hi < lo || hi - lo > 4096 {
        return Err(format!("invalid port range: {ports}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

fn healthcheck(h: &Healthcheck) -> Value {
    let test = match &h.test {
        None => json!(["NONE"]),
        Some(Command::Shell(s)) => json!(["CMD-SHELL", s]),
        Some(Command::Exec(v)) => {
            let mut t = vec!["CMD".to_owned()];
            t.extend(v.iter().cloned());
            json!(t)
        }
    };
    let mut m = Map::new();
    m.insert("Test".into(), test);
    for (k, v) in [
        ("Interval", h.interval_ns),
        ("Timeout", h.timeout_ns),
        ("StartPeriod", h.start_period_ns),
        ("StartInterval", h.start_interval_ns),
        ("Retries", h.retries),
    ] {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    }
    Value::Object(m)
}

/// A signal name or number as STOPSIGNAL takes it.
fn check_signal(s: &str) -> Result<(), String> {
    if s.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n)) {
        return Ok(());
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    if name.parse::<nix::sys::signal::Signal>().is_ok()
        || format!("SIG{name}")
            .parse::<nix::sys::signal::Signal>()
            .is_ok()
        || name.starts_with("RTMIN")
        || name.starts_with("RTMAX")
    {
        return Ok(());
    }
    Err(format!("invalid signal: {s}"))
}

/// What applying an instruction changed beyond the container config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// MAINTAINER's name, for the image's `author`.
    pub author: Option<String>,
}

/// Applies the metadata instruction `kind` to the container config `cfg`. RUN, COPY, ADD, ARG
/// and FROM are not metadata and are refused. `cmd_set` says whether this stage set CMD yet
/// (an ENTRYPOINT resets a CMD inherited from the base, as docker's does).
pub fn apply(
    cfg: &mut Map<String, Value>,
    kind: &Kind,
    vars: &Vars<'_>,
    cmd_set: bool,
) -> Result<Applied, String> {
    let shell = shell_of(cfg);
    let mut applied = Applied::default();
    match kind {
        Kind::Cmd(c) => {
            cfg.insert("Cmd".into(), json!(argv(c, &shell)));
        }
        Kind::Entrypoint(c) => {
            cfg.insert("Entrypoint".into(), json!(argv(c, &shell)));
            if !cmd_set {
                cfg.insert("Cmd".into(), Value::Null);
            }
        }
        Kind::Env(pairs) => {
            let mut expanded = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                expanded.push((vars.expand(k)?, vars.expand(v)?));
            }
            let mut env: Vec<Value> = env_of(cfg).into_iter().map(Value::String).collect();
            for (k, v) in expanded {
                if k.is_empty() {
                    return Err("ENV names must not be empty".into());
                }
                set_env(&mut env, &k, &v);
            }
            cfg.insert("Env".into(), Value::Array(env));
        }
        Kind::Label(pairs) => {
            let labels = cfg
                .entry("Labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if !labels.is_object() {
                *labels = Value::Object(Map::new());
            }
            for (k, v) in pairs {
                let k = vars.expand(k)?;
                if k.is_empty() {
                    return Err("LABEL names must not be empty".into());
                }
                let v = vars.expand(v)?;
                if let Some(m) = labels.as_object_mut() {
                    m.insert(k, Value::String(v));
                }
            }
        }
        Kind::Maintainer(m) => applied.author = Some(m.clone()),
        Kind::Expose(words) => {
            let ports = cfg
                .entry("ExposedPorts")
                .or_insert_with(|| Value::Object(Map::new()));
            if !ports.is_object() {
                *ports = Value::Object(Map::new());
            }
            for w in words {
                for p in exposed(&vars.expand(w)?)? {
                    if let Some(m) = ports.as_object_mut() {
                        m.insert(p, json!({}));
                    }
                }
            }
        }
        Kind::Workdir(d) => {
            let d = vars.expand(d)?;
            if d.is_empty() {
                return Err("WORKDIR needs a path".into());
            }
            let current = cfg
                .get("WorkingDir")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            cfg.insert("WorkingDir".into(), json!(join_workdir(&current, &d)));
        }
        Kind::User(u) => {
            let u = vars.expand(u)?;
            if u.is_empty() {
                return Err("USER needs a user".into());
            }
            cfg.insert("User".into(), json!(u));
        }
        Kind::Volume(paths) => {
            let vols = cfg
                .entry("Volumes")
                .or_insert_with(|| Value::Object(Map::new()));
            if !vols.is_object() {
                *vols = Value::Object(Map::new());
            }
            for p in paths {
                let p = vars.expand(p)?;
                if p.trim().is_empty() {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                if let Some(m) = vols.as_object_mut() {
                    m.insert(p, json!({}));
                }
            }
        }
        Kind::StopSignal(s) => {
            let s = vars.expand(s)?;
            check_signal(&s)?;
            cfg.insert("StopSignal".into(), json!(s));
        }
        Kind::Healthcheck(h) => {
            cfg.insert("Healthcheck".into(), healthcheck(h));
        }
        Kind::Shell(s) => {
            if s.is_empty() {
                return Err("SHELL needs at least one argument".into());
            }
            cfg.insert("Shell".into(), json!(s));
        }
        Kind::Onbuild(trigger) => {
            let list = cfg
                .entry("OnBuild")
                .or_insert_with(|| Value::Array(Vec::new()));
            if !list.is_array() {
                *list = Value::Array(Vec::new());
            }
            if let Some(a) = list.as_array_mut() {
                a.push(json!(trigger.original));
            }
        }
        Kind::Run { .. } | Kind::Copy(_) | Kind::Add(_) | Kind::Arg(_) => {
            return Err("not a metadata instruction".into());
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(args: &BTreeMap<String, String>) -> Vars<'_> {
        Vars {
            escape: '\\',
            env: vec!["A=1".into(), "P=/usr/bin".into()],
            args,
        }
    }

    #[test]
    fn workdirs_join_and_clean() {
        assert_eq!(join_workdir("", "app"), "/app");
        assert_eq!(join_workdir("/app", "sub/../src"), "/app/src");
        assert_eq!(join_workdir("/app", "/abs/"), "/abs");
        assert_eq!(join_workdir("/", ".."), "/");
    }

    #[test]
    fn expose_takes_ranges_and_protocols() {
        assert_eq!(exposed("80").expect("80"), vec!["80/tcp"]);
        assert_eq!(
            exposed("53-54/UDP").expect("range"),
            vec!["53/udp", "54/udp"]
        );
        assert!(exposed("http").is_err());
        assert!(exposed("80/icmp").is_err());
        assert!(exposed("90-80").is_err());
    }

    #[test]
    fn env_overrides_args_and_entrypoint_resets_an_inherited_cmd() {
        let args = BTreeMap::from([("A".to_owned(), "arg".to_owned()), ("B".into(), "b".into())]);
        let v = vars(&args);
        assert_eq!(v.get("A").as_deref(), Some("1"));
        assert_eq!(v.get("B").as_deref(), Some("b"));
        let mut cfg = Map::new();
        cfg.insert("Cmd".into(), json!(["base"]));
        apply(
            &mut cfg,
            &Kind::Entrypoint(Command::Exec(vec!["/e".into()])),
            &v,
            false,
        )
        .expect("entrypoint");
        assert_eq!(cfg["Cmd"], Value::Null);
        apply(&mut cfg, &Kind::Cmd(Command::Shell("x".into())), &v, true).expect("cmd");
        assert_eq!(cfg["Cmd"], json!(["/bin/sh", "-c", "x"]));
        apply(
            &mut cfg,
            &Kind::Entrypoint(Command::Exec(vec!["/f".into()])),
            &v,
            true,
        )
        .expect("entrypoint");
        assert_eq!(cfg["Cmd"], json!(["/bin/sh", "-c", "x"]));
    }

    #[test]
    fn signals_are_checked() {
        for ok in ["SIGTERM", "TERM", "9", "SIGRTMIN+3"] {
            check_signal(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["SIGNOPE", "0", "99", ""] {
            assert!(check_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn healthchecks_take_docker_shapes() {
        let h = Healthcheck {
            test: Some(Command::Shell("curl -f x".into())),
            interval_ns: 5_000_000_000,
            timeout_ns: 0,
            start_period_ns: 0,
            start_interval_ns: 0,
            retries: 3,
        };
        assert_eq!(
            healthcheck(&h),
            json!({"Test": ["CMD-SHELL", "curl -f x"], "Interval": 5_000_000_000i64, "Retries": 3})
        );
        let none = Healthcheck { test: None, ..h };
        assert_eq!(healthcheck(&none)["Test"], json!(["NONE"]));
    }
}
