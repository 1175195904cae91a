//! The SQLite catalog: branches, checkpoints, segments and the object index.
//!
//! The catalog is the commit point of the store: a commit is one SQLite transaction (WAL,
//! `synchronous=FULL`) written after the segment data it references is durable. An fsync's
//! commit may instead be made durable by a marker in the log, its transaction left unflushed
//! ([`Durability::Intent`]; see [`crate::intent`]).

use crate::error::{Result, StoreError};
use crate::id::{ContentId, IdMap};
use crate::segment::{Loc, ObjectKind};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;

/// Version of the catalog schema; a newer one is refused on open.
pub const SCHEMA_VERSION: u32 = 1;

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments(id INTEGER PRIMARY KEY, committed_len INTEGER NOT NULL);
CREATE TABLE objects(
    hash BLOB PRIMARY KEY, segment INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, kind INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE branches(name TEXT PRIMARY KEY, head INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE checkpoints(
    cno INTEGER PRIMARY KEY, branch TEXT NOT NULL, parent INTEGER, root BLOB NOT NULL,
    name TEXT UNIQUE, time INTEGER NOT NULL, kind TEXT NOT NULL, image BLOB, note TEXT);
CREATE INDEX checkpoints_branch ON checkpoints(branch, cno);
";

/// What a checkpoint records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// A plain commit (periodic, fsync, umount); reclaimed by gc unless it is a branch head.
    Commit,
    /// A named filesystem snapshot.
    Snapshot,
    /// A named checkpoint: filesystem plus process image.
    Checkpoint,
    /// The state a rollback left, kept automatically.
    Auto,
}

impl CheckpointKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Snapshot => "snapshot",
            Self::Checkpoint => "checkpoint",
            Self::Auto => "auto",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "commit" => Self::Commit,
            "snapshot" => Self::Snapshot,
            "checkpoint" => Self::Checkpoint,
            "auto" => Self::Auto,
            _ => return None,
        })
    }
}

/// A row of the checkpoints table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checkpoint {
    pub cno: u64,
    pub branch: String,
    pub parent: Option<u64>,
    #[serde(serialize_with = "ser_id")]
    pub root: ContentId,
    pub name: Option<String>,
    /// Nanoseconds since the Unix epoch.
    pub time: i64,
    pub kind: CheckpointKind,
    #[serde(serialize_with = "ser_opt_id")]
    pub image: Option<ContentId>,
    pub note: Option<String>,
}

fn ser_id<S: serde::Serializer>(id: &ContentId, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

fn ser_opt_id<S: serde::Serializer>(
    id: &Option<ContentId>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(&id.to_hex()),
        None => s.serialize_none(),
    }
}

/// A row of the branches table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Branch {
    pub name: String,
    pub head: u64,
    pub created: i64,
}

/// A new checkpoint to record.
#[derive(Clone, Debug)]
pub struct NewCheckpoint<'a> {
    pub branch: &'a str,
    pub root: ContentId,
    pub name: Option<&'a str>,
    pub kind: CheckpointKind,
    pub image: Option<ContentId>,
    pub note: Option<&'a str>,
    /// Move the branch head to this checkpoint (commits and snapshots do; a process
    /// checkpoint records an earlier root while the branch has moved on, so it does not).
    pub advance_head: bool,
    /// Parent checkpoint (default: the branch head).
    pub parent: Option<u64>,
}

/// The open catalog.
pub struct Catalog {
    conn: Connection,
    path: std::path::PathBuf,
}

fn blob_id(b: Vec<u8>) -> rusqlite::Result<ContentId> {
    let arr: [u8; 32] = b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "content id is not 32 bytes".into(),
        )
    })?;
    Ok(ContentId(arr))
}

fn row_checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    let kind: String = r.get(6)?;
    Ok(Checkpoint {
        cno: r.get::<_, i64>(0)? as u64,
        branch: r.get(1)?,
        parent: r.get::<_, Option<i64>>(2)?.map(|p| p as u64),
        root: blob_id(r.get(3)?)?,
        name: r.get(4)?,
        time: r.get(5)?,
        kind: CheckpointKind::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                6,
                rusqlite::types::Type::Text,
                format!("unknown checkpoint kind {kind}").into(),
            )
        })?,
        image: r.get::<_, Option<Vec<u8>>>(7)?.map(blob_id).transpose()?,
        note: r.get(8)?,
    })
}

const CP_COLS: &str = "cno, branch, parent, root, name, time, kind, image, note";

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Catalog {
    /// Creates a new catalog at `path`.
    pub fn create(path: &Path, meta: &[(&str, &str)]) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::configure(&conn)?;
        let tx_conn = Catalog {
            conn,
            path: path.to_path_buf(),
        };
        tx_conn.conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} INSERT INTO meta VALUES('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
        ))?;
        for (k, v) in meta {
            tx_conn
                .conn
                .execute("INSERT INTO meta VALUES(?1, ?2)", params![k, v])?;
        }
        Ok(tx_conn)
    }

    /// Opens an existing catalog, checking its schema version.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let corrupt = |e: rusqlite::Error| StoreError::CorruptCatalog {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let conn = Connection::open_with_flags(path, flags).map_err(corrupt)?;
        if !read_only {
            Self::configure(&conn).map_err(corrupt)?;
        }
        let v: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(corrupt)?;
        let v: u32 = v
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::CorruptCatalog {
                path: path.to_path_buf(),
                reason: "no schema version".into(),
            })?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::NewerFormat {
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        let cat = Catalog {
            conn,
            path: path.to_path_buf(),
        };
        // The writer (the daemon, once per start) checks the whole database. A read-only
        // open (a restore, `log`) leaves that to it and to `verify`: SQLite still refuses
        // any page it reads that is damaged.
        if !read_only {
            cat.quick_check()?;
        }
        Ok(cat)
    }

    /// Checks every page of the database (`PRAGMA quick_check`).
    pub fn quick_check(&self) -> Result<()> {
        let corrupt = |reason: String| StoreError::CorruptCatalog {
            path: self.path.clone(),
            reason,
        };
        let ok: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt(e.to_string()))?;
        if ok != "ok" {
            return Err(corrupt(ok));
        }
        Ok(())
    }

    fn configure(conn: &Connection) -> rusqlite::Result<()> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Object ids are hashes, so a commit's inserts land on pages all over the index;
        // with SQLite's 2 MiB default cache they spilled to the WAL mid-transaction (an
        // untar spent a tenth of its CPU there). 64 MiB holds the index of about a
        // million objects.
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(())
    }

    /// Copies the WAL into the database file and empties it.
    pub fn checkpoint_wal(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// The highest segment number the catalog ever held (0: none recorded). gc records it
    /// before it forgets segments: numbers are not given twice, and recovery never takes a
    /// reclaimed segment's file, left by a crash, for one written after the last commit.
    pub fn segment_high_water(&self) -> Result<u64> {
        Ok(self
            .meta("segment_high_water")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Starts a read transaction: until [`Catalog::end_snapshot`], every query sees the
    /// catalog as it was at the first one (SQLite's WAL snapshot), however many commits a
    /// daemon makes meanwhile.
    pub fn begin_snapshot(&self) -> Result<()> {
        self.conn.execute_batch("BEGIN")?;
        Ok(())
    }

    /// Ends the read transaction of [`Catalog::begin_snapshot`].
    pub fn end_snapshot(&self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// The newest checkpoint number (0 when there is none).
    pub fn max_cno(&self) -> Result<u64> {
        let n: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(cno), 0) FROM checkpoints", [], |r| {
                    r.get(0)
                })?;
        Ok(n as u64)
    }

    /// The object index file's generation and committed length, read in one statement (a
    /// gc may switch generations between two); `None` for a store whose objects are still in
    /// the catalog (format 1).
    pub fn index_meta(&self) -> Result<Option<(u64, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE key IN ('index_gen', 'index_len')")?;
        let mut rows = st.query([])?;
        let (mut gen, mut len) = (None, None);
        while let Some(r) = rows.next()? {
            let k: String = r.get(0)?;
            let v: String = r.get(1)?;
            let v: u64 = v.parse().map_err(|_| StoreError::CorruptCatalog {
                path: self.path.clone(),
                reason: format!("meta {k} is '{v}'"),
            })?;
            if k == "index_gen" {
                gen = Some(v);
            } else {
                len = Some(v);
            }
        }
        match (gen, len) {
            (Some(g), Some(l)) => Ok(Some((g, l))),
            (None, None) => Ok(None),
            _ => Err(StoreError::CorruptCatalog {
                path: self.path.clone(),
                reason: "index_gen and index_len go together".into(),
            }),
        }
    }

    /// Moves a format-1 store's objects to index file generation `gen` (written and synced
    /// by the caller, `len` bytes): records it, empties the objects table and marks the
    /// store format 2, in one transaction.
    pub fn adopt_index_file(&mut self, gen: u64, len: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        set_index_meta(&tx, gen, len)?;
        tx.execute("DELETE FROM objects", [])?;
        tx.execute(
            "INSERT OR REPLACE INTO meta VALUES('format_version', '2')",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO meta VALUES(?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Segments and their committed lengths.
    pub fn segments(&self) -> Result<Vec<(u64, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT id, committed_len FROM segments")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The whole object index.
    pub fn load_index(&self) -> Result<IdMap<Loc>> {
        let mut st = self
            .conn
            .prepare("SELECT hash, segment, offset, length, kind FROM objects")?;
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))?;
        let mut out = crate::id::id_map(n.max(0) as usize);
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id = blob_id(r.get(0)?)?;
            let kind: i64 = r.get(4)?;
            let kind =
                ObjectKind::from_u8(kind as u8).ok_or_else(|| StoreError::CorruptCatalog {
                    path: "objects".into(),
                    reason: format!("unknown object kind {kind}"),
                })?;
            out.insert(
                id,
                Loc {
                    segment: r.get::<_, i64>(1)? as u64,
                    offset: r.get::<_, i64>(2)? as u64,
                    len: r.get::<_, i64>(3)? as u32,
                    kind,
                },
            );
        }
        Ok(out)
    }

    /// Records new objects (in the catalog's own table for a store without an index file, else
    /// the committed length of the index file), segment lengths and optionally a checkpoint,
    /// in one transaction.
    pub fn commit(
        &mut self,
        objects: &[(ContentId, Loc)],
        segments: &[(u64, u64)],
        cp: Option<&NewCheckpoint<'_>>,
        index_len: Option<u64>,
    ) -> Result<Option<u64>> {
        self.commit_as(objects, segments, cp, index_len, Durability::Full)
    }

    /// [`Catalog::commit`], durable as `durability` says. A [`Durability::Intent`] commit is
    /// written without a flush: its marker in the log is what makes it durable (see
    /// [`crate::intent`]), and it records, if no intent commit did since the last full one,
    /// where the index and the segments stood then ([`FastBase`]), for recovery to scan
    /// from. A full commit flushes, and with it every intent commit before it, and forgets
    /// that base.
    pub fn commit_as(
        &mut self,
        objects: &[(ContentId, Loc)],
        segments: &[(u64, u64)],
        cp: Option<&NewCheckpoint<'_>>,
        index_len: Option<u64>,
        durability: Durability,
    ) -> Result<Option<u64>> {
        if durability == Durability::Intent {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let r = self.commit_tx(objects, segments, cp, index_len, durability);
        if durability == Durability::Intent {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        r
    }

    fn commit_tx(
        &mut self,
        objects: &[(ContentId, Loc)],
        segments: &[(u64, u64)],
        cp: Option<&NewCheckpoint<'_>>,
        index_len: Option<u64>,
        durability: Durability,
    ) -> Result<Option<u64>> {
        let tx = self.conn.transaction()?;
        match durability {
            Durability::Full => {
                tx.execute("DELETE FROM meta WHERE key='fast_base'", [])?;
            }
            Durability::Intent => {
                let base: Option<String> = tx
                    .query_row("SELECT value FROM meta WHERE key='fast_base'", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if base.is_none() {
                    let b = FastBase::read(&tx)?;
                    tx.execute("INSERT INTO meta VALUES('fast_base', ?1)", [b.encode()])?;
                }
            }
        }
        if let Some(len) = index_len {
            tx.execute(
                "INSERT OR REPLACE INTO meta VALUES('index_len', ?1)",
                [len.to_string()],
            )?;
        }
        {
            let mut ins =
                tx.prepare_cached("INSERT OR REPLACE INTO objects VALUES(?1, ?2, ?3, ?4, ?5)")?;
            // In key order: 131,072 random 32-byte keys of a checkpoint's pages go into the
            // B-tree far faster sorted (each insert lands next to the last).
            let mut sorted: Vec<&(ContentId, Loc)> = objects.iter().collect();
            sorted.sort_unstable_by_key(|o| o.0);
            for (id, loc) in sorted {
                ins.execute(params![
                    &id.0[..],
                    loc.segment as i64,
                    loc.offset as i64,
                    loc.len as i64,
                    loc.kind as u8 as i64
                ])?;
            }
            let mut seg = tx.prepare_cached("INSERT OR REPLACE INTO segments VALUES(?1, ?2)")?;
            for (id, len) in segments {
                seg.execute(params![*id as i64, *len as i64])?;
            }
        }
        let cno = match cp {
            None => None,
            Some(cp) => Some(insert_checkpoint(&tx, cp, now_ns())?),
        };
        tx.commit()?;
        Ok(cno)
    }

    /// The base of the intent commits made since the last full commit, if any.
    pub fn fast_base(&self) -> Result<Option<FastBase>> {
        let Some(v) = self.meta("fast_base")? else {
            return Ok(None);
        };
        FastBase::decode(&v)
            .map(Some)
            .ok_or_else(|| StoreError::CorruptCatalog {
                path: self.path.clone(),
                reason: format!("meta fast_base is '{v}'"),
            })
    }

    /// Recovery's commit, in one flushed transaction: the intent commits found in the log
    /// and not in the catalog (in log order), the segments' new lengths and the index file's.
    pub fn recover_commit(
        &mut self,
        replay: &[(NewCheckpoint<'_>, i64)],
        segments: &[(u64, u64)],
        index_len: u64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM meta WHERE key='fast_base'", [])?;
        tx.execute(
            "INSERT OR REPLACE INTO meta VALUES('index_len', ?1)",
            [index_len.to_string()],
        )?;
        {
            let mut seg = tx.prepare_cached("INSERT OR REPLACE INTO segments VALUES(?1, ?2)")?;
            for (id, len) in segments {
                seg.execute(params![*id as i64, *len as i64])?;
            }
        }
        for (cp, time) in replay {
            insert_checkpoint(&tx, cp, *time)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn branches(&self) -> Result<Vec<Branch>> {
        let mut st = self
            .conn
            .prepare("SELECT name, head, created FROM branches ORDER BY created, name")?;
        let rows = st.query_map([], |r| {
            Ok(Branch {
                name: r.get(0)?,
                head: r.get::<_, i64>(1)? as u64,
                created: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn branch(&self, name: &str) -> Result<Branch> {
        self.conn
            .query_row(
                "SELECT name, head, created FROM branches WHERE name=?1",
                [name],
                |r| {
                    Ok(Branch {
                        name: r.get(0)?,
                        head: r.get::<_, i64>(1)? as u64,
                        created: r.get(2)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownBranch(name.to_string()))
    }

    /// Creates branch `name` whose head is checkpoint `cno`.
    pub fn create_branch(&mut self, name: &str, cno: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row("SELECT head FROM branches WHERE name=?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::BranchExists(name.to_string()));
        }
        tx.execute(
            "INSERT INTO branches(name, head, created) VALUES(?1, ?2, ?3)",
            params![name, cno as i64, now_ns()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes branch `name`, which must have nothing recorded on it (a branch made for a
    /// restore that failed). Its fork point stays where it is.
    pub fn drop_branch(&mut self, name: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row("SELECT head FROM branches WHERE name=?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::UnknownBranch(name.to_string()));
        }
        // Named ones, since this branch was made: a branch of the same name deleted before
        // leaves its rows, and plain commits (an unmount's) keep nothing a user named.
        let own: i64 = tx.query_row(
            "SELECT count(*) FROM checkpoints WHERE branch=?1 AND name IS NOT NULL
             AND time >= (SELECT created FROM branches WHERE name=?1)",
            [name],
            |r| r.get(0),
        )?;
        if own > 0 {
            return Err(StoreError::BranchKept {
                name: name.to_string(),
                reason: format!(
                    "{own} named snapshot{} or checkpoint{} recorded on it",
                    if own == 1 { "" } else { "s" },
                    if own == 1 { " was" } else { "s were" }
                ),
            });
        }
        tx.execute("DELETE FROM branches WHERE name=?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Takes the name off a named snapshot or checkpoint, as `git tag -d` does: it stays
    /// until gc, which drops it (and what only it reaches) unless it is a branch head.
    /// Returns its number.
    pub fn forget(&mut self, name: &str) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let cno: Option<i64> = tx
            .query_row("SELECT cno FROM checkpoints WHERE name=?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(cno) = cno else {
            return Err(StoreError::UnknownCheckpoint(name.to_string()));
        };
        tx.execute("UPDATE checkpoints SET name=NULL WHERE cno=?1", [cno])?;
        tx.commit()?;
        Ok(cno as u64)
    }

    /// Deletes branch `name`: its head and unnamed commits are gc's to drop; the named
    /// snapshots and checkpoints recorded on it stay. The last branch is kept.
    pub fn delete_branch(&mut self, name: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM branches WHERE name=?1", [name])?;
        if n == 0 {
            return Err(StoreError::UnknownBranch(name.to_string()));
        }
        let left: i64 = tx.query_row("SELECT count(*) FROM branches", [], |r| r.get(0))?;
        if left == 0 {
            return Err(StoreError::BranchKept {
                name: name.to_string(),
                reason: "it is the store's only branch".into(),
            });
        }
        tx.commit()?;
        Ok(())
    }

    /// Points branch `name` at checkpoint `cno` (a rollback).
    pub fn set_head(&mut self, name: &str, cno: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE branches SET head=?2 WHERE name=?1",
            params![name, cno as i64],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownBranch(name.to_string()));
        }
        Ok(())
    }

    pub fn checkpoint(&self, cno: u64) -> Result<Checkpoint> {
        self.conn
            .query_row(
                &format!("SELECT {CP_COLS} FROM checkpoints WHERE cno=?1"),
                [cno as i64],
                row_checkpoint,
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownCheckpoint(format!("#{cno}")))
    }

    /// Finds a checkpoint by name, or by `#CNO`.
    pub fn find(&self, name: &str) -> Result<Checkpoint> {
        if let Some(n) = name.strip_prefix('#').and_then(|n| n.parse::<u64>().ok()) {
            return self.checkpoint(n);
        }
        self.conn
            .query_row(
                &format!("SELECT {CP_COLS} FROM checkpoints WHERE name=?1"),
                [name],
                row_checkpoint,
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownCheckpoint(name.to_string()))
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {CP_COLS} FROM checkpoints ORDER BY cno"))?;
        let rows = st.query_map([], row_checkpoint)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest checkpoint of `branch` numbered `cno` or lower.
    pub fn latest_on_branch(&self, branch: &str, cno: u64) -> Result<Option<Checkpoint>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {CP_COLS} FROM checkpoints WHERE branch=?1 AND cno<=?2
                     ORDER BY cno DESC LIMIT 1"
                ),
                params![branch, cno as i64],
                row_checkpoint,
            )
            .optional()?)
    }

    /// Checkpoints that gc keeps: named ones and branch heads.
    pub fn retained(&self) -> Result<Vec<Checkpoint>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {CP_COLS} FROM checkpoints WHERE name IS NOT NULL
             OR cno IN (SELECT head FROM branches) ORDER BY cno"
        ))?;
        let rows = st.query_map([], row_checkpoint)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// gc's commit point: drop unretained checkpoints, move relocated objects, drop dead ones
    /// and forget reclaimed segments, in one transaction.
    ///
    /// `kept` are the checkpoints the mark walked. One retained now that is not among them
    /// (a branch made from an unnamed commit, a rollback's head moved to one) may need
    /// objects the sweep drops: gc refuses, with [`StoreError::ChangedDuringGc`].
    #[allow(clippy::too_many_arguments)]
    pub fn gc_commit(
        &mut self,
        kept: &std::collections::HashSet<u64>,
        moved: &[(ContentId, Loc)],
        dead: &[ContentId],
        new_segments: &[(u64, u64)],
        dropped_segments: &[u64],
        index: Option<(u64, u64)>,
    ) -> Result<()> {
        // Immediate: no other writer between the check and the deletes.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare(
                "SELECT cno FROM checkpoints WHERE name IS NOT NULL
                 OR cno IN (SELECT head FROM branches)",
            )?;
            let now = st.query_map([], |r| r.get::<_, i64>(0))?;
            for cno in now {
                if !kept.contains(&(cno? as u64)) {
                    return Err(StoreError::ChangedDuringGc);
                }
            }
        }
        // A flushed transaction: the intent commits before it are durable now, and the
        // index generation may change, so their base no longer applies.
        tx.execute("DELETE FROM meta WHERE key='fast_base'", [])?;
        tx.execute(
            "DELETE FROM checkpoints WHERE name IS NULL AND cno NOT IN (SELECT head FROM branches)",
            [],
        )?;
        let top: Option<i64> = tx.query_row("SELECT MAX(id) FROM segments", [], |r| r.get(0))?;
        let high = new_segments
            .iter()
            .map(|(id, _)| *id as i64)
            .chain(top)
            .max()
            .unwrap_or(0);
        tx.execute(
            "INSERT INTO meta VALUES('segment_high_water', ?1)
             ON CONFLICT(key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(?1 AS INTEGER))",
            [high.to_string()],
        )?;
        // With an index file the objects move by switching to its new generation.
        let (moved, dead) = match index {
            Some((gen, len)) => {
                set_index_meta(&tx, gen, len)?;
                (&[][..], &[][..])
            }
            None => (moved, dead),
        };
        // Parents of kept checkpoints may be gone now; point them at the nearest kept ancestor
        // is not tracked: the parent column is informational.
        {
            let mut up = tx.prepare_cached(
                "UPDATE objects SET segment=?2, offset=?3, length=?4, kind=?5 WHERE hash=?1",
            )?;
            for (id, loc) in moved {
                up.execute(params![
                    &id.0[..],
                    loc.segment as i64,
                    loc.offset as i64,
                    loc.len as i64,
                    loc.kind as u8 as i64
                ])?;
            }
            let mut del = tx.prepare_cached("DELETE FROM objects WHERE hash=?1")?;
            for id in dead {
                del.execute([&id.0[..]])?;
            }
            let mut seg = tx.prepare_cached("INSERT OR REPLACE INTO segments VALUES(?1, ?2)")?;
            for (id, len) in new_segments {
                seg.execute(params![*id as i64, *len as i64])?;
            }
            let mut dseg = tx.prepare_cached("DELETE FROM segments WHERE id=?1")?;
            for id in dropped_segments {
                dseg.execute([*id as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn set_index_meta(tx: &rusqlite::Transaction<'_>, gen: u64, len: u64) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO meta VALUES('index_gen', ?1)",
        [gen.to_string()],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta VALUES('index_len', ?1)",
        [len.to_string()],
    )?;
    Ok(())
}

/// How a commit is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The catalog transaction is flushed (`synchronous=FULL`).
    Full,
    /// The log holds a marker of the commit, already flushed; the catalog transaction is
    /// not flushed (`synchronous=NORMAL`), so a crash of the machine may lose it, and
    /// recovery replays it from the marker.
    Intent,
}

/// Where the index file and the segments stood at the last full commit, recorded by the
/// first intent commit after it: recovery rebuilds the index entries of everything past it
/// from the log, as the index file's unflushed tail may be lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastBase {
    /// Generation of the index file.
    pub index_gen: u64,
    /// Its committed (and flushed) length.
    pub index_len: u64,
    /// Segments and their committed lengths.
    pub segments: Vec<(u64, u64)>,
}

impl FastBase {
    fn read(tx: &rusqlite::Transaction<'_>) -> Result<FastBase> {
        let get = |k: &str| -> Result<u64> {
            let v: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key=?1", [k], |r| r.get(0))
                .optional()?;
            Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
        };
        let mut st = tx.prepare_cached("SELECT id, committed_len FROM segments ORDER BY id")?;
        let segments = st
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(FastBase {
            index_gen: get("index_gen")?,
            index_len: get("index_len")?,
            segments,
        })
    }

    /// `GEN INDEX_LEN SEG:LEN SEG:LEN …`
    fn encode(&self) -> String {
        let mut s = format!("{} {}", self.index_gen, self.index_len);
        for (id, len) in &self.segments {
            s.push_str(&format!(" {id}:{len}"));
        }
        s
    }

    fn decode(v: &str) -> Option<FastBase> {
        let mut it = v.split(' ');
        let index_gen = it.next()?.parse().ok()?;
        let index_len = it.next()?.parse().ok()?;
        let segments = it
            .map(|p| {
                let (a, b) = p.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect::<Option<_>>()?;
        Some(FastBase {
            index_gen,
            index_len,
            segments,
        })
    }
}

/// Inserts a checkpoint (its parent the branch head) and, if asked, moves the branch head
/// to it; returns its number.
fn insert_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    cp: &NewCheckpoint<'_>,
    time: i64,
) -> Result<u64> {
    let parent: Option<i64> = tx
        .query_row(
            "SELECT head FROM branches WHERE name=?1",
            [cp.branch],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(name) = cp.name {
        let exists: Option<i64> = tx
            .query_row("SELECT cno FROM checkpoints WHERE name=?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::NameExists(name.to_string()));
        }
    }
    // A number is never given twice: gc deletes the rows of collected commits, and SQLite
    // would give the highest deleted number out again (a '#16' noted earlier would then name
    // another state). The highest number given is kept in meta.
    let given: i64 = tx
        .query_row("SELECT value FROM meta WHERE key='last_cno'", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let highest: i64 = tx.query_row("SELECT COALESCE(MAX(cno), 0) FROM checkpoints", [], |r| {
        r.get(0)
    })?;
    let cno = given.max(highest) + 1;
    tx.execute(
        "INSERT OR REPLACE INTO meta VALUES('last_cno', ?1)",
        [cno.to_string()],
    )?;
    tx.execute(
        "INSERT INTO checkpoints(cno, branch, parent, root, name, time, kind, image, note)
         VALUES(?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            cp.branch,
            parent,
            &cp.root.0[..],
            cp.name,
            time,
            cp.kind.as_str(),
            cp.image.map(|i| i.0.to_vec()),
            cp.note,
            cno
        ],
    )?;
    if cp.advance_head {
        tx.execute(
            "INSERT INTO branches(name, head, created) VALUES(?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET head=excluded.head",
            params![cp.branch, cno, now_ns()],
        )?;
    }
    Ok(cno as u64)
}
