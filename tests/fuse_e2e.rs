//! End-to-end, as a new user would work: mount a store over a lower directory, read and edit
//! lower files, delete and rename lower entries, snapshot, keep working, browse the snapshot
//! read-only, unmount, mount again, and read the log. Then the mistakes a user makes with
//! `forkpoint mount`, each of which must fail with a clear one-line message and leave nothing
//! mounted or running.

mod common;

use common::{daemon_pids, fp, fp_ok, is_mounted, Lab};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// What a user sees of one name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Symlink { target: PathBuf },
}

type Tree = BTreeMap<String, Entry>;

/// Everything under `root` (not following symlinks).
fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("ls {}: {e}", dir.display())) {
            let e = e.expect("directory entry");
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = std::fs::symlink_metadata(&p)
                .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
            let perm = md.permissions().mode() & 0o7777;
            let entry = if md.is_dir() {
                stack.push(r.clone());
                Entry::Dir { perm }
            } else if md.file_type().is_symlink() {
                Entry::Symlink {
                    target: std::fs::read_link(&p).expect("readlink"),
                }
            } else {
                Entry::File {
                    perm,
                    data: std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
                }
            };
            out.insert(r.to_string_lossy().into_owned(), entry);
        }
    }
    out
}

/// The tree as a read-only snapshot shows it.
fn without_write_bits(t: &Tree) -> Tree {
    t.iter()
        .map(|(k, v)| {
            let v = match v {
                Entry::Dir { perm } => Entry::Dir {
                    perm: perm & !0o222,
                },
                Entry::File { perm, data } => Entry::File {
                    perm: perm & !0o222,
                    data: data.clone(),
                },
                s => s.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Asserts two trees are equal, naming the first difference.
fn same_tree(what: &str, want: &Tree, got: &Tree) {
    for (k, w) in want {
        match got.get(k) {
            None => panic!("{what}: {k} is missing"),
            Some(g) if g != w => {
                let show = |e: &Entry| match e {
                    Entry::File { perm, data } => format!("file {perm:o}, {} bytes", data.len()),
                    e => format!("{e:?}"),
                };
                panic!("{what}: {k} differs: want {}, got {}", show(w), show(g));
            }
            _ => {}
        }
    }
    if let Some(k) = got.keys().find(|k| !want.contains_key(*k)) {
        panic!("{what}: unexpected {k}");
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut r = common::Rng::new(5);
    r.bytes(len)
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what} should fail, but returned {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or(0),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Builds the lower directory: nested directories, a 5 MiB file, a symlink, a hard link.
fn make_lower(lower: &Path) {
    std::fs::create_dir_all(lower.join("src/a/b")).expect("mkdir src/a/b");
    std::fs::create_dir_all(lower.join("docs")).expect("mkdir docs");
    std::fs::create_dir_all(lower.join("empty")).expect("mkdir empty");
    std::fs::write(lower.join("src/a/b/deep.txt"), "deep in the tree\n").expect("write");
    std::fs::write(lower.join("src/a/notes.txt"), "notes\n").expect("write");
    std::fs::write(lower.join("src/main.rs"), "fn main() {}\n").expect("write");
    std::fs::write(lower.join("docs/guide.md"), "# Guide\n\nRead me.\n").expect("write");
    std::fs::hard_link(
        lower.join("docs/guide.md"),
        lower.join("docs/guide-link.md"),
    )
    .expect("hard link");
    std::fs::write(lower.join("big.bin"), pattern(5 * MIB)).expect("write big.bin");
    std::os::unix::fs::symlink("src/a/b/deep.txt", lower.join("deep-link")).expect("symlink");
    std::fs::set_permissions(
        lower.join("src/main.rs"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
}

#[test]
fn new_user_workflow() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let lower = lab.mkdir("project");
    make_lower(&lower);
    let lower_before = tree(&lower);
    let lower_mtimes: Vec<(i64, i64)> = ["big.bin", "docs/guide.md", "src/a/b/deep.txt"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(lower.join(f)).expect("stat lower");
            (m.mtime(), m.mtime_nsec())
        })
        .collect();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("work");

    // Mount: the store is created on first use.
    let o = lab.mount(&store, &mnt, Some(&lower), None);
    assert!(o.ok, "mount: {}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("created store"),
        "first mount creates the store: {}",
        o.stderr
    );
    assert!(
        o.stdout.contains("mounted"),
        "mount says what it did: {}",
        o.stdout
    );

    // Everything of the lower directory reads back through the mount, `.forkpoint` unlisted.
    same_tree("mount over the lower directory", &lower_before, &tree(&mnt));
    let root: Vec<String> = std::fs::read_dir(&mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !root.iter().any(|n| n == ".forkpoint"),
        "ls shows .forkpoint: {root:?}"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("deep-link")).expect("read through the symlink"),
        "deep in the tree\n"
    );
    let (g, gl) = (
        std::fs::metadata(mnt.join("docs/guide.md")).expect("stat"),
        std::fs::metadata(mnt.join("docs/guide-link.md")).expect("stat"),
    );
    assert_eq!(g.ino(), gl.ino(), "hard links share an inode in the mount");
    assert_eq!((g.nlink(), gl.nlink()), (2, 2), "hard link count");
    assert_eq!(
        std::fs::metadata(mnt.join("big.bin")).expect("stat").len(),
        5 * MIB as u64
    );

    // Edit the middle of the 5 MiB lower file in place (pwrite across a block boundary).
    let mut big = pattern(5 * MIB);
    let patch = vec![0xab; 10_000];
    let at = (5 * MIB / 2) as u64 - 3000;
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big.bin"))
        .expect("open big.bin for writing")
        .write_all_at(&patch, at)
        .expect("pwrite");
    big[at as usize..at as usize + patch.len()].copy_from_slice(&patch);
    assert!(
        std::fs::read(mnt.join("big.bin")).expect("read") == big,
        "edited big.bin reads back"
    );
    assert!(
        std::fs::read(lower.join("big.bin")).expect("read lower") == pattern(5 * MIB),
        "the lower big.bin must be unchanged"
    );

    // Delete a lower file (its hard link stays) and a lower directory tree.
    std::fs::remove_file(mnt.join("docs/guide.md")).expect("rm docs/guide.md");
    assert_eq!(
        std::fs::metadata(mnt.join("docs/guide-link.md"))
            .expect("stat")
            .nlink(),
        1,
        "the other name of the hard link remains"
    );
    std::fs::remove_dir_all(mnt.join("src/a")).expect("rm -r src/a");
    assert_eq!(
        errno_of(std::fs::metadata(mnt.join("src/a")), "stat removed src/a"),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(
            std::fs::read(mnt.join("deep-link")),
            "read the dangling symlink"
        ),
        libc::ENOENT
    );
    assert!(
        lower.join("src/a/b/deep.txt").exists(),
        "the lower tree must be untouched"
    );
    // Rename a lower directory.
    std::fs::rename(mnt.join("docs"), mnt.join("manual")).expect("mv docs manual");
    assert_eq!(
        std::fs::read_to_string(mnt.join("manual/guide-link.md")).expect("read"),
        "# Guide\n\nRead me.\n"
    );
    assert!(!mnt.join("docs").exists(), "docs is gone after the rename");

    // Snapshot.
    let at_snapshot = tree(&mnt);
    let out = fp_ok(&[
        OsStr::new("snapshot"),
        OsStr::new("-m"),
        mnt.as_os_str(),
        OsStr::new("before-cleanup"),
    ]);
    assert!(out.contains("before-cleanup"), "snapshot output: {out}");

    // Change more.
    std::fs::write(mnt.join("results.csv"), "epoch,loss\n1,0.5\n").expect("write results");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big.bin"))
        .expect("open big.bin");
    f.set_len(MIB as u64).expect("truncate big.bin");
    f.write_all_at(b"tail", MIB as u64).expect("append");
    drop(f);
    std::fs::remove_file(mnt.join("manual/guide-link.md")).expect("rm");
    std::fs::create_dir(mnt.join("out")).expect("mkdir out");
    std::fs::write(mnt.join("out/model.bin"), pattern(300_000)).expect("write model");
    std::fs::set_permissions(
        mnt.join("src/main.rs"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let after_changes = tree(&mnt);
    assert_ne!(after_changes, at_snapshot, "the changes must be visible");

    // Browse the snapshot: as it was, read-only, reachable by path though not listed.
    let snap = mnt.join(".forkpoint/snapshots/before-cleanup");
    assert!(
        std::fs::metadata(mnt.join(".forkpoint"))
            .expect("stat .forkpoint")
            .is_dir(),
        ".forkpoint is reachable by path"
    );
    let snaps: Vec<String> = std::fs::read_dir(mnt.join(".forkpoint/snapshots"))
        .expect("ls snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        snaps.contains(&"before-cleanup".to_string()),
        "snapshots listed: {snaps:?}"
    );
    same_tree("snapshot", &without_write_bits(&at_snapshot), &tree(&snap));
    match at_snapshot.get("big.bin") {
        Some(Entry::File { data, .. }) => {
            assert!(*data == big, "big.bin at the snapshot has the edit")
        }
        other => panic!("big.bin at the snapshot: {other:?}"),
    }
    let rofs = [
        (
            "create a file",
            errno_of(
                std::fs::write(snap.join("new.txt"), "x"),
                "create in snapshot",
            ),
        ),
        (
            "open for writing",
            errno_of(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(snap.join("big.bin")),
                "open snapshot file for writing",
            ),
        ),
        (
            "mkdir",
            errno_of(std::fs::create_dir(snap.join("d")), "mkdir in snapshot"),
        ),
        (
            "unlink",
            errno_of(std::fs::remove_file(snap.join("big.bin")), "rm in snapshot"),
        ),
        (
            "rmdir",
            errno_of(std::fs::remove_dir(snap.join("empty")), "rmdir in snapshot"),
        ),
        (
            "rename",
            errno_of(
                std::fs::rename(snap.join("big.bin"), snap.join("b2")),
                "rename in snapshot",
            ),
        ),
        (
            "chmod",
            errno_of(
                std::fs::set_permissions(
                    snap.join("big.bin"),
                    std::fs::Permissions::from_mode(0o777),
                ),
                "chmod in snapshot",
            ),
        ),
        (
            "symlink",
            errno_of(
                std::os::unix::fs::symlink("x", snap.join("l")),
                "symlink in snapshot",
            ),
        ),
        (
            "truncate",
            errno_of(
                std::fs::File::open(snap.join("big.bin")).and_then(|f| f.set_len(0)),
                "truncate in snapshot",
            ),
        ),
    ];
    for (what, e) in rofs {
        assert!(
            e == libc::EROFS || (what == "truncate" && e == libc::EINVAL),
            "{what} in a snapshot: errno {e}, want EROFS"
        );
    }
    assert_eq!(
        errno_of(
            std::fs::write(mnt.join(".forkpoint/x"), "x"),
            "create in .forkpoint"
        ),
        libc::EROFS
    );
    same_tree(
        "snapshot after the failed writes",
        &without_write_bits(&at_snapshot),
        &tree(&snap),
    );

    // Unmount; the daemon exits; the lower directory is exactly as it was.
    lab.umount_ok(&mnt);
    wait_daemon_exit(&store);
    same_tree(
        "lower directory after everything",
        &lower_before,
        &tree(&lower),
    );
    let mtimes_after: Vec<(i64, i64)> = ["big.bin", "docs/guide.md", "src/a/b/deep.txt"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(lower.join(f)).expect("stat lower");
            (m.mtime(), m.mtime_nsec())
        })
        .collect();
    assert_eq!(lower_mtimes, mtimes_after, "lower files were not modified");

    // Mount again (same command): everything is still there, the snapshot too.
    let o = lab.mount(&store, &mnt, Some(&lower), None);
    assert!(o.ok, "second mount: {}{}", o.stdout, o.stderr);
    assert!(
        !o.stderr.contains("created store"),
        "the store is reused: {}",
        o.stderr
    );
    same_tree("after umount and mount", &after_changes, &tree(&mnt));
    same_tree(
        "snapshot after remount",
        &without_write_bits(&at_snapshot),
        &tree(&snap),
    );

    // The log shows the snapshot.
    let log = fp_ok(&[
        OsStr::new("log"),
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--json"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&log)
        .unwrap_or_else(|e| panic!("log --json is not JSON ({e}): {log}"));
    let cps = v["checkpoints"].as_array().expect("checkpoints array");
    let snap_cp = cps
        .iter()
        .find(|c| c["name"] == "before-cleanup")
        .unwrap_or_else(|| panic!("log does not show the snapshot: {log}"));
    assert_eq!(snap_cp["kind"], "snapshot", "{snap_cp}");
    assert_eq!(snap_cp["branch"], "main", "{snap_cp}");
    let heads: Vec<&str> = v["branches"]
        .as_array()
        .expect("branches array")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(heads, ["main"], "branches: {log}");
    let mounts = v["mounts"].as_array().expect("mounts array");
    assert!(
        mounts
            .iter()
            .any(|m| m["branch"] == "main" && m["mountpoint"] == mnt.to_str().expect("utf8")),
        "log names where main is mounted: {log}"
    );

    // Each fsync commits; the log lists what is named and the branch heads, and counts the
    // rest (a database in the mount makes thousands); --all lists them.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.join("fsynced")).expect("create fsynced");
        for i in 0..3 {
            writeln!(f, "line {i}").expect("write fsynced");
            f.sync_all().expect("fsync");
        }
    }
    std::fs::remove_file(mnt.join("fsynced")).expect("remove fsynced");
    let log_of = |extra: &[&str]| {
        let mut args = vec![OsStr::new("log"), OsStr::new("--store"), store.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        fp_ok(&args)
    };
    let short = log_of(&[]);
    assert!(
        short.contains("branch main (head #")
            && short.contains(&format!("mounted at {}", mnt.display())),
        "{short}"
    );
    let entries = |text: &str| text.lines().filter(|l| l.starts_with("* #")).count();
    for l in short.lines().filter(|l| l.starts_with("* #")) {
        assert!(
            l.contains('\'') || l.contains("<- main"),
            "an unnamed commit that is no head is listed: {l}\n{short}"
        );
    }
    assert!(
        short.contains("unnamed commits not listed; --all lists them"),
        "{short}"
    );
    let full = log_of(&["--all"]);
    assert!(
        entries(&full) >= entries(&short) + 3,
        "--all lists the fsyncs' commits:\n{full}\nwithout it:\n{short}"
    );
    let v: serde_json::Value = serde_json::from_str(&log_of(&["--json"])).expect("log json");
    let listed = v["checkpoints"].as_array().map_or(0, |a| a.len());
    let unlisted = v["unlisted_commits"].as_u64().expect("unlisted_commits");
    let v: serde_json::Value =
        serde_json::from_str(&log_of(&["--json", "--all"])).expect("log json");
    assert_eq!(
        v["checkpoints"].as_array().map_or(0, |a| a.len()),
        listed + unlisted as usize,
        "--all lists every commit: {v}"
    );
    assert_eq!(v["unlisted_commits"], 0, "{v}");

    // A busy mount refuses to unmount and stays served (it used to be left dangling).
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(&mnt)
        .spawn()
        .expect("spawn a process working in the mount");
    let busy = fp(&[OsStr::new("umount"), mnt.as_os_str()]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        !busy.ok,
        "umount of a busy mount succeeded: {}",
        busy.stdout
    );
    assert!(
        busy.stderr.contains("busy"),
        "unclear error: {}",
        busy.stderr
    );
    same_tree("after a refused umount", &after_changes, &tree(&mnt));

    lab.umount_ok(&mnt);
    let out = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(out.contains("verified"), "verify: {out}");
}

/// Runs `forkpoint mount` expecting a clear one-line failure containing `needles`; nothing may
/// be mounted at `mnt` afterwards unless `mounted_before`.
fn mount_fails(lab: &Lab, args: &[&str], mnt: &Path, needles: &[&str], mounted_before: bool) {
    let mut full = vec!["mount"];
    full.extend_from_slice(args);
    let store = Path::new(args[0]);
    lab.track(store, mnt);
    let o = fp(&full);
    let err = o.stderr.trim();
    assert!(
        !o.ok,
        "forkpoint {full:?} should fail; stdout {:?}",
        o.stdout
    );
    assert!(err.starts_with("forkpoint: "), "{full:?}: message {err:?}");
    assert_eq!(
        err.lines().count(),
        1,
        "{full:?}: one-line message, got {err:?}"
    );
    assert!(!err.contains("panicked"), "{full:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{full:?}: expected {n:?} in {err:?}");
    }
    assert_eq!(
        is_mounted(mnt),
        mounted_before,
        "{full:?} changed what is mounted at {}",
        mnt.display()
    );
}

#[test]
fn mount_mistakes_fail_clearly() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let lower = lab.mkdir("lower");
    std::fs::write(lower.join("f"), "lower file\n").expect("write");
    let other_lower = lab.mkdir("other-lower");
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");

    // A mountpoint that does not exist: refused before anything is created.
    let missing = lab.path().join("no-such-dir");
    mount_fails(
        &lab,
        &[s(&store), s(&missing)],
        &missing,
        &["no-such-dir", "No such file"],
        false,
    );
    assert!(!store.exists(), "a refused mount must not create the store");

    // A mountpoint that is a file.
    let file = lab.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    mount_fails(
        &lab,
        &[s(&store), s(&file)],
        &file,
        &["a-file", "not a directory"],
        false,
    );
    assert!(!store.exists(), "a refused mount must not create the store");

    // Mount properly, then the mistakes that involve an existing mount or store.
    lab.mount_ok(&store, &mnt, Some(&lower));
    let daemons = daemon_pids(&store);
    assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");

    // The same mountpoint again, with the same store or another one.
    mount_fails(
        &lab,
        &[s(&store), s(&mnt)],
        &mnt,
        &["already a forkpoint mount"],
        true,
    );
    let store2 = lab.path().join("store2");
    mount_fails(
        &lab,
        &[s(&store2), s(&mnt)],
        &mnt,
        &["already a forkpoint mount"],
        true,
    );
    // A mountpoint that holds some other mount.
    let tmp = lab.mkdir("tmpfs");
    lab.tmpfs(&tmp);
    mount_fails(
        &lab,
        &[s(&store2), s(&tmp)],
        &tmp,
        &["already a mount point"],
        true,
    );

    // A different lower directory than the store was created over (daemon running or not).
    let mnt2 = lab.mkdir("mnt2");
    let msg = ["was created over lower directory", "other-lower"];
    mount_fails(
        &lab,
        &[s(&store), s(&mnt2), "--lower", s(&other_lower)],
        &mnt2,
        &msg,
        false,
    );

    // An unknown branch, with the store's daemon running.
    mount_fails(
        &lab,
        &[s(&store), s(&mnt2), "--branch", "nope"],
        &mnt2,
        &["unknown branch 'nope'"],
        false,
    );

    // The running mount is unharmed by all of this.
    assert_eq!(
        std::fs::read_to_string(mnt.join("f")).expect("read"),
        "lower file\n"
    );
    assert_eq!(daemon_pids(&store), daemons, "the daemon is the same");
    lab.umount_ok(&mnt);
    wait_daemon_exit(&store);

    // The same two mistakes with no daemon running.
    mount_fails(
        &lab,
        &[s(&store), s(&mnt2), "--lower", s(&other_lower)],
        &mnt2,
        &msg,
        false,
    );
    mount_fails(
        &lab,
        &[s(&store), s(&mnt2), "--branch", "nope"],
        &mnt2,
        &["unknown branch 'nope'"],
        false,
    );
    // A store created without a lower directory, mounted with one.
    let bare = lab.path().join("bare");
    lab.mount_ok(&bare, &mnt2, None);
    lab.umount_ok(&mnt2);
    wait_daemon_exit(&bare);
    mount_fails(
        &lab,
        &[s(&bare), s(&mnt2), "--lower", s(&lower)],
        &mnt2,
        &["(none)"],
        false,
    );
    // A mount that would read itself (it deadlocked), or hide or change its own store.
    let fresh = lab.path().join("fresh");
    let inner = lower.join("sub");
    std::fs::create_dir(&inner).expect("mkdir");
    for (mp, low, st, needle) in [
        (&lower, &lower, &fresh, "overlap"),
        (&inner, &lower, &fresh, "overlap"),
        (&mnt2, &lab.path().to_path_buf(), &fresh, "overlap"),
        (
            &mnt2,
            &lower,
            &lower.join("store"),
            "inside the lower directory",
        ),
        (&mnt2, &lower, &mnt2.join("store"), "inside the mountpoint"),
    ] {
        mount_fails(
            &lab,
            &[s(st), s(mp), "--lower", s(low)],
            mp,
            &[needle],
            false,
        );
        assert!(!fresh.exists(), "a refused mount made a store");
    }
    // The lower directory a store was made over counts too.
    let over = lab.path().join("over");
    lab.mount_ok(&over, &mnt2, Some(&lower));
    lab.umount_ok(&mnt2);
    wait_daemon_exit(&over);
    mount_fails(&lab, &[s(&over), s(&inner)], &inner, &["overlap"], false);
    assert!(
        daemon_pids(&store).is_empty() && daemon_pids(&bare).is_empty(),
        "a refused mount left a daemon running"
    );
}

/// Waits (up to 10 s) for the daemon of `store` to exit after its last umount.
fn wait_daemon_exit(store: &Path) {
    let t = Instant::now();
    while !daemon_pids(store).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon of {} did not exit after its last umount",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lab with a new store mounted at its `mnt` (lab, store, mountpoint); `None` (the reason
/// printed) where mounts cannot run.
fn mounted_lab() -> Option<(Lab, PathBuf, PathBuf)> {
    if !common::can_mount("fuse_e2e") {
        return None;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    lab.mount_ok(&store, &mnt, None);
    Some((lab, store, mnt))
}

/// setuid/setgid are cleared as the kernel clears them on a local filesystem (the mount takes
/// FUSE_HANDLE_KILLPRIV_V2, so this is the daemon's job): by every chown of a non-directory,
/// even chown(-1, -1) (found by the long differential run), and not by root's writes and
/// truncations.
#[test]
fn setuid_is_cleared_as_on_a_local_filesystem() {
    let Some((lab, _store, mnt)) = mounted_lab() else {
        return;
    };
    let f = mnt.join("tool");
    std::fs::write(&f, b"#!/bin/sh\n").expect("write");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    let set = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let cpath = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("c");
    set(&f, 0o6755);
    // Root writes and truncates: CAP_FSETID keeps the bits.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .and_then(|mut h| std::io::Write::write_all(&mut h, b"echo hi\n"))
        .expect("append");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .and_then(|h| h.set_len(4))
        .expect("truncate");
    assert_eq!(
        mode(&f),
        0o6755,
        "root's write and truncate keep setuid/setgid"
    );
    // chown(-1, -1) clears setuid, and setgid because the file is group-executable.
    let c = cpath(&f);
    // SAFETY: `c` is a valid NUL-terminated path; -1/-1 change no owner.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), u32::MAX, u32::MAX) }, 0);
    assert_eq!(mode(&f), 0o755, "chown(-1, -1) clears setuid/setgid");
    // A real chown too; setgid without group-exec stays.
    set(&f, 0o6745);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), 1000, u32::MAX) }, 0);
    assert_eq!(
        mode(&f),
        0o2745,
        "chown keeps setgid of a non-group-executable file"
    );
    // Directories keep theirs.
    let d = mnt.join("shared");
    std::fs::create_dir(&d).expect("mkdir");
    set(&d, 0o2775);
    let cd = cpath(&d);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lchown(cd.as_ptr(), u32::MAX, u32::MAX) }, 0);
    assert_eq!(mode(&d), 0o2775, "a directory keeps setgid");
    lab.umount_ok(&mnt);
}

/// (name, time on CPU in ns, voluntary context switches) of each daemon thread.
fn daemon_threads(pid: i32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in rd.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        let switches = std::fs::read_to_string(t.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        out.push((comm.trim().to_string(), ns, switches));
    }
    out
}

/// On a kernel with FUSE over io_uring, requests are answered by the per-CPU queue threads,
/// not by the `/dev/fuse` readers: every CPU has its queue threads, and they, not fuser's
/// threads, do the work of a burst of creates.
#[test]
fn requests_are_served_over_io_uring() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    if !common::has_fuse_uring("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    lab.mount_ok(&store, &mnt, None);
    let pid = *common::daemon_pids(&store).first().expect("daemon pid");
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) } as usize;
    let queue_threads = |t: &[(String, u64, u64)]| -> (usize, u64, u64) {
        let q: Vec<_> = t
            .iter()
            .filter(|(n, _, _)| n.starts_with("fuse-q"))
            .collect();
        (
            q.len(),
            q.iter().map(|x| x.1).sum(),
            q.iter().map(|x| x.2).sum(),
        )
    };
    // (CPU ns, voluntary switches) of fuser's /dev/fuse readers.
    let fuser_threads = |t: &[(String, u64, u64)]| -> (u64, u64) {
        let f: Vec<_> = t
            .iter()
            .filter(|(n, _, _)| n.starts_with("fuser-") && n != "fuser-bg")
            .collect();
        (f.iter().map(|x| x.1).sum(), f.iter().map(|x| x.2).sum())
    };
    // Let the queues register (the first requests after INIT may still use /dev/fuse).
    std::fs::write(mnt.join("warm"), b"x").expect("write");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = daemon_threads(pid);
    let (n, q_ns0, _) = queue_threads(&before);
    assert!(
        n >= cpus,
        "expected io_uring queue threads for {cpus} CPUs, found {n}: {before:?}"
    );
    let (f_ns0, f_sw0) = fuser_threads(&before);
    for i in 0..2000 {
        std::fs::write(mnt.join(format!("f{i}")), b"data").expect("create");
    }
    let after = daemon_threads(pid);
    let (n2, q_ns1, _) = queue_threads(&after);
    assert_eq!(n2, n, "a queue thread stopped: {after:?}");
    let (f_ns1, f_sw1) = fuser_threads(&after);
    assert!(
        q_ns1 - q_ns0 > 4 * (f_ns1 - f_ns0),
        "2000 creates took {} ns in the io_uring queue threads and {} ns in fuser's",
        q_ns1 - q_ns0,
        f_ns1 - f_ns0
    );
    assert!(
        f_sw1 - f_sw0 < 1000,
        "the /dev/fuse threads still served the creates ({} wakeups)",
        f_sw1 - f_sw0
    );
    let log = std::fs::read_to_string(store.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("io_uring queue"), "daemon log: {log}");
    lab.umount_ok(&mnt);
}

/// A CPU's io_uring queue that cannot be set up after INIT agreed to io_uring must not leave
/// the mount waiting for it: the daemon makes the kernel turn io_uring off and requests go
/// through `/dev/fuse`. The file operations run in a child killed after 30 s, so a hang fails
/// the test instead of stopping it.
#[test]
fn a_queue_that_cannot_start_falls_back_to_dev_fuse() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    if !common::has_fuse_uring("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    lab.track(&store, &mnt);
    let out = std::process::Command::new(common::BIN)
        .arg("mount")
        .arg(s(&store))
        .arg(s(&mnt))
        .env("FORKPOINT_FUSE_URING_FAIL_QUEUE", "0")
        .output()
        .expect("run forkpoint mount");
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = format!(
        "for i in $(seq 1 200); do echo $i > {0}/f$i || exit 1; done; cat {0}/f200",
        s(&mnt)
    );
    let ops = std::process::Command::new("timeout")
        .args(["-s", "KILL", "30", "sh", "-c", &script])
        .output()
        .expect("run the file operations");
    assert!(
        ops.status.success(),
        "file operations on the mount did not finish (status {:?}): {}",
        ops.status,
        String::from_utf8_lossy(&ops.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ops.stdout).trim(), "200");
    let log = std::fs::read_to_string(store.join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("requests go through /dev/fuse"),
        "daemon log: {log}"
    );
    lab.umount_ok(&mnt);
}

/// `umount` answers before its daemon has exited. A store deleted right after and made again
/// at the same path gets a new daemon while the old one is still going; the old one used to
/// remove the control socket on its way out, the new daemon's by then, which left the new
/// mount unreachable (the next umount found "no running daemon" and detached it, the daemon
/// stayed behind).
#[test]
fn a_store_made_again_at_once_keeps_its_new_daemon_reachable() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    for round in 0..6 {
        lab.mount_ok(&store, &mnt, None);
        std::fs::write(mnt.join("f"), format!("round {round}\n")).expect("write");
        let out = fp(&[OsStr::new("umount"), mnt.as_os_str()]);
        assert!(
            out.ok && out.stdout.contains("unmounted") && !out.stderr.contains("no running"),
            "round {round}: umount: {}{}",
            out.stdout,
            out.stderr
        );
        std::fs::remove_dir_all(&store).expect("remove the store");
    }
    wait_daemon_exit(&store);
}

/// A store removed while mounted: `umount` detaches the mount (it said "not a forkpoint
/// mount" and left it, with its daemon, until `umount -l`), and the daemon leaves.
#[test]
fn umount_takes_away_a_mount_whose_store_was_removed() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    lab.mount_ok(&store, &mnt, None);
    std::fs::write(mnt.join("f"), "data\n").expect("write");
    std::fs::remove_dir_all(&store).expect("remove the store");
    let out = fp(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert!(
        out.ok && out.stdout.contains("unmounted") && out.stderr.contains("was removed"),
        "umount: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(!common::is_fuse_mounted(&mnt), "still mounted");
    wait_daemon_exit(&store);
    // Anything else is still refused.
    let out = fp(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert!(
        !out.ok && out.stderr.contains("not a forkpoint mount"),
        "{}",
        out.stderr
    );
}

/// gc succeeds while a program fsyncs all the time (each fsync is a commit, so a mark
/// never finished unchanged and every try was refused), and what it leaves is whole: every
/// later fsync still commits, and the store verifies, also while the commits go on.
#[test]
fn gc_succeeds_beside_a_program_that_fsyncs_all_the_time() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some((lab, store, mnt)) = mounted_lab() else {
        return;
    };
    let stop = AtomicBool::new(false);
    /// Stops the writers however the scope ends: a failed assertion in it would otherwise
    /// wait for them forever.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let last = std::thread::scope(|sc| {
        let stopper = StopOnDrop(&stop);
        // Two more writers keep the commits coming without a gap.
        let churn: Vec<_> = (0..2)
            .map(|t| {
                let (stop, mnt) = (&stop, &mnt);
                sc.spawn(move || -> std::io::Result<()> {
                    let mut f = std::fs::File::create(mnt.join(format!("churn.{t}")))?;
                    while !stop.load(Ordering::SeqCst) {
                        writeln!(f, "x")?;
                        f.sync_data()?;
                    }
                    Ok(())
                })
            })
            .collect();
        let writer = sc.spawn(|| -> std::io::Result<u64> {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 50 {
                n += 1;
                let mut f = std::fs::File::create(mnt.join(format!("db.{}", n % 7)))?;
                writeln!(f, "{n}")?;
                f.sync_all()?;
                std::fs::write(mnt.join("last"), n.to_string())?;
                std::fs::File::open(mnt.join("last"))?.sync_all()?;
            }
            Ok(n)
        });
        std::thread::sleep(Duration::from_millis(300));
        for round in 0..3 {
            let out = fp(&[OsStr::new("gc"), store.as_os_str()]);
            assert!(
                out.ok && out.stdout.contains("gc:"),
                "gc {round} beside fsyncs: {}{}",
                out.stdout,
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // verify beside the commits: it reads the store as of its opening (the catalog
        // and the index read one after the other disagreed, and objects looked missing).
        for round in 0..3 {
            let out = fp(&[OsStr::new("verify"), store.as_os_str()]);
            assert!(
                out.ok && out.stdout.contains("verified"),
                "verify {round} beside fsyncs: {}{}",
                out.stdout,
                out.stderr
            );
        }
        drop(stopper);
        for c in churn {
            c.join()
                .expect("churn thread")
                .expect("every fsync beside gc succeeds");
        }
        writer.join().expect("writer thread")
    });
    let last = last.expect("every write and fsync beside gc succeeds");
    assert_eq!(
        std::fs::read_to_string(mnt.join("last")).expect("read last"),
        last.to_string()
    );
    lab.umount_ok(&mnt);
    let out = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(out.contains("verified"), "verify: {out}");
    // Mounted again, the files are those last written.
    lab.mount_ok(&store, &mnt, None);
    assert_eq!(
        std::fs::read_to_string(mnt.join("last")).expect("read last after remount"),
        last.to_string()
    );
    lab.umount_ok(&mnt);
}

/// The disk under the store fills up: the mount's writes fail with ENOSPC (reported by
/// fsync, as writeback errors are), the daemon does not keep what it cannot store in memory
/// without bound, what was committed stays intact, and once there is room the mount works
/// on. Before, the log's writer kept every failed 8 MiB write for a retry that never came,
/// however much more was written.
#[test]
fn a_full_disk_fails_writes_and_loses_nothing_committed() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let disk = lab.mkdir("disk");
    lab.tmpfs(&disk);
    let store = disk.join("store");
    let mnt = lab.mkdir("mnt");
    lab.mount_ok(&store, &mnt, None);
    let pid = *common::daemon_pids(&store).first().expect("daemon pid");
    std::fs::write(mnt.join("keep.txt"), b"kept").expect("write");
    fp_ok(&[
        OsStr::new("snapshot"),
        OsStr::new("-m"),
        mnt.as_os_str(),
        OsStr::new("before"),
    ]);
    // Three times what the disk holds, every block its own (no dedup).
    use std::io::Write;
    let mut f = std::fs::File::create(mnt.join("fill")).expect("create");
    let mut buf = vec![0u8; 1 << 20];
    let mut failed = None;
    for i in 0..768u64 {
        for (j, w) in buf.chunks_mut(8).enumerate() {
            w.copy_from_slice(
                &(i << 32 | j as u64)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .to_le_bytes(),
            );
        }
        // A program that does not stop at the first error goes on writing.
        if let Err(e) = f.write_all(&buf) {
            failed.get_or_insert(e);
        }
    }
    let failed = failed
        .or_else(|| f.sync_all().err())
        .expect("a write or the fsync fails");
    assert_eq!(failed.raw_os_error(), Some(libc::ENOSPC), "{failed}");
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    assert!(
        rss_kib < 400 << 10,
        "the daemon holds {rss_kib} KiB after 768 MiB written to a 256 MiB disk"
    );
    drop(f);
    std::fs::remove_file(mnt.join("fill")).expect("rm");
    // Room again.
    let o = std::process::Command::new("mount")
        .args(["-o", "remount,size=1g"])
        .arg(&disk)
        .output()
        .expect("remount");
    assert!(o.status.success(), "{o:?}");
    // The first flush may report the writes lost earlier, by name.
    let snap = |name: &str| {
        fp(&[
            OsStr::new("snapshot"),
            OsStr::new("-m"),
            mnt.as_os_str(),
            OsStr::new(name),
        ])
    };
    let first = snap("after");
    if !first.ok {
        assert!(
            first.stderr.contains("could not all be stored"),
            "{}",
            first.stderr
        );
        let again = snap("after");
        assert!(again.ok, "{}", again.stderr);
    }
    assert_eq!(std::fs::read(mnt.join("keep.txt")).expect("read"), b"kept");
    assert_eq!(
        std::fs::read(mnt.join(".forkpoint/snapshots/before/keep.txt")).expect("read"),
        b"kept"
    );
    std::fs::write(mnt.join("new.txt"), b"new").expect("write after");
    fp_ok(&[
        OsStr::new("snapshot"),
        OsStr::new("-m"),
        mnt.as_os_str(),
        OsStr::new("later"),
    ]);
    let v = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(v.contains("verified"), "{v}");
}

/// The README's first command: `forkpoint demo` runs through, runs again in its own
/// directory (made anew), and refuses a directory holding anything else, touching nothing.
#[test]
fn the_demo_runs_and_never_cleans_a_directory_of_the_users() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let dir = lab.path().join("demo");
    // Unmounted by the lab if the demo stops half way.
    lab.track(&dir.join("store"), &dir.join("mnt"));
    for _ in 0..2 {
        let out = fp_ok(&[OsStr::new("demo"), dir.as_os_str()]);
        assert!(out.contains("0 problems"), "{out}");
        assert!(!is_mounted(&dir.join("mnt")), "the demo unmounts");
    }
    let mine = lab.path().join("mine");
    std::fs::create_dir_all(mine.join("sub")).expect("mkdir");
    std::fs::write(mine.join("sub/important.txt"), "precious\n").expect("write");
    let o = fp(&[OsStr::new("demo"), mine.as_os_str()]);
    assert!(
        !o.ok && o.stderr.contains("holds files of its own"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("sub/important.txt")).expect("kept"),
        "precious\n"
    );
}

/// A store that a mount could not make (its lower directory is missing) leaves nothing
/// behind, so the corrected command works; and `umount` of a store's last mount returns
/// once its daemon has let go of the store.
#[test]
fn a_failed_first_mount_leaves_no_store_and_umount_waits_for_the_daemon() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    let lower = lab.mkdir("lower");
    let missing = lab.path().join("no-such-lower");
    let o = fp(&[
        OsStr::new("mount"),
        store.as_os_str(),
        mnt.as_os_str(),
        OsStr::new("--lower"),
        missing.as_os_str(),
    ]);
    assert!(!o.ok && o.stderr.contains("no-such-lower"), "{}", o.stderr);
    assert!(!store.exists(), "the store is not left half made");
    lab.mount_ok(&store, &mnt, Some(&lower));
    std::fs::write(mnt.join("f"), "x\n").expect("write");
    fp_ok(&[OsStr::new("umount"), mnt.as_os_str()]);
    // The daemon held an exclusive lock on the store while it ran.
    let f = std::fs::File::open(store.join("lock")).expect("lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `f` owns.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(
        r, 0,
        "the daemon still holds the store after umount returned"
    );
}

/// A store whose lower directory went is refused at mount, naming it (its files would fail
/// one by one behind a mount that looks fine); a name with a control character is refused.
#[test]
fn a_missing_lower_directory_and_control_characters_are_refused() {
    if !common::can_mount("fuse_e2e") {
        return;
    }
    let lab = Lab::new();
    let store = lab.path().join("store");
    let mnt = lab.mkdir("mnt");
    let lower = lab.mkdir("lower");
    std::fs::write(lower.join("f"), "lower\n").expect("write");
    lab.mount_ok(&store, &mnt, Some(&lower));
    let o = fp(&[
        OsStr::new("snapshot"),
        OsStr::new("-m"),
        mnt.as_os_str(),
        OsStr::new("a\nb"),
    ]);
    assert!(
        !o.ok && o.stderr.contains("control characters"),
        "{}",
        o.stderr
    );
    fp_ok(&[OsStr::new("umount"), mnt.as_os_str()]);
    let moved = lab.path().join("lower.moved");
    std::fs::rename(&lower, &moved).expect("rename");
    let o = fp(&[OsStr::new("mount"), store.as_os_str(), mnt.as_os_str()]);
    assert!(
        !o.ok && o.stderr.contains("lower directory") && o.stderr.contains("missing"),
        "{}",
        o.stderr
    );
    assert!(!is_mounted(&mnt));
    std::fs::rename(&moved, &lower).expect("rename back");
    lab.mount_ok(&store, &mnt, None);
    assert_eq!(
        std::fs::read_to_string(mnt.join("f")).expect("read"),
        "lower\n"
    );
}

/// `.forkpoint/snapshots/NAME` follows the name: forgotten, it is gone; given to a new
/// snapshot, it shows the new one (with gc run in between too), not what the name meant
/// when it was first looked up.
#[test]
fn a_snapshot_name_given_again_shows_the_new_snapshot() {
    let Some((_lab, store, mnt)) = mounted_lab() else {
        return;
    };
    let run = |args: &[&OsStr]| fp_ok(args);
    let m = mnt.as_os_str();
    let snap = mnt.join(".forkpoint/snapshots/rr/v");
    for (round, gc) in [(1, false), (2, false), (3, true)] {
        std::fs::write(mnt.join("v"), format!("{round}\n")).expect("write");
        run(&[
            OsStr::new("snapshot"),
            OsStr::new("-m"),
            m,
            OsStr::new("rr"),
        ]);
        assert_eq!(
            std::fs::read_to_string(&snap).expect("read the snapshot"),
            format!("{round}\n"),
            "round {round}"
        );
        // A listing (READDIRPLUS) hands the kernel the names too.
        for e in std::fs::read_dir(mnt.join(".forkpoint/snapshots")).expect("ls") {
            let _ = e.expect("entry").metadata();
        }
        run(&[OsStr::new("forget"), OsStr::new("-m"), m, OsStr::new("rr")]);
        assert!(
            !snap.exists(),
            "round {round}: a forgotten name is still shown"
        );
        if gc {
            run(&[OsStr::new("gc"), store.as_os_str()]);
        }
    }
    std::fs::write(mnt.join("v"), "4\n").expect("write");
    run(&[
        OsStr::new("snapshot"),
        OsStr::new("-m"),
        m,
        OsStr::new("rr"),
    ]);
    assert_eq!(std::fs::read_to_string(&snap).expect("read"), "4\n");
}

/// gc waits for a checkpoint in progress (from its filesystem commit to its record): what
/// such a checkpoint stored is reachable from nothing gc keeps until it is recorded. Here a
/// process makes the commit a checkpoint makes and stays; gc ends only once it is gone.
#[test]
fn gc_waits_for_a_checkpoint_in_progress() {
    let Some((_lab, store, mnt)) = mounted_lab() else {
        return;
    };
    let script = format!(
        "import socket, sys, time\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect({sock:?})\n\
         s.sendall(b'{{\"op\":\"commit\",\"mountpoint\":{mp:?}}}\\n')\n\
         print(s.makefile().readline(), flush=True)\n\
         time.sleep(60)\n",
        sock = store.join("ctl.sock").to_str().expect("utf8"),
        mp = mnt.to_str().expect("utf8"),
    );
    let mut checkpointer = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(checkpointer.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert!(line.contains("\"ok\":true"), "{line}");
    let mut gc = std::process::Command::new(env!("CARGO_BIN_EXE_forkpoint"))
        .arg("gc")
        .arg(&store)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("gc");
    std::thread::sleep(Duration::from_secs(1));
    let early = gc.try_wait().expect("gc");
    let _ = checkpointer.kill();
    let _ = checkpointer.wait();
    let status = gc.wait().expect("gc");
    assert!(
        early.is_none(),
        "gc ended beside a checkpoint in progress: {early:?}"
    );
    assert!(status.success());
}

/// A file open in a snapshot stays readable when the snapshot is forgotten and gc runs: gc
/// keeps what snapshots open in a mount reach (it read EIO).
#[test]
fn a_file_open_in_a_forgotten_snapshot_stays_readable_through_gc() {
    let Some((_lab, store, mnt)) = mounted_lab() else {
        return;
    };
    let m = mnt.as_os_str();
    let old = pattern(300_000);
    std::fs::write(mnt.join("x"), &old).expect("write");
    fp_ok(&[OsStr::new("snapshot"), OsStr::new("-m"), m, OsStr::new("s")]);
    let f =
        std::fs::File::open(mnt.join(".forkpoint/snapshots/s/x")).expect("open in the snapshot");
    std::fs::write(mnt.join("x"), b"new").expect("rewrite");
    fp_ok(&[OsStr::new("forget"), OsStr::new("-m"), m, OsStr::new("s")]);
    fp_ok(&[OsStr::new("gc"), store.as_os_str()]);
    let mut got = vec![0u8; old.len()];
    f.read_exact_at(&mut got, 0)
        .expect("read the forgotten snapshot's file after gc");
    assert!(got == old, "the snapshot's file changed");
    drop(f);
    let v = fp_ok(&[OsStr::new("verify"), store.as_os_str()]);
    assert!(v.contains("verified"), "{v}");
}
