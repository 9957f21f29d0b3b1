//! Plain GETs of JSON on the daemon's socket, for `inspect`: bollard's typed models drop the
//! fields they do not know (`NetworkSettings.IPAddress` among them), and `--format` templates
//! must see every field the daemon sends, as docker's do.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;

static SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// Remembers the socket [`get_json`] talks to.
pub fn set_socket(path: &Path) {
    let _ = SOCKET.set(path.to_owned());
}

/// Percent-encodes a path segment (names and references may hold `/`, `:` or `@`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'@' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `GET /v1.44/<kind>/<name>/json` (volumes: `/volumes/<name>`) as JSON. A daemon error comes
/// back as bollard's error for it, so callers treat both clients' errors alike.
pub async fn inspect(kind: &str, name: &str) -> Result<Value> {
    let path = match kind {
        "volumes" => format!("/v1.44/volumes/{}", segment(name)),
        _ => format!("/v1.44/{kind}/{}/json", segment(name)),
    };
    get_json(&path).await
}

async fn get_json(path: &str) -> Result<Value> {
    let socket = SOCKET.get().context("no daemon socket")?;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to unix://{}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("talk to the daemon")?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "berth")
        .body(Empty::<Bytes>::new())
        .context("build the request")?;
    let resp = sender.send_request(req).await.context("ask the daemon")?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("read the daemon's answer")?
        .to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(bollard::errors::Error::DockerResponseServerError {
            status_code: status.as_u16(),
            message,
        }
        .into());
    }
    serde_json::from_slice(&body).context("decode the daemon's JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("busybox:latest"), "busybox:latest");
        assert_eq!(segment("127.0.0.1:5000/a/b"), "127.0.0.1:5000%2Fa%2Fb");
        assert_eq!(segment("a b?#"), "a%20b%3F%23");
    }
}
