//! High availability under a schedule of faults, checked like Jepsen's set-full: two regions
//! (hubs a1 and a2 in region `a`, b1 in region `b`), four agents, every link through a fault
//! proxy (UDP for the agents' QUIC links, TCP for the hubs' zenoh backbone). Clients write
//! unique values to a set, a counter, a list and a text the whole time while the schedule
//! runs: loss, duplication, reordering and delay on agent links, delay on the backbone, an
//! agent cut off, a hub cut off, region `b` cut off from region `a`, hub a2 killed with
//! SIGKILL and restarted. Then everything heals and the checker waits until every replica of
//! every document has identical heads and JSON, and finds every acknowledged write exactly
//! once, nothing unexpected, and a counter equal to the acknowledged increments.
//!
//! Agents ag1 (hub a1), ag2 (hub a2, then a1), ag3 and ag4 (hub b1) each have one proxy per
//! hub they may dial; each pair of hubs has one backbone proxy. Every partition is confirmed
//! from the cut-off side (an agent without its hub, a hub or region without the others) before
//! it holds, so a path around the proxies fails the test instead of weakening it.
//!
//! A write whose answer never came is indeterminate, as in Jepsen: its value may be present
//! but need not be. Convergence time is measured per (replica, document) pair, from the final
//! heal to the first poll that saw the pair's final heads.
//!
//! The schedule is drawn from a seed (`CAIRN_FAULT_SEED` replays it); `CAIRN_CHAOS_SECONDS`
//! lengthens it beyond the short version CI runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use field_tests::client::Error as ApiError;
use field_tests::{
    fault_seed, free_udp_port, wait_for, Agent, ApiClient, Direction, FaultCounts, FaultProxy, Hub,
    TcpFaultCounts, TcpFaultProxy, TestDir,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// How long every replica has to converge after the final heal.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(90);
/// How long one fault holds once it is in effect.
const STRETCH: Duration = Duration::from_secs(3);
/// Fault time of the short version; `CAIRN_CHAOS_SECONDS` sets another.
const DEFAULT_CHAOS_SECONDS: u64 = 18;
/// Pause between two writes of one client: a steady stream, not a benchmark.
const WRITE_PACE: Duration = Duration::from_millis(20);
/// The collection of the test's documents.
const COLLECTION: &str = "chaos";
/// Separates text tokens; never part of a written value.
const TOKEN_END: char = ';';

/// The data types under test, one document each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Set,
    Counter,
    List,
    Text,
}

const KINDS: [Kind; 4] = [Kind::Set, Kind::Counter, Kind::List, Kind::Text];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Counter => "counter",
            Self::List => "list",
            Self::Text => "text",
        }
    }

    /// The edit that writes `value` to this kind's document.
    fn write(self, value: &str) -> Value {
        match self {
            Self::Set => json!([{ "op": "set", "path": ["seen", value], "value": true }]),
            Self::Counter => json!([{ "op": "increment", "path": ["n"], "by": 1 }]),
            Self::List => json!([
                { "op": "insert", "path": ["list"], "index": 0, "value": value, "kind": "string" }
            ]),
            Self::Text => json!([
                { "op": "splice", "path": ["text"], "index": 0, "text": format!("{value}{TOKEN_END}") }
            ]),
        }
    }
}

/// What one client learned about its writes.
#[derive(Debug, Default)]
struct History {
    /// Values whose write was answered with success, per kind.
    acknowledged: BTreeMap<Kind, Vec<String>>,
    /// Values whose answer never came (the write may or may not have happened).
    indeterminate: BTreeMap<Kind, Vec<String>>,
    /// Writes the agent refused with an error answer (not applied).
    refused: u64,
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn endpoint(address: SocketAddr) -> String {
    format!("tcp/{address}")
}

/// Short heartbeats, anti-entropy and backoff, so a healed link is noticed within seconds and
/// convergence does not wait on default timers.
const TIMING: &str = "[sync]\nanti_entropy_interval_ms = 1000\nheartbeat_interval_ms = 500\n\
                      heartbeat_timeout_ms = 2000\n\
                      [link]\nkeep_alive_ms = 300\nidle_timeout_ms = 10000\n\
                      backoff_initial_ms = 100\nbackoff_max_ms = 1000\nbreaker_open_ms = 500\n\
                      breaker_open_max_ms = 2000\nprobe_preferred_ms = 500\n";

fn write_config(root: &Path, name: &str, text: &str) -> anyhow::Result<String> {
    let path: PathBuf = root.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

fn hub_config(
    root: &Path,
    name: &str,
    region: &str,
    listen: SocketAddr,
    connect: &[SocketAddr],
) -> anyhow::Result<Vec<String>> {
    let connect: Vec<String> = connect.iter().map(|a| endpoint(*a)).collect();
    let text = format!(
        "region = \"{region}\"\n{TIMING}\
         [backbone]\nmode = \"router\"\nlisten = [\"{}\"]\nconnect = {connect:?}\nfleet = \"chaos\"\n\
         lease_ms = 1000\n",
        endpoint(listen)
    );
    Ok(vec!["--config".into(), write_config(root, name, &text)?])
}

/// The hubs, each with the QUIC port its agents' proxies forward to.
struct Hubs {
    root: PathBuf,
    names: [&'static str; 3],
    quic_ports: [u16; 3],
    running: [Option<Hub>; 3],
}

impl Hubs {
    fn http(&self, index: usize) -> ApiClient {
        self.running[index].as_ref().expect("hub running").http.clone()
    }
}

/// The backbone links, one proxy per pair (the second hub dials the first through it), so
/// each pair has one TCP connection and one place to cut it. The hubs run zenoh as routers:
/// peers gossip their listen addresses and dial each other directly, around the proxies (a
/// hub restarted during a partition would reach the other region that way); routers only
/// dial the endpoints they are given.
struct Backbone {
    a2_to_a1: TcpFaultProxy,
    b1_to_a1: TcpFaultProxy,
    b1_to_a2: TcpFaultProxy,
}

impl Backbone {
    fn all(&self) -> [&TcpFaultProxy; 3] {
        [&self.a2_to_a1, &self.b1_to_a1, &self.b1_to_a2]
    }

    /// The links of hub `index` (0 a1, 1 a2, 2 b1).
    fn of_hub(&self, index: usize) -> Vec<&TcpFaultProxy> {
        match index {
            0 => vec![&self.a2_to_a1, &self.b1_to_a1],
            1 => vec![&self.a2_to_a1, &self.b1_to_a2],
            _ => vec![&self.b1_to_a1, &self.b1_to_a2],
        }
    }
}

/// An agent link: which agent, which hub it reaches, and its proxy.
struct AgentLink {
    agent: usize,
    hub: usize,
    proxy: FaultProxy,
}

/// One step of the schedule.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    LinkNoise,
    AgentPartition,
    HubPartition,
    RegionPartition,
    HubCrash,
}

impl Nemesis {
    fn name(self) -> &'static str {
        match self {
            Self::LinkNoise => "link noise",
            Self::AgentPartition => "agent partition",
            Self::HubPartition => "hub partition",
            Self::RegionPartition => "region partition",
            Self::HubCrash => "hub SIGKILL and restart",
        }
    }
}

/// Every kind once in a seeded order, then more seeded rounds until `budget` is spent.
fn schedule(rng: &mut SmallRng, budget: Duration) -> Vec<Nemesis> {
    use Nemesis::*;
    let mut steps = Vec::new();
    let mut spent = Duration::ZERO;
    while steps.is_empty() || spent < budget {
        let mut round = [LinkNoise, AgentPartition, HubPartition, RegionPartition, HubCrash];
        round.shuffle(rng);
        for step in round {
            steps.push(step);
            spent += STRETCH;
        }
    }
    steps
}

/// The other hubs a hub reports connected on the backbone.
fn connected_hubs(hub: &ApiClient) -> Option<usize> {
    let topology = hub.send("GET", "/v1/topology", None).ok()?.body;
    let hubs = topology.get("hubs")?.as_array()?;
    Some(hubs.iter().filter(|h| h.get("connected") == Some(&Value::Bool(true))).count())
}

/// Waits until `hub` reports `count` other hubs connected; on timeout the error carries its
/// last topology answer.
fn await_connected_hubs(hub: &ApiClient, count: usize, what: &str) -> anyhow::Result<()> {
    wait_for(what, WAIT, || (connected_hubs(hub) == Some(count)).then_some(())).map_err(|e| {
        let topology = hub.send("GET", "/v1/topology", None).map(|r| r.body.to_string());
        anyhow::anyhow!("{e:#}; last topology {topology:?}")
    })
}

fn agent_connected(api: &ApiClient) -> Option<bool> {
    api.status().ok().map(|s| s.hub.connected)
}

struct Cluster {
    hubs: Hubs,
    backbone: Backbone,
    agents: Vec<Agent>,
    links: Vec<AgentLink>,
    /// The proxy hub a2 dials hub a1 through, again after its restart.
    a1_proxy_for_a2: SocketAddr,
}

impl Cluster {
    fn replicas(&self) -> Vec<(String, ApiClient)> {
        let mut replicas: Vec<(String, ApiClient)> = (self.agents.iter().enumerate())
            .map(|(i, agent)| (format!("agent ag{}", i + 1), agent.api.clone()))
            .collect();
        for (index, name) in self.hubs.names.iter().enumerate() {
            replicas.push((format!("hub {name}"), self.hubs.http(index)));
        }
        replicas
    }

    fn heal_all(&self) {
        self.links.iter().for_each(|l| l.proxy.heal());
        self.backbone.all().iter().for_each(|p| p.heal());
    }

    /// Stalls the links and severs their connections, as when a hub's network goes away.
    fn partition_backbone(proxies: &[&TcpFaultProxy]) {
        for proxy in proxies {
            proxy.blackhole(Direction::Both);
            proxy.sever();
        }
    }

    /// Applies one fault and holds it for a stretch; the fault stays until the caller heals.
    fn run(&mut self, step: Nemesis, rng: &mut SmallRng) -> anyhow::Result<String> {
        let detail = match step {
            Nemesis::LinkNoise => self.link_noise(rng)?,
            Nemesis::AgentPartition => {
                let agent = rng.gen_range(0..self.agents.len());
                for link in self.links.iter().filter(|l| l.agent == agent) {
                    link.proxy.blackhole(Direction::Both);
                }
                let api = &self.agents[agent].api;
                wait_for("the partitioned agent to see its hub gone", WAIT, || {
                    (agent_connected(api) == Some(false)).then_some(())
                })?;
                std::thread::sleep(STRETCH);
                format!("agent ag{}", agent + 1)
            }
            Nemesis::HubPartition => {
                let hub = rng.gen_range(0..3);
                for link in self.links.iter().filter(|l| l.hub == hub) {
                    link.proxy.blackhole(Direction::Both);
                }
                Self::partition_backbone(&self.backbone.of_hub(hub));
                let http = self.hubs.http(hub);
                await_connected_hubs(&http, 0, "the partitioned hub to see no other hub")?;
                std::thread::sleep(STRETCH);
                format!("hub {}", self.hubs.names[hub])
            }
            Nemesis::RegionPartition => {
                // Stalled, not severed: zenoh must notice the silence itself (its lease).
                self.backbone.b1_to_a1.blackhole(Direction::Both);
                self.backbone.b1_to_a2.blackhole(Direction::Both);
                let http = self.hubs.http(2);
                await_connected_hubs(&http, 0, "region b to see no hub of region a")?;
                std::thread::sleep(STRETCH);
                "b from a".into()
            }
            Nemesis::HubCrash => {
                self.crash_and_restart_a2()?;
                "a2".into()
            }
        };
        Ok(detail)
    }

    fn link_noise(&self, rng: &mut SmallRng) -> anyhow::Result<String> {
        let loss = rng.gen_range(0.05..=0.20);
        let duplicate = rng.gen_range(0.02..=0.10);
        let reorder = rng.gen_range(0.05..=0.25);
        let delay = Duration::from_millis(rng.gen_range(100..=300));
        let jitter = Duration::from_millis(rng.gen_range(0..=50));
        for link in &self.links {
            link.proxy.loss(Direction::Both, loss)?;
            link.proxy.duplicate(Direction::Both, duplicate)?;
            link.proxy.reorder(Direction::Both, reorder, Duration::from_millis(30))?;
            link.proxy.delay(Direction::Both, delay, jitter);
        }
        for proxy in self.backbone.all() {
            proxy.delay(Direction::Both, delay, jitter);
        }
        std::thread::sleep(STRETCH);
        Ok(format!(
            "loss {:.0}%, duplication {:.0}%, reordering {:.0}%, delay {delay:?} + {jitter:?}",
            loss * 100.0,
            duplicate * 100.0,
            reorder * 100.0
        ))
    }

    /// Kills hub a2 with SIGKILL, keeps it down for a stretch, and restarts it on the same QUIC
    /// port and data directory; its backbone port is new, so the proxy in front of it moves.
    fn crash_and_restart_a2(&mut self) -> anyhow::Result<()> {
        self.hubs.running[1].take().expect("hub a2 running").kill();
        std::thread::sleep(STRETCH);
        let listen = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let args = hub_config(&self.hubs.root, "hub-a2", "a", listen, &[self.a1_proxy_for_a2])?;
        self.backbone.b1_to_a2.set_upstream(listen);
        let hub = Hub::start_with(&self.hubs.root, "hub-a2", self.hubs.quic_ports[1], &args)?;
        self.hubs.running[1] = Some(hub);
        Ok(())
    }
}

fn start_cluster(root: &Path, seed: u64) -> anyhow::Result<Cluster> {
    let names = ["a1", "a2", "b1"];
    let regions = ["a", "a", "b"];
    let quic_ports = [free_udp_port()?, free_udp_port()?, free_udp_port()?];
    let listen: Vec<SocketAddr> = (0..3)
        .map(|_| Ok(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?))))
        .collect::<anyhow::Result<_>>()?;
    let backbone = Backbone {
        a2_to_a1: TcpFaultProxy::start(listen[0], seed ^ 0x10)?,
        b1_to_a1: TcpFaultProxy::start(listen[0], seed ^ 0x11)?,
        b1_to_a2: TcpFaultProxy::start(listen[1], seed ^ 0x12)?,
    };
    let connect = [
        vec![],
        vec![backbone.a2_to_a1.local_addr()],
        vec![backbone.b1_to_a1.local_addr(), backbone.b1_to_a2.local_addr()],
    ];
    let mut running = [None, None, None];
    for i in 0..3 {
        let name = format!("hub-{}", names[i]);
        let args = hub_config(root, &name, regions[i], listen[i], &connect[i])?;
        running[i] = Some(Hub::start_with(root, &name, quic_ports[i], &args)?);
    }
    let hubs = Hubs { root: root.to_path_buf(), names, quic_ports, running };
    for (i, name) in names.iter().enumerate() {
        let http = hubs.http(i);
        await_connected_hubs(&http, 2, &format!("hub {name} to see both other hubs"))?;
    }

    // ag1 and ag2 in region a (ag2 prefers a2 and falls back to a1), ag3 and ag4 in region b.
    let plan: [(usize, &[usize]); 4] = [(0, &[0]), (1, &[1, 0]), (2, &[2]), (3, &[2])];
    let agent_config = write_config(root, "agent", TIMING)?;
    let mut links = Vec::new();
    let mut agents = Vec::new();
    for (agent, hub_order) in plan {
        let mut addresses = Vec::new();
        for &hub in hub_order {
            let upstream = SocketAddr::from(([127, 0, 0, 1], quic_ports[hub]));
            let proxy = FaultProxy::start(upstream, seed ^ (0x20 + (agent * 4 + hub) as u64))?;
            addresses.push(proxy.local_addr().to_string());
            links.push(AgentLink { agent, hub, proxy });
        }
        let first: SocketAddr = addresses[0].parse()?;
        let mut args = vec!["--config".into(), agent_config.clone()];
        if addresses.len() > 1 {
            args.extend(["--hubs".into(), addresses.join(",")]);
        }
        agents.push(Agent::start_with(root, &format!("ag{}", agent + 1), first, &args)?);
    }
    for (i, agent) in agents.iter().enumerate() {
        wait_for(&format!("agent ag{} on its hub", i + 1), WAIT, || {
            (agent_connected(&agent.api) == Some(true)).then_some(())
        })?;
    }
    let a1_proxy_for_a2 = backbone.a2_to_a1.local_addr();
    Ok(Cluster { hubs, backbone, agents, links, a1_proxy_for_a2 })
}

/// Creates the four documents on one agent and waits until every replica holds them.
fn create_documents(cluster: &Cluster) -> anyhow::Result<BTreeMap<Kind, String>> {
    let api = &cluster.agents[0].api;
    let mut docs = BTreeMap::new();
    docs.insert(Kind::Set, api.create(COLLECTION, &json!({ "seen": {} }))?);
    let counter = api.create(COLLECTION, &json!({}))?;
    api.edit(&counter, &json!([{ "op": "set", "path": ["n"], "value": 0, "kind": "counter" }]))?;
    docs.insert(Kind::Counter, counter);
    docs.insert(Kind::List, api.create(COLLECTION, &json!({ "list": [] }))?);
    docs.insert(Kind::Text, api.create(COLLECTION, &json!({ "text": "" }))?);
    let replicas = cluster.replicas();
    for (kind, id) in &docs {
        let local = api.read(id)?.expect("created document").heads;
        wait_for(&format!("every replica to hold the {} document", kind.name()), WAIT, || {
            replicas
                .iter()
                .all(|(_, r)| {
                    r.try_read(id).is_some_and(|v| sorted(v.heads) == sorted(local.clone()))
                })
                .then_some(())
        })?;
    }
    Ok(docs)
}

fn sorted(mut heads: Vec<String>) -> Vec<String> {
    heads.sort();
    heads
}

/// One client per agent, cycling through the kinds with unique values `<agent>-<n>`.
fn start_writer(
    api: ApiClient,
    name: String,
    docs: BTreeMap<Kind, String>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<History> {
    std::thread::spawn(move || {
        let mut history = History::default();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let kind = KINDS[n % KINDS.len()];
            let value = format!("{name}-{n}");
            match api.edit(&docs[&kind], &kind.write(&value)) {
                Ok(_) => history.acknowledged.entry(kind).or_default().push(value),
                Err(ApiError::Api { .. }) => history.refused += 1,
                Err(_) => history.indeterminate.entry(kind).or_default().push(value),
            }
            n += 1;
            std::thread::sleep(WRITE_PACE);
        }
        history
    })
}

/// Each replica's heads of each document as polled, with when each was read.
type Observations = BTreeMap<(String, Kind), Vec<(Duration, Vec<String>)>>;

/// Every replica's heads of the test's documents, by document id, from one listing.
fn listed_heads(api: &ApiClient) -> BTreeMap<String, Vec<String>> {
    let page = api.list(COLLECTION, None, 100).map(|page| page.docs).unwrap_or_default();
    page.into_iter().map(|doc| (doc.id, sorted(doc.heads))).collect()
}

/// Polls every replica until all hold identical heads and identical JSON for every document
/// (or the deadline), recording each replica's heads as listed; returns the agreed heads and
/// JSON per document. Heads come from one listing per replica, so a round is short and the
/// convergence times are fine-grained; the JSON is compared once the heads agree.
fn await_convergence(
    replicas: &[(String, ApiClient)],
    docs: &BTreeMap<Kind, String>,
    healed: Instant,
    observations: &mut Observations,
) -> anyhow::Result<BTreeMap<Kind, (Vec<String>, Value)>> {
    let mut last_difference = String::new();
    while healed.elapsed() < CONVERGE_DEADLINE {
        let mut listed = Vec::new();
        for (name, api) in replicas {
            let heads = listed_heads(api);
            for (kind, id) in docs {
                let seen = heads.get(id).cloned().unwrap_or_default();
                observations
                    .entry((name.clone(), *kind))
                    .or_default()
                    .push((healed.elapsed(), seen));
            }
            listed.push((name, heads));
        }
        let heads_agree = docs.values().all(|id| {
            listed
                .iter()
                .all(|(_, heads)| heads.get(id).is_some() && heads.get(id) == listed[0].1.get(id))
        });
        if !heads_agree {
            last_difference = format!("heads differ: {listed:?}");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match agreed_documents(replicas, docs) {
            Ok(agreed) => return Ok(agreed),
            Err(difference) => last_difference = difference,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "no convergence within {CONVERGE_DEADLINE:?} of the final heal; last seen {last_difference}"
    )
}

/// Reads every document on every replica: the heads and JSON all replicas share, or what differs.
fn agreed_documents(
    replicas: &[(String, ApiClient)],
    docs: &BTreeMap<Kind, String>,
) -> Result<BTreeMap<Kind, (Vec<String>, Value)>, String> {
    let mut agreed = BTreeMap::new();
    for (kind, id) in docs {
        let mut first: Option<(Vec<String>, Value)> = None;
        for (name, api) in replicas {
            let view = api.try_read(id).ok_or_else(|| format!("{name} could not read {id}"))?;
            let read = (sorted(view.heads), view.doc);
            match &first {
                None => first = Some(read),
                Some(expected) if *expected == read => {}
                Some(_) => return Err(format!("{name} differs on the {} document", kind.name())),
            }
        }
        agreed.insert(*kind, first.ok_or("no replicas")?);
    }
    Ok(agreed)
}

/// How long after the heal each (replica, document) pair first held its final heads.
fn convergence_times(
    observations: &Observations,
    final_heads: &BTreeMap<Kind, Vec<String>>,
) -> Vec<Duration> {
    let mut times: Vec<Duration> = (observations.iter())
        .filter_map(|((_, kind), seen)| {
            seen.iter().find(|(_, heads)| *heads == final_heads[kind]).map(|(at, _)| *at)
        })
        .collect();
    times.sort();
    times
}

/// The nearest-rank percentile of sorted `times`.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let rank = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

/// What the checker found for one kind.
#[derive(Debug, Default)]
struct Verdict {
    acknowledged: usize,
    lost: usize,
    unexpected: usize,
    duplicates: usize,
    notes: Vec<String>,
}

/// Values read back from a document, in document order.
fn elements(kind: Kind, doc: &Value) -> Vec<String> {
    match kind {
        Kind::Set => {
            doc["seen"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
        }
        Kind::List => (doc["list"].as_array().into_iter().flatten())
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        Kind::Text => (doc["text"].as_str().unwrap_or_default().split(TOKEN_END))
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Kind::Counter => Vec::new(),
    }
}

fn check(
    kind: Kind,
    doc: &Value,
    acknowledged: &BTreeSet<String>,
    indeterminate: &BTreeSet<String>,
) -> Verdict {
    let mut verdict = Verdict { acknowledged: acknowledged.len(), ..Verdict::default() };
    if kind == Kind::Counter {
        let value = doc["n"].as_u64().unwrap_or(0) as usize;
        let most = acknowledged.len() + indeterminate.len();
        verdict.lost = acknowledged.len().saturating_sub(value);
        verdict.unexpected = value.saturating_sub(most);
        verdict
            .notes
            .push(format!("counter {value}, acknowledged increments {}", acknowledged.len()));
        return verdict;
    }
    let mut occurrences: BTreeMap<&str, usize> = BTreeMap::new();
    let read = elements(kind, doc);
    for value in &read {
        *occurrences.entry(value.as_str()).or_default() += 1;
    }
    let lost: Vec<&String> =
        acknowledged.iter().filter(|v| !occurrences.contains_key(v.as_str())).collect();
    let unexpected: Vec<&&str> = (occurrences.keys())
        .filter(|v| !acknowledged.contains(**v) && !indeterminate.contains(**v))
        .collect();
    let duplicated: Vec<(&&str, &usize)> = occurrences.iter().filter(|(_, n)| **n > 1).collect();
    verdict.lost = lost.len();
    verdict.unexpected = unexpected.len();
    verdict.duplicates = duplicated.iter().map(|(_, n)| **n - 1).sum();
    if !lost.is_empty() {
        verdict.notes.push(format!("lost {:?}", lost.iter().take(20).collect::<Vec<_>>()));
    }
    if !unexpected.is_empty() {
        verdict
            .notes
            .push(format!("unexpected {:?}", unexpected.iter().take(20).collect::<Vec<_>>()));
    }
    if !duplicated.is_empty() {
        verdict
            .notes
            .push(format!("duplicated {:?}", duplicated.iter().take(20).collect::<Vec<_>>()));
    }
    verdict
}

fn sum_udp(counts: impl Iterator<Item = FaultCounts>) -> FaultCounts {
    counts.fold(FaultCounts::default(), |mut sum, c| {
        sum.dropped_loss += c.dropped_loss;
        sum.dropped_blackhole += c.dropped_blackhole;
        sum.dropped_queue_full += c.dropped_queue_full;
        sum.duplicated += c.duplicated;
        sum.reordered += c.reordered;
        sum.delayed += c.delayed;
        sum.held += c.held;
        sum.rebinds += c.rebinds;
        sum
    })
}

fn sum_tcp(counts: impl Iterator<Item = TcpFaultCounts>) -> TcpFaultCounts {
    counts.fold(TcpFaultCounts::default(), |mut sum, c| {
        sum.accepted += c.accepted;
        sum.refused += c.refused;
        sum.severed += c.severed;
        sum.upstream_unreachable += c.upstream_unreachable;
        sum.stalled += c.stalled;
        sum.delayed += c.delayed;
        sum
    })
}

/// Writes every proxy's fault log to a file kept after the test, for a failed run's replay.
fn save_fault_logs(cluster: &Cluster, seed: u64, steps: &[String]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("cairn-chaos-{seed}-faults.log"));
    let mut text = format!("seed {seed}\nschedule:\n{}\n", steps.join("\n"));
    for link in &cluster.links {
        text.push_str(&format!(
            "\n== agent ag{} -> hub {}\n",
            link.agent + 1,
            cluster.hubs.names[link.hub]
        ));
        text.push_str(&link.proxy.log_lines().join("\n"));
    }
    let backbone = [
        ("a2 -> a1", &cluster.backbone.a2_to_a1),
        ("b1 -> a1", &cluster.backbone.b1_to_a1),
        ("b1 -> a2", &cluster.backbone.b1_to_a2),
    ];
    for (name, proxy) in backbone {
        text.push_str(&format!("\n== backbone {name}\n"));
        text.push_str(&proxy.log_lines().join("\n"));
    }
    let _ = std::fs::write(&path, text);
    path
}

#[test]
fn writes_survive_partitions_crashes_and_lossy_links_and_every_replica_converges(
) -> anyhow::Result<()> {
    let started = Instant::now();
    let seed = fault_seed()?;
    let chaos_seconds = std::env::var("CAIRN_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_CHAOS_SECONDS);
    println!("chaos: seed {seed} (CAIRN_FAULT_SEED={seed} replays the schedule), {chaos_seconds} s of faults");
    let mut rng = SmallRng::seed_from_u64(seed);
    let steps = schedule(&mut rng, Duration::from_secs(chaos_seconds));
    let dir = TestDir::new("chaos")?;
    let mut cluster = start_cluster(dir.path(), seed)?;
    let docs = create_documents(&cluster)?;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<JoinHandle<History>> = (cluster.agents.iter().enumerate())
        .map(|(i, agent)| {
            start_writer(agent.api.clone(), format!("ag{}", i + 1), docs.clone(), stop.clone())
        })
        .collect();

    let mut done = Vec::new();
    let mut failure = None;
    for (n, step) in steps.iter().enumerate() {
        if n > 0 {
            cluster.heal_all();
        }
        let at = started.elapsed().as_secs_f64();
        match cluster.run(*step, &mut rng) {
            Ok(detail) => {
                println!("chaos: {at:>6.1}s {}: {detail}", step.name());
                done.push(format!("{at:.1}s {}: {detail}", step.name()));
            }
            Err(error) => {
                failure = Some(format!("{}: {error:#}", step.name()));
                break;
            }
        }
    }

    // Writes stop while the last fault holds, so the final state is fixed from the heal on.
    stop.store(true, Ordering::Relaxed);
    let histories: Vec<History> = writers.into_iter().map(|w| w.join().expect("writer")).collect();
    cluster.heal_all();
    let healed = Instant::now();
    if let Some(failure) = failure {
        let log = save_fault_logs(&cluster, seed, &done);
        anyhow::bail!(
            "the schedule failed at {failure} (seed {seed}, fault log {})",
            log.display()
        );
    }

    let replicas = cluster.replicas();
    let mut observations = Observations::new();
    let agreed = match await_convergence(&replicas, &docs, healed, &mut observations) {
        Ok(agreed) => agreed,
        Err(error) => {
            let log = save_fault_logs(&cluster, seed, &done);
            anyhow::bail!("{error:#} (seed {seed}, fault log {})", log.display());
        }
    };
    let final_heads: BTreeMap<Kind, Vec<String>> =
        agreed.iter().map(|(k, (h, _))| (*k, h.clone())).collect();
    let times = convergence_times(&observations, &final_heads);

    let mut verdicts = BTreeMap::new();
    for kind in KINDS {
        let gather =
            |pick: fn(&History) -> &BTreeMap<Kind, Vec<String>>| -> (BTreeSet<String>, usize) {
                let all: Vec<&String> = histories
                    .iter()
                    .flat_map(|h| pick(h).get(&kind).into_iter().flatten())
                    .collect();
                (all.iter().map(|v| (*v).clone()).collect(), all.len())
            };
        let (acknowledged, issued) = gather(|h| &h.acknowledged);
        assert_eq!(acknowledged.len(), issued, "every written value is unique");
        let (indeterminate, _) = gather(|h| &h.indeterminate);
        verdicts.insert(kind, check(kind, &agreed[&kind].1, &acknowledged, &indeterminate));
    }

    let udp = sum_udp(cluster.links.iter().map(|l| l.proxy.counts()));
    let tcp = sum_tcp(cluster.backbone.all().iter().map(|p| p.counts()));
    let mut by_nemesis: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &steps {
        *by_nemesis.entry(step.name()).or_default() += 1;
    }
    let total = |f: fn(&Verdict) -> usize| verdicts.values().map(f).sum::<usize>();
    let indeterminate: usize =
        histories.iter().flat_map(|h| h.indeterminate.values()).map(Vec::len).sum();
    let refused: u64 = histories.iter().map(|h| h.refused).sum();
    println!("chaos: schedule {by_nemesis:?}");
    println!(
        "chaos: faults on agent links (QUIC/UDP): loss {}, duplicated {}, reordered {}, delayed {}, \
         blackholed {}, queue full {}",
        udp.dropped_loss, udp.duplicated, udp.reordered, udp.delayed, udp.dropped_blackhole, udp.dropped_queue_full
    );
    println!(
        "chaos: faults on backbone links (zenoh/TCP): delayed chunks {}, stalled chunks {}, severed {}, \
         refused {}, upstream down {} (connections accepted {})",
        tcp.delayed, tcp.stalled, tcp.severed, tcp.refused, tcp.upstream_unreachable, tcp.accepted
    );
    let acknowledged: Vec<String> =
        verdicts.iter().map(|(k, v)| format!("{} {}", k.name(), v.acknowledged)).collect();
    println!(
        "chaos: acknowledged writes: {} (total {}); indeterminate {indeterminate}, refused {refused}",
        acknowledged.join(", "),
        total(|v| v.acknowledged)
    );
    println!(
        "chaos: lost {}, unexpected {}, duplicates {}",
        total(|v| v.lost),
        total(|v| v.unexpected),
        total(|v| v.duplicates)
    );
    println!(
        "chaos: converged after the final heal over {} (replica, document) pairs: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        times.len(),
        percentile(&times, 0.50).as_secs_f64(),
        percentile(&times, 0.99).as_secs_f64(),
        percentile(&times, 1.0).as_secs_f64()
    );
    println!("chaos: test took {:.1} s", started.elapsed().as_secs_f64());

    let wrong: Vec<String> = (verdicts.iter())
        .filter(|(_, v)| v.lost + v.unexpected + v.duplicates > 0)
        .map(|(k, v)| format!("{}: {}", k.name(), v.notes.join("; ")))
        .collect();
    if !wrong.is_empty() {
        let log = save_fault_logs(&cluster, seed, &done);
        anyhow::bail!(
            "history check failed (seed {seed}, fault log {}): {}",
            log.display(),
            wrong.join(" | ")
        );
    }
    assert_eq!(times.len(), replicas.len() * docs.len(), "every pair reached its final heads");
    assert!(total(|v| v.acknowledged) > 0, "the clients wrote");
    Ok(())
}

/// A TCP echo server on 127.0.0.1 for the proxy's own test; stops when dropped.
struct Echo {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut reader = stream.try_clone().unwrap();
                            let mut writer = stream;
                            let _ = std::io::copy(&mut reader, &mut writer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { address, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one byte, or `None` when nothing came within `timeout`; `Some(None)` is the end.
fn read_byte(stream: &mut std::net::TcpStream, timeout: Duration) -> Option<Option<u8>> {
    use std::io::Read;
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Some(None),
        Ok(_) => Some(Some(byte[0])),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        // A reset is an end too.
        Err(_) => Some(None),
    }
}

#[test]
fn the_tcp_fault_proxy_delays_stalls_refuses_severs_and_moves() -> anyhow::Result<()> {
    use std::io::Write;
    use std::net::TcpStream;
    let echo = Echo::start();
    let proxy = TcpFaultProxy::start(echo.address, fault_seed()?)?;
    let mut client = TcpStream::connect(proxy.local_addr())?;
    client.write_all(b"a")?;
    assert_eq!(read_byte(&mut client, WAIT), Some(Some(b'a')));

    proxy.delay(Direction::Both, Duration::from_millis(200), Duration::ZERO);
    let sent = Instant::now();
    client.write_all(b"b")?;
    assert_eq!(read_byte(&mut client, WAIT), Some(Some(b'b')));
    assert!(sent.elapsed() >= Duration::from_millis(400), "delayed both ways");
    assert!(proxy.counts().delayed >= 2);

    // A blackhole stalls bytes and refuses new connections; the heal delivers what stalled.
    proxy.heal();
    proxy.blackhole(Direction::Both);
    client.write_all(b"c")?;
    assert_eq!(read_byte(&mut client, Duration::from_millis(300)), None, "stalled");
    let mut refused = TcpStream::connect(proxy.local_addr())?;
    assert_eq!(read_byte(&mut refused, WAIT), Some(None), "closed on arrival");
    assert_eq!(proxy.counts().refused, 1);
    proxy.heal();
    assert_eq!(read_byte(&mut client, WAIT), Some(Some(b'c')));
    assert!(proxy.counts().stalled >= 1);

    // Severing closes the open connection; a moved upstream takes the next one.
    proxy.sever();
    assert_eq!(read_byte(&mut client, WAIT), Some(None), "severed");
    assert_eq!(proxy.counts().severed, 1);
    let other = Echo::start();
    proxy.set_upstream(other.address);
    let mut moved = TcpStream::connect(proxy.local_addr())?;
    moved.write_all(b"d")?;
    assert_eq!(read_byte(&mut moved, WAIT), Some(Some(b'd')));
    assert_eq!(proxy.counts().accepted, 2);
    Ok(())
}
