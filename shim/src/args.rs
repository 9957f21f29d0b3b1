//! Command-line flags of `berth-shim` (see `api::shim` for the contract).
//!
//! Hand-parsed: a flag parser crate would add code pages to a process whose budget is 2 MiB.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::{Error, Result};

/// What berthd asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Container id (also libcontainer's id).
    pub id: String,
    /// OCI bundle dir (absolute once parsed).
    pub bundle: PathBuf,
    /// CRI log file the container's output goes to.
    pub log: PathBuf,
    /// Keep a pipe to the container's stdin open.
    pub stdin: bool,
    /// Give the container a pseudo terminal.
    pub tty: bool,
}

impl Args {
    /// Parses `--id <id> --bundle <dir> --log <path> [--stdin] [--tty]` (program name excluded).
    pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Args> {
        let (mut id, mut bundle, mut log) = (None, None, None);
        let (mut stdin, mut tty) = (false, false);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy().into_owned();
            let slot = match flag.as_str() {
                "--stdin" => {
                    stdin = true;
                    continue;
                }
                "--tty" => {
                    tty = true;
                    continue;
                }
                "--id" => &mut id,
                "--bundle" => &mut bundle,
                "--log" => &mut log,
                _ => return Err(Error::Usage(format!("unknown flag {flag:?}"))),
            };
            let value = it
                .next()
                .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?;
            *slot = Some(value);
        }
        let id = id
            .ok_or_else(|| Error::Usage("--id is required".into()))?
            .into_string()
            .map_err(|_| Error::Usage("--id is not UTF-8".into()))?;
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(Error::Usage(format!("invalid container id {id:?}")));
        }
        let bundle =
            PathBuf::from(bundle.ok_or_else(|| Error::Usage("--bundle is required".into()))?);
        let bundle = std::fs::canonicalize(&bundle).map_err(|source| Error::Bundle {
            path: bundle,
            source,
        })?;
        let log = PathBuf::from(log.ok_or_else(|| Error::Usage("--log is required".into()))?);
        // The shim chdirs into the bundle: a relative log path would change meaning.
        let log = if log.is_absolute() {
            log
        } else {
            std::env::current_dir()
                .map_err(|source| Error::Bundle {
                    path: ".".into(),
                    source,
                })?
                .join(log)
        };
        Ok(Args {
            id,
            bundle,
            log,
            stdin,
            tty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Args> {
        Args::parse(v.iter().map(OsString::from))
    }

    #[test]
    fn parses_all_flags() {
        let a = parse(&[
            "--id", "c1", "--bundle", "/", "--log", "/x.log", "--tty", "--stdin",
        ])
        .expect("parse");
        assert_eq!(a.id, "c1");
        assert_eq!(a.bundle, PathBuf::from("/"));
        assert_eq!(a.log, PathBuf::from("/x.log"));
        assert!(a.tty && a.stdin);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse(&["--id", "c1", "--bundle", "/"]).is_err());
        assert!(parse(&["--id", "../x", "--bundle", "/", "--log", "/l"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--id"]).is_err());
    }
}
