//! The shim's memory budget: idle VmRSS ≤ 2 MiB (root only).
//!
//! Measured on an optimised build: the unoptimised test build of the same code idles at about
//! 5.5 MiB, which says nothing about what berthd runs. The test uses `BERTH_SHIM_BIN` if set,
//! else `target/release/berth-shim`, and fails (never skips) when that is missing or older than
//! the shim's sources.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use api::shim::{Request, Response};
use common::*;

/// The budget from DESIGN.md.
const BUDGET_KB: u64 = 2048;

fn release_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_SHIM_BIN") {
        return PathBuf::from(p);
    }
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_berth-shim"));
    let release = debug
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("release/berth-shim");
    let built = std::fs::metadata(&release)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: the RSS budget is measured on a release build; run \
                 `cargo build --release -p berth-shim` first (or set BERTH_SHIM_BIN)",
                release.display()
            )
        });
    let newest_source = newest_mtime(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        built >= newest_source,
        "{} is older than shim/src: run `cargo build --release -p berth-shim` again",
        release.display()
    );
    release
}

fn newest_mtime(dir: &std::path::Path) -> SystemTime {
    std::fs::read_dir(dir)
        .expect("read src")
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                newest_mtime(&p)
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            }
        })
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn status_kb(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing"))
}

#[test]
fn idle_shim_rss_within_budget() {
    require_root();
    let bin = release_binary();
    let mut b = Bundle::new(&["sleep", "100"], false);
    b.shim_bin = Some(bin.clone());
    let created = b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    b.status();
    // Idle: the monitor drops the code pages serving touched after 500 ms without events.
    std::thread::sleep(Duration::from_millis(1000));
    let rss = status_kb(created.shim_pid, "VmRSS:");
    let anon = status_kb(created.shim_pid, "RssAnon:");
    eprintln!("{}: idle VmRSS {rss} kB (RssAnon {anon} kB)", bin.display());
    assert!(
        rss <= BUDGET_KB,
        "idle shim VmRSS {rss} kB > {BUDGET_KB} kB ({})",
        bin.display()
    );
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    b.call(&Request::Wait);
    assert_eq!(b.call(&Request::Shutdown), Response::Ok);
    b.wait_shim_gone();
}
