//! Links between nodes with per-direction latency, a lossy carrier (drop, duplicate, reorder),
//! partitions, and a byte stream that arrives split and joined at random.
//!
//! Faults act on whole `Transmit`s, which are whole frames, so a lost frame never leaves a
//! half frame in the receiver's buffer; hellos are spared (see [`Network::send`]). Splitting and
//! joining act on the bytes delivered, in order, which is what any stream transport may do.

use std::time::Duration;

use cairn_shared::node::ConnId;
use rand::rngs::StdRng;
use rand::Rng;

use crate::sim::agenda::{Agenda, End, Event};

/// Probabilities of the carrier's faults, per transmitted frame.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// The frame is lost.
    pub drop: f64,
    /// The frame arrives twice.
    pub duplicate: f64,
    /// The frame is delayed by up to `max_reorder`, so later frames may overtake it.
    pub reorder: f64,
    /// The largest extra delay of a reordered frame.
    pub max_reorder: Duration,
}

impl Faults {
    /// A carrier that delivers every frame once, in order.
    pub const NONE: Faults =
        Faults { drop: 0.0, duplicate: 0.0, reorder: 0.0, max_reorder: Duration::ZERO };
}

/// Chance that the carrier holds back the tail of what arrived, to deliver it joined with the next
/// arrival (or alone, shortly after).
const HOLD_BACK: f64 = 0.2;
/// Most pieces one arrival is cut into.
const MAX_PIECES: usize = 3;

/// Bytes handed to one node on one connection.
pub type Delivery = (usize, ConnId, Vec<u8>);

#[derive(Debug)]
struct Link {
    /// Node index at each end.
    ends: [usize; 2],
    /// Latency of frames travelling toward each end.
    latency: [Duration; 2],
    /// Connection ids at each end while the link is up.
    conns: Option<[ConnId; 2]>,
    /// Bumped at every disconnect, so bytes of an old connection never reach a new one.
    generation: u64,
    /// Everything sent until this time is lost.
    partitioned_until: Duration,
    /// Bytes held back by the carrier, toward each end.
    held: [Vec<u8>; 2],
}

/// All links.
#[derive(Debug)]
pub struct Network {
    links: Vec<Link>,
    next_conn: ConnId,
    /// Current fault rates.
    pub faults: Faults,
}

impl Network {
    /// Links between the given pairs of nodes; `latency_ms[a][b]` is the one-way delay from a to b.
    pub fn new(pairs: &[[usize; 2]], latency_ms: &[Vec<u64>]) -> Self {
        let links = pairs
            .iter()
            .map(|&[a, b]| Link {
                ends: [a, b],
                latency: [
                    Duration::from_millis(latency_ms[b][a]),
                    Duration::from_millis(latency_ms[a][b]),
                ],
                conns: None,
                generation: 0,
                partitioned_until: Duration::ZERO,
                held: [Vec::new(), Vec::new()],
            })
            .collect();
        Self { links, next_conn: 1, faults: Faults::NONE }
    }

    /// Number of links.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// The node at each end of a link.
    pub fn ends(&self, link: usize) -> [usize; 2] {
        self.links[link].ends
    }

    /// Links with `node` at one end.
    pub fn links_of(&self, node: usize) -> Vec<usize> {
        (0..self.links.len()).filter(|&l| self.links[l].ends.contains(&node)).collect()
    }

    /// The link and end a node's connection id belongs to, while that connection is current.
    pub fn find(&self, node: usize, conn: ConnId) -> Option<(usize, End)> {
        self.links.iter().enumerate().find_map(|(index, link)| {
            let conns = link.conns?;
            (0..2).find(|&end| link.ends[end] == node && conns[end] == conn).map(|end| (index, end))
        })
    }

    /// The current connection generation of a link.
    pub fn generation(&self, link: usize) -> u64 {
        self.links[link].generation
    }

    /// One-way latency toward `to`.
    pub fn latency(&self, link: usize, to: End) -> Duration {
        self.links[link].latency[to]
    }

    /// True if the link is connected.
    pub fn is_up(&self, link: usize) -> bool {
        self.links[link].conns.is_some()
    }

    /// True if every link is connected.
    pub fn all_up(&self) -> bool {
        self.links.iter().all(|link| link.conns.is_some())
    }

    /// Brings a link up with fresh connection ids, one per end.
    pub fn connect(&mut self, link: usize) -> [ConnId; 2] {
        let conns = [self.next_conn, self.next_conn + 1];
        self.next_conn += 2;
        self.links[link].conns = Some(conns);
        conns
    }

    /// Takes a link down; returns each end's node and the connection it loses.
    pub fn disconnect(&mut self, link: usize) -> Option<[(usize, ConnId); 2]> {
        let link = &mut self.links[link];
        let conns = link.conns.take()?;
        link.generation += 1;
        link.held = [Vec::new(), Vec::new()];
        Some([(link.ends[0], conns[0]), (link.ends[1], conns[1])])
    }

    /// Loses everything sent on a link until `until`.
    pub fn partition(&mut self, link: usize, until: Duration) {
        let link = &mut self.links[link];
        link.partitioned_until = link.partitioned_until.max(until);
    }

    /// Until when a link is partitioned; connections cannot be set up before then.
    pub fn partitioned_until(&self, link: usize) -> Duration {
        self.links[link].partitioned_until
    }

    /// Ends every partition and every fault.
    pub fn heal(&mut self) {
        for link in &mut self.links {
            link.partitioned_until = Duration::ZERO;
        }
        self.faults = Faults::NONE;
    }

    /// Puts one frame from end `from` on the wire, subject to faults; returns how many copies
    /// will arrive.
    ///
    /// A hello rides the transport's reliable connection setup and is never lost, doubled or
    /// delayed: the core has no handshake timeout, so a connection whose hellos were both lost
    /// would never become ready, and nothing would ever close it.
    pub fn send(
        &mut self,
        now: Duration,
        (link, from): (usize, End),
        bytes: Vec<u8>,
        hello: bool,
        rng: &mut StdRng,
        agenda: &mut Agenda,
    ) -> usize {
        let to = 1 - from;
        let faults = if hello { Faults::NONE } else { self.faults };
        let state = &self.links[link];
        if now < state.partitioned_until || rng.gen_bool(faults.drop) {
            return 0;
        }
        let copies = if rng.gen_bool(faults.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut delay = state.latency[to];
            if rng.gen_bool(faults.reorder) {
                delay += rng.gen_range(Duration::ZERO..=faults.max_reorder);
            }
            let generation = state.generation;
            let bytes = bytes.clone();
            agenda.schedule(now + delay, Event::Arrive { link, generation, to, bytes });
        }
        copies
    }

    /// A frame reaches end `to`: returns what that node receives now, in order. (A partition
    /// loses what is sent during it; what was already on the way still lands.)
    pub fn arrive(
        &mut self,
        now: Duration,
        (link, generation, to): (usize, u64, End),
        bytes: Vec<u8>,
        rng: &mut StdRng,
        agenda: &mut Agenda,
    ) -> Vec<Delivery> {
        let state = &mut self.links[link];
        let Some(conns) = state.conns.filter(|_| state.generation == generation) else {
            return Vec::new();
        };
        let mut stream = std::mem::take(&mut state.held[to]);
        stream.extend_from_slice(&bytes);
        if stream.len() > 1 && rng.gen_bool(HOLD_BACK) {
            let cut = rng.gen_range(1..stream.len());
            state.held[to] = stream.split_off(cut);
            let release = now + Duration::from_millis(rng.gen_range(1..=20));
            agenda.schedule(release, Event::Flush { link, generation, to });
        }
        let node = state.ends[to];
        cut_into_pieces(stream, rng).into_iter().map(|piece| (node, conns[to], piece)).collect()
    }

    /// Releases bytes the carrier held back toward `to`.
    pub fn flush(&mut self, (link, generation, to): (usize, u64, End)) -> Vec<Delivery> {
        let state = &mut self.links[link];
        match state.conns {
            Some(conns) if state.generation == generation && !state.held[to].is_empty() => {
                vec![(state.ends[to], conns[to], std::mem::take(&mut state.held[to]))]
            }
            _ => Vec::new(),
        }
    }
}

/// Cuts a byte stream into up to `MAX_PIECES` pieces, in order.
fn cut_into_pieces(mut stream: Vec<u8>, rng: &mut StdRng) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let wanted = rng.gen_range(1..=MAX_PIECES);
    while pieces.len() + 1 < wanted && stream.len() > 1 {
        let cut = rng.gen_range(1..stream.len());
        let rest = stream.split_off(cut);
        pieces.push(stream);
        stream = rest;
    }
    pieces.push(stream);
    pieces
}
