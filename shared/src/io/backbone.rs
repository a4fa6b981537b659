//! The backbone: hubs replicating with each other over zenoh, as one more carrier for the
//! same frames the QUIC links carry. The same carrier joins the agents of one site on their LAN
//! (see `io::lan`): only the keys and the collections a link carries differ.
//!
//! Each hub opens a zenoh session, subscribes to the frames addressed to it, and declares a
//! liveliness token `cairn/<fleet>/hubs/<node id>/<region>/<incarnation>/<agent address>`
//! (the agent address is the QUIC address its agents dial, or `-`). It watches the tokens of
//! the other hubs, history included; for each one that appears it attaches a connection to its
//! node, whose peer id is the node id named in the token. From there the node does what it
//! does over QUIC: `Hello`, reconciliation, per-document sync, live pushes.
//!
//! Frames for a remote hub go to `cairn/<fleet>/link/<to>/<to incarnation>/<from>/<from
//! incarnation>/<link epoch>`, one sample per frame, published reliably with blocking
//! congestion control. The incarnations make samples addressed to or sent by an earlier run of
//! either hub fall on the floor rather than into a fresh handshake. The epoch numbers the
//! connections this hub attached for one remote incarnation: a sample with a newer epoch than
//! the one in use means the remote started over (its node closed the link), so this side
//! starts over too; older epochs are stale and dropped. Because every sample carries whole
//! frames, a sample zenoh loses costs one message, never the framing, and the periodic
//! reconciliation (`anti_entropy_interval_ms`) repairs whatever that message carried.
//!
//! On a LAN, an agent's token is `cairn/<fleet>/lan/<site>/agents/<node id>/<incarnation>` and
//! its frames travel under `cairn/<fleet>/lan/<site>/link/...` with the same segments as above,
//! so agents of other sites and hubs never see them. Each LAN link is attached with the
//! collections marked shared-on-LAN as its restriction, so it carries only those, while the
//! agent's link to its hub carries everything.
//!
//! Control loop: one task owns the table of remote members and reacts to token changes, arriving
//! samples, links the node closed, and a retry tick; one writer task per attached link
//! publishes the node's frames in order. Nothing here reads the frames.
//!
//! Trust: zenoh's TLS with mutual authentication against the fleet CA (the `tls` settings)
//! admits only fleet members to the backbone, and the node checks that each `Hello` names the
//! node id the token named. zenoh does not tie a token to the certificate of the session that
//! declared it, so this proves fleet membership, not which member: a fleet certificate holder
//! could announce another node's id. Without TLS (the lab default on 127.0.0.1) any process
//! that reaches the zenoh endpoints can join, so production deployments must configure TLS.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use zenoh::qos::CongestionControl;
use zenoh::sample::{Sample, SampleKind};

use super::backbone_metrics::BackboneMetrics;
use super::driver::{NodeHandle, WriterMessage, CONNECTION_QUEUE_CAPACITY};
use crate::frame::LENGTH_PREFIX_BYTES;
use crate::ids::NodeId;
use crate::node::ConnId;
use crate::replication::Region;
use crate::scope::CollectionScope;

/// Samples kept per remote hub whose token has not been seen yet (its first frames can
/// overtake its token); more are dropped and the handshake is retried.
pub const MAX_PENDING_SAMPLES_PER_HUB: usize = 64;
/// Remote hubs with pending samples at once; samples from more are dropped.
pub const MAX_PENDING_HUBS: usize = 16;
/// Bytes of pending samples across all such hubs (first frames are small: hello, summary).
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// How long after its node closed a link this hub attaches a new one to the same remote.
pub const REATTACH_DELAY: Duration = Duration::from_secs(1);
/// Link events (closed links) waiting for the control loop.
const EVENT_QUEUE_CAPACITY: usize = 256;
/// Longest fleet (or LAN site) name, in bytes.
pub const MAX_FLEET_BYTES: usize = 64;
/// Shortest link lease: zenoh sends keep-alives four times per lease.
pub const MIN_LEASE_MS: u64 = 500;
/// Longest link lease.
pub const MAX_LEASE_MS: u64 = 600_000;
/// Remote hub runs whose last link epoch is remembered after their token left, so frames of
/// their old links are still recognised as stale if the same run comes back.
pub const MAX_RETIRED_REMOTES: usize = 256;

/// How this hub takes part in the zenoh network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneMode {
    /// Talks directly to the other peers it reaches (the usual choice for hubs).
    #[default]
    Peer,
    /// Talks through one router.
    Client,
    /// Routes for others too.
    Router,
}

impl std::str::FromStr for BackboneMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "peer" => Ok(Self::Peer),
            "client" => Ok(Self::Client),
            "router" => Ok(Self::Router),
            other => Err(format!("{other:?}: expected peer, client or router")),
        }
    }
}

impl BackboneMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::Client => "client",
            Self::Router => "router",
        }
    }
}

/// zenoh's TLS with mutual authentication: PEM files of the fleet CA and this hub's
/// certificate and key. Endpoints then use the `tls/` scheme.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneTls {
    /// The fleet CA certificate that every backbone member's certificate chains to.
    pub root_ca: PathBuf,
    /// This hub's certificate.
    pub certificate: PathBuf,
    /// This hub's private key.
    pub private_key: PathBuf,
}

/// Backbone settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    /// Whether the hub joins the backbone at all.
    pub enabled: bool,
    /// Peer, client or router.
    pub mode: BackboneMode,
    /// zenoh endpoints to listen on, such as `tcp/0.0.0.0:7447` or `tls/0.0.0.0:7447`.
    /// Empty: listen nowhere (this hub only dials).
    pub listen: Vec<String>,
    /// zenoh endpoints to connect to (other hubs or routers); retried until they answer.
    pub connect: Vec<String>,
    /// Find peers by UDP multicast (a LAN lab); off so nothing is found by accident.
    pub multicast_scouting: bool,
    /// Key prefix separating fleets that share a zenoh network.
    pub fleet: String,
    /// A zenoh link silent this long is dead, and the hubs behind it leave, in milliseconds.
    pub lease_ms: u64,
    /// TLS for the zenoh links; required in production.
    pub tls: Option<BackboneTls>,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: BackboneMode::Peer,
            listen: Vec::new(),
            connect: Vec::new(),
            multicast_scouting: false,
            fleet: "default".into(),
            lease_ms: 10_000,
            tls: None,
        }
    }
}

impl BackboneConfig {
    /// Checks what zenoh would otherwise refuse late or silently.
    pub fn validate(&self) -> Result<(), BackboneError> {
        self.validate_section("backbone")
    }

    /// Like [`Self::validate`], naming the settings' configuration `section` in errors.
    pub(super) fn validate_section(&self, section: &str) -> Result<(), BackboneError> {
        check_key_segment(section, "fleet", &self.fleet)?;
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(BackboneError::Config(format!(
                "{section}.lease_ms {}: use {MIN_LEASE_MS} to {MAX_LEASE_MS}",
                self.lease_ms
            )));
        }
        for endpoint in self.listen.iter().chain(&self.connect) {
            endpoint.parse::<zenoh::config::EndPoint>().map_err(|e| {
                BackboneError::Config(format!("{section} endpoint {endpoint:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// The zenoh session configuration these settings describe.
    pub fn zenoh_config(&self) -> Result<zenoh::Config, BackboneError> {
        self.validate()?;
        let mut config = zenoh::Config::default();
        let mut set = |key: &str, value: serde_json::Value| {
            config
                .insert_json5(key, &value.to_string())
                .map_err(|e| BackboneError::Config(format!("zenoh {key}: {e}")))
        };
        set("mode", self.mode.as_str().into())?;
        set("listen/endpoints", serde_json::json!(self.listen))?;
        set("connect/endpoints", serde_json::json!(self.connect))?;
        set("scouting/multicast/enabled", self.multicast_scouting.into())?;
        set("transport/link/tx/lease", self.lease_ms.into())?;
        if let Some(tls) = &self.tls {
            let path = |p: &PathBuf| serde_json::Value::from(p.display().to_string());
            set("transport/link/tls/root_ca_certificate", path(&tls.root_ca))?;
            set("transport/link/tls/listen_certificate", path(&tls.certificate))?;
            set("transport/link/tls/listen_private_key", path(&tls.private_key))?;
            set("transport/link/tls/connect_certificate", path(&tls.certificate))?;
            set("transport/link/tls/connect_private_key", path(&tls.private_key))?;
            set("transport/link/tls/enable_mtls", true.into())?;
        }
        Ok(config)
    }
}

/// Checks that `value`, setting `section.name`, can be one segment of a key expression.
pub(super) fn check_key_segment(
    section: &str,
    name: &str,
    value: &str,
) -> Result<(), BackboneError> {
    let valid = !value.is_empty()
        && value.len() <= MAX_FLEET_BYTES
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        return Ok(());
    }
    Err(BackboneError::Config(format!(
        "{section}.{name} {value:?}: use 1 to {MAX_FLEET_BYTES} letters, digits, '-' or '_'"
    )))
}

/// Why the backbone could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// A setting is invalid.
    #[error("backbone configuration: {0}")]
    Config(String),
    /// zenoh refused to open a session or declare an entity.
    #[error("zenoh: {0}")]
    Zenoh(zenoh::Error),
}

/// Longest agent address a hub announces, in bytes.
pub const MAX_AGENT_ADDRESS_BYTES: usize = 255;

/// What a hub announces about itself in its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The region it serves.
    pub region: Region,
    /// The QUIC address (`host:port`) its agents dial, if it has one worth announcing.
    pub agent_address: Option<String>,
}

impl Announcement {
    /// Checks that the address can travel in a key expression: `host:port`, with a host of
    /// letters, digits, `.`, `-`, `:`, `[` and `]` (names, IPv4, bracketed IPv6).
    pub fn new(region: Region, agent_address: Option<String>) -> Result<Self, BackboneError> {
        if let Some(address) = &agent_address {
            let valid = address.len() <= MAX_AGENT_ADDRESS_BYTES
                && address.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                        && port.parse::<u16>().is_ok()
                });
            if !valid {
                return Err(BackboneError::Config(format!(
                    "agent address {address:?}: expected host:port"
                )));
            }
        }
        Ok(Self { region, agent_address })
    }
}

/// Another hub as this hub sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteHub {
    /// Its node id.
    #[serde(serialize_with = "as_text")]
    pub node_id: NodeId,
    /// Its region, as its token names it.
    pub region: Region,
    /// The QUIC address its agents dial, as its token names it.
    pub agent_address: Option<String>,
    /// Which run of that hub this is (drawn at its start).
    pub incarnation: String,
    /// Whether a link is attached and the hub has sent frames on it.
    pub connected: bool,
}

fn as_text<S: serde::Serializer>(node_id: &NodeId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(node_id)
}

/// What this node is on the zenoh network: it decides the keys and what links carry.
#[derive(Debug, Clone)]
pub(super) enum Membership {
    /// A hub on its fleet's backbone; links carry every collection.
    Hub(Announcement),
    /// An agent on its site's LAN; links carry only `collections`.
    LanAgent {
        /// The site: only agents of the same site see each other.
        site: String,
        /// The collections shared on the LAN.
        collections: CollectionScope,
    },
}

/// Another member as this node sees it: a hub (with its announcement) or a LAN neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    /// Its node id.
    pub node_id: NodeId,
    /// What a hub announced; `None` for a LAN neighbour.
    pub announcement: Option<Announcement>,
    /// Which run of that node this is.
    pub incarnation: u64,
    /// Whether a link is attached and the member has sent frames on it.
    pub connected: bool,
}

/// A running membership of the backbone (or, through `io::lan`, of a site's LAN).
#[derive(Debug)]
pub struct Backbone {
    members: watch::Receiver<Vec<Member>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Backbone {
    /// Joins the backbone and starts attaching remote hubs to `node`.
    ///
    /// `max_frame_bytes` bounds a sample (one frame plus its length prefix); `metrics` are
    /// the registry's backbone metrics, which this membership feeds.
    pub async fn start(
        config: &BackboneConfig,
        announcement: Announcement,
        node: NodeHandle,
        max_frame_bytes: usize,
        metrics: BackboneMetrics,
    ) -> Result<Self, BackboneError> {
        let membership = Membership::Hub(announcement);
        Self::join(config, membership, node, max_frame_bytes, metrics).await
    }

    /// Joins the zenoh network described by `config` as `membership` and starts attaching
    /// the other members to `node`.
    pub(super) async fn join(
        config: &BackboneConfig,
        membership: Membership,
        node: NodeHandle,
        max_frame_bytes: usize,
        metrics: BackboneMetrics,
    ) -> Result<Self, BackboneError> {
        let session = zenoh::open(config.zenoh_config()?).await.map_err(BackboneError::Zenoh)?;
        let keys = Keys::new(&config.fleet, &membership, node.node_id(), rand::random());
        // Frames can arrive as soon as others see the token, so subscribe first.
        let frames =
            session.declare_subscriber(keys.inbox()).await.map_err(BackboneError::Zenoh)?;
        let token = session
            .liveliness()
            .declare_token(keys.token(&membership))
            .await
            .map_err(BackboneError::Zenoh)?;
        let tokens = session
            .liveliness()
            .declare_subscriber(keys.every_token())
            .history(true)
            .await
            .map_err(BackboneError::Zenoh)?;
        tracing::info!(
            keys = %keys.root,
            incarnation = %format!("{:016x}", keys.incarnation),
            zenoh_id = %session.zid(),
            "joined {}",
            keys.kind.network()
        );
        let restrict = match membership {
            Membership::Hub(_) => None,
            Membership::LanAgent { collections, .. } => Some(collections),
        };
        let (members_tx, members) = watch::channel(Vec::new());
        let (stop, stop_rx) = watch::channel(false);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let links = Links {
            session: session.clone(),
            keys,
            node,
            restrict,
            max_sample_bytes: max_frame_bytes + LENGTH_PREFIX_BYTES,
            remotes: BTreeMap::new(),
            retired: BTreeMap::new(),
            pending: PendingSamples::default(),
            next_epoch: 1,
            events_tx,
            members: members_tx,
            metrics,
        };
        let task = tokio::spawn(async move {
            links.run(frames, tokens, events, stop_rx).await;
            let _ = token.undeclare().await;
            let _ = session.close().await;
        });
        Ok(Self { members, stop, task })
    }

    /// The other hubs currently on the backbone.
    pub fn hubs(&self) -> Vec<RemoteHub> {
        let members = self.members.borrow();
        let hubs = members.iter().filter_map(|member| {
            let announcement = member.announcement.clone()?;
            Some(RemoteHub {
                node_id: member.node_id,
                region: announcement.region,
                agent_address: announcement.agent_address,
                incarnation: format!("{:016x}", member.incarnation),
                connected: member.connected,
            })
        });
        hubs.collect()
    }

    /// Every other member currently present, hub or LAN neighbour.
    pub(super) fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    /// Leaves the network: detaches every link, withdraws the token, closes the session.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Which kind of member a node is, as far as keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberKind {
    Hub,
    LanAgent,
}

impl MemberKind {
    /// What the other members are called in logs.
    fn noun(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::LanAgent => "LAN neighbour",
        }
    }

    /// The network joined, in logs.
    fn network(self) -> &'static str {
        match self {
            Self::Hub => "the backbone",
            Self::LanAgent => "the LAN",
        }
    }
}

/// Key expressions this node uses.
#[derive(Debug, Clone)]
struct Keys {
    /// `cairn/<fleet>` on the backbone, `cairn/<fleet>/lan/<site>` on a LAN.
    root: String,
    kind: MemberKind,
    me: NodeId,
    incarnation: u64,
}

impl Keys {
    fn new(fleet: &str, membership: &Membership, me: NodeId, incarnation: u64) -> Self {
        let (root, kind) = match membership {
            Membership::Hub(_) => (format!("cairn/{fleet}"), MemberKind::Hub),
            Membership::LanAgent { site, .. } => {
                (format!("cairn/{fleet}/lan/{site}"), MemberKind::LanAgent)
            }
        };
        Self { root, kind, me, incarnation }
    }

    fn token(&self, membership: &Membership) -> String {
        let (root, me, incarnation) = (&self.root, self.me, self.incarnation);
        match membership {
            Membership::Hub(Announcement { region, agent_address }) => {
                let address = agent_address.as_deref().unwrap_or("-");
                format!("{root}/hubs/{me}/{region}/{incarnation:016x}/{address}")
            }
            Membership::LanAgent { .. } => format!("{root}/agents/{me}/{incarnation:016x}"),
        }
    }

    fn every_token(&self) -> String {
        match self.kind {
            MemberKind::Hub => format!("{}/hubs/*/*/*/*", self.root),
            MemberKind::LanAgent => format!("{}/agents/*/*", self.root),
        }
    }

    fn inbox(&self) -> String {
        format!("{}/link/{}/{:016x}/*/*/*", self.root, self.me, self.incarnation)
    }

    fn outbox(&self, to: &RemoteKey, epoch: u64) -> String {
        format!(
            "{}/link/{}/{:016x}/{}/{:016x}/{epoch}",
            self.root, to.node_id, to.incarnation, self.me, self.incarnation
        )
    }

    /// The member a token key names, with what it announced if it is a hub.
    fn parse_token(&self, key: &str) -> Option<(RemoteKey, Option<Announcement>)> {
        match self.kind {
            MemberKind::Hub => {
                let rest = key.strip_prefix(&format!("{}/hubs/", self.root))?;
                let mut parts = rest.split('/');
                let node_id = parts.next()?.parse().ok()?;
                let region = parts.next()?.parse().ok()?;
                let incarnation = u64::from_str_radix(parts.next()?, 16).ok()?;
                let address = Some(parts.next()?.to_owned()).filter(|a| a != "-");
                let announcement = Announcement::new(region, address).ok()?;
                let remote = RemoteKey { node_id, incarnation };
                parts.next().is_none().then_some((remote, Some(announcement)))
            }
            MemberKind::LanAgent => {
                let rest = key.strip_prefix(&format!("{}/agents/", self.root))?;
                let mut parts = rest.split('/');
                let node_id = parts.next()?.parse().ok()?;
                let incarnation = u64::from_str_radix(parts.next()?, 16).ok()?;
                parts.next().is_none().then_some((RemoteKey { node_id, incarnation }, None))
            }
        }
    }

    /// The sender and link epoch a frame key in this node's inbox names.
    fn parse_frame(&self, key: &str) -> Option<(RemoteKey, u64)> {
        let inbox = format!("{}/link/{}/{:016x}/", self.root, self.me, self.incarnation);
        let mut parts = key.strip_prefix(&inbox)?.split('/');
        let node_id = parts.next()?.parse().ok()?;
        let incarnation = u64::from_str_radix(parts.next()?, 16).ok()?;
        let epoch = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((RemoteKey { node_id, incarnation }, epoch))
    }
}

/// One run of one remote member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RemoteKey {
    node_id: NodeId,
    incarnation: u64,
}

/// A remote member whose token is present.
#[derive(Debug)]
struct Remote {
    /// What a hub announced; `None` for a LAN neighbour.
    announcement: Option<Announcement>,
    link: Option<Link>,
    /// The newest remote epoch this side has adopted; older or equal ones are stale for a new link.
    last_remote_epoch: u64,
    /// When to attach again after the node closed the link.
    retry_at: Option<Instant>,
}

/// A connection attached to the node for one remote member.
#[derive(Debug)]
struct Link {
    conn: ConnId,
    epoch: u64,
    /// The remote's epoch this link talks to, once its first sample arrived.
    remote_epoch: Option<u64>,
    writer: tokio::task::JoinHandle<()>,
}

/// A writer finished: the node closed its link, or publishing stopped.
#[derive(Debug)]
struct LinkClosed {
    remote: RemoteKey,
    epoch: u64,
}

/// The control loop's state: every remote member and its link.
struct Links {
    session: zenoh::Session,
    keys: Keys,
    node: NodeHandle,
    /// The collections every link is limited to (the LAN's), or `None` for every collection.
    restrict: Option<CollectionScope>,
    max_sample_bytes: usize,
    remotes: BTreeMap<RemoteKey, Remote>,
    /// The last epoch adopted from remote runs whose token left (bounded).
    retired: BTreeMap<RemoteKey, u64>,
    pending: PendingSamples,
    next_epoch: u64,
    events_tx: mpsc::Sender<LinkClosed>,
    members: watch::Sender<Vec<Member>>,
    metrics: BackboneMetrics,
}

type SampleSubscriber = zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<Sample>>;

impl Links {
    async fn run(
        mut self,
        frames: SampleSubscriber,
        tokens: SampleSubscriber,
        mut closed: mpsc::Receiver<LinkClosed>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(REATTACH_DELAY / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let running = tokio::select! {
                sample = frames.recv_async() => match sample {
                    Ok(sample) => self.on_frame_sample(&sample).await,
                    Err(_) => false,
                },
                sample = tokens.recv_async() => match sample {
                    Ok(sample) => self.on_token_sample(&sample).await,
                    Err(_) => false,
                },
                Some(event) = closed.recv() => self.on_link_closed(event).await,
                _ = tick.tick() => self.reattach_due().await,
                _ = stop.changed() => false,
            };
            self.publish_members();
            if !running {
                break;
            }
        }
        let remotes: Vec<RemoteKey> = self.remotes.keys().copied().collect();
        for remote in remotes {
            self.detach(remote).await;
        }
    }

    /// A token appeared or vanished. False once the node is gone.
    async fn on_token_sample(&mut self, sample: &Sample) -> bool {
        let Some((remote, announcement)) = self.keys.parse_token(sample.key_expr().as_str()) else {
            tracing::debug!(key = %sample.key_expr(), "ignoring a token that names no member");
            return true;
        };
        if remote.node_id == self.keys.me {
            return true;
        }
        match sample.kind() {
            SampleKind::Put => {
                if self.remotes.contains_key(&remote) {
                    return true;
                }
                let (noun, network) = (self.keys.kind.noun(), self.keys.kind.network());
                let peer = remote.node_id;
                match &announcement {
                    Some(a) => {
                        tracing::info!(%peer, region = %a.region, "{noun} appeared on {network}")
                    }
                    None => tracing::info!(%peer, "{noun} appeared on {network}"),
                }
                // A run whose token comes back (a healed partition) keeps its epoch floor.
                let last_remote_epoch = self.retired.remove(&remote).unwrap_or(0);
                let fresh = Remote { announcement, link: None, last_remote_epoch, retry_at: None };
                self.remotes.insert(remote, fresh);
                if !self.attach(remote).await {
                    return false;
                }
                for (epoch, bytes) in self.pending.take(&remote) {
                    if !self.deliver(remote, epoch, bytes).await {
                        return false;
                    }
                }
                true
            }
            SampleKind::Delete => {
                let (noun, network) = (self.keys.kind.noun(), self.keys.kind.network());
                tracing::info!(peer = %remote.node_id, "{noun} left {network}");
                self.pending.take(&remote);
                self.detach(remote).await;
                if let Some(state) = self.remotes.remove(&remote) {
                    if self.retired.len() >= MAX_RETIRED_REMOTES {
                        self.retired.pop_first();
                    }
                    self.retired.insert(remote, state.last_remote_epoch);
                }
                true
            }
        }
    }

    /// Frames arrived from a remote member. False once the node is gone.
    async fn on_frame_sample(&mut self, sample: &Sample) -> bool {
        let Some((remote, epoch)) = self.keys.parse_frame(sample.key_expr().as_str()) else {
            self.metrics.samples_dropped.inc();
            return true;
        };
        let size = sample.payload().len();
        if size > self.max_sample_bytes {
            self.metrics.samples_oversized.inc();
            tracing::warn!(peer = %remote.node_id, size, "dropping an oversized zenoh sample");
            return true;
        }
        let bytes = sample.payload().to_bytes().into_owned();
        if self.remotes.contains_key(&remote) {
            return self.deliver(remote, epoch, bytes).await;
        }
        // The sender saw our token before we saw its own: keep its first frames a moment.
        if !self.pending.push(remote, epoch, bytes) {
            self.metrics.samples_dropped.inc();
        }
        true
    }

    /// Feeds a sample from a known remote to the right link, starting over when the remote did.
    async fn deliver(&mut self, remote: RemoteKey, epoch: u64, bytes: Vec<u8>) -> bool {
        let Some(state) = self.remotes.get(&remote) else { return true };
        let current = state.link.as_ref().map(|link| link.remote_epoch);
        let accept = match admit(state.last_remote_epoch, current, epoch) {
            Admission::Feed => true,
            Admission::Drop => false,
            Admission::NewLink => self.attach(remote).await,
            Admission::RestartLink => {
                let noun = self.keys.kind.noun();
                tracing::info!(peer = %remote.node_id, "remote {noun} restarted the link");
                self.detach(remote).await;
                self.attach(remote).await
            }
        };
        if !self.node.is_running() {
            return false;
        }
        let Some(state) = self.remotes.get_mut(&remote) else { return true };
        let Some(link) = state.link.as_mut().filter(|_| accept) else {
            self.metrics.samples_dropped.inc();
            return true;
        };
        link.remote_epoch = Some(epoch);
        state.last_remote_epoch = epoch;
        self.metrics.samples_delivered.inc();
        self.node.received(link.conn, bytes).await.is_ok()
    }

    /// Attaches a new link to the node for `remote`. False once the node is gone.
    async fn attach(&mut self, remote: RemoteKey) -> bool {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let (writer_tx, writer_rx) = mpsc::channel(CONNECTION_QUEUE_CAPACITY);
        let restrict = self.restrict.clone();
        let Ok(conn) = self.node.attach_scoped(remote.node_id, restrict, writer_tx).await else {
            return false;
        };
        let writer = tokio::spawn(publish_frames(
            self.session.clone(),
            self.keys.outbox(&remote, epoch),
            writer_rx,
            self.events_tx.clone(),
            LinkClosed { remote, epoch },
            self.metrics.clone(),
        ));
        self.metrics.links_attached.inc();
        let noun = self.keys.kind.noun();
        tracing::info!(conn, peer = %remote.node_id, epoch, "link to a {noun} attached");
        if let Some(state) = self.remotes.get_mut(&remote) {
            state.link = Some(Link { conn, epoch, remote_epoch: None, writer });
            state.retry_at = None;
        }
        true
    }

    /// Detaches `remote`'s link, if any, from the node.
    async fn detach(&mut self, remote: RemoteKey) {
        let Some(link) = self.remotes.get_mut(&remote).and_then(|state| state.link.take()) else {
            return;
        };
        link.writer.abort();
        let _ = self.node.disconnected(link.conn).await;
        let noun = self.keys.kind.noun();
        tracing::info!(conn = link.conn, peer = %remote.node_id, "link to a {noun} detached");
    }

    /// The node closed a link (or publishing stopped): detach it and try again later.
    async fn on_link_closed(&mut self, event: LinkClosed) -> bool {
        let Some(state) = self.remotes.get_mut(&event.remote) else { return true };
        if state.link.as_ref().is_some_and(|link| link.epoch == event.epoch) {
            state.retry_at = Some(Instant::now() + REATTACH_DELAY);
            self.detach(event.remote).await;
        }
        self.node.is_running()
    }

    async fn reattach_due(&mut self) -> bool {
        let now = Instant::now();
        let due: Vec<RemoteKey> = self
            .remotes
            .iter()
            .filter(|(_, state)| state.link.is_none() && state.retry_at.is_some_and(|at| at <= now))
            .map(|(key, _)| *key)
            .collect();
        for remote in due {
            if !self.attach(remote).await {
                return false;
            }
        }
        self.node.is_running()
    }

    fn publish_members(&self) {
        let members: Vec<Member> = self
            .remotes
            .iter()
            .map(|(key, state)| Member {
                node_id: key.node_id,
                announcement: state.announcement.clone(),
                incarnation: key.incarnation,
                connected: state.link.as_ref().is_some_and(|link| link.remote_epoch.is_some()),
            })
            .collect();
        let connected = members.iter().filter(|member| member.connected).count();
        let (seen_gauge, connected_gauge) = match self.keys.kind {
            MemberKind::Hub => (&self.metrics.hubs_seen, &self.metrics.hubs_connected),
            MemberKind::LanAgent => {
                (&self.metrics.lan_neighbours_seen, &self.metrics.lan_neighbours_connected)
            }
        };
        seen_gauge.set(i64::try_from(members.len()).unwrap_or(i64::MAX));
        connected_gauge.set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.members.send_if_modified(|current| {
            let changed = *current != members;
            if changed {
                *current = members;
            }
            changed
        });
    }
}

/// Samples from hubs whose token has not arrived yet, bounded in hubs, samples and bytes.
#[derive(Debug, Default)]
struct PendingSamples {
    by_hub: BTreeMap<RemoteKey, VecDeque<(u64, Vec<u8>)>>,
    bytes: usize,
}

impl PendingSamples {
    /// Keeps a sample; false (and nothing kept) when a bound is reached.
    fn push(&mut self, remote: RemoteKey, epoch: u64, bytes: Vec<u8>) -> bool {
        let room_for_hub =
            self.by_hub.len() < MAX_PENDING_HUBS || self.by_hub.contains_key(&remote);
        let queued = self.by_hub.get(&remote).map_or(0, VecDeque::len);
        if !room_for_hub
            || queued >= MAX_PENDING_SAMPLES_PER_HUB
            || self.bytes + bytes.len() > MAX_PENDING_BYTES
        {
            return false;
        }
        self.bytes += bytes.len();
        self.by_hub.entry(remote).or_default().push_back((epoch, bytes));
        true
    }

    /// Removes and returns a hub's samples, oldest first.
    fn take(&mut self, remote: &RemoteKey) -> VecDeque<(u64, Vec<u8>)> {
        let samples = self.by_hub.remove(remote).unwrap_or_default();
        self.bytes -= samples.iter().map(|(_, bytes)| bytes.len()).sum::<usize>();
        samples
    }
}

/// What to do with a sample from a known remote hub, by its link epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Hand it to the current link.
    Feed,
    /// It belongs to a link that is over.
    Drop,
    /// The remote started a link while this side has none: attach one, then feed.
    NewLink,
    /// The remote started over: replace the current link, then feed.
    RestartLink,
}

/// Decides a sample's fate from its `epoch`, the newest remote epoch adopted so far (`last`)
/// and the current link: `None` when there is none, `Some(None)` when it has not heard
/// from the remote yet, `Some(Some(e))` when it talks to remote epoch `e`.
fn admit(last: u64, current: Option<Option<u64>>, epoch: u64) -> Admission {
    match current {
        None if epoch > last => Admission::NewLink,
        Some(None) if epoch > last => Admission::Feed,
        Some(Some(in_use)) if epoch == in_use => Admission::Feed,
        Some(Some(in_use)) if epoch > in_use => Admission::RestartLink,
        _ => Admission::Drop,
    }
}

/// Publishes one link's frames in order until the node closes it, then reports the closure.
async fn publish_frames(
    session: zenoh::Session,
    key: String,
    mut frames: mpsc::Receiver<WriterMessage>,
    closed: mpsc::Sender<LinkClosed>,
    closure: LinkClosed,
    metrics: BackboneMetrics,
) {
    while let Some(message) = frames.recv().await {
        match message {
            WriterMessage::Frame(bytes) => {
                // Blocking congestion control: wait for room rather than drop a frame.
                let put = session.put(&key, bytes).congestion_control(CongestionControl::Block);
                if let Err(error) = put.await {
                    metrics.publish_errors.inc();
                    tracing::warn!(%error, %key, "zenoh publish failed");
                }
            }
            WriterMessage::Close(reason) => {
                tracing::info!(%key, %reason, "zenoh link closed by the node");
                break;
            }
        }
    }
    let _ = closed.send(closure).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> Region {
        "eu-west".parse().unwrap()
    }

    fn hub(announcement: &Announcement) -> Membership {
        Membership::Hub(announcement.clone())
    }

    fn lan(site: &str) -> Membership {
        let collections = CollectionScope::only(["site".parse().unwrap()]);
        Membership::LanAgent { site: site.into(), collections }
    }

    fn keys() -> Keys {
        let announcement = Announcement::new(region(), None).unwrap();
        Keys::new("lab", &hub(&announcement), NodeId::from_bytes([1; 16]), 0xabc)
    }

    #[test]
    fn token_keys_round_trip_and_foreign_keys_are_ignored() {
        let keys = keys();
        let region = region();
        for address in [Some("hub-1.example:7700"), Some("[::1]:7700"), None] {
            let announced = Announcement::new(region.clone(), address.map(str::to_owned)).unwrap();
            let (remote, parsed) = keys.parse_token(&keys.token(&hub(&announced))).unwrap();
            assert_eq!(remote, RemoteKey { node_id: keys.me, incarnation: 0xabc });
            assert_eq!(parsed, Some(announced));
        }
        let announced = Announcement::new(region.clone(), None).unwrap();
        let token = keys.token(&hub(&announced));
        assert!(token.starts_with("cairn/lab/hubs/"), "{token}");
        let (remote, parsed) = keys.parse_token(&token).unwrap();
        assert_eq!(remote, RemoteKey { node_id: keys.me, incarnation: 0xabc });
        assert_eq!(parsed.map(|a| a.region), Some(region.clone()));
        assert!(keys.parse_token("cairn/other/hubs/x/y/z").is_none());
        assert!(keys.parse_token(&format!("{token}/extra")).is_none());
        assert!(keys.parse_token("cairn/lab/hubs/not-a-node/eu/1/-").is_none());
        for bad in ["hub", "hub:99999", "a/b:1", "*:1", ":7700"] {
            assert!(Announcement::new(region.clone(), Some(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn frame_keys_name_sender_and_epoch_only_in_this_incarnations_inbox() {
        let me = keys();
        let sender = Keys { me: NodeId::from_bytes([2; 16]), incarnation: 7, ..me.clone() };
        let to_me = RemoteKey { node_id: me.me, incarnation: me.incarnation };
        let key = sender.outbox(&to_me, 3);
        let (from, epoch) = me.parse_frame(&key).unwrap();
        assert_eq!(from, RemoteKey { node_id: sender.me, incarnation: 7 });
        assert_eq!(epoch, 3);
        // Addressed to an earlier run of this hub: not ours.
        let earlier = Keys { incarnation: 0xabb, ..me.clone() };
        assert!(earlier.parse_frame(&key).is_none());
    }

    #[test]
    fn lan_keys_name_the_site_and_stay_apart_from_other_sites_and_hubs() {
        let me = NodeId::from_bytes([3; 16]);
        let lan_keys = Keys::new("lab", &lan("plant-7"), me, 0x5);
        let token = lan_keys.token(&lan("plant-7"));
        assert_eq!(token, format!("cairn/lab/lan/plant-7/agents/{me}/0000000000000005"));
        let (remote, announced) = lan_keys.parse_token(&token).unwrap();
        assert_eq!(remote, RemoteKey { node_id: me, incarnation: 5 });
        assert_eq!(announced, None);
        // Neither another site's agents nor the fleet's hubs are neighbours.
        let other_site = Keys::new("lab", &lan("plant-8"), me, 0x5);
        assert!(lan_keys.parse_token(&other_site.token(&lan("plant-8"))).is_none());
        let hub_keys = keys();
        let hub_token = hub_keys.token(&hub(&Announcement::new(region(), None).unwrap()));
        assert!(lan_keys.parse_token(&hub_token).is_none());
        assert!(hub_keys.parse_token(&token).is_none());
        // Frames between LAN agents never land in a hub's inbox, nor in another site's.
        let sender = Keys::new("lab", &lan("plant-7"), NodeId::from_bytes([4; 16]), 9);
        let to_me = RemoteKey { node_id: me, incarnation: 5 };
        let frame = sender.outbox(&to_me, 1);
        assert_eq!(
            lan_keys.parse_frame(&frame),
            Some((RemoteKey { node_id: sender.me, incarnation: 9 }, 1))
        );
        let other_site_me = Keys::new("lab", &lan("plant-8"), me, 0x5);
        assert!(other_site_me.parse_frame(&frame).is_none());
        let hub_me = Keys { me, incarnation: 5, ..keys() };
        assert!(hub_me.parse_frame(&frame).is_none());
    }

    #[test]
    fn pending_samples_are_bounded_per_hub_in_hubs_and_in_bytes() {
        let hub = |n: u8| RemoteKey { node_id: NodeId::from_bytes([n; 16]), incarnation: 1 };
        let mut pending = PendingSamples::default();
        for i in 0..MAX_PENDING_SAMPLES_PER_HUB {
            assert!(pending.push(hub(0), 1, vec![i as u8]));
        }
        assert!(!pending.push(hub(0), 1, vec![0]));
        for n in 1..MAX_PENDING_HUBS as u8 {
            assert!(pending.push(hub(n), 1, vec![n]));
        }
        assert!(!pending.push(hub(200), 1, vec![0]));
        let taken = pending.take(&hub(0));
        assert_eq!(taken.len(), MAX_PENDING_SAMPLES_PER_HUB);
        assert_eq!(taken.front(), Some(&(1, vec![0])));
        assert!(!pending.push(hub(201), 1, vec![0; MAX_PENDING_BYTES]));
        assert!(pending.push(hub(201), 1, vec![0; 1024]));
    }

    #[test]
    fn only_a_newer_remote_epoch_starts_a_link_and_stale_ones_are_dropped() {
        // A fresh link adopts the first epoch newer than any adopted before.
        assert_eq!(admit(0, Some(None), 1), Admission::Feed);
        assert_eq!(admit(4, Some(None), 4), Admission::Drop);
        assert_eq!(admit(4, Some(None), 5), Admission::Feed);
        // An established link takes its own epoch, restarts on a newer one, drops older ones.
        assert_eq!(admit(4, Some(Some(4)), 4), Admission::Feed);
        assert_eq!(admit(4, Some(Some(4)), 6), Admission::RestartLink);
        assert_eq!(admit(4, Some(Some(4)), 3), Admission::Drop);
        // With no link (the node closed it), only a newer epoch brings one back early.
        assert_eq!(admit(4, None, 4), Admission::Drop);
        assert_eq!(admit(4, None, 5), Admission::NewLink);
    }

    #[test]
    fn the_default_configuration_is_valid_and_bad_settings_are_refused() {
        assert!(BackboneConfig::default().zenoh_config().is_ok());
        let bad_fleet = BackboneConfig { fleet: "a/b".into(), ..BackboneConfig::default() };
        assert!(matches!(bad_fleet.validate(), Err(BackboneError::Config(_))));
        let bad_endpoint =
            BackboneConfig { connect: vec!["nonsense".into()], ..BackboneConfig::default() };
        assert!(matches!(bad_endpoint.validate(), Err(BackboneError::Config(_))));
        let tcp = BackboneConfig {
            listen: vec!["tcp/127.0.0.1:0".into()],
            connect: vec!["tcp/127.0.0.1:7447".into()],
            ..BackboneConfig::default()
        };
        assert!(tcp.zenoh_config().is_ok());
        let error = BackboneConfig { lease_ms: 1, ..BackboneConfig::default() }
            .validate_section("lan")
            .unwrap_err();
        assert!(error.to_string().contains("lan.lease_ms"), "{error}");
        assert_eq!("router".parse::<BackboneMode>(), Ok(BackboneMode::Router));
        assert!("bridge".parse::<BackboneMode>().is_err());
    }
}
