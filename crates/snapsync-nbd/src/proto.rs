//! The NBD wire protocol: magic numbers, option and command codes, and the encoding of
//! every message the server sends. Pure data, shared by the server (and by a client).
//!
//! Source of truth: the NBD protocol document (`doc/proto.md` of the NBD project) as
//! QEMU and libnbd implement it. Integers are big-endian.

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option a client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server): fixed newstyle, and no 124 zero bytes after EXPORT_NAME.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// See [`FLAG_FIXED_NEWSTYLE`].
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// See [`FLAG_C_FIXED_NEWSTYLE`].
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export cannot be written.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLAG_DF` is understood.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see the same data (true: it never changes).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_ABORT: u32 = 2;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_LIST: u32 = 3;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_STARTTLS: u32 = 5;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_INFO: u32 = 6;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_GO: u32 = 7;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// See [`REP_ACK`].
pub const REP_SERVER: u32 = 2;
/// See [`REP_ACK`].
pub const REP_INFO: u32 = 3;
/// See [`REP_ACK`].
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option errors.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// `OPT_INFO` / `OPT_GO` information types.
pub const INFO_EXPORT: u16 = 0;
/// See [`INFO_EXPORT`].
pub const INFO_NAME: u16 = 1;
/// See [`INFO_EXPORT`].
pub const INFO_DESCRIPTION: u16 = 2;
/// See [`INFO_EXPORT`].
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// See [`CMD_READ`].
pub const CMD_WRITE: u16 = 1;
/// See [`CMD_READ`].
pub const CMD_DISC: u16 = 2;
/// See [`CMD_READ`].
pub const CMD_FLUSH: u16 = 3;
/// See [`CMD_READ`].
pub const CMD_TRIM: u16 = 4;
/// See [`CMD_READ`].
pub const CMD_CACHE: u16 = 5;
/// See [`CMD_READ`].
pub const CMD_WRITE_ZEROES: u16 = 6;
/// See [`CMD_READ`].
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// See [`CMD_FLAG_DF`].
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// See [`CMD_FLAG_DF`].
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// See [`REPLY_FLAG_DONE`].
pub const REPLY_TYPE_NONE: u16 = 0;
/// See [`REPLY_FLAG_DONE`].
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// See [`REPLY_FLAG_DONE`].
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// See [`REPLY_FLAG_DONE`].
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1 << 0;
/// See [`STATE_HOLE`].
pub const STATE_ZERO: u32 = 1 << 1;

/// Errors (errno values, as the protocol fixes them).
pub const EPERM: u32 = 1;
/// See [`EPERM`].
pub const EIO: u32 = 5;
/// See [`EPERM`].
pub const EINVAL: u32 = 22;
/// See [`EPERM`].
pub const EOVERFLOW: u32 = 75;
/// See [`EPERM`].
pub const ENOTSUP: u32 = 95;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest option a client may send: NBD's own limit for names and queries is
/// 4 KiB each; a few of them fit.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// The 20-byte header of an option reply, followed by `len` bytes of data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A request's fixed 28 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Encoded size.
    pub const LEN: usize = 28;

    /// Decode; `None` when the magic is wrong (the stream cannot be trusted after it).
    pub fn decode(b: &[u8; Self::LEN]) -> Option<Self> {
        let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let be32 = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        (be32(0) == REQUEST_MAGIC).then(|| Request {
            flags: be16(4),
            command: be16(6),
            cookie: be64(8),
            offset: be64(16),
            length: be32(24),
        })
    }

    /// Encode (for clients and tests).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (16 bytes); data follows for a successful read.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes) for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A complete structured error chunk (the last of its reply).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let mut v = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        (6 + message.len()) as u32,
    )
    .to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(message.len() as u16).to_be_bytes());
    v.extend_from_slice(message);
    v
}

/// One `base:allocation` extent: `len` bytes in state `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u32,
    /// [`STATE_HOLE`] and/or [`STATE_ZERO`], or 0 for data.
    pub flags: u32,
}

/// A complete block-status chunk (the last of its reply) for context `context_id`.
pub fn block_status_chunk(cookie: u64, context_id: u32, extents: &[StatusExtent]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len as u32).to_vec();
    v.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        v.extend_from_slice(&e.len.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_a_bad_magic_is_refused() {
        let r = Request {
            flags: CMD_FLAG_DF,
            command: CMD_READ,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 65536,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn replies_have_the_lengths_the_protocol_fixes() {
        assert_eq!(option_reply(OPT_GO, REP_ACK, &[]).len(), 20);
        assert_eq!(simple_reply(1, 0).len(), 16);
        let e = error_chunk(7, EPERM, "read-only");
        assert_eq!(e.len(), 20 + 6 + 9);
        assert_eq!(u32::from_be_bytes(e[16..20].try_into().unwrap()), 15);
        let s = block_status_chunk(
            7,
            1,
            &[StatusExtent {
                len: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(s.len(), 20 + 4 + 8);
    }
}
