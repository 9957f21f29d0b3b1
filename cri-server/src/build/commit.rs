//! `docker commit`: a container's writable layer becomes a new image on the container's image,
//! with the container's config (and `--change`s) as the image's, the container frozen
//! meanwhile unless asked not to.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::Digest;
use serde_json::{Map, Value, json};

use super::config::{self, Vars};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::image::NamedImage;

/// What a commit is asked for.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Normalized references to name the image (none: untagged).
    pub refs: Vec<String>,
    /// `--author`.
    pub author: String,
    /// `--message`.
    pub comment: String,
    /// `--change`s: Dockerfile instructions (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD,
    /// USER, VOLUME, WORKDIR, STOPSIGNAL, HEALTHCHECK).
    pub changes: Vec<String>,
    /// Freeze the container during the diff.
    pub pause: bool,
}

/// Instructions `--change` may give, as docker's.
const CHANGES: &[&str] = &[
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "LABEL",
    "ONBUILD",
    "USER",
    "VOLUME",
    "WORKDIR",
    "STOPSIGNAL",
    "HEALTHCHECK",
];

/// The image config of a commit: the image's, overlaid with what the container was given.
fn merged_config(image_cfg: &Value, c: &crate::engine::spec::Config) -> Map<String, Value> {
    let mut cfg = image_cfg.as_object().cloned().unwrap_or_default();
    if !c.env.is_empty() {
        let mut env: Vec<String> = config::env_of(&cfg);
        for e in &c.env {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            match env
                .iter_mut()
                .find(|x| x.split_once('=').map_or(x.as_str(), |(k, _)| k) == key)
            {
                Some(slot) => slot.clone_from(e),
                None => env.push(e.clone()),
            }
        }
        cfg.insert("Env".into(), json!(env));
    }
    if let Some(cmd) = &c.cmd {
        cfg.insert("Cmd".into(), json!(cmd));
    }
    if let Some(ep) = &c.entrypoint {
        cfg.insert(
            "Entrypoint".into(),
            if ep.iter().all(String::is_empty) {
                Value::Null
            } else {
                json!(ep)
            },
        );
    }
    for (k, v) in [("WorkingDir", &c.working_dir), ("User", &c.user)] {
        if !v.is_empty() {
            cfg.insert(k.into(), json!(v));
        }
    }
    if !c.stop_signal.is_empty() {
        cfg.insert("StopSignal".into(), json!(c.stop_signal));
    }
    for (k, extra) in [
        (
            "Labels",
            c.labels
                .iter()
                .filter(|(k, _)| !k.starts_with("io.berth."))
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<Map<_, _>>(),
        ),
        (
            "ExposedPorts",
            c.exposed_ports
                .keys()
                .map(|k| (k.clone(), json!({})))
                .collect(),
        ),
        (
            "Volumes",
            c.volumes.keys().map(|k| (k.clone(), json!({}))).collect(),
        ),
    ] {
        if extra.is_empty() {
            continue;
        }
        let slot = cfg.entry(k).or_insert_with(|| json!({}));
        if !slot.is_object() {
            *slot = json!({});
        }
        if let Some(m) = slot.as_object_mut() {
            m.extend(extra);
        }
    }
    cfg
}

/// Applies `--change`s to `cfg`.
fn apply_changes(cfg: &mut Map<String, Value>, changes: &[String]) -> Result<()> {
    for c in changes {
        let ins = api::dockerfile::parse_trigger("--change", c, '\\')
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if !CHANGES.contains(&ins.keyword()) {
            return Err(Error::InvalidArgument(format!(
                "{} is not a valid change command",
                ins.keyword()
            )));
        }
        let args = Default::default();
        let vars = Vars {
            escape: '\\',
            env: config::env_of(cfg),
            args: &args,
        };
        config::apply(cfg, &ins.kind, &vars, true)
            .map_err(|e| Error::InvalidArgument(format!("--change {c:?}: {e}")))?;
    }
    Ok(())
}

/// The cgroup freezer of process `pid`: v1's freezer.state or v2's cgroup.freeze.
fn freezer_of(pid: i32) -> Option<(PathBuf, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "freezer") {
            let p = Path::new("/sys/fs/cgroup/freezer")
                .join(path.trim_start_matches('/'))
                .join("freezer.state");
            if p.exists() {
                return Some((p, true));
            }
        }
    }
    for line in text.lines() {
        if let Some(path) = line.strip_prefix("0::") {
            let p = Path::new("/sys/fs/cgroup")
                .join(path.trim_start_matches('/'))
                .join("cgroup.freeze");
            if p.exists() {
                return Some((p, false));
            }
        }
    }
    None
}

/// Freezes a cgroup until dropped.
struct Frozen {
    file: PathBuf,
    v1: bool,
}

impl Frozen {
    async fn freeze(pid: i32) -> Option<Frozen> {
        let (file, v1) = freezer_of(pid)?;
        let (on, off) = if v1 { ("FROZEN", "THAWED") } else { ("1", "0") };
        if std::fs::write(&file, on).is_err() {
            return None;
        }
        let frozen = Frozen { file, v1 };
        if v1 {
            // FREEZING until every task stopped.
            for _ in 0..200 {
                match std::fs::read_to_string(&frozen.file) {
                    Ok(s) if s.trim() == "FROZEN" => return Some(frozen),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(_) => break,
                }
            }
            let _ = std::fs::write(&frozen.file, off);
            return None;
        }
        Some(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let off = if self.v1 { "THAWED" } else { "0" };
        if let Err(e) = std::fs::write(&self.file, off) {
            tracing::warn!(error = %e, path = %self.file.display(), "thaw a committed container");
        }
    }
}

/// Commits container `name_or_id`; returns the new image's id.
pub async fn commit(engine: &Engine, name_or_id: &str, opts: CommitOptions) -> Result<Digest> {
    let r = engine.get(name_or_id)?;
    let images = engine.images().clone();
    let image = images
        .resolve(&r.image_id)?
        .ok_or_else(|| Error::NotFound(format!("No such image: {}", r.image_id)))?;
    let mut config = images.config_json(&image)?;
    if !config.is_object() {
        return Err(Error::InvalidArgument(format!(
            "the config of image {} is not a JSON object",
            r.image_id
        )));
    }
    let mut cfg = merged_config(&config["config"], &r.config);
    apply_changes(&mut cfg, &opts.changes)?;
    config["config"] = Value::Object(cfg);
    let created = api::time::rfc3339_nano(crate::sandbox::now_ns());
    config["created"] = json!(created);
    if !opts.author.is_empty() {
        config["author"] = json!(opts.author);
    }
    let created_by = r
        .config
        .entrypoint
        .iter()
        .flatten()
        .chain(r.config.cmd.iter().flatten())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let mut h = json!({"created": created, "created_by": created_by});
    if !opts.author.is_empty() {
        h["author"] = json!(opts.author);
    }
    if !opts.comment.is_empty() {
        h["comment"] = json!(opts.comment);
        config["comment"] = json!(opts.comment);
    }
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    if let Some(a) = config["history"].as_array_mut() {
        a.push(h);
    }
    let frozen = if opts.pause && r.running() && r.state.pid > 0 {
        let f = Frozen::freeze(r.state.pid).await;
        if f.is_none() {
            tracing::warn!(container_id = %r.id, "no cgroup freezer: committing without a pause");
        }
        f
    } else {
        None
    };
    let key = r.snapshot_key();
    let mut hold = images.new_hold();
    let diffed = {
        let images = images.clone();
        tokio::task::spawn_blocking(move || {
            let layer = images.layer_from_snapshot(&key, false, &mut hold);
            (layer, hold)
        })
        .await
        .map_err(|e| Error::Internal(format!("diff thread: {e}")))?
    };
    drop(frozen);
    let (layer, hold) = diffed;
    let NamedImage { record, .. } = image;
    let refs = opts.refs.clone();
    // The hold keeps the new blob (and the parent's content) until the record names them; it
    // goes on the blocking thread.
    let made = tokio::task::spawn_blocking(move || {
        layer.and_then(|layer| {
            let mut hold = hold;
            images.hold_image(&mut hold, &record);
            let made = images.compose(Some(&record), Some(layer), config, &refs);
            drop(hold);
            made
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("commit thread: {e}")))??;
    Ok(made.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_committed_process_is_frozen_and_thawed_again() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test moves a process into a freezer cgroup: run it as root"
        );
        let v1 = Path::new("/sys/fs/cgroup/freezer");
        assert!(v1.is_dir(), "this host has no v1 freezer hierarchy");
        let dir = v1.join(format!("berth-test-freeze-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("create a freezer cgroup");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        // No panic before the clean-up: errors come out as values.
        let result = async {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("move the child: {e}"))?;
            let frozen = Frozen::freeze(pid).await.ok_or("not frozen")?;
            let state = std::fs::read_to_string(dir.join("freezer.state"));
            drop(frozen);
            let after = std::fs::read_to_string(dir.join("freezer.state"));
            Ok::<_, String>((state, after))
        }
        .await;
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir(&dir);
        let (state, after) = result.expect("freeze");
        assert_eq!(state.expect("state").trim(), "FROZEN");
        assert_eq!(after.expect("state").trim(), "THAWED");
    }

    #[test]
    fn the_container_config_overlays_the_image_and_changes_apply_last() {
        let image = json!({"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Labels": {"x": "1"}});
        let c = crate::engine::spec::Config {
            env: vec!["A=2".into(), "B=3".into()],
            cmd: Some(vec!["top".into()]),
            labels: [
                ("y".to_owned(), "2".to_owned()),
                ("io.berth.build".into(), "1".into()),
            ]
            .into(),
            ..Default::default()
        };
        let mut cfg = merged_config(&image, &c);
        assert_eq!(cfg["Env"], json!(["PATH=/bin", "A=2", "B=3"]));
        assert_eq!(cfg["Cmd"], json!(["top"]));
        assert_eq!(cfg["Labels"], json!({"x": "1", "y": "2"}));
        apply_changes(
            &mut cfg,
            &["CMD [\"echo\", \"hi\"]".into(), "ENV C=4".into()],
        )
        .expect("changes");
        assert_eq!(cfg["Cmd"], json!(["echo", "hi"]));
        assert_eq!(cfg["Env"], json!(["PATH=/bin", "A=2", "B=3", "C=4"]));
        let bad = apply_changes(&mut cfg, &["RUN rm -rf /".into()]).expect_err("RUN refused");
        assert!(
            bad.to_string().contains("not a valid change command"),
            "{bad}"
        );
    }
}
