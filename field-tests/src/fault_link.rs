//! What the UDP and TCP fault proxies share: the directions a control applies to, the bounded
//! log of every fault injected, and the thread that runs a proxy until its handle is dropped.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::oneshot;

/// Most events kept in a fault log; the counts go on past it.
const LOG_CAPACITY: usize = 100_000;

/// Which way traffic travels, for the per-direction controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From clients to the upstream.
    ToUpstream,
    /// From the upstream back to clients.
    ToClient,
    /// Both ways.
    Both,
}

impl Direction {
    pub(crate) fn ways(self) -> &'static [Way] {
        match self {
            Self::ToUpstream => &[Way::ToUpstream],
            Self::ToClient => &[Way::ToClient],
            Self::Both => &[Way::ToUpstream, Way::ToClient],
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::ToUpstream => "to-upstream",
            Self::ToClient => "to-client",
            Self::Both => "both",
        })
    }
}

/// The way one packet or chunk travels; unlike [`Direction`], never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    ToUpstream,
    ToClient,
}

impl Way {
    /// Index into per-way arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Self::ToUpstream => 0,
            Self::ToClient => 1,
        }
    }
}

impl From<Way> for Direction {
    fn from(way: Way) -> Self {
        match way {
            Way::ToUpstream => Self::ToUpstream,
            Way::ToClient => Self::ToClient,
        }
    }
}

#[derive(Debug)]
struct Event<T> {
    at: Duration,
    direction: Direction,
    what: T,
}

/// Every control change and injected fault, with when and which way, up to a bound.
#[derive(Debug)]
pub(crate) struct FaultLog<T> {
    started: Instant,
    events: Vec<Event<T>>,
    overflow: u64,
}

impl<T: fmt::Display> FaultLog<T> {
    pub(crate) fn new(started: Instant) -> Self {
        Self { started, events: Vec::new(), overflow: 0 }
    }

    /// Time since the proxy started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn push(&mut self, direction: Direction, what: T) {
        if self.events.len() < LOG_CAPACITY {
            self.events.push(Event { at: self.started.elapsed(), direction, what });
        } else {
            self.overflow += 1;
        }
    }

    /// One line per event, oldest first, and one saying how many were not kept.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = (self.events.iter())
            .map(|e| format!("{:>9.3}s {:<11} {}", e.at.as_secs_f64(), e.direction, e.what))
            .collect();
        if self.overflow > 0 {
            lines.push(format!("({} later events not kept)", self.overflow));
        }
        lines
    }
}

/// The thread running a proxy's current-thread runtime; dropping it stops the runtime, which
/// ends every task and closes every socket.
#[derive(Debug)]
pub(crate) struct ProxyThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyThread {
    /// The runtime a proxy's tasks run on: current-thread, so packet and chunk handling is
    /// single-threaded.
    pub(crate) fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("building the {name} runtime"))
    }

    /// Runs `runtime` on a thread named `name` until this handle is dropped.
    pub(crate) fn spawn(name: &str, runtime: tokio::runtime::Runtime) -> anyhow::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A panic elsewhere cannot leave a proxy's state half-updated in a way that matters to a test
/// tool, so a poisoned lock is used as it is rather than failing every later call.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
