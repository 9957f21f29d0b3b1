//! Seccomp: docker's default profile, Localhost profile files (docker's format, which is a
//! superset of the OCI `linux.seccomp` object), and their conversion to the OCI form for one
//! architecture and capability set, as moby's `profiles/seccomp` `setupSeccomp` does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use super::SpecError;

/// A seccomp profile in docker's JSON format (`archMap`, `includes`/`excludes`). A plain OCI
/// `linux.seccomp` object parses too.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Action for syscalls no rule matches (`SCMP_ACT_ERRNO`, ...).
    pub default_action: String,
    /// Errno for `SCMP_ACT_ERRNO` default actions.
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    /// Explicit architectures (exclusive with `arch_map`).
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Per native architecture: itself plus its sub-architectures.
    #[serde(default)]
    pub arch_map: Option<Vec<ArchMap>>,
    /// Seccomp filter flags, passed through.
    #[serde(default)]
    pub flags: Option<Vec<String>>,
    /// Notify listener socket, passed through.
    #[serde(default)]
    pub listener_path: Option<PathBuf>,
    /// Notify listener metadata, passed through.
    #[serde(default)]
    pub listener_metadata: Option<String>,
    /// Rules, in order.
    #[serde(default)]
    pub syscalls: Option<Vec<Rule>>,
}

/// One `archMap` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchMap {
    /// `SCMP_ARCH_X86_64`, ...
    pub architecture: String,
    /// Also filtered when the native architecture is `architecture`.
    #[serde(default)]
    pub sub_architectures: Option<Vec<String>>,
}

/// One rule of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Legacy single name (exclusive with `names`).
    #[serde(default)]
    pub name: Option<String>,
    /// Syscall names.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// `SCMP_ACT_ALLOW`, ...
    pub action: String,
    /// Errno for `SCMP_ACT_ERRNO`.
    #[serde(default)]
    pub errno_ret: Option<u32>,
    /// Argument conditions, OCI form (`index`, `value`, `valueTwo`, `op`).
    #[serde(default)]
    pub args: Option<Vec<Value>>,
    /// Conditions that must all hold for the rule to apply.
    #[serde(default)]
    pub includes: Option<Filter>,
    /// Conditions any of which drops the rule.
    #[serde(default)]
    pub excludes: Option<Filter>,
}

/// `includes` / `excludes` of a rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Go architecture names (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub arches: Option<Vec<String>>,
    /// Capability names (`CAP_SYS_ADMIN`), checked against the bounding set.
    #[serde(default)]
    pub caps: Option<Vec<String>>,
    /// `major.minor` kernel version.
    #[serde(default)]
    pub min_kernel: Option<String>,
}

/// What a profile is converted for.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Go architecture name of the host (`amd64`); see [`native_arch`].
    pub arch: &'a str,
    /// The container's bounding set (canonical `CAP_` names).
    pub caps: &'a BTreeSet<&'static str>,
    /// Host kernel `(major, minor)`; `None` counts as new enough for every `minKernel`.
    pub kernel: Option<(u32, u32)>,
}

/// Go's name for the architecture berthd was built for, as docker profiles name it.
pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn seccomp_arch(go_arch: &str) -> Option<&'static str> {
    Some(match go_arch {
        "amd64" => "SCMP_ARCH_X86_64",
        "386" => "SCMP_ARCH_X86",
        "arm64" => "SCMP_ARCH_AARCH64",
        "arm" => "SCMP_ARCH_ARM",
        "s390x" => "SCMP_ARCH_S390X",
        "ppc64le" => "SCMP_ARCH_PPC64LE",
        "ppc64" => "SCMP_ARCH_PPC64",
        "riscv64" => "SCMP_ARCH_RISCV64",
        "loong64" => "SCMP_ARCH_LOONGARCH64",
        "mips64" => "SCMP_ARCH_MIPS64",
        "mips64le" => "SCMP_ARCH_MIPSEL64",
        _ => return None,
    })
}

fn kernel_at_least(kernel: Option<(u32, u32)>, min: &str) -> bool {
    let Some(have) = kernel else { return true };
    let mut it = min.split('.').map(|p| p.trim().parse::<u32>().unwrap_or(0));
    let want = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    have >= want
}

impl Profile {
    /// Reads a Localhost profile file.
    pub fn load(path: &Path) -> Result<Profile, SpecError> {
        let data = std::fs::read(path).map_err(|source| SpecError::ReadSeccompProfile {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&data).map_err(|e| {
            SpecError::InvalidArgument(format!("seccomp profile {}: {e}", path.display()))
        })
    }

    /// The OCI `linux.seccomp` object for `target`.
    pub fn to_oci(&self, target: &Target) -> Result<Value, SpecError> {
        let architectures: Vec<String> = match (&self.architectures, &self.arch_map) {
            (Some(a), Some(m)) if !a.is_empty() && !m.is_empty() => {
                return Err(SpecError::InvalidArgument(
                    "seccomp profile has both 'architectures' and 'archMap'".into(),
                ));
            }
            (_, Some(map)) if !map.is_empty() => {
                let native = seccomp_arch(target.arch);
                map.iter()
                    .filter(|m| Some(m.architecture.as_str()) == native)
                    .flat_map(|m| {
                        std::iter::once(m.architecture.clone())
                            .chain(m.sub_architectures.iter().flatten().cloned())
                    })
                    .collect()
            }
            (Some(a), _) => a.clone(),
            _ => vec![],
        };

        let mut syscalls = vec![];
        for rule in self.syscalls.iter().flatten() {
            let mut names = rule.names.clone().unwrap_or_default();
            if let Some(n) = &rule.name {
                if !names.is_empty() {
                    return Err(SpecError::InvalidArgument(
                        "seccomp rule has both 'name' and 'names'".into(),
                    ));
                }
                names.push(n.clone());
            }
            let ex = rule.excludes.clone().unwrap_or_default();
            let inc = rule.includes.clone().unwrap_or_default();
            let has_cap = |c: &String| target.caps.contains(c.as_str());
            if ex.arches.iter().flatten().any(|a| a == target.arch)
                || ex.caps.iter().flatten().any(has_cap)
                || ex
                    .min_kernel
                    .as_deref()
                    .is_some_and(|k| kernel_at_least(target.kernel, k))
            {
                continue;
            }
            if inc
                .arches
                .as_ref()
                .is_some_and(|a| !a.is_empty() && !a.iter().any(|a| a == target.arch))
                || !inc.caps.iter().flatten().all(has_cap)
                || inc
                    .min_kernel
                    .as_deref()
                    .is_some_and(|k| !kernel_at_least(target.kernel, k))
            {
                continue;
            }
            let mut s = json!({ "names": names, "action": rule.action });
            if let Some(e) = rule.errno_ret {
                s["errnoRet"] = e.into();
            }
            if let Some(args) = rule.args.as_ref().filter(|a| !a.is_empty()) {
                s["args"] = Value::Array(args.clone());
            }
            syscalls.push(s);
        }

        let mut out = json!({
            "defaultAction": self.default_action,
            "architectures": architectures,
            "syscalls": syscalls,
        });
        if let Some(e) = self.default_errno_ret {
            out["defaultErrnoRet"] = e.into();
        }
        if let Some(f) = self.flags.as_ref().filter(|f| !f.is_empty()) {
            out["flags"] = json!(f);
        }
        if let Some(p) = &self.listener_path {
            out["listenerPath"] = json!(p);
        }
        if let Some(m) = &self.listener_metadata {
            out["listenerMetadata"] = json!(m);
        }
        Ok(out)
    }
}

/// Syscalls docker's default profile allows unconditionally.
#[rustfmt::skip]
const DEFAULT_ALLOWED: &[&str] = &[
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset", "chdir",
    "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64", "clock_getres",
    "clock_getres_time64", "clock_gettime", "clock_gettime64", "clock_nanosleep",
    "clock_nanosleep_time64", "close", "close_range", "connect", "copy_file_range", "creat", "dup",
    "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat",
    "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate",
    "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl",
    "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64",
    "futex", "futex_time64", "futex_waitv", "futimesat", "getcpu", "getcwd", "getdents",
    "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getitimer", "getpeername", "getpgid", "getpgrp", "getpid", "getppid",
    "getpriority", "getrandom", "getresgid", "getresgid32", "getresuid", "getresuid32", "getrlimit",
    "get_robust_list", "getrusage", "getsid", "getsockname", "getsockopt", "get_thread_area",
    "gettid", "gettimeofday", "getuid", "getuid32", "getxattr", "inotify_add_watch", "inotify_init",
    "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit",
    "io_uring_enter", "io_uring_register", "io_uring_setup", "ipc", "kill", "landlock_add_rule",
    "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link",
    "linkat", "listen", "listxattr", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr",
    "lstat", "lstat64", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir",
    "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect",
    "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64",
    "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "mremap", "msgctl", "msgget", "msgrcv",
    "msgsnd", "msync", "munlock", "munlockall", "munmap", "name_to_handle_at", "nanosleep",
    "newfstatat", "_newselect", "open", "openat", "openat2", "pause", "pidfd_open",
    "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "poll",
    "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2", "prlimit64",
    "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read",
    "readahead", "readlink", "readlinkat", "readv", "recv", "recvfrom", "recvmmsg",
    "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "rename", "renameat",
    "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl", "semget",
    "semop", "semtimedop", "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg",
    "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32",
    "setgroups", "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit",
    "set_robust_list", "setsid", "setsockopt", "set_thread_area", "set_tid_address", "setuid",
    "setuid32", "setxattr", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack",
    "signalfd", "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice",
    "stat", "stat64", "statfs", "statfs64", "statx", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask", "uname",
    "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice",
    "wait4", "waitid", "waitpid", "write", "writev",
];

/// A conditional rule of the default profile, in a compact form.
struct Cond {
    names: &'static [&'static str],
    /// `None` = allow; `Some(errno)` = `SCMP_ACT_ERRNO` with that errno.
    errno: Option<u32>,
    /// `(index, value, op)`.
    arg: Option<(u32, u64, &'static str)>,
    inc_arches: &'static [&'static str],
    exc_arches: &'static [&'static str],
    inc_caps: &'static [&'static str],
    exc_caps: &'static [&'static str],
    min_kernel: Option<&'static str>,
}

const C: Cond = Cond {
    names: &[],
    errno: None,
    arg: None,
    inc_arches: &[],
    exc_arches: &[],
    inc_caps: &[],
    exc_caps: &[],
    min_kernel: None,
};

/// personality(2) values docker allows, one rule each (OR): PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26|PER_LINUX32, and the query 0xffffffff.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const fn personality(value: u64) -> Cond {
    Cond {
        names: &["personality"],
        arg: Some((0, value, "SCMP_CMP_EQ")),
        ..C
    }
}

/// CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWCGROUP: without CAP_SYS_ADMIN, clone
/// may create no namespace.
const CLONE_NS_MASK: u64 = 0x7E02_0000;

const DEFAULT_CONDS: &[Cond] = &[
    Cond {
        names: &["process_vm_readv", "process_vm_writev", "ptrace"],
        min_kernel: Some("4.8"),
        ..C
    },
    Cond {
        names: &["socket"],
        arg: Some((0, 40, "SCMP_CMP_NE")), // AF_VSOCK
        ..C
    },
    personality(PERSONALITIES[0]),
    personality(PERSONALITIES[1]),
    personality(PERSONALITIES[2]),
    personality(PERSONALITIES[3]),
    personality(PERSONALITIES[4]),
    Cond {
        names: &["sync_file_range2", "swapcontext"],
        inc_arches: &["ppc64le"],
        ..C
    },
    Cond {
        names: &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ],
        inc_arches: &["arm", "arm64"],
        ..C
    },
    Cond {
        names: &["arch_prctl"],
        inc_arches: &["amd64", "x32"],
        ..C
    },
    Cond {
        names: &["modify_ldt"],
        inc_arches: &["amd64", "x32", "x86"],
        ..C
    },
    Cond {
        names: &[
            "s390_pci_mmio_read",
            "s390_pci_mmio_write",
            "s390_runtime_instr",
        ],
        inc_arches: &["s390", "s390x"],
        ..C
    },
    Cond {
        names: &["riscv_flush_icache"],
        inc_arches: &["riscv64"],
        ..C
    },
    Cond {
        names: &["open_by_handle_at"],
        inc_caps: &["CAP_DAC_READ_SEARCH"],
        ..C
    },
    Cond {
        names: &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
        inc_caps: &["CAP_SYS_ADMIN"],
        ..C
    },
    Cond {
        names: &["clone"],
        arg: Some((0, CLONE_NS_MASK, "SCMP_CMP_MASKED_EQ")),
        exc_caps: &["CAP_SYS_ADMIN"],
        exc_arches: &["s390", "s390x"],
        ..C
    },
    Cond {
        // s390 passes clone's flags as the second argument.
        names: &["clone"],
        arg: Some((1, CLONE_NS_MASK, "SCMP_CMP_MASKED_EQ")),
        inc_arches: &["s390", "s390x"],
        exc_caps: &["CAP_SYS_ADMIN"],
        ..C
    },
    Cond {
        // ENOSYS, so libcs fall back to clone, which the rule above can inspect.
        names: &["clone3"],
        errno: Some(38),
        exc_caps: &["CAP_SYS_ADMIN"],
        ..C
    },
    Cond {
        names: &["reboot"],
        inc_caps: &["CAP_SYS_BOOT"],
        ..C
    },
    Cond {
        names: &["chroot"],
        inc_caps: &["CAP_SYS_CHROOT"],
        ..C
    },
    Cond {
        names: &["delete_module", "init_module", "finit_module"],
        inc_caps: &["CAP_SYS_MODULE"],
        ..C
    },
    Cond {
        names: &["acct"],
        inc_caps: &["CAP_SYS_PACCT"],
        ..C
    },
    Cond {
        names: &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
        inc_caps: &["CAP_SYS_PTRACE"],
        ..C
    },
    Cond {
        names: &["iopl", "ioperm"],
        inc_caps: &["CAP_SYS_RAWIO"],
        ..C
    },
    Cond {
        names: &["settimeofday", "stime", "clock_settime", "clock_settime64"],
        inc_caps: &["CAP_SYS_TIME"],
        ..C
    },
    Cond {
        names: &["vhangup"],
        inc_caps: &["CAP_SYS_TTY_CONFIG"],
        ..C
    },
    Cond {
        names: &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
        inc_caps: &["CAP_SYS_NICE"],
        ..C
    },
    Cond {
        names: &["syslog"],
        inc_caps: &["CAP_SYSLOG"],
        ..C
    },
    Cond {
        names: &["bpf"],
        inc_caps: &["CAP_BPF"],
        ..C
    },
    Cond {
        names: &["perf_event_open"],
        inc_caps: &["CAP_PERFMON"],
        ..C
    },
];

fn strings(s: &[&str]) -> Option<Vec<String>> {
    (!s.is_empty()).then(|| s.iter().map(|s| s.to_string()).collect())
}

fn filter(arches: &[&str], caps: &[&str], min_kernel: Option<&str>) -> Option<Filter> {
    Some(Filter {
        arches: strings(arches),
        caps: strings(caps),
        min_kernel: min_kernel.map(String::from),
    })
}

fn arch_map(arch: &str, subs: &[&str]) -> ArchMap {
    ArchMap {
        architecture: arch.into(),
        sub_architectures: strings(subs),
    }
}

/// Docker's default seccomp profile (moby `profiles/seccomp/default.json`): everything not
/// listed fails with EPERM.
pub fn default_profile() -> Profile {
    let mut rules = vec![Rule {
        name: None,
        names: strings(DEFAULT_ALLOWED),
        action: "SCMP_ACT_ALLOW".into(),
        errno_ret: None,
        args: None,
        includes: None,
        excludes: None,
    }];
    rules.extend(DEFAULT_CONDS.iter().map(|c| {
        Rule {
            name: None,
            names: strings(c.names),
            action: if c.errno.is_some() {
                "SCMP_ACT_ERRNO".into()
            } else {
                "SCMP_ACT_ALLOW".into()
            },
            errno_ret: c.errno,
            args: c
                .arg
                .map(|(index, value, op)| vec![json!({"index": index, "value": value, "op": op})]),
            includes: filter(c.inc_arches, c.inc_caps, c.min_kernel),
            excludes: filter(c.exc_arches, c.exc_caps, None),
        }
    }));
    Profile {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno_ret: Some(1),
        architectures: None,
        arch_map: Some(vec![
            arch_map("SCMP_ARCH_X86_64", &["SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
            arch_map("SCMP_ARCH_AARCH64", &["SCMP_ARCH_ARM"]),
            arch_map(
                "SCMP_ARCH_MIPS64",
                &["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64N32"],
            ),
            arch_map(
                "SCMP_ARCH_MIPS64N32",
                &["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64"],
            ),
            arch_map(
                "SCMP_ARCH_MIPSEL64",
                &["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64N32"],
            ),
            arch_map(
                "SCMP_ARCH_MIPSEL64N32",
                &["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64"],
            ),
            arch_map("SCMP_ARCH_S390X", &["SCMP_ARCH_S390"]),
            arch_map("SCMP_ARCH_RISCV64", &[]),
        ]),
        flags: None,
        listener_path: None,
        listener_metadata: None,
        syscalls: Some(rules),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction};

    use super::*;
    use crate::spec::caps::DEFAULT_CAPS;

    fn default_caps() -> BTreeSet<&'static str> {
        DEFAULT_CAPS.iter().copied().collect()
    }

    fn convert(p: &Profile, arch: &str, caps: &BTreeSet<&'static str>) -> LinuxSeccomp {
        let v = p
            .to_oci(&Target {
                arch,
                caps,
                kernel: Some((6, 1)),
            })
            .unwrap();
        serde_json::from_value(v).unwrap()
    }

    /// The action the first rule naming `name` (without argument conditions) gives.
    fn allowed(s: &LinuxSeccomp, name: &str) -> bool {
        s.syscalls().iter().flatten().any(|r| {
            r.names().iter().any(|n| n == name)
                && r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().is_none()
        })
    }

    #[test]
    fn default_profile_for_amd64() {
        let s = convert(&default_profile(), "amd64", &default_caps());
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.default_errno_ret(), Some(1));
        let arches: Vec<String> = s
            .architectures()
            .iter()
            .flatten()
            .map(|a| {
                serde_json::to_value(a)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            arches,
            ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
        );
        for ok in [
            "read",
            "write",
            "execve",
            "arch_prctl",
            "modify_ldt",
            "ptrace",
        ] {
            assert!(allowed(&s, ok), "{ok} should be allowed");
        }
        for blocked in [
            "kexec_load",
            "mount",
            "unshare",
            "reboot",
            "init_module",
            "bpf",
            "clock_settime",
            "open_by_handle_at",
            "set_tls",
            "s390_runtime_instr",
        ] {
            assert!(!allowed(&s, blocked), "{blocked} should be blocked");
        }
        // chroot comes with CAP_SYS_CHROOT, in the default set.
        assert!(allowed(&s, "chroot"));
        // clone without namespace flags; clone3 answers ENOSYS.
        let clone = s
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names() == &["clone".to_string()])
            .unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!((arg.index(), arg.value()), (0, 0x7E02_0000));
        let clone3 = s
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names() == &["clone3".to_string()])
            .unwrap();
        assert_eq!(clone3.action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3.errno_ret(), Some(38));
        // socket is allowed except AF_VSOCK; personality only for the five values.
        let personality: Vec<u64> = s
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.names() == &["personality".to_string()])
            .map(|r| r.args().as_ref().unwrap()[0].value())
            .collect();
        assert_eq!(personality, PERSONALITIES);
        assert!(
            s.syscalls()
                .iter()
                .flatten()
                .any(|r| r.names() == &["socket".to_string()]
                    && r.args().as_ref().unwrap()[0].value() == 40)
        );
    }

    #[test]
    fn caps_widen_the_default_profile() {
        let mut caps = default_caps();
        caps.insert("CAP_SYS_ADMIN");
        caps.insert("CAP_SYS_BOOT");
        let s = convert(&default_profile(), "amd64", &caps);
        for ok in ["mount", "unshare", "setns", "clone", "clone3", "reboot"] {
            assert!(allowed(&s, ok), "{ok} allowed with caps");
        }
        // The masked clone and the ENOSYS clone3 rules are excluded with CAP_SYS_ADMIN.
        assert!(
            !s.syscalls()
                .iter()
                .flatten()
                .any(|r| r.action() == LinuxSeccompAction::ScmpActErrno)
        );
        assert!(!allowed(&s, "kexec_load"));
    }

    #[test]
    fn arm64_and_s390x_arch_rules() {
        let s = convert(&default_profile(), "arm64", &default_caps());
        assert!(allowed(&s, "set_tls"));
        assert!(!allowed(&s, "arch_prctl"));
        let s = convert(&default_profile(), "s390x", &default_caps());
        let clone = s
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names() == &["clone".to_string()])
            .unwrap();
        assert_eq!(clone.args().as_ref().unwrap()[0].index(), 1);
    }

    #[test]
    fn min_kernel_gates_rules() {
        let p = default_profile();
        let caps = default_caps();
        let old = p
            .to_oci(&Target {
                arch: "amd64",
                caps: &caps,
                kernel: Some((4, 4)),
            })
            .unwrap();
        let old: LinuxSeccomp = serde_json::from_value(old).unwrap();
        assert!(!allowed(&old, "ptrace"));
    }

    #[test]
    fn localhost_profile_parses_oci_and_docker_forms() {
        let dir = tempfile::tempdir().unwrap();
        let oci = dir.path().join("oci.json");
        std::fs::write(
            &oci,
            r#"{"defaultAction":"SCMP_ACT_LOG","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
        )
        .unwrap();
        let s = convert(&Profile::load(&oci).unwrap(), "amd64", &default_caps());
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActLog);
        assert_eq!(s.syscalls().as_ref().unwrap()[0].errno_ret(), Some(13));

        let docker = dir.path().join("docker.json");
        std::fs::write(
            &docker,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":null}],
                "syscalls":[{"name":"read","action":"SCMP_ACT_ALLOW","args":null},
                            {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}}]}"#,
        )
        .unwrap();
        let s = convert(&Profile::load(&docker).unwrap(), "amd64", &default_caps());
        assert!(allowed(&s, "read"));
        assert!(!allowed(&s, "mount"));
        assert_eq!(s.architectures().as_ref().unwrap().len(), 1);

        assert!(matches!(
            Profile::load(&dir.path().join("missing.json")),
            Err(SpecError::ReadSeccompProfile { .. })
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        assert!(matches!(
            Profile::load(&bad),
            Err(SpecError::InvalidArgument(_))
        ));
    }
}
