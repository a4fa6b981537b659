//! Which collections a node replicates, and what two peers replicate between them.
//!
//! Each node announces its scope in its hello. Between two peers only the collections both
//! scopes hold are reconciled and synced, so an agent that keeps a few collections never
//! receives the others, and a hub never serves a collection its region does not hold.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::Collection;

/// Most collections a scope may name in each of its lists.
pub const MAX_SCOPE_COLLECTIONS: usize = 1024;

/// A set of collections: every collection (`only` absent) or the listed ones, minus `except`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectionScope {
    /// The collections held; absent means every collection.
    pub only: Option<BTreeSet<Collection>>,
    /// Collections never held, even when `only` is absent.
    pub except: BTreeSet<Collection>,
}

/// Which collections this node may hold at all, beside its scope: a hub holds only the
/// collections its region's replication policy gives it, and says where the others live.
#[derive(Clone)]
pub struct HoldingRule(std::sync::Arc<HoldingCheck>);

/// Whether a collection is held here, or why not.
type HoldingCheck = dyn Fn(&Collection) -> Result<(), String> + Send + Sync;

impl HoldingRule {
    /// A rule from a function that explains each refusal.
    pub fn new(rule: impl Fn(&Collection) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(rule))
    }

    /// Whether this node holds `collection`, or why not.
    pub fn check(&self, collection: &Collection) -> Result<(), String> {
        (self.0)(collection)
    }
}

impl std::fmt::Debug for HoldingRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldingRule")
    }
}

/// A scope that names more collections than [`MAX_SCOPE_COLLECTIONS`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("a collection scope names {0} collections in one list, at most {MAX_SCOPE_COLLECTIONS}")]
pub struct ScopeTooLarge(pub usize);

impl CollectionScope {
    /// Every collection.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only the given collections.
    pub fn only(collections: impl IntoIterator<Item = Collection>) -> Self {
        Self { only: Some(collections.into_iter().collect()), except: BTreeSet::new() }
    }

    /// Whether the scope holds `collection`.
    pub fn contains(&self, collection: &Collection) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(collection))
            && !self.except.contains(collection)
    }

    /// The collections both scopes hold.
    pub fn intersect(&self, other: &Self) -> Self {
        let only = match (&self.only, &other.only) {
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (Some(one), Some(two)) => Some(one.intersection(two).cloned().collect()),
        };
        let except = self.except.union(&other.except).cloned().collect();
        Self { only, except }
    }

    /// Checks the size limits of a scope received from a peer.
    pub fn validate(&self) -> Result<(), ScopeTooLarge> {
        let largest = self.only.as_ref().map_or(0, BTreeSet::len).max(self.except.len());
        if largest > MAX_SCOPE_COLLECTIONS {
            return Err(ScopeTooLarge(largest));
        }
        Ok(())
    }

    /// Whether this is every collection.
    pub fn is_all(&self) -> bool {
        self.only.is_none() && self.except.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(list: &[&str]) -> BTreeSet<Collection> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn scope(only: Option<&[&str]>, except: &[&str]) -> CollectionScope {
        CollectionScope { only: only.map(names), except: names(except) }
    }

    #[test]
    fn every_collection_by_default() {
        assert!(CollectionScope::all().contains(&"anything".parse().unwrap()));
        assert!(CollectionScope::all().is_all());
    }

    #[test]
    fn except_wins_over_only() {
        let s = scope(Some(&["a", "b"]), &["b"]);
        assert!(s.contains(&"a".parse().unwrap()));
        assert!(!s.contains(&"b".parse().unwrap()));
        assert!(!s.contains(&"c".parse().unwrap()));
    }

    #[test]
    fn oversized_scopes_are_refused() {
        let many: Vec<String> = (0..=MAX_SCOPE_COLLECTIONS).map(|n| format!("c{n}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(scope(Some(&many), &[]).validate(), Err(ScopeTooLarge(many.len())));
        assert!(scope(Some(&many[1..]), &many[1..]).validate().is_ok());
    }

    proptest! {
        #[test]
        fn intersection_holds_exactly_what_both_hold(
            only_a in proptest::option::of(proptest::collection::btree_set(0u8..8, 0..6)),
            only_b in proptest::option::of(proptest::collection::btree_set(0u8..8, 0..6)),
            except_a in proptest::collection::btree_set(0u8..8, 0..4),
            except_b in proptest::collection::btree_set(0u8..8, 0..4),
        ) {
            let to_names = |set: &BTreeSet<u8>| -> BTreeSet<Collection> {
                set.iter().map(|n| format!("c{n}").parse().unwrap()).collect()
            };
            let a = CollectionScope { only: only_a.as_ref().map(to_names), except: to_names(&except_a) };
            let b = CollectionScope { only: only_b.as_ref().map(to_names), except: to_names(&except_b) };
            let both = a.intersect(&b);
            for n in 0u8..8 {
                let c: Collection = format!("c{n}").parse().unwrap();
                prop_assert_eq!(both.contains(&c), a.contains(&c) && b.contains(&c));
            }
        }
    }
}
