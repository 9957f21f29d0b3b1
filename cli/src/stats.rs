//! `stats`: docker's live table of containers' usage. Each container's stream (one reading a
//! second, the previous one beside it) feeds the latest row; the table is drawn each second,
//! over itself on a terminal and as plain successive tables otherwise. Figures are computed as
//! the docker client computes them.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::models::{ContainerCpuStats, ContainerStatsResponse};
use bollard::query_parameters::{ListContainersOptions, StatsOptions};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::args::StatsArgs;
use crate::client::{Exit, report};
use crate::format::{self, short_id};
use crate::template::render_rows;

const DEFAULT_FORMAT: &str = "table {{.ID}}\t{{.Name}}\t{{.CPUPerc}}\t{{.MemUsage}}\t{{.MemPerc}}\t{{.NetIO}}\t{{.BlockIO}}\t{{.PIDs}}";

fn header() -> Value {
    json!({"ID": "CONTAINER ID", "Container": "CONTAINER", "Name": "NAME",
        "CPUPerc": "CPU %", "MemUsage": "MEM USAGE / LIMIT", "MemPerc": "MEM %",
        "NetIO": "NET I/O", "BlockIO": "BLOCK I/O", "PIDs": "PIDS"})
}

/// docker's `calculateCPUPercentUnix`: the container's share of the host's CPU time between
/// the two readings, times the CPUs online.
pub fn cpu_percent(now: Option<&ContainerCpuStats>, pre: Option<&ContainerCpuStats>) -> f64 {
    let total = |c: Option<&ContainerCpuStats>| {
        c.and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0) as f64
    };
    let system =
        |c: Option<&ContainerCpuStats>| c.and_then(|c| c.system_cpu_usage).unwrap_or(0) as f64;
    let cpu_delta = total(now) - total(pre);
    let sys_delta = system(now) - system(pre);
    let mut cpus = now.and_then(|c| c.online_cpus).unwrap_or(0) as f64;
    if cpus == 0.0 {
        cpus = now
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.percpu_usage.as_ref())
            .map_or(0, |p| p.len()) as f64;
    }
    if sys_delta > 0.0 && cpu_delta > 0.0 {
        cpu_delta / sys_delta * cpus * 100.0
    } else {
        0.0
    }
}

/// docker's `calculateMemUsageUnixNoCache`: usage less the inactive file cache (cgroup v1's
/// `total_inactive_file`, v2's `inactive_file`).
pub fn memory_used(st: &ContainerStatsResponse) -> f64 {
    let Some(m) = st.memory_stats.as_ref() else {
        return 0.0;
    };
    let usage = m.usage.unwrap_or(0);
    let stats = m.stats.as_ref();
    if let Some(v) = stats.and_then(|s| s.get("total_inactive_file"))
        && *v < usage
    {
        return (usage - v) as f64;
    }
    match stats.and_then(|s| s.get("inactive_file")) {
        Some(v) if *v < usage => (usage - v) as f64,
        _ => usage as f64,
    }
}

/// The row `--format` sees for one reading of the container the user called `given`.
pub fn row(given: &str, st: &ContainerStatsResponse, no_trunc: bool) -> Value {
    let cpu = cpu_percent(st.cpu_stats.as_ref(), st.precpu_stats.as_ref());
    let used = memory_used(st);
    let limit = st.memory_stats.as_ref().and_then(|m| m.limit).unwrap_or(0) as f64;
    let mem_pct = if limit != 0.0 {
        used / limit * 100.0
    } else {
        0.0
    };
    let (mut rx, mut tx) = (0u64, 0u64);
    for net in st.networks.iter().flat_map(|n| n.values()) {
        rx += net.rx_bytes.unwrap_or(0);
        tx += net.tx_bytes.unwrap_or(0);
    }
    let (mut br, mut bw) = (0u64, 0u64);
    for e in st
        .blkio_stats
        .as_ref()
        .and_then(|b| b.io_service_bytes_recursive.as_ref())
        .into_iter()
        .flatten()
    {
        match e.op.as_deref().and_then(|o| o.chars().next()) {
            Some('r' | 'R') => br += e.value.unwrap_or(0),
            Some('w' | 'W') => bw += e.value.unwrap_or(0),
            _ => {}
        }
    }
    let id = st.id.clone().unwrap_or_else(|| given.to_owned());
    json!({
        "ID": if no_trunc { id.clone() } else { short_id(&id) },
        "Container": given,
        "Name": st.name.clone().unwrap_or_default().trim_start_matches('/'),
        "CPUPerc": format!("{cpu:.2}%"),
        "MemUsage": format!("{} / {}", format::binary_size(used), format::binary_size(limit)),
        "MemPerc": format!("{mem_pct:.2}%"),
        "NetIO": format!("{} / {}", format::human_size(rx as i64), format::human_size(tx as i64)),
        "BlockIO": format!("{} / {}", format::human_size(br as i64), format::human_size(bw as i64)),
        "PIDs": st.pids_stats.as_ref().and_then(|p| p.current).unwrap_or(0).to_string(),
    })
}

async fn listed(d: &Docker, all: bool) -> Result<Vec<String>> {
    Ok(d.list_containers(Some(ListContainersOptions {
        all,
        ..Default::default()
    }))
    .await
    .context("list containers")?
    .into_iter()
    .filter_map(|c| c.id)
    .collect())
}

/// One reading (the daemon takes two, a second apart, for the CPU share).
async fn one(d: &Docker, name: &str, no_trunc: bool) -> Result<Value> {
    let mut s = d.stats(
        name,
        Some(StatsOptions {
            stream: false,
            one_shot: false,
        }),
    );
    match s.next().await {
        Some(r) => Ok(row(
            name,
            &r.with_context(|| format!("stats of {name}"))?,
            no_trunc,
        )),
        None => anyhow::bail!("no stats for {name}"),
    }
}

pub async fn stats(d: &Docker, a: StatsArgs) -> Result<i32> {
    let format = a
        .format
        .clone()
        .unwrap_or_else(|| DEFAULT_FORMAT.to_owned());
    let named = !a.containers.is_empty();
    if a.no_stream {
        let names = if named {
            a.containers.clone()
        } else {
            listed(d, a.all).await?
        };
        let results = futures::future::join_all(names.iter().map(|n| one(d, n, a.no_trunc))).await;
        let mut rows = Vec::new();
        let mut failed = false;
        for r in results {
            match r {
                Ok(r) => rows.push(r),
                Err(e) => {
                    report(&e);
                    failed = true;
                }
            }
        }
        print!("{}", render_rows(&format, &header(), &rows)?);
        return if failed { Err(Exit(1).into()) } else { Ok(0) };
    }
    if named {
        // docker refuses at once a container it does not know.
        for n in &a.containers {
            d.inspect_container(n, None)
                .await
                .with_context(|| format!("stats of {n}"))?;
        }
    }
    let board = Board::default();
    let tty = crate::tty::stdout_is_tty();
    let mut order: Vec<String> = Vec::new();
    let mut first = true;
    let mut cleared = false;
    loop {
        let names = if named {
            a.containers.clone()
        } else {
            listed(d, a.all).await?
        };
        for n in &names {
            if !order.contains(n) {
                order.push(n.clone());
                board.follow(d.clone(), n.clone(), a.no_trunc);
            }
        }
        if !named {
            // Gone from the listing (removed, or stopped without -a): off the table.
            order.retain(|n| names.contains(n));
        }
        if first {
            // The first table waits (a little) for every container's first reading.
            for _ in 0..30 {
                if board.all_read(&order) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            first = false;
        }
        let rows = board.rows(&order);
        let table = render_rows(&format, &header(), &rows)?;
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, the table, and the rest of the screen cleared: no flicker.
            let drawn: String = table.lines().map(|l| format!("{l}\x1b[K\n")).collect();
            // The screen is cleared once; after that each table is drawn over the last.
            let clear = if cleared { "" } else { "\x1b[2J" };
            cleared = true;
            write!(out, "{clear}\x1b[H{drawn}\x1b[J").context("write stdout")?;
        } else {
            write!(out, "{table}").context("write stdout")?;
        }
        out.flush().context("write stdout")?;
        drop(out);
        if named && board.all_ended(&order) {
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The latest row of each container followed, by the name it was asked by.
#[derive(Default, Clone)]
struct Board {
    rows: Arc<Mutex<HashMap<String, Slot>>>,
}

#[derive(Default)]
struct Slot {
    row: Option<Value>,
    ended: bool,
}

impl Board {
    fn follow(&self, d: Docker, name: String, no_trunc: bool) {
        let board = self.clone();
        board.lock().insert(name.clone(), Slot::default());
        tokio::spawn(async move {
            let mut s = d.stats(
                &name,
                Some(StatsOptions {
                    stream: true,
                    one_shot: false,
                }),
            );
            while let Some(Ok(st)) = s.next().await {
                let r = row(&name, &st, no_trunc);
                if let Some(slot) = board.lock().get_mut(&name) {
                    slot.row = Some(r);
                }
            }
            if let Some(slot) = board.lock().get_mut(&name) {
                slot.ended = true;
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic elsewhere leaves rows that are still fine to show.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn all_read(&self, names: &[String]) -> bool {
        let rows = self.lock();
        names
            .iter()
            .all(|n| rows.get(n).is_none_or(|s| s.row.is_some() || s.ended))
    }

    fn all_ended(&self, names: &[String]) -> bool {
        let rows = self.lock();
        names.iter().all(|n| rows.get(n).is_none_or(|s| s.ended))
    }

    fn rows(&self, names: &[String]) -> Vec<Value> {
        let rows = self.lock();
        names
            .iter()
            .filter_map(|n| rows.get(n).and_then(|s| s.row.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_as_docker_computes_them() {
        let st: ContainerStatsResponse = serde_json::from_value(json!({
            "id": "0123456789abcdef", "name": "/box",
            "cpu_stats": {"cpu_usage": {"total_usage": 300}, "system_cpu_usage": 2000, "online_cpus": 2},
            "precpu_stats": {"cpu_usage": {"total_usage": 100}, "system_cpu_usage": 1000},
            "memory_stats": {"usage": 10 << 20, "limit": 100 << 20,
                "stats": {"total_inactive_file": 4 << 20}},
            "pids_stats": {"current": 3},
            "blkio_stats": {"io_service_bytes_recursive": [
                {"major": 8, "minor": 0, "op": "Read", "value": 1000},
                {"major": 8, "minor": 0, "op": "write", "value": 2000}]},
            "networks": {"eth0": {"rx_bytes": 1500, "tx_bytes": 700}},
        }))
        .expect("stats");
        let r = row("box", &st, false);
        // 200 of 1000 ns, on 2 CPUs.
        assert_eq!(r["CPUPerc"], "40.00%");
        assert_eq!(r["MemUsage"], "6MiB / 100MiB");
        assert_eq!(r["MemPerc"], "6.00%");
        assert_eq!(r["NetIO"], "1.5kB / 700B");
        assert_eq!(r["BlockIO"], "1kB / 2kB");
        assert_eq!(r["PIDs"], "3");
        assert_eq!(r["ID"], "0123456789ab");
        assert_eq!(r["Name"], "box");
        // cgroup v2 names the cache `inactive_file`; no previous reading means no share.
        let v2: ContainerStatsResponse = serde_json::from_value(json!({
            "cpu_stats": {"cpu_usage": {"total_usage": 300}, "system_cpu_usage": 2000},
            "memory_stats": {"usage": 10 << 20, "stats": {"inactive_file": 2 << 20}},
        }))
        .expect("stats");
        assert_eq!(memory_used(&v2), (8 << 20) as f64);
        assert_eq!(
            cpu_percent(v2.cpu_stats.as_ref(), v2.precpu_stats.as_ref()),
            0.0
        );
    }
}
