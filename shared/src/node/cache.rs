//! Which documents are in memory: a cache bounded by stored bytes, documents loaded on
//! demand, and quarantine for documents that cannot be held safely.
//!
//! A cold document is only its catalog entry. Work that needs one (a local request, a
//! peer's sync message, an offer to a peer) waits in a per-document queue while the store
//! reads it back, and runs in arrival order once it is loaded. Eviction takes the least
//! recently used documents that nothing is waiting on; each peer keeps its sync state for
//! them, so resuming their sync does not start from nothing.

use std::time::Instant;

use super::{ConnId, Node, Output, Pending, Request, RequestError, RequestId};
use crate::document::Document;
use crate::ids::{Collection, DocId};
use crate::store_task::{SavedSyncStates, StoreTask, StoredDoc};

/// Work that needs a document loaded first.
#[derive(Debug)]
pub(super) enum Deferred {
    /// A local request, with the time it arrived.
    Request { id: RequestId, request: Request, at: Instant },
    /// A peer's sync message.
    Sync { conn: ConnId, collection: Collection, bytes: Vec<u8> },
    /// Offering the document to a peer that holds it differently.
    Offer { conn: ConnId },
}

/// Where a document is, as seen by work that needs it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Residence {
    /// In memory: go ahead.
    Hot,
    /// Stored but not in memory (or being read back): [`Node::defer`] the work.
    Cold,
    /// Neither in memory nor stored.
    Absent,
    /// Held back, for this reason.
    Quarantined(String),
}

/// Longest quarantine reason kept, so hostile input cannot make reasons grow memory.
const MAX_REASON_BYTES: usize = 256;

impl Node {
    /// Where `doc_id` is; a document in memory counts as used.
    pub(super) fn locate(&mut self, doc_id: DocId) -> Residence {
        if self.documents.contains_key(&doc_id) {
            self.touch(doc_id);
            Residence::Hot
        } else if let Some(reason) = self.quarantined.get(&doc_id) {
            Residence::Quarantined(reason.clone())
        } else if self.loading.contains_key(&doc_id) || self.catalog.contains(&doc_id) {
            Residence::Cold
        } else {
            Residence::Absent
        }
    }

    /// Queues work on a cold document and has the store read it back, once.
    pub(super) fn defer(&mut self, doc_id: DocId, work: Deferred) {
        if let Some(queue) = self.loading.get_mut(&doc_id) {
            queue.push(work);
            return;
        }
        self.loading.insert(doc_id, vec![work]);
        self.store(StoreTask::Load { doc_id }, Pending::Load { doc_id });
    }

    /// A document came back from the store: hold it (or quarantine it), then run the work
    /// that waited for it, in order.
    pub(super) fn on_loaded(
        &mut self,
        doc_id: DocId,
        stored: Option<StoredDoc>,
        sync_states: SavedSyncStates,
    ) {
        let waiting = self.loading.remove(&doc_id).unwrap_or_default();
        self.note_work(doc_id);
        let limit = self.config.max_document_bytes;
        let loaded = match stored {
            None => Err("the store holds no such document".to_owned()),
            // Writes and merges stop at the limit, so a document far past it did not get
            // there through this node, and loading it could exhaust memory.
            Some(stored) if stored.stored_bytes() > limit.saturating_mul(2) => Err(format!(
                "{} bytes stored, over twice the document limit of {limit}",
                stored.stored_bytes()
            )),
            Some(stored) => Document::load(&stored, self.actor.clone()).map_err(|e| e.to_string()),
        };
        match loaded {
            Ok(mut document) => {
                document.saved_sync_states = sync_states.into_iter().collect();
                self.stats.document_loads += 1;
                self.cache_insert(doc_id, document);
            }
            Err(reason) => self.quarantine(doc_id, format!("cannot load: {reason}")),
        }
        for work in waiting {
            match work {
                Deferred::Request { id, request, at } => {
                    self.worked_locally = true;
                    self.on_request(at, id, request)
                }
                Deferred::Sync { conn, collection, bytes } => {
                    if self.peers.contains_key(&conn) {
                        self.on_doc_sync(conn, doc_id, collection, &bytes);
                    }
                }
                Deferred::Offer { conn } => self.offer(conn, doc_id),
            }
        }
    }

    /// Holds a document back: it leaves memory, peers stop syncing it, and requests for it
    /// are answered with the reason. The store keeps it as it was, and the node keeps serving
    /// every other document and every peer.
    pub(super) fn quarantine(&mut self, doc_id: DocId, mut reason: String) {
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        self.cache_remove(doc_id);
        for peer in self.peers.values_mut() {
            peer.sync_states.remove(&doc_id);
            peer.awaiting_reply.remove(&doc_id);
        }
        for (id, _) in self.parked_reads.remove(&doc_id).unwrap_or_default() {
            let result = Err(RequestError::Quarantined { doc_id, reason: reason.clone() });
            self.outputs.push_back(Output::Respond { id, result });
        }
        self.forget_unacknowledged(&doc_id);
        self.stats.documents_quarantined += 1;
        self.quarantined.insert(doc_id, reason);
    }

    /// Marks a document as just used.
    pub(super) fn touch(&mut self, doc_id: DocId) {
        self.use_clock += 1;
        if let Some(document) = self.documents.get_mut(&doc_id) {
            self.lru.remove(&document.last_used);
            document.last_used = self.use_clock;
            self.lru.insert(self.use_clock, doc_id);
        }
    }

    /// Puts a document in memory, charging its stored size to the cache.
    pub(super) fn cache_insert(&mut self, doc_id: DocId, document: Document) {
        self.cache_remove(doc_id);
        self.cached_bytes += document.stored_bytes;
        self.documents.insert(doc_id, document);
        self.touch(doc_id);
    }

    /// Takes a document out of memory.
    pub(super) fn cache_remove(&mut self, doc_id: DocId) -> Option<Document> {
        let document = self.documents.remove(&doc_id)?;
        self.lru.remove(&document.last_used);
        self.cached_bytes = self.cached_bytes.saturating_sub(document.stored_bytes);
        Some(document)
    }

    /// Records that a document's stored size changed.
    pub(super) fn resize(&mut self, doc_id: DocId, stored_bytes: usize) {
        if let Some(document) = self.documents.get_mut(&doc_id) {
            self.cached_bytes =
                self.cached_bytes.saturating_sub(document.stored_bytes) + stored_bytes;
            document.stored_bytes = stored_bytes;
        }
    }

    /// Evicts least recently used documents until the cache is within its budget. Documents
    /// that work is in progress on stay: uncommitted appends, parked reads, news not yet sent,
    /// a change-carrying message a peer has not answered or one held back (`pacing`).
    pub(super) fn evict_over_budget(&mut self) {
        let budget = self.config.document_cache_bytes;
        let mut busy = Vec::new();
        while self.cached_bytes > budget {
            let Some((_, doc_id)) = self.lru.pop_first() else { break };
            if self.evictable(&doc_id) {
                self.evict(doc_id);
            } else {
                busy.push(doc_id);
            }
        }
        for doc_id in busy {
            if let Some(document) = self.documents.get(&doc_id) {
                self.lru.insert(document.last_used, doc_id);
            }
        }
    }

    fn evictable(&self, doc_id: &DocId) -> bool {
        self.documents.get(doc_id).is_some_and(|d| !d.is_placeholder && d.persisting == 0)
            && !self.parked_reads.contains_key(doc_id)
            && !self.announced.contains(doc_id)
            && !self.peers.values().any(|p| p.awaiting_reply.contains(doc_id))
            && !self.pacing.is_held(doc_id)
    }

    /// Sync states stay as they are: a state cut down to Automerge's persisted form (the
    /// shared heads) no longer knows the peer's heads, so both sides would keep sending each
    /// other messages for an idle document. They go when the connection does.
    fn evict(&mut self, doc_id: DocId) {
        if self.cache_remove(doc_id).is_some() {
            self.stats.document_evictions += 1;
        }
    }
}
