//! QUIC transport: endpoints, the per-connection pump, the agent's dial loop and the hub's
//! accept loop. Every connection carries one bidirectional stream of Cairn frames.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, Semaphore};

use super::driver::{NodeHandle, WriterMessage, CONNECTION_QUEUE_CAPACITY};
use super::tls::{peer_node_id, Identity, TlsError};

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
}

impl Default for LinkTiming {
    fn default() -> Self {
        Self {
            keep_alive_ms: 2_000,
            idle_timeout_ms: 8_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

impl LinkTiming {
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

/// How many connections a hub holds, and how long a new one may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Most connections at once; more are refused and retry with backoff.
    pub max_connections: usize,
    /// How long a new connection may take to open its stream (the hello timeout).
    pub stream_timeout: Duration,
}

/// Accepts agents until `shutdown` resolves; at most `max_connections` at once.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    node: NodeHandle,
    limits: AcceptLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let AcceptLimits { max_connections, stream_timeout } = limits;
    let side = Side::Acceptor { stream_timeout };
    let permits = Arc::new(Semaphore::new(max_connections));
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

/// Keeps an agent connected to its hub: dial, pump until the link dies, back off, repeat.
///
/// Backoff doubles from `backoff_initial_ms` to `backoff_max_ms` with full jitter, so many agents
/// losing the same hub do not return in step. A link that stayed up resets the backoff.
pub async fn dial_loop(
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    server_name: String,
    node: NodeHandle,
    timing: LinkTiming,
) {
    let initial = Duration::from_millis(timing.backoff_initial_ms.max(1));
    let max = Duration::from_millis(timing.backoff_max_ms.max(timing.backoff_initial_ms).max(1));
    let mut backoff = initial;
    while node.is_running() {
        let started = tokio::time::Instant::now();
        match endpoint.connect(hub, &server_name) {
            Ok(connecting) => match connecting.await {
                Ok(connection) => {
                    if let Err(error) = run_connection(node.clone(), connection, Side::Dialer).await
                    {
                        tracing::warn!(%error, "hub connection ended");
                    }
                }
                Err(error) => tracing::debug!(%error, %hub, "hub unreachable"),
            },
            Err(error) => tracing::warn!(%error, %hub, "cannot dial hub"),
        }
        if started.elapsed() > max {
            backoff = initial;
        }
        let jittered = rand::thread_rng().gen_range(Duration::ZERO..=backoff);
        tokio::time::sleep(jittered).await;
        backoff = (backoff * 2).min(max);
    }
}
