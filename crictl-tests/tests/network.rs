//! Pod networking through a real berthd: CNI ADD on RunPodSandbox, DEL on stop, the pod IPs in
//! PodSandboxStatus, NetworkReady, the pod CIDR, recovery after kill -9, and no leftovers.
//!
//! Each daemon runs in a network namespace of its own that stands in for the host (see
//! `crictl_tests::hostns`), so the bridge, veths and nftables rules the plugins make never touch
//! the real host, and every test can use berth's default network (`berth0`, 10.88.0.0/16).

use std::io::Read;
use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use api::cri;
use crictl_tests::daemon::Daemon;
use crictl_tests::hostns::HostNs;
use crictl_tests::pods::{
    Env, assert_clean, assert_network_clean, create, ctr_config, env, env_with, exec_sync,
    network_leftovers, pod_config, remove_pod, run_pod, run_pod_with, sh_config, start, warnings,
};
use tonic::Code;

async fn pod_ips(env: &Env, id: &str) -> Vec<String> {
    let mut rt = env.d.runtime().await.expect("client");
    let s = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .expect("pod status")
        .into_inner()
        .status
        .expect("status");
    let net = s.network.expect("network status");
    let mut ips = vec![net.ip];
    ips.extend(net.additional_ips.into_iter().map(|p| p.ip));
    ips.retain(|ip| !ip.is_empty());
    ips
}

async fn network_ready(d: &Daemon) -> cri::RuntimeCondition {
    let mut rt = d.runtime().await.expect("client");
    rt.status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("runtime status")
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("a NetworkReady condition")
}

/// A running pod with a `sleep` container running as root (busybox's ping needs a raw
/// socket: CAP_NET_RAW, which root has by default); returns (pod id, container id).
async fn sleeper(env: &Env, name: &str) -> (String, String) {
    let pod = run_pod(env, name).await;
    let cfg = cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..ctr_config(env, name, &["sleep", "3600"])
    };
    let ctr = create(env, &pod, cfg)
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", warnings(env)));
    start(env, &ctr).await;
    (pod.0, ctr)
}

async fn sh(env: &Env, ctr: &str, script: &str) -> (i32, String) {
    let r = exec_sync(env, ctr, &["sh", "-c", script], 20)
        .await
        .expect("exec");
    let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&r.stderr));
    (r.exit_code, out)
}

async fn stop_pod(env: &Env, id: &str) -> Result<(), tonic::Status> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map(|_| ())
}

fn in_default_subnet(ip: &str) -> bool {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.octets()[..2] == [10, 88],
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_the_default_network_reach_each_other_and_the_host() {
    let env = env().await;
    let ready = network_ready(&env.d).await;
    assert!(ready.status, "network not ready: {ready:?}");
    let conflist = env.d.root().join("networks").join("10-berth.conflist");
    let text = std::fs::read_to_string(&conflist).expect("berthd wrote its default network");
    assert!(
        text.contains("\"berth0\"") && text.contains("10.88.0.0/16"),
        "{text}"
    );

    let (pod_a, a) = sleeper(&env, "neta").await;
    let (pod_b, b) = sleeper(&env, "netb").await;
    let ips_a = pod_ips(&env, &pod_a).await;
    let ips_b = pod_ips(&env, &pod_b).await;
    assert_eq!(ips_a.len(), 1, "{ips_a:?}");
    assert!(in_default_subnet(&ips_a[0]), "{ips_a:?}");
    assert!(in_default_subnet(&ips_b[0]), "{ips_b:?}");
    assert_ne!(ips_a, ips_b);

    // The pod sees its address on eth0, and a default route via the bridge.
    let (code, out) = sh(&env, &a, "ip -4 addr show eth0; ip route").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("inet {}/16", ips_a[0])), "{out}");
    assert!(out.contains("default via 10.88.0.1"), "{out}");
    // As containerd 2: unprivileged ICMP and low ports in the pod's own network namespace.
    let (_, out) = sh(
        &env,
        &a,
        "cat /proc/sys/net/ipv4/ping_group_range /proc/sys/net/ipv4/ip_unprivileged_port_start",
    )
    .await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "2147483647", "0"]
    );

    // Pod to pod, pod to gateway, and back.
    for (ctr, target) in [
        (&a, &ips_b[0]),
        (&b, &ips_a[0]),
        (&a, &"10.88.0.1".to_owned()),
    ] {
        let (code, out) = sh(&env, ctr, &format!("ping -c1 -W3 {target}")).await;
        assert_eq!(code, 0, "ping {target}: {out}");
    }

    // A server on the host (the daemon's namespace) answers a pod, and sees the pod's own
    // address: traffic inside the pod subnet is not masqueraded.
    let listener = env
        .d
        .netns()
        .run(|| TcpListener::bind("10.88.0.1:0"))
        .expect("listen on the bridge address");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("accept");
        let mut got = String::new();
        conn.read_to_string(&mut got).expect("read");
        (peer.ip().to_string(), got)
    });
    let (code, out) = sh(
        &env,
        &b,
        &format!("echo hello-from-pod | nc -w3 10.88.0.1 {port}"),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (peer, got) = server.join().expect("server");
    assert_eq!(got, "hello-from-pod\n");
    assert_eq!(peer, ips_b[0]);

    for pod in [&pod_a, &pod_b] {
        stop_pod(&env, pod).await.expect("stop");
        assert!(
            pod_ips(&env, pod).await.is_empty(),
            "a stopped pod has no IP"
        );
        // Stop is idempotent.
        stop_pod(&env, pod).await.expect("stop again");
        remove_pod(&env, pod).await;
    }
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_network_is_torn_down_after_berthd_is_killed_and_restarted() {
    let mut env = env().await;
    let (pod, ctr) = sleeper(&env, "netkill").await;
    let ips = pod_ips(&env, &pod).await;
    assert!(in_default_subnet(&ips[0]), "{ips:?}");
    let (pod2, _) = sleeper(&env, "netkill2").await;

    env.d.kill9().await.expect("kill -9");
    // An address allocated to a pod berthd never heard of (a crash of an older berthd between
    // IPAM and its record, say): the start's CNI GC releases it, and only it.
    let ipam = env.d.state().join("cni/ipam/berth");
    let owned = std::fs::read_dir(&ipam).expect("ipam dir").count();
    std::fs::write(ipam.join("10.88.0.200"), "stale-pod\r\neth0").expect("plant");
    env.d.restart().await.expect("restart");
    assert!(
        !ipam.join("10.88.0.200").exists(),
        "the stale allocation survived the start's GC"
    );
    assert_eq!(std::fs::read_dir(&ipam).expect("ipam dir").count(), owned);
    assert_eq!(pod_ips(&env, &pod).await, ips, "the IP survives a restart");
    let (code, out) = sh(&env, &ctr, "ping -c1 -W3 10.88.0.1").await;
    assert_eq!(code, 0, "the network still works: {out}");

    // One pod stopped and removed by the restarted daemon (DEL from the result cache), the
    // other removed without a stop first.
    stop_pod(&env, &pod).await.expect("stop");
    remove_pod(&env, &pod).await;
    remove_pod(&env, &pod2).await;
    remove_pod(&env, &pod2).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_pods_get_distinct_addresses_and_cycles_leave_nothing() {
    let env = env().await;
    for round in 0..3 {
        let runs = (0..20).map(|i| {
            let env = &env;
            async move {
                let mut cfg = pod_config(env, &format!("cyc{round}-{i}"));
                if i % 2 == 0 {
                    // Host ports too: their nftables rules must go with the pod.
                    cfg.port_mappings = vec![cri::PortMapping {
                        protocol: cri::Protocol::Tcp as i32,
                        container_port: 80,
                        host_port: 20000 + i,
                        host_ip: String::new(),
                    }];
                }
                run_pod_with(env, cfg).await.0
            }
        });
        let pods = futures::future::join_all(runs).await;
        let mut ips = Vec::new();
        for p in &pods {
            let mine = pod_ips(&env, p).await;
            assert_eq!(mine.len(), 1, "{mine:?}");
            ips.push(mine[0].clone());
        }
        let mut unique = ips.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 20, "addresses handed out twice: {ips:?}");
        let removes = pods.iter().map(|p| remove_pod(&env, p));
        futures::future::join_all(removes).await;
        assert_network_clean(&env.d);
    }
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pod_cidr_from_update_runtime_config_is_used() {
    let env = env().await;
    let mut rt = env.d.runtime().await.expect("client");
    let update = |cidr: &str| cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    };
    let e = rt
        .update_runtime_config(update("10.89.7.0/33"))
        .await
        .expect_err("a bad CIDR");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    rt.update_runtime_config(update("10.89.7.0/24"))
        .await
        .expect("update");
    let (pod, ctr) = sleeper(&env, "cidr").await;
    let ips = pod_ips(&env, &pod).await;
    assert!(ips[0].starts_with("10.89.7."), "{ips:?}");
    let (code, out) = sh(&env, &ctr, "ping -c1 -W3 10.89.7.1").await;
    assert_eq!(code, 0, "the gateway of the pod CIDR answers: {out}");
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

/// Sets up a daemon whose only conf dir is `net.d` under a temp dir the caller fills.
async fn env_with_conf_dir(extra: &str) -> (Env, tempfile::TempDir) {
    let confs = tempfile::Builder::new()
        .prefix("berth-test-netd-")
        .tempdir()
        .expect("conf dir");
    let config = format!("[cni]\nconf_dirs = [{:?}]\n{extra}", confs.path());
    // A broken file before the daemon starts, so it writes no default network.
    std::fs::write(
        confs.path().join("00-broken.conflist"),
        "{ \"cniVersion\": ",
    )
    .expect("write");
    (env_with(&config, None).await, confs)
}

fn nothing_made_for_pods(env: &Env) {
    for dir in ["sandboxes", "ns"] {
        let entries: Vec<_> = std::fs::read_dir(env.d.state().join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| !p.to_string_lossy().contains("/ns/.pool-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(entries.is_empty(), "{dir} left: {entries:?}");
    }
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_conflist_or_a_missing_plugin_is_not_ready_and_pods_fail_cleanly() {
    let (env, confs) = env_with_conf_dir("").await;
    assert!(
        !env.d
            .root()
            .join("networks")
            .join("10-berth.conflist")
            .exists(),
        "a broken config is reported, never replaced by the default"
    );
    let ready = network_ready(&env.d).await;
    assert!(!ready.status);
    assert_eq!(ready.reason, "NetworkPluginNotReady");
    assert!(ready.message.contains("00-broken.conflist"), "{ready:?}");

    let mut rt = env.d.runtime().await.expect("client");
    let run = |name: &str| cri::RunPodSandboxRequest {
        config: Some(pod_config(&env, name)),
        runtime_handler: String::new(),
    };
    let e = rt
        .run_pod_sandbox(run("broken"))
        .await
        .expect_err("no network");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("00-broken.conflist"), "{e:?}");
    nothing_made_for_pods(&env);

    // A valid network whose plugin is not installed: not ready, and the pod fails before any
    // plugin ran.
    std::fs::remove_file(confs.path().join("00-broken.conflist")).expect("rm");
    let missing = serde_json::json!({
        "cniVersion": "1.0.0", "name": "nope",
        "plugins": [{"type": "no-such-plugin"}],
    });
    std::fs::write(confs.path().join("10-nope.conflist"), missing.to_string()).expect("write");
    let ready = network_ready(&env.d).await;
    assert!(!ready.status);
    assert!(ready.message.contains("no-such-plugin"), "{ready:?}");
    let e = rt
        .run_pod_sandbox(run("missing"))
        .await
        .expect_err("no plugin");
    assert!(e.message().contains("no-such-plugin"), "{e:?}");
    nothing_made_for_pods(&env);
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");

    // Host-network pods need no CNI network.
    let host = cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..pod_config(&env, "hostnet")
    };
    let (id, _) = run_pod_with(&env, host).await;
    assert!(pod_ips(&env, &id).await.is_empty());
    remove_pod(&env, &id).await;

    // Fixing the config makes the network ready without a restart.
    let good = serde_json::json!({
        "cniVersion": "1.1.0", "name": "fixed",
        "plugins": [{
            "type": "berth-bridge", "bridge": "berthfix0", "isGateway": true,
            "ipam": {"type": "berth-host-local", "ranges": [[{"subnet": "10.90.0.0/24"}]],
                     "dataDir": env.d.state().join("cni").join("ipam")},
        }],
    });
    std::fs::write(confs.path().join("10-nope.conflist"), good.to_string()).expect("write");
    let ready = network_ready(&env.d).await;
    assert!(ready.status, "{ready:?}");
    let (pod, _) = run_pod(&env, "fixed").await;
    assert!(pod_ips(&env, &pod).await[0].starts_with("10.90.0."));
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

/// A pod serving `hello-<name>` over HTTP on port 80 with busybox httpd, its port 80 mapped
/// to `host_port`; returns (pod id, container id).
async fn web_pod(env: &Env, name: &str, host_port: i32) -> (String, String) {
    let cfg = cri::PodSandboxConfig {
        port_mappings: vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port,
            host_ip: String::new(),
        }],
        ..pod_config(env, name)
    };
    let pod = run_pod_with(env, cfg).await;
    let script = format!(
        "mkdir -p /tmp/www && echo hello-{name} > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"
    );
    let ctr = create(env, &pod, sh_config(env, name, &script))
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", warnings(env)));
    start(env, &ctr).await;
    (pod.0, ctr)
}

/// GET / from `addr` over plain TCP, from the calling thread's namespace: the body, or the
/// error.
fn http_get(addr: &str) -> Result<String, String> {
    use std::io::Write;
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut last = String::new();
    // httpd may still be starting: a few tries.
    for _ in 0..50 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut c) => {
                c.set_read_timeout(Some(Duration::from_secs(5))).ok();
                c.write_all(b"GET / HTTP/1.0\r\n\r\n")
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                c.read_to_string(&mut out).map_err(|e| e.to_string())?;
                return Ok(out);
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// A shell script GETting / from `host:port` with busybox nc (busybox-static's wget crashes
/// in its resolver).
fn get_script(host: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w5 {host} {port}")
}

/// Puts an "outside" machine (a namespace of its own) on a link to the daemon's host:
/// the host gets `192.168.77.1/24` on `ext0`, the outside `192.168.77.2/24`.
fn outside_host(d: &Daemon) -> std::sync::Arc<HostNs> {
    let outside = HostNs::new().expect("outside namespace");
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let host = d.netns().name();
    ip(&[
        "-n",
        host,
        "link",
        "add",
        "ext0",
        "type",
        "veth",
        "peer",
        "name",
        "ext1",
        "netns",
        outside.name(),
    ]);
    ip(&["-n", host, "addr", "add", "192.168.77.1/24", "dev", "ext0"]);
    ip(&["-n", host, "link", "set", "ext0", "up"]);
    ip(&[
        "-n",
        outside.name(),
        "addr",
        "add",
        "192.168.77.2/24",
        "dev",
        "ext1",
    ]);
    ip(&["-n", outside.name(), "link", "set", "ext1", "up"]);
    outside
}

#[tokio::test(flavor = "multi_thread")]
async fn host_ports_reach_the_pod_from_the_host_outside_other_pods_and_itself() {
    let env = env().await;
    let outside = outside_host(&env.d);
    let (web, web_ctr) = web_pod(&env, "web", 18080).await;
    let (client_pod, client) = sleeper(&env, "client").await;

    // From the host itself: loopback, its external address, its bridge address.
    for addr in ["127.0.0.1:18080", "192.168.77.1:18080", "10.88.0.1:18080"] {
        let body = env.d.netns().run(|| http_get(addr));
        assert!(
            body.as_deref().is_ok_and(|b| b.contains("hello-web")),
            "from the host to {addr}: {body:?}"
        );
    }
    // From another machine.
    let body = outside.run(|| http_get("192.168.77.1:18080"));
    assert!(
        body.as_deref().is_ok_and(|b| b.contains("hello-web")),
        "from outside: {body:?}"
    );
    // From another pod, and from the pod itself (hairpin), through the host's address.
    for ctr in [&client, &web_ctr] {
        let (code, out) = sh(&env, ctr, &get_script("192.168.77.1", 18080)).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("hello-web"), "{out}");
    }

    // Stopping the pod takes the mapping away.
    stop_pod(&env, &web).await.expect("stop");
    let gone = env.d.netns().run(|| {
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:18080".parse().expect("addr"),
            Duration::from_secs(1),
        )
    });
    assert!(gone.is_err(), "the host port still answers after stop");
    remove_pod(&env, &web).await;
    remove_pod(&env, &client_pod).await;
    let del = std::process::Command::new("ip")
        .args(["-n", env.d.netns().name(), "link", "del", "ext0"])
        .status()
        .expect("ip");
    assert!(del.success());
    drop(outside);
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_plugins_from_debian_work_the_same() {
    for p in ["bridge", "host-local", "portmap", "bandwidth"] {
        assert!(
            Path::new("/usr/lib/cni").join(p).is_file(),
            "/usr/lib/cni/{p} missing: run scripts/deps (containernetworking-plugins)"
        );
    }
    let confs = tempfile::Builder::new()
        .prefix("berth-test-netd-")
        .tempdir()
        .expect("conf dir");
    let ipam = tempfile::Builder::new()
        .prefix("berth-test-ipam-")
        .tempdir()
        .expect("ipam dir");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": "reference",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni-ref0", "isGateway": true, "ipMasq": true,
                "hairpinMode": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.77.0.0/24"}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam.path()},
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
        ],
    });
    std::fs::write(
        confs.path().join("10-reference.conflist"),
        conflist.to_string(),
    )
    .expect("write");
    let config = format!(
        "[cni]\nconf_dirs = [{:?}]\nbin_dirs = [\"/usr/lib/cni\"]\n",
        confs.path()
    );
    let env = env_with(&config, None).await;
    let ready = network_ready(&env.d).await;
    assert!(ready.status, "{ready:?}");

    let (web, web_ctr) = web_pod(&env, "refweb", 18081).await;
    let (other, other_ctr) = sleeper(&env, "refother").await;
    let ips = pod_ips(&env, &web).await;
    assert!(ips[0].starts_with("10.77.0."), "{ips:?}");
    let (code, out) = sh(&env, &other_ctr, &format!("ping -c1 -W3 {}", ips[0])).await;
    assert_eq!(code, 0, "pod to pod: {out}");
    let body = env.d.netns().run(|| http_get("10.77.0.1:18081"));
    assert!(
        body.as_deref().is_ok_and(|b| b.contains("hello-refweb")),
        "{body:?}"
    );
    let (code, out) = sh(&env, &web_ctr, &get_script("10.77.0.1", 18081)).await;
    assert!(code == 0 && out.contains("hello-refweb"), "hairpin: {out}");

    // The bandwidth annotations reach the bandwidth plugin, which shapes the pod's traffic.
    let mut cfg = pod_config(&env, "refbw");
    cfg.annotations
        .insert("kubernetes.io/ingress-bandwidth".into(), "1M".into());
    cfg.annotations
        .insert("kubernetes.io/egress-bandwidth".into(), "2M".into());
    let (shaped, _) = run_pod_with(&env, cfg.clone()).await;
    let qdiscs = tc_shaping(&env.d);
    assert!(
        qdiscs.contains("rate 1Mbit") && qdiscs.contains("rate 2Mbit"),
        "{qdiscs}"
    );
    cfg.annotations
        .insert("kubernetes.io/egress-bandwidth".into(), "lots".into());
    cfg.metadata.as_mut().expect("metadata").name = "refbw-bad".into();
    let mut rt = env.d.runtime().await.expect("client");
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("a bad bandwidth annotation");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("egress-bandwidth"), "{err:?}");

    for pod in [&web, &other, &shaped] {
        stop_pod(&env, pod).await.expect("stop");
        remove_pod(&env, pod).await;
    }
    assert_clean(&env);
    let qdiscs = tc_shaping(&env.d);
    assert!(!qdiscs.contains("tbf"), "shaping left: {qdiscs}");
    let allocations: Vec<_> = walk(ipam.path())
        .into_iter()
        .filter(|f| {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            name.parse::<IpAddr>().is_ok()
        })
        .collect();
    assert!(
        allocations.is_empty(),
        "addresses still allocated: {allocations:?}"
    );
}

/// The daemon host's qdiscs and ifb devices (the bandwidth plugin's shaping).
fn tc_shaping(d: &Daemon) -> String {
    d.netns().run(|| {
        let run = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("run tc/ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&["tc", "qdisc", "show"]) + &run(&["ip", "-o", "link", "show", "type", "ifb"])
    })
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_network_setup_was_cut_short_by_kill_9_is_rolled_back() {
    // A chain whose second plugin blocks in ADD after berth-bridge set the pod up: berthd is
    // killed right there.
    let dir = tempfile::Builder::new()
        .prefix("berth-test-blocker-")
        .tempdir()
        .expect("dir");
    let started = dir.path().join("started");
    let blocker = dir.path().join("bin").join("blocker");
    std::fs::create_dir_all(blocker.parent().expect("bin")).expect("mkdir");
    std::fs::write(
        &blocker,
        format!(
            "#!/bin/sh\n[ \"$CNI_COMMAND\" = ADD ] || exit 0\necho $$ > {}\nexec sleep 3600\n",
            started.display()
        ),
    )
    .expect("write blocker");
    std::fs::set_permissions(
        &blocker,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let confs = dir.path().join("net.d");
    std::fs::create_dir_all(&confs).expect("mkdir");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": "blocking",
        "plugins": [
            {"type": "berth-bridge", "bridge": "berth0", "isGateway": true,
             "ipam": {"type": "berth-host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                      "dataDir": dir.path().join("ipam")}},
            {"type": "blocker"},
        ],
    });
    std::fs::write(confs.join("10-blocking.conflist"), conflist.to_string()).expect("write");
    let config = format!(
        "[cni]\nconf_dirs = [{:?}]\nbin_dirs = [{:?}]\n",
        confs,
        blocker.parent().expect("bin")
    );
    let mut env = env_with(&config, None).await;

    let cfg = pod_config(&env, "cut");
    let socket = env.d.socket.clone();
    let run = tokio::spawn(async move {
        let channel = crictl_tests::daemon::connect(&socket)
            .await
            .expect("connect");
        let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel);
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        })
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocker never ran\n{}",
            warnings(&env)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blocker_pid: i32 = std::fs::read_to_string(&started)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    // The bridge did its part: the pod has an interface and an address.
    let during = network_leftovers(&env.d);
    assert!(during.iter().any(|l| l.starts_with("link ")), "{during:?}");
    env.d.kill9().await.expect("kill -9");
    assert!(
        run.await.expect("join").is_err(),
        "RunPodSandbox cannot succeed"
    );
    // The plugin died with berthd instead of running on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{blocker_pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{blocker_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin outlived berthd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    env.d.restart().await.expect("restart");
    let mut rt = env.d.runtime().await.expect("client");
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
    nothing_made_for_pods(&env);
    let allocations: Vec<_> = walk(&dir.path().join("ipam"))
        .into_iter()
        .filter(|f| {
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .parse::<IpAddr>()
                .is_ok()
        })
        .collect();
    assert!(
        allocations.is_empty(),
        "addresses still allocated: {allocations:?}"
    );
    assert_clean(&env);
}
