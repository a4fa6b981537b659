//! `POST /v1/docs/{id}/writes` on a real agent: writes applied in line order and answered
//! once durable (and still there after a crash), a failed write stopping the stream with the
//! writes before it durable and none after it applied, bad lines refused by line number.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ReadDoc, ROOT};
use field_tests::client::{stream_body, StreamWrite};
use field_tests::{free_udp_port, Agent, TestDir};
use serde_json::{json, Value};

/// No hub listens here: the agent works offline, as the write path must.
fn no_hub() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_udp_port().unwrap()))
}

fn insert(index: usize, value: u64) -> Value {
    json!([{"op": "insert", "path": ["items"], "index": index, "value": value}])
}

fn items(agent: &Agent, id: &str) -> Value {
    agent.api.read(id).unwrap().expect("the document exists").doc["items"].clone()
}

#[test]
fn a_stream_of_writes_is_applied_in_order_answered_once_durable_and_survives_a_crash() {
    let dir = TestDir::new("write-stream-order").unwrap();
    let hub = no_hub();
    let agent = Agent::start(dir.path(), "agent", hub).unwrap();
    let id = agent.api.create("notes", &json!({"items": []})).unwrap();
    const WRITES: usize = 300;
    let ops: Vec<Value> = (0..WRITES).map(|i| insert(i, i as u64)).collect();
    let body = stream_body(ops.iter().map(StreamWrite::Ops));

    let outcome = agent.api.write_stream(&id, &body).unwrap();
    assert!(outcome.failed.is_none(), "{:?}", outcome.failed);
    assert_eq!(outcome.written, WRITES);
    let view = agent.api.read(&id).unwrap().unwrap();
    assert_eq!(view.heads, outcome.heads, "the answer names the document's heads");
    let expected: Vec<u64> = (0..WRITES as u64).collect();
    assert_eq!(view.doc["items"], json!(expected), "applied in line order");

    agent.kill();
    let agent = Agent::start(dir.path(), "agent", hub).unwrap();
    let view = agent.api.read(&id).unwrap().expect("the document survived the crash");
    assert_eq!(view.heads, outcome.heads, "every acknowledged write survived the crash");
    assert_eq!(view.doc["items"], json!(expected));
}

#[test]
fn a_failed_write_stops_the_stream_and_the_answer_says_what_was_written() {
    let dir = TestDir::new("write-stream-failure").unwrap();
    let agent = Agent::start(dir.path(), "agent", no_hub()).unwrap();
    let id = agent.api.create("notes", &json!({"items": []})).unwrap();
    // Line 4 inserts past the end of the list; line 5 would succeed on its own.
    let ops = [insert(0, 10), insert(1, 11), insert(2, 12), insert(100, 13), insert(3, 14)];
    let body = stream_body(ops.iter().map(StreamWrite::Ops));

    let outcome = agent.api.write_stream(&id, &body).unwrap();
    let (line, error) = outcome.failed.expect("line 4 fails");
    assert_eq!(line, 4);
    assert_eq!(error.status(), Some(422));
    assert_eq!(error.code(), Some("invalid_op"));
    assert_eq!(outcome.written, 3, "the writes before the failed one are durable");
    assert_eq!(items(&agent, &id), json!([10, 11, 12]), "nothing after the failure applied");
    assert_eq!(agent.api.read(&id).unwrap().unwrap().heads, outcome.heads);
}

#[test]
fn bad_lines_are_refused_by_line_number_and_raw_changes_stream_too() {
    let dir = TestDir::new("write-stream-lines").unwrap();
    let agent = Agent::start(dir.path(), "agent", no_hub()).unwrap();
    let id = agent.api.create("notes", &json!({"items": []})).unwrap();

    let mut body = stream_body([StreamWrite::Ops(&insert(0, 1))]);
    body.extend_from_slice(b"\n{\"ops\": [\n");
    let outcome = agent.api.write_stream(&id, &body).unwrap();
    let (line, error) = outcome.failed.expect("line 3 is not JSON");
    assert_eq!((line, error.code()), (3, Some("bad_json")), "blank lines count: {error}");
    assert_eq!(outcome.written, 1);

    let both = br#"{"ops": [], "automerge": "AAAA"}"#;
    let outcome = agent.api.write_stream(&id, both).unwrap();
    assert_eq!(
        outcome.failed.map(|(line, e)| (line, e.code().map(str::to_owned))),
        Some((1, Some("bad_write".to_owned())))
    );
    assert_eq!(items(&agent, &id), json!([1]));

    // Raw Automerge changes: a document made here, then changed twice, each change a line.
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put_object(ROOT, "log", ObjType::List).unwrap();
    tx.commit();
    let created = agent.api.create_from_bytes("notes", &doc.save()).unwrap();
    let mut lines = Vec::new();
    for n in 0..2_i64 {
        let before = doc.get_heads();
        let mut tx = doc.transaction();
        let log = tx.get(ROOT, "log").unwrap().unwrap().1;
        tx.insert(&log, n as usize, n).unwrap();
        tx.commit();
        lines.push(doc.save_after(&before));
    }
    let body = stream_body(lines.iter().map(|bytes| StreamWrite::Automerge(bytes)));
    let outcome = agent.api.write_stream(&created.id, &body).unwrap();
    assert!(outcome.failed.is_none(), "{:?}", outcome.failed);
    assert_eq!(outcome.written, 2);
    let mut expected: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
    expected.sort();
    let mut heads = outcome.heads.clone();
    heads.sort();
    assert_eq!(heads, expected);
    let view = agent.api.read(&created.id).unwrap().unwrap();
    assert_eq!(view.doc["log"], json!([0, 1]));
}
