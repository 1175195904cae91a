//! Errors of the store.

use crate::id::ContentId;
use std::path::PathBuf;

/// Everything that can go wrong opening, reading or writing a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is not a forkpoint store (no forkpoint.db)")]
    NotAStore(PathBuf),
    #[error("{path} already holds a forkpoint store")]
    AlreadyExists { path: PathBuf },
    #[error("store format version {found} is newer than this forkpoint supports ({supported}); upgrade forkpoint")]
    NewerFormat { found: u32, supported: u32 },
    #[error("store catalog {path} is corrupt: {reason}")]
    CorruptCatalog { path: PathBuf, reason: String },
    #[error("object {id} (segment {segment}, offset {offset}) is corrupt: {reason}")]
    CorruptObject {
        id: ContentId,
        segment: u64,
        offset: u64,
        reason: String,
    },
    #[error("object {0} is missing from the store")]
    MissingObject(ContentId),
    #[error("the store was written to while gc marked what is in use; nothing was reclaimed (run gc again)")]
    ChangedDuringGc,
    #[error("segment {segment} is missing or truncated: catalog says {expected} bytes, file has {found}")]
    TruncatedSegment {
        segment: u64,
        expected: u64,
        found: u64,
    },
    #[error("cannot decode {what} {id}: {reason}")]
    Decode {
        what: &'static str,
        id: ContentId,
        reason: String,
    },
    #[error("object of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unknown checkpoint or snapshot '{0}'")]
    UnknownCheckpoint(String),
    #[error("unknown branch '{0}'")]
    UnknownBranch(String),
    #[error("branch '{name}' is kept: {reason}")]
    BranchKept { name: String, reason: String },
    #[error("branch '{0}' already exists")]
    BranchExists(String),
    #[error("a checkpoint named '{0}' already exists")]
    NameExists(String),
    #[error("invalid name '{name}': {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("store {0} is in use by another forkpoint process")]
    Locked(PathBuf),
    #[error("store was created over lower directory {store}, not {given}")]
    LowerMismatch { store: PathBuf, given: PathBuf },
    #[error("lower directory {path}: {source}")]
    Lower {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("simulated crash (test storage)")]
    SimulatedCrash,
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches the failing step and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
