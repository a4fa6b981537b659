//! Connections coming and going: links up and down, closes, partitions, crashes, restarts.

use std::time::Duration;

use cairn_shared::node::{ConnId, Input};
use rand::Rng;

use super::{checks, Cluster, Event, Phase, IDLE_TIMEOUT};

impl Cluster {
    /// A node closed a connection: the transport tears the link down once the frames queued
    /// before the close have landed, and the agent redials after a backoff.
    pub(super) fn close(&mut self, index: usize, conn: ConnId, reason: String) {
        self.note(|| format!("node {index} closes conn {conn}: {reason}"));
        if let Some(probe) = self.probes.get_mut(&(index, conn)) {
            probe.closed = Some(reason);
            return;
        }
        if self.phase == Phase::Settling {
            self.ledger.closes_while_settling.push(reason);
        }
        let Some((link, end)) = self.net.find(index, conn) else {
            return;
        };
        // The transport sends what was queued (the Refuse) before it closes.
        let linger = self.net.latency(link, 1 - end) + Duration::from_millis(1);
        let outage = self.backoff();
        let generation = self.net.generation(link);
        self.agenda.schedule(self.now + linger, Event::LinkDown { link, generation, outage });
    }

    /// A jittered reconnect delay, as the agents' dial loop uses.
    fn backoff(&mut self) -> Duration {
        Duration::from_millis(self.rng.gen_range(50..=600))
    }

    /// Connects a link whose ends both run: fresh connection ids and `Connected` on both sides.
    pub(super) fn link_up(&mut self, link: usize) {
        let [a, b] = self.net.ends(link);
        if self.net.is_up(link) || self.slots[a].node.is_none() || self.slots[b].node.is_none() {
            return;
        }
        let partitioned_until = self.net.partitioned_until(link);
        if self.now < partitioned_until {
            // No connection can be set up across a partition; try again once it heals.
            self.agenda.schedule(partitioned_until, Event::LinkUp { link });
            return;
        }
        let [conn_a, conn_b] = self.net.connect(link);
        self.note(|| format!("link {link} up: conns {conn_a}/{conn_b}"));
        let (id_a, id_b) = (self.slots[a].id, self.slots[b].id);
        let mut connects = [(a, conn_a, id_b), (b, conn_b, id_a)];
        if self.rng.gen_bool(0.5) {
            connects.reverse();
        }
        for (node, conn, peer) in connects {
            self.drive(node, Input::Connected { conn, peer, restrict: None });
        }
    }

    /// Cuts a link. A connection silent for longer than the idle timeout dies, as QUIC's does,
    /// and both ends see it close.
    pub(super) fn partition(&mut self, link: usize, length: Duration) {
        self.note(|| format!("partition link {link} for {length:?}"));
        self.net.partition(link, self.now + length);
        if length > IDLE_TIMEOUT {
            let generation = self.net.generation(link);
            let outage = length - IDLE_TIMEOUT + self.backoff();
            self.agenda
                .schedule(self.now + IDLE_TIMEOUT, Event::LinkDown { link, generation, outage });
        }
    }

    /// Takes a link down; with an outage, it reconnects on its own after that long.
    pub(super) fn link_down(&mut self, link: usize, outage: Option<Duration>) {
        let Some(ends) = self.net.disconnect(link) else {
            return;
        };
        self.note(|| format!("link {link} down"));
        for (node, conn) in ends {
            self.drive(node, Input::Disconnected { conn });
        }
        if let Some(outage) = outage {
            self.agenda.schedule(self.now + outage, Event::LinkUp { link });
        }
    }

    /// Kills a node: its memory and its unanswered store tasks are gone, its store stays, and
    /// its peers see their connections drop.
    pub(super) fn crash(&mut self, index: usize, downtime: Duration) {
        let slot = &mut self.slots[index];
        if slot.node.take().is_none() {
            return;
        }
        slot.incarnation += 1;
        slot.store.lose_pending();
        self.ledger.lost_to_crashes += slot.writes.len() as u64;
        slot.writes.clear();
        self.ledger.crashes += 1;
        self.note(|| format!("crash node {index} for {downtime:?}"));
        for link in self.net.links_of(index) {
            self.link_down(link, None);
        }
        self.agenda.schedule(self.now + downtime, Event::Restart { node: index });
    }

    /// Boots a crashed node from its store with a fresh actor, checks that it kept everything it
    /// acknowledged, and redials its links.
    pub(super) fn restart(&mut self, index: usize) {
        if self.slots[index].node.is_some() {
            return;
        }
        self.note(|| format!("restart node {index}"));
        self.boot(index);
        checks::assert_recovered(self, index);
        for link in self.net.links_of(index) {
            let at = self.now + self.backoff();
            self.agenda.schedule(at, Event::LinkUp { link });
        }
    }
}
