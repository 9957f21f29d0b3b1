//! The conformance suite every [`crate::Snapshotter`] passes.
