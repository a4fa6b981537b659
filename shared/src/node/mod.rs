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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use automerge::{ActorId, ChangeHash};

use crate::config::SyncConfig;
use crate::document::{heads_hex, Document, DocumentError};
use crate::durability::HubAcks;
use crate::ids::{Collection, DocId, NodeId};
use crate::message::{HubInfo, Role};
use crate::peer::{Peer, PeerPhase};
use crate::scope::HoldingRule;
use crate::store_task::{IndexEntry, StoreReply, StoreTask, StoredDoc};

mod cache;
mod catalog;
mod directory;
mod heartbeat;
mod holding;
mod lag;
mod pacing;
mod peering;
mod reconciling;
mod regions;
mod requests;
mod types;

pub use catalog::{CatalogBuilder, Join, Sequential};
pub use lag::PeerLag;
pub use types::{
    ConnId, DurabilityReport, Input, NodeStats, Output, Request, RequestError, RequestId, Response,
    StatusReport, StreamId, TaskId,
};

/// What to do when a store task completes.
#[derive(Debug)]
enum Pending {
    /// Record the committed state in the catalog, answer the write waiting for it (with the
    /// heads it produced), and announce the document.
    Append { doc_id: DocId, entry: IndexEntry, reply_to: Option<RequestId> },
    /// Nothing to do (compaction).
    Nothing,
    /// Hold the document read back, and run the work waiting for it.
    Load { doc_id: DocId },
}

/// What an apply added to a document, as far as the caller knows, for storing it.
#[derive(Debug)]
enum Added {
    /// Not known: Automerge is asked for the changes since the heads before, encoding each
    /// again (a cost that grows with the document).
    Unknown,
    /// The encoded changes, as they arrived (see [`Document::added_changes`]).
    Changes(Vec<Vec<u8>>),
    /// A saved document, as it arrived, that the document now is (see [`Document::adopt`]):
    /// stored as the snapshot, replacing everything stored before.
    Saved(Vec<u8>),
}

impl Added {
    fn from_changes(changes: Option<Vec<Vec<u8>>>) -> Self {
        changes.map_or(Self::Unknown, Self::Changes)
    }
}

/// The sync core of one node.
pub struct Node {
    node_id: NodeId,
    role: Role,
    actor: ActorId,
    hlc: uhlc::HLC,
    config: SyncConfig,
    /// Every committed document, in memory or not.
    catalog: catalog::Catalog,
    /// Documents in memory: the cache, plus documents not yet committed.
    documents: BTreeMap<DocId, Document>,
    /// Documents in memory by last use, oldest first.
    lru: BTreeMap<u64, DocId>,
    use_clock: u64,
    /// Stored bytes of the documents in memory, which `document_cache_bytes` bounds.
    cached_bytes: usize,
    /// Documents being read from the store, with the work waiting for them.
    loading: BTreeMap<DocId, Vec<cache::Deferred>>,
    /// Documents held back, with the reason.
    quarantined: BTreeMap<DocId, String>,
    peers: BTreeMap<ConnId, Peer>,
    pending: BTreeMap<TaskId, Pending>,
    next_task: TaskId,
    outputs: VecDeque<Output>,
    next_anti_entropy: Option<Instant>,
    hub_acks: HubAcks,
    /// Documents with news for peers, sent at the next flush of outputs.
    announced: BTreeSet<DocId>,
    /// Sync messages per peer, sent as one frame at the next flush of outputs.
    sync_batches: BTreeMap<ConnId, peering::SyncBatch>,
    /// Reads, and writes that changed nothing, waiting for a document's appends to commit.
    parked_reads: BTreeMap<DocId, Vec<(RequestId, Request)>>,
    /// Which collections this node may hold at all (a hub: what its region holds).
    holding: Option<HoldingRule>,
    /// The hubs this hub advertises to its agents.
    hub_directory: Vec<HubInfo>,
    /// The hubs a hub advertised to this agent.
    learned_hubs: Vec<HubInfo>,
    /// Collections a peer said it does not hold, with its reason, by peer (for status).
    refused_by_peers: BTreeMap<NodeId, BTreeMap<Collection, String>>,
    /// The region this hub serves, once told.
    region: Option<String>,
    /// The regions of the other hubs, by node id.
    hub_regions: BTreeMap<NodeId, String>,
    /// Who waits to hear which regions hold heads of a document.
    region_watches: BTreeMap<DocId, Vec<regions::RegionWatch>>,
    /// Watches held per connection, which [`regions`] bounds.
    watches_per_peer: BTreeMap<ConnId, usize>,
    /// Change-carrying sync messages held until their document's window closes.
    pacing: pacing::Pacing,
    /// The time of the input or timeout being handled.
    now: Option<Instant>,
    /// Write streams in which a write failed: their later writes are refused.
    stopped_streams: BTreeSet<StreamId>,
    /// Documents whose merge or load ran during the input being handled.
    worked: Vec<DocId>,
    /// A local request also ran during the input (one deferred until its document loaded),
    /// so the input's time is not the merges' and loads' alone.
    worked_locally: bool,
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
        let pacing = pacing::Pacing::new(config.sync_batch_window());
        Self {
            node_id,
            role,
            actor,
            hlc,
            config,
            catalog: catalog::Catalog::default(),
            documents: BTreeMap::new(),
            lru: BTreeMap::new(),
            use_clock: 0,
            cached_bytes: 0,
            loading: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_task: 0,
            outputs: VecDeque::new(),
            next_anti_entropy: None,
            hub_acks: HubAcks::default(),
            parked_reads: BTreeMap::new(),
            announced: BTreeSet::new(),
            sync_batches: BTreeMap::new(),
            holding: None,
            hub_directory: Vec::new(),
            learned_hubs: Vec::new(),
            refused_by_peers: BTreeMap::new(),
            region: None,
            hub_regions: BTreeMap::new(),
            region_watches: BTreeMap::new(),
            watches_per_peer: BTreeMap::new(),
            pacing,
            now: None,
            stopped_streams: BTreeSet::new(),
            worked: Vec::new(),
            worked_locally: false,
            stats: NodeStats::default(),
        }
    }

    /// Limits the collections this node holds: a collection the rule refuses is not synced
    /// with any peer, and a peer that offers one is told why (a hub: where it lives).
    pub fn set_holding(&mut self, rule: HoldingRule) {
        self.holding = Some(rule);
    }

    /// Collections connected peers said they do not hold, with their reasons.
    pub fn refused_by_peers(&self) -> impl Iterator<Item = (&NodeId, &Collection, &str)> {
        self.refused_by_peers
            .iter()
            .flat_map(|(peer, refused)| refused.iter().map(move |(c, why)| (peer, c, why.as_str())))
    }

    /// Adds a stored document's index entry at start-up, without loading the document: it
    /// is read from the store when something first needs it.
    pub fn restore(&mut self, doc_id: DocId, entry: IndexEntry) {
        self.catalog.record(doc_id, entry);
    }

    /// Adds every stored document's index entry at start-up, as [`Node::restore`] does one by
    /// one, but built in bulk: entries in id order, as the store's index returns them, cost
    /// a fraction of separate inserts.
    pub fn restore_all(&mut self, index: Vec<(DocId, IndexEntry)>) {
        self.catalog.record_all(index);
    }

    /// Adds the index entries gathered in `built`, as [`Node::restore_all`] does: a caller
    /// streaming the heads index fills the builder while the store reads on. `join` runs the
    /// two independent halves of what is left (the entry map, the reconciliation sets);
    /// [`Sequential`] runs them in turn.
    pub fn restore_built(&mut self, built: CatalogBuilder, join: &impl Join) {
        self.catalog.record_built(built, join);
    }

    /// Adds a document read from the store at start-up, loaded.
    pub fn load(&mut self, stored: &StoredDoc) -> Result<(), DocumentError> {
        let document = Document::load(stored, self.actor.clone())?;
        let entry = IndexEntry {
            collection: document.collection.clone(),
            heads: document.doc.get_heads(),
            deleted: document.is_deleted(),
        };
        self.catalog.record(stored.doc_id, entry);
        self.cache_insert(stored.doc_id, document);
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

    /// Documents in memory (not those only the catalog holds).
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &Document)> {
        self.documents.iter().filter(|(_, d)| !d.is_placeholder)
    }

    /// Every committed document's index entry, in memory or not.
    pub fn catalog(&self) -> impl Iterator<Item = (&DocId, &IndexEntry)> {
        self.catalog.iter()
    }

    /// Committed documents, counted in constant time.
    pub fn document_count(&self) -> usize {
        self.catalog.len()
    }

    /// Documents in memory and the stored bytes they account for.
    pub fn cache_usage(&self) -> (usize, usize) {
        (self.documents.len(), self.cached_bytes)
    }

    /// Quarantined documents, with the reason each is held back.
    pub fn quarantined(&self) -> impl Iterator<Item = (&DocId, &str)> {
        self.quarantined.iter().map(|(id, reason)| (id, reason.as_str()))
    }

    /// Per-peer document sync states held in memory: live (a sync under way), and kept as
    /// heads alone (settled, or offered and unanswered).
    pub fn sync_states(&self) -> (usize, usize) {
        self.peers.values().fold((0, 0), |(live, compact), peer| {
            (live + peer.sync_states.live_count(), compact + peer.sync_states.compact_count())
        })
    }

    /// Connections to peers of `role` whose handshake completed.
    fn ready_conns(&self, role: Role) -> Vec<ConnId> {
        let ready = self.peers.iter().filter(|(_, p)| p.phase == PeerPhase::Ready(role));
        ready.map(|(conn, _)| *conn).collect()
    }

    /// Connections whose handshake completed.
    pub fn ready_peers(&self) -> usize {
        self.peers.values().filter(|p| p.is_ready()).count()
    }

    /// Feeds one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = Some(now);
        self.worked.clear();
        self.worked_locally = false;
        self.evict_over_budget();
        self.next_anti_entropy.get_or_insert(now + self.config.anti_entropy_interval());
        match input {
            Input::Connected { conn, peer, restrict } => {
                self.on_connected(now, conn, peer, restrict)
            }
            Input::Received { conn, bytes } => self.on_received(now, conn, &bytes),
            Input::Disconnected { conn } => self.on_disconnected(conn),
            Input::Request { id, request } => self.on_request(now, id, request),
            Input::StoreDone { task, reply } => self.on_store_done(task, reply),
            Input::WorkTook { doc_id, took } => self.on_work_took(doc_id, took),
        }
    }

    /// The documents whose Automerge work (a merge of a peer's changes, a load from the
    /// store) ran during the last input, for the driver to time: the core reads no clock.
    /// Empty when a local request ran in it too: local writes are not timed.
    pub fn documents_worked(&self) -> &[DocId] {
        if self.worked_locally {
            &[]
        } else {
            &self.worked
        }
    }

    /// The longest a merge or load of one document may take (`max_merge_ms`), if limited.
    pub fn merge_limit(&self) -> Option<std::time::Duration> {
        self.config.merge_limit()
    }

    /// Notes that a merge or load of `doc_id` runs during this input.
    pub(super) fn note_work(&mut self, doc_id: DocId) {
        if !self.worked.contains(&doc_id) {
            self.worked.push(doc_id);
        }
    }

    /// Quarantines a document whose merge or load took longer than `max_merge_ms`: the work
    /// is done, but a document that costs this much would stall the node at every sync.
    fn on_work_took(&mut self, doc_id: DocId, took: std::time::Duration) {
        let Some(limit) = self.merge_limit() else { return };
        if took <= limit || self.quarantined.contains_key(&doc_id) {
            return;
        }
        let reason = format!(
            "merging or loading it took {:.1} s, over the limit of {:.1} s (max_merge_ms)",
            took.as_secs_f64(),
            limit.as_secs_f64()
        );
        self.quarantine(doc_id, reason);
    }

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello_deadline =
            self.peers.values().filter(|p| !p.is_ready()).filter_map(|p| p.hello_deadline).min();
        [
            self.next_anti_entropy,
            self.hub_acks.next_deadline(),
            self.next_region_deadline(),
            hello_deadline,
            self.next_heartbeat(),
            self.pacing.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs timers that are due: periodic anti-entropy (a reconciliation session) with every
    /// replicating peer, and durability waits that reached their deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        self.evict_over_budget();
        for (conn, doc_id) in self.pacing.take_due(now) {
            self.sync_with(conn, doc_id);
        }
        let silent: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.is_ready() && p.hello_deadline.is_some_and(|d| d <= now))
            .map(|(c, _)| *c)
            .collect();
        for conn in silent {
            self.refuse(conn, "no hello in time".into());
        }
        self.run_heartbeats(now);
        for wait in self.hub_acks.expired(now) {
            let report = self.durability_report(wait.doc_id, &wait.heads);
            self.outputs.push_back(Output::Respond {
                id: wait.request,
                result: Ok(Response::Durability(report)),
            });
        }
        self.expire_region_watches(now);
        match self.next_anti_entropy {
            Some(due) if due <= now => {}
            _ => return,
        }
        self.next_anti_entropy = Some(now + self.config.anti_entropy_interval());
        let conns: Vec<ConnId> =
            self.peers.iter().filter(|(_, p)| p.replicates_everything()).map(|(c, _)| *c).collect();
        for conn in conns {
            self.start_reconciliation(conn);
        }
    }

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.outputs.is_empty() && !self.announced.is_empty() {
            self.flush_announced();
        }
        if self.outputs.is_empty() && !self.sync_batches.is_empty() {
            self.flush_batches();
        }
        self.outputs.pop_front()
    }

    /// True while a hub is connected.
    pub fn hub_connected(&self) -> bool {
        self.peers.values().any(|p| p.phase == PeerPhase::Ready(Role::Hub))
    }

    /// The hub connected now, if any (the first, should there be several).
    pub fn connected_hub(&self) -> Option<NodeId> {
        self.peers.values().find(|p| p.phase == PeerPhase::Ready(Role::Hub)).map(|p| p.node_id)
    }

    /// Documents whose current heads no hub has acknowledged yet.
    pub fn documents_pending_hub(&self) -> usize {
        self.hub_acks.pending_documents(self.catalog.iter().map(|(id, e)| (id, e.heads.clone())))
    }

    /// HLC time of the last sync message from a hub.
    pub fn last_hub_sync(&self) -> Option<uhlc::Timestamp> {
        self.hub_acks.last_hub_sync()
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
        self.persist_added(doc_id, before, origin, reply_to, Added::Unknown, None);
    }

    /// [`Node::persist`], with what the apply added when the caller knows it (see [`Added`]),
    /// which spares asking Automerge for the changes, and whether the document is deleted
    /// when the caller knows that (a lookup in the document whose cost grows with it).
    fn persist_added(
        &mut self,
        doc_id: DocId,
        before: &[ChangeHash],
        origin: NodeId,
        reply_to: Option<RequestId>,
        added: Added,
        deleted: Option<bool>,
    ) {
        let hlc = self.hlc.new_timestamp().get_time().as_u64();
        let compact_after = self.config.compact_after_changes;
        let Some(document) = self.documents.get_mut(&doc_id) else {
            return;
        };
        let (snapshot, changes) = match added {
            Added::Unknown => (None, document.changes_since(before)),
            Added::Changes(changes) => (None, changes),
            Added::Saved(snapshot) => (Some(snapshot), Vec::new()),
        };
        let heads = document.doc.get_heads();
        document.is_placeholder = false;
        document.persisting += 1;
        let mut stored_bytes = match &snapshot {
            Some(snapshot) => {
                self.stats.saved_documents_adopted += 1;
                let history = document.history_len();
                let gained = history.saturating_sub(document.change_count);
                self.stats.changes_committed += gained as u64;
                document.change_count = history;
                document.changes_since_snapshot = 0;
                snapshot.len()
            }
            None => {
                document.changes_since_snapshot += changes.len();
                document.change_count += changes.len();
                self.stats.changes_committed += changes.len() as u64;
                document.stored_bytes + changes.iter().map(Vec::len).sum::<usize>()
            }
        };
        let entry = IndexEntry {
            collection: document.collection.clone(),
            heads: heads.clone(),
            deleted: deleted.unwrap_or_else(|| document.is_deleted()),
        };
        let append = StoreTask::Append {
            doc_id,
            collection: entry.collection.clone(),
            snapshot,
            changes,
            heads: heads.iter().map(|h| h.0).collect(),
            hlc,
            origin,
            deleted: entry.deleted,
        };
        let compact = (document.changes_since_snapshot >= compact_after).then(|| {
            document.changes_since_snapshot = 0;
            let snapshot = document.doc.save();
            stored_bytes = snapshot.len();
            StoreTask::Compact { doc_id, snapshot }
        });
        self.resize(doc_id, stored_bytes);
        self.touch(doc_id);
        self.store(append, Pending::Append { doc_id, entry, reply_to });
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
            (Some(Pending::Append { doc_id, entry, reply_to }), _) => {
                if let Some(request) = reply_to {
                    let result = Ok(Response::Written { doc_id, heads: heads_hex(&entry.heads) });
                    self.outputs.push_back(Output::Respond { id: request, result });
                }
                self.catalog.record(doc_id, entry);
                self.committed(doc_id);
                self.recheck_regions(doc_id);
            }
            (Some(Pending::Load { doc_id }), StoreReply::Loaded(stored, sync_states)) => {
                self.on_loaded(doc_id, stored, sync_states);
            }
            (Some(Pending::Load { doc_id }), StoreReply::Committed) => {
                self.on_loaded(doc_id, None, Vec::new())
            }
            (Some(Pending::Nothing) | None, _) => {}
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
                let result = match request {
                    Request::Edit { doc_id, ops } => self.edit(id, doc_id, &ops),
                    read => self.read_committed(id, read),
                };
                if let Some(result) = result {
                    self.outputs.push_back(Output::Respond { id, result });
                }
            }
        }
    }

    /// Discards a document that Automerge may have left inconsistent and reads it back; one
    /// never stored is only dropped, and its peers send it again.
    fn reload(&mut self, doc_id: DocId) {
        self.stats.document_reloads += 1;
        self.cache_remove(doc_id);
        for (id, _) in self.parked_reads.remove(&doc_id).unwrap_or_default() {
            self.outputs
                .push_back(Output::Respond { id, result: Err(RequestError::Unavailable(doc_id)) });
        }
        for peer in self.peers.values_mut() {
            peer.sync_states.remove(&doc_id);
            peer.awaiting_reply.remove(&doc_id);
        }
        if self.catalog.contains(&doc_id) && !self.loading.contains_key(&doc_id) {
            self.loading.insert(doc_id, Vec::new());
            self.store(StoreTask::Load { doc_id }, Pending::Load { doc_id });
        }
    }

    fn commit_time_secs(&self) -> i64 {
        let secs = self.hlc.new_timestamp().get_time().as_secs();
        i64::from(secs)
    }
}
