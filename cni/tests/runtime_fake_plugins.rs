//! The CNI runtime against fake plugins: shell scripts this test writes, which record their
//! environment and stdin and answer what the test tells them to.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cni::runtime::{
    Attachment, Cni, CniConfig, Command, Error, GcAttachment, Network, PortMapping,
};
use serde_json::{Value, json};
use tempfile::TempDir;

const SCRIPT: &str = r#"#!/bin/sh
rec='@REC@'
me='@ME@'
cmd="$CNI_COMMAND"
echo "$me $cmd $CNI_CONTAINERID" >> "$rec/log"
cat > "$rec/$me.$cmd.stdin"
env | grep '^CNI_' | sort > "$rec/$me.$cmd.env"
if [ -f "$rec/$me.$cmd.stderr" ]; then cat "$rec/$me.$cmd.stderr" >&2; fi
if [ -f "$rec/$me.$cmd.sleep" ]; then
  echo $$ > "$rec/$me.pid"
  sleep 30 &
  echo $! > "$rec/$me.child"
  wait
fi
if [ -f "$rec/$me.$cmd.big" ]; then head -c 2100000 /dev/zero | tr '\0' x; exit 0; fi
if [ -f "$rec/$me.$cmd.fail" ]; then cat "$rec/$me.$cmd.fail"; exit 1; fi
if [ -f "$rec/$me.$cmd.out" ]; then cat "$rec/$me.$cmd.out"; fi
exit 0
"#;

struct Fixture {
    _tmp: TempDir,
    bin: PathBuf,
    conf: PathBuf,
    rec: PathBuf,
    cache: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fixture {
            bin: tmp.path().join("bin"),
            conf: tmp.path().join("net.d"),
            rec: tmp.path().join("rec"),
            cache: tmp.path().join("cache"),
            _tmp: tmp,
        };
        for d in [&f.bin, &f.conf, &f.rec] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(f.rec.join("log"), "").unwrap();
        f
    }

    fn cni(&self, timeout: Duration) -> Cni {
        Cni::new(CniConfig {
            conf_dirs: vec![self.conf.clone()],
            // A second, empty-of-our-plugins dir first: lookup goes on to the next dir.
            bin_dirs: vec![self.rec.join("nobin"), self.bin.clone()],
            cache_dir: self.cache.clone(),
            timeout,
        })
    }

    /// Writes fake plugins of these types.
    fn plugins(&self, names: &[&str]) {
        for name in names {
            let p = self.bin.join(name);
            let text = SCRIPT
                .replace("@REC@", self.rec.to_str().unwrap())
                .replace("@ME@", name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// Tells `plugin` what to do on `command`: `what` is out, fail, stderr, sleep or big.
    fn on(&self, plugin: &str, command: &str, what: &str, content: &str) {
        std::fs::write(self.rec.join(format!("{plugin}.{command}.{what}")), content).unwrap();
    }

    fn clear(&self, plugin: &str, command: &str, what: &str) {
        std::fs::remove_file(self.rec.join(format!("{plugin}.{command}.{what}"))).unwrap();
    }

    /// Calls so far, as "plugin COMMAND containerid".
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.rec.join("log"))
            .unwrap()
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    fn reset_log(&self) {
        std::fs::write(self.rec.join("log"), "").unwrap();
    }

    fn stdin(&self, plugin: &str, command: &str) -> Value {
        let p = self.rec.join(format!("{plugin}.{command}.stdin"));
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    }

    fn env(&self, plugin: &str, command: &str) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.rec.join(format!("{plugin}.{command}.env")))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn write_conf(&self, file: &str, v: &Value) {
        std::fs::write(self.conf.join(file), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn cache_entries(&self) -> Vec<String> {
        match std::fs::read_dir(self.cache.join("results")) {
            Ok(d) => {
                let mut v: Vec<_> = d
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                v.sort();
                v
            }
            Err(_) => Vec::new(),
        }
    }
}

fn result_with_ip(ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/fake"}],
        "ips": [{"address": ip, "interface": 0}]
    })
}

fn net(version: &str, plugins: Value) -> Value {
    json!({"cniVersion": version, "name": "fakenet", "plugins": plugins})
}

fn attachment(cid: &str) -> Attachment {
    Attachment::new(cid, Some(PathBuf::from("/run/netns/fake")), "eth0")
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn add_chains_prev_result_and_del_runs_in_reverse_with_the_cached_result() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "c"]);
    let (ra, rb, rc) = (
        result_with_ip("10.1.0.1/24"),
        result_with_ip("10.1.0.2/24"),
        result_with_ip("10.1.0.3/24"),
    );
    f.on("a", "ADD", "out", &ra.to_string());
    f.on("b", "ADD", "out", &rb.to_string());
    f.on("c", "ADD", "out", &rc.to_string());
    f.write_conf(
        "10-fake.conflist",
        &net(
            "1.0.0",
            json!([{"type": "a", "x": 1}, {"type": "b"}, {"type": "c"}]),
        ),
    );
    let cni = f.cni(LONG);
    let n = cni.default_network().unwrap();
    let att = attachment("pod1").with_pod("default", "web", "uid-7");

    let r = cni.add(&n, &att).await.unwrap();
    assert_eq!(f.log(), ["a ADD pod1", "b ADD pod1", "c ADD pod1"]);
    assert_eq!(r.raw, rc);
    assert_eq!(r.ips[0].address.to_string(), "10.1.0.3/24");
    assert_eq!(r.sandbox_ips().count(), 1);

    let a_in = f.stdin("a", "ADD");
    assert_eq!(a_in["name"], "fakenet");
    assert_eq!(a_in["cniVersion"], "1.0.0");
    assert_eq!(a_in["x"], 1);
    assert!(a_in.get("prevResult").is_none(), "{a_in}");
    assert_eq!(f.stdin("b", "ADD")["prevResult"], ra);
    assert_eq!(f.stdin("c", "ADD")["prevResult"], rb);

    let env = f.env("b", "ADD");
    let want: BTreeMap<String, String> = [
        ("CNI_COMMAND", "ADD".to_owned()),
        ("CNI_CONTAINERID", "pod1".to_owned()),
        ("CNI_NETNS", "/run/netns/fake".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=pod1;K8S_POD_UID=uid-7"
                .to_owned(),
        ),
        (
            "CNI_PATH",
            format!("{}:{}", f.rec.join("nobin").display(), f.bin.display()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(env, want);

    assert_eq!(f.cache_entries(), ["fakenet-pod1-eth0"]);
    let cached = cni
        .cached_attachment("fakenet", "pod1", "eth0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cached.result, Some(rc.clone()));

    f.reset_log();
    cni.del(&n, &att).await.unwrap();
    assert_eq!(f.log(), ["c DEL pod1", "b DEL pod1", "a DEL pod1"]);
    for p in ["a", "b", "c"] {
        assert_eq!(f.stdin(p, "DEL")["prevResult"], rc, "{p}");
    }
    assert_eq!(f.env("a", "DEL")["CNI_COMMAND"], "DEL");
    assert!(f.cache_entries().is_empty());

    // DEL again: idempotent, runs without a prevResult.
    f.reset_log();
    cni.del(&n, &att).await.unwrap();
    assert_eq!(f.log(), ["c DEL pod1", "b DEL pod1", "a DEL pod1"]);
    assert!(f.stdin("a", "DEL").get("prevResult").is_none());
}

#[tokio::test]
async fn runtime_config_only_for_declared_capabilities() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "c"]);
    for p in ["a", "b", "c"] {
        f.on(p, "ADD", "out", &result_with_ip("10.1.0.1/24").to_string());
    }
    let n = Network::from_conflist_bytes(
        net(
            "1.0.0",
            json!([
                {"type": "a", "capabilities": {"portMappings": true}},
                {"type": "b", "capabilities": {"bandwidth": true, "dns": false, "ipRanges": true}},
                {"type": "c"}
            ]),
        )
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let att = attachment("pod2")
        .with_port_mappings(&[PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }])
        .with_capability("bandwidth", json!({"ingressRate": 1000}))
        .with_capability("dns", json!({"servers": ["1.1.1.1"]}));
    f.cni(LONG).add(&n, &att).await.unwrap();
    assert_eq!(
        f.stdin("a", "ADD")["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );
    // ipRanges is declared but not passed; dns is passed but declared false.
    assert_eq!(
        f.stdin("b", "ADD")["runtimeConfig"],
        json!({"bandwidth": {"ingressRate": 1000}})
    );
    assert!(f.stdin("c", "ADD").get("runtimeConfig").is_none());
}

#[tokio::test]
async fn del_after_restart_uses_the_cached_config_when_the_conflist_changed() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "c"]);
    f.on(
        "a",
        "ADD",
        "out",
        &result_with_ip("10.1.0.1/24").to_string(),
    );
    let rb = result_with_ip("10.1.0.2/24");
    f.on("b", "ADD", "out", &rb.to_string());
    f.write_conf(
        "10-fake.conflist",
        &net(
            "1.0.0",
            json!([{"type": "a"}, {"type": "b", "capabilities": {"portMappings": true}}]),
        ),
    );
    let att = attachment("pod3")
        .with_pod("ns", "p", "u")
        .with_capability("portMappings", json!([{"hostPort": 1, "containerPort": 2}]));
    {
        let cni = f.cni(LONG);
        let n = cni.default_network().unwrap();
        cni.add(&n, &att).await.unwrap();
    }

    // The conflist changes to another chain under the same name, and berthd restarts.
    f.write_conf("10-fake.conflist", &net("1.0.0", json!([{"type": "c"}])));
    let cni = f.cni(LONG);
    let n = cni.default_network().unwrap();
    assert_eq!(n.plugins()[0].plugin_type(), "c");
    f.reset_log();
    // The caller knows only the container, not the args or port mappings ADD had.
    let bare = Attachment::new("pod3", None, "eth0");
    cni.del(&n, &bare).await.unwrap();
    assert_eq!(f.log(), ["b DEL pod3", "a DEL pod3"]);
    let b_in = f.stdin("b", "DEL");
    assert_eq!(b_in["prevResult"], rb);
    assert_eq!(
        b_in["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 1, "containerPort": 2}]})
    );
    let env = f.env("b", "DEL");
    assert_eq!(
        env["CNI_ARGS"],
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=pod3;K8S_POD_UID=u"
    );
    // No netns given: CNI_NETNS is empty, as the spec allows on DEL.
    assert_eq!(env.get("CNI_NETNS").map(String::as_str), Some(""));
    assert!(f.cache_entries().is_empty());

    // With the cache entry gone, DEL runs the current config.
    f.reset_log();
    cni.del(&n, &bare).await.unwrap();
    assert_eq!(f.log(), ["c DEL pod3"]);
}

#[tokio::test]
async fn del_runs_every_plugin_and_returns_every_error() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "c"]);
    for p in ["a", "b", "c"] {
        f.on(p, "ADD", "out", &result_with_ip("10.1.0.1/24").to_string());
    }
    let n = Network::from_conflist_bytes(
        net(
            "1.0.0",
            json!([{"type": "a"}, {"type": "b"}, {"type": "c"}]),
        )
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let cni = f.cni(LONG);
    let att = attachment("pod4");
    cni.add(&n, &att).await.unwrap();
    f.on("c", "DEL", "fail", r#"{"code": 11, "msg": "c is busy"}"#);
    f.on(
        "a",
        "DEL",
        "fail",
        r#"{"code": 5, "msg": "a lost its disk"}"#,
    );
    f.reset_log();
    let e = cni.del(&n, &att).await.unwrap_err();
    assert_eq!(f.log(), ["c DEL pod4", "b DEL pod4", "a DEL pod4"]);
    let Error::Teardown {
        command, errors, ..
    } = &e
    else {
        panic!("not a teardown error: {e}");
    };
    assert_eq!(*command, Command::Del);
    assert_eq!(errors.len(), 2, "{e}");
    assert_eq!(
        e.to_string(),
        "DEL of network \"fakenet\" failed: CNI plugin \"c\" failed DEL: c is busy [code 11: try again later]; \
         CNI plugin \"a\" failed DEL: a lost its disk [code 5: I/O failure]"
    );
    // Not torn down: the cache entry stays so a retry still has the result.
    assert_eq!(f.cache_entries(), ["fakenet-pod4-eth0"]);

    f.clear("c", "DEL", "fail");
    f.clear("a", "DEL", "fail");
    cni.del(&n, &att).await.unwrap();
    assert!(f.cache_entries().is_empty());
}

#[tokio::test]
async fn plugin_failures_read_clearly_and_cache_nothing() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "c"]);
    f.on(
        "a",
        "ADD",
        "out",
        &result_with_ip("10.1.0.1/24").to_string(),
    );
    f.on(
        "b",
        "ADD",
        "fail",
        r#"{"cniVersion": "1.0.0", "code": 7, "msg": "no bridge name", "details": "bridge: field required"}"#,
    );
    f.on("b", "ADD", "stderr", "trace line\n");
    let n = Network::from_conflist_bytes(
        net(
            "1.0.0",
            json!([{"type": "a"}, {"type": "b"}, {"type": "c"}]),
        )
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let cni = f.cni(LONG);
    let e = cni.add(&n, &attachment("pod5")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "CNI plugin \"b\" failed ADD: no bridge name (bridge: field required) \
         [code 7: invalid network config]; stderr: \"trace line\""
    );
    assert_eq!(e.plugin_code(), Some(7));
    assert_eq!(f.log(), ["a ADD pod5", "b ADD pod5"], "c must not run");
    assert!(f.cache_entries().is_empty());

    // Not JSON: the output itself is the message.
    f.on("b", "ADD", "fail", "panic: runtime error\n");
    f.clear("b", "ADD", "stderr");
    let e = cni.add(&n, &attachment("pod5")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "CNI plugin \"b\" failed ADD: exit status: 1; output: \"panic: runtime error\""
    );
    // Nothing at all.
    f.on("b", "ADD", "fail", "");
    let e = cni.add(&n, &attachment("pod5")).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "CNI plugin \"b\" failed ADD: exit status: 1 with no error message"
    );

    // Success with a result that is not one.
    f.clear("b", "ADD", "fail");
    f.on("b", "ADD", "out", r#"{"ips": [{"address": "10.1.0.9"}]}"#);
    let e = cni.add(&n, &attachment("pod5")).await.unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("CNI plugin \"b\" ADD printed an invalid result: invalid IP address syntax"),
        "{s}"
    );
    f.on("b", "ADD", "out", "");
    let e = cni.add(&n, &attachment("pod5")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("printed an invalid result: no result"),
        "{e}"
    );
    assert!(f.cache_entries().is_empty());
}

#[tokio::test]
async fn oversized_output_is_refused() {
    let f = Fixture::new();
    f.plugins(&["a"]);
    f.on("a", "ADD", "big", "");
    let n =
        Network::from_conflist_bytes(net("1.0.0", json!([{"type": "a"}])).to_string().as_bytes())
            .unwrap();
    let e = f.cni(LONG).add(&n, &attachment("pod6")).await.unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("2100000 bytes of output, more than the 1048576 allowed"),
        "{s}"
    );
    assert!(s.len() < 4096, "the message is bounded: {} bytes", s.len());
}

#[tokio::test]
async fn a_missing_plugin_is_named_with_the_dirs_searched() {
    let f = Fixture::new();
    f.plugins(&["a"]);
    let n = Network::from_conflist_bytes(
        net("1.1.0", json!([{"type": "a"}, {"type": "nosuch"}]))
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let cni = f.cni(LONG);
    let want = format!(
        "CNI plugin \"nosuch\" not found in [{:?}, {:?}]",
        f.rec.join("nobin"),
        f.bin
    );
    let e = cni.add(&n, &attachment("pod7")).await.unwrap_err();
    assert!(matches!(e, Error::PluginNotFound { .. }));
    assert_eq!(e.to_string(), want);
    assert!(f.log().is_empty(), "nothing may run: {:?}", f.log());
    // STATUS says the same, so berthd can report NetworkReady=false with it.
    assert_eq!(cni.status(&n).await.unwrap_err().to_string(), want);
    // DEL still runs what it can and names what it could not.
    let e = cni.del(&n, &attachment("pod7")).await.unwrap_err();
    assert_eq!(f.log(), ["a DEL pod7"]);
    assert!(e.to_string().ends_with(&want), "{e}");
}

fn gone_or_zombie(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test]
async fn a_plugin_past_the_timeout_is_killed_with_what_it_started() {
    let f = Fixture::new();
    f.plugins(&["slow"]);
    f.on("slow", "ADD", "sleep", "");
    let n = Network::from_conflist_bytes(
        net("1.0.0", json!([{"type": "slow"}]))
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let cni = f.cni(Duration::from_millis(700));
    let started = Instant::now();
    let e = cni.add(&n, &attachment("pod8")).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "CNI plugin \"slow\" did not finish ADD within 700ms; killed it"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let pid = std::fs::read_to_string(f.rec.join("slow.pid")).unwrap();
    let child = std::fs::read_to_string(f.rec.join("slow.child")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(gone_or_zombie(pid.trim()) && gone_or_zombie(child.trim())) {
        assert!(
            Instant::now() < deadline,
            "plugin {pid} or its child {child} still alive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(f.cache_entries().is_empty());
}

#[tokio::test]
async fn check_status_gc_and_version() {
    let f = Fixture::new();
    f.plugins(&["a", "b", "old"]);
    let ra = result_with_ip("10.1.0.1/24");
    let rb = result_with_ip("10.1.0.2/24");
    f.on("a", "ADD", "out", &ra.to_string());
    f.on("b", "ADD", "out", &rb.to_string());
    let cni = f.cni(LONG);
    let parse = |v: Value| Network::from_conflist_bytes(v.to_string().as_bytes()).unwrap();
    let n = parse(net("1.1.0", json!([{"type": "a"}, {"type": "b"}])));

    // CHECK: in order, with the cached result.
    let e = cni.check(&n, &attachment("c1")).await.unwrap_err();
    assert!(matches!(e, Error::NotAttached { .. }), "{e}");
    for cid in ["c1", "c2", "c3"] {
        cni.add(&n, &attachment(cid)).await.unwrap();
    }
    f.reset_log();
    cni.check(&n, &attachment("c1")).await.unwrap();
    assert_eq!(f.log(), ["a CHECK c1", "b CHECK c1"]);
    assert_eq!(f.stdin("a", "CHECK")["prevResult"], rb);
    f.on(
        "a",
        "CHECK",
        "fail",
        r#"{"code": 3, "msg": "eth0 is gone"}"#,
    );
    f.reset_log();
    let e = cni.check(&n, &attachment("c1")).await.unwrap_err();
    assert_eq!(e.plugin_code(), Some(3));
    assert_eq!(f.log(), ["a CHECK c1"], "CHECK stops at the first failure");
    let e = cni
        .check(
            &parse(net("0.3.1", json!([{"type": "a"}]))),
            &attachment("c1"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"fakenet\" has cniVersion 0.3.1; CHECK needs 0.4.0 or newer"
    );
    f.reset_log();
    let mut no_check = net("1.0.0", json!([{"type": "a"}]));
    no_check["disableCheck"] = json!(true);
    cni.check(&parse(no_check), &attachment("c1"))
        .await
        .unwrap();
    assert!(f.log().is_empty());

    // STATUS: per plugin, without attachment variables; 50 means not available.
    f.reset_log();
    cni.status(&n).await.unwrap();
    assert_eq!(f.log(), ["a STATUS", "b STATUS"]);
    let env = f.env("a", "STATUS");
    assert_eq!(env["CNI_COMMAND"], "STATUS");
    assert!(
        !env.contains_key("CNI_CONTAINERID") && !env.contains_key("CNI_NETNS"),
        "{env:?}"
    );
    assert_eq!(f.stdin("b", "STATUS")["name"], "fakenet");
    f.on("b", "STATUS", "fail", r#"{"code": 50, "msg": "no uplink"}"#);
    let e = cni.status(&n).await.unwrap_err();
    assert_eq!(e.plugin_code(), Some(50));
    assert_eq!(
        e.to_string(),
        "CNI plugin \"b\" failed STATUS: no uplink [code 50: plugin not available]"
    );
    // Before 1.1 there is no STATUS to run: ready when the binaries are there.
    f.reset_log();
    cni.status(&parse(net("1.0.0", json!([{"type": "b"}]))))
        .await
        .unwrap();
    assert!(f.log().is_empty());

    // GC: stale cached attachments are DELeted, then every plugin gets GC with the valid ones.
    f.reset_log();
    let valid = [GcAttachment {
        container_id: "c1".into(),
        ifname: "eth0".into(),
    }];
    cni.gc(&n, &valid).await.unwrap();
    assert_eq!(
        f.log(),
        [
            "b DEL c2", "a DEL c2", "b DEL c3", "a DEL c3", "a GC", "b GC"
        ]
    );
    assert_eq!(f.cache_entries(), ["fakenet-c1-eth0"]);
    let gc_in = f.stdin("b", "GC");
    assert_eq!(
        gc_in["cni.dev/valid-attachments"],
        json!([{"containerID": "c1", "ifname": "eth0"}])
    );
    assert_eq!(gc_in["cniVersion"], "1.1.0");
    assert!(!f.env("a", "GC").contains_key("CNI_CONTAINERID"));
    // A failing GC keeps going and reports.
    f.on("a", "GC", "fail", r#"{"code": 5, "msg": "store locked"}"#);
    f.reset_log();
    let e = cni.gc(&n, &valid).await.unwrap_err();
    assert_eq!(f.log(), ["a GC", "b GC"]);
    assert_eq!(
        e.to_string(),
        "GC of network \"fakenet\" failed: CNI plugin \"a\" failed GC: store locked [code 5: I/O failure]"
    );

    // VERSION.
    f.on(
        "a",
        "VERSION",
        "out",
        r#"{"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}"#,
    );
    let v = cni.version("a").await.unwrap();
    assert_eq!(v.cni_version, "1.1.0");
    assert_eq!(v.supported_versions, ["0.4.0", "1.0.0", "1.1.0"]);
    assert_eq!(f.stdin("a", "VERSION"), json!({"cniVersion": "1.1.0"}));
    assert_eq!(f.env("a", "VERSION")["CNI_COMMAND"], "VERSION");
    assert_eq!(
        cni.version("old").await.unwrap().supported_versions,
        ["0.1.0"]
    );
}

#[tokio::test]
async fn gc_of_a_network_whose_conflist_is_gone_uses_the_cache() {
    let f = Fixture::new();
    f.plugins(&["a"]);
    f.on(
        "a",
        "ADD",
        "out",
        &result_with_ip("10.1.0.1/24").to_string(),
    );
    f.write_conf("10-fake.conflist", &net("1.0.0", json!([{"type": "a"}])));
    let cni = f.cni(LONG);
    cni.add(&cni.default_network().unwrap(), &attachment("c9"))
        .await
        .unwrap();
    std::fs::remove_file(f.conf.join("10-fake.conflist")).unwrap();
    assert!(cni.default_network().is_err());

    // Recovery: nothing but the cache says what to tear down.
    let cached = cni.cached_attachments().await.unwrap();
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0].network_name, "fakenet");
    assert_eq!(
        cached[0].netns.as_deref(),
        Some(Path::new("/run/netns/fake"))
    );
    f.reset_log();
    cni.del_cached(&cached[0]).await.unwrap();
    assert_eq!(f.log(), ["a DEL c9"]);
    // The netns no longer exists, so it is not passed.
    assert_eq!(f.env("a", "DEL")["CNI_NETNS"], "");
    assert!(cni.cached_attachments().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_default_network_follows_the_conf_dir() {
    let f = Fixture::new();
    let cni = f.cni(LONG);
    assert_eq!(
        cni.default_network().unwrap_err().reason,
        format!("no CNI network config found in {}", f.conf.display())
    );
    std::fs::write(f.conf.join("05-broken.conflist"), "{\"name\":").unwrap();
    let reason = cni.default_network().unwrap_err().reason;
    assert!(
        reason.starts_with(&format!(
            "no valid CNI network config in {0}: {0}/05-broken.conflist: invalid JSON",
            f.conf.display()
        )),
        "{reason}"
    );
    f.write_conf(
        "20-b.conflist",
        &json!({"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "x"}]}),
    );
    assert_eq!(cni.default_network().unwrap().name(), "b");
    f.write_conf(
        "10-a.conf",
        &json!({"cniVersion": "1.0.0", "name": "a", "type": "y"}),
    );
    assert_eq!(cni.default_network().unwrap().name(), "a");
    assert_eq!(cni.configs().skipped.len(), 1);
    assert_eq!(cni.network("b").unwrap().plugins()[0].plugin_type(), "x");
    std::fs::remove_file(f.conf.join("10-a.conf")).unwrap();
    assert_eq!(cni.default_network().unwrap().name(), "b");
}

#[tokio::test]
async fn a_cancelled_call_kills_its_plugin() {
    let f = Fixture::new();
    f.plugins(&["slow"]);
    f.on("slow", "ADD", "sleep", "");
    let n = Network::from_conflist_bytes(
        net("1.0.0", json!([{"type": "slow"}]))
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let cni = f.cni(LONG);
    // The caller gives up (its request was cancelled): the future is dropped mid-call.
    let dropped = tokio::time::timeout(
        Duration::from_millis(700),
        cni.add(&n, &attachment("pod10")),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the plugin should still have been running"
    );
    let pid = std::fs::read_to_string(f.rec.join("slow.pid")).unwrap();
    let child = std::fs::read_to_string(f.rec.join("slow.child")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(gone_or_zombie(pid.trim()) && gone_or_zombie(child.trim())) {
        assert!(
            Instant::now() < deadline,
            "plugin {pid} or its child {child} outlived the dropped call"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
