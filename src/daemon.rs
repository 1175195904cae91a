//! The per-store daemon: one process serves every mount of a store, each on its own branch,
//! and answers requests on the store's control socket (`STORE/ctl.sock`, one JSON request and
//! one JSON response per connection).

use crate::session::SessionImage;
use anyhow::{anyhow, bail, Context, Result};
use forkpoint_fs::catalog::{CheckpointKind, NewCheckpoint};
use forkpoint_fs::fs::Fs;
use forkpoint_fs::maint;
use forkpoint_fs::{ContentId, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Socket file name inside a store.
pub const SOCKET: &str = "ctl.sock";
/// Seconds between automatic commits of a dirty mount.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Mount {
        mountpoint: PathBuf,
        branch: String,
        /// Keep unlinked-but-open inodes of the last commit (for a restore).
        #[serde(default)]
        keep_orphans: bool,
    },
    Umount {
        mountpoint: PathBuf,
    },
    Snapshot {
        mountpoint: PathBuf,
        name: String,
        #[serde(default)]
        auto: bool,
    },
    RecordCheckpoint {
        mountpoint: PathBuf,
        name: String,
        root_cno: u64,
        image_file: PathBuf,
        auto: bool,
        /// The image this one is a delta against (hex id), when its memory has
        /// [`forkpoint::engine::image::PageData::Base`] runs.
        #[serde(default)]
        base_image: Option<String>,
        /// The session checkpointed, kept as the checkpoint's note (`session NAME`): an
        /// in-place restore gives the program back its name.
        #[serde(default)]
        session: Option<String>,
    },
    /// Stores page chunks copied out of the memory of the process that sends the request,
    /// listed in `page_list` as (u64 LE address, u32 LE length)*; the daemon names each
    /// (BLAKE3, which it computes anyway to store it) and writes the 32-byte ids, in list
    /// order, to `ids_out`. The pages must stay unchanged until the answer.
    StorePages {
        mountpoint: PathBuf,
        page_list: PathBuf,
        ids_out: PathBuf,
    },
    Rollback {
        mountpoint: PathBuf,
        cno: u64,
    },
    Commit {
        mountpoint: PathBuf,
    },
    Branch {
        name: String,
        from: Option<String>,
    },
    /// Removes a branch with nothing recorded on it and no mount (a failed restore's).
    DropBranch {
        name: String,
    },
    /// Takes the names off named snapshots and checkpoints (gc then drops them).
    Forget {
        names: Vec<String>,
    },
    /// Deletes a branch no mount serves.
    DeleteBranch {
        name: String,
    },
    Gc,
    Status,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub value: serde_json::Value,
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters and `?`
/// for any one.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// Takes the names off `names` (a name with `*` or `?` stands for every name it matches,
/// unless it is itself a name), all or none; returns what each named.
pub fn forget(store: &Store, names: &[String]) -> Result<serde_json::Value> {
    store
        .catalog(|c| {
            let mut expanded = Vec::new();
            for n in names {
                let exact = || {
                    c.find(n)
                        .is_ok_and(|cp| cp.name.as_deref() == Some(n.as_str()))
                };
                if !n.contains(['*', '?']) || exact() {
                    expanded.push(n.clone());
                    continue;
                }
                let hits: Vec<String> = c
                    .checkpoints()?
                    .into_iter()
                    .filter_map(|cp| cp.name)
                    .filter(|name| glob_match(n, name))
                    .collect();
                if hits.is_empty() {
                    return Err(forkpoint_fs::StoreError::UnknownCheckpoint(n.clone()));
                }
                expanded.extend(hits);
            }
            let mut seen = std::collections::HashSet::new();
            expanded.retain(|n| seen.insert(n.clone()));
            let names = &expanded;
            for n in names {
                if c.find(n)?.name.as_deref() != Some(n.as_str()) {
                    return Err(forkpoint_fs::StoreError::InvalidName {
                        name: n.clone(),
                        reason: "forget takes the names of snapshots and checkpoints, not numbers",
                    });
                }
            }
            let mut out = Vec::new();
            for n in names {
                out.push(serde_json::json!({"name": n, "cno": c.forget(n)?}));
            }
            Ok(serde_json::Value::Array(out))
        })
        .map_err(Into::into)
}

/// Sends a request to the daemon of `store`; `Ok(None)` if no daemon is running.
pub fn call(store: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    let sock = store.join(SOCKET);
    let mut s = match UnixStream::connect(&sock) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connect to {}", sock.display())),
    };
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .context("send request to daemon")?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .context("read daemon response")?;
    if resp.is_empty() {
        bail!("the daemon of {} closed the connection", store.display());
    }
    let r: Response = serde_json::from_str(&resp).context("decode daemon response")?;
    if r.ok {
        Ok(Some(r.value))
    } else {
        let e = r.error.unwrap_or_else(|| "daemon error".into());
        // A daemon started by an older build does not know a newer request or image.
        if e.starts_with("bad request: unknown variant")
            || e.contains("is newer than the supported version")
        {
            bail!(
                "{e}: the daemon of {} runs another version of forkpoint; unmount its mounts (`forkpoint umount`) and mount again",
                store.display()
            );
        }
        Err(anyhow!(e))
    }
}

struct Mounted {
    fs: Arc<Fs>,
    session: Option<forkpoint_fs::fuse::BackgroundSession>,
    last_commit: Instant,
    mounted_at: Instant,
    /// The same, in seconds since the epoch (as session records have it).
    mounted_epoch: i64,
    /// A session has run on it (see [`Daemon::release_idle_branch_mounts`]).
    used: bool,
}

/// How long a branch's hidden mount waits for its first session before it is released.
const HIDDEN_MOUNT_GRACE: Duration = Duration::from_secs(60);

/// A running daemon.
pub struct Daemon {
    store: Arc<Store>,
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
    quit: AtomicBool,
    /// Device and inode of the control socket this daemon bound.
    socket: std::sync::OnceLock<(u64, u64)>,
    /// Checkpoints in progress, by the pid of the session that takes them, with when they
    /// last asked something: from their filesystem commit to their record, what they
    /// stored is reachable from nothing that gc keeps.
    in_flight: Mutex<HashMap<i32, Instant>>,
    /// Hidden branch mounts this daemon let go of itself (not unmounted from outside).
    released: Mutex<std::collections::HashSet<PathBuf>>,
}

/// How long a checkpoint in progress holds gc off after its last request, and how long gc
/// waits for checkpoints in progress before it goes on (they may have failed silently;
/// one that did not is retried whole if gc took its pages).
const IN_FLIGHT_QUIET: Duration = Duration::from_secs(60);
const GC_WAITS_FOR_CHECKPOINTS: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    pub fn new(store: Arc<Store>) -> Arc<Daemon> {
        Arc::new(Daemon {
            store,
            mounts: Mutex::new(HashMap::new()),
            quit: AtomicBool::new(false),
            socket: std::sync::OnceLock::new(),
            in_flight: Mutex::new(HashMap::new()),
            released: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Notes (or forgets, with `done`) a checkpoint in progress in session process `pid`.
    fn checkpoint_in_flight(&self, pid: Option<i32>, done: bool) {
        let Some(pid) = pid else { return };
        let mut m = lock(&self.in_flight);
        if done {
            m.remove(&pid);
        } else {
            m.insert(pid, Instant::now());
        }
    }

    /// Waits (a while) for the checkpoints in progress to be recorded, so that gc does not
    /// take the pages and the filesystem commit they are about to record.
    fn wait_checkpoints_in_flight(&self) {
        let t = Instant::now();
        loop {
            {
                let mut m = lock(&self.in_flight);
                m.retain(|pid, at| {
                    at.elapsed() < IN_FLIGHT_QUIET && Path::new(&format!("/proc/{pid}")).exists()
                });
                if m.is_empty() {
                    return;
                }
                if t.elapsed() >= GC_WAITS_FOR_CHECKPOINTS {
                    log::warn!(
                        "gc goes on beside checkpoints in progress in sessions {:?}",
                        m.keys().collect::<Vec<_>>()
                    );
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the control socket if it is still this daemon's. A store deleted while its
    /// daemon was exiting and made again at the same path has a new daemon, whose socket
    /// this one must not take away (that daemon could then not be reached to unmount).
    fn remove_socket(&self) {
        use std::os::unix::fs::MetadataExt;
        let path = self.store.dir().join(SOCKET);
        let ours = match (std::fs::symlink_metadata(&path), self.socket.get()) {
            (Err(_), _) => false,
            (Ok(_), None) => true,
            (Ok(m), Some(&id)) => (m.dev(), m.ino()) == id,
        };
        if ours {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Mounts `branch` at `mountpoint`.
    pub fn mount(&self, mountpoint: &Path, branch: &str) -> Result<()> {
        self.mount_with(mountpoint, branch, false)
    }

    fn mount_with(&self, mountpoint: &Path, branch: &str, keep_orphans: bool) -> Result<()> {
        let mut mounts = lock(&self.mounts);
        if mounts.contains_key(mountpoint) {
            bail!("{} is already a forkpoint mount", mountpoint.display());
        }
        if let Some((mp, m)) = mounts.iter().find(|(_, m)| m.fs.branch() == branch) {
            let mp = mp.clone();
            if !mp.starts_with(self.store.dir().join("branches")) {
                bail!("branch '{branch}' is already mounted at {}", mp.display());
            }
            // The hidden mount a `restore --branch` made for its session. While the session
            // runs, the branch is its; once it has ended, the mount is released at the next
            // tick anyway: release it now instead of refusing until then.
            let sessions = crate::session::records(self.store.dir());
            let mine: Vec<_> = sessions
                .iter()
                .filter(|s| s.daemon_mount == mp && s.started >= m.mounted_epoch)
                .collect();
            let running: Vec<String> = mine
                .iter()
                .filter(|s| crate::session::alive(s.pid))
                .map(|s| format!("{} (pid {})", s.name, s.pid))
                .collect();
            if !running.is_empty() {
                bail!(
                    "branch '{branch}' is in use by session {}, restored on it (its files are at \
                     {}); end it first (`forkpoint checkpoint --kill NAME` keeps its state, \
                     `forkpoint kill --session SESSION` does not)",
                    running.join(", "),
                    mp.display()
                );
            }
            if mine.is_empty() && m.mounted_at.elapsed() < HIDDEN_MOUNT_GRACE {
                bail!(
                    "branch '{branch}' is being restored on right now (at {}); try again once \
                     its session runs or in a minute",
                    mp.display()
                );
            }
            drop(mounts);
            self.umount(&mp)
                .with_context(|| format!("release the branch's idle mount {}", mp.display()))?;
            log::info!("released {} for a mount of branch {branch}", mp.display());
            return self.mount_with(mountpoint, branch, keep_orphans);
        }
        let fs = Arc::new(Fs::new_with(self.store.clone(), branch, !keep_orphans)?);
        let session = forkpoint_fs::fuse::spawn(
            fs.clone(),
            mountpoint,
            &self.store.dir().display().to_string(),
        )
        .with_context(|| format!("mount {}", mountpoint.display()))?;
        crate::mounts::tune_bdi(mountpoint);
        log::info!("mounted branch {branch} at {}", mountpoint.display());
        mounts.insert(
            mountpoint.to_path_buf(),
            Mounted {
                fs,
                session: Some(session),
                last_commit: Instant::now(),
                mounted_at: Instant::now(),
                mounted_epoch: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
                used: false,
            },
        );
        Ok(())
    }

    /// Commits and unmounts.
    pub fn umount(&self, mountpoint: &Path) -> Result<()> {
        if !lock(&self.mounts).contains_key(mountpoint) {
            bail!("{} is not mounted by this daemon", mountpoint.display());
        }
        // Unmount before letting go of the mount: a busy mount (a process has a file open
        // or its working directory there) must stay served, not be left dangling.
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
            Err(nix::errno::Errno::EBUSY) => {
                bail!("the mount is busy: a process has a file open or its working directory there")
            }
            Err(e) => bail!("{e}"),
        }
        let m = lock(&self.mounts)
            .remove(mountpoint)
            .ok_or_else(|| anyhow!("{} is not mounted by this daemon", mountpoint.display()))?;
        self.finish(mountpoint, m)
    }

    fn finish(&self, mountpoint: &Path, mut m: Mounted) -> Result<()> {
        if let Err(e) = m.fs.commit_now() {
            log::error!("commit of {} failed: {e}", mountpoint.display());
        }
        if let Some(s) = m.session.take() {
            // The connection ends when no mount namespace holds the mount any more; a session
            // that still does must not hang the daemon.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(s.umount_and_join());
            });
            match rx.recv_timeout(Duration::from_secs(5)) {
                // Already unmounted (by `umount` above): the serving thread ends by itself.
                Ok(Err(_)) if !crate::mounts::is_mountpoint(mountpoint).unwrap_or(true) => {}
                Ok(r) => r.with_context(|| format!("unmount {}", mountpoint.display()))?,
                Err(_) => log::warn!(
                    "{} is still in use by another mount namespace",
                    mountpoint.display()
                ),
            }
        }
        log::info!("unmounted {}", mountpoint.display());
        Ok(())
    }

    fn fs(&self, mountpoint: &Path) -> Result<Arc<Fs>> {
        lock(&self.mounts)
            .get(mountpoint)
            .map(|m| m.fs.clone())
            .ok_or_else(|| anyhow!("{} is not mounted by this daemon", mountpoint.display()))
    }

    fn handle(&self, req: Request, peer: Option<i32>) -> Result<serde_json::Value> {
        Ok(match req {
            Request::Mount {
                mountpoint,
                branch,
                keep_orphans,
            } => {
                self.mount_with(&mountpoint, &branch, keep_orphans)?;
                serde_json::json!({})
            }
            Request::Umount { mountpoint } => {
                self.umount(&mountpoint)?;
                serde_json::json!({})
            }
            Request::Snapshot {
                mountpoint,
                name,
                auto,
            } => {
                let fs = self.fs(&mountpoint)?;
                let t = Instant::now();
                let kind = if auto {
                    CheckpointKind::Auto
                } else {
                    CheckpointKind::Snapshot
                };
                let cno = fs.commit(kind, Some(&name), None)?;
                serde_json::json!({"cno": cno, "branch": fs.branch(), "micros": t.elapsed().as_micros() as u64})
            }
            Request::Commit { mountpoint } => {
                // A checkpoint's commit, taken while its program is frozen.
                self.checkpoint_in_flight(peer, false);
                let t = Instant::now();
                let fs = self.fs(&mountpoint)?;
                let cno = fs.commit_now()?;
                log::debug!(
                    "commit #{cno} of {} in {:?}",
                    mountpoint.display(),
                    t.elapsed()
                );
                serde_json::json!({"cno": cno})
            }
            Request::RecordCheckpoint {
                mountpoint,
                name,
                root_cno,
                image_file,
                auto,
                base_image,
                session,
            } => {
                let r = (|| {
                    self.fs(&mountpoint)?;
                    let base = base_image
                        .map(|h| {
                            ContentId::from_hex(&h).ok_or_else(|| anyhow!("bad base image id {h}"))
                        })
                        .transpose()?;
                    let image = NewImage {
                        file: &image_file,
                        base,
                        note: session.map(|s| format!("session {s}")),
                    };
                    record_checkpoint(&self.store, &name, root_cno, &image, auto)
                })();
                // Recorded or failed, the checkpoint is over.
                self.checkpoint_in_flight(peer, true);
                r?
            }
            Request::StorePages {
                mountpoint,
                page_list,
                ids_out,
            } => {
                self.fs(&mountpoint)?;
                let pid =
                    peer.ok_or_else(|| anyhow!("cannot tell which process sent the pages"))?;
                self.checkpoint_in_flight(peer, false);
                let pages = PageSource {
                    pid,
                    list: &page_list,
                };
                store_pages(&self.store, &pages, &ids_out)?
            }
            Request::Rollback { mountpoint, cno } => {
                let mounts = lock(&self.mounts);
                let m = mounts.get(&mountpoint).ok_or_else(|| {
                    anyhow!("{} is not mounted by this daemon", mountpoint.display())
                })?;
                m.fs.commit_now()?;
                let inval = m.fs.checkout(cno)?;
                if let Some(s) = &m.session {
                    forkpoint_fs::fuse::invalidate(s, &inval);
                }
                serde_json::json!({"cno": cno, "invalidated": inval.len()})
            }
            Request::Branch { name, from } => {
                self.commit_all();
                create_branch(&self.store, &name, from.as_deref())?
            }
            Request::DropBranch { name } => {
                if lock(&self.mounts).values().any(|m| m.fs.branch() == name) {
                    bail!("branch '{name}' is mounted");
                }
                self.store.catalog(|c| c.drop_branch(&name))?;
                serde_json::json!({})
            }
            Request::Forget { names } => forget(&self.store, &names)?,
            Request::DeleteBranch { name } => {
                if lock(&self.mounts).values().any(|m| m.fs.branch() == name) {
                    bail!("branch '{name}' is mounted (or a session runs on it): unmount it first");
                }
                self.store.catalog(|c| c.delete_branch(&name))?;
                serde_json::json!({})
            }
            Request::Gc => {
                // The mark runs beside the mounts' writes; a sweep that finds the store
                // changed since refuses, and gc starts again. A mount that commits all the
                // time (every fsync is a commit) would make every try fail: the last one
                // holds the mounts' commits off until it is done (their fsyncs wait).
                const TRIES: usize = 3;
                let mut tries = 0;
                let report = loop {
                    self.wait_checkpoints_in_flight();
                    self.commit_all();
                    let fss: Vec<Arc<Fs>> =
                        lock(&self.mounts).values().map(|m| m.fs.clone()).collect();
                    // Snapshots open in a mount stay whole, forgotten or not.
                    let open: Vec<ContentId> =
                        fss.iter().flat_map(|fs| fs.open_snapshot_roots()).collect();
                    let r = if tries + 1 < TRIES {
                        maint::gc_keeping(&self.store, &open, &mut || {})
                    } else {
                        let _held = fss
                            .iter()
                            .map(|fs| fs.hold_commits())
                            .collect::<Result<Vec<_>, _>>()?;
                        maint::gc_keeping(&self.store, &open, &mut || {})
                    };
                    match r {
                        Err(forkpoint_fs::StoreError::ChangedDuringGc) if tries + 1 < TRIES => {
                            tries += 1;
                        }
                        r => break r?,
                    }
                };
                serde_json::to_value(report)?
            }
            Request::Status => {
                let mounts = lock(&self.mounts);
                let list: Vec<_> = mounts
                    .iter()
                    .map(|(p, m)| serde_json::json!({"mountpoint": p, "branch": m.fs.branch(), "head": m.fs.head()}))
                    .collect();
                serde_json::json!({"pid": std::process::id(), "mounts": list})
            }
        })
    }

    fn commit_all(&self) {
        let fss: Vec<(PathBuf, Arc<Fs>)> = lock(&self.mounts)
            .iter()
            .map(|(p, m)| (p.clone(), m.fs.clone()))
            .collect();
        for (p, fs) in fss {
            if let Err(e) = fs.commit_now() {
                log::error!("commit of {} failed: {e}", p.display());
            }
        }
    }

    /// Unmounts the hidden mounts of branches (`STORE/branches/NAME`, made by
    /// `restore --branch` for its session) that no session uses any more: once their
    /// session has ended, or if none came within [`HIDDEN_MOUNT_GRACE`]. Otherwise they
    /// stayed mounted for good, and kept the daemon running after the user's last umount.
    /// A mount still in use (a shell in it) is left for a later tick; the kernel's unmount
    /// is then noticed like any other.
    fn release_idle_branch_mounts(&self) {
        let hidden_root = self.store.dir().join("branches");
        let candidates: Vec<PathBuf> = lock(&self.mounts)
            .keys()
            .filter(|p| p.starts_with(&hidden_root))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return;
        }
        // Every session record, ended or not: one may start and end between two ticks.
        let sessions = crate::session::records(self.store.dir());
        let mut idle = Vec::new();
        {
            let mut mounts = lock(&self.mounts);
            for p in candidates {
                let Some(m) = mounts.get_mut(&p) else {
                    continue;
                };
                // Records of this mount, not of an earlier one at the same path.
                let mine = sessions
                    .iter()
                    .filter(|s| s.daemon_mount == p && s.started >= m.mounted_epoch);
                let mut running = false;
                for s in mine {
                    m.used = true;
                    running |= crate::session::alive(s.pid);
                }
                if !running && (m.used || m.mounted_at.elapsed() >= HIDDEN_MOUNT_GRACE) {
                    idle.push(p);
                }
            }
        }
        for p in idle {
            match nix::mount::umount2(&p, nix::mount::MntFlags::empty()) {
                Ok(()) => {
                    log::info!("released {}: no session uses it", p.display());
                    lock(&self.released).insert(p);
                }
                Err(e) => log::debug!("{} stays mounted: {e}", p.display()),
            }
        }
    }

    /// Periodic work: commit dirty mounts, notice mounts unmounted from outside.
    fn tick(&self) {
        self.release_idle_branch_mounts();
        let live: Vec<PathBuf> = crate::mounts::mounts()
            .map(|v| v.into_iter().map(|m| m.mountpoint).collect())
            .unwrap_or_default();
        let mut gone = Vec::new();
        let mut due = Vec::new();
        {
            let mut mounts = lock(&self.mounts);
            for (p, m) in mounts.iter_mut() {
                if !live.contains(p) {
                    gone.push(p.clone());
                } else if m.fs.is_dirty() && m.last_commit.elapsed() >= COMMIT_INTERVAL {
                    m.last_commit = Instant::now();
                    due.push((p.clone(), m.fs.clone()));
                }
            }
        }
        for (p, fs) in due {
            if let Err(e) = fs.commit_now() {
                log::error!("periodic commit of {} failed: {e}", p.display());
            }
        }
        for p in gone {
            if let Some(mut m) = lock(&self.mounts).remove(&p) {
                if !lock(&self.released).remove(&p) {
                    log::info!("{} was unmounted from outside", p.display());
                }
                let _ = m.fs.commit_now();
                // The kernel side is gone; dropping the session must not try to unmount again.
                if let Some(s) = m.session.take() {
                    std::mem::forget(s);
                }
                if p.starts_with(self.store.dir().join("branches")) {
                    let _ = std::fs::remove_dir(&p);
                }
            }
        }
        if lock(&self.mounts).is_empty() {
            self.quit.store(true, Ordering::SeqCst);
        }
    }

    /// Serves the control socket until the last mount is gone or a signal arrives.
    pub fn serve(self: &Arc<Daemon>, listener: UnixListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let mut last_tick = Instant::now();
        while !self.quit.load(Ordering::SeqCst) {
            // Wait for a client in poll, not in a sleep: a checkpoint calls the daemon while
            // the program is frozen, and every call used to wait up to a sleep's length.
            // The timeout only bounds how late a quit (signal, last umount) is seen.
            {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
            }
            match listener.accept() {
                Ok((conn, _)) => {
                    let d = self.clone();
                    std::thread::spawn(move || d.connection(conn));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                self.tick();
            }
        }
        // New clients must not reach a daemon that is shutting down.
        self.remove_socket();
        self.shutdown();
        Ok(())
    }

    /// Commits and unmounts everything.
    pub fn shutdown(&self) {
        let all: Vec<(PathBuf, Mounted)> = lock(&self.mounts).drain().collect();
        for (p, m) in all {
            if let Err(e) = self.finish(&p, m) {
                log::error!("{}", crate::render_error(&e));
            }
        }
        self.remove_socket();
    }

    fn connection(&self, conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match self.handle(req, peer_pid(&conn)) {
                Ok(v) => Response {
                    ok: true,
                    error: None,
                    value: v,
                },
                Err(e) => Response {
                    ok: false,
                    error: Some(crate::render_error(&e)),
                    value: serde_json::Value::Null,
                },
            },
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                value: serde_json::Value::Null,
            },
        };
        // The daemon exits with its last mount; its socket goes first, so that a client that
        // got this answer can no longer reach a daemon that is going away. The answer is
        // written before the daemon is told to quit: otherwise it could exit before the
        // client hears that its unmount succeeded (and the client would take the daemon
        // for dead).
        let last = lock(&self.mounts).is_empty();
        if last {
            self.remove_socket();
        }
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        let _ = (&conn).write_all(out.as_bytes());
        if last {
            self.quit.store(true, Ordering::SeqCst);
        }
    }

    /// Asks the daemon to stop (signal handler thread).
    pub fn request_quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }
}

/// Moves a session image into the store (memory as deduplicated chunks) and records the
/// checkpoint (name, filesystem root of `root_cno`, image) in one catalog transaction.
/// The image a session wrote for a checkpoint, and the image it is a delta against.
struct NewImage<'a> {
    file: &'a Path,
    base: Option<ContentId>,
    /// The checkpoint's note.
    note: Option<String>,
}

/// Stores the pages a session lists (see [`Request::StorePages`]): copied out of its memory
/// in batches, named (hashed on all cores), appended in one vectored write per batch, the
/// disk set to work behind each. Returns the count and the bytes new to the store.
fn store_pages(store: &Store, pages: &PageSource<'_>, ids_out: &Path) -> Result<serde_json::Value> {
    use forkpoint_fs::segment::ObjectKind;
    const BATCH: usize = 32 << 20;
    const ENTRY: usize = 12;
    let t0 = Instant::now();
    let list =
        std::fs::read(pages.list).with_context(|| format!("read {}", pages.list.display()))?;
    if list.len() % ENTRY != 0 {
        bail!("page list {}: truncated entry", pages.list.display());
    }
    let entries: Vec<(u64, usize)> = list
        .chunks_exact(ENTRY)
        .map(|e| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[..8]);
            let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as usize;
            (u64::from_le_bytes(a), len)
        })
        .collect();
    if let Some(e) = entries
        .iter()
        .find(|e| e.1 > forkpoint_fs::segment::MAX_OBJECT)
    {
        bail!("page list: chunk of {} bytes is too large", e.1);
    }
    let mut ids = Vec::with_capacity(entries.len() * 32);
    let mut new_bytes = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let mut j = i;
        let mut total = 0usize;
        while j < entries.len() && (j == i || total + entries[j].1 <= BATCH) {
            total += entries[j].1;
            j += 1;
        }
        let batch = &entries[i..j];
        buf.resize(total, 0);
        read_peer(pages.pid, batch, &mut buf)?;
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(batch.len());
        let mut at = 0;
        for e in batch {
            pieces.push(&buf[at..at + e.1]);
            at += e.1;
        }
        let got = ContentId::of_many(&pieces);
        for id in &got {
            ids.extend_from_slice(&id.0);
        }
        let items: Vec<(ContentId, &[u8])> = got.into_iter().zip(pieces).collect();
        new_bytes += store.put_batch(ObjectKind::Chunk, &items)?;
        // The disk writes this batch while the next is copied and hashed.
        store.sync_behind();
        i = j;
    }
    std::fs::write(ids_out, &ids).with_context(|| format!("write {}", ids_out.display()))?;
    log::debug!(
        "{} pages ({new_bytes} new bytes) stored in {:?}",
        entries.len(),
        t0.elapsed()
    );
    Ok(serde_json::json!({"pages": entries.len(), "new_bytes": new_bytes}))
}

/// The error of a delta image whose base image is gone (its checkpoint forgotten, then gc):
/// the session checkpoints whole instead.
pub const BASE_IMAGE_GONE: &str = "the base image of the delta image is not in the store";

/// The error of an image naming a chunk the store no longer holds (pages taken unchanged from
/// the last image, whose checkpoint was forgotten, then gc): the session checkpoints whole.
pub const CHUNK_GONE: &str = "which the store does not hold";

fn record_checkpoint(
    store: &Store,
    name: &str,
    root_cno: u64,
    image: &NewImage<'_>,
    auto: bool,
) -> Result<serde_json::Value> {
    let image_file = image.file;
    let image_note = image.note.clone();
    use forkpoint::engine::image::PageData;
    use forkpoint_fs::segment::ObjectKind;
    let t0 = Instant::now();
    let mut new_bytes = 0u64;
    let bytes =
        std::fs::read(image_file).with_context(|| format!("read {}", image_file.display()))?;
    let si = SessionImage::decode(&bytes)?;
    let tree = forkpoint::engine::decode_tree(&si.process).context("decode process image")?;
    let t_decoded = t0.elapsed();
    // A delta's base must be here (a checkpoint's image: gc keeps it from now on through
    // this one) and must be one.
    match (image.base, tree.is_delta()) {
        // Located, not read: reading it would make every delta cost the whole base.
        (Some(b), true) => match store.locate(&b) {
            Some(l) if l.kind == ObjectKind::Image => {}
            Some(_) => bail!("base {b} of the delta image is not a process image"),
            None => bail!("{BASE_IMAGE_GONE}: {b}"),
        },
        (None, true) => bail!("process image refers to a base image but names none"),
        (Some(_), false) | (None, false) => {}
    }
    let mut refs = Vec::new();
    let mut mem_bytes = 0u64;
    let runs = tree
        .processes
        .iter()
        .filter_map(|m| m.live())
        .flat_map(|p| p.memory.runs.iter())
        .chain(tree.memfds.iter().flat_map(|f| f.contents.runs.iter()))
        .chain(si.sysv.shm.iter().flat_map(|s| s.contents.runs.iter()));
    for run in runs {
        match &run.data {
            PageData::Stored(h) => {
                mem_bytes += run.len;
                refs.push(ContentId(*h));
            }
            PageData::Bytes(_) => bail!("process image still holds inline memory"),
            PageData::Base => mem_bytes += run.len,
            PageData::Zero => {}
        }
    }
    // Every chunk named must be here, and stays (a gc running now starts again rather than
    // sweep what this checkpoint is about to commit); so must the base.
    let mut used = refs.clone();
    used.extend(image.base);
    store.reference(&used).map_err(|e| match e {
        forkpoint_fs::StoreError::MissingObject(id) => {
            anyhow!("process image refers to chunk {id}, {CHUNK_GONE}")
        }
        e => e.into(),
    })?;
    let t_checked = t0.elapsed();
    // The session wrote exactly this encoding: store it as it came.
    let body = bytes;
    let refs_len = refs.len();
    let base = image.base.filter(|_| tree.is_delta());
    let obj = maint::encode_image(&maint::ImageObject {
        version: if base.is_some() {
            maint::IMAGE_OBJECT_DELTA
        } else {
            1
        },
        refs,
        base,
        body,
    })?;
    let obj_len = obj.len();
    let had = store.contains(&ContentId::of(&obj));
    let image = store.put(ObjectKind::Image, &obj)?;
    if !had {
        new_bytes += obj.len() as u64;
    }
    let t_put = t0.elapsed();
    log::debug!(
        "checkpoint '{name}': image decoded by {t_decoded:?}, {} references checked by {t_checked:?}, image of {} bytes stored by {t_put:?}",
        refs_len,
        obj_len
    );
    let cp = store.catalog(|c| c.checkpoint(root_cno))?;
    let cno = store
        .commit(Some(&NewCheckpoint {
            branch: &cp.branch,
            root: cp.root,
            name: Some(name),
            kind: if auto {
                CheckpointKind::Auto
            } else {
                CheckpointKind::Checkpoint
            },
            image: Some(image),
            note: image_note.as_deref(),
            advance_head: false,
            parent: Some(root_cno),
        }))?
        .ok_or_else(|| anyhow!("checkpoint not recorded"))?;
    log::info!(
        "checkpoint '{name}': image stored in {:?}, committed in {:?}",
        t_put,
        t0.elapsed() - t_put
    );
    Ok(
        serde_json::json!({"cno": cno, "branch": cp.branch, "image": image.to_hex(), "delta": base.is_some(), "image_bytes": mem_bytes + obj.len() as u64, "new_bytes": new_bytes}),
    )
}

/// Creates branch `name` from checkpoint `from` (default: main's head).
pub fn create_branch(store: &Store, name: &str, from: Option<&str>) -> Result<serde_json::Value> {
    forkpoint_fs::fs::validate_name(name)?;
    let cp = match from {
        Some(f) => store.find(f)?,
        None => store.head("main")?,
    };
    store.catalog(|c| c.create_branch(name, cp.cno))?;
    Ok(serde_json::json!({"branch": name, "cno": cp.cno}))
}

/// Runs the daemon in this process: opens the store, binds the socket, mounts, reports
/// readiness on `ready` (if given) and serves.
/// The write path allocates and frees 64 KiB blocks and 1 MiB request buffers at a high rate.
/// With glibc's defaults freed memory goes back to the kernel at once and every new block
/// faults in freshly zeroed pages, which cost more than the copies themselves (seen in
/// profiles of sequential writes). Keep freed memory for reuse instead.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread
    // of the daemon exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

pub fn run(
    store_dir: &Path,
    mountpoint: &Path,
    branch: &str,
    ready: Option<std::fs::File>,
) -> Result<()> {
    let report = |ready: &Option<std::fs::File>, msg: &str| {
        if let Some(mut f) = ready.as_ref() {
            let _ = writeln!(f, "{msg}");
        }
    };
    tune_malloc();
    let setup = || -> Result<(Arc<Daemon>, UnixListener)> {
        // A daemon of this store that is just exiting may still hold the lock.
        let mut tries = 0;
        let store = loop {
            match Store::open(store_dir) {
                Err(forkpoint_fs::StoreError::Locked(_)) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => break r?,
            }
        };
        let sock = store_dir.join(SOCKET);
        let _ = std::fs::remove_file(&sock);
        let listener =
            UnixListener::bind(&sock).with_context(|| format!("bind {}", sock.display()))?;
        let d = Daemon::new(store);
        if let Ok(m) = std::fs::symlink_metadata(&sock) {
            use std::os::unix::fs::MetadataExt;
            let _ = d.socket.set((m.dev(), m.ino()));
        }
        d.mount(mountpoint, branch)?;
        Ok((d, listener))
    };
    // Signals are handled by one thread; block them before any other thread starts.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.add(nix::sys::signal::Signal::SIGHUP);
    mask.thread_block().context("block signals")?;
    let (d, listener) = match setup() {
        Ok(x) => x,
        Err(e) => {
            report(&ready, &format!("error: {}", crate::render_error(&e)));
            return Err(e);
        }
    };
    report(&ready, "ok");
    drop(ready);
    let dq = d.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = mask.wait() {
            log::info!("received {sig}, shutting down");
            dq.request_quit();
        }
    });
    d.serve(listener)
}

/// Where the pages of a checkpoint come from: the memory of process `pid` (the session's
/// init, which sent the request), at the addresses `list` names.
struct PageSource<'a> {
    pid: i32,
    list: &'a Path,
}

/// The pid (in the daemon's namespace) of the process at the other end of `conn`.
fn peer_pid(conn: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
        .filter(|p| *p > 0)
}

/// Copies the `(hash, address, length)` ranges of process `pid` into `buf`, back to back.
fn read_peer(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let mut off = 0usize;
    for group in ranges.chunks(1024) {
        let remote: Vec<RemoteIoVec> = group
            .iter()
            .map(|e| RemoteIoVec {
                base: e.0 as usize,
                len: e.1,
            })
            .collect();
        let len: usize = group.iter().map(|e| e.1).sum();
        let mut done = 0;
        while done < len {
            // A short read stops at a range boundary; go on from there.
            let mut skip = done;
            let rest: Vec<RemoteIoVec> = remote
                .iter()
                .filter_map(|r| {
                    if skip >= r.len {
                        skip -= r.len;
                        None
                    } else {
                        let v = RemoteIoVec {
                            base: r.base + skip,
                            len: r.len - skip,
                        };
                        skip = 0;
                        Some(v)
                    }
                })
                .collect();
            let n = process_vm_readv(
                nix::unistd::Pid::from_raw(pid),
                &mut [std::io::IoSliceMut::new(&mut buf[off + done..off + len])],
                &rest,
            )
            .with_context(|| format!("copy the checkpoint's pages from process {pid}"))?;
            if n == 0 {
                bail!("copy the checkpoint's pages from process {pid}: nothing read");
            }
            done += n;
        }
        off += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_patterns_match_as_in_a_shell() {
        use super::glob_match as m;
        assert!(m("auto-*", "auto-2026-12-06-08-07-36"));
        assert!(m("*", ""));
        assert!(m("c?", "c1") && !m("c?", "c10"));
        assert!(m("a*b*c", "aXbYbZc") && !m("a*b*c", "aXbYbZ"));
        assert!(!m("auto-*", "warm") && m("warm", "warm"));
    }
}
