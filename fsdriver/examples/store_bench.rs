//! Store benchmark (not a timed test): prints
//! - snapshot latency (median) at 1,000 and 100,000 files, with and without a pending change;
//! - store size after 10 snapshots of a 1 GiB tree with 1% rewritten before each.
//!
//! Run: `cargo run --release -p forkpoint-fs --example store_bench [-- --quick]`

use forkpoint_fs::fs::{Caller, Fs};
use forkpoint_fs::Store;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn snapshot_latency(files: usize) -> (f64, f64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&tmp.path().join("s"), None).expect("create");
    let fs = Fs::new(store, "main").expect("fs");
    let c = Caller::default();
    let per_dir = 1000;
    let mut first = 0;
    for d in 0..files.div_ceil(per_dir) {
        let dir = fs
            .mkdir(1, format!("d{d}").as_bytes(), 0o755, c)
            .expect("mkdir");
        for f in 0..per_dir.min(files - d * per_dir) {
            let (st, fh) = fs
                .create(dir.ino, format!("f{f}").as_bytes(), 0o644, true, c)
                .expect("create");
            fs.write(st.ino, 0, format!("file {d}/{f}\n").as_bytes())
                .expect("write");
            fs.release(fh).expect("release");
            if first == 0 {
                first = st.ino;
            }
        }
    }
    fs.fsync().expect("commit");
    let mut clean = Vec::new();
    let mut changed = Vec::new();
    for i in 0..41 {
        let t = Instant::now();
        fs.snapshot(&format!("clean{i}")).expect("snapshot");
        clean.push(t.elapsed().as_secs_f64() * 1e3);
        fs.write(first, 0, format!("change {i}\n").as_bytes())
            .expect("write");
        let t = Instant::now();
        fs.snapshot(&format!("changed{i}")).expect("snapshot");
        changed.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (median(clean), median(changed))
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    walk(p)
}

fn walk(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).expect("read_dir").flatten() {
        let md = e.metadata().expect("md");
        n += if md.is_dir() {
            walk(&e.path())
        } else {
            md.len()
        };
    }
    n
}

/// 1 GiB in 1,024 files of 1 MiB; before each of 10 snapshots, 1% of the bytes is rewritten
/// with new random data as `writes` writes of `unit` bytes at random aligned offsets.
fn store_growth(total: u64, unit: u64) -> (u64, u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("s");
    let store = Store::create(&dir, None).expect("create");
    let fs = Fs::new(store, "main").expect("fs");
    let c = Caller::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let file_size = 1u64 << 20;
    let nfiles = total / file_size;
    let mut inos = Vec::new();
    let mut buf = vec![0u8; file_size as usize];
    for i in 0..nfiles {
        let (st, fh) = fs
            .create(1, format!("f{i}").as_bytes(), 0o644, true, c)
            .expect("create");
        rng.fill(&mut buf);
        fs.write(st.ino, 0, &buf).expect("write");
        fs.release(fh).expect("release");
        inos.push(st.ino);
    }
    fs.snapshot("base").expect("snapshot");
    let base = dir_bytes(&dir);
    let per_round = total / 100;
    let mut chunk = vec![0u8; unit as usize];
    for r in 0..10 {
        let mut written = 0;
        while written < per_round {
            let ino = inos[(rng.next() % nfiles) as usize];
            let off = (rng.next() % (file_size / unit)) * unit;
            rng.fill(&mut chunk);
            fs.write(ino, off, &chunk).expect("write");
            written += unit;
        }
        fs.snapshot(&format!("round{r}")).expect("snapshot");
    }
    (base, dir_bytes(&dir))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 100_000]
    };
    println!("snapshot latency (median of 41):");
    for &n in sizes {
        let (clean, changed) = snapshot_latency(n);
        println!("  {n:>7} files: {clean:.3} ms with nothing pending, {changed:.3} ms after a one-file change");
    }
    let total: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let gib = total as f64 / (1u64 << 30) as f64;
    println!("store size after 10 snapshots of a {gib:.2} GiB tree, 1% rewritten before each:");
    for (unit, what) in [
        (1u64 << 20, "whole 1 MiB files"),
        (64 << 10, "64 KiB-aligned writes"),
        (4 << 10, "4 KiB random writes (worst case)"),
    ] {
        let (base, after) = store_growth(total, unit);
        println!(
            "  {what:<34} base {:.3} GiB, after 10 rounds {:.3} GiB ({:.2}x the tree)",
            base as f64 / (1u64 << 30) as f64,
            after as f64 / (1u64 << 30) as f64,
            after as f64 / total as f64
        );
    }
}
