//! The object index on disk: an append-only file of fixed-size entries, one per object
//! (where its record lies in the log), beside the catalog.
//!
//! ```text
//! offset  size  field
//!      0     8  magic b"FKPTIDX\0"
//!      8     4  version, u32 little endian (1)
//!     12     4  reserved (0)
//!     16     …  entries of 64 bytes:
//!                 id (32), segment u64 LE, offset u64 LE, length u32 LE, kind u8,
//!                 3 zero bytes, check: the first 8 bytes of BLAKE3 of the 56 bytes before
//! ```
//! The catalog records which file is current (`index_gen`: the file is `index.GEN`) and how
//! many of its bytes are committed (`index_len`), in the same transaction as the segment
//! lengths and the checkpoint: bytes past `index_len` (a commit that did not finish) are not
//! part of the store and are cut at the next open for writing. A later entry for an id
//! replaces an earlier one. `gc` writes a new generation holding the live objects and
//! switches to it in its one transaction.
//!
//! Why not a table in the catalog: a checkpoint of 512 MiB adds 131,072 objects whose ids are
//! random, and inserting them into SQLite's B-tree took 0.3 s of every such commit (and
//! reading them back a third of every store opening); appending them here is one write of
//! 8 MiB, synced with the segments.

use crate::error::{Result, StoreError};
use crate::id::{ContentId, IdMap};
use crate::segment::{Loc, ObjectKind};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Magic at the start of an index file.
pub const MAGIC: [u8; 8] = *b"FKPTIDX\0";
/// Version of the index file format.
pub const VERSION: u32 = 1;
/// Length of the file header.
pub const HEADER_LEN: u64 = 16;
/// Length of one entry.
pub const ENTRY_LEN: usize = 64;

/// Path of generation `gen` of the index in store directory `dir`.
pub fn path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("index.{gen}"))
}

fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Encodes one entry.
pub fn encode(id: &ContentId, loc: &Loc) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[..32].copy_from_slice(&id.0);
    e[32..40].copy_from_slice(&loc.segment.to_le_bytes());
    e[40..48].copy_from_slice(&loc.offset.to_le_bytes());
    e[48..52].copy_from_slice(&loc.len.to_le_bytes());
    e[52] = loc.kind as u8;
    let check = blake3::hash(&e[..56]);
    e[56..].copy_from_slice(&check.as_bytes()[..8]);
    e
}

/// Decodes one entry; `None` if its check does not match or its kind is unknown.
pub fn decode(e: &[u8]) -> Option<(ContentId, Loc)> {
    if e.len() != ENTRY_LEN || blake3::hash(&e[..56]).as_bytes()[..8] != e[56..] {
        return None;
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&e[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let mut id = [0u8; 32];
    id.copy_from_slice(&e[..32]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&e[48..52]);
    Some((
        ContentId(id),
        Loc {
            segment: u64_at(32),
            offset: u64_at(40),
            len: u32::from_le_bytes(l),
            kind: ObjectKind::from_u8(e[52])?,
        },
    ))
}

/// An index file open for appending.
pub struct IndexFile {
    file: File,
    path: PathBuf,
    /// Bytes written (committed or not).
    len: u64,
    /// Bytes the catalog records as committed.
    committed: u64,
}

impl IndexFile {
    /// Creates generation `gen` in `dir` holding `entries`, synced (file and directory).
    pub fn create(dir: &Path, gen: u64, entries: &IdMap<Loc>) -> Result<IndexFile> {
        let path = path(dir, gen);
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io {
                op,
                path: p,
                source,
            }
        };
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io("create index", &path))?;
        let mut buf = Vec::with_capacity(HEADER_LEN as usize + entries.len() * ENTRY_LEN);
        buf.extend_from_slice(&header());
        for (id, loc) in entries {
            buf.extend_from_slice(&encode(id, loc));
        }
        file.write_all_at(&buf, 0)
            .map_err(io("write index", &path))?;
        file.sync_all().map_err(io("fsync index", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))?;
        let len = buf.len() as u64;
        Ok(IndexFile {
            file,
            path,
            len,
            committed: len,
        })
    }

    /// Reads generation `gen` in `dir` up to `committed` bytes. For writing (`append`), the
    /// file is opened read-write and anything past `committed` is cut.
    pub fn load(
        dir: &Path,
        gen: u64,
        committed: u64,
        append: bool,
    ) -> Result<(Option<IndexFile>, IdMap<Loc>)> {
        let path = path(dir, gen);
        let corrupt = |reason: String| StoreError::CorruptCatalog {
            path: path.clone(),
            reason,
        };
        let file = File::options()
            .read(true)
            .write(append)
            .open(&path)
            .map_err(|e| corrupt(format!("cannot open the object index: {e}")))?;
        let flen = file
            .metadata()
            .map_err(|e| corrupt(format!("stat: {e}")))?
            .len();
        if committed < HEADER_LEN
            || (committed - HEADER_LEN) % ENTRY_LEN as u64 != 0
            || flen < committed
        {
            return Err(corrupt(format!(
                "catalog records {committed} committed bytes, the file has {flen}"
            )));
        }
        let mut buf = vec![0u8; committed as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| corrupt(format!("read: {e}")))?;
        if buf[..HEADER_LEN as usize] != header() {
            return Err(corrupt("bad header".into()));
        }
        let entries = &buf[HEADER_LEN as usize..];
        let n = entries.len() / ENTRY_LEN;
        // Checking an entry is a BLAKE3 of 56 bytes (~0.2 µs): on every core for a large
        // index (a restore opens the store twice), then inserted in file order.
        let threads = crate::id::cores().clamp(1, 8);
        let per = if n < 16_384 {
            n.max(1)
        } else {
            n.div_ceil(threads)
        };
        let parts: Vec<std::result::Result<Vec<(ContentId, Loc)>, usize>> =
            std::thread::scope(|sc| {
                let handles: Vec<_> = entries
                    .chunks(per * ENTRY_LEN)
                    .enumerate()
                    .map(|(k, part)| {
                        sc.spawn(move || {
                            part.chunks_exact(ENTRY_LEN)
                                .enumerate()
                                .map(|(i, e)| decode(e).ok_or(k * per + i))
                                .collect::<std::result::Result<Vec<_>, usize>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(Err(usize::MAX)))
                    .collect()
            });
        let mut map = crate::id::id_map(n);
        for part in parts {
            let part = part.map_err(|i| corrupt(format!("entry {i} fails its check")))?;
            for (id, loc) in part {
                map.insert(id, loc);
            }
        }
        if !append {
            return Ok((None, map));
        }
        if flen > committed {
            file.set_len(committed)
                .and_then(|()| file.sync_all())
                .map_err(|e| corrupt(format!("cutting an uncommitted tail: {e}")))?;
        }
        Ok((
            Some(IndexFile {
                file,
                path,
                len: committed,
                committed,
            }),
            map,
        ))
    }

    /// Appends entries (not yet committed).
    pub fn append(&mut self, entries: &[(ContentId, Loc)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(entries.len() * ENTRY_LEN);
        for (id, loc) in entries {
            buf.extend_from_slice(&encode(id, loc));
        }
        self.file
            .write_all_at(&buf, self.len)
            .map_err(|source| StoreError::Io {
                op: "append to index",
                path: self.path.clone(),
                source,
            })?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| StoreError::Io {
            op: "fsync index",
            path: self.path.clone(),
            source,
        })
    }

    /// Bytes written, committed or not.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing but the header was written.
    pub fn is_empty(&self) -> bool {
        self.len <= HEADER_LEN
    }

    /// The catalog now records everything written as committed.
    pub fn committed(&mut self) {
        self.committed = self.len;
    }

    /// A commit failed: what it appended goes again (best effort: the catalog's length is
    /// what counts).
    pub fn rewind(&mut self) {
        if self.len != self.committed {
            let _ = self.file.set_len(self.committed);
            self.len = self.committed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_seen() {
        let id = ContentId::of(b"x");
        let loc = Loc {
            segment: 7,
            offset: 4096,
            len: 65536,
            kind: ObjectKind::Chunk,
        };
        let mut e = encode(&id, &loc);
        assert_eq!(decode(&e), Some((id, loc)));
        e[40] ^= 1;
        assert_eq!(decode(&e), None);
    }

    #[test]
    fn uncommitted_tail_is_cut_and_later_entries_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ContentId::of(b"a");
        let b = ContentId::of(b"b");
        let loc = |offset| Loc {
            segment: 1,
            offset,
            len: 10,
            kind: ObjectKind::Inode,
        };
        let mut f = IndexFile::create(dir.path(), 3, &IdMap::default()).expect("create");
        f.append(&[(a, loc(100)), (b, loc(200))]).expect("append");
        f.committed();
        let committed = f.len();
        f.append(&[(a, loc(300))]).expect("append");
        let committed2 = f.len();
        f.append(&[(b, loc(400))]).expect("append uncommitted");
        drop(f);
        let (_, m) = IndexFile::load(dir.path(), 3, committed, false).expect("load");
        assert_eq!(m.get(&a), Some(&loc(100)));
        let (f, m) = IndexFile::load(dir.path(), 3, committed2, true).expect("load");
        assert_eq!(
            m.get(&a),
            Some(&loc(300)),
            "a later entry replaces an earlier one"
        );
        assert_eq!(
            m.get(&b),
            Some(&loc(200)),
            "the uncommitted entry is not read"
        );
        assert_eq!(f.expect("appendable").len(), committed2, "the tail is cut");
        let err = IndexFile::load(dir.path(), 3, committed2 + ENTRY_LEN as u64, false);
        assert!(err.is_err(), "a committed length past the file is refused");
    }
}
