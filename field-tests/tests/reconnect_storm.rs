//! A reconnect storm: hundreds of agents (real agent nodes hosted in this process, each with
//! its own store, certificate and UDP socket) are synced with a real `cloud-hub` process,
//! which is then killed with SIGKILL and restarted. Every agent dials back at once; the hub's
//! admission control lets them in at a bounded rate and tells the others when to return.
//! Throughout, the hub's `/readyz` must answer and an agent already admitted must keep
//! syncing; in the end every agent is synced again.
//!
//! `CAIRN_STORM_AGENTS` sets the number of agents (default 500).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_shared::config::SyncConfig;
use cairn_shared::ids::DocId;
use cairn_shared::io::profile::LinkMonitor;
use cairn_shared::io::quic::{self, HubAddress, LinkTiming};
use cairn_shared::io::runtime::{default_tls_paths, NodeSetup, RunningNode};
use cairn_shared::message::Role;
use cairn_shared::node::{Request, Response};
use cairn_shared::ops::Op;
use cairn_shared::scope::CollectionScope;
use field_tests::{free_udp_port, Hub, TestDir};
use serde_json::json;

const DEFAULT_AGENTS: usize = 500;
/// The hub admits this many agents per second, after a first burst.
const ADMISSION_RATE: u32 = 100;
const ADMISSION_BURST: u32 = 50;
const SYNC_DEADLINE: Duration = Duration::from_secs(180);

fn agent_count() -> usize {
    std::env::var("CAIRN_STORM_AGENTS").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_AGENTS)
}

/// Agent `i`'s own collection: agents replicate only their own and the shared one, so the
/// hub does not make every agent hold every other agent's documents.
fn own_collection(i: usize) -> String {
    format!("storm-{i:05}")
}

fn agent_setup(root: &Path, i: usize) -> NodeSetup {
    let data_dir = root.join(format!("agents/a{i:05}"));
    let collections = CollectionScope::only(
        [own_collection(i), "storm-shared".into()].map(|c| c.parse().unwrap()),
    );
    NodeSetup {
        role: Role::Agent,
        tls: default_tls_paths(&root.join("ca"), &data_dir),
        dev_certificates: true,
        certificate_names: vec!["localhost".into()],
        data_dir,
        sync: SyncConfig { collections, ..SyncConfig::edge() },
    }
}

/// Writes one value to agent `i`'s own document (created on first use).
async fn write(node: &RunningNode, i: usize, value: u64) -> DocId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    bytes[15] = 0x5e;
    let doc_id = DocId::from_slice(&bytes).unwrap();
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["value"], "value": value}])).unwrap();
    let request = match node.handle.request(Request::Exists { doc_id }).await {
        Ok(_) => Request::Edit { doc_id, ops },
        Err(_) => Request::Create { doc_id, collection: own_collection(i).parse().unwrap(), ops },
    };
    match node.handle.request(request).await {
        Ok(Response::Written { .. }) => doc_id,
        other => panic!("agent {i}: write answered {other:?}"),
    }
}

/// Whether an agent is connected and its hub has confirmed everything it wrote.
async fn synced(node: &RunningNode) -> bool {
    match node.handle.request(Request::Status).await {
        Ok(Response::Status(report)) => report.hub_connected && report.documents_pending_hub == 0,
        _ => false,
    }
}

async fn count_synced(agents: &[RunningNode]) -> usize {
    let mut count = 0;
    for agent in agents {
        if synced(agent).await {
            count += 1;
        }
    }
    count
}

async fn wait_all_synced(agents: &[RunningNode], what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let count = count_synced(agents).await;
        if count == agents.len() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SYNC_DEADLINE,
            "{what}: only {count} of {} agents synced after {SYNC_DEADLINE:?}",
            agents.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hub_config(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("storm-hub.toml");
    std::fs::write(
        &path,
        format!(
            "admission_rate_per_s = {ADMISSION_RATE}\nadmission_burst = {ADMISSION_BURST}\n\
             max_connections = 10000\n"
        ),
    )?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

#[test]
fn a_restarted_hub_admits_a_reconnect_storm_at_a_bounded_rate_and_stays_responsive(
) -> anyhow::Result<()> {
    let count = agent_count();
    let dir = TestDir::new("reconnect-storm")?;
    let root = dir.path().to_owned();
    let port = free_udp_port()?;
    let hub = Hub::start_with(&root, "hub", port, &hub_config(&root)?)?;
    let hub_addr = hub.quic;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let timing = LinkTiming {
        backoff_initial_ms: 100,
        backoff_max_ms: 2_000,
        breaker_open_ms: 500,
        ..LinkTiming::default()
    };

    // Start every agent with a document written, then let them all dial.
    let started = Instant::now();
    let agents: Vec<RunningNode> = runtime.block_on(async {
        let mut agents = Vec::with_capacity(count);
        for i in 0..count {
            let node = RunningNode::start(&agent_setup(&root, i)).expect("agent start");
            write(&node, i, 0).await;
            agents.push(node);
        }
        agents
    });
    eprintln!("storm: {count} agents started in {:.1} s", started.elapsed().as_secs_f64());
    let _entered = runtime.enter(); // Endpoints bind their sockets on this runtime.
    let _dialers: Vec<_> = agents
        .iter()
        .map(|agent| {
            let endpoint = quic::client_endpoint(&agent.identity, &timing).expect("endpoint");
            let hubs = vec![HubAddress { addr: hub_addr, server_name: "localhost".into() }];
            runtime.spawn(quic::dial_hubs(
                endpoint,
                hubs,
                agent.handle.clone(),
                timing,
                LinkMonitor::new(),
            ))
        })
        .collect();
    let first_sync = runtime.block_on(wait_all_synced(&agents, "first connection"));
    eprintln!("storm: all {count} agents synced in {:.1} s", first_sync.as_secs_f64());

    // The hub dies without a word and comes back on the same address.
    hub.kill();
    let hub = Hub::start_with(&root, "hub", port, &hub_config(&root)?)?;
    let storm_started = Instant::now();

    // Meanwhile: the hub's readiness probe, polled the whole time.
    let probing = Arc::new(AtomicBool::new(true));
    let (probes, failed_probes, slowest_ms) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let prober = {
        let (http, probing) = (hub.http.clone(), probing.clone());
        let (probes, failed, slowest) = (probes.clone(), failed_probes.clone(), slowest_ms.clone());
        std::thread::spawn(move || {
            while probing.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let ok = http.send("GET", "/readyz", None).is_ok_and(|r| r.status == 200);
                probes.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                slowest.fetch_max(asked.elapsed().as_millis() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Every agent writes again while reconnecting; the first to get back in must keep syncing
    // while the rest wait their turn.
    let (admitted_while_storming, resync) = runtime.block_on(async {
        for (i, agent) in agents.iter().enumerate() {
            write(agent, i, 1).await;
        }
        let canary = loop {
            let mut found = None;
            for (i, agent) in agents.iter().enumerate() {
                if synced(agent).await {
                    found = Some(i);
                    break;
                }
            }
            if let Some(i) = found {
                break i;
            }
            assert!(storm_started.elapsed() < SYNC_DEADLINE, "no agent got back in");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // An admitted agent writes again and its hub confirms it, storm or not.
        write(&agents[canary], canary, 2).await;
        while !synced(&agents[canary]).await {
            assert!(storm_started.elapsed() < SYNC_DEADLINE, "the admitted agent stopped syncing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let synced_then = count_synced(&agents).await;
        wait_all_synced(&agents, "after the restart").await;
        (synced_then, storm_started.elapsed())
    });
    probing.store(false, Ordering::Relaxed);
    prober.join().expect("prober");
    let refusals = hub.http.metric("cairn_admission_refusals_total")?.unwrap_or(0.0);
    let (probes, failed_probes, slowest_ms) = (
        probes.load(Ordering::Relaxed),
        failed_probes.load(Ordering::Relaxed),
        slowest_ms.load(Ordering::Relaxed),
    );
    println!(
        "reconnect storm: {count} agents back and synced {:.1} s after the restart; \
         {refusals} admissions refused with a retry time; the admitted agent's write was \
         confirmed while {admitted_while_storming} of {count} agents were back; /readyz: \
         {probes} probes, {failed_probes} failed, slowest {slowest_ms} ms",
        resync.as_secs_f64()
    );
    assert_eq!(failed_probes, 0, "the hub's readiness probe failed during the storm");
    assert!(probes > 0);
    if count as u32 > ADMISSION_BURST * 2 {
        assert!(refusals > 0.0, "with {count} agents at once, admission must turn some away");
        assert!(
            admitted_while_storming < count,
            "the admitted agent's write was confirmed only once everyone was back"
        );
    }
    runtime.block_on(async {
        for agent in agents {
            let _ = agent.stop().await;
        }
    });
    hub.terminate()?;
    Ok(())
}
