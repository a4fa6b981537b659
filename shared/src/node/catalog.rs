//! The catalog: every committed document's heads index entry, held without loading the
//! document, and the reconciliation set derived from it.
//!
//! Both are updated when an append commits, never before, so reconciliation only ever
//! speaks of heads the store holds. Sessions read the set in place: a session costs the
//! ranges it touches, not a copy of the set.

use std::collections::BTreeMap;

use crate::document::heads_digest;
use crate::ids::DocId;
use crate::reconcile::MemoryStore;
use crate::store_task::IndexEntry;

/// Committed documents, hot or cold.
#[derive(Debug, Default)]
pub(super) struct Catalog {
    entries: BTreeMap<DocId, IndexEntry>,
    reconcile: MemoryStore,
}

impl Catalog {
    /// Records a document's committed state.
    pub(super) fn record(&mut self, doc_id: DocId, entry: IndexEntry) {
        self.reconcile.insert(doc_id, heads_digest(&entry.heads));
        self.entries.insert(doc_id, entry);
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

    /// The set reconciliation sessions read: (document, digest of its committed heads).
    pub(super) fn reconcile_set(&self) -> &MemoryStore {
        &self.reconcile
    }
}
