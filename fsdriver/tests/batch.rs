//! `Store::put_batch`: one vectored append per run of records, across segment boundaries,
//! skipping what the store (or the batch) already holds; everything reads back verified after
//! a commit and a reopen.

use forkpoint_fs::segment::ObjectKind;
use forkpoint_fs::store::StoreConfig;
use forkpoint_fs::{ContentId, Store};

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
