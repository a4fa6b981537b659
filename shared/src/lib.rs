//! Cairn's shared library.
//!
//! The core of this crate is deterministic: it reads no clock, opens no socket, spawns no
//! task and draws no OS randomness. Time arrives as `now` arguments and through the
//! [`uhlc::HLC`] a caller builds with its own clock function; randomness arrives as an RNG
//! argument. Protocol and sync logic are state machines ([`node::Node`]) that take bytes and
//! events and return bytes and effects as data, which is what lets the simulation tests run
//! many nodes, faults and seeds in memory.
//!
//! The I/O both binaries need — the SQLite store thread, QUIC endpoints with mutual TLS, and
//! the tokio loop that drives a [`node::Node`] — lives in [`io`], behind the `io` feature.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod config;
pub mod document;
pub mod durability;
pub mod elasticity;
pub mod failover;
pub mod frame;
pub mod ids;
pub mod jobs;
pub mod message;
pub mod node;
pub mod ops;
pub mod peer;
pub mod peer_sync;
pub mod placement;
pub mod reconcile;
pub mod replication;
pub mod repo_wire;
pub mod scope;
pub mod store_task;

#[cfg(feature = "io")]
pub mod io;
