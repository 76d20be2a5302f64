//! An NBD client: what snapsync needs to read a running VM's disk from QEMU's own NBD
//! server (the live-VM source): fixed newstyle negotiation with `OPT_GO`, structured
//! replies, `SET_META_CONTEXT` for `base:allocation` and `qemu:dirty-bitmap:NAME`,
//! `BLOCK_STATUS`, and many reads in flight on one connection.
//!
//! Blocking and single-threaded: one connection is driven by one thread, which keeps up
//! to [`WINDOW`] requests in flight ([`Client::read_many`]). Every reply is checked
//! against what was asked (its cookie, its offsets, its lengths), so a confused or
//! hostile server is an error, never wrong data.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;

use crate::proto::*;

/// Requests kept in flight by [`Client::read_many`].
pub const WINDOW: usize = 16;

/// What can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The connection failed.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server refused an option (negotiation).
    #[error("NBD server refused {option}: {message} (reply {reply:#x})")]
    Refused {
        /// The option.
        option: &'static str,
        /// The reply type.
        reply: u32,
        /// The server's words.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD server: {message} (errno {errno}) at offset {offset}")]
    Server {
        /// The protocol's errno value.
        errno: u32,
        /// The server's words, if any.
        message: String,
        /// The request's offset.
        offset: u64,
    },
}

fn protocol(what: impl Into<String>) -> NbdError {
    NbdError::Protocol(what.into())
}

/// A connection in transmission phase.
pub struct Client {
    stream: Box<dyn ReadWrite>,
    size: u64,
    transmission_flags: u16,
    contexts: HashMap<String, u32>,
    next_cookie: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("contexts", &self.contexts)
            .finish()
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The context's flags (`base:allocation`: [`STATE_HOLE`], [`STATE_ZERO`]; a dirty
    /// bitmap: 1 when dirty).
    pub flags: u32,
}

impl Client {
    /// Connect to a unix socket and open `export`, selecting `contexts`.
    pub fn connect_unix(path: &Path, export: &str, contexts: &[&str]) -> Result<Self, NbdError> {
        Self::connect_unix_with(path, export, contexts, |_| {})
    }

    /// [`Client::connect_unix`], handing `keep` a clone of the socket first: shutting
    /// that clone down makes every call of this client fail at once (how a run is
    /// interrupted).
    pub fn connect_unix_with(
        path: &Path,
        export: &str,
        contexts: &[&str],
        keep: impl FnOnce(std::os::unix::net::UnixStream),
    ) -> Result<Self, NbdError> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        keep(s.try_clone()?);
        Self::negotiate(Box::new(s), export, contexts)
    }

    /// Connect over TCP (plain) and open `export`, selecting `contexts`.
    pub fn connect_tcp(addr: &str, export: &str, contexts: &[&str]) -> Result<Self, NbdError> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Self::negotiate(Box::new(s), export, contexts)
    }

    fn negotiate(
        mut s: Box<dyn ReadWrite>,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if u64::from_be_bytes(hello[0..8].try_into().expect("8")) != NBD_MAGIC
            || u64::from_be_bytes(hello[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(protocol("not an NBD server speaking newstyle"));
        }
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak fixed newstyle"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&client_flags.to_be_bytes())?;

        send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
        expect_ack(&mut s, OPT_STRUCTURED_REPLY, "STRUCTURED_REPLY")?;

        let mut ids = HashMap::new();
        if !contexts.is_empty() {
            let mut data = name_field(export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                data.extend_from_slice(&(c.len() as u32).to_be_bytes());
                data.extend_from_slice(c.as_bytes());
            }
            send_option(&mut s, OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (reply, body) = option_reply_of(&mut s, OPT_SET_META_CONTEXT)?;
                match reply {
                    REP_META_CONTEXT if body.len() >= 4 => {
                        let id = u32::from_be_bytes(body[0..4].try_into().expect("4"));
                        let name = String::from_utf8_lossy(&body[4..]).into_owned();
                        ids.insert(name, id);
                    }
                    REP_ACK => break,
                    r => return Err(refused("SET_META_CONTEXT", r, &body)),
                }
            }
            if let Some(missing) = contexts.iter().find(|c| !ids.contains_key(**c)) {
                return Err(NbdError::Refused {
                    option: "SET_META_CONTEXT",
                    reply: REP_ACK,
                    message: format!("the server has no meta context {missing:?}"),
                });
            }
        }

        let mut data = name_field(export);
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, OPT_GO, &data)?;
        let mut export_info = None;
        loop {
            let (reply, body) = option_reply_of(&mut s, OPT_GO)?;
            match reply {
                REP_INFO if body.len() >= 2 => {
                    if u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT && body.len() == 12 {
                        export_info = Some((
                            u64::from_be_bytes(body[2..10].try_into().expect("8")),
                            u16::from_be_bytes([body[10], body[11]]),
                        ));
                    }
                }
                REP_ACK => break,
                r => return Err(refused("GO", r, &body)),
            }
        }
        let (size, transmission_flags) =
            export_info.ok_or_else(|| protocol("GO ended without the export's size"))?;
        Ok(Self {
            stream: s,
            size,
            transmission_flags,
            contexts: ids,
            next_cookie: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & FLAG_READ_ONLY != 0
    }

    /// Fill `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.read_many(&mut [(offset, buf)])
    }

    /// Fill every `(offset, buffer)`, keeping up to [`WINDOW`] requests in flight.
    pub fn read_many(&mut self, requests: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        let mut pending: HashMap<u64, usize> = HashMap::new();
        let mut next = 0;
        while next < requests.len() || !pending.is_empty() {
            while next < requests.len() && pending.len() < WINDOW {
                let (offset, buf) = &requests[next];
                let cookie = self.send(CMD_READ, 0, *offset, buf.len() as u32)?;
                pending.insert(cookie, next);
                next += 1;
            }
            let chunk = self.chunk()?;
            let &index = pending
                .get(&chunk.cookie)
                .ok_or_else(|| protocol(format!("a reply to unknown cookie {}", chunk.cookie)))?;
            let (offset, buf) = &mut requests[index];
            let done = fill_read(*offset, buf, &chunk)?;
            if done {
                pending.remove(&chunk.cookie);
            }
        }
        Ok(())
    }

    /// The extents of `context` from `offset` for up to `len` bytes, asking again until
    /// the whole range is covered.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Status>, NbdError> {
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| protocol(format!("meta context {context:?} was not negotiated")))?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| protocol("block status past the end of the export"))?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(1 << 30) as u32;
            let cookie = self.send(CMD_BLOCK_STATUS, 0, pos, ask)?;
            let mut got_any = false;
            loop {
                let chunk = self.chunk()?;
                if chunk.cookie != cookie {
                    return Err(protocol("a reply to another request"));
                }
                if let Some(err) = chunk.error(pos) {
                    return Err(err);
                }
                if chunk.kind == REPLY_TYPE_BLOCK_STATUS && chunk.payload.len() >= 4 {
                    let cid = u32::from_be_bytes(chunk.payload[0..4].try_into().expect("4"));
                    if cid == id {
                        for d in chunk.payload[4..].chunks_exact(8) {
                            let l = u64::from(u32::from_be_bytes(d[0..4].try_into().expect("4")));
                            let flags = u32::from_be_bytes(d[4..8].try_into().expect("4"));
                            if l == 0 {
                                return Err(protocol("a block status extent of length 0"));
                            }
                            let l = l.min(end - pos);
                            if l > 0 {
                                out.push(Status {
                                    offset: pos,
                                    len: l,
                                    flags,
                                });
                                pos += l;
                                got_any = true;
                            }
                        }
                    }
                }
                if chunk.done {
                    break;
                }
            }
            if !got_any {
                return Err(protocol("a block status reply without extents"));
            }
        }
        Ok(out)
    }

    /// Say goodbye.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.send(CMD_DISC, 0, 0, 0)?;
        Ok(())
    }

    fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&r.encode())?;
        self.stream.flush()?;
        Ok(cookie)
    }

    /// Read one structured reply chunk.
    fn chunk(&mut self) -> Result<Chunk, NbdError> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into().expect("4")) != STRUCTURED_REPLY_MAGIC {
            return Err(protocol("a reply that is not a structured chunk"));
        }
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if len > (64 << 20) {
            return Err(protocol(format!("a reply chunk of {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Chunk {
            done: flags & REPLY_FLAG_DONE != 0,
            kind,
            cookie,
            payload,
        })
    }
}

/// One structured reply chunk.
struct Chunk {
    done: bool,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

/// `OFFSET_HOLE`.
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `ERROR_OFFSET`.
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

impl Chunk {
    /// The error this chunk carries, if it is an error chunk.
    fn error(&self, offset: u64) -> Option<NbdError> {
        if self.kind & (1 << 15) == 0 {
            return None;
        }
        let p = &self.payload;
        let errno = p
            .get(0..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4")))
            .unwrap_or(EIO);
        let mlen = p
            .get(4..6)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .unwrap_or(0);
        let message = p
            .get(6..6 + mlen)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        let offset = if self.kind == REPLY_TYPE_ERROR_OFFSET {
            p.get(6 + mlen..14 + mlen)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8")))
                .unwrap_or(offset)
        } else {
            offset
        };
        Some(NbdError::Server {
            errno,
            message,
            offset,
        })
    }
}

/// Apply one chunk of a read's reply to `buf` (read at `offset`); true when the reply
/// is complete. Data outside the request is a protocol error.
fn fill_read(offset: u64, buf: &mut [u8], chunk: &Chunk) -> Result<bool, NbdError> {
    if let Some(e) = chunk.error(offset) {
        return Err(e);
    }
    let p = &chunk.payload;
    let place = |at: u64, len: u64| -> Result<std::ops::Range<usize>, NbdError> {
        let start = at
            .checked_sub(offset)
            .ok_or_else(|| protocol("data before the requested offset"))?;
        let end = start + len;
        if end > buf.len() as u64 {
            return Err(protocol("data past the requested length"));
        }
        Ok(start as usize..end as usize)
    };
    match chunk.kind {
        REPLY_TYPE_OFFSET_DATA => {
            let at = u64::from_be_bytes(
                p.get(0..8)
                    .ok_or_else(|| protocol("a short data chunk"))?
                    .try_into()
                    .expect("8"),
            );
            let data = &p[8..];
            let r = place(at, data.len() as u64)?;
            buf[r].copy_from_slice(data);
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if p.len() != 12 {
                return Err(protocol("a malformed hole chunk"));
            }
            let at = u64::from_be_bytes(p[0..8].try_into().expect("8"));
            let len = u64::from(u32::from_be_bytes(p[8..12].try_into().expect("4")));
            let r = place(at, len)?;
            buf[r].fill(0);
        }
        REPLY_TYPE_NONE => {}
        other => {
            return Err(protocol(format!(
                "an unexpected chunk type {other} in a read"
            )))
        }
    }
    Ok(chunk.done)
}

fn name_field(export: &str) -> Vec<u8> {
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(export.as_bytes());
    v
}

fn send_option(s: &mut Box<dyn ReadWrite>, option: u32, data: &[u8]) -> io::Result<()> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)?;
    s.flush()
}

fn option_reply_of(s: &mut Box<dyn ReadWrite>, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if u64::from_be_bytes(h[0..8].try_into().expect("8")) != OPTION_REPLY_MAGIC
        || u32::from_be_bytes(h[8..12].try_into().expect("4")) != option
    {
        return Err(protocol("an option reply to another option"));
    }
    let reply = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    if len > MAX_OPTION_LEN {
        return Err(protocol("an option reply longer than 64 KiB"));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((reply, body))
}

fn expect_ack(s: &mut Box<dyn ReadWrite>, option: u32, name: &'static str) -> Result<(), NbdError> {
    match option_reply_of(s, option)? {
        (REP_ACK, _) => Ok(()),
        (r, body) => Err(refused(name, r, &body)),
    }
}

fn refused(option: &'static str, reply: u32, body: &[u8]) -> NbdError {
    NbdError::Refused {
        option,
        reply,
        message: String::from_utf8_lossy(body).into_owned(),
    }
}
