//! The write stage of the active segment: appends collect in aligned buffers that a background
//! thread writes with `O_DIRECT`.
//!
//! Why: the log is written once and read back rarely (the overlay and the process engine keep
//! what they read), so its bytes gain nothing from the page cache, and filling the page cache
//! costs memory bandwidth and fresh pages on every append. Aligned 8 MiB direct writes cost
//! only the disk, and with the writing moved off the appending thread, hashing, request
//! handling and the disk overlap.
//!
//! Bytes before [`Stage::start`] were handed to the writer thread; bytes from it on are in
//! the current buffer. Nothing is dropped on a failed write: the buffer is kept and written
//! again by the next [`Stage::flush`], which reports the error if it fails again.

use crate::segment::{SegFile, DIRECT_ALIGN};
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// Bytes per buffer (one direct write).
pub const STAGE_BYTES: usize = 8 << 20;
/// Buffers handed to the writer thread and not yet written, at most.
const IN_FLIGHT: usize = 8;

/// A buffer whose region `at..at + STAGE_BYTES` is aligned for direct writes.
struct Buf {
    mem: Vec<u8>,
    at: usize,
}

impl Buf {
    fn new() -> Buf {
        let mem = vec![0u8; STAGE_BYTES + DIRECT_ALIGN];
        let at = mem.as_ptr().align_offset(DIRECT_ALIGN);
        Buf { mem, at }
    }
    fn bytes(&mut self) -> &mut [u8] {
        &mut self.mem[self.at..self.at + STAGE_BYTES]
    }
}

/// One write for the writer thread.
struct Job {
    file: Arc<dyn SegFile>,
    buf: Buf,
    off: u64,
    len: usize,
}

impl Job {
    fn run(&mut self) -> io::Result<()> {
        let (off, len) = (self.off, self.len);
        self.file.write_direct(&self.buf.bytes()[..len], off)
    }
}

struct Thread {
    jobs: Sender<Job>,
    done: Receiver<(Job, io::Result<()>)>,
}

/// See the module documentation.
pub struct Stage {
    /// Staging is on for the active segment (its file takes direct writes).
    pub active: bool,
    cur: Option<Buf>,
    /// Segment offset of the current buffer's first byte (aligned).
    pub start: u64,
    /// Bytes in the current buffer.
    pub len: usize,
    spare: Vec<Buf>,
    in_flight: usize,
    failed: Vec<Job>,
    thread: Option<Thread>,
    /// The writer thread went away with writes in flight: they are lost, and every flush
    /// from now on fails (the store must be opened again).
    lost: bool,
}

impl Stage {
    pub fn new() -> Stage {
        Stage {
            active: false,
            cur: None,
            start: 0,
            len: 0,
            spare: Vec::new(),
            in_flight: 0,
            failed: Vec::new(),
            thread: None,
            lost: false,
        }
    }

    /// Starts staging a new segment at offset 0. The previous one must be flushed.
    pub fn begin(&mut self) {
        debug_assert!(self.in_flight == 0 && self.failed.is_empty());
        self.active = true;
        self.start = 0;
        self.len = 0;
    }

    fn cur(&mut self) -> &mut Buf {
        if self.cur.is_none() {
            self.cur = Some(self.spare.pop().unwrap_or_else(Buf::new));
        }
        self.cur.get_or_insert_with(Buf::new)
    }

    /// Whether more may be staged: an earlier write that failed is tried again first, and
    /// while it fails (a full disk) its error is returned. The caller then takes nothing:
    /// what the stage holds stays bounded by the writes in flight, and a put fails at once
    /// instead of piling up in memory.
    pub fn ready(&mut self) -> io::Result<()> {
        self.reap_ready();
        while let Some(mut job) = self.failed.pop() {
            if let Err(e) = job.run() {
                self.failed.push(job);
                return Err(e);
            }
            self.spare.push(job.buf);
        }
        Ok(())
    }

    /// Appends `data` to the segment `file`.
    pub fn push(&mut self, file: &Arc<dyn SegFile>, mut data: &[u8]) {
        while !data.is_empty() {
            let l = self.len;
            let n = (STAGE_BYTES - l).min(data.len());
            self.cur().bytes()[l..l + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == STAGE_BYTES {
                self.hand_off(file);
            }
        }
    }

    /// Collects the writes the writer thread has finished, without waiting.
    fn reap_ready(&mut self) {
        while self.in_flight > 0 {
            let got = match &self.thread {
                Some(t) => t.done.try_recv(),
                None => return,
            };
            match got {
                Ok((job, Ok(()))) => {
                    self.in_flight -= 1;
                    self.spare.push(job.buf);
                }
                Ok((job, Err(e))) => {
                    self.in_flight -= 1;
                    log::warn!("segment write at {} failed: {e}; kept for retry", job.off);
                    self.failed.push(job);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    // As in `reap`: the thread is gone with what it held.
                    self.reap();
                    return;
                }
            }
        }
    }

    /// Gives the full current buffer to the writer thread (waiting for a free slot).
    fn hand_off(&mut self, file: &Arc<dyn SegFile>) {
        let Some(buf) = self.cur.take() else { return };
        let job = Job {
            file: file.clone(),
            buf,
            off: self.start,
            len: STAGE_BYTES,
        };
        self.start += STAGE_BYTES as u64;
        self.len = 0;
        while self.in_flight >= IN_FLIGHT {
            self.reap();
        }
        if self.thread.is_none() {
            self.thread = spawn();
        }
        let job = match &self.thread {
            Some(t) => match t.jobs.send(job) {
                Ok(()) => {
                    self.in_flight += 1;
                    return;
                }
                Err(e) => e.0,
            },
            None => job,
        };
        // No thread: write here; a failure is kept for the next flush.
        let mut job = job;
        match job.run() {
            Ok(()) => self.spare.push(job.buf),
            Err(_) => self.failed.push(job),
        }
    }

    /// Waits for one write of the writer thread.
    fn reap(&mut self) {
        let got = self.thread.as_ref().map(|t| t.done.recv());
        self.in_flight -= 1;
        match got {
            Some(Ok((job, Ok(())))) => self.spare.push(job.buf),
            Some(Ok((job, Err(e)))) => {
                log::warn!("segment write at {} failed: {e}; kept for retry", job.off);
                self.failed.push(job);
            }
            // The thread is gone (it never panics; this is defensive): what it held is lost.
            Some(Err(_)) | None => {
                log::error!("the segment writer thread stopped with writes in flight");
                self.in_flight = 0;
                self.thread = None;
                self.lost = true;
            }
        }
    }

    /// Writes everything staged: waits for the writer thread, retries what failed, and
    /// writes the partial last block padded with zeros (it stays staged, so later appends
    /// rewrite it whole). On error the unwritten bytes stay staged.
    pub fn flush(&mut self, file: &Arc<dyn SegFile>) -> io::Result<()> {
        while self.in_flight > 0 {
            self.reap();
        }
        if self.lost {
            return Err(io::Error::other(
                "the segment writer thread stopped with writes in flight; reopen the store",
            ));
        }
        while let Some(mut job) = self.failed.pop() {
            if let Err(e) = job.run() {
                self.failed.push(job);
                return Err(e);
            }
            self.spare.push(job.buf);
        }
        if self.len == 0 {
            return Ok(());
        }
        let a = DIRECT_ALIGN;
        let whole = self.len / a * a;
        let padded = self.len.div_ceil(a) * a;
        let (len, start) = (self.len, self.start);
        let buf = self.cur().bytes();
        buf[len..padded].fill(0);
        file.write_direct(&buf[..padded], start)?;
        buf.copy_within(whole..len, 0);
        self.start += whole as u64;
        self.len -= whole;
        Ok(())
    }
}

fn spawn() -> Option<Thread> {
    let (jobs, rx) = channel::<Job>();
    let (tx, done) = channel();
    std::thread::Builder::new()
        .name("fp-segwrite".into())
        .spawn(move || {
            for mut job in rx {
                let r = job.run();
                if tx.send((job, r)).is_err() {
                    break;
                }
            }
        })
        .ok()?;
    Some(Thread { jobs, done })
}
