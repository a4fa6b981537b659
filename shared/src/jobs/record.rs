//! The records a job leaves in documents, how they are read back from a document's JSON,
//! and the edit operations that write them.
//!
//! A job document's root holds `job` (the [`JobRecord`]), `placement` (the submitter's
//! decision) and `run.<node id>` (each claimer's [`RunRecord`]). A result document's root
//! holds `job_id`, `result.<node id>` (each runner's [`ResultEntry`]) and `reported` (the
//! entry of the reported run, rewritten by that run's node if a concurrent write won).
//! A profile document's root holds `profile`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{DocId, NodeId};
use crate::ops::{Op, PathSegment, ValueKind};
use crate::placement::{text_id, CapabilityProfile, Claim, JobError, JobSpec, Placement};

/// Largest job parameters, serialized, in bytes.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
/// Largest job output, serialized, in bytes (an executable's stdout is cut off here).
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// Longest error message kept in a run record, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;
/// An output needing more edit operations than this is stored as one JSON string instead
/// (`output_json`), so a long list of small values stays one cheap scalar.
pub const MAX_STORED_OUTPUT_OPS: usize = 2_000;

const JOB_KEY: &str = "job";
const PLACEMENT_KEY: &str = "placement";
const PROFILE_KEY: &str = "profile";
const RUN_PREFIX: &str = "run.";
const RESULT_PREFIX: &str = "result.";
const REPORTED_KEY: &str = "reported";

/// Why a record cannot be read or written.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The document lacks a record or holds one of the wrong shape.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which record.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The job spec is out of bounds.
    #[error(transparent)]
    Job(#[from] JobError),
    /// Parameters larger than [`MAX_PARAMS_BYTES`].
    #[error("job parameters exceed {MAX_PARAMS_BYTES} bytes")]
    ParamsTooLarge,
}

/// A submitted job: what to run, with what, and where the result goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id, kind, inputs, work estimate, sensitivity and constraints.
    pub spec: JobSpec,
    /// Parameters for the job kind, at most [`MAX_PARAMS_BYTES`] serialized.
    #[serde(default)]
    pub params: Value,
    /// The document results are written to.
    #[serde(with = "text_id")]
    pub result_doc: DocId,
    /// The node the job was submitted to, which holds its inputs.
    #[serde(with = "text_id")]
    pub submitted_by: NodeId,
    /// When, as an HLC time (NTP64).
    pub submitted_at: u64,
}

impl JobRecord {
    /// Checks the spec and the size of the parameters.
    pub fn validate(&self) -> Result<(), RecordError> {
        self.spec.validate()?;
        if serialized_len(&self.params) > MAX_PARAMS_BYTES {
            return Err(RecordError::ParamsTooLarge);
        }
        Ok(())
    }
}

/// How far a claimed run got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Claimed, waiting for a slot on the node.
    Queued,
    /// Executing.
    Running,
    /// Finished with a result.
    Done,
    /// Finished with an error.
    Failed,
}

impl RunState {
    /// Whether the run has ended, with a result or an error.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Done | Self::Failed)
    }
}

/// One node's claim on a job and how its run went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// When the node claimed the job (HLC, NTP64): the earliest finished claim is reported.
    pub claimed_at: u64,
    /// Where the run is.
    pub state: RunState,
    /// Fraction done, 0..=1.
    pub progress: f64,
    /// When this record was last written (HLC, NTP64).
    pub updated_at: u64,
    /// Why the run failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The placement that sent the job here, when it differs from the submitter's (the
    /// submitter's choice could no longer take it).
    #[serde(default)]
    pub placement: Option<Placement>,
}

/// One node's result of a job, in the result document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEntry {
    /// The job.
    pub job_id: String,
    /// The node that ran it.
    #[serde(with = "text_id")]
    pub node_id: NodeId,
    /// When that node claimed the job (HLC, NTP64).
    pub claimed_at: u64,
    /// When it finished (HLC, NTP64).
    pub finished_at: u64,
    /// What the job produced.
    #[serde(default)]
    pub output: Value,
}

/// A job as read from its document.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// The submitted record.
    pub record: JobRecord,
    /// The submitter's placement, if it wrote one.
    pub placement: Option<Placement>,
    /// Every node's run, by node.
    pub runs: BTreeMap<NodeId, RunRecord>,
}

impl JobView {
    /// Reads a job document's materialized JSON. Run entries that do not parse are skipped
    /// (another node's bad write must not hide the job); a missing or bad record is an error.
    pub fn from_doc(doc: &Value) -> Result<Self, RecordError> {
        let record: JobRecord = field(doc, JOB_KEY, "job record")?;
        record.validate()?;
        let placement = doc
            .get(PLACEMENT_KEY)
            .and_then(|value| serde_json::from_value::<Placement>(value.clone()).ok());
        let runs = prefixed(doc, RUN_PREFIX)
            .filter_map(|(node, value)| Some((node, serde_json::from_value(value.clone()).ok()?)))
            .collect();
        Ok(Self { record, placement, runs })
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.record.spec.id
    }

    /// Every node's claim.
    pub fn claims(&self) -> Vec<Claim> {
        self.runs
            .iter()
            .map(|(node, run)| Claim {
                job_id: self.id().to_owned(),
                node_id: *node,
                claimed_at: run.claimed_at,
            })
            .collect()
    }

    /// The reported run: among finished runs, the earliest claim by (HLC, node id). A claim
    /// whose node died before finishing is not reported; the job went to another node.
    pub fn reported(&self) -> Option<(NodeId, &RunRecord)> {
        let finished: Vec<Claim> = self
            .claims()
            .into_iter()
            .filter(|claim| self.runs.get(&claim.node_id).is_some_and(|r| r.state.is_finished()))
            .collect();
        let claim = crate::placement::reported_claim(&finished)?;
        Some((claim.node_id, self.runs.get(&claim.node_id)?))
    }

    /// Whether some run has finished.
    pub fn is_finished(&self) -> bool {
        self.runs.values().any(|run| run.state.is_finished())
    }

    /// The placement that chose the reported or, failing that, the earliest claim's node;
    /// else the submitter's.
    pub fn deciding_placement(&self) -> Option<&Placement> {
        let node = self.reported().map(|(node, _)| node).or_else(|| {
            let claims = self.claims();
            crate::placement::reported_claim(&claims).map(|claim| claim.node_id)
        });
        node.and_then(|node| self.runs.get(&node))
            .and_then(|run| run.placement.as_ref())
            .or(self.placement.as_ref())
    }

    /// Ops that create the job document.
    pub fn create_ops(record: &JobRecord, placement: &Placement) -> Vec<Op> {
        let mut ops = json_ops(vec![key(JOB_KEY)], &to_value(record));
        ops.extend(json_ops(vec![key(PLACEMENT_KEY)], &to_value(placement)));
        ops
    }

    /// Ops that write `node`'s run record.
    pub fn run_ops(node: &NodeId, run: &RunRecord) -> Vec<Op> {
        json_ops(vec![key(&format!("{RUN_PREFIX}{node}"))], &to_value(run))
    }
}

impl ResultEntry {
    /// Ops that write this entry into a result document, and, when `reported`, also as the
    /// document's `reported` result.
    pub fn write_ops(&self, reported: bool) -> Vec<Op> {
        let mut ops = vec![Op::Set {
            path: vec![key("job_id")],
            value: Value::String(self.job_id.clone()),
            kind: ValueKind::String,
        }];
        let entry = to_value(&self.stored());
        ops.extend(json_ops(vec![key(&format!("{RESULT_PREFIX}{}", self.node_id))], &entry));
        if reported {
            ops.extend(json_ops(vec![key(REPORTED_KEY)], &entry));
        }
        ops
    }

    /// The entry as stored: a large output becomes one JSON string (`output_json`).
    fn stored(&self) -> Value {
        let mut value = to_value(self);
        if json_ops(Vec::new(), &self.output).len() > MAX_STORED_OUTPUT_OPS {
            if let Value::Object(fields) = &mut value {
                fields.remove("output");
                fields.insert("output_json".into(), Value::String(self.output.to_string()));
            }
        }
        value
    }

    /// Reads an entry as stored, undoing [`Self::stored`].
    fn from_stored(value: &Value) -> Option<Self> {
        let mut entry: Self = serde_json::from_value(value.clone()).ok()?;
        if let Some(text) = value.get("output_json").and_then(Value::as_str) {
            entry.output = serde_json::from_str(text).ok()?;
        }
        Some(entry)
    }

    /// Every node's entry in a result document, by node.
    pub fn all_in(doc: &Value) -> BTreeMap<NodeId, Self> {
        prefixed(doc, RESULT_PREFIX)
            .filter_map(|(node, value)| Some((node, Self::from_stored(value)?)))
            .collect()
    }

    /// The entry a result document reports, if any.
    pub fn reported_in(doc: &Value) -> Option<Self> {
        Self::from_stored(doc.get(REPORTED_KEY)?)
    }
}

/// Ops that write a profile into its document. Given the profile last written there, only
/// the values that changed are written: a profile is republished every few seconds, and
/// each unchanged value rewritten would lengthen the document's history for nothing.
pub fn profile_ops(profile: &CapabilityProfile, previous: Option<&CapabilityProfile>) -> Vec<Op> {
    let path = vec![key(PROFILE_KEY)];
    match previous {
        Some(previous) => diff_ops(path, &to_value(previous), &to_value(profile)),
        None => json_ops(path, &to_value(profile)),
    }
}

/// Ops that turn `old` at `path` into `new`: maps are compared key by key, anything else
/// that differs is written whole.
fn diff_ops(path: Vec<PathSegment>, old: &Value, new: &Value) -> Vec<Op> {
    match (old, new) {
        (Value::Object(before), Value::Object(after)) => {
            let mut ops = Vec::new();
            for name in before.keys().filter(|name| !after.contains_key(*name)) {
                let mut child = path.clone();
                child.push(key(name));
                ops.push(Op::Delete { path: child });
            }
            for (name, value) in after {
                let mut child = path.clone();
                child.push(key(name));
                match before.get(name) {
                    Some(was) => ops.extend(diff_ops(child, was, value)),
                    None => ops.extend(json_ops(child, value)),
                }
            }
            ops
        }
        _ if old == new => Vec::new(),
        _ => json_ops(path, new),
    }
}

/// Reads a profile document's materialized JSON.
pub fn profile_from_doc(doc: &Value) -> Result<CapabilityProfile, RecordError> {
    field(doc, PROFILE_KEY, "profile")
}

/// Ops that set `value` at `path`, with every string an atomic scalar rather than
/// collaborative text: records are replaced whole, never edited character by character,
/// and text would cost an operation per character.
pub fn json_ops(path: Vec<PathSegment>, value: &Value) -> Vec<Op> {
    let mut ops = Vec::new();
    push_json_ops(&mut ops, path, value);
    ops
}

fn push_json_ops(ops: &mut Vec<Op>, path: Vec<PathSegment>, value: &Value) {
    match value {
        Value::Object(fields) => {
            ops.push(Op::Set {
                path: path.clone(),
                value: Value::Object(Default::default()),
                kind: ValueKind::Auto,
            });
            for (name, field) in fields {
                let mut child = path.clone();
                child.push(key(name));
                push_json_ops(ops, child, field);
            }
        }
        Value::Array(items) => {
            ops.push(Op::Set {
                path: path.clone(),
                value: Value::Array(Vec::new()),
                kind: ValueKind::Auto,
            });
            for (index, item) in items.iter().enumerate() {
                let empty = match item {
                    Value::Object(_) => Some(Value::Object(Default::default())),
                    Value::Array(_) => Some(Value::Array(Vec::new())),
                    _ => None,
                };
                let kind = if item.is_string() { ValueKind::String } else { ValueKind::Auto };
                let value = empty.clone().unwrap_or_else(|| item.clone());
                ops.push(Op::Insert { path: path.clone(), index, value, kind });
                if empty.is_some() {
                    let mut child = path.clone();
                    child.push(PathSegment::Index(index));
                    // The container was just inserted empty; fill it in place.
                    push_children(ops, child, item);
                }
            }
        }
        Value::String(_) => {
            ops.push(Op::Set { path, value: value.clone(), kind: ValueKind::String })
        }
        _ => ops.push(Op::Set { path, value: value.clone(), kind: ValueKind::Auto }),
    }
}

/// Fills an existing empty container at `path` with the contents of `value`.
fn push_children(ops: &mut Vec<Op>, path: Vec<PathSegment>, value: &Value) {
    let mut nested = Vec::new();
    push_json_ops(&mut nested, path, value);
    // The first op recreates the container, which already exists empty: skip it.
    ops.extend(nested.into_iter().skip(1));
}

fn key(name: &str) -> PathSegment {
    PathSegment::Key(name.to_owned())
}

fn to_value<T: Serialize>(value: &T) -> Value {
    // Records are plain data with string keys; serializing them to a Value cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn serialized_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

fn field<T: for<'de> Deserialize<'de>>(
    doc: &Value,
    name: &str,
    what: &'static str,
) -> Result<T, RecordError> {
    let value = doc
        .get(name)
        .ok_or_else(|| RecordError::Malformed { what, reason: format!("no `{name}` key") })?;
    serde_json::from_value(value.clone())
        .map_err(|e| RecordError::Malformed { what, reason: e.to_string() })
}

/// Root entries `<prefix><node id>` of a document, with the node id parsed.
fn prefixed<'a>(doc: &'a Value, prefix: &'a str) -> impl Iterator<Item = (NodeId, &'a Value)> {
    doc.as_object()
        .into_iter()
        .flatten()
        .filter_map(move |(name, value)| Some((name.strip_prefix(prefix)?.parse().ok()?, value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::Document;
    use crate::ops::apply_ops;

    #[test]
    fn a_republished_profile_writes_only_what_changed() {
        use crate::placement::{Link, Load, NodeRole, Power};
        let mut profile = CapabilityProfile {
            node_id: NodeId::from_bytes([1; 16]),
            role: NodeRole::Agent,
            arch: "x86_64".into(),
            cores: 2,
            speed_score: 10.0,
            memory_free_bytes: 5,
            storage_free_bytes: 6,
            power: Power::Battery { level_percent: 50 },
            link: Link { rtt_ms: 1, bandwidth_bytes_per_sec: 2, metered: false },
            load: Load { cpu: 0.5, queued_jobs: 0 },
            labels: BTreeMap::from([("a".to_owned(), "1".to_owned())]),
            measured_at: 1,
        };
        let mut document = Document::new("c".parse().unwrap(), automerge::ActorId::random());
        apply_ops(&mut document.doc, &profile_ops(&profile, None), 0).unwrap();
        let previous = profile.clone();
        profile.measured_at = 2;
        profile.power = Power::Mains;
        profile.labels = BTreeMap::from([("b".to_owned(), "2".to_owned())]);
        let ops = profile_ops(&profile, Some(&previous));
        assert_eq!(ops.len(), 4, "time, power, one label out, one in: {ops:?}");
        apply_ops(&mut document.doc, &ops, 0).unwrap();
        assert_eq!(profile_from_doc(&document.to_json()), Ok(profile));
    }

    #[test]
    fn json_ops_write_back_the_same_json_with_scalar_strings() {
        let value = serde_json::json!({
            "a": "text", "n": [1, 2.5, "x", {"k": ["y", null]}, [true]], "m": {}, "u": u64::MAX
        });
        let mut document = Document::new("c".parse().unwrap(), automerge::ActorId::random());
        apply_ops(&mut document.doc, &json_ops(vec![key("v")], &value), 0).unwrap();
        assert_eq!(document.to_json()["v"], value);
    }
}
