//! Hugepage limits on this host's hybrid cgroup layout: v1 controllers, and hugetlb only in the
//! cgroup2 mount at /sys/fs/cgroup/unified, where libcontainer's v1 manager does not look.
//! berthd makes each container asking for hugepage limits a cgroup there
//! (`/sys/fs/cgroup/unified/berth/<pod>/<ctr>`), writes `hugetlb.<size>.max` and moves the
//! container's init in before the user process starts.
//!
//! berthd enables `+hugetlb` in the `cgroup.subtree_control` of the mount's root (as runc does
//! on a v2 host); these tests never write it themselves, and it stays enabled afterwards.

use std::path::{Path, PathBuf};

use api::cri;
use crictl_tests::pods::{self, Env, assert_clean, create, env, remove_pod, run_pod, start};
use tonic::Code;

const MIB: u64 = 1024 * 1024;
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// Fails loudly unless this is the hybrid layout these tests are about.
fn require_hybrid_hugetlb() {
    let controllers =
        std::fs::read_to_string(Path::new(UNIFIED).join("cgroup.controllers")).unwrap_or_default();
    assert!(
        controllers.split_whitespace().any(|c| c == "hugetlb")
            && !Path::new("/sys/fs/cgroup/hugetlb").exists()
            && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        "these tests need a hybrid cgroup host with hugetlb only in {UNIFIED}"
    );
    assert!(
        Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(),
        "these tests need 2 MiB hugepages in the kernel"
    );
}

fn unified_dir(pod: &str, ctr: Option<&str>) -> PathBuf {
    let pod = Path::new(UNIFIED).join("berth").join(pod);
    match ctr {
        Some(c) => pod.join(c),
        None => pod,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The cgroup2 (`0::`) path of a process.
fn cgroup2_of(pid: i64) -> String {
    read(Path::new(&format!("/proc/{pid}/cgroup")))
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("{pid} has no cgroup2 line"))
        .to_owned()
}

fn hugepages(limits: &[(&str, u64)]) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        hugepage_limits: limits
            .iter()
            .map(|(size, limit)| cri::HugepageLimit {
                page_size: size.to_string(),
                limit: *limit,
            })
            .collect(),
        ..Default::default()
    }
}

fn ctr_config(
    env: &Env,
    name: &str,
    resources: Option<cri::LinuxContainerResources>,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: resources.map(|r| cri::LinuxContainerConfig {
            resources: Some(r),
            ..Default::default()
        }),
        ..pods::ctr_config(env, name, &["sleep", "1000"])
    }
}

/// The container's init pid (created or running), from verbose ContainerStatus.
async fn init_pid(env: &Env, id: &str) -> i64 {
    let mut rt = env.d.runtime().await.expect("client");
    let resp = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(resp.info.get("info").expect("info key")).expect("json");
    let pid = info["pid"].as_i64().expect("pid");
    assert!(pid > 0, "container {id} has an init: {info}");
    pid
}

async fn update(env: &Env, id: &str, r: cri::LinuxContainerResources) {
    let mut rt = env.d.runtime().await.expect("client");
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.into(),
        linux: Some(r),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("update {id}: {e:?}"));
}

async fn exec_stdout(env: &Env, id: &str, cmd: &[&str]) -> String {
    let mut rt = env.d.runtime().await.expect("client");
    let resp = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(
        resp.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&resp.stderr)
    );
    String::from_utf8(resp.stdout).expect("utf-8")
}

async fn remove_container(env: &Env, id: &str) {
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await
    .expect("stop");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn hugepage_limits_live_in_the_unified_cgroup() {
    let env = env().await;
    require_hybrid_hugetlb();
    let pod = run_pod(&env, "huge").await;
    // kubelet's shape: every size the node has, 0 for those the pod did not ask for.
    let cfg = ctr_config(&env, "h", Some(hugepages(&[("2MB", 4 * MIB), ("1GB", 0)])));
    let id = create(&env, &pod, cfg).await.expect("create");
    let dir = unified_dir(&pod.0, Some(&id));
    let want = format!("/berth/{}/{id}", pod.0);

    // Created, not started: the limits are set and the init is already inside.
    assert_eq!(read(&dir.join("hugetlb.2MB.max")), (4 * MIB).to_string());
    assert_eq!(read(&dir.join("hugetlb.1GB.max")), "0");
    let pid = init_pid(&env, &id).await;
    assert_eq!(cgroup2_of(pid), want, "init {pid} before start");
    assert!(
        read(&dir.join("cgroup.procs"))
            .lines()
            .any(|l| l == pid.to_string()),
        "init {pid} listed in {}",
        dir.display()
    );
    assert!(
        read(&Path::new(UNIFIED).join("cgroup.subtree_control"))
            .split_whitespace()
            .any(|c| c == "hugetlb"),
        "berthd enabled hugetlb down from the root"
    );
    assert!(
        !env.d.log().contains("hugepage limit 2MB skipped"),
        "nothing clamped"
    );

    // The user process is the init after execve: still inside.
    start(&env, &id).await;
    assert_eq!(init_pid(&env, &id).await, pid);
    assert_eq!(cgroup2_of(pid), want, "init {pid} after start");
    // An exec'd process starts inside too (the shim's exec helper joins the init's cgroup).
    let cg = exec_stdout(&env, &id, &["cat", "/proc/self/cgroup"]).await;
    assert!(
        cg.lines().any(|l| l == format!("0::{want}")),
        "exec'd process outside {want}: {cg}"
    );

    // UpdateContainerResources changes the limit, in the CRI's other spelling too.
    update(&env, &id, hugepages(&[("2Mi", 8 * MIB)])).await;
    assert_eq!(read(&dir.join("hugetlb.2MB.max")), (8 * MIB).to_string());
    assert_eq!(
        read(&dir.join("hugetlb.1GB.max")),
        "0",
        "unnamed sizes kept"
    );

    // A size the kernel lacks is clamped with a warning, not refused.
    let cfg = ctr_config(&env, "odd", Some(hugepages(&[("4MB", 4 * MIB)])));
    let odd = create(&env, &pod, cfg)
        .await
        .expect("create with an unknown size");
    assert!(!unified_dir(&pod.0, Some(&odd)).exists());
    assert!(
        env.d
            .log()
            .contains("hugepage limit 4MB skipped: the kernel has no such page size"),
        "the unknown size is logged"
    );
    remove_container(&env, &odd).await;

    remove_container(&env, &id).await;
    assert!(!dir.exists(), "the removed container's unified cgroup");
    assert!(
        unified_dir(&pod.0, None).exists(),
        "the pod's stays until the pod goes"
    );
    // remove_pod checks every hierarchy under /sys/fs/cgroup, the unified one included.
    remove_pod(&env, &pod.0).await;
    assert!(!unified_dir(&pod.0, None).exists());
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_hugepage_limits_no_unified_cgroup_until_an_update_asks() {
    let env = env().await;
    require_hybrid_hugetlb();
    let pod = run_pod(&env, "plain").await;
    let id = create(&env, &pod, ctr_config(&env, "p", None))
        .await
        .expect("create");
    start(&env, &id).await;
    assert!(
        !unified_dir(&pod.0, None).exists(),
        "no hugepage limits: no unified cgroup for the pod or the container"
    );
    let pid = init_pid(&env, &id).await;
    let want = format!("/berth/{}/{id}", pod.0);
    assert_ne!(cgroup2_of(pid), want);

    // An update that adds a limit makes the cgroup and moves the running container in.
    update(&env, &id, hugepages(&[("2MB", 2 * MIB)])).await;
    let dir = unified_dir(&pod.0, Some(&id));
    assert_eq!(read(&dir.join("hugetlb.2MB.max")), (2 * MIB).to_string());
    assert_eq!(cgroup2_of(pid), want, "init moved in by the update");

    remove_pod(&env, &pod.0).await;
    assert!(!dir.exists());
    assert_clean(&env);
}

/// Kills and reaps a helper process when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_hugetlb_setup_rolls_the_container_back() {
    let env = env().await;
    require_hybrid_hugetlb();
    let pod = run_pod(&env, "rollback").await;
    // A process in the pod's unified cgroup: the kernel then refuses to enable a controller
    // for the pod's children (cgroup2's no-internal-process rule), so the hugetlb setup fails
    // after the shim created the container.
    let pod_dir = unified_dir(&pod.0, None);
    std::fs::create_dir_all(&pod_dir).expect("pod unified cgroup");
    let squatter = Child(
        std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .expect("sleep"),
    );
    std::fs::write(pod_dir.join("cgroup.procs"), squatter.0.id().to_string())
        .expect("move into the pod's unified cgroup");

    let cfg = ctr_config(&env, "r", Some(hugepages(&[("2MB", 2 * MIB)])));
    let err = create(&env, &pod, cfg).await.expect_err("create must fail");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("cgroup.subtree_control"), "{err:?}");
    // Nothing of the container is left: no record, no shim, no cgroup in any hierarchy.
    let mut rt = env.d.runtime().await.expect("client");
    let listed = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "{listed:?}");
    let left: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("berth").join(&pod.0))
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flat_map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    assert!(left.is_empty(), "container cgroups left: {left:?}");

    drop(squatter);
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
