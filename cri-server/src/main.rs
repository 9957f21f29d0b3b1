//! `berthd`: flags, logging, signals; then [`cri_server::server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cri_server::config::Config;
use cri_server::server::{Paths, run};

/// berth's container runtime daemon: serves the Kubernetes CRI on a unix socket.
#[derive(Parser, Debug)]
#[command(name = "berthd", version)]
struct Flags {
    /// CRI socket path.
    #[arg(long, default_value = "/run/berth/berth.sock")]
    listen: PathBuf,
    /// Docker Engine API socket.
    #[arg(long, default_value = "/run/berth/docker.sock")]
    docker_listen: PathBuf,
    /// Persistent data: metadata, blobs, snapshots.
    #[arg(long, default_value = "/var/lib/berth")]
    root: PathBuf,
    /// Volatile state: sockets, bundles, namespace pins.
    #[arg(long, default_value = "/run/berth")]
    state: PathBuf,
    /// The per-container shim binary [default: berth-shim next to berthd].
    #[arg(long)]
    shim: Option<PathBuf>,
    /// TOML config file; a missing file means every default.
    #[arg(long, default_value = "/etc/berth/config.toml")]
    config: PathBuf,
    /// Log filter (`info`, `debug`, `cri_server=trace`...); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&flags.log_level))
        .context("parse --log-level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if flags.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = Config::load(&flags.config)?;
    let shim = match flags.shim {
        Some(s) => s,
        None => std::env::current_exe()
            .context("find berthd's own path")?
            .with_file_name("berth-shim"),
    };
    let paths = Paths {
        listen: flags.listen,
        docker_listen: flags.docker_listen,
        root: flags.root,
        state: flags.state,
        shim,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        return std::future::pending().await;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        run(paths, config, shutdown).await
    })
}
