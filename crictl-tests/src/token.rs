//! A Docker/OCI bearer-token server for tests.
//!
//! [`TokenServer`] implements the token endpoint of the Docker registry token-auth flow
//! (<https://distribution.github.io/distribution/spec/auth/token/>): a registry started with
//! [`Registry::start_with_token_auth`](crate::registry::Registry::start_with_token_auth) answers
//! `401` with `WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope="..."`; the
//! client then sends `GET <realm>?service=...&scope=repository:<repo>:pull[,push]` (with HTTP
//! Basic credentials, or anonymously) here, and retries at the registry with
//! `Authorization: Bearer <token>`.
//!
//! The server listens on a free `127.0.0.1` port and speaks just enough HTTP/1.1 for that one
//! request (one request per connection, `Connection: close`). Tokens are JWTs signed with ES256
//! by a P-256 key generated per server; the header carries `x5c` with the base64 DER of a
//! self-signed certificate for that key, which the registry trusts through its `rootcertbundle`
//! ([`TokenServer::cert_pem`]). That is how the distribution registry v2.8 verifies tokens: the
//! `x5c` chain must verify against the root bundle, `alg` must match the key type, `iss` must be
//! the configured issuer, `aud` the configured service, `nbf`/`exp` must be current (60 s
//! leeway), and `access` must cover every requested action.
//!
//! Dropping the server stops it (the accept loop and every open connection are aborted).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SecureRandom as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The `service` (JWT audience) the test registry and token server agree on by default.
pub const DEFAULT_SERVICE: &str = "berth-test-registry";

/// The JWT issuer the test registry trusts by default.
pub const DEFAULT_ISSUER: &str = "berth-test-issuer";

/// Lifetime of issued tokens (`expires_in`, `exp - iat`).
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// The path the token endpoint is served on.
pub const TOKEN_PATH: &str = "/token";

/// Largest request head accepted; anything longer is answered with `431`.
const MAX_HEAD: usize = 16 * 1024;

/// How long a connection may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`TokenServer`] accepts and whom it trusts.
#[derive(Clone, Debug)]
pub struct TokenServerConfig {
    /// `iss` of issued tokens; the registry's `auth.token.issuer`.
    pub issuer: String,
    /// Expected `service` query parameter and `aud` of issued tokens; the registry's
    /// `auth.token.service`.
    pub service: String,
    /// The one user accepted with HTTP Basic credentials.
    pub user: String,
    /// That user's password.
    pub password: String,
    /// Whether requests without credentials get a pull-only token (`true`) or `401` (`false`).
    pub allow_anonymous: bool,
}

impl TokenServerConfig {
    /// [`DEFAULT_ISSUER`], [`DEFAULT_SERVICE`], user `user`/`password`, anonymous refused.
    pub fn new(user: &str, password: &str) -> Self {
        TokenServerConfig {
            issuer: DEFAULT_ISSUER.to_owned(),
            service: DEFAULT_SERVICE.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            allow_anonymous: false,
        }
    }

    /// Sets whether anonymous requests get pull-only tokens.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }
}

/// One `access` entry of a token: `actions` granted on resource `type`/`name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Access {
    /// Resource type, `repository` for images.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name, the repository path (`private/busybox`).
    pub name: String,
    /// Granted actions (`pull`, `push`, ...).
    pub actions: Vec<String>,
}

impl Access {
    /// `actions` on repository `name`.
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        Access {
            kind: "repository".to_owned(),
            name: name.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// A running token server on `127.0.0.1`; stops when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    cert_pem: String,
    accept: JoinHandle<()>,
}

struct State {
    config: TokenServerConfig,
    key: EcdsaKeyPair,
    /// Standard base64 of the certificate DER, the single `x5c` element.
    x5c: String,
    cert_der: Vec<u8>,
    requests: AtomicUsize,
    issued: AtomicUsize,
    refused: AtomicUsize,
}

impl TokenServer {
    /// Generates a P-256 key and a self-signed certificate for it, binds a free `127.0.0.1`
    /// port and serves [`TOKEN_PATH`] until dropped. Needs a tokio runtime.
    pub async fn start(config: TokenServerConfig) -> anyhow::Result<TokenServer> {
        if config.user.contains(':') {
            bail!("user name {:?} must not contain ':'", config.user);
        }
        let (key, cert_der) = generate_key_and_cert(&config.issuer)?;
        let cert_pem = pem("CERTIFICATE", &cert_der);
        let state = Arc::new(State {
            x5c: STANDARD.encode(&cert_der),
            cert_der,
            key,
            config,
            requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("bind token server to 127.0.0.1:0")?;
        let addr = listener.local_addr().context("token server address")?;
        crate::hostns::expose_everywhere(addr);
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(TokenServer {
            addr,
            state,
            cert_pem,
            accept,
        })
    }

    /// `127.0.0.1:PORT` the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token endpoint URL, `http://127.0.0.1:PORT/token`: the registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// The configured issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.state.config.issuer
    }

    /// The configured service (`aud`).
    pub fn service(&self) -> &str {
        &self.state.config.service
    }

    /// The accepted user and password.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.state.config.user, &self.state.config.password)
    }

    /// The signing certificate as PEM: the registry's `auth.token.rootcertbundle` content.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The signing certificate as DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.state.cert_der
    }

    /// How many HTTP requests reached the server (issued, refused or malformed).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// How many tokens the server issued over HTTP (not counting [`TokenServer::mint`]).
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// How many token requests were refused with `401` (missing or wrong credentials).
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Signs a token for `subject` granting `access` directly, without an HTTP request (not
    /// counted by [`TokenServer::issued`]). Useful for tokens the HTTP endpoint would not issue.
    pub fn mint(&self, subject: &str, access: &[Access]) -> anyhow::Result<String> {
        self.state.sign(subject, access)
    }

    /// Fetches a token over HTTP like a registry client does: `GET <realm>?service=..&scope=..`
    /// with `credentials` as HTTP Basic auth (or none). `scope` is e.g.
    /// `repository:private/busybox:pull,push`. Errors unless the server answers `200`.
    pub async fn fetch_token(
        &self,
        credentials: Option<(&str, &str)>,
        scope: &str,
    ) -> anyhow::Result<String> {
        let mut url = reqwest::Url::parse(&self.realm()).context("parse realm")?;
        url.query_pairs_mut()
            .append_pair("service", self.service())
            .append_pair("scope", scope);
        if let Some((user, _)) = credentials {
            url.query_pairs_mut().append_pair("account", user);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .context("build http client")?;
        let mut req = http.get(url);
        if let Some((user, pass)) = credentials {
            req = req.basic_auth(user, Some(pass));
        }
        let resp = req.send().await.context("GET token")?;
        let status = resp.status();
        let body = resp.bytes().await.context("read token response")?;
        if status.as_u16() != 200 {
            bail!(
                "token server answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let value: serde_json::Value =
            serde_json::from_slice(&body).context("token response is not JSON")?;
        value
            .get("token")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .context("token response without \"token\"")
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        // Dropping the accept task drops the listener and its JoinSet, aborting connections.
        self.accept.abort();
    }
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .field("issuer", &self.state.config.issuer)
            .field("service", &self.state.config.service)
            .field("user", &self.state.config.user)
            .field("allow_anonymous", &self.state.config.allow_anonymous)
            .field("issued", &self.issued())
            .finish()
    }
}

fn generate_key_and_cert(common_name: &str) -> anyhow::Result<(EcdsaKeyPair, Vec<u8>)> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generate P-256 key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).context("cert params")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let cert = params
        .self_signed(&key_pair)
        .context("self-sign token certificate")?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pair.serialize_der())
        .map_err(|e| anyhow::anyhow!("load generated key: {e}"))?;
    Ok((key, cert.der().to_vec()))
}

/// PEM armour: base64 in 64-column lines between `BEGIN`/`END` lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl State {
    fn sign(&self, subject: &str, access: &[Access]) -> anyhow::Result<String> {
        let now = unix_now();
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| anyhow::anyhow!("random jti"))?;
        let header = json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [self.x5c],
        });
        let claims = json!({
            "iss": self.config.issuer,
            "sub": subject,
            "aud": self.config.service,
            "exp": now + TOKEN_TTL.as_secs(),
            "nbf": now,
            "iat": now,
            "jti": hex::encode(jti),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|_| anyhow::anyhow!("ES256 sign"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// Answers one parsed request: status, extra headers and JSON body.
    fn respond(&self, head: &str) -> Response {
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(_version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Response::error(400, "BAD_REQUEST", "malformed request line");
        };
        let mut authorization = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("authorization")
            {
                authorization = Some(value.trim().to_owned());
            }
        }
        let Ok(url) = reqwest::Url::parse(&format!("http://token.invalid{target}")) else {
            return Response::error(400, "BAD_REQUEST", "malformed request target");
        };
        if url.path() != TOKEN_PATH {
            return Response::error(404, "NOT_FOUND", "no such endpoint");
        }
        if method != "GET" {
            return Response::error(405, "UNSUPPORTED", "only GET is supported");
        }
        let mut service = None;
        let mut scopes = Vec::new();
        for (key, value) in url.query_pairs() {
            match &*key {
                "service" => service = Some(value.into_owned()),
                // A scope parameter may be repeated and may hold several space-separated scopes.
                "scope" => scopes.extend(value.split(' ').map(str::to_owned)),
                _ => {}
            }
        }
        if let Some(service) = &service
            && service != &self.config.service
        {
            return Response::error(
                400,
                "DENIED",
                &format!(
                    "unknown service {service:?}, this server issues tokens for {:?}",
                    self.config.service
                ),
            );
        }

        let subject = match authorization.as_deref().map(|a| self.check_basic(a)) {
            Some(Some(user)) => Some(user),
            Some(None) => return self.refuse("invalid credentials"),
            None if self.config.allow_anonymous => None,
            None => return self.refuse("authentication required"),
        };

        let mut granted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for scope in scopes.iter().filter(|s| !s.is_empty()) {
            // `repository:<name>:<actions>`; the name may itself contain ':' (host:port).
            let Some((kind, rest)) = scope.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            if kind != "repository" || name.is_empty() {
                // Other resource types (`registry:catalog:*`) are not granted.
                continue;
            }
            let wanted: Vec<&str> = actions.split(',').collect();
            let grant: Vec<String> = match subject {
                // The user may pull and push every repository.
                Some(_) => vec!["pull".to_owned(), "push".to_owned()],
                // Anonymous users (when allowed) may only pull.
                None if wanted.contains(&"pull") => vec!["pull".to_owned()],
                None => continue,
            };
            let entry = granted.entry(name.to_owned()).or_default();
            for action in grant {
                if !entry.contains(&action) {
                    entry.push(action);
                }
            }
        }
        let access: Vec<Access> = granted
            .into_iter()
            .map(|(name, actions)| Access {
                kind: "repository".to_owned(),
                name,
                actions,
            })
            .collect();
        let token = match self.sign(subject.unwrap_or(""), &access) {
            Ok(token) => token,
            Err(err) => return Response::error(500, "UNKNOWN", &format!("{err:#}")),
        };
        self.issued.fetch_add(1, Ordering::SeqCst);
        Response {
            status: 200,
            extra_headers: String::new(),
            body: json!({
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_TTL.as_secs(),
            })
            .to_string(),
        }
    }

    /// The user name if `authorization` holds this server's Basic credentials.
    fn check_basic(&self, authorization: &str) -> Option<&str> {
        let (scheme, encoded) = authorization.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(encoded.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        (user == self.config.user && pass == self.config.password)
            .then_some(self.config.user.as_str())
    }

    fn refuse(&self, message: &str) -> Response {
        self.refused.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::error(401, "UNAUTHORIZED", message);
        response.extra_headers =
            "WWW-Authenticate: Basic realm=\"berth-test-token-server\"\r\n".into();
        response
    }
}

struct Response {
    status: u16,
    extra_headers: String,
    body: String,
}

impl Response {
    /// A distribution-style error body: `{"errors":[{"code":..,"message":..}]}`.
    fn error(status: u16, code: &str, message: &str) -> Response {
        Response {
            status,
            extra_headers: String::new(),
            body: json!({"errors": [{"code": code, "message": message}]}).to_string(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n{}\r\n{}",
            self.status,
            self.body.len(),
            self.extra_headers,
            self.body
        )
        .into_bytes()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, state.clone()));
                }
                // Transient (EMFILE, ECONNABORTED): back off briefly and keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => {
            state.requests.fetch_add(1, Ordering::SeqCst);
            state.respond(&head)
        }
        Ok(Ok(None)) => Response::error(431, "BAD_REQUEST", "request head too large"),
        // Closed early, I/O error or timeout: nothing useful to answer.
        Ok(Err(_)) | Err(_) => return,
    };
    let _ = stream.write_all(&response.to_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line ending the request head. `Ok(None)` if it exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_wraps_at_64_columns() {
        let text = pem("CERTIFICATE", &[0u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END CERTIFICATE-----"));
    }

    #[tokio::test]
    async fn issues_verifiable_es256_tokens_and_refuses_bad_credentials() {
        let server = TokenServer::start(TokenServerConfig::new("u", "p"))
            .await
            .expect("start");
        let token = server
            .fetch_token(Some(("u", "p")), "repository:a/b:pull")
            .await
            .expect("token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["x5c"][0], STANDARD.encode(server.cert_der()));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["iss"], DEFAULT_ISSUER);
        assert_eq!(claims["aud"], DEFAULT_SERVICE);
        assert_eq!(claims["sub"], "u");
        assert_eq!(
            claims["access"],
            json!([{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}])
        );
        // The signature verifies with the certificate's key.
        let key_pair = &server.state.key;
        use aws_lc_rs::signature::KeyPair as _;
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            key_pair.public_key().as_ref(),
        );
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        assert_eq!(sig.len(), 64);
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("signature verifies");
        assert_eq!(server.issued(), 1);

        assert!(
            server
                .fetch_token(None, "repository:a/b:pull")
                .await
                .is_err()
        );
        assert!(
            server
                .fetch_token(Some(("u", "wrong")), "repository:a/b:pull")
                .await
                .is_err()
        );
        assert_eq!(server.issued(), 1);
        assert_eq!(server.refused(), 2);
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn anonymous_pull_only_when_allowed() {
        let server = TokenServer::start(TokenServerConfig::new("u", "p").allow_anonymous(true))
            .await
            .expect("start");
        let token = server
            .fetch_token(None, "repository:a/b:pull,push")
            .await
            .expect("token");
        let claims = token.split('.').nth(1).expect("claims");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("b64")).expect("json");
        assert_eq!(
            claims["access"],
            json!([{"type": "repository", "name": "a/b", "actions": ["pull"]}])
        );
        assert_eq!(claims["sub"], "");
    }
}
