//! `/images/…` beyond pull and remove: tag, history, save (`get`), load, import
//! (`create?fromSrc=-`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use super::images::familiar;
use super::{Api, ApiError, ApiResult, Req, channel_body, json, status};
use crate::error::Error;
use crate::image::archive::ChannelWriter;
use crate::image::store::NamedImage;

/// An upload on disk, removed when dropped.
pub(super) struct Upload(pub(super) PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams the request body to a file under `<root>/uploads`: archives can be larger than memory.
pub(super) async fn body_to_file(api: &Api, req: Req) -> Result<Upload, ApiError> {
    let dir = api.root.join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Error::internal("create upload dir", e))?;
    let upload = Upload(dir.join(format!("upload-{}", hex::encode(rand::random::<[u8; 8]>()))));
    let mut f = tokio::fs::File::create(&upload.0)
        .await
        .map_err(|e| Error::internal("create upload file", e))?;
    let mut body = req.inner.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad(format!("read request body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            f.write_all(data)
                .await
                .map_err(|e| Error::internal("write upload file", e))?;
        }
    }
    f.flush()
        .await
        .map_err(|e| Error::internal("write upload file", e))?;
    Ok(upload)
}

fn json_lines(lines: Vec<Value>) -> ApiResult {
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(super::full(body))
        .expect("static response parts"))
}

/// `POST /images/{name}/tag?repo=&tag=`.
pub(super) fn tag(api: &Arc<Api>, name: &str, req: &Req) -> ApiResult {
    let repo = req.q("repo");
    if repo.is_empty() {
        return Err(ApiError::bad("repository name is required (repo)"));
    }
    let tag = req.q("tag");
    let reference = if tag.is_empty() {
        repo.to_owned()
    } else {
        format!("{repo}:{tag}")
    };
    let image = api.engine.images().tag(name, &reference)?;
    let attributes = BTreeMap::from([("name".to_owned(), familiar(&reference))]);
    api.engine
        .events
        .emit("image", "tag", &image.record.id.to_string(), attributes);
    status(StatusCode::CREATED)
}

/// `GET /images/{name}/history`: the config's history, newest first, in docker's shape.
pub(super) fn history(api: &Arc<Api>, image: &NamedImage) -> ApiResult {
    let config = api.engine.images().config_json(image)?;
    let mut layer_sizes = image.record.layers.iter().map(|l| l.size);
    let mut out: Vec<Value> = Vec::new();
    let created = |v: &Value| {
        v["created"]
            .as_str()
            .and_then(api::time::parse_rfc3339)
            .map_or(0, |ns| ns / 1_000_000_000)
    };
    match config["history"].as_array() {
        Some(h) if !h.is_empty() => {
            for e in h {
                let empty = e["empty_layer"].as_bool().unwrap_or(false);
                let size = if empty {
                    0
                } else {
                    layer_sizes.next().unwrap_or(0)
                };
                out.push(json!({
                    "Id": "<missing>",
                    "Created": created(e),
                    "CreatedBy": e["created_by"].as_str().unwrap_or(""),
                    "Tags": null,
                    "Size": size,
                    "Comment": e["comment"].as_str().unwrap_or(""),
                }));
            }
        }
        _ => {
            for size in layer_sizes {
                out.push(json!({
                    "Id": "<missing>", "Created": created(&config), "CreatedBy": "",
                    "Tags": null, "Size": size, "Comment": "",
                }));
            }
        }
    }
    out.reverse();
    if let Some(top) = out.first_mut() {
        top["Id"] = json!(image.record.id.to_string());
        let tags: Vec<String> = image.tags.iter().map(|t| familiar(t)).collect();
        top["Tags"] = json!(tags);
    }
    json(StatusCode::OK, &out)
}

/// `GET /images/{name}/get` and `GET /images/get?names=…`: a `docker save` archive, written
/// while it streams.
pub(super) fn save(api: &Arc<Api>, names: Vec<String>) -> ApiResult {
    if names.is_empty() {
        return Err(ApiError::bad("no image names given (names)"));
    }
    let images = api.engine.images().clone();
    // Every name is resolved before the answer starts: a missing one is still a 404.
    let mut wanted: Vec<(NamedImage, Vec<String>)> = Vec::new();
    for n in &names {
        let image = images
            .resolve(n)?
            .ok_or_else(|| ApiError::not_found(format!("No such image: {n}")))?;
        // A name that is a tag records that tag; an id records every tag, as docker does.
        let tag = crate::image::reference::Reference::parse(n)
            .ok()
            .map(|r| r.to_string())
            .filter(|r| image.tags.contains(r));
        let tags = match tag {
            Some(t) => vec![t],
            None => image.tags.clone(),
        };
        match wanted
            .iter_mut()
            .find(|(i, _)| i.record.id == image.record.id)
        {
            Some((_, t)) => {
                for x in tags {
                    if !t.contains(&x) {
                        t.push(x);
                    }
                }
            }
            None => wanted.push((image, tags)),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter::new(tx.clone());
        if let Err(e) = images.save(&wanted, &mut w) {
            tracing::warn!(error = %e, "image save");
            // Cuts the stream short, so the client sees a broken archive, not a short one.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(channel_body(rx))
        .expect("static response parts"))
}

/// `POST /images/load`: a `docker save` archive or OCI layout tar in the body.
pub(super) async fn load(api: &Arc<Api>, req: Req) -> ApiResult {
    let upload = body_to_file(api, req).await?;
    let images = api.engine.images().clone();
    // The upload is the blocking thread's to remove: a client that hangs up drops this
    // future, and the load must not lose its file half-way.
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = images.load_archive(&upload.0);
        drop(upload);
        loaded
    })
    .await
    .map_err(|e| Error::Internal(format!("load thread: {e}")))??;
    let mut lines = Vec::new();
    for l in loaded {
        if l.tags.is_empty() {
            lines.push(json!({"stream": format!("Loaded image ID: {}\n", l.id)}));
        }
        for t in &l.tags {
            lines.push(json!({"stream": format!("Loaded image: {}\n", familiar(t))}));
            let attributes = BTreeMap::from([("name".to_owned(), familiar(t))]);
            api.engine
                .events
                .emit("image", "load", &l.id.to_string(), attributes);
        }
    }
    json_lines(lines)
}

/// `POST /images/create?fromSrc=-`: the body is a rootfs tar (plain, gzip or zstd).
pub(super) async fn import(api: &Arc<Api>, req: Req) -> ApiResult {
    if req.q("fromSrc") != "-" {
        return Err(ApiError {
            status: StatusCode::NOT_IMPLEMENTED,
            message:
                "import from a URL is not supported by berth; send the tar in the body (fromSrc=-)"
                    .into(),
        });
    }
    let repo = req.q("repo").to_owned();
    let tag = req.q("tag").to_owned();
    let comment = req.q("message").to_owned();
    let mut config = Map::new();
    for c in req.q_all("changes") {
        apply_change(&mut config, &c)?;
    }
    let refs = if repo.is_empty() {
        Vec::new()
    } else {
        let full = if tag.is_empty() {
            repo.clone()
        } else {
            format!("{repo}:{tag}")
        };
        let r = crate::image::reference::Reference::parse(&full)
            .map_err(|e| ApiError::bad(format!("invalid reference format: {e}")))?;
        vec![r.to_string()]
    };
    let upload = body_to_file(api, req).await?;
    let images = api.engine.images().clone();
    let config = Value::Object(config);
    let refs2 = refs.clone();
    // As for load: the blocking thread owns the upload.
    let id = tokio::task::spawn_blocking(move || {
        let id = images.import_rootfs(&upload.0, config, &comment, refs2);
        drop(upload);
        id
    })
    .await
    .map_err(|e| Error::Internal(format!("import thread: {e}")))??;
    let attributes = BTreeMap::from([(
        "name".to_owned(),
        refs.first().map(|r| familiar(r)).unwrap_or_default(),
    )]);
    api.engine
        .events
        .emit("image", "import", &id.to_string(), attributes);
    json_lines(vec![json!({"status": id.to_string()})])
}

/// `["a","b"]` or shell form (`sh -c "…"`, as a Dockerfile takes it).
fn command(arg: &str) -> Value {
    match serde_json::from_str::<Vec<String>>(arg) {
        Ok(v) => json!(v),
        Err(_) => json!(["/bin/sh", "-c", arg]),
    }
}

/// `k=v k2="v 2"` or the legacy `k v`.
fn pairs(arg: &str) -> Result<Vec<(String, String)>, ApiError> {
    if !arg.contains('=') {
        let (k, v) = arg
            .split_once(char::is_whitespace)
            .ok_or_else(|| ApiError::bad(format!("{arg:?}: want key=value")))?;
        return Ok(vec![(k.to_owned(), v.trim().to_owned())]);
    }
    let mut out = Vec::new();
    for w in arg.split_whitespace() {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| ApiError::bad(format!("{w:?}: want key=value")))?;
        out.push((k.to_owned(), v.trim_matches('"').to_owned()));
    }
    Ok(out)
}

/// One `--change` (a Dockerfile instruction) applied to the config.
fn apply_change(c: &mut Map<String, Value>, change: &str) -> Result<(), ApiError> {
    let change = change.trim();
    let (instr, arg) = change
        .split_once(char::is_whitespace)
        .map(|(i, a)| (i, a.trim()))
        .unwrap_or((change, ""));
    match instr.to_ascii_uppercase().as_str() {
        "CMD" => {
            c.insert("Cmd".into(), command(arg));
        }
        "ENTRYPOINT" => {
            c.insert("Entrypoint".into(), command(arg));
        }
        "WORKDIR" => {
            c.insert("WorkingDir".into(), json!(arg));
        }
        "USER" => {
            c.insert("User".into(), json!(arg));
        }
        "STOPSIGNAL" => {
            c.insert("StopSignal".into(), json!(arg));
        }
        "ENV" => {
            let env = c.entry("Env").or_insert_with(|| json!([]));
            for (k, v) in pairs(arg)? {
                if let Some(list) = env.as_array_mut() {
                    list.retain(|e| e.as_str().is_none_or(|e| !e.starts_with(&format!("{k}="))));
                    list.push(json!(format!("{k}={v}")));
                }
            }
        }
        "LABEL" => {
            let labels = c.entry("Labels").or_insert_with(|| json!({}));
            for (k, v) in pairs(arg)? {
                labels[k] = json!(v);
            }
        }
        "EXPOSE" => {
            let ports = c.entry("ExposedPorts").or_insert_with(|| json!({}));
            for p in arg.split_whitespace() {
                let p = if p.contains('/') {
                    p.to_owned()
                } else {
                    format!("{p}/tcp")
                };
                ports[p] = json!({});
            }
        }
        "VOLUME" => {
            let vols = c.entry("Volumes").or_insert_with(|| json!({}));
            let list: Vec<String> = serde_json::from_str(arg)
                .unwrap_or_else(|_| arg.split_whitespace().map(str::to_owned).collect());
            for v in list {
                vols[v] = json!({});
            }
        }
        other => {
            return Err(ApiError::bad(format!(
                "{other} is not a valid change command"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_become_config() {
        let mut c = Map::new();
        apply_change(&mut c, r#"CMD ["sh"]"#).expect("cmd");
        apply_change(&mut c, "ENTRYPOINT echo hi").expect("entrypoint");
        apply_change(&mut c, "ENV A=1 B=2").expect("env");
        apply_change(&mut c, "ENV A 3").expect("env legacy");
        apply_change(&mut c, "EXPOSE 80 53/udp").expect("expose");
        apply_change(&mut c, "LABEL k=v").expect("label");
        apply_change(&mut c, "WORKDIR /w").expect("workdir");
        assert!(apply_change(&mut c, "RUN rm -rf /").is_err());
        let c = Value::Object(c);
        assert_eq!(c["Cmd"], json!(["sh"]));
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(c["Env"], json!(["B=2", "A=3"]));
        assert_eq!(c["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
        assert_eq!(c["Labels"], json!({"k": "v"}));
        assert_eq!(c["WorkingDir"], json!("/w"));
    }
}
