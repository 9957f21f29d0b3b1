//! Image references, normalised as kubelet and containerd do (docker's reference grammar).
//!
//! `busybox` → `docker.io/library/busybox:latest`; `repo:tag@sha256:…` keeps only the digest
//! (containerd's `ParseDockerRef`); a first component with a `.` or `:`, or `localhost`, is a
//! registry host.

use std::fmt;

use api::Digest;

/// The default registry of unqualified names.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A normalised reference: registry, repository and either a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// What the reference points at.
    pub target: Target,
}

/// A tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `:tag`
    Tag(String),
    /// `@sha256:…`
    Digest(Digest),
}

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct InvalidReference {
    /// The string given.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, InvalidReference> {
        let bad = |reason| InvalidReference {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|_| bad("bad digest"))?),
            ),
            None => (input, None),
        };
        // A tag is what follows the last ':' when no '/' follows it (a port is followed by '/').
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(bad(
                "bad tag: 1-128 of [A-Za-z0-9_.-], not starting with . or -",
            ));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if !valid_host(&registry) {
            return Err(bad("bad registry host"));
        }
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_owned()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !repository.split('/').all(valid_path_component) {
            return Err(bad(
                "bad repository name: lowercase [a-z0-9] with . _ __ - separators",
            ));
        }
        let target = match (digest, tag) {
            (Some(d), _) => Target::Digest(d),
            (None, Some(t)) => Target::Tag(t.to_owned()),
            (None, None) => Target::Tag("latest".to_owned()),
        };
        Ok(Reference {
            registry,
            repository,
            target,
        })
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &Digest) -> Reference {
        Reference {
            target: Target::Digest(digest.clone()),
            ..self.clone()
        }
    }

    /// The same repository at `target`.
    pub fn with_target(&self, target: &Target) -> Reference {
        Reference {
            target: target.clone(),
            ..self.clone()
        }
    }

    /// The tag, if the reference is by tag.
    pub fn tag(&self) -> Option<&str> {
        match &self.target {
            Target::Tag(t) => Some(t),
            Target::Digest(_) => None,
        }
    }

    /// The digest, if the reference is by digest.
    pub fn digest(&self) -> Option<&Digest> {
        match &self.target {
            Target::Digest(d) => Some(d),
            Target::Tag(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Tag(t) => write!(f, "{}/{}:{}", self.registry, self.repository, t),
            Target::Digest(d) => write!(f, "{}/{}@{}", self.registry, self.repository, d),
        }
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(']') || host.ends_with(']') => (host, Some(port)),
        _ => (h, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    host_ok
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()))
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).expect(s).to_string()
    }

    #[test]
    fn normalises_like_containerd() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("quay.example/a/b/c:v1"), "quay.example/a/b/c:v1");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("127.0.0.1:5000/app"), "127.0.0.1:5000/app:latest");
        assert_eq!(norm("127.0.0.1:5000/app:v2"), "127.0.0.1:5000/app:v2");
        assert_eq!(
            norm(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        // tag + digest: the digest wins, as in containerd's ParseDockerRef.
        assert_eq!(
            norm(&format!("busybox:1.0@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(norm("[::1]:5000/app"), "[::1]:5000/app:latest");
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "UPPER/case",
            "busybox@sha256:abc",
            "busybox:-bad",
            "a//b",
            "a/../b",
            "busybox:tag with space",
            "bad_host_/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
