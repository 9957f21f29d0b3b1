#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use api::cri::{
    Capability, ContainerMetadata, Device, HugepageLimit, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount, NamespaceOption, PodSandboxMetadata, SecurityProfile,
    UserNamespace,
};
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccompAction};

use super::*;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:app\napp:x:1000:\n";

/// Owned inputs; [`Fixture::input`] borrows them into a [`SpecInput`].
struct Fixture {
    image: Value,
    config: ContainerConfig,
    sandbox: PodSandboxConfig,
    host: HostInfo,
    ns_net: Option<PathBuf>,
    ns_ipc: Option<PathBuf>,
    ns_uts: Option<PathBuf>,
    ns_pid: Option<PathBuf>,
    ns_target: Option<PathBuf>,
    files: Option<(PathBuf, PathBuf, PathBuf)>,
    shm: Option<PathBuf>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            image: json!({
                "architecture": "amd64",
                "config": {
                    "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
                    "Entrypoint": ["/entry"],
                    "Cmd": ["serve", "--port=80"],
                    "WorkingDir": "/srv",
                }
            }),
            config: ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                linux: Some(LinuxContainerConfig {
                    resources: None,
                    security_context: Some(LinuxContainerSecurityContext {
                        namespace_options: Some(NamespaceOption {
                            pid: NamespaceMode::Container as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            },
            sandbox: PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "pod".into(),
                    uid: "uid-1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                hostname: "pod-host".into(),
                linux: Some(LinuxPodSandboxConfig::default()),
                ..Default::default()
            },
            host: HostInfo {
                hostname: "node1".into(),
                ..HostInfo::default()
            },
            ns_net: Some("/run/berth/ns/sb/net".into()),
            ns_ipc: Some("/run/berth/ns/sb/ipc".into()),
            ns_uts: Some("/run/berth/ns/sb/uts".into()),
            ns_pid: None,
            ns_target: None,
            files: None,
            shm: None,
        }
    }

    fn sc(&mut self) -> &mut LinuxContainerSecurityContext {
        self.config
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
    }

    fn resources(&mut self) -> &mut LinuxContainerResources {
        self.config
            .linux
            .as_mut()
            .unwrap()
            .resources
            .get_or_insert_with(Default::default)
    }

    fn privileged(&mut self) {
        self.sc().privileged = true;
        self.sandbox.linux.as_mut().unwrap().security_context = Some(LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        });
    }

    fn input(&self) -> SpecInput<'_> {
        SpecInput {
            container_id: "c1",
            sandbox_id: "sb",
            image_name: "docker.io/library/nginx:latest",
            image_config: &self.image,
            rootfs: Path::new("/run/berth/containers/c1/rootfs"),
            image_passwd: Some(PASSWD),
            image_group: Some(GROUP),
            config: &self.config,
            sandbox: &self.sandbox,
            namespaces: SandboxNamespaces {
                network: self.ns_net.as_deref(),
                ipc: self.ns_ipc.as_deref(),
                uts: self.ns_uts.as_deref(),
                pid: self.ns_pid.as_deref(),
                target_pid: self.ns_target.as_deref(),
            },
            cgroup_parent: "/berth/sb",
            host: &self.host,
            sandbox_files: SandboxFiles {
                hostname: self.files.as_ref().map(|f| f.0.as_path()),
                hosts: self.files.as_ref().map(|f| f.1.as_path()),
                resolv_conf: self.files.as_ref().map(|f| f.2.as_path()),
                shm: self.shm.as_deref(),
            },
        }
    }

    fn generated(&self) -> (Spec, Vec<Clamped>) {
        generate(&self.input()).unwrap()
    }

    fn spec(&self) -> Spec {
        self.generated().0
    }

    fn err(&self) -> SpecError {
        generate(&self.input()).unwrap_err()
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn args(spec: &Spec) -> Vec<String> {
    spec.process().as_ref().unwrap().args().clone().unwrap()
}

fn env(spec: &Spec) -> Vec<String> {
    spec.process().as_ref().unwrap().env().clone().unwrap()
}

fn linux(spec: &Spec) -> &oci_spec::runtime::Linux {
    spec.linux().as_ref().unwrap()
}

fn mount_of<'a>(spec: &'a Spec, dst: &str) -> Option<&'a oci_spec::runtime::Mount> {
    spec.mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new(dst))
}

fn options(m: &oci_spec::runtime::Mount) -> Vec<String> {
    m.options().clone().unwrap_or_default()
}

fn ns_of(spec: &Spec, t: LinuxNamespaceType) -> Option<oci_spec::runtime::LinuxNamespace> {
    linux(spec)
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .find(|n| n.typ() == t)
        .cloned()
}

// ---- process ---------------------------------------------------------------------------

#[test]
fn entrypoint_cmd_override_table() {
    // (command, args) → expected argv, with image Entrypoint ["/entry"], Cmd ["serve", "--port=80"].
    let cases: [(&[&str], &[&str], &[&str]); 4] = [
        (&[], &[], &["/entry", "serve", "--port=80"]),
        (&[], &["debug"], &["/entry", "debug"]),
        (&["/bin/sh"], &[], &["/bin/sh"]),
        (&["/bin/sh"], &["-c", "true"], &["/bin/sh", "-c", "true"]),
    ];
    for (command, a, want) in cases {
        let mut f = Fixture::new();
        f.config.command = s(command);
        f.config.args = s(a);
        assert_eq!(args(&f.spec()), s(want), "command {command:?} args {a:?}");
    }
}

#[test]
fn empty_entrypoint_and_no_command() {
    let mut f = Fixture::new();
    f.image = json!({"config": {"Entrypoint": [""], "Cmd": ["run"]}});
    assert_eq!(args(&f.spec()), s(&["run"]));
    f.image = json!({"config": {"Entrypoint": null, "Cmd": null}});
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("no command")));
    f.config.args = s(&["/bin/true"]);
    assert_eq!(args(&f.spec()), s(&["/bin/true"]));
}

#[test]
fn env_merge_overrides_by_key() {
    let mut f = Fixture::new();
    f.config.envs = vec![
        KeyValue {
            key: "LANG".into(),
            value: "en_US".into(),
        },
        KeyValue {
            key: "EXTRA".into(),
            value: "a=b".into(),
        },
    ];
    let e = env(&f.spec());
    assert_eq!(
        e,
        s(&[
            "PATH=/usr/bin:/bin",
            "HOSTNAME=pod-host",
            "LANG=en_US",
            "EXTRA=a=b",
            "HOME=/root",
        ])
    );
    // Without a pod hostname: the host's; without an image PATH: the default.
    f.sandbox.hostname.clear();
    f.image = json!({"config": {"Cmd": ["x"], "Env": ["HOME=/data"]}});
    let e = env(&f.spec());
    assert_eq!(e[0], DEFAULT_PATH);
    assert!(e.contains(&"HOSTNAME=node1".to_string()));
    assert!(e.contains(&"HOME=/data".to_string()));
}

#[test]
fn cwd_tty_and_nnp() {
    let mut f = Fixture::new();
    let sp = f.spec();
    let p = sp.process().as_ref().unwrap();
    assert_eq!(p.cwd(), Path::new("/srv"));
    assert_eq!(p.terminal(), Some(false));
    // Absent, not false: see generate() on libcontainer's seccomp ordering.
    assert_eq!(p.no_new_privileges(), None);
    f.config.working_dir = "/work".into();
    f.config.tty = true;
    f.sc().no_new_privs = true;
    let sp = f.spec();
    let p = sp.process().as_ref().unwrap();
    assert_eq!(p.cwd(), Path::new("/work"));
    assert_eq!(p.terminal(), Some(true));
    assert_eq!(p.no_new_privileges(), Some(true));
    f.image = json!({"config": {"Cmd": ["x"]}});
    f.config.working_dir.clear();
    assert_eq!(f.spec().process().as_ref().unwrap().cwd(), Path::new("/"));
    f.config.working_dir = "rel".into();
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

// ---- user ------------------------------------------------------------------------------

fn user(f: &Fixture) -> (u32, u32, Vec<u32>) {
    let sp = f.spec();
    let u = sp.process().as_ref().unwrap().user().clone();
    (
        u.uid(),
        u.gid(),
        u.additional_gids().clone().unwrap_or_default(),
    )
}

#[test]
fn user_from_image_and_cri() {
    let mut f = Fixture::new();
    assert_eq!(user(&f), (0, 0, vec![0]));
    f.image["config"]["User"] = json!("app");
    assert_eq!(user(&f), (1000, 1000, vec![10, 1000]));
    assert!(env(&f.spec()).contains(&"HOME=/home/app".to_string()));
    f.image["config"]["User"] = json!("app:wheel");
    assert_eq!(user(&f), (1000, 10, vec![10]));
    f.image["config"]["User"] = json!("1234:5678");
    assert_eq!(user(&f), (1234, 5678, vec![5678]));
    f.image["config"]["User"] = json!("ghost");
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("ghost")));

    // The CRI wins over the image.
    f.sc().run_as_user = Some(Int64Value { value: 1000 });
    assert_eq!(user(&f), (1000, 1000, vec![10, 1000]));
    f.sc().run_as_group = Some(Int64Value { value: 77 });
    f.sc().supplemental_groups = vec![500];
    assert_eq!(user(&f), (1000, 77, vec![10, 77, 500]));
    f.sc().run_as_user = None;
    f.sc().run_as_username = "root".into();
    assert_eq!(user(&f), (0, 77, vec![77, 500]));
    f.sc().run_as_username = "nobody".into();
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
    f.sc().run_as_username.clear();
    // run_as_group without a user.
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

#[test]
fn supplemental_groups_strict_policy() {
    let mut f = Fixture::new();
    f.sc().run_as_username = "app".into();
    f.sc().supplemental_groups = vec![42];
    assert_eq!(user(&f), (1000, 1000, vec![10, 42, 1000]));
    f.sc().supplemental_groups_policy = SupplementalGroupsPolicy::Strict as i32;
    assert_eq!(user(&f), (1000, 1000, vec![42, 1000]));
}

// ---- capabilities, privileged ----------------------------------------------------------

fn cap_names(c: &Option<oci_spec::runtime::Capabilities>) -> BTreeSet<String> {
    c.iter()
        .flatten()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn capabilities_add_drop_and_clamp() {
    let mut f = Fixture::new();
    f.sc().capabilities = Some(Capability {
        add_capabilities: s(&["NET_ADMIN", "sys_resource"]),
        drop_capabilities: s(&["CAP_NET_RAW"]),
        add_ambient_capabilities: vec![],
    });
    // This host lacks CAP_SYS_RESOURCE.
    f.host.cap_bounding = caps::FULL_MASK & !(1 << 24);
    let (sp, cl) = f.generated();
    let c = sp
        .process()
        .as_ref()
        .unwrap()
        .capabilities()
        .clone()
        .unwrap();
    let eff = cap_names(c.effective());
    assert!(eff.contains("CAP_NET_ADMIN"));
    assert!(!eff.contains("CAP_NET_RAW"));
    assert!(!eff.contains("CAP_SYS_RESOURCE"));
    assert_eq!(eff, cap_names(c.bounding()));
    assert_eq!(eff, cap_names(c.permitted()));
    assert!(cap_names(c.ambient()).is_empty());
    assert_eq!(
        cl,
        vec![Clamped::Capability {
            name: "CAP_SYS_RESOURCE".into()
        }]
    );
    f.sc().capabilities.as_mut().unwrap().add_capabilities = s(&["NOPE"]);
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

#[test]
fn privileged_container() {
    let mut f = Fixture::new();
    f.sc().privileged = true;
    // Not in a privileged sandbox.
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("privileged")));
    f.privileged();
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let (sp, cl) = f.generated();
    assert!(cl.is_empty());
    let c = sp
        .process()
        .as_ref()
        .unwrap()
        .capabilities()
        .clone()
        .unwrap();
    assert_eq!(cap_names(c.bounding()).len(), 41);
    let l = linux(&sp);
    assert!(l.seccomp().is_none());
    assert!(l.masked_paths().is_none());
    assert!(l.readonly_paths().is_none());
    let rules = l.resources().as_ref().unwrap().devices().clone().unwrap();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].allow());
    assert_eq!(rules[0].access().as_deref(), Some("rwm"));
    assert!(!options(mount_of(&sp, "/sys").unwrap()).contains(&"ro".to_string()));
    assert!(options(mount_of(&sp, "/sys/fs/cgroup").unwrap()).contains(&"rw".to_string()));
    let devs = l.devices().clone().unwrap();
    assert!(devs.iter().any(|d| d.path() == Path::new("/dev/null")));
}

// ---- seccomp ---------------------------------------------------------------------------

#[test]
fn seccomp_modes() {
    let mut f = Fixture::new();
    // Unset: unconfined.
    assert!(linux(&f.spec()).seccomp().is_none());

    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let sp = f.spec();
    let sec = linux(&sp).seccomp().clone().unwrap();
    assert_eq!(sec.default_action(), LinuxSeccompAction::ScmpActErrno);
    assert_eq!(sec.default_errno_ret(), Some(1));
    let names: BTreeSet<String> = sec
        .syscalls()
        .iter()
        .flatten()
        .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
        .flat_map(|r| r.names().clone())
        .collect();
    assert!(names.contains("read"));
    assert!(!names.contains("kexec_load"));
    assert!(!names.contains("mount"));

    // Adding CAP_SYS_ADMIN widens the default profile, as docker does.
    f.sc().capabilities = Some(Capability {
        add_capabilities: s(&["SYS_ADMIN"]),
        ..Default::default()
    });
    let sp = f.spec();
    let sec = linux(&sp).seccomp().clone().unwrap();
    assert!(
        sec.syscalls()
            .iter()
            .flatten()
            .any(|r| r.names().contains(&"mount".to_string()))
    );

    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(linux(&f.spec()).seccomp().is_none());

    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.json");
    std::fs::write(
        &prof,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: prof.display().to_string(),
    });
    let sp = f.spec();
    let sec = linux(&sp).seccomp().clone().unwrap();
    assert_eq!(sec.default_action(), LinuxSeccompAction::ScmpActAllow);
    f.sc().seccomp.as_mut().unwrap().localhost_ref = dir.path().join("nope").display().to_string();
    assert!(matches!(f.err(), SpecError::ReadSeccompProfile { .. }));
    f.sc().seccomp.as_mut().unwrap().localhost_ref = "relative.json".into();
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

#[test]
#[allow(deprecated)]
fn seccomp_legacy_paths() {
    let mut f = Fixture::new();
    for (path, confined) in [
        ("", false),
        ("unconfined", false),
        ("runtime/default", true),
        ("docker/default", true),
    ] {
        f.sc().seccomp_profile_path = path.into();
        assert_eq!(linux(&f.spec()).seccomp().is_some(), confined, "{path}");
    }
    f.sc().seccomp_profile_path = "localhost//nonexistent/profile.json".into();
    assert!(matches!(f.err(), SpecError::ReadSeccompProfile { .. }));
    f.sc().seccomp_profile_path = "bogus".into();
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

// ---- mounts ----------------------------------------------------------------------------

#[test]
fn default_mounts_and_sandbox_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::new();
    let sp = f.spec();
    let dsts: Vec<PathBuf> = sp
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.destination().clone())
        .collect();
    assert_eq!(
        dsts,
        [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup"
        ]
        .map(PathBuf::from)
    );
    assert!(options(mount_of(&sp, "/sys").unwrap()).contains(&"ro".to_string()));
    let cg = mount_of(&sp, "/sys/fs/cgroup").unwrap();
    assert_eq!(cg.typ().as_deref(), Some("cgroup"));
    assert!(options(cg).contains(&"ro".to_string()));
    assert!(options(mount_of(&sp, "/dev/shm").unwrap()).contains(&"size=65536k".to_string()));

    let p = |n: &str| dir.path().join(n);
    f.files = Some((p("hostname"), p("hosts"), p("resolv.conf")));
    f.shm = Some(p("shm"));
    f.sc().readonly_rootfs = true;
    let sp = f.spec();
    let hosts = mount_of(&sp, "/etc/hosts").unwrap();
    assert_eq!(hosts.typ().as_deref(), Some("bind"));
    assert_eq!(hosts.source().as_deref(), Some(p("hosts").as_path()));
    assert_eq!(options(hosts), s(&["rbind", "rprivate", "ro"]));
    assert!(mount_of(&sp, "/etc/resolv.conf").is_some());
    assert!(mount_of(&sp, "/etc/hostname").is_some());
    let shm = mount_of(&sp, "/dev/shm").unwrap();
    assert_eq!(shm.typ().as_deref(), Some("bind"));
    assert_eq!(options(shm), s(&["rbind", "rprivate", "rw"]));
    assert_eq!(
        sp.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.destination() == Path::new("/dev/shm"))
            .count(),
        1
    );
    assert_eq!(sp.root().as_ref().unwrap().readonly(), Some(true));
    assert_eq!(
        sp.root().as_ref().unwrap().path(),
        Path::new("/run/berth/containers/c1/rootfs")
    );
}

#[test]
fn cri_mounts_with_propagation() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let mnt = |cp: &str, hp: &Path, ro: bool, prop: MountPropagation| Mount {
        container_path: cp.into(),
        host_path: hp.display().to_string(),
        readonly: ro,
        propagation: prop as i32,
        ..Default::default()
    };
    let mut f = Fixture::new();
    f.files = Some((a.clone(), a.clone(), a.clone()));
    f.config.mounts = vec![
        mnt(
            "/data/deep/er",
            &a,
            false,
            MountPropagation::PropagationPrivate,
        ),
        mnt(
            "/data/",
            &link,
            true,
            MountPropagation::PropagationHostToContainer,
        ),
        mnt(
            "/etc/hosts",
            &a,
            false,
            MountPropagation::PropagationPrivate,
        ),
    ];
    let sp = f.spec();
    let ms = sp.mounts().as_ref().unwrap();
    let pos = |d: &str| {
        ms.iter()
            .position(|m| m.destination() == Path::new(d))
            .unwrap()
    };
    // Shallower first; the CRI /etc/hosts replaces the sandbox's.
    assert!(pos("/data") < pos("/data/deep/er"));
    let data = &ms[pos("/data")];
    assert_eq!(
        data.source().as_deref(),
        Some(a.canonicalize().unwrap().as_path())
    );
    assert_eq!(options(data), s(&["rbind", "rslave", "ro"]));
    assert_eq!(
        options(&ms[pos("/data/deep/er")]),
        s(&["rbind", "rprivate", "rw"])
    );
    assert_eq!(
        options(&ms[pos("/etc/hosts")]),
        s(&["rbind", "rprivate", "rw"])
    );
    assert_eq!(
        ms.iter()
            .filter(|m| m.destination() == Path::new("/etc/hosts"))
            .count(),
        1
    );
    assert_eq!(linux(&sp).rootfs_propagation().as_deref(), Some("rslave"));

    f.config.mounts.push(mnt(
        "/b",
        &a,
        false,
        MountPropagation::PropagationBidirectional,
    ));
    let sp = f.spec();
    assert_eq!(linux(&sp).rootfs_propagation().as_deref(), Some("rshared"));
    assert_eq!(
        options(mount_of(&sp, "/b").unwrap()),
        s(&["rbind", "rshared", "rw"])
    );

    // Recursive read-only.
    f.config.mounts = vec![Mount {
        recursive_read_only: true,
        ..mnt("/r", &a, true, MountPropagation::PropagationPrivate)
    }];
    assert_eq!(
        options(mount_of(&f.spec(), "/r").unwrap()),
        s(&["rbind", "rprivate", "rro"])
    );
    f.config.mounts[0].readonly = false;
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));

    // Bad input.
    f.config.mounts = vec![mnt(
        "relative",
        &a,
        false,
        MountPropagation::PropagationPrivate,
    )];
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("not absolute")));
    f.config.mounts = vec![mnt(
        "/x",
        &dir.path().join("missing"),
        false,
        MountPropagation::PropagationPrivate,
    )];
    assert!(matches!(f.err(), SpecError::MountSource { .. }));
}

#[test]
fn dev_mount_replaces_dev_defaults() {
    let mut f = Fixture::new();
    f.config.mounts = vec![Mount {
        container_path: "/dev".into(),
        host_path: "/dev".into(),
        ..Default::default()
    }];
    let sp = f.spec();
    let ms = sp.mounts().as_ref().unwrap();
    assert_eq!(
        ms.iter()
            .filter(|m| m.destination().starts_with("/dev"))
            .count(),
        1
    );
    assert_eq!(
        mount_of(&sp, "/dev").unwrap().typ().as_deref(),
        Some("bind")
    );
}

#[test]
fn masked_and_readonly_paths() {
    let mut f = Fixture::new();
    let sp = f.spec();
    assert_eq!(
        linux(&sp).masked_paths().clone().unwrap(),
        s(&DEFAULT_MASKED_PATHS)
    );
    assert_eq!(
        linux(&sp).readonly_paths().clone().unwrap(),
        s(&DEFAULT_READONLY_PATHS)
    );
    f.sc().masked_paths = s(&["/proc/secret"]);
    f.sc().readonly_paths = s(&["/proc/ro"]);
    let sp = f.spec();
    assert_eq!(
        linux(&sp).masked_paths().clone().unwrap(),
        s(&["/proc/secret"])
    );
    assert_eq!(
        linux(&sp).readonly_paths().clone().unwrap(),
        s(&["/proc/ro"])
    );
}

// ---- namespaces ------------------------------------------------------------------------

#[test]
fn namespace_modes() {
    let mut f = Fixture::new();
    let sp = f.spec();
    assert_eq!(ns_of(&sp, LinuxNamespaceType::Pid).unwrap().path(), &None);
    assert_eq!(
        ns_of(&sp, LinuxNamespaceType::Network)
            .unwrap()
            .path()
            .as_deref(),
        Some(Path::new("/run/berth/ns/sb/net"))
    );
    assert!(
        ns_of(&sp, LinuxNamespaceType::Ipc)
            .unwrap()
            .path()
            .is_some()
    );
    assert!(
        ns_of(&sp, LinuxNamespaceType::Uts)
            .unwrap()
            .path()
            .is_some()
    );
    assert_eq!(ns_of(&sp, LinuxNamespaceType::Mount).unwrap().path(), &None);
    assert!(ns_of(&sp, LinuxNamespaceType::Cgroup).is_none());
    assert_eq!(sp.hostname().as_deref(), Some("pod-host"));

    // Host network, IPC and UTS: no entries, no hostname.
    f.ns_net = None;
    f.ns_ipc = None;
    f.ns_uts = None;
    let sp = f.spec();
    assert!(ns_of(&sp, LinuxNamespaceType::Network).is_none());
    assert!(ns_of(&sp, LinuxNamespaceType::Ipc).is_none());
    assert!(ns_of(&sp, LinuxNamespaceType::Uts).is_none());
    assert!(sp.hostname().is_none());

    let set_pid = |f: &mut Fixture, m: NamespaceMode| {
        f.sc().namespace_options.as_mut().unwrap().pid = m as i32;
    };
    set_pid(&mut f, NamespaceMode::Node);
    assert!(ns_of(&f.spec(), LinuxNamespaceType::Pid).is_none());
    set_pid(&mut f, NamespaceMode::Pod);
    assert_eq!(
        ns_of(&f.spec(), LinuxNamespaceType::Pid).unwrap().path(),
        &None
    );
    f.ns_pid = Some("/proc/77/ns/pid".into());
    assert_eq!(
        ns_of(&f.spec(), LinuxNamespaceType::Pid)
            .unwrap()
            .path()
            .as_deref(),
        Some(Path::new("/proc/77/ns/pid"))
    );
    set_pid(&mut f, NamespaceMode::Target);
    assert!(matches!(f.err(), SpecError::FailedPrecondition(_)));
    f.ns_target = Some("/proc/88/ns/pid".into());
    assert_eq!(
        ns_of(&f.spec(), LinuxNamespaceType::Pid)
            .unwrap()
            .path()
            .as_deref(),
        Some(Path::new("/proc/88/ns/pid"))
    );

    // cgroup v2 hosts give unprivileged containers a cgroup namespace.
    f.host.cgroup_unified = true;
    assert!(ns_of(&f.spec(), LinuxNamespaceType::Cgroup).is_some());

    // User namespaces are refused.
    f.sc().namespace_options.as_mut().unwrap().userns_options = Some(UserNamespace {
        mode: NamespaceMode::Pod as i32,
        ..Default::default()
    });
    assert!(matches!(f.err(), SpecError::Unsupported(_)));
    f.sc().namespace_options.as_mut().unwrap().userns_options = Some(UserNamespace {
        mode: NamespaceMode::Node as i32,
        ..Default::default()
    });
    assert!(f.input().config.linux.is_some());
    generate(&f.input()).unwrap();
}

// ---- resources, devices, sysctls -------------------------------------------------------

#[test]
fn resources_and_cgroups_path() {
    let mut f = Fixture::new();
    *f.resources() = LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 256 << 20,
        oom_score_adj: 500,
        cpuset_cpus: "0-1".into(),
        cpuset_mems: "0".into(),
        hugepage_limits: vec![HugepageLimit {
            page_size: "2MB".into(),
            limit: 4 << 20,
        }],
        unified: HashMap::from([("memory.high".to_string(), "200000000".to_string())]),
        memory_swap_limit_in_bytes: 0,
    };
    let (sp, cl) = f.generated();
    assert!(cl.is_empty());
    let l = linux(&sp);
    assert_eq!(l.cgroups_path().as_deref(), Some(Path::new("/berth/sb/c1")));
    let r = l.resources().as_ref().unwrap();
    let cpu = r.cpu().as_ref().unwrap();
    assert_eq!(cpu.period(), Some(100_000));
    assert_eq!(cpu.quota(), Some(50_000));
    assert_eq!(cpu.shares(), Some(512));
    assert_eq!(cpu.cpus().as_deref(), Some("0-1"));
    assert_eq!(cpu.mems().as_deref(), Some("0"));
    let mem = r.memory().as_ref().unwrap();
    assert_eq!(mem.limit(), Some(256 << 20));
    assert_eq!(mem.swap(), Some(256 << 20));
    let h = r.hugepage_limits().clone().unwrap();
    assert_eq!((h[0].page_size().as_str(), h[0].limit()), ("2MB", 4 << 20));
    assert_eq!(
        r.unified()
            .as_ref()
            .unwrap()
            .get("memory.high")
            .map(String::as_str),
        Some("200000000")
    );
    assert_eq!(sp.process().as_ref().unwrap().oom_score_adj(), Some(500));

    f.resources().memory_swap_limit_in_bytes = 512 << 20;
    let sp = f.spec();
    let swap = linux(&sp)
        .resources()
        .as_ref()
        .unwrap()
        .memory()
        .as_ref()
        .unwrap()
        .swap();
    assert_eq!(swap, Some(512 << 20));

    // A host without hugetlb and swap controllers.
    f.host.hugetlb_controller = false;
    f.host.swap_controller = false;
    let (sp, cl) = f.generated();
    let r = linux(&sp).resources().clone().unwrap();
    assert!(r.hugepage_limits().is_none());
    assert_eq!(r.memory().as_ref().unwrap().swap(), None);
    assert_eq!(
        cl,
        vec![
            Clamped::MemorySwap {
                requested: 512 << 20
            },
            Clamped::HugepageLimit {
                page_size: "2MB".into()
            },
        ]
    );

    // A hybrid host with hugetlb only in cgroup2: berthd applies the limits itself, so they
    // stay out of the spec; only a size the kernel lacks is reported.
    f.host.hugetlb_hybrid = Some("/sys/fs/cgroup/unified".into());
    f.resources().hugepage_limits.push(HugepageLimit {
        page_size: "4MB".into(),
        limit: 0,
    });
    let (sp, cl) = f.generated();
    assert!(
        linux(&sp)
            .resources()
            .clone()
            .unwrap()
            .hugepage_limits()
            .is_none()
    );
    assert_eq!(
        cl,
        vec![
            Clamped::MemorySwap {
                requested: 512 << 20
            },
            Clamped::HugepageSize {
                page_size: "4MB".into()
            },
        ]
    );
}

#[test]
fn oom_score_adj_clamped_without_sys_resource() {
    let mut f = Fixture::new();
    f.resources().oom_score_adj = -997;
    assert_eq!(
        f.spec().process().as_ref().unwrap().oom_score_adj(),
        Some(-997)
    );
    f.host.has_sys_resource = false;
    let (sp, cl) = f.generated();
    assert_eq!(sp.process().as_ref().unwrap().oom_score_adj(), Some(0));
    assert_eq!(
        cl,
        vec![Clamped::OomScoreAdj {
            requested: -997,
            granted: 0
        }]
    );
    assert!(cl[0].to_string().contains("CAP_SYS_RESOURCE"));
    f.resources().oom_score_adj = -2000;
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
}

#[test]
fn device_rules() {
    let mut f = Fixture::new();
    let sp = f.spec();
    let rules = linux(&sp)
        .resources()
        .as_ref()
        .unwrap()
        .devices()
        .clone()
        .unwrap();
    assert!(!rules[0].allow());
    assert_eq!(rules[0].access().as_deref(), Some("rwm"));
    assert!(
        rules
            .iter()
            .any(|r| r.allow() && r.major() == Some(1) && r.minor() == Some(3))
    );
    assert!(linux(&sp).devices().as_ref().unwrap().is_empty());

    f.config.devices = vec![Device {
        container_path: "/dev/xnull".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    let sp = f.spec();
    let devs = linux(&sp).devices().clone().unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].path(), Path::new("/dev/xnull"));
    assert_eq!((devs[0].major(), devs[0].minor()), (1, 3));
    let last = linux(&sp)
        .resources()
        .as_ref()
        .unwrap()
        .devices()
        .clone()
        .unwrap()
        .pop()
        .unwrap();
    assert!(last.allow());
    assert_eq!((last.major(), last.minor()), (Some(1), Some(3)));
    assert_eq!(last.access().as_deref(), Some("rw"));

    f.config.devices[0].permissions = "rwx".into();
    assert!(matches!(f.err(), SpecError::InvalidArgument(_)));
    f.config.devices[0].permissions.clear();
    f.config.devices[0].host_path = "/nonexistent/dev".into();
    assert!(matches!(f.err(), SpecError::ReadDevice { .. }));
}

#[test]
fn sysctls() {
    let mut f = Fixture::new();
    let sysctls = &mut f.sandbox.linux.as_mut().unwrap().sysctls;
    sysctls.insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
    sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
    sysctls.insert("fs/mqueue/msg_max".into(), "20".into());
    let sp = f.spec();
    let s = linux(&sp).sysctl().clone().unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s["fs.mqueue.msg_max"], "20");
    assert_eq!(s["kernel.shm_rmid_forced"], "1");

    f.ns_ipc = None;
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("IPC")));
    f.ns_ipc = Some("/ipc".into());
    f.ns_net = None;
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("network")));
    f.ns_net = Some("/net".into());
    f.sandbox
        .linux
        .as_mut()
        .unwrap()
        .sysctls
        .insert("kernel.shm_notathing_but_prefixed".into(), "1".into());
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("not namespaced")));
    let sysctls = &mut f.sandbox.linux.as_mut().unwrap().sysctls;
    sysctls.remove("kernel.shm_notathing_but_prefixed");
    sysctls.insert("vm.swappiness".into(), "1".into());
    assert!(matches!(f.err(), SpecError::InvalidArgument(m) if m.contains("not namespaced")));
}

// ---- annotations, serialization --------------------------------------------------------

#[test]
fn annotations() {
    let f = Fixture::new();
    let sp = f.spec();
    let a = sp.annotations().clone().unwrap();
    assert_eq!(a["io.kubernetes.cri.container-type"], "container");
    assert_eq!(a["io.kubernetes.cri.sandbox-id"], "sb");
    assert_eq!(a["io.kubernetes.cri.sandbox-name"], "pod");
    assert_eq!(a["io.kubernetes.cri.sandbox-namespace"], "default");
    assert_eq!(a["io.kubernetes.cri.sandbox-uid"], "uid-1");
    assert_eq!(a["io.kubernetes.cri.container-name"], "web");
    assert_eq!(
        a["io.kubernetes.cri.image-name"],
        "docker.io/library/nginx:latest"
    );
}

#[test]
fn serde_round_trip_is_what_runtimes_read() {
    let mut f = Fixture::new();
    f.sc().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    f.resources().memory_limit_in_bytes = 1 << 30;
    let sp = f.spec();
    let text = serde_json::to_string_pretty(&sp).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ociVersion"], oci_spec::runtime::VERSION);
    assert_eq!(v["root"]["path"], "/run/berth/containers/c1/rootfs");
    assert_eq!(v["process"]["user"]["uid"], 0);
    assert!(v["process"]["capabilities"]["bounding"].is_array());
    assert!(v["process"].get("rlimits").is_none());
    assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(
        v["linux"]["seccomp"]["architectures"][0],
        "SCMP_ARCH_X86_64"
    );
    assert_eq!(v["linux"]["resources"]["memory"]["limit"], 1 << 30);
    assert_eq!(v["linux"]["cgroupsPath"], "/berth/sb/c1");
    assert_eq!(v["linux"]["namespaces"][0]["type"], "pid");
    let back: Spec = serde_json::from_str(&text).unwrap();
    assert_eq!(back, sp);
    // The spec saves like the shim will load it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    sp.save(&path).unwrap();
    assert_eq!(Spec::load(&path).unwrap(), sp);
}

#[test]
fn spec_errors_map_to_grpc_codes() {
    let code = |e: SpecError| tonic::Status::from(crate::error::Error::from(e)).code();
    assert_eq!(
        code(SpecError::InvalidArgument("x".into())),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(SpecError::FailedPrecondition("x".into())),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(SpecError::Unsupported("x")),
        tonic::Code::Unimplemented
    );
    assert_eq!(
        code(SpecError::MountSource {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn clean_paths() {
    assert_eq!(clean_container_path("/a//b/./c/").unwrap(), "/a/b/c");
    assert_eq!(clean_container_path("/a/../../b").unwrap(), "/b");
    assert_eq!(clean_container_path("/").unwrap(), "/");
    assert!(clean_container_path("a/b").is_err());
}

#[test]
fn host_probe_parsers() {
    let status = "Name:\tberthd\nCapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
    assert_eq!(status_mask(status, "CapBnd"), Some(0x1ff_ffff_ffff));
    assert_eq!(status_mask(status, "CapEff"), Some(0x1ff_feff_ffff));
    assert_eq!(status_mask(status, "CapAmb"), None);
    assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
    assert_eq!(kernel_version("5.15"), Some((5, 15)));
    assert_eq!(kernel_version("garbage"), None);

    // A hybrid host without CAP_SYS_RESOURCE, like this project's machines.
    let root = tempfile::tempdir().unwrap();
    let w = |p: &str, c: &str| {
        let p = root.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, c).unwrap();
    };
    w("proc/self/status", status);
    w("proc/sys/kernel/osrelease", "6.1.0\n");
    w("proc/sys/kernel/hostname", "node7\n");
    w("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "");
    w("sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
    let h = HostInfo::probe_at(root.path());
    assert!(!h.has_sys_resource);
    assert_eq!(h.cap_bounding, 0x1ff_ffff_ffff);
    assert_eq!(h.kernel, Some((6, 1)));
    assert_eq!(h.hostname, "node7");
    assert!(!h.cgroup_unified);
    assert!(h.swap_controller);
    assert!(!h.hugetlb_controller);
    // v1 hierarchies: dirs with cgroup.procs, co-mount symlinks too; not cgroup2's "unified".
    w("sys/fs/cgroup/memory/cgroup.procs", "");
    w("sys/fs/cgroup/cpu,cpuacct/cgroup.procs", "");
    w("sys/fs/cgroup/unified/cgroup.procs", "");
    std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("sys/fs/cgroup/cpu")).unwrap();
    assert_eq!(
        HostInfo::probe_at(root.path()).cgroup_v1_hierarchies,
        s(&["cpu", "cpu,cpuacct", "memory"])
    );
    assert_eq!(
        h.hugetlb_hybrid,
        Some(root.path().join("sys/fs/cgroup/unified"))
    );
    assert!(h.hugepage_sizes_kb.is_empty());
    std::fs::create_dir_all(root.path().join("sys/kernel/mm/hugepages/hugepages-2048kB")).unwrap();
    assert_eq!(
        HostInfo::probe_at(root.path()).hugepage_sizes_kb,
        vec![2048]
    );

    // cgroup v2.
    w(
        "sys/fs/cgroup/cgroup.controllers",
        "cpuset cpu io memory hugetlb pids\n",
    );
    let h = HostInfo::probe_at(root.path());
    assert!(h.cgroup_unified && h.swap_controller && h.hugetlb_controller);
    assert!(h.cgroup_v1_hierarchies.is_empty());
    assert_eq!(
        h.hugetlb_hybrid, None,
        "v2 root: the OCI runtime applies them"
    );
    // The real host parses too.
    assert_ne!(HostInfo::probe().cap_bounding, 0);
}

#[test]
fn cgroup_v1_mount_is_emulated_only_in_a_joined_pid_namespace() {
    let mut f = Fixture::new();
    f.host.cgroup_v1_hierarchies = s(&["cpu", "memory"]);
    // Own PID namespace: libcontainer's cgroup mount works.
    let m = f.spec();
    assert_eq!(
        mount_of(&m, "/sys/fs/cgroup").unwrap().typ().as_deref(),
        Some("cgroup")
    );
    assert!(cgroup_v1_bind_sources(&f.input()).unwrap().is_empty());

    // The pod's PID namespace: a tmpfs and the container's own cgroups, read-only.
    f.sc().namespace_options.as_mut().unwrap().pid = NamespaceMode::Pod as i32;
    f.ns_pid = Some("/run/berth/ns/sb/pid".into());
    let m = f.spec();
    let root = mount_of(&m, "/sys/fs/cgroup").unwrap();
    assert_eq!(root.typ().as_deref(), Some("tmpfs"));
    let mem = mount_of(&m, "/sys/fs/cgroup/memory").unwrap();
    assert_eq!(mem.typ().as_deref(), Some("bind"));
    assert_eq!(
        mem.source().as_deref(),
        Some(Path::new("/sys/fs/cgroup/memory/berth/sb/c1"))
    );
    assert!(options(mem).contains(&"ro".to_string()));
    let mounts = m.mounts().as_ref().unwrap();
    let at = |dst: &str| {
        mounts
            .iter()
            .position(|m| m.destination() == Path::new(dst))
    };
    assert!(
        at("/sys/fs/cgroup") < at("/sys/fs/cgroup/cpu"),
        "tmpfs first"
    );
    assert!(!mounts.iter().any(|m| m.typ().as_deref() == Some("cgroup")));
    assert_eq!(
        cgroup_v1_bind_sources(&f.input()).unwrap(),
        vec![
            PathBuf::from("/sys/fs/cgroup/cpu/berth/sb/c1"),
            PathBuf::from("/sys/fs/cgroup/memory/berth/sb/c1"),
        ]
    );
    // Privileged containers get them read-write, as the cgroup mount would be.
    f.privileged();
    let m = f.spec();
    assert!(options(mount_of(&m, "/sys/fs/cgroup/cpu").unwrap()).contains(&"rw".to_string()));

    // A unified host mounts cgroup2 itself: nothing to emulate.
    let mut f = Fixture::new();
    f.host.cgroup_unified = true;
    f.sc().namespace_options.as_mut().unwrap().pid = NamespaceMode::Pod as i32;
    f.ns_pid = Some("/run/berth/ns/sb/pid".into());
    assert_eq!(
        mount_of(&f.spec(), "/sys/fs/cgroup")
            .unwrap()
            .typ()
            .as_deref(),
        Some("cgroup")
    );
    assert!(cgroup_v1_bind_sources(&f.input()).unwrap().is_empty());
}
