//! `GET|HEAD|PUT /containers/{id}/archive`: docker cp. The file work is the engine's
//! (`engine::archive`); this side checks the request, sends the path's stat header, and streams
//! the tar both ways without holding it in memory.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::{Api, ApiError, ApiResult, Req, channel_body, empty};
use crate::bridge::{ChannelReader, ChannelWriter};
use crate::engine::archive;
use crate::error::Error;

/// The header dockerd answers with: the path's stat, base64 JSON.
const PATH_STAT_HEADER: &str = "X-Docker-Container-Path-Stat";

fn path_param(req: &Req) -> Result<String, ApiError> {
    match req.q("path") {
        "" => Err(ApiError::bad("Path cannot be empty")),
        p => Ok(p.to_owned()),
    }
}

/// docker's wording for a path a container does not have.
fn missing(e: Error, path: &str, container: &str) -> ApiError {
    match e {
        Error::NotFound(_) => ApiError::not_found(format!(
            "Could not find the file {path} in container {container}"
        )),
        e => e.into(),
    }
}

pub(super) async fn route(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let path = path_param(&req)?;
    let r = api.engine.get(id)?;
    if req.method == Method::PUT {
        return put(api, &r.id, id, path, req).await;
    }
    let p = path.clone();
    let stat = api
        .engine
        .with_root(&r.id, move |root| archive::stat(root, &p))
        .await
        .map_err(|e| missing(e, &path, id))?;
    let stat_json = serde_json::to_vec(&stat).map_err(|e| Error::internal("encode stat", e))?;
    let stat_header = base64::engine::general_purpose::STANDARD.encode(stat_json);
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(PATH_STAT_HEADER, stat_header);
    if req.method == Method::HEAD {
        return Ok(builder.body(empty()).expect("static response parts"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let engine = api.engine.clone();
    let id = r.id.clone();
    tokio::spawn(async move {
        let err_tx = tx.clone();
        let p = path.clone();
        let written = engine
            .with_root(&id, move |root| {
                archive::write_tar(root, &p, ChannelWriter::new(tx))
            })
            .await;
        if let Err(e) = written {
            // The headers are gone: a broken body is all the client can be told.
            tracing::debug!(container_id = %id, %path, error = %e, "docker cp out");
            let _ = err_tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    Ok(builder
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(channel_body(rx))
        .expect("static response parts"))
}

async fn put(api: &Arc<Api>, id: &str, asked: &str, path: String, req: Req) -> ApiResult {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let mut body = req.inner.into_body();
    let feed = tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let item = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => Ok(d),
                    Err(_) => continue,
                },
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    let p = path.clone();
    let result = api
        .engine
        .with_root(id, move |root| {
            let mut input = ChannelReader::new(rx);
            archive::extract_tar(root, &p, &mut input)?;
            // Drain what follows the archive so the client's upload completes.
            let _ = std::io::copy(&mut input, &mut std::io::sink());
            Ok(())
        })
        .await;
    feed.abort();
    result.map_err(|e| missing(e, &path, asked))?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .body(empty())
        .expect("static response parts"))
}
