//! Range-based reconciliation with node peers: which documents the two sides hold
//! differently, found in a few round trips whose bytes grow with the differences, not with
//! the number of documents.
//!
//! The side with the smaller node id initiates, when the handshake completes and at every
//! anti-entropy tick; the other side answers. Every document found missing on the peer or
//! held differently starts Automerge's sync protocol with a fresh sync state, as an
//! inventory used to.

use super::{ConnId, Node};
use crate::message::Message;
use crate::reconcile::{
    Difference, IdRange, RangePart, ReconcileConfig, ReconcileMessage, Reconciler,
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
        let Ok(mut reconciler) =
            Reconciler::new(self.catalog.reconcile_set(), ReconcileConfig::default())
        else {
            return;
        };
        let message = reconciler.initiate();
        let session = reconciler.suspend();
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconcile_session = Some(session);
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
        let previous = peer.reconcile_session.take().filter(|_| !opens_session(message));
        let set = self.catalog.reconcile_set();
        let config = ReconcileConfig::default();
        let Ok(mut reconciler) = Reconciler::resume(set, config, previous.unwrap_or_default())
        else {
            return;
        };
        let (reply, differences) = match reconciler.handle(message) {
            Ok(answer) => answer,
            Err(error) => return self.refuse(conn, format!("reconciliation refused: {error}")),
        };
        let session = reconciler.suspend();
        // The peer answers a non-empty message, and an empty one only when it still holds
        // answers of its own, which then open a session here again.
        let awaits_answer =
            reply.as_ref().is_some_and(|r| !r.ranges.is_empty() || session.has_pending());
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.reconcile_session = awaits_answer.then_some(session);
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
        match difference {
            Difference::OnlyHere(doc_id) | Difference::Differs(doc_id) => self.offer(conn, doc_id),
            Difference::OnlyThere(_) => {}
        }
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
