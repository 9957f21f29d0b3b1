//! Volumes as objects, as docker's `local` driver keeps them: a record per volume in the
//! engine's database (name, labels, created time, whether it is anonymous and whose) and its
//! data in `<root>/volumes/<name>/_data`.
//!
//! A container's volumes are worked out from its record alone ([`Engine::mount_points`]):
//! named ones from its binds and mounts, anonymous ones (`-v /path`, `Config.Volumes`, the
//! image's `VOLUME`s) named by a hash of the container id and the path, so no extra state
//! is kept per container and a crash cannot leave the two out of step. Records are made when
//! the container is created, as docker does, and again (idempotently) when it starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use api::cri;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Engine, Record, translate};
use crate::error::{Error, Result};
use crate::sandbox::now_ns;

/// Volume name → JSON [`VolumeRecord`].
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_volumes");
/// The label docker (≥ 23) puts on anonymous volumes; prune without `all` takes only these.
pub const ANONYMOUS_LABEL: &str = "com.docker.volume.anonymous";
/// Prefix of the view snapshots (and, with a dot, mount dirs) a copy-up from the image uses.
const COPY_PREFIX: &str = "volcopy-";
/// Suffix of the staging dir a copy-up fills before its files move into the volume.
const FILL_SUFFIX: &str = ".fill";
/// The only driver berth has.
pub const LOCAL_DRIVER: &str = "local";

/// Serialises changes to volume records and their directories: create, remove and the
/// in-use check must not interleave. Held only for short, local disk work.
/// Container create holds it too, from storing its record until its volumes are made, so a
/// remove or prune that works out which volumes are in use (under it) sees either the whole
/// container or none of it.
static VOLUME_LOCK: Mutex<()> = Mutex::new(());

/// Takes [`VOLUME_LOCK`].
pub(super) fn lock() -> MutexGuard<'static, ()> {
    VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the engine records of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Its name: given, or 64 hex digits.
    pub name: String,
    /// Always `local`.
    pub driver: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Driver options (none are supported yet; kept for the API's shape).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
    /// Its data directory.
    pub mountpoint: PathBuf,
    /// Made for a container's `-v /path` or image `VOLUME`, not named by anyone.
    #[serde(default)]
    pub anonymous: bool,
    /// The container an anonymous volume was made for.
    #[serde(default)]
    pub container: Option<String>,
    /// Filled from the image already (only an empty volume is filled, once).
    #[serde(default)]
    pub populated: bool,
}

/// How a path of a container is backed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A host path.
    Bind,
    /// A volume of this name.
    Volume {
        /// The volume's name.
        name: String,
        /// Made for this container alone.
        anonymous: bool,
    },
}

/// One mount of a container, as inspect shows it and as it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// What backs it.
    pub kind: MountKind,
    /// The host path (the volume's data dir for a volume).
    pub source: PathBuf,
    /// Path in the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// From `--mount` rather than `-v` (a missing bind source is an error then).
    pub from_mount_flag: bool,
    /// Docker's `nocopy`: an empty volume is not filled from the image.
    pub no_copy: bool,
}

/// The name of the anonymous volume of container `id` at `target`: 64 hex digits like
/// docker's random ones, but derived, so it can be found again from the container alone.
pub fn anonymous_name(id: &str, target: &str) -> String {
    let mut h = Sha256::new();
    h.update(id.as_bytes());
    h.update([0]);
    h.update(target.trim_end_matches('/').as_bytes());
    hex::encode(h.finalize())
}

/// docker's rule for local volume names.
pub fn check_volume_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "create {name}: \"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path"
        )))
    }
}

/// Creates the volume table, and adopts volume directories that have no record (made by a
/// berthd from before volumes were objects), so they can be listed and removed.
pub(super) fn init(
    db: &Database,
    root: &Path,
    snapshots: &dyn snapshotter::Snapshotter,
) -> Result<()> {
    // Views and mount points of an image copy-up that a crash cut short.
    if let Ok(entries) = std::fs::read_dir(root.join("volumes")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&format!(".{COPY_PREFIX}")) {
                continue;
            }
            if name.ends_with(FILL_SUFFIX) {
                // A staging dir is never a mount point: its half copy goes.
                let _ = std::fs::remove_dir_all(e.path());
            } else {
                // A view's mount point: only ever removed empty, so a mount that will not go
                // away keeps the image's files.
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    for s in snapshots.list().unwrap_or_default() {
        if s.key.starts_with(COPY_PREFIX) {
            let _ = snapshots.remove(&s.key);
        }
    }
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(VOLUMES)?;
        let dir = root.join("volumes");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if check_volume_name(&name).is_err() || t.get(name.as_str())?.is_some() {
                    continue;
                }
                let data = e.path().join("_data");
                if !data.is_dir() {
                    continue;
                }
                let rec = VolumeRecord {
                    name: name.clone(),
                    driver: LOCAL_DRIVER.into(),
                    labels: BTreeMap::new(),
                    options: BTreeMap::new(),
                    created_ns: now_ns(),
                    mountpoint: data,
                    anonymous: false,
                    container: None,
                    populated: true,
                };
                t.insert(name.as_str(), encode(&rec)?.as_slice())?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

fn encode(r: &VolumeRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| Error::internal("encode volume", e))
}

fn decode(name: &str, v: &[u8]) -> Result<VolumeRecord> {
    serde_json::from_slice(v)
        .map_err(|e| Error::Internal(format!("volume record {name} is corrupt: {e}")))
}

fn no_such_volume(name: &str) -> Error {
    Error::NotFound(format!("get {name}: no such volume"))
}

/// Bytes under `path` (not following symlinks); best effort.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|it| it.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

/// What a volume create asks for.
#[derive(Debug, Clone, Default)]
pub struct VolumeSpec {
    /// The name; empty for a generated one.
    pub name: String,
    /// The driver; empty for `local`.
    pub driver: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options.
    pub options: BTreeMap<String, String>,
}

impl Engine {
    fn volume_path(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(name).join("_data")
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUMES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The volume `name`; NotFound as docker words it.
    pub fn volume(&self, name: &str) -> Result<VolumeRecord> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUMES)?;
        match t.get(name)? {
            Some(v) => decode(name, v.value()),
            None => Err(no_such_volume(name)),
        }
    }

    fn put_volume(&self, r: &VolumeRecord) -> Result<()> {
        let json = encode(r)?;
        let tx = self.db.begin_write()?;
        tx.open_table(VOLUMES)?
            .insert(r.name.as_str(), json.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Creates a volume; an existing name gives back the existing volume, as docker does.
    pub fn create_volume(&self, spec: VolumeSpec) -> Result<VolumeRecord> {
        if !spec.driver.is_empty() && spec.driver != LOCAL_DRIVER {
            return Err(Error::NotFound(format!(
                "error looking up volume plugin {0}: plugin \"{0}\" not found",
                spec.driver
            )));
        }
        if !spec.options.is_empty() {
            // The local driver's options mount a device or tmpfs; berth does not mount them,
            // and a volume that silently ignored them would lose data where none was expected.
            return Err(Error::InvalidArgument(format!(
                "create {}: volume options ({}) are not supported by berth's local driver",
                spec.name,
                spec.options.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let name = if spec.name.is_empty() {
            hex::encode(rand::random::<[u8; 32]>())
        } else {
            check_volume_name(&spec.name)?;
            spec.name
        };
        let (rec, created) = self.ensure_volume(&name, spec.labels, None)?;
        if created {
            self.volume_event("create", &rec);
        }
        Ok(rec)
    }

    /// The record of `name`, made (with its directory) if it is not there. `owner` is the
    /// container an anonymous volume is made for. Returns whether it was made now.
    fn ensure_volume(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        owner: Option<&str>,
    ) -> Result<(VolumeRecord, bool)> {
        let _held = lock();
        self.ensure_volume_locked(name, labels, owner)
    }

    /// [`ensure_volume`](Self::ensure_volume) with [`VOLUME_LOCK`] held by the caller.
    fn ensure_volume_locked(
        &self,
        name: &str,
        mut labels: BTreeMap<String, String>,
        owner: Option<&str>,
    ) -> Result<(VolumeRecord, bool)> {
        let tx = self.db.begin_write()?;
        let made;
        let rec = {
            let mut t = tx.open_table(VOLUMES)?;
            let existing = t.get(name)?.map(|v| decode(name, v.value())).transpose()?;
            match existing {
                Some(r) => {
                    made = false;
                    r
                }
                None => {
                    if owner.is_some() {
                        labels.insert(ANONYMOUS_LABEL.into(), String::new());
                    }
                    let dir = self.volume_path(name);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| Error::internal("create volume", e))?;
                    let r = VolumeRecord {
                        name: name.to_owned(),
                        driver: LOCAL_DRIVER.into(),
                        labels,
                        options: BTreeMap::new(),
                        created_ns: now_ns(),
                        mountpoint: dir,
                        anonymous: owner.is_some(),
                        container: owner.map(str::to_owned),
                        populated: false,
                    };
                    t.insert(name, encode(&r)?.as_slice())?;
                    made = true;
                    r
                }
            }
        };
        tx.commit()?;
        if made {
            tracing::info!(volume = %name, "volume created");
        }
        Ok((rec, made))
    }

    fn volume_event(&self, action: &str, v: &VolumeRecord) {
        let attributes = BTreeMap::from([("driver".to_owned(), v.driver.clone())]);
        self.events.emit("volume", action, &v.name, attributes);
    }

    /// The ids of the containers (running or not) that use volume `name`.
    pub fn volume_users(&self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for r in self.all()? {
            // A record whose mounts no longer parse holds no volume; it must not block others.
            let uses = self
                .mount_points(&r, None)
                .unwrap_or_default()
                .iter()
                .any(|m| matches!(&m.kind, MountKind::Volume { name: n, .. } if n == name))
                || self
                    .volume(name)
                    .is_ok_and(|v| v.container.as_deref() == Some(r.id.as_str()));
            if uses {
                out.push(r.id);
            }
        }
        Ok(out)
    }

    /// The names of every volume some container uses.
    pub fn volumes_in_use(&self) -> Result<BTreeSet<String>> {
        let mut used = BTreeSet::new();
        let all = self.all()?;
        let ids: BTreeSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
        for r in &all {
            for m in self.mount_points(r, None).unwrap_or_default() {
                if let MountKind::Volume { name, .. } = m.kind {
                    used.insert(name);
                }
            }
        }
        // An anonymous volume belongs to its container even when the path it backs is not
        // worked out without the image (a removed image's VOLUMEs).
        for v in self.volumes()? {
            if v.container.as_deref().is_some_and(|c| ids.contains(c)) {
                used.insert(v.name);
            }
        }
        Ok(used)
    }

    /// Removes a volume: 409 with docker's words while a container uses it. `force` makes an
    /// absent volume no error.
    pub fn remove_volume(&self, name: &str, force: bool) -> Result<()> {
        // Users are worked out under the lock: a container create between the two would
        // otherwise lose the volume it was just given.
        let _held = lock();
        let users = self.volume_users(name)?;
        let v = match self.volume(name) {
            Ok(v) => v,
            Err(Error::NotFound(_)) if force => return Ok(()),
            Err(e) => return Err(e),
        };
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "remove {name}: volume is in use - [{}]",
                users.join(", ")
            )));
        }
        self.delete_volume_locked(&v)
    }

    fn delete_volume_locked(&self, v: &VolumeRecord) -> Result<()> {
        // The record goes first: a crash after it leaves a directory that `init` adopts again
        // rather than a record without data.
        let tx = self.db.begin_write()?;
        tx.open_table(VOLUMES)?.remove(v.name.as_str())?;
        tx.commit()?;
        let dir = self.root.join("volumes").join(&v.name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(volume = %v.name, error = %e, "remove volume dir");
        }
        tracing::info!(volume = %v.name, "volume removed");
        self.volume_event("destroy", v);
        Ok(())
    }

    /// Removes the volumes nothing uses that `keep` lets go; returns their names and the
    /// bytes they held.
    pub fn prune_volumes(
        &self,
        take: impl Fn(&VolumeRecord) -> bool,
    ) -> Result<(Vec<String>, u64)> {
        let _held = lock();
        let used = self.volumes_in_use()?;
        let mut names = Vec::new();
        let mut bytes = 0u64;
        for v in self.volumes()? {
            if used.contains(&v.name) || !take(&v) {
                continue;
            }
            let size = dir_size(&v.mountpoint);
            self.delete_volume_locked(&v)?;
            bytes = bytes.saturating_add(size);
            names.push(v.name);
        }
        Ok((names, bytes))
    }

    /// Removes the anonymous volumes of container record `r` (docker's `rm -v`, and `--rm`),
    /// after the container is gone. Failures are logged: the container is already removed.
    pub(super) fn remove_anonymous_volumes(&self, r: &Record) {
        let names: BTreeSet<String> = match self.volumes() {
            Ok(all) => all
                .into_iter()
                .filter(|v| v.container.as_deref() == Some(r.id.as_str()))
                .map(|v| v.name)
                .collect(),
            Err(e) => {
                tracing::warn!(container_id = %r.id, error = %e, "list anonymous volumes");
                return;
            }
        };
        for name in names {
            if let Err(e) = self.remove_volume(&name, true) {
                tracing::warn!(container_id = %r.id, volume = %name, error = %e, "remove anonymous volume");
            }
        }
    }

    /// Removes a container and, with `volumes`, its anonymous volumes.
    pub async fn remove_with_volumes(
        &self,
        name_or_id: &str,
        force: bool,
        volumes: bool,
    ) -> Result<()> {
        let r = self.get(name_or_id)?;
        self.remove(&r.id, force).await?;
        if volumes {
            self.remove_anonymous_volumes(&r);
        }
        Ok(())
    }

    /// The image's `VOLUME`s of a container (empty when the image is gone).
    fn image_volumes(&self, r: &Record) -> Vec<String> {
        let Ok(Some(image)) = self.images.resolve(&r.image_id) else {
            return Vec::new();
        };
        let Ok(config) = self.images.config_json(&image) else {
            return Vec::new();
        };
        config["config"]["Volumes"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every mount of container `r`, later ones replacing earlier ones at the same path (image
    /// volumes, then `Config.Volumes`, `-v`, `--mount`, as docker layers them). Pure: no
    /// record or directory is made. `image_volumes` is looked up when None.
    pub fn mount_points(
        &self,
        r: &Record,
        image_volumes: Option<Vec<String>>,
    ) -> Result<Vec<MountPoint>> {
        let mut out: Vec<MountPoint> = Vec::new();
        let mut add = |m: MountPoint| {
            out.retain(|o| o.target.trim_end_matches('/') != m.target.trim_end_matches('/'));
            out.push(m);
        };
        let anonymous = |target: &str, read_only: bool, no_copy: bool, from_mount_flag| {
            let name = anonymous_name(&r.id, target);
            MountPoint {
                source: self.volume_path(&name),
                kind: MountKind::Volume {
                    name,
                    anonymous: true,
                },
                target: target.to_owned(),
                read_only,
                from_mount_flag,
                no_copy,
            }
        };
        let image_volumes = image_volumes.unwrap_or_else(|| self.image_volumes(r));
        for target in image_volumes.iter().chain(r.config.volumes.keys()) {
            add(anonymous(target, false, false, false));
        }
        for b in &r.host_config.binds {
            let no_copy = b
                .rsplit_once(':')
                .is_some_and(|(_, o)| o.split(',').any(|o| o == "nocopy"));
            let b = translate::parse_bind(b)?;
            if b.is_host_path() {
                add(MountPoint {
                    kind: MountKind::Bind,
                    source: PathBuf::from(&b.source),
                    target: b.target,
                    read_only: b.read_only,
                    from_mount_flag: false,
                    no_copy,
                });
            } else if b.source.is_empty() {
                add(anonymous(&b.target, b.read_only, no_copy, false));
            } else {
                check_volume_name(&b.source)?;
                add(MountPoint {
                    source: self.volume_path(&b.source),
                    kind: MountKind::Volume {
                        name: b.source,
                        anonymous: false,
                    },
                    target: b.target,
                    read_only: b.read_only,
                    from_mount_flag: false,
                    no_copy,
                });
            }
        }
        for m in &r.host_config.mounts {
            match m.kind.as_str() {
                "bind" => add(MountPoint {
                    kind: MountKind::Bind,
                    source: PathBuf::from(&m.source),
                    target: m.target.clone(),
                    read_only: m.read_only,
                    from_mount_flag: true,
                    no_copy: false,
                }),
                "volume" if m.source.is_empty() => {
                    add(anonymous(&m.target, m.read_only, false, true));
                }
                "volume" => {
                    check_volume_name(&m.source)?;
                    add(MountPoint {
                        source: self.volume_path(&m.source),
                        kind: MountKind::Volume {
                            name: m.source.clone(),
                            anonymous: false,
                        },
                        target: m.target.clone(),
                        read_only: m.read_only,
                        from_mount_flag: true,
                        no_copy: false,
                    });
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "mount type {other:?} is not supported by berth"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Makes the records (and directories) of the volumes container `r` uses, at create as
    /// docker does. Start makes them again if missing: containers created by a berthd from
    /// before volumes were objects have none.
    /// The caller holds [`lock`], from before it stored `r`.
    pub(super) fn create_volumes_locked(
        &self,
        r: &Record,
        image_volumes: Vec<String>,
    ) -> Result<()> {
        for m in self.mount_points(r, Some(image_volumes))? {
            if let MountKind::Volume { name, anonymous } = &m.kind {
                let owner = anonymous.then_some(r.id.as_str());
                let (rec, made) = self.ensure_volume_locked(name, BTreeMap::new(), owner)?;
                if made {
                    self.volume_event("create", &rec);
                }
            }
        }
        Ok(())
    }

    /// The container's binds and volumes as CRI mounts: missing host directories of `-v`
    /// binds are created (docker does), volume records made if missing, and a volume that is
    /// empty on its first use filled from the image's files at its path.
    pub(super) fn volume_mounts(&self, r: &Record) -> Result<Vec<cri::Mount>> {
        let points = self.mount_points(r, None)?;
        let mut out = Vec::with_capacity(points.len());
        for m in points {
            match &m.kind {
                MountKind::Bind if m.from_mount_flag => {
                    if !m.source.exists() {
                        return Err(Error::InvalidArgument(format!(
                            "invalid mount config for type \"bind\": bind source path does not exist: {}",
                            m.source.display()
                        )));
                    }
                }
                MountKind::Bind => {
                    std::fs::create_dir_all(&m.source).map_err(|e| {
                        Error::InvalidArgument(format!(
                            "create bind source {}: {e}",
                            m.source.display()
                        ))
                    })?;
                }
                MountKind::Volume { name, anonymous } => {
                    let owner = anonymous.then_some(r.id.as_str());
                    let (rec, made) = self.ensure_volume(name, BTreeMap::new(), owner)?;
                    if made {
                        self.volume_event("create", &rec);
                    }
                    // A data dir removed behind berthd's back comes back empty rather than
                    // failing the start.
                    std::fs::create_dir_all(&rec.mountpoint)
                        .map_err(|e| Error::internal("create volume", e))?;
                    if !rec.populated {
                        let filled = if m.no_copy {
                            Ok(())
                        } else {
                            self.populate(r, &rec, &m.target)
                        };
                        match filled {
                            Ok(()) => {
                                let mut rec = rec;
                                rec.populated = true;
                                self.put_volume(&rec)?;
                            }
                            // A failed fill leaves the volume empty: it stays unmarked, so the
                            // next start tries again.
                            Err(e) => tracing::warn!(
                                volume = %rec.name,
                                error = %e,
                                "fill the volume from the image failed; it is left empty and not marked filled, so the next start tries again"
                            ),
                        }
                    }
                }
            }
            out.push(translate::mount(m.source.clone(), &m.target, m.read_only));
        }
        Ok(out)
    }

    /// Copies the image's files at `target` into the volume if the volume is empty (docker's
    /// copy-up of a fresh volume). The image is looked at through a read-only view snapshot.
    fn populate(&self, r: &Record, v: &VolumeRecord, target: &str) -> Result<()> {
        let empty = std::fs::read_dir(&v.mountpoint)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Ok(());
        }
        let Some(image) = self.images.resolve(&r.image_id)? else {
            return Ok(());
        };
        let Some(top) = image.record.chain_ids.last().map(ToString::to_string) else {
            return Ok(());
        };
        let key = format!("{COPY_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
        let mounts = self.snapshots.view(&key, Some(&top))?;
        let result = (|| -> Result<()> {
            let tmp = self.root.join("volumes").join(format!(".{key}"));
            std::fs::create_dir_all(&tmp).map_err(|e| Error::internal("create view dir", e))?;
            let copied = crate::container::mount_all(&mounts, &tmp).and_then(|()| {
                let rel = target.trim_start_matches('/');
                let src = safe_join(&tmp, rel);
                let res = match src {
                    Some(src) if src.is_dir() => {
                        let staging = self
                            .root
                            .join("volumes")
                            .join(format!(".{key}{FILL_SUFFIX}"));
                        fill_from(&src, &staging, &v.mountpoint)
                    }
                    _ => Ok(()),
                };
                let _ = nix::mount::umount2(&tmp, nix::mount::MntFlags::MNT_DETACH);
                res
            });
            let _ = std::fs::remove_dir(&tmp);
            copied
        })();
        if let Err(e) = self.snapshots.remove(&key) {
            tracing::warn!(snapshot_key = %key, error = %e, "remove volume copy view");
        }
        result
    }
}

/// `root/rel`, refusing a path whose components are `..` or whose parents are symlinks (the
/// image is not trusted to point outside its rootfs).
fn safe_join(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return None;
        }
        p.push(c);
        if std::fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    Some(p)
}

/// Fills the (empty) volume dir `dst` with the contents of `src`: copied into `staging`
/// first, then moved in, so a failed copy leaves the volume empty (and a retry possible).
fn fill_from(src: &Path, staging: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Internal(format!("{what} {}: {e}", p.display()))
    };
    std::fs::create_dir(staging).map_err(|e| io("create dir", staging, e))?;
    let moved = copy_tree(src, staging).and_then(|()| {
        for e in std::fs::read_dir(staging).map_err(|e| io("read dir", staging, e))? {
            let e = e.map_err(|e| io("read dir", staging, e))?;
            let to = dst.join(e.file_name());
            std::fs::rename(e.path(), &to).map_err(|e| io("move", &to, e))?;
        }
        let meta = std::fs::symlink_metadata(staging).map_err(|e| io("stat", staging, e))?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| io("chmod", dst, e))?;
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| io("chown", dst, e))
    });
    if let Err(e) = std::fs::remove_dir_all(staging)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %staging.display(), error = %e, "remove volume fill staging dir");
    }
    moved
}

/// Copies the contents of `src` into `dst` (which exists), keeping modes, owners and
/// symlinks; devices and sockets are skipped. Iterative, one directory open at a time: an
/// image may nest directories deeper than any stack.
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Internal(format!("{what} {}: {e}", p.display()))
    };
    let same_meta = |m: &std::fs::Metadata, to: &Path| -> Result<()> {
        if !m.file_type().is_symlink() {
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(|e| io("chmod", to, e))?;
        }
        std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid())).map_err(|e| io("chown", to, e))
    };
    let meta = std::fs::symlink_metadata(src).map_err(|e| io("stat", src, e))?;
    same_meta(&meta, dst)?;
    let mut dirs = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((src, dst)) = dirs.pop() {
        for e in std::fs::read_dir(&src).map_err(|e| io("read dir", &src, e))? {
            let e = e.map_err(|e| io("read dir", &src, e))?;
            let from = e.path();
            let to = dst.join(e.file_name());
            let m = std::fs::symlink_metadata(&from).map_err(|e| io("stat", &from, e))?;
            let ft = m.file_type();
            if ft.is_dir() {
                std::fs::create_dir(&to).map_err(|e| io("create dir", &to, e))?;
                dirs.push((from, to.clone()));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&from).map_err(|e| io("read link", &from, e))?;
                std::os::unix::fs::symlink(&target, &to).map_err(|e| io("symlink", &to, e))?;
            } else if ft.is_file() {
                std::fs::copy(&from, &to).map_err(|e| io("copy", &from, e))?;
            } else {
                continue;
            }
            same_meta(&m, &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_names_look_like_dockers_and_are_stable() {
        let a = anonymous_name("abc", "/data");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, anonymous_name("abc", "/data/"));
        assert_ne!(a, anonymous_name("abd", "/data"));
    }

    #[test]
    fn volume_names_follow_dockers_rule() {
        assert!(check_volume_name("data").is_ok());
        assert!(check_volume_name("my_vol.1-x").is_ok());
        for bad in ["", "a", "../x", "a/b", "-x"] {
            assert!(check_volume_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copy_tree_keeps_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().expect("src");
        let dst = tempfile::tempdir().expect("dst");
        std::fs::create_dir(src.path().join("d")).expect("mkdir");
        std::fs::write(src.path().join("d/f"), b"x").expect("write");
        std::fs::set_permissions(
            src.path().join("d/f"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("d/f", src.path().join("l")).expect("symlink");
        copy_tree(src.path(), dst.path()).expect("copy");
        assert_eq!(std::fs::read(dst.path().join("d/f")).expect("read"), b"x");
        let mode = std::fs::metadata(dst.path().join("d/f"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(dst.path().join("l")).expect("link"),
            PathBuf::from("d/f")
        );
        assert_eq!(dir_size(dst.path()), 1 + 3);
        assert!(safe_join(src.path(), "../etc").is_none());
        assert!(safe_join(src.path(), "l/x").is_none());
    }

    #[test]
    fn copy_tree_takes_deep_trees_on_a_small_stack() {
        let src = tempfile::tempdir().expect("src");
        let dst = tempfile::tempdir().expect("dst");
        // 1500 levels: far past what one stack frame per level fits in 256 KiB.
        let deep: PathBuf = std::iter::repeat_n("d", 1500).collect();
        std::fs::create_dir_all(src.path().join(&deep)).expect("mkdir");
        std::fs::write(src.path().join(&deep).join("f"), b"x").expect("write");
        let (s, d) = (src.path().to_owned(), dst.path().to_owned());
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || copy_tree(&s, &d))
            .expect("thread")
            .join()
            .expect("no stack overflow")
            .expect("copy");
        assert_eq!(
            std::fs::read(dst.path().join(&deep).join("f")).expect("read"),
            b"x"
        );
    }

    #[test]
    fn a_failed_fill_leaves_the_volume_empty() {
        let src = tempfile::tempdir().expect("src");
        let vol = tempfile::tempdir().expect("vol");
        std::fs::write(src.path().join("a"), b"x").expect("write");
        std::fs::create_dir(src.path().join("d")).expect("mkdir");
        let staging = vol.path().join(".stage");
        let dst = vol.path().join("_data");
        std::fs::create_dir(&dst).expect("mkdir");
        // A staging dir that cannot be made (its parent is missing) fails the fill.
        let err = fill_from(src.path(), &vol.path().join("no/stage"), &dst).expect_err("fails");
        assert!(err.to_string().contains("create dir"), "{err}");
        assert_eq!(std::fs::read_dir(&dst).expect("read").count(), 0);
        fill_from(src.path(), &staging, &dst).expect("fill");
        assert_eq!(std::fs::read(dst.join("a")).expect("read"), b"x");
        assert!(dst.join("d").is_dir());
        assert!(!staging.exists());
    }
}
