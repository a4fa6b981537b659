//! Identifiers: documents, nodes and collections, each parsed once at the boundary.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The automerge-repo URL scheme that names a document.
const AUTOMERGE_URL_PREFIX: &str = "automerge:";

/// Why a string is not a valid identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdParseError {
    /// Not bs58check, or a bad checksum.
    #[error("document id is not valid bs58check: {0}")]
    Encoding(String),
    /// Decoded to the wrong number of bytes.
    #[error("document id must be 16 bytes, got {0}")]
    Length(usize),
    /// A node id is 32 hex digits.
    #[error("node id must be 32 hex digits")]
    NodeId,
    /// Collection names are short paths of `[A-Za-z0-9._-]` segments.
    #[error("invalid collection name {0:?}: use 1-128 characters of [A-Za-z0-9._-] in '/'-separated segments")]
    Collection(String),
}

/// A document id: 16 random bytes, shown as automerge-repo shows it (bs58check).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocId([u8; 16]);

impl DocId {
    /// A fresh id drawn from `rng` (the caller decides where randomness comes from).
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The id's raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Builds an id from raw bytes (for example a stored key).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdParseError> {
        let array: [u8; 16] = bytes.try_into().map_err(|_| IdParseError::Length(bytes.len()))?;
        Ok(Self(array))
    }

    /// The automerge-repo URL of this document (`automerge:<bs58check>`).
    pub fn url(&self) -> String {
        format!("{AUTOMERGE_URL_PREFIX}{self}")
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

impl FromStr for DocId {
    type Err = IdParseError;

    /// Accepts both the bare bs58check form and the `automerge:` URL.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s.strip_prefix(AUTOMERGE_URL_PREFIX).unwrap_or(s);
        let bytes = bs58::decode(bare)
            .with_check(None)
            .into_vec()
            .map_err(|e| IdParseError::Encoding(e.to_string()))?;
        Self::from_slice(&bytes)
    }
}

/// A node id: the first 16 bytes of the SHA-256 of the node's public key, so that a peer's
/// id is proven by its TLS certificate rather than claimed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId([u8; 16]);

impl NodeId {
    /// Derives the id from a DER-encoded SubjectPublicKeyInfo.
    pub fn from_public_key(spki_der: &[u8]) -> Self {
        let digest = Sha256::digest(spki_der);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(bytes)
    }

    /// Wraps raw bytes (tests and simulations name nodes directly).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(IdParseError::NodeId);
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte =
                u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| IdParseError::NodeId)?;
        }
        Ok(Self(bytes))
    }
}

/// The longest collection name accepted, in bytes.
pub const MAX_COLLECTION_NAME_BYTES: usize = 128;

/// A collection name such as `plant-7/sensors`: the unit of authorization and replication.
///
/// Shared, not copied, by every clone: the catalog holds one per document, and a node with
/// many documents in few collections would otherwise hold the same name many times over.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Collection(Arc<str>);

impl Collection {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Collection({})", self.0)
    }
}

impl FromStr for Collection {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let segment_ok = |seg: &str| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if s.is_empty() || s.len() > MAX_COLLECTION_NAME_BYTES || !s.split('/').all(segment_ok) {
            return Err(IdParseError::Collection(
                s.chars().take(MAX_COLLECTION_NAME_BYTES).collect(),
            ));
        }
        Ok(Self(Arc::from(s)))
    }
}

impl Serialize for Collection {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Collection {
    /// Collections from the wire or from disk are validated like any other input.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn doc_id_round_trips_through_bs58check_and_url() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let id = DocId::random(&mut rng);
        assert_eq!(id.to_string().parse::<DocId>(), Ok(id));
        assert_eq!(id.url().parse::<DocId>(), Ok(id));
    }

    #[test]
    fn doc_id_rejects_bad_checksum_and_length() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut text = DocId::random(&mut rng).to_string();
        let last = text.pop().map(|c| if c == '2' { '3' } else { '2' });
        text.extend(last);
        assert!(matches!(text.parse::<DocId>(), Err(IdParseError::Encoding(_))));
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert_eq!(short.parse::<DocId>(), Err(IdParseError::Length(8)));
    }

    #[test]
    fn node_id_round_trips_through_hex() {
        let id = NodeId::from_public_key(b"some key");
        assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        assert_eq!("zz".parse::<NodeId>(), Err(IdParseError::NodeId));
    }

    #[test]
    fn collection_names_are_validated() {
        assert!("plant-7/sensors".parse::<Collection>().is_ok());
        for bad in ["", "/a", "a/", "a//b", "../etc", "a b", &"x".repeat(129)] {
            assert!(bad.parse::<Collection>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn collections_serialize_as_their_name_and_clones_share_it() {
        let collection: Collection = "plant-7/sensors".parse().unwrap();
        let json = serde_json::to_string(&collection).unwrap();
        assert_eq!(json, "\"plant-7/sensors\"");
        assert_eq!(serde_json::from_str::<Collection>(&json).unwrap(), collection);
        let copy = collection.clone();
        assert!(std::ptr::eq(copy.as_str(), collection.as_str()));
    }
}
