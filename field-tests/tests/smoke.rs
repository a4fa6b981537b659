//! The simplest path: a write on one agent is readable on the other through the hub.

use std::time::Duration;

use field_tests::{free_udp_port, wait_for, Agent, Hub, TestDir};
use serde_json::json;

#[test]
fn a_write_on_one_agent_reaches_the_other() -> anyhow::Result<()> {
    let dir = TestDir::new("smoke")?;
    let hub = Hub::start(dir.path(), "hub", free_udp_port()?)?;
    let a = Agent::start(dir.path(), "agent-a", hub.quic)?;
    let b = Agent::start(dir.path(), "agent-b", hub.quic)?;
    let id = a.api.create("notes", &json!({"title": "hello"}))?;
    let heads = a
        .api
        .edit(&id, &json!([{"op": "splice", "path": ["title"], "index": 5, "text": " world"}]))?;
    let seen = wait_for("agent B to have the edit", Duration::from_secs(30), || {
        b.api.try_read(&id).filter(|d| d.heads == heads)
    })?;
    assert_eq!(seen.doc, json!({"title": "hello world"}));
    assert_eq!(seen.collection, "notes");
    // Once both agents hold the hub's heads, the hub keeps its sync states with them for the
    // document as heads alone.
    wait_for("the hub's sync states to come to rest", Duration::from_secs(30), || {
        let compact = hub.http.metric("cairn_compact_sync_states").ok().flatten()?;
        (compact >= 2.0).then_some(())
    })?;
    Ok(())
}
