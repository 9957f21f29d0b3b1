//! Container and pod stats, and the container event stream, against a real berthd: real
//! cgroups, real overlay writable layers, real shims.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::cri;
use crictl_tests::pods::{
    self, Env, assert_clean, create, env, remove_pod, run_pod_with, sh_config, start,
};
use tonic::Code;

fn pod_config(env: &Env, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        labels: [("pod".to_owned(), name.to_owned())].into(),
        annotations: [("note".to_owned(), format!("about {name}"))].into(),
        ..pods::pod_config(env, name)
    }
}

fn ctr_config(env: &Env, name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        annotations: [("a".to_owned(), format!("ann-{name}"))].into(),
        ..sh_config(env, name, script)
    }
}

async fn run_pod(env: &Env, name: &str) -> (String, cri::PodSandboxConfig) {
    run_pod_with(env, pod_config(env, name)).await
}

async fn run(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> String {
    let id = create(env, pod, cfg).await.expect("create");
    start(env, &id).await;
    id
}

async fn stats(env: &Env, id: &str) -> cri::ContainerStats {
    let mut rt = env.d.runtime().await.expect("client");
    rt.container_stats(cri::ContainerStatsRequest {
        container_id: id.into(),
    })
    .await
    .expect("container stats")
    .into_inner()
    .stats
    .expect("stats")
}

async fn list_stats(env: &Env, filter: cri::ContainerStatsFilter) -> Vec<String> {
    let mut rt = env.d.runtime().await.expect("client");
    let mut ids: Vec<String> = rt
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(filter),
        })
        .await
        .expect("list container stats")
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.expect("attributes").id)
        .collect();
    ids.sort();
    ids
}

async fn pod_stats(env: &Env, id: &str) -> Result<cri::PodSandboxStats, tonic::Status> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().stats.expect("stats"))
}

async fn list_pod_stats(env: &Env, filter: cri::PodSandboxStatsFilter) -> Vec<String> {
    let mut rt = env.d.runtime().await.expect("client");
    let mut ids: Vec<String> = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(filter),
        })
        .await
        .expect("list pod stats")
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.expect("attributes").id)
        .collect();
    ids.sort();
    ids
}

fn rootfs(env: &Env, id: &str) -> PathBuf {
    env.d.state().join("containers").join(id).join("rootfs")
}

/// Waits for `path` (written by the container into its own rootfs) to appear.
async fn wait_for_file(env: &Env, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear\n{}",
            path.display(),
            env.d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn v(x: &Option<cri::UInt64Value>) -> u64 {
    x.as_ref().expect("value set").value
}

/// A container that waits for `/tmp/go`, then puts 30 MiB into its tmpfs /dev/shm (charged to
/// its memory cgroup) and 5 MB into its rootfs, and says so with `/tmp/done`.
const FILLER: &str = "while [ ! -e /tmp/go ]; do sleep 0.05; done; \
    head -c 31457280 /dev/zero > /dev/shm/fill; \
    head -c 5000000 /dev/zero > /tmp/big; \
    touch /tmp/done; sleep 1000";

#[tokio::test(flavor = "multi_thread")]
async fn container_stats_follow_memory_cpu_and_the_writable_layer() {
    let env = env().await;
    let pod = run_pod(&env, "measured").await;
    let mut cfg = ctr_config(&env, "filler", FILLER);
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let filler = run(&env, &pod, cfg).await;
    let busy = run(&env, &pod, ctr_config(&env, "busy", "while :; do :; done")).await;

    // Before: small, and the attributes are the container's.
    let before = stats(&env, &filler).await;
    let attrs = before.attributes.as_ref().expect("attributes");
    assert_eq!(attrs.id, filler);
    assert_eq!(attrs.metadata.as_ref().expect("metadata").name, "filler");
    assert_eq!(attrs.labels["c"], "filler");
    assert_eq!(attrs.annotations["a"], "ann-filler");
    let mem = before.memory.as_ref().expect("memory stats");
    assert!(mem.timestamp > 0);
    let ws_before = v(&mem.working_set_bytes);
    assert!(v(&mem.usage_bytes) >= ws_before);
    assert_eq!(v(&mem.available_bytes), (128 << 20) - ws_before);
    let layer = before.writable_layer.as_ref().expect("writable layer");
    let mountpoint = &layer.fs_id.as_ref().expect("fs id").mountpoint;
    assert!(
        Path::new(mountpoint).starts_with(env.d.root()),
        "writable layer on the image filesystem: {mountpoint}"
    );
    let (bytes_before, inodes_before) = (v(&layer.used_bytes), v(&layer.inodes_used));

    std::fs::write(rootfs(&env, &filler).join("tmp/go"), b"").expect("trigger");
    wait_for_file(&env, &rootfs(&env, &filler).join("tmp/done")).await;

    let after = stats(&env, &filler).await;
    let mem = after.memory.as_ref().expect("memory stats");
    let ws_after = v(&mem.working_set_bytes);
    assert!(
        ws_after >= ws_before + (25 << 20),
        "working set grew by 30 MiB: {ws_before} -> {ws_after}"
    );
    assert!(v(&mem.usage_bytes) >= ws_after);
    assert_eq!(v(&mem.available_bytes), (128 << 20) - ws_after);
    assert!(
        mem.page_faults.is_some() && mem.major_page_faults.is_some() && mem.rss_bytes.is_some()
    );
    let layer = after.writable_layer.as_ref().expect("writable layer");
    assert!(
        v(&layer.used_bytes) >= bytes_before + 5_000_000,
        "writable layer grew by 5 MB: {bytes_before} -> {}",
        v(&layer.used_bytes)
    );
    assert!(v(&layer.inodes_used) >= inodes_before + 3, "go, big, done");

    // CPU: cumulative time grows; the rate needs a previous sample of this container.
    let first = stats(&env, &busy).await.cpu.expect("cpu stats");
    assert!(first.timestamp > 0);
    assert!(
        first.usage_nano_cores.is_none(),
        "no rate on the first sample"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = stats(&env, &busy).await.cpu.expect("cpu stats");
    let (u1, u2) = (
        v(&first.usage_core_nano_seconds),
        v(&second.usage_core_nano_seconds),
    );
    assert!(u2 > u1 + 100_000_000, "a busy loop used CPU: {u1} -> {u2}");
    let rate = v(&second.usage_nano_cores);
    assert!(
        (100_000_000..=2_100_000_000).contains(&rate),
        "a busy loop runs at up to a core: {rate} nanocores"
    );

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_stats_list_filters_and_unknown_ids() {
    let env = env().await;
    let a = run_pod(&env, "alpha").await;
    let b = run_pod(&env, "beta").await;
    // Three processes (sh and two sleeps) plus one, plus berth's pod init: the pod shares one
    // PID namespace (the CRI default), whose PID 1 lives in the pod cgroup, as a pause
    // container does under containerd.
    let three = run(
        &env,
        &a,
        ctr_config(&env, "three", "sleep 1000 & sleep 1000 & wait"),
    )
    .await;
    let one = run(&env, &a, ctr_config(&env, "one", "exec sleep 1000")).await;
    let other = run(&env, &b, ctr_config(&env, "other", "exec sleep 1000")).await;
    // Created, never started: listed too, like ListContainers does.
    let idle = create(&env, &b, ctr_config(&env, "idle", "true"))
        .await
        .expect("create");

    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = pod_stats(&env, &a.0).await.expect("pod stats");
        let linux = s.linux.as_ref().expect("linux");
        let count = v(&linux.process.as_ref().expect("process").process_count);
        if count == 5 {
            break s;
        }
        assert!(Instant::now() < deadline, "process count {count}, not 5");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let attrs = s.attributes.as_ref().expect("attributes");
    assert_eq!(attrs.id, a.0);
    assert_eq!(attrs.metadata.as_ref().expect("metadata").name, "alpha");
    assert_eq!(attrs.labels["pod"], "alpha");
    assert_eq!(attrs.annotations["note"], "about alpha");
    let linux = s.linux.as_ref().expect("linux");
    let cpu = linux.cpu.as_ref().expect("pod cpu");
    assert!(v(&cpu.usage_core_nano_seconds) > 0);
    let mem = linux.memory.as_ref().expect("pod memory");
    assert!(v(&mem.working_set_bytes) > 0);
    assert!(linux.network.is_none(), "no pod network yet");
    let mut ids: Vec<&str> = linux
        .containers
        .iter()
        .map(|c| c.attributes.as_ref().expect("attributes").id.as_str())
        .collect();
    ids.sort();
    let mut want = vec![three.as_str(), one.as_str()];
    want.sort();
    assert_eq!(ids, want);
    // The pod cgroup holds its containers: their memory is part of the pod's.
    let containers_ws: u64 = linux
        .containers
        .iter()
        .map(|c| v(&c.memory.as_ref().expect("memory").working_set_bytes))
        .sum();
    assert!(v(&mem.working_set_bytes) + (1 << 20) >= containers_ws);

    let mut all = vec![three.clone(), one.clone(), other.clone(), idle.clone()];
    all.sort();
    assert_eq!(list_stats(&env, Default::default()).await, all);
    let by = |f: cri::ContainerStatsFilter| list_stats(&env, f);
    assert_eq!(
        by(cri::ContainerStatsFilter {
            id: one[..12].to_owned(),
            ..Default::default()
        })
        .await,
        vec![one.clone()]
    );
    let mut in_b = vec![other.clone(), idle.clone()];
    in_b.sort();
    assert_eq!(
        by(cri::ContainerStatsFilter {
            pod_sandbox_id: b.0.clone(),
            ..Default::default()
        })
        .await,
        in_b
    );
    assert_eq!(
        by(cri::ContainerStatsFilter {
            pod_sandbox_id: b.0.clone(),
            label_selector: [("c".to_owned(), "other".to_owned())].into(),
            ..Default::default()
        })
        .await,
        vec![other.clone()]
    );
    assert!(
        by(cri::ContainerStatsFilter {
            label_selector: [("c".to_owned(), "nobody".to_owned())].into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    let idle_stats = stats(&env, &idle).await;
    assert!(idle_stats.writable_layer.is_some());

    let mut pods = vec![a.0.clone(), b.0.clone()];
    pods.sort();
    assert_eq!(list_pod_stats(&env, Default::default()).await, pods);
    assert_eq!(
        list_pod_stats(
            &env,
            cri::PodSandboxStatsFilter {
                id: b.0[..10].to_owned(),
                ..Default::default()
            }
        )
        .await,
        vec![b.0.clone()]
    );
    assert_eq!(
        list_pod_stats(
            &env,
            cri::PodSandboxStatsFilter {
                label_selector: [("pod".to_owned(), "alpha".to_owned())].into(),
                ..Default::default()
            }
        )
        .await,
        vec![a.0.clone()]
    );

    let unknown = "0".repeat(64);
    let mut rt = env.d.runtime().await.expect("client");
    let err = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: unknown.clone(),
        })
        .await
        .expect_err("unknown container");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = pod_stats(&env, &unknown).await.expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A stopped pod has nothing to measure and is not listed.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: b.0.clone(),
    })
    .await
    .expect("stop pod");
    let err = pod_stats(&env, &b.0).await.expect_err("stopped pod");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        list_pod_stats(&env, Default::default()).await,
        vec![a.0.clone()]
    );
    // Its stopped container still has a writable layer, but no CPU or memory.
    let stopped = stats(&env, &other).await;
    assert!(
        stopped.cpu.is_none() && stopped.memory.is_none(),
        "{stopped:?}"
    );
    assert!(stopped.writable_layer.is_some());

    remove_pod(&env, &a.0).await;
    remove_pod(&env, &b.0).await;
    assert_clean(&env);
}

type Events = tonic::Streaming<cri::ContainerEventResponse>;

async fn subscribe(env: &Env) -> Events {
    let mut rt = env.d.runtime().await.expect("client");
    rt.get_container_events(cri::GetEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner()
}

async fn next_event(env: &Env, events: &mut Events) -> cri::ContainerEventResponse {
    tokio::time::timeout(Duration::from_secs(30), events.message())
        .await
        .unwrap_or_else(|_| panic!("no event within 30 s\n{}", env.d.log()))
        .expect("event stream")
        .expect("stream open")
}

fn kind(e: &cri::ContainerEventResponse) -> cri::ContainerEventType {
    cri::ContainerEventType::try_from(e.container_event_type).expect("event type")
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_in_order_for_a_pod_whose_container_exits_by_itself() {
    use cri::ContainerEventType::*;
    let env = env().await;
    let mut events = subscribe(&env).await;
    let pod = run_pod(&env, "eventful").await;
    let id = run(&env, &pod, ctr_config(&env, "brief", "sleep 1; exit 3")).await;

    let mut got = Vec::new();
    // The stop is learned without anyone asking for the container's status.
    while got.len() < 5 {
        got.push(next_event(&env, &mut events).await);
    }
    let mut rt = env.d.runtime().await.expect("client");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("remove");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.0.clone(),
    })
    .await
    .expect("stop pod");
    remove_pod(&env, &pod.0).await;
    while got.len() < 8 {
        got.push(next_event(&env, &mut events).await);
    }

    let seen: Vec<(String, cri::ContainerEventType)> = got
        .iter()
        .map(|e| (e.container_id.clone(), kind(e)))
        .collect();
    let p = pod.0.clone();
    assert_eq!(
        seen,
        vec![
            (p.clone(), ContainerCreatedEvent),
            (p.clone(), ContainerStartedEvent),
            (id.clone(), ContainerCreatedEvent),
            (id.clone(), ContainerStartedEvent),
            (id.clone(), ContainerStoppedEvent),
            (id.clone(), ContainerDeletedEvent),
            (p.clone(), ContainerStoppedEvent),
            (p.clone(), ContainerDeletedEvent),
        ]
    );
    for w in got.windows(2) {
        assert!(w[0].created_at <= w[1].created_at, "times in order");
    }
    for e in &got {
        let s = e
            .pod_sandbox_status
            .as_ref()
            .expect("pod status in every event");
        assert_eq!(s.id, p);
        assert_eq!(s.metadata.as_ref().expect("metadata").uid, "uid-eventful");
    }
    let ready = cri::PodSandboxState::SandboxReady as i32;
    let not_ready = cri::PodSandboxState::SandboxNotready as i32;
    let pod_states: Vec<i32> = got
        .iter()
        .map(|e| e.pod_sandbox_status.as_ref().expect("status").state)
        .collect();
    assert_eq!(
        pod_states,
        vec![
            ready, ready, ready, ready, ready, ready, not_ready, not_ready
        ]
    );
    // Each container event carries the pod's containers as they were then.
    let state_of = |e: &cri::ContainerEventResponse| {
        e.containers_statuses
            .iter()
            .find(|c| c.id == id)
            .map(|c| (c.state, c.exit_code))
    };
    assert!(got[0].containers_statuses.is_empty());
    assert_eq!(
        state_of(&got[2]),
        Some((cri::ContainerState::ContainerCreated as i32, 0))
    );
    assert_eq!(
        state_of(&got[3]).map(|s| s.0),
        Some(cri::ContainerState::ContainerRunning as i32)
    );
    assert_eq!(
        state_of(&got[4]),
        Some((cri::ContainerState::ContainerExited as i32, 3))
    );
    assert_eq!(state_of(&got[5]), None, "deleted");
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_containers_are_reported_once_and_shutdown_ends_streams() {
    use cri::ContainerEventType::*;
    let mut env = env().await;
    let pod = run_pod(&env, "stopping").await;
    let mut events = subscribe(&env).await;
    let a = run(&env, &pod, ctr_config(&env, "a", "exec sleep 1000")).await;
    let b = run(&env, &pod, ctr_config(&env, "b", "exec sleep 1000")).await;
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: a.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    // Again: nothing new to report.
    rt.stop_container(cri::StopContainerRequest {
        container_id: a.clone(),
        timeout: 0,
    })
    .await
    .expect("stop again");
    // Removing the pod stops it first: b's stop, then the pod's, then the deletions.
    remove_pod(&env, &pod.0).await;
    let mut seen = Vec::new();
    while seen.len() < 9 {
        let e = next_event(&env, &mut events).await;
        seen.push((e.container_id.clone(), kind(&e)));
    }
    let p = pod.0.clone();
    let mut deletions = seen[7..].to_vec();
    deletions.sort();
    let mut want_deletions = vec![
        (a.clone(), ContainerDeletedEvent),
        (b.clone(), ContainerDeletedEvent),
    ];
    want_deletions.sort();
    assert_eq!(
        seen[..7].to_vec(),
        vec![
            (a.clone(), ContainerCreatedEvent),
            (a.clone(), ContainerStartedEvent),
            (b.clone(), ContainerCreatedEvent),
            (b.clone(), ContainerStartedEvent),
            (a.clone(), ContainerStoppedEvent),
            (b.clone(), ContainerStoppedEvent),
            (p.clone(), ContainerStoppedEvent),
        ]
    );
    assert_eq!(deletions, want_deletions);
    let last = next_event(&env, &mut events).await;
    assert_eq!(
        (last.container_id.clone(), kind(&last)),
        (p, ContainerDeletedEvent)
    );
    assert_clean(&env);

    // A daemon with an open event stream still stops, and the stream ends.
    env.d
        .stop()
        .await
        .expect("berthd stops with an open event stream");
    let end = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("stream ended");
    assert!(!matches!(end, Ok(Some(_))), "no more events: {end:?}");
}

/// Removes a test's own cgroup tree, also when the test fails (declared before the daemon, it
/// is dropped after it).
struct CgroupTree(String);

impl Drop for CgroupTree {
    fn drop(&mut self) {
        crictl_tests::daemon::remove_cgroup_tree(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_stats_sum_containers_under_a_cgroup_parent_kubelet_chose() {
    let parent = format!("berth-stats-test-{}", std::process::id());
    let _tree = CgroupTree(parent.clone());
    let env = env().await;
    let mut cfg = pod_config(&env, "kubelets");
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: format!("/{parent}/pod1"),
        ..Default::default()
    });
    let mut rt = env.d.runtime().await.expect("client");
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    let pod = (id, cfg);
    let x = run(&env, &pod, ctr_config(&env, "x", "exec sleep 1000")).await;
    let y = run(&env, &pod, ctr_config(&env, "y", "sleep 1000 & wait")).await;
    assert!(
        Path::new("/sys/fs/cgroup/memory")
            .join(&parent)
            .join("pod1")
            .join(&x)
            .is_dir(),
        "the container lives under the given parent"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let linux = loop {
        let s = pod_stats(&env, &pod.0).await.expect("pod stats");
        let linux = s.linux.expect("linux");
        if v(&linux.process.as_ref().expect("process").process_count) == 3 {
            break linux;
        }
        assert!(Instant::now() < deadline, "process count: {linux:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(linux.containers.len(), 2);
    let sum = |f: &dyn Fn(&cri::ContainerStats) -> u64| linux.containers.iter().map(f).sum::<u64>();
    let mem = linux.memory.as_ref().expect("memory");
    assert_eq!(
        v(&mem.working_set_bytes),
        sum(&|c| v(&c.memory.as_ref().expect("memory").working_set_bytes))
    );
    assert_eq!(
        v(&mem.usage_bytes),
        sum(&|c| v(&c.memory.as_ref().expect("memory").usage_bytes))
    );
    assert!(
        mem.available_bytes.is_none(),
        "no pod limit from container limits"
    );
    assert_eq!(
        v(&linux.cpu.as_ref().expect("cpu").usage_core_nano_seconds),
        sum(&|c| v(&c.cpu.as_ref().expect("cpu").usage_core_nano_seconds))
    );
    let _ = y;
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exit_after_a_berthd_crash_is_reported_by_the_new_daemon() {
    let mut env = env().await;
    let pod = run_pod(&env, "survivor").await;
    let script = "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7";
    let id = run(&env, &pod, ctr_config(&env, "outliver", script)).await;
    env.d.kill9().await.expect("kill berthd");
    env.d.restart().await.expect("restart berthd");
    let mut events = subscribe(&env).await;
    std::fs::write(rootfs(&env, &id).join("tmp/go"), b"").expect("trigger");
    let e = next_event(&env, &mut events).await;
    assert_eq!(
        (e.container_id.as_str(), kind(&e)),
        (id.as_str(), cri::ContainerEventType::ContainerStoppedEvent)
    );
    let me = e
        .containers_statuses
        .iter()
        .find(|c| c.id == id)
        .expect("its status");
    assert_eq!(
        (me.state, me.exit_code),
        (cri::ContainerState::ContainerExited as i32, 7)
    );
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
