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
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = Registry::start().await.expect("registry");
    image::push_image(&reg.addr(), "busybox", "latest", &img)
        .await
        .expect("push");
    let d = Daemon::start_with("", shim).await.expect("daemon");
    let image = format!("{}/busybox:latest", reg.addr());
    d.pull_image(&image, None).await.expect("pull");
    Env {
        d,
        reg,
        image,
        logs: tempfile::tempdir().expect("log dir"),
    }
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

pub fn mounts_under(dir: &Path) -> Vec<String> {
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
}
