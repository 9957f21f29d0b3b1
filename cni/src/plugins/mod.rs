//! Code shared by berth's own CNI plugin binaries (`berth-host-local`, `berth-bridge`,
//! `berth-portmap`, `berth-vxlan`).
//!
//! Each binary in `src/bin/` is a thin `main` that hands a [`rscni_plugin::cni::Cni`]
//! implementation from here to [`runner::run`], which speaks the CNI protocol
//! (environment, stdin, stdout, error JSON) around `rscni-plugin`.

pub mod bridge;
pub mod conntrack;
pub mod delegate;
pub mod error;
pub mod host_local;
pub mod ipnet;
pub mod netlink;
pub mod nft;
pub mod portmap;
pub mod runner;
pub mod vxlan;

pub use error::{Error, Result};
