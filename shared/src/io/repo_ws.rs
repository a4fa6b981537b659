//! The automerge-repo sync endpoint: `GET /v1/sync` speaks automerge-repo's WebSocket
//! protocol, so an unmodified automerge-repo application (JavaScript's WebSocket client
//! adapters, Rust's samod) can use this node as its sync server.
//!
//! Each socket becomes one node peer with [`Role::Client`], exactly as a QUIC connection does
//! in `io::quic`: the bridge attaches a writer, feeds the node Cairn frames, and translates
//! the node's frames back. The client's `request`/`sync` messages become `DocSync` frames;
//! the node's `DocSync` frames become `sync` messages. Clients follow only the documents
//! they sync; a document first synced here is filed in the configured collection.
//!
//! What the bridge does with the rest of the protocol:
//! - `request` for a document this node does not hold is answered `doc-unavailable` and not
//!   forwarded (the node would otherwise create an empty placeholder for it).
//! - `ephemeral` messages are relayed to the other clients of this node that sync the same
//!   document, with the original sender, session and count; they are never stored and do not
//!   cross to other nodes.
//! - `remote-subscription-change` and `remote-heads-changed` are accepted and ignored; the
//!   bridge never sends `remote-heads-changed`. Our `peer` message announces no storage id,
//!   so clients do not expect heads gossip from us.
//! - `doc-unavailable` from a client needs no action; `leave` ends the session.
//! - Malformed CBOR, an unknown type, an oversized or text message, a message before `join`
//!   or with another sender id: the client gets an `error` message and the socket closes.
//!   Nothing else is affected.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::{broadcast, mpsc, Semaphore};

use super::driver::{DriverError, NodeHandle, WriterMessage, CONNECTION_QUEUE_CAPACITY};
use crate::frame::{encode_frame, FrameDecoder};
use crate::ids::{Collection, DocId, NodeId};
use crate::message::{Envelope, Message, Role};
use crate::node::{ConnId, Request, RequestError};
use crate::repo_wire::{self, PeerId, PeerMetadata, RepoMessage, PROTOCOL_V1};

/// The route.
pub const SYNC_PATH: &str = "/v1/sync";
/// Most WebSocket clients at once; more are answered 503 before the upgrade.
pub const MAX_CLIENTS: usize = 1024;
/// How long a new socket may take to send `join`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Ephemeral messages buffered for relay; a client that falls further behind misses some.
pub const EPHEMERAL_RELAY_CAPACITY: usize = 256;
/// Largest ephemeral payload relayed; larger ones are dropped (ephemeral is best effort).
pub const MAX_EPHEMERAL_BYTES: usize = 64 * 1024;
/// Most documents one client may sync on one socket.
pub const MAX_DOCUMENTS_PER_CLIENT: usize = 100_000;
/// How long a closing socket waits for the client to acknowledge the close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// WebSocket close codes (RFC 6455).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_GOING_AWAY: u16 = 1001;
/// WebSocket messages a little over the CBOR limit still reach the decoder, so the client is
/// told why; beyond this the WebSocket layer refuses them by itself.
const WEBSOCKET_SLACK_BYTES: usize = 64 * 1024;

/// The collection of documents first synced through the endpoint, unless configured.
pub const DEFAULT_COLLECTION: &str = "default";

/// [`DEFAULT_COLLECTION`] as a collection.
pub fn default_collection() -> Collection {
    // A constant, valid name (a unit test parses it); this cannot fail.
    DEFAULT_COLLECTION.parse().expect("the default collection name is valid")
}

/// Settings of the sync endpoint.
#[derive(Debug, Clone)]
pub struct SyncEndpoint {
    /// The collection a document goes into when a client is the first to sync it here.
    pub collection: Collection,
    /// The node's frame limit (`sync.max_frame_bytes`); also the largest message accepted.
    pub max_frame_bytes: usize,
}

/// The endpoint's routes.
pub fn router(node: NodeHandle, endpoint: SyncEndpoint) -> Router {
    let (relay, _) = broadcast::channel(EPHEMERAL_RELAY_CAPACITY);
    let bridge = Bridge {
        our_id: PeerId::from(node.node_id()),
        node,
        endpoint,
        relay,
        clients: Arc::new(Semaphore::new(MAX_CLIENTS)),
        next_socket: AtomicU64::new(1),
    };
    Router::new().route(SYNC_PATH, get(upgrade)).with_state(Arc::new(bridge))
}

/// What every socket of one node shares.
#[derive(Debug)]
struct Bridge {
    node: NodeHandle,
    endpoint: SyncEndpoint,
    our_id: PeerId,
    relay: broadcast::Sender<Arc<Relayed>>,
    clients: Arc<Semaphore>,
    next_socket: AtomicU64,
}

/// An ephemeral message on its way to the node's other clients.
#[derive(Debug)]
struct Relayed {
    from_socket: u64,
    sender_id: PeerId,
    count: u64,
    session_id: String,
    document_id: DocId,
    data: Vec<u8>,
}

async fn upgrade(State(bridge): State<Arc<Bridge>>, upgrade: WebSocketUpgrade) -> Response {
    let Ok(permit) = bridge.clients.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many sync clients").into_response();
    };
    let limit = bridge.endpoint.max_frame_bytes + WEBSOCKET_SLACK_BYTES;
    upgrade.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| async move {
        let _permit = permit;
        serve(bridge, socket).await;
    })
}

/// Why a session ends.
#[derive(Debug)]
enum Ending {
    /// The client left or the socket closed: nothing to say.
    Quiet,
    /// The client broke the protocol: tell it why, then close.
    Protocol(String),
    /// This node cannot go on (shutting down, or the client fell too far behind).
    Node(String),
}

/// What one step of a session produced: messages for the client, and maybe the end.
#[derive(Debug, Default)]
struct Step {
    send: Vec<RepoMessage>,
    end: Option<Ending>,
}

impl Step {
    fn send(message: RepoMessage) -> Self {
        Self { send: vec![message], end: None }
    }

    fn end(ending: Ending) -> Self {
        Self { send: Vec::new(), end: Some(ending) }
    }
}

async fn serve(bridge: Arc<Bridge>, mut socket: WebSocket) {
    let client = match await_join(&bridge, &mut socket).await {
        Ok(client) => client,
        Err(ending) => return close(&bridge, &mut socket, None, ending).await,
    };
    let (writer, frames) = mpsc::channel(CONNECTION_QUEUE_CAPACITY);
    let peer_node = NodeId::from_public_key(client.as_str().as_bytes());
    let Ok(conn) = bridge.node.attach(peer_node, writer).await else {
        let ending = Ending::Node("node is not running".into());
        return close(&bridge, &mut socket, Some(&client), ending).await;
    };
    tracing::info!(conn, client = %client, "sync client connected");
    let mut session = Session {
        socket_id: bridge.next_socket.fetch_add(1, Ordering::Relaxed),
        clock_id: clock_id(peer_node),
        peer_node,
        bridge: bridge.clone(),
        client: client.clone(),
        conn,
        decoder: FrameDecoder::new(bridge.endpoint.max_frame_bytes),
        followed: BTreeSet::new(),
    };
    let ending = session.run(&mut socket, frames).await;
    let _ = bridge.node.disconnected(conn).await;
    tracing::info!(conn, client = %client, ending = ?ending, "sync client disconnected");
    close(&bridge, &mut socket, Some(&client), ending).await;
}

/// Waits for the client's `join`; returns its peer id.
async fn await_join(bridge: &Bridge, socket: &mut WebSocket) -> Result<PeerId, Ending> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let incoming = tokio::time::timeout_at(deadline, socket.recv())
            .await
            .map_err(|_| Ending::Protocol(format!("no join within {JOIN_TIMEOUT:?}")))?;
        let message = match read_message(bridge, incoming)? {
            Some(message) => message,
            None => continue,
        };
        let RepoMessage::Join { sender_id, supported_protocol_versions, .. } = message else {
            return Err(Ending::Protocol(format!(
                "expected join first, got {}",
                message.type_name()
            )));
        };
        // Like automerge-repo's own server: no list means version 1.
        let speaks_v1 = supported_protocol_versions
            .as_ref()
            .is_none_or(|versions| versions.iter().any(|v| v == PROTOCOL_V1));
        if !speaks_v1 {
            return Err(Ending::Protocol(format!(
                "unsupported protocol version; this server speaks {PROTOCOL_V1}"
            )));
        }
        return Ok(sender_id);
    }
}

/// Turns one WebSocket event into a protocol message; `Ok(None)` for control frames.
fn read_message(
    bridge: &Bridge,
    incoming: Option<Result<WsMessage, axum::Error>>,
) -> Result<Option<RepoMessage>, Ending> {
    match incoming {
        None | Some(Ok(WsMessage::Close(_))) => Err(Ending::Quiet),
        Some(Err(error)) => Err(Ending::Protocol(format!("websocket: {error}"))),
        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Ok(None),
        Some(Ok(WsMessage::Text(_))) => {
            Err(Ending::Protocol("text messages are not part of the protocol; send CBOR".into()))
        }
        Some(Ok(WsMessage::Binary(bytes))) => {
            repo_wire::decode_with_limit(&bytes, bridge.endpoint.max_frame_bytes)
                .map(Some)
                .map_err(|error| Ending::Protocol(error.to_string()))
        }
    }
}

/// One joined client.
struct Session {
    bridge: Arc<Bridge>,
    client: PeerId,
    conn: ConnId,
    socket_id: u64,
    /// The node id the client is known by inside the node (a hash of its peer id).
    peer_node: NodeId,
    clock_id: uhlc::ID,
    /// Reassembles the node's frames for this connection.
    decoder: FrameDecoder,
    /// Documents this client syncs: they receive its ephemeral messages and skip the
    /// existence check on `request`.
    followed: BTreeSet<DocId>,
}

impl Session {
    async fn run(
        &mut self,
        socket: &mut WebSocket,
        mut frames: mpsc::Receiver<WriterMessage>,
    ) -> Ending {
        let mut relayed = self.bridge.relay.subscribe();
        let role = Message::Hello {
            node_id: self.peer_node,
            role: Role::Client,
            scope: crate::scope::CollectionScope::all(),
        };
        let mut step = match self.to_node(role).await {
            Some(ending) => Step::end(ending),
            None => Step::send(self.peer_message()),
        };
        loop {
            for message in step.send.drain(..) {
                let bytes = repo_wire::encode(&message);
                if socket.send(WsMessage::Binary(bytes.into())).await.is_err() {
                    return Ending::Quiet;
                }
            }
            if let Some(ending) = step.end {
                return ending;
            }
            step = tokio::select! {
                incoming = socket.recv() => self.on_socket(incoming).await,
                frame = frames.recv() => self.on_node(frame),
                relay = relayed.recv() => self.on_relay(relay),
            };
        }
    }

    fn peer_message(&self) -> RepoMessage {
        RepoMessage::Peer {
            sender_id: self.bridge.our_id.clone(),
            target_id: self.client.clone(),
            // No storage id: clients keep no sync state for us across sessions, and expect
            // no remote-heads gossip.
            peer_metadata: Some(PeerMetadata { storage_id: None, is_ephemeral: Some(false) }),
            selected_protocol_version: PROTOCOL_V1.into(),
        }
    }

    async fn on_socket(&mut self, incoming: Option<Result<WsMessage, axum::Error>>) -> Step {
        match read_message(&self.bridge, incoming) {
            Err(ending) => Step::end(ending),
            Ok(None) => Step::default(),
            Ok(Some(message)) => self.on_client_message(message).await,
        }
    }

    async fn on_client_message(&mut self, message: RepoMessage) -> Step {
        // Ephemeral messages keep their originator's id when clients pass them on.
        if let RepoMessage::Ephemeral { sender_id, count, session_id, document_id, data, .. } =
            message
        {
            let from_socket = self.socket_id;
            let relayed = Relayed { from_socket, sender_id, count, session_id, document_id, data };
            return self.on_ephemeral(relayed);
        }
        if let Some(sender) = message.sender_id().filter(|s| **s != self.client) {
            let reason = format!("message from {sender} on the socket joined by {}", self.client);
            return Step::end(Ending::Protocol(reason));
        }
        match message {
            // A repeated join (same sender) is answered again, as automerge-repo's server does.
            RepoMessage::Join { .. } => Step::send(self.peer_message()),
            RepoMessage::Request { document_id, data, .. } => {
                self.on_request(document_id, data).await
            }
            RepoMessage::Sync { document_id, data, .. } => self.forward(document_id, data).await,
            RepoMessage::Ephemeral { .. }
            | RepoMessage::DocUnavailable { .. }
            | RepoMessage::RemoteSubscriptionChange { .. }
            | RepoMessage::RemoteHeadsChanged { .. } => Step::default(),
            RepoMessage::Leave { .. } => Step::end(Ending::Quiet),
            RepoMessage::Error { message, .. } => {
                tracing::info!(client = %self.client, %message, "sync client reported an error");
                Step::end(Ending::Quiet)
            }
            RepoMessage::Peer { .. } => {
                Step::end(Ending::Protocol("peer is the server's message; clients join".into()))
            }
        }
    }

    /// A `request` names a document the client lacks; if we lack it too, say so at once.
    async fn on_request(&mut self, document_id: DocId, data: Vec<u8>) -> Step {
        if !self.followed.contains(&document_id) {
            match self.bridge.node.request(Request::Exists { doc_id: document_id }).await {
                Ok(_) | Err(DriverError::Request(RequestError::Unavailable(_))) => {}
                Err(DriverError::Request(_)) => {
                    return Step::send(RepoMessage::DocUnavailable {
                        sender_id: self.bridge.our_id.clone(),
                        target_id: self.client.clone(),
                        document_id,
                    })
                }
                Err(DriverError::Stopped) => {
                    return Step::end(Ending::Node("node is not running".into()))
                }
            }
        }
        self.forward(document_id, data).await
    }

    /// Hands a client's sync message to the node as a `DocSync` frame.
    async fn forward(&mut self, doc_id: DocId, sync_message: Vec<u8>) -> Step {
        if !self.followed.contains(&doc_id) {
            if self.followed.len() >= MAX_DOCUMENTS_PER_CLIENT {
                let reason =
                    format!("more than {MAX_DOCUMENTS_PER_CLIENT} documents on one socket");
                return Step::end(Ending::Protocol(reason));
            }
            self.followed.insert(doc_id);
        }
        let collection = self.bridge.endpoint.collection.clone();
        match self.to_node(Message::DocSync { doc_id, collection, sync_message }).await {
            Some(ending) => Step::end(ending),
            None => Step::default(),
        }
    }

    /// Feeds the node one frame from this client; `Some` if the session must end.
    async fn to_node(&self, message: Message) -> Option<Ending> {
        let envelope = Envelope { sent_at: now(self.clock_id), message };
        let frame = match encode_frame(&envelope.encode(), self.bridge.endpoint.max_frame_bytes) {
            Ok(frame) => frame,
            Err(error) => return Some(Ending::Protocol(error.to_string())),
        };
        match self.bridge.node.received(self.conn, frame).await {
            Ok(()) => None,
            Err(_) => Some(Ending::Node("node is not running".into())),
        }
    }

    /// Translates what the node sent this connection.
    fn on_node(&mut self, frame: Option<WriterMessage>) -> Step {
        let bytes = match frame {
            Some(WriterMessage::Frame(bytes)) => bytes,
            Some(WriterMessage::Close(reason)) => return Step::end(Ending::Node(reason)),
            None => return Step::end(Ending::Node("the node closed this connection".into())),
        };
        self.decoder.push(&bytes);
        let mut step = Step::default();
        while step.end.is_none() {
            let envelope = match self.decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(payload)) => Envelope::decode(&payload),
                Err(error) => return Step::end(Ending::Node(format!("node frame: {error}"))),
            };
            match envelope {
                Ok(envelope) => self.translate(envelope.message, &mut step),
                Err(error) => step.end = Some(Ending::Node(format!("node frame: {error}"))),
            }
        }
        step
    }

    fn translate(&self, message: Message, step: &mut Step) {
        let sync = |document_id, data| RepoMessage::Sync {
            sender_id: self.bridge.our_id.clone(),
            target_id: self.client.clone(),
            document_id,
            data,
        };
        match message {
            Message::DocSync { doc_id, sync_message, .. } => {
                step.send.push(sync(doc_id, sync_message))
            }
            Message::DocSyncBatch { parts } => {
                step.send.extend(parts.into_iter().map(|p| sync(p.doc_id, p.sync_message)))
            }
            // The node compresses only for node peers; a frame it built is trusted.
            Message::Compressed { deflated } => {
                match Message::decompress(&deflated, self.bridge.endpoint.max_frame_bytes) {
                    Ok(inner) => self.translate(inner, step),
                    Err(error) => step.end = Some(Ending::Node(format!("node frame: {error}"))),
                }
            }
            // The node refuses what the client sent (for example a bad sync message).
            Message::Refuse { reason, .. } => step.end = Some(Ending::Protocol(reason)),
            // The handshake, inventories, reconciliation and heartbeats are for nodes; clients
            // name their documents.
            Message::Hello { .. }
            | Message::Inventory { .. }
            | Message::Reconcile { .. }
            | Message::Ping
            | Message::Pong
            | Message::NotHeld { .. }
            | Message::Hubs { .. }
            | Message::WatchRegions { .. }
            | Message::HeldInRegions { .. } => {}
        }
    }

    /// Relays an ephemeral message this client originated to every other client of this node
    /// that syncs the document.
    ///
    /// automerge-repo clients pass on the ephemeral messages they receive, keeping the
    /// original sender. Those copies are dropped: the relay already reached every client here.
    fn on_ephemeral(&self, relayed: Relayed) -> Step {
        if relayed.sender_id != self.client {
            return Step::default();
        }
        if relayed.data.len() > MAX_EPHEMERAL_BYTES {
            let bytes = relayed.data.len();
            tracing::debug!(client = %self.client, bytes, "ephemeral message too large to relay");
            return Step::default();
        }
        // No receivers is fine: nobody else is connected.
        let _ = self.bridge.relay.send(Arc::new(relayed));
        Step::default()
    }

    fn on_relay(&self, relayed: Result<Arc<Relayed>, broadcast::error::RecvError>) -> Step {
        match relayed {
            Ok(message)
                if message.from_socket != self.socket_id
                    && message.sender_id != self.client
                    && self.followed.contains(&message.document_id) =>
            {
                Step::send(RepoMessage::Ephemeral {
                    sender_id: message.sender_id.clone(),
                    target_id: self.client.clone(),
                    count: message.count,
                    session_id: message.session_id.clone(),
                    document_id: message.document_id,
                    data: message.data.clone(),
                })
            }
            Ok(_) => Step::default(),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(client = %self.client, missed, "ephemeral messages dropped for a slow client");
                Step::default()
            }
            // The bridge holds the sender for as long as any session runs.
            Err(broadcast::error::RecvError::Closed) => {
                Step::end(Ending::Node("relay closed".into()))
            }
        }
    }
}

/// Sends the client an `error` (unless it just left), a close frame, and waits briefly for
/// its answer so the error is not lost to a connection reset.
async fn close(bridge: &Bridge, socket: &mut WebSocket, client: Option<&PeerId>, ending: Ending) {
    let (reason, code) = match ending {
        Ending::Quiet => return,
        Ending::Protocol(reason) => (reason, CLOSE_PROTOCOL_ERROR),
        Ending::Node(reason) => (reason, CLOSE_GOING_AWAY),
    };
    tracing::debug!(client = ?client.map(PeerId::as_str), %reason, "closing sync socket");
    let error = RepoMessage::Error {
        sender_id: Some(bridge.our_id.clone()),
        target_id: client.cloned(),
        message: reason.clone(),
    };
    let _ = socket.send(WsMessage::Binary(repo_wire::encode(&error).into())).await;
    // Close frames carry at most 123 bytes of reason.
    let short: String = reason.chars().take(60).collect();
    let frame = CloseFrame { code, reason: short.into() };
    let _ = socket.send(WsMessage::Close(Some(frame))).await;
    let _ =
        tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = socket.recv().await {} })
            .await;
}

/// The HLC id this client's frames are stamped with (derived from its peer id).
fn clock_id(peer: NodeId) -> uhlc::ID {
    // Only sixteen zero bytes are refused, which a SHA-256 prefix practically never is.
    uhlc::ID::try_from(*peer.as_bytes())
        .unwrap_or_else(|_| uhlc::ID::from(std::num::NonZeroU8::MIN))
}

/// A timestamp for a frame from a client: the wall clock (the node's HLC keeps its order).
fn now(id: uhlc::ID) -> uhlc::Timestamp {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    uhlc::Timestamp::new(uhlc::NTP64::from(since_epoch), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_collection_is_a_valid_name() {
        assert_eq!(default_collection().as_str(), DEFAULT_COLLECTION);
    }

    #[test]
    fn client_frames_carry_a_valid_clock_id() {
        let stamp = now(clock_id(NodeId::from_bytes([0; 16])));
        assert!(stamp.get_time().as_secs() > 0);
    }
}
