//! The filesystem logic of one mounted branch, apart from FUSE.
//!
//! Every operation returns `Result<T, FsError>`; the FUSE adapter (`fuse.rs`) only maps
//! errors to errno and replies, so everything here is testable without a mount.
//!
//! State: the branch's last committed [`Root`] plus, in memory, the inodes that were loaded
//! and which of them are dirty. File writes go to per-block buffers; when the buffers grow
//! large they are written to the log as chunks (not yet committed). A commit writes the dirty
//! inodes, the radix nodes above them and a new root, then records a checkpoint in one catalog
//! transaction after the segment data is durable.
//!
//! Inode numbers: the live tree uses the store's inode numbers (below 2^40). The read-only
//! `.forkpoint` tree uses numbers with bit 63 set; files inside a snapshot are
//! `SNAP_BIT | slot << 40 | ino`.

use crate::catalog::{CheckpointKind, NewCheckpoint};
use crate::error::StoreError;
use crate::id::ContentId;
use crate::radix;
use crate::segment::ObjectKind;
use crate::store::Store;
use crate::tree::{
    self, Attr, BlockMap, BlockRef, Body, DirEnt, FileKind, Inode, LowerRef, Root, Time, TreeView,
    BLOCK, ROOT_INO,
};
use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Name of the hidden control directory at the root of every mount.
pub const META_NAME: &[u8] = b".forkpoint";
const META_BIT: u64 = 1 << 63;
const META_INO: u64 = META_BIT | 1;
const SNAPS_INO: u64 = META_BIT | 2;

/// May the kernel keep what a lookup in `parent` answered? Not for the snapshots' names:
/// a name can be forgotten and given to another snapshot at any time.
pub fn entry_may_be_cached(parent: u64) -> bool {
    parent != SNAPS_INO
}
/// `.forkpoint/inodes/`: every live inode by number, unlinked-but-kept ones included.
const INODES_INO: u64 = META_BIT | 3;
const SNAP_BIT: u64 = 1 << 62;
const SLOT_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << SLOT_SHIFT) - 1;
/// Longest file name.
pub const NAME_MAX: usize = 255;
/// Largest file size.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Dirty file data kept in memory before it is written to the log.
const DIRTY_LIMIT: usize = 64 << 20;
/// Committed blocks kept in memory (by all mounts of the process), so that a partial write to
/// a block written recently does not read it back from the log.
const CLEAN_LIMIT: usize = 64 << 20;
static CLEAN_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn clean_sub(n: usize) {
    CLEAN_BYTES.fetch_sub(n * BLOCK as usize, std::sync::atomic::Ordering::Relaxed);
}

/// Errors of filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file name too long")]
    NameTooLong,
    #[error("read-only (snapshots cannot be changed)")]
    ReadOnly,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("operation not supported")]
    NotSupported,
    #[error("operation not permitted")]
    Perm,
    #[error("bad file handle")]
    BadHandle,
    #[error("file too large")]
    TooBig,
    #[error("no data past offset")]
    NoData,
    #[error("lower file {0} changed since the store was created")]
    LowerChanged(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of filesystem operations.
pub type FsResult<T> = Result<T, FsError>;

/// What `stat` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ino: u64,
    pub attr: Attr,
}

/// Where [`Fs::read_to`] puts what it reads.
enum Out<'a> {
    /// The caller's buffer, of the size asked for, not zeroed.
    Fill(&'a mut [u8]),
    /// A vector grown to what the file has.
    Grow(&'a mut Vec<u8>),
}

/// Attribute changes for `setattr`.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Time>,
}

/// A timestamp to set.
#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(Time),
}

/// The caller of an operation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A directory listing entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

/// Something the kernel may cache that a rollback makes stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// The entry `name` of directory `ino`.
    Entry(u64, Vec<u8>),
    /// Attributes and pages of an inode.
    Inode(u64),
}

/// Rename flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

#[derive(Debug)]
struct MemFile {
    lower: Option<LowerRef>,
    base: BlockMap,
    /// Block changes since `base` (`None`: removed from the map).
    changes: BTreeMap<u64, Option<BlockRef>>,
    /// Blocks being written, at most `BLOCK` bytes each; bytes past a block's end read as
    /// zeros (a small file's block holds only its own bytes: see `block_put`).
    dirty: BTreeMap<u64, Vec<u8>>,
    /// Blocks equal to what the map says, kept from recent writes (counted in CLEAN_BYTES);
    /// short like dirty ones.
    clean: BTreeMap<u64, Vec<u8>>,
    /// Blocks handed to a background spill (`Spill`), read like dirty ones until it lands. A
    /// newer write makes a dirty copy; a truncate or hole punch drops them (the spill's
    /// result then lands for nothing: it only takes a block still here, the same `Arc`).
    sealed: BTreeMap<u64, Arc<Vec<u8>>>,
}

impl MemFile {
    /// What block `idx` becomes in the map once stored: its chunk `id` (`len` bytes), or,
    /// all zeros (no id), a zero block where the lower file or the map had something to
    /// cover, else nothing.
    fn stored_ref(
        &self,
        store: &Store,
        idx: u64,
        id: Option<ContentId>,
        len: usize,
    ) -> crate::error::Result<Option<BlockRef>> {
        if let Some(id) = id {
            return Ok(Some(BlockRef::Data {
                id,
                len: len as u32,
            }));
        }
        let lower_covers = self.lower.as_ref().is_some_and(|l| idx * BLOCK < l.len);
        if lower_covers || tree::map_get(store, &self.base, idx)?.is_some() {
            Ok(Some(BlockRef::Zero))
        } else {
            Ok(None)
        }
    }

    /// Keeps a stored block's bytes in the clean cache while it has room.
    fn keep_clean(&mut self, idx: u64, buf: Vec<u8>) {
        let kept = CLEAN_BYTES.fetch_add(BLOCK as usize, std::sync::atomic::Ordering::Relaxed);
        if kept + BLOCK as usize <= CLEAN_LIMIT {
            self.clean.insert(idx, buf);
        } else {
            clean_sub(1);
        }
    }

    fn take_clean(&mut self, idx: u64) -> Option<Vec<u8>> {
        let b = self.clean.remove(&idx)?;
        clean_sub(1);
        Some(b)
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        clean_sub(self.clean.len());
    }
}

#[derive(Debug)]
enum MemBody {
    File(Box<MemFile>),
    Dir {
        parent: u64,
        entries: BTreeMap<Vec<u8>, DirEnt>,
    },
    Symlink(Vec<u8>),
    Special,
}

#[derive(Debug)]
struct Node {
    attr: Attr,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    body: MemBody,
}

impl Node {
    fn from_inode(i: Inode) -> Node {
        let body = match i.body {
            Body::File { lower, blocks } => MemBody::File(Box::new(MemFile {
                lower,
                base: blocks,
                changes: BTreeMap::new(),
                dirty: BTreeMap::new(),
                clean: BTreeMap::new(),
                sealed: BTreeMap::new(),
            })),
            Body::Dir { parent, entries } => MemBody::Dir { parent, entries },
            Body::Symlink { target } => MemBody::Symlink(target),
            Body::Special => MemBody::Special,
        };
        Node {
            attr: i.attr,
            xattrs: i.xattrs,
            body,
        }
    }
}

struct Handle {
    ino: u64,
    /// Directory listing taken at opendir (or rewind).
    listing: Option<Vec<DirEntry>>,
}

struct Snap {
    name: String,
    /// The checkpoint the name stood for when the slot was made: a name forgotten and
    /// given again gets a slot of its own.
    cno: u64,
    view: TreeView,
}

struct State {
    branch: String,
    head: u64,
    base: Root,
    next_ino: u64,
    nodes: HashMap<u64, Node>,
    dirty: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    open: HashMap<u64, u32>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    dirty_bytes: usize,
    /// The spill running in the background, if any (`State::start_spill`).
    spilling: Option<std::thread::JoinHandle<Spilled>>,
    /// Dirty bytes held before a spill starts (`DIRTY_LIMIT`, smaller in tests).
    spill_limit: usize,
    snaps: Vec<Snap>,
    /// Names the kernel may cache as absent (negative dentries), so that a rollback can
    /// invalidate them; `None` once too many were handed out (then none are, until the next
    /// checkout).
    negative: Option<HashSet<(u64, Vec<u8>)>>,
    /// Inodes looked up under `.forkpoint/inodes/` since the last checkout: the kernel may
    /// keep them (and their pages) under that name after their last close, so a rollback
    /// must tell it to forget them.
    by_number: HashSet<u64>,
}

/// How many negative entries the kernel may cache between two checkouts.
const NEGATIVE_LIMIT: usize = 1 << 16;

/// One branch of a store, served as a filesystem.
pub struct Fs {
    store: Arc<Store>,
    state: Mutex<State>,
    /// Serializes commits against each other (not against reads).
    commit_lock: Mutex<()>,
    /// Checkouts so far, bumped under the state lock: a lookup that raced with one must not
    /// be cached as absent. Read without the lock on every lookup.
    checkouts: std::sync::atomic::AtomicU64,
}

impl Drop for Fs {
    fn drop(&mut self) {
        // A spill in flight holds the store: it must end before the store can be opened
        // again (what it stored is not committed, like everything else not committed).
        if let Some(h) = self.lock().spilling.take() {
            let _ = h.join();
        }
    }
}

fn now() -> Time {
    Time::now()
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid("bad file name"));
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Fs {
    /// Serves branch `branch` (created from `main`'s head if `create` and missing).
    pub fn new(store: Arc<Store>, branch: &str) -> FsResult<Fs> {
        Self::new_with(store, branch, true)
    }

    /// Serves `branch`; with `purge_orphans` false, unlinked inodes that were open at the last
    /// commit stay reachable (a restore reopens them by number).
    pub fn new_with(store: Arc<Store>, branch: &str, purge_orphans: bool) -> FsResult<Fs> {
        let cp = store.head(branch)?;
        let root = tree::get_root(&store, &cp.root)?;
        let fs = Fs {
            store,
            state: Mutex::new(State {
                branch: branch.to_string(),
                head: cp.cno,
                next_ino: root.next_ino,
                base: root,
                nodes: HashMap::new(),
                dirty: BTreeSet::new(),
                removed: BTreeSet::new(),
                open: HashMap::new(),
                handles: HashMap::new(),
                next_fh: 1,
                dirty_bytes: 0,
                spilling: None,
                spill_limit: DIRTY_LIMIT,
                snaps: Vec::new(),
                negative: Some(HashSet::new()),
                by_number: HashSet::new(),
            }),
            commit_lock: Mutex::new(()),
            checkouts: std::sync::atomic::AtomicU64::new(0),
        };
        if purge_orphans {
            fs.purge_orphans()?;
        }
        Ok(fs)
    }

    /// Sets how many written bytes are held before a spill to the log starts (64 MiB). For
    /// tests, which set it small so that spills run beside every kind of request.
    #[doc(hidden)]
    pub fn set_spill_limit(&self, bytes: usize) {
        self.lock().spill_limit = bytes;
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The branch served.
    pub fn branch(&self) -> String {
        self.lock().branch.clone()
    }

    /// The checkpoint number of the last commit.
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Orphans of an earlier session have no open handles now: drop them.
    fn purge_orphans(&self) -> FsResult<()> {
        let mut st = self.lock();
        let orphans = std::mem::take(&mut st.base.orphans);
        for ino in orphans {
            if st.node(&self.store, ino).is_ok() {
                st.nodes.remove(&ino);
                st.removed.insert(ino);
                st.dirty.insert(ino);
            }
        }
        Ok(())
    }

    // ----- lookups -------------------------------------------------------------------------

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Stat> {
        if parent & META_BIT != 0 || parent & SNAP_BIT != 0 {
            return self.meta_lookup(parent, name);
        }
        if parent == ROOT_INO && name == META_NAME {
            return self.meta_getattr(META_INO);
        }
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let mut st = self.lock();
        let ino = {
            let p = st.node(&self.store, parent)?;
            match &p.body {
                MemBody::Dir {
                    entries,
                    parent: pp,
                } => {
                    if name == b"." {
                        parent
                    } else if name == b".." {
                        *pp
                    } else {
                        entries.get(name).ok_or(FsError::NotFound)?.ino
                    }
                }
                _ => return Err(FsError::NotDir),
            }
        };
        let attr = st.node(&self.store, ino)?.attr.clone();
        Ok(Stat { ino, attr })
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Stat> {
        if ino & (META_BIT | SNAP_BIT) != 0 {
            return self.meta_getattr(ino);
        }
        let mut st = self.lock();
        let attr = st.node(&self.store, ino)?.attr.clone();
        Ok(Stat { ino, attr })
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        if ino & SNAP_BIT != 0 {
            let (view, tino) = self.snap_of(ino)?;
            return match self.snap_inode(&view, tino)?.body {
                Body::Symlink { target } => Ok(target),
                _ => Err(FsError::Invalid("not a symlink")),
            };
        }
        if ino & META_BIT != 0 {
            return Err(FsError::Invalid("not a symlink"));
        }
        let mut st = self.lock();
        match &st.node(&self.store, ino)?.body {
            MemBody::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::Invalid("not a symlink")),
        }
    }

    // ----- creation ------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        rdev: u64,
        caller: Caller,
        body: MemBody,
    ) -> FsResult<Stat> {
        ro(parent)?;
        check_name(name)?;
        if parent == ROOT_INO && name == META_NAME {
            return Err(FsError::Exists);
        }
        let mut st = self.lock();
        let (pgid, psgid) = {
            let p = st.node(&self.store, parent)?;
            let MemBody::Dir { entries, .. } = &p.body else {
                return Err(FsError::NotDir);
            };
            if entries.contains_key(name) {
                return Err(FsError::Exists);
            }
            (p.attr.gid, p.attr.perm & libc::S_ISGID != 0)
        };
        let ino = st.next_ino;
        st.next_ino += 1;
        let mut attr = Attr::new(kind, mode, caller.uid, caller.gid);
        attr.rdev = rdev;
        if psgid {
            attr.gid = pgid;
            if kind == FileKind::Dir {
                attr.perm |= libc::S_ISGID;
            }
        }
        let body = match body {
            MemBody::Dir { entries, .. } => MemBody::Dir { parent, entries },
            b => b,
        };
        if kind == FileKind::Dir {
            attr.nlink = 2;
        }
        if let MemBody::Symlink(t) = &body {
            attr.size = t.len() as u64;
        }
        let t = now();
        {
            let p = st.node_mut(&self.store, parent)?;
            if let MemBody::Dir { entries, .. } = &mut p.body {
                entries.insert(name.to_vec(), DirEnt { ino, kind });
            }
            if kind == FileKind::Dir {
                p.attr.nlink += 1;
            }
            p.attr.mtime = t;
            p.attr.ctime = t;
        }
        st.nodes.insert(
            ino,
            Node {
                attr: attr.clone(),
                xattrs: BTreeMap::new(),
                body,
            },
        );
        st.dirty.insert(ino);
        Ok(Stat { ino, attr })
    }

    /// Creates a regular file, device, fifo or socket.
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        caller: Caller,
    ) -> FsResult<Stat> {
        let kind = FileKind::from_mode(mode).unwrap_or(FileKind::File);
        let body = match kind {
            FileKind::File => MemBody::File(Box::new(MemFile {
                lower: None,
                base: BlockMap::Empty,
                changes: BTreeMap::new(),
                dirty: BTreeMap::new(),
                clean: BTreeMap::new(),
                sealed: BTreeMap::new(),
            })),
            FileKind::Dir | FileKind::Symlink => {
                return Err(FsError::Invalid("mknod of dir/symlink"))
            }
            _ => MemBody::Special,
        };
        let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            rdev
        } else {
            0
        };
        self.create_node(parent, name, kind, mode, rdev, caller, body)
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Stat> {
        self.create_node(
            parent,
            name,
            FileKind::Dir,
            mode,
            0,
            caller,
            MemBody::Dir {
                parent,
                entries: BTreeMap::new(),
            },
        )
    }

    /// Creates a symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Stat> {
        if target.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        self.create_node(
            parent,
            name,
            FileKind::Symlink,
            0o777,
            0,
            caller,
            MemBody::Symlink(target.to_vec()),
        )
    }

    /// Creates a hard link to `ino` as `name` in `parent`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Stat> {
        ro(parent)?;
        ro(ino)?;
        check_name(name)?;
        if parent == ROOT_INO && name == META_NAME {
            return Err(FsError::Exists);
        }
        let mut st = self.lock();
        let kind = st.node(&self.store, ino)?.attr.kind;
        if kind == FileKind::Dir {
            return Err(FsError::Perm);
        }
        {
            let p = st.node(&self.store, parent)?;
            let MemBody::Dir { entries, .. } = &p.body else {
                return Err(FsError::NotDir);
            };
            if entries.contains_key(name) {
                return Err(FsError::Exists);
            }
        }
        let t = now();
        {
            let p = st.node_mut(&self.store, parent)?;
            if let MemBody::Dir { entries, .. } = &mut p.body {
                entries.insert(name.to_vec(), DirEnt { ino, kind });
            }
            p.attr.mtime = t;
            p.attr.ctime = t;
        }
        let n = st.node_mut(&self.store, ino)?;
        n.attr.nlink += 1;
        n.attr.ctime = t;
        let attr = n.attr.clone();
        Ok(Stat { ino, attr })
    }

    // ----- removal -------------------------------------------------------------------------

    /// Removes a non-directory.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        ro(parent)?;
        if parent == ROOT_INO && name == META_NAME {
            return Err(FsError::Perm);
        }
        let mut st = self.lock();
        let ent = st.entry(&self.store, parent, name)?;
        if ent.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        st.remove_entry(&self.store, parent, name)?;
        st.drop_link(&self.store, ent.ino)?;
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        ro(parent)?;
        if name == b"." {
            return Err(FsError::Invalid("rmdir ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        if parent == ROOT_INO && name == META_NAME {
            return Err(FsError::Perm);
        }
        let mut st = self.lock();
        let ent = st.entry(&self.store, parent, name)?;
        if ent.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if let MemBody::Dir { entries, .. } = &st.node(&self.store, ent.ino)?.body {
            if !entries.is_empty() {
                return Err(FsError::NotEmpty);
            }
        }
        st.remove_entry(&self.store, parent, name)?;
        st.node_mut(&self.store, parent)?.attr.nlink -= 1;
        let n = st.node_mut(&self.store, ent.ino)?;
        n.attr.nlink = 0;
        n.attr.ctime = now();
        if st.open.get(&ent.ino).copied().unwrap_or(0) == 0 {
            st.forget_inode(ent.ino);
        }
        Ok(())
    }

    /// Renames `parent/name` to `newparent/newname`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        ro(parent)?;
        ro(newparent)?;
        check_name(newname)?;
        if name == b"." || name == b".." {
            return Err(FsError::Invalid("rename of . or .."));
        }
        if (parent == ROOT_INO && name == META_NAME)
            || (newparent == ROOT_INO && newname == META_NAME)
        {
            return Err(FsError::Perm);
        }
        if flags.noreplace && flags.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        let mut st = self.lock();
        let src = st.entry(&self.store, parent, name)?;
        if !matches!(st.node(&self.store, newparent)?.body, MemBody::Dir { .. }) {
            return Err(FsError::NotDir);
        }
        let dst = match st.entry(&self.store, newparent, newname) {
            Ok(e) => Some(e),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        // A directory cannot move into itself or below itself.
        if src.kind == FileKind::Dir && st.is_ancestor(&self.store, src.ino, newparent)? {
            return Err(FsError::Invalid("directory moved below itself"));
        }
        if flags.exchange {
            let dst = dst.ok_or(FsError::NotFound)?;
            if dst.kind == FileKind::Dir && st.is_ancestor(&self.store, dst.ino, parent)? {
                return Err(FsError::Invalid("directory moved below itself"));
            }
            if src.ino == dst.ino {
                return Ok(());
            }
            let t = now();
            st.set_entry(&self.store, parent, name, dst)?;
            st.set_entry(&self.store, newparent, newname, src)?;
            if parent != newparent {
                if src.kind == FileKind::Dir {
                    st.reparent(&self.store, src.ino, newparent)?;
                    st.node_mut(&self.store, parent)?.attr.nlink -= 1;
                    st.node_mut(&self.store, newparent)?.attr.nlink += 1;
                }
                if dst.kind == FileKind::Dir {
                    st.reparent(&self.store, dst.ino, parent)?;
                    st.node_mut(&self.store, newparent)?.attr.nlink -= 1;
                    st.node_mut(&self.store, parent)?.attr.nlink += 1;
                }
            }
            for i in [src.ino, dst.ino] {
                st.node_mut(&self.store, i)?.attr.ctime = t;
            }
            for p in [parent, newparent] {
                let n = st.node_mut(&self.store, p)?;
                n.attr.mtime = t;
                n.attr.ctime = t;
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if dst.ino == src.ino {
                return Ok(());
            }
            match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    if let MemBody::Dir { entries, .. } = &st.node(&self.store, dst.ino)?.body {
                        if !entries.is_empty() {
                            return Err(FsError::NotEmpty);
                        }
                    }
                }
                (false, false) => {}
            }
            st.remove_entry(&self.store, newparent, newname)?;
            if dst.kind == FileKind::Dir {
                st.node_mut(&self.store, newparent)?.attr.nlink -= 1;
                st.node_mut(&self.store, dst.ino)?.attr.nlink = 0;
                if st.open.get(&dst.ino).copied().unwrap_or(0) == 0 {
                    st.forget_inode(dst.ino);
                }
            } else {
                st.drop_link(&self.store, dst.ino)?;
            }
        }
        let t = now();
        st.remove_entry(&self.store, parent, name)?;
        st.set_entry(&self.store, newparent, newname, src)?;
        if src.kind == FileKind::Dir && parent != newparent {
            st.reparent(&self.store, src.ino, newparent)?;
            st.node_mut(&self.store, parent)?.attr.nlink -= 1;
            st.node_mut(&self.store, newparent)?.attr.nlink += 1;
        }
        st.node_mut(&self.store, src.ino)?.attr.ctime = t;
        for p in [parent, newparent] {
            let n = st.node_mut(&self.store, p)?;
            n.attr.mtime = t;
            n.attr.ctime = t;
        }
        Ok(())
    }

    // ----- attributes ----------------------------------------------------------------------

    /// Changes attributes.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Stat> {
        ro(ino)?;
        let mut st = self.lock();
        if let Some(size) = set.size {
            if size > MAX_FILE_SIZE {
                return Err(FsError::TooBig);
            }
            match st.node(&self.store, ino)?.attr.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("truncate of a special file")),
            }
            st.truncate(&self.store, ino, size)?;
        }
        let t = now();
        let n = st.node_mut(&self.store, ino)?;
        if let Some(m) = set.mode {
            n.attr.perm = m & 0o7777;
        }
        if let Some(u) = set.uid {
            n.attr.uid = u;
        }
        if let Some(g) = set.gid {
            n.attr.gid = g;
        }
        if (set.uid.is_some() || set.gid.is_some())
            && n.attr.kind != FileKind::Dir
            && set.mode.is_none()
        {
            // chown clears setuid, and setgid when group-executable (as the kernel does).
            n.attr.perm &= !libc::S_ISUID;
            if n.attr.perm & 0o010 != 0 {
                n.attr.perm &= !libc::S_ISGID;
            }
        }
        match set.atime {
            Some(TimeSet::Now) => n.attr.atime = t,
            Some(TimeSet::At(x)) => n.attr.atime = x,
            None => {}
        }
        match set.mtime {
            Some(TimeSet::Now) => n.attr.mtime = t,
            Some(TimeSet::At(x)) => n.attr.mtime = x,
            None => {}
        }
        if set.size.is_some() && set.mtime.is_none() {
            n.attr.mtime = t;
        }
        n.attr.ctime = set.ctime.unwrap_or(t);
        Ok(Stat {
            ino,
            attr: n.attr.clone(),
        })
    }

    // ----- open files ----------------------------------------------------------------------

    /// Opens `ino`; returns a handle. `truncate` is O_TRUNC.
    pub fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64> {
        if ino & (META_BIT | SNAP_BIT) != 0 {
            if write || truncate {
                return Err(FsError::ReadOnly);
            }
            self.meta_getattr(ino)?;
            let mut st = self.lock();
            let fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, Handle { ino, listing: None });
            return Ok(fh);
        }
        let mut st = self.lock();
        let n = st.node(&self.store, ino)?;
        if n.attr.kind == FileKind::Dir && write {
            return Err(FsError::IsDir);
        }
        if let MemBody::File(f) = &n.body {
            if let Some(l) = &f.lower {
                if f.changes.is_empty() && f.dirty.is_empty() && f.sealed.is_empty() {
                    self.check_lower(l)?;
                }
            }
        }
        if truncate && n.attr.kind == FileKind::File {
            st.truncate(&self.store, ino, 0)?;
            let t = now();
            let n = st.node_mut(&self.store, ino)?;
            n.attr.mtime = t;
            n.attr.ctime = t;
        }
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, Handle { ino, listing: None });
        *st.open.entry(ino).or_default() += 1;
        Ok(fh)
    }

    fn check_lower(&self, l: &LowerRef) -> FsResult<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let Some(base) = self.store.lower() else {
            return Ok(());
        };
        let p = base.join(std::ffi::OsStr::from_bytes(&l.path));
        let md =
            std::fs::metadata(&p).map_err(|_| FsError::LowerChanged(p.display().to_string()))?;
        if md.len() != l.size || md.mtime() != l.mtime.sec || md.mtime_nsec() as u32 != l.mtime.nsec
        {
            return Err(FsError::LowerChanged(p.display().to_string()));
        }
        Ok(())
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
        caller: Caller,
    ) -> FsResult<(Stat, u64)> {
        match self.mknod(parent, name, libc::S_IFREG | (mode & 0o7777), 0, caller) {
            Ok(stat) => {
                let fh = self.open(stat.ino, true, false)?;
                Ok((stat, fh))
            }
            Err(FsError::Exists) if !exclusive => {
                let stat = self.lookup(parent, name)?;
                let fh = self.open(stat.ino, true, false)?;
                Ok((stat, fh))
            }
            Err(e) => Err(e),
        }
    }

    /// Closes a handle. The last close of an unlinked file frees it.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let mut st = self.lock();
        let h = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        if h.ino & (META_BIT | SNAP_BIT) != 0 {
            return Ok(());
        }
        let cnt = st.open.entry(h.ino).or_default();
        *cnt = cnt.saturating_sub(1);
        if *cnt == 0 {
            st.open.remove(&h.ino);
            if let Ok(n) = st.node(&self.store, h.ino) {
                if n.attr.nlink == 0 {
                    st.forget_inode(h.ino);
                }
            }
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `off`.
    pub fn read(&self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        self.read_to(ino, off, size as usize, Out::Grow(&mut out))?;
        Ok(out)
    }

    /// Reads up to `out.len()` bytes at `off` into `out` (which need not be zeroed) and
    /// returns how many: the FUSE transport hands its reply buffer here, so the data is
    /// written once, where the kernel takes it from.
    pub fn read_into(&self, ino: u64, off: u64, out: &mut [u8]) -> FsResult<usize> {
        let size = out.len();
        self.read_to(ino, off, size, Out::Fill(out))
    }

    fn read_to(&self, ino: u64, off: u64, size: usize, out: Out<'_>) -> FsResult<usize> {
        if ino & SNAP_BIT != 0 {
            let (view, tino) = self.snap_of(ino)?;
            let inode = self.snap_inode(&view, tino)?;
            let d = view.read(&inode, off, size, &self.store)?;
            let n = d.len().min(size);
            match out {
                Out::Fill(out) => out[..n].copy_from_slice(&d[..n]),
                Out::Grow(out) => *out = d,
            }
            return Ok(n);
        }
        if ino & META_BIT != 0 {
            return Err(FsError::IsDir);
        }
        let mut st = self.lock();
        let store = self.store.clone();
        let n = st.node(&store, ino)?;
        let MemBody::File(f) = &n.body else {
            return Err(if n.attr.kind == FileKind::Dir {
                FsError::IsDir
            } else {
                FsError::Invalid("read of a special file")
            });
        };
        let end = off.saturating_add(size as u64).min(n.attr.size);
        if off >= end {
            return Ok(0);
        }
        // Plan under the lock, fetch without it: chunks and lower files never change, so
        // reads of different blocks proceed in parallel.
        enum Part {
            /// Chunk, its stored length, offset in the block, bytes wanted, offset in `out`.
            Chunk(ContentId, usize, usize, usize, usize),
            /// Lower file, file offset, bytes, offset in `out`.
            Lower(LowerRef, u64, usize, usize),
        }
        let total = (end - off) as usize;
        let out: &mut [u8] = match out {
            Out::Fill(out) => out,
            // Only what the file has at `off`: a read asks for a megabyte of a small file.
            Out::Grow(v) => {
                v.resize(total, 0);
                v
            }
        };
        let mut plan = Vec::new();
        // The committed block map of the whole request, looked up in one descent.
        let base = tree::map_range(&store, &f.base, off / BLOCK, (end - 1) / BLOCK)?;
        let base_ref = |idx: u64| -> Option<BlockRef> {
            match f.changes.get(&idx) {
                Some(c) => *c,
                None => base
                    .binary_search_by_key(&idx, |(k, _)| *k)
                    .ok()
                    .map(|i| base[i].1),
            }
        };
        let mut pos = off;
        while pos < end {
            let idx = pos / BLOCK;
            let boff = (pos % BLOCK) as usize;
            let len = ((BLOCK - boff as u64).min(end - pos)) as usize;
            let at = (pos - off) as usize;
            let dst = &mut out[at..at + len];
            let held = (f.dirty.get(&idx))
                .or_else(|| f.sealed.get(&idx).map(|b| &**b))
                .or_else(|| f.clean.get(&idx));
            if let Some(d) = held {
                block_get(d, boff, dst);
            } else {
                match base_ref(idx) {
                    Some(BlockRef::Data { id, len: dl }) => {
                        plan.push(Part::Chunk(id, dl as usize, boff, len, at))
                    }
                    Some(BlockRef::Zero) => dst.fill(0),
                    None => match &f.lower {
                        Some(l) if pos < l.len => {
                            let n = ((l.len - pos) as usize).min(len);
                            dst[n..].fill(0);
                            plan.push(Part::Lower(l.clone(), pos, n, at));
                        }
                        _ => dst.fill(0),
                    },
                }
            }
            pos += len as u64;
        }
        drop(st);
        // The chunks of one request are usually neighbours in the log: one read for all,
        // each block verified and copied straight into the reply, past the cache.
        let mut ids = Vec::new();
        let mut places = Vec::new();
        let mut lower = Vec::new();
        for p in plan {
            match p {
                Part::Chunk(id, dl, boff, len, at) => {
                    ids.push(id);
                    places.push((dl, boff, len, at));
                }
                Part::Lower(l, pos, n, at) => lower.push((l, pos, n, at)),
            }
        }
        store.stream_verified(&ids, &mut |i, data| {
            let (dl, boff, len, at) = places[i];
            let have = dl.min(data.len());
            let from = boff.min(have);
            let to = (boff + len).min(have);
            let (data_part, zero_part) = out[at..at + len].split_at_mut(to - from);
            data_part.copy_from_slice(&data[from..to]);
            // A block stored shorter than the file's size covers (its tail was zeros).
            zero_part.fill(0);
            Ok(())
        })?;
        for (l, pos, n, at) in lower {
            let got = tree::read_lower(&store, &l, pos, &mut out[at..at + n])?;
            // A lower file that shrank under us reads as zeros past its end.
            out[at + got..at + n].fill(0);
        }
        Ok(total)
    }

    /// Writes `data` at `off`; returns the bytes written.
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        ro(ino)?;
        let end = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        let mut st = self.lock();
        let store = self.store.clone();
        // What is held already must reach the log before more is taken: on a full disk the
        // write fails here (ENOSPC) instead of piling up in memory.
        if st.dirty_bytes > st.spill_limit {
            st.finish_spill(&store)?;
            st.spill(&store)?;
        }
        let mut added = 0usize;
        {
            let n = st.node_mut(&store, ino)?;
            let size = n.attr.size;
            let MemBody::File(f) = &mut n.body else {
                return Err(FsError::Invalid("write to a non-file"));
            };
            let mut pos = off;
            let mut src = 0usize;
            while pos < end {
                let idx = pos / BLOCK;
                let boff = (pos % BLOCK) as usize;
                let len = ((BLOCK - boff as u64).min(end - pos)) as usize;
                if !f.dirty.contains_key(&idx) {
                    let whole = boff == 0 && len == BLOCK as usize;
                    let buf = if let Some(b) = f.take_clean(idx) {
                        b
                    } else if let Some(b) = f.sealed.get(&idx).filter(|_| !whole) {
                        b.to_vec()
                    } else if whole || idx * BLOCK >= size {
                        Vec::new()
                    } else {
                        let mut b = tree::read_block(
                            &store,
                            f.lower.as_ref(),
                            block_ref(&store, f, idx)?,
                            idx,
                        )?;
                        // Bytes past the current size must read as zeros after extension.
                        b.truncate((size - idx * BLOCK).min(BLOCK) as usize);
                        b
                    };
                    added += buf.len();
                    f.dirty.insert(idx, buf);
                }
                if let Some(b) = f.dirty.get_mut(&idx) {
                    let before = b.len();
                    block_put(b, boff, &data[src..src + len]);
                    added += b.len() - before;
                }
                pos += len as u64;
                src += len;
            }
            let t = now();
            if end > n.attr.size {
                n.attr.size = end;
            }
            n.attr.mtime = t;
            n.attr.ctime = t;
            // Writing by a non-owner clears setuid/setgid; the kernel asks via setattr.
        }
        st.dirty_bytes += added;
        if st.dirty_bytes > st.spill_limit {
            // The last spill must have landed (writes that outrun the log wait here), then
            // this one runs beside the writes that follow.
            if let Err(e) = st.finish_spill(&store) {
                // This write is taken (it is in memory); the next one fails until the log
                // takes what is held.
                log::warn!("cannot move written data to the log: {e}");
            } else {
                st.start_spill(&store);
            }
        }
        Ok(data.len() as u32)
    }

    /// Preallocates, punches holes or zeroes ranges.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        ro(ino)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && !keep) || (punch && zero) {
            return Err(FsError::NotSupported);
        }
        let end = off
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        if len == 0 {
            return Err(FsError::Invalid("zero length"));
        }
        let mut st = self.lock();
        let store = self.store.clone();
        let kind = st.node(&store, ino)?.attr.kind;
        if kind != FileKind::File {
            return Err(if kind == FileKind::Dir {
                FsError::IsDir
            } else {
                FsError::NoData
            });
        }
        if punch || zero {
            let size = st.node(&store, ino)?.attr.size;
            let zend = end.min(if zero && !keep { end } else { size });
            st.zero_range(&store, ino, off, zend)?;
        }
        let n = st.node_mut(&store, ino)?;
        if !keep && end > n.attr.size {
            n.attr.size = end;
        }
        let t = now();
        n.attr.ctime = t;
        if punch || zero {
            n.attr.mtime = t;
        }
        Ok(())
    }

    /// `SEEK_DATA` / `SEEK_HOLE`.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> FsResult<u64> {
        let mut st = self.lock();
        let store = self.store.clone();
        let n = st.node(&store, ino)?;
        let size = n.attr.size;
        let MemBody::File(f) = &n.body else {
            return Err(FsError::Invalid("lseek on a non-file"));
        };
        if off >= size {
            return Err(FsError::NoData);
        }
        let want_data = whence == libc::SEEK_DATA;
        if !want_data && whence != libc::SEEK_HOLE {
            return Err(FsError::Invalid("whence"));
        }
        let mut idx = off / BLOCK;
        loop {
            let start = idx * BLOCK;
            if start >= size {
                return if want_data {
                    Err(FsError::NoData)
                } else {
                    Ok(size)
                };
            }
            let data = if f.dirty.contains_key(&idx) || f.sealed.contains_key(&idx) {
                true
            } else {
                match block_ref(&store, f, idx)? {
                    Some(BlockRef::Data { .. }) => true,
                    Some(BlockRef::Zero) => false,
                    None => f.lower.as_ref().is_some_and(|l| start < l.len),
                }
            };
            if data == want_data {
                return Ok(start.max(off));
            }
            idx += 1;
        }
    }

    /// Copies a range between files (block-aligned full blocks share their chunks).
    pub fn copy_range(
        &self,
        ino_in: u64,
        off_in: u64,
        ino_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        ro(ino_out)?;
        let size = self.getattr(ino_in)?.attr.size;
        if off_in >= size {
            return Ok(0);
        }
        let len = len.min(size - off_in);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 20) as u32;
            let data = self.read(ino_in, off_in + done, n)?;
            if data.is_empty() {
                break;
            }
            self.write(ino_out, off_out + done, &data)?;
            done += data.len() as u64;
        }
        Ok(done)
    }

    /// Makes a file's data durable: commits the branch.
    pub fn fsync(&self) -> FsResult<()> {
        let _c = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.commit_as(CheckpointKind::Commit, None, None, true)
            .map(|_| ())
    }

    // ----- directories ---------------------------------------------------------------------

    /// Opens a directory; its listing is taken now, so offsets are stable while it is read.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let listing = self.list(ino)?;
        let mut st = self.lock();
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            Handle {
                ino,
                listing: Some(listing),
            },
        );
        // An open directory outlives rmdir (fstat on it still works), like an open file.
        if ino & (META_BIT | SNAP_BIT) == 0 {
            *st.open.entry(ino).or_default() += 1;
        }
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on; offset 0 re-reads the directory.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let ino = {
            let st = self.lock();
            st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino
        };
        if offset == 0 {
            let fresh = self.list(ino)?;
            if let Some(h) = self.lock().handles.get_mut(&fh) {
                h.listing = Some(fresh);
            }
        }
        let st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        let l = h.listing.as_ref().ok_or(FsError::BadHandle)?;
        Ok(l.iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// Closes a directory handle. The last close of a removed directory frees it.
    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.release(fh)
    }

    /// All entries of a directory, `.` and `..` first.
    pub fn list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        if ino & (META_BIT | SNAP_BIT) != 0 {
            return self.meta_list(ino);
        }
        let mut st = self.lock();
        let n = st.node(&self.store, ino)?;
        let MemBody::Dir { parent, entries } = &n.body else {
            return Err(FsError::NotDir);
        };
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push(DirEntry {
            ino,
            kind: FileKind::Dir,
            name: b".".to_vec(),
        });
        out.push(DirEntry {
            ino: *parent,
            kind: FileKind::Dir,
            name: b"..".to_vec(),
        });
        for (name, e) in entries {
            out.push(DirEntry {
                ino: e.ino,
                kind: e.kind,
                name: name.clone(),
            });
        }
        Ok(out)
    }

    // ----- xattrs --------------------------------------------------------------------------

    /// Sets an extended attribute (`flags`: XATTR_CREATE / XATTR_REPLACE).
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        ro(ino)?;
        if name.starts_with(b"system.") {
            return Err(FsError::NotSupported);
        }
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let mut st = self.lock();
        let n = st.node_mut(&self.store, ino)?;
        let exists = n.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttr);
        }
        n.xattrs.insert(name.to_vec(), value.to_vec());
        n.attr.ctime = now();
        Ok(())
    }

    /// Reads an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if ino & SNAP_BIT != 0 {
            let (view, tino) = self.snap_of(ino)?;
            return self
                .snap_inode(&view, tino)?
                .xattrs
                .get(name)
                .cloned()
                .ok_or(FsError::NoAttr);
        }
        if ino & META_BIT != 0 {
            return Err(FsError::NoAttr);
        }
        let mut st = self.lock();
        st.node(&self.store, ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NoAttr)
    }

    /// Lists extended attribute names, NUL-terminated.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let xattrs = if ino & SNAP_BIT != 0 {
            let (view, tino) = self.snap_of(ino)?;
            self.snap_inode(&view, tino)?.xattrs
        } else if ino & META_BIT != 0 {
            BTreeMap::new()
        } else {
            let mut st = self.lock();
            st.node(&self.store, ino)?.xattrs.clone()
        };
        let mut out = Vec::new();
        for k in xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        ro(ino)?;
        let mut st = self.lock();
        let n = st.node_mut(&self.store, ino)?;
        n.xattrs.remove(name).ok_or(FsError::NoAttr)?;
        n.attr.ctime = now();
        Ok(())
    }

    // ----- commits and snapshots -----------------------------------------------------------

    /// Is there anything to commit?
    pub fn is_dirty(&self) -> bool {
        let st = self.lock();
        !st.dirty.is_empty()
    }

    /// Commits what is pending and holds off this branch's further commits (an fsync waits)
    /// while the guard lives. gc takes it when a mount commits too often for its mark to
    /// finish unchanged: a database in the mount fsyncs many times a second, and each fsync
    /// is a commit.
    pub fn hold_commits(&self) -> FsResult<std::sync::MutexGuard<'_, ()>> {
        let held = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.commit_locked(CheckpointKind::Commit, None, None)?;
        Ok(held)
    }

    /// Commits the branch; with `name`, records a named snapshot or checkpoint.
    pub fn commit(
        &self,
        kind: CheckpointKind,
        name: Option<&str>,
        image: Option<ContentId>,
    ) -> FsResult<u64> {
        let _c = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.commit_locked(kind, name, image)
    }

    /// [`Fs::commit`] under the commit lock.
    fn commit_locked(
        &self,
        kind: CheckpointKind,
        name: Option<&str>,
        image: Option<ContentId>,
    ) -> FsResult<u64> {
        self.commit_as(kind, name, image, false)
    }

    /// [`Fs::commit_locked`]; an fsync's commit may be an intent commit
    /// ([`Store::commit_fsync`]).
    fn commit_as(
        &self,
        kind: CheckpointKind,
        name: Option<&str>,
        image: Option<ContentId>,
        fsync: bool,
    ) -> FsResult<u64> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        let mut st = self.lock();
        if st.dirty.is_empty() && name.is_none() {
            if !fsync {
                // Nothing new: what fsyncs committed is made durable the full way (an
                // unmount ends so).
                self.store.settle()?;
            }
            return Ok(st.head);
        }
        let store = self.store.clone();
        let t0 = std::time::Instant::now();
        st.finish_spill(&store)?;
        let t1 = std::time::Instant::now();
        let dirty_inodes = st.dirty.len();
        let root_id = st.write_root(&store)?;
        log::debug!(
            "commit: {dirty_inodes} inodes; spill landed in {:?}, root written in {:?}",
            t1 - t0,
            t1.elapsed()
        );
        let branch = st.branch.clone();
        let cp = NewCheckpoint {
            branch: &branch,
            root: root_id,
            name,
            kind,
            image,
            note: None,
            advance_head: true,
            parent: None,
        };
        let cno = if fsync {
            store.commit_fsync(&cp)?
        } else {
            store.commit(Some(&cp))?
        }
        .ok_or(FsError::Invalid("commit without checkpoint"))?;
        st.head = cno;
        st.dirty.clear();
        st.removed.clear();
        Ok(cno)
    }

    /// Takes a named snapshot of the branch.
    pub fn snapshot(&self, name: &str) -> FsResult<u64> {
        self.commit(CheckpointKind::Snapshot, Some(name), None)
    }

    /// Switches the mount to the tree of checkpoint `cno` (a rollback: the branch head moves
    /// there). Uncommitted changes are dropped; commit first to keep them. Returns what the
    /// kernel may have cached of the old tree, to be invalidated.
    pub fn checkout(&self, cno: u64) -> FsResult<Vec<Inval>> {
        let _c = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cp = self.store.catalog(|c| c.checkpoint(cno))?;
        let root = tree::get_root(&self.store, &cp.root)?;
        let mut st = self.lock();
        // What a spill in flight stores is dropped with the rest; let it end first. Its
        // blocks are dirty again until the checkout has succeeded: if it fails below, they
        // are committed as before (left sealed, no later spill would have landed them).
        if let Some(h) = st.spilling.take() {
            drop(h.join());
            st.unseal_all();
        }
        let branch = st.branch.clone();
        self.store.catalog(|c| c.set_head(&branch, cno))?;
        let mut inval = Vec::new();
        // Names the kernel holds as absent may exist in the checked-out tree.
        self.checkouts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for (parent, name) in st.negative.replace(HashSet::new()).unwrap_or_default() {
            inval.push(Inval::Entry(parent, name));
        }
        for (ino, n) in &st.nodes {
            if let MemBody::Dir { entries, .. } = &n.body {
                for name in entries.keys() {
                    inval.push(Inval::Entry(*ino, name.clone()));
                }
            }
            inval.push(Inval::Inode(*ino));
        }
        // A file looked up by number (a checkpoint records an unlinked file that way, and a
        // restore reopens it there) may outlive its last close in the kernel's cache, pages
        // and all, under that name; the checked-out tree may hold it with other contents.
        let by_number = std::mem::take(&mut st.by_number);
        for ino in by_number.into_iter().chain(root.orphans.iter().copied()) {
            if !st.nodes.contains_key(&ino) {
                inval.push(Inval::Inode(ino));
            }
            inval.push(Inval::Entry(INODES_INO, ino.to_string().into_bytes()));
        }
        st.head = cno;
        st.next_ino = st.next_ino.max(root.next_ino);
        st.base = root;
        st.nodes.clear();
        st.dirty.clear();
        st.removed.clear();
        st.dirty_bytes = 0;
        Ok(inval)
    }

    /// The roots of the snapshots a file or directory is open in (under
    /// `.forkpoint/snapshots/`): gc keeps what they reach, forgotten or not, as a snapshot
    /// in use is not destroyed under its readers.
    pub fn open_snapshot_roots(&self) -> Vec<ContentId> {
        let st = self.lock();
        let mut out: Vec<ContentId> = st
            .handles
            .values()
            .filter(|h| h.ino & SNAP_BIT != 0)
            .filter_map(|h| {
                let slot = ((h.ino & !SNAP_BIT) >> SLOT_SHIFT) as usize;
                st.snaps.get(slot).map(|s| s.view.root_id)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// May the kernel cache `name` in directory `parent` as absent? Only in the live tree
    /// (the `.forkpoint` directories change behind the kernel's back) and only while the
    /// name can be invalidated again at the next checkout, and only if no checkout ran since
    /// `generation` was read (before the lookup).
    pub fn may_cache_absent(&self, parent: u64, name: &[u8], generation: u64) -> bool {
        if ro(parent).is_err() || (parent == ROOT_INO && name == META_NAME) {
            return false;
        }
        let mut st = self.lock();
        if self.checkouts.load(std::sync::atomic::Ordering::SeqCst) != generation {
            // A checkout ran since the lookup: its answer may be stale.
            return false;
        }
        let Some(set) = st.negative.as_mut() else {
            return false;
        };
        if set.len() >= NEGATIVE_LIMIT {
            // Keep the ones handed out; hand out no more until the next checkout.
            return set.contains(&(parent, name.to_vec()));
        }
        set.insert((parent, name.to_vec()));
        true
    }

    /// Counts checkouts; read before a lookup and passed to [`Fs::may_cache_absent`].
    pub fn generation(&self) -> u64 {
        self.checkouts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Clears setuid, and setgid when the file is group-executable, as the kernel does when a
    /// process without CAP_FSETID writes to or truncates a file (FUSE_HANDLE_KILLPRIV_V2 makes
    /// that the filesystem's job).
    pub fn kill_suidgid(&self, ino: u64) -> FsResult<()> {
        ro(ino)?;
        let mut st = self.lock();
        let n = st.node(&self.store, ino)?;
        let perm = n.attr.perm;
        let mut new = perm & !libc::S_ISUID;
        if perm & 0o010 != 0 {
            new &= !libc::S_ISGID;
        }
        if new == perm {
            return Ok(());
        }
        let t = now();
        let n = st.node_mut(&self.store, ino)?;
        n.attr.perm = new;
        n.attr.ctime = t;
        Ok(())
    }

    /// Commits and returns the checkpoint number of the commit.
    pub fn commit_now(&self) -> FsResult<u64> {
        self.commit(CheckpointKind::Commit, None, None)
    }

    // ----- .forkpoint ----------------------------------------------------------------------

    fn meta_attr(&self, ino: u64) -> Attr {
        let mut a = Attr::new(FileKind::Dir, 0o555, 0, 0);
        a.nlink = 2;
        a.mtime = Time::default();
        a.atime = Time::default();
        a.ctime = Time::default();
        let _ = ino;
        a
    }

    fn meta_getattr(&self, ino: u64) -> FsResult<Stat> {
        match ino {
            META_INO | SNAPS_INO | INODES_INO => Ok(Stat {
                ino,
                attr: self.meta_attr(ino),
            }),
            _ if ino & SNAP_BIT != 0 => {
                let (view, tino) = self.snap_of(ino)?;
                let inode = self.snap_inode(&view, tino)?;
                let mut attr = inode.attr;
                attr.perm &= !0o222;
                Ok(Stat { ino, attr })
            }
            _ => Err(FsError::NotFound),
        }
    }

    fn meta_lookup(&self, parent: u64, name: &[u8]) -> FsResult<Stat> {
        match parent {
            META_INO => match name {
                b"snapshots" => self.meta_getattr(SNAPS_INO),
                b"inodes" => self.meta_getattr(INODES_INO),
                b"." => self.meta_getattr(META_INO),
                b".." => self.getattr(ROOT_INO),
                _ => Err(FsError::NotFound),
            },
            INODES_INO => {
                let ino: u64 = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .filter(|i| *i & (META_BIT | SNAP_BIT) == 0)
                    .ok_or(FsError::NotFound)?;
                let st = self.getattr(ino)?;
                // A directory has one parent; only files are reachable this way.
                if st.attr.kind == FileKind::Dir {
                    return Err(FsError::NotFound);
                }
                self.lock().by_number.insert(ino);
                Ok(st)
            }
            SNAPS_INO => {
                if name == b"." {
                    return self.meta_getattr(SNAPS_INO);
                }
                if name == b".." {
                    return self.meta_getattr(META_INO);
                }
                let name = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
                let slot = self.snap_slot(name)?;
                self.meta_getattr(SNAP_BIT | (slot << SLOT_SHIFT) | ROOT_INO)
            }
            _ if parent & SNAP_BIT != 0 => {
                let (view, tino) = self.snap_of(parent)?;
                let inode = self.snap_inode(&view, tino)?;
                let Body::Dir {
                    entries,
                    parent: pp,
                } = &inode.body
                else {
                    return Err(FsError::NotDir);
                };
                let child = match name {
                    b"." => tino,
                    b".." if tino == ROOT_INO => return self.meta_getattr(SNAPS_INO),
                    b".." => *pp,
                    _ => entries.get(name).ok_or(FsError::NotFound)?.ino,
                };
                self.meta_getattr((parent & !INO_MASK) | child)
            }
            _ => Err(FsError::NotFound),
        }
    }

    fn meta_list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let d = |ino: u64, name: &[u8]| DirEntry {
            ino,
            kind: FileKind::Dir,
            name: name.to_vec(),
        };
        match ino {
            META_INO => Ok(vec![
                d(META_INO, b"."),
                d(ROOT_INO, b".."),
                d(SNAPS_INO, b"snapshots"),
                d(INODES_INO, b"inodes"),
            ]),
            INODES_INO => Ok(vec![d(INODES_INO, b"."), d(META_INO, b"..")]),
            SNAPS_INO => {
                let mut out = vec![d(SNAPS_INO, b"."), d(META_INO, b"..")];
                let cps = self.store.catalog(|c| c.checkpoints())?;
                for cp in cps {
                    if let Some(name) = cp.name {
                        let slot = self.snap_slot(&name)?;
                        out.push(d(
                            SNAP_BIT | (slot << SLOT_SHIFT) | ROOT_INO,
                            name.as_bytes(),
                        ));
                    }
                }
                Ok(out)
            }
            _ if ino & SNAP_BIT != 0 => {
                let (view, tino) = self.snap_of(ino)?;
                let inode = self.snap_inode(&view, tino)?;
                let Body::Dir { entries, parent } = inode.body else {
                    return Err(FsError::NotDir);
                };
                let hi = ino & !INO_MASK;
                let up = if tino == ROOT_INO {
                    SNAPS_INO
                } else {
                    hi | parent
                };
                let mut out = vec![d(ino, b"."), d(up, b"..")];
                for (name, e) in entries {
                    out.push(DirEntry {
                        ino: hi | e.ino,
                        kind: e.kind,
                        name,
                    });
                }
                Ok(out)
            }
            _ => Err(FsError::NotFound),
        }
    }

    fn snap_slot(&self, name: &str) -> FsResult<u64> {
        // The catalog is asked every time: the name may have been forgotten, or given to
        // another snapshot, since its slot was made.
        let cp = self.store.find(name).map_err(|e| match e {
            StoreError::UnknownCheckpoint(_) => FsError::NotFound,
            e => FsError::Store(e),
        })?;
        if cp.name.is_none() {
            return Err(FsError::NotFound);
        }
        let slot = |st: &State| {
            st.snaps
                .iter()
                .position(|s| s.name == name && s.cno == cp.cno)
        };
        if let Some(i) = slot(&self.lock()) {
            return Ok(i as u64);
        }
        let view = TreeView::open(self.store.clone(), cp.root)?;
        let mut st = self.lock();
        if let Some(i) = slot(&st) {
            return Ok(i as u64);
        }
        if st.snaps.len() >= (1 << 21) {
            return Err(FsError::TooBig);
        }
        st.snaps.push(Snap {
            name: name.to_string(),
            cno: cp.cno,
            view,
        });
        Ok(st.snaps.len() as u64 - 1)
    }

    fn snap_of(&self, ino: u64) -> FsResult<(SnapRef, u64)> {
        let slot = ((ino & !SNAP_BIT) >> SLOT_SHIFT) as usize;
        let st = self.lock();
        let s = st.snaps.get(slot).ok_or(FsError::NotFound)?;
        Ok((
            SnapRef {
                root: s.view.root.clone(),
            },
            ino & INO_MASK,
        ))
    }

    fn snap_inode(&self, view: &SnapRef, ino: u64) -> FsResult<Inode> {
        let id = radix::get::<ContentId>(&self.store, view.root.inodes.as_ref(), ino)?
            .ok_or(FsError::NotFound)?;
        Ok(tree::get_inode(&self.store, &id)?)
    }

    /// Statistics of the filesystem holding the store.
    pub fn statfs(&self) -> FsResult<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(self.store.dir()).map_err(|e| {
            FsError::Store(StoreError::Io {
                op: "statvfs",
                path: self.store.dir().to_path_buf(),
                source: e.into(),
            })
        })
    }
}

/// A snapshot's root, cloned out of the state lock.
struct SnapRef {
    root: Root,
}

impl SnapRef {
    fn read(&self, inode: &Inode, off: u64, len: usize, store: &Arc<Store>) -> FsResult<Vec<u8>> {
        let v = TreeView {
            store: store.clone(),
            root: self.root.clone(),
            root_id: ContentId([0; 32]),
        };
        Ok(v.read(inode, off, len)?)
    }
}

fn ro(ino: u64) -> FsResult<()> {
    if ino & (META_BIT | SNAP_BIT) != 0 {
        Err(FsError::ReadOnly)
    } else {
        Ok(())
    }
}

/// Checks a snapshot/checkpoint/branch name.
pub fn validate_name(n: &str) -> FsResult<()> {
    if n.is_empty()
        || n.len() > 200
        || n.starts_with('#')
        || n.starts_with('.')
        || n.contains('/')
        || n.chars().any(char::is_control)
    {
        return Err(FsError::Store(StoreError::InvalidName {
            name: n.escape_debug().to_string(),
            reason: "names are 1-200 bytes, without '/' or control characters (a newline, an \
                     escape), and do not start with '#' or '.'",
        }));
    }
    Ok(())
}

fn block_ref(store: &Store, f: &MemFile, idx: u64) -> FsResult<Option<BlockRef>> {
    if let Some(c) = f.changes.get(&idx) {
        return Ok(*c);
    }
    Ok(tree::map_get(store, &f.base, idx)?)
}

impl State {
    fn node(&mut self, store: &Store, ino: u64) -> FsResult<&Node> {
        self.node_mut_inner(store, ino, false).map(|n| &*n)
    }

    fn node_mut(&mut self, store: &Store, ino: u64) -> FsResult<&mut Node> {
        self.node_mut_inner(store, ino, true)
    }

    fn node_mut_inner(&mut self, store: &Store, ino: u64, mark: bool) -> FsResult<&mut Node> {
        if self.removed.contains(&ino) || ino & (META_BIT | SNAP_BIT) != 0 {
            return Err(FsError::NotFound);
        }
        if !self.nodes.contains_key(&ino) {
            let id = radix::get::<ContentId>(store, self.base.inodes.as_ref(), ino)?
                .ok_or(FsError::NotFound)?;
            let inode = tree::get_inode(store, &id)?;
            self.nodes.insert(ino, Node::from_inode(inode));
        }
        if mark {
            self.dirty.insert(ino);
        }
        self.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn entry(&mut self, store: &Store, parent: u64, name: &[u8]) -> FsResult<DirEnt> {
        match &self.node(store, parent)?.body {
            MemBody::Dir { entries, .. } => entries.get(name).copied().ok_or(FsError::NotFound),
            _ => Err(FsError::NotDir),
        }
    }

    fn remove_entry(&mut self, store: &Store, parent: u64, name: &[u8]) -> FsResult<()> {
        let t = now();
        let p = self.node_mut(store, parent)?;
        if let MemBody::Dir { entries, .. } = &mut p.body {
            entries.remove(name);
        }
        p.attr.mtime = t;
        p.attr.ctime = t;
        Ok(())
    }

    fn set_entry(&mut self, store: &Store, parent: u64, name: &[u8], e: DirEnt) -> FsResult<()> {
        let p = self.node_mut(store, parent)?;
        if let MemBody::Dir { entries, .. } = &mut p.body {
            entries.insert(name.to_vec(), e);
        }
        Ok(())
    }

    fn reparent(&mut self, store: &Store, dir: u64, newparent: u64) -> FsResult<()> {
        if let MemBody::Dir { parent, .. } = &mut self.node_mut(store, dir)?.body {
            *parent = newparent;
        }
        Ok(())
    }

    /// Is `a` equal to `b` or an ancestor of it?
    fn is_ancestor(&mut self, store: &Store, a: u64, mut b: u64) -> FsResult<bool> {
        for _ in 0..100_000 {
            if a == b {
                return Ok(true);
            }
            if b == ROOT_INO {
                return Ok(false);
            }
            b = match &self.node(store, b)?.body {
                MemBody::Dir { parent, .. } => *parent,
                _ => return Ok(false),
            };
        }
        Ok(false)
    }

    fn drop_link(&mut self, store: &Store, ino: u64) -> FsResult<()> {
        let open = self.open.get(&ino).copied().unwrap_or(0);
        let n = self.node_mut(store, ino)?;
        n.attr.nlink = n.attr.nlink.saturating_sub(1);
        n.attr.ctime = now();
        if n.attr.nlink == 0 && open == 0 {
            self.forget_inode(ino);
        }
        Ok(())
    }

    fn forget_inode(&mut self, ino: u64) {
        if let Some(Node {
            body: MemBody::File(f),
            ..
        }) = self.nodes.remove(&ino)
        {
            let held: usize = f.dirty.values().map(Vec::len).sum();
            self.dirty_bytes = self.dirty_bytes.saturating_sub(held);
        }
        self.removed.insert(ino);
        self.dirty.insert(ino);
    }

    fn truncate(&mut self, store: &Store, ino: u64, size: u64) -> FsResult<()> {
        let old = self.node(store, ino)?.attr.size;
        if size < old {
            self.zero_range(store, ino, size, old)?;
            let n = self.node_mut(store, ino)?;
            if let MemBody::File(f) = &mut n.body {
                // Whole blocks past the end leave the map.
                let first = size.div_ceil(BLOCK);
                let drop: Vec<u64> = f.dirty.range(first..).map(|(k, _)| *k).collect();
                for k in drop {
                    f.dirty.remove(&k);
                }
                let drop: Vec<u64> = f.clean.range(first..).map(|(k, _)| *k).collect();
                for k in drop {
                    f.take_clean(k);
                }
                f.sealed.retain(|k, _| *k < first);
                let mut gone: Vec<u64> = tree::map_entries(store, &f.base)?
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| *k >= first)
                    .collect();
                gone.extend(f.changes.range(first..).map(|(k, _)| *k));
                for k in gone {
                    f.changes.insert(k, None);
                }
                if let Some(l) = &mut f.lower {
                    l.len = l.len.min(size);
                }
            }
        }
        let n = self.node_mut(store, ino)?;
        n.attr.size = size;
        Ok(())
    }

    /// Makes bytes `[from, to)` read as zeros.
    fn zero_range(&mut self, store: &Store, ino: u64, from: u64, to: u64) -> FsResult<()> {
        if from >= to {
            return Ok(());
        }
        let mut added = 0;
        let n = self.node_mut(store, ino)?;
        let size = n.attr.size;
        let MemBody::File(f) = &mut n.body else {
            return Ok(());
        };
        let mut pos = from;
        while pos < to {
            let idx = pos / BLOCK;
            let boff = (pos % BLOCK) as usize;
            let len = ((BLOCK - boff as u64).min(to - pos)) as usize;
            if boff == 0 && len == BLOCK as usize {
                if let Some(b) = f.dirty.remove(&idx) {
                    added -= b.len() as i64;
                }
                f.take_clean(idx);
                f.sealed.remove(&idx);
                f.changes.insert(idx, Some(BlockRef::Zero));
            } else {
                if !f.dirty.contains_key(&idx) {
                    let held = f
                        .take_clean(idx)
                        .or_else(|| f.sealed.get(&idx).map(|b| b.to_vec()));
                    let mut b = match held {
                        Some(b) => b,
                        None => tree::read_block(
                            store,
                            f.lower.as_ref(),
                            block_ref(store, f, idx)?,
                            idx,
                        )?,
                    };
                    // Bytes past the size read as zeros.
                    b.truncate(size.saturating_sub(idx * BLOCK).min(BLOCK) as usize);
                    added += b.len() as i64;
                    f.dirty.insert(idx, b);
                }
                if let Some(b) = f.dirty.get_mut(&idx) {
                    let before = b.len() as i64;
                    block_zero(b, boff, len);
                    added += b.len() as i64 - before;
                }
            }
            pos += len as u64;
        }
        self.dirty_bytes = (self.dirty_bytes as i64 + added).max(0) as usize;
        Ok(())
    }

    /// Writes every dirty block to the log as a chunk (not yet committed), here and now:
    /// the same work as a background spill (`store_sealed`), landed at once.
    fn spill(&mut self, store: &Store) -> FsResult<()> {
        let blocks = self.seal_all();
        if blocks.is_empty() {
            return Ok(());
        }
        let done = store_sealed(store, blocks);
        self.land(done, store)
    }

    /// Moves every dirty block to its file's `sealed` map (where reads and writes still
    /// find it) and returns them, for `store_sealed`.
    fn seal_all(&mut self) -> Vec<(u64, u64, Arc<Vec<u8>>)> {
        let mut blocks = Vec::new();
        for ino in &self.dirty {
            if let Some(Node {
                body: MemBody::File(f),
                ..
            }) = self.nodes.get_mut(ino)
            {
                for (idx, b) in std::mem::take(&mut f.dirty) {
                    let b = Arc::new(b);
                    f.sealed.insert(idx, b.clone());
                    blocks.push((*ino, idx, b));
                }
            }
        }
        self.dirty_bytes = 0;
        blocks
    }

    /// Hands every dirty block to a thread that hashes and appends them while requests go
    /// on (an untar's writes were held up 40-70 ms by each spill on the request path);
    /// `finish_spill` lands the result.
    fn start_spill(&mut self, store: &Arc<Store>) {
        let blocks = self.seal_all();
        if blocks.is_empty() {
            return;
        }
        let store = store.clone();
        let job = move || store_sealed(&store, blocks);
        match std::thread::Builder::new().name("spill".into()).spawn(job) {
            Ok(h) => self.spilling = Some(h),
            Err(e) => {
                // No thread: the blocks go back to being dirty, for the next spill.
                log::warn!("cannot start a background spill: {e}");
                self.unseal_all();
            }
        }
    }

    /// Moves every sealed block back to dirty (unless written again since).
    fn unseal_all(&mut self) {
        for ino in &self.dirty {
            if let Some(Node {
                body: MemBody::File(f),
                ..
            }) = self.nodes.get_mut(ino)
            {
                for (idx, b) in std::mem::take(&mut f.sealed) {
                    if let btree_map::Entry::Vacant(v) = f.dirty.entry(idx) {
                        self.dirty_bytes += b.len();
                        v.insert(Arc::unwrap_or_clone(b));
                    }
                }
            }
        }
    }

    /// Waits for the background spill, if one runs, and lands it (`land`).
    fn finish_spill(&mut self, store: &Store) -> FsResult<()> {
        let Some(h) = self.spilling.take() else {
            return Ok(());
        };
        let Ok(done) = h.join() else {
            self.unseal_all();
            return Err(FsError::Store(StoreError::Io {
                op: "spill",
                path: store.dir().to_path_buf(),
                source: std::io::Error::other("the background spill panicked"),
            }));
        };
        self.land(done, store)
    }

    /// Lands what a spill stored: each block still sealed (not dropped or stored anew
    /// since) gets its reference in the file's changes and goes to the clean cache. If the
    /// append failed, the blocks are dirty again and the error is returned.
    fn land(&mut self, done: Spilled, store: &Store) -> FsResult<()> {
        if let Err(e) = done.stored {
            drop(done.blocks);
            self.unseal_all();
            return Err(e);
        }
        for (((ino, idx, b), len), id) in done.blocks.into_iter().zip(done.lens).zip(done.ids) {
            let Some(Node {
                body: MemBody::File(f),
                ..
            }) = self.nodes.get_mut(&ino)
            else {
                continue;
            };
            if !f.sealed.get(&idx).is_some_and(|s| Arc::ptr_eq(s, &b)) {
                continue;
            }
            let r = match f.stored_ref(store, idx, id, len) {
                Ok(r) => r,
                Err(e) => {
                    // Dirty again, for the next spill to decide.
                    log::warn!("block {idx} of inode {ino} stays dirty: {e}");
                    f.sealed.remove(&idx);
                    if let btree_map::Entry::Vacant(v) = f.dirty.entry(idx) {
                        self.dirty_bytes += b.len();
                        v.insert(Arc::unwrap_or_clone(b));
                    }
                    continue;
                }
            };
            f.sealed.remove(&idx);
            f.changes.insert(idx, r);
            if !f.dirty.contains_key(&idx) {
                f.keep_clean(idx, Arc::unwrap_or_clone(b));
            }
        }
        Ok(())
    }

    /// Writes dirty inodes and a new root; returns the root id.
    fn write_root(&mut self, store: &Store) -> FsResult<ContentId> {
        let t0 = std::time::Instant::now();
        self.spill(store)?;
        let t_spill = t0.elapsed();
        let mut changes: BTreeMap<u64, Option<ContentId>> = BTreeMap::new();
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        let mut orphans = Vec::new();
        // Encoded here, then named on all cores and appended in one batch: a commit after an
        // untar writes tens of thousands of inodes, and one store call each held every
        // request up for 200 ms.
        let mut encoded: Vec<(u64, Vec<u8>)> = Vec::new();
        for ino in dirty {
            if self.removed.contains(&ino) {
                changes.insert(ino, None);
                continue;
            }
            let Some(n) = self.nodes.get_mut(&ino) else {
                continue;
            };
            let body = match &mut n.body {
                MemBody::File(f) => {
                    // Cleared only once the map took them: a failed update loses nothing.
                    f.base = tree::map_update(store, &f.base, &f.changes)?;
                    f.changes.clear();
                    Body::File {
                        lower: f.lower.clone(),
                        blocks: f.base.clone(),
                    }
                }
                MemBody::Dir { parent, entries } => Body::Dir {
                    parent: *parent,
                    entries: entries.clone(),
                },
                MemBody::Symlink(t) => Body::Symlink { target: t.clone() },
                MemBody::Special => Body::Special,
            };
            if n.attr.nlink == 0 {
                orphans.push(ino);
            }
            let inode = Inode {
                attr: n.attr.clone(),
                xattrs: n.xattrs.clone(),
                body,
            };
            encoded.push((ino, tree::encode_inode(&inode)?));
        }
        let t_encode = t0.elapsed();
        let pieces: Vec<&[u8]> = encoded.iter().map(|(_, b)| b.as_slice()).collect();
        let ids = ContentId::of_many(&pieces);
        let items: Vec<(ContentId, &[u8])> = ids.iter().copied().zip(pieces).collect();
        store.put_batch(ObjectKind::Inode, &items)?;
        for ((ino, _), id) in encoded.iter().zip(ids) {
            changes.insert(*ino, Some(id));
        }
        self.dirty_bytes = 0;
        // Orphans still open from earlier commits stay orphans.
        for o in &self.base.orphans {
            if !self.removed.contains(o) && !orphans.contains(o) {
                orphans.push(*o);
            }
        }
        orphans.sort_unstable();
        let t_put = t0.elapsed();
        let inodes = radix::update(store, self.base.inodes, &changes)?;
        log::debug!(
            "root: spill {t_spill:?}, inodes encoded {t_encode:?}, stored {t_put:?}, map {:?}",
            t0.elapsed()
        );
        let root = Root {
            version: tree::TREE_VERSION,
            inodes,
            next_ino: self.next_ino,
            orphans,
        };
        let id = tree::put_root(store, &root)?;
        self.base = root;
        Ok(id)
    }
}

/// Length of `buf` without its trailing zeros (scanned a word at a time).
fn data_len(buf: &[u8]) -> usize {
    let mut end = buf.len();
    while end >= 8 {
        let w = u64::from_ne_bytes(buf[end - 8..end].try_into().unwrap_or([1; 8]));
        if w != 0 {
            break;
        }
        end -= 8;
    }
    while end > 0 && buf[end - 1] == 0 {
        end -= 1;
    }
    end
}

/// What a spill did: its blocks (inode, index, bytes), their data lengths, the
/// ids they were stored under (`None` for all-zero ones) and whether the append succeeded.
struct Spilled {
    blocks: Vec<(u64, u64, Arc<Vec<u8>>)>,
    lens: Vec<usize>,
    ids: Vec<Option<ContentId>>,
    stored: FsResult<u64>,
}

/// Stores sealed blocks: all of them hashed together over the cores (hashing is the
/// costly part), then appended with one vectored write. A spill in an untar holds about a
/// thousand small files; a pass and an append per file cost several times as much.
fn store_sealed(store: &Store, blocks: Vec<(u64, u64, Arc<Vec<u8>>)>) -> Spilled {
    let lens: Vec<usize> = blocks.iter().map(|(_, _, b)| data_len(b)).collect();
    let pieces: Vec<&[u8]> = blocks
        .iter()
        .zip(&lens)
        .filter(|(_, len)| **len > 0)
        .map(|((_, _, b), len)| &b[..*len])
        .collect();
    let t0 = std::time::Instant::now();
    let hashed = ContentId::of_many(&pieces);
    let items: Vec<(ContentId, &[u8])> = hashed.iter().copied().zip(pieces).collect();
    let stored = store.put_batch(ObjectKind::Chunk, &items).inspect(|n| {
        log::debug!(
            "spill: {} blocks, {n} new bytes in {:?}",
            lens.len(),
            t0.elapsed()
        );
    });
    drop(items);
    let mut hashed = hashed.into_iter();
    let ids = lens
        .iter()
        .map(|len| if *len > 0 { hashed.next() } else { None })
        .collect();
    Spilled {
        blocks,
        lens,
        ids,
        stored: stored.map_err(FsError::from),
    }
}

/// Writes `data` at `at` in a block kept short (bytes past its end read as zeros): the
/// block grows only as far as the write reaches.
fn block_put(b: &mut Vec<u8>, at: usize, data: &[u8]) {
    let end = at + data.len();
    if b.len() < at {
        b.resize(at, 0);
    }
    let overlap = (b.len() - at).min(data.len());
    b[at..at + overlap].copy_from_slice(&data[..overlap]);
    if end > b.len() {
        b.extend_from_slice(&data[overlap..]);
    }
}

/// Reads `dst.len()` bytes at `at` from a short block (zeros past its end).
fn block_get(b: &[u8], at: usize, dst: &mut [u8]) {
    let have = b.len().saturating_sub(at).min(dst.len());
    if have > 0 {
        dst[..have].copy_from_slice(&b[at..at + have]);
    }
    dst[have..].fill(0);
}

/// Zeroes `len` bytes at `at` in a short block (a range reaching its end shortens it).
fn block_zero(b: &mut Vec<u8>, at: usize, len: usize) {
    if at + len >= b.len() {
        b.truncate(at);
    } else {
        b[at..at + len].fill(0);
    }
}
