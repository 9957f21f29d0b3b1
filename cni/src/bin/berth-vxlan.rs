//! `berth-vxlan`: berth's overlay CNI plugin for pods on several hosts (see
//! `berth_cni::plugins::vxlan`).

use std::process::ExitCode;

use berth_cni::plugins::runner;
use berth_cni::plugins::vxlan::Vxlan;

fn main() -> ExitCode {
    runner::run(
        "berth-vxlan: pods of several hosts on a VXLAN overlay",
        &Vxlan,
    )
}
