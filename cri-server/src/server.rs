//! The CRI endpoint: a unix socket served by tonic, every accepted stream wrapped in
//! [`AuthorityFix`] (old clients send the socket path as `:authority`), one tracing span per
//! request.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use anyhow::Context as _;
use api::cri::image_service_server::ImageServiceServer;
use api::cri::runtime_service_server::RuntimeServiceServer;
use futures::StreamExt;
use tonic::codegen::http;
use tracing::Instrument;

use crate::authority::AuthorityFix;
use crate::config::{Config, SnapshotterKind};
use crate::container::ContainerManager;
use crate::events::EventBus;
use crate::image::ImageManager;
use crate::image_service::ImageServiceImpl;
use crate::network::PodNetwork;
use crate::runtime_service::RuntimeServiceImpl;
use crate::sandbox::SandboxManager;
use crate::streaming::StreamingServer;

/// Where berthd keeps things; all are flags so tests run many daemons side by side.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The CRI socket.
    pub listen: PathBuf,
    /// The Docker API socket.
    pub docker_listen: PathBuf,
    /// Persistent root (`/var/lib/berth`).
    pub root: PathBuf,
    /// Volatile state (`/run/berth`).
    pub state: PathBuf,
    /// The `berth-shim` binary.
    pub shim: PathBuf,
}

/// Opens storage, recovers from any crash, binds the socket and serves until `shutdown`.
pub async fn run(
    paths: Paths,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The socket first: a second daemon pointed at a live one stops before touching storage.
    let listener = bind(&paths.listen)?;
    let docker_listener = match bind(&paths.docker_listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&paths.listen);
            return Err(e);
        }
    };
    let remove_sockets = || {
        let _ = std::fs::remove_file(&paths.listen);
        let _ = std::fs::remove_file(&paths.docker_listen);
    };
    let streaming_config = config.streaming.clone();
    let (images, sandboxes, containers, engine) = match open_core(&paths, config).await {
        Ok(core) => core,
        Err(e) => {
            remove_sockets();
            return Err(e);
        }
    };
    let backend = Arc::new(crate::streaming::backend::CoreBackend {
        sandboxes: sandboxes.clone(),
        containers: containers.clone(),
    });
    let streaming = match StreamingServer::start(&streaming_config, backend).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            remove_sockets();
            return Err(anyhow::anyhow!(e));
        }
    };
    tracing::info!(listen = %paths.listen.display(), root = %paths.root.display(), streaming = %streaming.addr(), "berthd serving CRI");
    if let Err(e) = containers.watch_exits() {
        tracing::warn!(error = %e, "cannot watch running containers for their exits");
    }
    if let Err(e) = engine.start_dns() {
        tracing::warn!(error = %e, "cannot start the embedded DNS of the docker networks");
    }
    if let Err(e) = engine.watch() {
        tracing::warn!(error = %e, "cannot watch the engine's containers");
    }
    let (docker_stop, docker_stopped) = tokio::sync::oneshot::channel::<()>();
    let docker = tokio::spawn(crate::docker::serve(
        crate::docker::Api::new(engine, &paths.root)?,
        docker_listener,
        async move {
            let _ = docker_stopped.await;
        },
    ));
    tracing::info!(listen = %paths.docker_listen.display(), "berthd serving the Docker API");
    // Open event streams would hold the graceful shutdown up for ever: end them first.
    let events = containers.events().clone();
    let shutdown = async move {
        shutdown.await;
        events.close();
    };

    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|conn| conn.map(AuthorityFix::new));
    let result = tonic::transport::Server::builder()
        .layer(RequestSpanLayer)
        .add_service(RuntimeServiceServer::new(RuntimeServiceImpl::new(
            sandboxes.clone(),
            containers,
            streaming,
        )))
        .add_service(ImageServiceServer::new(ImageServiceImpl::new(images)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serve CRI");
    let _ = docker_stop.send(());
    let _ = docker.await;
    sandboxes.shutdown();
    remove_sockets();
    result
}

/// The core managers: images, pod sandboxes, containers, and the engine over them.
type Core = (
    Arc<ImageManager>,
    Arc<SandboxManager>,
    Arc<ContainerManager>,
    Arc<crate::engine::Engine>,
);

async fn open_core(paths: &Paths, config: Config) -> anyhow::Result<Core> {
    let paths = paths.clone();
    tokio::task::spawn_blocking(move || {
        for dir in [&paths.root, &paths.state] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::set_permissions(&paths.root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", paths.root.display()))?;
        let db = redb::Database::create(paths.root.join("meta.db")).with_context(|| {
            format!(
                "open metadata store {}",
                paths.root.join("meta.db").display()
            )
        })?;
        let db = Arc::new(db);
        let content =
            snapshotter::content::ContentStore::open(&paths.root).context("open content store")?;
        let use_overlay = match config.snapshotter {
            SnapshotterKind::Overlay => true,
            SnapshotterKind::Native => false,
            SnapshotterKind::Auto => {
                snapshotter::overlay::OverlaySnapshotter::supported(&paths.root)
            }
        };
        let snaps: Arc<dyn snapshotter::Snapshotter> = if use_overlay {
            Arc::new(snapshotter::overlay::OverlaySnapshotter::new(
                &paths.root,
                db.clone(),
            )?)
        } else {
            tracing::warn!("overlayfs is not available here: using the copying native snapshotter");
            Arc::new(snapshotter::native::NativeSnapshotter::new(
                &paths.root,
                db.clone(),
            )?)
        };
        let cni_config = config.cni.clone();
        let pod_namespace_pool = config.pod_namespace_pool;
        let images = Arc::new(ImageManager::new(
            db.clone(),
            content,
            snaps.clone(),
            Arc::new(config),
        )?);
        let events = EventBus::default();
        // berth's own plugins are installed next to berthd.
        let own_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let network = Arc::new(PodNetwork::new(
            &cni_config,
            &paths.root,
            &paths.state,
            own_dir,
        )?);
        let sandboxes = Arc::new(SandboxManager::new(
            db.clone(),
            &paths.state,
            paths.shim.clone(),
            events.clone(),
            network,
            pod_namespace_pool,
        )?);
        let containers = Arc::new(ContainerManager::new(
            db.clone(),
            &paths.state,
            paths.shim.clone(),
            images.clone(),
            sandboxes.clone(),
            snaps.clone(),
            events,
        )?);
        let engine = crate::engine::Engine::new(
            db,
            &paths.root,
            images.clone(),
            sandboxes.clone(),
            containers.clone(),
            snaps,
        )?;
        anyhow::Ok((images, sandboxes, containers, engine))
    })
    .await?
}

/// Binds the socket 0660, replacing a stale socket file but never a live daemon's.
fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by a running daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Gives each request a span with its method and a request id, and logs its outcome once.
#[derive(Clone, Copy)]
struct RequestSpanLayer;

impl<S> tower::Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan { inner }
    }
}

#[derive(Clone)]
struct RequestSpan<S> {
    inner: S,
}

static REQUEST_ID: AtomicU64 = AtomicU64::new(1);

impl<S, B, R> tower::Service<http::Request<B>> for RequestSpan<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let request_id = REQUEST_ID.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("cri", %method, request_id);
        let started = std::time::Instant::now();
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let res = fut.await;
                let micros = started.elapsed().as_micros() as u64;
                match &res {
                    // Errors from handlers come as trailers-only responses: the status is in the
                    // headers. Success puts it in the trailers, which are not seen here.
                    Ok(resp) => match resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                    {
                        Some(code) if code != "0" => {
                            let msg = resp
                                .headers()
                                .get("grpc-message")
                                .and_then(|v| v.to_str().ok())
                                .map(percent_decode)
                                .unwrap_or_default();
                            tracing::warn!(code, message = %msg, micros, "request failed");
                        }
                        _ => tracing::debug!(micros, "request done"),
                    },
                    Err(e) => tracing::warn!(error = %e, micros, "request failed in transport"),
                }
                res
            }
            .instrument(span),
        )
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
