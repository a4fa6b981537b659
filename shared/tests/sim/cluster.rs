//! The cluster: a hub and its agents, their stores, the links of a star, and the loop that
//! drives them all in virtual time.
//!
//! Everything a run does is drawn from one seeded RNG and happens in one deterministic order:
//! the earliest of the next scheduled event and the next node timer, ties to the timer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use automerge::{ActorId, ChangeHash};
use cairn_shared::config::SyncConfig;
use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::message::{Message, Role};
use cairn_shared::node::{ConnId, Input, Node, Output, RequestId, TaskId};
use cairn_shared::store_task::StoreTask;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sim::agenda::{Agenda, Event};
use crate::sim::checks;
use crate::sim::clock;
use crate::sim::network::{Delivery, Faults, Network};
use crate::sim::store::SimStore;
use crate::sim::workload;

mod clients;
mod links;

/// Index of the hub; agents follow.
pub const HUB: usize = 0;

/// Anti-entropy period of every simulated node.
pub const ANTI_ENTROPY: Duration = Duration::from_millis(1_000);

/// A connection that hears nothing for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_millis(2_000);

/// Chance that a client write is a burst of writes at one instant, which piles up store tasks.
const BURST: f64 = 0.3;
/// Chance that a client write creates a document rather than editing one.
const CREATE: f64 = 0.15;

/// The shape of a cluster.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Number of agents, each linked to the hub.
    pub agents: usize,
    /// Largest clock skew of a node, either way, in milliseconds.
    pub max_skew_ms: i64,
    /// Largest delay of one store task, in milliseconds.
    pub max_store_delay_ms: u64,
    /// Smallest and largest one-way latency, in milliseconds.
    pub latency_ms: (u64, u64),
}

/// What happened to client writes over a run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every acknowledged write.
    pub acks: Vec<Ack>,
    /// Documents whose creation was acknowledged.
    pub created: BTreeSet<DocId>,
    /// Writes submitted.
    pub writes: u64,
    /// Writes never answered because their node crashed.
    pub lost_to_crashes: u64,
    /// Crashes.
    pub crashes: u64,
    /// Connections closed after faults stopped, with the reason.
    pub closes_while_settling: Vec<String>,
}

/// An acknowledged write.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The node that acknowledged it.
    pub node: usize,
    /// The document.
    pub doc_id: DocId,
    /// The change the write made (none if it changed nothing).
    pub change: Option<ChangeHash>,
    /// The heads the acknowledgement reported.
    pub heads: Vec<ChangeHash>,
}

/// A write sent to a node and not yet answered.
#[derive(Debug)]
struct PendingWrite {
    doc_id: DocId,
    creates: bool,
    change: Option<ChangeHash>,
}

/// Phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Writes, faults and crashes happen.
    Faults,
    /// Faults stopped; the cluster must converge.
    Settling,
}

/// What a hostile test peer got back on its connection.
#[derive(Debug, Default)]
pub struct Probe {
    /// Bytes the node sent, concatenated.
    pub received: Vec<u8>,
    /// The node's reason, once it closed the connection.
    pub closed: Option<String>,
}

/// One node process and everything that outlives it.
#[derive(Debug)]
pub struct Slot {
    /// Its id.
    pub id: NodeId,
    role: Role,
    config: SyncConfig,
    skew_ms: i64,
    /// Bumped at every crash, so a store answer never reaches a later process.
    incarnation: u32,
    /// The running process, or `None` while crashed.
    pub node: Option<Node>,
    /// Its store.
    pub store: SimStore,
    writes: BTreeMap<RequestId, PendingWrite>,
    /// Anti-entropy rounds since any node stored anything.
    quiet_rounds: u32,
}

/// The whole simulated system.
#[derive(Debug)]
pub struct Cluster {
    /// The seed the run derives from.
    pub seed: u64,
    rng: StdRng,
    now: Duration,
    phase: Phase,
    healed_at: Option<Duration>,
    /// The nodes; the hub is `HUB`.
    pub slots: Vec<Slot>,
    net: Network,
    agenda: Agenda,
    next_request: RequestId,
    /// What clients saw.
    pub ledger: Ledger,
    probes: BTreeMap<(usize, ConnId), Probe>,
    max_store_delay_ms: u64,
    /// Recent happenings, kept only when `CAIRN_SIM_TRACE` is set.
    trace: Option<Vec<String>>,
    /// Steps taken, to tell runs apart.
    pub steps: u64,
}

impl Cluster {
    /// A cluster drawn from `seed`; nodes are running, links not yet connected.
    pub fn new(seed: u64, spec: &Spec) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = spec.agents + 1;
        let slots = (0..count).map(|index| Slot::draw(seed, index, spec, &mut rng)).collect();
        let latency: Vec<Vec<u64>> = (0..count)
            .map(|_| {
                (0..count).map(|_| rng.gen_range(spec.latency_ms.0..=spec.latency_ms.1)).collect()
            })
            .collect();
        let pairs: Vec<[usize; 2]> = (1..count).map(|agent| [HUB, agent]).collect();
        let mut cluster = Self {
            seed,
            rng,
            now: Duration::ZERO,
            phase: Phase::Faults,
            healed_at: None,
            slots,
            net: Network::new(&pairs, &latency),
            agenda: Agenda::default(),
            next_request: 1,
            ledger: Ledger::default(),
            probes: BTreeMap::new(),
            max_store_delay_ms: spec.max_store_delay_ms,
            trace: std::env::var_os("CAIRN_SIM_TRACE").map(|_| Vec::new()),
            steps: 0,
        };
        for index in 0..count {
            cluster.boot(index);
        }
        cluster
    }

    /// Connects every link now.
    pub fn connect_all(&mut self) {
        for link in 0..self.net.len() {
            self.link_up(link);
        }
    }

    /// Sets the carrier's fault rates.
    pub fn set_faults(&mut self, faults: Faults) {
        self.net.faults = faults;
    }

    /// Schedules an event.
    pub fn schedule(&mut self, at: Duration, event: Event) {
        self.agenda.schedule(at, event);
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// How long after healing the cluster went quiet, if it has healed.
    pub fn settle_time(&self) -> Option<Duration> {
        self.healed_at.map(|healed| self.now - healed)
    }

    /// Runs until `done` holds (true) or nothing is due before `deadline` (false).
    pub fn run_until(&mut self, deadline: Duration, done: fn(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            match self.next_moment() {
                Some(at) if at <= deadline => {
                    self.now = self.now.max(at);
                    self.step();
                }
                _ => {
                    self.now = deadline;
                    return false;
                }
            }
        }
    }

    /// Settled: faults are over, every node runs, every link is up, nothing is in flight or
    /// waiting for a store, and every node ran two anti-entropy rounds since anything changed.
    pub fn is_quiescent(&self) -> bool {
        self.phase == Phase::Settling
            && self.net.all_up()
            && self
                .slots
                .iter()
                .all(|s| s.node.is_some() && s.store.is_idle() && s.quiet_rounds >= 2)
            && !self.agenda.has_work_in_motion()
    }

    /// Never done: run to the deadline.
    pub fn never(&self) -> bool {
        false
    }

    /// Stops writes and faults, restarts crashed nodes and reconnects every link.
    pub fn heal(&mut self) {
        self.note(|| "heal".into());
        self.phase = Phase::Settling;
        self.healed_at = Some(self.now);
        // Quiet rounds counted before the heal say nothing about repair after it.
        for slot in &mut self.slots {
            slot.quiet_rounds = 0;
        }
        self.net.heal();
        for index in 0..self.slots.len() {
            self.restart(index);
        }
        self.connect_all();
    }

    /// Each node's state, for failure messages.
    pub fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .map(|(index, slot)| match &slot.node {
                Some(node) => {
                    format!("node {index}: {} ready peers, {:?}", node.ready_peers(), node.stats())
                }
                None => format!("node {index}: down"),
            })
            .collect();
        nodes.join("\n")
    }

    /// Panics with the seed, the message and, when tracing, the trace (its last 80 lines unless
    /// `CAIRN_SIM_TRACE=all`).
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        let mut text = format!("seed {}: {message}\n{}", self.seed, self.describe());
        if let Some(trace) = &self.trace {
            let all = std::env::var("CAIRN_SIM_TRACE").is_ok_and(|v| v == "all");
            let shown = if all { trace.len() } else { 80 };
            let _ = write!(text, "\nlast events:");
            for line in trace.iter().rev().take(shown).rev() {
                let _ = write!(text, "\n  {line}");
            }
        }
        panic!("{text}")
    }

    /// Records a line of trace when tracing is on.
    pub fn note(&mut self, line: impl FnOnce() -> String) {
        let now = self.now;
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>8.3}s {}", now.as_secs_f64(), line()));
        }
    }

    /// The running node at `index`.
    pub fn node(&self, index: usize) -> &Node {
        self.slots[index]
            .node
            .as_ref()
            .unwrap_or_else(|| self.fail(format!("node {index} is not running")))
    }

    fn next_moment(&self) -> Option<Duration> {
        [self.agenda.next_time(), self.next_timer().map(|(at, _)| at)].into_iter().flatten().min()
    }

    fn next_timer(&self) -> Option<(Duration, usize)> {
        let base = clock::base_instant();
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                Some((slot.node.as_ref()?.poll_timeout()?.duration_since(base), index))
            })
            .min()
    }

    fn step(&mut self) {
        self.steps += 1;
        let event_at = self.agenda.next_time();
        match self.next_timer() {
            Some((at, index)) if event_at.is_none_or(|e| at <= e) => self.fire_timer(index),
            _ => {
                if let Some(event) = self.agenda.pop() {
                    self.handle(event);
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrive { link, generation, to, bytes } => {
                let deliveries = self.net.arrive(
                    self.now,
                    (link, generation, to),
                    bytes,
                    &mut self.rng,
                    &mut self.agenda,
                );
                self.deliver(deliveries);
            }
            Event::Flush { link, generation, to } => {
                let deliveries = self.net.flush((link, generation, to));
                self.deliver(deliveries);
            }
            Event::LinkDown { link, generation, outage } => {
                if self.net.generation(link) == generation {
                    self.link_down(link, Some(outage));
                }
            }
            Event::LinkUp { link } => self.link_up(link),
            Event::StoreTick { node, incarnation } => self.store_tick(node, incarnation),
            Event::Write { node } => self.client_write(node),
            Event::Partition { link, length } if self.phase == Phase::Faults => {
                self.partition(link, length)
            }
            Event::Flap { link, outage } if self.phase == Phase::Faults => {
                self.link_down(link, Some(outage))
            }
            Event::Crash { node, downtime } if self.phase == Phase::Faults => {
                self.crash(node, downtime)
            }
            Event::Restart { node } => self.restart(node),
            Event::Heal => self.heal(),
            Event::Partition { .. } | Event::Flap { .. } | Event::Crash { .. } => {}
        }
    }

    fn deliver(&mut self, deliveries: Vec<Delivery>) {
        for (node, conn, bytes) in deliveries {
            self.drive(node, Input::Received { conn, bytes });
        }
    }

    // ---- Driving nodes ----

    fn boot(&mut self, index: usize) {
        let seed = self.seed;
        let slot = &mut self.slots[index];
        let max_drift = Duration::from_millis(slot.config.max_clock_drift_ms);
        let hlc = clock::hlc(identity(seed, index, slot.incarnation, 0x48), max_drift);
        // A fresh actor per process start: changes before and after a crash never share one.
        let actor = ActorId::from(identity(seed, index, slot.incarnation, 0xAC));
        clock::set_wall_clock(self.now, slot.skew_ms);
        let mut node = Node::new(slot.id, slot.role, actor, hlc, slot.config.clone());
        // As a real start does: only the heads index, documents load when needed.
        for (doc_id, entry) in slot.store.index() {
            node.restore(*doc_id, entry.clone());
        }
        slot.node = Some(node);
    }

    fn drive(&mut self, index: usize, input: Input) {
        let now = clock::base_instant() + self.now;
        let slot = &mut self.slots[index];
        let Some(node) = slot.node.as_mut() else {
            return;
        };
        clock::set_wall_clock(self.now, slot.skew_ms);
        node.handle_input(now, input);
        self.drain(index);
    }

    fn fire_timer(&mut self, index: usize) {
        let now = clock::base_instant() + self.now;
        let slot = &mut self.slots[index];
        let Some(node) = slot.node.as_mut() else {
            return;
        };
        clock::set_wall_clock(self.now, slot.skew_ms);
        node.handle_timeout(now);
        slot.quiet_rounds += 1;
        self.drain(index);
    }

    fn drain(&mut self, index: usize) {
        while let Some(output) = self.slots[index].node.as_mut().and_then(Node::poll_output) {
            match output {
                Output::Transmit { conn, bytes } => self.transmit(index, conn, bytes),
                Output::Close { conn, reason } => self.close(index, conn, reason),
                Output::Store { task, action } => self.enqueue_store(index, task, action),
                Output::Respond { id, result } => self.respond(index, id, result),
            }
        }
    }

    fn transmit(&mut self, index: usize, conn: ConnId, bytes: Vec<u8>) {
        if let Some(probe) = self.probes.get_mut(&(index, conn)) {
            probe.received.extend_from_slice(&bytes);
            return;
        }
        let messages = checks::audit_transmit(self, index, &bytes);
        let hello = messages.iter().any(|m| matches!(m, Message::Hello { .. }));
        let Some(at) = self.net.find(index, conn) else {
            return;
        };
        let copies = self.net.send(self.now, at, bytes, hello, &mut self.rng, &mut self.agenda);
        self.note(|| {
            let what: Vec<String> = messages.iter().map(checks::describe).collect();
            format!("node {index} sends {} on conn {conn} ({copies} copies)", what.join(" + "))
        });
    }

    // ---- Stores ----

    fn enqueue_store(&mut self, index: usize, task: TaskId, action: StoreTask) {
        // Something changed: quiescence needs two more quiet rounds everywhere.
        for slot in &mut self.slots {
            slot.quiet_rounds = 0;
        }
        if self.slots[index].store.enqueue(task, action) {
            self.schedule_store_tick(index);
        }
    }

    fn schedule_store_tick(&mut self, index: usize) {
        let delay = Duration::from_millis(self.rng.gen_range(0..=self.max_store_delay_ms));
        let incarnation = self.slots[index].incarnation;
        self.agenda.schedule(self.now + delay, Event::StoreTick { node: index, incarnation });
    }

    fn store_tick(&mut self, index: usize, incarnation: u32) {
        if self.slots[index].incarnation != incarnation {
            return;
        }
        let Some(((task, reply), more)) = self.slots[index].store.complete_next() else {
            return;
        };
        if more {
            self.schedule_store_tick(index);
        }
        self.drive(index, Input::StoreDone { task, reply });
    }

    // ---- Hostile peers ----

    /// Opens a connection to node `index` from an outside peer the test controls.
    pub fn attach_probe(&mut self, index: usize, peer: NodeId) -> ConnId {
        let conn = ConnId::MAX - self.probes.len() as ConnId;
        self.probes.insert((index, conn), Probe::default());
        self.drive(index, Input::Connected { conn, peer, restrict: None });
        conn
    }

    /// Bytes from the probe reach the node.
    pub fn probe_send(&mut self, index: usize, conn: ConnId, bytes: Vec<u8>) {
        self.drive(index, Input::Received { conn, bytes });
    }

    /// What the probe has seen.
    pub fn probe(&self, index: usize, conn: ConnId) -> &Probe {
        &self.probes[&(index, conn)]
    }
}

impl Slot {
    fn draw(seed: u64, index: usize, spec: &Spec, rng: &mut StdRng) -> Self {
        let role = if index == HUB { Role::Hub } else { Role::Agent };
        let preset = if index == HUB { SyncConfig::hub() } else { SyncConfig::edge() };
        let config = SyncConfig {
            anti_entropy_interval_ms: ANTI_ENTROPY.as_millis() as u64,
            // Small and varied, so that runs compact often and at different moments.
            compact_after_changes: rng.gen_range(2..=12),
            // Some nodes hold nothing they can evict, some only the documents in use, some
            // everything, so that loading on demand runs under every fault.
            // The simulated carrier models the transport's idle timeout itself, and counts
            // quiet rounds by timer calls, which pings would make meaningless.
            heartbeat_interval_ms: 0,
            document_cache_bytes: match rng.gen_range(0..4) {
                0 => 0,
                1 => 2048,
                _ => preset.document_cache_bytes,
            },
            ..preset
        };
        config.validate().expect("simulation config is valid");
        Self {
            id: NodeId::from_bytes(identity(seed, index, 0, 0x4E)),
            role,
            config,
            skew_ms: rng.gen_range(-spec.max_skew_ms..=spec.max_skew_ms),
            incarnation: 0,
            node: None,
            store: SimStore::default(),
            writes: BTreeMap::new(),
            quiet_rounds: 0,
        }
    }

    /// The node's configuration.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }
}

/// Sixteen bytes naming one node (and process start) of one run; `tag` keeps kinds apart and
/// keeps the bytes non-zero.
fn identity(seed: u64, index: usize, incarnation: u32, tag: u8) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[0] = tag;
    bytes[1] = u8::try_from(index).expect("fewer than 256 nodes");
    bytes[2..6].copy_from_slice(&incarnation.to_be_bytes());
    bytes[8..].copy_from_slice(&seed.to_be_bytes());
    bytes
}
