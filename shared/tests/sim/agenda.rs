//! What is going to happen, ordered by virtual time; ties keep scheduling order, so a run
//! depends on nothing but its seed.

use std::collections::BTreeMap;
use std::time::Duration;

/// Which end of a link: 0 is the hub's, 1 the agent's.
pub type End = usize;

/// Something scheduled to happen.
#[derive(Debug)]
pub enum Event {
    /// Bytes sent on a link reach the other end.
    Arrive { link: usize, generation: u64, to: End, bytes: Vec<u8> },
    /// Bytes the carrier held back are released.
    Flush { link: usize, generation: u64, to: End },
    /// The transport notices that a connection is gone; it reconnects after `outage`.
    LinkDown { link: usize, generation: u64, outage: Duration },
    /// A link connects, if both ends are running and it is down.
    LinkUp { link: usize },
    /// A store finishes its oldest task (ignored if the node crashed since).
    StoreTick { node: usize, incarnation: u32 },
    /// A client writes to a node.
    Write { node: usize },
    /// A link silently loses everything sent for a while; a connection that stays silent past the
    /// idle timeout dies too.
    Partition { link: usize, length: Duration },
    /// A link drops; both ends see the connection close and reconnect after `outage`.
    Flap { link: usize, outage: Duration },
    /// A node's process dies, losing everything its store had not committed.
    Crash { node: usize, downtime: Duration },
    /// A crashed node starts again from its store.
    Restart { node: usize },
    /// Faults stop, partitions heal, every node runs and every link reconnects.
    Heal,
}

impl Event {
    /// Work already under way, which a quiescent cluster must not have.
    fn is_in_motion(&self) -> bool {
        matches!(
            self,
            Event::Arrive { .. }
                | Event::Flush { .. }
                | Event::LinkDown { .. }
                | Event::LinkUp { .. }
                | Event::StoreTick { .. }
                | Event::Restart { .. }
        )
    }
}

/// The event queue.
#[derive(Debug, Default)]
pub struct Agenda {
    events: BTreeMap<(Duration, u64), Event>,
    scheduled: u64,
}

impl Agenda {
    /// Adds an event at virtual time `at`.
    pub fn schedule(&mut self, at: Duration, event: Event) {
        self.events.insert((at, self.scheduled), event);
        self.scheduled += 1;
    }

    /// When the next event is due.
    pub fn next_time(&self) -> Option<Duration> {
        self.events.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns the next event.
    pub fn pop(&mut self) -> Option<Event> {
        self.events.pop_first().map(|(_, event)| event)
    }

    /// True while bytes, closes, reconnects, restarts or store tasks are pending.
    pub fn has_work_in_motion(&self) -> bool {
        self.events.values().any(Event::is_in_motion)
    }
}
