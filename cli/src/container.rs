//! Container commands: the lifecycle (`run`, `create`, `start`, `stop`, …), listing and
//! looking in (`ps`, `logs`, `port`, `top`, `stats`), and sessions (`exec`, `attach`, `cp`).

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, ExecConfig, HostConfig, NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, RenameContainerOptions, RestartContainerOptions,
    StopContainerOptions, TopOptions, WaitContainerOptions,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::args::{
    AttachArgs, ExecArgs, KillArgs, LogsArgs, Names, PortArgs, PsArgs, RenameArgs, RmArgs, RunArgs,
    StartArgs, StopArgs, TopArgs,
};
use crate::client::{Exit, StatusError, is_not_found, report, start_failure_code};
use crate::format::{self, short_id};
use crate::image::parse_filters;
use crate::opts;
use crate::stream::{ResizeTarget, pump};
use crate::template::render_rows;

/// The create request for `run`/`create`'s flags.
pub fn create_body(a: &RunArgs) -> Result<(String, ContainerCreateBody)> {
    let (image, command) = a
        .image_and_command
        .split_first()
        .context("\"run\" requires at least 1 argument")?;
    let env = opts::collect_env(&a.env, &a.env_file)?;
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut exposed: Vec<String> = Vec::new();
    for p in &a.publish {
        for (port, binding) in opts::parse_publish(p)? {
            if !exposed.contains(&port) {
                exposed.push(port.clone());
            }
            port_bindings
                .entry(port)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(binding);
        }
    }
    for e in &a.expose {
        let port = if e.contains('/') {
            e.clone()
        } else {
            format!("{e}/tcp")
        };
        if !exposed.contains(&port) {
            exposed.push(port);
        }
    }
    let mounts = a
        .mount
        .iter()
        .map(|m| {
            opts::parse_mount(m)
                .with_context(|| format!("invalid argument \"{m}\" for \"--mount\" flag"))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmpfs: HashMap<String, String> = a
        .tmpfs
        .iter()
        .map(|t| match t.split_once(':') {
            Some((p, o)) => (p.to_owned(), o.to_owned()),
            None => (t.clone(), String::new()),
        })
        .collect();
    let sysctls: HashMap<String, String> = a
        .sysctl
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("invalid argument \"{s}\" for \"--sysctl\" flag"))
        })
        .collect::<Result<_>>()?;
    let entrypoint = a.entrypoint.as_ref().map(|e| {
        if e.is_empty() {
            Vec::new()
        } else {
            vec![e.clone()]
        }
    });
    let attach_all = !a.detach && a.attach.is_empty();
    let attach = |s: &str| attach_all || a.attach.iter().any(|x| x.eq_ignore_ascii_case(s));
    let networking_config = a.network.as_ref().and_then(|net| {
        (!a.network_alias.is_empty() || !a.link.is_empty()).then(|| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                net.clone(),
                EndpointSettings {
                    aliases: Some(a.network_alias.clone()).filter(|v| !v.is_empty()),
                    links: Some(a.link.clone()).filter(|v| !v.is_empty()),
                    ..Default::default()
                },
            )])),
        })
    });
    let host_config = HostConfig {
        binds: Some(a.volume.clone()).filter(|v| !v.is_empty()),
        mounts: Some(mounts).filter(|v| !v.is_empty()),
        tmpfs: Some(tmpfs).filter(|v| !v.is_empty()),
        port_bindings: Some(port_bindings).filter(|v| !v.is_empty()),
        publish_all_ports: Some(a.publish_all).filter(|p| *p),
        auto_remove: Some(a.rm).filter(|p| *p),
        memory: a.memory.as_deref().map(opts::parse_bytes).transpose()?,
        nano_cpus: a.cpus.as_deref().map(opts::parse_cpus).transpose()?,
        pids_limit: a.pids_limit,
        privileged: Some(a.privileged).filter(|p| *p),
        cap_add: Some(a.cap_add.clone()).filter(|v| !v.is_empty()),
        cap_drop: Some(a.cap_drop.clone()).filter(|v| !v.is_empty()),
        readonly_rootfs: Some(a.read_only).filter(|p| *p),
        network_mode: a.network.clone(),
        links: Some(a.link.clone()).filter(|v| !v.is_empty()),
        restart_policy: a.restart.as_deref().map(opts::parse_restart).transpose()?,
        dns: Some(a.dns.clone()).filter(|v| !v.is_empty()),
        extra_hosts: Some(a.add_host.clone()).filter(|v| !v.is_empty()),
        security_opt: Some(a.security_opt.clone()).filter(|v| !v.is_empty()),
        sysctls: Some(sysctls).filter(|v| !v.is_empty()),
        ..Default::default()
    };
    if a.rm
        && host_config
            .restart_policy
            .as_ref()
            .and_then(|r| r.name)
            .is_some_and(|n| n != bollard::models::RestartPolicyNameEnum::NO)
    {
        bail!("conflicting options: cannot specify both --restart and --rm");
    }
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        cmd: Some(command.to_vec()).filter(|c| !c.is_empty()),
        entrypoint,
        env: Some(env).filter(|e| !e.is_empty()),
        working_dir: a.workdir.clone(),
        user: a.user.clone(),
        hostname: a.hostname.clone(),
        tty: Some(a.tty),
        open_stdin: Some(a.interactive),
        stdin_once: Some(a.interactive),
        attach_stdin: Some(a.interactive && attach("stdin")),
        attach_stdout: Some(attach("stdout")),
        attach_stderr: Some(attach("stderr")),
        labels: Some(opts::parse_labels(&a.label)).filter(|l| !l.is_empty()),
        exposed_ports: Some(exposed).filter(|e| !e.is_empty()),
        stop_signal: a.stop_signal.clone(),
        stop_timeout: a.stop_timeout,
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    };
    Ok((image.clone(), body))
}

/// Creates the container, pulling its image first when the daemon does not have it (or when
/// `--pull always`), and prints the daemon's warnings as docker does.
async fn create(d: &Docker, a: &RunArgs) -> Result<String> {
    let (image, body) = create_body(a)?;
    crate::image::check_reference(&image)?;
    let opts = CreateContainerOptions {
        name: a.name.clone(),
        ..Default::default()
    };
    if a.pull == "always" {
        pull_quietly_to_stderr(d, &image, a.quiet).await?;
    }
    let created = match d.create_container(Some(opts.clone()), body.clone()).await {
        Err(e) if is_not_found(&e) && a.pull != "never" && is_image_missing(&e) => {
            eprintln!("Unable to find image '{}' locally", with_tag(&image));
            pull_quietly_to_stderr(d, &image, a.quiet).await?;
            d.create_container(Some(opts), body).await
        }
        other => other,
    }
    .context("create the container")?;
    for w in &created.warnings {
        eprintln!("WARNING: {w}");
    }
    Ok(created.id)
}

fn is_image_missing(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { message, .. } if message.contains("No such image"))
}

fn with_tag(image: &str) -> String {
    let (repo, tag, _) = crate::image::split_reference(image);
    if tag.starts_with("sha256:") {
        format!("{repo}@{tag}")
    } else {
        format!("{repo}:{tag}")
    }
}

/// docker's `run` pulls with its progress on stderr, so stdout stays the container's.
async fn pull_quietly_to_stderr(d: &Docker, image: &str, quiet: bool) -> Result<()> {
    let (repo, tag, _) = crate::image::split_reference(image);
    let opts = if tag.starts_with("sha256:") {
        bollard::query_parameters::CreateImageOptions {
            from_image: Some(format!("{repo}@{tag}")),
            ..Default::default()
        }
    } else {
        bollard::query_parameters::CreateImageOptions {
            from_image: Some(repo),
            tag: Some(tag),
            ..Default::default()
        }
    };
    let mut s = d.create_image(Some(opts), None, None);
    while let Some(item) = s.next().await {
        let info = item.with_context(|| format!("pull {image}"))?;
        if let Some(e) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
            bail!(e);
        }
        if quiet {
            continue;
        }
        match (
            info.id.as_deref(),
            info.status.as_deref(),
            info.progress_detail.as_ref(),
        ) {
            (_, _, Some(p)) if p.current.is_some() => {}
            (Some(id), Some(s), _) if !id.is_empty() => eprintln!("{id}: {s}"),
            (_, Some(s), _) => eprintln!("{s}"),
            _ => {}
        }
    }
    Ok(())
}

pub async fn create_cmd(d: &Docker, a: RunArgs) -> Result<i32> {
    let id = create(d, &a).await?;
    println!("{id}");
    Ok(0)
}

/// docker's `run`: create, attach (before start, so no output is missed), start, and exit
/// with the container's code.
pub async fn run(d: &Docker, a: RunArgs) -> Result<i32> {
    if a.detach && a.rm {
        // Allowed (server-side AutoRemove), as in current docker.
    }
    let id = create(d, &a).await?;
    if a.detach {
        if let Err(e) = d.start_container(&id, None).await {
            return Err(start_error(e));
        }
        println!("{id}");
        return Ok(0);
    }
    let attach_all = a.attach.is_empty();
    let want = |s: &str| attach_all || a.attach.iter().any(|x| x.eq_ignore_ascii_case(s));
    let stdin = a.interactive && want("stdin");
    if a.tty && stdin && !crate::tty::stdin_is_tty() {
        bail!("the input device is not a TTY");
    }
    // With --rm the container is gone when it ends: wait for that before starting, or the
    // exit code goes with it.
    let waiter = if a.rm {
        Some(crate::raw::wait_begun(&id, "removed").await?)
    } else {
        None
    };
    let attached = d
        .attach_container(
            &id,
            Some(AttachContainerOptions {
                stream: true,
                stdin,
                stdout: want("stdout"),
                stderr: want("stderr"),
                ..Default::default()
            }),
        )
        .await
        .context("attach to the container")?;
    let raw = if a.tty && stdin {
        Some(crate::tty::RawMode::enable()?)
    } else {
        None
    };
    if let Err(e) = d.start_container(&id, None).await {
        drop(raw);
        return Err(start_error(e));
    }
    let resizer = a
        .tty
        .then(|| ResizeTarget::Container(id.clone()).follow(d.clone()));
    let proxy = raw
        .is_none()
        .then(|| crate::stream::proxy_signals(d.clone(), id.clone()));
    let pumped = pump(attached.output, attached.input, stdin, a.tty).await;
    for task in resizer.into_iter().chain(proxy) {
        task.abort();
    }
    drop(raw);
    pumped?;
    let code = match waiter {
        Some(w) => w.await.context("wait for the container")??,
        None => wait_code(d, &id, "not-running").await?,
    };
    Ok(code)
}

/// A failed start as docker reports it: the daemon's words, 125/126/127.
fn start_error(e: bollard::errors::Error) -> anyhow::Error {
    let text = e.to_string();
    let code = start_failure_code(&text);
    StatusError {
        code,
        error: anyhow::Error::new(e).context("start the container"),
    }
    .into()
}

/// The exit code the container's wait gives.
async fn wait_code(d: &Docker, id: &str, condition: &str) -> Result<i32> {
    let mut s = d.wait_container(
        id,
        Some(WaitContainerOptions {
            condition: condition.to_owned(),
        }),
    );
    match s.next().await {
        Some(Ok(r)) => {
            if let Some(m) = r.error.and_then(|e| e.message).filter(|m| !m.is_empty()) {
                bail!(m);
            }
            Ok(r.status_code as i32)
        }
        Some(Err(bollard::errors::Error::DockerContainerWaitError { error, code })) => {
            if !error.is_empty() {
                eprintln!("{error}");
            }
            Ok(code as i32)
        }
        // Gone before we asked: with --rm, the daemon already removed it.
        Some(Err(e)) if is_not_found(&e) && condition == "removed" => Ok(0),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("wait for the container")),
        None => bail!("the daemon ended the wait without an answer"),
    }
}

/// Runs `f` on each name, printing errors as they come; exit 1 if any failed.
async fn each<F, Fut>(names: &[String], mut f: F) -> Result<i32>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut failed = false;
    for n in names {
        if let Err(e) = f(n.clone()).await {
            report(&e);
            failed = true;
        }
    }
    if failed {
        return Err(Exit(1).into());
    }
    Ok(0)
}

pub async fn start(d: &Docker, a: StartArgs) -> Result<i32> {
    if a.attach || a.interactive {
        if a.containers.len() > 1 {
            bail!("you cannot start and attach multiple containers at once");
        }
        let id = &a.containers[0];
        let info = d
            .inspect_container(id, None)
            .await
            .with_context(|| format!("inspect {id}"))?;
        let cfg = info.config.unwrap_or_default();
        let tty = cfg.tty.unwrap_or(false);
        let stdin = a.interactive && cfg.open_stdin.unwrap_or(false);
        let full_id = info.id.unwrap_or_else(|| id.clone());
        let attached = d
            .attach_container(
                &full_id,
                Some(AttachContainerOptions {
                    stream: true,
                    stdin,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                }),
            )
            .await
            .context("attach to the container")?;
        let raw = if tty && stdin && crate::tty::stdin_is_tty() {
            Some(crate::tty::RawMode::enable()?)
        } else {
            None
        };
        if let Err(e) = d.start_container(&full_id, None).await {
            drop(raw);
            return Err(anyhow::Error::new(e).context("start the container"));
        }
        let resizer = tty.then(|| ResizeTarget::Container(full_id.clone()).follow(d.clone()));
        let pumped = pump(attached.output, attached.input, stdin, tty).await;
        if let Some(r) = resizer {
            r.abort();
        }
        drop(raw);
        pumped?;
        return match wait_code(d, &full_id, "not-running").await {
            Ok(code) => Ok(code),
            // Removed on exit (--rm): its code went with it.
            Err(e) if crate::client::daemon_error(&e).is_some_and(|(s, _)| s == 404) => Ok(0),
            Err(e) => Err(e),
        };
    }
    let mut failed = Vec::new();
    for n in &a.containers {
        match d.start_container(n, None).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                report(&anyhow::Error::new(e));
                failed.push(n.as_str());
            }
        }
    }
    if !failed.is_empty() {
        eprintln!("Error: failed to start containers: {}", failed.join(", "));
        return Err(Exit(1).into());
    }
    Ok(0)
}

pub async fn stop(d: &Docker, a: StopArgs) -> Result<i32> {
    let (t, signal) = (a.time, a.signal.clone());
    each(&a.containers, |n| {
        let signal = signal.clone();
        async move {
            d.stop_container(&n, Some(StopContainerOptions { signal, t }))
                .await
                .with_context(|| format!("stop {n}"))?;
            println!("{n}");
            Ok(())
        }
    })
    .await
}

pub async fn restart(d: &Docker, a: StopArgs) -> Result<i32> {
    let (t, signal) = (a.time, a.signal.clone());
    each(&a.containers, |n| {
        let signal = signal.clone();
        async move {
            d.restart_container(&n, Some(RestartContainerOptions { signal, t }))
                .await
                .with_context(|| format!("restart {n}"))?;
            println!("{n}");
            Ok(())
        }
    })
    .await
}

pub async fn kill(d: &Docker, a: KillArgs) -> Result<i32> {
    let signal = a.signal.clone();
    each(&a.containers, |n| {
        let signal = signal.clone();
        async move {
            d.kill_container(&n, Some(KillContainerOptions { signal }))
                .await
                .with_context(|| format!("kill {n}"))?;
            println!("{n}");
            Ok(())
        }
    })
    .await
}

pub async fn rm(d: &Docker, a: RmArgs) -> Result<i32> {
    let o = RemoveContainerOptions {
        v: a.volumes,
        force: a.force,
        link: a.link,
    };
    let force = a.force;
    let mut failed = false;
    for n in &a.containers {
        match d.remove_container(n, Some(o.clone())).await {
            Ok(()) => println!("{n}"),
            // docker's `rm -f` tells of a missing container but does not fail for it.
            Err(e) if force && is_not_found(&e) => report(&anyhow::Error::new(e)),
            Err(e) => {
                report(&anyhow::Error::new(e).context(format!("remove {n}")));
                failed = true;
            }
        }
    }
    if failed {
        return Err(Exit(1).into());
    }
    Ok(0)
}

pub async fn wait(d: &Docker, a: Names) -> Result<i32> {
    each(&a.containers, |n| async move {
        let code = wait_code(d, &n, "not-running").await?;
        println!("{code}");
        Ok(())
    })
    .await
}

pub async fn rename(d: &Docker, a: RenameArgs) -> Result<i32> {
    d.rename_container(
        &a.container,
        RenameContainerOptions {
            name: a.new_name.clone(),
        },
    )
    .await
    .with_context(|| format!("rename {} to {}", a.container, a.new_name))?;
    Ok(0)
}

/// The fields `ps --format` offers, as docker computes them.
fn ps_row(c: &bollard::models::ContainerSummary, no_trunc: bool) -> Value {
    let id = c.id.clone().unwrap_or_default();
    let names: Vec<String> = c
        .names
        .iter()
        .flatten()
        .map(|n| n.trim_start_matches('/').to_owned())
        // docker lists link aliases (`/a/b`) only with --no-trunc.
        .filter(|n| no_trunc || !n.contains('/'))
        .collect();
    let mut labels: Vec<String> = c
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    let created = c.created.unwrap_or(0);
    let networks: Vec<String> = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|n| {
            let mut v: Vec<String> = n.keys().cloned().collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let mounts: Vec<String> = c
        .mounts
        .iter()
        .flatten()
        .map(|m| {
            m.name
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| m.source.clone())
                .unwrap_or_default()
        })
        .collect();
    json!({
        "ID": if no_trunc { id.clone() } else { short_id(&id) },
        "Names": names.join(","),
        "Image": c.image.clone().unwrap_or_default(),
        "Command": format::command(c.command.as_deref().unwrap_or(""), no_trunc),
        "CreatedAt": format::created_at(created),
        "RunningFor": format::ago(created),
        "Ports": format::ports(c.ports.as_deref().unwrap_or(&[])),
        "State": c.state.map(|s| s.to_string()).unwrap_or_default(),
        "Status": c.status.clone().unwrap_or_default(),
        "Size": c.size_rw.map(format::human_size).unwrap_or_default(),
        "Labels": labels.join(","),
        "Mounts": mounts.join(","),
        "Networks": networks.join(","),
        "LocalVolumes": "0",
    })
}

pub async fn ps(d: &Docker, a: PsArgs) -> Result<i32> {
    let limit = if a.latest {
        Some(1)
    } else {
        a.last.filter(|n| *n > 0)
    };
    let list = d
        .list_containers(Some(ListContainersOptions {
            all: a.all || limit.is_some(),
            limit: limit.map(|n| n as i32),
            size: a.size,
            filters: parse_filters(&a.filter)?,
        }))
        .await
        .context("list containers")?;
    if a.quiet {
        for c in &list {
            let id = c.id.clone().unwrap_or_default();
            println!("{}", if a.no_trunc { id } else { short_id(&id) });
        }
        return Ok(0);
    }
    let rows: Vec<Value> = list.iter().map(|c| ps_row(c, a.no_trunc)).collect();
    let header = json!({"ID": "CONTAINER ID", "Names": "NAMES", "Image": "IMAGE",
        "Command": "COMMAND", "CreatedAt": "CREATED AT", "RunningFor": "CREATED", "Ports": "PORTS",
        "State": "STATE", "Status": "STATUS", "Size": "SIZE", "Labels": "LABELS",
        "Mounts": "MOUNTS", "Networks": "NETWORKS", "LocalVolumes": "LOCAL VOLUMES"});
    let default = if a.size {
        "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}\t{{.Size}}"
    } else {
        "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
    };
    print!(
        "{}",
        render_rows(a.format.as_deref().unwrap_or(default), &header, &rows)?
    );
    Ok(0)
}

/// `--since`/`--until`: a timestamp or a duration back from now (`10m`, `1h30m`, `45s`).
fn parse_since(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<f64>() {
        return Ok(n as i32);
    }
    if let Some(t) = format::parse_rfc3339(s) {
        return Ok(t as i32);
    }
    let mut secs = 0f64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num
            .parse()
            .with_context(|| format!("invalid time or duration {s:?}"))?;
        num.clear();
        secs += n * match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => bail!("invalid time or duration {s:?}"),
        };
    }
    if !num.is_empty() {
        bail!("invalid time or duration {s:?}: missing unit");
    }
    Ok((format::now_secs() as f64 - secs) as i32)
}

pub async fn logs(d: &Docker, a: LogsArgs) -> Result<i32> {
    // Checked first so an unknown container reads as docker's error, not a stream's.
    d.inspect_container(&a.container, None)
        .await
        .with_context(|| format!("logs of {}", a.container))?;
    let mut s = d.logs(
        &a.container,
        Some(LogsOptions {
            follow: a.follow,
            stdout: true,
            stderr: true,
            since: a
                .since
                .as_deref()
                .map(parse_since)
                .transpose()?
                .unwrap_or(0),
            until: a
                .until
                .as_deref()
                .map(parse_since)
                .transpose()?
                .unwrap_or(0),
            timestamps: a.timestamps,
            tail: a.tail.clone(),
        }),
    );
    while let Some(item) = s.next().await {
        match item.context("read the logs")? {
            bollard::container::LogOutput::StdErr { message } => {
                let mut e = std::io::stderr().lock();
                e.write_all(&message).context("write stderr")?;
            }
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => {
                let mut o = std::io::stdout().lock();
                o.write_all(&message).context("write stdout")?;
                o.flush().context("write stdout")?;
            }
            bollard::container::LogOutput::StdIn { .. } => {}
        }
    }
    Ok(0)
}

pub async fn port(d: &Docker, a: PortArgs) -> Result<i32> {
    let info = d
        .inspect_container(&a.container, None)
        .await
        .with_context(|| format!("inspect {}", a.container))?;
    let ports = info
        .network_settings
        .and_then(|n| n.ports)
        .unwrap_or_default();
    let mut keys: Vec<&String> = ports.keys().collect();
    keys.sort_by_key(|k| {
        let (p, proto) = k.split_once('/').unwrap_or((k, "tcp"));
        (p.parse::<u32>().unwrap_or(0), proto.to_owned())
    });
    let wanted = a.port.as_ref().map(|p| {
        if p.contains('/') {
            p.clone()
        } else {
            format!("{p}/tcp")
        }
    });
    let mut found = false;
    for k in keys {
        if wanted.as_ref().is_some_and(|w| w != k) {
            continue;
        }
        for b in ports[k].iter().flatten() {
            let ip = b
                .host_ip
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or("0.0.0.0".into());
            let ip = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            let host_port = b.host_port.clone().unwrap_or_default();
            found = true;
            if wanted.is_some() {
                println!("{ip}:{host_port}");
            } else {
                println!("{k} -> {ip}:{host_port}");
            }
        }
    }
    if let (Some(w), false) = (&a.port, found) {
        bail!(
            "Error: No public port '{}' published for {}",
            with_proto(w),
            a.container
        );
    }
    Ok(0)
}

fn with_proto(p: &str) -> String {
    if p.contains('/') {
        p.to_owned()
    } else {
        format!("{p}/tcp")
    }
}

pub async fn top(d: &Docker, a: TopArgs) -> Result<i32> {
    let r = d
        .top_processes(
            &a.container,
            Some(TopOptions {
                ps_args: a.ps_args.join(" "),
            }),
        )
        .await
        .with_context(|| format!("top of {}", a.container))?;
    let mut lines = vec![r.titles.unwrap_or_default().join("\t")];
    for p in r.processes.unwrap_or_default() {
        lines.push(p.join("\t"));
    }
    print!("{}", crate::template::align(&lines));
    Ok(0)
}

pub async fn exec(d: &Docker, a: ExecArgs) -> Result<i32> {
    let (container, cmd) = a
        .container_and_command
        .split_first()
        .context("\"exec\" requires at least 2 arguments")?;
    if a.tty && a.interactive && !crate::tty::stdin_is_tty() {
        bail!("the input device is not a TTY");
    }
    let env = opts::collect_env(&a.env, &a.env_file)?;
    let attach = !a.detach;
    let created = d
        .create_exec(
            container,
            ExecConfig {
                attach_stdin: Some(a.interactive && attach),
                attach_stdout: Some(attach),
                attach_stderr: Some(attach),
                tty: Some(a.tty),
                env: Some(env).filter(|e| !e.is_empty()),
                cmd: Some(cmd.to_vec()),
                user: a.user.clone(),
                working_dir: a.workdir.clone(),
                privileged: Some(a.privileged),
                console_size: crate::tty::size()
                    .filter(|_| a.tty)
                    .map(|(h, w)| vec![usize::from(h), usize::from(w)]),
                ..Default::default()
            },
        )
        .await
        .context("create the exec")?;
    let started = d
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: a.detach,
                tty: a.tty,
                output_capacity: None,
            }),
        )
        .await
        .context("start the exec")?;
    let StartExecResults::Attached { output, input } = started else {
        return Ok(0);
    };
    let raw = if a.tty && a.interactive {
        Some(crate::tty::RawMode::enable()?)
    } else {
        None
    };
    let resizer = a
        .tty
        .then(|| ResizeTarget::Exec(created.id.clone()).follow(d.clone()));
    let pumped = pump(output, input, a.interactive, a.tty).await;
    if let Some(r) = resizer {
        r.abort();
    }
    drop(raw);
    pumped?;
    let info = d
        .inspect_exec(&created.id)
        .await
        .context("inspect the exec")?;
    Ok(info.exit_code.unwrap_or(0) as i32)
}

pub async fn attach(d: &Docker, a: AttachArgs) -> Result<i32> {
    let info = d
        .inspect_container(&a.container, None)
        .await
        .with_context(|| format!("inspect {}", a.container))?;
    let state = info.state.clone().unwrap_or_default();
    if !state.running.unwrap_or(false) {
        bail!("You cannot attach to a stopped container, start it first");
    }
    let cfg = info.config.unwrap_or_default();
    let tty = cfg.tty.unwrap_or(false);
    let stdin = !a.no_stdin && cfg.open_stdin.unwrap_or(false);
    let id = info.id.unwrap_or_else(|| a.container.clone());
    let attached = d
        .attach_container(
            &id,
            Some(AttachContainerOptions {
                stream: true,
                stdin,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        )
        .await
        .context("attach to the container")?;
    let raw = if tty && stdin && crate::tty::stdin_is_tty() {
        Some(crate::tty::RawMode::enable()?)
    } else {
        None
    };
    let resizer = tty.then(|| ResizeTarget::Container(id.clone()).follow(d.clone()));
    let pumped = pump(attached.output, attached.input, stdin, tty).await;
    if let Some(r) = resizer {
        r.abort();
    }
    drop(raw);
    pumped?;
    match wait_code(d, &id, "not-running").await {
        Ok(code) => Ok(code),
        Err(e) if crate::client::daemon_error(&e).is_some_and(|(s, _)| s == 404) => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn run_args(argv: &[&str]) -> RunArgs {
        let mut full = vec!["berth", "run"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("parse").command {
            Command::Run(a) => a,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn run_flags_become_the_create_request() {
        let a = run_args(&[
            "-d",
            "--rm",
            "-e",
            "A=1",
            "-p",
            "127.0.0.1:8080:80",
            "-h",
            "box",
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "-l",
            "k=v",
            "--restart",
            "no",
            "busybox",
            "sh",
            "-c",
            "echo -n hi",
        ]);
        let (image, body) = create_body(&a).expect("body");
        assert_eq!(image, "busybox");
        assert_eq!(
            body.cmd.as_deref(),
            Some(&["sh".to_owned(), "-c".into(), "echo -n hi".into()][..])
        );
        assert_eq!(body.hostname.as_deref(), Some("box"));
        assert_eq!(body.env.as_deref(), Some(&["A=1".to_owned()][..]));
        let hc = body.host_config.expect("host config");
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        assert_eq!(hc.auto_remove, Some(true));
        let pb = hc.port_bindings.expect("ports");
        let b = &pb["80/tcp"].as_ref().expect("binding")[0];
        assert_eq!(b.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(b.host_port.as_deref(), Some("8080"));
        assert_eq!(body.labels.expect("labels")["k"], "v");
    }

    #[test]
    fn rm_and_restart_conflict() {
        let a = run_args(&["--rm", "--restart", "always", "busybox"]);
        assert!(create_body(&a).is_err());
    }

    #[test]
    fn durations_for_since() {
        let now = format::now_secs() as i32;
        let t = parse_since("10m").expect("10m");
        assert!((now - 600 - t).abs() <= 1);
        assert_eq!(parse_since("1700000000").expect("ts"), 1_700_000_000);
        assert!(parse_since("10").is_ok());
        assert!(parse_since("10x").is_err());
    }
}
