//! berthd: the core of berth and its CRI front door.
//!
//! `main.rs` parses flags and calls [`server::run`]; everything else lives here: the image
//! manager (pull, store, GC), the CRI services that translate requests into core calls, and the
//! HTTP/2 fix-up that lets old kubelet/crictl clients in.

pub mod authority;
pub mod bridge;
pub mod build;
pub mod config;
pub mod container;
pub mod dns;
pub mod docker;
pub mod engine;
pub mod error;
pub mod events;
pub mod image;
pub mod image_service;
pub mod inroot;
pub mod locks;
pub mod network;
pub mod quantity;
pub mod runtime_service;
pub mod sandbox;
pub mod server;
pub mod spec;
pub mod streaming;
