//! Virtual time for the nodes' hybrid logical clocks.
//!
//! `uhlc` reads time through a plain `fn() -> NTP64`, so the wall clock lives in a thread-local
//! that the cluster sets before it hands a node anything. Each test runs on its own thread, so
//! parallel tests never see each other's time.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Wall-clock time at virtual time zero (2024-01-01T00:00:00Z), so commit times look real.
const EPOCH_UNIX_SECS: u64 = 1_704_067_200;

thread_local! {
    static WALL_NANOS: Cell<u64> = const { Cell::new(0) };
}

/// The clock function every simulated HLC reads.
pub fn virtual_clock() -> uhlc::NTP64 {
    uhlc::NTP64::from(Duration::from_nanos(WALL_NANOS.with(Cell::get)))
}

/// Sets the wall clock the next node call reads: virtual time plus that node's skew.
pub fn set_wall_clock(elapsed: Duration, skew_ms: i64) {
    let unskewed = Duration::from_secs(EPOCH_UNIX_SECS) + elapsed;
    let skew = Duration::from_millis(skew_ms.unsigned_abs());
    let wall = if skew_ms >= 0 { unskewed + skew } else { unskewed - skew };
    let nanos = u64::try_from(wall.as_nanos()).expect("virtual wall time fits in u64 nanoseconds");
    WALL_NANOS.with(|cell| cell.set(nanos));
}

/// An HLC on the virtual clock that refuses peer timestamps more than `max_drift` ahead.
pub fn hlc(id: [u8; 16], max_drift: Duration) -> uhlc::HLC {
    let id = uhlc::ID::try_from(id).expect("simulated HLC ids are never zero");
    uhlc::HLCBuilder::new().with_id(id).with_clock(virtual_clock).with_max_delta(max_drift).build()
}

/// The `Instant` virtual time zero maps to. Only differences from it are ever used, so which
/// instant it is has no effect on a run.
pub fn base_instant() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}
