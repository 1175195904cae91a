//! Finding forkpoint mounts from /proc/self/mountinfo.

use anyhow::{bail, Context, Result};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Is this a forkpoint mount? The kernel shows type `fuse` (or `fuse.forkpoint` when mounted
/// through fusermount) and the store directory as the source.
pub fn is_forkpoint(m: &MountInfo) -> bool {
    (m.fstype == "fuse" || m.fstype == "fuse.forkpoint")
        && forkpoint_fs::store::is_store(Path::new(&m.source))
}

/// A mount seen in mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mounts of this mount namespace.
pub fn mounts() -> Result<Vec<MountInfo>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 3 || f.len() < 5 {
            continue;
        }
        out.push(MountInfo {
            dev: f[2].to_string(),
            mountpoint: PathBuf::from(unescape(f[4])),
            fstype: f[sep + 1].to_string(),
            source: unescape(f[sep + 2]),
        });
    }
    Ok(out)
}

/// The forkpoint mount at exactly `path`, if any.
pub fn forkpoint_mount_at(path: &Path) -> Result<Option<MountInfo>> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path && is_forkpoint(m)))
}

/// A FUSE mount at exactly `path` whose store directory is gone (removed while mounted)
/// while a `forkpoint daemon` for it still runs: not a forkpoint mount any more (there is no
/// store to talk to), but `umount` should take it away rather than call it foreign.
pub fn orphaned_mount_at(path: &Path) -> Result<Option<MountInfo>> {
    let Some(m) = mounts()?.into_iter().rev().find(|m| m.mountpoint == path) else {
        return Ok(None);
    };
    let fuse = m.fstype == "fuse" || m.fstype == "fuse.forkpoint";
    if !fuse || Path::new(&m.source).exists() {
        return Ok(None);
    }
    Ok(daemon_for(&m.source).then_some(m))
}

/// Does a process run `forkpoint daemon STORE ...` for this store path?
fn daemon_for(store: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        // `comm` first: reading another process's `cmdline` takes its mmap lock and can block.
        let comm = std::fs::read(e.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(b"forkpoint") {
            return false;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let ours = args.first().is_some_and(|a0| {
            Path::new(std::ffi::OsStr::from_bytes(a0))
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"forkpoint"))
        });
        ours && args.len() >= 3 && args[1] == b"daemon" && args[2] == store.as_bytes()
    })
}

/// Is anything mounted at `path`?
pub fn is_mountpoint(path: &Path) -> Result<bool> {
    Ok(mounts()?.iter().any(|m| m.mountpoint == path))
}

/// Resolves `-m`: the given mountpoint, or the forkpoint mount containing the current
/// directory. Returns (mountpoint, store).
pub fn resolve(m: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let all: Vec<MountInfo> = mounts()?.into_iter().filter(is_forkpoint).collect();
    match m {
        Some(p) => {
            let p = absolute(p)?;
            match all.iter().rev().find(|m| m.mountpoint == p) {
                Some(m) => Ok((m.mountpoint.clone(), PathBuf::from(&m.source))),
                None => bail!("{} is not a forkpoint mount", p.display()),
            }
        }
        None => {
            // The kernel may refuse getcwd inside a dead mount; fall back to $PWD.
            let cwd = std::env::current_dir()
                .or_else(|_| std::env::var("PWD").map(PathBuf::from))
                .context("current directory")?;
            all.iter()
                .filter(|m| cwd.starts_with(&m.mountpoint))
                .max_by_key(|m| m.mountpoint.as_os_str().len())
                .map(|m| (m.mountpoint.clone(), PathBuf::from(&m.source)))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "not inside a forkpoint mount ({}); pass -m MOUNTPOINT",
                        cwd.display()
                    )
                })
        }
    }
}

/// Fails, saying what to do, when the daemon that served mount `mp` of `store` has died
/// (every call on the mount answers ENOTCONN).
pub fn require_live(mp: &Path, store: &Path) -> Result<()> {
    if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(mp) {
        bail!(
            "the daemon that served {} has died: `forkpoint mount {} {}` cleans the mount up \
             and serves the store again",
            mp.display(),
            store.display(),
            mp.display()
        );
    }
    Ok(())
}

/// Makes a path absolute without resolving through a possibly dead FUSE mount.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("current directory")?
            .join(p)
    };
    // Normalize `.` and `..` lexically.
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c.as_os_str()),
        }
    }
    Ok(out)
}

/// Lets the kernel keep more dirty pages of a FUSE mount than its default 1% strict limit, so
/// that writers are not throttled to the daemon's round-trip rate; and reads ahead 8 MiB,
/// which keeps eight 1 MiB reads in flight (a cold sequential read averaged 915 MB/s
/// against 837 with 1 MiB, alternating runs). Best effort: older kernels lack some knobs.
pub fn tune_bdi(mountpoint: &Path) {
    let Ok(Some(m)) = mounts().map(|v| v.into_iter().rev().find(|m| m.mountpoint == mountpoint))
    else {
        return;
    };
    let bdi = Path::new("/sys/class/bdi").join(&m.dev);
    for (knob, value) in [
        ("strict_limit", "0"),
        ("max_ratio", "50"),
        ("read_ahead_kb", "8192"),
    ] {
        if let Err(e) = std::fs::write(bdi.join(knob), value) {
            log::debug!("{}/{knob}: {e}", bdi.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
