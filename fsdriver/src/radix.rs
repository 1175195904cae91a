//! A persistent radix tree (fan-out 256) over `u64` keys whose nodes are content-addressed
//! objects.
//!
//! The shape depends only on the set of keys (height is the least that holds the largest key,
//! empty nodes are removed), so two trees with the same contents have the same root id, and
//! [`diff`] can skip every subtree whose ids agree. An update rewrites only the nodes on the
//! paths to changed keys.

use crate::error::{Result, StoreError};
use crate::id::ContentId;
use crate::segment::ObjectKind;
use crate::store::Store;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A reference to a tree: root node and number of levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RadixRoot {
    pub id: ContentId,
    pub height: u8,
}

#[derive(Serialize, Deserialize)]
enum Node<V> {
    Leaf(Vec<(u8, V)>),
    Inner(Vec<(u8, ContentId)>),
}

/// Values stored in a radix tree.
pub trait Value: Serialize + DeserializeOwned + Clone + PartialEq {}
impl<T: Serialize + DeserializeOwned + Clone + PartialEq> Value for T {}

fn load<V: Value>(store: &Store, id: &ContentId) -> Result<Node<V>> {
    let bytes = store.get(id)?;
    postcard::from_bytes(&bytes).map_err(|e| StoreError::Decode {
        what: "tree node",
        id: *id,
        reason: e.to_string(),
    })
}

fn save<V: Value>(store: &Store, node: &Node<V>) -> Result<ContentId> {
    let bytes = postcard::to_allocvec(node).map_err(|e| StoreError::Decode {
        what: "tree node (encode)",
        id: ContentId([0; 32]),
        reason: e.to_string(),
    })?;
    store.put(ObjectKind::Node, &bytes)
}

fn byte_at(key: u64, level: u8) -> u8 {
    // `level` counts from 1 (leaves) upwards.
    (key >> (8 * u32::from(level - 1))) as u8
}

fn height_for(key: u64) -> u8 {
    let mut h = 1;
    while h < 8 && key >> (8 * h) != 0 {
        h += 1;
    }
    h as u8
}

/// Looks up `key`.
pub fn get<V: Value>(store: &Store, root: Option<&RadixRoot>, key: u64) -> Result<Option<V>> {
    let Some(root) = root else { return Ok(None) };
    if height_for(key) > root.height {
        return Ok(None);
    }
    let mut id = root.id;
    let mut level = root.height;
    loop {
        let b = byte_at(key, level);
        match load::<V>(store, &id)? {
            Node::Leaf(entries) => {
                return Ok(entries
                    .binary_search_by_key(&b, |(k, _)| *k)
                    .ok()
                    .map(|i| entries[i].1.clone()));
            }
            Node::Inner(children) => match children.binary_search_by_key(&b, |(k, _)| *k) {
                Ok(i) => {
                    id = children[i].1;
                    level -= 1;
                    if level == 0 {
                        return Err(corrupt(id, "tree deeper than its height"));
                    }
                }
                Err(_) => return Ok(None),
            },
        }
    }
}

fn corrupt(id: ContentId, reason: &str) -> StoreError {
    StoreError::Decode {
        what: "tree node",
        id,
        reason: reason.to_string(),
    }
}

/// Applies `changes` (`None` removes the key) and returns the new root.
pub fn update<V: Value>(
    store: &Store,
    root: Option<RadixRoot>,
    changes: &BTreeMap<u64, Option<V>>,
) -> Result<Option<RadixRoot>> {
    if changes.is_empty() {
        return Ok(root);
    }
    let max_key = changes
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .max()
        .unwrap_or(0);
    let (mut id, mut height) = match root {
        Some(r) => (Some(r.id), r.height),
        None => (None, 1),
    };
    let need = height_for(max_key);
    while height < need {
        if let Some(old) = id {
            id = Some(save::<V>(store, &Node::Inner(vec![(0, old)]))?);
        }
        height += 1;
    }
    // Keys beyond the tree's reach can only be removals of absent keys.
    let limit = if height >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(height))) - 1
    };
    let list: Vec<(u64, Option<V>)> = changes
        .iter()
        .filter(|(k, _)| **k <= limit)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let mut id = upd(store, id, height, &list)?;
    // Shrink: a root with a single child at index 0 is not needed.
    while let Some(cur) = id {
        if height == 1 {
            break;
        }
        match load::<V>(store, &cur)? {
            Node::Inner(c) if c.len() == 1 && c[0].0 == 0 => {
                id = Some(c[0].1);
                height -= 1;
            }
            _ => break,
        }
    }
    Ok(id.map(|id| RadixRoot { id, height }))
}

fn upd<V: Value>(
    store: &Store,
    node: Option<ContentId>,
    level: u8,
    changes: &[(u64, Option<V>)],
) -> Result<Option<ContentId>> {
    if level == 1 {
        let mut entries: BTreeMap<u8, V> = match node {
            Some(id) => match load::<V>(store, &id)? {
                Node::Leaf(e) => e.into_iter().collect(),
                Node::Inner(_) => return Err(corrupt(id, "inner node at leaf level")),
            },
            None => BTreeMap::new(),
        };
        for (k, v) in changes {
            let b = byte_at(*k, 1);
            match v {
                Some(v) => entries.insert(b, v.clone()),
                None => entries.remove(&b),
            };
        }
        if entries.is_empty() {
            return Ok(None);
        }
        return save(store, &Node::Leaf(entries.into_iter().collect())).map(Some);
    }
    let mut children: BTreeMap<u8, ContentId> = match node {
        Some(id) => match load::<V>(store, &id)? {
            Node::Inner(c) => c.into_iter().collect(),
            Node::Leaf(_) => return Err(corrupt(id, "leaf node above leaf level")),
        },
        None => BTreeMap::new(),
    };
    let mut i = 0;
    while i < changes.len() {
        let b = byte_at(changes[i].0, level);
        let mut j = i;
        while j < changes.len() && byte_at(changes[j].0, level) == b {
            j += 1;
        }
        let child = children.get(&b).copied();
        match upd(store, child, level - 1, &changes[i..j])? {
            Some(c) => children.insert(b, c),
            None => children.remove(&b),
        };
        i = j;
    }
    if children.is_empty() {
        return Ok(None);
    }
    save::<V>(store, &Node::Inner(children.into_iter().collect())).map(Some)
}

/// Calls `f` for every (key, value) in key order.
pub fn walk<V: Value>(
    store: &Store,
    root: Option<&RadixRoot>,
    f: &mut dyn FnMut(u64, &V) -> Result<()>,
) -> Result<()> {
    let Some(root) = root else { return Ok(()) };
    walk_node(store, root.id, root.height, 0, f)
}

fn walk_node<V: Value>(
    store: &Store,
    id: ContentId,
    level: u8,
    prefix: u64,
    f: &mut dyn FnMut(u64, &V) -> Result<()>,
) -> Result<()> {
    match load::<V>(store, &id)? {
        Node::Leaf(e) => {
            for (b, v) in e {
                f((prefix << 8) | u64::from(b), &v)?;
            }
        }
        Node::Inner(c) => {
            if level <= 1 {
                return Err(corrupt(id, "inner node at leaf level"));
            }
            for (b, child) in c {
                walk_node(store, child, level - 1, (prefix << 8) | u64::from(b), f)?;
            }
        }
    }
    Ok(())
}

/// The entries with keys in `from..=to`, in key order: one descent, each node on the way
/// loaded (and decoded) once, where a [`get`] per key would decode a leaf per key.
pub fn range<V: Value>(
    store: &Store,
    root: Option<&RadixRoot>,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, V)>> {
    let mut out = Vec::new();
    let Some(root) = root else { return Ok(out) };
    range_node(store, root.id, root.height, 0, from, to, &mut out)?;
    Ok(out)
}

fn range_node<V: Value>(
    store: &Store,
    id: ContentId,
    level: u8,
    prefix: u64,
    from: u64,
    to: u64,
    out: &mut Vec<(u64, V)>,
) -> Result<()> {
    match load::<V>(store, &id)? {
        Node::Leaf(e) => {
            for (b, v) in e {
                let k = (prefix << 8) | u64::from(b);
                if (from..=to).contains(&k) {
                    out.push((k, v));
                }
            }
        }
        Node::Inner(c) => {
            if level <= 1 {
                return Err(corrupt(id, "inner node at leaf level"));
            }
            let shift = 8 * u32::from(level - 1);
            for (b, child) in c {
                let sub = (prefix << 8) | u64::from(b);
                let lo = sub.checked_shl(shift).unwrap_or(u64::MAX);
                let hi = lo.saturating_add((1u64 << shift) - 1);
                if hi < from || lo > to {
                    continue;
                }
                range_node(store, child, level - 1, sub, from, to, out)?;
            }
        }
    }
    Ok(())
}

/// Calls `f` with the id of every node of the tree.
pub fn nodes<V: Value>(
    store: &Store,
    root: Option<&RadixRoot>,
    f: &mut dyn FnMut(ContentId) -> Result<bool>,
) -> Result<()> {
    fn go<V: Value>(
        store: &Store,
        id: ContentId,
        f: &mut dyn FnMut(ContentId) -> Result<bool>,
    ) -> Result<()> {
        if !f(id)? {
            return Ok(());
        }
        if let Node::Inner(c) = load::<V>(store, &id)? {
            for (_, child) in c {
                go::<V>(store, child, f)?;
            }
        }
        Ok(())
    }
    match root {
        Some(r) => go::<V>(store, r.id, f),
        None => Ok(()),
    }
}

/// A difference between two trees at one key.
#[derive(Debug, PartialEq)]
pub enum Change<V> {
    Added(u64, V),
    Removed(u64, V),
    Modified(u64, V, V),
}

/// Lists the keys whose values differ between `a` and `b`, visiting only subtrees whose ids
/// differ.
pub fn diff<V: Value>(
    store: &Store,
    a: Option<&RadixRoot>,
    b: Option<&RadixRoot>,
) -> Result<Vec<Change<V>>> {
    let mut out = Vec::new();
    // Bring both to the same height by viewing the lower one as wrapped in index-0 parents.
    let ha = a.map(|r| r.height).unwrap_or(1);
    let hb = b.map(|r| r.height).unwrap_or(1);
    let h = ha.max(hb);
    diff_at(
        store,
        a.map(|r| (r.id, r.height)),
        b.map(|r| (r.id, r.height)),
        h,
        0,
        &mut out,
    )?;
    Ok(out)
}

type Sub = Option<(ContentId, u8)>;

fn children_at<V: Value>(store: &Store, n: Sub, level: u8) -> Result<BTreeMap<u8, Sub>> {
    let mut m = BTreeMap::new();
    if let Some((id, h)) = n {
        if h < level {
            m.insert(0, Some((id, h)));
        } else {
            match load::<V>(store, &id)? {
                Node::Inner(c) => {
                    for (b, c) in c {
                        m.insert(b, Some((c, h - 1)));
                    }
                }
                Node::Leaf(_) => return Err(corrupt(id, "leaf above leaf level")),
            }
        }
    }
    Ok(m)
}

fn leaf_entries<V: Value>(store: &Store, n: Sub) -> Result<BTreeMap<u8, V>> {
    match n {
        None => Ok(BTreeMap::new()),
        Some((id, _)) => match load::<V>(store, &id)? {
            Node::Leaf(e) => Ok(e.into_iter().collect()),
            Node::Inner(_) => Err(corrupt(id, "inner node at leaf level")),
        },
    }
}

fn diff_at<V: Value>(
    store: &Store,
    a: Sub,
    b: Sub,
    level: u8,
    prefix: u64,
    out: &mut Vec<Change<V>>,
) -> Result<()> {
    if a.map(|x| x.0) == b.map(|x| x.0) && a.map(|x| x.1) == b.map(|x| x.1) {
        return Ok(());
    }
    if level == 1 {
        let ea = leaf_entries::<V>(store, a)?;
        let eb = leaf_entries::<V>(store, b)?;
        for (k, va) in &ea {
            let key = (prefix << 8) | u64::from(*k);
            match eb.get(k) {
                None => out.push(Change::Removed(key, va.clone())),
                Some(vb) if vb != va => out.push(Change::Modified(key, va.clone(), vb.clone())),
                Some(_) => {}
            }
        }
        for (k, vb) in &eb {
            if !ea.contains_key(k) {
                out.push(Change::Added((prefix << 8) | u64::from(*k), vb.clone()));
            }
        }
        return Ok(());
    }
    let ca = children_at::<V>(store, a, level)?;
    let cb = children_at::<V>(store, b, level)?;
    let keys: std::collections::BTreeSet<u8> = ca.keys().chain(cb.keys()).copied().collect();
    for k in keys {
        let sa = ca.get(&k).copied().flatten();
        let sb = cb.get(&k).copied().flatten();
        diff_at(store, sa, sb, level - 1, (prefix << 8) | u64::from(k), out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> (tempfile::TempDir, std::sync::Arc<Store>) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = Store::create(&d.path().join("s"), None).expect("create");
        (d, s)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_btreemap(ops in proptest::collection::vec((0u64..100_000, proptest::option::of(0u32..5)), 1..200)) {
            let (_d, s) = store();
            let mut model = BTreeMap::new();
            let mut root = None;
            for chunk in ops.chunks(17) {
                let mut ch = BTreeMap::new();
                for (k, v) in chunk {
                    ch.insert(*k, *v);
                    match v { Some(v) => { model.insert(*k, *v); } None => { model.remove(k); } }
                }
                root = update(&s, root, &ch).expect("update");
            }
            let mut got = BTreeMap::new();
            walk::<u32>(&s, root.as_ref(), &mut |k, v| { got.insert(k, *v); Ok(()) }).expect("walk");
            prop_assert_eq!(&got, &model);
            for (k, v) in &model {
                prop_assert_eq!(get::<u32>(&s, root.as_ref(), *k).expect("get"), Some(*v));
            }
            // Ranges agree with the model, across leaf and inner-node boundaries.
            for (from, len) in [(0u64, 1u64), (255, 2), (1000, 70_000), (65_530, 20), (0, u64::MAX)] {
                let to = from.saturating_add(len - 1);
                let want: Vec<(u64, u32)> = model.range(from..=to).map(|(k, v)| (*k, *v)).collect();
                prop_assert_eq!(range::<u32>(&s, root.as_ref(), from, to).expect("range"), want);
            }
            // Canonical shape: rebuilding from scratch gives the same root.
            let fresh: BTreeMap<u64, Option<u32>> = model.iter().map(|(k, v)| (*k, Some(*v))).collect();
            let root2 = update(&s, None, &fresh).expect("update");
            prop_assert_eq!(root, root2);
        }
    }

    #[test]
    fn diff_lists_changes() {
        let (_d, s) = store();
        let a: BTreeMap<u64, Option<u32>> = (0..2000).map(|k| (k, Some(k as u32))).collect();
        let ra = update(&s, None, &a).expect("a");
        let mut ch: BTreeMap<u64, Option<u32>> = BTreeMap::new();
        ch.insert(5, Some(99));
        ch.insert(7, None);
        ch.insert(70_000, Some(1));
        let rb = update(&s, ra, &ch).expect("b");
        let d = diff::<u32>(&s, ra.as_ref(), rb.as_ref()).expect("diff");
        assert_eq!(
            d,
            vec![
                Change::Modified(5, 5, 99),
                Change::Removed(7, 7),
                Change::Added(70_000, 1)
            ]
        );
        assert!(diff::<u32>(&s, ra.as_ref(), ra.as_ref())
            .expect("same")
            .is_empty());
    }
}
