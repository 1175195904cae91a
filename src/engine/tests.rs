//! End-to-end tests with real processes: build small C programs with `cc`, dump them, kill
//! them, restore the image and check that they continue. They need root (ptrace of arbitrary
//! processes, `PR_SET_MM`, `set_tid`) and skip with a message otherwise.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::dump::dump;
use super::image::{self, ProcessImage};
use super::restore::{restore, restore_with, RestoreOptions};
use super::sys;

/// Kills (and reaps) every process registered with it when dropped.
struct Procs(Vec<i32>);

impl Procs {
    fn add(&mut self, pid: i32) {
        self.0.push(pid);
    }
    fn kill(&mut self, pid: i32) {
        sys::kill_and_reap(pid);
        self.0.retain(|p| *p != pid);
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for pid in self.0.drain(..) {
            sys::kill_and_reap(pid);
        }
    }
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if Command::new("cc").arg("--version").output().is_err() {
        return Some("no C compiler (cc)".into());
    }
    None
}

/// Skips the test (with the reason) where it cannot run; under CI it must run, so it fails.
macro_rules! require_env {
    () => {
        if let Some(r) = skip_reason() {
            assert!(
                std::env::var_os("CI").is_none(),
                "engine test cannot run under CI: {r}"
            );
            eprintln!("skipping: {r}");
            return;
        }
    };
}

const COUNTER_C: &str = r#"
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

volatile struct { uint64_t magic; uint64_t counter; uint64_t usr1; } state = { 0x6b706b726f66ULL, 0, 0 };

static void on_usr1(int sig) { (void)sig; state.usr1++; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    syscall(SYS_close_range, 3, ~0U, 0); /* drop fds inherited from the test harness */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    /* A named anonymous mapping (ignored if the kernel lacks CONFIG_ANON_VMA_NAME). */
    char *named = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    named[0] = 1;
    prctl(0x53564d41, 0, (unsigned long)named, 2 * 4096, (unsigned long)"fkpt-test");
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int afd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[96];
    int n = snprintf(buf, sizeof buf, "%llu\n", (unsigned long long)(uintptr_t)&state);
    write(afd, buf, n);
    close(afd);
    for (;;) {
        state.counter++;
        n = snprintf(buf, sizeof buf, "%020llu %020llu %d\n",
                     (unsigned long long)state.counter, (unsigned long long)state.usr1,
                     (int)getpid());
        pwrite(fd, buf, n, 0);
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
}
"#;

const BIGBUF_C: &str = r#"
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SZ (64u << 20)

static uint64_t checksum(const uint8_t *b) {
    uint64_t h = 1469598103934665603ULL;
    const uint64_t *w = (const uint64_t *)b;
    for (size_t i = 0; i < SZ / 8; i++) { h ^= w[i]; h *= 1099511628211ULL; }
    return h;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    syscall(SYS_close_range, 3, ~0U, 0); /* drop fds inherited from the test harness */
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint8_t *buf = malloc(SZ);
    if (!buf) return 3;
    for (size_t i = 0; i < SZ; i++)
        buf[i] = (((uintptr_t)(buf + i) >> 12) % 16 == 0) ? 0 : (uint8_t)((i * 2654435761u) >> 13);
    uint64_t want = checksum(buf);
    unsigned long long ticks = 0, ok = 0;
    char line[96];
    for (;;) {
        ticks++;
        if (ticks % 10 == 0) {
            if (checksum(buf) != want) {
                int n = snprintf(line, sizeof line, "BAD %020llu\n", ticks);
                pwrite(fd, line, n, 0);
                _exit(4);
            }
            ok++;
        }
        int n = snprintf(line, sizeof line, "%020llu %020llu\n", ticks, ok);
        pwrite(fd, line, n, 0);
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
}
"#;

fn build(dir: &Path, name: &str, src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn spawn(exe: &Path, args: &[&Path], procs: &mut Procs) -> i32 {
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    procs.add(pid);
    drop(child); // reaped by Procs
    pid
}

/// Read the whitespace-separated numbers of the first line of `path`.
fn read_nums(path: &Path) -> Vec<u64> {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; check the state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

fn roundtrip_bytes(img: &ProcessImage) -> ProcessImage {
    let bytes = image::encode(img).unwrap();
    image::decode(&bytes).unwrap()
}

struct Counter {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    out: PathBuf,
    addr_file: PathBuf,
}

fn counter_setup() -> Counter {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "counter", COUNTER_C);
    let out = dir.path().join("out");
    let addr_file = dir.path().join("addr");
    Counter {
        _dir: dir,
        exe,
        out,
        addr_file,
    }
}

fn start_counter(c: &Counter, procs: &mut Procs) -> (i32, u64) {
    let pid = spawn(&c.exe, &[&c.out, &c.addr_file], procs);
    assert!(
        wait_until(Duration::from_secs(5), || read_nums(&c.out)
            .first()
            .is_some_and(|v| *v >= 20)),
        "counter did not start"
    );
    let addr: u64 = std::fs::read_to_string(&c.addr_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (pid, addr)
}

/// Counter value inside an image.
fn image_counter(img: &ProcessImage, addr: u64) -> u64 {
    assert_eq!(img.memory.read_u64(addr), Some(0x6b706b726f66));
    img.memory.read_u64(addr + 8).unwrap()
}

/// Check that `pid` runs the counter and continues from `from`.
fn check_continues(c: &Counter, pid: i32, from: u64) {
    let ok = wait_until(Duration::from_secs(5), || {
        let v = read_nums(&c.out);
        v.len() == 3 && v[2] == pid as u64 && v[0] > from + 5
    });
    let v = read_nums(&c.out);
    assert!(
        ok,
        "restored process {pid} did not continue from {from}: {v:?}"
    );
    assert!(alive(pid), "restored process {pid} died");
    // It continued from the dumped value, not from scratch: at most a few seconds passed.
    assert!(v[0] < from + 600, "counter jumped from {from} to {}", v[0]);
}

#[test]
fn dump_leaves_process_running() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let img = dump(pid).unwrap();
    assert_eq!(img.pid, pid);
    assert_eq!(img.threads.len(), 1);
    let v = image_counter(&img, addr);
    assert!(v >= 20);
    // Still running, still counting, same pid.
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)
        .first()
        .is_some_and(|x| *x > v + 10)));
    assert!(alive(pid));
    // Status and files.
    assert!(img.fds.iter().any(|f| f.path == c.out.to_string_lossy()));
    assert!(img.sigactions.iter().any(|s| s.sig == 10 && s.handler > 1));
    assert!(!img.threads[0].xstate.is_empty());
    // Dump it again: must work the same way.
    let img2 = dump(pid).unwrap();
    assert!(image_counter(&img2, addr) > v);
}

#[test]
fn dump_kill_restore_counter() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    std::thread::sleep(Duration::from_millis(300));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let from = image_counter(&img, addr);
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    check_continues(&c, new, from);
    // Signal handlers survived: SIGUSR1 is counted, not fatal.
    sys::kill(new, libc::SIGUSR1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)
        .get(1)
        .is_some_and(|u| *u >= 1)));
    assert!(alive(new));
}

#[test]
fn dump_restore_dump_restore_and_twice_from_one_image() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let img1 = roundtrip_bytes(&dump(pid).unwrap());
    let from1 = image_counter(&img1, addr);
    procs.kill(pid);

    let p1 = restore(&img1).unwrap();
    procs.add(p1);
    check_continues(&c, p1, from1);
    let img2 = roundtrip_bytes(&dump(p1).unwrap());
    let from2 = image_counter(&img2, addr);
    assert!(from2 > from1);
    procs.kill(p1);

    let p2 = restore(&img2).unwrap();
    procs.add(p2);
    check_continues(&c, p2, from2);
    procs.kill(p2);

    // The first image again.
    let p3 = restore(&img1).unwrap();
    procs.add(p3);
    check_continues(&c, p3, from1);
}

#[test]
fn restore_with_same_pid() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let img = dump(pid).unwrap();
    let from = image_counter(&img, addr);
    procs.kill(pid);
    let new = restore_with(
        &img,
        &RestoreOptions {
            pid: Some(pid),
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    procs.add(new);
    assert_eq!(new, pid);
    check_continues(&c, new, from);
}

#[test]
fn restore_with_pid_in_use_fails_cleanly() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, _) = start_counter(&c, &mut procs);
    let img = dump(pid).unwrap();
    let err = restore_with(
        &img,
        &RestoreOptions {
            pid: Some(pid),
            ..RestoreOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, super::restore::RestoreError::PidInUse { .. }),
        "{err}"
    );
    assert!(alive(pid));
}

#[test]
fn big_buffer_survives() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "bigbuf", BIGBUF_C);
    let out = dir.path().join("out");
    let pid = spawn(&exe, &[&out], &mut procs);
    // Wait for at least one verification.
    assert!(wait_until(Duration::from_secs(10), || read_nums(&out)
        .get(1)
        .is_some_and(|ok| *ok >= 1)));
    let t0 = Instant::now();
    let img = dump(pid).unwrap();
    let t_dump = t0.elapsed();
    let t0 = Instant::now();
    let bytes = image::encode(&img).unwrap();
    let img = image::decode(&bytes).unwrap();
    let t_codec = t0.elapsed();
    assert!(img.memory.covered_bytes() >= 64 << 20);
    // Every 16th page is zero and must not be stored inline.
    assert!(img.memory.inline_bytes() < img.memory.covered_bytes());
    procs.kill(pid);
    let before = read_nums(&out);
    let t0 = Instant::now();
    let new = restore(&img).unwrap();
    let t_restore = t0.elapsed();
    procs.add(new);
    eprintln!(
        "64 MiB process: dump {t_dump:?}, encode+decode {t_codec:?} ({} bytes), restore {t_restore:?}",
        bytes.len()
    );
    let ok_before = before.get(1).copied().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(10), || read_nums(&out)
            .get(1)
            .is_some_and(|ok| *ok >= ok_before + 3)),
        "no successful verification after restore: {:?} (before {before:?}), content {:?}",
        read_nums(&out),
        std::fs::read_to_string(&out)
    );
    assert!(alive(new));
}

#[test]
fn dump_refuses_pipe_and_keeps_process_running() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let child = Command::new(&c.exe)
        .args([&c.out, &c.addr_file])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    procs.add(pid);
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)
        .first()
        .is_some_and(|v| *v >= 5)));
    let err = dump(pid).unwrap_err();
    match &err {
        super::dump::DumpError::UnsupportedFd { pid: p, fd, .. } => {
            assert_eq!(*p, pid);
            assert_eq!(*fd, 0);
        }
        other => panic!("unexpected error {other}"),
    }
    let v = read_nums(&c.out)[0];
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)[0] > v + 5));
    assert!(alive(pid));
    drop(child);
}

/// The restored process looks like the dumped one from /proc.
#[test]
fn restored_process_matches_image() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, _) = start_counter(&c, &mut procs);
    let status_of = |pid: i32, key: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or("")
            .to_string()
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let keys = ["Umask:", "SigBlk:", "SigIgn:", "SigCgt:", "Uid:", "Gid:"];
    let before: Vec<String> = keys.iter().map(|k| status_of(pid, k)).collect();
    let img = dump(pid).unwrap();
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);

    let maps = super::dump::read_maps(new).unwrap();
    // With CONFIG_ANON_VMA_NAME the comparison below also covers "[anon:fkpt-test]".
    let expect: Vec<_> = img
        .mappings
        .iter()
        .map(|m| (m.start, m.end, m.prot, m.shared, m.path.clone()))
        .collect();
    let got: Vec<_> = maps
        .iter()
        .map(|m| {
            (
                m.start,
                m.end,
                super::dump::prot_of(&m.perms),
                m.perms.ends_with('s'),
                (!m.path.is_empty()).then(|| m.path.clone()),
            )
        })
        .collect();
    assert_eq!(got, expect);
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/exe"))
            .unwrap()
            .to_string_lossy(),
        img.exe.clone().unwrap()
    );
    assert_eq!(
        std::fs::read(format!("/proc/{new}/cmdline")).unwrap(),
        cmdline
    );
    assert_eq!(
        std::fs::read(format!("/proc/{new}/environ")).unwrap(),
        environ
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/cwd")).unwrap(),
        PathBuf::from(&img.cwd)
    );
    let after: Vec<String> = keys.iter().map(|k| status_of(new, k)).collect();
    assert_eq!(after, before);
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{new}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(fds.len(), img.fds.len(), "{fds:?}");
    let comm = std::fs::read_to_string(format!("/proc/{new}/comm")).unwrap();
    assert_eq!(comm.trim_end(), img.comm);
}

const THREADS_C: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

volatile uint64_t counters[4];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t shared_total;

static void tick(void) {
    struct timespec ts = { 0, 10 * 1000 * 1000 };
    nanosleep(&ts, NULL);
}

static void *worker(void *arg) {
    int i = (int)(intptr_t)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        counters[i]++;
        shared_total++;
        pthread_mutex_unlock(&lock);
        tick();
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    syscall(SYS_close_range, 3, ~0U, 0);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int afd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[160];
    int n = snprintf(buf, sizeof buf, "%llu\n", (unsigned long long)(uintptr_t)counters);
    write(afd, buf, n);
    close(afd);
    pthread_t t[3];
    for (int i = 1; i <= 3; i++) pthread_create(&t[i - 1], NULL, worker, (void *)(intptr_t)i);
    for (;;) {
        pthread_mutex_lock(&lock);
        counters[0]++;
        uint64_t c1 = counters[1], c2 = counters[2], c3 = counters[3];
        pthread_mutex_unlock(&lock);
        n = snprintf(buf, sizeof buf, "%020llu %020llu %020llu %020llu %d\n",
                     (unsigned long long)counters[0], (unsigned long long)c1,
                     (unsigned long long)c2, (unsigned long long)c3, (int)getpid());
        pwrite(fd, buf, n, 0);
        tick();
    }
}
"#;

fn threads_run(same_pid: bool) {
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("threads.c");
    std::fs::write(&c, THREADS_C).unwrap();
    let exe = dir.path().join("threads");
    let out = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outf = dir.path().join("out");
    let addrf = dir.path().join("addr");
    let pid = spawn(&exe, &[&outf, &addrf], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || {
        let v = read_nums(&outf);
        v.len() == 5 && v[..4].iter().all(|x| *x >= 10)
    }));
    let addr: u64 = std::fs::read_to_string(&addrf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let img = roundtrip_bytes(&dump(pid).unwrap());
    assert_eq!(img.threads.len(), 4);
    assert_eq!(img.threads[0].tid, pid);
    let from: Vec<u64> = (0..4)
        .map(|i| img.memory.read_u64(addr + 8 * i).unwrap())
        .collect();
    procs.kill(pid);
    let opts = RestoreOptions {
        pid: same_pid.then_some(pid),
        ..RestoreOptions::default()
    };
    let new = restore_with(&img, &opts).unwrap();
    procs.add(new);
    let ok = wait_until(Duration::from_secs(5), || {
        let v = read_nums(&outf);
        v.len() == 5 && v[4] == new as u64 && (0..4).all(|i| v[i] > from[i] + 5)
    });
    assert!(
        ok,
        "threads did not all continue: from {from:?} now {:?}",
        read_nums(&outf)
    );
    let v = read_nums(&outf);
    assert!((0..4).all(|i| v[i] < from[i] + 600), "{from:?} -> {v:?}");
    assert!(alive(new));
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{new}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    tids.sort_unstable();
    assert_eq!(tids.len(), 4);
    if same_pid {
        let mut want: Vec<i32> = img.threads.iter().map(|t| t.tid).collect();
        want.sort_unstable();
        assert_eq!(tids, want);
    }
}

#[test]
fn multi_threaded_dump_restore() {
    require_env!();
    threads_run(false);
}

#[test]
fn multi_threaded_restore_keeps_thread_ids() {
    require_env!();
    threads_run(true);
}

/// Live (non-zombie) children of the test process.
fn live_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.get(1) == Some(&me.as_str()) && rest.first() != Some(&"Z") {
            v.push(pid);
        }
    }
    v.sort_unstable();
    v
}

#[test]
fn failed_restore_kills_the_child() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, _) = start_counter(&c, &mut procs);
    let mut img = dump(pid).unwrap();
    procs.kill(pid);
    let m = img
        .mappings
        .iter_mut()
        .find(|m| m.kind == super::image::MappingKind::File)
        .unwrap();
    m.path = Some("/nonexistent/forkpoint-test.so".into());
    let before = live_children();
    let err = restore_with(
        &img,
        &RestoreOptions {
            skip_file_checks: true,
            ..RestoreOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, super::restore::RestoreError::Mapping { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/forkpoint-test.so"));
    // The half-built process is gone (killed and reaped). Other tests start children of
    // this process meanwhile, so look for that one.
    let super::restore::RestoreError::Mapping { pid: built, .. } = err else {
        unreachable!("checked above");
    };
    assert!(
        !live_children().contains(&built) && !before.contains(&built),
        "process {built} of the failed restore is still alive"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{built}")).exists(),
        "process {built} of the failed restore was not reaped"
    );
}

/// A restore that fails after it made the threads (here: more supplementary groups than
/// its scratch area holds, refused when the credentials are set, thread by thread) kills
/// and reaps the whole half-built process, threads and all. It hung: the leader was waited
/// for while its threads, traced by the restorer, stayed zombies only it could reap.
#[test]
fn failed_restore_after_the_threads_are_made_reaps_them() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "threads", THREADS_C);
    let outf = dir.path().join("out");
    let addrf = dir.path().join("addr");
    let pid = spawn(&exe, &[&outf, &addrf], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || read_nums(&outf)
        .len()
        == 5));
    let mut img = dump(pid).unwrap();
    assert_eq!(img.threads.len(), 4);
    procs.kill(pid);
    img.creds.groups = (0..30_000).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(restore_with(&img, &RestoreOptions::default()).map_err(|e| e.to_string()));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the failed restore did not return within 30 s");
    let err = res.expect_err("the restore should fail");
    assert!(err.contains("scratch area"), "{err}");
    // Nothing of it is left: no child of this test process is a zombie thread group of
    // four, nor alive with four threads.
    for child in live_children() {
        let threads = std::fs::read_dir(format!("/proc/{child}/task")).map(|d| d.count());
        assert!(
            threads.unwrap_or(0) != 4 || procs.0.contains(&child),
            "process {child} of the failed restore is still there"
        );
    }
}

#[test]
fn restore_refuses_changed_file() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, _) = start_counter(&c, &mut procs);
    let img = dump(pid).unwrap();
    procs.kill(pid);
    // Another file renamed over the executable, with the same size and mtime: a new inode.
    let bytes = std::fs::read(&c.exe).unwrap();
    let mtime = std::fs::metadata(&c.exe).unwrap().modified().unwrap();
    let new = c.exe.with_extension("new");
    std::fs::write(&new, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&new)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&new, &c.exe).unwrap();
    let err = restore(&img).unwrap_err();
    assert!(
        matches!(&err, super::restore::RestoreError::FileChanged { reason, .. } if reason.contains("inode")),
        "{err}"
    );
    // Rewrite the executable (same bytes, new mtime).
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&c.exe, bytes).unwrap();
    let err = restore(&img).unwrap_err();
    assert!(
        matches!(err, super::restore::RestoreError::FileChanged { .. }),
        "{err}"
    );
    // Under the snapshot's root (a session's mount, restored from the checkpoint's own
    // snapshot) the size and mtime the dump read from the kernel are not compared, the
    // inode is.
    let mut img = img;
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&c.exe).unwrap());
    let mut mapped = 0;
    for m in &mut img.mappings {
        if let (Some(p), Some(id)) = (&m.path, &mut m.file) {
            if std::path::Path::new(p) == c.exe {
                id.ino = ino;
                id.mtime -= 1;
                mapped += 1;
            }
        }
    }
    assert!(mapped > 0, "the executable is mapped");
    let dir = c.exe.parent().unwrap();
    super::restore::check_files(&img, Some(dir), &[]).expect("same inode under the snapshot root");
    let err = super::restore::check_files(&img, Some(std::path::Path::new("/elsewhere")), &[]);
    assert!(
        matches!(&err, Err(super::restore::RestoreError::FileChanged { reason, .. }) if reason.contains("mtime")),
        "{err:?}"
    );
}

#[test]
fn dump_of_stopped_process_keeps_it_stopped() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let state = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    sys::kill(pid, libc::SIGSTOP).unwrap();
    assert!(wait_until(Duration::from_secs(5), || state(pid) == "T"));
    let img = dump(pid).unwrap();
    let v = image_counter(&img, addr);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state(pid), "T");
    assert_eq!(read_nums(&c.out)[0], v);
    sys::kill(pid, libc::SIGCONT).unwrap();
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)[0] > v + 5));
}

#[test]
fn restore_from_externalized_chunks() {
    require_env!();
    struct Store(std::collections::HashMap<[u8; 32], Vec<u8>>);
    impl super::restore::ChunkSource for Store {
        fn fetch(&self, hash: &[u8; 32], _len: u64) -> Result<Vec<u8>, String> {
            self.0.get(hash).cloned().ok_or_else(|| "missing".into())
        }
    }
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let mut img = dump(pid).unwrap();
    let from = image_counter(&img, addr);
    procs.kill(pid);
    let mut store = Store(Default::default());
    img.memory
        .externalize(|h, b| {
            store.0.insert(*h, b.to_vec());
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(img.memory.inline_bytes(), 0);
    let img = roundtrip_bytes(&img);
    // Without a source the restore fails cleanly.
    assert!(matches!(
        restore(&img),
        Err(super::restore::RestoreError::Chunk { .. })
    ));
    let new = restore_with(
        &img,
        &RestoreOptions {
            chunks: Some(&store),
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    procs.add(new);
    check_continues(&c, new, from);
}

#[test]
fn dump_and_kill_stops_at_the_checkpoint() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let (pid, addr) = start_counter(&c, &mut procs);
    let img = super::dump::dump_with(
        pid,
        &super::dump::DumpOptions {
            after: super::dump::AfterDump::Kill,
            ..Default::default()
        },
    )
    .unwrap();
    let v = image_counter(&img, addr);
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    std::thread::sleep(Duration::from_millis(50));
    let file = read_nums(&c.out)[0];
    assert!(file == v || file + 1 == v, "file {file}, image {v}");
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    check_continues(&c, new, v);
}

#[test]
fn restore_keeps_unprivileged_credentials() {
    require_env!();
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    std::fs::set_permissions(c._dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let child = Command::new(&c.exe)
        .args([&c.out, &c.addr_file])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    procs.add(pid);
    drop(child);
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)
        .first()
        .is_some_and(|v| *v >= 5)));
    let addr: u64 = std::fs::read_to_string(&c.addr_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let img = dump(pid).unwrap();
    assert_eq!(img.creds.uid, [65534; 4]);
    let from = image_counter(&img, addr);
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    check_continues(&c, new, from);
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let gid = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>()[1..],
        ["65534"; 4]
    );
    assert_eq!(
        gid.split_whitespace().collect::<Vec<_>>()[1..],
        ["65534"; 4]
    );
    let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(caps.ends_with("0000000000000000"), "{caps}");
}

// ---------------------------------------------------------------------------------------
// Process trees and pipes.

/// `root` (session leader) forks a producer (own process group) and a consumer (joins the
/// producer's group) connected by a pipe, plus two children that end at once and stay
/// zombies (exit 7, SIGTERM). The producer writes numbered lines as fast as the pipe takes
/// them; the consumer reads slowly, checks every number (no gap, no repeat) and appends its
/// progress ("ok COUNT") or "BAD ..." to a file. On SIGUSR1 the root reaps the zombies and
/// writes their statuses to `report`.
const PIPELINE_C: &str = r#"
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static void producer(void) {
    char line[32];
    for (unsigned long long n = 1;; n++) {
        int len = snprintf(line, sizeof line, "%015llu\n", n);
        if (write(1, line, len) != len) _exit(5);
    }
}

static void consumer(const char *progress) {
    int out = open(progress, O_WRONLY | O_CREAT | O_APPEND, 0644);
    char buf[4096], msg[128];
    size_t have = 0;
    unsigned long long expect = 1, count = 0;
    for (;;) {
        ssize_t r = read(0, buf + have, 256);
        if (r <= 0) { int n = snprintf(msg, sizeof msg, "BAD read %zd\n", r); write(out, msg, n); _exit(3); }
        have += r;
        size_t start = 0;
        for (size_t i = 0; i < have; i++) {
            if (buf[i] != '\n') continue;
            unsigned long long v = strtoull(buf + start, NULL, 10);
            if (v != expect) {
                int n = snprintf(msg, sizeof msg, "BAD expected %llu got %llu\n", expect, v);
                write(out, msg, n);
                _exit(4);
            }
            expect++;
            if (++count % 2000 == 0) {
                int n = snprintf(msg, sizeof msg, "ok %llu\n", count);
                write(out, msg, n);
            }
            start = i + 1;
        }
        memmove(buf, buf + start, have - start);
        have -= start;
        struct timespec ts = { 0, 2 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    syscall(SYS_close_range, 3, ~0U, 0);
    setsid();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    int p[2];
    if (pipe(p)) return 3;
    pid_t prod = fork();
    if (prod == 0) {
        setpgid(0, 0);
        dup2(p[1], 1); close(p[0]); close(p[1]);
        producer();
    }
    setpgid(prod, prod);
    pid_t cons = fork();
    if (cons == 0) {
        setpgid(0, prod);
        dup2(p[0], 0); close(p[0]); close(p[1]);
        consumer(argv[1]);
    }
    setpgid(cons, prod);
    close(p[0]); close(p[1]);
    pid_t z1 = fork();
    if (z1 == 0) _exit(7);
    pid_t z2 = fork();
    if (z2 == 0) { raise(SIGTERM); _exit(1); }
    FILE *f = fopen(argv[2], "w");
    fprintf(f, "%d %d %d %d\n", (int)prod, (int)cons, (int)z1, (int)z2);
    fclose(f);
    for (;;) {
        pause();
        if (usr1) {
            usr1 = 0;
            int s1 = 0, s2 = 0;
            pid_t w1 = waitpid(z1, &s1, 0), w2 = waitpid(z2, &s2, 0);
            f = fopen(argv[3], "w");
            fprintf(f, "%d %d %d %d\n", w1 == z1, WIFEXITED(s1) ? WEXITSTATUS(s1) : -1,
                    w2 == z2, WIFSIGNALED(s2) ? WTERMSIG(s2) : -1);
            fclose(f);
        }
    }
}
"#;

/// Kills and reaps every process of the trees it knows when dropped. Makes the test process
/// a child subreaper so members orphaned by a killed root are reaped here (their pids must be
/// free again for a restore with the same pids).
struct TreeGuard(Vec<i32>);

impl TreeGuard {
    fn new() -> Self {
        // SAFETY: integer-only prctl.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        TreeGuard(Vec::new())
    }
    fn add(&mut self, pids: &[i32]) {
        self.0.extend_from_slice(pids);
    }
    /// Kill and wait until every pid is gone (reaped by us or elsewhere).
    fn kill_all(&mut self) {
        for &p in &self.0 {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        for p in self.0.drain(..) {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let mut st = 0;
                // SAFETY: `st` is a valid writable c_int.
                let r = unsafe { libc::waitpid(p, &mut st, libc::WNOHANG | libc::__WALL) };
                if r == p || !Path::new(&format!("/proc/{p}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Fields of /proc/PID/stat after the comm, numbered as in proc(5) (3 = state).
fn stat_of(pid: i32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let mut v = vec![String::new(); 3];
    v.extend(
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string),
    );
    v
}

fn progress(path: &Path) -> (u64, Option<String>) {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let bad = s.lines().find(|l| l.starts_with("BAD")).map(str::to_string);
    let last = s
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ok ").and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    (last, bad)
}

#[test]
fn pipeline_tree_dump_kill_restore() {
    require_env!();
    use super::dump::{dump_tree, AfterDump, DumpOptions};
    use super::image::MemberState;
    use super::restore::{restore_tree, TreeRestoreOptions};
    let mut guard = TreeGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "pipeline", PIPELINE_C);
    let prog = dir.path().join("progress");
    let pids_file = dir.path().join("pids");
    let report = dir.path().join("report");
    let child = Command::new(&exe)
        .args([&prog, &pids_file, &report])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = child.id() as i32;
    drop(child);
    guard.add(&[root]);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&pids_file).is_ok_and(|s| s.ends_with('\n'))
    }));
    let kids: Vec<i32> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    guard.add(&kids);
    let (prod, cons, z1, z2) = (kids[0], kids[1], kids[2], kids[3]);
    assert!(wait_until(Duration::from_secs(5), || progress(&prog).0
        >= 4000
        && stat_of(z1)[3] == "Z"
        && stat_of(z2)[3] == "Z"));

    // A dump that lets the tree run on must not disturb the pipe (tee does not consume).
    let mut calls = 0;
    let img = dump_tree(root, &DumpOptions::default(), &mut || {
        calls += 1;
        for p in [root, prod, cons] {
            let st = stat_of(p)[3].clone();
            if st != "t" {
                return Err(format!("{p} is in state {st} at the checkpoint"));
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(img.root, root);
    let pids: Vec<i32> = img.processes.iter().map(|m| m.pid).collect();
    assert_eq!(pids, vec![root, prod, cons, z1, z2]);
    let before = progress(&prog).0;
    assert!(wait_until(Duration::from_secs(5), || progress(&prog).0
        >= before + 4000));
    assert_eq!(progress(&prog).1, None);

    // Dump and kill, restore with the same pids.
    let img = dump_tree(
        root,
        &DumpOptions {
            after: AfterDump::Kill,
            ..Default::default()
        },
        &mut || Ok(()),
    )
    .unwrap();
    let img = super::image::decode_tree(&super::image::encode_tree(&img).unwrap()).unwrap();
    assert_eq!(img.pipes.len(), 1, "{:?}", img.pipes.len());
    let inflight = img.pipes[0].data.len();
    assert!(inflight > 0, "no data in flight in the pipe");
    assert!(matches!(
        img.processes[3].state,
        MemberState::Zombie { status: 0x700, .. }
    ));
    assert!(matches!(
        img.processes[4].state,
        MemberState::Zombie { status: 15, .. }
    ));
    guard.kill_all();
    let at_dump = progress(&prog).0;
    let new_root = restore_tree(
        &img,
        &TreeRestoreOptions {
            keep_pids: true,
            ..Default::default()
        },
    )
    .unwrap();
    guard.add(&[root, prod, cons, z1, z2]);
    assert_eq!(new_root, root);
    eprintln!("pipeline: {inflight} bytes in flight at the checkpoint");
    assert!(
        wait_until(Duration::from_secs(5), || progress(&prog).0
            >= at_dump + 6000
            || progress(&prog).1.is_some()),
        "consumer did not continue: {:?}",
        progress(&prog)
    );
    assert_eq!(progress(&prog).1, None, "consumer saw a gap or repeat");
    // Tree shape, sessions, groups.
    for p in [prod, cons, z1, z2] {
        assert_eq!(stat_of(p)[4], root.to_string(), "parent of {p}");
    }
    let ids = |p: i32| (stat_of(p)[5].clone(), stat_of(p)[6].clone());
    let (r, pr) = (root.to_string(), prod.to_string());
    assert_eq!(ids(root), (r.clone(), r.clone()));
    assert_eq!(ids(prod), (pr.clone(), r.clone()));
    assert_eq!(ids(cons), (pr.clone(), r.clone()));
    // Zombies are zombies with their statuses.
    assert_eq!(stat_of(z1)[3], "Z");
    assert_eq!(stat_of(z2)[3], "Z");
    sys::kill(root, libc::SIGUSR1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&report).is_ok_and(|s| s.ends_with('\n'))
    }));
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "1 7 1 15\n");
}

#[test]
fn tree_dump_refuses_pipe_to_outside_and_resumes() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let c = counter_setup();
    let child = Command::new(&c.exe)
        .args([&c.out, &c.addr_file])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    procs.add(pid);
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)
        .first()
        .is_some_and(|v| *v >= 5)));
    let res = super::dump::dump_tree(pid, &Default::default(), &mut || Ok(()));
    match &res.map(|_| ()) {
        Ok(()) => panic!("a pipe to the test process was accepted"),
        Err(super::dump::DumpError::UnsupportedFd {
            pid: p, fd, reason, ..
        }) => {
            assert_eq!((*p, *fd), (pid, 0));
            assert!(reason.contains("outside the tree"), "{reason}");
        }
        Err(other) => panic!("unexpected error {other}"),
    }
    let v = read_nums(&c.out)[0];
    assert!(wait_until(Duration::from_secs(5), || read_nums(&c.out)[0] > v + 5));
    assert!(alive(pid));
    drop(child);
}

#[test]
fn restore_refuses_pipe_fd_without_tree() {
    let mut img = super::image::tests::sample();
    img.fds[0].kind = super::image::FdKind::Pipe { ino: 5 };
    let tree = super::image::TreeImage {
        frozen_for: None,
        stopped: Vec::new(),
        no_new_privs: Vec::new(),
        caps: Vec::new(),
        seccomp: Vec::new(),
        bound_sockets: Vec::new(),
        root: img.pid,
        processes: vec![super::image::TreeMember {
            pid: img.pid,
            ppid: 1,
            state: super::image::MemberState::Live(Box::new(img)),
        }],
        pipes: Vec::new(),
        sockets: Vec::new(),
        memfds: Vec::new(),
    };
    let err = super::restore::restore_tree(&tree, &Default::default()).unwrap_err();
    assert!(
        matches!(err, super::restore::RestoreError::BadTree { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pipe:[5]"), "{err}");
}

/// Blocks SIGUSR1 and SIGUSR2, queues SIGUSR1 to the process (value 4242) and SIGUSR2 to its
/// thread (value 77), arms ITIMER_REAL for 5 s, and writes "ready". When file `go` appears it
/// unblocks the signals and writes what its handlers saw:
/// `usr1_value usr1_code usr2_value usr2_code alarms`.
const SIGNALS_C: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <pthread.h>
#include <unistd.h>
static volatile int v1 = -1, c1 = 0, v2 = -1, c2 = 0, alarms = 0;
static void *idle(void *a) { (void)a; for (;;) pause(); return 0; }
static void h(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    if (sig == SIGUSR1) { v1 = si->si_value.sival_int; c1 = si->si_code; }
    if (sig == SIGUSR2) { v2 = si->si_value.sival_int; c2 = si->si_code; }
    if (sig == SIGALRM) alarms++;
}
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    const char *dir = argv[1];
    char ready[512], go[512], out[512];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    snprintf(go, sizeof go, "%s/go", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    sigaction(SIGUSR2, &sa, 0);
    sigaction(SIGALRM, &sa, 0);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, 0);
    /* A second thread with the same mask: the process-wide signal must survive the restore
       of a multi-threaded process too. */
    pthread_t th;
    pthread_create(&th, 0, idle, 0);
    union sigval v = { .sival_int = 4242 };
    sigqueue(getpid(), SIGUSR1, v);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = SIGUSR2;
    si.si_code = SI_QUEUE;
    si.si_pid = getpid();
    si.si_value.sival_int = 77;
    syscall(SYS_rt_tgsigqueueinfo, getpid(), gettid(), SIGUSR2, &si);
    struct itimerval it = { { 0, 0 }, { 5, 0 } };
    setitimer(ITIMER_REAL, &it, 0);
    FILE *f = fopen(ready, "w"); fclose(f);
    while (access(go, F_OK) != 0) usleep(10000);
    sigprocmask(SIG_UNBLOCK, &set, 0);
    for (;;) {
        f = fopen(out, "w");
        fprintf(f, "%d %d %d %d %d\n", v1, c1, v2, c2, alarms);
        fclose(f);
        usleep(20000);
    }
}
"#;

#[test]
fn pending_signals_and_itimers_survive_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "signals", SIGNALS_C);
    let pid = spawn(&exe, &[dir.path()], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || dir
        .path()
        .join("ready")
        .exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    assert_eq!(img.threads.len(), 2);
    let s = &img.signals;
    assert_eq!(s.shared.len(), 1, "{s:?}");
    assert_eq!(s.shared[0].signo(), libc::SIGUSR1);
    assert_eq!(s.threads.len(), 1, "{s:?}");
    assert_eq!(s.threads[0].1[0].signo(), libc::SIGUSR2);
    let real = s
        .itimers
        .iter()
        .find(|t| t.which == 0)
        .expect("ITIMER_REAL");
    assert!(real.value.0 < 5 && real.armed(), "{real:?}");
    procs.kill(pid);
    let t0 = Instant::now();
    let new = restore(&img).unwrap();
    procs.add(new);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let out = dir.path().join("out");
    // SI_QUEUE is -1: read the line as signed numbers.
    let nums = || -> Vec<i64> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    // The program rewrites the file: keep the first complete reading.
    let mut v = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let n = nums();
            let done = n.len() == 5 && n[0] != -1;
            if done {
                v = n;
            }
            done
        }),
        "restored process did not report: {:?}",
        nums()
    );
    assert_eq!(
        &v[..4],
        &[4242, -1, 77, -1],
        "siginfo of the queued signals"
    );
    assert_eq!(v[4], 0, "the alarm fired early");
    // The timer had less than 5 s left at the dump; it fires within that after the restore.
    assert!(
        wait_until(Duration::from_secs(6), || nums().get(4) == Some(&1)),
        "ITIMER_REAL did not fire after the restore: {:?}",
        nums()
    );
    assert!(t0.elapsed() < Duration::from_millis(5500));
    assert!(alive(new));
}

#[test]
fn posix_timer_survives_restore_with_its_id() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    // A periodic timer (20 ms, SIGUSR2 carrying 99) counted by a handler that checks the
    // value; the main loop writes `count bad_values gettime_ok`.
    let src = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static volatile int count = 0, bad = 0;
static void h(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (si->si_value.sival_int == 99) count++; else bad++;
}
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR2, &sa, 0);
    timer_t t;
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGUSR2;
    ev.sigev_value.sival_int = 99;
    timer_create(CLOCK_MONOTONIC, &ev, &t);
    struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
    timer_settime(t, 0, &its, 0);
    for (;;) {
        struct itimerspec cur;
        int ok = timer_gettime(t, &cur) == 0 && cur.it_interval.tv_nsec == 20000000;
        FILE *f = fopen(argv[1], "w");
        fprintf(f, "%d %d %d\n", count, bad, ok);
        fclose(f);
        usleep(10000);
    }
}
"#;
    let exe = build(dir.path(), "ptimer", src);
    let out = dir.path().join("n");
    let pid = spawn(&exe, &[&out], &mut procs);
    let reading = |out: &Path| {
        let v = read_nums(out);
        (v.len() == 3).then_some(v)
    };
    assert!(wait_until(Duration::from_secs(5), || reading(&out)
        .is_some_and(|v| v[0] > 10)));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let timers = &img.signals.posix_timers;
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!(timers[0].signo, libc::SIGUSR2);
    assert_eq!(timers[0].value & 0xffff_ffff, 99);
    assert_eq!(timers[0].interval, (0, 20_000_000));
    let at_dump = reading(&out).map_or(0, |v| v[0]);
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    let timers_now = std::fs::read_to_string(format!("/proc/{new}/timers")).unwrap();
    assert!(
        timers_now.contains(&format!("ID: {}", timers[0].id)),
        "{timers_now}"
    );
    // The timer keeps firing, with its value, and the program's timer_t still names it.
    assert!(
        wait_until(Duration::from_secs(5), || reading(&out)
            .is_some_and(|v| v[0] > at_dump + 20 && v[2] == 1)),
        "after the restore: {:?}",
        read_nums(&out)
    );
    assert_eq!(reading(&out).map(|v| v[1]), Some(0), "bad sigev values");
}

/// An eventfd holding 5 (non-blocking, close-on-exec) and a semaphore eventfd holding 2; when
/// file `go` appears the program reads them and writes `first second second_again`.
const EVENTFD_C: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    const char *dir = argv[1];
    char ready[512], go[512], out[512];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    snprintf(go, sizeof go, "%s/go", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    int a = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int b = eventfd(2, EFD_SEMAPHORE);
    uint64_t v = 5;
    write(a, &v, 8);
    FILE *f = fopen(ready, "w"); fclose(f);
    while (access(go, F_OK) != 0) usleep(10000);
    uint64_t x = 0, y = 0, z = 0;
    read(a, &x, 8);
    read(b, &y, 8);
    read(b, &z, 8);
    f = fopen(out, "w");
    fprintf(f, "%llu %llu %llu\n", (unsigned long long)x, (unsigned long long)y,
            (unsigned long long)z);
    fclose(f);
    for (;;) pause();
}
"#;

#[test]
fn eventfd_counter_survives_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "efd", EVENTFD_C);
    let pid = spawn(&exe, &[dir.path()], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || dir
        .path()
        .join("ready")
        .exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let kinds: Vec<_> = img
        .fds
        .iter()
        .filter(|f| matches!(f.kind, super::image::FdKind::EventFd { .. }))
        .map(|f| (f.fd, f.kind.clone(), f.flags & libc::O_NONBLOCK != 0))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                3,
                super::image::FdKind::EventFd {
                    count: 5,
                    semaphore: false
                },
                true
            ),
            (
                4,
                super::image::FdKind::EventFd {
                    count: 2,
                    semaphore: true
                },
                false
            ),
        ]
    );
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    let fdinfo = std::fs::read_to_string(format!("/proc/{new}/fdinfo/3")).unwrap();
    assert!(fdinfo.contains("eventfd-count:"), "{fdinfo}");
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let out = dir.path().join("out");
    assert!(
        wait_until(Duration::from_secs(5), || read_nums(&out).len() == 3),
        "restored program did not report"
    );
    // 5 at once; the semaphore hands out 1 and 1.
    assert_eq!(read_nums(&out), vec![5, 1, 1]);
}

/// A process under a seccomp filter is refused (a restore would drop its sandbox), naming
/// the thread, and keeps running.
#[test]
fn seccomp_filtered_process_is_refused() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stddef.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    struct sock_filter allow[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
    struct sock_fprog prog = { 1, allow };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        return 1;
    FILE *f = fopen(argv[1], "w"); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "filtered", src);
    let ready = dir.path().join("ready");
    let pid = spawn(&exe, &[&ready], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let err = dump(pid).unwrap_err().to_string();
    assert!(
        err.contains(&format!("thread {pid} under seccomp filters")) && err.contains("sandbox"),
        "{err}"
    );
    assert!(alive(pid));
}

/// A root process that dropped a capability from its bounding set is refused: a restore
/// would give it back.
#[test]
fn dropped_capabilities_are_refused() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdio.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <linux/capability.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    if (prctl(PR_CAPBSET_DROP, CAP_NET_RAW, 0, 0, 0)) return 1;
    FILE *f = fopen(argv[1], "w"); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "capless", src);
    let ready = dir.path().join("ready");
    let pid = spawn(&exe, &[&ready], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let err = dump(pid).unwrap_err().to_string();
    assert!(err.contains("its capabilities (CapBnd"), "{err}");
    assert!(alive(pid));
}

/// no_new_privs, set by the program but not by its restorer, is refused.
#[test]
fn no_new_privs_is_refused() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdio.h>
#include <unistd.h>
#include <sys/prctl.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return 1;
    FILE *f = fopen(argv[1], "w"); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "nnp", src);
    let ready = dir.path().join("ready");
    let pid = spawn(&exe, &[&ready], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let err = dump(pid).unwrap_err().to_string();
    assert!(err.contains("no_new_privs set"), "{err}");
    assert!(alive(pid));
}

/// A process that changed its root directory is refused, naming it.
#[test]
fn chrooted_process_is_refused() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let src = r#"
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    if (chroot(argv[1]) || chdir("/")) return 1;
    FILE *f = fopen("/ready", "w");
    fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "jailed", src);
    let ready = jail.join("ready");
    let pid = spawn(&exe, &[&jail], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let err = dump(pid).unwrap_err().to_string();
    assert!(
        err.contains("a root directory of its own") && err.contains("jail"),
        "{err}"
    );
    assert!(alive(pid));
}

/// A `dup` of an eventfd is recorded as a [`super::image::FdKind::Dup`] and comes back as
/// the same open file, not a second eventfd.
#[test]
fn duplicated_eventfd_is_one_file_after_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int a = eventfd(0, 0);
    dup(a);
    FILE *f = fopen(argv[1], "w"); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "efd2", src);
    let ready = dir.path().join("ready");
    let pid = spawn(&exe, &[&ready], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let fd4 = img.fds.iter().find(|f| f.fd == 4).expect("fd 4 recorded");
    assert_eq!(fd4.kind, super::image::FdKind::Dup { pid, fd: 3 });
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    assert_eq!(super::sys::same_file(new, 3, new, 4), Some(true));
}

/// A periodic timerfd (every 50 ms, never read before `go`) and a signalfd for SIGUSR1. When
/// file `go` appears the program reads the timer's expirations, waits for SIGUSR1 on the
/// signalfd and writes `expirations signo`.
const TIMERFD_C: &str = r#"
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    const char *dir = argv[1];
    char ready[512], go[512], out[512];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    snprintf(go, sizeof go, "%s/go", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    int t = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct itimerspec its = { { 0, 50000000 }, { 0, 50000000 } };
    timerfd_settime(t, 0, &its, 0);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, 0);
    int s = signalfd(-1, &set, SFD_CLOEXEC);
    usleep(300000);
    FILE *f = fopen(ready, "w"); fclose(f);
    while (access(go, F_OK) != 0) usleep(10000);
    uint64_t n = 0;
    read(t, &n, 8);
    struct signalfd_siginfo si;
    read(s, &si, sizeof si);
    f = fopen(out, "w");
    fprintf(f, "%llu %u\n", (unsigned long long)n, si.ssi_signo);
    fclose(f);
    for (;;) pause();
}
"#;

#[test]
fn timerfd_and_signalfd_survive_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "tfd", TIMERFD_C);
    let pid = spawn(&exe, &[dir.path()], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || dir
        .path()
        .join("ready")
        .exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let ticks = img
        .fds
        .iter()
        .find_map(|f| match f.kind {
            super::image::FdKind::TimerFd {
                clock,
                ticks,
                interval,
                ..
            } => {
                assert_eq!(clock, libc::CLOCK_MONOTONIC);
                assert_eq!(interval, (0, 50_000_000));
                Some(ticks)
            }
            _ => None,
        })
        .expect("a timerfd in the image");
    // The kernel counts a periodic timer's overruns only when it is read: at least one.
    assert!(ticks >= 1, "unread expirations at the dump: {ticks}");
    assert!(img.fds.iter().any(|f| f.kind
        == super::image::FdKind::SignalFd {
            mask: 1 << (libc::SIGUSR1 - 1)
        }));
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sys::kill(new, libc::SIGUSR1).unwrap();
    let out = dir.path().join("out");
    assert!(
        wait_until(Duration::from_secs(5), || read_nums(&out).len() == 2),
        "restored program did not report"
    );
    let v = read_nums(&out);
    assert!(v[0] >= ticks, "expirations {} < {ticks} at the dump", v[0]);
    assert_eq!(v[1], libc::SIGUSR1 as u64);
    // Still periodic after the restore.
    let info = std::fs::read_to_string(format!("/proc/{new}/fdinfo/3")).unwrap();
    assert!(info.contains("it_interval: (0, 50000000)"), "{info}");
}

/// The same for a timerfd.
#[test]
fn duplicated_timerfd_is_one_file_after_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdio.h>
#include <sys/timerfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    int t = timerfd_create(CLOCK_MONOTONIC, 0);
    dup(t);
    FILE *f = fopen(argv[1], "w"); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "tfd2", src);
    let ready = dir.path().join("ready");
    let pid = spawn(&exe, &[&ready], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || ready.exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let fd4 = img.fds.iter().find(|f| f.fd == 4).expect("fd 4 recorded");
    assert_eq!(fd4.kind, super::image::FdKind::Dup { pid, fd: 3 });
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    assert_eq!(super::sys::same_file(new, 3, new, 4), Some(true));
}

/// Opens a pseudo-terminal pair: (master, slave, slave's path).
fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd, PathBuf) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; the name, termios and
    // winsize pointers may be null.
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
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    let (m, s) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(s),
        )
    };
    let path = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&s)
    ))
    .unwrap();
    (m, s, path)
}

/// Reads what arrives on a pty master for `d`.
fn drain(m: &std::os::fd::OwnedFd, d: Duration) -> String {
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
        // SAFETY: reading into a local buffer of its size.
        let n = unsafe { libc::read(m.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&b[..n as usize]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn terminal_output_moves_to_the_restoring_terminal() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    for (unsigned long n = 0;; n++) { printf("tick %lu\n", n); fflush(stdout); usleep(20000); }
}
"#;
    let exe = build(dir.path(), "ticker", src);
    let (m1, s1, path1) = pty();
    let child = Command::new(&exe)
        .stdin(Stdio::null())
        .stdout(Stdio::from(s1))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    procs.add(pid);
    drop(child);
    let before = drain(&m1, Duration::from_millis(300));
    assert!(before.contains("tick 3"), "{before:?}");
    // A terminal that is not the dumper's own is refused...
    let err = dump(pid).unwrap_err().to_string();
    assert!(err.contains("fd 1") && err.contains("terminal"), "{err}");
    // ...unless named as the session's terminal.
    let md = std::fs::metadata(&path1).unwrap();
    let opts = super::dump::DumpOptions {
        terminals: vec![(
            std::os::unix::fs::MetadataExt::dev(&md),
            std::os::unix::fs::MetadataExt::rdev(&md),
        )],
        ..Default::default()
    };
    let img = roundtrip_bytes(&super::dump::dump_with(pid, &opts).unwrap());
    assert_eq!(
        img.fds.iter().find(|f| f.fd == 1).map(|f| f.kind.clone()),
        Some(super::image::FdKind::Tty)
    );
    procs.kill(pid);
    let last = |s: &str| -> u64 {
        s.lines()
            .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let at_dump = last(&drain(&m1, Duration::from_millis(100))).max(last(&before));
    // A new terminal, named by a directory of 0/1/2 as /proc/PID/fd is.
    let (m2, s2, path2) = pty();
    let term = dir.path().join("term");
    std::fs::create_dir(&term).unwrap();
    for n in ["0", "1", "2"] {
        std::os::unix::fs::symlink(&path2, term.join(n)).unwrap();
    }
    let new = restore_with(
        &img,
        &RestoreOptions {
            terminal: Some(&term),
            ..Default::default()
        },
    )
    .unwrap();
    procs.add(new);
    drop(s2);
    let after = drain(&m2, Duration::from_millis(500));
    let first = after
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse::<u64>().ok())
        .min()
        .unwrap_or_else(|| panic!("nothing on the new terminal: {after:?}"));
    assert!(
        first <= at_dump + 2 && last(&after) > first,
        "continues from {at_dump}: {after:?}"
    );
}

#[test]
fn epoll_watching_eventfd_and_timerfd_survives_restore() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let src = r#"
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    const char *dir = argv[1];
    char ready[512], go[512], out[512];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    snprintf(go, sizeof go, "%s/go", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    int e = eventfd(0, EFD_NONBLOCK);
    int t = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = { { 0, 30000000 }, { 0, 30000000 } };
    timerfd_settime(t, 0, &its, 0);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 111 };
    epoll_ctl(ep, EPOLL_CTL_ADD, e, &ev);
    ev.data.u64 = 222;
    epoll_ctl(ep, EPOLL_CTL_ADD, t, &ev);
    FILE *f = fopen(ready, "w"); fclose(f);
    while (access(go, F_OK) != 0) usleep(10000);
    uint64_t one = 1, x;
    write(e, &one, 8);
    int seen1 = 0, seen2 = 0;
    while (!(seen1 && seen2)) {
        struct epoll_event got[4];
        int n = epoll_wait(ep, got, 4, 1000);
        for (int i = 0; i < n; i++) {
            if (got[i].data.u64 == 111) { seen1 = 1; read(e, &x, 8); }
            if (got[i].data.u64 == 222) { seen2 = 1; read(t, &x, 8); }
        }
    }
    f = fopen(out, "w"); fprintf(f, "%d %d\n", seen1, seen2); fclose(f);
    for (;;) pause();
}
"#;
    let exe = build(dir.path(), "ep", src);
    let pid = spawn(&exe, &[dir.path()], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || dir
        .path()
        .join("ready")
        .exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let watches = img
        .fds
        .iter()
        .find_map(|f| match &f.kind {
            super::image::FdKind::Epoll { watches } => Some(watches.clone()),
            _ => None,
        })
        .expect("an epoll instance in the image");
    let mut got: Vec<(i32, u64)> = watches.iter().map(|w| (w.fd, w.data)).collect();
    got.sort_unstable();
    assert_eq!(got, vec![(3, 111), (4, 222)]);
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let out = dir.path().join("out");
    assert!(
        wait_until(Duration::from_secs(5), || read_nums(&out) == vec![1, 1]),
        "the restored epoll did not report both watches: {:?}",
        read_nums(&out)
    );
}

/// Parent and child share an anonymous MAP_SHARED counter and a sealed memfd (the parent
/// reads through its descriptor what the child writes through a mapping); the memfd has a
/// hole, a size that is not a multiple of the page, a file position and seals.
const SHARED_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    volatile unsigned long *n = mmap(0, 4096, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int mfd = memfd_create("fp-test", MFD_ALLOW_SEALING);
    if (ftruncate(mfd, (3 << 20) + 100)) return 1;
    char pat[8192];
    for (int i = 0; i < 8192; i++) pat[i] = (char)(i * 7 + 1);
    if (pwrite(mfd, pat, 8192, 0) != 8192 || pwrite(mfd, pat, 100, 2 << 20) != 100) return 1;
    volatile unsigned long *m = mmap(0, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 4 * 4096);
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) return 1;
    /* Keep the writable mapping, refuse new ones, lock the seals: the mapping must be made
       again before the seal at restore. */
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)) return 1;
    lseek(mfd, 1234, SEEK_SET);
    signal(SIGUSR1, on_usr1);
    if (fork() == 0) for (;;) { (*n)++; m[0] = *n; usleep(5000); }
    for (;;) {
        unsigned long via_fd = 0;
        if (pread(mfd, &via_fd, 8, 4 * 4096) != 8) via_fd = 0;
        FILE *f = fopen(argv[1], "w"); fprintf(f, "%lu %lu\n", *n, via_fd); fclose(f);
        if (go) {
            go = 0;
            char buf[8192], z[4096], link[256] = {0}, p[64];
            int ok = pread(mfd, buf, 8192, 0) == 8192 && memcmp(buf, pat, 8192) == 0;
            ok = ok && pread(mfd, buf, 100, 2 << 20) == 100 && memcmp(buf, pat, 100) == 0;
            ok = ok && pread(mfd, z, 4096, 1 << 20) == 4096;
            for (int i = 0; i < 4096; i++) if (z[i]) ok = 0;
            struct stat st;
            fstat(mfd, &st);
            snprintf(p, sizeof p, "/proc/self/fd/%d", mfd);
            if (readlink(p, link, 255) < 0) link[0] = 0;
            FILE *r = fopen(argv[2], "w");
            fprintf(r, "%d %ld %d %ld %s\n", ok, (long)st.st_size, fcntl(mfd, F_GET_SEALS),
                    (long)lseek(mfd, 0, SEEK_CUR), link);
            fclose(r);
        }
        usleep(10000);
    }
}
"#;

#[test]
fn shared_memory_and_memfds_stay_shared_across_restore() {
    require_env!();
    use super::dump::{dump_tree, AfterDump, DumpOptions};
    use super::restore::{restore_tree, TreeRestoreOptions};
    let mut guard = TreeGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "shared", SHARED_C);
    let out = dir.path().join("n");
    let report = dir.path().join("report");
    let child = Command::new(&exe)
        .args([&out, &report])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = child.id() as i32;
    drop(child);
    guard.add(&[root]);
    let nums = || read_nums(&out);
    assert!(wait_until(Duration::from_secs(5), || nums()
        .first()
        .is_some_and(|n| *n > 5)));
    let kids: Vec<i32> = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    guard.add(&kids);
    let img = dump_tree(
        root,
        &DumpOptions {
            after: AfterDump::Kill,
            ..Default::default()
        },
        &mut || Ok(()),
    )
    .unwrap();
    let img = super::image::decode_tree(&super::image::encode_tree(&img).unwrap()).unwrap();
    assert_eq!(img.memfds.len(), 2, "the shared counter and the memfd");
    let mfd = img.memfds.iter().find(|f| f.name == "fp-test").unwrap();
    assert_eq!(mfd.size, (3 << 20) + 100);
    let seals =
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
    assert_eq!(mfd.seals, Some(seals as u32));
    assert!(
        mfd.contents.covered_bytes() <= 64 << 10,
        "the hole was recorded: {} bytes",
        mfd.contents.covered_bytes()
    );
    guard.kill_all();
    let at_dump = nums()[0];
    let new_root = restore_tree(
        &img,
        &TreeRestoreOptions {
            keep_pids: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(new_root, root);
    guard.add(&[root]);
    guard.add(&kids);
    // The child's counter reaches the parent through both the shared anonymous page and
    // the memfd (written through a mapping, read through the descriptor).
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = nums();
            v.len() == 2 && v[0] > at_dump + 20 && v[1] > at_dump + 10
        }),
        "the shared counters did not move on together: {:?} (at dump {at_dump})",
        nums()
    );
    sys::kill(root, libc::SIGUSR1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&report).is_ok_and(|s| s.ends_with('\n'))
    }));
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        format!(
            "1 {} {} 1234 /memfd:fp-test (deleted)\n",
            (3 << 20) + 100,
            seals
        ),
        "contents, hole, size, seals, position and name of the memfd"
    );
}

/// A parent streams numbers to its child over three unix socket pairs: a stream (8-byte
/// counters), datagrams (one per four counters) and, written once before the fork, two
/// SEQPACKET messages followed by a shutdown, which the child reads only on SIGUSR1; and a
/// fourth pair whose other end was closed after "bye" was sent.
const SOCKETS_C: &str = r#"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }

static void put(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    syscall(SYS_close_range, 3, ~0U, 0); /* drop fds inherited from the test harness */
    int s[2], d[2], q[2], x[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, s) || socketpair(AF_UNIX, SOCK_DGRAM, 0, d) ||
        socketpair(AF_UNIX, SOCK_SEQPACKET, 0, q) || socketpair(AF_UNIX, SOCK_STREAM, 0, x))
        return 3;
    send(q[0], "hello", 5, 0);
    send(q[0], "world!", 6, 0);
    shutdown(q[0], SHUT_WR);
    /* a pair whose other end is gone: "bye", then end of file */
    send(x[0], "bye", 3, 0);
    close(x[0]);
    signal(SIGUSR1, on_usr1);
    pid_t c = fork();
    if (c == 0) {
        close(s[0]); close(d[0]); close(q[0]);
        /* peek at "hello" with a peek offset: the next peek sees "world!" */
        int z = 0;
        char pk[16];
        setsockopt(q[1], SOL_SOCKET, SO_PEEK_OFF, &z, sizeof z);
        recv(q[1], pk, sizeof pk, MSG_PEEK);
        unsigned long long ns = 0, nd = 0;
        int bad = 0;
        for (;;) {
            unsigned long long v = 0;
            size_t got = 0;
            while (got < 8) {
                ssize_t n = read(s[1], (char *)&v + got, 8 - got);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) { bad = 1; break; }
                got += n;
            }
            if (v != ns && !bad) bad = 2;
            ns++;
            if (ns % 4 == 0) {
                unsigned long long w = 0;
                ssize_t n;
                do n = recv(d[1], &w, sizeof w, 0); while (n < 0 && errno == EINTR);
                if ((n != 8 || w != nd) && !bad) bad = 3;
                nd++;
            }
            if (ns % 64 == 0) {
                char b[100];
                snprintf(b, sizeof b, "%llu %llu %d\n", ns, nd, bad);
                put(argv[1], b);
                /* Slow enough that the stream stays full while the dump freezes the parent,
                   then this process (draining ~200 KB takes seconds, even on a busy machine). */
                usleep(4000);
            }
            if (go) {
                go = 0;
                char out[256] = "peek:", r[64];
                ssize_t p = recv(q[1], r, sizeof r - 1, MSG_PEEK);
                r[p > 0 ? p : 0] = 0;
                strcat(out, r);
                strcat(out, "|");
                for (;;) {
                    ssize_t n = recv(q[1], r, sizeof r - 1, 0);
                    if (n < 0 && errno == EINTR) continue;
                    if (n <= 0) { strcat(out, n == 0 ? "EOF|" : "ERR|"); break; }
                    r[n] = 0;
                    strcat(out, r);
                    strcat(out, ",");
                }
                for (;;) {
                    ssize_t n = read(x[1], r, sizeof r - 1);
                    if (n < 0 && errno == EINTR) continue;
                    if (n <= 0) { strcat(out, n == 0 ? "EOF\n" : "ERR\n"); break; }
                    r[n] = 0;
                    strcat(out, r);
                    strcat(out, ",");
                }
                put(argv[3], out);
            }
        }
    }
    close(s[1]); close(d[1]); close(q[1]); close(x[1]);
    char b[32];
    snprintf(b, sizeof b, "%d\n", (int)c);
    put(argv[2], b);
    for (unsigned long long v = 0;; v++) {
        size_t off = 0;
        while (off < 8) {
            ssize_t n = write(s[0], (char *)&v + off, 8 - off);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return 4;
            off += n;
        }
        if (v % 4 == 3) {
            unsigned long long w = v / 4;
            ssize_t n;
            do n = send(d[0], &w, sizeof w, 0); while (n < 0 && errno == EINTR);
            if (n != 8) return 5;
        }
    }
}
"#;

/// (counters read, datagrams read, error code) from the socket test's progress file.
fn socket_progress(path: &Path) -> (u64, u64, i32) {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.split_whitespace().collect();
    if v.len() != 3 {
        return (0, 0, 0);
    }
    (
        v[0].parse().unwrap_or(0),
        v[1].parse().unwrap_or(0),
        v[2].parse().unwrap_or(-1),
    )
}

#[test]
fn unix_socket_pairs_survive_with_queued_messages() {
    require_env!();
    use super::dump::{dump_tree, AfterDump, DumpOptions};
    use super::restore::{restore_tree, TreeRestoreOptions};
    let mut guard = TreeGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "sockets", SOCKETS_C);
    let prog = dir.path().join("progress");
    let pids_file = dir.path().join("pids");
    let report = dir.path().join("report");
    let child = Command::new(&exe)
        .args([&prog, &pids_file, &report])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = child.id() as i32;
    drop(child);
    guard.add(&[root]);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&pids_file).is_ok_and(|s| s.ends_with('\n'))
    }));
    let kid: i32 = std::fs::read_to_string(&pids_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    guard.add(&[kid]);
    assert!(wait_until(Duration::from_secs(10), || socket_progress(
        &prog
    )
    .0 >= 20_000));

    // A dump that lets the tree run on must leave the queues as they were (peeked only).
    dump_tree(root, &DumpOptions::default(), &mut || Ok(())).unwrap();
    let before = socket_progress(&prog).0;
    assert!(wait_until(Duration::from_secs(10), || socket_progress(
        &prog
    )
    .0 >= before
        + 20_000));
    assert_eq!(socket_progress(&prog).2, 0, "the child saw a gap");

    let img = dump_tree(
        root,
        &DumpOptions {
            after: AfterDump::Kill,
            ..Default::default()
        },
        &mut || Ok(()),
    )
    .unwrap();
    let img = super::image::decode_tree(&super::image::encode_tree(&img).unwrap()).unwrap();
    assert_eq!(img.sockets.len(), 4, "{:?}", img.sockets.len());
    assert!(
        img.sockets.iter().any(|p| p.ends[1].ino == 0),
        "the pair with a closed end"
    );
    let queued = |kind: i32| -> (usize, usize) {
        let p = img.sockets.iter().find(|p| p.kind == kind).unwrap();
        let msgs: usize = p.ends.iter().map(|e| e.queue.len()).sum();
        let bytes = p
            .ends
            .iter()
            .flat_map(|e| &e.queue)
            .map(|m| m.0.len())
            .sum();
        (msgs, bytes)
    };
    let (_, stream_bytes) = queued(libc::SOCK_STREAM);
    let (dgrams, _) = queued(libc::SOCK_DGRAM);
    assert!(stream_bytes > 0, "nothing in flight in the stream");
    assert!(dgrams > 0, "no datagram in flight");
    let seq = img
        .sockets
        .iter()
        .find(|p| p.kind == libc::SOCK_SEQPACKET)
        .unwrap();
    let msgs: Vec<&[u8]> = seq
        .ends
        .iter()
        .flat_map(|e| &e.queue)
        .map(|m| m.0.as_slice())
        .collect();
    assert_eq!(msgs, vec![&b"hello"[..], &b"world!"[..]]);
    eprintln!("sockets: {stream_bytes} stream bytes and {dgrams} datagrams in flight");
    guard.kill_all();
    let at_dump = socket_progress(&prog).0;
    let new_root = restore_tree(
        &img,
        &TreeRestoreOptions {
            keep_pids: true,
            ..Default::default()
        },
    )
    .unwrap();
    guard.add(&[root, kid]);
    assert_eq!(new_root, root);
    assert!(
        wait_until(Duration::from_secs(10), || socket_progress(&prog).0
            >= at_dump + 20_000
            || socket_progress(&prog).2 != 0),
        "the child did not continue: {:?}",
        socket_progress(&prog)
    );
    let (ns, nd, bad) = socket_progress(&prog);
    assert_eq!(
        bad, 0,
        "the child saw a gap or a bad message after the restore"
    );
    assert_eq!(nd, ns / 4);
    sys::kill(kid, libc::SIGUSR1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&report).is_ok_and(|s| s.ends_with('\n'))
    }));
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "peek:world!|hello,world!,EOF|bye,EOF\n",
        "the peek offset, SEQPACKET boundaries, the peer's shutdown, and a closed peer"
    );
}

/// 64 MiB of pseudo-random memory; on SIGUSR1 it rewrites one byte in every 4th page,
/// drops two pages with MADV_DONTNEED and maps a new 1 MiB region, then reports "changed".
const DIRTY_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
int main(int argc, char **argv) {
    syscall(SYS_close_range, 3, ~0U, 0);
    size_t n = 64 << 20;
    unsigned char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long x = 88172645463325252UL;
    for (size_t i = 0; i < n; i += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *(unsigned long *)(m + i) = x; }
    memset(m + 4096 * 9, 0, 4096 * 3); /* a few zero pages */
    signal(SIGUSR1, on_usr1);
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%lu %lu\n", (unsigned long)m, (unsigned long)n);
    fclose(f);
    for (;;) {
        if (go) {
            go = 0;
            for (size_t p = 0; p < n / 4096; p += 4) m[p * 4096 + 100] ^= 0x5a;
            madvise(m + 4096 * 5, 4096, MADV_DONTNEED);
            madvise(m + 4096 * 7, 4096, MADV_DONTNEED);
            unsigned char *extra = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(extra, 7, 1 << 20);
            f = fopen(argv[2], "w");
            fprintf(f, "%lu\n", (unsigned long)extra);
            fclose(f);
        }
        usleep(2000);
    }
}
"#;

#[test]
fn incremental_dump_reads_only_written_pages() {
    require_env!();
    use super::dirty::DirtyTracker;
    use super::dump::{dump_with, DumpOptions};
    use super::image::PageData;
    use std::sync::{Arc, Mutex};
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "dirty", DIRTY_C);
    let (ready, changed) = (dir.path().join("ready"), dir.path().join("changed"));
    let pid = spawn(&exe, &[&ready, &changed], &mut procs);
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&ready).is_ok_and(|s| s.ends_with('\n'))
    }));
    let v: Vec<u64> = std::fs::read_to_string(&ready)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (base, len) = (v[0], v[1]);
    let tracker = Arc::new(Mutex::new(DirtyTracker::new()));
    let opts = DumpOptions {
        dirty: Some(tracker.clone()),
        ..Default::default()
    };
    let mut chunks: std::collections::HashMap<[u8; 32], Vec<u8>> = Default::default();
    let mut externalize = |img: &mut ProcessImage| {
        img.memory
            .externalize(|h, b| {
                chunks.insert(*h, b.to_vec());
                Ok::<(), ()>(())
            })
            .unwrap();
    };
    let mut first = dump_with(pid, &opts).unwrap();
    externalize(&mut first);
    {
        let mut t = tracker.lock().unwrap();
        assert_eq!(t.reused_pages, 0, "nothing to reuse at the first dump");
        t.remember_memory([(pid, &first.memory)]);
    }
    sys::kill(pid, libc::SIGUSR1).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&changed).is_ok_and(|s| s.ends_with('\n'))
    }));
    let extra: u64 = std::fs::read_to_string(&changed)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut second = dump_with(pid, &opts).unwrap();
    let reused = tracker.lock().unwrap().reused_pages;
    let pages = len / 4096;
    eprintln!("incremental dump: {reused} of {pages} pages of the buffer reused");
    // Every 4th page was written (8192 regions: more than one scan buffer), two dropped:
    // the rest of the buffer is reused.
    assert!(
        reused >= pages - pages / 4 - 2 && reused < pages,
        "{reused} pages reused"
    );
    externalize(&mut second);
    // Runs stay in address order, without overlaps (taken and read pages are merged).
    for w in second.memory.runs.windows(2) {
        assert!(
            w[0].addr + w[0].len <= w[1].addr,
            "runs {:#x}+{:#x} and {:#x} out of order",
            w[0].addr,
            w[0].len,
            w[1].addr
        );
    }
    // The same process dumped in full must give the same memory, page for page.
    let mut full = dump_with(pid, &DumpOptions::default()).unwrap();
    externalize(&mut full);
    let pages_of = |img: &ProcessImage, lo: u64, hi: u64| -> Vec<(u64, PageData)> {
        let mut out = Vec::new();
        for r in img
            .memory
            .runs
            .iter()
            .filter(|r| r.addr < hi && lo < r.addr + r.len)
        {
            for a in (r.addr..r.addr + r.len).step_by(4096) {
                out.push((a, r.data.clone()));
            }
        }
        out
    };
    for (lo, hi) in [(base, base + len), (extra, extra + (1 << 20))] {
        let (a, b) = (pages_of(&second, lo, hi), pages_of(&full, lo, hi));
        assert_eq!(a.len(), b.len(), "pages of {lo:#x}-{hi:#x}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                x,
                y,
                "page {:#x} (page {} of {lo:#x})",
                x.0,
                (x.0 - lo) / 4096
            );
        }
    }
    // The dropped pages are gone (not reused from the first image).
    for p in [5u64, 7] {
        let a = base + p * 4096;
        assert!(
            pages_of(&second, a, a + 4096).is_empty(),
            "dropped page {p} was dumped"
        );
    }
    assert_eq!(pages_of(&second, extra, extra + (1 << 20)).len(), 256);
}

const PROTECTED_C: &str = r#"
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    syscall(SYS_close_range, 3, ~0U, 0);
    unsigned long *p = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (long i = 0; i < 3 * 512; i++) p[i] = 0x5a5a000000000000UL + i;
    /* process_vm_readv cannot read this page (no FOLL_FORCE): the dump falls back */
    mprotect(p + 512, 4096, PROT_NONE);
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%lu\n", (unsigned long)p);
    fclose(f);
    for (;;) pause();
}
"#;

/// Pages the fast read cannot reach (here a written page made PROT_NONE) are read through
/// the tracer; the image holds every byte of the three pages, and the restored process has
/// them back.
#[test]
fn dump_reads_pages_the_fast_path_cannot() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "protected", PROTECTED_C);
    let addr_file = dir.path().join("addr");
    let pid = spawn(&exe, &[&addr_file], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&addr_file).is_ok_and(|s| s.ends_with('\n'))
    }));
    let addr: u64 = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let img = dump(pid).unwrap();
    for i in 0..3 * 512u64 {
        assert_eq!(
            img.memory.read_u64(addr + i * 8),
            Some(0x5a5a_0000_0000_0000 + i),
            "word {i}"
        );
    }
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    let mut page = vec![0u8; 3 * 4096];
    std::fs::File::open(format!("/proc/{new}/mem"))
        .unwrap()
        .read_exact_at(&mut page, addr)
        .unwrap();
    for (i, w) in page.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(v, 0x5a5a_0000_0000_0000 + i as u64, "restored word {i}");
    }
}

/// Regions filled with a pattern; after a restore (SIGUSR1) the program forks a child that
/// checks one region, moves another with mremap, drops a third with MADV_DONTNEED, unmaps a
/// fourth, and checks what it then sees.
const LAZY_C: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#define P 4096UL
static volatile sig_atomic_t go;
static volatile sig_atomic_t go2;
static void on_usr1(int s) { (void)s; go = 1; }
static void on_usr2(int s) { (void)s; go2 = 1; }
static unsigned long pat(unsigned long i, unsigned long salt) { return (i + salt) * 2654435761UL; }
static void fill(unsigned long *m, unsigned long n, unsigned long salt) { for (unsigned long i = 0; i < n; i++) m[i] = pat(i, salt); }
static long check(const unsigned long *m, unsigned long n, unsigned long salt) { for (unsigned long i = 0; i < n; i++) if (m[i] != pat(i, salt)) return (long)i; return -1; }
static void report(const char *dir, const char *name, const char *text) {
    char p[4096], t[4096]; snprintf(p, sizeof p, "%s/%s", dir, name); snprintf(t, sizeof t, "%s.tmp", p);
    FILE *f = fopen(t, "w"); fputs(text, f); fclose(f); rename(t, p);
}
int main(int argc, char **argv) {
    const char *dir = argv[1];
    for (int fd = 3; fd < 1024; fd++) close(fd);
    unsigned long na = 300 * P / 8, nb = 40 * P / 8, nc = 20 * P / 8;
    unsigned long *a = mmap(0, 300 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *b = mmap(0, 40 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *c = mmap(0, 20 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *d = mmap(0, 20 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *r = mmap(0, 40 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* two neighbouring mappings (the second half made read-only): one copy cannot span them */
    unsigned long *e = mmap(0, 32 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(a, na, 1); fill(b, nb, 2); fill(c, nc, 3); fill(d, nc, 4); fill(e, 32 * P / 8, 5);
    mprotect((char *)e + 16 * P, 16 * P, PROT_READ);
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    report(dir, "ready", "1\n");
    while (!go) usleep(1000);
    pid_t kid = fork();
    if (kid == 0) {
        char t[64]; snprintf(t, sizeof t, "%ld %ld\n", check(a, na, 1), check(b, nb, 2));
        report(dir, "child", t);
        _exit(0);
    }
    unsigned long *moved = mremap(b, 40 * P, 40 * P, MREMAP_MAYMOVE | MREMAP_FIXED, r);
    madvise(c, 20 * P, MADV_DONTNEED);
    munmap(d, 20 * P);
    long zero = -1;
    for (unsigned long i = 0; i < nc; i++) if (c[i] != 0) { zero = (long)i; break; }
    char t[128];
    snprintf(t, sizeof t, "%ld %ld %ld %d\n", check(a, na, 1), moved == r ? check(r, nb, 2) : -2, zero, waitpid(kid, 0, 0) == kid);
    report(dir, "parent", t);
    /* e is first read on SIGUSR2, after the background pass filled it */
    while (!go2) usleep(1000);
    snprintf(t, sizeof t, "%ld\n", check(e, 32 * P / 8, 5));
    report(dir, "e", t);
    for (;;) pause();
}
"#;

/// Page chunks of an image, kept in memory; `broken` makes every fetch fail.
struct LazyChunks {
    map: std::collections::HashMap<[u8; 32], Vec<u8>>,
    broken: std::sync::atomic::AtomicBool,
}

impl super::restore::ChunkSource for LazyChunks {
    fn fetch(&self, hash: &[u8; 32], _len: u64) -> Result<Vec<u8>, String> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("damaged on disk".into());
        }
        self.map.get(hash).cloned().ok_or_else(|| "missing".into())
    }
}

/// Runs [`LAZY_C`] in `dir` under `guard` until it is ready, dumps it (killed after) and
/// moves its memory into chunks.
fn lazy_program_image(
    guard: &mut TreeGuard,
    dir: &Path,
) -> (super::image::TreeImage, std::sync::Arc<LazyChunks>) {
    use super::dump::{dump_tree, AfterDump, DumpOptions};
    let exe = build(dir, "lazy", LAZY_C);
    let child = Command::new(&exe)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = child.id() as i32;
    drop(child);
    guard.add(&[root]);
    assert!(wait_until(Duration::from_secs(5), || dir
        .join("ready")
        .exists()));
    let mut img = dump_tree(
        root,
        &DumpOptions {
            after: AfterDump::Kill,
            ..Default::default()
        },
        &mut || Ok(()),
    )
    .unwrap();
    guard.kill_all();
    let mut map = std::collections::HashMap::new();
    for p in img.processes.iter_mut().filter_map(|m| m.live_mut()) {
        p.memory
            .externalize(|h, b| {
                map.insert(*h, b.to_vec());
                Ok::<(), ()>(())
            })
            .unwrap();
    }
    let chunks = LazyChunks {
        map,
        broken: std::sync::atomic::AtomicBool::new(false),
    };
    (img, std::sync::Arc::new(chunks))
}

/// Lazy restore: with the background pass held back, every page the program (and its
/// child, forked while pages were missing) reads comes from a fault; moved, dropped and
/// unmapped ranges are followed. Then the rest is filled in and the userfaultfd let go.
#[test]
fn lazy_restore_serves_faults_forks_and_remaps() {
    require_env!();
    use super::lazy::LazyFill;
    use super::restore::{restore_tree, TreeRestoreOptions};
    let mut guard = TreeGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str| std::fs::read_to_string(dir.path().join(n)).ok();
    let (img, chunks) = lazy_program_image(&mut guard, dir.path());
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let k = killed.clone();
    let lazy = LazyFill::start(
        chunks.clone(),
        Box::new(move |_| k.store(true, std::sync::atomic::Ordering::SeqCst)),
    )
    .unwrap();
    let new_root = restore_tree(
        &img,
        &TreeRestoreOptions {
            lazy: Some(&lazy),
            chunks: Some(&*chunks),
            ..Default::default()
        },
    )
    .unwrap();
    guard.add(&[new_root]);
    // Not committed: no background pass, only faults.
    sys::kill(new_root, libc::SIGUSR1).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || file("parent").is_some()),
        "the restored program did not finish its checks"
    );
    assert_eq!(
        file("child").as_deref(),
        Some("-1 -1\n"),
        "the child's view"
    );
    assert_eq!(
        file("parent").as_deref(),
        Some("-1 -1 -1 1\n"),
        "the parent's view: region, moved region, dropped region, child reaped"
    );
    assert!(!lazy.is_done());
    lazy.commit();
    let stats = lazy.wait().unwrap();
    assert!(!killed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(stats.faults > 0, "{stats:?}");
    assert_eq!(stats.forks, 1, "{stats:?}");
    // Two neighbouring mappings filled by the background pass alone.
    sys::kill(new_root, libc::SIGUSR2).unwrap();
    assert!(wait_until(Duration::from_secs(10), || file("e").is_some()));
    assert_eq!(
        file("e").as_deref(),
        Some("-1\n"),
        "the neighbouring mappings"
    );
    // The program runs on with its userfaultfd gone.
    let maps = std::fs::read_to_string(format!("/proc/{new_root}/maps")).unwrap();
    assert!(!maps.is_empty());
    assert!(Path::new(&format!("/proc/{new_root}")).exists());
    drop(lazy);
}

/// A page the lazy fill cannot fetch: the program is killed (through `on_error`) before
/// anything lets it run on with memory that is not its own, and `wait` names the failure.
#[test]
fn lazy_restore_kills_the_program_when_a_page_cannot_be_fetched() {
    require_env!();
    use super::lazy::LazyFill;
    use super::restore::{restore_tree, TreeRestoreOptions};
    let mut guard = TreeGuard::new();
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str| std::fs::read_to_string(dir.path().join(n)).ok();
    let (img, chunks) = lazy_program_image(&mut guard, dir.path());
    let victim = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let v = victim.clone();
    let lazy = LazyFill::start(
        chunks.clone(),
        Box::new(move |_| {
            let _ = sys::kill(v.load(std::sync::atomic::Ordering::SeqCst), libc::SIGKILL);
        }),
    )
    .unwrap();
    let new_root = restore_tree(
        &img,
        &TreeRestoreOptions {
            lazy: Some(&lazy),
            chunks: Some(&*chunks),
            ..Default::default()
        },
    )
    .unwrap();
    guard.add(&[new_root]);
    victim.store(new_root, std::sync::atomic::Ordering::SeqCst);
    chunks
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    sys::kill(new_root, libc::SIGUSR1).unwrap();
    let err = lazy.wait().unwrap_err();
    assert!(err.contains("damaged on disk"), "{err}");
    let dead = || {
        std::fs::read_to_string(format!("/proc/{new_root}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), dead),
        "the program was killed"
    );
    assert!(file("parent").is_none(), "it never reported what it read");
}

const SPAN_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    char p[512];
    snprintf(p, sizeof p, "%s/data", argv[1]);
    int f = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    char page[4096];
    memset(page, 'F', sizeof page);
    write(f, page, sizeof page);
    write(f, page, sizeof page);
    /* A file page, written with zeros (private: its copy is anonymous), right before an
       anonymous page that holds zeros: one zero run across two mappings. */
    char *m = mmap(0, 4 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mmap(m, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, f, 0) != m) return 1;
    if (mmap(m + 2 * 4096, 2 * 4096, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != m + 2 * 4096) return 2;
    close(f);
    memset(m + 4096, 0, 4096);
    m[2 * 4096] = 0;
    m[3 * 4096] = 'A';
    snprintf(p, sizeof p, "%s/ready", argv[1]);
    close(open(p, O_WRONLY | O_CREAT, 0644));
    snprintf(p, sizeof p, "%s/go", argv[1]);
    while (access(p, F_OK) != 0) usleep(10000);
    snprintf(p, sizeof p, "%s/out", argv[1]);
    FILE *o = fopen(p, "w");
    fprintf(o, "%d %d %d %d\n", m[0], m[4096], m[2 * 4096], m[3 * 4096]);
    fclose(o);
    for (;;) pause();
}
"#;

/// A zero run that goes on from a private file mapping into the anonymous mapping after it
/// (a forked child's heap grown after the fork is a second `[heap]` right after the first,
/// as in PostgreSQL's workers) is restored: the file page gets its zeros back instead of
/// the file's bytes.
#[test]
fn zero_run_across_adjacent_mappings_is_restored() {
    require_env!();
    let mut procs = Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let exe = build(dir.path(), "span", SPAN_C);
    let pid = spawn(&exe, &[dir.path()], &mut procs);
    assert!(wait_until(Duration::from_secs(5), || dir
        .path()
        .join("ready")
        .exists()));
    let img = roundtrip_bytes(&dump(pid).unwrap());
    let spans = img.memory.runs.iter().any(|r| {
        r.data == super::image::PageData::Zero
            && img
                .mappings
                .iter()
                .any(|m| r.addr < m.end && m.end < r.addr + r.len)
    });
    assert!(spans, "the image has a zero run across a mapping boundary");
    procs.kill(pid);
    let new = restore(&img).unwrap();
    procs.add(new);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let out = dir.path().join("out");
    assert!(
        wait_until(Duration::from_secs(5), || read_nums(&out).len() == 4),
        "restored program did not report: alive {}, {:?}",
        alive(new),
        std::fs::read_to_string(&out)
    );
    assert_eq!(read_nums(&out), vec![70, 0, 0, 65]);
}
