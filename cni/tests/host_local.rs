//! `berth-host-local` run as a runtime runs it: the built binary, CNI env vars, config on stdin.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{Call, allocation_files, host_local, result_ips};
use serde_json::{Value, json};

fn netconf(version: &str, name: &str, data_dir: &Path, ipam: Value) -> Value {
    let mut ipam = ipam;
    ipam["type"] = json!("berth-host-local");
    ipam["dataDir"] = json!(data_dir);
    json!({"cniVersion": version, "name": name, "type": "berth-host-local", "ipam": ipam})
}

fn add(conf: &Value, id: &str) -> Value {
    Call::new(&host_local(), "ADD")
        .id(id)
        .netns("/proc/self/ns/net")
        .run(conf)
        .expect_ok("ADD")
        .json()
}

fn add_ip(conf: &Value, id: &str) -> String {
    let ips = result_ips(&add(conf, id));
    assert_eq!(ips.len(), 1, "one range set gives one address: {ips:?}");
    ips[0].clone()
}

#[test]
fn allocates_in_order_skips_gateway_and_reports_exhaustion() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 10.77.0.0/29: .0 network, .7 broadcast, gateway in the middle.
    let conf = netconf(
        "1.1.0",
        "order",
        dir.path(),
        json!({"subnet": "10.77.0.0/29", "gateway": "10.77.0.3",
               "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.9.0/24", "gw": "10.77.0.1"}]}),
    );
    let first = add(&conf, "c0");
    assert_eq!(
        first["cniVersion"], "1.1.0",
        "result carries the conf version: {first}"
    );
    assert_eq!(first["ips"][0]["address"], "10.77.0.1/29");
    assert_eq!(first["ips"][0]["gateway"], "10.77.0.3");
    assert_eq!(
        first["routes"],
        json!([{"dst": "0.0.0.0/0"}, {"dst": "192.168.9.0/24", "gw": "10.77.0.1"}])
    );
    let rest: Vec<String> = (1..5).map(|i| add_ip(&conf, &format!("c{i}"))).collect();
    assert_eq!(rest, ["10.77.0.2", "10.77.0.4", "10.77.0.5", "10.77.0.6"]);

    let full = Call::new(&host_local(), "ADD").id("c5").run(&conf);
    assert!(!full.ok, "a sixth ADD must fail: {full:?}");
    let err = full.json();
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .expect("msg")
            .contains("no IP addresses available"),
        "{err}"
    );
    assert_eq!(err["cniVersion"], "1.1.0");
    assert_eq!(allocation_files(&dir.path().join("order")).len(), 5);
}

#[test]
fn range_start_end_and_two_range_sets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = netconf(
        "1.0.0",
        "dual",
        dir.path(),
        json!({"ranges": [
            [{"subnet": "10.78.0.0/24", "rangeStart": "10.78.0.100", "rangeEnd": "10.78.0.101"},
             {"subnet": "10.78.1.0/24", "rangeStart": "10.78.1.10", "rangeEnd": "10.78.1.10",
              "gateway": "10.78.1.254"}],
            [{"subnet": "fd00:78::/64"}]
        ]}),
    );
    assert_eq!(
        result_ips(&add(&conf, "a")),
        ["10.78.0.100", "fd00:78::2"],
        "one address per range set"
    );
    assert_eq!(add_ip_pair(&conf, "b").0, "10.78.0.101");
    let (third, _) = add_ip_pair(&conf, "c");
    assert_eq!(third, "10.78.1.10", "the next range of the set follows");
    let out = Call::new(&host_local(), "ADD").id("d").run(&conf);
    assert!(!out.ok, "the IPv4 set is exhausted: {out:?}");
    // The failed ADD took nothing from the IPv6 set.
    assert_eq!(allocation_files(&dir.path().join("dual")).len(), 6);
}

fn add_ip_pair(conf: &Value, id: &str) -> (String, String) {
    let ips = result_ips(&add(conf, id));
    (ips[0].clone(), ips[1].clone())
}

#[test]
fn del_releases_is_idempotent_and_allocation_round_robins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = netconf(
        "1.0.0",
        "del",
        dir.path(),
        json!({"subnet": "10.79.0.0/24"}),
    );
    let net_dir = dir.path().join("del");
    assert_eq!(add_ip(&conf, "a"), "10.79.0.2");
    assert_eq!(add_ip(&conf, "b"), "10.79.0.3");
    let stored = std::fs::read_to_string(net_dir.join("10.79.0.2")).expect("allocation file");
    assert_eq!(stored, "a\r\neth0", "the reference plugin's file format");
    assert_eq!(
        std::fs::read_to_string(net_dir.join("last_reserved_ip.0")).expect("last reserved"),
        "10.79.0.3"
    );

    for _ in 0..2 {
        // No CNI_NETNS: the spec allows DEL without it.
        Call::new(&host_local(), "DEL")
            .id("a")
            .run(&conf)
            .expect_ok("DEL");
        assert_eq!(allocation_files(&net_dir), ["10.79.0.3"]);
    }
    // Another ifname of the same container is a different attachment.
    Call::new(&host_local(), "DEL")
        .id("b")
        .ifname("eth1")
        .run(&conf)
        .expect_ok("DEL eth1");
    assert_eq!(allocation_files(&net_dir), ["10.79.0.3"]);

    assert_eq!(
        add_ip(&conf, "c"),
        "10.79.0.4",
        "allocation resumes after the last one"
    );
    // DEL on a network that never had an allocation is fine too.
    let other = netconf(
        "1.0.0",
        "never",
        dir.path(),
        json!({"subnet": "10.79.1.0/24"}),
    );
    Call::new(&host_local(), "DEL")
        .id("x")
        .run(&other)
        .expect_ok("DEL unknown");
    assert!(!dir.path().join("never").exists(), "DEL creates nothing");
}

#[test]
fn twenty_concurrent_adds_get_twenty_distinct_ips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = netconf(
        "1.0.0",
        "many",
        dir.path(),
        json!({"subnet": "10.80.0.0/24"}),
    );
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let conf = &conf;
                s.spawn(move || add_ip(conf, &format!("ctr-{i}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(
        distinct.len(),
        20,
        "duplicate addresses handed out: {ips:?}"
    );
    let files = allocation_files(&dir.path().join("many"));
    assert_eq!(files.len(), 20);
    for ip in &ips {
        assert!(files.contains(ip), "{ip} has no allocation file: {files:?}");
        assert_ne!(ip, "10.80.0.1", "the gateway was handed out");
    }
}

#[test]
fn gc_releases_attachments_not_listed_as_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conf = netconf("1.1.0", "gc", dir.path(), json!({"subnet": "10.81.0.0/24"}));
    add_ip(&conf, "a");
    let b = add_ip(&conf, "b");
    add_ip(&conf, "c");
    conf["cni.dev/valid-attachments"] = json!([
        {"containerID": "b", "ifname": "eth0"},
        {"containerID": "a", "ifname": "eth9"}
    ]);
    Call::new(&host_local(), "GC").run(&conf).expect_ok("GC");
    // a is valid only on another ifname: its eth0 address goes too.
    assert_eq!(allocation_files(&dir.path().join("gc")), [b]);
}

#[test]
fn check_verifies_the_container_holds_its_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = netconf(
        "1.1.0",
        "check",
        dir.path(),
        json!({"subnet": "10.82.0.0/24"}),
    );
    let result = add(&conf, "a");
    let _other = add(&conf, "b");

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    Call::new(&host_local(), "CHECK")
        .id("a")
        .run(&with_prev)
        .expect_ok("CHECK a");

    let none = Call::new(&host_local(), "CHECK").id("z").run(&with_prev);
    assert!(
        !none.ok,
        "CHECK of a container with no address must fail: {none:?}"
    );
    assert_eq!(none.json()["code"], 102);

    // b's prevResult claims a's address.
    let wrong = Call::new(&host_local(), "CHECK").id("b").run(&with_prev);
    assert!(
        !wrong.ok,
        "CHECK with another container's address must fail: {wrong:?}"
    );

    Call::new(&host_local(), "DEL")
        .id("a")
        .run(&conf)
        .expect_ok("DEL");
    let gone = Call::new(&host_local(), "CHECK").id("a").run(&with_prev);
    assert!(!gone.ok, "CHECK after DEL must fail: {gone:?}");
}

#[test]
fn reference_plugin_reads_and_releases_our_allocations_and_we_its() {
    let reference = Path::new("/usr/lib/cni/host-local");
    assert!(
        reference.exists(),
        "the reference plugins (containernetworking-plugins) are missing"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = netconf(
        "1.0.0",
        "interop",
        dir.path(),
        json!({"subnet": "10.83.0.0/24"}),
    );
    let mut theirs = ours.clone();
    theirs["type"] = json!("host-local");
    theirs["ipam"]["type"] = json!("host-local");
    let net_dir = dir.path().join("interop");

    assert_eq!(add_ip(&ours, "a"), "10.83.0.2");
    let by_ref = Call::new(reference, "ADD")
        .id("b")
        .netns("/proc/self/ns/net")
        .run(&theirs);
    let by_ref = by_ref.expect_ok("reference ADD").json();
    assert_eq!(
        result_ips(&by_ref),
        ["10.83.0.3"],
        "it continues after our last reservation"
    );

    Call::new(reference, "DEL")
        .id("a")
        .netns("/proc/self/ns/net")
        .run(&theirs)
        .expect_ok("ref DEL");
    assert_eq!(
        allocation_files(&net_dir),
        ["10.83.0.3"],
        "reference DEL released ours"
    );
    Call::new(&host_local(), "DEL")
        .id("b")
        .run(&ours)
        .expect_ok("our DEL");
    assert!(
        allocation_files(&net_dir).is_empty(),
        "our DEL released the reference's"
    );
}

#[test]
fn old_versions_version_status_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = netconf(
        "0.4.0",
        "old",
        dir.path(),
        json!({"subnet": "10.84.0.0/24"}),
    );
    let result = add(&conf, "a");
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(
        result["ips"][0]["version"], "4",
        "0.x results carry the IP version"
    );

    let version = Call::new(&host_local(), "VERSION").run(&json!({"cniVersion": "1.1.0"}));
    let version = version.expect_ok("VERSION").json();
    let supported = version["supportedVersions"].as_array().expect("versions");
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&json!(v)), "{version}");
    }

    let conf11 = netconf("1.1.0", "st", dir.path(), json!({"subnet": "10.84.1.0/24"}));
    let status = Call::new(&host_local(), "STATUS")
        .run(&conf11)
        .expect_ok("STATUS");
    assert!(
        status.stdout.is_empty(),
        "STATUS prints nothing: {status:?}"
    );

    let bad = netconf(
        "1.1.0",
        "bad",
        dir.path(),
        json!({"subnet": "10.84.2.0/31"}),
    );
    let out = Call::new(&host_local(), "ADD").id("a").run(&bad);
    assert!(!out.ok);
    let err = out.json();
    assert_eq!(err["code"], 7, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .expect("msg")
            .contains("too few addresses"),
        "{err}"
    );

    let unsupported = netconf("9.9.9", "v", dir.path(), json!({"subnet": "10.84.3.0/24"}));
    let out = Call::new(&host_local(), "ADD").id("a").run(&unsupported);
    assert_eq!(out.json()["code"], 1, "{out:?}");
}
