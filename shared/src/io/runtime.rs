//! Starting and stopping a node: identity, store, clock, core and driver, wired together.
//!
//! Both binaries start a node the same way; they differ only in how they connect
//! (the hub accepts, the agent dials) and in which HTTP routes they serve.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use automerge::ActorId;
use tokio::sync::watch;

use super::driver::{spawn_node, NodeHandle};
use super::ops_http::{Metrics, OpsState};
use super::store::{spawn_store_thread, Store, StoreError};
use super::store_reader::StoreReader;
use super::tls::{ensure_dev_certificates, Identity, TlsError, TlsPaths};
use crate::config::{ConfigError, SyncConfig};
use crate::message::Role;
use crate::node::{CatalogBuilder, Join, Node};

/// Everything needed to start a node.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    /// Hub or agent.
    pub role: Role,
    /// Where the database (and, by default, the node's key) lives.
    pub data_dir: PathBuf,
    /// TLS material.
    pub tls: TlsPaths,
    /// Generate a development CA and certificate when they are missing.
    pub dev_certificates: bool,
    /// DNS names and IP addresses for a generated certificate.
    pub certificate_names: Vec<String>,
    /// Sync tuning.
    pub sync: SyncConfig,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The sync configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A started node.
#[derive(Debug)]
pub struct RunningNode {
    /// Talks to the node loop.
    pub handle: NodeHandle,
    /// This node's TLS identity.
    pub identity: Identity,
    /// What the operations endpoints serve.
    pub ops: OpsState,
    /// Read-only queries on the store (listings, change feed).
    pub reader: Arc<StoreReader>,
    /// The newest committed change-feed position; changes whenever a commit adds events.
    pub feed_head: watch::Receiver<u64>,
    node_task: tokio::task::JoinHandle<()>,
    store_thread: std::thread::JoinHandle<Result<(), StoreError>>,
}

/// The directory Cairn keeps its state under when nothing else is configured:
/// `$XDG_DATA_HOME/cairn`, else `~/.local/share/cairn`, else `./cairn-data`.
pub fn default_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("cairn");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/cairn"),
        None => PathBuf::from("cairn-data"),
    }
}

/// TLS paths under the usual layout: a CA shared by local nodes, a certificate per data dir.
pub fn default_tls_paths(ca_dir: &Path, data_dir: &Path) -> TlsPaths {
    TlsPaths {
        ca_cert: ca_dir.join("ca.crt"),
        ca_key: ca_dir.join("ca.key"),
        node_cert: data_dir.join("node.crt"),
        node_key: data_dir.join("node.key"),
    }
}

/// Reads a TOML configuration file into `T`, or gives `T`'s defaults when there is none.
pub fn load_config_file<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigFileError> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigFileError { path: path.to_owned(), reason: e.to_string() })?;
    toml::from_str(&text)
        .map_err(|e| ConfigFileError { path: path.to_owned(), reason: e.to_string() })
}

/// A configuration file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("configuration file {path}: {reason}")]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the line and column for syntax errors.
    pub reason: String,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); stdout stays for the ready line.
pub fn init_logging() {
    let spec = log_filter_spec(std::env::var("RUST_LOG").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter_spec(None)));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// The log filter for a `RUST_LOG` value: Automerge is held to warnings unless the value
/// names it. Automerge instruments loading with info-level spans whose fields include the
/// document's whole change graph, formatted on every sync message and upload: enabled, they
/// cost more than the apply itself on a long history.
fn log_filter_spec(rust_log: Option<&str>) -> String {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(spec) if spec.contains("automerge") => spec.to_owned(),
        Some(spec) => format!("{spec},automerge=warn"),
        None => "info,automerge=warn".to_owned(),
    }
}

/// Where a node's TLS material comes from (a config file section).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Directory of the development CA (default: `<home>/dev-ca`).
    pub ca_dir: Option<PathBuf>,
    /// Fleet CA certificate (default: `<ca_dir>/ca.crt`).
    pub ca_cert: Option<PathBuf>,
    /// This node's certificate (default: `<data_dir>/node.crt`).
    pub node_cert: Option<PathBuf>,
    /// This node's key (default: `<data_dir>/node.key`).
    pub node_key: Option<PathBuf>,
    /// Never generate certificates; fail if any is missing (production).
    pub no_dev_certificates: bool,
}

impl IdentityConfig {
    /// The paths, with defaults filled in relative to `data_dir`.
    pub fn paths(&self, data_dir: &Path) -> TlsPaths {
        let ca_dir = self.ca_dir.clone().unwrap_or_else(|| default_home().join("dev-ca"));
        let defaults = default_tls_paths(&ca_dir, data_dir);
        TlsPaths {
            ca_cert: self.ca_cert.clone().unwrap_or(defaults.ca_cert),
            ca_key: defaults.ca_key,
            node_cert: self.node_cert.clone().unwrap_or(defaults.node_cert),
            node_key: self.node_key.clone().unwrap_or(defaults.node_key),
        }
    }
}

/// Chunks of the heads index read ahead of the catalog builder: enough to keep the scan
/// going while the builder catches up, few enough to bound what waits in between.
const INDEX_CHUNKS_AHEAD: usize = 16;

/// Reads the heads index into a catalog builder. The store scans on a thread of its own
/// while this one digests and fingerprints the chunks already read, so the catalog costs
/// little beyond the scan: the index comes in id order, and the ordered maps made from it
/// afterwards need no sorting.
fn read_index(store: &mut Store) -> Result<CatalogBuilder, StoreError> {
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel(INDEX_CHUNKS_AHEAD);
    std::thread::scope(|scope| {
        let scan = scope.spawn(move || {
            // A builder that went away wants no more.
            store.scan_index(|chunk| match chunks_tx.send(chunk) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            })
        });
        let mut builder = CatalogBuilder::new();
        for chunk in chunks_rx {
            builder.push(chunk);
        }
        match scan.join() {
            Ok(scanned) => scanned.map(|()| builder),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// [`Join`] with the first piece of work on a thread of its own, the second on this one.
struct SideBySide;

impl Join for SideBySide {
    fn join<A, B, RA, RB>(&self, a: A, b: B) -> (RA, RB)
    where
        A: FnOnce() -> RA + Send,
        B: FnOnce() -> RB + Send,
        RA: Send,
        RB: Send,
    {
        std::thread::scope(|scope| {
            let a = scope.spawn(a);
            let b = b();
            match a.join() {
                Ok(a) => (a, b),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// The uhlc clock source for real nodes.
fn wall_clock() -> uhlc::NTP64 {
    uhlc::system_time_clock()
}

impl RunningNode {
    /// Opens the store, loads every document and starts the node loop and store thread.
    pub fn start(setup: &NodeSetup) -> Result<Self, StartError> {
        setup.sync.validate()?;
        std::fs::create_dir_all(&setup.data_dir)
            .map_err(|source| StartError::DataDir { path: setup.data_dir.clone(), source })?;
        if setup.dev_certificates {
            ensure_dev_certificates(&setup.tls, &setup.certificate_names)?;
        }
        let identity = Identity::load(&setup.tls)?;
        let database = setup.data_dir.join("cairn.db");
        let mut store = Store::open(&database)?;
        let reader = Arc::new(StoreReader::open(&database)?);
        let (feed_head_tx, feed_head) = watch::channel(store.feed_head()?);
        let index = read_index(&mut store)?;
        let hlc_id =
            uhlc::ID::try_from(*identity.node_id.as_bytes()).unwrap_or_else(|_| uhlc::ID::rand());
        let hlc = uhlc::HLCBuilder::new()
            .with_id(hlc_id)
            .with_clock(wall_clock)
            .with_max_delta(Duration::from_millis(setup.sync.max_clock_drift_ms))
            .build();
        // A fresh actor per start: changes from before a crash never collide with new ones.
        let mut node =
            Node::new(identity.node_id, setup.role, ActorId::random(), hlc, setup.sync.clone());
        // Documents stay on disk until something needs them; one that then fails to load is
        // quarantined, not fatal.
        let documents = index.len();
        node.restore_built(index, &SideBySide);
        tracing::info!(documents, "heads index loaded");
        let metrics = Arc::new(Metrics::new());
        let (queue_tx, queue_rx) = tokio::sync::mpsc::channel(super::store::STORE_QUEUE_CAPACITY);
        let (handle, replies, node_task) = spawn_node(node, queue_tx);
        let commit_metrics = metrics.clone();
        let store_thread = spawn_store_thread(
            store,
            queue_rx,
            move |task, reply| replies.deliver(task, reply),
            move |report| {
                commit_metrics.observe_commit(report);
                feed_head_tx.send_if_modified(|head| {
                    std::mem::replace(head, report.feed_head) != report.feed_head
                });
            },
        );
        let ops =
            OpsState { node: handle.clone(), metrics, ready: Arc::new(AtomicBool::new(false)) };
        Ok(Self { handle, identity, ops, reader, feed_head, node_task, store_thread })
    }

    /// Stops the node loop, lets the store commit what it was given, and waits for both.
    pub async fn stop(self) -> Result<(), StoreError> {
        self.ops.ready.store(false, std::sync::atomic::Ordering::Relaxed);
        self.handle.shutdown().await;
        let _ = self.node_task.await;
        drop(self.handle);
        drop(self.ops);
        tokio::task::spawn_blocking(move || self.store_thread.join())
            .await
            .map_err(|e| StoreError::Corrupt(format!("store thread: {e}")))?
            .unwrap_or_else(|_| Err(StoreError::Corrupt("store thread panicked".into())))
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DocId, NodeId};
    use crate::store_task::StoreTask;

    #[test]
    fn a_node_restored_from_the_streamed_index_holds_the_whole_index() {
        let dir = std::env::temp_dir().join(format!("cairn-runtime-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = Store::open(&dir.join("cairn.db")).unwrap();
        // More than a few chunks, in two collections, fed to the store out of id order.
        let count = 3 * super::super::store::INDEX_CHUNK_ROWS + 11;
        let tasks: Vec<_> = (0..count)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(
                    &((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes(),
                );
                let task = StoreTask::Append {
                    doc_id: DocId::from_slice(&id).unwrap(),
                    collection: if i % 2 == 0 { "a" } else { "b" }.parse().unwrap(),
                    snapshot: None,
                    changes: vec![vec![1]],
                    heads: vec![[i as u8; 32]],
                    hlc: i as u64,
                    origin: NodeId::from_bytes([9; 16]),
                    deleted: false,
                };
                (i as u64, task)
            })
            .collect();
        store.execute(&tasks).unwrap();

        let built = read_index(&mut store).unwrap();
        assert_eq!(built.len(), count);
        let mut node = Node::new(
            NodeId::from_bytes([1; 16]),
            Role::Agent,
            ActorId::random(),
            uhlc::HLCBuilder::new().build(),
            SyncConfig::edge(),
        );
        node.restore_built(built, &SideBySide);
        let restored: Vec<_> = node.catalog().map(|(id, entry)| (*id, entry.clone())).collect();
        assert_eq!(restored, store.load_index().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn side_by_side_gives_both_results_in_order() {
        assert_eq!(SideBySide.join(|| 1, || "two"), (1, "two"));
    }

    #[test]
    fn automerge_spans_stay_off_unless_rust_log_names_automerge() {
        assert_eq!(log_filter_spec(None), "info,automerge=warn");
        assert_eq!(log_filter_spec(Some(" ")), "info,automerge=warn");
        assert_eq!(log_filter_spec(Some("debug")), "debug,automerge=warn");
        assert_eq!(log_filter_spec(Some("info,automerge=trace")), "info,automerge=trace");
        let filter = tracing_subscriber::EnvFilter::new(log_filter_spec(Some("info")));
        let subscriber = tracing_subscriber::fmt().with_env_filter(filter).finish();
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(target: "automerge::storage::load", tracing::Level::INFO));
            assert!(tracing::enabled!(target: "automerge::storage::load", tracing::Level::WARN));
            assert!(tracing::enabled!(target: "cairn_shared::io::runtime", tracing::Level::INFO));
        });
    }
}
