//! Differential test of the FUSE overlay against tmpfs: the same random sequence of syscalls
//! goes to a fresh forkpoint mount and to a private tmpfs, and after every step the two must
//! agree on return values, errno, file contents, symlink targets, xattrs, the hard-link
//! structure and the stat fields that must agree (type, permission bits, nlink, uid, gid, and
//! size of regular files and symlinks). Times are compared only where utimensat set them
//! explicitly, until the next operation that may change them.
//!
//! Not compared, by design: st_blocks and st_blksize (allocation differs), directory st_size
//! (tmpfs counts entries, forkpoint reports 0), ctime and implicit times, inode numbers
//! (only which names share one), SEEK_DATA/SEEK_HOLE (tmpfs has page-sized holes, forkpoint
//! 64 KiB blocks) and FALLOC_FL_ZERO_RANGE (tmpfs does not support it).
//!
//! Every so often the run takes a `forkpoint snapshot`, which must change nothing visible;
//! the snapshot under `.forkpoint/snapshots/NAME` must equal the tmpfs tree at that moment
//! (with write bits cleared: snapshots are read-only), both at once and again at the end of
//! the run and after a remount.
//!
//! Every 1000 steps, if the tree has grown past 120 entries (renaming directories into one
//! another nests them without bound), its biggest top-level entry is removed on both sides,
//! one compared unlink or rmdir at a time, so that long runs keep a steady pace.
//!
//! `FORKPOINT_DIFF_OPS` sets the number of operations (default 3000), `FORKPOINT_DIFF_SEED`
//! the seed (default: from the clock; printed at the start and in every failure).

mod common;

use common::{fp_ok, Lab, Rng, Watchdog};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CString, OsStr};
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An errno.
type Errno = i32;

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("test paths contain no NUL")
}

fn cname(s: &[u8]) -> CString {
    CString::new(s).expect("xattr names contain no NUL")
}

fn check(r: i64) -> Result<i64, Errno> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn errno_name(e: Errno) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ESTALE => "ESTALE",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        _ => "",
    };
    format!("{n}({e})")
}

// ----- stat --------------------------------------------------------------------------------

/// The stat fields both filesystems must agree on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    kind: u32,
    perm: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    /// Size of regular files and symlinks; `None` for directories.
    size: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct St {
    key: Key,
    ino: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
}

fn st_of(s: &libc::stat) -> St {
    let kind = s.st_mode & libc::S_IFMT;
    St {
        key: Key {
            kind,
            perm: s.st_mode & 0o7777,
            nlink: s.st_nlink,
            uid: s.st_uid,
            gid: s.st_gid,
            size: (kind == libc::S_IFREG || kind == libc::S_IFLNK).then_some(s.st_size as u64),
        },
        ino: s.st_ino,
        atime: (s.st_atime, s.st_atime_nsec),
        mtime: (s.st_mtime, s.st_mtime_nsec),
    }
}

fn lstat(p: &Path, follow: bool) -> Result<St, Errno> {
    let c = cpath(p);
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut s: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `s` is a writable stat buffer.
    let r = unsafe {
        if follow {
            libc::stat(c.as_ptr(), &mut s)
        } else {
            libc::lstat(c.as_ptr(), &mut s)
        }
    };
    check(i64::from(r)).map(|_| st_of(&s))
}

fn fstat(fd: RawFd) -> Result<St, Errno> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut s: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `s` is a writable stat buffer; a bad fd only yields EBADF.
    let r = unsafe { libc::fstat(fd, &mut s) };
    check(i64::from(r)).map(|_| st_of(&s))
}

// ----- syscall wrappers ----------------------------------------------------------------------

fn sys_open(p: &Path, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated; open has no other memory effects.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sys_write(fd: RawFd, data: &[u8], off: Option<i64>) -> Result<i64, Errno> {
    // SAFETY: `data` is readable for its length.
    let r = unsafe {
        match off {
            Some(o) => libc::pwrite(fd, data.as_ptr().cast(), data.len(), o),
            None => libc::write(fd, data.as_ptr().cast(), data.len()),
        }
    };
    check(r as i64)
}

fn sys_read(fd: RawFd, n: usize, off: Option<i64>) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` is writable for `n` bytes.
    let r = unsafe {
        match off {
            Some(o) => libc::pread(fd, buf.as_mut_ptr().cast(), n, o),
            None => libc::read(fd, buf.as_mut_ptr().cast(), n),
        }
    };
    let n = check(r as i64)?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// Reads a whole file through `fd` with pread (the file offset does not move).
fn read_fd_all(fd: RawFd) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    loop {
        let chunk = sys_read(fd, 1 << 20, Some(out.len() as i64))?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
    }
}

fn sys_lseek(fd: RawFd, off: i64, whence: i32) -> Result<i64, Errno> {
    // SAFETY: lseek has no memory effects.
    check(unsafe { libc::lseek(fd, off, whence) })
}

fn sys_ftruncate(fd: RawFd, len: i64) -> Result<i64, Errno> {
    // SAFETY: ftruncate has no memory effects.
    check(i64::from(unsafe { libc::ftruncate(fd, len) }))
}

fn sys_truncate(p: &Path, len: i64) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe { libc::truncate(c.as_ptr(), len) }))
}

fn sys_fallocate(fd: RawFd, mode: i32, off: i64, len: i64) -> Result<i64, Errno> {
    // SAFETY: fallocate has no memory effects.
    check(i64::from(unsafe { libc::fallocate(fd, mode, off, len) }))
}

fn sys_copy_file_range(
    fin: RawFd,
    off_in: Option<i64>,
    fout: RawFd,
    off_out: Option<i64>,
    len: usize,
) -> Result<(i64, Option<i64>, Option<i64>), Errno> {
    let mut oi = off_in.unwrap_or(0);
    let mut oo = off_out.unwrap_or(0);
    let pi: *mut i64 = if off_in.is_some() {
        &mut oi
    } else {
        std::ptr::null_mut()
    };
    let po: *mut i64 = if off_out.is_some() {
        &mut oo
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: the offset pointers are null or point at live locals.
    let r = unsafe { libc::copy_file_range(fin, pi, fout, po, len, 0) };
    let n = check(r as i64)?;
    Ok((n, off_in.map(|_| oi), off_out.map(|_| oo)))
}

fn sys_rename(a: &Path, b: &Path, flags: u32) -> Result<i64, Errno> {
    let (ca, cb) = (cpath(a), cpath(b));
    // SAFETY: both paths are NUL-terminated.
    check(i64::from(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    }))
}

fn sys_link(a: &Path, b: &Path) -> Result<i64, Errno> {
    let (ca, cb) = (cpath(a), cpath(b));
    // SAFETY: both paths are NUL-terminated.
    check(i64::from(unsafe { libc::link(ca.as_ptr(), cb.as_ptr()) }))
}

fn sys_unlink(p: &Path) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe { libc::unlink(c.as_ptr()) }))
}

fn sys_mkdir(p: &Path, mode: u32) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe { libc::mkdir(c.as_ptr(), mode) }))
}

fn sys_rmdir(p: &Path) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe { libc::rmdir(c.as_ptr()) }))
}

fn sys_symlink(target: &str, p: &Path) -> Result<i64, Errno> {
    let (ct, cp) = (cname(target.as_bytes()), cpath(p));
    // SAFETY: both strings are NUL-terminated.
    check(i64::from(unsafe {
        libc::symlink(ct.as_ptr(), cp.as_ptr())
    }))
}

fn sys_readlink(p: &Path) -> Result<Vec<u8>, Errno> {
    let c = cpath(p);
    let mut buf = vec![0u8; 8192];
    // SAFETY: `c` is NUL-terminated and `buf` is writable for its length.
    let r = unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = check(r as i64)?;
    buf.truncate(n as usize);
    Ok(buf)
}

fn sys_chmod(p: &Path, mode: u32) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe { libc::chmod(c.as_ptr(), mode) }))
}

fn sys_lchown(p: &Path, uid: u32, gid: u32, follow: bool) -> Result<i64, Errno> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated.
    check(i64::from(unsafe {
        if follow {
            libc::chown(c.as_ptr(), uid, gid)
        } else {
            libc::lchown(c.as_ptr(), uid, gid)
        }
    }))
}

fn sys_utimensat(p: &Path, t: &[libc::timespec; 2], nofollow: bool) -> Result<i64, Errno> {
    let c = cpath(p);
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: `c` is NUL-terminated and `t` points at two timespecs.
    check(i64::from(unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), flags)
    }))
}

fn sys_fsync(fd: RawFd) -> Result<i64, Errno> {
    // SAFETY: fsync has no memory effects.
    check(i64::from(unsafe { libc::fsync(fd) }))
}

fn sys_setxattr(p: &Path, name: &[u8], v: &[u8], flags: i32, follow: bool) -> Result<i64, Errno> {
    let (c, n) = (cpath(p), cname(name));
    // SAFETY: path and name are NUL-terminated; `v` is readable for its length.
    check(i64::from(unsafe {
        if follow {
            libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags)
        } else {
            libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags)
        }
    }))
}

fn sys_getxattr(p: &Path, name: &[u8], size: usize, follow: bool) -> Result<Vec<u8>, Errno> {
    let (c, n) = (cpath(p), cname(name));
    let mut buf = vec![0u8; size];
    // SAFETY: path and name are NUL-terminated; `buf` is writable for `size` bytes (a null
    // pointer with size 0 asks for the length).
    let r = unsafe {
        let ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        if follow {
            libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, size)
        } else {
            libc::lgetxattr(c.as_ptr(), n.as_ptr(), ptr, size)
        }
    };
    let len = check(r as i64)?;
    if size == 0 {
        return Ok(len.to_le_bytes().to_vec());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// Sorted xattr names (`l`-variant unless `follow`).
fn sys_listxattr(p: &Path, follow: bool) -> Result<Vec<Vec<u8>>, Errno> {
    let c = cpath(p);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `c` is NUL-terminated and `buf` is writable for its length.
    let r = unsafe {
        if follow {
            libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        } else {
            libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }
    };
    let n = check(r as i64)?;
    buf.truncate(n as usize);
    let mut names: Vec<Vec<u8>> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    names.sort();
    Ok(names)
}

fn sys_removexattr(p: &Path, name: &[u8], follow: bool) -> Result<i64, Errno> {
    let (c, n) = (cpath(p), cname(name));
    // SAFETY: path and name are NUL-terminated.
    check(i64::from(unsafe {
        if follow {
            libc::removexattr(c.as_ptr(), n.as_ptr())
        } else {
            libc::lremovexattr(c.as_ptr(), n.as_ptr())
        }
    }))
}

fn sys_readdir(p: &Path) -> Result<Vec<Vec<u8>>, Errno> {
    let rd = std::fs::read_dir(p).map_err(|e| e.raw_os_error().unwrap_or(0))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| e.raw_os_error().unwrap_or(0))?;
        names.push(e.file_name().as_bytes().to_vec());
    }
    names.sort();
    Ok(names)
}

// ----- results -----------------------------------------------------------------------------

/// What one side of an operation returned.
#[derive(PartialEq, Eq)]
enum Res {
    Num(i64),
    Data(Vec<u8>),
    Names(Vec<Vec<u8>>),
    Stat(Key),
    Err(Errno),
}

impl fmt::Debug for Res {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Res::Num(n) => write!(f, "Ok({n})"),
            Res::Data(d) => write!(f, "Data({} bytes: {})", d.len(), preview(d)),
            Res::Names(n) => {
                let v: Vec<_> = n.iter().map(|x| String::from_utf8_lossy(x)).collect();
                write!(f, "Names({v:?})")
            }
            Res::Stat(k) => write!(f, "{k:?}"),
            Res::Err(e) => write!(f, "Err({})", errno_name(*e)),
        }
    }
}

fn preview(d: &[u8]) -> String {
    let head: Vec<String> = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}{}", head.join(""), if d.len() > 16 { "…" } else { "" })
}

fn num<T>(r: Result<T, Errno>, f: impl FnOnce(T) -> i64) -> Res {
    match r {
        Ok(v) => Res::Num(f(v)),
        Err(e) => Res::Err(e),
    }
}

fn data(r: Result<Vec<u8>, Errno>) -> Res {
    match r {
        Ok(v) => Res::Data(v),
        Err(e) => Res::Err(e),
    }
}

fn names(r: Result<Vec<Vec<u8>>, Errno>) -> Res {
    match r {
        Ok(v) => Res::Names(v),
        Err(e) => Res::Err(e),
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

// ----- tree snapshots ----------------------------------------------------------------------

/// Extended attributes: (name, value), sorted by name.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One name in a tree, as both filesystems must agree on it.
#[derive(Clone, PartialEq, Eq)]
struct Node {
    key: Key,
    /// File contents or symlink target.
    content: Vec<u8>,
    xattrs: Xattrs,
}

/// A whole tree: every path ("" is the root) and the groups of names sharing an inode.
#[derive(Clone, PartialEq, Eq)]
struct Tree {
    nodes: BTreeMap<String, Node>,
    links: Vec<Vec<String>>,
}

fn xattrs_of(p: &Path) -> Result<Xattrs, String> {
    let names = sys_listxattr(p, false)
        .map_err(|e| format!("llistxattr {}: {}", p.display(), errno_name(e)))?;
    let mut out = Vec::new();
    for n in names {
        let v = sys_getxattr(p, &n, 64 * 1024, false).map_err(|e| {
            format!(
                "lgetxattr {} {}: {}",
                p.display(),
                String::from_utf8_lossy(&n),
                errno_name(e)
            )
        })?;
        out.push((n, v));
    }
    Ok(out)
}

/// Reads the tree under `root` (not following symlinks). Files open for reading in `open`
/// (inode -> descriptor) are read through that descriptor: on FUSE, closing a file writes
/// its dirty pages back, and a check must not flush what the next operation would find
/// still in the page cache.
fn capture(root: &Path, open: &BTreeMap<u64, RawFd>) -> Result<Tree, String> {
    let mut nodes = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let st =
            lstat(&p, false).map_err(|e| format!("lstat {}: {}", p.display(), errno_name(e)))?;
        let content = match st.key.kind {
            libc::S_IFREG => match open.get(&st.ino) {
                Some(fd) => read_fd_all(*fd).map_err(|e| {
                    format!("pread {} through fd {fd}: {}", p.display(), errno_name(e))
                })?,
                None => std::fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?,
            },
            libc::S_IFLNK => sys_readlink(&p)
                .map_err(|e| format!("readlink {}: {}", p.display(), errno_name(e)))?,
            libc::S_IFDIR => {
                let list = sys_readdir(&p)
                    .map_err(|e| format!("readdir {}: {}", p.display(), errno_name(e)))?;
                for n in list {
                    let n = String::from_utf8(n).map_err(|_| "non-UTF-8 name".to_string())?;
                    stack.push(if rel.is_empty() {
                        n
                    } else {
                        format!("{rel}/{n}")
                    });
                }
                Vec::new()
            }
            _ => Vec::new(),
        };
        if st.key.kind != libc::S_IFDIR {
            by_ino.entry(st.ino).or_default().push(rel.clone());
        }
        let xattrs = xattrs_of(&p)?;
        nodes.insert(
            rel,
            Node {
                key: st.key,
                content,
                xattrs,
            },
        );
    }
    let mut links: Vec<Vec<String>> = by_ino
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    links.sort();
    Ok(Tree { nodes, links })
}

/// The tree as a read-only snapshot shows it: no write permission bits.
fn read_only_view(t: &Tree) -> Tree {
    let mut t = t.clone();
    for n in t.nodes.values_mut() {
        n.key.perm &= !0o222;
    }
    t
}

/// Describes the first difference between two trees, if any.
fn tree_diff(want: &Tree, got: &Tree) -> Option<String> {
    for (p, w) in &want.nodes {
        let Some(g) = got.nodes.get(p) else {
            return Some(format!("/{p}: missing (want {:?})", w.key));
        };
        if w.key != g.key {
            return Some(format!(
                "/{p}: stat differs: want {:?}, got {:?}",
                w.key, g.key
            ));
        }
        if w.content != g.content {
            let at = first_diff(&w.content, &g.content).unwrap_or(0);
            return Some(format!(
                "/{p}: content differs at byte {at}: want {} bytes ({}), got {} bytes ({})",
                w.content.len(),
                preview(&w.content[at.min(w.content.len())..]),
                g.content.len(),
                preview(&g.content[at.min(g.content.len())..])
            ));
        }
        if w.xattrs != g.xattrs {
            let show = |x: &Xattrs| -> Vec<String> {
                x.iter()
                    .map(|(n, v)| format!("{}={}", String::from_utf8_lossy(n), preview(v)))
                    .collect()
            };
            return Some(format!(
                "/{p}: xattrs differ: want {:?}, got {:?}",
                show(&w.xattrs),
                show(&g.xattrs)
            ));
        }
    }
    if let Some(p) = got.nodes.keys().find(|p| !want.nodes.contains_key(*p)) {
        return Some(format!("/{p}: unexpected (not in the reference)"));
    }
    if want.links != got.links {
        return Some(format!(
            "hard links differ: want {:?}, got {:?}",
            want.links, got.links
        ));
    }
    None
}

// ----- the run -----------------------------------------------------------------------------

/// Paths the operations draw from (small, so that operations interact).
const POOL: &[&str] = &[
    "a", "b", "c", "d", "a/a", "a/b", "a/c", "b/a", "b/b", "b/c", "c/a", "a/b/a", "a/b/c",
];
/// Symlink targets (relative, without `..`, so both roots resolve them alike).
const TARGETS: &[&str] = &["a", "b", "c", "d", "a/b", "b/a", "nope", "a/b/c"];
const XNAMES: &[&[u8]] = &[b"user.x", b"user.y", b"user.long.attribute.name"];
/// Files are kept below this size so that comparing whole trees stays cheap; rare large
/// writes still take a file past 32 blocks of 64 KiB, where its block map becomes a radix
/// tree.
const MAX_SIZE: u64 = 3 << 20;

struct FdPair {
    fd: [OwnedFd; 2],
    acc: i32,
    flags: i32,
    path: String,
}

/// Explicitly set times of a path, valid until the next operation that may change them.
struct Pin {
    path: String,
    follow: bool,
    atime: Option<(i64, i64)>,
    mtime: Option<(i64, i64)>,
}

struct Run {
    seed: u64,
    step: u64,
    /// [forkpoint mount, tmpfs].
    roots: [PathBuf; 2],
    mnt: PathBuf,
    fds: Vec<FdPair>,
    pins: Vec<Pin>,
    history: VecDeque<String>,
    snaps: u64,
    /// Snapshots kept for the checks at the end: (name, tree at snapshot time).
    kept: Vec<(String, Tree)>,
}

impl Run {
    fn fail(&self, msg: &str) -> ! {
        let hist: Vec<String> = self
            .history
            .iter()
            .enumerate()
            .map(|(i, h)| format!("  {:>3}: {h}", i as i64 - self.history.len() as i64 + 1))
            .collect();
        panic!(
            "fuse_diff divergence (seed {} = FORKPOINT_DIFF_SEED, step {}): {msg}\nlast operations (0 = failing):\n{}",
            self.seed,
            self.step,
            hist.join("\n")
        );
    }

    fn p(&self, side: usize, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.roots[side].clone()
        } else {
            self.roots[side].join(rel)
        }
    }

    /// Runs `f` on both sides and requires the same result.
    fn same(&self, what: &str, mut f: impl FnMut(usize) -> Res) -> Res {
        let a = f(0);
        let b = f(1);
        if a != b {
            self.fail(&format!("{what}: forkpoint {a:?}, tmpfs {b:?}"));
        }
        a
    }

    fn fd(&self, i: usize, side: usize) -> RawFd {
        self.fds[i].fd[side].as_raw_fd()
    }

    /// The size of the reference file behind fd pair `i` (decides sizes, never compared).
    fn ref_size(&self, i: usize) -> u64 {
        fstat(self.fd(i, 1))
            .map(|s| s.key.size.unwrap_or(0))
            .unwrap_or(0)
    }

    /// Compares everything visible: the trees, the open descriptors and the pinned times.
    fn check_all(&self) {
        self.check(true);
    }

    /// Compares the two sides: timestamps pinned by the last step always; with `full`, also
    /// the whole trees and every open descriptor (offset, stat, contents).
    fn check(&self, full: bool) {
        self.check_pins();
        if !full {
            return;
        }
        let open = |side: usize| -> BTreeMap<u64, RawFd> {
            self.fds
                .iter()
                .filter(|f| f.acc != libc::O_WRONLY)
                .filter_map(|f| {
                    let fd = f.fd[side].as_raw_fd();
                    fstat(fd)
                        .ok()
                        .filter(|s| s.key.kind == libc::S_IFREG)
                        .map(|s| (s.ino, fd))
                })
                .collect()
        };
        let f = capture(&self.roots[0], &open(0))
            .unwrap_or_else(|e| self.fail(&format!("forkpoint: {e}")));
        let t =
            capture(&self.roots[1], &open(1)).unwrap_or_else(|e| self.fail(&format!("tmpfs: {e}")));
        if let Some(d) = tree_diff(&t, &f) {
            self.fail(&format!(
                "trees differ (want = tmpfs, got = forkpoint): {d}"
            ));
        }
        for (i, fp) in self.fds.iter().enumerate() {
            let what = format!("fd #{i} ({}, flags {:#o})", fp.path, fp.flags);
            let st = self.same(&format!("fstat {what}"), |s| match fstat(self.fd(i, s)) {
                Ok(st) => Res::Stat(st.key),
                Err(e) => Res::Err(e),
            });
            self.same(&format!("offset of {what}"), |s| {
                num(sys_lseek(self.fd(i, s), 0, libc::SEEK_CUR), |n| n)
            });
            let regular = matches!(st, Res::Stat(k) if k.kind == libc::S_IFREG);
            if regular && fp.acc != libc::O_WRONLY {
                self.same(&format!("contents through {what}"), |s| {
                    data(read_fd_all(self.fd(i, s)))
                });
            }
        }
    }

    fn check_pins(&self) {
        for pin in &self.pins {
            let (a, b) = (
                lstat(&self.p(0, &pin.path), pin.follow),
                lstat(&self.p(1, &pin.path), pin.follow),
            );
            let (Ok(a), Ok(b)) = (a, b) else {
                self.fail(&format!("stat of pinned {}: {a:?} vs {b:?}", pin.path));
            };
            for (which, want, fa, fb) in [
                ("atime", pin.atime, a.atime, b.atime),
                ("mtime", pin.mtime, a.mtime, b.mtime),
            ] {
                if let Some(w) = want {
                    if fb != w || fa != w {
                        self.fail(&format!(
                            "{which} of {} set to {w:?}: forkpoint {fa:?}, tmpfs {fb:?}",
                            pin.path
                        ));
                    }
                }
            }
        }
    }

    fn close_all(&mut self) {
        self.fds.clear();
    }
}

fn roff(rng: &mut Rng) -> u64 {
    if rng.chance(1, 50) {
        return rng.below(MAX_SIZE - 200_000);
    }
    match rng.below(8) {
        0 => 0,
        1 => rng.below(300),
        2 => 4096 - 100 + rng.below(200),
        3 => 65536 - 200 + rng.below(400),
        4 => 131_072 - 200 + rng.below(400),
        5 => rng.below(8192),
        6 => rng.below(70_000),
        _ => rng.below(200_000),
    }
}

fn rlen(rng: &mut Rng) -> usize {
    if rng.chance(1, 80) {
        return rng.range(2_100_000, 2_400_000) as usize;
    }
    (match rng.below(10) {
        0..=3 => rng.range(1, 64),
        4..=6 => rng.range(65, 5000),
        7..=8 => rng.range(5000, 20_000),
        _ => rng.range(60_000, 70_000),
    }) as usize
}

fn rdata(rng: &mut Rng, n: usize) -> Vec<u8> {
    match rng.below(10) {
        0 | 1 => vec![0u8; n],
        2 => vec![rng.below(256) as u8; n],
        _ => rng.bytes(n),
    }
}

fn rpath(rng: &mut Rng, run: &Run) -> String {
    // Often a path with an open descriptor, so that unlink/rename hit open files.
    if !run.fds.is_empty() && rng.chance(1, 4) {
        return run.fds[rng.below(run.fds.len() as u64) as usize]
            .path
            .clone();
    }
    (*rng.pick(POOL)).to_string()
}

fn rtime(rng: &mut Rng) -> libc::timespec {
    let sec = match rng.below(4) {
        0 => -(rng.below(1_000_000_000) as i64),
        1 => rng.below(4_000_000_000) as i64,
        2 => 1_700_000_000 + rng.below(100_000_000) as i64,
        _ => rng.below(10) as i64,
    };
    let nsec = match rng.below(4) {
        0 => libc::UTIME_NOW,
        1 => libc::UTIME_OMIT,
        2 => 0,
        _ => rng.below(1_000_000_000) as i64,
    };
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Applies one random operation to both sides; returns whether it may have changed times.
fn step(run: &mut Run, rng: &mut Rng) -> bool {
    const OPS: &[(&str, u64)] = &[
        ("open", 12),
        ("close", 5),
        ("write", 10),
        ("pwrite", 8),
        ("read", 5),
        ("pread", 3),
        ("lseek", 2),
        ("ftruncate", 3),
        ("truncate", 3),
        ("fallocate", 5),
        ("copy_file_range", 4),
        ("rename", 7),
        ("link", 4),
        ("unlink", 5),
        ("mkdir", 5),
        ("rmdir", 3),
        ("symlink", 3),
        ("readlink", 2),
        ("chmod", 3),
        ("chown", 1),
        ("utimensat", 4),
        ("setxattr", 3),
        ("getxattr", 2),
        ("listxattr", 1),
        ("removexattr", 2),
        ("stat", 2),
        ("readdir", 2),
        ("fsync", 1),
        ("snapshot", 1),
    ];
    let total: u64 = OPS.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total);
    let mut op = OPS[0].0;
    for (name, w) in OPS {
        if r < *w {
            op = name;
            break;
        }
        r -= w;
    }
    let need_fd = matches!(
        op,
        "close"
            | "write"
            | "pwrite"
            | "read"
            | "pread"
            | "lseek"
            | "ftruncate"
            | "fallocate"
            | "copy_file_range"
            | "fsync"
    );
    let op = if need_fd && run.fds.is_empty() {
        "open"
    } else {
        op
    };
    let fdi = if run.fds.is_empty() {
        0
    } else {
        rng.below(run.fds.len() as u64) as usize
    };
    let fdesc = |run: &Run, i: usize| {
        let f = &run.fds[i];
        format!("fd#{i}({}, {:#o})", f.path, f.flags)
    };
    let mut changes = true;
    match op {
        "open" => {
            if run.fds.len() >= 8 {
                run.fds.remove(rng.below(8) as usize);
            }
            let path = rpath(rng, run);
            let acc = *rng.pick(&[libc::O_RDWR, libc::O_RDWR, libc::O_RDONLY, libc::O_WRONLY]);
            let mut flags = acc;
            for f in [libc::O_CREAT, libc::O_EXCL, libc::O_TRUNC, libc::O_APPEND] {
                if rng.chance(1, if f == libc::O_CREAT { 2 } else { 4 }) {
                    flags |= f;
                }
            }
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o4755, 0o2644, 0o000, 0o777]);
            let desc = format!("open({path}, {flags:#o}, {mode:#o})");
            run.history.push_back(desc.clone());
            let a = sys_open(&run.p(0, &path), flags, mode);
            let b = sys_open(&run.p(1, &path), flags, mode);
            match (a, b) {
                (Ok(fa), Ok(fb)) => run.fds.push(FdPair {
                    fd: [fa, fb],
                    acc,
                    flags,
                    path,
                }),
                (Err(x), Err(y)) if x == y => {}
                (a, b) => run.fail(&format!(
                    "{desc}: forkpoint {:?}, tmpfs {:?}",
                    a.map(|_| ()).map_err(errno_name),
                    b.map(|_| ()).map_err(errno_name)
                )),
            }
        }
        "close" => {
            run.history.push_back(format!("close {}", fdesc(run, fdi)));
            run.fds.remove(fdi);
        }
        "write" | "pwrite" => {
            let mut n = rlen(rng);
            let off = if op == "pwrite" {
                Some(roff(rng))
            } else {
                None
            };
            let base = off.unwrap_or_else(|| {
                sys_lseek(run.fd(fdi, 1), 0, libc::SEEK_CUR).unwrap_or(0) as u64
            });
            let append = run.fds[fdi].flags & libc::O_APPEND != 0;
            let start = if append { run.ref_size(fdi) } else { base };
            if start + n as u64 > MAX_SIZE {
                n = MAX_SIZE.saturating_sub(start).min(n as u64) as usize;
            }
            let buf = rdata(rng, n);
            let desc = format!("{op}({}, {n} bytes, off {off:?})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(
                    sys_write(run.fd(fdi, s), &buf, off.map(|o| o as i64)),
                    |n| n,
                )
            });
        }
        "read" | "pread" => {
            changes = false;
            let n = rlen(rng);
            let off = if op == "pread" { Some(roff(rng)) } else { None };
            let desc = format!("{op}({}, {n}, off {off:?})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                data(sys_read(run.fd(fdi, s), n, off.map(|o| o as i64)))
            });
        }
        "lseek" => {
            changes = false;
            // Directory offsets are filesystem-private cookies: FUSE directories seek with
            // generic_file_llseek, tmpfs with dcache_dir_lseek (EINVAL for SEEK_END).
            if !matches!(fstat(run.fd(fdi, 1)), Ok(s) if s.key.kind == libc::S_IFREG) {
                run.history
                    .push_back(format!("lseek({}) skipped: not a file", fdesc(run, fdi)));
                return false;
            }
            let (off, whence) = match rng.below(3) {
                0 => (roff(rng) as i64, libc::SEEK_SET),
                1 => (rng.below(2000) as i64 - 1000, libc::SEEK_CUR),
                _ => (rng.below(2000) as i64 - 1000, libc::SEEK_END),
            };
            let desc = format!("lseek({}, {off}, {whence})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_lseek(run.fd(fdi, s), off, whence), |n| n)
            });
        }
        "ftruncate" => {
            let len = if rng.chance(1, 4) { 0 } else { roff(rng) };
            let desc = format!("ftruncate({}, {len})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_ftruncate(run.fd(fdi, s), len as i64), |n| n)
            });
        }
        "truncate" => {
            let path = rpath(rng, run);
            let len = if rng.chance(1, 4) { 0 } else { roff(rng) };
            let desc = format!("truncate({path}, {len})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_truncate(&run.p(s, &path), len as i64), |n| n)
            });
        }
        "fallocate" => {
            let mode = *rng.pick(&[
                0,
                libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ]);
            let off = roff(rng);
            let mut len = (rlen(rng) as u64).max(1);
            if mode == 0 && off + len > MAX_SIZE {
                len = MAX_SIZE.saturating_sub(off).max(1);
            }
            let desc = format!("fallocate({}, {mode:#x}, {off}, {len})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(
                    sys_fallocate(run.fd(fdi, s), mode, off as i64, len as i64),
                    |n| n,
                )
            });
        }
        "copy_file_range" => {
            let out = rng.below(run.fds.len() as u64) as usize;
            let off_in = rng.chance(3, 4).then(|| roff(rng) as i64);
            let mut off_out = rng.chance(3, 4).then(|| roff(rng) as i64);
            let mut len = (rlen(rng) as u64).max(1);
            let dst_start = off_out.map(|o| o as u64).unwrap_or_else(|| {
                sys_lseek(run.fd(out, 1), 0, libc::SEEK_CUR).unwrap_or(0) as u64
            });
            if dst_start + len > MAX_SIZE {
                if dst_start >= MAX_SIZE {
                    off_out = Some(rng.below(1000) as i64);
                } else {
                    len = MAX_SIZE - dst_start;
                }
            }
            let desc = format!(
                "copy_file_range({} @{off_in:?} -> {} @{off_out:?}, {len})",
                fdesc(run, fdi),
                fdesc(run, out)
            );
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                match sys_copy_file_range(
                    run.fd(fdi, s),
                    off_in,
                    run.fd(out, s),
                    off_out,
                    len as usize,
                ) {
                    // The returned count and both updated offsets.
                    Ok((n, a, b)) => Res::Names(vec![
                        n.to_le_bytes().to_vec(),
                        a.unwrap_or(-1).to_le_bytes().to_vec(),
                        b.unwrap_or(-1).to_le_bytes().to_vec(),
                    ]),
                    Err(e) => Res::Err(e),
                }
            });
        }
        "rename" => {
            let (a, b) = (rpath(rng, run), rpath(rng, run));
            let flags = *rng.pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]);
            let desc = format!("renameat2({a}, {b}, {flags})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_rename(&run.p(s, &a), &run.p(s, &b), flags), |n| n)
            });
        }
        "link" => {
            let (a, b) = (rpath(rng, run), rpath(rng, run));
            let desc = format!("link({a}, {b})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_link(&run.p(s, &a), &run.p(s, &b)), |n| n)
            });
        }
        "unlink" => {
            let path = rpath(rng, run);
            let desc = format!("unlink({path})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_unlink(&run.p(s, &path)), |n| n));
        }
        "mkdir" => {
            let path = rpath(rng, run);
            let mode = *rng.pick(&[0o755, 0o700, 0o2775, 0o1777, 0o555]);
            let desc = format!("mkdir({path}, {mode:#o})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_mkdir(&run.p(s, &path), mode), |n| n));
        }
        "rmdir" => {
            let path = rpath(rng, run);
            let desc = format!("rmdir({path})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_rmdir(&run.p(s, &path)), |n| n));
        }
        "symlink" => {
            let path = rpath(rng, run);
            let target = *rng.pick(TARGETS);
            let desc = format!("symlink({target} <- {path})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_symlink(target, &run.p(s, &path)), |n| n));
        }
        "readlink" => {
            changes = false;
            let path = rpath(rng, run);
            let desc = format!("readlink({path})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| data(sys_readlink(&run.p(s, &path))));
        }
        "chmod" => {
            let path = if rng.chance(1, 20) {
                String::new()
            } else {
                rpath(rng, run)
            };
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000, 0o444]);
            let mode = if path.is_empty() { mode | 0o700 } else { mode };
            let desc = format!("chmod(/{path}, {mode:#o})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_chmod(&run.p(s, &path), mode), |n| n));
        }
        "chown" => {
            let path = rpath(rng, run);
            let follow = rng.chance(1, 2);
            let uid = *rng.pick(&[0u32, 1000, u32::MAX]);
            let gid = *rng.pick(&[0u32, 100, u32::MAX]);
            let desc = format!(
                "{}chown({path}, {uid}, {gid})",
                if follow { "" } else { "l" }
            );
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_lchown(&run.p(s, &path), uid, gid, follow), |n| n)
            });
        }
        "utimensat" => {
            let path = if rng.chance(1, 20) {
                String::new()
            } else {
                rpath(rng, run)
            };
            let t = [rtime(rng), rtime(rng)];
            let nofollow = rng.chance(1, 3);
            let desc = format!(
                "utimensat(/{path}, [{}.{}, {}.{}], nofollow {nofollow})",
                t[0].tv_sec, t[0].tv_nsec, t[1].tv_sec, t[1].tv_nsec
            );
            run.history.push_back(desc.clone());
            let r = run.same(&desc, |s| {
                num(sys_utimensat(&run.p(s, &path), &t, nofollow), |n| n)
            });
            let explicit = |ts: &libc::timespec| {
                (ts.tv_nsec != libc::UTIME_NOW && ts.tv_nsec != libc::UTIME_OMIT)
                    .then_some((ts.tv_sec, ts.tv_nsec))
            };
            // Times set explicitly stay pinned until the next operation that may change them.
            run.pins.clear();
            if r == Res::Num(0) && (explicit(&t[0]).is_some() || explicit(&t[1]).is_some()) {
                run.pins.push(Pin {
                    path,
                    follow: !nofollow,
                    atime: explicit(&t[0]),
                    mtime: explicit(&t[1]),
                });
            }
            changes = false;
        }
        "setxattr" => {
            let path = rpath(rng, run);
            let name = *rng.pick(XNAMES);
            let vlen = rng.below(100) as usize;
            let v = rdata(rng, vlen);
            let flags = *rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]);
            let follow = rng.chance(1, 2);
            let desc = format!(
                "setxattr({path}, {}, {} bytes, flags {flags}, follow {follow})",
                String::from_utf8_lossy(name),
                v.len()
            );
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(
                    sys_setxattr(&run.p(s, &path), name, &v, flags, follow),
                    |n| n,
                )
            });
        }
        "getxattr" => {
            changes = false;
            let path = rpath(rng, run);
            let name = *rng.pick(XNAMES);
            let size = *rng.pick(&[0usize, 3, 1000]);
            let follow = rng.chance(1, 2);
            let desc = format!(
                "getxattr({path}, {}, size {size}, follow {follow})",
                String::from_utf8_lossy(name)
            );
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                data(sys_getxattr(&run.p(s, &path), name, size, follow))
            });
        }
        "listxattr" => {
            changes = false;
            let path = rpath(rng, run);
            let follow = rng.chance(1, 2);
            let desc = format!("listxattr({path}, follow {follow})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| names(sys_listxattr(&run.p(s, &path), follow)));
        }
        "removexattr" => {
            let path = rpath(rng, run);
            let name = *rng.pick(XNAMES);
            let follow = rng.chance(1, 2);
            let desc = format!(
                "removexattr({path}, {}, follow {follow})",
                String::from_utf8_lossy(name)
            );
            run.history.push_back(desc.clone());
            run.same(&desc, |s| {
                num(sys_removexattr(&run.p(s, &path), name, follow), |n| n)
            });
        }
        "stat" => {
            changes = false;
            let path = rpath(rng, run);
            let follow = rng.chance(1, 2);
            let desc = format!("stat({path}, follow {follow})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| match lstat(&run.p(s, &path), follow) {
                Ok(st) => Res::Stat(st.key),
                Err(e) => Res::Err(e),
            });
        }
        "readdir" => {
            changes = false;
            let path = if rng.chance(1, 3) {
                String::new()
            } else {
                rpath(rng, run)
            };
            let desc = format!("readdir(/{path})");
            run.history.push_back(desc.clone());
            run.same(&desc, |s| names(sys_readdir(&run.p(s, &path))));
        }
        "fsync" => {
            changes = false;
            let desc = format!("fsync({})", fdesc(run, fdi));
            run.history.push_back(desc.clone());
            run.same(&desc, |s| num(sys_fsync(run.fd(fdi, s)), |n| n));
        }
        "snapshot" => {
            changes = false;
            let name = format!("s{}", run.snaps);
            run.snaps += 1;
            run.history.push_back(format!("forkpoint snapshot {name}"));
            let want = capture(&run.roots[1], &BTreeMap::new())
                .unwrap_or_else(|e| run.fail(&format!("tmpfs: {e}")));
            fp_ok(&[
                OsStr::new("snapshot"),
                OsStr::new("-m"),
                run.mnt.as_os_str(),
                OsStr::new(&name),
            ]);
            let dir = run.mnt.join(".forkpoint/snapshots").join(&name);
            let got = capture(&dir, &BTreeMap::new())
                .unwrap_or_else(|e| run.fail(&format!("snapshot {name}: {e}")));
            let want = read_only_view(&want);
            if let Some(d) = tree_diff(&want, &got) {
                run.fail(&format!(
                    "snapshot {name} differs from the tree it was taken of: {d}"
                ));
            }
            // Keep a few for the end: the first, then one in eight, at most 12.
            if run.kept.len() < 12 && (run.snaps == 1 || rng.chance(1, 8)) {
                run.kept.push((name, want));
            }
        }
        other => run.fail(&format!("unknown op {other}")),
    }
    changes
}

/// Entries (below the root) of the reference tree under `rel`, children before parents.
fn entries_below(run: &Run, rel: &str, out: &mut Vec<(String, bool)>) {
    let Ok(rd) = std::fs::read_dir(run.p(1, rel)) else {
        return;
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let path = if rel.is_empty() {
            n
        } else {
            format!("{rel}/{n}")
        };
        let dir = lstat(&run.p(1, &path), false).is_ok_and(|s| s.key.kind == libc::S_IFDIR);
        if dir {
            entries_below(run, &path, out);
        }
        out.push((path, dir));
    }
}

/// Renames of directories into one another let the tree grow without bound, and with it
/// the cost of every whole-tree check. Past `limit` entries, the top-level entry with the
/// most below it is removed on both sides, one unlink or rmdir at a time, each compared as
/// any other operation.
fn prune(run: &mut Run, limit: usize) {
    let mut all = Vec::new();
    entries_below(run, "", &mut all);
    if all.len() <= limit {
        return;
    }
    let top = |p: &str| p.split('/').next().unwrap_or("").to_string();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (p, _) in &all {
        *count.entry(top(p)).or_default() += 1;
    }
    let Some((victim, n)) = count
        .into_iter()
        .max_by_key(|(k, n)| (*n, std::cmp::Reverse(k.clone())))
    else {
        return;
    };
    run.history
        .push_back(format!("prune /{victim} ({n} of {} entries)", all.len()));
    for (path, dir) in all.iter().filter(|(p, _)| top(p) == victim) {
        let desc = format!("prune: {}({path})", if *dir { "rmdir" } else { "unlink" });
        run.same(&desc, |s| {
            let p = run.p(s, path);
            num(if *dir { sys_rmdir(&p) } else { sys_unlink(&p) }, |n| n)
        });
    }
}

fn check_snapshots(run: &Run, when: &str) {
    for (name, want) in &run.kept {
        let dir = run.mnt.join(".forkpoint/snapshots").join(name);
        let got = capture(&dir, &BTreeMap::new())
            .unwrap_or_else(|e| run.fail(&format!("{when}: snapshot {name}: {e}")));
        if let Some(d) = tree_diff(want, &got) {
            run.fail(&format!(
                "{when}: snapshot {name} no longer reads back as taken: {d}"
            ));
        }
    }
}

#[test]
fn differential_against_tmpfs() {
    if !common::can_mount("fuse_diff") {
        return;
    }
    let ops: u64 = std::env::var("FORKPOINT_DIFF_OPS")
        .ok()
        .map(|s| s.trim().parse().expect("FORKPOINT_DIFF_OPS is a number"))
        .unwrap_or(3000);
    // Long runs may compare the whole trees every N steps instead of after each one; every
    // step's return value, errno and data are compared either way.
    let every: u64 = std::env::var("FORKPOINT_DIFF_CHECK_EVERY")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("FORKPOINT_DIFF_CHECK_EVERY is a number")
        })
        .unwrap_or(1)
        .max(1);
    let budget = std::env::var("FORKPOINT_DIFF_SECS")
        .ok()
        .map(|s| Duration::from_secs(s.trim().parse().expect("FORKPOINT_DIFF_SECS is a number")));
    let seed = common::seed_from_env("FORKPOINT_DIFF_SEED");
    eprintln!(
        "fuse_diff: seed {seed} (FORKPOINT_DIFF_SEED), {ops} operations, whole-tree check every {every} step(s), time budget {budget:?}"
    );
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    let reference = lab.mkdir("tmpfs");
    lab.tmpfs(&reference);
    lab.mount_ok(&store, &mnt, None);
    let dog = Watchdog::new(&store, Duration::from_secs(120));
    let mut rng = Rng::new(seed);
    let mut run = Run {
        seed,
        step: 0,
        roots: [mnt.clone(), reference.clone()],
        mnt: mnt.clone(),
        fds: Vec::new(),
        pins: Vec::new(),
        history: VecDeque::new(),
        snaps: 0,
        kept: Vec::new(),
    };
    run.check_all();
    let start = Instant::now();
    let mut last_report = Instant::now();
    let (mut in_ops, mut in_checks) = (Duration::ZERO, Duration::ZERO);
    let mut by_op: BTreeMap<String, Duration> = BTreeMap::new();
    let mut done = 0;
    for i in 0..ops {
        if budget.is_some_and(|b| start.elapsed() >= b) {
            eprintln!("fuse_diff: time budget reached after {i} of {ops} operations");
            break;
        }
        run.step = i;
        done = i + 1;
        if run.history.len() >= 40 {
            run.history.pop_front();
        }
        let t = Instant::now();
        dog.doing(&format!("step {i}"));
        if step(&mut run, &mut rng) {
            run.pins.clear();
        }
        let t2 = Instant::now();
        in_ops += t2 - t;
        let kind: String = run
            .history
            .back()
            .map(|h| {
                h.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .unwrap_or_default();
        *by_op.entry(kind).or_default() += t2 - t;
        dog.doing(&format!(
            "checks after step {i}: {}",
            run.history.back().map(String::as_str).unwrap_or("")
        ));
        let full = i % every == every - 1;
        run.check(full);
        if i % 1000 == 999 {
            prune(&mut run, 120);
            run.pins.clear();
            run.check(true);
        }
        in_checks += t2.elapsed();
        dog.tick();
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            let mut slow: Vec<_> = by_op.iter().collect();
            slow.sort_by_key(|(_, d)| std::cmp::Reverse(**d));
            let slow: Vec<String> = slow
                .iter()
                .take(4)
                .map(|(k, d)| format!("{k} {d:.1?}"))
                .collect();
            eprintln!(
                "fuse_diff: {} ops in {:.0?} (operations {in_ops:.0?}: {}; checks {in_checks:.0?}), {} snapshots",
                i + 1,
                start.elapsed(),
                slow.join(", "),
                run.snaps
            );
        }
    }
    let elapsed = start.elapsed();
    // Close everything (orphans go away), then the whole state must survive a remount.
    run.step = done;
    run.history.push_back("close all, final checks".into());
    run.close_all();
    run.pins.clear();
    run.check_all();
    check_snapshots(&run, "end of run");
    lab.umount_ok(&mnt);
    let v = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(v.contains("verified"), "verify output: {v}");
    lab.mount_ok(&store, &mnt, None);
    run.check_all();
    check_snapshots(&run, "after remount");
    lab.umount_ok(&mnt);
    eprintln!(
        "fuse_diff: seed {seed}: {done} operations, {} snapshots, in {elapsed:.1?} \
         (operations {in_ops:.1?}, checks {in_checks:.1?}): no divergence",
        run.snaps
    );
}
