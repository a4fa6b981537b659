//! Range-based reconciliation with node peers: which documents the two sides hold
//! differently, found in a few round trips whose bytes grow with the differences, not with
//! the number of documents.
//!
//! Sessions are scoped per collection, over the collections both sides replicate, and run
//! side by side: each message carries one part per collection still being reconciled. The
//! side with the smaller node id initiates, when the handshake completes and at every
//! anti-entropy tick; the other side answers. Every document found missing on the peer or
//! held differently starts Automerge's sync protocol with a fresh sync state, as an
//! inventory used to.

use std::collections::BTreeMap;

use super::{ConnId, Node};
use crate::message::{CollectionReconcile, Message};
use crate::reconcile::{
    Difference, Fingerprint, IdRange, MemoryStore, RangePart, ReconcileConfig, ReconcileMessage,
    Reconciler,
};
use crate::scope::MAX_SCOPE_COLLECTIONS;

impl Node {
    /// Starts reconciliation sessions with a node peer, one per collection both replicate,
    /// if this side initiates for it: one message carries every collection's summary.
    ///
    /// Sessions still open are abandoned: at the next tick one of their messages was lost (or
    /// the link is far slower than the interval), and nothing else would ever close them. A
    /// fresh session finds every difference present when it begins.
    pub(super) fn start_reconciliation(&mut self, conn: ConnId) {
        let Some(peer) = self.peers.get(&conn) else { return };
        if !(peer.replicates_everything() && self.node_id < peer.node_id) {
            return;
        }
        let scope = &peer.scope;
        let mut parts = Vec::new();
        let mut sessions = BTreeMap::new();
        // A node replicating more collections than one message may name reconciles the
        // first of them; the limit is documented with the scope.
        let shared = self.catalog.collections().filter(|(c, _)| scope.contains(c) && self.holds(c));
        for (collection, set) in shared.take(MAX_SCOPE_COLLECTIONS) {
            let Ok(mut reconciler) = Reconciler::new(set, ReconcileConfig::default()) else {
                continue;
            };
            let message = reconciler.initiate();
            sessions.insert(collection.clone(), reconciler.suspend());
            parts.push(CollectionReconcile { collection: collection.clone(), message });
        }
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconcile_sessions = sessions;
        }
        self.send(conn, Message::Reconcile { opens: true, parts });
    }

    /// Answers one reconciliation message, every collection's part in one reply, and starts
    /// syncing what it revealed. A collection this node does not hold is refused, once.
    pub(super) fn on_reconcile(
        &mut self,
        conn: ConnId,
        opens: bool,
        parts: Vec<CollectionReconcile>,
    ) {
        let Some(peer) = self.peers.get(&conn) else { return };
        if !peer.replicates_everything() {
            return self.refuse(conn, "clients do not reconcile".into());
        }
        let in_scope: Vec<CollectionReconcile> =
            parts.into_iter().filter(|part| peer.scope.contains(&part.collection)).collect();
        let mut work = BTreeMap::new();
        for part in in_scope {
            if self.held_or_refused(conn, &part.collection) {
                work.insert(part.collection, part.message);
            }
        }
        let Some(peer) = self.peers.get_mut(&conn) else { return };
        // An opening replaces whatever is left of sessions the initiator abandoned, whose
        // unsent answers would otherwise overlap the new ones.
        let mut sessions = std::mem::take(&mut peer.reconcile_sessions);
        if opens {
            sessions.clear();
        }
        let scope = peer.scope.clone();
        if opens {
            // A collection the opening does not list, the initiator holds nothing of.
            let shared = self.catalog.collections().filter(|(c, _)| scope.contains(c));
            for (collection, _) in shared.filter(|(c, _)| self.holds(c)) {
                work.entry(collection.clone()).or_insert_with(empty_summary);
            }
        }
        let empty = MemoryStore::new();
        let mut replies = Vec::new();
        let mut differences = Vec::new();
        for (collection, message) in work {
            let set = self.catalog.reconcile_set(&collection).unwrap_or(&empty);
            let previous = sessions.remove(&collection).unwrap_or_default();
            let Ok(mut reconciler) = Reconciler::resume(set, ReconcileConfig::default(), previous)
            else {
                continue;
            };
            let (reply, found) = match reconciler.handle(&message) {
                Ok(answer) => answer,
                Err(error) => {
                    return self
                        .refuse(conn, format!("reconciliation of {collection} refused: {error}"))
                }
            };
            let session = reconciler.suspend();
            // The peer answers a non-empty message, and an empty one only when it still
            // holds answers of its own, which then open a session here again.
            let awaits_answer =
                reply.as_ref().is_some_and(|r| !r.ranges.is_empty() || session.has_pending());
            if awaits_answer {
                sessions.insert(collection.clone(), session);
            }
            if let Some(reply) = reply {
                replies.push(CollectionReconcile { collection, message: reply });
            }
            differences.extend(found);
        }
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconcile_sessions = sessions;
        }
        if !replies.is_empty() {
            self.send(conn, Message::Reconcile { opens: false, parts: replies });
        }
        for difference in differences {
            self.on_difference(conn, difference);
        }
    }

    /// Pushes a document the peer lacks or holds differently. A document only the peer holds
    /// needs nothing here: the peer sees it as missing on this side and pushes it, and its
    /// sync messages carry the collection.
    fn on_difference(&mut self, conn: ConnId, difference: Difference) {
        match difference {
            Difference::OnlyHere(doc_id) | Difference::Differs(doc_id) => self.offer(conn, doc_id),
            Difference::OnlyThere(_) => {}
        }
    }
}

/// The opening summary of a collection the initiator holds nothing of.
fn empty_summary() -> ReconcileMessage {
    ReconcileMessage {
        ranges: vec![RangePart::Fingerprint {
            range: IdRange::full(),
            fingerprint: Fingerprint::EMPTY,
            count: 0,
        }],
    }
}
