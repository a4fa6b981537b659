//! A peer's Automerge sync state per document, kept as a few heads while nothing is under way.
//!
//! Automerge's `sync::State` keeps what the last messages said: heads, needs, bloom filters,
//! the hashes sent. That is hundreds of bytes per document and peer, and a node keeps one for
//! every document it offered a peer or synced with it while the connection lasts, so on a
//! hub with many peers these states, not the documents, are what grows. Two resting states
//! are kept as heads alone:
//! - settled: both sides are known to hold exactly the same heads and nothing is
//!   outstanding. The state rebuilt from them tells Automerge what the settled one did: the
//!   peer holds these heads and nothing more, so a later change goes in the first message,
//!   with no round trip to learn what the peer has;
//! - offered: we sent our heads and have heard nothing back. Such a state holds nothing but
//!   those heads and the ones both sides were known to share, and is rebuilt exactly.

use std::collections::BTreeMap;

use automerge::sync::{self, BloomFilter, Capability, Have};
use automerge::ChangeHash;

use crate::ids::DocId;

/// Sync states of one peer, by document.
#[derive(Debug, Default)]
pub struct SyncStates {
    entries: BTreeMap<DocId, Entry>,
    live: usize,
}

#[derive(Debug)]
enum Entry {
    /// A sync under way: Automerge's whole state.
    Live(Box<sync::State>),
    /// Both sides held exactly these heads when the last message was exchanged.
    Settled(Settled),
    /// We sent the peer our heads, with no changes, and have heard nothing back.
    Offered(Offered),
}

#[derive(Debug)]
struct Offered {
    /// The heads both sides were known to share when the offer went.
    shared: Box<[ChangeHash]>,
    /// The heads we sent.
    sent: Box<[ChangeHash]>,
}

#[derive(Debug)]
struct Settled {
    heads: Box<[ChangeHash]>,
    /// The peer's capabilities as bits (see [`capability_bit`]); `None` if it never said.
    capabilities: Option<u8>,
}

impl SyncStates {
    /// True if there is a state, live or kept as heads, for `doc_id`.
    pub fn contains(&self, doc_id: &DocId) -> bool {
        self.entries.contains_key(doc_id)
    }

    /// The documents with a state.
    pub fn doc_ids(&self) -> impl Iterator<Item = &DocId> {
        self.entries.keys()
    }

    /// Sets the live state of `doc_id`, replacing whatever was there.
    pub fn insert(&mut self, doc_id: DocId, state: sync::State) {
        if !matches!(
            self.entries.insert(doc_id, Entry::Live(Box::new(state))),
            Some(Entry::Live(_))
        ) {
            self.live += 1;
        }
    }

    /// Forgets the state of `doc_id`.
    pub fn remove(&mut self, doc_id: &DocId) {
        if let Some(Entry::Live(_)) = self.entries.remove(doc_id) {
            self.live -= 1;
        }
    }

    /// The live state of `doc_id`: rebuilt from the heads it was kept as, or begun empty if
    /// there was none.
    pub fn live(&mut self, doc_id: DocId) -> &mut sync::State {
        let entry = self.entries.entry(doc_id).or_insert_with(|| {
            self.live += 1;
            Entry::Live(Box::default())
        });
        let rebuilt = match entry {
            Entry::Live(_) => None,
            Entry::Settled(settled) => Some(settled.rebuilt()),
            Entry::Offered(offered) => Some(offered.rebuilt()),
        };
        if let Some(state) = rebuilt {
            *entry = Entry::Live(Box::new(state));
            self.live += 1;
        }
        match entry {
            Entry::Live(state) => state,
            Entry::Settled(_) | Entry::Offered(_) => unreachable!("made live above"),
        }
    }

    /// The live state of `doc_id` if it has any state.
    pub fn live_if_any(&mut self, doc_id: DocId) -> Option<&mut sync::State> {
        if self.contains(&doc_id) {
            Some(self.live(doc_id))
        } else {
            None
        }
    }

    /// The heads the peer last said it holds.
    pub fn their_heads(&self, doc_id: &DocId) -> Option<&[ChangeHash]> {
        match self.entries.get(doc_id)? {
            Entry::Live(state) => state.their_heads.as_deref(),
            Entry::Settled(settled) => Some(&settled.heads),
            Entry::Offered(_) => None,
        }
    }

    /// The heads both sides were last known to share.
    pub fn shared_heads(&self, doc_id: &DocId) -> Option<&[ChangeHash]> {
        match self.entries.get(doc_id)? {
            Entry::Live(state) => Some(&state.shared_heads),
            Entry::Settled(settled) => Some(&settled.heads),
            Entry::Offered(offered) => Some(&offered.shared),
        }
    }

    /// Keeps the state of `doc_id` as heads alone if it is at rest: settled at `ours` (the
    /// peer said it holds them, we said we do, and it needs nothing), or an offer of `ours`
    /// the peer has not answered. Returns true if it is kept as heads now.
    pub fn compact(&mut self, doc_id: &DocId, ours: &[ChangeHash]) -> bool {
        let Some(entry) = self.entries.get_mut(doc_id) else { return false };
        let Entry::Live(state) = entry else { return true };
        let compact = match Settled::of(state, ours) {
            Some(settled) => Entry::Settled(settled),
            None => match Offered::of(state) {
                Some(offered) => Entry::Offered(offered),
                None => return false,
            },
        };
        *entry = compact;
        self.live -= 1;
        true
    }

    /// How many states are live.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// How many states are kept as heads.
    pub fn compact_count(&self) -> usize {
        self.entries.len() - self.live
    }

    /// Each state as Automerge persists one (the shared heads), leaving out those that share
    /// nothing.
    pub fn into_encoded(self) -> impl Iterator<Item = (DocId, Vec<u8>)> {
        self.entries.into_iter().filter_map(|(doc_id, entry)| {
            let state = match entry {
                Entry::Live(state) => *state,
                Entry::Settled(settled) => {
                    let mut state = sync::State::new();
                    state.shared_heads = settled.heads.into_vec();
                    state
                }
                Entry::Offered(offered) => {
                    let mut state = sync::State::new();
                    state.shared_heads = offered.shared.into_vec();
                    state
                }
            };
            (!state.shared_heads.is_empty()).then(|| (doc_id, state.encode()))
        })
    }
}

impl Settled {
    fn of(state: &sync::State, ours: &[ChangeHash]) -> Option<Self> {
        let outstanding = state.read_only
            || state.peer_read_only
            || state.needs_reset
            || !state.have_responded
            || state.their_need.as_ref().is_some_and(|need| !need.is_empty());
        let agreed = !ours.is_empty()
            && same_heads(state.their_heads.as_deref()?, ours)
            && same_heads(&state.shared_heads, ours)
            && same_heads(&state.last_sent_heads, ours);
        if outstanding || !agreed {
            return None;
        }
        let capabilities = (state.their_capabilities.as_ref())
            .map(|list| list.iter().map(capability_bit).fold(0, |bits, bit| bits | bit));
        Some(Self { heads: ours.into(), capabilities })
    }

    /// A live state that says what this one does: the peer holds exactly these heads (with
    /// an empty bloom filter since them), needs nothing, and has heard them from us.
    fn rebuilt(&self) -> sync::State {
        let heads = self.heads.to_vec();
        let mut state = sync::State::new();
        state.their_have =
            Some(vec![Have { last_sync: heads.clone(), bloom: BloomFilter::default() }]);
        state.their_need = Some(Vec::new());
        state.their_heads = Some(heads.clone());
        state.last_sent_heads = heads.clone();
        state.shared_heads = heads;
        state.have_responded = true;
        state.their_capabilities = self.capabilities.map(|bits| {
            ALL_CAPABILITIES.into_iter().filter(|c| bits & capability_bit(c) != 0).collect()
        });
        state
    }
}

impl Offered {
    /// The state a fresh one (empty, or resumed from shared heads) becomes once it has sent
    /// our heads without changes and heard nothing: it holds nothing but both sets of heads
    /// and two flags.
    fn of(state: &sync::State) -> Option<Self> {
        let bare = state.have_responded
            && state.in_flight
            && !state.last_sent_heads.is_empty()
            && state.their_heads.is_none()
            && state.their_need.is_none()
            && state.their_have.is_none()
            && state.sent_hashes.is_empty()
            && state.their_capabilities.is_none()
            && !(state.read_only || state.peer_read_only || state.needs_reset);
        bare.then(|| Self {
            shared: state.shared_heads.as_slice().into(),
            sent: state.last_sent_heads.as_slice().into(),
        })
    }

    fn rebuilt(&self) -> sync::State {
        let mut state = sync::State::new();
        state.shared_heads = self.shared.to_vec();
        state.last_sent_heads = self.sent.to_vec();
        state.have_responded = true;
        state.in_flight = true;
        state
    }
}

const ALL_CAPABILITIES: [Capability; 3] =
    [Capability::MessageV1, Capability::MessageV2, Capability::SyncReset];

fn capability_bit(capability: &Capability) -> u8 {
    match capability {
        Capability::MessageV1 => 1,
        Capability::MessageV2 => 2,
        Capability::SyncReset => 4,
    }
}

fn same_heads(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    a.len() == b.len() && a.iter().all(|h| b.contains(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ReadDoc, ROOT};

    fn doc_id(n: u8) -> DocId {
        DocId::from_slice(&[n; 16]).unwrap()
    }

    fn doc_with(key: &str) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, key, 1).unwrap();
        tx.commit();
        doc
    }

    /// Runs the sync protocol between `a` (with its state for `b` kept in `states`) and `b`
    /// until neither side has anything to say; returns the messages `a` sent.
    fn sync_until_quiet(
        a: &mut Automerge,
        states: &mut SyncStates,
        doc_id: DocId,
        b: &mut Automerge,
        b_state: &mut sync::State,
    ) -> usize {
        let mut sent_by_a = 0;
        for _ in 0..20 {
            let from_a = a.generate_sync_message(states.live(doc_id));
            let from_b = b.generate_sync_message(b_state);
            if from_a.is_none() && from_b.is_none() {
                return sent_by_a;
            }
            if let Some(message) = from_a {
                sent_by_a += 1;
                b.receive_sync_message(b_state, message).unwrap();
            }
            if let Some(message) = from_b {
                a.receive_sync_message(states.live(doc_id), message).unwrap();
            }
        }
        panic!("sync did not go quiet");
    }

    #[test]
    fn a_state_settles_only_once_both_sides_hold_the_same_heads() {
        let doc_id = doc_id(1);
        let mut a = doc_with("a");
        let mut b = Automerge::new();
        let (mut states, mut b_state) = (SyncStates::default(), sync::State::new());
        let first = a.generate_sync_message(states.live(doc_id)).unwrap();
        assert!(states.compact(&doc_id, &a.get_heads()), "an unanswered offer");
        assert_eq!(states.their_heads(&doc_id), None, "the peer has said nothing yet");
        b.receive_sync_message(&mut b_state, first).unwrap();
        let answer = b.generate_sync_message(&mut b_state).unwrap();
        a.receive_sync_message(states.live(doc_id), answer).unwrap();
        assert!(!states.compact(&doc_id, &a.get_heads()), "the peer lacks our heads");
        assert_eq!((states.live_count(), states.compact_count()), (1, 0));
        sync_until_quiet(&mut a, &mut states, doc_id, &mut b, &mut b_state);
        assert_eq!(a.get_heads(), b.get_heads());
        assert!(states.compact(&doc_id, &a.get_heads()));
        assert_eq!((states.live_count(), states.compact_count()), (0, 1));
        assert_eq!(states.their_heads(&doc_id), Some(a.get_heads().as_slice()));
    }

    #[test]
    fn a_change_after_settling_reaches_the_peer_in_one_message() {
        let doc_id = doc_id(2);
        let mut a = doc_with("a");
        let mut b = Automerge::new();
        let (mut states, mut b_state) = (SyncStates::default(), sync::State::new());
        sync_until_quiet(&mut a, &mut states, doc_id, &mut b, &mut b_state);
        assert!(states.compact(&doc_id, &a.get_heads()));
        // Nothing new: the rebuilt state has nothing to say, as the settled one had not.
        assert!(a.generate_sync_message(states.live(doc_id)).is_none());
        assert!(states.compact(&doc_id, &a.get_heads()));

        let mut tx = a.transaction();
        tx.put(ROOT, "later", 2).unwrap();
        tx.commit();
        let message = a.generate_sync_message(states.live(doc_id)).unwrap();
        assert_eq!(message.changes.len(), 1, "the new change travels in the first message");
        b.receive_sync_message(&mut b_state, message).unwrap();
        assert_eq!(b.get_heads(), a.get_heads());
        assert_eq!(b.get(ROOT, "later").unwrap().and_then(|(v, _)| v.as_i64()), Some(2));
        sync_until_quiet(&mut a, &mut states, doc_id, &mut b, &mut b_state);
        assert!(states.compact(&doc_id, &a.get_heads()));
    }

    #[test]
    fn an_unanswered_offer_is_kept_as_its_heads_and_rebuilt_exactly() {
        let doc_id = doc_id(5);
        let mut a = doc_with("a");
        let mut states = SyncStates::default();
        let offer = a.generate_sync_message(states.live(doc_id)).unwrap();
        assert!(offer.changes.is_empty(), "a first message carries no changes");
        let before = states.live(doc_id).clone();
        assert!(states.compact(&doc_id, &a.get_heads()));
        assert_eq!((states.live_count(), states.compact_count()), (0, 1));
        assert_eq!(states.their_heads(&doc_id), None);
        assert_eq!(*states.live(doc_id), before);
        // Nothing new to say, as before.
        assert!(a.generate_sync_message(states.live(doc_id)).is_none());

        // An offer resumed from the heads both sides shared is kept whole too.
        let mut resumed = sync::State::new();
        resumed.shared_heads = a.get_heads();
        states.insert(doc_id, resumed);
        let mut tx = a.transaction();
        tx.put(ROOT, "later", 2).unwrap();
        tx.commit();
        assert!(a.generate_sync_message(states.live(doc_id)).unwrap().changes.is_empty());
        let before = states.live(doc_id).clone();
        assert!(states.compact(&doc_id, &a.get_heads()));
        assert_eq!(states.shared_heads(&doc_id), Some(before.shared_heads.as_slice()));
        assert_eq!(*states.live(doc_id), before);
    }

    #[test]
    fn a_settled_state_is_saved_as_its_shared_heads() {
        let doc_id = doc_id(3);
        let mut a = doc_with("a");
        let mut b = Automerge::new();
        let (mut states, mut b_state) = (SyncStates::default(), sync::State::new());
        sync_until_quiet(&mut a, &mut states, doc_id, &mut b, &mut b_state);
        assert!(states.compact(&doc_id, &a.get_heads()));
        states.insert(DocId::from_slice(&[4; 16]).unwrap(), sync::State::new());
        let saved: Vec<_> = states.into_encoded().collect();
        assert_eq!(saved.len(), 1, "a state that shares nothing is not saved");
        let decoded = sync::State::decode(&saved[0].1).unwrap();
        assert_eq!(decoded.shared_heads, a.get_heads());
    }
}
