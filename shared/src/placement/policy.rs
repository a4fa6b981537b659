//! The placement policy: the knobs of the cost model, and the model itself.

use serde::{Deserialize, Serialize};

use super::job::JobSpec;
use super::profile::{CapabilityProfile, Power};

/// Bytes in a mebibyte, the unit of the metered-link penalty.
const MIB: f64 = 1024.0 * 1024.0;
/// Largest penalty or penalty rate accepted, in seconds; keeps totals finite.
const MAX_PENALTY_S: f64 = 1e9;
/// Largest load weight accepted.
const MAX_LOAD_WEIGHT: f64 = 1e3;

/// How placement prices nodes. Costs are in seconds so that every term can be compared and
/// shown in one score table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlacementPolicy {
    /// A node on battery below this charge pays `battery_penalty_s`. Default 20.
    pub battery_threshold_percent: u8,
    /// Flat, because the risk (the device dying, its owner losing it) does not grow with the
    /// job's size. Default 600 s: a low battery is avoided unless the alternative is ten
    /// minutes slower.
    pub battery_penalty_s: f64,
    /// Charged per MiB moved over a metered link. Per byte rather than flat because metered
    /// links are billed by volume: a flat penalty would deter a 1 KiB move as much as a
    /// 1 GiB one. Default 1 s/MiB, ten times the transfer time of a 10 MB/s link.
    pub metered_penalty_s_per_mib: f64,
    /// A profile measured longer ago than this is stale and its node ineligible: the node
    /// may be gone. Default 60 s, a few publication intervals.
    pub max_profile_age_s: u32,
    /// How much CPU load slows a job: compute × (1 + cpu_weight × cpu). Default 1, so a
    /// fully busy node takes twice as long.
    pub cpu_weight: f64,
    /// How much queued work delays a job: compute × (1 + queue_weight × queued / cores).
    /// Default 1: one queued job per core doubles the time.
    pub queue_weight: f64,
    /// A node with at least this many queued jobs takes no new ones, so an overloaded node
    /// sheds work instead of only looking expensive. Default 8.
    pub shed_queue_len: u32,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            battery_threshold_percent: 20,
            battery_penalty_s: 600.0,
            metered_penalty_s_per_mib: 1.0,
            max_profile_age_s: 60,
            cpu_weight: 1.0,
            queue_weight: 1.0,
            shed_queue_len: 8,
        }
    }
}

/// Why a policy is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A penalty that is negative, too large, or not a number.
    #[error("penalties must be finite numbers in [0, {MAX_PENALTY_S}]")]
    Penalty,
    /// A load weight that is negative, too large, or not a number.
    #[error("load weights must be finite numbers in [0, {MAX_LOAD_WEIGHT}]")]
    LoadWeight,
    /// A charge threshold above 100 percent.
    #[error("battery_threshold_percent must be 0..=100")]
    BatteryThreshold,
    /// Zero would shed every job.
    #[error("shed_queue_len must be at least 1")]
    ShedQueueLen,
}

impl PlacementPolicy {
    /// Checks every knob; [`super::place`] refuses a policy that fails.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let penalty = |x: f64| (0.0..=MAX_PENALTY_S).contains(&x);
        let weight = |x: f64| (0.0..=MAX_LOAD_WEIGHT).contains(&x);
        if !penalty(self.battery_penalty_s) || !penalty(self.metered_penalty_s_per_mib) {
            return Err(PolicyError::Penalty);
        }
        if !weight(self.cpu_weight) || !weight(self.queue_weight) {
            return Err(PolicyError::LoadWeight);
        }
        if self.battery_threshold_percent > 100 {
            return Err(PolicyError::BatteryThreshold);
        }
        if self.shed_queue_len == 0 {
            return Err(PolicyError::ShedQueueLen);
        }
        Ok(())
    }

    /// Whether a profile measured at `measured_at` is too old at `now` (both NTP64).
    /// A profile from the future (clock skew) counts as fresh.
    pub(crate) fn is_stale(&self, measured_at: u64, now: u64) -> bool {
        // NTP64 keeps whole seconds in the upper 32 bits.
        let max_age = u64::from(self.max_profile_age_s) << 32;
        now.saturating_sub(measured_at) > max_age
    }

    /// Seconds the job would take on this node, slowed by its load.
    pub(crate) fn compute_s(&self, job: &JobSpec, node: &CapabilityProfile) -> f64 {
        let queued_per_core = f64::from(node.load.queued_jobs) / f64::from(node.cores.max(1));
        job.work_units / node.speed_score
            * (1.0 + self.cpu_weight * node.load.cpu)
            * (1.0 + self.queue_weight * queued_per_core)
    }

    /// Seconds for the missing inputs to reach the node, weighted by the job's sensitivity:
    /// the bytes over the node's link plus one round trip per document that moves.
    pub(crate) fn transfer_s(
        job: &JobSpec,
        node: &CapabilityProfile,
        bytes_to_move: u64,
        docs_to_move: usize,
    ) -> f64 {
        let bytes_s = bytes_to_move as f64 / node.link.bandwidth_bytes_per_sec as f64;
        let round_trips_s = docs_to_move as f64 * f64::from(node.link.rtt_ms) / 1000.0;
        job.sensitivity * (bytes_s + round_trips_s)
    }

    /// Seconds added for a low battery, and for bytes over a metered link.
    pub(crate) fn penalty_s(&self, node: &CapabilityProfile, bytes_to_move: u64) -> f64 {
        let battery = match node.power {
            Power::Battery { level_percent } if level_percent < self.battery_threshold_percent => {
                self.battery_penalty_s
            }
            _ => 0.0,
        };
        let metered = if node.link.metered {
            self.metered_penalty_s_per_mib * bytes_to_move as f64 / MIB
        } else {
            0.0
        };
        battery + metered
    }
}
