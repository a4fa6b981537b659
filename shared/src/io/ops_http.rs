//! Operations endpoints every node serves: `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::driver::NodeHandle;
use super::store::CommitReport;
use crate::node::NodeStats;

/// The node's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    frames_received: Counter,
    frames_sent: Counter,
    bytes_sent: Counter,
    protocol_errors: Counter,
    clock_drift_rejections: Counter,
    changes_committed: Counter,
    document_reloads: Counter,
    document_loads: Counter,
    document_evictions: Counter,
    frames_compressed: Counter,
    saved_documents_adopted: Counter,
    admission_refusals: Counter,
    documents: Gauge,
    cached_documents: Gauge,
    cached_bytes: Gauge,
    quarantined_documents: Gauge,
    lag_to_hubs_seconds: Gauge<f64, AtomicU64>,
    lag_to_agents_seconds: Gauge<f64, AtomicU64>,
    ready_peers: Gauge,
    live_sync_states: Gauge,
    compact_sync_states: Gauge,
    queued_commands: Gauge,
    commit_latency_seconds: Histogram,
    commit_batch_tasks: Histogram,
    /// Hub load signals and replica advice (see `scaling`); zero where nothing feeds them.
    pub scaling: super::scaling::ScalingGauges,
    /// Hub-to-hub replication (see `backbone`); zero where there is no backbone.
    pub backbone: super::backbone_metrics::BackboneMetrics,
    /// Counters are fed by differences between status snapshots.
    last_stats: Mutex<NodeStats>,
}

impl Metrics {
    /// Registers every metric under the `cairn` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cairn");
        let metrics = Self {
            frames_received: Counter::default(),
            frames_sent: Counter::default(),
            bytes_sent: Counter::default(),
            protocol_errors: Counter::default(),
            clock_drift_rejections: Counter::default(),
            changes_committed: Counter::default(),
            document_reloads: Counter::default(),
            document_loads: Counter::default(),
            document_evictions: Counter::default(),
            frames_compressed: Counter::default(),
            saved_documents_adopted: Counter::default(),
            admission_refusals: Counter::default(),
            documents: Gauge::default(),
            cached_documents: Gauge::default(),
            cached_bytes: Gauge::default(),
            quarantined_documents: Gauge::default(),
            lag_to_hubs_seconds: Gauge::default(),
            lag_to_agents_seconds: Gauge::default(),
            ready_peers: Gauge::default(),
            live_sync_states: Gauge::default(),
            compact_sync_states: Gauge::default(),
            queued_commands: Gauge::default(),
            commit_latency_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_batch_tasks: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            last_stats: Mutex::new(NodeStats::default()),
            scaling: super::scaling::ScalingGauges::default(),
            backbone: super::backbone_metrics::BackboneMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "frames_received",
            "Frames received from peers",
            metrics.frames_received.clone(),
        );
        registry.register("frames_sent", "Frames sent to peers", metrics.frames_sent.clone());
        registry.register(
            "bytes_sent",
            "Bytes of frames sent to peers",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "protocol_errors",
            "Connections closed for protocol violations",
            metrics.protocol_errors.clone(),
        );
        registry.register(
            "clock_drift_rejections",
            "Peer timestamps refused for exceeding the allowed clock drift",
            metrics.clock_drift_rejections.clone(),
        );
        registry.register(
            "changes_committed",
            "Automerge changes committed to the store",
            metrics.changes_committed.clone(),
        );
        registry.register(
            "document_reloads",
            "Documents reloaded after Automerge panicked",
            metrics.document_reloads.clone(),
        );
        registry.register(
            "document_loads",
            "Documents read back from the store into memory",
            metrics.document_loads.clone(),
        );
        registry.register(
            "document_evictions",
            "Documents evicted from memory to stay within the cache budget",
            metrics.document_evictions.clone(),
        );
        registry.register(
            "frames_compressed",
            "Frames of batched sync messages sent compressed",
            metrics.frames_compressed.clone(),
        );
        registry.register(
            "saved_documents_adopted",
            "Whole saved documents loaded in a document's place and stored as they arrived",
            metrics.saved_documents_adopted.clone(),
        );
        registry.register(
            "replication_lag_to_hubs_seconds",
            "Age by HLC of the oldest committed change a connected hub has not acknowledged",
            metrics.lag_to_hubs_seconds.clone(),
        );
        registry.register(
            "replication_lag_to_agents_seconds",
            "Age by HLC of the oldest committed change a connected agent has not acknowledged",
            metrics.lag_to_agents_seconds.clone(),
        );
        registry.register(
            "admission_refusals",
            "Agent connections turned away by admission control and told when to come back",
            metrics.admission_refusals.clone(),
        );
        registry.register(
            "documents",
            "Committed documents, in memory or not",
            metrics.documents.clone(),
        );
        registry.register(
            "cached_documents",
            "Documents in memory",
            metrics.cached_documents.clone(),
        );
        registry.register(
            "cached_bytes",
            "Stored bytes of the documents in memory, bounded by document_cache_bytes",
            metrics.cached_bytes.clone(),
        );
        registry.register(
            "quarantined_documents",
            "Documents held back because they could not be loaded or merged within limits",
            metrics.quarantined_documents.clone(),
        );
        registry.register(
            "ready_peers",
            "Connected peers with a completed handshake",
            metrics.ready_peers.clone(),
        );
        registry.register(
            "live_sync_states",
            "Per-peer document sync states in memory with a sync under way",
            metrics.live_sync_states.clone(),
        );
        registry.register(
            "compact_sync_states",
            "Per-peer document sync states in memory kept as heads alone: settled, or offered and unanswered",
            metrics.compact_sync_states.clone(),
        );
        registry.register(
            "queued_commands",
            "Commands waiting for the node loop",
            metrics.queued_commands.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Duration of one group commit",
            metrics.commit_latency_seconds.clone(),
        );
        registry.register(
            "commit_batch_tasks",
            "Store tasks folded into one commit",
            metrics.commit_batch_tasks.clone(),
        );
        metrics.scaling.register(&mut registry);
        metrics.backbone.register(&mut registry);
        Self { registry, ..metrics }
    }

    /// Records one group commit (called from the store thread).
    pub fn observe_commit(&self, report: CommitReport) {
        self.commit_latency_seconds.observe(report.latency.as_secs_f64());
        self.commit_batch_tasks.observe(report.tasks as f64);
        self.scaling.observe_commit(report.latency);
    }

    fn refresh(&self, node: &NodeHandle) {
        let status = node.status();
        let Ok(mut last) = self.last_stats.lock() else {
            return;
        };
        let s = &status.stats;
        let pairs = [
            (&self.frames_received, s.frames_received, last.frames_received),
            (&self.frames_sent, s.frames_sent, last.frames_sent),
            (&self.bytes_sent, s.bytes_sent, last.bytes_sent),
            (&self.protocol_errors, s.protocol_errors, last.protocol_errors),
            (&self.clock_drift_rejections, s.clock_drift_rejections, last.clock_drift_rejections),
            (&self.changes_committed, s.changes_committed, last.changes_committed),
            (&self.document_reloads, s.document_reloads, last.document_reloads),
            (&self.document_loads, s.document_loads, last.document_loads),
            (&self.document_evictions, s.document_evictions, last.document_evictions),
            (&self.frames_compressed, s.frames_compressed, last.frames_compressed),
            (
                &self.saved_documents_adopted,
                s.saved_documents_adopted,
                last.saved_documents_adopted,
            ),
        ];
        for (counter, now, before) in pairs {
            counter.inc_by(now.saturating_sub(before));
        }
        *last = status.stats.clone();
        // Counted outside the core; the lock above keeps concurrent scrapes from counting twice.
        let refused = status.admission_refusals.saturating_sub(self.admission_refusals.get());
        self.admission_refusals.inc_by(refused);
        for (gauge, value) in [
            (&self.documents, status.documents),
            (&self.cached_documents, status.cached_documents),
            (&self.cached_bytes, status.cached_bytes),
            (&self.quarantined_documents, status.quarantined),
            (&self.live_sync_states, status.sync_states.0),
            (&self.compact_sync_states, status.sync_states.1),
        ] {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.ready_peers.set(i64::try_from(status.ready_peers).unwrap_or(i64::MAX));
        self.lag_to_hubs_seconds.set(status.lag_to_hubs.as_secs_f64());
        self.lag_to_agents_seconds.set(status.lag_to_agents.as_secs_f64());
        self.queued_commands.set(i64::try_from(status.queued_commands).unwrap_or(i64::MAX));
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self, node: &NodeHandle) -> String {
        self.refresh(node);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the operations endpoints look at.
#[derive(Debug, Clone)]
pub struct OpsState {
    /// The node.
    pub node: NodeHandle,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the node serves traffic; cleared when it starts shutting down.
    pub ready: Arc<AtomicBool>,
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn ops_router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.node.is_running() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "node stopped\n")
    }
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.node.is_running() && state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let body = state.metrics.render(&state.node);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}
