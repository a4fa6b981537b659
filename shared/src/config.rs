//! Protocol knobs shared by both binaries, with defaults and presets.
//!
//! Loading (files, environment, flags) and identity live in the binaries; this is only
//! the documented data and its validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scope::CollectionScope;

/// Tuning of the sync core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Largest frame accepted or sent, in bytes. Bounds per-connection buffering.
    pub max_frame_bytes: usize,
    /// How often node peers reconcile their document sets to repair anything a link lost, in
    /// milliseconds.
    pub anti_entropy_interval_ms: u64,
    /// Fold a document's incremental changes into a new snapshot after this many.
    pub compact_after_changes: usize,
    /// Largest clock drift accepted from a peer's timestamps, in milliseconds.
    pub max_clock_drift_ms: u64,
    /// A connection whose peer has not said hello within this long is closed, in milliseconds,
    /// so a silent client cannot hold a connection slot.
    pub hello_timeout_ms: u64,
    /// Budget of the document cache, in stored bytes (snapshot plus changes) of the documents
    /// held in memory. Least recently used documents beyond it return to disk; documents with
    /// work in progress stay, so the cache can briefly exceed it.
    pub document_cache_bytes: usize,
    /// Largest document, in stored bytes. A document at the limit takes no more local writes,
    /// and one that a peer's changes would take past it is quarantined.
    pub max_document_bytes: usize,
    /// Most changes in one document's history, with the same effect as `max_document_bytes`:
    /// Automerge's memory and merge time grow with the history, not only with its bytes.
    pub max_document_changes: usize,
    /// A merge of a peer's changes into one document, or a load of one from the store, that
    /// takes longer than this many milliseconds quarantines the document, so that it cannot
    /// stall the node (and, through missed heartbeats, its connections) again. The node's
    /// driver times the work, since the core reads no clock; 0 sets no limit.
    pub max_merge_ms: u64,
    /// Compress a frame of batched sync messages (catch-up after a reconnect, fan-out of many
    /// documents) when its messages reach this many bytes and compressing shrinks them; 0
    /// never compresses. Small frames are sent as they are: live edits gain little from it.
    pub compress_above_bytes: usize,
    /// After a sync message carrying a document's changes goes to a node peer, the next one
    /// for that document and peer waits until this many milliseconds have passed, so a
    /// document written in a steady stream reaches each peer in batches the peer applies at
    /// once (Automerge's apply costs about as much for one change as for many on a large
    /// document). A document written now and then is sent at once; 0 never waits.
    pub sync_batch_window_ms: u64,
    /// A node peer that has sent nothing for this long is sent a ping, in milliseconds; 0
    /// turns heartbeats off (the transport's idle timeout still applies).
    pub heartbeat_interval_ms: u64,
    /// A node peer that has sent nothing, not even a pong, for this long is disconnected, in
    /// milliseconds, so an agent moves to another hub rather than waiting on a dead one. At
    /// least twice the interval.
    pub heartbeat_timeout_ms: u64,
    /// The collections this node replicates (default: all). Documents of other collections
    /// can still be written here; they stay on this node.
    pub collections: CollectionScope,
}

/// A configuration value is out of its allowed range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sync configuration: {0}")]
pub struct ConfigError(pub String);

impl SyncConfig {
    /// Smallest allowed `max_frame_bytes`: a full inventory or reconciliation message must fit.
    pub const MIN_FRAME_BYTES: usize = 1024 * 1024;
    /// Longest allowed `sync_batch_window_ms`: the wait is a batching delay, not a schedule.
    pub const MAX_SYNC_BATCH_WINDOW_MS: u64 = 10_000;
    /// Largest allowed `max_frame_bytes`.
    pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

    /// Preset for edge agents: small buffers, frequent repair of a flaky uplink.
    pub fn edge() -> Self {
        Self {
            max_frame_bytes: 16 * 1024 * 1024,
            anti_entropy_interval_ms: 15_000,
            compact_after_changes: 512,
            max_clock_drift_ms: 500,
            hello_timeout_ms: 10_000,
            document_cache_bytes: 32 * 1024 * 1024,
            max_document_bytes: 64 * 1024 * 1024,
            max_document_changes: 1_000_000,
            max_merge_ms: 30_000,
            compress_above_bytes: 16 * 1024,
            sync_batch_window_ms: 250,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 4_000,
            collections: CollectionScope::all(),
        }
    }

    /// Preset for hubs: repair rounds less often, since a hub has many peers. Frame limits stay
    /// equal on both sides: a frame one side may send, the other must accept.
    pub fn hub() -> Self {
        Self {
            anti_entropy_interval_ms: 30_000,
            document_cache_bytes: 256 * 1024 * 1024,
            ..Self::edge()
        }
    }

    /// The longest a merge or load of one document may take, if there is a limit.
    pub fn merge_limit(&self) -> Option<std::time::Duration> {
        (self.max_merge_ms > 0).then(|| std::time::Duration::from_millis(self.max_merge_ms))
    }

    /// Checks every value against its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(Self::MIN_FRAME_BYTES..=Self::MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(ConfigError(format!(
                "max_frame_bytes must be between {} and {}",
                Self::MIN_FRAME_BYTES,
                Self::MAX_FRAME_BYTES
            )));
        }
        if self.anti_entropy_interval_ms < 10 {
            return Err(ConfigError("anti_entropy_interval_ms must be at least 10".into()));
        }
        if self.hello_timeout_ms < 10 {
            return Err(ConfigError("hello_timeout_ms must be at least 10".into()));
        }
        if self.max_document_bytes < 1024 {
            return Err(ConfigError("max_document_bytes must be at least 1024".into()));
        }
        self.collections.validate().map_err(|error| ConfigError(error.to_string()))?;
        if self.heartbeat_interval_ms > 0
            && self.heartbeat_timeout_ms < self.heartbeat_interval_ms.saturating_mul(2)
        {
            return Err(ConfigError(
                "heartbeat_timeout_ms must be at least twice heartbeat_interval_ms".into(),
            ));
        }
        if self.max_document_changes == 0 {
            return Err(ConfigError("max_document_changes must be at least 1".into()));
        }
        if self.compact_after_changes == 0 {
            return Err(ConfigError("compact_after_changes must be at least 1".into()));
        }
        if self.sync_batch_window_ms > Self::MAX_SYNC_BATCH_WINDOW_MS {
            return Err(ConfigError(format!(
                "sync_batch_window_ms must be at most {}",
                Self::MAX_SYNC_BATCH_WINDOW_MS
            )));
        }
        Ok(())
    }

    /// How long a document's next change-carrying message to a peer waits after the last.
    pub fn sync_batch_window(&self) -> Duration {
        Duration::from_millis(self.sync_batch_window_ms)
    }

    /// The heartbeat interval and timeout, unless heartbeats are off.
    pub fn heartbeat(&self) -> Option<(Duration, Duration)> {
        (self.heartbeat_interval_ms > 0).then(|| {
            (
                Duration::from_millis(self.heartbeat_interval_ms),
                Duration::from_millis(self.heartbeat_timeout_ms),
            )
        })
    }

    /// The anti-entropy interval as a duration.
    pub fn anti_entropy_interval(&self) -> Duration {
        Duration::from_millis(self.anti_entropy_interval_ms)
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self::edge()
    }
}
