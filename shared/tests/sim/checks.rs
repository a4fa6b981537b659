//! What must hold: during a run (every frame a node sends decodes, no node advertises heads it
//! has not stored, a restarted node still has every write it acknowledged) and after it (every
//! replica identical, nothing acknowledged lost, every store able to rebuild its node's
//! documents).

use std::collections::BTreeMap;

use automerge::sync;
use automerge::{ActorId, ChangeHash, ReadDoc};
use cairn_shared::document::Document;
use cairn_shared::frame::FrameDecoder;
use cairn_shared::ids::DocId;
use cairn_shared::message::{Envelope, Message};
use serde_json::Value as Json;

use crate::sim::cluster::Cluster;

/// Checks that every frame a node sends decodes, and that no sync message advertises heads its
/// sender has not stored: a node tells peers only about committed changes, so that a hub never
/// advertises heads it could lose in a crash. Returns the messages sent.
pub fn audit_transmit(cluster: &Cluster, index: usize, bytes: &[u8]) -> Vec<Message> {
    let mut decoder = FrameDecoder::new(usize::MAX);
    decoder.push(bytes);
    let mut messages = Vec::new();
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) if decoder.buffered_bytes() == 0 => return messages,
            other => cluster
                .fail(format!("node {index} sent bytes that are not whole frames: {other:?}")),
        };
        let envelope = Envelope::decode(&frame).unwrap_or_else(|error| {
            cluster.fail(format!("node {index} sent a frame it cannot decode: {error}"))
        });
        if let Message::DocSync { doc_id, sync_message, .. } = &envelope.message {
            audit_advert(cluster, index, *doc_id, sync_message);
        }
        messages.push(envelope.message);
    }
}

fn audit_advert(cluster: &Cluster, index: usize, doc_id: DocId, sync_message: &[u8]) {
    let message = sync::Message::decode(sync_message).unwrap_or_else(|error| {
        cluster.fail(format!("node {index} sent a bad sync message: {error}"))
    });
    let store = &cluster.slots[index].store;
    let unstored: Vec<ChangeHash> =
        message.heads.into_iter().filter(|h| !store.is_durable(h)).collect();
    if !unstored.is_empty() {
        cluster.fail(format!(
            "node {index} advertised heads {unstored:?} of {doc_id}, which it has not stored"
        ));
    }
}

/// A message in a few words, for the trace.
pub fn describe(message: &Message) -> String {
    match message {
        Message::Hello { .. } => "hello".into(),
        Message::Refuse { reason, .. } => format!("refuse ({reason})"),
        Message::Inventory { entries } => format!("inventory of {}", entries.len()),
        Message::Reconcile { message } => format!("reconcile of {} ranges", message.ranges.len()),
        Message::DocSync { doc_id, sync_message, .. } => {
            format!("sync of {doc_id} ({} bytes)", sync_message.len())
        }
    }
}

/// A node rebuilt from its store holds every change it acknowledged before it crashed.
pub fn assert_recovered(cluster: &Cluster, index: usize) {
    let node = cluster.node(index);
    let documents: BTreeMap<&DocId, &Document> = node.documents().collect();
    for ack in cluster.ledger.acks.iter().filter(|ack| ack.node == index) {
        let Some(document) = documents.get(&ack.doc_id) else {
            cluster.fail(format!(
                "node {index} restarted without {}, which it acknowledged a write to",
                ack.doc_id
            ));
        };
        if let Some(change) = ack.change {
            if document.doc.get_change_by_hash(&change).is_none() {
                cluster.fail(format!(
                    "node {index} restarted without acknowledged change {change} of {}",
                    ack.doc_id
                ));
            }
        }
    }
}

/// One replica of one document.
#[derive(Debug, PartialEq)]
struct Replica {
    heads: Vec<ChangeHash>,
    json: Json,
}

/// The final state: every node holds the same documents with the same heads and content, every
/// acknowledged creation and change is there, and every store rebuilds what its node holds.
pub fn assert_converged(cluster: &Cluster) {
    let replicas: Vec<BTreeMap<DocId, Replica>> =
        (0..cluster.slots.len()).map(|i| replicas_of(cluster, i)).collect();
    let (reference, others) = replicas.split_first().expect("a cluster has a hub");
    for (offset, replica) in others.iter().enumerate() {
        compare(cluster, reference, replica, offset + 1);
    }
    for doc_id in &cluster.ledger.created {
        if !reference.contains_key(doc_id) {
            cluster.fail(format!("acknowledged creation of {doc_id} is lost"));
        }
    }
    assert_acks_survived(cluster);
    for index in 0..cluster.slots.len() {
        assert_store_matches_memory(cluster, index);
    }
}

fn replicas_of(cluster: &Cluster, index: usize) -> BTreeMap<DocId, Replica> {
    let node = cluster.node(index);
    node.documents()
        .map(|(doc_id, document)| {
            let mut heads = document.doc.get_heads();
            heads.sort();
            (*doc_id, Replica { heads, json: document.to_json() })
        })
        .collect()
}

fn compare(
    cluster: &Cluster,
    hub: &BTreeMap<DocId, Replica>,
    agent: &BTreeMap<DocId, Replica>,
    index: usize,
) {
    let hub_docs: Vec<&DocId> = hub.keys().collect();
    let agent_docs: Vec<&DocId> = agent.keys().collect();
    if hub_docs != agent_docs {
        cluster.fail(format!("node {index} holds documents {agent_docs:?}, the hub {hub_docs:?}"));
    }
    for (doc_id, replica) in hub {
        let other = &agent[doc_id];
        if other.heads != replica.heads {
            cluster.fail(format!(
                "{doc_id}: node {index} has heads {:?}, the hub {:?}",
                other.heads, replica.heads
            ));
        }
        if other.json != replica.json {
            cluster.fail(format!(
                "{doc_id}: node {index} reads {}, the hub {}",
                other.json, replica.json
            ));
        }
    }
}

/// Every replica is identical by now, so the hub's copy speaks for all.
fn assert_acks_survived(cluster: &Cluster) {
    let hub = cluster.node(crate::sim::cluster::HUB);
    let documents: BTreeMap<&DocId, &Document> = hub.documents().collect();
    for ack in &cluster.ledger.acks {
        let Some(document) = documents.get(&ack.doc_id) else {
            cluster.fail(format!(
                "{} is lost, though node {} acknowledged a write to it",
                ack.doc_id, ack.node
            ));
        };
        if let Some(change) = ack.change.filter(|c| document.doc.get_change_by_hash(c).is_none()) {
            cluster.fail(format!(
                "acknowledged change {change} of {} (node {}) is lost",
                ack.doc_id, ack.node
            ));
        }
        if let Some(head) = ack.heads.iter().find(|h| document.doc.get_change_by_hash(h).is_none())
        {
            cluster.fail(format!(
                "node {} acknowledged a write to {} with heads {:?}, but {head} is in no replica",
                ack.node, ack.doc_id, ack.heads
            ));
        }
    }
}

/// After quiescence every task has committed, so loading the store yields the node's documents.
fn assert_store_matches_memory(cluster: &Cluster, index: usize) {
    let node = cluster.node(index);
    let in_memory: BTreeMap<&DocId, &Document> = node.documents().collect();
    let stored: Vec<_> = cluster.slots[index].store.documents().collect();
    if stored.len() != in_memory.len() {
        cluster.fail(format!(
            "node {index} holds {} documents but stored {}",
            in_memory.len(),
            stored.len()
        ));
    }
    for entry in stored {
        let loaded = Document::load(entry, ActorId::from([0xEEu8; 16])).unwrap_or_else(|error| {
            cluster.fail(format!("node {index} stored {} unreadably: {error}", entry.doc_id))
        });
        let Some(document) = in_memory.get(&entry.doc_id) else {
            cluster.fail(format!("node {index} stored {} but does not hold it", entry.doc_id));
        };
        let (mut stored_heads, mut memory_heads) =
            (loaded.doc.get_heads(), document.doc.get_heads());
        stored_heads.sort();
        memory_heads.sort();
        if stored_heads != memory_heads {
            cluster.fail(format!(
                "node {index} stored {} at heads {stored_heads:?} but holds {memory_heads:?}",
                entry.doc_id
            ));
        }
    }
}
