//! QUIC transport: endpoints, the per-connection pump, the agent's dial loop and the hub's
//! accept loop. Every connection carries one bidirectional stream of Cairn frames.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use super::driver::{NodeHandle, WriterMessage, CONNECTION_QUEUE_CAPACITY};
use super::profile::LinkMonitor;
use super::tls::{peer_node_id, Identity, TlsError};
use crate::admission::Admission;
use crate::failover::{FailoverTiming, HubSelector};

/// Application close code of a connection the hub refused for now; the reason says when to
/// come back, as `retry after <ms> ms`.
pub const CLOSE_RETRY_LATER: u32 = 2;

/// Largest read from a stream at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long a closing connection waits for its last frames (a refusal) to be delivered.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Liveness and reconnection timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkTiming {
    /// QUIC keep-alive ping interval (the heartbeat), in milliseconds.
    pub keep_alive_ms: u64,
    /// A link silent this long is dead, in milliseconds.
    pub idle_timeout_ms: u64,
    /// First reconnect delay, in milliseconds.
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    pub backoff_max_ms: u64,
    /// How long a hub that failed is first skipped (its circuit breaker open), in
    /// milliseconds; doubles with each consecutive failure of that hub.
    pub breaker_open_ms: u64,
    /// Longest a hub is skipped after failures, in milliseconds.
    pub breaker_open_max_ms: u64,
    /// A link up this long counts as healthy and resets backoff, in milliseconds.
    pub stable_after_ms: u64,
    /// While on a less preferred hub, how often to try the preferred ones, in milliseconds.
    pub probe_preferred_ms: u64,
}

impl Default for LinkTiming {
    fn default() -> Self {
        Self {
            keep_alive_ms: 2_000,
            idle_timeout_ms: 8_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
            breaker_open_ms: 2_000,
            breaker_open_max_ms: 60_000,
            stable_after_ms: 10_000,
            probe_preferred_ms: 5_000,
        }
    }
}

impl LinkTiming {
    /// The hub-selection timing these settings describe.
    pub fn failover(&self) -> FailoverTiming {
        let ms = Duration::from_millis;
        FailoverTiming {
            backoff_initial: ms(self.backoff_initial_ms.max(1)),
            backoff_max: ms(self.backoff_max_ms.max(self.backoff_initial_ms).max(1)),
            breaker_open: ms(self.breaker_open_ms),
            breaker_open_max: ms(self.breaker_open_max_ms.max(self.breaker_open_ms)),
            stable_after: ms(self.stable_after_ms),
            probe_preferred_every: ms(self.probe_preferred_ms.max(100)),
        }
    }

    /// QUIC transport settings carrying the heartbeat and idle timeout.
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)));
        transport.max_idle_timeout(
            quinn::IdleTimeout::try_from(Duration::from_millis(self.idle_timeout_ms)).ok(),
        );
        // One stream per connection carries the protocol; refuse any more.
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        Arc::new(transport)
    }
}

/// A transport failure while setting up or running a connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS material or peer certificate problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding or configuring the UDP socket failed.
    #[error("endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    /// The QUIC handshake failed.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The node loop is gone.
    #[error("node stopped")]
    NodeStopped,
}

/// A server endpoint for hubs.
pub fn server_endpoint(
    identity: &Identity,
    listen: SocketAddr,
    timing: &LinkTiming,
) -> Result<quinn::Endpoint, TransportError> {
    let config = identity.server_config(timing.transport())?;
    Ok(quinn::Endpoint::server(config, listen)?)
}

/// A client endpoint for agents, bound to an ephemeral local port.
pub fn client_endpoint(
    identity: &Identity,
    timing: &LinkTiming,
) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(identity.client_config(timing.transport())?);
    Ok(endpoint)
}

/// Which end of a connection this node is.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// We dialed, and open the protocol stream.
    Dialer,
    /// We accepted, and wait at most `stream_timeout` for the peer to open the stream, so a
    /// peer that completes the handshake and then stays silent cannot hold a connection slot.
    Acceptor {
        /// How long the peer has to open the stream (and so send its first bytes).
        stream_timeout: Duration,
    },
}

/// Pumps one authenticated connection between QUIC and the node until either side ends it.
pub async fn run_connection(
    node: NodeHandle,
    connection: quinn::Connection,
    side: Side,
) -> Result<(), TransportError> {
    let peer = peer_node_id(&connection)?;
    let (send, mut recv) = match side {
        Side::Dialer => connection.open_bi().await?,
        Side::Acceptor { stream_timeout } => {
            match tokio::time::timeout(stream_timeout, connection.accept_bi()).await {
                Ok(stream) => stream?,
                Err(_) => {
                    connection.close(1u32.into(), b"no hello in time");
                    tracing::info!(%peer, "closed a connection that opened no stream in time");
                    return Ok(());
                }
            }
        }
    };
    let (writer_tx, writer_rx) = mpsc::channel(CONNECTION_QUEUE_CAPACITY);
    let conn = node.attach(peer, writer_tx).await.map_err(|_| TransportError::NodeStopped)?;
    tracing::info!(conn, %peer, remote = %connection.remote_address(), "peer connected");
    let writer = tokio::spawn(write_frames(connection.clone(), send, writer_rx));
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    while let Ok(Some(n)) = recv.read(&mut buffer).await {
        if node.received(conn, buffer[..n].to_vec()).await.is_err() {
            break;
        }
    }
    let _ = node.disconnected(conn).await;
    writer.abort();
    tracing::info!(conn, %peer, reason = ?connection.close_reason(), "peer disconnected");
    Ok(())
}

async fn write_frames(
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut frames: mpsc::Receiver<WriterMessage>,
) {
    let mut reason = String::from("closed");
    while let Some(message) = frames.recv().await {
        match message {
            WriterMessage::Frame(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            WriterMessage::Close(why) => {
                reason = why;
                break;
            }
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(CLOSE_GRACE, send.stopped()).await;
    let reason: String = reason.chars().take(200).collect();
    connection.close(1u32.into(), reason.as_bytes());
}

/// How many connections a hub holds, how fast it admits new ones, and how long a new one
/// may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Most connections at once; more are refused and retry with backoff.
    pub max_connections: usize,
    /// How long a new connection may take to open its stream (the hello timeout).
    pub stream_timeout: Duration,
    /// New connections admitted per second on average (0: no limit); agents beyond it are
    /// told when to come back, so a restart does not turn into a reconnect storm.
    pub admission_rate_per_s: u32,
    /// New connections admitted at once before the rate applies.
    pub admission_burst: u32,
}

/// Accepts agents until `shutdown` resolves; at most `max_connections` at once, admitted at
/// a bounded rate.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    node: NodeHandle,
    limits: AcceptLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let side = Side::Acceptor { stream_timeout: limits.stream_timeout };
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut admission = Admission::new(limits.admission_rate_per_s, limits.admission_burst);
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        if let Err(retry_after) = admission.try_admit(std::time::Instant::now()) {
            node.count_admission_refusal();
            // Completing the handshake is what lets the agent hear when to come back; the
            // connection is closed before it reaches the node.
            tokio::spawn(async move {
                let _permit = permit;
                if let Ok(connection) = incoming.await {
                    let reason = format!("retry after {} ms", retry_after.as_millis());
                    connection.close(CLOSE_RETRY_LATER.into(), reason.as_bytes());
                }
            });
            continue;
        }
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match incoming.await {
                Ok(connection) => run_connection(node, connection, side).await,
                Err(error) => Err(error.into()),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "connection failed");
            }
        });
    }
    endpoint.close(0u32.into(), b"hub shutting down");
}

/// One hub an agent may dial.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubAddress {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// The name its certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

/// Keeps an agent connected to one hub: [`dial_hubs`] with a list of one.
pub async fn dial_loop(
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    server_name: String,
    node: NodeHandle,
    timing: LinkTiming,
) {
    let hubs = vec![HubAddress { addr: hub, server_name }];
    dial_hubs(endpoint, hubs, node, timing, LinkMonitor::new()).await;
}

/// Keeps an agent connected to one of its hubs, the most preferred that is healthy: dial,
/// pump until the link dies (or a more preferred hub answers again), choose the next hub,
/// back off, repeat. Which hub and when is [`HubSelector`]'s call: a circuit breaker per hub,
/// exponential backoff with full jitter, and the hub's own word when it refuses the agent for
/// now. While connected, the hub link's RTT and bandwidth estimates go to `link` every
/// [`LINK_SAMPLE_INTERVAL`] (for the capability profile).
pub async fn dial_hubs(
    endpoint: quinn::Endpoint,
    hubs: Vec<HubAddress>,
    node: NodeHandle,
    timing: LinkTiming,
    link: LinkMonitor,
) {
    if hubs.is_empty() {
        tracing::warn!("no hub configured; this agent stays offline");
        return;
    }
    let mut selector = HubSelector::new(hubs.len(), timing.failover());
    let handshake_timeout = Duration::from_millis(timing.idle_timeout_ms.max(1));
    // A connection to a more preferred hub, opened while on another, is used next.
    let mut ready: Option<(usize, quinn::Connection)> = None;
    let mut hubs = hubs;
    while node.is_running() {
        learn_hubs(&node, &mut hubs, &mut selector);
        let (index, connection) = match ready.take() {
            Some(ready) => ready,
            None => {
                let backoff = selector.backoff(&mut rand::thread_rng());
                let dial = selector.next(std::time::Instant::now(), backoff);
                tokio::time::sleep_until(dial.at.into()).await;
                match connect(&endpoint, &hubs[dial.hub], handshake_timeout).await {
                    Ok(connection) => (dial.hub, connection),
                    Err(error) => {
                        tracing::debug!(%error, hub = %hubs[dial.hub].addr, "hub unreachable");
                        selector.on_failed(dial.hub, std::time::Instant::now());
                        continue;
                    }
                }
            }
        };
        let hub = &hubs[index];
        let started = std::time::Instant::now();
        let sampler = tokio::spawn(sample_link(connection.clone(), link.clone()));
        let pump = run_connection(node.clone(), connection.clone(), Side::Dialer);
        tokio::pin!(pump);
        let mut probe = tokio::time::interval(selector.probe_every());
        probe.tick().await;
        let result = loop {
            tokio::select! {
                result = &mut pump => break result,
                _ = probe.tick(), if index > 0 && ready.is_none() => {
                    let now = std::time::Instant::now();
                    let Some(preferred) = selector.preferred_over(index, now) else { continue };
                    match connect(&endpoint, &hubs[preferred], handshake_timeout).await {
                        Ok(better) => {
                            tracing::info!(from = %hub.addr, to = %hubs[preferred].addr,
                                "returning to a preferred hub");
                            connection.close(0u32.into(), b"moving to a preferred hub");
                            ready = Some((preferred, better));
                        }
                        Err(_) => selector.on_failed(preferred, now),
                    }
                }
            }
        };
        sampler.abort();
        if let Err(error) = result {
            tracing::warn!(%error, hub = %hub.addr, "hub connection ended");
        }
        let now = std::time::Instant::now();
        match retry_after(&connection) {
            Some(wait) => {
                tracing::info!(hub = %hub.addr, wait_ms = wait.as_millis() as u64,
                    "hub asked this agent to come back later");
                selector.on_refused(index, wait, now);
            }
            None if ready.is_some() => selector.on_connected(index),
            None => selector.on_lost(index, started.elapsed(), now),
        }
    }
}

/// Adds the hubs the connected hub advertised that this agent does not know yet, after the
/// configured ones, in the order the hub gave (its own region's first).
fn learn_hubs(node: &NodeHandle, hubs: &mut Vec<HubAddress>, selector: &mut HubSelector) {
    let server_name = hubs.first().map_or_else(default_server_name, |h| h.server_name.clone());
    for learned in node.status().learned_hubs {
        let Ok(addr) = learned.addr.parse::<SocketAddr>() else { continue };
        if hubs.len() >= MAX_KNOWN_HUBS || hubs.iter().any(|h| h.addr == addr) {
            continue;
        }
        tracing::info!(%addr, region = %learned.region, "learned a hub to fail over to");
        hubs.push(HubAddress { addr, server_name: server_name.clone() });
        selector.add_hub();
    }
}

/// Most hubs an agent keeps in its list, configured and learned.
const MAX_KNOWN_HUBS: usize = 64;

/// Dials one hub, giving up after `timeout`.
async fn connect(
    endpoint: &quinn::Endpoint,
    hub: &HubAddress,
    timeout: Duration,
) -> Result<quinn::Connection, TransportError> {
    let connecting = endpoint.connect(hub.addr, &hub.server_name)?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(connection) => Ok(connection?),
        Err(_) => Err(TransportError::Connection(quinn::ConnectionError::TimedOut)),
    }
}

/// How long the hub asked this agent to stay away, if it closed the connection for that.
fn retry_after(connection: &quinn::Connection) -> Option<Duration> {
    let Some(quinn::ConnectionError::ApplicationClosed(close)) = connection.close_reason() else {
        return None;
    };
    if close.error_code != CLOSE_RETRY_LATER.into() {
        return None;
    }
    let reason = std::str::from_utf8(&close.reason).ok()?;
    let ms: u64 = reason.strip_prefix("retry after ")?.strip_suffix(" ms")?.parse().ok()?;
    Some(Duration::from_millis(ms.min(600_000)))
}

/// How often a connected agent records its hub link's QUIC estimates.
pub const LINK_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

async fn sample_link(connection: quinn::Connection, link: LinkMonitor) {
    let mut interval = tokio::time::interval(LINK_SAMPLE_INTERVAL);
    loop {
        interval.tick().await;
        link.sample(&connection);
    }
}
