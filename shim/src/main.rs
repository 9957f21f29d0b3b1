//! `berth-shim --id <id> --bundle <dir> --log <cri-log> [--stdin] [--tty]`: the per-container
//! monitor. See `api::shim` for the contract and the library for how it works.
//!
//! `berth-shim pod-init --pidfile <path>`: the init of a pod's PID namespace (`api::pod_init`).

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == api::pod_init::COMMAND) {
        args.next();
        return match berth_shim::podinit::parse(args) {
            Ok(pidfile) => berth_shim::podinit::run(&pidfile),
            Err(e) => {
                eprintln!("berth-shim: {}", e.chain());
                std::process::ExitCode::from(2)
            }
        };
    }
    match berth_shim::Args::parse(args) {
        Ok(args) => berth_shim::run(args),
        Err(e) => {
            eprintln!("berth-shim: {}", e.chain());
            std::process::ExitCode::from(2)
        }
    }
}
