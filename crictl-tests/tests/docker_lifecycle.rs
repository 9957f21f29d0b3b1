//! Docker lifecycle semantics through the stock docker client: restart policies (after the
//! process dies, and across a berthd restart), the event stream of a run, and a port that is
//! already taken.

use std::time::{Duration, Instant};

use crictl_tests::docker::DockerEnv;

/// `docker inspect -f <format> <name>`, trimmed.
async fn inspect(env: &DockerEnv, name: &str, format: &str) -> String {
    env.ok(&["inspect", "-f", format, name])
        .await
        .trim()
        .to_owned()
}

/// Waits (10 s at most) until `format` of `name` reads `want`.
async fn wait_for(env: &DockerEnv, name: &str, format: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = inspect(env, name, format).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {format} is {got:?}, not {want:?}\n{}",
            crictl_tests::docker::tail(&env.d.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill_pid(pid: &str) {
    let pid: i32 = pid.parse().expect("a pid");
    assert!(pid > 0, "no process to kill");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the container's process");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_policies_hold_when_the_process_dies_and_across_berthd_restarts() {
    let mut env = DockerEnv::start("").await;
    let sleeper = ["busybox", "sleep", "300"];
    for (name, policy) in [
        ("always", "always"),
        ("unless", "unless-stopped"),
        ("never", "no"),
    ] {
        let mut args = vec!["run", "-d", "--name", name, "--restart", policy];
        args.extend(sleeper);
        env.ok(&args).await;
    }
    env.ok(&[
        "run",
        "-d",
        "--name",
        "flaky",
        "--restart",
        "on-failure:2",
        "busybox",
        "sh",
        "-c",
        "exit 3",
    ])
    .await;

    // The process is killed from outside: `always` comes back, `no` stays down.
    let first = inspect(&env, "always", "{{.State.Pid}}").await;
    kill_pid(&first);
    wait_for(&env, "always", "{{.RestartCount}}", "1").await;
    wait_for(&env, "always", "{{.State.Status}}", "running").await;
    assert_ne!(inspect(&env, "always", "{{.State.Pid}}").await, first);
    kill_pid(&inspect(&env, "never", "{{.State.Pid}}").await);
    wait_for(&env, "never", "{{.State.Status}}", "exited").await;
    assert_eq!(inspect(&env, "never", "{{.State.ExitCode}}").await, "137");
    // on-failure:2 tries twice more, then gives up with the code.
    wait_for(&env, "flaky", "{{.RestartCount}}", "2").await;
    wait_for(&env, "flaky", "{{.State.Status}}", "exited").await;
    assert_eq!(inspect(&env, "flaky", "{{.State.ExitCode}}").await, "3");

    // Stopped by hand: across a berthd restart `always` starts again, `unless-stopped` not.
    env.ok(&["stop", "-t", "0", "always", "unless"]).await;
    env.d.restart().await.expect("restart berthd");
    wait_for(&env, "always", "{{.State.Status}}", "running").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inspect(&env, "unless", "{{.State.Status}}").await, "exited");

    // Its process dies while berthd is down: berthd finds out when it is back, and restarts it.
    let pid = inspect(&env, "always", "{{.State.Pid}}").await;
    env.d.kill9().await.expect("kill berthd");
    kill_pid(&pid);
    env.d.restart().await.expect("start berthd again");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = inspect(&env, "always", "{{.State.Status}} {{.State.Pid}}").await;
        if now.starts_with("running") && !now.ends_with(&format!(" {pid}")) {
            break;
        }
        assert!(Instant::now() < deadline, "not restarted: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.ok(&["rm", "-f", "always", "unless", "never", "flaky"])
        .await;
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_tell_a_run_from_create_to_destroy() {
    let env = DockerEnv::start("").await;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    env.ok(&["run", "--rm", "--name", "ev", "busybox", "true"])
        .await;
    // `--until` in the future keeps the stream open until then: a second past the run.
    let t1 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 1;
    let out = env
        .ok(&[
            "events",
            "--since",
            &t0.to_string(),
            "--until",
            &t1.to_string(),
            "--filter",
            "container=ev",
            "--format",
            "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
        ])
        .await;
    let actions: Vec<&str> = out.lines().collect();
    for want in [
        "container create ev",
        "container start ev",
        "container die ev",
        "container destroy ev",
    ] {
        assert!(actions.contains(&want), "{want:?} missing from {actions:?}");
    }
    let pos = |a: &str| actions.iter().position(|x| *x == a);
    assert!(pos("container create ev") < pos("container start ev"));
    assert!(pos("container die ev") < pos("container destroy ev"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_port_in_use_fails_the_start_and_leaves_the_container_as_created() {
    let env = DockerEnv::start("").await;
    // Taken by someone else on the host (berthd runs in the test's own host namespace).
    let taken = env
        .d
        .netns()
        .run(|| std::net::TcpListener::bind("0.0.0.0:0"))
        .expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = env
        .docker(&[
            "run",
            "-d",
            "--name",
            "clash",
            "-p",
            &format!("{port}:80"),
            "busybox",
            "sleep",
            "300",
        ])
        .await;
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("port is already allocated"), "{err}");
    // Nothing of the run is left: no pod, no process; the container is there, not running.
    assert_eq!(
        inspect(&env, "clash", "{{.State.Status}} {{.State.Running}}").await,
        "created false"
    );
    env.ok(&["rm", "clash"]).await;
    drop(taken);
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_and_system_prune_keep_what_containers_use() {
    let env = DockerEnv::start("").await;
    env.ok(&["run", "-d", "--name", "user", "busybox", "sleep", "300"])
        .await;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "hello", &b"hi\n"[..])
        .expect("append");
    let rootfs = b.into_inner().expect("tar");
    let imported = env
        .docker_with_input(&["import", "-", "unused:1"], Some(&rootfs))
        .await;
    assert!(imported.status.success(), "{imported:?}");
    // Plain prune takes only images without a name: these both have one.
    let plain = env.ok(&["image", "prune", "-f"]).await;
    assert!(plain.contains("Total reclaimed space: 0B"), "{plain}");
    let all = env.ok(&["image", "prune", "-a", "-f"]).await;
    assert!(all.contains("untagged: unused:1"), "{all}");
    let left = env
        .ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .await;
    assert_eq!(left.trim(), "busybox:latest", "the image in use stays");
    env.ok(&["rm", "-f", "user"]).await;
    // With nothing running, system prune clears stopped containers, networks and images alike.
    env.ok(&["create", "--name", "idle", "busybox"]).await;
    env.ok(&["network", "create", "spare"]).await;
    let sys = env.ok(&["system", "prune", "-a", "-f"]).await;
    assert!(sys.contains("Total reclaimed space"), "{sys}");
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
    assert_eq!(env.ok(&["images", "-q"]).await, "");
    assert_eq!(
        env.ok(&["network", "ls", "-q", "--filter", "name=spare"])
            .await,
        ""
    );
}

/// `CapEff` of the process `ctr` runs, as a bit set.
async fn cap_eff(env: &DockerEnv, ctr: &str) -> u64 {
    let status = env.ok(&["exec", ctr, "cat", "/proc/1/status"]).await;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim()
        .to_owned();
    u64::from_str_radix(&hex, 16).expect("hex")
}

/// The host path of `pid`'s cgroup of `controller` (cgroup v1 on this kind of host).
fn cgroup_file(pid: &str, controller: &str, file: &str) -> String {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let rel = cg
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup in {cg}"));
    let dir = std::path::Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(rel.trim_start_matches('/'));
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_flags_for_dns_hosts_limits_capabilities_and_mounts_reach_the_container() {
    let env = DockerEnv::start("").await;
    let files = env
        .ok(&[
            "run",
            "--rm",
            "--dns",
            "10.9.9.9",
            "--add-host",
            "db.local:10.1.2.3",
            "busybox",
            "sh",
            "-c",
            "cat /etc/resolv.conf /etc/hosts",
        ])
        .await;
    assert!(files.contains("nameserver 10.9.9.9"), "{files}");
    assert!(
        files
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["10.1.2.3", "db.local"]),
        "{files}"
    );

    // Limits land in the container's cgroups.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "limited",
        "--cpus",
        "0.5",
        "--pids-limit",
        "50",
        "--memory",
        "32m",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let pid = inspect(&env, "limited", "{{.State.Pid}}").await;
    assert_eq!(cgroup_file(&pid, "pids", "pids.max"), "50");
    let quota: i64 = cgroup_file(&pid, "cpu", "cpu.cfs_quota_us")
        .parse()
        .expect("quota");
    let period: i64 = cgroup_file(&pid, "cpu", "cpu.cfs_period_us")
        .parse()
        .expect("period");
    assert_eq!(quota * 2, period, "half a CPU");
    assert_eq!(
        cgroup_file(&pid, "memory", "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );

    // Capabilities: docker's default set, changed by --cap-add/--cap-drop; all with --privileged.
    const NET_RAW: u64 = 1 << 13;
    const SYS_TIME: u64 = 1 << 25;
    const SYS_ADMIN: u64 = 1 << 21;
    let default = cap_eff(&env, "limited").await;
    assert_ne!(default & NET_RAW, 0, "docker's default set has NET_RAW");
    assert_eq!(default & (SYS_TIME | SYS_ADMIN), 0);
    env.ok(&[
        "run",
        "-d",
        "--name",
        "caps",
        "--cap-add",
        "SYS_TIME",
        "--cap-drop",
        "NET_RAW",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let changed = cap_eff(&env, "caps").await;
    assert_eq!(changed & NET_RAW, 0);
    assert_ne!(changed & SYS_TIME, 0);
    env.ok(&[
        "run",
        "-d",
        "--name",
        "priv",
        "--privileged",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let all = cap_eff(&env, "priv").await;
    assert_ne!(all & SYS_ADMIN, 0, "privileged: {all:x}");

    // --mount: a named volume and a read-only bind.
    let host = tempfile::tempdir().expect("tempdir");
    std::fs::write(host.path().join("f"), "from host\n").expect("write");
    let out = env
        .docker(&[
            "run", "--rm", "--mount", "type=volume,src=mvol,dst=/m", "--mount",
            &format!("type=bind,src={},dst=/b,readonly", host.path().display()),
            "busybox", "sh", "-c",
            "echo kept > /m/x && cat /b/f && if echo no > /b/f; then echo wrote; else echo refused; fi",
        ])
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from host") && text.contains("refused"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("f")).expect("read"),
        "from host\n"
    );
    let kept = env
        .ok(&["run", "--rm", "-v", "mvol:/m", "busybox", "cat", "/m/x"])
        .await;
    assert_eq!(kept, "kept\n");

    // -P publishes the exposed ports on ports of the host's choosing.
    env.ok(&[
        "run", "-d", "--name", "pub", "--expose", "80", "-P", "busybox", "sleep", "300",
    ])
    .await;
    let port = env.ok(&["port", "pub", "80"]).await;
    assert!(port.starts_with("0.0.0.0:"), "{port}");

    env.ok(&["rm", "-f", "limited", "caps", "priv", "pub"])
        .await;
    env.ok(&["volume", "rm", "mvol"]).await;
}
