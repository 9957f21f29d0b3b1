//! `berth-bridge` with `berth-host-local`, run as a runtime runs them, on network
//! namespaces, bridges and subnets of the test's own. Root only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{Call, allocation_files, private_host_netns, require_root, result_ips};
use serde_json::{Value, json};

fn bridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-bridge"))
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A test's own bridge name, subnet, allocation dir and network namespaces; removes them
/// all on drop, also when the test fails.
struct Net {
    n: u32,
    bridge: String,
    subnet_prefix: String,
    data_dir: tempfile::TempDir,
    netns: Vec<String>,
}

impl Net {
    fn new() -> Self {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        Net {
            n,
            bridge: format!("bp{}-{n}", pid % 100_000),
            // 10.241.x.0/24 with x distinct per test of this process.
            subnet_prefix: format!("10.241.{}", (pid % 50) * 5 + n % 5),
            data_dir: tempfile::tempdir().expect("tempdir"),
            netns: Vec::new(),
        }
    }

    fn add_netns(&mut self) -> String {
        let name = format!(
            "berthplug-{}-{}-{}",
            std::process::id(),
            self.n,
            self.netns.len()
        );
        let out = ip(&["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        self.netns.push(name.clone());
        name
    }

    fn conf(&self, extra: Value) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("berthplug-{}", self.bridge),
            "type": "berth-bridge",
            "bridge": self.bridge,
            "isDefaultGateway": true,
            "ipMasq": true,
            "hairpinMode": true,
            "ipam": {
                "type": "berth-host-local",
                "subnet": format!("{}.0/24", self.subnet_prefix),
                "dataDir": self.data_dir.path(),
            }
        });
        if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                conf.insert(k.clone(), v.clone());
            }
        }
        conf
    }

    fn gateway(&self) -> String {
        format!("{}.1", self.subnet_prefix)
    }

    fn alloc_dir(&self, conf: &Value) -> PathBuf {
        self.data_dir
            .path()
            .join(conf["name"].as_str().expect("name"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // GC with no valid attachment drops whatever a failed test left of this network:
        // its masquerade chains and its IPAM allocations.
        let mut gc = self.conf(json!({"cniVersion": "1.1.0"}));
        gc["cni.dev/valid-attachments"] = json!([]);
        let _ = Call::new(&bridge_bin(), "GC").run(&gc);
        for ns in &self.netns {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

fn add(conf: &Value, id: &str, ns: &str) -> Value {
    let path = netns_path(ns);
    Call::new(&bridge_bin(), "ADD")
        .id(id)
        .netns(&path)
        .run(conf)
        .expect_ok("bridge ADD")
        .json()
}

fn run(cmd: &str, conf: &Value, id: &str, ns: &str) -> common::Run {
    let path = netns_path(ns);
    Call::new(&bridge_bin(), cmd).id(id).netns(&path).run(conf)
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = prev.clone();
    conf
}

fn ping(ns: &str, target: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "ping", "-c1", "-W1", target])
        .output()
        .expect("run ping")
        .status
        .success()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn nft_table() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "ip", "berth-nat"])
        .output()
        .expect("run nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_pods_ping_each_other_and_the_gateway_and_del_removes_everything() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    let conf = net.conf(json!({}));

    let res_a = add(&conf, "pod-a", &ns_a);
    let res_b = add(&conf, "pod-b", &ns_b);
    assert_eq!(res_a["cniVersion"], "1.0.0");
    let ip_a = result_ips(&res_a)[0].clone();
    let ip_b = result_ips(&res_b)[0].clone();
    assert_ne!(ip_a, ip_b);
    assert_eq!(res_a["ips"][0]["interface"], 2, "{res_a}");
    assert_eq!(res_a["ips"][0]["gateway"], net.gateway().as_str());
    assert_eq!(res_a["interfaces"][0]["name"], net.bridge.as_str());
    assert_eq!(res_a["interfaces"][2]["name"], "eth0");
    assert_eq!(
        res_a["interfaces"][2]["sandbox"],
        netns_path(&ns_a).as_str()
    );
    assert_eq!(
        res_a["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": net.gateway()}]),
        "isDefaultGateway adds the default route"
    );
    let veth_a = res_a["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    let veth_b = res_b["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    assert!(veth_a.starts_with("veth") && link_exists(&veth_a));
    let master = std::fs::read_link(format!("/sys/class/net/{veth_a}/master")).expect("master");
    assert!(master.ends_with(&net.bridge), "{veth_a} is on {master:?}");
    let hairpin = std::fs::read_to_string(format!("/sys/class/net/{veth_a}/brport/hairpin_mode"))
        .expect("hairpin");
    assert_eq!(hairpin.trim(), "1");

    assert!(ping(&ns_a, &ip_b), "pod a cannot reach pod b at {ip_b}");
    assert!(ping(&ns_b, &ip_a), "pod b cannot reach pod a at {ip_a}");
    assert!(
        ping(&ns_a, &net.gateway()),
        "pod a cannot reach the gateway"
    );
    assert!(
        ping(&ns_b, &net.gateway()),
        "pod b cannot reach the gateway"
    );

    let table = nft_table();
    assert!(
        table.contains(&format!("{ip_a} : jump")),
        "no masquerade for a:\n{table}"
    );

    run("CHECK", &with_prev(&conf, &res_a), "pod-a", &ns_a).expect_ok("CHECK a");
    run("CHECK", &with_prev(&conf, &res_b), "pod-b", &ns_b).expect_ok("CHECK b");

    for round in 0..2 {
        run("DEL", &with_prev(&conf, &res_a), "pod-a", &ns_a).expect_ok(&format!("DEL a #{round}"));
    }
    assert!(!link_exists(&veth_a), "{veth_a} survived DEL");
    assert!(link_exists(&veth_b), "DEL of a removed b's veth");
    let table = nft_table();
    assert!(
        !table.contains(&ip_a),
        "a's masquerade rule survived DEL:\n{table}"
    );
    assert!(table.contains(&ip_b), "DEL of a removed b's rule:\n{table}");
    assert!(
        ping(&ns_b, &net.gateway()),
        "b lost its network when a left"
    );
    let failed = run("CHECK", &with_prev(&conf, &res_a), "pod-a", &ns_a);
    assert!(!failed.ok, "CHECK after DEL must fail: {failed:?}");

    // DEL without the namespace (already gone) still releases everything.
    let out = ip(&["netns", "del", &ns_b]);
    assert!(out.status.success(), "{out:?}");
    net.netns.retain(|n| *n != ns_b);
    for round in 0..2 {
        run("DEL", &conf, "pod-b", &ns_b).expect_ok(&format!("DEL b without netns #{round}"));
    }
    assert!(!link_exists(&veth_b), "{veth_b} survived its namespace");
    assert!(
        !nft_table().contains(&ip_b),
        "b's masquerade rule survived DEL"
    );
    assert!(
        allocation_files(&net.alloc_dir(&conf)).is_empty(),
        "IPAM files left: {:?}",
        allocation_files(&net.alloc_dir(&conf))
    );
    assert!(
        link_exists(&net.bridge),
        "the bridge stays, as the reference plugin's does"
    );
    let bridge = net.bridge.clone();
    drop(net);
    assert!(!link_exists(&bridge), "cleanup left the bridge");
}

#[test]
fn del_for_a_netns_the_runtime_disposes_of_leaves_the_veth_to_the_kernel() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    let conf = net.conf(json!({}));
    let res_a = add(&conf, "pod-a", &ns_a);
    let res_b = add(&conf, "pod-b", &ns_b);
    let ip_a = result_ips(&res_a)[0].clone();
    let veth_a = res_a["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();

    let path = netns_path(&ns_a);
    for round in 0..2 {
        Call::new(&bridge_bin(), "DEL")
            .id("pod-a")
            .netns(&path)
            .args("IgnoreUnknown=1;BERTH_NETNS_DISPOSED=true")
            .run(&with_prev(&conf, &res_a))
            .expect_ok(&format!("DEL a #{round}"));
    }
    // The address is released and answers nowhere; the pair waits for its namespace.
    assert!(link_exists(&veth_a), "{veth_a} was deleted, not left");
    let addrs = ip(&["-n", &ns_a, "-o", "addr", "show", "dev", "eth0"]);
    let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
    assert!(!addrs.contains(" inet"), "eth0 kept addresses: {addrs}");
    assert!(
        !allocation_files(&net.alloc_dir(&conf)).contains(&ip_a),
        "{ip_a} still allocated"
    );
    assert!(!nft_table().contains(&ip_a), "a's masquerade rule survived");
    assert!(!ping(&ns_b, &ip_a), "{ip_a} still answers after DEL");

    let out = ip(&["netns", "del", &ns_a]);
    assert!(out.status.success(), "{out:?}");
    net.netns.retain(|n| *n != ns_a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while link_exists(&veth_a) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!link_exists(&veth_a), "{veth_a} outlived its namespace");
    run("DEL", &with_prev(&conf, &res_b), "pod-b", &ns_b).expect_ok("DEL b");
}

#[test]
fn failed_add_rolls_back_and_check_sees_a_broken_pod() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    // A /30 has one address besides the gateway: the second ADD runs out.
    let mut conf = net.conf(json!({"ipMasq": true}));
    conf["ipam"]["subnet"] = json!(format!("{}.0/30", net.subnet_prefix));

    let res_a = add(&conf, "pod-a", &ns_a);
    let before = bridge_ports(&net.bridge);
    assert_eq!(before.len(), 1, "{before:?}");
    let out = run("ADD", &conf, "pod-b", &ns_b);
    assert!(!out.ok, "ADD in a full subnet must fail: {out:?}");
    assert_eq!(
        out.json()["code"],
        100,
        "the IPAM error code is kept: {out:?}"
    );
    assert_eq!(
        bridge_ports(&net.bridge),
        before,
        "the failed ADD left a veth"
    );
    let links = ip(&["netns", "exec", &ns_b, "ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("eth0"),
        "the failed ADD left eth0 in the pod: {links}"
    );

    // Remove the pod's address behind the plugin's back: CHECK must notice.
    let ip_a = &res_a["ips"][0]["address"];
    let out = ip(&[
        "netns",
        "exec",
        &ns_a,
        "ip",
        "addr",
        "del",
        ip_a.as_str().expect("addr"),
        "dev",
        "eth0",
    ]);
    assert!(out.status.success(), "{out:?}");
    let broken = run("CHECK", &with_prev(&conf, &res_a), "pod-a", &ns_a);
    assert!(
        !broken.ok,
        "CHECK must fail without the address: {broken:?}"
    );
    assert_eq!(broken.json()["code"], 102, "{broken:?}");

    run("DEL", &with_prev(&conf, &res_a), "pod-a", &ns_a).expect_ok("DEL a");
    assert!(allocation_files(&net.alloc_dir(&conf)).is_empty());
}

#[test]
fn gc_drops_rules_and_addresses_of_attachments_not_listed() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    let mut conf = net.conf(json!({}));
    conf["cniVersion"] = json!("1.1.0");
    let ip_a = result_ips(&add(&conf, "pod-a", &ns_a))[0].clone();
    let ip_b = result_ips(&add(&conf, "pod-b", &ns_b))[0].clone();

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "pod-b", "ifname": "eth0"}]);
    Call::new(&bridge_bin(), "GC").run(&gc).expect_ok("GC");
    let table = nft_table();
    assert!(
        !table.contains(&format!("{ip_a} ")),
        "GC kept a's rule:\n{table}"
    );
    assert!(
        table.contains(&format!("{ip_b} ")),
        "GC dropped b's rule:\n{table}"
    );
    assert_eq!(allocation_files(&net.alloc_dir(&conf)), [ip_b.as_str()]);

    Call::new(&bridge_bin(), "STATUS")
        .run(&conf)
        .expect_ok("STATUS");
    for (id, ns) in [("pod-a", &ns_a), ("pod-b", &ns_b)] {
        run("DEL", &conf, id, ns).expect_ok("DEL");
    }
    assert!(!nft_table().contains(&format!("{ip_b} ")));
    assert!(allocation_files(&net.alloc_dir(&conf)).is_empty());
}

/// The interfaces enslaved to `bridge`.
fn bridge_ports(bridge: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .expect("list bridge ports")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

#[test]
fn mixes_with_the_reference_plugins_both_ways() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    // berth-bridge delegating to the reference host-local...
    let mut ours = net.conf(json!({"ipMasq": false}));
    ours["ipam"]["type"] = json!("host-local");
    // ...and the reference bridge delegating to berth-host-local, on the same bridge.
    let mut theirs = net.conf(json!({"ipMasq": false, "type": "bridge"}));
    theirs["ipam"]["type"] = json!("berth-host-local");
    let reference = Path::new("/usr/lib/cni/bridge");
    assert!(
        reference.exists(),
        "the reference plugins (containernetworking-plugins) are missing"
    );

    let res_a = add(&ours, "pod-a", &ns_a);
    let path_b = netns_path(&ns_b);
    let res_b = Call::new(reference, "ADD")
        .id("pod-b")
        .netns(&path_b)
        .run(&theirs)
        .expect_ok("reference bridge ADD with berth-host-local")
        .json();
    let ip_a = result_ips(&res_a)[0].clone();
    let ip_b = result_ips(&res_b)[0].clone();
    assert_ne!(ip_a, ip_b, "both IPAM plugins share one allocation store");
    assert!(ping(&ns_a, &ip_b), "a cannot reach b");
    assert!(ping(&ns_b, &net.gateway()), "b cannot reach the gateway");

    run("DEL", &ours, "pod-a", &ns_a).expect_ok("DEL a");
    Call::new(reference, "DEL")
        .id("pod-b")
        .netns(&path_b)
        .run(&theirs)
        .expect_ok("reference DEL b");
    assert!(allocation_files(&net.alloc_dir(&ours)).is_empty());
    assert!(bridge_ports(&net.bridge).is_empty());
}

/// An "outside" host: a namespace behind a veth from the host, on a /30 of its own, with
/// no route back to the pod subnet. Removed on drop.
struct Outside {
    ns: String,
    host_if: String,
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

#[test]
fn traffic_leaving_the_subnet_is_masqueraded() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let pid = std::process::id();
    let outside = Outside {
        ns: format!("berthplug-{pid}-{}-out", net.n),
        host_if: format!("bpo{}-{}", pid % 100_000, net.n),
    };
    let peer = format!("{}p", outside.host_if);
    let (host_addr, far_addr) = (
        format!("10.242.{}.1", (pid % 50) * 5 + net.n % 5),
        format!("10.242.{}.2", (pid % 50) * 5 + net.n % 5),
    );
    for args in [
        vec!["netns", "add", &outside.ns],
        vec![
            "link",
            "add",
            &outside.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ],
        vec!["link", "set", &peer, "netns", &outside.ns],
        vec![
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &outside.host_if,
        ],
        vec!["link", "set", &outside.host_if, "up"],
        vec![
            "-n",
            &outside.ns,
            "addr",
            "add",
            &format!("{far_addr}/30"),
            "dev",
            &peer,
        ],
        vec!["-n", &outside.ns, "link", "set", &peer, "up"],
    ] {
        let out = ip(&args);
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    // Without masquerading the far side has no route back to the pod.
    let plain = net.conf(json!({"ipMasq": false}));
    add(&plain, "pod-a", &ns_a);
    assert!(
        !ping(&ns_a, &far_addr),
        "reached the outside without NAT: test is not isolated"
    );
    run("DEL", &plain, "pod-a", &ns_a).expect_ok("DEL");

    let masq = net.conf(json!({"ipMasq": true}));
    add(&masq, "pod-a", &ns_a);
    assert!(
        ping(&ns_a, &far_addr),
        "the pod cannot reach {far_addr} through masquerading"
    );
    run("DEL", &masq, "pod-a", &ns_a).expect_ok("DEL");
    assert!(
        !ping(&ns_a, &far_addr),
        "the pod still has a network after DEL"
    );
}

#[test]
fn dual_stack_pods_reach_each_other_over_ipv4_and_ipv6() {
    require_root();
    private_host_netns();
    let mut net = Net::new();
    let ns_a = net.add_netns();
    let ns_b = net.add_netns();
    // Never 0: `fd00:241:0::` would print back compressed as `fd00:241::`.
    let v6_subnet = format!(
        "fd00:241:{:x}::",
        (std::process::id() % 50) * 5 + net.n % 5 + 1
    );
    let mut conf = net.conf(json!({}));
    conf["ipam"] = json!({
        "type": "berth-host-local",
        "dataDir": net.data_dir.path(),
        "ranges": [
            [{"subnet": format!("{}.0/24", net.subnet_prefix)}],
            [{"subnet": format!("{v6_subnet}/64")}]
        ]
    });
    let res_a = add(&conf, "pod-a", &ns_a);
    let res_b = add(&conf, "pod-b", &ns_b);
    let ips_b = result_ips(&res_b);
    assert_eq!(ips_b.len(), 2, "{res_b}");
    assert!(ips_b[1].starts_with(&v6_subnet), "{ips_b:?}");
    assert!(ping(&ns_a, &ips_b[0]), "IPv4 a -> b");
    assert!(ping(&ns_a, &ips_b[1]), "IPv6 a -> b");
    assert!(ping(&ns_b, &format!("{v6_subnet}1")), "IPv6 b -> gateway");
    let routes = &res_a["routes"];
    assert!(
        routes
            .as_array()
            .expect("routes")
            .iter()
            .any(|r| r["dst"] == "::/0"),
        "no IPv6 default route: {routes}"
    );
    run("CHECK", &with_prev(&conf, &res_a), "pod-a", &ns_a).expect_ok("CHECK");
    let six = Command::new("nft")
        .args(["list", "table", "ip6", "berth-nat"])
        .output()
        .expect("nft");
    assert!(String::from_utf8_lossy(&six.stdout).contains(&result_ips(&res_a)[1]));
    for (id, ns) in [("pod-a", &ns_a), ("pod-b", &ns_b)] {
        run("DEL", &conf, id, ns).expect_ok("DEL");
    }
    let six = Command::new("nft")
        .args(["list", "table", "ip6", "berth-nat"])
        .output()
        .expect("nft");
    assert!(!String::from_utf8_lossy(&six.stdout).contains(&v6_subnet));
    assert!(allocation_files(&net.alloc_dir(&conf)).is_empty());
}
