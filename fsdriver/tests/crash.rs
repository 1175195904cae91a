//! Crash tests: segment storage that loses every write after the N-th sync (segment fsyncs
//! and catalog commits alike, with a torn tail of unsynced bytes), for every N in a workload.
//! After the crash the store must open to exactly its last commit.

use forkpoint_fs::fs::{Caller, Fs};
use forkpoint_fs::segment::{CrashStorage, Storage};
use forkpoint_fs::store::StoreConfig;
use forkpoint_fs::tree::{Body, TreeView};
use forkpoint_fs::{maint, Store, StoreError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

type Files = BTreeMap<String, Vec<u8>>;

fn config() -> StoreConfig {
    StoreConfig {
        segment_size: 200 * 1024,
        cache_bytes: 1 << 20,
    }
}

fn tree_files(store: &Arc<Store>, root: forkpoint_fs::ContentId) -> Files {
    let view = TreeView::open(store.clone(), root).expect("open tree");
    let mut out = Files::new();
    let mut stack = vec![(1u64, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let inode = view.inode(ino).expect("inode").expect("present");
        match &inode.body {
            Body::Dir { entries, .. } => {
                for (n, e) in entries {
                    stack.push((e.ino, format!("{path}/{}", String::from_utf8_lossy(n))));
                }
            }
            Body::File { .. } => {
                out.insert(path, view.read_all(&inode).expect("read"));
            }
            _ => {}
        }
    }
    out
}

fn data(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn put(fs: &Fs, files: &mut Files, name: &str, off: u64, bytes: &[u8]) -> Result<(), String> {
    let (st, fh) = fs
        .create(1, name.as_bytes(), 0o644, false, Caller::default())
        .map_err(|e| e.to_string())?;
    fs.write(st.ino, off, bytes).map_err(|e| e.to_string())?;
    fs.release(fh).map_err(|e| e.to_string())?;
    let f = files.entry(format!("/{name}")).or_default();
    let end = off as usize + bytes.len();
    if f.len() < end {
        f.resize(end, 0);
    }
    f[off as usize..end].copy_from_slice(bytes);
    Ok(())
}

/// One step of the workload.
type Step = Box<dyn Fn(&Fs, &mut Files) -> Result<(), String>>;

/// Runs the workload; returns the files of the last successful commit and the snapshots taken.
/// Runs the workload until it ends or meets the simulated crash. Returns the files of the
/// last commit that returned, those of an fsync that was under way at the crash (an intent
/// commit is durable once its marker is on the disk, before the fsync returns, so the store
/// may hold either), the snapshots, and whether the workload completed.
fn workload(fs: &Fs) -> (Files, Option<Files>, Vec<(String, Files)>, bool) {
    let mut files = Files::new();
    let mut last = Files::new();
    let mut snaps = Vec::new();
    let steps: Vec<Step> = vec![
        Box::new(|fs, f| put(fs, f, "a", 0, &data(1, 300_000))),
        Box::new(|fs, f| put(fs, f, "b", 0, b"small")),
        Box::new(|fs, f| put(fs, f, "a", 70_000, &data(2, 1000))),
        Box::new(|fs, f| {
            fs.unlink(1, b"b").map_err(|e| e.to_string())?;
            f.remove("/b");
            Ok(())
        }),
        Box::new(|fs, f| put(fs, f, "c", 0, &data(3, 500_000))),
        Box::new(|fs, f| put(fs, f, "a", 0, &data(4, 10))),
    ];
    for (i, step) in steps.iter().enumerate() {
        if step(fs, &mut files).is_err() {
            return (last, None, snaps, false);
        }
        let r = if i % 2 == 1 {
            let name = format!("snap{i}");
            fs.snapshot(&name).map(|_| Some(name))
        } else {
            fs.fsync().map(|_| None)
        };
        match r {
            Ok(name) => {
                last = files.clone();
                if let Some(n) = name {
                    snaps.push((n, files.clone()));
                }
            }
            Err(forkpoint_fs::fs::FsError::Store(StoreError::SimulatedCrash)) => {
                let under_way = (i % 2 == 0).then(|| files.clone());
                return (last, under_way, snaps, false);
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (last, None, snaps, true)
}

fn check(dir: &Path, want: &Files, snaps: &[(String, Files)]) {
    check_either(dir, want, None, snaps)
}

fn check_either(dir: &Path, want: &Files, or: Option<&Files>, snaps: &[(String, Files)]) {
    let store = Store::open(dir).expect("store opens after a crash");
    let head = store.head("main").expect("main");
    let got = tree_files(&store, head.root);
    if or != Some(&got) {
        assert_eq!(&got, want, "head is the last commit");
    }
    for (name, files) in snaps {
        let cp = store.find(name).expect("snapshot kept");
        assert_eq!(&tree_files(&store, cp.root), files, "snapshot {name}");
    }
    let r = maint::verify(&store).expect("verify");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn commit_survives_crash_at_every_sync() {
    let mut n = 0;
    loop {
        for torn in [0usize, 37, 1 << 20] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("store");
            drop(Store::create_with(&dir, None, config(), None).expect("create"));
            let crash = Arc::new(CrashStorage::new(dir.join("segments"), n).expect("storage"));
            let store = Store::open_with(
                &dir,
                config(),
                Some(crash.clone() as Arc<dyn Storage>),
                false,
            )
            .expect("open");
            let fs = Fs::new(store, "main").expect("fs");
            let (want, under_way, snaps, completed) = workload(&fs);
            drop(fs);
            crash.crash(torn).expect("crash");
            check_either(&dir, &want, under_way.as_ref(), &snaps);
            if completed && torn == 0 {
                assert!(n > 5, "the workload must sync several times");
                return;
            }
        }
        n += 1;
        assert!(n < 200, "workload never completed");
    }
}

#[test]
fn gc_survives_crash_at_every_sync() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base");
    let (want, snaps) = {
        let store = Store::create_with(&base, None, config(), None).expect("create");
        let fs = Fs::new(store, "main").expect("fs");
        let mut files = Files::new();
        put(&fs, &mut files, "a", 0, &data(1, 400_000)).expect("put");
        fs.fsync().expect("commit");
        put(&fs, &mut files, "keep", 0, &data(9, 100_000)).expect("put");
        fs.snapshot("kept").expect("snapshot");
        let kept = files.clone();
        put(&fs, &mut files, "a", 0, &data(2, 400_000)).expect("put");
        fs.fsync().expect("commit");
        put(&fs, &mut files, "a", 0, &data(3, 400_000)).expect("put");
        fs.fsync().expect("commit");
        (files, vec![("kept".to_string(), kept)])
    };
    let before = dir_size(&base.join("segments"));
    let mut n = 0;
    loop {
        let dir = tmp.path().join(format!("run{n}"));
        copy_dir(&base, &dir);
        let crash = Arc::new(CrashStorage::new(dir.join("segments"), n).expect("storage"));
        let store = Store::open_with(
            &dir,
            config(),
            Some(crash.clone() as Arc<dyn Storage>),
            false,
        )
        .expect("open");
        let done = match maint::gc(&store) {
            Ok(r) => {
                assert!(r.segments_reclaimed > 0, "gc reclaimed nothing: {r:?}");
                true
            }
            Err(StoreError::SimulatedCrash) => false,
            Err(e) => panic!("gc: {e}"),
        };
        drop(store);
        crash.crash(4096).expect("crash");
        check(&dir, &want, &snaps);
        if done {
            let after = dir_size(&dir.join("segments"));
            assert!(after < before, "gc shrank the store: {before} -> {after}");
            return;
        }
        n += 1;
        assert!(n < 100, "gc never completed");
    }
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.expect("entry").metadata().expect("md").len())
        .sum()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("segments")).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
    for e in std::fs::read_dir(from.join("segments")).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join("segments").join(e.file_name())).expect("copy");
    }
}

/// The worst a crash of the machine can do to intent commits (fsyncs): the catalog loses
/// every transaction since the last full commit and the index file its unflushed tail, and
/// the segment has a torn record past the last marker. The store opens with every fsynced
/// change (replayed from the markers in the log); a kill of the daemon (nothing lost) and
/// a lost index tail alone open the same, and opening again changes nothing.
#[test]
fn intent_commits_survive_losing_the_catalog_and_the_index_tail() {
    #[derive(Clone, Copy, Debug)]
    enum Loss {
        Nothing,
        IndexTail,
        CatalogAndIndexTail,
    }
    for loss in [Loss::Nothing, Loss::IndexTail, Loss::CatalogAndIndexTail] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("store");
        let saved = tmp.path().join("saved");
        std::fs::create_dir(&saved).expect("mkdir");
        let mut files = Files::new();
        let mut snap = Files::new();
        {
            let store = Store::create_with(&dir, None, config(), None).expect("create");
            let fs = Fs::new(store.clone(), "main").expect("fs");
            put(&fs, &mut files, "a", 0, &data(1, 150_000)).expect("put");
            fs.snapshot("base").expect("snapshot");
            snap.clone_from(&files);
            // What survives a crash of the machine: the files flushed at the full commit.
            for e in std::fs::read_dir(&dir).expect("read_dir") {
                let e = e.expect("entry");
                if e.file_type().expect("type").is_file() {
                    std::fs::copy(e.path(), saved.join(e.file_name())).expect("copy");
                }
            }
            // Intent commits, across segments (200 KiB each).
            for i in 0..12u32 {
                let name = format!("f{}", i % 5);
                put(
                    &fs,
                    &mut files,
                    &name,
                    u64::from(i) * 1000,
                    &data(10 + i, 40_000),
                )
                .expect("put");
                if i == 7 {
                    fs.unlink(1, b"f1").expect("unlink");
                    files.remove("/f1");
                }
                fs.fsync().expect("fsync");
            }
            // Written and never fsynced: a torn record past the last marker.
            put(&fs, &mut files.clone(), "late", 0, &data(99, 70_000)).expect("put");
            drop(fs);
            drop(store);
        }
        let segs = dir.join("segments");
        let last = std::fs::read_dir(&segs)
            .expect("segments")
            .map(|e| e.expect("entry").path())
            .max()
            .expect("a segment");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .expect("open segment");
        std::io::Write::write_all(&mut f, b"FPOB\x01\x01 torn").expect("torn tail");
        drop(f);
        let index = std::fs::read_dir(&saved)
            .expect("saved")
            .map(|e| e.expect("entry").file_name())
            .find(|n| n.to_string_lossy().starts_with("index."))
            .expect("an index file");
        match loss {
            Loss::Nothing => {}
            Loss::IndexTail | Loss::CatalogAndIndexTail => {
                let len = std::fs::metadata(saved.join(&index)).expect("md").len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join(&index))
                    .expect("index");
                f.set_len(len).expect("cut the index");
                // Whatever the disk held past it: zeros.
                f.set_len(len + 4096).expect("zeros");
            }
        }
        if let Loss::CatalogAndIndexTail = loss {
            for n in ["forkpoint.db", "forkpoint.db-wal"] {
                let _ = std::fs::remove_file(dir.join(n));
                if saved.join(n).exists() {
                    std::fs::copy(saved.join(n), dir.join(n)).expect("restore catalog");
                }
            }
            let _ = std::fs::remove_file(dir.join("forkpoint.db-shm"));
            let lost = Store::open_read_only(&dir).expect("read-only open");
            let head = lost.head("main").expect("main");
            assert_eq!(
                tree_files(&lost, head.root),
                snap,
                "{loss:?}: the catalog itself knows only the full commit"
            );
        }
        if let Loss::IndexTail = loss {
            // A reader before the writer's recovery: the index file falls short of what the
            // catalog records, and the objects past the base come from the log.
            let reader = Store::open_read_only(&dir).expect("read-only open");
            let head = reader.head("main").expect("main");
            assert_eq!(tree_files(&reader, head.root), files, "{loss:?}: reader");
        }
        check(&dir, &files, &[("base".to_string(), snap.clone())]);
        check(&dir, &files, &[("base".to_string(), snap.clone())]);
        let store = Store::open(&dir).expect("open");
        assert!(
            store.catalog(|c| c.fast_base()).expect("meta").is_none(),
            "{loss:?}: recovery ends with a full commit"
        );
    }
}

/// A commit with nothing new after fsyncs (as an unmount makes) settles them: the catalog
/// and the index file are flushed and the next opening has nothing to scan.
#[test]
fn a_commit_with_nothing_new_settles_the_intent_commits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let store = Store::create_with(&dir, None, config(), None).expect("create");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let mut files = Files::new();
    put(&fs, &mut files, "a", 0, &data(1, 10_000)).expect("put");
    fs.fsync().expect("fsync");
    let base = || store.catalog(|c| c.fast_base()).expect("meta");
    assert!(base().is_some(), "an fsync is an intent commit");
    fs.commit_now().expect("commit");
    assert!(base().is_none(), "settled");
    drop(fs);
    drop(store);
    check(&dir, &files, &[]);
}

/// A branch made from an unnamed commit while gc marks (the mark did not keep that commit)
/// makes the sweep refuse: it would drop the objects only that commit reaches, and the new
/// branch would point at files that are gone.
#[test]
fn gc_refuses_when_a_branch_is_made_from_a_commit_it_did_not_keep() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let store = Store::create_with(&dir, None, config(), None).expect("create");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let mut files = Files::new();
    put(&fs, &mut files, "a", 0, &data(7, 50_000)).expect("put");
    let old = fs.commit_now().expect("commit");
    fs.unlink(1, b"a").expect("unlink");
    put(&fs, &mut files, "b", 0, &data(8, 1000)).expect("put");
    fs.commit_now().expect("commit");
    let r = maint::gc_with(&store, &mut || {
        store
            .catalog(|c| c.create_branch("exp", old))
            .expect("branch");
    });
    assert!(
        matches!(r, Err(StoreError::ChangedDuringGc)),
        "the sweep must refuse: {r:?}"
    );
    let report = maint::verify(&store).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Once the branch is there before the mark, gc keeps what it needs.
    maint::gc(&store).expect("gc");
    let report = maint::verify(&store).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let exp = Fs::new(store.clone(), "exp").expect("mount exp");
    let a = exp.lookup(1, b"a").expect("a on exp");
    assert_eq!(exp.read(a.ino, 0, 50_000).expect("read"), data(7, 50_000));
}

/// A crash after gc's commit and before it deleted the segments it reclaimed leaves their
/// files behind. Opening the store must not take the fsync markers in them for commits made
/// after the last one: they are settled, and replaying them moved the head forward past a
/// rollback (files came back as they were before it).
#[test]
fn segments_gc_reclaimed_and_a_crash_left_are_not_replayed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    // Small segments: the last ones hold nothing but the rewrites and their markers.
    let config = || StoreConfig {
        segment_size: 4096,
        cache_bytes: 1 << 20,
    };
    let store = Store::create_with(&dir, None, config(), None).expect("create");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let mut files = Files::new();
    put(&fs, &mut files, "keep", 0, &data(1, 250_000)).expect("put");
    put(&fs, &mut files, "f", 0, b"v0").expect("put");
    let s0 = fs.snapshot("s0").expect("snapshot");
    let at_s0 = files.clone();
    let mut later = files.clone();
    for round in 1..=3u32 {
        put(&fs, &mut later, "f", 0, &data(round + 10, 250_000)).expect("put");
        fs.fsync().expect("fsync");
    }
    fs.checkout(s0).expect("checkout");
    drop(fs);
    drop(store);
    // gc run on its own, as `forkpoint gc` on an unmounted store.
    let store = Store::open_with(&dir, config(), None, false).expect("open");
    let segs = dir.join("segments");
    let saved = tmp.path().join("saved");
    std::fs::create_dir(&saved).expect("mkdir");
    for e in std::fs::read_dir(&segs).expect("ls") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), saved.join(e.file_name())).expect("copy");
    }
    let report = maint::gc(&store).expect("gc");
    assert!(report.segments_reclaimed > 0, "{report:?}");
    drop(store);
    // The crash: the reclaimed files are still there.
    for e in std::fs::read_dir(&saved).expect("ls") {
        let e = e.expect("entry");
        if !segs.join(e.file_name()).exists() {
            std::fs::copy(e.path(), segs.join(e.file_name())).expect("put back");
        }
    }
    check(&dir, &at_s0, &[("s0".to_string(), at_s0.clone())]);
    // And the next segment written does not take a reclaimed one's number.
    let store = Store::open_with(&dir, config(), None, false).expect("open");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let mut now = at_s0.clone();
    put(&fs, &mut now, "g", 0, &data(5, 250_000)).expect("put");
    fs.commit_now().expect("commit");
    drop(fs);
    drop(store);
    check(&dir, &now, &[("s0".to_string(), at_s0)]);
}

/// A failed restore's branch is dropped unless something named was recorded on it since it
/// was made: not for what a deleted branch of the same name left, not for a plain commit.
#[test]
fn a_branch_is_dropped_unless_it_holds_named_work_of_its_own() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let store = Store::create_with(&dir, None, config(), None).expect("create");
    let head = store.head("main").expect("main").cno;
    let on_b = |name: Option<&str>| {
        let fs = Fs::new(store.clone(), "b").expect("fs on b");
        let mut files = Files::new();
        put(&fs, &mut files, "x", 0, b"x").expect("put");
        match name {
            Some(n) => drop(fs.snapshot(n).expect("snapshot")),
            None => drop(fs.commit_now().expect("commit")),
        }
    };
    store
        .catalog(|c| c.create_branch("b", head))
        .expect("branch");
    on_b(Some("old-work"));
    store.catalog(|c| c.delete_branch("b")).expect("delete");
    std::thread::sleep(std::time::Duration::from_millis(2));
    store
        .catalog(|c| c.create_branch("b", head))
        .expect("branch again");
    on_b(None);
    store
        .catalog(|c| c.drop_branch("b"))
        .expect("nothing named of its own");
    store
        .catalog(|c| c.create_branch("b", head))
        .expect("branch again");
    on_b(Some("new-work"));
    let e = store
        .catalog(|c| c.drop_branch("b"))
        .expect_err("named work is kept")
        .to_string();
    assert!(
        e.contains("1 named snapshot or checkpoint was recorded on it"),
        "{e}"
    );
}
