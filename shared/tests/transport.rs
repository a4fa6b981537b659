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

const LIMITS: quic::AcceptLimits =
    quic::AcceptLimits { max_connections: 16, stream_timeout: Duration::from_secs(10) };

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
    let hub = RunningNode::start(&setup(Role::Hub, root, "hub", "ca")).unwrap();
    let timing = LinkTiming::default();
    let endpoint =
        quic::server_endpoint(&hub.identity, "127.0.0.1:0".parse().unwrap(), &timing).unwrap();
    let hub_addr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::accept_loop(endpoint, hub.handle.clone(), limits, std::future::pending()));
    (hub, hub_addr)
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
    let limits =
        quic::AcceptLimits { max_connections: 1, stream_timeout: Duration::from_millis(300) };
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
