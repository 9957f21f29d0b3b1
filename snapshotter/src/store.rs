//! Snapshot metadata and directories, shared by the overlay and native snapshotters.
//!
//! Each snapshot is a directory `<root>/snapshots/<id>` (`id` from a counter that never goes
//! back) and a record `key -> {id, kind, parent}` in a redb table of the shared database.
//! A directory is built under a temp name (`new-*`), renamed to `<id>` and the snapshots dir
//! fsynced, and only then is its record committed. Removal commits the record's deletion first,
//! then renames the directory to `rm-*` and deletes it. So after a crash every record has its
//! directory, and every directory without a record is garbage that [`Store::open`] deletes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::content::{fsync_dir, random_name};
use crate::{Error, Info, Kind, Result, Usage};

/// Longest parent chain followed; only a corrupt database has more.
const MAX_DEPTH: usize = 4096;
const NEXT_ID: &str = "next_id";

/// Table names of one snapshotter (they share a database file with the rest of berthd).
#[derive(Clone, Copy)]
pub(crate) struct Tables {
    /// key -> JSON [`Record`].
    pub records: &'static str,
    /// counter name -> value.
    pub counters: &'static str,
}

/// What is stored per snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: Option<String>,
}

/// A snapshot with its directory id and the ids of its ancestors, nearest first.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub info: Info,
    pub id: u64,
    pub parents: Vec<u64>,
}

pub(crate) struct Store {
    dir: PathBuf,
    db: Arc<Database>,
    records: TableDefinition<'static, &'static str, &'static [u8]>,
    counters: TableDefinition<'static, &'static str, u64>,
}

fn not_found(key: &str) -> Error {
    Error::NotFound {
        what: "snapshot",
        key: key.to_owned(),
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| Error::Metadata(format!("record of {key:?}: {e}")))
}

fn encode(rec: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|e| Error::Metadata(format!("encode record: {e}")))
}

/// Removes a directory tree on drop, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Cleanup {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = fs::remove_dir_all(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "remove unfinished snapshot dir");
        }
    }
}

impl Store {
    /// Opens the store under `<root>/snapshots` and removes crash leftovers.
    pub fn open(root: &Path, db: Arc<Database>, tables: Tables) -> Result<Self> {
        let dir = root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io("create dir", &dir, e))?;
        let store = Store {
            dir,
            db,
            records: TableDefinition::new(tables.records),
            counters: TableDefinition::new(tables.counters),
        };
        // Create the tables, so read transactions find them.
        let txn = store.db.begin_write().map_err(Error::db("begin write"))?;
        txn.open_table(store.records)
            .map_err(Error::db("open table"))?;
        txn.open_table(store.counters)
            .map_err(Error::db("open table"))?;
        txn.commit().map_err(Error::db("commit"))?;
        store.cleanup()?;
        Ok(store)
    }

    /// `<root>/snapshots`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<root>/snapshots/<id>/fs`.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string()).join("fs")
    }

    /// `<root>/snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn all_records(&self) -> Result<HashMap<String, Record>> {
        let txn = self.db.begin_read().map_err(Error::db("begin read"))?;
        let table = txn
            .open_table(self.records)
            .map_err(Error::db("open table"))?;
        let mut out = HashMap::new();
        for row in table.iter().map_err(Error::db("iterate"))? {
            let (k, v) = row.map_err(Error::db("iterate"))?;
            let key = k.value().to_owned();
            let rec = decode(&key, v.value())?;
            out.insert(key, rec);
        }
        Ok(out)
    }

    /// Deletes directories without a record: unfinished creations, unfinished removals.
    fn cleanup(&self) -> Result<()> {
        let records = self.all_records()?;
        let ids: HashSet<u64> = records.values().map(|r| r.id).collect();
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("read dir", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read dir", &self.dir, e))?;
            let path = entry.path();
            let keep = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if keep {
                continue;
            }
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed snapshot dir left by a crash")
                }
                Err(e) => return Err(Error::io("remove leftover snapshot dir", path, e)),
            }
        }
        for (key, rec) in &records {
            if !self.snapshot_dir(rec.id).is_dir() {
                tracing::warn!(snapshot_key = %key, id = rec.id, "snapshot dir missing");
            }
        }
        Ok(())
    }

    fn get_in<T: ReadableTable<&'static str, &'static [u8]>>(
        table: &T,
        key: &str,
    ) -> Result<Option<Record>> {
        match table.get(key).map_err(Error::db("get"))? {
            Some(v) => decode(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn resolve_in<T: ReadableTable<&'static str, &'static [u8]>>(
        table: &T,
        key: &str,
    ) -> Result<Resolved> {
        let rec = Self::get_in(table, key)?.ok_or_else(|| not_found(key))?;
        let mut parents = Vec::new();
        let mut next = rec.parent.clone();
        while let Some(p) = next {
            if parents.len() >= MAX_DEPTH {
                return Err(Error::Metadata(format!(
                    "parent chain of {key:?} too long or cyclic"
                )));
            }
            let prec = Self::get_in(table, &p)?
                .ok_or_else(|| Error::Metadata(format!("parent {p:?} of {key:?} missing")))?;
            parents.push(prec.id);
            next = prec.parent;
        }
        Ok(Resolved {
            info: Info {
                key: key.to_owned(),
                parent: rec.parent,
                kind: rec.kind,
            },
            id: rec.id,
            parents,
        })
    }

    /// The snapshot `key`, or [`Error::NotFound`].
    pub fn resolve(&self, key: &str) -> Result<Resolved> {
        let txn = self.db.begin_read().map_err(Error::db("begin read"))?;
        let table = txn
            .open_table(self.records)
            .map_err(Error::db("open table"))?;
        Self::resolve_in(&table, key)
    }

    /// Checks that `parent` can be a parent: exists and is committed.
    fn check_parent<T: ReadableTable<&'static str, &'static [u8]>>(
        table: &T,
        parent: &str,
    ) -> Result<Resolved> {
        let p = Self::resolve_in(table, parent)?;
        if p.info.kind != Kind::Committed {
            return Err(Error::InvalidState {
                key: parent.to_owned(),
                reason: format!(
                    "is {:?}, only a committed snapshot can be a parent",
                    p.info.kind
                ),
            });
        }
        Ok(p)
    }

    /// The `fs` dir of the active snapshot `key`; [`Error::InvalidState`] for a view or a
    /// committed snapshot.
    pub fn active_fs_dir(&self, key: &str) -> Result<PathBuf> {
        let s = self.resolve(key)?;
        if s.info.kind != Kind::Active {
            return Err(Error::InvalidState {
                key: key.to_owned(),
                reason: format!(
                    "is {:?}, only an active snapshot has a diff dir",
                    s.info.kind
                ),
            });
        }
        Ok(self.fs_dir(s.id))
    }

    /// The `fs` dir of the committed snapshot `key`; [`Error::InvalidState`] for an active
    /// snapshot or a view.
    pub fn committed_fs_dir(&self, key: &str) -> Result<PathBuf> {
        let s = self.resolve(key)?;
        if s.info.kind != Kind::Committed {
            return Err(Error::InvalidState {
                key: key.to_owned(),
                reason: format!("is {:?}, not a committed snapshot", s.info.kind),
            });
        }
        Ok(self.fs_dir(s.id))
    }

    /// Creates snapshot `key`: `populate` fills its directory (given the parent, resolved),
    /// before any record exists; the record is committed once the directory is in place.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        populate: impl FnOnce(&Path, Option<&Resolved>) -> Result<()>,
    ) -> Result<Resolved> {
        // Checked first without the write lock, so a slow populate (native copies) does not
        // hold it; checked again below.
        let parent_res = {
            let txn = self.db.begin_read().map_err(Error::db("begin read"))?;
            let table = txn
                .open_table(self.records)
                .map_err(Error::db("open table"))?;
            if Self::get_in(&table, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_owned()));
            }
            parent.map(|p| Self::check_parent(&table, p)).transpose()?
        };

        let temp = self.dir.join(random_name("new-"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&temp)
            .map_err(|e| Error::io("create snapshot dir", &temp, e))?;
        let mut cleanup = Cleanup(Some(temp.clone()));
        populate(&temp, parent_res.as_ref())?;

        let txn = self.db.begin_write().map_err(Error::db("begin write"))?;
        let id;
        let resolved;
        {
            let mut records = txn
                .open_table(self.records)
                .map_err(Error::db("open table"))?;
            let mut counters = txn
                .open_table(self.counters)
                .map_err(Error::db("open table"))?;
            if Self::get_in(&records, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_owned()));
            }
            let parents = match parent {
                Some(p) => {
                    let now = Self::check_parent(&records, p)?;
                    if parent_res
                        .as_ref()
                        .is_some_and(|before| before.id != now.id)
                    {
                        return Err(Error::InvalidState {
                            key: p.to_owned(),
                            reason: "parent was replaced while the snapshot was prepared".into(),
                        });
                    }
                    let mut chain = vec![now.id];
                    chain.extend(now.parents);
                    chain
                }
                None => Vec::new(),
            };
            let last = counters
                .get(NEXT_ID)
                .map_err(Error::db("get"))?
                .map_or(0, |v| v.value());
            id = last + 1;
            let rec = Record {
                id,
                kind,
                parent: parent.map(str::to_owned),
            };
            records
                .insert(key, encode(&rec)?.as_slice())
                .map_err(Error::db("insert"))?;
            counters.insert(NEXT_ID, id).map_err(Error::db("insert"))?;
            resolved = Resolved {
                info: Info {
                    key: key.to_owned(),
                    parent: rec.parent,
                    kind,
                },
                id,
                parents,
            };
        }
        let final_dir = self.snapshot_dir(id);
        fs::rename(&temp, &final_dir)
            .map_err(|e| Error::io("rename snapshot dir", &final_dir, e))?;
        cleanup.0 = Some(final_dir);
        fsync_dir(&self.dir)?;
        txn.commit().map_err(Error::db("commit"))?;
        cleanup.disarm();
        Ok(resolved)
    }

    /// Turns active `key` into committed `name`, with `parent` if given (`Some(None)`: no parent).
    pub fn commit(&self, name: &str, key: &str, parent: Option<Option<&str>>) -> Result<()> {
        let txn = self.db.begin_write().map_err(Error::db("begin write"))?;
        {
            let mut records = txn
                .open_table(self.records)
                .map_err(Error::db("open table"))?;
            let rec = Self::get_in(&records, key)?.ok_or_else(|| not_found(key))?;
            if rec.kind != Kind::Active {
                return Err(Error::InvalidState {
                    key: key.to_owned(),
                    reason: format!(
                        "is {:?}, only an active snapshot can be committed",
                        rec.kind
                    ),
                });
            }
            if Self::get_in(&records, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            let parent = match parent {
                Some(Some(p)) => {
                    Self::check_parent(&records, p)?;
                    Some(p.to_owned())
                }
                Some(None) => None,
                None => rec.parent,
            };
            let committed = Record {
                id: rec.id,
                kind: Kind::Committed,
                parent,
            };
            records.remove(key).map_err(Error::db("remove"))?;
            records
                .insert(name, encode(&committed)?.as_slice())
                .map_err(Error::db("insert"))?;
        }
        txn.commit().map_err(Error::db("commit"))
    }

    /// Removes `key`'s record, then its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(Error::db("begin write"))?;
        let id = {
            let mut records = txn
                .open_table(self.records)
                .map_err(Error::db("open table"))?;
            let rec = Self::get_in(&records, key)?.ok_or_else(|| not_found(key))?;
            let mut children = Vec::new();
            for row in records.iter().map_err(Error::db("iterate"))? {
                let (k, v) = row.map_err(Error::db("iterate"))?;
                let child = decode(k.value(), v.value())?;
                if child.parent.as_deref() == Some(key) {
                    children.push(k.value().to_owned());
                }
            }
            if !children.is_empty() {
                children.sort();
                return Err(Error::InvalidState {
                    key: key.to_owned(),
                    reason: format!("has children {children:?}"),
                });
            }
            records.remove(key).map_err(Error::db("remove"))?;
            rec.id
        };
        txn.commit().map_err(Error::db("commit"))?;
        // The record is gone: from here on a failure only leaves garbage that the next open
        // deletes, so it is logged, not returned.
        let dir = self.snapshot_dir(id);
        let doomed = self.dir.join(random_name("rm-"));
        let target = match fs::rename(&dir, &doomed) {
            Ok(()) => doomed,
            Err(e) => {
                tracing::warn!(snapshot_key = %key, path = %dir.display(), error = %e, "rename removed snapshot dir");
                dir
            }
        };
        if let Err(e) = fs::remove_dir_all(&target)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(snapshot_key = %key, path = %target.display(), error = %e, "delete removed snapshot dir");
        }
        Ok(())
    }

    /// Every snapshot.
    pub fn list(&self) -> Result<Vec<Info>> {
        Ok(self
            .all_records()?
            .into_iter()
            .map(|(key, rec)| Info {
                key,
                parent: rec.parent,
                kind: rec.kind,
            })
            .collect())
    }
}

/// Usage of the tree at `root`: apparent sizes (`st_size`) and inodes, hardlinked inodes counted
/// once, symlinks not followed, other filesystems mounted inside not entered.
pub(crate) fn disk_usage(root: &Path) -> Result<Usage> {
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
    let dev = meta.dev();
    let mut usage = Usage {
        size: meta.size(),
        inodes: 1,
    };
    let mut seen: HashSet<u64> = HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // Removed while we walked.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read dir", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read dir", &dir, e))?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", entry.path(), e)),
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
                continue;
            }
            usage.size += meta.size();
            usage.inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}
