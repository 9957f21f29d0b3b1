//! `info`, `version`, `system prune`.

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::query_parameters::{PruneContainersOptions, PruneImagesOptions, PruneNetworksOptions};
use serde_json::json;

use crate::args::{FormatOnly, PruneArgs, SystemCmd};
use crate::format::human_size;
use crate::image::parse_filters;
use crate::template::Template;

pub async fn info(d: &Docker, a: FormatOnly) -> Result<i32> {
    let i = d.info().await.context("read the daemon's info")?;
    if let Some(f) = a.format.as_deref() {
        println!(
            "{}",
            Template::parse(f)?.render(&serde_json::to_value(&i)?)?
        );
        return Ok(0);
    }
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let n = |v: Option<i64>| v.unwrap_or(0);
    println!("Client:");
    println!(" Version:    {}", env!("CARGO_PKG_VERSION"));
    println!();
    println!("Server:");
    println!(" Containers: {}", n(i.containers));
    println!("  Running: {}", n(i.containers_running));
    println!("  Paused: {}", n(i.containers_paused));
    println!("  Stopped: {}", n(i.containers_stopped));
    println!(" Images: {}", n(i.images));
    println!(" Server Version: {}", s(&i.server_version));
    println!(" Storage Driver: {}", s(&i.driver));
    println!(
        " Cgroup Driver: {}",
        i.cgroup_driver.map(|c| c.to_string()).unwrap_or_default()
    );
    println!(
        " Cgroup Version: {}",
        i.cgroup_version.map(|c| c.to_string()).unwrap_or_default()
    );
    println!(" Kernel Version: {}", s(&i.kernel_version));
    println!(" Operating System: {}", s(&i.operating_system));
    println!(" OSType: {}", s(&i.os_type));
    println!(" Architecture: {}", s(&i.architecture));
    println!(" CPUs: {}", n(i.ncpu));
    println!(
        " Total Memory: {}",
        crate::format::binary_size(n(i.mem_total) as f64)
    );
    println!(" Name: {}", s(&i.name));
    println!(" ID: {}", s(&i.id));
    println!(" Docker Root Dir: {}", s(&i.docker_root_dir));
    Ok(0)
}

pub async fn version(d: &Docker, a: FormatOnly) -> Result<i32> {
    let client = json!({
        "Version": env!("CARGO_PKG_VERSION"),
        "ApiVersion": "1.44",
        "Os": std::env::consts::OS,
        "Arch": std::env::consts::ARCH,
    });
    let server = d.version().await;
    let value = json!({
        "Client": client,
        "Server": server.as_ref().ok().map(serde_json::to_value).transpose()?,
    });
    if let Some(f) = a.format.as_deref() {
        println!("{}", Template::parse(f)?.render(&value)?);
    } else {
        println!("Client:");
        println!(" Version:           {}", env!("CARGO_PKG_VERSION"));
        println!(" API version:       1.44");
        println!(
            " OS/Arch:           {}/{}",
            std::env::consts::OS,
            std::env::consts::ARCH
        );
        if let Ok(v) = &server {
            let s = |v: &Option<String>| v.clone().unwrap_or_default();
            println!();
            match v.platform.as_ref().map(|p| p.name.as_str()) {
                Some(name) if !name.is_empty() => println!("Server: {name}"),
                _ => println!("Server:"),
            }
            println!(" Engine:");
            println!("  Version:          {}", s(&v.version));
            println!(
                "  API version:      {} (minimum version {})",
                s(&v.api_version),
                s(&v.min_api_version)
            );
            println!("  OS/Arch:          {}/{}", s(&v.os), s(&v.arch));
        }
    }
    server.context("read the daemon's version")?;
    Ok(0)
}

pub async fn system(d: &Docker, cmd: SystemCmd) -> Result<i32> {
    match cmd {
        SystemCmd::Info(a) => info(d, a).await,
        SystemCmd::Prune(a) => prune(d, a).await,
    }
}

async fn prune(d: &Docker, a: PruneArgs) -> Result<i32> {
    if !a.force {
        use std::io::BufRead;
        println!("WARNING! This will remove:");
        println!("  - all stopped containers");
        println!("  - all networks not used by at least one container");
        if a.volumes {
            println!("  - all anonymous volumes not used by at least one container");
        }
        if a.all {
            println!("  - all images without at least one container associated to them");
        } else {
            println!("  - all dangling images");
        }
        print!("\nAre you sure you want to continue? [y/N] ");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if !line.trim().eq_ignore_ascii_case("y") {
            return Ok(0);
        }
    }
    let filters = parse_filters(&a.filter)?;
    let mut reclaimed = 0i64;
    let c = d
        .prune_containers(Some(PruneContainersOptions {
            filters: filters.clone(),
        }))
        .await
        .context("prune containers")?;
    reclaimed += c.space_reclaimed.unwrap_or(0);
    let deleted = c.containers_deleted.unwrap_or_default();
    if !deleted.is_empty() {
        println!("Deleted Containers:");
        for id in deleted {
            println!("{id}");
        }
        println!();
    }
    // As docker: the first part that fails ends the prune, after what was done is told.
    let n = d
        .prune_networks(Some(PruneNetworksOptions {
            filters: filters.clone(),
        }))
        .await
        .context("prune networks")?;
    let deleted = n.networks_deleted.unwrap_or_default();
    if !deleted.is_empty() {
        println!("Deleted Networks:");
        for id in deleted {
            println!("{id}");
        }
        println!();
    }
    if a.volumes {
        match d
            .prune_volumes(None::<bollard::query_parameters::PruneVolumesOptions>)
            .await
        {
            Ok(v) => {
                reclaimed += v.space_reclaimed.unwrap_or(0);
                let deleted = v.volumes_deleted.unwrap_or_default();
                if !deleted.is_empty() {
                    println!("Deleted Volumes:");
                    for id in deleted {
                        println!("{id}");
                    }
                    println!();
                }
            }
            Err(e) => crate::client::report(&anyhow::Error::new(e).context("prune volumes")),
        }
    }
    let mut image_filters = filters.unwrap_or_default();
    if a.all {
        image_filters.insert("dangling".into(), vec!["false".into()]);
    }
    let i = d
        .prune_images(Some(PruneImagesOptions {
            filters: Some(image_filters).filter(|m| !m.is_empty()),
        }))
        .await
        .context("prune images")?;
    reclaimed += i.space_reclaimed.unwrap_or(0);
    let deleted = i.images_deleted.unwrap_or_default();
    if !deleted.is_empty() {
        println!("Deleted Images:");
        for img in deleted {
            if let Some(u) = img.untagged {
                println!("untagged: {u}");
            }
            if let Some(d) = img.deleted {
                println!("deleted: {d}");
            }
        }
        println!();
    }
    println!("Total reclaimed space: {}", human_size(reclaimed));
    Ok(0)
}
