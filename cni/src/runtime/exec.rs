//! Running one plugin executable: environment, stdin, bounded output, timeout, error JSON.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::error::{Command, Error, PluginError, Result};

/// A plugin's stdout (its result or error JSON) larger than this is refused.
pub(crate) const MAX_STDOUT: usize = 1 << 20;
/// How much of a plugin's stderr is kept for error messages.
const MAX_STDERR: usize = 8 << 10;
/// How much of unparseable output goes into an error message.
const MAX_EXCERPT: usize = 2 << 10;
/// How often, and how long apart, a spawn failing with ETXTBSY is retried. A binary just
/// written (a plugin being upgraded, or a test's script) is "busy" while any process forked
/// before the writer closed it still holds the fd; that clears once that child execs.
const ETXTBSY_RETRIES: u32 = 10;
const ETXTBSY_BACKOFF: Duration = Duration::from_millis(20);
/// How long to wait for a killed plugin to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// Where the plugin executable for `plugin_type` is: the first bin dir holding a regular file of
/// that name.
pub(crate) fn find_plugin(plugin_type: &str, bin_dirs: &[PathBuf]) -> Result<PathBuf> {
    if !plugin_type.contains('/') && !plugin_type.is_empty() {
        for dir in bin_dirs {
            let p = dir.join(plugin_type);
            if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                return Ok(p);
            }
        }
    }
    Err(Error::PluginNotFound {
        plugin: plugin_type.to_owned(),
        dirs: bin_dirs.to_vec(),
    })
}

/// One plugin run.
pub(crate) struct Invocation<'a> {
    pub command: Command,
    pub plugin: &'a str,
    pub path: &'a Path,
    /// `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`; `None` for commands that have
    /// no attachment (STATUS, GC, VERSION).
    pub attachment: Option<EnvAttachment<'a>>,
    pub cni_path: &'a OsString,
    pub stdin: &'a [u8],
    pub timeout: Duration,
}

/// The per-attachment environment of an invocation.
pub(crate) struct EnvAttachment<'a> {
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub cni_args: &'a str,
}

/// Kills the plugin's process group when dropped while the plugin has not been reaped: on
/// timeout, and when the caller's future is dropped mid-call, so no plugin outlives its call.
/// Only while unreaped: the pid (and so the group id) stays reserved until then.
struct GroupGuard<'a> {
    pgid: Option<Pid>,
    reaped: &'a AtomicBool,
}

impl GroupGuard<'_> {
    fn kill(&self) {
        if let Some(pgid) = self.pgid
            && !self.reaped.load(Ordering::Acquire)
        {
            // ESRCH: the group is already gone, which is what we want.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a plugin and returns its stdout when it exits 0.
pub(crate) async fn invoke(inv: Invocation<'_>) -> Result<Vec<u8>> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(inv.path);
    // Plugins inherit berthd's environment (they need PATH for iptables and friends), minus any
    // CNI_ variables it may have, plus the call's own.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CNI_COMMAND", inv.command.as_str())
        .env("CNI_PATH", inv.cni_path);
    if let Some(a) = &inv.attachment {
        cmd.env("CNI_CONTAINERID", a.container_id)
            .env(
                "CNI_NETNS",
                a.netns.map(Path::as_os_str).unwrap_or_default(),
            )
            .env("CNI_IFNAME", a.ifname)
            .env("CNI_ARGS", a.cni_args);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the plugin started too.
        .process_group(0);
    // A plugin dies with the runtime: one left running after a crash would go on changing the
    // network while the restarted runtime rolls the same attachment back.
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::getppid() as u32 != parent {
                return Err(std::io::Error::other(
                    "the runtime died before the plugin started",
                ));
            }
            Ok(())
        });
    }

    let exec_err = |source| Error::ExecPlugin {
        plugin: inv.plugin.to_owned(),
        path: inv.path.to_owned(),
        command: inv.command,
        source,
    };
    let mut child = spawn(&mut cmd).await.map_err(exec_err)?;
    let reaped = AtomicBool::new(false);
    let guard = GroupGuard {
        pgid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
        reaped: &reaped,
    };
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let run = async {
        let write = async {
            // A plugin may exit without reading stdin (VERSION often does): EPIPE is not an error.
            let _ = stdin.write_all(inv.stdin).await;
            drop(stdin);
        };
        let wait = async {
            let status = child.wait().await;
            if status.is_ok() {
                reaped.store(true, Ordering::Release);
            }
            status
        };
        let ((), out, err, status) = tokio::join!(
            write,
            read_bounded(stdout, MAX_STDOUT),
            read_bounded(stderr, MAX_STDERR),
            wait
        );
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(inv.timeout, run).await {
        Ok(done) => done,
        Err(_) => {
            guard.kill();
            if let Ok(Ok(_)) = tokio::time::timeout(REAP_GRACE, child.wait()).await {
                reaped.store(true, Ordering::Release);
            }
            return Err(Error::Timeout {
                plugin: inv.plugin.to_owned(),
                command: inv.command,
                timeout: inv.timeout,
            });
        }
    };
    drop(guard);
    let status = status.map_err(exec_err)?;
    let (stdout, stdout_len) = out.map_err(exec_err)?;
    let (stderr, stderr_len) = err.map_err(exec_err)?;
    tracing::debug!(
        plugin = inv.plugin,
        command = %inv.command,
        container_id = inv.attachment.as_ref().map(|a| a.container_id),
        elapsed_ms = started.elapsed().as_millis() as u64,
        %status,
        "ran CNI plugin"
    );
    let stderr_text = excerpt(&stderr, stderr_len, MAX_STDERR);
    if !status.success() {
        return Err(plugin_failure(&inv, status, &stdout, stdout_len, stderr_text).into());
    }
    if stdout_len > stdout.len() {
        return Err(Error::InvalidResult {
            plugin: inv.plugin.to_owned(),
            command: inv.command,
            reason: format!("{stdout_len} bytes of output, more than the {MAX_STDOUT} allowed"),
            output: excerpt(&stdout, stdout_len, MAX_EXCERPT),
        });
    }
    if !stderr_text.is_empty() {
        tracing::debug!(plugin = inv.plugin, command = %inv.command, stderr = %stderr_text, "CNI plugin wrote to stderr");
    }
    Ok(stdout)
}

async fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < ETXTBSY_RETRIES => {
                tries += 1;
                tokio::time::sleep(ETXTBSY_BACKOFF * tries).await;
            }
            other => return other,
        }
    }
}

/// Reads all of `r`, keeping the first `limit` bytes; returns them and the total length. It keeps
/// reading past the limit so a chatty plugin never blocks on a full pipe.
async fn read_bounded<R: AsyncRead + Unpin>(
    mut r: R,
    limit: usize,
) -> std::io::Result<(Vec<u8>, usize)> {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok((kept, total));
        }
        total = total.saturating_add(n);
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Printable text of (the start of) some output, trimmed, marked when cut.
pub(crate) fn excerpt(bytes: &[u8], total: usize, max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s = String::from_utf8_lossy(cut).trim().to_owned();
    if total > cut.len() {
        s.push_str(&format!("… ({} more bytes)", total - cut.len()));
    }
    s
}

/// The spec's error object.
#[derive(Deserialize)]
struct ErrorJson {
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

fn plugin_failure(
    inv: &Invocation<'_>,
    status: ExitStatus,
    stdout: &[u8],
    stdout_len: usize,
    stderr: String,
) -> PluginError {
    let base = PluginError {
        plugin: inv.plugin.to_owned(),
        command: inv.command,
        code: None,
        msg: String::new(),
        details: String::new(),
        stderr,
    };
    let parsed = serde_json::from_slice::<ErrorJson>(stdout)
        .ok()
        .filter(|e| e.code.is_some() || !e.msg.is_empty());
    match parsed {
        Some(e) => PluginError {
            code: e.code,
            msg: if e.msg.is_empty() {
                format!("{status}")
            } else {
                e.msg
            },
            details: e.details,
            ..base
        },
        None if stdout.iter().all(u8::is_ascii_whitespace) => PluginError {
            msg: format!("{status} with no error message"),
            ..base
        },
        None => PluginError {
            msg: format!(
                "{status}; output: {:?}",
                excerpt(stdout, stdout_len, MAX_EXCERPT)
            ),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn read_bounded_keeps_the_start_and_counts_the_rest() {
        let data = vec![b'x'; 100_000];
        let (kept, total) = read_bounded(&data[..], 10).await.unwrap();
        assert_eq!((kept.len(), total), (10, 100_000));
        assert_eq!(excerpt(&kept, total, 4), "xxxx… (99996 more bytes)");
        assert_eq!(excerpt(b" hi\n", 4, 10), "hi");
    }

    #[test]
    fn find_plugin_takes_the_first_hit() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(b.path().join("p"), "").unwrap();
        std::fs::create_dir(a.path().join("p")).unwrap();
        let dirs = vec![a.path().to_owned(), b.path().to_owned()];
        assert_eq!(find_plugin("p", &dirs).unwrap(), b.path().join("p"));
        std::fs::write(a.path().join("q"), "").unwrap();
        std::fs::write(b.path().join("q"), "").unwrap();
        assert_eq!(find_plugin("q", &dirs).unwrap(), a.path().join("q"));
        let e = find_plugin("nope", &dirs).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("CNI plugin \"nope\" not found in {dirs:?}")
        );
        assert!(find_plugin("../p", &dirs).is_err());
    }
}
