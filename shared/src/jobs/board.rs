//! The job board: what one node knows of profiles and jobs, and what it should do about them.
//!
//! For each unfinished job, oldest first, at HLC time `now`:
//!
//! 1. A job some run has finished is done. Nothing to decide.
//! 2. A job with a live claim is taken: a claim is live while its run is unfinished and its
//!    node's profile is fresh (this node's own claims are always live). This node resumes
//!    its own live claims that it is not executing (after a restart: at-least-once).
//! 3. Otherwise the job goes where its placement says. The submitter's placement stands
//!    while its choice can still take the job; if that node's profile went stale, or it is
//!    gone, the job is placed again at `now` over the current profiles
//!    ([`crate::placement::replace_stale`]). An overloaded choice keeps the job in its queue:
//!    overload sheds new placements only. A node claims the job when the effective choice is
//!    itself and it has room (`capacity`).
//!
//! The decision is a function of the profiles, the job documents, `now` and the policy, so
//! nodes that have replicated the same records decide the same. Nodes whose views differ
//! (a partition) may both claim one job; results are keyed by job and node, and readers
//! report the earliest finished claim (see [`super::JobView::reported`]).

use std::collections::{BTreeMap, BTreeSet};

use super::record::JobView;
use crate::ids::NodeId;
use crate::placement::{
    place, replace_stale, CapabilityProfile, JobSpec, Placement, PlacementError, PlacementPolicy,
    ReplicaMap,
};

/// What this node should do about one job.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Claim and run the job; `placement` chose this node (when it is not the submitter's,
    /// the claim records it).
    Claim {
        /// The job.
        job_id: String,
        /// The placement that chose this node.
        placement: Placement,
        /// Whether `placement` is a new one (the submitter's choice could no longer take it).
        replaced: bool,
    },
    /// Run again a job this node claimed and has not finished, but is not executing.
    Resume {
        /// The job.
        job_id: String,
    },
}

/// The profiles and jobs one node has seen, and the decisions they lead to.
#[derive(Debug, Clone)]
pub struct JobBoard {
    me: NodeId,
    policy: PlacementPolicy,
    profiles: BTreeMap<NodeId, CapabilityProfile>,
    jobs: BTreeMap<String, JobView>,
}

impl JobBoard {
    /// An empty board for node `me`.
    pub fn new(me: NodeId, policy: PlacementPolicy) -> Self {
        Self { me, policy, profiles: BTreeMap::new(), jobs: BTreeMap::new() }
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The placement policy.
    pub fn policy(&self) -> &PlacementPolicy {
        &self.policy
    }

    /// Takes a profile read from its document; an older one than known is ignored.
    pub fn observe_profile(&mut self, profile: CapabilityProfile) {
        let newer = self
            .profiles
            .get(&profile.node_id)
            .is_none_or(|known| known.measured_at <= profile.measured_at);
        if newer {
            self.profiles.insert(profile.node_id, profile);
        }
    }

    /// Takes a job read from its document, replacing what was known of it.
    pub fn observe_job(&mut self, job: JobView) {
        self.jobs.insert(job.id().to_owned(), job);
    }

    /// Every known profile, by node.
    pub fn profiles(&self) -> &BTreeMap<NodeId, CapabilityProfile> {
        &self.profiles
    }

    /// Every known job, by id.
    pub fn jobs(&self) -> &BTreeMap<String, JobView> {
        &self.jobs
    }

    /// One job.
    pub fn job(&self, id: &str) -> Option<&JobView> {
        self.jobs.get(id)
    }

    /// Jobs this node has claimed and not finished, plus unclaimed jobs whose submitter
    /// placed them here: the load this node reports, so that a flood of jobs placed on it
    /// makes it shed the next ones before it has claimed them all.
    pub fn load_here(&self) -> u32 {
        let count = self
            .jobs
            .values()
            .filter(|job| !job.is_finished())
            .filter(|job| match job.runs.get(&self.me) {
                Some(run) => !run.state.is_finished(),
                None => {
                    job.runs.is_empty()
                        && job.placement.as_ref().and_then(|p| p.chosen) == Some(self.me)
                }
            })
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Jobs this node has claimed and not finished.
    pub fn claimed_here(&self) -> usize {
        self.jobs
            .values()
            .filter(|job| job.runs.get(&self.me).is_some_and(|run| !run.state.is_finished()))
            .count()
    }

    /// Places a new job at `now`, with `own` as this node's current profile.
    pub fn place_new(
        &self,
        spec: &JobSpec,
        submitted_by: NodeId,
        own: &CapabilityProfile,
        now: u64,
    ) -> Result<Placement, PlacementError> {
        place(spec, &self.candidates(own), &replicas(spec, submitted_by), now, &self.policy)
    }

    /// Where `job` goes now: the submitter's placement while its choice can take the job,
    /// else a new one at `now`. `replaced` says which.
    pub fn effective_placement(
        &self,
        job: &JobView,
        own: &CapabilityProfile,
        now: u64,
    ) -> Result<(Placement, bool), PlacementError> {
        let record = &job.record;
        let candidates = self.candidates(own);
        let replicas = replicas(&record.spec, record.submitted_by);
        match &job.placement {
            Some(stored) if stored.chosen.is_some() => {
                let fresh =
                    replace_stale(stored, &record.spec, &candidates, &replicas, now, &self.policy)?;
                Ok(match fresh {
                    Some(fresh) => (fresh, true),
                    None => (stored.clone(), false),
                })
            }
            _ => Ok((place(&record.spec, &candidates, &replicas, now, &self.policy)?, true)),
        }
    }

    /// What this node should do at `now`. `own` is its current profile, `running` the jobs
    /// it is executing, `capacity` how many more it may claim.
    pub fn decide(
        &self,
        own: &CapabilityProfile,
        now: u64,
        running: &BTreeSet<String>,
        capacity: usize,
    ) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let mut room = capacity;
        for job in self.oldest_first() {
            if job.is_finished() {
                continue;
            }
            let id = job.id().to_owned();
            if let Some(run) = job.runs.get(&self.me) {
                if !run.state.is_finished() && !running.contains(&id) {
                    decisions.push(Decision::Resume { job_id: id });
                }
                continue;
            }
            if self.has_live_claim(job, now) || room == 0 {
                continue;
            }
            // A job that cannot be placed (bad spec) has nowhere to go; it stays visible.
            let Ok((placement, replaced)) = self.effective_placement(job, own, now) else {
                continue;
            };
            if placement.chosen == Some(self.me) {
                room -= 1;
                decisions.push(Decision::Claim { job_id: id, placement, replaced });
            }
        }
        decisions
    }

    /// Whether another node holds an unfinished claim on `job` and is alive.
    fn has_live_claim(&self, job: &JobView, now: u64) -> bool {
        job.runs.iter().any(|(node, run)| {
            !run.state.is_finished()
                && (*node == self.me
                    || self
                        .profiles
                        .get(node)
                        .is_some_and(|p| !self.policy.is_stale(p.measured_at, now)))
        })
    }

    /// Known profiles, with this node's replaced by its current one.
    fn candidates(&self, own: &CapabilityProfile) -> Vec<CapabilityProfile> {
        self.profiles
            .values()
            .filter(|profile| profile.node_id != own.node_id)
            .cloned()
            .chain(std::iter::once(own.clone()))
            .collect()
    }

    fn oldest_first(&self) -> Vec<&JobView> {
        let mut jobs: Vec<&JobView> = self.jobs.values().collect();
        jobs.sort_by(|a, b| (a.record.submitted_at, a.id()).cmp(&(b.record.submitted_at, b.id())));
        jobs
    }
}

/// Where a job's inputs are: on the node it was submitted to (which read them to size them)
/// and on every hub. Other agents replicate documents too, but whether a given agent has a
/// given input yet is not known without asking it, so placement charges them the transfer.
fn replicas(spec: &JobSpec, submitted_by: NodeId) -> ReplicaMap {
    let mut map = ReplicaMap::new();
    for input in &spec.inputs {
        map.insert(input.doc_id, submitted_by);
    }
    map
}
