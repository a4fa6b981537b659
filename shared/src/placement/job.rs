//! A job to place: its inputs, how much work it is, and where it may run.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::profile::{labels_within_bounds, MAX_LABEL_BYTES};
use crate::ids::DocId;

/// Most input documents one job may name.
pub const MAX_JOB_INPUTS: usize = 1024;
/// Longest job id, in bytes; ids appear in URLs (`/v1/jobs/{id}`).
pub const MAX_JOB_ID_BYTES: usize = 128;
/// Longest job kind, in bytes.
pub const MAX_JOB_KIND_BYTES: usize = 64;
/// Largest `work_units` accepted; with the profile bounds it keeps costs finite.
pub const MAX_WORK_UNITS: f64 = 1e15;
/// Largest locality sensitivity accepted.
pub const MAX_SENSITIVITY: f64 = 1e6;

/// One input document of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInput {
    /// The document.
    #[serde(with = "super::text_id")]
    pub doc_id: DocId,
    /// Its size, in bytes: what moves if the chosen node lacks it.
    pub size_bytes: u64,
}

/// Where a job may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraints {
    /// Labels the node must carry, with these exact values.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// The architecture the node must have, if the job ships native code.
    #[serde(default)]
    pub arch: Option<String>,
}

/// A job to place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Unique id: 1..=[`MAX_JOB_ID_BYTES`] bytes of `[A-Za-z0-9._-]`.
    pub id: String,
    /// What the job does, for the node that runs it.
    pub kind: String,
    /// Input documents, at most [`MAX_JOB_INPUTS`], each named once.
    pub inputs: Vec<JobInput>,
    /// How much computing the job needs, in the benchmark's work units.
    pub work_units: f64,
    /// Seconds of cost per second of data movement: 0 ignores where the data is, larger
    /// values pull the job toward its data.
    pub sensitivity: f64,
    /// Where the job may run.
    #[serde(default)]
    pub constraints: Constraints,
}

/// Why a job spec is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// Empty, oversized, or characters outside `[A-Za-z0-9._-]`.
    #[error("job id must be 1..={MAX_JOB_ID_BYTES} characters of [A-Za-z0-9._-]")]
    Id,
    /// Empty or oversized kind.
    #[error("job kind must be 1..={MAX_JOB_KIND_BYTES} bytes")]
    Kind,
    /// More inputs than [`MAX_JOB_INPUTS`].
    #[error("a job may name at most {MAX_JOB_INPUTS} inputs, got {0}")]
    TooManyInputs(usize),
    /// The same document twice would count its bytes twice.
    #[error("input {0} is named twice")]
    DuplicateInput(DocId),
    /// Work that is negative, too large, or not a number.
    #[error("work_units must be a finite number in [0, {MAX_WORK_UNITS}]")]
    WorkUnits,
    /// Sensitivity that is negative, too large, or not a number.
    #[error("sensitivity must be a finite number in [0, {MAX_SENSITIVITY}]")]
    Sensitivity,
    /// Too many labels, or an oversized label or architecture name.
    #[error("constraints exceed the label bounds")]
    Constraints,
}

impl JobSpec {
    /// Checks the bounds; [`super::place`] refuses a job that fails.
    pub fn validate(&self) -> Result<(), JobError> {
        let id_char = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if self.id.is_empty() || self.id.len() > MAX_JOB_ID_BYTES || !self.id.bytes().all(id_char) {
            return Err(JobError::Id);
        }
        if self.kind.is_empty() || self.kind.len() > MAX_JOB_KIND_BYTES {
            return Err(JobError::Kind);
        }
        if self.inputs.len() > MAX_JOB_INPUTS {
            return Err(JobError::TooManyInputs(self.inputs.len()));
        }
        let mut seen = BTreeSet::new();
        if let Some(input) = self.inputs.iter().find(|input| !seen.insert(input.doc_id)) {
            return Err(JobError::DuplicateInput(input.doc_id));
        }
        if !(0.0..=MAX_WORK_UNITS).contains(&self.work_units) {
            return Err(JobError::WorkUnits);
        }
        if !(0.0..=MAX_SENSITIVITY).contains(&self.sensitivity) {
            return Err(JobError::Sensitivity);
        }
        let arch_ok = self.constraints.arch.as_ref().is_none_or(|a| a.len() <= MAX_LABEL_BYTES);
        if !arch_ok || !labels_within_bounds(&self.constraints.required_labels) {
            return Err(JobError::Constraints);
        }
        Ok(())
    }
}
