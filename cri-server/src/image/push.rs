//! Pushing a stored image to a registry over the OCI distribution API.
//!
//! Each blob (layers, then the config) is checked with `HEAD` first and skipped when the
//! repository has it; a blob that other repositories of the same registry are known to hold
//! (by the references of the images stored here) is offered as a cross-repository mount;
//! anything else is uploaded, in one `PUT` when small, otherwise in `PATCH` chunks of
//! [`PushSection::chunk_bytes`](crate::config::PushSection) with `Content-Range`. Bodies stream
//! from the content store's files: no layer is ever held in memory. The manifest goes last,
//! as stored (same bytes, same digest, same media type).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use api::Digest;
use bytes::Bytes;
use futures::StreamExt;
use oci_client::RegistryOperation;
use oci_client::secrets::RegistryAuth;
use reqwest::{StatusCode, Url, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc::UnboundedSender;

use super::reference::{Reference, Target};
use super::registry::{self, Endpoint, error_of};
use super::{Descriptor, ImageManager, Manifest, blocking, parse, resolve_in};
use crate::error::{Error, Result};

/// How many cross-repository mounts are tried for one blob before it is uploaded.
const MAX_MOUNT_TRIES: usize = 3;
/// Blobs pushed at once.
const CONCURRENT_UPLOADS: usize = 3;
/// Bytes read from a blob file at a time.
const READ_BYTES: usize = 64 << 10;
/// Progress is reported after at least this many more bytes (and at the end).
const PROGRESS_STEP: u64 = 512 << 10;

/// What a push reports as it goes. Layer events follow one [`PushEvent::Preparing`] per
/// layer; the config blob is pushed without any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// A layer is to be pushed (sent for every layer, top first as docker lists them, before
    /// any request).
    Preparing {
        /// The layer blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// Bytes of a layer sent so far.
    Progress {
        /// The layer blob.
        digest: Digest,
        /// Bytes sent.
        sent: u64,
        /// Its size.
        total: u64,
    },
    /// The layer was uploaded.
    Pushed {
        /// The layer blob.
        digest: Digest,
    },
    /// The repository had the layer already.
    Exists {
        /// The layer blob.
        digest: Digest,
    },
    /// The registry linked the layer from another of its repositories.
    Mounted {
        /// The layer blob.
        digest: Digest,
        /// The repository it came from (`library/busybox`).
        from: String,
    },
}

/// A finished push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Where it went, normalised (`127.0.0.1:5000/app:1.0`).
    pub reference: String,
    /// The tag pushed, if it was pushed by tag.
    pub tag: Option<String>,
    /// The manifest digest.
    pub digest: Digest,
    /// The manifest's size in bytes.
    pub size: u64,
}

/// How one blob reached the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Exists,
    Mounted(String),
    Uploaded,
}

/// Where the chunk of a `size`-byte blob that starts at `offset` ends (exclusive).
fn chunk_end(offset: u64, size: u64, chunk: u64) -> u64 {
    size.min(offset.saturating_add(chunk.max(1)))
}

/// The offset after the last byte a registry says it holds, from its `Range: 0-<last>`
/// answer to a chunk. `None` if the header is malformed.
fn received_through(range: &str) -> Option<u64> {
    let (start, last) = range
        .trim()
        .strip_prefix("bytes=")
        .unwrap_or(range.trim())
        .split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    last.trim().parse::<u64>().ok()?.checked_add(1)
}

/// An upload URL (`Location`, absolute or relative) against the repository URL.
fn upload_url(base: &str, location: &str) -> Result<Url> {
    let base = Url::parse(base).map_err(|e| Error::internal("registry URL", e))?;
    base.join(location).map_err(|e| {
        Error::Remote(format!(
            "registry sent a bad upload location {location:?}: {e}"
        ))
    })
}

/// The URL that completes an upload: the session's, with `digest=` added.
fn with_digest(mut url: Url, digest: &Digest) -> Url {
    url.query_pairs_mut().append_pair("digest", digest.as_str());
    url
}

/// Counts a layer's bytes as they go out and reports them now and then.
struct Meter {
    digest: Digest,
    total: u64,
    sent: AtomicU64,
    reported: AtomicU64,
    events: Option<UnboundedSender<PushEvent>>,
}

impl Meter {
    /// A request (re)starts sending at `offset`.
    fn restart(&self, offset: u64) {
        self.sent.store(offset, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        let sent = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        let last = self.reported.load(Ordering::Relaxed);
        if sent >= last.saturating_add(PROGRESS_STEP) || (sent == self.total && sent != last) {
            self.reported.store(sent, Ordering::Relaxed);
            if let Some(tx) = &self.events {
                let _ = tx.send(PushEvent::Progress {
                    digest: self.digest.clone(),
                    sent,
                    total: self.total,
                });
            }
        }
    }
}

/// `len` bytes of the file at `path` from `start`, read as they are sent.
fn file_body(path: PathBuf, start: u64, len: u64, meter: Arc<Meter>) -> reqwest::Body {
    meter.restart(start);
    let state = (None::<tokio::fs::File>, len);
    let stream = futures::stream::try_unfold(state, move |(file, left)| {
        let path = path.clone();
        let meter = meter.clone();
        async move {
            if left == 0 {
                return Ok(None);
            }
            let mut f = match file {
                Some(f) => f,
                None => {
                    let mut f = tokio::fs::File::open(&path).await?;
                    f.seek(std::io::SeekFrom::Start(start)).await?;
                    f
                }
            };
            let want = left.min(READ_BYTES as u64) as usize;
            let mut buf = vec![0u8; want];
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} is shorter than its descriptor says", path.display()),
                ));
            }
            buf.truncate(n);
            meter.add(n as u64);
            Ok::<_, std::io::Error>(Some((Bytes::from(buf), (Some(f), left - n as u64))))
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// The repository's `Location` header as an upload URL, or an error naming what sent none.
fn location(base: &str, ep: &Endpoint, what: &str, resp: &reqwest::Response) -> Result<Url> {
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::Remote(format!(
                "{what} to {ep:?}: HTTP {} without an upload location",
                resp.status()
            ))
        })?;
    upload_url(base, loc)
}

/// A registry's error, saying which push it ended.
fn in_push(e: Error, r: &Reference) -> Error {
    let ctx = |m: String| format!("push {r}: {m}");
    match e {
        Error::Unavailable(m) => Error::Unavailable(ctx(m)),
        Error::Unauthenticated(m) => Error::Unauthenticated(ctx(m)),
        Error::Remote(m) => Error::Remote(ctx(m)),
        Error::NotFound(m) => Error::NotFound(ctx(m)),
        Error::BadContent(m) => Error::BadContent(ctx(m)),
        other => other,
    }
}

/// One push's fixed parts.
struct Job<'a> {
    ep: &'a Endpoint,
    r: &'a Reference,
    auth: &'a RegistryAuth,
    base: String,
    chunk: u64,
}

impl Job<'_> {
    async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        self.ep
            .send(self.r, self.auth, RegistryOperation::Push, what, build)
            .await
    }

    /// Whether the repository has the blob.
    async fn exists(&self, d: &Descriptor) -> Result<bool> {
        let what = format!("blob {}", d.digest);
        let url = format!("{}blobs/{}", self.base, d.digest);
        let resp = self.send(&what, |h| Ok(h.head(&url))).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(error_of(self.ep, &what, resp).await),
        }
    }

    /// Starts an upload, or mounts the blob from `from` when the registry takes the offer.
    /// Returns the upload URL, or the repository it mounted from.
    async fn start(
        &self,
        d: &Descriptor,
        from: &[String],
    ) -> Result<std::result::Result<Url, String>> {
        let what = format!("upload of blob {}", d.digest);
        for repo in from.iter().take(MAX_MOUNT_TRIES) {
            let mut url = upload_url(&self.base, "blobs/uploads/")?;
            url.query_pairs_mut()
                .append_pair("mount", d.digest.as_str())
                .append_pair("from", repo);
            let resp = self
                .ep
                .send_mount(self.r, self.auth, repo, &what, |h| {
                    Ok(h.post(url.clone()).header(header::CONTENT_LENGTH, 0))
                })
                .await?;
            match resp.status() {
                StatusCode::CREATED => return Ok(Err(repo.clone())),
                // Not mounted (not there, or not readable to us): an upload session instead.
                StatusCode::ACCEPTED => {
                    return Ok(Ok(location(&self.base, self.ep, &what, &resp)?));
                }
                _ => {
                    let e = error_of(self.ep, &what, resp).await;
                    tracing::debug!(blob = %d.digest, from = %repo, error = %e, "cross-repository mount refused");
                }
            }
        }
        let url = upload_url(&self.base, "blobs/uploads/")?;
        let resp = self
            .send(&what, |h| {
                Ok(h.post(url.clone()).header(header::CONTENT_LENGTH, 0))
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(error_of(self.ep, &what, resp).await);
        }
        Ok(Ok(location(&self.base, self.ep, &what, &resp)?))
    }

    /// Uploads the blob from `path` into the session at `url`.
    async fn upload(
        &self,
        d: &Descriptor,
        size: u64,
        path: PathBuf,
        mut url: Url,
        meter: Arc<Meter>,
    ) -> Result<()> {
        let what = format!("upload of blob {}", d.digest);
        if size > self.chunk {
            let mut offset = 0;
            while offset < size {
                let (start, end) = (offset, chunk_end(offset, size, self.chunk));
                let resp = self
                    .send(&what, |h| {
                        Ok(h.patch(url.clone())
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(header::CONTENT_LENGTH, end - start)
                            .header("Content-Range", format!("{start}-{}", end - 1))
                            .body(file_body(path.clone(), start, end - start, meter.clone())))
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(error_of(self.ep, &what, resp).await);
                }
                let next = match resp
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                {
                    Some(range) => received_through(range).ok_or_else(|| {
                        Error::Remote(format!(
                            "{what} to {:?}: bad Range {range:?} after a chunk",
                            self.ep
                        ))
                    })?,
                    None => end,
                };
                // A registry that keeps less than it was sent is answered from where it stands;
                // one that claims more, or keeps nothing new, cannot be worked with.
                if next <= offset || next > end {
                    return Err(Error::Remote(format!(
                        "{what} to {:?}: registry holds {next} bytes after a chunk ending at {end}",
                        self.ep
                    )));
                }
                offset = next;
                url = location(&self.base, self.ep, &what, &resp).unwrap_or(url);
            }
            let done = with_digest(url, &d.digest);
            let resp = self
                .send(&what, |h| {
                    Ok(h.put(done.clone()).header(header::CONTENT_LENGTH, 0))
                })
                .await?;
            if !resp.status().is_success() {
                return Err(error_of(self.ep, &what, resp).await);
            }
        } else {
            let done = with_digest(url, &d.digest);
            let resp = self
                .send(&what, |h| {
                    Ok(h.put(done.clone())
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, size)
                        .body(file_body(path.clone(), 0, size, meter.clone())))
                })
                .await?;
            if !resp.status().is_success() {
                return Err(error_of(self.ep, &what, resp).await);
            }
        }
        Ok(())
    }

    /// Gets one blob into the repository: there already, mounted, or uploaded.
    async fn blob(
        &self,
        d: &Descriptor,
        path: PathBuf,
        from: &[String],
        meter: Arc<Meter>,
    ) -> Result<Outcome> {
        let size = u64::try_from(d.size).map_err(|_| {
            Error::BadContent(format!("blob {} has negative size {}", d.digest, d.size))
        })?;
        if self.exists(d).await? {
            return Ok(Outcome::Exists);
        }
        let url = match self.start(d, from).await? {
            Ok(url) => url,
            Err(repo) => return Ok(Outcome::Mounted(repo)),
        };
        self.upload(d, size, path, url, meter).await?;
        Ok(Outcome::Uploaded)
    }

    /// Puts the manifest under `target` (a tag or its digest).
    async fn manifest(
        &self,
        target: &str,
        media_type: &str,
        bytes: Bytes,
        digest: &Digest,
    ) -> Result<()> {
        let what = format!(
            "manifest {}/{}:{target}",
            self.r.registry, self.r.repository
        );
        let url = format!("{}manifests/{target}", self.base);
        let resp = self
            .send(&what, |h| {
                Ok(h.put(&url)
                    .header(header::CONTENT_TYPE, media_type)
                    .body(bytes.clone()))
            })
            .await?;
        if !resp.status().is_success() {
            return Err(error_of(self.ep, &what, resp).await);
        }
        if let Some(got) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            && got != digest.as_str()
        {
            tracing::warn!(manifest = %digest, registry_digest = %got, "registry digests the pushed manifest differently");
        }
        Ok(())
    }
}

impl ImageManager {
    /// Pushes the stored image `image` (a name or an id, as [`ImageManager::resolve`] takes)
    /// to the reference `target` (`registry/repo:tag`, or `registry/repo@<its manifest
    /// digest>`), reporting per-layer progress on `events` if given. Only the registry itself
    /// is pushed to, never its mirrors; plain HTTP and credentials as for pulls. On success
    /// the image is also named `registry/repo@<digest>` here, as docker records it.
    ///
    /// NotFound if there is no such image here; the registry's refusals map as pull's do.
    pub async fn push(
        self: &Arc<Self>,
        image: &str,
        target: &str,
        auth: Option<&api::cri::AuthConfig>,
        events: Option<UnboundedSender<PushEvent>>,
    ) -> Result<Pushed> {
        let r = Reference::parse(target).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let auth = registry::auth_from_cri(auth)?;
        let store = self.store.clone();
        let name = image.to_owned();
        let registry = r.registry.clone();
        let (found, sources) = blocking(move || {
            let found = resolve_in(&store, &name)?;
            let mut sources: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
            if found.is_some() {
                for i in store.list()? {
                    for other in i.tags.iter().chain(&i.digests) {
                        let Ok(o) = Reference::parse(other) else {
                            continue;
                        };
                        if o.registry != registry {
                            continue;
                        }
                        for b in i.record.blobs() {
                            sources
                                .entry(b.clone())
                                .or_default()
                                .insert(o.repository.clone());
                        }
                    }
                }
            }
            Ok((found, sources))
        })
        .await?;
        let found = found.ok_or_else(|| {
            Error::NotFound(format!(
                "An image does not exist locally with the tag: {image}"
            ))
        })?;
        let record = found.record.clone();
        // Leased before anything is read, so that GC cannot take it away mid-push.
        let mut lease = self.lease();
        lease
            .add(
                record
                    .blobs()
                    .map(|d| d.to_string())
                    .chain(record.chain_ids.iter().map(|c| c.to_string()))
                    .collect(),
            )
            .await?;
        let result = self
            .push_leased(image, target, &r, &auth, &record, &sources, events)
            .await
            .map_err(|e| in_push(e, &r));
        let store = self.store.clone();
        let digest_ref = r.with_digest(&record.manifest_digest).to_string();
        let ok = result.is_ok();
        let rec = record.clone();
        // The lease ends on a blocking thread (GC may hold its lock for a whole sweep).
        blocking(move || {
            let named = if ok && store.get(&rec.id)?.is_some() {
                store.put(&rec, &[digest_ref]).map(drop)
            } else {
                Ok(())
            };
            drop(lease);
            named
        })
        .await?;
        let (tag, size) = result?;
        tracing::info!(image = %r, manifest = %record.manifest_digest, "pushed");
        Ok(Pushed {
            reference: r.to_string(),
            tag,
            digest: record.manifest_digest.clone(),
            size,
        })
    }

    /// The push itself, under the caller's lease: returns the tag pushed (if by tag) and the
    /// manifest's size.
    #[allow(clippy::too_many_arguments)]
    async fn push_leased(
        &self,
        image: &str,
        target: &str,
        r: &Reference,
        auth: &RegistryAuth,
        record: &super::ImageRecord,
        sources: &BTreeMap<Digest, BTreeSet<String>>,
        events: Option<UnboundedSender<PushEvent>>,
    ) -> Result<(Option<String>, u64)> {
        let manifest_bytes = {
            let content = self.content.clone();
            let d = record.manifest_digest.clone();
            Bytes::from(blocking(move || Ok(content.read(&d)?)).await?)
        };
        let m: Manifest = parse(&format!("stored manifest of {image}"), &manifest_bytes)?;
        if let Some(d) = m
            .layers
            .iter()
            .chain([&m.config])
            .find(|d| !self.content.exists(&d.digest))
        {
            return Err(Error::FailedPrecondition(format!(
                "{image}: blob {} is not in the content store; the image cannot be pushed",
                d.digest
            )));
        }
        let tag = match &r.target {
            Target::Tag(t) => Some(t.clone()),
            Target::Digest(d) if *d == record.manifest_digest => None,
            Target::Digest(d) => {
                return Err(Error::InvalidArgument(format!(
                    "{target}: the image's manifest is {}, not {d}",
                    record.manifest_digest
                )));
            }
        };

        self.push_blobs(
            r,
            auth,
            &m,
            &manifest_bytes,
            record,
            tag.as_deref(),
            sources,
            events,
        )
        .await?;
        Ok((tag, manifest_bytes.len() as u64))
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_blobs(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        m: &Manifest,
        manifest_bytes: &Bytes,
        record: &super::ImageRecord,
        tag: Option<&str>,
        sources: &BTreeMap<Digest, BTreeSet<String>>,
        events: Option<UnboundedSender<PushEvent>>,
    ) -> Result<()> {
        let ep = registry::endpoints(&self.config, &r.registry)?
            .pop()
            .ok_or_else(|| Error::Internal("no registry endpoint".into()))?;
        let job = Job {
            base: ep.repo_url(r),
            ep: &ep,
            r,
            auth,
            chunk: self.config.push.chunk_bytes.max(1),
        };
        // Top first, as docker lists them.
        for l in m.layers.iter().rev() {
            if let Some(tx) = &events {
                let _ = tx.send(PushEvent::Preparing {
                    digest: l.digest.clone(),
                    size: u64::try_from(l.size).unwrap_or(0),
                });
            }
        }
        let from = |d: &Digest| -> Vec<String> {
            sources
                .get(d)
                .map(|s| s.iter().filter(|x| **x != r.repository).cloned().collect())
                .unwrap_or_default()
        };
        let results = futures::stream::iter(0..m.layers.len())
            .map(|i| {
                let l = &m.layers[i];
                let job = &job;
                let events = events.clone();
                let from = from(&l.digest);
                let path = self.content.path(&l.digest);
                async move {
                    let meter = Arc::new(Meter {
                        digest: l.digest.clone(),
                        total: u64::try_from(l.size).unwrap_or(0),
                        sent: AtomicU64::new(0),
                        reported: AtomicU64::new(0),
                        events: events.clone(),
                    });
                    let outcome = job.blob(l, path, &from, meter).await?;
                    if let Some(tx) = &events {
                        let digest = l.digest.clone();
                        let _ = tx.send(match outcome {
                            Outcome::Exists => PushEvent::Exists { digest },
                            Outcome::Mounted(from) => PushEvent::Mounted { digest, from },
                            Outcome::Uploaded => PushEvent::Pushed { digest },
                        });
                    }
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(CONCURRENT_UPLOADS)
            .collect::<Vec<_>>()
            .await;
        for res in results {
            res?;
        }
        let config = &m.config;
        let meter = Arc::new(Meter {
            digest: config.digest.clone(),
            total: 0,
            sent: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            events: None,
        });
        job.blob(
            config,
            self.content.path(&config.digest),
            &from(&config.digest),
            meter,
        )
        .await?;
        let target = tag.map_or_else(|| record.manifest_digest.to_string(), str::to_owned);
        job.manifest(
            &target,
            &record.manifest_media_type,
            manifest_bytes.clone(),
            &record.manifest_digest,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks a registry that keeps everything is sent.
    fn chunks(size: u64, chunk: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < size {
            let end = chunk_end(offset, size, chunk);
            out.push((offset, end));
            offset = end;
        }
        out
    }

    #[test]
    fn chunks_cover_the_blob_once_in_order() {
        assert_eq!(chunks(0, 4), vec![]);
        assert_eq!(chunks(3, 4), vec![(0, 3)]);
        assert_eq!(chunks(8, 4), vec![(0, 4), (4, 8)]);
        assert_eq!(chunks(9, 4), vec![(0, 4), (4, 8), (8, 9)]);
        let big = chunks(100 << 20, 8 << 20);
        assert_eq!(big.len(), 13);
        assert!(big.windows(2).all(|w| w[0].1 == w[1].0));
        assert_eq!(big.last(), Some(&(96 << 20, 100 << 20)));
        assert_eq!(
            chunks(2, 0),
            vec![(0, 1), (1, 2)],
            "a zero chunk size still progresses"
        );
        assert_eq!(
            chunk_end(u64::MAX - 1, u64::MAX, u64::MAX),
            u64::MAX,
            "no overflow"
        );
    }

    #[test]
    fn range_answers_give_the_next_offset() {
        assert_eq!(received_through("0-1023"), Some(1024));
        assert_eq!(received_through(" 0-0 "), Some(1));
        assert_eq!(received_through("bytes=0-99"), Some(100));
        assert_eq!(received_through("5-99"), None, "a range must start at 0");
        assert_eq!(received_through("0-"), None);
        assert_eq!(received_through("garbage"), None);
        assert_eq!(received_through(&format!("0-{}", u64::MAX)), None);
    }

    #[test]
    fn upload_locations_resolve_against_the_repository() {
        let base = "http://127.0.0.1:5000/v2/app/";
        let d: Digest = format!("sha256:{}", "a".repeat(64))
            .parse()
            .expect("digest");
        let rel = upload_url(base, "/v2/app/blobs/uploads/u1?_state=x").expect("relative");
        assert_eq!(
            rel.as_str(),
            "http://127.0.0.1:5000/v2/app/blobs/uploads/u1?_state=x"
        );
        let abs = upload_url(base, "https://store.example/up/u2").expect("absolute");
        assert_eq!(abs.as_str(), "https://store.example/up/u2");
        assert_eq!(
            upload_url(base, "blobs/uploads/").expect("start").as_str(),
            "http://127.0.0.1:5000/v2/app/blobs/uploads/"
        );
        let done = with_digest(rel, &d);
        assert_eq!(done.query_pairs().count(), 2, "the session's state is kept");
        assert!(
            done.query_pairs()
                .any(|(k, v)| k == "digest" && v == d.as_str()),
            "{done}"
        );
        let plain = with_digest(
            upload_url(base, "/v2/app/blobs/uploads/u3").expect("url"),
            &d,
        );
        assert_eq!(
            plain.query(),
            Some(format!("digest=sha256%3A{}", "a".repeat(64)).as_str())
        );
    }

    #[tokio::test]
    async fn bodies_stream_the_asked_range_and_count_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let d: Digest = format!("sha256:{}", "b".repeat(64))
            .parse()
            .expect("digest");
        let meter = Arc::new(Meter {
            digest: d.clone(),
            total: data.len() as u64,
            sent: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            events: Some(tx),
        });
        let body = file_body(path.clone(), 100_000, 100_000, meter.clone());
        let mut stream = http_body_util::BodyDataStream::new(body);
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(got, &data[100_000..]);
        assert_eq!(meter.sent.load(Ordering::Relaxed), 200_000);
        let mut last = None;
        while let Ok(ev) = rx.try_recv() {
            last = Some(ev);
        }
        assert_eq!(
            last,
            Some(PushEvent::Progress {
                digest: d,
                sent: 200_000,
                total: 200_000
            }),
            "the end is always reported"
        );
        // A file shorter than asked is an error, not a short body.
        let short = file_body(path, 150_000, 100_000, meter);
        let mut stream = http_body_util::BodyDataStream::new(short);
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            failed |= chunk.is_err();
        }
        assert!(failed);
    }

    /// A registry that keeps only half of the first chunk it is sent, answers with relative
    /// locations, and wants Basic credentials on every request.
    mod fake {
        use std::collections::HashMap;
        use std::sync::Mutex;

        use http_body_util::{BodyExt, Full};
        use hyper::{Request, Response};
        use sha2::Digest as _;

        #[derive(Default)]
        pub struct State {
            pub uploads: HashMap<String, Vec<u8>>,
            pub blobs: HashMap<String, Vec<u8>>,
            pub manifests: HashMap<String, (String, Vec<u8>)>,
            pub patches: Vec<String>,
            pub unauthorized: usize,
            truncated: bool,
            next: usize,
        }

        pub type Shared = std::sync::Arc<Mutex<State>>;

        fn answer(status: u16, headers: &[(&str, String)]) -> Response<Full<bytes::Bytes>> {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(*k, v);
            }
            b.body(Full::new(bytes::Bytes::new())).expect("response")
        }

        pub async fn serve(state: Shared) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            addr
        }

        async fn handle(
            state: &Shared,
            req: Request<hyper::body::Incoming>,
        ) -> Response<Full<bytes::Bytes>> {
            let authorized = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v == "Basic dTpw");
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            let range = req
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = req.into_body().collect().await.expect("body").to_bytes();
            if !authorized {
                state.lock().expect("state").unauthorized += 1;
                return answer(401, &[("WWW-Authenticate", r#"Basic realm="fake""#.into())]);
            }
            let mut st = state.lock().expect("state");
            let upload = path
                .strip_prefix("/v2/app/blobs/uploads/")
                .map(str::to_owned);
            match (method.as_str(), path.as_str(), upload) {
                ("GET", "/v2/", _) => answer(200, &[]),
                ("HEAD", p, _) if p.starts_with("/v2/app/blobs/") => {
                    let d = p.trim_start_matches("/v2/app/blobs/");
                    answer(if st.blobs.contains_key(d) { 200 } else { 404 }, &[])
                }
                ("POST", _, Some(id)) if id.is_empty() => {
                    st.next += 1;
                    let id = format!("u{}", st.next);
                    st.uploads.insert(id.clone(), Vec::new());
                    answer(202, &[("Location", format!("/v2/app/blobs/uploads/{id}"))])
                }
                ("PATCH", _, Some(id)) => {
                    st.patches.push(range.clone().unwrap_or_default());
                    let keep = if st.truncated {
                        body.len()
                    } else {
                        st.truncated = true;
                        body.len() / 2
                    };
                    let Some(have) = st.uploads.get_mut(&id) else {
                        return answer(404, &[]);
                    };
                    let start: usize = range
                        .as_deref()
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    if start != have.len() {
                        return answer(416, &[]);
                    }
                    have.extend_from_slice(&body[..keep]);
                    let last = have.len() - 1;
                    answer(
                        202,
                        &[
                            ("Location", format!("/v2/app/blobs/uploads/{id}")),
                            ("Range", format!("0-{last}")),
                        ],
                    )
                }
                ("PUT", _, Some(id)) => {
                    let Some(mut have) = st.uploads.remove(&id) else {
                        return answer(404, &[]);
                    };
                    have.extend_from_slice(&body);
                    let digest = query.trim_start_matches("digest=").replace("%3A", ":");
                    let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&have)));
                    if got != digest {
                        return answer(400, &[]);
                    }
                    st.blobs.insert(digest, have);
                    answer(201, &[])
                }
                ("PUT", p, _) if p.starts_with("/v2/app/manifests/") => {
                    let tag = p.trim_start_matches("/v2/app/manifests/").to_owned();
                    st.manifests.insert(tag, (ctype, body.to_vec()));
                    answer(201, &[])
                }
                _ => answer(404, &[]),
            }
        }
    }

    #[tokio::test]
    async fn uploads_resume_where_the_registry_stands_and_authenticate_every_request() {
        let state = fake::Shared::default();
        let addr = fake::serve(state.clone()).await;
        let config = crate::config::Config::default();
        let ep = registry::endpoints(&config, &addr)
            .expect("endpoints")
            .pop()
            .expect("endpoint");
        let r = Reference::parse(&format!("{addr}/app:1")).expect("reference");
        let auth = RegistryAuth::Basic("u".into(), "p".into());
        let job = Job {
            base: ep.repo_url(&r),
            ep: &ep,
            r: &r,
            auth: &auth,
            chunk: 1000,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = Vec::new();
        for (i, len) in [2500usize, 700].into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            let digest = super::super::sha256(&data);
            let path = dir.path().join(format!("b{i}"));
            std::fs::write(&path, &data).expect("write");
            blobs.push((data, digest, path));
        }
        for (data, digest, path) in &blobs {
            let d = Descriptor {
                media_type: "application/octet-stream".into(),
                digest: digest.clone(),
                size: data.len() as i64,
                platform: None,
            };
            let meter = Arc::new(Meter {
                digest: digest.clone(),
                total: data.len() as u64,
                sent: AtomicU64::new(0),
                reported: AtomicU64::new(0),
                events: None,
            });
            let got = job.blob(&d, path.clone(), &[], meter.clone()).await;
            assert_eq!(got.expect("push"), Outcome::Uploaded);
            let again = job.blob(&d, path.clone(), &[], meter).await;
            assert_eq!(again.expect("again"), Outcome::Exists);
        }
        job.manifest(
            "1",
            "application/x-test",
            Bytes::from_static(b"{}"),
            &blobs[1].1,
        )
        .await
        .expect("manifest");
        let st = state.lock().expect("state");
        for (data, digest, _) in &blobs {
            assert_eq!(st.blobs.get(digest.as_str()), Some(data), "{digest}");
        }
        // 2500 bytes in 1000-byte chunks, the first kept only half: 0-999 (500 kept),
        // 500-1499, 1500-2499. The 700-byte blob went in one PUT.
        assert_eq!(st.patches, ["0-999", "500-1499", "1500-2499"]);
        assert_eq!(
            st.manifests.get("1"),
            Some(&("application/x-test".to_owned(), b"{}".to_vec()))
        );
        assert!(st.unauthorized >= 1, "the registry asked for credentials");
    }
}
