//! Bad input to the store commands: each gets a clear one-line error and a non-zero exit,
//! never a panic.

use std::path::Path;
use std::process::Command;

fn forkpoint(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_forkpoint"))
        .args(args)
        .output()
        .expect("run forkpoint");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(args: &[&str], needle: &str) {
    let (ok, _, err) = forkpoint(args);
    assert!(!ok, "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err:?}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err:?}");
}

fn new_store(dir: &Path) -> String {
    let s = dir.join("store");
    let (ok, _, err) = forkpoint(&["init", s.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    s.to_str().expect("utf8").to_string()
}

fn segment_of(store: &str) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(Path::new(store).join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[test]
fn not_a_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fails_with(
        &["verify", tmp.path().to_str().expect("utf8")],
        "is not a forkpoint store",
    );
    fails_with(
        &["log", "--store", "/nonexistent/x"],
        "is not a forkpoint store",
    );
}

#[test]
fn init_twice_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = new_store(tmp.path());
    fails_with(&["init", &s], "already holds a forkpoint store");
}

#[test]
fn newer_format_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = new_store(tmp.path());
    let cat = forkpoint_fs::catalog::Catalog::open(&Path::new(&s).join("forkpoint.db"), false)
        .expect("open");
    cat.set_meta("schema_version", "99").expect("set");
    drop(cat);
    fails_with(&["verify", &s], "newer than this forkpoint supports");
}

#[test]
fn truncated_segment_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = new_store(tmp.path());
    let seg = segment_of(&s);
    let len = std::fs::metadata(&seg).expect("md").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    fails_with(&["verify", &s], "missing or truncated");
}

#[test]
fn missing_or_corrupt_database() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = new_store(tmp.path());
    let db = Path::new(&s).join("forkpoint.db");
    std::fs::write(&db, vec![0x5a; 8192]).expect("corrupt");
    fails_with(&["verify", &s], "is corrupt");
    std::fs::remove_file(&db).expect("remove");
    fails_with(&["verify", &s], "is not a forkpoint store");
}

#[test]
fn unknown_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = new_store(tmp.path());
    fails_with(
        &["branch", "--store", &s, "exp", "--from", "nope"],
        "unknown checkpoint or snapshot 'nope'",
    );
    let (ok, out, err) = forkpoint(&["branch", "--store", &s, "exp"]);
    assert!(ok && out.contains("created branch exp"), "{err}");
    fails_with(
        &["branch", "--store", &s, "exp"],
        "branch 'exp' already exists",
    );
    fails_with(&["branch", "--store", &s, "#bad"], "invalid name");
}

#[test]
fn corrupt_record_fails_verify_with_its_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(lower.join("d")).expect("mkdir");
    std::fs::write(lower.join("d/f.txt"), "x").expect("write");
    let s = tmp.path().join("store");
    let (ok, _, err) = forkpoint(&[
        "init",
        s.to_str().expect("utf8"),
        "--lower",
        lower.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = forkpoint(&["verify", s.to_str().expect("utf8")]);
    assert!(ok, "clean store verifies: {out}");
    // Flip a byte inside the last record's payload (the root object is written last).
    let seg = segment_of(s.to_str().expect("utf8"));
    let mut bytes = std::fs::read(&seg).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&seg, &bytes).expect("write");
    let (ok, out, err) = forkpoint(&["verify", s.to_str().expect("utf8")]);
    assert!(!ok, "verify must fail");
    assert!(out.contains("CORRUPT root"), "{out}");
    assert!(err.contains("1 corrupt object"), "{err}");
}

#[test]
fn diff_between_snapshots() {
    use forkpoint_fs::fs::{Caller, Fs, RenameFlags};
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("store");
    {
        let store = forkpoint_fs::Store::create(&s, None).expect("create");
        let fs = Fs::new(store, "main").expect("fs");
        let c = Caller::default();
        let (a, fh) = fs.create(1, b"a", 0o644, true, c).expect("a");
        fs.release(fh).expect("release");
        let (b, fh) = fs.create(1, b"b", 0o644, true, c).expect("b");
        fs.release(fh).expect("release");
        let (m, fh) = fs.create(1, b"moved", 0o644, true, c).expect("moved");
        fs.release(fh).expect("release");
        let (l, fh) = fs.create(1, b"linked", 0o644, true, c).expect("linked");
        fs.release(fh).expect("release");
        let (_, fh) = fs.create(1, b"conf", 0o644, true, c).expect("conf");
        fs.release(fh).expect("release");
        fs.snapshot("one").expect("snapshot");
        fs.write(a.ino, 0, b"changed").expect("write");
        fs.unlink(1, b"b").expect("unlink");
        let _ = (b, m);
        let (_, fh) = fs.create(1, b"c", 0o644, true, c).expect("c");
        fs.release(fh).expect("release");
        fs.rename(1, b"moved", 1, b"there", RenameFlags::default())
            .expect("rename");
        fs.link(l.ino, 1, b"link2").expect("link");
        // Written aside and renamed over the old one, as editors and git do.
        let (_, fh) = fs.create(1, b"conf.tmp", 0o644, true, c).expect("tmp");
        fs.release(fh).expect("release");
        fs.rename(1, b"conf.tmp", 1, b"conf", RenameFlags::default())
            .expect("rename over");
        fs.snapshot("two").expect("snapshot");
    }
    let (ok, out, err) = forkpoint(&["diff", "--store", s.to_str().expect("utf8"), "one", "two"]);
    assert!(ok, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    // A rename is one line naming both; a new hard link keeps the old name: a change; a
    // file renamed over another is a change of that name, not a removal and an addition.
    assert_eq!(
        lines,
        vec![
            "A /c",
            "D /b",
            "M /",
            "M /a",
            "M /conf",
            "M /link2, /linked",
            "R /moved -> /there"
        ],
        "{out}"
    );
    let (ok, out, err) = forkpoint(&[
        "diff",
        "--store",
        s.to_str().expect("utf8"),
        "--json",
        "one",
        "two",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let conf: Vec<&serde_json::Value> = v
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["paths"][0] == "/conf")
        .collect();
    assert_eq!(conf.len(), 1, "{out}");
    assert_eq!(conf[0]["kind"], "Replaced", "{out}");
}

/// A command that prints ends quietly when its reader has gone (`forkpoint log | head`):
/// by SIGPIPE, as other Unix tools do, not with a panic about a failed print.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = new_store(tmp.path());
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_forkpoint"))
        .args(["log", "--store", &store])
        .stdout(std::process::Stdio::from(write))
        .output()
        .expect("run forkpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "log panicked: {err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "log into a closed pipe: {:?} {err}",
        out.status
    );
}

/// A branch whose head is not in the catalog fails verify, naming the branch.
#[test]
fn a_branch_with_a_missing_head_fails_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("store");
    let (ok, _, err) = forkpoint(&["init", s.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    {
        let mut c = forkpoint_fs::catalog::Catalog::open(&s.join("forkpoint.db"), false)
            .expect("open catalog");
        c.set_head("main", 999).expect("set head");
    }
    let (ok, out, err) = forkpoint(&["verify", s.to_str().expect("utf8")]);
    assert!(!ok, "verify must fail: {out}");
    assert!(
        out.contains("CORRUPT branch 'main': its head #999 is not in the catalog"),
        "{out}"
    );
    assert!(err.contains("1 branch(es) with a missing head"), "{err}");
}
