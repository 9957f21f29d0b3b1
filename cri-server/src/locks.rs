//! One async mutex per id (a container, a pod), made on first use and forgotten once nobody
//! holds or waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Locks by id.
#[derive(Default)]
pub struct IdLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl IdLocks {
    /// The lock of `id`; lock it to serialise work on that id.
    pub fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_lock_per_id_forgotten_when_unused() {
        let locks = IdLocks::default();
        let a = locks.of("a");
        let held = a.lock().await;
        assert!(
            locks.of("a").try_lock().is_err(),
            "the same id shares the lock"
        );
        assert!(locks.of("b").try_lock().is_ok(), "other ids do not");
        drop(held);
        drop(a);
        let _ = locks.of("c");
        assert_eq!(
            locks.0.lock().expect("map").len(),
            1,
            "unused locks are forgotten"
        );
    }
}
