//! The job runner: publishes this node's profile, follows the system collections, asks the
//! [`JobBoard`] what to do, executes jobs and writes claims, progress and results back as
//! documents through the node.
//!
//! One task ticks every `poll_ms`: read the HLC time from the node, read the profile and job
//! documents the change feed says changed, republish the profile when `profile_refresh_ms`
//! has passed (or the load changed), then act on the board's decisions. Each claimed job runs
//! in its own task, at most `max_parallel` at once; claims beyond that wait as `queued`.
//! Execution is at-least-once: a node that restarts resumes its unfinished claims.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::driver::{DriverError, NodeHandle};
use super::profile::{LinkMonitor, ProfileOverride, ProfileProbe, ProfileSettings};
use super::store_reader::{FeedFilter, StoreReader, MAX_PAGE};
use crate::ids::{Collection, DocId};
use crate::jobs::operators::{self, BuiltIn, ExportParams};
use crate::jobs::{
    self, json_ops, Decision, JobBoard, JobView, ResultEntry, RunRecord, RunState, JOBS_COLLECTION,
    MAX_ERROR_BYTES, MAX_OUTPUT_BYTES, NODES_COLLECTION, RESULTS_COLLECTION,
};
use crate::node::{Request, RequestError, Response};
use crate::ops::{Op, PathSegment};
use crate::placement::{CapabilityProfile, NodeRole, PlacementPolicy};

/// How long a claimed job waits for its inputs to replicate to this node.
pub const INPUT_WAIT: Duration = Duration::from_secs(60);
/// How often it looks for them meanwhile.
const INPUT_POLL: Duration = Duration::from_millis(100);
/// Largest input handed to an executable on stdin, in bytes.
pub const MAX_EXECUTABLE_INPUT_BYTES: usize = 16 * 1024 * 1024;

/// An operator-declared executable a job of kind `exec:<name>` may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutableConfig {
    /// The program.
    pub path: PathBuf,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Killed after this long, in milliseconds. Default 30 000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Address-space limit, in bytes, enforced by running it under `prlimit --as` (util-linux);
    /// where `prlimit` is missing the job fails rather than run unlimited.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// The `[jobs]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Run jobs and publish a profile at all. Default true.
    pub enabled: bool,
    /// How often the runner looks for work, in milliseconds. Default 500.
    pub poll_ms: u64,
    /// How often the profile is republished even when nothing changed, in milliseconds; it
    /// is the heartbeat, so keep it well under the policy's `max_profile_age_s`. Default 10 000.
    pub profile_refresh_ms: u64,
    /// Jobs executing at once; 0 means one per core. Default 0.
    pub max_parallel: usize,
    /// Whether the link to the hub is billed by volume.
    pub metered: bool,
    /// Operator labels, matched by jobs' `required_labels`.
    pub labels: BTreeMap<String, String>,
    /// The cost model's knobs; every node should use the same.
    pub policy: PlacementPolicy,
    /// Allow-listed executables, by the name jobs use (`exec:<name>`).
    pub executables: BTreeMap<String, ExecutableConfig>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_ms: 500,
            profile_refresh_ms: 10_000,
            max_parallel: 0,
            metered: false,
            labels: BTreeMap::new(),
            policy: PlacementPolicy::default(),
            executables: BTreeMap::new(),
        }
    }
}

impl JobsConfig {
    /// Checks the values a runner cannot work with.
    pub fn validate(&self) -> Result<(), JobsConfigError> {
        self.policy.validate()?;
        if self.poll_ms == 0 || self.profile_refresh_ms == 0 {
            return Err(JobsConfigError::ZeroInterval);
        }
        if self.profile_refresh_ms / 1000 >= u64::from(self.policy.max_profile_age_s) {
            return Err(JobsConfigError::SlowHeartbeat);
        }
        Ok(())
    }
}

/// Why a `[jobs]` section is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JobsConfigError {
    /// The placement policy is out of bounds.
    #[error("jobs.policy: {0}")]
    Policy(#[from] crate::placement::PolicyError),
    /// An interval of zero would spin.
    #[error("jobs.poll_ms and jobs.profile_refresh_ms must be positive")]
    ZeroInterval,
    /// Profiles republished this rarely would go stale between heartbeats.
    #[error("jobs.profile_refresh_ms must be below jobs.policy.max_profile_age_s")]
    SlowHeartbeat,
}

/// Why a job could not be read, submitted or written.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The node refused or stopped.
    #[error(transparent)]
    Node(#[from] DriverError),
    /// The node answered something unexpected.
    #[error("unexpected answer from the node: {0}")]
    Unexpected(String),
    /// A store query failed.
    #[error("store: {0}")]
    Store(String),
}

/// The runner's shared state: the board, the probe and the node. The API reads it too.
#[derive(Debug, Clone)]
pub struct Jobs {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    node: NodeHandle,
    reader: Arc<StoreReader>,
    config: JobsConfig,
    /// Locked briefly by the runner's tick and by API handlers; never across an await.
    board: Mutex<JobBoard>,
    probe: Mutex<ProfileProbe>,
    /// The profile last measured, with the load as of the last tick.
    own: Mutex<Option<CapabilityProfile>>,
    /// The profile last written to this node's profile document by this process.
    published: Mutex<Option<CapabilityProfile>>,
    /// Jobs executing or waiting for a slot here.
    running: Mutex<BTreeSet<String>>,
    slots: Semaphore,
}

impl Jobs {
    /// Sets up the runner without starting it (the speed benchmark starts on its own thread).
    pub fn new(
        node: NodeHandle,
        reader: Arc<StoreReader>,
        config: JobsConfig,
        role: NodeRole,
        data_dir: PathBuf,
        overrides: ProfileOverride,
        link: LinkMonitor,
    ) -> Self {
        let mut labels = config.labels.clone();
        labels.extend(config.executables.keys().map(|name| operators::exec_label(name)));
        let settings =
            ProfileSettings { role, metered: config.metered, labels, data_dir, overrides };
        let probe = ProfileProbe::new(settings, link);
        let parallel = match config.max_parallel {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let board = JobBoard::new(node.node_id(), config.policy.clone());
        Self {
            inner: Arc::new(Shared {
                node,
                reader,
                config,
                board: Mutex::new(board),
                probe: Mutex::new(probe),
                own: Mutex::new(None),
                published: Mutex::new(None),
                running: Mutex::new(BTreeSet::new()),
                slots: Semaphore::new(parallel),
            }),
        }
    }

    /// The node this runner belongs to.
    pub fn node(&self) -> &NodeHandle {
        &self.inner.node
    }

    /// The store's read side.
    pub fn reader(&self) -> &Arc<StoreReader> {
        &self.inner.reader
    }

    /// A copy of the board as of the last tick.
    pub fn board(&self) -> JobBoard {
        lock(&self.inner.board).clone()
    }

    /// This node's current profile (measured now, with the board's load).
    pub fn own_profile(&self, now: u64) -> CapabilityProfile {
        let load = lock(&self.inner.board).load_here();
        let profile = lock(&self.inner.probe).measure(self.inner.node.node_id(), load, now);
        *lock(&self.inner.own) = Some(profile.clone());
        profile
    }

    /// Records a job this node just wrote, so the next placement counts it before the feed
    /// brings it back.
    pub fn observe_job(&self, job: JobView) {
        lock(&self.inner.board).observe_job(job);
    }

    /// The node's HLC time now (NTP64).
    pub async fn now(&self) -> Result<u64, JobsError> {
        match self.inner.node.request(Request::Status).await? {
            Response::Status(report) => Ok(report.clock.get_time().as_u64()),
            other => Err(JobsError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut cursors = [(NODES_COLLECTION, 0u64), (JOBS_COLLECTION, 0u64)];
        let mut published: Option<(u64, u32)> = None;
        let mut interval = tokio::time::interval(Duration::from_millis(self.inner.config.poll_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = self.tick(&mut cursors, &mut published).await {
                tracing::warn!(%error, "job runner tick failed");
                if matches!(error, JobsError::Node(DriverError::Stopped)) {
                    break;
                }
            }
        }
    }

    async fn tick(
        &self,
        cursors: &mut [(&'static str, u64); 2],
        published: &mut Option<(u64, u32)>,
    ) -> Result<(), JobsError> {
        for (collection, cursor) in cursors.iter_mut() {
            self.catch_up(collection, cursor).await?;
        }
        let now = self.now().await?;
        let own = self.own_profile(now);
        let refresh = self.inner.config.profile_refresh_ms.saturating_mul(1 << 32) / 1000;
        let due = published.is_none_or(|(at, load)| {
            now.saturating_sub(at) >= refresh || load != own.load.queued_jobs
        });
        if due {
            self.publish_profile(&own).await?;
            *published = Some((now, own.load.queued_jobs));
        }
        let decisions = {
            let board = lock(&self.inner.board);
            let running = lock(&self.inner.running).clone();
            let limit = board.policy().shed_queue_len as usize;
            let capacity = limit.saturating_sub(board.claimed_here());
            board.decide(&own, now, &running, capacity)
        };
        for decision in decisions {
            self.act(decision, now).await?;
        }
        self.confirm_all().await
    }

    /// Reads every document of `collection` the feed reports changed since `cursor`.
    async fn catch_up(&self, collection: &'static str, cursor: &mut u64) -> Result<(), JobsError> {
        let filter = FeedFilter::Collection(jobs::system_collection(collection));
        loop {
            let reader = self.inner.reader.clone();
            let (from, filter_now) = (*cursor, filter.clone());
            let events =
                tokio::task::spawn_blocking(move || reader.feed(from, &filter_now, MAX_PAGE))
                    .await
                    .map_err(|e| JobsError::Store(e.to_string()))?
                    .map_err(|e| JobsError::Store(e.to_string()))?;
            let Some(last) = events.last() else { return Ok(()) };
            *cursor = last.cursor;
            let changed: BTreeSet<DocId> =
                events.iter().filter_map(|event| event.doc_id.parse().ok()).collect();
            for doc_id in changed {
                let Some(doc) = read_doc(&self.inner.node, doc_id).await? else { continue };
                self.observe_doc(collection, &doc);
            }
            if events.len() < MAX_PAGE {
                return Ok(());
            }
        }
    }

    fn observe_doc(&self, collection: &str, doc: &Value) {
        let mut board = lock(&self.inner.board);
        if collection == NODES_COLLECTION {
            match jobs::profile_from_doc(doc) {
                Ok(profile) => board.observe_profile(profile),
                Err(error) => tracing::debug!(%error, "skipping a profile document"),
            }
        } else {
            match JobView::from_doc(doc) {
                Ok(job) => board.observe_job(job),
                Err(error) => tracing::debug!(%error, "skipping a job document"),
            }
        }
    }

    async fn publish_profile(&self, profile: &CapabilityProfile) -> Result<(), JobsError> {
        let doc_id = jobs::profile_doc_id(&profile.node_id);
        let collection = jobs::system_collection(NODES_COLLECTION);
        let previous = lock(&self.inner.published).clone();
        let ops = jobs::profile_ops(profile, previous.as_ref());
        write_doc(&self.inner.node, doc_id, &collection, ops).await?;
        *lock(&self.inner.published) = Some(profile.clone());
        lock(&self.inner.board).observe_profile(profile.clone());
        Ok(())
    }

    async fn act(&self, decision: Decision, now: u64) -> Result<(), JobsError> {
        let job_id = match decision {
            Decision::Claim { job_id, placement, replaced } => {
                let placement = replaced.then_some(placement);
                let run = RunRecord {
                    claimed_at: now,
                    state: RunState::Queued,
                    progress: 0.0,
                    updated_at: now,
                    error: None,
                    placement,
                };
                self.write_run(&job_id, &run).await?;
                tracing::info!(job = %job_id, "claimed a job");
                job_id
            }
            Decision::Resume { job_id } => {
                tracing::info!(job = %job_id, "resuming a claimed job");
                job_id
            }
        };
        lock(&self.inner.running).insert(job_id.clone());
        let runner = self.clone();
        tokio::spawn(async move {
            if let Err(error) = runner.execute(&job_id).await {
                tracing::warn!(job = %job_id, %error, "job could not be recorded");
            }
            lock(&runner.inner.running).remove(&job_id);
        });
        Ok(())
    }

    /// Writes this node's run record into the job's document and the board.
    async fn write_run(&self, job_id: &str, run: &RunRecord) -> Result<(), JobsError> {
        let me = self.inner.node.node_id();
        let doc_id = jobs::job_doc_id(job_id);
        edit(&self.inner.node, doc_id, JobView::run_ops(&me, run)).await?;
        let mut board = lock(&self.inner.board);
        if let Some(mut job) = board.job(job_id).cloned() {
            job.runs.insert(me, run.clone());
            board.observe_job(job);
        }
        Ok(())
    }

    async fn execute(&self, job_id: &str) -> Result<(), JobsError> {
        let _slot = self.inner.slots.acquire().await.map_err(|_| DriverError::Stopped)?;
        let me = self.inner.node.node_id();
        let Some(job) = lock(&self.inner.board).job(job_id).cloned() else { return Ok(()) };
        let Some(mut run) = job.runs.get(&me).cloned() else { return Ok(()) };
        run.state = RunState::Running;
        run.updated_at = self.now().await?;
        self.write_run(job_id, &run).await?;
        let outcome = match self.await_inputs(&job).await {
            Ok(()) => self.perform(&job).await,
            Err(error) => Err(error),
        };
        let finished_at = self.now().await?;
        run.updated_at = finished_at;
        match outcome {
            Ok(output) => {
                let entry = ResultEntry {
                    job_id: job_id.to_owned(),
                    node_id: me,
                    claimed_at: run.claimed_at,
                    finished_at,
                    output,
                };
                let mut view = job.clone();
                view.runs.insert(me, RunRecord { state: RunState::Done, ..run.clone() });
                let reported = view.reported().is_some_and(|(node, _)| node == me);
                self.write_result(&job, &entry, reported).await?;
                run.state = RunState::Done;
                run.progress = 1.0;
            }
            Err(error) => {
                run.state = RunState::Failed;
                run.error = Some(truncate(&error, MAX_ERROR_BYTES));
            }
        }
        self.write_run(job_id, &run).await?;
        tracing::info!(job = %job_id, state = ?run.state, "job finished");
        Ok(())
    }

    /// Writes this node's result, and as the reported one when `reported`.
    async fn write_result(
        &self,
        job: &JobView,
        entry: &ResultEntry,
        reported: bool,
    ) -> Result<(), JobsError> {
        let collection = jobs::system_collection(RESULTS_COLLECTION);
        let ops = entry.write_ops(reported);
        write_doc(&self.inner.node, job.record.result_doc, &collection, ops).await
    }

    /// Makes the result document report the earliest finished run when it is this node's
    /// and a concurrent write from another node won the `reported` key (after a partition
    /// healed). Reads one document; writes only when something is wrong.
    pub async fn confirm_reported(&self, job_id: &str) -> Result<(), JobsError> {
        let me = self.inner.node.node_id();
        let Some(job) = lock(&self.inner.board).job(job_id).cloned() else { return Ok(()) };
        if job.reported().is_none_or(|(node, _)| node != me) {
            return Ok(());
        }
        let Some(doc) = read_doc(&self.inner.node, job.record.result_doc).await? else {
            return Ok(());
        };
        let shown = ResultEntry::reported_in(&doc).map(|entry| entry.node_id);
        let Some(mine) = ResultEntry::all_in(&doc).remove(&me) else { return Ok(()) };
        if shown != Some(me) {
            self.write_result(&job, &mine, true).await?;
        }
        Ok(())
    }

    /// Waits until every input document has replicated here: placement charged for moving
    /// them, and moving them is what replication does.
    async fn await_inputs(&self, job: &JobView) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + INPUT_WAIT;
        for input in &job.record.spec.inputs {
            loop {
                match self.inner.node.request(Request::Exists { doc_id: input.doc_id }).await {
                    Ok(_) => break,
                    Err(DriverError::Request(RequestError::NotFound(_))) => {}
                    Err(error) => return Err(error.to_string()),
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "input {} did not arrive within {INPUT_WAIT:?}",
                        input.doc_id
                    ));
                }
                tokio::time::sleep(INPUT_POLL).await;
            }
        }
        Ok(())
    }

    /// Runs the job's kind and returns its output, or why it failed.
    async fn perform(&self, job: &JobView) -> Result<Value, String> {
        let record = &job.record;
        let kind = record.spec.kind.as_str();
        match BuiltIn::parse(kind) {
            Some(BuiltIn::WindowStats) => {
                let (_, doc) = self.single_input(job).await?;
                operators::window_stats(&doc, &record.params).map_err(|e| e.to_string())
            }
            Some(BuiltIn::ExportNdjson) => self.export(&record.params).await,
            Some(BuiltIn::Compact) => self.compact(job).await,
            None => match operators::exec_name(kind) {
                Some(name) => self.run_executable(name, job).await,
                None => Err(format!("unknown job kind {kind:?}")),
            },
        }
    }

    async fn single_input(&self, job: &JobView) -> Result<(DocId, Value), String> {
        let [input] = job.record.spec.inputs.as_slice() else {
            return Err("this kind takes exactly one input document".into());
        };
        let doc = read_doc(&self.inner.node, input.doc_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("input {} is not on this node", input.doc_id))?;
        Ok((input.doc_id, doc))
    }

    async fn export(&self, params: &Value) -> Result<Value, String> {
        let params = ExportParams::parse(params).map_err(|e| e.to_string())?;
        let collection: Collection = params.collection.parse().map_err(|e| format!("{e}"))?;
        let mut docs = Vec::new();
        let mut after = None;
        loop {
            let reader = self.inner.reader.clone();
            let c = collection.clone();
            let page = tokio::task::spawn_blocking(move || reader.list(&c, after, MAX_PAGE))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            for summary in &page {
                let id: DocId = summary.id.parse().map_err(|e| format!("{e}"))?;
                if let Some(doc) =
                    read_doc(&self.inner.node, id).await.map_err(|e| e.to_string())?
                {
                    docs.push((summary.id.clone(), doc));
                }
                if docs.len() > operators::MAX_EXPORT_DOCS {
                    return Err(format!("more than {} documents", operators::MAX_EXPORT_DOCS));
                }
            }
            match page.last() {
                Some(last) if page.len() == MAX_PAGE => after = last.id.parse().ok(),
                _ => break,
            }
        }
        operators::export_ndjson(collection.as_str(), &docs).map_err(|e| e.to_string())
    }

    /// Writes the input's current state as a fresh document with one change.
    async fn compact(&self, job: &JobView) -> Result<Value, String> {
        let node = &self.inner.node;
        let (input, _) = self.single_input(job).await?;
        let (collection, doc) = match node.request(Request::Read { doc_id: input }).await {
            Ok(Response::Document { collection, doc, .. }) => (collection, doc),
            other => return Err(format!("reading the input: {other:?}")),
        };
        let changes_before =
            match node.request(Request::History { doc_id: input, offset: 0, limit: 1 }).await {
                Ok(Response::History { total, .. }) => total,
                other => return Err(format!("reading the history: {other:?}")),
            };
        let bytes_before = export_len(node, input).await?;
        let target = jobs::compact_doc_id(job.id());
        let ops: Vec<Op> = doc
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(key, value)| json_ops(vec![PathSegment::Key(key.clone())], value))
            .collect();
        match node.request(Request::Create { doc_id: target, collection, ops }).await {
            Ok(_) | Err(DriverError::Request(RequestError::AlreadyExists(_))) => {}
            Err(error) => return Err(format!("writing the compacted copy: {error}")),
        }
        let bytes_after = export_len(node, target).await?;
        Ok(operators::compact_summary(
            &input.to_string(),
            changes_before,
            bytes_before,
            &target.to_string(),
            bytes_after,
        ))
    }

    async fn run_executable(&self, name: &str, job: &JobView) -> Result<Value, String> {
        let Some(exe) = self.inner.config.executables.get(name) else {
            return Err(format!("executable {name:?} is not allow-listed on this node"));
        };
        let mut inputs = Vec::new();
        for input in &job.record.spec.inputs {
            let doc = read_doc(&self.inner.node, input.doc_id).await.map_err(|e| e.to_string())?;
            inputs.push(json!({"id": input.doc_id.to_string(), "doc": doc}));
        }
        let stdin = json!({"job": job.record.spec, "params": job.record.params, "inputs": inputs})
            .to_string();
        if stdin.len() > MAX_EXECUTABLE_INPUT_BYTES {
            return Err(format!("input exceeds {MAX_EXECUTABLE_INPUT_BYTES} bytes"));
        }
        run_limited(exe, stdin.as_bytes()).await
    }

    /// Re-checks, for every finished job this node reported, that the result document shows
    /// it (after partitions heal, a concurrent write may have won).
    pub async fn confirm_all(&self) -> Result<(), JobsError> {
        let me = self.inner.node.node_id();
        let mine: Vec<String> = lock(&self.inner.board)
            .jobs()
            .values()
            .filter(|job| job.runs.len() > 1 && job.reported().is_some_and(|(n, _)| n == me))
            .map(|job| job.id().to_owned())
            .collect();
        for job_id in mine {
            self.confirm_reported(&job_id).await?;
        }
        Ok(())
    }
}

/// Runs an allow-listed executable with `input` on stdin; its stdout must be one JSON value.
async fn run_limited(exe: &ExecutableConfig, input: &[u8]) -> Result<Value, String> {
    let mut command = match exe.memory_bytes {
        Some(bytes) => {
            let mut command = tokio::process::Command::new("prlimit");
            command.arg(format!("--as={bytes}")).arg("--").arg(&exe.path);
            command
        }
        None => tokio::process::Command::new(&exe.path),
    };
    command
        .args(&exe.args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("starting {}: {e}", exe.path.display()))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let work = async {
        // Write and read together, so a program that answers before reading all its input
        // cannot deadlock on a full pipe.
        let write = async {
            let _ = stdin.write_all(input).await;
            drop(stdin);
        };
        let mut output = Vec::new();
        let mut limited = (&mut stdout).take(MAX_OUTPUT_BYTES as u64 + 1);
        let read = limited.read_to_end(&mut output);
        let ((), read) = tokio::join!(write, read);
        read.map_err(|e| e.to_string())?;
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, output))
    };
    let timeout = Duration::from_millis(exe.timeout_ms);
    let (status, output) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("timed out after {} ms", exe.timeout_ms))??;
    if output.len() > MAX_OUTPUT_BYTES {
        return Err(format!("output exceeds {MAX_OUTPUT_BYTES} bytes"));
    }
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    serde_json::from_slice(&output).map_err(|e| format!("output is not JSON: {e}"))
}

/// A document's materialized JSON, or `None` if it is not here (or deleted).
pub async fn read_doc(node: &NodeHandle, doc_id: DocId) -> Result<Option<Value>, JobsError> {
    match node.request(Request::Read { doc_id }).await {
        Ok(Response::Document { doc, .. }) => Ok(Some(doc)),
        Ok(other) => Err(JobsError::Unexpected(format!("{other:?}"))),
        Err(DriverError::Request(RequestError::NotFound(_) | RequestError::Deleted(_))) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Applies `ops` to a document, creating it in `collection` if it does not exist yet.
pub async fn write_doc(
    node: &NodeHandle,
    doc_id: DocId,
    collection: &Collection,
    ops: Vec<Op>,
) -> Result<(), JobsError> {
    match node.request(Request::Edit { doc_id, ops: ops.clone() }).await {
        Ok(_) => return Ok(()),
        Err(DriverError::Request(RequestError::NotFound(_))) => {}
        Err(error) => return Err(error.into()),
    }
    let create = Request::Create { doc_id, collection: collection.clone(), ops: ops.clone() };
    match node.request(create).await {
        Ok(_) => Ok(()),
        // Created meanwhile by a sync from a peer: edit what arrived.
        Err(DriverError::Request(RequestError::AlreadyExists(_))) => {
            node.request(Request::Edit { doc_id, ops }).await.map(drop).map_err(Into::into)
        }
        Err(error) => Err(error.into()),
    }
}

async fn edit(node: &NodeHandle, doc_id: DocId, ops: Vec<Op>) -> Result<(), JobsError> {
    node.request(Request::Edit { doc_id, ops }).await.map(drop).map_err(Into::into)
}

async fn export_len(node: &NodeHandle, doc_id: DocId) -> Result<usize, String> {
    match node.request(Request::Export { doc_id }).await {
        Ok(Response::Bytes(bytes)) => Ok(bytes.len()),
        other => Err(format!("exporting {doc_id}: {other:?}")),
    }
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Locks a mutex, recovering the data if a holder panicked: the board and probe hold plain
/// data that stays consistent between statements.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A started runner; stop it before stopping the node.
#[derive(Debug)]
pub struct RunnerTask {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunnerTask {
    /// Stops the runner loop. Jobs executing finish in their own tasks or end with the node.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// Sets up the jobs of a running node and, when `config.enabled`, starts the runner.
pub fn start(
    node: &super::runtime::RunningNode,
    config: JobsConfig,
    role: NodeRole,
    data_dir: PathBuf,
    overrides: ProfileOverride,
    link: LinkMonitor,
) -> (Jobs, RunnerTask) {
    let enabled = config.enabled;
    let jobs = Jobs::new(
        node.handle.clone(),
        node.reader.clone(),
        config,
        role,
        data_dir,
        overrides,
        link,
    );
    let (stop, stopped) = watch::channel(false);
    let task = enabled.then(|| tokio::spawn(jobs.clone().run(stopped)));
    (jobs, RunnerTask { stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str, timeout_ms: u64, memory_bytes: Option<u64>) -> ExecutableConfig {
        ExecutableConfig {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_ms,
            memory_bytes,
        }
    }

    #[tokio::test]
    async fn executables_answer_json_within_their_limits() {
        let echo = shell("cat", 5_000, None);
        assert_eq!(run_limited(&echo, b"{\"n\": 1}").await, Ok(json!({"n": 1})));
        let slow = shell("sleep 5", 100, None);
        let timed_out = run_limited(&slow, b"{}").await.unwrap_err();
        assert!(timed_out.contains("timed out"), "{timed_out}");
        let chatty = shell("head -c 300000 /dev/zero | tr '\\0' 'x'", 5_000, None);
        let too_much = run_limited(&chatty, b"{}").await.unwrap_err();
        assert!(too_much.contains("exceeds"), "{too_much}");
        let not_json = run_limited(&shell("echo hello", 5_000, None), b"{}").await.unwrap_err();
        assert!(not_json.contains("not JSON"), "{not_json}");
        let failing = run_limited(&shell("exit 3", 5_000, None), b"{}").await.unwrap_err();
        assert!(failing.contains("exited"), "{failing}");
    }

    #[tokio::test]
    async fn a_memory_limit_stops_a_greedy_executable() {
        if std::process::Command::new("prlimit").arg("--version").output().is_err() {
            return; // util-linux is not installed here; the runner then fails such jobs.
        }
        // 64 MiB of address space is too little for a shell that allocates a 200 MB string.
        let greedy = shell(
            "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo '{}'",
            10_000,
            Some(64 << 20),
        );
        assert!(run_limited(&greedy, b"{}").await.is_err());
        let modest = shell("cat", 10_000, Some(256 << 20));
        assert_eq!(run_limited(&modest, b"[1]").await, Ok(json!([1])));
    }

    #[test]
    fn the_config_refuses_a_heartbeat_slower_than_the_staleness_bound() {
        assert_eq!(JobsConfig::default().validate(), Ok(()));
        let slow = JobsConfig { profile_refresh_ms: 90_000, ..JobsConfig::default() };
        assert!(slow.validate().is_err());
    }
}
