//! Replication lag: per node peer, the documents with committed changes the peer has not yet
//! acknowledged, each with the HLC time its oldest unacknowledged change was offered. The
//! age of the oldest is the peer's lag.
//!
//! A peer acknowledges a document when its sync message names our current heads as its
//! own: it then holds everything we hold.

use std::time::Duration;

use super::{ConnId, Node};
use crate::ids::{DocId, NodeId};
use crate::message::Role;
use crate::peer::PeerPhase;

/// How far one peer is behind this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLag {
    /// The peer.
    pub peer: NodeId,
    /// What it is.
    pub role: Role,
    /// Age of the oldest change it has not acknowledged (zero when it has everything).
    pub lag: Duration,
    /// Documents with changes it has not acknowledged.
    pub pending_documents: usize,
}

impl Node {
    /// Notes that `doc_id` has news for the peer on `conn`, offered at `at` (HLC, NTP64);
    /// an older unacknowledged offer keeps its time.
    pub(super) fn note_unacknowledged(&mut self, conn: ConnId, doc_id: DocId, at: u64) {
        if let Some(peer) = self.peers.get_mut(&conn).filter(|p| p.replicates_everything()) {
            peer.unacknowledged.entry(doc_id).or_insert(at);
        }
    }

    /// Forgets a document's pending acknowledgments (it left memory for good: quarantine).
    pub(super) fn forget_unacknowledged(&mut self, doc_id: &DocId) {
        for peer in self.peers.values_mut() {
            peer.unacknowledged.remove(doc_id);
        }
    }

    /// How far each node peer is behind, by HLC.
    pub fn replication_lag(&self) -> Vec<PeerLag> {
        let now = self.hlc.new_timestamp().get_time().as_u64();
        self.peers
            .values()
            .filter_map(|peer| {
                let PeerPhase::Ready(role @ (Role::Agent | Role::Hub)) = peer.phase else {
                    return None;
                };
                let oldest = peer.unacknowledged.values().min().copied().unwrap_or(now);
                let lag = uhlc::NTP64(now.saturating_sub(oldest)).to_duration();
                let pending_documents = peer.unacknowledged.len();
                Some(PeerLag { peer: peer.node_id, role, lag, pending_documents })
            })
            .collect()
    }
}
