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
        let message = match envelope.message {
            Message::Compressed { deflated } => Message::decompress(&deflated, usize::MAX)
                .unwrap_or_else(|error| {
                    cluster.fail(format!("node {index} sent a bad compressed message: {error}"))
                }),
            message => message,
        };
        match &message {
            Message::DocSync { doc_id, sync_message, .. } => {
                audit_advert(cluster, index, *doc_id, sync_message)
            }
            Message::DocSyncBatch { parts } => {
                for part in parts {
                    audit_advert(cluster, index, part.doc_id, &part.sync_message);
                }
            }
            _ => {}
        }
        messages.push(message);
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
        Message::Reconcile { parts, .. } => format!("reconcile of {} collections", parts.len()),
        Message::DocSync { doc_id, sync_message, .. } => {
            format!("sync of {doc_id} ({} bytes)", sync_message.len())
        }
        Message::DocSyncBatch { parts } => format!("sync of {} documents", parts.len()),
        Message::Compressed { deflated } => format!("compressed ({} bytes)", deflated.len()),
        Message::Ping => "ping".into(),
        Message::Hubs { hubs } => format!("{} hubs", hubs.len()),
        Message::NotHeld { collection, .. } => format!("not held ({collection})"),
        Message::Pong => "pong".into(),
        Message::WatchRegions { doc_id, regions, .. } => {
            format!("watch of {doc_id} for {regions} regions")
        }
        Message::HeldInRegions { doc_id, regions, .. } => {
            format!("{doc_id} held in {}", regions.join(", "))
        }
    }
}

/// Every document a node committed, read back from its store as a load would.
fn stored_documents(cluster: &Cluster, index: usize) -> BTreeMap<DocId, Document> {
    cluster.slots[index]
        .store
        .documents()
        .map(|stored| {
            let document =
                Document::load(stored, ActorId::from([0xEEu8; 16])).unwrap_or_else(|error| {
                    cluster
                        .fail(format!("node {index} stored {} unreadably: {error}", stored.doc_id))
                });
            (stored.doc_id, document)
        })
        .collect()
}

/// A node rebuilt from its store knows every document and holds every change it
/// acknowledged before it crashed.
pub fn assert_recovered(cluster: &Cluster, index: usize) {
    let node = cluster.node(index);
    let documents = stored_documents(cluster, index);
    for ack in cluster.ledger.acks.iter().filter(|ack| ack.node == index) {
        let (Some(document), true) =
            (documents.get(&ack.doc_id), node.catalog().any(|(id, _)| *id == ack.doc_id))
        else {
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

/// A node's replicas as its store holds them: after quiescence every task has committed, and
/// documents evicted from memory exist only there.
fn replicas_of(cluster: &Cluster, index: usize) -> BTreeMap<DocId, Replica> {
    stored_documents(cluster, index)
        .into_iter()
        .map(|(doc_id, document)| {
            let mut heads = document.doc.get_heads();
            heads.sort();
            (doc_id, Replica { heads, json: document.to_json() })
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
    let documents = stored_documents(cluster, crate::sim::cluster::HUB);
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

/// After quiescence every task has committed: the catalog matches the store's heads index,
/// every document in memory matches its stored copy, and nothing is quarantined.
fn assert_store_matches_memory(cluster: &Cluster, index: usize) {
    let node = cluster.node(index);
    let stored = stored_documents(cluster, index);
    let catalog: Vec<&DocId> = node.catalog().map(|(id, _)| id).collect();
    let stored_ids: Vec<&DocId> = stored.keys().collect();
    if catalog != stored_ids {
        cluster.fail(format!("node {index} lists {catalog:?} but stored {stored_ids:?}"));
    }
    if let Some((doc_id, reason)) = node.quarantined().next() {
        cluster.fail(format!("node {index} quarantined {doc_id}: {reason}"));
    }
    let in_memory = node.documents().map(|(id, d)| (id, d.doc.get_heads()));
    let in_catalog = node.catalog().map(|(id, entry)| (id, entry.heads.clone()));
    for (doc_id, mut heads) in in_memory.chain(in_catalog) {
        let Some(loaded) = stored.get(doc_id) else {
            cluster.fail(format!("node {index} holds {doc_id} but did not store it"));
        };
        let mut stored_heads = loaded.doc.get_heads();
        stored_heads.sort();
        heads.sort();
        if stored_heads != heads {
            cluster.fail(format!(
                "node {index} stored {doc_id} at heads {stored_heads:?} but holds {heads:?}"
            ));
        }
    }
}
