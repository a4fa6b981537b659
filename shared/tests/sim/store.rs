//! An in-memory store per node: durable contents that survive a crash, and a queue of tasks
//! that are executed one at a time, in emission order, after a random delay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::sync;
use automerge::{Automerge, Change, ChangeHash};
use cairn_shared::ids::{DocId, NodeId};
use cairn_shared::node::TaskId;
use cairn_shared::store_task::{IndexEntry, StoreReply, StoreTask, StoredDoc};

/// One node's store.
#[derive(Debug, Default)]
pub struct SimStore {
    /// What a committed task left behind: survives crashes.
    documents: BTreeMap<DocId, StoredDoc>,
    /// The heads index, as the real store keeps it beside the documents.
    index: BTreeMap<DocId, IndexEntry>,
    /// Sync states saved per document and peer.
    sync_states: BTreeMap<DocId, BTreeMap<NodeId, Vec<u8>>>,
    /// Hash of every change ever committed, to audit what a node may advertise.
    durable_changes: BTreeSet<ChangeHash>,
    /// Tasks emitted but not yet executed: lost in a crash.
    queue: VecDeque<(TaskId, StoreTask)>,
    /// True while a completion is scheduled for the head of the queue.
    busy: bool,
}

impl SimStore {
    /// Queues a task; returns true if the caller must schedule the queue's next completion.
    pub fn enqueue(&mut self, task: TaskId, action: StoreTask) -> bool {
        self.queue.push_back((task, action));
        !std::mem::replace(&mut self.busy, true)
    }

    /// Executes the oldest queued task. The second value says whether more tasks wait, in which
    /// case the caller schedules the next completion.
    pub fn complete_next(&mut self) -> Option<((TaskId, StoreReply), bool)> {
        let Some((task, action)) = self.queue.pop_front() else {
            self.busy = false;
            return None;
        };
        let reply = self.execute(action);
        self.busy = !self.queue.is_empty();
        Some(((task, reply), self.busy))
    }

    /// A crash: tasks that were never answered did not happen.
    pub fn lose_pending(&mut self) {
        self.queue.clear();
        self.busy = false;
    }

    /// True when no task waits.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// The stored documents, as a restart reads them.
    pub fn documents(&self) -> impl Iterator<Item = &StoredDoc> {
        self.documents.values()
    }

    /// The heads index, as a restart reads it.
    pub fn index(&self) -> impl Iterator<Item = (&DocId, &IndexEntry)> {
        self.index.iter()
    }

    /// True if a committed task stored this change.
    pub fn is_durable(&self, hash: &ChangeHash) -> bool {
        self.durable_changes.contains(hash)
    }

    fn execute(&mut self, action: StoreTask) -> StoreReply {
        match action {
            StoreTask::Append { doc_id, collection, snapshot, changes, heads, deleted, .. } => {
                let heads = heads.into_iter().map(ChangeHash).collect();
                let entry = IndexEntry { collection: collection.clone(), heads, deleted };
                self.index.insert(doc_id, entry);
                let stored = self.documents.entry(doc_id).or_insert_with(|| StoredDoc {
                    doc_id,
                    collection: collection.clone(),
                    snapshot: None,
                    changes: Vec::new(),
                });
                assert_eq!(
                    stored.collection, collection,
                    "document {doc_id} changed collection in the store"
                );
                if let Some(snapshot) = snapshot {
                    let saved =
                        Automerge::load(&snapshot).expect("the core stores valid documents");
                    self.durable_changes.extend(saved.get_changes(&[]).iter().map(Change::hash));
                    stored.snapshot = Some(snapshot);
                    stored.changes.clear();
                }
                for change in changes {
                    let parsed = Change::from_bytes(change.clone())
                        .expect("the core stores only valid changes");
                    self.durable_changes.insert(parsed.hash());
                    // Changes are idempotent by hash, as in the real store.
                    if !stored.changes.contains(&change) {
                        stored.changes.push(change);
                    }
                }
                StoreReply::Committed
            }
            StoreTask::Compact { doc_id, snapshot } => {
                let stored = self.documents.get_mut(&doc_id).unwrap_or_else(|| {
                    panic!("compaction of {doc_id}, which no earlier task stored")
                });
                stored.snapshot = Some(snapshot);
                stored.changes.clear();
                StoreReply::Committed
            }
            StoreTask::Load { doc_id } => {
                let states = self.sync_states.get(&doc_id).cloned().unwrap_or_default();
                StoreReply::Loaded(
                    self.documents.get(&doc_id).cloned(),
                    states.into_iter().collect(),
                )
            }
            StoreTask::SaveSyncStates { peer, states } => {
                for (doc_id, encoded) in states {
                    let state = sync::State::decode(&encoded).expect("the core saves valid states");
                    // What both sides share, this side must have stored first: tasks commit in
                    // emission order, so a saved state never outlives the changes it names.
                    let unstored: Vec<_> =
                        state.shared_heads.iter().filter(|h| !self.is_durable(h)).collect();
                    assert!(
                        unstored.is_empty(),
                        "a sync state of {doc_id} names heads {unstored:?} not stored here"
                    );
                    self.sync_states.entry(doc_id).or_default().insert(peer, encoded);
                }
                StoreReply::Committed
            }
        }
    }
}
