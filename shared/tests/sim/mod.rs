//! A deterministic, in-memory, virtual-time cluster of Cairn nodes: a hub and its agents, their
//! stores, a faulty network, crashes and client writes, all drawn from one seed.

pub mod agenda;
pub mod checks;
pub mod clock;
pub mod cluster;
pub mod network;
pub mod scenario;
pub mod store;
pub mod workload;
