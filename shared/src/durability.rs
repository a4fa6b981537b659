//! Write concerns: how durable a write must be before the application hears back.
//!
//! Every write is applied and committed locally first; the level only decides what the
//! answer waits for, never whether the write happens. That keeps the write path free of
//! coordination. A hub advertises heads only after committing them, so the heads a hub last
//! advertised for a document are proof of what it holds durably.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use automerge::{Automerge, ChangeHash, ReadDoc};

use crate::ids::DocId;
use crate::node::RequestId;

/// What a write's answer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Committed on this node (the default).
    #[default]
    Local,
    /// Committed by a hub.
    Hub,
    /// Committed in this many regions. Parsed so clients can name it; it needs hub-to-hub
    /// replication, which this build does not have.
    Regions(u8),
}

/// A durability level that cannot be parsed or served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DurabilityError {
    /// Not one of the level names.
    #[error("unknown durability {0:?}: use \"local\", \"hub\" or \"regions:N\"")]
    Unknown(String),
    /// A known level that this deployment cannot provide.
    #[error("durability {0} is not available: this deployment does not replicate across regions")]
    Unavailable(Durability),
}

impl FromStr for Durability {
    type Err = DurabilityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "hub" => Ok(Self::Hub),
            _ => s
                .strip_prefix("regions:")
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| *n > 0)
                .map(Self::Regions)
                .ok_or_else(|| DurabilityError::Unknown(s.chars().take(40).collect())),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Hub => f.write_str("hub"),
            Self::Regions(n) => write!(f, "regions:{n}"),
        }
    }
}

/// A request waiting until a hub holds certain heads.
#[derive(Debug)]
struct Wait {
    request: RequestId,
    doc_id: DocId,
    heads: Vec<ChangeHash>,
    deadline: Instant,
}

/// What hubs have acknowledged, and who waits for it.
#[derive(Debug, Default)]
pub struct HubAcks {
    /// Per document, the heads a hub last advertised (after committing them).
    acknowledged: BTreeMap<DocId, Vec<ChangeHash>>,
    waits: Vec<Wait>,
    /// HLC time of the last sync message from a hub.
    last_hub_sync: Option<uhlc::Timestamp>,
}

impl HubAcks {
    /// Records heads a hub advertised for a document at `at`.
    pub fn record(&mut self, doc_id: DocId, heads: Vec<ChangeHash>, at: uhlc::Timestamp) {
        self.acknowledged.insert(doc_id, heads);
        self.last_hub_sync = Some(at);
    }

    /// True if a hub holds every change up to `heads`.
    pub fn covers(&self, doc_id: &DocId, doc: &Automerge, heads: &[ChangeHash]) -> bool {
        let Some(acked) = self.acknowledged.get(doc_id) else { return heads.is_empty() };
        if heads.iter().all(|h| acked.contains(h)) {
            return true;
        }
        // Heads we have not received yet cannot vouch for anything; leaving them out can only
        // make the answer "not yet", never a false "yes".
        let known: Vec<ChangeHash> =
            acked.iter().filter(|h| doc.get_change_by_hash(h).is_some()).copied().collect();
        if known.is_empty() {
            return false;
        }
        // Anything not reachable from the acknowledged heads is what the hub lacks.
        let missing: Vec<ChangeHash> = doc.get_changes(&known).iter().map(|c| c.hash()).collect();
        heads.iter().all(|h| !missing.contains(h) && doc.get_change_by_hash(h).is_some())
    }

    /// Registers a request to answer once `heads` are covered, or at `deadline`.
    pub fn wait(
        &mut self,
        request: RequestId,
        doc_id: DocId,
        heads: Vec<ChangeHash>,
        deadline: Instant,
    ) {
        self.waits.push(Wait { request, doc_id, heads, deadline });
    }

    /// Requests waiting on `doc_id` whose heads are now covered; they are removed.
    pub fn satisfied(&mut self, doc_id: &DocId, doc: &Automerge) -> Vec<RequestId> {
        let (done, waiting): (Vec<Wait>, Vec<Wait>) = std::mem::take(&mut self.waits)
            .into_iter()
            .partition(|w| &w.doc_id == doc_id && self.covers_wait(w, doc));
        self.waits = waiting;
        done.into_iter().map(|w| w.request).collect()
    }

    fn covers_wait(&self, wait: &Wait, doc: &Automerge) -> bool {
        self.covers(&wait.doc_id, doc, &wait.heads)
    }

    /// Requests whose deadline passed; they are removed.
    pub fn expired(&mut self, now: Instant) -> Vec<RequestId> {
        let (done, waiting): (Vec<Wait>, Vec<Wait>) =
            std::mem::take(&mut self.waits).into_iter().partition(|w| w.deadline <= now);
        self.waits = waiting;
        done.into_iter().map(|w| w.request).collect()
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits.iter().map(|w| w.deadline).min()
    }

    /// Documents whose current heads no hub has acknowledged.
    pub fn pending_documents<'a>(
        &self,
        documents: impl Iterator<Item = (&'a DocId, Vec<ChangeHash>)>,
    ) -> usize {
        documents.filter(|(id, heads)| self.acknowledged.get(id) != Some(heads)).count()
    }

    /// HLC time of the last sync message from a hub.
    pub fn last_hub_sync(&self) -> Option<uhlc::Timestamp> {
        self.last_hub_sync
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        for text in ["local", "hub", "regions:2"] {
            assert_eq!(text.parse::<Durability>().unwrap().to_string(), text);
        }
        for bad in ["", "Hub", "regions:", "regions:0", "regions:x", "everywhere"] {
            assert!(bad.parse::<Durability>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_hub_covers_what_its_advertised_heads_descend_from() {
        let mut doc = Automerge::new();
        let mut heads_seen = Vec::new();
        for i in 0..3 {
            let mut tx = doc.transaction();
            automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "n", i as i64)
                .unwrap();
            tx.commit();
            heads_seen.push(doc.get_heads());
        }
        let doc_id = DocId::from_slice(&[1; 16]).unwrap();
        let mut acks = HubAcks::default();
        assert!(!acks.covers(&doc_id, &doc, &heads_seen[0]));
        let at = uhlc::Timestamp::new(uhlc::NTP64(1), uhlc::ID::try_from([1u8; 16]).unwrap());
        acks.record(doc_id, heads_seen[1].clone(), at);
        assert!(acks.covers(&doc_id, &doc, &heads_seen[0]), "an ancestor is covered");
        assert!(acks.covers(&doc_id, &doc, &heads_seen[1]));
        assert!(!acks.covers(&doc_id, &doc, &heads_seen[2]), "a later change is not");
    }

    #[test]
    fn waits_end_when_covered_or_when_due() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "n", 1).unwrap();
        tx.commit();
        let doc_id = DocId::from_slice(&[2; 16]).unwrap();
        let start = Instant::now();
        let mut acks = HubAcks::default();
        acks.wait(1, doc_id, doc.get_heads(), start + std::time::Duration::from_secs(5));
        acks.wait(2, doc_id, doc.get_heads(), start + std::time::Duration::from_secs(1));
        assert_eq!(acks.next_deadline(), Some(start + std::time::Duration::from_secs(1)));
        assert_eq!(acks.expired(start + std::time::Duration::from_secs(2)), vec![2]);
        assert!(acks.satisfied(&doc_id, &doc).is_empty());
        let at = uhlc::Timestamp::new(uhlc::NTP64(1), uhlc::ID::try_from([1u8; 16]).unwrap());
        acks.record(doc_id, doc.get_heads(), at);
        assert_eq!(acks.satisfied(&doc_id, &doc), vec![1]);
        assert_eq!(acks.next_deadline(), None);
    }
}
