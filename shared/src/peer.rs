//! What a node knows about one connection: handshake phase, frame buffer, sync states, and
//! the reconciliation session in progress.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::frame::FrameDecoder;
use crate::ids::{Collection, DocId, NodeId};
use crate::message::Role;
use crate::peer_sync::SyncStates;
use crate::reconcile::SuspendedSession;
use crate::scope::CollectionScope;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPhase {
    /// Our hello is sent; theirs has not arrived.
    AwaitingHello,
    /// Hellos exchanged; documents flow.
    Ready(Role),
}

/// One connected peer.
#[derive(Debug)]
pub struct Peer {
    /// The peer's id as proven by the transport (its certificate).
    pub node_id: NodeId,
    /// Handshake progress.
    pub phase: PeerPhase,
    /// Reassembles frames from the byte stream.
    pub decoder: FrameDecoder,
    /// Automerge sync state per document, for this peer only.
    pub sync_states: SyncStates,
    /// When the connection is closed if the peer has still not said hello.
    pub hello_deadline: Option<Instant>,
    /// Documents for which a message carrying changes is unanswered. No further message for
    /// them goes to this peer until it answers, so changes made meanwhile travel together and
    /// the receiver applies them in one batch (Automerge's remote apply costs grow with the
    /// document for every call, not per change).
    pub awaiting_reply: BTreeSet<DocId>,
    /// This side of the reconciliation sessions in progress with the peer, one per collection
    /// still being reconciled: node peers only. Each message is answered from the node's
    /// catalog as it is then.
    pub reconcile_sessions: BTreeMap<Collection, SuspendedSession>,
    /// The collections both sides replicate, known once the peer's hello arrives.
    pub scope: CollectionScope,
    /// When bytes last arrived from the peer (or the connection came up).
    pub last_heard: Instant,
    /// When this side last pinged the peer.
    pub last_ping: Option<Instant>,
    /// Documents whose committed changes the peer has not acknowledged, with the HLC time
    /// (NTP64) of the oldest offer: its replication lag.
    pub unacknowledged: BTreeMap<DocId, u64>,
}

impl Peer {
    /// A peer whose transport just came up.
    pub fn new(node_id: NodeId, max_frame_bytes: usize, now: Instant) -> Self {
        Self {
            node_id,
            phase: PeerPhase::AwaitingHello,
            decoder: FrameDecoder::new(max_frame_bytes),
            sync_states: SyncStates::default(),
            hello_deadline: None,
            awaiting_reply: BTreeSet::new(),
            reconcile_sessions: BTreeMap::new(),
            scope: CollectionScope::all(),
            last_heard: now,
            last_ping: None,
            unacknowledged: BTreeMap::new(),
        }
    }

    /// True once the handshake is complete.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, PeerPhase::Ready(_))
    }

    /// True for nodes (agents, hubs), which replicate every document in the scope both sides
    /// hold; false for clients.
    pub fn replicates_everything(&self) -> bool {
        matches!(self.phase, PeerPhase::Ready(Role::Agent | Role::Hub))
    }

    /// True for a node peer that replicates `collection` with us.
    pub fn replicates(&self, collection: &Collection) -> bool {
        self.replicates_everything() && self.scope.contains(collection)
    }

    /// True if this peer should hear about changes to `doc_id`, of `collection`.
    pub fn follows(&self, doc_id: &DocId, collection: &Collection) -> bool {
        if self.replicates_everything() {
            return self.scope.contains(collection);
        }
        self.is_ready() && self.sync_states.contains(doc_id)
    }
}
