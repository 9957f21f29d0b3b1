//! `/networks/…`: list, inspect, create, remove, prune, connect, disconnect, in docker's
//! JSON shapes. The networks themselves are the engine's (engine/networks.rs).

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::containers::Filters;
use super::{Api, ApiError, ApiResult, Req, json, status};
use crate::engine::networks::{NetworkRecord, NetworkSpec};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct IpamConfig {
    subnet: String,
    gateway: String,
    #[serde(rename = "IPRange")]
    ip_range: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct Ipam {
    driver: String,
    config: Vec<IpamConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    driver: String,
    #[serde(rename = "IPAM")]
    ipam: Ipam,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    internal: bool,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct EndpointConfig {
    aliases: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ConnectBody {
    container: String,
    endpoint_config: EndpointConfig,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    force: bool,
}

pub(super) async fn route(api: &Arc<Api>, req: Req) -> ApiResult {
    let rest = req
        .path
        .trim_end_matches('/')
        .strip_prefix("/networks")
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let m = req.method.clone();
    let (name, action) = match rest.split_once('/') {
        Some((n, a)) => (n.to_owned(), a.to_owned()),
        None => (rest.clone(), String::new()),
    };
    match (m.as_str(), name.as_str(), action.as_str()) {
        ("GET", "", "") => list(api, req),
        ("POST", "create", "") => create(api, req).await,
        ("POST", "prune", "") => prune(api, req).await,
        ("GET", id, "") => {
            let n = api.engine.network(id)?;
            json(StatusCode::OK, &network_json(api, &n, true))
        }
        ("DELETE", id, "") => {
            api.engine.remove_network(id).await?;
            status(StatusCode::NO_CONTENT)
        }
        ("POST", id, "connect") => {
            let id = id.to_owned();
            let body: ConnectBody = req.json().await?;
            if body.container.is_empty() {
                return Err(ApiError::bad("connect needs a Container"));
            }
            api.engine
                .connect(&id, &body.container, body.endpoint_config.aliases)
                .await?;
            status(StatusCode::OK)
        }
        ("POST", id, "disconnect") => {
            let id = id.to_owned();
            let body: ConnectBody = req.json().await?;
            if body.container.is_empty() {
                return Err(ApiError::bad("disconnect needs a Container"));
            }
            api.engine
                .disconnect(&id, &body.container, body.force)
                .await?;
            status(StatusCode::OK)
        }
        _ => Err(ApiError::not_found("page not found")),
    }
}

fn list(api: &Arc<Api>, req: Req) -> ApiResult {
    let f = Filters::parse(req.q("filters"))?;
    let out: Vec<Value> = api
        .engine
        .networks()?
        .iter()
        .filter(|n| {
            // As docker: `name` matches a part of the name, `id` a prefix of the id.
            f.all("name", |v| n.name.contains(v))
                && f.all("id", |v| n.id.starts_with(v))
                && f.all("driver", |v| n.driver == v)
                && f.all("type", |v| match v {
                    "builtin" => n.is_predefined(),
                    "custom" => !n.is_predefined(),
                    _ => false,
                })
                && f.labels(&n.labels)
        })
        .map(|n| network_json(api, n, false))
        .collect();
    json(StatusCode::OK, &out)
}

/// docker's network JSON; with `containers`, the running containers on it.
fn network_json(api: &Api, n: &NetworkRecord, with_containers: bool) -> Value {
    let mut containers = serde_json::Map::new();
    if with_containers && let Ok(on) = api.engine.network_containers(&n.id) {
        for (r, a) in on {
            containers.insert(
                r.id.clone(),
                json!({
                    "Name": r.name,
                    "EndpointID": endpoint_id(&r.id, &n.id),
                    "MacAddress": a.mac,
                    "IPv4Address": if a.ip.is_empty() { String::new() } else { format!("{}/{}", a.ip, a.prefix) },
                    "IPv6Address": "",
                }),
            );
        }
    }
    let config: Vec<Value> = if n.subnet.is_empty() {
        Vec::new()
    } else {
        vec![json!({"Subnet": n.subnet, "Gateway": n.gateway})]
    };
    let created = if n.created_ns == 0 {
        "0001-01-01T00:00:00Z".to_owned()
    } else {
        api::time::rfc3339_nano(n.created_ns)
    };
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": created,
        "Scope": "local",
        "Driver": n.driver,
        "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Options": null, "Config": config},
        "Internal": n.internal,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": containers,
        "Options": n.options,
        "Labels": n.labels,
    })
}

/// The endpoint id docker shows: one per container and network, stable.
pub(super) fn endpoint_id(container: &str, network: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("{container}/{network}")))
}

async fn create(api: &Arc<Api>, req: Req) -> ApiResult {
    let body: CreateBody = req.json().await?;
    if body.name.is_empty() {
        return Err(ApiError::bad("network name is required"));
    }
    if body.enable_ipv6 == Some(true) {
        return Err(ApiError::bad("berth's networks are IPv4 only"));
    }
    if !matches!(body.ipam.driver.as_str(), "" | "default") {
        return Err(ApiError::not_found(format!(
            "plugin \"{}\" not found",
            body.ipam.driver
        )));
    }
    if body.ipam.config.len() > 1 {
        return Err(ApiError::bad("berth's networks take one IPAM config"));
    }
    let ipam = body.ipam.config.into_iter().next().unwrap_or_default();
    if !ipam.ip_range.is_empty() {
        return Err(ApiError::bad("IPAM IPRange is not supported by berth"));
    }
    if ipam.subnet.is_empty() && !ipam.gateway.is_empty() {
        return Err(ApiError::bad("a gateway needs a subnet"));
    }
    let n = api
        .engine
        .create_network(NetworkSpec {
            name: body.name,
            driver: body.driver,
            subnet: (!ipam.subnet.is_empty()).then_some(ipam.subnet),
            gateway: (!ipam.gateway.is_empty()).then_some(ipam.gateway),
            internal: body.internal,
            labels: body.labels,
        })
        .await?;
    json(StatusCode::CREATED, &json!({"Id": n.id, "Warning": ""}))
}

async fn prune(api: &Arc<Api>, req: Req) -> ApiResult {
    let f = Filters::parse(req.q("filters"))?;
    let deleted = api.engine.prune_networks(|n| !f.labels(&n.labels)).await?;
    json(StatusCode::OK, &json!({"NetworksDeleted": deleted}))
}
