//! Job placement: which node should run a job, decided by a pure function every node can
//! repeat.
//!
//! Nodes publish [`CapabilityProfile`]s. To place a [`JobSpec`], [`place`] prices every
//! candidate in seconds under a [`PlacementPolicy`]:
//!
//! ```text
//! compute_s  = work_units / speed_score × (1 + cpu_weight·cpu) × (1 + queue_weight·queued/cores)
//! transfer_s = sensitivity × (bytes_to_move / bandwidth + docs_to_move × rtt)
//! penalty_s  = battery_penalty_s (on battery below the threshold)
//!            + metered_penalty_s_per_mib × bytes_to_move / MiB (on a metered link)
//! total_s    = compute_s + transfer_s + penalty_s
//! ```
//!
//! `bytes_to_move` counts the inputs the [`ReplicaMap`] does not place on the node. Hubs
//! hold every document (each committed change is offered to the hub), so inputs never move
//! to a hub and the map need only list agents; missing inputs come from the hub over the
//! node's own link. A node is ineligible if its profile is invalid or stale, it lacks a
//! required label or the architecture, its queue has reached `shed_queue_len`, or the
//! inputs would not fit its storage. The cheapest eligible node wins; an exact tie goes to
//! the lowest SHA-256 of (job id, node id), which spreads tied jobs across nodes.
//!
//! Determinism is the invariant: the same job, profiles, replica map, `now` and policy give
//! the same [`Placement`] on every node, whatever the candidates' order. Rows are ranked by
//! a total order (`f64::total_cmp`, then the tie hash, then the node id), nothing iterates a
//! hash map, and validated inputs keep every cost finite.

mod claim;
mod job;
mod policy;
mod profile;
pub mod text_id;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use claim::{reported_claim, Claim};
pub use job::{
    Constraints, JobError, JobInput, JobSpec, MAX_JOB_ID_BYTES, MAX_JOB_INPUTS, MAX_JOB_KIND_BYTES,
    MAX_SENSITIVITY, MAX_WORK_UNITS,
};
pub use policy::{PlacementPolicy, PolicyError};
pub use profile::{
    CapabilityProfile, Link, Load, NodeRole, Power, ProfileError, MAX_LABELS, MAX_LABEL_BYTES,
    MAX_SPEED_SCORE, MIN_SPEED_SCORE,
};

use crate::ids::{DocId, NodeId};

/// Bytes of the tie hash shown in a score row; enough to order any realistic candidate set.
const TIE_HASH_BYTES: usize = 8;

/// Which agents hold which documents. Hubs need not be listed: they hold everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaMap {
    holders: BTreeMap<DocId, BTreeSet<NodeId>>,
}

impl ReplicaMap {
    /// An empty map: no agent holds anything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `node` holds `doc`.
    pub fn insert(&mut self, doc: DocId, node: NodeId) {
        self.holders.entry(doc).or_default().insert(node);
    }

    /// Whether `node` holds `doc` according to the map.
    pub fn holds(&self, node: &NodeId, doc: &DocId) -> bool {
        self.holders.get(doc).is_some_and(|nodes| nodes.contains(node))
    }
}

/// Why a candidate cannot take the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ineligible {
    /// The profile failed [`CapabilityProfile::validate`].
    InvalidProfile,
    /// The profile is older than `max_profile_age_s`.
    Stale,
    /// The job requires another architecture.
    WrongArch,
    /// The node lacks a required label or value.
    MissingLabel,
    /// The node's queue has reached `shed_queue_len`.
    Overloaded,
    /// The inputs that would move do not fit the node's free storage.
    NoStorage,
}

/// One candidate's line in the score table. Costs are in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    /// The candidate.
    #[serde(with = "text_id")]
    pub node_id: NodeId,
    /// Whether it could take the job.
    pub eligible: bool,
    /// Why not, when it could not.
    pub reason: Option<Ineligible>,
    /// Time to run the job there, with its load.
    pub compute_s: f64,
    /// Time to bring the missing inputs, weighted by sensitivity.
    pub transfer_s: f64,
    /// Battery and metered-link penalties.
    pub penalty_s: f64,
    /// The sum: lower is better.
    pub total_s: f64,
    /// Input bytes the node lacks.
    pub bytes_to_move: u64,
    /// Hex prefix of SHA-256(job id, node id), which breaks exact ties.
    pub tie_hash: String,
}

/// The decision and the table that led to it, stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The job placed.
    pub job_id: String,
    /// The HLC time (NTP64) the decision was made at.
    pub decided_at: u64,
    /// The node chosen, or none when no candidate is eligible.
    #[serde(with = "text_id::option")]
    pub chosen: Option<NodeId>,
    /// Every candidate, eligible ones first, then by total and tie hash.
    pub table: Vec<ScoreRow>,
}

/// Why placement could not run at all (a bad candidate only makes its row ineligible).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// The job spec is out of bounds.
    #[error("invalid job: {0}")]
    Job(#[from] JobError),
    /// The policy is out of bounds.
    #[error("invalid placement policy: {0}")]
    Policy(#[from] PolicyError),
    /// Two profiles for one node: the caller should keep the newest.
    #[error("node {0} appears twice among the candidates")]
    DuplicateCandidate(NodeId),
}

/// Places `job` on the cheapest eligible candidate at HLC time `now` (NTP64).
pub fn place(
    job: &JobSpec,
    candidates: &[CapabilityProfile],
    replicas: &ReplicaMap,
    now: u64,
    policy: &PlacementPolicy,
) -> Result<Placement, PlacementError> {
    job.validate()?;
    policy.validate()?;
    let mut sorted: Vec<&CapabilityProfile> = candidates.iter().collect();
    sorted.sort_by_key(|profile| profile.node_id);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].node_id == pair[1].node_id) {
        return Err(PlacementError::DuplicateCandidate(pair[0].node_id));
    }
    let mut table: Vec<ScoreRow> =
        sorted.into_iter().map(|node| score(job, node, replicas, now, policy)).collect();
    table.sort_by(rank);
    let chosen = table.first().filter(|row| row.eligible).map(|row| row.node_id);
    Ok(Placement { job_id: job.id.clone(), decided_at: now, chosen, table })
}

/// Places a job again at a later `now`, for a job that has not started. Returns the new
/// placement only if the previous choice can no longer take the job (its profile went
/// stale, is invalid, fails the constraints, or it is gone). A node that merely became
/// costlier keeps the job, so placements do not churn; so does an overloaded one, whose
/// queue the job joins: overload sheds new placements, and moving jobs already placed would
/// let the overloaded node and the next one both claim them.
pub fn replace_stale(
    previous: &Placement,
    job: &JobSpec,
    candidates: &[CapabilityProfile],
    replicas: &ReplicaMap,
    now: u64,
    policy: &PlacementPolicy,
) -> Result<Option<Placement>, PlacementError> {
    let fresh = place(job, candidates, replicas, now, policy)?;
    let can_take = |row: &ScoreRow| row.eligible || row.reason == Some(Ineligible::Overloaded);
    let still_eligible = previous
        .chosen
        .is_some_and(|node| fresh.table.iter().any(|row| row.node_id == node && can_take(row)));
    Ok((!still_eligible && fresh.chosen != previous.chosen).then_some(fresh))
}

/// Prices one candidate.
fn score(
    job: &JobSpec,
    node: &CapabilityProfile,
    replicas: &ReplicaMap,
    now: u64,
    policy: &PlacementPolicy,
) -> ScoreRow {
    let tie_hash = tie_hash(&job.id, &node.node_id);
    if node.validate().is_err() {
        // Costs from nonsense numbers would mislead; the row only says why it was skipped.
        return ScoreRow {
            node_id: node.node_id,
            eligible: false,
            reason: Some(Ineligible::InvalidProfile),
            compute_s: 0.0,
            transfer_s: 0.0,
            penalty_s: 0.0,
            total_s: 0.0,
            bytes_to_move: 0,
            tie_hash,
        };
    }
    let (bytes_to_move, docs_to_move) = missing_inputs(job, node, replicas);
    let compute_s = policy.compute_s(job, node);
    let transfer_s = PlacementPolicy::transfer_s(job, node, bytes_to_move, docs_to_move);
    let penalty_s = policy.penalty_s(node, bytes_to_move);
    let reason = eligibility(job, node, bytes_to_move, now, policy).err();
    ScoreRow {
        node_id: node.node_id,
        eligible: reason.is_none(),
        reason,
        compute_s,
        transfer_s,
        penalty_s,
        total_s: compute_s + transfer_s + penalty_s,
        bytes_to_move,
        tie_hash,
    }
}

/// The bytes and number of input documents the node lacks.
fn missing_inputs(job: &JobSpec, node: &CapabilityProfile, replicas: &ReplicaMap) -> (u64, usize) {
    if node.role == NodeRole::Hub {
        return (0, 0);
    }
    job.inputs
        .iter()
        .filter(|input| !replicas.holds(&node.node_id, &input.doc_id))
        .fold((0, 0), |(bytes, docs), input| (bytes.saturating_add(input.size_bytes), docs + 1))
}

/// The first reason the node cannot take the job, if any.
fn eligibility(
    job: &JobSpec,
    node: &CapabilityProfile,
    bytes_to_move: u64,
    now: u64,
    policy: &PlacementPolicy,
) -> Result<(), Ineligible> {
    if policy.is_stale(node.measured_at, now) {
        return Err(Ineligible::Stale);
    }
    if job.constraints.arch.as_ref().is_some_and(|arch| *arch != node.arch) {
        return Err(Ineligible::WrongArch);
    }
    let required = &job.constraints.required_labels;
    if required.iter().any(|(key, value)| node.labels.get(key) != Some(value)) {
        return Err(Ineligible::MissingLabel);
    }
    if node.load.queued_jobs >= policy.shed_queue_len {
        return Err(Ineligible::Overloaded);
    }
    if node.storage_free_bytes < bytes_to_move {
        return Err(Ineligible::NoStorage);
    }
    Ok(())
}

/// Eligible first, then cheapest, then lowest tie hash; the node id makes the order total.
fn rank(a: &ScoreRow, b: &ScoreRow) -> Ordering {
    b.eligible
        .cmp(&a.eligible)
        .then(a.total_s.total_cmp(&b.total_s))
        .then_with(|| a.tie_hash.cmp(&b.tie_hash))
        .then(a.node_id.cmp(&b.node_id))
}

/// Hex of the first bytes of SHA-256(len(job id), job id, node id). The length prefix keeps
/// the encoding unambiguous.
fn tie_hash(job_id: &str, node: &NodeId) -> String {
    let mut hasher = Sha256::new();
    hasher.update((job_id.len() as u64).to_be_bytes());
    hasher.update(job_id.as_bytes());
    hasher.update(node.as_bytes());
    hasher.finalize()[..TIE_HASH_BYTES].iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests;
