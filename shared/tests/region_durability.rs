//! `regions:N` durability across real node state machines: two hubs in two regions, an
//! agent, in-memory links that can be cut, and a store that commits at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use automerge::ActorId;
use cairn_shared::config::SyncConfig;
use cairn_shared::durability::Durability;
use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::message::Role;
use cairn_shared::node::{
    DurabilityReport, Input, Node, Output, Request, RequestError, RequestId, Response,
};
use cairn_shared::ops::Op;
use cairn_shared::store_task::{StoreReply, StoreTask};
use serde_json::json;

const HUB_A: usize = 0;
const HUB_B: usize = 1;
const AGENT: usize = 2;
/// Connection ids: one per link, the same on both ends.
const HUBS_LINK: u64 = 1;
const AGENT_TO_A: u64 = 2;
const AGENT_TO_B: u64 = 3;

fn fixed_clock() -> uhlc::NTP64 {
    uhlc::NTP64(1 << 40)
}

fn node(index: usize, role: Role) -> Node {
    let id = index as u8 + 1;
    let preset = if role == Role::Hub { SyncConfig::hub() } else { SyncConfig::edge() };
    let config = SyncConfig { heartbeat_interval_ms: 0, ..preset };
    let hlc = uhlc::HLCBuilder::new()
        .with_id(uhlc::ID::try_from([id; 16]).unwrap())
        .with_clock(fixed_clock)
        .with_max_delta(Duration::from_millis(500))
        .build();
    Node::new(NodeId::from_bytes([id; 16]), role, ActorId::from(vec![id; 16]), hlc, config)
}

/// Two hubs in regions `a` and `b` and one agent, with links that can be cut and healed.
struct Mesh {
    nodes: Vec<Node>,
    /// Links up now: connection id and its two ends.
    links: BTreeMap<u64, (usize, usize)>,
    /// Links cut: frames sent on them wait here until the link heals.
    cut: BTreeSet<u64>,
    held: Vec<(u64, usize, Vec<u8>)>,
    answers: BTreeMap<(usize, RequestId), Result<Response, RequestError>>,
    next_request: RequestId,
    now: Instant,
}

impl Mesh {
    fn new() -> Self {
        let mut nodes =
            vec![node(HUB_A, Role::Hub), node(HUB_B, Role::Hub), node(AGENT, Role::Agent)];
        let (a, b) = (nodes[HUB_A].node_id(), nodes[HUB_B].node_id());
        nodes[HUB_A].set_regions("a".into(), [(b, "b".to_owned())]);
        nodes[HUB_B].set_regions("b".into(), [(a, "a".to_owned())]);
        let mut mesh = Self {
            nodes,
            links: BTreeMap::new(),
            cut: BTreeSet::new(),
            held: Vec::new(),
            answers: BTreeMap::new(),
            next_request: 0,
            now: Instant::now(),
        };
        mesh.connect(HUBS_LINK, HUB_A, HUB_B);
        mesh.connect(AGENT_TO_A, AGENT, HUB_A);
        mesh
    }

    fn connect(&mut self, conn: u64, x: usize, y: usize) {
        self.links.insert(conn, (x, y));
        for (me, other) in [(x, y), (y, x)] {
            let peer = self.nodes[other].node_id();
            self.nodes[me].handle_input(self.now, Input::Connected { conn, peer, restrict: None });
        }
        self.run();
    }

    fn disconnect(&mut self, conn: u64) {
        let (x, y) = self.links.remove(&conn).unwrap();
        self.held.retain(|(c, ..)| *c != conn);
        self.cut.remove(&conn);
        for side in [x, y] {
            self.nodes[side].handle_input(self.now, Input::Disconnected { conn });
        }
        self.run();
    }

    fn heal(&mut self, conn: u64) {
        self.cut.remove(&conn);
        for (c, to, bytes) in std::mem::take(&mut self.held) {
            if c == conn {
                self.nodes[to].handle_input(self.now, Input::Received { conn, bytes });
            } else {
                self.held.push((c, to, bytes));
            }
        }
        self.run();
    }

    fn request(&mut self, side: usize, request: Request) -> RequestId {
        let id = self.next_request;
        self.next_request += 1;
        self.nodes[side].handle_input(self.now, Input::Request { id, request });
        self.run();
        id
    }

    fn answer(&mut self, side: usize, id: RequestId) -> Option<Result<Response, RequestError>> {
        self.answers.remove(&(side, id))
    }

    /// Moves time on to `later` and runs the timers that are due.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        for side in 0..self.nodes.len() {
            self.nodes[side].handle_timeout(self.now);
        }
        self.run();
    }

    /// Carries every output until all nodes are quiet.
    fn run(&mut self) {
        let mut busy = true;
        while busy {
            busy = false;
            for side in 0..self.nodes.len() {
                while let Some(output) = self.nodes[side].poll_output() {
                    busy = true;
                    self.carry(side, output);
                }
            }
        }
    }

    fn carry(&mut self, side: usize, output: Output) {
        match output {
            Output::Transmit { conn, bytes } => {
                let Some(&(x, y)) = self.links.get(&conn) else { return };
                let to = if x == side { y } else { x };
                if self.cut.contains(&conn) {
                    self.held.push((conn, to, bytes));
                } else {
                    self.nodes[to].handle_input(self.now, Input::Received { conn, bytes });
                }
            }
            Output::Store { task, action } => {
                let reply = match action {
                    StoreTask::Load { .. } => StoreReply::Loaded(None, Vec::new()),
                    _ => StoreReply::Committed,
                };
                self.nodes[side].handle_input(self.now, Input::StoreDone { task, reply });
            }
            Output::Close { reason, .. } => panic!("node {side} closed a link: {reason}"),
            Output::Respond { id, result } => {
                self.answers.insert((side, id), result);
            }
        }
    }

    /// Creates a document on `side` and returns its id and heads.
    fn write(&mut self, side: usize, n: u8) -> (DocId, Vec<String>) {
        let doc_id = DocId::from_slice(&[n; 16]).unwrap();
        let ops: Vec<Op> =
            serde_json::from_value(json!([{"op": "set", "path": ["n"], "value": n}])).unwrap();
        let collection = "notes".parse().unwrap();
        let id = self.request(side, Request::Create { doc_id, collection, ops });
        match self.answer(side, id) {
            Some(Ok(Response::Written { heads, .. })) => (doc_id, heads),
            other => panic!("create answered {other:?}"),
        }
    }

    fn await_regions(&mut self, side: usize, doc_id: DocId, heads: &[String], n: u8) -> RequestId {
        let deadline = self.now + Duration::from_secs(5);
        let level = Durability::Regions(n);
        self.request(side, Request::AwaitDurable { doc_id, heads: heads.to_vec(), level, deadline })
    }

    fn report(&mut self, side: usize, id: RequestId) -> Option<DurabilityReport> {
        match self.answer(side, id)? {
            Ok(Response::Durability(report)) => Some(report),
            other => panic!("durability answered {other:?}"),
        }
    }
}

fn regions(names: &[&str]) -> Vec<String> {
    names.iter().map(|r| (*r).to_owned()).collect()
}

#[test]
fn an_agent_write_is_answered_once_hubs_of_two_regions_have_committed_it() {
    let mut mesh = Mesh::new();
    let (doc_id, heads) = mesh.write(AGENT, 1);
    let id = mesh.await_regions(AGENT, doc_id, &heads, 2);
    let report = mesh.report(AGENT, id).expect("answered once both regions hold the write");
    assert_eq!(report.regions, regions(&["a", "b"]));
    assert!(report.local && report.hub && report.meets(Durability::Regions(2)));
}

#[test]
fn with_the_other_region_cut_off_the_wait_ends_at_its_deadline_with_one_region() {
    let mut mesh = Mesh::new();
    mesh.cut.insert(HUBS_LINK);
    let (doc_id, heads) = mesh.write(AGENT, 2);
    let id = mesh.await_regions(AGENT, doc_id, &heads, 2);
    assert!(mesh.report(AGENT, id).is_none(), "region b cannot hold it yet");
    mesh.advance(Duration::from_secs(6));
    let report = mesh.report(AGENT, id).expect("answered at the deadline");
    assert_eq!(report.regions, regions(&["a"]));
    assert!(report.hub && !report.meets(Durability::Regions(2)));

    // Once the regions reconnect, the hub still watching tells the agent, and a later look
    // at the write's durability sees both regions.
    mesh.heal(HUBS_LINK);
    let look = Request::AwaitDurable {
        doc_id,
        heads: heads.clone(),
        level: Durability::Regions(u8::MAX),
        deadline: mesh.now,
    };
    let id = mesh.request(AGENT, look);
    assert_eq!(mesh.report(AGENT, id).unwrap().regions, regions(&["a", "b"]));
}

#[test]
fn regions_told_by_different_hubs_add_up_across_failover() {
    let mut mesh = Mesh::new();
    mesh.cut.insert(HUBS_LINK);
    let (doc_id, heads) = mesh.write(AGENT, 3);
    let id = mesh.await_regions(AGENT, doc_id, &heads, 2);
    assert!(mesh.report(AGENT, id).is_none());
    // Hub a is lost; the agent moves to hub b, which never heard from hub a.
    mesh.disconnect(AGENT_TO_A);
    mesh.connect(AGENT_TO_B, AGENT, HUB_B);
    let report = mesh.report(AGENT, id).expect("a from hub a, b from hub b: two regions");
    assert_eq!(report.regions, regions(&["a", "b"]));
}

#[test]
fn a_write_to_a_hub_waits_for_the_other_region_too() {
    let mut mesh = Mesh::new();
    mesh.cut.insert(HUBS_LINK);
    let (doc_id, heads) = mesh.write(HUB_A, 4);
    let id = mesh.await_regions(HUB_A, doc_id, &heads, 2);
    assert!(mesh.report(HUB_A, id).is_none(), "only region a holds it");
    mesh.heal(HUBS_LINK);
    let report = mesh.report(HUB_A, id).expect("answered once hub b committed it");
    assert_eq!(report.regions, regions(&["a", "b"]));
}

#[test]
fn a_region_that_has_not_committed_a_write_is_not_counted() {
    let mut mesh = Mesh::new();
    let (doc_id, heads) = mesh.write(AGENT, 5);
    let first = mesh.await_regions(AGENT, doc_id, &heads, 2);
    assert!(mesh.report(AGENT, first).is_some());
    // A later write on the agent reaches hub a, but hub b is cut off from it.
    mesh.cut.insert(HUBS_LINK);
    let ops: Vec<Op> =
        serde_json::from_value(json!([{"op": "set", "path": ["m"], "value": 1}])).unwrap();
    let edit = mesh.request(AGENT, Request::Edit { doc_id, ops });
    let Some(Ok(Response::Written { heads: later, .. })) = mesh.answer(AGENT, edit) else {
        panic!("edit not answered");
    };
    let id = mesh.await_regions(AGENT, doc_id, &later, 2);
    // The edit follows the create within the sync batch window: it reaches hub a once the
    // window closes, before the wait's deadline.
    mesh.advance(SyncConfig::edge().sync_batch_window());
    mesh.advance(Duration::from_secs(6));
    let report = mesh.report(AGENT, id).unwrap();
    assert_eq!(report.regions, regions(&["a"]), "region b holds the older heads only");
}
