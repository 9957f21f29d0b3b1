//! Driving berthd's Docker API as people do: the stock `docker` client binary (it is on every
//! machine of this kind; tests fail loudly without it) against a test daemon whose registry
//! mirror for `docker.io` is a local registry holding `library/busybox`.

use std::path::PathBuf;
use std::process::Output;

use crate::daemon::{Daemon, require_root};
use crate::image::{Compression, ImageBuilder, ManifestFormat, busybox_base_layer, push_image};
use crate::registry::Registry;

/// The stock docker client.
pub const DOCKER: &str = "/usr/local/bin/docker";

/// A daemon, its registry (mirror of docker.io with `busybox:latest`), and a docker client
/// config dir of its own.
pub struct DockerEnv {
    /// The daemon (dropped first).
    pub d: Daemon,
    /// The registry.
    pub reg: Registry,
    /// `DOCKER_CONFIG` for the client.
    pub config_dir: tempfile::TempDir,
}

/// The docker client binary; panics with a clear message when it is missing.
pub fn docker_bin() -> PathBuf {
    let p = PathBuf::from(DOCKER);
    assert!(
        p.exists(),
        "the stock docker client is needed at {DOCKER} for this test (docker CLI, client only)"
    );
    p
}

/// An image shaped like docker's busybox: one layer of busybox, `Cmd ["sh"]`, no entrypoint,
/// root.
pub fn docker_busybox() -> ImageBuilder {
    ImageBuilder::new()
        .layer(
            busybox_base_layer()
                .build(Compression::Gzip)
                .expect("busybox layer"),
        )
        .env("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .cmd(&["sh"])
}

impl DockerEnv {
    /// Starts a registry with `library/busybox:latest` and a daemon mirroring docker.io to it;
    /// `extra_config` is appended to berthd's config.
    pub async fn start(extra_config: &str) -> DockerEnv {
        require_root();
        docker_bin();
        let img = docker_busybox().build(ManifestFormat::Oci).expect("build");
        let reg = Registry::start().await.expect("registry");
        push_image(&reg.addr(), "library/busybox", "latest", &img)
            .await
            .expect("push");
        let config = format!(
            "[registry.\"docker.io\"]\nmirrors = [\"http://{}\"]\n{extra_config}",
            reg.addr()
        );
        let d = Daemon::start_with(&config, None).await.expect("daemon");
        DockerEnv {
            d,
            reg,
            config_dir: tempfile::tempdir().expect("docker config dir"),
        }
    }

    /// Runs the docker client with `args` (and `stdin` as its input), to completion.
    pub async fn docker(&self, args: &[&str]) -> Output {
        self.docker_with_input(args, None).await
    }

    /// [`docker`](Self::docker) with bytes on its stdin.
    pub async fn docker_with_input(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.docker_full(args, &[], stdin).await
    }

    /// [`docker`](Self::docker) with more environment (`DOCKER_BUILDKIT=0`) and maybe input.
    pub async fn docker_full(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(docker_bin());
        cmd.args(args)
            .envs(env.iter().copied())
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.d.docker_socket.display()),
            )
            .env("DOCKER_CONFIG", self.config_dir.path())
            .env("DOCKER_CLI_HINTS", "false")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_API_VERSION")
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("run docker");
        if let Some(input) = stdin {
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(input).await.expect("write docker's stdin");
            drop(w);
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(120),
            child.wait_with_output(),
        )
        .await
        .unwrap_or_else(|_| panic!("docker {args:?} did not finish within 120 s"))
        .expect("docker output")
    }

    /// Runs docker and returns its stdout, panicking (with stderr and the daemon's log) unless
    /// it exits 0.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args).await;
        assert!(
            out.status.success(),
            "docker {args:?} failed with {}:\nstdout: {}\nstderr: {}\nberthd log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.d.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl DockerEnv {
    /// Our own `berth` CLI (built next to the test binaries), pointed at this daemon's docker
    /// socket with `--host`, run with `args` to completion.
    pub async fn berth(&self, args: &[&str]) -> Output {
        self.berth_with_input(args, None).await
    }

    /// [`berth`](Self::berth) with bytes on its stdin.
    pub async fn berth_with_input(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.berth_command(args);
        cmd.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run berth");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(input).await.expect("write berth's stdin");
            drop(w);
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(120),
            child.wait_with_output(),
        )
        .await
        .unwrap_or_else(|_| panic!("berth {args:?} did not finish within 120 s"))
        .expect("berth output")
    }

    /// The `berth` command for `args` against this daemon, stdio left to the caller.
    pub fn berth_command(&self, args: &[&str]) -> tokio::process::Command {
        let bin = crate::daemon::bin_dir().join("berth");
        assert!(
            bin.exists(),
            "{} is missing: cargo build -p berth-cli",
            bin.display()
        );
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--host")
            .arg(format!("unix://{}", self.d.docker_socket.display()))
            .args(args)
            .env_remove("BERTH_HOST")
            .kill_on_drop(true);
        cmd
    }

    /// Runs berth and returns its stdout, panicking (with stderr and the daemon's log) unless
    /// it exits 0.
    pub async fn berth_ok(&self, args: &[&str]) -> String {
        let out = self.berth(args).await;
        assert!(
            out.status.success(),
            "berth {args:?} failed with {}:\nstdout: {}\nstderr: {}\nberthd log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.d.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs our `berth` CLI against `d`'s docker socket.
pub async fn berth_at(d: &crate::daemon::Daemon, args: &[&str]) -> Output {
    let bin = crate::daemon::bin_dir().join("berth");
    let out = tokio::process::Command::new(bin)
        .arg("--host")
        .arg(format!("unix://{}", d.docker_socket.display()))
        .args(args)
        .env_remove("BERTH_HOST")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(120), out)
        .await
        .unwrap_or_else(|_| panic!("berth {args:?} did not finish within 120 s"))
        .expect("run berth")
}

/// Pulls `reference` on a fresh berthd root (no config: a loopback registry is plain HTTP)
/// and runs `args` in it, returning the output.
pub async fn pull_and_run_fresh(reference: &str, args: &[&str]) -> String {
    let fresh = crate::daemon::Daemon::start().await.expect("fresh daemon");
    let pulled = berth_at(&fresh, &["pull", reference]).await;
    assert!(
        pulled.status.success(),
        "pull {reference} on a fresh root: {}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&pulled.stdout),
        String::from_utf8_lossy(&pulled.stderr),
        tail(&fresh.log(), 30)
    );
    let mut run = vec!["run", "--rm", reference];
    run.extend_from_slice(args);
    let out = berth_at(&fresh, &run).await;
    assert!(
        out.status.success(),
        "run {reference}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
