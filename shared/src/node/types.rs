//! What goes into and comes out of a [`super::Node`]: inputs, requests, answers, effects.

use std::time::Instant;

use crate::ids::{Collection, DocId, NodeId};
use crate::ops::{Op, OpError};
use crate::scope::CollectionScope;
use crate::store_task::{StoreReply, StoreTask};

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
        /// Collections this connection alone is limited to, beyond the node's own scope: a
        /// LAN neighbour shares only the collections marked for the LAN. `None` for none.
        restrict: Option<CollectionScope>,
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
    /// The driver timed the last input, whose Automerge work (a merge of a peer's changes or
    /// a load from the store, see [`super::Node::documents_worked`]) was all on `doc_id`,
    /// and it took `took`. Past `max_merge_ms` the document is quarantined.
    WorkTook {
        /// The one document worked on.
        doc_id: DocId,
        /// How long the input took.
        took: std::time::Duration,
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
    /// Answer once every change up to `heads` of a document is as durable as `level` asks
    /// (committed by a hub, or by hubs in N regions), or at `deadline` with what is known then.
    AwaitDurable {
        /// The document.
        doc_id: DocId,
        /// Heads as hex, as a write's answer gave them.
        heads: Vec<String>,
        /// What to wait for.
        level: crate::durability::Durability,
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
    /// One write (an [`Request::Edit`] or [`Request::Import`]) of an ordered stream of writes:
    /// the writes of a stream are applied in the order they arrive, and once one fails, the
    /// stream's later writes are refused with [`RequestError::StreamStopped`], so a writer that
    /// sends without waiting for each answer never has a write applied on top of a failed one.
    InStream {
        /// The stream, unique on this node.
        stream: StreamId,
        /// The write.
        write: Box<Request>,
    },
    /// The stream sends no more writes: the node forgets it, and sends the document's
    /// committed changes to peers now rather than at the end of a sync batch window (the
    /// writes that made the window are over).
    EndStream {
        /// The stream.
        stream: StreamId,
        /// The document it wrote.
        doc_id: DocId,
    },
}

/// Names an ordered stream of writes (see [`Request::InStream`]).
pub type StreamId = u64;

/// A successful answer to a [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// The write stream is forgotten.
    Ended,
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
    /// The hub connected now, if any.
    pub hub: Option<NodeId>,
    /// Documents held.
    pub documents: usize,
    /// Documents whose current heads no hub has acknowledged yet.
    pub documents_pending_hub: usize,
    /// HLC time of the last sync message from a hub.
    pub last_hub_sync: Option<uhlc::Timestamp>,
    /// The node's clock now.
    pub clock: uhlc::Timestamp,
    /// Documents in memory, and the stored bytes they account for.
    pub cache: (usize, usize),
    /// Quarantined documents, counted.
    pub quarantined_total: usize,
    /// The first quarantined documents by id (at most [`StatusReport::QUARANTINE_LISTED`]),
    /// with the reason each is held back.
    pub quarantined: Vec<(DocId, String)>,
    /// Replication lag of the node peers furthest behind (at most
    /// [`StatusReport::LAG_LISTED`]), most behind first.
    pub replication_lag: Vec<super::PeerLag>,
    /// Collections connected peers said they do not hold: peer, collection, reason (where the
    /// collection lives).
    pub refused_collections: Vec<(NodeId, Collection, String)>,
    /// The hubs the connected hub advertised, where this agent may fail over to.
    pub advertised_hubs: Vec<crate::message::HubInfo>,
}

impl StatusReport {
    /// Most quarantined documents a status report lists.
    pub const QUARANTINE_LISTED: usize = 100;
    /// Most peers a status report lists with their replication lag.
    pub const LAG_LISTED: usize = 100;
}

/// How durable a set of heads is, in answer to [`Request::AwaitDurable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurabilityReport {
    /// Committed on this node.
    pub local: bool,
    /// Committed by a hub.
    pub hub: bool,
    /// Regions whose hubs have committed them, as far as this node knows (sorted).
    pub regions: Vec<String>,
}

impl DurabilityReport {
    /// Whether the heads are as durable as `level` asks.
    pub fn meets(&self, level: crate::durability::Durability) -> bool {
        use crate::durability::Durability;
        match level {
            Durability::Local => self.local,
            Durability::Hub => self.hub,
            Durability::Regions(n) => self.regions.len() >= usize::from(n),
        }
    }
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
    /// The document is quarantined: held back, neither served nor synced, until an operator
    /// acts on it.
    #[error("document {doc_id} is quarantined: {reason}")]
    Quarantined {
        /// The document.
        doc_id: DocId,
        /// Why.
        reason: String,
    },
    /// The document reached `max_document_bytes` and takes no more writes.
    #[error("document {doc_id} reached the size limit of {limit} bytes")]
    TooLarge {
        /// The document.
        doc_id: DocId,
        /// The limit, in stored bytes.
        limit: usize,
    },
    /// Only edits and imports travel in a write stream.
    #[error("only edits and imports can be part of a write stream")]
    NotAStreamWrite,
    /// An earlier write of the same stream failed, so this one was not applied.
    #[error("not applied: an earlier write of this stream failed")]
    StreamStopped,
    /// The document reached `max_document_changes` and takes no more writes.
    #[error("document {doc_id} reached the limit of {limit} changes")]
    TooManyChanges {
        /// The document.
        doc_id: DocId,
        /// The limit, in changes.
        limit: usize,
    },
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
    /// Documents read back from the store into memory.
    pub document_loads: u64,
    /// Documents evicted from memory to stay within the cache budget.
    pub document_evictions: u64,
    /// Documents quarantined.
    pub documents_quarantined: u64,
    /// Frames sent compressed.
    pub frames_compressed: u64,
    /// Whole saved documents (from peers or uploads) that took a document's place and were
    /// stored as they arrived, instead of being merged change by change.
    pub saved_documents_adopted: u64,
}
