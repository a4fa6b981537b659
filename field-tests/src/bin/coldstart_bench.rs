//! Cold start: how long an agent holding N documents takes to be ready to sync, against the
//! floor of scanning its heads index and against loading every document, and what each cold
//! document costs in memory.
//!
//! For each N the bench writes N one-change documents into a fresh store (as many separate
//! committed writes would leave them), then measures in this process the time to open the
//! store and scan the heads index, and the time and memory to load every document into
//! Automerge; and, with a real `edge-agent` process on that store, the time from spawning it
//! to its ready line and its resident memory once ready.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use automerge::{ActorId, Automerge};
use cairn_shared::document::Document;
use cairn_shared::ids::{Collection, DocId, NodeId};
use cairn_shared::io::store::Store;
use cairn_shared::ops::{apply_ops, Op};
use cairn_shared::store_task::StoreTask;
use field_tests::bench::{machine, proc_status_kib, spread_id, thousands};
use field_tests::{Agent, TestDir};
use serde_json::json;

const DEFAULT_NS: &[usize] = &[1_000, 10_000, 100_000];
/// Documents written per store transaction while building the fixture.
const BUILD_BATCH: usize = 1_000;

const USAGE: &str = "\
usage: coldstart-bench [--max-n N] [--runs R]

  --max-n N   skip document counts above N (default: 100000, all of 1000, 10000, 100000)
  --runs R    take each timing as the median of R runs (default: 3; more on a busy machine)";

struct Row {
    n: usize,
    store_mib: f64,
    scan: Duration,
    load_all: Duration,
    load_all_rss_kib: u64,
    agent_ready: Duration,
    agent_rss_kib: u64,
}

struct Args {
    max_n: usize,
    runs: usize,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut parsed = Args { max_n: usize::MAX, runs: DEFAULT_RUNS };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-n" => {
                let value = args.next().context("--max-n needs a value")?;
                parsed.max_n = value.parse().with_context(|| format!("--max-n {value:?}"))?;
            }
            "--runs" => {
                let value = args.next().context("--runs needs a value")?;
                parsed.runs = value.parse().with_context(|| format!("--runs {value:?}"))?;
                anyhow::ensure!(parsed.runs > 0, "--runs must be at least 1");
            }
            "-h" | "--help" => return Ok(None),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(parsed))
}

/// Writes `n` documents `{"n": i}`, one change each, through the store's own append path.
fn build_store(path: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let mut store = Store::open(path)?;
    let collection: Collection = "bench".parse()?;
    let origin = NodeId::from_bytes([7; 16]);
    let mut batch = Vec::with_capacity(BUILD_BATCH);
    for i in 0..n {
        let mut doc = Automerge::new();
        doc.set_actor(ActorId::from(vec![0xC0; 16]));
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["n"], "value": i}]))?;
        apply_ops(&mut doc, &ops, 0)?;
        let changes = doc.get_changes(&[]).into_iter().map(|c| c.raw_bytes().to_vec()).collect();
        let task = StoreTask::Append {
            doc_id: DocId::from_slice(&spread_id(i as u64))?,
            collection: collection.clone(),
            snapshot: None,
            changes,
            heads: doc.get_heads().iter().map(|h| h.0).collect(),
            hlc: i as u64,
            origin,
            deleted: false,
        };
        batch.push((i as u64, task));
        if batch.len() == BUILD_BATCH || i + 1 == n {
            store.execute(&batch)?;
            batch.clear();
        }
    }
    Ok(())
}

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS").context("reading VmRSS")
}

fn run_case(root: &std::path::Path, n: usize, runs: usize) -> anyhow::Result<Row> {
    let name = format!("agent-{n}");
    let database = root.join(&name).join("cairn.db");
    std::fs::create_dir_all(root.join(&name))?;
    let started = Instant::now();
    build_store(&database, n)?;
    eprintln!(
        "  wrote {} documents in {:.1} s",
        thousands(n as u64),
        started.elapsed().as_secs_f64()
    );
    let store_mib = std::fs::metadata(&database)?.len() as f64 / (1024.0 * 1024.0);

    // The floor: open the store and read the heads index, nothing else.
    let mut scans = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let index = Store::open(&database)?.load_index()?;
        scans.push(started.elapsed());
        anyhow::ensure!(index.len() == n, "index holds {} of {n} documents", index.len());
    }
    let scan = median(scans);

    // Cairn: a real agent on that store, from spawn to its ready line (its API and sync are
    // up then). Its hub address has no listener; dialing it runs in the background. Timed
    // before loading every document here (nearly 2 GB at 100k), whose allocations and frees
    // would otherwise still be settling in the kernel while the agent starts.
    let hub = std::net::SocketAddr::from(([127, 0, 0, 1], field_tests::free_udp_port()?));
    let mut starts = Vec::new();
    let mut agent_rss_kib = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let agent = Agent::start(root, &name, hub)?;
        starts.push(started.elapsed());
        agent_rss_kib = rss_kib(&agent.pid().to_string())?;
        let status = agent.api.status()?;
        anyhow::ensure!(status.documents as usize == n, "agent lists {} of {n}", status.documents);
        agent.terminate()?;
    }
    eprintln!("  agent starts: {starts:?}");
    let agent_ready = median(starts);

    // What a stack that holds every document does at start: load each into Automerge.
    let rss_before = rss_kib("self")?;
    let started = Instant::now();
    let stored = Store::open(&database)?.load_all()?;
    let loaded = stored
        .iter()
        .map(|doc| Document::load(doc, ActorId::random()))
        .collect::<Result<Vec<_>, _>>()?;
    let load_all = started.elapsed();
    drop(stored);
    let load_all_rss_kib = rss_kib("self")?.saturating_sub(rss_before);
    drop(loaded);

    Ok(Row { n, store_mib, scan, load_all, load_all_rss_kib, agent_ready, agent_rss_kib })
}

/// Each timing is the median of this many runs unless `--runs` says otherwise: the first start
/// after the store was written also replays SQLite's write-ahead log, which a restarting
/// device does not.
const DEFAULT_RUNS: usize = 3;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

fn ms(elapsed: Duration) -> String {
    format!("{:.0}", elapsed.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("coldstart-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(Args { max_n, runs }) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are not representative (use --release)");
    }
    let dir = TestDir::new("coldstart-bench")?;
    let root = dir.path();
    // An agent with no documents: what every count below is measured against.
    let hub = std::net::SocketAddr::from(([127, 0, 0, 1], field_tests::free_udp_port()?));
    let empty = Agent::start(root, "agent-empty", hub)?;
    let baseline_rss_kib = rss_kib(&empty.pid().to_string())?;
    empty.terminate()?;
    eprintln!("empty agent: {} KiB resident", thousands(baseline_rss_kib));

    let mut rows = Vec::new();
    for &n in DEFAULT_NS.iter().filter(|&&n| n <= max_n) {
        eprintln!("N={}", thousands(n as u64));
        rows.push(run_case(root, n, runs)?);
    }

    println!("# Cairn cold-start benchmark\n");
    println!("Machine: {}", machine());
    println!(
        "Documents are `{{\"n\": i}}`, one change each, in one SQLite store (WAL). Index scan: \
         open the store and read the heads index. Load all: read every document and load it \
         into Automerge, as a stack that holds every document does. Agent ready: a real \
         `edge-agent` process from spawn to its ready line. Scan and ready are medians of \
         {runs} runs. RSS per cold document: the \
         agent's resident memory once ready, less that of an agent with no documents \
         ({} KiB), divided by N.\n",
        thousands(baseline_rss_kib)
    );
    println!(
        "| N | store MiB | index scan ms | load all ms | agent ready ms | ready / scan \
         | load all / ready | agent RSS MiB | RSS per cold doc (bytes) | RSS per loaded doc (bytes) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let per_cold = row.agent_rss_kib.saturating_sub(baseline_rss_kib) * 1024 / row.n as u64;
        let per_loaded = row.load_all_rss_kib * 1024 / row.n as u64;
        println!(
            "| {} | {:.1} | {} | {} | {} | {:.2}× | {:.1}× | {:.1} | {} | {} |",
            thousands(row.n as u64),
            row.store_mib,
            ms(row.scan),
            ms(row.load_all),
            ms(row.agent_ready),
            row.agent_ready.as_secs_f64() / row.scan.as_secs_f64(),
            row.load_all.as_secs_f64() / row.agent_ready.as_secs_f64(),
            row.agent_rss_kib as f64 / 1024.0,
            thousands(per_cold),
            thousands(per_loaded),
        );
    }
    println!();
    println!(
        "Agent ready includes process start, TLS identity, opening the store, the heads index \
         scan, building the catalog with its reconciliation fingerprints, and binding the API; \
         no document is loaded. The scan ran right after the store was written, so both read \
         from the page cache."
    );
    Ok(())
}
