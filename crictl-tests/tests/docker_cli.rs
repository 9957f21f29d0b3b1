//! The stock docker client against berthd's Docker API.

use crictl_tests::docker::DockerEnv;

#[tokio::test(flavor = "multi_thread")]
async fn docker_run_rm_prints_the_output_and_exits_with_the_containers_code() {
    let env = DockerEnv::start("").await;
    let out = env.ok(&["run", "--rm", "busybox", "echo", "hi"]).await;
    assert_eq!(out, "hi\n");
    let failed = env
        .docker(&[
            "run",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ])
        .await;
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    assert_eq!(String::from_utf8_lossy(&failed.stderr), "oops\n");
    let left = env.ok(&["ps", "-a", "-q"]).await;
    assert_eq!(left, "", "--rm containers are gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn detached_containers_log_stop_and_go() {
    let env = DockerEnv::start("").await;
    let id = env
        .ok(&[
            "run",
            "-d",
            "--name",
            "ticker",
            "busybox",
            "sh",
            "-c",
            "echo start; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done",
        ])
        .await;
    let id = id.trim();
    assert_eq!(id.len(), 64, "{id}");
    let ps = env.ok(&["ps", "--format", "{{.Names}} {{.Status}}"]).await;
    assert!(ps.starts_with("ticker Up"), "{ps}");
    // Names and short ids work wherever an id does.
    let state = env
        .ok(&["inspect", "-f", "{{.State.Status}}", &id[..8]])
        .await;
    assert_eq!(state.trim(), "running");
    let mut logs = String::new();
    for _ in 0..50 {
        logs = env.ok(&["logs", "ticker"]).await;
        if logs.contains("start") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(logs, "start\n");
    env.ok(&["stop", "ticker"]).await;
    assert_eq!(env.ok(&["logs", "ticker"]).await, "start\nbye\n");
    let state = env
        .ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            "ticker",
        ])
        .await;
    assert_eq!(state.trim(), "exited 0");
    // Started again, it keeps its filesystem.
    env.ok(&["rm", "ticker"]).await;
    let id2 = env
        .ok(&[
            "create",
            "--name",
            "keeper",
            "busybox",
            "sh",
            "-c",
            "cat /kept 2>/dev/null; echo x >> /kept",
        ])
        .await;
    assert_eq!(env.ok(&["start", "-a", "keeper"]).await, "");
    assert_eq!(env.ok(&["start", "-a", "keeper"]).await, "x\n");
    env.ok(&["rm", id2.trim()]).await;
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_a_running_container() {
    let env = DockerEnv::start("").await;
    env.ok(&["run", "-d", "--name", "box", "busybox", "sleep", "300"])
        .await;
    assert_eq!(env.ok(&["exec", "box", "echo", "inside"]).await, "inside\n");
    let code = env.docker(&["exec", "box", "sh", "-c", "exit 7"]).await;
    assert_eq!(code.status.code(), Some(7), "{code:?}");
    let cat = env
        .docker_with_input(&["exec", "-i", "box", "cat"], Some(b"piped\n"))
        .await;
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "piped\n", "{cat:?}");
    env.ok(&["rm", "-f", "box"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_takes_its_own_env_user_and_working_dir() {
    let env = DockerEnv::start("").await;
    env.ok(&[
        "run", "-d", "--name", "box", "-e", "KEEP=1", "-e", "OVER=old", "busybox", "sleep", "300",
    ])
    .await;
    let script = "echo $KEEP $OVER $NEW; id -u; id -g; pwd";
    let plain = env.ok(&["exec", "box", "sh", "-c", script]).await;
    assert_eq!(plain, "1 old\n0\n0\n/\n");
    let out = env
        .ok(&[
            "exec",
            "-e",
            "OVER=new",
            "-e",
            "NEW=yes",
            "-u",
            "app",
            "-w",
            "/home/app",
            "box",
            "sh",
            "-c",
            script,
        ])
        .await;
    assert_eq!(out, "1 new yes\n1000\n1000\n/home/app\n");
    let numeric = env
        .ok(&[
            "exec",
            "-u",
            "65534:1000",
            "box",
            "sh",
            "-c",
            "id -u; id -g",
        ])
        .await;
    assert_eq!(numeric, "65534\n1000\n");
    // A user the container does not know fails the exec, and the container runs on.
    let bad = env
        .docker(&["exec", "-u", "nosuchuser", "box", "true"])
        .await;
    assert!(!bad.status.success(), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nosuchuser"),
        "{bad:?}"
    );
    // The container's /etc/passwd as a symlink to a host path: looked up inside the
    // container (where it leads nowhere), never on the host.
    let host_passwd = tempfile::NamedTempFile::new().expect("host file");
    std::fs::write(host_passwd.path(), "evil:x:4242:4242::/:/bin/sh\n").expect("write");
    let link = format!("ln -sf {} /etc/passwd", host_passwd.path().display());
    env.ok(&["exec", "box", "sh", "-c", &link]).await;
    let evil = env.docker(&["exec", "-u", "evil", "box", "id", "-u"]).await;
    assert!(
        !evil.status.success() && !String::from_utf8_lossy(&evil.stdout).contains("4242"),
        "the host's file was read: {evil:?}"
    );
    let rel = env.docker(&["exec", "-w", "relative", "box", "true"]).await;
    assert!(!rel.status.success(), "{rel:?}");
    let state = env.ok(&["inspect", "-f", "{{.State.Status}}", "box"]).await;
    assert_eq!(state.trim(), "running");
    env.ok(&["rm", "-f", "box"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn top_and_stats_show_the_containers_processes_and_usage() {
    let env = DockerEnv::start("").await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "busy",
        "--memory",
        "64m",
        "busybox",
        "sh",
        "-c",
        "sleep 301 & sleep 302",
    ])
    .await;
    let mut top = String::new();
    for _ in 0..50 {
        top = env.ok(&["top", "busy"]).await;
        if top.contains("sleep 302") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(top.starts_with("UID"), "{top}");
    assert!(
        top.contains("sleep 301") && top.contains("sleep 302"),
        "{top}"
    );
    // Only the container's processes: not this test's, not berthd's.
    assert!(!top.contains("berthd"), "{top}");
    let top_args = env.ok(&["top", "busy", "-o", "pid,args"]).await;
    assert!(top_args.starts_with("PID"), "{top_args}");
    let stats = env
        .ok(&[
            "stats",
            "--no-stream",
            "--format",
            "{{.Name}} {{.MemUsage}} {{.PIDs}}",
            "busy",
        ])
        .await;
    let fields: Vec<&str> = stats.split_whitespace().collect();
    assert_eq!(fields[0], "busy", "{stats}");
    assert_eq!(fields.get(3), Some(&"64MiB"), "the memory limit: {stats}");
    let pids: u32 = fields.last().and_then(|p| p.parse().ok()).unwrap_or(0);
    assert!(pids >= 2, "{stats}");
    // A stopped container has no processes to show.
    env.ok(&["stop", "-t", "0", "busy"]).await;
    let stopped = env.docker(&["top", "busy"]).await;
    assert!(!stopped.status.success());
    assert!(
        String::from_utf8_lossy(&stopped.stderr).contains("is not running"),
        "{stopped:?}"
    );
    env.ok(&["rm", "busy"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_copies_both_ways_in_running_and_stopped_containers() {
    let env = DockerEnv::start("").await;
    let host = tempfile::tempdir().expect("tempdir");
    let h = |p: &str| host.path().join(p).display().to_string();
    env.ok(&[
        "run", "-d", "--name", "box", "busybox", "sh", "-c",
        "echo inside > /marker; mkdir -p /data/sub; echo deep > /data/sub/f; ln -s / /escape; sleep 300",
    ])
    .await;
    for _ in 0..50 {
        if env
            .docker(&["exec", "box", "test", "-L", "/escape"])
            .await
            .status
            .success()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Out of a running container: a file, a directory, and a path through a symlink to / that
    // stays in the container.
    env.ok(&["cp", "box:/marker", &h("marker")]).await;
    assert_eq!(
        std::fs::read_to_string(h("marker")).expect("marker"),
        "inside\n"
    );
    env.ok(&["cp", "box:/data", &h("data")]).await;
    assert_eq!(
        std::fs::read_to_string(h("data/sub/f")).expect("dir"),
        "deep\n"
    );
    env.ok(&["cp", "box:/escape/marker", &h("via-link")]).await;
    assert_eq!(
        std::fs::read_to_string(h("via-link")).expect("link"),
        "inside\n"
    );
    // Into it.
    std::fs::create_dir_all(h("up/nested")).expect("mkdir");
    std::fs::write(h("up/nested/g"), "from host\n").expect("write");
    env.ok(&["cp", &h("up"), "box:/tmp/"]).await;
    // A name that looks like a layer whiteout is a file like any other here.
    std::fs::write(h(".wh.marker"), "not a whiteout\n").expect("write");
    env.ok(&["cp", &h(".wh.marker"), "box:/"]).await;
    assert_eq!(env.ok(&["exec", "box", "cat", "/marker"]).await, "inside\n");
    assert_eq!(
        env.ok(&["exec", "box", "cat", "/.wh.marker"]).await,
        "not a whiteout\n"
    );
    assert_eq!(
        env.ok(&["exec", "box", "cat", "/tmp/up/nested/g"]).await,
        "from host\n"
    );
    let missing = env.docker(&["cp", "box:/no/such", &h("x")]).await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("Could not find the file /no/such"),
        "{missing:?}"
    );
    // A stopped container: its rootfs is reached without starting it, and what goes in is
    // there when it starts again.
    env.ok(&["stop", "-t", "0", "box"]).await;
    env.ok(&["cp", "box:/data/sub/f", &h("stopped-f")]).await;
    assert_eq!(
        std::fs::read_to_string(h("stopped-f")).expect("f"),
        "deep\n"
    );
    std::fs::write(h("later"), "later\n").expect("write");
    env.ok(&["cp", &h("later"), "box:/later"]).await;
    env.ok(&["start", "box"]).await;
    assert_eq!(env.ok(&["exec", "box", "cat", "/later"]).await, "later\n");
    env.ok(&["rm", "-f", "box"]).await;
    // No copy's mount is left in berthd's mount namespace.
    let pid = env.d.pid().expect("berthd pid");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    assert!(!mounts.contains("/cp-"), "{mounts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_dockers_errors() {
    let env = DockerEnv::start("").await;
    let missing = env.docker(&["inspect", "nosuch"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("No such object: nosuch")
            || String::from_utf8_lossy(&missing.stderr).contains("No such container"),
        "{missing:?}"
    );
    let no_image = env.docker(&["run", "--rm", "nosuchimage"]).await;
    assert_eq!(
        no_image.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&no_image.stderr)
    );
    env.ok(&["create", "--name", "dup", "busybox"]).await;
    let dup = env.docker(&["create", "--name", "dup", "busybox"]).await;
    // The client picks the exit code of `create`; the daemon's part is the 409 and its text.
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("is already in use"),
        "{dup:?}"
    );
    let bad_cmd = env
        .docker(&["run", "--rm", "busybox", "/no/such/binary"])
        .await;
    assert!(
        matches!(bad_cmd.status.code(), Some(126 | 127)),
        "{bad_cmd:?}"
    );
    env.ok(&["rm", "dup"]).await;
    // Malformed JSON straight at the socket: 400 with a message.
    let raw = raw_request(&env, "POST", "/v1.44/containers/create", "{not json").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("\"message\""), "{raw}");
    let raw = raw_request(&env, "GET", "/v1.44/containers/nosuch/json", "").await;
    assert!(
        raw.starts_with("HTTP/1.1 404") && raw.contains("No such container: nosuch"),
        "{raw}"
    );
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
}

async fn raw_request(env: &DockerEnv, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&env.d.docker_socket)
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The wait's starting point is taken before its headers go: `docker run` (which waits for
/// the next exit, then starts the container) must see an exit that comes at once, and a
/// container already gone is a 404 rather than an error after a 200.
#[tokio::test(flavor = "multi_thread")]
async fn wait_starts_before_its_headers() {
    let env = DockerEnv::start("").await;
    env.ok(&["pull", "-q", "busybox"]).await;
    for i in 0..5 {
        let out = env
            .docker(&[
                "run",
                "--name",
                &format!("quick{i}"),
                "busybox",
                "sh",
                "-c",
                "exit 7",
            ])
            .await;
        assert_eq!(out.status.code(), Some(7), "{out:?}");
    }
    let out = env
        .docker(&["run", "--rm", "busybox", "sh", "-c", "exit 4"])
        .await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    env.ok(&["run", "-d", "--name", "gone", "busybox", "true"])
        .await;
    assert_eq!(env.ok(&["wait", "gone"]).await, "0\n");
    env.ok(&["rm", "gone"]).await;
    let raw = raw_request(
        &env,
        "POST",
        "/v1.44/containers/gone/wait?condition=removed",
        "",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    // next-exit of a container its policy restarts: the exit after the request.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "again",
        "--restart",
        "on-failure:3",
        "busybox",
        "sh",
        "-c",
        "sleep 1; exit 5",
    ])
    .await;
    let raw = raw_request(
        &env,
        "POST",
        "/v1.44/containers/again/wait?condition=next-exit",
        "",
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 200") && raw.contains("\"StatusCode\":5"),
        "{raw}"
    );
    let ids = env.ok(&["ps", "-aq"]).await;
    for id in ids.split_whitespace() {
        env.ok(&["rm", "-f", id]).await;
    }
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
}
