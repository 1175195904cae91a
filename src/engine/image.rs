//! The process image: plain serde structs, one per component, and their framed encoding.
//!
//! ## File format
//! ```text
//! offset  size  field
//!      0     8  magic  b"FKPTIMG\0"
//!      8     4  image format version, u32 little endian (IMAGE_FORMAT_VERSION)
//!     12     4  flags, u32 little endian (0; reserved)
//!     16     8  payload length in bytes, u64 little endian
//!     24    32  BLAKE3 hash of the payload
//!     56     …  payload: the ProcessImage encoded with postcard
//! ```
//! The format version is independent of the crate version; bump it whenever the serde structs
//! change incompatibly. Decoding checks, in order: that the header is complete, the magic, the
//! version (a newer version gives [`ImageError::NewerVersion`]), the size limit, that the payload
//! is complete, the checksum, and finally that postcard consumes the payload exactly.
//!
//! ## Memory
//! Memory contents are an [`ImageMemory`]: a list of [`PageRun`]s (address + length + data).
//! Runs never cross a [`RUN_ALIGN`] boundary, so identical memory produces identical runs from
//! dump to dump. Pages that are all zero are recorded as [`PageData::Zero`] without bytes.
//! A store can move the bytes out of the image with [`ImageMemory::externalize`], which replaces
//! them with [`PageData::Stored`] (a BLAKE3 hash); restore then asks a
//! [`ChunkSource`](super::restore::ChunkSource) for them.

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::tracer::UserRegs;

/// Magic at the start of every image.
pub const IMAGE_MAGIC: [u8; 8] = *b"FKPTIMG\0";
/// Magic at the start of every process-tree image ([`TreeImage`]).
pub const TREE_MAGIC: [u8; 8] = *b"FKPTTRE\0";
/// Current image format version (shared by process and tree images).
/// 2: [`FdKind::Pipe`] and tree images.
/// 3: signal state ([`SignalState`]: pending signals with their `siginfo`, interval timers,
///    POSIX timers),
///    carried after the image in the payload; [`FdKind::EventFd`]. Version 1 and 2 images still decode (with no
///    pending signals and no timers, which is what they captured).
/// 4: unix socket pairs ([`SocketPairImage`], [`FdKind::UnixSocket`]), carried after the
///    signal state in a tree payload. Older images decode with no sockets.
/// 5: shared memory files ([`MemfdImage`]: memfds, shared anonymous memory, deleted files
///    mapped shared), with [`FdKind::Memfd`] and [`MappingKind::Memfd`], carried after the
///    sockets in a tree payload, and SysV attachments ([`MappingKind::SysvShm`]). Older
///    images decode with none.
/// 6: [`PageData::Base`] runs (delta images). Older images decode unchanged.
/// 7: file locks, carried after the shared memory files.
/// 8: [`FdKind::Inotify`], [`FdKind::Bound`] and [`FdKind::Dup`]; after the file locks,
///    the stopped
///    members ([`TreeImage::stopped`]) and the listening sockets ([`TreeImage::bound_sockets`]).
pub const IMAGE_FORMAT_VERSION: u32 = 9;
/// Size of one `siginfo_t` on x86_64.
pub const SIGINFO_LEN: usize = 128;
/// Length of the framed header.
pub const HEADER_LEN: usize = 56;
/// Default upper bound on the payload size accepted by [`decode`].
pub const DEFAULT_MAX_IMAGE_LEN: u64 = 64 << 30;
/// Page runs with bytes never cross a multiple of this many bytes (one page).
pub const RUN_ALIGN: u64 = 4096;
/// Page size on x86_64.
pub const PAGE_SIZE: u64 = 4096;

/// Errors while encoding or decoding an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// postcard could not encode the image.
    #[error("encoding the image failed: {0}")]
    Encode(postcard::Error),
    /// The payload is not a valid postcard encoding of an image.
    #[error("decoding the image payload failed: {0}")]
    Decode(postcard::Error),
    /// The file does not start with the image magic.
    #[error("not a forkpoint image (magic {found:02x?})")]
    BadMagic {
        /// The first bytes of the file.
        found: Vec<u8>,
    },
    /// The image was written by a newer forkpoint.
    #[error("image format version {found} is newer than the supported version {supported}")]
    NewerVersion {
        /// Version in the file.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// Version 0 or otherwise unknown.
    #[error("unsupported image format version {found}")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
    },
    /// The header declares a payload larger than the limit.
    #[error("image payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// The file ends before the header or payload is complete.
    #[error("image is truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// Data follows the payload.
    #[error("image has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: u64,
    },
    /// The payload hash does not match the header.
    #[error("image checksum mismatch: header says {expected}, payload hashes to {actual}")]
    Checksum {
        /// Hash from the header (hex).
        expected: String,
        /// Hash of the payload (hex).
        actual: String,
    },
    /// The payload decodes but contradicts itself.
    #[error("image is inconsistent: {reason}")]
    Inconsistent {
        /// What does not fit.
        reason: String,
    },
    /// I/O error while reading or writing an image.
    #[error("image I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serialize `Vec<u8>` as one byte string instead of a sequence of integers.
/// Serde helper for `Vec<u8>` fields: one byte string instead of a sequence of `u8`. In
/// postcard both are a length and the raw bytes, so the encoding is unchanged; decoding
/// takes one call instead of one per byte.
pub mod bytes {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes `v` as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// Deserializes a byte string (or a sequence of `u8`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(V)
    }
}

/// A whole single process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessImage {
    /// Pid at dump time.
    pub pid: i32,
    /// `comm` of the process (thread group leader).
    pub comm: String,
    /// Target of `/proc/PID/exe` at dump time.
    pub exe: Option<String>,
    /// `uname -r` of the kernel the image was taken on.
    pub kernel_release: String,
    /// Threads; the first one is the thread group leader.
    pub threads: Vec<ThreadState>,
    /// Memory mappings in address order.
    pub mappings: Vec<Mapping>,
    /// Memory contents.
    pub memory: ImageMemory,
    /// `mm_struct` layout fields (brk, stack, arguments, environment, auxv).
    pub mm: MmState,
    /// Open file descriptors.
    pub fds: Vec<FdState>,
    /// Credentials.
    pub creds: Creds,
    /// Working directory.
    pub cwd: String,
    /// File creation mask.
    pub umask: u32,
    /// `personality(2)` value.
    pub personality: u32,
    /// Process group id at dump time.
    pub pgid: i32,
    /// Session id at dump time.
    pub sid: i32,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Signal dispositions (process-wide), for every signal except SIGKILL/SIGSTOP.
    pub sigactions: Vec<SigAction>,
    /// Pending signals and interval timers (format version 3). Encoded after the image
    /// rather than as a field of it, so that version 1 and 2 payloads still decode.
    #[serde(skip)]
    pub signals: SignalState,
    /// File locks the process holds (format version 7, trees only). Encoded after the
    /// memory files.
    #[serde(skip)]
    pub locks: Vec<FileLock>,
}

/// What kind of file lock ([`FileLock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    /// `flock(2)`: owned by the open file.
    Flock,
    /// A POSIX record lock (`fcntl(F_SETLK)`, `lockf`): owned by the process.
    Posix,
    /// An open file description lock (`fcntl(F_OFD_SETLK)`): owned by the open file.
    Ofd,
}

/// A file lock a process holds through one of its descriptors (`/proc/PID/fdinfo/FD`),
/// taken again on the same descriptor at restore ([`IMAGE_FORMAT_VERSION`] 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    /// The descriptor it was taken through.
    pub fd: i32,
    pub kind: LockKind,
    /// Exclusive (write) rather than shared (read).
    pub write: bool,
    /// First byte (0 for flock).
    pub start: u64,
    /// Last byte, `None` to the end of the file (and for flock).
    pub end: Option<u64>,
}

/// Signals on their way to a process, and the timers that will send more
/// ([`IMAGE_FORMAT_VERSION`] 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalState {
    /// Signals pending for the whole process (the shared queue), oldest first.
    pub shared: Vec<SigInfo>,
    /// Signals pending for one thread: (tid, its queue, oldest first).
    pub threads: Vec<(i32, Vec<SigInfo>)>,
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`, as `getitimer` reports them.
    pub itimers: Vec<ITimer>,
    /// Timers made by `timer_create`, recreated with the same ids.
    pub posix_timers: Vec<PosixTimer>,
}

/// One POSIX timer (`timer_create`), from `/proc/PID/timers` and `timer_gettime`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    /// The timer id (`timer_t`) the program holds.
    pub id: i32,
    /// Its clock.
    pub clock: i32,
    /// `sigev_notify` (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID, ...).
    pub notify: i32,
    /// `sigev_signo`.
    pub signo: i32,
    /// `sigev_value`.
    pub value: u64,
    /// The thread signalled with SIGEV_THREAD_ID (else the process).
    pub target: i32,
    /// Period: seconds, nanoseconds.
    pub interval: (i64, i64),
    /// Time to the next expiry: seconds, nanoseconds (0, 0 when disarmed).
    pub remaining: (i64, i64),
}

/// One queued signal: its raw `siginfo_t` ([`SIGINFO_LEN`] bytes), so that `si_code`,
/// `si_pid`, `si_value` and the rest reach the handler unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo {
    /// The `siginfo_t` bytes.
    #[serde(with = "bytes")]
    pub raw: Vec<u8>,
}

impl SigInfo {
    /// `si_signo`.
    pub fn signo(&self) -> i32 {
        let mut b = [0u8; 4];
        if let Some(s) = self.raw.get(..4) {
            b.copy_from_slice(s);
        }
        i32::from_le_bytes(b)
    }
}

/// One interval timer (`struct itimerval`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ITimer {
    /// `ITIMER_REAL` (0), `ITIMER_VIRTUAL` (1) or `ITIMER_PROF` (2).
    pub which: u32,
    /// Reload value: seconds, microseconds.
    pub interval: (i64, i64),
    /// Time to the next expiry: seconds, microseconds (0, 0 when disarmed).
    pub value: (i64, i64),
}

impl ITimer {
    /// Is the timer running?
    pub fn armed(&self) -> bool {
        self.value != (0, 0)
    }
}

/// A tree of processes rooted at one process, with the pipes between them
/// ([`super::dump::dump_tree`], [`super::restore::restore_tree`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeImage {
    /// Pid of the root process at dump time.
    pub root: i32,
    /// Every member, parents before their children; the root first.
    pub processes: Vec<TreeMember>,
    /// Every pipe some member had an end of, with its buffered data.
    pub pipes: Vec<PipeImage>,
    /// Every connected pair of unix sockets inside the tree, with the queued messages
    /// (format version 4). Encoded after the image, like the signal state.
    #[serde(skip)]
    pub sockets: Vec<SocketPairImage>,
    /// Every shared memory file a member holds open or maps shared (format version 5).
    /// Encoded after the sockets.
    #[serde(skip)]
    pub memfds: Vec<MemfdImage>,
    /// How long the tree was frozen, from the dump's hook to the thaw (set by
    /// [`super::dump::dump_tree`]; not part of the image).
    #[serde(skip)]
    pub frozen_for: Option<std::time::Duration>,
    /// Members that were in a group stop (`SIGSTOP`, Ctrl-Z) at the dump (format version
    /// 8): restored stopped. Encoded after the file locks.
    #[serde(skip)]
    pub stopped: Vec<i32>,
    /// Members with no_new_privs set (format version 8): set again at restore. Encoded after
    /// the sockets made from their addresses.
    #[serde(skip)]
    pub no_new_privs: Vec<i32>,
    /// Every listening socket (TCP or unix) a member holds (format version 8), encoded after
    /// the stopped members.
    #[serde(skip)]
    pub bound_sockets: Vec<BoundSocket>,
    /// Capability sets of the members whose sets differ from what a restore gives by
    /// itself (format version 9, encoded last): set again at restore.
    #[serde(skip)]
    pub caps: Vec<(i32, CapSets)>,
    /// Seccomp filters of the members that have filters of their own, oldest first (format
    /// version 9, encoded after the capability sets): installed again at restore.
    #[serde(skip)]
    pub seccomp: Vec<(i32, Vec<SeccompFilter>)>,
}

/// One seccomp filter: its flags (`SECCOMP_FILTER_FLAG_LOG`, `..._SPEC_ALLOW`) and its BPF
/// program as the kernel holds it (`struct sock_filter`s, 8 bytes each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    pub flags: u64,
    pub prog: Vec<u8>,
}

/// The most instructions of one BPF program (`BPF_MAXINSNS`).
pub const SECCOMP_MAX_INSNS: usize = 4096;

/// A process's capability sets, as `/proc/PID/status` shows them (one bit per capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// A socket that is made again from its addresses alone ([`IMAGE_FORMAT_VERSION`] 8): a
/// listening socket (TCP, unix stream or seqpacket) or a datagram socket (UDP, or unix
/// connected to a named socket outside the tree), bound, connected or listening again
/// before the processes; every descriptor of it shares it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundSocket {
    /// Inode at dump time (the key used by [`FdKind::Bound`]).
    pub ino: u64,
    /// `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub family: i32,
    /// `SOCK_STREAM`, `SOCK_SEQPACKET` or `SOCK_DGRAM`.
    pub kind: i32,
    /// The bound address as `getsockname` returned it (a `sockaddr_in`, `sockaddr_in6` or
    /// `sockaddr_un`); an unbound one (port 0, or an unnamed unix socket) is not bound
    /// again.
    pub addr: Vec<u8>,
    /// Listening, with this backlog.
    pub listening: bool,
    /// The `listen` backlog.
    pub backlog: u32,
    /// The address it is connected to (a datagram socket), empty if none.
    pub peer: Vec<u8>,
    /// For a unix socket bound to a relative path, the directory the path is taken from at
    /// restore: the holder's working directory at the checkpoint. Empty otherwise.
    pub dir: String,
    /// For a unix socket bound to a path: the socket file's permission bits, owner and
    /// group, given back after the bind.
    pub file: Option<(u32, u32, u32)>,
    /// (level, option, value) of the integer options that were read: for TCP
    /// `SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`, `TCP_NODELAY`, `TCP_DEFER_ACCEPT`,
    /// `IPV6_V6ONLY`; for UDP `SO_REUSEADDR`, `SO_REUSEPORT`, `SO_BROADCAST`, `IPV6_V6ONLY`;
    /// for unix `SO_PASSCRED`.
    pub options: Vec<(i32, i32, i32)>,
}

impl TreeImage {
    /// Whether any process's memory refers to a base image ([`PageData::Base`]).
    pub fn is_delta(&self) -> bool {
        self.processes
            .iter()
            .filter_map(|m| m.live())
            .any(|p| p.memory.runs.iter().any(|r| r.data == PageData::Base))
    }

    /// Resolves a delta image against its base (itself resolved): each process's
    /// [`PageData::Base`] runs become the runs of the base's process of the same pid.
    pub fn resolve_against(&mut self, base: &TreeImage) -> Result<(), String> {
        for m in &mut self.processes {
            let pid = m.pid;
            let Some(p) = m.live_mut() else { continue };
            if !p.memory.runs.iter().any(|r| r.data == PageData::Base) {
                continue;
            }
            let b = base
                .processes
                .iter()
                .find(|b| b.pid == pid)
                .and_then(|b| b.live())
                .ok_or_else(|| format!("delta image: process {pid} is not in its base image"))?;
            p.memory
                .resolve_against(&b.memory)
                .map_err(|e| format!("process {pid}: {e}"))?;
        }
        Ok(())
    }
}

/// A file in shared memory that members of the tree hold open or map shared: a memfd,
/// shared anonymous memory, or a deleted file ([`IMAGE_FORMAT_VERSION`] 5). Restored once,
/// as a memfd, so that every descriptor and mapping of it shares it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemfdImage {
    /// Inode at dump time (the key used by [`FdKind::Memfd`] and [`MappingKind::Memfd`]).
    pub ino: u64,
    /// The memfd's name (without `memfd:`), or the path it was known by.
    pub name: String,
    /// File size.
    pub size: u64,
    /// `F_GET_SEALS`, where the file supports seals.
    pub seals: Option<u32>,
    /// The contents: runs at file offsets (holes are not recorded).
    pub contents: ImageMemory,
}

/// A connected pair of unix sockets (`socketpair`) both of whose ends are held inside the
/// tree ([`IMAGE_FORMAT_VERSION`] 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketPairImage {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: i32,
    /// The two ends.
    pub ends: [SocketEnd; 2],
}

/// One end of a [`SocketPairImage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketEnd {
    /// Inode at dump time (the key used by [`FdKind::UnixSocket`]).
    pub ino: u64,
    /// Messages queued for reading on this end, oldest first (for a stream, its bytes in
    /// arbitrary pieces).
    pub queue: Vec<Message>,
    /// `sk_shutdown`: bit 0 = receive side shut down, bit 1 = send side.
    pub shutdown: u8,
    /// `SO_SNDBUF` as reported by `getsockopt`.
    pub sndbuf: u32,
    /// `SO_RCVBUF` as reported by `getsockopt`.
    pub rcvbuf: u32,
    /// `SO_PEEK_OFF` (-1: off).
    pub peek_off: i32,
    /// `SO_PASSCRED`.
    pub passcred: bool,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message(#[serde(with = "bytes")] pub Vec<u8>);

/// One process of a [`TreeImage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeMember {
    /// Pid at dump time.
    pub pid: i32,
    /// Pid of the parent at dump time (outside the tree for the root).
    pub ppid: i32,
    /// Live process or zombie.
    pub state: MemberState,
}

/// What a [`TreeMember`] is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemberState {
    /// A live process (its `pid` equals the member's).
    Live(Box<ProcessImage>),
    /// A child that exited and was not yet reaped by its parent.
    Zombie {
        /// Wait status as `waitpid` reports it (`exit_code` of /proc/PID/stat).
        status: i32,
        /// Process group id.
        pgid: i32,
        /// Session id.
        sid: i32,
    },
}

impl TreeMember {
    /// The process image of a live member.
    pub fn live(&self) -> Option<&ProcessImage> {
        match &self.state {
            MemberState::Live(p) => Some(p),
            MemberState::Zombie { .. } => None,
        }
    }

    /// Mutable process image of a live member (e.g. to externalize its memory).
    pub fn live_mut(&mut self) -> Option<&mut ProcessImage> {
        match &mut self.state {
            MemberState::Live(p) => Some(p),
            MemberState::Zombie { .. } => None,
        }
    }

    /// Process group and session id.
    pub fn pgid_sid(&self) -> (i32, i32) {
        match &self.state {
            MemberState::Live(p) => (p.pgid, p.sid),
            MemberState::Zombie { pgid, sid, .. } => (*pgid, *sid),
        }
    }
}

/// A pipe with the bytes that were buffered in it at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeImage {
    /// Inode at dump time (the key used by [`FdKind::Pipe`]).
    pub ino: u64,
    /// Capacity in bytes (`F_GETPIPE_SZ`).
    pub capacity: u32,
    /// Buffered data, oldest byte first.
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
}

/// General-purpose registers (mirror of `struct user_regs_struct`).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! regs_fields {
    ($m:ident) => {
        $m!(
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    };
}

impl From<&UserRegs> for Regs {
    fn from(u: &UserRegs) -> Self {
        macro_rules! conv {
            ($($f:ident),*) => { Regs { $($f: u.$f),* } };
        }
        regs_fields!(conv)
    }
}

impl Regs {
    /// Convert to the kernel structure.
    pub fn to_user(&self) -> UserRegs {
        macro_rules! conv {
            ($($f:ident),*) => { UserRegs { $($f: self.$f),* } };
        }
        regs_fields!(conv)
    }
}

/// `stack_t` of `sigaltstack(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SigAltStack {
    /// Base address.
    pub sp: u64,
    /// `SS_DISABLE`, `SS_ONSTACK`, `SS_AUTODISARM`.
    pub flags: i32,
    /// Size.
    pub size: u64,
}

/// rseq registration of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RseqState {
    /// Address of `struct rseq`.
    pub pointer: u64,
    /// Registered size.
    pub size: u32,
    /// Abort signature.
    pub signature: u32,
}

/// Per-thread state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Thread id at dump time.
    pub tid: i32,
    /// `comm` of the thread.
    pub comm: String,
    /// General registers (interrupted system calls already rewound for restart).
    pub regs: Regs,
    /// XSAVE area as returned by `NT_X86_XSTATE`.
    #[serde(with = "bytes")]
    pub xstate: Vec<u8>,
    /// `fs` base (TLS pointer); same as `regs.fs_base`, kept explicit.
    pub fs_base: u64,
    /// `gs` base; same as `regs.gs_base`.
    pub gs_base: u64,
    /// Blocked signals.
    pub sigmask: u64,
    /// Alternate signal stack.
    pub sigaltstack: SigAltStack,
    /// `clear_child_tid` (set_tid_address), 0 if unknown.
    pub clear_child_tid: u64,
    /// Robust futex list head and length.
    pub robust_list: (u64, u64),
    /// rseq registration.
    pub rseq: Option<RseqState>,
}

/// What backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MappingKind {
    /// Private anonymous memory.
    Anon,
    /// Shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, memfd or deleted shared file).
    AnonShared,
    /// A file mapping reopened from `path` at restore.
    File,
    /// `[heap]` (private anonymous).
    Heap,
    /// `[stack]` (private anonymous, grows down).
    Stack,
    /// `[vdso]`: not dumped; the restore moves the new vDSO here.
    Vdso,
    /// `[vvar]`/`[vvar_vclock]`: not dumped; moved with the vDSO.
    Vvar,
    /// `[vsyscall]`: fixed by the kernel, ignored.
    Vsyscall,
    /// A shared mapping of a file in [`TreeImage::memfds`] (format version 5): mapped from
    /// it again, so that it stays shared with its descriptors and other processes.
    Memfd {
        /// Inode, the key into [`TreeImage::memfds`].
        ino: u64,
    },
    /// A SysV shared memory segment, attached whole (format version 5): attached again with
    /// `shmat` at restore. The segment itself belongs to the IPC namespace (a session records
    /// and recreates it, with the same id, before the processes).
    SysvShm {
        /// The segment id.
        id: i32,
    },
}

/// Identity of a mapped file, checked at restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
}

impl FileId {
    /// The identity of the file `st` describes.
    pub fn of(st: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: st.dev(),
            ino: st.ino(),
            size: st.size(),
            mtime: st.mtime(),
            mtime_nsec: st.mtime_nsec(),
        }
    }

    /// How the file `st` describes differs from this one, if it does: another inode, or
    /// (when `contents` counts) another size or mtime.
    pub fn differs(&self, st: &std::fs::Metadata, contents: bool) -> Option<String> {
        let now = FileId::of(st);
        if contents
            && (now.size, now.mtime, now.mtime_nsec) != (self.size, self.mtime, self.mtime_nsec)
        {
            return Some(format!(
                "size/mtime {}/{}.{:09} now {}/{}.{:09}",
                self.size, self.mtime, self.mtime_nsec, now.size, now.mtime, now.mtime_nsec
            ));
        }
        // Another file put in its place (a package upgrade renames a new file over the old
        // one), even with the same size and mtime.
        (now.ino != self.ino).then(|| format!("inode {} now {}", self.ino, now.ino))
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PROT_READ | PROT_WRITE | PROT_EXEC`.
    pub prot: u32,
    /// `MAP_SHARED` (true) or `MAP_PRIVATE`.
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Path or `[name]`, as shown by the kernel.
    pub path: Option<String>,
    /// Kind of mapping.
    pub kind: MappingKind,
    /// Identity of the file for `File` mappings.
    pub file: Option<FileId>,
    /// `VM_GROWSDOWN`.
    pub growsdown: bool,
}

impl Mapping {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// True for kernel-provided special mappings that are never dumped.
    pub fn is_special(&self) -> bool {
        matches!(
            self.kind,
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        )
    }
}

/// Contents of a run of pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageData {
    /// All bytes are zero.
    Zero,
    /// The bytes themselves (`len` bytes).
    Bytes(#[serde(with = "bytes")] Vec<u8>),
    /// Moved to a content-addressed store under this BLAKE3 hash.
    Stored([u8; 32]),
    /// Only in a delta image (format version 6): the pages are those of the base image, same
    /// process, same addresses ([`ImageMemory::delta_against`]). Resolved by
    /// [`TreeImage::resolve_against`] before anything else sees the image.
    Base,
}

/// Consecutive pages at `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Start address (page aligned).
    pub addr: u64,
    /// Length in bytes (multiple of the page size).
    pub len: u64,
    /// Contents.
    pub data: PageData,
}

/// All dumped memory contents.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageMemory {
    /// Page size the runs are aligned to.
    pub page_size: u64,
    /// Runs in address order.
    pub runs: Vec<PageRun>,
}

impl ImageMemory {
    /// Add `data` read at `addr` (page aligned, multiple of the page size), splitting it into
    /// runs at [`RUN_ALIGN`] boundaries and marking all-zero runs.
    pub fn push_pages(&mut self, addr: u64, data: &[u8]) {
        let mut off = 0u64;
        let total = data.len() as u64;
        while off < total {
            let a = addr + off;
            let boundary = (a / RUN_ALIGN + 1) * RUN_ALIGN;
            let len = (boundary - a).min(total - off);
            let chunk = &data[off as usize..(off + len) as usize];
            self.push_run(a, chunk);
            off += len;
        }
    }

    fn push_run(&mut self, addr: u64, chunk: &[u8]) {
        // Split further into zero / non-zero page groups.
        let ps = self.page_size.max(1) as usize;
        let mut i = 0usize;
        while i < chunk.len() {
            let end = (i + ps).min(chunk.len());
            let zero = chunk[i..end].iter().all(|&b| b == 0);
            let mut j = end;
            while j < chunk.len() {
                let e = (j + ps).min(chunk.len());
                if chunk[j..e].iter().all(|&b| b == 0) != zero {
                    break;
                }
                j = e;
            }
            let a = addr + i as u64;
            let len = (j - i) as u64;
            if zero {
                // Zero runs carry no bytes, so they need no alignment: merge neighbours.
                if let Some(last) = self.runs.last_mut() {
                    if last.data == PageData::Zero && last.addr + last.len == a {
                        last.len += len;
                        i = j;
                        continue;
                    }
                }
                self.runs.push(PageRun {
                    addr: a,
                    len,
                    data: PageData::Zero,
                });
            } else {
                let data = PageData::Bytes(chunk[i..j].to_vec());
                self.runs.push(PageRun { addr: a, len, data });
            }
            i = j;
        }
    }

    /// Appends a run made by [`ImageMemory::push_pages`] (above every run so far), merged
    /// into the last one when both are zero and adjacent, as `push_pages` would have.
    pub fn push_read_run(&mut self, run: PageRun) {
        if run.data == PageData::Zero {
            if let Some(last) = self.runs.last_mut() {
                if last.data == PageData::Zero && last.addr + last.len == run.addr {
                    last.len += run.len;
                    return;
                }
            }
        }
        self.runs.push(run);
    }

    /// This memory as a delta against `base` (page address → contents in the base image,
    /// as [`super::dirty::DirtyTracker::pages`] gives them): every stored page that the base
    /// holds with the same hash becomes part of a [`PageData::Base`] run, adjacent ones
    /// merged. Returns the runs and how many pages went to the base. Exact equality of the
    /// hash is the only test, so the delta is right whatever happened in between.
    pub fn delta_against(
        &self,
        base: &std::collections::BTreeMap<u64, PageData>,
    ) -> (Vec<PageRun>, u64) {
        let mut out: Vec<PageRun> = Vec::with_capacity(self.runs.len() / 4);
        let mut from_base = 0u64;
        let mut cursor = base.range(..).peekable();
        for r in &self.runs {
            if matches!(r.data, PageData::Stored(_)) && r.len == self.page_size {
                while cursor.peek().is_some_and(|(&a, _)| a < r.addr) {
                    cursor.next();
                }
                if cursor
                    .peek()
                    .is_some_and(|(&a, d)| a == r.addr && **d == r.data)
                {
                    from_base += 1;
                    match out.last_mut() {
                        Some(last)
                            if last.data == PageData::Base && last.addr + last.len == r.addr =>
                        {
                            last.len += r.len;
                        }
                        _ => out.push(PageRun {
                            addr: r.addr,
                            len: r.len,
                            data: PageData::Base,
                        }),
                    }
                    continue;
                }
            }
            out.push(r.clone());
        }
        (out, from_base)
    }

    /// Replaces every [`PageData::Base`] run by the runs `base` has there. `base` must cover
    /// each such run exactly with stored pages or zero runs; anything else is refused.
    pub fn resolve_against(&mut self, base: &ImageMemory) -> Result<(), String> {
        if !self.runs.iter().any(|r| r.data == PageData::Base) {
            return Ok(());
        }
        let mut out = ImageMemory {
            page_size: self.page_size,
            runs: Vec::with_capacity(base.runs.len().max(self.runs.len())),
        };
        for r in std::mem::take(&mut self.runs) {
            if r.data != PageData::Base {
                out.push_read_run(r);
                continue;
            }
            let (mut a, end) = (r.addr, r.addr.saturating_add(r.len));
            let mut i = base.runs.partition_point(|b| b.addr + b.len <= a);
            while a < end {
                let missing = || format!("delta image: page {a:#x} is not in its base image");
                let b = base
                    .runs
                    .get(i)
                    .filter(|b| b.addr <= a)
                    .ok_or_else(missing)?;
                let b_end = b.addr + b.len;
                match &b.data {
                    PageData::Zero => {
                        let e = b_end.min(end);
                        out.push_read_run(PageRun {
                            addr: a,
                            len: e - a,
                            data: PageData::Zero,
                        });
                        a = e;
                    }
                    PageData::Stored(_) if b.addr == a && b_end <= end => {
                        out.push_read_run(b.clone());
                        a = b_end;
                    }
                    _ => {
                        return Err(format!(
                        "delta image: pages {:#x}-{end:#x} do not match the runs of its base image",
                        r.addr
                    ))
                    }
                }
                i += 1;
            }
        }
        *self = out;
        Ok(())
    }

    /// Total bytes covered by runs.
    pub fn covered_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Forgets what lies in `[start, end)`: runs inside go, zero runs across an edge (the
    /// only ones that cross pages) are cut.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.runs.len());
        for r in self.runs.drain(..) {
            let (a, b) = (r.addr, r.addr + r.len);
            if b <= start || a >= end {
                out.push(r);
                continue;
            }
            if r.data != PageData::Zero {
                continue;
            }
            if a < start {
                out.push(PageRun {
                    addr: a,
                    len: start - a,
                    data: PageData::Zero,
                });
            }
            if b > end {
                out.push(PageRun {
                    addr: end,
                    len: b - end,
                    data: PageData::Zero,
                });
            }
        }
        self.runs = out;
    }

    /// Bytes held inline (`PageData::Bytes`).
    pub fn inline_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| matches!(r.data, PageData::Bytes(_)))
            .map(|r| r.len)
            .sum()
    }

    /// Move every inline run out of the image: `store` receives the bytes and the BLAKE3 hash
    /// and must persist them; the run then only keeps the hash.
    pub fn externalize<E>(
        &mut self,
        mut store: impl FnMut(&[u8; 32], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        for (h, b) in self.take_inline() {
            store(&h, &b)?;
        }
        Ok(())
    }

    /// Replaces every inline run by its BLAKE3 hash (hashed on every core) and returns the
    /// hashes with the bytes, in order, for the caller to store.
    pub fn take_inline(&mut self) -> Vec<([u8; 32], Vec<u8>)> {
        let pieces: Vec<&[u8]> = self
            .runs
            .iter()
            .filter_map(|r| match &r.data {
                PageData::Bytes(b) => Some(b.as_slice()),
                _ => None,
            })
            .collect();
        let hashes = forkpoint_fs::ContentId::of_many(&pieces);
        drop(pieces);
        let mut hashes = hashes.into_iter();
        let mut out = Vec::new();
        for run in &mut self.runs {
            if matches!(run.data, PageData::Bytes(_)) {
                let Some(id) = hashes.next() else {
                    unreachable!("one hash per inline run");
                };
                if let PageData::Bytes(b) = std::mem::replace(&mut run.data, PageData::Stored(id.0))
                {
                    out.push((id.0, b));
                }
            }
        }
        out
    }

    /// Read a little-endian u64 at `addr` from inline runs (used by tests and tools).
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let run = self
            .runs
            .iter()
            .find(|r| r.addr <= addr && addr + 8 <= r.addr + r.len)?;
        match &run.data {
            PageData::Zero => Some(0),
            PageData::Bytes(b) => {
                let o = (addr - run.addr) as usize;
                let mut a = [0u8; 8];
                a.copy_from_slice(b.get(o..o + 8)?);
                Some(u64::from_le_bytes(a))
            }
            PageData::Stored(_) | PageData::Base => None,
        }
    }
}

/// Kind of file behind a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// One of the allowed character devices (/dev/null, /dev/zero, /dev/urandom).
    CharDevice,
    /// One end of a pipe (which end: `O_ACCMODE` of `flags`). Only in process trees
    /// ([`TreeImage`]): the pipe itself, with its buffered data, is a [`PipeImage`].
    Pipe {
        /// Inode of the pipe (`pipe:[INO]`), the key into [`TreeImage::pipes`].
        ino: u64,
    },
    /// A timerfd (format version 3): its clock, the time to the next expiry and the period
    /// as (seconds, nanoseconds), and expirations not yet read.
    TimerFd {
        /// `CLOCK_REALTIME`, `CLOCK_MONOTONIC`, `CLOCK_BOOTTIME`, ...
        clock: i32,
        /// Expirations not yet read.
        ticks: u64,
        /// Time to the next expiry (0, 0 when disarmed).
        value: (i64, i64),
        /// Period.
        interval: (i64, i64),
    },
    /// A signalfd with its signal mask (format version 3).
    SignalFd {
        /// Bit `n-1` for signal `n`.
        mask: u64,
    },
    /// A terminal (format version 3): reopened at restore on the restoring side's terminal
    /// (see `RestoreOptions::terminal`), not on the old device.
    Tty,
    /// An epoll instance with what it watches (format version 3). Restored after every other
    /// descriptor of the process, since it refers to them by number.
    Epoll {
        /// Watched descriptors, by their number in this process.
        watches: Vec<EpollWatch>,
    },
    /// An eventfd with its counter (format version 3). Each eventfd is held by one descriptor
    /// of one process; shared ones are refused at dump.
    EventFd {
        /// The counter at the checkpoint.
        count: u64,
        /// Created with `EFD_SEMAPHORE`.
        semaphore: bool,
    },
    /// One end of a unix socket pair inside the tree (format version 4): the pair itself,
    /// with its queued messages, is a [`SocketPairImage`].
    UnixSocket {
        /// Inode of the socket (`socket:[INO]`), the key into [`TreeImage::sockets`].
        ino: u64,
    },
    /// A memfd (format version 5); only in process trees, whose [`TreeImage::memfds`] holds
    /// the file. Every descriptor of one memfd shares one file position after a restore.
    Memfd {
        /// Inode of the memfd, the key into [`TreeImage::memfds`].
        ino: u64,
    },
    /// A listening socket, TCP or unix (format version 8); only in process trees, whose
    /// [`TreeImage::bound_sockets`] holds it.
    Bound {
        /// Inode of the socket, the key into [`TreeImage::bound_sockets`].
        ino: u64,
    },
    /// The same open file as descriptor `fd` of member `pid` (format version 8): a
    /// descriptor `dup`ed or inherited, which shares its file position and status flags with
    /// that one. `pid` is an earlier member, or this process with a lower descriptor; that
    /// descriptor has the file's own kind.
    Dup {
        /// The member holding the descriptor restored first.
        pid: i32,
        /// Its number there.
        fd: i32,
    },
    /// An inotify instance with its watches (format version 8), made again with the same
    /// watch descriptors. Checkpointed only with no event queued (events cannot be put
    /// back).
    Inotify {
        /// The watches, in the order of their descriptors.
        watches: Vec<InotifyWatch>,
    },
}

/// One inotify watch (`inotify_add_watch` arguments and the descriptor it returned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    /// The watch descriptor.
    pub wd: i32,
    /// Events and flags (`IN_ONESHOT`, `IN_EXCL_UNLINK`, ...) as the kernel keeps them.
    pub mask: u32,
    /// The watched file, by the path it had at the checkpoint.
    pub path: String,
    /// Its inode at the checkpoint.
    pub ino: u64,
}

/// One descriptor watched by an epoll instance (`epoll_ctl(EPOLL_CTL_ADD)` arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollWatch {
    /// The watched descriptor's number.
    pub fd: i32,
    /// `events` (EPOLLIN, EPOLLET, ...).
    pub events: u32,
    /// `data`, returned with every event.
    pub data: u64,
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdState {
    /// Descriptor number.
    pub fd: i32,
    /// Path of the open file.
    pub path: String,
    /// File position.
    pub pos: u64,
    /// Open flags from fdinfo (`O_ACCMODE`, `O_APPEND`, `O_CLOEXEC`, ...).
    pub flags: i32,
    /// Kind of file.
    pub kind: FdKind,
}

/// Credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Creds {
    /// Real, effective, saved, filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem gid.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_*`.
    pub resource: u32,
    /// Soft limit.
    pub cur: u64,
    /// Hard limit.
    pub max: u64,
}

/// Kernel `struct sigaction` of one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// Signal number.
    pub sig: u32,
    /// Handler address, or SIG_DFL (0) / SIG_IGN (1).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Blocked mask while the handler runs.
    pub mask: u64,
}

/// Layout fields of the `mm_struct`, restored with `prctl(PR_SET_MM, PR_SET_MM_MAP)`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Saved auxiliary vector (pairs of u64, ending with AT_NULL).
    pub auxv: Vec<u64>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Encode an image into the framed format.
pub fn encode(img: &ProcessImage) -> Result<Vec<u8>, ImageError> {
    encode_framed(&(img, &img.signals), &IMAGE_MAGIC)
}

/// Encode a process-tree image into the framed format (magic [`TREE_MAGIC`]).
pub fn encode_tree(img: &TreeImage) -> Result<Vec<u8>, ImageError> {
    let signals: Vec<(i32, &SignalState)> = img
        .processes
        .iter()
        .filter_map(|m| m.live().map(|p| (m.pid, &p.signals)))
        .collect();
    let locks: Vec<(i32, &Vec<FileLock>)> = img
        .processes
        .iter()
        .filter_map(|m| m.live().map(|p| (m.pid, &p.locks)))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    // A whole image is written as version 5, which older builds read; only a delta needs 6,
    // only an image with file locks needs 7, only one with inotify instances, listening
    // sockets or stopped members needs 8, and only one with capability sets or seccomp
    // filters of its members' own needs 9.
    if !img.caps.is_empty() || !img.seccomp.is_empty() {
        return encode_framed_version(
            &(
                img,
                signals,
                &img.sockets,
                &img.memfds,
                locks,
                &img.stopped,
                &img.bound_sockets,
                &img.no_new_privs,
                &img.caps,
                &img.seccomp,
            ),
            &TREE_MAGIC,
            9,
        );
    }
    let v8 = !img.stopped.is_empty()
        || !img.no_new_privs.is_empty()
        || !img.bound_sockets.is_empty()
        || img
            .processes
            .iter()
            .filter_map(|m| m.live())
            .flat_map(|p| &p.fds)
            .any(|f| matches!(f.kind, FdKind::Inotify { .. } | FdKind::Dup { .. }));
    if v8 {
        return encode_framed_version(
            &(
                img,
                signals,
                &img.sockets,
                &img.memfds,
                locks,
                &img.stopped,
                &img.bound_sockets,
                &img.no_new_privs,
            ),
            &TREE_MAGIC,
            8,
        );
    }
    if !locks.is_empty() {
        return encode_framed_version(
            &(img, signals, &img.sockets, &img.memfds, locks),
            &TREE_MAGIC,
            7,
        );
    }
    let version = if img.is_delta() { 6 } else { 5 };
    encode_framed_version(
        &(img, signals, &img.sockets, &img.memfds),
        &TREE_MAGIC,
        version,
    )
}

/// A version 3 process payload: the image, then its signal state.
fn process_from_payload(version: u32, payload: &[u8]) -> Result<ProcessImage, ImageError> {
    if version < 3 {
        return from_payload(payload);
    }
    let (mut img, signals): (ProcessImage, SignalState) = from_payload(payload)?;
    img.signals = signals;
    Ok(img)
}

/// A version 3 tree payload: the image, then (pid, signal state) of every live member;
/// version 4 adds the socket pairs.
fn tree_from_payload(version: u32, payload: &[u8]) -> Result<TreeImage, ImageError> {
    if version < 3 {
        return from_payload(payload);
    }
    let (mut img, signals) = if version < 4 {
        from_payload::<(TreeImage, Vec<(i32, SignalState)>)>(payload)?
    } else if version < 5 {
        let (mut img, signals, sockets): (TreeImage, Vec<(i32, SignalState)>, _) =
            from_payload(payload)?;
        img.sockets = sockets;
        (img, signals)
    } else if version < 7 {
        let (mut img, signals, sockets, memfds): (TreeImage, Vec<(i32, SignalState)>, _, _) =
            from_payload(payload)?;
        img.sockets = sockets;
        img.memfds = memfds;
        (img, signals)
    } else {
        type V7 = (
            TreeImage,
            Vec<(i32, SignalState)>,
            Vec<SocketPairImage>,
            Vec<MemfdImage>,
            Vec<(i32, Vec<FileLock>)>,
        );
        type V8 = (
            TreeImage,
            Vec<(i32, SignalState)>,
            Vec<SocketPairImage>,
            Vec<MemfdImage>,
            Vec<(i32, Vec<FileLock>)>,
            Vec<i32>,
            Vec<BoundSocket>,
            Vec<i32>,
        );
        type V9 = (
            TreeImage,
            Vec<(i32, SignalState)>,
            Vec<SocketPairImage>,
            Vec<MemfdImage>,
            Vec<(i32, Vec<FileLock>)>,
            Vec<i32>,
            Vec<BoundSocket>,
            Vec<i32>,
            Vec<(i32, CapSets)>,
            Vec<(i32, Vec<SeccompFilter>)>,
        );
        let (mut img, signals, sockets, memfds, locks) = if version < 8 {
            let v: V7 = from_payload(payload)?;
            v
        } else if version >= 9 {
            let (mut img, signals, sockets, memfds, locks, stopped, listeners, nnp, caps, sec): V9 =
                from_payload(payload)?;
            let pids = stopped
                .iter()
                .chain(&nnp)
                .chain(caps.iter().map(|(p, _)| p));
            for &pid in pids.chain(sec.iter().map(|(p, _)| p)) {
                live_member(
                    &mut img,
                    pid,
                    "the stopped, no_new_privs, capability or seccomp list",
                )?;
            }
            for (pid, filters) in &sec {
                // Only the flags a dump can record (log, spec_allow): never a listener or
                // a thread sync from a crafted image.
                let whole = |f: &SeccompFilter| {
                    f.flags & !0b110 == 0
                        && !f.prog.is_empty()
                        && f.prog.len() % 8 == 0
                        && f.prog.len() <= SECCOMP_MAX_INSNS * 8
                };
                if filters.len() > SECCOMP_MAX_INSNS || !filters.iter().all(whole) {
                    return Err(ImageError::Inconsistent {
                        reason: format!(
                            "seccomp filters of process {pid}: a program that is not a whole \
                             number of instructions, or too many"
                        ),
                    });
                }
            }
            img.seccomp = sec;
            img.no_new_privs = nnp;
            img.stopped = stopped;
            img.bound_sockets = listeners;
            img.caps = caps;
            (img, signals, sockets, memfds, locks)
        } else {
            let (mut img, signals, sockets, memfds, locks, stopped, listeners, nnp): V8 =
                from_payload(payload)?;
            for &pid in stopped.iter().chain(&nnp) {
                live_member(&mut img, pid, "the stopped or no_new_privs list")?;
            }
            img.no_new_privs = nnp;
            img.stopped = stopped;
            img.bound_sockets = listeners;
            (img, signals, sockets, memfds, locks)
        };
        img.sockets = sockets;
        img.memfds = memfds;
        for (pid, l) in locks {
            live_member(&mut img, pid, "file locks")?.locks = l;
        }
        (img, signals)
    };
    for (pid, st) in signals {
        live_member(&mut img, pid, "signal state")?.signals = st;
    }
    Ok(img)
}

/// The live member `pid` of a tree, which the part of the payload named `what` is for.
fn live_member<'a>(
    img: &'a mut TreeImage,
    pid: i32,
    what: &str,
) -> Result<&'a mut ProcessImage, ImageError> {
    img.processes
        .iter_mut()
        .find(|m| m.pid == pid)
        .and_then(TreeMember::live_mut)
        .ok_or(ImageError::Inconsistent {
            reason: format!("{what} for process {pid}, which is not a live member"),
        })
}

/// Decode a framed process-tree image with the default size limit.
pub fn decode_tree(bytes: &[u8]) -> Result<TreeImage, ImageError> {
    decode_tree_with_limit(bytes, DEFAULT_MAX_IMAGE_LEN)
}

/// Decode a framed process-tree image whose payload may be at most `limit` bytes.
pub fn decode_tree_with_limit(bytes: &[u8], limit: u64) -> Result<TreeImage, ImageError> {
    let (version, payload) = framed_payload(bytes, limit, &TREE_MAGIC)?;
    tree_from_payload(version, payload)
}

fn encode_framed<T: Serialize>(img: &T, magic: &[u8; 8]) -> Result<Vec<u8>, ImageError> {
    encode_framed_version(img, magic, IMAGE_FORMAT_VERSION)
}

fn encode_framed_version<T: Serialize>(
    img: &T,
    magic: &[u8; 8],
    version: u32,
) -> Result<Vec<u8>, ImageError> {
    let payload = postcard::to_stdvec(img).map_err(ImageError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(&payload, magic, version));
    out.extend_from_slice(&payload);
    Ok(out)
}

fn header(payload: &[u8], magic: &[u8; 8], version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..56].copy_from_slice(blake3::hash(payload).as_bytes());
    h
}

/// Parsed header fields.
struct Header {
    version: u32,
    len: u64,
    hash: [u8; 32],
}

fn parse_header(h: &[u8], limit: u64, magic: &[u8; 8]) -> Result<Header, ImageError> {
    if h.len() < HEADER_LEN {
        // Report a bad magic before truncation if what we have already differs.
        let n = h.len().min(8);
        if h[..n] != magic[..n] {
            return Err(ImageError::BadMagic {
                found: h[..n].to_vec(),
            });
        }
        return Err(ImageError::Truncated {
            expected: HEADER_LEN as u64,
            got: h.len() as u64,
        });
    }
    if h[0..8] != magic[..] {
        return Err(ImageError::BadMagic {
            found: h[0..8].to_vec(),
        });
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..12]);
    let version = u32::from_le_bytes(v);
    if version > IMAGE_FORMAT_VERSION {
        return Err(ImageError::NewerVersion {
            found: version,
            supported: IMAGE_FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(ImageError::UnsupportedVersion { found: version });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&h[16..24]);
    let len = u64::from_le_bytes(l);
    if len > limit {
        return Err(ImageError::TooLarge { len, limit });
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&h[24..56]);
    Ok(Header { version, len, hash })
}

fn check_payload(hdr: &Header, payload: &[u8]) -> Result<(), ImageError> {
    let actual = blake3::hash(payload);
    if actual.as_bytes() != &hdr.hash {
        return Err(ImageError::Checksum {
            expected: hex(&hdr.hash),
            actual: hex(actual.as_bytes()),
        });
    }
    Ok(())
}

fn from_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ImageError> {
    let (img, rest) = postcard::take_from_bytes(payload).map_err(ImageError::Decode)?;
    if !rest.is_empty() {
        return Err(ImageError::TrailingBytes {
            extra: rest.len() as u64,
        });
    }
    Ok(img)
}

/// Decode a framed image with the default size limit.
pub fn decode(bytes: &[u8]) -> Result<ProcessImage, ImageError> {
    decode_with_limit(bytes, DEFAULT_MAX_IMAGE_LEN)
}

/// Decode a framed image whose payload may be at most `limit` bytes.
pub fn decode_with_limit(bytes: &[u8], limit: u64) -> Result<ProcessImage, ImageError> {
    let (version, payload) = framed_payload(bytes, limit, &IMAGE_MAGIC)?;
    process_from_payload(version, payload)
}

/// Checks the header, the length and the checksum; returns the format version and the
/// payload.
fn framed_payload<'a>(
    bytes: &'a [u8],
    limit: u64,
    magic: &[u8; 8],
) -> Result<(u32, &'a [u8]), ImageError> {
    let hdr = parse_header(bytes, limit, magic)?;
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < hdr.len {
        return Err(ImageError::Truncated {
            expected: HEADER_LEN as u64 + hdr.len,
            got: bytes.len() as u64,
        });
    }
    if have > hdr.len {
        return Err(ImageError::TrailingBytes {
            extra: have - hdr.len,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    check_payload(&hdr, payload)?;
    Ok((hdr.version, payload))
}

/// Write a framed image to `w`.
pub fn write_to(img: &ProcessImage, mut w: impl std::io::Write) -> Result<(), ImageError> {
    let payload = postcard::to_stdvec(&(img, &img.signals)).map_err(ImageError::Encode)?;
    w.write_all(&header(&payload, &IMAGE_MAGIC, IMAGE_FORMAT_VERSION))?;
    w.write_all(&payload)?;
    w.flush()?;
    Ok(())
}

/// Read exactly one framed image from `r` (the payload may be at most `limit` bytes).
pub fn read_from(mut r: impl std::io::Read, limit: u64) -> Result<ProcessImage, ImageError> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    (&mut r).take(HEADER_LEN as u64).read_to_end(&mut h)?;
    let hdr = parse_header(&h, limit, &IMAGE_MAGIC)?;
    let mut payload = Vec::with_capacity(hdr.len.min(1 << 30) as usize);
    (&mut r).take(hdr.len).read_to_end(&mut payload)?;
    if (payload.len() as u64) < hdr.len {
        return Err(ImageError::Truncated {
            expected: HEADER_LEN as u64 + hdr.len,
            got: (HEADER_LEN + payload.len()) as u64,
        });
    }
    check_payload(&hdr, &payload)?;
    process_from_payload(hdr.version, &payload)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Memory of per-page contents: `None` a gap, `Some(0)` a zero page, `Some(k)` a
    /// stored page with hash `[k; 32]`; zero pages merged as a dump merges them.
    fn memory_of(pages: &[Option<u8>]) -> ImageMemory {
        let mut m = ImageMemory {
            page_size: PAGE_SIZE,
            runs: Vec::new(),
        };
        for (i, p) in pages.iter().enumerate() {
            let Some(k) = p else { continue };
            m.push_read_run(PageRun {
                addr: 0x10000 + i as u64 * PAGE_SIZE,
                len: PAGE_SIZE,
                data: if *k == 0 {
                    PageData::Zero
                } else {
                    PageData::Stored([*k; 32])
                },
            });
        }
        m
    }

    proptest! {
        /// A delta resolved against its base is the memory it was made from, whatever
        /// changed in between (pages written, dropped, mapped, unmapped).
        #[test]
        fn delta_resolves_to_the_same_memory(
            base in proptest::collection::vec(proptest::option::weighted(0.9, 0u8..4), 0..300),
            changes in proptest::collection::vec((0usize..300, proptest::option::weighted(0.8, 0u8..6)), 0..40),
        ) {
            let mut now = base.clone();
            for (i, p) in changes {
                if i < now.len() { now[i] = p } else { now.push(p) }
            }
            let (base_mem, now_mem) = (memory_of(&base), memory_of(&now));
            let pages: std::collections::BTreeMap<u64, PageData> = base
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.map(|k| (0x10000 + i as u64 * PAGE_SIZE, if k == 0 { PageData::Zero } else { PageData::Stored([k; 32]) })))
                .collect();
            let (runs, from_base) = now_mem.delta_against(&pages);
            let same = base.iter().zip(&now).filter(|(b, n)| b == n && matches!(n, Some(k) if *k > 0)).count();
            prop_assert_eq!(from_base, same as u64);
            let mut delta = ImageMemory { page_size: PAGE_SIZE, runs };
            delta.resolve_against(&base_mem).unwrap();
            prop_assert_eq!(delta, now_mem);
        }
    }

    /// A whole tree image is written as format 5 (older builds read it); only a delta,
    /// which they could not resolve, as 6. Both decode.
    #[test]
    fn only_delta_images_need_format_6() {
        let img = sample();
        let mut tree = TreeImage {
            frozen_for: None,
            stopped: Vec::new(),
            no_new_privs: Vec::new(),
            caps: Vec::new(),
            seccomp: Vec::new(),
            bound_sockets: Vec::new(),
            root: 42,
            processes: vec![TreeMember {
                pid: 42,
                ppid: 1,
                state: MemberState::Live(Box::new(img)),
            }],
            pipes: Vec::new(),
            sockets: Vec::new(),
            memfds: Vec::new(),
        };
        let whole = encode_tree(&tree).unwrap();
        assert_eq!(whole[8..12], 5u32.to_le_bytes());
        assert_eq!(decode_tree(&whole).unwrap(), tree);
        if let Some(p) = tree.processes[0].live_mut() {
            p.memory.runs.push(PageRun {
                addr: 0x100000,
                len: PAGE_SIZE,
                data: PageData::Base,
            });
        }
        let delta = encode_tree(&tree).unwrap();
        assert_eq!(delta[8..12], 6u32.to_le_bytes());
        assert!(decode_tree(&delta).unwrap().is_delta());
    }

    #[test]
    fn delta_outside_its_base_is_refused() {
        let base = memory_of(&[Some(1), Some(0), None, Some(2)]);
        for (addr, len) in [
            (0x10000 + 2 * PAGE_SIZE, PAGE_SIZE),
            (0x10000, 3 * PAGE_SIZE),
            (0x10000 + 4 * PAGE_SIZE, PAGE_SIZE),
        ] {
            let mut d = ImageMemory {
                page_size: PAGE_SIZE,
                runs: vec![PageRun {
                    addr,
                    len,
                    data: PageData::Base,
                }],
            };
            assert!(d.resolve_against(&base).is_err(), "{addr:#x}+{len:#x}");
        }
        let mut whole = ImageMemory {
            page_size: PAGE_SIZE,
            runs: vec![PageRun {
                addr: 0x10000,
                len: 2 * PAGE_SIZE,
                data: PageData::Base,
            }],
        };
        whole.resolve_against(&base).unwrap();
        assert_eq!(whole, memory_of(&[Some(1), Some(0)]));
    }

    pub(crate) fn sample() -> ProcessImage {
        let mut memory = ImageMemory {
            page_size: PAGE_SIZE,
            runs: Vec::new(),
        };
        let mut data = vec![0u8; 3 * PAGE_SIZE as usize];
        data[PAGE_SIZE as usize * 2 + 5] = 7;
        memory.push_pages(0x1000, &data);
        ProcessImage {
            pid: 42,
            comm: "sample".into(),
            exe: Some("/bin/true".into()),
            kernel_release: "6.18".into(),
            threads: vec![ThreadState {
                tid: 42,
                comm: "sample".into(),
                regs: Regs {
                    rip: 0x401000,
                    rsp: 0x7ffc_0000_0000,
                    ..Regs::default()
                },
                xstate: vec![1, 2, 3, 4],
                fs_base: 0x7f00_0000_0000,
                gs_base: 0,
                sigmask: 1 << 9,
                sigaltstack: SigAltStack {
                    sp: 0,
                    flags: 2,
                    size: 0,
                },
                clear_child_tid: 0x7f00_0000_02d0,
                robust_list: (0x7f00_0000_02e0, 24),
                rseq: Some(RseqState {
                    pointer: 0x7f00_0000_0fe0,
                    size: 32,
                    signature: 0x5305_3053,
                }),
            }],
            mappings: vec![Mapping {
                start: 0x1000,
                end: 0x4000,
                prot: 3,
                shared: false,
                offset: 0,
                path: None,
                kind: MappingKind::Anon,
                file: None,
                growsdown: false,
            }],
            memory,
            mm: MmState::default(),
            fds: vec![FdState {
                fd: 3,
                path: "/tmp/x".into(),
                pos: 10,
                flags: 0o2,
                kind: FdKind::Regular,
            }],
            creds: Creds::default(),
            cwd: "/".into(),
            umask: 0o22,
            personality: 0,
            pgid: 42,
            sid: 1,
            rlimits: vec![Rlimit {
                resource: 7,
                cur: 1024,
                max: 4096,
            }],
            sigactions: vec![SigAction {
                sig: 2,
                handler: 0x401234,
                flags: 0x0400_0000,
                restorer: 0x401000,
                mask: 0,
            }],
            signals: SignalState {
                shared: vec![SigInfo {
                    raw: {
                        let mut r = vec![0u8; SIGINFO_LEN];
                        r[0] = 10;
                        r
                    },
                }],
                threads: vec![(42, Vec::new())],
                itimers: vec![ITimer {
                    which: 0,
                    interval: (1, 500_000),
                    value: (0, 250_000),
                }],
                posix_timers: vec![PosixTimer {
                    id: 3,
                    clock: 1,
                    signo: 14,
                    ..PosixTimer::default()
                }],
            },
            locks: Vec::new(),
        }
    }

    /// An image as format version 2 wrote it: the image alone, without signal state.
    fn encode_v2<T: Serialize>(img: &T, magic: &[u8; 8]) -> Vec<u8> {
        encode_as(2, img, magic)
    }

    fn encode_as<T: Serialize>(version: u32, img: &T, magic: &[u8; 8]) -> Vec<u8> {
        let payload = postcard::to_stdvec(img).unwrap();
        let mut h = header(&payload, magic, IMAGE_FORMAT_VERSION);
        h[8..12].copy_from_slice(&version.to_le_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn version_3_trees_decode_without_sockets() {
        let img = sample();
        let tree = TreeImage {
            frozen_for: None,
            stopped: Vec::new(),
            no_new_privs: Vec::new(),
            caps: Vec::new(),
            seccomp: Vec::new(),
            bound_sockets: Vec::new(),
            root: 42,
            processes: vec![TreeMember {
                pid: 42,
                ppid: 1,
                state: MemberState::Live(Box::new(img.clone())),
            }],
            pipes: Vec::new(),
            sockets: Vec::new(),
            memfds: Vec::new(),
        };
        let v3 = encode_as(3, &(&tree, vec![(42, &img.signals)]), &TREE_MAGIC);
        let back = decode_tree(&v3).unwrap();
        assert_eq!(back, tree);
        assert_eq!(back.processes[0].live().unwrap().signals, img.signals);
    }

    #[test]
    fn version_2_images_still_decode() {
        let img = sample();
        assert!(img.signals != SignalState::default());
        let back = decode(&encode_v2(&img, &IMAGE_MAGIC)).unwrap();
        assert_eq!(back.signals, SignalState::default());
        let mut want = img.clone();
        want.signals = SignalState::default();
        assert_eq!(back, want);
        let tree = TreeImage {
            frozen_for: None,
            stopped: Vec::new(),
            no_new_privs: Vec::new(),
            caps: Vec::new(),
            seccomp: Vec::new(),
            bound_sockets: Vec::new(),
            root: 42,
            processes: vec![TreeMember {
                pid: 42,
                ppid: 1,
                state: MemberState::Live(Box::new(img.clone())),
            }],
            pipes: Vec::new(),
            sockets: Vec::new(),
            memfds: Vec::new(),
        };
        let back = decode_tree(&encode_v2(&tree, &TREE_MAGIC)).unwrap();
        assert_eq!(back.processes[0].live(), Some(&want));
        // Version 3 keeps the signal state, in trees too.
        let back = decode_tree(&encode_tree(&tree).unwrap()).unwrap();
        assert_eq!(back, tree);
    }

    #[test]
    fn zero_pages_are_not_stored() {
        let img = sample();
        assert_eq!(img.memory.runs.len(), 2);
        assert_eq!(img.memory.runs[0].data, PageData::Zero);
        assert_eq!(img.memory.runs[0].len, 2 * PAGE_SIZE);
        assert!(matches!(img.memory.runs[1].data, PageData::Bytes(ref b) if b.len() == 4096));
        assert_eq!(img.memory.covered_bytes(), 3 * PAGE_SIZE);
    }

    #[test]
    fn runs_split_at_alignment() {
        let mut m = ImageMemory {
            page_size: PAGE_SIZE,
            runs: Vec::new(),
        };
        let data = vec![1u8; 2 * RUN_ALIGN as usize + PAGE_SIZE as usize];
        let start = 4 * RUN_ALIGN - PAGE_SIZE;
        m.push_pages(start, &data);
        // Data runs never cross an alignment boundary.
        for r in &m.runs {
            assert_eq!(
                r.addr / RUN_ALIGN,
                (r.addr + r.len - 1) / RUN_ALIGN,
                "{r:?}"
            );
        }
        assert_eq!(m.runs[0].addr, start);
        assert_eq!(m.covered_bytes(), data.len() as u64);
        // Zero pages merge into one run whatever the alignment.
        let mut z = ImageMemory {
            page_size: PAGE_SIZE,
            runs: Vec::new(),
        };
        z.push_pages(0, &vec![0u8; 3 * RUN_ALIGN as usize]);
        assert_eq!(z.runs.len(), 1);
    }

    #[test]
    fn round_trip() {
        let img = sample();
        let bytes = encode(&img).unwrap();
        assert_eq!(&bytes[0..8], &IMAGE_MAGIC);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, img);
        let mut v = Vec::new();
        write_to(&img, &mut v).unwrap();
        assert_eq!(v, bytes);
        let back2 = read_from(&v[..], DEFAULT_MAX_IMAGE_LEN).unwrap();
        assert_eq!(back2, img);
    }

    #[test]
    fn remove_range_cuts_zero_runs_at_the_edges() {
        let mut m = ImageMemory {
            page_size: PAGE_SIZE,
            runs: Vec::new(),
        };
        // zero, zero, data, zero, zero, data: the zero runs merge across pages.
        let mut bytes = vec![0u8; 6 * 4096];
        bytes[2 * 4096] = 1;
        bytes[5 * 4096] = 2;
        m.push_pages(0x10000, &bytes);
        m.remove_range(0x10000 + 4096, 0x10000 + 4 * 4096);
        let got: Vec<(u64, u64, bool)> = m
            .runs
            .iter()
            .map(|r| (r.addr - 0x10000, r.len, r.data == PageData::Zero))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 4096, true),
                (4 * 4096, 4096, true),
                (5 * 4096, 4096, false)
            ]
        );
    }

    #[test]
    fn externalize_moves_bytes() {
        let mut img = sample();
        let mut stored = Vec::new();
        img.memory
            .externalize(|h, b| {
                stored.push((*h, b.to_vec()));
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(img.memory.inline_bytes(), 0);
        assert_eq!(img.memory.runs[1].data, PageData::Stored(stored[0].0));
    }

    #[test]
    fn rejects_bad_magic() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = b'X';
        assert!(matches!(decode(&bytes), Err(ImageError::BadMagic { .. })));
        assert!(matches!(
            decode(b"hello world"),
            Err(ImageError::BadMagic { .. })
        ));
    }

    #[test]
    fn rejects_bad_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(matches!(decode(&bytes), Err(ImageError::Checksum { .. })));
        let mut bytes = encode(&sample()).unwrap();
        bytes[30] ^= 1; // inside the stored hash
        assert!(matches!(decode(&bytes), Err(ImageError::Checksum { .. })));
    }

    #[test]
    fn rejects_newer_version() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&(IMAGE_FORMAT_VERSION + 1).to_le_bytes());
        match decode(&bytes) {
            Err(ImageError::NewerVersion { found, supported }) => {
                assert_eq!(found, IMAGE_FORMAT_VERSION + 1);
                assert_eq!(supported, IMAGE_FORMAT_VERSION);
            }
            other => panic!("unexpected {other:?}"),
        }
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(ImageError::UnsupportedVersion { found: 0 })
        ));
    }

    #[test]
    fn rejects_truncated() {
        let bytes = encode(&sample()).unwrap();
        for cut in [10usize, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            assert!(
                matches!(decode(&bytes[..cut]), Err(ImageError::Truncated { .. })),
                "cut at {cut}"
            );
            assert!(
                matches!(
                    read_from(&bytes[..cut], DEFAULT_MAX_IMAGE_LEN),
                    Err(ImageError::Truncated { .. })
                ),
                "read_from cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(ImageError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn rejects_too_large() {
        let bytes = encode(&sample()).unwrap();
        assert!(matches!(
            decode_with_limit(&bytes, 16),
            Err(ImageError::TooLarge { .. })
        ));
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(ImageError::TooLarge { .. })));
    }

    #[test]
    fn rejects_garbage_payload_with_valid_checksum() {
        let payload = vec![0xffu8; 16];
        let mut bytes = header(&payload, &IMAGE_MAGIC, IMAGE_FORMAT_VERSION).to_vec();
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode(&bytes), Err(ImageError::Decode(_))));
    }

    #[test]
    fn tree_round_trip_and_magic() {
        let live = sample();
        let mut with_pipe = sample();
        with_pipe.pid = 43;
        with_pipe.fds[0].kind = FdKind::Pipe { ino: 99 };
        let tree = TreeImage {
            frozen_for: None,
            stopped: Vec::new(),
            no_new_privs: Vec::new(),
            caps: Vec::new(),
            seccomp: Vec::new(),
            bound_sockets: Vec::new(),
            root: 42,
            processes: vec![
                TreeMember {
                    pid: 42,
                    ppid: 1,
                    state: MemberState::Live(Box::new(live)),
                },
                TreeMember {
                    pid: 43,
                    ppid: 42,
                    state: MemberState::Live(Box::new(with_pipe)),
                },
                TreeMember {
                    pid: 44,
                    ppid: 42,
                    state: MemberState::Zombie {
                        status: 0x700,
                        pgid: 42,
                        sid: 42,
                    },
                },
            ],
            pipes: vec![PipeImage {
                ino: 99,
                capacity: 65536,
                data: b"0001\n0002\n".to_vec(),
            }],
            sockets: vec![SocketPairImage {
                kind: libc::SOCK_SEQPACKET,
                ends: [
                    SocketEnd {
                        ino: 7,
                        queue: vec![Message(b"one".to_vec()), Message(Vec::new())],
                        shutdown: 1,
                        sndbuf: 212_992,
                        rcvbuf: 212_992,
                        peek_off: 3,
                        passcred: true,
                    },
                    SocketEnd {
                        ino: 8,
                        queue: Vec::new(),
                        shutdown: 2,
                        sndbuf: 4608,
                        rcvbuf: 212_992,
                        peek_off: -1,
                        passcred: false,
                    },
                ],
            }],
            memfds: vec![MemfdImage {
                ino: 12,
                name: "buffer".into(),
                size: 8192 + 5,
                seals: Some(libc::F_SEAL_GROW as u32),
                contents: {
                    let mut m = ImageMemory {
                        page_size: PAGE_SIZE,
                        runs: Vec::new(),
                    };
                    m.push_pages(8192, &[7u8; 4096]);
                    m
                },
            }],
        };
        let bytes = encode_tree(&tree).unwrap();
        assert_eq!(&bytes[0..8], &TREE_MAGIC);
        assert_eq!(decode_tree(&bytes).unwrap(), tree);
        // Without file locks a whole tree is still version 5 (older builds read it); with
        // them it is version 7, and they come back on their process.
        assert_eq!(
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            5
        );
        let mut locked = tree.clone();
        if let Some(p) = locked.processes[1].live_mut() {
            p.locks = vec![
                FileLock {
                    fd: 3,
                    kind: LockKind::Posix,
                    write: true,
                    start: 0,
                    end: Some(9),
                },
                FileLock {
                    fd: 3,
                    kind: LockKind::Flock,
                    write: false,
                    start: 0,
                    end: None,
                },
            ];
        }
        let lb = encode_tree(&locked).unwrap();
        assert_eq!(u32::from_le_bytes([lb[8], lb[9], lb[10], lb[11]]), 7);
        assert_eq!(decode_tree(&lb).unwrap(), locked);
        // Stopped members, listening sockets and inotify instances need version 8.
        let mut v8 = locked.clone();
        v8.stopped = vec![43];
        v8.no_new_privs = vec![42];
        v8.bound_sockets = vec![BoundSocket {
            ino: 5,
            family: libc::AF_INET,
            kind: libc::SOCK_STREAM,
            addr: vec![2, 0, 0x1f, 0x40, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            listening: true,
            backlog: 128,
            peer: Vec::new(),
            dir: String::new(),
            file: None,
            options: vec![(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)],
        }];
        if let Some(p) = v8.processes[0].live_mut() {
            p.fds[0].kind = FdKind::Inotify {
                watches: vec![InotifyWatch {
                    wd: 2,
                    mask: 0x100,
                    path: "/w".into(),
                    ino: 9,
                }],
            };
        }
        let b8 = encode_tree(&v8).unwrap();
        assert_eq!(u32::from_le_bytes([b8[8], b8[9], b8[10], b8[11]]), 8);
        assert_eq!(decode_tree(&b8).unwrap(), v8);
        // A stopped pid that is no live member is refused.
        let mut bad = v8.clone();
        bad.stopped = vec![44];
        assert!(decode_tree(&encode_tree(&bad).unwrap()).is_err());
        // Capability sets need version 9; they name live members too.
        let mut v9 = v8.clone();
        let sets = CapSets {
            inheritable: 1 << 10,
            permitted: 1 << 10,
            effective: 1 << 10,
            bounding: (1 << 41) - 1,
            ambient: 1 << 10,
        };
        v9.caps = vec![(43, sets)];
        v9.seccomp = vec![(
            42,
            vec![SeccompFilter {
                flags: 2,
                prog: vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f],
            }],
        )];
        let b9 = encode_tree(&v9).unwrap();
        assert_eq!(u32::from_le_bytes([b9[8], b9[9], b9[10], b9[11]]), 9);
        assert_eq!(decode_tree(&b9).unwrap(), v9);
        let mut bad = v9.clone();
        bad.caps = vec![(44, sets)];
        assert!(decode_tree(&encode_tree(&bad).unwrap()).is_err());
        // A filter program is whole instructions, and not empty.
        for prog in [vec![6, 0, 0], Vec::new()] {
            let mut bad = v9.clone();
            bad.seccomp[0].1[0].prog = prog;
            assert!(decode_tree(&encode_tree(&bad).unwrap()).is_err());
        }
        // Version 4 trees (no shared memory files) still decode.
        let signals: Vec<(i32, SignalState)> = tree
            .processes
            .iter()
            .filter_map(|m| m.live().map(|p| (m.pid, p.signals.clone())))
            .collect();
        let v4 = encode_as(4, &(&tree, signals, &tree.sockets), &TREE_MAGIC);
        let mut want = tree.clone();
        want.memfds.clear();
        assert_eq!(decode_tree(&v4).unwrap(), want);
        // A tree is not a process image and vice versa.
        assert!(matches!(decode(&bytes), Err(ImageError::BadMagic { .. })));
        let single = encode(&sample()).unwrap();
        assert!(matches!(
            decode_tree(&single),
            Err(ImageError::BadMagic { .. })
        ));
        // Bounds checks apply to trees too.
        assert!(matches!(
            decode_tree(&bytes[..bytes.len() - 1]),
            Err(ImageError::Truncated { .. })
        ));
        assert!(matches!(
            decode_tree_with_limit(&bytes, 10),
            Err(ImageError::TooLarge { .. })
        ));
    }
}
