//! Crash test of the FUSE daemon: writers load a mount, the daemon is killed with SIGKILL
//! at a random moment, and `forkpoint mount` must bring the store back by itself (cleaning
//! up the dead mount) to a state that keeps every fsynced write byte for byte:
//!
//! * `log`: an append-only stream of records. The fsynced prefix must be exact; past it,
//!   every byte is the stream's byte or zero (a page not yet written back), up to the end of
//!   what was written.
//! * `slots`: 64 page-sized slots rewritten in place with increasing generations. Every slot
//!   must hold one complete record, of a generation between the last fsynced one and the last
//!   one written.
//! * `cur`: replaced atomically (write `tmp`, fsync, rename over `cur`, fsync the directory).
//!   It must hold one complete version, no older than the last one fsynced after its rename.
//! * `churn/`: files created and removed; every name fsynced and not removed since must be
//!   there with its exact contents, and no name that was never created may appear.
//!
//! Nothing else may appear, `forkpoint verify` must pass on the crashed store, and the data of
//! earlier rounds must read back unchanged in every later round. Five rounds kill at
//! different delays (one after the daemon's 5 s periodic commit). `FORKPOINT_CRASH_SEED`
//! replays a run.
//!
//! Each remount follows the crash at once, as a user would remount: the kernel may still
//! answer `stat` of the dead mount's root from its attribute cache (observed for up to about
//! a minute after a daemon dies under write load, while `statfs` and `readdir` fail with
//! ENOTCONN at once), so `forkpoint mount` must not rely on `stat` to recognize a dead mount.
//! `mount_right_after_daemon_death` is the minimal case.

mod common;

use common::{fp_ok, Lab, Rng, Watchdog};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLOTS: u64 = 64;
const SLOT: usize = 4096;
const MAGIC: &[u8; 4] = b"FPCR";
/// The log writer stops appending here (it keeps fsyncing).
const LOG_CAP: u64 = 12 << 20;

/// A record: MAGIC, tag, index, generation, length, then deterministic bytes.
fn record(tag: u32, idx: u64, gen: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&idx.to_le_bytes());
    v.extend_from_slice(&gen.to_le_bytes());
    v.extend_from_slice(&(len as u64).to_le_bytes());
    let mut r = Rng::new((u64::from(tag) << 48) ^ (idx << 24) ^ gen);
    let body = r.bytes(len.saturating_sub(v.len()));
    v.extend_from_slice(&body);
    v.truncate(len);
    v
}

/// (index, generation, length) from a record header.
fn header(b: &[u8]) -> Option<(u64, u64, usize)> {
    if b.len() < 32 || &b[..4] != MAGIC {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    Some((u(8), u(16), u(24) as usize))
}

fn log_record_len(n: u64) -> usize {
    40 + (n.wrapping_mul(7919) % 3000) as usize
}

/// The first `len` bytes of round `round`'s log stream.
fn log_stream(round: u32, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut n = 0;
    while (out.len() as u64) < len {
        out.extend_from_slice(&record(round << 4 | 1, n, 0, log_record_len(n)));
        n += 1;
    }
    out.truncate(len as usize);
    out
}

fn cur_len(gen: u64) -> usize {
    64 + (gen.wrapping_mul(2_654_435_761) % 150_000) as usize
}

fn churn_len(k: u64) -> usize {
    32 + (k.wrapping_mul(40_503) % 9000) as usize
}

/// What the writers of one round did: the last fsynced state and the last attempted one.
#[derive(Default, Debug)]
struct Outcome {
    log_durable: u64,
    log_written: u64,
    slots_durable: Vec<u64>,
    slots_written: Vec<u64>,
    cur_durable: u64,
    cur_written: u64,
    /// Names present at the last successful directory fsync.
    churn_durable: BTreeSet<u64>,
    /// Names whose removal was attempted after that fsync.
    churn_removed_since: BTreeSet<u64>,
    /// Every name ever created.
    churn_created: BTreeSet<u64>,
    /// Errors before the daemon was killed (after it, any error is expected: ENOTCONN,
    /// ECONNABORTED, or EIO from a writeback that could not complete).
    unexpected: Vec<String>,
}

type Shared = Arc<std::sync::Mutex<Outcome>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Outcome> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` until it fails; an error before the kill started is recorded.
fn writer(
    name: &'static str,
    out: Shared,
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    body: impl FnOnce(&Shared, &AtomicBool) -> std::io::Result<()> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = body(&out, &stop) {
            if !killed.load(Ordering::SeqCst) {
                lock(&out)
                    .unexpected
                    .push(format!("{name}: {e} (before the daemon was killed)"));
            }
        }
    })
}

fn fsync_dir(d: &Path) -> std::io::Result<()> {
    File::open(d)?.sync_all()
}

fn pause(rng: &mut Rng) {
    std::thread::sleep(Duration::from_micros(200 + rng.below(800)));
}

/// Creates round `round`'s files (fsynced) and starts the writers.
fn start_writers(
    dir: &Path,
    round: u32,
    seed: u64,
    stop: &Arc<AtomicBool>,
    killed: &Arc<AtomicBool>,
) -> (Shared, Vec<std::thread::JoinHandle<()>>) {
    std::fs::create_dir_all(dir.join("churn")).expect("create the round directory");
    File::create(dir.join("log")).expect("create log");
    let slots = File::create(dir.join("slots")).expect("create slots");
    for i in 0..SLOTS {
        slots
            .write_all_at(&record(round << 4 | 2, i, 0, SLOT), i * SLOT as u64)
            .expect("write initial slots");
    }
    slots.sync_all().expect("fsync slots");
    fsync_dir(dir).expect("fsync round directory");
    let out: Shared = Arc::new(std::sync::Mutex::new(Outcome {
        slots_durable: vec![0; SLOTS as usize],
        slots_written: vec![0; SLOTS as usize],
        ..Outcome::default()
    }));
    let mut threads = Vec::new();

    let d = dir.to_path_buf();
    threads.push(writer(
        "log",
        out.clone(),
        stop.clone(),
        killed.clone(),
        move |out, stop| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(d.join("log"))?;
            let mut rng = Rng::new(seed ^ 0x10);
            let (mut n, mut len) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                if len < LOG_CAP {
                    let r = record(round << 4 | 1, n, 0, log_record_len(n));
                    lock(out).log_written = len + r.len() as u64;
                    f.write_all(&r)?;
                    n += 1;
                    len += r.len() as u64;
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if rng.chance(1, 20) {
                    f.sync_all()?;
                    lock(out).log_durable = len;
                }
                pause(&mut rng);
            }
            Ok(())
        },
    ));

    let d = dir.to_path_buf();
    threads.push(writer(
        "slots",
        out.clone(),
        stop.clone(),
        killed.clone(),
        move |out, stop| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("slots"))?;
            let mut rng = Rng::new(seed ^ 0x20);
            let mut gens = vec![0u64; SLOTS as usize];
            while !stop.load(Ordering::SeqCst) {
                let i = rng.below(SLOTS) as usize;
                gens[i] += 1;
                lock(out).slots_written[i] = gens[i];
                f.write_all_at(
                    &record(round << 4 | 2, i as u64, gens[i], SLOT),
                    i as u64 * SLOT as u64,
                )?;
                if rng.chance(1, 25) {
                    f.sync_all()?;
                    lock(out).slots_durable = gens.clone();
                }
                pause(&mut rng);
            }
            Ok(())
        },
    ));

    let d = dir.to_path_buf();
    threads.push(writer(
        "cur",
        out.clone(),
        stop.clone(),
        killed.clone(),
        move |out, stop| {
            let mut rng = Rng::new(seed ^ 0x30);
            let mut gen = 0;
            while !stop.load(Ordering::SeqCst) {
                gen += 1;
                let mut t = File::create(d.join("tmp"))?;
                t.write_all(&record(round << 4 | 3, 0, gen, cur_len(gen)))?;
                t.sync_all()?;
                drop(t);
                lock(out).cur_written = gen;
                std::fs::rename(d.join("tmp"), d.join("cur"))?;
                fsync_dir(&d)?;
                lock(out).cur_durable = gen;
                pause(&mut rng);
            }
            Ok(())
        },
    ));

    let d = dir.join("churn");
    threads.push(writer(
        "churn",
        out.clone(),
        stop.clone(),
        killed.clone(),
        move |out, stop| {
            let mut rng = Rng::new(seed ^ 0x40);
            let mut live: BTreeSet<u64> = BTreeSet::new();
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                if live.len() > 20 || (!live.is_empty() && rng.chance(1, 3)) {
                    let victim = *live
                        .iter()
                        .nth(rng.below(live.len() as u64) as usize)
                        .unwrap_or(&0);
                    lock(out).churn_removed_since.insert(victim);
                    std::fs::remove_file(d.join(format!("n{victim}")))?;
                    live.remove(&victim);
                } else {
                    k += 1;
                    lock(out).churn_created.insert(k);
                    std::fs::write(
                        d.join(format!("n{k}")),
                        record(round << 4 | 4, k, 0, churn_len(k)),
                    )?;
                    live.insert(k);
                }
                if rng.chance(1, 4) {
                    fsync_dir(&d)?;
                    let mut o = lock(out);
                    o.churn_durable = live.clone();
                    o.churn_removed_since.clear();
                }
                pause(&mut rng);
            }
            Ok(())
        },
    ));
    (out, threads)
}

/// Checks round `round`'s directory against what its writers did; returns its files.
fn check_round(dir: &Path, round: u32, o: &Outcome) -> BTreeMap<String, Vec<u8>> {
    let ctx = format!("round {round} ({})", dir.display());
    let mut files = BTreeMap::new();
    let read =
        |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{ctx}: read {}: {e}", p.display()));

    let names: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{ctx}: list: {e}"))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for n in &names {
        assert!(
            ["log", "slots", "cur", "tmp", "churn"].contains(&n.as_str()),
            "{ctx}: unexpected entry {n}"
        );
    }

    // log: exact up to the fsynced length, then stream bytes or zeros.
    let log = read(&dir.join("log"));
    let len = log.len() as u64;
    assert!(
        len >= o.log_durable && len <= o.log_written.max(o.log_durable),
        "{ctx}: log is {len} bytes; fsynced {}, written {}",
        o.log_durable,
        o.log_written
    );
    let stream = log_stream(round, len);
    let d = o.log_durable as usize;
    if let Some(i) = (0..d).find(|i| log[*i] != stream[*i]) {
        panic!(
            "{ctx}: log byte {i} (fsynced prefix of {d}) differs: {} != {}",
            log[i], stream[i]
        );
    }
    if let Some(i) = (d..log.len()).find(|i| log[*i] != stream[*i] && log[*i] != 0) {
        panic!("{ctx}: log byte {i} past the fsynced {d} is neither the written byte nor zero");
    }
    files.insert("log".to_string(), log);

    // slots: complete records of an allowed generation.
    let slots = read(&dir.join("slots"));
    assert_eq!(slots.len(), SLOTS as usize * SLOT, "{ctx}: slots size");
    for i in 0..SLOTS as usize {
        let b = &slots[i * SLOT..(i + 1) * SLOT];
        let (idx, gen, l) =
            header(b).unwrap_or_else(|| panic!("{ctx}: slot {i} has no record header"));
        assert_eq!((idx, l), (i as u64, SLOT), "{ctx}: slot {i} header");
        assert!(
            gen >= o.slots_durable[i] && gen <= o.slots_written[i],
            "{ctx}: slot {i} has generation {gen}; fsynced {}, written {}",
            o.slots_durable[i],
            o.slots_written[i]
        );
        assert!(
            b == record(round << 4 | 2, i as u64, gen, SLOT),
            "{ctx}: slot {i} generation {gen} is torn or corrupt"
        );
    }
    files.insert("slots".to_string(), slots);

    // cur: one complete version, no older than the last durable one.
    if o.cur_durable > 0 {
        assert!(
            names.contains("cur"),
            "{ctx}: cur is missing (generation {} was fsynced)",
            o.cur_durable
        );
    }
    if names.contains("cur") {
        let c = read(&dir.join("cur"));
        let (_, gen, l) = header(&c)
            .unwrap_or_else(|| panic!("{ctx}: cur has no record header ({} bytes)", c.len()));
        assert!(
            gen >= o.cur_durable && gen <= o.cur_written,
            "{ctx}: cur has generation {gen}; fsynced {}, renamed {}",
            o.cur_durable,
            o.cur_written
        );
        assert!(
            l == cur_len(gen) && c == record(round << 4 | 3, 0, gen, l),
            "{ctx}: cur generation {gen} is incomplete or corrupt"
        );
        files.insert("cur".to_string(), c);
    }
    if names.contains("tmp") {
        // Being written at the crash: whatever reached the daemon, bytes of one version or zeros.
        let t = read(&dir.join("tmp"));
        if let Some((_, gen, l)) = header(&t) {
            let want = record(round << 4 | 3, 0, gen, l);
            assert!(t.len() <= l, "{ctx}: tmp longer than its version");
            assert!(
                t.iter().zip(&want).all(|(a, b)| a == b || *a == 0),
                "{ctx}: tmp (generation {gen}) is corrupt"
            );
        } else {
            assert!(
                t.iter().take(32).all(|b| *b == 0),
                "{ctx}: tmp starts with garbage"
            );
        }
        files.insert("tmp".to_string(), t);
    }

    // churn: durable names present and exact; nothing never created.
    let churn: BTreeSet<u64> = std::fs::read_dir(dir.join("churn"))
        .unwrap_or_else(|e| panic!("{ctx}: list churn: {e}"))
        .map(|e| {
            let n = e.expect("entry").file_name().to_string_lossy().into_owned();
            n.strip_prefix('n')
                .and_then(|k| k.parse().ok())
                .unwrap_or_else(|| panic!("{ctx}: unexpected churn/{n}"))
        })
        .collect();
    for k in &o.churn_durable {
        if !o.churn_removed_since.contains(k) {
            assert!(
                churn.contains(k),
                "{ctx}: churn/n{k} was fsynced but is missing"
            );
        }
    }
    for k in &churn {
        assert!(
            o.churn_created.contains(k),
            "{ctx}: churn/n{k} was never created"
        );
        let c = read(&dir.join("churn").join(format!("n{k}")));
        let want = record(round << 4 | 4, *k, 0, churn_len(*k));
        if o.churn_durable.contains(k) {
            assert!(
                c == want,
                "{ctx}: churn/n{k} was fsynced but differs ({} bytes)",
                c.len()
            );
        } else {
            assert!(
                c.len() <= want.len() && c.iter().zip(&want).all(|(a, b)| a == b || *a == 0),
                "{ctx}: churn/n{k} is corrupt"
            );
        }
        files.insert(format!("churn/n{k}"), c);
    }
    files
}

/// Reads every file under `dir` (relative path -> contents).
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))
            .unwrap_or_else(|e| panic!("list {}: {e}", rel.display()))
        {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            if e.file_type().expect("file type").is_dir() {
                stack.push(r);
            } else {
                out.insert(
                    r.to_string_lossy().into_owned(),
                    std::fs::read(dir.join(&r)).expect("read"),
                );
            }
        }
    }
    out
}

#[test]
fn kill_daemon_under_load() {
    if !common::can_mount("fuse_crash") {
        return;
    }
    let seed = common::seed_from_env("FORKPOINT_CRASH_SEED");
    eprintln!("fuse_crash: seed {seed} (FORKPOINT_CRASH_SEED)");
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    let dog = Watchdog::new(&store, Duration::from_secs(90));
    let mut rng = Rng::new(seed);
    // Kill delays: early, mid-flush, around and after the 5 s periodic commit.
    let mut delays: Vec<u64> = vec![
        rng.range(30, 300),
        rng.range(300, 1500),
        rng.range(1500, 3500),
        rng.range(3500, 5000),
        rng.range(5200, 6500),
    ];
    for i in (1..delays.len()).rev() {
        delays.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut earlier: Vec<(u32, BTreeMap<String, Vec<u8>>)> = Vec::new();
    for (round, delay) in delays.iter().enumerate() {
        let round = round as u32;
        let ctx = format!("seed {seed}, round {round}, kill after {delay} ms");
        let t = Instant::now();
        // Round 0 creates the store; later rounds find the dead mount of the killed daemon,
        // which `forkpoint mount` must clean up by itself.
        let o = lab.mount(&store, &mnt, None, None);
        assert!(o.ok, "{ctx}: mount failed: {}{}", o.stdout, o.stderr);
        if round > 0 {
            assert!(
                o.stderr.contains("stale mount"),
                "{ctx}: mount did not report the stale mount: {}",
                o.stderr
            );
        }
        for (r, files) in &earlier {
            let dir = mnt.join(format!("r{r}"));
            assert!(
                read_tree(&dir) == *files,
                "{ctx}: round {r}'s files changed after a later crash"
            );
        }
        let dir = mnt.join(format!("r{round}"));
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let (out, threads) =
            start_writers(&dir, round, seed ^ (u64::from(round) << 32), &stop, &killed);
        std::thread::sleep(Duration::from_millis(*delay));
        killed.store(true, Ordering::SeqCst);
        let pids = lab.kill_daemons(&store);
        assert_eq!(pids.len(), 1, "{ctx}: expected one daemon, found {pids:?}");
        // Writers stop at their first failure; page-cache writes may still succeed for a
        // moment, so also tell them to stop.
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        for th in threads {
            th.join().expect("writer thread panicked");
        }
        dog.tick();
        let o = std::mem::take(&mut *lock(&out));
        assert!(
            o.unexpected.is_empty(),
            "{ctx}: writers failed: {:?}",
            o.unexpected
        );
        // The crashed store verifies as it is (read-only; the dead mount is still there).
        let v = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
        assert!(v.contains("verified"), "{ctx}: verify: {v}");
        // Remount and check this round.
        let m = lab.mount(&store, &mnt, None, None);
        assert!(
            m.ok,
            "{ctx}: remount after the crash failed: {}",
            m.stderr.trim()
        );
        let files = check_round(&dir, round, &o);
        eprintln!(
            "fuse_crash: {ctx}: log {}/{} bytes fsynced/written (have {}), cur #{}/#{}, {} churn files; {:.1?}",
            o.log_durable,
            o.log_written,
            files.get("log").map_or(0, Vec::len),
            o.cur_durable,
            o.cur_written,
            files.keys().filter(|k| k.starts_with("churn/")).count(),
            t.elapsed()
        );
        // Leave the mount dead for the next round: kill the fresh daemon too (idle this time).
        let pids = lab.kill_daemons(&store);
        assert_eq!(
            pids.len(),
            1,
            "{ctx}: expected one daemon after remount, found {pids:?}"
        );
        earlier.push((round, files));
        dog.tick();
    }
    // Final: a clean mount and unmount, everything as recovered, and a clean verify.
    let o = lab.mount(&store, &mnt, None, None);
    assert!(
        o.ok && o.stderr.contains("stale mount"),
        "final mount: {}{}",
        o.stdout,
        o.stderr
    );
    for (r, files) in &earlier {
        assert!(
            read_tree(&mnt.join(format!("r{r}"))) == *files,
            "round {r}'s files changed"
        );
    }
    lab.umount_ok(&mnt);
    let v = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(v.contains("verified"), "verify: {v}");
}

/// A user's flow: work in the mount, the daemon dies, mount again at once. `forkpoint mount`
/// must clean up the dead mount by itself even while the kernel still has the root's
/// attributes cached (so `stat` of the mountpoint succeeds for up to the attribute TTL).
#[test]
fn mount_right_after_daemon_death() {
    if !common::can_mount("fuse_crash") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    lab.mount_ok(&store, &mnt, None);
    let f = mnt.join("kept.txt");
    let mut h = File::create(&f).expect("create");
    h.write_all(b"fsynced before the crash\n").expect("write");
    h.sync_all().expect("fsync");
    drop(h);
    // `ls` of the mount: the kernel caches the root's attributes for a second.
    let names: Vec<_> = std::fs::read_dir(&mnt).expect("ls").collect();
    assert_eq!(names.len(), 1, "one file in the mount");
    std::fs::metadata(&mnt).expect("stat mount");
    // A second mount of the store, on another branch, dies with the daemon too.
    fp_ok(&[
        OsStr::new("branch"),
        OsStr::new("-m"),
        mnt.as_os_str(),
        OsStr::new("b"),
    ]);
    let mnt2 = lab.mkdir("mnt2");
    let o = lab.mount(&store, &mnt2, None, Some("b"));
    assert!(o.ok, "{}", o.stderr);
    let pids = lab.kill_daemons(&store);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let o = lab.mount(&store, &mnt, None, None);
    assert!(
        o.ok,
        "forkpoint mount right after the daemon died must clean up the dead mount, but: {}",
        o.stderr.trim()
    );
    assert!(
        o.stderr.contains("stale mount"),
        "no stale-mount notice: {}",
        o.stderr
    );
    assert_eq!(
        std::fs::read(&f).expect("read after remount"),
        b"fsynced before the crash\n"
    );
    assert!(
        !common::is_mounted(&mnt2),
        "the other dead mount is left: {}",
        o.stderr
    );
    lab.umount_ok(&mnt);
}
