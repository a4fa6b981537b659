//! One replicated document in memory, and the panic boundary around Automerge.
//!
//! Automerge can panic on some malformed inputs. Every call that hands it bytes from outside
//! goes through [`guarded`], so a hostile peer costs one document reload, never the process.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc, ScalarValue, Value, ROOT};
use sha2::{Digest, Sha256};

use crate::ids::{Collection, NodeId};
use crate::message::HeadsDigest;
use crate::store_task::StoredDoc;

/// Automerge panicked or refused the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocumentError {
    /// Automerge returned an error; the document is unchanged.
    #[error("automerge refused the input: {0}")]
    Refused(String),
    /// Automerge panicked; the in-memory document can no longer be trusted.
    #[error("automerge panicked on the input: {0}")]
    Panicked(String),
}

/// Runs `f`, turning a panic into [`DocumentError::Panicked`].
pub fn guarded<T>(
    f: impl FnOnce() -> Result<T, automerge::AutomergeError>,
) -> Result<T, DocumentError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(DocumentError::Refused(error.to_string())),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(DocumentError::Panicked(text))
        }
    }
}

/// A document held in memory with what the node knows about its storage.
#[derive(Debug)]
pub struct Document {
    /// The Automerge document.
    pub doc: Automerge,
    /// Its collection.
    pub collection: Collection,
    /// Changes stored since the last snapshot (drives compaction).
    pub changes_since_snapshot: usize,
    /// True while no change has been stored: a placeholder created to receive a peer's copy.
    pub is_placeholder: bool,
    /// Appends of this document queued but not yet committed. While any is, the node tells
    /// no peer about the document, so it never advertises heads it could still lose.
    pub persisting: usize,
    /// Bytes the document takes in the store (snapshot plus changes since): what the node's
    /// document cache charges for holding it.
    pub stored_bytes: usize,
    /// When the node last used the document, in its own use counter (for eviction).
    pub last_used: u64,
    /// Changes in the document's history, which `max_document_changes` bounds.
    pub change_count: usize,
    /// What this node last shared with departed peers (`sync::State::encode()` output), so
    /// the next connection to one of them resumes its sync from there instead of from zero.
    pub saved_sync_states: BTreeMap<NodeId, Vec<u8>>,
}

impl Document {
    /// An empty document for `collection`, editing as `actor`.
    pub fn new(collection: Collection, actor: ActorId) -> Self {
        Self {
            doc: Automerge::new().with_actor(actor),
            collection,
            changes_since_snapshot: 0,
            is_placeholder: true,
            persisting: 0,
            stored_bytes: 0,
            last_used: 0,
            change_count: 0,
            saved_sync_states: BTreeMap::new(),
        }
    }

    /// Rebuilds a document from storage. Malformed stored bytes are an error, not a panic.
    pub fn load(stored: &StoredDoc, actor: ActorId) -> Result<Self, DocumentError> {
        let mut doc = match &stored.snapshot {
            Some(snapshot) => guarded(|| Automerge::load(snapshot))?,
            None => Automerge::new(),
        };
        let changes = stored
            .changes
            .iter()
            .map(|bytes| {
                Change::from_bytes(bytes.clone()).map_err(|e| DocumentError::Refused(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        guarded(|| doc.apply_changes(changes))?;
        doc.set_actor(actor);
        let change_count = doc.get_changes_meta(&[]).len();
        Ok(Self {
            doc,
            collection: stored.collection.clone(),
            changes_since_snapshot: stored.changes.len(),
            is_placeholder: false,
            persisting: 0,
            stored_bytes: stored.stored_bytes(),
            last_used: 0,
            change_count,
            saved_sync_states: BTreeMap::new(),
        })
    }

    /// The encoded changes added since `before`, for storage.
    pub fn changes_since(&self, before: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.doc.get_changes(before).into_iter().map(|c| c.raw_bytes().to_vec()).collect()
    }

    /// The materialized JSON of the document, without Cairn's reserved keys.
    pub fn to_json(&self) -> serde_json::Value {
        materialize(&self.doc)
    }

    /// The materialized JSON as it was at `heads`.
    pub fn json_at(&self, heads: &[ChangeHash]) -> Result<serde_json::Value, DocumentError> {
        if let Some(missing) = heads.iter().find(|h| self.doc.get_change_meta_by_hash(h).is_none())
        {
            return Err(DocumentError::Refused(format!("unknown head {missing}")));
        }
        let past = guarded(|| self.doc.fork_at(heads))?;
        Ok(materialize(&past))
    }

    /// True once the document carries the deletion tombstone.
    pub fn is_deleted(&self) -> bool {
        matches!(
            self.doc.get(ROOT, TOMBSTONE_KEY),
            Ok(Some((Value::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// Marks the document deleted with an ordinary change, so the deletion replicates and
    /// merges like any write. Returns false if it already was.
    pub fn delete(&mut self, commit_time_secs: i64) -> bool {
        if self.is_deleted() {
            return false;
        }
        let mut tx = self.doc.transaction();
        if tx.put(ROOT, TOMBSTONE_KEY, true).is_err() {
            tx.rollback();
            return false;
        }
        tx.commit_with(CommitOptions::default().with_time(commit_time_secs).with_message("delete"));
        true
    }

    /// Every change, oldest first, from `offset`, at most `limit`; and the total count.
    pub fn history(&self, offset: usize, limit: usize) -> (Vec<ChangeInfo>, usize) {
        let all = self.doc.get_changes_meta(&[]);
        let total = all.len();
        let page = all
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|meta| ChangeInfo {
                hash: meta.hash.to_string(),
                actor: meta.actor.to_hex_string(),
                seq: meta.seq,
                time_secs: meta.timestamp,
                message: meta.message.map(|m| m.into_owned()),
                deps: heads_hex(&meta.deps),
            })
            .collect();
        (page, total)
    }
}

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChangeInfo {
    /// The change hash, hex.
    pub hash: String,
    /// The actor that made it, hex.
    pub actor: String,
    /// Its sequence number for that actor.
    pub seq: u64,
    /// Commit time in Unix seconds, from the writer's hybrid logical clock.
    pub time_secs: i64,
    /// The commit message, if any.
    pub message: Option<String>,
    /// The changes it depends on, hex.
    pub deps: Vec<String>,
}

/// Root key that marks a deleted document. Applications cannot write it through ops.
pub const TOMBSTONE_KEY: &str = "_cairn_deleted";

fn materialize(doc: &Automerge) -> serde_json::Value {
    let mut json =
        serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap_or(serde_json::Value::Null);
    if let Some(root) = json.as_object_mut() {
        root.remove(TOMBSTONE_KEY);
    }
    json
}

/// Digest of a set of heads, independent of their order.
pub fn heads_digest(heads: &[ChangeHash]) -> HeadsDigest {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for head in sorted {
        hasher.update(head.0);
    }
    hasher.finalize().into()
}

/// Heads as lowercase hex strings, the form Automerge's JavaScript API uses.
pub fn heads_hex(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_turns_a_panic_into_an_error() {
        let result: Result<(), _> = guarded(|| panic!("boom"));
        assert_eq!(result, Err(DocumentError::Panicked("boom".into())));
    }

    #[test]
    fn heads_digest_ignores_order() {
        let a = ChangeHash([1; 32]);
        let b = ChangeHash([2; 32]);
        assert_eq!(heads_digest(&[a, b]), heads_digest(&[b, a]));
        assert_ne!(heads_digest(&[a]), heads_digest(&[a, b]));
    }

    #[test]
    fn garbage_snapshot_is_an_error_not_a_panic() {
        let stored = StoredDoc {
            doc_id: crate::ids::DocId::from_slice(&[1; 16]).unwrap(),
            collection: "c".parse().unwrap(),
            snapshot: Some(vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]),
            changes: vec![vec![9, 9, 9]],
        };
        assert!(Document::load(&stored, ActorId::random()).is_err());
    }
}
