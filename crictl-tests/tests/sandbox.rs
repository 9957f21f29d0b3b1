//! Pod sandbox lifecycle end to end: pinned namespaces checked from the host with nsenter.

use std::path::{Path, PathBuf};

use api::cri;
use crictl_tests::daemon::{Daemon, require_root};
use crictl_tests::pods::{mounts_under, pool_mounts};
use tonic::Code;

fn pod(name: &str, attempt: u32) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt,
        }),
        hostname: format!("{name}-host"),
        labels: [
            ("app".to_owned(), name.to_owned()),
            ("tier".to_owned(), "test".to_owned()),
        ]
        .into(),
        annotations: [("note".to_owned(), "hello".to_owned())].into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            sysctls: [("net.ipv4.ping_group_range".to_owned(), "0 1000".to_owned())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn host_network(mut c: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    let linux = c.linux.get_or_insert_with(Default::default);
    linux.sysctls.clear();
    linux.security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

async fn run(d: &Daemon, c: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    let mut rt = d.runtime().await.expect("client");
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(c),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn status(d: &Daemon, id: &str) -> Result<cri::PodSandboxStatusResponse, tonic::Status> {
    let mut rt = d.runtime().await.expect("client");
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: true,
    })
    .await
    .map(|r| r.into_inner())
}

async fn list(d: &Daemon, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
    let mut rt = d.runtime().await.expect("client");
    rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter })
        .await
        .expect("list")
        .into_inner()
        .items
}

async fn stop(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let mut rt = d.runtime().await.expect("client");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|_| ())
}

async fn remove(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let mut rt = d.runtime().await.expect("client");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|_| ())
}

fn pins(d: &Daemon, id: &str) -> Vec<PathBuf> {
    ["net", "ipc", "uts"]
        .iter()
        .map(|k| d.state().join("ns").join(id).join(k))
        .collect()
}

fn nsenter(flag: &str, pin: &Path, cmd: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--{flag}={}", pin.display()))
        .args(cmd)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "nsenter {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_lifecycle_with_pinned_namespaces() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let id = run(&d, pod("web", 0)).await.expect("run");
    assert_eq!(id.len(), 64);

    let s = status(&d, &id).await.expect("status");
    let st = s.status.expect("status");
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(st.metadata.expect("metadata").name, "web");
    assert_eq!(st.labels["app"], "web");
    assert_eq!(st.annotations["note"], "hello");
    assert!(st.created_at > 0);
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).expect("info");
    assert_eq!(info["hostname"], "web-host");

    // Namespaces are real and configured from inside.
    let [net, ipc, uts] = <[PathBuf; 3]>::try_from(pins(&d, &id)).expect("three pins");
    for p in [&net, &ipc, &uts] {
        assert!(
            mounts_under(&d.state()).iter().any(|m| Path::new(m) == p),
            "{} not pinned",
            p.display()
        );
    }
    assert_eq!(nsenter("uts", &uts, &["hostname"]).trim(), "web-host");
    let lo = nsenter("net", &net, &["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "lo is up: {lo}");
    let links = nsenter("net", &net, &["ip", "-o", "link", "show"]);
    assert_eq!(
        links.lines().count(),
        2,
        "loopback and the default network's eth0: {links}"
    );
    assert!(links.contains(" eth0@"), "{links}");
    let range = nsenter("net", &net, &["cat", "/proc/sys/net/ipv4/ping_group_range"]);
    assert_eq!(
        range.split_whitespace().collect::<Vec<_>>(),
        ["0", "1000"],
        "sysctl set in the pod, over berth's default"
    );
    let host_range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").expect("host");
    assert_ne!(
        host_range.split_whitespace().collect::<Vec<_>>(),
        ["0", "1000"],
        "host untouched"
    );
    let files = d.state().join("sandboxes").join(&id);
    let resolv = std::fs::read_to_string(files.join("resolv.conf")).expect("resolv.conf");
    assert_eq!(
        resolv,
        "search default.svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
    );
    assert!(
        std::fs::read_to_string(files.join("hosts"))
            .expect("hosts")
            .starts_with("127.0.0.1\tlocalhost")
    );
    assert_eq!(
        std::fs::read_to_string(files.join("hostname")).expect("hostname"),
        "web-host\n"
    );

    // kubelet retries with the same name and attempt: refused; a new attempt is a new pod.
    let dup = run(&d, pod("web", 0)).await.expect_err("duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    let id2 = run(&d, pod("web", 1)).await.expect("attempt 1");

    // Filters.
    assert_eq!(list(&d, None).await.len(), 2);
    let by_id = cri::PodSandboxFilter {
        id: id[..12].to_owned(),
        ..Default::default()
    };
    assert_eq!(
        list(&d, Some(by_id))
            .await
            .iter()
            .map(|p| p.id.clone())
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let by_label = cri::PodSandboxFilter {
        label_selector: [("app".to_owned(), "web".to_owned())].into(),
        ..Default::default()
    };
    assert_eq!(list(&d, Some(by_label)).await.len(), 2);
    let no_label = cri::PodSandboxFilter {
        label_selector: [("app".to_owned(), "db".to_owned())].into(),
        ..Default::default()
    };
    assert!(list(&d, Some(no_label)).await.is_empty());

    // Stop: idempotent, NotReady, network namespace gone.
    stop(&d, &id).await.expect("stop");
    stop(&d, &id).await.expect("stop again");
    let st = status(&d, &id)
        .await
        .expect("status")
        .status
        .expect("status");
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    assert!(!net.exists(), "netns released at stop");
    let ready = cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxReady as i32,
        }),
        ..Default::default()
    };
    assert_eq!(
        list(&d, Some(ready))
            .await
            .iter()
            .map(|p| p.id.clone())
            .collect::<Vec<_>>(),
        vec![id2.clone()]
    );

    // Remove: idempotent; everything released. Removing a ready pod stops it first.
    remove(&d, &id).await.expect("remove");
    remove(&d, &id).await.expect("remove again");
    assert_eq!(
        status(&d, &id).await.expect_err("gone").code(),
        Code::NotFound
    );
    assert_eq!(
        stop(&d, &id).await.expect_err("stop unknown").code(),
        Code::NotFound
    );
    remove(&d, &id2).await.expect("remove ready pod");
    assert!(list(&d, None).await.is_empty());
    assert!(
        mounts_under(&d.state()).is_empty(),
        "pins left: {:?}",
        mounts_under(&d.state())
    );
    assert!(!d.state().join("ns").join(&id2).exists());
    assert!(!d.state().join("sandboxes").join(&id2).exists());
    // The name is free again once the pod is removed.
    let again = run(&d, pod("web", 0))
        .await
        .expect("name reusable after remove");
    remove(&d, &again).await.expect("remove");
    assert!(!d.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn host_network_pod_shares_the_host() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let id = run(&d, host_network(pod("hostnet", 0))).await.expect("run");
    let [net, ipc, uts] = <[PathBuf; 3]>::try_from(pins(&d, &id)).expect("three pins");
    assert!(
        !net.exists() && !uts.exists(),
        "host network and UTS are not pinned"
    );
    assert!(ipc.exists(), "IPC is still the pod's own");
    let host = nix_hostname();
    let files = d.state().join("sandboxes").join(&id);
    assert_eq!(
        std::fs::read_to_string(files.join("hostname"))
            .expect("hostname")
            .trim(),
        host
    );
    remove(&d, &id).await.expect("remove");
    assert!(mounts_under(&d.state()).is_empty());
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sandbox_requests_leave_nothing() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let mut no_meta = pod("x", 0);
    no_meta.metadata = None;
    assert_eq!(
        run(&d, no_meta).await.expect_err("no metadata").code(),
        Code::InvalidArgument
    );
    let mut bad_sysctl = pod("y", 0);
    bad_sysctl
        .linux
        .as_mut()
        .expect("linux")
        .sysctls
        .insert("kernel.panic".into(), "1".into());
    let err = run(&d, bad_sysctl).await.expect_err("host sysctl");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("kernel.panic"), "{}", err.message());
    let mut unknown_value = pod("z", 0);
    unknown_value
        .linux
        .as_mut()
        .expect("linux")
        .sysctls
        .insert("net.ipv4.no_such_knob".into(), "1".into());
    let err = run(&d, unknown_value).await.expect_err("missing sysctl");
    assert!(err.message().contains("no_such_knob"), "{}", err.message());
    let mut rt = d.runtime().await.expect("client");
    let handler = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod("h", 0)),
            runtime_handler: "kata".into(),
        })
        .await
        .expect_err("unknown handler");
    assert_eq!(handler.code(), Code::InvalidArgument);
    assert!(list(&d, None).await.is_empty());
    assert!(mounts_under(&d.state()).is_empty(), "rolled back");
    // The failed names are not reserved.
    let id = run(&d, pod("z", 0)).await.expect("name free after failure");
    remove(&d, &id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_survive_kill_9() {
    require_root();
    let mut d = Daemon::start().await.expect("daemon");
    let id = run(&d, pod("survivor", 0)).await.expect("run");
    d.kill9().await.expect("kill");
    d.restart().await.expect("restart");
    let st = status(&d, &id)
        .await
        .expect("status")
        .status
        .expect("status");
    assert_eq!(
        st.state,
        cri::PodSandboxState::SandboxReady as i32,
        "pins survive the daemon"
    );
    let uts = d.state().join("ns").join(&id).join("uts");
    assert_eq!(nsenter("uts", &uts, &["hostname"]).trim(), "survivor-host");
    // After the pins vanish (as after a reboot), the pod is reported NotReady, not Ready.
    d.stop().await.expect("stop daemon");
    for p in pins(&d, &id) {
        let _ = nix_umount(&p);
    }
    d.restart().await.expect("restart");
    let st = status(&d, &id)
        .await
        .expect("status")
        .status
        .expect("status");
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    remove(&d, &id).await.expect("remove");
    assert!(mounts_under(&d.state()).is_empty());
}

/// Waits until the daemon's namespace pool holds `entries` entries (three pins each).
async fn pool_settles(d: &Daemon, entries: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let pins = pool_mounts(d);
        if pins.len() == entries * 3 || std::time::Instant::now() > deadline {
            return pins;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat pin"))
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_namespaces_come_from_a_pool_kept_full() {
    require_root();
    let mut d = Daemon::start().await.expect("daemon");
    let pool = pool_settles(&d, 4).await;
    assert_eq!(pool.len(), 12, "the default pool is 4 sets: {pool:?}");
    let pooled: Vec<u64> = pool
        .iter()
        .filter(|p| p.ends_with("/net"))
        .map(|p| inode(Path::new(p)))
        .collect();

    // More pods than the pool holds: pooled and fresh namespaces alike are the pod's own and
    // configured for it.
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(run(&d, pod(&format!("pooled{i}"), 0)).await.expect("run"));
    }
    let mut nets = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let [net, _, uts] = <[PathBuf; 3]>::try_from(pins(&d, id)).expect("three pins");
        assert_eq!(
            nsenter("uts", &uts, &["hostname"]).trim(),
            format!("pooled{i}-host")
        );
        let range = nsenter("net", &net, &["cat", "/proc/sys/net/ipv4/ping_group_range"]);
        assert_eq!(range.split_whitespace().collect::<Vec<_>>(), ["0", "1000"]);
        let lo = nsenter("net", &net, &["ip", "-o", "link", "show", "lo"]);
        assert!(lo.contains("UP"), "lo is up: {lo}");
        nets.push(inode(&net));
    }
    assert!(pooled.contains(&nets[0]), "the first pod took a pooled set");
    let mut distinct = nets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), nets.len(), "a namespace shared by two pods");

    // The pool refills in the background, with namespaces no pod has.
    let pool = pool_settles(&d, 4).await;
    assert_eq!(pool.len(), 12, "{pool:?}");
    for p in pool.iter().filter(|p| p.ends_with("/net")) {
        assert!(!nets.contains(&inode(Path::new(p))), "{p} is a pod's");
    }

    // kill -9 leaves the pool behind; the next start releases it and makes a new one.
    d.kill9().await.expect("kill");
    d.restart().await.expect("restart");
    let pool = pool_settles(&d, 4).await;
    assert_eq!(pool.len(), 12, "stale entries released: {pool:?}");
    for id in &ids {
        remove(&d, id).await.expect("remove");
    }
    assert!(mounts_under(&d.state()).is_empty());
    // A clean stop releases the pool.
    d.stop().await.expect("stop");
    assert!(pool_mounts(&d).is_empty(), "{:?}", pool_mounts(&d));
}

fn nix_umount(p: &Path) -> std::io::Result<()> {
    let status = std::process::Command::new("umount")
        .arg("-l")
        .arg(p)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("umount failed"))
    }
}
