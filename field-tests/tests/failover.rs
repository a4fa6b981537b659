//! Agent failover with real processes: an agent knows two hubs; its preferred one is killed
//! with SIGKILL while an app writes to the agent without pause. The agent must be on the other
//! hub within the heartbeat timeout plus backoff, every acknowledged write must reach that hub
//! (none lost, none duplicated, none unexpected), and once the preferred hub is back the agent
//! returns to it and it catches up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// The agent's heartbeat timeout and largest backoff, set in [`agent_config`].
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2_000);
const BACKOFF_MAX: Duration = Duration::from_millis(1_000);
/// Slack for process scheduling on a loaded machine, on top of the configured bound.
const SLACK: Duration = Duration::from_millis(2_000);

/// Heartbeats every half second, a hub silent for two seconds is gone, backoff of at most a
/// second, and a preferred hub is tried again every half second.
fn agent_config(root: &Path) -> anyhow::Result<String> {
    let path = root.join("failover-agent.toml");
    std::fs::write(
        &path,
        "[sync]\nheartbeat_interval_ms = 500\nheartbeat_timeout_ms = 2000\n\
         [link]\nkeep_alive_ms = 300\nidle_timeout_ms = 10000\nbackoff_initial_ms = 100\n\
         backoff_max_ms = 1000\nbreaker_open_ms = 1000\nprobe_preferred_ms = 500\n",
    )?;
    Ok(path.display().to_string())
}

fn hub_id(hub: &Hub) -> anyhow::Result<String> {
    Ok(hub.http.status()?.node)
}

fn connected_hub(api: &ApiClient) -> Option<String> {
    api.status().ok()?.hub.id
}

/// The values a replica's copy of the set holds.
fn members(doc: &Value) -> Vec<String> {
    doc["seen"].as_object().map(|seen| seen.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn an_agent_whose_hub_is_killed_moves_to_the_next_and_loses_nothing() -> anyhow::Result<()> {
    let dir = TestDir::new("failover")?;
    let port_a = free_udp_port()?;
    let hub_a = Hub::start(dir.path(), "hub-a", port_a)?;
    let hub_b = Hub::start(dir.path(), "hub-b", free_udp_port()?)?;
    let (id_a, id_b) = (hub_id(&hub_a)?, hub_id(&hub_b)?);
    let hubs = format!("{},{}", hub_a.quic, hub_b.quic);
    let extra = ["--config".into(), agent_config(dir.path())?, "--hubs".into(), hubs];
    let agent = Agent::start_with(dir.path(), "agent", hub_a.quic, &extra)?;
    wait_for("the agent on its preferred hub", WAIT, || {
        (connected_hub(&agent.api) == Some(id_a.clone())).then_some(())
    })?;

    // An app writes unique values to a set the whole time, recording what was acknowledged.
    let doc = agent.api.create("failover", &json!({ "seen": {} }))?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (api, doc, stop) = (agent.api.clone(), doc.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("w{n:06}");
                let ops = json!([{ "op": "set", "path": ["seen", value], "value": true }]);
                if api.edit(&doc, &ops).is_ok() {
                    acknowledged.push(value);
                }
                n += 1;
                // Paced like a sensor, not a benchmark: the point is writes during failover.
                std::thread::sleep(Duration::from_millis(5));
            }
            acknowledged
        })
    };
    wait_for("the first writes on hub A", WAIT, || {
        let copy = hub_a.http.try_read(&doc)?;
        (members(&copy.doc).len() >= 20).then_some(())
    })?;

    let killed = Instant::now();
    hub_a.kill();
    wait_for("the agent on the second hub", WAIT, || {
        (connected_hub(&agent.api) == Some(id_b.clone())).then_some(())
    })?;
    let failover = killed.elapsed();
    println!("failover: on the second hub {} ms after SIGKILL", failover.as_millis());
    assert!(
        failover <= HEARTBEAT_TIMEOUT + BACKOFF_MAX + SLACK,
        "failover took {failover:?}, beyond the heartbeat timeout plus backoff"
    );
    // Keep writing on the second hub for a while, then stop.
    let writes_before = hub_b.http.try_read(&doc).map_or(0, |d| members(&d.doc).len());
    wait_for("writes flowing to hub B", WAIT, || {
        let copy = hub_b.http.try_read(&doc)?;
        (members(&copy.doc).len() >= writes_before + 20).then_some(())
    })?;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writer.join().expect("writer thread");
    let expected: BTreeSet<String> = acknowledged.iter().cloned().collect();
    assert_eq!(expected.len(), acknowledged.len(), "the writer never repeats a value");

    let check = |api: &ApiClient, name: &str| -> anyhow::Result<()> {
        let copy = wait_for(&format!("every acknowledged write on {name}"), WAIT, || {
            let copy = api.try_read(&doc)?;
            let held: BTreeSet<String> = members(&copy.doc).into_iter().collect();
            expected.is_subset(&held).then_some(copy)
        })?;
        let held = members(&copy.doc);
        let unique: BTreeSet<&String> = held.iter().collect();
        assert_eq!(unique.len(), held.len(), "{name} holds duplicates");
        let unexpected: Vec<&String> = held.iter().filter(|v| !expected.contains(*v)).collect();
        // A write whose answer was lost may be present; here every answer arrived.
        assert!(unexpected.is_empty(), "{name} holds unacknowledged values {unexpected:?}");
        Ok(())
    };
    check(&agent.api, "the agent")?;
    check(&hub_b.http, "hub B")?;
    println!("failover: {} acknowledged writes, 0 lost", expected.len());

    // The preferred hub returns on its address: the agent goes back and it catches up.
    let hub_a = Hub::start(dir.path(), "hub-a", port_a)?;
    wait_for("the agent back on its preferred hub", WAIT, || {
        (connected_hub(&agent.api) == Some(id_a.clone())).then_some(())
    })?;
    check(&hub_a.http, "hub A after its restart")?;
    let agent_heads = agent.api.read(&doc)?.expect("document").heads;
    let hub_heads = hub_a.http.read(&doc)?.expect("document").heads;
    assert_eq!(sorted(agent_heads), sorted(hub_heads), "identical heads on the agent and hub A");
    agent.terminate()?;
    hub_a.terminate()?;
    hub_b.terminate()?;
    Ok(())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A hub of region `a` on a backbone with the hubs listening on `connect`.
fn backbone_hub(root: &Path, name: &str, listen: u16, connect: &[u16]) -> anyhow::Result<Hub> {
    let endpoint = |port: &u16| format!("tcp/127.0.0.1:{port}");
    let connect: Vec<String> = connect.iter().map(endpoint).collect();
    let path = root.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "region = \"a\"\n[backbone]\nlisten = [\"{}\"]\nconnect = {connect:?}\n\
             fleet = \"failover-test\"\nlease_ms = 1000\n",
            endpoint(&listen)
        ),
    )?;
    Hub::start_with(root, name, free_udp_port()?, &["--config".into(), path.display().to_string()])
}

#[test]
fn an_agent_fails_over_to_a_hub_it_only_learned_from_its_own() -> anyhow::Result<()> {
    let dir = TestDir::new("failover-learned")?;
    let (port_a, port_b) = (free_tcp_port()?, free_tcp_port()?);
    let hub_a = backbone_hub(dir.path(), "hub-a", port_a, &[port_b])?;
    let hub_b = backbone_hub(dir.path(), "hub-b", port_b, &[port_a])?;
    let id_b = hub_id(&hub_b)?;
    // The agent is told of hub A only.
    let extra = ["--config".into(), agent_config(dir.path())?];
    let agent = Agent::start_with(dir.path(), "agent", hub_a.quic, &extra)?;
    wait_for("hub A to advertise hub B to the agent", WAIT, || {
        let status = agent.api.send("GET", "/v1/status", None).ok()?.body;
        let advertised = status["hub"]["advertised_hubs"].as_array()?.clone();
        advertised.iter().any(|hub| hub["node"] == Value::String(id_b.clone())).then_some(())
    })?;
    let doc = agent.api.create("failover", &json!({ "seen": { "before": true } }))?;
    wait_for("the document on hub B through the backbone", WAIT, || hub_b.http.try_read(&doc))?;

    hub_a.kill();
    wait_for("the agent on the hub it learned of", WAIT, || {
        (connected_hub(&agent.api) == Some(id_b.clone())).then_some(())
    })?;
    agent.api.edit(&doc, &json!([{ "op": "set", "path": ["seen", "after"], "value": true }]))?;
    wait_for("the write made after the failover on hub B", WAIT, || {
        let copy = hub_b.http.try_read(&doc)?;
        (members(&copy.doc) == ["after", "before"]).then_some(())
    })?;
    agent.terminate()?;
    hub_b.terminate()?;
    Ok(())
}

fn sorted(mut heads: Vec<String>) -> Vec<String> {
    heads.sort();
    heads
}
