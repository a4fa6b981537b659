//! Read-only queries on the store from outside the store thread: listing documents from the
//! heads index and reading the change feed. They never load a document.
//!
//! SQLite in WAL mode lets this connection read committed data while the store thread
//! writes, so listings and the feed show exactly what is durable.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

use super::store::StoreError;
use crate::ids::{Collection, DocId, NodeId};

/// Most rows one query returns.
pub const MAX_PAGE: usize = 1000;

/// One document in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocSummary {
    /// The document (bs58check).
    pub id: String,
    /// Its heads as hex.
    pub heads: Vec<String>,
    /// HLC time of its last committed change, as the 64-bit NTP value.
    pub hlc: u64,
    /// The same time in RFC 3339.
    pub time: String,
}

/// One change-feed event: a document reached new heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedEvent {
    /// Position in the feed; resume after it with `cursor`.
    pub cursor: u64,
    /// The document (bs58check).
    pub doc_id: String,
    /// Its collection.
    pub collection: String,
    /// Its heads after the change, as hex.
    pub heads: Vec<String>,
    /// The node the change came from (this node for local writes, else the delivering peer).
    pub origin: String,
    /// HLC time of the commit, as the 64-bit NTP value.
    pub hlc: u64,
    /// The same time in RFC 3339.
    pub time: String,
    /// The document was deleted by this change.
    pub deleted: bool,
}

/// Which feed events a subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedFilter {
    /// Every event.
    All,
    /// Events of one collection.
    Collection(Collection),
    /// Events of one document.
    Document(DocId),
}

/// A read-only connection to a node's database.
#[derive(Debug)]
pub struct StoreReader {
    /// One connection; callers run queries on blocking threads, one at a time.
    conn: Mutex<Connection>,
}

impl StoreReader {
    /// Opens the database at `path` read-only (the store must have created it).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn =
            self.conn.lock().map_err(|_| StoreError::Corrupt("reader lock poisoned".into()))?;
        f(&conn)
    }

    /// Documents of `collection` with ids after `after`, in id order, at most `limit`.
    pub fn list(
        &self,
        collection: &Collection,
        after: Option<DocId>,
        limit: usize,
    ) -> Result<Vec<DocSummary>, StoreError> {
        let after = after.map(|id| id.as_bytes().to_vec()).unwrap_or_default();
        self.with(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT doc_id, heads, hlc FROM documents WHERE collection = ?1 AND doc_id > ?2 AND deleted = 0 ORDER BY doc_id LIMIT ?3",
            )?;
            let rows = statement.query_map(params![collection.as_str(), after, limit.min(MAX_PAGE) as i64], |row| {
                Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, i64>(2)?))
            })?;
            rows.map(|row| {
                let (id, heads, hlc) = row?;
                Ok(DocSummary { id: doc_id_text(&id)?, heads: heads_hex(&heads), hlc: hlc as u64, time: rfc3339(hlc) })
            })
            .collect()
        })
    }

    /// Feed events after `cursor` that pass `filter`, in feed order, at most `limit`.
    pub fn feed(
        &self,
        cursor: u64,
        filter: &FeedFilter,
        limit: usize,
    ) -> Result<Vec<FeedEvent>, StoreError> {
        let (clause, key): (&str, rusqlite::types::Value) = match filter {
            // Mentions ?2 so that every filter binds the same parameters.
            FeedFilter::All => ("?2 IS NULL", rusqlite::types::Value::Null),
            FeedFilter::Collection(c) => ("collection = ?2", c.as_str().to_owned().into()),
            FeedFilter::Document(d) => ("doc_id = ?2", d.as_bytes().to_vec().into()),
        };
        let sql = format!(
            "SELECT seq, doc_id, collection, heads, origin, hlc, deleted FROM feed WHERE seq > ?1 AND ({clause}) ORDER BY seq LIMIT ?3"
        );
        let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
        self.with(|conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows =
                statement.query_map(params![cursor, key, limit.min(MAX_PAGE) as i64], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, Vec<u8>>(3)?,
                        row.get::<_, Vec<u8>>(4)?,
                        row.get::<_, i64>(5)?,
                        row.get::<_, bool>(6)?,
                    ))
                })?;
            rows.map(|row| {
                let (seq, doc_id, collection, heads, origin, hlc, deleted) = row?;
                let origin: [u8; 16] = origin
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad origin".into()))?;
                Ok(FeedEvent {
                    cursor: seq as u64,
                    doc_id: doc_id_text(&doc_id)?,
                    collection,
                    heads: heads_hex(&heads),
                    origin: NodeId::from_bytes(origin).to_string(),
                    hlc: hlc as u64,
                    time: rfc3339(hlc),
                    deleted,
                })
            })
            .collect()
        })
    }

    /// Bytes the database occupies.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            let pages: i64 = conn.pragma_query_value(None, "page_count", |row| row.get(0))?;
            let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
            Ok(u64::try_from(pages * page_size).unwrap_or(0))
        })
    }
}

fn doc_id_text(bytes: &[u8]) -> Result<String, StoreError> {
    Ok(DocId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?.to_string())
}

fn heads_hex(bytes: &[u8]) -> Vec<String> {
    bytes.chunks(32).map(|head| head.iter().map(|b| format!("{b:02x}")).collect()).collect()
}

fn rfc3339(hlc: i64) -> String {
    uhlc::NTP64(hlc as u64).to_string_rfc3339_lossy()
}
