//! Pod networking for berth: the CNI runtime side and berth's own plugins.
//!
//! Nothing is here yet: pod networking arrives with the CNI issue. berthd reports
//! `NetworkReady=false` until it does.
#![warn(missing_docs)]

pub mod plugins;
