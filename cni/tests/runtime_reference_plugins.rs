//! The CNI runtime driving Debian's reference plugins (containernetworking-plugins: bridge,
//! host-local, portmap, loopback) in network namespaces this test makes, each test with its own
//! bridge name, subnet, host port and IPAM dir. Needs root and the plugins (scripts/deps); fails
//! loudly without them.
//!
//! Each test first moves its own thread into a private network namespace, which stands in for
//! the host: the plugins (children of that thread; `#[tokio::test]` runs on the test thread) make
//! their bridge, host-side veths, iptables rules and sysctls there, the test checks DEL removed
//! them there, and whatever the reference plugins never remove (portmap's shared CNI-HOSTPORT-*
//! chains, `ip_forward`) goes away with the namespace when the test thread ends.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use berth_cni::runtime::{Attachment, Cni, CniConfig, Network, PortMapping};
use serde_json::json;
use tempfile::TempDir;

const PLUGIN_DIR: &str = "/usr/lib/cni";

/// Moves the calling thread into a new network namespace (see the file's doc).
fn private_host_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare a network namespace for this test thread");
    must(&["ip", "link", "set", "lo", "up"]);
}

fn require_root_and_plugins() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, bridges); run the suite as root"
    );
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        assert!(
            Path::new(PLUGIN_DIR).join(p).is_file(),
            "reference CNI plugin {PLUGIN_DIR}/{p} missing: run scripts/deps (containernetworking-plugins)"
        );
    }
}

fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).is_file())
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Proc::new(args[0]).args(&args[1..]).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

fn must(args: &[&str]) -> String {
    let (ok, out) = run(args);
    assert!(ok, "{args:?} failed: {out}");
    out
}

/// Names and numbers no other test (of this process or another) uses at the same time.
struct Ids {
    netns: String,
    bridge: String,
    subnet_prefix: String,
    host_port: u16,
    container_id: String,
}

fn ids() -> Ids {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    assert!(n < 4, "more tests than the id scheme has room for");
    let pid = std::process::id();
    Ids {
        netns: format!("berth-cnirt-{pid}-{n}"),
        bridge: format!("bcr{}{n}", pid % 1000),
        subnet_prefix: format!("10.240.{}", (pid % 64) * 4 + n),
        host_port: 20000 + ((pid * 4 + n) % 40000) as u16,
        container_id: format!("cnirt{pid}x{n}"),
    }
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: &str) -> Self {
        must(&["ip", "netns", "add", name]);
        Netns {
            name: name.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn delete(&self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A host link (the bridge the plugin makes: the reference bridge plugin leaves it on DEL, as
/// it may be shared), deleted on drop.
struct Link(String);

impl Drop for Link {
    fn drop(&mut self) {
        if run(&["ip", "link", "show", &self.0]).0 {
            let _ = run(&["ip", "link", "del", &self.0]);
        }
    }
}

fn firewall_rules() -> String {
    let mut s = String::new();
    if have("iptables-save") {
        s.push_str(&must(&["iptables-save"]));
    }
    if have("nft") {
        s.push_str(&must(&["nft", "list", "ruleset"]));
    }
    s
}

struct Setup {
    tmp: TempDir,
    ids: Ids,
    cfg: CniConfig,
    net: Network,
    iptables: bool,
}

fn setup(ip_masq: bool) -> Setup {
    require_root_and_plugins();
    private_host_netns();
    let ids = ids();
    let tmp = tempfile::tempdir().unwrap();
    // The reference bridge and portmap (1.1) program iptables; without it there is no ipMasq
    // and no portmap.
    let iptables = have("iptables");
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": ids.bridge,
        "isGateway": true,
        "ipMasq": ip_masq && iptables,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": format!("{}.0/24", ids.subnet_prefix)}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": tmp.path().join("ipam"),
        }
    })];
    if iptables {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": format!("cnirt-{}", ids.container_id),
        "plugins": plugins,
    });
    let net = Network::from_conflist_bytes(conflist.to_string().as_bytes()).unwrap();
    let cfg = CniConfig {
        conf_dirs: vec![tmp.path().join("net.d")],
        bin_dirs: vec![PathBuf::from(PLUGIN_DIR)],
        cache_dir: tmp.path().join("cache"),
        timeout: Duration::from_secs(60),
    };
    Setup {
        tmp,
        ids,
        cfg,
        net,
        iptables,
    }
}

fn ipam_allocations(s: &Setup) -> Vec<String> {
    let dir = s.tmp.path().join("ipam").join(s.net.name());
    match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(&s.ids.subnet_prefix))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn veths_on(bridge: &str) -> String {
    run(&["ip", "-o", "link", "show", "master", bridge]).1
}

#[tokio::test]
async fn reference_plugins_add_check_del_twice_and_leave_nothing() {
    let s = setup(true);
    let ns = Netns::new(&s.ids.netns);
    let bridge = Link(s.ids.bridge.clone());
    let cni = Cni::new(s.cfg.clone());
    let att = Attachment::new(&s.ids.container_id, Some(ns.path()), "eth0")
        .with_pod("default", "ref", "uid-ref")
        .with_port_mappings(&[PortMapping {
            host_port: s.ids.host_port,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);

    let r = cni.add(&s.net, &att).await.unwrap();
    let ip = r.sandbox_ips().next().expect("a pod address").clone();
    assert!(
        ip.address
            .addr()
            .to_string()
            .starts_with(&format!("{}.", s.ids.subnet_prefix)),
        "{ip:?}"
    );
    assert_eq!(ip.address.prefix_len(), 24);
    assert_eq!(
        ip.gateway.unwrap().to_string(),
        format!("{}.1", s.ids.subnet_prefix)
    );
    assert!(r.interfaces.iter().any(|i| i.name == s.ids.bridge));
    let addr = must(&[
        "ip",
        "-n",
        &s.ids.netns,
        "-o",
        "-4",
        "addr",
        "show",
        "dev",
        "eth0",
    ]);
    assert!(addr.contains(&ip.address.to_string()), "{addr}");
    assert!(
        veths_on(&s.ids.bridge).contains("veth"),
        "no veth on the bridge"
    );
    assert_eq!(ipam_allocations(&s), [ip.address.addr().to_string()]);
    if s.iptables {
        let rules = firewall_rules();
        assert!(
            rules
                .lines()
                .any(|l| l.contains(&s.ids.container_id) && l.contains("MASQUERADE")),
            "no ipMasq rule naming the container: {rules}"
        );
        assert!(
            rules.contains(&format!("--dport {}", s.ids.host_port)),
            "portmap should DNAT the host port: {rules}"
        );
    }

    // CHECK of bridge and host-local against the cached result. The reference portmap (1.1.x)
    // fails CHECK for IPv4-only pods, looking for ip6tables rules it never made
    // (containernetworking/plugins#819), so the whole chain passes or fails with exactly that.
    let without_portmap = Network::from_conflist_bytes(
        json!({
            "cniVersion": "1.0.0",
            "name": s.net.name(),
            "plugins": [s.net.plugins()[0].raw()],
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    cni.check(&without_portmap, &att).await.unwrap();
    if let Err(e) = cni.check(&s.net, &att).await {
        assert!(
            e.to_string()
                .starts_with("CNI plugin \"portmap\" failed CHECK: could not check ipv6 dnat"),
            "{e}"
        );
    }

    // The pod's loopback, through the reference loopback plugin.
    let lo = Network::from_conflist_bytes(
        br#"{"cniVersion":"1.0.0","name":"cnirt-lo","plugins":[{"type":"loopback"}]}"#,
    )
    .unwrap();
    let lo_att = Attachment::new(&s.ids.container_id, Some(ns.path()), "lo");
    cni.add(&lo, &lo_att).await.unwrap();
    let lo_state = must(&["ip", "-n", &s.ids.netns, "-o", "link", "show", "lo"]);
    assert!(lo_state.contains(",UP"), "{lo_state}");
    cni.del(&lo, &lo_att).await.unwrap();

    cni.del(&s.net, &att).await.unwrap();
    cni.del(&s.net, &att).await.unwrap();

    assert!(
        ipam_allocations(&s).is_empty(),
        "{:?}",
        ipam_allocations(&s)
    );
    assert_eq!(
        veths_on(&s.ids.bridge).trim(),
        "",
        "veths left on the bridge"
    );
    assert!(
        !run(&["ip", "-n", &s.ids.netns, "link", "show", "eth0"]).0,
        "eth0 still in the netns"
    );
    assert_no_rules_for(&s);
    assert!(cni.cached_attachments().await.unwrap().is_empty());

    // The bridge stays after DEL (the reference plugin shares it between pods); the netns is
    // the test's. Both go here.
    drop(bridge);
    drop(ns);
    assert!(
        !run(&["ip", "link", "show", &s.ids.bridge]).0,
        "bridge left"
    );
    assert!(
        !Path::new("/run/netns").join(&s.ids.netns).exists(),
        "netns left"
    );
}

fn assert_no_rules_for(s: &Setup) {
    let rules = firewall_rules();
    let left: Vec<_> = rules
        .lines()
        .filter(|l| {
            l.contains(&s.ids.container_id)
                || l.contains(&s.ids.subnet_prefix)
                || l.contains(&format!("--dport {}", s.ids.host_port))
                || l.contains(&format!("dport {}", s.ids.host_port))
        })
        .collect();
    assert!(left.is_empty(), "firewall rules left:\n{}", left.join("\n"));
}

#[tokio::test]
async fn reference_plugins_del_from_the_cache_after_the_netns_is_gone() {
    // The reference bridge (1.1.x) finds the addresses whose ipMasq rules it removes in the
    // netns, so with the netns gone it cannot remove them: berthd must DEL before it drops a
    // pod's netns pin. Here the netns goes first on purpose, so no ipMasq.
    let s = setup(false);
    let ns = Netns::new(&s.ids.netns);
    let _bridge = Link(s.ids.bridge.clone());
    let att = Attachment::new(&s.ids.container_id, Some(ns.path()), "eth0")
        .with_pod("default", "gone", "uid-gone")
        .with_port_mappings(&[PortMapping {
            host_port: s.ids.host_port,
            container_port: 8080,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);
    Cni::new(s.cfg.clone()).add(&s.net, &att).await.unwrap();
    assert_eq!(ipam_allocations(&s).len(), 1);
    if s.iptables {
        assert!(firewall_rules().contains(&format!("--dport {}", s.ids.host_port)));
    }

    // The pod's netns went first (a crash, or /run wiped by a reboot); berthd restarts and
    // tears down from the cache alone: the port mappings it needs are in it.
    ns.delete();
    let cni = Cni::new(s.cfg.clone());
    let cached = cni.cached_attachments().await.unwrap();
    assert_eq!(cached.len(), 1);
    cni.del_cached(&cached[0]).await.unwrap();

    assert!(
        ipam_allocations(&s).is_empty(),
        "{:?}",
        ipam_allocations(&s)
    );
    assert_eq!(
        veths_on(&s.ids.bridge).trim(),
        "",
        "veths left on the bridge"
    );
    assert_no_rules_for(&s);
    assert!(cni.cached_attachments().await.unwrap().is_empty());
}
