//! Capability sets: docker's default set, CRI add/drop (with `ALL`), privileged, and the
//! intersection with berthd's own bounding set.

use std::collections::BTreeSet;

use api::cri::Capability as CriCapability;

use super::{Clamped, SpecError};

/// Every capability the OCI spec (and libcontainer) knows, indexed by its kernel bit number.
pub const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Docker's (and containerd's) default capability set for unprivileged containers.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A kernel capability mask (as in `/proc/self/status` `CapBnd`, hex) as a bit set.
pub type CapMask = u64;

/// Every capability in [`ALL_CAPS`]: the mask of a process that has them all.
pub const FULL_MASK: CapMask = (1 << ALL_CAPS.len()) - 1;

/// The names of the capabilities set in `mask` (bits the OCI spec does not know are ignored).
pub fn caps_from_mask(mask: CapMask) -> BTreeSet<&'static str> {
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The bit of a canonical capability name, if it is one.
pub fn cap_bit(name: &str) -> Option<u32> {
    ALL_CAPS.iter().position(|c| *c == name).map(|i| i as u32)
}

/// `"sys_admin"`, `"CAP_SYS_ADMIN"`, `"Sys_Admin"` → `"CAP_SYS_ADMIN"`.
pub fn normalize(name: &str) -> Result<&'static str, SpecError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALL_CAPS
        .iter()
        .find(|c| c[4..] == *bare)
        .copied()
        .ok_or_else(|| SpecError::InvalidArgument(format!("unknown capability {name:?}")))
}

fn is_all(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("ALL")
}

/// The five OCI capability sets, as canonical names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: BTreeSet<&'static str>,
    /// Effective set.
    pub effective: BTreeSet<&'static str>,
    /// Permitted set.
    pub permitted: BTreeSet<&'static str>,
    /// Inheritable set: only the ambient capabilities (containerd leaves it empty since
    /// CVE-2022-24769; ambient capabilities need to be inheritable).
    pub inheritable: BTreeSet<&'static str>,
    /// Ambient set.
    pub ambient: BTreeSet<&'static str>,
}

impl CapSets {
    /// As the `process.capabilities` object of config.json.
    pub fn to_json(&self) -> serde_json::Value {
        let v = |s: &BTreeSet<&'static str>| s.iter().copied().collect::<Vec<_>>();
        serde_json::json!({
            "bounding": v(&self.bounding),
            "effective": v(&self.effective),
            "permitted": v(&self.permitted),
            "inheritable": v(&self.inheritable),
            "ambient": v(&self.ambient),
        })
    }
}

/// Computes the capability sets the way containerd's `WithCapabilities` does: start from the
/// default set; `ALL` in add grants everything, `ALL` in drop clears everything; then the
/// named adds and drops, in that order. Ambient capabilities are added to every set before the
/// drops. Privileged containers get every capability the host has and no ambient ones.
///
/// Anything outside `host_bounding` cannot be granted: it is removed, and reported in
/// `clamped` unless the container is privileged (where "all" means "all we have").
pub fn compute(
    requested: Option<&CriCapability>,
    privileged: bool,
    host_bounding: CapMask,
    clamped: &mut Vec<Clamped>,
) -> Result<CapSets, SpecError> {
    let host = caps_from_mask(host_bounding);
    if privileged {
        // Still validate the names, so a typo is an error in both modes.
        if let Some(c) = requested {
            for n in c
                .add_capabilities
                .iter()
                .chain(&c.drop_capabilities)
                .chain(&c.add_ambient_capabilities)
            {
                if !is_all(n) {
                    normalize(n)?;
                }
            }
        }
        return Ok(CapSets {
            bounding: host.clone(),
            effective: host.clone(),
            permitted: host,
            ..Default::default()
        });
    }

    let mut set: BTreeSet<&'static str> = DEFAULT_CAPS.iter().copied().collect();
    let mut ambient = BTreeSet::new();
    if let Some(c) = requested {
        if c.add_capabilities.iter().any(|n| is_all(n)) {
            set = ALL_CAPS.iter().copied().collect();
        }
        if c.drop_capabilities.iter().any(|n| is_all(n)) {
            set.clear();
        }
        for n in c.add_capabilities.iter().filter(|n| !is_all(n)) {
            set.insert(normalize(n)?);
        }
        for n in &c.add_ambient_capabilities {
            if is_all(n) {
                ambient.extend(ALL_CAPS.iter().copied());
            } else {
                ambient.insert(normalize(n)?);
            }
        }
        set.extend(ambient.iter().copied());
        for n in c.drop_capabilities.iter().filter(|n| !is_all(n)) {
            let n = normalize(n)?;
            set.remove(n);
            ambient.remove(n);
        }
    }

    for cap in set.difference(&host) {
        clamped.push(Clamped::Capability {
            name: (*cap).to_string(),
        });
    }
    let set: BTreeSet<_> = set.intersection(&host).copied().collect();
    let ambient: BTreeSet<_> = ambient.intersection(&host).copied().collect();
    Ok(CapSets {
        bounding: set.clone(),
        effective: set.clone(),
        permitted: set,
        inheritable: ambient.clone(),
        ambient,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cri(add: &[&str], drop: &[&str], ambient: &[&str]) -> CriCapability {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        CriCapability {
            add_capabilities: v(add),
            drop_capabilities: v(drop),
            add_ambient_capabilities: v(ambient),
        }
    }

    fn names(s: &BTreeSet<&'static str>) -> Vec<&'static str> {
        s.iter().copied().collect()
    }

    #[test]
    fn table_matches_oci_spec_names() {
        for name in ALL_CAPS {
            let c: oci_spec::runtime::Capability =
                serde_json::from_value(serde_json::Value::String(name.into())).unwrap();
            assert_eq!(serde_json::to_value(c).unwrap(), name);
        }
        assert_eq!(cap_bit("CAP_SYS_RESOURCE"), Some(24));
        assert_eq!(cap_bit("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(caps_from_mask(FULL_MASK).len(), 41);
        assert_eq!(
            names(&caps_from_mask((1 << 0) | (1 << 21))),
            ["CAP_CHOWN", "CAP_SYS_ADMIN"]
        );
    }

    #[test]
    fn normalize_accepts_prefix_and_case() {
        assert_eq!(normalize("sys_admin").unwrap(), "CAP_SYS_ADMIN");
        assert_eq!(normalize("CAP_NET_ADMIN").unwrap(), "CAP_NET_ADMIN");
        assert_eq!(normalize("cap_Kill").unwrap(), "CAP_KILL");
        assert!(normalize("FLY").is_err());
    }

    #[test]
    fn default_set() {
        let mut cl = vec![];
        let s = compute(None, false, FULL_MASK, &mut cl).unwrap();
        assert_eq!(s.bounding.len(), 14);
        assert!(s.effective.contains("CAP_NET_RAW"));
        assert!(!s.effective.contains("CAP_SYS_ADMIN"));
        assert!(s.ambient.is_empty() && s.inheritable.is_empty());
        assert!(cl.is_empty());
    }

    #[test]
    fn add_and_drop() {
        let mut cl = vec![];
        let c = cri(
            &["SYS_ADMIN", "cap_net_admin"],
            &["NET_RAW", "CAP_MKNOD"],
            &[],
        );
        let s = compute(Some(&c), false, FULL_MASK, &mut cl).unwrap();
        assert!(s.permitted.contains("CAP_SYS_ADMIN"));
        assert!(s.permitted.contains("CAP_NET_ADMIN"));
        assert!(!s.permitted.contains("CAP_NET_RAW"));
        assert!(!s.bounding.contains("CAP_MKNOD"));
        assert_eq!(s.bounding.len(), 14);
        assert!(compute(Some(&cri(&["BOGUS"], &[], &[])), false, FULL_MASK, &mut cl).is_err());
    }

    #[test]
    fn all_add_and_drop() {
        let mut cl = vec![];
        let s = compute(
            Some(&cri(&["ALL"], &["CHOWN"], &[])),
            false,
            FULL_MASK,
            &mut cl,
        )
        .unwrap();
        assert_eq!(s.bounding.len(), 40);
        assert!(!s.bounding.contains("CAP_CHOWN"));
        let s = compute(
            Some(&cri(&["NET_BIND_SERVICE"], &["all"], &[])),
            false,
            FULL_MASK,
            &mut cl,
        )
        .unwrap();
        assert_eq!(names(&s.effective), ["CAP_NET_BIND_SERVICE"]);
    }

    #[test]
    fn ambient_goes_to_every_set() {
        let mut cl = vec![];
        let s = compute(
            Some(&cri(&[], &["ALL"], &["NET_BIND_SERVICE"])),
            false,
            FULL_MASK,
            &mut cl,
        )
        .unwrap();
        for set in [
            &s.bounding,
            &s.effective,
            &s.permitted,
            &s.inheritable,
            &s.ambient,
        ] {
            assert_eq!(names(set), ["CAP_NET_BIND_SERVICE"]);
        }
    }

    #[test]
    fn privileged_gets_host_caps() {
        let mut cl = vec![];
        let host = FULL_MASK & !(1 << 24);
        let s = compute(Some(&cri(&[], &["ALL"], &[])), true, host, &mut cl).unwrap();
        assert_eq!(s.bounding.len(), 40);
        assert!(!s.bounding.contains("CAP_SYS_RESOURCE"));
        assert!(s.ambient.is_empty());
        assert!(cl.is_empty(), "privileged clamping is silent");
    }

    #[test]
    fn clamped_to_host_bounding_set() {
        let mut cl = vec![];
        // Host without CAP_SYS_RESOURCE (24) and CAP_NET_RAW (13).
        let host = FULL_MASK & !(1 << 24) & !(1 << 13);
        let s = compute(
            Some(&cri(&["SYS_RESOURCE"], &[], &[])),
            false,
            host,
            &mut cl,
        )
        .unwrap();
        assert!(!s.bounding.contains("CAP_SYS_RESOURCE"));
        assert!(!s.bounding.contains("CAP_NET_RAW"));
        assert_eq!(s.bounding.len(), 13);
        assert_eq!(
            cl,
            vec![
                Clamped::Capability {
                    name: "CAP_NET_RAW".into()
                },
                Clamped::Capability {
                    name: "CAP_SYS_RESOURCE".into()
                },
            ]
        );
    }
}
