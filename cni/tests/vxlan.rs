//! `berth-vxlan` across simulated hosts. Root only.
//!
//! Each test builds its own little cluster: one network namespace per host, joined by veths
//! to a bridge in a "switch" namespace (the underlay, 192.168.241.0/24), and pods as
//! namespaces of their own. The plugins run inside a host's namespace (`ip netns exec`, which
//! also mounts that namespace's /sys), as a runtime on that host runs them, so the VXLAN
//! devices, bridges, routes, nftables rules and sysctls they make live and die with the test's
//! namespaces; the real host is never changed. The cluster CIDR is 10.241.0.0/16, host `i`
//! owns 10.241.<i+1>.0/24. Names carry the process id and a per-test number.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Call, Run, allocation_files, require_root, result_ips};
use serde_json::{Value, json};

const NETWORK: &str = "berthvx-test";
const VNI: u32 = 42;
const DEVICE: &str = "berth.42";
const BRIDGE: &str = "berthvx42";
const CLUSTER: &str = "10.241.0.0/16";

fn vxlan_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-vxlan"))
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"))
}

fn ip_ok(args: &[&str]) -> String {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A simulated host.
struct Host {
    ns: String,
    underlay: String,
    subnet: String,
    data_dir: tempfile::TempDir,
}

/// A test's hosts, switch and pods; every namespace (and with it every device, route and
/// rule in it) is removed on drop, also when the test fails.
struct Cluster {
    tag: String,
    switch: String,
    hosts: Vec<Host>,
    pods: Vec<String>,
    /// The underlay is IPv6 (fd00:241::/64) instead of IPv4.
    v6: bool,
}

impl Cluster {
    fn new(hosts: usize) -> Self {
        Self::with_underlay(hosts, false)
    }

    fn with_underlay(hosts: usize, v6: bool) -> Self {
        require_root();
        let tag = format!(
            "bvx-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut cluster = Cluster {
            switch: format!("{tag}-sw"),
            tag,
            hosts: Vec::new(),
            pods: Vec::new(),
            v6,
        };
        ip_ok(&["netns", "add", &cluster.switch]);
        let sw = cluster.switch.clone();
        ip_ok(&["-n", &sw, "link", "add", "sw0", "type", "bridge"]);
        ip_ok(&["-n", &sw, "link", "set", "sw0", "up"]);
        for i in 0..hosts {
            cluster.add_host(i);
        }
        cluster
    }

    fn add_host(&mut self, i: usize) {
        let ns = format!("{}-h{i}", self.tag);
        ip_ok(&["netns", "add", &ns]);
        self.hosts.push(Host {
            ns: ns.clone(),
            underlay: if self.v6 {
                format!("fd00:241::{:x}", 0x10 + i)
            } else {
                format!("192.168.241.{}", 10 + i)
            },
            subnet: format!("10.241.{}.0/24", i + 1),
            data_dir: tempfile::tempdir().expect("tempdir"),
        });
        let sw = self.switch.clone();
        let port = format!("p{i}");
        ip_ok(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip_ok(&["-n", &sw, "link", "set", &port, "master", "sw0", "up"]);
        if self.v6 {
            // Without DAD the address is usable at once (a tentative one cannot send).
            let addr = format!("{}/64", self.hosts[i].underlay);
            ip_ok(&["-n", &ns, "addr", "add", &addr, "dev", "eth0", "nodad"]);
        } else {
            let addr = format!("{}/24", self.hosts[i].underlay);
            ip_ok(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        }
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    fn host(&self, i: usize) -> &str {
        &self.hosts[i].ns
    }

    /// Host `i`'s configuration with the hosts `peers` as its peers.
    fn conf_with_peers(&self, i: usize, peers: &[usize]) -> Value {
        let h = &self.hosts[i];
        json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "berth-vxlan",
            "vni": VNI,
            "localIP": h.underlay,
            "subnet": h.subnet,
            "clusterCIDR": CLUSTER,
            "ipMasq": true,
            "peers": peers.iter().map(|&p| json!({
                "ip": self.hosts[p].underlay,
                "subnet": self.hosts[p].subnet,
            })).collect::<Vec<_>>(),
            // The test's own allocation store; the plugin fills in the subnet.
            "ipam": {"type": "berth-host-local", "dataDir": h.data_dir.path()},
        })
    }

    /// Host `i`'s configuration with every other host as a peer.
    fn conf(&self, i: usize) -> Value {
        let peers: Vec<usize> = (0..self.hosts.len()).filter(|p| *p != i).collect();
        self.conf_with_peers(i, &peers)
    }

    fn add_pod(&mut self) -> String {
        let ns = format!("{}-p{}", self.tag, self.pods.len());
        ip_ok(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn del_pod_netns(&mut self, ns: &str) {
        ip_ok(&["netns", "del", ns]);
        self.pods.retain(|p| p != ns);
    }

    fn run(&self, host: usize, cmd: &str, conf: &Value, id: &str, pod: &str) -> Run {
        let path = netns_path(pod);
        Call::new(&vxlan_bin(), cmd)
            .host(self.host(host))
            .id(id)
            .netns(&path)
            .run(conf)
    }

    fn add(&self, host: usize, conf: &Value, id: &str, pod: &str) -> Value {
        self.run(host, "ADD", conf, id, pod)
            .expect_ok(&format!("ADD {id} on host {host}"))
            .json()
    }

    fn alloc_dir(&self, host: usize) -> PathBuf {
        self.hosts[host].data_dir.path().join(NETWORK)
    }

    /// `ip <args>` in host `i`.
    fn ip(&self, i: usize, args: &[&str]) -> String {
        let mut all = vec!["-n", self.host(i)];
        all.extend_from_slice(args);
        ip_ok(&all)
    }

    fn fdb(&self, i: usize) -> String {
        let out = Command::new("bridge")
            .args(["-n", self.host(i), "fdb", "show", "dev", DEVICE])
            .output()
            .expect("run bridge");
        assert!(out.status.success(), "bridge fdb show: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in self
            .pods
            .iter()
            .chain(self.hosts.iter().map(|h| &h.ns))
            .chain([&self.switch])
        {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = prev.clone();
    conf
}

/// Pings `target` from inside the namespace `ns`.
fn ping(ns: &str, target: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "ping", "-c1", "-W2", target])
        .output()
        .expect("run ping")
        .status
        .success()
}

/// Runs `f` on a thread inside the network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(netns_path(ns)).unwrap_or_else(|e| panic!("open {ns}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Connects over TCP from namespace `client` to `server_ip` in namespace `server` and
/// returns the source address the server saw.
fn tcp_source(client: &str, server: &str, server_ip: &str) -> IpAddr {
    let listener = in_netns(server, || TcpListener::bind("0.0.0.0:0").expect("bind"));
    let port = listener.local_addr().expect("local addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let target: SocketAddr = format!("{server_ip}:{port}").parse().expect("addr");
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            in_netns(client, || {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect from {client} to {target}: {e}"));
                stream.write_all(b"hello").expect("write");
            })
        });
        let deadline = Instant::now() + Duration::from_secs(6);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(conn) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection to {target} arrived"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"hello");
        handle.join().expect("client");
        peer.ip()
    })
}

#[test]
fn pods_on_two_hosts_talk_with_their_real_addresses() {
    let mut c = Cluster::new(2);
    let (pod_a, pod_b) = (c.add_pod(), c.add_pod());
    let (conf0, conf1) = (c.conf(0), c.conf(1));
    let res_a = c.add(0, &conf0, "pod-a", &pod_a);
    let res_b = c.add(1, &conf1, "pod-b", &pod_b);
    let ip_a = result_ips(&res_a)[0].clone();
    let ip_b = result_ips(&res_b)[0].clone();
    assert!(ip_a.starts_with("10.241.1."), "{res_a}");
    assert!(ip_b.starts_with("10.241.2."), "{res_b}");
    assert_eq!(res_a["cniVersion"], "1.0.0");
    assert_eq!(res_a["interfaces"][0]["name"], BRIDGE);
    assert_eq!(res_a["ips"][0]["gateway"], "10.241.1.1");
    assert_eq!(
        res_a["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.241.1.1"}])
    );

    // The device as flannel would have made it, with the MAC of host 0's underlay address.
    let dev = c.ip(0, &["-d", "link", "show", DEVICE]);
    for want in [
        "vxlan id 42 local 192.168.241.10 ",
        "dstport 4789 nolearning",
        "link/ether 0e:be:c0:a8:f1:0a",
        "mtu 1450 ",
        ",UP,",
    ] {
        assert!(dev.contains(want), "{want:?} not in:\n{dev}");
    }
    let addr = c.ip(0, &["-4", "-o", "addr", "show", "dev", DEVICE]);
    assert!(addr.contains("10.241.1.0/32"), "{addr}");
    let routes = c.ip(0, &["route", "show", "10.241.2.0/24"]);
    assert!(
        routes.contains("via 10.241.2.0 dev berth.42 onlink"),
        "{routes}"
    );
    let neigh = c.ip(0, &["neigh", "show", "dev", DEVICE]);
    assert!(
        neigh.contains("10.241.2.0 lladdr 0e:be:c0:a8:f1:0b PERMANENT"),
        "{neigh}"
    );
    let fdb = c.fdb(0);
    assert!(
        fdb.contains("0e:be:c0:a8:f1:0b dst 192.168.241.11 self permanent"),
        "{fdb}"
    );
    let pod_mtu = ip_ok(&["-n", &pod_a, "link", "show", "eth0"]);
    assert!(
        pod_mtu.contains("mtu 1450 "),
        "pods get the overlay MTU: {pod_mtu}"
    );

    assert!(ping(&pod_a, &ip_b), "pod a cannot reach pod b at {ip_b}");
    assert!(ping(&pod_b, &ip_a), "pod b cannot reach pod a at {ip_a}");
    // Inside the cluster nobody is NATed, both ways...
    let seen = tcp_source(&pod_a, &pod_b, &ip_b);
    assert_eq!(seen.to_string(), ip_a, "pod b saw a NATed source");
    let seen = tcp_source(&pod_b, &pod_a, &ip_a);
    assert_eq!(seen.to_string(), ip_b, "pod a saw a NATed source");
    // ...while traffic leaving the cluster CIDR is masqueraded behind the host's address.
    let seen = tcp_source(&pod_a, c.host(1), "192.168.241.11");
    assert_eq!(
        seen.to_string(),
        "192.168.241.10",
        "traffic to outside the cluster was not masqueraded"
    );
    // The host itself reaches remote pods from its device address.
    assert!(ping(c.host(0), &ip_b), "host 0 cannot reach pod b");

    c.run(0, "CHECK", &with_prev(&conf0, &res_a), "pod-a", &pod_a)
        .expect_ok("CHECK a");
    c.run(1, "CHECK", &with_prev(&conf1, &res_b), "pod-b", &pod_b)
        .expect_ok("CHECK b");

    for round in 0..2 {
        c.run(0, "DEL", &with_prev(&conf0, &res_a), "pod-a", &pod_a)
            .expect_ok(&format!("DEL a #{round}"));
    }
    assert!(!ping(&pod_b, &ip_a), "pod a still answers after DEL");
    assert!(allocation_files(&c.alloc_dir(0)).is_empty());
    let dev = c.ip(0, &["link", "show"]);
    assert!(
        dev.contains(DEVICE),
        "the device stays for other pods:\n{dev}"
    );
    let failed = c.run(0, "CHECK", &with_prev(&conf0, &res_a), "pod-a", &pod_a);
    assert!(!failed.ok, "CHECK after DEL must fail: {failed:?}");

    // DEL after the pod's namespace is gone still releases its address and rules.
    c.del_pod_netns(&pod_b);
    for round in 0..2 {
        c.run(1, "DEL", &conf1, "pod-b", &pod_b)
            .expect_ok(&format!("DEL b without netns #{round}"));
    }
    assert!(allocation_files(&c.alloc_dir(1)).is_empty());
    let nft = Command::new("ip")
        .args(["netns", "exec", c.host(1), "nft", "list", "ruleset"])
        .output()
        .expect("nft");
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(!nft.contains(&ip_b), "b's masquerade rule survived:\n{nft}");
}

#[test]
fn three_hosts_all_reach_each_other_and_a_removed_peer_is_cleaned_up() {
    let mut c = Cluster::new(3);
    let pods: Vec<String> = (0..3).map(|_| c.add_pod()).collect();
    let mut ips = Vec::new();
    let mut results = Vec::new();
    for (h, pod) in pods.iter().enumerate() {
        let res = c.add(h, &c.conf(h), &format!("pod-{h}"), pod);
        ips.push(result_ips(&res)[0].clone());
        results.push(res);
    }
    for (from, pod) in pods.iter().enumerate() {
        for (to, ip) in ips.iter().enumerate() {
            if from != to {
                assert!(
                    ping(pod, ip),
                    "pod on host {from} cannot reach host {to}'s {ip}"
                );
            }
        }
    }

    // Host 2 leaves host 0's configuration: the next ADD on host 0 drops its entries.
    let shrunk = c.conf_with_peers(0, &[1]);
    let extra = c.add_pod();
    c.add(0, &shrunk, "pod-0b", &extra);
    let routes = c.ip(0, &["route", "show"]);
    assert!(!routes.contains("10.241.3.0/24"), "stale route:\n{routes}");
    assert!(routes.contains("10.241.2.0/24 via 10.241.2.0"), "{routes}");
    let neigh = c.ip(0, &["neigh", "show", "dev", DEVICE]);
    assert!(!neigh.contains("10.241.3.0"), "stale neighbour:\n{neigh}");
    assert!(neigh.contains("10.241.2.0"), "{neigh}");
    let fdb = c.fdb(0);
    assert!(!fdb.contains("192.168.241.12"), "stale fdb entry:\n{fdb}");
    assert!(fdb.contains("192.168.241.11"), "{fdb}");
    assert!(ping(&pods[0], &ips[1]), "host 1 is still a peer");
    assert!(!ping(&pods[0], &ips[2]), "host 2 is still reachable");

    // CHECK with the old list notices what is missing.
    let res0 = &results[0];
    let broken = c.run(0, "CHECK", &with_prev(&c.conf(0), res0), "pod-0", &pods[0]);
    assert!(
        !broken.ok,
        "CHECK must fail without host 2's route: {broken:?}"
    );
    assert_eq!(broken.json()["code"], 102, "{broken:?}");
    assert!(
        broken
            .stdout
            .contains("no route to peer subnet 10.241.3.0/24"),
        "{broken:?}"
    );
    c.run(0, "CHECK", &with_prev(&shrunk, res0), "pod-0", &pods[0])
        .expect_ok("CHECK with the current list");

    // Back in the list, back in the network.
    let again = c.add_pod();
    c.add(0, &c.conf(0), "pod-0c", &again);
    assert!(ping(&pods[0], &ips[2]), "host 2 is back in the list");
}

#[test]
fn a_host_that_changes_its_underlay_address_is_followed() {
    let mut c = Cluster::new(2);
    let (pod_a, pod_b) = (c.add_pod(), c.add_pod());
    let ip_a = result_ips(&c.add(0, &c.conf(0), "pod-a", &pod_a))[0].clone();
    let ip_b = result_ips(&c.add(1, &c.conf(1), "pod-b", &pod_b))[0].clone();
    assert!(ping(&pod_a, &ip_b));

    // Host 1 moves to another underlay address; both configurations follow.
    // (Removing the primary address first: it takes secondaries of its subnet with it.)
    c.ip(1, &["addr", "del", "192.168.241.11/24", "dev", "eth0"]);
    c.ip(1, &["addr", "add", "192.168.241.20/24", "dev", "eth0"]);
    c.hosts[1].underlay = "192.168.241.20".into();
    let pod_b2 = c.add_pod();
    c.add(1, &c.conf(1), "pod-b2", &pod_b2);
    let dev = c.ip(1, &["-d", "link", "show", DEVICE]);
    assert!(
        dev.contains("local 192.168.241.20 ") && dev.contains("0e:be:c0:a8:f1:14"),
        "host 1's device was not re-made for its new address:\n{dev}"
    );
    let pod_a2 = c.add_pod();
    c.add(0, &c.conf(0), "pod-a2", &pod_a2);
    let fdb = c.fdb(0);
    assert!(
        fdb.contains("0e:be:c0:a8:f1:14 dst 192.168.241.20") && !fdb.contains("f1:0b"),
        "{fdb}"
    );
    let neigh = c.ip(0, &["neigh", "show", "dev", DEVICE]);
    assert!(
        neigh.contains("lladdr 0e:be:c0:a8:f1:14 PERMANENT"),
        "{neigh}"
    );
    assert!(ping(&pod_a, &ip_b), "old pods talk over the moved host");
    assert!(ping(&pod_b, &ip_a), "and back");
}

#[test]
fn an_ipv6_underlay_carries_the_ipv4_pod_network() {
    let mut c = Cluster::with_underlay(2, true);
    let (pod_a, pod_b) = (c.add_pod(), c.add_pod());
    let res_a = c.add(0, &c.conf(0), "pod-a", &pod_a);
    let ip_a = result_ips(&res_a)[0].clone();
    let ip_b = result_ips(&c.add(1, &c.conf(1), "pod-b", &pod_b))[0].clone();
    let dev = c.ip(0, &["-d", "link", "show", DEVICE]);
    assert!(
        dev.contains("local fd00:241::10 ") && dev.contains("mtu 1430 "),
        "IPv6 encapsulation costs 70 bytes:\n{dev}"
    );
    let fdb = c.fdb(0);
    assert!(fdb.contains("dst fd00:241::11 self permanent"), "{fdb}");
    assert!(ping(&pod_a, &ip_b), "pod a cannot reach pod b over IPv6");
    assert!(ping(&pod_b, &ip_a), "pod b cannot reach pod a over IPv6");
    assert_eq!(tcp_source(&pod_b, &pod_a, &ip_a).to_string(), ip_b);
    c.run(0, "CHECK", &with_prev(&c.conf(0), &res_a), "pod-a", &pod_a)
        .expect_ok("CHECK");
}

#[test]
fn concurrent_adds_on_a_fresh_host_share_one_device_and_gc_releases_the_rest() {
    let mut c = Cluster::new(2);
    let pods: Vec<String> = (0..4).map(|_| c.add_pod()).collect();
    let remote = c.add_pod();
    let mut conf = c.conf(0);
    conf["cniVersion"] = json!("1.1.0");
    let results: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (c, conf) = (&c, &conf);
                s.spawn(move || c.run(0, "ADD", conf, &format!("pod-{i}"), pod))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut ips = Vec::new();
    for (i, run) in results.into_iter().enumerate() {
        let res = run.expect_ok(&format!("concurrent ADD {i}")).json();
        ips.push(result_ips(&res)[0].clone());
    }
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{ips:?}");
    let links = c.ip(0, &["-o", "link", "show", "type", "vxlan"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    let routes = c.ip(0, &["route", "show", "10.241.2.0/24"]);
    assert_eq!(routes.lines().count(), 1, "{routes}");

    let remote_ip = result_ips(&c.add(1, &c.conf(1), "remote", &remote))[0].clone();
    for (pod, ip) in pods.iter().zip(&ips) {
        assert!(ping(pod, &remote_ip), "{ip} cannot reach {remote_ip}");
    }

    // GC keeps the listed attachments only.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": "pod-0", "ifname": "eth0"},
        {"containerID": "pod-1", "ifname": "eth0"}
    ]);
    Call::new(&vxlan_bin(), "GC")
        .host(c.host(0))
        .run(&gc)
        .expect_ok("GC");
    let mut kept = ips[..2].to_vec();
    kept.sort();
    assert_eq!(allocation_files(&c.alloc_dir(0)), kept);
    Call::new(&vxlan_bin(), "STATUS")
        .host(c.host(0))
        .run(&conf)
        .expect_ok("STATUS");
}

#[test]
fn bad_configurations_fail_clearly_and_change_nothing() {
    let c = Cluster::new(1);
    let mut pod = c.tag.clone();
    pod.push_str("-none");
    let run = |conf: &Value| c.run(0, "ADD", conf, "pod-x", &pod);
    let base = c.conf_with_peers(0, &[]);
    for (changes, code, needle) in [
        (
            json!({"subnet": "10.242.1.0/24"}),
            7,
            "subnet 10.242.1.0/24 is not inside clusterCIDR 10.241.0.0/16",
        ),
        (
            json!({"peers": [{"ip": "192.168.241.11", "subnet": "10.241.1.0/25"}]}),
            7,
            "peers[0].subnet 10.241.1.0/25 overlaps this host's subnet 10.241.1.0/24",
        ),
        (json!({"vni": 0}), 7, "vni 0 is not in 1..=16777215"),
        (
            json!({"device": "berth.vxlan.dev0"}),
            7,
            "device \"berth.vxlan.dev0\" is not a valid interface name",
        ),
        (
            json!({"localIP": "192.168.241.99"}),
            7,
            "localIP 192.168.241.99 is not an address of this host",
        ),
    ] {
        let mut conf = base.clone();
        for (k, v) in changes.as_object().expect("object") {
            conf[k] = v.clone();
        }
        let out = run(&conf);
        assert!(!out.ok, "{changes} was accepted: {out:?}");
        let reply = out.json();
        assert_eq!(reply["code"], code, "{out:?}");
        let msg = reply["msg"].as_str().expect("msg");
        assert!(msg.contains(needle), "{changes}: {msg:?} lacks {needle:?}");
    }
    let links = c.ip(0, &["-o", "link", "show"]);
    assert!(
        !links.contains(DEVICE) && !links.contains(BRIDGE),
        "a rejected configuration changed the host:\n{links}"
    );

    // A device of that name that is not ours is never taken over.
    c.ip(0, &["link", "add", DEVICE, "type", "bridge"]);
    let out = run(&base);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stdout
            .contains("berth.42 exists and is not a vxlan device (bridge)"),
        "{out:?}"
    );
    c.ip(0, &["link", "del", DEVICE]);

    // STATUS says whether this host can be a VTEP at all.
    let mut away = base.clone();
    away["cniVersion"] = json!("1.1.0");
    away["localIP"] = json!("192.168.241.99");
    let out = Call::new(&vxlan_bin(), "STATUS").host(c.host(0)).run(&away);
    assert!(!out.ok, "{out:?}");
    assert_eq!(out.json()["code"], 50, "{out:?}");

    let out = Call::new(&vxlan_bin(), "VERSION")
        .run(&json!({"cniVersion": "1.1.0"}))
        .expect_ok("VERSION");
    let versions = out.json()["supportedVersions"].clone();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            versions.as_array().expect("list").contains(&json!(v)),
            "{versions}"
        );
    }
}
