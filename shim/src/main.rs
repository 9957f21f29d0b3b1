//! `berth-shim`: the per-container monitor. Containers arrive with the RuntimeService issue;
//! until then the binary only says that it cannot run one.

fn main() -> std::process::ExitCode {
    eprintln!("berth-shim: container support is not built yet");
    std::process::ExitCode::from(2)
}
