//! End-to-end tests of sessions: real mounts, real programs (C built with `cc`, and Python),
//! checkpointed, changed, restored, and checked for the exact expected state.
//!
//! Each test runs under a [`Lab`] whose `Drop` kills the sessions and unmounts everything it
//! mounted. Without root or /dev/fuse the tests skip with a reason, except under `CI`, where
//! they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_forkpoint");

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    let why = if root { "no /dev/fuse" } else { "not root" };
    assert!(
        std::env::var_os("CI").is_none(),
        "session tests cannot run in CI: {why}"
    );
    eprintln!("skipping: {why}");
    false
}

struct Lab {
    dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let lab = Lab { dir, store, mnt };
        lab.fp(&[
            "mount",
            lab.store.to_str().expect("utf8"),
            lab.mnt.to_str().expect("utf8"),
        ]);
        lab
    }

    fn fp(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(&self.mnt)
            .output()
            .expect("run forkpoint");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "forkpoint {args:?} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn fp_fails(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(&self.mnt)
            .output()
            .expect("run forkpoint");
        assert!(!out.status.success(), "forkpoint {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn m(&self) -> &str {
        self.mnt.to_str().expect("utf8")
    }

    /// Builds a C program into the lab directory.
    fn cc(&self, name: &str, src: &str, extra: &[&str]) -> PathBuf {
        let c = self.dir.path().join(format!("{name}.c"));
        let exe = self.dir.path().join(name);
        std::fs::write(&c, src).expect("write source");
        let st = Command::new("cc")
            .arg("-O1")
            .arg("-o")
            .arg(&exe)
            .arg(&c)
            .args(extra)
            .status()
            .expect("run cc");
        assert!(st.success(), "cc {name}");
        exe
    }

    fn branch_dir(&self, b: &str) -> PathBuf {
        self.store.join("branches").join(b)
    }

    /// Starts `argv` in the mount as session `name`, detached, and waits until the file
    /// `log` it writes (in the mount) has more than five lines; returns that file's path.
    /// Runs session `name`: a Python program holding `mib` MiB of random memory (so that a
    /// checkpoint or restore of it takes a while) and appending a line to `ticks` every
    /// 20 ms.
    fn run_memory_ticker(&self, name: &str, mib: u32) -> PathBuf {
        std::fs::write(
            self.mnt.join("m.py"),
            format!(
                "import os, time\nb = bytearray(os.urandom({mib} << 20))\n\
                 while True:\n    open('ticks', 'a').write('x\\n')\n    time.sleep(0.02)\n"
            ),
        )
        .expect("write");
        self.run_writing(name, &["python3", "m.py"], "ticks")
    }

    /// How many sessions `ps` shows running on the mount, and what it printed.
    fn running_sessions(&self) -> (usize, String) {
        let ps = self.fp(&["ps", "-m", self.m()]);
        (ps.lines().filter(|l| l.contains("running")).count(), ps)
    }

    /// The files a checkpoint hands its pages over with (checkpoint.pages, .ids, .tmp) left
    /// in session `name`'s directory.
    fn hand_off_files(&self, name: &str) -> Vec<String> {
        std::fs::read_dir(self.store.join("sessions").join(name))
            .expect("session dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint."))
            .collect()
    }

    /// Runs session `name`: a shell loop appending a line to `ticks` every 20 ms.
    fn run_ticker(&self, name: &str) -> PathBuf {
        std::fs::write(
            self.mnt.join("t.sh"),
            "while :; do echo x >> ticks; sleep 0.02; done\n",
        )
        .expect("write");
        self.run_writing(name, &["bash", "t.sh"], "ticks")
    }

    fn run_writing(&self, name: &str, argv: &[&str], log: &str) -> PathBuf {
        let mut args = vec!["run", "-m", self.m(), "--detach", "--name", name, "--"];
        args.extend_from_slice(argv);
        self.fp(&args);
        let log = self.mnt.join(log);
        wait_for("the program", Duration::from_secs(20), || {
            lines_any(&log) > 5
        });
        log
    }

    fn session_pid(&self, name: &str) -> (i32, i32) {
        let text =
            std::fs::read_to_string(self.store.join("sessions").join(name).join("info.json"))
                .expect("info");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        (
            v["pid"].as_i64().expect("pid") as i32,
            v["main_pid"].as_i64().expect("main") as i32,
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Kill every session of this store (each is a PID namespace: killing its init is enough,
        // but the program may have been re-parented; kill by cgroup and by pid).
        if let Ok(rd) = std::fs::read_dir(self.store.join("sessions")) {
            for e in rd.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path().join("info.json")) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        if let Some(pid) = v["pid"].as_i64() {
                            // SAFETY: kill has no memory effects.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
        // Wait for the sessions to be gone (their PID namespaces die with them).
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let out = Command::new(BIN)
                .args(["ps", "-m", self.m(), "--json"])
                .output();
            match out {
                Ok(o)
                    if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "[]" =>
                {
                    break
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let mut mounts: Vec<PathBuf> = vec![self.mnt.clone()];
        let second = self.dir.path().join("mnt2");
        if second.exists() {
            mounts.push(second);
        }
        if let Ok(rd) = std::fs::read_dir(self.store.join("branches")) {
            mounts.extend(rd.flatten().map(|e| e.path()));
        }
        for m in mounts {
            let ok = Command::new(BIN)
                .arg("umount")
                .arg(&m)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(p: &Path) -> Vec<i64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Asserts a counter log is exactly 1, 2, 3, … with no gap or repeat.
fn assert_sequence(v: &[i64]) {
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, i as i64 + 1, "counter log breaks at line {}", i + 1);
    }
}

const COUNTER: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    volatile long counter = 0;
    int f = open("counter.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    char buf[64];
    for (;;) {
        counter++;                       /* memory ... */
        int n = snprintf(buf, sizeof buf, "%ld\n", counter);
        if (write(f, buf, n) != n) return 1;   /* ... and file, in lock step */
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
"#;

/// `forkpoint run` in the foreground exits with the program's status, and the program starts
/// with the signal dispositions a program started from a shell has: `yes | head` ends
/// `yes` by SIGPIPE (status 141), where an ignored SIGPIPE (Rust's runtime ignores it, and
/// exec keeps an ignored signal ignored) would make it fail with "Broken pipe" instead.
#[test]
fn program_starts_with_default_sigpipe_and_its_status_is_returned() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let out = Command::new(BIN)
        .args([
            "run",
            "-m",
            lab.m(),
            "--",
            "bash",
            "-c",
            "yes | head -c1 >/dev/null; exit ${PIPESTATUS[0]}",
        ])
        .current_dir(&lab.mnt)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run forkpoint");
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGPIPE),
        "yes should end by SIGPIPE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A signal sent to a foreground `forkpoint run` (by kill, timeout, a supervisor) goes on to
/// the program, and the command ends with the program's status, leaving no session behind.
/// It used to end the command at once and leave the program running on its own.
#[test]
fn signals_sent_to_run_reach_the_program() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "-m",
            lab.m(),
            "--",
            "sh",
            "-c",
            "trap 'echo caught > caught; exit 7' TERM; : > started; while :; do sleep 0.05; done",
        ])
        .current_dir(&lab.mnt)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run forkpoint");
    wait_for("the program to start", Duration::from_secs(10), || {
        lab.mnt.join("started").exists()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7), "the program's own exit: {status:?}");
    assert!(
        lab.mnt.join("caught").exists(),
        "the program caught SIGTERM"
    );
    let ps: serde_json::Value =
        serde_json::from_str(&lab.fp(&["ps", "-m", lab.m(), "--json"])).expect("ps json");
    assert_eq!(ps.as_array().map(Vec::len), Some(0), "sessions left: {ps}");
}

/// Ctrl-C on the terminal is the program's to handle: one that catches SIGINT goes on and
/// ends as it decides, and `forkpoint run` with it (Ctrl-C used to kill the session's
/// supervisor, and the program with it).
#[test]
fn ctrl_c_on_the_terminal_is_the_programs_to_handle() {
    if !can_run() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let lab = Lab::new();
    let (m, s) = pty();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "-m",
        lab.m(),
        "--",
        "sh",
        "-c",
        "n=0; trap 'n=$((n+1)); echo INT $n' INT; : > started; i=0; \
         while [ $i -lt 30 ]; do sleep 0.05; i=$((i+1)); done; echo done $n; exit 3",
    ])
    .current_dir(&lab.mnt)
    .stdin(s.try_clone().expect("dup"))
    .stdout(s.try_clone().expect("dup"))
    .stderr(s);
    // SAFETY: setsid and ioctl are async-signal-safe; the terminal becomes the controlling
    // terminal of the new session, as a login shell's is.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start forkpoint");
    wait_for("the program to start", Duration::from_secs(10), || {
        lab.mnt.join("started").exists()
    });
    // SAFETY: writes one byte from a local buffer to the terminal's master side.
    let n = unsafe { libc::write(m.as_raw_fd(), b"\x03".as_ptr().cast(), 1) };
    assert_eq!(n, 1, "write ^C");
    let text = screen(&m, Duration::from_secs(4));
    let status = child.wait().expect("wait");
    assert!(text.contains("INT 1"), "the program caught ^C: {text:?}");
    assert!(text.contains("done 1"), "and went on to its end: {text:?}");
    assert_eq!(
        status.code(),
        Some(3),
        "its exit status: {status:?} {text:?}"
    );
}

/// `ps` shows each session's state: `running`, `stopped` after `checkpoint --stop`, and
/// `mount lost` once the daemon that served its files has died (the program runs on
/// without them); a checkpoint of such a session is refused with a message that says so.
#[test]
fn ps_shows_stopped_sessions_and_sessions_that_lost_their_mount() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let state = |name: &str| -> String {
        let ps: serde_json::Value =
            serde_json::from_str(&lab.fp(&["ps", "-m", lab.m(), "--json"])).expect("ps json");
        ps.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .and_then(|s| s["state"].as_str())
            .unwrap_or("(not listed)")
            .to_string()
    };
    for name in ["a", "b"] {
        lab.fp(&[
            "run",
            "-m",
            lab.m(),
            "--detach",
            "--name",
            name,
            "--",
            "sh",
            "-c",
            "while :; do sleep 0.05; done",
        ]);
    }
    assert_eq!(state("a"), "running");
    lab.fp(&[
        "checkpoint",
        "-m",
        lab.m(),
        "--session",
        "b",
        "--stop",
        "b1",
    ]);
    assert_eq!(state("b"), "stopped");
    // The daemon dies; the next mount cleans up after it.
    let store = lab.store.to_str().expect("utf8").to_string();
    let mut daemons = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.len() > 2 && args[1] == b"daemon" && args[2] == store.as_bytes() {
            let pid: i32 = e
                .file_name()
                .to_str()
                .and_then(|p| p.parse().ok())
                .expect("pid");
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            daemons.push(pid);
        }
    }
    assert_eq!(daemons.len(), 1, "the store's daemon");
    wait_for("the daemon to die", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{}", daemons[0])).exists()
    });
    // Until then, commands on the mount say what happened and what to do.
    for args in [
        &["checkpoint", "-m", lab.m(), "--session", "a", "a0"][..],
        &["restore", "-m", lab.m(), "--detach", "b1"][..],
        &["snapshot", "-m", lab.m(), "s0"][..],
    ] {
        let o = Command::new(BIN)
            .args(args)
            .current_dir(lab.dir.path())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("has died") && err.contains("forkpoint mount"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["mount", lab.store.to_str().expect("utf8"), lab.m()])
        .output()
        .expect("mount again");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mount again: {err}");
    assert!(
        err.contains("lost their files") && err.contains("a (pid"),
        "the mount names the sessions that lost their files: {err}"
    );
    assert_eq!(state("a"), "mount lost");
    let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), "--session", "a", "a1"]);
    assert!(err.contains("lost its files"), "{err}");
}

/// `restore SNAPSHOT` rolls the mount's files back to a filesystem snapshot (as `zfs
/// rollback`), keeping what they were as an automatic snapshot, which can be restored in
/// turn; it is refused, changing nothing, while a session runs on the mount.
#[test]
fn a_filesystem_snapshot_rolls_the_files_back() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let m = &lab.mnt;
    std::fs::write(m.join("f1"), "one").expect("write");
    std::fs::create_dir(m.join("d")).expect("mkdir");
    std::fs::write(m.join("d/f2"), "two").expect("write");
    lab.fp(&["snapshot", "-m", lab.m(), "base"]);
    std::fs::write(m.join("f1"), "changed").expect("write");
    std::fs::remove_dir_all(m.join("d")).expect("rm");
    std::fs::write(m.join("f3"), "three").expect("write");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "q",
        "--",
        "sleep",
        "60",
    ]);
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "base"]);
    assert!(
        err.contains("sessions run on") && err.contains('q'),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(m.join("f1")).expect("f1"),
        "changed"
    );
    let (pid, _) = lab.session_pid("q");
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the session to end", Duration::from_secs(10), || {
        !lab.fp(&["ps", "-m", lab.m()]).contains("sleep")
    });
    lab.fp(&["restore", "-m", lab.m(), "base"]);
    assert_eq!(std::fs::read_to_string(m.join("f1")).expect("f1"), "one");
    assert_eq!(std::fs::read_to_string(m.join("d/f2")).expect("f2"), "two");
    assert!(!m.join("f3").exists(), "f3 came after the snapshot");
    // What the rollback left is kept, and comes back the same way.
    let v: serde_json::Value =
        serde_json::from_str(&lab.fp(&["log", "-m", lab.m(), "--json"])).expect("log json");
    let auto = v["checkpoints"]
        .as_array()
        .and_then(|a| a.iter().rev().find(|c| c["kind"] == "auto"))
        .and_then(|c| c["name"].as_str())
        .expect("an automatic snapshot")
        .to_string();
    lab.fp(&["restore", "-m", lab.m(), &auto]);
    assert_eq!(
        std::fs::read_to_string(m.join("f1")).expect("f1"),
        "changed"
    );
    assert_eq!(std::fs::read_to_string(m.join("f3")).expect("f3"), "three");
    assert!(!m.join("d").exists(), "d was removed before the rollback");
}

/// File locks the program holds (an flock and a POSIX record lock, as SQLite takes) are
/// held again after a restore, on the new branch's files and after a rollback in place: a
/// restored program that believed it held a lock nobody held could be overrun by another.
#[test]
fn file_locks_are_held_again_after_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    std::fs::write(
        lab.mnt.join("lk.py"),
        "import fcntl, time\n\
         f = open('lockfile', 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n\
         g = open('rec', 'w'); fcntl.lockf(g, fcntl.LOCK_EX, 10, 0)\n\
         open('ready', 'w').close()\n\
         while True: time.sleep(0.05)\n",
    )
    .expect("write program");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "lk",
        "--",
        "python3",
        "lk.py",
    ]);
    wait_for("the locks", Duration::from_secs(20), || {
        lab.mnt.join("ready").exists()
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "--session", "lk", "l1"]);
    lab.fp(&["restore", "-m", lab.m(), "--detach", "--branch", "lb", "l1"]);
    // (flock held by someone else, first 10 bytes write-locked by someone else)
    let held = |dir: &Path| -> (bool, bool) {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("lockfile"))
            .expect("open lockfile");
        // SAFETY: flock on a descriptor we own.
        let flocked = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        let g = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("rec"))
            .expect("open rec");
        // SAFETY: an all-zero struct flock is valid; fields set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_len = 10;
        // SAFETY: F_GETLK fills the struct we pass.
        let r = unsafe { libc::fcntl(g.as_raw_fd(), libc::F_GETLK, &mut fl) };
        assert_eq!(r, 0, "F_GETLK");
        (flocked, fl.l_type != libc::F_UNLCK as i16)
    };
    assert_eq!(held(&lab.mnt), (true, true), "the original holds both");
    assert_eq!(
        held(&lab.branch_dir("lb")),
        (true, true),
        "the restored copy holds both on its branch's files"
    );
    lab.fp(&["restore", "-m", lab.m(), "--detach", "l1"]);
    assert_eq!(
        held(&lab.mnt),
        (true, true),
        "and after a rollback in place"
    );
}

#[test]
fn counter_cut_is_atomic_and_rollback_continues() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("counter", COUNTER, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "c",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("counter.log");
    wait_for("counter to start", Duration::from_secs(10), || {
        lines(&log).len() > 20
    });
    let keep = lab.mnt.join("kept-by-the-checkpoint");
    std::fs::write(&keep, b"at the cut\n").expect("write");
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "one"]);
    assert!(out.contains("downtime"), "{out}");
    // Deleted after the checkpoint, and looked up while absent (the kernel caches that).
    std::fs::remove_file(&keep).expect("rm");
    assert!(!keep.exists());
    // The checkpoint's files hold exactly what the program had written at the cut.
    let snap_log = lab.mnt.join(".forkpoint/snapshots/one/counter.log");
    let at_cut = lines(&snap_log);
    assert!(at_cut.len() > 20);
    assert_sequence(&at_cut);
    wait_for("progress after checkpoint", Duration::from_secs(10), || {
        lines(&log).len() > at_cut.len() + 50
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "one"]);
    // Files rolled back; the process continues from the same value: no gap, no repeat.
    wait_for("progress after restore", Duration::from_secs(10), || {
        lines(&log).len() > at_cut.len() + 30
    });
    let after = lines(&log);
    assert_sequence(&after);
    // The rollback brought the file back, although the kernel had been told it was absent.
    assert_eq!(
        std::fs::read(&keep).expect("file back after rollback"),
        b"at the cut\n"
    );
    // The rollback kept the state it left.
    let log_text = lab.fp(&["log", "-m", lab.m()]);
    assert!(log_text.contains("auto-"), "{log_text}");
    // And the same checkpoint can be restored again.
    lab.fp(&["restore", "-m", lab.m(), "--detach", "one"]);
    wait_for(
        "progress after 2nd restore",
        Duration::from_secs(10),
        || lines(&log).len() > at_cut.len() + 30,
    );
    assert_sequence(&lines(&log));
}

#[test]
fn one_checkpoint_on_two_branches_side_by_side() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("counter", COUNTER, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "orig",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("counter.log");
    wait_for("counter", Duration::from_secs(10), || {
        lines(&log).len() > 20
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "fork"]);
    let at_cut = lines(&lab.mnt.join(".forkpoint/snapshots/fork/counter.log")).len();
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "fork",
    ]);
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b2",
        "fork",
    ]);
    let (_, orig_main) = lab.session_pid("orig");
    let (_, b1_main) = lab.session_pid("b1");
    let (_, b2_main) = lab.session_pid("b2");
    assert_eq!(orig_main, b1_main, "same pid in each branch");
    assert_eq!(orig_main, b2_main, "same pid in each branch");
    let b1 = lab.branch_dir("b1");
    let b2 = lab.branch_dir("b2");
    for b in [&b1, &b2] {
        wait_for("branch progress", Duration::from_secs(10), || {
            lines(&b.join("counter.log")).len() > at_cut + 30
        });
        assert_sequence(&lines(&b.join("counter.log")));
    }
    // Each branch writes its own files; neither sees the other's.
    std::fs::write(b1.join("only-b1"), "1").expect("write b1");
    std::fs::write(b2.join("only-b2"), "2").expect("write b2");
    assert!(!b2.join("only-b1").exists() && !lab.mnt.join("only-b1").exists());
    assert!(!b1.join("only-b2").exists() && !lab.mnt.join("only-b2").exists());
    // The three counters diverge: each file is its own.
    let (m, x, y) = (
        lines(&log),
        lines(&b1.join("counter.log")),
        lines(&b2.join("counter.log")),
    );
    assert!(m.len() > at_cut && x.len() > at_cut && y.len() > at_cut);
    // A branch's hidden mount goes with its last session (it kept the daemon running after
    // the user's umount); the other branch's stays while its session runs.
    let mounted = |p: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap_or("")))
    };
    assert!(mounted(&b1) && mounted(&b2));
    lab.fp(&[
        "checkpoint",
        "-m",
        lab.m(),
        "--session",
        "b1",
        "--kill",
        "b1-end",
    ]);
    wait_for("b1's mount released", Duration::from_secs(10), || {
        !mounted(&b1)
    });
    assert!(mounted(&b2), "b2's session still runs there");
    assert_sequence(&lines(&b2.join("counter.log")));
    let cp = lab.fp(&["log", "-m", lab.m()]);
    assert!(cp.contains("b1-end"), "{cp}");
}

const THREADS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <string.h>
#define N 8
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long total = 0, mine[N], turn = 0;
static void *worker(void *arg) {
    long id = (long)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (turn % N != id) pthread_cond_wait(&cv, &mu);
        total++; mine[id]++; turn++;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        usleep(500);
    }
    return 0;
}
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    pthread_t t[N];
    for (long i = 0; i < N; i++) pthread_create(&t[i], 0, worker, (void *)i);
    int f = open("threads.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) {
        usleep(20000);
        pthread_mutex_lock(&mu);
        long sum = 0, lo = mine[0], hi = mine[0];
        for (int i = 0; i < N; i++) { sum += mine[i]; if (mine[i] < lo) lo = mine[i]; if (mine[i] > hi) hi = mine[i]; }
        char buf[128];
        int n = (sum == total && hi - lo <= 1 && turn == total)
            ? snprintf(buf, sizeof buf, "ok %ld\n", total)
            : snprintf(buf, sizeof buf, "FAIL total=%ld sum=%ld lo=%ld hi=%ld\n", total, sum, lo, hi);
        pthread_mutex_unlock(&mu);
        write(f, buf, n);
    }
}
"#;

#[test]
fn multithreaded_program_keeps_its_invariants() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("threads", THREADS, &["-pthread"]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("threads.log");
    let count = lines_any;
    wait_for("threads", Duration::from_secs(10), || count(&log) > 10);
    lab.fp(&["checkpoint", "-m", lab.m(), "mt"]);
    let at_cut = count(&lab.mnt.join(".forkpoint/snapshots/mt/threads.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "mt"]);
    wait_for("threads after restore", Duration::from_secs(20), || {
        count(&log) > at_cut + 20
    });
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains("FAIL"), "{text}");
    let totals: Vec<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ok ")?.parse().ok())
        .collect();
    assert!(
        totals.windows(2).all(|w| w[0] <= w[1]),
        "total never goes back"
    );
    assert!(
        totals.last() > totals.get(at_cut),
        "the restored threads make progress"
    );
}

const CLOCK: &str = r#"
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int f = open("clock.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    struct timespec prev, now;
    clock_gettime(CLOCK_MONOTONIC, &prev);
    for (;;) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long d = (now.tv_sec - prev.tv_sec) * 1000000000LL + (now.tv_nsec - prev.tv_nsec);
        char buf[64];
        int n = snprintf(buf, sizeof buf, "%lld\n", d);
        write(f, buf, n);
        prev = now;
    }
}
"#;

#[test]
fn monotonic_clock_never_jumps_across_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("clock", CLOCK, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("clock.log");
    wait_for("clock", Duration::from_secs(10), || lines(&log).len() > 10);
    lab.fp(&["checkpoint", "-m", lab.m(), "tick"]);
    // Host time moves on while the checkpoint waits.
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    lab.fp(&["restore", "-m", lab.m(), "--detach", "tick"]);
    let n = lines(&lab.mnt.join(".forkpoint/snapshots/tick/clock.log")).len();
    wait_for("clock after restore", Duration::from_secs(10), || {
        lines(&log).len() > n + 20
    });
    let took = t.elapsed().as_nanos() as i64 + 1_000_000_000;
    for d in lines(&log) {
        assert!(d >= 0, "CLOCK_MONOTONIC went backwards by {d} ns");
        assert!(
            d < took,
            "CLOCK_MONOTONIC jumped {d} ns (restore took {took} ns incl. 1 s slack)"
        );
    }
}

/// A Python program reading a file line by line with a large dict and a memfd it maps
/// shared (the pages of which go through the store): rolled back, it goes on with the same
/// file position, dict and memfd.
#[test]
fn python_dict_and_file_position_survive() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let data: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(lab.mnt.join("input.txt"), data).expect("input");
    let script = lab.mnt.join("reader.py");
    std::fs::write(
        &script,
        r#"
import mmap, os, time
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
table = {i: str(i) * 3 for i in range(300_000)}
# A memfd, mapped shared: what goes in through the mapping comes out of the descriptor.
mfd = os.memfd_create("pyshared")
blob = bytes((i * 31 + 7) % 251 for i in range(3 << 20))
os.write(mfd, blob)
shared = mmap.mmap(mfd, len(blob))
src = open("input.txt")
out = open("progress.txt", "a")
n = 0
while True:
    line = src.readline()
    if not line:
        break
    n += 1
    want = "line %d\n" % (n - 1)
    shared[:8] = n.to_bytes(8, "little")
    at = (n * 4096 * 7) % (len(blob) - 4096) + 8
    same = os.pread(mfd, 8, 0) == n.to_bytes(8, "little") and os.pread(mfd, 4096, at) == blob[at:at + 4096]
    ok = same and line == want and table[n % 300_000] == str(n % 300_000) * 3 and len(table) == 300_000
    out.write("%d %s\n" % (n, "ok" if ok else "BAD " + repr(line)))
    out.flush()
    time.sleep(0.002)
out.write("done\n")
out.flush()
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let prog = lab.mnt.join("progress.txt");
    let count = lines_any;
    wait_for("python", Duration::from_secs(20), || count(&prog) > 50);
    lab.fp(&["checkpoint", "-m", lab.m(), "py"]);
    let at_cut = count(&lab.mnt.join(".forkpoint/snapshots/py/progress.txt"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "py"]);
    wait_for("python after restore", Duration::from_secs(20), || {
        count(&prog) > at_cut + 100
    });
    let text = std::fs::read_to_string(&prog).expect("progress");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("{} ok", i + 1), "line {} of progress", i + 1);
    }
}

/// A file on the mount written through a shared mapping, as SQLite's `-shm` in WAL mode:
/// the dump read the file's size and mtime from the kernel's attribute cache (which, with
/// the writeback cache, keeps its own times), the snapshot has the daemon's, and a restore
/// refused the difference as "mapped file changed since the dump". Restored on a branch and
/// rolled back in place, the database holds what the program last committed, and the
/// program carries on.
#[test]
fn sqlite_in_wal_mode_is_restored_with_its_shared_memory_file() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("wal.py");
    std::fs::write(
        &script,
        r#"
import sqlite3, time
db = sqlite3.connect("w.db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t(i INTEGER PRIMARY KEY, v TEXT)")
out = open("progress.txt", "a")
n = 0
while True:
    ok = db.execute("SELECT coalesce(max(i), 0), count(*) FROM t").fetchone() == (n, n)
    n += 1
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES(?, ?)", (n, "x" * 100))
    db.execute("COMMIT")
    out.write("%d %s\n" % (n, "ok" if ok else "BAD"))
    out.flush()
    time.sleep(0.004)
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let prog = lab.mnt.join("progress.txt");
    let count = lines_any;
    // The kernel's mtime of the -shm file is from its first write through the mapping.
    wait_for("python", Duration::from_secs(20), || count(&prog) > 300);
    lab.fp(&["checkpoint", "-m", lab.m(), "mapped"]);
    let at_cut = count(&lab.mnt.join(".forkpoint/snapshots/mapped/progress.txt"));
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--branch",
        "mapped-b",
        "--detach",
        "mapped",
    ]);
    let b = lab.branch_dir("mapped-b");
    wait_for("python on the branch", Duration::from_secs(20), || {
        count(&b.join("progress.txt")) > at_cut + 100
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "mapped"]);
    wait_for("python after the rollback", Duration::from_secs(20), || {
        count(&prog) > at_cut + 100
    });
    for p in [prog, b.join("progress.txt")] {
        let text = std::fs::read_to_string(&p).expect("progress");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(
                l,
                format!("{} ok", i + 1),
                "line {} of {}",
                i + 1,
                p.display()
            );
        }
    }
}

/// asyncio wakes its loop through a unix socket pair and watches it with epoll; here the
/// program also streams numbered lines to itself over a second pair. Rolled back, it must
/// carry on from the checkpoint: no line lost or repeated in flight, the loop still awake.
#[test]
fn python_asyncio_over_socket_pairs_survives() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("pingpong.py");
    std::fs::write(
        &script,
        r#"
import asyncio, os, socket
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass

async def main():
    a, b = socket.socketpair()
    _, w = await asyncio.open_connection(sock=a)
    r, _ = await asyncio.open_connection(sock=b)
    out = open("progress.txt", "a")
    async def produce():
        n = 0
        while True:
            w.write(b"%d\n" % n)
            n += 1
            if n % 50 == 0:
                await w.drain()
                await asyncio.sleep(0.01)
    async def consume():
        want = 0
        while True:
            line = await r.readline()
            got = int(line)
            ok = got == want
            want += 1
            if want % 50 == 0 or not ok:
                out.write("%d %s\n" % (got, "ok" if ok else "BAD want %d" % (want - 1)))
                out.flush()
    # The self-pipe: another thread wakes the loop through asyncio's own socket pair.
    loop = asyncio.get_running_loop()
    def poke():
        import threading, time
        while True:
            time.sleep(0.05)
            loop.call_soon_threadsafe(lambda: None)
    import threading
    threading.Thread(target=poke, daemon=True).start()
    await asyncio.gather(produce(), consume())

asyncio.run(main())
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let prog = lab.mnt.join("progress.txt");
    wait_for("asyncio", Duration::from_secs(20), || lines_any(&prog) > 20);
    lab.fp(&["checkpoint", "-m", lab.m(), "aio"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/aio/progress.txt"));
    wait_for(
        "asyncio after the checkpoint",
        Duration::from_secs(20),
        || lines_any(&prog) > at_cut + 20,
    );
    lab.fp(&["restore", "-m", lab.m(), "--detach", "aio"]);
    wait_for("asyncio after restore", Duration::from_secs(20), || {
        lines_any(&prog) > at_cut + 40
    });
    let text = std::fs::read_to_string(&prog).expect("progress");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(
            l,
            format!("{} ok", (i + 1) * 50 - 1),
            "line {} of progress",
            i + 1
        );
    }
}

/// The "N pages unchanged since the last checkpoint" of a `checkpoint` line.
fn unchanged_pages(out: &str) -> u64 {
    out.split(" pages unchanged")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no reused pages in: {out}"))
}

/// Keeps 32 MiB of counters whose sum it knows; rewrites a few random pages and drops one
/// each step, checks the sum page by page and logs "STEP ok" (or BAD) to sums.log.
const SUMS_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define N (32L << 20) / 8
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    unsigned long *a = mmap(NULL, N * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long sum = 0, x = 88172645463325252UL, step = 0;
    for (long i = 0; i < N; i++) { a[i] = i * 3; sum += a[i]; }
    for (;;) {
        step++;
        /* a few random pages change, one is dropped (reads back as zeros) */
        for (int k = 0; k < 20; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            long i = x % N;
            sum -= a[i]; a[i] += step; sum += a[i];
        }
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        long p = (x % (N / 512)) * 512;
        for (long i = p; i < p + 512; i++) sum -= a[i];
        madvise(a + p, 4096, MADV_DONTNEED);
        unsigned long check = 0;
        for (long i = 0; i < N; i++) check += a[i];
        FILE *f = fopen("sums.log", "a");
        fprintf(f, "%lu %s\n", step, check == sum ? "ok" : "BAD");
        fclose(f);
        usleep(20000);
    }
}
"#;

/// Later checkpoints read only the pages written since the one before (dirty-page
/// tracking). A program keeps 32 MiB of counters whose sum it knows, rewrites a few pages
/// between checkpoints, drops and maps memory; restored from the third checkpoint, it finds
/// every counter as it was there (checked page by page by the program itself).
#[test]
fn incremental_checkpoints_restore_exact_memory() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("sums", SUMS_C, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("sums.log");
    let mut reused = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let n = lines_any(&log);
        wait_for("the program", Duration::from_secs(20), || {
            lines_any(&log) > n + 5
        });
        reused.push(unchanged_pages(&lab.fp(&[
            "checkpoint",
            "-m",
            lab.m(),
            name,
        ])));
    }
    assert_eq!(reused[0], 0, "the first checkpoint reads everything");
    assert!(
        reused[1] > 7000 && reused[2] > 7000,
        "later checkpoints reuse the unchanged pages: {reused:?}"
    );
    let n = lines_any(&log);
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > n + 5
    });
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/c3/sums.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "c3"]);
    wait_for("the restored program", Duration::from_secs(20), || {
        lines_any(&log) > at_cut + 10
    });
    let text = std::fs::read_to_string(&log).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("{} ok", i + 1), "line {} of sums.log", i + 1);
    }
    // Tracking starts at the restore: the first checkpoint after it is incremental too, and
    // restores as exactly.
    let r = unchanged_pages(&lab.fp(&["checkpoint", "-m", lab.m(), "c4"]));
    assert!(r > 7000, "the checkpoint after a restore reuses pages: {r}");
    let n = lines_any(&log);
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > n + 5
    });
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/c4/sums.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "c4"]);
    wait_for(
        "the program restored again",
        Duration::from_secs(20),
        || lines_any(&log) > at_cut + 10,
    );
    let text = std::fs::read_to_string(&log).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("{} ok", i + 1), "line {} of sums.log", i + 1);
    }
    // The state a rollback leaves is kept by an incremental checkpoint too (taken from the
    // tracked pages, then the program is killed): restored, it is exact.
    let v: serde_json::Value =
        serde_json::from_str(&lab.fp(&["log", "-m", lab.m(), "--json"])).expect("log json");
    let auto = v["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .filter(|c| c["kind"] == "auto")
        .filter_map(|c| c["name"].as_str())
        .next_back()
        .expect("an automatic checkpoint")
        .to_string();
    let at_cut = lines_any(
        &lab.mnt
            .join(format!(".forkpoint/snapshots/{auto}/sums.log")),
    );
    lab.fp(&["restore", "-m", lab.m(), "--detach", &auto]);
    wait_for(
        "the program restored from its automatic checkpoint",
        Duration::from_secs(20),
        || lines_any(&log) > at_cut + 10,
    );
    let text = std::fs::read_to_string(&log).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("{} ok", i + 1), "line {} of sums.log", i + 1);
    }
}

/// `restore --lazy`: the program runs before its memory is back (pages come in on first
/// touch and in the background); it drops pages while others are still missing, and finds
/// every counter as it was (checked by the program itself), in place and on a new branch.
/// The checkpoint after it is incremental, and restores exactly too.
#[test]
fn lazy_restore_gives_back_exact_memory() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("sums", SUMS_C, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("sums.log");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > 5
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/c1/sums.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "--lazy", "c1"]);
    wait_for("the restored program", Duration::from_secs(20), || {
        lines_any(&log) > at_cut + 10
    });
    // The fill hands the program over to dirty-page tracking once every page is in: the
    // checkpoint after it reads only what was written since the restore.
    let r = unchanged_pages(&lab.fp(&["checkpoint", "-m", lab.m(), "c2"]));
    assert!(
        r > 7000,
        "the checkpoint after a lazy restore reuses pages: {r}"
    );
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--lazy",
        "--branch",
        "b",
        "c2",
    ]);
    let blog = lab.branch_dir("b").join("sums.log");
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/c2/sums.log"));
    wait_for("the program on the branch", Duration::from_secs(20), || {
        lines_any(&blog) > at_cut + 10
    });
    for l in [&log, &blog] {
        let text = std::fs::read_to_string(l).expect("log");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(l, format!("{} ok", i + 1), "line {} of sums.log", i + 1);
        }
    }
}

/// The delta depth a `checkpoint` line reports (0 for a whole image).
fn delta_depth(out: &str) -> u32 {
    out.split(" deep)")
        .next()
        .filter(|s| s.len() < out.len())
        .and_then(|s| s.rsplit(' ').next())
        .map_or(0, |d| {
            d.parse()
                .unwrap_or_else(|_| panic!("delta depth in: {out}"))
        })
}

/// Incremental checkpoints are stored as deltas against the one before, at most 8 deep,
/// then as a whole image again. gc keeps what the deltas build on, verify walks it, and the
/// deepest delta restores exactly, as does the checkpoint after the chain was cut.
#[test]
fn delta_images_chain_survive_gc_and_restore_exactly() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("sums", SUMS_C, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("sums.log");
    let mut depths = Vec::new();
    for i in 0..10 {
        let n = lines_any(&log);
        wait_for("the program", Duration::from_secs(20), || {
            lines_any(&log) > n + 2
        });
        depths.push(delta_depth(&lab.fp(&[
            "checkpoint",
            "-m",
            lab.m(),
            &format!("d{i}"),
        ])));
    }
    assert_eq!(depths, [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]);
    // Run in the mount, gc and verify work on its store.
    lab.fp(&["gc"]);
    // verify exits non-zero on any damaged or missing object.
    let out = lab.fp(&["verify"]);
    assert!(
        out.contains("from 11 retained checkpoints") && !out.contains("CORRUPT"),
        "{out}"
    );
    for cp in ["d8", "d9"] {
        let n = lines_any(&log);
        wait_for("the program", Duration::from_secs(20), || {
            lines_any(&log) > n + 2
        });
        let at_cut = lines_any(&lab.mnt.join(format!(".forkpoint/snapshots/{cp}/sums.log")));
        lab.fp(&["restore", "-m", lab.m(), "--detach", cp]);
        wait_for("the restored program", Duration::from_secs(20), || {
            lines_any(&log) > at_cut + 5
        });
        let text = std::fs::read_to_string(&log).expect("log");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(
                l,
                format!("{} ok", i + 1),
                "{cp}: line {} of sums.log",
                i + 1
            );
        }
    }
}

#[test]
fn refusals_leave_the_program_running() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.fp_fails(&["checkpoint", "-m", lab.m(), "nothing-runs"]);
    lab.fp_fails(&["restore", "-m", lab.m(), "no-such-checkpoint"]);
    lab.fp(&["snapshot", "-m", lab.m(), "files-only"]);
    // A filesystem snapshot has no processes to restore on a new branch (in place, it rolls
    // the files back: a_filesystem_snapshot_rolls_the_files_back).
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--branch", "x", "files-only"]);
    assert!(err.contains("without processes"), "{err}");
    // A program holding a socket to the outside cannot be captured: refused, naming the fd;
    // it keeps running.
    let exe = lab.cc(
        "sock",
        r#"
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <netinet/in.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    (void)s;
    int f = open("alive.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) { write(f, "x\n", 2); usleep(10000); }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("alive.log");
    wait_for("piper", Duration::from_secs(10), || lines_any(&log) > 5);
    let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), "refused"]);
    assert!(
        err.contains("fd 3") && err.contains("socket"),
        "names the fd: {err}"
    );
    let n = lines_any(&log);
    wait_for("still running", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
    let log_text = lab.fp(&["log", "-m", lab.m()]);
    assert!(
        !log_text.contains("'refused'"),
        "no checkpoint recorded: {log_text}"
    );
    // An inotify instance whose events the program never reads: tried again for a second,
    // then refused, saying why.
    let (pid, _) = lab.session_pid("s1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
        .expect("kill");
    let exe = lab.cc(
        "watch",
        r#"
#include <unistd.h>
#include <fcntl.h>
#include <sys/inotify.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int f = open("watch.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    int i = inotify_init1(0);
    inotify_add_watch(i, ".", IN_CREATE);
    for (;;) { write(f, "x\n", 2); usleep(10000); }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "watcher",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("watch.log");
    wait_for("watcher", Duration::from_secs(10), || lines_any(&log) > 5);
    lab.fp(&["checkpoint", "-m", lab.m(), "quiet"]);
    std::fs::write(lab.mnt.join("an-event"), "").expect("create");
    let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), "refused"]);
    assert!(
        err.contains("fd 4 (anon_inode:inotify)")
            && err.contains("inotify events are queued, not read yet")
            && err.contains("checkpoint again in a moment"),
        "{err}"
    );
    let n = lines_any(&log);
    wait_for("still running", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
    // A rollback does not wait for the queue: the state it keeps of the program it ends
    // leaves the unread event out.
    let out = lab.fp(&["restore", "-m", lab.m(), "--detach", "quiet"]);
    assert!(out.contains("as session watcher"), "{out}");
    // A session that cannot be checkpointed is ended with kill; umount says how.
    let err = lab.fp_fails(&["umount", lab.m()]);
    assert!(err.contains("forkpoint kill --session"), "{err}");
    let out = lab.fp(&["kill", "-m", lab.m(), "--session", "watcher"]);
    assert!(out.contains("killed session watcher"), "{out}");
    assert!(!lab.fp(&["ps", "-m", lab.m()]).contains("watcher"));
    let n = lines_any(&log);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines_any(&log), n, "nothing of the session runs");
}

/// inotify: a program watching a directory and two files (with a watch removed between
/// them, so the descriptors have a gap) is restored with the same watch descriptors, on a
/// branch, and sees the branch's changes, and nothing else: no event of the restore itself.
#[test]
fn inotify_watches_come_back_with_their_descriptors() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    std::fs::create_dir(lab.mnt.join("w")).expect("mkdir");
    for f in ["a", "b", "gone"] {
        std::fs::write(lab.mnt.join("w").join(f), "").expect("write");
    }
    let exe = lab.cc(
        "inwatch",
        r#"
#include <stdio.h>
#include <unistd.h>
#include <sys/inotify.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    FILE *out = fopen("events.log", "a");
    int i = inotify_init1(IN_CLOEXEC);
    int d = inotify_add_watch(i, "w", IN_CREATE | IN_MOVED_TO);
    int a = inotify_add_watch(i, "w/a", IN_MODIFY);
    int g = inotify_add_watch(i, "w/gone", IN_MODIFY);
    inotify_rm_watch(i, g);
    int b = inotify_add_watch(i, "w/b", IN_MODIFY | IN_ONESHOT);
    fprintf(out, "ready %d %d %d %d\n", d, a, g, b);
    fflush(out);
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(i, buf, sizeof buf);
        if (n <= 0) { fprintf(out, "read failed\n"); fflush(out); return 1; }
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            fprintf(out, "wd=%d mask=%x name=%s\n", e->wd, e->mask, e->len ? e->name : "");
            p += sizeof *e + e->len;
        }
        fflush(out);
    }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("events.log");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    // The removed watch's IN_IGNORED (0x8000) is read before the checkpoint.
    wait_for("the watcher", Duration::from_secs(10), || {
        read(&log).contains("wd=3 mask=8000")
    });
    assert!(read(&log).starts_with("ready 1 2 3 4\n"), "{}", read(&log));
    lab.fp(&["checkpoint", "-m", lab.m(), "watching"]);
    let at_cut = read(&log);
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "watching",
    ]);
    let b1 = lab.branch_dir("b1");
    std::fs::write(b1.join("w/new"), "").expect("create in the branch");
    std::fs::write(b1.join("w/a"), "a").expect("write in the branch");
    std::fs::write(b1.join("w/b"), "b").expect("write in the branch");
    let blog = b1.join("events.log");
    wait_for("the branch's events", Duration::from_secs(10), || {
        read(&blog).contains("wd=4 mask=8000")
    });
    let after = read(&blog);
    let new = after.strip_prefix(at_cut.as_str()).unwrap_or_else(|| {
        panic!("the branch's log continues the checkpoint's: {after:?} after {at_cut:?}")
    });
    // IN_CREATE (0x100) in w, IN_MODIFY (0x2) of a and b, then b's one-shot watch ends
    // (IN_IGNORED); nothing about watch 3, whose gap the restore made and read off again.
    let lines: Vec<&str> = new.lines().collect();
    assert!(lines.contains(&"wd=1 mask=100 name=new"), "{new}");
    assert!(lines.contains(&"wd=2 mask=2 name="), "{new}");
    assert!(lines.contains(&"wd=4 mask=2 name="), "{new}");
    assert!(!new.contains("wd=3"), "{new}");
    // The original goes on watching its own files, and saw none of the branch's changes.
    std::fs::write(lab.mnt.join("w/a"), "main").expect("write");
    wait_for("the original's event", Duration::from_secs(10), || {
        read(&log).len() > at_cut.len()
    });
    assert!(!read(&log).contains("name=new"), "{}", read(&log));
}

/// A program stopped by SIGSTOP (as Ctrl-Z stops it) at the checkpoint is restored stopped,
/// without running a single line, and goes on at SIGCONT.
#[test]
fn a_stopped_program_is_restored_stopped() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "ticker",
        r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    FILE *f = fopen("ticks.log", "a");
    for (unsigned i = 0;; i++) { fprintf(f, "%u\n", i); fflush(f); usleep(5000); }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "t",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("ticks.log");
    wait_for("ticks", Duration::from_secs(10), || lines_any(&log) > 10);
    // The program is the only child of the session's init, itself the child of session-init.
    let child_of = |pid: i32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("children")
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .expect("a child")
    };
    let program = |session: &str| child_of(child_of(lab.session_pid(session).0));
    let signal = |pid: i32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal")
    };
    signal(program("t"), nix::sys::signal::Signal::SIGSTOP);
    wait_for("the stop", Duration::from_secs(10), || {
        lab.fp(&["ps", "-m", lab.m()]).contains("stopped")
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "halted"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/halted/ticks.log"));
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "halted",
    ]);
    let blog = lab.branch_dir("b1").join("ticks.log");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lines_any(&blog),
        at_cut,
        "the restored program does not run"
    );
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    let b1 = ps.lines().find(|l| l.starts_with("b1 ")).expect("b1 in ps");
    assert!(b1.contains("stopped"), "{ps}");
    signal(program("b1"), nix::sys::signal::Signal::SIGCONT);
    wait_for(
        "the restored program, continued",
        Duration::from_secs(10),
        || lines_any(&blog) > at_cut + 10,
    );
    let text = std::fs::read_to_string(&blog).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, i.to_string(), "line {i} of the branch's ticks");
    }
    // The original stays stopped until it is continued too.
    assert_eq!(lines_any(&log), at_cut);
}

/// A server's listening TCP socket is part of the checkpoint: `python3 -m http.server`
/// rolled back serves the files of the checkpoint on the same port. A restore on a branch
/// while the original still listens there is refused, naming the address, and leaves no
/// branch behind.
#[test]
fn a_listening_server_is_rolled_back_on_its_port() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let get = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /{path} HTTP/1.0\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    };
    std::fs::write(lab.mnt.join("page.txt"), "v1\n").expect("write");
    let port_s = port.to_string();
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "web",
        "--",
        "python3",
        "-m",
        "http.server",
        &port_s,
        "--bind",
        "127.0.0.1",
    ]);
    wait_for("the server", Duration::from_secs(20), || {
        get("page.txt").as_deref() == Some("v1\n")
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "serving"]);
    std::fs::write(lab.mnt.join("page.txt"), "v2\n").expect("write");
    assert_eq!(get("page.txt").as_deref(), Some("v2\n"));
    let err = lab.fp_fails(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "serving",
    ]);
    assert!(
        err.contains(&format!("127.0.0.1:{port} is in use")),
        "{err}"
    );
    assert!(!lab.fp(&["log", "-m", lab.m()]).contains("branch b1"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "serving"]);
    wait_for("the restored server", Duration::from_secs(20), || {
        get("page.txt").as_deref() == Some("v1\n")
    });
    // And it is checkpointed again like any other.
    lab.fp(&["checkpoint", "-m", lab.m(), "again"]);
    assert_eq!(get("page.txt").as_deref(), Some("v1\n"));
}

/// Scratch files: a program's temporary directory is the session's own (`TMPDIR`, as
/// compilers and `tempfile` use it), recorded by its checkpoints and never seen by the host;
/// a file made with glibc's `tmpfile()` (unlinked at once, in /tmp) is kept with its
/// contents, and a second open file on it keeps its own position. They come back, on a
/// branch beside the original and rolled back in place.
#[test]
fn temporary_files_are_part_of_the_session() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "scratch",
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    const char *t = getenv("TMPDIR");
    FILE *out = fopen("scratch.log", "a");
    fprintf(out, "tmpdir %s\n", t ? t : "(none)");
    fflush(out);
    char p[4096];
    snprintf(p, sizeof p, "%s/scratchXXXXXX", t ? t : "/tmp");
    int a = mkstemp(p);
    FILE *b = tmpfile();
    if (a < 0 || !b) { fprintf(out, "no temporary files\n"); return 1; }
    /* A second open file on the unlinked one, reading behind the writer at its own pace. */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fileno(b));
    int r = open(self, O_RDONLY);
    long total = 0;
    for (unsigned i = 1;; i++) {
        char line[32], back[32], first[2];
        int n = snprintf(line, sizeof line, "%u\n", i);
        write(a, line, n);
        fwrite(line, 1, n, b);
        fflush(b);
        total += n;
        long sa = lseek(a, 0, SEEK_CUR), sb = ftell(b);
        int ok = sa == total && sb == total
            && pread(a, back, n, total - n) == n && !memcmp(back, line, n)
            && pread(fileno(b), back, n, total - n) == n && !memcmp(back, line, n)
            && pread(fileno(b), first, 2, 0) == 2 && !memcmp(first, "1\n", 2)
            && read(r, back, n) == n && !memcmp(back, line, n);
        fprintf(out, "%u %s\n", i, ok ? "ok" : "BAD");
        fflush(out);
        usleep(5000);
    }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("scratch.log");
    wait_for("the program", Duration::from_secs(10), || {
        lines_any(&log) > 30
    });
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.starts_with("tmpdir /tmp/.forkpoint-session-tmp\n"),
        "{text}"
    );
    let on_host: Vec<_> = std::fs::read_dir("/tmp/.forkpoint-session-tmp")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !on_host
            .iter()
            .any(|n| n.to_string_lossy().starts_with("scratch")),
        "the host sees the session's scratch files: {on_host:?}"
    );
    lab.fp(&["checkpoint", "-m", lab.m(), "scratching"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/scratching/scratch.log"));
    let all_ok = |p: &Path| {
        let text = std::fs::read_to_string(p).expect("log");
        for (i, l) in text.lines().enumerate().skip(1) {
            assert_eq!(l, format!("{i} ok"), "line {} of {}", i + 1, p.display());
        }
    };
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "scratching",
    ]);
    let b1 = lab.branch_dir("b1").join("scratch.log");
    wait_for("the branch", Duration::from_secs(10), || {
        lines_any(&b1) > at_cut + 30
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "scratching"]);
    wait_for("the rollback", Duration::from_secs(10), || {
        lines_any(&log) > at_cut + 30
    });
    all_ok(&b1);
    all_ok(&log);
}

/// Unix socket servers inside the session: Python's `multiprocessing.Manager` (a server
/// process listening on a socket in the session's temporary directory, a connection per
/// proxy) and a listener of the program's own on the mount with a connection it accepted
/// from itself. Both listen again after a restore, beside the original on a branch and
/// rolled back in place, and every call still answers right.
#[test]
fn unix_socket_servers_listen_again_after_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("mgr.py");
    std::fs::write(
        &script,
        r#"
import multiprocessing as mp, os, socket, time
if __name__ == "__main__":
    for fd in range(3, 1024):
        try: os.close(fd)
        except OSError: pass
    srv = socket.socket(socket.AF_UNIX)
    srv.bind("ctl.sock")
    os.chmod("ctl.sock", 0o640)
    srv.listen(4)
    cli = socket.socket(socket.AF_UNIX)
    cli.connect("ctl.sock")
    conn, _ = srv.accept()
    out = open("mgr.log", "a")
    with mp.Manager() as m:
        d, l, n = m.dict(), m.list(), 0
        while True:
            n += 1
            d[n % 50] = n
            l.append(n)
            cli.sendall(b"%d\n" % n)
            echo = conn.recv(64)
            ok = d[n % 50] == n and l[-1] == n and len(l) == n and echo == b"%d\n" % n
            out.write("%d %s\n" % (n, "ok" if ok else "BAD"))
            out.flush()
            time.sleep(0.005)
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("mgr.log");
    wait_for("the manager", Duration::from_secs(20), || {
        lines_any(&log) > 30
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "managed"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/managed/mgr.log"));
    let all_ok = |p: &Path| {
        let text = std::fs::read_to_string(p).expect("log");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(
                l,
                format!("{} ok", i + 1),
                "line {} of {}",
                i + 1,
                p.display()
            );
        }
    };
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "managed",
    ]);
    let b1 = lab.branch_dir("b1");
    wait_for("the branch", Duration::from_secs(20), || {
        lines_any(&b1.join("mgr.log")) > at_cut + 30
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "managed"]);
    wait_for("the rollback", Duration::from_secs(20), || {
        lines_any(&log) > at_cut + 30
    });
    all_ok(&b1.join("mgr.log"));
    all_ok(&log);
    // The listener on the mount is a real one again, in each, its file as it was.
    for dir in [&lab.mnt, &b1] {
        std::os::unix::net::UnixStream::connect(dir.join("ctl.sock"))
            .unwrap_or_else(|e| panic!("connect to {}/ctl.sock: {e}", dir.display()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ctl.sock"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640, "mode of {}/ctl.sock", dir.display());
    }
}

/// One open file behind several descriptors stays one after a restore: `2>&1` in a process
/// and a descriptor a child inherited share the file position, so the lines the parent and
/// the child append through them never overwrite each other (they did, each descriptor
/// reopened on its own at offset it had).
#[test]
fn descriptors_of_one_open_file_share_it_after_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "sharer",
        r#"
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int f = open("shared.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(f, 7);
    char line[32];
    if (fork() == 0) {
        for (unsigned i = 0;; i++) {
            int n = snprintf(line, sizeof line, "c%u\n", i);
            write(7, line, n);
            usleep(3000);
        }
    }
    for (unsigned i = 0;; i++) {
        int n = snprintf(line, sizeof line, "p%u\n", i);
        write(i % 2 ? f : 7, line, n);
        usleep(3000);
    }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("shared.log");
    wait_for("the writers", Duration::from_secs(10), || {
        lines_any(&log) > 100
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "sharing"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/sharing/shared.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "sharing"]);
    wait_for("the restored writers", Duration::from_secs(10), || {
        lines_any(&log) > at_cut + 200
    });
    lab.fp(&["kill", "-m", lab.m()]);
    // Every line whole, each writer's numbers without a gap or a repeat.
    let text = std::fs::read_to_string(&log).expect("log");
    let (mut p, mut c) = (0u32, 0u32);
    for (i, l) in text.lines().enumerate() {
        let (next, who) = match l.as_bytes().first() {
            Some(b'p') => (&mut p, 'p'),
            Some(b'c') => (&mut c, 'c'),
            _ => panic!("line {} is {l:?}", i + 1),
        };
        assert_eq!(l, format!("{who}{next}"), "line {} of shared.log", i + 1);
        *next += 1;
    }
    assert!(p as usize + c as usize > at_cut + 200);
}

/// asyncio with a process pool: the workers are forked while the event loop runs and
/// inherit its epoll instance and wake-up socket pair, one open file held by several
/// processes (it was refused).
#[test]
fn asyncio_with_a_process_pool_survives() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("pool.py");
    std::fs::write(
        &script,
        r#"
import asyncio, concurrent.futures, os
def square(x):
    return x * x
async def main():
    out = open("pool.log", "a")
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        n = 0
        while True:
            n += 1
            r = await loop.run_in_executor(ex, square, n)
            out.write("%d %s\n" % (n, "ok" if r == n * n else "BAD"))
            out.flush()
            await asyncio.sleep(0.005)
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
asyncio.run(main())
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("pool.log");
    wait_for("the pool", Duration::from_secs(20), || lines_any(&log) > 30);
    lab.fp(&["checkpoint", "-m", lab.m(), "pooled"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/pooled/pool.log"));
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "pooled",
    ]);
    let b1 = lab.branch_dir("b1").join("pool.log");
    wait_for("the branch", Duration::from_secs(20), || {
        lines_any(&b1) > at_cut + 30
    });
    let text = std::fs::read_to_string(&b1).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(
            l,
            format!("{} ok", i + 1),
            "line {} of the branch's pool.log",
            i + 1
        );
    }
}

/// Datagram sockets are made again from their addresses: a UDP server and a client
/// connected to it (the program talks to itself over loopback), and a unix datagram socket
/// connected to a named socket outside the session (as a syslog client is). After a
/// rollback the program carries on, and its datagrams reach the outside socket again.
#[test]
fn datagram_sockets_are_made_again() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let outside = lab.dir.path().join("collector.sock");
    let collector =
        std::os::unix::net::UnixDatagram::bind(&outside).expect("bind the outside socket");
    collector
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // Read everything that arrives, all along (a unix datagram queue holds few).
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = collector.recv(&mut buf) {
                    if let Some(v) = std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(|t| t.parse().ok())
                    {
                        received.lock().expect("lock").push(v);
                    }
                }
            }
        })
    };
    let script = lab.mnt.join("dgram.py");
    std::fs::write(
        &script,
        format!(
            r#"
import os, socket, time
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("127.0.0.1", 0))
cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
cli.connect(srv.getsockname())
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.connect({outside:?})
out = open("dgram.log", "a")
n = 0
while True:
    n += 1
    cli.send(b"%d" % n)
    got = srv.recv(64)
    log.send(b"%d" % n)
    out.write("%d %s\n" % (n, "ok" if got == b"%d" % n else "BAD"))
    out.flush()
    time.sleep(0.005)
"#
        ),
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("dgram.log");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > 30
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "talking"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/talking/dgram.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "talking"]);
    wait_for("the rollback", Duration::from_secs(20), || {
        lines_any(&log) > at_cut + 30
    });
    let text = std::fs::read_to_string(&log).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("{} ok", i + 1), "line {} of dgram.log", i + 1);
    }
    // The restored program's datagrams arrive: the count goes back to the cut (the program
    // went back there), then on past it.
    wait_for(
        "the restored program's datagrams",
        Duration::from_secs(20),
        || {
            let got = received.lock().expect("lock");
            let back = got.windows(2).position(|w| w[1] < w[0]);
            back.is_some_and(|i| {
                got[i + 1] <= at_cut + 2 && got[i + 1..].iter().any(|&v| v > at_cut + 20)
            })
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader");
}

/// no_new_privs, set by the program, is set again by a restore (it was refused, and before
/// that silently dropped, which would let the restored program gain privileges by exec).
#[test]
fn no_new_privs_is_kept() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("nnp.py");
    std::fs::write(
        &script,
        r#"
import ctypes, os, threading, time
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
def nnp(tid):
    for l in open("/proc/self/task/%d/status" % tid):
        if l.startswith("NoNewPrivs:"):
            return l.split()[1]
threading.Thread(target=lambda: time.sleep(10**6), daemon=True).start()
out = open("nnp.log", "a")
while True:
    out.write(" ".join(sorted(nnp(int(t)) for t in os.listdir("/proc/self/task"))) + "\n")
    out.flush()
    time.sleep(0.01)
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("nnp.log");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > 10
    });
    // Every thread keeps it.
    every_line_the_same_across_a_rollback(&lab, "nnp.log", "1 1");
}

/// Capability sets other than the user's default come back: a service running as nobody
/// with CAP_NET_BIND_SERVICE as an ambient capability and CAP_NET_RAW out of its bounding
/// set (`setpriv`, as a unit file's `AmbientCapabilities=` would) is checkpointed (it was
/// refused) and rolled back with the same sets in every thread, still able to bind a low
/// port. So is a program of nobody's with an inheritable capability alone (its restore
/// failed in `capset` until keep-caps covered that case too).
#[test]
fn capability_sets_are_kept() {
    if !can_run() {
        return;
    }
    caps_survive_a_rollback(
        &[
            "--ambient-caps",
            "+net_bind_service",
            "--bounding-set",
            "-net_raw",
        ],
        "0000000000000400 0000000000000400 0000000000000400",
        "bind-ok",
    );
    caps_survive_a_rollback(
        &[],
        "0000000000000400 0000000000000000 0000000000000000",
        "bind-13",
    );
}

/// Runs a Python program as nobody under `setpriv` with `+net_bind_service` inheritable and
/// `extra`, checks its first line has `sets` (CapInh CapPrm CapEff) and ends with `bind`, and
/// that every line after a checkpoint and rollback is the same.
fn caps_survive_a_rollback(extra: &[&str], sets: &str, bind: &str) {
    let lab = Lab::new();
    let dir = lab.mnt.join("caps");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let script = lab.mnt.join("caps.py");
    std::fs::write(
        &script,
        r#"
import os, socket, threading, time
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
def caps(tid):
    want = ("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "Uid:")
    return " ".join(l.split(None, 1)[1].strip() for l in open("/proc/self/task/%d/status" % tid)
                    if l.startswith(want))
def can_bind():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 977))
        return "bind-ok"
    except OSError as e:
        return "bind-" + str(e.errno)
    finally:
        s.close()
threading.Thread(target=lambda: time.sleep(10**6), daemon=True).start()
out = open("caps/caps.log", "a")
while True:
    tasks = sorted(set(caps(int(t)) for t in os.listdir("/proc/self/task")))
    out.write(" | ".join(tasks) + " " + can_bind() + "\n")
    out.flush()
    time.sleep(0.01)
"#,
    )
    .expect("script");
    let mut args = vec![
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        "+net_bind_service",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--",
        // Not a python3 of root's own (a pyenv shim under /root is not nobody's to run).
        "/usr/bin/python3",
        script.to_str().expect("utf8"),
    ]);
    lab.fp(&args);
    let log = dir.join("caps.log");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > 10
    });
    let first = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .next()
        .map(str::to_string)
        .expect("a line");
    assert!(
        first.contains(sets) && first.ends_with(bind) && !first.contains(" | "),
        "the program did not start as set up: {first}"
    );
    every_line_the_same_across_a_rollback(&lab, "caps/caps.log", &first);
}

/// Checkpoints the program writing `log` (relative to the mount) a line at a time, rolls it
/// back, and checks that every line it wrote before and after is `want`.
fn every_line_the_same_across_a_rollback(lab: &Lab, log: &str, want: &str) {
    lab.fp(&["checkpoint", "-m", lab.m(), "cut"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/cut").join(log));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "cut"]);
    let path = lab.mnt.join(log);
    wait_for("the rollback", Duration::from_secs(20), || {
        lines_any(&path) > at_cut + 20
    });
    let text = std::fs::read_to_string(&path).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, want, "line {} of {log}", i + 1);
    }
}

/// A program's own seccomp filter comes back with it: a Python program that denies itself
/// uname(2) (EPERM) keeps that filter, in every thread, across a rollback (it was refused:
/// a restored program would have run outside its sandbox).
#[test]
fn seccomp_filters_are_kept() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("sandboxed.py");
    std::fs::write(
        &script,
        r#"
import ctypes, os, struct, threading, time
for fd in range(3, 1024):
    try: os.close(fd)
    except OSError: pass
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = (ins(0x20, 0, 0, 0)                   # load the system call number
        + ins(0x15, 0, 1, 63)                # uname?
        + ins(0x06, 0, 0, 0x00050000 | 1)    # then fail it with EPERM
        + ins(0x06, 0, 0, 0x7fff0000))       # else allow
buf = ctypes.create_string_buffer(prog, len(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(4, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, filter
def state(tid):
    return " ".join(l.split(None, 1)[1].strip() for l in open("/proc/self/task/%d/status" % tid)
                    if l.startswith(("Seccomp:", "Seccomp_filters:")))
def uname():
    try:
        os.uname()
        return "uname-ok"
    except OSError as e:
        return "uname-" + str(e.errno)
threading.Thread(target=lambda: time.sleep(10**6), daemon=True).start()
out = open("sandbox.log", "a")
while True:
    tasks = sorted(set(state(int(t)) for t in os.listdir("/proc/self/task")))
    out.write(" | ".join(tasks) + " " + uname() + "\n")
    out.flush()
    time.sleep(0.01)
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("sandbox.log");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&log) > 10
    });
    let first = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .next()
        .map(str::to_string)
        .expect("a line");
    assert_eq!(first, "2 1 uname-1", "the program did not start as set up");
    every_line_the_same_across_a_rollback(&lab, "sandbox.log", &first);
}

/// A branch restored side by side is the session's while it runs: mounting it elsewhere is
/// refused, naming the session. Once the session has ended, the branch mounts at once (it
/// was refused until the daemon's next look at its hidden mount) with the files the
/// session left.
#[test]
fn a_branch_mounts_elsewhere_once_its_restored_session_ends() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "w",
        "--",
        "sh",
        "-c",
        "while true; do echo x >> ticks; sleep 0.05; done",
    ]);
    let ticks = lab.mnt.join("ticks");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&ticks) > 3
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    lab.fp(&["restore", "-m", lab.m(), "--detach", "--branch", "b1", "c1"]);
    let on_branch = lab.branch_dir("b1").join("ticks");
    wait_for("the branch's program", Duration::from_secs(20), || {
        lines_any(&on_branch) > lines_any(&lab.mnt.join(".forkpoint/snapshots/c1/ticks")) + 3
    });
    let second = lab.dir.path().join("mnt2");
    std::fs::create_dir(&second).expect("mkdir");
    let (store, at) = (
        lab.store.to_str().expect("utf8"),
        second.to_str().expect("utf8"),
    );
    let err = lab.fp_fails(&["mount", store, at, "--branch", "b1"]);
    assert!(
        err.contains("in use by session b1") && err.contains("end it first"),
        "{err}"
    );
    lab.fp(&["kill", "-m", lab.m(), "--session", "b1"]);
    lab.fp(&["mount", store, at, "--branch", "b1"]);
    assert!(
        lines_any(&second.join("ticks"))
            > lines_any(&lab.mnt.join(".forkpoint/snapshots/c1/ticks")) + 3,
        "the branch shows what its session wrote"
    );
    lab.fp(&["umount", at]);
}

/// A detached program writes to its session's log. Restored into a session of another
/// name (on a branch), it writes to that session's log, and can be checkpointed again (its
/// output is no file outside the mount).
#[test]
fn restored_program_writes_to_its_new_sessions_log() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "talk",
        r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    for (unsigned i = 0;; i++) { printf("tick %u\n", i); fflush(stdout); usleep(10000); }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "talk",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log_of = |s: &str| lab.store.join("sessions").join(s).join("output.log");
    wait_for("output", Duration::from_secs(10), || {
        lines_any(&log_of("talk")) > 5
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "--kill", "k1"]);
    // On a branch, the session takes the branch's name.
    let out = lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "other",
        "k1",
    ]);
    assert!(out.contains("as session other"), "{out}");
    let before = lines_any(&log_of("talk"));
    wait_for("output in the new log", Duration::from_secs(10), || {
        lines_any(&log_of("other")) > 5
    });
    assert_eq!(
        lines_any(&log_of("talk")),
        before,
        "the old log stays as it was"
    );
    let other = lab.branch_dir("other");
    let om = other.to_str().expect("utf8");
    lab.fp(&["checkpoint", "-m", om, "k2"]);
    // Rolled back in the foreground, the program writes to the restoring command's output
    // (the session's log is made anew, and a foreground session has none).
    let mut fg = Command::new(BIN)
        .args(["restore", "-m", om, "k2"])
        .current_dir(&lab.mnt)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("restore in the foreground");
    let stdout = fg.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.starts_with("tick "))
            .take(5)
            .count()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        if fg.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new(BIN)
        .args(["kill", "-m", om])
        .current_dir(&lab.mnt)
        .output();
    let out = fg.wait_with_output().expect("restore ends");
    let ticks = reader.join().expect("reader");
    assert_eq!(
        ticks,
        5,
        "ticks on the restoring command's output; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// POSIX shared memory, named semaphores and a multiprocessing queue between two Python
/// processes, all in the session's own /dev/shm: a shared_memory block (a file there held
/// open), a Lock (a semaphore file unlinked at once and mapped) and an unlinked scratch
/// file held by a descriptor. The host's /dev/shm never sees them; a restore on a branch,
/// side by side with the running program, and a rollback in place both carry on with every
/// invariant intact.
#[test]
fn posix_shared_memory_and_semaphores_live_in_the_sessions_dev_shm() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("shm.py");
    std::fs::write(
        &script,
        r#"
import multiprocessing as mp, os, time
from multiprocessing import shared_memory
NAME = "fp-test-block"

def child(q, lock):
    shm = shared_memory.SharedMemory(name=NAME)
    while True:
        with lock:
            c = int.from_bytes(shm.buf[0:8], "little") + 1
            shm.buf[0:8] = c.to_bytes(8, "little")
        q.put(c)
        time.sleep(0.01)

if __name__ == "__main__":
    for fd in range(3, 1024):
        try: os.close(fd)
        except OSError: pass
    shm = shared_memory.SharedMemory(create=True, size=1 << 20, name=NAME)
    blob = bytes((i * 13 + 5) % 251 for i in range(1 << 16))
    scratch = os.open("/dev/shm/scratch", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(scratch, blob)
    os.unlink("/dev/shm/scratch")
    lock = mp.Lock()
    q = mp.Queue()
    p = mp.Process(target=child, args=(q, lock))
    p.start()
    out = open("progress.txt", "a")
    last = 0
    n = 0
    while True:
        got = q.get()
        n += 1
        with lock:
            c = int.from_bytes(shm.buf[0:8], "little")
        ok = got == last + 1 and c >= got and os.pread(scratch, len(blob), 0) == blob \
            and os.listdir("/dev/shm") == [NAME]
        last = got
        out.write("%d %s\n" % (n, "ok" if ok else "BAD got=%d c=%d %r" % (got, c, os.listdir("/dev/shm"))))
        out.flush()
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let prog = lab.mnt.join("progress.txt");
    wait_for("python", Duration::from_secs(20), || lines_any(&prog) > 30);
    assert!(
        !Path::new("/dev/shm/fp-test-block").exists(),
        "the session's shared memory is not the host's"
    );
    lab.fp(&["checkpoint", "-m", lab.m(), "shm"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/shm/progress.txt"));
    let all_ok = |p: &Path| {
        let text = std::fs::read_to_string(p).expect("progress");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(
                l,
                format!("{} ok", i + 1),
                "line {} of {}",
                i + 1,
                p.display()
            );
        }
    };
    // Side by side: the branch makes the same names in its own /dev/shm.
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "shm",
    ]);
    let b1 = lab.branch_dir("b1").join("progress.txt");
    wait_for("the branch", Duration::from_secs(20), || {
        lines_any(&b1) > at_cut + 30
    });
    all_ok(&b1);
    // The original ran on meanwhile; rolled back, it carries on from the cut.
    lab.fp(&["restore", "-m", lab.m(), "--detach", "shm"]);
    wait_for("python after the rollback", Duration::from_secs(20), || {
        lines_any(&prog) > at_cut + 30
    });
    all_ok(&prog);
    all_ok(&b1);
}

/// A page chunk damaged in the store after the checkpoint: the restore is refused, naming
/// the corrupt object, before any process of the new branch runs; the program it was taken
/// from keeps running.
#[test]
fn corrupt_page_chunk_refuses_the_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "rand",
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    size_t n = 32 << 20;
    unsigned char *m = malloc(n);
    int r = open("/dev/urandom", O_RDONLY);
    for (size_t o = 0; o < n; ) { ssize_t k = read(r, m + o, n - o); if (k <= 0) return 1; o += k; }
    close(r);
    int f = open("alive.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (unsigned i = 0;; i++) { dprintf(f, "%u %u\n", i, m[i % n]); usleep(10000); }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "rand",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("alive.log");
    wait_for("program", Duration::from_secs(20), || lines_any(&log) > 3);
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    // The page chunks are most of the largest segment: damage three of them.
    let seg = std::fs::read_dir(lab.store.join("segments"))
        .expect("segments")
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a segment")
        .path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open segment");
    let len = f.metadata().expect("stat").len();
    assert!(len > 32 << 20, "segment {} holds the memory", seg.display());
    use std::os::unix::fs::FileExt;
    for at in [len / 3, len / 2, len / 3 * 2] {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x55;
        f.write_all_at(&b, at).expect("write");
    }
    drop(f);
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "--branch", "b", "c1"]);
    assert!(err.contains("corrupt"), "names the corrupt object: {err}");
    let ps = lab.fp(&["ps", "-m", lab.m(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ps).expect("ps json");
    let names: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["rand"], "only the original session runs: {ps}");
    // The branch made for the restore is gone again, its mount too: a second try fails the
    // same way, not on a leftover.
    let branches = lab.fp(&["log", "-m", lab.m(), "--json"]);
    assert!(!branches.contains("\"b\""), "branch b is left: {branches}");
    assert!(!lab.branch_dir("b").exists(), "mountpoint of b is left");
    let again = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "--branch", "b", "c1"]);
    assert!(again.contains("corrupt"), "{again}");
    let n = lines_any(&log);
    wait_for("still running", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
}

fn lines_any(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .count()
}

const UNLINKED: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
#define SIZE (200L << 20)
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int f = open("big.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    static unsigned char buf[1 << 20];
    for (long o = 0; o < SIZE; o += sizeof buf) {
        for (long i = 0; i < (long)sizeof buf; i += 8) *(long *)(buf + i) = o + i;
        if (pwrite(f, buf, sizeof buf, o) != sizeof buf) return 1;
    }
    unlink("big.bin");
    int log = open("unlinked.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (long round = 0;; round++) {
        long o = (round * 7919L % 200) << 20;
        if (pread(f, buf, sizeof buf, o) != sizeof buf) { write(log, "SHORT\n", 6); return 2; }
        int ok = 1;
        for (long i = 0; i < (long)sizeof buf; i += 8) if (*(long *)(buf + i) != o + i) ok = 0;
        char line[64];
        int n = snprintf(line, sizeof line, "%ld %s\n", round, ok ? "ok" : "BAD");
        write(log, line, n);
        usleep(20000);
    }
}
"#;

#[test]
fn unlinked_200mib_file_is_reopened_by_inode() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("unlinked", UNLINKED, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("unlinked.log");
    wait_for("unlinked reader", Duration::from_secs(60), || {
        lines_any(&log) > 5
    });
    assert!(!lab.mnt.join("big.bin").exists(), "the file is unlinked");
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "orphan"]);
    // The file is in the snapshot already: the image does not copy it.
    let image: u64 = out
        .split("image ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("image size in output");
    assert!(
        image < 50 << 20,
        "image of {image} bytes must not contain the 200 MiB file"
    );
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/orphan/unlinked.log"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "orphan"]);
    wait_for("reader after restore", Duration::from_secs(30), || {
        lines_any(&log) > at_cut + 10
    });
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "side",
        "orphan",
    ]);
    let side = lab.branch_dir("side").join("unlinked.log");
    wait_for("reader on a branch", Duration::from_secs(30), || {
        lines_any(&side) > at_cut + 10
    });
    for p in [&log, &side] {
        let text = std::fs::read_to_string(p).expect("log");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(l, format!("{i} ok"), "{}: line {i}", p.display());
        }
    }
}

const UNLINKED_PAIR: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
/* One counter kept twice: in a file unlinked at once and in a file with a name. Each step
   reads both back; a rollback that restores one and not the other shows as BAD. */
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int u = open("scratch", O_RDWR | O_CREAT | O_TRUNC, 0644);
    unlink("scratch");
    int v = open("named", O_RDWR | O_CREAT | O_TRUNC, 0644);
    int log = open("pair.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    long zero = 0;
    pwrite(u, &zero, sizeof zero, 0);
    pwrite(v, &zero, sizeof zero, 0);
    for (;;) {
        long a = -1, b = -1;
        pread(u, &a, sizeof a, 0);
        pread(v, &b, sizeof b, 0);
        if (a != b) dprintf(log, "BAD unlinked %ld named %ld\n", a, b);
        else dprintf(log, "%ld ok\n", a);
        a++;
        pwrite(u, &a, sizeof a, 0);
        pwrite(v, &a, sizeof a, 0);
        usleep(20000);
    }
}
"#;

/// An unlinked file is rolled back with the rest, however many times: the kernel kept the
/// inode (its name under `.forkpoint/inodes/` and its pages) from the restore before, so
/// the second rollback read the newer contents.
#[test]
fn unlinked_files_are_rolled_back_at_every_restore() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("pair", UNLINKED_PAIR, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("pair.log");
    wait_for("pair", Duration::from_secs(30), || lines_any(&log) > 5);
    lab.fp(&["checkpoint", "-m", lab.m(), "cut"]);
    for round in 0..3 {
        let before = lines_any(&log);
        wait_for("pair goes on", Duration::from_secs(30), || {
            lines_any(&log) > before + 10
        });
        lab.fp(&["restore", "-m", lab.m(), "--detach", "cut"]);
        let at = lines_any(&log);
        wait_for("pair after restore", Duration::from_secs(30), || {
            lines_any(&log) > at + 10
        });
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(
            !text.contains("BAD"),
            "restore {round}: the unlinked file was not rolled back:\n{text}"
        );
    }
}

/// A program whose working directory was deleted is restored in a deleted directory of
/// its own (it failed: "chdir …(deleted): ENOENT", and the rollback left nothing running).
#[test]
fn a_program_in_a_deleted_directory_is_restored() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    // The log is written by absolute path: the directory has no name to go up from.
    let log = lab.mnt.join("cwd.log");
    let body = format!(
        "mkdir -p d && cd d && rmdir ../d && i=0 && while true; do i=$((i+1)); \
         echo \"$i $(ls -a | wc -l) $(test -e ../d && echo named || echo gone)\" >> {}; \
         sleep 0.05; done",
        log.display()
    );
    lab.run_writing("cwd", &["sh", "-c", &body], "cwd.log");
    lab.fp(&["checkpoint", "-m", lab.m(), "in-deleted"]);
    let check = |log: &Path, at: usize| {
        wait_for("the program after restore", Duration::from_secs(30), || {
            lines_any(log) > at + 5
        });
        let text = std::fs::read_to_string(log).expect("log");
        // The directory reads the same after the restore as before, and has no name.
        let tail = |l: &str| l.split_once(' ').map(|(_, t)| t.to_string());
        let first = text.lines().next().and_then(tail);
        for l in text.lines() {
            assert!(l.ends_with(" gone") && tail(l) == first, "{l:?} in\n{text}");
        }
    };
    lab.fp(&["restore", "-m", lab.m(), "--detach", "in-deleted"]);
    check(&log, lines_any(&log));
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "side",
        "in-deleted",
    ]);
    let side = lab.branch_dir("side").join("cwd.log");
    check(&side, lines_any(&side));
    // Nothing made for the restore is left in the files.
    let names: Vec<String> = std::fs::read_dir(&lab.mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("forkpoint-cwd")),
        "{names:?}"
    );
}

const PIPELINE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/wait.h>
/* producer | consumer: numbered lines through a pipe; the consumer checks each one. */
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int p[2];
    if (pipe(p)) return 1;
    if (fork() == 0) {
        close(p[0]);
        FILE *out = fdopen(p[1], "w");
        for (long n = 1;; n++) { fprintf(out, "%ld\n", n); if (n % 64 == 0) { fflush(out); usleep(2000); } }
    }
    if (fork() == 0) {
        close(p[1]);
        FILE *in = fdopen(p[0], "r");
        int log = open("pipeline.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
        long want = 1, n;
        while (fscanf(in, "%ld", &n) == 1) {
            if (n != want) { dprintf(log, "BAD want %ld got %ld\n", want, n); return 1; }
            if (n % 1000 == 0) dprintf(log, "%ld\n", n);
            want++;
        }
        return 0;
    }
    close(p[0]);
    close(p[1]);
    int st;
    while (wait(&st) > 0) {}
    return 0;
}
"#;

#[test]
fn producer_consumer_pipe_with_data_in_flight() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc("pipeline", PIPELINE, &[]);
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("pipeline.log");
    wait_for("pipeline", Duration::from_secs(20), || {
        lines(&log).len() > 5
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "pipe"]);
    let at_cut = lines(&lab.mnt.join(".forkpoint/snapshots/pipe/pipeline.log")).len();
    lab.fp(&["restore", "-m", lab.m(), "--detach", "pipe"]);
    wait_for("pipeline after restore", Duration::from_secs(20), || {
        lines(&log).len() > at_cut + 5
    });
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "p2",
        "pipe",
    ]);
    let side = lab.branch_dir("p2").join("pipeline.log");
    wait_for("pipeline on a branch", Duration::from_secs(20), || {
        lines(&side).len() > at_cut + 5
    });
    for p in [&log, &side] {
        let text = std::fs::read_to_string(p).expect("log");
        assert!(!text.contains("BAD"), "{}: {text}", p.display());
        let v = lines(p);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i as i64 + 1) * 1000, "{}: line {}", p.display(), i + 1);
        }
    }
}

/// SysV IPC in the session's namespace: a counter kept in a shared memory segment (with a
/// child attached too), a segment removed while attached, a semaphore set and a queue with
/// messages waiting. Rolled back, the counter goes on from the cut (every line of the log is
/// the previous plus one), and the objects come back with their ids and contents.
#[test]
fn sysv_ipc_objects_are_checkpointed_and_restored() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "ipc",
        r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    /* Ids that a fresh namespace would not hand out first. */
    for (int i = 0; i < 3; i++) {
        shmctl(shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600), IPC_RMID, 0);
        semctl(semget(IPC_PRIVATE, 1, IPC_CREAT | 0600), 0, IPC_RMID);
        msgctl(msgget(IPC_PRIVATE, IPC_CREAT | 0600), IPC_RMID, 0);
    }
    size_t size = 3 * 4096 + 100;
    int id = shmget(0x5eed, size, IPC_CREAT | 0640);
    unsigned char *p = shmat(id, 0, 0);
    for (size_t i = 0; i < size; i++) p[i] = (unsigned char)(i * 13 + 1);
    volatile unsigned long *n = (unsigned long *)(p + 8192);
    *n = 0;
    int gone = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    unsigned char *g = shmat(gone, 0, SHM_RDONLY);
    shmctl(gone, IPC_RMID, 0);
    int sem = semget(0x5e3, 3, IPC_CREAT | 0600);
    unsigned short vals[3] = {1, 5, 9};
    semctl(sem, 0, SETALL, vals);
    int q = msgget(0x3e55, IPC_CREAT | 0600);
    const char *texts[3] = {"one", "two", "three"};
    for (long t = 1; t <= 3; t++) {
        struct { long t; char m[16]; } msg = {t, {0}};
        strcpy(msg.m, texts[t - 1]);
        msgsnd(q, &msg, strlen(msg.m), 0);
    }
    char ids[64];
    snprintf(ids, sizeof ids, "%d %d %d %d", id, gone, sem, q);
    if (fork() == 0) { for (;;) { usleep(20000); } }  /* a second process attached */
    for (;;) {
        (*n)++;
        FILE *f = fopen("count.log", "a"); fprintf(f, "%lu\n", *n); fclose(f);
        if (access("check", F_OK) == 0) {
            int ok = 1;
            for (size_t i = 0; i < size; i++)
                if (i < 8192 || i >= 8200) ok &= p[i] == (unsigned char)(i * 13 + 1);
            unsigned short v[3] = {0};
            semctl(sem, 0, GETALL, v);
            ok &= v[0] == 1 && v[1] == 5 && v[2] == 9;
            char got[64] = "";
            for (int k = 0; k < 3; k++) {
                struct { long t; char m[16]; } msg;
                memset(&msg, 0, sizeof msg);
                ssize_t r = msgrcv(q, &msg, sizeof msg.m, 0, IPC_NOWAIT);
                char one[32];
                snprintf(one, sizeof one, "%ld:%s,", msg.t, r > 0 ? msg.m : "?");
                strcat(got, one);
            }
            struct shmid_ds ds;
            shmctl(id, IPC_STAT, &ds);
            char now[64];
            snprintf(now, sizeof now, "%d %d %d %d", shmget(0x5eed, 0, 0), gone, semget(0x5e3, 0, 0), msgget(0x3e55, 0));
            f = fopen("report.txt", "w");
            fprintf(f, "%d %s %s %s %o %lu %d\n", ok, got, ids, now, ds.shm_perm.mode & 0777,
                    (unsigned long)ds.shm_nattch, g[5] == (unsigned char)0);
            fclose(f);
            unlink("check");
        }
        usleep(10000);
    }
}
"#,
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("count.log");
    wait_for("ipc program", Duration::from_secs(10), || {
        lines_any(&log) > 20
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "ipc"]);
    let at_cut = lines_any(&lab.mnt.join(".forkpoint/snapshots/ipc/count.log"));
    wait_for("more lines", Duration::from_secs(10), || {
        lines_any(&log) > at_cut + 20
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "ipc"]);
    wait_for("ipc program after restore", Duration::from_secs(10), || {
        lines_any(&log) > at_cut + 20
    });
    let text = std::fs::read_to_string(&log).expect("log");
    for (i, l) in text.lines().enumerate() {
        assert_eq!(
            l,
            (i + 1).to_string(),
            "line {} of the counter kept in SysV shared memory",
            i + 1
        );
    }
    std::fs::write(lab.mnt.join("check"), "").expect("check");
    let report = lab.mnt.join("report.txt");
    wait_for("report", Duration::from_secs(10), || {
        std::fs::read_to_string(&report).is_ok_and(|s| s.ends_with('\n'))
    });
    let r = std::fs::read_to_string(&report).expect("report");
    let f: Vec<&str> = r.split_whitespace().collect();
    assert_eq!(f[0], "1", "segment contents and semaphore values: {r}");
    assert_eq!(f[1], "1:one,2:two,3:three,", "queued messages: {r}");
    // Ids as created, found again by key (the removed segment has no key).
    assert_eq!([f[2], f[4], f[5]], [f[6], f[8], f[9]], "ids: {r}");
    eprintln!("report after the restore: {r}");
    assert_eq!(f[10], "640", "mode: {r}");
    assert_eq!(f[11], "2", "both processes attached again: {r}");
}

/// Kills the client processes (`forkpoint run`/`restore` without `--detach`) it holds.
struct Clients(Vec<std::process::Child>);

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; the other pointers may be
    // null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [m, s] {
        // Not inherited by the programs started on the terminal (only as their stdio).
        // SAFETY: fcntl on descriptors we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both were just opened by openpty and belong to nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(s),
        )
    }
}

/// Starts `forkpoint ARGS` with a terminal as its stdio, in a session of its own (as a shell
/// would), and returns it with the terminal's master side.
fn on_terminal(lab: &Lab, args: &[&str]) -> (std::process::Child, std::os::fd::OwnedFd) {
    use std::os::unix::process::CommandExt;
    let (m, s) = pty();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(&lab.mnt)
        .stdin(s.try_clone().expect("dup"))
        .stdout(s.try_clone().expect("dup"))
        .stderr(s);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    (cmd.spawn().expect("start forkpoint"), m)
}

/// Everything the terminal shows within `d`.
fn screen(m: &std::os::fd::OwnedFd, d: Duration) -> String {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let end = Instant::now() + d;
    while Instant::now() < end {
        let mut p = libc::pollfd {
            fd: m.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        let mut b = [0u8; 4096];
        // SAFETY: reads into a local buffer of its size.
        let n = unsafe { libc::read(m.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&b[..n as usize]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ticks(s: &str) -> Vec<u64> {
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// The workflow without `--detach`: a program on the user's terminal is checkpointed (its
/// terminal descriptors are not refused) and, restored from another terminal, continues there.
#[test]
fn program_on_a_terminal_is_checkpointed_and_restored_on_the_new_one() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let exe = lab.cc(
        "ticker",
        r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (unsigned long n = 0;; n++) { printf("tick %lu\n", n); fflush(stdout); usleep(20000); }
}
"#,
        &[],
    );
    let exe = exe.to_str().expect("utf8");
    let mut clients = Clients(Vec::new());
    let (run, m1) = on_terminal(&lab, &["run", "-m", lab.m(), "--name", "t", "--", exe]);
    clients.0.push(run);
    let seen = screen(&m1, Duration::from_millis(600));
    assert!(ticks(&seen).len() > 5, "program output: {seen:?}");
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "on-tty"]);
    assert!(out.contains("downtime"), "{out}");
    let at_cut = ticks(&screen(&m1, Duration::from_millis(200)))
        .into_iter()
        .chain(ticks(&seen))
        .max()
        .unwrap_or(0);
    // Restore in place from a second terminal: the program goes on there, from the cut.
    let (restore, m2) = on_terminal(&lab, &["restore", "-m", lab.m(), "on-tty"]);
    clients.0.push(restore);
    let there = screen(&m2, Duration::from_secs(2));
    let t = ticks(&there);
    let first = *t
        .first()
        .unwrap_or_else(|| panic!("nothing on the new terminal: {there:?}"));
    assert!(
        first <= at_cut + 3 && t.len() > 10,
        "continues from about {at_cut}: {there:?}"
    );
    // The old terminal is quiet: its program was replaced.
    let old = screen(&m1, Duration::from_millis(300));
    assert!(
        ticks(&old).len() <= 1,
        "old terminal still running: {old:?}"
    );
}

/// A file outside the mount open for writing is not rolled back by a restore: the checkpoint
/// is refused, naming it, until the user allows it to move forward.
#[test]
fn writes_outside_the_mount_are_refused_unless_allowed() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let outside = lab.dir.path().join("outside.log");
    let exe = lab.cc(
        "outside",
        &format!(
            r#"
#include <fcntl.h>
#include <unistd.h>
int main(void) {{
    int f = open("{}", O_WRONLY | O_CREAT | O_APPEND, 0644);
    int g = open("alive.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (;;) {{ write(f, "o\n", 2); write(g, "x\n", 2); usleep(10000); }}
}}
"#,
            outside.display()
        ),
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("alive.log");
    wait_for("program", Duration::from_secs(10), || lines_any(&log) > 5);
    let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), "refused"]);
    let out = outside.to_str().expect("utf8");
    assert!(
        err.contains("fd 3") && err.contains(out) && err.contains("--allow-outside"),
        "names the file and the way out: {err}"
    );
    let n = lines_any(&log);
    wait_for("still running", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
    let ok = lab.fp(&[
        "checkpoint",
        "-m",
        lab.m(),
        "--allow-outside",
        out,
        "allowed",
    ]);
    assert!(ok.contains("downtime"), "{ok}");
}

/// Names can be taken off snapshots and checkpoints (`git tag -d`) and branches deleted, so
/// that gc reclaims what only they kept. A delta's base stays while the delta is named; a
/// session whose last image is gone checkpoints whole at once; forget is all or nothing.
#[test]
fn forgotten_checkpoints_and_deleted_branches_are_reclaimed() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = lab.mnt.join("memw.py");
    std::fs::write(
        &script,
        r#"
import os, time
blob = bytearray(os.urandom(16 << 20))
n = 0
while True:
    n += 1
    for i in range(0, 1 << 20, 4096):
        blob[(n * 7919 * 4096 + i) % len(blob)] = n % 256
    with open("tick", "a") as f:
        f.write("%d %d\n" % (n, sum(blob[::65536])))
    time.sleep(0.02)
"#,
    )
    .expect("script");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--",
        "python3",
        script.to_str().expect("utf8"),
    ]);
    let tick = lab.mnt.join("tick");
    let count = || lines_any(&tick);
    wait_for("the program", Duration::from_secs(20), || count() > 5);
    for c in ["c1", "c2", "c3"] {
        let n = count();
        wait_for("the program", Duration::from_secs(20), || count() > n + 3);
        lab.fp(&["checkpoint", "-m", lab.m(), c]);
    }
    let err = lab.fp_fails(&["forget", "-m", lab.m(), "c1", "nope"]);
    assert!(err.contains("nope"), "{err}");
    assert!(
        lab.fp(&["log", "-m", lab.m()]).contains("'c1'"),
        "all or nothing"
    );
    lab.fp(&["forget", "-m", lab.m(), "c1", "c2"]);
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(
        !log.contains("'c1'") && !log.contains("'c2'") && log.contains("'c3'"),
        "{log}"
    );
    lab.fp(&["gc"]);
    // c3 is a delta over c2 over c1: their images stay while it is named.
    let at_c3 = lines_any(&lab.mnt.join(".forkpoint/snapshots/c3/tick"));
    lab.fp(&["restore", "-m", lab.m(), "--branch", "b3", "--detach", "c3"]);
    let b3 = lab.branch_dir("b3").join("tick");
    wait_for("c3 restored", Duration::from_secs(20), || {
        lines_any(&b3) > at_c3 + 5
    });
    lab.fp(&[
        "checkpoint",
        "-m",
        lab.m(),
        "--session",
        "b3",
        "--kill",
        "b3-end",
    ]);
    // The running session's last image goes: its next checkpoint is whole, at once.
    lab.fp(&["forget", "-m", lab.m(), "c3"]);
    lab.fp(&["gc"]);
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "c4"]);
    assert!(!out.contains("as a delta"), "{out}");
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "c5"]);
    assert!(out.contains("as a delta, 1 deep"), "{out}");
    // Branches: a mounted one is refused, another one goes.
    let err = lab.fp_fails(&["branch", "-m", lab.m(), "-d", "main"]);
    assert!(err.contains("mounted"), "{err}");
    wait_for("b3's mount released", Duration::from_secs(10), || {
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains("/branches/b3 ")
    });
    lab.fp(&["branch", "-m", lab.m(), "-d", "b3"]);
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(
        !log.contains("branch b3 ") && log.contains("'b3-end'"),
        "b3 is deleted, its named checkpoint stays: {log}"
    );
    let v = lab.fp(&["verify"]);
    assert!(v.contains("verified"), "{v}");
    // What is left restores exactly.
    let at_c5 = lines_any(&lab.mnt.join(".forkpoint/snapshots/c5/tick"));
    lab.fp(&["restore", "-m", lab.m(), "--detach", "c5"]);
    wait_for("c5 restored", Duration::from_secs(20), || {
        count() > at_c5 + 5
    });
    let text = std::fs::read_to_string(&tick).expect("tick");
    let ns: Vec<i64> = text
        .lines()
        .map(|l| l.split(' ').next().and_then(|n| n.parse().ok()).expect("n"))
        .collect();
    assert_eq!(
        ns,
        (1..=ns.len() as i64).collect::<Vec<_>>(),
        "one run, no gap"
    );
    // The rollback kept an automatic checkpoint; a pattern takes every one.
    assert!(lab.fp(&["log", "-m", lab.m()]).contains("'auto-"));
    let out = lab.fp(&["forget", "-m", lab.m(), "auto-*"]);
    assert!(out.contains("forgot 'auto-"), "{out}");
    assert!(!lab.fp(&["log", "-m", lab.m()]).contains("'auto-"));
    let err = lab.fp_fails(&["forget", "-m", lab.m(), "auto-*"]);
    assert!(
        err.contains("auto-*"),
        "a pattern that matches nothing: {err}"
    );
}

/// A file outside the mount written through a shared mapping, without any descriptor (a
/// JVM's `hsperfdata`): the checkpoint is refused, naming the mapping, until allowed; once
/// allowed, the restore lets it move forward. A file outside that the program only maps and
/// that changed since the checkpoint fails a rollback before the running program is
/// stopped: it keeps running and no automatic checkpoint is made.
#[test]
fn shared_mappings_outside_the_mount_and_changed_files_are_checked_before_anything_stops() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let perf = lab.dir.path().join("perfdata");
    let conf = lab.dir.path().join("conf");
    std::fs::write(&conf, vec![b'c'; 4096]).expect("conf");
    let exe = lab.cc(
        "mapper",
        &format!(
            r#"
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void) {{
    int p = open("{}", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (ftruncate(p, 4096)) return 1;
    volatile long *perf = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, p, 0);
    close(p);
    int c = open("{}", O_RDONLY);
    const char *conf = mmap(0, 4096, PROT_READ, MAP_SHARED, c, 0);
    close(c);
    if (perf == MAP_FAILED || conf == MAP_FAILED) return 2;
    for (long i = 1;; i++) {{
        perf[0] = i;
        FILE *f = fopen("alive.log", "a");
        fprintf(f, "%ld %c\n", i, conf[0]);
        fclose(f);
        usleep(10000);
    }}
}}
"#,
            perf.display(),
            conf.display()
        ),
        &[],
    );
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--name",
        "mapper",
        "--detach",
        "--",
        exe.to_str().expect("utf8"),
    ]);
    let log = lab.mnt.join("alive.log");
    wait_for("program", Duration::from_secs(10), || lines_any(&log) > 5);
    let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), "refused"]);
    let p = perf.to_str().expect("utf8");
    assert!(
        err.contains("mapping") && err.contains(p) && err.contains("--allow-outside"),
        "names the mapping and the way out: {err}"
    );
    lab.fp(&["checkpoint", "-m", lab.m(), "--allow-outside", p, "allowed"]);
    // The program went on writing the shared file: that is what was allowed.
    let n = lines_any(&log);
    wait_for("still running", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
    lab.fp(&["restore", "-m", lab.m(), "--detach", "allowed"]);
    let (pid, _) = lab.session_pid("mapper");
    let n = lines_any(&log);
    wait_for("restored program", Duration::from_secs(10), || {
        lines_any(&log) > n + 5
    });
    // The file it only maps changes: a rollback is refused before it stops anything.
    std::fs::write(&conf, vec![b'd'; 4096]).expect("conf");
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "allowed"]);
    let c = conf.to_str().expect("utf8");
    assert!(
        err.contains(c) && err.contains("changed since the dump") && err.contains("nothing"),
        "names the changed file: {err}"
    );
    assert_eq!(
        lab.session_pid("mapper").0,
        pid,
        "the session was not replaced"
    );
    let n = lines_any(&log);
    wait_for(
        "still running after the refusal",
        Duration::from_secs(10),
        || lines_any(&log) > n + 5,
    );
    let listing = lab.fp(&["log", "-m", lab.m()]);
    assert_eq!(
        listing.matches("'auto-").count(),
        1,
        "only the first rollback's automatic checkpoint: {listing}"
    );
}

/// A rollback of a mount that two sessions run on keeps the state of both, each under an
/// automatic checkpoint of its own (before, the second one's name clashed, and it was
/// killed with only its files kept).
#[test]
fn a_rollback_keeps_every_session_on_the_mount() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    for s in ["a", "b"] {
        let script = format!("while :; do echo {s} >> {s}.log; sleep 0.05; done");
        lab.fp(&[
            "run",
            "-m",
            lab.m(),
            "--name",
            s,
            "--detach",
            "--",
            "sh",
            "-c",
            &script,
        ]);
    }
    for s in ["a", "b"] {
        let log = lab.mnt.join(format!("{s}.log"));
        wait_for("both running", Duration::from_secs(10), || {
            lines_any(&log) > 3
        });
    }
    lab.fp(&["checkpoint", "-m", lab.m(), "--session", "a", "one"]);
    let out = Command::new(BIN)
        .args(["restore", "-m", lab.m(), "--detach", "one"])
        .current_dir(&lab.mnt)
        .output()
        .expect("run forkpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("could not checkpoint"), "{err}");
    let listing = lab.fp(&["log", "-m", lab.m()]);
    let autos: Vec<&str> = listing.lines().filter(|l| l.contains("'auto-")).collect();
    assert_eq!(
        autos.len(),
        2,
        "one automatic checkpoint per session: {listing}"
    );
    assert!(
        autos.iter().all(|l| l.contains(" auto ")),
        "both hold processes: {listing}"
    );
}

/// A rollback whose restore fails late (the checkpoint's port is taken by then) starts the
/// program it stopped again, from the automatic checkpoint it made: nothing is lost, and
/// the program goes on from where it was.
/// A Python program (session "srv") that listens on a port and counts into n.log,
/// checkpointed as "listening"; then it lets the port go and this test takes it, so that a
/// restore of "listening" fails (the address is in use). Returns the log and the taken port.
fn listening_program_checkpointed(lab: &Lab) -> (PathBuf, std::net::TcpListener) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let prog = format!(
        "import os, socket, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {port}))\n\
         s.listen()\n\
         n = 0\n\
         while True:\n\
         \x20   n += 1\n\
         \x20   with open('n.log', 'a') as f: f.write('%d\\n' % n)\n\
         \x20   if s is not None and os.path.exists('close'):\n\
         \x20       s.close()\n\
         \x20       s = None\n\
         \x20   time.sleep(0.02)\n"
    );
    std::fs::write(lab.mnt.join("srv.py"), prog).expect("write");
    let log = lab.run_writing("srv", &["python3", "srv.py"], "n.log");
    lab.fp(&["checkpoint", "-m", lab.m(), "listening"]);
    // The program lets the port go, and someone else takes it.
    std::fs::write(lab.mnt.join("close"), "").expect("write");
    let taken = (0..500)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::net::TcpListener::bind(("127.0.0.1", port)).ok()
        })
        .expect("the port is free again");
    (log, taken)
}

#[test]
fn a_failed_rollback_brings_the_stopped_program_back() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let (log, taken) = listening_program_checkpointed(&lab);
    let before = lines(&log);
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "listening"]);
    assert!(
        err.contains("is in use") && err.contains("running again"),
        "{err}"
    );
    // The program runs on from where the rollback stopped it, with its own files.
    let at = lines(&log).len();
    wait_for("the program again", Duration::from_secs(20), || {
        lines(&log).len() > at + 5
    });
    let after = lines(&log);
    assert!(
        after.len() > before.len(),
        "{} {}",
        after.len(),
        before.len()
    );
    assert_sequence(&after);
    assert!(lab.mnt.join("close").exists(), "its files are the latest");
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("srv ") && l.contains("running")),
        "under its own name: {ps}"
    );
    drop(taken);
}

/// The state (`/proc/PID/stat` field 3) of every process of session `name`'s program: the
/// processes under its init (from the session's info), but for init's own.
fn program_states(lab: &Lab, name: &str) -> Vec<char> {
    let info = std::fs::read_to_string(lab.store.join("sessions").join(name).join("info.json"))
        .expect("session info");
    let v: serde_json::Value = serde_json::from_str(&info).expect("info json");
    let init = v["pid"].as_i64().expect("pid") as i32;
    let children = |pid: i32| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut todo = children(init);
    let mut states = Vec::new();
    while let Some(p) = todo.pop() {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Not the session's own init processes.
        if !stat.contains("(forkpoint)") {
            if let Some(s) = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.trim().chars().next())
            {
                states.push(s);
            }
        }
        todo.extend(children(p));
    }
    states
}

#[test]
fn a_checkpoint_that_fails_after_the_dump_lets_the_program_go_on() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    // A parent and a child, each writing its own count.
    let prog = "import os, time\n\
                tag = 'child' if os.fork() == 0 else 'parent'\n\
                n = 0\n\
                while True:\n\
                \x20   n += 1\n\
                \x20   with open(tag + '.log', 'a') as f: f.write('%d\\n' % n)\n\
                \x20   time.sleep(0.02)\n";
    std::fs::write(lab.mnt.join("two.py"), prog).expect("write");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "two",
        "--",
        "python3",
        "two.py",
    ]);
    let logs = [lab.mnt.join("parent.log"), lab.mnt.join("child.log")];
    let both_go_on = |what: &str| {
        let at: Vec<usize> = logs.iter().map(|l| lines(l).len()).collect();
        wait_for(what, Duration::from_secs(20), || {
            logs.iter().zip(&at).all(|(l, a)| lines(l).len() > a + 3)
        });
        let states = program_states(&lab, "two");
        assert_eq!(states.len(), 2, "{what}: {states:?}");
        assert!(!states.contains(&'T'), "{what}: stopped: {states:?}");
    };
    both_go_on("the program");
    // The hand-off's files (checkpoint.pages, .ids, .tmp) go, whatever the outcome.
    let no_hand_off_files = |what: &str| {
        let left = lab.hand_off_files("two");
        assert!(left.is_empty(), "{what}: {left:?}");
    };
    lab.fp(&["checkpoint", "-m", lab.m(), "first"]);
    no_hand_off_files("after a checkpoint");
    lab.fp(&["checkpoint", "-m", lab.m(), "first-again"]);
    no_hand_off_files("after a checkpoint with nothing new");
    // A name in use is refused before the program is touched.
    for after in ["--kill", "--stop"] {
        let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), after, "first"]);
        assert!(err.contains("first"), "{err}");
        both_go_on(&format!("after checkpoint {after} of a name in use"));
    }
    // A failure after the dump (here the page list cannot be written).
    let list = lab.store.join("sessions/two/checkpoint.pages");
    std::fs::create_dir(&list).expect("mkdir");
    for after in ["--kill", "--stop"] {
        let err = lab.fp_fails(&["checkpoint", "-m", lab.m(), after, "second"]);
        assert!(err.contains("page list"), "{err}");
        both_go_on(&format!("after a failed checkpoint {after}"));
    }
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(!log.contains("second"), "{log}");
    // Once it can be written, --stop stops both, and --kill ends the session.
    std::fs::remove_dir(&list).expect("rmdir");
    no_hand_off_files("after failed checkpoints");
    lab.fp(&["checkpoint", "-m", lab.m(), "--stop", "second"]);
    let states = program_states(&lab, "two");
    assert!(
        states.len() == 2 && states.iter().all(|s| *s == 'T'),
        "{states:?}"
    );
    lab.fp(&["checkpoint", "-m", lab.m(), "--kill", "third"]);
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(!ps.contains("two "), "{ps}");
}

#[test]
fn a_failed_restore_in_the_foreground_is_undone_too() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let (log, taken) = listening_program_checkpointed(&lab);
    // On a new branch, in the foreground: the branch goes again.
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--branch", "b1", "listening"]);
    assert!(err.contains("is in use"), "{err}");
    let branches = lab.fp(&["log", "-m", lab.m()]);
    assert!(!branches.contains("b1"), "{branches}");
    // In place, in the foreground: the program runs on from where the rollback stopped it.
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "listening"]);
    assert!(err.contains("running again"), "{err}");
    let at = lines(&log).len();
    wait_for("the program again", Duration::from_secs(20), || {
        lines(&log).len() > at + 5
    });
    // With the port free, the same branch name can be restored.
    drop(taken);
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "b1",
        "listening",
    ]);
}

/// The files of a checkpoint damaged in the store: a rollback to it is refused before the
/// running program is stopped (it would have been killed, its files not brought back).
#[test]
fn a_rollback_to_damaged_files_is_refused_before_anything_stops() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    std::fs::write(lab.mnt.join("data"), "checkpointed\n").expect("write");
    // It writes nothing once started: no commit comes after the checkpoint.
    let prog = "import time\nwhile True:\n    time.sleep(0.01)\n";
    std::fs::write(lab.mnt.join("idle.py"), prog).expect("write");
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "idle",
        "--",
        "python3",
        "idle.py",
    ]);
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    let (init, main) = lab.session_pid("idle");
    // Flip the last byte of the checkpoint's root record in its segment.
    let loc = {
        let store = forkpoint_fs::store::Store::open_read_only(&lab.store).expect("open store");
        let cp = store.find("c1").expect("c1");
        store.locate(&cp.root).expect("the root is in the store")
    };
    let seg = lab
        .store
        .join("segments")
        .join(format!("{:016}.seg", loc.segment));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open segment");
    use std::os::unix::fs::FileExt;
    let at = loc.offset + forkpoint_fs::segment::RECORD_HEADER_LEN + u64::from(loc.len) - 1;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x55;
    f.write_all_at(&b, at).expect("write");
    drop(f);
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "c1"]);
    assert!(
        err.contains("cannot be read")
            && err.contains("nothing was changed")
            && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        lab.session_pid("idle"),
        (init, main),
        "the same program runs"
    );
    assert!(!pid_state_is_gone(main), "it runs on");
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(!log.contains("auto-"), "no automatic checkpoint: {log}");
}

fn pid_state_is_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z") || s.contains(") X"))
        .unwrap_or(true)
}

/// Most pages written since the last checkpoint (no delta), the rest taken unchanged from
/// its image, whose checkpoint was forgotten and collected: the checkpoint is taken whole.
#[test]
fn pages_of_a_collected_image_are_read_again() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let script = r#"
import os, time
blob = bytearray(os.urandom(32 << 20))
n = 0
while True:
    n += 1
    if os.path.exists("churn") and not os.path.exists("churned"):
        for i in range(0, 30 << 20, 4096):
            blob[i] ^= 0xff
        open("churned", "w").close()
    with open("tick", "a") as f:
        f.write("%d %d\n" % (n, sum(blob[::4096])))
    time.sleep(0.02)
"#;
    std::fs::write(lab.mnt.join("churn.py"), script).expect("script");
    lab.run_writing("churn", &["python3", "churn.py"], "tick");
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    lab.fp(&["forget", "-m", lab.m(), "c1"]);
    lab.fp(&["gc"]);
    std::fs::write(lab.mnt.join("churn"), "").expect("write");
    wait_for("the pages written", Duration::from_secs(20), || {
        lab.mnt.join("churned").exists()
    });
    let out = lab.fp(&["checkpoint", "-m", lab.m(), "c2"]);
    assert!(!out.contains("as a delta"), "{out}");
    // And it restores, with the program's own check of its memory going on.
    lab.fp(&["restore", "-m", lab.m(), "--detach", "--branch", "b2", "c2"]);
    let b2 = lab.branch_dir("b2").join("tick");
    let at = lines_any(&b2);
    wait_for("c2 restored", Duration::from_secs(20), || {
        lines_any(&b2) > at + 3
    });
}

/// Sessions started at the same moment without names each get a name of their own; one
/// started by name while another command starts it is refused, not taken over.
#[test]
fn sessions_started_at_once_get_names_of_their_own() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let start = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(&lab.mnt)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start forkpoint")
    };
    let children: Vec<_> = (0..4)
        .map(|_| start(&["run", "-m", lab.m(), "--detach", "--", "sleep", "1000"]))
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ps = lab.fp(&["ps", "-m", lab.m(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ps).expect("ps json");
    let mut names: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["s1", "s2", "s3", "s4"], "{ps}");
    // Two commands starting the same name: one runs it, the other is told.
    let children: Vec<_> = (0..2)
        .map(|_| {
            start(&[
                "run",
                "-m",
                lab.m(),
                "--detach",
                "--name",
                "w",
                "--",
                "sleep",
                "1000",
            ])
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one starts it");
    let err = outs
        .iter()
        .find(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    assert!(
        err.contains("session 'w' is already running") || err.contains("is being started"),
        "{err}"
    );
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert_eq!(
        ps.lines().filter(|l| l.starts_with("w ")).count(),
        1,
        "{ps}"
    );
}

/// A file outside the mount that the program only holds open (read) must be unchanged at a
/// restore, as a mapped one: a restore after it changed, or went, is refused before the
/// running program is stopped; one allowed at the checkpoint may move on.
#[test]
fn files_outside_the_mount_held_open_must_be_unchanged() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let outside = lab.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let ext = outside.join("ext.txt");
    std::fs::write(&ext, "v1\n").expect("write");
    let script = format!(
        "exec 3<{}\nwhile :; do echo x >> ticks; sleep 0.02; done\n",
        ext.display()
    );
    std::fs::write(lab.mnt.join("reader.sh"), script).expect("write");
    lab.run_writing("r", &["bash", "reader.sh"], "ticks");
    lab.fp(&["checkpoint", "-m", lab.m(), "r1"]);
    let (init, main) = lab.session_pid("r");
    // Unchanged: it restores.
    lab.fp(&[
        "restore",
        "-m",
        lab.m(),
        "--detach",
        "--branch",
        "same",
        "r1",
    ]);
    std::fs::write(&ext, "v2 changed\n").expect("write");
    for args in [&["--branch", "b"][..], &[][..]] {
        let mut a = vec!["restore", "-m", lab.m(), "--detach"];
        a.extend_from_slice(args);
        a.push("r1");
        let err = lab.fp_fails(&a);
        assert!(
            err.contains("ext.txt") && err.contains("nothing was changed"),
            "{err}"
        );
    }
    std::fs::rename(&ext, outside.join("moved")).expect("rename");
    let err = lab.fp_fails(&["restore", "-m", lab.m(), "--detach", "r1"]);
    assert!(err.contains("ext.txt"), "{err}");
    assert_eq!(
        lab.session_pid("r"),
        (init, main),
        "the program was not stopped"
    );
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(!log.contains("auto-"), "{log}");
    // Allowed to move on: not checked.
    std::fs::write(&ext, "v3\n").expect("write");
    let allow = outside.to_str().expect("utf8");
    lab.fp(&["checkpoint", "-m", lab.m(), "--allow-outside", allow, "r2"]);
    std::fs::write(&ext, "v4\n").expect("write");
    lab.fp(&["restore", "-m", lab.m(), "--detach", "--branch", "b2", "r2"]);
}

/// A program that cannot be run fails `run` with the reason, also with `--detach`.
#[test]
fn a_program_that_cannot_run_fails_the_start() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    for detach in [true, false] {
        let mut args = vec!["run", "-m", lab.m()];
        if detach {
            args.push("--detach");
        }
        args.extend(["--", "/no/such/program"]);
        let err = lab.fp_fails(&args);
        assert!(
            err.contains("cannot run /no/such/program: No such file or directory")
                && !err.contains("Err("),
            "{err}"
        );
    }
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(!ps.contains("running"), "{ps}");
}

/// `forget` takes a name holding `*` or `?` as that name, when it is one, not as a pattern.
#[test]
fn forget_takes_a_name_before_a_pattern() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    for n in ["a*", "ab", "auto-x"] {
        lab.fp(&["snapshot", "-m", lab.m(), n]);
    }
    lab.fp(&["forget", "-m", lab.m(), "a*"]);
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(
        !log.contains("'a*'") && log.contains("'ab'") && log.contains("'auto-x'"),
        "{log}"
    );
    lab.fp(&["forget", "-m", lab.m(), "a?"]);
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert!(!log.contains("'ab'") && log.contains("'auto-x'"), "{log}");
}

/// A checkpoint's program sees its files where the store was mounted when it was taken. A
/// restore from the store mounted elsewhere shows it the mount there, in its own mount
/// namespace, in place and on a branch; with that path gone it is refused up front, saying
/// what to do.
#[test]
fn a_restore_shows_the_program_its_files_where_the_checkpoint_saw_them() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    // The program's binary on the mount, mapped: checked by the snapshot, not by its path
    // on this side (where the store is no longer mounted).
    std::fs::copy("/bin/bash", lab.mnt.join("bash")).expect("copy bash");
    std::fs::write(
        lab.mnt.join("t.sh"),
        "while :; do echo x >> ticks; sleep 0.02; done\n",
    )
    .expect("write");
    let bash = lab.mnt.join("bash");
    lab.run_writing("t", &[bash.to_str().expect("utf8"), "t.sh"], "ticks");
    lab.fp(&["checkpoint", "-m", lab.m(), "--kill", "c1"]);
    // Run from outside the mounts (`Lab::fp` runs in the mount, which keeps it busy).
    let outside = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .current_dir(lab.dir.path())
            .output()
            .expect("run forkpoint");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (ok, err) = outside(args);
        assert!(ok, "forkpoint {args:?}: {err}");
    };
    let store = lab.store.to_str().expect("utf8");
    ok(&["umount", lab.m()]);
    let mnt2 = lab.dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).expect("mkdir");
    let m2 = mnt2.to_str().expect("utf8");
    ok(&["mount", store, m2]);
    let grows = |ticks: &Path| {
        let at = lines_any(ticks);
        wait_for("the restored program", Duration::from_secs(20), || {
            lines_any(ticks) > at + 5
        });
    };
    // On a branch, and in place: the program writes to its files through the mount at m2.
    ok(&["restore", "-m", m2, "--detach", "--branch", "b", "c1"]);
    grows(&lab.branch_dir("b").join("ticks"));
    ok(&["restore", "-m", m2, "--detach", "c1"]);
    grows(&mnt2.join("ticks"));
    ok(&["kill", "-m", m2]);
    // With the path gone, nothing can show it the files there.
    std::fs::remove_dir(&lab.mnt).expect("rmdir");
    let (done, err) = outside(&["restore", "-m", m2, "--detach", "--branch", "b2", "c1"]);
    std::fs::create_dir(&lab.mnt).expect("mkdir again");
    assert!(
        !done && err.contains("was taken with the store mounted at") && err.contains(lab.m()),
        "{err}"
    );
    let log = lab.fp(&["log", "-m", m2]);
    assert!(!log.contains(" b2 "), "no branch made: {log}");
    ok(&["umount", m2]);
    ok(&["mount", store, lab.m()]);
}

/// A checkpoint number is never given twice, also after gc deleted the highest rows.
#[test]
fn checkpoint_numbers_are_not_given_again_after_gc() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let cno = |out: &str| -> u64 {
        out.split('#')
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number in {out}"))
    };
    std::fs::write(lab.mnt.join("f"), "1\n").expect("write");
    let a = cno(&lab.fp(&["snapshot", "-m", lab.m(), "a1"]));
    std::fs::write(lab.mnt.join("f"), "2\n").expect("write");
    let b = cno(&lab.fp(&["snapshot", "-m", lab.m(), "a2"]));
    // The head moves on past them, then they are forgotten and collected.
    std::fs::write(lab.mnt.join("f"), "3\n").expect("write");
    let c = cno(&lab.fp(&["snapshot", "-m", lab.m(), "a3"]));
    // Back to a1: the head is a1 again, and what came after is named only by a2, a3 and
    // the automatic checkpoint of the rollback.
    lab.fp(&["restore", "-m", lab.m(), "a1"]);
    lab.fp(&["forget", "-m", lab.m(), "a2", "a3", "auto-*"]);
    lab.fp(&["gc"]);
    let log = lab.fp(&["log", "-m", lab.m(), "--all"]);
    assert!(a < b && b < c, "{a} {b} {c}");
    std::fs::write(lab.mnt.join("f"), "4\n").expect("write");
    let d = cno(&lab.fp(&["snapshot", "-m", lab.m(), "a4"]));
    assert!(d > c, "#{d} after #{c}: {log}");
}

/// A foreground `run` whose session an in-place restore took over ends saying so, and the
/// session runs on detached under its name.
#[test]
fn a_foreground_run_taken_over_by_a_rollback_says_so() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    std::fs::write(
        lab.mnt.join("fg.sh"),
        // Not on this test's pipes (a pipe to outside the session cannot be checkpointed).
        "exec </dev/null >/dev/null 2>&1\nwhile :; do echo x >> ticks; sleep 0.02; done\n",
    )
    .expect("write");
    let child = Command::new(BIN)
        .args(["run", "-m", lab.m(), "--name", "fg", "--", "bash", "fg.sh"])
        .current_dir(&lab.mnt)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start forkpoint run");
    let ticks = lab.mnt.join("ticks");
    wait_for("the program", Duration::from_secs(20), || {
        lines_any(&ticks) > 3
    });
    lab.fp(&["checkpoint", "-m", lab.m(), "f1"]);
    lab.fp(&["restore", "-m", lab.m(), "--detach", "f1"]);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was rolled back by a restore"),
        "{err} {:?}",
        out.status
    );
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("fg ") && l.contains("running")),
        "{ps}"
    );
}

/// A session whose record is damaged is not listed, and `ps` says why.
#[test]
fn a_damaged_session_record_is_named() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "d",
        "--",
        "sleep",
        "1000",
    ]);
    let info = lab.store.join("sessions/d/info.json");
    let (init, _) = lab.session_pid("d");
    std::fs::write(&info, "{garbage").expect("write");
    let out = Command::new(BIN)
        .args(["ps", "-m", lab.m()])
        .current_dir(&lab.mnt)
        .output()
        .expect("run ps");
    // The lab's clean-up finds sessions by their records: this one is ended here, before
    // anything can fail.
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(init, libc::SIGKILL) };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("info.json is damaged"), "{err}");
}

/// A session ends with its program: what the program left running in the background ends
/// with it, and the session's output says so, naming each (they were ended without a word).
#[test]
fn what_a_program_leaves_running_ends_with_it_and_is_named() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let out = Command::new(BIN)
        .args([
            "run",
            "-m",
            lab.m(),
            "--name",
            "bg",
            "--",
            "sh",
            "-c",
            "sleep 1000 </dev/null >/dev/null 2>&1 & echo started",
        ])
        .current_dir(&lab.mnt)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    assert!(
        err.contains(
            "session bg: the program exited (status 0); 1 process it left running ends with it"
        ) && err.contains("(sleep)"),
        "{err}"
    );
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(!ps.contains("bg "), "{ps}");
}

/// Two rollbacks of one mount at once: one after the other, each keeping what it stops, and
/// the program runs once at the end (they stopped each other's programs and failed, and the
/// failing one put the files back under the other's program).
#[test]
fn two_rollbacks_at_once_take_turns() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.run_ticker("t");
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    let start = || {
        Command::new(BIN)
            .args(["restore", "-m", lab.m(), "--detach", "c1"])
            .current_dir(lab.dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("restore")
    };
    let (a, b) = (start(), start());
    for (which, r) in [("first", a), ("second", b)] {
        let o = r.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "{which} restore: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (running, ps) = lab.running_sessions();
    assert_eq!(running, 1, "{ps}");
    let ticks = lab.mnt.join("ticks");
    let at = lines_any(&ticks);
    wait_for("the program after both", Duration::from_secs(20), || {
        lines_any(&ticks) > at + 5
    });
    let log = lab.fp(&["log", "-m", lab.m()]);
    assert_eq!(
        log.matches("auto-").count(),
        2,
        "each kept what it stopped: {log}"
    );
}

/// `ps` shows one line per session, a script with newlines given to `sh -c` included.
#[test]
fn ps_shows_a_multi_line_command_on_one_line() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "ml",
        "--",
        "sh",
        "-c",
        "true\nexec sleep 1000",
    ]);
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert_eq!(ps.lines().count(), 2, "{ps}");
    assert!(ps.contains("true\\nexec sleep 1000"), "{ps}");
    lab.fp(&["kill", "-m", lab.m(), "--session", "ml"]);
}

/// A rollback gives the program back its own session's name (it took the name of whatever
/// session it replaced, or the branch's), unless a session elsewhere goes by it now.
#[test]
fn a_rolled_back_program_gets_its_session_name_back() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.run_ticker("alpha");
    lab.fp(&["checkpoint", "-m", lab.m(), "--kill", "ca"]);
    // Nothing runs: not the branch's name.
    let out = lab.fp(&["restore", "-m", lab.m(), "--detach", "ca"]);
    assert!(out.contains("as session alpha"), "{out}");
    lab.fp(&["kill", "-m", lab.m(), "--session", "alpha"]);
    // Another session runs: not its name.
    lab.fp(&[
        "run",
        "-m",
        lab.m(),
        "--detach",
        "--name",
        "beta",
        "--",
        "sleep",
        "1000",
    ]);
    let out = lab.fp(&["restore", "-m", lab.m(), "--detach", "ca"]);
    assert!(out.contains("as session alpha"), "{out}");
    let ps = lab.fp(&["ps", "-m", lab.m()]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("alpha ") && l.contains("running"))
            && !ps.contains("beta "),
        "{ps}"
    );
}

/// Ctrl-C (SIGINT) or SIGTERM to a rollback at any moment leaves a program running: before
/// the rollback begins, the old one; after, the restored one. (It stopped the program half
/// way and restored nothing.)
#[test]
fn an_interrupted_rollback_leaves_a_program_running() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    // Some memory, so that the rollback takes a while.
    lab.run_memory_ticker("m", 64);
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    // The rollback's changes (automatic checkpoint, stop, checkout) take a few tens of ms
    // here, from about 10 ms after the command starts.
    for (i, delay_ms) in (4u64..=48).step_by(4).enumerate() {
        let sig = if i % 2 == 0 {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        let child = Command::new(BIN)
            .args(["restore", "-m", lab.m(), "--detach", "c1"])
            .current_dir(lab.dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("restore");
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(child.id() as i32, sig) };
        let o = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&o.stderr);
        let ticks = lab.mnt.join("ticks");
        let at = lines_any(&ticks);
        wait_for(
            &format!(
                "a program after signal {sig} at {delay_ms} ms ({:?}: {err})",
                o.status
            ),
            Duration::from_secs(20),
            || lines_any(&ticks) > at + 5,
        );
        let (running, ps) = lab.running_sessions();
        assert_eq!(
            running, 1,
            "after signal {sig} at {delay_ms} ms: {ps}\n{err}"
        );
    }
}

/// A session killed in the middle of a checkpoint: the checkpoint command says whether the
/// checkpoint was recorded, as `log` has it, and `kill` leaves none of the hand-off's files.
#[test]
fn a_session_killed_during_its_checkpoint_leaves_no_hand_off_files() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.run_memory_ticker("k", 256);
    let cp = Command::new(BIN)
        .args(["checkpoint", "-m", lab.m(), "k1"])
        .current_dir(lab.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("checkpoint");
    let dir = lab.store.join("sessions/k");
    wait_for("the hand-off", Duration::from_secs(30), || {
        dir.join("checkpoint.pages").exists() || dir.join("checkpoint.tmp").exists()
    });
    lab.fp(&["kill", "-m", lab.m(), "--session", "k"]);
    let o = cp.wait_with_output().expect("wait");
    let left = lab.hand_off_files("k");
    assert!(left.is_empty(), "{left:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        let log = lab.fp(&["log", "-m", lab.m()]);
        if err.contains("was recorded: it can be restored") {
            assert!(log.contains("k1"), "{err}\n{log}");
        } else {
            assert!(err.contains("is not recorded (yet"), "{err}");
        }
    }
}

/// A rollback killed with SIGKILL (which nothing holds off) after it stopped the program:
/// `ps` and the next restore say where the program is kept. The lock file names the
/// rollback while it runs; here it is left as such a kill leaves it.
#[test]
fn a_rollback_killed_half_way_is_reported() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.run_ticker("t");
    lab.fp(&["checkpoint", "-m", lab.m(), "--kill", "kept"]);
    let mut dead = Command::new("true").spawn().expect("true");
    let pid = dead.id();
    dead.wait().expect("wait");
    std::fs::write(
        lab.store.join("restore.lock"),
        format!("{pid} kept {}\n", lab.m()),
    )
    .expect("write");
    let ps = Command::new(BIN)
        .args(["ps", "-m", lab.m()])
        .output()
        .expect("ps");
    let err = String::from_utf8_lossy(&ps.stderr);
    assert!(
        err.contains("was killed half way") && err.contains("'kept'"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["restore", "-m", lab.m(), "--detach", "kept"])
        .current_dir(lab.dir.path())
        .output()
        .expect("restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("was killed half way"), "{err}");
    // Said once: the restore that took the lock leaves it clean.
    let ps = Command::new(BIN)
        .args(["ps", "-m", lab.m()])
        .output()
        .expect("ps");
    assert!(
        !String::from_utf8_lossy(&ps.stderr).contains("half way"),
        "{}",
        String::from_utf8_lossy(&ps.stderr)
    );
}

/// A rollback started while a foreground rollback is still bringing its program back waits
/// for it, then takes that program over (it went ahead as soon as the first one started
/// its session, found no session yet, and left both programs running on one mount).
#[test]
fn a_rollback_waits_for_a_foreground_one_to_bring_its_program_back() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.run_memory_ticker("m", 64);
    lab.fp(&["checkpoint", "-m", lab.m(), "c1"]);
    let restore = |detach: bool| {
        let mut args = vec!["restore", "-m", lab.m()];
        if detach {
            args.push("--detach");
        }
        args.push("c1");
        Command::new(BIN)
            .args(&args)
            .current_dir(lab.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("restore")
    };
    for delay_ms in [20u64, 40, 60, 80] {
        let fg = restore(false);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let bg = restore(true).wait_with_output().expect("wait");
        assert!(
            bg.status.success(),
            "{}",
            String::from_utf8_lossy(&bg.stderr)
        );
        // Taken over, the foreground restore ends (two programs, it would run on).
        let mut fg = fg;
        let t = Instant::now();
        while fg.try_wait().expect("wait").is_none() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ended = fg.try_wait().expect("wait").is_some();
        let _ = fg.kill();
        let fg = fg.wait_with_output().expect("the foreground restore ends");
        let (running, ps) = lab.running_sessions();
        assert!(
            ended,
            "at {delay_ms} ms the foreground restore's program was not taken over: {ps}"
        );
        assert_eq!(
            running,
            1,
            "at {delay_ms} ms: {ps}\nforeground: {}",
            String::from_utf8_lossy(&fg.stderr)
        );
    }
}
