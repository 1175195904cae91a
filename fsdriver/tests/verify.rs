//! verify detects a flipped bit in any record of any segment and names the paths using it.

use forkpoint_fs::fs::{Caller, Fs};
use forkpoint_fs::segment::{self, DirStorage, Storage};
use forkpoint_fs::{maint, Store};
use std::os::unix::fs::FileExt;

#[test]
fn verify_names_every_flipped_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    {
        let store = Store::create(&dir, None).expect("create");
        let fs = Fs::new(store, "main").expect("fs");
        let d = fs
            .mkdir(1, b"docs", 0o755, Caller::default())
            .expect("mkdir");
        let (st, fh) = fs
            .create(d.ino, b"report.txt", 0o644, true, Caller::default())
            .expect("create");
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
        fs.write(st.ino, 0, &payload).expect("write");
        fs.release(fh).expect("release");
        fs.snapshot("one").expect("snapshot");
    }
    let clean = maint::verify(&Store::open_read_only(&dir).expect("open")).expect("verify");
    assert!(clean.problems.is_empty());
    assert!(clean.objects > 5);
    let live = maint::reachable(&Store::open_read_only(&dir).expect("open")).expect("reachable");
    let storage = DirStorage::new(dir.join("segments"));
    let mut checked = 0;
    for seg in storage.list().expect("list") {
        let f = storage.open(seg, false).expect("open seg");
        let (records, _) = segment::scan(&*f, seg, segment::SEGMENT_HEADER_LEN).expect("scan");
        let path = dir.join("segments").join(format!("{seg:016x}.seg"));
        for (id, loc) in records.into_iter().filter(|(id, _)| live.contains(id)) {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            let at = loc.offset + segment::RECORD_HEADER_LEN + u64::from(loc.len) / 2;
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, at).expect("read");
            file.write_all_at(&[b[0] ^ 0x10], at).expect("flip");
            let store = Store::open_read_only(&dir).expect("open");
            let r = maint::verify(&store).expect("verify runs");
            let p = r.problems.iter().find(|p| p.object == id.to_hex());
            let p = p.unwrap_or_else(|| panic!("flip in {:?} object {id} not reported", loc.kind));
            assert!(p.reason.contains("hash mismatch"), "{}", p.reason);
            assert!(!p.used_by.is_empty());
            if loc.kind == segment::ObjectKind::Chunk {
                assert!(
                    p.used_by.iter().any(|u| u.contains("/docs/report.txt")),
                    "{:?}",
                    p.used_by
                );
            }
            file.write_all_at(&b, at).expect("restore");
            checked += 1;
        }
    }
    assert!(checked > 5, "checked {checked} records");
}
