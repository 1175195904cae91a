//! forkpoint-fs: the store (a log of content-addressed objects with a SQLite catalog) and the
//! FUSE overlay that serves a branch of it.

pub mod catalog;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod id;
pub mod intent;
pub mod maint;
pub mod objindex;
pub mod radix;
pub mod segment;
mod stage;
pub mod store;
pub mod tree;
pub mod uring;

pub use catalog::{Checkpoint, CheckpointKind};
pub use error::{Result, StoreError};
pub use id::ContentId;
pub use store::Store;
