//! Identifiers.
//!
//! A [`BlockId`] is the BLAKE3 hash of a block's *plaintext* (never of compressed bytes),
//! so the same data has the same id in every store, which is what makes dedup across
//! volumes and across repositories possible.
//!
//! A [`SnapshotId`] is the stable identity of a snapshot, like a ZFS GUID. It is derived
//! once, at the system where the snapshot was taken, from (system, volume, name, creation
//! time), and then carried unchanged wherever the snapshot is replicated. Two systems that
//! hold the same identity hold the same content, so cascades A -> B -> C stay incremental.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::time::Timestamp;

macro_rules! hash_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = hex::FromHexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)?;
                Ok(Self(out))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hash_id!(BlockId, "BLAKE3 of a block's plaintext.");
hash_id!(SnapshotId, "Stable identity of a snapshot across systems.");

impl BlockId {
    /// Hash plaintext data.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

/// Domain-separation context for snapshot identities. Frozen: changing it would change
/// every identity and break incremental replication with existing destinations.
const SNAPSHOT_ID_CONTEXT: &str = "snapsync 2026-11-29 snapshot identity v1";

impl SnapshotId {
    /// Derive the identity of a snapshot taken on `system`. Each field is length-prefixed
    /// so that ("ab","c") and ("a","bc") cannot collide.
    pub fn derive(system: &str, volume: &str, name: &str, created: Timestamp) -> Self {
        let mut h = blake3::Hasher::new_derive_key(SNAPSHOT_ID_CONTEXT);
        for part in [system, volume, name] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&created.secs.to_le_bytes());
        h.update(&created.nanos.to_le_bytes());
        Self(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_id_depends_on_every_field() {
        let t = Timestamp::new(100, 5);
        let base = SnapshotId::derive("sys", "vol", "s1", t);
        assert_eq!(base, SnapshotId::derive("sys", "vol", "s1", t));
        assert_ne!(base, SnapshotId::derive("sys2", "vol", "s1", t));
        assert_ne!(base, SnapshotId::derive("sys", "vol2", "s1", t));
        assert_ne!(base, SnapshotId::derive("sys", "vol", "s2", t));
        assert_ne!(
            base,
            SnapshotId::derive("sys", "vol", "s1", Timestamp::new(100, 6))
        );
        assert_ne!(
            SnapshotId::derive("ab", "c", "s", t),
            SnapshotId::derive("a", "bc", "s", t)
        );
    }

    #[test]
    fn hex_roundtrip() {
        let id = BlockId::of(b"hello");
        let parsed: BlockId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        assert!("xyz".parse::<BlockId>().is_err());
    }
}
