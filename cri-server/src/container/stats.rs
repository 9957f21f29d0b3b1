//! ContainerStats and ListContainerStats: CPU and memory from the container's cgroup, the
//! writable layer's usage from its snapshot, as containerd reports them.
//!
//! Per call the cost is a few cgroup files per container plus a walk of the container's own
//! writable (upper) dir; no shim is asked and no other snapshot is read.

use std::collections::HashMap;
use std::sync::Mutex;

use api::cri;

use super::cgroup_stats::{Cgroup, Memory, Sample};
use super::{ContainerManager, ContainerRecord, Phase, default_cgroup_parent, pod_cgroup_parent};
use crate::error::{Error, Result};
use crate::sandbox::now_ns;

/// The previous CPU sample of each container and pod: `usage_nano_cores` is the rate between
/// two calls, as containerd computes it when its background collector has no value.
#[derive(Debug, Default)]
pub(super) struct CpuSamples(Mutex<HashMap<String, (u64, i64)>>);

impl CpuSamples {
    /// Remembers `usage_ns` at `at_ns` for `id` and returns the rate since the previous
    /// sample in nanocores; `None` on the first sample, when time did not move forward, or
    /// when the counter went back (a new cgroup under the same id).
    pub(super) fn rate(&self, id: &str, usage_ns: u64, at_ns: i64) -> Option<u64> {
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let previous = samples.get(id).copied();
        match previous {
            // An older sample arriving late must not replace a newer one.
            Some((_, then)) if at_ns <= then => None,
            Some((used, then)) => {
                samples.insert(id.to_owned(), (usage_ns, at_ns));
                let used = usage_ns.checked_sub(used)?;
                let elapsed = (at_ns - then) as u128;
                Some((used as u128 * 1_000_000_000 / elapsed) as u64)
            }
            None => {
                samples.insert(id.to_owned(), (usage_ns, at_ns));
                None
            }
        }
    }

    /// Drops what is kept for `id`.
    pub(super) fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// CRI's CPU usage from a sample; `rate` gives `usage_nano_cores`.
pub(super) fn cpu_usage(
    usage_ns: Option<u64>,
    at_ns: i64,
    rate: impl FnOnce(u64) -> Option<u64>,
) -> Option<cri::CpuUsage> {
    let usage_ns = usage_ns?;
    Some(cri::CpuUsage {
        timestamp: at_ns,
        usage_core_nano_seconds: value(usage_ns),
        usage_nano_cores: rate(usage_ns).and_then(value),
    })
}

/// CRI's memory usage from a sample.
pub(super) fn memory_usage(m: Option<&Memory>, at_ns: i64) -> Option<cri::MemoryUsage> {
    let m = m?;
    Some(cri::MemoryUsage {
        timestamp: at_ns,
        working_set_bytes: value(m.working_set),
        available_bytes: m.available().and_then(value),
        usage_bytes: value(m.usage),
        rss_bytes: value(m.rss),
        page_faults: value(m.page_faults),
        major_page_faults: value(m.major_page_faults),
    })
}

/// Stats of one container plus its task count, which pod stats add up.
pub(super) struct Measured {
    pub(super) stats: cri::ContainerStats,
    pub(super) sample: Sample,
}

impl ContainerManager {
    /// Stats of one container (full id or unique prefix). NotFound for an unknown id.
    pub async fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let r = self.get(id)?;
        let parent = match self.sandboxes.get(&r.sandbox_id) {
            Ok(s) => pod_cgroup_parent(&s),
            Err(_) => default_cgroup_parent(&r.sandbox_id),
        };
        Ok(self.measure(r, parent).await?.stats)
    }

    /// Stats of every container that matches `filter` (ids by prefix, labels exactly), like
    /// ListContainers; containers that are not running have no CPU or memory stats.
    pub async fn list_container_stats(
        &self,
        filter: &cri::ContainerStatsFilter,
    ) -> Result<Vec<cri::ContainerStats>> {
        let records: Vec<ContainerRecord> = self
            .all()?
            .into_iter()
            .filter(|r| {
                r.phase != Phase::Creating
                    && (filter.id.is_empty() || r.id.starts_with(&filter.id))
                    && (filter.pod_sandbox_id.is_empty()
                        || r.sandbox_id.starts_with(&filter.pod_sandbox_id))
                    && filter
                        .label_selector
                        .iter()
                        .all(|(k, v)| r.config.labels.get(k) == Some(v))
            })
            .collect();
        let parents = self
            .sandboxes
            .list()?
            .iter()
            .map(|s| (s.id.clone(), pod_cgroup_parent(s)))
            .collect();
        Ok(self
            .measure_all(records, &parents)
            .await?
            .into_iter()
            .map(|m| m.stats)
            .collect())
    }

    /// Measures `records`; `parents` maps pod ids to their cgroup parents (a pod missing there
    /// has berth's default one).
    pub(super) async fn measure_all(
        &self,
        records: Vec<ContainerRecord>,
        parents: &HashMap<String, String>,
    ) -> Result<Vec<Measured>> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let parent = parents
                .get(&r.sandbox_id)
                .cloned()
                .unwrap_or_else(|| default_cgroup_parent(&r.sandbox_id));
            out.push(self.measure(r, parent).await?);
        }
        Ok(out)
    }

    async fn measure(&self, r: ContainerRecord, cgroup_parent: String) -> Result<Measured> {
        let snapshots = self.snapshots.clone();
        let mountpoint = self.images.snapshots_dir().display().to_string();
        // An exited container's cgroup may linger until removal; it no longer measures
        // anything the container uses (containerd reports no CPU/memory for it either).
        let running = r.exit.is_none();
        let cgroup = format!("{}/{}", cgroup_parent.trim_end_matches('/'), r.id);
        let key = r.snapshot_key();
        let (sample, layer, at_ns) = tokio::task::spawn_blocking(move || {
            let sample = if running {
                Cgroup::host(&cgroup).sample()
            } else {
                Sample::default()
            };
            let at_ns = now_ns();
            (sample, snapshots.usage(&key), at_ns)
        })
        .await
        .map_err(|e| Error::Internal(format!("container stats thread: {e}")))?;
        let writable_layer = match layer {
            Ok(u) => Some(cri::FilesystemUsage {
                timestamp: at_ns,
                fs_id: Some(cri::FilesystemIdentifier { mountpoint }),
                used_bytes: value(u.size),
                inodes_used: value(u.inodes),
            }),
            // Removed meanwhile: no layer to report.
            Err(snapshotter::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let stats = cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: r.id.clone(),
                metadata: r.config.metadata.clone(),
                labels: r.config.labels.clone(),
                annotations: r.config.annotations.clone(),
            }),
            cpu: cpu_usage(sample.cpu_usage_ns, at_ns, |u| {
                self.cpu_samples.rate(&r.id, u, at_ns)
            }),
            memory: memory_usage(sample.memory.as_ref(), at_ns),
            writable_layer,
            swap: None,
        };
        Ok(Measured { stats, sample })
    }

    /// A running container's cgroup counters and processes (host pids), read now, for docker's
    /// `stats` and `top`. FailedPrecondition when it is not running.
    pub async fn usage(&self, id: &str) -> Result<(Sample, Vec<i32>)> {
        let r = self.running(id).await?;
        let cgroup = Cgroup::host(&self.cgroup_of(&r));
        tokio::task::spawn_blocking(move || (cgroup.sample(), cgroup.pids()))
            .await
            .map_err(|e| Error::Internal(format!("container usage thread: {e}")))
    }

    /// Forgets the CPU samples of a removed container or pod.
    pub(super) fn forget(&self, id: &str) {
        self.cpu_samples.forget(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_needs_two_samples_and_forward_time() {
        let s = CpuSamples::default();
        assert_eq!(s.rate("c", 1_000, 1_000_000_000), None, "first sample");
        // Half a core for two seconds.
        assert_eq!(
            s.rate("c", 1_000 + 1_000_000_000, 3_000_000_000),
            Some(500_000_000)
        );
        assert_eq!(s.rate("c", 5_000_000_000, 3_000_000_000), None, "same time");
        assert_eq!(s.rate("c", 0, 4_000_000_000), None, "counter went back");
        assert_eq!(s.rate("c", 250_000_000, 5_000_000_000), Some(250_000_000));
        s.forget("c");
        assert_eq!(s.rate("c", 9, 6_000_000_000), None, "forgotten");
    }

    #[test]
    fn cri_values_from_a_sample() {
        let m = Memory {
            usage: 10,
            working_set: 8,
            rss: 5,
            page_faults: 3,
            major_page_faults: 1,
            limit: None,
        };
        let mu = memory_usage(Some(&m), 7).expect("memory");
        assert_eq!(mu.timestamp, 7);
        assert_eq!(mu.working_set_bytes, value(8));
        assert_eq!(mu.available_bytes, None, "no limit, no available bytes");
        assert_eq!(mu.usage_bytes, value(10));
        assert_eq!(mu.rss_bytes, value(5));
        assert_eq!((mu.page_faults, mu.major_page_faults), (value(3), value(1)));
        let limited = Memory {
            limit: Some(20),
            ..m
        };
        assert_eq!(
            memory_usage(Some(&limited), 7)
                .expect("memory")
                .available_bytes,
            value(12)
        );
        assert!(memory_usage(None, 7).is_none());

        let cpu = cpu_usage(Some(42), 9, |_| None).expect("cpu");
        assert_eq!(
            (
                cpu.timestamp,
                cpu.usage_core_nano_seconds,
                cpu.usage_nano_cores
            ),
            (9, value(42), None)
        );
        assert!(cpu_usage(None, 9, |_| Some(1)).is_none());
    }
}
