//! A real OCI distribution registry per test.
//!
//! [`Registry`] runs `/usr/bin/docker-registry` (the CNCF distribution registry v2, Debian
//! package `docker-registry`) on a free `127.0.0.1` port with its storage, config and log in a
//! private [`TempDir`]. Dropping the value SIGKILLs the process, reaps it and removes the
//! directory, so a failing (panicking) test cleans up too.
//!
//! The registry speaks plain HTTP. Clients must treat it as an insecure registry (for skopeo:
//! `--tls-verify=false`).
//!
//! Authentication: [`Registry::start_with_basic_auth`] configures the registry's `htpasswd`
//! backend. That backend answers `401` with `WWW-Authenticate: Basic realm=...` and accepts
//! HTTP Basic credentials on every request, which is what a CRI `AuthConfig` with
//! `username`/`password` maps to. [`Registry::start_with_token_auth`] configures the `token`
//! backend instead: the registry answers `401` with `WWW-Authenticate: Bearer realm=...` and
//! accepts only JWTs from a token server (see [`crate::token::TokenServer`]) whose signing
//! certificate it trusts.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::image::RegistryClient;

/// Where the Debian package installs the registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long [`Registry::start`] waits for `GET /v2/` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a start is retried when the chosen port was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// bcrypt cost of the generated htpasswd entries: the minimum, because the registry checks the
/// hash on every request and tests do not need slow hashing.
const BCRYPT_COST: u32 = 4;

/// A running `docker-registry` process, killed and cleaned up on drop.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    credentials: Option<(String, String)>,
    // Whether any auth backend is configured (anonymous `GET /v2/` then answers `401`).
    auth_required: bool,
    // Dropped after `child` is killed (see `Drop`), taking storage, config and log with it.
    dir: TempDir,
}

impl Registry {
    /// Starts an anonymous registry (no auth, deletes enabled) and waits until it answers
    /// `GET /v2/`.
    pub async fn start() -> anyhow::Result<Registry> {
        tokio::task::spawn_blocking(Registry::start_blocking)
            .await
            .context("join registry start task")?
    }

    /// Blocking variant of [`Registry::start`], for code without a tokio runtime.
    pub fn start_blocking() -> anyhow::Result<Registry> {
        start_with(AuthSetup::None)
    }

    /// Starts a registry that requires HTTP Basic credentials `user`/`pass` (htpasswd backend,
    /// bcrypt entry) for every request, pulls included. Anonymous requests get `401`.
    pub async fn start_with_basic_auth(user: &str, pass: &str) -> anyhow::Result<Registry> {
        let (user, pass) = (user.to_owned(), pass.to_owned());
        tokio::task::spawn_blocking(move || Registry::start_with_basic_auth_blocking(&user, &pass))
            .await
            .context("join registry start task")?
    }

    /// Blocking variant of [`Registry::start_with_basic_auth`].
    pub fn start_with_basic_auth_blocking(user: &str, pass: &str) -> anyhow::Result<Registry> {
        if user.contains(':') || user.contains('\n') {
            bail!("htpasswd user name {user:?} must not contain ':' or a newline");
        }
        start_with(AuthSetup::Basic(user.to_owned(), pass.to_owned()))
    }

    /// Starts a registry with the `token` auth backend: every request needs
    /// `Authorization: Bearer <JWT>`; anonymous requests get `401` with
    /// `WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope=...`. Tokens must be
    /// issued by `issuer` for audience `service` and signed by a key whose certificate chain
    /// (JWT header `x5c`) verifies against `cert_pem`, written to the temp dir as the
    /// `rootcertbundle`. [`Registry::client`] carries no credentials for such a registry.
    pub async fn start_with_token_auth(
        realm: &str,
        service: &str,
        issuer: &str,
        cert_pem: &str,
    ) -> anyhow::Result<Registry> {
        let setup = AuthSetup::Token {
            realm: realm.to_owned(),
            service: service.to_owned(),
            issuer: issuer.to_owned(),
            cert_pem: cert_pem.to_owned(),
        };
        tokio::task::spawn_blocking(move || start_with(setup))
            .await
            .context("join registry start task")?
    }

    /// `127.0.0.1:PORT`: the registry host as it appears in image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The IP the registry listens on, always `127.0.0.1`.
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The TCP port the registry listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A full image reference on this registry: `127.0.0.1:PORT/<repo>:<tag>`, or
    /// `127.0.0.1:PORT/<repo>@<digest>` when `tag_or_digest` starts with `sha256:`.
    pub fn image_ref(&self, repo: &str, tag_or_digest: &str) -> String {
        if tag_or_digest.starts_with("sha256:") {
            format!("{}/{repo}@{tag_or_digest}", self.addr)
        } else {
            format!("{}/{repo}:{tag_or_digest}", self.addr)
        }
    }

    /// The Basic-auth user and password, when started with [`Registry::start_with_basic_auth`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A client for this registry, carrying its credentials if it has any.
    pub fn client(&self) -> anyhow::Result<RegistryClient> {
        let client = RegistryClient::new(&self.addr())?;
        Ok(match self.credentials() {
            Some((user, pass)) => client.with_basic_auth(user, pass),
            None => client,
        })
    }

    /// The registry's filesystem storage root (blobs and repositories live below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file receiving the registry's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The last `lines` lines of the registry log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// The registry's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // SIGKILL: the registry has nothing to flush that a test cares about.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("addr", &self.addr)
            .field("pid", &self.child.id())
            .field("auth", &self.auth_required)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// A `127.0.0.1:PORT` address where nothing listens: connecting gets "connection refused".
///
/// The port stays bound (but not listening) by a deliberately leaked socket for the rest of the
/// process, so no registry started later can take it.
pub fn unused_addr() -> String {
    match reserve_unlistened_port() {
        Ok(addr) => addr.to_string(),
        // Fall back to a port that was free a moment ago.
        Err(_) => format!("127.0.0.1:{}", free_port().unwrap_or(1)),
    }
}

fn reserve_unlistened_port() -> anyhow::Result<SocketAddr> {
    let socket = tokio::net::TcpSocket::new_v4().context("create socket")?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("bind 127.0.0.1:0")?;
    let addr = socket.local_addr().context("read bound address")?;
    // Bound without listen(): the kernel answers SYNs with RST. Leaking keeps the port ours.
    std::mem::forget(socket);
    Ok(addr)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context("read bound address")?.port())
}

/// Which auth backend a registry is started with.
#[derive(Clone)]
enum AuthSetup {
    None,
    Basic(String, String),
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert_pem: String,
    },
}

fn start_with(setup: AuthSetup) -> anyhow::Result<Registry> {
    if !Path::new(REGISTRY_BIN).exists() {
        bail!("{REGISTRY_BIN} not found: install the Debian package docker-registry");
    }
    let mut last_err = None;
    for _ in 0..PORT_ATTEMPTS {
        match try_start(setup.clone()) {
            Ok(registry) => return Ok(registry),
            Err(StartError::PortTaken(err)) => last_err = Some(err),
            Err(StartError::Other(err)) => return Err(err),
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!("start registry: port taken {PORT_ATTEMPTS} times")))
}

enum StartError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for StartError {
    fn from(err: E) -> Self {
        StartError::Other(err.into())
    }
}

fn try_start(setup: AuthSetup) -> Result<Registry, StartError> {
    let dir = tempfile::Builder::new()
        .prefix("berth-registry-")
        .tempdir()
        .context("create registry temp dir")?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Test daemons live in network namespaces of their own: let them reach it.
    crate::hostns::expose_everywhere(addr);
    let storage = dir.path().join("storage");
    fs::create_dir(&storage).with_context(|| format!("create {storage:?}"))?;

    let (auth, credentials) = match setup {
        AuthSetup::Basic(user, pass) => {
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash_with_result(&pass, BCRYPT_COST)
                .context("bcrypt password")?
                .format_for_version(bcrypt::Version::TwoY);
            fs::write(&htpasswd, format!("{user}:{hash}\n"))
                .with_context(|| format!("write {htpasswd:?}"))?;
            let auth = format!(
                "auth:\n  htpasswd:\n    realm: berth-test-registry\n    path: {}\n",
                yaml_str(&htpasswd)
            );
            (auth, Some((user, pass)))
        }
        AuthSetup::Token {
            realm,
            service,
            issuer,
            cert_pem,
        } => {
            let bundle = dir.path().join("token-root.pem");
            fs::write(&bundle, cert_pem).with_context(|| format!("write {bundle:?}"))?;
            let auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                 rootcertbundle: {}\n",
                yaml_string(&realm),
                yaml_string(&service),
                yaml_string(&issuer),
                yaml_str(&bundle)
            );
            (auth, None)
        }
        AuthSetup::None => (String::new(), None),
    };
    let auth_required = !auth.is_empty();
    let config = format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: berth-test-secret\n\
         health:\n  storagedriver:\n    enabled: false\n\
         {auth}",
        storage = yaml_str(&storage),
    );
    let config_path = dir.path().join("config.yml");
    fs::write(&config_path, config).with_context(|| format!("write {config_path:?}"))?;

    let log_path = dir.path().join("registry.log");
    let log = File::create(&log_path).with_context(|| format!("create {log_path:?}"))?;
    let log_err = log.try_clone().context("clone log file handle")?;
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // The registry reads REGISTRY_* variables as config overrides; keep the test's own.
        .env_remove("REGISTRY_HTTP_ADDR")
        .env_remove("REGISTRY_STORAGE")
        .spawn()
        .with_context(|| format!("spawn {REGISTRY_BIN}"))?;
    // From here on the Drop impl owns cleanup, also on the error paths below.
    let mut registry = Registry {
        child,
        addr,
        credentials,
        auth_required,
        dir,
    };

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = registry.child.try_wait().context("poll registry process")? {
            let log = registry.log_tail(20);
            let err = anyhow::anyhow!("registry exited with {status} before ready; log:\n{log}");
            if log.contains("address already in use") {
                return Err(StartError::PortTaken(err));
            }
            return Err(StartError::Other(err));
        }
        if let Some(code) = probe_v2(addr)
            && (code == 200 || (code == 401 && registry.auth_required))
        {
            return Ok(registry);
        }
        if Instant::now() >= deadline {
            return Err(StartError::Other(anyhow::anyhow!(
                "registry on {addr} not ready after {READY_TIMEOUT:?}; log:\n{}",
                registry.log_tail(20)
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `GET /v2/` with a raw HTTP/1.0 request; the status code, or `None` if nothing answered.
fn probe_v2(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
    }
    let line = std::str::from_utf8(&head[..len]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn yaml_str(path: &Path) -> String {
    yaml_string(&path.to_string_lossy())
}

fn yaml_string(s: &str) -> String {
    // JSON strings are valid YAML double-quoted scalars.
    serde_json::Value::String(s.to_owned()).to_string()
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("<cannot read {path:?}: {err}>"),
    }
}
