//! Local requests: writes answered once durable, reads from committed state only.

use std::time::Instant;

use automerge::{Automerge, ChangeHash, LoadOptions, OnPartialLoad, ReadDoc};

use super::cache::{Deferred, Residence};
use super::{
    Added, Node, Output, Request, RequestError, RequestId, Response, StatusReport, StreamId,
};
use crate::document::{guarded, heads_hex, parse_change_chunks, Document, DocumentError};
use crate::durability::Durability;
use crate::ids::{Collection, DocId};
use crate::message::Role;
use crate::ops::{apply_ops, Op};

/// Most write streams remembered as stopped at once (see [`Node::stop_stream`]).
const MAX_STOPPED_STREAMS: usize = 4096;

impl Node {
    pub(super) fn on_request(&mut self, now: Instant, id: RequestId, request: Request) {
        if let Some(doc_id) = document_needed(&request) {
            match self.locate(doc_id) {
                Residence::Cold => {
                    return self.defer(doc_id, Deferred::Request { id, request, at: now })
                }
                Residence::Quarantined(reason) => {
                    if let Request::InStream { stream, .. } = &request {
                        self.stop_stream(*stream);
                    }
                    let result = Err(RequestError::Quarantined { doc_id, reason });
                    return self.outputs.push_back(Output::Respond { id, result });
                }
                Residence::Hot | Residence::Absent => {}
            }
        }
        let result = self.answer(now, id, request);
        if let Some(result) = result {
            self.outputs.push_back(Output::Respond { id, result });
        }
    }

    /// Answers a request whose document, if it needs one, is in memory or absent; `None` when
    /// the answer comes later (a write once durable, a wait once satisfied).
    fn answer(
        &mut self,
        now: Instant,
        id: RequestId,
        request: Request,
    ) -> Option<Result<Response, RequestError>> {
        match request {
            Request::Status => Some(Ok(Response::Status(StatusReport {
                hub_connected: self.hub_connected(),
                hub: self.connected_hub(),
                documents: self.catalog.len(),
                documents_pending_hub: self.documents_pending_hub(),
                last_hub_sync: self.last_hub_sync(),
                clock: self.hlc.new_timestamp(),
                cache: self.cache_usage(),
                quarantined_total: self.quarantined.len(),
                quarantined: self
                    .quarantined
                    .iter()
                    .take(StatusReport::QUARANTINE_LISTED)
                    .map(|(id, reason)| (*id, reason.clone()))
                    .collect(),
                replication_lag: {
                    let mut lag = self.replication_lag();
                    lag.sort_by(|a, b| b.lag.cmp(&a.lag).then(a.peer.cmp(&b.peer)));
                    lag.truncate(StatusReport::LAG_LISTED);
                    lag
                },
                advertised_hubs: self.learned_hubs().to_vec(),
                refused_collections: self
                    .refused_by_peers()
                    .map(|(peer, collection, why)| (*peer, collection.clone(), why.to_owned()))
                    .collect(),
            }))),
            Request::Exists { doc_id } => Some(self.exists(doc_id)),
            Request::AwaitDurable { doc_id, heads, level, deadline } => {
                self.await_durable(now, id, doc_id, &heads, level, deadline)
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
            Request::InStream { stream, write } => {
                if self.stopped_streams.contains(&stream) {
                    return Some(Err(RequestError::StreamStopped));
                }
                let write = match *write {
                    write @ (Request::Edit { .. } | Request::Import { .. }) => write,
                    _ => return Some(Err(RequestError::NotAStreamWrite)),
                };
                let result = self.answer(now, id, write);
                if matches!(result, Some(Err(_))) {
                    self.stop_stream(stream);
                }
                result
            }
            Request::EndStream { stream, doc_id } => {
                self.stopped_streams.remove(&stream);
                for conn in self.pacing.forget_document(doc_id) {
                    self.sync_with(conn, doc_id);
                }
                Some(Ok(Response::Ended))
            }
        }
    }

    /// Refuses the later writes of a stream. The set is bounded: a writer that never ends its
    /// stream cannot grow it, and the streams forgotten first are the oldest.
    fn stop_stream(&mut self, stream: StreamId) {
        self.stopped_streams.insert(stream);
        while self.stopped_streams.len() > MAX_STOPPED_STREAMS {
            self.stopped_streams.pop_first();
        }
    }

    /// Returns `None` when the answer waits for the store.
    pub(super) fn create(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        collection: Collection,
        ops: &[Op],
    ) -> Option<Result<Response, RequestError>> {
        if self.documents.get(&doc_id).is_some_and(|d| !d.is_placeholder)
            || self.catalog.contains(&doc_id)
            || self.loading.contains_key(&doc_id)
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

    pub(super) fn edit(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        ops: &[Op],
    ) -> Option<Result<Response, RequestError>> {
        if let Err(error) = self.live(doc_id).and_then(|d| self.within_size_limit(doc_id, d)) {
            return Some(Err(error));
        }
        let time = self.commit_time_secs();
        let document = self.documents.get_mut(&doc_id)?;
        let before = document.doc.get_heads();
        match apply_ops(&mut document.doc, ops, time) {
            Err(error) => Some(Err(error.into())),
            Ok(false) => self.answer_unchanged(id, doc_id),
            Ok(true) => {
                // `live` found it not deleted, and ops cannot touch the tombstone.
                self.persist_added(
                    doc_id,
                    &before,
                    self.node_id,
                    Some(id),
                    Added::Unknown,
                    Some(false),
                );
                None
            }
        }
    }

    /// Answers at once when the heads are already as durable as `level` asks, else parks the
    /// request until they are or the deadline passes. A wait for regions also asks the
    /// connected hubs, even when answered now, so that asking again later knows more.
    pub(super) fn await_durable(
        &mut self,
        now: Instant,
        id: RequestId,
        doc_id: DocId,
        heads: &[String],
        level: Durability,
        deadline: Instant,
    ) -> Option<Result<Response, RequestError>> {
        let heads =
            match heads.iter().map(|h| h.parse::<ChangeHash>()).collect::<Result<Vec<_>, _>>() {
                Ok(heads) => heads,
                Err(error) => return Some(Err(RequestError::BadHeads(error.to_string()))),
            };
        if self.documents.get(&doc_id).is_none_or(|d| d.is_placeholder) {
            return Some(Err(RequestError::NotFound(doc_id)));
        }
        let report = self.durability_report(doc_id, &heads);
        let regions = match level {
            Durability::Regions(n) if report.local && !report.meets(level) => n,
            _ => 0,
        };
        if regions > 0 && self.role != Role::Hub {
            self.ask_hubs_for_regions(doc_id, &heads, regions);
        }
        if report.meets(level) || !report.local || deadline <= now {
            return Some(Ok(Response::Durability(report)));
        }
        match level {
            Durability::Regions(n) if self.role == Role::Hub => {
                self.watch_regions_here(id, doc_id, heads, n, deadline)
            }
            _ => self.hub_acks.wait(id, doc_id, heads, regions, deadline),
        }
        if level == Durability::Hub && self.role != Role::Hub {
            for conn in self.ready_conns(Role::Hub) {
                self.ask_hub_for_heads(conn, doc_id);
            }
        }
        None
    }

    /// Answers a write that changed nothing with the document's heads, once they are
    /// committed: heads that include an earlier write still in flight could be lost in a
    /// crash, and an answer must never name them.
    fn answer_unchanged(
        &mut self,
        id: RequestId,
        doc_id: DocId,
    ) -> Option<Result<Response, RequestError>> {
        let document = self.documents.get(&doc_id)?;
        if document.persisting > 0 {
            let retry = Request::Edit { doc_id, ops: Vec::new() };
            self.parked_reads.entry(doc_id).or_default().push((id, retry));
            return None;
        }
        Some(Ok(Response::Written { doc_id, heads: heads_hex(&document.doc.get_heads()) }))
    }

    /// A document that exists here and is not deleted.
    pub(super) fn live(&self, doc_id: DocId) -> Result<&Document, RequestError> {
        match self.documents.get(&doc_id).filter(|d| !d.is_placeholder) {
            Some(document) if document.is_deleted() => Err(RequestError::Deleted(doc_id)),
            Some(document) => Ok(document),
            None if self.loading.contains_key(&doc_id) => Err(RequestError::Unavailable(doc_id)),
            None => Err(RequestError::NotFound(doc_id)),
        }
    }

    /// Whether a document exists and is not deleted, answered from the catalog when it is
    /// not in memory, so checking costs no load.
    fn exists(&self, doc_id: DocId) -> Result<Response, RequestError> {
        if self.documents.contains_key(&doc_id) {
            return self.live(doc_id).map(|_| Response::Exists);
        }
        if let Some(reason) = self.quarantined.get(&doc_id) {
            return Err(RequestError::Quarantined { doc_id, reason: reason.clone() });
        }
        match self.catalog.get(&doc_id) {
            Some(entry) if entry.deleted => Err(RequestError::Deleted(doc_id)),
            Some(_) => Ok(Response::Exists),
            None => Err(RequestError::NotFound(doc_id)),
        }
    }

    /// A document at or over `max_document_bytes` or `max_document_changes` takes no more
    /// local writes: merges past the limits quarantine a document, and local writes must not
    /// grow one toward that.
    fn within_size_limit(&self, doc_id: DocId, document: &Document) -> Result<(), RequestError> {
        let limit = self.config.max_document_bytes;
        if document.stored_bytes >= limit {
            return Err(RequestError::TooLarge { doc_id, limit });
        }
        let limit = self.config.max_document_changes;
        if document.change_count >= limit {
            return Err(RequestError::TooManyChanges { doc_id, limit });
        }
        Ok(())
    }

    /// Answers a read from committed state only: while the document has appends in flight,
    /// the read waits for them, so nothing is ever shown that a crash could take back.
    pub(super) fn read_committed(
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

    pub(super) fn read(&self, doc_id: DocId) -> Result<Response, RequestError> {
        self.live(doc_id).map(|document| Response::Document {
            doc_id,
            collection: document.collection.clone(),
            heads: heads_hex(&document.doc.get_heads()),
            doc: document.to_json(),
        })
    }

    pub(super) fn read_at(
        &self,
        doc_id: DocId,
        heads: &[String],
    ) -> Result<Response, RequestError> {
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

    pub(super) fn delete(
        &mut self,
        id: RequestId,
        doc_id: DocId,
    ) -> Option<Result<Response, RequestError>> {
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

    pub(super) fn import(
        &mut self,
        id: RequestId,
        doc_id: DocId,
        collection: Option<Collection>,
        bytes: &[u8],
    ) -> Option<Result<Response, RequestError>> {
        // Every Automerge chunk, saved document or change, starts with these bytes; Automerge
        // itself skips what it cannot parse, which would make garbage look like "no news".
        const AUTOMERGE_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
        if !bytes.starts_with(&AUTOMERGE_MAGIC) {
            return Some(Err(RequestError::BadBytes("not Automerge data".into())));
        }
        let exists = self.documents.get(&doc_id).is_some_and(|d| !d.is_placeholder);
        if let Some(Err(error)) = self
            .documents
            .get(&doc_id)
            .filter(|_| exists)
            .map(|d| self.within_size_limit(doc_id, d))
        {
            return Some(Err(error));
        }
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
        let mut saved = None;
        let (offered, merged) = match parse_change_chunks(bytes).filter(|c| !c.is_empty()) {
            // Change chunks only, each one checked whole (checksum included) as it parsed:
            // applied as parsed. What the merge adds is stored as it arrived (`offered`).
            Some(changes) => {
                let offered = document.offered(changes);
                let lacking = offered.lacking().to_vec();
                (Some(offered), guarded(|| document.doc.apply_changes(lacking)))
            }
            None => {
                // A saved document, or something else: parsed into a scratch document first,
                // refusing partial data, so a damaged upload is refused whole rather than
                // merged up to the damage.
                let options = LoadOptions::new().on_partial_load(OnPartialLoad::Error);
                let parsed = match guarded(|| Ok(Automerge::load_with_options(bytes, options))) {
                    Ok(parsed) => parsed,
                    Err(error) => return Some(Err(RequestError::BadBytes(error.to_string()))),
                };
                if parsed.as_ref().is_ok_and(|scratch| !scratch.get_missing_deps(&[]).is_empty()) {
                    // A saved document trailed by changes whose history it lacks: refused
                    // whole, as such changes would wait unseen and never be stored.
                    let missing = "the changes depend on history this document does not have";
                    return Some(Err(RequestError::BadBytes(missing.into())));
                }
                let merged = match parsed.map(|scratch| document.adopt(scratch)) {
                    // It holds all this document has: it becomes the document, stored as sent.
                    Ok(Ok(_)) => {
                        saved = Some(bytes.to_vec());
                        Ok(())
                    }
                    Ok(Err(mut scratch)) => {
                        guarded(|| document.doc.merge(&mut scratch).map(|_| ()))
                    }
                    // Every chunk parsed, but the upload builds on history it does not carry,
                    // as an incremental save does: it applies on top of this document.
                    Err(automerge::AutomergeError::MissingDeps) => {
                        guarded(|| document.doc.load_incremental(bytes).map(|_| ()))
                    }
                    Err(error) => return Some(Err(RequestError::BadBytes(error.to_string()))),
                };
                (None, merged)
            }
        };
        match merged {
            Ok(()) => {}
            Err(DocumentError::Refused(error)) => return Some(Err(RequestError::BadBytes(error))),
            Err(DocumentError::Panicked(error)) => {
                if fresh.is_none() {
                    self.reload(doc_id);
                }
                return Some(Err(RequestError::BadBytes(error)));
            }
        }
        if !document.doc.get_missing_deps(&[]).is_empty() {
            // Automerge keeps such changes queued until their history arrives (by sync or a
            // later upload), and applies them then; this upload alone changed nothing.
            let missing = "the changes depend on history this document does not have";
            return Some(Err(RequestError::BadBytes(missing.into())));
        }
        let heads = document.doc.get_heads();
        if heads.is_empty() {
            return Some(Err(RequestError::BadBytes("no changes in the data".into())));
        }
        if heads == before {
            return self.answer_unchanged(id, doc_id);
        }
        let added = match saved {
            Some(saved) => Added::Saved(saved),
            None => Added::from_changes(offered.and_then(|o| document.added_changes(o))),
        };
        if let Some(document) = fresh {
            self.documents.insert(doc_id, document);
        }
        self.persist_added(doc_id, &before, self.node_id, Some(id), added, None);
        None
    }
}

/// The document a request needs in memory, if any. Status and existence checks are answered
/// from the catalog; creation needs no stored copy.
fn document_needed(request: &Request) -> Option<DocId> {
    match request {
        Request::InStream { write, .. } => document_needed(write),
        Request::EndStream { .. } => None,
        Request::Edit { doc_id, .. }
        | Request::Delete { doc_id }
        | Request::Import { doc_id, .. }
        | Request::AwaitDurable { doc_id, .. }
        | Request::Read { doc_id }
        | Request::ReadAt { doc_id, .. }
        | Request::History { doc_id, .. }
        | Request::Export { doc_id } => Some(*doc_id),
        Request::Create { .. } | Request::Status | Request::Exists { .. } => None,
    }
}
