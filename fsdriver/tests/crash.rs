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
fn workload(fs: &Fs) -> (Files, Vec<(String, Files)>, bool) {
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
            return (last, snaps, false);
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
                return (last, snaps, false)
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (last, snaps, true)
}

fn check(dir: &Path, want: &Files, snaps: &[(String, Files)]) {
    let store = Store::open(dir).expect("store opens after a crash");
    let head = store.head("main").expect("main");
    assert_eq!(
        &tree_files(&store, head.root),
        want,
        "head is the last commit"
    );
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
            let (want, snaps, completed) = workload(&fs);
            drop(fs);
            crash.crash(torn).expect("crash");
            check(&dir, &want, &snaps);
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
