//! Hubs replicating over the zenoh backbone: two regions, region `a` with two hubs and region
//! `b` with one, joined over TCP on 127.0.0.1 with explicit endpoints (no multicast). A write
//! on an agent of one hub reaches agents of the other hubs; every replica ends with the same
//! heads and JSON; a hub killed with SIGKILL converges again after its restart; a hub refuses
//! a collection its region does not hold and names where it lives; a write that asks for two
//! regions is answered once hubs of both have committed it.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use field_tests::client::WriteOptions;
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, DocView, Hub, TestDir};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A TCP port on 127.0.0.1 that was free a moment ago (a backbone listen endpoint).
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn endpoint(port: u16) -> String {
    format!("tcp/127.0.0.1:{port}")
}

/// Writes a hub's configuration: its region, its backbone endpoints, a fast anti-entropy
/// period, a short backbone lease, and a policy that keeps `b-only` in region `b`.
fn hub_config(root: &Path, name: &str, region: &str, listen: u16, connect: &[u16]) -> PathBuf {
    let connect: Vec<String> = connect.iter().map(|p| endpoint(*p)).collect();
    let text = format!(
        "region = \"{region}\"\n\
         [sync]\nanti_entropy_interval_ms = 2000\n\
         [backbone]\nlisten = [\"{}\"]\nconnect = {connect:?}\nfleet = \"field-test\"\n\
         lease_ms = 1000\n\
         [replication]\n[[replication.rules]]\ncollections = \"b-only/**\"\nregions = [\"b\"]\n",
        endpoint(listen)
    );
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("writing a hub configuration");
    path
}

fn start_hub(root: &Path, name: &str, quic_port: u16, config: &Path) -> anyhow::Result<Hub> {
    Hub::start_with(root, name, quic_port, &["--config".into(), config.display().to_string()])
}

/// The other hubs a hub reports as connected on the backbone.
fn connected_hubs(hub: &ApiClient) -> Option<usize> {
    let topology = hub.send("GET", "/v1/topology", None).ok()?.body;
    let hubs = topology.get("hubs")?.as_array()?;
    Some(hubs.iter().filter(|h| h.get("connected") == Some(&Value::Bool(true))).count())
}

fn heads_set(view: &DocView) -> BTreeSet<String> {
    view.heads.iter().cloned().collect()
}

/// Waits until every replica holds `id` with the same heads (equal to `expected`, if given)
/// and the same JSON, and returns that JSON.
fn converged(
    replicas: &[(&str, &ApiClient)],
    id: &str,
    expected: Option<&[String]>,
) -> anyhow::Result<Value> {
    wait_for("every replica to hold the same heads and JSON", WAIT, || {
        let views: Vec<DocView> =
            replicas.iter().map(|(_, api)| api.try_read(id)).collect::<Option<_>>()?;
        let first = &views[0];
        let same = views.iter().all(|v| heads_set(v) == heads_set(first) && v.doc == first.doc);
        let as_expected =
            expected.is_none_or(|heads| heads_set(first) == heads.iter().cloned().collect());
        (same && as_expected).then(|| first.doc.clone())
    })
}

#[test]
fn hubs_in_two_regions_converge_over_the_backbone_and_after_a_crash() -> anyhow::Result<()> {
    let dir = TestDir::new("backbone")?;
    let root = dir.path();
    let (a1_zenoh, a2_zenoh, b1_zenoh) = (free_tcp_port()?, free_tcp_port()?, free_tcp_port()?);
    let (a1_quic, a2_quic, b1_quic) = (free_udp_port()?, free_udp_port()?, free_udp_port()?);
    let a1_config = hub_config(root, "hub-a1", "a", a1_zenoh, &[a2_zenoh, b1_zenoh]);
    let a2_config = hub_config(root, "hub-a2", "a", a2_zenoh, &[a1_zenoh, b1_zenoh]);
    let b1_config = hub_config(root, "hub-b1", "b", b1_zenoh, &[a1_zenoh, a2_zenoh]);
    let a1 = start_hub(root, "hub-a1", a1_quic, &a1_config)?;
    let a2 = start_hub(root, "hub-a2", a2_quic, &a2_config)?;
    let b1 = start_hub(root, "hub-b1", b1_quic, &b1_config)?;
    let agent_a1 = Agent::start(root, "agent-a1", a1.quic)?;
    let agent_a2 = Agent::start(root, "agent-a2", a2.quic)?;
    let agent_b1 = Agent::start(root, "agent-b1", b1.quic)?;
    for (name, hub) in [("a1", &a1.http), ("a2", &a2.http), ("b1", &b1.http)] {
        wait_for(&format!("hub {name} to see both other hubs"), WAIT, || {
            connected_hubs(hub).filter(|n| *n == 2)
        })?;
    }

    // Each hub lists the others with their region and the address their agents dial.
    let topology = a1.http.send("GET", "/v1/topology", None)?.body;
    assert_eq!(topology["region"], "a");
    assert_eq!(topology["backbone"]["hubs_connected"], 2, "{topology}");
    let listed: BTreeSet<(String, String)> = topology["hubs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| (h["region"].to_string(), h["agent_address"].to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> = [("a", a2.quic), ("b", b1.quic)]
        .iter()
        .map(|(region, quic)| (json!(region).to_string(), json!(quic.to_string()).to_string()))
        .collect();
    assert_eq!(listed, expected);

    // A write on an agent of hub a1 reaches agents of hubs a2 and b1.
    let id = agent_a1.api.create("notes", &json!({"title": "from a1", "count": 1}))?;
    let heads = agent_a1.api.edit(&id, &json!([{"op": "set", "path": ["count"], "value": 2}]))?;
    for (name, agent) in [("a2", &agent_a2), ("b1", &agent_b1)] {
        wait_for(&format!("the agent of hub {name} to have the write"), WAIT, || {
            agent.api.try_read(&id).filter(|d| d.heads == heads)
        })?;
    }
    // A write in region b reaches every replica, agents and hubs alike.
    let b_heads =
        agent_b1.api.edit(&id, &json!([{"op": "set", "path": ["from_b"], "value": true}]))?;
    let replicas = [
        ("agent a1", &agent_a1.api),
        ("agent a2", &agent_a2.api),
        ("agent b1", &agent_b1.api),
        ("hub a1", &a1.http),
        ("hub a2", &a2.http),
        ("hub b1", &b1.http),
    ];
    let doc = converged(&replicas, &id, Some(&b_heads))?;
    assert_eq!(doc, json!({"title": "from a1", "count": 2, "from_b": true}));

    // A write that asks for two regions is answered once hubs of both have committed it; one
    // that asks for three, of which only two exist, is answered 202 naming the two.
    let two = WriteOptions::regions(2, WAIT);
    let set = |value: i64| json!([{"op": "set", "path": ["regional"], "value": value}]);
    let written = agent_a1.api.edit_with(&id, &set(1), two)?;
    assert!(written.reached, "{written:?}");
    assert_eq!(written.durability.map(|d| d.regions), Some(vec!["a".into(), "b".into()]));
    let three = WriteOptions::regions(3, Duration::from_millis(1500));
    let written = agent_a1.api.edit_with(&id, &set(2), three)?;
    assert!(!written.reached && written.status_url.is_some(), "{written:?}");
    let regions = wait_for("the status to name both regions", WAIT, || {
        let levels = agent_a1.api.durability(&id, &written.heads).ok()?;
        (levels.regions.len() == 2).then_some(levels.regions)
    })?;
    assert_eq!(regions, vec!["a".to_owned(), "b".to_owned()]);

    // A hub killed with SIGKILL misses writes, then converges again after its restart.
    a2.kill();
    let more = agent_a1.api.create("notes", &json!({"written": "while a2 was down"}))?;
    agent_a1.api.edit(&id, &json!([{"op": "set", "path": ["count"], "value": 3}]))?;
    agent_b1.api.edit(&id, &json!([{"op": "set", "path": ["after_crash"], "value": "b"}]))?;
    // The crashed hub's own agent keeps accepting writes offline.
    agent_a2.api.edit(&id, &json!([{"op": "set", "path": ["offline_a2"], "value": true}]))?;
    // The restarted hub listens on a new backbone port and dials the other two.
    let a2_again_config = hub_config(root, "hub-a2", "a", free_tcp_port()?, &[a1_zenoh, b1_zenoh]);
    let a2 = start_hub(root, "hub-a2", a2_quic, &a2_again_config)?;
    let replicas = [
        ("agent a1", &agent_a1.api),
        ("agent a2", &agent_a2.api),
        ("agent b1", &agent_b1.api),
        ("hub a1", &a1.http),
        ("hub a2", &a2.http),
        ("hub b1", &b1.http),
    ];
    let doc = converged(&replicas, &id, None)?;
    let expected = json!({
        "title": "from a1", "count": 3, "from_b": true, "after_crash": "b", "offline_a2": true,
        "regional": 2
    });
    assert_eq!(doc, expected);
    let written = converged(&replicas, &more, None)?;
    assert_eq!(written, json!({"written": "while a2 was down"}));

    // A collection region a does not hold is refused by its hubs, naming region b.
    let refused = a1.http.send("GET", "/v1/collections/b-only%2Fthings/docs", None)?;
    assert_eq!(refused.status, 421, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "collection_not_held_here");
    assert_eq!(refused.body["error"]["held_in"], json!(["b"]));
    let served = b1.http.send("GET", "/v1/collections/b-only%2Fthings/docs", None)?;
    assert_eq!(served.status, 200, "{}", served.body);
    Ok(())
}

/// Sends a signal to a process (`STOP` freezes it, `CONT` thaws it).
fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// The incarnations of the other hubs a hub lists.
fn listed_incarnations(hub: &ApiClient) -> Option<Vec<String>> {
    let topology = hub.send("GET", "/v1/topology", None).ok()?.body;
    let hubs = topology.get("hubs")?.as_array()?;
    hubs.iter().map(|h| h.get("incarnation")?.as_str().map(str::to_owned)).collect()
}

#[test]
fn a_frozen_hub_leaves_the_backbone_and_converges_when_it_thaws() -> anyhow::Result<()> {
    let dir = TestDir::new("backbone-freeze")?;
    let root = dir.path();
    let (x_zenoh, y_zenoh) = (free_tcp_port()?, free_tcp_port()?);
    let x = start_hub(
        root,
        "hub-x",
        free_udp_port()?,
        &hub_config(root, "hub-x", "a", x_zenoh, &[y_zenoh]),
    )?;
    let y = start_hub(
        root,
        "hub-y",
        free_udp_port()?,
        &hub_config(root, "hub-y", "b", y_zenoh, &[x_zenoh]),
    )?;
    let agent_x = Agent::start(root, "agent-x", x.quic)?;
    let agent_y = Agent::start(root, "agent-y", y.quic)?;
    for (name, hub) in [("x", &x.http), ("y", &y.http)] {
        wait_for(&format!("hub {name} to see the other"), WAIT, || {
            connected_hubs(hub).filter(|n| *n == 1)
        })?;
    }
    let incarnation_y = listed_incarnations(&x.http).unwrap_or_default();
    let id = agent_x.api.create("notes", &json!({"phase": "before"}))?;
    wait_for("agent y to have the document", WAIT, || agent_y.api.try_read(&id))?;

    // Frozen past the lease, hub y leaves hub x's view; writes go on at x.
    signal(y.pid(), "STOP")?;
    let left = wait_for("hub x to see hub y leave", WAIT, || {
        listed_incarnations(&x.http).filter(|hubs| hubs.is_empty())
    });
    // A write asking for both regions is answered 202 with region a alone.
    let both = WriteOptions::regions(2, Duration::from_millis(1500));
    let apart = json!([{"op": "set", "path": ["phase"], "value": "apart"}]);
    let written = agent_x.api.edit_with(&id, &apart, both);
    signal(y.pid(), "CONT")?;
    left?;
    let written = written?;
    assert!(!written.reached, "{written:?}");
    let regions = written.durability.as_ref().map(|d| d.regions.clone());
    assert_eq!(regions, Some(vec!["a".to_owned()]), "{written:?}");
    let heads = written.heads.clone();

    // Thawed, the same run of hub y comes back and every replica converges.
    wait_for("hub x to see the same run of hub y again", WAIT, || {
        listed_incarnations(&x.http).filter(|hubs| *hubs == incarnation_y)
    })?;
    let replicas = [
        ("agent x", &agent_x.api),
        ("agent y", &agent_y.api),
        ("hub x", &x.http),
        ("hub y", &y.http),
    ];
    let doc = converged(&replicas, &id, Some(&heads))?;
    assert_eq!(doc, json!({"phase": "apart"}));
    // Thawed, region b commits the write too, and its status says so.
    wait_for("the write's status to name both regions", WAIT, || {
        let levels = agent_x.api.durability(&id, &heads).ok()?;
        (levels.regions == ["a", "b"]).then_some(())
    })?;
    Ok(())
}
