//! A docker-style container's wishes as the core's CRI configs: a pod of its own (network,
//! hostname, DNS, published ports) and the one container in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use api::cri;

use super::spec::{Config, HostConfig, parse_port_proto};
use super::{ENGINE_ID_LABEL, ENGINE_LABEL, POD_NAMESPACE, PublishedPort, Record};
use crate::error::{Error, Result};
use crate::sandbox::NETWORK_ANNOTATION;

/// The configs a run of the container is made from.
pub struct Plan {
    /// Its pod.
    pub pod: cri::PodSandboxConfig,
    /// The container.
    pub container: cri::ContainerConfig,
}

/// The pod and container configs of one run of `r`. `ports` are the published ports with
/// their host ports chosen; `mounts` the resolved binds and volumes.
pub fn plan(
    r: &Record,
    log_dir: &Path,
    ports: &[PublishedPort],
    mounts: Vec<cri::Mount>,
) -> Result<Plan> {
    let c = &r.config;
    let h = &r.host_config;
    let host_net = h.network() == "host";
    let mut pod_annotations = HashMap::new();
    match h.network() {
        "bridge" | "host" => {}
        "none" => {
            pod_annotations.insert(NETWORK_ANNOTATION.to_owned(), "none".to_owned());
        }
        other if other.starts_with("container:") => {
            return Err(Error::InvalidArgument(format!(
                "network mode {other:?} is not supported by berth"
            )));
        }
        // A user-defined network: the engine resolves it and points the pod at it
        // (engine/networks.rs `apply_networks`).
        _ => {}
    }
    let labels = HashMap::from([
        (ENGINE_LABEL.to_owned(), "docker".to_owned()),
        (ENGINE_ID_LABEL.to_owned(), r.id.clone()),
    ]);
    let dns_config = (!h.dns.is_empty() || !h.dns_search.is_empty() || !h.dns_options.is_empty())
        .then(|| cri::DnsConfig {
            servers: h.dns.clone(),
            searches: h.dns_search.clone(),
            options: h.dns_options.clone(),
        });
    let port_mappings = ports
        .iter()
        .map(|p| cri::PortMapping {
            protocol: match p.proto.as_str() {
                "udp" => cri::Protocol::Udp as i32,
                "sctp" => cri::Protocol::Sctp as i32,
                _ => cri::Protocol::Tcp as i32,
            },
            container_port: i32::from(p.container_port),
            host_port: i32::from(p.host_port),
            host_ip: p.host_ip.clone(),
        })
        .collect();
    let namespace_options = cri::NamespaceOption {
        network: if host_net {
            cri::NamespaceMode::Node as i32
        } else {
            cri::NamespaceMode::Pod as i32
        },
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: r.name.clone(),
            uid: r.id.clone(),
            namespace: POD_NAMESPACE.into(),
            attempt: r.restart_count,
        }),
        hostname: if host_net { String::new() } else { hostname(r) },
        log_directory: log_dir.display().to_string(),
        dns_config,
        port_mappings,
        labels: labels.clone(),
        annotations: pod_annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            sysctls: h.sysctls.clone().into_iter().collect(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options.clone()),
                privileged: h.privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (run_as_user, run_as_username, run_as_group) = user(&c.user)?;
    // docker: an entrypoint given (even an empty one, `--entrypoint ""`) drops the image's
    // CMD too; an empty entrypoint leaves the command alone.
    let (command, args) = match &c.entrypoint {
        Some(e) if e.iter().all(String::is_empty) => {
            (c.cmd.clone().unwrap_or_default(), Vec::new())
        }
        Some(e) => (e.clone(), c.cmd.clone().unwrap_or_default()),
        None => (Vec::new(), c.cmd.clone().unwrap_or_default()),
    };
    if matches!(&c.entrypoint, Some(e) if e.iter().all(String::is_empty)) && command.is_empty() {
        return Err(Error::InvalidArgument("No command specified".into()));
    }
    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: r.name.clone(),
            attempt: r.restart_count,
        }),
        image: Some(cri::ImageSpec {
            image: r.image_id.clone(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: c.working_dir.clone(),
        envs: env(c),
        mounts,
        labels: c.labels.clone().into_iter().chain(labels).collect(),
        log_path: "container.log".into(),
        stdin: c.open_stdin,
        stdin_once: c.stdin_once,
        tty: c.tty,
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(resources(h)),
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: h.cap_add.clone(),
                    drop_capabilities: h.cap_drop.clone(),
                    ..Default::default()
                }),
                privileged: h.privileged,
                namespace_options: Some(namespace_options),
                run_as_user,
                run_as_username,
                run_as_group,
                readonly_rootfs: h.readonly_rootfs,
                ..Default::default()
            }),
        }),
        // docker: 0 and negative mean no limit.
        annotations: h
            .pids_limit
            .filter(|n| *n > 0)
            .map(|n| (crate::spec::PIDS_LIMIT_ANNOTATION.to_owned(), n.to_string()))
            .into_iter()
            .collect(),
        ..Default::default()
    };
    Ok(Plan { pod, container })
}

/// The container's hostname: its own, or the short id as docker gives.
pub fn hostname(r: &Record) -> String {
    if r.config.hostname.is_empty() {
        r.id[..12].to_owned()
    } else {
        r.config.hostname.clone()
    }
}

fn env(c: &Config) -> Vec<cri::KeyValue> {
    c.env
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            cri::KeyValue {
                key: k.to_owned(),
                value: v.to_owned(),
            }
        })
        .collect()
}

fn resources(h: &HostConfig) -> cri::LinuxContainerResources {
    let (mut period, mut quota) = (h.cpu_period, h.cpu_quota);
    if h.nano_cpus > 0 {
        period = 100_000;
        quota = h.nano_cpus / 10_000;
    }
    cri::LinuxContainerResources {
        cpu_period: period,
        cpu_quota: quota,
        cpu_shares: h.cpu_shares,
        memory_limit_in_bytes: h.memory,
        ..Default::default()
    }
}

type UserParts = (Option<cri::Int64Value>, String, Option<cri::Int64Value>);

/// docker's `-u`: `uid`, `uid:gid`, `name`; a group by name is not something CRI can say.
fn user(u: &str) -> Result<UserParts> {
    if u.is_empty() {
        return Ok((None, String::new(), None));
    }
    let (who, group) = match u.split_once(':') {
        Some((w, g)) => (w, Some(g)),
        None => (u, None),
    };
    let group = match group {
        None | Some("") => None,
        Some(g) => Some(cri::Int64Value {
            value: g.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "user {u:?}: berth takes a numeric group id after ':'"
                ))
            })?,
        }),
    };
    Ok(match who.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new(), group),
        Err(_) => (None, who.to_owned(), group),
    })
}

/// The ports `r` publishes: `PortBindings`, and with `PublishAllPorts` every exposed port
/// without a binding; host port 0 or empty means one the caller picks.
pub fn wanted_ports(c: &Config, h: &HostConfig) -> Result<Vec<PublishedPort>> {
    let mut out = Vec::new();
    for (spec, bindings) in &h.port_bindings {
        let (port, proto) = parse_port_proto(spec).ok_or_else(|| {
            Error::InvalidArgument(format!("invalid port specification: {spec:?}"))
        })?;
        let bindings = if bindings.is_empty() {
            vec![Default::default()]
        } else {
            bindings.clone()
        };
        for b in bindings {
            let host_port = if b.host_port.is_empty() {
                0
            } else {
                // docker takes a range `8000-8010`; berth takes its first port.
                let first = b.host_port.split('-').next().unwrap_or_default();
                first.parse().map_err(|_| {
                    Error::InvalidArgument(format!("invalid host port {:?}", b.host_port))
                })?
            };
            out.push(PublishedPort {
                container_port: port,
                proto: proto.clone(),
                host_ip: b.host_ip.clone(),
                host_port,
            });
        }
    }
    if h.publish_all_ports {
        for spec in c.exposed_ports.keys() {
            let (port, proto) = parse_port_proto(spec).ok_or_else(|| {
                Error::InvalidArgument(format!("invalid port specification: {spec:?}"))
            })?;
            if !out
                .iter()
                .any(|p| p.container_port == port && p.proto == proto)
            {
                out.push(PublishedPort {
                    container_port: port,
                    proto,
                    host_ip: String::new(),
                    host_port: 0,
                });
            }
        }
    }
    Ok(out)
}

/// One `-v`: `src:dst[:opts]` (a host path or a volume name) or `dst` (anonymous volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path (absolute) or volume name; empty for an anonymous volume.
    pub source: String,
    /// Path in the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Bind {
    /// Whether the source is a host path rather than a volume.
    pub fn is_host_path(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// Parses docker's `-v` syntax.
pub fn parse_bind(s: &str) -> Result<Bind> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || Error::InvalidArgument(format!("invalid volume specification: '{s}'"));
    let (source, target, opts) = match parts.as_slice() {
        [t] => ("", *t, ""),
        [s, t] if t.starts_with('/') => (*s, *t, ""),
        [t, o] if t.starts_with('/') => ("", *t, *o),
        [s, t, o] => (*s, *t, *o),
        _ => return Err(bad()),
    };
    if !target.starts_with('/') || target.contains('\0') {
        return Err(bad());
    }
    let mut read_only = false;
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => read_only = true,
            "rw" | "z" | "Z" | "shared" | "rshared" | "slave" | "rslave" | "private"
            | "rprivate" | "nocopy" | "consistent" | "cached" | "delegated" => {}
            _ => return Err(bad()),
        }
    }
    Ok(Bind {
        source: source.to_owned(),
        target: target.to_owned(),
        read_only,
    })
}

/// A CRI bind mount.
pub fn mount(host_path: PathBuf, target: &str, read_only: bool) -> cri::Mount {
    cri::Mount {
        container_path: target.to_owned(),
        host_path: host_path.display().to_string(),
        readonly: read_only,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse_like_docker() {
        let b = parse_bind("/host:/ctr:ro").expect("bind");
        assert!(b.is_host_path() && b.read_only);
        assert_eq!(b.target, "/ctr");
        let v = parse_bind("data:/data").expect("volume");
        assert!(!v.is_host_path() && !v.read_only);
        let anon = parse_bind("/cache").expect("anonymous");
        assert!(anon.source.is_empty());
        let anon_ro = parse_bind("/cache:ro").expect("anonymous ro");
        assert!(anon_ro.source.is_empty() && anon_ro.read_only);
        for bad in ["", "relative", "a:b:c:d", "/x:/y:bogus", "v:relative"] {
            assert!(parse_bind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn users_split_into_cri_fields() {
        assert_eq!(user("").expect("empty"), (None, String::new(), None));
        let (uid, name, gid) = user("1000:100").expect("ids");
        assert_eq!(
            (uid.map(|u| u.value), name, gid.map(|g| g.value)),
            (Some(1000), String::new(), Some(100))
        );
        let (uid, name, _) = user("nobody").expect("name");
        assert_eq!((uid, name.as_str()), (None, "nobody"));
        assert!(user("nobody:nogroup").is_err());
    }

    #[test]
    fn ports_come_from_bindings_and_publish_all() {
        let mut h = HostConfig::default();
        h.port_bindings.insert(
            "80/tcp".into(),
            vec![super::super::spec::PortBinding {
                host_ip: "127.0.0.1".into(),
                host_port: "8080".into(),
            }],
        );
        h.publish_all_ports = true;
        let mut c = Config::default();
        c.exposed_ports.insert("80/tcp".into(), Default::default());
        c.exposed_ports.insert("53/udp".into(), Default::default());
        let p = wanted_ports(&c, &h).expect("ports");
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].container_port, p[0].host_port), (80, 8080));
        assert_eq!(
            (p[1].container_port, p[1].proto.as_str(), p[1].host_port),
            (53, "udp", 0)
        );
    }
}
