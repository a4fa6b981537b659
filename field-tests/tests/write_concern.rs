//! Write concerns: a `"durability": "hub"` write is answered only once the hub's store has it,
//! so it survives the writer crashing right after the answer, and the hub crashing too. Past
//! its deadline the answer is `202` with a status URL that turns `hub: true` once the hub has
//! the write. Levels the nodes cannot provide are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use field_tests::client::{Durability, WriteOptions, Written};
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(30);
const ROUNDS: usize = 5;

/// Link timing that notices a dead hub within about two seconds and redials within half a
/// second (the defaults allow 8 s and 10 s).
fn fast_link(dir: &TestDir) -> Vec<String> {
    let path = dir.path().join("fast-link.toml");
    let toml = "[link]\nkeep_alive_ms = 300\nidle_timeout_ms = 2000\n\
                backoff_initial_ms = 50\nbackoff_max_ms = 500\n";
    std::fs::write(&path, toml).unwrap();
    vec!["--config".into(), path.display().to_string()]
}

/// Waits as long as it takes the hub to confirm, within the test's deadline.
fn hub_durable() -> WriteOptions {
    WriteOptions::hub(DEADLINE)
}

/// Round `round`'s write: a new document, or an edit of `doc` (some of them large, so the hub
/// spends a while between receiving and committing them).
fn write_round(api: &ApiClient, round: usize, doc: &str) -> Written {
    let written = if round % 2 == 0 {
        api.create_with("orders", &json!({"round": round}), hub_durable()).unwrap()
    } else {
        let text = format!("{round}").repeat(256 * 1024);
        let ops = json!([{"op": "splice", "path": ["log"], "index": 0, "text": text}]);
        api.edit_with(doc, &ops, hub_durable()).unwrap()
    };
    assert!(written.reached, "round {round}: the hub did not confirm in time: {written:?}");
    let levels = written.durability.clone().unwrap();
    assert!(levels.local && levels.hub == Some(true), "round {round}: {levels:?}");
    assert!(written.status_url.is_none());
    written
}

#[test]
fn a_hub_durable_write_is_on_the_hub_when_the_writer_dies_right_after() {
    let dir = TestDir::new("concern-kill").unwrap();
    let link = fast_link(&dir);
    let hub = Hub::start(dir.path(), "hub", free_udp_port().unwrap()).unwrap();
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &link).unwrap();
    let mut doc = String::new();
    for round in 0..ROUNDS {
        let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link).unwrap();
        if doc.is_empty() {
            doc = a.api.create("orders", &json!({"log": ""})).unwrap();
        }
        let written = write_round(&a.api, round, &doc);
        a.kill();
        // Hubs answer reads from committed state only, so no waiting here.
        let on_hub = hub.http.read(&written.id).unwrap();
        let on_hub = on_hub.unwrap_or_else(|| panic!("round {round}: the hub lacks {written:?}"));
        assert_eq!(on_hub.heads, written.heads, "round {round}: the hub lacks the write");
        wait_for("agent B to receive the write from the hub", DEADLINE, || {
            b.api.try_read(&written.id).filter(|d| d.heads == written.heads)
        })
        .unwrap();
    }
}

#[test]
fn a_hub_durable_write_survives_the_writer_and_the_hub_crashing() {
    let dir = TestDir::new("concern-both").unwrap();
    let link = fast_link(&dir);
    let mut hub = Hub::start(dir.path(), "hub", free_udp_port().unwrap()).unwrap();
    let mut doc = String::new();
    for round in 0..ROUNDS {
        let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link).unwrap();
        if doc.is_empty() {
            doc = a.api.create("orders", &json!({"log": ""})).unwrap();
        }
        let written = write_round(&a.api, round, &doc);
        a.kill();
        hub.kill();
        // The hub comes back on a port no agent knows: it can only have what it had stored.
        hub = Hub::start(dir.path(), "hub", free_udp_port().unwrap()).unwrap();
        let stored = hub.http.read(&written.id).unwrap().map(|d| d.heads);
        assert_eq!(stored, Some(written.heads), "round {round}: the hub lost a confirmed write");
    }
}

fn get_json(api: &ApiClient, path: &str) -> Value {
    let response = api.send("GET", path, None).unwrap();
    assert_eq!(response.status, 200, "GET {path}: {}", response.body);
    response.body
}

/// The 202 answer of a hub write the hub did not confirm within `timeout`.
fn check_unconfirmed(api: &ApiClient, written: &Written) -> String {
    assert!(!written.reached, "{written:?}");
    let levels = written.durability.clone().unwrap();
    assert!(levels.local && levels.hub == Some(false), "{written:?}");
    // The write happened anyway.
    assert_eq!(api.read(&written.id).unwrap().unwrap().heads, written.heads);
    let url = written.status_url.clone().expect("a 202 says where to poll");
    assert_eq!(get_json(api, &url), json!({"local": true, "hub": false, "regions": []}));
    let levels = api.durability(&written.id, &written.heads).unwrap();
    assert_eq!((levels.local, levels.hub), (true, Some(false)));
    url
}

fn wait_until_confirmed(api: &ApiClient, status_url: &str) {
    wait_for("the status to turn hub: true", DEADLINE, || {
        let status = get_json(api, status_url);
        (status["local"] == json!(true) && status["hub"] == json!(true)).then_some(())
    })
    .unwrap();
}

#[test]
fn without_a_hub_a_hub_write_answers_202_and_its_status_turns_true_later() {
    let dir = TestDir::new("concern-202").unwrap();
    let link = fast_link(&dir);
    let port = free_udp_port().unwrap();
    let hub = Hub::start(dir.path(), "hub", port).unwrap();
    let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link).unwrap();
    // With the hub up, a hub write is confirmed well before its deadline.
    let doc = a.api.create_with("orders", &json!({"n": 0}), hub_durable()).unwrap();
    assert!(doc.reached);
    hub.kill();

    let timeout = Duration::from_millis(300);
    let options = WriteOptions::hub(timeout);
    let started = Instant::now();
    let created = a.api.create_with("orders", &json!({"n": 1}), options).unwrap();
    let edited = a
        .api
        .edit_with(&doc.id, &json!([{"op": "set", "path": ["n"], "value": 2}]), options)
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= timeout * 2, "answered before the deadline: {waited:?}");
    assert!(waited < Duration::from_secs(10), "the deadline was not kept: {waited:?}");
    let created_url = check_unconfirmed(&a.api, &created);
    check_unconfirmed(&a.api, &edited);
    // The raw answer: 202, with the status URL in the body.
    let response = a
        .api
        .send("POST", "/v1/collections/orders/docs?durability=hub&timeout_ms=300", Some(b"{}"))
        .unwrap();
    assert_eq!(response.status, 202, "{}", response.body);
    let raw_url = response.body["status_url"].as_str().unwrap().to_owned();
    assert!(raw_url.starts_with("/v1/docs/"), "{raw_url}");

    let hub = Hub::start(dir.path(), "hub", port).unwrap();
    wait_until_confirmed(&a.api, &created_url);
    wait_until_confirmed(&a.api, &raw_url);
    assert_eq!(hub.http.read(&created.id).unwrap().unwrap().heads, created.heads);
}

#[test]
fn an_edit_made_during_a_hub_outage_is_confirmed_after_the_hub_returns() {
    let dir = TestDir::new("concern-edit").unwrap();
    let link = fast_link(&dir);
    let port = free_udp_port().unwrap();
    let hub = Hub::start(dir.path(), "hub", port).unwrap();
    let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link).unwrap();
    let doc = a.api.create_with("orders", &json!({"n": 0}), hub_durable()).unwrap();
    assert!(doc.reached);
    hub.kill();
    let ops = json!([{"op": "set", "path": ["n"], "value": 2}]);
    let edited = a.api.edit_with(&doc.id, &ops, WriteOptions::hub(Duration::from_millis(300)));
    let status_url = check_unconfirmed(&a.api, &edited.unwrap());
    let hub = Hub::start(dir.path(), "hub", port).unwrap();
    wait_for("the hub to have the edit", DEADLINE, || {
        hub.http.try_read(&doc.id).filter(|d| d.doc == json!({"n": 2}))
    })
    .unwrap();
    wait_until_confirmed(&a.api, &status_url);
    wait_for("no document pending for the hub", DEADLINE, || {
        a.api.status().ok().filter(|s| s.hub.documents_pending == 0)
    })
    .unwrap();
}

#[test]
fn a_regions_write_without_a_hub_answers_202_and_a_level_out_of_range_is_refused() {
    let dir = TestDir::new("concern-regions").unwrap();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_udp_port().unwrap()));
    let a = Agent::start(dir.path(), "agent-a", nowhere).unwrap();
    let id = a.api.create("orders", &json!({"n": 0})).unwrap();
    // No hub, so no region: the write happens and is answered 202 at the deadline.
    let regions = WriteOptions::regions(2, Duration::from_millis(300));
    let ops = json!([{"op": "set", "path": ["n"], "value": 1}]);
    let written = a.api.edit_with(&id, &ops, regions).unwrap();
    assert!(!written.reached && written.status_url.is_some(), "{written:?}");
    let levels = written.durability.clone().unwrap();
    assert!(levels.local && levels.regions.is_empty(), "{written:?}");
    assert_eq!(a.api.read(&id).unwrap().unwrap().heads, written.heads);

    let before = (a.api.status().unwrap(), a.api.read(&id).unwrap());
    let too_many = WriteOptions { durability: Durability::Regions(256), timeout: None };
    let error = a.api.create_with("orders", &json!({"n": 2}), too_many).unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(400), Some("bad_durability")), "{error}");
    let error = a.api.edit_with(&id, &ops, too_many).unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(400), Some("bad_durability")), "{error}");
    let after = (a.api.status().unwrap(), a.api.read(&id).unwrap());
    assert_eq!(
        (after.0.documents, after.0.feed_cursor, after.1),
        (before.0.documents, before.0.feed_cursor, before.1),
        "a refused write was applied"
    );
    assert_eq!(a.api.list("orders", None, 10).unwrap().docs.len(), 1);
}
