//! Pod and container helpers shared by the end-to-end tests: a daemon with a pulled busybox
//! image, CRI calls, CRI log parsing and leak checks.

use std::path::Path;

use api::cri;

use crate::daemon::{Daemon, require_root};
use crate::image::{self, ManifestFormat, busybox_image};
use crate::registry::Registry;

/// A daemon with berth's busybox test image pulled from its own registry.
pub struct Env {
    /// The daemon.
    pub d: Daemon,
    /// The registry the image came from.
    pub reg: Registry,
    /// The pulled image's name.
    pub image: String,
    /// Where pods put container logs.
    pub logs: tempfile::TempDir,
}

pub async fn env() -> Env {
    env_with_shim(None).await
}

/// As [`env`], with berthd running `shim` as its `--shim` binary.
pub async fn env_with_shim(shim: Option<std::path::PathBuf>) -> Env {
    env_with("", shim).await
}

/// As [`env`], with `config` as berthd's config file and `shim` as its `--shim` binary.
pub async fn env_with(config: &str, shim: Option<std::path::PathBuf>) -> Env {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = Registry::start().await.expect("registry");
    image::push_image(&reg.addr(), "busybox", "latest", &img)
        .await
        .expect("push");
    let d = Daemon::start_with(config, shim).await.expect("daemon");
    let image = format!("{}/busybox:latest", reg.addr());
    d.pull_image(&image, None).await.expect("pull");
    Env {
        d,
        reg,
        image,
        logs: tempfile::tempdir().expect("log dir"),
    }
}

/// A pod named `name`: uid `uid-<name>`, namespace `default`, hostname `name`, logs under
/// `env.logs`. Tests change what they need with struct update syntax.
pub fn pod_config(env: &Env, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: env.logs.path().display().to_string(),
        ..Default::default()
    }
}

/// Pod-level Linux settings asking for PID namespace mode `pid` (kubelet asks for CONTAINER
/// unless the pod shares its process namespace).
pub fn pid_mode(pid: cri::NamespaceMode) -> Option<cri::LinuxPodSandboxConfig> {
    Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: pid as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A container named `name` running `cmd` from the test image, label `c=<name>`, logging to
/// `<name>.log` in the pod's log dir.
pub fn ctr_config(env: &Env, name: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: env.image.clone(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("c".to_owned(), name.to_owned())].into(),
        ..Default::default()
    }
}

/// [`ctr_config`] running `/bin/sh -c script`.
pub fn sh_config(env: &Env, name: &str, script: &str) -> cri::ContainerConfig {
    ctr_config(env, name, &["/bin/sh", "-c", script])
}

/// RunPodSandbox with `cfg`; returns the pod id with the config (CreateContainer wants both).
pub async fn run_pod_with(
    env: &Env,
    cfg: cri::PodSandboxConfig,
) -> (String, cri::PodSandboxConfig) {
    let mut rt = env.d.runtime().await.expect("client");
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("run pod: {e:?}\n{}", warnings(env)))
        .into_inner()
        .pod_sandbox_id;
    (id, cfg)
}

/// RunPodSandbox with [`pod_config`].
pub async fn run_pod(env: &Env, name: &str) -> (String, cri::PodSandboxConfig) {
    run_pod_with(env, pod_config(env, name)).await
}

/// StartContainer; panics with berthd's warnings when it fails.
pub async fn start(env: &Env, id: &str) {
    let mut rt = env.d.runtime().await.expect("client");
    rt.start_container(cri::StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("start {id}: {e:?}\n{}", warnings(env)));
}

/// Polls ContainerStatus until the container has exited (20 s at most).
pub async fn wait_exited(env: &Env, id: &str) -> cri::ContainerStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = status(env, id).await.expect("status");
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} did not exit: {s:?}\n{}",
            warnings(env)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// RemoveContainer.
pub async fn remove_container(env: &Env, id: &str) {
    let mut rt = env.d.runtime().await.expect("client");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("remove container");
}

/// ExecSync of `cmd` in container `id` with a timeout in seconds (0: none).
pub async fn exec_sync(
    env: &Env,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let rt = env.d.runtime().await.expect("client");
    // crictl and kubelet accept 16 MiB answers.
    let mut rt = rt.max_decoding_message_size(16 << 20);
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .map(|r| r.into_inner())
}

/// What berthd warned about or failed at (its full debug log is too long for a panic message).
pub fn warnings(env: &Env) -> String {
    env.d
        .log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn create(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.0.clone(),
        config: Some(cfg),
        sandbox_config: Some(pod.1.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

pub async fn status(env: &Env, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .map(|r| r.into_inner().status.expect("status"))
}

/// Reassembled content of a CRI log file per stream, checking every line's format.
pub fn read_cri_log(path: &Path) -> (String, String) {
    let text = std::fs::read_to_string(path).expect("log file");
    let (mut out, mut err) = (String::new(), String::new());
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let ts = parts.next().expect("timestamp");
        let stream = parts.next().expect("stream");
        let tag = parts.next().expect("tag");
        let msg = parts.next().unwrap_or("");
        assert!(
            ts.ends_with('Z') && ts.contains('T') && ts.contains('.'),
            "RFC3339Nano timestamp: {line}"
        );
        assert!(tag == "F" || tag == "P", "tag: {line}");
        let buf = match stream {
            "stdout" => &mut out,
            "stderr" => &mut err,
            other => panic!("stream {other}: {line}"),
        };
        buf.push_str(msg);
        if tag == "F" {
            buf.push('\n');
        }
    }
    (out, err)
}

/// Mounts under `dir` that belong to pods: all but the namespace pool's pins, which berthd
/// keeps for pods to come (see [`pool_mounts`]).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    all_mounts_under(dir)
        .into_iter()
        .filter(|m| !m.contains("/ns/.pool-"))
        .collect()
}

/// The namespace pool's pins under the daemon's state dir.
pub fn pool_mounts(d: &Daemon) -> Vec<String> {
    all_mounts_under(&d.state())
        .into_iter()
        .filter(|m| m.contains("/ns/.pool-"))
        .collect()
}

fn all_mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

pub async fn remove_pod(env: &Env, id: &str) {
    let mut rt = env.d.runtime().await.expect("client");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("remove pod");
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("berth").join(id))
        .filter(|p| p.exists())
        .collect();
    assert!(left.is_empty(), "pod cgroups left: {left:?}");
}

pub fn assert_clean(env: &Env) {
    assert!(
        mounts_under(&env.d.state()).is_empty(),
        "mounts left: {:?}",
        mounts_under(&env.d.state())
    );
    let shims = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("berth-shim --id .* --bundle {}", env.d.state().display()),
        ])
        .output()
        .expect("pgrep");
    assert!(
        shims.stdout.is_empty(),
        "shims left: {}",
        String::from_utf8_lossy(&shims.stdout)
    );
    assert!(!env.d.log().contains("panicked"));
    assert_network_clean(&env.d);
}

/// What pod networking holds in the daemon's namespace and state dir now: links other than
/// loopback and bridges, CNI result cache entries, IP allocations of berth's default network,
/// and berth's nftables tables.
pub fn network_leftovers(d: &Daemon) -> Vec<String> {
    // A pod's veth pair goes with its network namespace, which the kernel destroys in the
    // background once berthd unpins it: give that a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = loop {
        let links = std::process::Command::new("ip")
            .args(["-n", d.netns().name(), "-o", "-d", "link", "show"])
            .output()
            .expect("ip link");
        let mut left = Vec::new();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or_default();
            if name != "lo" && !line.contains(" bridge ") {
                left.push(format!("link {name}"));
            }
        }
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let files = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let cni = d.state().join("cni");
    left.extend(
        files(&cni.join("cache").join("results"))
            .into_iter()
            .map(|f| format!("cache {f}")),
    );
    for net in files(&cni.join("ipam")) {
        left.extend(
            files(Path::new(&net))
                .into_iter()
                .filter(|f| !f.ends_with("/lock") && !f.contains("/last_reserved_ip."))
                .map(|f| format!("allocation {f}")),
        );
    }
    let nft = std::process::Command::new("ip")
        .args(["netns", "exec", d.netns().name(), "nft", "list", "tables"])
        .output()
        .expect("nft list tables");
    for t in String::from_utf8_lossy(&nft.stdout).lines() {
        if t.contains("berth") {
            left.push(t.to_owned());
        }
    }
    left
}

/// Panics unless [`network_leftovers`] is empty.
pub fn assert_network_clean(d: &Daemon) {
    let left = network_leftovers(d);
    assert!(left.is_empty(), "pod networking left behind: {left:#?}");
}
