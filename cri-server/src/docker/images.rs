//! `/images/…`: list, pull (`create?fromImage=`), push, inspect, remove; the archive side (tag,
//! history, save, load, import) is in `image_archive`.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use serde_json::{Value, json};

use super::containers::Filters;
use super::image_archive;
use super::{Api, ApiError, ApiResult, Req, channel_body, json};
use crate::error::Error;
use crate::image::store::NamedImage;

/// `docker.io/library/busybox:latest` → `busybox:latest`, as docker shows names.
pub(crate) fn familiar(reference: &str) -> String {
    let r = reference
        .strip_prefix("docker.io/")
        .map(|r| r.strip_prefix("library/").unwrap_or(r))
        .unwrap_or(reference);
    r.to_owned()
}

fn created_secs(config: &Value) -> i64 {
    config["created"]
        .as_str()
        .and_then(api::time::parse_rfc3339)
        .map_or(0, |ns| ns / 1_000_000_000)
}

fn labels(config: &Value) -> Value {
    match &config["config"]["Labels"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({}),
    }
}

fn repo_digests(i: &NamedImage) -> Vec<String> {
    i.digests.iter().map(|d| familiar(d)).collect()
}

fn summary(api: &Api, i: &NamedImage) -> Value {
    let config = api.engine.images().config_json(i).unwrap_or(Value::Null);
    json!({
        "Id": i.record.id.to_string(),
        "ParentId": "",
        "RepoTags": i.tags.iter().map(|t| familiar(t)).collect::<Vec<_>>(),
        "RepoDigests": repo_digests(i),
        "Created": created_secs(&config),
        "Size": i.record.size,
        "SharedSize": -1,
        "VirtualSize": i.record.size,
        "Labels": labels(&config),
        "Containers": -1,
    })
}

fn inspect(api: &Api, i: &NamedImage) -> Value {
    let config = api.engine.images().config_json(i).unwrap_or(Value::Null);
    json!({
        "Id": i.record.id.to_string(),
        "RepoTags": i.tags.iter().map(|t| familiar(t)).collect::<Vec<_>>(),
        "RepoDigests": repo_digests(i),
        "Parent": "",
        "Comment": config["comment"].as_str().unwrap_or(""),
        "Created": config["created"].as_str().unwrap_or("0001-01-01T00:00:00Z"),
        "DockerVersion": "",
        "Author": config["author"].as_str().unwrap_or(""),
        "Config": config["config"],
        "Architecture": config["architecture"],
        "Variant": config["variant"],
        "Os": config["os"],
        "Size": i.record.size,
        "VirtualSize": i.record.size,
        "GraphDriver": {"Name": "overlayfs", "Data": null},
        "RootFS": {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]},
        "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
    })
}

fn find(api: &Api, name: &str) -> Result<NamedImage, ApiError> {
    api.engine
        .images()
        .resolve(name)?
        .ok_or_else(|| ApiError::not_found(format!("No such image: {name}")))
}

/// Splits `/images/<name>/<action>`: a name may hold slashes (`127.0.0.1:5000/a/b:1`).
fn split_name(rest: &str, method: &Method) -> (String, String) {
    const ACTIONS: [&str; 5] = ["json", "tag", "history", "push", "get"];
    if *method != Method::DELETE
        && let Some((name, action)) = rest.rsplit_once('/')
        && ACTIONS.contains(&action)
    {
        return (name.to_owned(), action.to_owned());
    }
    (rest.to_owned(), String::new())
}

pub(super) async fn route(api: &Arc<Api>, req: Req) -> ApiResult {
    let rest = req
        .path
        .trim_end_matches('/')
        .strip_prefix("/images")
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let m = req.method.clone();
    match (m.as_str(), rest.as_str()) {
        ("GET", "json") => list(api, req),
        ("POST", "create") => create(api, req).await,
        ("GET", "get") => image_archive::save(api, req.q_all("names")),
        ("POST", "load") => image_archive::load(api, req).await,
        ("POST", "prune") => prune(api, req).await,
        _ => {
            let (name, action) = split_name(&rest, &m);
            match (m.as_str(), action.as_str()) {
                ("GET", "json") => json(StatusCode::OK, &inspect(api, &find(api, &name)?)),
                ("DELETE", "") => remove(api, &name, req).await,
                ("POST", "tag") => image_archive::tag(api, &name, &req),
                ("GET", "history") => image_archive::history(api, &find(api, &name)?),
                ("GET", "get") => image_archive::save(api, vec![name]),
                ("POST", "push") => push(api, &name, req).await,
                _ => Err(ApiError::not_found("page not found")),
            }
        }
    }
}

fn list(api: &Arc<Api>, req: Req) -> ApiResult {
    let filters = Filters::parse(req.q("filters"))?;
    // Build steps' images stay out of sight unless `-a` asks, as docker's intermediates do.
    let hidden = if req.flag("all")? {
        Default::default()
    } else {
        api.builder.cache().images()?
    };
    let mut out = Vec::new();
    for i in api.engine.images().list()? {
        if i.tags.is_empty() && i.digests.is_empty() && hidden.contains(&i.record.id) {
            continue;
        }
        let tags: Vec<String> = i.tags.iter().map(|t| familiar(t)).collect();
        let reference_ok = filters.all("reference", |pattern| {
            tags.iter().any(|t| {
                let repo = t.rsplit_once(':').map_or(t.as_str(), |(r, _)| r);
                t == pattern || repo == pattern
            })
        });
        let dangling_ok = filters.all("dangling", |v| (v == "true") == i.tags.is_empty());
        if reference_ok && dangling_ok {
            out.push(summary(api, &i));
        }
    }
    json(StatusCode::OK, &out)
}

/// `POST /images/prune`: images without a name (`dangling`, the default), or with
/// `dangling=false` (docker's `image prune -a`) every image, that no container uses, docker's
/// or a CRI pod's.
async fn prune(api: &Arc<Api>, req: Req) -> ApiResult {
    let filters = Filters::parse(req.q("filters"))?;
    for key in filters.keys() {
        if !matches!(key.as_str(), "dangling" | "label") {
            return Err(ApiError::bad(format!("invalid filter '{key}'")));
        }
    }
    let only_dangling = filters
        .get("dangling")
        .iter()
        .all(|v| !matches!(v.as_str(), "false" | "0"));
    let mut used: std::collections::HashSet<String> =
        api.engine.list()?.into_iter().map(|r| r.image_id).collect();
    used.extend(
        api.engine
            .containers()
            .list()
            .await?
            .into_iter()
            .map(|o| o.record.image_id),
    );
    // The build cache's images are not dangling: `builder prune` is what removes them.
    let cached = api.builder.cache().images()?;
    let mut deleted = Vec::new();
    let mut reclaimed: u64 = 0;
    for i in api.engine.images().list()? {
        let id = i.record.id.to_string();
        if used.contains(&id)
            || (only_dangling && (!i.tags.is_empty() || cached.contains(&i.record.id)))
        {
            continue;
        }
        let config = api.engine.images().config_json(&i).unwrap_or(Value::Null);
        let image_labels = labels(&config);
        let labels_ok = filters.all("label", |v| {
            let (k, want) = v.split_once('=').unwrap_or((v, ""));
            image_labels
                .get(k)
                .and_then(Value::as_str)
                .is_some_and(|got| want.is_empty() || got == want)
        });
        if !labels_ok {
            continue;
        }
        match api.engine.images().remove(&id).await {
            Ok(()) => {}
            // Gone meanwhile: nothing to reclaim.
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        }
        for t in i.tags.iter().chain(&i.digests) {
            deleted.push(json!({"Untagged": familiar(t)}));
        }
        deleted.push(json!({"Deleted": id}));
        reclaimed = reclaimed.saturating_add(i.record.size);
        api.engine.events.emit(
            "image",
            "delete",
            &id,
            std::collections::BTreeMap::from([("name".to_owned(), id.clone())]),
        );
    }
    json(
        StatusCode::OK,
        &json!({"ImagesDeleted": if deleted.is_empty() { Value::Null } else { Value::Array(deleted) }, "SpaceReclaimed": reclaimed}),
    )
}

/// The credentials of `X-Registry-Auth` (base64url JSON), as CRI's auth config.
fn registry_auth(req: &Req) -> Result<Option<api::cri::AuthConfig>, ApiError> {
    let Some(v) = base64_json_header(req, "X-Registry-Auth")? else {
        return Ok(None);
    };
    Ok(auth_of(&v))
}

/// A header holding base64 JSON, as docker's client sends credentials.
fn base64_json_header(req: &Req, name: &str) -> Result<Option<Value>, ApiError> {
    let Some(h) = req.inner.headers().get(name) else {
        return Ok(None);
    };
    let raw = h.as_bytes();
    if raw.is_empty() {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::URL_SAFE
        .decode(raw)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(raw))
        .map_err(|_| ApiError::bad(format!("invalid {name} header")))?;
    Ok(Some(
        serde_json::from_slice(&decoded).unwrap_or(Value::Null),
    ))
}

/// One of docker's AuthConfig objects, if it holds credentials (`auth` is base64
/// `user:password`, as the config file keeps it).
fn auth_of(v: &Value) -> Option<api::cri::AuthConfig> {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let mut auth = api::cri::AuthConfig {
        username: s("username"),
        password: s("password"),
        server_address: s("serveraddress"),
        identity_token: s("identitytoken"),
        registry_token: s("registrytoken"),
        ..Default::default()
    };
    if auth.username.is_empty()
        && let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(s("auth"))
        && let Some((u, p)) = String::from_utf8_lossy(&pair).split_once(':')
    {
        auth.username = u.to_owned();
        auth.password = p.to_owned();
    }
    (!auth.username.is_empty()
        || !auth.identity_token.is_empty()
        || !auth.registry_token.is_empty())
    .then_some(auth)
}

/// `X-Registry-Config` (a build's credentials for its base images): registry host → auth.
pub(super) fn registry_config(
    req: &Req,
) -> Result<std::collections::BTreeMap<String, api::cri::AuthConfig>, ApiError> {
    let Some(Value::Object(m)) = base64_json_header(req, "X-Registry-Config")? else {
        return Ok(Default::default());
    };
    Ok(m.iter()
        .filter_map(|(server, v)| {
            let host = server
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            // docker's config names docker.io by its old index URL.
            let host = match host {
                "index.docker.io" | "registry-1.docker.io" => "docker.io",
                h => h,
            };
            Some((host.to_owned(), auth_of(v)?))
        })
        .collect())
}

async fn create(api: &Arc<Api>, req: Req) -> ApiResult {
    if !req.q("fromSrc").is_empty() {
        return image_archive::import(api, req).await;
    }
    let from = req.q("fromImage").to_owned();
    if from.is_empty() {
        return Err(ApiError::bad("fromImage or fromSrc is required"));
    }
    let tag = req.q("tag");
    let reference = if tag.is_empty() || from.contains('@') {
        from.clone()
    } else if tag.starts_with("sha256:") {
        format!("{from}@{tag}")
    } else {
        format!("{from}:{tag}")
    };
    let auth = registry_auth(&req)?;
    let images = api.engine.images().clone();
    let events = api.engine.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let line = |v: Value| Ok::<_, std::io::Error>(Bytes::from(format!("{v}\n")));
    let shown_tag = if tag.is_empty() { "latest" } else { tag }.to_owned();
    tokio::spawn(async move {
        let _ = tx
            .send(line(json!({"status": format!("Pulling from {}", familiar_repo(&from)), "id": shown_tag})))
            .await;
        match images.pull(&reference, auth.as_ref()).await {
            Ok(id) => {
                let named = images.resolve(&reference).ok().flatten();
                if let Some(d) = named
                    .as_ref()
                    .and_then(|n| n.record.manifest_digest.to_string().into())
                {
                    let _ = tx
                        .send(line(json!({"status": format!("Digest: {d}")})))
                        .await;
                }
                let _ = tx
                    .send(line(json!({"status": format!("Status: Downloaded newer image for {}", familiar(&normalized(&reference)))})))
                    .await;
                let mut attributes = std::collections::BTreeMap::new();
                attributes.insert("name".to_owned(), familiar(&normalized(&reference)));
                events
                    .events
                    .emit("image", "pull", &id.to_string(), attributes);
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = tx
                    .send(line(json!({"errorDetail": {"message": msg}, "error": msg})))
                    .await;
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel_body(rx))
        .expect("static response parts"))
}

/// docker's progress bar: `[=====>     ]  1.2MB/4.3MB`.
fn progress_bar(current: u64, total: u64) -> String {
    const WIDTH: usize = 50;
    let filled = if total == 0 {
        WIDTH
    } else {
        ((current.min(total) as f64 / total as f64) * WIDTH as f64) as usize
    };
    let arrow = if filled < WIDTH { ">" } else { "" };
    format!(
        "[{}{arrow}{}]  {}/{}",
        "=".repeat(filled),
        " ".repeat(WIDTH - filled - arrow.len()),
        human_size(current),
        human_size(total)
    )
}

/// go-units' HumanSize: decimal units, 3 significant digits, as docker's progress shows.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{}", UNITS[i])
}

/// The references `POST /images/{name}/push` means: `name:tag` (or `name@tag` for a digest),
/// the reference in `name` itself, or, with neither, every tag of the repository here
/// (docker's `push --all-tags`).
fn push_targets(api: &Api, name: &str, tag: &str) -> Result<Vec<String>, ApiError> {
    let last = name.rsplit('/').next().unwrap_or(name);
    if !tag.is_empty() {
        let sep = if tag.starts_with("sha256:") { '@' } else { ':' };
        return Ok(vec![format!("{name}{sep}{tag}")]);
    }
    if last.contains([':', '@']) {
        return Ok(vec![name.to_owned()]);
    }
    let repo = crate::image::reference::Reference::parse(name)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let mut out = Vec::new();
    for i in api.engine.images().list()? {
        for t in &i.tags {
            if let Ok(r) = crate::image::reference::Reference::parse(t)
                && r.registry == repo.registry
                && r.repository == repo.repository
            {
                out.push(t.clone());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `POST /images/{name}/push?tag=`: docker's JSON progress lines, per layer by the first 12
/// hex digits of its digest, then the digest line and an `aux` record per pushed tag.
async fn push(api: &Arc<Api>, name: &str, req: Req) -> ApiResult {
    let auth = registry_auth(&req)?;
    let targets = push_targets(api, name, req.q("tag"))?;
    let repo = crate::image::reference::Reference::parse(name)
        .map_err(|e| ApiError::bad(format!("invalid reference format: {e}")))?;
    let missing = || {
        let shown = familiar(&format!("{}/{}", repo.registry, repo.repository));
        ApiError::not_found(format!(
            "An image does not exist locally with the tag: {shown}"
        ))
    };
    if targets.is_empty() {
        return Err(missing());
    }
    for t in &targets {
        if api.engine.images().resolve(t)?.is_none() {
            return Err(missing());
        }
    }
    let images = api.engine.images().clone();
    let engine = api.engine.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let line = |v: Value| Ok::<_, std::io::Error>(Bytes::from(format!("{v}\n")));
    let full_name = format!("{}/{}", repo.registry, repo.repository);
    tokio::spawn(async move {
        let _ = tx
            .send(line(
                json!({"status": format!("The push refers to repository [{full_name}]")}),
            ))
            .await;
        for target in targets {
            let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
            let pushing = {
                let images = images.clone();
                let target = target.clone();
                let auth = auth.clone();
                tokio::spawn(async move {
                    images
                        .push(&target, &target, auth.as_ref(), Some(etx))
                        .await
                })
            };
            let short = |d: &api::Digest| d.hex()[..12].to_owned();
            while let Some(ev) = erx.recv().await {
                use crate::image::push::PushEvent as E;
                let v = match ev {
                    E::Preparing { digest, .. } => {
                        json!({"status": "Preparing", "progressDetail": {}, "id": short(&digest)})
                    }
                    E::Progress {
                        digest,
                        sent,
                        total,
                    } => json!({
                        "status": "Pushing",
                        "progressDetail": {"current": sent, "total": total},
                        "progress": progress_bar(sent, total),
                        "id": short(&digest),
                    }),
                    E::Pushed { digest } => {
                        json!({"status": "Pushed", "progressDetail": {}, "id": short(&digest)})
                    }
                    E::Exists { digest } => json!({
                        "status": "Layer already exists", "progressDetail": {}, "id": short(&digest)
                    }),
                    E::Mounted { digest, from } => json!({
                        "status": format!("Mounted from {from}"),
                        "progressDetail": {},
                        "id": short(&digest),
                    }),
                };
                let _ = tx.send(line(v)).await;
            }
            let pushed = pushing
                .await
                .unwrap_or_else(|e| Err(Error::Internal(format!("push task failed: {e}"))));
            match pushed {
                Ok(p) => {
                    let tag = p.tag.clone().unwrap_or_default();
                    let shown = if tag.is_empty() {
                        p.digest.to_string()
                    } else {
                        tag.clone()
                    };
                    let _ = tx
                        .send(line(json!({"status": format!("{shown}: digest: {} size: {}", p.digest, p.size)})))
                        .await;
                    let _ = tx
                        .send(line(json!({"progressDetail": {}, "aux": {"Tag": tag, "Digest": p.digest.to_string(), "Size": p.size}})))
                        .await;
                    let attributes = std::collections::BTreeMap::from([(
                        "name".to_owned(),
                        familiar(&p.reference),
                    )]);
                    engine
                        .events
                        .emit("image", "push", &familiar(&p.reference), attributes);
                }
                Err(e) => {
                    let msg = e.to_string();
                    let _ = tx
                        .send(line(json!({"errorDetail": {"message": msg}, "error": msg})))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel_body(rx))
        .expect("static response parts"))
}

fn normalized(reference: &str) -> String {
    crate::image::reference::Reference::parse(reference)
        .map(|r| r.to_string())
        .unwrap_or_else(|_| reference.to_owned())
}

fn familiar_repo(from: &str) -> String {
    let n = familiar(&normalized(from));
    n.split(['@', ':'])
        .next()
        .map(|s| {
            if s.contains('/') {
                s.to_owned()
            } else {
                format!("library/{s}")
            }
        })
        .unwrap_or(n)
}

async fn remove(api: &Arc<Api>, name: &str, req: Req) -> ApiResult {
    let force = req.flag("force")?;
    let image = find(api, name)?;
    // One name of several: only that name goes, as docker's rmi does.
    if let Some(tag) = api.engine.images().untag_if_shared(name)? {
        let attributes = std::collections::BTreeMap::from([("name".to_owned(), familiar(&tag))]);
        api.engine
            .events
            .emit("image", "untag", &image.record.id.to_string(), attributes);
        return json(StatusCode::OK, &json!([{"Untagged": familiar(&tag)}]));
    }
    // By id (not by one of its names) an image with several repositories goes only with -f.
    let by_name = image
        .tags
        .iter()
        .chain(&image.digests)
        .any(|t| familiar(t) == name || *t == name || familiar(t) == format!("{name}:latest"));
    let repos: std::collections::BTreeSet<&str> = image
        .tags
        .iter()
        .map(|t| t.rsplit_once(':').map_or(t.as_str(), |(r, _)| r))
        .collect();
    if !force && !by_name && repos.len() > 1 {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
                &image.record.id.hex()[..12]
            ),
        });
    }
    let users: Vec<String> = api
        .engine
        .list()?
        .into_iter()
        .filter(|r| r.image_id == image.record.id.to_string())
        .map(|r| r.id)
        .collect();
    if let Some(user) = users.first()
        && !force
    {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "conflict: unable to remove repository reference \"{name}\" (must force) - container {} is using its referenced image {}",
                &user[..12],
                &image.record.id.hex()[..12]
            ),
        });
    }
    api.engine
        .images()
        .remove(&image.record.id.to_string())
        .await?;
    let mut out: Vec<Value> = image
        .tags
        .iter()
        .chain(&image.digests)
        .map(|t| json!({"Untagged": familiar(t)}))
        .collect();
    out.push(json!({"Deleted": image.record.id.to_string()}));
    let mut attributes = std::collections::BTreeMap::new();
    attributes.insert("name".to_owned(), name.to_owned());
    api.engine
        .events
        .emit("image", "delete", &image.record.id.to_string(), attributes);
    json(StatusCode::OK, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_the_way_docker_shows_them() {
        assert_eq!(
            familiar("docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(familiar("docker.io/me/app:1"), "me/app:1");
        assert_eq!(
            familiar("127.0.0.1:5000/busybox:latest"),
            "127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(
            split_name("127.0.0.1:5000/a/b:1/json", &Method::GET),
            ("127.0.0.1:5000/a/b:1".to_owned(), "json".to_owned())
        );
        assert_eq!(
            split_name("127.0.0.1:5000/app/push", &Method::POST),
            ("127.0.0.1:5000/app".to_owned(), "push".to_owned())
        );
        assert_eq!(
            split_name("busybox:latest", &Method::DELETE),
            ("busybox:latest".to_owned(), String::new())
        );
    }

    #[test]
    fn push_progress_looks_like_dockers() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_000), "1kB");
        assert_eq!(human_size(1_234_567), "1.23MB");
        assert_eq!(human_size(12_345_678), "12.3MB");
        assert_eq!(human_size(123_456_789), "123MB");
        let half = progress_bar(50, 100);
        assert_eq!(
            half,
            format!("[{}>{}]  50B/100B", "=".repeat(25), " ".repeat(24))
        );
        assert_eq!(
            progress_bar(100, 100),
            format!("[{}]  100B/100B", "=".repeat(50))
        );
    }
}
