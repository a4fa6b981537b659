//! Hub fan-in benchmark: N edge agents dial one real `cloud-hub` process at the same moment.
//! How long until every agent is synced, next to how long N bare QUIC handshakes with mutual
//! TLS take against the same hub, and what each idle connection costs the hub in RSS.
//!
//! The agents are N real agent nodes hosted in this process (`RunningNode`: SQLite store
//! thread, node loop, connection pump), each with its own data directory, certificate signed
//! by the shared development CA, and UDP socket. Before the clock starts, a seed agent puts a
//! shared document on the hub and leaves, and every agent writes a document of its own.
//!
//! Agents replicate every document, so the hub offers each agent's document to all the
//! others: N² copies, tens of KiB of memory each, which one process cannot hold for 1,000
//! agents. By default the agents' connection pump therefore drops incoming sync messages for
//! other agents' documents, so each agent keeps only its own document and the shared one;
//! the hub still sends every agent its first sync message for every document, as to a real
//! fleet, and then waits for answers that do not come.
//! `--full-replication` runs the agents' own dial loop unchanged (a few hundred agents).
//!
//! Synced: the hub's listing holds every agent's document, and every agent's own durability
//! check says the hub committed it (the node answers the moment a hub advertises the heads).
//! Converged: every agent holds the shared document (with `--full-replication`, every
//! document).
//!
//! Baseline: after the agents stop, one new endpoint per agent identity completes only the
//! QUIC handshake with the hub, all at once, retrying with the agents' backoff on failure.
//!
//! Build the hub first: `cargo build --release -p cloud-hub`, then
//! `cargo run --release -p field-tests --bin fanin-bench -- [--agents N] [--quick]
//! [--full-replication] [--timeout S]`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_shared::config::SyncConfig;
use cairn_shared::durability::Durability;
use cairn_shared::frame::{encode_frame, FrameDecoder};
use cairn_shared::ids::DocId;
use cairn_shared::io::driver::{NodeHandle, WriterMessage, CONNECTION_QUEUE_CAPACITY};
use cairn_shared::io::quic::{client_endpoint, dial_loop, LinkTiming};
use cairn_shared::io::runtime::{default_tls_paths, NodeSetup, RunningNode};
use cairn_shared::io::tls::{peer_node_id, Identity, TlsPaths};
use cairn_shared::message::{Envelope, Message, Role};
use cairn_shared::node::{Request, Response};
use cairn_shared::ops::Op;
use field_tests::bench::{machine, proc_status_kib, thousands};
use field_tests::{free_udp_port, wait_for, ApiClient, Hub, TestDir};
use serde_json::json;
use tokio::sync::{mpsc, watch};

const DEFAULT_AGENTS: usize = 1_000;
const QUICK_AGENTS: usize = 100;
/// How long the agents may take to sync and converge before the run gives up.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The hub's `max_connections` when not configured; more agents need a config file.
const HUB_DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Open files one agent takes: its database, WAL and shared memory for the store and the
/// reader, and a UDP socket, with room to spare.
const FILES_PER_AGENT: u64 = 8;
/// Memory one replica of a small document takes in an agent, measured with full replication
/// (about 17 GiB for 1,000 agents holding about 900 documents each); for the memory check.
const KIB_PER_REPLICA: u64 = 20;
/// The name the hub's development certificate carries.
const HUB_SERVER_NAME: &str = "localhost";
/// Agents' documents go here, so the hub's listing of it is exactly theirs.
const AGENT_COLLECTION: &str = "fanin";
const SHARED_COLLECTION: &str = "fanin-shared";
/// How often the hub is polled; bounds how late the hub-side milestones are seen.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the hub may take to notice that connections are gone, between phases.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads starting agents at once: starting one is mostly waiting for fsyncs.
const STARTER_THREADS: usize = 16;
/// How long an agent watcher waits for a commit before it checks again anyway.
const RECHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Largest read from the stream at once, as the agent's own pump reads.
const READ_CHUNK_BYTES: usize = 64 * 1024;

const USAGE: &str = "\
usage: fanin-bench [--agents N] [--quick] [--full-replication] [--timeout SECONDS]

  --agents N          agents connecting at once (default 1000)
  --quick             100 agents
  --full-replication  agents take every document the hub offers, as real agents do
                      (N² document copies in this process: a few hundred agents at most)
  --timeout S         how long syncing and converging may take (default 300)";

#[derive(Debug)]
struct Args {
    agents: usize,
    full_replication: bool,
    timeout: Duration,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut parsed =
        Args { agents: DEFAULT_AGENTS, full_replication: false, timeout: DEFAULT_TIMEOUT };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--agents" => {
                parsed.agents = value("--agents")?.parse().context("--agents")?;
                anyhow::ensure!(parsed.agents > 0, "--agents must be positive");
            }
            "--quick" => parsed.agents = QUICK_AGENTS,
            "--full-replication" => parsed.full_replication = true,
            "--timeout" => {
                let secs: u64 = value("--timeout")?.parse().context("--timeout")?;
                anyhow::ensure!(secs > 0, "--timeout must be positive");
                parsed.timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Ok(None),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(parsed))
}

/// A number from `/proc/self/limits` or `/proc/meminfo`: the first figure after `prefix`.
fn proc_figure(file: &str, prefix: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok())
}

/// Fails early, with the fix, when N agents would run out of file descriptors or memory.
fn check_resources(agents: usize, full_replication: bool) -> anyhow::Result<()> {
    let files = agents as u64 * FILES_PER_AGENT + 256;
    if let Some(soft) = proc_figure("/proc/self/limits", "Max open files").filter(|&s| s < files) {
        anyhow::bail!(
            "{agents} agents need about {files} open files and the limit is {soft}: \
             raise it (ulimit -n {files}) or pass fewer --agents"
        );
    }
    let n = agents as u64;
    let replicas = if full_replication { n * (n + 1) } else { 2 * n };
    let needed_kib = replicas * KIB_PER_REPLICA;
    if let Some(available) = proc_figure("/proc/meminfo", "MemAvailable:") {
        anyhow::ensure!(
            needed_kib < available / 2,
            "{agents} agents would hold {} document replicas, about {} MiB, and {} MiB are \
             available: pass fewer --agents{}",
            thousands(replicas),
            thousands(needed_kib / 1024),
            thousands(available / 1024),
            if full_replication { " or drop --full-replication" } else { "" }
        );
    }
    Ok(())
}

/// A well-mixed 64-bit value from `x` (splitmix64), for document ids and backoff jitter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn doc_id(i: u64) -> anyhow::Result<DocId> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&mix(2 * i).to_be_bytes());
    bytes[8..].copy_from_slice(&mix(2 * i + 1).to_be_bytes());
    Ok(DocId::from_slice(&bytes)?)
}

/// Full jitter, as the agents' dial loop uses, from a hash rather than an RNG.
fn jittered(backoff: Duration, seed: u64, attempt: u64) -> Duration {
    let fraction = (mix(seed ^ (attempt << 32)) % 1024) as u32;
    backoff * fraction / 1024
}

fn agent_setup(root: &Path, name: &str) -> NodeSetup {
    let data_dir = root.join(name);
    NodeSetup {
        role: Role::Agent,
        tls: default_tls_paths(&root.join("ca"), &data_dir),
        dev_certificates: true,
        certificate_names: vec![HUB_SERVER_NAME.into()],
        data_dir,
        sync: SyncConfig::edge(),
    }
}

/// One agent node in this process, with its document written and not yet dialing.
#[derive(Debug)]
struct HostedAgent {
    node: RunningNode,
    tls: TlsPaths,
    doc_id: DocId,
    /// Heads of its document after the write, as hex.
    heads: Vec<String>,
}

/// Starts an agent node and writes its one document (committed before this returns).
async fn start_agent(
    root: &Path,
    name: &str,
    doc_id: DocId,
    collection: &str,
) -> anyhow::Result<HostedAgent> {
    let setup = agent_setup(root, name);
    let node = RunningNode::start(&setup).with_context(|| format!("starting agent {name}"))?;
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["agent"], "value": name}]))?;
    let request = Request::Create { doc_id, collection: collection.parse()?, ops };
    let heads = match node.handle.request(request).await? {
        Response::Written { heads, .. } => heads,
        other => anyhow::bail!("agent {name}: create answered {other:?}"),
    };
    Ok(HostedAgent { node, tls: setup.tls, doc_id, heads })
}

fn start_agents(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    count: usize,
) -> anyhow::Result<Vec<HostedAgent>> {
    let started = Instant::now();
    let step = count.div_ceil(10).max(1);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let start_some = || -> anyhow::Result<Vec<(usize, HostedAgent)>> {
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return Ok(mine);
            }
            let name = format!("agents/a{i:05}");
            let agent = start_agent(root, &name, doc_id(i as u64)?, AGENT_COLLECTION);
            mine.push((i, runtime.block_on(agent)?));
            let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
            if finished % step == 0 {
                eprintln!(
                    "  {:>3}% {finished} agents started, each with its document committed \
                     ({:.1} s)",
                    finished * 100 / count,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    };
    let batches: Vec<Vec<(usize, HostedAgent)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..STARTER_THREADS).map(|_| scope.spawn(start_some)).collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("an agent starter panicked"))?)
            .collect::<anyhow::Result<_>>()
    })?;
    let mut agents: Vec<(usize, HostedAgent)> = batches.into_iter().flatten().collect();
    agents.sort_by_key(|(i, _)| *i);
    Ok(agents.into_iter().map(|(_, a)| a).collect())
}

/// The agent's dial loop (`quic::dial_loop`) around [`pump_kept`]: dial, pump until the link
/// dies, back off with full jitter, repeat.
async fn selective_dial_loop(
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    node: NodeHandle,
    keep: [DocId; 2],
    seed: u64,
) {
    let timing = LinkTiming::default();
    let initial = Duration::from_millis(timing.backoff_initial_ms);
    let max = Duration::from_millis(timing.backoff_max_ms);
    let mut backoff = initial;
    for attempt in 0u64.. {
        if !node.is_running() {
            return;
        }
        let started = tokio::time::Instant::now();
        if let Ok(connecting) = endpoint.connect(hub, HUB_SERVER_NAME) {
            if let Ok(connection) = connecting.await {
                let _ = pump_kept(&node, connection, &keep).await;
            }
        }
        if started.elapsed() > max {
            backoff = initial;
        }
        tokio::time::sleep(jittered(backoff, seed, attempt)).await;
        backoff = (backoff * 2).min(max);
    }
}

/// The agent's connection pump (`quic::run_connection`, dialing side), except that incoming
/// sync messages for documents outside `keep` are dropped before the node sees them.
async fn pump_kept(
    node: &NodeHandle,
    connection: quinn::Connection,
    keep: &[DocId; 2],
) -> anyhow::Result<()> {
    let peer = peer_node_id(&connection)?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let (writer_tx, mut writer_rx) = mpsc::channel(CONNECTION_QUEUE_CAPACITY);
    let conn = node.attach(peer, writer_tx).await?;
    let writer = tokio::spawn({
        let connection = connection.clone();
        async move {
            while let Some(WriterMessage::Frame(bytes)) = writer_rx.recv().await {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
            connection.close(1u32.into(), b"closed");
        }
    });
    let max_frame_bytes = SyncConfig::edge().max_frame_bytes;
    let mut decoder = FrameDecoder::new(max_frame_bytes);
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    'read: while let Ok(Some(n)) = recv.read(&mut buffer).await {
        decoder.push(&buffer[..n]);
        let mut kept = Vec::new();
        loop {
            let Ok(next) = decoder.next_frame() else { break 'read };
            let Some(payload) = next else { break };
            let Some(payload) = kept_payload(payload, keep, max_frame_bytes) else { continue };
            // The kept messages were decoded under the same limit, so they encode again.
            let Ok(frame) = encode_frame(&payload, max_frame_bytes) else { break 'read };
            kept.extend(frame);
        }
        if !kept.is_empty() && node.received(conn, kept).await.is_err() {
            break;
        }
    }
    let _ = node.disconnected(conn).await;
    writer.abort();
    Ok(())
}

/// A frame's payload without the sync messages for documents outside `keep`: a single one
/// is dropped whole, a batch (compressed or not) loses those parts and is dropped if none is
/// left. Anything else passes as it came.
fn kept_payload(payload: Vec<u8>, keep: &[DocId; 2], max_frame_bytes: usize) -> Option<Vec<u8>> {
    let Ok(Envelope { sent_at, message }) = Envelope::decode(&payload) else {
        return Some(payload);
    };
    let message = match message {
        Message::Compressed { deflated } => match Message::decompress(&deflated, max_frame_bytes) {
            Ok(inflated) => inflated,
            Err(_) => return Some(payload),
        },
        message => message,
    };
    match message {
        Message::DocSync { doc_id, .. } if !keep.contains(&doc_id) => None,
        Message::DocSyncBatch { mut parts } => {
            parts.retain(|part| keep.contains(&part.doc_id));
            let message = match parts.len() {
                0 => return None,
                _ => Message::DocSyncBatch { parts },
            };
            Some(Envelope { sent_at, message }.encode())
        }
        _ => Some(payload),
    }
}

/// Stops agents' dialing and connections, then their nodes and store threads.
async fn stop_agents(
    agents: Vec<HostedAgent>,
    links: Vec<(quinn::Endpoint, tokio::task::JoinHandle<()>)>,
) -> anyhow::Result<()> {
    for (endpoint, dialer) in &links {
        dialer.abort();
        endpoint.close(0u32.into(), b"benchmark done");
    }
    for (endpoint, _) in &links {
        // Let the close reach the hub, so it frees the connection now, not at idle timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    for agent in agents {
        agent.node.stop().await.context("stopping an agent")?;
    }
    Ok(())
}

/// Puts the shared document on the hub through a seed agent, which then disconnects.
fn seed_shared_doc(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    hub: &Hub,
) -> anyhow::Result<DocId> {
    let shared = doc_id(u64::MAX / 2)?;
    runtime.block_on(async {
        let seed = start_agent(root, "seed", shared, SHARED_COLLECTION).await?;
        let endpoint = client_endpoint(&seed.node.identity, &LinkTiming::default())?;
        let dialer = tokio::spawn(dial_loop(
            endpoint.clone(),
            hub.quic,
            HUB_SERVER_NAME.into(),
            seed.node.handle.clone(),
            LinkTiming::default(),
        ));
        let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
        let (heads, level) = (seed.heads.clone(), Durability::Hub);
        let request = Request::AwaitDurable { doc_id: shared, heads, level, deadline };
        let reached =
            matches!(seed.node.handle.request(request).await?, Response::Durability(r) if r.hub);
        anyhow::ensure!(reached, "the hub did not take the shared document in {SETTLE_TIMEOUT:?}");
        stop_agents(vec![seed], vec![(endpoint, dialer)]).await
    })?;
    wait_for("the seed agent to leave the hub", SETTLE_TIMEOUT, || {
        hub.http.status().ok().filter(|s| s.connected_peers == 0)
    })?;
    Ok(shared)
}

/// When one agent reached each milestone, measured from the start of dialing.
#[derive(Debug, Default, Clone, Copy)]
struct AgentTimes {
    /// The hub committed this agent's document.
    hub_has_own: Option<Duration>,
    /// This agent holds the shared document (every document, with full replication).
    converged: Option<Duration>,
}

/// Counters the agent watchers bump, for progress lines and milestones.
#[derive(Debug, Default)]
struct Progress {
    hub_has_own: AtomicUsize,
    converged: AtomicUsize,
}

/// What a watcher needs of an agent.
#[derive(Debug)]
struct WatchTarget {
    handle: NodeHandle,
    feed_head: watch::Receiver<u64>,
    doc_id: DocId,
    heads: Vec<String>,
}

/// What an agent must hold to have converged.
#[derive(Debug, Clone, Copy)]
enum Convergence {
    /// The shared document.
    Shared(DocId),
    /// This many documents.
    Documents(usize),
}

/// Re-checks at every commit of the agent whether it holds what it should, until `deadline`.
async fn watch_convergence(
    target: &mut WatchTarget,
    convergence: Convergence,
    started: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Option<Duration> {
    loop {
        let holds = match convergence {
            Convergence::Shared(doc_id) => {
                target.handle.request(Request::Exists { doc_id }).await.is_ok()
            }
            Convergence::Documents(total) => matches!(
                target.handle.request(Request::Status).await,
                Ok(Response::Status(status)) if status.documents >= total
            ),
        };
        if holds {
            return Some(started.elapsed());
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        // The feed moves when a commit is durable, which can be a moment before the node has
        // taken the store's answer: the last commit is re-checked after a short wait.
        let recheck = (tokio::time::Instant::now() + RECHECK_INTERVAL).min(deadline);
        if let Ok(Err(_)) = tokio::time::timeout_at(recheck, target.feed_head.changed()).await {
            return None;
        }
    }
}

/// Watches one agent until it converged or `deadline` passed. The hub check is the agent's
/// own durability request, which the node answers the moment a hub advertises the heads.
async fn watch_agent(
    mut target: WatchTarget,
    convergence: Convergence,
    started: tokio::time::Instant,
    deadline: tokio::time::Instant,
    progress: Arc<Progress>,
) -> AgentTimes {
    let request = Request::AwaitDurable {
        doc_id: target.doc_id,
        heads: target.heads.clone(),
        level: Durability::Hub,
        deadline: deadline.into_std(),
    };
    let handle = target.handle.clone();
    let hub_check = async {
        match handle.request(request).await {
            Ok(Response::Durability(report)) if report.hub => {
                progress.hub_has_own.fetch_add(1, Ordering::Relaxed);
                Some(started.elapsed())
            }
            _ => None,
        }
    };
    let converge_check = async {
        let at = watch_convergence(&mut target, convergence, started, deadline).await;
        if at.is_some() {
            progress.converged.fetch_add(1, Ordering::Relaxed);
        }
        at
    };
    let (hub_has_own, converged) = tokio::join!(hub_check, converge_check);
    AgentTimes { hub_has_own, converged }
}

/// Whether the hub's listing (its committed heads index) holds every one of `expected`.
fn hub_holds_all(hub: &ApiClient, expected: &BTreeSet<String>) -> anyhow::Result<bool> {
    // One more document than agents: the shared one. The count is cheap; the listing is not.
    if (hub.status()?.documents as usize) <= expected.len() {
        return Ok(false);
    }
    let mut ids = BTreeSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub.list(AGENT_COLLECTION, after.as_deref(), 1000)?;
        ids.extend(page.docs.into_iter().map(|d| d.id));
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(ids.is_superset(expected)),
        }
    }
}

/// Result of the Cairn phase.
#[derive(Debug)]
struct SyncResult {
    /// The hub counted every agent as a connected peer (Hello exchanged).
    all_connected: Option<Duration>,
    /// The hub's listing held every agent's document.
    hub_has_all: Option<Duration>,
    /// The last agent whose document the hub committed, by the agent's own check.
    agents_acked: Option<Duration>,
    /// The median agent by the same check.
    median_acked: Option<Duration>,
    /// The last agent to converge.
    converged: Option<Duration>,
    rss_before_kib: Option<u64>,
    rss_synced_kib: Option<u64>,
    rss_idle_kib: Option<u64>,
    /// UDP receive-buffer drops on this host during the phase.
    udp_drops: String,
}

impl SyncResult {
    fn synced(&self) -> Option<Duration> {
        Some(self.hub_has_all?.max(self.agents_acked?))
    }
}

/// Starts every agent's link at once and waits for the milestones.
fn sync_phase(
    runtime: &tokio::runtime::Runtime,
    hub: &Hub,
    agents: Vec<HostedAgent>,
    shared: DocId,
    args: &Args,
) -> anyhow::Result<SyncResult> {
    let n = agents.len();
    let expected: BTreeSet<String> = agents.iter().map(|a| a.doc_id.to_string()).collect();
    let endpoints = {
        let _guard = runtime.enter();
        agents
            .iter()
            .map(|a| client_endpoint(&a.node.identity, &LinkTiming::default()))
            .collect::<Result<Vec<_>, _>>()?
    };
    let convergence = if args.full_replication {
        Convergence::Documents(n + 1)
    } else {
        Convergence::Shared(shared)
    };
    let hub_pid = hub.pid().to_string();
    // The hub has just taken the seed's document and its disconnect: let it go quiet.
    std::thread::sleep(Duration::from_secs(1));
    let rss_before_kib = proc_status_kib(&hub_pid, "VmRSS");
    let progress = Arc::new(Progress::default());
    let drops_before = udp_receive_buffer_drops();

    let started = Instant::now();
    let (links, watchers) = runtime.block_on(async {
        let started = tokio::time::Instant::from_std(started);
        let deadline = started + args.timeout;
        let mut links = Vec::with_capacity(n);
        let mut watchers = Vec::with_capacity(n);
        for (i, (agent, endpoint)) in agents.iter().zip(endpoints).enumerate() {
            let handle = agent.node.handle.clone();
            let dialer = if args.full_replication {
                let server_name = HUB_SERVER_NAME.to_owned();
                let link = dial_loop(
                    endpoint.clone(),
                    hub.quic,
                    server_name,
                    handle.clone(),
                    LinkTiming::default(),
                );
                tokio::spawn(link)
            } else {
                let keep = [agent.doc_id, shared];
                let link =
                    selective_dial_loop(endpoint.clone(), hub.quic, handle.clone(), keep, i as u64);
                tokio::spawn(link)
            };
            links.push((endpoint, dialer));
            let target = WatchTarget {
                handle,
                feed_head: agent.node.feed_head.clone(),
                doc_id: agent.doc_id,
                heads: agent.heads.clone(),
            };
            let watcher = watch_agent(target, convergence, started, deadline, progress.clone());
            watchers.push(tokio::spawn(watcher));
        }
        (links, watchers)
    });

    let mut all_connected = None;
    let mut hub_has_all = None;
    let mut rss_synced_kib = None;
    let mut last_report = Instant::now();
    while started.elapsed() < args.timeout {
        std::thread::sleep(POLL_INTERVAL);
        let Ok(status) = hub.http.status() else { continue };
        let at = started.elapsed();
        if all_connected.is_none() && status.connected_peers as usize >= n {
            all_connected = Some(at);
        }
        if hub_has_all.is_none() && hub_holds_all(&hub.http, &expected)? {
            hub_has_all = Some(at);
        }
        let acked = progress.hub_has_own.load(Ordering::Relaxed);
        let converged = progress.converged.load(Ordering::Relaxed);
        if rss_synced_kib.is_none() && hub_has_all.is_some() && acked == n {
            rss_synced_kib = proc_status_kib(&hub_pid, "VmRSS");
        }
        if hub_has_all.is_some() && acked == n && converged == n {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "  {:.1} s: hub has {} peers and {} documents; {acked}/{n} agents see their \
                 document on the hub; {converged}/{n} converged",
                at.as_secs_f64(),
                status.connected_peers,
                status.documents,
            );
        }
    }
    let times: Vec<AgentTimes> = runtime.block_on(async {
        let mut times = Vec::with_capacity(n);
        for watcher in watchers {
            times.push(watcher.await.unwrap_or_default());
        }
        times
    });
    // Nothing is in flight any more: everything converged, or the deadline passed.
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle_kib = proc_status_kib(&hub_pid, "VmRSS");
    let udp_drops = drops_between(drops_before, udp_receive_buffer_drops());
    report_spread(&times);
    let latest = |pick: fn(&AgentTimes) -> Option<Duration>| {
        times.iter().map(pick).collect::<Option<Vec<_>>>().and_then(|t| t.into_iter().max())
    };
    let result = SyncResult {
        all_connected,
        hub_has_all,
        agents_acked: latest(|t| t.hub_has_own),
        median_acked: median(times.iter().filter_map(|t| t.hub_has_own).collect()),
        converged: latest(|t| t.converged),
        rss_before_kib,
        rss_synced_kib,
        rss_idle_kib,
        udp_drops,
    };
    eprintln!("  stopping the agents");
    runtime.block_on(stop_agents(agents, links))?;
    Ok(result)
}

/// The median of `values`, if there are any.
fn median(mut values: Vec<Duration>) -> Option<Duration> {
    values.sort();
    values.get(values.len() / 2).copied()
}

/// Prints the median and slowest agent for each milestone, to see where the time goes.
fn report_spread(times: &[AgentTimes]) {
    let acked: Vec<Option<Duration>> = times.iter().map(|t| t.hub_has_own).collect();
    let converged: Vec<Option<Duration>> = times.iter().map(|t| t.converged).collect();
    for (what, reached) in [("the hub committed its document", acked), ("it converged", converged)]
    {
        let mut reached: Vec<Duration> = reached.into_iter().flatten().collect();
        reached.sort();
        let Some(slowest) = reached.last() else { continue };
        eprintln!(
            "  {what}: {} of {} agents, median {:.2} s, slowest {:.2} s",
            reached.len(),
            times.len(),
            reached[reached.len() / 2].as_secs_f64(),
            slowest.as_secs_f64()
        );
    }
}

/// Result of the handshake-only phase.
#[derive(Debug)]
struct HandshakeResult {
    all_connected: Option<Duration>,
    median: Option<Duration>,
    failed_attempts: usize,
    udp_drops: String,
}

/// Dials until one handshake completes, backing off as the agents' dial loop does.
async fn handshake(
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    seed: u64,
    started: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> (Option<(Duration, quinn::Connection)>, usize) {
    let timing = LinkTiming::default();
    let max = Duration::from_millis(timing.backoff_max_ms);
    let mut backoff = Duration::from_millis(timing.backoff_initial_ms);
    let mut failures = 0;
    for attempt in 0u64.. {
        if let Ok(connecting) = endpoint.connect(hub, HUB_SERVER_NAME) {
            if let Ok(Ok(connection)) = tokio::time::timeout_at(deadline, connecting).await {
                return (Some((started.elapsed(), connection)), failures);
            }
        }
        failures += 1;
        let wait = jittered(backoff, seed, attempt);
        if tokio::time::Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(max);
    }
    (None, failures)
}

/// N endpoints with the agents' identities complete only the QUIC handshake, all at once.
fn handshake_phase(
    runtime: &tokio::runtime::Runtime,
    hub: SocketAddr,
    identities: &[TlsPaths],
    timeout: Duration,
) -> anyhow::Result<HandshakeResult> {
    let endpoints = {
        let _guard = runtime.enter();
        identities
            .iter()
            .map(|paths| Ok(client_endpoint(&Identity::load(paths)?, &LinkTiming::default())?))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let drops_before = udp_receive_buffer_drops();
    let outcomes = runtime.block_on(async {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let tasks: Vec<_> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| tokio::spawn(handshake(e.clone(), hub, i as u64, started, deadline)))
            .collect();
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await.unwrap_or((None, 0)));
        }
        for endpoint in &endpoints {
            endpoint.close(0u32.into(), b"handshake only");
        }
        for endpoint in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        outcomes
    });
    let udp_drops = drops_between(drops_before, udp_receive_buffer_drops());
    let failed_attempts = outcomes.iter().map(|(_, f)| f).sum();
    let times: Vec<Duration> =
        outcomes.iter().filter_map(|(o, _)| o.as_ref().map(|(t, _)| *t)).collect();
    let all_connected =
        (times.len() == outcomes.len()).then(|| times.iter().max().copied()).flatten();
    let median = median(times);
    Ok(HandshakeResult { all_connected, median, failed_attempts, udp_drops })
}

/// A hub configuration file raising `max_connections` when N agents would pass the default.
fn hub_args(root: &Path, agents: usize) -> anyhow::Result<Vec<String>> {
    let needed = agents + 64;
    if needed <= HUB_DEFAULT_MAX_CONNECTIONS {
        return Ok(Vec::new());
    }
    let path = root.join("hub.toml");
    std::fs::write(&path, format!("max_connections = {needed}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

/// UDP datagrams this host dropped for a full receive buffer so far (`/proc/net/snmp`), so a
/// burst of handshakes that overflows the hub's socket buffer shows up as what it is.
fn udp_receive_buffer_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

fn drops_between(before: Option<u64>, after: Option<u64>) -> String {
    match (before, after) {
        (Some(before), Some(after)) => thousands(after.saturating_sub(before)),
        _ => "?".into(),
    }
}

fn secs(value: Option<Duration>) -> String {
    value.map_or_else(|| "timeout".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fanin-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    if let Err(error) = field_tests::process::binary("cloud-hub") {
        anyhow::bail!(
            "{error:#}\nbuild the hub first, for the same profile as this benchmark: \
             cargo build --release -p cloud-hub"
        );
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are not representative (use --release)");
    }
    let n = args.agents;
    check_resources(n, args.full_replication)?;
    let started = Instant::now();
    let dir = TestDir::new("fanin-bench")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let extra = hub_args(dir.path(), n)?;
    let hub = Hub::start_with(dir.path(), "hub", free_udp_port()?, &extra)?;
    eprintln!("hub {} (pid {}); seeding the shared document", hub.quic, hub.pid());
    let shared = seed_shared_doc(&runtime, dir.path(), &hub)?;

    eprintln!("starting {} agents in this process", thousands(n as u64));
    let agents = start_agents(&runtime, dir.path(), n)?;
    let identities: Vec<TlsPaths> = agents.iter().map(|a| a.tls.clone()).collect();

    eprintln!("{} agents dial the hub at once", thousands(n as u64));
    let cairn = sync_phase(&runtime, &hub, agents, shared, &args)?;
    let synced = cairn.synced().with_context(|| {
        format!(
            "not every agent was synced within {:?} (hub listing complete: {}; the last \
             agent's own check: {})",
            args.timeout,
            secs(cairn.hub_has_all),
            secs(cairn.agents_acked)
        )
    })?;
    eprintln!(
        "  synced after {:.2} s; converged after {} s",
        synced.as_secs_f64(),
        secs(cairn.converged)
    );
    wait_for("the hub to drop the agents' connections", SETTLE_TIMEOUT, || {
        hub.http.status().ok().filter(|s| s.connected_peers == 0)
    })?;
    // As before the Cairn phase: the hub has just closed N connections; let it go quiet.
    std::thread::sleep(Duration::from_secs(1));

    eprintln!("{} handshake-only connections at once", thousands(n as u64));
    let bare = handshake_phase(&runtime, hub.quic, &identities, args.timeout)?;
    let handshaken = bare
        .all_connected
        .with_context(|| format!("not every handshake completed within {:?}", args.timeout))?;
    eprintln!(
        "  all connected after {:.2} s ({} failed attempts retried)",
        handshaken.as_secs_f64(),
        bare.failed_attempts
    );
    hub.terminate()?;
    drop(runtime);
    print_report(&args, &extra, &cairn, synced, &bare, handshaken);
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_report(
    args: &Args,
    hub_extra: &[String],
    cairn: &SyncResult,
    synced: Duration,
    bare: &HandshakeResult,
    handshaken: Duration,
) {
    let n = args.agents;
    let per_connection = match (cairn.rss_before_kib, cairn.rss_idle_kib) {
        (Some(before), Some(after)) => format!("{:.1}", (after as f64 - before as f64) / n as f64),
        _ => "?".into(),
    };
    println!("# Cairn hub fan-in: N agents connecting at once\n");
    println!("Machine: {}", machine());
    println!(
        "One cloud-hub process; the agents are real agent nodes (store thread, node loop) hosted \
         in the benchmark process on the same machine, each with its own SQLite database, \
         certificate and UDP socket, each holding one document of its own written before \
         dialing. {} Hub max_connections: {}.\n",
        if args.full_replication {
            "Full replication: the agents run their own dial loop and take every document."
        } else {
            "The agents' connection pump drops sync messages for other agents' documents, so \
             each keeps only its own and the hub's shared one: the hub sends every agent its \
             first sync message for every document, as to a real fleet, but gets no answer."
        },
        if hub_extra.is_empty() {
            format!("{} (default)", thousands(HUB_DEFAULT_MAX_CONNECTIONS as u64))
        } else {
            thousands((n + 64) as u64)
        }
    );
    println!(
        "| N | all connected, handshake only s | median handshake s \
         | all connected, Cairn Hello s | all synced, Cairn s | median agent synced s \
         | synced / handshake | all converged s | hub RSS before MiB | hub RSS after MiB \
         | RSS per idle connection KiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {:.2} | {} | {} | {:.2} | {} | {:.1}× | {} | {} | {} | {} |",
        thousands(n as u64),
        handshaken.as_secs_f64(),
        secs(bare.median),
        secs(cairn.all_connected),
        synced.as_secs_f64(),
        secs(cairn.median_acked),
        synced.as_secs_f64() / handshaken.as_secs_f64(),
        secs(cairn.converged),
        mib(cairn.rss_before_kib),
        mib(cairn.rss_idle_kib),
        per_connection,
    );
    println!();
    println!(
        "All times from the moment every agent starts dialing. Handshake only: QUIC with mutual \
         TLS, one endpoint per agent identity, nothing sent after the handshake ({} failed \
         attempts retried with the agents' backoff). Cairn Hello: the hub's /v1/status counts N \
         connected peers (polled every {} ms). Synced: the hub's document listing holds all N \
         agents' documents (polled likewise) and every agent's durability check says the hub \
         committed its document; the median is over that check. Converged: every agent has committed {}. Hub RSS is VmRSS \
         before dialing and once the connections are idle (after convergence, or the \
         deadline), so the per-connection figure includes the N documents and the hub's \
         per-peer sync state; VmRSS when all were synced: {} MiB. UDP datagrams this host \
         dropped for a full socket receive buffer (/proc/net/snmp RcvbufErrors): {} in the \
         Cairn phase, {} in the handshake-only one.",
        bare.failed_attempts,
        POLL_INTERVAL.as_millis(),
        if args.full_replication {
            "all N + 1 documents"
        } else {
            "the hub's shared document"
        },
        mib(cairn.rss_synced_kib),
        cairn.udp_drops,
        bare.udp_drops,
    );
}
