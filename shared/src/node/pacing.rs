//! Pacing of change-carrying sync messages: at most one per peer and document per window.
//!
//! Automerge's remote apply costs about the same for one change as for a thousand on a
//! large document (it rebuilds its op columns on every call), so a document written in a
//! steady stream costs every receiver one full apply per message. Holding a document's next
//! message to a peer until the window since the last one closes lets the changes made
//! meanwhile travel, and be applied, together. A document written now and then is never
//! held: only a message that follows another one to the same peer within the window waits,
//! and never longer than the window.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use automerge::sync;
use automerge::ChangeHash;

use super::ConnId;
use crate::ids::DocId;

#[derive(Debug, Default)]
pub(super) struct Pacing {
    window: Duration,
    /// When a message carrying changes last went to each (peer, document), while its window
    /// is open.
    last_sent: BTreeMap<(ConnId, DocId), Instant>,
    /// The same sends oldest first, so closed windows are forgotten in order.
    sent_order: VecDeque<(Instant, ConnId, DocId)>,
    /// Messages held back: per document, the peers waiting and when each one's window closes.
    held: BTreeMap<DocId, BTreeMap<ConnId, Instant>>,
    /// The held messages by when they go.
    due: BTreeSet<(Instant, ConnId, DocId)>,
}

impl Pacing {
    pub(super) fn new(window: Duration) -> Self {
        Self { window, ..Self::default() }
    }

    /// Whether the next message for `doc_id` to `conn` waits: one carrying changes went there
    /// within the window and this one would carry more (the peer has not said it holds our
    /// heads). A held message is remembered and [`Pacing::take_due`] hands it back. Messages
    /// that carry no changes (acknowledgements, heads the peer waits to hear) never wait.
    pub(super) fn holds(
        &mut self,
        conn: ConnId,
        doc_id: DocId,
        state: &sync::State,
        heads: &[ChangeHash],
        now: Instant,
    ) -> bool {
        let Some(&sent) = self.last_sent.get(&(conn, doc_id)) else { return false };
        let closes = sent + self.window;
        if closes <= now {
            return false;
        }
        let peer_has_ours = state
            .their_heads
            .as_ref()
            .is_some_and(|theirs| heads.iter().all(|h| theirs.contains(h)));
        if peer_has_ours {
            return false;
        }
        let waiting = self.held.entry(doc_id).or_default();
        if waiting.insert(conn, closes).is_none() {
            self.due.insert((closes, conn, doc_id));
        }
        true
    }

    /// Notes that a message carrying changes of `doc_id` went to `conn`.
    pub(super) fn sent_changes(&mut self, conn: ConnId, doc_id: DocId, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        self.release(conn, doc_id);
        self.forget_closed(now);
        self.last_sent.insert((conn, doc_id), now);
        self.sent_order.push_back((now, conn, doc_id));
    }

    /// Forgets the sends whose window has closed, oldest first.
    fn forget_closed(&mut self, now: Instant) {
        while let Some(&(sent, conn, doc_id)) = self.sent_order.front() {
            if sent + self.window > now {
                break;
            }
            self.sent_order.pop_front();
            if self.last_sent.get(&(conn, doc_id)) == Some(&sent) {
                self.last_sent.remove(&(conn, doc_id));
            }
        }
    }

    /// The held messages whose window has closed, to be sent now; forgets closed windows.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(ConnId, DocId)> {
        self.forget_closed(now);
        let mut ready = Vec::new();
        while self.due.first().is_some_and(|(closes, _, _)| *closes <= now) {
            let Some((_, conn, doc_id)) = self.due.pop_first() else { break };
            if let Some(waiting) = self.held.get_mut(&doc_id) {
                waiting.remove(&conn);
                if waiting.is_empty() {
                    self.held.remove(&doc_id);
                }
            }
            ready.push((conn, doc_id));
        }
        ready
    }

    /// When the next held message goes.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(closes, _, _)| *closes)
    }

    /// Whether some peer waits for a message of `doc_id`: the document stays in memory.
    pub(super) fn is_held(&self, doc_id: &DocId) -> bool {
        self.held.contains_key(doc_id)
    }

    /// Forgets the windows of a document whose writing is over; returns the peers that were
    /// waiting for a message of it, which may be sent at once.
    pub(super) fn forget_document(&mut self, doc_id: DocId) -> Vec<ConnId> {
        self.last_sent.retain(|(_, doc), _| *doc != doc_id);
        let waiting = self.held.remove(&doc_id).unwrap_or_default();
        for (conn, closes) in &waiting {
            self.due.remove(&(*closes, *conn, doc_id));
        }
        waiting.into_keys().collect()
    }

    /// Forgets a closed connection.
    pub(super) fn forget(&mut self, conn: ConnId) {
        self.last_sent.retain(|(c, _), _| *c != conn);
        self.sent_order.retain(|(_, c, _)| *c != conn);
        self.due.retain(|(_, c, _)| *c != conn);
        self.held.retain(|_, waiting| {
            waiting.remove(&conn);
            !waiting.is_empty()
        });
    }

    fn release(&mut self, conn: ConnId, doc_id: DocId) {
        let Some(waiting) = self.held.get_mut(&doc_id) else { return };
        if let Some(closes) = waiting.remove(&conn) {
            self.due.remove(&(closes, conn, doc_id));
        }
        if waiting.is_empty() {
            self.held.remove(&doc_id);
        }
    }
}
