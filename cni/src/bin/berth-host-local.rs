//! `berth-host-local`: berth's host-local IPAM CNI plugin (see `berth_cni::plugins::host_local`).

use std::process::ExitCode;

use berth_cni::plugins::host_local::HostLocal;
use berth_cni::plugins::runner;

fn main() -> ExitCode {
    runner::run("berth-host-local: IPAM from host-local ranges", &HostLocal)
}
