//! Talking to registries: which endpoints to try (mirrors, plain HTTP), credentials, manifest
//! resolution to this host's platform, and blob streams. Built on `oci-client`.

use std::sync::Arc;

use api::Digest;
use base64::Engine;
use bytes::Bytes;
use futures::stream::BoxStream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
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

/// One place to fetch from: a mirror or the registry itself.
#[derive(Clone)]
pub struct Endpoint {
    /// `host[:port]` to connect to.
    pub host: String,
    /// Plain HTTP.
    pub plain_http: bool,
    client: Arc<oci_client::Client>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}",
            if self.plain_http { "http" } else { "https" },
            self.host
        )
    }
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
pub fn endpoints(config: &Config, registry: &str) -> Vec<Endpoint> {
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
        ));
    }
    // The registry client itself maps the default registry to its API host.
    out.push(endpoint(
        registry,
        rc.insecure || is_loopback_host(registry),
    ));
    out
}

fn endpoint(host: &str, plain_http: bool) -> Endpoint {
    let protocol = if plain_http {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = oci_client::Client::new(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    });
    Endpoint {
        host: host.to_owned(),
        plain_http,
        client: Arc::new(client),
    }
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

/// The reference as the registry client wants it, aimed at `ep`.
fn oci_ref(ep: &Endpoint, r: &Reference, target: &Target) -> oci_client::Reference {
    match target {
        Target::Tag(t) => {
            oci_client::Reference::with_tag(ep.host.clone(), r.repository.clone(), t.clone())
        }
        Target::Digest(d) => {
            oci_client::Reference::with_digest(ep.host.clone(), r.repository.clone(), d.to_string())
        }
    }
}

/// Maps a registry client error to the core's error, naming the registry.
pub fn map_err(ep: &Endpoint, what: &str, e: OciDistributionError) -> Error {
    use OciDistributionError as O;
    let msg = format!("{what} from {ep:?}: {}", chain(&e));
    match &e {
        O::ImageManifestNotFoundError(_) => Error::NotFound(msg),
        O::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                use oci_client::errors::OciErrorCode as C;
                matches!(
                    x.code,
                    C::ManifestUnknown | C::NameUnknown | C::BlobUnknown | C::NotFound
                )
            }) =>
        {
            Error::NotFound(msg)
        }
        O::ServerError { code: 404, .. } => Error::NotFound(msg),
        O::AuthenticationFailure(_) | O::UnauthorizedError { .. } => Error::Unauthenticated(msg),
        O::ServerError {
            code: 401 | 403, ..
        } => Error::Unauthenticated(msg),
        O::RequestError(r) if r.is_connect() || r.is_timeout() => Error::Unavailable(msg),
        O::RequestError(_) | O::IoError(_) => Error::Unavailable(msg),
        O::ServerError { code, .. } if *code >= 500 => Error::Unavailable(msg),
        O::DigestError(_) => Error::BadContent(msg),
        _ => Error::BadContent(msg),
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
/// endpoint used (so blobs come from the same place). NotFound from every endpoint is NotFound;
/// otherwise the last endpoint's error is returned.
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

/// Fetches a manifest from one endpoint, verifying its digest and media type.
pub async fn fetch_manifest_at(
    ep: &Endpoint,
    r: &Reference,
    target: &Target,
    auth: &RegistryAuth,
) -> Result<Fetched> {
    let what = format!("manifest {}", r.with_target(target));
    let (bytes, _) = ep
        .client
        .pull_manifest_raw(&oci_ref(ep, r, target), auth, ACCEPT)
        .await
        .map_err(|e| map_err(ep, &what, e))?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::BadContent(format!(
            "{what}: larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
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

/// Streams a blob from `ep`.
pub async fn blob_stream(
    ep: &Endpoint,
    r: &Reference,
    digest: &Digest,
) -> Result<(Option<u64>, BoxStream<'static, std::io::Result<Bytes>>)> {
    let target = Target::Digest(digest.clone());
    let s = ep
        .client
        .pull_blob_stream(&oci_ref(ep, r, &target), digest.as_str())
        .await
        .map_err(|e| map_err(ep, &format!("blob {digest}"), e))?;
    Ok((s.content_length, s.stream))
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
        let eps = endpoints(&config, "docker.io");
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
            endpoints(&config, "10.1.2.3:5000")[0].plain_http,
            "insecure"
        );
        assert!(
            endpoints(&config, "localhost:5000")[0].plain_http,
            "loopback needs no config"
        );
        assert!(endpoints(&config, "127.0.0.9:80")[0].plain_http);
        assert!(endpoints(&config, "[::1]:5000")[0].plain_http);
        assert!(!endpoints(&config, "registry.example:5000")[0].plain_http);
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
