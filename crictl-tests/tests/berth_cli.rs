//! Our `berth` CLI against a real berthd: docker's output, ids and exit codes.

use std::time::Duration;

use crictl_tests::docker::DockerEnv;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Leaves no container behind, whatever the test did.
async fn clean(env: &DockerEnv) {
    let ids = env.berth_ok(&["ps", "-aq"]).await;
    for id in ids.split_whitespace() {
        env.berth(&["rm", "-f", id]).await;
    }
    assert_eq!(env.berth_ok(&["ps", "-aq"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_prints_output_and_passes_exit_codes_through() {
    let env = DockerEnv::start("").await;
    let out = env.berth(&["run", "--rm", "busybox", "echo", "hi"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "hi\n");
    let failed = env
        .berth(&[
            "run",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ])
        .await;
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    assert_eq!(stderr(&failed), "oops\n");
    let missing = env
        .berth(&["run", "--rm", "busybox", "/no/such/binary"])
        .await;
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(
        stderr(&missing).contains("Error response from daemon:"),
        "{missing:?}"
    );
    // Flags after the image belong to the command.
    let flags = env
        .berth(&[
            "run",
            "--rm",
            "-e",
            "X=1",
            "busybox",
            "sh",
            "-c",
            "echo $X -n",
        ])
        .await;
    assert_eq!(stdout(&flags), "1 -n\n", "{flags:?}");
    let input = env
        .berth_with_input(&["run", "--rm", "-i", "busybox", "cat"], Some(b"piped\n"))
        .await;
    assert_eq!(stdout(&input), "piped\n", "{input:?}");
    assert_eq!(
        env.berth_ok(&["ps", "-aq"]).await,
        "",
        "--rm containers are gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn detached_containers_list_log_stop_and_go() {
    let env = DockerEnv::start("").await;
    let id = env
        .berth_ok(&[
            "run",
            "-d",
            "--name",
            "ticker",
            "-l",
            "role=test",
            "busybox",
            "sh",
            "-c",
            "echo start; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done",
        ])
        .await;
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 64, "{id}");
    let ps = env
        .berth_ok(&["ps", "--format", "{{.Names}} {{.Status}} {{.Labels}}"])
        .await;
    assert!(ps.starts_with("ticker Up"), "{ps}");
    assert!(ps.trim_end().ends_with("role=test"), "{ps}");
    assert_eq!(
        env.berth_ok(&["ps", "-q"]).await,
        format!("{}\n", &id[..12])
    );
    assert_eq!(
        env.berth_ok(&["ps", "-q", "--no-trunc"]).await,
        format!("{id}\n")
    );
    let table = env.berth_ok(&["ps"]).await;
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    assert!(header.starts_with("CONTAINER ID   IMAGE"), "{table}");
    assert!(header.ends_with("NAMES"), "{table}");
    let row = lines.next().expect("row");
    assert!(
        row.starts_with(&id[..12]) && row.ends_with("ticker"),
        "{table}"
    );
    let custom = env
        .berth_ok(&["ps", "--format", "table {{.ID}}\\t{{.Image}}"])
        .await;
    assert_eq!(
        custom,
        format!("CONTAINER ID   IMAGE\n{}   busybox\n", &id[..12])
    );
    let filtered = env
        .berth_ok(&["ps", "-q", "--filter", "label=role=other"])
        .await;
    assert_eq!(filtered, "");
    let state = env
        .berth_ok(&["inspect", "--format", "{{.State.Status}}", &id[..8]])
        .await;
    assert_eq!(state, "running\n");
    let labels = env
        .berth_ok(&["inspect", "-f", "{{json .Config.Labels}}", "ticker"])
        .await;
    assert_eq!(labels, "{\"role\":\"test\"}\n");
    // Fields bollard's models lack still reach the template, as with docker's inspect.
    let ip = env
        .berth_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "ticker"])
        .await;
    assert!(ip.trim().parse::<std::net::Ipv4Addr>().is_ok(), "{ip:?}");
    let json = env.berth_ok(&["inspect", "ticker"]).await;
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("inspect is JSON");
    assert_eq!(parsed[0]["Id"], id.as_str());
    let mut logs = String::new();
    for _ in 0..50 {
        logs = env.berth_ok(&["logs", "ticker"]).await;
        if logs.contains("start") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(logs, "start\n");
    assert_eq!(env.berth_ok(&["stop", "ticker"]).await, "ticker\n");
    assert_eq!(env.berth_ok(&["logs", "ticker"]).await, "start\nbye\n");
    assert_eq!(
        env.berth_ok(&["logs", "--tail", "1", "ticker"]).await,
        "bye\n"
    );
    let stamped = env.berth_ok(&["logs", "-t", "ticker"]).await;
    assert!(
        stamped.lines().all(|l| l.contains('T') && l.contains("Z ")),
        "{stamped}"
    );
    assert_eq!(env.berth_ok(&["ps", "-q"]).await, "");
    let all = env
        .berth_ok(&["ps", "-a", "--format", "{{.Names}} {{.State}}"])
        .await;
    assert_eq!(all, "ticker exited\n");
    assert_eq!(
        env.berth_ok(&["inspect", "-f", "{{.State.ExitCode}}", "ticker"])
            .await,
        "0\n"
    );
    assert_eq!(env.berth_ok(&["wait", "ticker"]).await, "0\n");
    env.berth_ok(&["rename", "ticker", "tocker"]).await;
    assert_eq!(env.berth_ok(&["rm", "tocker"]).await, "tocker\n");
    // create + start -a keeps the filesystem between runs.
    let id2 = env
        .berth_ok(&[
            "create",
            "--name",
            "keeper",
            "busybox",
            "sh",
            "-c",
            "cat /kept 2>/dev/null; echo x >> /kept",
        ])
        .await;
    assert_eq!(env.berth_ok(&["start", "-a", "keeper"]).await, "");
    assert_eq!(env.berth_ok(&["start", "-a", "keeper"]).await, "x\n");
    env.berth_ok(&["rm", id2.trim()]).await;
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_with_and_without_a_tty() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&["run", "-d", "--name", "box", "busybox", "sleep", "300"])
        .await;
    assert_eq!(
        env.berth_ok(&["exec", "box", "echo", "inside"]).await,
        "inside\n"
    );
    let code = env.berth(&["exec", "box", "sh", "-c", "exit 7"]).await;
    assert_eq!(code.status.code(), Some(7), "{code:?}");
    let cat = env
        .berth_with_input(&["exec", "-i", "box", "cat"], Some(b"piped\n"))
        .await;
    assert_eq!(stdout(&cat), "piped\n", "{cat:?}");
    // With -t the output comes through the container's terminal: CRLF line ends.
    let tty = env
        .berth(&["exec", "-t", "box", "sh", "-c", "tty; echo x"])
        .await;
    assert_eq!(tty.status.code(), Some(0), "{tty:?}");
    let out = stdout(&tty);
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.ends_with("\r\nx\r\n"), "{out:?}");
    let no_tty = env
        .berth_ok(&["exec", "box", "sh", "-c", "tty || true"])
        .await;
    assert_eq!(no_tty, "not a tty\n");
    interactive_tty_session(&env).await;
    env.berth_ok(&["rm", "-f", "box"]).await;
    clean(&env).await;
}

/// What a session on a pty saw.
struct PtyRun {
    status: std::process::ExitStatus,
    seen: String,
    /// The terminal's local flags before and after: raw mode must be undone.
    lflag_before: libc::tcflag_t,
    lflag_after: libc::tcflag_t,
}

/// Runs berth with `args` on a fresh pty of 33x111 (our side plays the user's terminal),
/// types `typed` after a moment, and reads until `until` shows up.
async fn on_pty(env: &DockerEnv, args: &[&str], typed: &[u8], until: &str) -> PtyRun {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut master, slave) = {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 111,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into the locals; the name and termios pointers may
        // be null, the winsize pointer points at a live value.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just opened by openpty and are owned by nobody else.
        unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    };
    let lflag = |fd: &OwnedFd| {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open for the whole call and t is a live termios.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag
    };
    let lflag_before = lflag(&slave);
    let mut cmd = env.berth_command(args);
    cmd.stdin(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stdout(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stderr(std::process::Stdio::from(slave.try_clone().expect("dup")));
    let mut child = cmd.spawn().expect("run berth on a pty");
    let until = until.to_owned();
    let reader = std::thread::spawn({
        let mut master = master.try_clone().expect("dup master");
        move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(&until) {
                match master.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    master.write_all(typed).expect("type into the pty");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the session ends")
        .expect("the session's status");
    let seen = reader.join().expect("reader");
    PtyRun {
        status,
        seen,
        lflag_before,
        lflag_after: lflag(&slave),
    }
}

/// `exec -it` from a real terminal: raw mode is set and put back, the window size reaches
/// the container.
async fn interactive_tty_session(env: &DockerEnv) {
    let r = on_pty(
        env,
        &[
            "exec",
            "-it",
            "box",
            "sh",
            "-c",
            "sleep 0.5; stty size; read line; echo got:$line",
        ],
        b"hello\r",
        "got:",
    )
    .await;
    assert!(r.status.success(), "{:?}: {:?}", r.status, r.seen);
    assert!(
        r.seen.contains("33 111"),
        "the window size went through: {:?}",
        r.seen
    );
    assert!(r.seen.contains("got:hello"), "{:?}", r.seen);
    assert_eq!(r.lflag_after, r.lflag_before, "the terminal is restored");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_it_is_a_real_terminal_session() {
    let env = DockerEnv::start("").await;
    let r = on_pty(
        &env,
        &[
            "run",
            "-it",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "sleep 0.5; stty size; read line; echo got:$line; exit 4",
        ],
        b"typed\r",
        "got:",
    )
    .await;
    assert_eq!(r.status.code(), Some(4), "{:?}", r.seen);
    assert!(r.seen.contains("33 111"), "{:?}", r.seen);
    assert!(r.seen.contains("got:typed"), "{:?}", r.seen);
    assert_ne!(r.lflag_before & libc::ICANON, 0);
    assert_eq!(r.lflag_after, r.lflag_before, "the terminal is restored");
    // -t without a terminal on stdin is refused, as docker refuses it.
    let refused = env.berth(&["run", "-it", "--rm", "busybox", "true"]).await;
    assert_eq!(refused.status.code(), Some(125), "{refused:?}");
    assert!(
        stderr(&refused).contains("the input device is not a TTY"),
        "{refused:?}"
    );
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_flags_reach_the_container() {
    let env = DockerEnv::start("").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env_file = dir.path().join("env");
    std::fs::write(&env_file, "# comment\nFROM_FILE=yes\nSPACED=a b\n").expect("env file");
    let out = env
        .berth_ok(&[
            "run",
            "--rm",
            "--env-file",
            env_file.to_str().expect("utf-8 path"),
            "-e",
            "FROM_FLAG=1",
            "-w",
            "/tmp",
            "-u",
            "1234:5678",
            "--hostname",
            "boxname",
            "--entrypoint",
            "sh",
            "busybox",
            "-c",
            "echo $FROM_FILE $FROM_FLAG \"$SPACED\"; pwd; id -u; id -g; hostname",
        ])
        .await;
    assert_eq!(out, "yes 1 a b\n/tmp\n1234\n5678\nboxname\n");
    let ro = env
        .berth(&["run", "--rm", "--read-only", "busybox", "touch", "/x"])
        .await;
    assert_eq!(ro.status.code(), Some(1), "{ro:?}");
    // A signal to `berth run` goes to the container (docker's --sig-proxy).
    let mut cmd = env.berth_command(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "trap 'echo got-term; exit 5' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("berth run");
    let pid = child.id().expect("pid") as i32;
    let mut ready = false;
    for _ in 0..100 {
        let logs = env.berth_ok(&["ps", "-q"]).await;
        if !logs.trim().is_empty() {
            let id = logs.trim().to_owned();
            if env.berth_ok(&["logs", &id]).await.contains("ready") {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the container started");
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("berth run ends")
        .expect("output");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(stdout(&out), "ready\ngot-term\n");
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn published_ports_and_followed_logs() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "127.0.0.1::80",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line$i; sleep 0.3; done",
    ])
    .await;
    let port = env.berth_ok(&["port", "web"]).await;
    assert!(port.starts_with("80/tcp -> 127.0.0.1:"), "{port}");
    let host_port: u16 = port
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a host port in {port:?}"));
    assert_ne!(host_port, 0);
    assert_eq!(
        env.berth_ok(&["port", "web", "80"]).await,
        format!("127.0.0.1:{host_port}\n")
    );
    let ports = env.berth_ok(&["ps", "-a", "--format", "{{.Ports}}"]).await;
    assert!(
        ports.is_empty() || ports.contains(&format!("127.0.0.1:{host_port}->80/tcp")),
        "{ports}"
    );
    // -f follows until the container ends.
    let followed = env.berth_ok(&["logs", "-f", "web"]).await;
    assert_eq!(followed, "line1\nline2\nline3\n");
    assert_eq!(env.berth_ok(&["wait", "web"]).await, "0\n");
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_and_pull() {
    let env = DockerEnv::start("").await;
    let pulled = env.berth(&["pull", "busybox"]).await;
    assert_eq!(pulled.status.code(), Some(0), "{pulled:?}");
    let out = stdout(&pulled);
    assert!(out.starts_with("Using default tag: latest\n"), "{out}");
    assert!(out.ends_with("docker.io/library/busybox:latest\n"), "{out}");
    let images = env.berth_ok(&["images"]).await;
    let mut lines = images.lines();
    assert!(
        lines
            .next()
            .expect("header")
            .starts_with("REPOSITORY   TAG       IMAGE ID"),
        "{images}"
    );
    let row = lines.next().expect("a row");
    assert!(row.starts_with("busybox      latest    "), "{images}");
    let q = env.berth_ok(&["images", "-q"]).await;
    assert_eq!(q.trim().len(), 12, "{q}");
    assert!(row.contains(q.trim()), "{images}");
    let formatted = env
        .berth_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .await;
    assert_eq!(formatted, "busybox:latest\n");
    let id = env.berth_ok(&["inspect", "-f", "{{.Id}}", "busybox"]).await;
    assert!(id.starts_with("sha256:"), "{id}");
    // A run of an image the daemon lacks pulls it first, as docker does.
    env.berth_ok(&["rmi", "busybox"]).await;
    assert_eq!(env.berth_ok(&["images", "-q"]).await, "");
    let run = env
        .berth(&["run", "--rm", "busybox", "echo", "pulled"])
        .await;
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert_eq!(stdout(&run), "pulled\n");
    assert!(
        stderr(&run).starts_with("Unable to find image 'busybox:latest' locally\n"),
        "{run:?}"
    );
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_dockers_messages_and_codes() {
    let env = DockerEnv::start("").await;
    let missing = env.berth(&["inspect", "nosuch"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(stderr(&missing), "Error: No such object: nosuch\n");
    let stop = env.berth(&["stop", "nosuch"]).await;
    assert_eq!(stop.status.code(), Some(1), "{stop:?}");
    assert_eq!(
        stderr(&stop),
        "Error response from daemon: No such container: nosuch\n"
    );
    let logs = env.berth(&["logs", "nosuch"]).await;
    assert_eq!(logs.status.code(), Some(1), "{logs:?}");
    assert!(
        stderr(&logs).contains("No such container: nosuch"),
        "{logs:?}"
    );
    let no_image = env.berth(&["run", "--rm", "nosuchimage"]).await;
    assert_eq!(no_image.status.code(), Some(125), "{no_image:?}");
    assert!(
        stderr(&no_image).contains("Unable to find image 'nosuchimage:latest' locally"),
        "{no_image:?}"
    );
    let bad_ref = env.berth(&["pull", "UPPER/Case"]).await;
    assert_eq!(bad_ref.status.code(), Some(1), "{bad_ref:?}");
    assert_eq!(
        stderr(&bad_ref),
        "invalid reference format: repository name (UPPER/Case) must be lowercase\n"
    );
    let bad_flag = env.berth(&["ps", "--no-such-flag"]).await;
    assert_eq!(bad_flag.status.code(), Some(125), "{bad_flag:?}");
    env.berth_ok(&["create", "--name", "dup", "busybox"]).await;
    let dup = env.berth(&["create", "--name", "dup", "busybox"]).await;
    // As the stock client: `create` fails with 1, only `run` uses 125.
    assert_eq!(dup.status.code(), Some(1), "{dup:?}");
    assert!(stderr(&dup).contains("is already in use"), "{dup:?}");
    env.berth_ok(&["rm", "dup"]).await;
    let bad_port = env.berth(&["run", "-p", "x:80", "busybox"]).await;
    assert_eq!(bad_port.status.code(), Some(125), "{bad_port:?}");
    assert_eq!(stderr(&bad_port), "berth: invalid hostPort: x\n");
    let rm_missing = env.berth(&["rm", "-f", "nosuch"]).await;
    assert_eq!(rm_missing.status.code(), Some(0), "{rm_missing:?}");
    let start_missing = env.berth(&["start", "nosuch"]).await;
    assert_eq!(start_missing.status.code(), Some(1), "{start_missing:?}");
    assert_eq!(
        stderr(&start_missing),
        "Error response from daemon: No such container: nosuch\nError: failed to start containers: nosuch\n"
    );
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_kill_and_chosen_streams() {
    let env = DockerEnv::start("").await;
    assert_eq!(
        env.berth_ok(&["pull", "-q", "busybox"]).await,
        "docker.io/library/busybox:latest\n"
    );
    let only_stdout = env
        .berth(&[
            "run",
            "--rm",
            "-a",
            "stdout",
            "busybox",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ])
        .await;
    assert_eq!(only_stdout.status.code(), Some(0), "{only_stdout:?}");
    assert_eq!(stdout(&only_stdout), "out\n");
    assert_eq!(stderr(&only_stdout), "");
    env.berth_ok(&[
        "run",
        "-d",
        "--name",
        "ticker",
        "busybox",
        "sh",
        "-c",
        "trap 'echo usr1' USR1; while true; do echo tick; sleep 0.2; done",
    ])
    .await;
    let mut cmd = env.berth_command(&["attach", "ticker"]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let attached = cmd.spawn().expect("berth attach");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        env.berth_ok(&["kill", "-s", "USR1", "ticker"]).await,
        "ticker\n"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.berth_ok(&["kill", "ticker"]).await, "ticker\n");
    let out = tokio::time::timeout(Duration::from_secs(30), attached.wait_with_output())
        .await
        .expect("attach ends with the container")
        .expect("attach output");
    // Killed: 128 + SIGKILL, as docker's attach reports it.
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with("tick\n"), "{text}");
    assert!(text.contains("usr1\n"), "{text}");
    let stopped = env.berth(&["attach", "ticker"]).await;
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert_eq!(
        stderr(&stopped),
        "You cannot attach to a stopped container, start it first\n"
    );
    clean(&env).await;
}

/// The names in a tar, in order.
fn tar_names(bytes: &[u8]) -> Vec<String> {
    tar::Archive::new(bytes)
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect()
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_out_of_a_container_by_dockers_rules() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&[
        "run",
        "-d",
        "--name",
        "box",
        "busybox",
        "sh",
        "-c",
        "mkdir -p /data/sub && echo a > /data/sub/a && echo b > /data/b \
         && ln -s /data/b /data/l && ln -s / /data/up && sleep 1000",
    ])
    .await;
    for _ in 0..50 {
        if env
            .berth(&["exec", "box", "test", "-L", "/data/up"])
            .await
            .status
            .success()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let host = tempfile::tempdir().expect("tempdir");
    let h = |p: &str| host.path().join(p);
    let hs = |p: &str| h(p).display().to_string();
    // A file into an existing directory keeps its name; to a new path it takes that name.
    std::fs::create_dir(h("into")).expect("mkdir");
    env.berth_ok(&["cp", "box:/data/b", &hs("into")]).await;
    assert_eq!(read(&h("into/b")), "b\n");
    env.berth_ok(&["cp", "box:/data/b", &hs("renamed")]).await;
    assert_eq!(read(&h("renamed")), "b\n");
    // Over an existing file.
    std::fs::write(h("over"), "old").expect("write");
    env.berth_ok(&["cp", "box:/data/sub/a", &hs("over")]).await;
    assert_eq!(read(&h("over")), "a\n");
    // A directory: into an existing one, or created under the new name, or only its
    // contents with a trailing `/.`.
    env.berth_ok(&["cp", "box:/data", &hs("into")]).await;
    assert_eq!(read(&h("into/data/sub/a")), "a\n");
    assert_eq!(
        std::fs::read_link(h("into/data/l")).expect("a link stays a link"),
        std::path::PathBuf::from("/data/b")
    );
    env.berth_ok(&["cp", "box:/data", &hs("newdir")]).await;
    assert_eq!(read(&h("newdir/sub/a")), "a\n");
    std::fs::create_dir(h("contents")).expect("mkdir");
    env.berth_ok(&["cp", "box:/data/.", &hs("contents")]).await;
    assert_eq!(read(&h("contents/sub/a")), "a\n");
    assert!(!h("contents/data").exists());
    // -L copies what a link points to, under the link's name.
    env.berth_ok(&["cp", "-L", "box:/data/l", &hs("followed")])
        .await;
    assert_eq!(read(&h("followed")), "b\n");
    env.berth_ok(&["cp", "box:/data/l", &hs("link")]).await;
    assert!(
        std::fs::symlink_metadata(h("link"))
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    // A symlink in the container's path resolves inside the container.
    env.berth_ok(&["cp", "box:/data/up/data/b", &hs("via-up")])
        .await;
    assert_eq!(read(&h("via-up")), "b\n");
    // `-` is the tar itself.
    let out = env.berth(&["cp", "box:/data/sub", "-"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tar_names(&out.stdout), ["sub", "sub/a"]);
    // docker's refusals.
    let missing = env.berth(&["cp", "box:/nope", &hs("x")]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        stderr(&missing),
        "Error response from daemon: Could not find the file /nope in container box\n"
    );
    let no_parent = env.berth(&["cp", "box:/data/b", &hs("no/such/x")]).await;
    assert_eq!(
        stderr(&no_parent),
        format!(
            "invalid output path: directory \"{}\" does not exist\n",
            hs("no/such")
        )
    );
    let dir_over_file = env.berth(&["cp", "box:/data", &hs("renamed")]).await;
    assert_eq!(stderr(&dir_over_file), "cannot copy directory\n");
    let file_as_dir = env
        .berth(&["cp", "box:/data/b", &format!("{}/", hs("nodir"))])
        .await;
    assert_eq!(stderr(&file_as_dir), "no such directory\n");
    // Works on a stopped container too.
    env.berth_ok(&["kill", "box"]).await;
    env.berth_ok(&["wait", "box"]).await;
    env.berth_ok(&["cp", "box:/data/sub/a", &hs("from-stopped")])
        .await;
    assert_eq!(read(&h("from-stopped")), "a\n");
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_into_a_container_by_dockers_rules() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&["run", "-d", "--name", "box", "busybox", "sleep", "1000"])
        .await;
    let host = tempfile::tempdir().expect("tempdir");
    let h = |p: &str| host.path().join(p);
    let hs = |p: &str| h(p).display().to_string();
    std::fs::create_dir_all(h("tree/sub")).expect("mkdir");
    std::fs::write(h("tree/sub/a"), "a\n").expect("write");
    std::fs::write(h("tree/b"), "b\n").expect("write");
    std::os::unix::fs::symlink("b", h("tree/l")).expect("symlink");
    std::os::unix::fs::chown(h("tree/b"), Some(1234), Some(1234)).expect("chown");
    let sh = |cmd: &str| {
        let cmd = cmd.to_owned();
        let env = &env;
        async move { env.berth_ok(&["exec", "box", "sh", "-c", &cmd]).await }
    };
    // A directory to a new path takes its name; into an existing one it keeps its own.
    env.berth_ok(&["cp", &hs("tree"), "box:/new"]).await;
    assert_eq!(
        sh("cat /new/sub/a /new/b; readlink /new/l").await,
        "a\nb\nb\n"
    );
    env.berth_ok(&["cp", &hs("tree"), "box:/tmp"]).await;
    assert_eq!(sh("cat /tmp/tree/sub/a").await, "a\n");
    // Contents only with `/.`.
    env.berth_ok(&["exec", "box", "mkdir", "/only"]).await;
    env.berth_ok(&["cp", &format!("{}/.", hs("tree")), "box:/only"])
        .await;
    assert_eq!(
        sh("cat /only/b; test ! -e /only/tree && echo flat").await,
        "b\nflat\n"
    );
    // A file renamed, and over an existing one.
    env.berth_ok(&["cp", &hs("tree/b"), "box:/etc/renamed"])
        .await;
    env.berth_ok(&["cp", &hs("tree/sub/a"), "box:/etc/hostname"])
        .await;
    assert_eq!(sh("cat /etc/renamed /etc/hostname").await, "b\na\n");
    // Owned by root unless -a keeps the host's owners.
    assert_eq!(sh("stat -c %u:%g /new/b").await, "0:0\n");
    env.berth_ok(&["cp", "-a", &hs("tree/b"), "box:/kept"])
        .await;
    assert_eq!(sh("stat -c %u:%g /kept").await, "1234:1234\n");
    // -L sends what the link points to.
    env.berth_ok(&["cp", "-L", &hs("tree/l"), "box:/deref"])
        .await;
    assert_eq!(sh("test -L /deref || cat /deref").await, "b\n");
    // A tar on stdin, extracted into a directory.
    let mut b = tar::Builder::new(Vec::new());
    let mut hd = tar::Header::new_gnu();
    hd.set_size(3);
    hd.set_mode(0o644);
    b.append_data(&mut hd, "piped", &b"in\n"[..])
        .expect("append");
    let piped = b.into_inner().expect("tar");
    let out = env
        .berth_with_input(&["cp", "-", "box:/tmp"], Some(&piped))
        .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(sh("cat /tmp/piped").await, "in\n");
    let not_dir = env
        .berth_with_input(&["cp", "-", "box:/etc/hostname"], Some(&piped))
        .await;
    assert_eq!(
        stderr(&not_dir),
        "destination \"box:/etc/hostname\" must be a directory\n"
    );
    // docker's refusals.
    let missing = env.berth(&["cp", &hs("nope"), "box:/tmp"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        stderr(&missing),
        format!("lstat {}: no such file or directory\n", hs("nope"))
    );
    let no_parent = env.berth(&["cp", &hs("tree/b"), "box:/no/such"]).await;
    assert_eq!(
        stderr(&no_parent),
        "Error response from daemon: Could not find the file /no in container box\n"
    );
    let dir_over_file = env.berth(&["cp", &hs("tree"), "box:/etc/hostname"]).await;
    assert_eq!(stderr(&dir_over_file), "cannot copy directory\n");
    let both = env.berth(&["cp", "box:/a", "box:/b"]).await;
    assert_eq!(
        stderr(&both),
        "copying between containers is not supported\n"
    );
    clean(&env).await;
}

/// What berth writes on a pty for about three seconds, then stopped.
async fn stats_on_pty(env: &DockerEnv, args: &[&str]) -> String {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (master, slave) = {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two fds into the locals; the other pointers may be null.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just opened by openpty and are owned by nobody else.
        unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    };
    let mut cmd = env.berth_command(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stderr(std::process::Stdio::from(slave));
    let mut child = cmd.spawn().expect("berth on a pty");
    // Our copies of the pty's slave side go, so the master reads an end once berth does.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    child.kill().await.expect("stop berth stats");
    reader.join().expect("reader")
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_stream_and_top() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&[
        "run",
        "-d",
        "--name",
        "burner",
        "busybox",
        "sh",
        "-c",
        "while :; do :; done",
    ])
    .await;
    env.berth_ok(&["run", "-d", "--name", "idle", "busybox", "sleep", "1000"])
        .await;
    env.berth_ok(&["create", "--name", "stopped", "busybox", "true"])
        .await;
    let table = env
        .berth_ok(&["stats", "--no-stream", "burner", "idle"])
        .await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("CONTAINER ID"), "{table}");
    assert!(lines[0].contains("MEM USAGE / LIMIT"), "{table}");
    let cpu = |name: &str, text: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line.split_whitespace()
            .nth(1)
            .expect("cpu")
            .trim_end_matches('%')
            .parse()
            .expect("a percentage")
    };
    let fields = env
        .berth_ok(&[
            "stats",
            "--no-stream",
            "--format",
            "{{.Name}} {{.CPUPerc}} {{.MemUsage}} {{.PIDs}}",
        ])
        .await;
    // Only the running ones; the busy one busy, on its share of the host's CPUs.
    assert_eq!(fields.lines().count(), 2, "{fields}");
    assert!(cpu("burner", &fields) > 20.0, "{fields}");
    assert!(cpu("idle", &fields) < 20.0, "{fields}");
    assert!(!fields.contains(" 0B / "), "memory in use: {fields}");
    let all = env
        .berth_ok(&["stats", "-a", "--no-stream", "--format", "{{.Name}}"])
        .await;
    assert!(all.lines().any(|l| l == "stopped"), "{all}");
    // Streamed: a table a second until stopped (plain, stdout not being a terminal).
    let mut cmd = env.berth_command(&["stats", "--format", "table {{.Name}}\t{{.PIDs}}", "idle"]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("berth stats");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGTERM) };
    let out = child.wait_with_output().await.expect("stats output");
    let text = stdout(&out);
    assert!(text.matches("NAME").count() >= 2, "{text}");
    assert!(text.matches("idle ").count() >= 2, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no escapes off a terminal: {text:?}"
    );
    // On a terminal the screen is cleared once, then each table drawn over the last.
    let drawn = stats_on_pty(&env, &["stats", "--format", "table {{.Name}}", "idle"]).await;
    assert_eq!(drawn.matches("\x1b[2J").count(), 1, "{drawn:?}");
    assert!(drawn.matches("\x1b[H").count() >= 2, "{drawn:?}");
    assert!(drawn.contains("idle"), "{drawn:?}");
    let missing = env.berth(&["stats", "nosuch"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        stderr(&missing),
        "Error response from daemon: No such container: nosuch\n"
    );
    // top, with ps's own arguments.
    let top = env.berth_ok(&["top", "idle"]).await;
    assert!(top.contains("sleep 1000"), "{top}");
    let chosen = env.berth_ok(&["top", "idle", "-o", "pid,comm"]).await;
    assert!(
        chosen
            .lines()
            .next()
            .is_some_and(|h| h.contains("PID") && h.contains("COMMAND")),
        "{chosen}"
    );
    assert!(
        chosen.lines().any(|l| l.trim_end().ends_with("sleep")),
        "{chosen}"
    );
    clean(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn load_and_import_open_their_input_as_docker_does() {
    let env = DockerEnv::start("").await;
    // The file is opened before anything is sent; its bytes then stream as they are read.
    let missing = env.berth(&["load", "-i", "/no/such.tar"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        stderr(&missing),
        "open /no/such.tar: no such file or directory\n"
    );
    let missing = env.berth(&["import", "/no/such.tar", "x:1"]).await;
    assert_eq!(
        stderr(&missing),
        "open /no/such.tar: no such file or directory\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn network_and_volume_inspect_print_what_exists_and_fail_for_the_rest() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&["network", "create", "--label", "k=v", "cli-net"])
        .await;
    env.berth_ok(&["volume", "create", "--label", "k=w", "cli-vol"])
        .await;
    let net = env
        .berth_ok(&[
            "network",
            "inspect",
            "-f",
            "{{.Name}} {{.Labels.k}}",
            "cli-net",
        ])
        .await;
    assert_eq!(net, "cli-net v\n");
    let vol = env
        .berth_ok(&[
            "volume",
            "inspect",
            "-f",
            "{{.Name}} {{.Labels.k}}",
            "cli-vol",
        ])
        .await;
    assert_eq!(vol, "cli-vol w\n");
    for kind in ["network", "volume"] {
        let name = format!("cli-{}", &kind[..3]);
        let out = env
            .berth(&[kind, "inspect", "-f", "{{.Name}}", &name, "nosuch"])
            .await;
        assert_eq!(out.status.code(), Some(1), "{kind}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{name}\n"));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("nosuch"),
            "{kind}: {out:?}"
        );
    }
    env.berth_ok(&["network", "rm", "cli-net"]).await;
    env.berth_ok(&["volume", "rm", "cli-vol"]).await;
}
