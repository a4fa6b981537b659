//! Range-based set reconciliation: two peers find which documents they hold differently
//! without listing every document.
//!
//! Each side's set holds one [`Item`] per document, `(doc id, heads digest)`, ordered by id.
//! A [`RangeSummary`] condenses the items of a half-open id range into a count and a
//! [`Fingerprint`]: the wrapping sum of a hash of each item, so equal sets have equal
//! summaries whatever order they were built in, and a persisted store can keep sums per
//! subtree and update them on insert and removal.
//!
//! # The exchange
//!
//! The initiator sends the summary of its whole set ([`Reconciler::initiate`]). A side that
//! receives a [`RangePart::Fingerprint`] compares it with its own summary of that range:
//!
//! - equal: the range is settled and nothing is sent;
//! - the peer holds nothing there: it sends all of its items in the range, and already knows
//!   that each of them is missing on the other side;
//! - it holds at most [`ReconcileConfig::leaf_items`] items there: it sends them, asking for
//!   the peer's items in return;
//! - otherwise it splits the range at its own item boundaries into
//!   [`ReconcileConfig::split_factor`] sub-ranges and sends the summary of each.
//!
//! A side that receives a [`RangePart::Items`] compares them with its own items in that range,
//! which yields every [`Difference`] there, and if the peer asked for a reply and anything
//! differs it sends its own items so that the peer finds the same differences. The range is
//! then settled on both sides. Each round trip narrows a differing range by `split_factor`, so
//! k differences among N documents take O(log N) rounds, and bytes in proportion to k: a few
//! hundred bytes per difference for each level of splitting (three for ten thousand
//! documents).
//!
//! # Turns and the end of a session
//!
//! A side answers every non-empty message, with an empty message if it has nothing to say; it
//! answers an empty message only if it still holds parts that did not fit in its previous
//! message. The session is over when [`Reconciler::handle`] returns no reply. Equal sets
//! therefore settle in one round trip: a summary out, an empty message back.
//!
//! One side initiates each session. The ranges in flight in a session never overlap, and a
//! message that breaks this, or any of the limits below, is refused with a [`ReconcileError`]
//! before anything is answered.
//!
//! # Limits
//!
//! A message holds at most [`MAX_PARTS_PER_MESSAGE`] parts and [`MAX_ITEMS_PER_MESSAGE`]
//! items, with at most [`MAX_ITEMS_PER_PART`] items in one part; encoded, that is well under
//! [`crate::config::SyncConfig::MIN_FRAME_BYTES`]. Answers that do not fit wait in the
//! reconciler and go out with its next messages, so the parts a side holds back are bounded
//! by the size of its own set.
//!
//! Fingerprints catch accidental differences: two different sets of the same size collide
//! with probability about 2^-128. They are not a defence against a party that crafts
//! documents so that two different sets sum to the same fingerprint; a difference hidden that
//! way stays hidden until one of the sets changes.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::ids::DocId;
use crate::message::HeadsDigest;

/// Most range parts in one message.
pub const MAX_PARTS_PER_MESSAGE: usize = 1024;

/// Most items in one range part.
pub const MAX_ITEMS_PER_PART: usize = 1024;

/// Most items in one message, over all of its parts.
pub const MAX_ITEMS_PER_MESSAGE: usize = 4096;

/// One element of a reconciled set: a document and the digest of its heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    /// The document.
    pub doc_id: DocId,
    /// Digest of the holder's current heads of that document.
    pub heads_digest: HeadsDigest,
}

/// Where an id range ends: before an id (exclusive), or past every id.
///
/// `Before` sorts below `Unbounded`, and two `Before` bounds sort by their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum UpperBound {
    /// The range holds ids strictly below this one.
    Before(DocId),
    /// The range runs past the largest id.
    Unbounded,
}

impl UpperBound {
    /// Whether `id` lies below this bound.
    pub fn is_above(&self, id: &DocId) -> bool {
        match self {
            UpperBound::Before(upper) => id < upper,
            UpperBound::Unbounded => true,
        }
    }

    fn as_bound(&self) -> Bound<DocId> {
        match self {
            UpperBound::Before(upper) => Bound::Excluded(*upper),
            UpperBound::Unbounded => Bound::Unbounded,
        }
    }
}

/// A half-open range of document ids, `[lower, upper)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdRange {
    /// Where the range starts (inclusive).
    pub lower: DocId,
    /// Where the range ends.
    pub upper: UpperBound,
}

impl IdRange {
    /// The range of every document id.
    pub fn full() -> Self {
        Self { lower: smallest_doc_id(), upper: UpperBound::Unbounded }
    }

    /// Whether `id` lies in the range.
    pub fn contains(&self, id: &DocId) -> bool {
        *id >= self.lower && self.upper.is_above(id)
    }

    /// Whether no id can lie in the range, because `lower` is not below `upper`.
    pub fn is_empty(&self) -> bool {
        !self.upper.is_above(&self.lower)
    }

    /// The range as bounds for ordered collections. Only meaningful when not empty.
    pub fn bounds(&self) -> (Bound<DocId>, Bound<DocId>) {
        (Bound::Included(self.lower), self.upper.as_bound())
    }
}

/// The smallest document id, sixteen zero bytes: every id is at or above it.
fn smallest_doc_id() -> DocId {
    match DocId::from_slice(&[0; 16]) {
        Ok(id) => id,
        Err(_) => unreachable!("sixteen bytes always make a document id"),
    }
}

/// A summary of a set of items that does not depend on their order.
///
/// The wrapping sum, modulo 2^128, of the first 16 bytes of SHA-256 over each item's 48 bytes
/// (id, then heads digest). A sum rather than XOR, because under XOR colliding sets are found
/// by solving linear equations; like XOR it has an inverse, [`Fingerprint::remove`], which a
/// store that keeps aggregates uses when a document changes or goes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint of the empty set.
    pub const EMPTY: Self = Self([0; 16]);

    /// The fingerprint of a set holding only `item`.
    pub fn of_item(item: &Item) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(item.doc_id.as_bytes());
        hasher.update(item.heads_digest);
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        for (byte, digest_byte) in bytes.iter_mut().zip(digest.iter()) {
            *byte = *digest_byte;
        }
        Self(bytes)
    }

    /// The fingerprint of the union of two disjoint sets.
    pub fn combine(self, other: Self) -> Self {
        Self::from_sum(self.as_sum().wrapping_add(other.as_sum()))
    }

    /// The fingerprint of this set without `other`, a subset of it.
    pub fn remove(self, other: Self) -> Self {
        Self::from_sum(self.as_sum().wrapping_sub(other.as_sum()))
    }

    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    fn as_sum(self) -> u128 {
        u128::from_le_bytes(self.0)
    }

    fn from_sum(sum: u128) -> Self {
        Self(sum.to_le_bytes())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        f.write_str(")")
    }
}

/// What a side holds in a range: how many items, and their fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RangeSummary {
    /// Fingerprint of the items in the range.
    pub fingerprint: Fingerprint,
    /// How many items the range holds.
    pub count: u64,
}

impl RangeSummary {
    /// The summary of an empty range.
    pub const EMPTY: Self = Self { fingerprint: Fingerprint::EMPTY, count: 0 };

    /// Adds one item's fingerprint to the summary.
    pub fn add(&mut self, item_fingerprint: Fingerprint) {
        self.fingerprint = self.fingerprint.combine(item_fingerprint);
        self.count += 1;
    }
}

/// One range in a message: either a summary of it or the sender's items in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangePart {
    /// "Here is my summary of this range."
    Fingerprint {
        /// The range summarized.
        range: IdRange,
        /// Fingerprint of the sender's items in the range.
        fingerprint: Fingerprint,
        /// How many items the sender holds in the range; zero tells the receiver that all of
        /// its own items there are missing on the sender.
        count: u64,
    },
    /// "Here are all my items in this range."
    Items {
        /// The range listed.
        range: IdRange,
        /// Every item the sender holds in the range, in ascending id order.
        items: Vec<Item>,
        /// Whether the receiver should answer with its own items in the range if they differ.
        reply_wanted: bool,
    },
}

impl RangePart {
    /// The range this part covers.
    pub fn range(&self) -> &IdRange {
        match self {
            RangePart::Fingerprint { range, .. } | RangePart::Items { range, .. } => range,
        }
    }

    /// How many items this part carries.
    pub fn item_count(&self) -> usize {
        match self {
            RangePart::Fingerprint { .. } => 0,
            RangePart::Items { items, .. } => items.len(),
        }
    }
}

/// One message of a reconciliation session: ranges in ascending, non-overlapping order.
///
/// On the wire a part's lower bound is left out when it equals the upper bound of the part
/// before it (or, for the first part, the smallest id), as it does for every sub-range of a
/// split: that saves a third of a summary's bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileMessage {
    /// At most [`MAX_PARTS_PER_MESSAGE`] parts.
    pub ranges: Vec<RangePart>,
}

impl ReconcileMessage {
    /// Checks a message from a peer against the limits and the ordering rules.
    pub fn validate(&self) -> Result<(), ReconcileError> {
        if self.ranges.len() > MAX_PARTS_PER_MESSAGE {
            return Err(ReconcileError::TooManyParts { parts: self.ranges.len() });
        }
        let mut total_items = 0usize;
        let mut previous: Option<&IdRange> = None;
        for (index, part) in self.ranges.iter().enumerate() {
            let range = part.range();
            if range.is_empty() {
                return Err(ReconcileError::EmptyRange { index });
            }
            if let Some(previous) = previous {
                check_follows(previous, range, index)?;
            }
            if let RangePart::Items { items, .. } = part {
                check_items(range, items, index)?;
                total_items += items.len();
            }
            previous = Some(range);
        }
        if total_items > MAX_ITEMS_PER_MESSAGE {
            return Err(ReconcileError::TooManyItems { items: total_items });
        }
        Ok(())
    }
}

/// A part as it is encoded, borrowing from the message.
#[derive(Serialize)]
enum WirePartRef<'a> {
    Fingerprint {
        lower: Option<&'a DocId>,
        upper: &'a UpperBound,
        fingerprint: &'a Fingerprint,
        count: u64,
    },
    Items {
        lower: Option<&'a DocId>,
        upper: &'a UpperBound,
        items: &'a [Item],
        reply_wanted: bool,
    },
}

/// A part as it is decoded; the same variants, in the same order, as [`WirePartRef`].
#[derive(Deserialize)]
enum WirePart {
    Fingerprint { lower: Option<DocId>, upper: UpperBound, fingerprint: Fingerprint, count: u64 },
    Items { lower: Option<DocId>, upper: UpperBound, items: Vec<Item>, reply_wanted: bool },
}

/// Where a part starts when its lower bound is left out: where the part before it ends.
fn implied_lower(previous_upper: Option<UpperBound>) -> DocId {
    match previous_upper {
        Some(UpperBound::Before(id)) => id,
        // After an unbounded part nothing may follow; the smallest id makes
        // [`ReconcileMessage::validate`] refuse the part as out of order or overlapping.
        Some(UpperBound::Unbounded) | None => smallest_doc_id(),
    }
}

impl Serialize for ReconcileMessage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut previous_upper = None;
        serializer.collect_seq(self.ranges.iter().map(|part| {
            let range = part.range();
            let lower = (range.lower != implied_lower(previous_upper)).then_some(&range.lower);
            previous_upper = Some(range.upper);
            match part {
                RangePart::Fingerprint { range, fingerprint, count } => WirePartRef::Fingerprint {
                    lower,
                    upper: &range.upper,
                    fingerprint,
                    count: *count,
                },
                RangePart::Items { range, items, reply_wanted } => WirePartRef::Items {
                    lower,
                    upper: &range.upper,
                    items,
                    reply_wanted: *reply_wanted,
                },
            }
        }))
    }
}

impl<'de> Deserialize<'de> for ReconcileMessage {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Vec::<WirePart>::deserialize(deserializer)?;
        let mut previous_upper = None;
        let mut ranges = Vec::with_capacity(wire.len());
        for part in wire {
            let (lower, upper) = match &part {
                WirePart::Fingerprint { lower, upper, .. }
                | WirePart::Items { lower, upper, .. } => (*lower, *upper),
            };
            let range =
                IdRange { lower: lower.unwrap_or_else(|| implied_lower(previous_upper)), upper };
            previous_upper = Some(upper);
            ranges.push(match part {
                WirePart::Fingerprint { fingerprint, count, .. } => {
                    RangePart::Fingerprint { range, fingerprint, count }
                }
                WirePart::Items { items, reply_wanted, .. } => {
                    RangePart::Items { range, items, reply_wanted }
                }
            });
        }
        Ok(Self { ranges })
    }
}

/// Part `index` (`range`) must start at or after the end of the part before it.
fn check_follows(previous: &IdRange, range: &IdRange, index: usize) -> Result<(), ReconcileError> {
    if range.lower < previous.lower {
        return Err(ReconcileError::OutOfOrder { index });
    }
    if previous.upper.is_above(&range.lower) {
        return Err(ReconcileError::Overlapping { index });
    }
    Ok(())
}

/// The items of part `index` must be few enough, strictly ascending and inside `range`.
fn check_items(range: &IdRange, items: &[Item], index: usize) -> Result<(), ReconcileError> {
    if items.len() > MAX_ITEMS_PER_PART {
        return Err(ReconcileError::TooManyItemsInPart { index, items: items.len() });
    }
    if items.windows(2).any(|pair| pair[0].doc_id >= pair[1].doc_id) {
        return Err(ReconcileError::ItemsOutOfOrder { index });
    }
    // Ascending order makes the first and the last item the only ones that can stray out.
    let mut strays = items.first().into_iter().chain(items.last());
    if strays.any(|item| !range.contains(&item.doc_id)) {
        return Err(ReconcileError::ItemOutsideRange { index });
    }
    Ok(())
}

/// Why a message from a peer is refused. Nothing in it has been answered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReconcileError {
    /// More parts than [`MAX_PARTS_PER_MESSAGE`].
    #[error("message has {parts} range parts, at most {MAX_PARTS_PER_MESSAGE} are allowed")]
    TooManyParts {
        /// Parts in the message.
        parts: usize,
    },
    /// More items in one part than [`MAX_ITEMS_PER_PART`].
    #[error("range part {index} lists {items} items, at most {MAX_ITEMS_PER_PART} are allowed")]
    TooManyItemsInPart {
        /// Position of the part in the message.
        index: usize,
        /// Items in the part.
        items: usize,
    },
    /// More items in the message than [`MAX_ITEMS_PER_MESSAGE`].
    #[error("message lists {items} items, at most {MAX_ITEMS_PER_MESSAGE} are allowed")]
    TooManyItems {
        /// Items in the message.
        items: usize,
    },
    /// A range whose lower bound is not below its upper bound.
    #[error("range part {index} is empty: its lower bound is not below its upper bound")]
    EmptyRange {
        /// Position of the part in the message.
        index: usize,
    },
    /// A range that starts below the range before it.
    #[error("range part {index} starts below the part before it")]
    OutOfOrder {
        /// Position of the part in the message.
        index: usize,
    },
    /// A range that starts inside the range before it.
    #[error("range part {index} overlaps the part before it")]
    Overlapping {
        /// Position of the part in the message.
        index: usize,
    },
    /// A range that overlaps one this side has answered but not yet sent.
    #[error("range part {index} overlaps a range still in flight")]
    OverlapsPending {
        /// Position of the part in the message.
        index: usize,
    },
    /// Items not in strictly ascending id order (or a repeated id).
    #[error("items of range part {index} are not in strictly ascending id order")]
    ItemsOutOfOrder {
        /// Position of the part in the message.
        index: usize,
    },
    /// An item whose id lies outside its part's range.
    #[error("range part {index} lists an item outside its range")]
    ItemOutsideRange {
        /// Position of the part in the message.
        index: usize,
    },
}

/// A document the two sides hold differently, from the point of view of the side reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Difference {
    /// Only this side holds the document.
    OnlyHere(DocId),
    /// Only the peer holds the document.
    OnlyThere(DocId),
    /// Both hold the document, with different heads.
    Differs(DocId),
}

impl Difference {
    /// The document concerned.
    pub fn doc_id(&self) -> DocId {
        match self {
            Difference::OnlyHere(id) | Difference::OnlyThere(id) | Difference::Differs(id) => *id,
        }
    }
}

/// Read access to one side's set, without loading documents.
///
/// Ranges passed in are never empty. [`MemoryStore`] answers in time proportional to the
/// range; a persisted store would keep a count and a fingerprint per subtree of its
/// index (updated with [`Fingerprint::combine`] and [`Fingerprint::remove`]) so that both
/// summaries and ranks cost O(log N).
pub trait ReconcileStore {
    /// Summary of the items whose ids lie in `range`.
    fn fingerprint(&self, range: &IdRange) -> RangeSummary;

    /// The first `limit` items in `range`, in ascending id order.
    fn items(&self, range: &IdRange, limit: usize) -> Vec<Item>;

    /// The ids at the given 0-based positions within `range`, in the order given.
    /// `ranks` is strictly ascending; positions past the end are left out.
    fn ids_at_ranks(&self, range: &IdRange, ranks: &[u64]) -> Vec<DocId> {
        let Some(&last) = ranks.last() else {
            return Vec::new();
        };
        let limit = usize::try_from(last).map_or(usize::MAX, |last| last.saturating_add(1));
        let items = self.items(range, limit);
        ranks
            .iter()
            .filter_map(|&rank| usize::try_from(rank).ok().and_then(|rank| items.get(rank)))
            .map(|item| item.doc_id)
            .collect()
    }
}

impl<S: ReconcileStore + ?Sized> ReconcileStore for &S {
    fn fingerprint(&self, range: &IdRange) -> RangeSummary {
        (**self).fingerprint(range)
    }

    fn items(&self, range: &IdRange, limit: usize) -> Vec<Item> {
        (**self).items(range, limit)
    }

    fn ids_at_ranks(&self, range: &IdRange, ranks: &[u64]) -> Vec<DocId> {
        (**self).ids_at_ranks(range, ranks)
    }
}

/// A set held in memory, with each item's fingerprint computed once on insert.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStore {
    entries: BTreeMap<DocId, (HeadsDigest, Fingerprint)>,
}

impl MemoryStore {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a document's digest; returns the digest it replaced.
    pub fn insert(&mut self, doc_id: DocId, heads_digest: HeadsDigest) -> Option<HeadsDigest> {
        let fingerprint = Fingerprint::of_item(&Item { doc_id, heads_digest });
        self.entries.insert(doc_id, (heads_digest, fingerprint)).map(|(digest, _)| digest)
    }

    /// Removes a document; returns its digest.
    pub fn remove(&mut self, doc_id: &DocId) -> Option<HeadsDigest> {
        self.entries.remove(doc_id).map(|(digest, _)| digest)
    }

    /// A document's digest.
    pub fn get(&self, doc_id: &DocId) -> Option<&HeadsDigest> {
        self.entries.get(doc_id).map(|(digest, _)| digest)
    }

    /// How many documents the set holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set holds no document.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every item, in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = Item> + '_ {
        self.entries.iter().map(|(doc_id, (heads_digest, _))| Item {
            doc_id: *doc_id,
            heads_digest: *heads_digest,
        })
    }

    fn entries_in<'a>(
        &'a self,
        range: &IdRange,
    ) -> impl Iterator<Item = (&'a DocId, &'a (HeadsDigest, Fingerprint))> + 'a {
        // `BTreeMap::range` panics on an inverted range, and an empty one holds nothing.
        let entries = (!range.is_empty()).then(|| self.entries.range(range.bounds()));
        entries.into_iter().flatten()
    }
}

impl FromIterator<Item> for MemoryStore {
    /// Builds the set in one pass (a later item replaces an earlier one with the same id):
    /// much faster than inserting one by one when the items come in id order, as an index
    /// scan returns them.
    fn from_iter<T: IntoIterator<Item = Item>>(items: T) -> Self {
        let mut builder = MemoryStoreBuilder::new();
        items.into_iter().for_each(|item| builder.push(item));
        builder.finish()
    }
}

/// A [`MemoryStore`] built from items pushed as they arrive, each fingerprinted on push; the
/// ordered map is made once, in [`MemoryStoreBuilder::finish`], which costs little when the
/// items came in id order, as an index scan returns them.
#[derive(Debug, Clone, Default)]
pub struct MemoryStoreBuilder {
    entries: Vec<(DocId, (HeadsDigest, Fingerprint))>,
}

impl MemoryStoreBuilder {
    /// A builder holding no item.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an item; a later item replaces an earlier one with the same id.
    pub fn push(&mut self, item: Item) {
        self.entries.push((item.doc_id, (item.heads_digest, Fingerprint::of_item(&item))));
    }

    /// How many items were pushed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no item was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The set of the items pushed.
    pub fn finish(self) -> MemoryStore {
        MemoryStore { entries: self.entries.into_iter().collect() }
    }
}

impl ReconcileStore for MemoryStore {
    fn fingerprint(&self, range: &IdRange) -> RangeSummary {
        let mut summary = RangeSummary::EMPTY;
        for (_, (_, fingerprint)) in self.entries_in(range) {
            summary.add(*fingerprint);
        }
        summary
    }

    fn items(&self, range: &IdRange, limit: usize) -> Vec<Item> {
        self.entries_in(range)
            .take(limit)
            .map(|(doc_id, (heads_digest, _))| Item {
                doc_id: *doc_id,
                heads_digest: *heads_digest,
            })
            .collect()
    }

    fn ids_at_ranks(&self, range: &IdRange, ranks: &[u64]) -> Vec<DocId> {
        let mut wanted = ranks.iter().peekable();
        let mut ids = Vec::with_capacity(ranks.len());
        for (position, (doc_id, _)) in (0u64..).zip(self.entries_in(range)) {
            let Some(&&rank) = wanted.peek() else { break };
            if rank == position {
                ids.push(*doc_id);
                wanted.next();
            }
        }
        ids
    }
}

/// How a side splits and lists ranges, and how much it puts in one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Into how many sub-ranges a differing range is split (2 to [`MAX_PARTS_PER_MESSAGE`]).
    pub split_factor: usize,
    /// A differing range holding at most this many local items is listed rather than split
    /// (1 to `items_per_part`).
    pub leaf_items: usize,
    /// Most parts this side puts in one message (1 to [`MAX_PARTS_PER_MESSAGE`]).
    pub parts_per_message: usize,
    /// Most items this side puts in one part (1 to [`MAX_ITEMS_PER_PART`]).
    pub items_per_part: usize,
    /// Most items this side puts in one message (`items_per_part` to
    /// [`MAX_ITEMS_PER_MESSAGE`]).
    pub items_per_message: usize,
}

impl Default for ReconcileConfig {
    /// Sixteen-way splits and leaves of sixteen items: a few hundred bytes per level per
    /// differing range, and three or four levels for ten thousand documents.
    fn default() -> Self {
        Self {
            split_factor: 16,
            leaf_items: 16,
            parts_per_message: MAX_PARTS_PER_MESSAGE,
            items_per_part: MAX_ITEMS_PER_PART,
            items_per_message: MAX_ITEMS_PER_MESSAGE,
        }
    }
}

impl ReconcileConfig {
    /// Checks every knob against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            ((2..=MAX_PARTS_PER_MESSAGE).contains(&self.split_factor), "split_factor"),
            ((1..=self.items_per_part).contains(&self.leaf_items), "leaf_items"),
            ((1..=MAX_PARTS_PER_MESSAGE).contains(&self.parts_per_message), "parts_per_message"),
            ((1..=MAX_ITEMS_PER_PART).contains(&self.items_per_part), "items_per_part"),
            (
                (self.items_per_part..=MAX_ITEMS_PER_MESSAGE).contains(&self.items_per_message),
                "items_per_message",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, knob)) => Err(ConfigError(format!("reconciliation {knob} is out of range"))),
            None => Ok(()),
        }
    }
}

/// A session between messages: the answers that did not fit in the last one.
#[derive(Debug, Default)]
pub struct SuspendedSession {
    pending: BTreeMap<DocId, RangePart>,
}

impl SuspendedSession {
    /// Whether answers are waiting for a later message.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// One side of one reconciliation session: a state machine from messages to messages.
///
/// It reads `store` when a message arrives and holds only the answers that did not fit in
/// its last message. The set should not change during a session; a change made meanwhile
/// may be missed, and is found by the next session.
#[derive(Debug)]
pub struct Reconciler<S> {
    store: S,
    config: ReconcileConfig,
    /// Answers not yet sent, keyed by the lower bound of their range (they never overlap).
    pending: BTreeMap<DocId, RangePart>,
}

impl<S: ReconcileStore> Reconciler<S> {
    /// A session over `store` (which may be a reference).
    pub fn new(store: S, config: ReconcileConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { store, config, pending: BTreeMap::new() })
    }

    /// The first message of a session: the summary of the whole set. Forgets any earlier
    /// session's unsent answers.
    pub fn initiate(&mut self) -> ReconcileMessage {
        self.pending.clear();
        ReconcileMessage { ranges: vec![self.summary_part(IdRange::full())] }
    }

    /// Answers a message from the peer.
    ///
    /// Returns the reply to send, if any, and the differences this message revealed. `None`
    /// ends the session. Each difference is reported once per session, by each side.
    pub fn handle(
        &mut self,
        message: &ReconcileMessage,
    ) -> Result<(Option<ReconcileMessage>, Vec<Difference>), ReconcileError> {
        message.validate()?;
        self.check_clear_of_pending(message)?;
        let mut differences = Vec::new();
        for part in &message.ranges {
            match part {
                RangePart::Fingerprint { range, fingerprint, count } => {
                    let theirs = RangeSummary { fingerprint: *fingerprint, count: *count };
                    self.answer_summary(range, theirs, &mut differences);
                }
                RangePart::Items { range, items, reply_wanted } => {
                    self.answer_items(range, items, *reply_wanted, &mut differences);
                }
            }
        }
        let must_reply = !message.ranges.is_empty() || !self.pending.is_empty();
        let reply = must_reply.then(|| self.next_message());
        Ok((reply, differences))
    }

    /// Whether answers are waiting for a later message.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The store this session reads.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Ends the session and gives the store back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Sets the session aside, keeping only its unsent answers, so that the store can be
    /// borrowed again (and change) before the next message; [`Reconciler::resume`] takes it
    /// up with the store as it is then.
    pub fn suspend(self) -> SuspendedSession {
        SuspendedSession { pending: self.pending }
    }

    /// Takes up a session set aside by [`Reconciler::suspend`].
    pub fn resume(
        store: S,
        config: ReconcileConfig,
        session: SuspendedSession,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { store, config, pending: session.pending })
    }

    /// A peer's range must not overlap one this side has answered and not yet sent: the two
    /// answers would cover the same ids.
    fn check_clear_of_pending(&self, message: &ReconcileMessage) -> Result<(), ReconcileError> {
        for (index, part) in message.ranges.iter().enumerate() {
            let range = part.range();
            // Pending ranges are disjoint, so only the last one starting below `range.upper`
            // can reach into `range`.
            let nearest = match range.upper {
                UpperBound::Before(upper) => self.pending.range(..upper).next_back(),
                UpperBound::Unbounded => self.pending.iter().next_back(),
            };
            if nearest.is_some_and(|(_, pending)| pending.range().upper.is_above(&range.lower)) {
                return Err(ReconcileError::OverlapsPending { index });
            }
        }
        Ok(())
    }

    fn answer_summary(
        &mut self,
        range: &IdRange,
        theirs: RangeSummary,
        differences: &mut Vec<Difference>,
    ) {
        let ours = self.store.fingerprint(range);
        if ours == theirs {
            return;
        }
        if theirs.count == 0 {
            // The peer holds nothing here: everything we hold is missing there, and the peer
            // has nothing to send back.
            let items = self.store.items(range, usize::MAX);
            differences.extend(items.iter().map(|item| Difference::OnlyHere(item.doc_id)));
            self.queue_items(range, items, false);
        } else if ours.count <= self.config.leaf_items as u64 {
            let items = self.store.items(range, self.config.leaf_items);
            self.queue(RangePart::Items { range: *range, items, reply_wanted: true });
        } else {
            self.queue_split(range, ours.count);
        }
    }

    fn answer_items(
        &mut self,
        range: &IdRange,
        theirs: &[Item],
        reply_wanted: bool,
        differences: &mut Vec<Difference>,
    ) {
        let ours = self.store.items(range, usize::MAX);
        let found = compare_items(&ours, theirs);
        // Equal lists need no reply: the peer finds no difference without one.
        if reply_wanted && !found.is_empty() {
            self.queue_items(range, ours, false);
        }
        differences.extend(found);
    }

    /// Queues `items`, all of ours in `range`, as consecutive parts that cover `range`
    /// exactly; an empty list still makes one part, which tells the peer we hold nothing.
    fn queue_items(&mut self, range: &IdRange, items: Vec<Item>, reply_wanted: bool) {
        let chunks: Vec<&[Item]> = items.chunks(self.config.items_per_part).collect();
        if chunks.is_empty() {
            self.queue(RangePart::Items { range: *range, items: Vec::new(), reply_wanted });
            return;
        }
        let mut lower = range.lower;
        for (position, chunk) in chunks.iter().enumerate() {
            let next_first = chunks.get(position + 1).and_then(|next| next.first());
            let upper = next_first.map_or(range.upper, |item| UpperBound::Before(item.doc_id));
            let part_range = IdRange { lower, upper };
            self.queue(RangePart::Items { range: part_range, items: chunk.to_vec(), reply_wanted });
            if let Some(item) = next_first {
                lower = item.doc_id;
            }
        }
    }

    /// Splits `range`, holding `count` of our items, at item boundaries into sub-ranges that
    /// each hold at least one of our items, and queues a summary of each.
    fn queue_split(&mut self, range: &IdRange, count: u64) {
        let boundaries =
            self.store.ids_at_ranks(range, &split_ranks(count, self.config.split_factor));
        let mut lower = range.lower;
        for boundary in boundaries {
            // A consistent store gives ascending ids inside the range; anything else is
            // skipped rather than turned into an invalid range.
            if boundary <= lower || !range.contains(&boundary) {
                continue;
            }
            let part = self.summary_part(IdRange { lower, upper: UpperBound::Before(boundary) });
            self.queue(part);
            lower = boundary;
        }
        let last = self.summary_part(IdRange { lower, upper: range.upper });
        self.queue(last);
    }

    fn summary_part(&self, range: IdRange) -> RangePart {
        let summary = self.store.fingerprint(&range);
        RangePart::Fingerprint { range, fingerprint: summary.fingerprint, count: summary.count }
    }

    fn queue(&mut self, part: RangePart) {
        self.pending.insert(part.range().lower, part);
    }

    /// Takes the lowest pending parts that fit in one message.
    fn next_message(&mut self) -> ReconcileMessage {
        let mut ranges = Vec::new();
        let mut items = 0usize;
        while ranges.len() < self.config.parts_per_message {
            let Some(entry) = self.pending.first_entry() else { break };
            let part_items = entry.get().item_count();
            if items + part_items > self.config.items_per_message {
                break;
            }
            items += part_items;
            ranges.push(entry.remove());
        }
        ReconcileMessage { ranges }
    }
}

/// The positions (0-based, strictly ascending, each in `1..count`) at which `count` items are
/// cut into at most `split_factor` nearly equal runs. With `count >= 2` there is at least one.
fn split_ranks(count: u64, split_factor: usize) -> Vec<u64> {
    let parts = split_factor as u128;
    let mut ranks: Vec<u64> = (1..parts)
        .filter_map(|cut| u64::try_from(cut * u128::from(count) / parts).ok())
        .filter(|&rank| rank > 0 && rank < count)
        .collect();
    ranks.dedup();
    ranks
}

/// Every difference between two ascending item lists for the same range, seen from `ours`.
fn compare_items(ours: &[Item], theirs: &[Item]) -> Vec<Difference> {
    let mut found = Vec::new();
    let (mut ours, mut theirs) = (ours.iter().peekable(), theirs.iter().peekable());
    loop {
        let difference = match (ours.peek().copied(), theirs.peek().copied()) {
            (None, None) => break,
            (Some(mine), None) => {
                ours.next();
                Difference::OnlyHere(mine.doc_id)
            }
            (None, Some(peer)) => {
                theirs.next();
                Difference::OnlyThere(peer.doc_id)
            }
            (Some(mine), Some(peer)) if mine.doc_id < peer.doc_id => {
                ours.next();
                Difference::OnlyHere(mine.doc_id)
            }
            (Some(mine), Some(peer)) if mine.doc_id > peer.doc_id => {
                theirs.next();
                Difference::OnlyThere(peer.doc_id)
            }
            (Some(mine), Some(peer)) => {
                ours.next();
                theirs.next();
                if mine.heads_digest == peer.heads_digest {
                    continue;
                }
                Difference::Differs(mine.doc_id)
            }
        };
        found.push(difference);
    }
    found
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::SyncConfig;

    /// An id that sorts by `n`; `id(0)` is the smallest id there is.
    fn id(n: u32) -> DocId {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        DocId::from_slice(&bytes).unwrap()
    }

    fn item(n: u32, digest: u8) -> Item {
        Item { doc_id: id(n), heads_digest: [digest; 32] }
    }

    fn range(lower: u32, upper: Option<u32>) -> IdRange {
        IdRange {
            lower: id(lower),
            upper: upper.map_or(UpperBound::Unbounded, |u| UpperBound::Before(id(u))),
        }
    }

    /// What one session cost and what each side found.
    #[derive(Debug, Default)]
    struct Session {
        messages: usize,
        /// Encoded bytes sent by the initiator, then by the responder.
        bytes: [usize; 2],
        /// Differences found by the initiator, then by the responder.
        found: [Vec<Difference>; 2],
    }

    impl Session {
        fn round_trips(&self) -> usize {
            self.messages.div_ceil(2)
        }
    }

    /// Runs two reconcilers against each other until one of them has nothing to send,
    /// carrying every message through postcard as the wire would.
    fn run_session(
        initiator: &MemoryStore,
        responder: &MemoryStore,
        configs: [ReconcileConfig; 2],
    ) -> Session {
        let mut sides = [
            Reconciler::new(initiator, configs[0]).unwrap(),
            Reconciler::new(responder, configs[1]).unwrap(),
        ];
        let mut session = Session::default();
        let mut message = sides[0].initiate();
        let mut sender = 0;
        loop {
            let wire = postcard::to_allocvec(&message).unwrap();
            let decoded: ReconcileMessage = postcard::from_bytes(&wire).unwrap();
            assert_eq!(decoded, message);
            session.messages += 1;
            session.bytes[sender] += wire.len();
            let receiver = 1 - sender;
            let (reply, found) = sides[receiver].handle(&decoded).unwrap();
            session.found[receiver].extend(found);
            let Some(reply) = reply else { break };
            message = reply;
            sender = receiver;
            assert!(session.messages < 100_000, "the session does not end");
        }
        assert!(!sides[0].has_pending() && !sides[1].has_pending());
        session
    }

    fn default_session(initiator: &MemoryStore, responder: &MemoryStore) -> Session {
        run_session(initiator, responder, [ReconcileConfig::default(); 2])
    }

    /// The symmetric difference seen from `here`, sorted.
    fn expected(here: &MemoryStore, there: &MemoryStore) -> Vec<Difference> {
        let mut expected: Vec<Difference> = here
            .iter()
            .filter_map(|mine| match there.get(&mine.doc_id) {
                None => Some(Difference::OnlyHere(mine.doc_id)),
                Some(digest) if *digest != mine.heads_digest => {
                    Some(Difference::Differs(mine.doc_id))
                }
                Some(_) => None,
            })
            .collect();
        expected.extend(
            there
                .iter()
                .filter(|peer| here.get(&peer.doc_id).is_none())
                .map(|peer| Difference::OnlyThere(peer.doc_id)),
        );
        expected.sort();
        expected
    }

    /// Both sides found exactly the symmetric difference, each difference once.
    fn assert_exact(initiator: &MemoryStore, responder: &MemoryStore, session: &Session) {
        let mut found = session.found.clone();
        for list in &mut found {
            list.sort();
        }
        assert_eq!(found[0], expected(initiator, responder), "initiator's differences");
        assert_eq!(found[1], expected(responder, initiator), "responder's differences");
    }

    fn random_store(count: usize, rng: &mut StdRng) -> MemoryStore {
        (0..count).map(|_| Item { doc_id: DocId::random(rng), heads_digest: rng.gen() }).collect()
    }

    /// A copy of `store` with `k` documents' digests changed.
    fn with_changed_digests(store: &MemoryStore, k: usize, rng: &mut StdRng) -> MemoryStore {
        let ids: Vec<DocId> = store.iter().map(|item| item.doc_id).collect();
        let mut changed = store.clone();
        for index in rand::seq::index::sample(rng, ids.len(), k) {
            changed.insert(ids[index], rng.gen());
        }
        changed
    }

    fn measure(n: usize, k: usize, seed: u64) -> Session {
        let mut rng = StdRng::seed_from_u64(seed);
        let a = random_store(n, &mut rng);
        let b = with_changed_digests(&a, k, &mut rng);
        let session = default_session(&a, &b);
        assert_eq!(session.found[0].len(), k);
        assert_exact(&a, &b, &session);
        session
    }

    #[test]
    fn fingerprints_ignore_order_and_can_take_items_out() {
        let items: Vec<Item> = (0..20).map(|n| item(n, n as u8)).collect();
        let forward =
            items.iter().fold(Fingerprint::EMPTY, |sum, i| sum.combine(Fingerprint::of_item(i)));
        let backward = items
            .iter()
            .rev()
            .fold(Fingerprint::EMPTY, |sum, i| sum.combine(Fingerprint::of_item(i)));
        assert_eq!(forward, backward);
        let without_first = forward.remove(Fingerprint::of_item(&items[0]));
        let rest = items[1..]
            .iter()
            .fold(Fingerprint::EMPTY, |sum, i| sum.combine(Fingerprint::of_item(i)));
        assert_eq!(without_first, rest);
        assert_ne!(Fingerprint::of_item(&item(1, 1)), Fingerprint::of_item(&item(1, 2)));
    }

    #[test]
    fn memory_store_answers_ranges() {
        let store: MemoryStore = (0..10).map(|n| item(n * 10, 1)).collect();
        assert_eq!(store.fingerprint(&range(10, Some(40))).count, 3);
        assert_eq!(store.fingerprint(&range(95, None)).count, 0);
        assert_eq!(store.fingerprint(&range(40, Some(10))), RangeSummary::EMPTY);
        assert_eq!(store.fingerprint(&range(30, Some(30))), RangeSummary::EMPTY);
        assert_eq!(store.items(&range(0, None), 2), vec![item(0, 1), item(10, 1)]);
        assert_eq!(store.ids_at_ranks(&range(15, None), &[0, 2, 99]), vec![id(20), id(40)]);
        let default_ranks = ReconcileStore::ids_at_ranks(&&store, &range(15, None), &[1]);
        assert_eq!(default_ranks, vec![id(30)]);
    }

    #[test]
    fn split_ranks_cut_into_nonempty_runs() {
        assert_eq!(split_ranks(2, 16), vec![1]);
        assert_eq!(split_ranks(4, 2), vec![2]);
        assert_eq!(split_ranks(32, 4), vec![8, 16, 24]);
        assert_eq!(split_ranks(u64::MAX, 2), vec![u64::MAX / 2]);
        for count in 2..100 {
            assert!(!split_ranks(count, 16).is_empty());
        }
    }

    #[test]
    fn equal_sets_settle_in_one_round_trip_with_bytes_independent_of_n() {
        for n in [0, 1, 1_000, 10_000] {
            let session = measure(n, 0, 1);
            assert_eq!(session.messages, 2, "n = {n}");
            assert!(session.bytes[0] < 1024 && session.bytes[1] < 1024, "n = {n}: {session:?}");
        }
        assert_eq!(measure(1_000, 0, 2).bytes, measure(10_000, 0, 3).bytes);
    }

    #[test]
    fn differences_cost_bytes_in_proportion_to_k_and_rounds_in_log_n() {
        let total = |s: &Session| s.bytes[0] + s.bytes[1];
        let one_in_1k = measure(1_000, 1, 4);
        let one_in_10k = measure(10_000, 1, 5);
        assert!(total(&one_in_10k) < 10 * 1024, "{one_in_10k:?}");
        // Ten times the documents add about one level of summaries, not ten times the bytes.
        assert!(total(&one_in_10k) < 2 * total(&one_in_1k), "{one_in_1k:?} {one_in_10k:?}");
        let hundred_in_1k = measure(1_000, 100, 6);
        let hundred_in_10k = measure(10_000, 100, 7);
        assert!(total(&hundred_in_10k) < 100 * 1536, "{hundred_in_10k:?}");
        assert!(total(&hundred_in_10k) < 100 * total(&one_in_10k));
        for (n, session) in [
            (1_000u32, &one_in_1k),
            (10_000, &one_in_10k),
            (1_000, &hundred_in_1k),
            (10_000, &hundred_in_10k),
        ] {
            let half_log2_n = f64::from(n).log2() / 2.0;
            assert!(session.round_trips() as f64 <= half_log2_n, "n = {n}: {session:?}");
        }
    }

    #[test]
    fn an_empty_side_receives_everything_in_bounded_messages() {
        let mut rng = StdRng::seed_from_u64(8);
        let full = random_store(5_000, &mut rng);
        let empty = MemoryStore::new();
        for (initiator, responder) in [(&full, &empty), (&empty, &full)] {
            let session = default_session(initiator, responder);
            assert_exact(initiator, responder, &session);
            // 5,000 items at 4,096 per message: two messages carry them.
            assert!(session.messages <= 6, "{session:?}");
        }
    }

    #[test]
    fn disjoint_and_subset_sets_are_told_apart() {
        let evens: MemoryStore = (0..500).map(|n| item(2 * n, 1)).collect();
        let odds: MemoryStore = (0..500).map(|n| item(2 * n + 1, 1)).collect();
        let session = default_session(&evens, &odds);
        assert_exact(&evens, &odds, &session);
        let fewer: MemoryStore = evens.iter().filter(|i| i.doc_id < id(600)).collect();
        let session = default_session(&fewer, &evens);
        assert_exact(&fewer, &evens, &session);
        assert_eq!(session.found[0].len(), 200);
    }

    #[test]
    fn an_empty_message_ends_the_session() {
        let store: MemoryStore = (0..3).map(|n| item(n, 1)).collect();
        let mut reconciler = Reconciler::new(&store, ReconcileConfig::default()).unwrap();
        assert_eq!(reconciler.handle(&ReconcileMessage::default()), Ok((None, Vec::new())));
    }

    #[test]
    fn answers_that_do_not_fit_wait_for_the_next_message() {
        let a: MemoryStore = (0..100).map(|n| item(n, 1)).collect();
        let b: MemoryStore = (0..100).map(|n| item(n, 2)).collect();
        let config =
            ReconcileConfig { parts_per_message: 1, split_factor: 4, ..Default::default() };
        let mut responder = Reconciler::new(&b, config).unwrap();
        let mut initiator = Reconciler::new(&a, ReconcileConfig::default()).unwrap();
        let (reply, _) = responder.handle(&initiator.initiate()).unwrap();
        assert_eq!(reply.map(|m| m.ranges.len()), Some(1));
        assert!(responder.has_pending());
        // The peer's "nothing to say" is answered with the parts still waiting.
        let (reply, _) = responder.handle(&ReconcileMessage::default()).unwrap();
        assert_eq!(reply.map(|m| m.ranges.len()), Some(1));
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let bad = [
            ReconcileConfig { split_factor: 1, ..Default::default() },
            ReconcileConfig { leaf_items: 0, ..Default::default() },
            ReconcileConfig { leaf_items: 9, items_per_part: 8, ..Default::default() },
            ReconcileConfig { parts_per_message: MAX_PARTS_PER_MESSAGE + 1, ..Default::default() },
            ReconcileConfig { items_per_part: MAX_ITEMS_PER_PART + 1, ..Default::default() },
            ReconcileConfig { items_per_part: 64, items_per_message: 63, ..Default::default() },
        ];
        for config in bad {
            assert!(Reconciler::new(MemoryStore::new(), config).is_err(), "{config:?}");
        }
    }

    #[test]
    fn the_largest_message_fits_in_the_smallest_frame() {
        let items: Vec<Item> = (0..MAX_ITEMS_PER_MESSAGE as u32).map(|n| item(n, 0xff)).collect();
        let mut ranges: Vec<RangePart> = items
            .chunks(MAX_ITEMS_PER_PART)
            .enumerate()
            .map(|(i, chunk)| RangePart::Items {
                range: range(i as u32 * 1024, Some(i as u32 * 1024 + 1024)),
                items: chunk.to_vec(),
                reply_wanted: true,
            })
            .collect();
        let summaries = (ranges.len()..MAX_PARTS_PER_MESSAGE).map(|i| RangePart::Fingerprint {
            range: range(1 << 20 | i as u32, Some(1 << 21 | i as u32)),
            fingerprint: Fingerprint([0xff; 16]),
            count: u64::MAX,
        });
        ranges.extend(summaries);
        let message = ReconcileMessage { ranges };
        let encoded = postcard::to_allocvec(&message).unwrap();
        assert!(encoded.len() < SyncConfig::MIN_FRAME_BYTES, "{} bytes", encoded.len());
    }

    fn summary(lower: u32, upper: Option<u32>) -> RangePart {
        RangePart::Fingerprint {
            range: range(lower, upper),
            fingerprint: Fingerprint::EMPTY,
            count: 0,
        }
    }

    fn listing(lower: u32, upper: Option<u32>, items: Vec<Item>) -> RangePart {
        RangePart::Items { range: range(lower, upper), items, reply_wanted: true }
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        use ReconcileError::*;
        let many = |count: u32| (0..count).map(|n| item(n, 1)).collect::<Vec<_>>();
        let cases = [
            (vec![summary(5, Some(5))], EmptyRange { index: 0 }),
            (vec![summary(1, Some(2)), summary(6, Some(3))], EmptyRange { index: 1 }),
            (vec![summary(5, Some(9)), summary(1, Some(3))], OutOfOrder { index: 1 }),
            (vec![summary(1, Some(5)), summary(4, Some(9))], Overlapping { index: 1 }),
            (vec![summary(1, None), summary(4, Some(9))], Overlapping { index: 1 }),
            (vec![summary(1, Some(5)), summary(1, Some(5))], Overlapping { index: 1 }),
            (vec![listing(0, Some(9), vec![item(2, 1), item(1, 1)])], ItemsOutOfOrder { index: 0 }),
            (vec![listing(0, Some(9), vec![item(2, 1), item(2, 3)])], ItemsOutOfOrder { index: 0 }),
            (vec![listing(3, Some(9), vec![item(2, 1)])], ItemOutsideRange { index: 0 }),
            (vec![listing(0, Some(9), vec![item(9, 1)])], ItemOutsideRange { index: 0 }),
            (vec![listing(0, None, many(1025))], TooManyItemsInPart { index: 0, items: 1025 }),
            ((0..1025).map(|n| summary(n, Some(n + 1))).collect(), TooManyParts { parts: 1025 }),
        ];
        let store: MemoryStore = (0..20).map(|n| item(n, 1)).collect();
        for (ranges, error) in cases {
            let mut reconciler = Reconciler::new(&store, ReconcileConfig::default()).unwrap();
            assert_eq!(reconciler.handle(&ReconcileMessage { ranges }), Err(error));
        }
        let too_many_items = (0..5u32)
            .map(|p| {
                listing(
                    p * 1000,
                    Some(p * 1000 + 1000),
                    (0..1000).map(|n| item(p * 1000 + n, 1)).collect(),
                )
            })
            .collect();
        let message = ReconcileMessage { ranges: too_many_items };
        assert_eq!(message.validate(), Err(TooManyItems { items: 5000 }));
    }

    #[test]
    fn a_range_overlapping_unsent_answers_is_refused() {
        let a: MemoryStore = (0..100).map(|n| item(n, 1)).collect();
        let b: MemoryStore = (0..100).map(|n| item(n, 2)).collect();
        let config =
            ReconcileConfig { parts_per_message: 1, split_factor: 4, ..Default::default() };
        let mut responder = Reconciler::new(&b, config).unwrap();
        let opening = Reconciler::new(&a, ReconcileConfig::default()).unwrap().initiate();
        responder.handle(&opening).unwrap();
        assert_eq!(responder.handle(&opening), Err(ReconcileError::OverlapsPending { index: 0 }));
        // A fresh session starts clean.
        let restart = responder.initiate();
        assert_eq!(restart.ranges.len(), 1);
        assert!(!responder.has_pending());
    }

    /// Both sides' sets as described by a map from id number to (placement, digest).
    fn sets_from(shape: u8, entries: &BTreeMap<u16, (u8, u8)>) -> (MemoryStore, MemoryStore) {
        let (mut a, mut b) = (MemoryStore::new(), MemoryStore::new());
        for (&n, &(roll, digest)) in entries {
            let doc_id = id(u32::from(n) << 16);
            // 0: only in A, 1: only in B, 2: same in both, 3: different digests.
            let placement = match shape {
                0 => roll % 4,
                1 => 2,
                2 => roll % 2,
                3 => [1, 2, 2, 2][usize::from(roll % 4)],
                4 => [3, 2, 2, 2, 2, 2, 2, 2][usize::from(roll % 8)],
                _ => 0,
            };
            if placement != 1 {
                a.insert(doc_id, [digest; 32]);
            }
            if placement != 0 {
                b.insert(doc_id, [digest.wrapping_add(u8::from(placement == 3)); 32]);
            }
        }
        (a, b)
    }

    fn any_config() -> impl Strategy<Value = ReconcileConfig> {
        let small = (2usize..=6, 1usize..=4, 1usize..=5, 0usize..=4, 0usize..=6).prop_map(
            |(split_factor, leaf_items, parts_per_message, extra_per_part, extra_per_message)| {
                let items_per_part = leaf_items + extra_per_part;
                ReconcileConfig {
                    split_factor,
                    leaf_items,
                    parts_per_message,
                    items_per_part,
                    items_per_message: items_per_part + extra_per_message,
                }
            },
        );
        prop_oneof![Just(ReconcileConfig::default()), small]
    }

    fn any_part() -> impl Strategy<Value = RangePart> {
        let bounds = (any::<u8>(), proptest::option::of(any::<u8>()));
        let items = prop::collection::vec((any::<u8>(), any::<u8>()), 0..6);
        (bounds, items, any::<bool>(), any::<u64>()).prop_map(
            |((lower, upper), items, flag, count)| {
                let range = range(u32::from(lower) << 24, upper.map(|u| u32::from(u) << 24));
                if items.is_empty() && flag {
                    return RangePart::Fingerprint {
                        range,
                        fingerprint: Fingerprint::EMPTY,
                        count,
                    };
                }
                let items = items.into_iter().map(|(n, d)| item(u32::from(n) << 24, d)).collect();
                RangePart::Items { range, items, reply_wanted: flag }
            },
        )
    }

    #[test]
    fn the_wire_leaves_out_lower_bounds_it_can_infer() {
        let split = ReconcileMessage {
            ranges: vec![summary(0, Some(4)), summary(4, Some(9)), summary(9, None)],
        };
        let gapped = ReconcileMessage {
            ranges: vec![summary(1, Some(4)), summary(5, Some(9)), summary(9, None)],
        };
        let split_bytes = postcard::to_allocvec(&split).unwrap();
        let gapped_bytes = postcard::to_allocvec(&gapped).unwrap();
        assert_eq!(gapped_bytes.len(), split_bytes.len() + 2 * 16);
        assert_eq!(postcard::from_bytes::<ReconcileMessage>(&split_bytes).unwrap(), split);
        assert_eq!(postcard::from_bytes::<ReconcileMessage>(&gapped_bytes).unwrap(), gapped);
    }

    #[test]
    fn an_inferred_lower_bound_after_an_unbounded_part_is_refused() {
        // Two parts with no lower bound on the wire: the second follows an unbounded part.
        let unbounded = ReconcileMessage { ranges: vec![summary(0, None)] };
        let one = postcard::to_allocvec(&unbounded).unwrap();
        let mut two = vec![2];
        two.extend_from_slice(&one[1..]);
        two.extend_from_slice(&one[1..]);
        let decoded: ReconcileMessage = postcard::from_bytes(&two).unwrap();
        assert_eq!(decoded.validate(), Err(ReconcileError::Overlapping { index: 1 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]

        #[test]
        fn messages_survive_the_wire(ranges in prop::collection::vec(any_part(), 0..8)) {
            let message = ReconcileMessage { ranges };
            let bytes = postcard::to_allocvec(&message).unwrap();
            prop_assert_eq!(postcard::from_bytes::<ReconcileMessage>(&bytes).unwrap(), message);
        }

        #[test]
        fn any_bytes_are_refused_or_handled(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let store: MemoryStore = (0..50).map(|n| item(n << 20, 1)).collect();
            let mut reconciler = Reconciler::new(&store, ReconcileConfig::default()).unwrap();
            if let Ok(message) = postcard::from_bytes::<ReconcileMessage>(&bytes) {
                if let Ok((Some(reply), _)) = reconciler.handle(&message) {
                    prop_assert_eq!(reply.validate(), Ok(()));
                }
            }
        }

        #[test]
        fn sessions_find_exactly_the_symmetric_difference(
            shape in 0u8..6,
            entries in prop::collection::btree_map(any::<u16>(), (any::<u8>(), any::<u8>()), 0..300),
            configs in [any_config(), any_config()],
            b_initiates in any::<bool>(),
        ) {
            let (a, b) = sets_from(shape, &entries);
            let (initiator, responder) = if b_initiates { (&b, &a) } else { (&a, &b) };
            let session = run_session(initiator, responder, configs);
            assert_exact(initiator, responder, &session);
            if initiator == responder {
                prop_assert_eq!(session.messages, 2);
            }
        }

        #[test]
        fn any_message_is_refused_or_answered_validly(
            ranges in prop::collection::vec(any_part(), 0..8),
            entries in prop::collection::btree_map(any::<u8>(), any::<u8>(), 0..40),
            config in any_config(),
        ) {
            let store: MemoryStore =
                entries.iter().map(|(&n, &d)| item(u32::from(n) << 24, d)).collect();
            let mut reconciler = Reconciler::new(&store, config).unwrap();
            let message = ReconcileMessage { ranges };
            if let Ok((Some(reply), _)) = reconciler.handle(&message) {
                prop_assert_eq!(reply.validate(), Ok(()));
            }
        }
    }

    /// Prints the cost table for N = 1k, 10k, 100k and k = 0, 1, 100:
    /// `cargo test -p cairn-shared --lib reconcile::tests::cost_table -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, not a check"]
    fn cost_table() {
        for n in [1_000, 10_000, 100_000] {
            for k in [0, 1, 100] {
                let session = measure(n, k, 9);
                println!(
                    "N={n:>6} k={k:>3}: {:>3} messages, {:>3} round trips, {:>7} B initiator->responder, {:>7} B back",
                    session.messages,
                    session.round_trips(),
                    session.bytes[0],
                    session.bytes[1]
                );
            }
        }
    }
}
