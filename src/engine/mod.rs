//! The process engine: freeze, dump and restore processes with ptrace and /proc.
//!
//! # Layers
//! * [`tracer`]: the only place that speaks ptrace ([`tracer::Tracer`]): seize/interrupt,
//!   registers, xstate, signal mask, rseq, memory access and **syscall injection**.
//! * [`sys`]: the few other raw system calls (`clone3` with `set_tid`, `prlimit64`,
//!   `get_robust_list`, `kill`).
//! * [`image`]: the serde structs of a process image and their framed encoding
//!   (magic, format version, length, BLAKE3).
//! * [`dump`]: running process → [`image::ProcessImage`] (process keeps running).
//! * [`restore`]: [`image::ProcessImage`] → new running process (child of the caller).
//!
//! Process trees: [`dump::dump_tree`] freezes a process and all its descendants (zombies
//! included) and records the pipes between them with their buffered data in an
//! [`image::TreeImage`]; [`restore::restore_tree`] recreates the tree (each process forked by
//! its own parent, optionally with the original pids) and lets it run.
//!
//! # Typical use
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use forkpoint::engine::{dump, image, restore};
//! let img = dump::dump(1234)?; // the process keeps running
//! let bytes = image::encode(&img)?; // store it
//! let img = image::decode(&bytes)?;
//! let pid = restore::restore(&img)?; // a new process continues from the checkpoint
//! # let _ = pid; Ok(()) }
//! ```
//!
//! All ptrace requests of one dump or restore come from the calling thread; call the engine
//! from one thread at a time per target process. Dumping and restoring need root (or
//! `CAP_SYS_PTRACE` + `CAP_SYS_RESOURCE` + `CAP_SYS_ADMIN`/`CAP_CHECKPOINT_RESTORE`).

pub mod dirty;
pub mod dump;
pub mod image;
pub mod lazy;
pub mod restore;
pub mod sys;
pub mod tracer;
pub mod unix;

pub use dump::{dump, dump_frozen, dump_tree, dump_with, AfterDump, DumpError, DumpOptions};
pub use image::{
    decode, decode_tree, encode, encode_tree, ImageError, MemberState, PipeImage, ProcessImage,
    TreeImage, TreeMember,
};
pub use restore::{
    restore, restore_tree, restore_with, ChunkSource, RestoreError, RestoreOptions,
    TreeRestoreOptions,
};

#[cfg(test)]
mod tests;
