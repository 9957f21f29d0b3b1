//! The OCI runtime spec (`config.json`) of a CRI container.
//!
//! [`generate`] is a pure function of the image config, the CRI container and sandbox configs
//! and what the caller knows about the host and the pod ([`SpecInput`]). Its only I/O is
//! reading: a Localhost seccomp profile, the host's device nodes (CRI devices, and /dev for
//! privileged containers) and the canonical path of each CRI mount source.
//!
//! It follows containerd's CRI plugin (`internal/cri/server/container_create*.go`,
//! `internal/cri/opts/spec_linux_opts.go`) and docker's defaults, with these choices:
//!
//! - **Clamping, not failing** (berth's design): capabilities outside berthd's bounding set are
//!   dropped, a negative `oom_score_adj` without CAP_SYS_RESOURCE becomes 0, hugepage limits
//!   without a hugetlb controller and swap limits without a swap controller are skipped. Each
//!   is returned as a [`Clamped`] for the caller to log; privileged containers silently get
//!   "every capability we have".
//! - **Hugepage limits on hybrid hosts** (hugetlb only in the cgroup2 mount,
//!   [`HostInfo::hugetlb_hybrid`]) stay out of the spec: the OCI runtime's v1 cgroup manager
//!   cannot set them, so berthd does it itself (`container::hugetlb`). Only sizes the kernel
//!   does not have are clamped there.
//! - **Seccomp** when the CRI sets none (neither `seccomp` nor the deprecated
//!   `seccomp_profile_path`): unconfined, as containerd 1.7/2.x with its default
//!   `unset_seccomp_profile = ""` and as kubelet's default (kubelet sends RuntimeDefault
//!   itself when `--seccomp-default` is on). Localhost profiles may be in docker's format
//!   (`archMap`, `includes`/`excludes`) or plain OCI.
//! - **Masked / readonly paths**: containerd's defaults unless the CRI lists some (the proto
//!   cannot tell "empty" from "unset", so an empty list means the defaults; kubelet's
//!   `procMount: Unmasked` therefore still masks — a privileged container masks nothing).
//! - **no_new_privs** follows the CRI field (false unless asked), like containerd: kubelet
//!   sets it from `allowPrivilegeEscalation`, so it always "says".
//! - **Ambient capabilities** (`add_ambient_capabilities`) are honoured: they go into every
//!   set. containerd clears the ambient set; the CRI field postdates that choice.
//! - **Image VOLUMEs are ignored** (containerd's `ignore_image_defined_volumes`, cri-o's
//!   `image_volumes = "ignore"`): creating per-container volume dirs is not a pure step and
//!   kubelet mounts what pods declare.
//! - **Mount sources must exist** (the CRI API says runtimes "should report an error");
//!   containerd creates them instead. Symlinks are followed. Propagation is not checked
//!   against the host mount's own propagation (containerd's `ensureShared`).
//! - **/dev/shm** is the sandbox's shared shm dir when [`SandboxFiles::shm`] is given (pods
//!   share one, as with containerd), else a private 64 MiB tmpfs.
//! - **HOME** is set from the user's passwd entry (or `/`) when neither the image nor the CRI
//!   sets it, as runc does, so it does not depend on the OCI runtime doing it.
//! - **Pid namespace**: CONTAINER → new; NODE → the host's; POD → the pod's
//!   ([`SandboxNamespaces::pid`]) or, when the pod has none, a new one; TARGET → the target's
//!   ([`SandboxNamespaces::target_pid`], required).
//! - **/sys/fs/cgroup on cgroup v1 in a joined PID namespace** (POD with the pod's, TARGET):
//!   libcontainer 0.7 mounts a v1 cgroupfs after reading `/proc/<its pid>` of the *host's*
//!   procfs (its parent is outside its PID namespace, so it takes its own pid for the host's
//!   PID 1). In a joined namespace that pid is not 1 but the pod namespace's, so creation fails
//!   whenever the host has no process of that number (and reads a stranger's cgroups when it
//!   has). Those containers get runc's view built from plain mounts instead: a tmpfs with the
//!   container's own cgroup of each v1 hierarchy bind-mounted below it
//!   ([`cgroup_v1_bind_sources`] must exist before creation).
//! - **User namespaces** (`userns_options` mode POD) are refused as unsupported.
//! - **Sysctls** of the pod are repeated in each container (they are per-namespace, so this is
//!   idempotent): `net.*` need the pod network namespace, the IPC ones (`kernel.shm*`,
//!   `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`) the pod IPC namespace, `kernel.domainname`
//!   the pod UTS namespace; any other is an error (libcontainer's own rules).

pub mod caps;
pub mod devices;
pub mod hugepages;
pub mod seccomp;
pub mod user;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use api::cri::{
    ContainerConfig, LinuxContainerSecurityContext, MountPropagation, NamespaceMode,
    PodSandboxConfig, SupplementalGroupsPolicy, security_profile::ProfileType,
};
use oci_spec::runtime::Spec;
use serde_json::{Value, json};

pub use caps::{CapMask, caps_from_mask};

/// The pod's pinned namespaces, as paths to join. `None` for network/ipc/uts means the host's.
#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxNamespaces<'a> {
    /// Pod network namespace (`None`: host network).
    pub network: Option<&'a Path>,
    /// Pod IPC namespace (`None`: host IPC).
    pub ipc: Option<&'a Path>,
    /// Pod UTS namespace (`None`: host UTS).
    pub uts: Option<&'a Path>,
    /// The pod's shared PID namespace, when the pod has one (pod PID mode POD).
    pub pid: Option<&'a Path>,
    /// The PID namespace of the target container, for PID mode TARGET.
    pub target_pid: Option<&'a Path>,
}

/// Files of the pod bind-mounted into every container (each only when given and not
/// overridden by a CRI mount).
#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxFiles<'a> {
    /// Becomes `/etc/hostname`.
    pub hostname: Option<&'a Path>,
    /// Becomes `/etc/hosts`.
    pub hosts: Option<&'a Path>,
    /// Becomes `/etc/resolv.conf`.
    pub resolv_conf: Option<&'a Path>,
    /// Becomes `/dev/shm` (the pod's shared tmpfs, or the host's `/dev/shm` for host IPC).
    pub shm: Option<&'a Path>,
}

/// What berthd knows about its host; gathered once at start.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// berthd's capability bounding set (`CapBnd` of /proc/self/status).
    pub cap_bounding: CapMask,
    /// Whether berthd may lower `oom_score_adj` below 0 (has CAP_SYS_RESOURCE).
    pub has_sys_resource: bool,
    /// Kernel `(major, minor)`, for seccomp `minKernel` rules; `None` = recent enough.
    pub kernel: Option<(u32, u32)>,
    /// The host's hostname: `HOSTNAME` of containers in pods without a hostname.
    pub hostname: String,
    /// cgroup v2 unified mode: unprivileged containers get a cgroup namespace.
    pub cgroup_unified: bool,
    /// A memory swap controller exists (`memory.memsw.*` / `memory.swap.max`).
    pub swap_controller: bool,
    /// A hugetlb controller exists where the OCI runtime's cgroup manager looks (a v1
    /// controller, or the v2 root of a unified host).
    pub hugetlb_controller: bool,
    /// A hybrid host (v1 controllers) whose hugetlb controller is only in the cgroup2 mount:
    /// that mount (`/sys/fs/cgroup/unified`). berthd applies hugepage limits there itself.
    pub hugetlb_hybrid: Option<PathBuf>,
    /// The kernel's hugepage sizes in KiB (`/sys/kernel/mm/hugepages`), ascending.
    pub hugepage_sizes_kb: Vec<u64>,
    /// The host's /dev, whose nodes privileged containers get; `None` gives them none.
    pub dev_dir: Option<PathBuf>,
    /// Names under /sys/fs/cgroup of the cgroup v1 hierarchies (co-mount symlinks such as
    /// `cpu` → `cpu,cpuacct` included); empty on a unified host.
    pub cgroup_v1_hierarchies: Vec<String>,
}

impl Default for HostInfo {
    /// A fully capable host with every controller and a recent kernel.
    fn default() -> Self {
        HostInfo {
            cap_bounding: caps::FULL_MASK,
            has_sys_resource: true,
            kernel: None,
            hostname: String::new(),
            cgroup_unified: false,
            swap_controller: true,
            hugetlb_controller: true,
            hugetlb_hybrid: None,
            hugepage_sizes_kb: vec![2048, 1_048_576],
            dev_dir: Some(PathBuf::from("/dev")),
            cgroup_v1_hierarchies: vec![],
        }
    }
}

impl HostInfo {
    /// Gathers the host facts from `/proc` and `/sys/fs/cgroup` (call once at start).
    pub fn probe() -> HostInfo {
        Self::probe_at(Path::new("/"))
    }

    /// [`HostInfo::probe`] against another root (tests).
    pub fn probe_at(root: &Path) -> HostInfo {
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
        let exists = |p: &str| root.join(p).exists();
        let status = read("proc/self/status");
        let cap_bounding = status_mask(&status, "CapBnd").unwrap_or(caps::FULL_MASK);
        let cap_effective = status_mask(&status, "CapEff").unwrap_or(caps::FULL_MASK);
        let sys_resource = caps::cap_bit("CAP_SYS_RESOURCE").unwrap_or(24);
        let unified = exists("sys/fs/cgroup/cgroup.controllers");
        let v2_controllers = read("sys/fs/cgroup/cgroup.controllers");
        let has_v2 = |c: &str| v2_controllers.split_whitespace().any(|x| x == c);
        let hybrid = "sys/fs/cgroup/unified";
        let hybrid_has_hugetlb = read(&format!("{hybrid}/cgroup.controllers"))
            .split_whitespace()
            .any(|x| x == "hugetlb");
        HostInfo {
            cap_bounding,
            has_sys_resource: cap_effective & (1 << sys_resource) != 0,
            kernel: kernel_version(&read("proc/sys/kernel/osrelease")),
            hostname: read("proc/sys/kernel/hostname").trim().to_string(),
            cgroup_unified: unified,
            swap_controller: if unified {
                has_v2("memory")
            } else {
                exists("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
            },
            // On hybrid hosts hugetlb may live only in cgroup2 ("unified"), where a v1
            // cgroup manager does not look: count only what the manager in use sees.
            hugetlb_controller: if unified {
                has_v2("hugetlb")
            } else {
                exists("sys/fs/cgroup/hugetlb")
            },
            hugetlb_hybrid: (!unified && !exists("sys/fs/cgroup/hugetlb") && hybrid_has_hugetlb)
                .then(|| root.join(hybrid)),
            hugepage_sizes_kb: hugepages::kernel_sizes_kb(&root.join("sys/kernel/mm/hugepages")),
            dev_dir: Some(root.join("dev")),
            cgroup_v1_hierarchies: if unified {
                vec![]
            } else {
                v1_hierarchies(&root.join("sys/fs/cgroup"))
            },
        }
    }
}

/// The v1 hierarchies under `cgroupfs` (directories, or symlinks to them, holding
/// `cgroup.procs` but no `cgroup.controllers`), sorted.
fn v1_hierarchies(cgroupfs: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(cgroupfs)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let d = e.path();
                    d.join("cgroup.procs").exists() && !d.join("cgroup.controllers").exists()
                })
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A hex capability mask line (`CapBnd:\t000001ffffffffff`) of /proc/<pid>/status.
fn status_mask(status: &str, key: &str) -> Option<CapMask> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| u64::from_str_radix(v.trim(), 16).ok())?
    })
}

/// `6.1.0-13-amd64` → `(6, 1)`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Everything [`generate`] needs.
#[derive(Debug, Clone, Copy)]
pub struct SpecInput<'a> {
    /// The new container's id.
    pub container_id: &'a str,
    /// Its pod's id.
    pub sandbox_id: &'a str,
    /// The image name for the `io.kubernetes.cri.image-name` annotation.
    pub image_name: &'a str,
    /// The OCI image config JSON (with its `config` object: `User`, `Env`, `Entrypoint`,
    /// `Cmd`, `WorkingDir`).
    pub image_config: &'a Value,
    /// The container's root filesystem (bundle/rootfs), mounted by the caller.
    pub rootfs: &'a Path,
    /// Contents of the image's `/etc/passwd`, if it has one.
    pub image_passwd: Option<&'a str>,
    /// Contents of the image's `/etc/group`, if it has one.
    pub image_group: Option<&'a str>,
    /// The CRI container config.
    pub config: &'a ContainerConfig,
    /// The CRI config of the container's pod.
    pub sandbox: &'a PodSandboxConfig,
    /// The pod's namespaces.
    pub namespaces: SandboxNamespaces<'a>,
    /// cgroupfs-style parent, e.g. `/berth/<sandbox>`; the container's is `<parent>/<id>`.
    pub cgroup_parent: &'a str,
    /// Host facts.
    pub host: &'a HostInfo,
    /// The pod's hostname / hosts / resolv.conf / shm.
    pub sandbox_files: SandboxFiles<'a>,
}

/// Something the request asked for that this host cannot grant, so it was clamped or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clamped {
    /// A capability outside berthd's bounding set was dropped.
    Capability {
        /// `CAP_...` name.
        name: String,
    },
    /// A negative `oom_score_adj` without CAP_SYS_RESOURCE.
    OomScoreAdj {
        /// What the CRI asked.
        requested: i64,
        /// What the spec has.
        granted: i64,
    },
    /// A hugepage limit without a hugetlb controller was skipped.
    HugepageLimit {
        /// e.g. `2MB`.
        page_size: String,
    },
    /// A hugepage limit for a page size the kernel does not have was skipped.
    HugepageSize {
        /// As the request spelled it.
        page_size: String,
    },
    /// A swap limit without a swap controller was skipped.
    MemorySwap {
        /// Bytes asked.
        requested: i64,
    },
}

impl fmt::Display for Clamped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clamped::Capability { name } => {
                write!(
                    f,
                    "capability {name} is outside berthd's bounding set; dropped"
                )
            }
            Clamped::OomScoreAdj { requested, granted } => write!(
                f,
                "oom_score_adj {requested} needs CAP_SYS_RESOURCE; set to {granted}"
            ),
            Clamped::HugepageLimit { page_size } => {
                write!(
                    f,
                    "hugepage limit {page_size} skipped: no hugetlb controller"
                )
            }
            Clamped::HugepageSize { page_size } => {
                write!(
                    f,
                    "hugepage limit {page_size} skipped: the kernel has no such page size"
                )
            }
            Clamped::MemorySwap { requested } => {
                write!(
                    f,
                    "memory swap limit {requested} skipped: no swap controller"
                )
            }
        }
    }
}

/// Why no spec could be generated.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The request is invalid (unknown user, bad path, unknown capability, bad sysctl, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The pod lacks what the request needs (e.g. the target container's namespace).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A feature berth does not support.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// A Localhost seccomp profile cannot be read.
    #[error("read seccomp profile {path:?}")]
    ReadSeccompProfile {
        /// The profile path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A device's host node cannot be read.
    #[error("read device {path:?}")]
    ReadDevice {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A mount's host path cannot be resolved (missing, dangling symlink).
    #[error("mount source {path:?}")]
    MountSource {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<SpecError> for crate::error::Error {
    fn from(e: SpecError) -> Self {
        use crate::error::{Error, chain};
        match &e {
            SpecError::FailedPrecondition(_) => Error::FailedPrecondition(chain(&e)),
            SpecError::Unsupported(what) => Error::Unimplemented(what),
            _ => Error::InvalidArgument(chain(&e)),
        }
    }
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default masked paths.
pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's default readonly paths.
pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The fields of the image config that shape the process.
#[derive(Debug, Default)]
struct ImageProcess {
    user: String,
    env: Vec<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Vec<String>,
    working_dir: String,
}

fn image_process(v: &Value) -> Result<ImageProcess, SpecError> {
    let c = v.get("config").unwrap_or(v);
    let strs = |key: &str| -> Result<Option<Vec<String>>, SpecError> {
        match c.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => serde_json::from_value(x.clone())
                .map(Some)
                .map_err(|e| SpecError::InvalidArgument(format!("image config {key}: {e}"))),
        }
    };
    let s = |key: &str| c.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    Ok(ImageProcess {
        user: s("User"),
        env: strs("Env")?.unwrap_or_default(),
        entrypoint: strs("Entrypoint")?,
        cmd: strs("Cmd")?.unwrap_or_default(),
        working_dir: s("WorkingDir"),
    })
}

/// Docker's rules (via containerd's `WithProcessArgs`): a CRI command replaces the image
/// entrypoint and drops the image Cmd; CRI args replace the image Cmd.
fn process_args(
    command: &[String],
    args: &[String],
    img: &ImageProcess,
) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<String> = command.to_vec();
    let mut args = args.to_vec();
    if command.is_empty() {
        if args.is_empty() {
            args = img.cmd.clone();
        }
        match img.entrypoint.as_deref() {
            // `ENTRYPOINT [""]` clears the entrypoint.
            Some([only]) if only.is_empty() => {}
            Some(ep) => out = ep.to_vec(),
            None => {}
        }
    }
    out.extend(args);
    if out.is_empty() {
        return Err(SpecError::InvalidArgument("no command specified".into()));
    }
    Ok(out)
}

fn env_key(e: &str) -> &str {
    e.split_once('=').map_or(e, |(k, _)| k)
}

/// Sets or replaces `entry` by key, keeping the first position of a key.
fn env_set(env: &mut Vec<String>, entry: String) {
    match env.iter_mut().find(|e| env_key(e) == env_key(&entry)) {
        Some(e) => *e = entry,
        None => env.push(entry),
    }
}

/// Lexically cleans an absolute container path (`//`, `.`, `..`, trailing `/`).
fn clean_container_path(p: &str) -> Result<String, SpecError> {
    if !p.starts_with('/') {
        return Err(SpecError::InvalidArgument(format!(
            "container path {p:?} is not absolute"
        )));
    }
    let mut parts: Vec<&str> = vec![];
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A bind mount from the CRI or of a sandbox file, before ordering.
struct Bind {
    dst: String,
    src: PathBuf,
    readonly: bool,
    recursive_ro: bool,
    propagation: MountPropagation,
}

fn mount(dst: &str, typ: &str, src: &str, options: &[&str]) -> Value {
    json!({ "destination": dst, "type": typ, "source": src, "options": options })
}

/// containerd's default mounts (without /run), /sys and the cgroupfs read-write only for
/// privileged containers.
fn default_mounts(privileged: bool) -> Vec<(String, Value)> {
    let rw = if privileged { "rw" } else { "ro" };
    [
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", rw]),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", rw],
        ),
    ]
    .into_iter()
    .map(|m| (m["destination"].as_str().unwrap_or_default().to_string(), m))
    .collect()
}

/// Mounts (defaults, then binds ordered by depth) and the rootfs propagation they need.
fn build_mounts(
    input: &SpecInput,
    privileged: bool,
) -> Result<(Vec<Value>, Option<&'static str>), SpecError> {
    let readonly_rootfs = security_context(input.config).is_some_and(|s| s.readonly_rootfs);
    let mut binds = vec![];
    for m in &input.config.mounts {
        let dst = clean_container_path(&m.container_path)?;
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(SpecError::Unsupported("image volume mounts"));
        }
        if m.host_path.is_empty() {
            return Err(SpecError::InvalidArgument(format!(
                "mount {dst}: empty host path"
            )));
        }
        let src = std::fs::canonicalize(&m.host_path).map_err(|source| SpecError::MountSource {
            path: PathBuf::from(&m.host_path),
            source,
        })?;
        let propagation = MountPropagation::try_from(m.propagation).map_err(|_| {
            SpecError::InvalidArgument(format!(
                "mount {dst}: unknown propagation {}",
                m.propagation
            ))
        })?;
        if m.recursive_read_only {
            if !m.readonly {
                return Err(SpecError::InvalidArgument(format!(
                    "mount {dst}: recursive read-only conflicts with a read-write mount"
                )));
            }
            if propagation != MountPropagation::PropagationPrivate {
                return Err(SpecError::InvalidArgument(format!(
                    "mount {dst}: recursive read-only needs private propagation"
                )));
            }
        }
        binds.push(Bind {
            dst,
            src,
            readonly: m.readonly,
            recursive_ro: m.recursive_read_only,
            propagation,
        });
    }
    let cri_dsts: BTreeSet<String> = binds.iter().map(|b| b.dst.clone()).collect();
    let f = &input.sandbox_files;
    for (dst, src, readonly) in [
        ("/etc/hostname", f.hostname, readonly_rootfs),
        ("/etc/hosts", f.hosts, readonly_rootfs),
        ("/etc/resolv.conf", f.resolv_conf, readonly_rootfs),
        ("/dev/shm", f.shm, false),
    ] {
        if let Some(src) = src
            && !cri_dsts.contains(dst)
        {
            binds.push(Bind {
                dst: dst.to_string(),
                src: src.to_owned(),
                readonly,
                recursive_ro: false,
                propagation: MountPropagation::PropagationPrivate,
            });
        }
    }
    // Parents before children, so a deeper mount is not hidden (docker's ordering).
    binds.sort_by_key(|b| b.dst.matches('/').count() - usize::from(b.dst == "/"));

    let bind_dsts: BTreeSet<&str> = binds.iter().map(|b| b.dst.as_str()).collect();
    let dev_replaced = bind_dsts.contains("/dev");
    let mut mounts: Vec<Value> = default_mounts(privileged)
        .into_iter()
        .filter(|(dst, _)| {
            !(bind_dsts.contains(dst.as_str()) || (dev_replaced && dst.starts_with("/dev/")))
        })
        .map(|(_, m)| m)
        .collect();

    let mut rootfs_propagation = None;
    for b in binds {
        let prop = match b.propagation {
            MountPropagation::PropagationPrivate => "rprivate",
            MountPropagation::PropagationHostToContainer => {
                if rootfs_propagation != Some("rshared") {
                    rootfs_propagation = Some("rslave");
                }
                "rslave"
            }
            MountPropagation::PropagationBidirectional => {
                rootfs_propagation = Some("rshared");
                "rshared"
            }
        };
        let mode = match (b.readonly, b.recursive_ro) {
            (true, true) => "rro",
            (true, false) => "ro",
            _ => "rw",
        };
        mounts.push(json!({
            "destination": b.dst,
            "type": "bind",
            "source": b.src,
            "options": ["rbind", prop, mode],
        }));
    }
    Ok((mounts, rootfs_propagation))
}

/// The container's cgroup, `<parent>/<id>`.
fn cgroups_path(input: &SpecInput) -> String {
    format!(
        "{}/{}",
        input.cgroup_parent.trim_end_matches('/'),
        input.container_id
    )
}

/// Whether the container joins an existing PID namespace (a pod's or a target's).
fn joins_pid_namespace(namespaces: &[Value]) -> bool {
    namespaces
        .iter()
        .any(|n| n["type"] == "pid" && n.get("path").is_some())
}

/// `(hierarchy name, host dir of the container's cgroup in it)` for the emulated v1 cgroup
/// mount, or nothing when the container does not need it (see the module docs).
fn cgroup_v1_binds(input: &SpecInput, namespaces: &[Value]) -> Vec<(String, PathBuf)> {
    if input.host.cgroup_unified || !joins_pid_namespace(namespaces) {
        return vec![];
    }
    let rel = cgroups_path(input);
    input
        .host
        .cgroup_v1_hierarchies
        .iter()
        .map(|h| {
            let dir = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(rel.trim_start_matches('/'));
            (h.clone(), dir)
        })
        .collect()
}

/// The host directories the container's emulated v1 cgroup mount binds (see the module
/// docs); the caller creates them before the container is created. Empty when the container
/// gets a plain cgroup mount.
pub fn cgroup_v1_bind_sources(input: &SpecInput) -> Result<Vec<PathBuf>, SpecError> {
    let privileged = security_context(input.config).is_some_and(|s| s.privileged);
    let namespaces = namespaces(input, privileged)?;
    Ok(cgroup_v1_binds(input, &namespaces)
        .into_iter()
        .map(|(_, dir)| dir)
        .collect())
}

/// Replaces the default `cgroup` mount by a tmpfs with the container's v1 cgroups bound below
/// it, when libcontainer's own v1 cgroup mount would fail (see the module docs).
fn emulate_cgroup_v1_mount(
    mounts: &mut Vec<Value>,
    input: &SpecInput,
    namespaces: &[Value],
    privileged: bool,
) {
    let binds = cgroup_v1_binds(input, namespaces);
    let Some(at) = mounts
        .iter()
        .position(|m| m["type"] == "cgroup" && m["destination"] == "/sys/fs/cgroup")
    else {
        return;
    };
    if binds.is_empty() {
        return;
    }
    let rw = if privileged { "rw" } else { "ro" };
    let mut emulated = vec![mount(
        "/sys/fs/cgroup",
        "tmpfs",
        "tmpfs",
        &["nosuid", "noexec", "nodev", "mode=755"],
    )];
    for (name, dir) in binds {
        emulated.push(json!({
            "destination": format!("/sys/fs/cgroup/{name}"),
            "type": "bind",
            "source": dir,
            "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev", rw],
        }));
    }
    mounts.splice(at..=at, emulated);
}

fn security_context(c: &ContainerConfig) -> Option<&LinuxContainerSecurityContext> {
    c.linux.as_ref().and_then(|l| l.security_context.as_ref())
}

/// Which seccomp profile the CRI asks for.
#[derive(Debug, PartialEq, Eq)]
enum SeccompChoice {
    Unconfined,
    RuntimeDefault,
    Localhost(PathBuf),
}

fn seccomp_choice(sc: &LinuxContainerSecurityContext) -> Result<SeccompChoice, SpecError> {
    let localhost = |p: &str| {
        if Path::new(p).is_absolute() {
            Ok(SeccompChoice::Localhost(PathBuf::from(p)))
        } else {
            Err(SpecError::InvalidArgument(format!(
                "seccomp localhost profile {p:?} is not an absolute path"
            )))
        }
    };
    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompChoice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompChoice::Unconfined),
            Ok(ProfileType::Localhost) => localhost(&p.localhost_ref),
            Err(_) => Err(SpecError::InvalidArgument(format!(
                "unknown seccomp profile type {}",
                p.profile_type
            ))),
        };
    }
    #[allow(deprecated)]
    let legacy = sc.seccomp_profile_path.as_str();
    match legacy {
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(p) => localhost(p),
            None => Err(SpecError::InvalidArgument(format!(
                "unknown seccomp profile {other:?}"
            ))),
        },
    }
}

fn mode(m: i32) -> Result<NamespaceMode, SpecError> {
    NamespaceMode::try_from(m)
        .map_err(|_| SpecError::InvalidArgument(format!("unknown namespace mode {m}")))
}

fn namespaces(input: &SpecInput, privileged: bool) -> Result<Vec<Value>, SpecError> {
    let ns_opts = security_context(input.config).and_then(|s| s.namespace_options.as_ref());
    if ns_opts
        .and_then(|n| n.userns_options.as_ref())
        .is_some_and(|u| u.mode == NamespaceMode::Pod as i32)
    {
        return Err(SpecError::Unsupported("user namespaces"));
    }
    let ns = |typ: &str, path: Option<&Path>| match path {
        Some(p) => json!({ "type": typ, "path": p }),
        None => json!({ "type": typ }),
    };
    let mut out = vec![];
    match mode(ns_opts.map_or(0, |n| n.pid))? {
        NamespaceMode::Container => out.push(ns("pid", None)),
        NamespaceMode::Node => {}
        NamespaceMode::Pod => out.push(ns("pid", input.namespaces.pid)),
        NamespaceMode::Target => match input.namespaces.target_pid {
            Some(p) => out.push(ns("pid", Some(p))),
            None => {
                return Err(SpecError::FailedPrecondition(format!(
                    "pid namespace of target container {:?} is unknown",
                    ns_opts.map(|n| n.target_id.as_str()).unwrap_or_default()
                )));
            }
        },
    }
    for (typ, path) in [
        ("ipc", input.namespaces.ipc),
        ("uts", input.namespaces.uts),
        ("network", input.namespaces.network),
    ] {
        if let Some(p) = path {
            out.push(ns(typ, Some(p)));
        }
    }
    out.push(ns("mount", None));
    if input.host.cgroup_unified && !privileged {
        out.push(ns("cgroup", None));
    }
    Ok(out)
}

/// The IPC sysctls the kernel namespaces (as runc and libcontainer accept them).
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Accepts a pod sysctl only if it is namespaced and its namespace is the pod's own, and
/// returns its dotted name (`net/ipv4/ip_forward` → `net.ipv4.ip_forward`).
fn check_sysctl(key: &str, ns: &SandboxNamespaces) -> Result<String, SpecError> {
    let dotted = key.replace('/', ".");
    let needs = |what: &str, pod_has: bool| {
        if pod_has {
            Ok(dotted.clone())
        } else {
            Err(SpecError::InvalidArgument(format!(
                "sysctl {key:?} needs the pod's {what} namespace, but the pod uses the host's"
            )))
        }
    };
    if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
        needs("IPC", ns.ipc.is_some())
    } else if dotted.starts_with("net.") {
        needs("network", ns.network.is_some())
    } else if dotted == "kernel.domainname" {
        needs("UTS", ns.uts.is_some())
    } else {
        Err(SpecError::InvalidArgument(format!(
            "sysctl {key:?} is not namespaced"
        )))
    }
}

/// The annotation of a container's pids limit (docker's `--pids-limit`).
pub const PIDS_LIMIT_ANNOTATION: &str = "io.berth.pids-limit";

/// `linux.resources` (without devices) from the CRI resources.
fn resources(
    r: &api::cri::LinuxContainerResources,
    host: &HostInfo,
    clamped: &mut Vec<Clamped>,
) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let mut cpu = serde_json::Map::new();
    if r.cpu_period != 0 {
        cpu.insert("period".into(), json!(r.cpu_period as u64));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares as u64));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    let mut mem = serde_json::Map::new();
    if r.memory_limit_in_bytes != 0 {
        mem.insert("limit".into(), json!(r.memory_limit_in_bytes));
        // Equal memory and memory+swap limits: no swapping unless asked (containerd).
        if r.memory_swap_limit_in_bytes == 0 && host.swap_controller {
            mem.insert("swap".into(), json!(r.memory_limit_in_bytes));
        }
    }
    if r.memory_swap_limit_in_bytes != 0 {
        if host.swap_controller {
            mem.insert("swap".into(), json!(r.memory_swap_limit_in_bytes));
        } else {
            clamped.push(Clamped::MemorySwap {
                requested: r.memory_swap_limit_in_bytes,
            });
        }
    }
    if !mem.is_empty() {
        out.insert("memory".into(), Value::Object(mem));
    }
    if !r.hugepage_limits.is_empty() {
        if host.hugetlb_controller {
            let h: Vec<Value> = r
                .hugepage_limits
                .iter()
                .map(|h| json!({ "pageSize": h.page_size, "limit": h.limit as i64 }))
                .collect();
            out.insert("hugepageLimits".into(), Value::Array(h));
        } else if host.hugetlb_hybrid.is_some() {
            // berthd sets these in the cgroup2 mount itself (`container::hugetlb`).
            clamped.extend(
                r.hugepage_limits
                    .iter()
                    .filter(|h| {
                        hugepages::kernel_page_size(&h.page_size, &host.hugepage_sizes_kb).is_none()
                    })
                    .map(|h| Clamped::HugepageSize {
                        page_size: h.page_size.clone(),
                    }),
            );
        } else {
            clamped.extend(r.hugepage_limits.iter().map(|h| Clamped::HugepageLimit {
                page_size: h.page_size.clone(),
            }));
        }
    }
    if !r.unified.is_empty() {
        let u: BTreeMap<_, _> = r.unified.iter().collect();
        out.insert("unified".into(), json!(u));
    }
    out
}

/// Builds the container's OCI runtime spec. Also returns what had to be clamped, for the
/// caller to log.
pub fn generate(input: &SpecInput) -> Result<(Spec, Vec<Clamped>), SpecError> {
    let mut clamped = vec![];
    let default_sc = LinuxContainerSecurityContext::default();
    let sc = security_context(input.config).unwrap_or(&default_sc);
    let privileged = sc.privileged;
    let sandbox_sc = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    if privileged && !sandbox_sc.is_some_and(|s| s.privileged) {
        return Err(SpecError::InvalidArgument(
            "no privileged container allowed in a sandbox that is not privileged".into(),
        ));
    }
    let img = image_process(input.image_config)?;

    // Process.
    let args = process_args(&input.config.command, &input.config.args, &img)?;
    let cri_user = user::cri_user_string(
        &sc.run_as_username,
        sc.run_as_user.map(|v| v.value),
        sc.run_as_group.map(|v| v.value),
    )?;
    let userstr = cri_user.clone().unwrap_or_else(|| img.user.clone());
    let policy = SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy)
        .map_err(|_| SpecError::InvalidArgument("unknown supplemental_groups_policy".into()))?;
    // Whose /etc/group memberships count: the CRI user (name wins over uid), else the image's.
    let member = if !sc.run_as_username.is_empty() {
        sc.run_as_username.clone()
    } else if let Some(u) = sc.run_as_user {
        u.value.to_string()
    } else {
        img.user.split(':').next().unwrap_or_default().to_string()
    };
    let member = (policy == SupplementalGroupsPolicy::Merge).then_some(member.as_str());
    let user = user::resolve(
        &userstr,
        input.image_passwd,
        input.image_group,
        member,
        &sc.supplemental_groups,
    )?;

    let hostname = if input.sandbox.hostname.is_empty() {
        input.host.hostname.as_str()
    } else {
        input.sandbox.hostname.as_str()
    };
    let mut env = vec![DEFAULT_PATH.to_string(), format!("HOSTNAME={hostname}")];
    for e in img.env.iter().cloned().chain(
        input
            .config
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value)),
    ) {
        env_set(&mut env, e);
    }
    if !env.iter().any(|e| env_key(e) == "HOME") {
        env.push(format!("HOME={}", user.home.as_deref().unwrap_or("/")));
    }

    let cwd = [input.config.working_dir.as_str(), img.working_dir.as_str()]
        .into_iter()
        .find(|d| !d.is_empty())
        .unwrap_or("/");
    if !cwd.starts_with('/') {
        return Err(SpecError::InvalidArgument(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }

    let cap_sets = caps::compute(
        sc.capabilities.as_ref(),
        privileged,
        input.host.cap_bounding,
        &mut clamped,
    )?;

    let mut process = json!({
        "terminal": input.config.tty,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": user.additional_gids,
        },
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": cap_sets.to_json(),
    });
    // Only when asked for: libcontainer loads a seccomp filter before dropping capabilities
    // only when the field is absent; an explicit `false` makes it load the filter afterwards,
    // without CAP_SYS_ADMIN or no_new_privs, and the kernel refuses it.
    if sc.no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    let res = input
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref());
    if let Some(r) = res {
        let requested = r.oom_score_adj;
        if !(-1000..=1000).contains(&requested) {
            return Err(SpecError::InvalidArgument(format!(
                "oom_score_adj {requested} is outside [-1000, 1000]"
            )));
        }
        let granted = if requested < 0 && !input.host.has_sys_resource {
            clamped.push(Clamped::OomScoreAdj {
                requested,
                granted: 0,
            });
            0
        } else {
            requested
        };
        process["oomScoreAdj"] = json!(granted);
    }

    // Seccomp.
    let seccomp = if privileged {
        None
    } else {
        let profile = match seccomp_choice(sc)? {
            SeccompChoice::Unconfined => None,
            SeccompChoice::RuntimeDefault => Some(seccomp::default_profile()),
            SeccompChoice::Localhost(p) => Some(seccomp::Profile::load(&p)?),
        };
        profile
            .map(|p| {
                p.to_oci(&seccomp::Target {
                    arch: seccomp::native_arch(),
                    caps: &cap_sets.bounding,
                    kernel: input.host.kernel,
                })
            })
            .transpose()?
    };

    // Mounts and namespaces.
    let (mut mounts, rootfs_propagation) = build_mounts(input, privileged)?;
    let namespaces = namespaces(input, privileged)?;
    emulate_cgroup_v1_mount(&mut mounts, input, &namespaces, privileged);

    // Devices and resources.
    let mut devices = vec![];
    let mut rules = if privileged {
        vec![devices::allow_all_rule()]
    } else {
        devices::default_rules()
    };
    for d in &input.config.devices {
        let access = devices::check_permissions(&d.permissions)?;
        let container_path = clean_container_path(&d.container_path)?;
        for node in devices::from_host(Path::new(&d.host_path), Path::new(&container_path))? {
            if !privileged {
                rules.push(node.rule(access));
            }
            devices.push(node);
        }
    }
    if privileged && let Some(dev) = &input.host.dev_dir {
        let have: BTreeSet<PathBuf> = devices.iter().map(|d| d.path.clone()).collect();
        devices.extend(
            devices::host_devices(dev)?
                .into_iter()
                .filter(|d| !have.contains(&d.path)),
        );
    }
    let mut resources_json = res
        .map(|r| resources(r, input.host, &mut clamped))
        .unwrap_or_default();
    resources_json.insert("devices".into(), Value::Array(rules));
    // CRI has no pids limit; docker's `--pids-limit` comes as an annotation. A limit only ever
    // lowers what the pod's cgroup allows, so any pod may set one.
    if let Some(v) = input.config.annotations.get(PIDS_LIMIT_ANNOTATION) {
        let limit: i64 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            SpecError::InvalidArgument(format!(
                "annotation {PIDS_LIMIT_ANNOTATION}: {v:?} is not a positive number"
            ))
        })?;
        resources_json.insert("pids".into(), json!({ "limit": limit }));
    }

    // Sysctls.
    let mut sysctl = BTreeMap::new();
    if let Some(l) = &input.sandbox.linux {
        for (k, v) in &l.sysctls {
            sysctl.insert(check_sysctl(k, &input.namespaces)?, v.clone());
        }
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources_json,
        "cgroupsPath": cgroups_path(input),
        "devices": devices.iter().map(devices::DeviceNode::to_json).collect::<Vec<_>>(),
    });
    if !sysctl.is_empty() {
        linux["sysctl"] = json!(sysctl);
    }
    if let Some(p) = rootfs_propagation {
        linux["rootfsPropagation"] = json!(p);
    }
    if let Some(s) = seccomp {
        linux["seccomp"] = s;
    }
    if !privileged {
        let or_default = |given: &[String], default: &[&str]| -> Vec<String> {
            if given.is_empty() {
                default.iter().map(|s| s.to_string()).collect()
            } else {
                given.to_vec()
            }
        };
        linux["maskedPaths"] = json!(or_default(&sc.masked_paths, &DEFAULT_MASKED_PATHS));
        linux["readonlyPaths"] = json!(or_default(&sc.readonly_paths, &DEFAULT_READONLY_PATHS));
    }

    // Annotations, as containerd's `DefaultCRIAnnotations`.
    let meta = input.sandbox.metadata.clone().unwrap_or_default();
    let annotations: BTreeMap<&str, &str> = [
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.sandbox-id", input.sandbox_id),
        ("io.kubernetes.cri.sandbox-name", meta.name.as_str()),
        (
            "io.kubernetes.cri.sandbox-namespace",
            meta.namespace.as_str(),
        ),
        ("io.kubernetes.cri.sandbox-uid", meta.uid.as_str()),
        (
            "io.kubernetes.cri.container-name",
            input
                .config
                .metadata
                .as_ref()
                .map_or("", |m| m.name.as_str()),
        ),
        ("io.kubernetes.cri.image-name", input.image_name),
    ]
    .into_iter()
    .collect();

    let mut spec = json!({
        "ociVersion": oci_spec::runtime::VERSION,
        "process": process,
        "root": { "path": input.rootfs, "readonly": sc.readonly_rootfs },
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    });
    if input.namespaces.uts.is_some() && !input.sandbox.hostname.is_empty() {
        spec["hostname"] = json!(input.sandbox.hostname);
    }
    let spec: Spec = serde_json::from_value(spec)
        .map_err(|e| SpecError::InvalidArgument(format!("invalid runtime spec: {e}")))?;
    Ok((spec, clamped))
}

#[cfg(test)]
mod tests;
