//! Clients: writes (single or in bursts) generated from what the node just read, and the
//! ledger of what the node acknowledged.

use automerge::ChangeHash;
use cairn_shared::ids::DocId;
use cairn_shared::node::{Input, Request, RequestError, RequestId, Response};
use rand::Rng;
use serde_json::Value as Json;

use super::{workload, Ack, Cluster, PendingWrite, Phase, BURST, CREATE};

impl Cluster {
    /// A client writes to a node: once, or in a burst at one instant, which piles up store tasks.
    pub(super) fn client_write(&mut self, index: usize) {
        if self.phase != Phase::Faults || self.slots[index].node.is_none() {
            return;
        }
        let count = if self.rng.gen_bool(BURST) { self.rng.gen_range(2..=4) } else { 1 };
        for _ in 0..count {
            self.write_once(index);
        }
    }

    /// Creates a document, or edits one the node holds with ops generated from what it just read.
    fn write_once(&mut self, index: usize) {
        let docs: Vec<DocId> = self.node(index).catalog().map(|(id, _)| *id).collect();
        if docs.is_empty() || self.rng.gen_bool(CREATE) {
            let doc_id = DocId::random(&mut self.rng);
            let collection = workload::collection(&mut self.rng);
            let ops = workload::create_ops(&mut self.rng);
            self.submit(index, doc_id, Request::Create { doc_id, collection, ops });
        } else {
            let doc_id = docs[self.rng.gen_range(0..docs.len())];
            let Some(state) = self.read(index, doc_id) else {
                return;
            };
            let ops = workload::edit_ops(&mut self.rng, &state);
            self.submit(index, doc_id, Request::Edit { doc_id, ops });
        }
    }

    /// Sends a write and notes the change it made, to check its durability later.
    pub fn submit(&mut self, index: usize, doc_id: DocId, request: Request) {
        let id = self.next_request_id();
        let creates = matches!(request, Request::Create { .. });
        let before = self.heads(index, doc_id);
        self.slots[index].writes.insert(id, PendingWrite { doc_id, creates, change: None });
        self.ledger.writes += 1;
        self.drive(index, Input::Request { id, request });
        let after = self.heads(index, doc_id);
        if after == before {
            return;
        }
        // A local change depends on every head, so it is the only head afterwards.
        let [change] = after[..] else { self.fail(format!("a local write left heads {after:?}")) };
        if let Some(write) = self.slots[index].writes.get_mut(&id) {
            write.change = Some(change);
        }
        self.note(|| format!("node {index} write {id} on {doc_id} made change {change}"));
    }

    /// What a client editing through this node sees: the in-memory document, which edits
    /// apply to. (Reads through the request API wait for in-flight appends to commit, so
    /// they may lag it and would yield ops that no longer fit.) A cold document is not seen
    /// until the read has loaded it.
    pub fn read(&mut self, index: usize, doc_id: DocId) -> Option<Json> {
        let id = self.next_request_id();
        self.drive(index, Input::Request { id, request: Request::Read { doc_id } });
        let node = self.node(index);
        node.documents().find(|(id, _)| **id == doc_id).map(|(_, document)| document.to_json())
    }

    /// Records the answer to a write; an answer to anything else is the answer to a read.
    pub(super) fn respond(
        &mut self,
        index: usize,
        id: RequestId,
        result: Result<Response, RequestError>,
    ) {
        let Some(write) = self.slots[index].writes.remove(&id) else {
            // A read's answer: it must be a document, or the document is being reloaded.
            match result {
                Ok(Response::Document { .. }) | Err(RequestError::Unavailable(_)) => return,
                other => self.fail(format!("read on node {index} answered {other:?}")),
            }
        };
        match result {
            Ok(Response::Written { doc_id, heads }) if doc_id == write.doc_id => {
                let heads = heads
                    .iter()
                    .map(|h| {
                        h.parse::<ChangeHash>()
                            .unwrap_or_else(|e| self.fail(format!("bad head {h}: {e}")))
                    })
                    .collect();
                self.note(|| format!("node {index} acks write {id} on {doc_id}: heads {heads:?}"));
                self.ledger.acks.push(Ack { node: index, doc_id, change: write.change, heads });
                if write.creates {
                    self.ledger.created.insert(doc_id);
                }
            }
            Err(RequestError::Unavailable(_)) => {}
            other => self
                .fail(format!("write {id} to {} on node {index} answered {other:?}", write.doc_id)),
        }
    }

    /// A request id never used before in this run.
    fn next_request_id(&mut self) -> RequestId {
        self.next_request += 1;
        self.next_request
    }

    /// Heads of a document on a node (empty if it lacks it).
    pub fn heads(&self, index: usize, doc_id: DocId) -> Vec<ChangeHash> {
        self.node(index)
            .documents()
            .find(|(id, _)| **id == doc_id)
            .map(|(_, d)| d.doc.get_heads())
            .unwrap_or_default()
    }
}
