//! Mount descriptions, as a snapshotter returns them and a runtime applies them.

use serde::{Deserialize, Serialize};

/// One mount to perform, in the form of `mount(8)`: the caller decides where and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type: `overlay`, `bind`, ...
    pub fstype: String,
    /// Source: a device, a directory, or the fs type name for virtual filesystems.
    pub source: String,
    /// Options as `mount -o` takes them (`ro`, `rbind`, `lowerdir=...`).
    pub options: Vec<String>,
}

impl Mount {
    /// The value of a `key=value` option, if present.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// Whether the mount is read-only.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lookup() {
        let m = Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            options: vec!["ro".into(), "lowerdir=/a:/b".into()],
        };
        assert_eq!(m.option("lowerdir"), Some("/a:/b"));
        assert_eq!(m.option("upperdir"), None);
        assert!(m.is_readonly());
    }
}
