//! The hub directory: a hub tells its agents which hubs exist (its own region's first), so an
//! agent configured with one hub can fail over to hubs it was never told about.

use super::{ConnId, Node};
use crate::message::{HubInfo, Message, Role, MAX_ADVERTISED_HUBS};
use crate::peer::PeerPhase;

impl Node {
    /// Sets the hubs this hub advertises to its agents, and tells every connected agent if
    /// the list changed.
    pub fn set_hub_directory(&mut self, mut hubs: Vec<HubInfo>) {
        hubs.truncate(MAX_ADVERTISED_HUBS);
        if hubs == self.hub_directory {
            return;
        }
        self.hub_directory = hubs;
        for conn in self.ready_conns(Role::Agent) {
            self.advertise_hubs(conn);
        }
    }

    /// Sends the hub directory to an agent peer, if this node has one.
    pub(super) fn advertise_hubs(&mut self, conn: ConnId) {
        if self.role == Role::Hub && !self.hub_directory.is_empty() {
            let hubs = self.hub_directory.clone();
            self.send(conn, Message::Hubs { hubs });
        }
    }

    /// A hub's list of hubs: kept as the latest word on where this agent can go.
    pub(super) fn on_hubs(&mut self, conn: ConnId, hubs: Vec<HubInfo>) {
        let from_hub =
            self.peers.get(&conn).is_some_and(|p| p.phase == PeerPhase::Ready(Role::Hub));
        if from_hub && self.role == Role::Agent {
            self.learned_hubs = hubs;
        }
    }

    /// The hubs the connected hub last advertised (empty until one did).
    pub fn learned_hubs(&self) -> &[HubInfo] {
        &self.learned_hubs
    }
}
