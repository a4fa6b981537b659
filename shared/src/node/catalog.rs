//! The catalog: every committed document's heads index entry, held without loading the
//! document, and the reconciliation set derived from it.
//!
//! Both are updated when an append commits, never before, so reconciliation only ever
//! speaks of heads the store holds. Sessions read the set in place: a session costs the
//! ranges it touches, not a copy of the set.

use std::collections::BTreeMap;

use crate::document::heads_digest;
use crate::ids::{Collection, DocId};
use crate::reconcile::{Item, MemoryStore};
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
        let mut by_collection: BTreeMap<Collection, Vec<Item>> = BTreeMap::new();
        for (doc_id, entry) in &entries {
            let item = Item { doc_id: *doc_id, heads_digest: heads_digest(&entry.heads) };
            match by_collection.get_mut(&entry.collection) {
                Some(items) => items.push(item),
                None => {
                    by_collection.insert(entry.collection.clone(), vec![item]);
                }
            }
        }
        for (collection, items) in by_collection {
            match self.reconcile.get_mut(&collection) {
                Some(set) => items.into_iter().for_each(|i| {
                    set.insert(i.doc_id, i.heads_digest);
                }),
                None => {
                    self.reconcile.insert(collection, items.into_iter().collect());
                }
            }
        }
        if self.entries.is_empty() {
            self.entries = entries.into_iter().collect();
        } else {
            self.entries.extend(entries);
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
