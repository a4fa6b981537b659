//! Field-test harness: real `cloud-hub` and `edge-agent` processes on 127.0.0.1, the
//! `cairn-client` crate for their HTTP APIs, and waiting on conditions with deadlines.
//!
//! Binaries are found next to the running test or benchmark executable
//! (`target/<profile>/`); build them first with `cargo build --workspace --bins`.

/// The HTTP client, from `cairn-client`.
pub mod client {
    pub use cairn_client::*;
}
pub mod bench;
pub mod fault_link;
pub mod fault_proxy;
pub mod process;
pub mod raw_peer;
pub mod tcp_fault_proxy;

use std::time::{Duration, Instant};

pub use client::{ApiClient, ApiResponse, DocView};
pub use fault_proxy::{fault_seed, Direction, FaultCounts, FaultProxy};
pub use process::{free_udp_port, Agent, Hub, TestDir};
pub use tcp_fault_proxy::{TcpFaultCounts, TcpFaultProxy};

/// Polls `condition` until it returns `Some`, or fails after `timeout` naming `what`.
///
/// This is waiting on a condition with a deadline, not sleeping in hope: the poll interval
/// only bounds how soon success is noticed.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
