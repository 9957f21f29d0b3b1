//! `POST /containers/{id}/exec`, `POST /exec/{id}/start|resize`, `GET /exec/{id}/json`: an
//! exec is created (a record of what to run), then started once on a hijacked connection (or
//! detached); its exit code stays readable until its container goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::hijack::{self, Streams};
use super::{Api, ApiError, ApiResult, Req, json, status};
use crate::container::stream::{Pty, StreamOpts};

/// Execs kept (created, running or done) at most; the oldest finished ones go first.
const MAX_EXECS: usize = 4096;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct ExecConfig {
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    attach_stdin: bool,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    attach_stdout: bool,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    attach_stderr: bool,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    tty: bool,
    env: Vec<String>,
    cmd: Vec<String>,
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    privileged: bool,
    user: String,
    working_dir: String,
    console_size: Option<[u16; 2]>,
}

#[derive(Debug, Clone)]
struct ExecRecord {
    container_id: String,
    config: ExecConfig,
    started: bool,
    running: bool,
    exit_code: Option<i32>,
    pid: i32,
    pty: Option<Pty>,
    seq: u64,
}

/// The execs berthd knows.
#[derive(Default)]
pub(super) struct Execs {
    map: Mutex<HashMap<String, ExecRecord>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Execs {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, ExecRecord>) -> T) -> T {
        f(&mut self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(super) async fn create(api: &Arc<Api>, container: &str, req: Req) -> ApiResult {
    let config: ExecConfig = req.json().await?;
    let r = api.engine.get(container)?;
    if !r.running() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!("Container {} is not running", r.id),
        });
    }
    if config.cmd.is_empty() {
        return Err(ApiError::bad("No exec command specified"));
    }
    // Checked now, as docker does: a bad user or working dir fails the create, not the start.
    let run = r.run.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::CONFLICT,
        message: format!("Container {} is not running", r.id),
    })?;
    api.engine
        .containers()
        .exec_overrides(
            &run.container_id,
            config.env.clone(),
            &config.user,
            &config.working_dir,
        )
        .await?;
    let id = hex::encode(rand::random::<[u8; 32]>());
    let seq = api
        .execs
        .seq
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    api.execs.with(|m| {
        if m.len() >= MAX_EXECS {
            let oldest = m
                .iter()
                .filter(|(_, e)| !e.running)
                .min_by_key(|(_, e)| e.seq)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                m.remove(&k);
            }
        }
        m.insert(
            id.clone(),
            ExecRecord {
                container_id: r.id.clone(),
                config,
                started: false,
                running: false,
                exit_code: None,
                pid: 0,
                pty: None,
                seq,
            },
        );
    });
    json(StatusCode::CREATED, &json!({"Id": id}))
}

fn get(api: &Api, id: &str) -> Result<ExecRecord, ApiError> {
    api.execs
        .with(|m| m.get(id).cloned())
        .ok_or_else(|| ApiError::not_found(format!("No such exec instance: {id}")))
}

pub(super) fn inspect(api: &Arc<Api>, id: &str) -> ApiResult {
    let e = get(api, id)?;
    let (entrypoint, args) = e
        .config
        .cmd
        .split_first()
        .map(|(a, b)| (a.clone(), b.to_vec()))
        .unwrap_or_default();
    json(
        StatusCode::OK,
        &json!({
            "ID": id,
            "Running": e.running,
            "ExitCode": e.exit_code,
            "ProcessConfig": {
                "tty": e.config.tty, "entrypoint": entrypoint, "arguments": args,
                "privileged": e.config.privileged, "user": e.config.user,
            },
            "OpenStdin": e.config.attach_stdin,
            "OpenStderr": e.config.attach_stderr,
            "OpenStdout": e.config.attach_stdout,
            "CanRemove": false,
            "ContainerID": e.container_id,
            "DetachKeys": "",
            "Pid": e.pid,
        }),
    )
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct StartBody {
    #[serde(deserialize_with = "crate::engine::spec::lenient_bool")]
    detach: bool,
}

pub(super) async fn action(api: &Arc<Api>, id: &str, action: &str, req: Req) -> ApiResult {
    match action {
        "start" => start(api, id, req).await,
        "resize" => {
            let e = get(api, id)?;
            let (w, h) = (
                req.q("w").parse().unwrap_or(0),
                req.q("h").parse().unwrap_or(0),
            );
            match e.pty {
                Some(pty) => pty.resize(w, h)?,
                None if e.config.tty => {
                    return Err(ApiError {
                        status: StatusCode::CONFLICT,
                        message: format!("exec {id} is not running"),
                    });
                }
                None => return Err(ApiError::bad(format!("exec {id} has no terminal"))),
            }
            status(StatusCode::OK)
        }
        _ => Err(ApiError::not_found("page not found")),
    }
}

async fn start(api: &Arc<Api>, id: &str, mut req: Req) -> ApiResult {
    let e = get(api, id)?;
    if e.started {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!("Error: Exec command {id} has already run"),
        });
    }
    // The body is read before the connection is hijacked.
    let body: StartBody = req.json_in_place().await?;
    let r = api.engine.get(&e.container_id)?;
    let Some(run) = r.run.clone().filter(|_| r.running()) else {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!("Container {} is not running", r.id),
        });
    };
    let tty = e.config.tty;
    let opts = if body.detach {
        StreamOpts {
            stdin: false,
            stdout: false,
            stderr: false,
            tty: false,
        }
    } else {
        StreamOpts {
            stdin: e.config.attach_stdin,
            stdout: e.config.attach_stdout || tty,
            stderr: e.config.attach_stderr && !tty,
            tty,
        }
    };
    // A detached exec or one with no streams still needs something for the shim: stdout.
    let opts = if !opts.stdin && !opts.stdout && !opts.stderr && !opts.tty {
        StreamOpts {
            stdout: true,
            ..opts
        }
    } else {
        opts
    };
    let overrides = api
        .engine
        .containers()
        .exec_overrides(
            &run.container_id,
            e.config.env.clone(),
            &e.config.user,
            &e.config.working_dir,
        )
        .await?;
    let mut session = api
        .engine
        .containers()
        .exec_stream(&run.container_id, e.config.cmd.clone(), opts, overrides)
        .await
        .map_err(|err| {
            let message = err.to_string();
            let failed_exec =
                message.contains("executable file not found") || message.contains("No such file");
            ApiError {
                status: if failed_exec {
                    StatusCode::BAD_REQUEST
                } else {
                    ApiError::from(err).status
                },
                message,
            }
        })?;
    if let (Some(pty), Some([h, w])) = (&session.pty, e.config.console_size) {
        let _ = pty.resize(w, h);
    }
    let pid = session.pid();
    let pty = session.pty.clone();
    api.execs.with(|m| {
        if let Some(x) = m.get_mut(id) {
            x.started = true;
            x.running = true;
            x.pid = pid;
            x.pty = pty;
        }
    });
    let api2 = api.clone();
    let exec_id = id.to_owned();
    let finish = move |code: Option<i32>| {
        api2.execs.with(|m| {
            if let Some(x) = m.get_mut(&exec_id) {
                x.running = false;
                x.exit_code = code.or(Some(126));
                x.pty = None;
            }
        });
    };
    if body.detach {
        tokio::spawn(async move {
            // Drain what it writes so it never blocks on a full pipe.
            let mut out = session.stdout.take();
            let drain = async {
                if let Some(o) = &mut out {
                    let _ = tokio::io::copy(o, &mut tokio::io::sink()).await;
                }
            };
            let (code, _) = tokio::join!(session.wait(), drain);
            finish(code.ok());
        });
        return status(StatusCode::OK);
    }
    let streams = match session.pty.take() {
        Some(pty) => Streams {
            stdin: e
                .config
                .attach_stdin
                .then(|| Box::new(pty.clone()) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
            stdout: Some(Box::new(pty)),
            stderr: None,
        },
        None => Streams::pipes(
            session.stdin.take(),
            session.stdout.take(),
            session.stderr.take(),
        ),
    };
    hijack::serve(req, tty, move |conn| async move {
        // The exit is recorded before the connection closes: the client inspects the exec
        // for its code as soon as the stream ends.
        let done = async move {
            let code = session.wait().await.ok();
            finish(code);
        };
        conn.pump(streams, tty, done).await;
    })
}
