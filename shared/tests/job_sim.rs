//! Jobs across simulated nodes, with virtual time and real Automerge documents: each node
//! keeps its own replicas of the system records, writes them with the same edit operations
//! the runner uses, and exchanges them by merging, so partitions are just nodes that do not
//! merge. Deterministic: fixed actors, fixed clocks, no sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use automerge::ActorId;
use cairn_shared::document::Document;
use cairn_shared::ids::{Collection, DocId, NodeId};
use cairn_shared::jobs::operators::window_stats;
use cairn_shared::jobs::{
    self, Decision, JobBoard, JobRecord, JobView, ResultEntry, RunRecord, RunState,
    JOBS_COLLECTION, NODES_COLLECTION, RESULTS_COLLECTION,
};
use cairn_shared::ops::{apply_ops, Op, PathSegment, ValueKind};
use cairn_shared::placement::{
    CapabilityProfile, Constraints, Ineligible, JobInput, JobSpec, Link, Load, NodeRole,
    PlacementPolicy, Power,
};
use serde_json::{json, Value};

/// NTP64 time of `secs` seconds.
fn at(secs: u64) -> u64 {
    secs << 32
}

/// One simulated node: its profile as measured, and its replicas of every document.
struct SimNode {
    id: NodeId,
    actor: ActorId,
    profile: CapabilityProfile,
    docs: BTreeMap<DocId, Document>,
}

impl SimNode {
    fn new(n: u8, role: NodeRole, speed_score: f64) -> Self {
        let id = NodeId::from_bytes([n; 16]);
        let profile = CapabilityProfile {
            node_id: id,
            role,
            arch: "aarch64".into(),
            cores: 2,
            speed_score,
            memory_free_bytes: 1 << 30,
            storage_free_bytes: 1 << 40,
            power: Power::Mains,
            link: Link { rtt_ms: 20, bandwidth_bytes_per_sec: 1_000_000, metered: false },
            load: Load { cpu: 0.0, queued_jobs: 0 },
            labels: BTreeMap::new(),
            measured_at: 0,
        };
        Self { id, actor: ActorId::from([n; 16].as_slice()), profile, docs: BTreeMap::new() }
    }

    /// Applies `ops` to this node's replica of `doc_id`, creating it if needed.
    fn write(&mut self, doc_id: DocId, collection: &str, ops: &[Op], now: u64) {
        let collection: Collection = collection.parse().unwrap();
        let actor = self.actor.clone();
        let document = self.docs.entry(doc_id).or_insert_with(|| Document::new(collection, actor));
        apply_ops(&mut document.doc, ops, (now >> 32) as i64).unwrap();
    }

    fn json(&self, doc_id: &DocId) -> Option<Value> {
        self.docs.get(doc_id).map(Document::to_json)
    }

    fn publish_profile(&mut self, now: u64, queued_jobs: u32) {
        self.profile.measured_at = now;
        self.profile.load.queued_jobs = queued_jobs;
        let ops = jobs::profile_ops(&self.profile, None);
        self.write(jobs::profile_doc_id(&self.id), NODES_COLLECTION, &ops, now);
    }

    /// The board this node derives from its replicas, as the runner does.
    fn board(&self) -> JobBoard {
        let mut board = JobBoard::new(self.id, PlacementPolicy::default());
        for document in self.docs.values() {
            let doc = document.to_json();
            match document.collection.as_str() {
                NODES_COLLECTION => board.observe_profile(jobs::profile_from_doc(&doc).unwrap()),
                JOBS_COLLECTION => board.observe_job(JobView::from_doc(&doc).unwrap()),
                _ => {}
            }
        }
        board
    }

    fn submit(&mut self, spec: JobSpec, params: Value, now: u64) -> JobRecord {
        let record = JobRecord {
            result_doc: jobs::result_doc_id(&spec.id),
            spec,
            params,
            submitted_by: self.id,
            submitted_at: now,
        };
        let placement = self.board().place_new(&record.spec, self.id, &self.profile, now).unwrap();
        let ops = JobView::create_ops(&record, &placement);
        self.write(jobs::job_doc_id(&record.spec.id), JOBS_COLLECTION, &ops, now);
        record
    }

    /// What the board decides here at `now`.
    fn decide(&self, now: u64) -> Vec<Decision> {
        let board = self.board();
        board.decide(&self.profile, now, &BTreeSet::new(), 8)
    }

    /// Claims and runs at `now` every job the board gives this node, finishing at `now + 1s`.
    fn claim_and_run(&mut self, now: u64) -> Vec<String> {
        let mut ran = Vec::new();
        for decision in self.decide(now) {
            let Decision::Claim { job_id, placement, replaced } = decision else { continue };
            let run = RunRecord {
                claimed_at: now,
                state: RunState::Queued,
                progress: 0.0,
                updated_at: now,
                error: None,
                placement: replaced.then_some(placement),
            };
            let job_doc = jobs::job_doc_id(&job_id);
            self.write(job_doc, JOBS_COLLECTION, &JobView::run_ops(&self.id, &run), now);
            self.finish(&job_id, run, now + at(1));
            ran.push(job_id);
        }
        ran
    }

    /// Runs a `window_stats` job and writes its result and finished run, as the runner does.
    fn finish(&mut self, job_id: &str, mut run: RunRecord, now: u64) {
        let job_doc = jobs::job_doc_id(job_id);
        let job = JobView::from_doc(&self.json(&job_doc).unwrap()).unwrap();
        let input = self.json(&job.record.spec.inputs[0].doc_id).unwrap();
        let output = window_stats(&input, &job.record.params).unwrap();
        let entry = ResultEntry {
            job_id: job_id.into(),
            node_id: self.id,
            claimed_at: run.claimed_at,
            finished_at: now,
            output,
        };
        run.state = RunState::Done;
        run.progress = 1.0;
        run.updated_at = now;
        let mut view = job.clone();
        view.runs.insert(self.id, run.clone());
        let reported = view.reported().map(|(node, _)| node) == Some(self.id);
        self.write(job.record.result_doc, RESULTS_COLLECTION, &entry.write_ops(reported), now);
        self.write(job_doc, JOBS_COLLECTION, &JobView::run_ops(&self.id, &run), now);
    }

    /// After a merge: if this node's run is the reported one but the result document shows
    /// another, write it again (the runner's `confirm_reported`).
    fn confirm_reported(&mut self, job_id: &str, now: u64) {
        let job = JobView::from_doc(&self.json(&jobs::job_doc_id(job_id)).unwrap()).unwrap();
        if job.reported().map(|(node, _)| node) != Some(self.id) {
            return;
        }
        let doc = self.json(&job.record.result_doc).unwrap();
        if ResultEntry::reported_in(&doc).map(|e| e.node_id) != Some(self.id) {
            let mine = ResultEntry::all_in(&doc).remove(&self.id).unwrap();
            self.write(job.record.result_doc, RESULTS_COLLECTION, &mine.write_ops(true), now);
        }
    }
}

/// Merges every document both ways between the nodes of `group`.
fn sync(nodes: &mut [SimNode], group: &[usize]) {
    for _ in 0..2 {
        for &from in group {
            for &to in group {
                if from == to {
                    continue;
                }
                let copies: Vec<(DocId, Document)> = nodes[from]
                    .docs
                    .iter()
                    .map(|(id, d)| {
                        let mut copy = Document::new(d.collection.clone(), nodes[to].actor.clone());
                        copy.doc = d.doc.fork().with_actor(nodes[to].actor.clone());
                        (*id, copy)
                    })
                    .collect();
                for (id, mut copy) in copies {
                    match nodes[to].docs.get_mut(&id) {
                        Some(mine) => {
                            mine.doc.merge(&mut copy.doc).unwrap();
                        }
                        None => {
                            nodes[to].docs.insert(id, copy);
                        }
                    }
                }
            }
        }
    }
}

fn all(nodes: &[SimNode]) -> Vec<usize> {
    (0..nodes.len()).collect()
}

fn series_doc(node: &mut SimNode, n: u8, points: usize) -> (DocId, u64) {
    let doc_id = DocId::from_slice(&[n; 16]).unwrap();
    let series: Vec<Value> = (0..points).map(|t| json!({"t": t, "v": (t % 7) as f64})).collect();
    let ops = [Op::Set {
        path: vec![PathSegment::Key("series".into())],
        value: json!(series),
        kind: ValueKind::Auto,
    }];
    node.write(doc_id, "plant-7/sensors", &ops, 0);
    let size = node.docs[&doc_id].doc.save().len() as u64;
    (doc_id, size)
}

fn spec(id: &str, input: (DocId, u64), work_units: f64, sensitivity: f64) -> JobSpec {
    JobSpec {
        id: id.into(),
        kind: "window_stats".into(),
        inputs: vec![JobInput { doc_id: input.0, size_bytes: input.1 }],
        work_units,
        sensitivity,
        constraints: Constraints::default(),
    }
}

/// A hub and four agents of different speeds, one on a low battery, one metered.
fn fleet() -> Vec<SimNode> {
    let mut nodes = vec![
        SimNode::new(1, NodeRole::Hub, 30.0),
        SimNode::new(2, NodeRole::Agent, 50.0),
        SimNode::new(3, NodeRole::Agent, 200.0),
        SimNode::new(4, NodeRole::Agent, 800.0),
        SimNode::new(5, NodeRole::Agent, 1600.0),
    ];
    nodes[3].profile.power = Power::Battery { level_percent: 10 };
    nodes[4].profile.link.metered = true;
    nodes
}

#[test]
fn the_same_replicated_inputs_give_the_same_placement_on_every_node() {
    let mut nodes = fleet();
    let now = at(1_000);
    for node in &mut nodes {
        node.publish_profile(now, 0);
    }
    let input = series_doc(&mut nodes[1], 9, 300);
    let group = all(&nodes);
    sync(&mut nodes, &group);
    let mut submitted = Vec::new();
    for (i, (work, sensitivity)) in
        [(1.0, 1000.0), (1e5, 0.01), (1e3, 1.0), (1e4, 10.0), (50.0, 0.0), (1e6, 100.0)]
            .into_iter()
            .enumerate()
    {
        let record = nodes[1].submit(
            spec(&format!("job-{i}"), input, work, sensitivity),
            json!({"window": 10}),
            now,
        );
        submitted.push(record.spec.id);
    }
    sync(&mut nodes, &group);

    let later = now + at(5);
    let mut claimed: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
    for job_id in &submitted {
        let placements: BTreeSet<String> = nodes
            .iter()
            .map(|node| {
                let board = node.board();
                let (placement, _) = board
                    .effective_placement(board.job(job_id).unwrap(), &node.profile, later)
                    .unwrap();
                serde_json::to_string(&placement).unwrap()
            })
            .collect();
        assert_eq!(placements.len(), 1, "{job_id}: every node computes the same placement");
    }
    for node in &nodes {
        for decision in node.decide(later) {
            if let Decision::Claim { job_id, .. } = decision {
                claimed.entry(job_id).or_default().push(node.id);
            }
        }
    }
    for job_id in &submitted {
        let board = nodes[0].board();
        let chosen = board.job(job_id).unwrap().placement.as_ref().unwrap().chosen.unwrap();
        assert_eq!(claimed.get(job_id), Some(&vec![chosen]), "{job_id}: exactly its node claims");
    }
    // The data-heavy job stays with its data; the compute-heavy one goes to the fastest
    // agent that is neither on a low battery nor paying for its small input on a metered link.
    let board = nodes[0].board();
    let chosen = |id: &str| board.job(id).unwrap().placement.as_ref().unwrap().chosen.unwrap();
    assert_eq!(chosen("job-0"), nodes[1].id);
    assert_eq!(chosen("job-1"), nodes[4].id, "metered, but the input is tiny");
}

#[test]
fn a_partition_that_runs_a_job_twice_converges_to_one_reported_result() {
    let mut nodes = vec![
        SimNode::new(1, NodeRole::Agent, 100.0),
        SimNode::new(2, NodeRole::Agent, 100.0),
        SimNode::new(3, NodeRole::Agent, 1000.0),
    ];
    let start = at(1_000);
    for node in &mut nodes {
        node.publish_profile(start, 0);
    }
    let input = series_doc(&mut nodes[0], 9, 100);
    sync(&mut nodes, &[0, 1, 2]);
    nodes[0].submit(spec("twice", input, 1e4, 0.0), json!({"window": 25}), start);
    sync(&mut nodes, &[0, 1, 2]);
    assert_eq!(nodes[2].decide(start).len(), 1, "the fast node would take it...");

    // ...but it goes silent, and the other two are cut off from each other. Each keeps
    // publishing; each sees the other's profile and the fast node's go stale.
    let later = start + at(61);
    nodes[0].publish_profile(later, 0);
    nodes[1].publish_profile(later + at(1), 0);
    let ran_a = nodes[0].claim_and_run(later);
    let ran_b = nodes[1].claim_and_run(later + at(1));
    assert_eq!(
        (ran_a.as_slice(), ran_b.as_slice()),
        (["twice".to_owned()].as_slice(), ["twice".to_owned()].as_slice())
    );

    sync(&mut nodes, &[0, 1]);
    let healed = later + at(5);
    for node in &mut nodes[..2] {
        node.confirm_reported("twice", healed);
    }
    sync(&mut nodes, &[0, 1, 2]);
    let result_doc = jobs::result_doc_id("twice");
    for node in &nodes {
        let job = JobView::from_doc(&node.json(&jobs::job_doc_id("twice")).unwrap()).unwrap();
        assert_eq!(job.runs.len(), 2, "both runs are recorded");
        assert_eq!(job.reported().map(|(n, _)| n), Some(nodes[0].id), "the earlier claim");
        let doc = node.json(&result_doc).unwrap();
        assert_eq!(ResultEntry::all_in(&doc).len(), 2, "both results are kept");
        let reported = ResultEntry::reported_in(&doc).unwrap();
        assert_eq!(reported.node_id, nodes[0].id);
        assert_eq!(reported.output["windows"].as_array().map(Vec::len), Some(4));
    }
}

#[test]
fn a_silent_node_has_its_pending_jobs_placed_again() {
    let mut nodes = vec![
        SimNode::new(1, NodeRole::Agent, 100.0),
        SimNode::new(2, NodeRole::Agent, 400.0),
        SimNode::new(3, NodeRole::Agent, 1000.0),
    ];
    let start = at(1_000);
    for node in &mut nodes {
        node.publish_profile(start, 0);
    }
    let input = series_doc(&mut nodes[0], 9, 50);
    sync(&mut nodes, &[0, 1, 2]);
    for i in 0..3 {
        nodes[0].submit(spec(&format!("p{i}"), input, 1e4, 0.0), json!({"window": 10}), start);
    }
    // The fast node, chosen for all three, never claims them and stops publishing.
    let board = nodes[0].board();
    assert!(board
        .jobs()
        .values()
        .all(|j| j.placement.as_ref().unwrap().chosen == Some(nodes[2].id)));
    sync(&mut nodes, &[0, 1, 2]);

    let mut now = start;
    for step in 1..=13 {
        now = start + at(5 * step);
        for node in &mut nodes[..2] {
            node.publish_profile(now, 0);
        }
        sync(&mut nodes, &[0, 1]);
        let ran: Vec<Vec<String>> = nodes[..2].iter_mut().map(|n| n.claim_and_run(now)).collect();
        sync(&mut nodes, &[0, 1]);
        if now.saturating_sub(start) <= at(60) {
            assert!(ran.iter().all(Vec::is_empty), "at +{}s the fast node still counts", 5 * step);
        } else {
            assert_eq!(ran[0], Vec::<String>::new(), "only the next-best node takes them");
            assert_eq!(ran[1], ["p0", "p1", "p2"]);
            break;
        }
    }
    for id in ["p0", "p1", "p2"] {
        let job = JobView::from_doc(&nodes[0].json(&jobs::job_doc_id(id)).unwrap()).unwrap();
        let (runner, run) = job.reported().unwrap();
        assert_eq!(runner, nodes[1].id);
        let moved = run.placement.as_ref().expect("the claim records the new placement");
        let silent = moved.table.iter().find(|row| row.node_id == nodes[2].id).unwrap();
        assert_eq!(silent.reason, Some(Ineligible::Stale), "{id} at {now}");
    }
}

#[test]
fn a_job_whose_claimer_dies_mid_run_is_run_again_elsewhere() {
    let mut nodes =
        vec![SimNode::new(1, NodeRole::Agent, 100.0), SimNode::new(2, NodeRole::Agent, 1000.0)];
    let start = at(1_000);
    for node in &mut nodes {
        node.publish_profile(start, 0);
    }
    let input = series_doc(&mut nodes[0], 9, 20);
    sync(&mut nodes, &[0, 1]);
    nodes[0].submit(spec("orphan", input, 1e4, 0.0), json!({"window": 10}), start);
    sync(&mut nodes, &[0, 1]);
    // The fast node claims, then dies before finishing.
    let claim = nodes[1].decide(start);
    let [Decision::Claim { job_id, .. }] = claim.as_slice() else { panic!("{claim:?}") };
    let run = RunRecord {
        claimed_at: start,
        state: RunState::Running,
        progress: 0.0,
        updated_at: start,
        error: None,
        placement: None,
    };
    let ops = JobView::run_ops(&nodes[1].id, &run);
    nodes[1].write(jobs::job_doc_id(job_id), JOBS_COLLECTION, &ops, start);
    sync(&mut nodes, &[0, 1]);

    let soon = start + at(30);
    nodes[0].publish_profile(soon, 0);
    assert!(nodes[0].claim_and_run(soon).is_empty(), "a live claim is left alone");
    let later = start + at(61);
    nodes[0].publish_profile(later, 0);
    assert_eq!(nodes[0].claim_and_run(later), ["orphan"], "a dead claimer's job runs again");
    let job = JobView::from_doc(&nodes[0].json(&jobs::job_doc_id("orphan")).unwrap()).unwrap();
    assert_eq!(job.reported().map(|(node, _)| node), Some(nodes[0].id), "the finished run counts");
}
