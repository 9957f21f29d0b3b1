//! `berth-bench`: measures pull+unpack of a multi-layer image from a local registry against any
//! CRI server (berthd, containerd, CRI-O), so the figures compare like with like.
//!
//! ```text
//! berth-bench --endpoint unix:///run/berth/berth.sock --size-mb 50 --layers 5 --runs 5
//! ```
//! Starts its own registry on 127.0.0.1 unless `--registry` is given, pushes a generated image,
//! then for each run removes the image and times PullImage. Prints the median and throughput.

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
