//! Lazy (post-copy) restore of private anonymous memory.
//!
//! A restore normally writes every stored page before the program runs. With a [`LazyFill`]
//! the pages of private anonymous mappings stay missing: each process's mappings are
//! registered with a userfaultfd (missing-page mode, with the fork, remap, remove and unmap
//! events) whose other end is served by one thread of the restorer. The program runs as soon
//! as everything else is rebuilt; a page it touches first is fetched from the store and
//! copied in on demand (with the pages after it, up to [`FAULT_WINDOW`]), while the thread
//! copies in the rest in the background, in image order (the next batch fetched on a
//! thread of its own). Pages are copied in write-protected (the ranges are registered for
//! write-protection too, with asynchronous resolution), so that what the program writes
//! meanwhile shows in `PAGEMAP_SCAN` as after an eager restore. When every page is in,
//! children forked meanwhile are let go, and each restored process is handed over to
//! dirty-page tracking by [`super::dump::track_after_lazy`] (stopped: what it wrote is read,
//! its userfaultfd closed, which unregisters everything, and tracking armed anew); until
//! then the thread serves it (zero pages for a page the image does not have).
//!
//! The address space may change while pages are still missing; the events keep the
//! thread's picture right:
//! * **fork**: the child gets its own userfaultfd (read from the event). Pages present in the
//!   parent were copied to it; the ones still missing are filled in the child as in the
//!   parent, from the batch in progress on.
//! * **mremap**: pages moved to a new address are filled there.
//! * **madvise(MADV_DONTNEED/MADV_REMOVE)** and **munmap**: the range is no longer the
//!   image's; a fault there gets a zero page, the background pass skips it.
//!
//! A page the thread cannot fetch (the store failed under the restore) would leave the
//! program blocked for ever, or with wrong memory: the thread then calls the `on_error`
//! given to [`LazyFill::start`] (which kills the program) before it lets go of anything.
//!
//! A checkpoint waits for every page to be in ([`LazyFill::wait`]). A process that moved
//! image memory with mremap while pages were missing is not tracked after the hand-over
//! (its next checkpoint reads all of it).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::restore::ChunkSource;

const PAGE: u64 = 4096;
/// Pages fetched and copied for one fault (the fault's page and those after it in the
/// image): a program walking its memory takes one fault per window, not per page.
pub const FAULT_WINDOW: u64 = 64 * PAGE;
/// Bytes fetched and copied per step of the background pass, between two looks at the
/// faults.
const BATCH: u64 = 2 << 20;

const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Features asked of a lazy userfaultfd where the kernel lacks `UFFD_FEATURE_WP_ASYNC`
/// (before 6.7): pages go in without write-protection, and the process is not tracked
/// after the fill.
pub const FEATURES_NO_WP: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;
/// Features asked of a lazy userfaultfd.
pub const FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | super::dirty::FEATURE_WP_ASYNC;
/// Flags for the `userfaultfd` syscall of a lazy restore: no `UFFD_USER_MODE_ONLY`, as the
/// kernel's own accesses (a `read` into a missing page) must be served too. Creating one
/// takes `CAP_SYS_PTRACE`, which the process has while it is being rebuilt.
pub const FLAGS: u64 = libc::O_CLOEXEC as u64 | libc::O_NONBLOCK as u64;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

const UFFDIO_WAKE: u64 = 0x8010_AA02; // _IOR(0xAA, 0x02, struct uffdio_range)
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04; // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
/// Pages copied in write-protected: until the program writes one, it is the image's (what
/// dirty-page tracking reads when the fill is released).
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

/// A stored run of an image, in a lazily filled range.
#[derive(Clone, Debug)]
pub struct LazyRun {
    pub addr: u64,
    pub len: u64,
    pub hash: [u8; 32],
}

/// What a lazy fill did, for the logs and the benchmark.
#[derive(Clone, Debug, Default)]
pub struct LazyStats {
    /// Faults served (each with up to [`FAULT_WINDOW`] bytes).
    pub faults: u64,
    /// Bytes copied in for faults.
    pub fault_bytes: u64,
    /// Bytes copied in by the background pass.
    pub background_bytes: u64,
    /// Processes that appeared by fork while pages were missing.
    pub forks: u64,
    /// From [`LazyFill::commit`] to the last page in.
    pub fill_time: Duration,
}

/// A piece of the current address space that holds image memory: `[cur, cur + len)` now is
/// `[img, img + len)` of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    cur: u64,
    img: u64,
    len: u64,
}

/// Removes `[start, end)` (current addresses) from `segs`.
fn segs_remove(segs: &mut Vec<Seg>, start: u64, end: u64) {
    let mut out = Vec::with_capacity(segs.len() + 1);
    for s in segs.drain(..) {
        let (a, b) = (s.cur, s.cur + s.len);
        if b <= start || end <= a {
            out.push(s);
            continue;
        }
        if a < start {
            out.push(Seg {
                cur: a,
                img: s.img,
                len: start - a,
            });
        }
        if end < b {
            out.push(Seg {
                cur: end,
                img: s.img + (end - a),
                len: b - end,
            });
        }
    }
    *segs = out;
}

/// `[from, from + len)` moved to `to` (mremap): whatever was at the target is gone.
fn segs_remap(segs: &mut Vec<Seg>, from: u64, to: u64, len: u64) {
    segs_remove(segs, to, to + len);
    let mut moved = segs.clone();
    // Keep only the moved part in `moved`, everything else in `segs`.
    segs_remove(segs, from, from + len);
    moved.retain(|s| s.cur < from + len && from < s.cur + s.len);
    for s in &mut moved {
        let a = s.cur.max(from);
        let b = (s.cur + s.len).min(from + len);
        *s = Seg {
            cur: a - from + to,
            img: s.img + (a - s.cur),
            len: b - a,
        };
    }
    segs.extend(moved);
    segs.sort_by_key(|s| s.cur);
}

/// The image address of current address `cur`, with the segment it lies in.
fn segs_find(segs: &[Seg], cur: u64) -> Option<(u64, Seg)> {
    segs.iter()
        .find(|s| s.cur <= cur && cur < s.cur + s.len)
        .map(|s| (s.img + (cur - s.cur), *s))
}

/// Where the image bytes `[img, img + len)` are now: (current address, offset in the run,
/// length) for each piece still mapped.
fn segs_pieces(segs: &[Seg], img: u64, len: u64, out: &mut Vec<(u64, u64, u64)>) {
    for s in segs {
        let a = img.max(s.img);
        let b = (img + len).min(s.img + s.len);
        if a < b {
            out.push((s.cur + (a - s.img), a - img, b - a));
        }
    }
}

/// Why a copy stopped.
enum CopyErr {
    /// The address space is changing (an event waits to be read): read the events, retry.
    Again,
    /// The process (its address space) is gone.
    Gone,
    Other(Errno),
}

/// `UFFDIO_COPY` of `data` to `dst`, waking the faulting threads; pages already there are
/// skipped, as are pages no longer in a registered mapping.
fn copy(uffd: &OwnedFd, dst: u64, data: &[u8], mode: u64) -> Result<(), CopyErr> {
    let mut done = 0usize;
    while done < data.len() {
        let (err, copied) = super::dirty::copy_once(uffd, dst + done as u64, &data[done..], mode);
        let Some(e) = err else {
            done += copied.max(0) as usize;
            if copied <= 0 {
                return Err(CopyErr::Other(Errno::EIO));
            }
            continue;
        };
        if copied > 0 {
            done += copied as usize; // partial: go on from there
            continue;
        }
        match e {
            // A copy must stay inside one mapping (the kernel refuses it whole otherwise):
            // the rest goes page by page, and a page without a mapping is skipped then.
            Errno::ENOENT if data.len() - done > PAGE as usize => {
                while done < data.len() {
                    let page = &data[done..(done + PAGE as usize).min(data.len())];
                    match copy(uffd, dst + done as u64, page, mode) {
                        Ok(()) => done += PAGE as usize,
                        Err(e) => return Err(e),
                    }
                }
            }
            // Already there (a fault or the parent before a fork got it), or the mapping is
            // gone (an unmap whose event is being read): skip the page.
            Errno::EEXIST | Errno::ENOENT => done += PAGE as usize,
            Errno::EAGAIN => return Err(CopyErr::Again),
            Errno::ESRCH => return Err(CopyErr::Gone),
            e => return Err(CopyErr::Other(e)),
        }
    }
    Ok(())
}

/// A zero page at `dst` (a page the image does not hold, or no longer its own).
fn zeropage(uffd: &OwnedFd, dst: u64) -> Result<(), CopyErr> {
    let mut arg = [dst, PAGE, 0u64, 0u64];
    // SAFETY: UFFDIO_ZEROPAGE reads one struct uffdio_zeropage (four u64, the last written
    // back).
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, arg.as_mut_ptr()) };
    if r >= 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::EEXIST | Errno::ENOENT => Ok(()),
        Errno::EAGAIN => Err(CopyErr::Again),
        Errno::ESRCH => Err(CopyErr::Gone),
        e => Err(CopyErr::Other(e)),
    }
}

/// Wakes the threads waiting on `[dst, dst + PAGE)` (whose page came some other way).
fn wake(uffd: &OwnedFd, dst: u64) {
    let arg = [dst, PAGE];
    // SAFETY: UFFDIO_WAKE reads one struct uffdio_range (two u64).
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, arg.as_ptr()) };
}

/// One process (one address space) being filled.
struct Proc {
    /// For messages: the pid, or "a child of" it.
    label: String,
    /// The restored process's pid (`None`: a child it forked while pages were missing).
    pid: Option<i32>,
    /// Its ranges are registered for write-protection: pages go in write-protected.
    wp: bool,
    uffd: OwnedFd,
    /// Stored runs of its image in lazily filled ranges, by address.
    runs: Arc<Vec<LazyRun>>,
    segs: Vec<Seg>,
    /// The background pass: next run to copy in.
    next: usize,
    /// Faults (page addresses) to serve again after the events were read.
    deferred: Vec<u64>,
    gone: bool,
    /// Image memory was moved (mremap) while pages were missing.
    remapped: bool,
}

impl Proc {
    fn work_left(&self) -> bool {
        !self.gone && (self.next < self.runs.len() || !self.deferred.is_empty())
    }

    /// Copies `runs` (whose bytes are `data`, one after the other) to wherever they are now.
    fn apply(&mut self, runs: &[LazyRun], data: &[u8]) -> Result<(), CopyErr> {
        let mut pieces = Vec::new();
        let mut at = 0u64;
        for r in runs {
            let before = pieces.len();
            segs_pieces(&self.segs, r.addr, r.len, &mut pieces);
            for p in &mut pieces[before..] {
                p.1 += at; // offset into `data`
            }
            at += r.len;
        }
        // One copy per contiguous stretch.
        let mut i = 0;
        while i < pieces.len() {
            let (cur, off, mut len) = pieces[i];
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].0 == cur + len && pieces[j].1 == off + len {
                len += pieces[j].2;
                j += 1;
            }
            let mode = if self.wp { UFFDIO_COPY_MODE_WP } else { 0 };
            copy(
                &self.uffd,
                cur,
                &data[off as usize..(off + len) as usize],
                mode,
            )?;
            i = j;
        }
        Ok(())
    }
}

#[derive(Default)]
struct State {
    incoming: Vec<Proc>,
    committed: Option<Instant>,
    stop: bool,
    /// Every page is in (or the fill failed).
    complete: bool,
    /// The thread has ended.
    done: bool,
    error: Option<String>,
    stats: LazyStats,
    /// Processes to let go of, and those let go of (with whether pages moved in them).
    release: Vec<i32>,
    released: Vec<(i32, bool)>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// Wakes the thread (it sleeps in poll).
    event: OwnedFd,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// A process handed to a [`LazyFill`].
#[derive(Clone, Debug)]
pub struct Handed {
    pub pid: i32,
    pub image_pid: i32,
    /// The ranges filled lazily.
    pub ranges: Vec<(u64, u64)>,
    /// Registered for write-protection too ([`FEATURES`]): pages are copied in
    /// write-protected, and what the program writes can be told ([`LazyFill::tracks_writes`]).
    pub wp: bool,
}

/// The thread serving the userfaultfds of a lazy restore. Dropping it stops the thread and
/// closes every userfaultfd (a restore that failed: its processes are killed).
pub struct LazyFill {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Every process handed over.
    added: Mutex<Vec<Handed>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFill").finish_non_exhaustive()
    }
}

impl LazyFill {
    /// Starts the serving thread. `on_error` is called (from it) when a page cannot be
    /// served, before any process is let go: it must kill the restored processes.
    pub fn start(
        source: Arc<dyn ChunkSource + Send + Sync>,
        on_error: Box<dyn Fn(&str) + Send>,
    ) -> std::io::Result<LazyFill> {
        // SAFETY: eventfd takes integers and returns a new descriptor (or -1).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            event,
        });
        // Both threads start here, before the restore creates any process (each takes a
        // thread id in the caller's pid namespace).
        let fetcher = Fetcher::start(source.clone())?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lazy-fill".into())
            .spawn(move || serve(&s, &*source, fetcher, &*on_error))?;
        Ok(LazyFill {
            shared,
            thread: Some(thread),
            added: Mutex::new(Vec::new()),
        })
    }

    /// Hands over process `pid`: `uffd` (set up with [`FEATURES`], its ranges registered for
    /// missing pages), the stored `runs` those ranges hold (sorted by address) and the
    /// ranges themselves.
    pub fn add(&self, h: Handed, uffd: OwnedFd, mut runs: Vec<LazyRun>) {
        let (pid, ranges, wp) = (h.pid, h.ranges.clone(), h.wp);
        self.added.lock().unwrap_or_else(|p| p.into_inner()).push(h);
        runs.sort_by_key(|r| r.addr);
        let p = Proc {
            label: pid.to_string(),
            pid: Some(pid),
            wp,
            uffd,
            runs: Arc::new(runs),
            segs: ranges
                .iter()
                .map(|&(s, e)| Seg {
                    cur: s,
                    img: s,
                    len: e - s,
                })
                .collect(),
            next: 0,
            deferred: Vec::new(),
            gone: false,
            remapped: false,
        };
        self.shared.lock().incoming.push(p);
        self.shared.kick();
    }

    /// Every process is handed over and running: fill in the rest, then let go.
    pub fn commit(&self) {
        self.shared.lock().committed = Some(Instant::now());
        self.shared.kick();
    }

    /// Waits until every page is in (or the fill failed, which killed the program).
    pub fn wait(&self) -> Result<LazyStats, String> {
        let mut st = self.shared.lock();
        while !st.complete {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.error {
            Some(e) => Err(e.clone()),
            None => Ok(st.stats.clone()),
        }
    }

    /// Every process handed over.
    pub fn processes(&self) -> Vec<Handed> {
        self.added.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `pid` was handed over with write-protection (see [`Handed::wp`]).
    pub fn tracks_writes(&self, pid: i32) -> bool {
        self.added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|h| h.pid == pid && h.wp)
    }

    /// Whether every page is in (or the fill failed).
    pub fn is_done(&self) -> bool {
        self.shared.lock().complete
    }

    /// Lets go of process `pid` once every page is in: its userfaultfd is closed, which
    /// unregisters its ranges (and clears their write-protection). Call it with the process
    /// stopped, after reading what it wrote since the restore ([`super::dirty::scan_only`]),
    /// and arm dirty-page tracking anew before it runs. Returns whether the process moved
    /// image memory with mremap meanwhile (then a page's address no longer says which page
    /// of the image it holds).
    pub fn release(&self, pid: i32) -> bool {
        let mut st = self.shared.lock();
        st.release.push(pid);
        drop(st);
        self.shared.kick();
        let mut st = self.shared.lock();
        loop {
            if let Some(&(_, moved)) = st.released.iter().find(|r| r.0 == pid) {
                return moved;
            }
            if st.done {
                return true;
            }
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `struct uffd_msg` (32 bytes): the event, then its arguments.
fn parse_msg(m: &[u8]) -> (u8, [u64; 3]) {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&m[8 + 8 * i..16 + 8 * i]);
        u64::from_ne_bytes(w)
    };
    (m[0], [word(0), word(1), word(2)])
}

/// The serving thread's loop.
fn serve(shared: &Shared, source: &dyn ChunkSource, mut fetcher: Fetcher, on_error: &dyn Fn(&str)) {
    let mut procs: Vec<Proc> = Vec::new();
    let mut turn = 0usize;
    // Every page is in: from then on the restored processes are only served until they are
    // released (or the fill is dropped).
    let mut complete = false;
    // Ok(true): every page is in; Ok(false): stopped (dropped) before.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<bool, String> {
        loop {
            let committed = {
                let mut st = shared.lock();
                if st.stop {
                    return Ok(complete);
                }
                procs.append(&mut st.incoming);
                // Released: their userfaultfd closes here (which unregisters everything).
                for pid in std::mem::take(&mut st.release) {
                    let moved = procs.iter().any(|p| p.pid == Some(pid) && p.remapped);
                    procs.retain(|p| p.pid != Some(pid));
                    st.released.push((pid, moved));
                    shared.cv.notify_all();
                }
                st.committed
            };
            procs.retain(|p| !p.gone);
            let deferred = procs.iter().any(|p| !p.gone && !p.deferred.is_empty());
            let work = deferred || (committed.is_some() && procs.iter().any(|p| p.work_left()));
            if committed.is_some() && !work && !complete {
                // Every page is in. Children forked meanwhile are let go (what they have is
                // theirs); the restored processes stay registered, write-protection and
                // all, until released to dirty-page tracking.
                complete = true;
                procs.retain(|p| p.pid.is_some());
                for p in &mut procs {
                    p.runs = Arc::new(Vec::new());
                    p.segs.clear();
                }
                let mut st = shared.lock();
                if let Some(c) = st.committed {
                    st.stats.fill_time = c.elapsed();
                }
                st.complete = true;
                log::debug!("lazy restore: {:?}", st.stats);
                shared.cv.notify_all();
            }
            if complete && procs.is_empty() {
                return Ok(true);
            }
            // Faults and events first.
            let mut fds: Vec<libc::pollfd> = std::iter::once(shared.event.as_raw_fd())
                .chain(procs.iter().map(|p| p.uffd.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let timeout = if work { 0 } else { 1000 };
            // SAFETY: `fds` is a live array of pollfd of the length given.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout) };
            if n < 0 && Errno::last() != Errno::EINTR {
                return Err(format!("poll: {}", Errno::last()));
            }
            if fds[0].revents != 0 {
                let mut b = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a live buffer from our eventfd.
                unsafe { libc::read(shared.event.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
            }
            let mut born = Vec::new();
            for i in 0..procs.len() {
                if fds[i + 1].revents != 0 {
                    read_msgs(shared, source, &mut procs, i, &mut born)?;
                }
            }
            procs.append(&mut born);
            for p in procs.iter_mut() {
                for addr in std::mem::take(&mut p.deferred) {
                    serve_fault(shared, source, p, addr)?;
                }
            }
            // Then one step of the background pass (once the restore is done).
            if committed.is_some() {
                let n = procs.len();
                if let Some(i) = (0..n)
                    .map(|k| (turn + k) % n)
                    .find(|&i| !procs[i].gone && procs[i].next < procs[i].runs.len())
                {
                    turn = i + 1;
                    background_step(shared, &mut fetcher, &mut procs[i])?;
                }
            }
        }
    }))
    .unwrap_or_else(|_| Err("the lazy fill thread panicked".into()));
    // Stopped with pages still missing (the restore failed after some processes were let
    // go): closing the userfaultfds would leave them zeros.
    let res = match res {
        Ok(false) if procs.iter().any(|p| !p.gone && p.work_left()) => {
            Err("the lazy restore was stopped before every page was in".to_string())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = &res {
        log::error!("lazy restore: {e}; the program is killed");
        on_error(e);
    }
    let mut st = shared.lock();
    if !st.complete {
        if let Some(c) = st.committed {
            st.stats.fill_time = c.elapsed();
        }
        log::debug!("lazy restore: {:?}", st.stats);
    }
    st.error = res.err();
    // Closing the userfaultfds unregisters every range they hold.
    drop(procs);
    st.complete = true;
    st.done = true;
    shared.cv.notify_all();
}

/// Reads and handles the messages waiting on `procs[i]`; processes forked meanwhile go to
/// `born`.
fn read_msgs(
    shared: &Shared,
    source: &dyn ChunkSource,
    procs: &mut [Proc],
    i: usize,
    born: &mut Vec<Proc>,
) -> Result<(), String> {
    let mut buf = [0u8; 32 * 64];
    loop {
        // SAFETY: reads at most buf.len() bytes into a live buffer.
        let n = unsafe {
            libc::read(
                procs[i].uffd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN | Errno::EINTR => Ok(()),
                e => Err(format!(
                    "reading the userfaultfd of {}: {e}",
                    procs[i].label
                )),
            };
        }
        if n == 0 {
            return Ok(());
        }
        // The kernel hands out waiting faults before events, and an event's sender goes on
        // (the address space may change again) once its message is read: every event of
        // this read is applied first, in order, then the faults are served with the picture
        // they bring.
        let mut faults = Vec::new();
        for m in buf[..n as usize].chunks_exact(32) {
            let (event, a) = parse_msg(m);
            let p = &mut procs[i];
            match event {
                UFFD_EVENT_PAGEFAULT => faults.push(a[1] & !(PAGE - 1)),
                UFFD_EVENT_FORK => {
                    // SAFETY: the kernel installed this descriptor in our table for us.
                    let uffd = unsafe { OwnedFd::from_raw_fd(a[0] as u32 as i32) };
                    born.push(Proc {
                        label: format!("a child of {}", p.label),
                        pid: None,
                        wp: p.wp,
                        uffd,
                        runs: p.runs.clone(),
                        segs: p.segs.clone(),
                        next: p.next,
                        deferred: Vec::new(),
                        gone: false,
                        remapped: p.remapped,
                    });
                    shared.lock().stats.forks += 1;
                }
                UFFD_EVENT_REMAP => {
                    segs_remap(&mut p.segs, a[0], a[1], a[2]);
                    p.remapped = true;
                }
                UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => segs_remove(&mut p.segs, a[0], a[1]),
                _ => {}
            }
        }
        for addr in faults {
            serve_fault(shared, source, &mut procs[i], addr)?;
        }
        if (n as usize) < buf.len() {
            return Ok(());
        }
    }
}

/// A fault at page `addr`: the image's pages from there (up to [`FAULT_WINDOW`], in the
/// same piece of address space), or a zero page.
fn serve_fault(
    shared: &Shared,
    source: &dyn ChunkSource,
    p: &mut Proc,
    addr: u64,
) -> Result<(), String> {
    let res = match segs_find(&p.segs, addr) {
        None => zeropage(&p.uffd, addr),
        Some((img, seg)) => {
            let runs = p.runs.clone();
            let k = runs.partition_point(|r| r.addr + r.len <= img);
            match runs.get(k).filter(|r| r.addr <= img) {
                None => zeropage(&p.uffd, addr),
                Some(_) => {
                    let seg_end = seg.img + seg.len;
                    let mut j = k + 1;
                    let mut bytes = runs[k].len;
                    while j < runs.len()
                        && runs[j].addr == runs[j - 1].addr + runs[j - 1].len
                        && runs[j].addr + runs[j].len <= seg_end
                        && bytes + runs[j].len <= FAULT_WINDOW
                    {
                        bytes += runs[j].len;
                        j += 1;
                    }
                    let mut buf = Vec::new();
                    let data = fetch(source, &runs[k..j], &mut buf)?;
                    let r = p.apply(&runs[k..j], data);
                    if r.is_ok() {
                        let mut st = shared.lock();
                        st.stats.faults += 1;
                        st.stats.fault_bytes += bytes;
                    }
                    r
                }
            }
        }
    };
    match res {
        Ok(()) => {
            wake(&p.uffd, addr);
            Ok(())
        }
        Err(CopyErr::Again) => {
            p.deferred.push(addr);
            Ok(())
        }
        Err(CopyErr::Gone) => {
            p.gone = true;
            Ok(())
        }
        Err(CopyErr::Other(e)) => Err(format!(
            "process {}: filling the page at {addr:#x}: {e}",
            p.label
        )),
    }
}

/// Reads the bytes of `runs` into `buf` (reused: its memory is touched once).
fn fetch<'b>(
    source: &dyn ChunkSource,
    runs: &[LazyRun],
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], String> {
    let reqs: Vec<([u8; 32], u64)> = runs.iter().map(|r| (r.hash, r.len)).collect();
    let total: u64 = runs.iter().map(|r| r.len).sum();
    buf.resize(total as usize, 0);
    source
        .fetch_into(&reqs, &mut buf[..])
        .map_err(|e| format!("pages at {:#x}..: {e}", runs.first().map_or(0, |r| r.addr)))?;
    Ok(&buf[..])
}

/// A batch of runs: the address of their list (shared by a process and the children it
/// forked, which hold the same image) and the range in it.
type BatchKey = (usize, usize, usize);

/// Fetches the background pass's next batch on a thread of its own while the batch before
/// is copied in.
struct Fetcher {
    req: std::sync::mpsc::Sender<(BatchKey, Arc<Vec<LazyRun>>, Vec<u8>)>,
    resp: std::sync::mpsc::Receiver<(BatchKey, Result<Vec<u8>, String>)>,
    /// Asked for and not received yet.
    pending: Option<BatchKey>,
    /// Received and not used yet (or kept for a copy to retry), a few at most: with several
    /// processes, the round goes through the others before a prefetched batch is used.
    ready: Vec<(BatchKey, Vec<u8>)>,
    spare: Vec<u8>,
    source: Arc<dyn ChunkSource + Send + Sync>,
}

impl Fetcher {
    fn start(source: Arc<dyn ChunkSource + Send + Sync>) -> std::io::Result<Fetcher> {
        let (req, rx) = std::sync::mpsc::channel::<(BatchKey, Arc<Vec<LazyRun>>, Vec<u8>)>();
        let (tx, resp) = std::sync::mpsc::channel();
        let src = source.clone();
        std::thread::Builder::new()
            .name("lazy-fetch".into())
            .spawn(move || {
                for (key, runs, mut buf) in rx {
                    let r = fetch(&*src, &runs[key.1..key.2], &mut buf).map(|_| ());
                    if tx.send((key, r.map(|()| buf))).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Fetcher {
            req,
            resp,
            pending: None,
            ready: Vec::new(),
            spare: Vec::new(),
            source,
        })
    }

    /// Waits for the batch in flight, if any, and keeps it ready.
    fn settle(&mut self) -> Result<(), String> {
        if self.pending.take().is_some() {
            let (key, r) = self
                .resp
                .recv()
                .map_err(|_| "the lazy fetch thread stopped".to_string())?;
            let buf = r?;
            self.keep(key, buf);
        }
        Ok(())
    }

    /// Keeps `buf`, the bytes of batch `key`, for later.
    fn keep(&mut self, key: BatchKey, buf: Vec<u8>) {
        self.ready.push((key, buf));
        if self.ready.len() > 8 {
            self.spare = self.ready.remove(0).1;
        }
    }

    /// The bytes of batch `key` of `runs`: prefetched, or read now.
    fn take(&mut self, key: BatchKey, runs: &Arc<Vec<LazyRun>>) -> Result<Vec<u8>, String> {
        if self.pending == Some(key) {
            self.settle()?;
        }
        if let Some(i) = self.ready.iter().position(|r| r.0 == key) {
            return Ok(self.ready.swap_remove(i).1);
        }
        let mut buf = std::mem::take(&mut self.spare);
        fetch(&*self.source, &runs[key.1..key.2], &mut buf).map(|_| ())?;
        Ok(buf)
    }

    /// Starts fetching batch `key` of `runs` (after the one in flight is in).
    fn ask(&mut self, key: BatchKey, runs: &Arc<Vec<LazyRun>>) -> Result<(), String> {
        self.settle()?;
        let buf = std::mem::take(&mut self.spare);
        self.req
            .send((key, runs.clone(), buf))
            .map_err(|_| "the lazy fetch thread stopped".to_string())?;
        self.pending = Some(key);
        Ok(())
    }
}

/// The batch of `runs` starting at `i`: up to [`BATCH`] bytes.
fn batch_end(runs: &[LazyRun], i: usize) -> usize {
    let (mut j, mut bytes) = (i, 0);
    while j < runs.len() && (bytes == 0 || bytes + runs[j].len <= BATCH) {
        bytes += runs[j].len;
        j += 1;
    }
    j
}

/// Copies in the next batch of `p`'s runs, with the one after it fetched meanwhile.
fn background_step(shared: &Shared, fetcher: &mut Fetcher, p: &mut Proc) -> Result<(), String> {
    let runs = p.runs.clone();
    let id = Arc::as_ptr(&runs) as usize;
    let (i, j) = (p.next, batch_end(&runs, p.next));
    let data = fetcher.take((id, i, j), &runs)?;
    if j < runs.len() {
        fetcher.ask((id, j, batch_end(&runs, j)), &runs)?;
    }
    let bytes: u64 = runs[i..j].iter().map(|r| r.len).sum();
    let res = p.apply(&runs[i..j], &data);
    match res {
        Ok(()) => {
            p.next = j;
            fetcher.spare = data;
            shared.lock().stats.background_bytes += bytes;
            Ok(())
        }
        Err(CopyErr::Gone) => {
            p.gone = true;
            Ok(())
        }
        // An event interrupted the copy: the main loop reads it, and this batch comes again
        // (the pages copied so far are skipped then) with the bytes kept.
        Err(CopyErr::Again) => {
            fetcher.keep((id, i, j), data);
            Ok(())
        }
        Err(CopyErr::Other(e)) => Err(format!(
            "process {}: filling {:#x}..: {e}",
            p.label, runs[i].addr
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(cur: u64, img: u64, len: u64) -> Seg {
        Seg { cur, img, len }
    }

    #[test]
    fn segments_follow_remove_and_remap() {
        let mut s = vec![seg(0x1000, 0x1000, 0x4000)];
        segs_remove(&mut s, 0x2000, 0x3000);
        assert_eq!(
            s,
            vec![seg(0x1000, 0x1000, 0x1000), seg(0x3000, 0x3000, 0x2000)]
        );
        // Move 0x3000..0x4000 to 0x9000.
        segs_remap(&mut s, 0x3000, 0x9000, 0x1000);
        assert_eq!(
            s,
            vec![
                seg(0x1000, 0x1000, 0x1000),
                seg(0x4000, 0x4000, 0x1000),
                seg(0x9000, 0x3000, 0x1000)
            ]
        );
        assert_eq!(segs_find(&s, 0x9800).map(|f| f.0), Some(0x3800));
        assert_eq!(segs_find(&s, 0x3000), None);
        let mut pieces = Vec::new();
        segs_pieces(&s, 0x2800, 0x2000, &mut pieces);
        pieces.sort();
        // 0x2800..0x3000 is gone; 0x3000..0x4000 is at 0x9000; 0x4000..0x4800 stayed.
        assert_eq!(
            pieces,
            vec![(0x4000, 0x1800, 0x800), (0x9000, 0x800, 0x1000)]
        );
        // A remap onto a range that held image memory drops what was there.
        segs_remap(&mut s, 0x9000, 0x1000, 0x1000);
        assert_eq!(
            s,
            vec![seg(0x1000, 0x3000, 0x1000), seg(0x4000, 0x4000, 0x1000)]
        );
    }
}
