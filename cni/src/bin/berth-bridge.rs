//! `berth-bridge`: berth's bridge CNI plugin (see `berth_cni::plugins::bridge`).

use std::process::ExitCode;

use berth_cni::plugins::bridge::Bridge;
use berth_cni::plugins::runner;

fn main() -> ExitCode {
    runner::run("berth-bridge: pods on a Linux bridge", &Bridge)
}
