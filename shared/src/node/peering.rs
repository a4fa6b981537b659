//! The peer protocol: handshake, inventories, Automerge sync per document, refusals.
//! Reconciliation, which replaced sending inventories, is in `reconciling`.

use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::ChangeHash;

use super::cache::{Deferred, Residence};
use super::{Added, ConnId, Node, Output, Pending, Response};
use crate::document::{
    guarded, heads_digest, is_saved_document, load_saved, parse_change_chunks, Document,
    DocumentError,
};
use crate::frame::encode_frame;
use crate::ids::{Collection, DocId, NodeId};
use crate::message::{
    DocSyncPart, Envelope, InventoryEntry, Message, Role, MAX_BATCH_PARTS, PROTOCOL_VERSION,
};
use crate::peer::{Peer, PeerPhase};
use crate::scope::CollectionScope;
use crate::store_task::StoreTask;

/// Upper bound on a batch frame's sync messages, in bytes.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Encoded bytes of a batch part beside its sync message: id, collection name, lengths.
const DOC_SYNC_PART_OVERHEAD: usize = 64;

/// Sync messages queued for one peer.
#[derive(Debug, Default)]
pub(super) struct SyncBatch {
    parts: Vec<DocSyncPart>,
    bytes: usize,
}

impl Node {
    pub(super) fn on_connected(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: NodeId,
        restrict: Option<CollectionScope>,
    ) {
        let mut state = Peer::new(peer, self.config.max_frame_bytes, now);
        state.hello_deadline = Some(now + Duration::from_millis(self.config.hello_timeout_ms));
        // What this side replicates over this connection; the peer's hello narrows it further.
        let scope = match restrict {
            Some(restrict) => self.config.collections.intersect(&restrict),
            None => self.config.collections.clone(),
        };
        state.scope = scope.clone();
        self.peers.insert(conn, state);
        self.send(conn, Message::Hello { node_id: self.node_id, role: self.role, scope });
    }

    /// Forgets the peer, and any empty placeholder only a departing client had asked for, so
    /// clients naming documents that never arrive cannot grow memory.
    pub(super) fn on_disconnected(&mut self, conn: ConnId) {
        self.forget_region_watches(conn);
        self.pacing.forget(conn);
        let Some(peer) = self.peers.remove(&conn) else { return };
        if peer.replicates_everything() {
            if !self.peers.values().any(|p| p.node_id == peer.node_id) {
                self.refused_by_peers.remove(&peer.node_id);
            }
            return self.save_sync_states(peer);
        }
        for doc_id in peer.sync_states.doc_ids() {
            let orphan = self.documents.get(doc_id).is_some_and(|d| d.is_placeholder)
                && !self.peers.values().any(|p| p.sync_states.contains(doc_id));
            if orphan {
                self.cache_remove(*doc_id);
            }
        }
    }

    /// Keeps what a departing node peer and this node were known to share of each document,
    /// in the store and with the documents in memory, so that the next connection resumes
    /// each document's sync from there rather than from an empty state.
    fn save_sync_states(&mut self, peer: Peer) {
        let mut states = Vec::new();
        for (doc_id, encoded) in peer.sync_states.into_encoded() {
            if let Some(document) = self.documents.get_mut(&doc_id) {
                document.saved_sync_states.insert(peer.node_id, encoded.clone());
            }
            states.push((doc_id, encoded));
        }
        if !states.is_empty() {
            self.store(StoreTask::SaveSyncStates { peer: peer.node_id, states }, Pending::Nothing);
        }
    }

    /// A peer's sync state for a document when none is live: the one saved when the peer
    /// last left, if the document holds one, else an empty one.
    fn resumed_sync_state(&mut self, peer: NodeId, doc_id: DocId) -> sync::State {
        self.documents
            .get_mut(&doc_id)
            .and_then(|document| document.saved_sync_states.remove(&peer))
            .and_then(|saved| sync::State::decode(&saved).ok())
            .unwrap_or_default()
    }

    pub(super) fn on_received(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        peer.last_heard = now;
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

    pub(super) fn on_message(&mut self, conn: ConnId, message: Message) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        match (peer.phase, message) {
            (PeerPhase::AwaitingHello, Message::Hello { node_id, role, scope }) => {
                if node_id != peer.node_id {
                    let proven = peer.node_id;
                    return self.refuse(
                        conn,
                        format!("hello names node {node_id}, certificate proves {proven}"),
                    );
                }
                peer.phase = PeerPhase::Ready(role);
                peer.scope = peer.scope.intersect(&scope);
                if role == Role::Agent {
                    self.advertise_hubs(conn);
                }
                if role == Role::Hub && self.role != Role::Hub {
                    self.rewatch_regions(conn);
                    self.ask_hub_for_waiting_heads(conn);
                }
                self.start_reconciliation(conn);
            }
            (_, Message::Refuse { reason, .. }) => {
                self.outputs
                    .push_back(Output::Close { conn, reason: format!("peer refused: {reason}") });
                self.peers.remove(&conn);
            }
            (PeerPhase::Ready(_), Message::Inventory { entries }) => {
                self.on_inventory(conn, entries)
            }
            (PeerPhase::Ready(_), Message::Reconcile { opens, parts }) => {
                self.on_reconcile(conn, opens, parts)
            }
            (PeerPhase::Ready(_), Message::DocSync { doc_id, collection, sync_message }) => {
                self.on_doc_sync(conn, doc_id, collection, &sync_message)
            }
            (PeerPhase::Ready(_), Message::Ping) => self.send(conn, Message::Pong),
            (PeerPhase::Ready(_), Message::Hubs { hubs }) => self.on_hubs(conn, hubs),
            (PeerPhase::Ready(_), Message::NotHeld { collection, reason }) => {
                self.on_not_held(conn, collection, reason)
            }
            (PeerPhase::Ready(_), Message::Pong) => {} // Hearing it was the point.
            (PeerPhase::Ready(_), Message::WatchRegions { doc_id, heads, regions }) => {
                self.on_watch_regions(conn, doc_id, heads, regions)
            }
            (PeerPhase::Ready(_), Message::HeldInRegions { doc_id, heads, regions }) => {
                self.on_held_in_regions(conn, doc_id, heads, regions)
            }
            (PeerPhase::Ready(_), Message::DocSyncBatch { parts }) => {
                for DocSyncPart { doc_id, collection, sync_message } in parts {
                    if !self.peers.contains_key(&conn) {
                        return; // Refused on an earlier part.
                    }
                    self.on_doc_sync(conn, doc_id, collection, &sync_message);
                }
            }
            (PeerPhase::Ready(_), Message::Compressed { deflated }) => {
                match Message::decompress(&deflated, self.config.max_frame_bytes) {
                    Ok(inner) => self.on_message(conn, inner),
                    Err(error) => self.refuse(conn, error.to_string()),
                }
            }
            (PeerPhase::Ready(_), Message::Hello { .. }) => {
                self.refuse(conn, "second hello".into())
            }
            (PeerPhase::AwaitingHello, _) => self.refuse(conn, "expected hello first".into()),
        }
    }

    /// For every document the peer lists that we lack or hold differently, start a fresh sync.
    /// Stored documents are compared by their catalog entry, so equal ones are never loaded.
    pub(super) fn on_inventory(&mut self, conn: ConnId, entries: Vec<InventoryEntry>) {
        let Some(scope) = self.peers.get(&conn).map(|p| p.scope.clone()) else { return };
        for entry in entries.into_iter().filter(|e| scope.contains(&e.collection)) {
            let doc_id = entry.doc_id;
            if let Some(known) = self.catalog.get(&doc_id) {
                if known.collection == entry.collection
                    && heads_digest(&known.heads) != entry.heads_digest
                {
                    self.offer(conn, doc_id);
                }
                continue;
            }
            if !self.documents.contains_key(&doc_id) {
                let placeholder = Document::new(entry.collection.clone(), self.actor.clone());
                self.cache_insert(doc_id, placeholder);
            }
            self.offer(conn, doc_id);
        }
    }

    /// Starts syncing a document with a peer from a fresh sync state (or the one saved when
    /// the peer last left), loading it first if it is cold. A fresh state forgets anything a
    /// lost message left in flight.
    pub(super) fn offer(&mut self, conn: ConnId, doc_id: DocId) {
        let collection = match self.catalog.get(&doc_id) {
            Some(entry) => Some(&entry.collection),
            None => self.documents.get(&doc_id).map(|d| &d.collection),
        };
        let outside_scope = match (collection, self.peers.get(&conn)) {
            (Some(collection), Some(peer)) => {
                peer.replicates_everything()
                    && !(peer.scope.contains(collection) && self.holds(collection))
            }
            _ => true,
        };
        if outside_scope {
            return;
        }
        match self.locate(doc_id) {
            Residence::Hot => {}
            Residence::Cold => return self.defer(doc_id, Deferred::Offer { conn }),
            Residence::Absent | Residence::Quarantined(_) => return,
        }
        let Some(peer) = self.peers.get(&conn) else { return };
        let (node_id, shared) = (peer.node_id, peer.sync_states.shared_heads(&doc_id));
        let shared = shared.map(<[ChangeHash]>::to_vec);
        // Offered because reconciliation found the two sides differ, so what this side last
        // heard from the peer is not trusted: the sync starts over from the heads the two
        // were known to share, as after a reconnect.
        let mut state = self.resumed_sync_state(node_id, doc_id);
        if state.shared_heads.is_empty() {
            state.shared_heads = shared.unwrap_or_default();
        }
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.sync_states.insert(doc_id, state);
            peer.awaiting_reply.remove(&doc_id);
        }
        self.sync_with(conn, doc_id);
    }

    pub(super) fn on_doc_sync(
        &mut self,
        conn: ConnId,
        doc_id: DocId,
        collection: Collection,
        bytes: &[u8],
    ) {
        let message = match sync::Message::decode(bytes) {
            Ok(message) => message,
            Err(error) => {
                return self.refuse(conn, format!("bad sync message for {doc_id}: {error}"))
            }
        };
        // A collection outside the scope both sides announced is not synced here; a peer
        // that sends one anyway is ignored for that document, as a quarantined one is.
        if self
            .peers
            .get(&conn)
            .is_some_and(|p| p.replicates_everything() && !p.scope.contains(&collection))
        {
            return;
        }
        if self.peers.get(&conn).is_some_and(|p| p.replicates_everything())
            && !self.held_or_refused(conn, &collection)
        {
            return;
        }
        match self.locate(doc_id) {
            Residence::Hot => {}
            Residence::Cold => {
                let work = Deferred::Sync { conn, collection, bytes: bytes.to_vec() };
                return self.defer(doc_id, work);
            }
            // The peer keeps syncing everything else; this document waits for an operator.
            Residence::Quarantined(_) => return,
            Residence::Absent => {
                let placeholder = Document::new(collection.clone(), self.actor.clone());
                self.cache_insert(doc_id, placeholder);
            }
        }
        let (byte_limit, change_limit) =
            (self.config.max_document_bytes, self.config.max_document_changes);
        let incoming: usize = message.changes.iter().map(<[u8]>::len).sum();
        let Some(document) = self.documents.get_mut(&doc_id) else { return };
        if document.stored_bytes.saturating_add(incoming) > byte_limit {
            return self.quarantine_merge(conn, doc_id, format!("{byte_limit} bytes"));
        }
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
        if !peer.sync_states.contains(&doc_id) {
            let state = self.resumed_sync_state(origin, doc_id);
            let Some(peer) = self.peers.get_mut(&conn) else { return };
            peer.sync_states.insert(doc_id, state);
        }
        if !message.changes.is_empty() {
            self.note_work(doc_id);
        }
        let (Some(peer), Some(document)) =
            (self.peers.get_mut(&conn), self.documents.get_mut(&doc_id))
        else {
            return;
        };
        peer.awaiting_reply.remove(&doc_id);
        let carried_changes = !message.changes.is_empty();
        let state = peer.sync_states.live(doc_id);
        let before = document.doc.get_heads();
        let history_before = document.history_len();
        // Parsed here only to store what the apply adds as it arrived (see `offered`). A
        // version 2 message carries its changes as one entry of concatenated chunks.
        let offered = message
            .changes
            .iter()
            .map(parse_change_chunks)
            .collect::<Option<Vec<_>>>()
            .map(|entries| entries.into_iter().flatten().collect::<Vec<_>>())
            .filter(|changes| !changes.is_empty())
            .map(|changes| document.offered(changes));
        // A version 2 message may carry the sender's whole saved document (Automerge sends
        // one when this side lacks over a third of the history). When it holds everything
        // this side has, it is loaded in the document's place and stored as it came; the
        // rest of the message (heads, needs, bloom filter) is then received without it. When
        // this side already has every head it names, it brings nothing and is not loaded.
        let whole = match message.changes.iter().next() {
            Some(bytes) if offered.is_none() && message.changes.len() == 1 => {
                Some(bytes).filter(|b| is_saved_document(b))
            }
            _ => None,
        };
        let brings_nothing = whole.is_some()
            && !message.heads.is_empty()
            && message.heads.iter().all(|h| document.doc.get_change_meta_by_hash(h).is_some());
        let saved = whole.filter(|_| !brings_nothing && !state.read_only).and_then(|bytes| {
            let loaded = load_saved(bytes)?;
            document.adopt(loaded).ok()?;
            Some(bytes.to_vec())
        });
        let message = if saved.is_some() || brings_nothing {
            sync::Message { changes: sync::ChunkList::empty(), ..message }
        } else {
            message
        };
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
        let holds_ours = state.their_heads.as_ref().is_some_and(|theirs| {
            let ours = document.doc.get_heads();
            !ours.is_empty() && ours.iter().all(|h| theirs.contains(h))
        });
        if holds_ours {
            peer.unacknowledged.remove(&doc_id);
        }
        let changed = document.doc.get_heads() != before;
        // A message may carry a whole document as one entry, so changes are counted once
        // applied, before anything is stored: a quarantined merge leaves the store as it was.
        let grew_by = document.history_len().saturating_sub(history_before);
        if changed && document.change_count + grew_by > change_limit {
            return self.quarantine_merge(conn, doc_id, format!("{change_limit} changes"));
        }
        let added = match saved {
            Some(saved) => Added::Saved(saved),
            None => Added::from_changes(
                offered.filter(|_| changed).and_then(|o| document.added_changes(o)),
            ),
        };
        if let Some(heads) = hub_heads {
            self.hub_advertised(doc_id, heads);
            self.recheck_regions(doc_id);
        }
        if changed {
            self.persist_added(doc_id, &before, origin, None, added, None);
        } else {
            let state = self.peers.get_mut(&conn).and_then(|p| p.sync_states.live_if_any(doc_id));
            if let Some(state) = state.filter(|_| carried_changes) {
                // The sender waits for an answer to every message that carries changes, even
                // when they were all known here.
                state.last_sent_heads.clear();
            }
            self.sync_with(conn, doc_id);
        }
    }

    /// Quarantines a document that a peer's changes would take past a limit.
    fn quarantine_merge(&mut self, conn: ConnId, doc_id: DocId, limit: String) {
        let reason = match self.peers.get(&conn) {
            Some(peer) => format!("changes from {} would take it past {limit}", peer.node_id),
            None => format!("changes would take it past {limit}"),
        };
        self.quarantine(doc_id, reason);
    }

    /// Notes the heads a hub advertised, and answers the writes they make hub-durable.
    pub(super) fn hub_advertised(&mut self, doc_id: DocId, heads: Vec<ChangeHash>) {
        self.hub_acks.record(doc_id, heads, self.hlc.new_timestamp());
        self.answer_durability_waits(doc_id);
    }

    /// Answers the writes to `doc_id` that are now as durable as they asked.
    pub(super) fn answer_durability_waits(&mut self, doc_id: DocId) {
        let Some(document) = self.documents.get(&doc_id) else { return };
        for (request, heads) in self.hub_acks.satisfied(&doc_id, &document.doc) {
            let report = self.durability_report(doc_id, &heads);
            self.outputs.push_back(Output::Respond {
                id: request,
                result: Ok(Response::Durability(report)),
            });
        }
    }

    /// Marks a document's news for every peer that follows it. The messages are generated
    /// when the driver next drains outputs, so a burst of commits to one document costs one
    /// sync message per peer rather than one per commit.
    pub(super) fn announce(&mut self, doc_id: DocId) {
        self.announced.insert(doc_id);
    }

    /// Generates the sync messages for every document announced since the last flush.
    ///
    /// Announcements follow commits, and every follower must hear the committed heads even
    /// when Automerge thinks it has nothing to say: a peer's message that echoed our heads
    /// while they were still uncommitted makes Automerge record them as sent, and without a
    /// new message the peer would never learn they are now durable.
    pub(super) fn flush_announced(&mut self) {
        if self.announced.is_empty() {
            return;
        }
        let offered_at = self.hlc.new_timestamp().get_time().as_u64();
        for doc_id in std::mem::take(&mut self.announced) {
            self.offer_committed(doc_id, offered_at);
        }
    }

    fn offer_committed(&mut self, doc_id: DocId, offered_at: u64) {
        let Some(document) = self.documents.get(&doc_id) else { return };
        let heads = document.doc.get_heads();
        let conns: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.follows(&doc_id, &document.collection))
            .map(|(c, _)| *c)
            .collect();
        for conn in conns {
            if let Some(state) =
                self.peers.get_mut(&conn).and_then(|p| p.sync_states.live_if_any(doc_id))
            {
                if state.last_sent_heads == heads {
                    state.last_sent_heads.clear();
                }
            }
            self.note_unacknowledged(conn, doc_id, offered_at);
            self.sync_with(conn, doc_id);
        }
    }

    /// Sends the next Automerge sync message for one document to one peer, if there is one.
    ///
    /// Nothing is sent while the document has uncommitted appends: the announce that follows
    /// the last commit sends it then. A message that would follow the last change-carrying
    /// one to this peer within `sync_batch_window_ms` waits for the window to close.
    pub(super) fn sync_with(&mut self, conn: ConnId, doc_id: DocId) {
        let Some(document) = self.documents.get(&doc_id).filter(|d| d.persisting == 0) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        if peer.awaiting_reply.contains(&doc_id) {
            return; // The peer's answer brings us back here, with everything made meanwhile.
        }
        let paced = self.now.filter(|_| peer.replicates_everything());
        let heads = document.doc.get_heads();
        let state = peer.sync_states.live(doc_id);
        if let Some(now) = paced {
            if self.pacing.holds(conn, doc_id, state, &heads, now) {
                return; // `handle_timeout` sends it, with everything made meanwhile.
            }
        }
        let Some(message) = document.doc.generate_sync_message(state) else {
            peer.sync_states.compact(&doc_id, &heads);
            return;
        };
        if !message.changes.is_empty() && peer.replicates_everything() {
            peer.awaiting_reply.insert(doc_id);
            if let Some(now) = self.now {
                self.pacing.sent_changes(conn, doc_id, now);
            }
        } else {
            peer.sync_states.compact(&doc_id, &heads);
        }
        let part = DocSyncPart {
            doc_id,
            collection: document.collection.clone(),
            sync_message: message.encode(),
        };
        self.queue_doc_sync(conn, part);
    }

    /// Queues one document's sync message for a peer. Queued messages leave together when the
    /// driver next drains outputs, or sooner when the batch is full.
    fn queue_doc_sync(&mut self, conn: ConnId, part: DocSyncPart) {
        let full_at = self.batch_bytes();
        let batch = self.sync_batches.entry(conn).or_default();
        batch.bytes += part.sync_message.len() + DOC_SYNC_PART_OVERHEAD;
        batch.parts.push(part);
        if batch.bytes >= full_at || batch.parts.len() >= MAX_BATCH_PARTS {
            self.flush_batch(conn);
        }
    }

    /// Most bytes of sync messages one batch frame carries: small enough that a frame never
    /// reaches the limit, large enough that catch-up needs few frames.
    fn batch_bytes(&self) -> usize {
        (self.config.max_frame_bytes / 4).min(MAX_BATCH_BYTES)
    }

    /// Sends every queued sync message.
    pub(super) fn flush_batches(&mut self) {
        let conns: Vec<ConnId> = self.sync_batches.keys().copied().collect();
        for conn in conns {
            self.flush_batch(conn);
        }
    }

    /// Sends a peer's queued sync messages as one frame: a single message as it is, several
    /// as a batch, compressed when the batch is large and compressing shrinks it.
    fn flush_batch(&mut self, conn: ConnId) {
        let Some(batch) = self.sync_batches.remove(&conn) else { return };
        let Some(peer) = self.peers.get(&conn) else { return };
        // Clients are bridged in this process: compressing for them only costs time.
        let compress = peer.replicates_everything();
        let mut parts = batch.parts;
        let message = if parts.len() == 1 {
            let Some(DocSyncPart { doc_id, collection, sync_message }) = parts.pop() else {
                return;
            };
            Message::DocSync { doc_id, collection, sync_message }
        } else {
            Message::DocSyncBatch { parts }
        };
        let threshold = self.config.compress_above_bytes;
        if compress && threshold > 0 && batch.bytes >= threshold {
            let compressed = message.compress();
            if let Message::Compressed { deflated } = &compressed {
                if deflated.len() < batch.bytes {
                    self.stats.frames_compressed += 1;
                    return self.send(conn, compressed);
                }
            }
        }
        self.send(conn, message);
    }

    pub(super) fn send(&mut self, conn: ConnId, message: Message) {
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
    pub(super) fn refuse(&mut self, conn: ConnId, reason: String) {
        self.stats.protocol_errors += 1;
        self.send(
            conn,
            Message::Refuse { reason: reason.clone(), protocol_version: PROTOCOL_VERSION },
        );
        self.outputs.push_back(Output::Close { conn, reason });
        self.peers.remove(&conn);
    }
}
