//! SysV IPC objects of a session's IPC namespace: shared memory segments (with their
//! contents), semaphore sets (with their values) and message queues (with their messages),
//! recorded at a checkpoint and recreated, with the same ids, before a restore's processes.
//!
//! The session's init shares the program's IPC namespace, so `/proc/sysvipc` lists exactly
//! the program's objects. Contents are read without disturbing the program: a segment is
//! attached read-only by init, messages are copied with `MSG_COPY`. Ids are kept by writing
//! the next id to `/proc/sys/kernel/{shm,sem,msg}_next_id` before each creation.

use forkpoint::engine::image::{ImageMemory, PAGE_SIZE};
use forkpoint::engine::ChunkSource;
use serde::{Deserialize, Serialize};

/// Every SysV object of an IPC namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvImage {
    pub shm: Vec<ShmSegment>,
    pub sem: Vec<SemSet>,
    pub msg: Vec<MsgQueue>,
}

/// What every SysV object has: key, id, owner and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcOwner {
    pub key: i32,
    pub id: i32,
    /// Permission bits and flags as `/proc/sysvipc` shows them (octal there).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A shared memory segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSegment {
    pub owner: IpcOwner,
    pub size: u64,
    /// Page runs at offsets in the segment; all-zero pages are not stored.
    pub contents: ImageMemory,
}

/// A semaphore set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSet {
    pub owner: IpcOwner,
    pub values: Vec<u16>,
}

/// A message queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgQueue {
    pub owner: IpcOwner,
    /// `msg_qbytes`: the most bytes the queue may hold.
    pub qbytes: u64,
    /// (type, bytes), oldest first.
    pub messages: Vec<(i64, Vec<u8>)>,
}

/// `SHM_DEST` in a segment's mode: removed once the last process detaches.
const SHM_DEST: u32 = 0o1000;

fn rows(kind: &str) -> Result<Vec<Vec<String>>, String> {
    let path = format!("/proc/sysvipc/{kind}");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {path}: {e}")),
    };
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect())
}

fn field<T: std::str::FromStr>(row: &[String], i: usize, what: &str) -> Result<T, String> {
    row.get(i)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/sysvipc: bad {what} in {row:?}"))
}

/// key, id, perms, ..., uid, gid at the given columns.
fn owner(row: &[String], uid_col: usize) -> Result<IpcOwner, String> {
    Ok(IpcOwner {
        key: field(row, 0, "key")?,
        id: field(row, 1, "id")?,
        mode: u32::from_str_radix(row.get(2).map(String::as_str).unwrap_or(""), 8)
            .map_err(|_| format!("/proc/sysvipc: bad perms in {row:?}"))?,
        uid: field(row, uid_col, "uid")?,
        gid: field(row, uid_col + 1, "gid")?,
    })
}

fn os_err(what: String) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Records every SysV object of the caller's IPC namespace (call it while the program is
/// stopped).
pub fn dump() -> Result<SysvImage, String> {
    let mut img = SysvImage::default();
    // key shmid perms size cpid lpid nattch uid gid ...
    for row in rows("shm")? {
        let owner = owner(&row, 7)?;
        let size: u64 = field(&row, 3, "size")?;
        img.shm.push(ShmSegment {
            contents: read_segment(owner.id, size)?,
            owner,
            size,
        });
    }
    // key semid perms nsems uid gid ...
    for row in rows("sem")? {
        let owner = owner(&row, 4)?;
        let nsems: usize = field(&row, 3, "nsems")?;
        let mut values = vec![0u16; nsems];
        // SAFETY: GETALL writes `nsems` u16 values into `values`, which holds that many.
        let r = unsafe { libc::semctl(owner.id, 0, libc::GETALL, values.as_mut_ptr()) };
        if r < 0 {
            return Err(os_err(format!("read SysV semaphore set {}", owner.id)));
        }
        img.sem.push(SemSet { owner, values });
    }
    // key msqid perms cbytes qnum lspid lrpid uid gid ...
    for row in rows("msg")? {
        let owner = owner(&row, 7)?;
        let cbytes: usize = field(&row, 3, "cbytes")?;
        let qnum: usize = field(&row, 4, "qnum")?;
        // SAFETY: an all-zero msqid_ds is valid; IPC_STAT fills it.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one msqid_ds into `ds`.
        if unsafe { libc::msgctl(owner.id, libc::IPC_STAT, &mut ds) } < 0 {
            return Err(os_err(format!("stat SysV message queue {}", owner.id)));
        }
        let mut messages = Vec::with_capacity(qnum);
        // A message is at most the queue's bytes; the buffer starts with its type.
        let mut buf = vec![0u8; 8 + cbytes.max(1)];
        for i in 0..qnum {
            // SAFETY: msgrcv writes the type (8 bytes) and at most `cbytes` bytes into `buf`,
            // which holds 8 + cbytes; MSG_COPY copies message `i` without removing it.
            let n = unsafe {
                libc::msgrcv(
                    owner.id,
                    buf.as_mut_ptr().cast(),
                    cbytes.max(1),
                    i as libc::c_long,
                    libc::MSG_COPY | libc::IPC_NOWAIT | libc::MSG_NOERROR,
                )
            };
            if n < 0 {
                return Err(os_err(format!(
                    "copy message {i} of SysV message queue {} (MSG_COPY)",
                    owner.id
                )));
            }
            let mut t = [0u8; 8];
            t.copy_from_slice(&buf[..8]);
            messages.push((i64::from_ne_bytes(t), buf[8..8 + n as usize].to_vec()));
        }
        img.msg.push(MsgQueue {
            owner,
            qbytes: ds.msg_qbytes as u64,
            messages,
        });
    }
    Ok(img)
}

/// Reads a segment through a read-only attachment of our own: as a file (through
/// `/proc/self/map_files`), skipping holes, so that reading a sparse segment does not
/// allocate it; through the memory if that link cannot be opened.
fn read_segment(id: i32, size: u64) -> Result<ImageMemory, String> {
    // SAFETY: shmat maps the segment somewhere free (address 0) read-only; we read it only
    // within `size` bytes and detach it before returning.
    let p = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if p as isize == -1 {
        return Err(os_err(format!("attach SysV segment {id}")));
    }
    let start = p as u64;
    let link = format!(
        "/proc/self/map_files/{start:x}-{:x}",
        start + size.div_ceil(PAGE_SIZE) * PAGE_SIZE
    );
    let mem = match std::fs::File::open(&link) {
        Ok(f) => forkpoint::engine::dump::read_sparse(&f, size, &[(0, size)])
            .map_err(|e| format!("read SysV segment {id}: {e}")),
        Err(_) => {
            // SAFETY: the attachment is `size` bytes long (rounded up to pages) and readable.
            let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size as usize) };
            let mut mem = ImageMemory {
                page_size: PAGE_SIZE,
                runs: Vec::new(),
            };
            let whole = (size / PAGE_SIZE * PAGE_SIZE) as usize;
            mem.push_pages(0, &bytes[..whole]);
            if whole < bytes.len() {
                let mut last = bytes[whole..].to_vec();
                last.resize(PAGE_SIZE as usize, 0);
                mem.push_pages(whole as u64, &last);
            }
            Ok(mem)
        }
    };
    // SAFETY: `p` is the attachment made above; nothing refers to it any more.
    unsafe { libc::shmdt(p) };
    mem
}

/// Writes `id` to `/proc/sys/kernel/{kind}_next_id`, so the next object created gets it.
fn next_id(kind: &str, id: i32) -> Result<(), String> {
    let path = format!("/proc/sys/kernel/{kind}_next_id");
    std::fs::write(&path, id.to_string()).map_err(|e| format!("write {path}: {e}"))
}

fn check_id(what: &str, want: i32, got: i32) -> Result<(), String> {
    if got < 0 {
        return Err(os_err(format!("create SysV {what} {want}")));
    }
    if got != want {
        return Err(format!("SysV {what} came back as id {got}, not {want}"));
    }
    Ok(())
}

/// Recreates every object of `img`, with its id, in the caller's (fresh) IPC namespace.
pub fn restore(img: &SysvImage, chunks: &dyn ChunkSource) -> Result<(), String> {
    for s in &img.shm {
        let o = &s.owner;
        next_id("shm", o.id)?;
        // SAFETY: plain syscall on integers.
        let id = unsafe {
            libc::shmget(
                o.key,
                s.size as usize,
                libc::IPC_CREAT | libc::IPC_EXCL | (o.mode & 0o777) as i32,
            )
        };
        check_id("shared memory segment", o.id, id)?;
        write_segment(id, s, chunks)?;
        // SAFETY: an all-zero shmid_ds is valid; IPC_STAT fills it, IPC_SET reads it.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } < 0 {
            return Err(os_err(format!("stat SysV segment {id}")));
        }
        ds.shm_perm.uid = o.uid;
        ds.shm_perm.gid = o.gid;
        ds.shm_perm.mode = (o.mode & 0o777) as _;
        // SAFETY: as above.
        if unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) } < 0 {
            return Err(os_err(format!("set the owner of SysV segment {id}")));
        }
    }
    for s in &img.sem {
        let o = &s.owner;
        next_id("sem", o.id)?;
        // SAFETY: plain syscall on integers.
        let id = unsafe {
            libc::semget(
                o.key,
                s.values.len() as i32,
                libc::IPC_CREAT | libc::IPC_EXCL | (o.mode & 0o777) as i32,
            )
        };
        check_id("semaphore set", o.id, id)?;
        // SAFETY: SETALL reads one u16 per semaphore from `values`, which holds them all.
        if unsafe { libc::semctl(id, 0, libc::SETALL, s.values.as_ptr()) } < 0 {
            return Err(os_err(format!("set the values of SysV semaphore set {id}")));
        }
        // SAFETY: an all-zero semid_ds is valid; IPC_STAT fills it, IPC_SET reads it.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds) } < 0 {
            return Err(os_err(format!("stat SysV semaphore set {id}")));
        }
        ds.sem_perm.uid = o.uid;
        ds.sem_perm.gid = o.gid;
        ds.sem_perm.mode = (o.mode & 0o777) as _;
        // SAFETY: as above.
        if unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds) } < 0 {
            return Err(os_err(format!("set the owner of SysV semaphore set {id}")));
        }
    }
    for q in &img.msg {
        let o = &q.owner;
        next_id("msg", o.id)?;
        // SAFETY: plain syscall on integers.
        let id = unsafe {
            libc::msgget(
                o.key,
                libc::IPC_CREAT | libc::IPC_EXCL | (o.mode & 0o777) as i32,
            )
        };
        check_id("message queue", o.id, id)?;
        // SAFETY: an all-zero msqid_ds is valid; IPC_STAT fills it, IPC_SET reads it.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) } < 0 {
            return Err(os_err(format!("stat SysV message queue {id}")));
        }
        ds.msg_perm.uid = o.uid;
        ds.msg_perm.gid = o.gid;
        ds.msg_perm.mode = (o.mode & 0o777) as _;
        ds.msg_qbytes = q.qbytes as _;
        // SAFETY: as above.
        if unsafe { libc::msgctl(id, libc::IPC_SET, &mut ds) } < 0 {
            return Err(os_err(format!("set the owner of SysV message queue {id}")));
        }
        for (t, data) in &q.messages {
            let mut buf = Vec::with_capacity(8 + data.len());
            buf.extend_from_slice(&t.to_ne_bytes());
            buf.extend_from_slice(data);
            // SAFETY: msgsnd reads the type and `data.len()` bytes from `buf`.
            let r = unsafe { libc::msgsnd(id, buf.as_ptr().cast(), data.len(), libc::IPC_NOWAIT) };
            if r < 0 {
                return Err(os_err(format!(
                    "queue a message on SysV message queue {id}"
                )));
            }
        }
    }
    for kind in ["shm", "sem", "msg"] {
        let _ = next_id(kind, -1);
    }
    Ok(())
}

/// Removes the segments that were removed while attached (`IPC_RMID`), once the restored
/// processes have attached them again.
pub fn remove_destroyed(img: &SysvImage) {
    for s in img.shm.iter().filter(|s| s.owner.mode & SHM_DEST != 0) {
        // SAFETY: plain syscall on integers; a null buffer is allowed for IPC_RMID.
        unsafe { libc::shmctl(s.owner.id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

fn write_segment(id: i32, s: &ShmSegment, chunks: &dyn ChunkSource) -> Result<(), String> {
    // SAFETY: shmat maps the fresh segment somewhere free, writable; we write only within
    // its size and detach it before returning.
    let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if p as isize == -1 {
        return Err(os_err(format!("attach SysV segment {id}")));
    }
    let seg_len = s.size as usize;
    let put = |at: u64, b: &[u8]| -> Result<(), String> {
        let end = (at as usize + b.len()).min(seg_len);
        if at as usize >= end {
            return Ok(());
        }
        // SAFETY: [at, end) lies inside the writable attachment of `seg_len` bytes.
        let dst = unsafe {
            std::slice::from_raw_parts_mut((p as *mut u8).add(at as usize), end - at as usize)
        };
        dst.copy_from_slice(&b[..end - at as usize]);
        Ok(())
    };
    let res = forkpoint::engine::restore::for_each_data_run(&s.contents, Some(chunks), put)
        .map_err(|e| format!("SysV segment {id}: {e}"));
    // SAFETY: `p` is the attachment made above.
    unsafe { libc::shmdt(p) };
    res
}
