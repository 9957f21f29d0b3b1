//! Security context, mounts and resources, checked from inside real containers: each container
//! prints facts about itself (`/proc/self/status`, `id`, writes that must fail, its mounts) and
//! the test reads them back from the CRI log; resources are read from the host's cgroup files.

use std::path::{Path, PathBuf};

use api::cri;
use api::cri::security_profile::ProfileType;
use crictl_tests::pods::{
    self, Env, assert_clean, create, ctr_config, env, read_cri_log, remove_container, remove_pod,
    run_pod_with, start, status, wait_exited, warnings,
};
use tonic::Code;

/// Docker's (and containerd's) default capability set as a kernel mask: CHOWN, DAC_OVERRIDE,
/// FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD,
/// AUDIT_WRITE, SETFCAP.
const DOCKER_DEFAULT_CAPS: u64 = 0x0000_0000_a804_25fb;
const CAP_CHOWN: u64 = 1 << 0;
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_SYS_RESOURCE: u64 = 1 << 24;

/// The facts every container of these tests prints first.
const STATUS: &str = "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status";

fn pod_config(env: &Env, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: format!("{name}-host"),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        ..pods::pod_config(env, name)
    }
}

/// The resolv.conf [`pod_config`]'s DNS config gives.
const POD_RESOLV: &str =
    "search default.svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n";

fn privileged_pod_config(env: &Env, name: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(env, name);
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

/// A container running `script` with `/bin/sh -c`, with `sc` as its security context.
fn script_config(
    env: &Env,
    name: &str,
    script: &str,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    let mut cfg = ctr_config(env, name, &["/bin/sh", "-c", script]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    cfg
}

fn uid(v: i64) -> Option<cri::Int64Value> {
    Some(cri::Int64Value { value: v })
}

/// A security context running as root (uid 0), so that capability sets survive the exec.
fn as_root() -> cri::LinuxContainerSecurityContext {
    cri::LinuxContainerSecurityContext {
        run_as_user: uid(0),
        ..Default::default()
    }
}

async fn run_pod(env: &Env, name: &str) -> (String, cri::PodSandboxConfig) {
    run_pod_with(env, pod_config(env, name)).await
}

/// What a container printed, and how it ended.
#[derive(Debug)]
struct Ran {
    out: String,
    err: String,
    exit: i32,
}

impl Ran {
    /// The value of the first `key:` / `key=` line of stdout (as `grep` of /proc/self/status or
    /// `echo key=...` print them), trimmed.
    fn get(&self, key: &str) -> &str {
        self.out
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.strip_prefix(':').or_else(|| r.strip_prefix('=')))
            })
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in the output: {self:?}"))
    }

    /// A hex capability mask line of /proc/self/status.
    fn mask(&self, key: &str) -> u64 {
        u64::from_str_radix(self.get(key), 16)
            .unwrap_or_else(|e| panic!("{key} is not a hex mask ({e}): {self:?}"))
    }
}

/// Creates, starts and waits for one container, returns its output, and removes it.
async fn run_to_exit(
    env: &Env,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> Ran {
    let log = env.logs.path().join(&cfg.log_path);
    let id = create(env, pod, cfg)
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", warnings(env)));
    start(env, &id).await;
    let s = wait_exited(env, &id).await;
    let (out, err) = read_cri_log(&log);
    remove_container(env, &id).await;
    Ran {
        out,
        err,
        exit: s.exit_code,
    }
}

/// The mount options (field 6 of mountinfo) of the mount at `target`, as the container printed
/// its `/proc/self/mountinfo` between `mountinfo-begin` and `mountinfo-end`; the last mount
/// at that point wins, as it is the visible one.
fn mount_options(ran: &Ran, target: &str) -> Option<String> {
    ran.out
        .lines()
        .skip_while(|l| *l != "mountinfo-begin")
        .take_while(|l| *l != "mountinfo-end")
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 5 && f[4] == target).then(|| f[5].to_owned())
        })
        .last()
}

/// A hex mask line (`CapBnd:\t000001ffffffffff`) of `/proc/<pid>/status`.
fn proc_mask(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex mask"))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn berthd_pid(env: &Env) -> u32 {
    env.d.pid().expect("berthd runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn default_container_is_confined_like_docker() {
    let env = env().await;
    let pod = run_pod(&env, "defaults").await;
    let script = format!(
        "{STATUS}; echo id=$(id); \
         echo kcore=$(cat /proc/kcore 2>/dev/null | wc -c); \
         echo keys=$(cat /proc/keys | wc -c); \
         echo timer_list=$(cat /proc/timer_list | wc -c); \
         echo firmware=$(ls -A /sys/firmware | wc -l); \
         echo hostname=$(cat /etc/hostname); \
         echo resolv-begin; cat /etc/resolv.conf; echo resolv-end; \
         echo hosts=$(head -n 1 /etc/hosts); \
         echo home=$HOME; \
         echo mountinfo-begin; cat /proc/self/mountinfo; echo mountinfo-end"
    );
    // The image's USER app (uid 1000): a non-root user loses its effective and permitted
    // capabilities on exec (no ambient ones), as with docker and containerd; the bounding set
    // is docker's default.
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(&env, "plain", &script, Default::default()),
    )
    .await;
    assert_eq!(ran.exit, 0, "{ran:?}");
    assert_eq!(ran.err, "", "{ran:?}");
    assert_eq!(ran.mask("CapBnd"), DOCKER_DEFAULT_CAPS, "{ran:?}");
    assert_eq!(ran.mask("CapEff"), 0, "{ran:?}");
    assert_eq!(ran.mask("CapPrm"), 0, "{ran:?}");
    assert_eq!(ran.mask("CapInh"), 0, "{ran:?}");
    assert_eq!(ran.mask("CapAmb"), 0, "{ran:?}");
    assert_eq!(
        ran.get("NoNewPrivs"),
        "0",
        "no_new_privs is off unless asked"
    );
    assert_eq!(ran.get("Seccomp"), "0", "unconfined unless asked");
    assert_eq!(
        ran.get("id"),
        "uid=1000(app) gid=1000(app) groups=1000(app)"
    );
    assert_eq!(ran.get("home"), "/home/app");
    // Masked paths read empty; /proc/kcore may not exist at all on this kernel.
    assert_eq!(ran.get("kcore"), "0", "{ran:?}");
    assert_eq!(ran.get("keys"), "0", "/proc/keys is masked: {ran:?}");
    assert_eq!(ran.get("timer_list"), "0", "/proc/timer_list is masked");
    assert_eq!(ran.get("firmware"), "0", "/sys/firmware is masked");
    // Readonly paths are read-only mounts; /proc itself is not.
    for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
        if let Some(opts) = mount_options(&ran, p) {
            assert!(opts.split(',').any(|o| o == "ro"), "{p} mounted {opts}");
        } else {
            assert!(!Path::new(p).exists(), "{p} is not a mount: {ran:?}");
        }
    }
    let proc_opts = mount_options(&ran, "/proc").expect("/proc mounted");
    assert!(proc_opts.starts_with("rw"), "/proc {proc_opts}");
    // The cgroup fs and /sys are read-only for unprivileged containers.
    let sys_opts = mount_options(&ran, "/sys").expect("/sys mounted");
    assert!(sys_opts.starts_with("ro"), "/sys {sys_opts}");
    // The pod's files.
    assert_eq!(ran.get("hostname"), "defaults-host");
    let resolv: String = ran
        .out
        .lines()
        .skip_while(|l| *l != "resolv-begin")
        .skip(1)
        .take_while(|l| *l != "resolv-end")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(resolv, POD_RESOLV);
    assert!(
        ran.get("hosts").starts_with("127.0.0.1"),
        "/etc/hosts: {ran:?}"
    );
    for f in ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"] {
        let opts = mount_options(&ran, f).unwrap_or_else(|| panic!("{f} not bind-mounted"));
        assert!(opts.starts_with("rw"), "{f} {opts}");
    }

    // As root (uid 0), the effective set is docker's default, and a readonly path refuses a
    // write root could otherwise do (net sysctls of the pod's own netns need only uid 0).
    let script = format!(
        "{STATUS}; echo id=$(id); \
         echo 1 > /proc/sys/net/ipv4/ip_forward; echo sysctl_rc=$?; \
         echo ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
    );
    let ran = run_to_exit(&env, &pod, script_config(&env, "root", &script, as_root())).await;
    assert_eq!(ran.mask("CapEff"), DOCKER_DEFAULT_CAPS, "{ran:?}");
    assert_eq!(ran.mask("CapPrm"), DOCKER_DEFAULT_CAPS, "{ran:?}");
    assert_eq!(ran.mask("CapBnd"), DOCKER_DEFAULT_CAPS, "{ran:?}");
    assert_eq!(ran.mask("CapAmb"), 0, "{ran:?}");
    assert_eq!(ran.get("id"), "uid=0(root) gid=0(root) groups=0(root)");
    assert_ne!(ran.get("sysctl_rc"), "0", "/proc/sys is read-only: {ran:?}");
    assert!(ran.err.contains("Read-only file system"), "{ran:?}");
    // A new netns starts with the host's IPv4 forwarding setting; the write above changed nothing.
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host sysctl");
    assert_eq!(ran.get("ip_forward"), host.trim());

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_add_drop_all_and_clamped() {
    let env = env().await;
    let pod = run_pod(&env, "caps").await;
    let caps = |add: &[&str], drop: &[&str]| {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: v(add),
                drop_capabilities: v(drop),
                add_ambient_capabilities: vec![],
            }),
            ..as_root()
        }
    };
    // chown needs CAP_CHOWN even for root: it shows the drop took effect, not just the mask.
    let script = format!(
        "{STATUS}; touch /tmp/f; /bin/busybox chown 1000 /tmp/f; echo chown_rc=$?; \
         /bin/busybox ip link set lo mtu 1400; echo netadmin_rc=$?"
    );

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(&env, "adddrop", &script, caps(&["NET_ADMIN"], &["CHOWN"])),
    )
    .await;
    let want = (DOCKER_DEFAULT_CAPS | CAP_NET_ADMIN) & !CAP_CHOWN;
    assert_eq!(ran.mask("CapEff"), want, "{ran:?}");
    assert_eq!(ran.mask("CapPrm"), want, "{ran:?}");
    assert_eq!(ran.mask("CapBnd"), want, "{ran:?}");
    assert_ne!(ran.get("chown_rc"), "0", "CHOWN dropped: {ran:?}");
    assert_eq!(ran.get("netadmin_rc"), "0", "NET_ADMIN added: {ran:?}");

    // Without changes, root may chown but not administer the network.
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(&env, "nochange", &script, as_root()),
    )
    .await;
    assert_eq!(ran.mask("CapEff"), DOCKER_DEFAULT_CAPS, "{ran:?}");
    assert_eq!(ran.get("chown_rc"), "0", "{ran:?}");
    assert_ne!(ran.get("netadmin_rc"), "0", "{ran:?}");

    // Drop ALL: nothing left anywhere, even for root.
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(&env, "dropall", &script, caps(&[], &["ALL"])),
    )
    .await;
    for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        assert_eq!(ran.mask(set), 0, "{set}: {ran:?}");
    }
    assert_ne!(ran.get("chown_rc"), "0", "{ran:?}");

    // Drop ALL then add one, lower-case and with the CAP_ prefix.
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "onlykill",
            &script,
            caps(&["cap_kill", "CAP_NET_ADMIN"], &["ALL"]),
        ),
    )
    .await;
    assert_eq!(ran.mask("CapEff"), (1 << 5) | CAP_NET_ADMIN, "{ran:?}");

    // Ambient capabilities survive the exec of a non-root user (app, uid 1000).
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "ambient",
            STATUS,
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_ambient_capabilities: vec!["NET_BIND_SERVICE".into(), "NET_ADMIN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    )
    .await;
    let ambient = CAP_NET_BIND_SERVICE | CAP_NET_ADMIN;
    assert_eq!(ran.mask("CapAmb"), ambient, "{ran:?}");
    assert_eq!(ran.mask("CapInh"), ambient, "{ran:?}");
    assert_eq!(ran.mask("CapEff"), ambient, "{ran:?}");
    assert_eq!(ran.mask("CapPrm"), ambient, "{ran:?}");
    assert_eq!(
        ran.mask("CapBnd"),
        DOCKER_DEFAULT_CAPS | CAP_NET_ADMIN,
        "{ran:?}"
    );

    // What berthd itself cannot hold is clamped, logged, and does not fail the request.
    let berthd_bnd = proc_mask(berthd_pid(&env), "CapBnd");
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(&env, "sysres", &script, caps(&["SYS_RESOURCE"], &[])),
    )
    .await;
    if berthd_bnd & CAP_SYS_RESOURCE == 0 {
        assert_eq!(ran.mask("CapEff"), DOCKER_DEFAULT_CAPS, "{ran:?}");
        assert!(
            env.d
                .log()
                .contains("capability CAP_SYS_RESOURCE is outside berthd's bounding set"),
            "the clamp is logged"
        );
    } else {
        assert_eq!(
            ran.mask("CapEff"),
            DOCKER_DEFAULT_CAPS | CAP_SYS_RESOURCE,
            "{ran:?}"
        );
    }

    // An unknown capability is a bad request.
    let err = create(
        &env,
        &pod,
        script_config(&env, "bogus", "true", caps(&["FLY"], &[])),
    )
    .await
    .expect_err("unknown capability");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn users_groups_and_usernames() {
    let env = env().await;
    let pod = run_pod(&env, "users").await;
    let script = "echo id=$(id); echo home=$HOME; touch /x 2>/dev/null; echo root_write=$?";

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "numeric",
            script,
            cri::LinuxContainerSecurityContext {
                run_as_user: uid(4242),
                run_as_group: uid(4343),
                supplemental_groups: vec![5000],
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(
        ran.get("id"),
        "uid=4242 gid=4343 groups=4343,5000",
        "{ran:?}"
    );
    assert_eq!(ran.get("home"), "/", "no passwd entry: HOME is /");
    assert_ne!(ran.get("root_write"), "0", "uid 4242 cannot write /");

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "byname",
            script,
            cri::LinuxContainerSecurityContext {
                run_as_username: "app".into(),
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(
        ran.get("id"),
        "uid=1000(app) gid=1000(app) groups=1000(app)"
    );
    assert_eq!(ran.get("home"), "/home/app");

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "nobody",
            script,
            cri::LinuxContainerSecurityContext {
                run_as_username: "nobody".into(),
                supplemental_groups: vec![1000],
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(
        ran.get("id"),
        "uid=65534(nobody) gid=65534(nobody) groups=1000(app),65534(nobody)"
    );

    // run_as_user 0 overrides the image's USER.
    let ran = run_to_exit(&env, &pod, script_config(&env, "root", script, as_root())).await;
    assert_eq!(ran.get("id"), "uid=0(root) gid=0(root) groups=0(root)");
    assert_eq!(ran.get("home"), "/root");
    assert_eq!(
        ran.get("root_write"),
        "0",
        "root writes the writable rootfs"
    );

    // A name the image does not know, and a group without a user, are bad requests.
    for (name, sc) in [
        (
            "unknown",
            cri::LinuxContainerSecurityContext {
                run_as_username: "nosuchuser".into(),
                ..Default::default()
            },
        ),
        (
            "grouponly",
            cri::LinuxContainerSecurityContext {
                run_as_group: uid(5),
                ..Default::default()
            },
        ),
    ] {
        let err = create(&env, &pod, script_config(&env, name, "true", sc))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn readonly_rootfs_and_no_new_privs() {
    let env = env().await;
    let pod = run_pod(&env, "rofs").await;
    // Root, so that a failing write is the read-only mount and not permissions.
    let script = format!(
        "{STATUS}; touch /x; echo root_rc=$?; touch /tmp/x; echo tmp_rc=$?; \
         touch /dev/shm/x; echo shm_rc=$?; echo x >> /etc/hostname; echo hostname_rc=$?; \
         echo mountinfo-begin; cat /proc/self/mountinfo; echo mountinfo-end"
    );
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "ro",
            &script,
            cri::LinuxContainerSecurityContext {
                readonly_rootfs: true,
                no_new_privs: true,
                ..as_root()
            },
        ),
    )
    .await;
    assert_ne!(ran.get("root_rc"), "0", "{ran:?}");
    assert!(
        ran.err.contains("/x: Read-only file system"),
        "fails for the read-only rootfs: {ran:?}"
    );
    assert_ne!(ran.get("tmp_rc"), "0", "/tmp is part of the rootfs");
    assert_eq!(ran.get("shm_rc"), "0", "/dev/shm stays writable: {ran:?}");
    assert_ne!(
        ran.get("hostname_rc"),
        "0",
        "pod files are read-only too: {ran:?}"
    );
    let root = mount_options(&ran, "/").expect("rootfs");
    assert!(root.starts_with("ro"), "/ {root}");
    assert_eq!(ran.get("NoNewPrivs"), "1");

    // Masked and readonly paths given by the CRI replace the defaults.
    let paths_script = "echo motd=$(cat /etc/motd | wc -c); touch /tmp/x; echo tmp_rc=$?; \
         echo timer_list=$(cat /proc/timer_list | wc -c); touch /home/app/x; echo home_rc=$?";
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "paths",
            paths_script,
            cri::LinuxContainerSecurityContext {
                masked_paths: vec!["/etc/motd".into()],
                readonly_paths: vec!["/tmp".into()],
                ..as_root()
            },
        ),
    )
    .await;
    assert_eq!(ran.get("motd"), "0", "masked: {ran:?}");
    assert_ne!(ran.get("tmp_rc"), "0", "read-only: {ran:?}");
    assert!(ran.err.contains("/tmp/x: Read-only file system"), "{ran:?}");
    assert_ne!(ran.get("timer_list"), "0", "not masked any more: {ran:?}");
    assert_eq!(ran.get("home_rc"), "0", "{ran:?}");

    // The same without: writable, and no_new_privs off.
    let ran = run_to_exit(&env, &pod, script_config(&env, "rw", &script, as_root())).await;
    assert_eq!(ran.get("root_rc"), "0", "{ran:?}");
    assert_eq!(ran.get("tmp_rc"), "0", "{ran:?}");
    assert_eq!(ran.get("NoNewPrivs"), "0");
    assert_eq!(ran.err, "", "{ran:?}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn seccomp_runtime_default_blocks_what_docker_blocks() {
    let env = env().await;
    let pod = run_pod(&env, "seccomp").await;
    // unshare(2) needs no capability for a user namespace, but docker's profile only allows it
    // with CAP_SYS_ADMIN: it tells the profile from the capabilities. mkdir is allowed by
    // docker's profile and blocked by the Localhost one below.
    let script = format!(
        "{STATUS}; grep Seccomp_filters /proc/self/status; \
         /bin/busybox unshare -U true; echo unshare_rc=$?; \
         mkdir /tmp/d; echo mkdir_rc=$?"
    );
    // Without no_new_privs, as kubelet sends it by default: a filter must still load (it did
    // not, once, because the spec said noNewPrivileges=false explicitly).
    let profile = |t: ProfileType, localhost: &str| cri::LinuxContainerSecurityContext {
        seccomp: Some(cri::SecurityProfile {
            profile_type: t as i32,
            localhost_ref: localhost.into(),
        }),
        ..Default::default()
    };

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "unconfined",
            &script,
            profile(ProfileType::Unconfined, ""),
        ),
    )
    .await;
    assert_eq!(ran.get("Seccomp"), "0", "{ran:?}");
    assert_eq!(
        ran.get("unshare_rc"),
        "0",
        "unconfined may unshare: {ran:?}"
    );
    assert_eq!(ran.get("mkdir_rc"), "0", "{ran:?}");

    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "default",
            &script,
            profile(ProfileType::RuntimeDefault, ""),
        ),
    )
    .await;
    assert_eq!(ran.get("Seccomp"), "2", "{ran:?}");
    assert_eq!(
        ran.get("NoNewPrivs"),
        "0",
        "filtered without no_new_privs: {ran:?}"
    );
    assert_ne!(ran.get("Seccomp_filters"), "0", "{ran:?}");
    assert_ne!(ran.get("unshare_rc"), "0", "blocked: {ran:?}");
    assert!(
        ran.err.contains("Operation not permitted"),
        "EPERM: {ran:?}"
    );
    assert_eq!(ran.get("mkdir_rc"), "0", "{ran:?}");

    // Docker's profile is conditional on capabilities: with CAP_SYS_ADMIN, unshare is allowed.
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "sysadmin",
            &script,
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["SYS_ADMIN".into()],
                    ..Default::default()
                }),
                ..profile(ProfileType::RuntimeDefault, "")
            },
        ),
    )
    .await;
    assert_eq!(ran.get("Seccomp"), "2", "{ran:?}");
    assert_eq!(
        ran.get("unshare_rc"),
        "0",
        "allowed with SYS_ADMIN: {ran:?}"
    );

    // The deprecated path field still means the same.
    #[allow(deprecated)]
    let legacy = cri::LinuxContainerSecurityContext {
        seccomp_profile_path: "runtime/default".into(),
        ..Default::default()
    };
    let ran = run_to_exit(&env, &pod, script_config(&env, "legacy", &script, legacy)).await;
    assert_eq!(ran.get("Seccomp"), "2", "{ran:?}");
    assert_ne!(ran.get("unshare_rc"), "0", "{ran:?}");

    // A Localhost profile in docker's format.
    let dir = tempfile::tempdir().expect("profile dir");
    let path = dir.path().join("no-mkdir.json");
    std::fs::write(
        &path,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .expect("write profile");
    let ran = run_to_exit(
        &env,
        &pod,
        script_config(
            &env,
            "localhost",
            &script,
            profile(ProfileType::Localhost, &path.display().to_string()),
        ),
    )
    .await;
    assert_eq!(ran.get("Seccomp"), "2", "{ran:?}");
    assert_ne!(ran.get("mkdir_rc"), "0", "blocked by the profile: {ran:?}");
    assert_eq!(
        ran.get("unshare_rc"),
        "0",
        "allowed by the profile: {ran:?}"
    );

    // A Localhost profile that is not there is a bad request.
    let err = create(
        &env,
        &pod,
        script_config(
            &env,
            "missing",
            "true",
            profile(ProfileType::Localhost, "/nonexistent/berth/profile.json"),
        ),
    )
    .await
    .expect_err("missing profile");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn privileged_container_gets_everything_berthd_has() {
    let env = env().await;
    // Not in an unprivileged pod.
    let plain = run_pod(&env, "plainpod").await;
    let priv_sc = cri::LinuxContainerSecurityContext {
        privileged: true,
        seccomp: Some(cri::SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        ..as_root()
    };
    let err = create(
        &env,
        &plain,
        script_config(&env, "refused", "true", priv_sc.clone()),
    )
    .await
    .expect_err("privileged in an unprivileged pod");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    remove_pod(&env, &plain.0).await;

    let pod = run_pod_with(&env, privileged_pod_config(&env, "privpod")).await;
    let script = format!(
        "{STATUS}; echo timer_list=$(cat /proc/timer_list | wc -c); \
         echo devices=$(ls /dev | wc -l); \
         echo mountinfo-begin; cat /proc/self/mountinfo; echo mountinfo-end"
    );
    let ran = run_to_exit(&env, &pod, script_config(&env, "priv", &script, priv_sc)).await;
    let bnd = proc_mask(berthd_pid(&env), "CapBnd");
    assert_eq!(ran.mask("CapEff"), bnd, "{ran:?}");
    assert_eq!(ran.mask("CapPrm"), bnd, "{ran:?}");
    assert_eq!(ran.mask("CapBnd"), bnd, "{ran:?}");
    assert_eq!(ran.get("Seccomp"), "0", "privileged is unconfined: {ran:?}");
    assert_ne!(ran.get("timer_list"), "0", "nothing masked: {ran:?}");
    let host_devices = std::fs::read_dir("/dev").expect("/dev").count();
    let devices: usize = ran.get("devices").parse().expect("count");
    assert!(
        devices + 10 >= host_devices,
        "the host's devices ({host_devices}) in the container ({devices})"
    );
    let sys = mount_options(&ran, "/sys").expect("/sys");
    assert!(sys.starts_with("rw"), "/sys {sys}");
    if let Some(opts) = mount_options(&ran, "/proc/sys") {
        assert!(opts.starts_with("rw"), "/proc/sys {opts}");
    }

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_path_mounts_readonly_and_readwrite() {
    let env = env().await;
    let pod = run_pod(&env, "mounts").await;
    let ro_dir = tempfile::tempdir().expect("ro dir");
    std::fs::write(ro_dir.path().join("hello"), "from the host\n").expect("write");
    let rw_dir = tempfile::tempdir().expect("rw dir");
    // The container runs as app (uid 1000): let it write.
    std::fs::set_permissions(
        rw_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    std::fs::set_permissions(
        ro_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");

    let script = "echo data=$(cat /data/hello); touch /data/new; echo ro_rc=$?; \
         echo from-container > /rw/out; echo rw_rc=$?; echo id=$(id -u); \
         echo mountinfo-begin; cat /proc/self/mountinfo; echo mountinfo-end";
    let mut cfg = ctr_config(&env, "binds", &["/bin/sh", "-c", script]);
    cfg.mounts = vec![
        cri::Mount {
            container_path: "/data".into(),
            host_path: ro_dir.path().display().to_string(),
            readonly: true,
            ..Default::default()
        },
        cri::Mount {
            container_path: "/rw".into(),
            host_path: rw_dir.path().display().to_string(),
            readonly: false,
            ..Default::default()
        },
    ];
    let ran = run_to_exit(&env, &pod, cfg).await;
    assert_eq!(ran.get("data"), "from the host", "{ran:?}");
    assert_ne!(ran.get("ro_rc"), "0", "{ran:?}");
    assert!(
        ran.err.contains("/data/new: Read-only file system"),
        "{ran:?}"
    );
    assert!(!ro_dir.path().join("new").exists());
    assert_eq!(ran.get("rw_rc"), "0", "{ran:?}");
    let out = rw_dir.path().join("out");
    assert_eq!(
        std::fs::read_to_string(&out).expect("written by the container"),
        "from-container\n"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&out).expect("stat")),
        1000,
        "owned by the container's user"
    );
    let data = mount_options(&ran, "/data").expect("/data mounted");
    assert!(data.starts_with("ro"), "/data {data}");
    let rw = mount_options(&ran, "/rw").expect("/rw mounted");
    assert!(rw.starts_with("rw"), "/rw {rw}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
    // The host dirs are the host's: removal of the container left them alone.
    assert!(ro_dir.path().join("hello").exists());
    assert!(out.exists());
}

/// The v1 cgroup dir of a container in one controller hierarchy.
fn cgroup_dir(controller: &str, pod: &str, ctr: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join("berth")
        .join(pod)
        .join(ctr)
}

fn cgroup_file(controller: &str, pod: &str, ctr: &str, file: &str) -> String {
    let p = cgroup_dir(controller, pod, ctr).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_owned()
}

const MIB: i64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn resources_land_in_the_cgroup_files() {
    let env = env().await;
    assert!(
        Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists(),
        "this test reads cgroup v1 files (hybrid layout)"
    );
    let pod = run_pod(&env, "resources").await;
    let mut cfg = ctr_config(&env, "limited", &["/bin/sleep", "1000"]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 * MIB,
            cpuset_cpus: "0".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&env, &pod, cfg).await.expect("create");
    start(&env, &id).await;
    let p = pod.0.as_str();
    assert_eq!(cgroup_file("cpu", p, &id, "cpu.shares"), "512");
    assert_eq!(cgroup_file("cpu", p, &id, "cpu.cfs_quota_us"), "50000");
    assert_eq!(cgroup_file("cpu", p, &id, "cpu.cfs_period_us"), "100000");
    assert_eq!(
        cgroup_file("memory", p, &id, "memory.limit_in_bytes"),
        (64 * MIB).to_string()
    );
    if cgroup_dir("memory", p, &id)
        .join("memory.memsw.limit_in_bytes")
        .exists()
    {
        // No swap unless asked: memory+swap equals memory (containerd).
        assert_eq!(
            cgroup_file("memory", p, &id, "memory.memsw.limit_in_bytes"),
            (64 * MIB).to_string()
        );
    }
    assert_eq!(cgroup_file("cpuset", p, &id, "cpuset.cpus"), "0");
    // The container's process is in those cgroups.
    let procs = cgroup_file("memory", p, &id, "cgroup.procs");
    assert!(!procs.is_empty(), "no process in the memory cgroup");
    for pid in procs.lines() {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("proc cgroup");
        let want = format!("/berth/{p}/{id}");
        for controller in ["memory", "cpuset"] {
            assert!(
                cg.lines().any(|l| {
                    let f: Vec<&str> = l.splitn(3, ':').collect();
                    f.len() == 3 && f[1].split(',').any(|c| c == controller) && f[2] == want
                }),
                "{pid} not in {controller} {want}: {cg}"
            );
        }
    }
    // ContainerStatus reports them.
    let s = status(&env, &id).await.expect("status");
    let r = s.resources.and_then(|r| r.linux).expect("status resources");
    assert_eq!(
        (
            r.cpu_shares,
            r.cpu_quota,
            r.cpu_period,
            r.memory_limit_in_bytes
        ),
        (512, 50_000, 100_000, 64 * MIB)
    );

    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    remove_container(&env, &id).await;
    for c in ["cpu", "memory", "cpuset"] {
        assert!(
            !cgroup_dir(c, p, &id).exists(),
            "{c} cgroup of the removed container"
        );
    }

    // An explicit swap limit; a hugepage limit, which this hybrid host's v1 manager cannot
    // set (hugetlb lives only in cgroup2): berthd sets it there (see tests/hugepages.rs), and
    // where no hugetlb controller exists it is skipped and logged without failing.
    let mut cfg = ctr_config(&env, "swap", &["/bin/sleep", "1000"]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 * MIB,
            memory_swap_limit_in_bytes: 96 * MIB,
            cpuset_mems: "0".into(),
            hugepage_limits: vec![cri::HugepageLimit {
                page_size: "2MB".into(),
                limit: 2 * MIB as u64,
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create(&env, &pod, cfg).await.expect("create");
    start(&env, &id).await;
    if cgroup_dir("memory", p, &id)
        .join("memory.memsw.limit_in_bytes")
        .exists()
    {
        assert_eq!(
            cgroup_file("memory", p, &id, "memory.memsw.limit_in_bytes"),
            (96 * MIB).to_string()
        );
    }
    assert_eq!(cgroup_file("cpuset", p, &id, "cpuset.mems"), "0");
    if Path::new("/sys/fs/cgroup/hugetlb").exists() {
        assert_eq!(
            cgroup_file("hugetlb", p, &id, "hugetlb.2MB.limit_in_bytes"),
            (2 * MIB).to_string()
        );
    } else if std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "hugetlb"))
    {
        assert_eq!(
            cgroup_file("unified", p, &id, "hugetlb.2MB.max"),
            (2 * MIB).to_string()
        );
    } else {
        assert!(
            env.d
                .log()
                .contains("hugepage limit 2MB skipped: no hugetlb controller"),
            "the skipped limit is logged"
        );
    }
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    remove_container(&env, &id).await;

    // From inside, the container sees its own memory limit.
    let mut cfg = ctr_config(
        &env,
        "inside",
        &[
            "/bin/sh",
            "-c",
            "echo limit=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes); \
             echo shares=$(cat /sys/fs/cgroup/cpu/cpu.shares)",
        ],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_shares: 256,
            memory_limit_in_bytes: 32 * MIB,
            ..Default::default()
        }),
        ..Default::default()
    });
    let ran = run_to_exit(&env, &pod, cfg).await;
    assert_eq!(ran.get("limit"), (32 * MIB).to_string(), "{ran:?}");
    assert_eq!(ran.get("shares"), "256", "{ran:?}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn oom_score_adj_is_set_or_clamped() {
    let env = env().await;
    let pod = run_pod(&env, "oom").await;
    let with_oom = |name: &str, adj: i64| {
        let mut cfg = ctr_config(
            &env,
            name,
            &["/bin/sh", "-c", "echo adj=$(cat /proc/self/oom_score_adj)"],
        );
        cfg.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                oom_score_adj: adj,
                ..Default::default()
            }),
            ..Default::default()
        });
        cfg
    };
    let ran = run_to_exit(&env, &pod, with_oom("positive", 500)).await;
    assert_eq!(ran.get("adj"), "500", "{ran:?}");

    // kubelet's value for guaranteed pods' infrastructure; lowering needs CAP_SYS_RESOURCE,
    // which berthd may lack: then it is clamped to 0 and logged, and the container still runs.
    let has_sys_resource = proc_mask(berthd_pid(&env), "CapEff") & CAP_SYS_RESOURCE != 0;
    let ran = run_to_exit(&env, &pod, with_oom("negative", -998)).await;
    if has_sys_resource {
        assert_eq!(ran.get("adj"), "-998", "{ran:?}");
    } else {
        assert_eq!(ran.get("adj"), "0", "clamped: {ran:?}");
        assert!(
            env.d
                .log()
                .contains("oom_score_adj -998 needs CAP_SYS_RESOURCE; set to 0"),
            "the clamp is logged"
        );
    }

    let err = create(&env, &pod, with_oom("outofrange", 1001))
        .await
        .expect_err("out of range");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
