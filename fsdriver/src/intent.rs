//! Intent commits: one flush to the disk per fsync.
//!
//! Every fsync on a mount is a commit, and a full commit flushes three files one after the
//! other: the segment, the object index file and the catalog's WAL. An intent commit flushes
//! only the segment. It appends, after the objects of the commit, a *marker* record (the
//! branch and its new root) and flushes the segment; the index entries and the catalog row
//! are then written without a flush (`synchronous=NORMAL`). A kill of the daemon loses
//! nothing (the kernel has every write); a crash of the machine may lose the index file's
//! unflushed tail and the catalog's last transactions, but not the markers.
//!
//! The first intent commit after a full one records in the catalog where the index file and
//! the segments stood ([`FastBase`]), and every full commit forgets it, as its flush makes
//! every earlier transaction durable. Opening a store for writing (see [`recover`]) scans
//! the segments from the base (or, with no base, from their committed lengths) with
//! [`segment::scan`], which stops at the first record whose BLAKE3 does not match: the
//! objects up to the last marker are indexed again, the markers past the catalog's lengths
//! are replayed as commits, in log order, and the result is committed with a flush.
//!
//! Why this is sound: the log is appended in order (segment ids only grow), a marker
//! follows the objects of its commit, and a catalog transaction that is flushed flushes
//! every one before it. So the catalog after a crash holds a prefix of the commits, every
//! lost one is an intent commit whose marker lies past the prefix's segment lengths, and no
//! other change of the catalog came after them.

use crate::catalog::FastBase;
use crate::error::{Result, StoreError};
use crate::id::ContentId;
use crate::segment::{self, Loc, ObjectKind, Storage};
use std::collections::{BTreeMap, BTreeSet};

/// Magic at the start of a marker's payload.
pub const MARKER_MAGIC: [u8; 8] = *b"FKPTINT1";

/// An intent commit, as its marker records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub branch: String,
    pub root: ContentId,
    /// When it was made (nanoseconds since the epoch).
    pub time: i64,
}

/// Encodes a marker's payload: magic, time (i64 LE), root (32), branch (UTF-8, the rest).
pub fn encode(m: &Marker) -> Vec<u8> {
    let mut v = Vec::with_capacity(48 + m.branch.len());
    v.extend_from_slice(&MARKER_MAGIC);
    v.extend_from_slice(&m.time.to_le_bytes());
    v.extend_from_slice(&m.root.0);
    v.extend_from_slice(m.branch.as_bytes());
    v
}

/// Decodes a marker's payload.
pub fn decode(p: &[u8]) -> Option<Marker> {
    if p.len() < 48 || p[..8] != MARKER_MAGIC {
        return None;
    }
    let time = i64::from_le_bytes(p[8..16].try_into().ok()?);
    let mut root = [0u8; 32];
    root.copy_from_slice(&p[16..48]);
    let branch = std::str::from_utf8(&p[48..]).ok()?.to_string();
    if branch.is_empty() {
        return None;
    }
    Some(Marker {
        branch,
        root: ContentId(root),
        time,
    })
}

/// What recovery found in the log past the catalog.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Every segment of the store and its committed length after recovery.
    pub segments: BTreeMap<u64, u64>,
    /// The index file's flushed length: cut there, then `entries` appended.
    pub index_len: u64,
    /// Objects past the base, to index again.
    pub entries: Vec<(ContentId, Loc)>,
    /// Intent commits the catalog lost, in log order.
    pub replay: Vec<Marker>,
    /// Segments whose committed length grew (to flush before the catalog records them).
    pub grown: Vec<u64>,
}

/// Scans the log past the catalog for intent commits. `committed` is the catalog's segment
/// lengths, `index` its index file (generation, length), `base` its [`FastBase`]. Returns
/// `None` when there is nothing to do (no base, no marker past the committed lengths).
pub fn recover(
    storage: &dyn Storage,
    committed: &[(u64, u64)],
    on_disk: &[u64],
    index: (u64, u64),
    base: Option<FastBase>,
    high_water: u64,
) -> Result<Option<Recovery>> {
    let committed: BTreeMap<u64, u64> = committed.iter().copied().collect();
    let base = base.filter(|b| {
        let ok = b.index_gen == index.0 && b.index_len <= index.1;
        if !ok {
            log::warn!("ignoring an intent base of another index generation");
        }
        ok
    });
    let has_base = base.is_some();
    let (start, index_len): (BTreeMap<u64, u64>, u64) = match base {
        Some(b) => (b.segments.into_iter().collect(), b.index_len),
        None => (committed.clone(), index.1),
    };
    // Segments past the last one the start knows were rolled to since: scanned whole. Not
    // one numbered at or below the highest the catalog ever held: that one is a segment gc
    // reclaimed whose file a crash left behind, and its markers are long settled.
    let known_max = start
        .keys()
        .max()
        .copied()
        .max((high_water > 0).then_some(high_water));
    let ids: BTreeSet<u64> = committed.keys().chain(on_disk).copied().collect();
    // (segment, its file, records, valid end)
    let mut scanned = Vec::new();
    for id in ids {
        let from = match start.get(&id) {
            Some(&l) => l,
            None if known_max.is_none_or(|m| id > m) => segment::SEGMENT_HEADER_LEN,
            None => match committed.get(&id) {
                Some(&l) => l,
                None => continue,
            },
        };
        let Ok(file) = storage.open(id, false) else {
            continue;
        };
        let seg_path = storage.path();
        if !committed.contains_key(&id)
            && segment::check_segment_header(&*file, id, &seg_path).is_err()
        {
            continue;
        }
        let (records, end) = segment::scan(&*file, id, from).map_err(|source| StoreError::Io {
            op: "scan segment",
            path: seg_path.join(format!("{id:016x}.seg")),
            source,
        })?;
        scanned.push((id, file, records, end));
    }
    let last_marker = scanned
        .iter()
        .flat_map(|(_, _, recs, _)| recs.iter())
        .filter(|(_, l)| l.kind == ObjectKind::Marker)
        .map(|(_, l)| (l.segment, l.end()))
        .next_back();
    let clen = |id: u64| committed.get(&id).copied().unwrap_or(0);
    let replay_pending = last_marker.is_some_and(|(s, e)| e > clen(s));
    if !has_base && !replay_pending {
        return Ok(None);
    }
    let mut rec = Recovery {
        segments: committed.clone(),
        index_len,
        ..Recovery::default()
    };
    for (id, file, records, end) in &scanned {
        let new_len = match last_marker {
            Some((m, _)) if *id < m => clen(*id).max(*end),
            Some((m, e)) if *id == m => clen(*id).max(e),
            _ => clen(*id),
        };
        if new_len == 0 {
            continue;
        }
        if new_len > clen(*id) {
            rec.grown.push(*id);
        }
        rec.segments.insert(*id, new_len);
        for (oid, loc) in records {
            if loc.end() > new_len {
                break;
            }
            if loc.kind == ObjectKind::Marker {
                if loc.end() > clen(*id) {
                    let mut payload = vec![0u8; loc.len as usize];
                    file.read_exact_at(&mut payload, loc.offset + segment::RECORD_HEADER_LEN)
                        .map_err(|source| StoreError::Io {
                            op: "read marker",
                            path: storage.path(),
                            source,
                        })?;
                    match decode(&payload) {
                        Some(m) => rec.replay.push(m),
                        None => log::warn!(
                            "segment {id}: a marker at {} does not decode; skipped",
                            loc.offset
                        ),
                    }
                }
            } else {
                rec.entries.push((*oid, *loc));
            }
        }
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_garbage_is_refused() {
        let m = Marker {
            branch: "exp-1".into(),
            root: ContentId::of(b"root"),
            time: 1_234_567_890,
        };
        let p = encode(&m);
        assert_eq!(decode(&p), Some(m));
        assert_eq!(decode(&p[..47]), None);
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&p[..48]), None, "a marker names its branch");
    }
}
