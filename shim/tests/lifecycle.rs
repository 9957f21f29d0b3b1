//! End-to-end tests of `berth-shim` with real containers (root only).

mod common;

use std::time::Duration;

use api::shim::{
    EXIT_FILE_NAME, ExitStatus, PID_FILE_NAME, Request, Response, SOCKET_NAME, Status,
};
use common::*;

fn expect_state(r: Response) -> (Status, i32, Option<i64>, Option<ExitStatus>) {
    match r {
        Response::State {
            status,
            pid,
            started_at_ns,
            exit,
        } => (status, pid, started_at_ns, exit),
        other => panic!("expected state, got {other:?}"),
    }
}

/// Waits for the exit (on a fresh connection) and checks exit.json says the same.
fn wait_exit(b: &Bundle) -> ExitStatus {
    let (status, _, _, exit) = expect_state(b.call(&Request::Wait));
    assert_eq!(status, Status::Stopped);
    let exit = exit.expect("exit status");
    let on_disk: ExitStatus =
        serde_json::from_slice(&std::fs::read(b.path().join(EXIT_FILE_NAME)).expect("exit.json"))
            .expect("exit.json parses");
    assert_eq!(on_disk, exit);
    exit
}

fn shutdown(b: &Bundle) {
    assert_eq!(b.call(&Request::Shutdown), Response::Ok);
    b.wait_shim_gone();
    assert!(
        b.cgroup_dirs().is_empty(),
        "cgroups left: {:?}",
        b.cgroup_dirs()
    );
    assert!(
        b.processes().is_empty(),
        "processes left: {:?}",
        b.processes()
    );
    assert!(!b.path().join(SOCKET_NAME).exists());
    assert!(!b.path().join("runtime").exists());
}

#[test]
fn lifecycle_logs_and_exit_code_zero() {
    require_root();
    let mut b = Bundle::new(&["sh", "-c", "echo hello; echo err >&2"], false);
    let created = b.create(&[]);
    let pid_file: i32 = std::fs::read_to_string(b.path().join(PID_FILE_NAME))
        .expect("shim.pid")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(created.shim_pid, pid_file);
    assert!(is_alive(created.pid) && is_alive(created.shim_pid));
    // The init is the shim's child (subreaper), in the container's cgroup.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", created.pid)).expect("stat");
    let ppid: i32 = stat
        .rsplit(')')
        .next()
        .expect("stat")
        .split_whitespace()
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("ppid");
    assert_eq!(ppid, created.shim_pid);
    let dirs = b.cgroup_dirs();
    assert!(
        dirs.iter().any(|d| d.starts_with("/sys/fs/cgroup/memory")),
        "{dirs:?}"
    );
    assert!(
        dirs.iter().any(|d| d.starts_with("/sys/fs/cgroup/pids")),
        "{dirs:?}"
    );

    let (status, pid, started, exit) = expect_state(b.call(&Request::State));
    assert_eq!(
        (status, pid, started, exit),
        (Status::Created, created.pid, None, None)
    );
    assert_eq!(b.call(&Request::Start), Response::Ok);
    // A second start is an illegal transition.
    assert!(matches!(b.call(&Request::Start), Response::Error { .. }));
    let exit = wait_exit(&b);
    assert_eq!((exit.code, exit.signal, exit.oom_killed), (0, None, false));
    let (_, _, started, _) = expect_state(b.call(&Request::State));
    assert!(started.expect("started_at") <= exit.exited_at_ns);

    let recs = b.log_records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    let mut by_stream: Vec<(&str, &str, &str)> = recs
        .iter()
        .map(|r| (r.1.as_str(), r.2.as_str(), r.3.as_str()))
        .collect();
    by_stream.sort();
    assert_eq!(
        by_stream,
        [("stderr", "F", "err"), ("stdout", "F", "hello")]
    );
    for r in &recs {
        assert!(is_rfc3339_nano_utc(&r.0), "timestamp {:?}", r.0);
    }
    shutdown(&b);
}

#[test]
fn long_line_is_split_and_last_line_without_newline_is_final() {
    require_root();
    let mut b = Bundle::new(
        &[
            "sh",
            "-c",
            "head -c 40960 /dev/zero | tr '\\0' x; echo; printf tail",
        ],
        false,
    );
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    assert_eq!(wait_exit(&b).code, 0);
    let recs = b.log_records();
    let tags: Vec<&str> = recs.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(tags, ["P", "P", "F", "F"], "{recs:?}");
    assert!(recs.iter().all(|r| r.1 == "stdout"));
    assert_eq!(recs[0].3.len(), 16384);
    assert_eq!(recs[1].3.len(), 16384);
    let joined = format!("{}{}{}", recs[0].3, recs[1].3, recs[2].3);
    assert_eq!(joined, "x".repeat(40960));
    assert_eq!(recs[3].3, "tail");
    shutdown(&b);
}

#[test]
fn exit_code_three() {
    require_root();
    let mut b = Bundle::new(&["sh", "-c", "exit 3"], false);
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let exit = wait_exit(&b);
    assert_eq!((exit.code, exit.signal), (3, None));
    shutdown(&b);
}

#[test]
fn sigkill_is_recorded_and_wait_queues_behind_other_connections() {
    require_root();
    let mut b = Bundle::new(&["sleep", "100"], false);
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    // Wait on one connection, followed by a queued State on the same one.
    let mut waiter = b.connect();
    waiter.send(&Request::Wait);
    waiter.send(&Request::State);
    // sleep is the pid namespace's init and has no SIGTERM handler: the kernel drops SIGTERM.
    assert_eq!(
        b.call(&Request::Kill {
            signal: 15,
            all: false
        }),
        Response::Ok
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.status(), Status::Running);
    // Shutdown of a running container is refused.
    assert!(matches!(b.call(&Request::Shutdown), Response::Error { .. }));
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    let (status, _, _, exit) = expect_state(waiter.recv());
    assert_eq!(status, Status::Stopped);
    let exit = exit.expect("exit");
    assert_eq!((exit.code, exit.signal), (137, Some(9)));
    assert_eq!(expect_state(waiter.recv()).0, Status::Stopped);
    assert_eq!(wait_exit(&b), exit);
    // Signalling a stopped container is not an error.
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: true
        }),
        Response::Ok
    );
    shutdown(&b);
}

#[test]
fn sigterm_stops_a_process_that_handles_it() {
    require_root();
    let mut b = Bundle::new(
        &["sh", "-c", "trap 'exit 143' TERM; sleep 100 & wait"],
        false,
    );
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    // Give sh time to install its trap.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        b.call(&Request::Kill {
            signal: 15,
            all: true
        }),
        Response::Ok
    );
    let exit = wait_exit(&b);
    assert_eq!((exit.code, exit.signal), (143, None));
    shutdown(&b);
}

#[test]
fn reopen_log_after_rotation() {
    require_root();
    let mut b = Bundle::new(
        &[
            "sh",
            "-c",
            "echo one; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two",
        ],
        false,
    );
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    assert!(wait_until(Duration::from_secs(10), || b
        .log_records()
        .len()
        == 1));
    let rotated = b.path().join("container.log.1");
    std::fs::rename(b.log_path(), &rotated).expect("rotate");
    assert_eq!(b.call(&Request::ReopenLog), Response::Ok);
    std::fs::write(b.path().join("rootfs/tmp/go"), "").expect("go");
    assert_eq!(wait_exit(&b).code, 0);
    let old = records(&rotated);
    let new = b.log_records();
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].3, "one");
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!((new[0].1.as_str(), new[0].3.as_str()), ("stdout", "two"));
    shutdown(&b);
}

#[test]
fn creation_failure_leaves_nothing() {
    require_root();
    let mut b = Bundle::new(&["/nonexistent"], false);
    let out = b.run_shim(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("berth-shim: create container"), "{stderr}");
    assert!(stderr.contains("nonexistent"), "{stderr}");
    assert!(
        b.processes().is_empty(),
        "processes left: {:?}",
        b.processes()
    );
    assert!(
        b.cgroup_dirs().is_empty(),
        "cgroups left: {:?}",
        b.cgroup_dirs()
    );
    for f in [SOCKET_NAME, PID_FILE_NAME, "runtime", "console.sock"] {
        assert!(!b.path().join(f).exists(), "{f} left behind");
    }
}

#[test]
fn shutdown_of_a_created_container() {
    require_root();
    let mut b = Bundle::new(&["sleep", "100"], false);
    let created = b.create(&[]);
    assert_eq!(b.status(), Status::Created);
    shutdown(&b);
    assert!(!is_alive(created.pid));
}

#[test]
fn stdin_pipe_is_held_open() {
    require_root();
    let mut b = Bundle::new(&["cat"], false);
    let created = b.create(&["--stdin"]);
    let fd0 = std::fs::read_link(format!("/proc/{}/fd/0", created.pid)).expect("fd 0");
    assert!(fd0.to_string_lossy().starts_with("pipe:"), "{fd0:?}");
    assert_eq!(b.call(&Request::Start), Response::Ok);
    // cat blocks on the open pipe instead of reading EOF.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.status(), Status::Running);
    assert_eq!(
        b.call(&Request::Kill {
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    assert_eq!(wait_exit(&b).code, 137);
    shutdown(&b);

    // Without --stdin, stdin is /dev/null: cat ends at once.
    let mut b = Bundle::new(&["cat"], false);
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    assert_eq!(wait_exit(&b).code, 0);
    shutdown(&b);
}

#[test]
fn tty_output_is_logged_as_stdout() {
    require_root();
    let mut b = Bundle::new(
        &["sh", "-c", "[ -t 1 ] && echo is-a-tty; echo err >&2"],
        true,
    );
    b.create(&["--tty"]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    assert_eq!(wait_exit(&b).code, 0);
    let recs = b.log_records();
    let lines: Vec<(&str, &str, &str)> = recs
        .iter()
        .map(|r| (r.1.as_str(), r.2.as_str(), r.3.as_str()))
        .collect();
    // The terminal turns \n into \r\n; the \r stays in the content, as with containerd.
    assert_eq!(
        lines,
        [("stdout", "F", "is-a-tty\r"), ("stdout", "F", "err\r")]
    );
    shutdown(&b);
}

#[test]
fn killing_the_shim_leaves_the_container_running() {
    require_root();
    let mut b = Bundle::new(&["sleep", "100"], false);
    let created = b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(created.shim_pid, libc::SIGKILL) };
    b.wait_shim_gone();
    // Documented behaviour: the container is orphaned (re-parented to the host's init), keeps
    // running unmonitored, and no exit.json is ever written. berthd must notice the dead shim
    // (socket refused) and kill the container through its cgroup. The guard cleans up here.
    std::thread::sleep(Duration::from_millis(100));
    assert!(is_alive(created.pid));
    assert!(!b.path().join(EXIT_FILE_NAME).exists());
}

#[test]
fn oom_kill_is_recorded() {
    require_root();
    let mut b = Bundle::with_spec(
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' x); echo survived",
        ],
        false,
        |spec| {
            spec["linux"]["resources"]["memory"] =
                serde_json::json!({ "limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024 });
        },
    );
    b.create(&[]);
    assert_eq!(b.call(&Request::Start), Response::Ok);
    let exit = wait_exit(&b);
    assert!(exit.oom_killed, "{exit:?}");
    assert_ne!(exit.code, 0);
    shutdown(&b);
}
