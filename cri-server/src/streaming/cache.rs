//! Single-use tokens for streaming requests.
//!
//! Exec, Attach and PortForward answer with a URL that carries a random token; the client then
//! connects to the streaming server with it. As in kubelet's streaming server, a token is good
//! for one connection and for [`TOKEN_TTL`] after it was handed out; there are at most
//! [`MAX_PENDING`] tokens not yet used.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::cri;

use crate::error::{Error, Result};

/// How long a token may wait for its connection.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens handed out and not used yet, at most.
pub const MAX_PENDING: usize = 1000;

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum Pending {
    /// An Exec request.
    Exec(cri::ExecRequest),
    /// An Attach request.
    Attach(cri::AttachRequest),
    /// A PortForward request.
    PortForward(cri::PortForwardRequest),
}

/// The tokens handed out and not used yet.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl TokenCache {
    /// Stores `req` under a new token and returns the token. ResourceExhausted when
    /// [`MAX_PENDING`] live tokens wait already.
    pub fn insert(&self, req: Pending) -> Result<String> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        entries.retain(|_, (_, expires)| *expires > now);
        if entries.len() >= MAX_PENDING {
            return Err(Error::ResourceExhausted(format!(
                "{MAX_PENDING} streaming requests are waiting for their connections already"
            )));
        }
        // 128 random bits, URL-safe.
        let token = hex::encode(rand::random::<[u8; 16]>());
        entries.insert(token.clone(), (req, now + TOKEN_TTL));
        Ok(token)
    }

    /// Takes the request of `token` out: a token is good once. None when unknown, used or
    /// expired.
    pub fn take(&self, token: &str) -> Option<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (req, expires) = entries.remove(token)?;
        (expires > Instant::now()).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Pending {
        Pending::Exec(cri::ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
    }

    #[test]
    fn a_token_is_good_once() {
        let cache = TokenCache::default();
        let a = cache.insert(exec()).expect("insert");
        let b = cache.insert(exec()).expect("insert");
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(matches!(cache.take(&a), Some(Pending::Exec(_))));
        assert!(cache.take(&a).is_none(), "reused");
        assert!(cache.take("nope").is_none());
        assert!(cache.take(&b).is_some());
    }

    #[test]
    fn expired_tokens_are_unknown_and_make_room() {
        let cache = TokenCache::default();
        let t = cache.insert(exec()).expect("insert");
        {
            let mut e = cache.entries.lock().expect("lock");
            for (_, expires) in e.values_mut() {
                *expires = Instant::now() - Duration::from_secs(1);
            }
        }
        assert!(cache.take(&t).is_none(), "expired");
        for _ in 0..MAX_PENDING {
            cache.insert(exec()).expect("room");
        }
        let full = cache.insert(exec()).expect_err("full");
        assert!(matches!(full, Error::ResourceExhausted(_)), "{full:?}");
    }
}
