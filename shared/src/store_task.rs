//! Storage effects as data: what the core asks the store to do, and what it gets back.
//!
//! The core never touches a database. It emits [`StoreTask`]s with ids and receives
//! [`StoreReply`]s with the same ids; the store executes tasks strictly in the order they were
//! emitted, which is what lets a compaction delete "every change stored before it".

use automerge::ChangeHash;

use crate::ids::{Collection, DocId, NodeId};

/// A durable store operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTask {
    /// Append new changes of a document and update its heads index entry.
    Append {
        /// The document.
        doc_id: DocId,
        /// Its collection (recorded when the document is first stored).
        collection: Collection,
        /// A saved document holding every change of this one, as it arrived from a peer or an
        /// upload: it replaces the stored snapshot and every change stored before, in the same
        /// transaction, so the heads index never names heads the store does not hold.
        snapshot: Option<Vec<u8>>,
        /// Encoded Automerge changes, each idempotent by hash.
        changes: Vec<Vec<u8>>,
        /// The document's heads after these changes.
        heads: Vec<[u8; 32]>,
        /// HLC time of the write, as the 64-bit NTP value.
        hlc: u64,
        /// The node the changes came from: this node for local writes, else the peer that
        /// delivered them. Recorded in the change feed.
        origin: NodeId,
        /// The document carries the deletion tombstone after these changes.
        deleted: bool,
    },
    /// Replace the document's snapshot and drop every change stored before this task.
    Compact {
        /// The document.
        doc_id: DocId,
        /// `Automerge::save()` output covering every change stored so far.
        snapshot: Vec<u8>,
    },
    /// Read a document back (after its in-memory copy was discarded), with the sync states
    /// saved for it.
    Load {
        /// The document.
        doc_id: DocId,
    },
    /// Save what a departed peer and this node were known to share of each document
    /// (Automerge's persisted sync state), so the next connection resumes from there.
    SaveSyncStates {
        /// The peer.
        peer: NodeId,
        /// Per document, `sync::State::encode()` output.
        states: Vec<(DocId, Vec<u8>)>,
    },
}

/// Sync states saved for one document: per peer, `sync::State::encode()` output.
pub type SavedSyncStates = Vec<(NodeId, Vec<u8>)>;

/// A document as stored: snapshot plus incremental changes since it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// The document.
    pub doc_id: DocId,
    /// Its collection.
    pub collection: Collection,
    /// The compacted snapshot, if one was written.
    pub snapshot: Option<Vec<u8>>,
    /// Changes stored since the snapshot, in the order they were stored.
    pub changes: Vec<Vec<u8>>,
}

impl StoredDoc {
    /// Bytes the document takes in the store.
    pub fn stored_bytes(&self) -> usize {
        self.snapshot.as_ref().map_or(0, Vec::len)
            + self.changes.iter().map(Vec::len).sum::<usize>()
    }
}

/// A document's heads index entry: what a node knows of a stored document without loading
/// it. The node holds one per document, so a cold document costs this much memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Its collection.
    pub collection: Collection,
    /// Its committed heads.
    pub heads: Vec<ChangeHash>,
    /// It carries the deletion tombstone.
    pub deleted: bool,
}

/// The store's answer to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreReply {
    /// The task's transaction committed.
    Committed,
    /// The answer to [`StoreTask::Load`]: the document (`None` if the store has no such
    /// document) and the sync states saved for it.
    Loaded(Option<StoredDoc>, SavedSyncStates),
}
