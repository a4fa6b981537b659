//! Jobs: where work runs, recorded as documents that replicate like any other.
//!
//! A node publishes its [`crate::placement::CapabilityProfile`] in a document of the
//! reserved collection [`NODES_COLLECTION`]; a submitted job is a document of
//! [`JOBS_COLLECTION`] holding the [`JobRecord`], the [`crate::placement::Placement`] its
//! submitter computed (with the score table), and one [`RunRecord`] per node that claimed it;
//! results go to a result document, one entry per node that ran the job. Every record sits
//! under its own root key, and each node writes only the keys named after itself, so
//! concurrent writers never contend for one key, even when two nodes create the same result
//! document during a partition.
//!
//! Ids are derived, not looked up: [`profile_doc_id`], [`job_doc_id`] and
//! [`result_doc_id`] hash a domain and a key, so every node finds a record from the node or
//! job id alone, and a job submitted twice lands on the same document.
//!
//! [`JobBoard`] is the pure decision: given the profiles and job records a node has seen and
//! the HLC time `now`, it says which jobs this node should claim or resume. The same inputs
//! give the same decisions on every node. [`operators`] are the built-in job kinds as pure
//! functions over JSON. The runner that reads the records, executes and writes back is
//! `io::job_runner`.

mod board;
pub mod operators;
mod record;

use sha2::{Digest, Sha256};

pub use board::{Decision, JobBoard};
pub use record::{
    json_ops, profile_from_doc, profile_ops, JobRecord, JobView, RecordError, ResultEntry,
    RunRecord, RunState, MAX_ERROR_BYTES, MAX_OUTPUT_BYTES, MAX_PARAMS_BYTES,
    MAX_STORED_OUTPUT_OPS,
};

use crate::ids::{Collection, DocId, NodeId};

/// Collection names starting with this are reserved for system records; the document API
/// refuses to create documents in them.
pub const RESERVED_COLLECTION_PREFIX: &str = "_cairn";
/// Where node capability profiles live, one document per node.
pub const NODES_COLLECTION: &str = "_cairn.nodes";
/// Where job records live, one document per job.
pub const JOBS_COLLECTION: &str = "_cairn.jobs";
/// Where results go when a job names no result document.
pub const RESULTS_COLLECTION: &str = "_cairn.results";

/// Whether a collection is reserved for system records.
pub fn is_reserved(collection: &Collection) -> bool {
    collection.as_str().starts_with(RESERVED_COLLECTION_PREFIX)
}

/// A reserved collection by name.
///
/// # Panics
/// Never for the constants of this module, which are valid names (a unit test checks).
pub fn system_collection(name: &str) -> Collection {
    name.parse().unwrap_or_else(|_| panic!("{name} is a valid collection name"))
}

/// The document holding `node`'s profile.
pub fn profile_doc_id(node: &NodeId) -> DocId {
    derived_doc_id("cairn/profile", node.as_bytes())
}

/// The document holding job `job_id`'s record, placement and runs.
pub fn job_doc_id(job_id: &str) -> DocId {
    derived_doc_id("cairn/job", job_id.as_bytes())
}

/// The default result document of job `job_id`.
pub fn result_doc_id(job_id: &str) -> DocId {
    derived_doc_id("cairn/result", job_id.as_bytes())
}

/// The compacted copy a `compact` job writes, so that every run of the job writes the same
/// document.
pub fn compact_doc_id(job_id: &str) -> DocId {
    derived_doc_id("cairn/compact", job_id.as_bytes())
}

/// The first 16 bytes of SHA-256(len(domain), domain, key).
fn derived_doc_id(domain: &str, key: &[u8]) -> DocId {
    let mut hasher = Sha256::new();
    hasher.update((domain.len() as u64).to_be_bytes());
    hasher.update(domain.as_bytes());
    hasher.update(key);
    // A SHA-256 digest always has more than 16 bytes.
    DocId::from_slice(&hasher.finalize()[..16]).expect("16 bytes of a digest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_collections_are_valid_and_reserved() {
        for name in [NODES_COLLECTION, JOBS_COLLECTION, RESULTS_COLLECTION] {
            assert!(is_reserved(&system_collection(name)), "{name}");
        }
        assert!(!is_reserved(&"plant-7/sensors".parse().unwrap()));
    }

    #[test]
    fn derived_ids_depend_on_domain_and_key() {
        let node = NodeId::from_bytes([7; 16]);
        assert_eq!(profile_doc_id(&node), profile_doc_id(&node));
        assert_ne!(job_doc_id("a"), job_doc_id("b"));
        assert_ne!(job_doc_id("a"), result_doc_id("a"));
        assert_ne!(result_doc_id("a"), compact_doc_id("a"));
    }
}
