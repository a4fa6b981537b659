//! The sync core of one node: a deterministic state machine with no I/O.
//!
//! The control loop, as a driver runs it:
//! 1. feed an [`Input`] (transport bytes, a connection event, a local request, a store reply)
//!    through [`Node::handle_input`], or call [`Node::handle_timeout`] when
//!    [`Node::poll_timeout`] is due;
//! 2. drain [`Node::poll_output`] and carry out each [`Output`] (send bytes, close a
//!    connection, run a store task, answer a request);
//! 3. repeat.
//!
//! Invariants:
//! - A local write is answered only after the store reports its task committed.
//! - After the node applies changes from anywhere, it tells its peers only once those changes are
//!   committed, so a hub never advertises heads it could lose in a crash.
//! - Input from a peer never panics the node: framing, decoding and Automerge errors close that
//!   connection with a [`Message::Refuse`] that says why.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, ChangeHash, ReadDoc};

use crate::config::SyncConfig;
use crate::document::{guarded, heads_digest, heads_hex, Document, DocumentError};
use crate::durability::HubAcks;
use crate::frame::encode_frame;
use crate::ids::{Collection, DocId, NodeId};
use crate::message::{
    Envelope, InventoryEntry, Message, Role, MAX_INVENTORY_ENTRIES_PER_MESSAGE, PROTOCOL_VERSION,
};
use crate::ops::{apply_ops, Op, OpError};
use crate::peer::{Peer, PeerPhase};
use crate::store_task::{StoreReply, StoreTask, StoredDoc};

/// Names one transport connection, chosen by the driver.
pub type ConnId = u64;
/// Names one local request, chosen by the driver.
pub type RequestId = u64;
/// Names one store task, chosen by the node.
pub type TaskId = u64;

/// Something that happened outside the node.
#[derive(Debug)]
pub enum Input {
    /// A transport connection came up; `peer` is the id its certificate proves.
    Connected {
        /// The connection.
        conn: ConnId,
        /// The authenticated peer.
        peer: NodeId,
    },
    /// Bytes arrived on a connection.
    Received {
        /// The connection.
        conn: ConnId,
        /// Whatever the transport delivered; frames may be split or joined arbitrarily.
        bytes: Vec<u8>,
    },
    /// A connection is gone.
    Disconnected {
        /// The connection.
        conn: ConnId,
    },
    /// A local application request.
    Request {
        /// Echoed in the response.
        id: RequestId,
        /// What is asked.
        request: Request,
    },
    /// The store finished a task.
    StoreDone {
        /// The task.
        task: TaskId,
        /// Its outcome; an error means the store cannot be trusted and the driver stops.
        reply: StoreReply,
    },
}

/// A local application request.
#[derive(Debug)]
pub enum Request {
    /// Create a document and apply `ops` as its first change.
    Create {
        /// The new document's id (drawn by the driver).
        doc_id: DocId,
        /// Its collection.
        collection: Collection,
        /// Initial content.
        ops: Vec<Op>,
    },
    /// Apply `ops` to a document as one change.
    Edit {
        /// The document.
        doc_id: DocId,
        /// The edit.
        ops: Vec<Op>,
    },
    /// Answer once a hub has committed every change up to `heads` of a document, or at
    /// `deadline` with what is known then.
    AwaitHub {
        /// The document.
        doc_id: DocId,
        /// Heads as hex, as a write's answer gave them.
        heads: Vec<String>,
        /// When to stop waiting.
        deadline: Instant,
    },
    /// Report the node's sync state (for `/v1/status`).
    Status,
    /// Whether a document exists here (cheap: nothing is materialized).
    Exists {
        /// The document.
        doc_id: DocId,
    },
    /// Read a document as it was at `heads` (hex).
    ReadAt {
        /// The document.
        doc_id: DocId,
        /// The heads to read at.
        heads: Vec<String>,
    },
    /// A page of a document's change history, oldest first.
    History {
        /// The document.
        doc_id: DocId,
        /// Changes to skip.
        offset: usize,
        /// Most changes to return.
        limit: usize,
    },
    /// Delete a document: a tombstone change that replicates like any write.
    Delete {
        /// The document.
        doc_id: DocId,
    },
    /// Merge raw Automerge bytes (a saved document or changes) into a document, creating it
    /// in `collection` if it does not exist.
    Import {
        /// The document.
        doc_id: DocId,
        /// Where a new document goes; `None` means it must exist.
        collection: Option<Collection>,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The document saved as Automerge bytes.
    Export {
        /// The document.
        doc_id: DocId,
    },
    /// Read a document's current state.
    Read {
        /// The document.
        doc_id: DocId,
    },
}

/// A successful answer to a [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// The write is durable.
    Written {
        /// The document.
        doc_id: DocId,
        /// Its heads after the write, as hex.
        heads: Vec<String>,
    },
    /// The document's current state.
    Document {
        /// The document.
        doc_id: DocId,
        /// Its collection.
        collection: Collection,
        /// Its heads, as hex.
        heads: Vec<String>,
        /// The materialized JSON.
        doc: serde_json::Value,
    },
    /// How durable the asked-for heads are.
    Durability(DurabilityReport),
    /// The node's sync state.
    Status(StatusReport),
    /// A page of history.
    History {
        /// The changes, oldest first.
        changes: Vec<crate::document::ChangeInfo>,
        /// How many changes the document has.
        total: usize,
    },
    /// Raw Automerge bytes.
    Bytes(Vec<u8>),
    /// The document exists and is not deleted.
    Exists,
}

/// The node's sync state, in answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// A hub is connected now.
    pub hub_connected: bool,
    /// Documents held.
    pub documents: usize,
    /// Documents whose current heads no hub has acknowledged yet.
    pub documents_pending_hub: usize,
    /// HLC time of the last sync message from a hub.
    pub last_hub_sync: Option<uhlc::Timestamp>,
    /// The node's clock now.
    pub clock: uhlc::Timestamp,
}

/// How durable a set of heads is, in answer to [`Request::AwaitHub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurabilityReport {
    /// Committed on this node.
    pub local: bool,
    /// Committed by a hub.
    pub hub: bool,
}

/// Why a request failed; nothing was applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    /// No such document here.
    #[error("document {0} not found")]
    NotFound(DocId),
    /// A document with that id exists already.
    #[error("document {0} already exists")]
    AlreadyExists(DocId),
    /// The document is being reloaded after an error; try again shortly.
    #[error("document {0} is temporarily unavailable")]
    Unavailable(DocId),
    /// The operations cannot be applied.
    #[error(transparent)]
    BadOps(#[from] OpError),
    /// Heads that are not 64 hex digits, or not in the document.
    #[error("invalid heads: {0}")]
    BadHeads(String),
    /// The document was deleted.
    #[error("document {0} was deleted")]
    Deleted(DocId),
    /// Raw bytes that Automerge cannot load.
    #[error("invalid automerge data: {0}")]
    BadBytes(String),
}

/// Something the driver must do.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send bytes on a connection, in order.
    Transmit {
        /// The connection.
        conn: ConnId,
        /// One or more whole frames.
        bytes: Vec<u8>,
    },
    /// Close a connection (after sending what was queued for it).
    Close {
        /// The connection.
        conn: ConnId,
        /// Why, for logs.
        reason: String,
    },
    /// Run a store task; answer with [`Input::StoreDone`] carrying the same id.
    Store {
        /// The task id.
        task: TaskId,
        /// What to do.
        action: StoreTask,
    },
    /// Answer a local request.
    Respond {
        /// The request.
        id: RequestId,
        /// The answer.
        result: Result<Response, RequestError>,
    },
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Frames received and decoded.
    pub frames_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Bytes of frames sent.
    pub bytes_sent: u64,
    /// Connections closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Peer timestamps refused because they were too far ahead of our clock.
    pub clock_drift_rejections: u64,
    /// Changes committed (local and remote).
    pub changes_committed: u64,
    /// Documents dropped from memory after Automerge panicked, then reloaded.
    pub document_reloads: u64,
}

/// What to do when a store task completes.
#[derive(Debug)]
enum Pending {
    /// Answer a write with the heads it produced, and announce the document.
    Write { request: RequestId, doc_id: DocId, heads: Vec<String> },
    /// Announce a document that received remote changes.
    Announce { doc_id: DocId },
    /// Nothing to do (compaction).
    Nothing,
    /// Put a reloaded document back.
    Reload { doc_id: DocId },
}

/// The sync core of one node.
pub struct Node {
    node_id: NodeId,
    role: Role,
    actor: ActorId,
    hlc: uhlc::HLC,
    config: SyncConfig,
    documents: BTreeMap<DocId, Document>,
    /// Documents whose in-memory copy was discarded and is being read back from the store.
    reloading: BTreeMap<DocId, ()>,
    peers: BTreeMap<ConnId, Peer>,
    pending: BTreeMap<TaskId, Pending>,
    next_task: TaskId,
    outputs: VecDeque<Output>,
    next_anti_entropy: Option<Instant>,
    hub_acks: HubAcks,
    /// Reads waiting for a document's appends to commit.
    parked_reads: BTreeMap<DocId, Vec<(RequestId, Request)>>,
    stats: NodeStats,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.node_id)
            .field("role", &self.role)
            .field("documents", &self.documents.len())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node with no documents. `actor` must be fresh for every start of the process, so that
    /// changes made before a crash and after it never share an (actor, sequence) pair.
    pub fn new(
        node_id: NodeId,
        role: Role,
        actor: ActorId,
        hlc: uhlc::HLC,
        config: SyncConfig,
    ) -> Self {
        Self {
            node_id,
            role,
            actor,
            hlc,
            config,
            documents: BTreeMap::new(),
            reloading: BTreeMap::new(),
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_task: 0,
            outputs: VecDeque::new(),
            next_anti_entropy: None,
            hub_acks: HubAcks::default(),
            parked_reads: BTreeMap::new(),
            stats: NodeStats::default(),
        }
    }

    /// Adds a document read from the store at start-up.
    pub fn load(&mut self, stored: &StoredDoc) -> Result<(), DocumentError> {
        let document = Document::load(stored, self.actor.clone())?;
        self.documents.insert(stored.doc_id, document);
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The node's hybrid logical clock.
    pub fn clock(&self) -> &uhlc::HLC {
        &self.hlc
    }

    /// Counters since start.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Documents in memory.
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &Document)> {
        self.documents.iter().filter(|(_, d)| !d.is_placeholder)
    }

    /// Connections whose handshake completed.
    pub fn ready_peers(&self) -> usize {
        self.peers.values().filter(|p| p.is_ready()).count()
    }

    /// Feeds one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.next_anti_entropy.get_or_insert(now + self.config.anti_entropy_interval());
        match input {
            Input::Connected { conn, peer } => self.on_connected(now, conn, peer),
            Input::Received { conn, bytes } => self.on_received(conn, &bytes),
            Input::Disconnected { conn } => self.on_disconnected(conn),
            Input::Request { id, request } => self.on_request(now, id, request),
            Input::StoreDone { task, reply } => self.on_store_done(task, reply),
        }
    }

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello_deadline =
            self.peers.values().filter(|p| !p.is_ready()).filter_map(|p| p.hello_deadline).min();
        [self.next_anti_entropy, self.hub_acks.next_deadline(), hello_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs timers that are due: periodic anti-entropy with every replicating peer, and
    /// durability waits that reached their deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.is_ready() && p.hello_deadline.is_some_and(|d| d <= now))
            .map(|(c, _)| *c)
            .collect();
        for conn in silent {
            self.refuse(conn, "no hello in time".into());
        }
        for request in self.hub_acks.expired(now) {
            let report = DurabilityReport { local: true, hub: false };
            self.outputs.push_back(Output::Respond {
                id: request,
                result: Ok(Response::Durability(report)),
            });
        }
        match self.next_anti_entropy {
            Some(due) if due <= now => {}
            _ => return,
        }
        self.next_anti_entropy = Some(now + self.config.anti_entropy_interval());
        let conns: Vec<ConnId> =
            self.peers.iter().filter(|(_, p)| p.replicates_everything()).map(|(c, _)| *c).collect();
        for conn in conns {
            self.send_inventory(conn);
        }
    }

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn on_connected(&mut self, now: Instant, conn: ConnId, peer: NodeId) {
        let mut state = Peer::new(peer, self.config.max_frame_bytes);
        state.hello_deadline = Some(now + Duration::from_millis(self.config.hello_timeout_ms));
        self.peers.insert(conn, state);
        self.send(conn, Message::Hello { node_id: self.node_id, role: self.role });
    }

    /// Forgets the peer, and any empty placeholder only a departing client had asked for, so
    /// clients naming documents that never arrive cannot grow memory.
    fn on_disconnected(&mut self, conn: ConnId) {
        let Some(peer) = self.peers.remove(&conn) else { return };
        if peer.replicates_everything() {
            return;
        }
        for doc_id in peer.sync_states.keys() {
            let orphan = self.documents.get(doc_id).is_some_and(|d| d.is_placeholder)
                && !self.peers.values().any(|p| p.sync_states.contains_key(doc_id));
            if orphan {
                self.documents.remove(doc_id);
            }
        }
    }

    fn on_received(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        peer.decoder.push(bytes);
        loop {
            let Some(peer) = self.peers.get_mut(&conn) else {
                return;
            };
            let frame = match peer.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => return self.refuse(conn, error.to_string()),
            };
            let envelope = match Envelope::decode(&frame) {
                Ok(envelope) => envelope,
                Err(error) => return self.refuse(conn, error.to_string()),
            };
            self.stats.frames_received += 1;
            if self.hlc.update_with_timestamp(&envelope.sent_at).is_err() {
                // Data still syncs; only the clock refuses to be dragged forward.
                self.stats.clock_drift_rejections += 1;
            }
            self.on_message(conn, envelope.message);
        }
    }

    fn on_message(&mut self, conn: ConnId, message: Message) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        match (peer.phase, message) {
            (PeerPhase::AwaitingHello, Message::Hello { node_id, role }) => {
                if node_id != peer.node_id {
                    let proven = peer.node_id;
                    return self.refuse(
                        conn,
                        format!("hello names node {node_id}, certificate proves {proven}"),
                    );
                }
                peer.phase = PeerPhase::Ready(role);
                if role != Role::Client {
                    self.send_inventory(conn);
                }
            }
            (_, Message::Refuse { reason, .. }) => {
                self.outputs
                    .push_back(Output::Close { conn, reason: format!("peer refused: {reason}") });
                self.peers.remove(&conn);
            }
            (PeerPhase::Ready(_), Message::Inventory { entries }) => {
                self.on_inventory(conn, entries)
            }
            (PeerPhase::Ready(_), Message::DocSync { doc_id, collection, sync_message }) => {
                self.on_doc_sync(conn, doc_id, collection, &sync_message)
            }
            (PeerPhase::Ready(_), Message::Hello { .. }) => {
                self.refuse(conn, "second hello".into())
            }
            (PeerPhase::AwaitingHello, _) => self.refuse(conn, "expected hello first".into()),
        }
    }

    /// For every document the peer lists that we lack or hold differently, start a fresh sync.
    fn on_inventory(&mut self, conn: ConnId, entries: Vec<InventoryEntry>) {
        for entry in entries {
            if self.reloading.contains_key(&entry.doc_id) {
                continue;
            }
            let document = self
                .documents
                .entry(entry.doc_id)
                .or_insert_with(|| Document::new(entry.collection.clone(), self.actor.clone()));
            if document.collection != entry.collection {
                continue;
            }
            if heads_digest(&document.doc.get_heads()) == entry.heads_digest {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(&conn) {
                // A fresh state forgets anything a lost message left in flight.
                peer.sync_states.insert(entry.doc_id, sync::State::new());
            }
            self.sync_with(conn, entry.doc_id);
        }
    }

    fn on_doc_sync(&mut self, conn: ConnId, doc_id: DocId, collection: Collection, bytes: &[u8]) {
        if self.reloading.contains_key(&doc_id) {
            return; // The next anti-entropy round repairs what this drops.
        }
        let message = match sync::Message::decode(bytes) {
            Ok(message) => message,
            Err(error) => {
                return self.refuse(conn, format!("bad sync message for {doc_id}: {error}"))
            }
        };
        let actor = self.actor.clone();
        let document = self
            .documents
            .entry(doc_id)
            .or_insert_with(|| Document::new(collection.clone(), actor));
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        // Clients name documents by id only; their collection is a default for new ones.
        if document.collection != collection && peer.replicates_everything() {
            let expected = document.collection.clone();
            return self.refuse(
                conn,
                format!("document {doc_id} belongs to {expected}, not {collection}"),
            );
        }
        let origin = peer.node_id;
        let state = peer.sync_states.entry(doc_id).or_default();
        let before = document.doc.get_heads();
        match guarded(|| document.doc.receive_sync_message(state, message)) {
            Ok(()) => {}
            Err(DocumentError::Refused(error)) => {
                return self.refuse(conn, format!("sync of {doc_id} refused: {error}"))
            }
            Err(DocumentError::Panicked(error)) => {
                self.refuse(conn, format!("sync of {doc_id} broke the document: {error}"));
                return self.reload(doc_id);
            }
        }
        let hub_heads = (peer.phase == PeerPhase::Ready(Role::Hub))
            .then(|| state.their_heads.clone())
            .flatten();
        let changed = document.doc.get_heads() != before;
        if let Some(heads) = hub_heads {
            self.hub_advertised(doc_id, heads);
        }
        if changed {
            self.persist(doc_id, &before, origin, None);
        } else {
            self.sync_with(conn, doc_id);
        }
    }

    fn on_request(&mut self, now: Instant, id: RequestId, request: Request) {
        let result = match request {
            Request::Status => Some(Ok(Response::Status(StatusReport {
                hub_connected: self.hub_connected(),
                documents: self.documents().count(),
                documents_pending_hub: self.documents_pending_hub(),
                last_hub_sync: self.last_hub_sync(),
                clock: self.hlc.new_timestamp(),
            }))),
            Request::Exists { doc_id } => Some(self.live(doc_id).map(|_| Response::Exists)),
            Request::AwaitHub { doc_id, heads, deadline } => {
                self.await_hub(now, id, doc_id, &heads, deadline)
            }
            Request::Create { doc_id, collection, ops } => {
                self.create(id, doc_id, collection, &ops)
            }
            Request::Edit { doc_id, ops } => self.edit(id, doc_id, &ops),
            Request::Delete { doc_id } => self.delete(id, doc_id),
            Request::Import { doc_id, collection, bytes } => {
                self.import(id, doc_id, collection, &bytes)
            }
            read @ (Request::Read { .. }
            | Request::ReadAt { .. }
            | Request::History { .. }
            | Request::Export { .. }) => self.read_committed(id, read),
        };
        if let Some(result) = result {
            self.outputs.push_back(Output::Respond { id, result });
        }
    }

    /// Returns `None` when the answer waits for the store.
    fn create(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        collection: Collection,
        ops: &[Op],
    ) -> Option<Result<Response, RequestError>> {
        if self.documents.get(&doc_id).is_some_and(|d| !d.is_placeholder)
            || self.reloading.contains_key(&doc_id)
        {
            return Some(Err(RequestError::AlreadyExists(doc_id)));
        }
        let mut document = Document::new(collection, self.actor.clone());
        if let Err(error) = apply_ops(&mut document.doc, ops, self.commit_time_secs()) {
            return Some(Err(error.into()));
        }
        if document.doc.get_heads().is_empty() {
            // An empty create still needs a change, or there is nothing to store or sync.
            document.doc.empty_commit(automerge::transaction::CommitOptions::default());
        }
        self.documents.insert(doc_id, document);
        self.persist(doc_id, &[], self.node_id, Some(id));
        None
    }

    fn edit(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        ops: &[Op],
    ) -> Option<Result<Response, RequestError>> {
        if self.reloading.contains_key(&doc_id) {
            return Some(Err(RequestError::Unavailable(doc_id)));
        }
        if let Err(error) = self.live(doc_id) {
            return Some(Err(error));
        }
        let time = self.commit_time_secs();
        let document = self.documents.get_mut(&doc_id)?;
        let before = document.doc.get_heads();
        match apply_ops(&mut document.doc, ops, time) {
            Err(error) => Some(Err(error.into())),
            Ok(false) => Some(Ok(Response::Written { doc_id, heads: heads_hex(&before) })),
            Ok(true) => {
                self.persist(doc_id, &before, self.node_id, Some(id));
                None
            }
        }
    }

    /// Answers at once when the heads are already hub-durable (or this node is a hub), else
    /// parks the request until a hub advertises them or the deadline passes.
    fn await_hub(
        &mut self,
        now: Instant,
        id: RequestId,
        doc_id: DocId,
        heads: &[String],
        deadline: Instant,
    ) -> Option<Result<Response, RequestError>> {
        let heads =
            match heads.iter().map(|h| h.parse::<ChangeHash>()).collect::<Result<Vec<_>, _>>() {
                Ok(heads) => heads,
                Err(error) => return Some(Err(RequestError::BadHeads(error.to_string()))),
            };
        let Some(document) = self.documents.get(&doc_id).filter(|d| !d.is_placeholder) else {
            return Some(Err(RequestError::NotFound(doc_id)));
        };
        let local = heads.iter().all(|h| document.doc.get_change_by_hash(h).is_some());
        let hub = local
            && (self.role == Role::Hub || self.hub_acks.covers(&doc_id, &document.doc, &heads));
        if hub || !local || deadline <= now {
            return Some(Ok(Response::Durability(DurabilityReport { local, hub })));
        }
        self.hub_acks.wait(id, doc_id, heads, deadline);
        None
    }

    /// Notes the heads a hub advertised, and answers the writes they make hub-durable.
    fn hub_advertised(&mut self, doc_id: DocId, heads: Vec<ChangeHash>) {
        self.hub_acks.record(doc_id, heads, self.hlc.new_timestamp());
        let Some(document) = self.documents.get(&doc_id) else { return };
        for request in self.hub_acks.satisfied(&doc_id, &document.doc) {
            let report = DurabilityReport { local: true, hub: true };
            self.outputs.push_back(Output::Respond {
                id: request,
                result: Ok(Response::Durability(report)),
            });
        }
    }

    /// True while a hub is connected.
    pub fn hub_connected(&self) -> bool {
        self.peers.values().any(|p| p.phase == PeerPhase::Ready(Role::Hub))
    }

    /// Documents whose current heads no hub has acknowledged yet.
    pub fn documents_pending_hub(&self) -> usize {
        self.hub_acks.pending_documents(self.documents().map(|(id, d)| (id, d.doc.get_heads())))
    }

    /// HLC time of the last sync message from a hub.
    pub fn last_hub_sync(&self) -> Option<uhlc::Timestamp> {
        self.hub_acks.last_hub_sync()
    }

    /// A document that exists here and is not deleted.
    fn live(&self, doc_id: DocId) -> Result<&Document, RequestError> {
        match self.documents.get(&doc_id).filter(|d| !d.is_placeholder) {
            Some(document) if document.is_deleted() => Err(RequestError::Deleted(doc_id)),
            Some(document) => Ok(document),
            None if self.reloading.contains_key(&doc_id) => Err(RequestError::Unavailable(doc_id)),
            None => Err(RequestError::NotFound(doc_id)),
        }
    }

    /// Answers a read from committed state only: while the document has appends in flight,
    /// the read waits for them, so nothing is ever shown that a crash could take back.
    fn read_committed(
        &mut self,
        id: RequestId,
        request: Request,
    ) -> Option<Result<Response, RequestError>> {
        let doc_id = match &request {
            Request::Read { doc_id }
            | Request::ReadAt { doc_id, .. }
            | Request::History { doc_id, .. }
            | Request::Export { doc_id } => *doc_id,
            _ => return None,
        };
        if self.documents.get(&doc_id).is_some_and(|d| d.persisting > 0) {
            self.parked_reads.entry(doc_id).or_default().push((id, request));
            return None;
        }
        Some(match request {
            Request::ReadAt { heads, .. } => self.read_at(doc_id, &heads),
            Request::History { offset, limit, .. } => self.live(doc_id).map(|d| {
                let (changes, total) = d.history(offset, limit);
                Response::History { changes, total }
            }),
            Request::Export { .. } => self.live(doc_id).map(|d| Response::Bytes(d.doc.save())),
            _ => self.read(doc_id),
        })
    }

    fn read(&self, doc_id: DocId) -> Result<Response, RequestError> {
        self.live(doc_id).map(|document| Response::Document {
            doc_id,
            collection: document.collection.clone(),
            heads: heads_hex(&document.doc.get_heads()),
            doc: document.to_json(),
        })
    }

    fn read_at(&self, doc_id: DocId, heads: &[String]) -> Result<Response, RequestError> {
        let document = self.live(doc_id)?;
        let parsed = heads
            .iter()
            .map(|h| h.parse::<ChangeHash>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RequestError::BadHeads(e.to_string()))?;
        let doc = document.json_at(&parsed).map_err(|e| RequestError::BadHeads(e.to_string()))?;
        Ok(Response::Document {
            doc_id,
            collection: document.collection.clone(),
            heads: heads.to_vec(),
            doc,
        })
    }

    fn delete(&mut self, id: RequestId, doc_id: DocId) -> Option<Result<Response, RequestError>> {
        if let Err(error) = self.live(doc_id) {
            return Some(Err(error));
        }
        let time = self.commit_time_secs();
        let document = self.documents.get_mut(&doc_id)?;
        let before = document.doc.get_heads();
        document.delete(time);
        self.persist(doc_id, &before, self.node_id, Some(id));
        None
    }

    fn import(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        collection: Option<Collection>,
        bytes: &[u8],
    ) -> Option<Result<Response, RequestError>> {
        if self.reloading.contains_key(&doc_id) {
            return Some(Err(RequestError::Unavailable(doc_id)));
        }
        // Every Automerge chunk, saved document or change, starts with these bytes; Automerge
        // itself skips what it cannot parse, which would make garbage look like "no news".
        const AUTOMERGE_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
        if !bytes.starts_with(&AUTOMERGE_MAGIC) {
            return Some(Err(RequestError::BadBytes("not Automerge data".into())));
        }
        let exists = self.documents.get(&doc_id).is_some_and(|d| !d.is_placeholder);
        let mut fresh = match (exists, collection) {
            (true, _) => None,
            (false, Some(collection)) => Some(Document::new(collection, self.actor.clone())),
            (false, None) => return Some(Err(RequestError::NotFound(doc_id))),
        };
        let document = match fresh.as_mut() {
            Some(document) => document,
            None => self.documents.get_mut(&doc_id)?,
        };
        let before = document.doc.get_heads();
        match guarded(|| document.doc.load_incremental(bytes)) {
            Ok(_) => {}
            Err(DocumentError::Refused(error)) => return Some(Err(RequestError::BadBytes(error))),
            Err(DocumentError::Panicked(error)) => {
                if fresh.is_none() {
                    self.reload(doc_id);
                }
                return Some(Err(RequestError::BadBytes(error)));
            }
        }
        let heads = document.doc.get_heads();
        if heads.is_empty() {
            return Some(Err(RequestError::BadBytes("no changes in the data".into())));
        }
        if heads == before {
            return Some(Ok(Response::Written { doc_id, heads: heads_hex(&heads) }));
        }
        if let Some(document) = fresh {
            self.documents.insert(doc_id, document);
        }
        self.persist(doc_id, &before, self.node_id, Some(id));
        None
    }

    /// Stores the changes made since `before`, and compacts when enough have piled up.
    /// `origin` is the node the changes came from (this one for local writes); `reply_to` is
    /// the local write waiting for this commit, if any.
    fn persist(
        &mut self,
        doc_id: DocId,
        before: &[ChangeHash],
        origin: NodeId,
        reply_to: Option<RequestId>,
    ) {
        let hlc = self.hlc.new_timestamp().get_time().as_u64();
        let compact_after = self.config.compact_after_changes;
        let Some(document) = self.documents.get_mut(&doc_id) else {
            return;
        };
        let changes = document.changes_since(before);
        let heads = document.doc.get_heads();
        document.is_placeholder = false;
        document.persisting += 1;
        document.changes_since_snapshot += changes.len();
        self.stats.changes_committed += changes.len() as u64;
        let append = StoreTask::Append {
            doc_id,
            collection: document.collection.clone(),
            changes,
            heads: heads.iter().map(|h| h.0).collect(),
            hlc,
            origin,
            deleted: document.is_deleted(),
        };
        let compact = (document.changes_since_snapshot >= compact_after).then(|| {
            document.changes_since_snapshot = 0;
            StoreTask::Compact { doc_id, snapshot: document.doc.save() }
        });
        let then = match reply_to {
            Some(request) => Pending::Write { request, doc_id, heads: heads_hex(&heads) },
            None => Pending::Announce { doc_id },
        };
        self.store(append, then);
        if let Some(compact) = compact {
            self.store(compact, Pending::Nothing);
        }
    }

    fn store(&mut self, action: StoreTask, then: Pending) {
        let task = self.next_task;
        self.next_task += 1;
        self.pending.insert(task, then);
        self.outputs.push_back(Output::Store { task, action });
    }

    fn on_store_done(&mut self, task: TaskId, reply: StoreReply) {
        match (self.pending.remove(&task), reply) {
            (Some(Pending::Write { request, doc_id, heads }), _) => {
                let result = Ok(Response::Written { doc_id, heads });
                self.outputs.push_back(Output::Respond { id: request, result });
                self.committed(doc_id);
            }
            (Some(Pending::Announce { doc_id }), _) => self.committed(doc_id),
            (Some(Pending::Reload { doc_id }), StoreReply::Loaded(stored)) => {
                self.reloading.remove(&doc_id);
                if let Some(stored) = stored {
                    if self.load(&stored).is_ok() {
                        self.announce(doc_id);
                    }
                }
            }
            (Some(Pending::Nothing | Pending::Reload { .. }) | None, _) => {}
        }
    }

    /// One append of `doc_id` committed; once none is outstanding, peers hear of it.
    fn committed(&mut self, doc_id: DocId) {
        let Some(document) = self.documents.get_mut(&doc_id) else {
            return;
        };
        document.persisting = document.persisting.saturating_sub(1);
        if document.persisting == 0 {
            self.announce(doc_id);
            for (id, request) in self.parked_reads.remove(&doc_id).unwrap_or_default() {
                if let Some(result) = self.read_committed(id, request) {
                    self.outputs.push_back(Output::Respond { id, result });
                }
            }
        }
    }

    /// Discards a document that Automerge may have left inconsistent and reads it back.
    fn reload(&mut self, doc_id: DocId) {
        self.stats.document_reloads += 1;
        self.documents.remove(&doc_id);
        for (id, _) in self.parked_reads.remove(&doc_id).unwrap_or_default() {
            self.outputs
                .push_back(Output::Respond { id, result: Err(RequestError::Unavailable(doc_id)) });
        }
        for peer in self.peers.values_mut() {
            peer.sync_states.remove(&doc_id);
        }
        self.reloading.insert(doc_id, ());
        self.store(StoreTask::Load { doc_id }, Pending::Reload { doc_id });
    }

    /// Offers a document's news to every peer that follows it.
    fn announce(&mut self, doc_id: DocId) {
        let conns: Vec<ConnId> =
            self.peers.iter().filter(|(_, p)| p.follows(&doc_id)).map(|(c, _)| *c).collect();
        for conn in conns {
            self.sync_with(conn, doc_id);
        }
    }

    /// Sends the next Automerge sync message for one document to one peer, if there is one.
    ///
    /// Nothing is sent while the document has uncommitted appends: the announce that follows
    /// the last commit sends it then.
    fn sync_with(&mut self, conn: ConnId, doc_id: DocId) {
        let Some(document) = self.documents.get(&doc_id).filter(|d| d.persisting == 0) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        let state = peer.sync_states.entry(doc_id).or_default();
        let Some(message) = document.doc.generate_sync_message(state) else {
            return;
        };
        let collection = document.collection.clone();
        self.send(conn, Message::DocSync { doc_id, collection, sync_message: message.encode() });
    }

    fn send_inventory(&mut self, conn: ConnId) {
        let entries: Vec<InventoryEntry> = self
            .documents
            .iter()
            .filter(|(_, d)| !d.is_placeholder)
            .map(|(doc_id, d)| InventoryEntry {
                doc_id: *doc_id,
                collection: d.collection.clone(),
                heads_digest: heads_digest(&d.doc.get_heads()),
            })
            .collect();
        for chunk in entries.chunks(MAX_INVENTORY_ENTRIES_PER_MESSAGE) {
            self.send(conn, Message::Inventory { entries: chunk.to_vec() });
        }
    }

    fn send(&mut self, conn: ConnId, message: Message) {
        let envelope = Envelope { sent_at: self.hlc.new_timestamp(), message };
        match encode_frame(&envelope.encode(), self.config.max_frame_bytes) {
            Ok(bytes) => {
                self.stats.frames_sent += 1;
                self.stats.bytes_sent += bytes.len() as u64;
                self.outputs.push_back(Output::Transmit { conn, bytes });
            }
            // A document too large for one frame cannot sync over this link; the peer stays up.
            Err(error) => self
                .outputs
                .push_back(Output::Close { conn, reason: format!("cannot send: {error}") }),
        }
    }

    /// Tells the peer why, then closes the connection.
    fn refuse(&mut self, conn: ConnId, reason: String) {
        self.stats.protocol_errors += 1;
        self.send(
            conn,
            Message::Refuse { reason: reason.clone(), protocol_version: PROTOCOL_VERSION },
        );
        self.outputs.push_back(Output::Close { conn, reason });
        self.peers.remove(&conn);
    }

    fn commit_time_secs(&self) -> i64 {
        let secs = self.hlc.new_timestamp().get_time().as_secs();
        i64::from(secs)
    }
}
