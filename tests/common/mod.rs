//! Helpers shared by the FUSE tests (`fuse_diff`, `fuse_crash`, `fuse_e2e`): a [`Lab`] guard
//! whose `Drop` unmounts and kills everything the test mounted or started, running the CLI
//! with a timeout, finding a store's daemon, and the root/FUSE precondition.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The CLI under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_forkpoint");

/// How long one CLI call may take before the test gives up on it.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Can this test mount (root and /dev/fuse)? Without them the test is skipped with a printed
/// reason, except under `CI`, where it fails.
pub fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    let why = if root {
        "/dev/fuse is missing"
    } else {
        "not running as root (FUSE and tmpfs mounts need it)"
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: {why}"
    );
    eprintln!("skipping {test}: {why}");
    false
}

/// Does the kernel have FUSE over io_uring? Without it the test is skipped with a printed
/// reason, except under `CI`, where it fails.
pub fn has_fuse_uring(test: &str) -> bool {
    if Path::new("/sys/module/fuse/parameters/enable_uring").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: the kernel has no FUSE over io_uring"
    );
    eprintln!("skipping {test}: the kernel has no FUSE over io_uring");
    false
}

/// What a command did.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `prog args`, killing it after `timeout`; `None` if it timed out.
pub fn run_timeout(prog: &str, args: &[&OsStr], timeout: Duration) -> Option<Out> {
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {prog}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let o = r.unwrap_or_else(|e| panic!("wait for {prog}: {e}"));
            Some(Out {
                ok: o.status.success(),
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            })
        }
        Err(_) => {
            // SAFETY: kill has no memory effects; `pid` is our own child, not yet reaped
            // (the waiting thread still holds it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            None
        }
    }
}

/// Runs the forkpoint CLI; panics if it does not finish within a minute.
pub fn fp<S: AsRef<OsStr>>(args: &[S]) -> Out {
    let a: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    run_timeout(BIN, &a, CLI_TIMEOUT)
        .unwrap_or_else(|| panic!("forkpoint {a:?} did not finish within {CLI_TIMEOUT:?}"))
}

/// Runs the forkpoint CLI and asserts success; returns stdout.
pub fn fp_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let o = fp(args);
    let a: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    assert!(
        o.ok,
        "forkpoint {a:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.code, o.stdout, o.stderr
    );
    o.stdout
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// (mountpoint, fstype, source) of every mount in this namespace.
pub fn mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 3 || f.len() < 5 {
            continue;
        }
        out.push((
            PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(f[4]))),
            f[sep + 1].to_string(),
            String::from_utf8_lossy(&unescape_mountinfo(f[sep + 2])).into_owned(),
        ));
    }
    out
}

/// Is anything mounted at exactly `p`?
pub fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(m, _, _)| m == p)
}

/// Is a FUSE filesystem mounted at exactly `p`?
pub fn is_fuse_mounted(p: &Path) -> bool {
    mounts()
        .iter()
        .any(|(m, t, _)| m == p && (t == "fuse" || t.starts_with("fuse.")))
}

/// Pids of the forkpoint daemons serving `store` (argv `forkpoint daemon STORE ...`).
pub fn daemon_pids(store: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // `comm` first: reading another process's `cmdline` takes its mmap lock and can block.
        if std::fs::read(e.path().join("comm")).ok().as_deref() != Some(b"forkpoint\n") {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.len() >= 3
            && args[0].ends_with(b"forkpoint")
            && args[1] == b"daemon"
            && Path::new(OsStr::from_bytes(args[2])) == store
        {
            out.push(pid);
        }
    }
    out
}

/// Has process `pid` exited with all its threads (gone, or a zombie not yet reaped)? A
/// thread-group leader shows as a zombie while its other threads are still exiting, and
/// until the last one is gone its descriptors (/dev/fuse included) stay open.
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses.
        Ok(s) => {
            let zombie = s
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false);
            let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count())
                .unwrap_or(0);
            zombie && threads <= 1
        }
    }
}

/// SIGKILLs `pid` and waits (up to 10 s) until it is gone.
pub fn kill9(pid: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    while !pid_gone(pid) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A test's scratch directory plus everything it mounted or started there. `Drop` unmounts
/// every tracked mount (`forkpoint umount`, falling back to `umount -l`), SIGKILLs the
/// daemons of every tracked store that are still running, and unmounts tracked tmpfs mounts,
/// before the directory is removed.
pub struct Lab {
    stores: Mutex<Vec<PathBuf>>,
    mounts: Mutex<Vec<PathBuf>>,
    tmpfs: Mutex<Vec<PathBuf>>,
    // Last: removed after everything above is unmounted.
    dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        Lab {
            stores: Mutex::new(Vec::new()),
            mounts: Mutex::new(Vec::new()),
            tmpfs: Mutex::new(Vec::new()),
            dir: tempfile::Builder::new()
                .prefix("fp-test-")
                .tempdir()
                .expect("create a temporary directory"),
        }
    }

    /// The scratch directory (absolute).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path()/name`, created as a directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("create a directory in the lab");
        p
    }

    /// Remembers `store` and `mnt` for cleanup (before a mount that might succeed).
    pub fn track(&self, store: &Path, mnt: &Path) {
        let mut s = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if !s.iter().any(|x| x == store) {
            s.push(store.to_path_buf());
        }
        let mut m = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        if !m.iter().any(|x| x == mnt) {
            m.push(mnt.to_path_buf());
        }
    }

    /// `forkpoint mount STORE MNT [--lower L] [--branch B]` (tracked for cleanup).
    pub fn mount(
        &self,
        store: &Path,
        mnt: &Path,
        lower: Option<&Path>,
        branch: Option<&str>,
    ) -> Out {
        self.track(store, mnt);
        let mut args: Vec<&OsStr> = vec!["mount".as_ref(), store.as_ref(), mnt.as_ref()];
        if let Some(l) = lower {
            args.push("--lower".as_ref());
            args.push(l.as_ref());
        }
        if let Some(b) = branch {
            args.push("--branch".as_ref());
            args.push(b.as_ref());
        }
        fp(&args)
    }

    /// Like [`Lab::mount`], asserting success and that the mount is there.
    pub fn mount_ok(&self, store: &Path, mnt: &Path, lower: Option<&Path>) {
        let o = self.mount(store, mnt, lower, None);
        assert!(
            o.ok,
            "forkpoint mount {} {} failed:\nstdout: {}\nstderr: {}",
            store.display(),
            mnt.display(),
            o.stdout,
            o.stderr
        );
        assert!(is_mounted(mnt), "{} not mounted after mount", mnt.display());
    }

    /// `forkpoint umount MNT`, asserting success and that the mount is gone.
    pub fn umount_ok(&self, mnt: &Path) {
        fp_ok(&[OsStr::new("umount"), mnt.as_os_str()]);
        assert!(
            !is_mounted(mnt),
            "{} still mounted after umount",
            mnt.display()
        );
    }

    /// Mounts a private tmpfs (noatime, mode 0755) at `dir` (tracked for cleanup).
    pub fn tmpfs(&self, dir: &Path) {
        self.tmpfs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.to_path_buf());
        let o = run_timeout(
            "mount",
            &[
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                "size=256m,mode=0755,noatime".as_ref(),
                "fp-test-tmpfs".as_ref(),
                dir.as_os_str(),
            ],
            CLI_TIMEOUT,
        )
        .expect("mount -t tmpfs timed out");
        assert!(o.ok, "mount -t tmpfs {}: {}", dir.display(), o.stderr);
    }

    /// SIGKILLs every daemon of `store`; returns their pids.
    pub fn kill_daemons(&self, store: &Path) -> Vec<i32> {
        let pids = daemon_pids(store);
        for p in &pids {
            kill9(*p);
        }
        pids
    }

    fn cleanup(&self) {
        let mounts = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let stores = self
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tmpfs = self.tmpfs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if std::thread::panicking() {
            // The daemon logs are removed with the directory: show them with the failure.
            for s in &stores {
                if let Ok(log) = std::fs::read_to_string(s.join("daemon.log")) {
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(60)..];
                    eprintln!("--- {}/daemon.log (last {} lines)", s.display(), tail.len());
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for m in &mounts {
            if is_fuse_mounted(m) {
                let ok = run_timeout(
                    BIN,
                    &["umount".as_ref(), m.as_os_str()],
                    Duration::from_secs(30),
                )
                .is_some_and(|o| o.ok);
                if !ok || is_mounted(m) {
                    eprintln!(
                        "cleanup: forkpoint umount {} failed; umount -l",
                        m.display()
                    );
                    lazy_umount(m);
                }
            }
        }
        for s in &stores {
            // A daemon exits by itself after its last umount; give it a moment, then kill.
            let t = Instant::now();
            while !daemon_pids(s).is_empty() && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            for p in self.kill_daemons(s) {
                eprintln!("cleanup: killed daemon {p} of {}", s.display());
            }
        }
        let fuse_left: Vec<&PathBuf> = mounts.iter().filter(|m| is_fuse_mounted(m)).collect();
        for m in fuse_left.into_iter().chain(tmpfs.iter()) {
            while is_mounted(m) {
                if !lazy_umount(m) {
                    eprintln!("cleanup: cannot unmount {}", m.display());
                    break;
                }
            }
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

fn lazy_umount(m: &Path) -> bool {
    run_timeout(
        "umount",
        &["-l".as_ref(), m.as_os_str()],
        Duration::from_secs(30),
    )
    .is_some_and(|o| o.ok)
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills the daemons of a store if the test makes no progress for `limit`, so that a hung
/// FUSE request fails (ENOTCONN) instead of hanging the test; the test then fails and its
/// [`Lab`] cleans up. Before that it prints where the test's threads and the daemon's
/// threads are blocked in the kernel, and what the test was doing.
pub struct Watchdog {
    beat: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    doing: Arc<Mutex<String>>,
    start: Instant,
}

/// Kernel stacks and wait channels of every thread of `pid`.
fn thread_stacks(pid: i32) -> String {
    let mut out = String::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in rd.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
        out.push_str(&format!(
            "  thread {} ({}) wchan {wchan}\n{}",
            t.file_name().to_string_lossy(),
            comm.trim(),
            stack
                .lines()
                .take(14)
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        ));
    }
    out
}

impl Watchdog {
    pub fn new(store: &Path, limit: Duration) -> Watchdog {
        let beat = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let doing = Arc::new(Mutex::new(String::new()));
        let start = Instant::now();
        let (b, s, d, store) = (
            beat.clone(),
            stop.clone(),
            doing.clone(),
            store.to_path_buf(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let last = Duration::from_millis(b.load(Ordering::SeqCst));
                if start.elapsed().saturating_sub(last) > limit {
                    let doing = d.lock().map(|g| g.clone()).unwrap_or_default();
                    let daemons = daemon_pids(&store);
                    eprintln!(
                        "watchdog: no progress for {limit:?} (doing: {doing}); test threads:\n{}",
                        thread_stacks(std::process::id() as i32)
                    );
                    for p in &daemons {
                        eprintln!("watchdog: daemon {p} threads:\n{}", thread_stacks(*p));
                    }
                    eprintln!("watchdog: killing the daemons of {}", store.display());
                    for p in daemons {
                        kill9(p);
                    }
                    b.store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
                }
            }
        });
        Watchdog {
            beat,
            stop,
            doing,
            start,
        }
    }

    /// Records progress.
    pub fn tick(&self) {
        self.beat
            .store(self.start.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// Records what the test is doing (shown if the watchdog fires).
    pub fn doing(&self, what: &str) {
        if let Ok(mut g) = self.doing.lock() {
            g.clear();
            g.push_str(what);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A small deterministic PRNG (SplitMix64), so that a failing run can be replayed by seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A seed from `var` if set, else from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}
