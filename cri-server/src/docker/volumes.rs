//! `/volumes/…`: list (filters), create, inspect, remove, prune, in docker's shapes.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::containers::Filters;
use super::{Api, ApiError, ApiResult, Req, json, status};
use crate::engine::volumes::{ANONYMOUS_LABEL, VolumeRecord, VolumeSpec};
use crate::error::Error;

/// Docker's `Volume` object.
fn volume_json(v: &VolumeRecord) -> Value {
    json!({
        "Name": v.name,
        "Driver": v.driver,
        "Mountpoint": v.mountpoint,
        "CreatedAt": rfc3339_secs(v.created_ns),
        "Labels": v.labels,
        "Scope": "local",
        "Options": v.options,
    })
}

/// Docker shows volume times to the second.
fn rfc3339_secs(ns: i64) -> String {
    let s = api::time::rfc3339_nano(ns);
    match s.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => s,
    }
}

pub(super) async fn route(api: &Arc<Api>, req: Req) -> ApiResult {
    let rest = req
        .path
        .trim_end_matches('/')
        .strip_prefix("/volumes")
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    match (req.method.as_str(), rest.as_str()) {
        ("GET", "") => list(api, &req),
        ("POST", "create") => create(api, req).await,
        ("POST", "prune") => prune(api, &req).await,
        ("GET", name) if !name.contains('/') => {
            json(StatusCode::OK, &volume_json(&api.engine.volume(name)?))
        }
        ("DELETE", name) if !name.contains('/') => {
            let force = req.flag("force")?;
            let (engine, name) = (api.engine.clone(), name.to_owned());
            // Removing a volume removes its data: disk work, off the async workers.
            tokio::task::spawn_blocking(move || engine.remove_volume(&name, force))
                .await
                .map_err(|e| Error::Internal(format!("volume thread: {e}")))??;
            status(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::not_found("page not found")),
    }
}

fn list(api: &Arc<Api>, req: &Req) -> ApiResult {
    let filters = Filters::parse(req.q("filters"))?;
    for k in filters_keys(&filters) {
        if !matches!(k.as_str(), "name" | "label" | "dangling" | "driver") {
            return Err(ApiError::bad(format!("invalid filter '{k}'")));
        }
    }
    let dangling = match filters.get("dangling") {
        [] => None,
        [v] => Some(parse_dangling(v)?),
        _ => return Err(ApiError::bad("invalid filter 'dangling': too many values")),
    };
    let used = api.engine.volumes_in_use()?;
    let out: Vec<Value> = api
        .engine
        .volumes()?
        .iter()
        .filter(|v| {
            filters.all("name", |n| v.name.contains(n))
                && filters.all("driver", |d| v.driver == d)
                && filters.labels(&v.labels)
                && dangling.is_none_or(|d| d != used.contains(&v.name))
        })
        .map(volume_json)
        .collect();
    json(StatusCode::OK, &json!({"Volumes": out, "Warnings": []}))
}

fn filters_keys(f: &Filters) -> Vec<String> {
    f.keys().cloned().collect()
}

fn parse_dangling(v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::bad(format!(
            "invalid filter 'dangling={v}': must be true, false, 1 or 0"
        ))),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    driver: String,
    driver_opts: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

async fn create(api: &Arc<Api>, req: Req) -> ApiResult {
    let body: CreateBody = req.json().await?;
    let v = api.engine.create_volume(VolumeSpec {
        name: body.name,
        driver: body.driver,
        labels: body.labels,
        options: body.driver_opts,
    })?;
    json(StatusCode::CREATED, &volume_json(&v))
}

async fn prune(api: &Arc<Api>, req: &Req) -> ApiResult {
    let filters = Filters::parse(req.q("filters"))?;
    for k in filters_keys(&filters) {
        if !matches!(k.as_str(), "label" | "label!" | "all") {
            return Err(ApiError::bad(format!("invalid filter '{k}'")));
        }
    }
    // Since API 1.42 prune takes only anonymous volumes unless `all` is set.
    let all = match filters.get("all") {
        [] => false,
        [v] => parse_dangling(v).map_err(|_| ApiError::bad(format!("invalid filter 'all={v}'")))?,
        _ => return Err(ApiError::bad("invalid filter 'all': too many values")),
    };
    let not_labels: Vec<String> = filters.get("label!").to_vec();
    let engine = api.engine.clone();
    let (deleted, bytes) = tokio::task::spawn_blocking(move || {
        engine.prune_volumes(|v| {
            let anonymous = v.anonymous || v.labels.contains_key(ANONYMOUS_LABEL);
            (all || anonymous)
                && filters.labels(&v.labels)
                && !not_labels.iter().any(|l| {
                    let (k, want) = match l.split_once('=') {
                        Some((k, w)) => (k, Some(w)),
                        None => (l.as_str(), None),
                    };
                    v.labels
                        .get(k)
                        .is_some_and(|got| want.is_none_or(|w| w == got))
                })
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("volume thread: {e}")))??;
    json(
        StatusCode::OK,
        &json!({"VolumesDeleted": deleted, "SpaceReclaimed": bytes}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_times_are_whole_seconds() {
        assert_eq!(
            rfc3339_secs(1_475_713_029_669_794_202),
            "2016-10-06T00:17:09Z"
        );
    }
}
