//! `max_merge_ms` on a real hub: a document whose merge overruns it is quarantined there, and
//! the agent that sent it keeps syncing every other document.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT};
use field_tests::client::Error;
use field_tests::{free_udp_port, wait_for, Agent, Hub, TestDir};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(40);

/// A saved document holding `chars` varied characters typed in one change. At two million,
/// loading it takes a node well over a second (0.8 s per million here), against the 100 ms
/// limit below and about a millisecond for a one-field document. Varied, since a run of one
/// character compresses into columns that load at once.
fn large_document(chars: usize) -> Vec<u8> {
    let mut seed: u32 = 0x9e37_79b9;
    let typed: String = (0..chars)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            char::from(b'a' + (seed >> 27) as u8 % 26)
        })
        .collect();
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let text = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
    tx.splice_text(&text, 0, 0, &typed).unwrap();
    tx.commit();
    doc.save()
}

#[test]
fn a_merge_that_overruns_max_merge_ms_quarantines_that_document_only() {
    let dir = TestDir::new("slow-merge").unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[sync]\nmax_merge_ms = 100\n").unwrap();
    let extra = ["--config".into(), config.display().to_string()];
    let hub = Hub::start_with(dir.path(), "hub", free_udp_port().unwrap(), &extra).unwrap();
    let agent = Agent::start(dir.path(), "agent", hub.quic).unwrap();

    let small = agent.api.create("notes", &json!({"n": 1})).unwrap();
    wait_for("the hub has the small document", TIMEOUT, || hub.http.try_read(&small)).unwrap();

    let large = agent.api.create_from_bytes("notes", &large_document(2_000_000)).unwrap().id;
    let reason = wait_for("the hub quarantines the large document", TIMEOUT, || {
        match hub.http.read(&large) {
            Err(Error::Api { status: 503, code, message }) if code == "quarantined" => {
                Some(message)
            }
            _ => None,
        }
    })
    .unwrap();
    assert!(reason.contains("max_merge_ms"), "{reason}");

    // The agent's own upload is not a merge from a peer: it keeps the document.
    assert!(agent.api.read(&large).unwrap().is_some());
    // The hub keeps syncing the agent's other documents.
    let later = agent.api.create("notes", &json!({"n": 2})).unwrap();
    let view =
        wait_for("the hub has the later document", TIMEOUT, || hub.http.try_read(&later)).unwrap();
    assert_eq!(view.doc, json!({"n": 2}));
    assert!(hub.http.try_read(&small).is_some(), "the small document is still served");
}
