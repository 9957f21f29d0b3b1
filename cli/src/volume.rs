//! `volume create|ls|rm|inspect|prune`.

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{ListVolumesOptions, PruneVolumesOptions, RemoveVolumeOptions};
use serde_json::{Value, json};

use crate::args::VolumeCmd;
use crate::client::Exit;
use crate::format::human_size;
use crate::image::parse_filters;
use crate::template::render_rows;

pub async fn volume(d: &Docker, cmd: VolumeCmd) -> Result<i32> {
    match cmd {
        VolumeCmd::Create(a) => {
            let v = d
                .create_volume(VolumeCreateRequest {
                    name: a.name.clone(),
                    driver: Some(a.driver.clone()),
                    driver_opts: Some(crate::opts::parse_labels(&a.opt)).filter(|m| !m.is_empty()),
                    labels: Some(crate::opts::parse_labels(&a.label)).filter(|m| !m.is_empty()),
                    ..Default::default()
                })
                .await
                .context("create volume")?;
            println!("{}", v.name);
        }
        VolumeCmd::Ls(a) => {
            let r = d
                .list_volumes(Some(ListVolumesOptions {
                    filters: parse_filters(&a.filter)?,
                }))
                .await
                .context("list volumes")?;
            let rows: Vec<Value> = r
                .volumes
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    json!({"Name": v.name, "Driver": v.driver, "Mountpoint": v.mountpoint,
                        "Scope": v.scope.map(|s| s.to_string()).unwrap_or_default(),
                        "Size": v.usage_data.as_ref().map_or("N/A".to_owned(), |u| human_size(u.size)),
                        "Labels": v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")})
                })
                .collect();
            if a.quiet {
                for r in &rows {
                    println!("{}", r["Name"].as_str().unwrap_or(""));
                }
                return Ok(0);
            }
            let header = json!({"Name": "VOLUME NAME", "Driver": "DRIVER", "Mountpoint": "MOUNTPOINT",
                "Scope": "SCOPE", "Size": "SIZE", "Labels": "LABELS"});
            let default = "table {{.Driver}}\t{{.Name}}";
            print!(
                "{}",
                render_rows(a.format.as_deref().unwrap_or(default), &header, &rows)?
            );
        }
        VolumeCmd::Rm(a) => {
            let mut failed = false;
            for n in &a.names {
                match d
                    .remove_volume(n, Some(RemoveVolumeOptions { force: a.force }))
                    .await
                {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        crate::client::report(&anyhow::Error::new(e));
                        failed = true;
                    }
                }
            }
            if failed {
                return Err(Exit(1).into());
            }
        }
        VolumeCmd::Inspect(a) => {
            crate::inspect::inspect_each("volumes", &a.names, a.format.as_deref()).await?;
        }
        VolumeCmd::Prune(a) => {
            let mut filters = parse_filters(&a.filter)?.unwrap_or_default();
            if a.all {
                filters.insert("all".into(), vec!["true".into()]);
            }
            let r = d
                .prune_volumes(Some(PruneVolumesOptions {
                    filters: Some(filters).filter(|m| !m.is_empty()),
                }))
                .await
                .context("prune volumes")?;
            let deleted = r.volumes_deleted.unwrap_or_default();
            if !deleted.is_empty() {
                println!("Deleted Volumes:");
                for n in &deleted {
                    println!("{n}");
                }
                println!();
            }
            println!(
                "Total reclaimed space: {}",
                human_size(r.space_reclaimed.unwrap_or(0))
            );
        }
    }
    Ok(0)
}
