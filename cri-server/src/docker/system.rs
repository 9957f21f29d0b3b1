//! `/_ping`, `/version`, `/info`, `/events`.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use serde_json::json;

use super::{API_VERSION, Api, ApiError, ApiResult, Req, channel_body, full, json};
use crate::engine::Status;
use crate::engine::events::EngineEvent;

const MIN_API_VERSION: &str = "1.24";

pub(super) fn ping(method: &Method) -> ApiResult {
    let body = if method == Method::HEAD { "" } else { "OK" };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("Api-Version", API_VERSION)
        .header("OSType", "linux")
        .header("Builder-Version", "1")
        .header("Docker-Experimental", "false")
        .header(header::CACHE_CONTROL, "no-cache, no-store, must-revalidate")
        .header(header::PRAGMA, "no-cache")
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body))
        .expect("static response parts"))
}

fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub(super) fn version() -> ApiResult {
    let v = env!("CARGO_PKG_VERSION");
    json(
        StatusCode::OK,
        &json!({
            "Platform": {"Name": "berth"},
            "Components": [{"Name": "Engine", "Version": v, "Details": {
                "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux",
                "Arch": arch(), "KernelVersion": kernel()}}],
            "Version": v,
            "ApiVersion": API_VERSION,
            "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": "",
            "GoVersion": "",
            "Os": "linux",
            "Arch": arch(),
            "KernelVersion": kernel(),
            "BuildTime": "",
        }),
    )
}

pub(super) async fn info(api: &Arc<Api>) -> ApiResult {
    let all = api.engine.list()?;
    let count = |s: Status| all.iter().filter(|r| r.state.status == s).count();
    let images = api.engine.images().list()?.len();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cgroup_version = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "2"
    } else {
        "1"
    };
    json(
        StatusCode::OK,
        &json!({
            "ID": hostname,
            "Containers": all.len(),
            "ContainersRunning": count(Status::Running),
            "ContainersPaused": 0,
            "ContainersStopped": count(Status::Exited) + count(Status::Created),
            "Images": images,
            "Driver": "overlayfs",
            "DriverStatus": [],
            "DockerRootDir": api.root,
            "MemoryLimit": true,
            "SwapLimit": false,
            "CpuCfsPeriod": true,
            "CpuCfsQuota": true,
            "CPUShares": true,
            "PidsLimit": true,
            "IPv4Forwarding": true,
            "Debug": false,
            "NFd": 0,
            "NGoroutines": 0,
            "SystemTime": api::time::rfc3339_nano(crate::sandbox::now_ns()),
            "LoggingDriver": "json-file",
            "CgroupDriver": "cgroupfs",
            "CgroupVersion": cgroup_version,
            "KernelVersion": kernel(),
            "OperatingSystem": "berth",
            "OSType": "linux",
            "OSVersion": "",
            "Architecture": std::env::consts::ARCH,
            "NCPU": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "MemTotal": mem,
            "Name": hostname,
            "Labels": [],
            "ServerVersion": env!("CARGO_PKG_VERSION"),
            "Runtimes": {"berth": {"path": "berth-shim"}},
            "DefaultRuntime": "berth",
            "Plugins": {"Volume": ["local"], "Network": ["bridge", "host", "null"], "Log": ["json-file"]},
            "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": ["127.0.0.0/8"]},
            "SecurityOptions": ["name=seccomp,profile=builtin"],
            "Warnings": [],
        }),
    )
}

/// docker's event filters: `type`, `event`/`action`, `container`, `image`, `label`.
fn event_matches(e: &EngineEvent, filters: &super::containers::Filters) -> bool {
    let name = e.actor.attributes.get("name").map_or("", String::as_str);
    filters.all("type", |v| v == e.kind)
        && filters.all("event", |v| {
            v == e.action || e.action.starts_with(&format!("{v}:"))
        })
        && filters.all("action", |v| v == e.action)
        && filters.all("container", |v| {
            e.kind == "container"
                && (e.actor.id.starts_with(v) || name == v.trim_start_matches('/'))
        })
        && filters.all("image", |v| {
            e.actor.attributes.get("image").is_some_and(|i| i == v)
        })
        && filters.all("label", |v| {
            let (k, want) = v.split_once('=').unwrap_or((v, ""));
            e.actor
                .attributes
                .get(k)
                .is_some_and(|got| want.is_empty() || got == want)
        })
}

/// A docker time parameter: seconds (with an optional fraction) or RFC 3339; ns.
pub(super) fn parse_time(s: &str) -> Result<Option<i64>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(ns) = api::time::parse_rfc3339(s) {
        return Ok(Some(ns));
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs
        .parse()
        .map_err(|_| ApiError::bad(format!("invalid time {s:?}")))?;
    let mut nanos = 0i64;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return Err(ApiError::bad(format!("invalid time {s:?}")));
        }
        nanos += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
    }
    Ok(Some(secs * 1_000_000_000 + nanos))
}

pub(super) async fn events(api: &Arc<Api>, req: Req) -> ApiResult {
    let filters = super::containers::Filters::parse(req.q("filters"))?;
    let since = parse_time(req.q("since"))?;
    let until = parse_time(req.q("until"))?;
    let (past, mut rx) = api.engine.events.subscribe(since);
    let (tx, body_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let send = |e: &EngineEvent| {
            let mut line = serde_json::to_vec(e).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, std::io::Error>(Bytes::from(line))
        };
        for e in past.iter().filter(|e| event_matches(e, &filters)) {
            if until.is_some_and(|u| e.time_nano > u) {
                return;
            }
            if tx.send(send(e)).await.is_err() {
                return;
            }
        }
        loop {
            let deadline = until.map(|u| {
                let left = u - crate::sandbox::now_ns();
                std::time::Duration::from_nanos(u64::try_from(left).unwrap_or(0))
            });
            let next = match deadline {
                Some(d) => match tokio::time::timeout(d, rx.recv()).await {
                    Ok(n) => n,
                    Err(_) => return,
                },
                None => tokio::select! {
                    n = rx.recv() => n,
                    _ = tx.closed() => return,
                },
            };
            match next {
                Ok(e) if event_matches(&e, &filters) => {
                    if tx.send(send(&e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel_body(body_rx))
        .expect("static response parts"))
}
