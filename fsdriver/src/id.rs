//! Typed content addresses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The number of cores this process may use, asked once: `available_parallelism` reads
/// several cgroup files on every call, which cost a small write more than hashing it.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// The BLAKE3 hash of an object's payload: its address in the store.
///
/// `Debug` prints the full hash, `Display` a short prefix (as git does).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentId(pub [u8; 32]);

/// A BLAKE3 hash is uniformly distributed: eight of its bytes are as good a table key as
/// all 32, and a quarter of the work (equality still compares all of them).
impl std::hash::Hash for ContentId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(a));
    }
}

/// A table keyed by content address, with [`IdHasher`].
pub type IdMap<V> = std::collections::HashMap<ContentId, V, IdHashBuilder>;

/// A new, empty [`IdMap`] with room for `n` entries.
pub fn id_map<V>(n: usize) -> IdMap<V> {
    IdMap::with_capacity_and_hasher(n, IdHashBuilder::default())
}

/// Builds [`IdHasher`]s with a key chosen at random once per process, so that nobody who
/// writes data can pick contents whose addresses crowd one bucket of the daemon's index.
#[derive(Clone, Copy, Debug)]
pub struct IdHashBuilder(u64);

impl Default for IdHashBuilder {
    fn default() -> Self {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        IdHashBuilder(*KEY.get_or_init(|| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
        }))
    }
}

impl std::hash::BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            key: self.0,
            state: 0,
        }
    }
}

/// A keyed folded-multiply hasher for [`ContentId`] keys (which hash as one `u64`): a few
/// nanoseconds where SipHash took tens, and loading a store's index of 100k+ objects is
/// mostly hashing.
#[derive(Clone, Copy, Debug)]
pub struct IdHasher {
    key: u64,
    state: u64,
}

impl IdHasher {
    fn mix(&mut self, x: u64) {
        let m = u128::from(self.state ^ x ^ self.key) * 0x9e37_79b9_7f4a_7c15_u128;
        self.state = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            self.mix(u64::from_le_bytes(a));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

impl ContentId {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        ContentId(*blake3::hash(data).as_bytes())
    }

    /// Hashes every piece, spread over the machine's cores (up to 8) when there are enough
    /// pieces to be worth it.
    pub fn of_many(pieces: &[&[u8]]) -> Vec<ContentId> {
        let mut out = vec![ContentId([0; 32]); pieces.len()];
        let bytes: usize = pieces.iter().map(|p| p.len()).sum();
        let threads = if pieces.len() < 2 || bytes < (1 << 20) {
            1
        } else {
            cores().min(8)
        };
        if threads < 2 {
            for (o, p) in out.iter_mut().zip(pieces) {
                *o = ContentId::of(p);
            }
            return out;
        }
        let per = pieces.len().div_ceil(threads);
        std::thread::scope(|sc| {
            for (part, outs) in pieces.chunks(per).zip(out.chunks_mut(per)) {
                sc.spawn(move || {
                    for (o, p) in outs.iter_mut().zip(part) {
                        *o = ContentId::of(p);
                    }
                });
            }
        });
        out
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ContentId(out))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.to_hex())
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ContentId::of(b"hello");
        assert_eq!(ContentId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(format!("{id}").len(), 12);
        assert!(format!("{id:?}").contains(&id.to_hex()));
        assert_eq!(ContentId::from_hex("zz"), None);
    }
}
