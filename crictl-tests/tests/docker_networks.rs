//! docker's networks with the stock docker client: network objects, containers on user
//! networks reaching each other by address and by name, connect/disconnect of a running
//! container. Each test's daemon runs in a network namespace of its own, so its bridges,
//! subnets and nft tables go with it.

use crictl_tests::docker::DockerEnv;
use crictl_tests::pods::{assert_network_clean, network_leftovers};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn raw_status(env: &DockerEnv, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&env.d.docker_socket)
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

async fn ip_on(env: &DockerEnv, container: &str, network: &str) -> String {
    let f = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    env.ok(&["inspect", "-f", &f, container])
        .await
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn network_objects_create_inspect_ls_rm_prune() {
    let env = DockerEnv::start("").await;
    let id = env.ok(&["network", "create", "mynet"]).await;
    let id = id.trim();
    assert_eq!(id.len(), 64, "{id}");
    let subnet = env
        .ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}} {{.Driver}} {{.Internal}}",
            "mynet",
        ])
        .await;
    assert!(
        subnet.starts_with("172.") && subnet.contains("/16 bridge false"),
        "{subnet}"
    );
    env.ok(&[
        "network",
        "create",
        "--subnet",
        "10.123.0.0/24",
        "--gateway",
        "10.123.0.254",
        "--label",
        "team=net",
        "--internal",
        "other",
    ])
    .await;
    let other = env
        .ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}} {{(index .IPAM.Config 0).Gateway}} {{.Internal}} {{.Labels.team}}",
            "other",
        ])
        .await;
    assert_eq!(other.trim(), "10.123.0.0/24 10.123.0.254 true net");
    // A second network without --subnet gets another free one.
    env.ok(&["network", "create", "third"]).await;
    let third = env
        .ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}}",
            "third",
        ])
        .await;
    assert_ne!(third.trim(), subnet.split(' ').next().unwrap_or_default());

    // docker's bridge is the CRI default network.
    let bridge = env
        .ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}} {{(index .IPAM.Config 0).Gateway}}",
            "bridge",
        ])
        .await;
    assert_eq!(bridge.trim(), "10.88.0.0/16 10.88.0.1");
    let dup = env.docker(&["network", "create", "mynet"]).await;
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already exists"), "{dup:?}");
    let raw = raw_status(
        &env,
        "POST",
        "/v1.44/networks/create",
        r#"{"Name":"mynet","CheckDuplicate":true}"#,
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 409"), "{raw}");
    let overlap = env
        .docker(&["network", "create", "--subnet", "10.123.0.128/25", "clash"])
        .await;
    assert!(!overlap.status.success(), "{overlap:?}");

    let ls = env
        .ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"])
        .await;
    for want in [
        "bridge bridge",
        "host host",
        "none null",
        "mynet bridge",
        "other bridge",
    ] {
        assert!(ls.lines().any(|l| l == want), "{want} in {ls}");
    }
    let labelled = env
        .ok(&[
            "network",
            "ls",
            "-q",
            "--no-trunc",
            "--filter",
            "label=team=net",
        ])
        .await;
    assert_eq!(labelled.lines().count(), 1, "{labelled}");
    let by_name = env
        .ok(&[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            "name=myn",
        ])
        .await;
    assert_eq!(by_name.trim(), "mynet");

    let missing = env.docker(&["network", "inspect", "nosuch"]).await;
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("network nosuch not found"),
        "{missing:?}"
    );
    let raw = raw_status(&env, "GET", "/v1.44/networks/nosuch", "").await;
    assert!(
        raw.starts_with("HTTP/1.1 404") && raw.contains("network nosuch not found"),
        "{raw}"
    );
    let run = env
        .docker(&["run", "--rm", "--network", "nosuch", "busybox", "true"])
        .await;
    assert!(!run.status.success());
    assert!(stderr(&run).contains("network nosuch not found"), "{run:?}");
    let predefined = env.docker(&["network", "rm", "bridge"]).await;
    assert!(!predefined.status.success(), "{predefined:?}");
    let raw = raw_status(&env, "DELETE", "/v1.44/networks/bridge", "").await;
    assert!(
        raw.starts_with("HTTP/1.1 403") && raw.contains("pre-defined network"),
        "{raw}"
    );

    // An id prefix works where a name does.
    env.ok(&["network", "rm", &id[..8]]).await;
    let pruned = env.ok(&["network", "prune", "-f"]).await;
    assert!(
        pruned.contains("other") && pruned.contains("third"),
        "{pruned}"
    );
    let ls = env.ok(&["network", "ls", "--format", "{{.Name}}"]).await;
    let mut names: Vec<&str> = ls.lines().collect();
    names.sort_unstable();
    assert_eq!(names, ["bridge", "host", "none"]);
    let conflists: Vec<_> = std::fs::read_dir(env.d.root().join("networks"))
        .expect("managed dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("docker-"))
        .collect();
    assert!(conflists.is_empty(), "{conflists:?}");
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_on_a_user_network_reach_each_other_by_ip_name_and_alias() {
    let env = DockerEnv::start("").await;
    env.ok(&["network", "create", "--subnet", "10.201.0.0/24", "appnet"])
        .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "appnet",
        "--network-alias",
        "site",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "client",
        "--network",
        "appnet",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let web_ip = ip_on(&env, "web", "appnet").await;
    // The top-level address is the default bridge's: empty on a user network only, as docker.
    let top = env
        .ok(&["inspect", "-f", "[{{.NetworkSettings.IPAddress}}]", "web"])
        .await;
    assert_eq!(top.trim(), "[]");
    assert!(web_ip.starts_with("10.201.0."), "{web_ip}");
    let gw = env
        .ok(&[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"appnet\").Gateway}}",
            "web",
        ])
        .await;
    assert_eq!(gw.trim(), "10.201.0.1");
    env.ok(&["exec", "client", "busybox", "ping", "-c1", "-W2", &web_ip])
        .await;
    for name in ["web", "site"] {
        let out = env
            .ok(&["exec", "client", "busybox", "nslookup", name])
            .await;
        assert!(out.contains(&web_ip), "{name}: {out}");
    }
    env.ok(&["exec", "client", "busybox", "ping", "-c1", "-W2", "web"])
        .await;
    let members = env
        .ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .Containers}}{{.Name}}={{.IPv4Address}} {{end}}",
            "appnet",
        ])
        .await;
    assert!(members.contains(&format!("web={web_ip}/24")), "{members}");
    // Reverse lookups of a peer's address name it.
    let ptr = env
        .ok(&["exec", "client", "busybox", "nslookup", &web_ip])
        .await;
    assert!(ptr.contains("web"), "{ptr}");
    // Published ports work on a user network as on the default one.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "pub",
        "--network",
        "appnet",
        "-p",
        "18081:80",
        "busybox",
        "sh",
        "-c",
        "mkdir /www && echo hello > /www/index.html && exec busybox httpd -f -p 80 -h /www",
    ])
    .await;
    let fetched = env
        .ok(&["exec", "client", "busybox", "wget", "-qO-", "http://pub/"])
        .await;
    assert_eq!(fetched, "hello\n");
    let from_host = env.d.netns().run(|| {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = std::net::TcpStream::connect("127.0.0.1:18081").and_then(|mut c| {
                c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                c.read_to_string(&mut out)?;
                Ok(out)
            });
            match got {
                Ok(body) if body.contains("hello") => return body,
                _ if std::time::Instant::now() > deadline => return format!("{got:?}"),
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    });
    assert!(from_host.contains("hello"), "{from_host}");
    let busy = env.docker(&["network", "rm", "appnet"]).await;
    assert!(!busy.status.success());
    assert!(stderr(&busy).contains("has active endpoints"), "{busy:?}");
    let raw = raw_status(&env, "DELETE", "/v1.44/networks/appnet", "").await;
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");

    // The default bridge: addresses work, names do not (docker's rule).
    env.ok(&["run", "-d", "--name", "b1", "busybox", "sleep", "300"])
        .await;
    env.ok(&["run", "-d", "--name", "b2", "busybox", "sleep", "300"])
        .await;
    let b1_ip = ip_on(&env, "b1", "bridge").await;
    let top = env
        .ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}}/{{.NetworkSettings.IPPrefixLen}} {{.NetworkSettings.Networks.bridge.IPPrefixLen}}",
            "b1",
        ])
        .await;
    let (top_ip, bridge_prefix) = top.trim().split_once(' ').expect("two fields");
    assert_eq!(top_ip, format!("{b1_ip}/{bridge_prefix}"));
    assert!(!b1_ip.is_empty());
    env.ok(&["exec", "b2", "busybox", "ping", "-c1", "-W2", &b1_ip])
        .await;
    let by_name = env
        .docker(&["exec", "b2", "busybox", "ping", "-c1", "-W2", "b1"])
        .await;
    assert!(!by_name.status.success(), "{by_name:?}");

    // --link: the linked container's address in /etc/hosts under the alias.
    let hosts = env
        .ok(&[
            "run",
            "--rm",
            "--link",
            "b1:db",
            "busybox",
            "cat",
            "/etc/hosts",
        ])
        .await;
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with(&b1_ip) && l.contains("db")),
        "{hosts}"
    );

    env.ok(&["rm", "-f", "web", "client", "pub", "b1", "b2"])
        .await;
    env.ok(&["network", "rm", "appnet"]).await;
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_gives_a_running_container_a_second_interface() {
    let env = DockerEnv::start("").await;
    env.ok(&["network", "create", "--subnet", "10.202.0.0/24", "n1"])
        .await;
    env.ok(&["network", "create", "--subnet", "10.203.0.0/24", "n2"])
        .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "cc",
        "--network",
        "n1",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "peer",
        "--network",
        "n2",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    // Networks are isolated from each other: no way from n1 to n2 through the host.
    let peer_ip = ip_on(&env, "peer", "n2").await;
    let isolated = env
        .docker(&["exec", "cc", "busybox", "ping", "-c1", "-W1", &peer_ip])
        .await;
    assert!(!isolated.status.success(), "{isolated:?}");
    env.ok(&["network", "connect", "--alias", "second", "n2", "cc"])
        .await;
    let mac = env
        .ok(&[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"n2\").MacAddress}}",
            "cc",
        ])
        .await;
    let eth1 = env
        .ok(&[
            "exec",
            "cc",
            "busybox",
            "cat",
            "/sys/class/net/eth1/address",
        ])
        .await;
    assert_eq!(mac.trim(), eth1.trim());
    let addr = env
        .ok(&["exec", "cc", "busybox", "ip", "-4", "addr", "show", "eth1"])
        .await;
    assert!(addr.contains("10.203.0."), "{addr}");
    let c_ip = ip_on(&env, "cc", "n2").await;
    assert!(c_ip.starts_with("10.203.0."), "{c_ip}");
    env.ok(&["exec", "cc", "busybox", "ping", "-c1", "-W2", "peer"])
        .await;
    let out = env
        .ok(&["exec", "peer", "busybox", "nslookup", "second"])
        .await;
    assert!(out.contains(&c_ip), "{out}");
    env.ok(&["network", "disconnect", "n2", "cc"]).await;
    let gone = env
        .docker(&["exec", "cc", "busybox", "ip", "link", "show", "eth1"])
        .await;
    assert!(!gone.status.success(), "{gone:?}");
    let nets = env
        .ok(&[
            "inspect",
            "-f",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            "cc",
        ])
        .await;
    assert_eq!(nets.trim(), "n1");
    // A created container can be connected too; it joins at start.
    env.ok(&[
        "create",
        "--name",
        "late",
        "--network",
        "n1",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&["network", "connect", "n2", "late"]).await;
    env.ok(&["start", "late"]).await;
    let late_ip = ip_on(&env, "late", "n2").await;
    assert!(late_ip.starts_with("10.203.0."), "{late_ip}");
    // Two networks at create (the client's repeated --network).
    env.ok(&[
        "run",
        "-d",
        "--name",
        "multi",
        "--network",
        "n1",
        "--network",
        "n2",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let addrs = env
        .ok(&["exec", "multi", "busybox", "ip", "-4", "-o", "addr"])
        .await;
    assert!(
        addrs.contains("eth0")
            && addrs.contains("10.202.0.")
            && addrs.contains("eth1")
            && addrs.contains("10.203.0."),
        "{addrs}"
    );
    env.ok(&["rm", "-f", "cc", "peer", "late", "multi"]).await;
    env.ok(&["network", "rm", "n1", "n2"]).await;
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_interface_is_torn_down_after_berthd_is_killed_and_restarted() {
    let mut env = DockerEnv::start("").await;
    env.ok(&["network", "create", "--subnet", "10.204.0.0/24", "k1"])
        .await;
    env.ok(&["network", "create", "--subnet", "10.205.0.0/24", "k2"])
        .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "k1",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&["network", "connect", "--alias", "svc", "k2", "srv"])
        .await;
    let srv_ip = ip_on(&env, "srv", "k2").await;
    env.d.kill9().await.expect("kill -9");
    env.d.restart().await.expect("restart");
    // The restarted daemon answers names again, and knows the second interface.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "cli",
        "--network",
        "k2",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let out = env.ok(&["exec", "cli", "busybox", "nslookup", "svc"]).await;
    assert!(out.contains(&srv_ip), "{out}");
    env.ok(&["rm", "-f", "srv", "cli"]).await;
    // The networks' own isolation table stays while they do.
    let left: Vec<String> = network_leftovers(&env.d)
        .into_iter()
        .filter(|l| !l.contains("berth-isolation"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:#?}");
    env.ok(&["network", "rm", "k1", "k2"]).await;
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attaches_roll_back_and_leave_nothing() {
    let env = DockerEnv::start("").await;
    // A /30: one address for containers besides the gateway.
    env.ok(&["network", "create", "--subnet", "10.206.0.0/30", "tiny"])
        .await;
    env.ok(&["network", "create", "--subnet", "10.207.0.0/24", "roomy"])
        .await;
    env.ok(&[
        "run",
        "-d",
        "--name",
        "a1",
        "--network",
        "tiny",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    assert_eq!(ip_on(&env, "a1", "tiny").await, "10.206.0.2");
    let full = env
        .docker(&[
            "run",
            "-d",
            "--name",
            "a2",
            "--network",
            "tiny",
            "busybox",
            "sleep",
            "300",
        ])
        .await;
    assert!(!full.status.success(), "{full:?}");
    assert!(
        stderr(&full).contains("tiny") || stderr(&full).contains("10.206"),
        "{full:?}"
    );
    // The second network of a start failing takes the first one's interface with it.
    env.ok(&[
        "create",
        "--name",
        "a3",
        "--network",
        "roomy",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&["network", "connect", "tiny", "a3"]).await;
    let start = env.docker(&["start", "a3"]).await;
    assert!(!start.status.success(), "{start:?}");
    // A running container's connect failing leaves it as it was.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "a4",
        "--network",
        "roomy",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    let connect = env.docker(&["network", "connect", "tiny", "a4"]).await;
    assert!(!connect.status.success(), "{connect:?}");
    assert!(stderr(&connect).contains("no IP addresses"), "{connect:?}");
    let nets = env
        .ok(&[
            "inspect",
            "-f",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            "a4",
        ])
        .await;
    assert_eq!(nets.trim(), "roomy");
    let eth1 = env
        .docker(&["exec", "a4", "busybox", "ip", "link", "show", "eth1"])
        .await;
    assert!(!eth1.status.success(), "{eth1:?}");
    env.ok(&["rm", "-f", "a1", "a2", "a3", "a4"]).await;
    env.ok(&["network", "rm", "tiny", "roomy"]).await;
    assert_network_clean(&env.d);
}

/// RunPodSandbox of `name` with `io.berth.network` set to `network`; its pod IP.
async fn cri_pod_on(env: &DockerEnv, name: &str, network: &str) -> (String, String) {
    use api::cri;
    let cfg = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        annotations: [("io.berth.network".to_owned(), network.to_owned())].into(),
        ..Default::default()
    };
    let mut rt = env.d.runtime().await.expect("client");
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("run pod {name} on {network:?}: {e:?}"))
        .into_inner()
        .pod_sandbox_id;
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("pod status")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    (id, ip)
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pods_cannot_pick_a_network_by_annotation() {
    use api::cri;
    let env = DockerEnv::start("").await;
    let id = env
        .ok(&["network", "create", "--subnet", "10.208.0.0/24", "tenant"])
        .await;
    let cni_name = format!("docker-{}", &id.trim()[..12]);
    // A docker network's CNI name, and a name of nothing: both the default network, as a
    // CRI pod without the annotation.
    let (on_docker, ip) = cri_pod_on(&env, "sneaky", &cni_name).await;
    assert!(ip.starts_with("10.88."), "{ip}");
    let (unknown, ip) = cri_pod_on(&env, "unknown", "no-such-network").await;
    assert!(ip.starts_with("10.88."), "{ip}");
    // `none` still means loopback only.
    let (none, ip) = cri_pod_on(&env, "loner", "none").await;
    assert!(ip.is_empty(), "{ip}");
    let mut rt = env.d.runtime().await.expect("client");
    for id in [on_docker, unknown, none] {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("stop pod");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .expect("remove pod");
    }
    env.ok(&["network", "rm", "tenant"]).await;
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_after_the_primary_is_disconnected_leaks_no_interface() {
    let env = DockerEnv::start("").await;
    for (subnet, name) in [
        ("10.209.0.0/24", "p1"),
        ("10.210.0.0/24", "p2"),
        ("10.211.0.0/24", "p3"),
    ] {
        env.ok(&["network", "create", "--subnet", subnet, name])
            .await;
    }
    env.ok(&[
        "run",
        "-d",
        "--name",
        "hop",
        "--network",
        "p1",
        "busybox",
        "sleep",
        "300",
    ])
    .await;
    env.ok(&["network", "connect", "p2", "hop"]).await;
    // The primary goes: eth0 with it. What joins next is never a new eth0.
    env.ok(&["network", "disconnect", "p1", "hop"]).await;
    env.ok(&["network", "connect", "p3", "hop"]).await;
    let p3 = ip_on(&env, "hop", "p3").await;
    assert!(p3.starts_with("10.211.0."), "{p3}");
    let links = env
        .ok(&["exec", "hop", "busybox", "ip", "-o", "addr", "show"])
        .await;
    let on_p3 = links
        .lines()
        .find(|l| l.contains(&p3))
        .unwrap_or_else(|| panic!("{p3} in {links}"));
    assert!(!on_p3.contains("eth0"), "{on_p3}");
    // Everything it had goes with it: nothing cached or allocated stays behind.
    env.ok(&["rm", "-f", "hop"]).await;
    env.ok(&["network", "rm", "p1", "p2", "p3"]).await;
    assert_network_clean(&env.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn conflists_and_records_are_reconciled_at_start() {
    let mut env = DockerEnv::start("").await;
    let id = env
        .ok(&["network", "create", "--subnet", "10.212.0.0/24", "kept"])
        .await;
    let id = id.trim().to_owned();
    let managed = env.d.root().join("networks");
    let kept = managed.join(format!("docker-{}.conflist", &id[..12]));
    assert!(kept.exists(), "{}", kept.display());
    env.d.kill9().await.expect("kill -9");
    // As a crash between the two writes leaves them: a record whose conflist is gone, and a
    // marked conflist whose record never was.
    std::fs::remove_file(&kept).expect("rm conflist");
    let orphan_id = "f".repeat(64);
    let orphan = managed.join("docker-ffffffffffff.conflist");
    let body = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "docker-ffffffffffff",
        "io.berth.docker-network": orphan_id,
        "plugins": [{ "type": "berth-bridge", "bridge": "br-ffffffffffff" }],
    });
    std::fs::write(&orphan, body.to_string()).expect("write orphan");
    env.d.restart().await.expect("restart");
    assert!(kept.exists(), "the record's conflist is back");
    assert!(!orphan.exists(), "the orphan conflist is gone");
    env.ok(&["run", "--rm", "--network", "kept", "busybox", "true"])
        .await;
    env.ok(&["network", "rm", "kept"]).await;
    assert!(!kept.exists());
    assert_network_clean(&env.d);
}
