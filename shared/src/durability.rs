//! Write concerns: how durable a write must be before the application hears back.
//!
//! Every write is applied and committed locally first; the level only decides what the
//! answer waits for, never whether the write happens. That keeps the write path free of
//! coordination. A hub advertises heads only after committing them, so the heads a hub last
//! advertised for a document are proof of what it holds durably.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Committed by hubs in this many regions.
    Regions(u8),
}

/// A durability level that cannot be parsed or served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DurabilityError {
    /// Not one of the level names.
    #[error("unknown durability {0:?}: use \"local\", \"hub\" or \"regions:N\"")]
    Unknown(String),
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

/// A request waiting until hubs hold certain heads.
#[derive(Debug)]
struct Wait {
    request: RequestId,
    doc_id: DocId,
    heads: Vec<ChangeHash>,
    /// Regions that must hold the heads; zero means any one hub.
    regions: u8,
    deadline: Instant,
}

/// A durability wait whose deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub struct ExpiredWait {
    /// The request to answer.
    pub request: RequestId,
    /// The document.
    pub doc_id: DocId,
    /// The heads it waited for.
    pub heads: Vec<ChangeHash>,
}

/// Most (document, heads) pairs whose holding regions an agent remembers.
const REGION_ANSWERS_KEPT: usize = 1024;

/// What hubs have acknowledged, and who waits for it.
#[derive(Debug, Default)]
pub struct HubAcks {
    /// Per document, the heads a hub last advertised (after committing them).
    acknowledged: BTreeMap<DocId, Vec<ChangeHash>>,
    /// Regions hubs said hold a document's heads (sorted), gathered across hubs.
    held_in: BTreeMap<(DocId, Vec<ChangeHash>), BTreeSet<String>>,
    waits: Vec<Wait>,
    /// HLC time of the last sync message from a hub.
    last_hub_sync: Option<uhlc::Timestamp>,
}

/// True if a node whose heads are `acked` holds every change up to `heads`; `doc` (the
/// document as this node holds it) tells ancestors apart, and without it only heads named
/// outright count.
pub fn heads_cover(doc: Option<&Automerge>, acked: &[ChangeHash], heads: &[ChangeHash]) -> bool {
    if heads.iter().all(|h| acked.contains(h)) {
        return true;
    }
    let Some(doc) = doc else { return false };
    // Heads we have not received yet cannot vouch for anything; leaving them out can only
    // make the answer "not yet", never a false "yes".
    let known: Vec<ChangeHash> =
        acked.iter().filter(|h| doc.get_change_by_hash(h).is_some()).copied().collect();
    if known.is_empty() {
        return false;
    }
    // Anything not reachable from the acknowledged heads is what that node lacks.
    let missing: Vec<ChangeHash> = doc.get_changes(&known).iter().map(|c| c.hash()).collect();
    heads.iter().all(|h| !missing.contains(h) && doc.get_change_by_hash(h).is_some())
}

fn sorted(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut heads = heads.to_vec();
    heads.sort();
    heads
}

impl HubAcks {
    /// Records heads a hub advertised for a document at `at`.
    pub fn record(&mut self, doc_id: DocId, heads: Vec<ChangeHash>, at: uhlc::Timestamp) {
        self.acknowledged.insert(doc_id, heads);
        self.last_hub_sync = Some(at);
    }

    /// True if a hub holds every change up to `heads`.
    pub fn covers(&self, doc_id: &DocId, doc: &Automerge, heads: &[ChangeHash]) -> bool {
        match self.acknowledged.get(doc_id) {
            Some(acked) => heads_cover(Some(doc), acked, heads),
            None => heads.is_empty(),
        }
    }

    /// Records that hubs of `regions` hold `heads` of a document. Holding is never undone,
    /// so answers from several hubs add up.
    pub fn record_regions(&mut self, doc_id: DocId, heads: &[ChangeHash], regions: Vec<String>) {
        let key = (doc_id, sorted(heads));
        if !self.held_in.contains_key(&key) && self.held_in.len() >= REGION_ANSWERS_KEPT {
            // Forget the entry no wait needs that sorts first; waits keep theirs.
            let idle = self.held_in.keys().find(|(id, heads)| {
                !self.waits.iter().any(|w| &w.doc_id == id && &sorted(&w.heads) == heads)
            });
            if let Some(idle) = idle.cloned() {
                self.held_in.remove(&idle);
            }
        }
        self.held_in.entry(key).or_default().extend(regions);
    }

    /// The regions known to hold `heads` of a document.
    pub fn regions(&self, doc_id: DocId, heads: &[ChangeHash]) -> Vec<String> {
        let key = (doc_id, sorted(heads));
        self.held_in.get(&key).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// Registers a request to answer once `heads` are held by a hub (`regions` zero) or by
    /// hubs of that many regions, or at `deadline`.
    pub fn wait(
        &mut self,
        request: RequestId,
        doc_id: DocId,
        heads: Vec<ChangeHash>,
        regions: u8,
        deadline: Instant,
    ) {
        self.waits.push(Wait { request, doc_id, heads, regions, deadline });
    }

    /// Requests waiting on `doc_id` whose heads are now held where they asked, with those
    /// heads; they are removed.
    pub fn satisfied(
        &mut self,
        doc_id: &DocId,
        doc: &Automerge,
    ) -> Vec<(RequestId, Vec<ChangeHash>)> {
        let (done, waiting): (Vec<Wait>, Vec<Wait>) = std::mem::take(&mut self.waits)
            .into_iter()
            .partition(|w| &w.doc_id == doc_id && self.met(w, doc));
        self.waits = waiting;
        done.into_iter().map(|w| (w.request, w.heads)).collect()
    }

    fn met(&self, wait: &Wait, doc: &Automerge) -> bool {
        match wait.regions {
            0 => self.covers(&wait.doc_id, doc, &wait.heads),
            n => self.regions(wait.doc_id, &wait.heads).len() >= usize::from(n),
        }
    }

    /// Documents with a write waiting to be held by a hub (not by regions).
    pub fn hub_waits(&self) -> impl Iterator<Item = DocId> + '_ {
        self.waits.iter().filter(|w| w.regions == 0).map(|w| w.doc_id)
    }

    /// Waits for regions, to be told to a newly connected hub: document, heads, regions.
    pub fn region_waits(&self) -> impl Iterator<Item = (DocId, &[ChangeHash], u8)> {
        self.waits.iter().filter(|w| w.regions > 0).map(|w| (w.doc_id, &w.heads[..], w.regions))
    }

    /// Requests whose deadline passed; they are removed.
    pub fn expired(&mut self, now: Instant) -> Vec<ExpiredWait> {
        let (done, waiting): (Vec<Wait>, Vec<Wait>) =
            std::mem::take(&mut self.waits).into_iter().partition(|w| w.deadline <= now);
        self.waits = waiting;
        let expired = done.into_iter();
        expired
            .map(|w| ExpiredWait { request: w.request, doc_id: w.doc_id, heads: w.heads })
            .collect()
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
        acks.wait(1, doc_id, doc.get_heads(), 0, start + std::time::Duration::from_secs(5));
        acks.wait(2, doc_id, doc.get_heads(), 0, start + std::time::Duration::from_secs(1));
        assert_eq!(acks.next_deadline(), Some(start + std::time::Duration::from_secs(1)));
        let expired = acks.expired(start + std::time::Duration::from_secs(2));
        assert_eq!(expired.iter().map(|w| w.request).collect::<Vec<_>>(), vec![2]);
        assert!(acks.satisfied(&doc_id, &doc).is_empty());
        let at = uhlc::Timestamp::new(uhlc::NTP64(1), uhlc::ID::try_from([1u8; 16]).unwrap());
        acks.record(doc_id, doc.get_heads(), at);
        assert_eq!(acks.satisfied(&doc_id, &doc), vec![(1, doc.get_heads())]);
        assert_eq!(acks.next_deadline(), None);
    }

    #[test]
    fn a_regions_wait_ends_when_enough_regions_hold_the_heads_in_any_order() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "n", 1).unwrap();
        tx.commit();
        let doc_id = DocId::from_slice(&[3; 16]).unwrap();
        let heads = doc.get_heads();
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let mut acks = HubAcks::default();
        acks.wait(7, doc_id, heads.clone(), 2, far);
        assert_eq!(acks.region_waits().count(), 1);
        let at = uhlc::Timestamp::new(uhlc::NTP64(1), uhlc::ID::try_from([1u8; 16]).unwrap());
        acks.record(doc_id, heads.clone(), at);
        acks.record_regions(doc_id, &heads, vec!["eu".into()]);
        assert!(acks.satisfied(&doc_id, &doc).is_empty(), "one hub, one region: not yet");
        // A second hub's answer names the same region again and a new one.
        acks.record_regions(doc_id, &heads, vec!["us".into(), "eu".into()]);
        assert_eq!(acks.regions(doc_id, &heads), vec!["eu".to_owned(), "us".to_owned()]);
        assert_eq!(acks.satisfied(&doc_id, &doc), vec![(7, heads)]);
    }

    #[test]
    fn remembered_region_answers_are_bounded_and_waits_keep_theirs() {
        let mut acks = HubAcks::default();
        let waited = DocId::from_slice(&[0; 16]).unwrap();
        let far = Instant::now() + std::time::Duration::from_secs(5);
        acks.wait(1, waited, vec![ChangeHash([9; 32])], 1, far);
        acks.record_regions(waited, &[ChangeHash([9; 32])], vec!["eu".into()]);
        for i in 1..=(REGION_ANSWERS_KEPT as u32 + 10) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let doc_id = DocId::from_slice(&id).unwrap();
            acks.record_regions(doc_id, &[ChangeHash([1; 32])], vec!["eu".into()]);
        }
        assert!(acks.held_in.len() <= REGION_ANSWERS_KEPT);
        assert_eq!(acks.regions(waited, &[ChangeHash([9; 32])]), vec!["eu".to_owned()]);
    }
}
