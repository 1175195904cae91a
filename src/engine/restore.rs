//! Restoring a [`ProcessImage`] into a new process.
//!
//! ## Order of operations
//! 1. **Child**: `clone3` (with `set_tid = [pid]` if a pid is requested) a child of the calling
//!    process that calls `PTRACE_TRACEME` and stops itself with `SIGSTOP`. From now on the
//!    child only executes system calls we inject; any failure kills it.
//! 2. **Scratch**: choose an address range free both in the child and in the image, map it
//!    (`rwx`, injected through a `syscall` instruction in the child's vDSO) and write
//!    `syscall; int3` at its start. All further calls are injected there; the rest of the
//!    scratch area holds arguments (paths, structs).
//! 3. **Clean slate**: unregister the inherited rseq area, park the child's `[vvar]`,
//!    `[vvar_vclock]` and `[vdso]` at a second free range with `mremap`, unmap every other
//!    mapping, then `mremap` the vDSO pieces to the addresses recorded in the image (their
//!    sizes must match: same kernel).
//! 4. **Address space**: `mmap(MAP_FIXED)` every image mapping at its old address: file
//!    mappings reopened from their path at the recorded offset (after checking that the file
//!    is unchanged), anonymous (private or shared) otherwise, `[stack]` with `MAP_GROWSDOWN`.
//!    Mappings that receive contents are mapped writable first.
//! 5. **Contents**: write every page run with `process_vm_writev` (zero runs only where the
//!    mapping is file-backed), then `mprotect` mappings back to their recorded protection.
//! 6. **Process state**: `prctl(PR_SET_MM, PR_SET_MM_MAP)` (brk, stack, args, env, auxv,
//!    exe), close all inherited fds and reopen the image's (open, `dup3` to the number,
//!    `lseek`; rlimits are set just before, with `prlimit64` from outside), `chdir`, `umask`,
//!    `personality`, session/process group, signal handlers, then per thread the alternate
//!    signal stack, `set_tid_address`, robust list, rseq, thread name and credentials (last,
//!    as they may drop privileges), then the signal mask (`PTRACE_SETSIGMASK`) and xstate.
//! 7. **Go**: inject `munmap(scratch)` and stop at its syscall exit, load the image's
//!    registers and detach. The process continues at the dumped instruction.
//!
//!
//! ## Threads
//! After the process-wide state (step 6) the leader creates every other thread with an
//! injected `clone3(CLONE_VM | CLONE_THREAD | ...)` (with `set_tid` when the image's own pid is
//! requested, so thread ids survive too). With `PTRACE_O_TRACECLONE` the new threads are traced
//! from birth and stop before running user code; each gets its per-thread state (alternate
//! stack, `set_tid_address`, robust list, rseq, name, credentials), signal mask, xstate and
//! registers, and stays stopped until the leader has unmapped the scratch area. Then all
//! threads are detached.

use std::path::Path;

use nix::errno::Errno;

use super::dump::{read_maps, DumpError, MapsLine};
use super::image::{
    CapSets, FdKind, Mapping, MappingKind, MemberState, PageData, ProcessImage, SeccompFilter,
    SigInfo, TreeImage, PAGE_SIZE, SIGINFO_LEN,
};
use super::sys;
use super::tracer::{TraceError, Tracer};
use super::unix;

/// Supplies page contents that an image references by hash ([`PageData::Stored`]).
pub trait ChunkSource: Sync {
    /// Return the `len` bytes stored under `hash`.
    fn fetch(&self, hash: &[u8; 32], len: u64) -> Result<Vec<u8>, String>;

    /// Return the bytes of every (hash, len), in order. A source may fetch them in parallel.
    fn fetch_many(&self, reqs: &[([u8; 32], u64)]) -> Result<Vec<Vec<u8>>, String> {
        reqs.iter().map(|(h, l)| self.fetch(h, *l)).collect()
    }

    /// Writes the bytes of every (hash, len), in order, one after the other into `out`
    /// (whose length is the sum of the lengths). A chunk whose length is not the one asked
    /// for is an error.
    fn fetch_into(&self, reqs: &[([u8; 32], u64)], out: &mut [u8]) -> Result<(), String> {
        let data = self.fetch_many(reqs)?;
        let mut at = 0usize;
        for ((h, len), d) in reqs.iter().zip(&data) {
            if d.len() as u64 != *len {
                return Err(format!(
                    "chunk {} has {} bytes, not {len}",
                    hex32(h),
                    d.len()
                ));
            }
            out.get_mut(at..at + d.len())
                .ok_or("chunks longer than the buffer")?
                .copy_from_slice(d);
            at += d.len();
        }
        Ok(())
    }
}

/// A hash in hex, for messages.
pub fn hex32(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// `struct itimerval`/`itimerspec`-style words as the kernel reads them (little endian).
fn le_words(words: &[i64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Stored runs fetched and written at once (bytes).
const FETCH_BATCH: u64 = 16 << 20;

/// Options for [`restore_with`].
#[derive(Default)]
pub struct RestoreOptions<'a> {
    /// Create the process with this pid (`clone3` + `set_tid`; needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE in the pid namespace, and the pid must be free).
    pub pid: Option<i32>,
    /// Source for [`PageData::Stored`] runs.
    pub chunks: Option<&'a dyn ChunkSource>,
    /// Do not check that mapped files still have the recorded size and mtime.
    pub skip_file_checks: bool,
    /// Where terminal descriptors ([`FdKind::Tty`]) are reopened: a directory whose entries
    /// `0`, `1`, `2` name the input, output and error to use. Default: the restoring
    /// process's own `/proc/PID/fd`, so a restore in a terminal puts the program back on it.
    pub terminal: Option<&'a Path>,
}

/// Errors while restoring. The half-built process is killed in every case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The image uses something this restorer cannot do yet.
    #[error("cannot restore image of process {pid}: {what}")]
    Unsupported {
        /// Pid in the image.
        pid: i32,
        /// What.
        what: String,
    },
    /// The requested pid is taken.
    #[error("pid {pid} is already in use")]
    PidInUse {
        /// The pid.
        pid: i32,
    },
    /// Creating the child failed.
    #[error("creating the restore child failed: {source}")]
    Spawn {
        /// errno.
        source: Errno,
    },
    /// A traced operation failed.
    #[error("restoring into process {pid}: {step}: {source}")]
    Trace {
        /// The new process.
        pid: i32,
        /// What we were doing.
        step: String,
        /// Cause.
        source: TraceError,
    },
    /// An injected system call returned an unexpected value.
    #[error("restoring into process {pid}: {step}: unexpected result {result:#x}")]
    Unexpected {
        /// The new process.
        pid: i32,
        /// What we were doing.
        step: String,
        /// What the call returned.
        result: u64,
    },
    /// A mapping could not be rebuilt.
    #[error("restoring mapping {start:#x}-{end:#x} {path} into process {pid}: {reason}")]
    Mapping {
        /// The new process.
        pid: i32,
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A mapped file differs from the one recorded in the image.
    #[error("mapped file {path} changed since the dump: {reason}")]
    FileChanged {
        /// Path.
        path: String,
        /// What differs.
        reason: String,
    },
    /// A file descriptor could not be restored.
    #[error("restoring fd {fd} ({path}) into process {pid}: {source}")]
    Fd {
        /// The new process.
        pid: i32,
        /// Descriptor.
        fd: i32,
        /// Path.
        path: String,
        /// Cause.
        source: TraceError,
    },
    /// The vDSO of this kernel differs from the image's.
    #[error("vDSO layout differs from the image: {reason}")]
    VdsoMismatch {
        /// Details.
        reason: String,
    },
    /// The image is inconsistent.
    #[error("image of process {pid} is inconsistent: {reason}")]
    BadImage {
        /// Pid in the image.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// No free address range for the scratch area.
    #[error("no free address range of {len:#x} bytes for the scratch area")]
    NoScratchSpace {
        /// Needed length.
        len: u64,
    },
    /// Reading /proc of the child failed.
    #[error("restoring into process {pid}: {source}")]
    Proc {
        /// The new process.
        pid: i32,
        /// Cause.
        source: DumpError,
    },
    /// A process-tree image is inconsistent.
    #[error("tree image rooted at {root} is inconsistent: {reason}")]
    BadTree {
        /// Root pid in the image.
        root: i32,
        /// Why.
        reason: String,
    },
    /// A pipe could not be recreated.
    #[error("recreating pipe:[{ino}]: {reason}")]
    Pipe {
        /// Pipe inode in the image.
        ino: u64,
        /// Why.
        reason: String,
    },
    /// A unix socket pair could not be recreated.
    #[error("recreating socket:[{ino}]: {reason}")]
    Socket {
        /// Inode in the image of the pair's first end.
        ino: u64,
        /// Why.
        reason: String,
    },
    /// A shared memory file could not be recreated.
    #[error("recreating the shared memory file (inode {ino}): {reason}")]
    Memfd {
        /// Inode in the image.
        ino: u64,
        /// Why.
        reason: String,
    },
    /// A stored chunk could not be fetched.
    #[error("fetching {len} bytes of pages from {addr:#x} on: {reason}")]
    Chunk {
        /// Address of the run.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: String,
    },
}

/// Size of the scratch area: one code page and data pages.
const SCRATCH_LEN: u64 = 16 * PAGE_SIZE;
/// Offset of the data part of the scratch area.
const DATA_OFF: u64 = PAGE_SIZE;
/// Highest address considered for scratch areas.
const SEARCH_TOP: u64 = 0x7ff0_0000_0000;
/// Lowest address considered for scratch areas.
const SEARCH_BOTTOM: u64 = 0x1_0000_0000;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NAME: u64 = 15;
const PR_SET_VMA: u64 = 0x53564d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;

/// Restore `image` into a new process with default options. Returns the new pid; the process
/// is running and is a child of the caller (the caller should eventually reap it).
pub fn restore(image: &ProcessImage) -> Result<i32, RestoreError> {
    restore_with(image, &RestoreOptions::default())
}

/// Restore `image` into a new process. See the module documentation for the steps.
pub fn restore_with(image: &ProcessImage, opts: &RestoreOptions) -> Result<i32, RestoreError> {
    if image.threads.is_empty() {
        return Err(RestoreError::BadImage {
            pid: image.pid,
            reason: "no threads".into(),
        });
    }
    check_image(image)?;
    if !opts.skip_file_checks {
        check_files(image, None, &[])?;
    }
    let pid = sys::spawn_stopped_child(opts.pid).map_err(|source| match (source, opts.pid) {
        (Errno::EEXIST, Some(pid)) => RestoreError::PidInUse { pid },
        _ => RestoreError::Spawn { source },
    })?;
    let tracer = match Tracer::adopt_stopped_child(pid) {
        Ok(t) => t,
        Err(source) => {
            sys::kill_and_reap(pid);
            return Err(RestoreError::Trace {
                pid,
                step: "adopting the child".into(),
                source,
            });
        }
    };
    let mut r = Restorer {
        pid,
        t: tracer,
        image,
        same_ids: opts.pid == Some(image.pid),
        chunks: opts.chunks,
        pipes: None,
        ids_done: false,
        scratch: 0,
        others: Vec::new(),
        terminal: opts.terminal,
        dirty: None,
        fill: None,
        uffd: None,
        lazy: None,
        lazy_used: false,
        peers: None,
        no_new_privs: false,
        caps: None,
        seccomp: None,
    };
    match r.run() {
        Ok(()) => match r.detach_all() {
            Ok(()) => Ok(pid),
            Err(e) => {
                sys::kill_and_reap(pid);
                Err(e)
            }
        },
        Err(e) => {
            sys::kill_and_reap(pid);
            r.forget();
            Err(e)
        }
    }
}

fn check_image(image: &ProcessImage) -> Result<(), RestoreError> {
    let bad = |reason: String| RestoreError::BadImage {
        pid: image.pid,
        reason,
    };
    if image.threads.is_empty() {
        return Err(bad("no threads".into()));
    }
    let mut last_end = 0;
    for m in &image.mappings {
        if m.start % PAGE_SIZE != 0 || m.end % PAGE_SIZE != 0 || m.end <= m.start {
            return Err(bad(format!(
                "mapping {:#x}-{:#x} is not page aligned",
                m.start, m.end
            )));
        }
        if m.start < last_end {
            return Err(bad(format!(
                "mapping {:#x}-{:#x} overlaps the previous one",
                m.start, m.end
            )));
        }
        last_end = m.end;
    }
    for run in &image.memory.runs {
        // A run may go on across adjacent mappings (zero runs are merged; a forked child's
        // heap grown after the fork is a second `[heap]` right after the first): every byte
        // of it must be in a restorable mapping.
        let mut at = run.addr;
        let end = run.addr.saturating_add(run.len);
        while at < end {
            match image
                .mappings
                .iter()
                .find(|m| !m.is_special() && m.start <= at && at < m.end)
            {
                Some(m) => at = m.end,
                None => break,
            }
        }
        if at < end {
            return Err(bad(format!(
                "page run {:#x}+{:#x} lies outside the restorable mappings",
                run.addr, run.len
            )));
        }
        if let PageData::Bytes(b) = &run.data {
            if b.len() as u64 != run.len {
                return Err(bad(format!(
                    "page run {:#x} has {} bytes, expected {}",
                    run.addr,
                    b.len(),
                    run.len
                )));
            }
        }
    }
    Ok(())
}

/// Checks that every mapped file is the one the dump saw. Under `snapshot_root` (the
/// mount, whose files the restore takes from the checkpoint's own snapshot) only the inode
/// is compared: the size and mtime the dump read there came from the kernel's attribute
/// cache, which with the writeback cache keeps its own times and may disagree with the
/// snapshot's (a file written through a shared mapping, such as SQLite's `-shm`). Under
/// `recreated` nothing is compared: those files were made anew from the checkpoint.
///
/// A file mapped shared and writable outside the mount (a JVM's `hsperfdata`) is the
/// program's to change: a checkpoint holding one was allowed to let it move forward
/// (`--allow-outside`), so only its inode is compared.
pub(crate) fn check_files(
    image: &ProcessImage,
    snapshot_root: Option<&Path>,
    recreated: &[std::path::PathBuf],
) -> Result<(), RestoreError> {
    check_mapped_files(image, snapshot_root, recreated, false)
}

/// What [`restore_tree`] checks before it starts anything, for a caller to check before it
/// changes anything: the image's consistency, and [`check_files`] for every live member,
/// skipping the files under `root` (the restore is about to take them from the
/// checkpoint's snapshot, so what is there now does not matter). A rollback checks this
/// before it stops the program that runs now.
pub fn precheck_tree(
    tree: &TreeImage,
    root: &Path,
    recreated: &[std::path::PathBuf],
) -> Result<(), RestoreError> {
    check_tree(
        tree,
        &TreeRestoreOptions {
            skip_file_checks: true,
            ..Default::default()
        },
    )?;
    for m in &tree.processes {
        if let MemberState::Live(img) = &m.state {
            check_mapped_files(img, Some(root), recreated, true)?;
        }
    }
    Ok(())
}

fn check_mapped_files(
    image: &ProcessImage,
    snapshot_root: Option<&Path>,
    recreated: &[std::path::PathBuf],
    skip_snapshot: bool,
) -> Result<(), RestoreError> {
    for m in &image.mappings {
        if m.kind != MappingKind::File {
            continue;
        }
        let (Some(path), Some(id)) = (&m.path, &m.file) else {
            continue;
        };
        if recreated.iter().any(|d| Path::new(path).starts_with(d)) {
            continue;
        }
        let in_snapshot = snapshot_root.is_some_and(|r| Path::new(path).starts_with(r));
        if in_snapshot && skip_snapshot {
            continue;
        }
        let st = std::fs::metadata(path).map_err(|e| RestoreError::FileChanged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let written = m.shared && m.prot & libc::PROT_WRITE as u32 != 0;
        if let Some(reason) = id.differs(&st, !in_snapshot && !written) {
            return Err(RestoreError::FileChanged {
                path: path.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// Find a free, page-aligned range of `len` bytes not overlapping any of `busy`.
fn find_free(busy: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut cand = SEARCH_TOP - len;
    loop {
        if cand < SEARCH_BOTTOM {
            return None;
        }
        match busy.iter().find(|(s, e)| *s < cand + len && cand < *e) {
            None => return Some(cand),
            Some((s, _)) => {
                // Move below the conflicting range, keeping a guard page.
                cand = s.checked_sub(len + PAGE_SIZE)? & !(PAGE_SIZE - 1);
            }
        }
    }
}

fn is_vdso_piece(path: &str) -> bool {
    matches!(path, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

struct Restorer<'a> {
    pid: i32,
    t: Tracer,
    image: &'a ProcessImage,
    /// Give the threads their image ids (the process got its image pid).
    same_ids: bool,
    /// Source for stored page runs.
    chunks: Option<&'a dyn ChunkSource>,
    /// Pipe ends inherited from the restorer (tree restore).
    pipes: Option<&'a PipeFds>,
    /// Session and process group were already set up (tree restore).
    ids_done: bool,
    scratch: u64,
    /// Tracers of the threads after the leader (image.threads[1..]).
    others: Vec<Tracer>,
    /// Directory of the descriptors terminal fds are reopened from.
    terminal: Option<&'a Path>,
    /// Dirty-page tracking to arm once the memory is the image's (tree restores).
    dirty: Option<&'a std::sync::Mutex<super::dirty::DirtyTracker>>,
    /// While the contents are written: the process's userfaultfd and the private anonymous
    /// ranges registered with it, filled with `UFFDIO_COPY`.
    fill: Option<Fill>,
    /// The userfaultfd used for the contents, kept for dirty-page tracking.
    uffd: Option<std::os::fd::OwnedFd>,
    /// Serves the stored pages of private anonymous memory after the process runs
    /// ([`super::lazy`]) instead of writing them first.
    lazy: Option<&'a super::lazy::LazyFill>,
    /// This process's pages are filled lazily (no dirty-page tracking from the restore on).
    lazy_used: bool,
    /// In a tree restore, the new pid of every member by its image pid (for
    /// [`FdKind::Dup`] of an earlier member's descriptor).
    peers: Option<&'a std::collections::BTreeMap<i32, i32>>,
    /// Set no_new_privs (before the other threads are made, which inherit it).
    no_new_privs: bool,
    /// Capability sets to set in every thread, where they differ from what the restore
    /// gives by itself (`TreeImage::caps`).
    caps: Option<CapSets>,
    /// Seccomp filters of the process's own, oldest first (`TreeImage::seccomp`): installed
    /// in the leader before its threads are made, which inherit them.
    seccomp: Option<&'a [SeccompFilter]>,
}

/// Private anonymous memory filled with `UFFDIO_COPY` rather than `process_vm_writev`: the
/// kernel allocates each page and copies into it in one step, where a write through
/// `process_vm_writev` faults the page in (zeroing it) first, one page at a time. For a
/// large image, zeroing fresh pages was a third of a restore's time.
struct Fill {
    uffd: std::os::fd::OwnedFd,
    ranges: Vec<(u64, u64)>,
    /// The ranges' stored pages are a [`super::lazy::LazyFill`]'s: they stay registered.
    lazy: bool,
}

impl Fill {
    /// Unregisters every range (a page left missing is an ordinary fault again) and gives
    /// the userfaultfd back.
    fn finish(self) -> Result<std::os::fd::OwnedFd, nix::errno::Errno> {
        let mut res = Ok(());
        for &(s, e) in &self.ranges {
            if let Err(err) = super::dirty::unregister(&self.uffd, s, e) {
                res = Err(err);
            }
        }
        res.map(|()| self.uffd)
    }
}

impl Restorer<'_> {
    /// Detach every thread (the others first), letting the process run.
    fn detach_all(self) -> Result<(), RestoreError> {
        let Restorer { t, others, pid, .. } = self;
        let mut res = Ok(());
        for o in others {
            let tid = o.tid();
            if let Err(source) = o.detach() {
                res = Err((tid, source));
            }
        }
        if let Err(source) = t.detach() {
            res = Err((pid, source));
        }
        res.map_err(|(tid, source)| RestoreError::Trace {
            pid,
            step: format!("detaching thread {tid}"),
            source,
        })
    }

    /// Drop the tracers without detaching (the process was killed).
    fn forget(self) {
        for o in self.others {
            o.forget();
        }
        self.t.forget();
    }

    fn trace(&self, step: impl Into<String>) -> impl FnOnce(TraceError) -> RestoreError {
        let pid = self.pid;
        let step = step.into();
        move |source| RestoreError::Trace { pid, step, source }
    }

    /// `prctl(option, args[0], args[1])` in the process; `name` names the option in errors.
    fn prctl(&mut self, name: &str, option: i32, args: [u64; 2]) -> Result<u64, RestoreError> {
        self.call(
            &format!("prctl({name}, {}, {})", args[0], args[1]),
            libc::SYS_prctl,
            [option as u64, args[0], args[1], 0, 0, 0],
        )
    }

    fn call(&mut self, step: &str, nr: i64, args: [u64; 6]) -> Result<u64, RestoreError> {
        let pid = self.pid;
        self.t
            .syscall(nr, args)
            .map_err(|source| RestoreError::Trace {
                pid,
                step: step.to_string(),
                source,
            })
    }

    /// Write a NUL-terminated string into the scratch data area at `off`.
    fn put_str(&mut self, off: u64, s: &str) -> Result<u64, RestoreError> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        if off + b.len() as u64 > SCRATCH_LEN - DATA_OFF {
            return Err(RestoreError::Unsupported {
                pid: self.image.pid,
                what: format!("string of {} bytes too long for the scratch area", b.len()),
            });
        }
        let addr = self.scratch + DATA_OFF + off;
        let e = self.trace("writing the scratch area");
        self.t.write_mem(addr, &b).map_err(e)?;
        Ok(addr)
    }

    fn put_bytes(&mut self, off: u64, b: &[u8]) -> Result<u64, RestoreError> {
        if off + b.len() as u64 > SCRATCH_LEN - DATA_OFF {
            return Err(RestoreError::Unsupported {
                pid: self.image.pid,
                what: format!("{} bytes too long for the scratch area", b.len()),
            });
        }
        let addr = self.scratch + DATA_OFF + off;
        let e = self.trace("writing the scratch area");
        self.t.write_mem(addr, b).map_err(e)?;
        Ok(addr)
    }

    fn child_maps(&self) -> Result<Vec<MapsLine>, RestoreError> {
        read_maps(self.pid).map_err(|source| RestoreError::Proc {
            pid: self.pid,
            source,
        })
    }

    fn run(&mut self) -> Result<(), RestoreError> {
        let image = self.image;
        // 2. Scratch area.
        let child = self.child_maps()?;
        let mut busy: Vec<(u64, u64)> = child.iter().map(|m| (m.start, m.end)).collect();
        busy.extend(image.mappings.iter().map(|m| (m.start, m.end)));
        let scratch = find_free(&busy, SCRATCH_LEN)
            .ok_or(RestoreError::NoScratchSpace { len: SCRATCH_LEN })?;
        busy.push((scratch, scratch + SCRATCH_LEN));
        let e = self.trace("finding a syscall instruction in the child");
        self.t.locate_syscall_insn().map_err(e)?;
        let got = self.call(
            "mapping the scratch area",
            libc::SYS_mmap,
            [
                scratch,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
        )?;
        if got != scratch {
            return Err(RestoreError::Unexpected {
                pid: self.pid,
                step: "mapping the scratch area".into(),
                result: got,
            });
        }
        self.scratch = scratch;
        let e = self.trace("writing the syscall trampoline");
        self.t.write_mem(scratch, &[0x0f, 0x05, 0xcc]).map_err(e)?;
        self.t.set_syscall_insn(scratch);

        // 3. Clean slate.
        let e = self.trace("reading the child's rseq registration");
        if let Some(rs) = self.t.rseq().map_err(e)? {
            if rs.pointer != 0 {
                self.call(
                    "unregistering the inherited rseq area",
                    libc::SYS_rseq,
                    [
                        rs.pointer,
                        rs.size as u64,
                        RSEQ_FLAG_UNREGISTER,
                        rs.signature as u64,
                        0,
                        0,
                    ],
                )?;
            }
        }
        self.rebuild_vdso_and_unmap(&child, &mut busy)?;

        // 4. + 5. Address space and contents.
        self.map_all()?;

        // 6. Process state. Every signal stays blocked until the final masks are set (the
        //    threads created below inherit this): a timer re-armed here, or a queued pending
        //    signal, must reach the program's handlers, not a stop of ours.
        let e = self.trace("blocking signals");
        self.t.set_sigmask(!0).map_err(e)?;
        self.restore_mm()?;
        self.restore_rlimits();
        self.restore_fds()?;
        self.restore_misc()?;
        self.create_threads()?;
        for i in 0..image.threads.len() {
            self.with_thread(i, |r| {
                r.restore_thread(i)?;
                r.restore_creds()?;
                r.queue_signals(i)
            })?;
        }
        self.restore_itimers()?;
        self.restore_posix_timers()?;
        for i in 1..image.threads.len() {
            self.with_thread(i, |r| r.finish_thread(i))?;
        }
        // Memory is the image's: from here on, a write (the program's, or the kernel's on
        // its behalf) is what the next checkpoint reads again.
        if let (Some(d), true) = (self.dirty, self.lazy_used) {
            // What the program writes before its pages are all in is not tracked.
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .drop_process(self.pid);
        } else if let Some(d) = self.dirty {
            let ranges = tracked_ranges(image);
            let pid = self.pid;
            let t = &mut self.t;
            let mut tracker = d.lock().unwrap_or_else(|p| p.into_inner());
            let kept = self.uffd.take();
            tracker.arm(pid, &ranges, &[], || match kept {
                Some(u) => Ok(u),
                None => super::dump::make_uffd(pid, t).and_then(super::dirty::init),
            });
            tracker.remember_one(pid, &image.memory);
        }

        // 7. Final registers. The mask last: queued signals stay blocked until no more
        //    syscalls are injected, so they reach the program's handlers, not our stops.
        let th = &image.threads[0];
        let e = self.trace("setting the xstate");
        self.t.set_xstate(&th.xstate).map_err(e)?;
        let e = self.trace("unmapping the scratch area");
        let r = self
            .t
            .syscall_keep_regs(libc::SYS_munmap, [scratch, SCRATCH_LEN, 0, 0, 0, 0])
            .map_err(e)?;
        if r != 0 {
            return Err(RestoreError::Unexpected {
                pid: self.pid,
                step: "unmapping the scratch area".into(),
                result: r as u64,
            });
        }
        let e = self.trace("setting the signal mask");
        self.t.set_sigmask(th.sigmask).map_err(e)?;
        let mut regs = th.regs.to_user();
        regs.orig_rax = u64::MAX;
        regs.fs_base = th.fs_base;
        regs.gs_base = th.gs_base;
        let e = self.trace("setting the registers");
        self.t.set_regs(&regs).map_err(e)?;
        self.t.clear_pending_signals();
        Ok(())
    }

    fn rebuild_vdso_and_unmap(
        &mut self,
        child: &[MapsLine],
        busy: &mut Vec<(u64, u64)>,
    ) -> Result<(), RestoreError> {
        let image = self.image;
        let ours: Vec<&MapsLine> = child.iter().filter(|m| is_vdso_piece(&m.path)).collect();
        let theirs: Vec<&Mapping> = image
            .mappings
            .iter()
            .filter(|m| matches!(m.kind, MappingKind::Vdso | MappingKind::Vvar))
            .collect();
        // Pair pieces by name and check sizes.
        let mut pairs = Vec::new();
        for m in &theirs {
            let name = m.path.clone().unwrap_or_default();
            let Some(o) = ours.iter().find(|o| o.path == name) else {
                return Err(RestoreError::VdsoMismatch {
                    reason: format!("this kernel has no {name} mapping"),
                });
            };
            if o.end - o.start != m.len() {
                return Err(RestoreError::VdsoMismatch {
                    reason: format!(
                        "{name} is {:#x} bytes here, {:#x} in the image",
                        o.end - o.start,
                        m.len()
                    ),
                });
            }
            pairs.push((o.start, m.start, m.len(), name));
        }
        if !theirs.is_empty() {
            for o in &ours {
                if !pairs.iter().any(|p| p.0 == o.start) {
                    return Err(RestoreError::VdsoMismatch {
                        reason: format!("the image has no {} mapping", o.path),
                    });
                }
            }
        }
        // Park our pieces (keeping their relative layout) in a range free everywhere.
        let mut parked = Vec::new();
        if !pairs.is_empty() {
            let lo = pairs.iter().map(|p| p.0).min().unwrap_or(0);
            let hi = pairs.iter().map(|p| p.0 + p.2).max().unwrap_or(0);
            let park =
                find_free(busy, hi - lo).ok_or(RestoreError::NoScratchSpace { len: hi - lo })?;
            busy.push((park, park + (hi - lo)));
            for (ours_at, theirs_at, len, name) in &pairs {
                let to = park + (ours_at - lo);
                self.mremap(*ours_at, *len, to, &format!("parking {name}"))?;
                parked.push((to, *theirs_at, *len, name.clone()));
            }
        }
        // Unmap everything else.
        let keep: Vec<(u64, u64)> = std::iter::once((self.scratch, self.scratch + SCRATCH_LEN))
            .chain(parked.iter().map(|p| (p.0, p.0 + p.2)))
            .collect();
        for m in self.child_maps()? {
            if m.path == "[vsyscall]" || m.start >= SEARCH_TOP.max(0x7fff_ffff_f000) {
                continue;
            }
            if keep.iter().any(|(s, e)| m.start >= *s && m.end <= *e) {
                continue;
            }
            self.call(
                &format!("unmapping {:#x}-{:#x} {}", m.start, m.end, m.path),
                libc::SYS_munmap,
                [m.start, m.end - m.start, 0, 0, 0, 0],
            )?;
        }
        // Move the vDSO pieces to their image addresses.
        for (from, to, len, name) in parked {
            self.mremap(
                from,
                len,
                to,
                &format!("moving {name} to its image address"),
            )?;
        }
        Ok(())
    }

    fn mremap(&mut self, from: u64, len: u64, to: u64, step: &str) -> Result<(), RestoreError> {
        let got = self.call(
            step,
            libc::SYS_mremap,
            [
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                to,
                0,
            ],
        )?;
        if got != to {
            return Err(RestoreError::Unexpected {
                pid: self.pid,
                step: step.to_string(),
                result: got,
            });
        }
        Ok(())
    }

    fn map_all(&mut self) -> Result<(), RestoreError> {
        let image = self.image;
        let runs = &image.memory.runs;
        let mut writable_later = Vec::new();
        for m in &image.mappings {
            if m.is_special() {
                continue;
            }
            let has_data = runs
                .iter()
                .any(|r| r.addr < m.end && m.start < r.addr + r.len);
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
            let need_write = has_data && m.prot & rw != rw;
            let prot = if has_data {
                m.prot | (libc::PROT_READ | libc::PROT_WRITE) as u32
            } else {
                m.prot
            };
            if need_write {
                writable_later.push(m);
            }
            let path = m.path.clone().unwrap_or_default();
            let pid = self.pid;
            let mapping_err = |reason: String| RestoreError::Mapping {
                pid,
                start: m.start,
                end: m.end,
                path: path.clone(),
                reason,
            };
            let share = if m.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let mut flags = (share | libc::MAP_FIXED) as u64;
            if m.growsdown {
                flags |= libc::MAP_GROWSDOWN as u64;
            }
            let got = match m.kind {
                MappingKind::File => {
                    let p = self.put_str(0, &path)?;
                    let acc = if m.shared && m.prot & (libc::PROT_WRITE as u32) != 0 {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let fd = self
                        .t
                        .syscall(
                            libc::SYS_openat,
                            [
                                libc::AT_FDCWD as u64,
                                p,
                                (acc | libc::O_CLOEXEC) as u64,
                                0,
                                0,
                                0,
                            ],
                        )
                        .map_err(|e| mapping_err(format!("opening the file: {e}")))?;
                    let r = self
                        .t
                        .syscall(
                            libc::SYS_mmap,
                            [m.start, m.len(), prot as u64, flags, fd, m.offset],
                        )
                        .map_err(|e| mapping_err(e.to_string()));
                    let c = self.call(
                        "closing a mapped file",
                        libc::SYS_close,
                        [fd, 0, 0, 0, 0, 0],
                    );
                    let r = r?;
                    c?;
                    r
                }
                MappingKind::SysvShm { id } => {
                    let mut fl = 0;
                    if m.prot & libc::PROT_WRITE as u32 == 0 {
                        fl |= libc::SHM_RDONLY;
                    }
                    if m.prot & libc::PROT_EXEC as u32 != 0 {
                        fl |= libc::SHM_EXEC;
                    }
                    // SHM_REMAP: the range may hold what the restorer's copy had there.
                    fl |= libc::SHM_REMAP;
                    self.t
                        .syscall(libc::SYS_shmat, [id as u64, m.start, fl as u64, 0, 0, 0])
                        .map_err(|e| mapping_err(format!("shmat of SysV segment {id}: {e}")))?
                }
                MappingKind::Memfd { ino } => {
                    let fd = self
                        .pipes
                        .and_then(|p| p.memfds.get(&ino).copied())
                        .ok_or_else(|| {
                            mapping_err(
                                "a shared memory file is restored with restore_tree only".into(),
                            )
                        })?;
                    self.t
                        .syscall(
                            libc::SYS_mmap,
                            [m.start, m.len(), prot as u64, flags, fd as u64, m.offset],
                        )
                        .map_err(|e| mapping_err(e.to_string()))?
                }
                _ => self
                    .t
                    .syscall(
                        libc::SYS_mmap,
                        [
                            m.start,
                            m.len(),
                            prot as u64,
                            flags | libc::MAP_ANONYMOUS as u64,
                            u64::MAX,
                            0,
                        ],
                    )
                    .map_err(|e| mapping_err(e.to_string()))?,
            };
            if got != m.start {
                return Err(mapping_err(format!("mmap returned {got:#x}")));
            }
            if let Some(name) = path
                .strip_prefix("[anon:")
                .and_then(|n| n.strip_suffix(']'))
                .filter(|_| !m.shared)
            {
                let p = self.put_str(0, name)?;
                if let Err(e) = self.t.syscall(
                    libc::SYS_prctl,
                    [PR_SET_VMA, PR_SET_VMA_ANON_NAME, m.start, m.len(), p, 0],
                ) {
                    log::warn!("process {}: naming {path}: {e}", self.pid);
                }
            }
        }
        // Contents. Stored runs go in batches: fetched (and verified) together on a reader
        // thread while the batch before is written, with one UFFDIO_COPY (private anonymous
        // memory) or process_vm_writev (the rest) per contiguous range. The batch buffers go
        // back to the reader, so that the same (already touched) memory carries them all.
        self.start_fill();
        let lazy_ranges: Vec<(u64, u64)> = match &self.fill {
            Some(f) if f.lazy => f.ranges.clone(),
            _ => Vec::new(),
        };
        // Stored runs written now (the others are the lazy fill's).
        let eager = |r: &super::image::PageRun| {
            matches!(r.data, PageData::Stored(_))
                && !lazy_ranges
                    .iter()
                    .any(|&(s, e)| s <= r.addr && r.addr + r.len <= e)
        };
        let zeros = vec![0u8; 1 << 20];
        let mut batches = Vec::new();
        let mut i = 0;
        while i < runs.len() {
            if !eager(&runs[i]) {
                i += 1;
                continue;
            }
            let (mut j, mut bytes) = (i, 0);
            while j < runs.len() && eager(&runs[j]) && bytes < FETCH_BATCH {
                bytes += runs[j].len;
                j += 1;
            }
            batches.push((i, j));
            i = j;
        }
        let src = match (batches.first(), self.chunks) {
            (None, _) => None,
            (Some(_), Some(src)) => Some(src),
            (Some(&(i, _)), None) => {
                return Err(RestoreError::Chunk {
                    addr: runs[i].addr,
                    len: runs[i].len,
                    reason: "the image references stored chunks but no chunk source was given"
                        .into(),
                })
            }
        };
        std::thread::scope(|sc| -> Result<(), RestoreError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, String>>(1);
            let (back, reuse) = std::sync::mpsc::channel::<Vec<u8>>();
            if let Some(src) = src {
                let batches = &batches;
                sc.spawn(move || {
                    for &(i, j) in batches {
                        let reqs: Vec<([u8; 32], u64)> = runs[i..j]
                            .iter()
                            .filter_map(|r| match &r.data {
                                PageData::Stored(h) => Some((*h, r.len)),
                                _ => None,
                            })
                            .collect();
                        let total: u64 = reqs.iter().map(|r| r.1).sum();
                        let mut buf = reuse.try_recv().unwrap_or_default();
                        buf.resize(total as usize, 0);
                        let res = src.fetch_into(&reqs, &mut buf).map(|()| buf);
                        let failed = res.is_err();
                        // The writer is gone (it failed) or this batch failed: stop.
                        if tx.send(res).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            let mut next = batches.iter();
            let mut i = 0;
            let (mut waited, mut wrote) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
            while i < runs.len() {
                if eager(&runs[i]) {
                    let Some(&(bi, bj)) = next.next().filter(|b| b.0 == i) else {
                        unreachable!("a batch starts at every stored run not in the one before");
                    };
                    // The batch's runs may lie far apart (across mappings): its bytes, not
                    // the span of its addresses.
                    let (addr, len) = (runs[bi].addr, runs[bi..bj].iter().map(|r| r.len).sum());
                    let t = std::time::Instant::now();
                    let buf = rx
                        .recv()
                        .map_err(|_| "the chunk reader stopped".to_string())
                        .and_then(|r| r)
                        .map_err(|reason| RestoreError::Chunk { addr, len, reason })?;
                    waited += t.elapsed();
                    let t = std::time::Instant::now();
                    self.write_batch(&runs[bi..bj], &buf)?;
                    wrote += t.elapsed();
                    let _ = back.send(buf);
                    i = bj;
                    continue;
                }
                let run = &runs[i];
                i += 1;
                if matches!(run.data, PageData::Stored(_)) {
                    continue; // served by the lazy fill
                }
                match &run.data {
                    PageData::Bytes(b) => self.write_contents(run.addr, b)?,
                    PageData::Zero => {
                        // Fresh anonymous memory is zero already; the file-backed part of
                        // the run (it may go on across mappings) is written.
                        let end = run.addr + run.len;
                        for m in image.mappings.iter().filter(|m| {
                            m.kind == MappingKind::File && m.start < end && run.addr < m.end
                        }) {
                            let (from, to) = (m.start.max(run.addr), m.end.min(end));
                            let mut at = from;
                            while at < to {
                                let n = (to - at).min(zeros.len() as u64);
                                let e = self.trace(format!("writing {n} zero bytes at {at:#x}"));
                                self.t.write_mem(at, &zeros[..n as usize]).map_err(e)?;
                                at += n;
                            }
                        }
                    }
                    PageData::Stored(_) => unreachable!("stored runs are written in batches"),
                    PageData::Base => {
                        return Err(RestoreError::Chunk {
                            addr: run.addr,
                            len: run.len,
                            reason: "a delta image's page left unresolved".into(),
                        })
                    }
                }
            }
            if !batches.is_empty() {
                log::debug!(
                    "process {}: {} batches of stored pages: {waited:?} waiting for chunks, {wrote:?} writing",
                    self.pid,
                    batches.len()
                );
            }
            Ok(())
        })?;
        self.stop_fill()?;
        // Final protections.
        for m in writable_later {
            self.call(
                &format!("mprotect {:#x}-{:#x}", m.start, m.end),
                libc::SYS_mprotect,
                [m.start, m.len(), m.prot as u64, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Writes a batch of stored runs into the child: `data` holds their bytes one after the
    /// other; each contiguous range of addresses goes in one write.
    fn write_batch(
        &mut self,
        runs: &[super::image::PageRun],
        data: &[u8],
    ) -> Result<(), RestoreError> {
        let mut k = 0;
        let mut at = 0usize;
        while k < runs.len() {
            let start = runs[k].addr;
            let mut end = start;
            let from = at;
            while k < runs.len() && runs[k].addr == end {
                end += runs[k].len;
                at += runs[k].len as usize;
                k += 1;
            }
            let piece = data.get(from..at).ok_or_else(|| RestoreError::Chunk {
                addr: start,
                len: end - start,
                reason: "chunk data shorter than its runs".into(),
            })?;
            self.write_contents(start, piece)?;
        }
        Ok(())
    }

    /// Registers the private anonymous mappings with a userfaultfd of the process, for [`Restorer::write_contents`]. Without one (no userfaultfd here) the
    /// contents go through `process_vm_writev`.
    fn start_fill(&mut self) {
        let image = self.image;
        let ranges: Vec<(u64, u64)> = image
            .mappings
            .iter()
            .filter(|m| {
                !m.shared
                    && matches!(
                        m.kind,
                        MappingKind::Anon | MappingKind::Heap | MappingKind::Stack
                    )
            })
            .map(|m| (m.start, m.end))
            .collect();
        if ranges.is_empty() || std::env::var_os("FORKPOINT_RESTORE_UFFD").is_some_and(|v| v == "0")
        {
            return;
        }
        let pid = self.pid;
        if let Some(lazy) = self.lazy {
            match self.start_lazy(lazy, &ranges) {
                Ok(()) => return,
                Err(e) => log::debug!("process {pid}: pages written now, not lazily: {e}"),
            }
        }
        let uffd = match super::dump::make_uffd(pid, &mut self.t).and_then(super::dirty::init) {
            Ok(u) => u,
            Err(e) => {
                log::debug!("process {pid}: contents without userfaultfd: {e}");
                return;
            }
        };
        let mut fill = Fill {
            uffd,
            ranges: Vec::new(),
            lazy: false,
        };
        for (s, e) in ranges {
            match super::dirty::register_missing(&fill.uffd, s, e) {
                Ok(()) => fill.ranges.push((s, e)),
                Err(err) => log::debug!("process {pid}: {s:#x}-{e:#x} not registered: {err}"),
            }
        }
        self.fill = Some(fill);
    }

    /// [`Restorer::start_fill`] for a lazy restore: a userfaultfd with the events
    /// [`super::lazy`] follows, every range registered (or none), and the stored pages of
    /// those ranges handed to `lazy`, which serves the faults from here on.
    fn start_lazy(
        &mut self,
        lazy: &super::lazy::LazyFill,
        ranges: &[(u64, u64)],
    ) -> Result<(), String> {
        let uffd = super::dump::make_uffd_with(self.pid, &mut self.t, super::lazy::FLAGS)?;
        // Without asynchronous write-protection (an older kernel), pages go in unprotected
        // and the process is not tracked after the fill. The handshake is once per
        // descriptor: a second one for the fallback.
        let (uffd, wp) = match super::dirty::api_with(&uffd, super::lazy::FEATURES) {
            Ok(()) => (uffd, true),
            Err(e) => {
                log::debug!(
                    "process {}: lazy restore without write-protection: {e}",
                    self.pid
                );
                drop(uffd);
                let u = super::dump::make_uffd_with(self.pid, &mut self.t, super::lazy::FLAGS)?;
                super::dirty::api_with(&u, super::lazy::FEATURES_NO_WP)?;
                (u, false)
            }
        };
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let r = if wp {
                super::dirty::register_missing_wp(&uffd, s, e)
            } else {
                super::dirty::register_missing(&uffd, s, e)
            };
            if let Err(err) = r {
                for &(s, e) in &ranges[..i] {
                    let _ = super::dirty::unregister(&uffd, s, e);
                }
                return Err(format!("registering {s:#x}-{e:#x}: {err}"));
            }
        }
        let runs: Vec<super::lazy::LazyRun> = self
            .image
            .memory
            .runs
            .iter()
            .filter_map(|r| match &r.data {
                PageData::Stored(h)
                    if ranges
                        .iter()
                        .any(|&(s, e)| s <= r.addr && r.addr + r.len <= e) =>
                {
                    Some(super::lazy::LazyRun {
                        addr: r.addr,
                        len: r.len,
                        hash: *h,
                    })
                }
                _ => None,
            })
            .collect();
        let ours = uffd.try_clone().map_err(|e| format!("dup: {e}"))?;
        lazy.add(
            super::lazy::Handed {
                pid: self.pid,
                image_pid: self.image.pid,
                ranges: ranges.to_vec(),
                wp,
            },
            ours,
            runs,
        );
        self.fill = Some(Fill {
            uffd,
            ranges: ranges.to_vec(),
            lazy: true,
        });
        self.lazy_used = true;
        Ok(())
    }

    /// Ends [`Restorer::start_fill`]: every range unregistered, the userfaultfd kept for
    /// dirty-page tracking.
    fn stop_fill(&mut self) -> Result<(), RestoreError> {
        let Some(fill) = self.fill.take() else {
            return Ok(());
        };
        if fill.lazy {
            // The ranges stay registered, served by the lazy fill: a write from here on
            // faults its page in through it.
            return Ok(());
        }
        let (start, end) = (fill.ranges.first(), fill.ranges.last());
        let (start, end) = (start.map_or(0, |r| r.0), end.map_or(0, |r| r.1));
        match fill.finish() {
            Ok(u) => {
                self.uffd = Some(u);
                Ok(())
            }
            // A range left registered would stop the program at its first touch of a page
            // the image did not have.
            Err(e) => Err(RestoreError::Mapping {
                pid: self.pid,
                start,
                end,
                path: String::new(),
                reason: format!("unregistering from userfaultfd: {e}"),
            }),
        }
    }

    /// Writes `data` at `addr` in the process: the parts in registered ranges with
    /// `UFFDIO_COPY`, the rest (and everything once a copy failed) with `process_vm_writev`.
    fn write_contents(&mut self, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
        let end = addr + data.len() as u64;
        if addr % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
            self.stop_fill()?; // not whole pages: the plain path for everything from here
        }
        let mut at = addr;
        while at < end {
            if let Some(f) = &self.fill {
                if let Some(&(_, e)) = f.ranges.iter().find(|&&(s, e)| s <= at && at < e) {
                    let upto = e.min(end);
                    let part = &data[(at - addr) as usize..(upto - addr) as usize];
                    match super::dirty::fill(&f.uffd, at, part) {
                        Ok(()) => {
                            at = upto;
                            continue;
                        }
                        Err(e) => {
                            log::debug!(
                                "process {}: UFFDIO_COPY of {} bytes at {at:#x}: {e}",
                                self.pid,
                                part.len()
                            );
                            // The plain path is right once every range is unregistered: a
                            // write to a missing page faults it in.
                            self.stop_fill()?;
                        }
                    }
                }
            }
            // Up to the next registered range, or the end.
            let upto = self
                .fill
                .as_ref()
                .and_then(|f| f.ranges.iter().map(|r| r.0).filter(|&s| s > at).min())
                .map_or(end, |s| s.min(end));
            let part = &data[(at - addr) as usize..(upto - addr) as usize];
            let e = self.trace(format!("writing {} bytes at {at:#x}", part.len()));
            self.t.write_mem(at, part).map_err(e)?;
            at = upto;
        }
        Ok(())
    }

    fn restore_mm(&mut self) -> Result<(), RestoreError> {
        let mm = &self.image.mm;
        if mm.start_code == 0 || mm.end_code == 0 {
            log::warn!("image has no mm layout; brk and /proc/PID/cmdline stay unset");
            return Ok(());
        }
        let exe_fd = match &self.image.exe {
            Some(exe) if !exe.ends_with(" (deleted)") => {
                let p = self.put_str(1024, exe)?;
                self.t
                    .syscall(
                        libc::SYS_openat,
                        [libc::AT_FDCWD as u64, p, libc::O_RDONLY as u64, 0, 0, 0],
                    )
                    .ok()
            }
            _ => None,
        };
        let auxv_bytes: Vec<u8> = mm.auxv.iter().flat_map(|v| v.to_le_bytes()).collect();
        let auxv_addr = self.put_bytes(2048, &auxv_bytes)?;
        let mut attempts = vec![(true, true), (false, true), (false, false)];
        if exe_fd.is_none() {
            attempts.retain(|a| !a.1);
            attempts.push((true, false));
            attempts.push((false, false));
        }
        let mut last = None;
        for (with_auxv, with_exe) in attempts {
            let mut s = Vec::with_capacity(104);
            for v in [
                mm.start_code,
                mm.end_code,
                mm.start_data,
                mm.end_data,
                mm.start_brk,
                mm.brk.max(mm.start_brk),
                mm.start_stack,
                mm.arg_start,
                mm.arg_end,
                mm.env_start,
                mm.env_end,
                if with_auxv { auxv_addr } else { 0 },
            ] {
                s.extend_from_slice(&v.to_le_bytes());
            }
            let auxv_size = if with_auxv {
                auxv_bytes.len() as u32
            } else {
                0
            };
            s.extend_from_slice(&auxv_size.to_le_bytes());
            let fd = match (with_exe, exe_fd) {
                (true, Some(fd)) => fd as u32,
                _ => u32::MAX,
            };
            s.extend_from_slice(&fd.to_le_bytes());
            let addr = self.put_bytes(0, &s)?;
            match self.t.syscall(
                libc::SYS_prctl,
                [libc::PR_SET_MM as u64, PR_SET_MM_MAP, addr, 104, 0, 0],
            ) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e @ TraceError::Injected { .. }) => {
                    log::debug!("PR_SET_MM_MAP (auxv {with_auxv}, exe {with_exe}): {e}");
                    last = Some(e);
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if let Some(fd) = exe_fd {
            self.call("closing the exe fd", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        if let Some(source) = last {
            return Err(RestoreError::Trace {
                pid: self.pid,
                step: "prctl(PR_SET_MM_MAP)".into(),
                source,
            });
        }
        Ok(())
    }

    /// Resource limits, set from outside with `prlimit64` (after the mappings exist, so that
    /// `RLIMIT_AS`/`RLIMIT_DATA` cannot get in the way, before fds because of `RLIMIT_NOFILE`).
    fn restore_rlimits(&mut self) {
        for rl in &self.image.rlimits {
            if let Err(e) = sys::set_rlimit(self.pid, rl.resource, rl.cur, rl.max) {
                log::warn!(
                    "process {}: cannot restore rlimit {} to {}/{}: {e}",
                    self.pid,
                    rl.resource,
                    rl.cur,
                    rl.max
                );
            }
        }
    }

    fn restore_fds(&mut self) -> Result<(), RestoreError> {
        // In a tree restore the pipe ends inherited from the restorer sit at `base` and above,
        // above every descriptor of the image; they are closed at the end.
        let keep_from = self.pipes.map_or(u32::MAX as u64, |p| p.base as u64);
        if keep_from > 0 {
            self.call(
                "closing inherited fds",
                libc::SYS_close_range,
                [0, keep_from - 1, 0, 0, 0, 0],
            )?;
        }
        for f in &self.image.fds {
            let pid = self.pid;
            let fd_err = |source| RestoreError::Fd {
                pid,
                fd: f.fd,
                path: f.path.clone(),
                source,
            };
            let from_restorer = |what: String, fd: Option<i32>| {
                fd.ok_or_else(|| RestoreError::Unsupported {
                    pid: self.image.pid,
                    what: format!(
                        "fd {} is {what}: pipes and socket pairs are restored with restore_tree only",
                        f.fd
                    ),
                })
            };
            let inherited = match f.kind {
                FdKind::Pipe { ino } => Some(from_restorer(
                    format!("a pipe (pipe:[{ino}])"),
                    self.pipes.and_then(|p| p.fds.get(&ino)).map(|&(r, w)| {
                        if f.flags & libc::O_ACCMODE == libc::O_WRONLY {
                            w
                        } else {
                            r
                        }
                    }),
                )?),
                FdKind::UnixSocket { ino } => Some(from_restorer(
                    format!("a unix socket (socket:[{ino}])"),
                    self.pipes.and_then(|p| p.sockets.get(&ino).copied()),
                )?),
                FdKind::Bound { ino } => Some(from_restorer(
                    format!("a listening TCP socket (socket:[{ino}])"),
                    self.pipes.and_then(|p| p.sockets.get(&ino).copied()),
                )?),
                _ => None,
            };
            if let Some(src) = inherited {
                let fl = if f.flags & libc::O_CLOEXEC != 0 {
                    libc::O_CLOEXEC as u64
                } else {
                    0
                };
                self.t
                    .syscall(libc::SYS_dup3, [src as u64, f.fd as u64, fl, 0, 0, 0])
                    .map_err(fd_err)?;
                let status = f.flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_APPEND);
                self.t
                    .syscall(
                        libc::SYS_fcntl,
                        [f.fd as u64, libc::F_SETFL as u64, status as u64, 0, 0, 0],
                    )
                    .map_err(fd_err)?;
                if matches!(f.kind, FdKind::Memfd { .. }) {
                    self.t
                        .syscall(
                            libc::SYS_lseek,
                            [f.fd as u64, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
                        )
                        .map_err(fd_err)?;
                }
                continue;
            }
            if let FdKind::EventFd { count, semaphore } = f.kind {
                self.restore_eventfd(f, count, semaphore).map_err(fd_err)?;
                continue;
            }
            if let FdKind::Inotify { watches } = &f.kind {
                self.restore_inotify(f, watches)?;
                continue;
            }
            if matches!(f.kind, FdKind::TimerFd { .. } | FdKind::SignalFd { .. }) {
                self.restore_anon(f).map_err(fd_err)?;
                continue;
            }
            if matches!(f.kind, FdKind::Epoll { .. } | FdKind::Dup { .. }) {
                // After every descriptor it watches, or the one it is the same file as
                // (below).
                continue;
            }
            let tty = f.kind == FdKind::Tty;
            let path = if tty {
                // Input from the restoring side's fd 0, output to its 1 (or 2 for fd 2).
                let src = match f.fd {
                    0..=2 => f.fd,
                    _ if f.flags & libc::O_ACCMODE == libc::O_RDONLY => 0,
                    _ => 1,
                };
                let dir = self.terminal.map_or_else(
                    || format!("/proc/{}/fd", std::process::id()),
                    |d| d.display().to_string(),
                );
                format!("{dir}/{src}")
            } else if let FdKind::Memfd { ino } = f.kind {
                // A file in shared memory is opened again through the one the restorer made
                // (a new open file, with this descriptor's own position and flags; the
                // descriptors that shared one are Dups of it).
                let src = from_restorer(
                    format!("a memfd (inode {ino})"),
                    self.pipes.and_then(|p| p.memfds.get(&ino).copied()),
                )?;
                format!("/proc/self/fd/{src}")
            } else {
                f.path.clone()
            };
            let p = self.put_str(0, &path)?;
            let cloexec = f.flags & libc::O_CLOEXEC != 0;
            // (O_TMPFILE stays in a tmpfile()'s flags; it is how the file was made, not how
            // it is opened again.)
            let mut oflags =
                f.flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);
            if matches!(f.kind, FdKind::Memfd { .. }) {
                oflags &= !libc::O_TMPFILE;
            }
            if tty {
                // Never a new controlling terminal; and where the restoring side's output is a
                // file (a detached session's log), append rather than overwrite it.
                oflags |= libc::O_NOCTTY | libc::O_APPEND;
            }
            let newfd = self
                .t
                .syscall(
                    libc::SYS_openat,
                    [libc::AT_FDCWD as u64, p, oflags as u64, 0, 0, 0],
                )
                .map_err(fd_err)?;
            if newfd != f.fd as u64 {
                let fl = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                self.t
                    .syscall(libc::SYS_dup3, [newfd, f.fd as u64, fl, 0, 0, 0])
                    .map_err(fd_err)?;
                self.t
                    .syscall(libc::SYS_close, [newfd, 0, 0, 0, 0, 0])
                    .map_err(fd_err)?;
            } else if cloexec {
                self.t
                    .syscall(
                        libc::SYS_fcntl,
                        [
                            newfd,
                            libc::F_SETFD as u64,
                            libc::FD_CLOEXEC as u64,
                            0,
                            0,
                            0,
                        ],
                    )
                    .map_err(fd_err)?;
            }
            if f.pos != 0 && f.kind != FdKind::CharDevice && !tty {
                self.t
                    .syscall(
                        libc::SYS_lseek,
                        [f.fd as u64, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
                    )
                    .map_err(fd_err)?;
            }
        }
        // Descriptors of files restored above, then epoll instances (which may watch them),
        // then descriptors of those.
        let image = self.image;
        let of_epoll = |f: &super::image::FdState| match f.kind {
            FdKind::Dup { pid, fd } if pid == image.pid => image
                .fds
                .iter()
                .any(|o| o.fd == fd && matches!(o.kind, FdKind::Epoll { .. })),
            _ => false,
        };
        let (late, early): (Vec<&super::image::FdState>, Vec<_>) =
            image.fds.iter().partition(|f| of_epoll(f));
        for f in early {
            if let FdKind::Dup { pid, fd } = f.kind {
                self.restore_dup(f, pid, fd)?;
            }
        }
        for f in &image.fds {
            let FdKind::Epoll { watches } = &f.kind else {
                continue;
            };
            let pid = self.pid;
            let fd_err = |source| RestoreError::Fd {
                pid,
                fd: f.fd,
                path: f.path.clone(),
                source,
            };
            self.restore_epoll(f, watches).map_err(fd_err)?;
        }
        for f in late {
            if let FdKind::Dup { pid, fd } = f.kind {
                self.restore_dup(f, pid, fd)?;
            }
        }
        self.restore_locks()?;
        if let Some(p) = self.pipes {
            self.call(
                "closing the inherited pipe ends",
                libc::SYS_close_range,
                [p.base as u64, u32::MAX as u64, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Takes the process's file locks again, through the same descriptors, without waiting:
    /// a lock someone else holds now fails the restore (the program would otherwise believe
    /// it holds a lock it does not).
    fn restore_locks(&mut self) -> Result<(), RestoreError> {
        use super::image::LockKind;
        let pid = self.pid;
        let locks = self.image.locks.clone();
        for l in &locks {
            let path = self
                .image
                .fds
                .iter()
                .find(|f| f.fd == l.fd)
                .map(|f| f.path.clone())
                .unwrap_or_default();
            let image_pid = self.image.pid;
            let fd_err = |source| match source {
                TraceError::Injected {
                    errno: nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES,
                    ..
                } => RestoreError::Unsupported {
                    pid: image_pid,
                    what: format!(
                        "its {} on fd {} ({path}) is held by another process now",
                        match l.kind {
                            LockKind::Flock => "flock",
                            LockKind::Posix => "POSIX record lock",
                            LockKind::Ofd => "OFD lock",
                        },
                        l.fd
                    ),
                },
                source => RestoreError::Fd {
                    pid,
                    fd: l.fd,
                    path: path.clone(),
                    source,
                },
            };
            match l.kind {
                LockKind::Flock => {
                    let op = if l.write {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    } | libc::LOCK_NB;
                    self.t
                        .syscall(libc::SYS_flock, [l.fd as u64, op as u64, 0, 0, 0, 0])
                        .map_err(fd_err)?;
                }
                LockKind::Posix | LockKind::Ofd => {
                    // struct flock on x86_64: l_type i16, l_whence i16, (pad 4), l_start i64,
                    // l_len i64 (0: to the end), l_pid i32, (pad 4).
                    let mut fl = [0u8; 32];
                    let ty = if l.write {
                        libc::F_WRLCK
                    } else {
                        libc::F_RDLCK
                    } as i16;
                    fl[0..2].copy_from_slice(&ty.to_ne_bytes());
                    fl[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
                    fl[8..16].copy_from_slice(&(l.start as i64).to_ne_bytes());
                    let len = l.end.map_or(0, |e| e.saturating_sub(l.start) + 1);
                    fl[16..24].copy_from_slice(&(len as i64).to_ne_bytes());
                    let addr = self.put_bytes(0, &fl)?;
                    let cmd = if l.kind == LockKind::Ofd {
                        libc::F_OFD_SETLK
                    } else {
                        libc::F_SETLK
                    };
                    self.t
                        .syscall(libc::SYS_fcntl, [l.fd as u64, cmd as u64, addr, 0, 0, 0])
                        .map_err(fd_err)?;
                }
            }
        }
        Ok(())
    }

    /// Moves a freshly made descriptor to the image's number, with the image's close-on-exec.
    fn place_fd(&mut self, newfd: u64, f: &super::image::FdState) -> Result<(), TraceError> {
        if newfd != f.fd as u64 {
            let cl = (f.flags & libc::O_CLOEXEC) as u64;
            self.t
                .syscall(libc::SYS_dup3, [newfd, f.fd as u64, cl, 0, 0, 0])?;
            self.t.syscall(libc::SYS_close, [newfd, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Descriptor `f` as the same open file as descriptor `src_fd` of member `src_pid`
    /// ([`FdKind::Dup`]): a `dup3` in this process, or, from an earlier member (restored, still
    /// held), taken from it with `pidfd_getfd` by this process (still root here: credentials
    /// come after the descriptors).
    fn restore_dup(
        &mut self,
        f: &super::image::FdState,
        src_pid: i32,
        src_fd: i32,
    ) -> Result<(), RestoreError> {
        let pid = self.pid;
        let fd_err = |source| RestoreError::Fd {
            pid,
            fd: f.fd,
            path: f.path.clone(),
            source,
        };
        let cl = (f.flags & libc::O_CLOEXEC) as u64;
        if src_pid == self.image.pid {
            if src_fd != f.fd {
                self.t
                    .syscall(libc::SYS_dup3, [src_fd as u64, f.fd as u64, cl, 0, 0, 0])
                    .map_err(fd_err)?;
            }
            return Ok(());
        }
        let from = self
            .peers
            .and_then(|m| m.get(&src_pid).copied())
            .ok_or_else(|| RestoreError::Unsupported {
                pid: self.image.pid,
                what: format!(
                    "fd {} is fd {src_fd} of process {src_pid}, which is not restored before it",
                    f.fd
                ),
            })?;
        let pfd = self
            .t
            .syscall(libc::SYS_pidfd_open, [from as u64, 0, 0, 0, 0, 0])
            .map_err(fd_err)?;
        let got = self
            .t
            .syscall(libc::SYS_pidfd_getfd, [pfd, src_fd as u64, 0, 0, 0, 0])
            .map_err(fd_err);
        let _ = self.t.syscall(libc::SYS_close, [pfd, 0, 0, 0, 0, 0]);
        let got = got?;
        if got != f.fd as u64 {
            self.t
                .syscall(libc::SYS_dup3, [got, f.fd as u64, cl, 0, 0, 0])
                .map_err(fd_err)?;
            self.t
                .syscall(libc::SYS_close, [got, 0, 0, 0, 0, 0])
                .map_err(fd_err)?;
        } else if cl == 0 {
            // pidfd_getfd sets close-on-exec.
            self.t
                .syscall(libc::SYS_fcntl, [got, libc::F_SETFD as u64, 0, 0, 0, 0])
                .map_err(fd_err)?;
        }
        Ok(())
    }

    /// A new epoll instance at the old descriptor number, watching what the old one watched.
    fn restore_epoll(
        &mut self,
        f: &super::image::FdState,
        watches: &[super::image::EpollWatch],
    ) -> Result<(), TraceError> {
        let fl = (f.flags & libc::O_CLOEXEC) as u64;
        let ep = self
            .t
            .syscall(libc::SYS_epoll_create1, [fl, 0, 0, 0, 0, 0])?;
        let data = self.scratch + DATA_OFF;
        for w in watches {
            // struct epoll_event is packed on x86_64: u32 events, u64 data.
            let mut ev = [0u8; 12];
            ev[0..4].copy_from_slice(&w.events.to_le_bytes());
            ev[4..12].copy_from_slice(&w.data.to_le_bytes());
            self.t.write_mem(data, &ev)?;
            self.t.syscall(
                libc::SYS_epoll_ctl,
                [ep, libc::EPOLL_CTL_ADD as u64, w.fd as u64, data, 0, 0],
            )?;
        }
        self.place_fd(ep, f)
    }

    /// A new timerfd or signalfd like the old one, at the old descriptor number.
    fn restore_anon(&mut self, f: &super::image::FdState) -> Result<(), TraceError> {
        const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
        let fl = (f.flags & (libc::O_CLOEXEC | libc::O_NONBLOCK)) as u64;
        let data = self.scratch + DATA_OFF;
        let newfd = match f.kind {
            FdKind::SignalFd { mask } => {
                self.t.write_mem(data, &mask.to_le_bytes())?;
                self.t
                    .syscall(libc::SYS_signalfd4, [u64::MAX, data, 8, fl, 0, 0])?
            }
            FdKind::TimerFd {
                clock,
                ticks,
                value,
                interval,
            } => {
                let tfd = self
                    .t
                    .syscall(libc::SYS_timerfd_create, [clock as u64, fl, 0, 0, 0, 0])?;
                // Relative to now: the time namespace keeps the monotonic clocks continuous.
                // A periodic timer that expired is not re-armed by the kernel until it is read
                // (fdinfo then shows no time left and one tick): it goes on one period later.
                let value = if value == (0, 0) { interval } else { value };
                let b = le_words(&[interval.0, interval.1, value.0, value.1]);
                self.t.write_mem(data, &b)?;
                if value != (0, 0) {
                    self.t
                        .syscall(libc::SYS_timerfd_settime, [tfd, 0, data, 0, 0, 0])?;
                }
                if ticks > 0 {
                    self.t.write_mem(data, &ticks.to_le_bytes())?;
                    self.t
                        .syscall(libc::SYS_ioctl, [tfd, TFD_IOC_SET_TICKS, data, 0, 0, 0])?;
                }
                tfd
            }
            _ => unreachable!("restore_anon is called for timerfds and signalfds"),
        };
        self.place_fd(newfd, f)
    }

    /// A new eventfd with the old counter, at the old descriptor number.
    fn restore_eventfd(
        &mut self,
        f: &super::image::FdState,
        count: u64,
        semaphore: bool,
    ) -> Result<(), TraceError> {
        const EFD_SEMAPHORE: i32 = 1;
        let mut fl = f.flags & (libc::O_CLOEXEC | libc::O_NONBLOCK);
        if semaphore {
            fl |= EFD_SEMAPHORE;
        }
        let efd = self
            .t
            .syscall(libc::SYS_eventfd2, [0, fl as u64, 0, 0, 0, 0])?;
        if count > 0 {
            let addr = self.scratch + DATA_OFF;
            self.t.write_mem(addr, &count.to_le_bytes())?;
            self.t.syscall(libc::SYS_write, [efd, addr, 8, 0, 0, 0])?;
        }
        self.place_fd(efd, f)
    }

    /// A new inotify instance at the old descriptor number with every watch, each at its
    /// old watch descriptor. The kernel hands out watch descriptors in increasing order
    /// (cyclically, from 1), so a gap left by a removed watch is made by adding and removing
    /// a watch on a file no one watches (the process's own `/proc/self/stat`); the
    /// `IN_IGNORED` events those removals queue are read off again.
    fn restore_inotify(
        &mut self,
        f: &super::image::FdState,
        watches: &[super::image::InotifyWatch],
    ) -> Result<(), RestoreError> {
        let pid = self.image.pid;
        let fd_err = |source| RestoreError::Fd {
            pid,
            fd: f.fd,
            path: f.path.clone(),
            source,
        };
        let fl = (f.flags & (libc::O_CLOEXEC | libc::O_NONBLOCK)) as u64;
        let ifd = self
            .t
            .syscall(libc::SYS_inotify_init1, [fl, 0, 0, 0, 0, 0])
            .map_err(fd_err)?;
        // IN_MASK_ADD and IN_MASK_CREATE are arguments, not state.
        const ARG_ONLY: u32 = 0x2000_0000 | 0x1000_0000;
        let mut next = 1i64;
        let mut ignored: Vec<i32> = Vec::new();
        for w in watches {
            let wrong = |got: i64| RestoreError::Unsupported {
                pid,
                what: format!(
                    "fd {}: inotify watch {} on {} came back as watch {got}",
                    f.fd, w.wd, w.path
                ),
            };
            while next < w.wd as i64 {
                let p = self.put_str(0, "/proc/self/stat")?;
                let d = self
                    .t
                    .syscall(
                        libc::SYS_inotify_add_watch,
                        [ifd, p, libc::IN_ATTRIB as u64, 0, 0, 0],
                    )
                    .map_err(fd_err)? as i64;
                if d < next {
                    return Err(wrong(d));
                }
                self.t
                    .syscall(libc::SYS_inotify_rm_watch, [ifd, d as u64, 0, 0, 0, 0])
                    .map_err(fd_err)?;
                ignored.push(d as i32);
                next = d + 1;
            }
            let p = self.put_str(0, &w.path)?;
            let got = self
                .t
                .syscall(
                    libc::SYS_inotify_add_watch,
                    [ifd, p, (w.mask & !ARG_ONLY) as u64, 0, 0, 0],
                )
                .map_err(fd_err)? as i64;
            if got != w.wd as i64 {
                return Err(wrong(got));
            }
            next = got + 1;
        }
        // Each removal queued an IN_IGNORED event for its watch. Everything queued is read
        // (whole events, never more than FIONREAD says: no blocking read) and checked: only
        // those events may be there, since an event for a real watch cannot be put back.
        let mut left: Vec<i32> = ignored;
        while !left.is_empty() {
            let at = self.scratch + DATA_OFF;
            self.t
                .syscall(libc::SYS_ioctl, [ifd, libc::FIONREAD, at, 0, 0, 0])
                .map_err(fd_err)?;
            let mut q = [0u8; 4];
            self.t.read_mem(at, &mut q).map_err(fd_err)?;
            let n = (u32::from_ne_bytes(q) as u64).min(4096);
            if n == 0 {
                break;
            }
            let got = self
                .t
                .syscall(libc::SYS_read, [ifd, at, n, 0, 0, 0])
                .map_err(fd_err)? as usize;
            let mut events = vec![0u8; got];
            self.t.read_mem(at, &mut events).map_err(fd_err)?;
            let mut off = 0;
            while off + 16 <= events.len() {
                let word = |i: usize| {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&events[off + i..off + i + 4]);
                    u32::from_ne_bytes(b)
                };
                let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
                match left.iter().position(|&d| d == wd) {
                    Some(i) if mask & libc::IN_IGNORED != 0 => {
                        left.swap_remove(i);
                    }
                    _ => {
                        return Err(RestoreError::Unsupported {
                            pid,
                            what: format!(
                                "fd {}: an inotify event (mask {mask:#x}) for watch {wd} came \
                                 while the watches were made again; restore again",
                                f.fd
                            ),
                        })
                    }
                }
                off += 16 + len;
            }
        }
        self.place_fd(ifd, f).map_err(fd_err)
    }

    fn restore_misc(&mut self) -> Result<(), RestoreError> {
        let image = self.image;
        if self.no_new_privs {
            self.call(
                "prctl(PR_SET_NO_NEW_PRIVS)",
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
            )?;
        }
        if let Some(filters) = self.seccomp {
            // Suspended while we hold the process (the system calls still to be injected
            // must not meet them; detaching ends it), and installed while it still has
            // CAP_SYS_ADMIN (the program's own may not allow it without no_new_privs).
            let opts = super::tracer::RESTORE_OPTIONS | super::tracer::PTRACE_O_SUSPEND_SECCOMP;
            let e = self.trace("suspending seccomp while restoring");
            self.t.set_options(opts).map_err(e)?;
            for (i, f) in filters.iter().enumerate() {
                // struct sock_fprog { unsigned short len; struct sock_filter *filter; }
                let prog = self.put_bytes(16, &f.prog)?;
                let mut fprog = Vec::with_capacity(16);
                fprog.extend_from_slice(&((f.prog.len() / 8) as u64).to_le_bytes());
                fprog.extend_from_slice(&prog.to_le_bytes());
                let at = self.put_bytes(0, &fprog)?;
                self.call(
                    &format!("seccomp(SECCOMP_SET_MODE_FILTER) for filter {i}"),
                    libc::SYS_seccomp,
                    [1, f.flags, at, 0, 0, 0],
                )?;
            }
        }
        // A working directory that was deleted: one is made where it was (or in the nearest
        // directory above that still exists), entered, and deleted again, so the program
        // is back in a deleted directory with no name.
        // (A directory whose name really ends so is taken as it is.)
        let deleted = image
            .cwd
            .strip_suffix(" (deleted)")
            .filter(|_| !std::path::Path::new(&image.cwd).is_dir())
            .and_then(deleted_cwd_stand_in);
        let cwd = match &deleted {
            Some(d) => d.path.to_string_lossy().into_owned(),
            None => image.cwd.clone(),
        };
        let p = self.put_str(0, &cwd)?;
        self.call(
            &format!("chdir {}", image.cwd),
            libc::SYS_chdir,
            [p, 0, 0, 0, 0, 0],
        )?;
        drop(deleted);
        self.call(
            "umask",
            libc::SYS_umask,
            [image.umask as u64, 0, 0, 0, 0, 0],
        )?;
        self.call(
            "personality",
            libc::SYS_personality,
            [image.personality as u64, 0, 0, 0, 0, 0],
        )?;
        // Session / process group: a session leader gets a new session, a group leader a new
        // group; otherwise the process stays in the caller's group (best effort).
        let (nr, what) = if self.ids_done {
            (0, "")
        } else if image.sid == image.pid {
            (libc::SYS_setsid, "setsid")
        } else if image.pgid == image.pid {
            (libc::SYS_setpgid, "setpgid")
        } else {
            (0, "")
        };
        if nr != 0 {
            if let Err(e) = self.t.syscall(nr, [0; 6]) {
                log::warn!("process {}: {what} failed: {e}", self.pid);
            }
        }
        for sa in &image.sigactions {
            let mut b = Vec::with_capacity(32);
            for v in [sa.handler, sa.flags, sa.restorer, sa.mask] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            let addr = self.put_bytes(0, &b)?;
            self.call(
                &format!("rt_sigaction({})", sa.sig),
                libc::SYS_rt_sigaction,
                [sa.sig as u64, addr, 0, 8, 0, 0],
            )?;
        }
        Ok(())
    }

    /// Create the threads after the leader with an injected `clone3` in the leader. They are
    /// traced from birth (PTRACE_O_TRACECLONE) and never run user code before we set them up.
    /// With a requested pid equal to the image's, the threads get their old ids (`set_tid`).
    fn create_threads(&mut self) -> Result<(), RestoreError> {
        let image = self.image;
        let same_ids = self.same_ids;
        for th in image.threads.iter().skip(1) {
            let flags = (libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM) as u64;
            let tid_addr = self.put_bytes(128, &(th.tid as u64).to_le_bytes())?;
            let mut args = [0u64; 11];
            args[0] = flags;
            if same_ids {
                args[8] = tid_addr;
                args[9] = 1;
            }
            let b: Vec<u8> = args.iter().flat_map(|v| v.to_le_bytes()).collect();
            let addr = self.put_bytes(0, &b)?;
            let step = format!("creating thread {}", th.tid);
            let r = self
                .t
                .syscall_raw(libc::SYS_clone3, [addr, 88, 0, 0, 0, 0])
                .map_err(self.trace(step.clone()))?;
            if r == -(libc::EEXIST as i64) && same_ids {
                return Err(RestoreError::PidInUse { pid: th.tid });
            }
            if r <= 0 {
                return Err(RestoreError::Unexpected {
                    pid: self.pid,
                    step,
                    result: r as u64,
                });
            }
            let mut t = Tracer::adopt_clone(self.pid, r as i32).map_err(self.trace(step))?;
            t.set_syscall_insn(self.scratch);
            self.others.push(t);
        }
        Ok(())
    }

    /// Run `f` with `self.t` temporarily being the tracer of image thread `i`.
    fn with_thread(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Self) -> Result<(), RestoreError>,
    ) -> Result<(), RestoreError> {
        if i == 0 {
            return f(self);
        }
        std::mem::swap(&mut self.t, &mut self.others[i - 1]);
        let r = f(self);
        std::mem::swap(&mut self.t, &mut self.others[i - 1]);
        r
    }

    /// Signal mask, xstate and registers of a non-leader thread (it stays stopped until the
    /// leader is done).
    fn finish_thread(&mut self, i: usize) -> Result<(), RestoreError> {
        let th = &self.image.threads[i];
        let e = self.trace(format!("setting the signal mask of thread {}", th.tid));
        self.t.set_sigmask(th.sigmask).map_err(e)?;
        let e = self.trace(format!("setting the xstate of thread {}", th.tid));
        self.t.set_xstate(&th.xstate).map_err(e)?;
        let mut regs = th.regs.to_user();
        regs.orig_rax = u64::MAX;
        regs.fs_base = th.fs_base;
        regs.gs_base = th.gs_base;
        let e = self.trace(format!("setting the registers of thread {}", th.tid));
        self.t.set_regs(&regs).map_err(e)?;
        self.t.clear_pending_signals();
        Ok(())
    }

    /// Queue the signals that were pending for thread `i` (and, in the leader, for the whole
    /// process) with their original `siginfo`. Every signal is blocked in every thread by now
    /// (see `run`); each thread's own mask comes back with its final registers.
    fn queue_signals(&mut self, i: usize) -> Result<(), RestoreError> {
        let tid = self.image.threads[i].tid;
        let sig = &self.image.signals;
        let own = sig
            .threads
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, q)| q.as_slice())
            .unwrap_or(&[]);
        let shared: &[SigInfo] = if i == 0 { &sig.shared } else { &[] };
        if own.is_empty() && shared.is_empty() {
            return Ok(());
        }
        let (pid, me) = (self.pid as u64, self.t.tid() as u64);
        for (q, shared) in own
            .iter()
            .map(|q| (q, false))
            .chain(shared.iter().map(|q| (q, true)))
        {
            if q.raw.len() != SIGINFO_LEN {
                return Err(RestoreError::BadImage {
                    pid: self.image.pid,
                    reason: format!("a pending signal's siginfo has {} bytes", q.raw.len()),
                });
            }
            let signo = q.signo();
            let addr = self.put_bytes(0, &q.raw)?;
            // Sent to itself, a process may queue any si_code (the kernel refuses that only
            // across processes), so the handler sees exactly what it would have seen.
            let (nr, args, what) = if shared {
                (
                    libc::SYS_rt_sigqueueinfo,
                    [pid, signo as u64, addr, 0, 0, 0],
                    "process",
                )
            } else {
                (
                    libc::SYS_rt_tgsigqueueinfo,
                    [pid, me, signo as u64, addr, 0, 0],
                    "thread",
                )
            };
            self.call(&format!("queueing {what} signal {signo}"), nr, args)?;
        }
        Ok(())
    }

    /// Recreate the POSIX timers with their old ids (PR_TIMER_CREATE_RESTORE_IDS: the id
    /// passed in is the one created) and re-arm them with the time they had left.
    fn restore_posix_timers(&mut self) -> Result<(), RestoreError> {
        const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
        let timers = &self.image.signals.posix_timers;
        if timers.is_empty() {
            return Ok(());
        }
        self.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
        )?;
        for t in timers {
            // struct sigevent: value, signo, notify, then the thread id.
            let target = if t.target == self.image.pid {
                self.pid
            } else {
                t.target
            };
            let mut ev = vec![0u8; 64];
            ev[0..8].copy_from_slice(&t.value.to_le_bytes());
            ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
            ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
            ev[16..20].copy_from_slice(&target.to_le_bytes());
            ev.extend_from_slice(&(t.id as i64).to_le_bytes());
            let ev_addr = self.put_bytes(0, &ev)?;
            let id_addr = ev_addr + 64;
            let step = format!("timer_create (id {})", t.id);
            self.call(
                &step,
                libc::SYS_timer_create,
                [t.clock as u64, ev_addr, id_addr, 0, 0, 0],
            )?;
            let mut got = [0u8; 4];
            let e = self.trace(step.clone());
            self.t.read_mem(id_addr, &mut got).map_err(e)?;
            if i32::from_le_bytes(got) != t.id {
                return Err(RestoreError::Unexpected {
                    pid: self.pid,
                    step,
                    result: i32::from_le_bytes(got) as u64,
                });
            }
            if t.remaining != (0, 0) {
                let its = le_words(&[t.interval.0, t.interval.1, t.remaining.0, t.remaining.1]);
                let a = self.put_bytes(256, &its)?;
                self.call(
                    &format!("timer_settime (id {})", t.id),
                    libc::SYS_timer_settime,
                    [t.id as u64, 0, a, 0, 0, 0],
                )?;
            }
        }
        self.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
        )?;
        Ok(())
    }

    /// Re-arm the interval timers with the time they had left.
    fn restore_itimers(&mut self) -> Result<(), RestoreError> {
        for t in &self.image.signals.itimers {
            let b = le_words(&[t.interval.0, t.interval.1, t.value.0, t.value.1]);
            let addr = self.put_bytes(0, &b)?;
            self.call(
                &format!("setitimer({})", t.which),
                libc::SYS_setitimer,
                [t.which as u64, addr, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    fn restore_thread(&mut self, i: usize) -> Result<(), RestoreError> {
        let th = &self.image.threads[i];
        let alt = th.sigaltstack;
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&alt.sp.to_le_bytes());
        let flags = if alt.flags & libc::SS_DISABLE != 0 {
            libc::SS_DISABLE
        } else {
            alt.flags & !libc::SS_ONSTACK
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&alt.size.to_le_bytes());
        let addr = self.put_bytes(0, &b)?;
        self.call("sigaltstack", libc::SYS_sigaltstack, [addr, 0, 0, 0, 0, 0])?;
        self.call(
            "set_tid_address",
            libc::SYS_set_tid_address,
            [th.clear_child_tid, 0, 0, 0, 0, 0],
        )?;
        if th.robust_list.0 != 0 {
            self.call(
                "set_robust_list",
                libc::SYS_set_robust_list,
                [th.robust_list.0, th.robust_list.1, 0, 0, 0, 0],
            )?;
        }
        if let Some(rs) = th.rseq {
            if let Err(e) = self.t.syscall(
                libc::SYS_rseq,
                [rs.pointer, rs.size as u64, 0, rs.signature as u64, 0, 0],
            ) {
                log::warn!("process {}: cannot register rseq again: {e}", self.pid);
            }
        }
        let name: String = th.comm.chars().take(15).collect();
        let p = self.put_str(0, &name)?;
        self.call(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            [PR_SET_NAME, p, 0, 0, 0, 0],
        )?;
        Ok(())
    }

    fn restore_creds(&mut self) -> Result<(), RestoreError> {
        let c = &self.image.creds;
        // Credentials are per thread: look at this thread's.
        let status =
            std::fs::read_to_string(format!("/proc/{}/task/{}/status", self.pid, self.t.tid()))
                .unwrap_or_default();
        let line = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        let fmt4 = |v: &[u32; 4]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let fmtg = |v: &[u32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        // Capabilities, part one, while this thread still has all of the restorer's: the
        // bounding set is cut (that needs CAP_SETPCAP), and the permitted set is kept
        // through a change to non-root ids for `capset` to choose from below.
        let caps = self.caps;
        // Without keep-caps, a change to non-root real, effective and saved ids clears the
        // permitted set, and with it what `capset` may give (inheritable included).
        let keep = caps.is_some_and(|k| k.permitted | k.inheritable != 0)
            && c.uid[..3].iter().all(|u| *u != 0);
        if let Some(k) = caps {
            // The inheritable set first: it may hold capabilities the bounding set is about
            // to lose (allowed to stay, never to be added once they are gone).
            let cur = |key: &str| u64::from_str_radix(line(key).trim(), 16).unwrap_or(0);
            let b = cap_data(cur("CapEff:"), cur("CapPrm:"), k.inheritable);
            let hdr = self.put_bytes(0, &b)?;
            self.call(
                "capset (inheritable)",
                libc::SYS_capset,
                [hdr, hdr + 8, 0, 0, 0, 0],
            )?;
            let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(40)
                .min(63);
            for cap in (0..=last).filter(|cap| k.bounding & (1 << cap) == 0) {
                self.prctl("PR_CAPBSET_DROP", libc::PR_CAPBSET_DROP, [cap, 0])?;
            }
            if keep {
                self.prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, [1, 0])?;
            }
        }
        if line("Groups:") != fmtg(&c.groups) {
            let b: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
            let addr = self.put_bytes(0, &b)?;
            self.call(
                "setgroups",
                libc::SYS_setgroups,
                [c.groups.len() as u64, addr, 0, 0, 0, 0],
            )?;
        }
        if line("Gid:") != fmt4(&c.gid) {
            self.call(
                "setresgid",
                libc::SYS_setresgid,
                [c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0, 0, 0],
            )?;
        }
        if line("Uid:") != fmt4(&c.uid) {
            self.call(
                "setresuid",
                libc::SYS_setresuid,
                [c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0, 0, 0],
            )?;
        }
        // Part two, under the program's ids: the three sets, then the ambient one (which
        // needs its capabilities permitted and inheritable), then keep-caps off again.
        if let Some(k) = caps {
            let b = cap_data(k.effective, k.permitted, k.inheritable);
            let hdr = self.put_bytes(0, &b)?;
            self.call("capset", libc::SYS_capset, [hdr, hdr + 8, 0, 0, 0, 0])?;
            let (ambient, clear) = (libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL);
            self.prctl("PR_CAP_AMBIENT_CLEAR_ALL", ambient, [clear as u64, 0])?;
            for cap in (0..64u64).filter(|cap| k.ambient & (1 << cap) != 0) {
                let raise = libc::PR_CAP_AMBIENT_RAISE as u64;
                self.prctl("PR_CAP_AMBIENT_RAISE", ambient, [raise, cap])?;
            }
            if keep {
                self.prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, [0, 0])?;
            }
        }
        Ok(())
    }
}

/// `capset`'s arguments: struct __user_cap_header_struct { u32 version; i32 pid } (version
/// 3, this thread), then two struct __user_cap_data_struct { u32 effective, permitted,
/// inheritable } (the low and the high 32 capabilities).
fn cap_data(effective: u64, permitted: u64, inheritable: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&0x2008_0522u32.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    for shift in [0, 32] {
        for v in [effective, permitted, inheritable] {
            b.extend_from_slice(&((v >> shift) as u32).to_le_bytes());
        }
    }
    b
}

/// The pipes of a tree restore: created in the restorer, inherited by every restored process
/// at the same descriptor numbers (all `>= base`, above every descriptor of the images).
struct PipeFds {
    /// Lowest descriptor number used for them.
    base: i32,
    /// Pipe inode in the image → (read end, write end).
    fds: std::collections::BTreeMap<u64, (i32, i32)>,
    /// Socket inode in the image → the recreated socket.
    sockets: std::collections::BTreeMap<u64, i32>,
    /// Inode of a shared memory file in the image → the recreated memfd.
    memfds: std::collections::BTreeMap<u64, i32>,
}

/// The mappings of `image` that dirty-page tracking covers after a restore: private, not
/// `PROT_NONE`, anonymous or file-backed.
pub fn tracked_ranges(image: &ProcessImage) -> Vec<(u64, u64)> {
    image
        .mappings
        .iter()
        .filter(|m| {
            !m.shared
                && m.prot != 0
                && matches!(
                    m.kind,
                    MappingKind::Anon | MappingKind::Heap | MappingKind::Stack | MappingKind::File
                )
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// Options for [`restore_tree`].
#[derive(Default)]
pub struct TreeRestoreOptions<'a> {
    /// Give every process (and thread) its pid from the image (`clone3` + `set_tid`; needs
    /// CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE in the caller's pid namespace, and the pids must
    /// be free). Without it the processes get new pids, and programs that remember pids (a
    /// shell waiting for its children) will not find them.
    pub keep_pids: bool,
    /// Source for [`PageData::Stored`] runs (of every process).
    pub chunks: Option<&'a dyn ChunkSource>,
    /// Do not check that mapped files still have the recorded size and mtime.
    pub skip_file_checks: bool,
    /// Files under this directory come from the checkpoint's own snapshot (a session's
    /// mount): of a mapped one, only the inode is checked.
    pub snapshot_root: Option<&'a Path>,
    /// Directories the caller recreated from the checkpoint before the restore (a session's
    /// private `/dev/shm`, see [`super::DumpOptions::own_dirs`]): files mapped from there
    /// are new files with the recorded contents, not checked against the dump's identity.
    pub recreated: &'a [std::path::PathBuf],
    /// Where terminal descriptors are reopened (see [`RestoreOptions::terminal`]).
    pub terminal: Option<&'a Path>,
    /// Dirty-page tracking: armed on every restored process just before it runs, with the
    /// image as the last checkpoint, so that the first checkpoint after a restore reads only
    /// what the program wrote since ([`super::dirty`]).
    pub dirty: Option<std::sync::Arc<std::sync::Mutex<super::dirty::DirtyTracker>>>,
    /// Fill private anonymous memory after the processes run ([`super::lazy`]); the caller
    /// [`commit`](super::lazy::LazyFill::commit)s it once the restore succeeded.
    pub lazy: Option<&'a super::lazy::LazyFill>,
}

/// A process of the tree being restored.
struct Built {
    /// Index into `TreeImage::processes`.
    idx: usize,
    /// Its new pid.
    pid: i32,
    /// Its tracer while it is still blank (`None` for zombies and once taken by a Restorer).
    t: Option<Tracer>,
}

fn check_tree(tree: &TreeImage, opts: &TreeRestoreOptions) -> Result<(), RestoreError> {
    let bad = |reason: String| RestoreError::BadTree {
        root: tree.root,
        reason,
    };
    let Some(first) = tree.processes.first() else {
        return Err(bad("no processes".into()));
    };
    if first.pid != tree.root || first.live().is_none() {
        return Err(bad("the first process must be the live root".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in tree.processes.iter().enumerate() {
        if !seen.insert(m.pid) {
            return Err(bad(format!("pid {} appears twice", m.pid)));
        }
        if i > 0 {
            let parent = tree.processes[..i].iter().find(|p| p.pid == m.ppid);
            if parent.is_none_or(|p| p.live().is_none()) {
                return Err(bad(format!(
                    "the parent {} of process {} is not a live process listed before it",
                    m.ppid, m.pid
                )));
            }
        }
        if let Some(img) = m.live() {
            if img.pid != m.pid {
                return Err(bad(format!(
                    "member {} holds the image of {}",
                    m.pid, img.pid
                )));
            }
            let memfd = |ino: u64| tree.memfds.iter().any(|f| f.ino == ino);
            for f in &img.fds {
                if let FdKind::Pipe { ino } = f.kind {
                    if !tree.pipes.iter().any(|p| p.ino == ino) {
                        return Err(bad(format!(
                            "fd {} of process {} names the unknown pipe:[{ino}]",
                            f.fd, m.pid
                        )));
                    }
                }
                if let FdKind::Memfd { ino } = f.kind {
                    if !memfd(ino) {
                        return Err(bad(format!(
                            "fd {} of process {} names an unknown memfd (inode {ino})",
                            f.fd, m.pid
                        )));
                    }
                }
            }
            for map in &img.mappings {
                if let MappingKind::Memfd { ino } = map.kind {
                    if !memfd(ino) || !map.shared {
                        return Err(bad(format!(
                            "mapping {:#x}-{:#x} of process {} names an unknown shared file (inode {ino})",
                            map.start, map.end, m.pid
                        )));
                    }
                }
            }
            check_image(img)?;
            if !opts.skip_file_checks {
                check_files(img, opts.snapshot_root, opts.recreated)?;
            }
        }
    }
    let mut inos = std::collections::BTreeSet::new();
    for f in &tree.memfds {
        if !inos.insert(f.ino) {
            return Err(bad(format!(
                "shared memory file (inode {}) appears twice",
                f.ino
            )));
        }
        if f.size > (1 << 44)
            || f.contents
                .runs
                .iter()
                .any(|r| r.addr + r.len > f.size.div_ceil(4096) * 4096)
        {
            return Err(bad(format!(
                "shared memory file (inode {}) has contents past its size {}",
                f.ino, f.size
            )));
        }
    }
    let mut ends = std::collections::BTreeSet::new();
    for pair in &tree.sockets {
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&pair.kind) {
            return Err(bad(format!("a socket pair of unknown type {}", pair.kind)));
        }
        if pair.ends[0].ino == 0 {
            return Err(bad("a socket pair whose first end has no inode".into()));
        }
        for end in pair.ends.iter().filter(|e| e.ino != 0) {
            if !ends.insert(end.ino) {
                return Err(bad(format!("socket:[{}] appears twice", end.ino)));
            }
            let bytes: usize = end.queue.iter().map(|m| m.0.len()).sum();
            if bytes > (1 << 30) {
                return Err(bad(format!("socket:[{}] holds {bytes} bytes", end.ino)));
            }
        }
    }
    for m in &tree.processes {
        for f in m.live().map(|p| p.fds.as_slice()).unwrap_or(&[]) {
            if let FdKind::UnixSocket { ino } = f.kind {
                if !ends.contains(&ino) {
                    return Err(bad(format!(
                        "fd {} of process {} names the unknown socket:[{ino}]",
                        f.fd, m.pid
                    )));
                }
            }
        }
    }
    for p in &tree.pipes {
        if p.data.len() > (1 << 30) {
            return Err(bad(format!(
                "pipe:[{}] holds {} bytes",
                p.ino,
                p.data.len()
            )));
        }
    }
    Ok(())
}

/// Create every pipe of the tree in the restorer, fill it with its data and move both ends
/// to descriptors `>= base`. Returns the owned ends (the restorer closes them at the end) and
/// the numbers.
fn make_pipes(
    tree: &TreeImage,
    chunks: Option<&dyn ChunkSource>,
) -> Result<(Vec<std::os::fd::OwnedFd>, PipeFds), RestoreError> {
    use std::os::fd::AsRawFd;
    let max_fd = tree
        .processes
        .iter()
        .filter_map(|m| m.live())
        .flat_map(|p| p.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2);
    let base = max_fd.max(2) + 1;
    let mut owned = Vec::new();
    let mut fds = std::collections::BTreeMap::new();
    for p in &tree.pipes {
        let err = |reason: String| RestoreError::Pipe { ino: p.ino, reason };
        let cap = (p.capacity as usize).max(p.data.len());
        let (r, w) =
            sys::pipe_with_capacity(cap).map_err(|e| err(format!("creating the pipe: {e}")))?;
        let mut off = 0;
        while off < p.data.len() {
            match nix::unistd::write(&w, &p.data[off..]) {
                Ok(n) if n > 0 => off += n,
                Ok(_) => return Err(err("writing the buffered data: short write".into())),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(err(format!("writing the buffered data: {e}"))),
            }
        }
        let r = sys::dup_at_least(&r, base).map_err(|e| err(format!("dup: {e}")))?;
        let w = sys::dup_at_least(&w, base).map_err(|e| err(format!("dup: {e}")))?;
        fds.insert(p.ino, (r.as_raw_fd(), w.as_raw_fd()));
        owned.push(r);
        owned.push(w);
    }
    let mut sockets = std::collections::BTreeMap::new();
    for pair in &tree.sockets {
        let [a, b] = &pair.ends;
        let err = |reason: String| RestoreError::Socket { ino: a.ino, reason };
        let (sa, sb) = unix::socketpair(pair.kind)
            .map_err(|e| err(format!("socketpair({}): {e}", pair.kind)))?;
        let stream = pair.kind == libc::SOCK_STREAM;
        // What is queued on one end is sent from the other, whose send buffer holds it until
        // it is read: make room first, then put the recorded sizes back.
        for (from, end) in [(&sb, a), (&sa, b)] {
            let bytes: usize = end.queue.iter().map(|m| m.0.len() + 1024).sum();
            let room = (bytes as u64 * 2 + (1 << 20)).min(i32::MAX as u64) as u32;
            unix::set_buffer_sizes(from, room, room)
                .map_err(|e| err(format!("SO_SNDBUFFORCE: {e}")))?;
            let msgs: Vec<Vec<u8>> = end.queue.iter().map(|m| m.0.clone()).collect();
            unix::send_all(from, &msgs, stream)
                .map_err(|e| err(format!("queueing {} messages: {e}", msgs.len())))?;
        }
        // Options that change what a read returns, once the queues are refilled.
        for (s, end) in [(&sa, a), (&sb, b)].into_iter().filter(|(_, e)| e.ino != 0) {
            let set = |o: i32, v: i32| unix::setsockopt_int(s, libc::SOL_SOCKET, o, v);
            if end.peek_off >= 0 {
                set(libc::SO_PEEK_OFF, end.peek_off)
                    .map_err(|e| err(format!("SO_PEEK_OFF: {e}")))?;
            }
            if end.passcred {
                set(libc::SO_PASSCRED, 1).map_err(|e| err(format!("SO_PASSCRED: {e}")))?;
            }
        }
        if b.ino == 0 {
            // The other end was closed at the checkpoint: close it again, which shuts this
            // end down both ways, as it was.
            unix::set_buffer_sizes(&sa, a.sndbuf, a.rcvbuf)
                .map_err(|e| err(format!("setting the buffer sizes: {e}")))?;
            drop(sb);
            let s = sys::dup_at_least(&sa, base).map_err(|e| err(format!("dup: {e}")))?;
            sockets.insert(a.ino, s.as_raw_fd());
            owned.push(s);
            continue;
        }
        for (s, end) in [(&sa, a), (&sb, b)] {
            unix::set_buffer_sizes(s, end.sndbuf, end.rcvbuf)
                .map_err(|e| err(format!("setting the buffer sizes: {e}")))?;
        }
        // Shutdowns last (a shut-down send side could not queue). On a stream or seqpacket
        // pair, shutting down one end's sending also shuts down the other's receiving, so
        // only what is left is applied; a datagram end's bits are its own.
        for (s, end, other) in [(&sa, a, b), (&sb, b, a)] {
            let spreads = stream || pair.kind == libc::SOCK_SEQPACKET;
            let how = match (
                end.shutdown & 2 != 0,
                end.shutdown & 1 != 0 && !(spreads && other.shutdown & 2 != 0),
            ) {
                (true, true) => Some(libc::SHUT_RDWR),
                (true, false) => Some(libc::SHUT_WR),
                (false, true) => Some(libc::SHUT_RD),
                (false, false) => None,
            };
            if let Some(how) = how {
                unix::shutdown(s, how).map_err(|e| err(format!("shutdown: {e}")))?;
            }
        }
        for (s, end) in [(sa, a), (sb, b)] {
            let s = sys::dup_at_least(&s, base).map_err(|e| err(format!("dup: {e}")))?;
            sockets.insert(end.ino, s.as_raw_fd());
            owned.push(s);
        }
    }
    // Sockets that are only bound (or listening) first: a datagram socket of the tree may
    // connect to one of them by name.
    let mut order: Vec<&super::image::BoundSocket> = tree.bound_sockets.iter().collect();
    order.sort_by_key(|l| !l.peer.is_empty());
    for l in order {
        let s = make_listener(l)?;
        let s = sys::dup_at_least(&s, base).map_err(|e| RestoreError::Socket {
            ino: l.ino,
            reason: format!("dup: {e}"),
        })?;
        sockets.insert(l.ino, s.as_raw_fd());
        owned.push(s);
    }
    let mut memfds = std::collections::BTreeMap::new();
    for f in &tree.memfds {
        let m = make_memfd(f, chunks)?;
        let m = sys::dup_at_least(&m, base).map_err(|e| RestoreError::Memfd {
            ino: f.ino,
            reason: format!("dup: {e}"),
        })?;
        memfds.insert(f.ino, m.as_raw_fd());
        owned.push(m);
    }
    Ok((
        owned,
        PipeFds {
            base,
            fds,
            sockets,
            memfds,
        },
    ))
}

/// A socket made again from its addresses (TCP or unix listeners, UDP and unix datagram
/// sockets): options, then bound, listening or connected as recorded.
fn make_listener(l: &super::image::BoundSocket) -> Result<std::os::fd::OwnedFd, RestoreError> {
    use std::os::fd::AsRawFd;
    let err = |reason: String| RestoreError::Socket { ino: l.ino, reason };
    let kinds_ok = matches!(
        (l.family, l.kind, l.listening),
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM, true)
            | (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM, false)
            | (
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_SEQPACKET,
                true
            )
            | (libc::AF_UNIX, libc::SOCK_DGRAM, false)
    );
    if !kinds_ok {
        return Err(err(format!(
            "a socket of family {} and type {} (listening: {})",
            l.family, l.kind, l.listening
        )));
    }
    // A unix socket bound to a relative path is bound from the directory it was relative
    // to; the caller's working directory is put back after.
    let back = if l.dir.is_empty() {
        None
    } else {
        let here = std::fs::File::open(".")
            .map_err(|e| err(format!("open the working directory: {e}")))?;
        std::env::set_current_dir(&l.dir).map_err(|e| err(format!("chdir {}: {e}", l.dir)))?;
        Some(here)
    };
    let res = bind_listener(l);
    if let Some(here) = back {
        // SAFETY: fchdir takes a descriptor, which `here` keeps open for the call.
        unsafe { libc::fchdir(here.as_raw_fd()) };
    }
    res
}

/// [`make_listener`] from the right working directory.
fn bind_listener(l: &super::image::BoundSocket) -> Result<std::os::fd::OwnedFd, RestoreError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let err = |reason: String| RestoreError::Socket { ino: l.ino, reason };
    let os = || std::io::Error::last_os_error();
    let bound = is_bound(&l.addr);
    if l.family == libc::AF_UNIX && bound {
        remove_stale_socket(&l.addr, l.kind);
    }
    // SAFETY: socket takes integers and returns a new descriptor, owned from here on.
    let fd = unsafe { libc::socket(l.family, l.kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(format!("socket: {}", os())));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    for &(level, name, v) in &l.options {
        unix::setsockopt_int(&sock, level, name, v)
            .map_err(|e| err(format!("setsockopt({level}, {name}, {v}): {e}")))?;
    }
    // SAFETY: bind reads `a.len()` (at most 128) bytes of the address from `a`.
    let bind = |a: &[u8]| unsafe {
        libc::bind(
            sock.as_raw_fd(),
            a.as_ptr().cast(),
            a.len() as libc::socklen_t,
        )
    };
    // SAFETY: connect reads `a.len()` (at most 128) bytes of the address from `a`.
    let connect = |a: &[u8]| unsafe {
        libc::connect(
            sock.as_raw_fd(),
            a.as_ptr().cast(),
            a.len() as libc::socklen_t,
        )
    };
    let addr = &l.addr[..l.addr.len().min(128)];
    if bound && bind(addr) < 0 {
        let e = os();
        let at = describe_sockaddr(&l.addr);
        let in_use = e.raw_os_error() == Some(libc::EADDRINUSE);
        // A connected datagram socket's local port was most likely picked by the kernel:
        // another one does as well while the original still holds it.
        let mut any_port = addr.to_vec();
        if in_use && !l.peer.is_empty() && l.family != libc::AF_UNIX && any_port.len() >= 4 {
            any_port[2] = 0;
            any_port[3] = 0;
        }
        if any_port == addr || bind(&any_port) < 0 {
            return Err(err(if in_use {
                format!(
                    "{at} is in use (by the program this checkpoint was taken from, if it \
                     still runs: a bound address can be restored once)"
                )
            } else {
                format!("bind to {at}: {e}")
            }));
        }
    }
    // The socket file as it was, not as this process's umask and user make it.
    if let (true, Some((mode, uid, gid)), Some(path)) = (bound, l.file, unix_path(&l.addr)) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| err("the socket's path contains NUL".into()))?;
        // SAFETY: `c` is a valid NUL-terminated path; the calls read nothing else.
        let r = unsafe {
            if libc::lchown(c.as_ptr(), uid, gid) < 0 {
                -1
            } else {
                libc::chmod(c.as_ptr(), mode as libc::mode_t)
            }
        };
        if r < 0 {
            return Err(err(format!(
                "owner and mode of {}: {}",
                path.display(),
                os()
            )));
        }
    }
    if l.listening {
        let backlog = l.backlog.min(i32::MAX as u32) as i32;
        // SAFETY: listen takes integers.
        if unsafe { libc::listen(sock.as_raw_fd(), backlog) } < 0 {
            return Err(err(format!("listen: {}", os())));
        }
    }
    if !l.peer.is_empty() && connect(&l.peer[..l.peer.len().min(128)]) < 0 {
        return Err(err(format!(
            "connect to {}: {}",
            describe_sockaddr(&l.peer),
            os()
        )));
    }
    Ok(sock)
}

/// Whether a `getsockname` address names something to bind again: an inet address with a
/// port, or a unix socket with a name.
fn is_bound(a: &[u8]) -> bool {
    if a.len() < 3 {
        return false;
    }
    if i32::from(u16::from_ne_bytes([a[0], a[1]])) == libc::AF_UNIX {
        return true;
    }
    a.len() >= 4 && (a[2] != 0 || a[3] != 0)
}

/// The file a unix socket address names, if it is a path (not an abstract name).
fn unix_path(a: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let p = a.get(2..)?;
    if p.first().is_none_or(|c| *c == 0) {
        return None;
    }
    let end = p.iter().position(|c| *c == 0).unwrap_or(p.len());
    Some(std::ffi::OsStr::from_bytes(&p[..end]).into())
}

/// A socket file left at a unix socket's path by a listener that is gone (connecting to it
/// is refused) is removed, as servers do before they bind: the checkpoint's snapshot and a
/// rollback both leave one.
fn remove_stale_socket(addr: &[u8], kind: i32) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = unix_path(addr) else {
        return;
    };
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        return;
    }
    // SAFETY: socket takes integers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let probe = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: connect reads `addr.len()` bytes of the address from `addr`.
    let r = unsafe {
        libc::connect(
            probe.as_raw_fd(),
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNREFUSED) {
        let _ = std::fs::remove_file(&path);
    }
}

/// A `sockaddr_in`, `sockaddr_in6` or `sockaddr_un` as text.
fn describe_sockaddr(a: &[u8]) -> String {
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    if a.len() >= 2 && i32::from(u16::from_ne_bytes([a[0], a[1]])) == libc::AF_UNIX {
        return match unix_path(a) {
            Some(p) => p.display().to_string(),
            None => format!(
                "@{}",
                String::from_utf8_lossy(a.get(3..).unwrap_or_default())
            ),
        };
    }
    match a.len() {
        16.. if i32::from(u16::from_ne_bytes([a[0], a[1]])) == libc::AF_INET => format!(
            "{}:{}",
            std::net::Ipv4Addr::new(a[4], a[5], a[6], a[7]),
            port(a)
        ),
        28.. => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[8..24]);
            format!("[{}]:{}", std::net::Ipv6Addr::from(ip), port(a))
        }
        _ => format!("{a:02x?}"),
    }
}

/// Recreates a shared memory file as a memfd: its contents, its size, then its seals.
fn make_memfd(
    f: &super::image::MemfdImage,
    chunks: Option<&dyn ChunkSource>,
) -> Result<std::os::fd::OwnedFd, RestoreError> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    let err = |reason: String| RestoreError::Memfd { ino: f.ino, reason };
    // F_SEAL_SEAL alone: made without MFD_ALLOW_SEALING; with other seals: sealed, then
    // locked. Only the first cannot take seals.
    let sealable = f.seals.is_some_and(|s| s != libc::F_SEAL_SEAL as u32);
    let name: String = f.name.chars().filter(|c| *c != '\0').take(200).collect();
    let cname = std::ffi::CString::new(name).map_err(|e| err(e.to_string()))?;
    let flags = if sealable { libc::MFD_ALLOW_SEALING } else { 0 } | libc::MFD_CLOEXEC;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor, which
    // is owned from here on.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(err(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    for_each_data_run(&f.contents, chunks, |at, b| {
        file.write_all_at(b, at)
            .map_err(|e| format!("writing {} bytes at {at}: {e}", b.len()))
    })
    .map_err(err)?;
    file.set_len(f.size)
        .map_err(|e| err(format!("setting the size: {e}")))?;
    // Seals on writing (and the lock on seals) wait until every process has mapped the file
    // (`seal_memfds`): a writable shared mapping made before F_SEAL_FUTURE_WRITE must be
    // made again first.
    let early = f.seals.filter(|_| sealable).map(|s| s & !LATE_SEALS);
    add_seals(&file, early.unwrap_or(0)).map_err(err)?;
    Ok(file.into())
}

/// Hands every run of `mem` that holds bytes to `put(offset, bytes)`: inline runs as they
/// are, stored ones fetched from `chunks` in batches (their length checked); zero runs are
/// skipped. Fills files in shared memory and SysV segments, whose runs are at offsets.
pub fn for_each_data_run(
    mem: &super::image::ImageMemory,
    chunks: Option<&dyn ChunkSource>,
    mut put: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let stored: Vec<(u64, [u8; 32], u64)> = mem
        .runs
        .iter()
        .filter_map(|r| match &r.data {
            PageData::Stored(h) => Some((r.addr, *h, r.len)),
            _ => None,
        })
        .collect();
    for r in &mem.runs {
        if let PageData::Bytes(b) = &r.data {
            put(r.addr, b)?;
        }
    }
    let mut buf = Vec::new();
    for batch in stored.chunks(2048) {
        let src = chunks.ok_or("its contents are stored but no chunk source was given")?;
        let reqs: Vec<([u8; 32], u64)> = batch.iter().map(|(_, h, l)| (*h, *l)).collect();
        buf.resize(reqs.iter().map(|r| r.1 as usize).sum(), 0);
        src.fetch_into(&reqs, &mut buf)?;
        let mut off = 0usize;
        for (at, _, len) in batch {
            put(*at, &buf[off..off + *len as usize])?;
            off += *len as usize;
        }
    }
    Ok(())
}

/// Seals applied once the processes hold their mappings.
const LATE_SEALS: u32 = (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL) as u32;

fn add_seals(file: &impl std::os::fd::AsRawFd, seals: u32) -> Result<(), String> {
    if seals == 0 {
        return Ok(());
    }
    // SAFETY: F_ADD_SEALS on a valid descriptor reads no memory of ours.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    if r < 0 {
        return Err(format!(
            "adding seals {seals:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Puts the seals on writing back on every memfd, once every process has mapped them and
/// before any runs.
fn seal_memfds(tree: &TreeImage, pipes: &PipeFds) -> Result<(), RestoreError> {
    for f in &tree.memfds {
        let Some(seals) = f.seals.filter(|s| *s != libc::F_SEAL_SEAL as u32) else {
            continue;
        };
        let Some(&fd) = pipes.memfds.get(&f.ino) else {
            continue;
        };
        // SAFETY: `fd` is one of the restorer's memfds, open until the tree is built; the
        // borrow does not outlive this call.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        add_seals(&bfd, seals & LATE_SEALS)
            .map_err(|reason| RestoreError::Memfd { ino: f.ino, reason })?;
    }
    Ok(())
}

/// Restore a process tree ([`TreeImage`], from [`super::dump::dump_tree`]).
///
/// The root becomes a child of the calling process; every other process is created by its
/// own (restored) parent, so parent/child links, and with
/// [`TreeRestoreOptions::keep_pids`] the pids, are those of the image. Zombies are zombies
/// again (with their wait status). Pipes are recreated once each, with their buffered data,
/// and installed at the recorded descriptor numbers in every process that had them.
/// Sessions and process groups whose leader is in the tree are rebuilt; members whose group
/// or session was led by a process outside the tree stay in the caller's.
///
/// Order: (1) create the pipes in the caller; (2) spawn the root (a stopped copy of the caller
/// that inherits the pipes) and, parents before children, create every other process by
/// injecting `clone3` (with `set_tid`) into its still-blank parent (traced from birth with
/// `PTRACE_O_TRACEFORK`); each new process first gets its session/group, zombies then exit
/// with their status; (3) rebuild every live process as [`restore_with`] does, installing
/// pipe ends with `dup3`; (4) only when all are ready, let them all run. On error every
/// created process is killed. Returns the (new) pid of the root, running; only the root is
/// a child of the caller, which should eventually reap it (the other members are children of
/// their restored parents). Call it from one thread; with `keep_pids` the caller needs
/// CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE over its pid namespace (in production: PID 1 of a
/// fresh pid namespace) and every image pid must be free.
pub fn restore_tree(tree: &TreeImage, opts: &TreeRestoreOptions) -> Result<i32, RestoreError> {
    check_tree(tree, opts)?;
    let (pipe_owned, pipe_fds) = make_pipes(tree, opts.chunks)?;
    let mut built: Vec<Built> = Vec::with_capacity(tree.processes.len());
    let res = build_tree(tree, opts, &pipe_fds, &mut built);
    drop(pipe_owned);
    match res {
        Ok(()) => Ok(built[0].pid),
        Err(e) => {
            kill_built(&mut built);
            Err(e)
        }
    }
}

/// Kill everything created so far (while still traced, so nothing runs), then reap.
fn kill_built(built: &mut Vec<Built>) {
    for b in built.iter() {
        let _ = sys::kill(b.pid, libc::SIGKILL);
    }
    for b in built.iter_mut().rev() {
        if let Some(t) = b.t.take() {
            t.forget();
        }
        sys::kill_and_reap(b.pid);
    }
    built.clear();
}

fn build_tree<'a>(
    tree: &'a TreeImage,
    opts: &'a TreeRestoreOptions<'a>,
    pipes: &'a PipeFds,
    built: &mut Vec<Built>,
) -> Result<(), RestoreError> {
    let root = &tree.processes[0];
    // (2) The root, and a scratch page in it that its descendants inherit.
    let want = opts.keep_pids.then_some(root.pid);
    let pid = sys::spawn_stopped_child(want).map_err(|source| match (source, want) {
        (Errno::EEXIST, Some(pid)) => RestoreError::PidInUse { pid },
        _ => RestoreError::Spawn { source },
    })?;
    built.push(Built {
        idx: 0,
        pid,
        t: None,
    });
    let trace = |pid: i32, step: &str| {
        let step = step.to_string();
        move |source| RestoreError::Trace { pid, step, source }
    };
    let mut t = Tracer::adopt_stopped_child(pid).map_err(trace(pid, "adopting the child"))?;
    t.locate_syscall_insn()
        .map_err(trace(pid, "finding a syscall instruction"))?;
    let scratch = t
        .syscall(
            libc::SYS_mmap,
            [
                0,
                PAGE_SIZE,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
        .map_err(trace(pid, "mapping a scratch page"))?;
    // Children that exit must stay zombies: no SIG_IGN/SA_NOCLDWAIT for SIGCHLD while
    // building (the image's dispositions are set later).
    t.write_mem(scratch, &[0u8; 32])
        .map_err(trace(pid, "writing the scratch page"))?;
    t.syscall(
        libc::SYS_rt_sigaction,
        [libc::SIGCHLD as u64, scratch, 0, 8, 0, 0],
    )
    .map_err(trace(pid, "rt_sigaction(SIGCHLD, SIG_DFL)"))?;
    built[0].t = Some(t);
    let mut new_pid: std::collections::BTreeMap<i32, i32> = Default::default();
    new_pid.insert(root.pid, pid);
    set_ids(tree, 0, &new_pid, built)?;

    for (idx, m) in tree.processes.iter().enumerate().skip(1) {
        let pi = built
            .iter()
            .position(|b| tree.processes[b.idx].pid == m.ppid)
            .ok_or_else(|| RestoreError::BadTree {
                root: tree.root,
                reason: format!("parent {} of {} not created", m.ppid, m.pid),
            })?;
        let ppid_new = built[pi].pid;
        let Some(parent) = built[pi].t.as_mut() else {
            return Err(RestoreError::BadTree {
                root: tree.root,
                reason: format!("parent {} of {} is not live", m.ppid, m.pid),
            });
        };
        let want = opts.keep_pids.then_some(m.pid);
        let mut args = [0u64; 11];
        args[4] = libc::SIGCHLD as u64;
        if let Some(w) = want {
            args[8] = scratch + 128;
            args[9] = 1;
            parent
                .write_mem(scratch + 128, &(w as u64).to_le_bytes())
                .map_err(trace(ppid_new, "writing clone3 arguments"))?;
        }
        let b: Vec<u8> = args.iter().flat_map(|v| v.to_le_bytes()).collect();
        parent
            .write_mem(scratch, &b)
            .map_err(trace(ppid_new, "writing clone3 arguments"))?;
        let step = format!("creating child {} of {}", m.pid, m.ppid);
        let r = parent
            .syscall_raw(libc::SYS_clone3, [scratch, 88, 0, 0, 0, 0])
            .map_err(trace(ppid_new, &step))?;
        if r == -(libc::EEXIST as i64) {
            if let Some(w) = want {
                return Err(RestoreError::PidInUse { pid: w });
            }
        }
        if r <= 0 {
            return Err(RestoreError::Unexpected {
                pid: ppid_new,
                step,
                result: r as u64,
            });
        }
        let cpid = r as i32;
        built.push(Built {
            idx,
            pid: cpid,
            t: None,
        });
        let t = Tracer::adopt_clone(cpid, cpid).map_err(trace(cpid, &step))?;
        let last = built.len() - 1;
        built[last].t = Some(t);
        new_pid.insert(m.pid, cpid);
        if let Some(t) = built[last].t.as_mut() {
            t.locate_syscall_insn()
                .map_err(trace(cpid, "finding a syscall instruction"))?;
        }
        set_ids(tree, last, &new_pid, built)?;
        if let MemberState::Zombie { status, .. } = m.state {
            // No core file from a blank copy of the restorer.
            let _ = sys::set_rlimit(cpid, libc::RLIMIT_CORE, 0, 0);
            if let Some(t) = built[last].t.take() {
                t.exit_with_status(status, scratch)
                    .map_err(trace(cpid, &format!("making {} a zombie", m.pid)))?;
            }
        }
    }

    // (3) Rebuild every live process.
    let peers: std::collections::BTreeMap<i32, i32> = built
        .iter()
        .map(|b| (tree.processes[b.idx].pid, b.pid))
        .collect();
    let mut restorers = Vec::new();
    let res = (|| {
        for b in built.iter_mut() {
            let Some(img) = tree.processes[b.idx].live() else {
                continue;
            };
            let Some(t) = b.t.take() else {
                continue;
            };
            let mut r = Restorer {
                pid: b.pid,
                t,
                image: img,
                same_ids: opts.keep_pids,
                chunks: opts.chunks,
                pipes: Some(pipes),
                ids_done: true,
                scratch: 0,
                others: Vec::new(),
                terminal: opts.terminal,
                dirty: opts.dirty.as_deref(),
                fill: None,
                uffd: None,
                lazy: opts.lazy,
                lazy_used: false,
                peers: Some(&peers),
                no_new_privs: tree.no_new_privs.contains(&img.pid),
                caps: tree
                    .caps
                    .iter()
                    .find(|(p, _)| *p == img.pid)
                    .map(|(_, c)| *c),
                seccomp: tree
                    .seccomp
                    .iter()
                    .find(|(p, _)| *p == img.pid)
                    .map(|(_, f)| f.as_slice()),
            };
            let res = r.run();
            restorers.push(r);
            res?;
        }
        Ok(())
    })()
    .and_then(|()| seal_memfds(tree, pipes));
    if let Err(e) = res {
        for b in built.iter() {
            let _ = sys::kill(b.pid, libc::SIGKILL);
        }
        for r in restorers {
            r.forget();
        }
        return Err(e);
    }
    // (4) Let everything run, but what was in a group stop: a SIGSTOP queued while every
    // thread is still in its ptrace stop is taken at the detach, before any user code runs.
    for r in &restorers {
        if tree.stopped.contains(&r.image.pid) {
            let _ = sys::kill(r.pid, libc::SIGSTOP);
        }
    }
    let mut first_err = None;
    for r in restorers {
        if let Err(e) = r.detach_all() {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Session and process group of the freshly created (still blank) process `built[bi]`.
fn set_ids(
    tree: &TreeImage,
    bi: usize,
    new_pid: &std::collections::BTreeMap<i32, i32>,
    built: &mut [Built],
) -> Result<(), RestoreError> {
    let m = &tree.processes[built[bi].idx];
    let pid = built[bi].pid;
    let (pgid, sid) = m.pgid_sid();
    let parent_ids = tree
        .processes
        .iter()
        .find(|p| p.pid == m.ppid)
        .map(|p| p.pgid_sid());
    let Some(t) = built[bi].t.as_mut() else {
        return Ok(());
    };
    if sid == m.pid {
        if let Err(e) = t.syscall(libc::SYS_setsid, [0; 6]) {
            log::warn!("process {pid} (image {}): setsid failed: {e}", m.pid);
        }
        return Ok(());
    }
    if parent_ids.is_some_and(|(_, psid)| psid != sid) && new_pid.contains_key(&sid) {
        log::warn!(
            "process {pid} (image {}): session {sid} differs from its parent's; not restored",
            m.pid
        );
    }
    let target = if pgid == m.pid {
        Some(0)
    } else {
        new_pid.get(&pgid).copied()
    };
    match target {
        Some(g) => {
            if let Err(e) = t.syscall(libc::SYS_setpgid, [0, g as u64, 0, 0, 0, 0]) {
                log::warn!(
                    "process {pid} (image {}): setpgid to group {pgid} failed: {e}",
                    m.pid
                );
            }
        }
        None => {
            if parent_ids.is_some_and(|(ppg, _)| ppg != pgid) {
                log::warn!(
                    "process {pid} (image {}): process group {pgid} has no leader in the tree; \
                     it stays in its parent's group",
                    m.pid
                );
            }
        }
    }
    Ok(())
}

/// A directory made to stand for a deleted working directory, removed when dropped.
struct DeletedCwd {
    path: std::path::PathBuf,
}

impl Drop for DeletedCwd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Makes a directory beside where `orig` was (in the nearest existing directory above it);
/// `None` if none could be made (the chdir that follows then fails, naming the path).
fn deleted_cwd_stand_in(orig: &str) -> Option<DeletedCwd> {
    let mut parent = std::path::Path::new(orig).parent();
    while let Some(p) = parent {
        if p.is_dir() {
            break;
        }
        parent = p.parent();
    }
    let parent = parent.unwrap_or(std::path::Path::new("/"));
    for i in 0..100 {
        // A short name of its own: the original's may be near the length limit.
        let path = parent.join(format!(".forkpoint-cwd.{}.{i}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => return Some(DeletedCwd { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn find_free_avoids_busy_ranges() {
        let top = SEARCH_TOP;
        let busy = vec![(top - 0x3000, top), (top - 0x10000, top - 0x5000)];
        let a = find_free(&busy, 0x2000).unwrap();
        assert!(a + 0x2000 <= top - 0x10000 || (a >= top - 0x5000 && a + 0x2000 <= top - 0x3000));
        for (s, e) in &busy {
            assert!(a + 0x2000 <= *s || a >= *e);
        }
        assert_eq!(a % PAGE_SIZE, 0);
    }

    #[test]
    fn image_without_threads_is_refused() {
        let mut img = super::super::image::tests::sample();
        img.threads.clear();
        assert!(matches!(restore(&img), Err(RestoreError::BadImage { .. })));
    }
}
