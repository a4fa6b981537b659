//! The I/O both binaries share: the SQLite store thread, TLS identity, QUIC transport, the
//! tokio loop that drives a [`crate::node::Node`], the operations HTTP endpoints, and the
//! automerge-repo WebSocket sync endpoint.

#[cfg(feature = "backbone")]
pub mod backbone;
pub mod backbone_metrics;
pub mod doc_api;
pub mod driver;
pub mod feed_api;
pub mod job_runner;
pub mod jobs_api;
#[cfg(feature = "backbone")]
pub mod lan;
pub mod ops_http;
pub mod profile;
pub mod quic;
pub mod repo_ws;
pub mod runtime;
pub mod scaling;
pub mod store;
pub mod store_reader;
pub mod tls;
pub mod write_stream;
