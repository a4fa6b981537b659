//! Ingest benchmark: replays the automerge-perf editing trace (259,778 single-character edits
//! of a LaTeX paper) in-process into a bare Automerge document, and end to end through a real
//! agent and hub (the agent-to-hub path: timed until the hub has committed everything), and
//! prints a Markdown table comparing the two. With `--fan-out` a second agent, B, follows the
//! hub and is timed too; the three nodes then share this machine's cores, which on a small
//! machine says more about the machine than about the path.
//!
//! Each end-to-end request carries a batch of splice ops (one Automerge change, answered only
//! once durable) and requests are sent one after another, because trace order matters: the
//! figures are for one sequential writer, so group commit has nothing to fold.
//!
//! With `--am-trace`, it also replays saved Automerge documents (the Eg-walker traces S1, C1,
//! C2 and A2): their changes, in causal order and in batches, are applied to a bare document
//! in process, and imported as raw change bytes into agent A, one durable merge per request,
//! until the hub (and B) has the saved document's heads. C1 and C2 are two users editing concurrently,
//! the expensive case for merges.
//!
//! Build the release binaries first: `cargo build --release --workspace --bins`, then
//! `cargo run --release -p field-tests --bin ingest-bench -- [--trace PATH] [--batch N[:EDITS] ...] [--limit N]
//! [--am-trace NAME_OR_PATH ...] [--am-batch N] [--fan-out]`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use automerge::transaction::Transactable;
use automerge::{AutoSerde, Automerge, Change, ObjType, ReadDoc, ROOT};
use field_tests::bench::{machine, proc_cpu, proc_status_kib, thousands};
use field_tests::client::{stream_body, StreamWrite};
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

/// Where the trace lives in a checkout, next to the repository.
const DEFAULT_TRACE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/automerge-traces/edits.json");

/// Length of the text the full trace produces.
const FULL_TRACE_TEXT_CHARS: usize = 104_852;

/// Edits replayed by default for batch sizes below [`SMALL_BATCH_THRESHOLD`]: every request
/// is one fsync on each node, so the whole trace would take many minutes.
const SMALL_BATCH_PREFIX: usize = 5_000;

/// Batch sizes below this get [`SMALL_BATCH_PREFIX`] unless an edit count is given.
const SMALL_BATCH_THRESHOLD: usize = 10;

/// Default runs: batch size and optional edit count.
const DEFAULT_RUNS: &[(usize, Option<usize>)] = &[(1, None), (100, None), (1000, None)];

/// In-process replays per run; the fastest is reported.
const RAW_REPEATS: usize = 3;

/// The collection the benchmark's document is created in.
const COLLECTION: &str = "bench";

/// How long agent B may take to catch up after A's last answer.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

/// The saved-document traces `--am-traces all` replays, found next to the edit trace.
const ALL_AM_TRACES: &[&str] = &["S1", "C1", "C2", "A2"];

/// Default number of changes per `.am` request (and per in-process `apply_changes`).
const DEFAULT_AM_BATCH: usize = 100;

/// Largest request body a `.am` batch may have: the API refuses bodies over 8 MiB, and a
/// margin keeps clear of it.
const MAX_AM_BODY_BYTES: usize = 7 * 1024 * 1024;

/// One edit of the trace: at `pos`, delete `delete` characters, then insert `insert`.
#[derive(Debug, Clone)]
struct Edit {
    pos: usize,
    delete: usize,
    insert: String,
}

/// One measured configuration.
#[derive(Debug, Clone, Copy)]
struct RunSpec {
    batch: usize,
    edits: usize,
    /// Whether the edit count was cut to a prefix by default (said so in the output).
    default_prefix: bool,
}

#[derive(Debug)]
struct Args {
    trace: PathBuf,
    runs: Vec<(usize, Option<usize>)>,
    limit: Option<usize>,
    /// Saved-document traces to replay, as names (next to the edit trace) or paths.
    am_traces: Vec<String>,
    am_batch: usize,
    /// Also run agent B, which the hub sends everything to, and time until B has it.
    fan_out: bool,
    /// Send the requests as one ordered write stream instead of one after another.
    stream: bool,
    /// End-to-end runs per configuration; the table shows the median run.
    repeat: usize,
}

const USAGE: &str = "\
usage: ingest-bench [--trace PATH] [--batch N[:EDITS][,N[:EDITS]...]]... [--limit N]
                    [--am-trace NAME_OR_PATH]... [--am-traces all] [--am-batch N] [--fan-out]
                    [--stream] [--repeat N]

  --trace PATH    automerge-perf edits.json (default: shared/data/automerge-traces/edits.json
                  next to the repository)
  --batch SPEC    edits per request (and per in-process transaction); repeatable or
                  comma-separated; N:EDITS replays only the first EDITS edits. Default:
                  1 (first 5000 edits), 100, 1000 (whole trace). Batch sizes below 10
                  replay the first 5000 edits unless EDITS or --limit is given.
  --limit N       replay at most the first N edits in every run
  --am-trace T    also replay a saved Automerge document's changes (S1, C1, C2, A2: names
                  resolve next to the edit trace; or a path); repeatable or comma-separated
  --am-traces all the same for S1, C1, C2 and A2
  --am-batch N    changes per request and per in-process apply for --am-trace (default 100)
  --fan-out       also run a second agent, B, that the hub forwards everything to, and time
                  until B has it (three nodes sharing this machine's cores)
  --stream        send the batches as one ordered write stream (POST /v1/docs/{id}/writes,
                  one line per batch) instead of one request after another's answer
  --repeat N      end-to-end runs per configuration, each with fresh nodes (default 1); the
                  table shows the run with the median hub-visible time, and every run's
                  hub-visible/raw ratio is listed below it";

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut trace = PathBuf::from(DEFAULT_TRACE);
    let mut runs = Vec::new();
    let mut limit = None;
    let mut am_traces = Vec::new();
    let mut am_batch = DEFAULT_AM_BATCH;
    let mut fan_out = false;
    let mut stream = false;
    let mut repeat = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--trace" => trace = PathBuf::from(value("--trace")?),
            "--batch" => {
                for spec in value("--batch")?.split(',').filter(|s| !s.is_empty()) {
                    runs.push(parse_batch_spec(spec)?);
                }
            }
            "--limit" => {
                let n: usize = value("--limit")?.parse().context("--limit")?;
                anyhow::ensure!(n > 0, "--limit must be positive");
                limit = Some(n);
            }
            "--am-trace" | "--am-traces" => {
                for name in value(&arg)?.split(',').filter(|s| !s.is_empty()) {
                    if name == "all" {
                        am_traces.extend(ALL_AM_TRACES.iter().map(|n| n.to_string()));
                    } else {
                        am_traces.push(name.to_owned());
                    }
                }
            }
            "--am-batch" => {
                am_batch = value("--am-batch")?.parse().context("--am-batch")?;
                anyhow::ensure!(am_batch > 0, "--am-batch must be positive");
            }
            "--fan-out" => fan_out = true,
            "--stream" => stream = true,
            "--repeat" => {
                repeat = value("--repeat")?.parse().context("--repeat")?;
                anyhow::ensure!(repeat > 0, "--repeat must be positive");
            }
            "-h" | "--help" => return Ok(None),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if runs.is_empty() {
        runs = DEFAULT_RUNS.to_vec();
    }
    Ok(Some(Args { trace, runs, limit, am_traces, am_batch, fan_out, stream, repeat }))
}

fn parse_batch_spec(spec: &str) -> anyhow::Result<(usize, Option<usize>)> {
    let (batch, edits) = match spec.split_once(':') {
        Some((batch, edits)) => (batch, Some(edits)),
        None => (spec, None),
    };
    let batch: usize = batch.parse().with_context(|| format!("batch size {batch:?}"))?;
    anyhow::ensure!(
        (1..=cairn_shared::ops::MAX_OPS_PER_CHANGE).contains(&batch),
        "batch size must be 1 to {}",
        cairn_shared::ops::MAX_OPS_PER_CHANGE
    );
    let edits = edits
        .map(|e| e.parse::<usize>().with_context(|| format!("edit count {e:?}")))
        .transpose()?;
    anyhow::ensure!(edits != Some(0), "edit count must be positive");
    Ok((batch, edits))
}

/// Parses the automerge-perf trace: a JSON array of `[pos, deleteCount, insertText...]`.
fn load_trace(path: &Path) -> anyhow::Result<Vec<Edit>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an automerge-perf edit trace", path.display()))
}

// Parsed straight into `Edit`s rather than through `serde_json::Value`, so the bench process
// does not keep a large freed heap that would inflate its RSS figures.
impl<'de> Deserialize<'de> for Edit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EditVisitor;
        impl<'de> Visitor<'de> for EditVisitor {
            type Value = Edit;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an edit [pos, deleteCount, insertText...]")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Edit, A::Error> {
                let pos = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let delete =
                    seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let mut insert = String::new();
                while let Some(part) = seq.next_element::<String>()? {
                    insert.push_str(&part);
                }
                Ok(Edit { pos, delete, insert })
            }
        }
        deserializer.deserialize_seq(EditVisitor)
    }
}

/// Result of an in-process replay.
#[derive(Debug)]
struct RawResult {
    elapsed: Duration,
    text: String,
    /// Peak RSS of this process during the replay (since start if the peak could not be reset).
    peak_rss_kib: Option<u64>,
    /// RSS just before the replay: the loaded trace and whatever the allocator kept.
    base_rss_kib: Option<u64>,
}

/// Replays `edits` into a fresh document, one transaction per `batch` edits.
fn raw_replay(edits: &[Edit], batch: usize) -> anyhow::Result<RawResult> {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let text = tx.put_object(ROOT, "text", ObjType::Text)?;
    tx.commit();
    let peak_reset = reset_own_peak_rss();
    let base_rss_kib = proc_status_kib("self", "VmRSS");
    let started = Instant::now();
    for chunk in edits.chunks(batch) {
        let mut tx = doc.transaction();
        for edit in chunk {
            let delete = isize::try_from(edit.delete)?;
            tx.splice_text(&text, edit.pos, delete, &edit.insert)?;
        }
        tx.commit();
    }
    let elapsed = started.elapsed();
    let peak_rss_kib = peak_reset.then(|| proc_status_kib("self", "VmHWM")).flatten();
    Ok(RawResult { elapsed, text: doc.text(&text)?, peak_rss_kib, base_rss_kib })
}

/// The fastest of [`RAW_REPEATS`] replays: a floor, less exposed to a noisy neighbour.
fn raw_floor(edits: &[Edit], batch: usize) -> anyhow::Result<RawResult> {
    let mut best = raw_replay(edits, batch)?;
    for _ in 1..RAW_REPEATS {
        let again = raw_replay(edits, batch)?;
        anyhow::ensure!(again.text == best.text, "replays of the same edits differ");
        best.elapsed = best.elapsed.min(again.elapsed);
        best.peak_rss_kib = best.peak_rss_kib.max(again.peak_rss_kib);
    }
    Ok(best)
}

/// Result of an end-to-end run.
#[derive(Debug)]
struct E2eResult {
    requests: usize,
    acked: Duration,
    /// Until the hub's heads index held A's final heads: the agent-to-hub path.
    hub_visible: Duration,
    /// Until agent B's heads index held them, with `--fan-out`.
    visible: Option<Duration>,
    hub_rss_kib: Option<u64>,
    a_rss_kib: Option<u64>,
    b_rss_kib: Option<u64>,
    /// CPU time the hub and A used while timed.
    hub_cpu: Duration,
    a_cpu: Duration,
}

/// Runs `run` `repeat` times and keeps the run with the median hub-visible time, with every
/// run's hub-visible time in the order they ran.
fn median_run(
    repeat: usize,
    mut run: impl FnMut() -> anyhow::Result<E2eResult>,
) -> anyhow::Result<(E2eResult, Vec<Duration>)> {
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(run()?);
    }
    let times: Vec<Duration> = runs.iter().map(|r| r.hub_visible).collect();
    runs.sort_by_key(|r| r.hub_visible);
    let median = runs.swap_remove(runs.len() / 2);
    Ok((median, times))
}

/// Every run's hub-visible rate over the raw rate, as listed under the tables.
fn run_ratios(work: usize, raw_rate: f64, times: &[Duration]) -> String {
    let ratios: Vec<String> =
        times.iter().map(|t| format!("{:.2}", rate(work, *t) / raw_rate)).collect();
    ratios.join(", ")
}

/// Replays `edits` on agent A in requests of `batch` splice ops and waits for agent B to
/// reach A's final heads with `expected` as its text.
fn end_to_end(
    edits: &[Edit],
    batch: usize,
    expected: &str,
    fan_out: bool,
    stream: bool,
) -> anyhow::Result<E2eResult> {
    let dir = TestDir::new(&format!("ingest-bench-{batch}"))?;
    let hub = Hub::start(dir.path(), "hub", free_udp_port()?)?;
    let a = Agent::start(dir.path(), "agent-a", hub.quic)?;
    let b = fan_out.then(|| Agent::start(dir.path(), "agent-b", hub.quic)).transpose()?;
    let id = a.api.create(COLLECTION, &json!({"text": ""}))?;
    // Discovery of the document is not what is measured: start once the hub (and B) have it.
    for api in std::iter::once(&hub.http).chain(b.as_ref().map(|b| &b.api)) {
        wait_for("the empty document to arrive", CATCH_UP_TIMEOUT, || committed_heads(api))?;
    }

    // Bodies are serialized up front so the clock measures the service, not this client.
    let batches: Vec<Value> = edits
        .chunks(batch)
        .map(|chunk| {
            let ops = chunk.iter().map(|e| {
                json!({"op": "splice", "path": ["text"], "index": e.pos,
                       "delete": e.delete, "text": e.insert})
            });
            Value::Array(ops.collect())
        })
        .collect();
    let requests = batches.len();
    let body = |ops: &Value| json!({ "ops": ops }).to_string().into_bytes();
    let mut bodies: Vec<Vec<u8>> = match stream {
        true => vec![stream_body(batches.iter().map(StreamWrite::Ops))],
        false => batches.iter().map(body).collect(),
    };
    drop(batches);

    let cpu_before = cpu_of(&hub, &a);
    let started = Instant::now();
    let heads = if stream {
        let body = bodies.pop().unwrap_or_default();
        let outcome = a.api.write_stream(&id, &body)?;
        if let Some((line, error)) = outcome.failed {
            anyhow::bail!("write {line} of the stream failed: {error}");
        }
        anyhow::ensure!(outcome.written == requests, "{} of {requests} written", outcome.written);
        outcome.heads
    } else {
        send_sequentially(&a.api, &id, &bodies, batch, edits.len(), started)?
    };
    let done = edits.len();
    let acked = started.elapsed();
    eprintln!(
        "  batch {batch}: all {done} edits acked by A in {:.2} s; waiting for the hub",
        acked.as_secs_f64()
    );
    let heads = sorted(heads);
    wait_for("the hub to commit A's final heads", CATCH_UP_TIMEOUT, || {
        committed_heads(&hub.http).filter(|h| *h == heads)
    })?;
    let hub_visible = started.elapsed();
    let (hub_cpu, a_cpu) = cpu_since(cpu_before, &hub, &a);
    let visible = match &b {
        Some(b) => {
            wait_for("agent B to commit A's final heads", CATCH_UP_TIMEOUT, || {
                committed_heads(&b.api).filter(|h| *h == heads)
            })?;
            check_text(&b.api, &id, "agent B", expected)?;
            Some(started.elapsed())
        }
        None => None,
    };
    check_text(&a.api, &id, "agent A", expected)?;
    check_text(&hub.http, &id, "the hub", expected)?;
    let [hub_rss_kib, a_rss_kib, b_rss_kib] = stop_nodes(hub, a, b)?;
    Ok(E2eResult {
        requests,
        acked,
        hub_visible,
        visible,
        hub_rss_kib,
        a_rss_kib,
        b_rss_kib,
        hub_cpu,
        a_cpu,
    })
}

/// Sends each edit request after the answer to the one before; returns the last heads.
fn send_sequentially(
    api: &ApiClient,
    id: &str,
    bodies: &[Vec<u8>],
    batch: usize,
    edits: usize,
    started: Instant,
) -> anyhow::Result<Vec<String>> {
    let path = format!("/v1/docs/{id}/ops");
    let step = bodies.len().div_ceil(10).max(1);
    let mut heads: Vec<String> = Vec::new();
    let mut done = 0;
    for (i, body) in bodies.iter().enumerate() {
        let response = api.send("POST", &path, Some(body))?;
        anyhow::ensure!(
            response.status == 200,
            "request {i} answered {}: {}",
            response.status,
            response.body
        );
        heads = serde_json::from_value(response.body["heads"].clone())
            .context("edit answer has no heads")?;
        done += batch.min(edits - i * batch);
        if (i + 1) % step == 0 && i + 1 < bodies.len() {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  batch {batch}: {:>3}% {done} edits acked in {secs:.1} s ({} edits/s)",
                (i + 1) * 100 / bodies.len(),
                group(done as f64 / secs)
            );
        }
    }
    Ok(heads)
}

fn check_text(api: &ApiClient, id: &str, node: &str, expected: &str) -> anyhow::Result<()> {
    let view = api.read(id)?.with_context(|| format!("{node} lost the document"))?;
    let text = view.doc["text"]
        .as_str()
        .with_context(|| format!("{node}: text is not a string: {}", view.doc))?;
    anyhow::ensure!(
        text == expected,
        "{node}'s text ({} chars) differs from the in-process replay ({} chars)",
        text.chars().count(),
        expected.chars().count()
    );
    Ok(())
}

/// A saved Automerge document cut into the batches that are replayed.
struct AmTrace {
    name: String,
    path: PathBuf,
    changes: usize,
    /// The saved document's heads, as sorted hex.
    heads: Vec<String>,
    /// Changes in causal order, `--am-batch` per batch, cut further where the raw bytes of a
    /// batch would not fit in one request body.
    batches: Vec<Vec<Change>>,
}

impl AmTrace {
    /// Changes after the first batch: the ones timed, since the first creates the document.
    fn timed_changes(&self) -> usize {
        self.changes - self.batches.first().map_or(0, Vec::len)
    }
}

/// Finds a saved-document trace: a path as given, else a name next to the edit trace, with or
/// without `.am`.
fn resolve_am_trace(name: &str, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let candidates =
        [PathBuf::from(name), data_dir.join(name), data_dir.join(format!("{name}.am"))];
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!("no Automerge trace {name:?} (nor {name}.am in {})", data_dir.display())
    })
}

fn load_am_trace(name: &str, data_dir: &Path, batch: usize) -> anyhow::Result<AmTrace> {
    let path = resolve_am_trace(name, data_dir)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc = Automerge::load(&bytes)
        .with_context(|| format!("{} is not an Automerge document", path.display()))?;
    let heads = sorted_hex(&doc.get_heads());
    let changes = doc.get_changes(&[]);
    let total = changes.len();
    anyhow::ensure!(total > 0, "{} has no changes", path.display());
    let mut batches: Vec<Vec<Change>> = Vec::new();
    let mut changes = changes.into_iter().peekable();
    while changes.peek().is_some() {
        let mut current = Vec::new();
        let mut size = 0;
        while let Some(change) = changes.next_if(|c| {
            current.len() < batch
                && (current.is_empty() || size + c.raw_bytes().len() <= MAX_AM_BODY_BYTES)
        }) {
            size += change.raw_bytes().len();
            current.push(change);
        }
        anyhow::ensure!(
            size <= MAX_AM_BODY_BYTES,
            "{}: one change is {size} bytes, more than a request may carry",
            path.display()
        );
        batches.push(current);
    }
    let name = path.file_stem().map_or_else(|| name.to_owned(), |s| s.to_string_lossy().into());
    Ok(AmTrace { name, path, changes: total, heads, batches })
}

fn sorted_hex(heads: &[automerge::ChangeHash]) -> Vec<String> {
    let mut hex: Vec<String> = heads.iter().map(ToString::to_string).collect();
    hex.sort();
    hex
}

/// The raw bytes of a batch's changes, one after another: what an incremental save holds.
fn change_bytes(batch: &[Change]) -> Vec<u8> {
    batch.iter().flat_map(|c| c.raw_bytes().iter().copied()).collect()
}

/// Result of an in-process `.am` replay.
struct AmRawResult {
    /// Time to apply every batch after the first.
    elapsed: Duration,
    /// The replayed document as the API materializes it.
    json: Value,
}

/// Applies the batches to a fresh document, one `apply_changes` per batch, timing all but the
/// first (which the end-to-end run spends creating the document).
fn am_raw_replay(trace: &AmTrace) -> anyhow::Result<AmRawResult> {
    // Changes are cloned before the clock starts: the copies are the input, not the work.
    let mut batches = trace.batches.clone().into_iter();
    let mut doc = Automerge::new();
    doc.apply_changes(batches.next().unwrap_or_default())?;
    let started = Instant::now();
    for batch in batches {
        doc.apply_changes(batch)?;
    }
    let elapsed = started.elapsed();
    let heads = sorted_hex(&doc.get_heads());
    anyhow::ensure!(
        heads == trace.heads,
        "{}: replaying its changes gave heads {heads:?}, the saved document has {:?}",
        trace.name,
        trace.heads
    );
    Ok(AmRawResult { elapsed, json: serde_json::to_value(AutoSerde::from(&doc))? })
}

fn am_raw_floor(trace: &AmTrace) -> anyhow::Result<AmRawResult> {
    let mut best = am_raw_replay(trace)?;
    for _ in 1..RAW_REPEATS {
        let again = am_raw_replay(trace)?;
        anyhow::ensure!(again.json == best.json, "{}: replays differ", trace.name);
        best.elapsed = best.elapsed.min(again.elapsed);
    }
    Ok(best)
}

/// Creates the document on agent A from the first batch, then imports every other batch into
/// A, one request at a time, and waits for agent B to reach the saved document's heads.
fn am_end_to_end(
    trace: &AmTrace,
    expected: &Value,
    fan_out: bool,
    stream: bool,
) -> anyhow::Result<E2eResult> {
    let dir = TestDir::new(&format!("ingest-bench-{}", trace.name))?;
    let hub = Hub::start(dir.path(), "hub", free_udp_port()?)?;
    let a = Agent::start(dir.path(), "agent-a", hub.quic)?;
    let b = fan_out.then(|| Agent::start(dir.path(), "agent-b", hub.quic)).transpose()?;
    // Bodies are built up front so the clock measures the service, not this client.
    let bodies: Vec<Vec<u8>> = trace.batches.iter().map(|batch| change_bytes(batch)).collect();
    let created = a.api.create_from_bytes(COLLECTION, &bodies[0])?;
    let id = created.id;
    let first_heads = {
        let mut heads = created.heads;
        heads.sort();
        heads
    };
    // Discovery of the document is not what is measured: start once the hub (and B) have
    // the first batch.
    for api in std::iter::once(&hub.http).chain(b.as_ref().map(|b| &b.api)) {
        wait_for("the first batch to arrive", CATCH_UP_TIMEOUT, || {
            committed_heads(api).filter(|heads| *heads == first_heads)
        })?;
    }

    let timed = bodies.len() - 1;
    let step = timed.div_ceil(10).max(1);
    let mut done = 0;
    let streamed =
        stream.then(|| stream_body(bodies[1..].iter().map(|b| StreamWrite::Automerge(b))));
    let cpu_before = cpu_of(&hub, &a);
    let started = Instant::now();
    if let Some(body) = streamed {
        let outcome = a.api.write_stream(&id, &body)?;
        if let Some((line, error)) = outcome.failed {
            anyhow::bail!("{}: write {line} of the stream failed: {error}", trace.name);
        }
        anyhow::ensure!(outcome.written == timed, "{} of {timed} written", outcome.written);
        done = trace.timed_changes();
    }
    for (i, (body, batch)) in bodies.iter().zip(&trace.batches).enumerate().skip(1) {
        if stream {
            break;
        }
        a.api
            .import(&id, body)
            .with_context(|| format!("{}: importing batch {i} into agent A", trace.name))?;
        done += batch.len();
        if i % step == 0 && i < timed {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  {}: {:>3}% {done} changes acked in {secs:.1} s ({} changes/s)",
                trace.name,
                i * 100 / timed,
                group(done as f64 / secs)
            );
        }
    }
    let acked = started.elapsed();
    eprintln!(
        "  {}: all {done} changes acked by A in {:.2} s; waiting for the hub",
        trace.name,
        acked.as_secs_f64()
    );
    wait_for("the hub to commit the saved document's heads", CATCH_UP_TIMEOUT, || {
        committed_heads(&hub.http).filter(|h| *h == trace.heads)
    })?;
    let hub_visible = started.elapsed();
    let (hub_cpu, a_cpu) = cpu_since(cpu_before, &hub, &a);
    let visible = match &b {
        Some(b) => {
            wait_for("agent B to commit the saved document's heads", CATCH_UP_TIMEOUT, || {
                committed_heads(&b.api).filter(|h| *h == trace.heads)
            })?;
            Some(started.elapsed())
        }
        None => None,
    };

    let nodes = [("agent A", Some(&a.api)), ("the hub", Some(&hub.http))];
    let b_node = ("agent B", b.as_ref().map(|b| &b.api));
    for (node, api) in nodes.into_iter().chain([b_node]) {
        let Some(api) = api else { continue };
        let view = api.read(&id)?.with_context(|| format!("{node} lost the document"))?;
        anyhow::ensure!(
            &view.doc == expected,
            "{}: {node}'s document differs from the in-process replay",
            trace.name
        );
    }
    let [hub_rss_kib, a_rss_kib, b_rss_kib] = stop_nodes(hub, a, b)?;
    Ok(E2eResult {
        requests: bodies.len(),
        acked,
        hub_visible,
        visible,
        hub_rss_kib,
        a_rss_kib,
        b_rss_kib,
        hub_cpu,
        a_cpu,
    })
}

/// Stops the nodes, B first; returns the peak RSS (KiB) of the hub, A and B, read just before.
fn stop_nodes(hub: Hub, a: Agent, b: Option<Agent>) -> anyhow::Result<[Option<u64>; 3]> {
    let peak = |pid: u32| proc_status_kib(&pid.to_string(), "VmHWM");
    let peaks = [peak(hub.pid()), peak(a.pid()), b.as_ref().and_then(|b| peak(b.pid()))];
    if let Some(b) = b {
        b.terminate()?;
    }
    a.terminate()?;
    hub.terminate()?;
    Ok(peaks)
}

/// The committed heads of the benchmark's one document on a node, sorted, from its heads
/// index: polling this costs the node no materialization of the document, which for the
/// larger traces would take a good share of a core at every poll.
fn committed_heads(api: &ApiClient) -> Option<Vec<String>> {
    let page = api.list(COLLECTION, None, 1).ok()?;
    page.docs.into_iter().next().map(|doc| sorted(doc.heads))
}

fn sorted(mut heads: Vec<String>) -> Vec<String> {
    heads.sort();
    heads
}

/// Replays every `.am` trace and prints their table.
fn am_runs(args: &Args, data_dir: &Path) -> anyhow::Result<()> {
    let batch = args.am_batch;
    let mut rows = Vec::new();
    let mut single = Vec::new();
    for name in &args.am_traces {
        let trace = load_am_trace(name, data_dir, batch)?;
        if trace.batches.len() == 1 {
            // The first batch only creates the document, untimed: there is nothing to measure.
            eprintln!(
                "{}: all {} changes fit in one batch of {batch}; not timed",
                trace.name, trace.changes
            );
            single.push(trace);
            continue;
        }
        eprintln!(
            "{} ({}): {} changes in {} batches",
            trace.name,
            trace.path.display(),
            trace.changes,
            trace.batches.len()
        );
        let raw = am_raw_floor(&trace)?;
        eprintln!(
            "  {}: in-process apply {:.3} s at best ({} changes/s)",
            trace.name,
            raw.elapsed.as_secs_f64(),
            group(rate(trace.timed_changes(), raw.elapsed))
        );
        let (e2e, times) = median_run(args.repeat, || {
            let e2e = am_end_to_end(&trace, &raw.json, args.fan_out, args.stream)?;
            eprintln!(
                "  {}: the hub has the saved document's heads after {:.2} s{}",
                trace.name,
                e2e.hub_visible.as_secs_f64(),
                b_after(&e2e)
            );
            Ok(e2e)
        })?;
        rows.push((trace, raw, e2e, times));
    }

    println!("\n## Saved Automerge documents, {batch} changes per batch\n");
    println!(
        "| trace | changes | batches | raw apply changes/s | e2e acked changes/s \
         | e2e hub-visible changes/s | e2e B-visible changes/s | hub-visible/raw \
         | B-visible/raw | A / hub CPU s | hub peak RSS MiB | A peak RSS MiB | B peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (trace, raw, e2e, _) in &rows {
        let timed = trace.timed_changes();
        let raw_rate = rate(timed, raw.elapsed);
        let hub_rate = rate(timed, e2e.hub_visible);
        let visible_rate = e2e.visible.map(|v| rate(timed, v));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {} | {} |",
            trace.name,
            group(trace.changes as f64),
            group(e2e.requests as f64),
            group(raw_rate),
            group(rate(timed, e2e.acked)),
            group(hub_rate),
            visible_rate.map_or_else(|| "-".into(), group),
            hub_rate / raw_rate,
            ratio(visible_rate, raw_rate),
            cpu_pair(e2e),
            mib(e2e.hub_rss_kib),
            mib(e2e.a_rss_kib),
            mib(e2e.b_rss_kib),
        );
    }
    for trace in &single {
        println!(
            "| {} | {} | 1 | - | - | - | - | - | - | - | - | - | - |",
            trace.name, trace.changes
        );
    }
    println!();
    if args.repeat > 1 {
        let lists: Vec<String> = rows
            .iter()
            .map(|(trace, raw, _, times)| {
                let timed = trace.timed_changes();
                let raw_rate = rate(timed, raw.elapsed);
                format!("{}: {}", trace.name, run_ratios(timed, raw_rate, times))
            })
            .collect();
        println!(
            "Median of {} end-to-end runs; hub-visible/raw of each run, in order: {}.",
            args.repeat,
            lists.join("; ")
        );
    }
    if !single.is_empty() {
        println!(
            "Traces with one batch only create the document, which is not timed; a smaller \
             --am-batch splits them if they have more than one change."
        );
    }
    println!(
        "Changes in causal order (`get_changes(&[])`), at most {batch} per batch (fewer where \
         a batch's bytes would pass {} MiB). The first batch creates the document and is not \
         timed; rates are over the other changes. Raw apply: in-process `apply_changes` per \
         batch into a fresh document, fastest of {RAW_REPEATS}. End to end: sequential \
         POST /v1/docs/{{id}}/automerge of each batch's raw change bytes to agent A, one \
         durable merge per request; acked is until A's last answer, hub-visible until the hub's \
         heads index holds the saved document's heads, B-visible until agent B's does (each \
         polled every 25 ms). B's and A's JSON equal the in-process replay's.",
        MAX_AM_BODY_BYTES / (1024 * 1024)
    );
    Ok(())
}

/// Resets this process's peak RSS to its current RSS, so each replay reports its own peak.
fn reset_own_peak_rss() -> bool {
    // "5" resets VmHWM (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The filesystem type and device holding `path`, since the cost of each fsync depends on it.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount).then(|| (mount.len(), format!("{fstype} ({device})")))
        })
        // The longest mount point wins; of equal ones, the last mounted.
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown filesystem".into(), |(_, fs)| fs)
}

/// A rate with thousands separators.
fn group(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    thousands(value.max(0.0).round() as u64)
}

/// "A / hub" CPU seconds while timed.
fn cpu_pair(e2e: &E2eResult) -> String {
    format!("{:.1} / {:.1}", e2e.a_cpu.as_secs_f64(), e2e.hub_cpu.as_secs_f64())
}

/// CPU time the hub and agent A have used so far.
fn cpu_of(hub: &Hub, a: &Agent) -> (Duration, Duration) {
    (proc_cpu(hub.pid()).unwrap_or_default(), proc_cpu(a.pid()).unwrap_or_default())
}

/// CPU time the hub and agent A used since `before`.
fn cpu_since(before: (Duration, Duration), hub: &Hub, a: &Agent) -> (Duration, Duration) {
    let (hub_now, a_now) = cpu_of(hub, a);
    (hub_now.saturating_sub(before.0), a_now.saturating_sub(before.1))
}

/// A rate over the raw rate, or "-" for a run that did not measure it.
fn ratio(rate: Option<f64>, raw_rate: f64) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{:.4}", r / raw_rate))
}

/// ", B after N s" for a run with agent B.
fn b_after(e2e: &E2eResult) -> String {
    e2e.visible.map_or_else(String::new, |v| format!(", B after {:.2} s", v.as_secs_f64()))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn rate(edits: usize, elapsed: Duration) -> f64 {
    edits as f64 / elapsed.as_secs_f64()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ingest-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    for name in ["cloud-hub", "edge-agent"] {
        if let Err(error) = field_tests::process::binary(name) {
            anyhow::bail!(
                "{error:#}\nbuild the binaries first, for the same profile as this benchmark: \
                 cargo build --release --workspace --bins"
            );
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are not representative (use --release)");
    }

    let trace_path = args.trace.canonicalize().unwrap_or(args.trace.clone());
    let trace = load_trace(&trace_path)?;
    let total_inserted: usize = trace.iter().map(|e| e.insert.chars().count()).sum();
    let total_deleted: usize = trace.iter().map(|e| e.delete).sum();
    eprintln!(
        "trace {}: {} edits ({} chars inserted, {} deleted)",
        trace_path.display(),
        trace.len(),
        total_inserted,
        total_deleted
    );
    // The whole trace must give the known text, or the edits were misread.
    let check = raw_replay(&trace, 1000)?;
    let chars = check.text.chars().count();
    anyhow::ensure!(
        chars == FULL_TRACE_TEXT_CHARS,
        "replaying the whole trace gave {chars} characters, expected {FULL_TRACE_TEXT_CHARS}"
    );
    eprintln!("whole-trace replay gives {chars} characters, as expected");

    let specs: Vec<RunSpec> = args
        .runs
        .iter()
        .map(|&(batch, edits)| {
            let default_prefix =
                edits.is_none() && args.limit.is_none() && batch < SMALL_BATCH_THRESHOLD;
            let wanted =
                edits.unwrap_or(if default_prefix { SMALL_BATCH_PREFIX } else { trace.len() });
            let edits = wanted.min(args.limit.unwrap_or(usize::MAX)).min(trace.len());
            RunSpec { batch, edits, default_prefix: default_prefix && edits < trace.len() }
        })
        .collect();

    let mut rows = Vec::new();
    for spec in &specs {
        let edits = &trace[..spec.edits];
        eprintln!(
            "batch {}: {} edits in {} requests",
            spec.batch,
            spec.edits,
            spec.edits.div_ceil(spec.batch)
        );
        let raw = raw_floor(edits, spec.batch)?;
        if spec.edits == trace.len() {
            anyhow::ensure!(
                raw.text.chars().count() == FULL_TRACE_TEXT_CHARS,
                "batch {}: replay gave {} characters, expected {FULL_TRACE_TEXT_CHARS}",
                spec.batch,
                raw.text.chars().count()
            );
        }
        eprintln!(
            "  batch {}: in-process replay {:.3} s at best ({} edits/s)",
            spec.batch,
            raw.elapsed.as_secs_f64(),
            group(rate(spec.edits, raw.elapsed))
        );
        let (e2e, times) = median_run(args.repeat, || {
            let e2e = end_to_end(edits, spec.batch, &raw.text, args.fan_out, args.stream)?;
            eprintln!(
                "  batch {}: the hub has A's final heads after {:.2} s{}",
                spec.batch,
                e2e.hub_visible.as_secs_f64(),
                b_after(&e2e)
            );
            Ok(e2e)
        })?;
        rows.push((*spec, raw, e2e, times));
    }

    println!("# Cairn ingest benchmark: automerge-perf editing trace\n");
    println!("Machine: {}", machine());
    println!("Trace: {} edits, final text {FULL_TRACE_TEXT_CHARS} characters", trace.len());
    let temp = std::env::temp_dir();
    println!(
        "Data directories under {} on {}; SQLite synchronous=FULL, each request fsynced \
         before it is answered\n",
        temp.display(),
        filesystem_of(&temp)
    );
    println!(
        "| batch | edits | requests | raw apply ops/s | e2e acked ops/s | e2e hub-visible ops/s \
         | e2e B-visible ops/s | acked/raw | hub-visible/raw | B-visible/raw | A / hub CPU s \
         | raw peak RSS MiB | hub peak RSS MiB | A peak RSS MiB | B peak RSS MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (spec, raw, e2e, _) in &rows {
        let raw_rate = rate(spec.edits, raw.elapsed);
        let acked_rate = rate(spec.edits, e2e.acked);
        let hub_rate = rate(spec.edits, e2e.hub_visible);
        let visible_rate = e2e.visible.map(|v| rate(spec.edits, v));
        println!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {:.4} | {:.4} | {} | {} | {} | {} | {} | {} |",
            spec.batch,
            group(spec.edits as f64),
            if spec.default_prefix { "*" } else { "" },
            group(e2e.requests as f64),
            group(raw_rate),
            group(acked_rate),
            group(hub_rate),
            visible_rate.map_or_else(|| "-".into(), group),
            acked_rate / raw_rate,
            hub_rate / raw_rate,
            ratio(visible_rate, raw_rate),
            cpu_pair(e2e),
            mib(raw.peak_rss_kib),
            mib(e2e.hub_rss_kib),
            mib(e2e.a_rss_kib),
            mib(e2e.b_rss_kib),
        );
    }
    println!();
    if args.repeat > 1 {
        let lists: Vec<String> = rows
            .iter()
            .map(|(spec, raw, _, times)| {
                let raw_rate = rate(spec.edits, raw.elapsed);
                format!("batch {}: {}", spec.batch, run_ratios(spec.edits, raw_rate, times))
            })
            .collect();
        println!(
            "Median of {} end-to-end runs; hub-visible/raw of each run, in order: {}.",
            args.repeat,
            lists.join("; ")
        );
    }
    if rows.iter().any(|(spec, _, _, _)| spec.default_prefix) {
        println!(
            "\\* First {SMALL_BATCH_PREFIX} edits only: each request is one durable change, \
             one fsync per node, so small batches over the whole trace take too long."
        );
    }
    println!(
        "Raw apply: in-process Automerge, one transaction per batch, no I/O, fastest of \
         {RAW_REPEATS} replays. End to end: \
         sequential POST /v1/docs/{{id}}/ops to agent A, one change per request; acked is \
         until A's last answer, hub-visible until the hub's heads index holds A's final heads, \
         B-visible until agent B's (through the hub) does (each polled every 25 ms), all from \
         the first request."
    );
    let bases: Vec<String> = rows
        .iter()
        .map(|(spec, raw, _, _)| format!("batch {}: {}", spec.batch, mib(raw.base_rss_kib)))
        .collect();
    println!(
        "Raw peak RSS is this process's VmHWM during the replay, including the loaded trace \
         (RSS before the replay, MiB: {}); hub, A and B peaks are their VmHWM just before \
         they were stopped.",
        bases.join(", ")
    );
    if !args.am_traces.is_empty() {
        let data_dir = trace_path.parent().unwrap_or(Path::new("."));
        am_runs(&args, data_dir)?;
    }
    Ok(())
}
