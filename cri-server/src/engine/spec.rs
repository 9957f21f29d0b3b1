//! What a docker-style container asks for, in the Docker Engine API's own shapes (`Config`,
//! `HostConfig`): the format exists, so the engine keeps it rather than inventing one. Input is
//! read leniently, as dockerd reads it: nulls are absent fields, `Cmd`/`Entrypoint` may be a
//! string, booleans may be `1`/`0`/`"true"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A JSON document with every `null` removed, so that `#[serde(default)]` covers both absent and
/// null fields (docker clients send either).
pub fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// A list of strings that may arrive as one string (docker's `strslice`).
fn str_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<S>::deserialize(d)? {
        None => None,
        Some(S::One(s)) => Some(vec![s]),
        Some(S::Many(v)) => Some(v),
    })
}

/// A boolean that may arrive as `1`/`0` or a string.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    parse_bool(&v).ok_or_else(|| serde::de::Error::custom(format!("not a boolean: {v}")))
}

/// `true`/`false`, `1`/`0`, and their string forms (any case).
pub fn parse_bool(v: &serde_json::Value) -> Option<bool> {
    use serde_json::Value;
    match v {
        Value::Bool(b) => Some(*b),
        Value::Null => Some(false),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => parse_bool_str(s),
        _ => None,
    }
}

/// A boolean query or JSON string: `1`, `true`, `True`, `0`, `false`, empty (false).
pub fn parse_bool_str(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" | "" => Some(false),
        _ => None,
    }
}

/// An empty object: docker's way of writing a set (`ExposedPorts`, `Volumes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The container's own configuration (docker's `Config`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Config {
    pub hostname: String,
    pub domainname: String,
    pub user: String,
    #[serde(deserialize_with = "lenient_bool")]
    pub attach_stdin: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub attach_stdout: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub attach_stderr: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(deserialize_with = "lenient_bool")]
    pub tty: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub open_stdin: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub stdin_once: bool,
    pub env: Vec<String>,
    #[serde(deserialize_with = "str_or_list")]
    pub cmd: Option<Vec<String>>,
    pub image: String,
    pub volumes: BTreeMap<String, Empty>,
    pub working_dir: String,
    #[serde(deserialize_with = "str_or_list")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient_bool")]
    pub network_disabled: bool,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<i64>,
}

/// One host binding of a published port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortBinding {
    pub host_ip: String,
    pub host_port: String,
}

/// When the engine restarts a container that stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RestartPolicy {
    /// `""`/`no`, `always`, `unless-stopped`, `on-failure`.
    pub name: String,
    pub maximum_retry_count: i64,
}

/// A `--mount`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MountSpec {
    /// `bind`, `volume` or `tmpfs`.
    #[serde(rename = "Type")]
    pub kind: String,
    pub source: String,
    pub target: String,
    #[serde(deserialize_with = "lenient_bool")]
    pub read_only: bool,
}

/// The log driver and its options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LogConfig {
    #[serde(rename = "Type")]
    pub kind: String,
    pub config: BTreeMap<String, String>,
}

/// How the host runs the container (docker's `HostConfig`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    pub binds: Vec<String>,
    pub network_mode: String,
    pub port_bindings: BTreeMap<String, Vec<PortBinding>>,
    pub restart_policy: RestartPolicy,
    #[serde(deserialize_with = "lenient_bool")]
    pub auto_remove: bool,
    pub mounts: Vec<MountSpec>,
    pub dns: Vec<String>,
    pub dns_options: Vec<String>,
    pub dns_search: Vec<String>,
    pub extra_hosts: Vec<String>,
    pub links: Vec<String>,
    pub memory: i64,
    pub nano_cpus: i64,
    pub cpu_shares: i64,
    pub cpu_quota: i64,
    pub cpu_period: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<i64>,
    #[serde(deserialize_with = "lenient_bool")]
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    #[serde(deserialize_with = "lenient_bool")]
    pub readonly_rootfs: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub publish_all_ports: bool,
    pub log_config: LogConfig,
    pub sysctls: BTreeMap<String, String>,
    pub tmpfs: BTreeMap<String, String>,
}

impl HostConfig {
    /// The network the container joins: `bridge` for docker's `default`/empty.
    pub fn network(&self) -> &str {
        match self.network_mode.as_str() {
            "" | "default" => "bridge",
            other => other,
        }
    }
}

/// `80/tcp` → (80, "tcp"); the protocol defaults to tcp.
pub fn parse_port_proto(s: &str) -> Option<(u16, String)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let port: u16 = port.parse().ok()?;
    let proto = proto.to_ascii_lowercase();
    (port != 0 && matches!(proto.as_str(), "tcp" | "udp" | "sctp")).then_some((port, proto))
}

/// Docker's restart policy names, checked; an empty name is `no`.
pub fn check_restart_policy(p: &RestartPolicy) -> Result<(), String> {
    match p.name.as_str() {
        "" | "no" => Ok(()),
        "always" | "unless-stopped" if p.maximum_retry_count != 0 => Err(format!(
            "maximum retry count cannot be used with restart policy '{}'",
            p.name
        )),
        "always" | "unless-stopped" => Ok(()),
        "on-failure" if p.maximum_retry_count < 0 => {
            Err("maximum retry count cannot be negative".into())
        }
        "on-failure" => Ok(()),
        other => Err(format!("invalid restart policy '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_lenient_values_read_like_dockerd() {
        let v = serde_json::json!({
            "Cmd": "echo hi", "Entrypoint": null, "Tty": 1, "OpenStdin": "True",
            "Env": null, "Labels": {"a": "b"}, "ExposedPorts": {"80/tcp": {}}
        });
        let c: Config = serde_json::from_value(strip_nulls(v)).expect("config");
        assert_eq!(c.cmd, Some(vec!["echo hi".to_owned()]));
        assert_eq!(c.entrypoint, None);
        assert!(c.tty && c.open_stdin);
        assert!(c.env.is_empty());
        assert_eq!(c.labels["a"], "b");
        assert!(c.exposed_ports.contains_key("80/tcp"));
        let bad = serde_json::json!({"Tty": "maybe"});
        assert!(serde_json::from_value::<Config>(bad).is_err());
    }

    #[test]
    fn ports_and_restart_policies_are_checked() {
        assert_eq!(parse_port_proto("80"), Some((80, "tcp".into())));
        assert_eq!(parse_port_proto("53/UDP"), Some((53, "udp".into())));
        assert_eq!(parse_port_proto("0/tcp"), None);
        assert_eq!(parse_port_proto("80/icmp"), None);
        let p = |n: &str, m| RestartPolicy {
            name: n.into(),
            maximum_retry_count: m,
        };
        assert!(check_restart_policy(&p("", 0)).is_ok());
        assert!(check_restart_policy(&p("on-failure", 3)).is_ok());
        assert!(check_restart_policy(&p("always", 3)).is_err());
        assert!(check_restart_policy(&p("sometimes", 0)).is_err());
        let h = HostConfig {
            network_mode: "default".into(),
            ..Default::default()
        };
        assert_eq!(h.network(), "bridge");
    }
}
