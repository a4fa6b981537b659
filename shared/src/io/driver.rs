//! The tokio loop that owns one [`Node`] and carries out its effects.
//!
//! One task owns the node; everything else talks to it through two bounded channels, so the
//! node needs no lock: commands (peer frames, connections, store replies, settings) and local
//! requests. Each turn: wait for either or for the node's timer, feed up to
//! [`MAX_COMMANDS_PER_TURN`] queued commands and then up to [`MAX_REQUESTS_PER_TURN`] queued
//! requests, then drain every output — frames to connection writers, tasks to the store
//! thread, answers to waiting requests. Commands come first so that a backlog of local writes
//! never holds back a peer's ping or a store reply: a node busy with writes still answers its
//! peers, which would otherwise close it as silent. The loop holds no protocol logic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::ids::{DocId, NodeId};
use crate::message::{HubInfo, Role};
use crate::node::RequestError;
use crate::node::{ConnId, Input, Node, NodeStats, Output, Request, RequestId, Response, StreamId};
use crate::scope::{CollectionScope, HoldingRule};
use crate::store_task::StoreTask;

/// Commands waiting for the node loop. Full means the node is saturated: callers wait.
pub const COMMAND_QUEUE_CAPACITY: usize = 8192;
/// Frames queued for one connection before it is closed as too slow.
pub const CONNECTION_QUEUE_CAPACITY: usize = 1024;
/// Commands handled per loop turn before outputs are drained, so output latency stays low.
pub const MAX_COMMANDS_PER_TURN: usize = 256;
/// How often a busy loop publishes its status.
const STATUS_INTERVAL: Duration = Duration::from_millis(10);
/// Local requests handled per loop turn: few, because one write may take milliseconds, and
/// commands waiting behind them wait for the whole turn.
pub const MAX_REQUESTS_PER_TURN: usize = 32;

/// What a connection writer is told.
#[derive(Debug)]
pub enum WriterMessage {
    /// Write these bytes.
    Frame(Vec<u8>),
    /// Finish the stream and close the connection, for this reason.
    Close(String),
}

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The node refused the request.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The node loop has stopped (shutdown or a fatal store error).
    #[error("node is not running")]
    Stopped,
}

/// A point-in-time view of the node for health, status and metrics.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// Protocol counters.
    pub stats: NodeStats,
    /// Committed documents, in memory or not.
    pub documents: usize,
    /// Documents in memory.
    pub cached_documents: usize,
    /// Stored bytes of the documents in memory (what the cache budget bounds).
    pub cached_bytes: usize,
    /// Documents quarantined.
    pub quarantined: usize,
    /// Peers with a completed handshake.
    pub ready_peers: usize,
    /// Per-peer document sync states in memory: live, and kept as heads alone.
    pub sync_states: (usize, usize),
    /// Commands waiting in the node's queue.
    pub queued_commands: usize,
    /// Connections the hub's admission control turned away, told to come back later.
    pub admission_refusals: u64,
    /// Replication lag of the hub peer furthest behind (zero without hub peers).
    pub lag_to_hubs: Duration,
    /// Replication lag of the agent peer furthest behind (zero without agent peers).
    pub lag_to_agents: Duration,
    /// The hubs the connected hub advertised (agents), where the agent may fail over to.
    pub learned_hubs: Vec<HubInfo>,
}

#[derive(Debug)]
enum Command {
    Input(Input),
    Attach {
        conn: ConnId,
        peer: NodeId,
        restrict: Option<CollectionScope>,
        writer: mpsc::Sender<WriterMessage>,
    },
    SetHolding(HoldingRule),
    SetHubDirectory(Vec<HubInfo>),
    SetRegions {
        own: String,
        hubs: BTreeMap<NodeId, String>,
    },
    Shutdown,
}

/// A local request and where its answer goes.
#[derive(Debug)]
struct QueuedRequest {
    request: Request,
    reply: oneshot::Sender<Result<Response, RequestError>>,
}

/// The answer to a request sent with [`NodeHandle::submit`].
#[derive(Debug)]
pub struct Answer(oneshot::Receiver<Result<Response, RequestError>>);

impl std::future::Future for Answer {
    type Output = Result<Response, DriverError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|answer| match answer {
            Ok(result) => result.map_err(DriverError::Request),
            Err(_) => Err(DriverError::Stopped),
        })
    }
}

/// A cheap, cloneable way to talk to a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    requests: mpsc::Sender<QueuedRequest>,
    next_conn: Arc<AtomicU64>,
    next_stream: Arc<AtomicU64>,
    admission_refusals: Arc<AtomicU64>,
    status: watch::Receiver<NodeStatus>,
    node_id: NodeId,
}

impl NodeHandle {
    /// The node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Sends a request and waits for the answer (writes: until durable).
    pub async fn request(&self, request: Request) -> Result<Response, DriverError> {
        self.submit(request).await?.await
    }

    /// Queues a request behind those already sent and returns its answer to await later, so
    /// that a caller can keep several requests in flight in a known order.
    pub async fn submit(&self, request: Request) -> Result<Answer, DriverError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(QueuedRequest { request, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        Ok(Answer(answer))
    }

    /// A new id for an ordered stream of writes ([`Request::InStream`]).
    pub fn new_stream(&self) -> StreamId {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Tells the node a stream to `doc_id` sends no more writes, without waiting (usable on
    /// drop).
    pub fn end_stream(&self, stream: StreamId, doc_id: DocId) {
        let (reply, _) = oneshot::channel();
        let request = Request::EndStream { stream, doc_id };
        // A full queue leaves the stream to the node's bound on stopped streams.
        let _ = self.requests.try_send(QueuedRequest { request, reply });
    }

    /// Registers a new connection's writer; returns its id. Bytes read from it go to [`Self::received`].
    pub async fn attach(
        &self,
        peer: NodeId,
        writer: mpsc::Sender<WriterMessage>,
    ) -> Result<ConnId, DriverError> {
        self.attach_scoped(peer, None, writer).await
    }

    /// Like [`Self::attach`], with the connection limited to the collections of `restrict`
    /// (beyond the node's own scope), as for a LAN neighbour.
    pub async fn attach_scoped(
        &self,
        peer: NodeId,
        restrict: Option<CollectionScope>,
        writer: mpsc::Sender<WriterMessage>,
    ) -> Result<ConnId, DriverError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.commands
            .send(Command::Attach { conn, peer, restrict, writer })
            .await
            .map_err(|_| DriverError::Stopped)?;
        Ok(conn)
    }

    /// Hands bytes read from a connection to the node.
    pub async fn received(&self, conn: ConnId, bytes: Vec<u8>) -> Result<(), DriverError> {
        self.input(Input::Received { conn, bytes }).await
    }

    /// Tells the node a connection is gone.
    pub async fn disconnected(&self, conn: ConnId) -> Result<(), DriverError> {
        self.input(Input::Disconnected { conn }).await
    }

    async fn input(&self, input: Input) -> Result<(), DriverError> {
        self.commands.send(Command::Input(input)).await.map_err(|_| DriverError::Stopped)
    }

    /// The latest status snapshot.
    pub fn status(&self) -> NodeStatus {
        let mut status = self.status.borrow().clone();
        status.admission_refusals = self.admission_refusals.load(Ordering::Relaxed);
        status
    }

    /// Counts a connection turned away by admission control.
    pub fn count_admission_refusal(&self) {
        self.admission_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// True while the node loop runs.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Limits the collections the node holds (a hub: what its region's policy gives it).
    /// Takes effect before any command or request sent after it.
    pub async fn set_holding(&self, rule: HoldingRule) -> Result<(), DriverError> {
        self.commands.send(Command::SetHolding(rule)).await.map_err(|_| DriverError::Stopped)
    }

    /// Sets the hubs this hub advertises to its agents (its own region's first).
    pub async fn set_hub_directory(&self, hubs: Vec<HubInfo>) -> Result<(), DriverError> {
        self.commands.send(Command::SetHubDirectory(hubs)).await.map_err(|_| DriverError::Stopped)
    }

    /// Sets the region this hub serves and the regions of the hubs it replicates with, which
    /// `regions:N` durability counts.
    pub async fn set_regions(
        &self,
        own: String,
        hubs: BTreeMap<NodeId, String>,
    ) -> Result<(), DriverError> {
        let command = Command::SetRegions { own, hubs };
        self.commands.send(command).await.map_err(|_| DriverError::Stopped)
    }

    /// Asks the loop to stop after closing every connection. Requests still queued are not
    /// handled: their callers get [`DriverError::Stopped`], never an answer for a write that
    /// was not made durable.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

/// Starts the node loop on the current tokio runtime.
///
/// `store` receives store tasks in order; store replies come back through the returned
/// [`StoreReplies`]. The loop ends on shutdown, or when the store queue closes.
pub fn spawn_node(
    node: Node,
    store: mpsc::Sender<(u64, StoreTask)>,
) -> (NodeHandle, StoreReplies, tokio::task::JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
    let (requests, request_receiver) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
    let (status_tx, status) = watch::channel(NodeStatus::default());
    let handle = NodeHandle {
        commands: commands.clone(),
        requests,
        next_conn: Arc::new(AtomicU64::new(1)),
        next_stream: Arc::new(AtomicU64::new(1)),
        admission_refusals: Arc::new(AtomicU64::new(0)),
        status,
        node_id: node.node_id(),
    };
    let replies = StoreReplies { commands };
    let driver = Driver {
        node,
        store,
        writers: BTreeMap::new(),
        requests: BTreeMap::new(),
        next_request: 0,
        status: status_tx,
    };
    let task = tokio::spawn(driver.run(receiver, request_receiver));
    (handle, replies, task)
}

/// The path by which the store thread answers the node.
#[derive(Debug, Clone)]
pub struct StoreReplies {
    commands: mpsc::Sender<Command>,
}

impl StoreReplies {
    /// Delivers a store reply from a blocking thread; false once the node loop is gone.
    pub fn deliver(&self, task: u64, reply: crate::store_task::StoreReply) -> bool {
        self.commands.blocking_send(Command::Input(Input::StoreDone { task, reply })).is_ok()
    }
}

struct Driver {
    node: Node,
    store: mpsc::Sender<(u64, StoreTask)>,
    writers: BTreeMap<ConnId, mpsc::Sender<WriterMessage>>,
    requests: BTreeMap<RequestId, oneshot::Sender<Result<Response, RequestError>>>,
    next_request: RequestId,
    status: watch::Sender<NodeStatus>,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut requests: mpsc::Receiver<QueuedRequest>,
    ) {
        // Documents loaded at start count before the first command arrives.
        self.publish_status(0);
        // Closed once every handle is gone; store replies may still come.
        let mut requests_open = true;
        let mut last_status = Instant::now();
        loop {
            let timer = self.node.poll_timeout().map(tokio::time::Instant::from_std);
            let (mut commands_taken, mut requests_taken) = (0, 0);
            tokio::select! {
                biased;
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    commands_taken = 1;
                    if !self.handle(command) {
                        break;
                    }
                }
                () = sleep_until(timer) => {
                    self.node.handle_timeout(Instant::now());
                }
                request = requests.recv(), if requests_open => match request {
                    Some(request) => {
                        requests_taken = 1;
                        self.handle_request(request);
                    }
                    None => requests_open = false,
                },
            }
            // A request is taken only once no command waits (within the turn's budget), so
            // whatever was sent before a request, such as a holding rule, is handled first.
            let mut stopping = false;
            loop {
                if commands_taken < MAX_COMMANDS_PER_TURN {
                    if let Ok(command) = commands.try_recv() {
                        commands_taken += 1;
                        if !self.handle(command) {
                            stopping = true;
                            break;
                        }
                        continue;
                    }
                }
                if requests_taken < MAX_REQUESTS_PER_TURN {
                    if let Ok(request) = requests.try_recv() {
                        requests_taken += 1;
                        self.handle_request(request);
                        continue;
                    }
                }
                break;
            }
            // Timers run every turn they are due: a loop kept busy by commands would otherwise
            // never pick the timer branch, and pacing, heartbeats and deadlines would stall.
            if self.node.poll_timeout().is_some_and(|due| due <= Instant::now()) {
                self.node.handle_timeout(Instant::now());
            }
            if !self.drain().await || stopping {
                break;
            }
            // Under load, at most every STATUS_INTERVAL (it walks every peer); always before
            // the loop goes idle, so a quiet node's status is never stale.
            let queued = commands.len() + requests.len();
            if queued == 0 || last_status.elapsed() >= STATUS_INTERVAL {
                self.publish_status(queued);
                last_status = Instant::now();
            }
        }
        for (_, writer) in std::mem::take(&mut self.writers) {
            let _ = writer.try_send(WriterMessage::Close("node shutting down".into()));
        }
    }

    fn handle_request(&mut self, QueuedRequest { request, reply }: QueuedRequest) {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, reply);
        self.node.handle_input(Instant::now(), Input::Request { id, request });
    }

    /// Feeds one command; false means stop.
    fn handle(&mut self, command: Command) -> bool {
        let now = Instant::now();
        match command {
            Command::Input(input) => {
                if let Input::Disconnected { conn } = &input {
                    self.writers.remove(conn);
                }
                // Peer frames and store replies are where merges and loads run.
                let timed = matches!(input, Input::Received { .. } | Input::StoreDone { .. });
                self.node.handle_input(now, input);
                if timed {
                    self.check_work(now.elapsed());
                }
            }
            Command::Attach { conn, peer, restrict, writer } => {
                self.writers.insert(conn, writer);
                self.node.handle_input(now, Input::Connected { conn, peer, restrict });
            }
            Command::SetHolding(rule) => self.node.set_holding(rule),
            Command::SetHubDirectory(hubs) => self.node.set_hub_directory(hubs),
            Command::SetRegions { own, hubs } => self.node.set_regions(own, hubs),
            Command::Shutdown => return false,
        }
        true
    }

    /// Tells the node when the input just handled overran `max_merge_ms` on one document.
    fn check_work(&mut self, took: Duration) {
        match overran(took, self.node.merge_limit(), self.node.documents_worked()) {
            Overrun::No => {}
            Overrun::One(doc_id) => {
                tracing::warn!(%doc_id, ?took, "merge or load overran max_merge_ms; quarantining");
                self.node.handle_input(Instant::now(), Input::WorkTook { doc_id, took });
            }
            Overrun::Several(documents) => {
                // A frame of several documents' messages cannot say which one was slow; the
                // culprit overruns alone at its next sync.
                tracing::warn!(documents, ?took, "an input of several merges overran max_merge_ms");
            }
        }
    }

    /// Carries out every pending output; false if the store is gone.
    async fn drain(&mut self) -> bool {
        while let Some(output) = self.node.poll_output() {
            match output {
                Output::Transmit { conn, bytes } => {
                    let Some(writer) = self.writers.get(&conn) else {
                        continue;
                    };
                    if writer.try_send(WriterMessage::Frame(bytes)).is_err() {
                        // A peer that cannot keep up is dropped; it catches up on reconnect.
                        tracing::warn!(conn, "closing connection: send queue full");
                        self.writers.remove(&conn);
                        self.node.handle_input(Instant::now(), Input::Disconnected { conn });
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(writer) = self.writers.remove(&conn) {
                        tracing::info!(conn, %reason, "closing connection");
                        let _ = writer.try_send(WriterMessage::Close(reason));
                    }
                }
                Output::Store { task, action } => {
                    if self.store.send((task, action)).await.is_err() {
                        tracing::error!("store stopped; node loop ends");
                        return false;
                    }
                }
                Output::Respond { id, result } => {
                    if let Some(reply) = self.requests.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
        true
    }

    fn max_lag(&self, role: Role) -> Duration {
        let lags = self.node.replication_lag().into_iter().filter(|l| l.role == role);
        lags.map(|l| l.lag).max().unwrap_or_default()
    }

    fn publish_status(&self, queued_commands: usize) {
        let status = NodeStatus {
            stats: self.node.stats().clone(),
            documents: self.node.document_count(),
            cached_documents: self.node.cache_usage().0,
            cached_bytes: self.node.cache_usage().1,
            quarantined: self.node.quarantined().count(),
            ready_peers: self.node.ready_peers(),
            sync_states: self.node.sync_states(),
            queued_commands,
            // Filled in by `NodeHandle::status` from the acceptor's count.
            admission_refusals: 0,
            lag_to_hubs: self.max_lag(Role::Hub),
            lag_to_agents: self.max_lag(Role::Agent),
            learned_hubs: self.node.learned_hubs().to_vec(),
        };
        self.status.send_replace(status);
    }
}

/// Whether an input that took `took` overran the merge limit, and on which document.
#[derive(Debug, PartialEq, Eq)]
enum Overrun {
    No,
    One(DocId),
    Several(usize),
}

fn overran(took: Duration, limit: Option<Duration>, worked: &[DocId]) -> Overrun {
    match (limit, worked) {
        (Some(limit), [doc_id]) if took > limit => Overrun::One(*doc_id),
        (Some(limit), several) if took > limit && several.len() > 1 => {
            Overrun::Several(several.len())
        }
        _ => Overrun::No,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncConfig;
    use crate::frame::{encode_frame, FrameDecoder};
    use crate::message::{Envelope, Message};

    fn frame(message: Message) -> Vec<u8> {
        let sender = uhlc::ID::try_from([2u8; 16]).unwrap();
        let sent_at = uhlc::HLC::default().new_timestamp();
        let envelope =
            Envelope { sent_at: uhlc::Timestamp::new(*sent_at.get_time(), sender), message };
        encode_frame(&envelope.encode(), SyncConfig::MIN_FRAME_BYTES).unwrap()
    }

    /// A hub node behind a driver whose store queue holds one task, read by the test: once
    /// two writes are handled, the loop stalls on sending the second one's task.
    fn hub_with_store_queue_of_one(
        config: SyncConfig,
    ) -> (NodeHandle, mpsc::Receiver<(u64, StoreTask)>) {
        let node = Node::new(
            NodeId::from_bytes([1; 16]),
            Role::Hub,
            automerge::ActorId::from(vec![1u8; 16]),
            uhlc::HLC::default(),
            SyncConfig { heartbeat_interval_ms: 0, ..config },
        );
        let (store, store_tasks) = mpsc::channel(1);
        let (handle, _replies, _task) = spawn_node(node, store);
        (handle, store_tasks)
    }

    /// Creates document `n` with one field.
    fn create(n: u64) -> Request {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(n + 1).to_be_bytes());
        let ops = serde_json::from_value(serde_json::json!([
            {"op": "set", "path": ["n"], "value": n}
        ]))
        .unwrap();
        Request::Create {
            doc_id: DocId::from_slice(&id).unwrap(),
            collection: "c".parse().unwrap(),
            ops,
        }
    }

    /// Waits until the loop has sent its first store task and reached the send that blocks.
    async fn until_stalled(store_tasks: &mpsc::Receiver<(u64, StoreTask)>) {
        while store_tasks.is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Attaches an agent peer that has said hello.
    async fn ready_peer(
        handle: &NodeHandle,
        id: u8,
        writer: mpsc::Sender<WriterMessage>,
    ) -> ConnId {
        let peer = NodeId::from_bytes([id; 16]);
        let conn = handle.attach(peer, writer).await.unwrap();
        let hello =
            Message::Hello { node_id: peer, role: Role::Agent, scope: CollectionScope::all() };
        handle.received(conn, frame(hello)).await.unwrap();
        conn
    }

    #[test]
    fn only_an_overrun_on_one_document_names_it() {
        let (a, b) = (DocId::from_slice(&[1; 16]).unwrap(), DocId::from_slice(&[2; 16]).unwrap());
        let limit = Some(Duration::from_secs(30));
        let (fast, slow) = (Duration::from_secs(29), Duration::from_secs(31));
        assert_eq!(overran(slow, limit, &[a]), Overrun::One(a));
        assert_eq!(overran(fast, limit, &[a]), Overrun::No);
        assert_eq!(overran(slow, limit, &[a, b]), Overrun::Several(2));
        assert_eq!(overran(slow, limit, &[]), Overrun::No);
        assert_eq!(overran(slow, None, &[a]), Overrun::No, "no limit");
    }

    #[tokio::test]
    async fn a_due_timer_runs_before_a_backlog_of_peer_frames_is_through() {
        const PINGS: usize = 4_000;
        let config = SyncConfig { hello_timeout_ms: 10, ..SyncConfig::hub() };
        let (handle, mut store_tasks) = hub_with_store_queue_of_one(config);
        // Both connections write into one queue, so it shows the order the loop acted in.
        let (writer, mut written) = mpsc::channel(2 * PINGS + 64);
        let busy = ready_peer(&handle, 2, writer.clone()).await;
        // A connection that never says hello: only the node's timer closes it.
        handle.attach(NodeId::from_bytes([3; 16]), writer).await.unwrap();
        for n in 0..2 {
            drop(handle.submit(create(n)).await.unwrap());
        }
        until_stalled(&store_tasks).await;
        let ping = frame(Message::Ping);
        for _ in 0..PINGS {
            handle.received(busy, ping.clone()).await.unwrap();
        }
        // The silent connection's hello deadline passes while the loop is stalled.
        std::thread::sleep(Duration::from_millis(30));
        let mut decoder = FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES);
        let mut pongs_before_close = 0;
        'close: loop {
            tokio::select! {
                _ = store_tasks.recv() => {}
                message = written.recv() => match message {
                    Some(WriterMessage::Close(reason)) => {
                        assert!(reason.contains("hello"), "{reason}");
                        break 'close;
                    }
                    Some(WriterMessage::Frame(bytes)) => {
                        decoder.push(&bytes);
                        while let Some(payload) = decoder.next_frame().unwrap() {
                            if Envelope::decode(&payload).unwrap().message == Message::Pong {
                                pongs_before_close += 1;
                            }
                        }
                    }
                    None => panic!("the node loop stopped"),
                },
            }
        }
        // At most one turn of commands before the timer ran (a loop that ran timers only when
        // idle would have answered every ping first).
        assert!(
            pongs_before_close <= MAX_COMMANDS_PER_TURN,
            "{pongs_before_close} of {PINGS} pings answered before the due timer ran"
        );
    }

    #[tokio::test]
    async fn a_peer_ping_is_answered_ahead_of_a_backlog_of_local_writes() {
        const WRITES: usize = 1_000;
        let (handle, mut store_tasks) = hub_with_store_queue_of_one(SyncConfig::hub());
        let (writer, mut frames) = mpsc::channel(4 * WRITES);
        let conn = ready_peer(&handle, 2, writer).await;
        // Two writes stall the loop, so the writes after them and the ping all wait in their
        // queues.
        let mut answers = Vec::new();
        for n in 0..WRITES as u64 + 2 {
            answers.push(handle.submit(create(n)).await.unwrap());
            if n == 1 {
                until_stalled(&store_tasks).await;
            }
        }
        handle.received(conn, frame(Message::Ping)).await.unwrap();
        // Read store tasks until the pong is out; every write handled before the ping put one
        // task in the store queue.
        let mut decoder = FrameDecoder::new(SyncConfig::MAX_FRAME_BYTES);
        let mut tasks_before_pong = 0;
        'pong: loop {
            tokio::select! {
                task = store_tasks.recv() => {
                    assert!(task.is_some(), "the node loop stopped");
                    tasks_before_pong += 1;
                }
                written = frames.recv() => {
                    let Some(WriterMessage::Frame(bytes)) = written else { panic!("{written:?}") };
                    decoder.push(&bytes);
                    while let Some(payload) = decoder.next_frame().unwrap() {
                        if Envelope::decode(&payload).unwrap().message == Message::Pong {
                            break 'pong;
                        }
                    }
                }
            }
        }
        // The two that stalled the loop, and at most one turn of requests after them (a single
        // queue would have handled all of them first).
        assert!(
            tasks_before_pong <= 2 + MAX_REQUESTS_PER_TURN,
            "{tasks_before_pong} of {} writes were handled before the ping",
            WRITES + 2
        );
        drop(answers);
    }
}
