//! The wire protocols of the Kubernetes streaming API (exec, attach, port-forward).
//!
//! kubelet, kubectl and crictl reach a runtime's streaming server over one of two framings:
//! - [`spdy`]: SPDY/3.1 after an HTTP `Upgrade: SPDY/3.1`, one SPDY stream per channel (clients
//!   up to Kubernetes 1.30, and later ones as a fallback);
//! - [`ws`]: WebSocket (RFC 6455), the channel number as each message's first byte
//!   (`v4.channel.k8s.io`, `v5.channel.k8s.io`, `portforward.k8s.io`, ...).
//!
//! This crate holds the framings only, both the server and the client side (the client side
//! serves the tests); what flows over the channels is berthd's business.
#![warn(missing_docs)]

pub mod prefixed;
pub mod spdy;
pub mod ws;

pub use prefixed::Prefixed;
