//! A read-only NBD server: fixed newstyle negotiation (`OPT_GO`, `OPT_INFO`,
//! `OPT_LIST`, `OPT_EXPORT_NAME`, `OPT_STARTTLS`, structured replies, `base:allocation`
//! meta contexts), then reads and block status with many requests in flight, from many
//! clients at once. Writes are refused with `EPERM`.
//!
//! Plain threads, not async: every connection is a thread that reads requests and a
//! few workers that answer them (each reply is written whole under the connection's
//! lock, so replies to requests in flight interleave only between replies, as the
//! protocol allows). Over TLS a connection answers its requests in order on its own
//! thread, since a TLS stream cannot be written from two threads.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::proto::*;

/// A disk an NBD server exports, read-only.
pub trait Export: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the range lies inside the export.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The `base:allocation` state of `[offset, offset + len)`: consecutive extents
    /// from `offset`, covering at least its first byte and at most `len` bytes.
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, String>;
}

/// How the server runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerOptions {
    /// The export's name. A client asking for the empty name gets it too (QEMU does
    /// when a URL names no export).
    pub name: String,
    /// A description shown by `OPT_INFO` and `OPT_LIST`.
    pub description: String,
    /// TLS: when set, every client must `STARTTLS` before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Requests of one connection answered at once.
    pub workers_per_connection: usize,
    /// The largest read (and block status range) a request may ask for.
    pub max_request: u32,
}

impl ServerOptions {
    /// Defaults for an export called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            tls: None,
            max_connections: 64,
            workers_per_connection: 4,
            max_request: 32 << 20,
        }
    }

    /// Set [`ServerOptions::description`].
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Set [`ServerOptions::tls`].
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Set [`ServerOptions::max_connections`].
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(std::net::TcpListener),
    /// A unix socket, removed when the server stops.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl Listener {
    fn accept(&self) -> io::Result<Box<dyn Socket>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Listener::Unix(l, _) => Ok(Box::new(l.accept()?.0)),
        }
    }

    /// Wake a thread blocked in `accept` by connecting (and hanging up) once.
    fn wake(&self) {
        match self {
            Listener::Tcp(l) => {
                if let Ok(addr) = l.local_addr() {
                    let _ = TcpStream::connect(addr);
                }
            }
            Listener::Unix(_, path) => {
                let _ = UnixStream::connect(path);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected socket of either kind.
trait Socket: Read + Write + Send {
    fn try_clone_socket(&self) -> io::Result<Box<dyn Socket>>;
    fn set_blocking(&self) -> io::Result<()>;
    fn close(&self);
}

impl Socket for TcpStream {
    fn try_clone_socket(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Socket for UnixStream {
    fn try_clone_socket(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// A connection: plain, or inside TLS after `STARTTLS`.
enum Conn {
    Plain(Box<dyn Socket>),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Box<dyn Socket>>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Serve `export` on `listener` until `stop` is set (checked a few times a second).
pub fn serve(
    listener: Listener,
    export: &dyn Export,
    options: &ServerOptions,
    stop: &AtomicBool,
) -> io::Result<()> {
    let active = AtomicUsize::new(0);
    // A clone of every open connection's socket, to shut them down when stopping: a
    // connection thread blocked reading an idle client would otherwise never end.
    let open: Mutex<Vec<(u64, Box<dyn Socket>)>> = Mutex::new(Vec::new());
    let mut next_id = 0u64;
    std::thread::scope(|scope| {
        // `accept` blocks (a new client is served at once); this watcher wakes it when
        // `stop` is set.
        let listener = &listener;
        scope.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            listener.wake();
        });
        loop {
            let accepted = listener.accept();
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let socket = match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if active.load(Ordering::SeqCst) >= options.max_connections {
                warn!(
                    limit = options.max_connections,
                    "too many connections: closing a new one"
                );
                socket.close();
                continue;
            }
            let Ok(clone) = socket.try_clone_socket() else {
                socket.close();
                continue;
            };
            next_id += 1;
            let id = next_id;
            lock(&open).push((id, clone));
            active.fetch_add(1, Ordering::SeqCst);
            let (active, open) = (&active, &open);
            scope.spawn(move || {
                if let Err(e) = connection(socket, export, options, stop) {
                    debug!(error = %e, "connection ended");
                }
                lock(open).retain(|(i, _)| *i != id);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
        info!("export stopping");
        for (_, socket) in lock(&open).iter() {
            socket.close();
        }
    });
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What negotiation settled for one connection.
struct Session {
    conn: Conn,
    structured: bool,
    /// The id of `base:allocation`, when the client selected it.
    allocation_context: Option<u32>,
}

/// The id `base:allocation` is given.
const ALLOCATION_CONTEXT_ID: u32 = 1;

fn connection(
    socket: Box<dyn Socket>,
    export: &dyn Export,
    options: &ServerOptions,
    stop: &AtomicBool,
) -> io::Result<()> {
    socket.set_blocking()?;
    let Some(session) = negotiate(Conn::Plain(socket), export, options)? else {
        return Ok(());
    };
    debug!(
        structured = session.structured,
        "client entered transmission"
    );
    let modes = Modes {
        structured: session.structured,
        allocation_context: session.allocation_context,
    };
    match session.conn {
        Conn::Plain(socket) => {
            let writer = Mutex::new(socket.try_clone_socket()?);
            transmit_concurrently(socket, &writer, export, options, modes, stop)
        }
        mut tls @ Conn::Tls(_) => transmit_in_order(&mut tls, export, options, modes, stop),
    }
}

/// The negotiated modes transmission needs.
#[derive(Clone, Copy)]
struct Modes {
    structured: bool,
    allocation_context: Option<u32>,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Fixed newstyle negotiation; `None` when the client ends it without transmission.
fn negotiate(
    mut conn: Conn,
    export: &dyn Export,
    options: &ServerOptions,
) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client_flags = read_u32(&mut conn)?;
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error("the client does not speak fixed newstyle"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut allocation_context = None;
    loop {
        if read_u64(&mut conn)? != IHAVEOPT {
            return Err(protocol_error("an option without IHAVEOPT"));
        }
        let option = read_u32(&mut conn)?;
        let len = read_u32(&mut conn)?;
        if len > MAX_OPTION_LEN {
            // Its data cannot be skipped at a bounded cost: end the connection.
            return Err(protocol_error("an option longer than 64 KiB"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        let tls_pending = options.tls.is_some() && matches!(conn, Conn::Plain(_));
        let reply = |conn: &mut Conn, kind: u32, data: &[u8]| -> io::Result<()> {
            conn.write_all(&option_reply(option, kind, data))?;
            conn.flush()
        };
        if tls_pending && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(protocol_error("EXPORT_NAME before STARTTLS"));
            }
            reply(
                &mut conn,
                REP_ERR_TLS_REQD,
                b"TLS is required: STARTTLS first",
            )?;
            continue;
        }
        match option {
            OPT_ABORT => {
                let _ = reply(&mut conn, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_STARTTLS => {
                let Some(config) = options.tls.clone() else {
                    reply(&mut conn, REP_ERR_POLICY, b"this server does not offer TLS")?;
                    continue;
                };
                if !tls_pending || !data.is_empty() {
                    reply(&mut conn, REP_ERR_INVALID, b"STARTTLS now is invalid")?;
                    continue;
                }
                reply(&mut conn, REP_ACK, &[])?;
                let Conn::Plain(socket) = conn else {
                    unreachable!("checked above")
                };
                let tls = rustls::ServerConnection::new(config)
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                let mut stream = rustls::StreamOwned::new(tls, socket);
                // Complete the handshake now, so a failure is reported here.
                while stream.conn.is_handshaking() {
                    stream.conn.complete_io(&mut stream.sock)?;
                }
                conn = Conn::Tls(Box::new(stream));
            }
            OPT_EXPORT_NAME => {
                if !name_matches(&data, options) {
                    // No error can be sent to EXPORT_NAME: close.
                    return Ok(None);
                }
                let mut v = export.size().to_be_bytes().to_vec();
                v.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&v)?;
                conn.flush()?;
                return Ok(Some(Session {
                    conn,
                    structured,
                    allocation_context,
                }));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(&mut conn, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut entry = (options.name.len() as u32).to_be_bytes().to_vec();
                entry.extend_from_slice(options.name.as_bytes());
                entry.extend_from_slice(options.description.as_bytes());
                reply(&mut conn, REP_SERVER, &entry)?;
                reply(&mut conn, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        &mut conn,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                structured = true;
                reply(&mut conn, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => match parse_info(&data) {
                Err(why) => reply(&mut conn, REP_ERR_INVALID, why.as_bytes())?,
                Ok((name, requests)) if !name_matches(name, options) => {
                    let _ = requests;
                    reply(&mut conn, REP_ERR_UNKNOWN, b"no such export")?;
                }
                Ok((_, requests)) => {
                    send_info(&mut conn, option, export, options, &requests)?;
                    reply(&mut conn, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(Some(Session {
                            conn,
                            structured,
                            allocation_context,
                        }));
                    }
                }
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                match parse_meta_context(&data) {
                    Err(why) => reply(&mut conn, REP_ERR_INVALID, why.as_bytes())?,
                    Ok(_) if set && !structured => reply(
                        &mut conn,
                        REP_ERR_INVALID,
                        b"SET_META_CONTEXT needs structured replies first",
                    )?,
                    Ok((name, _)) if !name_matches(name, options) => {
                        reply(&mut conn, REP_ERR_UNKNOWN, b"no such export")?
                    }
                    Ok((_, queries)) => {
                        let selected = queries.is_empty() && !set
                            || queries.iter().any(|q| {
                                *q == BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:")
                            });
                        if set {
                            allocation_context = selected.then_some(ALLOCATION_CONTEXT_ID);
                        }
                        if selected {
                            let mut v = ALLOCATION_CONTEXT_ID.to_be_bytes().to_vec();
                            v.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            reply(&mut conn, REP_META_CONTEXT, &v)?;
                        }
                        reply(&mut conn, REP_ACK, &[])?;
                    }
                }
            }
            _ => reply(&mut conn, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

fn transmission_flags() -> u16 {
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
}

fn name_matches(name: &[u8], options: &ServerOptions) -> bool {
    name.is_empty() || name == options.name.as_bytes()
}

/// `OPT_INFO`/`OPT_GO` data: the export name and the information types asked for.
fn parse_info(data: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    let bad = "malformed INFO/GO option";
    let name_len = u32::from_be_bytes(data.get(0..4).ok_or(bad)?.try_into().expect("4")) as usize;
    let name = data.get(4..4 + name_len).ok_or(bad)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2).ok_or(bad)?.try_into().expect("2")) as usize;
    let list = rest.get(2..).ok_or(bad)?;
    if list.len() != 2 * n {
        return Err(bad);
    }
    Ok((
        name,
        list.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// `OPT_*_META_CONTEXT` data: the export name and the queries.
fn parse_meta_context(data: &[u8]) -> Result<(&[u8], Vec<&[u8]>), &'static str> {
    let bad = "malformed META_CONTEXT option";
    let be32 = |b: Option<&[u8]>| -> Result<usize, &'static str> {
        Ok(u32::from_be_bytes(b.ok_or(bad)?.try_into().map_err(|_| bad)?) as usize)
    };
    let name_len = be32(data.get(0..4))?;
    let name = data.get(4..4 + name_len).ok_or(bad)?;
    let mut pos = 4 + name_len;
    let n = be32(data.get(pos..pos + 4))?;
    pos += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = be32(data.get(pos..pos + 4))?;
        pos += 4;
        queries.push(data.get(pos..pos + len).ok_or(bad)?);
        pos += len;
    }
    if pos != data.len() {
        return Err(bad);
    }
    Ok((name, queries))
}

fn send_info(
    conn: &mut Conn,
    option: u32,
    export: &dyn Export,
    options: &ServerOptions,
    requests: &[u16],
) -> io::Result<()> {
    let mut send = |data: Vec<u8>| conn.write_all(&option_reply(option, REP_INFO, &data));
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&export.size().to_be_bytes());
    v.extend_from_slice(&transmission_flags().to_be_bytes());
    send(v)?;
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [1u32, 4096, options.max_request] {
        v.extend_from_slice(&size.to_be_bytes());
    }
    send(v)?;
    if requests.contains(&INFO_NAME) {
        let mut v = INFO_NAME.to_be_bytes().to_vec();
        v.extend_from_slice(options.name.as_bytes());
        send(v)?;
    }
    if requests.contains(&INFO_DESCRIPTION) && !options.description.is_empty() {
        let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
        v.extend_from_slice(options.description.as_bytes());
        send(v)?;
    }
    Ok(())
}

/// What the reader does after a request.
enum Next {
    /// Answer it (`payload` already consumed for writes).
    Answer(Request),
    /// The client said goodbye, or broke the protocol: stop reading.
    Stop,
}

/// Read one request, discarding a write's payload (bounded).
fn next_request(conn: &mut impl Read, options: &ServerOptions) -> io::Result<Next> {
    let mut b = [0u8; Request::LEN];
    match conn.read_exact(&mut b) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Next::Stop),
        Err(e) => return Err(e),
    }
    let Some(req) = Request::decode(&b) else {
        return Err(protocol_error("a request with a bad magic"));
    };
    if req.command == CMD_DISC {
        return Ok(Next::Stop);
    }
    if req.command == CMD_WRITE || req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        if req.length > options.max_request {
            return Err(protocol_error("a write payload larger than the limit"));
        }
        io::copy(
            &mut (&mut *conn).take(u64::from(req.length)),
            &mut io::sink(),
        )?;
    }
    Ok(Next::Answer(req))
}

/// The reply to one request, whole.
fn answer(req: &Request, export: &dyn Export, options: &ServerOptions, modes: Modes) -> Vec<u8> {
    let fail = |error: u32, message: &str| {
        if modes.structured {
            error_chunk(req.cookie, error, message)
        } else {
            simple_reply(req.cookie, error).to_vec()
        }
    };
    let in_bounds = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= export.size());
    match req.command {
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => fail(EPERM, "the export is read-only"),
        CMD_FLUSH | CMD_CACHE => {
            if modes.structured {
                chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()
            } else {
                simple_reply(req.cookie, 0).to_vec()
            }
        }
        CMD_READ if req.length > options.max_request => fail(EOVERFLOW, "read too large"),
        CMD_READ if !in_bounds => fail(EINVAL, "read past the end of the export"),
        CMD_READ => {
            let header_len = if modes.structured { 28 } else { 16 };
            let mut out = vec![0u8; header_len + req.length as usize];
            if let Err(e) = export.read_at(req.offset, &mut out[header_len..]) {
                warn!(offset = req.offset, length = req.length, error = %e, "read failed");
                return fail(EIO, &e);
            }
            if modes.structured {
                out[..20].copy_from_slice(&chunk_header(
                    req.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + req.length,
                ));
                out[20..28].copy_from_slice(&req.offset.to_be_bytes());
            } else {
                out[..16].copy_from_slice(&simple_reply(req.cookie, 0));
            }
            out
        }
        CMD_BLOCK_STATUS => match modes.allocation_context {
            None => fail(EINVAL, "no meta context was selected"),
            Some(_) if !modes.structured => fail(EINVAL, "block status needs structured replies"),
            Some(_) if !in_bounds || req.length == 0 => {
                fail(EINVAL, "block status outside the export")
            }
            Some(id) => match export.block_status(req.offset, req.length) {
                Err(e) => fail(EIO, &e),
                Ok(mut extents) => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        extents.truncate(1);
                    }
                    block_status_chunk(req.cookie, id, &extents)
                }
            },
        },
        _ => fail(EINVAL, "unknown command"),
    }
}

/// Transmission over a plain socket: this thread reads requests; workers answer them
/// and write each reply whole under `writer`'s lock.
fn transmit_concurrently(
    mut reader: Box<dyn Socket>,
    writer: &Mutex<Box<dyn Socket>>,
    export: &dyn Export,
    options: &ServerOptions,
    modes: Modes,
    stop: &AtomicBool,
) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<Request>(options.workers_per_connection * 4);
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..options.workers_per_connection.max(1) {
            let rx = &rx;
            scope.spawn(move || loop {
                let Ok(req) = lock(rx).recv() else {
                    return;
                };
                let reply = answer(&req, export, options, modes);
                let mut w = lock(writer);
                if w.write_all(&reply).and_then(|()| w.flush()).is_err() {
                    // The client is gone; the reader notices too.
                    w.close();
                }
            });
        }
        let outcome = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            match next_request(&mut reader, options) {
                Ok(Next::Answer(req)) => {
                    if tx.send(req).is_err() {
                        break Ok(());
                    }
                }
                Ok(Next::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        outcome
    });
    lock(writer).close();
    result
}

/// Transmission over TLS: one request after another on this thread.
fn transmit_in_order(
    conn: &mut Conn,
    export: &dyn Export,
    options: &ServerOptions,
    modes: Modes,
    stop: &AtomicBool,
) -> io::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match next_request(conn, options)? {
            Next::Answer(req) => {
                conn.write_all(&answer(&req, export, options, modes))?;
                conn.flush()?;
            }
            Next::Stop => break,
        }
    }
    Ok(())
}
