//! A node's capability profile: what it measured about itself, published for placement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Most operator labels on a profile or in a job's constraints.
pub const MAX_LABELS: usize = 64;
/// Longest label key, label value or architecture name, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// Slowest benchmark speed accepted, in work units per second. With the other bounds it
/// keeps every cost finite, so a score table always serializes.
pub const MIN_SPEED_SCORE: f64 = 1e-3;
/// Fastest benchmark speed accepted, in work units per second.
pub const MAX_SPEED_SCORE: f64 = 1e12;

/// Which kind of node a profile describes. Not [`crate::message::Role`]: application
/// clients never run jobs, and profiles are JSON, where roles are snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// An edge agent: holds only the documents it syncs.
    Agent,
    /// A hub: holds every document, so a job's inputs never move to it.
    Hub,
}

/// Where a node's power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    /// Wall power.
    Mains,
    /// A battery at this charge level (0..=100).
    Battery {
        /// Remaining charge, in percent.
        level_percent: u8,
    },
    /// The node could not tell.
    Unknown,
}

/// The node's link to its hub, as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Round-trip time to the hub, in milliseconds.
    pub rtt_ms: u32,
    /// Throughput from the hub, in bytes per second (positive).
    pub bandwidth_bytes_per_sec: u64,
    /// Whether traffic is billed by volume (for example a cellular modem).
    pub metered: bool,
}

/// How busy the node is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Fraction of CPU time busy, 0..=1.
    pub cpu: f64,
    /// Jobs accepted and not yet finished.
    pub queued_jobs: u32,
}

/// What a node can do, as it measured itself at `measured_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilityProfile {
    /// The node this profile describes.
    #[serde(with = "super::text_id")]
    pub node_id: NodeId,
    /// Agent or hub.
    pub role: NodeRole,
    /// CPU architecture as Rust names it, such as `aarch64` or `x86_64`.
    pub arch: String,
    /// CPU cores available to jobs (at least 1).
    pub cores: u32,
    /// Work units per second on a fixed micro-benchmark, for the node as a whole.
    pub speed_score: f64,
    /// Free memory, in bytes. Recorded for operators; jobs do not declare memory needs yet.
    pub memory_free_bytes: u64,
    /// Free storage, in bytes: a node cannot take a job whose inputs would not fit.
    pub storage_free_bytes: u64,
    /// Where power comes from.
    pub power: Power,
    /// The link to the hub.
    pub link: Link,
    /// Current load.
    pub load: Load,
    /// Operator labels, matched by jobs' `required_labels`.
    pub labels: BTreeMap<String, String>,
    /// When the node measured this, as an HLC time (NTP64).
    pub measured_at: u64,
}

/// Why a profile is refused: profiles arrive from the network.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    /// The speed is outside the accepted range, or not a number.
    #[error("speed_score must be a finite number in [{MIN_SPEED_SCORE}, {MAX_SPEED_SCORE}]")]
    SpeedScore,
    /// A node has no cores.
    #[error("cores must be at least 1")]
    Cores,
    /// CPU load is not a fraction.
    #[error("load.cpu must be a finite fraction in 0..=1")]
    Cpu,
    /// A link that carries nothing cannot be priced.
    #[error("link.bandwidth_bytes_per_sec must be positive")]
    Bandwidth,
    /// A charge level above 100 percent.
    #[error("battery level must be 0..=100 percent, got {0}")]
    BatteryLevel(u8),
    /// Empty or oversized architecture name.
    #[error("arch must be 1..={MAX_LABEL_BYTES} bytes")]
    Arch,
    /// Too many labels, or an oversized key or value.
    #[error("labels: at most {MAX_LABELS}, keys and values at most {MAX_LABEL_BYTES} bytes")]
    Labels,
}

impl CapabilityProfile {
    /// Checks every measured value; placement treats a profile that fails as ineligible.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if !(MIN_SPEED_SCORE..=MAX_SPEED_SCORE).contains(&self.speed_score) {
            return Err(ProfileError::SpeedScore);
        }
        if self.cores == 0 {
            return Err(ProfileError::Cores);
        }
        if !(0.0..=1.0).contains(&self.load.cpu) {
            return Err(ProfileError::Cpu);
        }
        if self.link.bandwidth_bytes_per_sec == 0 {
            return Err(ProfileError::Bandwidth);
        }
        if let Power::Battery { level_percent } = self.power {
            if level_percent > 100 {
                return Err(ProfileError::BatteryLevel(level_percent));
            }
        }
        if self.arch.is_empty() || self.arch.len() > MAX_LABEL_BYTES {
            return Err(ProfileError::Arch);
        }
        if !labels_within_bounds(&self.labels) {
            return Err(ProfileError::Labels);
        }
        Ok(())
    }
}

/// Whether a label map respects [`MAX_LABELS`] and [`MAX_LABEL_BYTES`].
pub(crate) fn labels_within_bounds(labels: &BTreeMap<String, String>) -> bool {
    labels.len() <= MAX_LABELS
        && labels.iter().all(|(k, v)| k.len() <= MAX_LABEL_BYTES && v.len() <= MAX_LABEL_BYTES)
}
