//! Talking to registries: which endpoints to try (mirrors, plain HTTP), credentials, manifest
//! resolution to this host's platform, and blob streams.
//!
//! `oci-client` does the authentication (the `/v2/` challenge and the bearer-token flow); the
//! requests themselves are ours, so that no response body is ever read without a bound: a
//! hostile registry can answer anything, as long as it likes.

use std::collections::HashMap;
use std::sync::Arc;

use api::Digest;
use base64::Engine;
use bytes::Bytes;
use futures::stream::BoxStream;
use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::{Reference, Target};
use crate::config::Config;
use crate::error::{Error, Result, chain};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Manifests and configs are small; anything bigger is hostile.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// How much of an error response is read: enough for any registry's error document.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

/// One place to fetch from: a mirror or the registry itself.
#[derive(Clone)]
pub struct Endpoint {
    /// `host[:port]` to connect to.
    pub host: String,
    /// Plain HTTP.
    pub plain_http: bool,
    /// Authentication only: the `/v2/` challenge and the token flow.
    auth_client: Arc<oci_client::Client>,
    /// Every manifest and blob request.
    http: reqwest::Client,
    /// Credentials that worked, by repository, for the life of this endpoint (one pull).
    creds: Arc<tokio::sync::Mutex<HashMap<String, Credential>>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.host)
    }
}

/// What a request to an endpoint carries.
#[derive(Clone, Debug)]
enum Credential {
    Anonymous,
    Bearer(String),
    Basic(String, String),
}

/// Whether docker would talk plain HTTP to this host without being told: loopback.
fn is_loopback_host(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The endpoints to try for `registry`, in order: configured mirrors, then the registry.
pub fn endpoints(config: &Config, registry: &str) -> Result<Vec<Endpoint>> {
    let rc = config.registry.get(registry).cloned().unwrap_or_default();
    let mut out = Vec::new();
    for m in &rc.mirrors {
        let (plain, rest) = if let Some(r) = m.strip_prefix("http://") {
            (true, r)
        } else {
            (false, m.strip_prefix("https://").unwrap_or(m))
        };
        let host = rest.trim_end_matches('/').trim_end_matches("/v2");
        out.push(endpoint(
            host,
            plain || is_loopback_host(host) && !m.starts_with("https://"),
        )?);
    }
    out.push(endpoint(
        registry,
        rc.insecure || is_loopback_host(registry),
    )?);
    Ok(out)
}

fn endpoint(host: &str, plain_http: bool) -> Result<Endpoint> {
    let protocol = if plain_http {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let auth_client = oci_client::Client::new(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: USER_AGENT,
        ..Default::default()
    });
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| Error::internal("build HTTP client", e))?;
    Ok(Endpoint {
        host: host.to_owned(),
        plain_http,
        auth_client: Arc::new(auth_client),
        http,
        creds: Arc::default(),
    })
}

impl Endpoint {
    fn scheme(&self) -> &'static str {
        if self.plain_http { "http" } else { "https" }
    }

    /// `scheme://host/v2/<repository>/`, with the default registry's API host, as the
    /// authentication client addresses it.
    pub(super) fn repo_url(&self, r: &Reference) -> String {
        let host = match self.host.as_str() {
            "docker.io" => "index.docker.io",
            h => h,
        };
        format!("{}://{host}/v2/{}/", self.scheme(), r.repository)
    }

    /// The credential for `r`'s repository and `op`: the bearer token of the registry's token
    /// flow, or none; Basic credentials are added when the registry asks for them (see
    /// [`Self::send`]).
    async fn credential(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        op: RegistryOperation,
        fresh: bool,
    ) -> Result<Credential> {
        let key = cred_key(r, op);
        let mut creds = self.creds.lock().await;
        if !fresh && let Some(c) = creds.get(&key) {
            return Ok(c.clone());
        }
        let oref = oci_client::Reference::with_tag(
            self.host.clone(),
            r.repository.clone(),
            "latest".to_owned(),
        );
        let c = match self
            .auth_client
            .auth(&oref, auth, op)
            .await
            .map_err(|e| map_err(self, "authentication", e))?
        {
            Some(token) => Credential::Bearer(token),
            None => Credential::Anonymous,
        };
        creds.insert(key, c.clone());
        Ok(c)
    }

    /// `GET <repo_url><path>` with pull credentials (see [`Self::send`]). Errors unless the
    /// answer is `200 OK`; an error body is read only up to [`MAX_ERROR_BODY_BYTES`].
    async fn get(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        path: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.repo_url(r));
        let resp = self
            .send(r, auth, RegistryOperation::Pull, what, |http| {
                let req = http.get(&url);
                Ok(match accept {
                    Some(a) => req.header(reqwest::header::ACCEPT, a),
                    None => req,
                })
            })
            .await?;
        if resp.status() == StatusCode::OK {
            return Ok(resp);
        }
        Err(error_of(self, what, resp).await)
    }

    /// Sends the request `build` makes (called again for a retry, so a body is made anew) with
    /// the credentials for `r`'s repository and `op`, and returns the answer whatever its
    /// status. A `401` is answered once, by sending Basic credentials if we have them, or by
    /// fetching a fresh token. Credentials go only to this endpoint's host: an upload URL
    /// elsewhere (a storage backend's) gets none.
    pub(super) async fn send(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        op: RegistryOperation,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        let cred = self.credential(r, auth, op, false).await?;
        let retry = Some((cred_key(r, op), op));
        self.send_as(r, auth, retry, cred, what, build).await
    }

    /// [`Self::send`] for a cross-repository mount from `from`: where the registry hands out
    /// tokens, with one that may also pull `from` (a push token for `r` alone does not let the
    /// registry link a blob out of another repository). A `401` is not retried: a mount is
    /// only an offer, and an upload follows a refused one.
    pub(super) async fn send_mount(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        from: &str,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        let base = self
            .credential(r, auth, RegistryOperation::Push, false)
            .await?;
        let cred = match (&base, auth) {
            (Credential::Bearer(_), RegistryAuth::Basic(..) | RegistryAuth::Anonymous) => {
                let key = format!("{} push {from} pull", r.repository);
                let cached = self.creds.lock().await.get(&key).cloned();
                match cached {
                    Some(c) => c,
                    None => {
                        let scopes = [
                            format!("repository:{}:pull,push", r.repository),
                            format!("repository:{from}:pull"),
                        ];
                        let c = match self.scoped_token(r, auth, &scopes).await {
                            Ok(Some(t)) => Credential::Bearer(t),
                            Ok(None) => base,
                            Err(e) => {
                                tracing::debug!(endpoint = ?self, error = %e, "no token for a cross-repository mount");
                                base
                            }
                        };
                        self.creds.lock().await.insert(key, c.clone());
                        c
                    }
                }
            }
            _ => base,
        };
        self.send_as(r, auth, None, cred, what, build).await
    }

    /// A token for all of `scopes` from the registry's token server (the realm of its `/v2/`
    /// challenge), with `auth`'s Basic credentials if any. None if the registry sends no
    /// Bearer challenge or the token server refuses.
    async fn scoped_token(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        scopes: &[String],
    ) -> Result<Option<String>> {
        let what = "token request";
        let unavailable =
            |e: reqwest::Error| Error::Unavailable(format!("{what} for {self:?}: {}", chain(&e)));
        let base = self.repo_url(r);
        let v2 = match base.find("/v2/") {
            Some(i) => &base[..i + 4],
            None => return Ok(None),
        };
        let resp = self.http.get(v2).send().await.map_err(unavailable)?;
        let Some((realm, service)) = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(bearer_challenge)
        else {
            return Ok(None);
        };
        let mut query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", s.as_str())).collect();
        if let Some(svc) = &service {
            query.push(("service", svc));
        }
        let mut req = self.http.get(&realm).query(&query);
        if let RegistryAuth::Basic(u, p) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.map_err(unavailable)?;
        if resp.status() != StatusCode::OK {
            return Ok(None);
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let body = read_bounded(self, what, resp, MAX_ERROR_BODY_BYTES).await?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| Error::Remote(format!("{what} for {self:?}: {e}")))?;
        Ok(t.token.or(t.access_token).filter(|t| !t.is_empty()))
    }

    /// Sends with `cred`; on a `401` to our host, with `retry` (the credential's cache key and
    /// operation), tries once more as [`Self::send`] describes.
    async fn send_as(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        retry: Option<(String, RegistryOperation)>,
        mut cred: Credential,
        what: &str,
        build: impl Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        let mut retried = false;
        loop {
            let req = build(&self.http)?
                .build()
                .map_err(|e| Error::internal("build registry request", e))?;
            let ours = same_origin(&self.repo_url(r), req.url());
            let pull = req.method() == reqwest::Method::GET;
            let mut req = reqwest::RequestBuilder::from_parts(self.http.clone(), req);
            if ours {
                req = match &cred {
                    Credential::Anonymous => req,
                    Credential::Bearer(t) => req.bearer_auth(t),
                    Credential::Basic(u, p) => req.basic_auth(u, Some(p)),
                };
            }
            let resp = req.send().await.map_err(|e| {
                let dir = if pull { "from" } else { "to" };
                Error::Unavailable(format!("{what} {dir} {self:?}: {}", chain(&e)))
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED
                && !retried
                && ours
                && let Some((key, op)) = &retry
            {
                retried = true;
                let next = match (&cred, auth) {
                    (Credential::Anonymous, RegistryAuth::Basic(u, p)) => {
                        Some(Credential::Basic(u.clone(), p.clone()))
                    }
                    // Tokens expire; a long pull or push may outlive one.
                    (Credential::Bearer(_), _) => Some(self.credential(r, auth, *op, true).await?),
                    _ => None,
                };
                if let Some(next) = next {
                    self.creds.lock().await.insert(key.clone(), next.clone());
                    cred = next;
                    continue;
                }
            }
            return Ok(resp);
        }
    }
}

/// Whether `url` is on the registry whose repository URL is `home` (scheme, host and port,
/// default ports included): only there do credentials go.
fn same_origin(home: &str, url: &reqwest::Url) -> bool {
    reqwest::Url::parse(home).is_ok_and(|h| h.origin() == url.origin())
}

/// The realm and service of a `WWW-Authenticate: Bearer realm="…",service="…",…` challenge.
fn bearer_challenge(h: &str) -> Option<(String, Option<String>)> {
    let (scheme, rest) = h.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let realm = params.remove("realm").filter(|r| !r.is_empty())?;
    Some((realm, params.remove("service")))
}

/// Credentials are per repository and operation: a push token is not a pull token.
fn cred_key(r: &Reference, op: RegistryOperation) -> String {
    match op {
        RegistryOperation::Pull => r.repository.clone(),
        RegistryOperation::Push => format!("{} push", r.repository),
    }
}

/// The error for a registry's unwanted answer, reading at most [`MAX_ERROR_BODY_BYTES`] of it.
pub(super) async fn error_of(ep: &Endpoint, what: &str, resp: reqwest::Response) -> Error {
    let status = resp.status();
    let body = read_capped(resp, MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_default();
    status_error(ep, what, status, &body)
}

/// The body, cut at `cap` bytes: for error messages, where the rest does not matter.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> reqwest::Result<Vec<u8>> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() == cap {
            break;
        }
    }
    Ok(buf)
}

/// The body, or BadContent as soon as it is known to be longer than `cap` (by its
/// Content-Length or by what arrived). Never holds more than `cap` bytes (plus one chunk).
async fn read_bounded(
    ep: &Endpoint,
    what: &str,
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>> {
    let too_big = || Error::BadContent(format!("{what} from {ep:?}: larger than {cap} bytes"));
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_big());
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::Unavailable(format!("{what} from {ep:?}: {}", chain(&e))))?
    {
        if chunk.len() > cap - buf.len() {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// The error for a registry's non-`200` answer. Only content checks give BadContent: a status
/// is never the content's fault.
fn status_error(ep: &Endpoint, what: &str, status: StatusCode, body: &[u8]) -> Error {
    let envelope = serde_json::from_slice::<OciEnvelope>(body).ok();
    let detail = match &envelope {
        Some(env) => env.to_string(),
        None => String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(512)
            .collect(),
    };
    let msg = if detail.is_empty() {
        format!("{what} from {ep:?}: HTTP {status}")
    } else {
        format!("{what} from {ep:?}: HTTP {status}: {detail}")
    };
    let has = |f: fn(&OciErrorCode) -> bool| {
        envelope
            .as_ref()
            .is_some_and(|env| env.errors.iter().any(|e| f(&e.code)))
    };
    match status.as_u16() {
        401 | 403 => Error::Unauthenticated(msg),
        404 => Error::NotFound(msg),
        429 => Error::Unavailable(msg),
        500.. => Error::Unavailable(msg),
        400..500 if has(|c| matches!(c, OciErrorCode::Toomanyrequests)) => Error::Unavailable(msg),
        400..500 if has(|c| matches!(c, OciErrorCode::Denied | OciErrorCode::Unauthorized)) => {
            Error::Unauthenticated(msg)
        }
        400..500 if has(is_not_found) => Error::NotFound(msg),
        _ => Error::Remote(msg),
    }
}

fn is_not_found(c: &OciErrorCode) -> bool {
    matches!(
        c,
        OciErrorCode::ManifestUnknown
            | OciErrorCode::NameUnknown
            | OciErrorCode::BlobUnknown
            | OciErrorCode::NotFound
    )
}

/// CRI credentials as the registry client takes them.
pub fn auth_from_cri(auth: Option<&api::cri::AuthConfig>) -> Result<RegistryAuth> {
    let Some(a) = auth else {
        return Ok(RegistryAuth::Anonymous);
    };
    if !a.registry_token.is_empty() {
        return Ok(RegistryAuth::Bearer(a.registry_token.clone()));
    }
    if !a.username.is_empty() {
        return Ok(RegistryAuth::Basic(a.username.clone(), a.password.clone()));
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| Error::InvalidArgument("auth: not valid base64".into()))?;
        let s = String::from_utf8(raw)
            .map_err(|_| Error::InvalidArgument("auth: not valid UTF-8".into()))?;
        let (u, p) = s.split_once(':').ok_or_else(|| {
            Error::InvalidArgument("auth: expected base64 of user:password".into())
        })?;
        return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
    }
    if !a.identity_token.is_empty() {
        // An identity token is an OAuth2 refresh token; the registry client has no refresh flow,
        // so it is offered as a bearer token, which registries that mint long-lived identity
        // tokens accept.
        return Ok(RegistryAuth::Bearer(a.identity_token.clone()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// Maps an authentication failure of the registry client to the core's error, naming the
/// registry.
pub fn map_err(ep: &Endpoint, what: &str, e: OciDistributionError) -> Error {
    use OciDistributionError as O;
    let msg = format!("{what} from {ep:?}: {}", chain(&e));
    match &e {
        O::RegistryError { envelope, .. } => {
            let has = |f: fn(&OciErrorCode) -> bool| envelope.errors.iter().any(|x| f(&x.code));
            if has(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                Error::Unavailable(msg)
            } else if has(|c| matches!(c, OciErrorCode::Denied | OciErrorCode::Unauthorized)) {
                Error::Unauthenticated(msg)
            } else if has(is_not_found) {
                Error::NotFound(msg)
            } else {
                Error::Remote(msg)
            }
        }
        O::ImageManifestNotFoundError(_) | O::ServerError { code: 404, .. } => Error::NotFound(msg),
        O::AuthenticationFailure(_)
        | O::UnauthorizedError { .. }
        | O::ServerError {
            code: 401 | 403, ..
        } => Error::Unauthenticated(msg),
        O::ServerError { code: 429, .. } => Error::Unavailable(msg),
        O::ServerError { code, .. } if *code >= 500 => Error::Unavailable(msg),
        O::RequestError(_) | O::IoError(_) => Error::Unavailable(msg),
        O::DigestError(_) => Error::BadContent(msg),
        _ => Error::Remote(msg),
    }
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Raw bytes, as digested.
    pub bytes: Bytes,
    /// Their sha256.
    pub digest: Digest,
    /// Media type (from the document, or inferred from its shape).
    pub media_type: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::from_sha256_bytes(&Sha256::digest(bytes).into())
}

fn classify(bytes: &[u8]) -> std::result::Result<String, String> {
    let s: Shape =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    if s.schema_version != Some(2) {
        return Err(format!(
            "unsupported manifest schema version {:?} (only schema 2 / OCI manifests are supported)",
            s.schema_version
        ));
    }
    match s.media_type.as_deref() {
        Some(t) if ACCEPT.contains(&t) => Ok(t.to_owned()),
        Some(t) => Err(format!("unsupported manifest media type {t:?}")),
        None if s.manifests.is_some() => Ok(OCI_INDEX.to_owned()),
        None if s.layers.is_some() && s.config.is_some() => Ok(OCI_MANIFEST.to_owned()),
        None => Err("document is neither an image manifest nor an index".to_owned()),
    }
}

/// Fetches the manifest `target` of `r` from the first endpoint that answers, returning the
/// endpoint used (so blobs come from the same place). Any failure of an endpoint (down, rate
/// limited, refusing, not having it) moves on to the next: a mirror must never block the
/// registry. Content that fails verification stops the pull. NotFound from every endpoint is
/// NotFound; otherwise the registry's own (last) error is returned.
pub async fn fetch_manifest(
    eps: &[Endpoint],
    r: &Reference,
    target: &Target,
    auth: &RegistryAuth,
) -> Result<(Endpoint, Fetched)> {
    let mut last = None;
    for ep in eps {
        match fetch_manifest_at(ep, r, target, auth).await {
            Ok(f) => return Ok((ep.clone(), f)),
            // Hostile or corrupt content is an answer, not an outage: don't hide it behind
            // another endpoint's error.
            Err(e @ Error::BadContent(_)) => return Err(e),
            Err(e) => {
                tracing::debug!(endpoint = ?ep, error = %e, "manifest fetch failed, trying next endpoint");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Internal("no registry endpoint".into())))
}

/// Fetches a manifest from one endpoint, reading at most [`MAX_MANIFEST_BYTES`], and verifies
/// its digest and media type.
pub async fn fetch_manifest_at(
    ep: &Endpoint,
    r: &Reference,
    target: &Target,
    auth: &RegistryAuth,
) -> Result<Fetched> {
    let what = format!("manifest {}", r.with_target(target));
    let path = match target {
        Target::Tag(t) => format!("manifests/{t}"),
        Target::Digest(d) => format!("manifests/{d}"),
    };
    let resp = ep
        .get(r, auth, &path, Some(&ACCEPT.join(", ")), &what)
        .await?;
    let bytes = Bytes::from(read_bounded(ep, &what, resp, MAX_MANIFEST_BYTES).await?);
    let digest = sha256(&bytes);
    if let Target::Digest(want) = target
        && &digest != want
    {
        return Err(Error::BadContent(format!(
            "{what}: content has digest {digest}"
        )));
    }
    let media_type = classify(&bytes).map_err(|m| Error::BadContent(format!("{what}: {m}")))?;
    Ok(Fetched {
        bytes,
        digest,
        media_type,
    })
}

/// Streams a blob from `ep`: its Content-Length, if sent, and its bytes as they arrive. The
/// caller verifies size and digest.
pub async fn blob_stream(
    ep: &Endpoint,
    r: &Reference,
    digest: &Digest,
    auth: &RegistryAuth,
) -> Result<(Option<u64>, BoxStream<'static, std::io::Result<Bytes>>)> {
    let what = format!("blob {digest}");
    let resp = ep
        .get(r, auth, &format!("blobs/{digest}"), None, &what)
        .await?;
    let len = resp.content_length();
    let stream = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(b)) => Some((Ok(b), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    Ok((len, Box::pin(stream)))
}

/// The `os/arch` of this host, in OCI terms.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegistryConfig;

    #[test]
    fn credentials_stay_on_the_registry() {
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        let home = "https://registry.example/v2/app/";
        assert!(same_origin(
            home,
            &url("https://registry.example/v2/app/blobs/uploads/u")
        ));
        assert!(same_origin(
            home,
            &url("https://registry.example:443/v2/other/")
        ));
        assert!(!same_origin(home, &url("https://storage.example/upload/u")));
        assert!(!same_origin(home, &url("http://registry.example/v2/app/")));
        assert!(!same_origin(
            home,
            &url("https://registry.example:5000/v2/app/")
        ));
        assert!(same_origin(
            "http://[::1]:5000/v2/a/",
            &url("http://[::1]:5000/v2/a/blobs/x")
        ));
    }

    #[test]
    fn bearer_challenges_give_realm_and_service() {
        assert_eq!(
            bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
            ),
            Some((
                "https://auth.example/token".into(),
                Some("registry.example".into())
            ))
        );
        assert_eq!(
            bearer_challenge(r#"bearer service="s", realm="http://t/a\"b""#),
            Some((r#"http://t/a"b"#.into(), Some("s".into())))
        );
        assert_eq!(
            bearer_challenge("Bearer realm=http://t/token"),
            Some(("http://t/token".into(), None))
        );
        assert_eq!(bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(bearer_challenge(r#"Bearer service="s""#), None);
        assert_eq!(bearer_challenge("Bearer"), None);
    }

    #[test]
    fn classifies_manifests() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(classify(m), Ok(OCI_MANIFEST.to_owned()));
        // OCI allows omitting mediaType: the shape decides.
        assert_eq!(
            classify(br#"{"schemaVersion":2,"manifests":[]}"#),
            Ok(OCI_INDEX.to_owned())
        );
        assert_eq!(
            classify(br#"{"schemaVersion":2,"config":{},"layers":[]}"#),
            Ok(OCI_MANIFEST.to_owned())
        );
        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(
            classify(schema1)
                .expect_err("schema 1")
                .contains("schema version")
        );
        let odd = br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        assert!(classify(odd).expect_err("odd").contains("media type"));
        assert!(classify(b"not json").is_err());
        assert!(classify(br#"{"schemaVersion":2}"#).is_err());
    }

    #[test]
    fn endpoints_put_mirrors_first_and_plain_http_where_docker_does() {
        let mut config = Config::default();
        config.registry.insert(
            "docker.io".into(),
            RegistryConfig {
                mirrors: vec![
                    "http://127.0.0.1:5000".into(),
                    "https://mirror.example/".into(),
                ],
                insecure: false,
            },
        );
        config.registry.insert(
            "10.1.2.3:5000".into(),
            RegistryConfig {
                mirrors: vec![],
                insecure: true,
            },
        );
        let eps = endpoints(&config, "docker.io").expect("endpoints");
        let got: Vec<(String, bool)> = eps.iter().map(|e| (e.host.clone(), e.plain_http)).collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1:5000".into(), true),
                ("mirror.example".into(), false),
                ("docker.io".into(), false)
            ]
        );
        assert!(
            endpoints(&config, "10.1.2.3:5000").expect("endpoints")[0].plain_http,
            "insecure"
        );
        assert!(
            endpoints(&config, "localhost:5000").expect("endpoints")[0].plain_http,
            "loopback needs no config"
        );
        assert!(endpoints(&config, "127.0.0.9:80").expect("endpoints")[0].plain_http);
        assert!(endpoints(&config, "[::1]:5000").expect("endpoints")[0].plain_http);
        assert!(!endpoints(&config, "registry.example:5000").expect("endpoints")[0].plain_http);
    }

    #[test]
    fn registry_answers_map_to_codes() {
        let ep = endpoint("registry.example", false).expect("endpoint");
        let env = |code: &str| format!(r#"{{"errors":[{{"code":"{code}","message":"m"}}]}}"#);
        let map = |status: u16, body: &str| {
            status_error(
                &ep,
                "manifest x",
                StatusCode::from_u16(status).expect("status"),
                body.as_bytes(),
            )
        };
        assert!(matches!(map(401, ""), Error::Unauthenticated(_)));
        assert!(matches!(
            map(403, &env("DENIED")),
            Error::Unauthenticated(_)
        ));
        assert!(matches!(
            map(400, &env("DENIED")),
            Error::Unauthenticated(_)
        ));
        assert!(matches!(
            map(400, &env("UNAUTHORIZED")),
            Error::Unauthenticated(_)
        ));
        assert!(matches!(map(404, "gone"), Error::NotFound(_)));
        assert!(matches!(
            map(400, &env("MANIFEST_UNKNOWN")),
            Error::NotFound(_)
        ));
        assert!(matches!(map(429, ""), Error::Unavailable(_)));
        assert!(matches!(
            map(400, &env("TOOMANYREQUESTS")),
            Error::Unavailable(_)
        ));
        assert!(matches!(map(503, ""), Error::Unavailable(_)));
        // Nothing a status says is the content's fault.
        assert!(matches!(
            map(400, &env("MANIFEST_INVALID")),
            Error::Remote(_)
        ));
        assert!(matches!(map(418, "teapot"), Error::Remote(_)));
        assert!(matches!(map(302, ""), Error::Remote(_)));
        let msg = map(404, "no such thing").to_string();
        assert!(
            msg.contains("https://registry.example") && msg.contains("no such thing"),
            "{msg}"
        );
    }

    #[test]
    fn cri_auth_forms() {
        use base64::Engine as _;
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        let a = |f: fn(&mut api::cri::AuthConfig)| {
            let mut c = api::cri::AuthConfig::default();
            f(&mut c);
            auth_from_cri(Some(&c))
        };
        assert!(matches!(auth_from_cri(None), Ok(RegistryAuth::Anonymous)));
        assert!(matches!(a(|_| {}), Ok(RegistryAuth::Anonymous)));
        let got = a(|c| {
            c.username = "u".into();
            c.password = "p".into();
        })
        .expect("user/pass");
        assert!(
            matches!((got, basic("u", "p")), (RegistryAuth::Basic(a, b), RegistryAuth::Basic(c, d)) if a == c && b == d)
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let got = auth_from_cri(Some(&api::cri::AuthConfig {
            auth: encoded,
            ..Default::default()
        }))
        .expect("auth");
        assert!(matches!(got, RegistryAuth::Basic(u, p) if u == "user" && p == "pa:ss"));
        assert!(
            matches!(a(|c| c.registry_token = "t".into()), Ok(RegistryAuth::Bearer(t)) if t == "t")
        );
        assert!(matches!(
            a(|c| c.auth = "!!".into()),
            Err(Error::InvalidArgument(_))
        ));
        let no_colon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        assert!(matches!(
            auth_from_cri(Some(&api::cri::AuthConfig {
                auth: no_colon,
                ..Default::default()
            })),
            Err(Error::InvalidArgument(_))
        ));
    }
}
