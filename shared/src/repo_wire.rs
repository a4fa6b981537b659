//! automerge-repo's network messages, as its WebSocket adapters put them on the wire.
//!
//! Each WebSocket binary message is one CBOR map with a `type` key: `join` and `peer` make the
//! handshake, `request` and `sync` carry Automerge sync messages for one document,
//! `doc-unavailable`, `ephemeral`, `remote-subscription-change`, `remote-heads-changed`,
//! `error` and `leave` do what their names say. This module only converts bytes to
//! [`RepoMessage`] and back; what a node does with them lives in `io::repo_ws`.
//!
//! The decoder accepts what the JavaScript implementation (cbor-x) produces, which is looser
//! than what it would produce itself: integers above 2^32 arrive as floats, absent optional
//! fields arrive as `undefined`, peer metadata arrives as `peerMetadata` or `metadata`, and
//! `supportedProtocolVersions` may be one string. Unknown keys are skipped, so newer clients
//! that add fields still work. Every size is bounded and no input panics.

use minicbor::data::{Tag, Type};
use minicbor::{Decoder, Encoder};

use crate::ids::{DocId, NodeId};

/// The protocol version this module speaks (automerge-repo's "1").
pub const PROTOCOL_V1: &str = "1";
/// Largest encoded message [`decode`] accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Longest peer id, session id, storage id, head or protocol version, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Longest `error` message text, in bytes.
pub const MAX_ERROR_TEXT_BYTES: usize = 16 * 1024;
/// Most keys in one message map (known and unknown).
pub const MAX_FIELDS: usize = 64;
/// Most items in any list or nested map (versions, storage ids, heads).
pub const MAX_LIST_ITEMS: usize = 1024;
/// Deepest nesting of an unknown value that is skipped.
pub const MAX_NESTING: usize = 16;

/// CBOR tag for a typed array of `u8` (RFC 8746), which some encoders put around bytes.
const TAG_UINT8_ARRAY: u64 = 64;
/// Floats above this are not exact integers in JavaScript (`Number.MAX_SAFE_INTEGER`).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Why bytes are not a message we accept.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RepoWireError {
    /// The message is larger than the limit.
    #[error("message of {bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The bytes are not the CBOR we expect.
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field is present twice.
    #[error("duplicate field {0}")]
    DuplicateField(&'static str),
    /// A field has the wrong type or breaks a limit.
    #[error("field {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `type` names no message of this protocol.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// Bytes follow the message map.
    #[error("{0} bytes after the message")]
    TrailingBytes(usize),
}

impl From<minicbor::decode::Error> for RepoWireError {
    fn from(error: minicbor::decode::Error) -> Self {
        Self::Cbor(error.to_string())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RepoWireError {
    RepoWireError::InvalidField { field, reason: reason.into() }
}

/// A peer's id: any non-empty string of at most [`MAX_TEXT_BYTES`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(String);

impl PeerId {
    /// Validates an id.
    pub fn new(id: impl Into<String>) -> Result<Self, RepoWireError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_TEXT_BYTES {
            return Err(invalid("peer id", format!("must be 1 to {MAX_TEXT_BYTES} bytes")));
        }
        Ok(Self(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<NodeId> for PeerId {
    /// A node speaks as its node id (32 hex digits, always valid).
    fn from(node_id: NodeId) -> Self {
        Self(node_id.to_string())
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a peer says about its storage in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// The peer's storage id, if it persists documents.
    pub storage_id: Option<String>,
    /// True if the peer will not come back with the same storage.
    pub is_ephemeral: Option<bool>,
}

/// One storage's heads in a `remote-heads-changed` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHeads {
    /// The storage the heads were seen in.
    pub storage_id: String,
    /// The heads, as the sender encodes them (bs58check in automerge-repo 2; kept opaque).
    pub heads: Vec<String>,
    /// When the sender saw them, in milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// One automerge-repo network message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoMessage {
    /// First message from a connecting client.
    Join {
        /// The client.
        sender_id: PeerId,
        /// The client's storage metadata.
        peer_metadata: Option<PeerMetadata>,
        /// Versions the client speaks; absent means version 1 only.
        supported_protocol_versions: Option<Vec<String>>,
    },
    /// The server's answer to `join`.
    Peer {
        /// The server.
        sender_id: PeerId,
        /// The client.
        target_id: PeerId,
        /// The server's storage metadata.
        peer_metadata: Option<PeerMetadata>,
        /// The version both sides now speak.
        selected_protocol_version: String,
    },
    /// The sender is going away.
    Leave {
        /// The sender.
        sender_id: PeerId,
    },
    /// A first sync message from a peer that does not have the document.
    Request {
        /// The sender.
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// The document.
        document_id: DocId,
        /// An encoded Automerge sync message.
        data: Vec<u8>,
    },
    /// An Automerge sync message for one document.
    Sync {
        /// The sender.
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// The document.
        document_id: DocId,
        /// An encoded Automerge sync message.
        data: Vec<u8>,
    },
    /// The sender does not have the document (and neither do its peers).
    DocUnavailable {
        /// The sender.
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// The document.
        document_id: DocId,
    },
    /// Application data about a document that is relayed, never stored.
    Ephemeral {
        /// The peer that first sent it (kept when relayed).
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// Increases with every message of the session; receivers drop repeats.
        count: u64,
        /// The sender's session.
        session_id: String,
        /// The document.
        document_id: DocId,
        /// CBOR-encoded application data.
        data: Vec<u8>,
    },
    /// The sender changes the storage ids whose heads it wants to hear about.
    RemoteSubscriptionChange {
        /// The sender.
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// Storage ids to add.
        add: Vec<String>,
        /// Storage ids to remove.
        remove: Vec<String>,
    },
    /// A document's heads changed in some storage.
    RemoteHeadsChanged {
        /// The sender.
        sender_id: PeerId,
        /// The receiver.
        target_id: PeerId,
        /// The document.
        document_id: DocId,
        /// New heads per storage.
        new_heads: Vec<RemoteHeads>,
    },
    /// A protocol error; the sender closes the connection after it.
    Error {
        /// The sender, if known.
        sender_id: Option<PeerId>,
        /// The receiver, if known.
        target_id: Option<PeerId>,
        /// What went wrong.
        message: String,
    },
}

impl RepoMessage {
    /// The `type` string of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Join { .. } => "join",
            Self::Peer { .. } => "peer",
            Self::Leave { .. } => "leave",
            Self::Request { .. } => "request",
            Self::Sync { .. } => "sync",
            Self::DocUnavailable { .. } => "doc-unavailable",
            Self::Ephemeral { .. } => "ephemeral",
            Self::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Self::RemoteHeadsChanged { .. } => "remote-heads-changed",
            Self::Error { .. } => "error",
        }
    }

    /// The sender, if the message names one.
    pub fn sender_id(&self) -> Option<&PeerId> {
        match self {
            Self::Join { sender_id, .. }
            | Self::Peer { sender_id, .. }
            | Self::Leave { sender_id }
            | Self::Request { sender_id, .. }
            | Self::Sync { sender_id, .. }
            | Self::DocUnavailable { sender_id, .. }
            | Self::Ephemeral { sender_id, .. }
            | Self::RemoteSubscriptionChange { sender_id, .. }
            | Self::RemoteHeadsChanged { sender_id, .. } => Some(sender_id),
            Self::Error { sender_id, .. } => sender_id.as_ref(),
        }
    }
}

/// Decodes one message of at most [`MAX_MESSAGE_BYTES`].
pub fn decode(bytes: &[u8]) -> Result<RepoMessage, RepoWireError> {
    decode_with_limit(bytes, MAX_MESSAGE_BYTES)
}

/// Decodes one message of at most `max_bytes`.
pub fn decode_with_limit(bytes: &[u8], max_bytes: usize) -> Result<RepoMessage, RepoWireError> {
    if bytes.len() > max_bytes {
        return Err(RepoWireError::TooLarge { bytes: bytes.len(), max_bytes });
    }
    let mut decoder = Decoder::new(bytes);
    let fields = Fields::read(&mut decoder)?;
    let rest = bytes.len().saturating_sub(decoder.position());
    if rest > 0 {
        return Err(RepoWireError::TrailingBytes(rest));
    }
    fields.into_message()
}

/// The fields of a message map, before the `type` says which are required.
#[derive(Debug, Default)]
struct Fields {
    kind: Option<String>,
    sender_id: Option<PeerId>,
    target_id: Option<PeerId>,
    document_id: Option<DocId>,
    data: Option<Vec<u8>>,
    count: Option<u64>,
    session_id: Option<String>,
    message: Option<String>,
    selected_protocol_version: Option<String>,
    supported_protocol_versions: Option<Vec<String>>,
    peer_metadata: Option<PeerMetadata>,
    add: Option<Vec<String>>,
    remove: Option<Vec<String>>,
    new_heads: Option<Vec<RemoteHeads>>,
}

impl Fields {
    fn read(d: &mut Decoder<'_>) -> Result<Self, RepoWireError> {
        if !matches!(d.datatype()?, Type::Map | Type::MapIndef) {
            return Err(RepoWireError::Cbor("a message must be a CBOR map".into()));
        }
        let mut fields = Self::default();
        let len = d.map()?;
        for_each_item(d, len, MAX_FIELDS, "message", |d| {
            let key = d.str()?;
            if take_absent(d)? {
                return Ok(()); // `undefined` and `null` mean the field is not there.
            }
            fields.set(key, d)
        })?;
        Ok(fields)
    }

    fn set(&mut self, key: &str, d: &mut Decoder<'_>) -> Result<(), RepoWireError> {
        match key {
            "type" => put(&mut self.kind, "type", text(d, "type", MAX_TEXT_BYTES)?),
            "senderId" => put(&mut self.sender_id, "senderId", peer_id(d, "senderId")?),
            "targetId" => put(&mut self.target_id, "targetId", peer_id(d, "targetId")?),
            "documentId" => put(&mut self.document_id, "documentId", document_id(d)?),
            "data" => put(&mut self.data, "data", bytes(d, "data")?),
            "count" => put(&mut self.count, "count", uint(d, "count")?),
            "sessionId" => {
                put(&mut self.session_id, "sessionId", text(d, "sessionId", MAX_TEXT_BYTES)?)
            }
            "message" => {
                put(&mut self.message, "message", text(d, "message", MAX_ERROR_TEXT_BYTES)?)
            }
            "selectedProtocolVersion" => {
                let version = text(d, "selectedProtocolVersion", MAX_TEXT_BYTES)?;
                put(&mut self.selected_protocol_version, "selectedProtocolVersion", version)
            }
            "supportedProtocolVersions" => {
                let versions = versions(d)?;
                put(&mut self.supported_protocol_versions, "supportedProtocolVersions", versions)
            }
            "peerMetadata" | "metadata" => {
                put(&mut self.peer_metadata, "peerMetadata", metadata(d)?)
            }
            "add" => put(&mut self.add, "add", texts(d, "add")?),
            "remove" => put(&mut self.remove, "remove", texts(d, "remove")?),
            "newHeads" => put(&mut self.new_heads, "newHeads", new_heads(d)?),
            _ => skip(d, 0),
        }
    }

    fn into_message(self) -> Result<RepoMessage, RepoWireError> {
        let kind = self.kind.clone().ok_or(RepoWireError::MissingField("type"))?;
        let message = match kind.as_str() {
            "join" => RepoMessage::Join {
                sender_id: need(self.sender_id, "senderId")?,
                peer_metadata: self.peer_metadata,
                supported_protocol_versions: self.supported_protocol_versions,
            },
            "peer" => RepoMessage::Peer {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                peer_metadata: self.peer_metadata,
                selected_protocol_version: need(
                    self.selected_protocol_version,
                    "selectedProtocolVersion",
                )?,
            },
            "leave" => RepoMessage::Leave { sender_id: need(self.sender_id, "senderId")? },
            "request" => RepoMessage::Request {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                document_id: need(self.document_id, "documentId")?,
                data: need(self.data, "data")?,
            },
            "sync" => RepoMessage::Sync {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                document_id: need(self.document_id, "documentId")?,
                data: need(self.data, "data")?,
            },
            "doc-unavailable" => RepoMessage::DocUnavailable {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                document_id: need(self.document_id, "documentId")?,
            },
            "ephemeral" => RepoMessage::Ephemeral {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                count: need(self.count, "count")?,
                session_id: need(self.session_id, "sessionId")?,
                document_id: need(self.document_id, "documentId")?,
                data: need(self.data, "data")?,
            },
            "remote-subscription-change" => RepoMessage::RemoteSubscriptionChange {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                add: self.add.unwrap_or_default(),
                remove: self.remove.unwrap_or_default(),
            },
            "remote-heads-changed" => RepoMessage::RemoteHeadsChanged {
                sender_id: need(self.sender_id, "senderId")?,
                target_id: need(self.target_id, "targetId")?,
                document_id: need(self.document_id, "documentId")?,
                new_heads: need(self.new_heads, "newHeads")?,
            },
            "error" => RepoMessage::Error {
                sender_id: self.sender_id,
                target_id: self.target_id,
                message: need(self.message, "message")?,
            },
            _ => return Err(RepoWireError::UnknownType(kind)),
        };
        Ok(message)
    }
}

fn put<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), RepoWireError> {
    if slot.is_some() {
        return Err(RepoWireError::DuplicateField(field));
    }
    *slot = Some(value);
    Ok(())
}

fn need<T>(value: Option<T>, field: &'static str) -> Result<T, RepoWireError> {
    value.ok_or(RepoWireError::MissingField(field))
}

/// Calls `item` once per element of an array, or per entry of a map, whose header said
/// `len` (`None`: indefinite length, ended by a break). More than `max` elements is an error,
/// so a claimed length costs nothing until the bytes are really there.
fn for_each_item<'b>(
    d: &mut Decoder<'b>,
    len: Option<u64>,
    max: usize,
    what: &'static str,
    mut item: impl FnMut(&mut Decoder<'b>) -> Result<(), RepoWireError>,
) -> Result<(), RepoWireError> {
    let mut seen: u64 = 0;
    loop {
        match len {
            Some(n) if seen == n => return Ok(()),
            None if d.datatype()? == Type::Break => {
                // A break is the single byte 0xff.
                d.set_position(d.position() + 1);
                return Ok(());
            }
            _ => {}
        }
        if seen >= max as u64 {
            return Err(invalid(what, format!("more than {max} items")));
        }
        item(d)?;
        seen += 1;
    }
}

/// Consumes `undefined` or `null` and returns true, or leaves any other value in place.
fn take_absent(d: &mut Decoder<'_>) -> Result<bool, RepoWireError> {
    match d.datatype()? {
        Type::Undefined | Type::Null => {
            d.skip()?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn text(d: &mut Decoder<'_>, field: &'static str, max: usize) -> Result<String, RepoWireError> {
    let value = match d.datatype()? {
        Type::String => d.str()?.to_owned(),
        Type::StringIndef => {
            let mut out = String::new();
            for chunk in d.str_iter()? {
                out.push_str(chunk?);
                if out.len() > max {
                    break;
                }
            }
            out
        }
        other => return Err(invalid(field, format!("expected a string, found {other}"))),
    };
    if value.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    Ok(value)
}

fn peer_id(d: &mut Decoder<'_>, field: &'static str) -> Result<PeerId, RepoWireError> {
    PeerId::new(text(d, field, MAX_TEXT_BYTES)?).map_err(|_| invalid(field, "empty peer id"))
}

/// Bytes, also when wrapped in a `Uint8Array` tag or split into indefinite-length chunks.
fn bytes(d: &mut Decoder<'_>, field: &'static str) -> Result<Vec<u8>, RepoWireError> {
    if d.datatype()? == Type::Tag {
        let tag = d.tag()?;
        if tag != Tag::new(TAG_UINT8_ARRAY) {
            return Err(invalid(field, format!("unexpected tag {}", tag.as_u64())));
        }
    }
    match d.datatype()? {
        Type::Bytes => Ok(d.bytes()?.to_vec()),
        Type::BytesIndef => {
            let mut out = Vec::new();
            for chunk in d.bytes_iter()? {
                out.extend_from_slice(chunk?);
            }
            Ok(out)
        }
        other => Err(invalid(field, format!("expected bytes, found {other}"))),
    }
}

/// A document id: bs58check text (also as an `automerge:` URL), or its 16 raw bytes.
fn document_id(d: &mut Decoder<'_>) -> Result<DocId, RepoWireError> {
    let parsed = match d.datatype()? {
        Type::Bytes | Type::BytesIndef | Type::Tag => DocId::from_slice(&bytes(d, "documentId")?),
        _ => text(d, "documentId", MAX_TEXT_BYTES)?.parse(),
    };
    parsed.map_err(|e| invalid("documentId", e.to_string()))
}

/// A non-negative integer, also when sent as a float (cbor-x sends numbers of 2^32 and above
/// as float64).
fn uint(d: &mut Decoder<'_>, field: &'static str) -> Result<u64, RepoWireError> {
    let float = match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => return Ok(d.u64()?),
        Type::F16 => half_to_f64(d)?,
        Type::F32 | Type::F64 => d.f64()?,
        other => return Err(invalid(field, format!("expected an integer, found {other}"))),
    };
    if float.is_finite() && float >= 0.0 && float.fract() == 0.0 && float <= MAX_SAFE_INTEGER {
        // Exact: the value is a whole number below 2^53.
        Ok(float as u64)
    } else {
        Err(invalid(field, format!("{float} is not a non-negative integer")))
    }
}

/// Reads a half-precision float by hand, which minicbor only does with an extra crate.
fn half_to_f64(d: &mut Decoder<'_>) -> Result<f64, RepoWireError> {
    let start = d.position();
    let raw = d
        .input()
        .get(start + 1..start + 3)
        .ok_or_else(|| RepoWireError::Cbor("truncated half-precision float".into()))?;
    let bits = u16::from_be_bytes([raw[0], raw[1]]);
    d.set_position(start + 3);
    let sign = if bits & 0x8000 == 0 { 1.0 } else { -1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f64::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 => f64::NAN,
        _ => (1.0 + mantissa / 1024.0) * 2f64.powi(exponent - 15),
    };
    Ok(sign * magnitude)
}

fn texts(d: &mut Decoder<'_>, field: &'static str) -> Result<Vec<String>, RepoWireError> {
    if !matches!(d.datatype()?, Type::Array | Type::ArrayIndef) {
        return Err(invalid(field, "expected an array"));
    }
    let len = d.array()?;
    let mut out = Vec::new();
    for_each_item(d, len, MAX_LIST_ITEMS, field, |d| {
        out.push(text(d, field, MAX_TEXT_BYTES)?);
        Ok(())
    })?;
    Ok(out)
}

/// `supportedProtocolVersions`: an array of strings, or one string.
fn versions(d: &mut Decoder<'_>) -> Result<Vec<String>, RepoWireError> {
    match d.datatype()? {
        Type::String | Type::StringIndef => {
            Ok(vec![text(d, "supportedProtocolVersions", MAX_TEXT_BYTES)?])
        }
        _ => texts(d, "supportedProtocolVersions"),
    }
}

fn metadata(d: &mut Decoder<'_>) -> Result<PeerMetadata, RepoWireError> {
    if !matches!(d.datatype()?, Type::Map | Type::MapIndef) {
        return Err(invalid("peerMetadata", "expected a map"));
    }
    let len = d.map()?;
    let mut metadata = PeerMetadata::default();
    for_each_item(d, len, MAX_FIELDS, "peerMetadata", |d| {
        let key = d.str()?;
        if take_absent(d)? {
            return Ok(());
        }
        match key {
            "storageId" => metadata.storage_id = Some(text(d, "storageId", MAX_TEXT_BYTES)?),
            "isEphemeral" => metadata.is_ephemeral = Some(d.bool()?),
            _ => skip(d, 0)?,
        }
        Ok(())
    })?;
    Ok(metadata)
}

/// `newHeads`: storage id → `{heads: [string], timestamp: number}`.
fn new_heads(d: &mut Decoder<'_>) -> Result<Vec<RemoteHeads>, RepoWireError> {
    if !matches!(d.datatype()?, Type::Map | Type::MapIndef) {
        return Err(invalid("newHeads", "expected a map"));
    }
    let len = d.map()?;
    let mut out = Vec::new();
    for_each_item(d, len, MAX_LIST_ITEMS, "newHeads", |d| {
        let storage_id = text(d, "newHeads", MAX_TEXT_BYTES)?;
        out.push(heads_entry(d, storage_id)?);
        Ok(())
    })?;
    Ok(out)
}

fn heads_entry(d: &mut Decoder<'_>, storage_id: String) -> Result<RemoteHeads, RepoWireError> {
    if !matches!(d.datatype()?, Type::Map | Type::MapIndef) {
        return Err(invalid("newHeads", "expected a map per storage id"));
    }
    let len = d.map()?;
    let mut heads = None;
    let mut timestamp = None;
    for_each_item(d, len, MAX_FIELDS, "newHeads", |d| {
        match d.str()? {
            "heads" => heads = Some(texts(d, "heads")?),
            "timestamp" => timestamp = Some(uint(d, "timestamp")?),
            _ => skip(d, 0)?,
        }
        Ok(())
    })?;
    Ok(RemoteHeads {
        storage_id,
        heads: need(heads, "heads")?,
        timestamp: need(timestamp, "timestamp")?,
    })
}

/// Skips one value of a field we do not know, refusing nesting deeper than [`MAX_NESTING`].
///
/// Written here rather than with minicbor's own skip so that depth (and so stack and memory)
/// stays bounded for hostile input.
fn skip(d: &mut Decoder<'_>, depth: usize) -> Result<(), RepoWireError> {
    if depth > MAX_NESTING {
        return Err(RepoWireError::Cbor(format!("nested deeper than {MAX_NESTING} levels")));
    }
    match d.datatype()? {
        Type::Array | Type::ArrayIndef => {
            let len = d.array()?;
            for_each_item(d, len, MAX_LIST_ITEMS, "unknown field", |d| skip(d, depth + 1))
        }
        Type::Map | Type::MapIndef => {
            let len = d.map()?;
            for_each_item(d, len, MAX_LIST_ITEMS, "unknown field", |d| {
                skip(d, depth + 1)?;
                skip(d, depth + 1)
            })
        }
        Type::Tag => {
            d.tag()?;
            skip(d, depth + 1)
        }
        Type::Break | Type::Unknown(_) => Err(RepoWireError::Cbor("unexpected CBOR item".into())),
        // Scalars, strings and bytes (also indefinite ones) hold no nested items.
        _ => Ok(d.skip()?),
    }
}

/// Encodes a message as its CBOR map.
pub fn encode(message: &RepoMessage) -> Vec<u8> {
    let entries = entries(message);
    let mut encoder = Encoder::new(Vec::new());
    // Writing into a Vec cannot fail, so the encoder has no error to report.
    let _ = write_map(&mut encoder, &entries);
    encoder.into_writer()
}

/// A value of a message field, ready for encoding.
enum Value<'a> {
    Text(&'a str),
    Id(String),
    Bytes(&'a [u8]),
    Uint(u64),
    Texts(&'a [String]),
    Metadata(&'a PeerMetadata),
    Heads(&'a [RemoteHeads]),
}

type Entries<'a> = Vec<(&'static str, Value<'a>)>;

fn entries(message: &RepoMessage) -> Entries<'_> {
    let mut out = vec![("type", Value::Text(message.type_name()))];
    if let Some(sender) = message.sender_id() {
        out.push(("senderId", Value::Text(sender.as_str())));
    }
    match message {
        RepoMessage::Join { peer_metadata, supported_protocol_versions, .. } => {
            push_metadata(&mut out, peer_metadata.as_ref());
            if let Some(versions) = supported_protocol_versions {
                out.push(("supportedProtocolVersions", Value::Texts(versions)));
            }
        }
        RepoMessage::Peer { target_id, peer_metadata, selected_protocol_version, .. } => {
            out.push(("targetId", Value::Text(target_id.as_str())));
            push_metadata(&mut out, peer_metadata.as_ref());
            out.push(("selectedProtocolVersion", Value::Text(selected_protocol_version)));
        }
        RepoMessage::Leave { .. } => {}
        RepoMessage::Request { target_id, document_id, data, .. }
        | RepoMessage::Sync { target_id, document_id, data, .. } => {
            push_target_and_document(&mut out, target_id, document_id);
            out.push(("data", Value::Bytes(data)));
        }
        RepoMessage::DocUnavailable { target_id, document_id, .. } => {
            push_target_and_document(&mut out, target_id, document_id);
        }
        RepoMessage::Ephemeral { target_id, count, session_id, document_id, data, .. } => {
            push_target_and_document(&mut out, target_id, document_id);
            out.push(("count", Value::Uint(*count)));
            out.push(("sessionId", Value::Text(session_id)));
            out.push(("data", Value::Bytes(data)));
        }
        RepoMessage::RemoteSubscriptionChange { target_id, add, remove, .. } => {
            out.push(("targetId", Value::Text(target_id.as_str())));
            out.push(("add", Value::Texts(add)));
            out.push(("remove", Value::Texts(remove)));
        }
        RepoMessage::RemoteHeadsChanged { target_id, document_id, new_heads, .. } => {
            push_target_and_document(&mut out, target_id, document_id);
            out.push(("newHeads", Value::Heads(new_heads)));
        }
        RepoMessage::Error { target_id, message, .. } => {
            if let Some(target_id) = target_id {
                out.push(("targetId", Value::Text(target_id.as_str())));
            }
            out.push(("message", Value::Text(message)));
        }
    }
    out
}

fn push_metadata<'a>(out: &mut Entries<'a>, metadata: Option<&'a PeerMetadata>) {
    if let Some(metadata) = metadata {
        out.push(("peerMetadata", Value::Metadata(metadata)));
    }
}

fn push_target_and_document<'a>(out: &mut Entries<'a>, target: &'a PeerId, document: &DocId) {
    out.push(("targetId", Value::Text(target.as_str())));
    out.push(("documentId", Value::Id(document.to_string())));
}

type EncodeResult = Result<(), minicbor::encode::Error<std::convert::Infallible>>;

fn write_map(e: &mut Encoder<Vec<u8>>, entries: &Entries<'_>) -> EncodeResult {
    e.map(entries.len() as u64)?;
    for (key, value) in entries {
        e.str(key)?;
        write_value(e, value)?;
    }
    Ok(())
}

fn write_value(e: &mut Encoder<Vec<u8>>, value: &Value<'_>) -> EncodeResult {
    match value {
        Value::Text(text) => {
            e.str(text)?;
        }
        Value::Id(text) => {
            e.str(text)?;
        }
        Value::Bytes(bytes) => {
            e.bytes(bytes)?;
        }
        Value::Uint(n) => {
            e.u64(*n)?;
        }
        Value::Texts(items) => write_texts(e, items)?,
        Value::Metadata(metadata) => write_metadata(e, metadata)?,
        Value::Heads(heads) => write_heads(e, heads)?,
    }
    Ok(())
}

fn write_texts(e: &mut Encoder<Vec<u8>>, items: &[String]) -> EncodeResult {
    e.array(items.len() as u64)?;
    for item in items {
        e.str(item)?;
    }
    Ok(())
}

fn write_metadata(e: &mut Encoder<Vec<u8>>, metadata: &PeerMetadata) -> EncodeResult {
    let len = u64::from(metadata.storage_id.is_some()) + u64::from(metadata.is_ephemeral.is_some());
    e.map(len)?;
    if let Some(storage_id) = &metadata.storage_id {
        e.str("storageId")?.str(storage_id)?;
    }
    if let Some(is_ephemeral) = metadata.is_ephemeral {
        e.str("isEphemeral")?.bool(is_ephemeral)?;
    }
    Ok(())
}

fn write_heads(e: &mut Encoder<Vec<u8>>, heads: &[RemoteHeads]) -> EncodeResult {
    e.map(heads.len() as u64)?;
    for entry in heads {
        e.str(&entry.storage_id)?.map(2)?;
        e.str("heads")?;
        write_texts(e, &entry.heads)?;
        e.str("timestamp")?.u64(entry.timestamp)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The document id in the captured JavaScript messages below.
    const JS_DOC_ID: &str = "2rVpBnE4ZnzKcJake6yJV1xsTbxT";

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn peer(id: &str) -> PeerId {
        PeerId::new(id).unwrap()
    }

    fn doc() -> DocId {
        JS_DOC_ID.parse().unwrap()
    }

    fn samples() -> Vec<RepoMessage> {
        let metadata = PeerMetadata { storage_id: Some("s1".into()), is_ephemeral: Some(false) };
        vec![
            RepoMessage::Join {
                sender_id: peer("client"),
                peer_metadata: Some(metadata.clone()),
                supported_protocol_versions: Some(vec!["1".into()]),
            },
            RepoMessage::Join {
                sender_id: peer("client"),
                peer_metadata: None,
                supported_protocol_versions: None,
            },
            RepoMessage::Peer {
                sender_id: peer("server"),
                target_id: peer("client"),
                peer_metadata: Some(PeerMetadata::default()),
                selected_protocol_version: PROTOCOL_V1.into(),
            },
            RepoMessage::Leave { sender_id: peer("client") },
            RepoMessage::Request {
                sender_id: peer("client"),
                target_id: peer("server"),
                document_id: doc(),
                data: vec![0x42, 0, 0, 1, 0],
            },
            RepoMessage::Sync {
                sender_id: peer("server"),
                target_id: peer("client"),
                document_id: doc(),
                data: vec![1, 2, 3],
            },
            RepoMessage::DocUnavailable {
                sender_id: peer("server"),
                target_id: peer("client"),
                document_id: doc(),
            },
            RepoMessage::Ephemeral {
                sender_id: peer("client"),
                target_id: peer("server"),
                count: u64::MAX,
                session_id: "abc".into(),
                document_id: doc(),
                data: vec![0xa0],
            },
            RepoMessage::RemoteSubscriptionChange {
                sender_id: peer("client"),
                target_id: peer("server"),
                add: vec!["s1".into()],
                remove: vec![],
            },
            RepoMessage::RemoteHeadsChanged {
                sender_id: peer("client"),
                target_id: peer("server"),
                document_id: doc(),
                new_heads: vec![RemoteHeads {
                    storage_id: "s1".into(),
                    heads: vec!["3Ts2Co9FJfZQn3qJz2S6iQn8".into()],
                    timestamp: 1_763_769_600_123,
                }],
            },
            RepoMessage::Error { sender_id: None, target_id: None, message: "bad".into() },
            RepoMessage::Error {
                sender_id: Some(peer("server")),
                target_id: Some(peer("client")),
                message: "bad".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            assert_eq!(decode(&encode(&message)), Ok(message.clone()), "{message:?}");
        }
    }

    // The hex strings below were produced by automerge-repo 2.5's own CBOR encoder (cbor-x),
    // exactly as its WebSocket client adapter sends them.

    #[test]
    fn a_javascript_join_with_undefined_storage_id_decodes() {
        let bytes = unhex("b900046474797065646a6f696e6873656e646572496467706565722d6a736c706565724d65746164617461b900026973746f726167654964f76b6973457068656d6572616cf57819737570706f7274656450726f746f636f6c56657273696f6e73816131");
        assert_eq!(
            decode(&bytes),
            Ok(RepoMessage::Join {
                sender_id: peer("peer-js"),
                peer_metadata: Some(PeerMetadata { storage_id: None, is_ephemeral: Some(true) }),
                supported_protocol_versions: Some(vec!["1".into()]),
            })
        );
    }

    #[test]
    fn a_javascript_ephemeral_message_with_a_float_count_decodes() {
        let bytes = unhex("b90007647479706569657068656d6572616c687461726765744964637372766a646f63756d656e744964781c32725670426e45345a6e7a4b634a616b6536794a563178735462785464646174614301020365636f756e74fb42700000000000006973657373696f6e4964636162636873656e646572496467706565722d6a73");
        let Ok(RepoMessage::Ephemeral { count, document_id, data, session_id, .. }) =
            decode(&bytes)
        else {
            panic!("not an ephemeral message: {:?}", decode(&bytes));
        };
        assert_eq!(count, 1 << 40);
        assert_eq!(document_id, doc());
        assert_eq!(data, vec![1, 2, 3]);
        assert_eq!(session_id, "abc");
    }

    #[test]
    fn a_javascript_subscription_change_with_undefined_remove_decodes() {
        let bytes = unhex("b900056474797065781a72656d6f74652d737562736372697074696f6e2d6368616e67656874617267657449646373727663616464816273316672656d6f7665f76873656e646572496467706565722d6a73");
        assert_eq!(
            decode(&bytes),
            Ok(RepoMessage::RemoteSubscriptionChange {
                sender_id: peer("peer-js"),
                target_id: peer("srv"),
                add: vec!["s1".into()],
                remove: vec![],
            })
        );
    }

    #[test]
    fn javascript_heads_and_requests_decode() {
        let heads = unhex("b9000564747970657472656d6f74652d68656164732d6368616e676564687461726765744964637372766a646f63756d656e744964781c32725670426e45345a6e7a4b634a616b6536794a5631787354627854686e65774865616473b90001627331b9000265686561647381781833547332436f39464a665a516e33714a7a32533669516e386974696d657374616d70fb4279aa8dc487b0006873656e646572496467706565722d6a73");
        assert_eq!(
            decode(&heads),
            Ok(RepoMessage::RemoteHeadsChanged {
                sender_id: peer("peer-js"),
                target_id: peer("srv"),
                document_id: doc(),
                new_heads: vec![RemoteHeads {
                    storage_id: "s1".into(),
                    heads: vec!["3Ts2Co9FJfZQn3qJz2S6iQn8".into()],
                    timestamp: 1_763_769_600_123,
                }],
            })
        );
        let request = unhex("b9000564747970656772657175657374687461726765744964637372766a646f63756d656e744964781c32725670426e45345a6e7a4b634a616b6536794a563178735462785464646174614542000001006873656e646572496467706565722d6a73");
        assert_eq!(
            decode(&request),
            Ok(RepoMessage::Request {
                sender_id: peer("peer-js"),
                target_id: peer("srv"),
                document_id: doc(),
                data: vec![0x42, 0, 0, 1, 0],
            })
        );
    }

    /// Builds a message map by hand, the way other encoders might.
    fn map(build: impl FnOnce(&mut Encoder<Vec<u8>>) -> EncodeResult, len: u64) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        e.map(len).unwrap();
        build(&mut e).unwrap();
        e.into_writer()
    }

    #[test]
    fn lenient_forms_are_accepted() {
        // One version as a string, `metadata` for `peerMetadata`, a null field, an unknown
        // nested field, indefinite-length containers.
        let bytes = map(
            |e| {
                e.str("type")?.str("join")?.str("senderId")?.str("c")?;
                e.str("supportedProtocolVersions")?.str("1")?;
                e.str("metadata")?.begin_map()?.str("isEphemeral")?.bool(false)?.end()?;
                e.str("extra")?.begin_array()?.map(1)?.str("k")?.array(0)?.end()?;
                e.str("targetId")?.null()?;
                Ok(())
            },
            6,
        );
        assert_eq!(
            decode(&bytes),
            Ok(RepoMessage::Join {
                sender_id: peer("c"),
                peer_metadata: Some(PeerMetadata { storage_id: None, is_ephemeral: Some(false) }),
                supported_protocol_versions: Some(vec!["1".into()]),
            })
        );
    }

    #[test]
    fn integers_may_arrive_as_any_float_and_ids_as_bytes() {
        let as_f64: fn(&mut Encoder<Vec<u8>>) -> EncodeResult = |e| e.f64(7.0)?.ok();
        let as_f32: fn(&mut Encoder<Vec<u8>>) -> EncodeResult = |e| e.f32(7.0)?.ok();
        // 7.0 as a half-precision float.
        let as_f16: fn(&mut Encoder<Vec<u8>>) -> EncodeResult = |e| {
            e.writer_mut().extend_from_slice(&[0xf9, 0x47, 0x00]);
            Ok(())
        };
        for count in [as_f64, as_f32, as_f16] {
            let bytes = map(
                |e| {
                    e.str("type")?.str("ephemeral")?.str("senderId")?.str("a")?;
                    e.str("targetId")?.str("b")?.str("sessionId")?.str("s")?;
                    e.str("documentId")?.tag(Tag::new(TAG_UINT8_ARRAY))?.bytes(doc().as_bytes())?;
                    e.str("data")?.bytes(&[1])?.str("count")?;
                    count(e)
                },
                7,
            );
            assert!(
                matches!(decode(&bytes), Ok(RepoMessage::Ephemeral { count: 7, .. })),
                "{:?}",
                decode(&bytes)
            );
        }
    }

    fn ephemeral_with_count(count: impl FnOnce(&mut Encoder<Vec<u8>>) -> EncodeResult) -> Vec<u8> {
        map(
            |e| {
                e.str("type")?.str("ephemeral")?.str("senderId")?.str("a")?;
                e.str("targetId")?.str("b")?.str("sessionId")?.str("s")?;
                e.str("documentId")?.str(JS_DOC_ID)?.str("data")?.bytes(&[1])?.str("count")?;
                count(e)
            },
            7,
        )
    }

    #[test]
    fn counts_that_are_not_whole_non_negative_numbers_are_refused() {
        for bad in [1.5, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let bytes = ephemeral_with_count(|e| e.f64(bad)?.ok());
            assert!(
                matches!(decode(&bytes), Err(RepoWireError::InvalidField { field: "count", .. })),
                "{bad}: {:?}",
                decode(&bytes)
            );
        }
        let negative = ephemeral_with_count(|e| e.i64(-3)?.ok());
        assert!(matches!(decode(&negative), Err(RepoWireError::InvalidField { .. })));
    }

    #[test]
    fn broken_messages_are_refused_with_a_reason() {
        let sync = encode(&samples()[5]);
        let mut trailing = sync.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(RepoWireError::TrailingBytes(1)));
        assert_eq!(
            decode_with_limit(&sync, 10),
            Err(RepoWireError::TooLarge { bytes: sync.len(), max_bytes: 10 })
        );
        assert!(matches!(decode(&[]), Err(RepoWireError::Cbor(_))));
        assert!(matches!(decode(&[0x83, 1, 2, 3]), Err(RepoWireError::Cbor(_))));
        assert!(matches!(decode(&sync[..sync.len() - 1]), Err(RepoWireError::Cbor(_))));
        let unknown = map(|e| e.str("type")?.str("gossip")?.ok(), 1);
        assert_eq!(decode(&unknown), Err(RepoWireError::UnknownType("gossip".into())));
        let untyped = map(|e| e.str("senderId")?.str("a")?.ok(), 1);
        assert_eq!(decode(&untyped), Err(RepoWireError::MissingField("type")));
        let no_data = map(
            |e| {
                e.str("type")?.str("sync")?.str("senderId")?.str("a")?.str("targetId")?.str("b")?;
                e.str("documentId")?.str(JS_DOC_ID)?.ok()
            },
            4,
        );
        assert_eq!(decode(&no_data), Err(RepoWireError::MissingField("data")));
        let twice = map(|e| e.str("type")?.str("leave")?.str("type")?.str("leave")?.ok(), 2);
        assert_eq!(decode(&twice), Err(RepoWireError::DuplicateField("type")));
        let bad_doc = map(
            |e| {
                e.str("type")?.str("doc-unavailable")?.str("senderId")?.str("a")?;
                e.str("targetId")?.str("b")?.str("documentId")?.str("not-an-id")?.ok()
            },
            4,
        );
        assert!(matches!(
            decode(&bad_doc),
            Err(RepoWireError::InvalidField { field: "documentId", .. })
        ));
        let empty_sender = map(|e| e.str("type")?.str("leave")?.str("senderId")?.str("")?.ok(), 2);
        assert!(matches!(decode(&empty_sender), Err(RepoWireError::InvalidField { .. })));
    }

    #[test]
    fn limits_hold() {
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        let long_sender =
            map(|e| e.str("type")?.str("leave")?.str("senderId")?.str(&long)?.ok(), 2);
        assert!(matches!(decode(&long_sender), Err(RepoWireError::InvalidField { .. })));
        // An unknown field nested deeper than allowed.
        let mut deep = map(|e| e.str("type")?.str("leave")?.str("senderId")?.str("a")?.ok(), 3);
        deep.extend_from_slice(&[0x61, b'z']);
        deep.extend(std::iter::repeat_n(0x81, MAX_NESTING + 2));
        deep.push(0);
        assert!(matches!(decode(&deep), Err(RepoWireError::Cbor(_))), "{:?}", decode(&deep));
        // A map that claims more fields than allowed, and one that claims billions.
        let mut many = vec![0xb9, 0xff, 0xff];
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(&[0x62, b'k', b'0' + (i % 10) as u8, 0]);
        }
        assert!(matches!(decode(&many), Err(RepoWireError::InvalidField { .. })));
        assert!(decode(&[0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        // A byte string that claims more bytes than there are.
        let mut short = map(|e| e.str("data")?.ok(), 1);
        short.extend_from_slice(&[0x5b, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert!(matches!(decode(&short), Err(RepoWireError::Cbor(_))));
    }

    fn any_message() -> impl Strategy<Value = RepoMessage> {
        let ids = "[a-zA-Z0-9-]{1,40}";
        (ids, ids, any::<[u8; 16]>(), prop::collection::vec(any::<u8>(), 0..200), any::<u64>())
            .prop_flat_map(|(sender, target, doc, data, count)| {
                let sender_id = PeerId::new(sender).unwrap();
                let target_id = PeerId::new(target).unwrap();
                let document_id = DocId::from_slice(&doc).unwrap();
                prop_oneof![
                    Just(RepoMessage::Sync {
                        sender_id: sender_id.clone(),
                        target_id: target_id.clone(),
                        document_id,
                        data: data.clone(),
                    }),
                    Just(RepoMessage::Ephemeral {
                        sender_id,
                        target_id,
                        count,
                        session_id: "s".into(),
                        document_id,
                        data,
                    }),
                ]
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn damaged_messages_never_panic(
            pick in 0usize..12,
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&samples()[pick]);
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let _ = decode(&bytes);
            let _ = decode(&bytes[..cut.index(bytes.len())]);
        }

        #[test]
        fn messages_round_trip(message in any_message()) {
            prop_assert_eq!(decode(&encode(&message)), Ok(message));
        }
    }
}
