//! The I/O both binaries share: the SQLite store thread, TLS identity, QUIC transport, the
//! tokio loop that drives a [`crate::node::Node`], and the operations HTTP endpoints.

pub mod driver;
pub mod ops_http;
pub mod quic;
pub mod store;
pub mod tls;
