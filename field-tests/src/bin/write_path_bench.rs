//! Local write-path benchmark: what a durable write through a real `edge-agent` costs next
//! to the floor, raw rusqlite inserts of the same bytes with the same durability settings.
//!
//! Cairn: W edits through the agent's HTTP API (`POST /v1/docs/{id}/ops`), each answered only
//! once its transaction committed (WAL, `synchronous=FULL`), from C client threads at once,
//! each editing a document of its own. The agent dials a hub address nobody listens on, so
//! no sync traffic competes with the writes.
//!
//! Floor, same run, same temporary filesystem: a fresh SQLite file with the same pragmas and
//! the agent's `changes` table, into which the same Automerge change bytes (built in process
//! with the same ops) are inserted one row per transaction, and 100 rows per transaction.
//!
//! Build the agent first: `cargo build --release -p edge-agent`, then
//! `cargo run --release -p field-tests --bin write-path-bench -- [--writes N] [--clients C,...]`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use automerge::{ActorId, Automerge};
use cairn_shared::ops::{apply_ops, Op};
use field_tests::bench::{machine, thousands};
use field_tests::{free_udp_port, Agent, ApiClient, TestDir};
use serde_json::{json, Value};

/// Writes per measured configuration: enough for a stable p99, and at 5 ms per fsync still
/// under a minute for the sequential runs together.
const DEFAULT_WRITES: usize = 5_000;

/// Client threads writing at once, one configuration each.
const DEFAULT_CLIENTS: &[usize] = &[1, 8, 32];

/// Rows per transaction in the batched floor.
const RAW_BATCH: usize = 100;

/// The collection the benchmark's documents go into.
const COLLECTION: &str = "bench";

const USAGE: &str = "\
usage: write-path-bench [--writes N] [--clients C[,C...]]

  --writes N     durable writes per configuration (default 5000)
  --clients LIST concurrent client threads, one configuration each, comma-separated
                 (default 1,8,32); each client edits a document of its own";

#[derive(Debug)]
struct Args {
    writes: usize,
    clients: Vec<usize>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut writes = DEFAULT_WRITES;
    let mut clients = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--writes" => {
                writes = value("--writes")?.parse().context("--writes")?;
                anyhow::ensure!(writes > 0, "--writes must be positive");
            }
            "--clients" => {
                for c in value("--clients")?.split(',').filter(|s| !s.is_empty()) {
                    let c: usize = c.parse().with_context(|| format!("client count {c:?}"))?;
                    anyhow::ensure!((1..=1024).contains(&c), "client counts must be 1 to 1024");
                    clients.push(c);
                }
            }
            "-h" | "--help" => return Ok(None),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if clients.is_empty() {
        clients = DEFAULT_CLIENTS.to_vec();
    }
    Ok(Some(Args { writes, clients }))
}

/// The content a benchmark document is created with.
fn initial_content() -> Value {
    json!({"seq": 0, "value": 0.0})
}

/// Edit `i` of a document: a sensor-style reading, two fields set in one change.
fn edit_ops(i: usize) -> Value {
    json!([
        {"op": "set", "path": ["seq"], "value": i},
        {"op": "set", "path": ["value"], "value": i as f64 * 0.5},
    ])
}

/// The change bytes the agent stores for `count` edits of one document, built in process
/// with the same ops, a 16-byte actor and a current commit time as the agent's.
fn change_bytes(count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let time = i64::try_from(now)?;
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from(vec![0xA5; 16]));
    let create: Vec<Op> = initial_content()
        .as_object()
        .context("initial content is an object")?
        .iter()
        .map(|(key, value)| {
            serde_json::from_value(json!({"op": "set", "path": [key], "value": value}))
        })
        .collect::<Result<_, _>>()?;
    apply_ops(&mut doc, &create, time)?;
    let mut changes = Vec::with_capacity(count);
    for i in 1..=count {
        let ops: Vec<Op> = serde_json::from_value(edit_ops(i))?;
        anyhow::ensure!(apply_ops(&mut doc, &ops, time)?, "edit {i} changed nothing");
        let change = doc.get_last_local_change().context("no change after an edit")?;
        changes.push(change.raw_bytes().to_vec());
    }
    Ok(changes)
}

/// One measured configuration.
#[derive(Debug)]
struct Row {
    path: &'static str,
    concurrency: usize,
    writes: usize,
    elapsed: Duration,
    /// Per write for the agent and the single-row floor; per transaction for the batched one.
    latencies: Vec<Duration>,
    /// Writes per SQLite commit, where known.
    per_commit: Option<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

/// The `p`-quantile (0 to 1) by nearest rank of sorted `values`.
fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Commits and store tasks the agent has counted so far (`cairn_commit_batch_tasks`).
fn commit_counts(api: &ApiClient) -> anyhow::Result<(f64, f64)> {
    let text = api.metrics()?;
    let metric = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
    };
    let commits = metric("cairn_commit_batch_tasks_count").context("no commit count metric")?;
    let tasks = metric("cairn_commit_batch_tasks_sum").context("no commit task metric")?;
    Ok((commits, tasks))
}

/// `writes` edits from `clients` threads at once, each editing its own document.
fn agent_run(agent: &Agent, clients: usize, writes: usize) -> anyhow::Result<Row> {
    let base = agent.api.base().to_owned();
    // Every thread creates its document (which also opens its HTTP connection) before the
    // barrier, and its bodies are serialized up front: the clock measures the agent.
    let mut prepared = Vec::with_capacity(clients);
    for client in 0..clients {
        let api = ApiClient::new(base.clone());
        let id = api.create(COLLECTION, &initial_content())?;
        let count = writes / clients + usize::from(client < writes % clients);
        let bodies: Vec<Vec<u8>> =
            (1..=count).map(|i| json!({ "ops": edit_ops(i) }).to_string().into_bytes()).collect();
        prepared.push((api, format!("/v1/docs/{id}/ops"), bodies));
    }
    let (commits_before, tasks_before) = commit_counts(&agent.api)?;
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = prepared
        .into_iter()
        .map(|(api, path, bodies)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                barrier.wait();
                let mut latencies = Vec::with_capacity(bodies.len());
                for body in &bodies {
                    let sent = Instant::now();
                    let response = api.send("POST", &path, Some(body))?;
                    latencies.push(sent.elapsed());
                    anyhow::ensure!(
                        response.status == 200,
                        "{path} answered {}: {}",
                        response.status,
                        response.body
                    );
                }
                Ok(latencies)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(writes);
    for thread in threads {
        let joined = thread.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        latencies.extend(joined?);
    }
    let elapsed = started.elapsed();
    let (commits_after, tasks_after) = commit_counts(&agent.api)?;
    let commits = commits_after - commits_before;
    let compactions = (tasks_after - tasks_before) - writes as f64;
    eprintln!(
        "  {clients} clients: {} commits, {} compaction tasks",
        commits,
        compactions.max(0.0)
    );
    latencies.sort();
    Ok(Row {
        path: "Cairn agent (HTTP, durable)",
        concurrency: clients,
        writes,
        elapsed,
        latencies,
        // Writes only, not the compactions sharing those commits, to compare with the
        // floor's rows per transaction.
        per_commit: (commits > 0.0).then(|| writes as f64 / commits),
    })
}

/// Opens a fresh SQLite file with the agent's durability settings and its `changes` table.
fn raw_database(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    anyhow::ensure!(mode == "wal", "{}: journal_mode is {mode}, not wal", path.display());
    conn.execute_batch(
        "CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            doc_id BLOB NOT NULL,
            data BLOB NOT NULL
        );
        CREATE INDEX changes_by_doc ON changes(doc_id, seq);",
    )?;
    Ok(conn)
}

/// Inserts `writes` rows of `changes` (cycled), `batch` rows per transaction.
fn raw_run(
    path: &Path,
    changes: &[Vec<u8>],
    writes: usize,
    batch: usize,
    label: &'static str,
) -> anyhow::Result<Row> {
    let mut conn = raw_database(path)?;
    let doc_id = [0x42u8; 16];
    let mut latencies = Vec::with_capacity(writes.div_ceil(batch));
    let started = Instant::now();
    let mut done = 0;
    while done < writes {
        let rows = batch.min(writes - done);
        let begun = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO changes (doc_id, data) VALUES (?1, ?2)")?;
            for i in done..done + rows {
                insert.execute(rusqlite::params![&doc_id[..], &changes[i % changes.len()]])?;
            }
        }
        tx.commit()?;
        latencies.push(begun.elapsed());
        done += rows;
    }
    let elapsed = started.elapsed();
    let stored: i64 = conn.query_row("SELECT COUNT(*) FROM changes", [], |row| row.get(0))?;
    anyhow::ensure!(
        usize::try_from(stored)? == writes,
        "{label}: {stored} rows, expected {writes}"
    );
    latencies.sort();
    Ok(Row {
        path: label,
        concurrency: 1,
        writes,
        elapsed,
        latencies,
        per_commit: Some(batch as f64),
    })
}

/// Change rows the agent still holds (compaction folds older ones into snapshots) and their
/// mean size: a check on the in-process estimate.
fn stored_change_sizes(database: &Path) -> anyhow::Result<(i64, f64)> {
    let conn =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", database.display()))?;
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(AVG(LENGTH(data)), 0) FROM changes",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?)
}

/// A rate with thousands separators.
fn group(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    thousands(value.max(0.0).round() as u64)
}

fn ms(value: Duration) -> String {
    format!("{:.2}", value.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("write-path-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    if let Err(error) = field_tests::process::binary("edge-agent") {
        anyhow::bail!(
            "{error:#}\nbuild the agent first, for the same profile as this benchmark: \
             cargo build --release -p edge-agent"
        );
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are not representative (use --release)");
    }
    let started = Instant::now();
    let changes = change_bytes(args.writes)?;
    let mean_bytes =
        changes.iter().map(Vec::len).sum::<usize>() as f64 / changes.len().max(1) as f64;
    eprintln!("in-process change bytes per edit: {mean_bytes:.1} on average");

    let dir = TestDir::new("write-path-bench")?;
    eprintln!("raw rusqlite: {} single-row commits", args.writes);
    let single = raw_run(
        &dir.path().join("raw-single.db"),
        &changes,
        args.writes,
        1,
        "raw rusqlite, 1 row/commit",
    )?;
    eprintln!("raw rusqlite: {} rows, {RAW_BATCH} per commit", args.writes);
    let batched = raw_run(
        &dir.path().join("raw-batched.db"),
        &changes,
        args.writes,
        RAW_BATCH,
        "raw rusqlite, 100 rows/commit",
    )?;
    let floor = single.rate();

    // Nothing listens on this port: the agent's dial loop backs off and stays quiet.
    let unreachable_hub = ([127, 0, 0, 1], free_udp_port()?).into();
    let agent = Agent::start(dir.path(), "agent", unreachable_hub)?;
    let mut rows = Vec::new();
    for &clients in &args.clients {
        eprintln!("agent: {} writes from {clients} client(s)", args.writes);
        let row = agent_run(&agent, clients, args.writes)?;
        eprintln!(
            "  {} writes/s, p50 {} ms, p99 {} ms",
            group(row.rate()),
            ms(quantile(&row.latencies, 0.5)),
            ms(quantile(&row.latencies, 0.99))
        );
        rows.push(row);
    }
    agent.terminate()?;
    let (stored_rows, stored_mean) = stored_change_sizes(&dir.path().join("agent/cairn.db"))?;
    rows.extend([single, batched]);

    println!("# Cairn local write path: durable agent writes vs raw SQLite\n");
    println!("Machine: {}", machine());
    let temp = std::env::temp_dir();
    println!(
        "Data under {}; SQLite journal_mode=WAL, synchronous=FULL everywhere; each write is \
         one Automerge change of two set ops, {mean_bytes:.0} bytes of change on average\n",
        temp.display(),
    );
    println!(
        "| path | concurrency | writes | writes/s | p50 ms | p99 ms | vs raw single-row \
         | writes per commit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2}× | {} |",
            row.path,
            row.concurrency,
            group(row.writes as f64),
            group(row.rate()),
            ms(quantile(&row.latencies, 0.5)),
            ms(quantile(&row.latencies, 0.99)),
            row.rate() / floor,
            row.per_commit.map_or_else(|| "?".into(), |w| format!("{w:.1}")),
        );
    }
    println!();
    println!(
        "Cairn: C client threads (blocking `cairn-client`, keep-alive HTTP/1.1 on 127.0.0.1), \
         each sending sequential POST /v1/docs/{{id}}/ops to a document of its own, each answered \
         once committed; latency is per request as the client sees it. The agent's commit also \
         upserts the document's heads and appends a change-feed row, and every {} changes of a \
         document it writes a snapshot (compaction); writes per commit is from its \
         `cairn_commit_batch_tasks` metric (group commit). Raw: one thread inserting the same \
         change bytes into a table shaped like the agent's `changes`; for 100 rows/commit, \
         p50/p99 are per transaction, which is when each of its rows became durable.",
        cairn_shared::config::SyncConfig::edge().compact_after_changes
    );
    println!(
        "Check: the agent's database still holds {} change rows (the rest were compacted), \
         {stored_mean:.1} bytes each on average.",
        thousands(u64::try_from(stored_rows).unwrap_or_default())
    );
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
