//! The Docker Engine API front door (a v1.44 subset) on `docker.sock`: HTTP/1.1 over a unix
//! socket, docker's JSON shapes and error bodies, streams hijacked the way the docker client
//! expects. Every handler translates into calls on the [`Engine`] or the image manager; no
//! container logic lives here.

mod archive;
mod build;
mod containers;
mod exec;
mod hijack;
mod image_archive;
mod images;
mod networks;
mod system;
mod usage;
mod volumes;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::engine::Engine;
use crate::error::Error;

/// The API version berthd speaks.
pub const API_VERSION: &str = "1.44";
/// The oldest API version accepted in a path prefix.
const MIN_API_MINOR: u32 = 24;
/// The newest API version accepted in a path prefix (clients newer than us send theirs).
const MAX_API_MINOR: u32 = 59;
/// Largest JSON body read.
const MAX_JSON_BODY: usize = 4 << 20;

/// A response body: whole or streamed.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What the handlers share.
pub struct Api {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Execs created and not yet gone.
    execs: exec::Execs,
    /// berthd's persistent root, for `info`.
    root: std::path::PathBuf,
    /// Dockerfile builds.
    builder: Arc<crate::build::Builder>,
}

impl Api {
    /// The API over `engine`.
    pub fn new(engine: Arc<Engine>, root: &Path) -> crate::error::Result<Arc<Api>> {
        // Uploads (load, import) a crash cut short.
        let _ = std::fs::remove_dir_all(root.join("uploads"));
        let builder = Arc::new(crate::build::Builder::new(engine.clone(), root)?);
        Ok(Arc::new(Api {
            engine,
            execs: exec::Execs::default(),
            root: root.to_owned(),
            builder,
        }))
    }
}

/// Serves the API on `listener` until `shutdown` resolves; connections in progress (log
/// followers, attaches) are left to end with the process.
pub async fn serve(
    api: Arc<Api>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let builder = api.builder.clone();
    tokio::spawn(async move { builder.remove_leftovers().await });
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "docker socket accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(api, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "docker API connection ended");
            }
        });
    }
}

/// A request, split into what handlers use.
pub(crate) struct Req {
    pub method: Method,
    /// Path segments after the version prefix.
    pub path: String,
    pub query: HashMap<String, String>,
    pub inner: Request<Incoming>,
}

impl Req {
    /// A query parameter, or `""`.
    pub fn q(&self, key: &str) -> &str {
        self.query.get(key).map_or("", String::as_str)
    }

    /// Every value of a query parameter given more than once (`names=a&names=b`).
    pub fn q_all(&self, key: &str) -> Vec<String> {
        self.inner
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k) == key).then(|| percent_decode(v))
            })
            .collect()
    }

    /// A boolean query parameter (`1`, `true`, `True`…); absent is false.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        crate::engine::spec::parse_bool_str(self.q(key)).ok_or_else(|| {
            ApiError::bad(format!(
                "invalid boolean value for {key}: {:?}",
                self.q(key)
            ))
        })
    }

    /// The body as JSON (empty: `{}`), with nulls removed.
    pub async fn json<T: serde::de::DeserializeOwned>(mut self) -> Result<T, ApiError> {
        self.json_in_place().await
    }

    /// [`json`](Self::json), leaving the request (for an upgrade after it).
    pub async fn json_in_place<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        let bytes = Limited::new(self.inner.body_mut(), MAX_JSON_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| ApiError::bad(format!("read request body: {e}")))?;
        let v: serde_json::Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))?
        };
        serde_json::from_value(crate::engine::spec::strip_nulls(v))
            .map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))
    }
}

/// An error answer: a status and docker's `{"message": …}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::FailedPrecondition(_) => StatusCode::CONFLICT,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

pub(crate) type ApiResult = Result<Response<Body>, ApiError>;

/// A whole body.
pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A body fed by a channel.
pub(crate) fn channel_body(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A JSON answer.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResult {
    let body =
        serde_json::to_vec(value).map_err(|e| ApiError::from(Error::internal("encode JSON", e)))?;
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static response parts"))
}

/// A status with no body.
pub(crate) fn status(status: StatusCode) -> ApiResult {
    Ok(Response::builder()
        .status(status)
        .body(empty())
        .expect("static response parts"))
}

fn error_response(e: &ApiError) -> Response<Body> {
    let body = serde_json::json!({ "message": e.message }).to_string();
    Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static response parts")
}

/// Splits `/v1.44/containers/json` into the version and the rest; checks the version.
fn strip_version(path: &str) -> Result<&str, ApiError> {
    let Some(rest) = path.strip_prefix("/v") else {
        return Ok(path);
    };
    let (version, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some(minor) = version
        .strip_prefix("1.")
        .and_then(|m| m.parse::<u32>().ok())
    else {
        // Not a version after all (a path like `/volumes` has no `/v` prefix match here).
        return Ok(path);
    };
    if minor < MIN_API_MINOR {
        return Err(ApiError::bad(format!(
            "client version {version} is too old. Minimum supported API version is 1.{MIN_API_MINOR}, please upgrade your client to a newer version"
        )));
    }
    if minor > MAX_API_MINOR {
        return Err(ApiError::bad(format!(
            "client version {version} is too new. Maximum supported API version is {API_VERSION}"
        )));
    }
    Ok(tail)
}

/// `a=b&c=%2F` → map, percent-decoded (`+` is a space, as Go's form decoding reads it).
pub(crate) fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Percent-decodes (and `+` → space); invalid escapes stay as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let raw_path = percent_decode(req.uri().path());
    let query = parse_query(req.uri().query().unwrap_or(""));
    let result = match strip_version(&raw_path) {
        Ok(path) => {
            let path = path.to_owned();
            let req = Req {
                method: method.clone(),
                path,
                query,
                inner: req,
            };
            route(&api, req).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => {
            tracing::debug!(%method, path = %raw_path, status = %r.status(), "docker API");
            r
        }
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, path = %raw_path, status = %e.status, error = %e.message, "docker API");
            } else {
                tracing::debug!(%method, path = %raw_path, status = %e.status, error = %e.message, "docker API");
            }
            error_response(&e)
        }
    }
}

async fn route(api: &Arc<Api>, req: Req) -> ApiResult {
    let path = req.path.trim_end_matches('/').to_owned();
    let seg: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    let m = req.method.clone();
    match (m.as_str(), seg.as_slice()) {
        ("GET" | "HEAD", ["_ping"]) => system::ping(&m),
        ("GET", ["version"]) => system::version(),
        ("GET", ["info"]) => system::info(api).await,
        ("GET", ["events"]) => system::events(api, req).await,
        ("GET", ["containers", "json"]) => containers::list(api, req).await,
        ("POST", ["containers", "create"]) => containers::create(api, req).await,
        ("POST", ["containers", "prune"]) => containers::prune(api, req).await,
        (_, ["containers", id]) if m == Method::DELETE => {
            let id = (*id).to_owned();
            containers::remove(api, &id, req).await
        }
        (_, ["containers", id, action]) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            containers::action(api, &id, &action, req).await
        }
        ("POST", ["exec", id, action]) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            exec::action(api, &id, &action, req).await
        }
        ("GET", ["exec", id, "json"]) => {
            let id = (*id).to_owned();
            exec::inspect(api, &id)
        }
        (_, ["images", ..]) => images::route(api, req).await,
        (_, ["volumes", ..]) => volumes::route(api, req).await,
        ("POST", ["build"]) => build::build(api, req).await,
        ("POST", ["build", "prune"]) => build::prune(api).await,
        ("POST", ["commit"]) => build::commit(api, req).await,
        (_, ["networks", ..]) => networks::route(api, req).await,
        _ => Err(ApiError::not_found("page not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_in_the_path_are_checked() {
        assert_eq!(
            strip_version("/v1.44/containers/json").expect("1.44"),
            "/containers/json"
        );
        assert_eq!(strip_version("/v1.24/_ping").expect("1.24"), "/_ping");
        assert_eq!(strip_version("/_ping").expect("none"), "/_ping");
        assert_eq!(strip_version("/volumes").expect("volumes"), "/volumes");
        assert!(strip_version("/v1.12/info").is_err());
        assert!(strip_version("/v1.99/info").is_err());
    }

    #[test]
    fn queries_are_percent_decoded() {
        let q = parse_query("filters=%7B%22a%22%3A1%7D&name=x+y&flag");
        assert_eq!(q["filters"], "{\"a\":1}");
        assert_eq!(q["name"], "x y");
        assert_eq!(q["flag"], "");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
