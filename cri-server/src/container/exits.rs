//! Lifecycle events of containers and pods, and learning of exits as they happen.
//!
//! A started container gets a waiter task holding a `Wait` request on its shim: its answer is
//! the moment berthd learns that the container stopped, whether it exited by itself or was
//! stopped. Whoever learns an exit first (the waiter, StopContainer, RemoveContainer, or an
//! observation that finds the shim gone) records it; the stopped event goes out exactly when
//! the record's exit changes from unknown to known, a fact that survives restarts, so a
//! container's stop is reported once. Recording and sending happen under one lock, so once any
//! caller has seen the exit recorded, the stopped event is out: a later deleted event cannot
//! overtake it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use api::cri;
use api::shim::{Request, Response};
use redb::ReadableTable;

use super::shim_client::ShimClient;
use super::{CONTAINERS, ContainerManager, ContainerRecord, Phase};
use crate::error::{Error, Result};
use crate::events::{Event, EventBus, EventKind};
use crate::sandbox::{SandboxRecord, now_ns};

/// How long a waiter pauses before asking again when its `Wait` failed but the shim lives.
const WAIT_RETRY: Duration = Duration::from_secs(1);

impl ContainerManager {
    /// The core's event channel.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Sends `kind` for `id` (a container, or the pod itself) with the pod's current state.
    pub(super) async fn emit(&self, kind: EventKind, id: &str, sandbox_id: &str) {
        if !self.events.has_subscribers() {
            return;
        }
        let sandbox = self.sandboxes.get(sandbox_id).ok();
        let event = self.build_event(kind, id, sandbox_id, sandbox).await;
        self.events.send(event);
    }

    /// Sends `kind` for the pod `sandbox` as given (a deleted pod has no record left to read).
    pub(super) async fn emit_with(
        &self,
        kind: EventKind,
        id: &str,
        sandbox: Option<SandboxRecord>,
    ) {
        if !self.events.has_subscribers() {
            return;
        }
        let sandbox_id = sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let event = self.build_event(kind, id, &sandbox_id, sandbox).await;
        self.events.send(event);
    }

    /// The event with every container of the pod as it is now. Uses [`probe`], never
    /// [`observe`]: building an event must not record (and emit) anything itself.
    ///
    /// [`probe`]: ContainerManager::probe
    /// [`observe`]: ContainerManager::observe
    async fn build_event(
        &self,
        kind: EventKind,
        id: &str,
        sandbox_id: &str,
        sandbox: Option<SandboxRecord>,
    ) -> Event {
        let records: Vec<ContainerRecord> = self
            .all()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.sandbox_id == sandbox_id && r.phase == Phase::Created)
            .collect();
        let containers = futures::future::join_all(records.into_iter().map(|r| self.probe(r)))
            .await
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        Event {
            id: id.to_owned(),
            kind,
            at_ns: now_ns(),
            sandbox,
            containers,
        }
    }

    /// Records the exit in `learned` (its `exit` must be set) unless the container's record
    /// knows one already, and then sends the stopped event. Safe to call any number of times
    /// from anywhere; needs no container lock.
    pub(super) async fn finish(&self, learned: &ContainerRecord) {
        let Some(exit) = &learned.exit else {
            return;
        };
        let known = match self.get(&learned.id) {
            Ok(current) => current.exit.is_some(),
            Err(_) => true,
        };
        if known {
            // Whoever recorded it may still be sending: wait for that, so that nothing the
            // caller emits next can overtake the stopped event.
            drop(self.exit_lock.lock().unwrap_or_else(|p| p.into_inner()));
            return;
        }
        let event = if self.events.has_subscribers() {
            let sandbox = self.sandboxes.get(&learned.sandbox_id).ok();
            Some(
                self.build_event(
                    EventKind::Stopped,
                    &learned.id,
                    &learned.sandbox_id,
                    sandbox,
                )
                .await,
            )
        } else {
            None
        };
        let recorded = {
            let _held = self.exit_lock.lock().unwrap_or_else(|p| p.into_inner());
            let recorded = self.record_exit(learned);
            if let (Ok(true), Some(event)) = (&recorded, event) {
                self.events.send(event);
            }
            recorded
        };
        match recorded {
            Ok(true) => tracing::info!(
                container_id = %learned.id,
                exit_code = exit.code,
                reason = learned.reason.as_deref().unwrap_or_default(),
                "container exited"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(container_id = %learned.id, error = %e, "record container exit")
            }
        }
    }

    /// Stores `learned`'s exit (and reason, start time) in the container's record if the record
    /// has no exit yet; true if it did. One transaction: two learners cannot both win.
    fn record_exit(&self, learned: &ContainerRecord) -> Result<bool> {
        let tx = self.db.begin_write()?;
        let changed = {
            let mut t = tx.open_table(CONTAINERS)?;
            let current: Option<ContainerRecord> = match t.get(learned.id.as_str())? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(|e| {
                    Error::Internal(format!("container record {} is corrupt: {e}", learned.id))
                })?),
                None => None,
            };
            match current {
                Some(mut r) if r.exit.is_none() => {
                    r.exit = learned.exit.clone();
                    r.reason = r.reason.or_else(|| learned.reason.clone());
                    r.started_at_ns = r.started_at_ns.or(learned.started_at_ns);
                    let json = serde_json::to_vec(&r)
                        .map_err(|e| Error::internal("encode container", e))?;
                    t.insert(r.id.as_str(), json.as_slice())?;
                    true
                }
                _ => false,
            }
        };
        tx.commit()?;
        Ok(changed)
    }

    /// [`finish`](Self::finish) with what a `Wait` answered.
    pub(super) async fn finish_waited(&self, r: &ContainerRecord, waited: Response) {
        if let Response::State {
            exit: Some(exit),
            started_at_ns,
            ..
        } = waited
        {
            let learned = ContainerRecord {
                exit: Some(exit),
                started_at_ns: started_at_ns.or(r.started_at_ns),
                ..r.clone()
            };
            self.finish(&learned).await;
        }
    }

    /// Before a container is removed: a running one is killed and its exit recorded, an exited
    /// one has its exit recorded if nobody did yet. Failures are logged: removal goes on and
    /// kills what is left anyway.
    pub(super) async fn stop_before_remove(&self, r: &ContainerRecord) {
        let observed = self.observe(r.clone()).await;
        match observed.state {
            cri::ContainerState::ContainerRunning => {
                if let Err(e) = self.stop_locked(r, Duration::ZERO).await {
                    tracing::warn!(container_id = %r.id, error = %e, "stop before removal");
                }
            }
            cri::ContainerState::ContainerExited => self.finish(&observed.record).await,
            _ => {}
        }
    }

    /// Watches a started container for its exit, in a task of its own.
    pub(super) fn spawn_exit_waiter(self: &Arc<Self>, id: &str) {
        tokio::spawn(wait_for_exit(Arc::downgrade(self), id.to_owned()));
    }

    /// After a (re)start of berthd: watches every running container for its exit, and records
    /// the exits of those that stopped while berthd was away.
    pub fn watch_exits(self: &Arc<Self>) -> Result<()> {
        for r in self.all()? {
            if r.phase != Phase::Created || r.exit.is_some() {
                continue;
            }
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let Some(m) = weak.upgrade() else {
                    return;
                };
                let observed = m.observe(r).await;
                match observed.state {
                    cri::ContainerState::ContainerRunning => {
                        m.spawn_exit_waiter(&observed.record.id)
                    }
                    cri::ContainerState::ContainerExited => m.finish(&observed.record).await,
                    // Created, never started: StartContainer will watch it.
                    _ => {}
                }
            });
        }
        Ok(())
    }
}

/// Holds a `Wait` on the shim of container `id` until it answers, then records the exit. Ends
/// early if the container is removed or berthd shuts down.
async fn wait_for_exit(manager: Weak<ContainerManager>, id: String) {
    let Some(bundle) = manager.upgrade().map(|m| m.bundle(&id)) else {
        return;
    };
    let client = ShimClient::new(&bundle);
    loop {
        let waited = client.call(&Request::Wait, None).await;
        let Some(m) = manager.upgrade() else {
            return;
        };
        let Ok(r) = m.get(&id) else {
            // Removed meanwhile; removal reported the stop.
            return;
        };
        match waited {
            Ok(waited @ Response::State { exit: Some(_), .. }) => {
                m.finish_waited(&r, waited).await;
                return;
            }
            other => {
                // The shim broke the connection: it died (observe records the exit then) or
                // it was a hiccup and it still runs.
                let observed = m.observe(r).await;
                if observed.state == cri::ContainerState::ContainerExited {
                    m.finish(&observed.record).await;
                    return;
                }
                tracing::debug!(container_id = %id, answer = ?other.err(), "waiting for exit again");
            }
        }
        drop(m);
        tokio::time::sleep(WAIT_RETRY).await;
    }
}
