//! The object-store backend: one synchronous facade over `object_store`.
//!
//! The repository is written against immutable objects and create-only conditional
//! writes, the one primitive both a local file system (hard link) and S3
//! (`If-None-Match: *`) provide atomically. That is why the same repository code serves
//! `file://` and `s3://`: there is one implementation, not two.
//!
//! The store's async API is driven by a small Tokio runtime owned here, so the rest of
//! the code stays synchronous and uses threads (rayon) for CPU work. Two reads of local
//! objects skip it: ranges of packs are read with `pread` straight into the caller's
//! buffers, and batches of whole objects (pack indexes) on the calling threads, so that
//! reading a snapshot allocates no buffer per block or per object on a thread of its
//! own. Everything the repository code sees is the same for both kinds of store.
//!
//! On S3 the endpoint and credentials come from the standard `AWS_*` variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`), so snapsync is configured like every other S3 client. Transient
//! failures are retried with backoff for at most [`RepoOptions::retry_timeout`]
//! (default [`DEFAULT_RETRY_TIMEOUT_SECS`]), so a dead server is reported within about
//! half a minute instead of hanging a replication.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use snapsync_store::runtime::OwnedRuntime;
use snapsync_store::{Result, StoreError};

use crate::staged::StagedFile;
use crate::RepoOptions;

/// Default bound on retries of one request: long enough to ride out a server restart or
/// a burst of 503 SlowDown, short enough that a dead server gives a clear error soon.
pub const DEFAULT_RETRY_TIMEOUT_SECS: u64 = 30;

/// Objects at least this large are uploaded to S3 in parts of this size: a 32 MiB pack
/// is then four requests that run in parallel and are retried one by one.
const PART_SIZE: usize = 8 << 20;
/// Parts of one object in flight at once. With the receiver's bounded number of packs
/// uploading together this bounds both memory and connections.
const PART_PARALLELISM: usize = 4;

/// Key prefix of the create-only probe objects; ignored by `init`'s emptiness check, so
/// a probe left behind by an interrupted `init` does not block the next one.
pub(crate) const PROBE_PREFIX: &str = "probe";

/// An object store the caller built (any `object_store` implementation, or a wrapper
/// of one), with the name it goes by in messages.
#[derive(Clone)]
pub struct CustomStore {
    name: String,
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for CustomStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CustomStore({})", self.name)
    }
}

/// Two custom locations are the same when they are the same store object.
impl PartialEq for CustomStore {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.store, &other.store)
    }
}

impl Eq for CustomStore {}

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// A directory on a local file system.
    Local(PathBuf),
    /// A prefix (possibly empty) in an S3 bucket; endpoint and credentials come from the
    /// `AWS_*` environment variables.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing `/`; empty for the bucket's root.
        prefix: String,
    },
    /// An object store the caller built: its own credentials and client settings, an
    /// in-memory store, or a wrapper that injects faults (the crash-point tests). The
    /// repository reaches it only through the `ObjectStore` trait.
    Custom(CustomStore),
}

impl Location {
    /// A repository in `store`, called `name` in messages. The store must honour
    /// create-only puts (`PutMode::Create`); `init` checks that it does.
    pub fn custom(name: impl Into<String>, store: Arc<dyn ObjectStore>) -> Self {
        Location::Custom(CustomStore {
            name: name.into(),
            store,
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "file://{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Location::Custom(custom) => f.write_str(&custom.name),
        }
    }
}

/// The retry policy for S3 requests: exponential backoff bounded in total time by
/// `timeout`, so tests can make a dead server fail fast.
fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5).min(timeout.max(Duration::from_millis(100))),
            base: 2.0,
        },
        // The time bound is what matters; the count only has to be large enough.
        max_retries: if timeout.is_zero() { 0 } else { 1000 },
        retry_timeout: timeout,
    }
}

/// Whether a put may replace an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// Fail with [`StoreError::AlreadyExists`] if the key exists (a commit point).
    Create,
    /// Replace: only for hints to readers that are never trusted alone (a catalog's
    /// `head` pointer).
    Overwrite,
}

/// Writes running in the background; see [`Backend::spawn_puts`].
#[derive(Debug)]
pub(crate) struct PendingPuts(tokio::task::JoinHandle<Result<()>>);

/// fsync a local object and its directory (no-op for remote stores).
fn sync_local(location: &Location, key: &str) -> Result<()> {
    let Location::Local(root) = location else {
        return Ok(());
    };
    let p = root.join(key);
    let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(&p).map_err(|e| StoreError::io(format!("fsync {}", p.display()), e))?;
    if let Some(dir) = p.parent() {
        sync(dir).map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))?;
    }
    Ok(())
}

/// Run blocking file system work on the runtime's blocking threads.
async fn blocking(f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend {
            context: "fsync task".into(),
            source: Box::new(e),
        })?
}

/// Write `objects` in order, each durably (fsynced with its directory on a local disk)
/// before the next.
async fn put_synced(
    store: Arc<dyn ObjectStore>,
    location: Location,
    objects: Vec<(String, Vec<Bytes>)>,
) -> Result<()> {
    let multipart = matches!(location, Location::S3 { .. });
    for (key, chunks) in objects {
        let path = ObjectPath::from(key.as_str());
        let data = PutPayload::from_iter(chunks);
        let r = if multipart && data.content_length() > PART_SIZE {
            put_multipart(store.as_ref(), &path, data).await
        } else {
            store
                .put_opts(&path, data, PutOptions::default())
                .await
                .map(drop)
        };
        r.map_err(|e| backend_err(format!("write {location}/{key}"), e))?;
        let loc = location.clone();
        blocking(move || sync_local(&loc, &key)).await?;
    }
    Ok(())
}

/// Upload `data` in [`PART_SIZE`] parts, at most [`PART_PARALLELISM`] at once; an upload
/// that fails is aborted so the server does not keep its parts.
async fn put_multipart(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: PutPayload,
) -> object_store::Result<()> {
    let upload = store.put_multipart(path).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let r = async {
        for chunk in &data {
            w.wait_for_capacity(PART_PARALLELISM).await?;
            // Parts are cut from the chunks as they are, without copying them.
            w.put(chunk.clone());
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => w.finish().await.map(drop),
        Err(e) => {
            let _ = w.abort().await;
            Err(e)
        }
    }
}

/// A synchronous handle on an object store.
pub(crate) struct Backend {
    store: Arc<dyn ObjectStore>,
    runtime: OwnedRuntime,
    location: Location,
    /// Listing calls made, so tests can show that reading a snapshot needs none.
    listings: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.location)
    }
}

fn backend_err(context: String, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound { what: context },
        object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { what: context },
        object_store::Error::Precondition { .. } => StoreError::Conflict { what: context },
        other => StoreError::Backend {
            context,
            source: Box::new(Cause(summarize(&other))),
        },
    }
}

/// The root cause of a backend failure as one short line. An S3 error nests the same
/// text several levels deep (each level repeating its source), and an error reply can
/// carry a multi-line XML body; users get the innermost cause and the retry count.
#[derive(Debug)]
struct Cause(String);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

fn summarize(e: &object_store::Error) -> String {
    let full = e.to_string();
    let mut root = full.clone();
    let mut cur = std::error::Error::source(e);
    while let Some(s) = cur {
        root = s.to_string();
        cur = s.source();
    }
    let mut line = root.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        line = line.chars().take(300).collect::<String>() + "…";
    }
    // "… in 3.1s, after 14 retries, …" from the retry layer.
    let retries = full.find(" retries").and_then(|end| {
        let start = full[..end].rfind("after ")? + "after ".len();
        full[start..end].parse::<u64>().ok()
    });
    match retries {
        Some(n) if n > 0 => format!("{line} (gave up after {n} retries)"),
        _ => line,
    }
}

impl Backend {
    /// Open the backend for `location`, creating a local directory if `create`.
    pub(crate) fn open(location: Location, create: bool, options: &RepoOptions) -> Result<Self> {
        let runtime = OwnedRuntime::new("snapsync-io", 2)
            .map_err(|e| StoreError::io("start the I/O runtime", e))?;
        let store: Arc<dyn ObjectStore> = match &location {
            Location::S3 { bucket, prefix } => {
                if bucket.is_empty() {
                    return Err(StoreError::invalid_argument(format!(
                        "{location}: no bucket name"
                    )));
                }
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(retry_config(options.retry_timeout))
                    .build()
                    .map_err(|e| backend_err(format!("configure {location}"), e))?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                }
            }
            Location::Custom(custom) => custom.store.clone(),
            Location::Local(dir) => {
                if create {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
                }
                if !dir.is_dir() {
                    return Err(StoreError::not_found(format!(
                        "repository directory {}",
                        dir.display()
                    )));
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| backend_err(format!("open {}", dir.display()), e))?;
                Arc::new(fs)
            }
        };
        Ok(Self {
            store,
            runtime,
            location,
            listings: Default::default(),
        })
    }

    /// Run a request to the store to completion and wait for it.
    ///
    /// A local store makes its file system calls on whatever thread polls the request
    /// when no Tokio runtime is current, and inside one hands each to a thread of the
    /// runtime's blocking pool. Outside any runtime (the command line, the engine's
    /// threads) a local request therefore runs here, on the caller's thread: through the
    /// runtime it woke a worker and a blocking thread and waited for both, a hand-over
    /// per request that cost milliseconds on busy cores (and the first one started those
    /// threads). Remote stores, and callers inside a runtime, go through the runtime.
    fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let inline = matches!(self.location, Location::Local(_))
            && tokio::runtime::Handle::try_current().is_err();
        if inline {
            futures::executor::block_on(future)
        } else {
            self.runtime.block_on(future)
        }
    }

    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.location)
    }

    /// Read a whole object; `None` when it does not exist.
    pub(crate) fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = ObjectPath::from(key);
        let r = self.run(async {
            let got = self.store.get(&path).await?;
            got.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend_err(format!("read {}", self.describe(key)), e)),
        }
    }

    /// Read ranges from several objects concurrently.
    pub(crate) fn get_ranges_many(
        &self,
        requests: Vec<(String, Vec<std::ops::Range<u64>>)>,
    ) -> Result<Vec<Vec<Bytes>>> {
        let store = &self.store;
        self.run(async {
            futures::stream::iter(requests.into_iter().map(|(key, ranges)| async move {
                let path = ObjectPath::from(key.as_str());
                store
                    .get_ranges(&path, &ranges)
                    .await
                    .map_err(|e| backend_err(format!("read {}", self.describe(&key)), e))
            }))
            .buffered(8)
            .try_collect()
            .await
        })
    }

    /// Read byte ranges of objects straight into the caller's buffers: each request is
    /// `(key, offset, destination)` and fills the whole destination.
    ///
    /// Local objects are read with `pread` on the calling threads (in parallel when
    /// there are several), with no intermediate buffer: restore reads every byte of a
    /// snapshot this way, and a buffer per request, allocated on the I/O runtime's
    /// threads and freed on others, cost both a copy and memory the allocator kept.
    /// Remote objects are fetched concurrently and copied in.
    pub(crate) fn read_ranges_into(&self, requests: &mut [(String, u64, &mut [u8])]) -> Result<()> {
        if let Location::Local(root) = &self.location {
            let read = |(key, offset, dst): &mut (String, u64, &mut [u8])| -> Result<()> {
                use std::os::unix::fs::FileExt;
                let path = root.join(key.as_str());
                let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => StoreError::NotFound {
                        what: format!("read {}", self.describe(key)),
                    },
                    _ => StoreError::io(format!("read {}", self.describe(key)), e),
                })?;
                file.read_exact_at(dst, *offset)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => StoreError::corrupt(
                            self.describe(key),
                            format!(
                                "bytes {}..{} are past its end (truncated)",
                                offset,
                                *offset + dst.len() as u64
                            ),
                        ),
                        _ => StoreError::io(format!("read {}", self.describe(key)), e),
                    })
            };
            return match requests {
                [one] => read(one),
                many => {
                    use rayon::prelude::*;
                    many.par_iter_mut().with_max_len(1).try_for_each(read)
                }
            };
        }
        let store = &self.store;
        // The futures are made before the runtime sees them: a closure inside the
        // awaited future would have to be `Send` for every lifetime, which it is not.
        let reads: Vec<_> = requests
            .iter_mut()
            .map(|(key, offset, dst)| async move {
                let path = ObjectPath::from(key.as_str());
                let range = *offset..*offset + dst.len() as u64;
                let got = store
                    .get_range(&path, range)
                    .await
                    .map_err(|e| backend_err(format!("read {}", self.describe(key)), e))?;
                if got.len() != dst.len() {
                    return Err(StoreError::corrupt(
                        self.describe(key),
                        format!(
                            "bytes {}..{} are past its end (truncated)",
                            offset,
                            *offset + dst.len() as u64
                        ),
                    ));
                }
                dst.copy_from_slice(&got);
                Ok(())
            })
            .collect();
        self.runtime.block_on(
            futures::stream::iter(reads)
                .buffer_unordered(8)
                .try_collect::<()>(),
        )
    }

    /// Write an object, durably: on a local disk it is fsynced, and its directory.
    pub(crate) fn put(&self, key: &str, data: Bytes, mode: Put) -> Result<()> {
        self.put_visible(key, data, mode)?;
        self.sync_local(key)
    }

    /// Write an object that only has to be seen by other processes, not to outlive a
    /// crash: a session lock (a crashed writer's lock is stale whether or not it
    /// survived) or the catalog's head pointer (a hint behind a durable catalog that
    /// readers check). On a local disk this saves two fsyncs, each a disk round trip.
    pub(crate) fn put_visible(&self, key: &str, data: Bytes, mode: Put) -> Result<()> {
        let path = ObjectPath::from(key);
        let opts = PutOptions {
            mode: match mode {
                Put::Create => PutMode::Create,
                Put::Overwrite => PutMode::Overwrite,
            },
            ..Default::default()
        };
        self.run(self.store.put_opts(&path, PutPayload::from(data), opts))
            .map_err(|e| match e {
                object_store::Error::AlreadyExists { .. } => backend_err(self.describe(key), e),
                e => backend_err(format!("write {}", self.describe(key)), e),
            })
            .map(drop)
    }

    /// Check that the store keeps the promise every commit relies on: a create-only put
    /// of a key that exists fails. Some S3-compatible servers (Garage, for one) ignore
    /// `If-None-Match: *` and silently overwrite, which would let two replicators commit
    /// the same catalog generation and lose one's snapshots; such a store is refused.
    ///
    /// Returns `Err(Unsupported)` for a store that overwrote; other errors (e.g. no
    /// permission to write) are returned as they are.
    pub(crate) fn check_create_only(&self) -> Result<()> {
        let key = format!("{PROBE_PREFIX}/create-only-{}", snapsync_store::random_id());
        self.put(&key, Bytes::from_static(b"first"), Put::Create)?;
        let second = self.put(&key, Bytes::from_static(b"second"), Put::Create);
        let _ = self.delete(&key);
        if let Location::Local(root) = &self.location {
            // Leave no empty directory behind; fails harmlessly if another probe is there.
            let _ = std::fs::remove_dir(root.join(PROBE_PREFIX));
        }
        match second {
            Err(StoreError::AlreadyExists { .. }) => Ok(()),
            Ok(()) => Err(StoreError::Unsupported {
                what: format!(
                    "{} does not honour create-only writes (If-None-Match: *): a second create of \
                     {key} overwrote the first instead of failing, so concurrent replicators could \
                     silently lose each other's commits; use a server with conditional writes \
                     (Garage, for one, ignores the header)",
                    self.location
                ),
            }),
            // The server refused the conditional write itself (e.g. 501): no commit
            // could succeed either, and the error says why.
            Err(e) => Err(e),
        }
    }

    /// Start writing objects in order (e.g. a pack, then its index) in the background;
    /// the returned handle reports the outcome. This lets packs upload (and fsync)
    /// while the next one is being filled. These objects are content-addressed, so they
    /// are written unconditionally: a retried or concurrent write stores the same bytes.
    ///
    /// Each object is given as its chunks in order, written one after another: a pack is
    /// the buffers its blocks arrived in, never copied into one.
    ///
    /// On a local file system the first object is written before this returns (into the
    /// page cache, which costs about a copy of it) and only its fsync, and the objects
    /// after it, wait in the background: its buffers (a whole pack) are freed at once
    /// instead of waiting behind the fsyncs of earlier packs, so a receive holds one pack
    /// in memory whatever the pace of the disk. Its fsync still comes before the next
    /// object is written, so an index never names a pack that is not durably there.
    pub(crate) fn spawn_puts(&self, objects: Vec<(String, Vec<Bytes>)>) -> PendingPuts {
        let store = self.store.clone();
        let location = self.location.clone();
        let mut objects = objects.into_iter();
        let mut written: Option<Result<String>> = None;
        if let Location::Local(_) = location {
            written = objects.next().map(|(key, chunks)| {
                let path = ObjectPath::from(key.as_str());
                // Outside the runtime, the local store writes on the calling thread, so
                // the buffer is also freed by the thread that allocated it (and refills
                // it): freed on a thread of the runtime's, it lingered in the allocator,
                // and a fast receive held several packs' worth at once.
                futures::executor::block_on(store.put_opts(
                    &path,
                    PutPayload::from_iter(chunks),
                    PutOptions::default(),
                ))
                .map(|_| key.clone())
                .map_err(|e| backend_err(format!("write {location}/{key}"), e))
            });
        }
        let handle = self.runtime.spawn(async move {
            if let Some(key) = written {
                let loc = location.clone();
                blocking(move || sync_local(&loc, &key?)).await?;
            }
            put_synced(store, location, objects.collect()).await
        });
        PendingPuts(handle)
    }

    /// A staging file for a pack written as it fills, in a local repository; `None`
    /// for other stores (see [`crate::staged`]).
    pub(crate) fn stage_pack(&self) -> Result<Option<StagedFile>> {
        match &self.location {
            Location::Local(root) => StagedFile::create(&root.join("packs")).map(Some),
            _ => Ok(None),
        }
    }

    /// Like [`Backend::spawn_puts`] with a staged file as the first object: in the
    /// background, `staged` is made durable under `key`, then `objects` are written in
    /// order, each durably.
    pub(crate) fn spawn_staged_puts(
        &self,
        staged: StagedFile,
        key: &str,
        objects: Vec<(String, Vec<Bytes>)>,
    ) -> PendingPuts {
        let Location::Local(root) = &self.location else {
            unreachable!("only local repositories stage files");
        };
        let dest = root.join(key);
        let store = self.store.clone();
        let location = self.location.clone();
        let handle = self.runtime.spawn(async move {
            blocking(move || staged.publish(&dest)).await?;
            put_synced(store, location, objects).await
        });
        PendingPuts(handle)
    }

    /// Wait for background writes.
    pub(crate) fn wait(&self, pending: PendingPuts) -> Result<()> {
        self.runtime
            .block_on(pending.0)
            .map_err(|e| StoreError::Backend {
                context: "background write".into(),
                source: Box::new(e),
            })?
    }

    /// Make a local write durable: the object store renames a staged file into place but
    /// does not fsync, so a power loss could otherwise lose a committed object.
    fn sync_local(&self, key: &str) -> Result<()> {
        sync_local(&self.location, key)
    }

    /// Keys (relative to the repository) and sizes under `prefix`.
    /// Listing calls made so far.
    pub(crate) fn listings_made(&self) -> u64 {
        self.listings.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = ObjectPath::from(prefix);
        self.run(async {
            self.store
                .list(Some(&path))
                .map_ok(|m| (m.location.to_string(), m.size))
                .try_collect::<Vec<_>>()
                .await
        })
        .map_err(|e| backend_err(format!("list {}", self.describe(prefix)), e))
    }

    /// Delete an object; a missing object is not an error.
    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        let path = ObjectPath::from(key);
        match self.run(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_err(format!("delete {}", self.describe(key)), e)),
        }
    }

    /// Fetch many whole objects concurrently (missing ones are `None`).
    ///
    /// Local objects are read on the calling thread and the compute pool's, not on one
    /// blocking thread each: every thread that allocates keeps memory of its own (at
    /// least a 2 MiB huge page under an allocator that uses them), and loading the
    /// block index reads thousands of small objects.
    pub(crate) fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        if let Location::Local(root) = &self.location {
            use rayon::prelude::*;
            return keys
                .par_iter()
                .map(|key| match std::fs::read(root.join(key.as_str())) {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(StoreError::io(format!("read {}", self.describe(key)), e)),
                })
                .collect();
        }
        let store = &self.store;
        // Made outside the awaited future, as in `read_ranges_into`.
        let gets: Vec<_> = keys
            .iter()
            .map(|key| async move {
                let path = ObjectPath::from(key.as_str());
                let r = async { store.get(&path).await?.bytes().await }.await;
                match r {
                    Ok(b) => Ok(Some(b)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(backend_err(format!("read {}", self.describe(key)), e)),
                }
            })
            .collect();
        self.runtime
            .block_on(futures::stream::iter(gets).buffered(16).try_collect())
    }
}
