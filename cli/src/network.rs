//! `network create|ls|rm|inspect|connect|disconnect|prune`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::models::{
    EndpointIpamConfig, EndpointSettings, Ipam, IpamConfig, NetworkConnectRequest,
    NetworkCreateRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{ListNetworksOptions, PruneNetworksOptions};
use serde_json::{Value, json};

use crate::args::NetworkCmd;
use crate::client::Exit;
use crate::format::short_id;
use crate::image::parse_filters;
use crate::template::render_rows;

fn kv(list: &[String]) -> HashMap<String, String> {
    crate::opts::parse_labels(list)
}

pub async fn network(d: &Docker, cmd: NetworkCmd) -> Result<i32> {
    match cmd {
        NetworkCmd::Create(a) => {
            let config: Vec<IpamConfig> = a
                .subnet
                .iter()
                .enumerate()
                .map(|(i, s)| IpamConfig {
                    subnet: Some(s.clone()),
                    gateway: a.gateway.get(i).cloned(),
                    ip_range: a.ip_range.get(i).cloned(),
                    ..Default::default()
                })
                .collect();
            let r = d
                .create_network(NetworkCreateRequest {
                    name: a.name.clone(),
                    driver: Some(a.driver.clone()),
                    internal: Some(a.internal).filter(|b| *b),
                    attachable: Some(a.attachable).filter(|b| *b),
                    enable_ipv6: Some(a.ipv6).filter(|b| *b),
                    options: Some(kv(&a.opt)).filter(|m| !m.is_empty()),
                    labels: Some(kv(&a.label)).filter(|m| !m.is_empty()),
                    ipam: (!config.is_empty()).then(|| Ipam {
                        config: Some(config),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("create network {}", a.name))?;
            println!("{}", r.id);
        }
        NetworkCmd::Ls(a) => {
            let list = d
                .list_networks(Some(ListNetworksOptions {
                    filters: parse_filters(&a.filter)?,
                }))
                .await
                .context("list networks")?;
            let rows: Vec<Value> = list
                .iter()
                .map(|n| {
                    let id = n.id.clone().unwrap_or_default();
                    json!({"ID": if a.no_trunc { id.clone() } else { short_id(&id) },
                        "Name": n.name.clone().unwrap_or_default(),
                        "Driver": n.driver.clone().unwrap_or_default(),
                        "Scope": n.scope.clone().unwrap_or_default(),
                        "IPv6": n.enable_ipv6.unwrap_or(false).to_string(),
                        "Internal": n.internal.unwrap_or(false).to_string(),
                        "CreatedAt": n.created.clone().unwrap_or_default()})
                })
                .collect();
            if a.quiet {
                for r in &rows {
                    println!("{}", r["ID"].as_str().unwrap_or(""));
                }
                return Ok(0);
            }
            let header = json!({"ID": "NETWORK ID", "Name": "NAME", "Driver": "DRIVER",
                "Scope": "SCOPE", "IPv6": "IPV6", "Internal": "INTERNAL", "CreatedAt": "CREATED AT"});
            let default = "table {{.ID}}\t{{.Name}}\t{{.Driver}}\t{{.Scope}}";
            print!(
                "{}",
                render_rows(a.format.as_deref().unwrap_or(default), &header, &rows)?
            );
        }
        NetworkCmd::Rm(a) => {
            let mut failed = false;
            for n in &a.names {
                match d.remove_network(n).await {
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
        NetworkCmd::Inspect(a) => {
            crate::inspect::inspect_each("networks", &a.names, a.format.as_deref()).await?;
        }
        NetworkCmd::Connect(a) => {
            d.connect_network(
                &a.network,
                NetworkConnectRequest {
                    container: a.container.clone(),
                    endpoint_config: Some(EndpointSettings {
                        aliases: Some(a.alias.clone()).filter(|v| !v.is_empty()),
                        links: Some(a.link.clone()).filter(|v| !v.is_empty()),
                        ipam_config: a.ip.clone().map(|ip| EndpointIpamConfig {
                            ipv4_address: Some(ip),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                },
            )
            .await
            .with_context(|| format!("connect {} to {}", a.container, a.network))?;
        }
        NetworkCmd::Disconnect(a) => {
            d.disconnect_network(
                &a.network,
                NetworkDisconnectRequest {
                    container: a.container.clone(),
                    force: Some(a.force),
                },
            )
            .await
            .with_context(|| format!("disconnect {} from {}", a.container, a.network))?;
        }
        NetworkCmd::Prune(a) => {
            let r = d
                .prune_networks(Some(PruneNetworksOptions {
                    filters: parse_filters(&a.filter)?,
                }))
                .await
                .context("prune networks")?;
            let deleted = r.networks_deleted.unwrap_or_default();
            if !deleted.is_empty() {
                println!("Deleted Networks:");
                for n in deleted {
                    println!("{n}");
                }
            }
        }
    }
    Ok(0)
}
