//! `berth-shim --id <id> --bundle <dir> --log <cri-log> [--stdin] [--tty]`: the per-container
//! monitor. See `api::shim` for the contract and the library for how it works.

fn main() -> std::process::ExitCode {
    match berth_shim::Args::parse(std::env::args_os().skip(1)) {
        Ok(args) => berth_shim::run(args),
        Err(e) => {
            eprintln!("berth-shim: {}", e.chain());
            std::process::ExitCode::from(2)
        }
    }
}
