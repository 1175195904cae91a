//! Store maintenance: reachability, `verify` and `gc`.

use crate::catalog::Checkpoint;
use crate::error::{Result, StoreError};
use crate::id::ContentId;
use crate::radix;
use crate::segment::{Loc, ObjectKind};
use crate::store::Store;
use crate::tree::{self, BlockMap, BlockRef, Body, Inode, Root};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A process image object: the chunks it references (so gc and verify can follow them), the
/// image it is a delta against, if any (which they follow too), and an opaque body owned by
/// the process engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageObject {
    /// 1: a whole image; 2: `base` follows the references.
    pub version: u32,
    pub refs: Vec<ContentId>,
    /// The image this one is a delta against (version 2): its pages, and through its own
    /// base theirs, are part of this image.
    pub base: Option<ContentId>,
    pub body: Vec<u8>,
}

/// Image objects older than this have no `base`.
pub const IMAGE_OBJECT_DELTA: u32 = 2;

/// Decodes an image object. The encoding is postcard's for the fields in order (varint
/// version, varint count and 32 bytes per reference, from version 2 an option of a 32-byte
/// base, varint length and the body), read here by hand: serde's visitor took a call per
/// byte of the 131,072 references of a 512 MiB image. Every length is checked against what
/// is left before anything is allocated, and nothing may follow the body.
pub fn decode_image(id: &ContentId, bytes: &[u8]) -> Result<ImageObject> {
    let bad = |reason: &str| StoreError::Decode {
        what: "process image",
        id: *id,
        reason: reason.to_string(),
    };
    let mut r = Reader { bytes, at: 0 };
    let version = r
        .varint(5)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad("bad version"))?;
    if version == 0 || version > IMAGE_OBJECT_DELTA {
        return Err(bad(&format!(
            "version {version} is not supported (this forkpoint reads 1 to {IMAGE_OBJECT_DELTA})"
        )));
    }
    let refs = r
        .varint(10)
        .and_then(|n| usize::try_from(n).ok()?.checked_mul(32))
        .and_then(|len| r.take(len))
        .ok_or_else(|| bad("references truncated"))?
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            ContentId(h)
        })
        .collect();
    let base = if version >= IMAGE_OBJECT_DELTA {
        match r.take(1) {
            Some([0]) => None,
            Some([1]) => {
                let b = r.take(32).ok_or_else(|| bad("base truncated"))?;
                let mut h = [0u8; 32];
                h.copy_from_slice(b);
                Some(ContentId(h))
            }
            _ => return Err(bad("bad base")),
        }
    } else {
        None
    };
    let body = r
        .varint(10)
        .and_then(|n| r.take(usize::try_from(n).ok()?))
        .ok_or_else(|| bad("body truncated"))?
        .to_vec();
    if r.at != bytes.len() {
        return Err(bad("bytes after the body"));
    }
    Ok(ImageObject {
        version,
        refs,
        base,
        body,
    })
}

/// Reads postcard's primitives with bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// An unsigned LEB128 varint of at most `max_bytes` bytes.
    fn varint(&mut self, max_bytes: usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..max_bytes {
            let b = *self.bytes.get(self.at)?;
            self.at += 1;
            v |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next `n` bytes, if there are that many.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len())?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Some(out)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes an image object (postcard's encoding, written by hand: see [`decode_image`]).
pub fn encode_image(img: &ImageObject) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(24 + img.refs.len() * 32 + img.body.len());
    put_varint(&mut out, u64::from(img.version));
    put_varint(&mut out, img.refs.len() as u64);
    for r in &img.refs {
        out.extend_from_slice(&r.0);
    }
    if img.version >= IMAGE_OBJECT_DELTA {
        match &img.base {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.0);
            }
            None => out.push(0),
        }
    } else if img.base.is_some() {
        return Err(StoreError::Decode {
            what: "process image",
            id: ContentId([0; 32]),
            reason: format!("version {} cannot name a base image", img.version),
        });
    }
    put_varint(&mut out, img.body.len() as u64);
    out.extend_from_slice(&img.body);
    Ok(out)
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
            self.store.read_verified_full(id).map(std::sync::Arc::new)
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
        self.root(&label, cp.root)?;
        if let Some(img) = cp.image {
            let il = label.clone();
            if let Some(bytes) = self.fetch(&img, "image", &|| format!("{il}: process image")) {
                self.image(&label, img, &bytes);
            }
        }
        Ok(())
    }

    /// The filesystem tree of root object `id`.
    fn root(&mut self, label: &str, id: ContentId) -> Result<()> {
        let Some(bytes) = self.fetch(&id, "root", &|| format!("{label}: filesystem root")) else {
            return Ok(());
        };
        match postcard::from_bytes::<Root>(&bytes) {
            Ok(root) => self.tree(label, &root),
            Err(e) => {
                self.record(
                    id,
                    "root",
                    e.to_string(),
                    format!("{label}: filesystem root"),
                );
                Ok(())
            }
        }
    }

    /// The chunks of a fetched image, then those of its base images, each image walked once.
    fn image(&mut self, label: &str, id: ContentId, bytes: &[u8]) {
        let (mut id, mut bytes) = (id, std::sync::Arc::new(bytes.to_vec()));
        loop {
            let o = match decode_image(&id, &bytes) {
                Ok(o) => o,
                Err(e) => {
                    self.record(
                        id,
                        "image",
                        e.to_string(),
                        format!("{label}: process image"),
                    );
                    return;
                }
            };
            for r in &o.refs {
                self.chunk(r, &|| format!("{label}: process memory"));
            }
            let Some(base) = o.base else { return };
            if self.seen.contains(&base) {
                return; // walked with an earlier checkpoint
            }
            match self.fetch(&base, "image", &|| {
                format!("{label}: base of the process image")
            }) {
                Some(b) => (id, bytes) = (base, b),
                None => return,
            }
        }
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
    let cps = store.catalog(|c| {
        let mut cps = c.retained()?;
        // Beside a running daemon: what was committed after this store was opened is not in
        // its index (it would look missing); a branch whose head moved since is checked at
        // its newest checkpoint from before.
        if let Some(cut) = store.snapshot_cno() {
            let moved: Vec<String> = c
                .branches()?
                .into_iter()
                .filter(|b| b.head > cut)
                .map(|b| b.name)
                .collect();
            cps.retain(|cp| cp.cno <= cut);
            for b in moved {
                if let Some(cp) = c.latest_on_branch(&b, cut)? {
                    if !cps.iter().any(|x| x.cno == cp.cno) {
                        cps.push(cp);
                    }
                }
            }
        }
        Ok(cps)
    })?;
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
    // A branch whose head is not in the catalog cannot be mounted (and its files are lost to
    // it): the catalog itself is damaged.
    let dangling = store.catalog(|c| {
        Ok(c.branches()?
            .into_iter()
            .filter(|b| c.checkpoint(b.head).is_err())
            .map(|b| (b.name, b.head))
            .collect::<Vec<_>>())
    })?;
    for (name, head) in dangling {
        problems.push(Problem {
            object: format!("'{name}'"),
            kind: "branch",
            reason: format!("its head #{head} is not in the catalog"),
            used_by: Vec::new(),
        });
    }
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
    reachable_from(store, &cps, &[])
}

/// Objects reachable from checkpoints `cps` and filesystem trees `roots`.
fn reachable_from(
    store: &Store,
    cps: &[Checkpoint],
    roots: &[ContentId],
) -> Result<HashSet<ContentId>> {
    let mut w = Walker {
        store,
        seen: HashSet::new(),
        bad: HashMap::new(),
        bytes: 0,
        verify: false,
    };
    for cp in cps {
        w.checkpoint(cp)?;
    }
    for root in roots {
        w.root("a snapshot open in a mount", *root)?;
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
    gc_with(store, &mut || {})
}

/// [`gc`], calling `between` after the mark and before the sweep (for tests of what writes
/// in between do). The mark runs without holding the writer; anything that wrote, used a
/// stored object or committed since it began makes the sweep refuse (nothing is changed)
/// with [`StoreError::ChangedDuringGc`]: what the mark called unreachable may be in use.
pub fn gc_with(store: &Store, between: &mut dyn FnMut()) -> Result<GcReport> {
    gc_keeping(store, &[], between)
}

/// [`gc_with`], also keeping what the trees `roots` reach (snapshots open in a mount,
/// forgotten or not).
pub fn gc_keeping(
    store: &Store,
    roots: &[ContentId],
    between: &mut dyn FnMut(),
) -> Result<GcReport> {
    let commits_before = store.commit_count();
    let mut report = GcReport {
        bytes_before: store.disk_usage(),
        ..Default::default()
    };
    let before = store.catalog(|c| Ok(c.checkpoints()?.len()))?;
    let retained = store.catalog(|c| c.retained())?;
    report.dropped_checkpoints = before - retained.len();
    let kept: HashSet<u64> = retained.iter().map(|c| c.cno).collect();
    let live = reachable_from(store, &retained, roots)?;
    between();
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
        if w.has_pending() || w.has_refs() || w.commits() != commits_before {
            return Err(StoreError::ChangedDuringGc);
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
        store.catalog(|c| c.gc_commit(&kept, &moved, &dead, &segs, &drop, index_meta))?;
        if let Some((gen, f)) = next {
            store.switch_index(gen, f);
        }
        // Under the writer: a put right after the closure would add its entry to the index
        // this replaces, and be lost (the object then "missing from the store").
        store.replace_index(std::mem::take(&mut new_index));
        w.finish();
        Ok(segs)
    })?;
    let _ = new_segments;
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

#[cfg(test)]
mod image_codec_tests {
    use super::*;
    use proptest::prelude::*;

    /// The fields of each version, in order, for postcard.
    #[derive(Serialize)]
    struct V1 {
        version: u32,
        refs: Vec<ContentId>,
        body: Vec<u8>,
    }
    #[derive(Serialize)]
    struct V2 {
        version: u32,
        refs: Vec<ContentId>,
        base: Option<ContentId>,
        body: Vec<u8>,
    }

    #[test]
    fn unknown_versions_and_bad_bases_are_refused() {
        let id = ContentId([0; 32]);
        let img = |version, base| ImageObject {
            version,
            refs: vec![ContentId([7; 32])],
            base,
            body: vec![1, 2, 3],
        };
        assert!(encode_image(&img(1, Some(id))).is_err());
        for v in [0, 3, 99] {
            let bytes = encode_image(&img(v, None)).expect("encode");
            let e = decode_image(&id, &bytes)
                .expect_err("unknown version")
                .to_string();
            assert!(e.contains("not supported"), "{e}");
        }
        let mut bytes = encode_image(&img(2, None)).expect("encode");
        bytes[1 + 1 + 32] = 2; // the option's tag
        assert!(decode_image(&id, &bytes).is_err());
    }

    proptest! {
        /// The hand-written codec writes exactly what postcard wrote (stores hold both) and
        /// reads it back; any truncation or trailing byte is refused.
        #[test]
        fn same_bytes_as_postcard(delta in any::<bool>(), refs in proptest::collection::vec(any::<[u8; 32]>(), 0..300), base in any::<Option<[u8; 32]>>(), body in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let refs: Vec<ContentId> = refs.into_iter().map(ContentId).collect();
            let img = ImageObject { version: if delta { 2 } else { 1 }, refs: refs.clone(), base: base.filter(|_| delta).map(ContentId), body: body.clone() };
            let ours = encode_image(&img).expect("encode");
            let theirs = if delta {
                postcard::to_allocvec(&V2 { version: 2, refs, base: img.base, body })
            } else {
                postcard::to_allocvec(&V1 { version: 1, refs, body })
            }.expect("postcard");
            prop_assert_eq!(&ours, &theirs);
            let id = ContentId([0; 32]);
            let back = decode_image(&id, &ours).expect("decode");
            prop_assert_eq!(&back, &img);
            for cut in [0, 1, ours.len() / 2, ours.len() - 1] {
                prop_assert!(decode_image(&id, &ours[..cut]).is_err());
            }
            let mut longer = ours.clone();
            longer.push(0);
            prop_assert!(decode_image(&id, &longer).is_err());
        }
    }
}
