//! The thin FUSE adapter: each method calls the logic in [`crate::fs`] and replies, mapping
//! errors to errno in one exhaustive match.

use crate::error::StoreError;
use crate::fs::{Caller, Fs, FsError, RenameFlags as FsRename, SetAttr, TimeSet};
use crate::tree::{Attr, FileKind, Time};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache entries and attributes. The daemon is the only writer, so
/// the kernel's view can only go stale on a rollback, which invalidates explicitly.
const TTL: Duration = Duration::from_secs(60);

/// How long the kernel may keep a name it found in directory `parent` (by lookup or in a
/// listing): not at all for the snapshots' names, which can be forgotten and given again.
fn entry_ttl(parent: u64) -> Duration {
    if crate::fs::entry_may_be_cached(parent) {
        TTL
    } else {
        Duration::ZERO
    }
}

/// Maps a logic error to errno. No catch-all arm: a new error must choose its errno.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Invalid(_) => Errno::EINVAL,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::ReadOnly => Errno::EROFS,
        FsError::NoAttr => Errno::NO_XATTR,
        FsError::Range => Errno::ERANGE,
        FsError::NotSupported => Errno::EOPNOTSUPP,
        FsError::Perm => Errno::EPERM,
        FsError::BadHandle => Errno::EBADF,
        FsError::TooBig => Errno::EFBIG,
        FsError::NoData => Errno::ENXIO,
        // The lower directory is read-only by contract; a changed file cannot be served
        // consistently with the tree that recorded it.
        FsError::LowerChanged(_) => Errno::ESTALE,
        FsError::Store(s) => match s {
            StoreError::InvalidName { .. } => Errno::EINVAL,
            StoreError::NameExists(_) | StoreError::BranchExists(_) => Errno::EEXIST,
            StoreError::BranchKept { .. } | StoreError::ChangedDuringGc => Errno::EBUSY,
            StoreError::UnknownCheckpoint(_) | StoreError::UnknownBranch(_) => Errno::ENOENT,
            StoreError::TooLarge { .. } => Errno::EFBIG,
            StoreError::Io { source, .. } | StoreError::Lower { source, .. } => {
                Errno::from_i32(source.raw_os_error().unwrap_or(libc::EIO))
            }
            // Corruption, catalog and format errors: the data cannot be served.
            StoreError::NotAStore(_)
            | StoreError::AlreadyExists { .. }
            | StoreError::NewerFormat { .. }
            | StoreError::CorruptCatalog { .. }
            | StoreError::CorruptObject { .. }
            | StoreError::MissingObject(_)
            | StoreError::TruncatedSegment { .. }
            | StoreError::Decode { .. }
            | StoreError::Locked(_)
            | StoreError::LowerMismatch { .. }
            | StoreError::Sql(_)
            | StoreError::SimulatedCrash => Errno::EIO,
        },
    }
}

fn systime(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec))
    }
}

/// Converts a time from a request (setattr) back to the kernel's `(sec, nsec)`.
///
/// fuser 0.18 decodes a request's `(sec < 0, nsec)` as `EPOCH - (|sec| s + nsec ns)` instead
/// of `EPOCH - |sec| s + nsec ns` (see the TODO in its `system_time_from_time`), so a time
/// before 1970 with a nonzero `nsec` arrives almost two seconds' worth of `nsec` off.
/// Inverting that encoding recovers exactly what the kernel sent.
fn fstime(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            Time {
                sec: -(d.as_secs() as i64),
                nsec: d.subsec_nanos(),
            }
        }
    }
}

fn ftype(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// Converts attributes for the kernel.
pub fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.btime),
        kind: ftype(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 64 * 1024,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The FUSE filesystem of one mount.
/// The largest write request, and the size of each io_uring payload buffer.
const MAX_WRITE: u32 = 1 << 20;

pub struct FuseFs {
    fs: Arc<Fs>,
    /// Asks for FUSE over io_uring at INIT; set to whether the kernel agreed.
    uring: Arc<std::sync::atomic::AtomicBool>,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>) -> Self {
        FuseFs {
            fs,
            uring: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }
}

macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                log::debug!("fs error: {e}");
                $reply.error(errno(&e));
                return;
            }
        }
    };
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_WRITEBACK_CACHE
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES
            // We clear setuid/setgid on write, truncate and chown ourselves. Without this the
            // kernel asks for `security.capability` (a GETXATTR round trip) on every write(2).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let have = config.capabilities();
        let _ = config.add_capabilities(want & have);
        let uring = self.uring.load(std::sync::atomic::Ordering::Relaxed)
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        self.uring
            .store(uring, std::sync::atomic::Ordering::Relaxed);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.commit_now() {
            log::error!("final commit failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let generation = self.fs.generation();
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(s) => reply.entry(
                &entry_ttl(parent.0),
                &file_attr(s.ino, &s.attr),
                Generation(0),
            ),
            // A negative entry (node id 0 with a timeout): the kernel remembers that the name
            // is absent, so `stat` then `open(O_CREAT)` of a new file asks once, not twice.
            Err(FsError::NotFound)
                if self
                    .fs
                    .may_cache_absent(parent.0, name.as_bytes(), generation) =>
            {
                let none = file_attr(0, &Attr::new(FileKind::File, 0, 0, 0));
                reply.entry(&TTL, &none, Generation(0));
            }
            Err(e) => {
                log::debug!("fs error: {e}");
                reply.error(errno(&e));
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = tri!(reply, self.fs.getattr(ino.0));
        reply.attr(&TTL, &file_attr(s.ino, &s.attr));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ts = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => TimeSet::Now,
                TimeOrNow::SpecificTime(s) => TimeSet::At(fstime(s)),
            })
        };
        // Truncation by a process without CAP_FSETID (approximated: not root) kills
        // setuid/setgid (FUSE_HANDLE_KILLPRIV_V2).
        if size.is_some() && mode.is_none() && req.uid() != 0 {
            tri!(reply, self.fs.kill_suidgid(ino.0));
        }
        // chown(-1, -1) of a non-directory kills setuid/setgid too (the VFS sets
        // ATTR_KILL_SUID for every chown), but with KILLPRIV_V2 the kernel sends only the new
        // ctime. A SETATTR of ctime alone comes from nothing else.
        let ctime_only = ctime.is_some()
            && [mode, uid, gid].iter().all(Option::is_none)
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        if ctime_only {
            let s = tri!(reply, self.fs.getattr(ino.0));
            if s.attr.kind != FileKind::Dir {
                tri!(reply, self.fs.kill_suidgid(ino.0));
            }
        }
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: ts(atime),
            mtime: ts(mtime),
            ctime: ctime.map(fstime),
        };
        let s = tri!(reply, self.fs.setattr(ino.0, &set));
        reply.attr(&TTL, &file_attr(s.ino, &s.attr));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let t = tri!(reply, self.fs.readlink(ino.0));
        reply.data(&t);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
        let s = tri!(
            reply,
            self.fs.mknod(
                parent.0,
                name.as_bytes(),
                mode,
                u64::from(rdev),
                caller(req)
            )
        );
        reply.entry(&TTL, &file_attr(s.ino, &s.attr), Generation(0));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let s = tri!(
            reply,
            self.fs
                .mkdir(parent.0, name.as_bytes(), mode & !umask, caller(req))
        );
        reply.entry(&TTL, &file_attr(s.ino, &s.attr), Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tri!(reply, self.fs.unlink(parent.0, name.as_bytes()));
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tri!(reply, self.fs.rmdir(parent.0, name.as_bytes()));
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let s = tri!(
            reply,
            self.fs.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                caller(req)
            )
        );
        reply.entry(&TTL, &file_attr(s.ino, &s.attr), Generation(0));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let f = FsRename {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        tri!(
            reply,
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                f
            )
        );
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let s = tri!(reply, self.fs.link(ino.0, newparent.0, newname.as_bytes()));
        reply.entry(&TTL, &file_attr(s.ino, &s.attr), Generation(0));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = flags.0 & libc::O_TRUNC != 0;
        if trunc && write && req.uid() != 0 {
            tri!(reply, self.fs.kill_suidgid(ino.0));
        }
        let fh = tri!(reply, self.fs.open(ino.0, write, trunc));
        // The daemon is the only writer, so cached pages stay valid across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let d = tri!(reply, self.fs.read(ino.0, offset, size));
        reply.data(&d);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            tri!(reply, self.fs.kill_suidgid(ino.0));
        }
        let n = tri!(reply, self.fs.write(ino.0, offset, data));
        reply.written(n);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close: the kernel has written dirty pages back before it asks, and
        // locks are the kernel's. ENOSYS tells it never to send FLUSH again, which saves a
        // round trip per close(2) (it still writes dirty pages back first).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        tri!(reply, self.fs.release(fh.0));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        tri!(reply, self.fs.fsync());
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = tri!(reply, self.fs.opendir(ino.0));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = tri!(reply, self.fs.readdir(fh.0, offset));
        for (off, e) in entries {
            if reply.add(
                INodeNo(e.ino),
                off,
                ftype(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = tri!(reply, self.fs.readdir(fh.0, offset));
        let ttl = entry_ttl(ino.0);
        for (off, e) in entries {
            let attr = match self.fs.getattr(e.ino) {
                Ok(s) => s.attr,
                Err(_) => continue,
            };
            if reply.add(
                INodeNo(e.ino),
                off,
                OsStr::from_bytes(&e.name),
                &ttl,
                &file_attr(e.ino, &attr),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        tri!(reply, self.fs.releasedir(fh.0));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        tri!(reply, self.fs.fsync());
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = tri!(reply, self.fs.statfs());
        reply.statfs(
            s.blocks(),
            s.blocks_free(),
            s.blocks_available(),
            s.files(),
            s.files_free(),
            s.block_size() as u32,
            255,
            s.fragment_size() as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        tri!(
            reply,
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags)
        );
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let v = tri!(reply, self.fs.getxattr(ino.0, name.as_bytes()));
        xattr_reply(reply, &v, size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let v = tri!(reply, self.fs.listxattr(ino.0));
        xattr_reply(reply, &v, size);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tri!(reply, self.fs.removexattr(ino.0, name.as_bytes()));
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let excl = flags & libc::O_EXCL != 0;
        let (s, fh) = tri!(
            reply,
            self.fs
                .create(parent.0, name.as_bytes(), mode & !umask, excl, caller(req))
        );
        reply.created(
            &TTL,
            &file_attr(s.ino, &s.attr),
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        tri!(reply, self.fs.fallocate(ino.0, offset, length, mode));
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            reply.error(Errno::EINVAL);
            return;
        }
        let o = tri!(reply, self.fs.lseek(ino.0, offset as u64, whence));
        reply.offset(o as i64);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let n = tri!(
            reply,
            self.fs.copy_range(
                ino_in.0,
                offset_in,
                ino_out.0,
                offset_out,
                len.min(u64::from(u32::MAX))
            )
        );
        reply.written(n as u32);
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

pub use fuser::BackgroundSession;

/// Mounts `fs` at `mountpoint` and serves it from background threads until the returned
/// session is unmounted or dropped.
pub fn spawn(fs: Arc<Fs>, mountpoint: &Path, fsname: &str) -> std::io::Result<BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(fsname.to_string()),
        fuser::MountOption::Subtype("forkpoint".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::NoAtime,
    ];
    config.acl = fuser::SessionACL::All;
    // Requests block on I/O; a few more threads than cores keep the kernel's queue moving.
    config.n_threads = Some(
        std::env::var("FORKPOINT_FUSE_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
    );
    config.clone_fd = true;
    let fuse_fs = FuseFs::new(fs.clone());
    let uring = fuse_fs.uring.clone();
    uring.store(crate::uring::wanted(), std::sync::atomic::Ordering::Relaxed);
    let session = fuser::Session::new(fuse_fs, mountpoint, &config)?;
    if !uring.load(std::sync::atomic::Ordering::Relaxed) {
        return session.spawn();
    }
    // The kernel agreed to io_uring: fuser's threads serve until every CPU's queue is
    // registered, then only FORGET and INTERRUPT reach them.
    let dev = std::os::fd::AsFd::as_fd(&session).try_clone_to_owned()?;
    let dispatcher = session.raw_dispatcher(FuseFs::new(fs.clone()));
    let bg = session.spawn()?;
    let read: Box<crate::uring::ReadInto> = Box::new(move |ino, off, buf: &mut [u8]| {
        fs.read_into(ino, off, buf).map_err(|e| {
            log::debug!("fs error: {e}");
            errno(&e).code()
        })
    });
    crate::uring::start(dev, dispatcher, read, MAX_WRITE as usize);
    Ok(bg)
}

/// Tells the kernel to forget what it cached of a tree that a rollback replaced.
pub fn invalidate(session: &BackgroundSession, list: &[crate::fs::Inval]) {
    let n = session.notifier();
    for i in list {
        let r = match i {
            crate::fs::Inval::Entry(parent, name) => {
                n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
            }
            crate::fs::Inval::Inode(ino) => n.inval_inode(INodeNo(*ino), 0, 0),
        };
        // ENOENT: the kernel had nothing cached for it.
        if let Err(e) = r {
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::debug!("invalidate {i:?}: {e}");
            }
        }
    }
}
