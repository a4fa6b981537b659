//! The LAN mesh: agents of one site sync the collections marked shared-on-LAN directly with
//! each other over zenoh (TCP on 127.0.0.1 with explicit endpoints, no multicast), with no
//! hub reachable at all, or after their hub died. A shared document arrives with the same
//! heads and JSON, edits flow both ways, and a document of another collection does not cross
//! a LAN link (it still travels through the hub while there is one).

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use field_tests::{free_udp_port, wait_for, Agent, ApiClient, DocView, Hub, TestDir};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const NEIGHBOURS_CONNECTED: &str = "cairn_backbone_lan_neighbours_connected";

/// A TCP port on 127.0.0.1 that was free a moment ago (a LAN listen endpoint).
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The flags that put an agent on the `field-test` fleet's `lab` site LAN, sharing the
/// collection `site`, listening on `listen` and dialling `connect`.
fn lan_flags(listen: u16, connect: u16) -> Vec<String> {
    [
        "--lan-enabled",
        "true",
        "--lan-collections",
        "site",
        "--lan-site",
        "lab",
        "--lan-fleet",
        "field-test",
        "--lan-listen",
        &format!("tcp/127.0.0.1:{listen}"),
        "--lan-connect",
        &format!("tcp/127.0.0.1:{connect}"),
        "--lan-lease-ms",
        "1000",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Two agents on one LAN, both dialling `hub`.
fn two_agents_on_a_lan(root: &Path, hub: SocketAddr) -> anyhow::Result<(Agent, Agent)> {
    let (one_port, two_port) = (free_tcp_port()?, free_tcp_port()?);
    let one = Agent::start_with(root, "agent-1", hub, &lan_flags(one_port, two_port))?;
    let two = Agent::start_with(root, "agent-2", hub, &lan_flags(two_port, one_port))?;
    for (name, agent) in [("1", &one), ("2", &two)] {
        wait_for(&format!("agent {name} to be connected to its LAN neighbour"), WAIT, || {
            agent.api.metric(NEIGHBOURS_CONNECTED).ok().flatten().filter(|n| *n == 1.0)
        })?;
    }
    Ok((one, two))
}

fn heads_set(view: &DocView) -> BTreeSet<String> {
    view.heads.iter().cloned().collect()
}

/// Waits until both agents hold `id` with `heads` and the same JSON, and returns that JSON.
fn converged(
    one: &ApiClient,
    two: &ApiClient,
    id: &str,
    heads: &[String],
) -> anyhow::Result<Value> {
    let expected: BTreeSet<String> = heads.iter().cloned().collect();
    wait_for("both agents to hold the same heads and JSON", WAIT, || {
        let (a, b) = (one.try_read(id)?, two.try_read(id)?);
        let same = heads_set(&a) == expected && heads_set(&b) == expected && a.doc == b.doc;
        same.then_some(a.doc)
    })
}

/// Edits `id` on `writer`, then waits until `reader` holds exactly the writer's heads.
fn edit_reaches(
    writer: &ApiClient,
    reader: &ApiClient,
    id: &str,
    ops: &Value,
) -> anyhow::Result<Value> {
    let heads = writer.edit(id, ops)?;
    converged(writer, reader, id, &heads)
}

#[test]
fn two_agents_with_no_reachable_hub_share_a_lan_collection_and_nothing_else() -> anyhow::Result<()>
{
    let dir = TestDir::new("lan-mesh")?;
    let root = dir.path();
    // Nothing listens there: the agents' uplink is down from the start.
    let unreachable_hub: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let (one, two) = two_agents_on_a_lan(root, unreachable_hub)?;

    // A private document exists before the shared one, and another is written as it syncs.
    let private_before = one.api.create("private", &json!({"only": "agent 1"}))?;
    let shared = one.api.create("site", &json!({"title": "shift notes", "count": 1}))?;
    let private_after = one.api.create("private", &json!({"also": "agent 1"}))?;
    let heads = one.api.read(&shared)?.map(|view| view.heads).unwrap_or_default();
    let doc = converged(&one.api, &two.api, &shared, &heads)?;
    assert_eq!(doc, json!({"title": "shift notes", "count": 1}));

    // Edits flow both ways over the LAN.
    let set = |key: &str, value: Value| json!([{"op": "set", "path": [key], "value": value}]);
    edit_reaches(&two.api, &one.api, &shared, &set("count", json!(2)))?;
    let doc = edit_reaches(&one.api, &two.api, &shared, &set("from_one", json!(true)))?;
    assert_eq!(doc, json!({"title": "shift notes", "count": 2, "from_one": true}));
    let written_on_two = two.api.create("site", &json!({"written": "on agent 2"}))?;
    let heads = two.api.read(&written_on_two)?.map(|view| view.heads).unwrap_or_default();
    converged(&two.api, &one.api, &written_on_two, &heads)?;

    // The private documents were written before shared changes that have since crossed both
    // ways, yet they are not on agent 2: the LAN link carries only `site`.
    for id in [&private_before, &private_after] {
        assert!(one.api.read(id)?.is_some());
        assert_eq!(two.api.read(id)?, None, "private document {id} crossed the LAN");
    }
    // Agent 1 lists agent 2 as an agent peer, and still has no hub.
    let status = one.api.send("GET", "/v1/status", None)?.body;
    let two_id = two.api.status()?.node;
    let peers = status["replication"]["peers"].as_array().cloned().unwrap_or_default();
    let roles: Vec<(&str, &str)> =
        peers.iter().filter_map(|p| Some((p["peer"].as_str()?, p["role"].as_str()?))).collect();
    assert_eq!(roles, [(two_id.as_str(), "agent")], "{status}");
    assert_eq!(status["hub"]["connected"], json!(false), "{status}");
    Ok(())
}

#[test]
fn agents_keep_collaborating_over_the_lan_after_their_hub_dies() -> anyhow::Result<()> {
    let dir = TestDir::new("lan-mesh-uplink")?;
    let root = dir.path();
    let hub = Hub::start(root, "hub", free_udp_port()?)?;
    let (one, two) = two_agents_on_a_lan(root, hub.quic)?;

    // While the hub is up, every collection reaches the other agent (through the hub).
    let shared = one.api.create("site", &json!({"phase": "uplink up"}))?;
    let private = one.api.create("private", &json!({"phase": "uplink up"}))?;
    for id in [&shared, &private] {
        wait_for("agent 2 to have agent 1's document", WAIT, || two.api.try_read(id))?;
    }

    // The uplink dies: shared edits still cross, over the LAN, in both directions.
    hub.kill();
    let set_phase = |phase: &str| json!([{"op": "set", "path": ["phase"], "value": phase}]);
    let private_heads = one.api.edit(&private, &set_phase("uplink down"))?;
    let doc = edit_reaches(&one.api, &two.api, &shared, &set_phase("uplink down"))?;
    assert_eq!(doc, json!({"phase": "uplink down"}));
    let doc = edit_reaches(&two.api, &one.api, &shared, &set_phase("answered on the LAN"))?;
    assert_eq!(doc, json!({"phase": "answered on the LAN"}));

    // The private edit was made before shared edits that crossed both ways: it stays behind.
    let on_two = two.api.read(&private)?.map(|view| view.heads);
    assert!(on_two.is_some_and(|heads| heads != private_heads), "the private edit crossed the LAN");
    Ok(())
}
