//! Whole runs: a cluster, a fault phase with client writes, then healing and the final checks.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sim::agenda::Event;
use crate::sim::checks;
use crate::sim::cluster::{Cluster, Spec, ANTI_ENTROPY};
use crate::sim::network::Faults;

/// Anti-entropy intervals after healing within which the cluster must go quiet. Going quiet
/// itself takes two intervals; the rest is the repair.
pub const SETTLE_BOUND_INTERVALS: u32 = 8;

/// Keeps the scenario's draws apart from the cluster's, though both come from the seed.
const SCENARIO_STREAM: u64 = 0x5CE7_A210;

/// Draws a scenario from a run's RNG.
pub type Draw = fn(&mut StdRng) -> Scenario;

/// What a run does.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The cluster.
    pub spec: Spec,
    /// Length of the fault phase, in anti-entropy intervals.
    pub fault_intervals: u32,
    /// Client write events (each may be a burst).
    pub writes: usize,
    /// The carrier's faults during the fault phase.
    pub faults: Faults,
    /// Links cut for a while.
    pub partitions: usize,
    /// Links that drop and reconnect.
    pub flaps: usize,
    /// Node crashes (each followed by a restart from the store).
    pub crashes: usize,
}

impl Scenario {
    /// A lossy, reordering, duplicating network with partitions and flaps; now and then a crash.
    pub fn lossy(rng: &mut StdRng) -> Self {
        Self {
            spec: spec(rng),
            fault_intervals: rng.gen_range(4..=8),
            writes: rng.gen_range(8..=24),
            faults: Faults {
                drop: rng.gen_range(0.0..0.25),
                duplicate: rng.gen_range(0.0..0.08),
                reorder: rng.gen_range(0.0..0.3),
                max_reorder: Duration::from_millis(rng.gen_range(1..=400)),
            },
            partitions: rng.gen_range(0..=3),
            flaps: rng.gen_range(0..=2),
            crashes: usize::from(rng.gen_bool(0.25)),
        }
    }

    /// Crashes above all (the hub too), on a milder network.
    pub fn crashy(rng: &mut StdRng) -> Self {
        Self {
            faults: Faults {
                drop: rng.gen_range(0.0..0.05),
                duplicate: 0.0,
                reorder: rng.gen_range(0.0..0.1),
                max_reorder: Duration::from_millis(100),
            },
            partitions: rng.gen_range(0..=1),
            flaps: 0,
            crashes: rng.gen_range(1..=3),
            ..Self::lossy(rng)
        }
    }

    /// A carrier without faults: frames arrive once and in order, only split and joined.
    pub fn calm(rng: &mut StdRng) -> Self {
        Self { faults: Faults::NONE, partitions: 0, flaps: 0, crashes: 0, ..Self::lossy(rng) }
    }

    fn fault_phase(&self) -> Duration {
        ANTI_ENTROPY * self.fault_intervals
    }

    /// Puts the fault phase's writes, partitions, flaps, crashes and the final heal on the agenda.
    fn schedule(&self, cluster: &mut Cluster, rng: &mut StdRng) {
        let nodes = self.spec.agents + 1;
        let links = self.spec.agents;
        let phase = self.fault_phase();
        let at = |rng: &mut StdRng| cluster_time(rng, phase);
        for _ in 0..self.writes {
            let event = Event::Write { node: rng.gen_range(0..nodes) };
            cluster.schedule(at(rng), event);
        }
        for _ in 0..self.partitions {
            let length = Duration::from_millis(rng.gen_range(300..=4_000));
            cluster.schedule(at(rng), Event::Partition { link: rng.gen_range(0..links), length });
        }
        for _ in 0..self.flaps {
            let outage = Duration::from_millis(rng.gen_range(50..=3_000));
            cluster.schedule(at(rng), Event::Flap { link: rng.gen_range(0..links), outage });
        }
        for _ in 0..self.crashes {
            let (when, node) = (at(rng), rng.gen_range(0..nodes));
            if rng.gen_bool(0.5) {
                // A write just before the crash leaves store tasks unanswered when it hits.
                cluster.schedule(when, Event::Write { node });
            }
            let in_flight = Duration::from_millis(rng.gen_range(0..=self.spec.max_store_delay_ms));
            let downtime = Duration::from_millis(rng.gen_range(100..=3_000));
            cluster.schedule(when + in_flight, Event::Crash { node, downtime });
        }
        cluster.schedule(phase, Event::Heal);
    }
}

fn cluster_time(rng: &mut StdRng, phase: Duration) -> Duration {
    Duration::from_millis(rng.gen_range(0..phase.as_millis() as u64))
}

fn spec(rng: &mut StdRng) -> Spec {
    Spec {
        agents: rng.gen_range(2..=4),
        // Up to the drift the nodes tolerate, and now and then beyond it.
        max_skew_ms: if rng.gen_bool(0.2) { 900 } else { 250 },
        max_store_delay_ms: rng.gen_range(0..=60),
        latency_ms: (rng.gen_range(1..=10), rng.gen_range(20..=120)),
    }
}

/// Figures of one run, to compare runs and report on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Steps the event loop took.
    pub steps: u64,
    /// Virtual time from healing to quiescence.
    pub settle: Duration,
    /// Writes submitted.
    pub writes: u64,
    /// Acknowledged writes.
    pub acks: usize,
    /// Documents at the end.
    pub documents: usize,
    /// Crashes.
    pub crashes: u64,
    /// Connections closed for breaking the protocol, summed over nodes.
    pub protocol_errors: u64,
    /// Final heads of every document, as hex, for comparing runs.
    pub final_heads: Vec<String>,
}

/// Runs one seed of a scenario through faults, healing and the final checks.
pub fn run(seed: u64, draw: Draw) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed ^ SCENARIO_STREAM);
    let scenario = draw(&mut rng);
    let mut cluster = Cluster::new(seed, &scenario.spec);
    cluster.connect_all();
    cluster.set_faults(scenario.faults);
    scenario.schedule(&mut cluster, &mut rng);
    settle(&mut cluster, scenario.fault_phase());
    outcome(&cluster)
}

/// Runs through the heal at `healed_by` and until quiescence, then checks the final state.
pub fn settle(cluster: &mut Cluster, healed_by: Duration) {
    let deadline = healed_by + ANTI_ENTROPY * SETTLE_BOUND_INTERVALS;
    if !cluster.run_until(deadline, Cluster::is_quiescent) {
        let closes = &cluster.ledger.closes_while_settling;
        cluster.fail(format!(
            "not quiescent {SETTLE_BOUND_INTERVALS} anti-entropy intervals after healing; closes since: {closes:?}"
        ));
    }
    checks::assert_converged(cluster);
}

fn outcome(cluster: &Cluster) -> Outcome {
    let hub = cluster.node(crate::sim::cluster::HUB);
    let final_heads =
        hub.catalog().map(|(doc_id, entry)| format!("{doc_id}:{:?}", entry.heads)).collect();
    Outcome {
        steps: cluster.steps,
        settle: cluster.settle_time().unwrap_or_default(),
        writes: cluster.ledger.writes,
        acks: cluster.ledger.acks.len(),
        documents: hub.document_count(),
        crashes: cluster.ledger.crashes,
        protocol_errors: (0..cluster.slots.len())
            .map(|i| cluster.node(i).stats().protocol_errors)
            .sum(),
        final_heads,
    }
}
