//! Requests bollard cannot make as we need them. `inspect`: bollard's typed models drop the
//! fields they do not know (`NetworkSettings.IPAddress` among them), and `--format` templates
//! must see every field the daemon sends, as docker's do. `wait`: bollard sends nothing until
//! its stream is polled and tells nothing of the headers, while `run --rm` must know its wait is
//! in place before it starts the container. `push`: bollard's push model drops each line's
//! layer `id`, which the per-layer progress needs.

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
        // Networks and volumes are inspected at their own path, without `/json`.
        "volumes" | "networks" => format!("/v1.44/{kind}/{}", segment(name)),
        _ => format!("/v1.44/{kind}/{}/json", segment(name)),
    };
    get_json(&path).await
}

/// Starts `POST /containers/<id>/wait?condition=…` and returns once the daemon has answered
/// with its headers, so the wait is in place before the caller starts the container (with
/// `--rm` the exit code goes with the container). The task yields the exit code.
pub async fn wait_begun(id: &str, condition: &str) -> Result<tokio::task::JoinHandle<Result<i32>>> {
    let path = format!(
        "/v1.44/containers/{}/wait?condition={condition}",
        segment(id)
    );
    let resp = request(hyper::Method::POST, &path).await?;
    Ok(tokio::spawn(async move {
        let v: Value = serde_json::from_slice(&body_of(resp).await?)
            .context("decode the daemon's wait answer")?;
        if let Some(m) = v["Error"]["Message"].as_str().filter(|m| !m.is_empty()) {
            anyhow::bail!("{m}");
        }
        v["StatusCode"]
            .as_i64()
            .map(|c| c as i32)
            .context("the daemon's wait answer has no StatusCode")
    }))
}

/// `HEAD /containers/<id>/archive?path=…`: what the daemon says of a path in the container
/// (its `X-Docker-Container-Path-Stat` header, base64 JSON). A daemon error comes back as
/// bollard's error for it.
pub async fn path_stat(id: &str, path: &str) -> Result<Value> {
    let resp = request(
        hyper::Method::HEAD,
        &format!(
            "/v1.44/containers/{}/archive?path={}",
            segment(id),
            segment(path)
        ),
    )
    .await?;
    let header = resp
        .headers()
        .get("X-Docker-Container-Path-Stat")
        .context("the daemon sent no path stat")?;
    let json = base64_decode(header.as_bytes()).context("decode the daemon's path stat")?;
    serde_json::from_slice(&json).context("decode the daemon's path stat")
}

/// Standard base64 (padding optional), as Go's encoding/base64 writes it.
fn base64_decode(s: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => anyhow::bail!("invalid base64"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// `POST /images/<repo>/push[?tag=…]`: the daemon's JSON lines, one by one, as they come. A
/// daemon error before the stream (no such image) comes back as bollard's error for it.
pub async fn push(
    repo: &str,
    tag: Option<&str>,
) -> Result<tokio::sync::mpsc::Receiver<Result<Value>>> {
    let mut path = format!("/v1.44/images/{}/push", segment(repo));
    if let Some(t) = tag {
        path.push_str(&format!("?tag={}", segment(t)));
    }
    let resp = request(hyper::Method::POST, &path).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    let _ = tx
                        .send(Err(
                            anyhow::Error::new(e).context("read the daemon's answer")
                        ))
                        .await;
                    return;
                }
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v = serde_json::from_slice(&line).context("decode the daemon's progress");
                if tx.send(v).await.is_err() {
                    return;
                }
            }
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            let _ = tx
                .send(serde_json::from_slice(&buf).context("decode the daemon's progress"))
                .await;
        }
    });
    Ok(rx)
}

async fn body_of(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .context("read the daemon's answer")?
        .to_bytes())
}

/// Sends a request without a body; a daemon error comes back as bollard's error for it.
async fn request(
    method: hyper::Method,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let socket = SOCKET.get().context("no daemon socket")?;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to unix://{}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("talk to the daemon")?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "berth")
        .body(Empty::<Bytes>::new())
        .context("build the request")?;
    let resp = sender.send_request(req).await.context("ask the daemon")?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = body_of(resp).await?;
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(bollard::errors::Error::DockerResponseServerError {
        status_code: status.as_u16(),
        message,
    }
    .into())
}

async fn get_json(path: &str) -> Result<Value> {
    let resp = request(hyper::Method::GET, path).await?;
    serde_json::from_slice(&body_of(resp).await?).context("decode the daemon's JSON")
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

    #[test]
    fn base64_as_go_writes_it() {
        assert_eq!(
            base64_decode(b"eyJhIjoxfQ==").expect("decode"),
            br#"{"a":1}"#
        );
        assert_eq!(base64_decode(b"aGk").expect("decode"), b"hi");
        assert!(base64_decode(b"a*").is_err());
    }
}
