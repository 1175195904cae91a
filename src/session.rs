//! Sessions: a process tree started by `forkpoint run` (or recreated by `restore`) in its own
//! PID, mount, IPC, UTS and time namespaces, with a small init as PID 1.
//!
//! ```text
//! forkpoint run ──spawn──▶ session-init (host side; unshared mount/ipc/uts/pid/time ns)
//!                              └─fork─▶ init (PID 1 in the session)
//!                                          ├─ fork+exec ─▶ CMD (PID 2)         (run)
//!                                          └─ engine::restore(pid = N) ─▶ CMD (restore)
//! ```
//! init serves `STORE/sessions/NAME/ctl.sock`: a checkpoint request makes init (the parent,
//! inside the PID namespace, so pids are the session's own) stop the program with ptrace, ask
//! the daemon to commit the filesystem at that instant, dump the program, and hand the image
//! to the daemon, which records (name, root, image) in one catalog transaction.

use crate::daemon::{self, Request};
use anyhow::{anyhow, bail, Context, Result};
use forkpoint::engine::dirty::DirtyTracker;
use forkpoint::engine::image::PageData;
use forkpoint::engine::{self, AfterDump, DumpOptions, TreeImage, TreeRestoreOptions};
use forkpoint_fs::maint::decode_image;
use forkpoint_fs::{ContentId, Store};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Version of the session image wrapper.
/// 2: `process` holds the engine's tree image (the program and its descendants, pipes).
/// 3: `sysv`, the SysV IPC objects of the session's namespace. Version 2 images decode with
///    none (they had none: such checkpoints were refused).
/// 4: `own`, the directories the session owns (its `/dev/shm` and temporary directory).
///    Older images decode with none (their sessions shared the host's, and checkpoints of
///    files written there were refused).
pub const SESSION_IMAGE_VERSION: u32 = 5;

/// What a checkpoint stores besides the engine's process image.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionImage {
    pub version: u32,
    /// The engine's image (memory externalized into store chunks).
    #[serde(with = "forkpoint::engine::image::bytes")]
    pub process: Vec<u8>,
    /// CLOCK_MONOTONIC and CLOCK_BOOTTIME inside the session at the checkpoint (ns).
    pub monotonic_ns: i128,
    pub boottime_ns: i128,
    pub argv: Vec<String>,
    /// SysV IPC objects (version 3), their segments' contents externalized like memory.
    pub sysv: crate::sysv::SysvImage,
    /// The directories the session owns (version 4), by path, their file contents
    /// externalized like memory.
    pub own: Vec<(PathBuf, crate::owndirs::ShmDir)>,
    /// Files outside the mount the program holds open by descriptor (version 5): a restore
    /// reopens them by path, so they must be the same files, unchanged.
    pub outside: Vec<OutsideFile>,
    /// Where the program saw the mount (version 5; empty before): its descriptors, maps
    /// and working directory name paths under it, so a restore needs the mount there.
    pub mountpoint: PathBuf,
}

/// A file outside the mount open in the program at a checkpoint, as it was then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutsideFile {
    pub path: PathBuf,
    pub id: forkpoint::engine::image::FileId,
}

impl OutsideFile {
    /// Whether the file at its path is still the one recorded, unchanged; why not.
    pub fn check(&self) -> Result<(), String> {
        let st = std::fs::metadata(&self.path).map_err(|e| e.to_string())?;
        self.id.differs(&st, true).map_or(Ok(()), Err)
    }
}

/// A version 4 session image.
#[derive(Deserialize)]
struct SessionImageV4 {
    version: u32,
    #[serde(with = "forkpoint::engine::image::bytes")]
    process: Vec<u8>,
    monotonic_ns: i128,
    boottime_ns: i128,
    argv: Vec<String>,
    sysv: crate::sysv::SysvImage,
    own: Vec<(PathBuf, crate::owndirs::ShmDir)>,
}

/// A version 2 session image.
#[derive(Deserialize)]
struct SessionImageV2 {
    version: u32,
    #[serde(with = "forkpoint::engine::image::bytes")]
    process: Vec<u8>,
    monotonic_ns: i128,
    boottime_ns: i128,
    argv: Vec<String>,
}

/// A version 3 session image.
#[derive(Deserialize)]
struct SessionImageV3 {
    version: u32,
    #[serde(with = "forkpoint::engine::image::bytes")]
    process: Vec<u8>,
    monotonic_ns: i128,
    boottime_ns: i128,
    argv: Vec<String>,
    sysv: crate::sysv::SysvImage,
}

impl SessionImage {
    /// Decodes any supported version.
    pub fn decode(bytes: &[u8]) -> Result<SessionImage> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(bytes).context("decode session image version")?;
        // An older image is read as version 4 with what it lacks empty, then as this one.
        let v4: SessionImageV4 = match version {
            2 => {
                let v: SessionImageV2 =
                    postcard::from_bytes(bytes).context("decode session image")?;
                SessionImageV4 {
                    version: v.version,
                    process: v.process,
                    monotonic_ns: v.monotonic_ns,
                    boottime_ns: v.boottime_ns,
                    argv: v.argv,
                    sysv: Default::default(),
                    own: Vec::new(),
                }
            }
            3 => {
                let v: SessionImageV3 =
                    postcard::from_bytes(bytes).context("decode session image")?;
                SessionImageV4 {
                    version: v.version,
                    process: v.process,
                    monotonic_ns: v.monotonic_ns,
                    boottime_ns: v.boottime_ns,
                    argv: v.argv,
                    sysv: v.sysv,
                    own: Vec::new(),
                }
            }
            4 => postcard::from_bytes(bytes).context("decode session image")?,
            SESSION_IMAGE_VERSION => {
                return postcard::from_bytes(bytes).context("decode session image")
            }
            v => bail!(
                "session image version {v} is not supported (this forkpoint reads 2 to {SESSION_IMAGE_VERSION})"
            ),
        };
        Ok(SessionImage {
            version: v4.version,
            process: v4.process,
            monotonic_ns: v4.monotonic_ns,
            boottime_ns: v4.boottime_ns,
            argv: v4.argv,
            sysv: v4.sysv,
            own: v4.own,
            outside: Vec::new(),
            mountpoint: PathBuf::new(),
        })
    }
}

/// A session's record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub name: String,
    pub branch: String,
    /// The path the program sees.
    pub mountpoint: PathBuf,
    /// The path the daemon serves the branch at (differs for `restore --branch`).
    pub daemon_mount: PathBuf,
    /// Host pid of session-init.
    pub pid: i32,
    /// Session-local pid of the program.
    pub main_pid: i32,
    pub argv: Vec<String>,
    pub restored_from: Option<String>,
    pub started: i64,
}

/// Options passed to session-init.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    pub store: PathBuf,
    pub name: String,
    pub branch: String,
    pub mountpoint: PathBuf,
    pub daemon_mount: PathBuf,
    pub cwd: PathBuf,
    pub argv: Vec<String>,
    /// Checkpoint number to restore instead of running `argv`.
    pub restore: Option<u64>,
    pub restored_from: Option<String>,
    /// Restore memory lazily ([`engine::lazy`]).
    #[serde(default)]
    pub lazy: bool,
}

pub fn sessions_dir(store: &Path) -> PathBuf {
    store.join("sessions")
}

fn session_dir(store: &Path, name: &str) -> PathBuf {
    sessions_dir(store).join(name)
}

/// Whether `pid` runs. A zombie does not: a detached session's init is re-parented, and
/// the machine's init may reap it only much later.
pub fn alive(pid: i32) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    !matches!(proc_state(pid).as_deref(), Some("Z" | "X") | None)
}

/// Waits up to `timeout` for session-init `pid` to end; whether it did.
pub fn wait_gone(pid: i32, timeout: std::time::Duration) -> bool {
    let t0 = Instant::now();
    while alive(pid) {
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `T`, `Z`, ...), if the process exists.
fn proc_state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the state follows the last ')'.
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    Some(state.to_string())
}

/// A session name another command holds: its session runs, or is being started.
#[derive(Debug)]
pub struct NameTaken(pub String);

impl std::fmt::Display for NameTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameTaken {}

/// The file in a session's directory naming the command that is starting it (its pid).
const STARTING: &str = "starting";

/// The pid recorded in a session directory's `file`, if that process is alive.
fn live_pid_in(dir: &Path, file: &str) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    let pid = if file == "info.json" {
        serde_json::from_str::<SessionInfo>(&text).ok()?.pid
    } else {
        text.trim().parse().ok()?
    };
    alive(pid).then_some(pid)
}

/// Whether session `name`'s directory is held: its session runs or is being started.
pub fn name_taken(store: &Path, name: &str) -> bool {
    let dir = session_dir(store, name);
    live_pid_in(&dir, "info.json").is_some() || live_pid_in(&dir, STARTING).is_some()
}

/// Takes session `name`'s directory for a new session: made here, or taken over from a
/// session that has ended. Of two commands starting the same name at once, one gets it and
/// the other fails with [`NameTaken`] (before, the second removed the first one's directory
/// and took its socket and info, leaving a session that no command could reach).
fn claim(dir: &Path, name: &str) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    // Made whole (with the mark of this command) under another name, then moved in place
    // only if nothing is there: no other command ever sees it half made.
    let new = parent.join(format!(".{name}.new.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir(&new).with_context(|| format!("create {}", new.display()))?;
    let made = std::fs::write(new.join(STARTING), std::process::id().to_string())
        .with_context(|| format!("write {}", new.join(STARTING).display()))
        .and_then(|()| {
            for _ in 0..8 {
                match rename_noreplace(&new, dir) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
                }
                if let Some(pid) = live_pid_in(dir, "info.json") {
                    return Err(NameTaken(format!(
                        "session '{name}' is already running (pid {pid})"
                    ))
                    .into());
                }
                if let Some(pid) = live_pid_in(dir, STARTING) {
                    return Err(NameTaken(format!(
                        "session '{name}' is being started (by process {pid})"
                    ))
                    .into());
                }
                // Ended: moved aside first, so that of two commands taking it over only
                // one removes it.
                let aside = parent.join(format!(".{name}.ended.{}", std::process::id()));
                match std::fs::rename(dir, &aside) {
                    Ok(()) => {
                        let _ = std::fs::remove_dir_all(&aside);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("move aside {}", dir.display()))
                    }
                }
            }
            Err(NameTaken(format!(
                "session '{name}' is being started by other commands"
            ))
            .into())
        });
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&new);
    }
    made
}

/// `rename(2)` that fails with `EEXIST` instead of replacing what is at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated strings that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Every session record of the store, whether its session runs or not.
pub fn records(store: &Path) -> Vec<SessionInfo> {
    let Ok(rd) = std::fs::read_dir(sessions_dir(store)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let path = e.path().join("info.json");
            let text = std::fs::read_to_string(&path).ok()?;
            serde_json::from_str::<SessionInfo>(&text)
                .map_err(|err| {
                    // Said, not hidden: the session it names may be running.
                    log::warn!(
                        "the session record {} is damaged ({err}); a session it names is not \
                         listed",
                        path.display()
                    )
                })
                .ok()
        })
        .collect()
}

/// Sessions of a store (live ones only).
pub fn list(store: &Path) -> Result<Vec<SessionInfo>> {
    let mut out: Vec<SessionInfo> = records(store)
        .into_iter()
        .filter(|i| alive(i.pid))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn clock_ns(clock: nix::time::ClockId) -> i128 {
    nix::time::clock_gettime(clock)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0)
}

/// Starts a session; returns session-init's exit status (or 0 when detached).
pub fn start(spec: &InitSpec, detach: bool, time_offsets: Option<(i128, i128)>) -> Result<i32> {
    start_with(spec, detach, time_offsets, None, None)
}

/// What a restore has read and checked before its session starts: the store, and the
/// process image resolved from it. Handed to the session by `fork` (no second read).
pub struct Preloaded {
    pub store: Arc<Store>,
    /// The checkpoint's process image (the top of its chain).
    pub image: ContentId,
    pub si: SessionImage,
    pub tree: TreeImage,
    /// Delta images under it.
    pub depth: u32,
}

/// The session's first process: exec'd (`forkpoint session-init`), or forked from this
/// one with a [`Preloaded`] restore.
enum Started {
    Exec(std::process::Child),
    Forked(nix::unistd::Pid),
}

impl Started {
    /// Its exit, as a message, once it has exited.
    fn try_wait(&mut self) -> Result<Option<String>> {
        match self {
            Started::Exec(c) => Ok(c.try_wait()?.map(|st| st.to_string())),
            Started::Forked(pid) => {
                use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
                match waitpid(*pid, Some(WaitPidFlag::WNOHANG))? {
                    WaitStatus::Exited(_, c) => Ok(Some(format!("exit status: {c}"))),
                    WaitStatus::Signaled(_, s, _) => Ok(Some(format!("signal: {s}"))),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Its exit code (128 + the signal that killed it), once it has exited.
    fn try_code(&mut self) -> Result<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Started::Exec(c) => Ok(c
                .try_wait()
                .context("wait for session")?
                .map(|st| st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))),
            Started::Forked(pid) => {
                use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
                match waitpid(*pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, c)) => Ok(Some(c)),
                    Ok(WaitStatus::Signaled(_, s, _)) => Ok(Some(128 + s as i32)),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(None),
                    Err(e) => Err(e).context("wait for session"),
                }
            }
        }
    }

    /// Waits for its exit code (128 + the signal that killed it).
    fn wait(self) -> Result<i32> {
        match self {
            Started::Exec(mut c) => {
                let st = c.wait().context("wait for session")?;
                Ok(st.code().unwrap_or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    128 + st.signal().unwrap_or(0)
                }))
            }
            Started::Forked(pid) => loop {
                use nix::sys::wait::{waitpid, WaitStatus};
                match waitpid(pid, None) {
                    Ok(WaitStatus::Exited(_, c)) => return Ok(c),
                    Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("wait for session"),
                }
            },
        }
    }
}

/// [`start`]; with `pre`, the session is forked from this process and restores what `pre`
/// holds (a restore reads its image once, here).
///
/// `on_running` is called once the program runs (restored, for a restore): when this
/// returns for a detached session, when its info appears for one in the foreground.
pub fn start_with(
    spec: &InitSpec,
    detach: bool,
    time_offsets: Option<(i128, i128)>,
    pre: Option<Preloaded>,
    on_running: Option<&mut dyn FnMut()>,
) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let dir = session_dir(&spec.store, &spec.name);
    claim(&dir, &spec.name)?;
    // The mark of the start goes when this returns: the session runs (its info holds the
    // name from then on) or has failed.
    struct StartMark(PathBuf);
    impl Drop for StartMark {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _mark = StartMark(dir.join(STARTING));
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?).context("write session spec")?;
    let log_file = if detach {
        let log = dir.join("output.log");
        // Appending: a restore reopens the program's descriptors on it (or on the log of the
        // session it is restored as) at the end, whatever their offset was.
        Some(
            std::fs::File::options()
                .append(true)
                .create_new(true)
                .open(&log)
                .with_context(|| format!("create {}", log.display()))?,
        )
    } else {
        None
    };
    // Offsets are written before the new time namespace has any member, as the kernel requires.
    let offsets = time_offsets.map(|(m, b)| {
        let sec = |ns: i128| {
            (
                ns.div_euclid(1_000_000_000) as i64,
                ns.rem_euclid(1_000_000_000) as i64,
            )
        };
        let (ms, mn) = sec(m);
        let (bs, bn) = sec(b);
        format!("monotonic {ms} {mn}\nboottime {bs} {bn}\n")
    });
    let cgroup = crate::cgroup::create(&spec.store, &spec.name).ok();
    // Taken away again when this returns, unless a process is in it (the session runs): a
    // session that could not start leaves no empty cgroup behind.
    struct CgroupLeft<'a>(&'a Path, &'a str);
    impl Drop for CgroupLeft<'_> {
        fn drop(&mut self) {
            crate::cgroup::remove(self.0, self.1);
        }
    }
    let _cgroup_left = CgroupLeft(&spec.store, &spec.name);
    let hook = move || -> std::io::Result<()> {
        // A restore defers interrupts while it works (`DeferInterrupts`); the session's
        // processes take them as usual.
        for sig in DeferInterrupts::SIGNALS {
            // SAFETY: resetting a disposition to its default runs no handler and touches
            // no memory of this process's.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
        if let Some(cg) = &cgroup {
            // Join the session's cgroup first, so every descendant is in it.
            let _ = std::fs::write(cg.join("cgroup.procs"), b"0");
        }
        if detach {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
        }
        use nix::sched::CloneFlags as F;
        nix::sched::unshare(F::CLONE_NEWNS | F::CLONE_NEWIPC | F::CLONE_NEWUTS | F::CLONE_NEWPID)
            .map_err(std::io::Error::from)?;
        // nix has no constant for the time namespace.
        // SAFETY: unshare takes a flag word and touches no memory.
        if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Some(o) = &offsets {
            std::fs::write("/proc/self/timens_offsets", o.as_bytes())?;
        }
        Ok(())
    };
    // Forking needs this process to be single-threaded (a thread left behind, such as the
    // waiter of a detached session started before, might hold a lock the child needs): else
    // the session is exec'd and reads the image itself.
    let pre = pre.filter(|_| {
        let one = thread_count() == Some(1);
        if !one {
            log::debug!("session {}: exec'd, this process has threads", spec.name);
        }
        one
    });
    let mut child = match pre {
        None => {
            let mut cmd =
                std::process::Command::new(std::env::current_exe().context("current exe")?);
            cmd.arg("session-init").arg(&spec_path);
            if let Some(f) = log_file {
                cmd.stdin(std::process::Stdio::null())
                    .stdout(f.try_clone()?)
                    .stderr(f);
            }
            // SAFETY: the hook runs between fork and exec and makes only plain system calls
            // (open, write, setsid, unshare); the values it uses were built before the fork.
            unsafe {
                cmd.pre_exec(hook);
            }
            Started::Exec(cmd.spawn().context("start session")?)
        }
        Some(pre) => {
            let null = std::fs::File::open("/dev/null").context("open /dev/null")?;
            // SAFETY: this process is single-threaded (checked above); the child goes on with
            // its own copy of everything and never returns. It reads segments through the
            // inherited read-only store and never uses its SQLite connection.
            match unsafe { nix::unistd::fork() }.context("start session")? {
                nix::unistd::ForkResult::Child => {
                    let res = (|| -> Result<i32> {
                        if let Some(f) = &log_file {
                            nix::unistd::dup2_stdin(&null)?;
                            nix::unistd::dup2_stdout(f)?;
                            nix::unistd::dup2_stderr(f)?;
                        }
                        drop((null, log_file));
                        hook()?;
                        session_init_with(spec.clone(), Some(pre))
                    })();
                    let code = res.unwrap_or_else(|e| {
                        eprintln!(
                            "forkpoint: session {}: {}",
                            spec.name,
                            crate::render_error(&e)
                        );
                        127
                    });
                    std::process::exit(code);
                }
                nix::unistd::ForkResult::Parent { child } => {
                    drop(pre);
                    Started::Forked(child)
                }
            }
        }
    };
    if detach {
        // Wait until init serves its socket (the program runs: a restore is complete), so
        // that the caller can checkpoint at once, or until the session fails. A restore of
        // a large image from disk may take long: there is no deadline while it is alive.
        let sock = dir.join("ctl.sock");
        loop {
            if sock.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let log = dir.join("output.log");
                // The session's own error is the last message it wrote.
                let why = std::fs::read_to_string(&log).ok().and_then(|t| {
                    t.lines()
                        .rev()
                        .find_map(|l| l.strip_prefix("forkpoint: "))
                        .map(str::to_string)
                });
                match why {
                    Some(why) => bail!("{why} ({st}; log in {})", log.display()),
                    None => bail!(
                        "session '{}' exited at once ({st}); see {}",
                        spec.name,
                        log.display()
                    ),
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::spawn(move || child.wait());
        if let Some(f) = on_running {
            f();
        }
        return Ok(0);
    }
    let code = wait_forwarding_signals(child, &dir, on_running)?;
    // A restore that failed ends the session before init writes its info (it does once the
    // program is back): the caller must hear of it as a failure, to undo what it did for it.
    if spec.restore.is_some() && !dir.join("info.json").exists() {
        bail!(
            "session '{}' ended before its program was back (exit status {code}; the reason \
             is above)",
            spec.name
        );
    }
    Ok(code)
}

/// While alive, SIGINT, SIGTERM and SIGHUP do not end this process but are noted: a restore
/// that has begun to stop a program, make a branch or start a session finishes (or undoes
/// itself) rather than stop half way, which would lose the program or leave a branch
/// nothing runs on. SIGKILL cannot be deferred.
pub struct DeferInterrupts(Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>);

static DEFERRED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn note_deferred(sig: libc::c_int) {
    DEFERRED.store(sig, std::sync::atomic::Ordering::SeqCst);
}

impl DeferInterrupts {
    pub const SIGNALS: [nix::sys::signal::Signal; 3] = [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ];

    pub fn new() -> DeferInterrupts {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
        let action = SigAction::new(
            SigHandler::Handler(note_deferred),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for sig in Self::SIGNALS {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            if let Ok(prev) = unsafe { sigaction(sig, &action) } {
                old.push((sig, prev));
            }
        }
        DeferInterrupts(old)
    }

    /// The signal that came meanwhile, if any.
    pub fn caught(&self) -> Option<i32> {
        match DEFERRED.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for DeferInterrupts {
    fn drop(&mut self) {
        for (sig, prev) in &self.0 {
            // SAFETY: puts back the disposition this guard replaced.
            let _ = unsafe { nix::sys::signal::sigaction(*sig, prev) };
        }
    }
}

/// Signals sent to a foreground `forkpoint run` or `restore`, one bit per signal number.
static FORWARD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The signals a foreground session's command passes on to its program.
const FORWARDED: [nix::sys::signal::Signal; 6] = {
    use nix::sys::signal::Signal as S;
    [
        S::SIGINT,
        S::SIGTERM,
        S::SIGHUP,
        S::SIGQUIT,
        S::SIGUSR1,
        S::SIGUSR2,
    ]
};

extern "C" fn note_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A signal the terminal sent (Ctrl-C: `SI_KERNEL`) reached the program as well, in the
    // same foreground process group; only one sent with kill(2) to this process is passed on.
    // SAFETY: the kernel hands a SA_SIGINFO handler a valid siginfo_t.
    let from_kernel = !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL;
    if !from_kernel && (0..64).contains(&sig) {
        FORWARD.fetch_or(1 << sig, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits for a foreground session and returns its program's exit code, passing signals sent
/// to this process (by `kill`, `timeout`, a supervisor) on to the program, as sudo does: the
/// command dies with its program, not before it, and leaves no session behind.
fn wait_forwarding_signals(
    mut child: Started,
    dir: &Path,
    mut on_running: Option<&mut dyn FnMut()>,
) -> Result<i32> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::SigAction(note_signal),
        SaFlags::SA_SIGINFO | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
    // A signal a restore held off while it worked is the program's once it runs.
    let mut held = match DEFERRED.swap(0, std::sync::atomic::Ordering::SeqCst) {
        0 => 0u64,
        sig => 1u64 << sig,
    };
    loop {
        if let Some(code) = child.try_code()? {
            return Ok(code);
        }
        if on_running.is_some() && program_host_pid(dir).is_some() {
            if let Some(f) = on_running.take() {
                f();
            }
        }
        held |= FORWARD.swap(0, std::sync::atomic::Ordering::SeqCst);
        if held != 0 {
            // Kept until the program is there to take them (it may be starting still).
            if let Some(pid) = program_host_pid(dir) {
                for sig in FORWARDED {
                    if held & (1 << sig as i32) != 0 {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                }
                held = 0;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The host pid of a session's program (see [`program_host_pid_of`]), from its info.json.
fn program_host_pid(dir: &Path) -> Option<i32> {
    let info: SessionInfo =
        serde_json::from_slice(&std::fs::read(dir.join("info.json")).ok()?).ok()?;
    program_host_pid_of(&info)
}

/// A running session's state, as `ps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// Left stopped by `checkpoint --stop`, or by a signal.
    Stopped,
    /// No program yet.
    Starting,
    /// The daemon that served its files died: the program's files are gone from under it,
    /// and a checkpoint is refused.
    MountLost,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::MountLost => "mount lost",
        }
    }
}

/// A running session's [`State`].
pub fn state(info: &SessionInfo) -> State {
    let Some(pid) = program_host_pid_of(info) else {
        return State::Starting;
    };
    // Through /proc/PID/root the mount is looked up in the program's own mount namespace;
    // statfs always asks the daemon (a stat may be answered from the kernel's cache).
    let seen = PathBuf::from(format!("/proc/{pid}/root")).join(
        info.mountpoint
            .strip_prefix("/")
            .unwrap_or(&info.mountpoint),
    );
    if matches!(
        nix::sys::statfs::statfs(&seen),
        Err(nix::errno::Errno::ENOTCONN)
    ) {
        return State::MountLost;
    }
    match proc_state(pid).as_deref() {
        Some("T" | "t") => State::Stopped,
        _ => State::Running,
    }
}

/// The host pid of a session's program: the descendant of its session-init whose pid in the
/// session's namespace is the one info.json names.
fn program_host_pid_of(info: &SessionInfo) -> Option<i32> {
    if info.main_pid <= 0 {
        return None;
    }
    let mut todo = vec![info.pid];
    while let Some(p) = todo.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let nspid: Vec<i32> = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if nspid.len() > 1 && nspid.last() == Some(&info.main_pid) {
            return Some(p);
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            todo.extend(c.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    None
}

/// Threads of this process (/proc/self/status).
fn thread_count() -> Option<u64> {
    field_kb(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "Threads:",
    )
}

/// session-init: runs on the host side of the new namespaces and forks init, PID 1.
pub fn session_init(spec_path: &Path) -> Result<i32> {
    let spec: InitSpec = serde_json::from_slice(&std::fs::read(spec_path).context("read spec")?)?;
    session_init_with(spec, None)
}

fn session_init_with(spec: InitSpec, pre: Option<Preloaded>) -> Result<i32> {
    let dir = session_dir(&spec.store, &spec.name);
    let info = SessionInfo {
        name: spec.name.clone(),
        branch: spec.branch.clone(),
        mountpoint: spec.mountpoint.clone(),
        daemon_mount: spec.daemon_mount.clone(),
        pid: std::process::id() as i32,
        main_pid: 0,
        argv: spec.argv.clone(),
        restored_from: spec.restored_from.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    // SAFETY: this process is single-threaded here; the child only calls into `init`, which
    // runs its own code from scratch.
    match unsafe { nix::unistd::fork() }.context("fork init")? {
        nix::unistd::ForkResult::Child => {
            // init, and with it the whole PID namespace, dies with session-init.
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            if nix::unistd::getppid().as_raw() == 1 {
                std::process::exit(137);
            }
            let code = match init(&spec, info, pre) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!(
                        "forkpoint: session {}: {}",
                        spec.name,
                        crate::render_error(&e)
                    );
                    127
                }
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => {
            // init has its own copy; the store and the image are not held here.
            drop(pre);
            // On a terminal, Ctrl-C and Ctrl-\ reach every process of the foreground group:
            // the program decides what they do (it may catch them), as it would without
            // forkpoint. Here they would end session-init, and init and the program with it.
            for sig in [
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::Signal::SIGQUIT,
            ] {
                // SAFETY: SIG_IGN installs no handler.
                let _ =
                    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
            }
            let code = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => break c,
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("wait for init"),
                }
            };
            let _ = std::fs::remove_file(dir.join("ctl.sock"));
            crate::cgroup::remove(&spec.store, &spec.name);
            Ok(code)
        }
    }
}

/// PID 1 of the session.
fn init(spec: &InitSpec, mut info: SessionInfo, pre: Option<Preloaded>) -> Result<i32> {
    use nix::mount::{mount, MsFlags};
    let dir = session_dir(&spec.store, &spec.name);
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make mounts private")?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mount /proc")?;
    // A /dev/shm and a temporary directory of the session's own (owndirs): shared memory,
    // semaphores and scratch files are part of the session, recorded by its checkpoints and
    // not shared between branches.
    crate::owndirs::mount_all();
    if spec.daemon_mount != spec.mountpoint {
        mount(
            Some(&spec.daemon_mount),
            &spec.mountpoint,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "bind {} on {}",
                spec.daemon_mount.display(),
                spec.mountpoint.display()
            )
        })?;
    }
    // Pages written since the last checkpoint of this session (FORKPOINT_DIRTY_TRACKING=0
    // turns it off, to compare); a restored program starts tracked against its image.
    let tracker = (std::env::var("FORKPOINT_DIRTY_TRACKING").as_deref() != Ok("0"))
        .then(|| Arc::new(Mutex::new(DirtyTracker::new())));
    let main = match spec.restore {
        Some(cno) => restore_main(spec, cno, tracker.clone(), pre)?,
        None => {
            let argv: Vec<std::ffi::CString> = spec
                .argv
                .iter()
                .map(|a| std::ffi::CString::new(a.as_bytes()))
                .collect::<Result<_, _>>()
                .context("argument contains NUL")?;
            let prog = argv.first().cloned().ok_or_else(|| anyhow!("no command"))?;
            // Scratch files go to the session's temporary directory (owndirs), unless the
            // program was given a directory of its own other than /tmp.
            let tmpdir = std::env::var_os("TMPDIR");
            let default_tmp = tmpdir
                .as_deref()
                .is_none_or(|t| t.is_empty() || Path::new(t) == Path::new("/tmp"));
            let owned =
                crate::owndirs::dirs().contains(&PathBuf::from(crate::owndirs::SESSION_TMP));
            if default_tmp && owned {
                std::env::set_var("TMPDIR", crate::owndirs::SESSION_TMP);
            }
            // The child reports a failed exec here (the pipe closes on a good one), so that
            // a program that cannot run fails the session's start, not only its log.
            let (exec_r, exec_w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
            // SAFETY: init is single-threaded; the child only execs.
            match unsafe { nix::unistd::fork() }.context("fork program")? {
                nix::unistd::ForkResult::Child => {
                    drop(exec_r);
                    let _ = nix::unistd::chdir(&spec.cwd);
                    // Rust's runtime ignores SIGPIPE, and an ignored signal stays ignored
                    // across exec: the program starts with the default, as
                    // `std::process::Command` gives its children (`yes | head` ends `yes`
                    // by the signal, not with an error).
                    // SAFETY: SIG_DFL installs no handler; the child is single-threaded.
                    let _ = unsafe {
                        nix::sys::signal::signal(
                            nix::sys::signal::Signal::SIGPIPE,
                            nix::sys::signal::SigHandler::SigDfl,
                        )
                    };
                    // The program gets stdin, stdout and stderr only: a descriptor inherited
                    // from whoever ran `forkpoint run` (a jobserver pipe, a socket) would
                    // reach outside the session and make every checkpoint fail.
                    // SAFETY: close_range takes integers; CLOSE_RANGE_CLOEXEC closes nothing
                    // before the exec.
                    unsafe {
                        libc::syscall(
                            libc::SYS_close_range,
                            3u32,
                            u32::MAX,
                            libc::CLOSE_RANGE_CLOEXEC,
                        )
                    };
                    let Err(e) = nix::unistd::execvp(&prog, &argv);
                    let _ = nix::unistd::write(&exec_w, &(e as i32).to_ne_bytes());
                    std::process::exit(127);
                }
                nix::unistd::ForkResult::Parent { child } => {
                    drop(exec_w);
                    let mut code = [0u8; 4];
                    if std::io::Read::read_exact(&mut std::fs::File::from(exec_r), &mut code)
                        .is_ok()
                    {
                        let _ = nix::sys::wait::waitpid(child, None);
                        let e = nix::errno::Errno::from_raw(i32::from_ne_bytes(code));
                        bail!("cannot run {}: {}", spec.argv[0], e.desc());
                    }
                    child.as_raw()
                }
            }
        }
    };
    info.main_pid = main;
    std::fs::write(dir.join("info.json"), serde_json::to_vec_pretty(&info)?)
        .context("write session info")?;
    // The info holds the name from now on (the command that started the session may stay
    // for as long as the program runs, in the foreground).
    let _ = std::fs::remove_file(dir.join(STARTING));
    let sock = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("bind {}", sock.display()))?;
    listener.set_nonblocking(true)?;
    let mut main_status: Option<i32> = None;
    // init holds a userfaultfd per tracked process and takes descriptors of the program's
    // while it checkpoints: give it all the descriptors it may have (the program, forked or
    // restored already, keeps its own limits).
    let nofile = libc::RLIMIT_NOFILE;
    if let Ok((_, hard)) = engine::sys::get_rlimit(0, nofile) {
        let _ = engine::sys::set_rlimit(0, nofile, hard, hard);
    }
    loop {
        // Reap: the program, and orphans re-parented to us.
        loop {
            match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::Exited(p, c)) if p.as_raw() == main => {
                    main_status = Some(c)
                }
                Ok(nix::sys::wait::WaitStatus::Signaled(p, s, _)) if p.as_raw() == main => {
                    main_status = Some(128 + s as i32)
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if let Some(c) = main_status {
            // The session is the program's: what it left running (a server started in the
            // background, a daemon that forked away) ends with it. Say so.
            let left = left_behind();
            if !left.is_empty() {
                eprintln!(
                    "forkpoint: session {}: the program exited (status {c}); {} process{} it \
                     left running end{} with it: {}",
                    spec.name,
                    left.len(),
                    if left.len() == 1 { "" } else { "es" },
                    if left.len() == 1 { "s" } else { "" },
                    left.join(", ")
                );
            }
            return Ok(c);
        }
        // A lazy restore that has every page in goes over to dirty-page tracking.
        if lazy_complete() {
            if let Err(e) = finish_lazy(tracker.as_ref()) {
                log::warn!("{}", crate::render_error(&e));
            }
        }
        // A request is taken as soon as it comes; the timeout paces the reaping above.
        {
            use std::os::fd::AsFd;
            let mut fds = [nix::poll::PollFd::new(
                listener.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16));
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let killed = handle_control(spec, main, &conn, tracker.as_ref());
                if let Some(at) = &killed {
                    // The program was killed at its checkpoint; the session ends with it.
                    // Said where the session's output goes (the terminal of a foreground
                    // `run`, which would otherwise just end): a checkpoint --kill from
                    // another shell, or the one a rollback keeps.
                    let name = &spec.name;
                    if at.starts_with("auto-") {
                        eprintln!(
                            "forkpoint: session '{name}' was rolled back by a restore: its \
                             state before is kept as '{at}', and the restored program runs \
                             on detached under the same name (`forkpoint ps`)"
                        );
                    } else {
                        eprintln!("forkpoint: session '{name}' ended at its checkpoint '{at}'");
                    }
                    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(main), None);
                    return Ok(137);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A request to a session's init.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub name: String,
    /// "resume", "stop" or "kill".
    pub after: String,
    /// "checkpoint" or "auto".
    pub kind: String,
    /// Files outside the mount that the program may hold open for writing: they are not
    /// rolled back by a restore, so a checkpoint refuses them unless they are under one of
    /// these paths.
    #[serde(default)]
    pub allow_outside: Vec<PathBuf>,
}

fn handle_control(
    spec: &InitSpec,
    main: i32,
    conn: &UnixStream,
    tracker: Option<&Arc<Mutex<DirtyTracker>>>,
) -> Option<String> {
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return None;
    }
    let (resp, killed) = match serde_json::from_str::<CheckpointRequest>(&line) {
        Ok(req) => {
            let kill = (req.after == "kill").then(|| req.name.clone());
            let mut res = checkpoint(spec, main, &req, tracker);
            // The image the pages of a delta come from, or the chunks of pages taken from
            // it unchanged, are gone (its checkpoint was forgotten and gc ran): checkpoint
            // again, whole.
            let base_gone = |e: &anyhow::Error| {
                let e = crate::render_error(e);
                e.contains(crate::daemon::BASE_IMAGE_GONE) || e.contains(crate::daemon::CHUNK_GONE)
            };
            if let (Err(e), Some(t)) = (&res, tracker) {
                if base_gone(e) {
                    log::info!("the base image of the delta is gone; checkpointing whole");
                    t.lock().unwrap_or_else(|p| p.into_inner()).forget();
                    res = checkpoint(spec, main, &req, tracker);
                }
            }
            // Give the copies' memory back to the kernel (see warm_heap), unless they fit in
            // what was warmed for them: that stays warm for the next (incremental) one.
            let copied = res
                .as_ref()
                .ok()
                .and_then(|(v, _)| v["copied_bytes"].as_u64())
                .unwrap_or(u64::MAX);
            let warm = HEAP_WARM.load(std::sync::atomic::Ordering::Relaxed);
            if copied > warm || warm > program_rss() / 4 {
                // SAFETY: malloc_trim only returns free heap memory to the kernel.
                unsafe { libc::malloc_trim(0) };
                HEAP_WARM.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(t) = tracker {
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                match &res {
                    // Pages written from now on are told apart from those of this image.
                    Ok((_, Some(k))) => {
                        t.remember(&k.img);
                        t.base = Some((k.image, k.depth));
                    }
                    _ => t.forget(),
                }
            }
            match res.map(|(v, _)| v) {
                Ok(v) => (serde_json::json!({"ok": true, "value": v}), kill),
                Err(e) => (
                    serde_json::json!({"ok": false, "error": crate::render_error(&e)}),
                    None,
                ),
            }
        }
        Err(e) => (
            serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
            None,
        ),
    };
    let mut out = resp.to_string();
    out.push('\n');
    let _ = (&*conn).write_all(out.as_bytes());
    // Once the caller has its answer, while the program runs: warm the heap the next
    // incremental checkpoint copies into (kept between checkpoints, see above).
    if tracker.is_some() && killed.is_none() && heap_warming() {
        warm_heap(program_rss() / 8);
    }
    killed
}

/// Takes a checkpoint; returns what to report and, when it let the program run on, the
/// committed image (its memory in the store) for dirty-page tracking.
fn checkpoint(
    spec: &InitSpec,
    main: i32,
    req: &CheckpointRequest,
    tracker: Option<&Arc<Mutex<DirtyTracker>>>,
) -> Result<(serde_json::Value, Option<Kept>)> {
    forkpoint_fs::fs::validate_name(&req.name)?;
    // A name in use fails the record at the end: say so before the program is touched.
    let catalog = spec.store.join(forkpoint_fs::store::DB_FILE);
    if forkpoint_fs::catalog::Catalog::open(&catalog, true).is_ok_and(|c| c.find(&req.name).is_ok())
    {
        return Err(forkpoint_fs::error::StoreError::NameExists(req.name.clone()).into());
    }
    finish_lazy(tracker)?;
    // A program to be stopped or killed is left stopped by the dump, and killed only once
    // its checkpoint is recorded: a checkpoint that fails after the dump (the disk full, the
    // daemon gone) lets it go on instead.
    let after = match req.after.as_str() {
        "kill" | "stop" => AfterDump::Stop,
        _ => AfterDump::Resume,
    };
    let opts = DumpOptions {
        after,
        // Even a checkpoint that kills (the one kept before a rollback) reuses what was not
        // written since the last one.
        dirty: tracker.cloned(),
        own_dirs: crate::owndirs::dirs(),
        // The state a rollback keeps is taken from a program about to be killed: it does
        // not wait for the program to read its queues.
        lenient_queues: req.kind == "auto",
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut root_cno = None;
    let mut frozen_at = None;
    let mut sysv = None;
    let mut own = None;
    let mut outside = None;
    let mp = spec.mountpoint.clone();
    let dmp = spec.daemon_mount.clone();
    let store = spec.store.clone();
    let mut hook = || -> Result<(), String> {
        frozen_at = Some(Instant::now());
        // init shares the session's IPC namespace: these files list the program's objects.
        sysv = Some(crate::sysv::dump()?);
        // init shares the session's mount namespace: these are the program's /dev/shm and
        // temporary directory.
        own = Some(crate::owndirs::dump_all()?);
        let mut allowed = req.allow_outside.clone();
        allowed.push(session_dir(&spec.store, &spec.name));
        allowed.extend(crate::owndirs::dirs());
        outside = Some(outside_files(&mp, &allowed)?);
        // The program is stopped: the files as of now belong to this checkpoint.
        // /proc here is the session's own: every process of it, and nothing else.
        let t_checks = frozen_at.map(|f| f.elapsed());
        crate::flush_mount(&mp, None).map_err(|e| crate::render_error(&e))?;
        let t_flush = frozen_at.map(|f| f.elapsed());
        let v = daemon::call(
            &store,
            &Request::Commit {
                mountpoint: dmp.clone(),
            },
        )
        .map_err(|e| crate::render_error(&e))?
        .ok_or("no daemon serves the mount")?;
        root_cno = v["cno"].as_u64();
        log::debug!(
            "checkpoint hook: checks done at {t_checks:?}, mount flushed at {t_flush:?}, committed at {:?}",
            frozen_at.map(|f| f.elapsed())
        );
        Ok(())
    };
    // The first checkpoint copies every resident page while the program is frozen; on a
    // machine where first touches of memory are slow, that copy is faster into memory
    // already touched. Warm as much heap as the program has resident before freezing it
    // (an incremental checkpoint copies only what was written: warm an eighth of it).
    let incremental = opts
        .dirty
        .as_ref()
        .is_some_and(|t| t.lock().unwrap_or_else(|p| p.into_inner()).tracks(main));
    let warmed = if !heap_warming() {
        0
    } else if incremental {
        warm_heap(program_rss() / 8)
    } else {
        warm_heap(program_rss())
    };
    // A queue the program has not read yet (inotify events) passes in a moment: thaw and
    // try again, for up to a second.
    let mut tries = 0;
    let img = loop {
        match engine::dump_tree(main, &opts, &mut hook) {
            Err(engine::DumpError::Busy { .. }) if tries < 40 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            r => break r,
        }
    };
    if tries > 0 {
        log::debug!("checkpoint: frozen again {tries} times for queues to be read");
    }
    if warmed > 0 {
        log::debug!("checkpoint: {} MiB of heap warmed", warmed >> 20);
    }
    let img = img.context("dump")?;
    let t_dump = t0.elapsed();
    let stopped: Vec<i32> = match after {
        AfterDump::Stop => img
            .processes
            .iter()
            .filter(|m| m.live().is_some())
            .map(|m| m.pid)
            .collect(),
        _ => Vec::new(),
    };
    let res = record(
        spec, main, req, &opts, img, root_cno, frozen_at, sysv, own, outside, t0, t_dump,
    );
    let sig = match (&res, req.after.as_str()) {
        (Ok(_), "kill") => Some(nix::sys::signal::Signal::SIGKILL),
        (Ok(_), _) => None,
        (Err(_), _) => Some(nix::sys::signal::Signal::SIGCONT),
    };
    for pid in stopped.iter().filter(|_| sig.is_some()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
    }
    res
}

/// The rest of [`checkpoint`] once the program is dumped: its memory to the store, the image
/// recorded with the filesystem root committed in the frozen window.
#[allow(clippy::too_many_arguments)]
fn record(
    spec: &InitSpec,
    main: i32,
    req: &CheckpointRequest,
    opts: &DumpOptions,
    img: TreeImage,
    root_cno: Option<u64>,
    frozen_at: Option<Instant>,
    sysv: Option<crate::sysv::SysvImage>,
    own: Option<Vec<(PathBuf, crate::owndirs::ShmDir)>>,
    outside: Option<Vec<OutsideFile>>,
    t0: Instant,
    t_dump: Duration,
) -> Result<(serde_json::Value, Option<Kept>)> {
    // The program runs again from the thaw (what follows it, filling in the pages taken
    // from the last image, happens while it runs).
    let downtime = img
        .frozen_for
        .or_else(|| frozen_at.map(|f| f.elapsed()))
        .unwrap_or_default();
    let root_cno = root_cno.ok_or_else(|| anyhow!("filesystem was not committed"))?;
    // Memory goes to the store as page chunks. Pages the store already holds are not handed
    // over at all (the read-only index is a hint; the daemon checks every reference).
    let mut img = img;
    let dir = session_dir(&spec.store, &spec.name);
    let list_path = dir.join("checkpoint.pages");
    // The hand-off's files go when the checkpoint ends, failed or not.
    struct RemoveOnDrop(Vec<PathBuf>);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _hand_off = RemoveOnDrop(HAND_OFF.iter().map(|n| dir.join(n)).collect());
    // Opening the store reads its whole index: worth it for a large image (a first
    // checkpoint, which may share pages with other branches), not for the few pages an
    // incremental one reads (the daemon deduplicates them anyway).
    let inline: u64 = img
        .processes
        .iter()
        .filter_map(|m| m.live())
        .map(|p| &p.memory)
        .chain(img.memfds.iter().map(|f| &f.contents))
        .map(|m| m.inline_bytes())
        .sum();
    // The daemon copies the pages straight out of this process's memory (it knows the pid
    // from the connection) and names them: it hashes what it stores anyway, so nothing is
    // hashed twice, and no sender can put wrong data under a name. A list of (address,
    // length) is all that is written; `held` keeps the bytes alive, unchanged, until the
    // daemon has answered; their runs wait for their names (in list order).
    let mut list = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&list_path).context("create page list")?,
    );
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut sysv = sysv.unwrap_or_default();
    let mut own = own.unwrap_or_default();
    for memory in memories_mut(&mut img, &mut sysv, &mut own) {
        for run in &mut memory.runs {
            if !matches!(run.data, PageData::Bytes(_)) {
                continue;
            }
            if let PageData::Bytes(data) =
                std::mem::replace(&mut run.data, PageData::Stored([0; 32]))
            {
                list.write_all(&(data.as_ptr() as u64).to_le_bytes())?;
                list.write_all(&(data.len() as u32).to_le_bytes())?;
                held.push(data);
            }
        }
    }
    list.flush().context("write page list")?;
    drop(list);
    let ids_path = dir.join("checkpoint.ids");
    let stored = if held.is_empty() {
        serde_json::json!({"new_bytes": 0})
    } else {
        let v = daemon::call(
            &spec.store,
            &Request::StorePages {
                mountpoint: spec.daemon_mount.clone(),
                page_list: list_path.clone(),
                ids_out: ids_path.clone(),
            },
        );
        let _ = std::fs::remove_file(&list_path);
        v?.ok_or_else(|| anyhow!("no daemon serves the mount"))?
    };
    let ids = if held.is_empty() {
        Vec::new()
    } else {
        let ids = std::fs::read(&ids_path).context("read the pages' names")?;
        let _ = std::fs::remove_file(&ids_path);
        ids
    };
    if ids.len() != held.len() * 32 {
        bail!(
            "the daemon named {} of {} pages",
            ids.len() / 32,
            held.len()
        );
    }
    drop(held);
    // The placeholders, in the same order (a real BLAKE3 output is never all zeros).
    let mut names = ids.chunks_exact(32);
    for memory in memories_mut(&mut img, &mut sysv, &mut own) {
        for run in &mut memory.runs {
            if run.data == PageData::Stored([0; 32]) {
                if let Some(n) = names.next() {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(n);
                    run.data = PageData::Stored(h);
                }
            }
        }
    }
    // Against the image the tracker's pages are from, the memory is a delta: what the
    // base holds unchanged is named by range, not page by page (the cost of an incremental
    // checkpoint otherwise grows with every page the program has, not with those it wrote).
    let base = opts.dirty.as_ref().and_then(|t| {
        let t = t.lock().unwrap_or_else(|p| p.into_inner());
        let (id, depth) = t.base.filter(|b| b.1 < MAX_DELTA_DEPTH)?;
        let mut deltas = Vec::new();
        let (mut stored, mut from_base) = (0u64, 0u64);
        for (i, m) in img.processes.iter().enumerate() {
            let Some(p) = m.live() else { continue };
            stored += p
                .memory
                .runs
                .iter()
                .filter(|r| matches!(r.data, engine::image::PageData::Stored(_)))
                .count() as u64;
            let Some(pages) = t.base_pages(m.pid) else {
                continue;
            };
            let (runs, n) = p.memory.delta_against(pages);
            if n > 0 {
                deltas.push((i, runs));
                from_base += n;
            }
        }
        // Not worth a level of the chain when most pages changed.
        (from_base * 2 > stored).then_some((id, depth, deltas))
    });
    let process = match base {
        Some((_, _, ref deltas)) => {
            let mut deltas = deltas.clone();
            let swap =
                |img: &mut TreeImage, deltas: &mut Vec<(usize, Vec<engine::image::PageRun>)>| {
                    for (i, runs) in deltas.iter_mut() {
                        if let Some(p) = img.processes[*i].live_mut() {
                            std::mem::swap(&mut p.memory.runs, runs);
                        }
                    }
                };
            swap(&mut img, &mut deltas);
            let encoded = engine::encode_tree(&img);
            swap(&mut img, &mut deltas);
            encoded?
        }
        None => engine::encode_tree(&img)?,
    };
    let wrapped = SessionImage {
        version: SESSION_IMAGE_VERSION,
        process,
        monotonic_ns: clock_ns(nix::time::ClockId::CLOCK_MONOTONIC),
        boottime_ns: clock_ns(nix::time::ClockId::CLOCK_BOOTTIME),
        argv: spec.argv.clone(),
        sysv,
        own,
        outside: outside.unwrap_or_default(),
        mountpoint: spec.mountpoint.clone(),
    };
    let tmp = dir.join("checkpoint.tmp");
    std::fs::write(&tmp, postcard::to_allocvec(&wrapped)?).context("write image")?;
    let t_write = t0.elapsed();
    let v = daemon::call(
        &spec.store,
        &Request::RecordCheckpoint {
            mountpoint: spec.daemon_mount.clone(),
            name: req.name.clone(),
            root_cno,
            image_file: tmp.clone(),
            auto: req.kind == "auto",
            base_image: base.as_ref().map(|(id, _, _)| ContentId(*id).to_hex()),
            session: Some(spec.name.clone()),
        },
    );
    let _ = std::fs::remove_file(&tmp);
    let mut v = v?.ok_or_else(|| anyhow!("no daemon serves the mount"))?;
    v["new_bytes"] = serde_json::json!(
        v["new_bytes"].as_u64().unwrap_or(0) + stored["new_bytes"].as_u64().unwrap_or(0)
    );
    v["downtime_us"] = serde_json::json!(downtime.as_micros() as u64);
    v["total_us"] = serde_json::json!(t0.elapsed().as_micros() as u64);
    v["pid"] = serde_json::json!(main);
    v["dump_us"] = serde_json::json!(t_dump.as_micros() as u64);
    v["copied_bytes"] = serde_json::json!(inline);
    v["handoff_us"] = serde_json::json!((t_write - t_dump).as_micros() as u64);
    let reused = opts.dirty.as_ref().map_or(0, |t| {
        t.lock().unwrap_or_else(|p| p.into_inner()).reused_pages
    });
    v["reused_pages"] = serde_json::json!(reused);
    let stored_as = v["image"]
        .as_str()
        .and_then(ContentId::from_hex)
        .ok_or_else(|| anyhow!("the daemon did not name the stored image"))?;
    let depth = match (&base, v["delta"].as_bool()) {
        (Some((_, d, _)), Some(true)) => d + 1,
        _ => 0,
    };
    v["delta_depth"] = serde_json::json!(depth);
    let keep = (opts.dirty.is_some() && req.after != "kill").then_some(Kept {
        img,
        image: stored_as.0,
        depth,
    });
    Ok((v, keep))
}

/// Every memory of a checkpoint whose contents go to the store: each process's, each shared
/// memory file's, each SysV segment's, each file's in the directories the session owns, in
/// a fixed order.
fn memories_mut<'a>(
    img: &'a mut TreeImage,
    sysv: &'a mut crate::sysv::SysvImage,
    own: &'a mut [(PathBuf, crate::owndirs::ShmDir)],
) -> impl Iterator<Item = &'a mut engine::image::ImageMemory> {
    img.processes
        .iter_mut()
        .filter_map(|m| m.live_mut())
        .map(|p| &mut p.memory)
        .chain(img.memfds.iter_mut().map(|f| &mut f.contents))
        .chain(sysv.shm.iter_mut().map(|s| &mut s.contents))
        .chain(own.iter_mut().flat_map(|(_, d)| d.memories_mut()))
}

/// Delta images on top of a whole one, at most: a restore resolves the chain, image by
/// image, and gc keeps every image of it.
const MAX_DELTA_DEPTH: u32 = 8;

/// What a checkpoint that let the program run on leaves for the next one: the image as
/// committed (memory in the store), its store id and its depth in a chain of deltas.
struct Kept {
    img: TreeImage,
    image: [u8; 32],
    depth: u32,
}

/// Refuses a checkpoint while a process of the session holds a file outside the mount open
/// for writing, unless it is under one of `allowed` (the session's own log always is): a
/// restore reopens such a file as it is then, it does not roll it back. init's /proc is the
/// session's: every process in it but init belongs to the program. Returns the regular files
/// outside the mount they hold open for reading, as they are now (not those under an
/// allowed directory, /proc, /sys or /dev): a restore checks they are unchanged.
fn outside_files(mountpoint: &Path, allowed: &[PathBuf]) -> Result<Vec<OutsideFile>, String> {
    let mut held: Vec<OutsideFile> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(held);
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == 1 {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Ok(target) = std::fs::read_link(f.path()) else {
                continue;
            };
            // A memfd or a deleted file is no file outside: the checkpoint holds its contents.
            let name = target.to_string_lossy();
            if !target.is_absolute()
                || target.starts_with(mountpoint)
                || name.starts_with("/memfd:")
                || name.ends_with(" (deleted)")
            {
                continue;
            }
            let fd = f.file_name().to_string_lossy().into_owned();
            let info =
                std::fs::read_to_string(e.path().join("fdinfo").join(&fd)).unwrap_or_default();
            let flags = status_field_octal(&info, "flags:").unwrap_or(0);
            let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let st = std::fs::metadata(f.path()).ok().filter(|m| m.is_file());
            let regular = st.is_some();
            let is_allowed = allowed.iter().any(|a| target.starts_with(a));
            if writable && regular && !is_allowed {
                return Err(format!(
                    "process {pid}: fd {fd} writes to {}, outside the mount: a restore would not roll it back (allow it with --allow-outside {})",
                    target.display(),
                    target.display()
                ));
            }
            let system = ["/proc", "/sys", "/dev"]
                .iter()
                .any(|d| target.starts_with(d));
            if let Some(st) = st.filter(|_| !writable && !is_allowed && !system) {
                if !held.iter().any(|h| h.path == target) {
                    held.push(OutsideFile {
                        path: target.clone(),
                        id: forkpoint::engine::image::FileId::of(&st),
                    });
                }
            }
        }
        // A file mapped shared and writable is written without a descriptor (a JVM maps
        // its hsperfdata file and closes it).
        let maps = forkpoint::engine::dump::read_maps(pid).unwrap_or_default();
        for l in maps {
            let target = Path::new(&l.path);
            if !l.path.starts_with('/')
                || !l.perms.starts_with("rw")
                || !l.perms.ends_with('s')
                || target.starts_with(mountpoint)
                || l.path.ends_with(" (deleted)")
                || l.path.starts_with("/SYSV")
                || allowed.iter().any(|a| target.starts_with(a))
            {
                continue;
            }
            let (range, path) = (format!("{:x}-{:x}", l.start, l.end), &l.path);
            return Err(format!(
                "process {pid}: mapping {range} writes to {path}, outside the mount: a restore would not roll it back (allow it with --allow-outside {path})"
            ));
        }
    }
    Ok(held)
}

fn status_field_octal(text: &str, key: &str) -> Option<i32> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
}

/// The files a checkpoint hands its pages and image to the daemon through, in the session's
/// directory.
const HAND_OFF: [&str; 3] = ["checkpoint.pages", "checkpoint.ids", "checkpoint.tmp"];

/// Removes what a checkpoint of session `name` left in its directory, once it has ended
/// (killed in the middle of a checkpoint, it removes nothing itself).
pub fn remove_hand_off_files(store: &Path, name: &str) {
    let dir = session_dir(store, name);
    for n in HAND_OFF {
        let _ = std::fs::remove_file(dir.join(n));
    }
}

/// Sends a checkpoint request to a running session.
pub fn request_checkpoint(
    store: &Path,
    name: &str,
    req: &CheckpointRequest,
) -> Result<serde_json::Value> {
    let sock = session_dir(store, name).join("ctl.sock");
    let mut s =
        UnixStream::connect(&sock).with_context(|| format!("session '{name}' is not running"))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // The session may end while it is asked (a restore or a kill took it): say so, and
    // whether the checkpoint was recorded before it did (the daemon records it).
    let ended = || {
        let recorded = forkpoint_fs::Store::open_read_only(store)
            .and_then(|s| s.find(&req.name))
            .is_ok();
        if recorded {
            anyhow!(
                "session '{name}' ended before it answered (a restore or a kill of it ran \
                 meanwhile?), after checkpoint '{}' was recorded: it can be restored",
                req.name
            )
        } else {
            anyhow!(
                "session '{name}' ended before it answered (a restore or a kill of it ran \
                 meanwhile?); checkpoint '{}' is not recorded (yet: `forkpoint log` shows \
                 whether the daemon, if it had it all, recorded it since)",
                req.name
            )
        }
    };
    s.write_all(line.as_bytes()).map_err(|_| ended())?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .map_err(|_| ended())?;
    if resp.is_empty() {
        return Err(ended());
    }
    let v: serde_json::Value =
        serde_json::from_str(&resp).context("session closed the connection")?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["value"].clone())
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("checkpoint failed"))
    }
}

/// Reads and fully decodes a checkpoint's image, refusing a corrupt or incomplete one
/// before anything is changed: a delta image is resolved against its chain of bases (each
/// read, checked and decoded the same way). Returns the session image, the resolved process
/// image and the number of delta images in the chain (0 for a whole image).
pub fn load_image_chain(
    store: &Store,
    image: &ContentId,
) -> Result<(SessionImage, TreeImage, u32)> {
    // The chain, newest first; a session makes it at most MAX_DELTA_DEPTH long.
    let mut chain = Vec::new();
    let mut next = Some(*image);
    while let Some(id) = next {
        if chain.len() > 4 * MAX_DELTA_DEPTH as usize {
            bail!("process image {image}: its chain of base images is too long");
        }
        let t = Instant::now();
        let bytes = store.get(&id).context("read process image")?;
        let t_get = t.elapsed();
        let obj = decode_image(&id, &bytes)?;
        let t_obj = t.elapsed();
        if let Some(r) = store.first_missing(obj.refs.iter().copied()) {
            bail!("process image {id} refers to missing chunk {r}");
        }
        let t_refs = t.elapsed();
        let si = SessionImage::decode(&obj.body)?;
        let t_si = t.elapsed();
        let tree = engine::decode_tree(&si.process)
            .with_context(|| format!("decode process image {id}"))?;
        log::debug!(
            "image {id}: {} bytes read in {t_get:?}, object decoded by {t_obj:?}, {} references checked by {t_refs:?}, wrapper by {t_si:?}, tree by {:?}",
            bytes.len(),
            obj.refs.len(),
            t.elapsed()
        );
        if tree.is_delta() && obj.base.is_none() {
            bail!("process image {id} is a delta but names no base image");
        }
        next = obj.base;
        chain.push((id, si, tree));
    }
    let depth = chain.len() as u32 - 1;
    let (_, mut si, mut tree) = chain.pop().ok_or_else(|| anyhow!("no process image"))?;
    while let Some((id, s, mut t)) = chain.pop() {
        t.resolve_against(&tree)
            .map_err(|e| anyhow!("process image {id}: {e}"))?;
        (si, tree) = (s, t);
    }
    Ok((si, tree, depth))
}

struct StoreChunks(std::sync::Arc<Store>);

impl engine::ChunkSource for StoreChunks {
    fn fetch(&self, hash: &[u8; 32], _len: u64) -> Result<Vec<u8>, String> {
        self.0
            .read_verified(&ContentId(*hash))
            .map_err(|e| e.to_string())
    }

    /// Reads and checks straight into `out` ([`Store::read_into`]), split over the cores.
    fn fetch_into(&self, reqs: &[([u8; 32], u64)], out: &mut [u8]) -> Result<(), String> {
        let total: u64 = reqs.iter().map(|r| r.1).sum();
        if total != out.len() as u64 {
            return Err(format!(
                "{total} bytes of chunks for a buffer of {}",
                out.len()
            ));
        }
        let read = |part: &[([u8; 32], u64)], out: &mut [u8]| -> Result<(), String> {
            let objs: Vec<(ContentId, u64)> =
                part.iter().map(|(h, l)| (ContentId(*h), *l)).collect();
            self.0.read_into(&objs, out).map_err(|e| e.to_string())
        };
        let threads = forkpoint_fs::id::cores().clamp(1, 8);
        if threads < 2 || reqs.len() < 64 {
            return read(reqs, out);
        }
        let per = reqs.len().div_ceil(threads);
        std::thread::scope(|sc| {
            let mut rest = out;
            let mut handles = Vec::new();
            for part in reqs.chunks(per) {
                let n: u64 = part.iter().map(|r| r.1).sum();
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n as usize);
                rest = tail;
                handles.push(sc.spawn(move || read(part, mine)));
            }
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("chunk reader panicked".into()))
            })
        })
    }
}

fn restore_main(
    spec: &InitSpec,
    cno: u64,
    dirty: Option<Arc<Mutex<DirtyTracker>>>,
    pre: Option<Preloaded>,
) -> Result<i32> {
    let t0 = Instant::now();
    let (store, image, si, mut tree, depth, t_open) = match pre {
        Some(p) => (p.store, p.image, p.si, p.tree, p.depth, t0.elapsed()),
        None => {
            let store = Store::open_read_only(&spec.store)?;
            let t_open = t0.elapsed();
            let cp = store.catalog(|c| c.checkpoint(cno))?;
            let image = cp
                .image
                .ok_or_else(|| anyhow!("checkpoint #{cno} has no process image"))?;
            let (si, tree, depth) = load_image_chain(&store, &image)?;
            (store, image, si, tree, depth, t_open)
        }
    };
    let t_load = t0.elapsed();
    adopt_session_log(spec, &mut tree);
    let chunks = StoreChunks(store.clone());
    let lazy = if spec.lazy {
        // Pages are read after the program runs: load_image_chain found every chunk the
        // images refer to in the store.
        // The fill's thread takes an id from this (the session's) pid namespace: past every
        // pid and thread id the restore gives back, which must be free.
        let top = tree
            .processes
            .iter()
            .map(|m| m.pid)
            .chain(
                tree.processes
                    .iter()
                    .filter_map(|m| m.live())
                    .flat_map(|p| p.threads.iter().map(|t| t.tid)),
            )
            .max()
            .unwrap_or(1);
        let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(32768);
        let placed = if top < pid_max - 1 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", top.to_string())
                .map_err(|e| format!("setting ns_last_pid: {e}"))
        } else {
            Err(format!("pid {top} is too close to pid_max {pid_max}"))
        };
        match placed {
            Ok(()) => {
                let source = Arc::new(StoreChunks(store.clone()));
                Some(
                    engine::lazy::LazyFill::start(source, Box::new(|_| kill_program()))
                        .context("start the lazy restore")?,
                )
            }
            Err(e) => {
                log::warn!("restoring eagerly: {e}");
                None
            }
        }
    } else {
        None
    };

    // The SysV objects first (with their ids): the processes attach segments while they are
    // rebuilt. init is alone in the session's fresh IPC namespace.
    crate::sysv::restore(&si.sysv, &chunks)
        .map_err(|e| anyhow!(e))
        .context("restore SysV IPC objects")?;
    // Then /dev/shm and the temporary directory (init's, fresh tmpfs): the processes reopen
    // and map their files.
    let own_dirs = crate::owndirs::dirs();
    crate::owndirs::restore_all(&si.own, &chunks)
        .map_err(|e| anyhow!(e))
        .context("restore the session's /dev/shm and temporary directory")?;
    let opts = TreeRestoreOptions {
        keep_pids: true,
        chunks: Some(&chunks),
        skip_file_checks: false,
        snapshot_root: Some(&spec.mountpoint),
        recreated: &own_dirs,
        // init's own stdio: the terminal `forkpoint restore` runs in, or with --detach
        // /dev/null and the session's log.
        terminal: None,
        dirty: dirty.clone(),
        lazy: lazy.as_ref(),
    };
    log::debug!(
        "restoring {} processes, {:?} stopped",
        tree.processes.len(),
        tree.stopped
    );
    let pid = engine::restore_tree(&tree, &opts);
    if pid.is_err() {
        if let Some(t) = &dirty {
            t.lock().unwrap_or_else(|p| p.into_inner()).forget();
        }
    }
    let pid = pid.context("restore processes")?;
    if let Some(t) = &dirty {
        // The pages remembered for each process are this image's: the next checkpoint
        // may be a delta against it.
        t.lock().unwrap_or_else(|p| p.into_inner()).base = Some((image.0, depth));
    }
    crate::sysv::remove_destroyed(&si.sysv);
    if let Some(l) = lazy {
        l.commit();
        *LAZY.lock().unwrap_or_else(|p| p.into_inner()) = Some((l, tree));
    }
    log::debug!(
        "restore of checkpoint #{cno}: store opened in {t_open:?}, image loaded in {:?}, processes restored in {:?}",
        t_load - t_open,
        t0.elapsed() - t_load
    );
    Ok(pid)
}

/// The lazy fill of the last restore while it copies pages in ([`engine::lazy`]), with the
/// image it restored.
static LAZY: Mutex<Option<(engine::lazy::LazyFill, TreeImage)>> = Mutex::new(None);

/// Whether the lazy fill of the restore has every page in (and waits to be finished).
fn lazy_complete() -> bool {
    LAZY.lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|(f, _)| f.is_done())
}

/// Waits for the lazy fill of the restore (if any) to have every page in, then hands the
/// restored processes over to dirty-page tracking (each stopped for it, see
/// [`engine::dump::track_after_lazy`]) and lets the fill go: a checkpoint reads memory that
/// is all there, and only what was written since the restore.
fn finish_lazy(tracker: Option<&Arc<Mutex<DirtyTracker>>>) -> Result<()> {
    let fill = LAZY.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((f, tree)) = fill {
        let t = Instant::now();
        let stats = f
            .wait()
            .map_err(|e| anyhow!("the lazy restore failed (the program was killed): {e}"))?;
        log::debug!("waited {:?} for the lazy restore: {stats:?}", t.elapsed());
        if let Some(tr) = tracker {
            let t = Instant::now();
            engine::dump::track_tree_after_lazy(&tree, &f, tr);
            log::debug!("lazy restore handed over to tracking in {:?}", t.elapsed());
        }
    }
    Ok(())
}

/// Kills every process of the session but init: from init, the session's PID 1, `kill(-1)`
/// reaches every other process of its pid namespace at once.
fn kill_program() {
    let _ = engine::sys::kill(-1, libc::SIGKILL);
}

/// Descriptors on the log of the session that was checkpointed (a detached program's
/// output) write to this session's output instead: its log when it has one (a detached
/// restore), else the terminal or whatever the restore's stdio is, as a terminal of the
/// checkpointed session would. The log belongs to the session, not to the checkpoint (and
/// a rollback's session of the same name starts it anew).
fn adopt_session_log(spec: &InitSpec, tree: &mut TreeImage) {
    let sessions = sessions_dir(&spec.store);
    let ours = session_dir(&spec.store, &spec.name).join("output.log");
    let ours_str = ours.exists().then(|| ours.to_str()).flatten();
    for p in tree.processes.iter_mut().filter_map(|m| m.live_mut()) {
        for fd in &mut p.fds {
            let path = Path::new(&fd.path);
            let theirs = path.parent().and_then(|d| d.parent()) == Some(sessions.as_path())
                && path.file_name() == Some(std::ffi::OsStr::new("output.log"));
            let kept = ours_str.is_some() && path == ours;
            if !theirs || !matches!(fd.kind, engine::image::FdKind::Regular) || kept {
                continue;
            }
            log::debug!(
                "fd {} of process {}: {} becomes {}",
                fd.fd,
                p.pid,
                fd.path,
                ours_str.unwrap_or("the restore's output")
            );
            match ours_str {
                Some(o) => {
                    fd.path = o.to_string();
                    // At its end, not at the offset the old log had.
                    fd.flags |= libc::O_APPEND;
                }
                None => fd.kind = engine::image::FdKind::Tty,
            }
        }
    }
}

/// Resident memory of every process of the session but init (init's /proc is the session's).
fn program_rss() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != 1)
        .filter_map(|pid| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            Some(field_kb(&st, "VmRSS:")? << 10)
        })
        .sum()
}

/// Whether to warm the heap (`FORKPOINT_WARM_HEAP=0` turns it off, for measurements).
fn heap_warming() -> bool {
    std::env::var("FORKPOINT_WARM_HEAP").map_or(true, |v| v != "0")
}

/// Free heap known to be touched: what [`warm_heap`] warmed, until a `malloc_trim`.
static HEAP_WARM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Touches up to `bytes` (at most a quarter of the machine's available memory) of heap in
/// 16 MiB blocks and frees them; with the trim threshold raised, the allocator keeps the
/// pages, and the copies of the frozen window reuse them. `malloc_trim` after the
/// checkpoint gives them back. Returns the bytes warmed.
fn warm_heap(bytes: u64) -> u64 {
    const BLOCK: usize = 16 << 20;
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| field_kb(&m, "MemAvailable:"))
        .map_or(0, |kb| kb << 10);
    let want = bytes.min(avail / 4);
    // Heap warmed for an earlier checkpoint and kept counts.
    if want < BLOCK as u64 || want <= HEAP_WARM.load(std::sync::atomic::Ordering::Relaxed) {
        return 0;
    }
    // SAFETY: mallopt only changes allocator tunables of this (single-threaded) process.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let n = (want as usize).div_ceil(BLOCK);
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut b: Vec<u8> = Vec::with_capacity(BLOCK);
        if !populate(b.spare_capacity_mut()) {
            // One write per byte faults it in; the contents do not matter.
            b.resize(BLOCK, 1);
        }
        blocks.push(b);
    }
    drop(blocks);
    HEAP_WARM.store((n * BLOCK) as u64, std::sync::atomic::Ordering::Relaxed);
    (n * BLOCK) as u64
}

/// Faults in the whole pages of `mem` for writing, in the kernel (`MADV_POPULATE_WRITE`,
/// Linux 5.14): for 512 MiB, 116 ms against 200 ms for writing every byte. False if the
/// kernel cannot.
fn populate(mem: &mut [std::mem::MaybeUninit<u8>]) -> bool {
    let page = 4096usize;
    let start = mem.as_mut_ptr() as usize;
    let from = start.next_multiple_of(page);
    let to = (start + mem.len()) & !(page - 1);
    if to <= from {
        return false;
    }
    // SAFETY: the range lies inside `mem`, memory this process owns and nothing reads
    // while the kernel maps zeroed pages into it; populating changes no byte a program
    // could rely on (the slice is uninitialised).
    unsafe {
        libc::madvise(
            from as *mut libc::c_void,
            to - from,
            libc::MADV_POPULATE_WRITE,
        ) == 0
    }
}

/// A "Key:   123 kB" field of /proc/*/status or /proc/meminfo, in kB (or a plain count).
fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The processes of the session other than init that have not exited, as "PID (COMMAND)":
/// init's /proc is the session's own.
fn left_behind() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if stat[close + 1..].trim_start().starts_with('Z') {
            continue;
        }
        out.push(format!("{pid} ({})", &stat[open + 1..close]));
    }
    out.sort_by_key(|p| p.split(' ').next().and_then(|n| n.parse::<u32>().ok()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `process` decodes as one byte string; the encoding is what a sequence of `u8` gave
    /// (images stored before still decode, and the same bytes come out). A version 3 image
    /// (no directories of its own) decodes with none, a version 4 one with no files outside
    /// the mount.
    #[test]
    fn session_image_bytes_keep_their_encoding() {
        #[derive(Serialize)]
        struct Before {
            version: u32,
            process: Vec<u8>,
            monotonic_ns: i128,
            boottime_ns: i128,
            argv: Vec<String>,
            sysv: crate::sysv::SysvImage,
        }
        #[derive(Serialize)]
        struct V4 {
            before: Before,
            own: Vec<(PathBuf, crate::owndirs::ShmDir)>,
        }
        #[derive(Serialize)]
        struct Now {
            v4: V4,
            outside: Vec<OutsideFile>,
            mountpoint: PathBuf,
        }
        let process: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let before = |version| Before {
            version,
            process: process.clone(),
            monotonic_ns: -5,
            boottime_ns: 7,
            argv: vec!["a".into()],
            sysv: Default::default(),
        };
        let held = OutsideFile {
            path: "/etc/hosts".into(),
            id: forkpoint::engine::image::FileId {
                dev: 9,
                ino: 12,
                size: 34,
                mtime: 56,
                mtime_nsec: 78,
            },
        };
        let now = postcard::to_allocvec(&Now {
            v4: V4 {
                before: before(SESSION_IMAGE_VERSION),
                own: Vec::new(),
            },
            outside: vec![held.clone()],
            mountpoint: "/work/mnt".into(),
        })
        .expect("encode");
        let si = SessionImage::decode(&now).expect("decode");
        assert_eq!(si.process, process);
        assert_eq!(si.outside, [held]);
        assert_eq!(si.mountpoint, Path::new("/work/mnt"));
        assert_eq!(postcard::to_allocvec(&si).expect("encode"), now);
        let v4 = postcard::to_allocvec(&V4 {
            before: before(4),
            own: Vec::new(),
        })
        .expect("encode");
        let si = SessionImage::decode(&v4).expect("decode version 4");
        assert_eq!((si.version, si.outside.len()), (4, 0));
        let v3 = postcard::to_allocvec(&before(3)).expect("encode");
        let si = SessionImage::decode(&v3).expect("decode version 3");
        assert_eq!((si.version, si.process), (3, process));
        assert!(si.own.is_empty());
    }
}
