//! Broken and hostile peers against a real hub: each is refused and disconnected, counted as a
//! protocol error, and neither the hub's health nor the agents' sync suffers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::io::tls::Identity;
use cairn_shared::message::{Message, Role, PROTOCOL_VERSION};
use cairn_shared::scope::CollectionScope;
use field_tests::raw_peer::{fleet_identity, foreign_identity, Ending, RawPeer};
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const PROTOCOL_ERRORS: &str = "cairn_protocol_errors_total";

/// What a hostile peer does once connected.
type Attack = fn(&mut RawPeer) -> anyhow::Result<()>;

fn garbage_frame(peer: &mut RawPeer) -> anyhow::Result<()> {
    // The right version byte, so the garbage reaches the message decoder.
    let mut payload = vec![PROTOCOL_VERSION];
    let mut state = 0x2545_f491_u32;
    payload.extend((0..40).map(|_| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 24) as u8 | 0x80
    }));
    peer.send_payload(&payload)
}

fn empty_frame(peer: &mut RawPeer) -> anyhow::Result<()> {
    peer.send_bytes(&[0, 0, 0, 0])
}

fn huge_length_prefix(peer: &mut RawPeer) -> anyhow::Result<()> {
    peer.send_bytes(&u32::MAX.to_be_bytes())
}

fn unknown_version(peer: &mut RawPeer) -> anyhow::Result<()> {
    let hello = Message::Hello {
        node_id: peer.node_id.expect("certificate"),
        role: Role::Agent,
        scope: CollectionScope::all(),
    };
    let mut payload = peer.envelope(hello)?.encode();
    payload[0] = 9;
    peer.send_payload(&payload)
}

fn hello_with_a_foreign_id(peer: &mut RawPeer) -> anyhow::Result<()> {
    peer.send_message(Message::Hello {
        node_id: NodeId::from_bytes([0x42; 16]),
        role: Role::Agent,
        scope: CollectionScope::all(),
    })
}

fn inventory_before_hello(peer: &mut RawPeer) -> anyhow::Result<()> {
    peer.send_message(Message::Inventory { entries: vec![] })
}

fn undecodable_sync_message(peer: &mut RawPeer) -> anyhow::Result<()> {
    peer.send_message(Message::Hello {
        node_id: peer.node_id.expect("certificate"),
        role: Role::Agent,
        scope: CollectionScope::all(),
    })?;
    peer.send_message(Message::DocSync {
        doc_id: DocId::from_slice(&[7; 16])?,
        collection: "notes".parse()?,
        sync_message: vec![0x42, 0xff, 0x00, 0x13, 0x37],
    })
}

fn first_byte_only(peer: &mut RawPeer) -> anyhow::Result<()> {
    // One byte makes the stream exist for the hub; the hello never follows.
    peer.send_bytes(&[0])
}

fn metric(api: &ApiClient, name: &str) -> anyhow::Result<f64> {
    api.metric(name)?.ok_or_else(|| anyhow::anyhow!("{} serves no {name}", api.base()))
}

fn healthy(hub: &Hub) -> bool {
    hub.http.send("GET", "/healthz", None).is_ok_and(|r| r.status == 200)
}

fn describe(ending: &Ending) -> String {
    let kinds: Vec<String> = ending.received.iter().map(|e| format!("{:?}", e.message)).collect();
    format!("received {kinds:?}, closed: {}", ending.closed)
}

#[test]
fn hostile_peers_are_refused_and_agents_keep_syncing() -> anyhow::Result<()> {
    let dir = TestDir::new("hostile-peers")?;
    // A short hello timeout, so the peer that never says hello is cut off quickly.
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[sync]\nhello_timeout_ms = 1000\n")?;
    let hub_args = ["--config".to_owned(), config.display().to_string()];
    let hub = Hub::start_with(dir.path(), "hub", free_udp_port()?, &hub_args)?;
    let a = Agent::start(dir.path(), "agent-a", hub.quic)?;
    let b = Agent::start(dir.path(), "agent-b", hub.quic)?;
    let id = a.api.create("notes", &json!({"title": "before"}))?;
    let heads = a.api.edit(&id, &json!([{"op": "set", "path": ["n"], "value": 1}]))?;
    wait_for("agent B to have the first write", WAIT, || {
        b.api.try_read(&id).filter(|d| d.heads == heads)
    })?;

    let rogue = fleet_identity(dir.path(), "rogue")?;
    let rogue_id = Identity::load(&rogue)?.node_id;
    let attacks: [(&str, Attack, String); 8] = [
        ("garbage in a frame", garbage_frame, "malformed message".into()),
        ("empty frame", empty_frame, "empty frame".into()),
        (
            "length prefix 0xFFFFFFFF",
            huge_length_prefix,
            "frame of 4294967295 bytes exceeds the limit".into(),
        ),
        (
            "unknown protocol version",
            unknown_version,
            "unsupported protocol version 9; this node speaks version 1".into(),
        ),
        (
            "hello naming another node",
            hello_with_a_foreign_id,
            format!(
                "hello names node {}, certificate proves {rogue_id}",
                NodeId::from_bytes([0x42; 16])
            ),
        ),
        ("inventory before hello", inventory_before_hello, "expected hello first".into()),
        ("undecodable sync message", undecodable_sync_message, "bad sync message".into()),
        ("silence after the first byte", first_byte_only, "no hello in time".into()),
    ];
    for (name, attack, expected_reason) in attacks {
        let errors_before = metric(&hub.http, PROTOCOL_ERRORS)?;
        let mut peer = RawPeer::connect(&rogue, hub.quic)?;
        attack(&mut peer)?;
        let ending = peer.read_until_closed(WAIT)?;
        let context = format!("{name}: {}", describe(&ending));

        // The hub spoke the protocol first (its hello), then refused with a reason.
        assert!(
            matches!(
                ending.received.first().map(|e| &e.message),
                Some(Message::Hello { role: Role::Hub, .. })
            ),
            "{context}"
        );
        let (reason, version) = ending.refusal().unwrap_or_else(|| panic!("{context}"));
        assert!(reason.contains(&expected_reason), "{context}");
        assert_eq!(version, PROTOCOL_VERSION, "{context}");
        let (code, close_reason) =
            ending.application_close().unwrap_or_else(|| panic!("{context}"));
        assert_eq!(code, 1, "{context}");
        assert!(close_reason.contains(&expected_reason), "{context}");

        let errors = wait_for(&format!("{PROTOCOL_ERRORS} to count the {name}"), WAIT, || {
            metric(&hub.http, PROTOCOL_ERRORS).ok().filter(|n| *n > errors_before)
        })?;
        assert_eq!(errors, errors_before + 1.0, "{name}");
        assert!(healthy(&hub), "hub unhealthy after the {name}");
    }

    // Certificates the fleet CA did not sign never get as far as the protocol.
    let foreign = foreign_identity(dir.path(), "foreign")?;
    let errors_before = metric(&hub.http, PROTOCOL_ERRORS)?;
    for (name, peer) in [
        ("certificate from another CA", RawPeer::connect(&foreign, hub.quic)),
        (
            "no client certificate",
            RawPeer::connect_without_certificate(&dir.path().join("ca").join("ca.crt"), hub.quic),
        ),
    ] {
        // The client may see its handshake complete before the hub checks its certificate,
        // so the refusal arrives either as a failed connect or as the connection's end.
        let refusal = match peer {
            Ok(mut peer) => {
                let _ = peer.send_bytes(&[0, 0, 0, 1]);
                let ending = peer.read_until_closed(WAIT)?;
                assert!(ending.received.is_empty(), "{name}: {}", describe(&ending));
                ending.closed.to_string()
            }
            Err(error) => format!("{error:#}"),
        };
        assert!(refusal.contains("cryptographic handshake failed"), "{name}: {refusal}");
        assert!(healthy(&hub), "hub unhealthy after the {name}");
    }
    // TLS refusals are not protocol errors: no peer ever spoke the protocol.
    assert_eq!(metric(&hub.http, PROTOCOL_ERRORS)?, errors_before);

    // Only the two agents remain, and they still sync both ways.
    wait_for("the hub to hold just the two agents", WAIT, || {
        (metric(&hub.http, "cairn_ready_peers").ok() == Some(2.0)).then_some(())
    })?;
    let heads = a.api.edit(
        &id,
        &json!([{"op": "splice", "path": ["title"], "index": 6, "text": " and after"}]),
    )?;
    let seen = wait_for("agent B to have the write made after the attacks", WAIT, || {
        b.api.try_read(&id).filter(|d| d.heads == heads)
    })?;
    assert_eq!(seen.doc, json!({"title": "before and after", "n": 1}));
    let heads = b.api.edit(&id, &json!([{"op": "set", "path": ["n"], "value": 2}]))?;
    wait_for("agent A to have agent B's write", WAIT, || {
        a.api.try_read(&id).filter(|d| d.heads == heads)
    })?;
    Ok(())
}
