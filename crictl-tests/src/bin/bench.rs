//! `berth-bench`: measures pull+unpack of a multi-layer image from a local registry against any
//! CRI server (berthd, containerd, CRI-O), so the figures compare like with like.
//!
//! ```text
//! berth-bench --endpoint unix:///run/berth/berth.sock --size-mb 50 --layers 5 --runs 5
//! ```
//! Starts its own registry on 127.0.0.1 unless `--registry` is given, pushes a generated image,
//! then for each run removes the image and times PullImage. Prints the median and throughput.
//!
//! `--lifecycle N` instead runs N cycles of runp → create → start (`sleep`) → exec_sync `true` →
//! stop → remove
//! and reports each step's median and spread, plus the RSS of the daemon and of each
//! per-container helper process (`--helper-pattern`, matched against /proc/*/cmdline).

use std::time::{Duration, Instant};

use anyhow::Context;
use api::cri;
use clap::Parser;
use crictl_tests::image::{ManifestFormat, big_image, push_image};
use crictl_tests::registry::Registry;

#[derive(Parser)]
#[command(
    name = "berth-bench",
    about = "Pull+unpack benchmark for CRI image services"
)]
struct Flags {
    /// CRI endpoint of the server under test.
    #[arg(long, default_value = "unix:///run/berth/berth.sock")]
    endpoint: String,
    /// Use this plain-HTTP registry (`host:port`) instead of starting one.
    #[arg(long)]
    registry: Option<String>,
    /// Total size of the generated image's layers, in MB (uncompressed).
    #[arg(long, default_value_t = 50)]
    size_mb: usize,
    /// Number of generated layers (on top of a busybox base layer).
    #[arg(long, default_value_t = 5)]
    layers: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Repository name to push to.
    #[arg(long, default_value = "bench/big")]
    repo: String,
    /// Milliseconds to wait after exec_sync before sampling helper RSS (berth-shim drops the
    /// code pages serving touched after 500 ms idle).
    #[arg(long, default_value_t = 600)]
    idle_ms: u64,
    /// Run this many pod/container lifecycle cycles instead of the pull benchmark.
    #[arg(long)]
    lifecycle: Option<usize>,
    /// Pods use the host network (containerd cannot start pods without CNI here).
    #[arg(long)]
    host_network: bool,
    /// Substring of the daemon's command line, for its RSS.
    #[arg(long, default_value = "berthd")]
    daemon_pattern: String,
    /// Substring of the per-container helper's command line (`berth-shim`, `containerd-shim`).
    #[arg(long, default_value = "berth-shim")]
    helper_pattern: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let f = Flags::parse();
    let own_registry;
    let addr = match &f.registry {
        Some(a) => a.clone(),
        None => {
            own_registry = Registry::start().await.context("start registry")?;
            own_registry.addr()
        }
    };
    if let Some(n) = f.lifecycle {
        return lifecycle(&f, &addr, n).await;
    }
    let img = big_image(f.size_mb, f.layers)?.build(ManifestFormat::Oci)?;
    push_image(&addr, &f.repo, "latest", &img)
        .await
        .context("push bench image")?;
    let compressed: usize = img.layers_size();
    let uncompressed: usize = img
        .layers
        .iter()
        .map(|l| l.uncompressed().map(|u| u.len()))
        .sum::<anyhow::Result<usize>>()?;
    let name = format!("{addr}/{}:latest", f.repo);

    let socket = f.endpoint.strip_prefix("unix://").unwrap_or(&f.endpoint);
    let channel = crictl_tests::daemon::connect(std::path::Path::new(socket)).await?;
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    let spec = || {
        Some(cri::ImageSpec {
            image: name.clone(),
            ..Default::default()
        })
    };

    let mut times = Vec::with_capacity(f.runs);
    for run in 0..f.runs {
        images
            .remove_image(cri::RemoveImageRequest { image: spec() })
            .await
            .context("remove")?;
        // Let the server's background cleanup settle so it does not overlap the timing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        images
            .pull_image(cri::PullImageRequest {
                image: spec(),
                ..Default::default()
            })
            .await
            .context("pull")?;
        let dt = t.elapsed();
        eprintln!("run {run}: {:.3} s", dt.as_secs_f64());
        times.push(dt);
    }
    images
        .remove_image(cri::RemoveImageRequest { image: spec() })
        .await
        .context("remove")?;
    times.sort();
    let median = times[times.len() / 2];
    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "pull+unpack {name}: {} layers, {:.1} MB compressed, {:.1} MB unpacked",
        img.layers.len(),
        mb(compressed),
        mb(uncompressed)
    );
    println!(
        "median {:.3} s over {} runs (min {:.3} s, max {:.3} s): {:.1} MB/s compressed, {:.1} MB/s unpacked",
        median.as_secs_f64(),
        times.len(),
        times[0].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        mb(compressed) / median.as_secs_f64(),
        mb(uncompressed) / median.as_secs_f64()
    );
    Ok(())
}

/// Processes whose command line contains `pattern`: (pid, VmRSS kB).
fn rss_of(pattern: &str) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let me = std::process::id();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(pattern) {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            out.push((pid, kb));
        }
    }
    out
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<14} median {:>7.2} ms   min {:>7.2}   p90 {:>7.2}   max {:>7.2}",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[(v.len() * 9 / 10).min(v.len() - 1)]),
        ms(v[v.len() - 1])
    );
}

/// runp → create → start → stop → remove, `n` times.
async fn lifecycle(f: &Flags, addr: &str, n: usize) -> anyhow::Result<()> {
    // `sleep` as the default command: containerd also runs this image as its pause container.
    let img = crictl_tests::image::busybox_image()?
        .cmd(&["exec sleep 2147483647"])
        .build(ManifestFormat::Oci)?;
    push_image(addr, "bench/sleep", "latest", &img)
        .await
        .context("push bench image")?;
    let image = format!("{addr}/bench/sleep:latest");
    let socket = f.endpoint.strip_prefix("unix://").unwrap_or(&f.endpoint);
    let channel = crictl_tests::daemon::connect(std::path::Path::new(socket)).await?;
    let mut images = cri::image_service_client::ImageServiceClient::new(channel.clone());
    let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel);
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("pull")?;
    let logs = tempfile::tempdir()?;
    let (mut runp, mut create, mut start, mut exec, mut stop, mut remove) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut helper_rss = Vec::new();
    for i in 0..n {
        let mut pod = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("bench-{i}"),
                uid: format!("bench-uid-{i}-{}", std::process::id()),
                namespace: "bench".into(),
                attempt: 0,
            }),
            hostname: "bench".into(),
            log_directory: logs.path().display().to_string(),
            ..Default::default()
        };
        if f.host_network {
            // A host-network pod has the host's name; runc refuses to set one.
            pod.hostname.clear();
            pod.linux = Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let t = Instant::now();
        let pod_id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("runp")?
            .into_inner()
            .pod_sandbox_id;
        runp.push(t.elapsed());
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "sleeper".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            log_path: format!("sleeper-{i}.log"),
            ..Default::default()
        };
        let t = Instant::now();
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod),
            })
            .await
            .context("create")?
            .into_inner()
            .container_id;
        create.push(t.elapsed());
        let t = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .context("start")?;
        start.push(t.elapsed());
        let t = Instant::now();
        let r = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                timeout: 10,
            })
            .await
            .context("exec_sync")?
            .into_inner();
        exec.push(t.elapsed());
        anyhow::ensure!(r.exit_code == 0, "exec_sync true exited {}", r.exit_code);
        // Per-container helpers idle between requests; let them settle before sampling.
        tokio::time::sleep(Duration::from_millis(f.idle_ms)).await;
        helper_rss.extend(rss_of(&f.helper_pattern).into_iter().map(|(_, kb)| kb));
        let t = Instant::now();
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .context("stop")?;
        stop.push(t.elapsed());
        let t = Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .context("stopp")?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id,
        })
        .await
        .context("rmp")?;
        remove.push(t.elapsed());
    }
    let create_start: Vec<Duration> = create.iter().zip(&start).map(|(a, b)| *a + *b).collect();
    println!(
        "{n} cycles against {}{}",
        f.endpoint,
        if f.host_network {
            " (host network)"
        } else {
            ""
        }
    );
    summary("runp", runp);
    summary("create", create);
    summary("start", start);
    summary("create+start", create_start);
    summary("exec_sync", exec);
    summary("stop", stop);
    summary("stopp+rmp", remove);
    helper_rss.sort();
    if !helper_rss.is_empty() {
        println!(
            "helper RSS ({}): median {} kB, max {} kB over {} samples",
            f.helper_pattern,
            helper_rss[helper_rss.len() / 2],
            helper_rss[helper_rss.len() - 1],
            helper_rss.len()
        );
    }
    for (pid, kb) in rss_of(&f.daemon_pattern) {
        println!("daemon RSS ({}, pid {pid}): {kb} kB", f.daemon_pattern);
    }
    Ok(())
}
