//! `berth-portmap`: berth's port-mapping CNI plugin (see `berth_cni::plugins::portmap`).

use std::process::ExitCode;

use berth_cni::plugins::portmap::Portmap;
use berth_cni::plugins::runner;

fn main() -> ExitCode {
    runner::run("berth-portmap: host ports forwarded to pods", &Portmap)
}
