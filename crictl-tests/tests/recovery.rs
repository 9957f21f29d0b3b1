//! berthd killed with SIGKILL in the middle of requests, then started again: a container being
//! created is rolled back without a trace, containers being stopped keep their real fate, and
//! nothing leaks. Plus the shim's memory budget measured on a real container through berthd.
//!
//! To kill berthd at a known point, berthd runs a wrapper as its shim binary: the wrapper blocks
//! on a FIFO before or after the real shim ran, while berthd waits for it inside
//! CreateContainer.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use api::cri;
use crictl_tests::daemon::{bin_dir, release_shim};
use crictl_tests::pods::{
    Env, assert_clean, create, env_with_shim, remove_pod, run_pod, sh_config, start, status,
};

/// A shim wrapper that pauses on request. Dropping it releases a paused wrapper.
struct Wrapper {
    dir: tempfile::TempDir,
}

impl Wrapper {
    fn new() -> Wrapper {
        let dir = tempfile::Builder::new()
            .prefix("berth-wrapper-")
            .tempdir()
            .expect("tempdir");
        let real = bin_dir().join("berth-shim");
        let ctl = dir.path().display().to_string();
        let script = format!(
            "#!/bin/sh\n\
             # Pauses (reading the FIFO) before or after the real shim when asked to.\n\
             if [ -e {ctl}/pause-before ]; then touch {ctl}/paused; read x < {ctl}/go; fi\n\
             {real} \"$@\"\n\
             rc=$?\n\
             if [ -e {ctl}/pause-after ]; then touch {ctl}/paused; read x < {ctl}/go; fi\n\
             exit $rc\n",
            real = real.display()
        );
        let path = dir.path().join("shim-wrapper");
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        nix::unistd::mkfifo(
            &dir.path().join("go"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        Wrapper { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("shim-wrapper")
    }

    fn pause(&self, when: &str) {
        std::fs::write(self.dir.path().join(when), "").expect("pause file");
    }

    fn unpause(&self) {
        for f in ["pause-before", "pause-after", "paused"] {
            let _ = std::fs::remove_file(self.dir.path().join(f));
        }
    }

    async fn wait_paused(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.dir.path().join("paused").exists() {
            assert!(Instant::now() < deadline, "the wrapper never paused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets a paused wrapper go on (a no-op when none waits).
    fn release(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: with no reader the open fails (ENXIO), and nothing waits anyway.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(self.dir.path().join("go"))
        {
            let _ = f.write_all(b"go\n");
        }
    }
}

impl Drop for Wrapper {
    fn drop(&mut self) {
        self.unpause();
        self.release();
    }
}

/// Pids whose command line contains `pattern` (zombies excluded: they hold nothing).
fn live_pids(pattern: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(pattern)
        })
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            !matches!(state, Some(Some('Z')) | None)
        })
        .collect()
}

/// Waits until no live process matches `pattern`.
async fn wait_no_process(pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = live_pids(pattern);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let ps = std::process::Command::new("ps")
                .args(["-eo", "pid,ppid,stat,wchan:20,args"])
                .output()
                .expect("ps");
            panic!(
                "processes matching {pattern:?} left: {left:?}\n{}",
                String::from_utf8_lossy(&ps.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn container_dirs(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.d.state().join("containers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn cgroup_left(pod: &str, ctr: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .flatten()
        .map(|e| e.path().join("berth").join(pod).join(ctr))
        .filter(|p| p.exists())
        .collect()
}

async fn list_containers(env: &Env) -> Vec<cri::Container> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .containers
}

/// CreateContainer in a task of its own, so the test can kill berthd while it runs.
async fn spawn_create(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    ctr: cri::ContainerConfig,
) -> tokio::task::JoinHandle<Result<tonic::Response<cri::CreateContainerResponse>, tonic::Status>> {
    let channel = env.d.channel().await.expect("channel");
    let (pod_id, cfg) = pod.clone();
    tokio::spawn(async move {
        cri::runtime_service_client::RuntimeServiceClient::new(channel)
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id,
                config: Some(ctr),
                sandbox_config: Some(cfg),
            })
            .await
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_create_rolls_the_container_back() {
    let wrapper = Wrapper::new();
    let mut env = env_with_shim(Some(wrapper.path())).await;
    let pod = run_pod(&env, "halfcreated").await;

    // 1. berthd dies after the shim created the container, before it recorded it as created.
    wrapper.pause("pause-after");
    let req = spawn_create(&env, &pod, sh_config(&env, "victim", "exec sleep 1001")).await;
    wrapper.wait_paused().await;
    let dirs = container_dirs(&env);
    assert_eq!(dirs.len(), 1, "one bundle: {dirs:?}");
    let id = dirs[0].clone();
    let shim_pid: i32 =
        std::fs::read_to_string(env.d.state().join("containers").join(&id).join("shim.pid"))
            .expect("the shim runs")
            .trim()
            .parse()
            .expect("pid");
    assert!(
        !cgroup_left(&pod.0, &id).is_empty(),
        "the shim created the container"
    );
    env.d.kill9().await.expect("kill berthd");
    assert!(req.await.expect("task").is_err(), "create cannot succeed");
    wrapper.unpause();
    wrapper.release();
    env.d.restart().await.expect("restart");

    assert!(list_containers(&env).await.is_empty(), "rolled back");
    assert!(container_dirs(&env).is_empty(), "bundle removed");
    wait_no_process("sleep 1001").await;
    // The shim, and the wrapper that launched it (released above, it exits in its own time).
    eprintln!("waiting for shim {shim_pid} and its launcher to be gone");
    wait_no_process(&format!("--id {id}")).await;
    assert!(cgroup_left(&pod.0, &id).is_empty(), "container cgroup left");

    // 2. berthd dies before the shim ran: the wrapper then finds no bundle, and nothing starts.
    wrapper.pause("pause-before");
    let req = spawn_create(&env, &pod, sh_config(&env, "early", "exec sleep 1002")).await;
    wrapper.wait_paused().await;
    env.d.kill9().await.expect("kill berthd");
    assert!(req.await.expect("task").is_err(), "create cannot succeed");
    wrapper.unpause();
    env.d.restart().await.expect("restart");
    assert!(list_containers(&env).await.is_empty(), "rolled back");
    // Only now does the shim run, late, against a bundle that is gone.
    wrapper.release();
    wait_no_process("shim-wrapper --id").await;
    assert!(live_pids("sleep 1002").is_empty(), "a late shim started it");
    assert!(container_dirs(&env).is_empty(), "bundle removed");

    // The pod still works.
    let ok = create(&env, &pod, sh_config(&env, "after", "exec sleep 1003"))
        .await
        .expect("create after recovery");
    start(&env, &ok).await;
    assert_eq!(
        status(&env, &ok).await.expect("status").state,
        cri::ContainerState::ContainerRunning as i32
    );
    remove_pod(&env, &pod.0).await;
    wait_no_process("sleep 1003").await;
    assert_clean(&env);
}

fn ns_to_time(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).expect("positive"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_stop_keeps_each_containers_real_fate() {
    let mut env = env_with_shim(None).await;
    let pod = run_pod(&env, "stopping").await;
    // Exits with 7 a second after SIGTERM, while berthd is dead.
    let slow = create(
        &env,
        &pod,
        sh_config(
            &env,
            "slow",
            "trap 'sleep 1; exit 7' TERM; while true; do sleep 0.1; done",
        ),
    )
    .await
    .expect("create");
    // Ignores SIGTERM: still running after the restart, until stopped again.
    let stubborn = create(
        &env,
        &pod,
        sh_config(&env, "stubborn", "trap '' TERM; exec sleep 1004"),
    )
    .await
    .expect("create");
    start(&env, &slow).await;
    start(&env, &stubborn).await;
    // Let the shells install their traps.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut stops = Vec::new();
    for id in [&slow, &stubborn] {
        let channel = env.d.channel().await.expect("channel");
        let id = id.clone();
        stops.push(tokio::spawn(async move {
            cri::runtime_service_client::RuntimeServiceClient::new(channel)
                .stop_container(cri::StopContainerRequest {
                    container_id: id,
                    timeout: 30,
                })
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = SystemTime::now();
    env.d.kill9().await.expect("kill berthd");
    for s in stops {
        assert!(s.await.expect("task").is_err(), "stop cannot finish");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.d.restart().await.expect("restart");

    let s = status(&env, &slow).await.expect("status");
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert_eq!(s.exit_code, 7, "{s:?}");
    assert_eq!(s.reason, "Error");
    let finished = ns_to_time(s.finished_at);
    assert!(
        finished > killed_at && finished < SystemTime::now(),
        "finished while berthd was dead: {s:?}"
    );

    let s = status(&env, &stubborn).await.expect("status");
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: stubborn.clone(),
        timeout: 1,
    })
    .await
    .expect("stop again");
    let s = status(&env, &stubborn).await.expect("status");
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert_eq!(s.exit_code, 137, "{s:?}");

    remove_pod(&env, &pod.0).await;
    wait_no_process("sleep 1004").await;
    assert_clean(&env);
}

fn vm_rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn shim_rss_within_budget_through_berthd() {
    const BUDGET_KB: u64 = 2048;
    let env = env_with_shim(Some(release_shim())).await;
    let pod = run_pod(&env, "rss").await;
    let mut ids = Vec::new();
    for name in ["rss-a", "rss-b"] {
        let id = create(
            &env,
            &pod,
            sh_config(&env, name, "echo hi; exec sleep 1005"),
        )
        .await
        .expect("create");
        start(&env, &id).await;
        ids.push(id);
    }
    // Serve a few requests as kubelet would (status, exec), then leave the shims idle.
    let mut rt = env.d.runtime().await.expect("client");
    for id in &ids {
        let r = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                timeout: 10,
            })
            .await
            .expect("exec")
            .into_inner();
        assert_eq!(r.exit_code, 0);
        status(&env, id).await.expect("status");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for id in &ids {
        let pid: i32 =
            std::fs::read_to_string(env.d.state().join("containers").join(id).join("shim.pid"))
                .expect("shim pid")
                .trim()
                .parse()
                .expect("pid");
        let rss = vm_rss_kb(pid);
        eprintln!("shim of {id}: idle VmRSS {rss} kB");
        assert!(
            rss <= BUDGET_KB,
            "idle shim VmRSS {rss} kB > {BUDGET_KB} kB"
        );
    }
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
