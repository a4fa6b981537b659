//! Regional durability: a write may wait until hubs in N regions have committed it.
//!
//! A hub knows which regions hold heads of a document: its own once it has committed them,
//! and another hub's once that hub's sync messages name heads that include them, since hubs
//! name only committed heads. An agent whose write waits for regions sends its hub a
//! [`Message::WatchRegions`]; the hub answers at once and again each time more regions hold
//! the heads, until enough do or the connection closes. Holding is never undone, so an agent
//! adds up what every hub it meets tells it, and a wait survives failover to another hub.

use std::collections::BTreeSet;
use std::time::Instant;

use automerge::{ChangeHash, ReadDoc};

use super::{ConnId, DurabilityReport, Node, Output, RequestId, Response};
use crate::durability::heads_cover;
use crate::ids::{DocId, NodeId};
use crate::message::{Message, Role};
use crate::peer::PeerPhase;

/// Most watches one connection holds; past it the oldest is dropped (its writer is answered
/// at its deadline with what was known).
const MAX_WATCHES_PER_PEER: usize = 1024;

/// Someone waiting to hear which regions hold heads of a document.
#[derive(Debug)]
pub(super) struct RegionWatch {
    watcher: Watcher,
    heads: Vec<ChangeHash>,
    /// Regions the watcher waits for.
    needed: u8,
    /// How many regions it was last told of; `None` until it is first told.
    told: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watcher {
    /// An agent on this connection.
    Peer(ConnId),
    /// A write to this hub's own API, answered at the deadline if not before.
    Local(RequestId, Instant),
}

impl Node {
    /// Sets the region this hub serves and the regions of the other hubs it may hear from.
    pub fn set_regions(&mut self, own: String, hubs: impl IntoIterator<Item = (NodeId, String)>) {
        self.region = Some(own);
        self.hub_regions = hubs.into_iter().collect();
        let watched: Vec<DocId> = self.region_watches.keys().copied().collect();
        for doc_id in watched {
            self.recheck_regions(doc_id);
        }
    }

    /// Watches held for peers and for this hub's own writes.
    pub fn region_watch_count(&self) -> usize {
        self.region_watches.values().map(Vec::len).sum()
    }

    /// The regions whose hubs hold every change up to `heads`, as far as this hub knows.
    pub(super) fn regions_holding(&self, doc_id: DocId, heads: &[ChangeHash]) -> BTreeSet<String> {
        let mut regions = BTreeSet::new();
        let Some(own) = &self.region else { return regions };
        let document = self.documents.get(&doc_id).filter(|d| !d.is_placeholder);
        let doc = document.map(|d| &d.doc);
        // Held here means committed: every append of the document has been stored.
        let committed_here = match document {
            Some(d) => d.persisting == 0 && heads_cover(doc, &d.doc.get_heads(), heads),
            None => self.catalog.get(&doc_id).is_some_and(|e| heads_cover(None, &e.heads, heads)),
        };
        if committed_here {
            regions.insert(own.clone());
        }
        for peer in self.peers.values().filter(|p| p.phase == PeerPhase::Ready(Role::Hub)) {
            let Some(region) = self.hub_regions.get(&peer.node_id) else { continue };
            if regions.contains(region) {
                continue;
            }
            let theirs = peer.sync_states.their_heads(&doc_id);
            if theirs.is_some_and(|theirs| heads_cover(doc, theirs, heads)) {
                regions.insert(region.clone());
            }
        }
        regions
    }

    /// An agent asks which regions hold `heads`: answered now and whenever that grows.
    pub(super) fn on_watch_regions(
        &mut self,
        conn: ConnId,
        doc_id: DocId,
        heads: Vec<[u8; 32]>,
        needed: u8,
    ) {
        if self.region.is_none() {
            return; // Only a hub with a region knows.
        }
        let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
        let watcher = Watcher::Peer(conn);
        let watches = self.region_watches.entry(doc_id).or_default();
        if let Some(watch) = watches.iter_mut().find(|w| w.watcher == watcher && w.heads == heads) {
            // Asked again: answer again, even if nothing changed.
            watch.needed = watch.needed.max(needed);
            watch.told = None;
        } else {
            watches.push(RegionWatch { watcher, heads, needed, told: None });
            self.bound_watches(conn);
        }
        self.recheck_regions(doc_id);
    }

    /// Keeps at most [`MAX_WATCHES_PER_PEER`] watches of one connection.
    fn bound_watches(&mut self, conn: ConnId) {
        let count = self.watches_per_peer.entry(conn).or_default();
        *count += 1;
        if *count <= MAX_WATCHES_PER_PEER {
            return;
        }
        *count -= 1;
        // Watches are not ordered across documents; dropping the first found bounds memory,
        // and its writer still hears at its deadline.
        let watcher = Watcher::Peer(conn);
        for watches in self.region_watches.values_mut() {
            if let Some(at) = watches.iter().position(|w| w.watcher == watcher) {
                watches.remove(at);
                break;
            }
        }
        self.region_watches.retain(|_, ws| !ws.is_empty());
    }

    /// A write to this hub's own API waits for `needed` regions until `deadline`.
    pub(super) fn watch_regions_here(
        &mut self,
        request: RequestId,
        doc_id: DocId,
        heads: Vec<ChangeHash>,
        needed: u8,
        deadline: Instant,
    ) {
        let watcher = Watcher::Local(request, deadline);
        let watch = RegionWatch { watcher, heads, needed, told: None };
        self.region_watches.entry(doc_id).or_default().push(watch);
    }

    /// Tells every watcher of `doc_id` of regions that now hold its heads; watchers that have
    /// enough are done.
    pub(super) fn recheck_regions(&mut self, doc_id: DocId) {
        let Some(mut watches) = self.region_watches.remove(&doc_id) else { return };
        watches.retain_mut(|watch| {
            let regions = self.regions_holding(doc_id, &watch.heads);
            let enough = regions.len() >= usize::from(watch.needed);
            if watch.told.is_some_and(|told| regions.len() <= told) {
                return true;
            }
            watch.told = Some(regions.len());
            match watch.watcher {
                Watcher::Peer(conn) => {
                    let heads = watch.heads.iter().map(|h| h.0).collect();
                    let regions = regions.into_iter().collect();
                    self.send(conn, Message::HeldInRegions { doc_id, heads, regions });
                    if enough {
                        if let Some(count) = self.watches_per_peer.get_mut(&conn) {
                            *count = count.saturating_sub(1);
                        }
                    }
                    !enough
                }
                Watcher::Local(request, _) if enough => {
                    let report = self.durability_report(doc_id, &watch.heads);
                    let result = Ok(Response::Durability(report));
                    self.outputs.push_back(Output::Respond { id: request, result });
                    false
                }
                Watcher::Local(..) => true,
            }
        });
        if !watches.is_empty() {
            self.region_watches.insert(doc_id, watches);
        }
    }

    /// Drops the watches of a connection that closed.
    pub(super) fn forget_region_watches(&mut self, conn: ConnId) {
        if self.watches_per_peer.remove(&conn).is_none() {
            return;
        }
        for watches in self.region_watches.values_mut() {
            watches.retain(|w| w.watcher != Watcher::Peer(conn));
        }
        self.region_watches.retain(|_, ws| !ws.is_empty());
    }

    /// The earliest deadline of a write to this hub waiting for regions.
    pub(super) fn next_region_deadline(&self) -> Option<Instant> {
        let deadlines = self.region_watches.values().flatten().filter_map(|w| match w.watcher {
            Watcher::Local(_, deadline) => Some(deadline),
            Watcher::Peer(_) => None,
        });
        deadlines.min()
    }

    /// Answers the writes to this hub whose wait for regions reached its deadline.
    pub(super) fn expire_region_watches(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (doc_id, watches) in &mut self.region_watches {
            watches.retain(|w| match w.watcher {
                Watcher::Local(request, deadline) if deadline <= now => {
                    due.push((request, *doc_id, w.heads.clone()));
                    false
                }
                _ => true,
            });
        }
        self.region_watches.retain(|_, ws| !ws.is_empty());
        for (request, doc_id, heads) in due {
            let report = self.durability_report(doc_id, &heads);
            let result = Ok(Response::Durability(report));
            self.outputs.push_back(Output::Respond { id: request, result });
        }
    }

    /// An agent asks the hubs it is connected to which regions hold `heads`.
    pub(super) fn ask_hubs_for_regions(&mut self, doc_id: DocId, heads: &[ChangeHash], needed: u8) {
        for conn in self.ready_conns(Role::Hub) {
            let heads = heads.iter().map(|h| h.0).collect();
            self.send(conn, Message::WatchRegions { doc_id, heads, regions: needed });
        }
    }

    /// Offers `conn`, a hub, a document with a write waiting to be hub-durable, unless the two
    /// are syncing it already; the hub's answer names the heads it holds. Without this, a
    /// write the hub committed while its answer was lost would wait in vain: after a
    /// reconnect, reconciliation finds the document equal on both sides, and no sync message
    /// follows.
    pub(super) fn ask_hub_for_heads(&mut self, conn: ConnId, doc_id: DocId) {
        if self.peers.get(&conn).is_some_and(|p| !p.sync_states.contains(&doc_id)) {
            self.offer(conn, doc_id);
        }
    }

    /// A newly connected hub is asked for its heads of every document with a write waiting
    /// to be hub-durable.
    pub(super) fn ask_hub_for_waiting_heads(&mut self, conn: ConnId) {
        let waiting: BTreeSet<DocId> = self.hub_acks.hub_waits().collect();
        for doc_id in waiting {
            self.ask_hub_for_heads(conn, doc_id);
        }
    }

    /// A newly connected hub hears of every write still waiting for regions.
    pub(super) fn rewatch_regions(&mut self, conn: ConnId) {
        let waits: Vec<Message> = self
            .hub_acks
            .region_waits()
            .map(|(doc_id, heads, regions)| Message::WatchRegions {
                doc_id,
                heads: heads.iter().map(|h| h.0).collect(),
                regions,
            })
            .collect();
        for message in waits {
            self.send(conn, message);
        }
    }

    /// A hub says which regions hold heads of a document: noted, and the writes that now
    /// have enough regions are answered.
    pub(super) fn on_held_in_regions(
        &mut self,
        conn: ConnId,
        doc_id: DocId,
        heads: Vec<[u8; 32]>,
        regions: Vec<String>,
    ) {
        let from_hub =
            self.peers.get(&conn).is_some_and(|p| p.phase == PeerPhase::Ready(Role::Hub));
        if !from_hub || self.role == Role::Hub {
            return;
        }
        let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
        self.hub_acks.record_regions(doc_id, &heads, regions);
        self.answer_durability_waits(doc_id);
    }

    /// How durable `heads` of a document are, as far as this node knows.
    pub(super) fn durability_report(
        &self,
        doc_id: DocId,
        heads: &[ChangeHash],
    ) -> DurabilityReport {
        let document = self.documents.get(&doc_id).filter(|d| !d.is_placeholder);
        let local =
            document.is_some_and(|d| heads.iter().all(|h| d.doc.get_change_by_hash(h).is_some()));
        let hub = local
            && (self.role == Role::Hub
                || document.is_some_and(|d| self.hub_acks.covers(&doc_id, &d.doc, heads)));
        let regions = match (local, self.role) {
            (false, _) => Vec::new(),
            (true, Role::Hub) => self.regions_holding(doc_id, heads).into_iter().collect(),
            (true, _) => self.hub_acks.regions(doc_id, heads),
        };
        DurabilityReport { local, hub, regions }
    }
}
