//! `berth-portmap` chained after `berth-bridge` (with `berth-host-local`) as a runtime chains
//! them, each test in a host stand-in network namespace of its own (see
//! [`private_host_netns`]) with pods, an "external" namespace behind a veth, and real TCP and
//! UDP servers in the pods. Root only.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Call, private_host_netns, require_root, result_ips};
use serde_json::{Value, json};

fn bridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-bridge"))
}

fn portmap_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-portmap"))
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"))
}

fn must_ip(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

/// The pod subnets; every test has a host stand-in namespace of its own, so they are fixed.
const SUBNET4: &str = "10.250.0";
const SUBNET6: &str = "fd00:250::";
/// Host addresses on an interface of the host stand-in that leads nowhere.
const HOST_A: &str = "192.0.2.1";
const HOST_B: &str = "192.0.2.2";
const HOST_6: &str = "2001:db8::1";
/// The link between the host stand-in and the external namespace.
const LINK_HOST: &str = "198.51.100.1";
const LINK_FAR: &str = "198.51.100.2";
const LINK6_HOST: &str = "2001:db8:1::1";
const LINK6_FAR: &str = "2001:db8:1::2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A test's bridge network, pods and external namespace in its host stand-in. On drop
/// (also when the test fails) GC removes every rule and address of the test's networks and
/// the namespaces are deleted.
struct Net {
    n: u32,
    data_dir: tempfile::TempDir,
    dual_stack: bool,
    netns: Vec<String>,
    networks: Vec<String>,
}

/// One pod: its bridge result and the portmap configuration it was added with.
struct Pod {
    id: String,
    ns: String,
    bridge_result: Value,
    portmap_conf: Value,
}

impl Pod {
    fn portmap(&self, cmd: &str) -> common::Run {
        portmap(cmd, &self.portmap_conf, &self.id, &self.ns)
    }
}

impl Net {
    /// Call after [`private_host_netns`]: gives the host stand-in its addresses.
    fn new(dual_stack: bool) -> Self {
        require_root();
        let net = Net {
            n: NEXT.fetch_add(1, Ordering::SeqCst),
            data_dir: tempfile::tempdir().expect("tempdir"),
            dual_stack,
            netns: Vec::new(),
            networks: Vec::new(),
        };
        // This kernel has no dummy links: a veth pair of the stand-in's own carries them.
        must_ip(&["link", "add", "hd0", "type", "veth", "peer", "name", "hd0p"]);
        must_ip(&["link", "set", "hd0p", "up"]);
        must_ip(&["addr", "add", &format!("{HOST_A}/32"), "dev", "hd0"]);
        must_ip(&["addr", "add", &format!("{HOST_B}/32"), "dev", "hd0"]);
        must_ip(&[
            "addr",
            "add",
            &format!("{HOST_6}/128"),
            "dev",
            "hd0",
            "nodad",
        ]);
        must_ip(&["link", "set", "hd0", "up"]);
        net
    }

    fn add_netns(&mut self) -> String {
        let name = format!(
            "berthpm-{}-{}-{}",
            std::process::id(),
            self.n,
            self.netns.len()
        );
        must_ip(&["netns", "add", &name]);
        must_ip(&["-n", &name, "link", "set", "lo", "up"]);
        self.netns.push(name.clone());
        name
    }

    /// An "external" host: a namespace behind a veth from the host stand-in, routed to the
    /// host (not to the pods).
    fn external(&mut self) -> String {
        let ns = self.add_netns();
        must_ip(&[
            "link", "add", "ext0", "type", "veth", "peer", "name", "ext0p",
        ]);
        must_ip(&["link", "set", "ext0p", "netns", &ns]);
        must_ip(&["addr", "add", &format!("{LINK_HOST}/30"), "dev", "ext0"]);
        must_ip(&[
            "addr",
            "add",
            &format!("{LINK6_HOST}/64"),
            "dev",
            "ext0",
            "nodad",
        ]);
        must_ip(&["link", "set", "ext0", "up"]);
        must_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{LINK_FAR}/30"),
            "dev",
            "ext0p",
        ]);
        must_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{LINK6_FAR}/64"),
            "dev",
            "ext0p",
            "nodad",
        ]);
        must_ip(&["-n", &ns, "link", "set", "ext0p", "up"]);
        must_ip(&["-n", &ns, "route", "add", "default", "via", LINK_HOST]);
        must_ip(&[
            "-n", &ns, "-6", "route", "add", "default", "via", LINK6_HOST,
        ]);
        ns
    }

    fn network(&self) -> String {
        format!("berthpm-{}-{}", std::process::id(), self.n)
    }

    fn bridge_conf(&self) -> Value {
        let mut ranges = vec![json!([{"subnet": format!("{SUBNET4}.0/24")}])];
        if self.dual_stack {
            ranges.push(json!([{"subnet": format!("{SUBNET6}/64")}]));
        }
        json!({
            "cniVersion": "1.0.0",
            "name": self.network(),
            "type": "berth-bridge",
            "bridge": "bpm0",
            "isDefaultGateway": true,
            "hairpinMode": true,
            // Masquerading makes conntrack track every flow of the stand-in, as on a real host.
            "ipMasq": true,
            "ipam": {
                "type": "berth-host-local",
                "ranges": ranges,
                "dataDir": self.data_dir.path(),
            }
        })
    }

    /// The portmap configuration of network `network` with `mappings` and the extra keys.
    fn portmap_conf(&mut self, network: &str, mappings: Value, extra: Value) -> Value {
        if !self.networks.iter().any(|n| n == network) {
            self.networks.push(network.to_string());
        }
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "berth-portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings},
        });
        for (k, v) in extra.as_object().expect("extra keys") {
            conf[k] = v.clone();
        }
        conf
    }

    fn gateway(&self) -> String {
        format!("{SUBNET4}.1")
    }

    fn gateway6(&self) -> String {
        format!("{SUBNET6}1")
    }

    /// A pod in a new namespace on the bridge, with `mappings` (`extra` configuration keys)
    /// set up by berth-portmap chained after berth-bridge.
    fn pod(&mut self, id: &str, mappings: Value, extra: Value) -> Pod {
        let ns = self.add_netns();
        let path = netns_path(&ns);
        let bridge_result = Call::new(&bridge_bin(), "ADD")
            .id(id)
            .netns(&path)
            .run(&self.bridge_conf())
            .expect_ok("bridge ADD")
            .json();
        let mut portmap_conf = self.portmap_conf(&self.network(), mappings, extra);
        portmap_conf["prevResult"] = bridge_result.clone();
        let pod = Pod {
            id: id.to_string(),
            ns,
            bridge_result,
            portmap_conf,
        };
        let out = pod.portmap("ADD").expect_ok("portmap ADD").json();
        assert_eq!(
            out["ips"], pod.bridge_result["ips"],
            "portmap passes prevResult on"
        );
        pod
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // GC with no valid attachment drops whatever a failed test left of its networks.
        for network in &self.networks {
            let gc = json!({"cniVersion": "1.1.0", "name": network, "type": "berth-portmap",
                "cni.dev/valid-attachments": []});
            let _ = Call::new(&portmap_bin(), "GC").run(&gc);
        }
        let mut gc = self.bridge_conf();
        gc["cniVersion"] = json!("1.1.0");
        gc["cni.dev/valid-attachments"] = json!([]);
        let _ = Call::new(&bridge_bin(), "GC").run(&gc);
        for ns in &self.netns {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", "bpm0"]);
    }
}

fn portmap(cmd: &str, conf: &Value, id: &str, ns: &str) -> common::Run {
    let path = netns_path(ns);
    Call::new(&portmap_bin(), cmd).id(id).netns(&path).run(conf)
}

/// `nft list table <family> berth-portmap`; `None` if there is no such table.
fn table(family: &str) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", family, "berth-portmap"])
        .output()
        .expect("run nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(script: &str) {
    let out = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run nft");
    assert!(out.status.success(), "nft {script:?}: {out:?}");
}

/// Runs `f` on a thread in network namespace `ns` (in the caller's own if `None`).
fn in_ns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    let Some(ns) = ns else {
        return f();
    };
    let file = File::open(netns_path(ns)).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
            f()
        })
        .join()
        .expect("thread in netns")
    })
}

fn addr(host: &str, port: u16) -> SocketAddr {
    format!("{}:{port}", wrap_v6(host))
        .parse()
        .expect("address")
}

fn wrap_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// Connects from namespace `ns` to `host:port` and returns what the server says.
fn tcp_get(ns: Option<&str>, host: &str, port: u16) -> Result<String, String> {
    let to = addr(host, port);
    in_ns(ns, || {
        let mut stream = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        stream.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_string())
    })
}

/// Sends one datagram from namespace `ns` to `host:port` and returns the answer.
fn udp_get(ns: Option<&str>, host: &str, port: u16) -> Result<String, String> {
    udp_get_from(ns, 0, host, port)
}

/// [`udp_get`] from source port `from` (any if 0).
fn udp_get_from(ns: Option<&str>, from: u16, host: &str, port: u16) -> Result<String, String> {
    let to = addr(host, port);
    in_ns(ns, || {
        let local = if to.is_ipv4() {
            format!("0.0.0.0:{from}")
        } else {
            format!("[::]:{from}")
        };
        let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        socket.send_to(b"ping", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 256];
        let (n, _) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })
}

/// A server in a pod's namespace on `[::]:port` answering every connection (TCP) or
/// datagram (UDP) with `"<tag> <peer address>"`. Stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn tcp(ns: &str, port: u16, tag: &str) -> Self {
        Self::start(ns, port, tag, false)
    }

    fn udp(ns: &str, port: u16, tag: &str) -> Self {
        Self::start(ns, port, tag, true)
    }

    fn start(ns: &str, port: u16, tag: &str, udp: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let file = File::open(netns_path(ns)).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
        let (tag, flag) = (tag.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let serve = || -> std::io::Result<()> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let bind = format!("[::]:{port}");
                if udp {
                    let socket = UdpSocket::bind(&bind)?;
                    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
                    let _ = ready_tx.send(Ok(()));
                    let mut buf = [0u8; 256];
                    while !flag.load(Ordering::SeqCst) {
                        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                            let reply = format!("{tag} {}", peer.ip().to_canonical());
                            let _ = socket.send_to(reply.as_bytes(), peer);
                        }
                    }
                } else {
                    let listener = TcpListener::bind(&bind)?;
                    listener.set_nonblocking(true)?;
                    let _ = ready_tx.send(Ok(()));
                    while !flag.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((mut stream, peer)) => {
                                let _ = stream.set_nonblocking(false);
                                let _ = writeln!(stream, "{tag} {}", peer.ip().to_canonical());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }
                Ok(())
            };
            if let Err(e) = serve() {
                let _ = ready_tx.send(Err(e.to_string()));
            }
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("server thread started")
            .unwrap_or_else(|e| panic!("server in {ns}: {e}"));
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tcp_mapping(host_port: u16, container_port: u16) -> Value {
    json!([{"hostPort": host_port, "containerPort": container_port, "protocol": "tcp", "hostIP": ""}])
}

fn set_bridge_nf_call(on: bool) {
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if std::path::Path::new(path).exists() {
        std::fs::write(path, if on { "1" } else { "0" }).expect("set bridge-nf-call-iptables");
    }
}

#[test]
fn tcp_host_port_reaches_the_pod_from_the_host_outside_other_pods_and_itself() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let ext = net.external();
    let a = net.pod("pod-a", tcp_mapping(8080, 80), json!({}));
    let b = net.pod("pod-b", json!([]), json!({}));
    let _server = Server::tcp(&a.ns, 80, "pod-a");
    let gw = net.gateway();

    assert_eq!(
        tcp_get(None, "127.0.0.1", 8080),
        Ok(format!("pod-a {gw}")),
        "host via loopback (masqueraded)"
    );
    let bridge_port = std::fs::read_to_string("/proc/sys/net/ipv4/conf/bpm0/route_localnet")
        .expect("route_localnet");
    assert_eq!(bridge_port.trim(), "1", "route_localnet on the bridge");
    assert_eq!(
        tcp_get(None, HOST_A, 8080),
        Ok(format!("pod-a {HOST_A}")),
        "host via its own address (source kept)"
    );
    assert_eq!(
        tcp_get(Some(&ext), LINK_HOST, 8080),
        Ok(format!("pod-a {LINK_FAR}")),
        "external host via the link address (client address kept)"
    );
    assert_eq!(
        tcp_get(Some(&ext), HOST_A, 8080),
        Ok(format!("pod-a {LINK_FAR}")),
        "external host via another host address"
    );
    // Pods on the bridge, with and without br_netfilter passing bridged traffic to nftables:
    // either way the pod's reply must come back through the host.
    for nf_call in [true, false] {
        set_bridge_nf_call(nf_call);
        assert_eq!(
            tcp_get(Some(&b.ns), HOST_A, 8080),
            Ok(format!("pod-a {gw}")),
            "another pod on the bridge (bridge-nf-call-iptables={nf_call})"
        );
        assert_eq!(
            tcp_get(Some(&a.ns), HOST_A, 8080),
            Ok(format!("pod-a {gw}")),
            "hairpin: the pod to itself (bridge-nf-call-iptables={nf_call})"
        );
    }
    assert!(
        tcp_get(None, HOST_A, 8081).is_err(),
        "an unmapped port is forwarded"
    );
    a.portmap("CHECK").expect_ok("CHECK");
    b.portmap("CHECK").expect_ok("CHECK without mappings");
    assert!(table("ip6").is_none(), "IPv6 table for an IPv4-only pod");

    for round in 0..2 {
        a.portmap("DEL").expect_ok(&format!("DEL #{round}"));
    }
    b.portmap("DEL").expect_ok("DEL without mappings");
    assert_eq!(table("ip"), None, "the last DEL leaves no table");
    for (ns, host) in [
        (None, "127.0.0.1"),
        (None, HOST_A),
        (Some(ext.as_str()), LINK_HOST),
    ] {
        let got = tcp_get(ns, host, 8080);
        assert!(
            got.is_err(),
            "{host}:8080 still forwarded after DEL: {got:?}"
        );
    }
    assert!(!a.portmap("CHECK").ok, "CHECK after DEL must fail");
}

#[test]
fn udp_host_port_answers_also_a_client_that_tried_before_add() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let ext = net.external();
    let mut a = net.pod("pod-a", json!([]), json!({}));
    let _server = Server::udp(&a.ns, 53, "pod-a");
    // A client that sent before the mapping existed left a conntrack entry without NAT;
    // its next datagrams from the same port must be forwarded all the same.
    let early = udp_get_from(Some(&ext), 40053, LINK_HOST, 5353);
    assert!(early.is_err(), "answered before ADD: {early:?}");
    a.portmap_conf["runtimeConfig"]["portMappings"] =
        json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]);
    a.portmap("ADD").expect_ok("ADD with the mapping");
    assert_eq!(
        udp_get_from(Some(&ext), 40053, LINK_HOST, 5353),
        Ok(format!("pod-a {LINK_FAR}")),
        "the client that tried before ADD"
    );
    assert_eq!(
        udp_get(Some(&ext), LINK_HOST, 5353),
        Ok(format!("pod-a {LINK_FAR}"))
    );
    assert_eq!(udp_get(None, HOST_A, 5353), Ok(format!("pod-a {HOST_A}")));
    assert!(
        tcp_get(None, HOST_A, 5353).is_err(),
        "a UDP mapping forwards TCP"
    );
    a.portmap("CHECK").expect_ok("CHECK");
    a.portmap("DEL").expect_ok("DEL");
    assert_eq!(table("ip"), None);
}

#[test]
fn host_ip_mappings_answer_only_on_their_address() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let ext = net.external();
    let on = |host_ip: &str| json!([{"hostPort": 8080, "containerPort": 80, "hostIP": host_ip}]);
    let a = net.pod("pod-a", on(HOST_A), json!({}));
    let b = net.pod("pod-b", on(HOST_B), json!({}));
    let _sa = Server::tcp(&a.ns, 80, "pod-a");
    let _sb = Server::tcp(&b.ns, 80, "pod-b");

    assert_eq!(tcp_get(None, HOST_A, 8080), Ok(format!("pod-a {HOST_A}")));
    assert_eq!(tcp_get(None, HOST_B, 8080), Ok(format!("pod-b {HOST_B}")));
    assert_eq!(
        tcp_get(Some(&ext), HOST_A, 8080),
        Ok(format!("pod-a {LINK_FAR}"))
    );
    assert_eq!(
        tcp_get(Some(&ext), HOST_B, 8080),
        Ok(format!("pod-b {LINK_FAR}"))
    );
    for (ns, host) in [(None, "127.0.0.1"), (Some(ext.as_str()), LINK_HOST)] {
        let got = tcp_get(ns, host, 8080);
        assert!(got.is_err(), "{host}:8080 is not a mapped address: {got:?}");
    }

    a.portmap("DEL").expect_ok("DEL a");
    assert!(tcp_get(None, HOST_A, 8080).is_err(), "a's mapping survived");
    assert_eq!(tcp_get(None, HOST_B, 8080), Ok(format!("pod-b {HOST_B}")));
    b.portmap("CHECK").expect_ok("CHECK b after DEL a");
    b.portmap("DEL").expect_ok("DEL b");
    assert_eq!(table("ip"), None);
}

#[test]
fn dual_stack_mapping_forwards_both_families() {
    require_root();
    private_host_netns();
    let mut net = Net::new(true);
    let ext = net.external();
    let a = net.pod("pod-a", tcp_mapping(8080, 80), json!({}));
    let ips = result_ips(&a.bridge_result);
    assert_eq!(ips.len(), 2, "{}", a.bridge_result);
    let _server = Server::tcp(&a.ns, 80, "pod-a");
    eprintln!(
        "ruleset for one dual-stack mapping:\n{}{}",
        table("ip").expect("ip table"),
        table("ip6").expect("ip6 table")
    );

    assert_eq!(tcp_get(None, HOST_A, 8080), Ok(format!("pod-a {HOST_A}")));
    assert_eq!(tcp_get(None, HOST_6, 8080), Ok(format!("pod-a {HOST_6}")));
    assert_eq!(
        tcp_get(Some(&ext), LINK6_HOST, 8080),
        Ok(format!("pod-a {LINK6_FAR}"))
    );
    assert_eq!(
        tcp_get(Some(&a.ns), HOST_6, 8080),
        Ok(format!("pod-a {}", net.gateway6())),
        "IPv6 hairpin"
    );
    assert!(
        tcp_get(None, "::1", 8080).is_err(),
        "[::1] cannot leave the host and is not forwarded"
    );
    a.portmap("CHECK").expect_ok("CHECK");
    a.portmap("DEL").expect_ok("DEL");
    assert_eq!(table("ip"), None);
    assert_eq!(table("ip6"), None);
    assert!(tcp_get(None, HOST_6, 8080).is_err());
}

#[test]
fn without_snat_loopback_is_not_forwarded_and_masq_all_hides_every_client() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let ext = net.external();
    let mut a = net.pod("pod-a", tcp_mapping(8080, 80), json!({"snat": false}));
    let _server = Server::tcp(&a.ns, 80, "pod-a");
    assert_eq!(tcp_get(None, HOST_A, 8080), Ok(format!("pod-a {HOST_A}")));
    assert!(
        tcp_get(None, "127.0.0.1", 8080).is_err(),
        "loopback forwarded without snat"
    );
    assert!(!table("ip").expect("table").contains("masquerade"));

    // ADD again with other settings replaces the attachment's rules.
    a.portmap_conf["masqAll"] = json!(true);
    a.portmap_conf["snat"] = json!(true);
    a.portmap("ADD").expect_ok("ADD again");
    assert_eq!(
        tcp_get(Some(&ext), LINK_HOST, 8080),
        Ok(format!("pod-a {}", net.gateway())),
        "masqAll hides the client"
    );
    let rules = table("ip").expect("table");
    assert_eq!(
        rules.matches("jump").count(),
        3,
        "one jump per hook after the second ADD:\n{rules}"
    );
    a.portmap("CHECK").expect_ok("CHECK");
    a.portmap("DEL").expect_ok("DEL");
    assert_eq!(table("ip"), None);
}

#[test]
fn del_is_idempotent_and_check_sees_rules_removed_by_hand() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let a = net.pod("pod-a", tcp_mapping(8080, 80), json!({}));
    a.portmap("CHECK").expect_ok("CHECK");

    // Flush the attachment's DNAT chain behind the plugin's back.
    let rules = table("ip").expect("table");
    let chain = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .map(|l| l.trim_end_matches(" {"))
        .find(|c| c.ends_with("-dnat"))
        .unwrap_or_else(|| panic!("no -dnat chain in\n{rules}"))
        .to_string();
    nft(&format!("flush chain ip berth-portmap {chain}\n"));
    let broken = a.portmap("CHECK");
    assert!(!broken.ok, "CHECK with an empty chain: {broken:?}");
    assert_eq!(broken.json()["code"], 102, "{broken:?}");
    assert!(broken.stdout.contains(&chain), "{broken:?}");
    a.portmap("DEL").expect_ok("DEL after a flush by hand");
    assert_eq!(table("ip"), None);

    // The whole table deleted by hand.
    a.portmap("ADD").expect_ok("ADD again");
    nft("delete table ip berth-portmap\n");
    let broken = a.portmap("CHECK");
    assert_eq!(broken.json()["code"], 102, "{broken:?}");
    for round in 0..2 {
        a.portmap("DEL")
            .expect_ok(&format!("DEL without a table #{round}"));
    }

    // DEL without prevResult, mappings or namespace, as after a runtime restart.
    a.portmap("ADD").expect_ok("ADD again");
    let bare = json!({"cniVersion": "1.0.0", "name": net.network(), "type": "berth-portmap"});
    for round in 0..2 {
        Call::new(&portmap_bin(), "DEL")
            .id(&a.id)
            .run(&bare)
            .expect_ok(&format!("bare DEL #{round}"));
    }
    assert_eq!(table("ip"), None, "the bare DEL left rules");
}

#[test]
fn gc_removes_the_chains_of_attachments_not_listed() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let a = net.pod("pod-a", tcp_mapping(8080, 80), json!({}));
    let b = net.pod("pod-b", tcp_mapping(8081, 80), json!({}));
    // A pod of another network on the same bridge: GC of this network leaves it alone.
    let mut c = net.pod("pod-c", json!([]), json!({}));
    c.portmap_conf = net.portmap_conf("other-net", tcp_mapping(8082, 80), json!({}));
    c.portmap_conf["prevResult"] = c.bridge_result.clone();
    c.portmap("ADD").expect_ok("ADD c");
    let _servers = [
        Server::tcp(&a.ns, 80, "pod-a"),
        Server::tcp(&b.ns, 80, "pod-b"),
        Server::tcp(&c.ns, 80, "pod-c"),
    ];

    let gc = |network: &str, valid: Value| {
        let conf = json!({"cniVersion": "1.1.0", "name": network, "type": "berth-portmap",
            "cni.dev/valid-attachments": valid});
        Call::new(&portmap_bin(), "GC").run(&conf).expect_ok("GC");
    };
    gc(
        &net.network(),
        json!([{"containerID": "pod-b", "ifname": "eth0"}]),
    );
    assert!(tcp_get(None, HOST_A, 8080).is_err(), "GC kept a's mapping");
    assert_eq!(tcp_get(None, HOST_A, 8081), Ok(format!("pod-b {HOST_A}")));
    assert_eq!(tcp_get(None, HOST_A, 8082), Ok(format!("pod-c {HOST_A}")));
    assert!(!a.portmap("CHECK").ok, "CHECK of a collected attachment");
    b.portmap("CHECK").expect_ok("CHECK b");
    c.portmap("CHECK").expect_ok("CHECK c");

    gc(&net.network(), json!([]));
    assert!(tcp_get(None, HOST_A, 8081).is_err(), "GC kept b's mapping");
    assert!(table("ip").is_some(), "the other network's attachment went");
    gc("other-net", json!([]));
    assert_eq!(
        table("ip"),
        None,
        "GC of the last attachment leaves a table"
    );

    Call::new(&portmap_bin(), "STATUS")
        .run(&json!({"cniVersion": "1.1.0", "name": "n", "type": "berth-portmap"}))
        .expect_ok("STATUS");
}

/// A result as berth-bridge prints it, for calls that never reach a pod.
fn fake_prev(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "bpm0", "mac": "02:00:00:00:00:01"},
                       {"name": "veth0", "mac": "02:00:00:00:00:02"},
                       {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/var/run/netns/x"}],
        "ips": [{"interface": 2, "address": "10.250.0.9/24", "gateway": "10.250.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.250.0.1"}],
        "dns": {"nameservers": ["10.250.0.1"]}
    })
}

#[test]
fn bad_input_is_a_cni_error_and_changes_nothing() {
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let mut run = |mappings: Value, extra: Value| {
        let mut conf = net.portmap_conf("bad-net", mappings, extra);
        conf["prevResult"] = fake_prev("1.0.0");
        Call::new(&portmap_bin(), "ADD").id("pod-x").run(&conf)
    };
    let m = |host: i64, cont: i64, proto: &str| json!({"hostPort": host, "containerPort": cont, "protocol": proto});
    for (mappings, extra, msg) in [
        (
            json!([m(0, 80, "tcp")]),
            json!({}),
            "hostPort 0 is not a port number",
        ),
        (json!([m(70000, 80, "tcp")]), json!({}), "hostPort 70000"),
        (json!([m(80, 0, "tcp")]), json!({}), "containerPort 0"),
        (json!([m(80, 80, "icmp")]), json!({}), "protocol \"icmp\""),
        (
            json!([m(80, 80, "tcp"), m(80, 81, "tcp")]),
            json!({}),
            "host port tcp/80 is already mapped to container port 80",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]),
            json!({}),
            "hostIP \"nope\"",
        ),
        (
            json!([m(80, 80, "tcp")]),
            json!({"markMasqBit": 99}),
            "markMasqBit 99",
        ),
        (json!([{"hostPort": "x"}]), json!({}), "invalid"),
    ] {
        let out = run(mappings.clone(), extra);
        assert!(!out.ok, "{mappings} was accepted: {out:?}");
        let err = out.json();
        assert_eq!(err["code"], 7, "{mappings}: {out:?}");
        assert!(
            err["msg"].as_str().unwrap_or_default().contains(msg)
                || err["details"].as_str().unwrap_or_default().contains(msg),
            "{mappings}: {msg:?} not in {out:?}"
        );
        assert_eq!(table("ip"), None, "{mappings} left rules");
    }

    // Without prevResult ADD cannot know the pod.
    let mut conf = net.portmap_conf("bad-net", json!([m(80, 80, "tcp")]), json!({}));
    let out = Call::new(&portmap_bin(), "ADD").id("pod-x").run(&conf);
    assert_eq!(out.json()["code"], 7, "{out:?}");
    assert!(out.stdout.contains("prevResult"), "{out:?}");
    // Nor without a container id.
    conf["prevResult"] = fake_prev("1.0.0");
    let out = Call::new(&portmap_bin(), "ADD").run(&conf);
    assert_eq!(out.json()["code"], 4, "{out:?}");

    // No mappings: the result goes through unchanged and nothing is set up; also 0.4.0.
    for version in ["1.0.0", "0.4.0"] {
        let mut conf = net.portmap_conf("bad-net", json!([]), json!({"cniVersion": version}));
        conf["prevResult"] = fake_prev(version);
        let out = Call::new(&portmap_bin(), "ADD")
            .id("pod-x")
            .run(&conf)
            .expect_ok("ADD without mappings")
            .json();
        let mut want = fake_prev(version);
        if version == "0.4.0" {
            want["ips"][0]["version"] = json!("4");
        }
        assert_eq!(out, want, "prevResult changed");
        assert_eq!(table("ip"), None);
        conf.as_object_mut().expect("conf").remove("runtimeConfig");
        Call::new(&portmap_bin(), "ADD")
            .id("pod-x")
            .run(&conf)
            .expect_ok("ADD without runtimeConfig");
    }

    // An SCTP mapping (which rscni-plugin's own types refuse) and a sane one go in.
    let mut conf = net.portmap_conf(
        "bad-net",
        json!([m(9999, 99, "sctp"), m(9999, 99, "udp")]),
        json!({}),
    );
    conf["prevResult"] = fake_prev("1.0.0");
    Call::new(&portmap_bin(), "ADD")
        .id("pod-x")
        .run(&conf)
        .expect_ok("ADD sctp");
    let rules = table("ip").expect("table");
    assert!(
        rules.contains("sctp dport 9999 dnat to 10.250.0.9:99"),
        "{rules}"
    );
    Call::new(&portmap_bin(), "DEL")
        .id("pod-x")
        .run(&conf)
        .expect_ok("DEL sctp");
    assert_eq!(table("ip"), None);

    let version = Call::new(&portmap_bin(), "VERSION")
        .run(&json!({}))
        .expect_ok("VERSION")
        .json();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .expect("versions")
                .iter()
                .any(|s| s == v),
            "{version}"
        );
    }
}

#[test]
fn berths_cni_runtime_passes_port_mappings_to_the_chained_plugin() {
    use berth_cni::runtime::{Attachment, Cni, CniConfig, Network, PortMapping};
    require_root();
    private_host_netns();
    let mut net = Net::new(false);
    let ns = net.add_netns();
    let mut bridge = net.bridge_conf();
    for key in ["cniVersion", "name"] {
        bridge.as_object_mut().expect("conf").remove(key);
    }
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": net.network(),
        "plugins": [bridge, {"type": "berth-portmap", "capabilities": {"portMappings": true}}],
    });
    net.networks.push(net.network());
    let network = Network::from_conflist_bytes(conflist.to_string().as_bytes()).expect("conflist");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cni = Cni::new(CniConfig {
        conf_dirs: vec![tmp.path().join("net.d")],
        bin_dirs: vec![portmap_bin().parent().expect("bin dir").to_path_buf()],
        cache_dir: tmp.path().join("cache"),
        timeout: Duration::from_secs(30),
    });
    let att = Attachment::new("pod-rt", Some(PathBuf::from(netns_path(&ns))), "eth0")
        .with_port_mappings(&[PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    rt.block_on(cni.add(&network, &att))
        .expect("ADD of the chain");
    let _server = Server::tcp(&ns, 80, "pod-rt");
    assert_eq!(tcp_get(None, HOST_A, 8080), Ok(format!("pod-rt {HOST_A}")));
    assert_eq!(
        tcp_get(None, "127.0.0.1", 8080),
        Ok(format!("pod-rt {}", net.gateway()))
    );
    rt.block_on(cni.check(&network, &att))
        .expect("CHECK of the chain");
    rt.block_on(cni.del(&network, &att))
        .expect("DEL of the chain");
    assert_eq!(table("ip"), None, "DEL through the runtime left rules");
    assert!(tcp_get(None, HOST_A, 8080).is_err());
}
