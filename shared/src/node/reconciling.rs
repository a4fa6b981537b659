//! Range-based reconciliation with node peers: which documents the two sides hold
//! differently, found in a few round trips whose bytes grow with the differences, not with
//! the number of documents.
//!
//! The side with the smaller node id initiates, when the handshake completes and at every
//! anti-entropy tick; the other side answers. Every document found missing on the peer or
//! held differently starts Automerge's sync protocol with a fresh sync state, as an
//! inventory used to.

use automerge::sync;

use super::{ConnId, Node};
use crate::document::heads_digest;
use crate::message::Message;
use crate::reconcile::{
    Difference, IdRange, Item, MemoryStore, RangePart, ReconcileConfig, ReconcileMessage,
    Reconciler,
};

impl Node {
    /// Starts a reconciliation session with a node peer, if this side initiates for it.
    ///
    /// A session still open is abandoned: at the next tick one of its messages was lost (or
    /// the link is far slower than the interval), and nothing else would ever close it. A
    /// fresh session finds every difference present when it begins.
    pub(super) fn start_reconciliation(&mut self, conn: ConnId) {
        let initiates = self
            .peers
            .get(&conn)
            .is_some_and(|p| p.replicates_everything() && self.node_id < p.node_id);
        if !initiates {
            return;
        }
        let Some(mut reconciler) = self.new_reconciler() else { return };
        let message = reconciler.initiate();
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconciler = Some(reconciler);
        }
        self.send(conn, Message::Reconcile { message });
    }

    /// Answers one reconciliation message and starts syncing what it revealed.
    pub(super) fn on_reconcile(&mut self, conn: ConnId, message: &ReconcileMessage) {
        let Some(peer) = self.peers.get_mut(&conn) else { return };
        if !peer.replicates_everything() {
            return self.refuse(conn, "clients do not reconcile".into());
        }
        // A summary of the whole id range opens a session: it replaces whatever is left of
        // one the initiator abandoned, whose unsent answers would otherwise overlap it.
        let previous = peer.reconciler.take().filter(|_| !opens_session(message));
        let Some(mut reconciler) = previous.or_else(|| self.new_reconciler()) else { return };
        let (reply, differences) = match reconciler.handle(message) {
            Ok(answer) => answer,
            Err(error) => return self.refuse(conn, format!("reconciliation refused: {error}")),
        };
        // The peer answers a non-empty message, and an empty one only when it still holds
        // answers of its own, which then open a session here again.
        let awaits_answer =
            reply.as_ref().is_some_and(|r| !r.ranges.is_empty() || reconciler.has_pending());
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconciler = awaits_answer.then_some(reconciler);
        }
        if let Some(reply) = reply {
            self.send(conn, Message::Reconcile { message: reply });
        }
        for difference in differences {
            self.on_difference(conn, difference);
        }
    }

    /// Pushes a document the peer lacks or holds differently. A document only the peer holds
    /// needs nothing here: the peer sees it as missing on this side and pushes it, and its
    /// sync messages carry the collection.
    fn on_difference(&mut self, conn: ConnId, difference: Difference) {
        let doc_id = match difference {
            Difference::OnlyHere(doc_id) | Difference::Differs(doc_id) => doc_id,
            Difference::OnlyThere(_) => return,
        };
        if let Some(peer) = self.peers.get_mut(&conn) {
            // A fresh state forgets anything a lost message left in flight.
            peer.sync_states.insert(doc_id, sync::State::new());
            peer.awaiting_reply.remove(&doc_id);
        }
        self.sync_with(conn, doc_id);
    }

    /// One side of a session over the documents as they are now.
    fn new_reconciler(&self) -> Option<Reconciler<MemoryStore>> {
        // The default configuration is within every limit, so this never gives up.
        Reconciler::new(self.reconcile_set(), ReconcileConfig::default()).ok()
    }

    /// The set a session reconciles: every document that exists here (not a placeholder for
    /// one still arriving) and whose heads are committed, since peers must never hear of
    /// heads that could be lost. A document left out while its appends commit is offered to
    /// peers when they do.
    ///
    /// Built in O(N) for each session; an index kept up to date as documents change, with
    /// per-subtree fingerprints, would make sessions cost O(log N) per range instead.
    fn reconcile_set(&self) -> MemoryStore {
        self.documents
            .iter()
            .filter(|(_, d)| !d.is_placeholder && d.persisting == 0)
            .map(|(doc_id, d)| Item {
                doc_id: *doc_id,
                heads_digest: heads_digest(&d.doc.get_heads()),
            })
            .collect()
    }
}

/// Whether `message` is the first of a session: the summary of the whole id range, which
/// only [`Reconciler::initiate`] sends (a split always yields more than one range).
fn opens_session(message: &ReconcileMessage) -> bool {
    matches!(
        message.ranges.as_slice(),
        [RangePart::Fingerprint { range, .. }] if *range == IdRange::full()
    )
}
