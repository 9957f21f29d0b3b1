//! Link flags for the `berth-shim` binary only (cargo has no per-package RUSTFLAGS).
fn main() {
    // Not position independent: .data.rel.ro needs no load-time relocation, so those ~0.4 MiB
    // stay clean file pages instead of becoming private dirty ones in every shim.
    println!("cargo:rustc-link-arg-bin=berth-shim=-no-pie");
}
