//! The object index file (store format 2): a store of format 1, with its objects in the
//! catalog, is read as it is when opened read-only and moved to an index file when opened
//! for writing; a damaged index entry is named, not served.

use forkpoint_fs::segment::ObjectKind;
use forkpoint_fs::{maint, objindex, ContentId, Store};
use std::path::Path;

fn chunks() -> Vec<Vec<u8>> {
    (0..200u32)
        .map(|i| {
            (0..(3000 + i))
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect()
        })
        .collect()
}

/// Makes a store holding `chunks`, committed.
fn make(dir: &Path) -> Vec<ContentId> {
    let store = Store::create(dir, None).expect("create");
    let data = chunks();
    let items: Vec<(ContentId, &[u8])> = data.iter().map(|c| (ContentId::of(c), &c[..])).collect();
    store.put_batch(ObjectKind::Chunk, &items).expect("put");
    store.commit(None).expect("commit");
    items.iter().map(|i| i.0).collect()
}

fn meta(db: &rusqlite::Connection, key: &str) -> Option<String> {
    db.query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
        .ok()
}

#[test]
fn format_1_store_is_read_and_then_moved_to_an_index_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let ids = make(&dir);
    // Turn it back into format 1: every index entry becomes a catalog row.
    {
        let db = rusqlite::Connection::open(dir.join("forkpoint.db")).expect("db");
        assert_eq!(meta(&db, "format_version").as_deref(), Some("2"));
        let gen: u64 = meta(&db, "index_gen").expect("gen").parse().expect("num");
        let len: usize = meta(&db, "index_len").expect("len").parse().expect("num");
        let bytes = std::fs::read(objindex::path(&dir, gen)).expect("index");
        let n: i64 = db
            .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 0, "a format-2 catalog holds no objects");
        for e in bytes[objindex::HEADER_LEN as usize..len].chunks(objindex::ENTRY_LEN) {
            let (id, loc) = objindex::decode(e).expect("entry");
            db.execute(
                "INSERT OR REPLACE INTO objects VALUES(?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    &id.0[..],
                    loc.segment as i64,
                    loc.offset as i64,
                    loc.len as i64,
                    loc.kind as u8 as i64
                ],
            )
            .expect("insert");
        }
        db.execute(
            "DELETE FROM meta WHERE key IN ('index_gen', 'index_len')",
            [],
        )
        .expect("meta");
        db.execute("UPDATE meta SET value='1' WHERE key='format_version'", [])
            .expect("meta");
        std::fs::remove_file(objindex::path(&dir, gen)).expect("rm index");
    }
    let data = chunks();
    {
        let ro = Store::open_read_only(&dir).expect("read-only open of format 1");
        for (id, c) in ids.iter().zip(&data) {
            assert_eq!(&ro.read_verified(id).expect("read"), c);
        }
        assert!(
            !objindex::path(&dir, 1).exists(),
            "a reader changes nothing"
        );
    }
    {
        let store = Store::open(&dir).expect("open for writing");
        let report = maint::verify(&store).expect("verify");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        for (id, c) in ids.iter().zip(&data) {
            assert_eq!(&store.read_verified(id).expect("read"), c);
        }
        // New objects go to the index file from now on.
        let extra = b"one more object".to_vec();
        let id = store.put(ObjectKind::Chunk, &extra).expect("put");
        store.commit(None).expect("commit");
        drop(store);
        let ro = Store::open_read_only(&dir).expect("reopen");
        assert_eq!(ro.read_verified(&id).expect("read"), extra);
    }
    let db = rusqlite::Connection::open(dir.join("forkpoint.db")).expect("db");
    assert_eq!(meta(&db, "format_version").as_deref(), Some("2"));
    let n: i64 = db
        .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 0, "the rows moved to the index file");
}

#[test]
fn damaged_index_entry_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    make(&dir);
    let db = rusqlite::Connection::open(dir.join("forkpoint.db")).expect("db");
    let gen: u64 = meta(&db, "index_gen").expect("gen").parse().expect("num");
    drop(db);
    let p = objindex::path(&dir, gen);
    let mut bytes = std::fs::read(&p).expect("index");
    let at = objindex::HEADER_LEN as usize + 5 * objindex::ENTRY_LEN + 40;
    bytes[at] ^= 0x10;
    std::fs::write(&p, &bytes).expect("write");
    let err = match Store::open_read_only(&dir) {
        Ok(_) => panic!("a damaged index was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("index.") && err.contains("entry 5"),
        "names the file and the entry: {err}"
    );
}
