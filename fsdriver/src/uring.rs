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

// SAFETY: the pointers are owned allocations; one thread uses them at a time (the queue
// thread, or a replying thread while the queue thread waits for that reply).
unsafe impl Send for Buffers {}

impl Buffers {
    fn new(payload_size: usize) -> io::Result<Buffers> {
        let hl = std::alloc::Layout::from_size_align(HEADER_SIZE, 64).map_err(io::Error::other)?;
        let pl =
            std::alloc::Layout::from_size_align(payload_size, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have non-zero sizes.
        let (header, payload) = unsafe { (std::alloc::alloc_zeroed(hl), std::alloc::alloc(pl)) };
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
            let mut h = [0u8; OUT_HEADER_SIZE];
            if let Some(first) = bufs.first().filter(|b| b.len() >= OUT_HEADER_SIZE) {
                h.copy_from_slice(&first[..OUT_HEADER_SIZE]);
            }
            h[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
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

/// Waits up to `window` for a completion without sleeping, at idle priority, so that the CPU
/// does not halt between a caller's requests and a caller woken by a reply stays on this
/// CPU (the scheduler treats a CPU running only idle-priority work as free) and preempts
/// the poller at once. Returns whether a completion arrived; the thread is back at normal
/// priority either way.
fn spin_for_completion(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    window: std::time::Duration,
) -> bool {
    set_idle_priority(true);
    let start = std::time::Instant::now();
    let mut found = false;
    while start.elapsed() < window {
        if !ring.completion().is_empty() {
            found = true;
            break;
        }
        std::hint::spin_loop();
    }
    set_idle_priority(false);
    found
}

fn set_idle_priority(idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid sched_param; pid 0 is this thread.
    unsafe { libc::sched_setscheduler(0, policy, &param) };
}

/// Serves queue `qid` on a thread pinned to CPU `qid` until the connection ends.
fn serve<FS: Filesystem>(
    dev: Arc<OwnedFd>,
    qid: u16,
    entries: usize,
    payload_size: usize,
    dispatcher: Arc<RawDispatcher<FS>>,
    poll: std::time::Duration,
) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(qid as usize).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)?;
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        IoUring::builder().build((entries as u32).next_power_of_two().max(2))?;
    let bufs: Vec<Buffers> = (0..entries)
        .map(|_| Buffers::new(payload_size))
        .collect::<io::Result<_>>()?;
    let fd = dev.as_raw_fd();
    for (i, b) in bufs.iter().enumerate() {
        let sqe = uring_cmd(fd, CMD_REGISTER, 0, qid, Some(&b.iov)).user_data(i as u64);
        // SAFETY: the iovecs and the buffers they point to live in `bufs` until this
        // function returns, after the ring (declared before, dropped after) is closed.
        unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    }
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState {
            target: None,
            reply_len: None,
        }),
        done: Condvar::new(),
    });
    let mut request: Vec<u8> = Vec::with_capacity(payload_size + HEADER_SIZE);
    let mut registered = false;
    loop {
        let mut want = 1;
        if !poll.is_zero() && ring.submit().is_ok() && spin_for_completion(&mut ring, poll) {
            want = 0;
        }
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (idx, res) in done {
            if res < 0 {
                let e = -res;
                if registered && matches!(e, libc::ENOTCONN | libc::ECANCELED | libc::ENODEV) {
                    return Ok(());
                }
                return Err(io::Error::from_raw_os_error(e));
            }
            registered = true;
            let Some(b) = bufs.get(idx as usize) else {
                return Err(io::Error::other(format!(
                    "io_uring completion for unknown entry {idx}"
                )));
            };
            let len = b.read_u32(0) as usize;
            let commit_id = b.read_u64(ENT_IN_OUT + 8);
            let payload_sz = b.read_u32(ENT_IN_OUT + 16) as usize;
            let op_len = len.saturating_sub(IN_HEADER_SIZE + payload_sz);
            if len < IN_HEADER_SIZE
                || op_len > HEADER_SIZE - OP_IN - 32
                || payload_sz > b.payload_size
            {
                log::error!(
                    "malformed FUSE request from io_uring (len {len}, payload {payload_sz})"
                );
            }
            let op_len = op_len.min(HEADER_SIZE - OP_IN - 32);
            let payload_sz = payload_sz.min(b.payload_size);
            request.clear();
            // SAFETY: all three ranges are inside their allocations (clamped above), and the
            // kernel does not write to the entry until it is committed.
            unsafe {
                request.extend_from_slice(std::slice::from_raw_parts(b.header, IN_HEADER_SIZE));
                request.extend_from_slice(std::slice::from_raw_parts(b.header.add(OP_IN), op_len));
                request.extend_from_slice(std::slice::from_raw_parts(b.payload, payload_sz));
            }
            let total = request.len() as u32;
            request[0..4].copy_from_slice(&total.to_ne_bytes());
            slot.arm(b);
            let hook: Arc<dyn ReplyHook> = slot.clone();
            if !dispatcher.dispatch(&request, hook) {
                let unique = u64::from_ne_bytes(request[8..16].try_into().unwrap_or([0; 8]));
                let mut h = [0u8; OUT_HEADER_SIZE];
                h[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
                h[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                h[8..16].copy_from_slice(&unique.to_ne_bytes());
                slot.send(&[IoSlice::new(&h)])?;
            }
            let reply_len = slot.wait();
            b.write_u32(ENT_IN_OUT + 16, reply_len as u32);
            let sqe = uring_cmd(fd, CMD_COMMIT_AND_FETCH, commit_id, qid, None).user_data(idx);
            // SAFETY: as for REGISTER above.
            unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        }
    }
}

/// Starts serving every CPU's queue. Returns once each queue thread has started; a queue
/// that cannot register (an old kernel, io_uring disabled) logs why, and the kernel then
/// keeps using `/dev/fuse`, which fuser serves.
pub fn start<FS: Filesystem + Send + Sync + 'static>(
    dev: OwnedFd,
    dispatcher: RawDispatcher<FS>,
    payload_size: usize,
) {
    let threads_per_queue: usize = std::env::var("FORKPOINT_FUSE_URING_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let poll = std::time::Duration::from_micros(
        std::env::var("FORKPOINT_FUSE_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    let dev = Arc::new(dev);
    let dispatcher = Arc::new(dispatcher);
    for qid in 0..cpus {
        for t in 0..threads_per_queue {
            let (dev, dispatcher) = (dev.clone(), dispatcher.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-q{qid}.{t}"))
                .spawn(move || {
                    let poll = if t == 0 {
                        poll
                    } else {
                        std::time::Duration::ZERO
                    };
                    if let Err(e) = serve(dev, qid as u16, 1, payload_size, dispatcher, poll) {
                        log::warn!(
                            "FUSE io_uring queue {qid} stopped: {e}; requests go through /dev/fuse"
                        );
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start FUSE io_uring queue {qid}: {e}");
            }
        }
    }
}
