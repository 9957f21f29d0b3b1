//! `berth`: the docker-like CLI. It arrives with the Docker API issue; until then it only says so.

fn main() -> std::process::ExitCode {
    eprintln!("berth: the command line is not built yet; use crictl against berthd's CRI socket");
    std::process::ExitCode::from(2)
}
