//! The filesystem tree as stored: a root object pointing at a radix tree of inodes.
//!
//! ```text
//! Root ──▶ inode table (radix: ino → inode object id)
//!            └▶ Inode { attr, xattrs, body }
//!                 File    → block map (inline list, or radix: block index → chunk)
//!                 Dir     → entries (name → ino, kind)
//!                 Symlink → target
//! ```
//! A commit writes only changed inodes, the radix nodes above them and a new root, so a
//! snapshot is a reference to a root whatever the size of the tree.

use crate::catalog::{CheckpointKind, NewCheckpoint};
use crate::error::{Result, StoreError};
use crate::id::ContentId;
use crate::radix::{self, RadixRoot};
use crate::segment::ObjectKind;
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

/// File data is addressed in blocks of this size.
pub const BLOCK: u64 = 64 * 1024;
/// A file with at most this many mapped blocks keeps its block map inside the inode.
pub const INLINE_BLOCKS: usize = 32;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;
/// Version of the root/inode encoding.
pub const TREE_VERSION: u32 = 1;

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
        }
    }

    /// From `S_IFMT` bits.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }
}

/// A timestamp with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// POSIX attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (no `S_IFMT`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u64,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub btime: Time,
}

impl Attr {
    pub fn new(kind: FileKind, perm: u32, uid: u32, gid: u32) -> Attr {
        let now = Time::now();
        Attr {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: 1,
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
        }
    }
}

/// Where a block's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockRef {
    /// A chunk holding the block's first `len` bytes; the rest of the block is zero.
    Data { id: ContentId, len: u32 },
    /// All zero (a hole, or data not to be taken from the lower file).
    Zero,
}

/// The block map of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BlockMap {
    #[default]
    Empty,
    Inline(Vec<(u64, BlockRef)>),
    Tree(RadixRoot),
}

/// A file's data in the lower directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowerRef {
    /// Path relative to the lower directory.
    pub path: Vec<u8>,
    /// Bytes of the lower file that are visible (truncation shortens this).
    pub len: u64,
    /// Identity recorded at import: size, mtime (s, ns), inode.
    pub size: u64,
    pub mtime: Time,
    pub ino: u64,
}

/// A directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEnt {
    pub ino: u64,
    pub kind: FileKind,
}

/// What an inode holds besides attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    File {
        lower: Option<LowerRef>,
        blocks: BlockMap,
    },
    Dir {
        /// The directory holding this one (the root is its own parent).
        parent: u64,
        entries: BTreeMap<Vec<u8>, DirEnt>,
    },
    Symlink {
        target: Vec<u8>,
    },
    Special,
}

/// An inode as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub body: Body,
}

/// A filesystem root as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub version: u32,
    pub inodes: Option<RadixRoot>,
    pub next_ino: u64,
    /// Inodes with no name that were still open at the commit.
    pub orphans: Vec<u64>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Decode {
        what: "object (encode)",
        id: ContentId([0; 32]),
        reason: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    id: &ContentId,
    b: &[u8],
) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| StoreError::Decode {
        what,
        id: *id,
        reason: e.to_string(),
    })
}

/// Writes an inode object.
pub fn put_inode(store: &Store, inode: &Inode) -> Result<ContentId> {
    store.put(ObjectKind::Inode, &encode_inode(inode)?)
}

/// An inode object's bytes, for callers that store many at once (`Store::put_batch` with
/// `ObjectKind::Inode`).
pub fn encode_inode(inode: &Inode) -> Result<Vec<u8>> {
    encode(inode)
}

/// Reads an inode object.
pub fn get_inode(store: &Store, id: &ContentId) -> Result<Inode> {
    decode("inode", id, &store.get(id)?)
}

/// Writes a root object.
pub fn put_root(store: &Store, root: &Root) -> Result<ContentId> {
    store.put(ObjectKind::Root, &encode(root)?)
}

/// Reads a root object, refusing newer versions.
pub fn get_root(store: &Store, id: &ContentId) -> Result<Root> {
    let r: Root = decode("root", id, &store.get(id)?)?;
    if r.version > TREE_VERSION {
        return Err(StoreError::NewerFormat {
            found: r.version,
            supported: TREE_VERSION,
        });
    }
    Ok(r)
}

/// Looks up block `idx` in a committed block map.
pub fn map_get(store: &Store, map: &BlockMap, idx: u64) -> Result<Option<BlockRef>> {
    match map {
        BlockMap::Empty => Ok(None),
        BlockMap::Inline(v) => Ok(v
            .binary_search_by_key(&idx, |(k, _)| *k)
            .ok()
            .map(|i| v[i].1)),
        BlockMap::Tree(r) => radix::get(store, Some(r), idx),
    }
}

/// The entries of a block map with indices in `from..=to`, in order.
pub fn map_range(
    store: &Store,
    map: &BlockMap,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, BlockRef)>> {
    match map {
        BlockMap::Empty => Ok(Vec::new()),
        BlockMap::Inline(v) => Ok(v
            .iter()
            .filter(|(k, _)| (from..=to).contains(k))
            .copied()
            .collect()),
        BlockMap::Tree(r) => radix::range(store, Some(r), from, to),
    }
}

/// All entries of a block map in order.
pub fn map_entries(store: &Store, map: &BlockMap) -> Result<Vec<(u64, BlockRef)>> {
    match map {
        BlockMap::Empty => Ok(Vec::new()),
        BlockMap::Inline(v) => Ok(v.clone()),
        BlockMap::Tree(r) => {
            let mut out = Vec::new();
            radix::walk::<BlockRef>(store, Some(r), &mut |k, v| {
                out.push((k, *v));
                Ok(())
            })?;
            Ok(out)
        }
    }
}

/// Applies block changes to a map, choosing inline or tree form by size.
pub fn map_update(
    store: &Store,
    map: &BlockMap,
    changes: &BTreeMap<u64, Option<BlockRef>>,
) -> Result<BlockMap> {
    if changes.is_empty() {
        return Ok(map.clone());
    }
    match map {
        BlockMap::Tree(r) => {
            let nr = radix::update(store, Some(*r), changes)?;
            Ok(match nr {
                None => BlockMap::Empty,
                Some(r) => BlockMap::Tree(r),
            })
        }
        _ => {
            let mut all: BTreeMap<u64, BlockRef> = map_entries(store, map)?.into_iter().collect();
            for (k, v) in changes {
                match v {
                    Some(v) => all.insert(*k, *v),
                    None => all.remove(k),
                };
            }
            if all.is_empty() {
                Ok(BlockMap::Empty)
            } else if all.len() <= INLINE_BLOCKS {
                Ok(BlockMap::Inline(all.into_iter().collect()))
            } else {
                let ch: BTreeMap<u64, Option<BlockRef>> =
                    all.into_iter().map(|(k, v)| (k, Some(v))).collect();
                Ok(radix::update(store, None, &ch)?
                    .map(BlockMap::Tree)
                    .unwrap_or(BlockMap::Empty))
            }
        }
    }
}

/// Builds the first tree of a new store (empty, or imported from the lower directory's
/// metadata) and commits it as the head of branch `main`.
pub fn init_tree(store: &Arc<Store>, lower: Option<&Path>) -> Result<()> {
    let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut root = Inode {
        attr: Attr::new(FileKind::Dir, 0o755, uid, gid),
        xattrs: BTreeMap::new(),
        body: Body::Dir {
            parent: ROOT_INO,
            entries: BTreeMap::new(),
        },
    };
    root.attr.nlink = 2;
    inodes.insert(ROOT_INO, root);
    let mut next = ROOT_INO + 1;
    if let Some(lower) = lower {
        import_lower(lower, &mut inodes, &mut next)?;
    }
    let mut changes = BTreeMap::new();
    for (ino, inode) in &inodes {
        changes.insert(*ino, Some(put_inode(store, inode)?));
    }
    let table = radix::update(store, None, &changes)?;
    let rid = put_root(
        store,
        &Root {
            version: TREE_VERSION,
            inodes: table,
            next_ino: next,
            orphans: Vec::new(),
        },
    )?;
    store.commit(Some(&NewCheckpoint {
        branch: "main",
        root: rid,
        name: None,
        kind: CheckpointKind::Commit,
        image: None,
        note: Some("init"),
        advance_head: true,
        parent: None,
    }))?;
    Ok(())
}

fn time_of(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: nsec as u32,
    }
}

fn import_lower(lower: &Path, inodes: &mut BTreeMap<u64, Inode>, next: &mut u64) -> Result<()> {
    let lerr = |source: std::io::Error| StoreError::Lower {
        path: lower.to_path_buf(),
        source,
    };
    let mut dir_inos: HashMap<std::path::PathBuf, u64> = HashMap::new();
    dir_inos.insert(lower.to_path_buf(), ROOT_INO);
    let mut hard: HashMap<(u64, u64), u64> = HashMap::new();
    let rootmd = std::fs::symlink_metadata(lower).map_err(lerr)?;
    if let Some(r) = inodes.get_mut(&ROOT_INO) {
        r.attr.perm = rootmd.mode() & 0o7777;
        r.attr.uid = rootmd.uid();
        r.attr.gid = rootmd.gid();
        r.attr.mtime = time_of(rootmd.mtime(), rootmd.mtime_nsec());
        r.attr.atime = time_of(rootmd.atime(), rootmd.atime_nsec());
        r.attr.ctime = time_of(rootmd.ctime(), rootmd.ctime_nsec());
    }
    for entry in walkdir::WalkDir::new(lower)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| lower.to_path_buf());
            StoreError::Lower {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk failed")),
            }
        })?;
        let md = entry.metadata().map_err(|e| StoreError::Lower {
            path: entry.path().to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("stat failed")),
        })?;
        let parent_path = entry.path().parent().unwrap_or(lower);
        let Some(&parent) = dir_inos.get(parent_path) else {
            continue;
        };
        let name = entry.file_name().as_bytes().to_vec();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_file() {
            FileKind::File
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else if ft.is_char_device() {
            FileKind::CharDev
        } else {
            FileKind::BlockDev
        };
        let existing = if kind != FileKind::Dir && md.nlink() > 1 {
            hard.get(&(md.dev(), md.ino())).copied()
        } else {
            None
        };
        let ino = match existing {
            Some(ino) => ino,
            None => {
                let ino = *next;
                *next += 1;
                let rel = entry
                    .path()
                    .strip_prefix(lower)
                    .unwrap_or(entry.path())
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
                let body = match kind {
                    FileKind::Dir => Body::Dir {
                        parent,
                        entries: BTreeMap::new(),
                    },
                    FileKind::File => Body::File {
                        lower: Some(LowerRef {
                            path: rel,
                            len: md.len(),
                            size: md.len(),
                            mtime: time_of(md.mtime(), md.mtime_nsec()),
                            ino: md.ino(),
                        }),
                        blocks: BlockMap::Empty,
                    },
                    FileKind::Symlink => Body::Symlink {
                        target: std::fs::read_link(entry.path())
                            .map_err(|source| StoreError::Lower {
                                path: entry.path().to_path_buf(),
                                source,
                            })?
                            .as_os_str()
                            .as_bytes()
                            .to_vec(),
                    },
                    _ => Body::Special,
                };
                let mut xattrs = BTreeMap::new();
                if kind != FileKind::Symlink {
                    read_xattrs(entry.path(), &mut xattrs);
                }
                inodes.insert(
                    ino,
                    Inode {
                        attr: Attr {
                            kind,
                            perm: md.mode() & 0o7777,
                            uid: md.uid(),
                            gid: md.gid(),
                            nlink: if kind == FileKind::Dir { 2 } else { 0 },
                            rdev: md.rdev(),
                            size: md.len(),
                            atime: time_of(md.atime(), md.atime_nsec()),
                            mtime: time_of(md.mtime(), md.mtime_nsec()),
                            ctime: time_of(md.ctime(), md.ctime_nsec()),
                            btime: time_of(md.ctime(), md.ctime_nsec()),
                        },
                        xattrs,
                        body,
                    },
                );
                if kind != FileKind::Dir && md.nlink() > 1 {
                    hard.insert((md.dev(), md.ino()), ino);
                }
                if kind == FileKind::Dir {
                    dir_inos.insert(entry.path().to_path_buf(), ino);
                }
                ino
            }
        };
        if kind != FileKind::Dir {
            if let Some(i) = inodes.get_mut(&ino) {
                i.attr.nlink += 1;
            }
        }
        if let Some(p) = inodes.get_mut(&parent) {
            if let Body::Dir { entries, .. } = &mut p.body {
                entries.insert(name, DirEnt { ino, kind });
            }
            if kind == FileKind::Dir {
                p.attr.nlink += 1;
            }
        }
    }
    Ok(())
}

fn read_xattrs(path: &Path, out: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: `c` is a valid NUL-terminated path; `names` is a writable buffer of the given
    // length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return;
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cn) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut val = vec![0u8; 65536];
        // SAFETY: valid NUL-terminated path and name; `val` is writable for its length.
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m >= 0 {
            val.truncate(m as usize);
            out.insert(name.to_vec(), val);
        }
    }
}

/// A read-only view of a committed tree.
pub struct TreeView {
    pub store: Arc<Store>,
    pub root: Root,
    pub root_id: ContentId,
}

impl TreeView {
    /// Opens the tree of root object `id`.
    pub fn open(store: Arc<Store>, id: ContentId) -> Result<TreeView> {
        let root = get_root(&store, &id)?;
        Ok(TreeView {
            store,
            root,
            root_id: id,
        })
    }

    /// Opens the tree of a checkpoint (by name or `#CNO`).
    pub fn at(store: Arc<Store>, name: &str) -> Result<TreeView> {
        let cp = store.find(name)?;
        Self::open(store, cp.root)
    }

    /// The inode object id of `ino`.
    pub fn inode_id(&self, ino: u64) -> Result<Option<ContentId>> {
        radix::get(&self.store, self.root.inodes.as_ref(), ino)
    }

    /// Reads inode `ino`.
    pub fn inode(&self, ino: u64) -> Result<Option<Inode>> {
        match self.inode_id(ino)? {
            Some(id) => get_inode(&self.store, &id).map(Some),
            None => Ok(None),
        }
    }

    /// Resolves a path relative to the root (no symlinks followed).
    pub fn lookup(&self, path: &Path) -> Result<Option<(u64, Inode)>> {
        let mut ino = ROOT_INO;
        let Some(mut cur) = self.inode(ino)? else {
            return Ok(None);
        };
        for comp in path.components() {
            let name = match comp {
                std::path::Component::Normal(n) => n.as_bytes(),
                std::path::Component::RootDir | std::path::Component::CurDir => continue,
                _ => return Ok(None),
            };
            let Body::Dir { entries, .. } = &cur.body else {
                return Ok(None);
            };
            let Some(e) = entries.get(name) else {
                return Ok(None);
            };
            ino = e.ino;
            let Some(next) = self.inode(ino)? else {
                return Ok(None);
            };
            cur = next;
        }
        Ok(Some((ino, cur)))
    }

    /// Reads `len` bytes at `off` of a file inode.
    pub fn read(&self, inode: &Inode, off: u64, len: usize) -> Result<Vec<u8>> {
        let Body::File { lower, blocks } = &inode.body else {
            return Ok(Vec::new());
        };
        let end = off.saturating_add(len as u64).min(inode.attr.size);
        let mut out = Vec::with_capacity(end.saturating_sub(off) as usize);
        let mut pos = off;
        while pos < end {
            let idx = pos / BLOCK;
            let boff = (pos % BLOCK) as usize;
            let n = ((BLOCK as usize - boff) as u64).min(end - pos) as usize;
            let block = read_block(
                &self.store,
                lower.as_ref(),
                map_get(&self.store, blocks, idx)?,
                idx,
            )?;
            out.extend_from_slice(&block[boff..boff + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    /// Reads a whole file.
    pub fn read_all(&self, inode: &Inode) -> Result<Vec<u8>> {
        self.read(inode, 0, inode.attr.size as usize)
    }

    /// Every (ino, inode object id).
    pub fn inode_ids(&self) -> Result<Vec<(u64, ContentId)>> {
        let mut v = Vec::new();
        radix::walk::<ContentId>(&self.store, self.root.inodes.as_ref(), &mut |k, id| {
            v.push((k, *id));
            Ok(())
        })?;
        Ok(v)
    }

    /// Paths of every named inode (hard links give several).
    pub fn paths(&self) -> Result<HashMap<u64, Vec<String>>> {
        let mut out: HashMap<u64, Vec<String>> = HashMap::new();
        out.entry(ROOT_INO).or_default().push("/".into());
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, path)) = stack.pop() {
            let Some(i) = self.inode(ino)? else { continue };
            if let Body::Dir { entries, .. } = i.body {
                for (name, e) in entries {
                    let p = format!("{path}/{}", String::from_utf8_lossy(&name));
                    out.entry(e.ino).or_default().push(p.clone());
                    if e.kind == FileKind::Dir {
                        stack.push((e.ino, p));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The full `BLOCK` bytes of block `idx` of a file.
pub fn read_block(
    store: &Store,
    lower: Option<&LowerRef>,
    r: Option<BlockRef>,
    idx: u64,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK as usize];
    match r {
        Some(BlockRef::Data { id, len }) => {
            let data = store.get(&id)?;
            let n = (len as usize).min(data.len()).min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
        }
        Some(BlockRef::Zero) => {}
        None => {
            if let Some(l) = lower {
                let start = idx * BLOCK;
                if start < l.len {
                    let want = ((l.len - start).min(BLOCK)) as usize;
                    read_lower(store, l, start, &mut buf[..want])?;
                }
            }
        }
    }
    Ok(buf)
}

/// Reads from the lower file into `buf` (short files read as zeros past their end).
pub fn read_lower(store: &Store, l: &LowerRef, off: u64, buf: &mut [u8]) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let Some(base) = store.lower() else {
        return Err(StoreError::Lower {
            path: std::path::PathBuf::from(String::from_utf8_lossy(&l.path).into_owned()),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "store has no lower directory",
            ),
        });
    };
    let path = base.join(std::ffi::OsStr::from_bytes(&l.path));
    let f = std::fs::File::open(&path).map_err(|source| StoreError::Lower {
        path: path.clone(),
        source,
    })?;
    let mut done = 0;
    while done < buf.len() {
        let n = f
            .read_at(&mut buf[done..], off + done as u64)
            .map_err(|source| StoreError::Lower {
                path: path.clone(),
                source,
            })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// How an inode differs between two trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DiffKind {
    Added,
    Removed,
    Modified,
    /// Moved to other names (none of its old names is left), changed or not.
    Renamed,
    /// Another inode took its names: written under a temporary name and renamed over it,
    /// as editors and git do. Named by the new inode.
    Replaced,
}

/// One difference between two trees, named by its paths (in the newer tree, or the older one
/// for a removal; `unlinked inode N` if it has no name); a renamed inode also by its names in
/// the older tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    pub kind: DiffKind,
    pub ino: u64,
    pub paths: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub old_paths: Vec<String>,
}

/// Differences between the trees of roots `a` and `b`. The inode tables are compared by
/// walking only the radix subtrees whose ids differ; the changed inodes are then named from the
/// directories of the trees. Directories whose only change is an entry are listed too.
pub fn diff(store: &Arc<Store>, a: ContentId, b: ContentId) -> Result<Vec<DiffEntry>> {
    let va = TreeView::open(store.clone(), a)?;
    let vb = TreeView::open(store.clone(), b)?;
    let changes =
        radix::diff::<ContentId>(store, va.root.inodes.as_ref(), vb.root.inodes.as_ref())?;
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let (pa, pb) = (va.paths()?, vb.paths()?);
    let name = |ino: u64, p: &HashMap<u64, Vec<String>>| {
        p.get(&ino)
            .cloned()
            .unwrap_or_else(|| vec![format!("unlinked inode {ino}")])
    };
    let mut out: Vec<DiffEntry> = changes
        .into_iter()
        .map(|c| match c {
            radix::Change::Added(ino, _) => DiffEntry {
                kind: DiffKind::Added,
                ino,
                paths: name(ino, &pb),
                old_paths: Vec::new(),
            },
            radix::Change::Removed(ino, _) => DiffEntry {
                kind: DiffKind::Removed,
                ino,
                paths: name(ino, &pa),
                old_paths: Vec::new(),
            },
            radix::Change::Modified(ino, _, _) => {
                let (old, new) = (name(ino, &pa), name(ino, &pb));
                let moved = old.iter().all(|p| !new.contains(p));
                DiffEntry {
                    kind: if moved {
                        DiffKind::Renamed
                    } else {
                        DiffKind::Modified
                    },
                    ino,
                    paths: new,
                    old_paths: if moved { old } else { Vec::new() },
                }
            }
        })
        .collect();
    // A removed inode whose names an added one has now: one replaced file, not two changes.
    let added: HashMap<Vec<String>, usize> = out
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == DiffKind::Added)
        .map(|(i, e)| (e.paths.clone(), i))
        .collect();
    let mut gone = vec![false; out.len()];
    for i in 0..out.len() {
        if out[i].kind != DiffKind::Removed {
            continue;
        }
        if let Some(&j) = added.get(&out[i].paths) {
            if out[j].kind == DiffKind::Added {
                out[j].kind = DiffKind::Replaced;
                gone[i] = true;
            }
        }
    }
    let mut keep = gone.iter().map(|g| !g);
    out.retain(|_| keep.next().unwrap_or(true));
    Ok(out)
}
