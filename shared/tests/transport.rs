//! Real QUIC on loopback with real SQLite files: two nodes started as the binaries start them.

#![cfg(feature = "io")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_shared::config::SyncConfig;
use cairn_shared::ids::DocId;
use cairn_shared::io::quic::{self, LinkTiming};
use cairn_shared::io::runtime::{default_tls_paths, NodeSetup, RunningNode};
use cairn_shared::message::Role;
use cairn_shared::node::{Request, Response};
use cairn_shared::ops::Op;
use serde_json::json;

const LIMITS: quic::AcceptLimits = quic::AcceptLimits {
    max_connections: 16,
    stream_timeout: Duration::from_secs(10),
    admission_rate_per_s: 0,
    admission_burst: 0,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cairn-transport-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn setup(role: Role, root: &Path, name: &str, ca: &str) -> NodeSetup {
    let data_dir = root.join(name);
    NodeSetup {
        role,
        tls: default_tls_paths(&root.join(ca), &data_dir),
        dev_certificates: true,
        certificate_names: vec!["localhost".into()],
        data_dir,
        sync: SyncConfig::edge(),
    }
}

/// A hub node accepting QUIC on an ephemeral loopback port, as `cloud-hub` runs one.
fn start_hub(root: &Path, limits: quic::AcceptLimits) -> (RunningNode, std::net::SocketAddr) {
    let (hub, addr, stop) = start_named_hub(root, "hub", "127.0.0.1:0".parse().unwrap(), limits);
    // These hubs accept until the test process ends.
    std::mem::forget(stop);
    (hub, addr)
}

/// A hub named `name` accepting QUIC on `listen` until the returned sender fires.
fn start_named_hub(
    root: &Path,
    name: &str,
    listen: std::net::SocketAddr,
    limits: quic::AcceptLimits,
) -> (RunningNode, std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let hub = RunningNode::start(&setup(Role::Hub, root, name, "ca")).unwrap();
    let endpoint = quic::server_endpoint(&hub.identity, listen, &LinkTiming::default()).unwrap();
    let hub_addr = endpoint.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(quic::accept_loop(endpoint, hub.handle.clone(), limits, shutdown));
    (hub, hub_addr, stop)
}

/// Restarts hub `name` from its data directory, listening on `addr` again.
async fn restart_hub_on(
    root: &Path,
    name: &str,
    addr: std::net::SocketAddr,
    limits: quic::AcceptLimits,
) -> (RunningNode, tokio::sync::oneshot::Sender<()>) {
    let hub = RunningNode::start(&setup(Role::Hub, root, name, "ca")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The old endpoint's socket may linger for a moment after it closed.
    let endpoint = loop {
        match quic::server_endpoint(&hub.identity, addr, &LinkTiming::default()) {
            Ok(endpoint) => break endpoint,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "rebinding: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(quic::accept_loop(endpoint, hub.handle.clone(), limits, shutdown));
    (hub, stop)
}

/// Waits until `what` holds, for at most `limit`.
async fn wait_until(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connected_hub(node: &RunningNode) -> Option<cairn_shared::ids::NodeId> {
    match node.handle.request(Request::Status).await {
        Ok(Response::Status(report)) => report.hub,
        _ => None,
    }
}

async fn read(node: &RunningNode, doc_id: DocId) -> Option<(Vec<String>, serde_json::Value)> {
    match node.handle.request(Request::Read { doc_id }).await {
        Ok(Response::Document { heads, doc, .. }) => Some((heads, doc)),
        _ => None,
    }
}

async fn wait_for_heads(node: &RunningNode, doc_id: DocId, heads: &[String]) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((have, doc)) = read(node, doc_id).await {
            if have == heads {
                return doc;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "node never reached heads {heads:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_crosses_quic_to_the_hub_and_survives_a_restart_of_both() {
    let root = temp_dir("roundtrip");
    let timing = LinkTiming::default();
    let (hub, hub_addr) = start_hub(&root, LIMITS);

    let agent = RunningNode::start(&setup(Role::Agent, &root, "agent", "ca")).unwrap();
    let client = quic::client_endpoint(&agent.identity, &timing).unwrap();
    let dialer = tokio::spawn(quic::dial_loop(
        client,
        hub_addr,
        "localhost".into(),
        agent.handle.clone(),
        timing,
    ));

    let doc_id = DocId::from_slice(&[7; 16]).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["reading"], "value": 21.5}])).unwrap();
    let answer = agent
        .handle
        .request(Request::Create { doc_id, collection: "sensors".parse().unwrap(), ops })
        .await
        .unwrap();
    let Response::Written { heads, .. } = answer else { panic!("{answer:?}") };
    let on_hub = wait_for_heads(&hub, doc_id, &heads).await;
    assert_eq!(on_hub, json!({"reading": 21.5}));

    dialer.abort();
    agent.stop().await.unwrap();
    hub.stop().await.unwrap();
    for name in ["hub", "agent"] {
        let restarted = RunningNode::start(&setup(Role::Agent, &root, name, "ca")).unwrap();
        let (have, doc) = read(&restarted, doc_id).await.expect("document after restart");
        assert_eq!((have, doc), (heads.clone(), json!({"reading": 21.5})), "{name} after restart");
        restarted.stop().await.unwrap();
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_is_refused_by_tls() {
    let root = temp_dir("foreign");
    let timing = LinkTiming::default();
    let (hub, hub_addr) = start_hub(&root, LIMITS);

    let stranger = RunningNode::start(&setup(Role::Agent, &root, "stranger", "other-ca")).unwrap();
    let client = quic::client_endpoint(&stranger.identity, &timing).unwrap();
    let outcome = client.connect(hub_addr, "localhost").unwrap().await;
    assert!(
        outcome.is_err(),
        "the stranger's handshake must fail: the hub's certificate is not from its CA"
    );

    // Trusting the hub is not enough: the hub checks the client's certificate against its CA.
    let mut paths = default_tls_paths(&root.join("other-ca"), &root.join("stranger"));
    paths.ca_cert = root.join("ca").join("ca.crt");
    let impostor = cairn_shared::io::tls::Identity::load(&paths).unwrap();
    let client = quic::client_endpoint(&impostor, &timing).unwrap();
    if let Ok(connection) = client.connect(hub_addr, "localhost").unwrap().await {
        // TLS 1.3 clients finish before the server has judged their certificate.
        let reason = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await;
        assert!(
            reason.is_ok(),
            "the hub must close a connection with a foreign client certificate"
        );
    }
    assert_eq!(hub.handle.status().ready_peers, 0);
    stranger.stop().await.unwrap();
    hub.stop().await.unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_opens_its_stream_is_closed() {
    let root = temp_dir("silent");
    let timing = LinkTiming::default();
    let limits = quic::AcceptLimits {
        max_connections: 1,
        stream_timeout: Duration::from_millis(300),
        ..LIMITS
    };
    let (hub, hub_addr) = start_hub(&root, limits);

    let silent = RunningNode::start(&setup(Role::Agent, &root, "silent", "ca")).unwrap();
    let client = quic::client_endpoint(&silent.identity, &timing).unwrap();
    let connection = client.connect(hub_addr, "localhost").unwrap().await.unwrap();
    // Keep-alives would hold the link up forever; only the hub's stream deadline ends it.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await;
    assert!(closed.is_ok(), "the hub must close a connection that stays silent");
    silent.stop().await.unwrap();
    hub.stop().await.unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_its_next_hub_and_returns_to_the_preferred_one() {
    let root = temp_dir("failover");
    let (hub_a, addr_a, stop_a) =
        start_named_hub(&root, "hub-a", "127.0.0.1:0".parse().unwrap(), LIMITS);
    let (hub_b, addr_b, _stop_b) =
        start_named_hub(&root, "hub-b", "127.0.0.1:0".parse().unwrap(), LIMITS);
    let (id_a, id_b) = (hub_a.identity.node_id, hub_b.identity.node_id);
    let timing = LinkTiming {
        idle_timeout_ms: 1_000,
        keep_alive_ms: 300,
        backoff_initial_ms: 50,
        backoff_max_ms: 200,
        breaker_open_ms: 300,
        probe_preferred_ms: 200,
        ..LinkTiming::default()
    };
    let agent = RunningNode::start(&setup(Role::Agent, &root, "agent", "ca")).unwrap();
    let client = quic::client_endpoint(&agent.identity, &timing).unwrap();
    let hubs = [addr_a, addr_b]
        .map(|addr| quic::HubAddress { addr, server_name: "localhost".into() })
        .to_vec();
    let link = cairn_shared::io::profile::LinkMonitor::new();
    let dialer = tokio::spawn(quic::dial_hubs(client, hubs, agent.handle.clone(), timing, link));
    wait_until(Duration::from_secs(10), "the agent is on its preferred hub", async || {
        connected_hub(&agent).await == Some(id_a)
    })
    .await;

    // The preferred hub goes away: the agent moves to the next one and keeps syncing.
    let _ = stop_a.send(());
    hub_a.stop().await.unwrap();
    wait_until(Duration::from_secs(10), "the agent is on the second hub", async || {
        connected_hub(&agent).await == Some(id_b)
    })
    .await;
    let doc_id = DocId::from_slice(&[9; 16]).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["during"], "value": "failover"}]))
            .unwrap();
    let request = Request::Create { doc_id, collection: "notes".parse().unwrap(), ops };
    let Response::Written { heads, .. } = agent.handle.request(request).await.unwrap() else {
        panic!("write refused")
    };
    wait_for_heads(&hub_b, doc_id, &heads).await;

    // The preferred hub returns on its old address: the agent goes back to it, and the write
    // made meanwhile reaches it too.
    let (hub_a, _stop_a) = restart_hub_on(&root, "hub-a", addr_a, LIMITS).await;
    assert_eq!(hub_a.identity.node_id, id_a);
    wait_until(Duration::from_secs(10), "the agent is back on its preferred hub", async || {
        connected_hub(&agent).await == Some(id_a)
    })
    .await;
    wait_for_heads(&hub_a, doc_id, &heads).await;
    dialer.abort();
    agent.stop().await.unwrap();
    hub_a.stop().await.unwrap();
    hub_b.stop().await.unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_past_its_admission_rate_tells_agents_when_to_come_back() {
    let root = temp_dir("admission");
    let limits = quic::AcceptLimits { admission_rate_per_s: 1, admission_burst: 1, ..LIMITS };
    let (hub, hub_addr) = start_hub(&root, limits);
    let timing = LinkTiming::default();
    let agent = RunningNode::start(&setup(Role::Agent, &root, "agent", "ca")).unwrap();
    let client = quic::client_endpoint(&agent.identity, &timing).unwrap();
    let first = client.connect(hub_addr, "localhost").unwrap().await.unwrap();
    let second = client.connect(hub_addr, "localhost").unwrap().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), second.closed()).await.unwrap();
    let quinn::ConnectionError::ApplicationClosed(close) = reason else { panic!("{reason:?}") };
    assert_eq!(close.error_code, quic::CLOSE_RETRY_LATER.into());
    let text = String::from_utf8(close.reason.to_vec()).unwrap();
    let ms: u64 =
        text.strip_prefix("retry after ").unwrap().strip_suffix(" ms").unwrap().parse().unwrap();
    assert!((1..=1000).contains(&ms), "{text}");
    assert!(first.close_reason().is_none(), "the admitted connection stays up");
    agent.stop().await.unwrap();
    hub.stop().await.unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}
