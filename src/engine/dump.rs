//! Dumping a running process into a [`ProcessImage`].
//!
//! ## Order of operations
//! 1. **Freeze**: seize and interrupt every thread listed in `/proc/PID/task`, repeating the
//!    listing until no new thread shows up (threads created meanwhile are caught by the next
//!    pass). Interrupted system calls are rewound for restart (see [`super::tracer`]).
//! 2. **Mappings**: parse `/proc/PID/maps` and classify each mapping (anon, heap, stack, file,
//!    shared anon, vdso/vvar/vsyscall). A mapped file whose path now names a different inode,
//!    or that was deleted, is treated as anonymous memory and dumped completely.
//! 3. **Injected queries** (with a scratch page mapped into the tracee for the results and
//!    unmapped again right after): `rt_sigaction(sig, NULL, &old)` for every signal,
//!    `brk(0)`, and per thread `sigaltstack(NULL, &old)` and `prctl(PR_GET_TID_ADDRESS)`.
//! 4. **Threads**: registers, xstate, signal mask and rseq registration via ptrace, robust list
//!    via `get_robust_list`.
//! 5. **Memory**: `/proc/PID/pagemap` tells which pages exist. Private anonymous mappings dump
//!    present/swapped pages, private file mappings only their copied-on-write (anonymous) pages,
//!    shared anonymous mappings everything; shared file mappings nothing (the file holds the
//!    data). Pages are read with `process_vm_readv` (fallback `/proc/PID/mem`), all-zero pages
//!    are recorded as zero runs.
//! 6. **Process state from /proc**: fds (+ fdinfo), cwd, exe, creds, umask, rlimits,
//!    personality, `mm` layout from `/proc/PID/stat`, auxv.
//! 7. **Thaw**: every tracer is dropped, which restores the registers and detaches; the process
//!    continues exactly where it was. This also happens on every error path. With
//!    [`AfterDump::Kill`] the process is instead killed while still frozen; with
//!    [`AfterDump::Stop`] it is let go with a `SIGSTOP` queued.
//!
//! Pending signals (with their `siginfo`, via `PTRACE_PEEKSIGINFO`), interval timers and POSIX
//! timers are captured. Limitations: sockets,
//! ttys and namespaces are not captured (unsupported fds are refused with
//! [`DumpError::UnsupportedFd`]). Pipes are supported only by [`dump_tree`], between members
//! of the tree.
//!
//! ## Trees
//! [`dump_tree`] freezes the root, then repeatedly every child (found through the ppid field of
//! /proc/*/stat, as `/proc/PID/task/TID/children` needs CONFIG_PROC_CHILDREN) of every frozen
//! member until no new one appears; children that already exited are recorded as zombies with
//! their wait status. Only then is `on_frozen` called. Each live member is read as above; for
//! every pipe one member's end is reopened read-only through `/proc/PID/fd/N`, and its buffered
//! bytes are copied with `tee` into a private pipe of the same capacity, so the data stays in
//! the pipe.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::image::{
    BoundSocket, CapSets, Creds, EpollWatch, FdKind, FdState, FileId, FileLock, ITimer,
    ImageMemory, InotifyWatch, LockKind, Mapping, MappingKind, MemberState, MemfdImage, Message,
    MmState, PageData, PageRun, PipeImage, PosixTimer, ProcessImage, Regs, Rlimit, RseqState,
    SeccompFilter, SigAction, SigAltStack, SigInfo, SignalState, SocketEnd, SocketPairImage,
    ThreadState, TreeImage, TreeMember, PAGE_SIZE, SIGINFO_LEN,
};
use super::sys;
use super::tracer::{TraceError, Tracer};

/// Errors while dumping. The dumped process keeps running in every case.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The process does not exist.
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// Pid.
        pid: i32,
    },
    /// The pid is a thread, not a process (thread-group leader).
    #[error("{pid} is a thread of process {tgid}; dump the process instead")]
    NotAProcess {
        /// The given id.
        pid: i32,
        /// Its thread group.
        tgid: i32,
    },
    /// Attaching to a thread failed.
    #[error("cannot attach to thread {tid} of process {pid}: {source}")]
    Attach {
        /// Pid.
        pid: i32,
        /// Thread id.
        tid: i32,
        /// Cause.
        source: TraceError,
    },
    /// A ptrace operation on the frozen process failed.
    #[error("process {pid}: {source}")]
    Trace {
        /// Pid.
        pid: i32,
        /// Cause.
        source: TraceError,
    },
    /// Reading a /proc file failed.
    #[error("process {pid}: reading {path} failed: {source}")]
    Proc {
        /// Pid.
        pid: i32,
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A /proc file had an unexpected format.
    #[error("process {pid}: cannot parse {what}: {detail}")]
    Parse {
        /// Pid.
        pid: i32,
        /// Which file/field.
        what: &'static str,
        /// The offending text.
        detail: String,
    },
    /// The `on_frozen` callback failed.
    #[error("checkpoint of pid {pid} aborted: {reason}")]
    Hook {
        /// Pid (the root of a tree).
        pid: i32,
        /// The callback's error.
        reason: String,
    },
    /// The buffered data of a pipe could not be read.
    #[error("process {pid}: fd {fd} (pipe:[{ino}]): {reason}")]
    Pipe {
        /// Pid.
        pid: i32,
        /// Descriptor.
        fd: i32,
        /// Pipe inode.
        ino: u64,
        /// Why.
        reason: String,
    },
    /// Some other state of the process cannot be checkpointed.
    #[error("process {pid}: {what} is not supported: {reason}")]
    Unsupported {
        /// Pid.
        pid: i32,
        /// What (e.g. "a timer").
        what: String,
        /// Why.
        reason: String,
    },
    /// A file descriptor cannot be checkpointed.
    #[error("process {pid}: fd {fd} ({target}) is not supported: {reason}")]
    UnsupportedFd {
        /// Pid.
        pid: i32,
        /// Descriptor.
        fd: i32,
        /// Link target.
        target: String,
        /// Why.
        reason: String,
    },
    /// A descriptor is in a state that cannot be checkpointed now but will pass soon (the
    /// program has not read what is queued for it yet): the caller may try again.
    #[error("process {pid}: fd {fd} ({target}): {reason}; checkpoint again in a moment")]
    Busy {
        /// Pid.
        pid: i32,
        /// Descriptor.
        fd: i32,
        /// Link target.
        target: String,
        /// Why.
        reason: String,
    },
    /// A mapping cannot be checkpointed.
    #[error("process {pid}: mapping {start:#x}-{end:#x} {path} is not supported: {reason}")]
    UnsupportedMapping {
        /// Pid.
        pid: i32,
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Path or name.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What happens to the process once it is dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterDump {
    /// Let it continue where it was (default).
    #[default]
    Resume,
    /// Kill it with SIGKILL while it is still frozen, so it cannot run past the checkpoint.
    /// (Only after a successful dump; on errors the process always resumes.)
    Kill,
    /// Leave it stopped: `SIGSTOP` is queued to every process while it is still frozen, so
    /// it runs no further instruction until a `SIGCONT` (or a `SIGKILL`), which are the
    /// caller's to send. (Only after a successful dump; on errors it resumes.) A caller that
    /// kills the program once its checkpoint is recorded uses this, so that a checkpoint
    /// failing after the dump can still let the program go on.
    Stop,
}

/// Options for [`dump_with`].
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// What to do with the process after a successful dump.
    pub after: AfterDump,
    /// Dump pages of private file mappings even if they are unmodified file pages (the image
    /// then no longer depends on the mapped files staying unchanged).
    pub dump_file_pages: bool,
    /// Terminals that a restore may replace with its own ([`FdKind::Tty`]), as (`st_dev`,
    /// `st_rdev`) of the device node: the devpts instance and the terminal in it.
    /// Empty: the terminals of the dumping process's own stdin, stdout and stderr (in a
    /// session, the terminal `forkpoint run` ran in). Any other terminal is refused: a program
    /// that drives a pseudo-terminal of its own must not be re-attached to the user's.
    pub terminals: Vec<(u64, u64)>,
    /// Dirty-page tracking across checkpoints: pages not written since the last committed
    /// checkpoint are taken from its image instead of being read ([`super::dirty`]). The
    /// tracking is armed again for the next dump only when the process runs on
    /// ([`AfterDump::Resume`]).
    pub dirty: Option<std::sync::Arc<std::sync::Mutex<super::dirty::DirtyTracker>>>,
    /// Directories whose files the caller records and recreates itself (a session's private
    /// `/dev/shm`). A deleted file there that a descriptor holds is kept like a memfd (its
    /// contents in the image) instead of being refused; restore leaves the files mapped
    /// from there unchecked ([`super::TreeRestoreOptions::recreated`]).
    pub own_dirs: Vec<std::path::PathBuf>,
    /// Do not wait for queues the program has not read (inotify events, unix connections not
    /// accepted): what is in them is left out of the image instead of the dump being
    /// [`DumpError::Busy`]. For a checkpoint that only keeps the state of a program about to
    /// be killed (a rollback's automatic one).
    pub lenient_queues: bool,
}

/// The terminals among this process's stdin, stdout and stderr, as (`st_dev`, `st_rdev`).
fn own_terminals() -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileTypeExt;
    (0..3)
        .filter_map(|fd| std::fs::metadata(format!("/proc/self/fd/{fd}")).ok())
        .filter(|m| m.file_type().is_char_device())
        .map(|m| (m.dev(), m.rdev()))
        .collect()
}

/// A raw line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsLine {
    /// Start.
    pub start: u64,
    /// End.
    pub end: u64,
    /// `rwxp` field.
    pub perms: String,
    /// Offset.
    pub offset: u64,
    /// Device `major:minor` (hex).
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// Path (may be empty, may contain spaces).
    pub path: String,
}

/// Parse the text of /proc/PID/maps.
pub fn parse_maps(text: &str) -> Result<Vec<MapsLine>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let mut rest = line;
        let mut fields = Vec::with_capacity(5);
        for _ in 0..5 {
            rest = rest.trim_start_matches(' ');
            let end = rest.find(' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let path = rest.trim_start_matches(' ').to_string();
        let bad = || format!("bad maps line: {line:?}");
        let (s, e) = fields[0].split_once('-').ok_or_else(bad)?;
        out.push(MapsLine {
            start: u64::from_str_radix(s, 16).map_err(|_| bad())?,
            end: u64::from_str_radix(e, 16).map_err(|_| bad())?,
            perms: fields[1].to_string(),
            offset: u64::from_str_radix(fields[2], 16).map_err(|_| bad())?,
            dev: fields[3].to_string(),
            inode: fields[4].parse().map_err(|_| bad())?,
            path,
        });
    }
    Ok(out)
}

/// Read /proc/PID/maps of `pid`.
pub fn read_maps(pid: i32) -> Result<Vec<MapsLine>, DumpError> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).map_err(|source| DumpError::Proc {
        pid,
        path: path.clone(),
        source,
    })?;
    parse_maps(&text).map_err(|detail| DumpError::Parse {
        pid,
        what: "maps",
        detail,
    })
}

/// `PROT_*` bits from the `rwxp` field.
pub fn prot_of(perms: &str) -> u32 {
    let b = perms.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'r') {
        p |= libc::PROT_READ as u32;
    }
    if b.get(1) == Some(&b'w') {
        p |= libc::PROT_WRITE as u32;
    }
    if b.get(2) == Some(&b'x') {
        p |= libc::PROT_EXEC as u32;
    }
    p
}

/// How the contents of a mapping are dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    /// Nothing (special, shared file).
    None,
    /// Present or swapped pages (private anonymous).
    Present,
    /// Only anonymous (copied-on-write) pages of a private file mapping.
    AnonOnly,
    /// Every page.
    All,
}

/// How a mapping is recorded, and which of its pages are read. In a tree dump (`tree`),
/// a file in shared memory mapped shared is read once for the whole tree by
/// [`shared_files`], not here through every process that maps it.
fn classify(
    pid: i32,
    l: &MapsLine,
    opts: &DumpOptions,
    tree: bool,
) -> Result<(Mapping, Contents), DumpError> {
    let shared = l.perms.as_bytes().get(3) == Some(&b's');
    let prot = prot_of(&l.perms);
    let unsupported = |reason: &str| DumpError::UnsupportedMapping {
        pid,
        start: l.start,
        end: l.end,
        path: l.path.clone(),
        reason: reason.to_string(),
    };
    let mut m = Mapping {
        start: l.start,
        end: l.end,
        prot,
        shared,
        offset: l.offset,
        path: if l.path.is_empty() {
            None
        } else {
            Some(l.path.clone())
        },
        kind: MappingKind::Anon,
        file: None,
        growsdown: false,
    };
    let anon_contents = if shared {
        Contents::All
    } else {
        Contents::Present
    };
    let anon_kind = if shared {
        MappingKind::AnonShared
    } else {
        MappingKind::Anon
    };
    let p = l.path.as_str();
    let contents = if p.is_empty() {
        m.kind = anon_kind;
        anon_contents
    } else if p.starts_with('[') {
        match p {
            "[heap]" => {
                m.kind = MappingKind::Heap;
                Contents::Present
            }
            "[stack]" => {
                m.kind = MappingKind::Stack;
                m.growsdown = true;
                Contents::Present
            }
            "[vdso]" => {
                m.kind = MappingKind::Vdso;
                Contents::None
            }
            "[vvar]" | "[vvar_vclock]" => {
                m.kind = MappingKind::Vvar;
                Contents::None
            }
            "[vsyscall]" => {
                m.kind = MappingKind::Vsyscall;
                Contents::None
            }
            _ if p.starts_with("[anon:") || p.starts_with("[anon_shmem:") => {
                m.kind = anon_kind;
                anon_contents
            }
            _ => return Err(unsupported("unknown special mapping")),
        }
    } else if p.starts_with("/SYSV") && p.ends_with(" (deleted)") && shared {
        // A SysV shared memory segment (the inode number is its id): attached again at
        // restore; the segment, with its contents, belongs to the IPC namespace, which the
        // caller records (a session does).
        let id = i32::try_from(l.inode).map_err(|_| unsupported("bad SysV shm id"))?;
        let size = sysv_shm_size(id)
            .ok_or_else(|| unsupported("the SysV segment is not in this IPC namespace"))?;
        if l.offset != 0 || l.end - l.start != size.div_ceil(PAGE_SIZE) * PAGE_SIZE {
            return Err(unsupported(
                "a partial attachment of a SysV segment (split by mprotect or munmap) is not supported",
            ));
        }
        m.kind = MappingKind::SysvShm { id };
        Contents::None
    } else if p.ends_with(" (deleted)") {
        // Deleted file, shared anonymous memory ("/dev/zero (deleted)"), memfd:
        // keep the contents, lose the file identity.
        m.kind = anon_kind;
        if tree && shared && l.inode != 0 {
            Contents::None
        } else {
            Contents::All
        }
    } else {
        let st = std::fs::metadata(p).map_err(|e| unsupported(&format!("cannot stat: {e}")))?;
        if !st.file_type().is_file() {
            return Err(unsupported("mapping of a non-regular file"));
        }
        if st.ino() != l.inode {
            // The path now names another file: keep the contents.
            m.kind = anon_kind;
            Contents::All
        } else {
            m.kind = MappingKind::File;
            m.file = Some(FileId::of(&st));
            if shared {
                Contents::None
            } else if opts.dump_file_pages {
                Contents::All
            } else {
                Contents::AnonOnly
            }
        }
    };
    // A mapping the tracee cannot access now (guard pages, address-space reservations, or
    // memory an allocator protected after use) keeps only the pages it has: nothing for a
    // reservation, the written pages of memory protected later.
    let contents = match contents {
        Contents::All if prot == 0 => Contents::Present,
        c => c,
    };
    Ok((m, contents))
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The all-threads-stopped state of a process. Dropping it restores and detaches every thread.
struct Frozen {
    tracers: Vec<Tracer>,
    /// The process was in a group stop (`SIGSTOP`, Ctrl-Z) when it was frozen; detaching
    /// leaves it so.
    stopped: bool,
}

impl Frozen {
    fn freeze(pid: i32) -> Result<Frozen, DumpError> {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(DumpError::NoSuchProcess { pid });
        }
        let status = read_proc(pid, "status")?;
        if let Some(tgid) = status_field(&status, "Tgid:").and_then(|v| v.parse::<i32>().ok()) {
            if tgid != pid {
                return Err(DumpError::NotAProcess { pid, tgid });
            }
        }
        // Read before the seize, which puts every thread in a ptrace stop.
        let stopped = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| stat_fields(&st).first() == Some(&"T"));
        let mut f = Frozen {
            tracers: Vec::new(),
            stopped,
        };
        let mut seen = BTreeSet::new();
        // The leader first.
        let t = Tracer::seize(pid, pid).map_err(|source| DumpError::Attach {
            pid,
            tid: pid,
            source,
        })?;
        f.tracers.push(t);
        seen.insert(pid);
        loop {
            let mut new = false;
            for tid in list_tasks(pid)? {
                if seen.contains(&tid) {
                    continue;
                }
                seen.insert(tid);
                new = true;
                match Tracer::seize(pid, tid) {
                    Ok(t) => f.tracers.push(t),
                    Err(source) => {
                        if std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                            return Err(DumpError::Attach { pid, tid, source });
                        }
                    }
                }
            }
            if !new {
                break;
            }
        }
        Ok(f)
    }
}

fn list_tasks(pid: i32) -> Result<Vec<i32>, DumpError> {
    let path = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&path).map_err(|source| DumpError::Proc {
        pid,
        path: path.clone(),
        source,
    })?;
    let mut v: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn read_proc(pid: i32, rel: &str) -> Result<String, DumpError> {
    let path = format!("/proc/{pid}/{rel}");
    std::fs::read_to_string(&path).map_err(|source| DumpError::Proc { pid, path, source })
}

fn read_link(pid: i32, rel: &str) -> Result<String, DumpError> {
    let path = format!("/proc/{pid}/{rel}");
    std::fs::read_link(&path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| DumpError::Proc { pid, path, source })
}

/// Dump process `pid` with default options. See the module documentation.
pub fn dump(pid: i32) -> Result<ProcessImage, DumpError> {
    dump_with(pid, &DumpOptions::default())
}

/// Dump process `pid`. The process is stopped for the duration of the call and continues
/// unchanged afterwards, also when an error is returned.
pub fn dump_with(pid: i32, opts: &DumpOptions) -> Result<ProcessImage, DumpError> {
    dump_frozen(pid, opts, &mut || Ok(()))
}

/// [`dump_with`], calling `on_frozen` once every thread is stopped and before anything is
/// read: the moment of the checkpoint, where the caller cuts the filesystem snapshot that
/// goes with the image. An error from `on_frozen` aborts the dump (the process resumes).
pub fn dump_frozen(
    pid: i32,
    opts: &DumpOptions,
    on_frozen: &mut dyn FnMut() -> Result<(), String>,
) -> Result<ProcessImage, DumpError> {
    let mut frozen = Frozen::freeze(pid)?;
    on_frozen().map_err(|reason| DumpError::Hook { pid, reason })?;
    let (mut image, taken) = read_frozen(pid, &mut frozen, opts, false)?;
    // A process killed after its dump: fill in before the kill, so that nothing can fail
    // once it is gone. One that runs on: after the thaw.
    if opts.after != AfterDump::Resume {
        fill_taken(&mut image, &taken)?;
    }
    finish(vec![(pid, frozen)], opts.after)?;
    fill_taken(&mut image, &taken)?;
    log_dumped(&image);
    Ok(image)
}

fn log_dumped(image: &ProcessImage) {
    log::debug!(
        "dumped process {}: {} threads, {} mappings, {} bytes of memory ({} inline)",
        image.pid,
        image.threads.len(),
        image.mappings.len(),
        image.memory.covered_bytes(),
        image.memory.inline_bytes()
    );
}

/// Steps 2 to 6 on a frozen process. Pipe fds are recorded (as [`FdKind::Pipe`]) only with
/// `allow_pipes`, otherwise refused.
fn read_frozen(
    pid: i32,
    frozen: &mut Frozen,
    opts: &DumpOptions,
    allow_pipes: bool,
) -> Result<(ProcessImage, Taken), DumpError> {
    let trace = |source| DumpError::Trace { pid, source };

    // A restored process has the restorer's seccomp filters (inherited). Filters of its own
    // are recorded by a tree dump (`recorded_seccomp`) and installed again at restore; the
    // kernel shows them only to a tracer under no filter, and they are suspended meanwhile
    // (`PTRACE_O_SUSPEND_SECCOMP`), so that nothing injected below can be refused or fatal.
    // Otherwise (strict mode, a single-process image, or a restorer under filters of its
    // own: a whole container under one profile) the process must have the same filters as
    // the restorer, compared by mode and count, or it is refused before anything is
    // injected: it would run outside its sandbox.
    let me = read_proc(std::process::id() as i32, "status")?;
    let seccomp = |text: &str| {
        (
            status_field(text, "Seccomp:")
                .unwrap_or("0")
                .trim()
                .to_string(),
            status_field(text, "Seccomp_filters:")
                .unwrap_or("0")
                .trim()
                .to_string(),
        )
    };
    let ours = seccomp(&me);
    let mut suspend = false;
    for tid in list_tasks(pid)? {
        let status = read_proc(pid, &format!("task/{tid}/status"))?;
        let (mode, count) = seccomp(&status);
        if allow_pipes && mode == "2" && ours.0 == "0" {
            suspend = true;
            continue;
        }
        if (mode.as_str(), count.as_str()) != (ours.0.as_str(), ours.1.as_str()) {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "thread {tid} under seccomp {}",
                    if mode == "1" {
                        "strict mode".to_string()
                    } else {
                        format!("filters ({count}, the restorer has {})", ours.1)
                    }
                ),
                reason: if mode == "1" {
                    "strict mode is not restored, and the program would run without its \
                     sandbox"
                        .into()
                } else {
                    "filters are recorded only in a session's checkpoint made by a process \
                     under none, and the program would run without its sandbox"
                        .into()
                },
            });
        }
    }
    if suspend {
        let opts = libc::PTRACE_O_TRACESYSGOOD as usize | super::tracer::PTRACE_O_SUSPEND_SECCOMP;
        for t in &frozen.tracers {
            match t.set_options(opts) {
                Ok(()) => {}
                // Suspending (and reading) filters takes CAP_SYS_ADMIN in the initial user
                // namespace: say what is missing rather than which request failed.
                Err(super::tracer::TraceError::Ptrace {
                    source: nix::errno::Errno::EPERM,
                    ..
                }) => {
                    return Err(DumpError::Unsupported {
                        pid,
                        what: format!("thread {} under seccomp filters of its own", t.tid()),
                        reason: "reading them takes CAP_SYS_ADMIN in the initial user \
                                 namespace, which this checkpoint does not have"
                            .into(),
                    })
                }
                Err(e) => return Err(trace(e)),
            }
        }
    }

    // A root directory other than the caller's (chroot) is not recorded either.
    let root = read_link(pid, "root")?;
    let ours = std::fs::read_link("/proc/self/root").map_err(|source| DumpError::Proc {
        pid,
        path: "/proc/self/root".into(),
        source,
    })?;
    if std::path::Path::new(&root) != ours {
        return Err(DumpError::Unsupported {
            pid,
            what: format!("a root directory of its own ({root})"),
            reason: "chroot is not restored yet".into(),
        });
    }

    let t0 = std::time::Instant::now();
    // 2. Mappings (before we add our scratch page).
    let lines = read_maps(pid)?;
    let mut mappings = Vec::with_capacity(lines.len());
    let mut contents = Vec::with_capacity(lines.len());
    for l in &lines {
        let (m, c) = classify(pid, l, opts, allow_pipes)?;
        mappings.push(m);
        contents.push(c);
    }

    // POSIX timers (timer_create): what /proc says; the time left comes from timer_gettime.
    let mut posix_timers = match read_proc(pid, "timers") {
        Ok(text) => parse_timers(pid, &text)?,
        Err(e) => {
            log::warn!("process {pid}: cannot tell whether it has POSIX timers: {e}");
            Vec::new()
        }
    };
    // 3. Injected queries, with every signal blocked in every thread (the masks are put back
    //    in any case): nothing is delivered on the way back from an injected syscall, so a
    //    timer that fires meanwhile leaves its signal in the queue, which is read afterwards.
    let masks: Vec<u64> = frozen
        .tracers
        .iter()
        .map(|t| t.sigmask())
        .collect::<Result<_, _>>()
        .map_err(trace)?;
    let queried = (|| {
        for t in &frozen.tracers {
            t.set_sigmask(!0)?;
        }
        let insn = frozen.tracers[0].locate_syscall_insn()?;
        for t in &mut frozen.tracers {
            t.set_syscall_insn(insn);
        }
        let injected = injected_queries(frozen, &mut posix_timers)?;
        let signals = pending_signals(frozen)?;
        Ok((injected, signals))
    })();
    for (t, m) in frozen.tracers.iter().zip(&masks) {
        t.set_sigmask(*m).map_err(trace)?;
    }
    let ((sigactions, brk, per_thread, itimers), mut signals) = queried.map_err(trace)?;
    signals.itimers = itimers;
    signals.posix_timers = posix_timers;

    let t_queries = t0.elapsed();
    // 4. Threads.
    let mut threads = Vec::with_capacity(frozen.tracers.len());
    for ((t, (alt, ctid)), sigmask) in frozen.tracers.iter().zip(per_thread).zip(masks) {
        let tid = t.tid();
        let regs = t.regs().map_err(trace)?;
        let rseq = t.rseq().map_err(trace)?.and_then(|r| {
            (r.pointer != 0).then_some(RseqState {
                pointer: r.pointer,
                size: r.size,
                signature: r.signature,
            })
        });
        threads.push(ThreadState {
            tid,
            comm: read_proc(pid, &format!("task/{tid}/comm"))
                .map(|s| s.trim_end_matches('\n').to_string())
                .unwrap_or_default(),
            regs: Regs::from(&regs),
            xstate: t.xstate().map_err(trace)?,
            fs_base: regs.fs_base,
            gs_base: regs.gs_base,
            sigmask,
            sigaltstack: alt,
            clear_child_tid: ctid,
            robust_list: sys::get_robust_list(tid).unwrap_or((0, 0)),
            rseq,
        });
    }

    let t_threads = t0.elapsed();
    // 5. Memory.
    let mut tracker = opts
        .dirty
        .as_ref()
        .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()));
    let (memory, scanned, reused) = dump_memory(
        pid,
        &mut frozen.tracers[0],
        &mappings,
        &contents,
        tracker.as_deref(),
    )?;
    if let Some(t) = tracker.as_mut() {
        t.reused_pages += reused;
    }
    // The pages the dump took from the last image, kept for filling them in after the thaw
    // (re-arming below may replace what the tracker remembers).
    let taken = tracker
        .as_ref()
        .filter(|_| memory.runs.iter().any(|r| r.data == PageData::Base))
        .and_then(|t| t.remembered(pid));

    let t_memory = t0.elapsed();
    // 6. /proc state.
    let terminals = if opts.terminals.is_empty() {
        own_terminals()
    } else {
        opts.terminals.clone()
    };
    let fds = dump_fds(
        pid,
        allow_pipes,
        &terminals,
        &opts.own_dirs,
        // In a tree the queues were found empty before the freeze (unread_events): what
        // is queued now came during the freeze (the dump's own reads of /dev/shm among
        // it), after the cut. Refusing here would come after the memory was scanned.
        opts.lenient_queues || allow_pipes,
    )?;
    let locks = dump_locks(pid, &fds)?;
    let status = read_proc(pid, "status")?;
    let creds = parse_creds(pid, &status)?;
    // A tree records no_new_privs itself (TreeImage::no_new_privs); a single process cannot.
    check_capabilities(pid, &status, &me, &creds, !allow_pipes)?;
    let umask = status_field(&status, "Umask:")
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0o022);
    let personality = read_proc(pid, "personality")
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let mut rlimits = Vec::new();
    for resource in 0..16u32 {
        if let Ok((cur, max)) = sys::get_rlimit(pid, resource) {
            rlimits.push(Rlimit { resource, cur, max });
        }
    }
    let t_fds = t0.elapsed();
    // 7. Dirty-page tracking for the next checkpoint (everything above is read). Not for a
    //    process under a seccomp filter: the injected userfaultfd() could be its death.
    let filtered = status_field(&status, "Seccomp:").map(str::trim) == Some("2");
    if let Some(tracker) = tracker.as_mut().filter(|_| filtered) {
        tracker.drop_process(pid);
    }
    // A process that does not run on (killed after the dump) needs no tracking.
    if let Some(mut tracker) = tracker.filter(|_| !filtered && opts.after != AfterDump::Kill) {
        let ranges: Vec<(u64, u64)> = mappings
            .iter()
            .zip(&contents)
            .filter(|(m, c)| !m.shared && matches!(c, Contents::Present | Contents::AnonOnly))
            .map(|(m, _)| (m.start, m.end))
            .collect();
        let t = &mut frozen.tracers[0];
        tracker.arm(pid, &ranges, &scanned, || {
            make_uffd(pid, t).and_then(super::dirty::init)
        });
    }

    log::debug!(
        "process {pid}: mappings and queries {t_queries:?}, threads {:?}, memory {:?}, fds {:?}, tracking {:?}",
        t_threads - t_queries,
        t_memory - t_threads,
        t_fds - t_memory,
        t0.elapsed() - t_fds
    );
    let stat = read_proc(pid, "stat")?;
    let (pgid, sid) = parse_pgid_sid(pid, &stat)?;
    let mut mm = parse_mm(pid, &stat)?;
    mm.brk = brk;
    if let Ok(aux) = std::fs::read(format!("/proc/{pid}/auxv")) {
        mm.auxv = aux
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
    }
    let image = ProcessImage {
        pid,
        comm: read_proc(pid, "comm")?.trim_end_matches('\n').to_string(),
        exe: read_link(pid, "exe").ok(),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        threads,
        mappings,
        memory,
        mm,
        fds,
        creds,
        cwd: read_link(pid, "cwd")?,
        umask,
        personality,
        pgid,
        sid,
        rlimits,
        sigactions,
        signals,
        locks,
    };
    Ok((image, taken))
}

/// The file locks `pid` holds through its descriptors on files and directories: the `lock:`
/// lines of each one's fdinfo (the kernel lists there the locks taken through that open
/// file and owned by it or by this process).
fn dump_locks(pid: i32, fds: &[FdState]) -> Result<Vec<FileLock>, DumpError> {
    let mut out = Vec::new();
    for f in fds
        .iter()
        .filter(|f| matches!(f.kind, FdKind::Regular | FdKind::Directory))
    {
        let info = read_proc(pid, &format!("fdinfo/{}", f.fd))?;
        for line in info.lines().filter_map(|l| l.strip_prefix("lock:")) {
            out.push(
                parse_lock(line, f.fd).map_err(|reason| DumpError::UnsupportedFd {
                    pid,
                    fd: f.fd,
                    target: f.path.clone(),
                    reason,
                })?,
            );
        }
    }
    Ok(out)
}

/// One `lock:` line of an fdinfo, after the prefix: `1: POSIX  ADVISORY  WRITE 27749
/// 00:28:4 0 9` (the last two: first and last byte, or `EOF`).
fn parse_lock(line: &str, fd: i32) -> Result<FileLock, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("cannot read the file lock {:?}", line.trim());
    if w.len() < 8 {
        return Err(bad());
    }
    let kind = match w[1] {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        other => {
            return Err(format!(
                "holds a {other} on the file, which is not supported"
            ))
        }
    };
    if w[2] != "ADVISORY" {
        return Err(format!("holds a {} lock, which is not supported", w[2]));
    }
    let write = match w[3] {
        "WRITE" => true,
        "READ" => false,
        _ => return Err(bad()),
    };
    let start = w[6].parse::<u64>().map_err(|_| bad())?;
    let end = match w[7] {
        "EOF" => None,
        n => Some(n.parse::<u64>().map_err(|_| bad())?),
    };
    Ok(FileLock {
        fd,
        kind,
        write,
        start,
        end,
    })
}

/// The pages of the last image a tracked dump took (as [`PageData::Base`] runs) without
/// reading them, to be filled in by [`fill_taken`] once the process runs again.
type Taken = Option<std::sync::Arc<std::collections::BTreeMap<u64, PageData>>>;

/// Fills in what [`read_frozen`] took from the last image.
fn fill_taken(img: &mut ProcessImage, taken: &Taken) -> Result<(), DumpError> {
    match taken {
        Some(prev) => resolve_taken(img.pid, &mut img.memory, prev),
        None => Ok(()),
    }
}

/// A userfaultfd for the memory of `pid`: made by a syscall injected into it (with every
/// signal blocked in the injecting thread), taken over with `pidfd_getfd`, closed there.
pub(crate) fn make_uffd(pid: i32, t: &mut Tracer) -> Result<std::os::fd::OwnedFd, String> {
    make_uffd_with(pid, t, super::dirty::UFFD_FLAGS)
}

/// [`make_uffd`] with the `userfaultfd` flags given.
pub(crate) fn make_uffd_with(
    pid: i32,
    t: &mut Tracer,
    flags: u64,
) -> Result<std::os::fd::OwnedFd, String> {
    let mask = t.sigmask().map_err(|e| e.to_string())?;
    t.set_sigmask(!0).map_err(|e| e.to_string())?;
    let res = (|| {
        let fd = t
            .syscall(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])
            .map_err(|e| format!("userfaultfd: {e}"))?;
        let ours = super::unix::take_fd(pid, fd as i32).map_err(|e| format!("pidfd_getfd: {e}"));
        let closed = t
            .syscall(libc::SYS_close, [fd, 0, 0, 0, 0, 0])
            .map_err(|e| format!("close: {e}"));
        let ours = ours?;
        closed?;
        Ok(ours)
    })();
    t.set_sigmask(mask).map_err(|e| e.to_string())?;
    res
}

/// Hands process `pid`, lazily restored from `mem` with its private anonymous memory in
/// `lazy_ranges`, over from `lazy` (every page in) to dirty-page tracking: stopped, the pages
/// it wrote since the restore are read from the write-protection the fill copied pages in
/// with, the fill lets go of it, and `tracker` is armed on `ranges` (as after an eager
/// restore) remembering the image's pages but those written, those outside `lazy_ranges`
/// and, if image memory moved meanwhile, all of them. On error the process is simply not
/// tracked (its next dump reads all of it).
pub fn track_after_lazy(
    pid: i32,
    lazy: &super::lazy::LazyFill,
    tracker: &std::sync::Mutex<super::dirty::DirtyTracker>,
    lazy_ranges: &[(u64, u64)],
    ranges: &[(u64, u64)],
    mem: &ImageMemory,
) -> Result<(), DumpError> {
    let mut frozen = match Frozen::freeze(pid) {
        Ok(f) => f,
        Err(e) => {
            lazy.release(pid);
            tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drop_process(pid);
            return Err(e);
        }
    };
    // The pages seen present and not written since they were copied in: only those are the
    // image's. (A page the fill still serves after this scan, a zero page for a dropped
    // one say, is not among them, and is read again by the next dump.)
    let scanned = (|| -> Result<Vec<(u64, u64)>, String> {
        if !lazy.tracks_writes(pid) {
            return Err("its pages were copied in without write-protection".into());
        }
        // The userfaultfd() injected below could be the death of a filtered process.
        let status = read_proc(pid, "status").map_err(|e| e.to_string())?;
        if status_field(&status, "Seccomp:").map(str::trim) == Some("2") {
            return Err("it is under a seccomp filter".into());
        }
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| format!("pagemap: {e}"))?;
        let mut clean = Vec::new();
        for &(s, e) in lazy_ranges {
            for (a, b, cats) in super::dirty::scan_only(&pagemap, s, e)
                .map_err(|err| format!("scanning {s:#x}-{e:#x}: {err}"))?
            {
                if cats & super::dirty::PAGE_IS_WRITTEN == 0
                    && cats & super::dirty::PAGE_IS_PRESENT != 0
                {
                    clean.push((a, b));
                }
            }
        }
        clean.sort_unstable();
        Ok(clean)
    })();
    let moved = lazy.release(pid);
    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
    let clean = match (scanned, moved) {
        (Ok(c), false) => c,
        (Err(e), _) => {
            log::debug!("process {pid}: not tracked after the lazy restore: {e}");
            t.drop_process(pid);
            return Ok(());
        }
        (Ok(_), true) => {
            log::debug!("process {pid}: not tracked after the lazy restore: memory moved");
            t.drop_process(pid);
            return Ok(());
        }
    };
    let Some(tracer) = frozen.tracers.first_mut() else {
        t.drop_process(pid);
        return Ok(());
    };
    t.arm(pid, ranges, &[], || {
        tracer.locate_syscall_insn().map_err(|e| e.to_string())?;
        make_uffd(pid, tracer).and_then(super::dirty::init)
    });
    // The image stays the base the next image may be a delta against.
    let base = t.base;
    t.remember_one(pid, mem);
    t.base = base;
    let is_clean = |a: u64| {
        let i = clean.partition_point(|&(_, e)| e <= a);
        clean.get(i).is_some_and(|&(s, _)| s <= a)
    };
    t.forget_pages(pid, |a| !is_clean(a));
    if t.tracks(pid) {
        log::debug!(
            "process {pid}: tracked after the lazy restore ({} clean ranges)",
            clean.len()
        );
    }
    Ok(())
}

/// [`track_after_lazy`] for every process of `tree` that `lazy` filled (every page in),
/// once restored from `tree`.
pub fn track_tree_after_lazy(
    tree: &TreeImage,
    lazy: &super::lazy::LazyFill,
    tracker: &std::sync::Mutex<super::dirty::DirtyTracker>,
) {
    for super::lazy::Handed {
        pid,
        image_pid,
        ranges: lazy_ranges,
        ..
    } in lazy.processes()
    {
        let Some(img) = tree
            .processes
            .iter()
            .find(|m| m.pid == image_pid)
            .and_then(|m| m.live())
        else {
            continue;
        };
        let ranges = super::restore::tracked_ranges(img);
        if let Err(e) = track_after_lazy(pid, lazy, tracker, &lazy_ranges, &ranges, &img.memory) {
            log::debug!("process {pid}: not tracked after the lazy restore: {e}");
        }
    }
}

/// Step 7 for every frozen process: thaw (explicitly, to report errors) or kill. With
/// [`AfterDump::Kill`] every process is sent `SIGKILL` before any is waited for.
fn finish(procs: Vec<(i32, Frozen)>, after: AfterDump) -> Result<(), DumpError> {
    match after {
        AfterDump::Resume => {
            let mut res = Ok(());
            for (pid, mut frozen) in procs {
                for t in frozen.tracers.drain(..) {
                    if let Err(source) = t.detach() {
                        res = Err(DumpError::Trace { pid, source });
                    }
                }
            }
            res
        }
        AfterDump::Stop => {
            for (i, (pid, _)) in procs.iter().enumerate() {
                if let Err(e) = sys::kill(*pid, libc::SIGSTOP) {
                    // Let the ones already told to stop go on, as a failed dump does.
                    for (p, _) in &procs[..i] {
                        let _ = sys::kill(*p, libc::SIGCONT);
                    }
                    return Err(DumpError::Trace {
                        pid: *pid,
                        source: TraceError::Ptrace {
                            tid: *pid,
                            op: "kill(SIGSTOP)",
                            source: e,
                        },
                    });
                }
            }
            finish(procs, AfterDump::Resume)
        }
        AfterDump::Kill => {
            for (pid, _) in &procs {
                sys::kill(*pid, libc::SIGKILL).map_err(|e| DumpError::Trace {
                    pid: *pid,
                    source: TraceError::Ptrace {
                        tid: *pid,
                        op: "kill(SIGKILL)",
                        source: e,
                    },
                })?;
            }
            for (pid, mut frozen) in procs {
                // Non-leader threads first: the leader is reported only once the group is
                // empty.
                while let Some(t) = frozen.tracers.pop() {
                    t.wait_exit()
                        .map_err(|source| DumpError::Trace { pid, source })?;
                }
            }
            Ok(())
        }
    }
}

/// A member of a tree while it is being dumped.
enum Held {
    Live(Frozen),
    Zombie { status: i32, pgid: i32, sid: i32 },
}

/// Fields of /proc/PID/stat after the comm, numbered as in proc(5) (3 = state).
fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

fn stat_num(f: &[&str], n: usize) -> Option<i64> {
    f.get(n.checked_sub(3)?).and_then(|v| v.parse().ok())
}

/// Freeze `pid`, or record it as a zombie; `None` if it is gone.
fn hold(pid: i32) -> Result<Option<Held>, DumpError> {
    let zombie = |stat: &str| -> Option<Held> {
        let f = stat_fields(stat);
        (f.first() == Some(&"Z")).then(|| Held::Zombie {
            status: stat_num(&f, 52).unwrap_or(0) as i32,
            pgid: stat_num(&f, 5).unwrap_or(0) as i32,
            sid: stat_num(&f, 6).unwrap_or(0) as i32,
        })
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Ok(None);
    };
    if let Some(z) = zombie(&stat) {
        return Ok(Some(z));
    }
    match Frozen::freeze(pid) {
        Ok(f) => Ok(Some(Held::Live(f))),
        Err(e) => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Ok(None),
            Ok(stat) => match zombie(&stat) {
                Some(z) => Ok(Some(z)),
                None => Err(e),
            },
        },
    }
}

/// Parent pid → child pids (ascending), from /proc/*/stat.
fn children_map() -> std::collections::BTreeMap<i32, Vec<i32>> {
    let mut m: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return m;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ppid) = stat_num(&stat_fields(&stat), 4) {
            m.entry(ppid as i32).or_default().push(pid);
        }
    }
    for v in m.values_mut() {
        v.sort_unstable();
    }
    m
}

/// A process outside `tree` that has pipe `ino` open, if any.
fn outside_holder(want: &str, tree: &BTreeSet<i32>) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want) {
                return Some(pid);
            }
        }
    }
    None
}

/// The unix socket pairs held by the members, with their queued messages, and the listening
/// TCP sockets. Refused: another network socket, a unix socket with an address (bound,
/// listening or connected to a named socket), one whose peer is outside the tree or gone,
/// and messages carrying descriptors.
fn socket_pairs(
    processes: &[TreeMember],
    known: &BTreeSet<i32>,
) -> Result<(Vec<SocketPairImage>, Vec<BoundSocket>), DumpError> {
    use super::unix;
    // Socket inode → its first holder (pid, fd).
    let mut held: std::collections::BTreeMap<u64, (i32, i32)> = Default::default();
    for m in processes {
        for f in m.live().map(|p| p.fds.as_slice()).unwrap_or(&[]) {
            if let FdKind::UnixSocket { ino } = f.kind {
                held.entry(ino).or_insert((m.pid, f.fd));
            }
        }
    }
    if held.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut listeners = Vec::new();
    let (pid0, fd0) = held.values().next().copied().unwrap_or_default();
    let diag = unix::unix_sockets().map_err(|e| DumpError::UnsupportedFd {
        pid: pid0,
        fd: fd0,
        target: "socket".into(),
        reason: format!("listing unix sockets (NETLINK_SOCK_DIAG): {e}"),
    })?;
    let mut out = Vec::new();
    for (&ino, &(pid, fd)) in &held {
        let refuse = |reason: String| DumpError::UnsupportedFd {
            pid,
            fd,
            target: format!("socket:[{ino}]"),
            reason,
        };
        let Some(d) = diag.get(&ino) else {
            if let Some(l) = inet_socket_image(pid, fd, ino)? {
                listeners.push(l);
                continue;
            }
            return Err(refuse(match inet_socket(ino) {
                Some(what) => format!(
                    "{what}: network sockets cannot be checkpointed (only unix socket pairs \
                     inside the tree)"
                ),
                None => "only unix socket pairs inside the tree are supported (this is not a \
                         unix socket)"
                    .into(),
            }));
        };
        if !d.name.is_empty() && d.state == unix::LISTEN {
            listeners.push(unix_listener(pid, fd, ino, d)?);
            continue;
        }
        // A datagram socket that is unbound, bound, or connected to a named socket outside
        // the tree (syslog's /dev/log) is made again from its addresses.
        let dgram = i32::from(d.kind) == libc::SOCK_DGRAM;
        let peer_outside = d.peer != 0 && !held.contains_key(&d.peer);
        // Connected to a named datagram socket of the tree that is not connected back (a
        // server any client sends to): reconnected by name once that one is bound again.
        let to_named = d.peer != 0
            && diag
                .get(&d.peer)
                .is_some_and(|p| p.peer != ino && !p.name.is_empty());
        if dgram && (d.peer == 0 || peer_outside || to_named) {
            listeners.push(unix_datagram(pid, fd, ino, d, &diag)?);
            continue;
        }
        if !d.name.is_empty() && d.peer == 0 {
            return Err(refuse(format!(
                "the unix socket is bound to {:?} but neither listening nor connected; not \
                 supported yet",
                String::from_utf8_lossy(&d.name)
            )));
        }
        // A connection accepted from (or made to) a named socket is a pair like any other
        // once both ends are in the tree; the names are not kept.
        let stream = d.kind as i32 == libc::SOCK_STREAM;
        let end = |pid: i32, fd: i32, ino: u64| -> Result<SocketEnd, DumpError> {
            let refuse = |reason: String| DumpError::UnsupportedFd {
                pid,
                fd,
                target: format!("socket:[{ino}]"),
                reason,
            };
            let sock = unix::take_fd(pid, fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
            let shutdown = diag.get(&ino).map_or(0, |d| d.shutdown);
            let (sndbuf, rcvbuf) =
                unix::buffer_sizes(&sock).map_err(|e| refuse(format!("getsockopt: {e}")))?;
            let opt = |o: i32| {
                unix::getsockopt_int(&sock, libc::SOL_SOCKET, o)
                    .map_err(|e| refuse(format!("getsockopt: {e}")))
            };
            let (peek_off, passcred) = (opt(libc::SO_PEEK_OFF)?, opt(libc::SO_PASSCRED)? != 0);
            // A message is never larger than the sender's buffer; allow generously.
            let max = (sndbuf.max(rcvbuf) as usize).max(256 << 10) * 2;
            let queue = unix::peek_queue(&sock, max, stream, shutdown & 1 != 0)
                .map_err(|e| refuse(format!("reading the queued messages: {e}")))?;
            Ok(SocketEnd {
                ino,
                queue: queue.into_iter().map(Message).collect(),
                shutdown,
                sndbuf,
                rcvbuf,
                peek_off,
                passcred,
            })
        };
        let peer = d.peer;
        let stream_like =
            d.kind as i32 == libc::SOCK_STREAM || d.kind as i32 == libc::SOCK_SEQPACKET;
        if peer == 0 && stream_like && d.shutdown == 3 {
            // The other end was closed (the kernel shut both directions down): what is left
            // is the queue, then end of file, and EPIPE on writes. Recorded as a pair whose
            // other end (inode 0) is closed again at restore.
            out.push(SocketPairImage {
                kind: d.kind as i32,
                ends: [
                    end(pid, fd, ino)?,
                    SocketEnd {
                        ino: 0,
                        queue: Vec::new(),
                        shutdown: 3,
                        sndbuf: 0,
                        rcvbuf: 0,
                        peek_off: -1,
                        passcred: false,
                    },
                ],
            });
            continue;
        }
        if peer == 0 {
            return Err(refuse(
                "the unix socket is not connected, which is not supported yet".into(),
            ));
        }
        if peer < ino && held.contains_key(&peer) {
            continue; // the pair was recorded with its first end
        }
        let Some(&(ppid, pfd)) = held.get(&peer) else {
            let why = match outside_holder(&format!("socket:[{peer}]"), known) {
                Some(other) => format!("the other end is held by process {other} outside the tree"),
                None => "the other end is not held inside the tree".into(),
            };
            return Err(refuse(why));
        };
        if diag.get(&peer).map(|p| p.peer) != Some(ino) {
            return Err(refuse(format!(
                "socket:[{peer}] is connected to it but not it to socket:[{peer}] (a datagram socket connected to another); not supported yet"
            )));
        }
        out.push(SocketPairImage {
            kind: d.kind as i32,
            ends: [end(pid, fd, ino)?, end(ppid, pfd, peer)?],
        });
    }
    Ok((out, listeners))
}

/// The TCP/IP socket `ino` (`fd` of `pid`) as a [`BoundSocket`], if it is one that is made
/// again from its addresses: a listening TCP socket (address, backlog, options; connections
/// waiting to be accepted are not part of the checkpoint: their clients are outside, and
/// the program that runs on accepts them) or a UDP socket (addresses, options; what is
/// queued on it is not kept: UDP may drop datagrams, and the program cannot tell). Any
/// other socket is `None`.
fn inet_socket_image(pid: i32, fd: i32, ino: u64) -> Result<Option<BoundSocket>, DumpError> {
    use super::unix;
    let refuse = |reason: String| DumpError::UnsupportedFd {
        pid,
        fd,
        target: format!("socket:[{ino}]"),
        reason,
    };
    let sock = unix::take_fd(pid, fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
    let opt = |level, name| unix::getsockopt_int(&sock, level, name);
    let family = opt(libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return Ok(None);
    }
    let (kind, protocol) = (
        opt(libc::SOL_SOCKET, libc::SO_TYPE),
        opt(libc::SOL_SOCKET, libc::SO_PROTOCOL),
    );
    let (kind, backlog, mut wanted) = match (kind, protocol) {
        (Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP)) => {
            // Listening if the kernel's socket table says so, with its backlog (which
            // /proc/net/tcp does not show).
            let Some(backlog) = unix::tcp_listen_backlog(family, ino)
                .map_err(|e| refuse(format!("reading its backlog (NETLINK_SOCK_DIAG): {e}")))?
            else {
                return Ok(None);
            };
            let options = vec![
                (libc::SOL_SOCKET, libc::SO_REUSEADDR),
                (libc::SOL_SOCKET, libc::SO_REUSEPORT),
                (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
                (libc::IPPROTO_TCP, libc::TCP_NODELAY),
                (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
            ];
            (libc::SOCK_STREAM, Some(backlog), options)
        }
        (Ok(libc::SOCK_DGRAM), Ok(libc::IPPROTO_UDP)) => {
            let options = vec![
                (libc::SOL_SOCKET, libc::SO_REUSEADDR),
                (libc::SOL_SOCKET, libc::SO_REUSEPORT),
                (libc::SOL_SOCKET, libc::SO_BROADCAST),
            ];
            (libc::SOCK_DGRAM, None, options)
        }
        _ => return Ok(None),
    };
    if family == libc::AF_INET6 {
        wanted.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
    }
    let (addr, peer) = socket_addrs(&sock).map_err(|e| refuse(format!("its addresses: {e}")))?;
    let mut options = Vec::new();
    for (level, name) in wanted {
        let v =
            opt(level, name).map_err(|e| refuse(format!("getsockopt({level}, {name}): {e}")))?;
        options.push((level, name, v));
    }
    Ok(Some(BoundSocket {
        ino,
        family,
        kind,
        addr,
        listening: backlog.is_some(),
        backlog: backlog.unwrap_or(0),
        // A listener has no peer; a UDP socket's is where it sends.
        peer: if backlog.is_some() { Vec::new() } else { peer },
        dir: String::new(),
        file: None,
        options,
    }))
}

/// Permission bits, owner and group of the socket file a unix address names (a path, taken
/// from `dir` when relative), if it is one.
fn socket_file(addr: &[u8], dir: &str) -> Option<(u32, u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let p = addr
        .get(2..)
        .filter(|p| p.first().is_some_and(|c| *c != 0))?;
    let end = p.iter().position(|c| *c == 0).unwrap_or(p.len());
    let path = std::path::Path::new(dir).join(std::ffi::OsStr::from_bytes(&p[..end]));
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type()
        .is_socket()
        .then(|| (m.mode() & 0o7777, m.uid(), m.gid()))
}

/// `getsockname` and `getpeername` (empty when not connected) of a socket.
fn socket_addrs(sock: &std::os::fd::OwnedFd) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    use std::os::fd::AsRawFd;
    let mut local = [0u8; 128];
    let mut llen = local.len() as libc::socklen_t;
    // SAFETY: getsockname writes at most `llen` bytes into `local` and updates `llen`.
    if unsafe { libc::getsockname(sock.as_raw_fd(), local.as_mut_ptr().cast(), &mut llen) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut peer = [0u8; 128];
    let mut plen = peer.len() as libc::socklen_t;
    // SAFETY: getpeername writes at most `plen` bytes into `peer` and updates `plen`.
    let r = unsafe { libc::getpeername(sock.as_raw_fd(), peer.as_mut_ptr().cast(), &mut plen) };
    let peer = if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(e);
        }
        Vec::new()
    } else {
        peer[..(plen as usize).min(128)].to_vec()
    };
    Ok((local[..(llen as usize).min(128)].to_vec(), peer))
}

/// The unix datagram socket `ino` (`fd` of `pid`, described by `d`) that is unbound, bound,
/// or connected to a named socket outside the tree: made again from its name and its
/// peer's. Datagrams queued for it are refused (a unix datagram socket does not drop them).
fn unix_datagram(
    pid: i32,
    fd: i32,
    ino: u64,
    d: &super::unix::UnixDiag,
    diag: &std::collections::BTreeMap<u64, super::unix::UnixDiag>,
) -> Result<BoundSocket, DumpError> {
    use super::unix;
    let refuse = |reason: String| DumpError::UnsupportedFd {
        pid,
        fd,
        target: format!("socket:[{ino}]"),
        reason,
    };
    if d.pending > 0 {
        return Err(refuse(format!(
            "{} bytes are queued on a datagram socket whose peer is outside the tree; not \
             supported yet",
            d.pending
        )));
    }
    let peer = if d.peer == 0 {
        Vec::new()
    } else {
        let name = diag
            .get(&d.peer)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(refuse(
                "the datagram socket is connected to an unnamed socket outside the tree".into(),
            ));
        }
        let mut a = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&name);
        if name.first() != Some(&0) && name.last() != Some(&0) {
            a.push(0);
        }
        a
    };
    let sock = unix::take_fd(pid, fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
    let (addr, _) = socket_addrs(&sock).map_err(|e| refuse(format!("its addresses: {e}")))?;
    let passcred = unix::getsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_PASSCRED)
        .map_err(|e| refuse(format!("getsockopt(SO_PASSCRED): {e}")))?;
    let dir = relative_dir(pid, &[&addr, &peer])?;
    let file = socket_file(&addr, &dir);
    Ok(BoundSocket {
        ino,
        family: libc::AF_UNIX,
        kind: libc::SOCK_DGRAM,
        addr,
        listening: false,
        backlog: 0,
        peer,
        dir,
        file,
        options: vec![(libc::SOL_SOCKET, libc::SO_PASSCRED, passcred)],
    })
}

/// The directory relative unix socket names among `addrs` (raw `sockaddr_un`s) were taken
/// from: the binder's working directory then, of which `pid`'s now is the best guess;
/// empty when every name is absolute or abstract.
fn relative_dir(pid: i32, addrs: &[&[u8]]) -> Result<String, DumpError> {
    let relative = |a: &&[u8]| a.get(2).is_some_and(|c| *c != 0 && *c != b'/');
    if addrs.iter().any(relative) {
        read_link(pid, "cwd")
    } else {
        Ok(String::new())
    }
}

/// The listening unix socket `ino` (`fd` of `pid`, described by `d`): its address, kind,
/// backlog and `SO_PASSCRED`. Connections still waiting to be accepted were found by
/// [`unread_events`] before the freeze; one that arrives after it comes from outside and is
/// not part of the checkpoint.
fn unix_listener(
    pid: i32,
    fd: i32,
    ino: u64,
    d: &super::unix::UnixDiag,
) -> Result<BoundSocket, DumpError> {
    use super::unix;
    let refuse = |reason: String| DumpError::UnsupportedFd {
        pid,
        fd,
        target: format!("socket:[{ino}]"),
        reason,
    };
    let sock = unix::take_fd(pid, fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
    let (addr, _) = socket_addrs(&sock).map_err(|e| refuse(format!("its address: {e}")))?;
    let passcred = unix::getsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_PASSCRED)
        .map_err(|e| refuse(format!("getsockopt(SO_PASSCRED): {e}")))?;
    let dir = relative_dir(pid, &[&addr])?;
    let file = socket_file(&addr, &dir);
    Ok(BoundSocket {
        ino,
        family: libc::AF_UNIX,
        kind: i32::from(d.kind),
        addr,
        listening: true,
        backlog: d.backlog,
        peer: Vec::new(),
        dir,
        file,
        options: vec![(libc::SOL_SOCKET, libc::SO_PASSCRED, passcred)],
    })
}

/// Copy the data buffered in the pipe behind `pid`'s `fd` without consuming it: open a new
/// read end through /proc, `tee` into a pipe of ours with the same capacity and read that.
fn read_pipe(pid: i32, fd: i32, ino: u64) -> Result<PipeImage, DumpError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |reason: String| DumpError::Pipe {
        pid,
        fd,
        ino,
        reason,
    };
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| err(format!("opening a read end: {e}")))?;
    if std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
        != Some(ino)
    {
        return Err(err("the descriptor changed".into()));
    }
    let capacity = sys::pipe_capacity(&src).map_err(|e| err(format!("F_GETPIPE_SZ: {e}")))?;
    let avail = sys::pipe_buffered(&src).map_err(|e| err(format!("FIONREAD: {e}")))?;
    let mut data = Vec::with_capacity(avail);
    if avail > 0 {
        let (r, w) = sys::pipe_with_capacity(capacity)
            .map_err(|e| err(format!("creating a copy pipe: {e}")))?;
        let n = sys::tee_all(&src, &w, avail).map_err(|e| err(format!("tee: {e}")))?;
        if n != avail {
            return Err(err(format!("tee copied {n} of {avail} buffered bytes")));
        }
        drop(w);
        std::fs::File::from(r)
            .read_to_end(&mut data)
            .map_err(|e| err(format!("reading the copy: {e}")))?;
        if data.len() != avail {
            return Err(err(format!("read {} of {avail} copied bytes", data.len())));
        }
    }
    Ok(PipeImage {
        ino,
        capacity: capacity as u32,
        data,
    })
}

/// Dump the tree of processes rooted at `root`: the root and, recursively, its children
/// (live ones and zombies), with the pipes between them and the data buffered in them.
///
/// Every thread of every member is stopped before `on_frozen` is called (once); then all
/// members are read and finally all resumed, or all killed with [`AfterDump::Kill`]. On
/// error every member resumes. A pipe with an end outside the tree (held by a process that is
/// not a member) is refused with [`DumpError::UnsupportedFd`]; a pipe whose other end is
/// closed everywhere is fine.
pub fn dump_tree(
    root: i32,
    opts: &DumpOptions,
    on_frozen: &mut dyn FnMut() -> Result<(), String>,
) -> Result<TreeImage, DumpError> {
    // 1. Freeze the root, then the children of every frozen member until no new one appears
    //    (a frozen process cannot fork or reap; a child that is not frozen yet can fork, and
    //    its new children are found by the next pass).
    let root_stat = read_proc(root, "stat").map_err(|_| DumpError::NoSuchProcess { pid: root })?;
    let root_ppid = stat_num(&stat_fields(&root_stat), 4).unwrap_or(0) as i32;
    let mut members: Vec<(i32, i32, Held)> = Vec::new();
    match hold(root)? {
        Some(Held::Live(f)) => members.push((root, root_ppid, Held::Live(f))),
        _ => return Err(DumpError::NoSuchProcess { pid: root }),
    }
    let mut known = BTreeSet::from([root]);
    loop {
        let kids = children_map();
        let mut added = false;
        let mut i = 0;
        while i < members.len() {
            let (pid, _, held) = &members[i];
            let pid = *pid;
            if matches!(held, Held::Live(_)) {
                for &c in kids.get(&pid).map(|v| v.as_slice()).unwrap_or(&[]) {
                    if known.insert(c) {
                        added = true;
                        if let Some(h) = hold(c)? {
                            members.push((c, pid, h));
                        }
                    }
                }
            }
            i += 1;
        }
        if !added {
            break;
        }
    }
    // Before anything is committed or read: a queue that must be empty but is not yet.
    let mut diag = None;
    for (pid, _, held) in &members {
        if matches!(held, Held::Live(_)) && !opts.lenient_queues {
            unread_events(*pid, &mut diag)?;
        }
    }
    let t_frozen = std::time::Instant::now();
    on_frozen().map_err(|reason| DumpError::Hook { pid: root, reason })?;
    let t_hook = t_frozen.elapsed();

    // 2. Read every live member.
    let mut processes = Vec::with_capacity(members.len());
    let mut taken = Vec::with_capacity(members.len());
    let mut frozen_all = Vec::new();
    let mut stopped = Vec::new();
    let mut no_new_privs = Vec::new();
    let mut caps = Vec::new();
    let mut seccomp = Vec::new();
    let me = read_proc(std::process::id() as i32, "status")?;
    for (pid, ppid, held) in members {
        let state = match held {
            Held::Live(mut f) => {
                if f.stopped {
                    stopped.push(pid);
                }
                let (mut img, t) = read_frozen(pid, &mut f, opts, true)?;
                // Each thread's status once, for what the tree records of the process.
                let mut threads = Vec::with_capacity(f.tracers.len());
                for t in &f.tracers {
                    threads.push((
                        t.tid(),
                        read_proc(pid, &format!("task/{}/status", t.tid()))?,
                    ));
                }
                if no_new_privs_of(pid, &threads)? {
                    no_new_privs.push(pid);
                }
                if let Some(c) = recorded_caps(pid, &threads, &me, &img.creds)? {
                    caps.push((pid, c));
                }
                if let Some(filters) = recorded_seccomp(pid, &f, &threads, &me)? {
                    seccomp.push((pid, filters));
                }
                frozen_all.push((pid, f));
                // Killed after the dump: fill in before the kill (see dump_frozen).
                if opts.after != AfterDump::Resume {
                    fill_taken(&mut img, &t)?;
                }
                taken.push(t);
                MemberState::Live(Box::new(img))
            }
            Held::Zombie { status, pgid, sid } => MemberState::Zombie { status, pgid, sid },
        };
        processes.push(TreeMember { pid, ppid, state });
    }

    // One open file held by several members (a descriptor a child inherited) is recorded
    // once; the others are Dups of it.
    {
        let mut members: Vec<(i32, &mut Vec<FdState>)> = processes
            .iter_mut()
            .filter_map(|m| {
                let pid = m.pid;
                m.live_mut().map(|p| (pid, &mut p.fds))
            })
            .collect();
        mark_dups(&mut members)?;
    }

    // 3. Pipes.
    let mut ends: std::collections::BTreeMap<u64, Vec<(i32, i32, i32)>> = Default::default();
    for m in &processes {
        for f in m.live().map(|p| p.fds.as_slice()).unwrap_or(&[]) {
            if let FdKind::Pipe { ino } = f.kind {
                ends.entry(ino).or_default().push((m.pid, f.fd, f.flags));
            }
        }
    }
    let mut pipes = Vec::with_capacity(ends.len());
    for (ino, v) in &ends {
        let acc = |f: i32| f & libc::O_ACCMODE;
        let reads = v.iter().any(|e| acc(e.2) != libc::O_WRONLY);
        let writes = v.iter().any(|e| acc(e.2) != libc::O_RDONLY);
        let (pid, fd, _) = v[0];
        if !(reads && writes) {
            if let Some(other) = outside_holder(&format!("pipe:[{ino}]"), &known) {
                return Err(DumpError::UnsupportedFd {
                    pid,
                    fd,
                    target: format!("pipe:[{ino}]"),
                    reason: format!("the other end is held by process {other} outside the tree"),
                });
            }
        }
        pipes.push(read_pipe(pid, fd, *ino)?);
    }

    // 3b. Unix socket pairs: both ends inside the tree.
    let (sockets, listeners) = socket_pairs(&processes, &known)?;
    for m in processes.iter_mut() {
        for f in m
            .live_mut()
            .map(|p| p.fds.as_mut_slice())
            .unwrap_or(&mut [])
        {
            if let FdKind::UnixSocket { ino } = f.kind {
                if listeners.iter().any(|l| l.ino == ino) {
                    f.kind = FdKind::Bound { ino };
                }
            }
        }
    }

    // 3c. Files in shared memory (memfds, shared anonymous memory, deleted files mapped
    //     shared): recorded once, restored once as a memfd that every descriptor and
    //     mapping shares again.
    let memfds = shared_files(&frozen_all, &mut processes)?;

    // 4. Resume or kill.
    let t_read = t_frozen.elapsed();
    finish(frozen_all, opts.after)?;
    let frozen_for = t_frozen.elapsed();
    log::debug!(
        "tree {root}: frozen for {:?} (hook {t_hook:?}, reading {:?}, thawing {:?})",
        t_frozen.elapsed(),
        t_read - t_hook,
        t_frozen.elapsed() - t_read
    );
    let t_resolve = std::time::Instant::now();
    for (p, t) in processes
        .iter_mut()
        .filter_map(|m| m.live_mut())
        .zip(&taken)
    {
        fill_taken(p, t)?;
    }
    log::debug!(
        "tree {root}: taken pages filled in in {:?}",
        t_resolve.elapsed()
    );
    for m in &processes {
        if let Some(p) = m.live() {
            log_dumped(p);
        }
    }
    Ok(TreeImage {
        frozen_for: Some(frozen_for),
        memfds,
        root,
        processes,
        pipes,
        sockets,
        stopped,
        no_new_privs,
        caps,
        seccomp,
        bound_sockets: listeners,
    })
}

/// Parses `/proc/PID/timers`: blocks of `ID: n`, `signal: signo/value`,
/// `notify: kind/pid.N` or `kind/tid.N`, `ClockID: n`.
fn parse_timers(pid: i32, text: &str) -> Result<Vec<PosixTimer>, DumpError> {
    let bad = || DumpError::Parse {
        pid,
        what: "/proc/PID/timers",
        detail: text.to_string(),
    };
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let (key, v) = line.split_once(':').ok_or_else(bad)?;
        let v = v.trim();
        if key == "ID" {
            out.push(PosixTimer {
                id: v.parse().map_err(|_| bad())?,
                ..PosixTimer::default()
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(bad)?;
        match key {
            "signal" => {
                let (signo, value) = v.split_once('/').ok_or_else(bad)?;
                t.signo = signo.parse().map_err(|_| bad())?;
                t.value = u64::from_str_radix(value, 16).map_err(|_| bad())?;
            }
            "notify" => {
                let (kind, who) = v.split_once('/').ok_or_else(bad)?;
                let base = match kind {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                let (scope, n) = who.split_once('.').ok_or_else(bad)?;
                t.target = n.parse().map_err(|_| bad())?;
                t.notify = if scope == "tid" {
                    base | libc::SIGEV_THREAD_ID
                } else {
                    base
                };
            }
            "ClockID" => t.clock = v.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

/// Every thread's signal queue, and the process-wide one (with the leader), as raw siginfo.
fn pending_signals(frozen: &Frozen) -> Result<SignalState, TraceError> {
    // SIGSTOP and SIGKILL cannot be blocked, so they cannot wait in a queue at restore.
    let queueable = |sig: i32| sig != libc::SIGSTOP && sig != libc::SIGKILL;
    let mut signals = SignalState::default();
    for (i, t) in frozen.tracers.iter().enumerate() {
        let mut queue: Vec<SigInfo> = t
            .peek_siginfo(false)?
            .iter()
            .map(|r| SigInfo { raw: r.to_vec() })
            .filter(|q| queueable(q.signo()))
            .collect();
        // Signals the tracer took out of the queue while stopping the thread.
        for &sig in t.pending_signals().iter().filter(|s| queueable(**s)) {
            let mut raw = vec![0u8; SIGINFO_LEN];
            raw[0..4].copy_from_slice(&sig.to_le_bytes());
            raw[8..12].copy_from_slice(&SI_KERNEL.to_le_bytes());
            queue.push(SigInfo { raw });
        }
        if i == 0 {
            signals.shared = t
                .peek_siginfo(true)?
                .iter()
                .map(|r| SigInfo { raw: r.to_vec() })
                .filter(|q| queueable(q.signo()))
                .collect();
        }
        if !queue.is_empty() {
            signals.threads.push((t.tid(), queue));
        }
    }
    Ok(signals)
}

type Injected = (Vec<SigAction>, u64, Vec<(SigAltStack, u64)>, Vec<ITimer>);

/// `si_code` of a signal sent by the kernel.
const SI_KERNEL: i32 = 0x80;

/// Map a scratch page in the tracee, run the queries, unmap it (also on error).
fn injected_queries(
    frozen: &mut Frozen,
    timers: &mut [PosixTimer],
) -> Result<Injected, TraceError> {
    let scratch_len = PAGE_SIZE;
    let scratch = frozen.tracers[0].syscall(
        libc::SYS_mmap,
        [
            0,
            scratch_len,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let res = run_queries(frozen, scratch, timers);
    let unmap = frozen.tracers[0].syscall(libc::SYS_munmap, [scratch, scratch_len, 0, 0, 0, 0]);
    let res = res?;
    unmap?;
    Ok(res)
}

fn run_queries(
    frozen: &mut Frozen,
    scratch: u64,
    timers: &mut [PosixTimer],
) -> Result<Injected, TraceError> {
    let leader = &mut frozen.tracers[0];
    let mut sigactions = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        leader.syscall(libc::SYS_rt_sigaction, [sig as u64, 0, scratch, 8, 0, 0])?;
        let mut b = [0u8; 32];
        leader.read_mem(scratch, &mut b)?;
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        sigactions.push(SigAction {
            sig,
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        });
    }
    let brk = leader.syscall(libc::SYS_brk, [0; 6])?;
    let mut itimers = Vec::new();
    for which in 0..3u32 {
        leader.syscall(libc::SYS_getitimer, [which as u64, scratch, 0, 0, 0, 0])?;
        let mut b = [0u8; 32];
        leader.read_mem(scratch, &mut b)?;
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            i64::from_le_bytes(a)
        };
        let t = ITimer {
            which,
            interval: (w(0), w(1)),
            value: (w(2), w(3)),
        };
        if t.armed() {
            itimers.push(t);
        }
    }
    for t in timers.iter_mut() {
        leader.syscall(libc::SYS_timer_gettime, [t.id as u64, scratch, 0, 0, 0, 0])?;
        let mut b = [0u8; 32];
        leader.read_mem(scratch, &mut b)?;
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            i64::from_le_bytes(a)
        };
        t.interval = (w(0), w(1));
        t.remaining = (w(2), w(3));
    }
    let mut per_thread = Vec::new();
    for t in &mut frozen.tracers {
        t.syscall(libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])?;
        let mut b = [0u8; 24];
        t.read_mem(scratch, &mut b)?;
        let mut sp = [0u8; 8];
        sp.copy_from_slice(&b[0..8]);
        let mut fl = [0u8; 4];
        fl.copy_from_slice(&b[8..12]);
        let mut sz = [0u8; 8];
        sz.copy_from_slice(&b[16..24]);
        let alt = SigAltStack {
            sp: u64::from_le_bytes(sp),
            flags: i32::from_le_bytes(fl),
            size: u64::from_le_bytes(sz),
        };
        // PR_GET_TID_ADDRESS needs CONFIG_CHECKPOINT_RESTORE; 0 if unavailable.
        t.write_mem(scratch, &[0u8; 8])?;
        let ctid = match t.syscall(libc::SYS_prctl, [40, scratch, 0, 0, 0, 0]) {
            Ok(_) => {
                let mut c = [0u8; 8];
                t.read_mem(scratch, &mut c)?;
                u64::from_le_bytes(c)
            }
            Err(TraceError::Injected { .. }) => 0,
            Err(e) => return Err(e),
        };
        per_thread.push((alt, ctid));
    }
    Ok((sigactions, brk, per_thread, itimers))
}

/// Largest piece read at once.
const READ_PIECE: u64 = 8 << 20;
/// Pages whose pagemap entries are examined at once.
const PAGEMAP_WINDOW: u64 = 1 << 16;

/// The memory of a process, the mappings the dirty-page tracker scanned, and how many pages
/// it let the dump reuse.
type DumpedMemory = (ImageMemory, Vec<(u64, u64)>, u64);

/// One tracked mapping: `regions` (from the dirty-page scan, in address order) say which
/// pages are present or swapped and which were written since the last committed image
/// `prev`. Pages not written and in `prev` are taken from it; the others, as the untracked
/// path would choose them, are read, with one `process_vm_readv` for many ranges. Returns
/// the number of pages taken from `prev`.
///
/// This runs while the program is frozen, and a mostly unchanged mapping has many more
/// pages taken than read: those are listed in one pass, the reads gathered in pieces of at
/// most [`READ_PIECE`] bytes (so a mostly written mapping needs no second copy of itself),
/// and the two address-ordered lists merged at the end.
fn dump_tracked(
    pid: i32,
    tracer: &mut Tracer,
    c: Contents,
    regions: &[(u64, u64, u64)],
    prev: &std::collections::BTreeMap<u64, PageData>,
    mem: &mut ImageMemory,
) -> Result<u64, DumpError> {
    use super::dirty::{PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN};
    let t0 = std::time::Instant::now();
    // Pages the last image has, as merged ranges: they go into `mem` as `PageData::Base`
    // runs, which `resolve_taken` replaces by the pages once the process runs again (the
    // frozen window only decides what to read).
    let mut known: Vec<(u64, u64)> = Vec::new();
    let mut reused = 0u64;
    let mut reads: Vec<(u64, u64)> = Vec::new();
    // Neighbours merged, up to READ_PIECE bytes per range.
    let read = |reads: &mut Vec<(u64, u64)>, a: u64, len: u64| {
        let (mut a, end) = (a, a + len);
        while a < end {
            match reads.last_mut() {
                Some((s, l)) if *s + *l == a && *l < READ_PIECE => {
                    let n = (READ_PIECE - *l).min(end - a);
                    *l += n;
                    a += n;
                }
                _ => {
                    let n = READ_PIECE.min(end - a);
                    reads.push((a, n));
                    a += n;
                }
            }
        }
    };
    for &(s, e, cats) in regions {
        // As the pagemap test would choose: only anonymous pages of private file mappings.
        if c == Contents::AnonOnly && cats & PAGE_IS_FILE != 0 && cats & PAGE_IS_SWAPPED == 0 {
            continue;
        }
        // Only a page present and not written is the last image's page. A swap entry may
        // also be a write-protect marker left where a page was dropped (MADV_DONTNEED on a
        // private file mapping): reading it gives what is there now.
        if cats & PAGE_IS_WRITTEN != 0 || cats & PAGE_IS_PRESENT == 0 {
            read(&mut reads, s, e - s);
            continue;
        }
        let mut taken = prev.range(s..e).peekable();
        let mut a = s;
        while a < e {
            match taken.peek() {
                Some((&k, _)) if k == a => {
                    match known.last_mut() {
                        Some((s, l)) if *s + *l == a => *l += PAGE_SIZE,
                        _ => known.push((a, PAGE_SIZE)),
                    }
                    reused += 1;
                    taken.next();
                }
                _ => read(&mut reads, a, PAGE_SIZE),
            }
            a += PAGE_SIZE;
        }
    }
    let t_plan = t0.elapsed();
    // The reads, in pieces.
    let mut got = ImageMemory {
        page_size: PAGE_SIZE,
        runs: Vec::new(),
    };
    read_pages_into(pid, tracer, &reads, &mut got)?;
    let t_read = t0.elapsed();
    // Merge, in address order.
    mem.runs.reserve(known.len() + got.runs.len());
    let mut known = known.into_iter().peekable();
    let mut got = got.runs.into_iter().peekable();
    loop {
        let take_known = match (known.peek(), got.peek()) {
            (Some(k), Some(g)) => k.0 < g.addr,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_known {
            if let Some((addr, len)) = known.next() {
                mem.runs.push(PageRun {
                    addr,
                    len,
                    data: PageData::Base,
                });
            }
        } else if let Some(r) = got.next() {
            mem.push_read_run(r);
        }
    }
    log::debug!(
        "process {pid}: tracked mapping: {reused} pages reused; listed in {t_plan:?}, {} ranges read by {t_read:?}, merged by {:?}",
        reads.len(),
        t0.elapsed()
    );
    Ok(reused)
}

/// Replaces the [`PageData::Base`] runs a tracked dump left in `mem` (pages not written
/// since the last checkpoint) by those pages of the last image, `prev` (zero runs merged, as
/// a dump merges them). Done once the process runs again.
fn resolve_taken(
    pid: i32,
    mem: &mut ImageMemory,
    prev: &std::collections::BTreeMap<u64, PageData>,
) -> Result<(), DumpError> {
    if !mem.runs.iter().any(|r| r.data == PageData::Base) {
        return Ok(());
    }
    let mut out = ImageMemory {
        page_size: mem.page_size,
        runs: Vec::with_capacity(mem.runs.len() + prev.len()),
    };
    for r in std::mem::take(&mut mem.runs) {
        if r.data != PageData::Base {
            out.push_read_run(r);
            continue;
        }
        let mut n = 0;
        for (&addr, d) in prev.range(r.addr..r.addr + r.len) {
            out.push_read_run(PageRun {
                addr,
                len: PAGE_SIZE,
                data: d.clone(),
            });
            n += 1;
        }
        if n * PAGE_SIZE != r.len {
            return Err(DumpError::Parse {
                pid,
                what: "pages taken from the last checkpoint",
                detail: format!(
                    "{n} pages remembered in {:#x}-{:#x}",
                    r.addr,
                    r.addr + r.len
                ),
            });
        }
    }
    *mem = out;
    Ok(())
}

/// Reads the pages of `ranges` (page aligned, in address order) of `pid` straight into one
/// buffer per page and appends them to `mem` (zero pages as zero runs), as
/// [`ImageMemory::push_pages`] would, but with one copy instead of two: the kernel's, into
/// the buffers the image keeps. Up to 1024 pages per `process_vm_readv`; pages it cannot
/// read (a short batch) are read one by one through the tracer (which falls back to
/// /proc/PID/mem).
fn read_pages_into(
    pid: i32,
    tracer: &mut Tracer,
    ranges: &[(u64, u64)],
    mem: &mut ImageMemory,
) -> Result<(), DumpError> {
    const BATCH: usize = 1024; // IOV_MAX
    let page = PAGE_SIZE as usize;
    let mut pages = ranges
        .iter()
        .flat_map(|&(a, l)| (a..a + l).step_by(page))
        .peekable();
    let mut addrs: Vec<u64> = Vec::with_capacity(BATCH);
    let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut local: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    let mut remote: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    while pages.peek().is_some() {
        addrs.clear();
        addrs.extend(pages.by_ref().take(BATCH));
        bufs.clear();
        bufs.extend(addrs.iter().map(|_| Vec::with_capacity(page)));
        // From page `s` on: one process_vm_readv; a page it stops at (one it cannot read,
        // e.g. protected) goes through the tracer, then the fast read goes on after it. After
        // two calls in a row that read nothing, the rest of the batch goes through the tracer.
        let mut s = 0;
        let mut misses = 0;
        while s < addrs.len() {
            let full = if misses >= 2 {
                0
            } else {
                local.clear();
                local.extend(bufs[s..].iter_mut().map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: page,
                }));
                remote.clear();
                for &a in &addrs[s..] {
                    match remote.last_mut() {
                        Some(r) if r.iov_base as u64 + r.iov_len as u64 == a => r.iov_len += page,
                        _ => remote.push(libc::iovec {
                            iov_base: a as *mut libc::c_void,
                            iov_len: page,
                        }),
                    }
                }
                // SAFETY: every local vector points at the spare capacity (`page` bytes,
                // unaliased) of a buffer in `bufs`, which outlives the call and is not
                // touched during it; the remote vectors are only addresses in the other
                // process; both counts are at most IOV_MAX.
                let n = unsafe {
                    libc::process_vm_readv(
                        pid,
                        local.as_ptr(),
                        local.len() as libc::c_ulong,
                        remote.as_ptr(),
                        remote.len() as libc::c_ulong,
                        0,
                    )
                };
                // The kernel fills the local vectors in order: these pages are complete.
                usize::try_from(n).unwrap_or(0) / page
            };
            for b in &mut bufs[s..s + full] {
                // SAFETY: all of this buffer's `page` bytes of capacity were written by the
                // process_vm_readv above (one of the first `full` local vectors).
                unsafe { b.set_len(page) };
            }
            misses = if full == 0 { misses + 1 } else { 0 };
            s += full;
            if s < addrs.len() {
                let b = &mut bufs[s];
                b.resize(page, 0);
                tracer
                    .read_mem(addrs[s], b)
                    .map_err(|source| DumpError::Trace { pid, source })?;
                s += 1;
            }
        }
        for (b, &a) in bufs.drain(..).zip(&addrs) {
            let data = if b.iter().all(|&x| x == 0) {
                PageData::Zero
            } else {
                PageData::Bytes(b)
            };
            mem.push_read_run(PageRun {
                addr: a,
                len: PAGE_SIZE,
                data,
            });
        }
    }
    Ok(())
}

/// Reads the memory to dump. With a `tracker`, pages present and not written since the last
/// committed checkpoint are taken from its image; returns also the mappings (start, end)
/// the tracker could scan.
fn dump_memory(
    pid: i32,
    tracer: &mut Tracer,
    mappings: &[Mapping],
    contents: &[Contents],
    tracker: Option<&super::dirty::DirtyTracker>,
) -> Result<DumpedMemory, DumpError> {
    let mut scanned = Vec::new();
    let tracker = tracker.filter(|t| t.tracks(pid));
    let mut mem = ImageMemory {
        page_size: PAGE_SIZE,
        runs: Vec::new(),
    };
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).ok();
    let mut entries = Vec::new();
    let mut reused = 0u64;
    for (m, c) in mappings.iter().zip(contents) {
        if *c == Contents::None {
            continue;
        }
        let ts = std::time::Instant::now();
        let regions = match (tracker, &pagemap) {
            (Some(t), Some(pm))
                if !m.shared && matches!(c, Contents::Present | Contents::AnonOnly) =>
            {
                t.scan(pid, pm, m.start, m.end)
            }
            _ => None,
        };
        if let (Some(regions), Some(prev)) = (regions, tracker.and_then(|t| t.pages(pid))) {
            let t_scan = ts.elapsed();
            scanned.push((m.start, m.end));
            reused += dump_tracked(pid, tracer, *c, &regions, prev, &mut mem)?;
            if m.len() > 64 << 20 {
                log::debug!(
                    "process {pid}: {:#x}-{:#x}: {} regions scanned in {t_scan:?}, read at {:?}",
                    m.start,
                    m.end,
                    regions.len(),
                    ts.elapsed()
                );
            }
            continue;
        }
        let npages = m.len() / PAGE_SIZE;
        // Work through the mapping in windows so huge sparse mappings stay cheap.
        let mut w0 = 0u64;
        while w0 < npages {
            let wn = (npages - w0).min(PAGEMAP_WINDOW);
            let wstart = m.start + w0 * PAGE_SIZE;
            // Which pages of the window to dump.
            let wanted: Vec<bool> = match (*c, &pagemap) {
                (Contents::All, _) | (_, None) => vec![true; wn as usize],
                (c, Some(pm)) => {
                    entries.resize(wn as usize * 8, 0u8);
                    pm.read_exact_at(&mut entries, wstart / PAGE_SIZE * 8)
                        .map_err(|source| DumpError::Proc {
                            pid,
                            path: pm_path.clone(),
                            source,
                        })?;
                    entries
                        .chunks_exact(8)
                        .map(|e| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(e);
                            let v = u64::from_le_bytes(a);
                            match c {
                                Contents::AnonOnly => {
                                    (v & PM_SWAP != 0) || (v & PM_PRESENT != 0 && v & PM_FILE == 0)
                                }
                                _ => v & (PM_PRESENT | PM_SWAP) != 0,
                            }
                        })
                        .collect()
                }
            };
            let mut i = 0u64;
            while i < wn {
                if !wanted[i as usize] {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < wn && wanted[j as usize] && (j - i) * PAGE_SIZE < READ_PIECE {
                    j += 1;
                }
                let addr = wstart + i * PAGE_SIZE;
                read_pages_into(pid, tracer, &[(addr, (j - i) * PAGE_SIZE)], &mut mem)?;
                i = j;
            }
            w0 += wn;
        }
    }
    if tracker.is_some() {
        log::debug!(
            "process {pid}: {reused} pages taken from the last checkpoint, {} mappings scanned",
            scanned.len()
        );
    }
    Ok((mem, scanned, reused))
}

/// The `flags:` (octal) of an fdinfo text.
fn fdinfo_flags(pid: i32, info: &str) -> Result<i32, DumpError> {
    status_field(info, "flags:")
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| DumpError::Parse {
            pid,
            what: "fdinfo flags",
            detail: info.to_string(),
        })
}

/// The path of inode `ino` under `.forkpoint/inodes/` of the forkpoint mount holding `path`.
/// What the TCP or UDP socket with inode `ino` is, from `/proc/net/{tcp,udp}{,6}`: "a TCP
/// socket listening on 127.0.0.1:8000", "a TCP connection 10.0.0.2:5122 -> 10.0.0.1:80".
fn inet_socket(ino: u64) -> Option<String> {
    for (file, proto) in [
        ("tcp", "TCP"),
        ("tcp6", "TCP"),
        ("udp", "UDP"),
        ("udp6", "UDP"),
    ] {
        let text = std::fs::read_to_string(format!("/proc/net/{file}")).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(9).and_then(|v| v.parse::<u64>().ok()) != Some(ino) {
                continue;
            }
            let (local, remote) = (inet_addr(f.get(1)?)?, inet_addr(f.get(2)?)?);
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            return Some(match (proto, state) {
                ("TCP", 0x0a) => format!("a TCP socket listening on {local}"),
                ("TCP", 0x01) => format!("a TCP connection {local} -> {remote}"),
                ("TCP", _) => format!("a TCP socket {local} -> {remote}"),
                _ if remote.ends_with(":0") => format!("a UDP socket on {local}"),
                _ => format!("a UDP socket {local} -> {remote}"),
            });
        }
    }
    None
}

/// An address of /proc/net/tcp ("0100007F:1F40", or 32 hex digits for IPv6: each 32-bit
/// word in host order) as text.
fn inet_addr(a: &str) -> Option<String> {
    let (ip, port) = a.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(format!(
            "{}:{port}",
            std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
        )),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(format!("[{}]:{port}", std::net::Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// [`DumpError::Busy`] if an inotify instance of `pid` has events queued, or a listening
/// unix socket connections not accepted yet (its clients may be members: their half-made
/// connections cannot be restored).
/// `diag` caches the host's unix sockets for the whole tree (listed once, when a member
/// first holds a socket).
fn unread_events(
    pid: i32,
    diag: &mut Option<std::collections::BTreeMap<u64, super::unix::UnixDiag>>,
) -> Result<(), DumpError> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let socket = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        if let Some(ino) = socket {
            if diag.is_none() {
                *diag = Some(super::unix::unix_sockets().unwrap_or_default());
            }
            let d = diag.as_ref().and_then(|d| d.get(&ino));
            if let Some(d) = d.filter(|d| d.state == super::unix::LISTEN && d.pending > 0) {
                return Err(DumpError::Busy {
                    pid,
                    fd: e
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(-1),
                    target: target.to_string_lossy().into_owned(),
                    reason: format!(
                        "{} connections to the unix socket {:?} are not accepted yet",
                        d.pending,
                        String::from_utf8_lossy(&d.name)
                    ),
                });
            }
            continue;
        }
        if target.as_os_str() != "anon_inode:inotify" {
            continue;
        }
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(ours) = super::unix::take_fd(pid, fd) else {
            continue;
        };
        if let Ok(queued @ 1..) = sys::pipe_buffered(&ours) {
            return Err(DumpError::Busy {
                pid,
                fd,
                target: "anon_inode:inotify".into(),
                reason: format!("{queued} bytes of inotify events are queued, not read yet"),
            });
        }
    }
    Ok(())
}

/// The watches of inotify instance `fd` of `pid`, from its fdinfo: each watched file is
/// found again from the file handle the kernel prints (`open_by_handle_at` on a mount of its
/// filesystem) and recorded by its path. An instance with events queued is
/// [`DumpError::Busy`]: they cannot be put back, and the program reads them soon.
fn inotify_watches(
    pid: i32,
    fd: i32,
    target: &str,
    info: &str,
    lenient: bool,
) -> Result<Vec<InotifyWatch>, DumpError> {
    let refuse = |reason: String| DumpError::UnsupportedFd {
        pid,
        fd,
        target: target.to_string(),
        reason,
    };
    let ours = super::unix::take_fd(pid, fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
    let queued = sys::pipe_buffered(&ours).map_err(|e| refuse(format!("FIONREAD: {e}")))?;
    if queued > 0 && !lenient {
        return Err(DumpError::Busy {
            pid,
            fd,
            target: target.to_string(),
            reason: format!("{queued} bytes of inotify events are queued, not read yet"),
        });
    }
    let mut out = Vec::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("inotify ") else {
            continue;
        };
        let field = |k: &str| rest.split_whitespace().find_map(|kv| kv.strip_prefix(k));
        let hex = |k: &str| field(k).and_then(|v| u64::from_str_radix(v, 16).ok());
        let parse = || DumpError::Parse {
            pid,
            what: "inotify watch",
            detail: line.to_string(),
        };
        let (Some(wd), Some(ino), Some(sdev), Some(mask)) =
            (hex("wd:"), hex("ino:"), hex("sdev:"), hex("mask:"))
        else {
            return Err(parse());
        };
        let handle = match (hex("fhandle-type:"), field("f_handle:")) {
            (Some(t), Some(h)) => (t as i32, decode_hex(h).ok_or_else(parse)?),
            _ => {
                return Err(refuse(format!(
                    "watch {wd}: the kernel gives no file handle"
                )))
            }
        };
        let path = watched_path(sdev, ino, &handle)
            .map_err(|r| refuse(format!("watch {wd} (inode {ino}): {r}")))?;
        out.push(InotifyWatch {
            wd: i32::try_from(wd).map_err(|_| parse())?,
            mask: u32::try_from(mask).map_err(|_| parse())?,
            path,
            ino,
        });
    }
    out.sort_by_key(|w| w.wd);
    Ok(out)
}

fn decode_hex(h: &str) -> Option<Vec<u8>> {
    if h.len() % 2 != 0 {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A /proc/self/mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape_mountinfo(f: &str) -> String {
    let b = f.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path (in the caller's mount namespace) of the file with `handle` (type, bytes) on
/// the filesystem of device `sdev` (the kernel's internal encoding: major << 20 | minor).
fn watched_path(sdev: u64, ino: u64, handle: &(i32, Vec<u8>)) -> Result<String, String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dev = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let at = mountinfo
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&dev.as_str())).then(|| f.get(4).map(|m| unescape_mountinfo(m)))?
        })
        .ok_or_else(|| format!("its filesystem (device {dev}) is not mounted here"))?;
    let mount = File::open(&at).map_err(|e| format!("open {at}: {e}"))?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes; built in u32
    // words for its alignment.
    let mut fh = Vec::with_capacity(8 + handle.1.len());
    fh.extend_from_slice(&(handle.1.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle.0.to_ne_bytes());
    fh.extend_from_slice(&handle.1);
    let words: Vec<u32> = fh
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect();
    // SAFETY: `words` holds a complete struct file_handle (header and handle_bytes bytes),
    // 4-byte aligned, alive for the call; the result is a new descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            words.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(format!(
            "cannot open it by its file handle: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `r` is a fresh descriptor nobody else owns.
    let file = unsafe { OwnedFd::from_raw_fd(r as i32) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| format!("cannot name it: {e}"))?;
    let path = path.to_string_lossy().into_owned();
    if path.ends_with(" (deleted)") {
        return Err("the watched file was deleted".into());
    }
    let same_dev = |d: u64| {
        u64::from(libc::major(d)) == sdev >> 20 && u64::from(libc::minor(d)) == sdev & 0xfffff
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.ino() == ino && same_dev(m.dev()) => Ok(path),
        _ => Err(format!("{path} no longer names the watched file")),
    }
}

fn by_inode_path(path: &str, ino: u64) -> Option<String> {
    let mut dir = std::path::Path::new(path).parent();
    while let Some(d) = dir {
        let inodes = d.join(".forkpoint/inodes");
        if inodes.is_dir() {
            return Some(inodes.join(ino.to_string()).to_string_lossy().into_owned());
        }
        dir = d.parent();
    }
    None
}

fn dump_fds(
    pid: i32,
    allow_pipes: bool,
    terminals: &[(u64, u64)],
    own_dirs: &[std::path::PathBuf],
    lenient: bool,
) -> Result<Vec<FdState>, DumpError> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|source| DumpError::Proc {
        pid,
        path: dir.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    let mut out = Vec::new();
    for fd in fds {
        let target = match read_link(pid, &format!("fd/{fd}")) {
            Ok(t) => t,
            Err(_) => continue, // closed meanwhile (cannot happen while frozen, but be lenient)
        };
        let refuse = |reason: &str| DumpError::UnsupportedFd {
            pid,
            fd,
            target: target.clone(),
            reason: reason.to_string(),
        };
        // Pipes and sockets: whether the other end is inside the tree (and, for a socket,
        // whether it is a unix socket pair) is decided with the whole tree in view
        // (dump_tree).
        let inode_of = |prefix: &str| {
            target
                .strip_prefix(prefix)
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
        };
        let shared = match (inode_of("pipe:["), inode_of("socket:[")) {
            (Some(ino), _) => Some((
                FdKind::Pipe { ino },
                "pipes are only supported when dumping a process tree",
            )),
            (_, Some(ino)) => Some((
                FdKind::UnixSocket { ino },
                "sockets are only supported (as unix socket pairs) when dumping a process tree",
            )),
            _ => None,
        };
        if let Some((kind, alone)) = shared {
            if !allow_pipes {
                return Err(refuse(alone));
            }
            let info = read_proc(pid, &format!("fdinfo/{fd}"))?;
            out.push(FdState {
                fd,
                path: target.clone(),
                pos: 0,
                flags: fdinfo_flags(pid, &info)?,
                kind,
            });
            continue;
        }
        if target == "anon_inode:[timerfd]"
            || target == "anon_inode:[signalfd]"
            || target == "anon_inode:[eventpoll]"
            || target == "anon_inode:[eventfd]"
        {
            // One open file behind two descriptors becomes a Dup (mark_dups).
            let info = read_proc(pid, &format!("fdinfo/{fd}"))?;
            let parse = |what: &'static str| DumpError::Parse {
                pid,
                what,
                detail: info.clone(),
            };
            let flags = fdinfo_flags(pid, &info)?;
            let kind = if target == "anon_inode:[eventfd]" {
                // The kernel prints the counter in hex.
                let count = status_field(&info, "eventfd-count:")
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .ok_or_else(|| parse("eventfd-count"))?;
                // Older kernels do not say; a semaphore restored as a counter would be wrong.
                let semaphore = status_field(&info, "eventfd-semaphore:")
                    .map(|v| v.trim() == "1")
                    .ok_or_else(|| refuse("this kernel does not tell whether it is a semaphore"))?;
                FdKind::EventFd { count, semaphore }
            } else if target == "anon_inode:[eventpoll]" {
                // One line per watch: "tfd: N events: HEX data: HEX pos:.. ino:.. sdev:..".
                let mut watches = Vec::new();
                for l in info.lines().filter(|l| l.starts_with("tfd:")) {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let field =
                        |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
                    let watch = (|| {
                        Some(EpollWatch {
                            fd: field("tfd:")?.parse().ok()?,
                            events: u32::from_str_radix(field("events:")?, 16).ok()?,
                            data: u64::from_str_radix(field("data:")?, 16).ok()?,
                        })
                    })()
                    .ok_or_else(|| parse("epoll watch"))?;
                    watches.push(watch);
                }
                FdKind::Epoll { watches }
            } else if target == "anon_inode:[signalfd]" {
                let mask = status_field(&info, "sigmask:")
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .ok_or_else(|| parse("signalfd sigmask"))?;
                FdKind::SignalFd { mask }
            } else {
                let pair = |key: &str| -> Option<(i64, i64)> {
                    let v = status_field(&info, key)?.trim();
                    let (a, b) = v.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
                    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                };
                // TFD_TIMER_CANCEL_ON_SET (2) has no equivalent in a relative re-arm.
                let settime = status_field(&info, "settime flags:")
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                    .unwrap_or(0);
                if settime & 2 != 0 {
                    return Err(refuse("TFD_TIMER_CANCEL_ON_SET is not supported yet"));
                }
                FdKind::TimerFd {
                    clock: status_field(&info, "clockid:")
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| parse("timerfd clockid"))?,
                    ticks: status_field(&info, "ticks:")
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| parse("timerfd ticks"))?,
                    value: pair("it_value:").ok_or_else(|| parse("timerfd it_value"))?,
                    interval: pair("it_interval:").ok_or_else(|| parse("timerfd it_interval"))?,
                }
            };
            out.push(FdState {
                fd,
                path: target.clone(),
                pos: 0,
                flags,
                kind,
            });
            continue;
        }
        if target == "anon_inode:inotify" {
            let info = read_proc(pid, &format!("fdinfo/{fd}"))?;
            let flags = fdinfo_flags(pid, &info)?;
            let watches = inotify_watches(pid, fd, &target, &info, lenient)?;
            out.push(FdState {
                fd,
                path: target.clone(),
                pos: 0,
                flags,
                kind: FdKind::Inotify { watches },
            });
            continue;
        }
        if let Some(what) = target.strip_prefix("anon_inode:") {
            // eventfd, timerfd, signalfd, epoll and inotify are handled above.
            let what = what.trim_matches(|c| c == '[' || c == ']');
            return Err(refuse(&format!(
                "{what} descriptors cannot be checkpointed (supported: eventfd, timerfd, \
                 signalfd, epoll, inotify)"
            )));
        }
        if !target.starts_with('/') {
            return Err(refuse("not a path"));
        }
        let info = read_proc(pid, &format!("fdinfo/{fd}"))?;
        let pos = status_field(&info, "pos:")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let flags = status_field(&info, "flags:")
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            .ok_or_else(|| DumpError::Parse {
                pid,
                what: "fdinfo flags",
                detail: info.clone(),
            })?;
        let st = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .map_err(|e| refuse(&format!("cannot stat: {e}")))?;
        let ft = st.file_type();
        let mut target = target.clone();
        // A deleted file is reached again by inode on a forkpoint mount (its snapshot keeps
        // it); anywhere else (glibc's tmpfile() in /tmp, a session's own directories) only
        // its holders reach it: its contents are kept like a memfd's.
        let deleted_elsewhere = ft.is_file()
            && target.strip_suffix(" (deleted)").is_some_and(|orig| {
                own_dirs
                    .iter()
                    .any(|d| std::path::Path::new(orig).starts_with(d))
                    || by_inode_path(orig, st.ino()).is_none()
            });
        let kind = if ft.is_file() && (target.starts_with("/memfd:") || deleted_elsewhere) {
            // The file itself is recorded once for the whole tree (dump_tree); so is a
            // deleted file that is not on a forkpoint mount.
            if !allow_pipes {
                return Err(refuse(
                    "memfds and deleted files are only supported when dumping a process tree",
                ));
            }
            FdKind::Memfd { ino: st.ino() }
        } else if ft.is_file() {
            if let Some(orig) = target.strip_suffix(" (deleted)") {
                // An unlinked file on a forkpoint mount stays reachable by inode number under
                // the mount's `.forkpoint/inodes/`, in the checkpoint's snapshot as well.
                target = by_inode_path(orig, st.ino()).ok_or_else(|| {
                    refuse("the file was deleted and is not on a forkpoint mount")
                })?;
            }
            match std::fs::metadata(&target) {
                Ok(now) if now.ino() == st.ino() && now.dev() == st.dev() => {}
                _ => return Err(refuse("the path no longer names the open file")),
            }
            FdKind::Regular
        } else if ft.is_dir() {
            FdKind::Directory
        } else if std::os::unix::fs::FileTypeExt::is_char_device(&ft) {
            let rdev = st.rdev();
            let (maj, min) = (libc::major(rdev), libc::minor(rdev));
            if maj == 1 && matches!(min, 3 | 5 | 9) {
                FdKind::CharDevice
            } else if (136..=143).contains(&maj) || (maj == 5 && min == 0) {
                // A pseudo-terminal (or /dev/tty): re-attached to the restoring terminal, if it
                // is the session's own.
                let dev_tty = maj == 5 && min == 0;
                if !dev_tty && !terminals.contains(&(st.dev(), rdev)) {
                    return Err(refuse(
                        "a terminal other than the one the session runs on is not supported",
                    ));
                }
                FdKind::Tty
            } else {
                return Err(refuse(&format!(
                    "character device {maj}:{min} (only /dev/null, /dev/zero, /dev/urandom)"
                )));
            }
        } else {
            return Err(refuse("unsupported file type"));
        };
        out.push(FdState {
            fd,
            path: target,
            pos,
            flags,
            kind,
        });
    }
    mark_dups(&mut [(pid, &mut out)])?;
    // An epoll instance is rebuilt from the descriptors it watches: they must be there, and
    // not be epoll instances themselves (those would have to be rebuilt first).
    for f in &out {
        let FdKind::Epoll { watches } = &f.kind else {
            continue;
        };
        for w in watches {
            let is_epoll = |k: &FdKind| matches!(k, FdKind::Epoll { .. });
            let reason = match out.iter().find(|o| o.fd == w.fd) {
                None => "it watches a descriptor that was closed (or moved) since",
                Some(o) if is_epoll(&o.kind) => {
                    "it watches another epoll instance, which is not supported yet"
                }
                Some(FdState {
                    kind: FdKind::Dup { pid: p, fd: d },
                    ..
                }) if *p == pid && out.iter().any(|o| o.fd == *d && is_epoll(&o.kind)) => {
                    "it watches another epoll instance, which is not supported yet"
                }
                Some(_) => continue,
            };
            return Err(DumpError::UnsupportedFd {
                pid,
                fd: f.fd,
                target: format!("anon_inode:[eventpoll] (watching fd {})", w.fd),
                reason: reason.into(),
            });
        }
    }
    Ok(out)
}

/// Whether every thread of `pid` (its (tid, /proc status) in `threads`) has no_new_privs
/// set; threads that differ are refused (a restore sets it once, in the leader, before the
/// other threads are made).
fn no_new_privs_of(pid: i32, threads: &[(i32, String)]) -> Result<bool, DumpError> {
    let mut all = None;
    for (_, status) in threads {
        let set = status_field(status, "NoNewPrivs:").map(str::trim) == Some("1");
        if all.is_some_and(|a| a != set) {
            return Err(DumpError::Unsupported {
                pid,
                what: "threads with and without no_new_privs".into(),
                reason: "it is restored for the whole process".into(),
            });
        }
        all = Some(set);
    }
    Ok(all.unwrap_or(false))
}

/// The capability sets a restore gives a process by itself: the restorer's own (its copy),
/// kept through `setresuid` to root ids or cleared by it to others, as the kernel does. `me`
/// is the dumper's own /proc status.
fn default_caps(me: &str, creds: &Creds) -> CapSets {
    let mine = parse_caps(me).unwrap_or(CapSets {
        inheritable: 0,
        permitted: 0,
        effective: 0,
        bounding: 0,
        ambient: 0,
    });
    let [ruid, euid, suid, _] = creds.uid;
    let any_root = ruid == 0 || euid == 0 || suid == 0;
    CapSets {
        inheritable: mine.inheritable,
        permitted: if any_root { mine.permitted } else { 0 },
        effective: if euid == 0 { mine.effective } else { 0 },
        bounding: mine.bounding,
        ambient: if any_root { mine.ambient } else { 0 },
    }
}

/// The capability sets in a /proc status text.
fn parse_caps(status: &str) -> Option<CapSets> {
    let set =
        |key: &str| status_field(status, key).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    Some(CapSets {
        inheritable: set("CapInh:")?,
        permitted: set("CapPrm:")?,
        effective: set("CapEff:")?,
        bounding: set("CapBnd:")?,
        ambient: set("CapAmb:").unwrap_or(0),
    })
}

/// The capability sets of `pid` if they differ from what a restore gives by itself (a root
/// program that dropped some, a service given `CAP_NET_BIND_SERVICE` as ambient, a
/// file-capability binary): a tree image records them and the restore sets them again.
/// Threads whose sets differ are refused (a restore sets one set for the whole process).
fn recorded_caps(
    pid: i32,
    threads: &[(i32, String)],
    me: &str,
    creds: &Creds,
) -> Result<Option<CapSets>, DumpError> {
    let mut all: Option<CapSets> = None;
    for (tid, status) in threads {
        let Some(c) = parse_caps(status) else {
            continue;
        };
        if all.is_some_and(|a| a != c) {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("thread {tid}, whose capability sets differ from its process's"),
                reason: "capabilities are restored for the whole process".into(),
            });
        }
        all = Some(c);
    }
    Ok(all.filter(|c| *c != default_caps(me, creds)))
}

/// The seccomp filters of a frozen process that has filters of its own (see `read_frozen`),
/// oldest first; `None` when it has none but the restorer's. Threads with different filters
/// are refused (they are installed once, before the threads are made, which inherit them),
/// and so is a filter that hands system calls to a supervisor (`SECCOMP_RET_USER_NOTIF`: its
/// listener is not part of the checkpoint).
fn recorded_seccomp(
    pid: i32,
    frozen: &Frozen,
    threads: &[(i32, String)],
    me: &str,
) -> Result<Option<Vec<SeccompFilter>>, DumpError> {
    let mode = |text: &str| {
        status_field(text, "Seccomp:")
            .map(str::trim)
            .unwrap_or("0")
            .to_string()
    };
    if mode(me) != "0" {
        return Ok(None);
    }
    // Every thread's own: one that sandboxed itself alone (no TSYNC) must not be missed
    // because its leader has none. `threads` is in the order of `frozen.tracers`.
    let modes: Vec<String> = threads.iter().map(|(_, st)| mode(st)).collect();
    if modes.iter().all(|m| m != "2") {
        return Ok(None);
    }
    let mut all: Option<Vec<(u64, Vec<u8>)>> = None;
    for (t, m) in frozen.tracers.iter().zip(&modes) {
        let filters = if m == "2" {
            t.seccomp_filters()
                .map_err(|source| DumpError::Trace { pid, source })?
        } else {
            Vec::new()
        };
        if all.as_ref().is_some_and(|a| *a != filters) {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "thread {} under seccomp filters its process does not have",
                    t.tid()
                ),
                reason: "filters are restored for the whole process".into(),
            });
        }
        all = Some(filters);
    }
    let mut out = Vec::new();
    for (i, (flags, prog)) in all.unwrap_or_default().into_iter().enumerate() {
        const LOG: u64 = 1 << 1;
        const SPEC_ALLOW: u64 = 1 << 2;
        if flags & !(LOG | SPEC_ALLOW) != 0 {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("seccomp filter {i} with flags {flags:#x}"),
                reason: "only the log and spec_allow flags are restored".into(),
            });
        }
        // struct sock_filter { u16 code; u8 jt, jf; u32 k }: BPF_RET | BPF_K is 0x06, and
        // BPF_RET | BPF_A (0x16) returns a computed action, which could be this one too.
        let notifies = prog.chunks_exact(8).any(|ins| {
            let code = u16::from_ne_bytes([ins[0], ins[1]]);
            let k = u32::from_ne_bytes([ins[4], ins[5], ins[6], ins[7]]);
            (code == 0x06 && k & 0xffff_0000 == 0x7fc0_0000) || code == 0x16
        });
        if notifies {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "seccomp filter {i}, which hands system calls to a supervisor (or returns \
                     a computed action, which could)"
                ),
                reason: "the supervisor's listener is not part of the checkpoint".into(),
            });
        }
        out.push(SeccompFilter { flags, prog });
    }
    Ok(Some(out).filter(|f| !f.is_empty()))
}

/// A single-process image (no tree) records neither capabilities nor no_new_privs: a process
/// whose sets or no_new_privs differ from what a restore gives by itself is refused rather
/// than restored with more or fewer privileges than it had. A tree image records both
/// (`TreeImage::caps`, `TreeImage::no_new_privs`), and `single` is false there.
fn check_capabilities(
    pid: i32,
    status: &str,
    me: &str,
    creds: &Creds,
    single: bool,
) -> Result<(), DumpError> {
    if !single {
        return Ok(());
    }
    let nnp = |text: &str| status_field(text, "NoNewPrivs:").map(str::trim) == Some("1");
    if nnp(status) != nnp(me) {
        return Err(DumpError::Unsupported {
            pid,
            what: format!(
                "no_new_privs {} (the restorer's is {})",
                if nnp(status) { "set" } else { "not set" },
                if nnp(me) { "set" } else { "not set" }
            ),
            reason: "a single-process image does not record it".into(),
        });
    }
    let (Some(have), want) = (parse_caps(status), default_caps(me, creds)) else {
        return Ok(());
    };
    let fields = [
        ("CapInh", have.inheritable, want.inheritable),
        ("CapPrm", have.permitted, want.permitted),
        ("CapEff", have.effective, want.effective),
        ("CapBnd", have.bounding, want.bounding),
        ("CapAmb", have.ambient, want.ambient),
    ];
    for (key, have, w) in fields {
        if have != w {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "its capabilities ({key} {have:016x}, a restore would give {w:016x})"
                ),
                reason: "a single-process image does not record capabilities; checkpoint it as \
                         a session"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Whether a descriptor of this kind is made anew at restore, so that two descriptors of one
/// open file must be recorded as one file and a [`FdKind::Dup`] to keep sharing it (file
/// position, status flags, the object itself). A memfd's file is made once for the tree, but
/// each of its open files (descriptors opened on their own) is opened again on it. Pipes and
/// sockets are made once for the tree; terminals and devices have no state to share.
fn made_per_descriptor(k: &FdKind) -> bool {
    matches!(
        k,
        FdKind::Regular
            | FdKind::Directory
            | FdKind::Memfd { .. }
            | FdKind::EventFd { .. }
            | FdKind::TimerFd { .. }
            | FdKind::SignalFd { .. }
            | FdKind::Epoll { .. }
            | FdKind::Inotify { .. }
    )
}

/// Marks every descriptor that is the same open file as one before it (in `members` order,
/// then by descriptor) as a [`FdKind::Dup`] of that one: a `dup`, `2>&1`, or a descriptor a
/// child inherited. Candidates are compared by path first, then with `kcmp`.
fn mark_dups(members: &mut [(i32, &mut Vec<FdState>)]) -> Result<(), DumpError> {
    // path → the representatives seen so far (pid, fd).
    let mut reps: std::collections::HashMap<String, Vec<(i32, i32)>> = Default::default();
    for (pid, fds) in members.iter_mut() {
        for f in fds.iter_mut() {
            if !made_per_descriptor(&f.kind) {
                continue;
            }
            // A file of its own path (regular, directory) made twice is what restores did
            // before; an eventfd or epoll instance made twice is another program.
            let strict = !matches!(
                f.kind,
                FdKind::Regular | FdKind::Directory | FdKind::Memfd { .. }
            );
            let seen = reps.entry(f.path.clone()).or_default();
            let mut same = None;
            for &(p, d) in seen.iter() {
                match sys::same_file(p, d, *pid, f.fd) {
                    Some(true) => {
                        same = Some((p, d));
                        break;
                    }
                    None if strict => {
                        return Err(DumpError::UnsupportedFd {
                            pid: *pid,
                            fd: f.fd,
                            target: f.path.clone(),
                            reason: format!(
                                "kcmp cannot tell whether it is the same file as fd {d} of \
                                 process {p}"
                            ),
                        })
                    }
                    _ => {}
                }
            }
            match same {
                Some((p, d)) => f.kind = FdKind::Dup { pid: p, fd: d },
                None => seen.push((*pid, f.fd)),
            }
        }
    }
    Ok(())
}

fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim())
}

fn parse_creds(pid: i32, status: &str) -> Result<Creds, DumpError> {
    let four = |key: &'static str| -> Result<[u32; 4], DumpError> {
        let v = status_field(status, key).unwrap_or("");
        let nums: Vec<u32> = v
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if nums.len() != 4 {
            return Err(DumpError::Parse {
                pid,
                what: key,
                detail: v.to_string(),
            });
        }
        Ok([nums[0], nums[1], nums[2], nums[3]])
    };
    Ok(Creds {
        uid: four("Uid:")?,
        gid: four("Gid:")?,
        groups: status_field(status, "Groups:")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    })
}

/// Fields 5 (pgrp) and 6 (session) of /proc/PID/stat.
fn parse_pgid_sid(pid: i32, stat: &str) -> Result<(i32, i32), DumpError> {
    let bad = || DumpError::Parse {
        pid,
        what: "stat",
        detail: stat.to_string(),
    };
    let after = stat.rfind(')').ok_or_else(bad)?;
    let f: Vec<&str> = stat[after + 1..].split_whitespace().collect();
    let get = |n: usize| f.get(n - 3).and_then(|v| v.parse::<i32>().ok());
    Ok((get(5).ok_or_else(bad)?, get(6).ok_or_else(bad)?))
}

fn parse_mm(pid: i32, stat: &str) -> Result<MmState, DumpError> {
    let bad = || DumpError::Parse {
        pid,
        what: "stat",
        detail: stat.to_string(),
    };
    let after = stat.rfind(')').ok_or_else(bad)?;
    // Field 3 (state) is the first after the comm.
    let f: Vec<&str> = stat[after + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, DumpError> {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(bad)
    };
    Ok(MmState {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: 0,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
        auxv: Vec::new(),
    })
}

/// Finds the files in shared memory the tree holds open (memfds) or maps shared with no
/// file to map again (memfds, shared anonymous memory, deleted files), reads each once,
/// and points the descriptors and mappings at it. The mappings' pages, already read with
/// the process, are dropped from its image: the file holds them. A file no descriptor
/// holds is read only where it is mapped (nothing else can reach the rest).
fn shared_files(
    frozen: &[(i32, Frozen)],
    processes: &mut [TreeMember],
) -> Result<Vec<MemfdImage>, DumpError> {
    struct Found {
        dev: u64,
        at: String,
        name: String,
        /// Mapped ranges (file offsets), or `None` once a descriptor holds the file.
        ranges: Option<Vec<(u64, u64)>>,
    }
    let dev_of = |path: &str, pid: i32| {
        std::fs::metadata(path)
            .map(|m| m.dev())
            .map_err(|source| DumpError::Proc {
                pid,
                path: path.to_string(),
                source,
            })
    };
    let clash = |pid: i32, what: String| DumpError::UnsupportedFd {
        pid,
        fd: -1,
        target: what,
        reason: "two shared memory files with one inode number on different devices".into(),
    };
    let mut found: std::collections::BTreeMap<u64, Found> = Default::default();
    let mut mapped: Vec<(i32, u64, u64, u64)> = Vec::new(); // (pid, start, end, ino)
    for (pid, _) in frozen {
        for l in read_maps(*pid)? {
            let shared = l.perms.as_bytes().get(3) == Some(&b's');
            let Some(orig) = l.path.strip_suffix(" (deleted)") else {
                continue;
            };
            // SysV shared memory keeps its own identity (see classify).
            if !shared || l.inode == 0 || orig.starts_with("/SYSV") {
                continue;
            }
            let at = format!("/proc/{pid}/map_files/{:x}-{:x}", l.start, l.end);
            let dev = dev_of(&at, *pid)?;
            let name = orig.strip_prefix("/memfd:").unwrap_or(orig).to_string();
            let e = found.entry(l.inode).or_insert_with(|| Found {
                dev,
                at,
                name,
                ranges: Some(Vec::new()),
            });
            if e.dev != dev {
                return Err(clash(*pid, l.path.clone()));
            }
            if let Some(r) = &mut e.ranges {
                r.push((l.offset, l.offset + (l.end - l.start)));
            }
            mapped.push((*pid, l.start, l.end, l.inode));
        }
    }
    for m in processes.iter() {
        for f in m.live().map(|p| p.fds.as_slice()).unwrap_or(&[]) {
            if let FdKind::Memfd { ino } = f.kind {
                let at = format!("/proc/{}/fd/{}", m.pid, f.fd);
                let dev = dev_of(&at, m.pid)?;
                let path = f.path.strip_suffix(" (deleted)").unwrap_or(&f.path);
                let name = path.strip_prefix("/memfd:").unwrap_or(path).to_string();
                let e = found.entry(ino).or_insert_with(|| Found {
                    dev,
                    at: at.clone(),
                    name,
                    ranges: None,
                });
                if e.dev != dev {
                    return Err(clash(m.pid, f.path.clone()));
                }
                // Held by a descriptor: all of it, read through the descriptor.
                e.ranges = None;
                e.at = at;
            }
        }
    }
    let mut out = Vec::with_capacity(found.len());
    for (ino, f) in found {
        out.push(read_shared_file(ino, &f.at, f.name, f.ranges)?);
    }
    for m in processes.iter_mut() {
        let pid = m.pid;
        let Some(p) = m.live_mut() else { continue };
        for &(_, start, end, ino) in mapped.iter().filter(|x| x.0 == pid) {
            if let Some(map) = p
                .mappings
                .iter_mut()
                .find(|x| x.start == start && x.end == end)
            {
                map.kind = MappingKind::Memfd { ino };
                p.memory.remove_range(start, end);
            }
        }
    }
    Ok(out)
}

/// Reads a file in shared memory through `at` (a `/proc` link to it): all of it, or only
/// `ranges` (file offsets).
fn read_shared_file(
    ino: u64,
    at: &str,
    name: String,
    ranges: Option<Vec<(u64, u64)>>,
) -> Result<MemfdImage, DumpError> {
    use std::os::fd::AsRawFd;
    let fail = |source: std::io::Error| DumpError::Proc {
        pid: 0,
        path: at.to_string(),
        source,
    };
    let file = File::open(at).map_err(fail)?;
    let size = file.metadata().map_err(fail)?.len();
    // SAFETY: F_GET_SEALS on a valid descriptor owned by `file` reads no memory of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let seals = (seals >= 0).then_some(seals as u32);
    let ranges = ranges.unwrap_or_else(|| vec![(0, size)]);
    let contents = read_sparse(&file, size, &ranges).map_err(fail)?;
    Ok(MemfdImage {
        ino,
        name,
        size,
        seals,
        contents,
    })
}

/// Reads the data of `file` (of `size` bytes) within `ranges` (file offsets, in any order,
/// overlapping or not) as page runs at file offsets, skipping holes (`SEEK_DATA`), so that a
/// sparse file is neither read nor, for shared memory, allocated where it has no data. The
/// last page is padded with zeros.
pub fn read_sparse(file: &File, size: u64, ranges: &[(u64, u64)]) -> std::io::Result<ImageMemory> {
    let mut rs: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(a, b)| (a / PAGE_SIZE * PAGE_SIZE, b.min(size)))
        .filter(|(a, b)| a < b)
        .collect();
    rs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in rs {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut contents = ImageMemory {
        page_size: PAGE_SIZE,
        runs: Vec::new(),
    };
    let mut buf = Vec::new();
    for (start, end) in merged {
        let mut off = start;
        while off < end {
            let data = match nix::unistd::lseek(file, off as i64, nix::unistd::Whence::SeekData) {
                Ok(d) => (d as u64 / PAGE_SIZE * PAGE_SIZE).max(off),
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = nix::unistd::lseek(file, data as i64, nix::unistd::Whence::SeekHole)
                .map(|h| (h as u64).min(end))
                .map_err(std::io::Error::from)?;
            let mut at = data;
            while at < hole {
                let n = (hole - at).min(READ_PIECE);
                buf.clear();
                buf.resize(n.div_ceil(PAGE_SIZE) as usize * PAGE_SIZE as usize, 0);
                let mut got = 0usize;
                while got < n as usize {
                    match file.read_at(&mut buf[got..n as usize], at + got as u64) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                contents.push_pages(at, &buf);
                at += n;
            }
            off = hole.max(data + PAGE_SIZE);
        }
    }
    Ok(contents)
}

/// The size of SysV shared memory segment `id` of this IPC namespace.
fn sysv_shm_size(id: i32) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
    // key shmid perms size ...
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.parse::<i32>().ok()? == id)
            .then(|| f.get(3)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "5572160a9000-5572160ab000 r--p 00000000 fe:00 247030                     /usr/bin/cat\n\
7f70dbecb000-7f70dbeed000 rw-p 00000000 00:00 0 \n\
7f70dc133000-7f70dc13a000 r--s 00001000 fe:00 325745                     /tmp/a file (deleted)\n";
        let v = parse_maps(text).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].start, 0x5572160a9000);
        assert_eq!(v[0].path, "/usr/bin/cat");
        assert_eq!(v[1].path, "");
        assert_eq!(v[2].path, "/tmp/a file (deleted)");
        assert_eq!(v[2].offset, 0x1000);
        assert_eq!(prot_of(&v[1].perms), 3);
    }

    #[test]
    fn names_network_sockets() {
        assert_eq!(
            inet_addr("0100007F:1F40").as_deref(),
            Some("127.0.0.1:8000")
        );
        assert_eq!(
            inet_addr("00000000000000000000000001000000:0050").as_deref(),
            Some("[::1]:80")
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).expect("link");
        let ino: u64 = link
            .to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .expect("inode");
        assert_eq!(
            inet_socket(ino),
            Some(format!("a TCP socket listening on 127.0.0.1:{port}"))
        );
        // std listens with a backlog of 128.
        assert_eq!(
            super::super::unix::tcp_listen_backlog(libc::AF_INET, ino),
            Ok(Some(128))
        );
    }

    #[test]
    fn parses_stat() {
        let rest: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        let stat = format!("123 (a (weird) name) S {}", rest.join(" "));
        let mm = parse_mm(1, &stat).unwrap();
        assert_eq!(mm.start_code, 26);
        assert_eq!(mm.start_stack, 28);
        assert_eq!(mm.start_data, 45);
        assert_eq!(mm.env_end, 51);
        assert_eq!(parse_pgid_sid(1, &stat).unwrap(), (5, 6));
    }

    #[test]
    fn dump_of_missing_process_fails() {
        assert!(matches!(
            dump(i32::MAX - 7),
            Err(DumpError::NoSuchProcess { .. })
        ));
    }
}
