//! A UDP fault proxy for field tests, in user space because kernel netem is not available
//! everywhere the tests run.
//!
//! The proxy listens on 127.0.0.1 and forwards to one upstream address. Each client source
//! address gets its own upstream-facing socket, like a NAT, so the upstream sees one address
//! per client. A received packet passes its direction's pipeline under one lock: blackhole,
//! hold, loss, duplication, bandwidth cap, then delay, jitter and reordering. What survives
//! goes into one queue ordered by send time (then arrival), which a single task drains: a
//! delayed packet waits there without holding back the packets behind it, and packets due at
//! the same time leave in the order they came.
//!
//! Controls are methods on [`FaultProxy`], callable from any thread and applied to the next
//! packet. One RNG seeded by the caller makes every random decision; since the decisions
//! follow packet arrival order, a seed replays a run as closely as the traffic repeats.
//!
//! The proxy runs a current-thread tokio runtime on a thread of its own, so tests stay
//! blocking and packet handling is single-threaded. Dropping the handle stops the runtime,
//! which ends every task and closes every socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::fault_link::{lock, FaultLog, ProxyThread, Way};

/// The environment variable that replays a run's faults.
pub const SEED_VARIABLE: &str = "CAIRN_FAULT_SEED";

/// Largest UDP payload.
const MAX_DATAGRAM_BYTES: usize = 65_535;
/// Most packets kept while the link is held; more are dropped, as by a stalled link's buffer.
const HOLD_CAPACITY: usize = 4_096;
/// Most bytes waiting behind a bandwidth cap, per direction; more are dropped, as by a router.
const RATE_QUEUE_BYTES: usize = 64 * 1024;
/// Most packets waiting for their send time.
const SCHEDULE_CAPACITY: usize = 16_384;
/// Most client addresses; each costs a socket and a task, and a test needs a handful.
const MAX_MAPPINGS: usize = 1_024;

pub use crate::fault_link::Direction;

/// How many packets each kind of fault touched, and how many rebinds there were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a blackhole.
    pub dropped_blackhole: u64,
    /// Dropped because the hold buffer, a bandwidth queue or the send schedule was full.
    pub dropped_queue_full: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Held back by the reordering delay so later packets overtake them.
    pub reordered: u64,
    /// Sent later than received, by delay, jitter or a bandwidth queue.
    pub delayed: u64,
    /// Buffered while the link was held.
    pub held: u64,
    /// Times every upstream-facing socket was replaced.
    pub rebinds: u64,
}

/// One direction's faults; the default is a perfect link.
#[derive(Debug, Clone, Copy, Default)]
struct LinkFaults {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    duplicate: f64,
    reorder: f64,
    reorder_extra: Duration,
    bytes_per_s: Option<u64>,
    blackhole: bool,
}

/// Something the log records: a control change, or what happened to one packet.
#[derive(Debug, Clone)]
enum Fault {
    Set(String),
    Loss,
    Blackhole,
    QueueFull,
    Duplicated,
    Reordered(Duration),
    Delayed(Duration),
    Held,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Set(what) => write!(f, "set {what}"),
            Self::Loss => f.write_str("dropped (loss)"),
            Self::Blackhole => f.write_str("dropped (blackhole)"),
            Self::QueueFull => f.write_str("dropped (queue full)"),
            Self::Duplicated => f.write_str("duplicated"),
            Self::Reordered(extra) => write!(f, "held back {extra:?} (reorder)"),
            Self::Delayed(by) => write!(f, "delayed {by:?}"),
            Self::Held => f.write_str("held"),
        }
    }
}

/// A packet on its way: the socket it leaves from and where it goes.
#[derive(Debug, Clone)]
struct Packet {
    way: Way,
    bytes: Vec<u8>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

/// Everything the pipeline decides with, behind one lock so a control change applies
/// between two packets and the RNG is drawn in one order.
#[derive(Debug)]
struct State {
    rng: SmallRng,
    links: [LinkFaults; 2],
    /// When each capped direction has sent everything queued on it.
    link_free_at: [Instant; 2],
    /// `Some` while the link is held.
    held: Option<VecDeque<Packet>>,
    /// Packets by send time, then arrival number.
    schedule: BTreeMap<(Instant, u64), Packet>,
    arrivals: u64,
    counts: FaultCounts,
    log: FaultLog<Fault>,
}

impl State {
    /// Blackhole and hold come first: they model the link being absent, not lossy.
    fn admit(&mut self, packet: Packet, now: Instant) {
        let way = packet.way;
        if self.links[way.index()].blackhole {
            return self.record(way, Fault::Blackhole);
        }
        if let Some(held) = self.held.as_mut() {
            let fault = if held.len() < HOLD_CAPACITY {
                held.push_back(packet);
                Fault::Held
            } else {
                Fault::QueueFull
            };
            return self.record(way, fault);
        }
        self.forward(packet, now);
    }

    fn forward(&mut self, packet: Packet, now: Instant) {
        let way = packet.way;
        let link = self.links[way.index()];
        if chance(&mut self.rng, link.loss) {
            return self.record(way, Fault::Loss);
        }
        if chance(&mut self.rng, link.duplicate) {
            self.record(way, Fault::Duplicated);
            self.transmit(packet.clone(), now);
        }
        self.transmit(packet, now);
    }

    fn transmit(&mut self, packet: Packet, now: Instant) {
        let way = packet.way;
        let link = self.links[way.index()];
        let Some(sent) = self.pace(way, packet.bytes.len(), now) else {
            return self.record(way, Fault::QueueFull);
        };
        let jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.rng.gen_range(Duration::ZERO..=link.jitter)
        };
        let mut at = sent + link.delay + jitter;
        if at > now {
            self.record(way, Fault::Delayed(at - now));
        }
        if chance(&mut self.rng, link.reorder) {
            at += link.reorder_extra;
            self.record(way, Fault::Reordered(link.reorder_extra));
        }
        if self.schedule.len() >= SCHEDULE_CAPACITY {
            return self.record(way, Fault::QueueFull);
        }
        self.arrivals += 1;
        self.schedule.insert((at, self.arrivals), packet);
    }

    /// When a packet of `len` bytes has crossed a capped direction, or `None` if its queue is
    /// full. The link sends at the cap, one packet after another (a token bucket with no
    /// burst allowance), so each packet waits for the bytes queued before it.
    fn pace(&mut self, way: Way, len: usize, now: Instant) -> Option<Instant> {
        let Some(rate) = self.links[way.index()].bytes_per_s else {
            return Some(now);
        };
        let starts = self.link_free_at[way.index()].max(now);
        let queued_bytes = (starts - now).as_secs_f64() * rate as f64;
        if queued_bytes + len as f64 > RATE_QUEUE_BYTES as f64 {
            return None;
        }
        let done = starts + Duration::from_secs_f64(len as f64 / rate as f64);
        self.link_free_at[way.index()] = done;
        Some(done)
    }

    /// Sends what was held through the rest of the pipeline, in arrival order.
    fn release(&mut self, now: Instant) -> usize {
        let held = self.held.take().unwrap_or_default();
        let released = held.len();
        for packet in held {
            self.forward(packet, now);
        }
        released
    }

    fn take_due(&mut self, now: Instant) -> (Vec<Packet>, Option<Instant>) {
        let mut due = Vec::new();
        while let Some(entry) = self.schedule.first_entry() {
            if entry.key().0 > now {
                return (due, Some(entry.key().0));
            }
            due.push(entry.remove());
        }
        (due, None)
    }

    fn record(&mut self, way: Way, fault: Fault) {
        let counts = &mut self.counts;
        match fault {
            Fault::Set(_) => {}
            Fault::Loss => counts.dropped_loss += 1,
            Fault::Blackhole => counts.dropped_blackhole += 1,
            Fault::QueueFull => counts.dropped_queue_full += 1,
            Fault::Duplicated => counts.duplicated += 1,
            Fault::Reordered(_) => counts.reordered += 1,
            Fault::Delayed(_) => counts.delayed += 1,
            Fault::Held => counts.held += 1,
        }
        self.log(way.into(), fault);
    }

    fn log(&mut self, direction: Direction, fault: Fault) {
        self.log.push(direction, fault);
    }
}

/// Draws `true` with probability `p`; never panics, whatever `p` is.
fn chance(rng: &mut SmallRng, p: f64) -> bool {
    p > 0.0 && rng.gen::<f64>() < p
}

/// One client's upstream-facing socket and the task relaying the upstream's answers.
#[derive(Debug)]
struct Mapping {
    socket: Arc<UdpSocket>,
    relay: tokio::task::JoinHandle<()>,
}

impl Mapping {
    /// Must run inside the proxy's runtime.
    fn open(shared: &Arc<Shared>, client: SocketAddr) -> anyhow::Result<Self> {
        let socket = Arc::new(bind_local()?);
        let relay = tokio::spawn(relay_to_client(shared.clone(), socket.clone(), client));
        Ok(Self { socket, relay })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // The replaced socket stays open while packets scheduled on it go out, but nothing
        // reads it any more, as after a NAT forgets a mapping.
        self.relay.abort();
    }
}

#[derive(Debug)]
struct Shared {
    local: SocketAddr,
    upstream: SocketAddr,
    listener: Arc<UdpSocket>,
    state: Mutex<State>,
    /// Never locked together with `state`.
    mappings: Mutex<HashMap<SocketAddr, Mapping>>,
    /// Wakes the sending task when the schedule changed.
    scheduled: Notify,
}

impl Shared {
    fn admit(&self, packet: Packet) {
        lock(&self.state).admit(packet, Instant::now());
        self.scheduled.notify_one();
    }

    fn mapping_socket(self: &Arc<Self>, client: SocketAddr) -> anyhow::Result<Arc<UdpSocket>> {
        let mut mappings = lock(&self.mappings);
        if let Some(mapping) = mappings.get(&client) {
            return Ok(mapping.socket.clone());
        }
        anyhow::ensure!(mappings.len() < MAX_MAPPINGS, "more than {MAX_MAPPINGS} clients");
        let mapping = Mapping::open(self, client)?;
        let socket = mapping.socket.clone();
        mappings.insert(client, mapping);
        Ok(socket)
    }

    /// Prints a control change and logs it, so a failing test shows what was injected.
    fn announce(&self, state: &mut State, direction: Direction, what: String) {
        let at = state.log.elapsed().as_secs_f64();
        eprintln!("fault proxy {} at {at:.3}s, {direction}: {what}", self.local);
        state.log(direction, Fault::Set(what));
    }
}

/// Must run inside the proxy's runtime.
fn bind_local() -> anyhow::Result<UdpSocket> {
    let socket = StdUdpSocket::bind("127.0.0.1:0").context("binding a proxy socket")?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

async fn listen(shared: Arc<Shared>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let (len, client) = match shared.listener.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                eprintln!("fault proxy {}: receive failed: {error}", shared.local);
                continue;
            }
        };
        let socket = match shared.mapping_socket(client) {
            Ok(socket) => socket,
            Err(error) => {
                eprintln!("fault proxy {}: no mapping for {client}: {error:#}", shared.local);
                continue;
            }
        };
        let bytes = buffer[..len].to_vec();
        shared.admit(Packet { way: Way::ToUpstream, bytes, socket, to: shared.upstream });
    }
}

async fn relay_to_client(shared: Arc<Shared>, socket: Arc<UdpSocket>, client: SocketAddr) {
    let mut buffer = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buffer).await else { continue };
        // Like a NAT, a mapping's socket only lets the upstream answer.
        if from != shared.upstream {
            continue;
        }
        let packet = Packet {
            way: Way::ToClient,
            bytes: buffer[..len].to_vec(),
            socket: shared.listener.clone(),
            to: client,
        };
        shared.admit(packet);
    }
}

async fn send_due(shared: Arc<Shared>) {
    loop {
        let (due, next) = lock(&shared.state).take_due(Instant::now());
        for packet in due {
            // A failed send is a lost packet, which the protocols above must survive anyway.
            let _ = packet.socket.send_to(&packet.bytes, packet.to).await;
        }
        match next {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                () = shared.scheduled.notified() => {}
            },
            None => shared.scheduled.notified().await,
        }
    }
}

/// A running proxy; dropping it stops the proxy.
pub struct FaultProxy {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    seed: u64,
    /// Dropped last, so the runtime stops after the handle's other parts.
    _thread: ProxyThread,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("local", &self.shared.local)
            .field("upstream", &self.shared.upstream)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on an ephemeral 127.0.0.1 port forwarding to `upstream`, with no
    /// faults; `seed` drives every random decision.
    pub fn start(upstream: SocketAddr, seed: u64) -> anyhow::Result<Self> {
        let runtime = ProxyThread::runtime("fault proxy")?;
        let handle = runtime.handle().clone();
        let listener = {
            let _inside = handle.enter();
            Arc::new(bind_local()?)
        };
        let local = listener.local_addr()?;
        let now = Instant::now();
        let state = State {
            rng: SmallRng::seed_from_u64(seed),
            links: [LinkFaults::default(); 2],
            link_free_at: [now; 2],
            held: None,
            schedule: BTreeMap::new(),
            arrivals: 0,
            counts: FaultCounts::default(),
            log: FaultLog::new(now),
        };
        let shared = Arc::new(Shared {
            local,
            upstream,
            listener,
            state: Mutex::new(state),
            mappings: Mutex::new(HashMap::new()),
            scheduled: Notify::new(),
        });
        handle.spawn(listen(shared.clone()));
        handle.spawn(send_due(shared.clone()));
        let thread = ProxyThread::spawn("fault-proxy", runtime)?;
        eprintln!(
            "fault proxy {local} -> {upstream}: seed {seed} ({SEED_VARIABLE}={seed} replays it)"
        );
        Ok(Self { shared, runtime: handle, seed, _thread: thread })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// The seed of this proxy's RNG.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Delays every packet by `delay` plus a uniform random part of up to `jitter`; with
    /// jitter, packets may overtake each other.
    pub fn delay(&self, direction: Direction, delay: Duration, jitter: Duration) {
        let what = if jitter.is_zero() {
            format!("delay {delay:?}")
        } else {
            format!("delay {delay:?} + up to {jitter:?} jitter")
        };
        self.set(direction, what, |link| {
            link.delay = delay;
            link.jitter = jitter;
        });
    }

    /// Drops each packet with `probability`.
    pub fn loss(&self, direction: Direction, probability: f64) -> anyhow::Result<()> {
        check_probability(probability)?;
        let what = format!("loss {:.1}%", probability * 100.0);
        self.set(direction, what, |link| link.loss = probability);
        Ok(())
    }

    /// Sends each packet twice with `probability`.
    pub fn duplicate(&self, direction: Direction, probability: f64) -> anyhow::Result<()> {
        check_probability(probability)?;
        let what = format!("duplication {:.1}%", probability * 100.0);
        self.set(direction, what, |link| link.duplicate = probability);
        Ok(())
    }

    /// Holds each packet back by `extra` with `probability`, so later packets overtake it.
    pub fn reorder(
        &self,
        direction: Direction,
        probability: f64,
        extra: Duration,
    ) -> anyhow::Result<()> {
        check_probability(probability)?;
        let what = format!("reorder {:.1}% by {extra:?}", probability * 100.0);
        self.set(direction, what, |link| {
            link.reorder = probability;
            link.reorder_extra = extra;
        });
        Ok(())
    }

    /// Caps throughput at `bytes_per_s`; packets beyond it queue (up to 64 KiB, then drop).
    pub fn bandwidth(&self, direction: Direction, bytes_per_s: u64) -> anyhow::Result<()> {
        anyhow::ensure!(bytes_per_s > 0, "a bandwidth cap must be positive; use blackhole");
        let what = format!("bandwidth {bytes_per_s} B/s");
        self.set(direction, what, |link| link.bytes_per_s = Some(bytes_per_s));
        Ok(())
    }

    /// Drops every packet: a one-way partition, or a two-way one with [`Direction::Both`].
    pub fn blackhole(&self, direction: Direction) {
        self.set(direction, "blackhole".into(), |link| link.blackhole = true);
    }

    /// Buffers packets both ways (up to 4,096) until [`FaultProxy::release`] or
    /// [`FaultProxy::heal`].
    pub fn hold(&self) {
        let mut state = lock(&self.shared.state);
        state.held.get_or_insert_with(VecDeque::new);
        self.shared.announce(&mut state, Direction::Both, "hold".into());
    }

    /// Lets every held packet go at once, in arrival order, through the other faults.
    pub fn release(&self) {
        let mut state = lock(&self.shared.state);
        let released = state.release(Instant::now());
        self.shared.announce(&mut state, Direction::Both, format!("release {released} packets"));
        drop(state);
        self.shared.scheduled.notify_one();
    }

    /// Clears every fault, releasing held packets; packets already scheduled keep their time.
    pub fn heal(&self) {
        let mut state = lock(&self.shared.state);
        state.links = [LinkFaults::default(); 2];
        let released = state.release(Instant::now());
        let what = format!("heal (released {released} held packets)");
        self.shared.announce(&mut state, Direction::Both, what);
        drop(state);
        self.shared.scheduled.notify_one();
    }

    /// Moves every client to a new upstream-facing socket on a new port, as a NAT that
    /// rebinds does; the upstream sees each client's packets come from a new address.
    pub fn rebind(&self) -> anyhow::Result<()> {
        let _inside = self.runtime.enter();
        let mut moves = Vec::new();
        {
            let mut mappings = lock(&self.shared.mappings);
            for (client, mapping) in mappings.iter_mut() {
                let fresh = Mapping::open(&self.shared, *client)?;
                let (old, new) = (mapping.socket.local_addr()?, fresh.socket.local_addr()?);
                moves.push(format!("{client} {} -> {}", old.port(), new.port()));
                *mapping = fresh;
            }
        }
        let mut state = lock(&self.shared.state);
        state.counts.rebinds += 1;
        let what = format!("rebind [{}]", moves.join(", "));
        self.shared.announce(&mut state, Direction::ToUpstream, what);
        Ok(())
    }

    /// The fault counts so far.
    pub fn counts(&self) -> FaultCounts {
        lock(&self.shared.state).counts
    }

    /// The fault log, one line per control change or faulted packet, oldest first.
    pub fn log_lines(&self) -> Vec<String> {
        lock(&self.shared.state).log.lines()
    }

    fn set(&self, direction: Direction, what: String, change: impl Fn(&mut LinkFaults)) {
        let mut state = lock(&self.shared.state);
        for way in direction.ways() {
            change(&mut state.links[way.index()]);
        }
        self.shared.announce(&mut state, direction, what);
    }
}

fn check_probability(probability: f64) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&probability), "probability {probability} not in 0..=1");
    Ok(())
}

/// The seed for a test's proxies: `CAIRN_FAULT_SEED` when set, to replay a run, else a new one.
pub fn fault_seed() -> anyhow::Result<u64> {
    match std::env::var(SEED_VARIABLE) {
        Ok(text) => text.trim().parse().with_context(|| format!("{SEED_VARIABLE}={text:?}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            Ok(u64::from(nanos) ^ (u64::from(std::process::id()) << 32))
        }
    }
}
