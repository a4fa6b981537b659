//! The catalog: every committed document's heads index entry, held without loading the
//! document, and the reconciliation set derived from it.
//!
//! Both are updated when an append commits, never before, so reconciliation only ever
//! speaks of heads the store holds. Sessions read the set in place: a session costs the
//! ranges it touches, not a copy of the set.

use std::collections::BTreeMap;

use crate::document::heads_digest;
use crate::ids::{Collection, DocId};
use crate::reconcile::{Item, MemoryStore, MemoryStoreBuilder};
use crate::store_task::IndexEntry;

/// Committed documents, hot or cold.
#[derive(Debug, Default)]
pub(super) struct Catalog {
    entries: BTreeMap<DocId, IndexEntry>,
    /// One reconciliation set per collection: sessions are scoped per collection.
    reconcile: BTreeMap<Collection, MemoryStore>,
}

impl Catalog {
    /// Records a document's committed state.
    pub(super) fn record(&mut self, doc_id: DocId, entry: IndexEntry) {
        let digest = heads_digest(&entry.heads);
        match self.reconcile.get_mut(&entry.collection) {
            Some(set) => {
                set.insert(doc_id, digest);
            }
            None => {
                let mut set = MemoryStore::new();
                set.insert(doc_id, digest);
                self.reconcile.insert(entry.collection.clone(), set);
            }
        }
        self.entries.insert(doc_id, entry);
    }

    /// Records many documents' committed state at once, as read from the heads index at
    /// start-up. Built in bulk, which is several times faster than one record at a time.
    pub(super) fn record_all(&mut self, entries: Vec<(DocId, IndexEntry)>) {
        let mut builder = CatalogBuilder::new();
        builder.push(entries);
        self.record_built(builder, &Sequential);
    }

    /// Records every entry of `built`, replacing what the catalog held for the same ids.
    /// The entry map and the reconciliation sets are made through `join`.
    pub(super) fn record_built(&mut self, built: CatalogBuilder, join: &impl Join) {
        if self.entries.is_empty() {
            *self = built.finish(join);
            return;
        }
        // Only a catalog restored twice gets here: entries one at a time are fast enough.
        for (doc_id, entry) in built.entries {
            self.record(doc_id, entry);
        }
    }

    pub(super) fn get(&self, doc_id: &DocId) -> Option<&IndexEntry> {
        self.entries.get(doc_id)
    }

    pub(super) fn contains(&self, doc_id: &DocId) -> bool {
        self.entries.contains_key(doc_id)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&DocId, &IndexEntry)> {
        self.entries.iter()
    }

    /// The set a collection's reconciliation sessions read: (document, digest of its
    /// committed heads), for every document of the collection.
    pub(super) fn reconcile_set(&self, collection: &Collection) -> Option<&MemoryStore> {
        self.reconcile.get(collection)
    }

    /// Every collection with a document here, and its reconciliation set.
    pub(super) fn collections(&self) -> impl Iterator<Item = (&Collection, &MemoryStore)> {
        self.reconcile.iter()
    }
}

/// A catalog being built from the heads index at start-up, one chunk of entries at a time as
/// the store reads them (`Store::scan_index`), so the digests and fingerprints are computed
/// while the next chunk is read rather than after the whole scan. The ordered maps are made
/// in [`Node::restore_built`](super::Node::restore_built), cheaply, since the index comes in
/// id order (any order is correct; a later entry for an id replaces an earlier one).
#[derive(Debug, Default)]
pub struct CatalogBuilder {
    entries: Vec<(DocId, IndexEntry)>,
    sets: BTreeMap<Collection, MemoryStoreBuilder>,
}

impl CatalogBuilder {
    /// A builder holding no entry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds entries, computing each one's heads digest and reconciliation fingerprint.
    pub fn push(&mut self, entries: Vec<(DocId, IndexEntry)>) {
        // Entries of one collection come in runs: the run's set is taken out of the map
        // while the run lasts, so the map is searched once per run, not per entry.
        let mut run: Option<(Collection, MemoryStoreBuilder)> = None;
        for (doc_id, entry) in &entries {
            let item = Item { doc_id: *doc_id, heads_digest: heads_digest(&entry.heads) };
            match &mut run {
                Some((collection, set)) if *collection == entry.collection => set.push(item),
                _ => {
                    if let Some((collection, set)) = run.take() {
                        self.sets.insert(collection, set);
                    }
                    let mut set = self.sets.remove(&entry.collection).unwrap_or_default();
                    set.push(item);
                    run = Some((entry.collection.clone(), set));
                }
            }
        }
        if let Some((collection, set)) = run {
            self.sets.insert(collection, set);
        }
        if self.entries.is_empty() {
            self.entries = entries;
        } else {
            self.entries.extend(entries);
        }
    }

    /// How many entries were pushed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes the ordered maps: the entry map and the reconciliation sets are independent, so
    /// `join` may make them side by side.
    fn finish(self, join: &impl Join) -> Catalog {
        let Self { entries, sets } = self;
        let (entries, reconcile) = join.join(
            move || entries.into_iter().collect(),
            move || sets.into_iter().map(|(c, set)| (c, set.finish())).collect(),
        );
        Catalog { entries, reconcile }
    }
}

/// Runs two independent pieces of work and gives both results: one after the other, or side
/// by side where the caller has threads to spare (the core starts none of its own).
pub trait Join {
    /// Runs `a` and `b`, in any order or at once.
    fn join<A, B, RA, RB>(&self, a: A, b: B) -> (RA, RB)
    where
        A: FnOnce() -> RA + Send,
        B: FnOnce() -> RB + Send,
        RA: Send,
        RB: Send;
}

/// [`Join`] one after the other, on the calling thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sequential;

impl Join for Sequential {
    fn join<A, B, RA, RB>(&self, a: A, b: B) -> (RA, RB)
    where
        A: FnOnce() -> RA + Send,
        B: FnOnce() -> RB + Send,
        RA: Send,
        RB: Send,
    {
        (a(), b())
    }
}

#[cfg(test)]
mod tests {
    use automerge::ChangeHash;

    use super::*;

    fn entry(i: u8, collection: &str) -> (DocId, IndexEntry) {
        let doc_id = DocId::from_slice(&[i; 16]).unwrap();
        let heads = (0..i % 3).map(|h| ChangeHash([i ^ h; 32])).collect();
        (doc_id, IndexEntry { collection: collection.parse().unwrap(), heads, deleted: i % 4 == 0 })
    }

    fn one_by_one(entries: &[(DocId, IndexEntry)]) -> Catalog {
        let mut catalog = Catalog::default();
        for (doc_id, entry) in entries {
            catalog.record(*doc_id, entry.clone());
        }
        catalog
    }

    fn assert_same(built: &Catalog, expected: &Catalog) {
        assert!(built.iter().eq(expected.iter()));
        assert!(built.collections().eq(expected.collections()));
    }

    #[test]
    fn a_catalog_built_from_chunks_equals_one_recorded_entry_by_entry() {
        // Collections interleave, chunks split runs, and the last entry for an id wins even
        // out of order.
        let mut entries: Vec<_> =
            (0..40).map(|i| entry(i, if i % 7 < 3 { "a" } else { "b/c" })).collect();
        entries.push(entry(5, "b/c"));
        entries.push(entry(1, "a"));
        let mut builder = CatalogBuilder::new();
        for chunk in entries.chunks(6) {
            builder.push(chunk.to_vec());
        }
        assert_eq!(builder.len(), entries.len());
        let mut built = Catalog::default();
        built.record_built(builder, &Sequential);
        assert_same(&built, &one_by_one(&entries));
        assert_eq!(built.len(), 40);
    }

    #[test]
    fn a_built_catalog_recorded_over_another_replaces_its_entries() {
        let first: Vec<_> = (0..10).map(|i| entry(i, "a")).collect();
        let mut second: Vec<_> = (5..15).map(|i| entry(i, "a")).collect();
        for (_, entry) in &mut second {
            entry.heads.push(ChangeHash([0xEE; 32]));
        }
        let mut catalog = one_by_one(&first);
        let mut builder = CatalogBuilder::new();
        builder.push(second.clone());
        catalog.record_built(builder, &Sequential);
        let expected = one_by_one(&[first, second].concat());
        assert_same(&catalog, &expected);
    }
}
