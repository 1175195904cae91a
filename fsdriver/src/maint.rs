//! Store maintenance: reachability, `verify` and `gc`.

use crate::catalog::Checkpoint;
use crate::error::{Result, StoreError};
use crate::id::ContentId;
use crate::radix;
use crate::segment::{Loc, ObjectKind};
use crate::store::Store;
use crate::tree::{self, BlockMap, BlockRef, Body, Inode, Root};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A process image object: the chunks it references (so gc and verify can follow them) and an
/// opaque body owned by the process engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageObject {
    pub version: u32,
    pub refs: Vec<ContentId>,
    pub body: Vec<u8>,
}

/// Decodes an image object.
pub fn decode_image(id: &ContentId, bytes: &[u8]) -> Result<ImageObject> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
        what: "process image",
        id: *id,
        reason: e.to_string(),
    })
}

/// Encodes an image object.
pub fn encode_image(img: &ImageObject) -> Result<Vec<u8>> {
    postcard::to_allocvec(img).map_err(|e| StoreError::Decode {
        what: "process image (encode)",
        id: ContentId([0; 32]),
        reason: e.to_string(),
    })
}

/// A corrupt or missing object found by [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub object: String,
    pub kind: &'static str,
    pub reason: String,
    /// Paths (with the checkpoint) that use the object.
    pub used_by: Vec<String>,
}

/// What [`verify`] saw.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub checkpoints: usize,
    pub objects: usize,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

struct Walker<'a> {
    store: &'a Store,
    /// Re-hash objects as they are visited (verify) or only decode them (gc).
    seen: HashSet<ContentId>,
    bad: HashMap<ContentId, (String, &'static str, BTreeSet<String>)>,
    bytes: u64,
    verify: bool,
}

impl Walker<'_> {
    /// Fetches an object for the walk; `None` if it is corrupt (recorded).
    fn fetch(
        &mut self,
        id: &ContentId,
        kind: &'static str,
        user: &dyn Fn() -> String,
    ) -> Option<std::sync::Arc<Vec<u8>>> {
        if let Some(b) = self.bad.get_mut(id) {
            b.2.insert(user());
            return None;
        }
        let r = if self.verify {
            self.store.read_verified(id).map(std::sync::Arc::new)
        } else {
            self.store.get(id)
        };
        match r {
            Ok(b) => {
                if self.seen.insert(*id) {
                    self.bytes += b.len() as u64;
                }
                Some(b)
            }
            Err(e) => {
                let mut users = BTreeSet::new();
                users.insert(user());
                self.bad.insert(*id, (e.to_string(), kind, users));
                None
            }
        }
    }

    /// Marks a chunk; re-hashes it once when verifying.
    fn chunk(&mut self, id: &ContentId, user: &dyn Fn() -> String) {
        if self.seen.contains(id) {
            return;
        }
        if !self.verify {
            if self.store.contains(id) {
                self.seen.insert(*id);
            } else {
                let mut u = BTreeSet::new();
                u.insert(user());
                self.bad.insert(*id, ("missing".into(), "chunk", u));
            }
            return;
        }
        self.fetch(id, "chunk", user);
    }

    fn checkpoint(&mut self, cp: &Checkpoint) -> Result<()> {
        let label = cp.name.clone().unwrap_or_else(|| format!("#{}", cp.cno));
        let rl = label.clone();
        if let Some(bytes) = self.fetch(&cp.root, "root", &|| format!("{rl}: filesystem root")) {
            let root: Root = match postcard::from_bytes(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    self.record(
                        cp.root,
                        "root",
                        e.to_string(),
                        format!("{label}: filesystem root"),
                    );
                    return Ok(());
                }
            };
            self.tree(&label, &root)?;
        }
        if let Some(img) = cp.image {
            let il = label.clone();
            if let Some(bytes) = self.fetch(&img, "image", &|| format!("{il}: process image")) {
                match decode_image(&img, &bytes) {
                    Ok(o) => {
                        for r in &o.refs {
                            let il = label.clone();
                            self.chunk(r, &|| format!("{il}: process memory"));
                        }
                    }
                    Err(e) => self.record(
                        img,
                        "image",
                        e.to_string(),
                        format!("{label}: process image"),
                    ),
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, id: ContentId, kind: &'static str, reason: String, user: String) {
        self.bad
            .entry(id)
            .or_insert_with(|| (reason, kind, BTreeSet::new()))
            .2
            .insert(user);
    }

    fn tree(&mut self, label: &str, root: &Root) -> Result<()> {
        // Inode table nodes.
        let mut table_ok = true;
        let mut node_ids = Vec::new();
        if let Some(r) = &root.inodes {
            let res = radix::nodes::<ContentId>(self.store, Some(r), &mut |id| {
                node_ids.push(id);
                Ok(true)
            });
            if res.is_err() {
                table_ok = false;
            }
        }
        for id in &node_ids {
            let l = label.to_string();
            if self
                .fetch(id, "inode table node", &|| format!("{l}: inode table"))
                .is_none()
            {
                table_ok = false;
            }
        }
        if !table_ok {
            return Ok(());
        }
        let mut inos = Vec::new();
        radix::walk::<ContentId>(self.store, root.inodes.as_ref(), &mut |k, v| {
            inos.push((k, *v));
            Ok(())
        })?;
        // Paths, for naming what a corrupt object breaks (best effort).
        let mut inodes: HashMap<u64, Inode> = HashMap::new();
        for (ino, id) in &inos {
            let l = label.to_string();
            let ino = *ino;
            if let Some(b) = self.fetch(id, "inode", &|| format!("{l}: inode {ino}")) {
                match postcard::from_bytes::<Inode>(&b) {
                    Ok(i) => {
                        inodes.insert(ino, i);
                    }
                    Err(e) => {
                        self.record(*id, "inode", e.to_string(), format!("{label}: inode {ino}"))
                    }
                }
            }
        }
        let paths = name_paths(&inodes);
        let name = |ino: u64| -> String {
            match paths.get(&ino) {
                Some(p) => format!("{label}:{}", p.join(", ")),
                None => format!("{label}: unlinked inode {ino}"),
            }
        };
        // Re-label inode problems with paths.
        for (ino, id) in &inos {
            if let Some(b) = self.bad.get_mut(id) {
                b.2.remove(&format!("{label}: inode {ino}"));
                b.2.insert(name(*ino));
            }
        }
        for (ino, inode) in &inodes {
            if let Body::File { blocks, .. } = &inode.body {
                let n = name(*ino);
                let entries: Vec<(u64, BlockRef)> = match blocks {
                    BlockMap::Tree(r) => {
                        let mut ids = Vec::new();
                        let _ = radix::nodes::<BlockRef>(self.store, Some(r), &mut |id| {
                            ids.push(id);
                            Ok(true)
                        });
                        let mut ok = true;
                        for id in ids {
                            if self.fetch(&id, "block map node", &|| n.clone()).is_none() {
                                ok = false;
                            }
                        }
                        if !ok {
                            continue;
                        }
                        tree::map_entries(self.store, blocks)?
                    }
                    other => tree::map_entries(self.store, other)?,
                };
                for (_, r) in entries {
                    if let BlockRef::Data { id, .. } = r {
                        self.chunk(&id, &|| n.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

fn name_paths(inodes: &HashMap<u64, Inode>) -> HashMap<u64, Vec<String>> {
    let mut out: HashMap<u64, Vec<String>> = HashMap::new();
    out.entry(tree::ROOT_INO).or_default().push("/".into());
    let mut stack = vec![(tree::ROOT_INO, String::new())];
    let mut guard = 0usize;
    while let Some((ino, path)) = stack.pop() {
        guard += 1;
        if guard > inodes.len() + 1 {
            break;
        }
        if let Some(Inode {
            body: Body::Dir { entries, .. },
            ..
        }) = inodes.get(&ino)
        {
            for (n, e) in entries {
                let p = format!("{path}/{}", String::from_utf8_lossy(n));
                out.entry(e.ino).or_default().push(p.clone());
                if e.kind == tree::FileKind::Dir {
                    stack.push((e.ino, p));
                }
            }
        }
    }
    out
}

/// Re-hashes every object reachable from a retained checkpoint.
pub fn verify(store: &Store) -> Result<VerifyReport> {
    store.catalog(|c| c.quick_check())?;
    let cps = store.catalog(|c| c.retained())?;
    let mut w = Walker {
        store,
        seen: HashSet::new(),
        bad: HashMap::new(),
        bytes: 0,
        verify: true,
    };
    for cp in &cps {
        w.checkpoint(cp)?;
    }
    let mut problems: Vec<Problem> = w
        .bad
        .into_iter()
        .map(|(id, (reason, kind, users))| Problem {
            object: id.to_hex(),
            kind,
            reason,
            used_by: users.into_iter().collect(),
        })
        .collect();
    problems.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(VerifyReport {
        checkpoints: cps.len(),
        objects: w.seen.len(),
        bytes: w.bytes,
        problems,
    })
}

/// Objects reachable from retained checkpoints (fails on any unreadable object: gc must not
/// run on a damaged store).
pub fn reachable(store: &Store) -> Result<HashSet<ContentId>> {
    let cps = store.catalog(|c| c.retained())?;
    let mut w = Walker {
        store,
        seen: HashSet::new(),
        bad: HashMap::new(),
        bytes: 0,
        verify: false,
    };
    for cp in &cps {
        w.checkpoint(cp)?;
    }
    if let Some((id, (reason, kind, _))) = w.bad.into_iter().next() {
        return Err(StoreError::CorruptObject {
            id,
            segment: 0,
            offset: 0,
            reason: format!(
                "{kind}: {reason} (run `forkpoint verify`; gc refuses a damaged store)"
            ),
        });
    }
    Ok(w.seen)
}

/// What [`gc`] did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dropped_checkpoints: usize,
    pub live_objects: usize,
    pub dead_objects: usize,
    pub segments_reclaimed: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub bytes_moved: u64,
}

/// Reclaims segments that hold unreachable data. Plain commits that are neither named nor a
/// branch head are dropped. Crash-safe: live objects are copied and made durable before one
/// catalog transaction switches to them; reclaimed files are deleted after it (or, after a
/// crash, when the store is next opened).
pub fn gc(store: &Store) -> Result<GcReport> {
    let mut report = GcReport {
        bytes_before: store.disk_usage(),
        ..Default::default()
    };
    let before = store.catalog(|c| Ok(c.checkpoints()?.len()))?;
    let retained = store.catalog(|c| c.retained())?.len();
    report.dropped_checkpoints = before - retained;
    let live = reachable(store)?;
    let index = store.index_snapshot();
    let mut seg_total: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seg_live: BTreeMap<u64, u64> = BTreeMap::new();
    let segments = store.catalog(|c| c.segments())?;
    for (id, len) in &segments {
        seg_total.insert(*id, *len);
    }
    let mut dead = Vec::new();
    for (id, loc) in &index {
        if live.contains(id) {
            *seg_live.entry(loc.segment).or_default() += loc.end() - loc.offset;
        } else {
            dead.push(*id);
        }
    }
    report.live_objects = live.len();
    report.dead_objects = dead.len();
    let active = store.with_writer(|w| Ok(w.active()))?;
    let victims: BTreeSet<u64> = seg_total
        .iter()
        .filter(|(id, _)| Some(**id) != active)
        .filter(|(id, total)| {
            let l = seg_live.get(id).copied().unwrap_or(0);
            let garbage = total.saturating_sub(l + crate::segment::SEGMENT_HEADER_LEN);
            garbage > 0 && garbage * 10 >= **total
        })
        .map(|(id, _)| *id)
        .collect();
    let mut moved: Vec<(ContentId, Loc)> = Vec::new();
    let mut new_index = index.clone();
    for d in &dead {
        new_index.remove(d);
    }
    let new_segments = store.with_writer(|w| {
        if w.has_pending() {
            return Err(StoreError::Io {
                op: "gc",
                path: store.dir().to_path_buf(),
                source: std::io::Error::other("uncommitted objects in the store; commit first"),
            });
        }
        let mut victims_sorted: Vec<(ContentId, Loc)> = index
            .iter()
            .filter(|(id, loc)| victims.contains(&loc.segment) && live.contains(*id))
            .map(|(id, loc)| (*id, *loc))
            .collect();
        victims_sorted.sort_by_key(|(_, l)| (l.segment, l.offset));
        for (id, loc) in victims_sorted {
            // Under the writer lock: safe because nothing is pending (checked above), so
            // nothing is staged and read_verified never needs the writer to flush.
            let data = store.read_verified(&id)?;
            let nl = w.relocate(id, &data, loc.kind, &victims)?;
            report.bytes_moved += data.len() as u64;
            moved.push((id, nl));
        }
        let segs = if moved.is_empty() {
            Vec::new()
        } else {
            w.sync()?
        };
        if !store.storage().commit_barrier() {
            return Err(StoreError::SimulatedCrash);
        }
        let drop: Vec<u64> = victims.iter().copied().collect();
        for (id, loc) in &moved {
            new_index.insert(*id, *loc);
        }
        // With an index file, the new index goes to a new generation of it, written and
        // synced before the transaction that switches to it.
        let next = if moved.is_empty() && dead.is_empty() {
            None
        } else {
            store.write_index_generation(&new_index)?
        };
        let index_meta = next.as_ref().map(|(gen, f)| (*gen, f.len()));
        store.catalog(|c| c.gc_commit(&moved, &dead, &segs, &drop, index_meta))?;
        if let Some((gen, f)) = next {
            store.switch_index(gen, f);
        }
        w.finish();
        Ok(segs)
    })?;
    let _ = new_segments;
    store.replace_index(new_index);
    for v in &victims {
        store.drop_segment_handle(*v);
        store
            .storage()
            .remove(*v)
            .map_err(|source| StoreError::Io {
                op: "remove reclaimed segment",
                path: store.storage().path(),
                source,
            })?;
    }
    let _ = store.storage().sync_dir();
    report.segments_reclaimed = victims.len();
    report.bytes_after = store.disk_usage();
    let _ = ObjectKind::Chunk;
    Ok(report)
}
