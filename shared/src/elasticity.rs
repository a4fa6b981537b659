//! Elasticity: how many hub replicas the load calls for. The hub advises; it never starts
//! or stops anything itself.
//!
//! Every evaluation (one step, typically a fixed interval apart) feeds each of the hub's
//! [`LoadSignals`] to its own Holt forecaster (double exponential smoothing):
//!
//! ```text
//! level_t    = α·x_t + (1 − α)·(level_{t−1} + trend_{t−1})
//! trend_t    = β·(level_t − level_{t−1}) + (1 − β)·trend_{t−1}
//! forecast_h = level_t + h·trend_t            (h = horizon_steps)
//! ```
//!
//! The first observation sets the level with a zero trend. Each forecast becomes a replica
//! count. Agents, backlog and apply rate are demand that splits across replicas; CPU and
//! commit latency are measured per replica, so they are scaled by the replicas that
//! produced them (this assumes latency grows with per-replica load):
//!
//! ```text
//! desired_s = ceil(max(forecast_s, 0) / capacity_s)                  agents, backlog, apply rate
//! desired_s = ceil(replicas × max(forecast_s, 0) / target_s)          cpu, commit latency
//! demand    = clamp(max over s of desired_s, min_replicas, max_replicas)
//! ```
//!
//! The recommendation rises to the demand at once. Demand counts as lower only when it is
//! at least one replica below the recommendation and at most recommendation × (1 −
//! down_margin); after `down_stable_steps` consecutive lower evaluations the recommendation
//! falls to the highest demand seen during them, the smallest count that sufficed
//! throughout. Any evaluation that is not lower restarts the count. A burst is met at once;
//! a lull has to last before capacity goes, so noise around a boundary does not flap.

use serde::{Deserialize, Serialize};

/// Why a policy or a set of signals is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ElasticityError {
    /// A smoothing factor outside (0, 1].
    #[error("smoothing factors alpha and beta must be in (0, 1]")]
    Smoothing,
    /// A capacity or target that is not a positive finite number.
    #[error("per-replica capacities and targets must be positive and finite")]
    Capacity,
    /// Replica bounds that do not hold at least one replica.
    #[error("replica bounds must satisfy 1 <= min_replicas <= max_replicas")]
    Replicas,
    /// A margin outside [0, 1).
    #[error("down_margin must be in [0, 1)")]
    Margin,
    /// A signal that is negative or not a number.
    #[error("load signals must be finite and non-negative, with cpu at most 1")]
    Signals,
}

/// Holt's linear trend forecaster (see the module docs for the formula).
#[derive(Debug, Clone, PartialEq)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    level: f64,
    trend: f64,
    observed: bool,
}

impl Holt {
    /// A forecaster with level smoothing `alpha` and trend smoothing `beta`, each in (0, 1].
    pub fn new(alpha: f64, beta: f64) -> Result<Self, ElasticityError> {
        let unit = |x: f64| x > 0.0 && x <= 1.0;
        if !unit(alpha) || !unit(beta) {
            return Err(ElasticityError::Smoothing);
        }
        Ok(Self { alpha, beta, level: 0.0, trend: 0.0, observed: false })
    }

    /// Takes the next value of the series. A non-finite value is ignored, so one bad reading
    /// cannot poison every later forecast.
    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if !self.observed {
            self.level = value;
            self.observed = true;
            return;
        }
        let previous = self.level;
        self.level = self.alpha * value + (1.0 - self.alpha) * (self.level + self.trend);
        self.trend = self.beta * (self.level - previous) + (1.0 - self.beta) * self.trend;
    }

    /// The value expected `steps_ahead` observations from now.
    pub fn forecast(&self, steps_ahead: u32) -> f64 {
        self.level + f64::from(steps_ahead) * self.trend
    }

    /// The smoothed current value.
    pub fn level(&self) -> f64 {
        self.level
    }

    /// The smoothed change per step.
    pub fn trend(&self) -> f64 {
        self.trend
    }
}

/// One value per load signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerSignal<T> {
    /// Connected agents.
    pub connected_agents: T,
    /// Documents or changes waiting to sync.
    pub sync_backlog: T,
    /// Changes applied per second.
    pub apply_rate: T,
    /// Commit latency, in milliseconds.
    pub commit_latency: T,
    /// CPU busy fraction per replica.
    pub cpu: T,
}

impl<T> PerSignal<T> {
    /// All five values, in field order.
    pub fn values(&self) -> [&T; 5] {
        [
            &self.connected_agents,
            &self.sync_backlog,
            &self.apply_rate,
            &self.commit_latency,
            &self.cpu,
        ]
    }
}

/// The hub's load, as measured at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadSignals {
    /// Hub replicas running when this was measured; turns per-replica CPU and latency into
    /// demand.
    pub replicas: u32,
    /// Agents connected across all replicas.
    pub connected_agents: u32,
    /// Documents or changes waiting to sync.
    pub sync_backlog: u64,
    /// Changes applied per second.
    pub apply_rate_per_s: f64,
    /// Commit latency (p99), in milliseconds.
    pub commit_latency_ms: f64,
    /// CPU busy fraction, averaged over replicas, 0..=1.
    pub cpu: f64,
}

impl LoadSignals {
    /// Checks that every value is a finite, non-negative number, and CPU a fraction.
    pub fn validate(&self) -> Result<(), ElasticityError> {
        let rate_ok = self.apply_rate_per_s.is_finite() && self.apply_rate_per_s >= 0.0;
        let latency_ok = self.commit_latency_ms.is_finite() && self.commit_latency_ms >= 0.0;
        if !rate_ok || !latency_ok || !(0.0..=1.0).contains(&self.cpu) {
            return Err(ElasticityError::Signals);
        }
        Ok(())
    }

    fn per_signal(&self) -> PerSignal<f64> {
        PerSignal {
            connected_agents: f64::from(self.connected_agents),
            sync_backlog: self.sync_backlog as f64,
            apply_rate: self.apply_rate_per_s,
            commit_latency: self.commit_latency_ms,
            cpu: self.cpu,
        }
    }
}

/// What one replica can carry, and how eagerly to follow the load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalingPolicy {
    /// Agents one replica serves. Default 500.
    pub agents_per_replica: f64,
    /// Sync backlog one replica drains in reasonable time. Default 10 000.
    pub backlog_per_replica: f64,
    /// Changes per second one replica applies. Default 2 000.
    pub apply_rate_per_replica: f64,
    /// Commit latency to stay under, in milliseconds. Default 50.
    pub commit_latency_target_ms: f64,
    /// CPU fraction to keep each replica under, leaving headroom for bursts. Default 0.7.
    pub cpu_target: f64,
    /// Fewest replicas recommended. Default 1.
    pub min_replicas: u32,
    /// Most replicas recommended. Default 16.
    pub max_replicas: u32,
    /// How many steps ahead to forecast: how long a new replica takes to help. Default 3.
    pub horizon_steps: u32,
    /// Consecutive lower evaluations before scaling down. Default 6.
    pub down_stable_steps: u32,
    /// Demand must fall below recommendation × (1 − down_margin) to count as lower.
    /// Default 0.1.
    pub down_margin: f64,
    /// Level smoothing. Default 0.5.
    pub alpha: f64,
    /// Trend smoothing. Default 0.3.
    pub beta: f64,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        Self {
            agents_per_replica: 500.0,
            backlog_per_replica: 10_000.0,
            apply_rate_per_replica: 2_000.0,
            commit_latency_target_ms: 50.0,
            cpu_target: 0.7,
            min_replicas: 1,
            max_replicas: 16,
            horizon_steps: 3,
            down_stable_steps: 6,
            down_margin: 0.1,
            alpha: 0.5,
            beta: 0.3,
        }
    }
}

impl ScalingPolicy {
    /// Checks every knob.
    pub fn validate(&self) -> Result<(), ElasticityError> {
        let capacities = [
            self.agents_per_replica,
            self.backlog_per_replica,
            self.apply_rate_per_replica,
            self.commit_latency_target_ms,
            self.cpu_target,
        ];
        if !capacities.iter().all(|c| c.is_finite() && *c > 0.0) {
            return Err(ElasticityError::Capacity);
        }
        if self.min_replicas == 0 || self.min_replicas > self.max_replicas {
            return Err(ElasticityError::Replicas);
        }
        if !(0.0..1.0).contains(&self.down_margin) {
            return Err(ElasticityError::Margin);
        }
        Holt::new(self.alpha, self.beta).map(drop)
    }
}

/// One evaluation's answer, served to operators and as gauges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingAdvice {
    /// The signals evaluated.
    pub signals: LoadSignals,
    /// Each signal forecast `horizon_steps` ahead.
    pub forecasts: PerSignal<f64>,
    /// Replicas each forecast calls for.
    pub desired: PerSignal<u32>,
    /// The largest desired count, clamped to the policy's bounds.
    pub demand: u32,
    /// Consecutive evaluations with demand lower than the recommendation.
    pub lower_steps: u32,
    /// Replicas to run.
    pub recommended_replicas: u32,
}

/// Turns a stream of load signals into a replica recommendation.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: ScalingPolicy,
    forecasters: PerSignal<Holt>,
    recommended: u32,
    lower_steps: u32,
    lower_peak: u32,
}

impl Autoscaler {
    /// An autoscaler that starts by recommending `min_replicas`.
    pub fn new(policy: ScalingPolicy) -> Result<Self, ElasticityError> {
        policy.validate()?;
        let holt = Holt::new(policy.alpha, policy.beta)?;
        Ok(Self {
            forecasters: PerSignal {
                connected_agents: holt.clone(),
                sync_backlog: holt.clone(),
                apply_rate: holt.clone(),
                commit_latency: holt.clone(),
                cpu: holt,
            },
            recommended: policy.min_replicas,
            lower_steps: 0,
            lower_peak: 0,
            policy,
        })
    }

    /// Takes one step of signals and advises. Invalid signals change nothing.
    pub fn evaluate(&mut self, signals: &LoadSignals) -> Result<ScalingAdvice, ElasticityError> {
        signals.validate()?;
        let x = signals.per_signal();
        let f = &mut self.forecasters;
        f.connected_agents.observe(x.connected_agents);
        f.sync_backlog.observe(x.sync_backlog);
        f.apply_rate.observe(x.apply_rate);
        f.commit_latency.observe(x.commit_latency);
        f.cpu.observe(x.cpu);
        let h = self.policy.horizon_steps;
        let forecasts = PerSignal {
            connected_agents: f.connected_agents.forecast(h),
            sync_backlog: f.sync_backlog.forecast(h),
            apply_rate: f.apply_rate.forecast(h),
            commit_latency: f.commit_latency.forecast(h),
            cpu: f.cpu.forecast(h),
        };
        let desired = self.desired(&forecasts, signals.replicas);
        let demand = desired
            .values()
            .into_iter()
            .copied()
            .max()
            .unwrap_or(0)
            .clamp(self.policy.min_replicas, self.policy.max_replicas);
        self.settle(demand);
        Ok(ScalingAdvice {
            signals: *signals,
            forecasts,
            desired,
            demand,
            lower_steps: self.lower_steps,
            recommended_replicas: self.recommended,
        })
    }

    /// The current recommendation.
    pub fn recommended_replicas(&self) -> u32 {
        self.recommended
    }

    fn desired(&self, forecasts: &PerSignal<f64>, replicas: u32) -> PerSignal<u32> {
        let p = &self.policy;
        let split = |forecast: f64, capacity: f64| replicas_for(forecast / capacity);
        let measured =
            |forecast: f64, target: f64| replicas_for(f64::from(replicas) * forecast / target);
        PerSignal {
            connected_agents: split(forecasts.connected_agents, p.agents_per_replica),
            sync_backlog: split(forecasts.sync_backlog, p.backlog_per_replica),
            apply_rate: split(forecasts.apply_rate, p.apply_rate_per_replica),
            commit_latency: measured(forecasts.commit_latency, p.commit_latency_target_ms),
            cpu: measured(forecasts.cpu, p.cpu_target),
        }
    }

    /// Applies the hysteresis described in the module docs.
    fn settle(&mut self, demand: u32) {
        let current = self.recommended;
        let lower = demand < current
            && f64::from(demand) <= f64::from(current) * (1.0 - self.policy.down_margin);
        if demand > current || !lower {
            self.recommended = current.max(demand);
            self.lower_steps = 0;
            self.lower_peak = 0;
            return;
        }
        self.lower_steps += 1;
        self.lower_peak = self.lower_peak.max(demand);
        if self.lower_steps >= self.policy.down_stable_steps {
            self.recommended = self.lower_peak;
            self.lower_steps = 0;
            self.lower_peak = 0;
        }
    }
}

/// Whole replicas for a fractional demand; a negative forecast asks for none.
fn replicas_for(demand: f64) -> u32 {
    // `as` saturates, and `max` maps NaN to 0, so no input makes this wrap.
    demand.max(0.0).ceil() as u32
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn agents(connected_agents: u32, replicas: u32) -> LoadSignals {
        LoadSignals {
            replicas,
            connected_agents,
            sync_backlog: 0,
            apply_rate_per_s: 0.0,
            commit_latency_ms: 0.0,
            cpu: 0.0,
        }
    }

    /// Feeds agent counts, the operator following each recommendation.
    fn run(policy: ScalingPolicy, series: impl IntoIterator<Item = f64>) -> Vec<ScalingAdvice> {
        let mut scaler = Autoscaler::new(policy).unwrap();
        series
            .into_iter()
            .map(|count| {
                let signals = agents(count.round() as u32, scaler.recommended_replicas());
                scaler.evaluate(&signals).unwrap()
            })
            .collect()
    }

    fn recommendations(advice: &[ScalingAdvice]) -> Vec<u32> {
        advice.iter().map(|a| a.recommended_replicas).collect()
    }

    #[test]
    fn linear_series_forecast_converges_to_the_line() {
        for (alpha, beta) in [(0.5, 0.3), (0.2, 0.1), (0.9, 0.9), (1.0, 1.0)] {
            let mut holt = Holt::new(alpha, beta).unwrap();
            let line = |t: f64| 5.0 + 3.0 * t;
            for t in 0..400 {
                holt.observe(line(f64::from(t)));
            }
            for h in [1, 5, 10] {
                let expected = line(399.0 + f64::from(h));
                assert!((holt.forecast(h) - expected).abs() < 1e-6, "α={alpha} β={beta} h={h}");
            }
            assert!((holt.trend() - 3.0).abs() < 1e-9);
            assert!((holt.level() - line(399.0)).abs() < 1e-6);
        }
    }

    #[test]
    fn load_ramp_scales_up_during_the_rise_and_down_after_without_flapping() {
        let policy = ScalingPolicy { agents_per_replica: 250.0, ..ScalingPolicy::default() };
        let rise = (0..=100).map(|t| f64::from(t) * 20.0);
        let fall = (0..=100).rev().map(|t| f64::from(t) * 20.0);
        let rest = std::iter::repeat_n(0.0, 40);
        let recs = recommendations(&run(policy, rise.chain(fall).chain(rest)));

        assert!(recs[50] >= 4, "1000 agents need 4 replicas by mid-rise: {recs:?}");
        assert!(recs[100] >= 8, "2000 agents need 8 at the peak: {recs:?}");
        assert_eq!(recs.last(), Some(&1), "back to the minimum: {recs:?}");
        let mut directions: Vec<bool> =
            recs.windows(2).filter(|w| w[0] != w[1]).map(|w| w[1] > w[0]).collect();
        directions.dedup();
        assert_eq!(directions, [true, false], "one up-phase, then one down-phase: {recs:?}");
    }

    #[test]
    fn the_forecast_leads_a_ramp_and_scaling_down_waits_for_a_sustained_lull() {
        let policy = ScalingPolicy { agents_per_replica: 250.0, ..ScalingPolicy::default() };
        let stable = policy.down_stable_steps as usize;
        let rise = (0..=50).map(|t| f64::from(t) * 40.0);
        let fall = (0..50).rev().map(|t| f64::from(t) * 40.0);
        let advice = run(policy, rise.chain(fall).chain(std::iter::repeat_n(0.0, 20)));
        let (rising, falling) = (&advice[30], &advice[80]);
        let leads = |a: &ScalingAdvice| {
            a.forecasts.connected_agents - f64::from(a.signals.connected_agents)
        };
        assert!(leads(rising) > 0.0, "rising load is forecast higher: {rising:?}");
        assert!(leads(falling) < 0.0, "falling load is forecast lower: {falling:?}");
        assert!(rising.desired.connected_agents > rising.signals.connected_agents / 250);

        // Demand drops below the recommendation long before the recommendation follows.
        let first_lower = advice.iter().position(|a| a.demand < a.recommended_replicas).unwrap();
        let first_down = advice
            .windows(2)
            .position(|w| w[1].recommended_replicas < w[0].recommended_replicas)
            .map(|i| i + 1)
            .unwrap();
        assert!(first_down >= first_lower + stable - 1, "{first_lower} {first_down}");
        assert!(advice[first_lower..first_down].iter().all(|a| a.lower_steps > 0));
    }

    #[test]
    fn noisy_flat_load_settles_and_stays() {
        // ±5% around 1000 and 1500 agents crosses a 500-agent boundary at every step.
        for (level, crosses_boundary) in
            [(300.0, false), (1000.0, true), (1500.0, true), (2400.0, false)]
        {
            let noisy = (0..300).map(|t| level * if t % 2 == 0 { 1.05 } else { 0.95 });
            let advice = run(ScalingPolicy::default(), noisy);
            let recs = recommendations(&advice);
            assert!(recs[30..].iter().all(|&r| r == recs[30]), "level {level}: {recs:?}");
            let demands: BTreeSet<u32> = advice[30..].iter().map(|a| a.demand).collect();
            assert_eq!(demands.len() > 1, crosses_boundary, "level {level}: {demands:?}");
        }
    }

    #[test]
    fn invalid_policy_and_signals_are_refused() {
        assert_eq!(Holt::new(0.0, 0.5), Err(ElasticityError::Smoothing));
        assert_eq!(Holt::new(0.5, f64::NAN), Err(ElasticityError::Smoothing));
        let bad = ScalingPolicy { min_replicas: 4, max_replicas: 2, ..ScalingPolicy::default() };
        assert!(matches!(Autoscaler::new(bad), Err(ElasticityError::Replicas)));

        let mut scaler = Autoscaler::new(ScalingPolicy::default()).unwrap();
        let nan = LoadSignals { cpu: f64::NAN, ..agents(0, 1) };
        assert_eq!(scaler.evaluate(&nan), Err(ElasticityError::Signals));
        let advice = scaler.evaluate(&agents(1200, 1)).unwrap();
        assert_eq!(advice.desired.connected_agents, 3);
        assert_eq!(advice.recommended_replicas, 3);
        let json = serde_json::to_string(&advice).unwrap();
        assert_eq!(serde_json::from_str::<ScalingAdvice>(&json).unwrap(), advice);
    }
}
