//! Crashes and outages with real processes: an acknowledged write is never lost, whether the
//! hub is missing, an agent is killed right after acknowledging, or the hub is killed after
//! committing; and once everyone is back, agents and hub converge on the same documents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use field_tests::client::WriteOptions;
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Link timing that notices a dead hub in about two seconds and redials within half a second,
/// so outages cost the tests little time (the defaults allow 8 s and 10 s).
fn fast_link(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("fast-link.toml");
    std::fs::write(
        &path,
        "[link]\nkeep_alive_ms = 300\nidle_timeout_ms = 2000\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n",
    )?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

/// Creates a document; returns its id and the heads the create was acknowledged with.
fn create(
    api: &ApiClient,
    collection: &str,
    content: &Value,
) -> anyhow::Result<(String, Vec<String>)> {
    let written = api.create_with(collection, content, WriteOptions::default())?;
    Ok((written.id, written.heads))
}

fn sorted(heads: &[String]) -> Vec<String> {
    let mut heads = heads.to_vec();
    heads.sort();
    heads
}

/// A document's final state: its heads after the last acknowledged write, and its content.
#[derive(Debug, Clone)]
struct Expected {
    id: String,
    heads: Vec<String>,
    doc: Value,
}

/// Waits until every node holds every document at exactly its expected heads, then checks that
/// each node materializes the expected JSON. Names what lags if the deadline passes.
fn assert_converged(nodes: &[(&str, &ApiClient)], expected: &[Expected]) -> anyhow::Result<()> {
    let mut lagging = String::new();
    wait_for("agents and hub to converge", WAIT, || {
        for (name, api) in nodes {
            for want in expected {
                let got = api.try_read(&want.id);
                if got.as_ref().map(|d| sorted(&d.heads)) != Some(sorted(&want.heads)) {
                    lagging =
                        format!("{name} has {} as {got:?}, want heads {:?}", want.id, want.heads);
                    return None;
                }
            }
        }
        Some(())
    })
    .map_err(|e| e.context(lagging.clone()))?;
    for (name, api) in nodes {
        for want in expected {
            let got = api.read(&want.id)?.expect("document vanished");
            assert_eq!(got.doc, want.doc, "{name} materializes {} differently", want.id);
        }
    }
    Ok(())
}

#[test]
fn writes_made_before_the_hub_exists_converge_once_it_starts() -> anyhow::Result<()> {
    let dir = TestDir::new("hub-down")?;
    let link = fast_link(dir.path())?;
    let port = free_udp_port()?;
    let hub_address: SocketAddr = ([127, 0, 0, 1], port).into();
    let a = Agent::start_with(dir.path(), "agent-a", hub_address, &link)?;
    let b = Agent::start_with(dir.path(), "agent-b", hub_address, &link)?;

    // Nothing listens on the hub's port: every one of these is acknowledged by agent A alone.
    let (shared, _) = create(&a.api, "notes", &json!({"title": "draft", "tags": []}))?;
    let mut a_heads = Vec::new();
    for ops in [
        json!([{"op": "set", "path": ["views"], "value": 0, "kind": "counter"}]),
        json!([{"op": "splice", "path": ["title"], "index": 5, "text": " one"}]),
        json!([{"op": "insert", "path": ["tags"], "index": 0, "value": "red"}]),
        json!([{"op": "increment", "path": ["views"], "by": 2}]),
        json!([{"op": "set", "path": ["status"], "value": "open", "kind": "string"}]),
    ] {
        a_heads = a.api.edit(&shared, &ops)?;
    }
    let (tasks, tasks_heads) = create(&a.api, "tasks", &json!({"done": false}))?;
    assert!(b.api.read(&shared)?.is_none(), "agent B cannot have it without a hub");

    let hub = Hub::start_with(dir.path(), "hub", port, &link)?;
    wait_for("agent B to receive agent A's offline writes", WAIT, || {
        b.api.try_read(&shared).filter(|d| sorted(&d.heads) == sorted(&a_heads))
    })?;
    let shared_heads = b.api.edit(
        &shared,
        &json!([
            {"op": "splice", "path": ["title"], "index": 9, "text": " (reviewed)"},
            {"op": "increment", "path": ["views"], "by": 1},
            {"op": "insert", "path": ["tags"], "index": 1, "value": "blue"},
        ]),
    )?;
    let (from_b, from_b_heads) = create(&b.api, "notes", &json!({"author": "b"}))?;

    assert_converged(
        &[("agent A", &a.api), ("agent B", &b.api), ("hub", &hub.http)],
        &[
            Expected {
                id: shared,
                heads: shared_heads,
                doc: json!({
                    "title": "draft one (reviewed)",
                    "tags": ["red", "blue"],
                    "views": 3,
                    "status": "open",
                }),
            },
            Expected { id: tasks, heads: tasks_heads, doc: json!({"done": false}) },
            Expected { id: from_b, heads: from_b_heads, doc: json!({"author": "b"}) },
        ],
    )
}

#[test]
fn an_agent_killed_right_after_acknowledging_keeps_the_write() -> anyhow::Result<()> {
    const ROUNDS: usize = 5;
    let dir = TestDir::new("agent-crash")?;
    let link = fast_link(dir.path())?;
    let hub = Hub::start_with(dir.path(), "hub", free_udp_port()?, &link)?;
    let mut a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link)?;
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &link)?;
    let (log, _) = create(&a.api, "log", &json!({"entries": []}))?;
    a.api.edit(&log, &json!([{"op": "set", "path": ["count"], "value": 0, "kind": "counter"}]))?;

    let mut expected = Vec::new();
    for round in 0..ROUNDS {
        // A new document, then an edit of the long-lived one: the kill follows its answer at once.
        let (fresh, fresh_heads) = create(&a.api, "log", &json!({"round": round}))?;
        let log_heads = a.api.edit(
            &log,
            &json!([
                {"op": "insert", "path": ["entries"], "index": round, "value": format!("entry {round}")},
                {"op": "increment", "path": ["count"], "by": 1},
            ]),
        )?;
        a.kill();
        a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link)?;

        let entries: Vec<String> = (0..=round).map(|r| format!("entry {r}")).collect();
        let log_doc = json!({"entries": entries, "count": round + 1});
        let seen = a.api.read(&log)?.expect("the restarted agent lost the document");
        assert_eq!(sorted(&seen.heads), sorted(&log_heads), "round {round}");
        assert_eq!(seen.doc, log_doc, "round {round}");
        let seen = a.api.read(&fresh)?.expect("the restarted agent lost the new document");
        assert_eq!(sorted(&seen.heads), sorted(&fresh_heads), "round {round}");
        assert_eq!(seen.doc, json!({"round": round}), "round {round}");

        expected.retain(|e: &Expected| e.id != log);
        expected.push(Expected { id: fresh, heads: fresh_heads, doc: json!({"round": round}) });
        expected.push(Expected { id: log.clone(), heads: log_heads, doc: log_doc });
        // Agent B and the hub end up with every write, sent before the kill or after the restart.
        assert_converged(
            &[("agent A", &a.api), ("agent B", &b.api), ("hub", &hub.http)],
            &expected,
        )?;
    }
    Ok(())
}

#[test]
fn a_hub_killed_after_committing_keeps_everything_and_resyncs() -> anyhow::Result<()> {
    let dir = TestDir::new("hub-crash")?;
    let link = fast_link(dir.path())?;
    let port = free_udp_port()?;
    let hub = Hub::start_with(dir.path(), "hub", port, &link)?;
    let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link)?;
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &link)?;

    let (from_a, _) = create(&a.api, "notes", &json!({"title": "from a"}))?;
    let from_a_heads = a.api.edit(&from_a, &json!([{"op": "set", "path": ["n"], "value": 1}]))?;
    let (from_b, from_b_heads) = create(&b.api, "notes", &json!({"title": "from b", "items": []}))?;
    let committed = [
        Expected {
            id: from_a.clone(),
            heads: from_a_heads,
            doc: json!({"title": "from a", "n": 1}),
        },
        Expected {
            id: from_b.clone(),
            heads: from_b_heads,
            doc: json!({"title": "from b", "items": []}),
        },
    ];
    // The hub's read route shows committed state only: once it serves both writes, they are
    // on its disk, and it is killed at that moment.
    wait_for("the hub to commit both agents' writes", WAIT, || {
        committed
            .iter()
            .all(|c| hub.http.try_read(&c.id).is_some_and(|d| sorted(&d.heads) == sorted(&c.heads)))
            .then_some(())
    })?;
    hub.kill();

    // With the hub gone, the agents acknowledge on their own.
    let from_a_heads = a.api.edit(
        &from_a,
        &json!([{"op": "splice", "path": ["title"], "index": 6, "text": " (offline)"}]),
    )?;
    let from_b_heads = b.api.edit(
        &from_b,
        &json!([{"op": "insert", "path": ["items"], "index": 0, "value": "offline item"}]),
    )?;
    let (offline, offline_heads) =
        create(&b.api, "notes", &json!({"written": "while the hub was down"}))?;

    // What the hub showed before the crash is on its disk: checked on a restart that listens
    // elsewhere, so no agent can hand the documents back to it.
    let isolated = Hub::start_with(dir.path(), "hub", free_udp_port()?, &link)?;
    for c in &committed {
        let seen = isolated.http.read(&c.id)?.expect("the hub lost a document it had served");
        assert_eq!(sorted(&seen.heads), sorted(&c.heads));
        assert_eq!(seen.doc, c.doc);
    }
    assert!(isolated.http.read(&offline)?.is_none());
    isolated.kill();

    // Back on its address: the agents reconnect, and the offline writes flow both ways.
    let hub = Hub::start_with(dir.path(), "hub", port, &link)?;
    assert_converged(
        &[("agent A", &a.api), ("agent B", &b.api), ("hub", &hub.http)],
        &[
            Expected {
                id: from_a,
                heads: from_a_heads,
                doc: json!({"title": "from a (offline)", "n": 1}),
            },
            Expected {
                id: from_b,
                heads: from_b_heads,
                doc: json!({"title": "from b", "items": ["offline item"]}),
            },
            Expected {
                id: offline,
                heads: offline_heads,
                doc: json!({"written": "while the hub was down"}),
            },
        ],
    )
}
