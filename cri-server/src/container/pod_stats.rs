//! PodSandboxStats and ListPodSandboxStats: the pod's CPU, memory and process count, and the
//! stats of each of its containers.
//!
//! When the pod's cgroup is berth's own (`/berth/<pod>`), it is read directly: cgroup counters
//! are hierarchical, so it holds its containers' usage, exited ones' CPU time included. A
//! cgroup parent kubelet chose is kubelet's and may hold more than berth's containers; then the
//! pod's values are the sum of its containers'.
//!
//! Network usage is left empty: pods have no network of their own yet (no CNI); it comes from
//! the pod's network namespace once they do.

use std::collections::HashMap;

use api::cri;

use super::cgroup_stats::{Cgroup, Memory, Sample};
use super::stats::{Measured, cpu_usage, memory_usage};
use super::{ContainerManager, ContainerRecord, Phase, default_cgroup_parent, pod_cgroup_parent};
use crate::error::{Error, Result};
use crate::sandbox::{SandboxRecord, State as SandboxState, now_ns};

/// The sum of the containers' samples: the pod's usage when its cgroup is not berth's.
fn sum(samples: &[&Sample]) -> Sample {
    fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        }
    }
    let mut total = Sample::default();
    for s in samples {
        total.cpu_usage_ns = add(total.cpu_usage_ns, s.cpu_usage_ns);
        total.pids = add(total.pids, s.pids);
        if let Some(m) = &s.memory {
            let t = total.memory.get_or_insert_with(Memory::default);
            t.usage = t.usage.saturating_add(m.usage);
            t.working_set = t.working_set.saturating_add(m.working_set);
            t.rss = t.rss.saturating_add(m.rss);
            t.page_faults = t.page_faults.saturating_add(m.page_faults);
            t.major_page_faults = t.major_page_faults.saturating_add(m.major_page_faults);
            // Per-container limits do not add up to a pod limit.
            t.limit = None;
        }
    }
    total
}

impl ContainerManager {
    /// Stats of one pod (full id or unique prefix): NotFound for an unknown pod,
    /// FailedPrecondition for a stopped one (as containerd, which has nothing to measure then).
    pub async fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats> {
        let s = self.sandboxes.get(id)?;
        if s.state != SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready: it has no stats",
                s.id
            )));
        }
        let records = self
            .all()?
            .into_iter()
            .filter(|r| r.sandbox_id == s.id)
            .collect();
        self.measure_pod(s, records).await
    }

    /// Stats of every ready pod that matches `filter` (id by prefix, labels exactly).
    pub async fn list_pod_sandbox_stats(
        &self,
        filter: &cri::PodSandboxStatsFilter,
    ) -> Result<Vec<cri::PodSandboxStats>> {
        let mut containers = self.all()?;
        let mut out = Vec::new();
        for s in self.sandboxes.list()? {
            let wanted = s.state == SandboxState::Ready
                && (filter.id.is_empty() || s.id.starts_with(&filter.id))
                && filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| s.config.labels.get(k) == Some(v));
            if wanted {
                let (mine, rest) = containers.into_iter().partition(|r| r.sandbox_id == s.id);
                containers = rest;
                out.push(self.measure_pod(s, mine).await?);
            }
        }
        Ok(out)
    }

    /// Stats of the pod `s` whose container records are `records`.
    async fn measure_pod(
        &self,
        s: SandboxRecord,
        records: Vec<ContainerRecord>,
    ) -> Result<cri::PodSandboxStats> {
        let records = records
            .into_iter()
            .filter(|r| r.phase != Phase::Creating)
            .collect();
        let parent = pod_cgroup_parent(&s);
        let parents = HashMap::from([(s.id.clone(), parent.clone())]);
        let containers: Vec<Measured> = self.measure_all(records, &parents).await?;
        let (sample, at_ns) = if parent == default_cgroup_parent(&s.id) {
            tokio::task::spawn_blocking(move || {
                let sample = Cgroup::host(&parent).sample();
                (sample, now_ns())
            })
            .await
            .map_err(|e| Error::Internal(format!("pod stats thread: {e}")))?
        } else {
            let samples: Vec<&Sample> = containers.iter().map(|m| &m.sample).collect();
            (sum(&samples), now_ns())
        };
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: s.id.clone(),
                metadata: s.config.metadata.clone(),
                labels: s.config.labels.clone(),
                annotations: s.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: cpu_usage(sample.cpu_usage_ns, at_ns, |u| {
                    self.cpu_samples.rate(&s.id, u, at_ns)
                }),
                memory: memory_usage(sample.memory.as_ref(), at_ns),
                network: None,
                process: Some(cri::ProcessUsage {
                    timestamp: at_ns,
                    // No cgroup yet (no container was ever created): no process either.
                    process_count: Some(cri::UInt64Value {
                        value: sample.pids.unwrap_or(0),
                    }),
                }),
                containers: containers.into_iter().map(|m| m.stats).collect(),
            }),
            windows: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_what_containers_report() {
        let a = Sample {
            cpu_usage_ns: Some(10),
            memory: Some(Memory {
                usage: 100,
                working_set: 80,
                rss: 50,
                page_faults: 7,
                major_page_faults: 1,
                limit: Some(1000),
            }),
            pids: Some(2),
        };
        let exited = Sample::default();
        let b = Sample {
            cpu_usage_ns: Some(5),
            memory: Some(Memory {
                usage: 1,
                working_set: 1,
                rss: 1,
                page_faults: 1,
                major_page_faults: 0,
                limit: None,
            }),
            pids: Some(1),
        };
        let total = sum(&[&a, &exited, &b]);
        assert_eq!(total.cpu_usage_ns, Some(15));
        assert_eq!(total.pids, Some(3));
        assert_eq!(
            total.memory,
            Some(Memory {
                usage: 101,
                working_set: 81,
                rss: 51,
                page_faults: 8,
                major_page_faults: 1,
                limit: None,
            })
        );
        assert_eq!(sum(&[&exited]), Sample::default());
    }
}
