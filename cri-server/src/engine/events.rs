//! The engine's own event stream, in docker's terms (`create`, `start`, `die`, `destroy`, image
//! `pull`, network `connect`…): a broadcast channel for followers, and the recent past for
//! `since`, as dockerd keeps it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for clients asking for the past.
const KEPT: usize = 1024;

/// One event, serialised as the Docker Engine API's `EventMessage`.
#[derive(Debug, Clone, Serialize)]
pub struct EngineEvent {
    /// `container`, `image`, `network`, `volume`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// `create`, `start`, `die`…
    #[serde(rename = "Action")]
    pub action: String,
    /// What it happened to.
    #[serde(rename = "Actor")]
    pub actor: Actor,
    /// Always `local`.
    pub scope: String,
    /// Seconds since the epoch.
    pub time: i64,
    /// Nanoseconds since the epoch.
    #[serde(rename = "timeNano")]
    pub time_nano: i64,
    /// Old clients' field: the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Old clients' field: the actor id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Old clients' field: the image of a container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// The subject of an event.
#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    /// Its id (or name, for volumes).
    #[serde(rename = "ID")]
    pub id: String,
    /// `name`, `image`, `exitCode`, labels…
    #[serde(rename = "Attributes")]
    pub attributes: BTreeMap<String, String>,
}

/// The channel and the kept past.
pub struct EngineEvents {
    tx: broadcast::Sender<EngineEvent>,
    past: Mutex<VecDeque<EngineEvent>>,
}

impl Default for EngineEvents {
    fn default() -> Self {
        EngineEvents {
            tx: broadcast::channel(KEPT).0,
            past: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }
}

impl EngineEvents {
    /// Sends an event about `id` of type `kind`.
    pub fn emit(&self, kind: &str, action: &str, id: &str, attributes: BTreeMap<String, String>) {
        let now = crate::sandbox::now_ns();
        let container = kind == "container";
        let event = EngineEvent {
            kind: kind.to_owned(),
            action: action.to_owned(),
            status: container.then(|| action.to_owned()),
            id: container.then(|| id.to_owned()),
            from: attributes.get("image").filter(|_| container).cloned(),
            actor: Actor {
                id: id.to_owned(),
                attributes,
            },
            scope: "local".into(),
            time: now / 1_000_000_000,
            time_nano: now,
        };
        {
            let mut past = self.past.lock().unwrap_or_else(|p| p.into_inner());
            if past.len() == KEPT {
                past.pop_front();
            }
            past.push_back(event.clone());
        }
        let _ = self.tx.send(event);
    }

    /// The kept events from `since_ns` on, and a receiver for what comes after them. Taken
    /// under one lock so no event is missed or seen twice.
    pub fn subscribe(
        &self,
        since_ns: Option<i64>,
    ) -> (Vec<EngineEvent>, broadcast::Receiver<EngineEvent>) {
        let past = self.past.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let old = match since_ns {
            Some(since) => past
                .iter()
                .filter(|e| e.time_nano >= since)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (old, rx)
    }
}
