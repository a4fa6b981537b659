//! Reconnect benchmark: what it costs an agent and a hub that both hold N documents, k of
//! which the agent changed while the link was down, to agree again once it is back.
//!
//! Everything runs in this process on the sync core alone: two `Node`s joined by a perfect
//! in-memory link, every store task committing at once, no sockets, no disk. What is measured
//! is therefore the protocol (bytes, frames, round trips) and the CPU it takes, not a network.
//!
//! The baseline is what a stack without set reconciliation pays on the same reconnect: one
//! Automerge sync session per document, all N of them, with fresh sync states on both sides,
//! run in lockstep rounds over the same documents.
//!
//! `cargo run --release -p field-tests --bin reconnect-bench -- [--max-n N]`.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash};
use cairn_shared::config::SyncConfig;
use cairn_shared::frame::{FrameDecoder, LENGTH_PREFIX_BYTES};
use cairn_shared::ids::{Collection, DocId, NodeId};
use cairn_shared::message::{Envelope, Message, Role};
use cairn_shared::node::{Input, Node, Output, Request};
use cairn_shared::ops::{apply_ops, Op};
use cairn_shared::store_task::{StoreReply, StoredDoc};
use field_tests::bench::{machine, proc_status_kib, spread_id, thousands};
use serde_json::json;

/// Document counts measured by default (capped by `--max-n`).
const DEFAULT_NS: &[usize] = &[1_000, 10_000, 100_000];

/// Documents changed on the agent while disconnected.
const KS: &[usize] = &[0, 1, 100];

/// The connection id both nodes give the link; each node has its own id space.
const CONN: u64 = 1;

/// The agent initiates reconciliation because its node id is the smaller one, as it would
/// be for half of all real pairs; which side starts changes the count by at most one leg.
const AGENT_ID: [u8; 16] = [1; 16];
const HUB_ID: [u8; 16] = [2; 16];

const USAGE: &str = "\
usage: reconnect-bench [--max-n N]

  --max-n N   skip document counts above N (default: 100000, all of 1000, 10000, 100000)";

fn parse_args() -> anyhow::Result<Option<usize>> {
    let mut max_n = usize::MAX;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-n" => {
                let value = args.next().context("--max-n needs a value")?;
                max_n = value.parse().with_context(|| format!("--max-n {value:?}"))?;
                anyhow::ensure!(max_n > 0, "--max-n must be positive");
            }
            "-h" | "--help" => return Ok(None),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(max_n))
}

fn doc_id(i: usize) -> anyhow::Result<DocId> {
    Ok(DocId::from_slice(&spread_id(i as u64))?)
}

fn set_n(value: usize) -> anyhow::Result<Vec<Op>> {
    Ok(serde_json::from_value(json!([{"op": "set", "path": ["n"], "value": value}]))?)
}

/// Document `i` as the store would hold it after its creating write: `{"n": i}`, one change
/// by the actor that created it, saved as a snapshot.
fn stored_doc(i: usize, collection: &Collection) -> anyhow::Result<StoredDoc> {
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from(vec![0xC0; 16]));
    apply_ops(&mut doc, &set_n(i)?, 0)?;
    Ok(StoredDoc {
        doc_id: doc_id(i)?,
        collection: collection.clone(),
        snapshot: Some(doc.save()),
        changes: Vec::new(),
    })
}

fn new_node(id: [u8; 16], role: Role, config: SyncConfig) -> Node {
    // The default clock is the wall clock with a random id; both nodes read the same clock,
    // so no timestamp is ever refused, and only the id's encoded length varies by a byte.
    Node::new(NodeId::from_bytes(id), role, ActorId::from(id.to_vec()), Default::default(), config)
}

/// Carries out one node's outputs until it is quiet: store tasks commit at once, and bytes
/// for the link are appended to `link`.
fn drain(node: &mut Node, now: Instant, link: &mut Vec<u8>) -> anyhow::Result<()> {
    while let Some(output) = node.poll_output() {
        match output {
            Output::Transmit { bytes, .. } => link.extend_from_slice(&bytes),
            Output::Store { task, .. } => {
                node.handle_input(now, Input::StoreDone { task, reply: StoreReply::Committed })
            }
            Output::Close { reason, .. } => anyhow::bail!("a node closed the link: {reason}"),
            Output::Respond { id, result } => {
                result.with_context(|| format!("request {id}"))?;
            }
        }
    }
    Ok(())
}

/// Changes document `doc_id` on `node` through the local API, as an application would.
fn edit(node: &mut Node, now: Instant, id: u64, doc_id: DocId, value: usize) -> anyhow::Result<()> {
    node.handle_input(
        now,
        Input::Request { id, request: Request::Edit { doc_id, ops: set_n(value)? } },
    );
    let mut link = Vec::new();
    drain(node, now, &mut link)?;
    anyhow::ensure!(link.is_empty(), "a disconnected node sent bytes");
    Ok(())
}

/// Traffic of one side of the link.
#[derive(Debug, Default, Clone, Copy)]
struct Direction {
    bytes: usize,
    frames: usize,
    reconcile_bytes: usize,
    doc_sync_bytes: usize,
}

#[derive(Debug, Default)]
struct CairnResult {
    /// Index 0: agent to hub; 1: hub to agent.
    directions: [Direction; 2],
    /// Rounds (agent's frames delivered, then the hub's) in which anything was delivered,
    /// the Hello exchange included.
    round_trips: usize,
    elapsed: Duration,
    /// Documents any DocSync frame named.
    docs_synced: usize,
}

/// Connects the two nodes and carries frames, all of one side's per half-round, until
/// neither has anything to send.
fn reconnect(nodes: &mut [Node; 2]) -> anyhow::Result<CairnResult> {
    let now = Instant::now();
    let started = Instant::now();
    for side in 0..2 {
        let peer = nodes[1 - side].node_id();
        nodes[side].handle_input(now, Input::Connected { conn: CONN, peer, restrict: None });
    }
    // Decoding for the counts happens after the clock stops; the link keeps a transcript.
    let mut transcript: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut round_trips: usize = 0;
    loop {
        let mut delivered = false;
        for side in 0..2 {
            let mut link = Vec::new();
            drain(&mut nodes[side], now, &mut link)?;
            if link.is_empty() {
                continue;
            }
            delivered = true;
            transcript.push((side, link.clone()));
            nodes[1 - side].handle_input(now, Input::Received { conn: CONN, bytes: link });
        }
        if !delivered {
            break;
        }
        round_trips += 1;
    }
    // The first exchange is the hellos, which any connection starts with; what follows is
    // what the reconnect itself costs.
    let round_trips = round_trips.saturating_sub(1);
    let elapsed = started.elapsed();

    let mut result = CairnResult { round_trips, elapsed, ..CairnResult::default() };
    let mut decoders = [
        FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES),
        FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES),
    ];
    let mut synced = BTreeSet::new();
    for (side, bytes) in &transcript {
        let direction = &mut result.directions[*side];
        direction.bytes += bytes.len();
        decoders[*side].push(bytes);
        while let Some(payload) = decoders[*side].next_frame()? {
            let size = LENGTH_PREFIX_BYTES + payload.len();
            direction.frames += 1;
            let message = match Envelope::decode(&payload)?.message {
                Message::Compressed { deflated } => {
                    Message::decompress(&deflated, SyncConfig::MAX_FRAME_BYTES)?
                }
                message => message,
            };
            match message {
                Message::Reconcile { .. } => direction.reconcile_bytes += size,
                Message::DocSync { doc_id, .. } => {
                    direction.doc_sync_bytes += size;
                    synced.insert(doc_id);
                }
                Message::DocSyncBatch { parts } => {
                    direction.doc_sync_bytes += size;
                    synced.extend(parts.iter().map(|part| part.doc_id));
                }
                _ => {}
            }
        }
    }
    result.docs_synced = synced.len();
    Ok(result)
}

#[derive(Debug, Default)]
struct BaselineResult {
    /// Encoded Automerge sync message bytes; index 0: agent to hub; 1: hub to agent.
    bytes: [usize; 2],
    messages: [usize; 2],
    rounds: usize,
    elapsed: Duration,
}

/// Automerge's sync protocol for every document, fresh states on both sides, all documents'
/// sessions advancing together: in each round the agent sends every message it has, then the
/// hub answers with every message it has, until a round sends nothing.
fn per_document_sync(docs: &mut [Vec<Automerge>; 2]) -> anyhow::Result<BaselineResult> {
    let count = docs[0].len();
    let mut states: [Vec<sync::State>; 2] = [
        (0..count).map(|_| sync::State::new()).collect(),
        (0..count).map(|_| sync::State::new()).collect(),
    ];
    let mut result = BaselineResult::default();
    let started = Instant::now();
    loop {
        let mut sent = false;
        for side in 0..2 {
            let ([docs_a, docs_b], [states_a, states_b]) = (&mut *docs, &mut states);
            let (senders, receivers, send_states, receive_states) = if side == 0 {
                (docs_a, docs_b, states_a, states_b)
            } else {
                (docs_b, docs_a, states_b, states_a)
            };
            for i in 0..count {
                let Some(message) = senders[i].generate_sync_message(&mut send_states[i]) else {
                    continue;
                };
                // Encoded and decoded as on a real link, which is also what is counted.
                let encoded = message.encode();
                result.bytes[side] += encoded.len();
                result.messages[side] += 1;
                sent = true;
                let message = sync::Message::decode(&encoded)?;
                receivers[i].receive_sync_message(&mut receive_states[i], message)?;
            }
        }
        if !sent {
            break;
        }
        result.rounds += 1;
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

/// Every document's heads on a node, in id order.
fn heads(node: &Node) -> Vec<(DocId, Vec<ChangeHash>)> {
    node.documents().map(|(id, d)| (*id, d.doc.get_heads())).collect()
}

#[derive(Debug)]
struct Row {
    n: usize,
    k: usize,
    cairn: CairnResult,
    baseline: BaselineResult,
}

fn run_case(stored: &[StoredDoc], k: usize) -> anyhow::Result<Row> {
    let n = stored.len();
    let mut nodes = [
        new_node(AGENT_ID, Role::Agent, SyncConfig::edge()),
        new_node(HUB_ID, Role::Hub, SyncConfig::hub()),
    ];
    // Both sides start from what they held when the link went down: the same documents.
    for node in &mut nodes {
        for doc in stored {
            node.load(doc).with_context(|| format!("loading {}", doc.doc_id))?;
        }
    }
    // The agent changes k documents, spread over the id list, while offline.
    let now = Instant::now();
    for j in 0..k {
        let i = j * n / k;
        edit(&mut nodes[0], now, j as u64, stored[i].doc_id, n + i)?;
    }

    // The baseline runs on copies of exactly these documents, taken before Cairn syncs them.
    // Copying also touches every document once, as any session after the first does, so the
    // reconnect is measured warm: a node's first session after loading pays several times
    // more CPU, once.
    let mut copies: [Vec<Automerge>; 2] =
        [0, 1].map(|side| nodes[side].documents().map(|(_, d)| d.doc.clone()).collect());

    let cairn = reconnect(&mut nodes)?;
    anyhow::ensure!(
        heads(&nodes[0]) == heads(&nodes[1]),
        "N={n} k={k}: the nodes hold different documents after reconnecting"
    );
    anyhow::ensure!(
        cairn.docs_synced == k,
        "N={n} k={k}: {} documents were synced, expected exactly the {k} that differ",
        cairn.docs_synced
    );
    drop(nodes);

    let baseline = per_document_sync(&mut copies)?;
    let converged = copies[0].iter().zip(&copies[1]).all(|(a, b)| a.get_heads() == b.get_heads());
    anyhow::ensure!(converged, "N={n} k={k}: per-document sync left documents apart");
    Ok(Row { n, k, cairn, baseline })
}

/// An integer with thousands separators.
fn group(value: usize) -> String {
    thousands(value as u64)
}

/// `a / b` with one decimal below ten, where the decimal still says something.
fn ratio(a: usize, b: usize) -> String {
    let value = a as f64 / b as f64;
    if value < 10.0 {
        format!("{value:.1}×")
    } else {
        format!("{value:.0}×")
    }
}

fn ms(elapsed: Duration) -> String {
    format!("{:.1}", elapsed.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reconnect-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(max_n) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are not representative (use --release)");
    }
    let ns: Vec<usize> = DEFAULT_NS.iter().copied().filter(|&n| n <= max_n).collect();
    anyhow::ensure!(!ns.is_empty(), "--max-n {max_n} leaves no document count to measure");
    let largest = ns.iter().copied().max().unwrap_or_default();

    let collection: Collection = "bench".parse()?;
    let started = Instant::now();
    eprintln!("building {} documents", group(largest));
    // Built once; each N uses a prefix, whose ids are as well spread as the whole list's.
    let stored =
        (0..largest).map(|i| stored_doc(i, &collection)).collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("  built in {:.1} s", started.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    for &n in &ns {
        for &k in KS {
            let case_started = Instant::now();
            eprintln!(
                "N={} k={k}: loading both nodes, syncing per document, reconnecting",
                group(n)
            );
            let row = run_case(&stored[..n], k)?;
            eprintln!(
                "  Cairn {} B in {} round trips, {} ms; per-document {} B in {} rounds, {} ms \
                 ({:.1} s with set-up)",
                group(row.cairn.directions[0].bytes + row.cairn.directions[1].bytes),
                row.cairn.round_trips,
                ms(row.cairn.elapsed),
                group(row.baseline.bytes[0] + row.baseline.bytes[1]),
                row.baseline.rounds,
                ms(row.baseline.elapsed),
                case_started.elapsed().as_secs_f64()
            );
            rows.push(row);
        }
    }

    println!("# Cairn reconnect benchmark: set reconciliation vs per-document sync\n");
    println!("Machine: {}", machine());
    println!(
        "Two nodes in one process (agent initiates, hub answers) over a perfect in-memory link; \
         store tasks commit at once. Documents are `{{\"n\": i}}`, one change each; the agent \
         changed k of them while disconnected.\n"
    );
    println!(
        "| N | k | Cairn bytes A→B | Cairn bytes B→A | Cairn frames A→B / B→A \
         | Reconcile bytes | DocSync bytes | Cairn round trips | Cairn ms \
         | per-doc bytes A→B | per-doc bytes B→A | per-doc messages | per-doc rounds \
         | per-doc ms | bytes per-doc / Cairn |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let [a, b] = row.cairn.directions;
        let cairn_bytes = a.bytes + b.bytes;
        let baseline_bytes = row.baseline.bytes[0] + row.baseline.bytes[1];
        println!(
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            group(row.n),
            row.k,
            group(a.bytes),
            group(b.bytes),
            a.frames,
            b.frames,
            group(a.reconcile_bytes + b.reconcile_bytes),
            group(a.doc_sync_bytes + b.doc_sync_bytes),
            row.cairn.round_trips,
            ms(row.cairn.elapsed),
            group(row.baseline.bytes[0]),
            group(row.baseline.bytes[1]),
            group(row.baseline.messages[0] + row.baseline.messages[1]),
            row.baseline.rounds,
            ms(row.baseline.elapsed),
            ratio(baseline_bytes, cairn_bytes),
        );
    }
    println!();
    println!(
        "Cairn bytes are whole frames (length prefix, version byte, HLC timestamp, message), \
         Hello frames included; a round trip is the agent's pending frames delivered to the \
         hub, then the hub's to the agent, not counting the Hello exchange that opens every \
         connection. Cairn ms is \
         from both sides seeing the connection until neither has anything to send, and \
         includes building each side's reconciliation set (O(N)), with documents already touched \
         once since loading (a node's first session after start costs several times more). \
         Per-document figures are \
         Automerge's encoded sync messages only, with no document id, framing or transport \
         overhead, so the ratio understates what such a stack sends."
    );
    let peak = proc_status_kib("self", "VmHWM");
    println!(
        "Peak RSS of the process (VmHWM): {} MiB.",
        peak.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
