//! `snapsync serve`: local stores over HTTP/2 (TLS by default), behind bearer tokens.
//!
//! Store operations are synchronous; each request runs its store call on Tokio's
//! blocking pool. A receive session borrows its store for its whole life, so it runs on
//! a thread of its own that owns a handle to the store and takes commands over a
//! channel; the session id names that thread. A session left behind by a dropped
//! connection is abandoned when the same snapshot is begun again, or after
//! [`ServerConfig::session_idle`] without requests (default [`SESSION_IDLE`]); blocks it
//! already stored stay, so the
//! rerun does not send them again. Abandoning a session releases what its receiver holds,
//! e.g. a repository's session lock, which `gc` waits for.

// Handlers return a ready `Response` as their error: one per request, never hot.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use snapsync_core::{validate_name, BlockId};
use snapsync_store::runtime::OwnedRuntime;
use snapsync_store::view::RepositoryView;
use snapsync_store::{
    BaseRef, BufferPool, CommitInfo, IncomingBlock, ReceiveRequest, SnapshotRef, SnapshotSink,
    SnapshotSource, StoreError,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::proto::*;
use crate::tokens::{Access, Authorized, Tokens};
use crate::RemoteError;

/// The default of [`ServerConfig::session_idle`]: a receive session untouched this long
/// is abandoned.
pub const SESSION_IDLE: Duration = Duration::from_secs(15 * 60);

/// How often idle sessions are looked for: a quarter of the limit, within 1 s..30 s.
fn reap_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// A store the server exposes: always a source, a destination when it can be one.
pub trait ServedStore: Send + Sync + 'static {
    /// As a source.
    fn source(&self) -> &dyn SnapshotSource;
    /// As a destination, if it can be one.
    fn sink(&self) -> Option<&dyn SnapshotSink>;
    /// As a repository whose size and chains a status page shows (`stats`, `chains`),
    /// if it is one. None by default: a store of images has no such view.
    fn view(&self) -> Option<&dyn RepositoryView> {
        None
    }
}

/// An in-memory store, served as a source and a destination (not a repository: no
/// view). What tests and examples serve.
impl ServedStore for snapsync_store::memory::MemoryStore {
    fn source(&self) -> &dyn SnapshotSource {
        self
    }
    fn sink(&self) -> Option<&dyn SnapshotSink> {
        Some(self)
    }
}

/// TLS certificate chain and key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// What to serve, and how.
pub struct ServerConfig {
    /// Stores by name.
    pub stores: Vec<(String, Arc<dyn ServedStore>)>,
    /// Accepted tokens.
    pub tokens: Tokens,
    /// TLS, or `None` for plain text.
    pub tls: Option<TlsFiles>,
    /// Receive sessions untouched this long are abandoned (at least 1 s; [`SESSION_IDLE`]
    /// unless the program says otherwise).
    pub session_idle: Duration,
}

impl ServerConfig {
    /// `stores` served to `tokens` in plain text, receive sessions abandoned after
    /// [`SESSION_IDLE`]: a server on loopback, or behind TLS of its own.
    pub fn plaintext(stores: Vec<(String, Arc<dyn ServedStore>)>, tokens: Tokens) -> Self {
        ServerConfig {
            stores,
            tokens,
            tls: None,
            session_idle: SESSION_IDLE,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field(
                "stores",
                &self.stores.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

/// A server bound to its address, not yet serving.
pub struct Server {
    runtime: OwnedRuntime,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    /// Receive sessions idle this long are abandoned.
    session_idle: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

struct State {
    stores: HashMap<String, Arc<dyn ServedStore>>,
    tokens: Tokens,
    sessions: Mutex<HashMap<String, SessionHandle>>,
    /// Buffers compressed blocks are decompressed into, reused across writes.
    plain: Arc<BufferPool>,
    /// Buffers `read` requests are answered from, reused once sent.
    read_buffers: Arc<BufferPool>,
}

/// Decompression buffers the server keeps: about the writes a client has in flight
/// ([`MAX_WRITES_AHEAD`]) and a pack's worth being stored.
const PLAIN_BUFFERS: usize = 2 * MAX_WRITES_AHEAD as usize;
/// Read buffers the server keeps: about the requests a puller has in flight (an 8 MiB
/// batch in 2 MiB requests, read ahead) and the answers being sent.
const READ_BUFFERS: usize = 16;

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, RemoteError> {
    let config = crate::tls::server_config(files, &[b"h2", b"http/1.1"])?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Server {
    /// Check the configuration and bind `addr`.
    pub fn bind(config: ServerConfig, addr: &str) -> Result<Self, RemoteError> {
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let session_idle = config.session_idle;
        if session_idle < Duration::from_secs(1) {
            return Err(RemoteError::Config {
                what: format!(
                    "the receive-session idle limit {session_idle:?} is shorter than 1 s"
                ),
            });
        }
        let mut stores = HashMap::new();
        for (name, store) in config.stores {
            validate_name("store", &name).map_err(|e| RemoteError::Config {
                what: e.to_string(),
            })?;
            if stores.insert(name.clone(), store).is_some() {
                return Err(RemoteError::Config {
                    what: format!("store name {name:?} is given twice"),
                });
            }
        }
        let runtime = OwnedRuntime::new("snapsync-serve", 2).map_err(|e| RemoteError::Config {
            what: format!("cannot start the server runtime: {e}"),
        })?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| RemoteError::Config {
                what: format!("cannot listen on {addr}: {e}"),
            })?;
        Ok(Self {
            runtime,
            listener,
            tls,
            session_idle,
            state: Arc::new(State {
                stores,
                tokens: config.tokens,
                sessions: Mutex::new(HashMap::new()),
                plain: Arc::new(BufferPool::new(PLAIN_BUFFERS)),
                read_buffers: Arc::new(BufferPool::new(READ_BUFFERS)),
            }),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, RemoteError> {
        self.listener.local_addr().map_err(|e| RemoteError::Config {
            what: format!("cannot read the listening address: {e}"),
        })
    }

    /// Serve on a thread of its own until the process ends; the bound address.
    pub fn spawn(self) -> Result<SocketAddr, RemoteError> {
        let addr = self.local_addr()?;
        std::thread::spawn(move || self.run());
        Ok(addr)
    }

    /// Serve until the process ends.
    pub fn run(self) -> Result<(), RemoteError> {
        let Server {
            runtime,
            listener,
            tls,
            state,
            session_idle,
        } = self;
        runtime.block_on(async move {
            let reaper_state = state.clone();
            info!(
                idle_secs = session_idle.as_secs(),
                "receive sessions idle this long are abandoned"
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(reap_interval(session_idle));
                loop {
                    tick.tick().await;
                    reaper_state.reap_idle(session_idle);
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .initial_stream_window_size(16 << 20)
                .initial_connection_window_size(64 << 20)
                .max_frame_size(1 << 20)
                .max_send_buf_size(16 << 20);
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let tls = tls.clone();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let result = match tls {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                            Err(e) => {
                                debug!(%peer, "TLS handshake failed: {e}");
                                return;
                            }
                        },
                        None => builder.serve_connection(TokioIo::new(stream), svc).await,
                    };
                    if let Err(e) = result {
                        debug!(%peer, "connection ended: {e}");
                    }
                });
            }
        })
    }
}

type Resp = Response<ChunksBody>;

fn respond(status: StatusCode, body: Bytes, content_type: &str) -> Resp {
    Response::builder()
        .status(status)
        .header(VERSION_HEADER, PROTOCOL_VERSION.to_string())
        .header("content-type", content_type)
        .body(ChunksBody::from(vec![body]))
        .expect("valid response")
}

fn json_ok<T: Serialize>(v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(b) => respond(StatusCode::OK, b.into(), "application/json"),
        Err(e) => error(
            ErrorKind::Internal,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

fn error(kind: ErrorKind, message: String) -> Resp {
    error_body(ErrorBody::new(kind, message))
}

fn error_body(body: ErrorBody) -> Resp {
    respond(
        StatusCode::from_u16(body.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        serde_json::to_vec(&body).unwrap_or_default().into(),
        "application/json",
    )
}

fn store_error(e: StoreError) -> Resp {
    error_body(ErrorBody::from_store(&e))
}

/// The answer to any request of a session that had a refused one.
fn refused_session(sid: &str, why: &str) -> Resp {
    error(
        ErrorKind::Conflict,
        format!("receive session {sid} had a refused request ({why}); it cannot go on or be committed: rerun the replication"),
    )
}

fn check_names(pairs: &[(&'static str, &str)]) -> Result<(), Resp> {
    for (kind, name) in pairs {
        validate_name(kind, name).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
    }
    Ok(())
}

/// Run a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Resp> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(e)),
        Err(e) => Err(error(
            ErrorKind::Internal,
            format!("store call failed: {e}"),
        )),
    }
}

/// Decode a `write` body as it arrives: block data stays slices of the frames it came
/// in, so the request is never gathered into one buffer. Ids are checked on the blocking
/// pool once it has all arrived.
async fn write_batch(
    req: Request<Incoming>,
    block_size: u64,
    plain: Arc<BufferPool>,
) -> Result<Vec<IncomingBlock>, Resp> {
    let mut body = req.into_body();
    let mut decoder = BatchDecoder::new(block_size);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            error(
                ErrorKind::BadRequest,
                format!("cannot read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if decoder.received() + data.len() > MAX_BODY {
            return Err(error(
                ErrorKind::TooLarge,
                format!("request body larger than {MAX_BODY} bytes"),
            ));
        }
        decoder
            .feed(data)
            .map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
    }
    let blocks = if decoder.has_frames() {
        tokio::task::spawn_blocking(move || decoder.finish(&plain))
            .await
            .map_err(|e| error(ErrorKind::Internal, e.to_string()))?
    } else {
        decoder.finish(&plain)
    };
    blocks.map_err(|e| error(ErrorKind::BadRequest, e.to_string()))
}

async fn body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Resp> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(error(
                    ErrorKind::TooLarge,
                    format!("request body larger than {limit} bytes"),
                ))
            } else {
                Err(error(
                    ErrorKind::BadRequest,
                    format!("cannot read the request body: {e}"),
                ))
            }
        }
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let b = body(req, MAX_JSON_BODY).await?;
    serde_json::from_slice(&b)
        .map_err(|e| error(ErrorKind::BadRequest, format!("malformed request: {e}")))
}

/// What an authorized request is for.
struct Target {
    /// The store's name in the URL.
    name: String,
    store: Arc<dyn ServedStore>,
    access: Access,
    /// The path segments after the store's name.
    op: Vec<String>,
    /// The whole path, for messages.
    path: String,
}

/// Refuse a request of another protocol version.
fn check_version(req: &Request<Incoming>) -> Result<(), Resp> {
    match req.headers().get(VERSION_HEADER).map(|v| v.to_str()) {
        Some(Ok(v)) if v.trim() == PROTOCOL_VERSION.to_string() => {}
        Some(v) => {
            return Err(error(
                ErrorKind::Version,
                format!(
                    "protocol version mismatch: the client speaks {}, this server speaks {PROTOCOL_VERSION}",
                    v.unwrap_or("?")
                ),
            ))
        }
        None => {
            return Err(error(
                ErrorKind::Version,
                format!("the request has no {VERSION_HEADER} header; this is a snapsync server speaking protocol {PROTOCOL_VERSION}"),
            ))
        }
    }
    Ok(())
}

/// `info`: the store's identity, block size and whether this token may write.
async fn info(store: Arc<dyn ServedStore>, access: Access) -> Result<Resp, Resp> {
    let s = store.clone();
    let (system_id, location) =
        blocking(move || Ok((s.source().system_id()?, s.source().location()))).await?;
    Ok(json_ok(&InfoResponse {
        system_id,
        location,
        block_size: store.sink().map(|s| s.block_size()),
        writable: access == Access::Write,
    }))
}

/// `list`: every volume and snapshot.
async fn list(store: Arc<dyn ServedStore>) -> Result<Resp, Resp> {
    let v = blocking(move || store.source().list()).await?;
    Ok(json_ok(&v))
}

/// `diff`: the changes between two snapshots, from the store's metadata.
async fn diff(req: Request<Incoming>, store: Arc<dyn ServedStore>) -> Result<Resp, Resp> {
    let r: DiffRequest = json_body(req).await?;
    diff_names(&r)?;
    let d = blocking(move || {
        store.source().diff(
            &r.volume,
            &r.target,
            r.base
                .as_ref()
                .map(|b| SnapshotRef::new(&b.volume, &b.snapshot)),
        )
    })
    .await?;
    Ok(json_ok(&DiffResponse {
        data: d.data,
        zero: d.zero,
        method: d.method,
    }))
}

/// `estimate_diff`: how much a diff would hold, when the store can say cheaply.
async fn estimate_diff(req: Request<Incoming>, store: Arc<dyn ServedStore>) -> Result<Resp, Resp> {
    let r: DiffRequest = json_body(req).await?;
    diff_names(&r)?;
    let estimate = blocking(move || {
        Ok(match &r.base {
            Some(b) => store.source().estimate_diff(
                &r.volume,
                &r.target,
                SnapshotRef::new(&b.volume, &b.snapshot),
            ),
            None => None,
        })
    })
    .await?;
    Ok(json_ok(&EstimateResponse { estimate }))
}

/// `hints`: what this store holds of a source volume.
async fn hints(
    req: Request<Incoming>,
    store: Arc<dyn ServedStore>,
    name: &str,
) -> Result<Resp, Resp> {
    let r: HintsRequest = json_body(req).await?;
    check_names(&[("volume", &r.source_volume)])?;
    sink_of(&store, name)?;
    let h = blocking(move || {
        store
            .sink()
            .expect("checked")
            .hints(&r.source_system, &r.source_volume)
    })
    .await?;
    Ok(json_ok(&h))
}

/// The served store as a repository to show, or why it is none.
fn view_of<'a>(
    store: &'a Arc<dyn ServedStore>,
    name: &str,
) -> Result<&'a dyn RepositoryView, StoreError> {
    store.view().ok_or_else(|| StoreError::Unsupported {
        what: format!("store {name:?} is not a repository: it has no size or chains to show"),
    })
}

/// `stats`: a repository's size, for a status page (read-only tokens may ask).
async fn stats(store: Arc<dyn ServedStore>, name: String) -> Result<Resp, Resp> {
    let size = blocking(move || view_of(&store, &name)?.size()).await?;
    Ok(json_ok(&size))
}

/// `chains`: the chains of the volumes asked about, reading only the manifests the
/// client does not already know.
async fn chains(
    req: Request<Incoming>,
    store: Arc<dyn ServedStore>,
    name: String,
) -> Result<Resp, Resp> {
    let b = body(req, MAX_CHAINS_BODY).await?;
    let q: ChainsRequest = serde_json::from_slice(&b)
        .map_err(|e| error(ErrorKind::BadRequest, format!("malformed request: {e}")))?;
    for v in &q.volumes {
        check_names(&[("volume", v.as_str())])?;
    }
    let chains = blocking(move || view_of(&store, &name)?.chains(&q.volumes, &q.known)).await?;
    Ok(json_ok(&chains))
}

impl State {
    fn reap_idle(&self, idle: Duration) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|id, h| {
            let keep = h.last_used.elapsed() < idle;
            if !keep {
                info!(session = %id, idle_secs = idle.as_secs(), "abandoning idle receive session");
            }
            keep
        });
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        match self.handle_inner(req).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn handle_inner(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, Resp> {
        check_version(&req)?;
        let Target {
            name,
            store,
            access,
            op,
            path,
        } = self.authorize(&req)?;
        let op: Vec<&str> = op.iter().map(String::as_str).collect();
        match (req.method().clone(), op.as_slice()) {
            (Method::GET, ["info"]) => info(store, access).await,
            (Method::GET, ["list"]) => list(store).await,
            (Method::POST, ["diff"]) => diff(req, store).await,
            (Method::POST, ["estimate_diff"]) => estimate_diff(req, store).await,
            (Method::POST, ["hints"]) => hints(req, store, &name).await,
            (Method::GET, ["stats"]) => stats(store, name).await,
            (Method::POST, ["chains"]) => chains(req, store, name).await,
            (Method::POST, ["read"]) => self.read(req, store).await,
            (Method::POST, ["receive"]) => self.receive(req, name, store).await,
            (Method::POST, ["receive", sid, cmd]) => {
                self.session_request(req, &name, sid, cmd, &path).await
            }
            _ => Err(error(
                ErrorKind::NotFound,
                format!("{NO_SUCH_ENDPOINT} {path}"),
            )),
        }
    }

    /// Who may do what: the token, the store it names and the access it has to it.
    fn authorize(&self, req: &Request<Incoming>) -> Result<Target, Resp> {
        // The token first, so that nothing about the stores is told to a stranger.
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| error(ErrorKind::Unauthorized, "no bearer token given".into()))?;
        let auth: Authorized = self
            .tokens
            .check(token.trim())
            .ok_or_else(|| error(ErrorKind::Unauthorized, "the token is not accepted".into()))?;

        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ("v1", "stores", Some(raw_name)) = (
            segs.first().copied().unwrap_or(""),
            segs.get(1).copied().unwrap_or(""),
            segs.get(2),
        ) else {
            return Err(error(
                ErrorKind::NotFound,
                format!("{NO_SUCH_ENDPOINT} {path}"),
            ));
        };
        let name = percent_encoding::percent_decode_str(raw_name)
            .decode_utf8()
            .ok()
            .map(|n| n.into_owned())
            .ok_or_else(|| error(ErrorKind::BadRequest, "malformed store name".into()))?;
        validate_name("store", &name).map_err(|e| error(ErrorKind::BadRequest, e.to_string()))?;
        let access = auth.access(&name).ok_or_else(|| {
            error(
                ErrorKind::Forbidden,
                format!("the token may not access store {name:?}"),
            )
        })?;
        let store = self.stores.get(&name).cloned().ok_or_else(|| {
            error(
                ErrorKind::NotFound,
                format!("store {name:?} is not served here"),
            )
        })?;
        let op = segs[3..].iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if op.first().map(String::as_str) == Some("receive") && access < Access::Write {
            return Err(error(
                ErrorKind::Forbidden,
                format!("the token may only read store {name:?}"),
            ));
        }
        Ok(Target {
            name,
            store,
            access,
            op,
            path,
        })
    }

    /// `read`: a range of a snapshot, cut into blocks, each sent plain or compressed.
    async fn read(
        &self,
        req: Request<Incoming>,
        store: Arc<dyn ServedStore>,
    ) -> Result<Resp, Resp> {
        let r: ReadRequest = json_body(req).await?;
        check_names(&[("volume", &r.volume), ("snapshot", &r.snapshot)])?;
        if r.len > MAX_READ_LEN {
            return Err(error(
                ErrorKind::BadRequest,
                format!("a read may ask for at most {MAX_READ_LEN} bytes"),
            ));
        }
        let block_size = match r.block_size {
            None => r.len.max(1),
            // Bounded like a batch: tiny blocks would make the answer's header,
            // and the work per byte, grow without limit.
            Some(bs)
                if bs > 0
                    && r.len.is_multiple_of(bs)
                    && r.len / bs <= MAX_BATCH_BLOCKS as u64 =>
            {
                bs
            }
            Some(bs) => {
                return Err(error(
                    ErrorKind::BadRequest,
                    format!(
                        "a read of {} bytes cannot be cut into blocks of {bs} (whole blocks, at most {MAX_BATCH_BLOCKS})",
                        r.len
                    ),
                ))
            }
        } as usize;
        let buffers = self.read_buffers.clone();
        let answer = blocking(move || {
            let mut reader = store.source().open_snapshot(&r.volume, &r.snapshot)?;
            let mut buf = buffers.take(r.len as usize);
            reader.read_at(r.offset, &mut buf)?;
            let buf = buf.freeze();
            // Plain blocks go out as slices of it; it is lent again once sent.
            buffers.give_back(buf.clone());
            use rayon::prelude::*;
            let blocks: Vec<ReadBlock> = (0..buf.len().div_ceil(block_size))
                .into_par_iter()
                .map(|i| {
                    let end = ((i + 1) * block_size).min(buf.len());
                    ReadBlock::of(buf.slice(i * block_size..end))
                })
                .collect();
            Ok(encode_read_answer(blocks))
        })
        .await?;
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(VERSION_HEADER, PROTOCOL_VERSION.to_string())
            .header("content-type", "application/octet-stream")
            .body(ChunksBody::from(answer))
            .expect("valid response"))
    }

    /// `receive`: begin a receive session.
    async fn receive(
        self: Arc<Self>,
        req: Request<Incoming>,
        name: String,
        store: Arc<dyn ServedStore>,
    ) -> Result<Resp, Resp> {
        let r: BeginRequest = json_body(req).await?;
        check_names(&[
            ("volume", &r.volume),
            ("snapshot", &r.snapshot.name),
            ("volume", &r.source_volume),
            ("snapshot", &r.source_snapshot),
        ])?;
        if let Some(b) = &r.base {
            check_names(&[("volume", &b.volume), ("snapshot", &b.snapshot)])?;
        }
        sink_of(&store, &name)?;
        self.begin(name, store, r).await
    }

    /// `receive/{S}/{missing,write,commit,abort}`: one request of a receive session.
    async fn session_request(
        &self,
        req: Request<Incoming>,
        name: &str,
        sid: &str,
        cmd: &str,
        path: &str,
    ) -> Result<Resp, Resp> {
        let sid = sid.to_string();
        let cmd = cmd.to_string();
        let (tx, block_size) = {
            let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let h = s.get_mut(&sid).filter(|h| h.store == name).ok_or_else(|| {
                error(
                    ErrorKind::NotFound,
                    format!("receive session {sid} not found on store {name:?} (the server may have restarted; rerun the replication)"),
                )
            })?;
            h.last_used = Instant::now();
            if let Some(why) = &h.refused {
                return Err(refused_session(&sid, why));
            }
            (h.tx.clone(), h.block_size)
        };
        match cmd.as_str() {
            "missing" | "write" | "commit" => {}
            "abort" => {
                self.sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&sid);
                return Ok(json_ok(&serde_json::json!({})));
            }
            _ => {
                return Err(error(
                    ErrorKind::NotFound,
                    format!("{NO_SUCH_ENDPOINT} {path}"),
                ))
            }
        }
        // Whatever is refused from here on (a body that does not decode, a
        // write the receiver refuses) ends the session for good: a commit after
        // it would leave what the refused request carried missing.
        let (rtx, rrx) = oneshot::channel();
        let command = match self.decode_command(req, &cmd, block_size, rtx).await {
            Ok(c) => c,
            Err((why, resp)) => {
                self.refuse_session(&sid, why);
                return Err(resp);
            }
        };
        if tx.send(command).is_err() {
            return Err(error(
                ErrorKind::Gone,
                format!("receive session {sid} has ended"),
            ));
        }
        let reply = rrx
            .await
            .map_err(|_| error(ErrorKind::Internal, format!("receive session {sid} failed")))?;
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if cmd == "commit" && reply.is_ok() {
                sessions.remove(&sid);
            } else if let Err(e) = &reply {
                if let Some(h) = sessions.get_mut(&sid) {
                    h.refuse(e.to_string());
                }
            } else if let Some(h) = sessions.get_mut(&sid) {
                // Idle time counts from the end of the last request, so a long
                // write (or one waiting for its predecessor) is not idleness.
                h.last_used = Instant::now();
            }
        }
        match reply.map_err(store_error)? {
            Reply::Missing(bits) => Ok(respond(
                StatusCode::OK,
                encode_bitmap(&bits).into(),
                "application/octet-stream",
            )),
            Reply::Written(n) => Ok(json_ok(&WriteResponse { stored_bytes: n })),
            Reply::Committed(c) => Ok(json_ok(&CommitResponse {
                inserted_before: c.inserted_before,
                redundant_entries_removed: c.redundant_entries_removed,
            })),
        }
    }

    /// Read and decode one request of a receive session.
    async fn decode_command(
        &self,
        req: Request<Incoming>,
        cmd: &str,
        block_size: u64,
        reply: Responder,
    ) -> Result<Command, (String, Resp)> {
        let bad = |detail: String| (detail.clone(), error(ErrorKind::BadRequest, detail));
        match cmd {
            "missing" => {
                let b = body(req, MAX_JSON_BODY * 4)
                    .await
                    .map_err(|r| ("a body that could not be read".to_string(), r))?;
                let ids = decode_ids(&b).map_err(|e| bad(e.to_string()))?;
                Ok(Command::Missing(ids, reply))
            }
            "write" => {
                let sequence = req
                    .headers()
                    .get(SEQUENCE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        bad(format!("a write needs a numeric {SEQUENCE_HEADER} header"))
                    })?;
                let blocks = write_batch(req, block_size, self.plain.clone())
                    .await
                    .map_err(|r| ("a write batch that was refused".to_string(), r))?;
                Ok(Command::Write(sequence, blocks, reply))
            }
            _ => Ok(Command::Commit(reply)),
        }
    }

    /// Mark session `sid` refused: its receiver is abandoned now, and every later
    /// request of it (the commit above all) answers 409 with `why`.
    fn refuse_session(&self, sid: &str, why: String) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = sessions.get_mut(sid) {
            h.refuse(why);
        }
    }

    async fn begin(
        self: Arc<Self>,
        name: String,
        store: Arc<dyn ServedStore>,
        r: BeginRequest,
    ) -> Result<Resp, Resp> {
        // A session left by a dropped connection for the same snapshot is abandoned
        // (its stored packs stay, for this rerun to reuse).
        let key = (name.clone(), r.volume.clone(), r.snapshot.name.clone());
        let old: Vec<SessionHandle> = {
            let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = s
                .iter()
                .filter(|(_, h)| h.key == key)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| s.remove(id)).collect()
        };
        for h in old {
            info!(store = %name, volume = %r.volume, snapshot = %r.snapshot.name, "abandoning an earlier receive session of the same snapshot");
            h.close().await;
        }
        let block_size = store.sink().map(|s| s.block_size()).unwrap_or(0);
        let session = snapsync_store::random_id();
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), StoreError>>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let request = ReceiveRequest {
            volume: r.volume,
            snapshot: r.snapshot,
            base: r.base.map(|b| BaseRef {
                volume: b.volume,
                snapshot: b.snapshot,
            }),
            source_system: r.source_system,
            source_volume: r.source_volume,
            source_snapshot: r.source_snapshot,
            origin: r.origin,
        };
        let sid = session.clone();
        std::thread::Builder::new()
            .name(format!("receive-{}", &sid[..8]))
            .spawn(move || {
                session_thread(store, request, rx, ready_tx);
                let _ = done_tx.send(());
            })
            .map_err(|e| error(ErrorKind::Internal, format!("cannot start a session: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(store_error(e)),
            Err(_) => {
                return Err(error(
                    ErrorKind::Internal,
                    "the receive session failed".into(),
                ))
            }
        }
        info!(store = %name, session = %session, "receive session begun");
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                session.clone(),
                SessionHandle {
                    store: name,
                    refused: None,
                    key,
                    block_size,
                    tx,
                    done: Some(done_rx),
                    last_used: Instant::now(),
                },
            );
        Ok(json_ok(&BeginResponse { session }))
    }
}

fn diff_names(r: &DiffRequest) -> Result<(), Resp> {
    check_names(&[("volume", &r.volume), ("snapshot", &r.target)])?;
    if let Some(b) = &r.base {
        check_names(&[("volume", &b.volume), ("snapshot", &b.snapshot)])?;
    }
    Ok(())
}

fn sink_of<'a>(store: &'a Arc<dyn ServedStore>, name: &str) -> Result<&'a dyn SnapshotSink, Resp> {
    store.sink().ok_or_else(|| {
        error(
            ErrorKind::Unsupported,
            format!("store {name:?} is a source only; it cannot receive snapshots"),
        )
    })
}

/// Where a session's answer to one request goes.
type Responder = oneshot::Sender<Result<Reply, StoreError>>;

enum Command {
    Missing(Vec<BlockId>, Responder),
    /// A write with its sequence number.
    Write(u64, Vec<IncomingBlock>, Responder),
    Commit(Responder),
}

enum Reply {
    Missing(Vec<bool>),
    Written(u64),
    Committed(CommitInfo),
}

struct SessionHandle {
    store: String,
    /// Why a request of this session was refused; from then on it only answers that.
    refused: Option<String>,
    key: (String, String, String),
    block_size: u64,
    tx: std::sync::mpsc::Sender<Command>,
    done: Option<oneshot::Receiver<()>>,
    last_used: Instant,
}

impl SessionHandle {
    /// Remember the first refusal and abandon the receiver (its thread ends when the
    /// channel closes, releasing what it holds, such as a repository's session lock).
    fn refuse(&mut self, why: String) {
        self.refused.get_or_insert(why);
        self.tx = std::sync::mpsc::channel().0;
    }

    /// Drop the session and wait until its receiver is gone.
    async fn close(mut self) {
        let done = self.done.take();
        drop(self);
        if let Some(d) = done {
            let _ = d.await;
        }
    }
}

fn session_thread(
    store: Arc<dyn ServedStore>,
    request: ReceiveRequest,
    rx: std::sync::mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), StoreError>>,
) {
    let Some(sink) = store.sink() else {
        let _ = ready.send(Err(StoreError::Unsupported {
            what: "receiving into a source-only store".into(),
        }));
        return;
    };
    let mut receiver = match sink.begin_receive(request) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    // Writes are applied in their sequence order; ones that arrive early wait here.
    let mut next_write = 0u64;
    let mut early: BTreeMap<u64, (Vec<IncomingBlock>, Responder)> = BTreeMap::new();
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Missing(ids, reply) => {
                let _ = reply.send(receiver.missing(&ids).map(Reply::Missing));
            }
            Command::Write(sequence, blocks, reply) => {
                if sequence < next_write || early.contains_key(&sequence) {
                    let _ = reply.send(Err(StoreError::Conflict {
                        what: format!("write {sequence} of this session arrived twice"),
                    }));
                    return;
                }
                if sequence >= next_write + MAX_WRITES_AHEAD {
                    let _ = reply.send(Err(StoreError::Conflict {
                        what: format!(
                            "write {sequence} arrived while write {next_write} is still awaited"
                        ),
                    }));
                    return;
                }
                early.insert(sequence, (blocks, reply));
                while let Some((blocks, reply)) = early.remove(&next_write) {
                    next_write += 1;
                    let result = receiver.write(blocks);
                    let failed = result.is_err();
                    let _ = reply.send(result.map(Reply::Written));
                    if failed {
                        // A failed receive cannot continue; waiting writes fail with it.
                        return;
                    }
                }
            }
            Command::Commit(reply) => {
                if let Some(first) = early.keys().next() {
                    let _ = reply.send(Err(StoreError::Conflict {
                        what: format!(
                            "commit while write {next_write} never arrived (write {first} did)"
                        ),
                    }));
                    return;
                }
                let _ = reply.send(receiver.commit().map(Reply::Committed));
                return;
            }
        }
    }
    debug!("receive session abandoned");
}
