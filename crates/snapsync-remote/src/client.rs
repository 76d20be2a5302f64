//! The `snapsync://HOST:PORT/NAME` store: a served store, over the protocol.
//!
//! The API is blocking, like every store's; requests run on a small Tokio runtime owned
//! by the store. Reads of a large range are split and sent concurrently over the one
//! HTTP/2 connection, so the server reads and compresses in parallel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use snapsync_core::{BlockId, Hint, VolumeInfo};
use snapsync_store::runtime::OwnedRuntime;
use snapsync_store::view::{Chain, Known, RepositorySize, RepositoryView};
use snapsync_store::{
    BlockContent, CommitInfo, Compressed, Diff, IncomingBlock, ReceiveRequest, Receiver, Result,
    SnapshotReader, SnapshotRef, SnapshotSink, SnapshotSource, Store, StoreError,
};
use tracing::debug;

use crate::proto::*;
use crate::RemoteError;

/// Reads are split into requests of this size, sent concurrently.
const READ_CHUNK: u64 = 2 << 20;
/// A `write` request carries at most about this many bytes of encoded blocks.
const WRITE_BODY_TARGET: usize = 32 << 20;
/// Writes sent before waiting for the oldest answer. Each is one batch of the engine's
/// (8 MiB read): enough queued at the server that it never waits for the next while it
/// stores a pack (measured on loopback: 3 left the server idle between packs, 6 did not,
/// 10 gained nothing more), and a link's bandwidth-delay product of up to ~48 MiB.
/// At most [`MAX_WRITES_AHEAD`] - the server refuses more.
const WRITES_IN_FLIGHT: usize = 6;
const _: () = assert!(WRITES_IN_FLIGHT as u64 <= MAX_WRITES_AHEAD);

/// How to reach and authenticate to a server. Nothing here is read from the
/// environment: the program decides where the token and certificates come from.
#[non_exhaustive]
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// The bearer token.
    pub token: String,
    /// PEM certificates to trust instead of the system roots (a self-signed server
    /// certificate, or the CA that signed it).
    pub ca_pem: Option<Vec<u8>>,
}

impl ClientOptions {
    /// Options presenting `token`, trusting the system roots.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            ca_pem: None,
        }
    }

    /// Trust these PEM certificates instead of the system roots.
    pub fn with_ca_pem(mut self, ca_pem: Vec<u8>) -> Self {
        self.ca_pem = Some(ca_pem);
        self
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("token", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .finish()
    }
}

/// A parsed remote store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteUrl {
    /// TLS (`snapsync://`) or plain text (`snapsync+http://`).
    pub tls: bool,
    /// `HOST:PORT`.
    pub authority: String,
    /// The store name on the server.
    pub name: String,
}

impl RemoteUrl {
    /// Parse `snapsync://HOST:PORT/NAME` or `snapsync+http://HOST:PORT/NAME`.
    pub fn parse(s: &str) -> Result<Self, RemoteError> {
        let bad = |why: &str| RemoteError::Url {
            url: s.to_string(),
            why: why.to_string(),
        };
        let (tls, rest) = if let Some(r) = s.strip_prefix("snapsync://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("snapsync+http://") {
            (false, r)
        } else {
            return Err(bad("not a snapsync:// or snapsync+http:// URL"));
        };
        let (authority, name) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no store (use snapsync://HOST:PORT/NAME)"))?;
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(bad("it needs HOST:PORT")),
        }
        if name.is_empty() {
            return Err(bad("it names no store (use snapsync://HOST:PORT/NAME)"));
        }
        snapsync_core::validate_name("store", name).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            tls,
            authority: authority.to_string(),
            name: name.to_string(),
        })
    }

    /// The URL as given.
    pub fn display(&self) -> String {
        format!(
            "{}://{}/{}",
            if self.tls {
                "snapsync"
            } else {
                "snapsync+http"
            },
            self.authority,
            self.name
        )
    }

    fn base(&self) -> String {
        // The store name is percent-encoded whole, so that nothing in it (`/`, `..`)
        // is interpreted on the way: the server decides what it accepts.
        const NAME: &percent_encoding::AsciiSet =
            &percent_encoding::NON_ALPHANUMERIC.remove(b'_').remove(b'-');
        let name = percent_encoding::utf8_percent_encode(&self.name, NAME);
        format!(
            "{}://{}/v1/stores/{name}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// A store served by `snapsync serve`.
pub struct RemoteStore {
    runtime: OwnedRuntime,
    client: reqwest::Client,
    url: String,
    base: String,
    token: String,
    info: InfoResponse,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("url", &self.url)
            .finish()
    }
}

fn backend(context: String, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        context,
        source: Box::new(e),
    }
}

/// Flatten an error and its causes into one line.
/// Whether a refusal is a server's answer to an operation it does not know: a server
/// older than the client, asked for an operation added since (operations are added
/// without a new protocol version; see docs/PROTOCOL.md, "Versioning").
fn is_unknown_operation(e: &ErrorBody) -> bool {
    e.kind == ErrorKind::NotFound && e.what.is_none() && e.message.starts_with(NO_SUCH_ENDPOINT)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl RemoteStore {
    /// Connect: check the URL, the protocol version and the token, and fetch the store's
    /// identity.
    pub fn open(url: &str, options: ClientOptions) -> Result<Self> {
        let u = RemoteUrl::parse(url).map_err(|e| StoreError::Malformed {
            location: url.to_string(),
            detail: e.to_string(),
        })?;
        let display = u.display();
        if options.token.trim().is_empty() {
            return Err(StoreError::Malformed {
                location: display,
                detail: "no token given".into(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_initial_stream_window_size(16 << 20)
            .http2_initial_connection_window_size(64 << 20)
            .http2_max_frame_size(1 << 20);
        if u.tls {
            let tls = crate::tls::client_config(options.ca_pem.as_deref()).map_err(|detail| {
                StoreError::Malformed {
                    location: display.clone(),
                    detail,
                }
            })?;
            builder = builder.use_preconfigured_tls(tls);
            builder = builder.https_only(true);
        } else {
            builder = builder.http2_prior_knowledge();
        }
        let client = builder
            .build()
            .map_err(|e| backend(format!("{display}: cannot set up the client"), e))?;
        let runtime = OwnedRuntime::new("snapsync-client", 2)
            .map_err(|e| StoreError::io(format!("{display}: cannot start a runtime"), e))?;
        let mut s = Self {
            runtime,
            client,
            url: display,
            base: u.base(),
            token: options.token.trim().to_string(),
            info: InfoResponse {
                system_id: String::new(),
                location: String::new(),
                block_size: None,
                writable: false,
            },
        };
        s.info = s.get_json("info")?;
        debug!(url = %s.url, remote = %s.info.location, "connected");
        Ok(s)
    }

    /// Whether the server holds a destination (a repository) under this name.
    pub fn is_sink(&self) -> bool {
        self.info.block_size.is_some()
    }

    /// Whether the token may write.
    pub fn writable(&self) -> bool {
        self.info.writable
    }

    /// Send a request; check the answer's status (turning a refusal into its error) and
    /// protocol version, and leave its body to be read.
    async fn answered(
        url: &str,
        what: &str,
        req: reqwest::RequestBuilder,
        token: &str,
    ) -> Result<reqwest::Response> {
        let resp = req
            .header(VERSION_HEADER, PROTOCOL_VERSION.to_string())
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| StoreError::Backend {
                context: format!("{url}: {what}"),
                source: chain(&e).into(),
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let err: Option<ErrorBody> = serde_json::from_slice(&body).ok();
            return Err(match err {
                Some(e) if is_unknown_operation(&e) => StoreError::Unsupported {
                    what: format!("the server of {url} does not offer `{what}` (it is older than this client: upgrade the snapsync serving it)"),
                },
                Some(e) => e.to_store(&format!("{url}: {what}")),
                None => StoreError::Backend {
                    context: format!("{url}: {what}"),
                    source: format!(
                        "the server answered {status} without a snapsync error; is it a snapsync server?"
                    )
                    .into(),
                },
            });
        }
        match resp.headers().get(VERSION_HEADER).and_then(|v| v.to_str().ok()) {
            Some(v) if v.trim() == PROTOCOL_VERSION.to_string() => Ok(resp),
            Some(v) => Err(StoreError::Backend {
                context: format!("{url}: {what}"),
                source: format!("protocol version mismatch: the server speaks {v}, this client speaks {PROTOCOL_VERSION}").into(),
            }),
            None => Err(StoreError::Backend {
                context: format!("{url}: {what}"),
                source: format!("the answer has no {VERSION_HEADER} header; is it a snapsync server?").into(),
            }),
        }
    }

    /// Send a request and read its whole answer.
    async fn send(
        url: &str,
        what: &str,
        req: reqwest::RequestBuilder,
        token: &str,
    ) -> Result<(reqwest::header::HeaderMap, Bytes)> {
        let resp = Self::answered(url, what, req, token).await?;
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| StoreError::Backend {
            context: format!("{url}: {what}: reading the answer"),
            source: chain(&e).into(),
        })?;
        if body.len() > MAX_RESPONSE {
            return Err(StoreError::Backend {
                context: format!("{url}: {what}"),
                source: "the answer is too large".into(),
            });
        }
        Ok((headers, body))
    }

    fn request(
        &self,
        method: reqwest::Method,
        op: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(reqwest::header::HeaderMap, Bytes)> {
        let mut req = self.client.request(method, format!("{}/{op}", self.base));
        if let Some(b) = body {
            req = req.body(b);
        }
        self.runtime
            .block_on(Self::send(&self.url, op, req, &self.token))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, op: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| StoreError::Backend {
            context: format!("{}: {op}: malformed answer", self.url),
            source: Box::new(e),
        })
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, op: &str) -> Result<T> {
        let (_, b) = self.request(reqwest::Method::GET, op, None)?;
        self.decode(op, &b)
    }

    fn post_json<Q: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        q: &Q,
    ) -> Result<T> {
        let body = serde_json::to_vec(q).map_err(|e| backend(format!("{}: {op}", self.url), e))?;
        let (_, b) = self.request(reqwest::Method::POST, op, Some(body))?;
        self.decode(op, &b)
    }
}

impl Store for RemoteStore {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn system_id(&self) -> Result<String> {
        Ok(self.info.system_id.clone())
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.get_json("list")
    }
}

/// A served repository's size and chains, for the daemon's status page; a read-only
/// token suffices.
impl RepositoryView for RemoteStore {
    fn size(&self) -> Result<RepositorySize> {
        self.get_json("stats")
    }

    fn chains(&self, volumes: &[String], known: &Known) -> Result<Vec<Chain>> {
        let q = ChainsRequest {
            volumes: volumes.to_vec(),
            known: known.clone(),
        };
        self.post_json("chains", &q)
    }
}

fn wire_ref(r: SnapshotRef<'_>) -> WireSnapshotRef {
    WireSnapshotRef {
        volume: r.volume.to_string(),
        snapshot: r.snapshot.to_string(),
    }
}

impl SnapshotSource for RemoteStore {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let d: DiffResponse = self.post_json(
            "diff",
            &DiffRequest {
                volume: volume.into(),
                target: target.into(),
                base: base.map(wire_ref),
            },
        )?;
        Ok(Diff {
            data: d.data,
            zero: d.zero,
            method: d.method,
        })
    }

    fn estimate_diff(&self, volume: &str, target: &str, base: SnapshotRef<'_>) -> Option<u64> {
        self.post_json::<_, EstimateResponse>(
            "estimate_diff",
            &DiffRequest {
                volume: volume.into(),
                target: target.into(),
                base: Some(wire_ref(base)),
            },
        )
        .ok()
        .and_then(|r| r.estimate)
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        snapsync_core::validate_name("volume", volume)?;
        snapsync_core::validate_name("snapshot", snapshot)?;
        // An empty read: the server opens the snapshot, so a missing one fails here.
        let q = ReadRequest {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            offset: 0,
            len: 0,
            block_size: None,
        };
        let body = serde_json::to_vec(&q).map_err(|e| backend(format!("{}: read", self.url), e))?;
        self.request(reqwest::Method::POST, "read", Some(body))?;
        Ok(Box::new(RemoteReader {
            store: self,
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            last: None,
            ahead: None,
        }))
    }
}

struct RemoteReader<'a> {
    store: &'a RemoteStore,
    volume: String,
    snapshot: String,
    /// The range read last, to spot a sequential pass.
    last: Option<Range>,
    /// The range after it, asked for before it is needed.
    ahead: Option<(Range, Answers)>,
}

/// A read: offset, length, block size.
type Range = (u64, usize, Option<u64>);
/// The bodies of a read's answers, one per request, as they arrived.
type Answers = tokio::task::JoinHandle<Result<Vec<Vec<Bytes>>>>;

impl RemoteReader<'_> {
    /// Ask for `range` in concurrent requests of about [`READ_CHUNK`] bytes; the answers'
    /// bodies, as they arrived, in order.
    fn fetch(
        &self,
        (offset, len, block_size): Range,
    ) -> impl std::future::Future<Output = Result<Vec<Vec<Bytes>>>> + Send + 'static {
        let s = self.store;
        let per_request = request_len(block_size);
        let requests: Vec<_> = (0..len.div_ceil(per_request))
            .map(|i| {
                let off = offset + (i * per_request) as u64;
                let q = ReadRequest {
                    volume: self.volume.clone(),
                    snapshot: self.snapshot.clone(),
                    offset: off,
                    len: per_request.min(len - i * per_request) as u64,
                    block_size,
                };
                let body = serde_json::to_vec(&q).expect("serialisable");
                (q, s.client.post(format!("{}/read", s.base)).body(body))
            })
            .collect();
        let (url, token) = (s.url.clone(), s.token.clone());
        async move {
            let answers = requests.into_iter().map(|(q, req)| {
                let (url, token) = (url.clone(), token.clone());
                async move {
                    let bad = |detail: String| StoreError::Backend {
                        context: format!(
                            "{url}: read {} at {}",
                            snapsync_core::quote_snapshot(&q.volume, &q.snapshot),
                            q.offset
                        ),
                        source: detail.into(),
                    };
                    let limit =
                        read_answer_limit(q.len as usize, q.block_size.unwrap_or(q.len) as usize);
                    let mut resp = RemoteStore::answered(&url, "read", req, &token).await?;
                    let (mut pieces, mut size) = (Vec::new(), 0);
                    while let Some(piece) = resp
                        .chunk()
                        .await
                        .map_err(|e| bad(format!("reading the answer: {}", chain(&e))))?
                    {
                        size += piece.len();
                        if size > limit {
                            return Err(bad(format!("the answer is longer than {limit} bytes")));
                        }
                        pieces.push(piece);
                    }
                    Ok(pieces)
                }
            });
            futures::future::try_join_all(answers).await
        }
    }

    /// Read `buf` from `offset` as blocks of `block_size` (`None`: each request's range
    /// is one block). A pass reading range after range of the same size (the engine
    /// reading an image) has the next range asked for while this one is used, so the
    /// server reads and compresses it meanwhile.
    fn read_blocks(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        block_size: Option<u64>,
    ) -> Result<Vec<Compressed>> {
        use rayon::prelude::*;
        let range = (offset, buf.len(), block_size);
        let answers = match self.ahead.take() {
            Some((r, task)) if r == range => task,
            other => {
                if let Some((_, task)) = other {
                    task.abort();
                }
                self.store.runtime.spawn(self.fetch(range))
            }
        };
        let sequential = self
            .last
            .is_some_and(|(o, l, b)| o + l as u64 == offset && l == buf.len() && b == block_size);
        if sequential {
            let next = (offset + buf.len() as u64, buf.len(), block_size);
            self.ahead = Some((next, self.store.runtime.spawn(self.fetch(next))));
        }
        self.last = Some(range);
        let answers = self
            .store
            .runtime
            .block_on(answers)
            .map_err(|e| backend(format!("{}: read", self.store.url), e))??;
        let per_request = request_len(block_size);
        let (url, volume, snapshot) = (&self.store.url, &self.volume, &self.snapshot);
        let parts = buf
            .par_chunks_mut(per_request)
            .zip(answers)
            .enumerate()
            .map(|(i, (chunk, pieces))| {
                let bs = block_size.unwrap_or(chunk.len() as u64) as usize;
                let mut decoder = ReadAnswerDecoder::new(chunk, bs);
                pieces
                    .into_iter()
                    .try_for_each(|p| decoder.feed(p))
                    .and_then(|()| decoder.finish())
                    .map_err(|e| StoreError::Backend {
                        context: format!(
                            "{url}: read {} at {}",
                            snapsync_core::quote_snapshot(volume, snapshot),
                            offset + (i * per_request) as u64
                        ),
                        source: e.to_string().into(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(parts.into_iter().flatten().collect())
    }
}

impl Drop for RemoteReader<'_> {
    fn drop(&mut self) {
        if let Some((_, task)) = self.ahead.take() {
            task.abort();
        }
    }
}

/// Bytes asked for in one `read` request: about [`READ_CHUNK`], whole blocks.
fn request_len(block_size: Option<u64>) -> usize {
    let len = match block_size {
        Some(bs) => (READ_CHUNK / bs).max(1) * bs,
        None => READ_CHUNK,
    };
    len as usize
}

impl SnapshotReader for RemoteReader<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_blocks(offset, buf, None).map(drop)
    }

    fn read_blocks_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        block_size: u64,
    ) -> Result<Vec<Compressed>> {
        self.read_blocks(offset, buf, Some(block_size))
    }
}

impl SnapshotSink for RemoteStore {
    fn block_size(&self) -> u64 {
        self.info.block_size.unwrap_or(0)
    }

    fn hints(&self, source_system: &str, source_volume: &str) -> Result<Vec<Hint>> {
        self.post_json(
            "hints",
            &HintsRequest {
                source_system: source_system.into(),
                source_volume: source_volume.into(),
            },
        )
    }

    fn begin_receive(&self, r: ReceiveRequest) -> Result<Box<dyn Receiver + '_>> {
        let b: BeginResponse = self.post_json(
            "receive",
            &BeginRequest {
                volume: r.volume,
                snapshot: r.snapshot,
                base: r.base.map(|b| WireSnapshotRef {
                    volume: b.volume,
                    snapshot: b.snapshot,
                }),
                source_system: r.source_system,
                source_volume: r.source_volume,
                source_snapshot: r.source_snapshot,
                origin: r.origin,
            },
        )?;
        if b.session.is_empty() || !b.session.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::Backend {
                context: format!("{}: receive", self.url),
                source: "the server sent a malformed session id".into(),
            });
        }
        Ok(Box::new(RemoteReceiver {
            store: self,
            session: b.session,
            finished: false,
            next_sequence: 0,
            in_flight: VecDeque::new(),
            in_flight_ids: HashMap::new(),
            asked: VecDeque::new(),
        }))
    }
}

struct RemoteReceiver<'a> {
    store: &'a RemoteStore,
    session: String,
    finished: bool,
    /// Sequence number of the next `write`: the server applies writes in this order
    /// whatever order their requests arrive in.
    next_sequence: u64,
    /// Writes sent and not yet answered, oldest first, with the ids of the data blocks
    /// each carries.
    in_flight: VecDeque<(tokio::task::JoinHandle<Result<u64>>, Vec<BlockId>)>,
    /// How many in-flight writes carry each data block: those blocks count as present.
    in_flight_ids: HashMap<BlockId, u32>,
    /// `missing` questions asked ahead (see [`Receiver::missing_ahead`]), oldest first.
    asked: VecDeque<AskedAhead>,
}

/// A `missing` question asked before the caller needs its answer.
struct AskedAhead {
    ids: Vec<BlockId>,
    /// Blocks the server may not have seen when it answered: those of writes in flight
    /// when the question was asked or sent since. They count as present.
    sent_since: HashSet<BlockId>,
    answer: tokio::task::JoinHandle<Result<Vec<bool>>>,
}

/// Questions asked ahead at most; an announced question never asked is dropped.
const MAX_ASKED_AHEAD: usize = 4;

impl RemoteReceiver<'_> {
    fn op(&self, cmd: &str) -> String {
        format!("receive/{}/{cmd}", self.session)
    }

    /// Ask the server which of `ids` it lacks, as it stands when the question arrives.
    fn ask_missing(
        &self,
        ids: Vec<BlockId>,
    ) -> impl std::future::Future<Output = Result<Vec<bool>>> + Send + 'static {
        let s = self.store;
        let client = s.client.clone();
        let (url, token) = (s.url.clone(), s.token.clone());
        let endpoint = format!("{}/{}", s.base, self.op("missing"));
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for part in ids.chunks(MAX_BATCH_BLOCKS) {
                let req = client.post(&endpoint).body(encode_ids(part));
                let (_, b) = RemoteStore::send(&url, "missing", req, &token).await?;
                let bits = decode_bitmap(&b, part.len()).map_err(|e| StoreError::Backend {
                    context: format!("{url}: missing"),
                    source: Box::new(e),
                })?;
                out.extend(bits);
            }
            Ok(out)
        }
    }

    /// Send one write without waiting for its answer.
    fn send_write(&mut self, part: Vec<IncomingBlock>) {
        let ids: Vec<BlockId> = part
            .iter()
            .filter_map(|b| match &b.content {
                BlockContent::Data { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        for id in &ids {
            *self.in_flight_ids.entry(*id).or_default() += 1;
        }
        for a in &mut self.asked {
            a.sent_since.extend(&ids);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let s = self.store;
        let client = s.client.clone();
        let (url, token) = (s.url.clone(), s.token.clone());
        let endpoint = format!("{}/{}", s.base, self.op("write"));
        let task = s.runtime.spawn(async move {
            // Compression runs on all cores, off the caller's thread.
            let body = tokio::task::spawn_blocking(move || encode_blocks(&part))
                .await
                .map_err(|e| backend(format!("{url}: write"), e))?;
            let req = client
                .post(endpoint)
                .header(SEQUENCE_HEADER, sequence.to_string())
                .body(reqwest::Body::wrap(ChunksBody::from(body)));
            let (_, b) = RemoteStore::send(&url, "write", req, &token).await?;
            let r: WriteResponse = serde_json::from_slice(&b).map_err(|e| StoreError::Backend {
                context: format!("{url}: write: malformed answer"),
                source: Box::new(e),
            })?;
            Ok(r.stored_bytes)
        });
        self.in_flight.push_back((task, ids));
    }

    /// Wait for the oldest in-flight write.
    fn finish_oldest(&mut self) -> Result<u64> {
        let Some((task, ids)) = self.in_flight.pop_front() else {
            return Ok(0);
        };
        for id in ids {
            if let Some(n) = self.in_flight_ids.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight_ids.remove(&id);
                }
            }
        }
        self.store
            .runtime
            .block_on(task)
            .map_err(|e| backend(format!("{}: write", self.store.url), e))?
    }
}

impl Receiver for RemoteReceiver<'_> {
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>> {
        // The answer to a question asked ahead, if this is the one announced; questions
        // announced and never asked are dropped on the way.
        while let Some(a) = self.asked.pop_front() {
            if a.ids != ids {
                a.answer.abort();
                continue;
            }
            let bits = self
                .store
                .runtime
                .block_on(a.answer)
                .map_err(|e| backend(format!("{}: missing", self.store.url), e))??;
            return Ok(bits
                .into_iter()
                .zip(ids)
                .map(|(m, id)| m && !a.sent_since.contains(id))
                .collect());
        }
        let bits = self
            .store
            .runtime
            .block_on(self.ask_missing(ids.to_vec()))?;
        // A block an unanswered write carries is present by the time a later write
        // refers to it: the server applies writes in sequence.
        Ok(bits
            .into_iter()
            .zip(ids)
            .map(|(m, id)| m && !self.in_flight_ids.contains_key(id))
            .collect())
    }

    fn missing_ahead(&mut self, ids: &[BlockId]) -> bool {
        while self.asked.len() >= MAX_ASKED_AHEAD {
            if let Some(a) = self.asked.pop_front() {
                a.answer.abort();
            }
        }
        let answer = self.store.runtime.spawn(self.ask_missing(ids.to_vec()));
        self.asked.push_back(AskedAhead {
            ids: ids.to_vec(),
            sent_since: self.in_flight_ids.keys().copied().collect(),
            answer,
        });
        true
    }

    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64> {
        let mut stored = 0;
        let mut blocks = blocks.into_iter().peekable();
        while blocks.peek().is_some() {
            // Bounded requests: a batch of many zero blocks, or of large blocks, is split.
            let mut part = Vec::new();
            let mut size = 0usize;
            while part.len() < MAX_BATCH_BLOCKS && size < WRITE_BODY_TARGET {
                let Some(b) = blocks.next() else { break };
                size += encoded_size(&b);
                part.push(b);
            }
            while self.in_flight.len() >= WRITES_IN_FLIGHT {
                stored += self.finish_oldest()?;
            }
            self.send_write(part);
        }
        // Collect what has already been answered, without waiting.
        while self.in_flight.front().is_some_and(|(t, _)| t.is_finished()) {
            stored += self.finish_oldest()?;
        }
        Ok(stored)
    }

    fn flush(&mut self) -> Result<u64> {
        let mut stored = 0;
        while !self.in_flight.is_empty() {
            stored += self.finish_oldest()?;
        }
        Ok(stored)
    }

    fn commit(mut self: Box<Self>) -> Result<CommitInfo> {
        self.flush()?;
        self.finished = true;
        let (_, b) =
            self.store
                .request(reqwest::Method::POST, &self.op("commit"), Some(Vec::new()))?;
        let c: CommitResponse = self.store.decode("commit", &b)?;
        Ok(CommitInfo {
            inserted_before: c.inserted_before,
            redundant_entries_removed: c.redundant_entries_removed,
        })
    }
}

impl Drop for RemoteReceiver<'_> {
    fn drop(&mut self) {
        for (task, _) in self.in_flight.drain(..) {
            task.abort();
        }
        for a in self.asked.drain(..) {
            a.answer.abort();
        }
        if !self.finished {
            // Best effort: the server abandons the session itself otherwise.
            let _ = self
                .store
                .request(reqwest::Method::POST, &self.op("abort"), Some(Vec::new()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use snapsync_store::memory::MemoryStore;

    use super::*;
    use crate::{ServedStore, Server, ServerConfig, Tokens};

    const TOKEN: &str = "unit-test-token-0123456789";

    fn serve() -> u16 {
        let store = Arc::new(MemoryStore::new("mem", 4096)) as Arc<dyn ServedStore>;
        let server = Server::bind(
            ServerConfig::plaintext(vec![("mem".into(), store)], Tokens::parse(TOKEN).unwrap()),
            "127.0.0.1:0",
        )
        .unwrap();
        server.spawn().unwrap().port()
    }

    /// An older server asked for an operation added since (`stats` and `chains` from a
    /// server before them) answers `404` "no such endpoint": the one line says so. A
    /// server's answer to an operation it does not know has not changed since version
    /// 1, so this server, asked for one that no version has, answers as an old one does.
    #[test]
    fn an_operation_the_server_does_not_offer_is_said_in_one_line() {
        let port = serve();
        let url = format!("snapsync+http://127.0.0.1:{port}/mem");
        let store = RemoteStore::open(&url, ClientOptions::new(TOKEN)).unwrap();
        let e = store.get_json::<serde_json::Value>("weather").unwrap_err();
        assert!(matches!(e, StoreError::Unsupported { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "unsupported: the server of {} does not offer `weather` (it is older than this client: upgrade the snapsync serving it)",
                store.location()
            )
        );
        // Another 404 is not taken for one: a store the server does not serve.
        let other = format!("snapsync+http://127.0.0.1:{port}/nope");
        let e = RemoteStore::open(&other, ClientOptions::new(TOKEN)).unwrap_err();
        assert!(!e.to_string().contains("does not offer"), "{e}");
        assert!(e.to_string().contains("not served here"), "{e}");
    }
}
