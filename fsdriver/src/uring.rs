//! FUSE over io_uring.
//!
//! With `/dev/fuse`, a request made on one CPU wakes whichever server thread the kernel
//! picks, usually on the other CPU, and the reply wakes the caller back across CPUs. On a
//! virtual machine each of those wakeups is an inter-processor interrupt and often a
//! halted vCPU to restart: an untar of 54k files took 13 s with tar and the daemon pinned
//! to one CPU and 50-60 s without. FUSE over io_uring (Linux 6.14) has one request queue
//! per CPU; a request goes to the queue of the CPU it was made on, and the threads here,
//! pinned one set per CPU, answer it there.
//!
//! fuser still mounts, negotiates (`FUSE_OVER_IO_URING` in the INIT reply) and reads
//! `/dev/fuse`: it serves every request until all queues are registered, and FORGET and
//! INTERRUPT for good. Requests arriving here are rebuilt in `/dev/fuse` layout and handed
//! to the same filesystem through [`fuser::RawDispatcher`]; replies come back through a
//! [`fuser::ReplyHook`] into the entry's buffers.
//!
//! The protocol (include/uapi/linux/fuse.h): a queue entry is a pair of buffers, a 288-byte
//! header (`fuse_in_header`/`fuse_out_header` at 0, the operation's argument struct at
//! 128, `fuse_uring_ent_in_out` at 256) and a payload buffer. `REGISTER` hands an entry to
//! the kernel; its completion means a request is in the buffers. `COMMIT_AND_FETCH` sends
//! the reply written into the same buffers and hands the entry back.

use fuser::{Filesystem, RawDispatcher, ReplyHook};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`.
const HEADER_SIZE: usize = 288;
/// Offset of `op_in` in the header.
const OP_IN: usize = 128;
/// Offset of `struct fuse_uring_ent_in_out` in the header.
const ENT_IN_OUT: usize = 256;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;

/// Where the kernel's module parameter lives; FUSE over io_uring is off unless it is `Y`.
const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether io_uring should be offered at INIT: not when `FORKPOINT_FUSE_URING=0`, and only
/// if the kernel allows it. As root, turns the module parameter on when it is off (it only
/// makes the capability available; each filesystem still has to ask for it).
pub fn wanted() -> bool {
    if std::env::var("FORKPOINT_FUSE_URING").is_ok_and(|v| v == "0") {
        return false;
    }
    // Once INIT agrees to io_uring the kernel holds every request until each CPU's queue
    // has an entry, so make sure rings can be made here at all (seccomp filters and
    // `kernel.io_uring_disabled` forbid them) before asking for it.
    if let Err(e) = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4) {
        log::info!("FUSE over io_uring stays off: cannot create an io_uring: {e}");
        return false;
    }
    match std::fs::read_to_string(ENABLE_PARAM) {
        Ok(v) if v.trim() == "Y" => true,
        Ok(_) => match std::fs::write(ENABLE_PARAM, "Y") {
            Ok(()) => {
                log::info!("enabled FUSE over io_uring ({ENABLE_PARAM})");
                true
            }
            Err(e) => {
                log::info!("FUSE over io_uring stays off: cannot set {ENABLE_PARAM}: {e}");
                false
            }
        },
        Err(_) => false,
    }
}

/// One entry's buffers. The kernel writes into them between a fetch and its completion, so
/// they are raw allocations reached only through raw pointers.
struct Buffers {
    header: *mut u8,
    payload: *mut u8,
    payload_size: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl Buffers {
    fn new(payload_size: usize) -> io::Result<Buffers> {
        let hl = std::alloc::Layout::from_size_align(HEADER_SIZE, 64).map_err(io::Error::other)?;
        let pl =
            std::alloc::Layout::from_size_align(payload_size, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have non-zero sizes. Both zeroed: a READ answered in place
        // takes the payload as a byte slice before anything was written to it.
        let (header, payload) =
            unsafe { (std::alloc::alloc_zeroed(hl), std::alloc::alloc_zeroed(pl)) };
        if header.is_null() || payload.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_size,
            },
        ]);
        Ok(Buffers {
            header,
            payload,
            payload_size,
            iov,
        })
    }

    fn read_u32(&self, off: usize) -> u32 {
        debug_assert!(off + 4 <= HEADER_SIZE);
        // SAFETY: in bounds of the header allocation; unaligned read of plain bytes.
        unsafe { std::ptr::read_unaligned(self.header.add(off).cast::<u32>()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        debug_assert!(off + 8 <= HEADER_SIZE);
        // SAFETY: as in `read_u32`.
        unsafe { std::ptr::read_unaligned(self.header.add(off).cast::<u64>()) }
    }

    fn write_u32(&self, off: usize, v: u32) {
        debug_assert!(off + 4 <= HEADER_SIZE);
        // SAFETY: as in `read_u32`; the kernel does not touch the entry until it is committed.
        unsafe { std::ptr::write_unaligned(self.header.add(off).cast::<u32>(), v) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the ring that knew them is gone.
        unsafe {
            std::alloc::dealloc(
                self.header,
                std::alloc::Layout::from_size_align_unchecked(HEADER_SIZE, 64),
            );
            std::alloc::dealloc(
                self.payload,
                std::alloc::Layout::from_size_align_unchecked(self.payload_size, 4096),
            );
        }
    }
}

/// The reply of the request being served, written straight into the entry.
struct Slot {
    state: Mutex<SlotState>,
    done: Condvar,
}

struct SlotState {
    /// The entry waiting for its reply, if any.
    target: Option<(usize, usize, usize)>, // (header, payload, payload capacity) as addresses
    /// Payload length of the reply once it is written.
    reply_len: Option<usize>,
}

impl ReplyHook for Slot {
    fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((header, payload, cap)) = st.target.take() else {
            return Err(io::Error::other(
                "FUSE reply after its request was answered",
            ));
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut len = total.saturating_sub(OUT_HEADER_SIZE);
        let mut pos = 0usize;
        if total < OUT_HEADER_SIZE || len > cap {
            // Cannot happen with fuser's replies; answer EIO rather than nothing.
            let unique = bufs.first().and_then(|b| ne_u64(b, 8)).unwrap_or(0);
            let h = out_header(0, -libc::EIO, unique);
            // SAFETY: the header allocation is HEADER_SIZE >= 16 bytes.
            unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), header as *mut u8, h.len()) };
            len = 0;
        } else {
            for b in bufs {
                let mut src: &[u8] = b;
                if pos < OUT_HEADER_SIZE {
                    let n = (OUT_HEADER_SIZE - pos).min(src.len());
                    // SAFETY: pos + n <= 16 <= HEADER_SIZE.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), (header as *mut u8).add(pos), n)
                    };
                    pos += n;
                    src = &src[n..];
                }
                if !src.is_empty() {
                    let at = pos - OUT_HEADER_SIZE;
                    // SAFETY: at + src.len() <= len <= cap, the payload allocation's size.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            (payload as *mut u8).add(at),
                            src.len(),
                        )
                    };
                    pos += src.len();
                }
            }
        }
        st.reply_len = Some(len);
        self.done.notify_all();
        Ok(())
    }
}

impl Slot {
    /// Answers a READ of `size` bytes at `off` on this thread: `fill` writes the data
    /// straight into the entry's payload buffer and returns its length or an errno.
    /// Returns the reply's payload length.
    fn answer_read(
        &self,
        unique: u64,
        off: u64,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, i32>,
    ) -> usize {
        // Taken now: a stray reply through `send` meanwhile finds the entry answered.
        let target = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .target
            .take();
        let Some((header, payload, cap)) = target else {
            log::error!("FUSE READ {unique} answered twice");
            return 0;
        };
        let (error, n) = if off > i64::MAX as u64 {
            (-libc::EINVAL, 0)
        } else if size > cap {
            // Cannot happen: the kernel sizes requests by the buffers it was given.
            (-libc::EIO, 0)
        } else {
            // SAFETY: the payload allocation is `cap >= size` bytes, initialised, and lives
            // as long as the queue; while the entry waits for its reply only this thread
            // touches it (the target was taken above; the kernel reads it after the commit).
            let buf = unsafe { std::slice::from_raw_parts_mut(payload as *mut u8, size) };
            // A panic in the filesystem answers EIO, as for the other requests.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(buf))) {
                Ok(Ok(n)) => (0, n.min(size)),
                Ok(Err(e)) => (-e, 0),
                Err(_) => {
                    log::error!("the filesystem panicked answering a FUSE READ");
                    (-libc::EIO, 0)
                }
            }
        };
        let h = out_header(n, error, unique);
        // SAFETY: the header allocation is HEADER_SIZE >= 16 bytes, ours as the payload is.
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), header as *mut u8, h.len()) };
        n
    }

    fn arm(&self, b: &Buffers) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.target = Some((b.header as usize, b.payload as usize, b.payload_size));
        st.reply_len = None;
    }

    /// Waits for the reply and returns its payload length.
    fn wait(&self) -> usize {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(n) = st.reply_len.take() {
                return n;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn uring_cmd(
    dev: i32,
    cmd_op: u32,
    commit_id: u64,
    qid: u16,
    iov: Option<&[libc::iovec; 2]>,
) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut op = opcode::UringCmd80::new(types::Fd(dev), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        op = op.addr(Some(iov.as_ptr() as u64));
    }
    let entry = op.build();
    if iov.is_none() {
        return entry;
    }
    // The kernel wants `sqe->len` = 2 (iovecs), a field the builder does not set.
    // SAFETY: `Entry128` is `repr(C)` over a 64-byte `io_uring_sqe` and 64 more bytes;
    // `len` is the u32 at offset 24 of `io_uring_sqe`.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(entry);
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
    }
}

/// Waits up to `window` for a completion without sleeping, so that the CPU does not halt
/// between a caller's requests. The thread yields on every turn: a caller woken by the
/// reply just committed (on this CPU, where it made its request) runs at once, and so does
/// anything else that wants the CPU. Returns whether a completion arrived.
///
/// Polling at `SCHED_IDLE` instead (switched there and back around every poll, so that
/// requests are answered at normal priority) cost two `sched_setscheduler` calls and a
/// slower hand-over per request: an untar of 54k files took 6.1-6.5 s that way and
/// 3.8 s yielding, in alternating runs (docs/BENCHMARKS.md).
fn spin_for_completion(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    window: std::time::Duration,
) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        if !ring.completion().is_empty() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// FUSE opcodes handed to the worker threads: they move data or wait for the disk, and a
/// queue thread that ran them itself would hold up the other requests made on its CPU.
const OP_READ: u32 = 15;
const OP_WRITE: u32 = 16;
const OP_FSYNC: u32 = 20;
const OP_FSYNCDIR: u32 = 30;
const OP_COPY_FILE_RANGE: u32 = 47;
/// Reads and writes smaller than this are answered on the queue thread.
const OFFLOAD_MIN: u32 = 128 << 10;

fn offloaded(opcode: u32, op_args: &[u8]) -> bool {
    match opcode {
        OP_FSYNC | OP_FSYNCDIR | OP_COPY_FILE_RANGE => true,
        // fuse_read_in and fuse_write_in: fh u64, offset u64, size u32, ...
        OP_READ | OP_WRITE => ne_u32(op_args, 16).is_some_and(|size| size >= OFFLOAD_MIN),
        _ => false,
    }
}

/// The native-endian u32 at `at` in `b`, if `b` is long enough.
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
}

/// The native-endian u64 at `at` in `b`, if `b` is long enough.
fn ne_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
}

/// A `fuse_out_header` for `payload` bytes of reply, `error` (a negative errno or 0).
fn out_header(payload: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_SIZE] {
    let mut h = [0u8; OUT_HEADER_SIZE];
    h[0..4].copy_from_slice(&((OUT_HEADER_SIZE + payload) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Hands one request in `/dev/fuse` layout to the filesystem; false if it cannot be parsed.
type Dispatch = dyn Fn(&[u8], Arc<dyn ReplyHook>) -> bool + Send + Sync;

/// Reads `(inode, offset)` into the buffer given, returning the bytes read or an errno.
pub type ReadInto = dyn Fn(u64, u64, &mut [u8]) -> Result<usize, i32> + Send + Sync;

/// What answers requests: fuser's dispatcher, and a READ path that writes the data
/// straight into the entry's payload buffer (fuser's reply would copy it there once more).
pub struct Server {
    dispatch: Box<Dispatch>,
    read: Box<ReadInto>,
}

const OP_READ_SIZE: usize = 20;

/// `(unique, inode, offset, size)` of a READ request in `/dev/fuse` layout.
fn read_request(r: &[u8]) -> Option<(u64, u64, u64, usize)> {
    if ne_u32(r, 4)? != OP_READ || r.len() < IN_HEADER_SIZE + OP_READ_SIZE {
        return None;
    }
    // fuse_in_header: len, opcode, unique, nodeid, ...; fuse_read_in: fh, offset, size, ...
    Some((
        ne_u64(r, 8)?,
        ne_u64(r, 16)?,
        ne_u64(r, IN_HEADER_SIZE + 8)?,
        ne_u32(r, IN_HEADER_SIZE + 16)? as usize,
    ))
}

/// A request handed to a worker, and how the worker hands the entry back.
struct Job {
    queue: Arc<Returns>,
    entry: usize,
    request: Vec<u8>,
    slot: Arc<Slot>,
    server: Arc<Server>,
}

/// Entries whose replies a worker has written, waiting for their queue thread to commit
/// them; the eventfd wakes that thread.
struct Returns {
    done: Mutex<Vec<(usize, usize, Vec<u8>)>>,
    event: OwnedFd,
}

/// Answers `request` through `slot` and returns the reply's payload length.
fn answer(server: &Server, request: &[u8], slot: &Arc<Slot>) -> usize {
    if let Some((unique, ino, off, size)) = read_request(request) {
        return slot.answer_read(unique, off, size, |buf| (server.read)(ino, off, buf));
    }
    let dispatch = &server.dispatch;
    let hook: Arc<dyn ReplyHook> = slot.clone();
    // A panic in the filesystem must not take the queue's only thread (or a worker holding
    // an entry) with it; the request is answered with EIO instead (the reply, if one was
    // not sent, is dropped with the unwinding and fuser answers EIO).
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(request, hook)))
        .unwrap_or_else(|_| {
            log::error!("the filesystem panicked answering a FUSE request");
            true
        });
    if !parsed {
        let unique = ne_u64(request, 8).unwrap_or(0);
        let h = out_header(0, -libc::EIO, unique);
        let _ = slot.send(&[IoSlice::new(&h)]);
    }
    slot.wait()
}

fn worker(jobs: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let n = answer(&job.server, &job.request, &job.slot);
        job.queue
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((job.entry, n, job.request));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
        unsafe { libc::write(job.queue.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Queues `sqe`, submitting what is already queued first if the submission queue is full.
///
/// # Safety
/// Whatever `sqe` points to must stay valid until the ring is closed.
unsafe fn push(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    sqe: &squeue::Entry128,
) -> io::Result<()> {
    // SAFETY: the caller keeps what the entry points to alive.
    if unsafe { ring.submission().push(sqe) }.is_ok() {
        return Ok(());
    }
    ring.submit()?;
    // SAFETY: as above.
    unsafe { ring.submission().push(sqe) }.map_err(io::Error::other)
}

/// user_data of the eventfd read; entries use their index.
const EVENT: u64 = u64::MAX;

/// Serves queue `qid` from a thread pinned to CPU `qid` until the connection ends. Small
/// requests are answered here; large reads and writes and fsyncs go to the workers, and
/// their entries come back through `Returns`.
#[allow(clippy::too_many_arguments)]
fn serve(
    dev: Arc<OwnedFd>,
    qid: u16,
    entries: usize,
    payload_size: usize,
    server: Arc<Server>,
    jobs: std::sync::mpsc::Sender<Job>,
    poll: std::time::Duration,
    reached_kernel: &mut bool,
) -> io::Result<()> {
    if std::env::var("FORKPOINT_FUSE_URING_FAIL_QUEUE").is_ok_and(|v| v == qid.to_string()) {
        // For the test of the fallback below.
        return Err(io::Error::other(
            "queue set up to fail (FORKPOINT_FUSE_URING_FAIL_QUEUE)",
        ));
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(qid as usize).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            log::debug!("FUSE queue {qid} runs unpinned: {e}");
        }
    }
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `efd` is a new descriptor that nothing else owns.
    let event = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
    let returns = Arc::new(Returns {
        done: Mutex::new(Vec::new()),
        event,
    });
    let bufs: Vec<Buffers> = (0..entries)
        .map(|_| Buffers::new(payload_size))
        .collect::<io::Result<_>>()?;
    let slots: Vec<Arc<Slot>> = (0..entries)
        .map(|_| {
            Arc::new(Slot {
                state: Mutex::new(SlotState {
                    target: None,
                    reply_len: None,
                }),
                done: Condvar::new(),
            })
        })
        .collect();
    let mut requests: Vec<Option<Vec<u8>>> = (0..entries)
        .map(|_| Some(Vec::with_capacity(payload_size + HEADER_SIZE)))
        .collect();
    let mut event_buf = Box::new([0u8; 8]);
    // Declared after everything the kernel may write to, so it is closed (and its
    // requests cancelled) before they are freed.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        IoUring::builder().build((entries as u32 + 1).next_power_of_two().max(4))?;
    let fd = dev.as_raw_fd();
    let arm_event = |ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, buf: &mut [u8; 8]| {
        let sqe: squeue::Entry128 = opcode::Read::new(types::Fd(efd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(EVENT)
            .into();
        // SAFETY: `buf` lives until the function returns, after the ring is closed.
        unsafe { push(ring, &sqe) }
    };
    arm_event(&mut ring, &mut event_buf)?;
    for (i, b) in bufs.iter().enumerate() {
        let sqe = uring_cmd(fd, CMD_REGISTER, 0, qid, Some(&b.iov)).user_data(i as u64);
        // SAFETY: the iovecs and buffers live in `bufs` until the function returns, after
        // the ring is closed.
        unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    }
    let mut registered = false;
    let mut with_workers = 0usize;
    let mut retries = vec![0u8; entries];
    let mut live = entries;
    let result = loop {
        let mut want = 1;
        // Not while workers hold entries: they and their callers need the CPUs more than
        // a poller does, and the worker's reply wakes this thread anyway.
        if !poll.is_zero()
            && with_workers == 0
            && ring.submit().is_ok()
            && spin_for_completion(&mut ring, poll)
        {
            want = 0;
        }
        match ring.submit_and_wait(want) {
            Ok(_) => *reached_kernel = true,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                std::thread::yield_now();
            }
            Err(e) => break Err(e),
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut stop = None;
        for (ud, res) in completions {
            if ud == EVENT {
                let back: Vec<_> =
                    std::mem::take(&mut *returns.done.lock().unwrap_or_else(|e| e.into_inner()));
                for (idx, reply_len, request) in back {
                    with_workers -= 1;
                    requests[idx] = Some(request);
                    let b = &bufs[idx];
                    b.write_u32(ENT_IN_OUT + 16, reply_len as u32);
                    let commit_id = b.read_u64(ENT_IN_OUT + 8);
                    let sqe = uring_cmd(fd, CMD_COMMIT_AND_FETCH, commit_id, qid, None)
                        .user_data(idx as u64);
                    // SAFETY: as for REGISTER.
                    if let Err(e) = unsafe { push(&mut ring, &sqe) } {
                        stop = Some(Err(e));
                    }
                }
                if let Err(e) = arm_event(&mut ring, &mut event_buf) {
                    stop = Some(Err(e));
                }
                continue;
            }
            let idx = ud as usize;
            if res < 0 {
                let e = -res;
                if matches!(
                    e,
                    libc::ENOTCONN | libc::ECANCELED | libc::ENODEV | libc::ECONNABORTED
                ) {
                    // The connection is ending (or ended before this queue was used).
                    stop = Some(Ok(()));
                } else if idx < bufs.len() && retries[idx] < 3 && registered {
                    // The kernel dropped this entry; register it again, a few times at
                    // most, so the queue does not run out.
                    retries[idx] += 1;
                    log::warn!(
                        "FUSE queue {qid}: entry {idx} failed ({}); registering it again",
                        io::Error::from_raw_os_error(e)
                    );
                    let sqe = uring_cmd(fd, CMD_REGISTER, 0, qid, Some(&bufs[idx].iov))
                        .user_data(idx as u64);
                    // SAFETY: as for REGISTER above.
                    if let Err(e) = unsafe { push(&mut ring, &sqe) } {
                        stop = Some(Err(e));
                    }
                } else {
                    // An entry that cannot be registered: the kernel has turned io_uring
                    // off for this connection if none was yet in use. Keep serving the
                    // others; stop only when none is left.
                    live -= 1;
                    log::warn!(
                        "FUSE queue {qid}: entry {idx} gave up ({})",
                        io::Error::from_raw_os_error(e)
                    );
                    if live == 0 {
                        stop = Some(Err(io::Error::from_raw_os_error(e)));
                    }
                }
                continue;
            }
            registered = true;
            let (Some(b), Some(Some(mut request))) =
                (bufs.get(idx), requests.get_mut(idx).map(Option::take))
            else {
                log::error!("FUSE queue {qid}: completion for unknown or busy entry {idx}");
                continue;
            };
            let len = b.read_u32(0) as usize;
            let opcode = b.read_u32(4);
            let commit_id = b.read_u64(ENT_IN_OUT + 8);
            let payload_sz = b.read_u32(ENT_IN_OUT + 16) as usize;
            let op_len = len.saturating_sub(IN_HEADER_SIZE + payload_sz);
            if len < IN_HEADER_SIZE || op_len > ENT_IN_OUT - OP_IN || payload_sz > b.payload_size {
                log::error!(
                    "malformed FUSE request from io_uring (len {len}, payload {payload_sz})"
                );
            }
            let op_len = op_len.min(ENT_IN_OUT - OP_IN);
            let payload_sz = payload_sz.min(b.payload_size);
            request.clear();
            // SAFETY: all three ranges are inside their allocations (clamped above), and
            // the kernel does not write to the entry until it is committed.
            unsafe {
                request.extend_from_slice(std::slice::from_raw_parts(b.header, IN_HEADER_SIZE));
                request.extend_from_slice(std::slice::from_raw_parts(b.header.add(OP_IN), op_len));
                request.extend_from_slice(std::slice::from_raw_parts(b.payload, payload_sz));
            }
            let total = request.len() as u32;
            request[0..4].copy_from_slice(&total.to_ne_bytes());
            let slot = &slots[idx];
            slot.arm(b);
            if offloaded(opcode, &request[IN_HEADER_SIZE..IN_HEADER_SIZE + op_len]) {
                let job = Job {
                    queue: returns.clone(),
                    entry: idx,
                    request,
                    slot: slot.clone(),
                    server: server.clone(),
                };
                match jobs.send(job) {
                    Ok(()) => {
                        with_workers += 1;
                        continue;
                    }
                    Err(std::sync::mpsc::SendError(job)) => request = job.request,
                }
            }
            let reply_len = answer(&server, &request, slot);
            requests[idx] = Some(request);
            b.write_u32(ENT_IN_OUT + 16, reply_len as u32);
            let sqe =
                uring_cmd(fd, CMD_COMMIT_AND_FETCH, commit_id, qid, None).user_data(idx as u64);
            // SAFETY: as for REGISTER above.
            if let Err(e) = unsafe { push(&mut ring, &sqe) } {
                stop = Some(Err(e));
            }
        }
        if let Some(r) = stop {
            break r;
        }
    };
    // Workers still write into entries they hold: wait for them before the buffers go.
    // The ring's own eventfd read may take a wakeup, so look at `done` every 10 ms too
    // (and never block in `read`).
    // SAFETY: fcntl on an eventfd we own.
    unsafe { libc::fcntl(efd, libc::F_SETFL, libc::O_NONBLOCK) };
    loop {
        let back = std::mem::take(&mut *returns.done.lock().unwrap_or_else(|e| e.into_inner()));
        with_workers -= back.len().min(with_workers);
        if with_workers == 0 {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: efd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an eventfd we own.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        if pfd.revents & libc::POLLIN != 0 {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer; the eventfd is readable.
            unsafe { libc::read(efd, v.as_mut_ptr().cast(), 8) };
        }
    }
    drop(ring);
    result
}

/// A queue that never registered would leave every request waiting (the kernel holds them
/// until all queues are ready). A REGISTER the kernel must reject (a zero-length header
/// buffer) makes it turn io_uring off for this connection and release them to `/dev/fuse`.
fn force_fallback(dev: i32, qid: u16) {
    let tried = (|| -> io::Result<i32> {
        let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(2)?;
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let sqe = uring_cmd(dev, CMD_REGISTER, 0, qid, Some(&iov)).user_data(0);
        // SAFETY: `iov` outlives the wait below, and the kernel rejects the entry.
        unsafe { push(&mut ring, &sqe) }?;
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map(|c| c.result()).unwrap_or(0);
        Ok(res)
    })();
    match tried {
        Ok(res) if res < 0 => {
            log::warn!("FUSE over io_uring turned off; requests go through /dev/fuse")
        }
        Ok(res) => log::error!("FUSE io_uring fallback: unexpected result {res}"),
        Err(e) => log::error!("FUSE io_uring fallback failed: {e}; the mount may hang"),
    }
}

/// How many queues the kernel made: one per possible CPU.
fn possible_cpus() -> usize {
    let parse = |s: &str| -> Option<usize> {
        let mut n = 0;
        for part in s.trim().split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
            n = n.max(b + 1).max(a + 1);
        }
        Some(n)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse(&s))
        // SAFETY: sysconf has no memory-safety preconditions.
        .unwrap_or_else(|| unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize)
}

/// Starts serving every CPU's queue, and the workers they hand large requests to. A queue
/// that cannot register (an old kernel, io_uring disabled) logs why, and the kernel then
/// keeps using `/dev/fuse`, which fuser serves.
pub fn start<FS: Filesystem + Send + Sync + 'static>(
    dev: OwnedFd,
    dispatcher: RawDispatcher<FS>,
    read: Box<ReadInto>,
    payload_size: usize,
) {
    let entries: usize = std::env::var("FORKPOINT_FUSE_URING_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let poll = std::time::Duration::from_micros(
        std::env::var("FORKPOINT_FUSE_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    let cpus = possible_cpus();
    let dev = Arc::new(dev);
    let server = Arc::new(Server {
        dispatch: Box::new(move |req: &[u8], hook: Arc<dyn ReplyHook>| {
            dispatcher.dispatch(req, hook)
        }),
        read,
    });
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for w in 0..cpus + 2 {
        let rx = rx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("fuse-w{w}"))
            .spawn(move || worker(rx))
        {
            log::warn!("cannot start FUSE worker: {e}");
        }
    }
    for qid in 0..cpus {
        let (qdev, server, tx) = (dev.clone(), server.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("fuse-q{qid}"))
            .spawn(move || {
                let mut reached = false;
                let fd = qdev.as_raw_fd();
                let r = serve(
                    qdev.clone(),
                    qid as u16,
                    entries,
                    payload_size,
                    server,
                    tx,
                    poll,
                    &mut reached,
                );
                if let Err(e) = r {
                    log::warn!("FUSE io_uring queue {qid} stopped: {e}");
                    if !reached {
                        force_fallback(fd, qid as u16);
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start FUSE io_uring queue {qid}: {e}");
            force_fallback(dev.as_raw_fd(), qid as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_requests_are_parsed_and_others_left_to_fuser() {
        let mut req = vec![0u8; IN_HEADER_SIZE + 40];
        req[4..8].copy_from_slice(&OP_READ.to_ne_bytes());
        req[8..16].copy_from_slice(&77u64.to_ne_bytes());
        req[16..24].copy_from_slice(&5u64.to_ne_bytes());
        req[IN_HEADER_SIZE + 8..IN_HEADER_SIZE + 16].copy_from_slice(&(1u64 << 33).to_ne_bytes());
        req[IN_HEADER_SIZE + 16..IN_HEADER_SIZE + 20].copy_from_slice(&(1u32 << 20).to_ne_bytes());
        assert_eq!(read_request(&req), Some((77, 5, 1 << 33, 1 << 20)));
        assert_eq!(read_request(&req[..IN_HEADER_SIZE + 19]), None, "truncated");
        req[4..8].copy_from_slice(&OP_WRITE.to_ne_bytes());
        assert_eq!(read_request(&req), None, "not a read");
    }
}
