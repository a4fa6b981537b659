//! The hub's load signals and replica advice: every `interval`, sample the node's status and
//! CPU, feed them to [`Autoscaler`] (see [`crate::elasticity`] for the formula), and serve
//! the latest advice at `GET /v1/scaling` and as `cairn_scaling_*` gauges.
//!
//! Signals: connected agents (ready peers), sync backlog (commands waiting for the node
//! loop plus documents not yet acknowledged by a peer are not tracked separately, so the
//! queue length stands for it), apply rate (changes committed per second since the last
//! sample), commit latency (the slowest group commit since the last sample, in ms) and CPU
//! (busy fraction of the machine, from `/proc/stat`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::driver::NodeHandle;
use crate::elasticity::{Autoscaler, ElasticityError, LoadSignals, ScalingAdvice, ScalingPolicy};

/// The `[scaling]` configuration section of a hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingConfig {
    /// Time between evaluations, in milliseconds: one forecast step. Default 10 000.
    pub interval_ms: u64,
    /// Replicas of this hub running in the region now (the operator's deployment sets it).
    pub replicas: u32,
    /// Capacities, targets and smoothing.
    pub policy: ScalingPolicy,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self { interval_ms: 10_000, replicas: 1, policy: ScalingPolicy::default() }
    }
}

/// Gauges of the latest advice, registered with the node's metrics.
#[derive(Debug, Clone, Default)]
pub struct ScalingGauges {
    recommended_replicas: Gauge,
    demand_replicas: Gauge,
    connected_agents: Gauge,
    sync_backlog: Gauge,
    apply_rate_milli: Gauge,
    commit_latency_us: Gauge,
    cpu_permille: Gauge,
    forecast_agents: Gauge,
    forecast_apply_rate_milli: Gauge,
    /// Slowest commit since the last sample, in microseconds (fed by the store thread).
    slowest_commit_us: Arc<AtomicU64>,
}

impl ScalingGauges {
    /// Registers the gauges under `scaling_`.
    pub fn register(&self, registry: &mut Registry) {
        let gauges = [
            (
                "recommended_replicas",
                "Hub replicas recommended for this region",
                &self.recommended_replicas,
            ),
            (
                "demand_replicas",
                "Replicas the forecasts call for, before hysteresis",
                &self.demand_replicas,
            ),
            ("connected_agents", "Load signal: connected agents", &self.connected_agents),
            ("sync_backlog", "Load signal: commands waiting for the node loop", &self.sync_backlog),
            (
                "apply_rate_milli",
                "Load signal: changes committed per second, times 1000",
                &self.apply_rate_milli,
            ),
            (
                "commit_latency_us",
                "Load signal: slowest commit in the last interval, in microseconds",
                &self.commit_latency_us,
            ),
            ("cpu_permille", "Load signal: CPU busy, in permille", &self.cpu_permille),
            (
                "forecast_connected_agents",
                "Connected agents forecast at the horizon",
                &self.forecast_agents,
            ),
            (
                "forecast_apply_rate_milli",
                "Apply rate forecast at the horizon, times 1000",
                &self.forecast_apply_rate_milli,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(format!("scaling_{name}"), help, gauge.clone());
        }
    }

    /// Records one commit's latency (called from the store thread).
    pub fn observe_commit(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.slowest_commit_us.fetch_max(micros, Ordering::Relaxed);
    }

    fn take_slowest_commit(&self) -> Duration {
        Duration::from_micros(self.slowest_commit_us.swap(0, Ordering::Relaxed))
    }

    fn show(&self, advice: &ScalingAdvice) {
        let int = |x: f64| x.clamp(0.0, i64::MAX as f64) as i64;
        let s = &advice.signals;
        self.recommended_replicas.set(i64::from(advice.recommended_replicas));
        self.demand_replicas.set(i64::from(advice.demand));
        self.connected_agents.set(i64::from(s.connected_agents));
        self.sync_backlog.set(i64::try_from(s.sync_backlog).unwrap_or(i64::MAX));
        self.apply_rate_milli.set(int(s.apply_rate_per_s * 1000.0));
        self.commit_latency_us.set(int(s.commit_latency_ms * 1000.0));
        self.cpu_permille.set(int(s.cpu * 1000.0));
        self.forecast_agents.set(int(advice.forecasts.connected_agents));
        self.forecast_apply_rate_milli.set(int(advice.forecasts.apply_rate * 1000.0));
    }
}

/// The latest advice, shared between the sampling task and the HTTP handler.
#[derive(Debug, Clone, Default)]
pub struct Scaling {
    latest: Arc<Mutex<Option<ScalingAdvice>>>,
}

impl Scaling {
    /// The latest advice, if one evaluation has run.
    pub fn latest(&self) -> Option<ScalingAdvice> {
        self.latest.lock().ok().and_then(|latest| latest.clone())
    }

    /// Samples and evaluates every `config.interval_ms` until `shutdown` turns true.
    pub async fn run(
        self,
        config: ScalingConfig,
        node: NodeHandle,
        gauges: ScalingGauges,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ElasticityError> {
        let mut scaler = Autoscaler::new(config.policy.clone())?;
        let mut interval = tokio::time::interval(Duration::from_millis(config.interval_ms.max(1)));
        let mut previous = (Instant::now(), node.status().stats.changes_committed);
        let mut cpu = CpuTimes::read();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => return Ok(()),
            }
            let status = node.status();
            let elapsed = previous.0.elapsed().as_secs_f64().max(1e-3);
            let committed = status.stats.changes_committed;
            let now_cpu = CpuTimes::read();
            let signals = LoadSignals {
                replicas: config.replicas.max(1),
                connected_agents: u32::try_from(status.ready_peers).unwrap_or(u32::MAX),
                sync_backlog: status.queued_commands as u64,
                apply_rate_per_s: committed.saturating_sub(previous.1) as f64 / elapsed,
                commit_latency_ms: gauges.take_slowest_commit().as_secs_f64() * 1000.0,
                cpu: CpuTimes::busy_between(cpu, now_cpu),
            };
            previous = (Instant::now(), committed);
            cpu = now_cpu;
            match scaler.evaluate(&signals) {
                Ok(advice) => {
                    gauges.show(&advice);
                    if let Ok(mut latest) = self.latest.lock() {
                        *latest = Some(advice);
                    }
                }
                Err(error) => tracing::warn!(%error, "load signals refused"),
            }
        }
    }
}

/// `GET /v1/scaling`.
pub fn router(scaling: Scaling) -> Router {
    Router::new().route("/v1/scaling", get(show)).with_state(scaling)
}

async fn show(State(scaling): State<Scaling>) -> impl IntoResponse {
    match scaling.latest() {
        Some(advice) => Json(json!(advice)),
        None => Json(json!({"recommended_replicas": null, "reason": "no evaluation yet"})),
    }
}

/// (busy, total) CPU jiffies from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
struct CpuTimes(Option<(u64, u64)>);

impl CpuTimes {
    fn read() -> Self {
        Self(super::profile::cpu_times())
    }

    fn busy_between(before: Self, after: Self) -> f64 {
        match (before.0, after.0) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0) as f64 / (t1 - t0) as f64).clamp(0.0, 1.0)
            }
            _ => 0.0,
        }
    }
}
