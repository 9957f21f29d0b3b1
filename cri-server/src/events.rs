//! Container and pod lifecycle events of the core, for CRI `GetContainerEvents` (kubelet's
//! evented PLEG) and any other front door.
//!
//! One broadcast channel, owned by the core: the managers send at the points where state
//! changes, every subscriber gets every event in send order. The managers emit a container's
//! events under that container's lock, so its events go out in lifecycle order. A subscriber
//! that falls more than [`CAPACITY`] events behind is dropped (it learns so from
//! [`Subscription::next`]) instead of slowing anyone down.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::container::Observed;
use crate::sandbox::SandboxRecord;

/// Events a subscriber may have unread before it is cut off.
pub const CAPACITY: usize = 1024;

/// What happened, as CRI's `ContainerEventType` names it; pods have the same four.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created (a container) or set up (a pod).
    Created,
    /// Started (a container) or ready (a pod).
    Started,
    /// Exited (a container) or stopped (a pod).
    Stopped,
    /// Removed.
    Deleted,
}

/// One lifecycle event, with the state of the pod at the moment it happened.
#[derive(Debug, Clone)]
pub struct Event {
    /// The container's id, or the pod's for pod events.
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When, in nanoseconds since the Unix epoch.
    pub at_ns: i64,
    /// The pod (the last state it had, for a deleted pod); `None` if it is unknown.
    pub sandbox: Option<SandboxRecord>,
    /// Every container of the pod, as observed when the event was emitted.
    pub containers: Vec<Observed>,
}

/// The core's event channel. Cloning gives another handle on the same channel.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    closed: Arc<watch::Sender<bool>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::with_capacity(CAPACITY)
    }
}

impl EventBus {
    /// A channel that cuts off subscribers more than `capacity` events behind.
    pub fn with_capacity(capacity: usize) -> Self {
        EventBus {
            tx: broadcast::channel(capacity.max(1)).0,
            closed: Arc::new(watch::channel(false).0),
        }
    }

    /// Whether anyone listens: emitters skip the work of building events nobody reads.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Sends `event` to every current subscriber.
    pub fn send(&self, event: Event) {
        // An error only means that nobody listens.
        let _ = self.tx.send(Arc::new(event));
    }

    /// Events from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            closed: self.closed.subscribe(),
        }
    }

    /// Ends every subscription (daemon shutdown: open streams would otherwise keep the server
    /// from finishing its graceful shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// Why a subscription ended with an error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The subscriber read too slowly and `missed` events were dropped for it.
    #[error("the subscriber fell {missed} events behind")]
    Lagged {
        /// Events it will never see.
        missed: u64,
    },
}

/// One subscriber's view of the event channel.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    closed: watch::Receiver<bool>,
}

impl Subscription {
    /// The next event; `Ok(None)` once the channel is closed. After an error the subscription
    /// is useless: events were lost, and a consumer must not carry on as if they had not.
    pub async fn next(&mut self) -> Result<Option<Arc<Event>>, SubscriptionError> {
        if *self.closed.borrow() {
            return Ok(None);
        }
        tokio::select! {
            r = self.rx.recv() => match r {
                Ok(e) => Ok(Some(e)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Err(SubscriptionError::Lagged { missed })
                }
                Err(broadcast::error::RecvError::Closed) => Ok(None),
            },
            _ = self.closed.wait_for(|c| *c) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: EventKind) -> Event {
        Event {
            id: id.into(),
            kind,
            at_ns: 1,
            sandbox: None,
            containers: vec![],
        }
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order() {
        let bus = EventBus::default();
        assert!(!bus.has_subscribers());
        bus.send(event("before", EventKind::Created));
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        assert!(bus.has_subscribers());
        for kind in [EventKind::Created, EventKind::Started, EventKind::Stopped] {
            bus.send(event("c", kind));
        }
        for sub in [&mut a, &mut b] {
            let mut got = vec![];
            for _ in 0..3 {
                let e = sub.next().await.expect("ok").expect("event");
                got.push((e.id.clone(), e.kind));
            }
            assert_eq!(
                got,
                vec![
                    ("c".to_owned(), EventKind::Created),
                    ("c".to_owned(), EventKind::Started),
                    ("c".to_owned(), EventKind::Stopped)
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_cut_off_without_blocking_the_sender() {
        let bus = EventBus::with_capacity(2);
        let mut slow = bus.subscribe();
        for i in 0..5 {
            bus.send(event(&i.to_string(), EventKind::Created));
        }
        assert_eq!(
            slow.next().await.expect_err("lagged"),
            SubscriptionError::Lagged { missed: 3 }
        );
        let mut fresh = bus.subscribe();
        bus.send(event("new", EventKind::Started));
        assert_eq!(fresh.next().await.expect("ok").expect("event").id, "new");
    }

    #[tokio::test]
    async fn close_ends_waiting_subscriptions() {
        let bus = EventBus::default();
        let mut sub = bus.subscribe();
        let waiter = tokio::spawn(async move { sub.next().await });
        tokio::task::yield_now().await;
        bus.close();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("ended")
            .expect("task");
        assert!(matches!(r, Ok(None)));
        assert!(matches!(bus.subscribe().next().await, Ok(None)));
    }
}
