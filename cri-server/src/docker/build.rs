//! `POST /build` (the classic builder's endpoint, as the docker client uses it with
//! `DOCKER_BUILDKIT=0`), `POST /build/prune` and `POST /commit`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::image_archive::body_to_file;
use super::{Api, ApiError, ApiResult, Req, json};
use crate::build::commit::CommitOptions;
use crate::build::{Options, Progress};
use crate::error::Error;
use crate::image::reference::Reference;

/// A JSON map of strings in a query parameter (`buildargs`, `labels`); null values are left
/// out, as docker treats them (an ARG named without a value).
fn string_map(req: &Req, key: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let raw = req.q(key);
    if raw.is_empty() {
        return Ok(BTreeMap::new());
    }
    let v: BTreeMap<String, Option<String>> =
        serde_json::from_str(raw).map_err(|e| ApiError::bad(format!("invalid {key}: {e}")))?;
    Ok(v.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
}

fn normalized(r: &str) -> Result<String, ApiError> {
    Reference::parse(r)
        .map(|r| r.to_string())
        .map_err(|e| ApiError::bad(format!("invalid reference format: {e}")))
}

/// `POST /build`: the body is the context (a tar, maybe compressed).
pub(super) async fn build(api: &Arc<Api>, req: Req) -> ApiResult {
    if !req.q("remote").is_empty() {
        return Err(ApiError {
            status: StatusCode::NOT_IMPLEMENTED,
            message: "remote build contexts are not supported by berth: send the context as a tar"
                .into(),
        });
    }
    let mut tags = Vec::new();
    for t in req.q_all("t") {
        normalized(&t)?;
        tags.push(t);
    }
    let network_mode = match req.q("networkmode") {
        "default" => String::new(),
        m => m.to_owned(),
    };
    let opts = Options {
        dockerfile: req.q("dockerfile").to_owned(),
        tags,
        build_args: string_map(&req, "buildargs")?,
        target: Some(req.q("target").to_owned()).filter(|t| !t.is_empty()),
        no_cache: req.flag("nocache")?,
        labels: string_map(&req, "labels")?,
        network_mode,
        pull: req.flag("pull")?,
        auths: super::images::registry_config(&req)?,
    };
    let quiet = req.flag("q")?;
    let upload = body_to_file(api, req).await?;
    let builder = api.builder.clone();
    let context = api.root.join("builds").join(format!(
        "context-{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let ctx = context.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&ctx).map_err(|e| Error::internal("create the context dir", e))?;
        let f = std::fs::File::open(&upload.0).map_err(|e| Error::internal("open upload", e))?;
        let extracted = snapshotter::unpack::extract_plain(f, &ctx);
        drop(upload);
        extracted.map(drop).map_err(|e| {
            Error::InvalidArgument(format!(
                "the build context is not a tar berth accepts: {}",
                crate::error::chain(&e)
            ))
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("context thread: {e}")))?
    .inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&context);
    })?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let body_tx = tx.clone();
    // A client that goes away cancels its build (docker's does too).
    let watcher = tokio::spawn(async move {
        body_tx.closed().await;
        let _ = cancel_tx.send(true);
    });
    tokio::spawn(async move {
        let (ptx, mut prx) = mpsc::channel(64);
        let build = builder.build(context.clone(), opts, ptx, cancel_rx);
        tokio::pin!(build);
        let send = |p: Progress| {
            let tx = tx.clone();
            async move {
                let v = match p {
                    Progress::Stream(_) if quiet => return,
                    Progress::Stream(s) => json!({ "stream": s }),
                    Progress::Aux(a) => json!({ "aux": a }),
                };
                let _ = tx.send(line(v)).await;
            }
        };
        let result = loop {
            tokio::select! {
                p = prx.recv() => match p {
                    Some(p) => send(p).await,
                    None => break (&mut build).await,
                },
                r = &mut build => break r,
            }
        };
        while let Ok(p) = prx.try_recv() {
            send(p).await;
        }
        let last = match result {
            Ok(id) if quiet => json!({ "stream": format!("{id}\n") }),
            Ok(_) => Value::Null,
            Err(f) => json!({
                "errorDetail": {"code": f.code, "message": f.message},
                "error": f.message,
            }),
        };
        if !last.is_null() {
            let _ = tx.send(line(last)).await;
        }
        let _ = tokio::fs::remove_dir_all(&context).await;
        watcher.abort();
    });
    Ok(http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(super::channel_body(rx))
        .expect("static response parts"))
}

/// `POST /build/prune`: the build cache, and the untagged images only it kept.
pub(super) async fn prune(api: &Arc<Api>) -> ApiResult {
    let (ids, bytes) = api.builder.prune().await?;
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    json(
        StatusCode::OK,
        &json!({"CachesDeleted": if ids.is_empty() { Value::Null } else { json!(ids) }, "SpaceReclaimed": bytes}),
    )
}

/// `POST /commit?container=&repo=&tag=&comment=&author=&pause=&changes=`.
pub(super) async fn commit(api: &Arc<Api>, req: Req) -> ApiResult {
    let container = req.q("container").to_owned();
    if container.is_empty() {
        return Err(ApiError::bad("container is required"));
    }
    let repo = req.q("repo");
    let refs = if repo.is_empty() {
        Vec::new()
    } else {
        let tag = req.q("tag");
        vec![normalized(&if tag.is_empty() {
            repo.to_owned()
        } else {
            format!("{repo}:{tag}")
        })?]
    };
    let pause = match req.q("pause") {
        "" => true,
        _ => req.flag("pause")?,
    };
    let opts = CommitOptions {
        refs,
        author: req.q("author").to_owned(),
        comment: req.q("comment").to_owned(),
        // One instruction per value (docker's client), or several joined by newlines (docker's
        // daemon reads them as one Dockerfile; bollard sends them so).
        changes: req
            .q_all("changes")
            .iter()
            .flat_map(|c| c.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|c| !c.trim().is_empty())
            .collect(),
        pause,
    };
    let id = crate::build::commit::commit(&api.engine, &container, opts).await?;
    let r = api.engine.get(&container)?;
    api.engine.events.emit(
        "container",
        "commit",
        &r.id,
        BTreeMap::from([("name".to_owned(), r.name.clone())]),
    );
    json(StatusCode::CREATED, &json!({"Id": id.to_string()}))
}
