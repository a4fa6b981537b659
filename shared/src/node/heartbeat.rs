//! Liveness of node peers. A transport's idle timeout is not enough: when only one direction
//! of a link dies, the other side's keep-alives still arrive and keep the connection looking
//! alive. So each side pings a node peer it has not heard from for a heartbeat interval, and
//! closes the connection when the peer stays silent past the heartbeat timeout; an agent then
//! moves to another hub.

use std::time::Instant;

use super::{Node, Output};
use crate::message::Message;

impl Node {
    /// The next moment a node peer is due a ping or is declared gone.
    pub(super) fn next_heartbeat(&self) -> Option<Instant> {
        let (interval, timeout) = self.config.heartbeat()?;
        self.peers
            .values()
            .filter(|p| p.replicates_everything())
            .map(|p| {
                let quiet_since = p.last_ping.map_or(p.last_heard, |ping| ping.max(p.last_heard));
                (quiet_since + interval).min(p.last_heard + timeout)
            })
            .min()
    }

    /// Pings node peers that have been quiet for an interval and closes those silent past
    /// the timeout.
    pub(super) fn run_heartbeats(&mut self, now: Instant) {
        let Some((interval, timeout)) = self.config.heartbeat() else { return };
        let mut silent = Vec::new();
        let mut quiet = Vec::new();
        for (conn, peer) in self.peers.iter_mut().filter(|(_, p)| p.replicates_everything()) {
            if now >= peer.last_heard + timeout {
                silent.push((*conn, peer.node_id));
                continue;
            }
            let quiet_since = peer.last_ping.map_or(peer.last_heard, |p| p.max(peer.last_heard));
            if now >= quiet_since + interval {
                peer.last_ping = Some(now);
                quiet.push(*conn);
            }
        }
        for conn in quiet {
            self.send(conn, Message::Ping);
        }
        for (conn, peer) in silent {
            let reason = format!("no heartbeat from {peer} for {} ms", timeout.as_millis());
            self.outputs.push_back(Output::Close { conn, reason });
            self.on_disconnected(conn);
        }
    }
}
