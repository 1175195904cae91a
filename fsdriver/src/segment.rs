//! Segment files: append-only logs of framed, content-addressed records.
//!
//! A segment starts with a 16-byte header (`FPSEGMNT`, format version, reserved) and continues
//! with records. Each record is a 48-byte header followed by its payload:
//!
//! | bytes | field                                   |
//! |-------|-----------------------------------------|
//! | 0..4  | magic `FPOB`                            |
//! | 4     | record format version (1)               |
//! | 5     | kind ([`ObjectKind`])                   |
//! | 6..8  | flags, little endian: bit 0 [`FLAG_CRC32C`] |
//! | 8..12 | payload length, little endian           |
//! | 12..16| CRC32C of the payload if bit 0 is set, else 0 |
//! | 16..48| BLAKE3 of the payload (the object's id) |
//!
//! Reads check the payload against the CRC32C (the BLAKE3 for a record written without one),
//! so a flipped bit anywhere in a record is detected and named; `verify` re-hashes every
//! payload with BLAKE3 as well ([`check_record_full`]). BLAKE3 runs at about 1 GB/s per core
//! on 4 KiB chunks here, CRC32C (SSE4.2) at several times that: a restore or a cold read
//! spent most of its time re-hashing. Older builds ignore the flag and the field, and
//! records without them stay valid, so no store format change was needed.
//! Storage goes through [`Storage`], so tests can substitute [`CrashStorage`], which loses
//! every write that was not synced before a simulated crash.

use crate::error::{IoContext, Result, StoreError};
use crate::id::ContentId;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Segment file header magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"FPSEGMNT";
/// Record header magic.
pub const RECORD_MAGIC: &[u8; 4] = b"FPOB";
/// Format version of segments and records.
pub const SEGMENT_VERSION: u32 = 1;
/// Bytes before the first record.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: u64 = 48;
/// Largest payload accepted (checked before anything is allocated).
pub const MAX_OBJECT: usize = 64 << 20;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// File data or process memory.
    Chunk = 1,
    /// An encoded inode.
    Inode = 2,
    /// A radix-tree node (inode table, block maps).
    Node = 3,
    /// A filesystem root (inode table root and counters).
    Root = 4,
    /// A process image.
    Image = 5,
    /// The marker of an intent commit ([`crate::intent`]): never in the index, never
    /// referenced, dropped by gc with the segment it lies in.
    Marker = 6,
}

impl ObjectKind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Chunk,
            2 => Self::Inode,
            3 => Self::Node,
            4 => Self::Root,
            5 => Self::Image,
            6 => Self::Marker,
            _ => return None,
        })
    }
}

/// Where a record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    /// Offset of the record header.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
    pub kind: ObjectKind,
}

impl Loc {
    /// Offset one past the end of the record.
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN + u64::from(self.len)
    }
}

/// Record flag: bytes 12..16 hold the CRC32C of the payload.
pub const FLAG_CRC32C: u16 = 1;

/// Encodes the header of a record of `payload` (whose BLAKE3 is `id`), with its CRC32C.
pub fn encode_header(kind: ObjectKind, id: &ContentId, payload: &[u8]) -> [u8; 48] {
    let mut h = [0u8; 48];
    h[0..4].copy_from_slice(RECORD_MAGIC);
    h[4] = SEGMENT_VERSION as u8;
    h[5] = kind as u8;
    h[6..8].copy_from_slice(&FLAG_CRC32C.to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h[16..48].copy_from_slice(&id.0);
    h
}

/// A decoded record header.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: ObjectKind,
    pub len: u32,
    pub id: ContentId,
    /// The payload's CRC32C, when the record has one.
    pub crc: Option<u32>,
}

/// Decodes a record header; `None` if it is not a valid header.
pub fn decode_header(h: &[u8]) -> Option<RecordHeader> {
    if h.len() < 48 || &h[0..4] != RECORD_MAGIC || u32::from(h[4]) != SEGMENT_VERSION {
        return None;
    }
    let kind = ObjectKind::from_u8(h[5])?;
    let len = u32::from_le_bytes(h[8..12].try_into().ok()?);
    if len as usize > MAX_OBJECT {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[16..48]);
    let flags = u16::from_le_bytes([h[6], h[7]]);
    let crc = (flags & FLAG_CRC32C != 0).then(|| u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
    Some(RecordHeader {
        kind,
        len,
        id: ContentId(id),
        crc,
    })
}

/// The segment file header.
pub fn segment_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h
}

/// One segment file, addressed by offset. Writes are positional so that a torn tail can be
/// overwritten after recovery.
pub trait SegFile: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Writes `bufs` back to back from `off` (one `pwritev` where the file allows).
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut at = off;
        for b in bufs {
            self.write_all_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Fills `bufs` back to back from `off` (one `preadv` where the file allows); fails if
    /// the file ends first.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> io::Result<()> {
        let mut at = off;
        for b in bufs.iter_mut() {
            self.read_exact_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Can this file take [`SegFile::write_direct`]?
    fn has_direct(&self) -> bool {
        false
    }
    /// Writes `buf` at `off` past the page cache (`O_DIRECT`). The caller aligns the offset,
    /// the length and the buffer's address to [`DIRECT_ALIGN`].
    fn write_direct(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }
}

/// Alignment of offsets, lengths and buffers for [`SegFile::write_direct`].
pub const DIRECT_ALIGN: usize = 4096;

/// The directory of segment files.
pub trait Storage: Send + Sync {
    fn open(&self, id: u64, create: bool) -> io::Result<Arc<dyn SegFile>>;
    fn list(&self) -> io::Result<Vec<u64>>;
    fn remove(&self, id: u64) -> io::Result<()>;
    /// Makes creations and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Called before each catalog commit; `false` means the commit must be lost (crash tests).
    fn commit_barrier(&self) -> bool {
        true
    }
    /// Where segments live (for messages).
    fn path(&self) -> PathBuf;
}

/// Segments as real files: `DIR/NNNNNNNNNNNNNNNN.seg`.
pub struct DirStorage {
    dir: PathBuf,
    direct: bool,
}

impl DirStorage {
    /// Segments in `dir`; appends use `O_DIRECT` unless `FORKPOINT_DIRECT_IO=0`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let direct = std::env::var("FORKPOINT_DIRECT_IO").map_or(true, |v| v != "0");
        DirStorage {
            dir: dir.into(),
            direct,
        }
    }

    fn file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.seg"))
    }
}

/// A segment file; segments created for appending also get an `O_DIRECT` descriptor.
struct RealSeg(File, Option<File>);

impl SegFile for RealSeg {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], off: u64) -> io::Result<()> {
        // At most IOV_MAX (1024) pieces per call; a short read finishes piece by piece.
        let mut at = off;
        for group in bufs.chunks_mut(1024) {
            let want: usize = group.iter().map(|b| b.len()).sum();
            let done = {
                let mut iov: Vec<io::IoSliceMut> =
                    group.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
                loop {
                    match nix::sys::uio::preadv(&self.0, &mut iov, at as libc::off_t) {
                        Ok(n) => break n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if done < want {
                let mut skip = done;
                let mut pos = at;
                for b in group.iter_mut() {
                    let n = b.len();
                    if skip >= n {
                        skip -= n;
                    } else {
                        self.0.read_exact_at(&mut b[skip..], pos + skip as u64)?;
                        skip = 0;
                    }
                    pos += n as u64;
                }
            }
            at += want as u64;
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn has_direct(&self) -> bool {
        self.1.is_some()
    }
    fn write_direct(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match &self.1 {
            // A filesystem may refuse the alignment (EINVAL): then the page cache it is.
            Some(f) => match f.write_all_at(buf, off) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.0.write_all_at(buf, off),
                r => r,
            },
            None => self.0.write_all_at(buf, off),
        }
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        // At most IOV_MAX (1024) pieces per call; a short write finishes piece by piece.
        let mut at = off;
        for group in bufs.chunks(1024) {
            let iov: Vec<io::IoSlice> = group.iter().map(|b| io::IoSlice::new(b)).collect();
            let want: usize = group.iter().map(|b| b.len()).sum();
            let done = loop {
                match nix::sys::uio::pwritev(&self.0, &iov, at as libc::off_t) {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            if done < want {
                let mut skip = done;
                let mut pos = at + done as u64;
                for b in group {
                    if skip >= b.len() {
                        skip -= b.len();
                        continue;
                    }
                    self.0.write_all_at(&b[skip..], pos)?;
                    pos += (b.len() - skip) as u64;
                    skip = 0;
                }
            }
            at += want as u64;
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for DirStorage {
    fn open(&self, id: u64, create: bool) -> io::Result<Arc<dyn SegFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(self.file(id))?;
        // Appends go past the page cache where the filesystem allows it (not tmpfs): the
        // log is written once and read back rarely, and the store keeps what it reads.
        let direct = if create && self.direct {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(self.file(id))
                .ok()
        } else {
            None
        };
        Ok(Arc::new(RealSeg(f, direct)))
    }
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".seg") {
                if let Ok(id) = u64::from_str_radix(hex, 16) {
                    out.push(id);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        match std::fs::remove_file(self.file(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }
}

/// Test storage that keeps segments in memory and simulates a crash after the N-th sync:
/// every write not covered by one of the first N syncs (segment syncs and catalog commits
/// alike) is lost, except for an arbitrary prefix of unsynced bytes (a torn tail).
pub struct CrashStorage {
    dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<CrashSeg>>>,
    syncs: Arc<AtomicU64>,
    limit: u64,
}

/// One in-memory segment of [`CrashStorage`].
pub struct CrashSeg {
    state: Mutex<(Vec<u8>, Vec<u8>)>, // (durable, current)
    syncs: Arc<AtomicU64>,
    limit: u64,
}

impl CrashStorage {
    /// Loses everything after the `limit`-th sync. Existing segments in `dir` are loaded.
    pub fn new(dir: impl Into<PathBuf>, limit: u64) -> io::Result<Self> {
        let dir = dir.into();
        let s = CrashStorage {
            files: Mutex::new(HashMap::new()),
            syncs: Arc::new(AtomicU64::new(0)),
            limit,
            dir: dir.clone(),
        };
        for id in DirStorage::new(&dir).list()? {
            let data = std::fs::read(DirStorage::new(&dir).file(id))?;
            s.lock().insert(
                id,
                Arc::new(CrashSeg {
                    state: Mutex::new((data.clone(), data)),
                    syncs: s.syncs.clone(),
                    limit,
                }),
            );
        }
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<CrashSeg>>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of syncs seen so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Writes what survived the crash to the real directory: the durable bytes plus `torn`
    /// extra bytes of each file's unsynced tail.
    pub fn crash(&self, torn: usize) -> io::Result<()> {
        let real = DirStorage::new(&self.dir);
        for id in real.list()? {
            if !self.lock().contains_key(&id) {
                real.remove(id)?;
            }
        }
        for (id, f) in self.lock().iter() {
            let st = f.state.lock().unwrap_or_else(|e| e.into_inner());
            let (durable, current) = &*st;
            let mut out = durable.clone();
            if current.len() > durable.len() {
                let extra = (current.len() - durable.len()).min(torn);
                out.extend_from_slice(&current[durable.len()..durable.len() + extra]);
            }
            std::fs::write(real.file(*id), out)?;
        }
        Ok(())
    }
}

impl CrashSeg {
    fn tick(&self) -> bool {
        self.syncs.fetch_add(1, Ordering::SeqCst) < self.limit
    }
}

impl SegFile for CrashSeg {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let off = off as usize;
        let src =
            st.1.get(off..off + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let off = off as usize;
        if st.1.len() < off + buf.len() {
            st.1.resize(off + buf.len(), 0);
        }
        st.1[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        if self.tick() {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 = st.1.clone();
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).1.len() as u64)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1.truncate(len as usize);
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn open(&self, id: u64, create: bool) -> io::Result<Arc<dyn SegFile>> {
        let mut files = self.lock();
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        if !create {
            return Err(io::ErrorKind::NotFound.into());
        }
        let f = Arc::new(CrashSeg {
            state: Mutex::new((Vec::new(), Vec::new())),
            syncs: self.syncs.clone(),
            limit: self.limit,
        });
        files.insert(id, f.clone());
        Ok(f)
    }
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut v: Vec<u64> = self.lock().keys().copied().collect();
        v.sort_unstable();
        Ok(v)
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        self.lock().remove(&id);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn commit_barrier(&self) -> bool {
        self.syncs.fetch_add(1, Ordering::SeqCst) < self.limit
    }
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }
}

/// Reads and verifies the record at `loc`, returning its payload ([`check_record`], or
/// with `full` [`check_record_full`]).
pub fn read_record(file: &dyn SegFile, loc: &Loc, id: &ContentId, full: bool) -> Result<Vec<u8>> {
    let corrupt = |reason: String| StoreError::CorruptObject {
        id: *id,
        segment: loc.segment,
        offset: loc.offset,
        reason,
    };
    let mut buf = vec![0u8; RECORD_HEADER_LEN as usize + loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset)
        .map_err(|e| corrupt(format!("read failed: {e}")))?;
    if full {
        check_record_full(&buf, loc, id)?;
    } else {
        check_record(&buf, loc, id)?;
    }
    Ok(buf.split_off(RECORD_HEADER_LEN as usize))
}

/// Checks a record read whole (header and payload) from `loc`: its header names `id` and
/// the length, and the payload matches its CRC32C (or, in a record without one, hashes to
/// `id`). Returns the payload.
pub fn check_record<'a>(rec: &'a [u8], loc: &Loc, id: &ContentId) -> Result<&'a [u8]> {
    check(rec, loc, id, false)
}

/// [`check_record`], and the payload hashes to `id` also when the record has a CRC32C.
pub fn check_record_full<'a>(rec: &'a [u8], loc: &Loc, id: &ContentId) -> Result<&'a [u8]> {
    check(rec, loc, id, true)
}

/// [`check_record`] for a record read in two parts: its header and its payload.
pub fn check_parts(header: &[u8], payload: &[u8], loc: &Loc, id: &ContentId) -> Result<()> {
    check_payload(header, payload, loc, id, false).map(|_| ())
}

fn check<'a>(rec: &'a [u8], loc: &Loc, id: &ContentId, full: bool) -> Result<&'a [u8]> {
    let payload = rec
        .get(RECORD_HEADER_LEN as usize..RECORD_HEADER_LEN as usize + loc.len as usize)
        .ok_or_else(|| StoreError::CorruptObject {
            id: *id,
            segment: loc.segment,
            offset: loc.offset,
            reason: "record cut short".into(),
        })?;
    check_payload(rec, payload, loc, id, full)
}

fn check_payload<'a>(
    header: &[u8],
    payload: &'a [u8],
    loc: &Loc,
    id: &ContentId,
    full: bool,
) -> Result<&'a [u8]> {
    let corrupt = |reason: &str| StoreError::CorruptObject {
        id: *id,
        segment: loc.segment,
        offset: loc.offset,
        reason: reason.to_string(),
    };
    let h = decode_header(header).ok_or_else(|| corrupt("bad record header"))?;
    if h.id != *id || h.len != loc.len || payload.len() != loc.len as usize {
        return Err(corrupt("record header does not match the catalog"));
    }
    if (full || h.crc.is_none()) && ContentId::of(payload) != *id {
        return Err(corrupt("payload hash mismatch"));
    }
    if h.crc.is_some_and(|crc| crc32c::crc32c(payload) != crc) {
        return Err(corrupt(if full {
            "record checksum does not match its (intact) payload"
        } else {
            "payload checksum mismatch"
        }));
    }
    Ok(payload)
}

/// Scans records from `from` to the end of the file, stopping at the first invalid one;
/// returns the records found and the offset where valid data ends.
pub fn scan(
    file: &dyn SegFile,
    segment: u64,
    from: u64,
) -> io::Result<(Vec<(ContentId, Loc)>, u64)> {
    let len = file.len()?;
    let mut off = from;
    let mut out = Vec::new();
    let mut hdr = [0u8; 48];
    while off + RECORD_HEADER_LEN <= len {
        file.read_exact_at(&mut hdr, off)?;
        let Some(h) = decode_header(&hdr) else { break };
        let end = off + RECORD_HEADER_LEN + u64::from(h.len);
        if end > len {
            break;
        }
        let mut payload = vec![0u8; h.len as usize];
        file.read_exact_at(&mut payload, off + RECORD_HEADER_LEN)?;
        if ContentId::of(&payload) != h.id {
            break;
        }
        out.push((
            h.id,
            Loc {
                segment,
                offset: off,
                len: h.len,
                kind: h.kind,
            },
        ));
        off = end;
    }
    Ok((out, off))
}

/// Checks a segment file header.
pub fn check_segment_header(file: &dyn SegFile, id: u64, path: &Path) -> Result<()> {
    let mut h = [0u8; 16];
    file.read_exact_at(&mut h, 0)
        .ctx("read segment header", path.join(format!("{id:016x}.seg")))?;
    if &h[0..8] != SEGMENT_MAGIC {
        return Err(StoreError::CorruptCatalog {
            path: path.join(format!("{id:016x}.seg")),
            reason: "bad segment magic".into(),
        });
    }
    let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if v > SEGMENT_VERSION {
        return Err(StoreError::NewerFormat {
            found: v,
            supported: SEGMENT_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record is checked by its CRC32C, and by BLAKE3 when it has none (written by an
    /// older build) or when asked for in full; damage to the payload or to the checksum
    /// field is refused either way.
    #[test]
    fn records_are_checked_by_crc_or_blake3() {
        let payload = vec![7u8; 4096];
        let id = ContentId::of(&payload);
        let loc = Loc {
            segment: 1,
            offset: 0,
            len: payload.len() as u32,
            kind: ObjectKind::Chunk,
        };
        let mut rec = encode_header(ObjectKind::Chunk, &id, &payload).to_vec();
        rec.extend_from_slice(&payload);
        let mut legacy = rec.clone();
        legacy[6..8].fill(0);
        legacy[12..16].fill(0);
        assert_eq!(decode_header(&legacy).expect("valid").crc, None);
        for r in [&rec, &legacy] {
            assert_eq!(check_record(r, &loc, &id).expect("intact"), &payload[..]);
            assert_eq!(
                check_record_full(r, &loc, &id).expect("intact"),
                &payload[..]
            );
            let mut bad = r.clone();
            bad[48 + 1000] ^= 1;
            let e = check_record(&bad, &loc, &id)
                .expect_err("flipped bit")
                .to_string();
            assert!(e.contains("mismatch"), "{e}");
            let e = check_record_full(&bad, &loc, &id)
                .expect_err("flipped bit")
                .to_string();
            assert!(e.contains("hash mismatch"), "{e}");
        }
        let mut bad_crc = rec.clone();
        bad_crc[13] ^= 1;
        assert!(check_record(&bad_crc, &loc, &id).is_err());
        assert!(check_record_full(&bad_crc, &loc, &id).is_err());
    }

    #[test]
    fn header_round_trip_and_rejects() {
        let id = ContentId::of(b"x");
        let h = encode_header(ObjectKind::Chunk, &id, b"x");
        let d = decode_header(&h).expect("valid");
        assert_eq!(d.id, id);
        assert_eq!(d.len, 1);
        assert_eq!(d.crc, Some(crc32c::crc32c(b"x")));
        let mut bad = h;
        bad[0] = b'X';
        assert!(decode_header(&bad).is_none(), "bad magic");
        let mut bad = h;
        bad[4] = 9;
        assert!(decode_header(&bad).is_none(), "newer version");
        let mut bad = h;
        bad[5] = 77;
        assert!(decode_header(&bad).is_none(), "unknown kind");
        let mut bad = h;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_header(&bad).is_none(), "oversized");
        assert!(decode_header(&h[..40]).is_none(), "truncated");
    }

    #[test]
    fn crash_storage_loses_unsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = CrashStorage::new(dir.path(), 1).expect("storage");
        let f = s.open(1, true).expect("open");
        f.write_all_at(b"abc", 0).expect("write");
        f.sync().expect("sync");
        f.write_all_at(b"def", 3).expect("write");
        f.sync().expect("sync"); // beyond the limit: lost
        s.crash(1).expect("crash");
        let data = std::fs::read(dir.path().join(format!("{:016x}.seg", 1))).expect("read");
        assert_eq!(data, b"abcd");
    }
}
