//! A TCP fault proxy for field tests of links that run over TCP, such as the hubs' zenoh
//! backbone.
//!
//! The proxy listens on 127.0.0.1 and relays each accepted connection to one upstream
//! address over a connection of its own. Each direction of a connection is a reader that cuts
//! the stream into chunks, stamps each with its send time (arrival plus the direction's delay
//! and jitter, never earlier than the chunk before, since TCP keeps order), and a writer that
//! sends them at that time. A chunk due while its direction is blackholed waits until the
//! blackhole ends: TCP does not lose bytes, it stalls, and the bounded queue between reader
//! and writer pushes back on the sender as a stalled link's buffers would. The end of a
//! stream travels the same way, so a close made during a partition arrives when it heals.
//!
//! Loss, duplication and reordering have no meaning inside one TCP stream; the faults here are
//! the ones a TCP user sees: delay, a stall (blackhole), a severed connection, and a refused
//! one. While any direction is blackholed, new connections are closed on arrival: a real
//! partition would let the dialer's handshake time out instead, but closing at once leaves
//! when to try again to the dialer's retry timer rather than to its handshake timeout.
//!
//! Like the UDP proxy, it runs a current-thread tokio runtime on a thread of its own, so tests
//! stay blocking and the control state is touched by one task at a time; dropping the handle
//! stops the runtime, which closes every socket.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::fault_link::{lock, Direction, FaultLog, ProxyThread, Way};

/// Largest chunk read at once, in bytes.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks waiting for their send time per direction of a connection; a full queue stops the
/// reader, so at most about 1 MiB per direction is in the proxy.
const CHUNKS_IN_FLIGHT: usize = 64;
/// Most connections relayed at once; a test needs a handful.
const MAX_CONNECTIONS: usize = 256;
/// How long the proxy waits for the upstream to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy did to connections and to the bytes on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFaultCounts {
    /// Connections accepted and relayed (not a fault; for scale).
    pub accepted: u64,
    /// Connections closed on arrival because a blackhole was on.
    pub refused: u64,
    /// Open connections closed by [`TcpFaultProxy::sever`].
    pub severed: u64,
    /// Connections closed because the upstream did not accept (it was down).
    pub upstream_unreachable: u64,
    /// Chunks that had to wait for a blackhole to end.
    pub stalled: u64,
    /// Chunks sent later than received, by delay or jitter.
    pub delayed: u64,
}

/// One direction's faults; the default is a perfect link.
#[derive(Debug, Clone, Copy, Default)]
struct LinkFaults {
    delay: Duration,
    jitter: Duration,
    blackhole: bool,
}

/// Everything the controls change, behind one lock.
#[derive(Debug)]
struct State {
    rng: SmallRng,
    upstream: SocketAddr,
    links: [LinkFaults; 2],
    counts: TcpFaultCounts,
    log: FaultLog<String>,
}

impl State {
    fn log(&mut self, direction: Direction, what: String) {
        self.log.push(direction, what);
    }

    fn blackholed(&self) -> bool {
        self.links.iter().any(|link| link.blackhole)
    }
}

/// Bytes on their way, or the end of the stream (`None`), with the time they may leave.
#[derive(Debug)]
struct Chunk {
    due: Instant,
    bytes: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Shared {
    local: SocketAddr,
    state: Mutex<State>,
    /// Open connections by number; never locked together with `state`.
    connections: Mutex<HashMap<u64, AbortHandle>>,
    /// Bumped on every control change, so stalled writers look again.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn announce(&self, state: &mut State, direction: Direction, what: String) {
        let at = state.log.elapsed().as_secs_f64();
        eprintln!("tcp fault proxy {} at {at:.3}s, {direction}: {what}", self.local);
        state.log(direction, what);
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// The send time of a chunk read now, no earlier than `after` (the previous chunk's).
    fn schedule(&self, way: Way, after: Instant) -> Instant {
        let mut state = self.state();
        let link = state.links[way.index()];
        let jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            state.rng.gen_range(Duration::ZERO..=link.jitter)
        };
        let by = link.delay + jitter;
        if !by.is_zero() {
            state.counts.delayed += 1;
            state.log(way.into(), format!("delayed {by:?}"));
        }
        (Instant::now() + by).max(after)
    }

    /// Returns once `way` is not blackholed, counting the chunk as stalled if it had to wait.
    async fn pass_blackhole(&self, way: Way) {
        let mut stalled = false;
        loop {
            // Subscribed before looking, so a heal between the look and the wait is not missed.
            let mut changes = self.changed.subscribe();
            {
                let mut state = self.state();
                if !state.links[way.index()].blackhole {
                    return;
                }
                if !stalled {
                    stalled = true;
                    state.counts.stalled += 1;
                    state.log(way.into(), "stalled (blackhole)".into());
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut next_id = 0u64;
    loop {
        let (client, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("tcp fault proxy {}: accept failed: {error}", shared.local);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        {
            let mut state = shared.state();
            let full = lock(&shared.connections).len() >= MAX_CONNECTIONS;
            if state.blackholed() || full {
                state.counts.refused += 1;
                let reason = if full { "too many connections" } else { "blackhole" };
                state.log(Direction::Both, format!("refused {from} ({reason})"));
                continue;
            }
            state.counts.accepted += 1;
            state.log(Direction::Both, format!("accepted {from}"));
        }
        next_id += 1;
        let id = next_id;
        // Spawning and registering cannot be split by the task's end: on this current-thread
        // runtime the task runs only after this loop yields.
        let task = tokio::spawn(relay(shared.clone(), client, id));
        lock(&shared.connections).insert(id, task.abort_handle());
    }
}

async fn relay(shared: Arc<Shared>, client: TcpStream, id: u64) {
    let upstream_addr = shared.state().upstream;
    let connected =
        tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream_addr)).await;
    match connected {
        Ok(Ok(upstream)) => {
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            // The connection ends when either direction has delivered its end or failed.
            tokio::select! {
                () = pump(&shared, Way::ToUpstream, client_read, upstream_write) => {}
                () = pump(&shared, Way::ToClient, upstream_read, client_write) => {}
            }
        }
        Ok(Err(_)) | Err(_) => {
            let mut state = shared.state();
            state.counts.upstream_unreachable += 1;
            state.log(Direction::ToUpstream, format!("upstream {upstream_addr} unreachable"));
        }
    }
    lock(&shared.connections).remove(&id);
}

async fn pump(shared: &Shared, way: Way, mut from: OwnedReadHalf, to: OwnedWriteHalf) {
    let (chunks, queued) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut after = Instant::now();
        loop {
            let mut buffer = vec![0u8; CHUNK_BYTES];
            let bytes = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => None,
                Ok(len) => {
                    buffer.truncate(len);
                    Some(buffer)
                }
            };
            let end = bytes.is_none();
            after = shared.schedule(way, after);
            if chunks.send(Chunk { due: after, bytes }).await.is_err() || end {
                return;
            }
        }
    };
    // The writer finishing (end delivered, or the destination gone) ends the pump; the reader
    // alone finishing only means the end is queued.
    let write = deliver(shared, way, queued, to);
    tokio::pin!(write);
    tokio::select! {
        () = &mut write => {}
        () = read => write.await,
    }
}

async fn deliver(
    shared: &Shared,
    way: Way,
    mut queued: mpsc::Receiver<Chunk>,
    mut to: OwnedWriteHalf,
) {
    while let Some(chunk) = queued.recv().await {
        tokio::time::sleep_until(chunk.due.into()).await;
        shared.pass_blackhole(way).await;
        match chunk.bytes {
            Some(bytes) => {
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}

/// A running TCP proxy; dropping it stops the proxy and closes every connection.
pub struct TcpFaultProxy {
    shared: Arc<Shared>,
    seed: u64,
    /// Dropped last, so the runtime stops after the handle's other parts.
    _thread: ProxyThread,
}

impl fmt::Debug for TcpFaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpFaultProxy")
            .field("local", &self.shared.local)
            .field("upstream", &self.shared.state().upstream)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl TcpFaultProxy {
    /// Starts a proxy on an ephemeral 127.0.0.1 port relaying to `upstream`, with no faults;
    /// `seed` drives the jitter.
    pub fn start(upstream: SocketAddr, seed: u64) -> anyhow::Result<Self> {
        let runtime = ProxyThread::runtime("tcp fault proxy")?;
        let std_listener = StdTcpListener::bind("127.0.0.1:0").context("binding a proxy port")?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let listener = {
            let _inside = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let state = State {
            rng: SmallRng::seed_from_u64(seed),
            upstream,
            links: [LinkFaults::default(); 2],
            counts: TcpFaultCounts::default(),
            log: FaultLog::new(Instant::now()),
        };
        let shared = Arc::new(Shared {
            local,
            state: Mutex::new(state),
            connections: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        });
        runtime.spawn(accept_loop(shared.clone(), listener));
        let thread = ProxyThread::spawn("tcp-fault-proxy", runtime)?;
        eprintln!("tcp fault proxy {local} -> {upstream}: seed {seed}");
        Ok(Self { shared, seed, _thread: thread })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// The seed of this proxy's RNG.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Relays connections accepted from now on to `upstream` (a process restarted on another
    /// port); open connections keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        let mut state = self.shared.state();
        state.upstream = upstream;
        self.shared.announce(&mut state, Direction::ToUpstream, format!("upstream {upstream}"));
    }

    /// Delays every chunk by `delay` plus a uniform random part of up to `jitter`; chunks keep
    /// their order, as TCP's bytes do.
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

    /// Stalls every byte that way until [`TcpFaultProxy::heal`], and closes new connections on
    /// arrival: a partition as TCP sees it.
    pub fn blackhole(&self, direction: Direction) {
        self.set(direction, "blackhole".into(), |link| link.blackhole = true);
    }

    /// Closes every open connection at once, so both ends notice without waiting for a
    /// timeout.
    pub fn sever(&self) {
        let open: Vec<AbortHandle> = lock(&self.shared.connections).drain().map(|c| c.1).collect();
        for connection in &open {
            connection.abort();
        }
        let mut state = self.shared.state();
        state.counts.severed += open.len() as u64;
        self.shared.announce(&mut state, Direction::Both, format!("severed {}", open.len()));
    }

    /// Clears every fault; stalled bytes go on in order.
    pub fn heal(&self) {
        let mut state = self.shared.state();
        state.links = [LinkFaults::default(); 2];
        self.shared.announce(&mut state, Direction::Both, "heal".into());
    }

    /// The counts so far.
    pub fn counts(&self) -> TcpFaultCounts {
        self.shared.state().counts
    }

    /// The fault log, one line per control change, connection event or faulted chunk.
    pub fn log_lines(&self) -> Vec<String> {
        self.shared.state().log.lines()
    }

    fn set(&self, direction: Direction, what: String, change: impl Fn(&mut LinkFaults)) {
        let mut state = self.shared.state();
        for way in direction.ways() {
            change(&mut state.links[way.index()]);
        }
        self.shared.announce(&mut state, direction, what);
    }
}
