//! Container lifecycle end to end: real pods, real shims, real overlay rootfs, CRI logs.

use std::path::Path;
use std::time::{Duration, Instant};

use api::cri;
use crictl_tests::pods::{
    Env, assert_clean, create, ctr_config, env, pid_mode, pod_config, read_cri_log, remove_pod,
    run_pod_with, start, status, wait_exited,
};
use tonic::Code;

/// As kubelet runs a pod without shareProcessNamespace: each container is PID 1 of its own PID
/// namespace (the CRI default, POD, would share the pod's).
async fn run_pod(env: &Env, name: &str) -> (String, cri::PodSandboxConfig) {
    let cfg = cri::PodSandboxConfig {
        linux: pid_mode(cri::NamespaceMode::Container),
        ..pod_config(env, name)
    };
    run_pod_with(env, cfg).await
}

#[tokio::test(flavor = "multi_thread")]
async fn run_a_container_to_completion() {
    let env = env().await;
    let pod = run_pod(&env, "runner").await;
    // A 40000-byte line (split into 16 KiB partial records) and a last line with no newline.
    let script = "echo hello; echo oops >&2; id -u; hostname; \
                  head -c 40000 /dev/zero | tr '\\0' x; echo; printf tail; exit 3";
    let id = create(
        &env,
        &pod,
        ctr_config(&env, "job", &["/bin/sh", "-c", script]),
    )
    .await
    .expect("create");
    let s = status(&env, &id).await.expect("status");
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert!(s.created_at > 0 && s.started_at == 0);
    start(&env, &id).await;
    let s = wait_exited(&env, &id).await;
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.reason, "Error");
    assert!(
        s.started_at >= s.created_at && s.finished_at >= s.started_at,
        "{s:?}"
    );
    assert_eq!(s.image_ref, s.image_id);
    assert!(s.image_ref.starts_with("sha256:"));
    assert_eq!(s.labels["c"], "job");
    let log = env.logs.path().join("job.log");
    assert_eq!(s.log_path, log.display().to_string());
    let (out, err) = read_cri_log(&log);
    // The image's USER app is uid 1000; the pod's hostname is the container's.
    let long = "x".repeat(40000);
    assert_eq!(
        out,
        format!("hello\n1000\nrunner\n{long}\ntail\n"),
        "stdout"
    );
    assert_eq!(err, "oops\n");
    let raw = std::fs::read_to_string(&log).expect("log");
    let partial: Vec<usize> = raw
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("P"))
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or("").len())
        .collect();
    assert_eq!(partial, [16384, 16384], "the long line's partial records");

    let mut rt = env.d.runtime().await.expect("client");
    let all = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.containers.len(), 1);
    assert_eq!(all.containers[0].pod_sandbox_id, pod.0);
    let exited = cri::ContainerFilter {
        state: Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerExited as i32,
        }),
        ..Default::default()
    };
    let filtered = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(exited),
        })
        .await
        .expect("list");
    assert_eq!(filtered.into_inner().containers.len(), 1);

    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove again");
    assert_eq!(
        status(&env, &id).await.expect_err("gone").code(),
        Code::NotFound
    );
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_with_signal_then_kill() {
    let env = env().await;
    let pod = run_pod(&env, "stopper").await;
    // Handles SIGTERM: stops at once with its own exit code.
    let polite = [
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.05; done",
    ];
    let a = create(&env, &pod, ctr_config(&env, "polite", &polite))
        .await
        .expect("create");
    // PID 1 with no handler ignores SIGTERM: only the SIGKILL after the timeout stops it.
    let b = create(
        &env,
        &pod,
        ctr_config(&env, "stubborn", &["/bin/sleep", "1000"]),
    )
    .await
    .expect("create");
    start(&env, &a).await;
    start(&env, &b).await;
    for id in [&a, &b] {
        assert_eq!(
            status(&env, id).await.expect("status").state,
            cri::ContainerState::ContainerRunning as i32
        );
    }
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: a.clone(),
        timeout: 10,
    })
    .await
    .expect("stop");
    let s = status(&env, &a).await.expect("status");
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 0, "Completed")
    );

    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: b.clone(),
        timeout: 1,
    })
    .await
    .expect("stop");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited for the timeout"
    );
    let s = status(&env, &b).await.expect("status");
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "Error"));
    rt.stop_container(cri::StopContainerRequest {
        container_id: b.clone(),
        timeout: 1,
    })
    .await
    .expect("stop again");

    // Stopping the pod stops what runs in it; removing the pod removes its containers.
    let c = create(
        &env,
        &pod,
        ctr_config(&env, "third", &["/bin/sleep", "1000"]),
    )
    .await
    .expect("create");
    start(&env, &c).await;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .expect("stop pod");
    assert_eq!(
        status(&env, &c).await.expect("status").state,
        cri::ContainerState::ContainerExited as i32
    );
    let err = create(&env, &pod, ctr_config(&env, "late", &["true"]))
        .await
        .expect_err("stopped pod");
    assert_eq!(err.code(), Code::FailedPrecondition);
    remove_pod(&env, &pod.0).await;
    let left = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(left.containers.is_empty());
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_container_requests() {
    let env = env().await;
    let pod = run_pod(&env, "bad").await;
    let mut missing = ctr_config(&env, "noimage", &["true"]);
    missing.image = Some(cri::ImageSpec {
        image: "127.0.0.1:1/none:latest".into(),
        ..Default::default()
    });
    assert_eq!(
        create(&env, &pod, missing)
            .await
            .expect_err("no image")
            .code(),
        Code::NotFound
    );
    let nopod = (String::from("0123456789abcdef"), pod.1.clone());
    assert_eq!(
        create(&env, &nopod, ctr_config(&env, "x", &["true"]))
            .await
            .expect_err("no pod")
            .code(),
        Code::NotFound
    );
    let mut bad_mount = ctr_config(&env, "mnt", &["true"]);
    bad_mount.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: "/nonexistent/berth/source".into(),
        ..Default::default()
    }];
    let err = create(&env, &pod, bad_mount).await.expect_err("bad mount");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let ok = create(&env, &pod, ctr_config(&env, "dup", &["true"]))
        .await
        .expect("create");
    let dup = create(&env, &pod, ctr_config(&env, "dup", &["true"]))
        .await
        .expect_err("duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert_eq!(
        status(&env, "feedface").await.expect_err("unknown").code(),
        Code::NotFound
    );
    let mut rt = env.d.runtime().await.expect("client");
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: "feedface".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    // Only the good container exists; failed creations left nothing.
    let all = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        all.containers
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![ok]
    );
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn berth_cri_run_shows_output_and_exit_code() {
    // What the README's demo does: run a command in a fresh pod and print its output.
    let env = env().await;
    let out = tokio::process::Command::new(crictl_tests::daemon::bin_dir().join("berth-cri"))
        .arg("--endpoint")
        .arg(format!("unix://{}", env.d.socket.display()))
        .args([
            "run",
            &env.image,
            "/bin/sh",
            "-c",
            "echo hello from berth; echo to stderr >&2; exit 4",
        ])
        .output()
        .await
        .expect("run berth-cri");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from berth\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to stderr\n");
    // The image's own entrypoint and cmd when no command is given.
    let out = tokio::process::Command::new(crictl_tests::daemon::bin_dir().join("berth-cri"))
        .arg("--endpoint")
        .arg(format!("unix://{}", env.d.socket.display()))
        .args(["run", &env.image])
        .output()
        .await
        .expect("run berth-cri");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    let mut rt = env.d.runtime().await.expect("client");
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(pods.items.is_empty(), "run removed its pod");
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_survive_berthd_kill_9_and_a_dead_shim_is_reported() {
    let mut env = env().await;
    let pod = run_pod(&env, "survive").await;
    let a = create(&env, &pod, ctr_config(&env, "a", &["/bin/sleep", "1000"]))
        .await
        .expect("create");
    let b = create(&env, &pod, ctr_config(&env, "b", &["/bin/sleep", "1000"]))
        .await
        .expect("create");
    start(&env, &a).await;
    start(&env, &b).await;
    env.d.kill9().await.expect("kill berthd");
    env.d.restart().await.expect("restart");
    for id in [&a, &b] {
        let s = status(&env, id).await.expect("status after restart");
        assert_eq!(
            s.state,
            cri::ContainerState::ContainerRunning as i32,
            "{id} still runs"
        );
    }
    // kill -9 of one shim: its container is reported exited with a clear reason; the other is
    // untouched.
    let pid: i32 =
        std::fs::read_to_string(env.d.state().join("containers").join(&a).join("shim.pid"))
            .expect("shim pid")
            .trim()
            .parse()
            .expect("pid");
    nix_kill(pid);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = status(&env, &a).await.expect("status");
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.reason, "ShimDied");
    assert!(!s.message.is_empty());
    assert_eq!(
        status(&env, &b).await.expect("status").state,
        cri::ContainerState::ContainerRunning as i32
    );
    remove_pod(&env, &pod.0).await;
    // The container whose shim died must not outlive its removal.
    let left = std::process::Command::new("pgrep")
        .args(["-f", "sleep 1000"])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert_clean(&env);
}

fn nix_kill(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn update_resources_and_reopen_log_of_a_running_container() {
    let env = env().await;
    let pod = run_pod(&env, "tune").await;
    let mut cfg = ctr_config(
        &env,
        "tuned",
        &[
            "/bin/sh",
            "-c",
            "trap 'echo after-rotate; exit 0' TERM; echo before-rotate; while true; do sleep 0.05; done",
        ],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&env, &pod, cfg).await.expect("create");
    start(&env, &id).await;
    let cg = |controller: &str, file: &str| {
        let p = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("berth")
            .join(&pod.0)
            .join(&id)
            .join(file);
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_owned()
    };
    assert_eq!(cg("cpu", "cpu.shares"), "512");
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );

    let mut rt = env.d.runtime().await.expect("client");
    let new = cri::LinuxContainerResources {
        cpu_shares: 1024,
        cpu_period: 100_000,
        cpu_quota: 20_000,
        memory_limit_in_bytes: 128 << 20,
        ..Default::default()
    };
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(new.clone()),
        ..Default::default()
    })
    .await
    .expect("update");
    assert_eq!(cg("cpu", "cpu.shares"), "1024");
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "20000");
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (128u64 << 20).to_string()
    );
    let s = status(&env, &id).await.expect("status");
    assert_eq!(
        s.resources
            .and_then(|r| r.linux)
            .map(|l| l.memory_limit_in_bytes),
        Some(128 << 20)
    );

    // Log rotation: rename the file, reopen, and the next lines land in a new file.
    let log = env.logs.path().join("tuned.log");
    let rotated = env.logs.path().join("tuned.log.1");
    wait_for_file_containing(&log, "before-rotate").await;
    std::fs::rename(&log, &rotated).expect("rotate");
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: id.clone(),
    })
    .await
    .expect("reopen");
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 10,
    })
    .await
    .expect("stop");
    let (new_out, _) = read_cri_log(&log);
    assert_eq!(new_out, "after-rotate\n");
    let (old_out, _) = read_cri_log(&rotated);
    assert_eq!(old_out, "before-rotate\n");

    // Neither works on an exited container.
    let err = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(new),
            ..Default::default()
        })
        .await
        .expect_err("exited");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .expect_err("exited");
    assert_eq!(err.code(), Code::FailedPrecondition);
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

async fn wait_for_file_containing(path: &Path, text: &str) {
    for _ in 0..500 {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never contained {text:?}", path.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_test_leaves_nothing_behind() {
    // Dropping the fixture mid-test, as a panic would, with a pod and a running container.
    let env = env().await;
    let pod = run_pod(&env, "abandoned").await;
    let id = create(
        &env,
        &pod,
        ctr_config(&env, "left", &["/bin/sleep", "1000"]),
    )
    .await
    .expect("create");
    start(&env, &id).await;
    let state = env.d.state();
    let shim_pid: i32 =
        std::fs::read_to_string(state.join("containers").join(&id).join("shim.pid"))
            .expect("shim pid")
            .trim()
            .parse()
            .expect("pid");
    drop(env);
    assert!(
        !Path::new(&format!("/proc/{shim_pid}")).exists() || is_zombie(shim_pid),
        "shim left"
    );
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("berth").join(&pod.0))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "pod cgroups left: {cgroups:?}");
    assert!(crictl_tests::pods::mounts_under(&state).is_empty());
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread")]
async fn verbose_status_shows_pid_spec_and_snapshot() {
    let env = env().await;
    let pod = run_pod(&env, "verbose").await;
    let id = create(&env, &pod, ctr_config(&env, "v", &["sleep", "1006"]))
        .await
        .expect("create");
    start(&env, &id).await;
    let mut rt = env.d.runtime().await.expect("client");
    let resp = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(resp.info.get("info").expect("info key")).expect("json");
    assert_eq!(info["sandboxID"], pod.0.as_str());
    assert_eq!(info["snapshotKey"], format!("ctr-{id}").as_str());
    assert_eq!(info["config"]["metadata"]["name"], "v");
    assert_eq!(
        info["runtimeSpec"]["process"]["args"],
        serde_json::json!(["sleep", "1006"])
    );
    let pid = info["pid"].as_i64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("init runs");
    assert_eq!(
        cmdline, b"sleep\x001006\x00",
        "pid {pid} is the container's init"
    );
    let shim_pid = info["shimPid"].as_i64().expect("shim pid");
    assert!(Path::new(&format!("/proc/{shim_pid}")).exists());
    // Without verbose: no info.
    let plain = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner();
    assert!(plain.info.is_empty());
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
