//! Shared types and wire formats of berth.
//!
//! This crate holds no I/O and no policy: the CRI types (re-exported from `k8s-cri`), plain
//! types that more than one crate names (ids, mount descriptions) and, later, the berthd↔shim
//! protocol.
#![warn(missing_docs)]

pub mod digest;
pub mod dockerfile;
pub mod dockerignore;
pub mod mount;
pub mod pod_init;
pub mod shim;
pub mod time;

/// CRI v1 protobuf types and gRPC service stubs.
pub use k8s_cri::v1 as cri;

pub use digest::Digest;
pub use mount::Mount;
