//! A real `berthd` per test: its own root, state and socket under a temp dir, driven through the
//! CRI socket with tonic clients, as kubelet and crictl drive it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use api::cri::image_service_client::ImageServiceClient;
use api::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// Panics unless running as root: root-only tests fail loudly, they never skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (namespaces, mounts, overlayfs); run the suite as root"
    );
}

/// A CRI image spec naming `image`.
pub fn image_spec(image: &str) -> Option<api::cri::ImageSpec> {
    Some(api::cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// Where the built binaries are: `$BERTH_BIN_DIR`, else the cargo target dir of this test.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The release build of berth-shim (what berthd ships), for tests of its footprint. Panics when
/// it is missing or older than the shim's sources: `cargo build --release -p berth-shim`.
pub fn release_shim() -> PathBuf {
    let release = bin_dir()
        .parent()
        .expect("target dir")
        .join("release/berth-shim");
    let built = std::fs::metadata(&release)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `cargo build --release -p berth-shim` first",
                release.display()
            )
        });
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shim/src");
    let newest = newest_mtime(&src);
    assert!(
        built >= newest,
        "{} is older than shim/src: run `cargo build --release -p berth-shim` again",
        release.display()
    );
    release
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                newest_mtime(&p)
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
            }
        })
        .max()
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
}

/// A running berthd and everything it owns.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: String,
    /// `--shim`, when not the berth-shim next to berthd.
    shim: Option<PathBuf>,
    /// The CRI socket.
    pub socket: PathBuf,
    /// The Docker API socket.
    pub docker_socket: PathBuf,
    /// The network namespace berthd runs in (its "host"), dropped after everything else.
    netns: std::sync::Arc<crate::hostns::HostNs>,
}

impl Daemon {
    /// Starts berthd with no config file.
    pub async fn start() -> anyhow::Result<Daemon> {
        Self::start_with_config("").await
    }

    /// Starts berthd with `config` as its TOML config file.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Daemon> {
        Self::start_with(config, None).await
    }

    /// Starts berthd with `shim` as its `--shim` binary (e.g. a wrapper that injects failures).
    pub async fn start_with_shim(shim: &Path) -> anyhow::Result<Daemon> {
        Self::start_with("", Some(shim.to_owned())).await
    }

    /// Starts berthd with `config` and `shim` as its `--shim` binary (e.g. a wrapper that
    /// pauses, or the release build).
    pub async fn start_with(config: &str, shim: Option<PathBuf>) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .context("temp dir")?;
        let socket = dir.path().join("berth.sock");
        let docker_socket = dir.path().join("docker.sock");
        let mut d = Daemon {
            child: None,
            dir,
            config: config.to_owned(),
            shim,
            socket,
            docker_socket,
            netns: crate::hostns::HostNs::new().context("create the daemon's network namespace")?,
        };
        d.spawn().await?;
        Ok(d)
    }

    /// The network namespace berthd runs in: its stand-in for the host.
    pub fn netns(&self) -> &crate::hostns::HostNs {
        &self.netns
    }

    /// The persistent root (`--root`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The daemon's own temp dir (holds root, state, log and socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The volatile state dir (`--state`).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("berthd.log")
    }

    /// Everything berthd logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let config_path = self.dir.path().join("config.toml");
        let mut config = self.config.clone();
        if !config.contains("[cni]") {
            // Never the host's network configs: the daemon's own dir, where berthd writes its
            // default network (a bridge in the daemon's own namespace).
            config.push_str(&format!(
                "\n[cni]\nconf_dirs = [{:?}]\n",
                self.dir.path().join("net.d")
            ));
        }
        std::fs::write(&config_path, config).context("write config")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open log")?;
        let berthd = bin_dir().join("berthd");
        let mut cmd = Command::new(&berthd);
        let netns = std::fs::File::open(self.netns.path()).context("open the daemon's netns")?;
        let netns_fd = std::os::fd::AsRawFd::as_raw_fd(&netns);
        // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(shim) = &self.shim {
            cmd.arg("--shim").arg(shim);
        }
        let child = cmd
            .arg("--listen")
            .arg(&self.socket)
            .arg("--docker-listen")
            .arg(&self.docker_socket)
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .arg("--config")
            .arg(&config_path)
            .arg("--log-level")
            .arg("debug")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (build it with cargo build --workspace)",
                    berthd.display()
                )
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "berthd exited with {status} before serving; log:\n{}",
                    self.log()
                );
            }
            if let Ok(mut c) = self.runtime().await
                && c.version(api::cri::VersionRequest::default()).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("berthd did not serve within 30 s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A channel to the CRI socket.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        connect(&self.socket).await
    }

    /// A RuntimeService client.
    pub async fn runtime(&self) -> anyhow::Result<RuntimeServiceClient<Channel>> {
        Ok(RuntimeServiceClient::new(self.channel().await?))
    }

    /// An ImageService client.
    pub async fn images(&self) -> anyhow::Result<ImageServiceClient<Channel>> {
        Ok(ImageServiceClient::new(self.channel().await?))
    }

    /// PullImage, returning the image ref or the gRPC status.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<api::cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let mut c = self
            .images()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let req = api::cri::PullImageRequest {
            image: image_spec(image),
            auth,
            sandbox_config: None,
        };
        c.pull_image(req).await.map(|r| r.into_inner().image_ref)
    }

    /// RemoveImage, returning the gRPC status on failure.
    pub async fn remove_image(&self, image: &str) -> Result<(), tonic::Status> {
        let mut c = self
            .images()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        c.remove_image(api::cri::RemoveImageRequest {
            image: image_spec(image),
        })
        .await
        .map(|_| ())
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// `kill -9` the daemon, as a crash would.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await.context("kill berthd")?;
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM and waits; Err if it does not exit within 10 s.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("berthd is not running")
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(s) => Ok(s?),
            Err(_) => {
                let _ = c.kill().await;
                bail!("berthd ignored SIGTERM for 10 s")
            }
        }
    }

    /// Starts the daemon again on the same root, state and socket.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop().await?;
        }
        self.spawn().await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = c.start_kill();
            // Reap synchronously so no zombie or running daemon outlives the test.
            if let Some(pid) = c.id() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            }
        }
        // Shims outlive berthd by design: a test that failed half-way leaves them, their
        // containers and the pods' cgroups behind unless the fixture removes them.
        kill_shims_under(&self.state());
        if let Ok(rd) = std::fs::read_dir(self.state().join("sandboxes")) {
            for e in rd.flatten() {
                remove_cgroup_tree(&format!("berth/{}", e.file_name().to_string_lossy()));
            }
        }
        unmount_under(self.dir.path());
    }
}

/// SIGKILLs every `berth-shim` whose bundle lies under `state`, and every pod PID namespace
/// init whose pid file does.
fn kill_shims_under(state: &Path) {
    let needle = format!("--bundle {}", state.join("containers").display());
    let init_needle = format!("pod-init --pidfile {}", state.join("ns").display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) || cmd.contains(&init_needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Kills every process in the cgroup `rel` and its children, in every hierarchy under
/// /sys/fs/cgroup, then removes the cgroups, deepest first.
pub fn remove_cgroup_tree(rel: &str) {
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs = Vec::new();
    for root in roots.flatten() {
        collect_dirs(&root.path().join(rel), &mut dirs);
    }
    for _ in 0..100 {
        let mut alive = false;
        for d in &dirs {
            for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    alive = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(&d);
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Lazily unmounts every mount point below `dir` (deepest first), so a temp dir can be removed
/// even after a test failed half-way.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for t in targets {
        let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A tonic channel over a unix socket.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is only a placeholder: the connector ignores it. Its authority is `localhost`.
    let channel = Endpoint::try_from("http://localhost")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    Ok(channel)
}
