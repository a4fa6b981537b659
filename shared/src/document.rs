//! One replicated document in memory, and the panic boundary around Automerge.
//!
//! Automerge can panic on some malformed inputs. Every call that hands it bytes from outside
//! goes through [`guarded`], so a hostile peer costs one document reload, never the process.

use std::collections::{BTreeMap, BTreeSet};
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
        let change_count = usize::try_from(doc.stats().num_changes).unwrap_or(usize::MAX);
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

    /// Changes in the document's history, in constant time.
    pub fn history_len(&self) -> usize {
        usize::try_from(self.doc.stats().num_changes).unwrap_or(usize::MAX)
    }

    /// Notes, before an apply, which of the changes it is handed this document lacks, so that
    /// [`Document::added_changes`] can name what the apply added without Automerge encoding
    /// the changes again from its op set (a cost that grows with the document).
    pub fn offered(&self, changes: Vec<Change>) -> Offered {
        let mut seen = BTreeSet::new();
        let lacking = changes
            .into_iter()
            .filter(|c| {
                seen.insert(c.hash()) && self.doc.get_change_meta_by_hash(&c.hash()).is_none()
            })
            .collect();
        Offered { lacking, history_before: self.history_len() }
    }

    /// After the apply, the encoded changes it added: the offered ones it now holds, when they
    /// account for every change it added. `None` when it added others too (changes queued
    /// earlier whose dependencies arrived): then only [`Document::changes_since`] knows them.
    pub fn added_changes(&self, offered: Offered) -> Option<Vec<Vec<u8>>> {
        let added: Vec<Vec<u8>> = offered
            .lacking
            .into_iter()
            .filter(|c| self.doc.get_change_meta_by_hash(&c.hash()).is_some())
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let grew_by = self.history_len().saturating_sub(offered.history_before);
        (added.len() == grew_by).then_some(added)
    }

    /// Takes `saved`, a whole saved document from a peer's sync message or an upload, in this
    /// one's place when it holds every change this one has and nothing waits in either one's
    /// queue (a change whose history is missing is never stored, so a queued one would be
    /// lost from the snapshot's account). Loading a saved document costs a fraction of merging it: Automerge would load
    /// it, apply its changes again one by one, and the store would then need each of them
    /// encoded again, where the saved bytes can be stored as they are. Returns how many
    /// changes the document gained, or hands `saved` back.
    pub fn adopt(&mut self, mut saved: Automerge) -> Result<usize, Box<Automerge>> {
        let holds_ours =
            self.doc.get_heads().iter().all(|h| saved.get_change_meta_by_hash(h).is_some());
        let nothing_queued =
            self.doc.get_missing_deps(&[]).is_empty() && saved.get_missing_deps(&[]).is_empty();
        if !holds_ours || !nothing_queued {
            return Err(Box::new(saved));
        }
        let history_before = self.history_len();
        saved.set_actor(self.doc.get_actor().clone());
        self.doc = saved;
        Ok(self.history_len().saturating_sub(history_before))
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

/// Changes handed to an apply that the document lacked before it, from [`Document::offered`].
#[derive(Debug)]
pub struct Offered {
    lacking: Vec<Change>,
    history_before: usize,
}

impl Offered {
    /// The offered changes the document lacked, each once, in the order offered.
    pub fn lacking(&self) -> &[Change] {
        &self.lacking
    }
}

/// Parses `bytes` as a sequence of Automerge change chunks, as raw uploads and sync messages
/// carry them. `None` if any chunk is something else (a saved document, a bundle) or does not
/// parse: callers then fall back to asking Automerge what an apply added.
pub fn parse_change_chunks(bytes: &[u8]) -> Option<Vec<Change>> {
    let mut changes = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = change_chunk_len(rest)?;
        let (chunk, tail) = rest.split_at(len);
        changes.push(parse_change(chunk)?);
        rest = tail;
    }
    Some(changes)
}

/// The magic bytes every Automerge storage chunk starts with.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// True when `bytes` start as a saved document does (what `Automerge::save()` writes and a
/// version 2 sync message carries whole), rather than as change chunks.
pub fn is_saved_document(bytes: &[u8]) -> bool {
    const DOCUMENT: u8 = 0;
    bytes.get(..9).is_some_and(|header| header[..4] == CHUNK_MAGIC && header[8] == DOCUMENT)
}

/// Loads `bytes` when they are one saved document, refusing partial data; `None` for anything
/// else. Refused or panicking input is left to the caller's ordinary path, which reports it.
pub fn load_saved(bytes: &[u8]) -> Option<Automerge> {
    is_saved_document(bytes).then(|| guarded(|| Automerge::load(bytes)).ok()).flatten()
}

/// Parses one change chunk; a panic inside Automerge counts as "does not parse".
fn parse_change(chunk: &[u8]) -> Option<Change> {
    catch_unwind(|| Change::try_from(chunk).ok()).ok().flatten()
}

/// Length of the change chunk (plain or compressed) at the start of `bytes`: magic bytes,
/// checksum, type byte, LEB128 body length, body.
fn change_chunk_len(bytes: &[u8]) -> Option<usize> {
    const MAGIC: [u8; 4] = CHUNK_MAGIC;
    const CHANGE: u8 = 1;
    const COMPRESSED_CHANGE: u8 = 2;
    let header = bytes.get(..9)?;
    if header[..4] != MAGIC || !matches!(header[8], CHANGE | COMPRESSED_CHANGE) {
        return None;
    }
    let mut body_len: u64 = 0;
    let mut used = 0;
    loop {
        let byte = *bytes.get(9 + used)?;
        body_len |= u64::from(byte & 0x7f).checked_shl(7 * u32::try_from(used).ok()?)?;
        used += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if used >= 10 {
            return None;
        }
    }
    let total = usize::try_from(body_len).ok()?.checked_add(9 + used)?;
    (total <= bytes.len()).then_some(total)
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

    /// A document with `n` changes of its own, one key each.
    fn doc_with_changes(actor: &str, n: usize) -> Automerge {
        let mut doc = Automerge::new().with_actor(ActorId::from(actor.as_bytes()));
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("{actor}{i}"), i as i64).unwrap();
            tx.commit();
        }
        doc
    }

    fn sorted_bytes(mut changes: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        changes.sort();
        changes
    }

    #[test]
    fn change_chunks_split_as_automerge_wrote_them() {
        let source = doc_with_changes("a", 3);
        let changes = source.get_changes(&[]);
        let mut upload: Vec<u8> = changes.iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        let parsed = parse_change_chunks(&upload).unwrap();
        let hashes: Vec<ChangeHash> = parsed.iter().map(Change::hash).collect();
        assert_eq!(hashes, changes.iter().map(Change::hash).collect::<Vec<_>>());
        // Compressed chunks, as `save_incremental` may write, parse too.
        let mut compressed = changes[0].clone();
        let bytes = compressed.bytes().to_vec();
        assert_eq!(parse_change_chunks(&bytes).unwrap()[0].hash(), changes[0].hash());
        // Anything else, or trailing bytes, is not a sequence of change chunks.
        assert!(parse_change_chunks(&source.save()).is_none());
        upload.push(0);
        assert!(parse_change_chunks(&upload).is_none());
        assert!(parse_change_chunks(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff]).is_none());
    }

    #[test]
    fn changes_in_sync_messages_parse_as_change_chunks() {
        use automerge::sync::{self, SyncDoc};
        let mut source = doc_with_changes("a", 9);
        let all = source.get_changes(&[]);
        // The peer lacks two changes: sent as changes, not as a whole saved document, and
        // (version 2, once the peers know each other) as one entry of two chunks.
        let mut sink = Automerge::new();
        sink.apply_changes(all[..7].to_vec()).unwrap();
        let (mut ours, mut theirs) = (sync::State::new(), sync::State::new());
        let mut carried = Vec::new();
        for _ in 0..4 {
            if let Some(message) = source.generate_sync_message(&mut ours) {
                if !message.changes.is_empty() {
                    assert_eq!(message.changes.len(), 1);
                }
                for entry in message.changes.iter() {
                    carried.extend(parse_change_chunks(entry).unwrap());
                }
                sink.receive_sync_message(&mut theirs, message).unwrap();
            }
            if let Some(message) = sink.generate_sync_message(&mut theirs) {
                source.receive_sync_message(&mut ours, message).unwrap();
            }
        }
        assert_eq!(sink.get_heads(), source.get_heads());
        let mut carried: Vec<ChangeHash> = carried.iter().map(Change::hash).collect();
        carried.sort();
        let mut missing = vec![all[7].hash(), all[8].hash()];
        missing.sort();
        assert_eq!(carried, missing);
    }

    #[test]
    fn added_changes_are_exactly_what_automerge_would_report() {
        let source = doc_with_changes("a", 4);
        let all = source.get_changes(&[]);
        let mut document = Document::new("c".parse().unwrap(), ActorId::random());
        document.doc.apply_changes(all[..2].to_vec()).unwrap();
        let before = document.doc.get_heads();
        // Offered: one known change, a duplicate, and the two new ones.
        let offered =
            document.offered(vec![all[1].clone(), all[2].clone(), all[2].clone(), all[3].clone()]);
        document.doc.apply_changes(all[1..].to_vec()).unwrap();
        let added = document.added_changes(offered).unwrap();
        assert_eq!(sorted_bytes(added), sorted_bytes(document.changes_since(&before)));
        assert_eq!(document.history_len(), 4);
    }

    #[test]
    fn added_changes_defers_to_automerge_when_queued_changes_were_applied_too() {
        let source = doc_with_changes("a", 3);
        let all = source.get_changes(&[]);
        let mut document = Document::new("c".parse().unwrap(), ActorId::random());
        document.doc.apply_changes(all[..1].to_vec()).unwrap();
        // The third change waits in Automerge's queue for the second.
        document.doc.apply_changes(vec![all[2].clone()]).unwrap();
        let before = document.doc.get_heads();
        let offered = document.offered(vec![all[1].clone()]);
        document.doc.apply_changes(vec![all[1].clone()]).unwrap();
        assert_eq!(document.doc.get_changes(&before).len(), 2);
        assert!(document.added_changes(offered).is_none());
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
