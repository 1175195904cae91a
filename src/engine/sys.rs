//! Small raw system-call wrappers that are not ptrace (those live in `tracer.rs`):
//! creating the restore child with `clone3`, `prlimit64` on another process,
//! `get_robust_list` of another thread, and the pipe helpers (capacity, `FIONREAD`, `tee`).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork a child (with `clone3`, optionally with `set_tid = [pid]`) that calls
/// `PTRACE_TRACEME` and then stops itself with `SIGSTOP`. Returns the child's pid once it is
/// in that stop. The child never runs any Rust code after the fork: it only issues raw system
/// calls, so forking from a multi-threaded process is safe.
pub fn spawn_stopped_child(desired_pid: Option<i32>) -> Result<i32, Errno> {
    let tids: [libc::pid_t; 1] = [desired_pid.unwrap_or(0)];
    let mut args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if desired_pid.is_some() {
        args.set_tid = tids.as_ptr() as u64;
        args.set_tid_size = 1;
    }
    // SAFETY: `args` is a valid clone_args of the size we pass, `tids` outlives the call. Without
    // CLONE_VM the child gets a copy of our address space, so returning on the same stack is
    // fine. In the child we only call async-signal-safe raw syscalls and never return from this
    // function (it either stops forever under the tracer's control or exits).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    if r == 0 {
        // Child.
        // SAFETY: raw syscalls with integer arguments only; exit_group never returns.
        unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            let me = libc::syscall(libc::SYS_getpid);
            libc::syscall(libc::SYS_kill, me, libc::SIGSTOP);
            // Only reached if the tracer resumed us without taking over: leave quietly.
            libc::syscall(libc::SYS_exit_group, 127);
        }
        #[allow(clippy::empty_loop)]
        loop {}
    }
    let pid = r as i32;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid writable c_int.
        let w = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if w == -1 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        if libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP {
            return Ok(pid);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(Errno::ECHILD);
        }
        // Some other stop (should not happen): pass it on and keep waiting.
        // SAFETY: PTRACE_CONT with no addr and the stop signal as data.
        unsafe {
            libc::ptrace(
                libc::PTRACE_CONT,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                libc::WSTOPSIG(status) as usize as *mut libc::c_void,
            );
        }
    }
}

/// Kill and reap a child we created (best effort).
pub fn kill_and_reap(pid: i32) {
    // SAFETY: integer-only syscalls; errors (already dead) are ignored.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let mut status: libc::c_int = 0;
    // The other threads first: a thread we trace becomes a zombie only its tracer can reap,
    // and the leader is not reported until every other thread is gone, so waiting for the
    // leader alone waited for good (a restore failing after it made threads hung so). A
    // thread we do not trace is no child of ours, and waitpid says so at once.
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|t| *t != pid)
                .collect()
        })
        .unwrap_or_default();
    for tid in tids {
        // SAFETY: `status` is a valid writable c_int.
        unsafe {
            libc::waitpid(tid, &mut status, libc::__WALL);
        }
    }
    // SAFETY: `status` is a valid writable c_int.
    unsafe {
        libc::waitpid(pid, &mut status, libc::__WALL);
    }
}

/// `prlimit64(pid, resource, NULL, &old)`.
pub fn get_rlimit(pid: i32, resource: u32) -> Result<(u64, u64), Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid writable rlimit64; new_limit is NULL.
    let r = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            pid,
            resource,
            std::ptr::null::<libc::rlimit64>(),
            &mut old as *mut libc::rlimit64,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// `prlimit64(pid, resource, &new, NULL)`.
pub fn set_rlimit(pid: i32, resource: u32, cur: u64, max: u64) -> Result<(), Errno> {
    let new = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `new` is a valid rlimit64 the kernel only reads; old_limit is NULL.
    let r = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            pid,
            resource,
            &new as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `get_robust_list(tid)`: (head address, length).
pub fn get_robust_list(tid: i32) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers are valid and writable for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok((head, len as u64))
}

/// Send `sig` to `pid` (best effort).
pub fn kill(pid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: integer-only syscall.
    let r = unsafe { libc::kill(pid, sig) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Capacity of a pipe in bytes (`F_GETPIPE_SZ`).
pub fn pipe_capacity(fd: impl AsFd) -> Result<usize, Errno> {
    fcntl(fd, FcntlArg::F_GETPIPE_SZ).map(|v| v as usize)
}

/// Bytes buffered in a pipe (`FIONREAD` on a read end).
pub fn pipe_buffered(fd: impl AsFd) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid and writable; the
    // descriptor is borrowed and open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(n.max(0) as usize)
}

/// A new non-blocking, close-on-exec pipe `(read end, write end)` with at least `capacity`
/// bytes of capacity.
pub fn pipe_with_capacity(capacity: usize) -> Result<(OwnedFd, OwnedFd), Errno> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    if pipe_capacity(&w)? < capacity {
        let c = libc::c_int::try_from(capacity).map_err(|_| Errno::EINVAL)?;
        fcntl(&w, FcntlArg::F_SETPIPE_SZ(c))?;
    }
    Ok((r, w))
}

/// One `tee(src, dst, len, SPLICE_F_NONBLOCK)`: copies up to `len` bytes buffered in pipe `src`
/// into pipe `dst` without consuming them. (Calling it again would copy the same bytes again.)
pub fn tee_all(src: impl AsFd, dst: impl AsFd, len: usize) -> Result<usize, Errno> {
    // SAFETY: tee only takes descriptors (borrowed, open for the call) and integers.
    let r = unsafe {
        libc::tee(
            src.as_fd().as_raw_fd(),
            dst.as_fd().as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(r as usize)
}

/// Duplicate `fd` to the lowest free descriptor `>= min` (close-on-exec).
pub fn dup_at_least(fd: impl AsFd, min: i32) -> Result<OwnedFd, Errno> {
    let n = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Do descriptor `fd1` of `pid1` and `fd2` of `pid2` refer to the same open file description
/// (`kcmp(KCMP_FILE)`)? `None` if the kernel cannot tell (no CONFIG_KCMP, or no access).
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Option<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1 as libc::c_long,
            pid2 as libc::c_long,
            KCMP_FILE,
            fd1 as libc::c_long,
            fd2 as libc::c_long,
        )
    };
    (r >= 0).then_some(r == 0)
}
