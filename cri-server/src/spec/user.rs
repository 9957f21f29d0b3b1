//! The container process's user: a user string (`name`, `uid`, `name:group`, `uid:gid`)
//! resolved against the image's `/etc/passwd` and `/etc/group`, as containerd's `oci.WithUser`
//! and `WithAdditionalGIDs` do.

use super::SpecError;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Lines that do not parse (comments, NIS `+` entries, short lines) are skipped, as libc does.
/// The `:`-separated fields of each line with at least `min` fields, skipping blank lines and
/// comments: the shape shared by /etc/passwd and /etc/group.
fn colon_records(content: &str, min: usize) -> impl Iterator<Item = Vec<&str>> {
    content.lines().filter_map(move |line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= min).then_some(f)
    })
}

pub(crate) fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    colon_records(content, 4)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

pub(crate) fn parse_group(content: &str) -> Vec<GroupEntry> {
    colon_records(content, 3)
        .filter_map(|f| {
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The resolved identity of the container's first process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// Primary uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Sorted, deduplicated: the primary gid, the groups of `/etc/group` that list the user
    /// (unless the policy is Strict) and the CRI supplemental groups.
    pub additional_gids: Vec<u32>,
    /// Home directory from the passwd entry, when the user has one.
    pub home: Option<String>,
}

/// A numeric id as the CRI or an image gives it: decimal, within u32.
fn parse_id(s: &str) -> Option<Result<u32, SpecError>> {
    let n: i64 = s.parse().ok()?;
    Some(u32::try_from(n).map_err(|_| SpecError::InvalidArgument(format!("id {n} out of range"))))
}

fn check_id(n: i64, what: &str) -> Result<u32, SpecError> {
    u32::try_from(n).map_err(|_| SpecError::InvalidArgument(format!("{what} {n} out of range")))
}

/// The user string containerd builds from the CRI security context
/// (`util.GenerateUserString`): `run_as_username` wins over `run_as_user`; `run_as_group`
/// is appended as `:gid`; a group without a user is an error. `None` when the CRI sets no user.
pub(crate) fn cri_user_string(
    username: &str,
    uid: Option<i64>,
    gid: Option<i64>,
) -> Result<Option<String>, SpecError> {
    let user = if !username.is_empty() {
        Some(username.to_string())
    } else {
        uid.map(|u| check_id(u, "run_as_user").map(|u| u.to_string()))
            .transpose()?
    };
    let group = gid.map(|g| check_id(g, "run_as_group")).transpose()?;
    match (user, group) {
        (None, None) => Ok(None),
        (None, Some(g)) => Err(SpecError::InvalidArgument(format!(
            "run_as_group {g} is specified without run_as_user or run_as_username"
        ))),
        (Some(u), None) => Ok(Some(u)),
        (Some(u), Some(g)) => Ok(Some(format!("{u}:{g}"))),
    }
}

/// Resolves `userstr` (`""` means root) against the image's passwd/group contents.
///
/// - `uid`: taken as is; the gid comes from the passwd entry with that uid, else 0.
/// - `name`: must exist in passwd (else an error); uid and gid from the entry.
/// - `user:group`: each side numeric or a name; names must exist in passwd / group.
///
/// `membership_user` is the user whose `/etc/group` memberships become supplementary groups
/// (containerd uses the user part of the CRI or image user string, `"0"` by default);
/// `None` skips them (SupplementalGroupsPolicy Strict).
pub(crate) fn resolve(
    userstr: &str,
    passwd: Option<&str>,
    group: Option<&str>,
    membership_user: Option<&str>,
    supplemental: &[i64],
) -> Result<ResolvedUser, SpecError> {
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let groups = group.map(parse_group).unwrap_or_default();
    let by_name = |name: &str| {
        users.iter().find(|u| u.name == name).ok_or_else(|| {
            SpecError::InvalidArgument(format!(
                "user {name:?} not found in the image's /etc/passwd"
            ))
        })
    };

    let userstr = if userstr.is_empty() { "0" } else { userstr };
    let (user_part, group_part) = match userstr.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (userstr, None),
    };
    if group_part.is_some_and(|g| g.contains(':')) {
        return Err(SpecError::InvalidArgument(format!(
            "invalid user string {userstr:?}"
        )));
    }

    let (uid, mut gid, home) = match parse_id(user_part) {
        Some(uid) => {
            let uid = uid?;
            match users.iter().find(|u| u.uid == uid) {
                Some(e) => (uid, e.gid, Some(e.home.clone())),
                None => (uid, 0, None),
            }
        }
        None => {
            let e = by_name(user_part)?;
            (e.uid, e.gid, Some(e.home.clone()))
        }
    };
    if let Some(g) = group_part {
        gid = match parse_id(g) {
            Some(gid) => gid?,
            None => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| {
                        SpecError::InvalidArgument(format!(
                            "group {g:?} not found in the image's /etc/group"
                        ))
                    })?
                    .gid
            }
        };
    }

    let mut additional = vec![gid];
    if let Some(member) = membership_user {
        let member = if member.is_empty() { "0" } else { member };
        let name = match parse_id(member) {
            Some(Ok(id)) => users.iter().find(|u| u.uid == id).map(|u| u.name.clone()),
            Some(Err(_)) => None,
            None => Some(member.to_string()),
        };
        if let Some(name) = name {
            additional.extend(
                groups
                    .iter()
                    .filter(|g| g.name != name && g.members.contains(&name))
                    .map(|g| g.gid),
            );
        }
    }
    for g in supplemental {
        additional.push(check_id(*g, "supplemental group")?);
    }
    additional.sort_unstable();
    additional.dedup();

    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: additional,
        home: home.filter(|h| !h.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,app\n\
        app:x:1001:app\n\
        audio:x:29:app , daemon\n\
        staff:x:50:\n";

    fn r(user: &str, member: Option<&str>) -> Result<ResolvedUser, SpecError> {
        resolve(user, Some(PASSWD), Some(GROUP), member, &[])
    }

    #[test]
    fn parses_passwd_and_group() {
        let u = parse_passwd(PASSWD);
        assert_eq!(u.len(), 4);
        assert_eq!(u[2].name, "app");
        assert_eq!((u[2].uid, u[2].gid), (1000, 1001));
        let g = parse_group(GROUP);
        assert_eq!(g[3].members, vec!["app", "daemon"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn empty_user_is_root() {
        let u = resolve("", None, None, Some(""), &[]).unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
        assert_eq!(u.additional_gids, vec![0]);
    }

    #[test]
    fn name_resolves_uid_gid_and_groups() {
        let u = r("app", Some("app")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        // wheel and audio list app; the app group is its own name's group (excluded as
        // membership, included as the primary gid).
        assert_eq!(u.additional_gids, vec![10, 29, 1001]);
        assert_eq!(u.home.as_deref(), Some("/home/app"));
    }

    #[test]
    fn uid_in_passwd_takes_its_gid() {
        let u = r("1000", Some("1000")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        assert_eq!(u.additional_gids, vec![10, 29, 1001]);
    }

    #[test]
    fn uid_not_in_passwd_is_fine_with_gid_0() {
        let u = r("4242", Some("4242")).unwrap();
        assert_eq!((u.uid, u.gid), (4242, 0));
        assert_eq!(u.additional_gids, vec![0]);
        assert_eq!(u.home, None);
    }

    #[test]
    fn name_colon_group() {
        let u = r("app:staff", Some("app")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert_eq!(u.additional_gids, vec![10, 29, 50]);
    }

    #[test]
    fn uid_colon_gid_needs_no_files() {
        let u = resolve("1234:5678", None, None, Some("1234"), &[]).unwrap();
        assert_eq!((u.uid, u.gid), (1234, 5678));
        assert_eq!(u.additional_gids, vec![5678]);
    }

    #[test]
    fn uid_colon_group_name() {
        let u = r("7:wheel", None).unwrap();
        assert_eq!((u.uid, u.gid), (7, 10));
    }

    #[test]
    fn missing_user_or_group_is_invalid_argument() {
        assert!(matches!(
            r("ghost", None),
            Err(SpecError::InvalidArgument(_))
        ));
        assert!(matches!(
            r("app:ghosts", None),
            Err(SpecError::InvalidArgument(_))
        ));
        // No passwd at all: names cannot resolve.
        assert!(resolve("app", None, None, None, &[]).is_err());
        assert!(r("a:b:c", None).is_err());
    }

    #[test]
    fn supplemental_groups_merge_and_strict() {
        let u = resolve("app", Some(PASSWD), Some(GROUP), Some("app"), &[5000, 10]).unwrap();
        assert_eq!(u.additional_gids, vec![10, 29, 1001, 5000]);
        let strict = resolve("app", Some(PASSWD), Some(GROUP), None, &[5000]).unwrap();
        assert_eq!(strict.additional_gids, vec![1001, 5000]);
        assert!(resolve("0", None, None, None, &[-1]).is_err());
    }

    #[test]
    fn cri_user_string_rules() {
        assert_eq!(cri_user_string("", None, None).unwrap(), None);
        assert_eq!(
            cri_user_string("", Some(1000), None).unwrap().as_deref(),
            Some("1000")
        );
        assert_eq!(
            cri_user_string("app", Some(1000), Some(5))
                .unwrap()
                .as_deref(),
            Some("app:5")
        );
        assert!(cri_user_string("", None, Some(5)).is_err());
        assert!(cri_user_string("", Some(-1), None).is_err());
    }
}
