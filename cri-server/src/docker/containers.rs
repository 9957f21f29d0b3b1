//! `/containers/…`: create, list, inspect, start/stop/restart/kill, wait, attach, logs,
//! resize, rename, remove, prune.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::hijack;
use super::{Api, ApiError, ApiResult, Req, channel_body, json, status};
use crate::container::stream::StreamOpts;
use crate::engine::logs::{LogOptions, Stream};
use crate::engine::networks::NetworkRecord;
use crate::engine::spec::{Config, HostConfig};
use crate::engine::{Record, Started, Status, WaitCondition};

/// docker's `filters` parameter: `{"key": ["v1", "v2"]}` or `{"key": {"v1": true}}`.
#[derive(Debug, Default)]
pub(crate) struct Filters(HashMap<String, Vec<String>>);

impl Filters {
    /// Parses both forms; an empty string is no filter.
    pub fn parse(s: &str) -> Result<Filters, ApiError> {
        if s.trim().is_empty() {
            return Ok(Filters::default());
        }
        let v: HashMap<String, Value> =
            serde_json::from_str(s).map_err(|e| ApiError::bad(format!("invalid filters: {e}")))?;
        let mut out = HashMap::new();
        for (k, v) in v {
            let values = match v {
                Value::Array(a) => a
                    .into_iter()
                    .map(|x| x.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>(),
                Value::Object(m) => Some(
                    m.into_iter()
                        .filter(|(_, on)| on.as_bool().unwrap_or(true))
                        .map(|(k, _)| k)
                        .collect(),
                ),
                Value::String(s) => Some(vec![s]),
                _ => None,
            }
            .ok_or_else(|| ApiError::bad(format!("invalid filter {k:?}")))?;
            out.insert(k, values);
        }
        Ok(Filters(out))
    }

    /// The keys given.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The values given for `key`.
    pub fn get(&self, key: &str) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    /// True when `key` has no values, or any of them satisfies `f` (docker ORs the values of
    /// one key and ANDs the keys).
    pub fn all(&self, key: &str, f: impl Fn(&str) -> bool) -> bool {
        let v = self.get(key);
        v.is_empty() || v.iter().any(|x| f(x))
    }

    /// Labels must all match (docker ANDs label filters).
    pub fn labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.get("label").iter().all(|l| {
            let (k, want) = match l.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (l.as_str(), None),
            };
            labels
                .get(k)
                .is_some_and(|got| want.is_none_or(|w| w == got))
        })
    }
}

fn command_line(r: &Record, image_config: &Value) -> String {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let entrypoint = r
        .config
        .entrypoint
        .clone()
        .unwrap_or_else(|| strs(&image_config["config"]["Entrypoint"]));
    let cmd = match (&r.config.cmd, &r.config.entrypoint) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => strs(&image_config["config"]["Cmd"]),
    };
    entrypoint
        .into_iter()
        .chain(cmd)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ago(ns: i64) -> String {
    let secs = (crate::sandbox::now_ns() - ns).max(0) / 1_000_000_000;
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".into(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".into(),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn status_text(r: &Record) -> String {
    match r.state.status {
        Status::Created => "Created".into(),
        Status::Running => format!("Up {}", ago(r.state.started_at_ns)),
        Status::Restarting => format!(
            "Restarting ({}) {} ago",
            r.state.exit_code,
            ago(r.state.finished_at_ns)
        ),
        Status::Exited => format!(
            "Exited ({}) {} ago",
            r.state.exit_code,
            ago(r.state.finished_at_ns)
        ),
        Status::Removing => "Removal In Progress".into(),
    }
}

fn ports_json(r: &Record) -> Vec<Value> {
    let mut out = Vec::new();
    let published = r
        .run
        .as_ref()
        .map(|run| run.ports.clone())
        .unwrap_or_default();
    for p in &published {
        out.push(json!({
            "IP": if p.host_ip.is_empty() { "0.0.0.0" } else { &p.host_ip },
            "PrivatePort": p.container_port,
            "PublicPort": p.host_port,
            "Type": p.proto,
        }));
    }
    for spec in r.config.exposed_ports.keys() {
        if let Some((port, proto)) = crate::engine::spec::parse_port_proto(spec)
            && !published
                .iter()
                .any(|p| p.container_port == port && p.proto == proto)
        {
            out.push(json!({"PrivatePort": port, "Type": proto}));
        }
    }
    out
}

/// The container's networks, named as `networks` (every network, read once per request)
/// names them now.
fn networks_json(api: &Api, r: &Record, networks: &[NetworkRecord]) -> Value {
    let mut nets = serde_json::Map::new();
    let attachments = r
        .run
        .as_ref()
        .map(|run| run.attachments.as_slice())
        .unwrap_or_default();
    for e in api.engine.endpoints(r) {
        let name = networks
            .iter()
            .find(|n| n.id == e.network_id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| e.network_name.clone());
        let a = attachments.iter().find(|a| a.network_id == e.network_id);
        let (ip, prefix, gateway, mac) = match a {
            Some(a) => (a.ip.as_str(), a.prefix, a.gateway.as_str(), a.mac.as_str()),
            None => ("", 0, "", ""),
        };
        let mut aliases = e.aliases.clone();
        let user = !crate::engine::networks::PREDEFINED.contains(&name.as_str());
        if user && r.running() {
            // docker lists the short id among a running container's aliases.
            aliases.push(r.id[..12].to_owned());
        }
        nets.insert(
            name,
            json!({
                "IPAMConfig": null, "Links": null,
                "Aliases": if aliases.is_empty() { Value::Null } else { json!(aliases) },
                "NetworkID": e.network_id,
                "EndpointID": if a.is_some() { super::networks::endpoint_id(&r.id, &e.network_id) } else { String::new() },
                "Gateway": gateway, "IPAddress": ip, "IPPrefixLen": prefix,
                "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "MacAddress": mac,
                "DNSNames": if user { json!([r.name.clone(), r.id[..12].to_owned()]) } else { Value::Null },
            }),
        );
    }
    Value::Object(nets)
}

fn mounts_json(api: &Api, r: &Record, image_config: &Value) -> Vec<Value> {
    use crate::engine::volumes::MountKind;
    let image_volumes = image_config["config"]["Volumes"]
        .as_object()
        .map(|m| m.keys().cloned().collect());
    let Ok(points) = api.engine.mount_points(r, image_volumes) else {
        return Vec::new();
    };
    points
        .into_iter()
        .map(|m| {
            let mode = if m.read_only { "ro" } else { "" };
            match m.kind {
                MountKind::Bind => json!({
                    "Type": "bind", "Source": m.source, "Destination": m.target,
                    "Mode": mode, "RW": !m.read_only, "Propagation": "rprivate",
                }),
                MountKind::Volume { name, .. } => json!({
                    "Type": "volume", "Name": name, "Source": m.source,
                    "Destination": m.target, "Driver": crate::engine::volumes::LOCAL_DRIVER,
                    "Mode": if m.read_only { "ro" } else { "z" }, "RW": !m.read_only,
                    "Propagation": "",
                }),
            }
        })
        .collect()
}

fn summary(api: &Api, r: &Record, image_config: &Value, networks: &[NetworkRecord]) -> Value {
    json!({
        "Id": r.id,
        "Names": [format!("/{}", r.name)],
        "Image": r.image,
        "ImageID": r.image_id,
        "Command": command_line(r, image_config),
        "Created": r.created_ns / 1_000_000_000,
        "Ports": ports_json(r),
        "Labels": r.config.labels,
        "State": r.state.status.as_str(),
        "Status": status_text(r),
        "HostConfig": {"NetworkMode": r.host_config.network()},
        "NetworkSettings": {"Networks": networks_json(api, r, networks)},
        "Mounts": mounts_json(api, r, image_config),
    })
}

fn image_config_of(api: &Api, r: &Record) -> Value {
    api.engine
        .images()
        .resolve(&r.image_id)
        .ok()
        .flatten()
        .and_then(|i| api.engine.images().config_json(&i).ok())
        .unwrap_or(Value::Null)
}

fn matches(r: &Record, f: &Filters) -> bool {
    f.all("id", |v| r.id.starts_with(v))
        && f.all("name", |v| r.name.contains(v.trim_start_matches('/')))
        && f.all("status", |v| v == r.state.status.as_str())
        && f.all("exited", |v| {
            r.state.status == Status::Exited
                && v.parse::<i32>().is_ok_and(|c| c == r.state.exit_code)
        })
        && f.all("ancestor", |v| r.image == v || r.image_id.contains(v))
        && f.all("network", |v| {
            r.host_config.network() == v
                || r.networks
                    .iter()
                    .any(|e| e.network_name == v || e.network_id.starts_with(v))
        })
        && f.labels(&r.config.labels)
}

pub(super) async fn list(api: &Arc<Api>, req: Req) -> ApiResult {
    let all_flag = req.flag("all")?;
    let limit: i64 = req.q("limit").parse().unwrap_or(-1);
    let filters = Filters::parse(req.q("filters"))?;
    let mut out = Vec::new();
    let networks = api.engine.networks()?;
    for r in api.engine.list()? {
        let shown_by_state = all_flag
            || matches!(r.state.status, Status::Running | Status::Restarting)
            || !filters.get("status").is_empty();
        if !shown_by_state || !matches(&r, &filters) {
            continue;
        }
        out.push(summary(api, &r, &image_config_of(api, &r), &networks));
        if limit > 0 && out.len() as i64 >= limit {
            break;
        }
    }
    json(StatusCode::OK, &out)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    #[serde(flatten)]
    config: Config,
    host_config: HostConfig,
    #[serde(default)]
    networking_config: NetworkingConfig,
}

/// docker's `NetworkingConfig` at create: the networks to join and the aliases on each.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct NetworkingConfig {
    endpoints_config: BTreeMap<String, EndpointSettings>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct EndpointSettings {
    aliases: Vec<String>,
}

pub(super) async fn create(api: &Arc<Api>, req: Req) -> ApiResult {
    let name = req.q("name").to_owned();
    let body: CreateBody = req.json().await?;
    let endpoints: BTreeMap<String, Vec<String>> = body
        .networking_config
        .endpoints_config
        .into_iter()
        .map(|(k, v)| (k, v.aliases))
        .collect();
    let created = api
        .engine
        .create_with_networks(
            (!name.is_empty()).then_some(name.as_str()),
            body.config,
            body.host_config,
            &endpoints,
        )
        .await?;
    json(
        StatusCode::CREATED,
        &json!({"Id": created.id, "Warnings": created.warnings}),
    )
}

pub(super) async fn remove(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let force = req.flag("force")?;
    let volumes = req.flag("v")?;
    api.engine.remove_with_volumes(id, force, volumes).await?;
    status(StatusCode::NO_CONTENT)
}

pub(super) async fn prune(api: &Arc<Api>, req: Req) -> ApiResult {
    let filters = Filters::parse(req.q("filters"))?;
    let mut deleted = Vec::new();
    for r in api.engine.list()? {
        if r.state.status != Status::Exited && r.state.status != Status::Created {
            continue;
        }
        if !filters.labels(&r.config.labels) {
            continue;
        }
        if api.engine.remove(&r.id, false).await.is_ok() {
            deleted.push(r.id);
        }
    }
    json(
        StatusCode::OK,
        &json!({"ContainersDeleted": deleted, "SpaceReclaimed": 0}),
    )
}

fn inspect_json(api: &Api, r: &Record) -> Value {
    let image_config = image_config_of(api, r);
    let strs = |v: &Value| v.clone();
    let mut config = serde_json::to_value(&r.config).unwrap_or(Value::Null);
    // The effective config, as docker shows it: the image's defaults filled in.
    if r.config.cmd.is_none() && r.config.entrypoint.is_none() {
        config["Cmd"] = strs(&image_config["config"]["Cmd"]);
    }
    if r.config.entrypoint.is_none() {
        config["Entrypoint"] = strs(&image_config["config"]["Entrypoint"]);
    }
    if r.config.working_dir.is_empty()
        && let Some(w) = image_config["config"]["WorkingDir"].as_str()
    {
        config["WorkingDir"] = json!(w);
    }
    let mut env: Vec<String> = image_config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for kv in &r.config.env {
        let key = kv.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    config["Env"] = json!(env);
    config["Hostname"] = json!(crate::engine::translate::hostname(r));
    let mut host_config = serde_json::to_value(&r.host_config).unwrap_or(Value::Null);
    if r.host_config.log_config.kind.is_empty() {
        host_config["LogConfig"] = json!({"Type": "json-file", "Config": {}});
    }
    if r.host_config.network_mode.is_empty() {
        host_config["NetworkMode"] = json!("bridge");
    }
    let ports: serde_json::Map<String, Value> = {
        let mut m = serde_json::Map::new();
        for spec in r.config.exposed_ports.keys() {
            m.insert(spec.clone(), Value::Null);
        }
        if let Some(run) = &r.run {
            for p in &run.ports {
                let key = format!("{}/{}", p.container_port, p.proto);
                let entry = m.entry(key).or_insert(Value::Null);
                if !entry.is_array() {
                    *entry = json!([]);
                }
                if let Some(a) = entry.as_array_mut() {
                    a.push(json!({
                        "HostIp": if p.host_ip.is_empty() { "0.0.0.0" } else { &p.host_ip },
                        "HostPort": p.host_port.to_string(),
                    }));
                }
            }
        }
        m
    };
    // The top-level address fields are the default bridge's, as docker's: empty for a
    // container only on user-defined networks.
    let bridge_id = crate::engine::networks::predefined_id("bridge");
    let on_bridge = api
        .engine
        .endpoints(r)
        .iter()
        .any(|e| e.network_id == bridge_id);
    let bridge = r
        .run
        .as_ref()
        .and_then(|run| run.attachments.iter().find(|a| a.network_id == bridge_id));
    let (ip, prefix, gateway, mac) = match (on_bridge, bridge) {
        (false, _) => (String::new(), 0, String::new(), String::new()),
        (true, Some(a)) => (a.ip.clone(), a.prefix, a.gateway.clone(), a.mac.clone()),
        // Records from before networks keep only the run's addresses.
        (true, None) => {
            let ip = r
                .run
                .as_ref()
                .and_then(|run| run.ips.iter().find(|ip| !ip.contains(':')).cloned())
                .unwrap_or_default();
            let prefix = if ip.is_empty() { 0 } else { 16 };
            (ip, prefix, String::new(), String::new())
        }
    };
    let time = |ns: i64| {
        if ns == 0 {
            "0001-01-01T00:00:00Z".to_owned()
        } else {
            api::time::rfc3339_nano(ns)
        }
    };
    json!({
        "Id": r.id,
        "Created": api::time::rfc3339_nano(r.created_ns),
        "Path": command_line(r, &image_config).split(' ').next().unwrap_or_default(),
        "Args": config["Cmd"],
        "State": {
            "Status": r.state.status.as_str(),
            "Running": r.state.status == Status::Running,
            "Paused": false,
            "Restarting": r.state.status == Status::Restarting,
            "OOMKilled": r.state.oom_killed,
            "Dead": false,
            "Pid": r.state.pid,
            "ExitCode": r.state.exit_code,
            "Error": r.state.error,
            "StartedAt": time(r.state.started_at_ns),
            "FinishedAt": time(r.state.finished_at_ns),
        },
        "Image": r.image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": r.log_path,
        "Name": format!("/{}", r.name),
        "RestartCount": r.restart_count,
        "Driver": "overlayfs",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "HostConfig": host_config,
        "GraphDriver": {"Name": "overlayfs", "Data": null},
        "Mounts": mounts_json(api, r, &image_config),
        "Config": config,
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": r.run.as_ref().map(|run| run.sandbox_id.clone()).unwrap_or_default(),
            "Ports": ports,
            "SandboxKey": "",
            "IPAddress": ip,
            "IPPrefixLen": prefix,
            "Gateway": gateway,
            "MacAddress": mac,
            "Networks": networks_json(api, r, &api.engine.networks().unwrap_or_default()),
        },
    })
}

fn timeout_param(req: &Req) -> Result<Option<Duration>, ApiError> {
    let t = req.q("t");
    if t.is_empty() {
        return Ok(None);
    }
    let secs: i64 = t
        .parse()
        .map_err(|_| ApiError::bad(format!("invalid timeout {t:?}")))?;
    // docker: -1 waits for ever; berth waits a day.
    Ok(Some(if secs < 0 {
        Duration::from_secs(86_400)
    } else {
        Duration::from_secs(secs as u64)
    }))
}

pub(super) async fn action(api: &Arc<Api>, id: &str, action: &str, req: Req) -> ApiResult {
    let m = req.method.as_str();
    match (m, action) {
        ("GET", "json") => {
            let r = api.engine.get(id)?;
            json(StatusCode::OK, &inspect_json(api, &r))
        }
        ("POST", "start") => match api.engine.start(id).await? {
            Started::Started => status(StatusCode::NO_CONTENT),
            Started::AlreadyRunning => status(StatusCode::NOT_MODIFIED),
        },
        ("POST", "stop") => {
            let t = timeout_param(&req)?;
            if api.engine.stop(id, t).await? {
                status(StatusCode::NO_CONTENT)
            } else {
                status(StatusCode::NOT_MODIFIED)
            }
        }
        ("POST", "restart") => {
            let t = timeout_param(&req)?;
            api.engine.restart(id, t).await?;
            status(StatusCode::NO_CONTENT)
        }
        ("POST", "kill") => {
            api.engine.kill(id, req.q("signal")).await?;
            status(StatusCode::NO_CONTENT)
        }
        ("POST", "rename") => {
            api.engine.rename(id, req.q("name")).await?;
            status(StatusCode::NO_CONTENT)
        }
        ("POST", "resize") => {
            let (w, h) = (
                req.q("w").parse().unwrap_or(0),
                req.q("h").parse().unwrap_or(0),
            );
            api.engine.resize(id, w, h).await?;
            status(StatusCode::OK)
        }
        ("POST", "wait") => wait(api, id, req).await,
        ("POST", "attach") => attach(api, id, req).await,
        ("POST", "exec") => super::exec::create(api, id, req).await,
        ("GET", "logs") => logs(api, id, req).await,
        ("GET" | "HEAD" | "PUT", "archive") => super::archive::route(api, id, req).await,
        ("GET", "top") => super::usage::top(api, id, req).await,
        ("GET", "stats") => super::usage::stats(api, id, req).await,
        _ => Err(ApiError::not_found("page not found")),
    }
}

async fn wait(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let condition = match req.q("condition") {
        "" | "not-running" => WaitCondition::NotRunning,
        "next-exit" => WaitCondition::NextExit,
        "removed" => WaitCondition::Removed,
        other => return Err(ApiError::bad(format!("invalid condition: {other:?}"))),
    };
    // Taken before the headers go: an unknown container is a 404, not a broken stream, and
    // an exit (or removal) right after them, before the task below runs, still counts.
    let start = api.engine.wait_start(id, condition)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let engine = api.engine.clone();
    tokio::spawn(async move {
        let body = match engine.wait_from(start).await {
            Ok(code) => json!({"StatusCode": code, "Error": null}),
            Err(e) => json!({"StatusCode": -1, "Error": {"Message": e.to_string()}}),
        };
        let _ = tx.send(Ok(Bytes::from(format!("{body}\n")))).await;
    });
    // Headers flush at once (the client waits for them before it starts the container).
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel_body(rx))
        .expect("static response parts"))
}

async fn attach(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let r = api.engine.get(id)?;
    let stream = req.flag("stream")?;
    let (stdin, stdout, stderr) = (req.flag("stdin")?, req.flag("stdout")?, req.flag("stderr")?);
    let logs = req.flag("logs")?;
    let _ = (stream, logs);
    let tty = r.config.tty;
    let opts = StreamOpts {
        stdin: stdin && r.config.open_stdin,
        stdout,
        stderr: stderr && !tty,
        tty,
    };
    if !opts.stdin && !opts.stdout && !opts.stderr {
        return Err(ApiError::bad(
            "attach needs at least one of stdin, stdout, stderr",
        ));
    }
    let handle = api.engine.attach(&r.id, opts).await?;
    hijack::serve(req, tty, move |conn| async move {
        match handle.session().await {
            Ok(mut s) => {
                let streams =
                    hijack::Streams::pipes(s.stdin.take(), s.stdout.take(), s.stderr.take());
                // Output ends when the container does; its exit is recorded by then or soon.
                let exited = async move {
                    let _ = s.wait().await;
                };
                conn.pump(streams, tty, exited).await;
            }
            Err(e) => conn.fail(&e.to_string(), tty).await,
        }
    })
}

async fn logs(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let r = api.engine.get(id)?;
    let opts = LogOptions {
        stdout: req.flag("stdout")?,
        stderr: req.flag("stderr")?,
        since_ns: super::system::parse_time(req.q("since"))?.filter(|s| *s > 0),
        until_ns: super::system::parse_time(req.q("until"))?.filter(|s| *s > 0),
        tail: match req.q("tail") {
            "" | "all" => None,
            n => Some(
                n.parse()
                    .map_err(|_| ApiError::bad(format!("invalid tail {n:?}")))?,
            ),
        },
        follow: req.flag("follow")?,
    };
    if !opts.stdout && !opts.stderr {
        return Err(ApiError::bad("You must choose at least one stream"));
    }
    let timestamps = req.flag("timestamps")?;
    let tty = r.config.tty;
    let engine = api.engine.clone();
    let cid = r.id.clone();
    let mut entries =
        crate::engine::logs::stream(r.log_path.clone(), opts, move || engine.is_running(&cid));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(e) = entries.recv().await {
            let chunk = match e {
                Ok(e) => {
                    let mut payload = Vec::with_capacity(e.bytes.len() + 32);
                    if timestamps {
                        payload.extend_from_slice(api::time::rfc3339_nano(e.time_ns).as_bytes());
                        payload.push(b' ');
                    }
                    payload.extend_from_slice(&e.bytes);
                    if tty {
                        Ok(Bytes::from(payload))
                    } else {
                        let kind = match e.stream {
                            Stream::Stdout => 1,
                            Stream::Stderr => 2,
                        };
                        Ok(hijack::frame(kind, &payload))
                    }
                }
                Err(e) => Err(e),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let content_type = if tty {
        "application/vnd.docker.raw-stream"
    } else {
        "application/vnd.docker.multiplexed-stream"
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(channel_body(rx))
        .expect("static response parts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_both_forms() {
        let list =
            Filters::parse(r#"{"status":["running","exited"],"label":["a=b"]}"#).expect("list");
        assert_eq!(list.get("status").len(), 2);
        let map = Filters::parse(r#"{"label":{"a=b":true,"c":true}}"#).expect("map");
        assert_eq!(map.get("label").len(), 2);
        let labels = BTreeMap::from([
            ("a".to_owned(), "b".to_owned()),
            ("c".to_owned(), "x".to_owned()),
        ]);
        assert!(map.labels(&labels));
        let other = BTreeMap::from([("a".to_owned(), "z".to_owned())]);
        assert!(!map.labels(&other));
        assert!(Filters::parse("").expect("empty").get("x").is_empty());
        assert!(Filters::parse("{not json").is_err());
        assert!(Filters::parse(r#"{"a": 3}"#).is_err());
    }
}
