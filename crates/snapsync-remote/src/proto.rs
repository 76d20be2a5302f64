//! The wire protocol shared by client and server (see `docs/PROTOCOL.md`): version
//! header, JSON bodies, and the binary encodings of block-id lists and block batches.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use snapsync_core::{codec, BlockId, ExtentList, Origin, SnapshotInfo};
use snapsync_store::{BlockContent, IncomingBlock, StoreError};

/// The protocol version this build speaks. Client and server refuse any other.
///
/// Version 2: `write` requests carry a [`SEQUENCE_HEADER`] and the server applies them
/// in its order, so a client may keep several in flight.
pub const PROTOCOL_VERSION: u32 = 2;
/// Header carrying [`PROTOCOL_VERSION`] on every request and response.
pub const VERSION_HEADER: &str = "snapsync-protocol";
/// Header telling how a `read` response body is encoded: `zstd` or `identity`.
pub const ENCODING_HEADER: &str = "snapsync-encoding";
/// Header numbering a session's `write` requests from 0: the order the server applies
/// them in.
pub const SEQUENCE_HEADER: &str = "snapsync-sequence";
/// Most `write` requests of one session the server holds while an earlier one has not
/// arrived.
pub const MAX_WRITES_AHEAD: u64 = 8;

/// Largest byte range one `read` request may ask for.
pub const MAX_READ_LEN: u64 = 16 << 20;
/// Largest request body the server accepts (a `write` batch, compressed).
pub const MAX_BODY: usize = 80 << 20;
/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Most block ids in one `missing` request, and most blocks in one `write` batch.
pub const MAX_BATCH_BLOCKS: usize = 1 << 16;
/// Largest response body the client accepts (listings of many snapshots, diffs with many
/// extents).
pub const MAX_RESPONSE: usize = 256 << 20;

/// Store information: `GET .../info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoResponse {
    /// The served store's system id.
    pub system_id: String,
    /// The served store's location as the server sees it.
    pub location: String,
    /// Block size when the store can be a destination.
    pub block_size: Option<u64>,
    /// Whether the presented token may write to this store.
    pub writable: bool,
}

/// A snapshot by volume and name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireSnapshotRef {
    /// Volume.
    pub volume: String,
    /// Snapshot.
    pub snapshot: String,
}

/// `POST .../diff` and `POST .../estimate_diff`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffRequest {
    /// Volume.
    pub volume: String,
    /// Target snapshot.
    pub target: String,
    /// Base snapshot.
    pub base: Option<WireSnapshotRef>,
}

/// Answer to `diff`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffResponse {
    /// Changed data.
    pub data: ExtentList,
    /// Changed to zero.
    pub zero: ExtentList,
}

/// Answer to `estimate_diff`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EstimateResponse {
    /// The estimate, if cheap at the source.
    pub estimate: Option<u64>,
}

/// `POST .../hints`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HintsRequest {
    /// Source system id.
    pub source_system: String,
    /// Source volume.
    pub source_volume: String,
}

/// `POST .../read`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadRequest {
    /// Volume.
    pub volume: String,
    /// Snapshot.
    pub snapshot: String,
    /// First byte.
    pub offset: u64,
    /// Bytes (at most [`MAX_READ_LEN`]).
    pub len: u64,
}

/// `POST .../receive`: begin a receive session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BeginRequest {
    /// Destination volume.
    pub volume: String,
    /// Snapshot with identity and age.
    pub snapshot: SnapshotInfo,
    /// Base at the destination.
    pub base: Option<WireSnapshotRef>,
    /// Source system id.
    pub source_system: String,
    /// Source volume.
    pub source_volume: String,
    /// Source snapshot.
    pub source_snapshot: String,
    /// Clone lineage.
    pub origin: Option<Origin>,
}

/// Answer to begin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BeginResponse {
    /// The session, named in the following requests.
    pub session: String,
}

/// Answer to `write`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteResponse {
    /// Bytes the batch added to the destination.
    pub stored_bytes: u64,
}

/// Answer to `commit`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitResponse {
    /// See [`snapsync_store::CommitInfo`].
    pub inserted_before: Option<String>,
    /// See [`snapsync_store::CommitInfo`].
    pub redundant_entries_removed: u64,
}

/// Every error response body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `unauthorized`, `forbidden`, `not_found`, `already_exists`, `conflict`,
    /// `bad_request`, `version`, `unsupported`, `internal`.
    pub kind: String,
    /// The full one-line message.
    pub message: String,
    /// For `not_found`, `already_exists` and `conflict`: what.
    #[serde(default)]
    pub what: Option<String>,
}

impl ErrorBody {
    /// The kind and HTTP status of a store error.
    pub fn from_store(e: &StoreError) -> (u16, ErrorBody) {
        let (status, kind, what) = match e {
            StoreError::NotFound { what } => (404, "not_found", Some(what.clone())),
            StoreError::AlreadyExists { what } => (409, "already_exists", Some(what.clone())),
            StoreError::Conflict { what } => (409, "conflict", Some(what.clone())),
            StoreError::InvalidName(_) => (400, "bad_request", None),
            StoreError::Unsupported { .. } => (501, "unsupported", None),
            StoreError::Malformed { .. } => (422, "malformed", None),
            StoreError::Corrupt { .. } => (500, "corrupt", None),
            _ => (500, "internal", None),
        };
        (
            status,
            ErrorBody {
                kind: kind.into(),
                message: e.to_string(),
                what,
            },
        )
    }
}

/// Why a binary body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {detail}")]
pub struct DecodeError {
    /// Which body.
    pub what: &'static str,
    /// What is wrong.
    pub detail: String,
}

fn derr(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        detail: detail.into(),
    }
}

/// Block ids, concatenated 32-byte values.
pub fn encode_ids(ids: &[BlockId]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        v.extend_from_slice(id.as_bytes());
    }
    v
}

/// Inverse of [`encode_ids`].
pub fn decode_ids(buf: &[u8]) -> Result<Vec<BlockId>, DecodeError> {
    if !buf.len().is_multiple_of(32) {
        return Err(derr("block id list", "length is not a multiple of 32"));
    }
    if buf.len() / 32 > MAX_BATCH_BLOCKS {
        return Err(derr("block id list", "too many ids in one request"));
    }
    Ok(buf
        .chunks_exact(32)
        .map(|c| BlockId(c.try_into().expect("32 bytes")))
        .collect())
}

/// A bitmap, bit `i` (LSB first) set when `bits[i]`.
pub fn encode_bitmap(bits: &[bool]) -> Vec<u8> {
    let mut v = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            v[i / 8] |= 1 << (i % 8);
        }
    }
    v
}

/// Inverse of [`encode_bitmap`] for `n` bits.
pub fn decode_bitmap(buf: &[u8], n: usize) -> Result<Vec<bool>, DecodeError> {
    if buf.len() != n.div_ceil(8) {
        return Err(derr(
            "missing-block bitmap",
            format!("{} bytes for {n} ids", buf.len()),
        ));
    }
    Ok((0..n).map(|i| buf[i / 8] & (1 << (i % 8)) != 0).collect())
}

const KIND_ZERO: u8 = 0;
const KIND_EXISTING: u8 = 1;
const KIND_RAW: u8 = 2;
const KIND_ZSTD: u8 = 3;

/// A batch of blocks: for each, `u64 index (LE)`, a kind byte, then for `existing` the
/// 32-byte id, for `raw` the id, `u32 len` and the data, for `zstd` the id, `u32 len`
/// and the zstd frame of the data.
pub fn encode_blocks(blocks: &[IncomingBlock]) -> Vec<u8> {
    use rayon::prelude::*;
    // Compression is the expensive part: run it on all cores, then lay out in order.
    let mut compressed: Vec<Option<Vec<u8>>> = blocks
        .par_iter()
        .map(|b| match &b.content {
            BlockContent::Data { zstd: Some(z), .. } => Some(z.to_vec()),
            BlockContent::Data { data, .. } => codec::compress(data),
            _ => None,
        })
        .collect();
    let size: usize = blocks
        .iter()
        .zip(&compressed)
        .map(|(b, c)| match (&b.content, c) {
            (_, Some(c)) => 45 + c.len(),
            (BlockContent::Data { data, .. }, None) => 45 + data.len(),
            _ => 41,
        })
        .sum();
    let mut v = Vec::with_capacity(size);
    for (b, c) in blocks.iter().zip(compressed.iter_mut()) {
        v.extend_from_slice(&b.index.to_le_bytes());
        match &b.content {
            BlockContent::Zero => v.push(KIND_ZERO),
            BlockContent::Existing(id) => {
                v.push(KIND_EXISTING);
                v.extend_from_slice(id.as_bytes());
            }
            BlockContent::Data { id, data, .. } => {
                let (kind, bytes) = match c.take() {
                    Some(c) => (KIND_ZSTD, std::borrow::Cow::Owned(c)),
                    None => (KIND_RAW, std::borrow::Cow::Borrowed(data.as_ref())),
                };
                v.push(kind);
                v.extend_from_slice(id.as_bytes());
                v.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                v.extend_from_slice(&bytes);
            }
        }
    }
    v
}

/// Inverse of [`encode_blocks`]. Every data block must decode to exactly `block_size`
/// bytes whose BLAKE3 is its id: this is where data from the network is checked, before
/// any sink (which trusts ids) sees it. Uncompressed blocks stay slices of `buf`.
pub fn decode_blocks(buf: &Bytes, block_size: u64) -> Result<Vec<IncomingBlock>, DecodeError> {
    const W: &str = "block batch";
    let bs = block_size as usize;
    let mut out = Vec::new();
    let mut p = 0usize;
    let take = |p: &mut usize, n: usize| -> Result<&[u8], DecodeError> {
        let s = buf
            .get(*p..p.saturating_add(n))
            .ok_or_else(|| derr(W, format!("truncated at byte {}", *p)))?;
        *p += n;
        Ok(s)
    };
    while p < buf.len() {
        if out.len() >= MAX_BATCH_BLOCKS {
            return Err(derr(W, "too many blocks in one batch"));
        }
        let index = u64::from_le_bytes(take(&mut p, 8)?.try_into().expect("8 bytes"));
        let kind = take(&mut p, 1)?[0];
        let content = match kind {
            KIND_ZERO => BlockContent::Zero,
            KIND_EXISTING => {
                BlockContent::Existing(BlockId(take(&mut p, 32)?.try_into().expect("32 bytes")))
            }
            KIND_RAW | KIND_ZSTD => {
                let id = BlockId(take(&mut p, 32)?.try_into().expect("32 bytes"));
                let len =
                    u32::from_le_bytes(take(&mut p, 4)?.try_into().expect("4 bytes")) as usize;
                let at = p;
                let bytes = take(&mut p, len)?;
                let (data, zstd) = if kind == KIND_RAW {
                    (buf.slice(at..at + len), None)
                } else {
                    // Bounded: at most one block of output. The frame goes on to the
                    // sink, which may store it rather than compress again.
                    let plain = codec::decompress(bytes, bs)
                        .map_err(|e| derr(W, format!("block {index}: {e}")))?;
                    (plain.into(), Some(buf.slice(at..at + len)))
                };
                if data.len() != bs {
                    return Err(derr(
                        W,
                        format!(
                            "block {index} has {} bytes, the block size is {bs}",
                            data.len()
                        ),
                    ));
                }
                BlockContent::Data { id, data, zstd }
            }
            k => return Err(derr(W, format!("unknown block kind {k} at block {index}"))),
        };
        out.push(IncomingBlock { index, content });
    }
    verify_ids(&out)?;
    Ok(out)
}

/// Check that every data block hashes to its id, on all cores.
fn verify_ids(blocks: &[IncomingBlock]) -> Result<(), DecodeError> {
    use rayon::prelude::*;
    blocks.par_iter().try_for_each(|b| match &b.content {
        BlockContent::Data { id, data, .. } if BlockId::of(data) != *id => Err(derr(
            "block batch",
            format!("block {}: its data does not hash to its id {id}", b.index),
        )),
        _ => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_bad_ids_are_refused() {
        let bs = 8192u64;
        let a = vec![7u8; bs as usize];
        let b: Vec<u8> = (0..bs).map(|i| (i * 2654435761 % 251) as u8).collect();
        let blocks = vec![
            IncomingBlock {
                index: 0,
                content: BlockContent::Zero,
            },
            IncomingBlock {
                index: 1,
                content: BlockContent::Existing(BlockId::of(&a)),
            },
            IncomingBlock {
                index: 2,
                content: BlockContent::Data {
                    id: BlockId::of(&a),
                    data: a.clone().into(),
                    zstd: None,
                },
            },
            IncomingBlock {
                index: 3,
                content: BlockContent::Data {
                    id: BlockId::of(&b),
                    data: b.clone().into(),
                    zstd: None,
                },
            },
        ];
        let enc = Bytes::from(encode_blocks(&blocks));
        let mut decoded = decode_blocks(&enc, bs).unwrap();
        // Compressible blocks arrive with the frame they were sent as, for the sink.
        let mut frames = 0;
        for b in &mut decoded {
            if let BlockContent::Data { data, zstd, .. } = &mut b.content {
                if let Some(frame) = zstd.take() {
                    assert_eq!(codec::decompress(&frame, bs as usize).unwrap(), data[..]);
                    frames += 1;
                }
            }
        }
        assert!(frames >= 1, "the all-sevens block compresses");
        assert_eq!(decoded, blocks);
        assert!(decode_blocks(&enc, bs * 2).is_err());
        assert!(decode_blocks(&enc.slice(..enc.len() - 1), bs).is_err());
        let bad = encode_blocks(&[IncomingBlock {
            index: 9,
            content: BlockContent::Data {
                id: BlockId::of(&b),
                data: a.into(),
                zstd: None,
            },
        }]);
        let e = decode_blocks(&bad.into(), bs).unwrap_err().to_string();
        assert!(e.contains("does not hash"), "{e}");
    }

    #[test]
    fn ids_and_bitmaps_round_trip() {
        let ids: Vec<BlockId> = (0..10u8).map(|i| BlockId::of(&[i])).collect();
        assert_eq!(decode_ids(&encode_ids(&ids)).unwrap(), ids);
        assert!(decode_ids(&[0; 31]).is_err());
        let bits = vec![true, false, false, true, true, false, true, false, true];
        assert_eq!(decode_bitmap(&encode_bitmap(&bits), 9).unwrap(), bits);
        assert!(decode_bitmap(&[0], 9).is_err());
    }
}
