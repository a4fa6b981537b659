//! The messages peers exchange, and their versioned encoding inside a frame.
//!
//! Every frame payload starts with one byte naming the protocol version, followed by a
//! postcard-encoded [`Envelope`]: the sender's HLC timestamp and one [`Message`]. A peer
//! that speaks another version gets a [`Message::Refuse`] that names ours, then the
//! connection closes.

use serde::{Deserialize, Serialize};

use crate::ids::{Collection, DocId, NodeId};
use crate::reconcile::{ReconcileError, ReconcileMessage};
use crate::scope::{CollectionScope, MAX_SCOPE_COLLECTIONS};

/// The protocol version this build speaks (also in the ALPN string).
pub const PROTOCOL_VERSION: u8 = 1;

/// ALPN protocol name for QUIC connections.
pub const ALPN: &[u8] = b"cairn/1";

/// Longest reason a [`Message::NotHeld`] may carry, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Most documents' sync messages one [`Message::DocSyncBatch`] carries.
pub const MAX_BATCH_PARTS: usize = 4096;

/// Most inventory entries in one frame; a larger inventory is sent in several frames.
pub const MAX_INVENTORY_ENTRIES_PER_MESSAGE: usize = 4096;

/// What a node is, announced in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// An edge agent on a device.
    Agent,
    /// A regional hub.
    Hub,
    /// An application attached through a node's local sync endpoint (automerge-repo's
    /// protocol): it syncs only the documents it asks for and sends no inventory.
    Client,
}

/// A digest of a document's heads: equal digests mean equal documents.
pub type HeadsDigest = [u8; 32];

/// One document in an inventory: enough to tell whether the receiver must sync it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    /// The document.
    pub doc_id: DocId,
    /// Its collection (fixed at creation).
    pub collection: Collection,
    /// Digest of the sender's current heads.
    pub heads_digest: HeadsDigest,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on every connection, in both directions.
    Hello {
        /// The sender's node id; must match the id proven by its certificate.
        node_id: NodeId,
        /// What the sender is.
        role: Role,
        /// The collections the sender replicates; only those both sides hold travel.
        scope: CollectionScope,
    },
    /// The sender is closing the connection, and says why.
    Refuse {
        /// A human-readable reason.
        reason: String,
        /// The protocol version the sender speaks.
        protocol_version: u8,
    },
    /// The sender's documents (or a chunk of them) with heads digests. Nodes now reconcile
    /// with [`Message::Reconcile`] instead; an inventory received is still acted on.
    Inventory {
        /// At most [`MAX_INVENTORY_ENTRIES_PER_MESSAGE`] entries.
        entries: Vec<InventoryEntry>,
    },
    /// One Automerge sync message for one document.
    DocSync {
        /// The document.
        doc_id: DocId,
        /// Its collection, so a receiver that lacks the document can file it.
        collection: Collection,
        /// Automerge's encoded sync message.
        sync_message: Vec<u8>,
    },
    /// The hubs the sending hub knows, its own region's first: where an agent can go when
    /// this hub fails. Replaces any earlier list from the same hub.
    Hubs {
        /// At most [`MAX_ADVERTISED_HUBS`].
        hubs: Vec<HubInfo>,
    },
    /// The sender does not hold this collection and will not sync it over this connection;
    /// the reason says where it lives. Both sides leave it out of their scope from then on.
    NotHeld {
        /// The collection.
        collection: Collection,
        /// Why, naming where it lives; at most [`MAX_REASON_BYTES`].
        reason: String,
    },
    /// Are you there? A node peer that has heard nothing for a while asks; the answer is a
    /// [`Message::Pong`]. A peer silent past the heartbeat timeout is disconnected.
    Ping,
    /// The answer to a [`Message::Ping`].
    Pong,
    /// Several documents' Automerge sync messages in one frame: one envelope, one frame
    /// header and one receive call for a burst of documents (reconnect catch-up, fan-out of
    /// many commits). At most [`MAX_BATCH_PARTS`] parts.
    DocSyncBatch {
        /// The documents' messages, applied in order.
        parts: Vec<DocSyncPart>,
    },
    /// Another message (never itself compressed), encoded and then compressed with DEFLATE.
    /// Sent instead of large batches when that makes them smaller; the receiver refuses one
    /// that inflates past its frame limit.
    Compressed {
        /// The raw DEFLATE stream.
        deflated: Vec<u8>,
    },
    /// One message of a range-based reconciliation session (see [`crate::reconcile`]), one
    /// part per collection: sessions are scoped per collection and run side by side.
    Reconcile {
        /// The message opens a session: its parts are the summaries of every collection in
        /// scope that the sender holds, and a collection it does not list it holds nothing of.
        opens: bool,
        /// At most [`MAX_SCOPE_COLLECTIONS`], in increasing collection order; each is
        /// checked against the module's limits on decode.
        parts: Vec<CollectionReconcile>,
    },
    /// An agent waits for a write to reach `regions` regions: the hub answers with a
    /// [`Message::HeldInRegions`] now and again whenever more regions hold the heads, until
    /// that many do or the connection closes.
    WatchRegions {
        /// The document.
        doc_id: DocId,
        /// The heads the write produced; at most [`MAX_WATCHED_HEADS`].
        heads: Vec<[u8; 32]>,
        /// How many regions the writer waits for.
        regions: u8,
    },
    /// The regions whose hubs have committed every change up to `heads`, as far as the
    /// sending hub knows; the answer to a [`Message::WatchRegions`].
    HeldInRegions {
        /// The document.
        doc_id: DocId,
        /// The heads asked about.
        heads: Vec<[u8; 32]>,
        /// At most [`MAX_ADVERTISED_HUBS`] region names.
        regions: Vec<String>,
    },
}

/// Most heads one [`Message::WatchRegions`] names (a document's heads are its concurrent
/// tips, rarely more than a few).
pub const MAX_WATCHED_HEADS: usize = 64;

/// Most hubs one [`Message::Hubs`] names.
pub const MAX_ADVERTISED_HUBS: usize = 256;
/// Longest region name or address in a [`HubInfo`], in bytes.
pub const MAX_HUB_FIELD_BYTES: usize = 256;

/// A hub as another hub advertises it to its agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubInfo {
    /// Its node id.
    pub node_id: NodeId,
    /// Its region.
    pub region: String,
    /// The QUIC address its agents dial (`host:port`).
    pub addr: String,
}

/// One collection's part of a [`Message::Reconcile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionReconcile {
    /// The collection whose documents the ranges cover.
    pub collection: Collection,
    /// Range summaries or item lists.
    pub message: ReconcileMessage,
}

/// One document's part of a [`Message::DocSyncBatch`]; the fields of [`Message::DocSync`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSyncPart {
    /// The document.
    pub doc_id: DocId,
    /// Its collection.
    pub collection: Collection,
    /// Automerge's encoded sync message.
    pub sync_message: Vec<u8>,
}

/// A message with the sender's HLC timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// When the sender sent it, by its hybrid logical clock.
    pub sent_at: uhlc::Timestamp,
    /// The message.
    pub message: Message,
}

/// Why a frame payload is not a message we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload names a protocol version we do not speak.
    #[error("unsupported protocol version {got}; this node speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
    },
    /// The bytes do not decode as a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A well-formed message breaks a limit.
    #[error("message breaks a limit: {0}")]
    OverLimit(String),
}

impl Envelope {
    /// The frame payload: version byte, then the encoded envelope.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION];
        // Serializing these plain data types into a Vec cannot fail.
        let body = postcard::to_allocvec(self).unwrap_or_default();
        out.extend_from_slice(&body);
        out
    }

    /// Parses a frame payload from a peer.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let (&version, body) =
            payload.split_first().ok_or_else(|| DecodeError::Malformed("empty payload".into()))?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { got: version });
        }
        let (envelope, rest): (Envelope, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
        }
        check_limits(&envelope.message)?;
        Ok(envelope)
    }
}

impl Message {
    /// Encodes and deflates this message into a [`Message::Compressed`].
    pub fn compress(&self) -> Message {
        use std::io::Write;
        // Serializing plain data into a Vec, and deflating into one, cannot fail.
        let encoded = postcard::to_allocvec(self).unwrap_or_default();
        let mut deflater =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = deflater.write_all(&encoded);
        Message::Compressed { deflated: deflater.finish().unwrap_or_default() }
    }

    /// Inflates the payload of a [`Message::Compressed`] into the message it carries,
    /// refusing one that inflates past `limit` bytes or carries another compressed message.
    pub fn decompress(deflated: &[u8], limit: usize) -> Result<Message, DecodeError> {
        use std::io::Read;
        let mut encoded = Vec::new();
        let limit_plus_one = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        flate2::read::DeflateDecoder::new(deflated)
            .take(limit_plus_one)
            .read_to_end(&mut encoded)
            .map_err(|e| DecodeError::Malformed(format!("compressed message: {e}")))?;
        if encoded.len() > limit {
            return Err(DecodeError::OverLimit(format!(
                "compressed message inflates past {limit} bytes"
            )));
        }
        let (message, rest): (Message, &[u8]) = postcard::take_from_bytes(&encoded)
            .map_err(|e| DecodeError::Malformed(format!("compressed message: {e}")))?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed(format!(
                "compressed message: {} trailing bytes",
                rest.len()
            )));
        }
        if matches!(message, Message::Compressed { .. }) {
            return Err(DecodeError::Malformed("a compressed message inside another".into()));
        }
        check_limits(&message)?;
        Ok(message)
    }
}

/// Refuses a well-formed message that breaks a size limit or, for reconciliation, the
/// ordering rules, before the node acts on any of it.
fn check_limits(message: &Message) -> Result<(), DecodeError> {
    match message {
        Message::Inventory { entries } if entries.len() > MAX_INVENTORY_ENTRIES_PER_MESSAGE => {
            Err(DecodeError::OverLimit(format!(
                "inventory of {} entries, at most {MAX_INVENTORY_ENTRIES_PER_MESSAGE} per message",
                entries.len()
            )))
        }
        Message::DocSyncBatch { parts } if parts.len() > MAX_BATCH_PARTS => {
            Err(DecodeError::OverLimit(format!(
                "batch of {} documents, at most {MAX_BATCH_PARTS} per message",
                parts.len()
            )))
        }
        Message::NotHeld { reason, .. } if reason.len() > MAX_REASON_BYTES => {
            Err(DecodeError::OverLimit(format!("a reason of {} bytes", reason.len())))
        }
        Message::Hubs { hubs } => {
            if hubs.len() > MAX_ADVERTISED_HUBS {
                return Err(DecodeError::OverLimit(format!(
                    "{} hubs advertised, at most {MAX_ADVERTISED_HUBS}",
                    hubs.len()
                )));
            }
            let long = hubs.iter().any(|hub| {
                hub.region.len() > MAX_HUB_FIELD_BYTES || hub.addr.len() > MAX_HUB_FIELD_BYTES
            });
            if long {
                return Err(DecodeError::OverLimit("an advertised hub field is too long".into()));
            }
            Ok(())
        }
        Message::WatchRegions { heads, .. } | Message::HeldInRegions { heads, .. }
            if heads.len() > MAX_WATCHED_HEADS =>
        {
            Err(DecodeError::OverLimit(format!(
                "{} heads watched, at most {MAX_WATCHED_HEADS}",
                heads.len()
            )))
        }
        Message::HeldInRegions { regions, .. }
            if regions.len() > MAX_ADVERTISED_HUBS
                || regions.iter().any(|r| r.len() > MAX_HUB_FIELD_BYTES) =>
        {
            Err(DecodeError::OverLimit(format!("a list of {} regions", regions.len())))
        }
        Message::Hello { scope, .. } => {
            scope.validate().map_err(|error| DecodeError::OverLimit(error.to_string()))
        }
        Message::Reconcile { parts, .. } => {
            if parts.len() > MAX_SCOPE_COLLECTIONS {
                return Err(DecodeError::OverLimit(format!(
                    "reconciliation of {} collections, at most {MAX_SCOPE_COLLECTIONS}",
                    parts.len()
                )));
            }
            if parts.windows(2).any(|pair| pair[0].collection >= pair[1].collection) {
                return Err(DecodeError::Malformed(
                    "reconciliation parts out of collection order".into(),
                ));
            }
            parts.iter().try_for_each(|part| {
                part.message.validate().map_err(|error| match error {
                    ReconcileError::TooManyParts { .. }
                    | ReconcileError::TooManyItemsInPart { .. }
                    | ReconcileError::TooManyItems { .. } => {
                        DecodeError::OverLimit(error.to_string())
                    }
                    _ => DecodeError::Malformed(error.to_string()),
                })
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> uhlc::Timestamp {
        uhlc::Timestamp::new(uhlc::NTP64(42), uhlc::ID::try_from([1u8; 16]).unwrap())
    }

    #[test]
    fn messages_round_trip() {
        let envelope = Envelope {
            sent_at: stamp(),
            message: Message::Hello {
                node_id: NodeId::from_bytes([3; 16]),
                role: Role::Agent,
                scope: CollectionScope::only(["a".parse().unwrap()]),
            },
        };
        assert_eq!(Envelope::decode(&envelope.encode()), Ok(envelope));
    }

    #[test]
    fn unknown_version_and_garbage_are_refused() {
        let mut payload =
            Envelope { sent_at: stamp(), message: Message::Inventory { entries: vec![] } }.encode();
        payload[0] = 9;
        assert_eq!(Envelope::decode(&payload), Err(DecodeError::UnsupportedVersion { got: 9 }));
        assert!(matches!(
            Envelope::decode(&[PROTOCOL_VERSION, 0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(Envelope::decode(&[]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn reconciliation_messages_are_checked_on_decode() {
        use crate::reconcile::{Fingerprint, IdRange, RangePart, MAX_PARTS_PER_MESSAGE};
        let encode = |ranges: Vec<RangePart>| {
            let part = CollectionReconcile {
                collection: "c".parse().unwrap(),
                message: ReconcileMessage { ranges },
            };
            let message = Message::Reconcile { opens: true, parts: vec![part] };
            Envelope { sent_at: stamp(), message }.encode()
        };
        let summary = RangePart::Fingerprint {
            range: IdRange::full(),
            fingerprint: Fingerprint::EMPTY,
            count: 0,
        };
        let fine = encode(vec![summary.clone()]);
        assert!(matches!(
            Envelope::decode(&fine),
            Ok(Envelope { message: Message::Reconcile { .. }, .. })
        ));
        let overlapping = encode(vec![summary.clone(), summary.clone()]);
        assert!(matches!(Envelope::decode(&overlapping), Err(DecodeError::Malformed(_))));
        let too_many = encode(vec![summary; MAX_PARTS_PER_MESSAGE + 1]);
        assert!(matches!(Envelope::decode(&too_many), Err(DecodeError::OverLimit(_))));
    }

    fn batch(parts: usize, bytes: usize) -> Message {
        let part = DocSyncPart {
            doc_id: DocId::from_slice(&[5; 16]).unwrap(),
            collection: "notes".parse().unwrap(),
            sync_message: vec![7; bytes],
        };
        Message::DocSyncBatch { parts: vec![part; parts] }
    }

    #[test]
    fn compressed_messages_round_trip_and_shrink() {
        let message = batch(100, 200);
        let compressed = message.compress();
        let Message::Compressed { deflated } = &compressed else { panic!("not compressed") };
        assert!(deflated.len() * 10 < postcard::to_allocvec(&message).unwrap().len());
        assert_eq!(Message::decompress(deflated, 1 << 20), Ok(message));
    }

    #[test]
    fn decompression_is_bounded_and_refuses_nesting_and_garbage() {
        let Message::Compressed { deflated } = batch(100, 200).compress() else { panic!() };
        assert!(matches!(Message::decompress(&deflated, 1000), Err(DecodeError::OverLimit(_))));
        let Message::Compressed { deflated: nested } = batch(1, 1).compress().compress() else {
            panic!()
        };
        assert!(matches!(Message::decompress(&nested, 1 << 20), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            Message::decompress(&[0xff; 64], 1 << 20),
            Err(DecodeError::Malformed(_))
        ));
        let Message::Compressed { deflated } = batch(MAX_BATCH_PARTS + 1, 0).compress() else {
            panic!()
        };
        assert!(matches!(Message::decompress(&deflated, 1 << 24), Err(DecodeError::OverLimit(_))));
    }

    #[test]
    fn oversized_batches_are_refused_on_decode() {
        let fine = Envelope { sent_at: stamp(), message: batch(MAX_BATCH_PARTS, 0) };
        assert!(Envelope::decode(&fine.encode()).is_ok());
        let over = Envelope { sent_at: stamp(), message: batch(MAX_BATCH_PARTS + 1, 0) };
        assert!(matches!(Envelope::decode(&over.encode()), Err(DecodeError::OverLimit(_))));
    }

    #[test]
    fn reconciliation_parts_must_name_distinct_collections_in_order() {
        use crate::reconcile::{Fingerprint, IdRange, RangePart};
        let part = |name: &str| CollectionReconcile {
            collection: name.parse().unwrap(),
            message: ReconcileMessage {
                ranges: vec![RangePart::Fingerprint {
                    range: IdRange::full(),
                    fingerprint: Fingerprint::EMPTY,
                    count: 0,
                }],
            },
        };
        let encode = |parts| {
            Envelope { sent_at: stamp(), message: Message::Reconcile { opens: true, parts } }
                .encode()
        };
        assert!(Envelope::decode(&encode(vec![part("a"), part("b")])).is_ok());
        for parts in [vec![part("b"), part("a")], vec![part("a"), part("a")]] {
            assert!(matches!(Envelope::decode(&encode(parts)), Err(DecodeError::Malformed(_))));
        }
        let many: Vec<_> = (0..=MAX_SCOPE_COLLECTIONS).map(|n| part(&format!("c{n:05}"))).collect();
        assert!(matches!(Envelope::decode(&encode(many)), Err(DecodeError::OverLimit(_))));
    }

    #[test]
    fn a_refusal_reason_is_bounded() {
        let not_held = |reason: String| {
            let message = Message::NotHeld { collection: "c".parse().unwrap(), reason };
            Envelope::decode(&Envelope { sent_at: stamp(), message }.encode())
        };
        assert!(not_held("x".repeat(MAX_REASON_BYTES)).is_ok());
        assert!(matches!(
            not_held("x".repeat(MAX_REASON_BYTES + 1)),
            Err(DecodeError::OverLimit(_))
        ));
    }

    #[test]
    fn invalid_collection_on_the_wire_is_malformed() {
        let envelope = Envelope {
            sent_at: stamp(),
            message: Message::DocSync {
                doc_id: DocId::from_slice(&[5; 16]).unwrap(),
                collection: "ok".parse().unwrap(),
                sync_message: vec![],
            },
        };
        let payload = envelope.encode();
        // Replace the collection's bytes "ok" with "/." which is not a valid name.
        let at = payload.windows(2).position(|w| w == b"ok").unwrap();
        let mut bad = payload.clone();
        bad[at] = b'/';
        bad[at + 1] = b'.';
        assert!(matches!(Envelope::decode(&bad), Err(DecodeError::Malformed(_))));
    }
}
