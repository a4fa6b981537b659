//! One node driven by hand: handshake rules, refusals, durability ordering and the clock
//! drift policy, checked output by output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use automerge::ActorId;
use cairn_shared::config::SyncConfig;
use cairn_shared::frame::{encode_frame, FrameDecoder};
use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::message::{Envelope, Message, Role, PROTOCOL_VERSION};
use cairn_shared::node::{Input, Node, Output, Request, Response};
use cairn_shared::ops::Op;
use cairn_shared::store_task::{StoreReply, StoreTask};
use serde_json::json;

const PEER: NodeId = NodeId::from_bytes([2; 16]);
const CONN: u64 = 7;

fn fixed_clock() -> uhlc::NTP64 {
    uhlc::NTP64(1 << 40)
}

fn node() -> Node {
    let hlc = uhlc::HLCBuilder::new()
        .with_id(uhlc::ID::try_from([1u8; 16]).unwrap())
        .with_clock(fixed_clock)
        .with_max_delta(Duration::from_millis(500))
        .build();
    Node::new(
        NodeId::from_bytes([1; 16]),
        Role::Hub,
        ActorId::from(vec![1u8; 16]),
        hlc,
        SyncConfig::hub(),
    )
}

fn drain(node: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

fn frame(message: Message, time: uhlc::NTP64) -> Vec<u8> {
    let sender = uhlc::ID::try_from([2u8; 16]).unwrap();
    let envelope = Envelope { sent_at: uhlc::Timestamp::new(time, sender), message };
    encode_frame(&envelope.encode(), SyncConfig::MIN_FRAME_BYTES).unwrap()
}

fn sent_messages(outputs: &[Output]) -> Vec<Message> {
    let mut decoder = FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES);
    let mut messages = Vec::new();
    for output in outputs {
        if let Output::Transmit { bytes, .. } = output {
            decoder.push(bytes);
            while let Some(payload) = decoder.next_frame().unwrap() {
                messages.push(Envelope::decode(&payload).unwrap().message);
            }
        }
    }
    messages
}

fn connect(node: &mut Node, now: Instant) -> Vec<Output> {
    node.handle_input(now, Input::Connected { conn: CONN, peer: PEER });
    node.handle_input(
        now,
        Input::Received {
            conn: CONN,
            bytes: frame(Message::Hello { node_id: PEER, role: Role::Agent }, fixed_clock()),
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
fn both_sides_say_hello_then_exchange_inventories() {
    let mut node = node();
    with_document(&mut node, Instant::now());
    let outputs = connect(&mut node, Instant::now());
    let messages = sent_messages(&outputs);
    assert!(matches!(messages[0], Message::Hello { role: Role::Hub, .. }));
    assert!(matches!(messages[1], Message::Inventory { .. }));
    assert_eq!(node.ready_peers(), 1);
    assert_eq!(closed(&outputs), None);
}

#[test]
fn a_hello_that_contradicts_the_certificate_is_refused() {
    let mut node = node();
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER });
    let liar = Message::Hello { node_id: NodeId::from_bytes([9; 16]), role: Role::Agent };
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
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER });
    let early = frame(Message::Inventory { entries: vec![] }, fixed_clock());
    node.handle_input(Instant::now(), Input::Received { conn: CONN, bytes: early });
    assert!(closed(&drain(&mut node)).unwrap().contains("expected hello"));
}

#[test]
fn an_unknown_protocol_version_gets_a_refusal_naming_ours() {
    let mut node = node();
    node.handle_input(Instant::now(), Input::Connected { conn: CONN, peer: PEER });
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
fn anti_entropy_re_sends_the_inventory_when_due() {
    let mut node = node();
    let now = Instant::now();
    with_document(&mut node, now);
    connect(&mut node, now);
    let due = node.poll_timeout().unwrap();
    node.handle_timeout(due - Duration::from_millis(1));
    assert!(drain(&mut node).is_empty(), "nothing before the deadline");
    node.handle_timeout(due);
    let messages = sent_messages(&drain(&mut node));
    assert!(matches!(messages.as_slice(), [Message::Inventory { .. }]));
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
    node.handle_input(now, Input::Connected { conn: CONN, peer: PEER });
    drain(&mut node);
    let deadline = now + Duration::from_millis(SyncConfig::hub().hello_timeout_ms);
    assert_eq!(node.poll_timeout(), Some(deadline));
    node.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(closed(&drain(&mut node)), None);
    node.handle_timeout(deadline);
    assert_eq!(closed(&drain(&mut node)), Some("no hello in time"));
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
