//! Measuring this node's capability profile: what placement knows about it.
//!
//! Measured at start and on every refresh: architecture, cores, free memory
//! (`/proc/meminfo`), free storage of the data directory (`statvfs`), power source and battery
//! level (`/sys/class/power_supply`), CPU load (`/proc/stat`, between two refreshes), and the
//! link to the hub from QUIC's own estimates ([`LinkMonitor`], fed by the connection pump).
//! The speed score comes from [`speed_benchmark`], a fixed workload run once at start.
//! Whatever the OS does not offer is reported as unknown (power) or left at a neutral value.
//!
//! [`ProfileOverride`] replaces measured values; it exists for tests and labs only, to give
//! nodes on one machine different capacities.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::NodeId;
use crate::placement::{
    CapabilityProfile, Link, Load, NodeRole, Power, MAX_SPEED_SCORE, MIN_SPEED_SCORE,
};

/// How long the speed benchmark runs.
pub const BENCHMARK_DURATION: Duration = Duration::from_millis(50);
/// Bytes hashed per work unit of the benchmark: one work unit is one SHA-256 of 64 KiB.
pub const WORK_UNIT_BYTES: usize = 64 * 1024;
/// Bandwidth assumed before QUIC has measured the link, in bytes per second (1 MB/s, a
/// modest uplink, so an unmeasured link is not mistaken for a fast one).
pub const UNMEASURED_BANDWIDTH_BYTES_PER_SEC: u64 = 1_000_000;
/// A hub's "link" is itself: inputs never move to it, so this only keeps the profile valid.
const HUB_BANDWIDTH_BYTES_PER_SEC: u64 = 1_000_000_000;

/// Values that replace measurements. For tests and labs only: it makes a node claim a
/// capacity it does not have.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileOverride {
    /// Speed score, in work units per second.
    pub speed_score: Option<f64>,
    /// Cores.
    pub cores: Option<u32>,
    /// Free memory, in bytes.
    pub memory_free_bytes: Option<u64>,
    /// Free storage, in bytes.
    pub storage_free_bytes: Option<u64>,
    /// Battery level in percent; set means "on battery".
    pub battery_percent: Option<u8>,
    /// Round-trip time to the hub, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Bandwidth to the hub, in bytes per second.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// CPU busy fraction.
    pub cpu: Option<f64>,
}

/// What the node's operator says about it (configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSettings {
    /// Agent or hub.
    pub role: NodeRole,
    /// Whether the link to the hub is billed by volume.
    pub metered: bool,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// The data directory, whose file system's free space is reported.
    pub data_dir: PathBuf,
    /// Test and lab overrides.
    pub overrides: ProfileOverride,
}

/// The link to the hub as QUIC last estimated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSample {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window over RTT, in bytes per second: what the sender may have in flight
    /// per round trip, an estimate of throughput.
    pub bandwidth_bytes_per_sec: u64,
}

/// Shared between the connection pump, which records samples, and the profile probe, which
/// reads the latest. A mutex, because a sample is two values that must stay together.
#[derive(Debug, Clone, Default)]
pub struct LinkMonitor {
    latest: Arc<Mutex<Option<LinkSample>>>,
}

impl LinkMonitor {
    /// A monitor with no sample yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records QUIC's current estimates for the hub connection.
    pub fn record(&self, rtt: Duration, congestion_window_bytes: u64) {
        let seconds = rtt.as_secs_f64().max(1e-3);
        let bandwidth = (congestion_window_bytes as f64 / seconds) as u64;
        let sample = LinkSample { rtt, bandwidth_bytes_per_sec: bandwidth.max(1) };
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(sample);
        }
    }

    /// Samples a live QUIC connection.
    pub fn sample(&self, connection: &quinn::Connection) {
        let stats = connection.stats();
        self.record(stats.path.rtt, stats.path.cwnd);
    }

    /// The latest sample, if any.
    pub fn latest(&self) -> Option<LinkSample> {
        self.latest.lock().ok().and_then(|latest| *latest)
    }
}

/// Measures the node's profile; keeps the benchmark score and the previous CPU counters.
#[derive(Debug)]
pub struct ProfileProbe {
    settings: ProfileSettings,
    link: LinkMonitor,
    speed: SpeedScore,
    cpu: CpuSampler,
}

/// The speed score: known, or being measured on a thread of its own.
#[derive(Debug)]
enum SpeedScore {
    Known(f64),
    Measuring(std::thread::JoinHandle<f64>),
}

impl ProfileProbe {
    /// Starts the speed benchmark on a thread of its own (it runs for
    /// [`BENCHMARK_DURATION`], which would otherwise delay the node's start) and takes a first
    /// CPU sample.
    pub fn new(settings: ProfileSettings, link: LinkMonitor) -> Self {
        let speed = match settings.overrides.speed_score {
            Some(score) => SpeedScore::Known(score),
            None => SpeedScore::Measuring(std::thread::spawn(speed_benchmark)),
        };
        Self { settings, link, speed, cpu: CpuSampler::new() }
    }

    /// The speed score, waiting for the benchmark the first time if it is still running.
    fn speed_score(&mut self) -> f64 {
        let score = match std::mem::replace(&mut self.speed, SpeedScore::Known(MIN_SPEED_SCORE)) {
            SpeedScore::Known(score) => score,
            SpeedScore::Measuring(benchmark) => benchmark.join().unwrap_or(MIN_SPEED_SCORE),
        };
        self.speed = SpeedScore::Known(score);
        score
    }

    /// The node's profile now. `queued_jobs` is its job load; `measured_at` the HLC time.
    pub fn measure(
        &mut self,
        node_id: NodeId,
        queued_jobs: u32,
        measured_at: u64,
    ) -> CapabilityProfile {
        let speed_score = self.speed_score();
        let o = &self.settings.overrides;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let link = self.link();
        let cpu = o.cpu.unwrap_or_else(|| self.cpu.busy_fraction()).clamp(0.0, 1.0);
        CapabilityProfile {
            node_id,
            role: self.settings.role,
            arch: std::env::consts::ARCH.to_owned(),
            cores: o.cores.unwrap_or(u32::try_from(cores).unwrap_or(u32::MAX)).max(1),
            speed_score: speed_score.clamp(MIN_SPEED_SCORE, MAX_SPEED_SCORE),
            memory_free_bytes: o.memory_free_bytes.or_else(memory_available).unwrap_or(0),
            storage_free_bytes: o
                .storage_free_bytes
                .or_else(|| storage_free(&self.settings.data_dir))
                .unwrap_or(0),
            power: match o.battery_percent {
                Some(level) => Power::Battery { level_percent: level.min(100) },
                None => power_source(Path::new(POWER_SUPPLY_DIR)),
            },
            link,
            load: Load { cpu, queued_jobs },
            labels: self.settings.labels.clone(),
            measured_at,
        }
    }

    fn link(&self) -> Link {
        let o = &self.settings.overrides;
        let metered = self.settings.metered;
        if self.settings.role == NodeRole::Hub {
            return Link {
                rtt_ms: 0,
                bandwidth_bytes_per_sec: HUB_BANDWIDTH_BYTES_PER_SEC,
                metered,
            };
        }
        let sample = self.link.latest();
        let rtt_ms = sample.map_or(0, |s| u32::try_from(s.rtt.as_millis()).unwrap_or(u32::MAX));
        let bandwidth =
            sample.map_or(UNMEASURED_BANDWIDTH_BYTES_PER_SEC, |s| s.bandwidth_bytes_per_sec);
        Link {
            rtt_ms: o.rtt_ms.unwrap_or(rtt_ms),
            bandwidth_bytes_per_sec: o.bandwidth_bytes_per_sec.unwrap_or(bandwidth).max(1),
            metered,
        }
    }
}

/// Work units per second of the whole node: SHA-256 over [`WORK_UNIT_BYTES`] blocks on one
/// thread for [`BENCHMARK_DURATION`], times the cores. A fixed workload, so scores compare
/// across nodes; jobs state their work in the same units.
pub fn speed_benchmark() -> f64 {
    let block = vec![0x5au8; WORK_UNIT_BYTES];
    let started = Instant::now();
    let mut units = 0u64;
    let mut digest = [0u8; 32];
    while started.elapsed() < BENCHMARK_DURATION {
        let mut hasher = Sha256::new();
        hasher.update(digest);
        hasher.update(&block);
        digest.copy_from_slice(&hasher.finalize());
        units += 1;
    }
    let per_thread = units as f64 / started.elapsed().as_secs_f64().max(1e-6);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    per_thread * cores as f64
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes available to unprivileged users on the file system holding `dir`.
fn storage_free(dir: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    stats.f_bavail.checked_mul(stats.f_frsize)
}

const POWER_SUPPLY_DIR: &str = "/sys/class/power_supply";

/// The power source from the kernel's power-supply class: a battery that is discharging
/// means battery power; a battery charging or an online mains supply means mains; no
/// supplies at all (most servers and containers) means the node cannot tell.
fn power_source(dir: &Path) -> Power {
    let Ok(entries) = std::fs::read_dir(dir) else { return Power::Unknown };
    let read = |path: PathBuf| std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned());
    let mut mains_online = false;
    let mut battery = None;
    for entry in entries.flatten() {
        let path = entry.path();
        match read(path.join("type")).as_deref() {
            Some("Battery") => {
                let level = read(path.join("capacity")).and_then(|c| c.parse::<u8>().ok());
                let discharging = read(path.join("status")).as_deref() == Some("Discharging");
                battery = battery.or(level.map(|level| (level.min(100), discharging)));
            }
            Some("Mains") => mains_online |= read(path.join("online")).as_deref() == Some("1"),
            _ => {}
        }
    }
    match battery {
        Some((level_percent, true)) if !mains_online => Power::Battery { level_percent },
        Some(_) => Power::Mains,
        None if mains_online => Power::Mains,
        None => Power::Unknown,
    }
}

/// CPU busy fraction between two reads of `/proc/stat`.
#[derive(Debug)]
struct CpuSampler {
    previous: Option<(u64, u64)>,
}

impl CpuSampler {
    fn new() -> Self {
        Self { previous: cpu_times() }
    }

    /// Busy share of CPU time since the previous call; 0 where `/proc/stat` is missing.
    fn busy_fraction(&mut self) -> f64 {
        let Some((busy, total)) = cpu_times() else { return 0.0 };
        let fraction = match self.previous {
            Some((busy0, total0)) if total > total0 => {
                busy.saturating_sub(busy0) as f64 / (total - total0) as f64
            }
            _ => 0.0,
        };
        self.previous = Some((busy, total));
        fraction.clamp(0.0, 1.0)
    }
}

/// (busy, total) jiffies of all CPUs: idle and iowait are not busy.
pub(crate) fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(overrides: ProfileOverride) -> ProfileSettings {
        ProfileSettings {
            role: NodeRole::Agent,
            metered: true,
            labels: BTreeMap::from([("camera".to_owned(), "yes".to_owned())]),
            data_dir: std::env::temp_dir(),
            overrides,
        }
    }

    #[test]
    fn a_measured_profile_is_valid_and_carries_the_settings() {
        let mut probe = ProfileProbe::new(settings(ProfileOverride::default()), LinkMonitor::new());
        let profile = probe.measure(NodeId::from_bytes([1; 16]), 3, 42);
        assert_eq!(profile.validate(), Ok(()));
        assert!(profile.speed_score > 1.0, "{}", profile.speed_score);
        assert!(profile.link.metered);
        assert_eq!(profile.load.queued_jobs, 3);
        assert_eq!(profile.labels["camera"], "yes");
        assert_eq!(profile.link.bandwidth_bytes_per_sec, UNMEASURED_BANDWIDTH_BYTES_PER_SEC);
    }

    #[test]
    fn overrides_and_link_samples_replace_measurements() {
        let link = LinkMonitor::new();
        link.record(Duration::from_millis(20), 200_000);
        let overrides = ProfileOverride {
            speed_score: Some(5.0),
            battery_percent: Some(15),
            rtt_ms: Some(80),
            ..ProfileOverride::default()
        };
        let mut probe = ProfileProbe::new(settings(overrides), link);
        let profile = probe.measure(NodeId::from_bytes([1; 16]), 0, 0);
        assert_eq!(profile.speed_score, 5.0);
        assert_eq!(profile.power, Power::Battery { level_percent: 15 });
        assert_eq!(profile.link.rtt_ms, 80);
        assert_eq!(profile.link.bandwidth_bytes_per_sec, 10_000_000, "200 kB per 20 ms");
    }

    #[test]
    fn power_supplies_are_read_from_sysfs() {
        let root = std::env::temp_dir().join(format!("cairn-power-{}", std::process::id()));
        let supply = |name: &str, files: &[(&str, &str)]| {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in files {
                std::fs::write(dir.join(file), text).unwrap();
            }
        };
        assert_eq!(power_source(&root), Power::Unknown);
        supply("BAT0", &[("type", "Battery\n"), ("capacity", "37\n"), ("status", "Discharging\n")]);
        assert_eq!(power_source(&root), Power::Battery { level_percent: 37 });
        supply("AC", &[("type", "Mains\n"), ("online", "1\n")]);
        assert_eq!(power_source(&root), Power::Mains);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
