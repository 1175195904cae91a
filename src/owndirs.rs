//! The directories a session owns: its private `/dev/shm` (POSIX shared memory, named
//! semaphores) and its temporary directory (`TMPDIR`, where compilers and `tempfile` put
//! their scratch files), recorded at a checkpoint and made again before a restore's
//! processes.
//!
//! Every session mounts a tmpfs of its own on each (in its mount namespace), so that what a
//! program puts there is part of the session: two branches restored side by side do not
//! share a semaphore or a temporary file by name, and the host sees nothing. The temporary
//! directory is `/tmp/.forkpoint-session-tmp` (an empty directory on the host), given to the
//! program as `TMPDIR` unless it has one of its own other than `/tmp`. At a checkpoint
//! (the program frozen) the tree is walked and every file's data read, skipping holes;
//! contents go to the store as page chunks like memory. A restore makes the entries again,
//! with their modes, owners and times, before the processes reopen and map them by path.
//! Files unlinked while open or mapped are not in the tree: the engine keeps those like
//! memfds ([`forkpoint::engine::DumpOptions::own_dirs`]).

use forkpoint::engine::image::ImageMemory;
use forkpoint::engine::ChunkSource;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the session's own tmpfs for shared memory is mounted.
pub const DEV_SHM: &str = "/dev/shm";
/// The session's own temporary directory.
pub const SESSION_TMP: &str = "/tmp/.forkpoint-session-tmp";

/// The directories this session owns: those [`mount_all`] put a tmpfs of the session's own
/// on (a directory it could not is the host's, and is left alone).
static MOUNTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Every directory this session owns.
pub fn dirs() -> Vec<PathBuf> {
    MOUNTED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Mounts a fresh tmpfs on each directory a session owns, in the caller's (the session's)
/// mount namespace; the temporary directory is made on the host first if it is missing.
/// A directory that cannot be had (missing, a symbolic link, not root's) is skipped: its
/// files stay outside the session, as any other file outside the mount.
pub fn mount_all() {
    use nix::mount::{mount, MsFlags};
    if let Err(e) = std::fs::create_dir_all(SESSION_TMP) {
        log::warn!("{SESSION_TMP}: {e}; the session has no temporary directory of its own");
    }
    let mut mounted = Vec::new();
    for d in [DEV_SHM, SESSION_TMP].map(PathBuf::from) {
        // Not through a link someone planted in /tmp, and not a directory another user owns.
        let real_dir = std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir() && m.uid() == 0);
        if !real_dir {
            log::warn!(
                "{}: not a directory of root's; not the session's own",
                d.display()
            );
            continue;
        }
        let r = mount(
            Some("tmpfs"),
            &d,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
        match r {
            Ok(()) => mounted.push(d),
            Err(e) => log::warn!("mount a tmpfs on {}: {e}", d.display()),
        }
    }
    *MOUNTED.lock().unwrap_or_else(|p| p.into_inner()) = mounted;
}

/// Records every directory a session owns (call it while the program is frozen).
pub fn dump_all() -> Result<Vec<(PathBuf, ShmDir)>, String> {
    dirs()
        .into_iter()
        .map(|d| Ok((d.clone(), dump(&d)?)))
        .collect()
}

/// Makes the recorded directories again, each in its fresh tmpfs.
pub fn restore_all(img: &[(PathBuf, ShmDir)], chunks: &dyn ChunkSource) -> Result<(), String> {
    let own = dirs();
    for (d, tree) in img {
        if !own.contains(d) {
            return Err(format!("{} is not a directory a session owns", d.display()));
        }
        restore(tree, d, chunks)?;
    }
    Ok(())
}

/// Every entry under the session's `/dev/shm`, parents before their children.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmDir {
    pub entries: Vec<ShmEntry>,
}

/// One entry, by its path relative to `/dev/shm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmEntry {
    pub path: PathBuf,
    /// Permission bits (with setuid, setgid and sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds).
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub kind: ShmKind,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShmKind {
    Dir,
    /// A regular file: its size and its data as page runs at file offsets (holes are not
    /// recorded).
    File {
        size: u64,
        contents: ImageMemory,
    },
    /// Another name of a file recorded earlier (a hard link), by that file's path.
    Link {
        to: PathBuf,
    },
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
}

impl ShmDir {
    /// The contents of every file, in entry order (for moving them to the store).
    pub fn memories_mut(&mut self) -> impl Iterator<Item = &mut ImageMemory> {
        self.entries.iter_mut().filter_map(|e| match &mut e.kind {
            ShmKind::File { contents, .. } => Some(contents),
            _ => None,
        })
    }
}

/// Records the tree under `root` (call it while the program is frozen).
pub fn dump(root: &Path) -> Result<ShmDir, String> {
    let mut out = ShmDir::default();
    let mut seen: std::collections::HashMap<u64, PathBuf> = Default::default();
    walk(root, Path::new(""), &mut out, &mut seen)?;
    Ok(out)
}

fn walk(
    root: &Path,
    rel: &Path,
    out: &mut ShmDir,
    seen: &mut std::collections::HashMap<u64, PathBuf>,
) -> Result<(), String> {
    let dir = root.join(rel);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.as_os_str().is_empty() => {
            return Ok(());
        }
        Err(e) => return Err(format!("read {}: {e}", dir.display())),
    };
    let mut names: Vec<_> = rd
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("read {}: {e}", dir.display()))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let st = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("stat {}: {e}", path.display()))?;
        let ft = st.file_type();
        let entry = |kind| ShmEntry {
            path: rel.clone(),
            mode: st.mode() & 0o7777,
            uid: st.uid(),
            gid: st.gid(),
            atime: (st.atime(), st.atime_nsec()),
            mtime: (st.mtime(), st.mtime_nsec()),
            kind,
        };
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            out.entries.push(entry(ShmKind::Dir));
            walk(root, &rel, out, seen)?;
        } else if ft.is_file() {
            if st.nlink() > 1 {
                if let Some(first) = seen.get(&st.ino()) {
                    out.entries.push(entry(ShmKind::Link { to: first.clone() }));
                    continue;
                }
                seen.insert(st.ino(), rel.clone());
            }
            // Reading must not change what the program sees (its atime).
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOATIME)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            let size = st.len();
            let contents = forkpoint::engine::dump::read_sparse(&f, size, &[(0, size)])
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            out.entries.push(entry(ShmKind::File { size, contents }));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(|e| format!("read link {}: {e}", path.display()))?;
            out.entries.push(entry(ShmKind::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
            }));
        } else if ft.is_fifo() {
            out.entries.push(entry(ShmKind::Fifo));
        } else if ft.is_socket() {
            // Made again by the restored listener's bind, if one holds it; else stale.
            continue;
        } else {
            return Err(format!(
                "{} is a device, which cannot be checkpointed (supported here: files, \
                 directories, symbolic links, FIFOs and the sockets of listeners)",
                path.display()
            ));
        }
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains NUL", p.display()))
}

fn os_err(what: String) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Owner, mode and times of `path` as recorded (not following a symbolic link).
fn set_attrs(path: &Path, e: &ShmEntry) -> Result<(), String> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; the call reads nothing else.
    if unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } < 0 {
        return Err(os_err(format!("chown {}", path.display())));
    }
    let symlink = matches!(e.kind, ShmKind::Symlink { .. });
    // chown cleared setuid and setgid: the mode comes after it. A symbolic link has none.
    // SAFETY: as above.
    if !symlink && unsafe { libc::chmod(c.as_ptr(), e.mode as libc::mode_t) } < 0 {
        return Err(os_err(format!("chmod {}", path.display())));
    }
    let ts = |(s, ns): (i64, i64)| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: ns as _,
    };
    let times = [ts(e.atime), ts(e.mtime)];
    // SAFETY: `c` is a valid path and `times` holds the two timespecs utimensat reads.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(os_err(format!("set the times of {}", path.display())));
    }
    Ok(())
}

/// Makes every entry of `img` under `root` (the session's fresh, empty tmpfs), with its
/// data from `chunks`, its owner, mode and times.
pub fn restore(img: &ShmDir, root: &Path, chunks: &dyn ChunkSource) -> Result<(), String> {
    for e in &img.entries {
        if e.path.is_absolute()
            || e.path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!("bad /dev/shm entry {:?} in the image", e.path));
        }
        let path = root.join(&e.path);
        // Every directory on the way is one made here, not a link out of the tmpfs.
        let mut up = e.path.parent();
        while let Some(a) = up.filter(|a| !a.as_os_str().is_empty()) {
            if !std::fs::symlink_metadata(root.join(a)).is_ok_and(|m| m.is_dir()) {
                return Err(format!(
                    "bad /dev/shm entry {:?} in the image: {} is not a directory",
                    e.path,
                    a.display()
                ));
            }
            up = a.parent();
        }
        match &e.kind {
            ShmKind::Dir => std::fs::create_dir(&path)
                .map_err(|err| format!("mkdir {}: {err}", path.display()))?,
            ShmKind::File { size, contents } => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|err| format!("create {}: {err}", path.display()))?;
                forkpoint::engine::restore::for_each_data_run(contents, Some(chunks), |at, b| {
                    let end = (at + b.len() as u64).min(*size);
                    if at >= end {
                        return Ok(());
                    }
                    f.write_all_at(&b[..(end - at) as usize], at)
                        .map_err(|err| format!("write {}: {err}", path.display()))
                })?;
                f.set_len(*size)
                    .map_err(|err| format!("set the size of {}: {err}", path.display()))?;
            }
            ShmKind::Link { to } => {
                let to = root.join(to);
                std::fs::hard_link(&to, &path)
                    .map_err(|err| format!("link {} to {}: {err}", path.display(), to.display()))?;
                continue;
            }
            ShmKind::Symlink { target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path)
                    .map_err(|err| format!("symlink {}: {err}", path.display()))?
            }
            ShmKind::Fifo => {
                let c = cpath(&path)?;
                // SAFETY: `c` is a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } < 0 {
                    return Err(os_err(format!("mkfifo {}", path.display())));
                }
            }
        }
        if !matches!(e.kind, ShmKind::Dir) {
            set_attrs(&path, e)?;
        }
    }
    // Directories last, deepest first: making their entries changed their times.
    for e in img.entries.iter().rev() {
        if matches!(e.kind, ShmKind::Dir) {
            set_attrs(&root.join(&e.path), e)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoChunks;
    impl ChunkSource for NoChunks {
        fn fetch(&self, _: &[u8; 32], _: u64) -> Result<Vec<u8>, String> {
            Err("no chunks here".into())
        }
    }

    #[test]
    fn a_tree_is_made_again_as_recorded() {
        let src = tempfile::tempdir().expect("tempdir");
        let r = src.path();
        std::fs::write(r.join("psm_a"), vec![7u8; 10_000]).expect("write");
        let f = std::fs::File::create(r.join("sparse")).expect("create");
        f.set_len(1 << 20).expect("set_len");
        f.write_all_at(b"end", (1 << 20) - 3).expect("write");
        std::fs::create_dir(r.join("d")).expect("mkdir");
        std::fs::write(r.join("d/sem.x"), b"semaphore").expect("write");
        std::fs::hard_link(r.join("d/sem.x"), r.join("d/again")).expect("link");
        std::os::unix::fs::symlink("psm_a", r.join("ln")).expect("symlink");
        let c = cpath(&r.join("fifo")).expect("path");
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
        std::fs::set_permissions(
            r.join("psm_a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .expect("chmod");
        let img = dump(r).expect("dump");
        assert_eq!(img.entries.len(), 7, "{img:#?}");
        // Only the data of the sparse file is read: one page, not 1 MiB.
        let sparse = img
            .entries
            .iter()
            .find(|e| e.path == Path::new("sparse"))
            .expect("sparse recorded");
        let ShmKind::File { contents, .. } = &sparse.kind else {
            panic!("sparse is a file")
        };
        assert!(
            contents.inline_bytes() <= 4096,
            "{}",
            contents.inline_bytes()
        );

        let dst = tempfile::tempdir().expect("tempdir");
        restore(&img, dst.path(), &NoChunks).expect("restore");
        let again = dump(dst.path()).expect("dump again");
        for (a, b) in img.entries.iter().zip(&again.entries) {
            assert!(a == b, "{} differs after a restore", a.path.display());
        }
        assert_eq!(again.entries.len(), img.entries.len());
        let d = dst.path();
        assert_eq!(
            std::fs::metadata(d.join("d/sem.x")).expect("stat").ino(),
            std::fs::metadata(d.join("d/again")).expect("stat").ino()
        );
        let data = std::fs::read(d.join("sparse")).expect("read");
        assert_eq!(data.len(), 1 << 20);
        assert_eq!(&data[data.len() - 3..], b"end");
    }

    #[test]
    fn a_socket_file_is_left_to_its_listener() {
        let src = tempfile::tempdir().expect("tempdir");
        let _l = std::os::unix::net::UnixListener::bind(src.path().join("sock")).expect("bind");
        assert!(dump(src.path()).expect("dump").entries.is_empty());
    }

    #[test]
    fn an_entry_under_a_symbolic_link_is_refused() {
        let outside = tempfile::tempdir().expect("tempdir");
        let entry = |path: &str, kind| ShmEntry {
            path: PathBuf::from(path),
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: (0, 0),
            mtime: (0, 0),
            kind,
        };
        let img = ShmDir {
            entries: vec![
                entry(
                    "a",
                    ShmKind::Symlink {
                        target: outside.path().as_os_str().as_bytes().to_vec(),
                    },
                ),
                entry("a/x", ShmKind::Fifo),
            ],
        };
        let dst = tempfile::tempdir().expect("tempdir");
        let e = restore(&img, dst.path(), &NoChunks).expect_err("refused");
        assert!(e.contains("is not a directory"), "{e}");
        assert!(
            !outside.path().join("x").exists(),
            "nothing written through the link"
        );
    }

    #[test]
    fn entries_outside_the_root_are_refused() {
        let mut img = ShmDir::default();
        img.entries.push(ShmEntry {
            path: PathBuf::from("../escape"),
            mode: 0o600,
            uid: 0,
            gid: 0,
            atime: (0, 0),
            mtime: (0, 0),
            kind: ShmKind::Fifo,
        });
        let dst = tempfile::tempdir().expect("tempdir");
        let e = restore(&img, dst.path(), &NoChunks).expect_err("refused");
        assert!(e.contains("bad /dev/shm entry"), "{e}");
    }
}
