//! `GET /containers/{id}/top` and `GET /containers/{id}/stats`: what a running container's
//! processes are and what they use, in docker's shapes. The counters come from the core
//! (`ContainerManager::usage`); this file only reads the host-wide figures docker puts beside
//! them and formats.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use serde_json::{Value, json};

use super::{Api, ApiError, ApiResult, Req, channel_body, json};
use crate::container::cgroup_stats::Sample;
use crate::engine::Record;
use crate::sandbox::now_ns;

/// Between two samples of a streamed `stats`, as docker.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The CRI container of `r`'s current run; 409 as docker when it does not run.
fn running_container(r: &Record) -> Result<String, ApiError> {
    r.run
        .as_ref()
        .filter(|_| r.running())
        .map(|run| run.container_id.clone())
        .ok_or_else(|| ApiError {
            status: StatusCode::CONFLICT,
            message: format!("Container {} is not running", r.id),
        })
}

/// docker's `top`: the host's `ps` with `ps_args` (`-ef` by default), keeping the rows whose
/// PID is one of the container's processes, as dockerd does.
pub(super) async fn top(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let r = api.engine.get(id)?;
    let ctr = running_container(&r)?;
    let (_, pids) = api.engine.containers().usage(&ctr).await?;
    let ps_args = match req.q("ps_args") {
        "" => "-ef",
        a => a,
    };
    let out = tokio::process::Command::new("ps")
        .args(ps_args.split_whitespace())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("Error running ps: {e}"),
        })?;
    if !out.status.success() {
        return Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "Error running ps: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let (titles, processes) =
        filter_ps(&String::from_utf8_lossy(&out.stdout), &pids).map_err(|message| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        })?;
    json(
        StatusCode::OK,
        &json!({"Titles": titles, "Processes": processes}),
    )
}

/// Splits `ps` output into titles and the rows of `pids`. The last column (the command) keeps
/// its spaces.
fn filter_ps(text: &str, pids: &[i32]) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let mut lines = text.lines();
    let titles: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let pid_col = titles
        .iter()
        .position(|t| t == "PID")
        .ok_or_else(|| "Couldn't find PID field in ps output".to_owned())?;
    let mut rows = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < titles.len() {
            continue;
        }
        let Ok(pid) = fields[pid_col].parse::<i32>() else {
            continue;
        };
        if pids.binary_search(&pid).is_err() {
            continue;
        }
        let last = titles.len() - 1;
        let mut row: Vec<String> = fields[..last].iter().map(|f| (*f).to_owned()).collect();
        row.push(fields[last..].join(" "));
        rows.push(row);
    }
    Ok((titles, rows))
}

/// One reading: the container's counters and the host's CPU time, taken together.
struct Reading {
    at_ns: i64,
    sample: Sample,
    pids: Vec<i32>,
    system_ns: u64,
    online_cpus: u64,
}

/// docker's `stats`: with `stream` (the default) a JSON object each second, each carrying the
/// previous reading as `precpu_stats`; without it one object, taken a second after a first
/// reading so the client can compute the CPU share (at once with `one-shot`). A container that
/// is not running reads as zeros, as with docker.
pub(super) async fn stats(api: &Arc<Api>, id: &str, req: Req) -> ApiResult {
    let r = api.engine.get(id)?;
    let stream = req.q("stream").is_empty() || req.flag("stream")?;
    let one_shot = req.flag("one-shot")?;
    let first = read(api, &r).await;
    if !stream {
        let (pre, now) = if one_shot {
            (None, first)
        } else {
            tokio::time::sleep(STATS_INTERVAL).await;
            (Some(first), read(api, &r).await)
        };
        return json(StatusCode::OK, &stats_json(&r, pre.as_ref(), &now));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let api = api.clone();
    tokio::spawn(async move {
        let mut r = r;
        let mut pre: Option<Reading> = None;
        let mut now = first;
        loop {
            let mut line = stats_json(&r, pre.as_ref(), &now).to_string();
            line.push('\n');
            if tx.send(Ok(Bytes::from(line))).await.is_err() {
                return;
            }
            tokio::time::sleep(STATS_INTERVAL).await;
            // Looked up again each time: a restart is a new run; a removal ends the stream.
            r = match api.engine.get(&r.id) {
                Ok(r) => r,
                Err(_) => return,
            };
            pre = Some(now);
            now = read(&api, &r).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(channel_body(rx))
        .expect("static response parts"))
}

/// Reads `r`'s counters (zeros when it does not run) and the host's CPU time.
async fn read(api: &Arc<Api>, r: &Record) -> Reading {
    let (sample, pids) = match running_container(r) {
        Ok(ctr) => api
            .engine
            .containers()
            .usage(&ctr)
            .await
            .unwrap_or_default(),
        Err(_) => Default::default(),
    };
    let (system_ns, online_cpus) = host_cpu();
    Reading {
        at_ns: now_ns(),
        sample,
        pids,
        system_ns,
        online_cpus,
    }
}

/// The host's CPU time (ns, summed over CPUs, as docker's `system_cpu_usage`) and CPU count,
/// from `/proc/stat`.
fn host_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> (u64, u64) {
    // USER_HZ is 100 on every Linux ABI docker runs on; dockerd assumes the same.
    const NS_PER_TICK: u64 = 10_000_000;
    let mut system = 0;
    let mut cpus = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq, as dockerd sums them.
                let ticks: u64 = f.take(7).filter_map(|v| v.parse::<u64>().ok()).sum();
                system = ticks.saturating_mul(NS_PER_TICK);
            }
            Some(c) if c.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    (system, cpus.max(1))
}

/// Interface counters of the network namespace `pid` is in, from its `/proc/<pid>/net/dev`
/// (loopback left out, as docker shows only the container's interfaces).
fn networks(pid: Option<i32>) -> Value {
    let Some(pid) = pid else {
        return json!({});
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    parse_net_dev(&text)
}

fn parse_net_dev(text: &str) -> Value {
    let mut out = serde_json::Map::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 12 {
            continue;
        }
        out.insert(
            name.to_owned(),
            json!({
                "rx_bytes": v[0], "rx_packets": v[1], "rx_errors": v[2], "rx_dropped": v[3],
                "tx_bytes": v[8], "tx_packets": v[9], "tx_errors": v[10], "tx_dropped": v[11],
            }),
        );
    }
    Value::Object(out)
}

/// The host's memory, docker's "limit" of a container that has none.
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn cpu_json(r: Option<&Reading>) -> Value {
    let Some(r) = r else {
        return json!({"cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0}, "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}});
    };
    json!({
        "cpu_usage": {
            "total_usage": r.sample.cpu_usage_ns.unwrap_or(0),
            "usage_in_kernelmode": 0,
            "usage_in_usermode": 0,
        },
        "system_cpu_usage": r.system_ns,
        "online_cpus": r.online_cpus,
        "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
    })
}

fn stats_json(r: &Record, pre: Option<&Reading>, now: &Reading) -> Value {
    let time = |ns: i64| {
        if ns == 0 {
            "0001-01-01T00:00:00Z".to_owned()
        } else {
            api::time::rfc3339_nano(ns)
        }
    };
    let memory = match &now.sample.memory {
        // The docker client subtracts inactive file pages itself: v1 names them
        // `total_inactive_file`, v2 `inactive_file`; both are given.
        Some(m) => {
            let inactive = m.usage.saturating_sub(m.working_set);
            json!({
                "usage": m.usage,
                "limit": m.limit.unwrap_or_else(host_memory),
                "stats": {
                    "total_inactive_file": inactive,
                    "inactive_file": inactive,
                    "rss": m.rss,
                    "pgfault": m.page_faults,
                    "pgmajfault": m.major_page_faults,
                },
            })
        }
        None => json!({}),
    };
    json!({
        "read": time(now.at_ns),
        "preread": time(pre.map_or(0, |p| p.at_ns)),
        "name": format!("/{}", r.name),
        "id": r.id,
        "num_procs": 0,
        "pids_stats": {"current": now.sample.pids.unwrap_or(now.pids.len() as u64)},
        "blkio_stats": {
            "io_service_bytes_recursive": null, "io_serviced_recursive": null,
            "io_queue_recursive": null, "io_service_time_recursive": null,
            "io_wait_time_recursive": null, "io_merged_recursive": null,
            "io_time_recursive": null, "sectors_recursive": null,
        },
        "storage_stats": {},
        "cpu_stats": cpu_json(Some(now)),
        "precpu_stats": cpu_json(pre),
        "memory_stats": memory,
        "networks": networks(now.pids.first().copied()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_rows_are_those_of_the_container() {
        let ps = "UID          PID    PPID  C STIME TTY          TIME CMD\n\
                  root           1       0  0 10:00 ?        00:00:01 /sbin/init splash\n\
                  root          42       1  0 10:01 ?        00:00:00 sleep 300\n\
                  1000          43      42  0 10:01 pts/0    00:00:00 sh -c echo a b\n";
        let (titles, rows) = filter_ps(ps, &[42, 43]).expect("parse");
        assert_eq!(titles.len(), 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1], "42");
        assert_eq!(rows[1][7], "sh -c echo a b");
        assert!(filter_ps("USER COMMAND\nroot x\n", &[1]).is_err());
    }

    #[test]
    fn host_figures_parse() {
        let stat = "cpu  100 0 50 800 10 0 5 0 0 0\ncpu0 50 0 25 400 5 0 2 0 0 0\ncpu1 50 0 25 400 5 0 3 0 0 0\nintr 1 2\n";
        assert_eq!(parse_proc_stat(stat), (965 * 10_000_000, 2));
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\n  \
                   eth0: 1500 12 1 2 0 0 0 0 700 7 0 3 0 0 0 0\n";
        let v = parse_net_dev(dev);
        assert_eq!(v["eth0"]["rx_bytes"], 1500);
        assert_eq!(v["eth0"]["tx_dropped"], 3);
        assert!(v.get("lo").is_none());
    }
}
