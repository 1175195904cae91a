//! The `forkpoint` command line.

mod cgroup;
mod daemon;
mod mounts;
mod owndirs;
mod session;
mod sysv;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use forkpoint_fs::store::is_store;
use forkpoint_fs::{maint, Store};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Checkpoint a process tree together with the files it works on.
#[derive(Parser)]
#[command(name = "forkpoint", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a store (a directory: log segments, SQLite catalog, control socket).
    Init {
        /// Directory of the new store.
        store: PathBuf,
        /// Read-only base directory the store's tree starts from.
        #[arg(long)]
        lower: Option<PathBuf>,
    },
    /// Serve a branch of a store at MOUNTPOINT (creating the store if needed).
    Mount {
        /// Directory of the store (created if it does not exist).
        store: PathBuf,
        /// An empty directory to serve the branch at.
        mountpoint: PathBuf,
        /// Read-only directory the files start from (given when the store is created; never
        /// modified).
        #[arg(long)]
        lower: Option<PathBuf>,
        /// The branch to serve.
        #[arg(long, default_value = "main")]
        branch: String,
        /// Serve from this process instead of a background daemon.
        #[arg(long)]
        foreground: bool,
    },
    /// Commit and unmount.
    Umount {
        /// The forkpoint mount to commit and unmount.
        mountpoint: PathBuf,
    },
    /// Take a named filesystem snapshot of a mount.
    Snapshot {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Name of the snapshot (browse it at MOUNTPOINT/.forkpoint/snapshots/NAME).
        name: String,
    },
    /// Create a branch from a snapshot or checkpoint (default: main's head).
    Branch {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Operate on a store directly instead of through a mount.
        #[arg(long, conflicts_with = "mountpoint")]
        store: Option<PathBuf>,
        /// Name of the new branch (with --delete: of the branch to delete).
        name: String,
        /// Snapshot or checkpoint to start from (NAME or #CNO; default: main's head).
        #[arg(long)]
        from: Option<String>,
        /// Delete the branch instead (it must not be mounted): its unnamed commits are
        /// then gc's to drop; named snapshots and checkpoints made on it stay.
        #[arg(short = 'd', long, conflicts_with = "from")]
        delete: bool,
    },
    /// Take the names off snapshots or checkpoints, so that gc reclaims what only they
    /// keep (a branch head stays until its branch is deleted).
    Forget {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Operate on a store directly instead of through a mount.
        #[arg(long, conflicts_with = "mountpoint")]
        store: Option<PathBuf>,
        /// Names of the snapshots or checkpoints; `*` and `?` match as in a shell (quote
        /// them), so `'auto-*'` takes every automatic checkpoint, unless the pattern is itself
        /// a name. All are checked before any is forgotten.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List branches and checkpoints.
    Log {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Operate on a store directly instead of through a mount.
        #[arg(long, conflicts_with = "mountpoint")]
        store: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also list the unnamed commits (made by fsync, umount and the daemon's timer);
        /// without it they are counted, not listed.
        #[arg(long)]
        all: bool,
    },
    /// What changed between two checkpoints or snapshots (names, or #CNO).
    Diff {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Operate on a store directly instead of through a mount.
        #[arg(long, conflicts_with = "mountpoint")]
        store: Option<PathBuf>,
        /// The older checkpoint or snapshot (NAME or #CNO).
        from: String,
        /// The newer checkpoint or snapshot (NAME or #CNO).
        to: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object reachable from a retained checkpoint.
    Verify {
        /// Directory of the store (default: the store of the forkpoint mount that holds the
        /// current directory).
        store: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim log space no retained checkpoint reaches.
    Gc {
        /// Directory of the store (default: the store of the forkpoint mount that holds the
        /// current directory).
        store: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a program as a session inside a mount (own PID, mount, IPC, UTS, time namespaces).
    Run {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Name of the session (default: the first free one of s1, s2, ...).
        #[arg(long)]
        name: Option<String>,
        /// Stdin from /dev/null, output to a log in the store; return at once.
        #[arg(long)]
        detach: bool,
        /// The program and its arguments, after `--`.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Checkpoint a session: its processes and the mount's files, in one atomic cut.
    Checkpoint {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// The session to checkpoint (default: the mount's only session).
        #[arg(long)]
        session: Option<String>,
        /// Leave the program stopped after the checkpoint.
        #[arg(long, conflicts_with = "kill")]
        stop: bool,
        /// Kill the program after the checkpoint.
        #[arg(long)]
        kill: bool,
        /// A file (or directory) outside the mount that the program may hold open for
        /// writing; such files move forward, a restore does not roll them back. Repeatable.
        #[arg(long = "allow-outside", value_name = "PATH")]
        allow_outside: Vec<PathBuf>,
        /// Name of the checkpoint.
        name: String,
    },
    /// Roll back to a checkpoint, or restore it on a new branch.
    Restore {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Create this branch from the checkpoint and restore there, side by side.
        #[arg(long)]
        branch: Option<String>,
        /// Run the restored program in the background (output to a log in the store).
        #[arg(long)]
        detach: bool,
        /// Let the program run before its memory is all back: pages are copied in on first
        /// touch and in the background (post-copy). A checkpoint waits until every page is
        /// in; a page damaged on disk is found only when read (the program is then killed).
        #[arg(long)]
        lazy: bool,
        /// The checkpoint to restore (NAME or #CNO).
        name: String,
    },
    /// End a session without checkpointing it: every process in it is killed.
    Kill {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// The session (default: the one running on the mount).
        #[arg(long)]
        session: Option<String>,
    },
    /// List sessions.
    Ps {
        /// The mount to work on (default: the forkpoint mount that holds the current
        /// directory).
        #[arg(short = 'm', long = "mount")]
        mountpoint: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// PID 1 of a session (started by `run` and `restore`).
    #[command(hide = true, name = "session-init")]
    SessionInit { spec: PathBuf },
    /// Walk through the filesystem workflow on a store in a local directory.
    Demo {
        /// Directory for the demo's store, lower directory and mount: a new or empty one,
        /// or that of an earlier demo (made anew).
        #[arg(default_value = "forkpoint-demo")]
        dir: PathBuf,
    },
    /// Run a store's daemon (started by `mount`).
    #[command(hide = true)]
    Daemon {
        store: PathBuf,
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        branch: String,
    },
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) && r.target().starts_with("forkpoint") {
            eprintln!("[{} {}] {}", fmt_time(forkpoint_now()), r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn forkpoint_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Formats nanoseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
fn fmt_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn main() -> ExitCode {
    static LOGGER: StderrLogger = StderrLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(match std::env::var("FORKPOINT_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    });
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Log { .. } | Cmd::Ps { .. } | Cmd::Diff { .. } | Cmd::Verify { .. }
    ) {
        // Commands that only read and print end quietly when their reader goes away
        // (`forkpoint log | head`), as other Unix tools do; Rust's runtime ignores SIGPIPE,
        // which would make the next print fail. Not the other commands: they start the
        // daemon and sessions, which must not die of a peer's closed socket.
        // SAFETY: no handler is installed; SIG_DFL is async-signal-safe by construction, and
        // no other thread runs yet.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            let text = render_error(&e);
            eprintln!("forkpoint: {text}");
            if text.contains("No space left on device") {
                eprintln!(
                    "forkpoint: the disk under the store is full. Files deleted in a mount keep \
                     their space in the log until `forkpoint gc` reclaims it, and gc needs a \
                     little room itself: free some space on that disk first."
                );
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Init { store, lower } => {
            Store::create(&store, lower.as_deref())?;
            println!("created store {}", store.display());
        }
        Cmd::Mount {
            store,
            mountpoint,
            lower,
            branch,
            foreground,
        } => {
            mount(&store, &mountpoint, lower.as_deref(), &branch, foreground)?;
        }
        Cmd::Umount { mountpoint } => umount(&mountpoint)?,
        Cmd::Snapshot { mountpoint, name } => {
            let (mp, store) = mounts::resolve(mountpoint.as_deref())?;
            mounts::require_live(&mp, &store)?;
            flush_mount(&mp, None)?;
            let v = daemon::call(
                &store,
                &daemon::Request::Snapshot {
                    mountpoint: mp.clone(),
                    name: name.clone(),
                    auto: false,
                },
            )?
            .context("no daemon serves this mount")?;
            println!(
                "snapshot '{name}' of branch {} is checkpoint #{} ({} us)",
                v["branch"].as_str().unwrap_or("?"),
                v["cno"],
                v["micros"]
            );
        }
        Cmd::Branch {
            mountpoint,
            store,
            name,
            delete: true,
            ..
        } => {
            let store = store_of(mountpoint.as_deref(), store.as_deref())?;
            let req = daemon::Request::DeleteBranch { name: name.clone() };
            if daemon::call(&store, &req)?.is_none() {
                Store::open(&store)?.catalog(|c| c.delete_branch(&name))?;
            }
            println!("deleted branch {name}; `forkpoint gc` reclaims what only it kept");
        }
        Cmd::Forget {
            mountpoint,
            store,
            names,
        } => {
            let store = store_of(mountpoint.as_deref(), store.as_deref())?;
            let req = daemon::Request::Forget {
                names: names.clone(),
            };
            let v = match daemon::call(&store, &req)? {
                Some(v) => v,
                None => daemon::forget(&*Store::open(&store)?, &names)?,
            };
            for e in v.as_array().into_iter().flatten() {
                println!(
                    "forgot '{}' (#{})",
                    e["name"].as_str().unwrap_or_default(),
                    e["cno"]
                );
            }
            println!("`forkpoint gc` reclaims what only they kept");
        }
        Cmd::Branch {
            mountpoint,
            store,
            name,
            from,
            delete: false,
        } => {
            let store = store_of(mountpoint.as_deref(), store.as_deref())?;
            let req = daemon::Request::Branch {
                name: name.clone(),
                from: from.clone(),
            };
            let v = match daemon::call(&store, &req)? {
                Some(v) => v,
                None => daemon::create_branch(&*Store::open(&store)?, &name, from.as_deref())?,
            };
            println!("created branch {name} at checkpoint #{}", v["cno"]);
        }
        Cmd::Log {
            mountpoint,
            store,
            json,
            all,
        } => {
            let store = store_of(mountpoint.as_deref(), store.as_deref())?;
            print_log(&store, json, all)?;
        }
        Cmd::Diff {
            mountpoint,
            store,
            from,
            to,
            json,
        } => {
            let store = store_of(mountpoint.as_deref(), store.as_deref())?;
            let s = Store::open_read_only(&store)?;
            let (a, b) = (s.find(&from)?, s.find(&to)?);
            let d = forkpoint_fs::tree::diff(&s, a.root, b.root)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                for e in d {
                    use forkpoint_fs::tree::DiffKind;
                    match e.kind {
                        DiffKind::Added => println!("A {}", e.paths.join(", ")),
                        DiffKind::Removed => println!("D {}", e.paths.join(", ")),
                        DiffKind::Modified | DiffKind::Replaced => {
                            println!("M {}", e.paths.join(", "))
                        }
                        DiffKind::Renamed => {
                            println!("R {} -> {}", e.old_paths.join(", "), e.paths.join(", "))
                        }
                    }
                }
            }
        }
        Cmd::Verify { store, json } => {
            let store = store_arg(store)?;
            let s = Store::open_read_only(&store)?;
            let r = maint::verify(&s)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "verified {} objects ({} bytes) reachable from {} retained checkpoints",
                    r.objects, r.bytes, r.checkpoints
                );
                for p in &r.problems {
                    println!("CORRUPT {} {}: {}", p.kind, p.object, p.reason);
                    for u in &p.used_by {
                        println!("    used by {u}");
                    }
                }
            }
            if !r.problems.is_empty() {
                let objects = r.problems.iter().filter(|p| p.kind != "branch").count();
                let branches = r.problems.len() - objects;
                eprintln!(
                    "forkpoint: {} in {}",
                    match (objects, branches) {
                        (o, 0) => format!("{o} corrupt object(s)"),
                        (0, b) => format!("{b} branch(es) with a missing head"),
                        (o, b) =>
                            format!("{o} corrupt object(s), {b} branch(es) with a missing head"),
                    },
                    store.display()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Gc { store, json } => {
            let store = store_arg(store)?;
            let v = match daemon::call(&store, &daemon::Request::Gc)? {
                Some(v) => v,
                None => serde_json::to_value(maint::gc(&*Store::open(&store)?)?)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "gc: dropped {} unnamed commits and forgotten names, reclaimed {} segments, {} -> {} bytes ({} bytes moved)",
                    v["dropped_checkpoints"], v["segments_reclaimed"], v["bytes_before"], v["bytes_after"], v["bytes_moved"]
                );
            }
        }
        Cmd::Demo { dir } => demo(&dir)?,
        Cmd::Run {
            mountpoint,
            name,
            detach,
            cmd,
        } => {
            let code = run_session(mountpoint.as_deref(), name, detach, cmd)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Checkpoint {
            mountpoint,
            session,
            stop,
            kill,
            allow_outside,
            name,
        } => {
            let (mp, store) = mounts::resolve(mountpoint.as_deref())?;
            mounts::require_live(&mp, &store)?;
            let allow_outside = allow_outside
                .iter()
                .map(|p| mounts::absolute(p))
                .collect::<Result<Vec<_>>>()?;
            let s = pick_session(&store, &mp, session.as_deref())?;
            if session::state(&s) == session::State::MountLost {
                bail!(
                    "session '{}' lost its files: the daemon that served {} died; its program \
                     runs on without them and cannot be checkpointed (restore a checkpoint, \
                     or end it: kill {})",
                    s.name,
                    s.mountpoint.display(),
                    s.pid
                );
            }
            let after = if kill {
                "kill"
            } else if stop {
                "stop"
            } else {
                "resume"
            };
            let v = session::request_checkpoint(
                &store,
                &s.name,
                &session::CheckpointRequest {
                    name: name.clone(),
                    after: after.into(),
                    kind: "checkpoint".into(),
                    allow_outside,
                },
            )?;
            // When the command returns the program is gone: a restore right after it must
            // not find the session still running (it would take over its name and its
            // place, and keep its state as an automatic checkpoint first).
            if kill && !session::wait_gone(s.pid, std::time::Duration::from_secs(10)) {
                eprintln!(
                    "forkpoint: session '{}' (pid {}) has not ended yet",
                    s.name, s.pid
                );
            }
            let delta = match v["delta_depth"].as_u64() {
                Some(d) if d > 0 => format!(" (stored as a delta, {d} deep)"),
                _ => String::new(),
            };
            println!(
                "checkpoint '{name}' of session {} is #{}: downtime {:.1} ms, total {:.1} ms (dump {:.1}, hand-off {:.1}), image {} bytes{delta}, {} new after dedup, {} pages unchanged since the last checkpoint",
                s.name,
                v["cno"],
                v["downtime_us"].as_f64().unwrap_or(0.0) / 1000.0,
                v["total_us"].as_f64().unwrap_or(0.0) / 1000.0,
                v["dump_us"].as_f64().unwrap_or(0.0) / 1000.0,
                v["handoff_us"].as_f64().unwrap_or(0.0) / 1000.0,
                v["image_bytes"],
                v["new_bytes"],
                v["reused_pages"].as_u64().unwrap_or(0)
            );
        }
        Cmd::Restore {
            mountpoint,
            branch,
            detach,
            lazy,
            name,
        } => {
            let code = restore(
                mountpoint.as_deref(),
                branch.as_deref(),
                detach,
                lazy,
                &name,
            )?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Kill {
            mountpoint,
            session,
        } => {
            let (mp, store) = mounts::resolve(mountpoint.as_deref())?;
            let s = pick_session(&store, &mp, session.as_deref())?;
            // The cgroup holds every process of the session; session-init too, so that the
            // session's PID namespace goes with it.
            if let Err(e) = cgroup::kill(&store, &s.name) {
                log::debug!("cgroup kill of {}: {e:#}", s.name);
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if !session::wait_gone(s.pid, std::time::Duration::from_secs(10)) {
                bail!("session '{}' (pid {}) has not ended", s.name, s.pid);
            }
            session::remove_hand_off_files(&store, &s.name);
            println!("killed session {}", s.name);
        }
        Cmd::Ps { mountpoint, json } => {
            let (_, store) = mounts::resolve(mountpoint.as_deref())?;
            if let Some(m) = interrupted_rollback(&store) {
                eprintln!("forkpoint: {m}");
            }
            let list = session::list(&store)?;
            if json {
                let list = list
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s)?;
                        v["state"] = session::state(s).as_str().into();
                        Ok(v)
                    })
                    .collect::<Result<Vec<_>>>()?;
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<12} {:<12} {:>8} {:>6}  {:<10}  COMMAND",
                    "SESSION", "BRANCH", "PID", "MAIN", "STATE"
                );
                for s in list {
                    println!(
                        "{:<12} {:<12} {:>8} {:>6}  {:<10}  {}",
                        s.name,
                        s.branch,
                        s.pid,
                        s.main_pid,
                        session::state(&s).as_str(),
                        // One line per session: a script given with -c may hold newlines.
                        s.argv
                            .join(" ")
                            .chars()
                            .map(|c| if c.is_control() {
                                c.escape_default().to_string()
                            } else {
                                c.to_string()
                            })
                            .collect::<String>()
                    );
                }
            }
        }
        Cmd::SessionInit { spec } => {
            let code = session::session_init(&spec)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Daemon {
            store,
            mount,
            branch,
        } => {
            let ready = std::env::var("FORKPOINT_READY_FD")
                .ok()
                .and_then(|s| s.parse::<i32>().ok())
                // SAFETY: the parent passed us this descriptor number for our exclusive use;
                // nothing else in this process owns it.
                .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
            daemon::run(&store, &mount, &branch, ready)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An error and its causes, `outer: inner: …`, each cause once: many errors name their
/// cause in their own message too (`append to segment DIR: No space left on device`), and
/// printing the chain repeated it.
pub(crate) fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A command's STORE argument, by default the store of the mount that holds the current
/// directory.
fn store_arg(store: Option<PathBuf>) -> Result<PathBuf> {
    match store {
        Some(s) => Ok(s),
        None => match mounts::resolve(None) {
            Ok((_, s)) => Ok(s),
            Err(_) => bail!(
                "no STORE given, and the current directory is not in a forkpoint mount: pass STORE"
            ),
        },
    }
}

fn store_of(mountpoint: Option<&Path>, store: Option<&Path>) -> Result<PathBuf> {
    match store {
        Some(s) => Ok(s.to_path_buf()),
        None => Ok(mounts::resolve(mountpoint)?.1),
    }
}

/// Flushes the kernel's dirty pages of a mount to the daemon, and waits until the daemon has
/// them.
///
/// `syncfs` alone does not wait for FUSE writeback that is still in flight (the kernel only
/// waits when the daemon implements FUSE_SYNCFS, which fuser does not). `fsync` of a file does
/// wait, so every file on the mount that a process (all of them, or `only`) holds open or
/// mapped is fsynced first; closed files were flushed when they were closed.
pub(crate) fn flush_mount(mp: &Path, only: Option<&[i32]>) -> Result<()> {
    let pids: Vec<i32> = match only {
        Some(p) => p.to_vec(),
        None => std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut done = std::collections::HashSet::new();
    for pid in pids {
        for sub in ["fd", "map_files"] {
            let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/{sub}")) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let t = target.to_string_lossy();
                let t = t.strip_suffix(" (deleted)").unwrap_or(&t);
                if !Path::new(t).starts_with(mp) {
                    continue;
                }
                let Ok(f) = std::fs::File::open(e.path()) else {
                    continue;
                };
                let Ok(md) = f.metadata() else { continue };
                if md.is_file() && done.insert(md.ino()) {
                    let _ = f.sync_data();
                }
            }
        }
    }
    syncfs(mp)
}

/// Asks the kernel to write back a mount's dirty pages (see [`flush_mount`]).
pub(crate) fn syncfs(mp: &Path) -> Result<()> {
    let f = std::fs::File::open(mp).with_context(|| format!("open {}", mp.display()))?;
    // The kernel writes back dirty pages before it asks the filesystem; a daemon that does
    // not implement FUSE_SYNCFS answers with an error that changes nothing.
    match nix::unistd::syncfs(&f) {
        Ok(()) | Err(nix::errno::Errno::ENOSYS) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e @ (nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT)) => {
            Err(e).with_context(|| {
                format!(
                    "the writes to {} could not all be stored: the store's disk is or was full, \
                 and some data written to the mount may be lost (free space, then try again)",
                    mp.display()
                )
            })
        }
        Err(e) => Err(e).with_context(|| format!("syncfs {}", mp.display())),
    }
}

/// Is the forkpoint mount at `mp` (of `store`) left over from a daemon that died? `stat` cannot
/// tell: the kernel answers it from its attribute cache for up to the TTL. `statfs` always goes
/// to the daemon, and a dead connection answers ENOTCONN; a store whose control socket refuses
/// connections has no daemon at all (the kernel may not have torn the connection down yet).
fn mount_is_dead(mp: &Path, store: &Path) -> bool {
    if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(mp) {
        return true;
    }
    matches!(daemon::call(store, &daemon::Request::Status), Ok(None))
}

fn check_fuse() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("mounting needs root (or CAP_SYS_ADMIN); run as root");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available");
    }
    Ok(())
}

fn mount(
    store: &Path,
    mountpoint: &Path,
    lower: Option<&Path>,
    branch: &str,
    foreground: bool,
) -> Result<()> {
    let mp = mounts::absolute(mountpoint)?;
    // A mount left by a daemon that died. Clean it up.
    if let Some(m) = mounts::forkpoint_mount_at(&mp)? {
        if !mount_is_dead(&mp, Path::new(&m.source)) {
            bail!(
                "{} is already a forkpoint mount (of {})",
                mp.display(),
                m.source
            );
        }
        nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("clean up stale mount {}", mp.display()))?;
        eprintln!(
            "forkpoint: cleaned up stale mount at {} (its daemon had died)",
            mp.display()
        );
    } else if mounts::is_mountpoint(&mp)? {
        bail!("{} is already a mount point", mp.display());
    }
    match std::fs::metadata(&mp) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => bail!("mountpoint {} is not a directory", mp.display()),
        Err(e) => bail!("mountpoint {}: {e}", mp.display()),
    }
    check_fuse()?;
    let store = mounts::absolute(store)?;
    refuse_overlap(&mp, &store, lower)?;
    if !is_store(&store) {
        if store.exists()
            && std::fs::read_dir(&store)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "{} exists and is not a forkpoint store (no forkpoint.db)",
                store.display()
            );
        }
        if let Some(l) = lower {
            let md =
                std::fs::metadata(l).with_context(|| format!("lower directory {}", l.display()))?;
            if !md.is_dir() {
                bail!("lower directory {} is not a directory", l.display());
            }
        }
        // It was missing or empty: a store that could not be made leaves nothing behind
        // (a retry would take the remains for someone else's directory).
        let existed = store.exists();
        if let Err(e) = Store::create(&store, lower) {
            if existed {
                for e in std::fs::read_dir(&store).into_iter().flatten().flatten() {
                    let _ = std::fs::remove_dir_all(e.path())
                        .or_else(|_| std::fs::remove_file(e.path()));
                }
            } else {
                let _ = std::fs::remove_dir_all(&store);
            }
            return Err(e.into());
        }
        eprintln!("forkpoint: created store {}", store.display());
    } else if let Some(l) = lower {
        let given = l
            .canonicalize()
            .with_context(|| format!("lower directory {}", l.display()))?;
        let s = Store::open_read_only(&store)?;
        let have = s.lower().map(Path::to_path_buf);
        if have.as_deref() != Some(given.as_path()) {
            return Err(forkpoint_fs::StoreError::LowerMismatch {
                store: have.unwrap_or_else(|| PathBuf::from("(none)")),
                given,
            }
            .into());
        }
    }
    // The lower directory the store was made over must still be there: its files would
    // otherwise fail one by one ("Stale file handle") behind a mount that looks fine.
    let catalog =
        forkpoint_fs::catalog::Catalog::open(&store.join(forkpoint_fs::store::DB_FILE), true);
    if let Ok(Some(l)) = catalog.and_then(|c| c.meta("lower")) {
        if !l.is_empty() && !Path::new(&l).is_dir() {
            bail!(
                "the lower directory {l} of the store {} is missing (moved or removed?): put \
                 it back to mount the store",
                store.display()
            );
        }
        if !l.is_empty() {
            refuse_overlap(&mp, &store, Some(Path::new(&l)))?;
        }
    }
    // A running daemon serves every mount of its store.
    let req = daemon::Request::Mount {
        mountpoint: mp.clone(),
        branch: branch.to_string(),
        keep_orphans: false,
    };
    if daemon::call(&store, &req)?.is_some() {
        println!(
            "mounted {} branch {branch} at {}",
            store.display(),
            mp.display()
        );
        return Ok(());
    }
    // Check the branch before starting a daemon for it.
    Store::open_read_only(&store)?.head(branch)?;
    clean_stale_mounts(&store);
    if foreground {
        return daemon::run(&store, &mp, branch, None);
    }
    spawn_daemon(&store, &mp, branch)?;
    println!(
        "mounted {} branch {branch} at {}",
        store.display(),
        mp.display()
    );
    warn_lost_sessions(&store);
    Ok(())
}

/// No daemon serves `store`: mounts of it that are left (a daemon that died, with a branch
/// restored side by side under `STORE/branches/`) answer nothing. Take them away, saying so.
fn clean_stale_mounts(store: &Path) {
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let store = real(store);
    for m in mounts::mounts().unwrap_or_default() {
        if !mounts::is_forkpoint(&m) || real(Path::new(&m.source)) != store {
            continue;
        }
        if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(&m.mountpoint) {
            if nix::mount::umount2(&m.mountpoint, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                eprintln!(
                    "forkpoint: cleaned up stale mount at {} (its daemon had died)",
                    m.mountpoint.display()
                );
            }
        }
    }
}

/// Refuses a mount that would read itself: a lower directory that holds the mountpoint (or
/// lies under it) makes the daemon look up its own mount while serving it, which deadlocks;
/// a store under the mountpoint is hidden by the mount it serves; a store inside the lower
/// directory changes the files the mount promises never to change.
fn refuse_overlap(mp: &Path, store: &Path, lower: Option<&Path>) -> Result<()> {
    // Symbolic links resolved, for a path that may not exist yet (its parent does).
    let real = |p: &Path| -> PathBuf {
        p.canonicalize().unwrap_or_else(|_| {
            match (
                p.parent().and_then(|d| d.canonicalize().ok()),
                p.file_name(),
            ) {
                (Some(d), Some(n)) => d.join(n),
                _ => p.to_path_buf(),
            }
        })
    };
    let (mp, store) = (real(mp), real(store));
    if store.starts_with(&mp) {
        bail!(
            "the store {} is inside the mountpoint {}: the mount would hide it; put it elsewhere",
            store.display(),
            mp.display()
        );
    }
    let Some(lower) = lower else {
        return Ok(());
    };
    let lower = real(lower);
    if mp.starts_with(&lower) || lower.starts_with(&mp) {
        bail!(
            "the lower directory {} and the mountpoint {} overlap: the mount would serve itself \
             (mount it on a directory outside the lower one)",
            lower.display(),
            mp.display()
        );
    }
    if store.starts_with(&lower) {
        let why = format!(
            "the store {} is inside the lower directory {}, which must not change under the \
             mount",
            store.display(),
            lower.display()
        );
        // A store made so by an older build is still mounted (with a word); a new one is not
        // made.
        if forkpoint_fs::store::is_store(&store) {
            eprintln!("forkpoint: warning: {why}: the mount shows the store changing; move it");
        } else {
            bail!("{why}; put the store elsewhere");
        }
    }
    Ok(())
}

/// After a daemon died, the sessions that ran on its mounts go on without their files: say
/// so when the store is mounted again (they cannot be checkpointed; their last checkpoints
/// can be restored).
fn warn_lost_sessions(store: &Path) {
    let lost: Vec<String> = session::list(store)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| session::state(s) == session::State::MountLost)
        .map(|s| format!("{} (pid {})", s.name, s.pid))
        .collect();
    if !lost.is_empty() {
        eprintln!(
            "forkpoint: these sessions lost their files when the daemon died and cannot be \
             checkpointed; restore a checkpoint of theirs or end them: {}",
            lost.join(", ")
        );
    }
}

fn spawn_daemon(store: &Path, mp: &Path, branch: &str) -> Result<()> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    // The write end must survive exec in the daemon.
    nix::fcntl::fcntl(
        &wr,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .context("fcntl")?;
    let log_path = store.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe().context("current exe")?);
    cmd.arg("daemon")
        .arg(store)
        .arg("--mount")
        .arg(mp)
        .arg("--branch")
        .arg(branch)
        .env("FORKPOINT_READY_FD", wr.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start daemon")?;
    drop(wr);
    let mut msg = String::new();
    std::fs::File::from(rd)
        .read_to_string(&mut msg)
        .context("wait for daemon")?;
    let msg = msg.trim();
    if msg == "ok" {
        // The daemon keeps running on its own; do not wait for it.
        std::thread::spawn(move || child.wait());
        return Ok(());
    }
    let _ = child.wait();
    if let Some(e) = msg.strip_prefix("error: ") {
        bail!("{e}");
    }
    bail!(
        "the daemon exited before the mount was ready; see {}",
        log_path.display()
    )
}

fn umount(mountpoint: &Path) -> Result<()> {
    let mp = mounts::absolute(mountpoint)?;
    let Some(m) = mounts::forkpoint_mount_at(&mp)? else {
        if let Some(m) = mounts::orphaned_mount_at(&mp)? {
            // Its store was removed while mounted: nothing is left to commit to. Detaching
            // ends the daemon's connection, and the daemon leaves with its last mount.
            nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("unmount {}", mp.display()))?;
            eprintln!(
                "forkpoint: the store {} of {} was removed while mounted; detached the mount",
                m.source,
                mp.display()
            );
            println!("unmounted {}", mp.display());
            return Ok(());
        }
        bail!("{} is not a forkpoint mount", mp.display());
    };
    let store = PathBuf::from(&m.source);
    let busy: Vec<String> = session::list(&store)?
        .into_iter()
        .filter(|s| s.daemon_mount == mp)
        .map(|s| format!("{} (pid {})", s.name, s.pid))
        .collect();
    if !busy.is_empty() {
        bail!(
            "sessions still run on {}: {}; end them first (`forkpoint checkpoint --kill NAME` \
             keeps their state, `forkpoint kill --session SESSION` does not)",
            mp.display(),
            busy.join(", ")
        );
    }
    let _ = syncfs(&mp);
    match daemon::call(
        &store,
        &daemon::Request::Umount {
            mountpoint: mp.clone(),
        },
    ) {
        Ok(Some(_)) => {}
        Err(_) if mounts::forkpoint_mount_at(&mp)?.is_none() => {
            // The daemon unmounted it and went away before its answer arrived.
        }
        Err(e) => return Err(e.context(format!("unmount {}", mp.display()))),
        Ok(None) => {
            // No daemon answers: the mount is stale. Detach it.
            nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("unmount {}", mp.display()))?;
            eprintln!(
                "forkpoint: {} had no running daemon; detached it",
                mp.display()
            );
        }
    }
    // Wait until the kernel no longer shows the mount.
    for _ in 0..200 {
        if mounts::forkpoint_mount_at(&mp)?.is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The daemon leaves with the store's last mount: wait until it has let go of the store,
    // so that the store can be copied, or the filesystem it is on unmounted, right after.
    let last = !mounts::mounts()?
        .iter()
        .any(|m| m.fstype.starts_with("fuse") && Path::new(&m.source) == store);
    if last && !store_released(&store, std::time::Duration::from_secs(10)) {
        eprintln!(
            "forkpoint: the daemon of {} has not ended yet",
            store.display()
        );
    }
    println!("unmounted {}", mp.display());
    Ok(())
}

/// Waits up to `timeout` for the store's writer (its daemon) to let go of it: its lock file
/// can then be locked; whether it was.
fn store_released(store: &Path, timeout: std::time::Duration) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(store.join("lock")) else {
        return true;
    };
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor `f` owns; it touches no memory.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return true;
        }
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn print_log(store: &Path, json: bool, all: bool) -> Result<()> {
    let s = Store::open_read_only(store)?;
    let (branches, mut cps) = s.catalog(|c| Ok((c.branches()?, c.checkpoints()?)))?;
    // Every fsync of a file on the mount is a commit: a database in the mount makes
    // thousands. What a user names (snapshots, checkpoints) and the branch heads are listed;
    // the rest are counted.
    let before = cps.len();
    if !all {
        cps.retain(|cp| cp.name.is_some() || branches.iter().any(|b| b.head == cp.cno));
    }
    let hidden = before - cps.len();
    // Where the store's daemon serves which branch (none without a daemon).
    let mounts: Vec<(String, String)> = daemon::call(store, &daemon::Request::Status)
        .ok()
        .flatten()
        .and_then(|v| v["mounts"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            Some((
                m["branch"].as_str()?.to_string(),
                m["mountpoint"].as_str()?.to_string(),
            ))
        })
        .collect();
    if json {
        let mounts: Vec<serde_json::Value> = mounts
            .iter()
            .map(|(b, p)| serde_json::json!({"branch": b, "mountpoint": p}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "branches": branches,
                "checkpoints": cps,
                "unlisted_commits": hidden,
                "mounts": mounts,
            }))?
        );
        return Ok(());
    }
    for b in &branches {
        let at: Vec<&str> = mounts
            .iter()
            .filter(|(br, _)| *br == b.name)
            .map(|(_, p)| p.as_str())
            .collect();
        if at.is_empty() {
            println!("branch {} (head #{})", b.name, b.head);
        } else {
            println!(
                "branch {} (head #{}), mounted at {}",
                b.name,
                b.head,
                at.join(", ")
            );
        }
    }
    for cp in cps.iter().rev() {
        let heads: Vec<&str> = branches
            .iter()
            .filter(|b| b.head == cp.cno)
            .map(|b| b.name.as_str())
            .collect();
        let marker = if heads.is_empty() {
            String::new()
        } else {
            format!(" <- {}", heads.join(", "))
        };
        println!(
            "* #{:<5} {} {:<10} {:<10} {}{}{}",
            cp.cno,
            fmt_time(cp.time),
            cp.branch,
            cp.kind.as_str(),
            cp.name
                .as_deref()
                .map(|n| format!("'{n}'"))
                .unwrap_or_default(),
            cp.parent
                .map(|p| format!(" (parent #{p})"))
                .unwrap_or_default(),
            marker
        );
    }
    if hidden > 0 {
        println!("({hidden} unnamed commits not listed; --all lists them)");
    }
    Ok(())
}

fn demo(dir: &Path) -> Result<()> {
    check_fuse()?;
    let dir = mounts::absolute(dir)?;
    let store = dir.join("store");
    let lower = dir.join("lower");
    let mnt = dir.join("mnt");
    // Made anew, so only a directory that holds nothing but an earlier demo is cleaned.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let names: Vec<std::ffi::OsString> = rd.flatten().map(|e| e.file_name()).collect();
        let own = names
            .iter()
            .all(|n| n == "store" || n == "lower" || n == "mnt");
        let store_ok = !store.exists() || store.join(forkpoint_fs::store::DB_FILE).exists();
        if !own || !store_ok {
            bail!(
                "{} holds files of its own: the demo makes its directory anew, so name a new \
                 or empty one (`forkpoint demo DIR`)",
                dir.display()
            );
        }
    }
    if mounts::forkpoint_mount_at(&mnt)?.is_some() {
        umount(&mnt)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clean {}", dir.display()))?;
    }
    std::fs::create_dir_all(&lower)?;
    std::fs::create_dir_all(&mnt)?;
    std::fs::write(
        lower.join("README.txt"),
        "a file from the lower directory\n",
    )?;
    std::fs::write(lower.join("config.ini"), "lr = 0.01\n")?;
    println!("== forkpoint demo in {}", dir.display());
    println!(
        "$ forkpoint mount {} {} --lower {}",
        store.display(),
        mnt.display(),
        lower.display()
    );
    mount(&store, &mnt, Some(&lower), "main", false)?;
    let step = |what: &str| println!("-- {what}");
    step("edit a lower file and create a new one inside the mount");
    std::fs::write(mnt.join("config.ini"), "lr = 0.1\n")?;
    std::fs::write(mnt.join("results.csv"), "epoch,loss\n1,0.9\n")?;
    println!("$ forkpoint snapshot -m {} epoch1", mnt.display());
    syncfs(&mnt)?;
    let v = daemon::call(
        &store,
        &daemon::Request::Snapshot {
            mountpoint: mnt.clone(),
            name: "epoch1".into(),
            auto: false,
        },
    )?
    .context("daemon not running")?;
    println!(
        "snapshot 'epoch1' is checkpoint #{} (took {} us)",
        v["cno"], v["micros"]
    );
    step("keep working: append results, delete the lower README");
    std::fs::write(mnt.join("results.csv"), "epoch,loss\n1,0.9\n2,0.7\n")?;
    std::fs::remove_file(mnt.join("README.txt"))?;
    step("the snapshot is browsable, read-only, under .forkpoint/snapshots/");
    let snap = mnt.join(".forkpoint/snapshots/epoch1");
    println!(
        "live results.csv:     {:?}\nsnapshot results.csv: {:?}\nsnapshot README.txt:  {:?}",
        std::fs::read_to_string(mnt.join("results.csv"))?,
        std::fs::read_to_string(snap.join("results.csv"))?,
        std::fs::read_to_string(snap.join("README.txt"))?
    );
    println!(
        "lower directory untouched: config.ini = {:?}",
        std::fs::read_to_string(lower.join("config.ini"))?
    );
    demo_processes(&store, &mnt)?;
    println!("$ forkpoint umount {}", mnt.display());
    umount(&mnt)?;
    println!("$ forkpoint log --store {}", store.display());
    print_log(&store, false, false)?;
    println!("$ forkpoint verify {}", store.display());
    let r = maint::verify(&*Store::open_read_only(&store)?)?;
    println!(
        "{} objects verified, {} problems",
        r.objects,
        r.problems.len()
    );
    println!("== done; the store stays in {}", store.display());
    Ok(())
}

fn branch_of(store: &Path, mp: &Path) -> Result<String> {
    let v =
        daemon::call(store, &daemon::Request::Status)?.context("no daemon serves this mount")?;
    v["mounts"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["mountpoint"].as_str() == mp.to_str()))
        .and_then(|m| m["branch"].as_str().map(String::from))
        .context("the daemon does not serve this mount")
}

fn run_session(
    mountpoint: Option<&Path>,
    name: Option<String>,
    detach: bool,
    cmd: Vec<String>,
) -> Result<i32> {
    let (mp, store) = mounts::resolve(mountpoint)?;
    mounts::require_live(&mp, &store)?;
    let branch = branch_of(&store, &mp)?;
    if let Some(n) = &name {
        forkpoint_fs::fs::validate_name(n)?;
    }
    let cwd = std::env::current_dir()
        .ok()
        .filter(|c| c.starts_with(&mp))
        .unwrap_or_else(|| mp.clone());
    // Without a name, the first free `sN`; another command starting one at the same moment
    // may take it first, and the next is tried.
    let auto = name.is_none();
    let mut tries = 0;
    let (name, code) = loop {
        let name = name.clone().unwrap_or_else(|| {
            (1..)
                .map(|i| format!("s{i}"))
                .find(|n| !session::name_taken(&store, n))
                .unwrap_or_else(|| "s".into())
        });
        let spec = session::InitSpec {
            store: store.clone(),
            name: name.clone(),
            branch: branch.clone(),
            mountpoint: mp.clone(),
            daemon_mount: mp.clone(),
            cwd: cwd.clone(),
            argv: cmd.clone(),
            restore: None,
            restored_from: None,
            lazy: false,
        };
        match session::start(&spec, detach, None) {
            Err(e) if auto && tries < 100 && e.is::<session::NameTaken>() => {
                tries += 1;
            }
            r => break (name, r?),
        }
    };
    if detach {
        println!(
            "session {name} started; output in {}",
            store
                .join("sessions")
                .join(&name)
                .join("output.log")
                .display()
        );
    }
    Ok(code)
}

fn pick_session(store: &Path, mp: &Path, name: Option<&str>) -> Result<session::SessionInfo> {
    let list = session::list(store)?;
    if let Some(n) = name {
        return list
            .into_iter()
            .find(|s| s.name == n)
            .with_context(|| format!("no running session '{n}'"));
    }
    let mut here: Vec<_> = list.into_iter().filter(|s| s.daemon_mount == mp).collect();
    match here.len() {
        0 => bail!("no running session on {}", mp.display()),
        1 => Ok(here.remove(0)),
        _ => bail!("several sessions run on {}; pass --session", mp.display()),
    }
}

/// `restore SNAPSHOT` without `--branch`: the mount's files go back to the snapshot (as
/// `zfs rollback` does), after what they are now is kept as an automatic snapshot. There are
/// no processes to restore: refused while a session runs on the mount, whose files would
/// change under it.
fn rollback_files(mp: &Path, store: &Path, cno: u64, name: &str, auto: &str) -> Result<i32> {
    let running: Vec<String> = session::list(store)?
        .into_iter()
        .filter(|s| s.daemon_mount == mp)
        .map(|s| s.name)
        .collect();
    if !running.is_empty() {
        bail!(
            "'{name}' is a filesystem snapshot without processes, and sessions run on {}: {}; \
             their files would change under them (checkpoint or end them first)",
            mp.display(),
            running.join(", ")
        );
    }
    keep_files(mp, store, auto)?;
    eprintln!("forkpoint: the state before the rollback is kept as '{auto}'");
    roll_back(mp, store, cno)?;
    println!("rolled the files of {} back to '{name}'", mp.display());
    Ok(0)
}

/// Keeps the mount's files as they are now as the automatic snapshot `auto` (before a
/// rollback); returns its checkpoint number.
fn keep_files(mp: &Path, store: &Path, auto: &str) -> Result<Option<u64>> {
    flush_mount(mp, None)?;
    let v = daemon::call(
        store,
        &daemon::Request::Snapshot {
            mountpoint: mp.to_path_buf(),
            name: auto.to_string(),
            auto: true,
        },
    )?
    .context("no daemon serves this mount")?;
    Ok(v["cno"].as_u64())
}

/// Held (a write lock on `STORE/restore.lock`) while a rollback changes a store's mounts;
/// released when dropped.
///
/// While held, the file names the rollback (`PID AUTO MOUNTPOINT`): a rollback killed with
/// SIGKILL, which nothing can hold off, leaves it, and the next one to take the lock (or
/// `ps`) says where the program it stopped is kept.
struct RestoreLock(std::fs::File);

impl Drop for RestoreLock {
    fn drop(&mut self) {
        // Ended (done or undone): nothing to tell the next one.
        let _ = self.0.set_len(0);
    }
}

/// What an interrupted rollback left in `STORE/restore.lock`: a line for the user, if its
/// process is gone and its automatic checkpoint exists (taken before it stopped anything).
fn interrupted_rollback(store: &Path) -> Option<String> {
    interrupted_rollback_in(
        store,
        &std::fs::read_to_string(store.join("restore.lock")).ok()?,
    )
}

/// [`interrupted_rollback`] with the lock file's `text` (read through the holder's own
/// descriptor: closing another one would drop its POSIX lock).
fn interrupted_rollback_in(store: &Path, text: &str) -> Option<String> {
    let mut f = text.trim().splitn(3, ' ');
    let (pid, auto, mp) = (f.next()?.parse::<i32>().ok()?, f.next()?, f.next()?);
    if session::alive(pid) {
        return None;
    }
    // A session runs there: the killed command had started it (a detached restore's
    // session goes on by itself).
    let running = session::list(store).unwrap_or_default();
    if running.iter().any(|s| s.daemon_mount == Path::new(mp)) {
        return None;
    }
    let kept = Store::open_read_only(store).ok()?.find(auto).ok()?;
    Some(if kept.image.is_some() {
        format!(
            "a rollback of {mp} was killed half way: the program it stopped is kept as \
             '{auto}' (`forkpoint restore -m {mp} {auto}` brings it back)"
        )
    } else {
        format!(
            "a rollback of {mp} was killed half way: the files it left are kept as '{auto}' \
             (`forkpoint restore -m {mp} {auto}` puts them back)"
        )
    })
}

impl RestoreLock {
    /// Names the rollback in progress (see the type).
    fn note(&self, auto: &str, mp: &Path) {
        use std::os::unix::fs::FileExt;
        let _ = self.0.set_len(0);
        let line = format!("{} {auto} {}\n", std::process::id(), mp.display());
        let _ = self.0.write_all_at(line.as_bytes(), 0);
    }

    /// Waits (up to two minutes, saying so after a second) for another rollback to end.
    fn take(store: &Path) -> Result<RestoreLock> {
        let path = store.join("restore.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let t = std::time::Instant::now();
        let mut said = false;
        loop {
            // A POSIX record lock, not flock: it belongs to this process, so the session
            // a restore forks does not inherit it (and hold it for as long as it runs).
            // SAFETY: `fl` is a plain C struct, zeroed then filled; F_SETLK reads it, on a
            // descriptor `f` owns.
            let r = unsafe {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_WRLCK as libc::c_short;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl)
            };
            if r == 0 {
                let mut text = vec![0u8; 4096];
                let n = std::os::unix::fs::FileExt::read_at(&f, &mut text, 0).unwrap_or(0);
                if let Some(m) =
                    interrupted_rollback_in(store, &String::from_utf8_lossy(&text[..n]))
                {
                    eprintln!("forkpoint: {m}");
                }
                return Ok(RestoreLock(f));
            }
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(e).with_context(|| format!("lock {}", path.display()));
            }
            if !said && t.elapsed() > std::time::Duration::from_secs(1) {
                eprintln!("forkpoint: waiting for another restore of this store to end");
                said = true;
            }
            if t.elapsed() > std::time::Duration::from_secs(120) {
                bail!(
                    "another restore of this store has not ended in 2 minutes; nothing was changed"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Moves the mount's branch back to checkpoint `cno` (the daemon invalidates the kernel's
/// caches of the mount).
fn roll_back(mp: &Path, store: &Path, cno: u64) -> Result<()> {
    daemon::call(
        store,
        &daemon::Request::Rollback {
            mountpoint: mp.to_path_buf(),
            cno,
        },
    )?
    .context("no daemon serves this mount")?;
    Ok(())
}

fn restore(
    mountpoint: Option<&Path>,
    branch: Option<&str>,
    detach: bool,
    lazy: bool,
    name: &str,
) -> Result<i32> {
    restore_inner(mountpoint, branch, detach, lazy, name, None)
}

/// [`restore`]; `recovering`: this brings back session SESSION, which a failed rollback
/// stopped, from the automatic checkpoint that rollback just made (nothing else runs on the
/// mount, and its files are that checkpoint's already: no new automatic checkpoint, no
/// second try).
fn restore_inner(
    mountpoint: Option<&Path>,
    branch: Option<&str>,
    detach: bool,
    lazy: bool,
    name: &str,
    recovering: Option<&str>,
) -> Result<i32> {
    let t0 = std::time::Instant::now();
    let (mp, store) = mounts::resolve(mountpoint)?;
    mounts::require_live(&mp, &store)?;
    // One rollback of a store at a time: two at once each stopped the other's program, and
    // the one that failed put the files back under the other's. (A restore bringing back
    // the program a failed rollback stopped runs under that rollback's lock.)
    let mut lock = if branch.is_none() && recovering.is_none() {
        Some(RestoreLock::take(&store)?)
    } else {
        None
    };
    let ro = Store::open_read_only(&store)?;
    let cp = ro.find(name)?;
    // Its files must be there to go back to: checked before a rollback stops anything.
    forkpoint_fs::tree::get_root(&ro, &cp.root)
        .with_context(|| format!("the files of '{name}' cannot be read; nothing was changed"))?;
    // The automatic checkpoint of an in-place restore gets a name of its own, also when
    // rollbacks follow each other within a second.
    let ts = fmt_time(forkpoint_now()).replace([' ', ':'], "-");
    let auto = (1..)
        .map(|n| match n {
            1 => format!("auto-{ts}"),
            n => format!("auto-{ts}-{n}"),
        })
        .find(|a| ro.find(a).is_err())
        .unwrap_or_else(|| format!("auto-{ts}"));
    if let Some(l) = &lock {
        l.note(&auto, &mp);
    }
    let Some(image) = cp.image else {
        return match branch {
            Some(new) => bail!(
                "'{name}' is a filesystem snapshot without processes: `forkpoint branch {new} \
                 --from {name}` makes a branch of its files, and `forkpoint mount {} DIR \
                 --branch {new}` serves it",
                store.display()
            ),
            None => {
                let _deferred = session::DeferInterrupts::new();
                rollback_files(&mp, &store, cp.cno, name, &auto)
            }
        };
    };
    // Refuse a corrupt or incomplete image before anything changes: read, checked and
    // resolved here, once; the session gets it, and the open store, by fork.
    let (si, tree, depth) = session::load_image_chain(&ro, &image)?;
    // Its paths name the mount where the program saw it: the restored session sees the
    // mount it is served from there, in its own mount namespace (a bind), wherever the
    // store is mounted now. That path must be a directory to bind on.
    let seen_at = if si.mountpoint.as_os_str().is_empty() {
        mp.clone()
    } else {
        si.mountpoint.clone()
    };
    if seen_at != mp && !seen_at.is_dir() {
        bail!(
            "checkpoint '{name}' was taken with the store mounted at {}, where the program \
             finds its files by path, and that is no directory now: make it (`mkdir -p {}`) \
             or mount the store there to restore it; nothing was changed",
            seen_at.display(),
            seen_at.display()
        );
    }
    // An inconsistent image, or a file outside the mount that changed since the checkpoint,
    // fails the restore: say so before a rollback stops the program that runs now. Files
    // under the mount are the snapshot's (where the program sees them may hold another
    // mount, or nothing, on this side).
    let recreated: Vec<PathBuf> = si.own.iter().map(|(p, _)| p.clone()).collect();
    forkpoint::engine::restore::precheck_tree(&tree, &seen_at, &recreated)
        .with_context(|| format!("checkpoint '{name}' cannot be restored; nothing was changed"))?;
    // Files outside the mount it held open are reopened by path: the same, unchanged.
    for f in &si.outside {
        f.check().map_err(|why| {
            anyhow::anyhow!(
                "checkpoint '{name}' cannot be restored; nothing was changed: {}, outside the \
                 mount and open in the program, changed since the checkpoint ({why}); a file \
                 that may move on is named at the checkpoint with --allow-outside",
                f.path.display()
            )
        })?;
    }
    log::debug!("restore: image checked at {:?}", t0.elapsed());
    // From here on the restore changes things: Ctrl-C half way would leave a program stopped
    // and none started, or a branch nothing runs on. It finishes, or undoes itself, first.
    // (The restore that brings back a program a failed rollback stopped runs inside that
    // rollback's deferral.)
    let deferred = recovering.is_none().then(session::DeferInterrupts::new);
    let now_mono = session::clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
    let now_boot = session::clock_ns(nix::time::ClockId::CLOCK_BOOTTIME);
    let offsets = Some((si.monotonic_ns - now_mono, si.boottime_ns - now_boot));
    // The branch this restore made (and its hidden mount), dropped again if it fails.
    let mut made: Option<(String, PathBuf)> = None;
    // The running session's state went to the automatic checkpoint with its processes.
    let mut auto_has_processes = false;
    // The name of the session a rollback stopped (its program comes back under it if the
    // restore fails).
    let mut stopped: Option<String> = None;
    let (spec, undo) = match branch {
        Some(new) => {
            let v = daemon::call(
                &store,
                &daemon::Request::Branch {
                    name: new.to_string(),
                    from: Some(name.to_string()),
                },
            )?
            .context("no daemon serves this mount")?;
            let _ = v;
            let hidden = store.join("branches").join(new);
            let mounted = std::fs::create_dir_all(&hidden)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    daemon::call(
                        &store,
                        &daemon::Request::Mount {
                            mountpoint: hidden.clone(),
                            branch: new.to_string(),
                            keep_orphans: true,
                        },
                    )?
                    .context("no daemon serves this mount")
                });
            if let Err(e) = mounted {
                drop_failed_branch(&store, new, None);
                return Err(e);
            }
            made = Some((new.to_string(), hidden.clone()));
            (
                session::InitSpec {
                    store: store.clone(),
                    name: new.to_string(),
                    branch: new.to_string(),
                    mountpoint: seen_at.clone(),
                    daemon_mount: hidden,
                    cwd: seen_at.clone(),
                    argv: si.argv.clone(),
                    restore: None,
                    restored_from: Some(name.to_string()),
                    lazy: false,
                },
                None,
            )
        }
        None => {
            let cur = branch_of(&store, &mp)?;
            // Keep what the rollback leaves: processes too, if a session runs here.
            let running: Vec<_> = session::list(&store)?
                .into_iter()
                .filter(|s| s.daemon_mount == mp)
                .collect();
            let mut kept = None;
            let mut also = Vec::new();
            for (i, s) in running.iter().enumerate() {
                // Every session on the mount keeps its state, each under a name of its own.
                let name = if i == 0 {
                    auto.clone()
                } else {
                    format!("{auto}-{}", s.name)
                };
                if i > 0 {
                    also.push(name.clone());
                }
                let req = session::CheckpointRequest {
                    name,
                    after: "kill".into(),
                    kind: "auto".into(),
                    // Keeping the state that is left matters more than rolling back what it
                    // wrote outside the mount.
                    allow_outside: vec![PathBuf::from("/")],
                };
                match session::request_checkpoint(&store, &s.name, &req) {
                    Ok(v) => {
                        kept = v["cno"].as_u64();
                        // Brought back after a failure only when it ran alone: with
                        // several, the files of the last one's checkpoint are the ones kept.
                        auto_has_processes |= i == 0 && running.len() == 1;
                    }
                    Err(e) => {
                        eprintln!("forkpoint: could not checkpoint session {} before the rollback ({e:#}); keeping its files only", s.name);
                        let _ = cgroup::kill(&store, &s.name);
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(s.pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            log::debug!(
                "restore: state before the rollback kept at {:?}",
                t0.elapsed()
            );
            // Killed at their checkpoints: a large program takes a while to be torn down,
            // and a session still there would refuse its name to the restore below.
            for s in &running {
                if !session::wait_gone(s.pid, std::time::Duration::from_secs(10)) {
                    let _ = cgroup::kill(&store, &s.name);
                    session::wait_gone(s.pid, std::time::Duration::from_secs(5));
                }
            }
            if kept.is_none() && recovering.is_none() {
                kept = keep_files(&mp, &store, &auto)?;
            }
            log::debug!("restore: sessions gone at {:?}", t0.elapsed());
            if recovering.is_none() {
                eprintln!("forkpoint: the state before the rollback is kept as '{auto}'");
            }
            for a in &also {
                eprintln!("forkpoint: and of another session on the mount as '{a}'");
            }
            roll_back(&mp, &store, cp.cno)?;
            // The program gets its own name back (recorded with the checkpoint), unless a
            // session elsewhere goes by it now; else the name of the session it replaces.
            let own = cp
                .note
                .as_deref()
                .and_then(|n| n.strip_prefix("session "))
                .map(str::to_string)
                .filter(|n| {
                    running.iter().any(|s| &s.name == n) || !session::name_taken(&store, n)
                });
            stopped = running.first().map(|s| s.name.clone());
            let sname = recovering
                .map(String::from)
                .or(own)
                .or_else(|| stopped.clone())
                .unwrap_or_else(|| cur.clone());
            (
                session::InitSpec {
                    store: store.clone(),
                    name: sname,
                    branch: cur,
                    mountpoint: seen_at.clone(),
                    daemon_mount: mp.clone(),
                    cwd: seen_at.clone(),
                    argv: si.argv.clone(),
                    restore: None,
                    restored_from: Some(name.to_string()),
                    lazy: false,
                },
                kept,
            )
        }
    };
    // FORKPOINT_LAZY_RESTORE=1 makes every restore lazy.
    let lazy = lazy || std::env::var("FORKPOINT_LAZY_RESTORE").is_ok_and(|v| v == "1");
    let spec = session::InitSpec {
        restore: Some(cp.cno),
        lazy,
        ..spec
    };
    log::debug!("restore: session starts at {:?}", t0.elapsed());
    let pre = session::Preloaded {
        store: ro,
        image,
        si,
        tree,
        depth,
    };
    let said_interrupted = || {
        if deferred.as_ref().and_then(|d| d.caught()).is_some() {
            eprintln!(
                "forkpoint: interrupted: the restore was taken to its end first (stopped half \
                 way it would have lost the program)"
            );
        }
    };
    // The rollback lock goes once the program runs: a foreground one may run for as long as
    // it likes, and the next rollback takes it over as it would a detached one. Until then
    // no other rollback can come between, so a failure undoes exactly what this one did.
    let locked = lock.is_some();
    let mut release = || drop(lock.take());
    let started = session::start_with(&spec, detach, offsets, Some(pre), Some(&mut release));
    match started {
        Ok(code) => {
            if detach {
                println!(
                    "restored '{name}' as session {} on branch {}",
                    spec.name, spec.branch
                );
            }
            said_interrupted();
            Ok(code)
        }
        Err(e) => {
            said_interrupted();
            // Leave the branches as they were before the restore: a new one goes again.
            if let Some((b, hidden)) = made {
                drop_failed_branch(&store, &b, Some(&hidden));
            }
            // A rollback whose program ran before it failed is not undone (it is not this
            // restore's any more: another rollback may have taken the mount).
            let ours = !locked || lock.is_some();
            if let Some(prev) = undo.filter(|_| ours) {
                let _ = daemon::call(
                    &store,
                    &daemon::Request::Rollback {
                        mountpoint: mp.clone(),
                        cno: prev,
                    },
                );
                // The program the rollback stopped comes back from the state it left, once
                // (its files are back already; restoring it again makes no new checkpoint).
                if auto_has_processes && recovering.is_none() {
                    let back_as = stopped.as_deref().unwrap_or(&spec.name);
                    match restore_inner(Some(&mp), None, true, false, &auto, Some(back_as)) {
                        Ok(_) => eprintln!(
                            "forkpoint: the restore failed; the program that ran before is running again, from '{auto}'"
                        ),
                        Err(again) => eprintln!(
                            "forkpoint: the restore failed, and so did starting the program that ran before from '{auto}': {again:#}"
                        ),
                    }
                }
            }
            Err(e)
        }
    }
}

/// Unmounts and removes branch `name`, made by a restore that failed. What cannot be
/// undone is said, not hidden.
fn drop_failed_branch(store: &Path, name: &str, hidden: Option<&Path>) {
    if let Some(h) = hidden {
        let umounted = daemon::call(
            store,
            &daemon::Request::Umount {
                mountpoint: h.to_path_buf(),
            },
        );
        if let Err(e) = umounted {
            eprintln!("forkpoint: could not unmount {}: {e:#}", h.display());
            return;
        }
        let _ = std::fs::remove_dir(h);
    }
    let dropped = daemon::call(
        store,
        &daemon::Request::DropBranch {
            name: name.to_string(),
        },
    );
    if let Err(e) = dropped {
        eprintln!("forkpoint: branch '{name}' is left in the store: {e:#}");
    }
}

/// The process half of the demo: a program and its files, checkpointed, rolled back, branched.
fn demo_processes(store: &Path, mnt: &Path) -> Result<()> {
    let step = |what: &str| println!("-- {what}");
    let last = |p: &Path| -> String {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    };
    let wait = |ms: u64| std::thread::sleep(std::time::Duration::from_millis(ms));
    let prog = "import os, time\nfor fd in range(3, 256):\n    try: os.close(fd)\n    except OSError: pass\nn = 0\nwhile True:\n    n += 1\n    with open('counter.txt', 'a') as f: f.write('%d\\n' % n)\n    time.sleep(0.05)\n";
    std::fs::write(mnt.join("counter.py"), prog)?;
    step("run a program inside the mount: it counts in memory and appends each value to a file");
    println!(
        "$ forkpoint run -m {} --detach -- python3 counter.py",
        mnt.display()
    );
    let spec = session::InitSpec {
        store: store.to_path_buf(),
        name: "demo".into(),
        branch: "main".into(),
        mountpoint: mnt.to_path_buf(),
        daemon_mount: mnt.to_path_buf(),
        cwd: mnt.to_path_buf(),
        argv: vec!["python3".into(), "counter.py".into()],
        restore: None,
        restored_from: None,
        lazy: false,
    };
    session::start(&spec, true, None)?;
    wait(1500);
    println!("$ forkpoint checkpoint -m {} warm", mnt.display());
    let v = session::request_checkpoint(
        store,
        "demo",
        &session::CheckpointRequest {
            name: "warm".into(),
            after: "resume".into(),
            kind: "checkpoint".into(),
            allow_outside: Vec::new(),
        },
    )?;
    println!(
        "checkpoint 'warm': downtime {:.1} ms, image {} bytes; the counter file ends at {}",
        v["downtime_us"].as_f64().unwrap_or(0.0) / 1000.0,
        v["image_bytes"],
        last(&mnt.join(".forkpoint/snapshots/warm/counter.txt"))
    );
    wait(1500);
    println!(
        "the program went on: counter file ends at {}",
        last(&mnt.join("counter.txt"))
    );
    println!("$ forkpoint restore -m {} --detach warm", mnt.display());
    restore(Some(mnt), None, true, false, "warm")?;
    wait(300);
    println!(
        "rolled back, and counting on from the checkpoint: {}",
        last(&mnt.join("counter.txt"))
    );
    println!(
        "$ forkpoint restore -m {} --detach --branch experiment warm",
        mnt.display()
    );
    restore(Some(mnt), Some("experiment"), true, false, "warm")?;
    wait(1000);
    let exp = store.join("branches/experiment");
    println!(
        "two sessions run side by side from one checkpoint: main at {}, experiment at {}",
        last(&mnt.join("counter.txt")),
        last(&exp.join("counter.txt"))
    );
    for s in session::list(store)? {
        let _ = cgroup::kill(store, &s.name);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..200 {
        if session::list(store)?.is_empty() {
            break;
        }
        wait(10);
    }
    umount(&exp)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A cause a message already names is not printed again; other causes are.
    #[test]
    fn an_error_prints_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = anyhow::Error::new(forkpoint_fs::StoreError::Io {
            op: "append to segment",
            path: "/s".into(),
            source: io,
        })
        .context("checkpoint 'c1'");
        assert_eq!(
            super::render_error(&e),
            "checkpoint 'c1': append to segment /s: No space left on device (os error 28)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::render_error(&e), "outer: inner");
    }
}
