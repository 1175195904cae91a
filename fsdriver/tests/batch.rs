//! `Store::put_batch`: one vectored append per run of records, across segment boundaries,
//! skipping what the store (or the batch) already holds; everything reads back verified after
//! a commit and a reopen.

use forkpoint_fs::segment::ObjectKind;
use forkpoint_fs::store::StoreConfig;
use forkpoint_fs::{ContentId, Store};

/// Flips one byte of the payload of `id`'s record, on disk (the store is closed).
fn flip_payload_byte(store: &std::path::Path, id: &ContentId) {
    let (seg, mut bytes, at) = std::fs::read_dir(store.join("segments"))
        .expect("segments")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find_map(|p| {
            let bytes = std::fs::read(&p).ok()?;
            // The id ends the 48-byte header: 100 bytes into the payload.
            let at = bytes.windows(32).position(|w| w == id.0)?;
            Some((p, bytes, at + 32 + 100))
        })
        .expect("the object's record");
    bytes[at] ^= 1;
    std::fs::write(&seg, &bytes).expect("write segment");
}

#[test]
fn put_batch_spans_segments_and_skips_known_objects() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let config = StoreConfig {
        segment_size: 64 << 10,
        ..StoreConfig::default()
    };
    let chunks: Vec<Vec<u8>> = (0..100u32)
        .map(|i| (0..(1000 + i * 37)).map(|j| (i ^ j) as u8).collect())
        .collect();
    let ids: Vec<ContentId> = chunks.iter().map(|c| ContentId::of(c)).collect();
    assert_eq!(
        ContentId::of_many(&chunks.iter().map(Vec::as_slice).collect::<Vec<_>>()),
        ids,
        "parallel hashing agrees"
    );
    {
        let store = Store::create_with(&dir, None, config.clone(), None).expect("create");
        // Some objects are there already.
        store
            .put_with_id(ObjectKind::Chunk, ids[3], &chunks[3])
            .expect("put");
        let mut items: Vec<(ContentId, &[u8])> = ids
            .iter()
            .copied()
            .zip(chunks.iter().map(Vec::as_slice))
            .collect();
        // And one is repeated within the batch.
        items.push((ids[7], &chunks[7]));
        let new = store.put_batch(ObjectKind::Chunk, &items).expect("batch");
        let want: u64 = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, c)| c.len() as u64)
            .sum();
        assert_eq!(new, want, "payload bytes newly written");
        assert_eq!(
            store.put_batch(ObjectKind::Chunk, &items).expect("again"),
            0,
            "nothing is written twice"
        );
        store.commit(None).expect("commit");
    }
    let store = Store::open_with(&dir, config, None, true).expect("reopen");
    for (id, c) in ids.iter().zip(&chunks) {
        assert_eq!(&store.read_verified(id).expect("read"), c);
    }
    let segs = std::fs::read_dir(dir.join("segments"))
        .expect("segments")
        .count();
    assert!(segs > 2, "the batch spanned segments ({segs})");
}

/// Appends are staged and written in large aligned writes by a background thread: objects
/// read back before any commit (the read waits for the writes), across many stage buffers,
/// and after a reopen that cuts the padding of the last block, appends go on correctly.
#[test]
fn staged_appends_read_back_before_and_after_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let chunk = |i: u32| -> Vec<u8> {
        let len = 60_000 + (i as usize * 4099) % 9000;
        (0..len).map(|j| (i as usize * 31 + j * 7) as u8).collect()
    };
    let mut all = Vec::new();
    {
        let store = Store::create_with(&dir, None, StoreConfig::default(), None).expect("create");
        // 600 objects of ~64 KiB: several 8 MiB stage buffers.
        for round in 0..3u32 {
            let chunks: Vec<Vec<u8>> = (round * 200..round * 200 + 200).map(chunk).collect();
            let items: Vec<(ContentId, &[u8])> = chunks
                .iter()
                .map(|c| (ContentId::of(c), c.as_slice()))
                .collect();
            store.put_batch(ObjectKind::Chunk, &items).expect("batch");
            // The newest and an older object read back before anything is committed.
            for k in [0, 99, 199] {
                assert_eq!(
                    &store.read_verified(&items[k].0).expect("read staged"),
                    &chunks[k]
                );
            }
            // A small object after the batch lands in the partial last block.
            let small = format!("small object {round}").into_bytes();
            let id = store.put(ObjectKind::Inode, &small).expect("put");
            assert_eq!(store.read_verified(&id).expect("read small"), small);
            all.extend(items.iter().map(|(id, _)| *id).zip(chunks.iter().cloned()));
            all.push((id, small));
            if round == 1 {
                store.commit(None).expect("commit");
            }
        }
        store.commit(None).expect("commit");
    }
    {
        // Reopening cuts the padding after the last record; the next appends go to a new
        // segment and everything stays readable.
        let store = Store::open(&dir).expect("reopen");
        let more = chunk(9999);
        let id = store.put(ObjectKind::Chunk, &more).expect("put");
        store.commit(None).expect("commit");
        all.push((id, more));
    }
    let store = Store::open_with(&dir, StoreConfig::default(), None, true).expect("read-only");
    for (id, c) in &all {
        assert_eq!(&store.read_verified(id).expect("read"), c);
    }
}

/// `read_many_verified` reads neighbouring records with one read and checks each: the
/// results come back in the order asked (duplicates included), and a flipped byte in one
/// record is reported as that object's corruption.
#[test]
fn read_many_coalesces_and_still_verifies_each_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let chunks: Vec<Vec<u8>> = (0..300u32)
        .map(|i| (0..4096u32).map(|j| (i * 7 + j) as u8).collect())
        .collect();
    let ids: Vec<ContentId> = chunks.iter().map(|c| ContentId::of(c)).collect();
    let store = Store::create_with(&dir, None, StoreConfig::default(), None).expect("create");
    let items: Vec<(ContentId, &[u8])> = ids
        .iter()
        .copied()
        .zip(chunks.iter().map(Vec::as_slice))
        .collect();
    store.put_batch(ObjectKind::Chunk, &items).expect("batch");
    store.commit(None).expect("commit");
    let mut want: Vec<usize> = (0..300).rev().collect();
    want.extend([5, 5, 299, 0]);
    let asked: Vec<ContentId> = want.iter().map(|&i| ids[i]).collect();
    let got = store.read_many_verified(&asked).expect("read many");
    for (i, g) in want.iter().zip(&got) {
        assert_eq!(g, &chunks[*i], "object {i}");
    }
    drop(store);
    flip_payload_byte(&dir, &ids[150]);
    let store = Store::open_with(&dir, StoreConfig::default(), None, true).expect("reopen");
    let err = store
        .read_many_verified(&ids)
        .expect_err("a corrupt record must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&ids[150].to_string()),
        "names the object: {msg}"
    );
}

/// `read_into` reads neighbouring records with one `preadv`, payloads straight into the
/// caller's buffer, in the order asked (forwards, backwards, repeated); it checks every
/// record and refuses a buffer of the wrong size.
#[test]
fn read_into_fills_the_buffer_and_checks_each_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let config = StoreConfig {
        segment_size: 256 << 10,
        ..StoreConfig::default()
    };
    let chunks: Vec<Vec<u8>> = (0..700u32)
        .map(|i| (0..4096u32).map(|j| (i * 13 + j * 3) as u8).collect())
        .collect();
    let ids: Vec<ContentId> = chunks.iter().map(|c| ContentId::of(c)).collect();
    let store = Store::create_with(&dir, None, config.clone(), None).expect("create");
    let items: Vec<(ContentId, &[u8])> = ids
        .iter()
        .copied()
        .zip(chunks.iter().map(Vec::as_slice))
        .collect();
    store.put_batch(ObjectKind::Chunk, &items).expect("batch");
    // Staged, not yet committed: read_into flushes what it needs.
    let mut want: Vec<usize> = (0..700).collect();
    want.extend((0..700).rev().step_by(3));
    want.extend([5, 5, 6]);
    let asked: Vec<(ContentId, u64)> = want.iter().map(|&i| (ids[i], 4096)).collect();
    let mut out = vec![0u8; asked.len() * 4096];
    store.read_into(&asked, &mut out).expect("read into");
    for (k, i) in want.iter().enumerate() {
        assert_eq!(
            &out[k * 4096..(k + 1) * 4096],
            &chunks[*i][..],
            "object {i}"
        );
    }
    let mut short = vec![0u8; 4095];
    assert!(store.read_into(&[(ids[0], 4096)], &mut short).is_err());
    // Lengths that add up but do not match the objects are refused.
    let mut two = vec![0u8; 8192];
    let e = store
        .read_into(&[(ids[0], 8192), (ids[1], 0)], &mut two)
        .expect_err("wrong lengths")
        .to_string();
    assert!(e.contains("4096 bytes where 8192 were expected"), "{e}");
    store.commit(None).expect("commit");
    drop(store);
    flip_payload_byte(&dir, &ids[400]);
    let store = Store::open_with(&dir, config, None, true).expect("reopen");
    let mut out = vec![0u8; ids.len() * 4096];
    let all: Vec<(ContentId, u64)> = ids.iter().map(|id| (*id, 4096)).collect();
    let msg = store
        .read_into(&all, &mut out)
        .expect_err("a corrupt record must be refused")
        .to_string();
    assert!(
        msg.contains(&ids[400].to_string()),
        "names the object: {msg}"
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");
}

/// gc marks without stopping writers; if anything was written, deduplicated against a
/// stored object, referenced or committed between its mark and its sweep, the sweep refuses
/// and nothing is reclaimed (the object the mark found unused may be in use now). With
/// nothing in between, the unused object goes.
#[test]
fn gc_refuses_to_sweep_what_changed_under_its_mark() {
    use forkpoint_fs::{maint, StoreError};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let store = Store::create_with(&dir, None, StoreConfig::default(), None).expect("create");
    let data = b"used by nothing that is committed".to_vec();
    let x = store.put(ObjectKind::Chunk, &data).expect("put");
    store.commit(None).expect("commit");
    let changed = |r: Result<maint::GcReport, StoreError>| {
        assert!(
            matches!(r, Err(StoreError::ChangedDuringGc)),
            "the sweep must refuse: {r:?}"
        );
    };
    // A put of the same bytes (deduplicated: nothing new is written).
    changed(maint::gc_with(&store, &mut || {
        store.put(ObjectKind::Chunk, &data).expect("put again");
    }));
    assert_eq!(store.read_verified(&x).expect("still there"), data);
    store.commit(None).expect("commit");
    // A reference taken to it (a process image naming it).
    changed(maint::gc_with(&store, &mut || {
        store.reference(&[x]).expect("reference");
    }));
    store.commit(None).expect("commit");
    // A commit in between.
    changed(maint::gc_with(&store, &mut || {
        store.put(ObjectKind::Chunk, b"new").expect("put");
        store.commit(None).expect("commit");
    }));
    assert!(store.contains(&x));
    // Nothing in between: swept.
    maint::gc(&store).expect("gc");
    assert!(!store.contains(&x));
    assert!(matches!(
        store.reference(&[x]),
        Err(StoreError::MissingObject(id)) if id == x
    ));
}
