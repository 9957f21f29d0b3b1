//! The berthd ↔ `berth-shim` protocol.
//!
//! One `berth-shim` process monitors one container. berthd starts it as
//!
//! ```text
//! berth-shim --id <container-id> --bundle <dir> --log <cri-log-path> [--stdin] [--tty]
//! ```
//!
//! where `<dir>/config.json` is the OCI runtime spec and `<dir>/rootfs` (or the spec's
//! `root.path`) is already mounted. The shim detaches (double fork, own session), creates the
//! container (state *created*: the init process waits, the user process has not run) and only
//! then lets the command berthd ran exit: 0 after printing one JSON [`Created`] line on stdout,
//! non-zero with a message on stderr when creation failed (nothing left behind in that case).
//!
//! Afterwards berthd talks to the shim over the unix socket [`SOCKET_NAME`] in the bundle dir:
//! one JSON [`Request`] per line, one JSON [`Response`] line back per request; a connection may
//! carry many requests in order. The shim records the exit in [`EXIT_FILE_NAME`] (atomically:
//! temp file + rename) *before* it answers any request with the stopped state, so berthd can
//! learn the exit after either process restarts.
//!
//! [`Request::Exec`] runs another process in the running container. Its stdio are file
//! descriptors berthd passes with the request line (`SCM_RIGHTS` on the same `sendmsg`), in the
//! order stdin, stdout, stderr, one for each stream the request names. The shim reaps the process
//! and keeps its exit until a [`Request::WaitExec`] collects it.
//!
//! With `tty` the exec'd process gets a pseudo terminal instead: its slave end in the container's
//! devpts is the process's stdin, stdout, stderr and controlling terminal, and the master end
//! travels back to berthd with the [`Response::Exec`] line (`SCM_RIGHTS`). The shim keeps no
//! copy: berthd reads the output from it, writes the input to it, resizes it (`TIOCSWINSZ`), and
//! closing it hangs the terminal up (the process gets SIGHUP).
//!
//! [`Request::Attach`] connects berthd to the container's own stdio, again with fds passed along
//! (stdin read end, stdout and stderr write ends). The container's output keeps going to the CRI
//! log; each attached reader gets a copy through a bounded buffer, and a reader that falls more
//! than [`ATTACH_BUFFER`] bytes behind, or closes its pipe, is detached (its pipe closed) without
//! ever slowing the container down. At most one attacher writes to the container's stdin at a
//! time. Readers' pipes are closed once the container's output ends or the container stops.

use serde::{Deserialize, Serialize};

/// The shim's socket, in the bundle dir.
pub const SOCKET_NAME: &str = "shim.sock";
/// The container's exit record ([`ExitStatus`] as JSON), in the bundle dir.
pub const EXIT_FILE_NAME: &str = "exit.json";
/// The shim's own log (the shim's stdout belongs to the protocol), in the bundle dir.
pub const SHIM_LOG_NAME: &str = "shim.log";
/// The shim's pid, written once it is detached, in the bundle dir.
pub const PID_FILE_NAME: &str = "shim.pid";
/// Output bytes the shim buffers per attached reader before it detaches a reader that does not
/// keep up.
pub const ATTACH_BUFFER: usize = 1024 * 1024;

/// Settings an exec'd process takes instead of the container's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOverrides {
    /// `KEY=value` entries set over the container's environment (a same-named entry is
    /// replaced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The working directory, absolute, in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The identity to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<ExecUser>,
}

impl ExecOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.cwd.is_none() && self.user.is_none()
    }
}

/// A resolved identity for an exec'd process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// Printed by `berth-shim` on stdout once the container is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// Pid of the long-lived shim process.
    pub shim_pid: i32,
    /// Pid of the container's init process (in the host pid namespace).
    pub pid: i32,
}

/// A request to the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The container's current state. Answered with [`Response::State`].
    State,
    /// Runs the user process of a created container. Error if not in the created state.
    Start,
    /// Sends `signal` to the init process (or every process of the container when `all`).
    /// Signalling a stopped container is not an error.
    Kill {
        /// Signal number.
        signal: i32,
        /// To every process in the container's cgroup, not only init.
        all: bool,
    },
    /// Waits until the container has exited, then answers [`Response::State`].
    Wait,
    /// Reopens the CRI log file (after log rotation).
    ReopenLog,
    /// Runs a process in the running container, with the container's process settings (user,
    /// capabilities, seccomp, rlimits, env, cwd) and `args`. Answered with [`Response::Exec`]
    /// once the process runs (its `execve` succeeded), or an error.
    Exec {
        /// Names the process in later requests; unique among this shim's execs.
        exec_id: String,
        /// Command and arguments.
        args: Vec<String>,
        /// A stdin fd comes with the request (else the process reads /dev/null).
        stdin: bool,
        /// A stdout fd comes with the request.
        stdout: bool,
        /// A stderr fd comes with the request.
        stderr: bool,
        /// Run the process on a new pseudo terminal whose master comes back with the answer.
        /// `stdin`, `stdout` and `stderr` must be false then (no fds come with the request).
        #[serde(default)]
        tty: bool,
        /// What differs from the container's own process settings (docker's `exec -e -u -w`).
        #[serde(default, skip_serializing_if = "ExecOverrides::is_empty")]
        overrides: ExecOverrides,
    },
    /// Waits until the exec'd process has exited, then answers [`Response::ExecExit`] and
    /// forgets it.
    WaitExec {
        /// As given to `Exec`.
        exec_id: String,
    },
    /// Sends `signal` to an exec'd process; a process that already exited is not an error.
    KillExec {
        /// As given to `Exec`.
        exec_id: String,
        /// Signal number.
        signal: i32,
    },
    /// Attaches to the stdio of the container's process (created or running; an error once
    /// stopped). The fds come with the request in the order stdin (a read end), stdout, stderr
    /// (write ends), one for each stream named. With a terminal (`--tty`) there is no stderr: the
    /// terminal carries both outputs to `stdout`. Answered [`Response::Ok`] once attached.
    Attach {
        /// Copy what this fd yields into the container's stdin. The container must have been
        /// created with `--stdin`, and no other attacher may be writing to it.
        stdin: bool,
        /// Copy the container's stdout (its terminal, with `--tty`) into this fd.
        stdout: bool,
        /// Copy the container's stderr into this fd (not with `--tty`).
        stderr: bool,
        /// When the attached stdin reaches end of file, close the container's stdin (CRI
        /// `stdin_once`); with a terminal that hangs the terminal up. Otherwise the container's
        /// stdin stays open for the next attacher.
        close_stdin_on_eof: bool,
    },
    /// Sets the size of the container's terminal (`TIOCSWINSZ`; the process gets SIGWINCH). An
    /// error when the container has no terminal.
    Resize {
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
    /// Deletes the container (it must be stopped, or created and never started), then the shim
    /// exits after answering. The bundle dir is left for berthd to remove.
    Shutdown,
}

/// Lifecycle state of the container, as the OCI runtime spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, user process not started.
    Created,
    /// The user process runs.
    Running,
    /// The user process exited.
    Stopped,
}

/// How the container's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; 128 + signal number when killed by a signal.
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Exit time, nanoseconds since the Unix epoch.
    pub exited_at_ns: i64,
    /// The kernel OOM killer killed a process of the container.
    pub oom_killed: bool,
}

/// A reply from the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// The state of the container.
    State {
        /// Lifecycle state.
        status: Status,
        /// Init pid (host pid namespace).
        pid: i32,
        /// Start time of the user process, ns since the epoch, once started.
        started_at_ns: Option<i64>,
        /// Set once stopped.
        exit: Option<ExitStatus>,
    },
    /// An exec'd process runs. With `tty` its pty master comes with this line (`SCM_RIGHTS`).
    Exec {
        /// Its pid (host pid namespace).
        pid: i32,
    },
    /// How an exec'd process ended.
    ExecExit {
        /// Exit code; 128 + signal number when killed by a signal.
        code: i32,
        /// The signal that killed it, if any.
        signal: Option<i32>,
    },
    /// The request failed.
    Error {
        /// What went wrong, for people.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_json() {
        let r = Request::Kill {
            signal: 15,
            all: false,
        };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"op":"kill","signal":15,"all":false}"#
        );
        let e = Request::WaitExec {
            exec_id: "e1".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"op":"wait_exec","exec_id":"e1"}"#
        );
        // berthd before `tty` existed sends no such field.
        let old: Request = serde_json::from_str(
            r#"{"op":"exec","exec_id":"e","args":["true"],"stdin":false,"stdout":true,"stderr":true}"#,
        )
        .expect("parse");
        assert!(
            matches!(old, Request::Exec { tty: false, ref overrides, .. } if overrides.is_empty())
        );
        // Without overrides the line stays what an older shim reads.
        let plain = Request::Exec {
            exec_id: "e".into(),
            args: vec!["true".into()],
            stdin: false,
            stdout: true,
            stderr: false,
            tty: false,
            overrides: ExecOverrides::default(),
        };
        assert!(
            !serde_json::to_string(&plain)
                .expect("json")
                .contains("overrides")
        );
        let a = Request::Resize {
            width: 80,
            height: 24,
        };
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            r#"{"op":"resize","width":80,"height":24}"#
        );
        let s: Response =
            serde_json::from_str(r#"{"result":"error","message":"no"}"#).expect("parse");
        assert_eq!(
            s,
            Response::Error {
                message: "no".into()
            }
        );
    }
}
