//! Collections a node does not hold. A hub holds only what its region's replication policy
//! gives it: a peer that offers another collection is told so, with the reason (where the
//! collection lives), and both sides then leave it out of that connection's scope.

use super::{ConnId, Node};
use crate::ids::Collection;
use crate::message::{Message, MAX_REASON_BYTES};
use crate::scope::MAX_SCOPE_COLLECTIONS;

/// Most refused collections remembered per peer for the status report.
const REFUSALS_KEPT_PER_PEER: usize = 100;

impl Node {
    /// Whether this node holds `collection` (always, without a holding rule).
    pub(super) fn holds(&self, collection: &Collection) -> bool {
        self.holding.as_ref().is_none_or(|rule| rule.check(collection).is_ok())
    }

    /// Whether this node holds `collection`; if not, the peer on `conn` is told why and the
    /// collection leaves the connection's scope, so it is refused once per connection.
    pub(super) fn held_or_refused(&mut self, conn: ConnId, collection: &Collection) -> bool {
        let Some(Err(mut reason)) = self.holding.as_ref().map(|rule| rule.check(collection)) else {
            return true;
        };
        if let Some(peer) = self.peers.get_mut(&conn) {
            if peer.scope.except.len() < MAX_SCOPE_COLLECTIONS {
                peer.scope.except.insert(collection.clone());
            }
        }
        truncate(&mut reason);
        self.send(conn, Message::NotHeld { collection: collection.clone(), reason });
        false
    }

    /// The peer on `conn` does not hold `collection`: stop offering it there, and remember
    /// why for the status report.
    pub(super) fn on_not_held(&mut self, conn: ConnId, collection: Collection, reason: String) {
        let Some(peer) = self.peers.get_mut(&conn) else { return };
        if peer.scope.except.len() < MAX_SCOPE_COLLECTIONS {
            peer.scope.except.insert(collection.clone());
        }
        peer.reconcile_sessions.remove(&collection);
        let refused = self.refused_by_peers.entry(peer.node_id).or_default();
        if refused.len() < REFUSALS_KEPT_PER_PEER || refused.contains_key(&collection) {
            refused.insert(collection, reason);
        }
    }
}

fn truncate(reason: &mut String) {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
}
