//! The session's cgroup (v2), found from /proc/self/mountinfo (it may be at
//! /sys/fs/cgroup or /sys/fs/cgroup/unified). A session whose cgroup cannot be made still runs;
//! the cgroup is a convenience for listing and killing, not for freezing (the engine stops
//! the program with ptrace, which is what makes the cut atomic).

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};

fn root() -> Result<PathBuf> {
    crate::mounts::mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mountpoint)
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy mounted"))
}

fn name_for(store: &Path, session: &str) -> String {
    let h = blake3::hash(store.as_os_str().as_encoded_bytes());
    format!("forkpoint-{}-{session}", &h.to_hex()[..8])
}

/// Creates the session's cgroup; returns its directory.
pub fn create(store: &Path, session: &str) -> Result<PathBuf> {
    let dir = root()?.join(name_for(store, session));
    std::fs::create_dir_all(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
    Ok(dir)
}

/// Removes the session's cgroup (once it is empty).
pub fn remove(store: &Path, session: &str) {
    if let Ok(r) = root() {
        let _ = std::fs::remove_dir(r.join(name_for(store, session)));
    }
}

/// Kills every process of the session's cgroup.
pub fn kill(store: &Path, session: &str) -> Result<()> {
    let dir = root()?.join(name_for(store, session));
    std::fs::write(dir.join("cgroup.kill"), b"1").with_context(|| format!("kill {}", dir.display()))
}
