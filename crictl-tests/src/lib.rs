//! Helpers for driving a real berthd from tests and benchmarks: a registry server, a test-image
//! builder, a daemon launcher and CRI clients. Links no runtime crate: everything goes through
//! the real sockets and binaries. (The streaming clients use `berth-streaming`, the wire
//! protocol library, for its client side.)

pub mod daemon;
pub mod docker;
pub mod hostns;
pub mod image;
pub mod pods;
pub mod rawh2;
pub mod registry;
pub mod streams;
pub mod token;
