//! The wire protocol shared by client and server (see `docs/PROTOCOL.md`): version
//! header, JSON bodies, and the binary encodings of block-id lists and block batches.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use snapsync_core::{codec, BlockId, ExtentList, Origin, SnapshotInfo};
use snapsync_store::{BlockContent, BufferPool, Compressed, IncomingBlock, StoreError};

/// The protocol version this build speaks. Client and server refuse any other.
///
/// Version 4: a `read` answers with the range's blocks, each zero, plain or a zstd frame
/// (see [`encode_read_answer`]), so a puller passes the frames on to its destination
/// instead of compressing every block again.
/// Version 3: a `write` batch lists all its blocks before their data, so that block
/// data passes through both ends without being copied (see [`encode_blocks`]).
/// Version 2: `write` requests carry a [`SEQUENCE_HEADER`] and the server applies them
/// in its order, so a client may keep several in flight.
pub const PROTOCOL_VERSION: u32 = 4;
/// Header carrying [`PROTOCOL_VERSION`] on every request and response.
pub const VERSION_HEADER: &str = "snapsync-protocol";
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
/// Largest `chains` request body: it carries what the client knows of every manifest
/// of the volumes it asks about (about 150 bytes each), so that they are not read again.
pub const MAX_CHAINS_BODY: usize = 32 << 20;
/// The message of the `404` a server answers for an operation it does not know (an
/// older server asked for a newer operation): the client tells it from other `404`s.
pub const NO_SUCH_ENDPOINT: &str = "no such endpoint";
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
    /// How the served store found it (absent from older servers: metadata).
    #[serde(default)]
    pub method: snapsync_store::DiffMethod,
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

/// `POST .../chains`: a repository's chains, for a status page.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChainsRequest {
    /// The volumes asked about (those the store does not hold are left out).
    pub volumes: Vec<String>,
    /// What the client read of manifests before, by id: the server passes it on instead
    /// of reading those manifests again.
    #[serde(default)]
    pub known: snapsync_store::view::Known,
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
    /// Blocks the answer is cut into (`len` a multiple of it); absent: one block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
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

/// What kind of error a response carries; each kind has one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// No token, or one that is not accepted (401).
    Unauthorized,
    /// The token may not use this store, or may only read it (403).
    Forbidden,
    /// No such store, endpoint, volume, snapshot or session (404).
    NotFound,
    /// A receive session that has ended (410).
    Gone,
    /// A snapshot of that name exists (409).
    AlreadyExists,
    /// A concurrent change, or a receive session that had a refused request (409).
    Conflict,
    /// A request that does not decode, or names that are not valid (400).
    BadRequest,
    /// A body larger than its limit (413).
    TooLarge,
    /// An argument that is not valid here: an index past the end, an unknown block,
    /// an impossible time (400).
    InvalidArgument,
    /// Another protocol version (400).
    Version,
    /// Something the store cannot do (501).
    Unsupported,
    /// The store's input is not something it can read (422).
    Malformed,
    /// The store found damage (500).
    Corrupt,
    /// Anything else (500).
    Internal,
    /// A kind a later version sends, not known to this one (treated as internal).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The HTTP status this kind is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Gone => 410,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => 409,
            ErrorKind::BadRequest | ErrorKind::InvalidArgument | ErrorKind::Version => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unsupported => 501,
            ErrorKind::Malformed => 422,
            ErrorKind::Corrupt | ErrorKind::Internal | ErrorKind::Unknown => 500,
        }
    }
}

/// Every error response body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind; the response's status is [`ErrorKind::status`].
    pub kind: ErrorKind,
    /// The full one-line message.
    pub message: String,
    /// For the kinds that come from a [`StoreError`] with a subject (`not_found`,
    /// `already_exists`, `conflict`, `invalid_argument`, `unsupported`): that subject;
    /// for `malformed` and `corrupt`: the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
    /// For `malformed` and `corrupt`: the file or object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

impl ErrorBody {
    /// A body with only a message.
    pub fn new(kind: ErrorKind, message: String) -> Self {
        Self {
            kind,
            message,
            what: None,
            location: None,
        }
    }

    /// The body of a store error, keeping every field [`ErrorBody::to_store`] needs to
    /// give the client the same error back.
    pub fn from_store(e: &StoreError) -> ErrorBody {
        let mut body = ErrorBody::new(ErrorKind::Internal, e.to_string());
        let subject = |kind, what: &String| (kind, Some(what.clone()), None);
        let (kind, what, location) = match e {
            StoreError::NotFound { what } => subject(ErrorKind::NotFound, what),
            StoreError::AlreadyExists { what } => subject(ErrorKind::AlreadyExists, what),
            StoreError::Conflict { what } => subject(ErrorKind::Conflict, what),
            StoreError::InvalidArgument { what } => subject(ErrorKind::InvalidArgument, what),
            StoreError::Unsupported { what } => subject(ErrorKind::Unsupported, what),
            StoreError::InvalidName(_) => (ErrorKind::BadRequest, None, None),
            StoreError::Malformed { location, detail } => (
                ErrorKind::Malformed,
                Some(detail.clone()),
                Some(location.clone()),
            ),
            StoreError::Corrupt { location, detail } => (
                ErrorKind::Corrupt,
                Some(detail.clone()),
                Some(location.clone()),
            ),
            _ => (ErrorKind::Internal, None, None),
        };
        body.kind = kind;
        body.what = what;
        body.location = location;
        body
    }

    /// The store error this body stands for, as the client reports it; `context` (the
    /// request's URL and what was asked) is added where the server's words alone would
    /// not say where the error came from.
    pub fn to_store(self, context: &str) -> StoreError {
        match (self.kind, self.what, self.location) {
            (ErrorKind::NotFound, Some(what), _) => StoreError::NotFound {
                what: format!("{what} (at {context})"),
            },
            (ErrorKind::AlreadyExists, Some(what), _) => StoreError::AlreadyExists { what },
            (ErrorKind::Conflict, Some(what), _) => StoreError::Conflict { what },
            (ErrorKind::InvalidArgument, Some(what), _) => StoreError::InvalidArgument {
                what: format!("{what} (refused by {context})"),
            },
            (ErrorKind::Unsupported, Some(what), _) => StoreError::Unsupported { what },
            (ErrorKind::Malformed, Some(detail), Some(location)) => {
                StoreError::Malformed { location, detail }
            }
            (ErrorKind::Corrupt, Some(detail), Some(location)) => {
                StoreError::Corrupt { location, detail }
            }
            _ => StoreError::Backend {
                context: context.to_string(),
                source: format!(
                    "refused by the server ({} {}): {}",
                    self.kind.status(),
                    serde_json::to_value(self.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    self.message
                )
                .into(),
            },
        }
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
/// Plain data the sender found not worth compressing.
const KIND_RAW: u8 = 2;
const KIND_ZSTD: u8 = 3;

/// Bytes of one block's header entry: `u64 index`, the kind byte, the id, the length.
const ENTRY_LEN: usize = 45;

/// Upper bound of the bytes one block adds to a `write` body: its header entry and, for
/// new data, its plaintext (a zstd frame is only sent when smaller). Clients split
/// batches with this so that no body exceeds [`MAX_BODY`].
pub fn encoded_size(block: &IncomingBlock) -> usize {
    ENTRY_LEN
        + match &block.content {
            BlockContent::Data { data, .. } => data.len(),
            _ => 0,
        }
}

/// Encode a block batch (a `write` body) as the chunks to send, in order.
///
/// Layout (integers little-endian): `u32 header_len`, then the header, per block
/// `u64 index`, a kind byte, for `existing` the 32-byte id, for `raw` and `zstd` the id
/// and `u32 len`; then the data of the `raw` and `zstd` blocks in header order. Data
/// follows all the entries so that each block's data is one contiguous piece: the
/// sender passes it on as is (a slice of what it read) and the receiver keeps it as is
/// (a slice of the frame it arrived in). Neither end copies block data.
///
/// Blocks the sender has not tried to compress are compressed here, on all cores.
pub fn encode_blocks(blocks: &[IncomingBlock]) -> Vec<Bytes> {
    use rayon::prelude::*;
    let payloads: Vec<Option<(u8, Bytes)>> = blocks
        .par_iter()
        .map(|b| match &b.content {
            BlockContent::Data {
                data, compressed, ..
            } => Some(match compressed.frame_for(data) {
                Some(frame) => (KIND_ZSTD, frame),
                None => (KIND_RAW, data.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut header = Vec::with_capacity(4 + blocks.len() * ENTRY_LEN);
    header.extend_from_slice(&[0; 4]);
    let mut chunks = vec![];
    for (b, payload) in blocks.iter().zip(payloads) {
        header.extend_from_slice(&b.index.to_le_bytes());
        match (&b.content, payload) {
            (BlockContent::Data { id, .. }, Some((kind, bytes))) => {
                header.push(kind);
                header.extend_from_slice(id.as_bytes());
                header.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                chunks.push(bytes);
            }
            (BlockContent::Existing(id), _) => {
                header.push(KIND_EXISTING);
                header.extend_from_slice(id.as_bytes());
            }
            _ => header.push(KIND_ZERO),
        }
    }
    let header_len = (header.len() - 4) as u32;
    header[..4].copy_from_slice(&header_len.to_le_bytes());
    chunks.insert(0, header.into());
    chunks
}

/// The next `len` bytes of a body arriving in pieces, once they have all arrived: a slice
/// of `chunk` when they are whole in it (no copy), else gathered in `partial` across
/// pieces. Takes what it uses from the front of `chunk`.
fn next_piece(partial: &mut bytes::BytesMut, chunk: &mut Bytes, len: usize) -> Option<Bytes> {
    if partial.is_empty() && chunk.len() >= len {
        return Some(chunk.split_to(len));
    }
    let take = (len - partial.len()).min(chunk.len());
    partial.extend_from_slice(&chunk.split_to(take));
    (partial.len() == len).then(|| partial.split().freeze())
}

/// A body sent as the chunks it already is (block data stays the buffers it was read
/// or received into), each as it comes: `write` requests and `read` answers.
#[derive(Debug, Default)]
pub struct ChunksBody(pub std::collections::VecDeque<Bytes>);

impl From<Vec<Bytes>> for ChunksBody {
    fn from(chunks: Vec<Bytes>) -> Self {
        ChunksBody(chunks.into())
    }
}

impl http_body::Body for ChunksBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
    }
}

/// One block of a `read` answer, as the server sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadBlock {
    /// All zero: no data is sent.
    Zero,
    /// Plain data, which the server found not worth compressing.
    Raw(Bytes),
    /// A zstd frame of the block.
    Zstd(Bytes),
}

impl ReadBlock {
    /// How the server sends `block`: zero, compressed when worth it, or plain (a slice of
    /// what it read, not a copy).
    pub fn of(block: Bytes) -> Self {
        if snapsync_core::is_zero(&block) {
            return ReadBlock::Zero;
        }
        match codec::compress(&block) {
            Some(frame) => ReadBlock::Zstd(frame.into()),
            None => ReadBlock::Raw(block),
        }
    }
}

const READ_ANSWER: &str = "read answer";
/// Bytes of one block's entry in a `read` answer: the kind byte and `u32 len`.
const READ_ENTRY_LEN: usize = 5;

/// Encode a `read` answer as the chunks to send, in order.
///
/// Layout (little-endian): `u32 count`, then per block a kind byte (`zero`, `raw` or
/// `zstd`, numbered as in batches) and `u32 len` (0 for `zero`), then the data of the
/// `raw` and `zstd` blocks in order. As in a batch, each block's data is one piece the
/// server sends as is and the client can keep as is (a frame goes on to the sink).
pub fn encode_read_answer(blocks: Vec<ReadBlock>) -> Vec<Bytes> {
    let mut header = Vec::with_capacity(4 + blocks.len() * READ_ENTRY_LEN);
    header.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    let mut chunks = vec![Bytes::new()];
    for b in blocks {
        let (kind, data) = match b {
            ReadBlock::Zero => (KIND_ZERO, None),
            ReadBlock::Raw(d) => (KIND_RAW, Some(d)),
            ReadBlock::Zstd(f) => (KIND_ZSTD, Some(f)),
        };
        header.push(kind);
        header.extend_from_slice(&(data.as_ref().map_or(0, Bytes::len) as u32).to_le_bytes());
        chunks.extend(data);
    }
    chunks[0] = header.into();
    chunks
}

/// The largest well-formed answer to a read of `len` bytes in blocks of `block_size`:
/// a client stops reading a body beyond it.
pub fn read_answer_limit(len: usize, block_size: usize) -> usize {
    4 + len.div_ceil(block_size.max(1)) * READ_ENTRY_LEN + len
}

/// Decodes a `read` answer (see [`encode_read_answer`]) into the caller's buffer as its
/// body arrives: plain data is copied into place at once, frames are kept (slices of the
/// body where whole) and decompressed into place by [`ReadAnswerDecoder::finish`].
pub struct ReadAnswerDecoder<'a> {
    buf: &'a mut [u8],
    block_size: usize,
    /// The count and the entries, until complete.
    head: Vec<u8>,
    /// Kind and data length of each block, once the header is complete.
    entries: Option<Vec<(u8, usize)>>,
    /// First block whose data has not fully arrived, and how much of it has.
    next: usize,
    arrived: usize,
    /// Frame of block `next` gathered across pieces of the body.
    partial: bytes::BytesMut,
    /// Frames by block.
    frames: Vec<(usize, Bytes)>,
}

impl std::fmt::Debug for ReadAnswerDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAnswerDecoder")
            .field("len", &self.buf.len())
            .field("block_size", &self.block_size)
            .field("next", &self.next)
            .finish()
    }
}

impl<'a> ReadAnswerDecoder<'a> {
    /// A decoder filling `buf` with blocks of `block_size` bytes (the last may be
    /// shorter).
    pub fn new(buf: &'a mut [u8], block_size: usize) -> Self {
        ReadAnswerDecoder {
            buf,
            block_size: block_size.max(1),
            head: Vec::new(),
            entries: None,
            next: 0,
            arrived: 0,
            partial: bytes::BytesMut::new(),
            frames: Vec::new(),
        }
    }

    fn block_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * self.block_size;
        start..(start + self.block_size).min(self.buf.len())
    }

    /// Take the next piece of the body.
    pub fn feed(&mut self, mut chunk: Bytes) -> Result<(), DecodeError> {
        while !chunk.is_empty() {
            let Some(entries) = &self.entries else {
                let want = match self.head.get(..4) {
                    None => 4,
                    Some(p) => {
                        4 + u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize
                            * READ_ENTRY_LEN
                    }
                };
                let take = (want - self.head.len()).min(chunk.len());
                self.head.extend_from_slice(&chunk.split_to(take));
                if self.head.len() == 4 {
                    let n = u32::from_le_bytes(self.head[..4].try_into().expect("4 bytes"));
                    let blocks = self.buf.len().div_ceil(self.block_size);
                    if n as usize != blocks {
                        return Err(derr(
                            READ_ANSWER,
                            format!("{n} blocks where {blocks} were asked for"),
                        ));
                    }
                }
                let complete = self.head.get(..4).is_some_and(|p| {
                    let n = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
                    self.head.len() == 4 + n * READ_ENTRY_LEN
                });
                if complete {
                    self.entries = Some(self.parse_entries()?);
                }
                continue;
            };
            while entries.get(self.next).is_some_and(|e| e.1 == 0) {
                self.next += 1;
            }
            let Some(&(kind, len)) = entries.get(self.next) else {
                return Err(derr(
                    READ_ANSWER,
                    format!("{} bytes after the last block's data", chunk.len()),
                ));
            };
            let range = self.block_range(self.next);
            if kind == KIND_RAW {
                let take = (len - self.arrived).min(chunk.len());
                let at = range.start + self.arrived;
                self.buf[at..at + take].copy_from_slice(&chunk.split_to(take));
                self.arrived += take;
                if self.arrived < len {
                    continue;
                }
            } else {
                let Some(frame) = next_piece(&mut self.partial, &mut chunk, len) else {
                    continue;
                };
                self.frames.push((self.next, frame));
            }
            self.next += 1;
            self.arrived = 0;
        }
        Ok(())
    }

    fn parse_entries(&self) -> Result<Vec<(u8, usize)>, DecodeError> {
        self.head[4..]
            .chunks(READ_ENTRY_LEN)
            .enumerate()
            .map(|(i, e)| {
                let kind = e[0];
                let len = u32::from_le_bytes(e[1..5].try_into().expect("4 bytes")) as usize;
                let block = self.block_range(i).len();
                let ok = match kind {
                    KIND_ZERO => len == 0,
                    KIND_RAW => len == block,
                    KIND_ZSTD => len > 0 && len <= block,
                    _ => false,
                };
                if ok {
                    Ok((kind, len))
                } else {
                    Err(derr(
                        READ_ANSWER,
                        format!("block {i}: kind {kind} with {len} bytes of data for a block of {block}"),
                    ))
                }
            })
            .collect()
    }

    /// Once the body has ended: decompress the frames into place, zero the zero blocks,
    /// and tell for each block what the server knew about compressing it.
    pub fn finish(self) -> Result<Vec<Compressed>, DecodeError> {
        let ReadAnswerDecoder {
            buf,
            block_size,
            entries,
            next,
            frames,
            ..
        } = self;
        let Some(entries) = entries else {
            return Err(derr(READ_ANSWER, "truncated in the header"));
        };
        if let Some(i) = (next..entries.len()).find(|&i| entries[i].1 > 0) {
            return Err(derr(
                READ_ANSWER,
                format!("truncated in the data of block {i}"),
            ));
        }
        let len = buf.len();
        let range = |i: usize| i * block_size..((i + 1) * block_size).min(len);
        let mut out = Vec::with_capacity(entries.len());
        for (i, &(kind, _)) in entries.iter().enumerate() {
            out.push(match kind {
                KIND_RAW => Compressed::NotWorthIt,
                KIND_ZERO => {
                    buf[range(i)].fill(0);
                    Compressed::NotTried
                }
                _ => Compressed::NotTried,
            });
        }
        for (i, frame) in frames {
            codec::decompress_into(&frame, &mut buf[range(i)])
                .map_err(|e| derr(READ_ANSWER, format!("block {i}: {e}")))?;
            out[i] = Compressed::Zstd(frame);
        }
        Ok(out)
    }
}

/// Refuse a block whose data does not hash to the id it was sent with.
fn check_id(e: &Entry, data: &[u8]) -> Result<(), DecodeError> {
    if BlockId::of(data) == e.id {
        Ok(())
    } else {
        Err(derr(
            BATCH,
            format!(
                "block {}: its data does not hash to its id {}",
                e.index, e.id
            ),
        ))
    }
}

/// One block of a batch being decoded.
struct Entry {
    index: u64,
    kind: u8,
    id: BlockId,
    /// Bytes of data the block has in the body (0 for `zero` and `existing`).
    len: usize,
    data: Option<Bytes>,
}

/// Decodes a block batch (see [`encode_blocks`]) as its body arrives, frame by frame.
///
/// Block data stays slices of the frames it arrived in; only a block split across
/// frames is gathered into a buffer of its own (at most one block at a time).
pub struct BatchDecoder {
    block_size: usize,
    received: usize,
    /// The length prefix and the header, until complete.
    head: Vec<u8>,
    /// Parsed header, once complete.
    entries: Option<Vec<Entry>>,
    /// First entry whose data has not fully arrived.
    next: usize,
    /// Data of entry `next` gathered across frames.
    partial: bytes::BytesMut,
}

const BATCH: &str = "block batch";

impl std::fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder")
            .field("block_size", &self.block_size)
            .field("received", &self.received)
            .field("blocks", &self.entries.as_ref().map(Vec::len))
            .field("next", &self.next)
            .finish()
    }
}

impl BatchDecoder {
    /// A decoder for blocks of `block_size` bytes.
    pub fn new(block_size: u64) -> Self {
        BatchDecoder {
            block_size: block_size as usize,
            received: 0,
            head: Vec::new(),
            entries: None,
            next: 0,
            partial: bytes::BytesMut::new(),
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Whether [`Self::finish`] has frames to decompress (and check): work for a
    /// blocking thread. Without, it only assembles what has been checked already.
    pub fn has_frames(&self) -> bool {
        self.entries.iter().flatten().any(|e| e.kind == KIND_ZSTD)
    }

    /// Take the next piece of the body.
    pub fn feed(&mut self, mut chunk: Bytes) -> Result<(), DecodeError> {
        self.received += chunk.len();
        while !chunk.is_empty() {
            let Some(entries) = &mut self.entries else {
                let want = match self.head.get(..4) {
                    None => 4,
                    Some(p) => 4 + u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize,
                };
                let take = (want - self.head.len()).min(chunk.len());
                self.head.extend_from_slice(&chunk.split_to(take));
                if let Some(p) = self.head.get(..4) {
                    let n = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
                    if n > MAX_BATCH_BLOCKS * ENTRY_LEN {
                        return Err(derr(BATCH, format!("a header of {n} bytes is too large")));
                    }
                    if self.head.len() == 4 + n {
                        self.entries = Some(self.parse_header()?);
                    }
                }
                continue;
            };
            while entries.get(self.next).is_some_and(|e| e.len == 0) {
                self.next += 1;
            }
            let Some(e) = entries.get_mut(self.next) else {
                return Err(derr(
                    BATCH,
                    format!("{} bytes after the last block's data", chunk.len()),
                ));
            };
            let Some(data) = next_piece(&mut self.partial, &mut chunk, e.len) else {
                continue;
            };
            // Plain data is checked as it arrives, while the receive copy left it in
            // cache: later (a batch or more) it would be read from memory again.
            if e.kind == KIND_RAW {
                check_id(e, &data)?;
            }
            e.data = Some(data);
            self.next += 1;
        }
        Ok(())
    }

    fn parse_header(&self) -> Result<Vec<Entry>, DecodeError> {
        let bs = self.block_size;
        let mut buf = &self.head[4..];
        let mut take = |n: usize| -> Result<&[u8], DecodeError> {
            if buf.len() < n {
                return Err(derr(BATCH, "the header ends inside an entry"));
            }
            let (a, b) = buf.split_at(n);
            buf = b;
            Ok(a)
        };
        let mut entries = Vec::new();
        while let Ok(index) = take(8) {
            let index = u64::from_le_bytes(index.try_into().expect("8 bytes"));
            if entries.len() >= MAX_BATCH_BLOCKS {
                return Err(derr(BATCH, "too many blocks in one batch"));
            }
            let kind = take(1)?[0];
            let (id, len) = match kind {
                KIND_ZERO => (BlockId([0; 32]), 0),
                KIND_EXISTING => (BlockId(take(32)?.try_into().expect("32 bytes")), 0),
                KIND_RAW | KIND_ZSTD => {
                    let id = BlockId(take(32)?.try_into().expect("32 bytes"));
                    let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
                    // Plain data is exactly one block; a frame is only sent when smaller.
                    let ok = if kind == KIND_RAW {
                        len == bs
                    } else {
                        len > 0 && len <= bs
                    };
                    if !ok {
                        return Err(derr(
                            BATCH,
                            format!(
                                "block {index} has {len} bytes of data, the block size is {bs}"
                            ),
                        ));
                    }
                    (id, len)
                }
                k => {
                    return Err(derr(
                        BATCH,
                        format!("unknown block kind {k} at block {index}"),
                    ))
                }
            };
            entries.push(Entry {
                index,
                kind,
                id,
                len,
                data: None,
            });
        }
        if !buf.is_empty() {
            return Err(derr(BATCH, "the header ends inside an entry"));
        }
        Ok(entries)
    }

    /// The decoded blocks, once the body has ended. Every data block must decode to
    /// exactly `block_size` bytes whose BLAKE3 is its id, checked before any sink (which
    /// trusts ids) sees it: plain blocks were checked by [`Self::feed`] as they arrived.
    ///
    /// Compressed blocks are decompressed into one buffer from `plain` (given back to it
    /// at once; it is lent again once the sink has let go of the blocks), on all cores,
    /// and each is checked as it is decompressed, while in cache.
    pub fn finish(self, plain: &BufferPool) -> Result<Vec<IncomingBlock>, DecodeError> {
        use rayon::prelude::*;
        let bs = self.block_size;
        let Some(entries) = self.entries else {
            return Err(derr(
                BATCH,
                format!("truncated in the header, at byte {}", self.received),
            ));
        };
        if let Some(e) = entries.iter().find(|e| e.len > 0 && e.data.is_none()) {
            return Err(derr(
                BATCH,
                format!("truncated in the data of block {}", e.index),
            ));
        }
        let frames: Vec<&Entry> = entries.iter().filter(|e| e.kind == KIND_ZSTD).collect();
        // Without frames there is nothing to decompress: no buffer, and no parallel call
        // (even on nothing, one hands work to the pool and wakes it).
        let buf = if frames.is_empty() {
            Bytes::new()
        } else {
            let mut buf = plain.take(frames.len() * bs);
            buf.par_chunks_mut(bs)
                .zip(frames.par_iter())
                .try_for_each(|(dst, e)| {
                    // Bounded: exactly one block of output whatever the frame claims.
                    let frame = e.data.as_deref().unwrap_or_default();
                    codec::decompress_into(frame, dst)
                        .map_err(|err| derr(BATCH, format!("block {}: {err}", e.index)))?;
                    check_id(e, dst)
                })?;
            let buf = buf.freeze();
            plain.give_back(buf.clone());
            buf
        };
        let mut next_frame = 0;
        let slots: Vec<usize> = entries
            .iter()
            .map(|e| {
                let slot = next_frame;
                next_frame += usize::from(e.kind == KIND_ZSTD);
                slot
            })
            .collect();
        // Cheap per block (slices of buffers already checked): no threads to wake.
        entries
            .into_iter()
            .zip(slots)
            .map(|(e, slot)| {
                let content = match (e.kind, &e.data) {
                    (KIND_ZERO, _) => BlockContent::Zero,
                    (KIND_EXISTING, _) => BlockContent::Existing(e.id),
                    // Checked as it arrived.
                    (KIND_RAW, Some(bytes)) => BlockContent::Data {
                        id: e.id,
                        data: bytes.clone(),
                        compressed: Compressed::NotWorthIt,
                    },
                    // Checked above. The frame goes on to the sink, which may store it
                    // rather than compress again.
                    (_, Some(frame)) => BlockContent::Data {
                        id: e.id,
                        data: buf.slice(slot * bs..(slot + 1) * bs),
                        compressed: Compressed::Zstd(frame.clone()),
                    },
                    (_, None) => return Err(derr(BATCH, format!("no data for block {}", e.index))),
                };
                Ok(IncomingBlock {
                    index: e.index,
                    content,
                })
            })
            .collect()
    }
}

/// Decode a whole block batch at once (see [`BatchDecoder`]).
pub fn decode_blocks(body: &[Bytes], block_size: u64) -> Result<Vec<IncomingBlock>, DecodeError> {
    let mut d = BatchDecoder::new(block_size);
    for chunk in body {
        d.feed(chunk.clone())?;
    }
    d.finish(&BufferPool::new(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id_of: &[u8], data: &[u8], compressed: Compressed) -> BlockContent {
        BlockContent::Data {
            id: BlockId::of(id_of),
            data: Bytes::copy_from_slice(data),
            compressed,
        }
    }

    /// Blocks of every kind, as an engine or a server hands them over.
    fn sample(bs: u64) -> (Vec<IncomingBlock>, Vec<u8>) {
        let a = vec![7u8; bs as usize];
        let b: Vec<u8> = (0..bs).map(|i| (i * 2654435761 % 251) as u8).collect();
        let contents = vec![
            BlockContent::Zero,
            BlockContent::Existing(BlockId::of(&a)),
            data(&a, &a, Compressed::NotTried),
            data(&b, &b, Compressed::NotTried),
            data(&b, &b, Compressed::NotWorthIt),
            data(&a, &a, Compressed::from_attempt(codec::compress(&a))),
        ];
        let blocks = contents
            .into_iter()
            .enumerate()
            .map(|(i, content)| IncomingBlock {
                index: 10 + i as u64,
                content,
            })
            .collect();
        (blocks, b)
    }

    /// What a receiver gets for what was sent: the sender's verdict on compression
    /// travels with the block (tried and compressed, or tried and not worth it).
    fn as_received(blocks: &[IncomingBlock]) -> Vec<IncomingBlock> {
        let mut v = blocks.to_vec();
        for b in &mut v {
            if let BlockContent::Data {
                data, compressed, ..
            } = &mut b.content
            {
                if *compressed == Compressed::NotTried {
                    *compressed = Compressed::from_attempt(codec::compress(data));
                }
            }
        }
        v
    }

    #[test]
    fn blocks_round_trip_however_the_body_is_cut() {
        let bs = 8192u64;
        let (blocks, _) = sample(bs);
        let body = encode_blocks(&blocks);
        let whole: Vec<u8> = body.iter().flat_map(|c| c.iter().copied()).collect();
        let expected = as_received(&blocks);
        assert!(
            expected.iter().any(|b| matches!(
                &b.content,
                BlockContent::Data {
                    compressed: Compressed::Zstd(_),
                    ..
                }
            )) && expected.iter().any(|b| matches!(
                &b.content,
                BlockContent::Data {
                    compressed: Compressed::NotWorthIt,
                    ..
                }
            )),
            "the sample has compressed and plain blocks"
        );
        assert_eq!(decode_blocks(&body, bs).unwrap(), expected);
        for piece in [1usize, 3, 45, 1000, 8191, 8192, 8193, 20000] {
            let cut: Vec<Bytes> = whole.chunks(piece).map(Bytes::copy_from_slice).collect();
            assert_eq!(
                decode_blocks(&cut, bs).unwrap(),
                expected,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn block_data_that_arrives_whole_is_not_copied() {
        let bs = 8192u64;
        let (blocks, _) = sample(bs);
        let body = encode_blocks(&blocks);
        let sent: Vec<*const u8> = body[1..].iter().map(|c| c.as_ptr()).collect();
        let decoded = decode_blocks(&body, bs).unwrap();
        let plain: Vec<*const u8> = decoded
            .iter()
            .filter_map(|b| match &b.content {
                BlockContent::Data {
                    data,
                    compressed: Compressed::NotWorthIt,
                    ..
                } => Some(data.as_ptr()),
                BlockContent::Data {
                    compressed: Compressed::Zstd(frame),
                    ..
                } => Some(frame.as_ptr()),
                _ => None,
            })
            .collect();
        assert_eq!(plain, sent);
    }

    #[test]
    fn malformed_batches_are_refused() {
        let bs = 8192u64;
        let (blocks, b) = sample(bs);
        let body = encode_blocks(&blocks);
        let whole: Vec<u8> = body.iter().flat_map(|c| c.iter().copied()).collect();
        let refused = |bytes: &[u8], size: u64| {
            decode_blocks(&[Bytes::copy_from_slice(bytes)], size)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&whole, bs * 2).contains("block size"));
        assert!(refused(&whole[..whole.len() - 1], bs).contains("truncated in the data"));
        assert!(refused(&whole[..10], bs).contains("truncated in the header"));
        let mut extra = whole.clone();
        extra.push(0);
        assert!(refused(&extra, bs).contains("after the last block"));
        let mut kind = whole.clone();
        kind[4 + 8] = 9;
        assert!(refused(&kind, bs).contains("unknown block kind 9"));
        assert!(refused(&u32::MAX.to_le_bytes(), bs).contains("too large"));
        let wrong_id = encode_blocks(&[IncomingBlock {
            index: 9,
            content: data(&[1], &b, Compressed::NotWorthIt),
        }]);
        let e = decode_blocks(&wrong_id, bs).unwrap_err().to_string();
        assert!(e.contains("does not hash"), "{e}");
        // Plain data is checked as it arrives: fed in pieces, the block is refused by
        // the piece that completes it, before the body has ended.
        let bytes: Vec<u8> = wrong_id.iter().flat_map(|c| c.iter().copied()).collect();
        let mut d = BatchDecoder::new(bs);
        let e = bytes
            .chunks(1000)
            .try_for_each(|p| d.feed(Bytes::copy_from_slice(p)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hash"), "{e}");
        // A frame that is not zstd is refused, not trusted.
        let bad_frame = encode_blocks(&[IncomingBlock {
            index: 3,
            content: data(&b, &b, Compressed::Zstd(Bytes::from_static(b"not zstd"))),
        }]);
        assert!(decode_blocks(&bad_frame, bs).is_err());
    }

    /// A range of four blocks and a short tail: zero, compressible, random, compressible
    /// again, and a random short one.
    fn read_range(bs: usize) -> Vec<u8> {
        let mut r = vec![0u8; bs];
        r.extend(std::iter::repeat_n(7u8, bs));
        r.extend(snapsync_store::sample::pseudo_random(1, bs));
        r.extend(std::iter::repeat_n(9u8, bs));
        r.extend(snapsync_store::sample::pseudo_random(2, bs / 2));
        r
    }

    fn answer_for(range: &[u8], bs: usize) -> Vec<Bytes> {
        let all = Bytes::copy_from_slice(range);
        encode_read_answer(
            (0..range.len().div_ceil(bs))
                .map(|i| ReadBlock::of(all.slice(i * bs..((i + 1) * bs).min(range.len()))))
                .collect(),
        )
    }

    fn read_answer(
        pieces: &[Bytes],
        len: usize,
        bs: usize,
    ) -> Result<(Vec<u8>, Vec<Compressed>), DecodeError> {
        // Garbage in the buffer: every byte must be written, zero blocks included.
        let mut buf = vec![0xAAu8; len];
        let mut d = ReadAnswerDecoder::new(&mut buf, bs);
        for p in pieces {
            d.feed(p.clone())?;
        }
        let c = d.finish()?;
        Ok((buf, c))
    }

    #[test]
    fn read_answers_round_trip_however_the_body_is_cut() {
        let bs = 8192;
        let range = read_range(bs);
        let answer = answer_for(&range, bs);
        let (got, compressed) = read_answer(&answer, range.len(), bs).unwrap();
        assert!(got == range);
        assert!(matches!(compressed[0], Compressed::NotTried), "zero block");
        assert!(matches!(compressed[1], Compressed::Zstd(_)));
        assert_eq!(compressed[2], Compressed::NotWorthIt);
        assert_eq!(compressed.len(), 5);
        // A frame passed on decompresses to its block.
        let Compressed::Zstd(f) = &compressed[3] else {
            panic!("not a frame")
        };
        assert_eq!(codec::decompress(f, bs).unwrap(), &range[3 * bs..4 * bs]);
        let whole: Vec<u8> = answer.iter().flat_map(|c| c.to_vec()).collect();
        for cut in [1, 3, 4, 5, 9, 700, 8191, 8193] {
            let pieces: Vec<Bytes> = whole.chunks(cut).map(Bytes::copy_from_slice).collect();
            let (got, again) = read_answer(&pieces, range.len(), bs).unwrap();
            assert!(got == range, "cut every {cut} bytes");
            assert_eq!(again, compressed, "cut every {cut} bytes");
        }
        // One block: a range read without a block size.
        let one = answer_for(&range, range.len());
        assert!(read_answer(&one, range.len(), range.len()).unwrap().0 == range);
        // An empty read.
        assert!(read_answer(&answer_for(&[], 1), 0, 1).unwrap().0.is_empty());
    }

    #[test]
    fn malformed_read_answers_are_refused() {
        let bs = 8192;
        let range = read_range(bs);
        let whole: Vec<u8> = answer_for(&range, bs)
            .iter()
            .flat_map(|c| c.to_vec())
            .collect();
        let refused = |body: Vec<u8>, why: &str| {
            let e = read_answer(&[Bytes::from(body)], range.len(), bs);
            assert!(e.is_err(), "accepted: {why}");
        };
        refused(whole[..whole.len() - 1].to_vec(), "truncated data");
        refused(whole[..7].to_vec(), "truncated header");
        let mut extra = whole.clone();
        extra.push(0);
        refused(extra, "a byte after the data");
        let mut count = whole.clone();
        count[0] += 1;
        refused(count, "more blocks than asked for");
        let mut kind = whole.clone();
        kind[4 + READ_ENTRY_LEN] = 1;
        refused(kind, "an `existing` block in a read");
        let mut raw_len = whole.clone();
        raw_len[4 + 2 * READ_ENTRY_LEN + 1] ^= 1;
        refused(raw_len, "plain data of the wrong length");
        let header = 4 + 5 * READ_ENTRY_LEN;
        let mut frame = whole.clone();
        frame[header + 4] ^= 0xFF;
        refused(frame, "a damaged frame");
        assert!(read_answer(&[Bytes::from(whole)], range.len(), bs).is_ok());
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
