//! One node driven by hand: handshake rules, refusals, durability ordering and the clock
//! drift policy, checked output by output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use automerge::{sync, ActorId};
use cairn_shared::config::SyncConfig;
use cairn_shared::document::Document;
use cairn_shared::frame::{encode_frame, FrameDecoder};
use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::message::{CollectionReconcile, HubInfo};
use cairn_shared::message::{Envelope, Message, Role, PROTOCOL_VERSION};
use cairn_shared::node::RequestError;
use cairn_shared::node::{Input, Node, Output, Request, Response};
use cairn_shared::ops::Op;
use cairn_shared::reconcile::{Fingerprint, IdRange, RangePart, ReconcileMessage};
use cairn_shared::scope::{CollectionScope, HoldingRule};
use cairn_shared::store_task::{IndexEntry, StoreReply, StoreTask, StoredDoc};
use serde_json::json;

const PEER: NodeId = NodeId::from_bytes([2; 16]);
const CONN: u64 = 7;

fn fixed_clock() -> uhlc::NTP64 {
    uhlc::NTP64(1 << 40)
}

/// A hub node without heartbeats: most tests jump time ahead by whole anti-entropy rounds,
/// with no traffic between, which heartbeats would rightly treat as a dead peer.
fn node() -> Node {
    node_with(SyncConfig { heartbeat_interval_ms: 0, ..SyncConfig::hub() })
}

fn node_with(config: SyncConfig) -> Node {
    let hlc = uhlc::HLCBuilder::new()
        .with_id(uhlc::ID::try_from([1u8; 16]).unwrap())
        .with_clock(fixed_clock)
        .with_max_delta(Duration::from_millis(500))
        .build();
    Node::new(NodeId::from_bytes([1; 16]), Role::Hub, ActorId::from(vec![1u8; 16]), hlc, config)
}

fn drain(node: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

fn frame(message: Message, time: uhlc::NTP64) -> Vec<u8> {
    let sender = uhlc::ID::try_from([2u8; 16]).unwrap();
    let envelope = Envelope { sent_at: uhlc::Timestamp::new(time, sender), message };
    encode_frame(&envelope.encode(), SyncConfig::MIN_FRAME_BYTES).unwrap()
}

/// The messages in `outputs`, with batches opened into one `DocSync` per document.
fn sent_messages(outputs: &[Output]) -> Vec<Message> {
    let mut decoder = FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES);
    let mut messages = Vec::new();
    for output in outputs {
        if let Output::Transmit { bytes, .. } = output {
            decoder.push(bytes);
            while let Some(payload) = decoder.next_frame().unwrap() {
                let message = match Envelope::decode(&payload).unwrap().message {
                    Message::Compressed { deflated } => {
                        Message::decompress(&deflated, SyncConfig::MAX_FRAME_BYTES).unwrap()
                    }
                    message => message,
                };
                match message {
                    Message::DocSyncBatch { parts } => {
                        messages.extend(parts.into_iter().map(|p| Message::DocSync {
                            doc_id: p.doc_id,
                            collection: p.collection,
                            sync_message: p.sync_message,
                        }))
                    }
                    message => messages.push(message),
                }
            }
        }
    }
    messages
}

fn connect(node: &mut Node, now: Instant) -> Vec<Output> {
    node.handle_input(now, Input::Connected { conn: CONN, peer: PEER, restrict: None });
    node.handle_input(
        now,
        Input::Received {
            conn: CONN,
            bytes: frame(
                Message::Hello { node_id: PEER, role: Role::Agent, scope: CollectionScope::all() },
                fixed_clock(),
            ),
        },
    );
    drain(node)
}

/// Creates one committed document so that inventories have something to list.
fn with_document(node: &mut Node, now: Instant) {
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "v"}])).unwrap();
    let doc_id = DocId::from_slice(&[3; 16]).unwrap();
    node.handle_input(
        now,
        Input::Request {
            id: 99,
            request: Request::Create { doc_id, collection: "c".parse().unwrap(), ops },
        },
    );
    for output in drain(node) {
        if let Output::Store { task, .. } = output {
            node.handle_input(now, Input::StoreDone { task, reply: StoreReply::Committed });
        }
    }
    drain(node);
}

fn closed(outputs: &[Output]) -> Option<&str> {
    outputs.iter().find_map(|o| match o {
        Output::Close { conn: CONN, reason } => Some(reason.as_str()),
        _ => None,
    })
}

#[test]
fn both_sides_say_hello_then_the_smaller_id_starts_reconciling() {
    let mut node = node();
    with_document(&mut node, Instant::now());
    let outputs = connect(&mut node, Instant::now());
    let messages = sent_messages(&outputs);
    assert!(matches!(messages[0], Message::Hello { role: Role::Hub, .. }));
    // The node's id, [1; 16], is below the peer's: it initiates, with one summary.
    assert!(
        matches!(&messages[1], Message::Reconcile { opens: true, parts }
            if parts.len() == 1 && parts[0].message.ranges.len() == 1),
        "{messages:?}"
    );
    assert_eq!(messages.len(), 2, "no inventory: {messages:?}");
    assert_eq!(node.ready_peers(), 1);
    assert_eq!(closed(&outputs), None);
}

#[test]
fn a_hello_that_contradicts_the_certificate_is_refused() {
    let mut node = node();
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER, restrict: None });
    let liar = Message::Hello {
        node_id: NodeId::from_bytes([9; 16]),
        role: Role::Agent,
        scope: CollectionScope::all(),
    };
    node.handle_input(
        Instant::now(),
        Input::Received { conn: CONN, bytes: frame(liar, fixed_clock()) },
    );
    let outputs = drain(&mut node);
    assert!(closed(&outputs).unwrap().contains("certificate proves"));
    assert!(sent_messages(&outputs).iter().any(|m| matches!(m, Message::Refuse { .. })));
    assert_eq!(node.ready_peers(), 0);
    assert_eq!(node.stats().protocol_errors, 1);
}

#[test]
fn anything_before_hello_is_refused() {
    let mut node = node();
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER, restrict: None });
    let early = frame(Message::Inventory { entries: vec![] }, fixed_clock());
    node.handle_input(Instant::now(), Input::Received { conn: CONN, bytes: early });
    assert!(closed(&drain(&mut node)).unwrap().contains("expected hello"));
}

#[test]
fn an_unknown_protocol_version_gets_a_refusal_naming_ours() {
    let mut node = node();
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER, restrict: None });
    drain(&mut node);
    let future = encode_frame(&[PROTOCOL_VERSION + 1, 1, 2, 3], 1024).unwrap();
    node.handle_input(Instant::now(), Input::Received { conn: CONN, bytes: future });
    let outputs = drain(&mut node);
    let refusal = sent_messages(&outputs).into_iter().find_map(|m| match m {
        Message::Refuse { reason, protocol_version } => Some((reason, protocol_version)),
        _ => None,
    });
    let (reason, version) = refusal.expect("a refusal frame");
    assert_eq!(version, PROTOCOL_VERSION);
    assert!(reason.contains("unsupported protocol version 2"), "{reason}");
    assert!(closed(&outputs).is_some());
}

#[test]
fn an_oversized_frame_closes_the_connection_before_its_body_arrives() {
    let mut node = node();
    connect(&mut node, Instant::now());
    node.handle_input(
        Instant::now(),
        Input::Received { conn: CONN, bytes: u32::MAX.to_be_bytes().to_vec() },
    );
    assert!(closed(&drain(&mut node)).unwrap().contains("exceeds the limit"));
}

#[test]
fn a_write_is_answered_only_after_its_store_task_commits_and_only_then_offered_to_peers() {
    let mut node = node();
    let now = Instant::now();
    connect(&mut node, now);
    let doc_id = DocId::from_slice(&[5; 16]).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["a"], "value": 1}])).unwrap();
    let request = Request::Create { doc_id, collection: "c".parse().unwrap(), ops };
    node.handle_input(now, Input::Request { id: 1, request });
    let outputs = drain(&mut node);
    assert_eq!(outputs.len(), 1, "only the store task, no answer and no sync yet: {outputs:?}");
    let Output::Store { task, action: StoreTask::Append { changes, .. } } = &outputs[0] else {
        panic!("{outputs:?}")
    };
    assert_eq!(changes.len(), 1);
    node.handle_input(now, Input::StoreDone { task: *task, reply: StoreReply::Committed });
    let outputs = drain(&mut node);
    assert!(matches!(&outputs[0], Output::Respond { id: 1, result: Ok(Response::Written { .. }) }));
    assert!(sent_messages(&outputs).iter().any(|m| matches!(m, Message::DocSync { .. })));
}

#[test]
fn a_peer_clock_far_ahead_is_counted_and_does_not_drag_ours() {
    let mut node = node();
    let now = Instant::now();
    connect(&mut node, now);
    let before = node.clock().new_timestamp();
    let ahead = uhlc::NTP64(fixed_clock().0 + (3600u64 << 32));
    let inventory = frame(Message::Inventory { entries: vec![] }, ahead);
    node.handle_input(now, Input::Received { conn: CONN, bytes: inventory });
    assert_eq!(node.stats().clock_drift_rejections, 1);
    assert_eq!(closed(&drain(&mut node)), None, "the peer stays connected");
    let after = node.clock().new_timestamp();
    assert!(
        after.get_time().0 < ahead.0 && after.get_time().0 - before.get_time().0 < (1u64 << 32)
    );
}

#[test]
fn anti_entropy_starts_a_reconciliation_session_when_due() {
    let mut node = node();
    let now = Instant::now();
    with_document(&mut node, now);
    connect(&mut node, now);
    let due = node.poll_timeout().unwrap();
    node.handle_timeout(due - Duration::from_millis(1));
    assert!(drain(&mut node).is_empty(), "nothing before the deadline");
    node.handle_timeout(due);
    let messages = sent_messages(&drain(&mut node));
    assert!(matches!(messages.as_slice(), [Message::Reconcile { .. }]), "{messages:?}");
    assert!(node.poll_timeout().unwrap() > due);
}

#[test]
fn a_node_says_nothing_about_a_document_until_received_changes_are_committed() {
    use automerge::sync::SyncDoc;
    let mut node = node();
    let now = Instant::now();
    connect(&mut node, now);
    let mut remote = automerge::Automerge::new();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["x"], "value": 1}])).unwrap();
    cairn_shared::ops::apply_ops(&mut remote, &ops, 0).unwrap();
    let doc_id = DocId::from_slice(&[4; 16]).unwrap();
    let doc_sync = |sync_message: Vec<u8>| Message::DocSync {
        doc_id,
        collection: "c".parse().unwrap(),
        sync_message,
    };
    // Round one: the remote announces its heads; the node (which lacks the document) answers.
    let mut state = automerge::sync::State::new();
    let first = remote.generate_sync_message(&mut state).unwrap().encode();
    node.handle_input(
        now,
        Input::Received { conn: CONN, bytes: frame(doc_sync(first), fixed_clock()) },
    );
    for reply in sent_messages(&drain(&mut node)) {
        if let Message::DocSync { sync_message, .. } = reply {
            let decoded = automerge::sync::Message::decode(&sync_message).unwrap();
            remote.receive_sync_message(&mut state, decoded).unwrap();
        }
    }
    // Round two carries the change itself.
    let with_change =
        frame(doc_sync(remote.generate_sync_message(&mut state).unwrap().encode()), fixed_clock());
    node.handle_input(now, Input::Received { conn: CONN, bytes: with_change.clone() });
    let outputs = drain(&mut node);
    let Some(Output::Store { task, .. }) = outputs.first() else { panic!("{outputs:?}") };
    assert!(sent_messages(&outputs).is_empty(), "no reply before the commit");
    // A duplicate while the commit is pending must not reveal the uncommitted heads either.
    node.handle_input(now, Input::Received { conn: CONN, bytes: with_change });
    assert!(sent_messages(&drain(&mut node)).is_empty());
    node.handle_input(now, Input::StoreDone { task: *task, reply: StoreReply::Committed });
    let replies = sent_messages(&drain(&mut node));
    assert!(matches!(replies.as_slice(), [Message::DocSync { .. }]), "{replies:?}");
}

#[test]
fn a_peer_that_never_says_hello_is_closed_after_the_hello_timeout() {
    let mut node = node();
    let now = Instant::now();
    node.handle_input(now, Input::Connected { conn: CONN, peer: PEER, restrict: None });
    drain(&mut node);
    let deadline = now + Duration::from_millis(SyncConfig::hub().hello_timeout_ms);
    assert_eq!(node.poll_timeout(), Some(deadline));
    node.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(closed(&drain(&mut node)), None);
    node.handle_timeout(deadline);
    assert_eq!(closed(&drain(&mut node)), Some("no hello in time"));
}

#[test]
fn a_quiet_peer_is_pinged_and_a_silent_one_is_disconnected() {
    let mut node = node_with(SyncConfig::hub());
    let start = Instant::now();
    connect(&mut node, start);
    let (interval, timeout) = SyncConfig::hub().heartbeat().unwrap();
    assert!(node.poll_timeout().is_some_and(|at| at <= start + interval));
    node.handle_timeout(start + interval);
    let outputs = drain(&mut node);
    assert_eq!(sent_messages(&outputs), vec![Message::Ping], "{outputs:?}");
    // Anything heard, such as the pong, counts as alive and puts the timeout off.
    let heard = start + interval + Duration::from_millis(10);
    let pong = frame(Message::Pong, fixed_clock());
    node.handle_input(heard, Input::Received { conn: CONN, bytes: pong });
    node.handle_timeout(start + timeout);
    assert_eq!(closed(&drain(&mut node)), None);
    assert_eq!(node.ready_peers(), 1);
    // Silence past the timeout since the last thing heard closes the connection.
    node.handle_timeout(heard + timeout - Duration::from_millis(1));
    assert_eq!(closed(&drain(&mut node)), None);
    node.handle_timeout(heard + timeout);
    let reason = closed(&drain(&mut node)).map(str::to_owned);
    assert!(reason.as_deref().is_some_and(|r| r.starts_with("no heartbeat")), "{reason:?}");
    assert_eq!(node.ready_peers(), 0);
}

#[test]
fn a_ping_is_answered_with_a_pong() {
    let mut node = node_with(SyncConfig::hub());
    let now = Instant::now();
    connect(&mut node, now);
    node.handle_input(
        now,
        Input::Received { conn: CONN, bytes: frame(Message::Ping, fixed_clock()) },
    );
    assert_eq!(sent_messages(&drain(&mut node)), vec![Message::Pong]);
}

#[test]
fn a_read_during_an_uncommitted_write_waits_for_the_commit() {
    let mut node = node();
    let now = Instant::now();
    with_document(&mut node, now);
    let doc_id = DocId::from_slice(&[3; 16]).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "w"}])).unwrap();
    node.handle_input(now, Input::Request { id: 1, request: Request::Edit { doc_id, ops } });
    let Some(Output::Store { task, .. }) = drain(&mut node).into_iter().next() else { panic!() };
    node.handle_input(now, Input::Request { id: 2, request: Request::Read { doc_id } });
    assert!(drain(&mut node).is_empty(), "the read must not show the uncommitted write");
    node.handle_input(now, Input::StoreDone { task, reply: StoreReply::Committed });
    let outputs = drain(&mut node);
    let read = outputs.iter().find_map(|o| match o {
        Output::Respond { id: 2, result: Ok(Response::Document { doc, .. }) } => Some(doc.clone()),
        _ => None,
    });
    assert_eq!(read, Some(json!({"k": "w"})));
}

#[test]
fn a_reconciliation_message_that_breaks_the_rules_is_refused() {
    let mut node = node();
    let now = Instant::now();
    connect(&mut node, now);
    let summary = |range: IdRange| RangePart::Fingerprint {
        range,
        fingerprint: Fingerprint::EMPTY,
        count: 0,
    };
    let overlapping = ReconcileMessage { ranges: vec![summary(IdRange::full()); 2] };
    let part = CollectionReconcile { collection: "c".parse().unwrap(), message: overlapping };
    let bytes = frame(Message::Reconcile { opens: true, parts: vec![part] }, fixed_clock());
    node.handle_input(now, Input::Received { conn: CONN, bytes });
    let outputs = drain(&mut node);
    assert!(closed(&outputs).unwrap().contains("overlaps"), "{outputs:?}");
    assert_eq!(node.stats().protocol_errors, 1);
}

/// Two nodes joined by a perfect link, every store task committing at once. Node 0 has the
/// smaller id, so it initiates reconciliation.
struct Pair {
    nodes: [Node; 2],
    /// Every frame sent: by which node, its message, its size in bytes.
    sent: Vec<(usize, Message, usize)>,
    /// Each side's store, for loads of cold documents.
    stores: [BTreeMap<DocId, StoredDoc>; 2],
    /// Each side's saved sync states, per document and peer.
    saved_states: [BTreeMap<DocId, BTreeMap<NodeId, Vec<u8>>>; 2],
    /// Answers to requests: by which node, to which request.
    answers: Vec<(usize, u64, Result<Response, RequestError>)>,
}

impl Pair {
    fn new(documents: [Vec<StoredDoc>; 2]) -> Self {
        Self::scoped(documents, [CollectionScope::all(), CollectionScope::all()])
    }

    /// Each side replicates only the collections of its scope.
    fn scoped(documents: [Vec<StoredDoc>; 2], scopes: [CollectionScope; 2]) -> Self {
        let [hub_scope, edge_scope] = scopes;
        let mut nodes = [
            wired_node(1, Role::Hub, SyncConfig { collections: hub_scope, ..SyncConfig::hub() }),
            wired_node(
                2,
                Role::Agent,
                SyncConfig { collections: edge_scope, ..SyncConfig::edge() },
            ),
        ];
        for (node, stored) in nodes.iter_mut().zip(&documents) {
            for doc in stored {
                node.load(doc).unwrap();
            }
        }
        Self {
            nodes,
            sent: Vec::new(),
            stores: Default::default(),
            saved_states: Default::default(),
            answers: Vec::new(),
        }
    }

    /// Both sides start as a real node does, from their heads index only, with a document
    /// cache of `cache_bytes`.
    fn cold(
        documents: [Vec<StoredDoc>; 2],
        cache_bytes: usize,
        max_document_bytes: [usize; 2],
    ) -> Self {
        let config = |preset, max_document_bytes| SyncConfig {
            document_cache_bytes: cache_bytes,
            max_document_bytes,
            ..preset
        };
        let hub = config(SyncConfig::hub(), max_document_bytes[0]);
        let edge = config(SyncConfig::edge(), max_document_bytes[1]);
        Self::cold_with(documents, [hub, edge])
    }

    /// Both sides start from their heads index only, configured as given.
    fn cold_with(documents: [Vec<StoredDoc>; 2], configs: [SyncConfig; 2]) -> Self {
        let [hub, edge] = configs;
        let mut nodes = [wired_node(1, Role::Hub, hub), wired_node(2, Role::Agent, edge)];
        let mut stores: [BTreeMap<DocId, StoredDoc>; 2] = Default::default();
        for side in 0..2 {
            // As a real node starts: the whole heads index at once, in id order.
            let mut index: Vec<(DocId, IndexEntry)> =
                documents[side].iter().map(|doc| (doc.doc_id, index_entry(doc))).collect();
            index.sort_by_key(|(id, _)| *id);
            nodes[side].restore_all(index);
            for doc in &documents[side] {
                stores[side].insert(doc.doc_id, doc.clone());
            }
        }
        Self {
            nodes,
            sent: Vec::new(),
            stores,
            saved_states: Default::default(),
            answers: Vec::new(),
        }
    }

    fn disconnect(&mut self) {
        let now = Instant::now();
        for side in 0..2 {
            self.nodes[side].handle_input(now, Input::Disconnected { conn: CONN });
        }
        self.run(now);
    }

    /// Bytes of every sync-message frame sent since entry `from` of `sent`.
    fn sync_bytes_since(&self, from: usize) -> usize {
        let frames =
            self.sent[from..].iter().filter(|(_, m, _)| matches!(m, Message::DocSync { .. }));
        frames.map(|(_, _, size)| size).sum()
    }

    fn connect(&mut self) {
        let now = Instant::now();
        for side in 0..2 {
            let peer = self.nodes[1 - side].node_id();
            self.nodes[side]
                .handle_input(now, Input::Connected { conn: CONN, peer, restrict: None });
        }
        self.run(now);
    }

    /// Carries outputs from each node to the other until both are quiet.
    fn run(&mut self, now: Instant) {
        self.run_losing(now, |_, _, _| false);
    }

    /// As [`Pair::run`], but the outputs `lost` picks (by sending side, given the pair as it
    /// is then) vanish instead.
    fn run_losing(&mut self, now: Instant, lost: impl Fn(&Pair, usize, &Output) -> bool) {
        let mut busy = true;
        while busy {
            busy = false;
            for side in 0..2 {
                while let Some(output) = self.nodes[side].poll_output() {
                    busy = true;
                    if !lost(self, side, &output) {
                        self.carry(now, side, output);
                    }
                }
            }
        }
    }

    fn carry(&mut self, now: Instant, side: usize, output: Output) {
        match output {
            Output::Transmit { bytes, .. } => {
                for message in
                    sent_messages(&[Output::Transmit { conn: CONN, bytes: bytes.clone() }])
                {
                    self.sent.push((side, message, bytes.len()));
                }
                self.nodes[1 - side].handle_input(now, Input::Received { conn: CONN, bytes });
            }
            Output::Store { task, action } => {
                let reply = self.execute(side, action);
                self.nodes[side].handle_input(now, Input::StoreDone { task, reply });
            }
            Output::Close { reason, .. } => panic!("node {side} closed the link: {reason}"),
            Output::Respond { id, result } => self.answers.push((side, id, result)),
        }
    }

    fn execute(&mut self, side: usize, action: StoreTask) -> StoreReply {
        let store = &mut self.stores[side];
        match action {
            StoreTask::Append { doc_id, collection, snapshot, changes, .. } => {
                let stored = store.entry(doc_id).or_insert_with(|| StoredDoc {
                    doc_id,
                    collection,
                    snapshot: None,
                    changes: Vec::new(),
                });
                if let Some(snapshot) = snapshot {
                    stored.snapshot = Some(snapshot);
                    stored.changes.clear();
                }
                stored.changes.extend(changes);
                StoreReply::Committed
            }
            StoreTask::Compact { doc_id, snapshot } => {
                if let Some(stored) = store.get_mut(&doc_id) {
                    stored.snapshot = Some(snapshot);
                    stored.changes.clear();
                }
                StoreReply::Committed
            }
            StoreTask::Load { doc_id } => {
                let states = self.saved_states[side].get(&doc_id).cloned().unwrap_or_default();
                StoreReply::Loaded(store.get(&doc_id).cloned(), states.into_iter().collect())
            }
            StoreTask::SaveSyncStates { peer, states } => {
                for (doc_id, state) in states {
                    self.saved_states[side].entry(doc_id).or_default().insert(peer, state);
                }
                StoreReply::Committed
            }
        }
    }

    /// Committed heads of every document on `side`, in memory or not.
    fn catalog_heads(&self, side: usize) -> BTreeMap<DocId, Vec<automerge::ChangeHash>> {
        self.nodes[side].catalog().map(|(id, e)| (*id, e.heads.clone())).collect()
    }

    /// Reconciliation frames sent by `side`, and their total size.
    fn reconcile_traffic(&self, side: usize) -> (usize, usize) {
        let frames = self
            .sent
            .iter()
            .filter(|(from, m, _)| *from == side && matches!(m, Message::Reconcile { .. }));
        frames.fold((0, 0), |(count, bytes), (_, _, size)| (count + 1, bytes + size))
    }

    /// Documents any sync message named.
    fn synced_documents(&self) -> BTreeSet<DocId> {
        let ids = self.sent.iter().filter_map(|(_, message, _)| match message {
            Message::DocSync { doc_id, .. } => Some(*doc_id),
            _ => None,
        });
        ids.collect()
    }

    fn heads(&self, side: usize) -> BTreeMap<DocId, Vec<automerge::ChangeHash>> {
        self.nodes[side].documents().map(|(id, d)| (*id, d.doc.get_heads())).collect()
    }
}

/// A node for [`Pair`], without heartbeats (see [`node`]).
fn wired_node(id: u8, role: Role, config: SyncConfig) -> Node {
    let config = SyncConfig { heartbeat_interval_ms: 0, ..config };
    let hlc = uhlc::HLCBuilder::new()
        .with_id(uhlc::ID::try_from([id; 16]).unwrap())
        .with_clock(fixed_clock)
        .with_max_delta(Duration::from_millis(500))
        .build();
    Node::new(NodeId::from_bytes([id; 16]), role, ActorId::from(vec![id; 16]), hlc, config)
}

/// The heads index entry a store would hold for `stored`.
fn index_entry(stored: &StoredDoc) -> IndexEntry {
    let document = Document::load(stored, ActorId::random()).unwrap();
    IndexEntry {
        collection: stored.collection.clone(),
        heads: document.doc.get_heads(),
        deleted: false,
    }
}

/// Document `n` as saved after `edits` changes, each by its own actor.
fn stored_doc(n: u32, edits: &[&str]) -> StoredDoc {
    stored_doc_in("c", n, edits)
}

/// Document `n` of `collection` as saved after `edits` changes, each by its own actor.
fn stored_doc_in(collection: &str, n: u32, edits: &[&str]) -> StoredDoc {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[15] = 1;
    let mut doc = automerge::Automerge::new();
    for (index, value) in edits.iter().enumerate() {
        doc.set_actor(ActorId::from(vec![(index % 250) as u8 + 1; 16]));
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}])).unwrap();
        cairn_shared::ops::apply_ops(&mut doc, &ops, 0).unwrap();
    }
    StoredDoc {
        doc_id: DocId::from_slice(&bytes).unwrap(),
        collection: collection.parse().unwrap(),
        snapshot: Some(doc.save()),
        changes: Vec::new(),
    }
}

const MANY: u32 = 2_000;

#[test]
fn equal_sets_of_many_documents_settle_in_one_round_trip_of_few_bytes() {
    let documents: Vec<StoredDoc> = (0..MANY).map(|n| stored_doc(n, &["v"])).collect();
    let mut pair = Pair::new([documents.clone(), documents]);
    pair.connect();
    let (initiator_frames, initiator_bytes) = pair.reconcile_traffic(0);
    let (responder_frames, responder_bytes) = pair.reconcile_traffic(1);
    assert_eq!((initiator_frames, responder_frames), (1, 1), "one round trip: {:?}", pair.sent);
    assert!(
        initiator_bytes < 1024 && responder_bytes < 1024,
        "{initiator_bytes} {responder_bytes}"
    );
    assert!(pair.synced_documents().is_empty(), "equal documents need no sync");
}

#[test]
fn catch_up_of_many_documents_travels_in_few_compressed_frames() {
    let documents: Vec<StoredDoc> = (0..500).map(|n| stored_doc(n, &["v", "w"])).collect();
    let mut pair = Pair::new([documents, Vec::new()]);
    pair.connect();
    assert_eq!(pair.heads(1).len(), 500);
    assert_eq!(
        pair.heads(0),
        pair.heads(1),
        "both sides hold the same documents at the same heads"
    );
    let sender = pair.nodes[0].stats();
    assert!(sender.frames_sent < 20, "500 documents in {} frames", sender.frames_sent);
    assert!(sender.frames_compressed >= 1, "{sender:?}");
    // Batches and compression change how messages travel, not what they say.
    assert_eq!(pair.synced_documents().len(), 500);
}

#[test]
fn equal_sets_in_many_collections_still_settle_in_one_round_trip() {
    let documents: Vec<StoredDoc> =
        (0..MANY).map(|n| stored_doc_in(&format!("c{}", n % 8), n, &["v"])).collect();
    let mut pair = Pair::new([documents.clone(), documents]);
    pair.connect();
    let (initiator_frames, initiator_bytes) = pair.reconcile_traffic(0);
    let (responder_frames, responder_bytes) = pair.reconcile_traffic(1);
    assert_eq!((initiator_frames, responder_frames), (1, 1), "one round trip: {:?}", pair.sent);
    assert!(
        initiator_bytes < 1024 && responder_bytes < 1024,
        "{initiator_bytes} {responder_bytes}"
    );
    assert!(pair.synced_documents().is_empty(), "equal documents need no sync");
}

#[test]
fn only_collections_both_sides_replicate_are_reconciled_and_synced() {
    let doc = |collection: &str, n| stored_doc_in(collection, n, &["v"]);
    // The hub holds "shared" and "hub-only"; the agent "shared", "agent-only" and "private".
    let hub_docs = vec![doc("shared", 1), doc("hub-only", 2), doc("shared", 3)];
    let agent_docs = vec![doc("shared", 4), doc("agent-only", 5), doc("private", 6)];
    let hub_scope = CollectionScope::all();
    let agent_scope = CollectionScope {
        only: Some(["shared", "agent-only", "private"].map(|c| c.parse().unwrap()).into()),
        except: ["private".parse().unwrap()].into(),
    };
    let mut pair = Pair::scoped([hub_docs.clone(), agent_docs.clone()], [hub_scope, agent_scope]);
    pair.connect();
    let ids = |docs: &[StoredDoc], keep: &[usize]| -> BTreeSet<DocId> {
        keep.iter().map(|&i| docs[i].doc_id).collect()
    };
    let hub_has: BTreeSet<DocId> = pair.heads(0).into_keys().collect();
    let agent_has: BTreeSet<DocId> = pair.heads(1).into_keys().collect();
    // "shared" travels both ways and "agent-only" reaches the hub; "hub-only" is outside the
    // agent's scope and "private" is excluded by it.
    let expected_hub: BTreeSet<DocId> =
        ids(&hub_docs, &[0, 1, 2]).union(&ids(&agent_docs, &[0, 1])).copied().collect();
    let expected_agent: BTreeSet<DocId> =
        ids(&agent_docs, &[0, 1, 2]).union(&ids(&hub_docs, &[0, 2])).copied().collect();
    assert_eq!(hub_has, expected_hub);
    assert_eq!(agent_has, expected_agent);
    for doc_id in pair.synced_documents() {
        assert!(!ids(&hub_docs, &[1]).contains(&doc_id) && doc_id != agent_docs[2].doc_id);
    }
}

#[test]
fn a_reconnect_resumes_sync_from_the_state_saved_when_the_peer_left() {
    let edits: Vec<String> = (0..600).map(|n| format!("v{n}")).collect();
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let (long, longer, longest) =
        (stored_doc(1, &edits[..598]), stored_doc(1, &edits[..599]), stored_doc(1, &edits[..600]));
    // Without a saved state: one change to catch up, from an empty sync state.
    let mut fresh = Pair::new([vec![longest], vec![longer.clone()]]);
    fresh.connect();
    let fresh_bytes = fresh.sync_bytes_since(0);
    // With one: the two sides synced, parted, and one change was made meanwhile.
    let mut resumed = Pair::new([vec![longer], vec![long.clone()]]);
    resumed.connect();
    resumed.disconnect();
    assert!(!resumed.saved_states[0].is_empty() && !resumed.saved_states[1].is_empty());
    let now = Instant::now();
    let doc_id = long.doc_id;
    let ops =
        serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "new"}])).unwrap();
    resumed.nodes[0]
        .handle_input(now, Input::Request { id: 7, request: Request::Edit { doc_id, ops } });
    resumed.run(now);
    let before = resumed.sent.len();
    resumed.connect();
    let resumed_bytes = resumed.sync_bytes_since(before);
    assert_eq!(resumed.heads(0), resumed.heads(1), "both sides converge");
    assert!(
        resumed_bytes * 2 < fresh_bytes,
        "resumed sync took {resumed_bytes} bytes, a fresh one {fresh_bytes}"
    );
}

#[test]
fn once_both_sides_hold_the_same_heads_only_settled_sync_states_stay_in_memory() {
    let edits: Vec<String> = (0..50).map(|n| format!("v{n}")).collect();
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let (older, newer) = (stored_doc(1, &edits[..10]), stored_doc(1, &edits));
    let (hub_only, agent_only) = (stored_doc(2, &["h"]), stored_doc(3, &["a"]));
    let mut pair = Pair::new([vec![newer, hub_only], vec![older.clone(), agent_only]]);
    pair.connect();
    assert_eq!(pair.heads(0), pair.heads(1));
    for side in 0..2 {
        assert_eq!(pair.nodes[side].sync_states(), (0, 3), "side {side}: every state settled");
    }

    // A later write (after the sync batch window) goes out with the first message, as it
    // would from the live state.
    let now = Instant::now() + Duration::from_secs(1);
    let doc_id = older.doc_id;
    let ops = serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "w"}])).unwrap();
    pair.nodes[0]
        .handle_input(now, Input::Request { id: 7, request: Request::Edit { doc_id, ops } });
    let before = pair.sent.len();
    pair.run(now);
    let from_hub: Vec<sync::Message> = pair.sent[before..]
        .iter()
        .filter_map(|(side, message, _)| match message {
            Message::DocSync { sync_message, .. } if *side == 0 => {
                Some(sync::Message::decode(sync_message).unwrap())
            }
            _ => None,
        })
        .collect();
    assert!(!from_hub.is_empty() && from_hub[0].changes.len() == 1, "{from_hub:?}");
    assert_eq!(from_hub.iter().map(|m| m.changes.len()).sum::<usize>(), 1);
    assert_eq!(pair.heads(0), pair.heads(1));
    for side in 0..2 {
        assert_eq!(pair.nodes[side].sync_states(), (0, 3), "side {side}: settled again");
    }

    // What is saved when the peer leaves is the shared heads, as from a live state.
    pair.disconnect();
    let saved = sync::State::decode(&pair.saved_states[0][&doc_id][&pair.nodes[1].node_id()]);
    assert_eq!(saved.unwrap().shared_heads, pair.heads(0)[&doc_id]);
}

/// The agent (side 1) writes `value`; the hub commits the write, but none of its messages
/// after that arrives. Returns the write's heads.
fn write_and_lose_the_hubs_answer(
    pair: &mut Pair,
    now: Instant,
    doc_id: DocId,
    value: &str,
) -> Vec<String> {
    let ops =
        serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}])).unwrap();
    pair.nodes[1]
        .handle_input(now, Input::Request { id: 1, request: Request::Edit { doc_id, ops } });
    pair.run_losing(now, |pair, side, output| {
        side == 0
            && matches!(output, Output::Transmit { .. })
            && pair.catalog_heads(0) == pair.catalog_heads(1)
    });
    assert_eq!(pair.catalog_heads(0), pair.catalog_heads(1), "the hub committed the write");
    pair.heads(1)[&doc_id].iter().map(|h| h.to_string()).collect()
}

#[test]
fn a_write_the_hub_committed_while_its_answer_was_lost_is_hub_durable_after_a_reconnect() {
    use cairn_shared::durability::Durability;
    let doc = stored_doc(1, &["v"]);
    let doc_id = doc.doc_id;
    let mut pair = Pair::new([vec![doc.clone()], vec![doc]]);
    pair.connect();
    let now = Instant::now() + Duration::from_secs(1);
    let await_hub = |id, heads: &[String]| Input::Request {
        id,
        request: Request::AwaitDurable {
            doc_id,
            heads: heads.to_vec(),
            level: Durability::Hub,
            deadline: now + Duration::from_secs(60),
        },
    };
    let hub_durable =
        |pair: &Pair, id| match pair.answers.iter().find(|(s, a, _)| *s == 1 && *a == id) {
            Some((_, _, Ok(Response::Durability(report)))) => Some(report.hub),
            None => None,
            Some(other) => panic!("request {id}: {other:?}"),
        };

    // A writer that asks once the link is back.
    let heads = write_and_lose_the_hubs_answer(&mut pair, now, doc_id, "first");
    pair.disconnect();
    pair.connect();
    pair.nodes[1].handle_input(now, await_hub(2, &heads));
    pair.run(now);
    assert_eq!(hub_durable(&pair, 2), Some(true));

    // A writer that waits from before the link drops: the hub is asked when it is back.
    let heads = write_and_lose_the_hubs_answer(&mut pair, now, doc_id, "second");
    pair.nodes[1].handle_input(now, await_hub(3, &heads));
    pair.run(now);
    assert_eq!(hub_durable(&pair, 3), None, "the hub's answer was lost");
    pair.disconnect();
    pair.connect();
    assert_eq!(hub_durable(&pair, 3), Some(true));
}

#[test]
fn a_connection_restricted_to_some_collections_syncs_only_those() {
    let doc = |collection: &str, n| stored_doc_in(collection, n, &["v"]);
    let hub_docs = vec![doc("lan", 1), doc("other", 2)];
    let agent_docs = vec![doc("lan", 3), doc("other", 4)];
    let mut pair = Pair::new([hub_docs.clone(), agent_docs.clone()]);
    // Only one side restricts the connection, as a LAN neighbour's carrier would.
    let now = Instant::now();
    let lan = CollectionScope::only(["lan".parse().unwrap()]);
    let peer = pair.nodes[1].node_id();
    pair.nodes[0].handle_input(now, Input::Connected { conn: CONN, peer, restrict: Some(lan) });
    let peer = pair.nodes[0].node_id();
    pair.nodes[1].handle_input(now, Input::Connected { conn: CONN, peer, restrict: None });
    pair.run(now);
    let has = |side: usize| -> BTreeSet<DocId> { pair.heads(side).into_keys().collect() };
    let expected_hub: BTreeSet<DocId> =
        [hub_docs[0].doc_id, hub_docs[1].doc_id, agent_docs[0].doc_id].into();
    let expected_agent: BTreeSet<DocId> =
        [agent_docs[0].doc_id, agent_docs[1].doc_id, hub_docs[0].doc_id].into();
    assert_eq!(has(0), expected_hub);
    assert_eq!(has(1), expected_agent);
}

#[test]
fn a_peer_lags_by_the_documents_it_has_not_acknowledged_until_it_does() {
    let doc = stored_doc(1, &["v"]);
    let mut pair = Pair::new([vec![doc.clone()], vec![doc.clone()]]);
    pair.connect();
    let pending = |pair: &Pair, side: usize| -> Vec<usize> {
        pair.nodes[side].replication_lag().iter().map(|l| l.pending_documents).collect()
    };
    assert_eq!(pending(&pair, 0), vec![0], "equal documents leave nothing to acknowledge");
    // A local write, committed and offered, but the offer not yet delivered.
    let now = Instant::now();
    let ops = serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "w"}])).unwrap();
    let edit = Request::Edit { doc_id: doc.doc_id, ops };
    pair.nodes[0].handle_input(now, Input::Request { id: 1, request: edit });
    let mut held = Vec::new();
    while let Some(output) = pair.nodes[0].poll_output() {
        match output {
            Output::Transmit { .. } => held.push(output),
            other => pair.carry(now, 0, other),
        }
    }
    assert!(!held.is_empty(), "the write is offered to the peer");
    let lag = pair.nodes[0].replication_lag();
    assert_eq!((lag.len(), lag[0].pending_documents, lag[0].role), (1, 1, Role::Agent));
    assert_eq!(lag[0].peer, pair.nodes[1].node_id());
    for output in held {
        pair.carry(now, 0, output);
    }
    pair.run(now);
    assert_eq!(pending(&pair, 0), vec![0], "the peer acknowledged the write");
    assert_eq!(pair.heads(0), pair.heads(1));
}

#[test]
fn a_hub_refuses_a_collection_it_does_not_hold_and_says_where_it_lives() {
    let doc = |collection: &str, n| stored_doc_in(collection, n, &["v"]);
    let (here, elsewhere) = (doc("here", 1), doc("elsewhere", 2));
    let mut pair = Pair::new([Vec::new(), vec![here.clone(), elsewhere.clone()]]);
    pair.nodes[0].set_holding(HoldingRule::new(|collection| match collection.as_str() {
        "elsewhere" => Err("it lives in region(s) b".into()),
        _ => Ok(()),
    }));
    pair.connect();
    let hub_has: BTreeSet<DocId> = pair.heads(0).into_keys().collect();
    assert_eq!(hub_has, [here.doc_id].into(), "the hub holds only what its region holds");
    let refused: Vec<(String, String)> = pair.nodes[1]
        .refused_by_peers()
        .map(|(_, collection, why)| (collection.to_string(), why.to_owned()))
        .collect();
    assert_eq!(refused, vec![("elsewhere".into(), "it lives in region(s) b".into())]);
    // Later edits of the refused collection stay on the agent; the peer stays connected.
    let now = Instant::now();
    let ops = serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": "w"}])).unwrap();
    let before = pair.sent.len();
    let edit = Request::Edit { doc_id: elsewhere.doc_id, ops };
    pair.nodes[1].handle_input(now, Input::Request { id: 5, request: edit });
    pair.run(now);
    let synced_after: Vec<&Message> = pair.sent[before..]
        .iter()
        .filter(
            |(_, m, _)| matches!(m, Message::DocSync { doc_id, .. } if *doc_id == elsewhere.doc_id),
        )
        .map(|(_, m, _)| m)
        .collect();
    assert!(synced_after.is_empty(), "{synced_after:?}");
    assert_eq!(pair.nodes[0].ready_peers(), 1);
    let not_held = pair.sent.iter().filter(|(_, m, _)| matches!(m, Message::NotHeld { .. }));
    assert_eq!(not_held.count(), 1, "refused once per connection");
}

#[test]
fn a_hub_answers_region_watches_and_holds_a_bounded_number_per_peer() {
    let now = Instant::now();
    let mut hub = node();
    hub.set_regions("a".into(), []);
    with_document(&mut hub, now);
    connect(&mut hub, now);
    let held = DocId::from_slice(&[3; 16]).unwrap();
    let heads: Vec<[u8; 32]> =
        hub.documents().next().unwrap().1.doc.get_heads().iter().map(|h| h.0).collect();
    let watch = |doc_id, heads: Vec<[u8; 32]>| {
        frame(Message::WatchRegions { doc_id, heads, regions: 1 }, fixed_clock())
    };
    // Heads the hub has committed: answered with its region at once, and nothing kept.
    hub.handle_input(now, Input::Received { conn: CONN, bytes: watch(held, heads) });
    let answers = sent_messages(&drain(&mut hub));
    assert!(
        answers
            .iter()
            .any(|m| matches!(m, Message::HeldInRegions { regions, .. } if regions == &["a"])),
        "{answers:?}"
    );
    assert_eq!(hub.region_watch_count(), 0);
    // Heads it has never seen: each watch is answered with no region and kept, up to a bound.
    for n in 0..1_100u32 {
        let mut id = [9u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        let doc_id = DocId::from_slice(&id).unwrap();
        hub.handle_input(now, Input::Received { conn: CONN, bytes: watch(doc_id, vec![[7; 32]]) });
    }
    let answers = sent_messages(&drain(&mut hub));
    assert_eq!(answers.len(), 1_100);
    assert!(hub.region_watch_count() <= 1_024, "{}", hub.region_watch_count());
    hub.handle_input(now, Input::Disconnected { conn: CONN });
    assert_eq!(hub.region_watch_count(), 0, "a closed connection's watches go with it");
}

#[test]
fn a_hub_tells_its_agents_which_hubs_exist_and_when_that_changes() {
    let hub_info = |n: u8, region: &str| HubInfo {
        node_id: NodeId::from_bytes([n; 16]),
        region: region.into(),
        addr: format!("127.0.0.1:77{n:02}"),
    };
    let mut pair = Pair::new([Vec::new(), Vec::new()]);
    pair.nodes[0].set_hub_directory(vec![hub_info(1, "a"), hub_info(7, "a")]);
    pair.connect();
    assert_eq!(pair.nodes[1].learned_hubs(), [hub_info(1, "a"), hub_info(7, "a")]);
    pair.nodes[0].set_hub_directory(vec![hub_info(1, "a"), hub_info(8, "b")]);
    pair.run(Instant::now());
    assert_eq!(pair.nodes[1].learned_hubs(), [hub_info(1, "a"), hub_info(8, "b")]);
    // An unchanged directory is not sent again.
    let before = pair.sent.len();
    pair.nodes[0].set_hub_directory(vec![hub_info(1, "a"), hub_info(8, "b")]);
    pair.run(Instant::now());
    assert_eq!(pair.sent.len(), before);
}

#[test]
fn only_the_documents_that_differ_are_synced_and_both_sides_converge() {
    let common: Vec<StoredDoc> = (0..MANY).map(|n| stored_doc(n, &["v"])).collect();
    let (mut first, mut second) = (common.clone(), common);
    // Held differently, held only by the initiator, held only by the responder.
    second[700] = stored_doc(700, &["v", "w"]);
    first.push(stored_doc(MANY, &["v"]));
    second.push(stored_doc(MANY + 1, &["v"]));
    let differing: BTreeSet<DocId> =
        [second[700].doc_id, first[MANY as usize].doc_id, second[MANY as usize].doc_id].into();
    let mut pair = Pair::new([first, second]);
    pair.connect();
    assert_eq!(pair.synced_documents(), differing);
    let heads = pair.heads(0);
    assert_eq!(heads.len(), MANY as usize + 2);
    assert_eq!(heads, pair.heads(1), "both sides hold the same documents at the same heads");
    // The next anti-entropy session finds nothing left to do.
    let sent_before = pair.sent.len();
    let due = pair.nodes[0].poll_timeout().unwrap();
    pair.nodes[0].handle_timeout(due);
    pair.run(due);
    let after: Vec<&Message> = pair.sent[sent_before..].iter().map(|(_, m, _)| m).collect();
    assert!(matches!(after.as_slice(), [Message::Reconcile { .. }, Message::Reconcile { .. }]));
}

#[test]
fn reconciling_equal_cold_sets_loads_no_document() {
    let documents: Vec<StoredDoc> = (0..MANY).map(|n| stored_doc(n, &["v"])).collect();
    let mut pair = Pair::cold([documents.clone(), documents], 0, [1 << 20; 2]);
    pair.connect();
    assert_eq!(pair.reconcile_traffic(0).0, 1);
    assert!(pair.synced_documents().is_empty());
    for node in &pair.nodes {
        assert_eq!(node.stats().document_loads, 0, "answering reconciliation loads nothing");
        assert_eq!(node.cache_usage().0, 0);
    }
}

#[test]
fn only_differing_cold_documents_are_loaded_and_both_sides_converge() {
    let common: Vec<StoredDoc> = (0..MANY).map(|n| stored_doc(n, &["v"])).collect();
    let (mut first, mut second) = (common.clone(), common);
    second[700] = stored_doc(700, &["v", "w"]);
    first.push(stored_doc(MANY, &["v"]));
    second.push(stored_doc(MANY + 1, &["v"]));
    let mut pair = Pair::cold([first, second], 0, [1 << 20; 2]);
    pair.connect();
    assert_eq!(pair.synced_documents().len(), 3);
    let heads = pair.catalog_heads(0);
    assert_eq!(heads.len(), MANY as usize + 2);
    assert_eq!(heads, pair.catalog_heads(1), "both sides committed the same heads");
    for node in &pair.nodes {
        // Document 700 and the one only this side held, each loaded once or twice (a load
        // per exchange when the cache holds nothing); never the thousands that were equal.
        let loads = node.stats().document_loads;
        assert!((1..=8).contains(&loads), "{loads} loads");
    }
    // Everything left memory again once the exchanges were done.
    pair.nodes[0].handle_timeout(Instant::now());
    assert_eq!(pair.nodes[0].cache_usage().0, 0);
}

#[test]
fn a_read_of_a_cold_document_waits_for_its_load() {
    let stored = stored_doc(1, &["v"]);
    let mut pair = Pair::cold([vec![stored.clone()], Vec::new()], 0, [1 << 20; 2]);
    let now = Instant::now();
    let node = &mut pair.nodes[0];
    node.handle_input(
        now,
        Input::Request { id: 9, request: Request::Read { doc_id: stored.doc_id } },
    );
    let outputs = drain(node);
    let [Output::Store { task, action: StoreTask::Load { doc_id } }] = outputs.as_slice() else {
        panic!("expected one load, got {outputs:?}");
    };
    assert_eq!(*doc_id, stored.doc_id);
    let reply = StoreReply::Loaded(Some(stored.clone()), Vec::new());
    node.handle_input(now, Input::StoreDone { task: *task, reply });
    let outputs = drain(node);
    assert!(
        matches!(&outputs[..], [Output::Respond { id: 9, result: Ok(Response::Document { doc, .. }) }] if doc["k"] == "v"),
        "{outputs:?}"
    );
}

#[test]
fn a_document_that_cannot_be_loaded_is_quarantined_and_the_peer_stays_connected() {
    let good = stored_doc(1, &["v"]);
    let mut damaged = stored_doc(1, &["v", "w"]);
    let entry = index_entry(&damaged);
    damaged.snapshot = Some(vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]);
    let mut pair = Pair::cold([Vec::new(), vec![good]], 0, [1 << 20; 2]);
    pair.nodes[0].restore(damaged.doc_id, entry);
    pair.stores[0].insert(damaged.doc_id, damaged.clone());
    pair.connect(); // A close would panic in `carry`.
    let quarantined: Vec<DocId> = pair.nodes[0].quarantined().map(|(id, _)| *id).collect();
    assert_eq!(quarantined, vec![damaged.doc_id]);
    assert_eq!(pair.nodes[0].stats().documents_quarantined, 1);
    assert_eq!(pair.nodes[0].ready_peers(), 1);
    let now = Instant::now();
    let request = Request::Read { doc_id: damaged.doc_id };
    pair.nodes[0].handle_input(now, Input::Request { id: 3, request });
    let outputs = drain(&mut pair.nodes[0]);
    assert!(
        matches!(
            &outputs[..],
            [Output::Respond { id: 3, result: Err(RequestError::Quarantined { .. }) }]
        ),
        "{outputs:?}"
    );
}

#[test]
fn a_merge_past_the_change_limit_quarantines_the_document_and_local_writes_stop_at_it() {
    let long = stored_doc(1, &["a", "b", "c", "d", "e"]);
    let short = stored_doc(2, &["v"]);
    let limited = SyncConfig { max_document_changes: 3, ..SyncConfig::hub() };
    let mut pair = Pair::cold_with(
        [Vec::new(), vec![long.clone(), short.clone()]],
        [limited, SyncConfig::edge()],
    );
    pair.connect();
    let quarantined: Vec<(DocId, String)> =
        pair.nodes[0].quarantined().map(|(id, why)| (*id, why.to_owned())).collect();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].0, long.doc_id);
    assert!(quarantined[0].1.contains("3 changes"), "{}", quarantined[0].1);
    assert!(pair.catalog_heads(0).contains_key(&short.doc_id), "other documents still sync");
    assert_eq!(pair.nodes[0].ready_peers(), 1);
    // Local writes stop at the limit too: the short document takes two more changes.
    let now = Instant::now();
    let edit = |id, value: &str| Input::Request {
        id,
        request: Request::Edit {
            doc_id: short.doc_id,
            ops: serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}]))
                .unwrap(),
        },
    };
    let mut answers = Vec::new();
    for (id, value) in [(10, "w"), (11, "x"), (12, "y")] {
        pair.nodes[0].handle_input(now, edit(id, value));
        while let Some(output) = pair.nodes[0].poll_output() {
            match output {
                Output::Respond { id, result } => answers.push((id, result.is_ok())),
                other => pair.carry(now, 0, other),
            }
        }
        pair.run(now);
    }
    assert_eq!(answers, vec![(10, true), (11, true), (12, false)]);
}

#[test]
fn a_merge_past_the_document_limit_quarantines_the_document_not_the_peer() {
    // Hex of a pseudo-random sequence: Automerge compresses repetitive values away.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let large: String = (0..4096)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            format!("{:04x}", seed >> 48)
        })
        .collect();
    let big = stored_doc(1, &[large.as_str()]);
    let small = stored_doc(2, &["v"]);
    let mut pair = Pair::cold([Vec::new(), vec![big.clone(), small.clone()]], 0, [2048, 1 << 20]);
    pair.connect();
    let quarantined: Vec<DocId> = pair.nodes[0].quarantined().map(|(id, _)| *id).collect();
    assert_eq!(quarantined, vec![big.doc_id]);
    assert!(pair.catalog_heads(0).contains_key(&small.doc_id), "other documents still sync");
    assert_eq!(pair.nodes[0].ready_peers(), 1);
}

/// Sync messages `side` sent since entry `from` of `sent` that carried changes.
fn change_messages_since(pair: &Pair, side: usize, from: usize) -> usize {
    let carried = |message: &Message| match message {
        Message::DocSync { sync_message, .. } => {
            !automerge::sync::Message::decode(sync_message).unwrap().changes.is_empty()
        }
        _ => false,
    };
    pair.sent[from..].iter().filter(|(s, m, _)| *s == side && carried(m)).count()
}

#[test]
fn a_document_written_in_a_stream_reaches_a_peer_once_per_batch_window() {
    let document = stored_doc(1, &["a"]);
    let doc_id = document.doc_id;
    let mut pair = Pair::new([vec![document.clone()], vec![document]]);
    pair.connect();
    let window = SyncConfig::edge().sync_batch_window();
    let edit = |pair: &mut Pair, id: u64, value: u64, now: Instant| {
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}])).unwrap();
        let request = Request::Edit { doc_id, ops };
        pair.nodes[1].handle_input(now, Input::Request { id, request });
        pair.run(now);
    };

    // Written now and then: each write goes at once.
    let start = Instant::now() + Duration::from_secs(10);
    let before = pair.sent.len();
    edit(&mut pair, 1, 1, start);
    assert_eq!(change_messages_since(&pair, 1, before), 1);
    assert_eq!(pair.heads(0), pair.heads(1), "an idle document's write is not held");

    // Written in a stream: writes inside the window wait for it to close, then go together.
    let before = pair.sent.len();
    edit(&mut pair, 2, 2, start + window / 4);
    edit(&mut pair, 3, 3, start + window / 2);
    assert_eq!(change_messages_since(&pair, 1, before), 0, "held inside the window");
    assert_ne!(pair.heads(0), pair.heads(1));
    let due = pair.nodes[1].poll_timeout().expect("a timer for the held message");
    assert!(due <= start + window, "held no longer than the window");
    pair.nodes[1].handle_timeout(due);
    pair.run(due);
    assert_eq!(change_messages_since(&pair, 1, before), 1, "both writes in one message");
    assert_eq!(pair.heads(0), pair.heads(1));
}

#[test]
fn with_a_zero_window_every_write_goes_at_once() {
    let document = stored_doc(1, &["a"]);
    let doc_id = document.doc_id;
    let unpaced =
        |preset| SyncConfig { sync_batch_window_ms: 0, heartbeat_interval_ms: 0, ..preset };
    let configs = [unpaced(SyncConfig::hub()), unpaced(SyncConfig::edge())];
    let mut pair = Pair::cold_with([vec![document.clone()], vec![document]], configs);
    pair.connect();
    let now = Instant::now();
    let before = pair.sent.len();
    for value in 1..=3 {
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}])).unwrap();
        let request = Request::Edit { doc_id, ops };
        pair.nodes[1].handle_input(now, Input::Request { id: value, request });
        pair.run(now);
        assert_eq!(pair.heads(0), pair.heads(1), "write {value} reached the hub at once");
    }
    assert_eq!(change_messages_since(&pair, 1, before), 3);
}

#[test]
fn the_end_of_a_write_stream_sends_its_document_without_waiting_for_the_window() {
    let document = stored_doc(1, &["a"]);
    let doc_id = document.doc_id;
    let mut pair = Pair::new([vec![document.clone()], vec![document]]);
    pair.connect();
    let now = Instant::now() + Duration::from_secs(10);
    let before = pair.sent.len();
    for value in 1..=3_u64 {
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["k"], "value": value}])).unwrap();
        let write = Box::new(Request::Edit { doc_id, ops });
        let request = Request::InStream { stream: 1, write };
        pair.nodes[1].handle_input(now, Input::Request { id: value, request });
        pair.run(now);
    }
    assert_eq!(change_messages_since(&pair, 1, before), 1, "the first write went at once");
    assert_ne!(pair.heads(0), pair.heads(1), "the others wait for the window");

    let request = Request::EndStream { stream: 1, doc_id };
    pair.nodes[1].handle_input(now, Input::Request { id: 9, request });
    pair.run(now);
    assert_eq!(change_messages_since(&pair, 1, before), 2, "sent at the stream's end");
    assert_eq!(pair.heads(0), pair.heads(1));
}

/// `edits` numbered values: enough changes that a peer holding only the first lacks over a
/// third of the history, so Automerge sends it the whole saved document.
fn numbered_edits(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("v{i}")).collect()
}

/// The saved documents `side` sent whole in its sync messages for `doc_id`.
fn whole_documents_sent(pair: &Pair, side: usize, doc_id: DocId) -> Vec<Vec<u8>> {
    let messages = pair.sent.iter().filter_map(|(from, message, _)| match message {
        Message::DocSync { doc_id: id, sync_message, .. } if *from == side && *id == doc_id => {
            Some(automerge::sync::Message::decode(sync_message).unwrap())
        }
        _ => None,
    });
    messages
        .flat_map(|m| m.changes.iter().map(<[u8]>::to_vec).collect::<Vec<_>>())
        .filter(|chunk| chunk.get(8) == Some(&0))
        .collect()
}

#[test]
fn a_whole_document_from_a_peer_is_stored_as_the_snapshot_it_arrived_as() {
    let edits = numbered_edits(30);
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let (full, older) = (stored_doc(1, &edits), stored_doc(1, &edits[..1]));
    let doc_id = full.doc_id;
    let mut pair = Pair::new([vec![full], vec![older]]);
    pair.connect();
    assert_eq!(pair.heads(0), pair.heads(1), "both sides converge");
    let sent = whole_documents_sent(&pair, 0, doc_id);
    assert_eq!(sent.len(), 1, "the hub sent the whole document once");
    let stored = &pair.stores[1][&doc_id];
    assert_eq!(stored.snapshot.as_ref(), Some(&sent[0]), "stored as it arrived");
    assert!(stored.changes.is_empty(), "the changes stored before it are replaced");
    assert_eq!(pair.nodes[1].stats().saved_documents_adopted, 1);
    // The stored document reads back whole, and the agent still writes as itself.
    let reloaded = Document::load(stored, ActorId::random()).unwrap();
    assert_eq!(reloaded.doc.get_heads(), pair.heads(0)[&doc_id]);
    assert_eq!(pair.catalog_heads(1)[&doc_id], pair.heads(0)[&doc_id]);
    let agent = pair.nodes[1].documents().find(|(id, _)| **id == doc_id).unwrap().1;
    assert_eq!(agent.doc.get_actor(), &ActorId::from(vec![2u8; 16]));
    assert_eq!(agent.change_count, 30);
    assert_eq!(agent.to_json(), reloaded.to_json());
}

#[test]
fn a_whole_document_lacking_a_change_held_here_is_merged_and_nothing_is_lost() {
    let edits = numbered_edits(30);
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let full = stored_doc(1, &edits);
    let doc_id = full.doc_id;
    // The agent holds the first change and one of its own that the hub lacks.
    let mut own =
        Document::load(&stored_doc(1, &edits[..1]), ActorId::from(vec![0xEEu8; 16])).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["mine"], "value": 1}])).unwrap();
    cairn_shared::ops::apply_ops(&mut own.doc, &ops, 0).unwrap();
    let concurrent = StoredDoc {
        doc_id,
        collection: "c".parse().unwrap(),
        snapshot: Some(own.doc.save()),
        changes: Vec::new(),
    };
    let mut pair = Pair::new([vec![full], vec![concurrent]]);
    pair.connect();
    assert_eq!(whole_documents_sent(&pair, 0, doc_id).len(), 1);
    assert_eq!(pair.heads(0), pair.heads(1), "both sides converge");
    let agent = pair.nodes[1].documents().find(|(id, _)| **id == doc_id).unwrap().1;
    assert_eq!(agent.to_json()["mine"], json!(1), "the agent's own change survives");
    assert_eq!(agent.to_json()["k"], json!("v29"));
    let stored = &pair.stores[1][&doc_id];
    assert!(stored.snapshot.is_none(), "merged change by change, stored as changes");
    assert_eq!(pair.nodes[1].stats().saved_documents_adopted, 0);
    assert_eq!(stored.changes.len(), 29);
}

#[test]
fn an_uploaded_saved_document_holding_all_the_document_has_is_stored_as_sent() {
    let mut node = node();
    let now = Instant::now();
    let edits = numbered_edits(5);
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let first = stored_doc(1, &edits[..1]).snapshot.unwrap();
    let full = stored_doc(1, &edits).snapshot.unwrap();
    let doc_id = DocId::from_slice(&[5; 16]).unwrap();
    let collection = Some("c".parse().unwrap());
    let mut stored = Vec::new();
    for (id, bytes) in [(1, first), (2, full)] {
        let request =
            Request::Import { doc_id, collection: collection.clone(), bytes: bytes.clone() };
        node.handle_input(now, Input::Request { id, request });
        let outputs = drain(&mut node);
        let Output::Store { task, action: StoreTask::Append { snapshot, changes, .. } } =
            &outputs[0]
        else {
            panic!("{outputs:?}")
        };
        stored.push((snapshot.clone(), changes.len(), bytes));
        node.handle_input(now, Input::StoreDone { task: *task, reply: StoreReply::Committed });
        let outputs = drain(&mut node);
        assert!(outputs
            .iter()
            .any(|o| matches!(o, Output::Respond { id: i, result: Ok(_) } if *i == id)));
    }
    for (snapshot, changes, bytes) in stored {
        assert_eq!(snapshot, Some(bytes), "the upload is the snapshot, as sent");
        assert_eq!(changes, 0);
    }
    let document = node.documents().find(|(id, _)| **id == doc_id).unwrap().1;
    assert_eq!(document.to_json()["k"], json!("v4"));
    assert_eq!(document.doc.get_actor(), &ActorId::from(vec![1u8; 16]));
}

#[test]
fn a_whole_document_that_brings_nothing_new_stores_nothing_and_is_answered() {
    use automerge::sync::SyncDoc;
    let mut node = node();
    let now = Instant::now();
    connect(&mut node, now);
    with_document(&mut node, now);
    let doc_id = DocId::from_slice(&[3; 16]).unwrap();
    let held = node.documents().find(|(id, _)| **id == doc_id).unwrap().1.doc.clone();
    // The peer's copy is the same; it sends it whole to a side that said it holds nothing.
    let (mut peer_copy, empty) = (held.clone(), automerge::Automerge::new());
    let (mut peer_state, mut empty_state) =
        (automerge::sync::State::new(), automerge::sync::State::new());
    let hello = empty.generate_sync_message(&mut empty_state).unwrap();
    peer_copy.receive_sync_message(&mut peer_state, hello).unwrap();
    let whole = peer_copy.generate_sync_message(&mut peer_state).unwrap();
    let chunk = whole.changes.iter().next().unwrap().to_vec();
    assert_eq!(chunk.get(8), Some(&0), "Automerge sent the whole document");
    let sync_message = whole.encode();
    let doc_sync = Message::DocSync { doc_id, collection: "c".parse().unwrap(), sync_message };
    node.handle_input(now, Input::Received { conn: CONN, bytes: frame(doc_sync, fixed_clock()) });
    let outputs = drain(&mut node);
    assert_eq!(closed(&outputs), None, "{outputs:?}");
    assert!(!outputs.iter().any(|o| matches!(o, Output::Store { .. })), "nothing to store");
    assert!(sent_messages(&outputs).iter().any(|m| matches!(m, Message::DocSync { .. })));
    let after = node.documents().find(|(id, _)| **id == doc_id).unwrap().1;
    assert_eq!(after.doc.get_heads(), held.get_heads());
}

/// A node that merged one change of document [4; 16] from its agent peer, committed.
fn node_after_a_merge(config: SyncConfig) -> (Node, DocId) {
    use automerge::sync::SyncDoc;
    let mut node = node_with(SyncConfig { heartbeat_interval_ms: 0, ..config });
    let now = Instant::now();
    connect(&mut node, now);
    let mut remote = automerge::Automerge::new();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["x"], "value": 1}])).unwrap();
    cairn_shared::ops::apply_ops(&mut remote, &ops, 0).unwrap();
    let doc_id = DocId::from_slice(&[4; 16]).unwrap();
    let mut state = automerge::sync::State::new();
    for _ in 0..4 {
        let Some(message) = remote.generate_sync_message(&mut state) else { break };
        let sync_message = message.encode();
        let frame = frame(
            Message::DocSync { doc_id, collection: "c".parse().unwrap(), sync_message },
            fixed_clock(),
        );
        node.handle_input(now, Input::Received { conn: CONN, bytes: frame });
        for output in drain(&mut node) {
            match output {
                Output::Store { task, .. } => {
                    assert_eq!(node.documents_worked(), [doc_id], "the merge is named");
                    node.handle_input(now, Input::StoreDone { task, reply: StoreReply::Committed })
                }
                Output::Transmit { .. } => {
                    for reply in sent_messages(&[output]) {
                        if let Message::DocSync { sync_message, .. } = reply {
                            let decoded = automerge::sync::Message::decode(&sync_message).unwrap();
                            remote.receive_sync_message(&mut state, decoded).unwrap();
                        }
                    }
                }
                _ => {}
            }
        }
    }
    drain(&mut node);
    assert!(node.documents().any(|(id, _)| *id == doc_id), "the change was merged");
    (node, doc_id)
}

#[test]
fn a_merge_that_overran_max_merge_ms_quarantines_its_document() {
    let (mut node, doc_id) = node_after_a_merge(SyncConfig::hub());
    let now = Instant::now();
    node.handle_input(
        now,
        Input::Received { conn: CONN, bytes: frame(Message::Ping, fixed_clock()) },
    );
    assert!(node.documents_worked().is_empty(), "a ping merges nothing");
    let limit = node.merge_limit().expect("limited by default");
    node.handle_input(now, Input::WorkTook { doc_id, took: limit });
    assert_eq!(node.quarantined().count(), 0, "at the limit is within it");
    node.handle_input(now, Input::WorkTook { doc_id, took: limit + Duration::from_millis(1) });
    let reasons: Vec<(&DocId, &str)> = node.quarantined().collect();
    assert_eq!(reasons.len(), 1);
    assert_eq!(*reasons[0].0, doc_id);
    assert!(reasons[0].1.contains("max_merge_ms"), "{}", reasons[0].1);
    node.handle_input(now, Input::Request { id: 7, request: Request::Read { doc_id } });
    let outputs = drain(&mut node);
    assert!(
        outputs.iter().any(|o| matches!(
            o,
            Output::Respond { id: 7, result: Err(RequestError::Quarantined { .. }) }
        )),
        "{outputs:?}"
    );
}

#[test]
fn with_max_merge_ms_zero_no_merge_is_too_slow() {
    let (mut node, doc_id) =
        node_after_a_merge(SyncConfig { max_merge_ms: 0, ..SyncConfig::hub() });
    assert_eq!(node.merge_limit(), None);
    node.handle_input(Instant::now(), Input::WorkTook { doc_id, took: Duration::from_secs(3600) });
    assert_eq!(node.quarantined().count(), 0);
}

#[test]
fn an_uploaded_saved_document_trailed_by_a_change_without_its_history_is_refused_whole() {
    let mut node = node();
    let now = Instant::now();
    let edits = numbered_edits(5);
    let edits: Vec<&str> = edits.iter().map(String::as_str).collect();
    let doc_id = DocId::from_slice(&[5; 16]).unwrap();
    let first = stored_doc(1, &edits[..1]).snapshot.unwrap();
    let request = Request::Import { doc_id, collection: Some("c".parse().unwrap()), bytes: first };
    node.handle_input(now, Input::Request { id: 1, request });
    for output in drain(&mut node) {
        if let Output::Store { task, .. } = output {
            node.handle_input(now, Input::StoreDone { task, reply: StoreReply::Committed });
        }
    }
    drain(&mut node);
    let before = node.documents().find(|(id, _)| **id == doc_id).unwrap().1.doc.get_heads();
    // A saved copy holding more, and after it a change that builds on one it does not carry.
    let source = Document::load(&stored_doc(1, &edits), ActorId::random()).unwrap().doc;
    let mut ahead = source.fork();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["a"], "value": 1}])).unwrap();
    cairn_shared::ops::apply_ops(&mut ahead, &ops, 0).unwrap();
    let missing = ahead.get_last_local_change().unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["a"], "value": 2}])).unwrap();
    cairn_shared::ops::apply_ops(&mut ahead, &ops, 1).unwrap();
    let orphan = ahead.get_last_local_change().unwrap();
    assert!(orphan.deps().contains(&missing.hash()));
    let mut bytes = source.save();
    bytes.extend_from_slice(orphan.raw_bytes());
    let request = Request::Import { doc_id, collection: None, bytes };
    node.handle_input(now, Input::Request { id: 2, request });
    let outputs = drain(&mut node);
    assert!(
        outputs.iter().any(|o| matches!(
            o,
            Output::Respond { id: 2, result: Err(RequestError::BadBytes(_)) }
        )),
        "{outputs:?}"
    );
    assert!(!outputs.iter().any(|o| matches!(o, Output::Store { .. })), "nothing stored");
    let after = node.documents().find(|(id, _)| **id == doc_id).unwrap().1;
    assert_eq!(after.doc.get_heads(), before, "the document is as it was");
}

#[test]
fn a_load_that_ran_a_waiting_local_request_names_no_document_to_time() {
    let mut node = node();
    let now = Instant::now();
    let stored = stored_doc(1, &["v"]);
    let doc_id = stored.doc_id;
    node.restore_all(vec![(doc_id, index_entry(&stored))]);
    node.handle_input(now, Input::Request { id: 1, request: Request::Read { doc_id } });
    let outputs = drain(&mut node);
    let Some(Output::Store { task, action: StoreTask::Load { .. } }) = outputs.first() else {
        panic!("{outputs:?}")
    };
    let reply = StoreReply::Loaded(Some(stored), Vec::new());
    node.handle_input(now, Input::StoreDone { task: *task, reply });
    let outputs = drain(&mut node);
    assert!(outputs.iter().any(|o| matches!(o, Output::Respond { id: 1, result: Ok(_) })));
    assert!(node.documents_worked().is_empty(), "local work is not timed");
}
