//! Pod-level PID namespaces (pod PID mode POD) end to end: the pod's init (`berth-shim
//! pod-init`) is PID 1 of a namespace every container of the pod joins, reaps what the
//! namespace orphans, survives berthd restarts and crashes, and is gone with its pin once the
//! pod is stopped and removed. Also the pod cgroup's limits (resources + overhead).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::cri;
use crictl_tests::daemon::{Daemon, bin_dir, require_root};
use crictl_tests::pods::{
    self, Env, assert_clean, create, env, mounts_under, pid_mode, read_cri_log, remove_pod,
    run_pod_with, sh_config, start, status,
};
use tonic::Code;

const MIB: i64 = 1024 * 1024;
/// The init's RSS budget for the debug build the tests run (the release build measures
/// ~0.75 MiB; the debug one ~1.1 MiB).
const INIT_RSS_BUDGET_KB: u64 = 2048;

fn ns_options(pid: cri::NamespaceMode) -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        pid: pid as i32,
        ..Default::default()
    })
}

fn pod_config(env: &Env, name: &str, pid: cri::NamespaceMode) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        linux: pid_mode(pid),
        ..pods::pod_config(env, name)
    }
}

/// A container running `script` under `/bin/sh -c` as root, in PID mode `pid` (kubelet gives
/// containers the pod's mode).
fn ctr_config(
    env: &Env,
    name: &str,
    script: &str,
    pid: cri::NamespaceMode,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: ns_options(pid),
                run_as_user: Some(cri::Int64Value { value: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..sh_config(env, name, script)
    }
}

async fn wait_state(env: &Env, id: &str, want: cri::ContainerState) -> cri::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(env, id).await.expect("status");
        if s.state == want as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} never reached {want:?}: {s:?}\n{}",
            env.d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates, starts and waits for a container that runs `script`; returns its stdout.
async fn run_to_end(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    name: &str,
    script: &str,
    pid: cri::NamespaceMode,
) -> String {
    let id = create(env, pod, ctr_config(env, name, script, pid))
        .await
        .expect("create");
    start(env, &id).await;
    let s = wait_state(env, &id, cri::ContainerState::ContainerExited).await;
    let (out, err) = read_cri_log(&env.logs.path().join(format!("{name}.log")));
    assert_eq!(s.exit_code, 0, "{name} failed: {out}{err}");
    out
}

/// Starts a container that sleeps with a recognisable command line; returns its id.
async fn start_sleeper(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    pid: cri::NamespaceMode,
) -> String {
    let id = create(env, pod, ctr_config(env, "sleeper", "exec sleep 4242", pid))
        .await
        .expect("create sleeper");
    start(env, &id).await;
    wait_state(env, &id, cri::ContainerState::ContainerRunning).await;
    id
}

/// What a container prints about its PID namespace: PID 1's command line and every process.
const LOOK: &str = "echo \"pid1=$(cat /proc/1/cmdline | xargs -0 echo)\"; ps";

fn pidfile(d: &Daemon, pod: &str) -> PathBuf {
    d.state().join("ns").join(pod).join("init.pid")
}

fn init_pid(d: &Daemon, pod: &str) -> i32 {
    std::fs::read_to_string(pidfile(d, pod))
        .expect("init pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// Pids of live pod inits whose pid file lies under this daemon's state dir (the real shim's:
/// not a test's wrapper script running it).
fn inits_of(d: &Daemon) -> Vec<i32> {
    let ns = d.state().join("ns");
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            let args: Vec<&str> = cmd.split('\0').collect();
            (args.len() >= 4
                && args[0].ends_with("/berth-shim")
                && args[1] == "pod-init"
                && Path::new(args[3]).starts_with(&ns))
            .then_some(pid)
        })
        .collect()
}

fn proc_status(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

async fn pod_state(env_d: &Daemon, id: &str) -> i32 {
    let mut rt = env_d.runtime().await.expect("client");
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .expect("pod status")
    .into_inner()
    .status
    .expect("status")
    .state
}

async fn stop_pod(d: &Daemon, id: &str) {
    let mut rt = d.runtime().await.expect("client");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("stop pod");
}

/// Nothing of the pod's PID namespace is left: no init, no pin, no namespace dir.
fn assert_no_pid_ns_left(d: &Daemon, pod: &str) {
    assert!(inits_of(d).is_empty(), "inits left: {:?}", inits_of(d));
    let ns_dir = d.state().join("ns").join(pod);
    assert!(!ns_dir.exists(), "{} left", ns_dir.display());
    assert!(
        mounts_under(&d.state()).is_empty(),
        "mounts left: {:?}",
        mounts_under(&d.state())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_of_a_pod_share_its_pid_namespace_and_pid_1_is_our_init() {
    let env = env().await;
    let pod = run_pod_with(&env, pod_config(&env, "shared", cri::NamespaceMode::Pod)).await;
    let init = init_pid(&env.d, &pod.0);

    // The init as the host sees it: PID 1 of its own namespace, its own session, detached from
    // berthd, holding nothing but /dev/null, small, in the pod cgroup berth owns.
    let nspid = proc_status(init, "NSpid:");
    assert!(nspid.ends_with("\t1"), "NSpid {nspid:?}");
    assert_ne!(
        proc_status(init, "PPid:"),
        env.d.pid().expect("berthd").to_string(),
        "the init must not be berthd's child"
    );
    let stat = std::fs::read_to_string(format!("/proc/{init}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], init.to_string(), "session id: {stat}");
    for fd in std::fs::read_dir(format!("/proc/{init}/fd"))
        .expect("fds")
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).expect("fd link");
        assert_eq!(target, Path::new("/dev/null"), "fd {:?}", fd.file_name());
    }
    let rss: u64 = proc_status(init, "VmRSS:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("rss");
    assert!(rss <= INIT_RSS_BUDGET_KB, "init VmRSS {rss} kB");
    let cgroup = std::fs::read_to_string(format!("/proc/{init}/cgroup")).expect("cgroup");
    assert!(
        cgroup
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&format!("/berth/{}", pod.0))),
        "init not in the pod's memory cgroup: {cgroup}"
    );
    // Mounts nothing: same mount namespace as the host (and berthd).
    assert_eq!(
        std::fs::read_link(format!("/proc/{init}/ns/mnt")).expect("mnt ns"),
        std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns")
    );

    let sleeper = start_sleeper(&env, &pod, cri::NamespaceMode::Pod).await;
    let out = run_to_end(&env, &pod, "looker", LOOK, cri::NamespaceMode::Pod).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("pid1=") && l.contains("pod-init --pidfile")),
        "PID 1 is not the pod's init:\n{out}"
    );
    assert!(
        out.contains("sleep 4242"),
        "the other container's process is not visible:\n{out}"
    );

    // Signals a PID 1 should ignore leave the init alive; the namespace keeps working.
    for sig in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), sig).expect("signal");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(inits_of(&env.d), vec![init]);
    assert_eq!(
        status(&env, &sleeper).await.expect("status").state,
        cri::ContainerState::ContainerRunning as i32
    );

    stop_pod(&env.d, &pod.0).await;
    assert!(inits_of(&env.d).is_empty(), "stop leaves the init");
    assert!(
        pidfile(&env.d, &pod.0).with_file_name("pid").exists(),
        "stop keeps the pin until remove"
    );
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_mode_pod_has_no_init_and_containers_see_only_themselves() {
    let env = env().await;
    let pod = run_pod_with(
        &env,
        pod_config(&env, "apart", cri::NamespaceMode::Container),
    )
    .await;
    assert!(
        !pidfile(&env.d, &pod.0).exists(),
        "no init for a CONTAINER-mode pod"
    );
    assert!(inits_of(&env.d).is_empty());
    start_sleeper(&env, &pod, cri::NamespaceMode::Container).await;
    let out = run_to_end(&env, &pod, "looker", LOOK, cri::NamespaceMode::Container).await;
    assert!(
        !out.contains("sleep 4242"),
        "sees another container:\n{out}"
    );
    assert!(!out.contains("pod-init"), "sees an init:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("pid1=/bin/sh -c")),
        "PID 1 is not the container's own process:\n{out}"
    );
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_reaps_what_the_namespace_orphans() {
    let env = env().await;
    let pod = run_pod_with(&env, pod_config(&env, "reaper", cri::NamespaceMode::Pod)).await;
    // The inner shell exits at once, orphaning its sleep: the kernel hands it to PID 1.
    let script = "echo \"pid1=$(cat /proc/1/cmdline | xargs -0 echo)\"; \
                  o=$(sh -c 'sleep 3 >/dev/null 2>&1 & echo $!'); sleep 1; \
                  echo \"during $(cat /proc/$o/stat)\"; sleep 4; \
                  if [ -e /proc/$o ]; then echo \"after $(cat /proc/$o/stat)\"; \
                  else echo reaped; fi; cat /proc/[0-9]*/stat";
    let out = run_to_end(&env, &pod, "orphaner", script, cri::NamespaceMode::Pod).await;
    let during = out
        .lines()
        .find_map(|l| l.strip_prefix("during "))
        .expect("during line");
    let fields: Vec<&str> = during
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[1], "1", "the orphan's parent is not PID 1: {during}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("pid1=") && l.contains("pod-init")),
        "PID 1, the orphan's reaper, is not the pod's init:\n{out}"
    );
    assert!(
        out.lines().any(|l| l == "reaped"),
        "orphan not reaped:\n{out}"
    );
    for line in out.lines().filter(|l| l.contains(") ")) {
        let state = line.rsplit_once(')').expect("stat").1.trim_start();
        assert!(!state.starts_with('Z'), "zombie: {line}");
    }
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pid_namespace_survives_berthd_restart_and_crash() {
    let mut env = env().await;
    let pod = run_pod_with(&env, pod_config(&env, "durable", cri::NamespaceMode::Pod)).await;
    let init = init_pid(&env.d, &pod.0);
    start_sleeper(&env, &pod, cri::NamespaceMode::Pod).await;

    env.d.restart().await.expect("restart");
    assert_eq!(inits_of(&env.d), vec![init], "restart touched the init");
    assert_eq!(
        pod_state(&env.d, &pod.0).await,
        cri::PodSandboxState::SandboxReady as i32
    );
    let out = run_to_end(&env, &pod, "after-restart", LOOK, cri::NamespaceMode::Pod).await;
    assert!(
        out.contains("sleep 4242") && out.contains("pod-init"),
        "{out}"
    );

    env.d.kill9().await.expect("kill -9");
    env.d.restart().await.expect("start after crash");
    assert_eq!(inits_of(&env.d), vec![init], "a crash touched the init");
    assert_eq!(
        pod_state(&env.d, &pod.0).await,
        cri::PodSandboxState::SandboxReady as i32
    );
    let out = run_to_end(&env, &pod, "after-crash", LOOK, cri::NamespaceMode::Pod).await;
    assert!(
        out.contains("sleep 4242") && out.contains("pod-init"),
        "{out}"
    );

    // Stop and remove after the restarts still find and end the init, then unpin.
    stop_pod(&env.d, &pod.0).await;
    assert!(inits_of(&env.d).is_empty(), "stop leaves the init");
    assert_eq!(
        pod_state(&env.d, &pod.0).await,
        cri::PodSandboxState::SandboxNotready as i32
    );
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_init_makes_the_pod_not_ready_and_refuses_containers() {
    let env = env().await;
    let pod = run_pod_with(&env, pod_config(&env, "orphaned", cri::NamespaceMode::Pod)).await;
    let init = init_pid(&env.d, &pod.0);
    let sleeper = start_sleeper(&env, &pod, cri::NamespaceMode::Pod).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the init");
    // The kernel ends the namespace with its init: the container's process dies too.
    wait_state(&env, &sleeper, cri::ContainerState::ContainerExited).await;
    assert_eq!(
        pod_state(&env.d, &pod.0).await,
        cri::PodSandboxState::SandboxNotready as i32
    );
    let mut rt = env.d.runtime().await.expect("client");
    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].state,
        cri::PodSandboxState::SandboxNotready as i32
    );

    let err = create(
        &env,
        &pod,
        ctr_config(&env, "late", "true", cri::NamespaceMode::Pod),
    )
    .await
    .expect_err("a container cannot join a dead PID namespace");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("init of its PID namespace")
            && err.message().contains(&init.to_string()),
        "unclear error: {}",
        err.message()
    );

    stop_pod(&env.d, &pod.0).await;
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_limits_are_resources_plus_overhead_in_the_pod_cgroup() {
    let env = env().await;
    let mut cfg = pod_config(&env, "sized", cri::NamespaceMode::Pod);
    let linux = cfg.linux.as_mut().expect("linux");
    linux.resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 96 * MIB,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        cpu_shares: 512,
        ..Default::default()
    });
    linux.overhead = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 32 * MIB,
        cpu_quota: 10_000,
        cpu_period: 100_000,
        cpu_shares: 100,
        ..Default::default()
    });
    let pod = run_pod_with(&env, cfg).await;
    let file = |controller: &str, name: &str| {
        let p = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("berth")
            .join(&pod.0)
            .join(name);
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_owned()
    };
    assert_eq!(
        file("memory", "memory.limit_in_bytes"),
        (128 * MIB).to_string()
    );
    assert_eq!(file("cpu", "cpu.cfs_quota_us"), "60000");
    assert_eq!(file("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(file("cpu", "cpu.shares"), "612");
    let init = init_pid(&env.d, &pod.0);
    assert!(
        file("memory", "cgroup.procs")
            .lines()
            .any(|l| l == init.to_string()),
        "the init is not in the pod cgroup"
    );
    // A container of the pod lives below it, so the pod's limits bound it.
    let id = start_sleeper(&env, &pod, cri::NamespaceMode::Pod).await;
    let ctr_cg =
        std::fs::read_to_string(format!("/proc/{}/cgroup", container_pid(&env, &pod.0, &id)))
            .expect("ctr cgroup");
    assert!(
        ctr_cg.contains(&format!(":memory:/berth/{}/{id}", pod.0)),
        "{ctr_cg}"
    );
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

/// The host pid of a container's process, from its pod's memory cgroup.
fn container_pid(_env: &Env, pod: &str, id: &str) -> i32 {
    let procs = Path::new("/sys/fs/cgroup/memory/berth")
        .join(pod)
        .join(id)
        .join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .expect("container procs")
        .lines()
        .next()
        .expect("a process")
        .trim()
        .parse()
        .expect("pid")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubelet_cgroup_parent_is_left_alone() {
    let env = env().await;
    let parent = format!("/berth-test-kubelet-{}", std::process::id());
    let mut cfg = pod_config(&env, "kubelets", cri::NamespaceMode::Pod);
    let linux = cfg.linux.as_mut().expect("linux");
    linux.cgroup_parent = parent.clone();
    linux.resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 64 * MIB,
        ..Default::default()
    });
    let pod = run_pod_with(&env, cfg).await;
    let init = init_pid(&env.d, &pod.0);
    let mem = Path::new("/sys/fs/cgroup/memory");
    assert!(
        !mem.join(parent.trim_start_matches('/')).exists(),
        "berth wrote into kubelet's cgroup"
    );
    assert!(!mem.join("berth").join(&pod.0).exists());
    assert_eq!(inits_of(&env.d), vec![init]);
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}

/// A `berth-shim` stand-in: the first `pod-init` after `<dir>/fail` appears runs the real one
/// (so the init exists), then fails as `<dir>/fail` says: `error` exits 1, `kill` SIGKILLs
/// berthd first (a crash in the middle of RunPodSandbox). Everything else runs the real shim.
fn failing_shim(dir: &Path) -> PathBuf {
    let real = bin_dir().join("berth-shim");
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = pod-init ] && [ -e {d}/fail ]; then\n\
           mode=$(cat {d}/fail); rm -f {d}/fail\n\
           {real} \"$@\" || exit 1\n\
           if [ \"$mode\" = kill ]; then kill -9 $PPID; fi\n\
           exit 1\n\
         fi\n\
         exec {real} \"$@\"\n",
        d = dir.display(),
        real = real.display()
    );
    let path = dir.join("berth-shim");
    std::fs::write(&path, script).expect("write shim wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn bare_pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: ns_options(cri::NamespaceMode::Pod),
                ..Default::default()
            }),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 * MIB,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn list_pods(d: &Daemon) -> Vec<cri::PodSandbox> {
    let mut rt = d.runtime().await.expect("client");
    rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items
}

/// No pod cgroup of this daemon's pods is left (any id: the failed pods' ids are unknown).
fn assert_no_pod_cgroups(d: &Daemon, before: &[String]) {
    let now = pod_cgroups();
    let new: Vec<&String> = now.iter().filter(|c| !before.contains(c)).collect();
    assert!(new.is_empty(), "pod cgroups left: {new:?}\n{}", d.log());
}

fn pod_cgroups() -> Vec<String> {
    std::fs::read_dir("/sys/fs/cgroup/memory/berth")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_pod_sandbox_leaves_no_init_and_no_pin() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let d = Daemon::start_with_shim(&failing_shim(dir.path()))
        .await
        .expect("daemon");
    let before = pod_cgroups();
    std::fs::write(dir.path().join("fail"), "error").expect("arm");
    let mut rt = d.runtime().await.expect("client");
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(bare_pod_config("doomed")),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("the init's start failed");
    assert!(err.message().contains("init"), "{err:?}");
    assert!(!dir.path().join("fail").exists(), "the failure was not hit");
    assert!(inits_of(&d).is_empty(), "rollback left the init");
    assert!(
        mounts_under(&d.state()).is_empty(),
        "{:?}",
        mounts_under(&d.state())
    );
    assert!(list_pods(&d).await.is_empty());
    assert_no_pod_cgroups(&d, &before);
    // The name is free again, and a good run works.
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(bare_pod_config("doomed")),
            runtime_handler: String::new(),
        })
        .await
        .expect("run again")
        .into_inner()
        .pod_sandbox_id;
    assert_eq!(inits_of(&d).len(), 1);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("remove");
    assert_no_pid_ns_left(&d, &id);
    assert_no_pod_cgroups(&d, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_run_pod_sandbox_is_rolled_back_at_restart() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let mut d = Daemon::start_with_shim(&failing_shim(dir.path()))
        .await
        .expect("daemon");
    let before = pod_cgroups();
    std::fs::write(dir.path().join("fail"), "kill").expect("arm");
    let mut rt = d.runtime().await.expect("client");
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(bare_pod_config("crashed")),
        runtime_handler: String::new(),
    })
    .await
    .expect_err("berthd died");
    assert!(!dir.path().join("fail").exists(), "the failure was not hit");
    assert_eq!(
        inits_of(&d).len(),
        1,
        "the crash should leave an init to roll back"
    );

    d.restart().await.expect("restart");
    assert!(inits_of(&d).is_empty(), "recovery left the init");
    assert!(
        mounts_under(&d.state()).is_empty(),
        "{:?}",
        mounts_under(&d.state())
    );
    let ns = std::fs::read_dir(d.state().join("ns"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(".pool-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(ns, 0, "namespace dirs left");
    assert!(list_pods(&d).await.is_empty());
    assert_no_pod_cgroups(&d, &before);
}

/// The first of `n` consecutive pids no host process has, below the host's last pid (so the
/// host does not hand them out again before it wraps around).
fn free_host_pids(n: i32) -> i32 {
    let last: i32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .expect("ns_last_pid")
        .trim()
        .parse()
        .expect("pid");
    (300..last - 200)
        .rev()
        .find(|p| (*p..p + n).all(|q| !Path::new(&format!("/proc/{q}")).exists()))
        .expect("a free pid range")
}

/// libcontainer 0.7 looks a container's pid in a joined PID namespace up in the host's /proc
/// when it mounts cgroup v1: a pod pid the host has no process of failed creation. berth mounts
/// the container's cgroups itself then; the container sees its own limits.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_pid_unknown_to_the_host_still_gets_its_own_cgroups() {
    let env = env().await;
    let pod = run_pod_with(&env, pod_config(&env, "freepid", cri::NamespaceMode::Pod)).await;
    let pin = env.d.state().join("ns").join(&pod.0).join("pid");
    let next = free_host_pids(16);
    // The next process of the pod's namespace (the container's) gets `next`.
    let set = std::process::Command::new("nsenter")
        .arg(format!("--pid={}", pin.display()))
        .args([
            "--",
            "sh",
            "-c",
            &format!("echo {} > /proc/sys/kernel/ns_last_pid", next - 1),
        ])
        .status()
        .expect("nsenter");
    assert!(set.success(), "set the pod's ns_last_pid");

    let script = "echo pid=$$; echo limit=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes); \
                  ls /sys/fs/cgroup";
    let mut cfg = ctr_config(&env, "highpid", script, cri::NamespaceMode::Pod);
    cfg.linux.as_mut().expect("linux").resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 96 * MIB,
        ..Default::default()
    });
    let id = create(&env, &pod, cfg).await.expect("create");
    start(&env, &id).await;
    let s = wait_state(&env, &id, cri::ContainerState::ContainerExited).await;
    let (out, err) = read_cri_log(&env.logs.path().join("highpid.log"));
    assert_eq!(s.exit_code, 0, "{out}{err}");
    assert!(
        out.lines().any(|l| l == format!("pid={next}")),
        "the container did not get the pid the host lacks ({next}):\n{out}"
    );
    assert!(
        out.lines().any(|l| l == format!("limit={}", 96 * MIB)),
        "the container does not see its own memory cgroup:\n{out}"
    );
    for h in ["cpu", "memory", "pids"] {
        assert!(out.lines().any(|l| l == h), "no {h} hierarchy:\n{out}");
    }
    remove_pod(&env, &pod.0).await;
    assert_no_pid_ns_left(&env.d, &pod.0);
    assert_clean(&env);
}
