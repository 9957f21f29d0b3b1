//! The contract of `berth-shim pod-init`, the init of a pod's shared PID namespace.
//!
//! berthd runs
//!
//! ```text
//! berth-shim pod-init --pidfile <path>
//! ```
//!
//! The command creates a new PID namespace whose PID 1 is a small process of the shim's, and
//! exits 0 after writing that process's pid (in the caller's PID namespace) to `<path>`
//! (atomically) and printing it as one line on stdout; non-zero with a message on stderr when
//! it failed (nothing left behind then). The init has its own session, holds no descriptor of
//! the caller, mounts nothing, reaps every process the namespace orphans, exits on SIGTERM or
//! SIGINT and ignores every other signal it can. Its command line stays exactly
//! `[<binary>, "pod-init", "--pidfile", <path>]`, which is how berthd recognises it later.
//! Killing it ends the namespace: the kernel kills every process left in it, and no process
//! can join it afterwards.

/// The first argument that selects the pod-init mode of `berth-shim`.
pub const COMMAND: &str = "pod-init";
/// The flag naming the pid file.
pub const PIDFILE_FLAG: &str = "--pidfile";
