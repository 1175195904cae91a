//! Incremental dumps: which pages a process wrote since its last checkpoint.
//!
//! This kernel has no soft-dirty bits, but it has asynchronous userfaultfd write-protection
//! (`UFFD_FEATURE_WP_ASYNC`, 6.7) and `PAGEMAP_SCAN` (6.7): once a range is registered for
//! write-protection, the kernel itself clears a page's protection on the first write, with no
//! fault delivered anywhere, and `PAGEMAP_SCAN` on `/proc/PID/pagemap` reports which pages
//! lost it and protects them again, atomically, in one call from outside the process.
//!
//! At a checkpoint, after the memory of a process has been read (still frozen), the
//! [`DirtyTracker`] makes sure the process has a userfaultfd of ours (created by a syscall
//! injected into the process, since a userfaultfd belongs to the memory of its creator, then
//! taken over with `pidfd_getfd` and closed in the process) with every private mapping
//! registered and protected. At the next checkpoint, a page that is present and not written
//! since is the page of the previous image: its run (a store hash) is reused instead of
//! reading and hashing the page again.
//!
//! What keeps this exact:
//! * reuse needs the previous image of the same mapping: the tracker remembers only what a
//!   *committed* checkpoint recorded ([`DirtyTracker::remember`]); any failure in between
//!   drops every userfaultfd ([`DirtyTracker::forget`]), which unregisters everything, and
//!   the next dump reads all pages;
//! * a mapping is scanned only if it lies inside a range this tracker registered, and the
//!   scan insists on asynchronous write-protection there (`PM_SCAN_CHECK_WPASYNC`); a
//!   mapping made, moved or replaced since (munmap, mremap and exec drop the registration)
//!   is read in full;
//! * only a page that is present (and not written) is reused; one dropped with
//!   `MADV_DONTNEED` (nothing there, or a write-protect marker reported as swapped) is read,
//!   or skipped, as the untracked path would;
//! * a process under a seccomp filter is not tracked (the injected `userfaultfd` could be
//!   fatal to it).
//!
//! Limits: memory changed by DMA into pinned pages (Linux AIO with `O_DIRECT`, RDMA) after
//! a checkpoint, or re-protected by someone else's `PAGEMAP_SCAN`, is not seen as written;
//! a program that registers its own memory with userfaultfd after a checkpoint gets `EBUSY`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;

use super::image::{ImageMemory, PageData, TreeImage, PAGE_SIZE};

/// `struct pm_scan_arg` (linux/fs.h, 6.7).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGEMAP_SCAN: u64 = 0xC060_6610; // _IOWR('f', 16, struct pm_scan_arg)
const PM_SCAN_WP_MATCHING: u64 = 1;
const PM_SCAN_CHECK_WPASYNC: u64 = 2;
/// Written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Backed by a file (not anonymous).
pub const PAGE_IS_FILE: u64 = 1 << 2;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: u64 = 0xC018_AA3F; // _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_REGISTER: u64 = 0xC020_AA00; // _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `PAGEMAP_SCAN` over `[start, end)` of the process behind `pagemap`, write-protecting every
/// page present or swapped and returning (start, end, categories) of those pages, where
/// categories is a subset of written/present/swapped/file. `EPERM`: some page of the range is
/// not under asynchronous write-protection.
pub fn scan_and_protect(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    scan_with(
        pagemap,
        start,
        end,
        PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    )
}

/// [`scan_and_protect`] without protecting anything: which pages were written since they
/// were last write-protected.
pub fn scan_only(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    scan_with(pagemap, start, end, PM_SCAN_CHECK_WPASYNC)
}

fn scan_with(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    flags: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    let mut out = Vec::new();
    let mut vec = vec![PageRegion::default(); 4096];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: at,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to `vec_len` writable
        // page_region entries that outlive the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(Errno::last());
        }
        let n = n as usize;
        for r in &vec[..n] {
            out.push((r.start, r.end, r.categories));
        }
        if n < vec.len() {
            break; // the walk reached `end`
        }
        // The buffer is full: go on after the last region. (walk_end alone is not to be
        // trusted: with thousands of regions this kernel reported one below regions it had
        // already returned, and scanning those again would find them protected, "clean".)
        let next = arg.walk_end.max(out.last().map_or(at, |r| r.1));
        if next <= at {
            return Err(Errno::EIO);
        }
        at = next;
    }
    Ok(out)
}

/// The userfaultfd of one process, with the ranges registered through it and the pages of
/// its last committed image.
struct Tracked {
    /// The process's start time (/proc/PID/stat field 22): a pid reused by another process
    /// is not the tracked one.
    start: u64,
    uffd: OwnedFd,
    /// Ranges registered at the last dump.
    registered: Vec<(u64, u64)>,
    /// Page address → its contents in the last committed image (zero or stored).
    pages: std::sync::Arc<BTreeMap<u64, PageData>>,
    /// Registered at a dump that has not been committed yet.
    fresh: bool,
}

/// Dirty-page tracking across the checkpoints of one set of processes (a session). Pass it
/// to the dump in [`super::dump::DumpOptions::dirty`]; after the checkpoint is committed
/// (its memory moved to the store), call [`DirtyTracker::remember`]; on any failure,
/// [`DirtyTracker::forget`].
#[derive(Default)]
pub struct DirtyTracker {
    procs: BTreeMap<i32, Tracked>,
    /// Pages reused (not read) by the dumps since the last `remember`.
    pub reused_pages: u64,
    /// The stored image the remembered pages are from, when the caller recorded it (its
    /// store id, and how many delta images lie under it: 0 for a whole image). The next
    /// image may then be a delta against it ([`super::image::ImageMemory::delta_against`]
    /// with [`DirtyTracker::base_pages`]). Cleared by [`DirtyTracker::forget`].
    pub base: Option<([u8; 32], u32)>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("processes", &self.procs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DirtyTracker {
    /// A tracker with nothing tracked: the next dump reads every page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every userfaultfd (which unregisters everything) and every remembered page.
    pub fn forget(&mut self) {
        self.procs.clear();
        self.reused_pages = 0;
        self.base = None;
    }

    /// Stops tracking `pid` (its userfaultfd is closed).
    pub fn drop_process(&mut self, pid: i32) {
        self.procs.remove(&pid);
    }

    /// Whether `pid` has pages that a dump may reuse.
    pub fn tracks(&self, pid: i32) -> bool {
        self.procs
            .get(&pid)
            .is_some_and(|t| !t.fresh && Some(t.start) == start_time(pid))
    }

    /// Scans mapping `[start, end)` of `pid` (write-protecting it again): the regions of
    /// pages present or swapped, as (start, end, categories) in address order, categories a
    /// subset of [`PAGE_IS_WRITTEN`], [`PAGE_IS_PRESENT`], [`PAGE_IS_SWAPPED`] and
    /// [`PAGE_IS_FILE`]. `None` when the mapping is not (or no longer) tracked: the dump
    /// reads it all.
    pub fn scan(
        &self,
        pid: i32,
        pagemap: &std::fs::File,
        start: u64,
        end: u64,
    ) -> Option<Vec<(u64, u64, u64)>> {
        let t = self.procs.get(&pid).filter(|t| !t.fresh)?;
        // Overlap rather than containment: a heap grown with brk is the same (registered)
        // mapping, made larger; the scan refuses any page not under our protection.
        if !t.registered.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        match scan_and_protect(pagemap, start, end) {
            Ok(r) => Some(r),
            Err(e) => {
                log::debug!("process {pid}: {start:#x}-{end:#x} not tracked: {e}");
                None
            }
        }
    }

    /// The pages of `pid` in its last committed image (address → zero or stored).
    pub fn pages(&self, pid: i32) -> Option<&BTreeMap<u64, PageData>> {
        self.procs.get(&pid).filter(|t| !t.fresh).map(|t| &*t.pages)
    }

    /// The pages of `pid` last remembered, shared: a dump takes pages from them while
    /// frozen and fills them in after the thaw, whatever re-arming did to the tracker.
    pub fn remembered(&self, pid: i32) -> Option<std::sync::Arc<BTreeMap<u64, PageData>>> {
        self.procs.get(&pid).map(|t| t.pages.clone())
    }

    /// The pages of `pid` in [`DirtyTracker::base`], the image last remembered, also after a
    /// dump re-armed the tracking (until the next `remember` or `forget`). Empty for a
    /// process tracked since.
    pub fn base_pages(&self, pid: i32) -> Option<&BTreeMap<u64, PageData>> {
        self.base?;
        self.procs.get(&pid).map(|t| &*t.pages)
    }

    /// After the memory of `pid` was read (still frozen): make sure it has a userfaultfd of
    /// ours with `ranges` registered and write-protected. `make_uffd` creates one inside the
    /// process and returns our reference to it, set up with [`init`]. Failures only mean no
    /// tracking.
    pub fn arm(
        &mut self,
        pid: i32,
        ranges: &[(u64, u64)],
        scanned: &[(u64, u64)],
        make_uffd: impl FnOnce() -> Result<OwnedFd, String>,
    ) {
        // A userfaultfd that no longer covers anything it registered (exec, restore, pid
        // reuse) is replaced.
        let start = start_time(pid).unwrap_or(0);
        let lost = self
            .procs
            .get(&pid)
            .is_some_and(|t| (!t.fresh && scanned.is_empty()) || t.start != start);
        if lost || self.procs.get(&pid).is_some_and(|t| t.fresh) {
            self.procs.remove(&pid);
        }
        let t = match self.procs.entry(pid) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let uffd = match make_uffd() {
                    Ok(u) => u,
                    Err(e) => {
                        log::debug!("process {pid}: no dirty-page tracking: {e}");
                        return;
                    }
                };
                v.insert(Tracked {
                    start,
                    uffd,
                    registered: Vec::new(),
                    pages: Default::default(),
                    fresh: true,
                })
            }
        };
        let pagemap = match std::fs::File::open(format!("/proc/{pid}/pagemap")) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("process {pid}: no dirty-page tracking: {e}");
                self.procs.remove(&pid);
                return;
            }
        };
        let mut registered = Vec::new();
        for &(s, e) in ranges {
            if scanned.contains(&(s, e)) {
                registered.push((s, e)); // registered before and protected by its scan
                continue;
            }
            if register(&t.uffd, s, e).is_err() {
                continue;
            }
            match scan_and_protect(&pagemap, s, e) {
                Ok(_) => registered.push((s, e)),
                Err(err) => log::debug!("process {pid}: protecting {s:#x}-{e:#x}: {err}"),
            }
        }
        t.registered = registered;
        t.fresh = true;
    }

    /// A checkpoint is committed: its image (memory moved to the store) is what the next
    /// dump of each process may reuse. Processes not in the image are dropped.
    pub fn remember(&mut self, tree: &TreeImage) {
        self.remember_memory(
            tree.processes
                .iter()
                .filter_map(|m| m.live().map(|p| (m.pid, &p.memory))),
        );
    }

    /// One process's memory is `mem` now (just restored from it, still stopped): what its
    /// next dump may reuse. Other processes are left as they are.
    pub fn remember_one(&mut self, pid: i32, mem: &ImageMemory) {
        if let Some(t) = self.procs.get_mut(&pid) {
            t.pages = std::sync::Arc::new(pages_of(mem));
            t.fresh = false;
        }
        self.base = None;
    }

    /// Drops the pages of `pid` for which `stale` holds from what its next dump may reuse
    /// (they are read again).
    pub fn forget_pages(&mut self, pid: i32, stale: impl Fn(u64) -> bool) {
        if let Some(t) = self.procs.get_mut(&pid) {
            std::sync::Arc::make_mut(&mut t.pages).retain(|&a, _| !stale(a));
        }
    }

    /// [`DirtyTracker::remember`] for images of single processes: (pid, its memory).
    pub fn remember_memory<'a>(
        &mut self,
        images: impl IntoIterator<Item = (i32, &'a ImageMemory)>,
    ) {
        let live: BTreeMap<i32, &ImageMemory> = images.into_iter().collect();
        self.procs.retain(|pid, _| live.contains_key(pid));
        for (pid, t) in &mut self.procs {
            let Some(mem) = live.get(pid) else { continue };
            t.pages = std::sync::Arc::new(pages_of(mem));
            t.fresh = false;
        }
        self.reused_pages = 0;
        self.base = None;
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks after boot).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Page address → contents (zero or stored) of an image's memory.
fn pages_of(mem: &ImageMemory) -> BTreeMap<u64, PageData> {
    let mut pages: BTreeMap<u64, PageData> = mem
        .runs
        .iter()
        .filter(|r| r.len == PAGE_SIZE)
        .filter(|r| matches!(r.data, PageData::Zero | PageData::Stored(_)))
        .map(|r| (r.addr, r.data.clone()))
        .collect();
    // Zero runs may span several pages.
    for r in mem.runs.iter().filter(|r| r.len > PAGE_SIZE) {
        if r.data == PageData::Zero {
            for a in (r.addr..r.addr + r.len).step_by(PAGE_SIZE as usize) {
                pages.insert(a, PageData::Zero);
            }
        }
    }
    pages
}

/// `UFFD_FEATURE_WP_ASYNC`: write faults on write-protected pages resolved by the kernel.
pub const FEATURE_WP_ASYNC: u64 = UFFD_FEATURE_WP_ASYNC;

/// `UFFDIO_API` with asynchronous write-protection: what a userfaultfd given to
/// [`DirtyTracker::arm`] must have had (the handshake is allowed once per descriptor).
pub fn init(uffd: OwnedFd) -> Result<OwnedFd, String> {
    api(&uffd).map(|()| uffd)
}

fn api(uffd: &OwnedFd) -> Result<(), String> {
    api_with(uffd, UFFD_FEATURE_WP_ASYNC)
}

/// `UFFDIO_API` asking for `features` (allowed once per descriptor).
pub fn api_with(uffd: &OwnedFd, features: u64) -> Result<(), String> {
    let mut a = [UFFD_API, features, 0u64];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (three u64) at the pointer.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, a.as_mut_ptr()) };
    if r < 0 {
        return Err(format!("UFFDIO_API({features:#x}): {}", Errno::last()));
    }
    Ok(())
}

fn register(uffd: &OwnedFd, start: u64, end: u64) -> Result<(), Errno> {
    let mut reg = [start, end - start, UFFDIO_REGISTER_MODE_WP, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register (four u64).
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

const UFFDIO_UNREGISTER: u64 = 0x8010_AA01; // _IOR(0xAA, 0x01, struct uffdio_range)
const UFFDIO_COPY: u64 = 0xC028_AA03; // _IOWR(0xAA, 0x03, struct uffdio_copy)
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;

/// Registers `[start, end)` for missing-page handling, which [`fill`] needs: a page filled
/// with `UFFDIO_COPY` is allocated and copied in one step, never zeroed first.
pub fn register_missing(uffd: &OwnedFd, start: u64, end: u64) -> Result<(), Errno> {
    register_mode(uffd, start, end, UFFDIO_REGISTER_MODE_MISSING)
}

/// Registers `[start, end)` for missing pages and write-protection at once (a lazy restore
/// that keeps dirty-page tracking: pages copied in write-protected, see [`super::lazy`]).
pub fn register_missing_wp(uffd: &OwnedFd, start: u64, end: u64) -> Result<(), Errno> {
    register_mode(
        uffd,
        start,
        end,
        UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
    )
}

fn register_mode(uffd: &OwnedFd, start: u64, end: u64, mode: u64) -> Result<(), Errno> {
    let mut reg = [start, end - start, mode, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register (four u64).
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Unregisters `[start, end)`: a page still missing is again an ordinary zero-fill fault.
pub fn unregister(uffd: &OwnedFd, start: u64, end: u64) -> Result<(), Errno> {
    let range = [start, end - start];
    // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range (two u64).
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, range.as_ptr()) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// One `UFFDIO_COPY` of `src` to `dst` with `mode`: the error, if any, and the `copy` field
/// (the bytes copied, also before an error, or the negated error).
pub(crate) fn copy_once(uffd: &OwnedFd, dst: u64, src: &[u8], mode: u64) -> (Option<Errno>, i64) {
    let mut arg = [dst, src.as_ptr() as u64, src.len() as u64, mode, 0u64];
    // SAFETY: UFFDIO_COPY reads one struct uffdio_copy (five u64, the last written back);
    // its source is `src`, readable for the length given.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, arg.as_mut_ptr()) };
    ((r < 0).then(Errno::last), arg[4] as i64)
}

/// Copies `data` to `dst` (page-aligned, a whole number of pages, every page missing) in the
/// memory behind `uffd`, with `UFFDIO_COPY`: each page is allocated and filled by the kernel
/// in one step. `EEXIST`: a page was already there (the pages before it were copied).
pub fn fill(uffd: &OwnedFd, dst: u64, data: &[u8]) -> Result<(), Errno> {
    let mut done = 0usize;
    let mut retries = 0;
    while done < data.len() {
        let (err, copied) = copy_once(
            uffd,
            dst + done as u64,
            &data[done..],
            UFFDIO_COPY_MODE_DONTWAKE,
        );
        if let Some(e) = err {
            // EAGAIN: interrupted (by a change of the address space, or after a partial
            // copy); go on from where it stopped.
            if e == Errno::EAGAIN && retries < 100 {
                retries += 1;
                done += copied.max(0) as usize;
                continue;
            }
            return Err(e);
        }
        if copied <= 0 {
            return Err(Errno::EIO);
        }
        done += copied as usize;
    }
    Ok(())
}

/// Flags for the `userfaultfd` syscall injected into a process.
pub const UFFD_FLAGS: u64 = libc::O_CLOEXEC as u64 | libc::O_NONBLOCK as u64 | UFFD_USER_MODE_ONLY;
