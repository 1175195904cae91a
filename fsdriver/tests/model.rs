//! Reference-model tests of the filesystem logic (no FUSE): random sequences of operations,
//! including commits, snapshots, branches, checkouts and close-and-reopen of the store, run
//! against `Fs` and against a small in-memory model; the whole tree is compared after every
//! step. Shrunk failures are kept below as named regression tests.

use forkpoint_fs::fs::{Caller, Fs, FsError, RenameFlags, SetAttr};
use forkpoint_fs::fuse::errno;
use forkpoint_fs::tree::FileKind;
use forkpoint_fs::Store;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const DIRS: [&str; 4] = ["", "a", "a/b", "c"];
const NAMES: [&str; 3] = ["f", "g", "h"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        file: usize,
        off: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Mkdir {
        dir: usize,
    },
    Rmdir {
        dir: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Unlink {
        file: usize,
    },
    Symlink {
        file: usize,
        target: u8,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
    Setxattr {
        path: usize,
        name: u8,
        value: u8,
    },
    Commit,
    Snapshot,
    Branch {
        snap: usize,
    },
    Checkout {
        branch: usize,
    },
    Reopen,
}

fn file_path(i: usize) -> String {
    let d = DIRS[i / NAMES.len() % DIRS.len()];
    let n = NAMES[i % NAMES.len()];
    if d.is_empty() {
        n.to_string()
    } else {
        format!("{d}/{n}")
    }
}

/// Paths: indexes below 12 are files, the rest directories (except the root).
fn any_path(i: usize) -> String {
    let nf = DIRS.len() * NAMES.len();
    if i % 16 < nf {
        file_path(i % 16)
    } else {
        DIRS[1 + (i % 16 - nf) % (DIRS.len() - 1)].to_string()
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..12usize, prop_oneof![0..1000u64, 0..300_000u64], prop_oneof![1..100usize, 1..70_000usize], any::<u8>())
            .prop_map(|(file, off, len, byte)| Op::Write { file, off, len, byte }),
        2 => (0..12usize, prop_oneof![0..1000u64, 0..300_000u64]).prop_map(|(file, size)| Op::Truncate { file, size }),
        2 => (1..4usize).prop_map(|dir| Op::Mkdir { dir }),
        1 => (1..4usize).prop_map(|dir| Op::Rmdir { dir }),
        2 => (0..16usize, 0..16usize).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..12usize, 0..12usize).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (0..12usize).prop_map(|file| Op::Unlink { file }),
        1 => (0..12usize, any::<u8>()).prop_map(|(file, target)| Op::Symlink { file, target }),
        1 => (0..16usize, 0..0o7777u32).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (0..16usize, 0..3u8, any::<u8>()).prop_map(|(path, name, value)| Op::Setxattr { path, name, value }),
        1 => Just(Op::Commit),
        1 => Just(Op::Snapshot),
        1 => (0..4usize).prop_map(|snap| Op::Branch { snap }),
        1 => (0..4usize).prop_map(|branch| Op::Checkout { branch }),
        1 => Just(Op::Reopen),
    ]
}

// ----- the model ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum MKind {
    File(Vec<u8>),
    Dir(BTreeMap<String, u64>),
    Sym(Vec<u8>),
}

#[derive(Clone, Debug)]
struct MNode {
    kind: MKind,
    mode: u32,
    nlink: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug)]
struct Model {
    nodes: BTreeMap<u64, MNode>,
    next: u64,
}

type R<T> = Result<T, i32>;

impl Model {
    fn new() -> Model {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            MNode {
                kind: MKind::Dir(BTreeMap::new()),
                mode: 0o755,
                nlink: 2,
                xattrs: BTreeMap::new(),
            },
        );
        Model { nodes, next: 2 }
    }

    fn split(path: &str) -> (String, String) {
        match path.rfind('/') {
            Some(i) => (path[..i].to_string(), path[i + 1..].to_string()),
            None => (String::new(), path.to_string()),
        }
    }

    fn resolve(&self, path: &str) -> R<u64> {
        let mut ino = 1;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            match &self.nodes[&ino].kind {
                MKind::Dir(e) => ino = *e.get(c).ok_or(libc::ENOENT)?,
                _ => return Err(libc::ENOTDIR),
            }
        }
        Ok(ino)
    }

    fn parent(&self, path: &str) -> R<(u64, String)> {
        let (d, n) = Self::split(path);
        let p = self.resolve(&d)?;
        match self.nodes[&p].kind {
            MKind::Dir(_) => Ok((p, n)),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn entries(&mut self, dir: u64) -> &mut BTreeMap<String, u64> {
        match &mut self.nodes.get_mut(&dir).expect("dir").kind {
            MKind::Dir(e) => e,
            _ => panic!("not a dir"),
        }
    }

    fn lookup(&self, dir: u64, name: &str) -> Option<u64> {
        match &self.nodes[&dir].kind {
            MKind::Dir(e) => e.get(name).copied(),
            _ => None,
        }
    }

    fn add(&mut self, dir: u64, name: &str, kind: MKind, mode: u32) -> u64 {
        let ino = self.next;
        self.next += 1;
        let is_dir = matches!(kind, MKind::Dir(_));
        // Directories inherit the setgid bit (BSD group semantics), as on ext4.
        let mode = if is_dir && self.nodes[&dir].mode & 0o2000 != 0 {
            mode | 0o2000
        } else {
            mode
        };
        self.nodes.insert(
            ino,
            MNode {
                kind,
                mode,
                nlink: if is_dir { 2 } else { 1 },
                xattrs: BTreeMap::new(),
            },
        );
        self.entries(dir).insert(name.to_string(), ino);
        if is_dir {
            self.nodes.get_mut(&dir).expect("dir").nlink += 1;
        }
        ino
    }

    fn drop_link(&mut self, ino: u64) {
        let n = self.nodes.get_mut(&ino).expect("node");
        n.nlink -= 1;
        if n.nlink == 0 {
            self.nodes.remove(&ino);
        }
    }

    fn write(&mut self, path: &str, off: u64, len: usize, byte: u8) -> R<()> {
        let (p, n) = self.parent(path)?;
        let ino = match self.lookup(p, &n) {
            Some(i) => i,
            None => self.add(p, &n, MKind::File(Vec::new()), 0o644),
        };
        match &mut self.nodes.get_mut(&ino).expect("node").kind {
            MKind::File(d) => {
                let end = off as usize + len;
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[off as usize..end].fill(byte);
                Ok(())
            }
            MKind::Dir(_) => Err(libc::EISDIR),
            MKind::Sym(_) => Err(libc::EINVAL),
        }
    }

    fn truncate(&mut self, path: &str, size: u64) -> R<()> {
        let ino = self.resolve(path)?;
        match &mut self.nodes.get_mut(&ino).expect("node").kind {
            MKind::File(d) => {
                d.resize(size as usize, 0);
                Ok(())
            }
            MKind::Dir(_) => Err(libc::EISDIR),
            MKind::Sym(_) => Err(libc::EINVAL),
        }
    }

    fn mkdir(&mut self, path: &str) -> R<()> {
        let (p, n) = self.parent(path)?;
        if self.lookup(p, &n).is_some() {
            return Err(libc::EEXIST);
        }
        self.add(p, &n, MKind::Dir(BTreeMap::new()), 0o755);
        Ok(())
    }

    fn rmdir(&mut self, path: &str) -> R<()> {
        let (p, n) = self.parent(path)?;
        let ino = self.lookup(p, &n).ok_or(libc::ENOENT)?;
        match &self.nodes[&ino].kind {
            MKind::Dir(e) if !e.is_empty() => return Err(libc::ENOTEMPTY),
            MKind::Dir(_) => {}
            _ => return Err(libc::ENOTDIR),
        }
        self.entries(p).remove(&n);
        self.nodes.get_mut(&p).expect("dir").nlink -= 1;
        self.nodes.remove(&ino);
        Ok(())
    }

    fn unlink(&mut self, path: &str) -> R<()> {
        let (p, n) = self.parent(path)?;
        let ino = self.lookup(p, &n).ok_or(libc::ENOENT)?;
        if matches!(self.nodes[&ino].kind, MKind::Dir(_)) {
            return Err(libc::EISDIR);
        }
        self.entries(p).remove(&n);
        self.drop_link(ino);
        Ok(())
    }

    fn link(&mut self, from: &str, to: &str) -> R<()> {
        let src = self.resolve(from)?;
        let (p, n) = self.parent(to)?;
        if matches!(self.nodes[&src].kind, MKind::Dir(_)) {
            return Err(libc::EPERM);
        }
        if self.lookup(p, &n).is_some() {
            return Err(libc::EEXIST);
        }
        self.entries(p).insert(n, src);
        self.nodes.get_mut(&src).expect("node").nlink += 1;
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &[u8]) -> R<()> {
        let (p, n) = self.parent(path)?;
        if self.lookup(p, &n).is_some() {
            return Err(libc::EEXIST);
        }
        self.add(p, &n, MKind::Sym(target.to_vec()), 0o777);
        Ok(())
    }

    fn is_ancestor(&self, a: u64, path_of_b: &str) -> bool {
        // Is `a` the directory at path_of_b or one of its ancestors?
        let mut ino = 1;
        if ino == a {
            return true;
        }
        for c in path_of_b.split('/').filter(|c| !c.is_empty()) {
            match self.lookup(ino, c) {
                Some(i) => ino = i,
                None => return false,
            }
            if ino == a {
                return true;
            }
        }
        false
    }

    fn rename(&mut self, from: &str, to: &str) -> R<()> {
        let (sp, sn) = self.parent(from)?;
        let src = self.lookup(sp, &sn).ok_or(libc::ENOENT)?;
        let (dp, dn) = self.parent(to)?;
        let sdir = matches!(self.nodes[&src].kind, MKind::Dir(_));
        let (dd, _) = Self::split(to);
        if sdir && self.is_ancestor(src, &dd) {
            return Err(libc::EINVAL);
        }
        if let Some(dst) = self.lookup(dp, &dn) {
            if dst == src {
                return Ok(());
            }
            let ddir = matches!(self.nodes[&dst].kind, MKind::Dir(_));
            match (sdir, ddir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) => {
                    if let MKind::Dir(e) = &self.nodes[&dst].kind {
                        if !e.is_empty() {
                            return Err(libc::ENOTEMPTY);
                        }
                    }
                    self.entries(dp).remove(&dn);
                    self.nodes.get_mut(&dp).expect("dir").nlink -= 1;
                    self.nodes.remove(&dst);
                }
                (false, false) => {
                    self.entries(dp).remove(&dn);
                    self.drop_link(dst);
                }
            }
        }
        self.entries(sp).remove(&sn);
        self.entries(dp).insert(dn, src);
        if sdir && sp != dp {
            self.nodes.get_mut(&sp).expect("dir").nlink -= 1;
            self.nodes.get_mut(&dp).expect("dir").nlink += 1;
        }
        Ok(())
    }

    fn chmod(&mut self, path: &str, mode: u32) -> R<()> {
        let ino = self.resolve(path)?;
        self.nodes.get_mut(&ino).expect("node").mode = mode & 0o7777;
        Ok(())
    }

    fn setxattr(&mut self, path: &str, name: &[u8], value: &[u8]) -> R<()> {
        let ino = self.resolve(path)?;
        self.nodes
            .get_mut(&ino)
            .expect("node")
            .xattrs
            .insert(name.to_vec(), value.to_vec());
        Ok(())
    }
}

// ----- the system under test ---------------------------------------------------------------

struct Sut {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    fs: Option<Fs>,
}

fn code(e: FsError) -> i32 {
    i32::from(errno(&e))
}

impl Sut {
    fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("fs open")
    }

    fn resolve(&self, path: &str) -> R<u64> {
        let mut ino = 1;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            let st = self.fs().getattr(ino).map_err(code)?;
            if st.attr.kind != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            ino = self.fs().lookup(ino, c.as_bytes()).map_err(code)?.ino;
        }
        Ok(ino)
    }

    fn parent(&self, path: &str) -> R<(u64, String)> {
        let (d, n) = Model::split(path);
        let p = self.resolve(&d)?;
        if self.fs().getattr(p).map_err(code)?.attr.kind != FileKind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok((p, n))
    }

    fn write(&self, path: &str, off: u64, len: usize, byte: u8) -> R<()> {
        let (p, n) = self.parent(path)?;
        let fs = self.fs();
        let (st, fh) = fs
            .create(p, n.as_bytes(), 0o644, false, Caller::default())
            .map_err(code)?;
        let r = match st.attr.kind {
            FileKind::File => fs
                .write(st.ino, off, &vec![byte; len])
                .map(|_| ())
                .map_err(code),
            FileKind::Dir => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        };
        fs.release(fh).map_err(code)?;
        r
    }

    fn apply(&self, op: &Op) -> R<()> {
        let fs = self.fs();
        let c = Caller::default();
        match op {
            Op::Write {
                file,
                off,
                len,
                byte,
            } => self.write(&file_path(*file), *off, *len, *byte),
            Op::Truncate { file, size } => {
                let ino = self.resolve(&file_path(*file))?;
                match fs.getattr(ino).map_err(code)?.attr.kind {
                    FileKind::File => fs
                        .setattr(
                            ino,
                            &SetAttr {
                                size: Some(*size),
                                ..Default::default()
                            },
                        )
                        .map(|_| ())
                        .map_err(code),
                    FileKind::Dir => Err(libc::EISDIR),
                    _ => Err(libc::EINVAL),
                }
            }
            Op::Mkdir { dir } => {
                let (p, n) = self.parent(DIRS[*dir])?;
                fs.mkdir(p, n.as_bytes(), 0o755, c)
                    .map(|_| ())
                    .map_err(code)
            }
            Op::Rmdir { dir } => {
                let (p, n) = self.parent(DIRS[*dir])?;
                fs.rmdir(p, n.as_bytes()).map_err(code)
            }
            Op::Rename { from, to } => {
                let (sp, sn) = self.parent(&any_path(*from))?;
                fs.lookup(sp, sn.as_bytes()).map_err(code)?;
                let (dp, dn) = self.parent(&any_path(*to))?;
                fs.rename(sp, sn.as_bytes(), dp, dn.as_bytes(), RenameFlags::default())
                    .map_err(code)
            }
            Op::Link { from, to } => {
                let src = self.resolve(&file_path(*from))?;
                let (p, n) = self.parent(&file_path(*to))?;
                fs.link(src, p, n.as_bytes()).map(|_| ()).map_err(code)
            }
            Op::Unlink { file } => {
                let (p, n) = self.parent(&file_path(*file))?;
                fs.unlink(p, n.as_bytes()).map_err(code)
            }
            Op::Symlink { file, target } => {
                let (p, n) = self.parent(&file_path(*file))?;
                fs.symlink(p, n.as_bytes(), format!("t{target}").as_bytes(), c)
                    .map(|_| ())
                    .map_err(code)
            }
            Op::Chmod { path, mode } => {
                let ino = self.resolve(&any_path(*path))?;
                fs.setattr(
                    ino,
                    &SetAttr {
                        mode: Some(*mode),
                        ..Default::default()
                    },
                )
                .map(|_| ())
                .map_err(code)
            }
            Op::Setxattr { path, name, value } => {
                let ino = self.resolve(&any_path(*path))?;
                fs.setxattr(ino, format!("user.x{name}").as_bytes(), &[*value; 3], 0)
                    .map_err(code)
            }
            _ => unreachable!("store-level ops are applied by the harness"),
        }
    }
}

/// Compares the whole tree of `fs` with the model.
fn compare(fs: &Fs, m: &Model) -> Result<(), String> {
    let mut pairs: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stack = vec![(1u64, 1u64, String::from("/"))];
    while let Some((ri, mi, path)) = stack.pop() {
        if let Some(prev) = pairs.insert(mi, ri) {
            if prev != ri {
                return Err(format!("{path}: hard link structure differs"));
            }
            continue;
        }
        let st = fs
            .getattr(ri)
            .map_err(|e| format!("{path}: getattr: {e}"))?;
        let mn = &m.nodes[&mi];
        if st.attr.perm != mn.mode {
            return Err(format!(
                "{path}: mode {:o} != model {:o}",
                st.attr.perm, mn.mode
            ));
        }
        if st.attr.nlink != mn.nlink {
            return Err(format!(
                "{path}: nlink {} != model {}",
                st.attr.nlink, mn.nlink
            ));
        }
        let xs = fs
            .listxattr(ri)
            .map_err(|e| format!("{path}: listxattr: {e}"))?;
        let names: Vec<&[u8]> = xs.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
        if names.len() != mn.xattrs.len() {
            return Err(format!("{path}: xattr count differs"));
        }
        for (k, v) in &mn.xattrs {
            if fs
                .getxattr(ri, k)
                .map_err(|e| format!("{path}: getxattr: {e}"))?
                != *v
            {
                return Err(format!("{path}: xattr value differs"));
            }
        }
        match &mn.kind {
            MKind::File(d) => {
                if st.attr.kind != FileKind::File || st.attr.size != d.len() as u64 {
                    return Err(format!(
                        "{path}: size {} != model {}",
                        st.attr.size,
                        d.len()
                    ));
                }
                let got = fs
                    .read(ri, 0, d.len() as u32 + 10)
                    .map_err(|e| format!("{path}: read: {e}"))?;
                if got != *d {
                    let at = got.iter().zip(d.iter()).position(|(a, b)| a != b);
                    return Err(format!(
                        "{path}: contents differ (first at {at:?}, len {} vs {})",
                        got.len(),
                        d.len()
                    ));
                }
            }
            MKind::Sym(t) => {
                if fs
                    .readlink(ri)
                    .map_err(|e| format!("{path}: readlink: {e}"))?
                    != *t
                {
                    return Err(format!("{path}: symlink target differs"));
                }
            }
            MKind::Dir(e) => {
                let list = fs.list(ri).map_err(|e| format!("{path}: list: {e}"))?;
                let real: BTreeMap<String, u64> = list
                    .iter()
                    .filter(|d| d.name != b"." && d.name != b"..")
                    .map(|d| (String::from_utf8_lossy(&d.name).into_owned(), d.ino))
                    .collect();
                let rk: Vec<&String> = real.keys().collect();
                let mk: Vec<&String> = e.keys().collect();
                if rk != mk {
                    return Err(format!("{path}: entries {rk:?} != model {mk:?}"));
                }
                for (name, mino) in e {
                    stack.push((real[name], *mino, format!("{path}{name}/")));
                }
            }
        }
    }
    Ok(())
}

/// An overlay on `branch`; with `spill_every_write`, every write starts a background spill,
/// so that spills run beside every other kind of request.
fn open_fs(store: Arc<Store>, branch: &str, spill_every_write: bool) -> Result<Fs, String> {
    let fs = Fs::new(store, branch).map_err(|e| e.to_string())?;
    if spill_every_write {
        fs.set_spill_limit(0);
    }
    Ok(fs)
}

fn run(ops: &[Op], spill_every_write: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("store");
    let store = Store::create(&path, None).map_err(|e| e.to_string())?;
    let mut sut = Sut {
        fs: Some(open_fs(store, "main", spill_every_write)?),
        _dir: dir,
        path,
    };
    let mut model = Model::new();
    let mut committed: BTreeMap<String, Model> = BTreeMap::new();
    committed.insert("main".into(), model.clone());
    let mut snaps: Vec<(String, Model)> = Vec::new();
    let mut branch = "main".to_string();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Commit | Op::Snapshot => {
                let fs = sut.fs();
                if matches!(op, Op::Snapshot) {
                    let name = format!("s{}", snaps.len());
                    fs.snapshot(&name)
                        .map_err(|e| format!("step {i}: snapshot: {e}"))?;
                    snaps.push((name, model.clone()));
                } else {
                    fs.fsync().map_err(|e| format!("step {i}: commit: {e}"))?;
                }
                committed.insert(branch.clone(), model.clone());
            }
            Op::Branch { snap } => {
                if snaps.is_empty() {
                    continue;
                }
                let (sname, sm) = snaps[*snap % snaps.len()].clone();
                let bname = format!("b{}", committed.len());
                sut.fs()
                    .store()
                    .catalog(|c| {
                        let cp = c.find(&sname)?;
                        c.create_branch(&bname, cp.cno)
                    })
                    .map_err(|e| format!("step {i}: branch: {e}"))?;
                committed.insert(bname, sm);
            }
            Op::Checkout { branch: b } => {
                let names: Vec<String> = committed.keys().cloned().collect();
                let target = names[*b % names.len()].clone();
                sut.fs()
                    .fsync()
                    .map_err(|e| format!("step {i}: commit: {e}"))?;
                committed.insert(branch.clone(), model.clone());
                let store = sut.fs().store().clone();
                sut.fs = None;
                sut.fs = Some(
                    open_fs(store, &target, spill_every_write)
                        .map_err(|e| format!("step {i}: checkout: {e}"))?,
                );
                branch = target;
                model = committed[&branch].clone();
            }
            Op::Reopen => {
                // Drop everything uncommitted, as a crash would.
                sut.fs = None;
                let store = Store::open(&sut.path).map_err(|e| format!("step {i}: reopen: {e}"))?;
                sut.fs = Some(
                    open_fs(store, &branch, spill_every_write)
                        .map_err(|e| format!("step {i}: reopen: {e}"))?,
                );
                model = committed[&branch].clone();
            }
            op => {
                let mut m2 = model.clone();
                let want = match op {
                    Op::Write {
                        file,
                        off,
                        len,
                        byte,
                    } => m2.write(&file_path(*file), *off, *len, *byte),
                    Op::Truncate { file, size } => m2.truncate(&file_path(*file), *size),
                    Op::Mkdir { dir } => m2.mkdir(DIRS[*dir]),
                    Op::Rmdir { dir } => m2.rmdir(DIRS[*dir]),
                    Op::Rename { from, to } => m2.rename(&any_path(*from), &any_path(*to)),
                    Op::Link { from, to } => m2.link(&file_path(*from), &file_path(*to)),
                    Op::Unlink { file } => m2.unlink(&file_path(*file)),
                    Op::Symlink { file, target } => {
                        m2.symlink(&file_path(*file), format!("t{target}").as_bytes())
                    }
                    Op::Chmod { path, mode } => m2.chmod(&any_path(*path), *mode),
                    Op::Setxattr { path, name, value } => m2.setxattr(
                        &any_path(*path),
                        format!("user.x{name}").as_bytes(),
                        &[*value; 3],
                    ),
                    _ => unreachable!(),
                };
                let got = sut.apply(op);
                if got != want {
                    return Err(format!("step {i}: {op:?}: fs gave {got:?}, model {want:?}"));
                }
                if want.is_ok() {
                    model = m2;
                }
            }
        }
        compare(sut.fs(), &model).map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    // Every snapshot still reads back as it was.
    let store = sut.fs().store().clone();
    for (name, m) in &snaps {
        let cp = store.find(name).map_err(|e| e.to_string())?;
        let view = forkpoint_fs::tree::TreeView::open(store.clone(), cp.root)
            .map_err(|e| e.to_string())?;
        for (path, want) in model_files(m) {
            let (_, inode) = view
                .lookup(Path::new(&path))
                .map_err(|e| e.to_string())?
                .ok_or(format!("{name}: {path} missing"))?;
            if view.read_all(&inode).map_err(|e| e.to_string())? != want {
                return Err(format!("snapshot {name}: {path} differs"));
            }
        }
    }
    Ok(())
}

fn model_files(m: &Model) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![(1u64, String::new())];
    while let Some((ino, path)) = stack.pop() {
        match &m.nodes[&ino].kind {
            MKind::Dir(e) => {
                for (n, i) in e {
                    stack.push((*i, format!("{path}/{n}")));
                }
            }
            MKind::File(d) => out.push((path, d.clone())),
            MKind::Sym(_) => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FORKPOINT_MODEL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(96),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]
    #[test]
    fn fs_matches_model(ops in proptest::collection::vec(op(), 1..60), spill_every_write in any::<bool>()) {
        if let Err(e) = run(&ops, spill_every_write) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn unlinked_open_file_survives_in_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&dir.path().join("s"), None).expect("create");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let (st, fh) = fs
        .create(1, b"big", 0o644, true, Caller::default())
        .expect("create");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs.write(st.ino, 0, &data).expect("write");
    fs.unlink(1, b"big").expect("unlink");
    assert_eq!(
        fs.read(st.ino, 0, 3_000_000).expect("read after unlink"),
        data
    );
    fs.snapshot("with-orphan").expect("snapshot");
    let cp = store.find("with-orphan").expect("find");
    let view = forkpoint_fs::tree::TreeView::open(store.clone(), cp.root).expect("view");
    assert_eq!(view.root.orphans, vec![st.ino]);
    let inode = view.inode(st.ino).expect("inode").expect("orphan kept");
    assert_eq!(inode.attr.nlink, 0);
    assert_eq!(view.read_all(&inode).expect("read"), data);
    fs.release(fh).expect("release");
    fs.fsync().expect("commit");
    let head = store.head("main").expect("head");
    let view = forkpoint_fs::tree::TreeView::open(store, head.root).expect("view");
    assert!(
        view.inode(st.ino).expect("lookup").is_none(),
        "freed at last close"
    );
}

#[test]
fn regression_write_extend_then_read_gap() {
    for spill_every_write in [false, true] {
        regression_write_extend_then_read_gap_with(spill_every_write);
    }
}

fn regression_write_extend_then_read_gap_with(spill_every_write: bool) {
    run(
        &[
            Op::Write {
                file: 0,
                off: 200_000,
                len: 10,
                byte: 7,
            },
            Op::Truncate { file: 0, size: 100 },
            Op::Write {
                file: 0,
                off: 150_000,
                len: 5,
                byte: 9,
            },
            Op::Commit,
            Op::Reopen,
        ],
        spill_every_write,
    )
    .expect("model agrees");
}

fn _assert_send(_: Arc<Store>) {}

/// `read_into` is handed the FUSE reply buffer as it is, stale bytes and all: every byte
/// it reports must be written, from the store, the caches, zero blocks and holes alike.
#[test]
fn read_into_writes_every_byte_of_a_dirty_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&dir.path().join("s"), None).expect("create");
    let block = 64 << 10;
    let mut want = vec![0u8; 5 * block + 100];
    let ino = {
        let fs = Fs::new(store.clone(), "main").expect("fs");
        let (st, fh) = fs
            .create(1, b"f", 0o644, true, Caller::default())
            .expect("create");
        let data: Vec<u8> = (0..want.len() as u32)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        fs.write(st.ino, 0, &data).expect("write");
        want.copy_from_slice(&data);
        // A hole in the middle block, a block stored shorter than the file (its tail
        // was cut and the file extended again), and a tail past the last write.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fs.fallocate(st.ino, 2 * block as u64, block as u64, punch)
            .expect("punch");
        want[2 * block..3 * block].fill(0);
        let cut = SetAttr {
            size: Some(3 * block as u64 + 10),
            ..SetAttr::default()
        };
        fs.setattr(st.ino, &cut).expect("truncate");
        let extend = SetAttr {
            size: Some(want.len() as u64 + 3000),
            ..SetAttr::default()
        };
        fs.setattr(st.ino, &extend).expect("extend");
        want[3 * block + 10..].fill(0);
        want.resize(want.len() + 3000, 0);
        fs.release(fh).expect("release");
        fs.fsync().expect("commit");
        st.ino
    };
    // A fresh overlay on the committed branch: every block comes from the store.
    let fs = Fs::new(store, "main").expect("reopen");
    for (off, len) in [
        (0, want.len() + 500),
        (block - 7, 3 * block),
        (3 * block + 5, 2 * block),
        (want.len() - 10, 100),
    ] {
        let mut buf = vec![0xAAu8; len];
        let n = fs.read_into(ino, off as u64, &mut buf).expect("read_into");
        let end = (off + len).min(want.len());
        assert_eq!(n, end - off, "length at {off}+{len}");
        assert!(
            buf[..n] == want[off..end],
            "bytes at {off}+{len} differ from what was written"
        );
    }
}

/// The same for a file of the lower directory, read in place (and one that shrank there
/// since: what is gone reads as zeros, never as stale bytes of the buffer).
#[test]
fn read_into_writes_every_byte_of_a_lower_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lower = dir.path().join("lower");
    std::fs::create_dir(&lower).expect("mkdir lower");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8 + 1).collect();
    std::fs::write(lower.join("f"), &data).expect("write lower file");
    std::fs::write(lower.join("g"), &data).expect("write lower file");
    let store = Store::create(&dir.path().join("s"), Some(&lower)).expect("create");
    let fs = Fs::new(store, "main").expect("fs");
    let ino = fs.lookup(1, b"f").expect("lookup").ino;
    let mut buf = vec![0xAAu8; 300_000];
    let n = fs.read_into(ino, 1000, &mut buf).expect("read_into");
    assert_eq!(n, data.len() - 1000);
    assert!(buf[..n] == data[1000..], "lower bytes differ");
    // Another lower file, extended on the mount: past the lower end, zeros.
    let g = fs.lookup(1, b"g").expect("lookup g").ino;
    let grow = SetAttr {
        size: Some(260_000),
        ..SetAttr::default()
    };
    fs.setattr(g, &grow).expect("extend");
    buf.fill(0xAA);
    let n = fs
        .read_into(g, 190_000, &mut buf)
        .expect("read_into past the lower end");
    assert_eq!(n, 70_000);
    assert!(buf[..10_000] == data[190_000..], "lower bytes differ");
    assert!(
        buf[10_000..n].iter().all(|b| *b == 0),
        "past the lower end: zeros"
    );
    // The lower file shrinks under the mount: the overlay still has its old size.
    std::fs::write(lower.join("f"), &data[..50_000]).expect("shrink lower file");
    buf.fill(0xAA);
    let n = fs
        .read_into(ino, 0, &mut buf)
        .expect("read_into after shrink");
    assert_eq!(n, data.len());
    assert!(buf[..50_000] == data[..50_000], "lower bytes differ");
    assert!(
        buf[50_000..n].iter().all(|b| *b == 0),
        "past the lower end: zeros"
    );
}

/// Small files keep blocks only as long as their bytes, and a spill stores the blocks of
/// every file written since the last one in one batch: over 64 MiB of small files (so
/// spills happen mid-way), some written with gaps or extended by truncate, read back the
/// same before and after the commit, and from a fresh overlay on the committed branch.
#[test]
fn many_small_files_spill_in_batches_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&dir.path().join("s"), None).expect("create");
    let fs = Fs::new(store.clone(), "main").expect("fs");
    let mut want: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..2000u32 {
        let name = format!("f{i}");
        let (st, fh) = fs
            .create(1, name.as_bytes(), 0o644, true, Caller::default())
            .expect("create");
        let len = 20_000 + (i as usize * 37) % 40_000;
        let mut data: Vec<u8> = (0..len as u32).map(|j| ((i + j) % 251) as u8 + 1).collect();
        match i % 4 {
            // Written in two pieces with a gap of zeros between them.
            0 => {
                fs.write(st.ino, 0, &data[..100]).expect("write head");
                fs.write(st.ino, 5000, &data[5000..]).expect("write tail");
                data[100..5000].fill(0);
            }
            // Extended past its bytes by truncate, then written again inside the gap.
            1 => {
                fs.write(st.ino, 0, &data).expect("write");
                let grow = SetAttr {
                    size: Some(len as u64 + 9000),
                    ..SetAttr::default()
                };
                fs.setattr(st.ino, &grow).expect("extend");
                data.resize(len + 9000, 0);
                fs.write(st.ino, len as u64 + 4000, b"mid")
                    .expect("write mid");
                data[len + 4000..len + 4003].copy_from_slice(b"mid");
            }
            // Cut inside its block, then extended: the cut bytes read as zeros.
            2 => {
                fs.write(st.ino, 0, &data).expect("write");
                let cut = SetAttr {
                    size: Some(300),
                    ..SetAttr::default()
                };
                fs.setattr(st.ino, &cut).expect("cut");
                let grow = SetAttr {
                    size: Some(len as u64),
                    ..SetAttr::default()
                };
                fs.setattr(st.ino, &grow).expect("extend");
                data[300..].fill(0);
            }
            _ => {
                fs.write(st.ino, 0, &data).expect("write");
            }
        }
        fs.release(fh).expect("release");
        want.push((st.ino, data));
    }
    let check = |fs: &Fs, when: &str| {
        for (ino, data) in &want {
            let got = fs.read(*ino, 0, data.len() as u32 + 100).expect("read");
            assert!(got == *data, "file {ino} differs {when}");
        }
    };
    check(&fs, "before the commit");
    fs.fsync().expect("commit");
    check(&fs, "after the commit");
    drop(fs);
    let fs = Fs::new(store, "main").expect("reopen");
    check(&fs, "in a fresh overlay");
}

/// Spills running beside writers, readers and commits on other threads: four writers
/// (each with a file of its own, writing, cutting and extending it, and reading back
/// what it wrote) and a thread committing all the while, with a spill started by every
/// write that crosses a tiny limit. Every read agrees with the writer's copy, and so does
/// every file in a fresh overlay on the last commit.
#[test]
fn spills_beside_concurrent_writers_and_commits_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&dir.path().join("s"), None).expect("create");
    let fs = Arc::new(Fs::new(store.clone(), "main").expect("fs"));
    fs.set_spill_limit(100_000);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs.fsync().expect("commit");
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let (st, fh) = fs
                    .create(
                        1,
                        format!("w{w}").as_bytes(),
                        0o644,
                        true,
                        Caller::default(),
                    )
                    .expect("create");
                let mut want: Vec<u8> = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                let mut next = |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                for step in 0..400u32 {
                    let r = next(10);
                    if r < 7 {
                        let off = next(400_000) as usize;
                        let len = 1 + next(150_000) as usize;
                        let byte = (step % 250) as u8 + 1;
                        fs.write(st.ino, off as u64, &vec![byte; len])
                            .expect("write");
                        if want.len() < off + len {
                            want.resize(off + len, 0);
                        }
                        want[off..off + len].fill(byte);
                    } else {
                        let size = next(450_000) as usize;
                        let set = SetAttr {
                            size: Some(size as u64),
                            ..SetAttr::default()
                        };
                        fs.setattr(st.ino, &set).expect("truncate");
                        want.resize(size, 0);
                    }
                    let off = next(want.len() as u64 + 1) as usize;
                    let got = fs.read(st.ino, off as u64, 200_000).expect("read");
                    let end = (off + 200_000).min(want.len());
                    assert!(
                        got == want[off..end],
                        "writer {w}, step {step}: read at {off} differs"
                    );
                }
                fs.release(fh).expect("release");
                (st.ino, want)
            })
        })
        .collect();
    let files: Vec<(u64, Vec<u8>)> = writers
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    committer.join().expect("committer");
    fs.fsync().expect("last commit");
    drop(fs);
    let fs = Fs::new(store, "main").expect("reopen");
    for (ino, want) in &files {
        let got = fs.read(*ino, 0, want.len() as u32 + 10).expect("read");
        assert!(got == *want, "file {ino} differs in a fresh overlay");
    }
}
