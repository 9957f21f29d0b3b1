//! Devices: CRI devices read from the host's device nodes, the default device cgroup rules,
//! and the host's whole /dev for privileged containers.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::SpecError;

/// One device node as `linux.devices` and its `linux.resources.devices` allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the container.
    pub path: PathBuf,
    /// `c` or `b`.
    pub kind: char,
    /// Major number.
    pub major: i64,
    /// Minor number.
    pub minor: i64,
    /// Permission bits of the host node.
    pub file_mode: u32,
    /// Owner of the host node.
    pub uid: u32,
    /// Group of the host node.
    pub gid: u32,
}

impl DeviceNode {
    /// The `linux.devices` entry.
    pub fn to_json(&self) -> Value {
        json!({
            "path": self.path,
            "type": self.kind.to_string(),
            "major": self.major,
            "minor": self.minor,
            "fileMode": self.file_mode,
            "uid": self.uid,
            "gid": self.gid,
        })
    }

    /// The device cgroup rule allowing `access` on it.
    pub fn rule(&self, access: &str) -> Value {
        rule(
            true,
            &self.kind.to_string(),
            Some(self.major),
            Some(self.minor),
            access,
        )
    }
}

/// A `linux.resources.devices` entry; `None` major/minor means any (`*`).
pub fn rule(
    allow: bool,
    kind: &str,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> Value {
    let mut v = json!({ "allow": allow, "type": kind, "access": access });
    if let Some(m) = major {
        v["major"] = m.into();
    }
    if let Some(m) = minor {
        v["minor"] = m.into();
    }
    v
}

/// Deny everything, then allow what every container needs (runc's and containerd's defaults):
/// mknod of any node, null, zero, full, random, urandom, tty, console, ptmx, pts, tun.
pub fn default_rules() -> Vec<Value> {
    let c = |major, minor, access| rule(true, "c", Some(major), minor, access);
    vec![
        rule(false, "a", None, None, "rwm"),
        rule(true, "c", None, None, "m"),
        rule(true, "b", None, None, "m"),
        c(1, Some(3), "rwm"),    // /dev/null
        c(1, Some(5), "rwm"),    // /dev/zero
        c(1, Some(7), "rwm"),    // /dev/full
        c(1, Some(8), "rwm"),    // /dev/random
        c(1, Some(9), "rwm"),    // /dev/urandom
        c(5, Some(0), "rwm"),    // /dev/tty
        c(5, Some(1), "rwm"),    // /dev/console
        c(5, Some(2), "rwm"),    // /dev/ptmx
        c(136, None, "rwm"),     // /dev/pts/*
        c(10, Some(200), "rwm"), // /dev/net/tun
    ]
}

/// The rule privileged containers get: every device.
pub fn allow_all_rule() -> Value {
    rule(true, "a", None, None, "rwm")
}

/// `r`, `w`, `m` in any combination; empty means `rwm`.
pub fn check_permissions(p: &str) -> Result<&str, SpecError> {
    if p.is_empty() {
        return Ok("rwm");
    }
    if p.len() > 3 || !p.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(SpecError::InvalidArgument(format!(
            "invalid device permissions {p:?}"
        )));
    }
    Ok(p)
}

fn node(meta: &std::fs::Metadata, container_path: PathBuf) -> Option<DeviceNode> {
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        return None;
    };
    let rdev = meta.rdev();
    Some(DeviceNode {
        path: container_path,
        kind,
        major: i64::from(libc::major(rdev)),
        minor: i64::from(libc::minor(rdev)),
        file_mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// The device nodes a CRI device names: the host path with symlinks followed (a node, or a
/// directory whose nodes are all taken, mapped under `container_path`).
pub fn from_host(host_path: &Path, container_path: &Path) -> Result<Vec<DeviceNode>, SpecError> {
    let read_err = |path: &Path, source| SpecError::ReadDevice {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(host_path).map_err(|e| read_err(host_path, e))?;
    if meta.is_dir() {
        let mut out = vec![];
        walk(host_path, container_path, &mut out, &[]).map_err(|e| read_err(host_path, e))?;
        return Ok(out);
    }
    node(&meta, container_path.to_owned())
        .map(|n| vec![n])
        .ok_or_else(|| {
            SpecError::InvalidArgument(format!("{} is not a device node", host_path.display()))
        })
}

fn walk(
    dir: &Path,
    container_dir: &Path,
    out: &mut Vec<DeviceNode>,
    skip: &[&str],
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if skip.iter().any(|s| name == **s) {
            continue;
        }
        // Entries can vanish while we look (udev); symlinks are skipped like containerd does.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let target = container_dir.join(&name);
        if meta.is_dir() {
            walk(&e.path(), &target, out, &[])?;
        } else if let Some(n) = node(&meta, target) {
            out.push(n);
        }
    }
    Ok(())
}

/// Every device node under the host's `dev` directory, for privileged containers, skipping
/// what the runtime mounts itself (as containerd's `HostDevices`).
pub fn host_devices(dev: &Path) -> Result<Vec<DeviceNode>, SpecError> {
    let mut out = vec![];
    walk(
        dev,
        Path::new("/dev"),
        &mut out,
        &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"],
    )
    .map_err(|source| SpecError::ReadDevice {
        path: dev.to_owned(),
        source,
    })?;
    out.retain(|d| d.path != Path::new("/dev/console"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn dev_null_is_char_1_3() {
        let d = from_host(Path::new("/dev/null"), Path::new("/dev/mynull")).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].kind, d[0].major, d[0].minor), ('c', 1, 3));
        assert_eq!(d[0].path, Path::new("/dev/mynull"));
        let r = d[0].rule("rw");
        assert_eq!(
            r,
            json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rw"})
        );
    }

    #[test]
    fn symlinks_are_followed_and_non_devices_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("null-link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let d = from_host(&link, Path::new("/dev/x")).unwrap();
        assert_eq!((d[0].major, d[0].minor), (1, 3));

        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            from_host(&file, Path::new("/dev/x")),
            Err(SpecError::InvalidArgument(_))
        ));
        assert!(matches!(
            from_host(&dir.path().join("nope"), Path::new("/dev/x")),
            Err(SpecError::ReadDevice { .. })
        ));
    }

    #[test]
    fn directory_takes_its_nodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        let d = from_host(dir.path(), Path::new("/dev/dir")).unwrap();
        assert!(d.is_empty());
    }

    #[test]
    fn host_devices_lists_dev() {
        let d = host_devices(Path::new("/dev")).unwrap();
        assert!(d.iter().any(|d| d.path == Path::new("/dev/null")));
        assert!(!d.iter().any(|d| d.path.starts_with("/dev/pts")));
        assert!(!d.iter().any(|d| d.path == Path::new("/dev/console")));
    }

    #[test]
    fn permissions() {
        assert_eq!(check_permissions("").unwrap(), "rwm");
        assert_eq!(check_permissions("rw").unwrap(), "rw");
        assert!(check_permissions("rwx").is_err());
        assert!(check_permissions("rwmm").is_err());
    }

    #[test]
    fn default_rules_deny_first() {
        let r = default_rules();
        assert_eq!(r[0]["allow"], false);
        assert!(
            r.iter()
                .any(|r| r["major"] == 136 && r.get("minor").is_none())
        );
    }
}
