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
