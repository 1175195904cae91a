//! `Tracer`: the one place where ptrace is spoken.
//!
//! A [`Tracer`] owns the ptrace attachment of exactly one thread. It can
//!
//! * attach to a running thread ([`Tracer::seize`]: `PTRACE_SEIZE` + `PTRACE_INTERRUPT` and a
//!   wait for the resulting `PTRACE_EVENT_STOP`), or adopt a child that called `PTRACE_TRACEME`
//!   and stopped itself ([`Tracer::adopt_stopped_child`]);
//! * read and write the general registers (`PTRACE_GETREGSET`/`NT_PRSTATUS`), the full extended
//!   FPU state (`NT_X86_XSTATE`), the blocked-signal mask (`PTRACE_GETSIGMASK`) and the rseq
//!   registration (`PTRACE_GET_RSEQ_CONFIGURATION`);
//! * read and write tracee memory with `process_vm_readv`/`process_vm_writev`, falling back to
//!   `/proc/PID/mem` (which also reaches pages that are not readable/writable by the tracee);
//! * **inject a system call** ([`Tracer::syscall`]): save the registers, point `rip` at a
//!   `syscall` instruction that exists in the tracee (found in its vDSO, or just before the
//!   current `rip` when the tracee sits in a system call, or installed by the caller with
//!   [`Tracer::set_syscall_insn`]), load `rax` and the six argument registers, run to the
//!   syscall-entry stop and then to the syscall-exit stop with `PTRACE_SYSCALL`, read `rax`
//!   and put the saved registers back.
//!
//! ## Interrupted system calls
//! A thread that is interrupted inside a restartable system call carries `orig_rax >= 0` and one
//! of the kernel-internal `-ERESTART*` codes in `rax`. The kernel would fix those registers up
//! when the thread leaves the stop, but only if the registers are still the ones it left there.
//! Because we run injected system calls first, [`Tracer::seize`] performs the same fix-up itself
//! right away (`rip -= 2`, `rax = orig_rax` or `restart_syscall`, `orig_rax = -1`), exactly as
//! the kernel would have done, so the registers we save, dump and restore are plain user-space
//! registers.
//!
//! ## Signals that arrive while we hold the thread
//! A signal-delivery stop that shows up while we wait for something else is suppressed and the
//! signal number remembered; [`Tracer::detach`] queues it again with `tgkill` before detaching,
//! so the thread still receives it (without its original `siginfo`).
//!
//! ptrace requests must come from the thread that attached, so a `Tracer` is neither `Send`
//! nor `Sync`. Dropping a `Tracer` detaches (best effort).

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

/// The general-purpose registers as the kernel's `struct user_regs_struct` (x86_64).
pub type UserRegs = libc::user_regs_struct;

/// Errors from the tracer. Every variant names the thread id it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A ptrace request failed.
    #[error("ptrace {op} on thread {tid} failed: {source}")]
    Ptrace {
        /// Thread id.
        tid: i32,
        /// The request that failed.
        op: &'static str,
        /// errno.
        source: Errno,
    },
    /// waitpid failed.
    #[error("waiting for thread {tid} failed: {source}")]
    Wait {
        /// Thread id.
        tid: i32,
        /// errno.
        source: Errno,
    },
    /// The thread exited or was killed while we held it.
    #[error("thread {tid} went away while traced: {how}")]
    Gone {
        /// Thread id.
        tid: i32,
        /// "exited with N" or "killed by signal N".
        how: String,
    },
    /// Reading or writing tracee memory failed.
    #[error("{op} of {len} bytes at {addr:#x} in thread {tid} failed: {source}")]
    Memory {
        /// Thread id.
        tid: i32,
        /// "read" or "write".
        op: &'static str,
        /// Remote address.
        addr: u64,
        /// Length.
        len: usize,
        /// Underlying error.
        source: std::io::Error,
    },
    /// No `syscall` instruction is known in the tracee, so nothing can be injected.
    #[error(
        "no syscall instruction found in thread {tid} (no [vdso] and not stopped in a syscall)"
    )]
    NoSyscallInsn {
        /// Thread id.
        tid: i32,
    },
    /// An injected system call returned an error.
    #[error("injected {name} in thread {tid} failed: {errno}")]
    Injected {
        /// Thread id.
        tid: i32,
        /// System call name.
        name: &'static str,
        /// The error it returned.
        errno: Errno,
    },
}

const NT_PRSTATUS: libc::c_int = 1;
const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// `PTRACE_PEEKSIGINFO` flag: read the process-wide queue instead of the thread's.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Upper bound for the xstate buffer. The kernel trims the iovec to the real size
/// (a few KiB; about 11 KiB with AMX).
const XSTATE_MAX: usize = 64 * 1024;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// The rseq registration of a thread (`struct ptrace_rseq_configuration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RseqConfig {
    /// Address of the `struct rseq` area (0: not registered).
    pub pointer: u64,
    /// Registered length.
    pub size: u32,
    /// Signature.
    pub signature: u32,
}

/// What a `waitpid` on a traced thread reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `PTRACE_EVENT_*` stop (group stop / interrupt with `PTRACE_EVENT_STOP`).
    Event(i32),
    /// Syscall-entry or -exit stop (`SIGTRAP | 0x80`).
    Syscall,
    /// Signal-delivery stop (or group stop of a non-seized tracee).
    Signal(i32),
}

/// Holds the ptrace attachment of one thread. See the module documentation.
#[derive(Debug)]
pub struct Tracer {
    tgid: i32,
    tid: i32,
    attached: bool,
    syscall_insn: Option<u64>,
    pending_signals: Vec<i32>,
    mem: Option<File>,
    _not_send: PhantomData<*const ()>,
}

/// `PTRACE_SECCOMP_GET_FILTER` and `PTRACE_SECCOMP_GET_METADATA` (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
/// `PTRACE_O_SUSPEND_SECCOMP`: the tracee's seccomp filters do not apply while it is traced
/// (needs CAP_SYS_ADMIN and a tracer under no filter); detaching ends it.
pub const PTRACE_O_SUSPEND_SECCOMP: usize = 1 << 21;

/// The options of a process being restored ([`Tracer::adopt_stopped_child`]).
pub const RESTORE_OPTIONS: usize = (libc::PTRACE_O_TRACESYSGOOD
    | libc::PTRACE_O_EXITKILL
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK) as usize;

/// Raw ptrace call. Returns the kernel's return value or the errno.
///
/// # Safety
/// `addr` and `data` must be valid for the given request: for requests that write through
/// `data` (GETREGSET, GETSIGMASK, ...), `data` must point to writable memory of the size the
/// request implies, and for requests that read through it, to initialized memory of that size.
unsafe fn ptrace_raw(
    req: libc::c_uint,
    tid: i32,
    addr: *mut libc::c_void,
    data: *mut libc::c_void,
) -> Result<libc::c_long, Errno> {
    Errno::clear();
    // SAFETY: the caller guarantees that addr/data are valid for `req`; the kernel validates
    // the tid and returns ESRCH/EPERM for threads we may not trace.
    let r = unsafe { libc::ptrace(req, tid, addr, data) };
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// Wait for a state change of one (possibly non-leader) traced thread.
fn wait_raw(tid: i32) -> Result<i32, Errno> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        return Ok(status);
    }
}

/// Fix up registers of a thread stopped inside an interrupted, restartable system call the way
/// the kernel would on its way back to user space, so that injected calls cannot disturb it.
/// Returns true if anything changed.
pub fn normalize_restart(regs: &mut UserRegs) -> bool {
    if regs.orig_rax as i64 >= 0 {
        match -(regs.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                regs.rax = regs.orig_rax;
                regs.rip = regs.rip.wrapping_sub(2);
            }
            ERESTART_RESTARTBLOCK => {
                regs.rax = libc::SYS_restart_syscall as u64;
                regs.rip = regs.rip.wrapping_sub(2);
            }
            _ => {}
        }
        regs.orig_rax = u64::MAX;
        true
    } else {
        false
    }
}

/// Name of a few system calls for error messages.
pub fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_munmap => "munmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_mremap => "mremap",
        libc::SYS_openat => "openat",
        libc::SYS_close => "close",
        libc::SYS_close_range => "close_range",
        libc::SYS_dup3 => "dup3",
        libc::SYS_lseek => "lseek",
        libc::SYS_chdir => "chdir",
        libc::SYS_umask => "umask",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_sigaltstack => "sigaltstack",
        libc::SYS_prctl => "prctl",
        libc::SYS_brk => "brk",
        libc::SYS_rseq => "rseq",
        libc::SYS_set_tid_address => "set_tid_address",
        libc::SYS_set_robust_list => "set_robust_list",
        libc::SYS_personality => "personality",
        libc::SYS_setresuid => "setresuid",
        libc::SYS_setresgid => "setresgid",
        libc::SYS_setgroups => "setgroups",
        libc::SYS_clone3 => "clone3",
        libc::SYS_setsid => "setsid",
        libc::SYS_setpgid => "setpgid",
        libc::SYS_fcntl => "fcntl",
        libc::SYS_kill => "kill",
        _ => "syscall",
    }
}

impl Tracer {
    /// Attach to thread `tid` of thread group `tgid` with `PTRACE_SEIZE`, interrupt it and wait
    /// until it is in a ptrace stop. Interrupted restartable system calls are fixed up (see the
    /// module docs). On error the thread is detached again.
    pub fn seize(tgid: i32, tid: i32) -> Result<Self, TraceError> {
        let opts = libc::PTRACE_O_TRACESYSGOOD as usize;
        // SAFETY: PTRACE_SEIZE takes no addr and the options as an integer in `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SEIZE,
                tid,
                std::ptr::null_mut(),
                opts as *mut libc::c_void,
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid,
            op: "PTRACE_SEIZE",
            source,
        })?;
        let mut t = Tracer {
            tgid,
            tid,
            attached: true,
            syscall_insn: None,
            pending_signals: Vec::new(),
            mem: None,
            _not_send: PhantomData,
        };
        // SAFETY: PTRACE_INTERRUPT takes neither addr nor data.
        unsafe {
            ptrace_raw(
                libc::PTRACE_INTERRUPT,
                tid,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid,
            op: "PTRACE_INTERRUPT",
            source,
        })?;
        loop {
            match t.wait_stop()? {
                Stop::Event(_) => break,
                Stop::Syscall => break,
                Stop::Signal(sig) => {
                    // A signal arrived before our interrupt: keep it for later and go on
                    // waiting for the interrupt stop.
                    t.pending_signals.push(sig);
                    t.resume(libc::PTRACE_CONT, "PTRACE_CONT")?;
                }
            }
        }
        let mut regs = t.regs()?;
        if normalize_restart(&mut regs) {
            t.set_regs(&regs)?;
        }
        Ok(t)
    }

    /// Take over a child that called `PTRACE_TRACEME` and is now in a signal-delivery stop
    /// (the caller already waited for it). Sets `PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL |
    /// PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK`, so the child dies if the tracer dies and
    /// threads and processes it creates are traced from birth (see [`Tracer::adopt_clone`]);
    /// those inherit the options.
    pub fn adopt_stopped_child(pid: i32) -> Result<Self, TraceError> {
        let opts = RESTORE_OPTIONS;
        // SAFETY: PTRACE_SETOPTIONS takes the options as an integer in `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETOPTIONS,
                pid,
                std::ptr::null_mut(),
                opts as *mut libc::c_void,
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid: pid,
            op: "PTRACE_SETOPTIONS",
            source,
        })?;
        Ok(Tracer {
            tgid: pid,
            tid: pid,
            attached: true,
            syscall_insn: None,
            pending_signals: Vec::new(),
            mem: None,
            _not_send: PhantomData,
        })
    }

    /// Take over thread (or process) `tid` that a tracee with `PTRACE_O_TRACECLONE` (or
    /// `PTRACE_O_TRACEFORK`; then `tgid == tid`) just created (it is
    /// auto-attached and stops with `SIGSTOP` before running any user code). Waits for that
    /// stop; the `SIGSTOP` is suppressed when the thread is next resumed.
    pub fn adopt_clone(tgid: i32, tid: i32) -> Result<Self, TraceError> {
        let mut t = Tracer {
            tgid,
            tid,
            attached: true,
            syscall_insn: None,
            pending_signals: Vec::new(),
            mem: None,
            _not_send: PhantomData,
        };
        loop {
            match t.wait_stop()? {
                Stop::Signal(libc::SIGSTOP) | Stop::Event(_) => return Ok(t),
                Stop::Signal(sig) => {
                    t.pending_signals.push(sig);
                    t.resume(libc::PTRACE_CONT, "PTRACE_CONT")?;
                }
                Stop::Syscall => return Ok(t),
            }
        }
    }

    /// Sets this thread's ptrace options to `opts` (all of them: `PTRACE_SETOPTIONS` replaces
    /// the set).
    pub fn set_options(&self, opts: usize) -> Result<(), TraceError> {
        // SAFETY: PTRACE_SETOPTIONS takes the options as an integer in `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETOPTIONS,
                self.tid,
                std::ptr::null_mut(),
                opts as *mut libc::c_void,
            )
        }
        .map(drop)
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETOPTIONS",
            source,
        })
    }

    /// The seccomp filters of this stopped thread, oldest first: each one's flags
    /// (`SECCOMP_FILTER_FLAG_*` as `PTRACE_SECCOMP_GET_METADATA` reports them) and its BPF
    /// program (`struct sock_filter`s, 8 bytes each). Needs CAP_SYS_ADMIN and a tracer under
    /// no filter of its own.
    pub fn seccomp_filters(&self) -> Result<Vec<(u64, Vec<u8>)>, TraceError> {
        let err = |op: &'static str| {
            let tid = self.tid;
            move |source| TraceError::Ptrace { tid, op, source }
        };
        let mut out = Vec::new();
        for index in 0usize.. {
            // SAFETY: with a null `data`, PTRACE_SECCOMP_GET_FILTER only returns the number
            // of instructions of filter `index` (counted from the newest).
            let n = match unsafe {
                ptrace_raw(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.tid,
                    index as *mut libc::c_void,
                    std::ptr::null_mut(),
                )
            } {
                Ok(n) => n as usize,
                Err(Errno::ENOENT) => break,
                Err(e) => return Err(err("PTRACE_SECCOMP_GET_FILTER")(e)),
            };
            let mut prog = vec![0u8; n * 8];
            // SAFETY: `prog` holds `n` sock_filter structs, as many as the kernel writes.
            let got = unsafe {
                ptrace_raw(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.tid,
                    index as *mut libc::c_void,
                    prog.as_mut_ptr().cast(),
                )
            }
            .map_err(err("PTRACE_SECCOMP_GET_FILTER"))?;
            if got as usize != n {
                return Err(err("PTRACE_SECCOMP_GET_FILTER")(Errno::EAGAIN));
            }
            // struct seccomp_metadata { __u64 filter_off; __u64 flags; }
            let mut meta = [index as u64, 0u64];
            // SAFETY: `addr` is the size of the struct `data` points to, which lives for the
            // call.
            unsafe {
                ptrace_raw(
                    PTRACE_SECCOMP_GET_METADATA,
                    self.tid,
                    std::mem::size_of_val(&meta) as *mut libc::c_void,
                    meta.as_mut_ptr().cast(),
                )
            }
            .map_err(err("PTRACE_SECCOMP_GET_METADATA"))?;
            out.push((meta[1], prog));
        }
        out.reverse();
        Ok(out)
    }

    /// The traced thread id.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Signals that arrived while we held the thread and were suppressed.
    pub fn pending_signals(&self) -> &[i32] {
        &self.pending_signals
    }

    /// Forget suppressed signals (they will not be re-sent on detach).
    pub fn clear_pending_signals(&mut self) {
        self.pending_signals.clear();
    }

    fn wait_stop(&mut self) -> Result<Stop, TraceError> {
        let tid = self.tid;
        let status = wait_raw(tid).map_err(|source| TraceError::Wait { tid, source })?;
        if libc::WIFEXITED(status) {
            self.attached = false;
            return Err(TraceError::Gone {
                tid,
                how: format!("exited with status {}", libc::WEXITSTATUS(status)),
            });
        }
        if libc::WIFSIGNALED(status) {
            self.attached = false;
            return Err(TraceError::Gone {
                tid,
                how: format!("killed by signal {}", libc::WTERMSIG(status)),
            });
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(Stop::Event(0));
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if event != 0 {
            return Ok(Stop::Event(event));
        }
        if sig == libc::SIGTRAP | 0x80 {
            return Ok(Stop::Syscall);
        }
        Ok(Stop::Signal(sig))
    }

    fn resume(&self, req: libc::c_uint, op: &'static str) -> Result<(), TraceError> {
        // SAFETY: resume requests take no addr; data is the signal to deliver (0: none).
        unsafe { ptrace_raw(req, self.tid, std::ptr::null_mut(), std::ptr::null_mut()) }
            .map(|_| ())
            .map_err(|source| TraceError::Ptrace {
                tid: self.tid,
                op,
                source,
            })
    }

    /// Resume, delivering signal `sig` (0: none).
    fn resume_with(&self, req: libc::c_uint, op: &'static str, sig: i32) -> Result<(), TraceError> {
        // SAFETY: resume requests take no addr; data is the signal to deliver, as an integer.
        unsafe {
            ptrace_raw(
                req,
                self.tid,
                std::ptr::null_mut(),
                sig as usize as *mut libc::c_void,
            )
        }
        .map(|_| ())
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op,
            source,
        })
    }

    /// Make the (single-threaded) process end with wait status `status` as `waitpid` reports
    /// it: `exit_group(status >> 8)` for a normal exit, otherwise the signal `status & 0x7f`
    /// with its default action (a `struct sigaction` of zeros is written at `scratch`, a
    /// writable address in the tracee). Returns once the tracer has seen the exit, so a real
    /// parent other than the tracer now sees a zombie.
    pub fn exit_with_status(mut self, status: i32, scratch: u64) -> Result<(), TraceError> {
        let sig = status & 0x7f;
        if sig == 0 {
            let insn = self
                .syscall_insn
                .ok_or(TraceError::NoSyscallInsn { tid: self.tid })?;
            let mut r = self.regs()?;
            r.rip = insn;
            r.rax = libc::SYS_exit_group as u64;
            r.orig_rax = u64::MAX;
            r.rdi = ((status >> 8) & 0xff) as u64;
            self.set_regs(&r)?;
        } else {
            self.write_mem(scratch, &[0u8; 32])?;
            self.syscall(libc::SYS_rt_sigaction, [sig as u64, scratch, 0, 8, 0, 0])?;
            self.set_sigmask(0)?;
            self.syscall(libc::SYS_kill, [self.tgid as u64, sig as u64, 0, 0, 0, 0])?;
        }
        self.pending_signals.clear();
        let mut deliver = 0;
        loop {
            self.resume_with(libc::PTRACE_CONT, "PTRACE_CONT", deliver)?;
            match self.wait_stop() {
                Err(TraceError::Gone { .. }) => return Ok(()),
                Err(e) => return Err(e),
                Ok(Stop::Signal(s)) if s == sig => deliver = s,
                Ok(_) => deliver = 0,
            }
        }
    }

    /// Resume with PTRACE_SYSCALL until the next syscall stop, suppressing signals.
    fn run_to_syscall_stop(&mut self) -> Result<(), TraceError> {
        loop {
            self.resume(libc::PTRACE_SYSCALL, "PTRACE_SYSCALL")?;
            match self.wait_stop()? {
                Stop::Syscall => return Ok(()),
                Stop::Signal(sig) => self.pending_signals.push(sig),
                // Group stop or a late interrupt: just resume again.
                Stop::Event(_) => {}
            }
        }
    }

    /// Read the general-purpose registers.
    pub fn regs(&self) -> Result<UserRegs, TraceError> {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut regs: UserRegs = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: (&mut regs as *mut UserRegs).cast(),
            iov_len: std::mem::size_of::<UserRegs>(),
        };
        // SAFETY: iov describes `regs`, which is writable and exactly the NT_PRSTATUS size.
        unsafe {
            ptrace_raw(
                libc::PTRACE_GETREGSET,
                self.tid,
                NT_PRSTATUS as usize as *mut libc::c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GETREGSET(NT_PRSTATUS)",
            source,
        })?;
        Ok(regs)
    }

    /// Write the general-purpose registers (including `fs_base`/`gs_base`).
    pub fn set_regs(&self, regs: &UserRegs) -> Result<(), TraceError> {
        let mut copy = *regs;
        let mut iov = libc::iovec {
            iov_base: (&mut copy as *mut UserRegs).cast(),
            iov_len: std::mem::size_of::<UserRegs>(),
        };
        // SAFETY: iov describes `copy`, an initialized user_regs_struct the kernel only reads.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETREGSET,
                self.tid,
                NT_PRSTATUS as usize as *mut libc::c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map(|_| ())
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETREGSET(NT_PRSTATUS)",
            source,
        })
    }

    /// Read the full extended state (XSAVE layout, `NT_X86_XSTATE`), sized by the kernel.
    pub fn xstate(&self) -> Result<Vec<u8>, TraceError> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: iov describes `buf`, writable for XSTATE_MAX bytes; the kernel writes at most
        // iov_len bytes and shrinks iov_len to what it wrote.
        unsafe {
            ptrace_raw(
                libc::PTRACE_GETREGSET,
                self.tid,
                NT_X86_XSTATE as usize as *mut libc::c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GETREGSET(NT_X86_XSTATE)",
            source,
        })?;
        buf.truncate(iov.iov_len.min(XSTATE_MAX));
        Ok(buf)
    }

    /// Write the extended state. The buffer must have the size this CPU/kernel uses.
    pub fn set_xstate(&self, xstate: &[u8]) -> Result<(), TraceError> {
        let mut copy = xstate.to_vec();
        let mut iov = libc::iovec {
            iov_base: copy.as_mut_ptr().cast(),
            iov_len: copy.len(),
        };
        // SAFETY: iov describes `copy`, initialized and alive for the call; the kernel reads it.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETREGSET,
                self.tid,
                NT_X86_XSTATE as usize as *mut libc::c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map(|_| ())
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETREGSET(NT_X86_XSTATE)",
            source,
        })
    }

    /// The blocked-signal mask of the thread (bit `n-1` for signal `n`).
    pub fn sigmask(&self) -> Result<u64, TraceError> {
        let mut mask: u64 = 0;
        // SAFETY: addr is the mask size (8) and data points to a writable u64.
        unsafe {
            ptrace_raw(
                PTRACE_GETSIGMASK,
                self.tid,
                8usize as *mut libc::c_void,
                (&mut mask as *mut u64).cast(),
            )
        }
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GETSIGMASK",
            source,
        })?;
        Ok(mask)
    }

    /// The signals queued for this thread (or, with `shared`, for the whole process), oldest
    /// first, as raw `siginfo_t`s. Reading does not dequeue them.
    pub fn peek_siginfo(&self, shared: bool) -> Result<Vec<[u8; 128]>, TraceError> {
        #[repr(C)]
        struct Args {
            off: u64,
            flags: u32,
            nr: i32,
        }
        const BATCH: usize = 32;
        let mut out = Vec::new();
        loop {
            let mut args = Args {
                off: out.len() as u64,
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: BATCH as i32,
            };
            let mut buf = [[0u8; 128]; BATCH];
            // SAFETY: addr points to an initialized `struct ptrace_peeksiginfo_args` and data
            // to room for `nr` siginfo_t of 128 bytes each.
            let n = unsafe {
                ptrace_raw(
                    PTRACE_PEEKSIGINFO,
                    self.tid,
                    (&mut args as *mut Args).cast(),
                    buf.as_mut_ptr().cast(),
                )
            }
            .map_err(|source| TraceError::Ptrace {
                tid: self.tid,
                op: "PTRACE_PEEKSIGINFO",
                source,
            })?;
            let n = (n.max(0) as usize).min(BATCH);
            out.extend_from_slice(&buf[..n]);
            if n < BATCH {
                return Ok(out);
            }
        }
    }

    /// Set the blocked-signal mask.
    pub fn set_sigmask(&self, mask: u64) -> Result<(), TraceError> {
        let mut m = mask;
        // SAFETY: addr is the mask size (8) and data points to an initialized u64.
        unsafe {
            ptrace_raw(
                PTRACE_SETSIGMASK,
                self.tid,
                8usize as *mut libc::c_void,
                (&mut m as *mut u64).cast(),
            )
        }
        .map(|_| ())
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETSIGMASK",
            source,
        })
    }

    /// The rseq registration of the thread (`PTRACE_GET_RSEQ_CONFIGURATION`, Linux 5.13+).
    /// Returns `None` if the kernel does not support the request.
    pub fn rseq(&self) -> Result<Option<RseqConfig>, TraceError> {
        let mut cfg = libc::ptrace_rseq_configuration {
            rseq_abi_pointer: 0,
            rseq_abi_size: 0,
            signature: 0,
            flags: 0,
            pad: 0,
        };
        // SAFETY: addr is the size of the struct and data points to a writable instance.
        let r = unsafe {
            ptrace_raw(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid,
                std::mem::size_of::<libc::ptrace_rseq_configuration>() as *mut libc::c_void,
                (&mut cfg as *mut libc::ptrace_rseq_configuration).cast(),
            )
        };
        match r {
            Ok(_) => Ok(Some(RseqConfig {
                pointer: cfg.rseq_abi_pointer,
                size: cfg.rseq_abi_size,
                signature: cfg.signature,
            })),
            Err(Errno::EIO) | Err(Errno::EINVAL) => Ok(None),
            Err(source) => Err(TraceError::Ptrace {
                tid: self.tid,
                op: "PTRACE_GET_RSEQ_CONFIGURATION",
                source,
            }),
        }
    }

    fn mem_file(&mut self) -> std::io::Result<&File> {
        if self.mem.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{}/mem", self.tid))?;
            self.mem = Some(f);
        }
        match &self.mem {
            Some(f) => Ok(f),
            None => Err(std::io::Error::other("/proc/PID/mem not open")),
        }
    }

    /// Read `buf.len()` bytes at `addr`. Uses `process_vm_readv`; falls back to `/proc/PID/mem`
    /// for what it cannot read (e.g. pages without read permission).
    pub fn read_mem(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), TraceError> {
        let mut done = 0usize;
        while done < buf.len() {
            let len = buf.len() - done;
            let remote = [RemoteIoVec {
                base: (addr as usize) + done,
                len,
            }];
            let mut local = [IoSliceMut::new(&mut buf[done..])];
            match process_vm_readv(Pid::from_raw(self.tgid), &mut local, &remote) {
                Ok(n) if n > 0 => done += n,
                _ => break,
            }
        }
        if done < buf.len() {
            let tid = self.tid;
            let rest = buf.len() - done;
            let err = |source| TraceError::Memory {
                tid,
                op: "read",
                addr: addr + done as u64,
                len: rest,
                source,
            };
            let f = self.mem_file().map_err(err)?;
            f.read_exact_at(&mut buf[done..], addr + done as u64)
                .map_err(err)?;
        }
        Ok(())
    }

    /// Write `data` at `addr`. Uses `process_vm_writev`; falls back to `/proc/PID/mem` (which
    /// can write read-only pages, breaking copy-on-write).
    pub fn write_mem(&mut self, addr: u64, data: &[u8]) -> Result<(), TraceError> {
        let mut done = 0usize;
        while done < data.len() {
            let len = data.len() - done;
            let remote = [RemoteIoVec {
                base: (addr as usize) + done,
                len,
            }];
            let local = [IoSlice::new(&data[done..])];
            match process_vm_writev(Pid::from_raw(self.tgid), &local, &remote) {
                Ok(n) if n > 0 => done += n,
                _ => break,
            }
        }
        if done < data.len() {
            let tid = self.tid;
            let rest = data.len() - done;
            let err = |source| TraceError::Memory {
                tid,
                op: "write",
                addr: addr + done as u64,
                len: rest,
                source,
            };
            let f = self.mem_file().map_err(err)?;
            f.write_all_at(&data[done..], addr + done as u64)
                .map_err(err)?;
        }
        Ok(())
    }

    /// Use the `syscall` instruction at `addr` for injected calls.
    pub fn set_syscall_insn(&mut self, addr: u64) {
        self.syscall_insn = Some(addr);
    }

    /// The address of the `syscall` instruction used for injection, if known.
    pub fn syscall_insn(&self) -> Option<u64> {
        self.syscall_insn
    }

    /// Find a `syscall` instruction (`0f 05`) in the tracee: first in its `[vdso]`, then at or
    /// right before `rip` (a thread stopped in a system call), then in any executable mapping.
    /// The two bytes need not be an instruction boundary of the surrounding code: we jump
    /// straight to them and stop at the syscall exit before anything else executes.
    pub fn locate_syscall_insn(&mut self) -> Result<u64, TraceError> {
        if let Some(a) = self.syscall_insn {
            return Ok(a);
        }
        let mut exec_ranges = Vec::new();
        let mut vdso = None;
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{}/maps", self.tgid)) {
            for line in maps.lines() {
                let mut f = line.split_whitespace();
                let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                    continue;
                };
                let Some((s, e)) = range.split_once('-') else {
                    continue;
                };
                let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
                else {
                    continue;
                };
                if line.trim_end().ends_with("[vdso]") {
                    vdso = Some((s, e));
                } else if perms.starts_with("r-x") && !line.trim_end().ends_with("[vsyscall]") {
                    exec_ranges.push((s, e));
                }
            }
        }
        if let Some((s, e)) = vdso {
            if let Some(a) = self.scan_for_syscall(s, e) {
                self.syscall_insn = Some(a);
                return Ok(a);
            }
        }
        let regs = self.regs()?;
        for cand in [regs.rip, regs.rip.wrapping_sub(2)] {
            let mut b = [0u8; 2];
            if self.read_mem(cand, &mut b).is_ok() && b == [0x0f, 0x05] {
                self.syscall_insn = Some(cand);
                return Ok(cand);
            }
        }
        for (s, e) in exec_ranges {
            if let Some(a) = self.scan_for_syscall(s, e) {
                self.syscall_insn = Some(a);
                return Ok(a);
            }
        }
        Err(TraceError::NoSyscallInsn { tid: self.tid })
    }

    /// Search `[start, end)` (at most its first 16 MiB) for the bytes `0f 05`.
    fn scan_for_syscall(&mut self, start: u64, end: u64) -> Option<u64> {
        const PIECE: u64 = 1 << 20;
        let end = end.min(start + 16 * PIECE);
        let mut at = start;
        let mut buf = Vec::new();
        while at < end {
            // Overlap by one byte so a pair across pieces is found.
            let len = (end - at).min(PIECE);
            buf.resize(len as usize, 0);
            if self.read_mem(at, &mut buf).is_err() {
                return None;
            }
            if let Some(off) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Some(at + off as u64);
            }
            if at + len >= end {
                break;
            }
            at += len - 1;
        }
        None
    }

    /// Inject system call `nr` with `args` and return the raw result (`-errno` on failure).
    /// The registers are restored afterwards.
    pub fn syscall_raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        let saved = self.regs()?;
        let res = self.syscall_keep_regs(nr, args);
        let restore = self.set_regs(&saved);
        let res = res?;
        restore?;
        Ok(res)
    }

    /// Inject a system call and stop at its syscall-exit stop *without* restoring the
    /// registers. The caller sets the registers it wants before resuming.
    pub fn syscall_keep_regs(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        let insn = self
            .syscall_insn
            .ok_or(TraceError::NoSyscallInsn { tid: self.tid })?;
        let mut r = self.regs()?;
        r.rip = insn;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        self.set_regs(&r)?;
        self.run_to_syscall_stop()?; // entry
        self.run_to_syscall_stop()?; // exit
        Ok(self.regs()?.rax as i64)
    }

    /// Inject a system call; a negative result becomes [`TraceError::Injected`].
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<u64, TraceError> {
        let r = self.syscall_raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(TraceError::Injected {
                tid: self.tid,
                name: syscall_name(nr),
                errno: Errno::from_raw((-r) as i32),
            });
        }
        Ok(r as u64)
    }

    /// Detach, letting the thread run. Suppressed signals are queued again first.
    pub fn detach(mut self) -> Result<(), TraceError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), TraceError> {
        if !self.attached {
            return Ok(());
        }
        for sig in std::mem::take(&mut self.pending_signals) {
            if sig == libc::SIGSTOP || sig == libc::SIGTRAP {
                continue;
            }
            // SAFETY: tgkill only takes integers; a stale tid yields ESRCH, which we ignore.
            let _ = unsafe { libc::syscall(libc::SYS_tgkill, self.tgid, self.tid, sig) };
        }
        self.attached = false;
        // SAFETY: PTRACE_DETACH takes no addr; data 0 = no signal.
        unsafe {
            ptrace_raw(
                libc::PTRACE_DETACH,
                self.tid,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
        .map(|_| ())
        .map_err(|source| TraceError::Ptrace {
            tid: self.tid,
            op: "PTRACE_DETACH",
            source,
        })
    }

    /// Wait until the thread has exited (e.g. after the caller sent `SIGKILL`), resuming it
    /// from any stop it still reports.
    pub fn wait_exit(mut self) -> Result<(), TraceError> {
        loop {
            match self.wait_stop() {
                Err(TraceError::Gone { .. }) => return Ok(()),
                Err(TraceError::Wait {
                    source: Errno::ECHILD,
                    ..
                }) => {
                    self.attached = false;
                    return Ok(());
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    let _ = self.resume(libc::PTRACE_CONT, "PTRACE_CONT");
                }
            }
        }
    }

    /// Forget the attachment without detaching (e.g. because the thread was killed).
    pub fn forget(mut self) {
        self.attached = false;
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            log::debug!("detach on drop: {e}");
        }
    }
}
