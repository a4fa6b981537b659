//! The durable store: one SQLite database per node, owned by one dedicated thread.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a committed transaction survives power
//! loss. Group commit: the thread takes every task already queued (up to
//! [`MAX_TASKS_PER_COMMIT`]) and commits them in one transaction, so concurrent writes share
//! one fsync. Tasks run strictly in the order they were queued.
//!
//! A failed commit is fatal: the thread stops and drops its channels, the driver sees that
//! and the process exits, to restart from what is durable (crash-only). Answering a write
//! that might not be on disk would be worse.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use crate::ids::{Collection, DocId, NodeId};
use crate::node::TaskId;
use crate::store_task::{IndexEntry, SavedSyncStates, StoreReply, StoreTask, StoredDoc};

/// Most tasks folded into one transaction.
pub const MAX_TASKS_PER_COMMIT: usize = 1024;

/// Tasks waiting for the store thread; a full queue slows the node loop rather than growing.
pub const STORE_QUEUE_CAPACITY: usize = 4096;

/// Heads index rows per chunk handed out by [`Store::scan_index`]: large enough that passing
/// a chunk between threads costs nothing next to reading it, small enough that the consumer
/// starts early.
pub const INDEX_CHUNK_ROWS: usize = 1024;

/// The heads index query: the covering index `documents_heads` answers it in id order.
const INDEX_QUERY: &str =
    "SELECT doc_id, collection, heads, deleted FROM documents ORDER BY doc_id";

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: documents with their heads index entry and snapshot; incremental changes since it.
    "CREATE TABLE documents (
        doc_id BLOB PRIMARY KEY NOT NULL,
        collection TEXT NOT NULL,
        heads BLOB NOT NULL,
        hlc INTEGER NOT NULL,
        snapshot BLOB
    );
    CREATE INDEX documents_by_collection ON documents(collection, doc_id);
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        doc_id BLOB NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX changes_by_doc ON changes(doc_id, seq);",
    // 2: the change feed: one row per committed append, in commit order, for local
    // subscribers and resumable cursors. Written in the same transaction as the change.
    "CREATE TABLE feed (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        doc_id BLOB NOT NULL,
        collection TEXT NOT NULL,
        heads BLOB NOT NULL,
        origin BLOB NOT NULL,
        hlc INTEGER NOT NULL
    );
    CREATE INDEX feed_by_doc ON feed(doc_id, seq);
    CREATE INDEX feed_by_collection ON feed(collection, seq);",
    // 3: deletion tombstones, so listings skip deleted documents and feeds can say so.
    "ALTER TABLE documents ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE feed ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;",
    // 4: the heads index as a covering index, so a start reads it in id order without
    // touching table rows (where snapshots live, and `deleted` sits after them).
    "CREATE INDEX documents_heads ON documents(doc_id, collection, heads, deleted);",
    // 5: per-peer sync states saved when a peer leaves, read back with the document.
    "CREATE TABLE sync_states (
        doc_id BLOB NOT NULL,
        peer BLOB NOT NULL,
        state BLOB NOT NULL,
        PRIMARY KEY (doc_id, peer)
    ) WITHOUT ROWID;",
];

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database holds something this build cannot read.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The database was written by a newer build.
    #[error("store schema version {found} is newer than this build's {supported}")]
    TooNew {
        /// Version found on disk.
        found: usize,
        /// Newest version this build knows.
        supported: usize,
    },
}

/// What one group commit did, for metrics and change-feed subscribers.
#[derive(Debug, Clone, Copy)]
pub struct CommitReport {
    /// Tasks in the transaction.
    pub tasks: usize,
    /// Wall time from begin to commit.
    pub latency: Duration,
    /// The newest change-feed position after the commit.
    pub feed_head: u64,
}

/// A node's SQLite database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut store = Self { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: usize =
            self.conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::TooNew { found: version, supported: MIGRATIONS.len() });
        }
        if version == MIGRATIONS.len() {
            // Current: an empty transaction would still cost a commit (and its fsyncs) at
            // every start.
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for migration in &MIGRATIONS[version..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
        tx.commit()?;
        Ok(())
    }

    /// Every stored document, for start-up.
    pub fn load_all(&self) -> Result<Vec<StoredDoc>, StoreError> {
        let mut statement = self.conn.prepare("SELECT doc_id FROM documents ORDER BY doc_id")?;
        let ids = statement
            .query_map([], |row| row.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut docs = Vec::with_capacity(ids.len());
        for id in ids {
            let doc_id = DocId::from_slice(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Some(doc) = self.load(doc_id)? {
                docs.push(doc);
            }
        }
        Ok(docs)
    }

    /// Every stored document's heads index entry, in id order: one scan of the index, no
    /// document read. Start-up streams it with [`Store::scan_index`] instead.
    pub fn load_index(&self) -> Result<Vec<(DocId, IndexEntry)>, StoreError> {
        let mut statement = self.conn.prepare(INDEX_QUERY)?;
        let mut rows = statement.query([])?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            let doc_id = DocId::from_slice(&row.get::<_, Vec<u8>>(0)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let collection: Collection = row
                .get::<_, String>(1)?
                .parse()
                .map_err(|e: crate::ids::IdParseError| StoreError::Corrupt(e.to_string()))?;
            let heads_bytes = row.get::<_, Vec<u8>>(2)?;
            let heads = decode_heads(doc_id, &heads_bytes)?;
            let deleted = row.get::<_, bool>(3)?;
            entries.push((doc_id, IndexEntry { collection, heads, deleted }));
        }
        Ok(entries)
    }

    /// The entries of [`Store::load_index`], handed to `sink` in chunks of
    /// [`INDEX_CHUNK_ROWS`] as they are read, so that a consumer on another thread works on
    /// one chunk while SQLite reads the next. Values are read in place and every entry of a
    /// collection shares one name, so a row costs one allocation, its heads. The scan stops
    /// early, without error, when `sink` breaks.
    pub fn scan_index(
        &self,
        mut sink: impl FnMut(Vec<(DocId, IndexEntry)>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let corrupt = |e: rusqlite::types::FromSqlError| StoreError::Corrupt(e.to_string());
        let mut statement = self.conn.prepare(INDEX_QUERY)?;
        let mut rows = statement.query([])?;
        let mut collections: HashMap<String, Collection> = HashMap::new();
        let mut chunk = Vec::with_capacity(INDEX_CHUNK_ROWS);
        while let Some(row) = rows.next()? {
            let doc_id = DocId::from_slice(row.get_ref(0)?.as_blob().map_err(corrupt)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let name = row.get_ref(1)?.as_str().map_err(corrupt)?;
            let collection = match collections.get(name) {
                Some(collection) => collection.clone(),
                None => {
                    let collection: Collection =
                        name.parse().map_err(|e: crate::ids::IdParseError| {
                            StoreError::Corrupt(e.to_string())
                        })?;
                    collections.insert(name.to_owned(), collection.clone());
                    collection
                }
            };
            let heads = decode_heads(doc_id, row.get_ref(2)?.as_blob().map_err(corrupt)?)?;
            let deleted = row.get::<_, bool>(3)?;
            chunk.push((doc_id, IndexEntry { collection, heads, deleted }));
            if chunk.len() == INDEX_CHUNK_ROWS {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(INDEX_CHUNK_ROWS));
                if sink(full).is_break() {
                    return Ok(());
                }
            }
        }
        if !chunk.is_empty() {
            let _ = sink(chunk);
        }
        Ok(())
    }

    /// One stored document.
    pub fn load(&self, doc_id: DocId) -> Result<Option<StoredDoc>, StoreError> {
        load_doc(&self.conn, doc_id)
    }

    /// Runs tasks in order inside one transaction; nothing is answered unless all commit.
    pub fn execute(
        &mut self,
        tasks: &[(TaskId, StoreTask)],
    ) -> Result<Vec<(TaskId, StoreReply)>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut replies = Vec::with_capacity(tasks.len());
        for (task, action) in tasks {
            let reply = match action {
                StoreTask::Append { .. } => {
                    append(&tx, action)?;
                    StoreReply::Committed
                }
                StoreTask::Compact { doc_id, snapshot } => {
                    replace_snapshot(&tx, *doc_id, snapshot)?;
                    StoreReply::Committed
                }
                StoreTask::Load { doc_id } => {
                    StoreReply::Loaded(load_doc(&tx, *doc_id)?, load_sync_states(&tx, *doc_id)?)
                }
                StoreTask::SaveSyncStates { peer, states } => {
                    let mut insert = tx.prepare_cached(
                        "INSERT OR REPLACE INTO sync_states (doc_id, peer, state) VALUES (?1, ?2, ?3)",
                    )?;
                    for (doc_id, state) in states {
                        insert.execute(params![doc_id.as_bytes(), peer.as_bytes(), state])?;
                    }
                    StoreReply::Committed
                }
            };
            replies.push((*task, reply));
        }
        tx.commit()?;
        Ok(replies)
    }

    /// The newest change-feed position (0 when the feed is empty).
    pub fn feed_head(&self) -> Result<u64, StoreError> {
        let seq: i64 =
            self.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM feed", [], |row| row.get(0))?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }
}

/// The sync states saved for a document, per peer.
/// A heads column: whole 32-byte change hashes, concatenated.
fn decode_heads(doc_id: DocId, bytes: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
    if bytes.len() % 32 != 0 {
        return Err(StoreError::Corrupt(format!("heads of {doc_id} are not whole hashes")));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|chunk| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(chunk);
            ChangeHash(hash)
        })
        .collect())
}

fn load_sync_states(conn: &Connection, doc_id: DocId) -> Result<SavedSyncStates, StoreError> {
    let mut query = conn.prepare_cached("SELECT peer, state FROM sync_states WHERE doc_id = ?1")?;
    let mut rows = query.query(params![doc_id.as_bytes()])?;
    let mut states = Vec::new();
    while let Some(row) = rows.next()? {
        let peer: Vec<u8> = row.get(0)?;
        let peer: [u8; 16] = peer.try_into().map_err(|_| {
            StoreError::Corrupt(format!("a sync state of {doc_id} names a bad peer"))
        })?;
        states.push((NodeId::from_bytes(peer), row.get(1)?));
    }
    Ok(states)
}

/// Stores new changes, the heads index entry and a change-feed row.
fn append(conn: &Connection, task: &StoreTask) -> Result<(), StoreError> {
    let StoreTask::Append { doc_id, collection, snapshot, changes, heads, hlc, origin, deleted } =
        task
    else {
        return Ok(());
    };
    let heads: Vec<u8> = heads.iter().flatten().copied().collect();
    // HLC values use the full u64 range; SQLite integers are signed.
    let hlc = *hlc as i64;
    // Cached statements: parsing SQL anew for every append cost more than executing it.
    conn.prepare_cached(
        "INSERT INTO documents (doc_id, collection, heads, hlc, deleted) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(doc_id) DO UPDATE
         SET heads = excluded.heads, hlc = excluded.hlc, deleted = excluded.deleted",
    )?
    .execute(params![doc_id.as_bytes(), collection.as_str(), heads, hlc, deleted])?;
    if let Some(snapshot) = snapshot {
        replace_snapshot(conn, *doc_id, snapshot)?;
    }
    let mut insert = conn.prepare_cached("INSERT INTO changes (doc_id, data) VALUES (?1, ?2)")?;
    for change in changes {
        insert.execute(params![doc_id.as_bytes(), change])?;
    }
    let mut feed = conn.prepare_cached(
        "INSERT INTO feed (doc_id, collection, heads, origin, hlc, deleted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    feed.execute(params![
        doc_id.as_bytes(),
        collection.as_str(),
        heads,
        origin.as_bytes(),
        hlc,
        deleted
    ])?;
    Ok(())
}

/// Stores `snapshot` as the document's and drops every change stored before it.
fn replace_snapshot(conn: &Connection, doc_id: DocId, snapshot: &[u8]) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE documents SET snapshot = ?2 WHERE doc_id = ?1")?
        .execute(params![doc_id.as_bytes(), snapshot])?;
    conn.prepare_cached("DELETE FROM changes WHERE doc_id = ?1")?
        .execute(params![doc_id.as_bytes()])?;
    Ok(())
}

/// Reads one document; also used inside a batch's transaction, so a load sees earlier writes.
fn load_doc(conn: &Connection, doc_id: DocId) -> Result<Option<StoredDoc>, StoreError> {
    let row = conn
        .prepare_cached("SELECT collection, snapshot FROM documents WHERE doc_id = ?1")?
        .query_row(params![doc_id.as_bytes()], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<Vec<u8>>>(1)?))
        })
        .optional()?;
    let Some((collection, snapshot)) = row else {
        return Ok(None);
    };
    let collection: Collection = collection
        .parse()
        .map_err(|e: crate::ids::IdParseError| StoreError::Corrupt(e.to_string()))?;
    let mut statement =
        conn.prepare_cached("SELECT data FROM changes WHERE doc_id = ?1 ORDER BY seq")?;
    let changes = statement
        .query_map(params![doc_id.as_bytes()], |row| row.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(StoredDoc { doc_id, collection, snapshot, changes }))
}

/// Starts the store thread on `tasks`. Replies go to `on_reply`; commit timings to `on_commit`.
/// The thread ends when the queue's senders are dropped, or on the first storage error.
pub fn spawn_store_thread(
    mut store: Store,
    mut tasks: mpsc::Receiver<(TaskId, StoreTask)>,
    mut on_reply: impl FnMut(TaskId, StoreReply) -> bool + Send + 'static,
    mut on_commit: impl FnMut(CommitReport) + Send + 'static,
) -> std::thread::JoinHandle<Result<(), StoreError>> {
    let run = move || {
        let mut batch = Vec::with_capacity(MAX_TASKS_PER_COMMIT);
        while let Some(first) = tasks.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_TASKS_PER_COMMIT {
                match tasks.try_recv() {
                    Ok(task) => batch.push(task),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let replies = store.execute(&batch).inspect_err(|error| {
                tracing::error!(%error, "store commit failed; stopping");
            })?;
            let latency = started.elapsed();
            let feed_head = store.feed_head()?;
            on_commit(CommitReport { tasks: batch.len(), latency, feed_head });
            batch.clear();
            for (task, reply) in replies {
                if !on_reply(task, reply) {
                    return Ok(());
                }
            }
        }
        Ok(())
    };
    std::thread::Builder::new()
        .name("cairn-store".into())
        .spawn(run)
        // Without a store thread nothing can be stored: report it when the caller joins.
        .unwrap_or_else(|e| {
            let message = format!("cannot start store thread: {e}");
            std::thread::spawn(move || Err(StoreError::Corrupt(message)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cairn-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("cairn.db")
    }

    fn doc_id(byte: u8) -> DocId {
        DocId::from_slice(&[byte; 16]).unwrap()
    }

    fn append(byte: u8, changes: &[&[u8]]) -> StoreTask {
        StoreTask::Append {
            doc_id: doc_id(byte),
            collection: "plant-7/sensors".parse().unwrap(),
            snapshot: None,
            changes: changes.iter().map(|c| c.to_vec()).collect(),
            heads: vec![[byte; 32]],
            hlc: u64::MAX,
            origin: crate::ids::NodeId::from_bytes([9; 16]),
            deleted: false,
        }
    }

    #[test]
    fn the_index_scan_streams_the_loaded_index_in_chunks() {
        let path = temp_db("scan");
        let mut store = Store::open(&path).unwrap();
        let count = 2 * INDEX_CHUNK_ROWS + 7;
        let tasks: Vec<_> = (0..count)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let collection = if i % 3 == 0 { "a" } else { "b/c" };
                let task = StoreTask::Append {
                    doc_id: DocId::from_slice(&id).unwrap(),
                    collection: collection.parse().unwrap(),
                    snapshot: None,
                    changes: vec![vec![1]],
                    heads: (0..i % 3).map(|h| [h as u8; 32]).collect(),
                    hlc: i as u64,
                    origin: crate::ids::NodeId::from_bytes([9; 16]),
                    deleted: i % 5 == 0,
                };
                (i as u64, task)
            })
            .collect();
        store.execute(&tasks).unwrap();

        let mut chunks = Vec::new();
        store
            .scan_index(|chunk| {
                chunks.push(chunk);
                ControlFlow::Continue(())
            })
            .unwrap();
        let sizes: Vec<_> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [INDEX_CHUNK_ROWS, INDEX_CHUNK_ROWS, 7]);
        let scanned: Vec<_> = chunks.into_iter().flatten().collect();
        assert_eq!(scanned, store.load_index().unwrap());
        // One name per collection, shared by its entries.
        let names: std::collections::BTreeSet<_> =
            scanned.iter().map(|(_, e)| e.collection.as_str().as_ptr()).collect();
        assert_eq!(names.len(), 2);

        let mut calls = 0;
        store
            .scan_index(|_| {
                calls += 1;
                ControlFlow::Break(())
            })
            .unwrap();
        assert_eq!(calls, 1, "a sink that breaks ends the scan");
    }

    #[test]
    fn appended_changes_survive_reopening_in_order() {
        let path = temp_db("reopen");
        let mut store = Store::open(&path).unwrap();
        let replies = store
            .execute(&[
                (1, append(1, &[b"a", b"b"])),
                (2, append(1, &[b"c"])),
                (3, append(2, &[b"x"])),
            ])
            .unwrap();
        assert_eq!(
            replies,
            vec![
                (1, StoreReply::Committed),
                (2, StoreReply::Committed),
                (3, StoreReply::Committed)
            ]
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        let docs = store.load_all().unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].changes, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(docs[0].collection.as_str(), "plant-7/sensors");
        assert_eq!(docs[1].changes, vec![b"x".to_vec()]);
    }

    #[test]
    fn compaction_replaces_earlier_changes_but_keeps_later_ones() {
        let path = temp_db("compact");
        let mut store = Store::open(&path).unwrap();
        let tasks = [
            (1, append(1, &[b"a", b"b"])),
            (2, StoreTask::Compact { doc_id: doc_id(1), snapshot: b"snap".to_vec() }),
            (3, append(1, &[b"c"])),
            (4, StoreTask::Load { doc_id: doc_id(1) }),
        ];
        let replies = store.execute(&tasks).unwrap();
        let StoreReply::Loaded(Some(loaded), _) = &replies[3].1 else {
            panic!("load answered {:?}", replies[3])
        };
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!(loaded.changes, vec![b"c".to_vec()]);
        assert_eq!(store.load(doc_id(1)).unwrap().as_ref(), Some(loaded));
    }

    #[test]
    fn an_append_carrying_a_snapshot_replaces_what_was_stored_in_the_same_commit() {
        let path = temp_db("append-snapshot");
        let mut store = Store::open(&path).unwrap();
        let mut adopted = append(1, &[b"d"]);
        if let StoreTask::Append { snapshot, heads, .. } = &mut adopted {
            *snapshot = Some(b"saved".to_vec());
            *heads = vec![[7; 32]];
        }
        let tasks = [(1, append(1, &[b"a", b"b"])), (2, adopted), (3, append(2, &[b"x"]))];
        store.execute(&tasks).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let loaded = store.load(doc_id(1)).unwrap().unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"saved"[..]));
        assert_eq!(loaded.changes, vec![b"d".to_vec()], "changes before the snapshot are gone");
        let mut index = Vec::new();
        store
            .scan_index(|chunk| {
                index.extend(chunk);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let entry = index.iter().find(|(id, _)| *id == doc_id(1)).map(|(_, e)| e).unwrap();
        assert_eq!(entry.heads, vec![ChangeHash([7; 32])]);
        assert_eq!(store.load(doc_id(2)).unwrap().unwrap().changes, vec![b"x".to_vec()]);
    }

    #[test]
    fn store_settings_are_durable_ones() {
        let store = Store::open(&temp_db("pragmas")).unwrap();
        let mode: String =
            store.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        let sync: i64 = store.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous must be FULL");
    }

    #[test]
    fn a_store_from_a_newer_build_is_refused() {
        let path = temp_db("newer");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { found: 99, .. })));
    }

    #[test]
    fn the_store_thread_commits_queued_tasks_together_and_answers_in_order() {
        let store = Store::open(&temp_db("thread")).unwrap();
        let (queue, tasks) = mpsc::channel(STORE_QUEUE_CAPACITY);
        for task in 0..100u64 {
            queue.blocking_send((task, append((task % 7) as u8, &[b"z"]))).unwrap();
        }
        drop(queue);
        let (replies_tx, replies_rx) = std::sync::mpsc::channel();
        let (commits_tx, commits_rx) = std::sync::mpsc::channel();
        let thread = spawn_store_thread(
            store,
            tasks,
            move |task, reply| replies_tx.send((task, reply)).is_ok(),
            move |report| {
                let _ = commits_tx.send(report.tasks);
            },
        );
        thread.join().unwrap().unwrap();
        let answered: Vec<u64> = replies_rx.iter().map(|(task, _)| task).collect();
        assert_eq!(answered, (0..100).collect::<Vec<_>>());
        let commits: Vec<usize> = commits_rx.iter().collect();
        assert_eq!(commits, vec![100], "all queued tasks share one commit");
    }
}
