//! Deterministic crash points (redb's way), instead of trusting a timed `kill -9`.
//!
//! Each repository operation (a full and an incremental replicate, an insertion with
//! re-base, a prune, a gc) runs against an object store wrapped two ways:
//!
//! - [`FailAfter`]: every operation fails once N mutations (puts and deletes) have been
//!   made, as if the process lost its storage (or died) at that instant, with its error
//!   paths running;
//! - [`Recording`]: the operation completes, and then every prefix of the mutations it
//!   made is replayed onto the state before it, as if the machine lost everything after
//!   the Nth write that was durable.
//!
//! For every N, the repository reopened is the state before the operation or the state
//! after it (snapshot by snapshot, byte for byte against a model), `verify --read-data`
//! finds nothing damaged, and a rerun of the operation completes and reaches the state
//! after.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use snapsync_core::{KeepPolicy, Timestamp};
use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_repo::object_store::memory::InMemory;
use snapsync_repo::object_store::path::Path;
use snapsync_repo::object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use snapsync_repo::{Location, PruneOptions, RepoOptions, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{NoProgress, Store};

const BS: u64 = 4096;

type StoreResult<T> = snapsync_repo::object_store::Result<T>;

fn cut() -> snapsync_repo::object_store::Error {
    snapsync_repo::object_store::Error::Generic {
        store: "crash-point",
        source: "the storage is gone (a crash point)".into(),
    }
}

/// Wraps any object store; fails every operation once `limit` mutations have been made.
#[derive(Debug)]
struct FailAfter<S> {
    inner: Arc<S>,
    mutations: AtomicU64,
    limit: u64,
}

impl<S> FailAfter<S> {
    fn new(inner: Arc<S>, limit: u64) -> Self {
        Self {
            inner,
            mutations: AtomicU64::new(0),
            limit,
        }
    }

    fn tripped(&self) -> bool {
        self.mutations.load(Ordering::SeqCst) >= self.limit
    }

    fn check(&self) -> StoreResult<()> {
        if self.tripped() {
            Err(cut())
        } else {
            Ok(())
        }
    }

    /// Take a ticket for one mutation; the ones past the limit fail.
    fn mutate(&self) -> StoreResult<()> {
        if self.mutations.fetch_add(1, Ordering::SeqCst) >= self.limit {
            Err(cut())
        } else {
            Ok(())
        }
    }
}

impl<S> fmt::Display for FailAfter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailAfter({})", self.limit)
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for FailAfter<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> StoreResult<PutResult> {
        self.mutate()?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> StoreResult<Box<dyn MultipartUpload>> {
        self.mutate()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> StoreResult<GetResult> {
        self.check()?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> StoreResult<Vec<Bytes>> {
        self.check()?;
        self.inner.get_ranges(location, ranges).await
    }

    async fn delete(&self, location: &Path) -> StoreResult<()> {
        self.mutate()?;
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, StoreResult<ObjectMeta>> {
        if self.tripped() {
            return futures::stream::once(async { Err(cut()) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> StoreResult<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> StoreResult<()> {
        self.mutate()?;
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> StoreResult<()> {
        self.mutate()?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// A mutation that took effect, in the order they took effect.
#[derive(Debug, Clone)]
enum Mutation {
    Put(Path, Bytes),
    Delete(Path),
}

/// Passes everything through and records every mutation that succeeded.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ObjectStore>,
    log: Mutex<Vec<Mutation>>,
}

impl fmt::Display for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Recording")
    }
}

#[async_trait]
impl ObjectStore for Recording {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> StoreResult<PutResult> {
        let bytes: Bytes = payload.clone().into();
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.log
            .lock()
            .unwrap()
            .push(Mutation::Put(location.clone(), bytes));
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> StoreResult<Box<dyn MultipartUpload>> {
        // Only S3 locations upload in parts; a custom location never does.
        Err(snapsync_repo::object_store::Error::NotImplemented)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> StoreResult<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> StoreResult<()> {
        self.inner.delete(location).await?;
        self.log
            .lock()
            .unwrap()
            .push(Mutation::Delete(location.clone()));
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, StoreResult<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> StoreResult<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, _from: &Path, _to: &Path) -> StoreResult<()> {
        Err(snapsync_repo::object_store::Error::NotImplemented)
    }

    async fn copy_if_not_exists(&self, _from: &Path, _to: &Path) -> StoreResult<()> {
        Err(snapsync_repo::object_store::Error::NotImplemented)
    }
}

fn t(s: i64) -> Timestamp {
    Timestamp::new(1_700_000_000 + s, 0)
}

thread_local! {
    /// Whether the repositories of this run are encrypted (format version 3).
    static ENCRYPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A repository that does not wait for locks: a crash point leaves the session lock of
/// a process that is (in this test) still alive, which a real crash would not.
fn options() -> RepoOptions {
    let o = RepoOptions::default().with_lock_wait(std::time::Duration::from_secs(0));
    if !ENCRYPTED.with(|e| e.get()) {
        return o;
    }
    let kdf = snapsync_repo::KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    o.with_credentials(snapsync_repo::Credentials::default().with_passphrase("crash"))
        .with_kdf(kdf)
}

fn open(store: Arc<dyn ObjectStore>) -> snapsync_store::Result<Repository> {
    Repository::open_with(Location::custom("mem://crash", store), &options())
}

/// The source: one volume whose snapshots change a few blocks each; the model is the
/// source's own bytes.
fn source() -> MemoryStore {
    let src = MemoryStore::new("src", BS);
    let mut content = pseudo_random(1, 48 * BS as usize);
    for (k, name) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        if k > 0 {
            let at = (k * 7 % 40) * BS as usize;
            content[at..at + 5 * BS as usize]
                .copy_from_slice(&pseudo_random(10 + k as u64, 5 * BS as usize));
        }
        src.add_snapshot("vm", name, t(10 * (k as i64 + 1)), content.clone());
    }
    src
}

fn send(src: &MemoryStore, repo: &Repository, snapshot: &str) -> snapsync_engine::Result<()> {
    let opts = ReplicateOptions::default().with_snapshot(Some(snapshot.to_string()));
    replicate(src, repo, &opts, &NoProgress, &mut |_| {}).map(drop)
}

/// What a repository holds: each snapshot of `vm` and its bytes.
fn state(repo: &Repository) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(volume) = repo.volume("vm") else {
        return out;
    };
    for s in &volume.snapshots {
        let mut r = snapsync_store::SnapshotSource::open_snapshot(repo, "vm", &s.name).unwrap();
        let mut bytes = vec![0u8; s.size as usize];
        r.read_at(0, &mut bytes).unwrap();
        out.insert(s.name.clone(), bytes);
    }
    out
}

/// Remove the locks a crashed process left: a real one's are recognised by their dead
/// pid, but here the "crashed" process is this test, still alive.
fn clear_locks(store: &InMemory) {
    futures::executor::block_on(async {
        let locks: Vec<ObjectMeta> = store
            .list(Some(&Path::from("locks")))
            .map(|m| m.unwrap())
            .collect()
            .await;
        for m in locks {
            store.delete(&m.location).await.unwrap();
        }
    });
}

/// An operation under test, run against a repository.
type Operation = fn(&MemoryStore, &Repository) -> Result<(), String>;

struct Scenario {
    name: &'static str,
    /// Bring an empty repository to the state before the operation.
    setup: Operation,
    operation: Operation,
    /// Whether the operation changes what snapshots hold (gc only changes objects).
    changes_snapshots: bool,
}

fn scenarios() -> Vec<Scenario> {
    fn nothing(_: &MemoryStore, _: &Repository) -> Result<(), String> {
        Ok(())
    }
    fn s1(src: &MemoryStore, r: &Repository) -> Result<(), String> {
        send(src, r, "s1").map_err(|e| e.to_string())
    }
    fn s1_s4(src: &MemoryStore, r: &Repository) -> Result<(), String> {
        s1(src, r)?;
        send(src, r, "s4").map_err(|e| e.to_string())
    }
    fn s2(src: &MemoryStore, r: &Repository) -> Result<(), String> {
        send(src, r, "s2").map_err(|e| e.to_string())
    }
    fn all(src: &MemoryStore, r: &Repository) -> Result<(), String> {
        for s in ["s1", "s2", "s3", "s4"] {
            send(src, r, s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn pruned(src: &MemoryStore, r: &Repository) -> Result<(), String> {
        all(src, r)?;
        prune(src, r)
    }
    fn prune(_: &MemoryStore, r: &Repository) -> Result<(), String> {
        let policy = KeepPolicy {
            last: 1,
            ..KeepPolicy::default()
        };
        r.prune(&PruneOptions::new(policy))
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn gc(_: &MemoryStore, r: &Repository) -> Result<(), String> {
        r.gc().map(drop).map_err(|e| e.to_string())
    }
    vec![
        Scenario {
            name: "full replicate",
            setup: nothing,
            operation: s1,
            changes_snapshots: true,
        },
        Scenario {
            name: "incremental replicate",
            setup: s1,
            operation: |src, r| send(src, r, "s2").map_err(|e| e.to_string()),
            changes_snapshots: true,
        },
        Scenario {
            name: "insertion with re-base",
            setup: s1_s4,
            operation: s2,
            changes_snapshots: true,
        },
        Scenario {
            name: "prune",
            setup: all,
            operation: prune,
            changes_snapshots: true,
        },
        Scenario {
            name: "gc",
            setup: pruned,
            operation: gc,
            changes_snapshots: false,
        },
    ]
}

/// The checks after a cut: old or new state, nothing damaged, a rerun reaches the new.
fn check_cut(
    scenario: &Scenario,
    what: &str,
    src: &MemoryStore,
    store: InMemory,
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
) {
    let name = scenario.name;
    clear_locks(&store);
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let repo = open(store.clone()).unwrap_or_else(|e| panic!("{name}, {what}: reopen: {e}"));
    let now = state(&repo);
    assert!(
        now == *before || now == *after,
        "{name}, {what}: neither the old nor the new state: {:?}",
        now.keys().collect::<Vec<_>>()
    );
    let report = repo
        .verify(true, &NoProgress)
        .unwrap_or_else(|e| panic!("{name}, {what}: verify: {e}"));
    assert!(
        report.ok,
        "{name}, {what}: verify --read-data: {:?} {:?}",
        report.damaged, report.repository_errors
    );
    // A rerun completes whatever the cut left (and has nothing to do when it was
    // after the commit).
    (scenario.operation)(src, &repo)
        .unwrap_or_else(|e| panic!("{name}, {what}: the rerun failed: {e}"));
    assert!(state(&repo) == *after, "{name}, {what}: the rerun's state");
}

/// The state before the scenario's operation, and its store.
fn prepared(scenario: &Scenario, src: &MemoryStore) -> (InMemory, BTreeMap<String, Vec<u8>>) {
    let store = Arc::new(InMemory::new());
    let repo = (if ENCRYPTED.with(|e| e.get()) {
        Repository::init_encrypted
    } else {
        Repository::init_with
    })(
        Location::custom("mem://crash", store.clone()),
        BS,
        &options(),
    )
    .unwrap();
    (scenario.setup)(src, &repo).unwrap();
    let before = state(&repo);
    (store.fork(), before)
}

#[test]
fn every_crash_point_leaves_the_old_or_the_new_state() {
    every_crash_point(false);
}

#[test]
fn every_crash_point_leaves_an_encrypted_repository_old_or_new() {
    every_crash_point(true);
}

fn every_crash_point(encrypted: bool) {
    ENCRYPTED.with(|e| e.set(encrypted));
    let src = source();
    for scenario in scenarios() {
        let (base, before) = prepared(&scenario, &src);
        // The run without faults: the state after, and the mutations it makes.
        let recording = Arc::new(Recording {
            inner: Arc::new(base.fork()),
            log: Mutex::new(Vec::new()),
        });
        let repo = open(recording.clone()).unwrap();
        (scenario.operation)(&src, &repo).unwrap();
        let after = state(&repo);
        drop(repo);
        assert!(
            (before != after) == scenario.changes_snapshots,
            "{}: the snapshots before {:?} and after {:?}",
            scenario.name,
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        let log = recording.log.lock().unwrap().clone();
        assert!(!log.is_empty(), "{}: no mutations", scenario.name);
        eprintln!(
            "{}: {} crash points, each cut two ways",
            scenario.name,
            log.len() + 1
        );

        // Power loss: only the first n mutations reached the storage.
        for n in 0..=log.len() {
            let store = base.fork();
            futures::executor::block_on(async {
                for m in &log[..n] {
                    match m {
                        Mutation::Put(p, b) => {
                            store.put(p, PutPayload::from(b.clone())).await.unwrap();
                        }
                        Mutation::Delete(p) => store.delete(p).await.unwrap(),
                    }
                }
            });
            let what = format!("lost after mutation {n} of {}", log.len());
            check_cut(&scenario, &what, &src, store, &before, &after);
        }

        // The storage fails from the nth mutation on, while the operation runs.
        for n in 0..=log.len() as u64 {
            let inner = Arc::new(base.fork());
            let failing = Arc::new(FailAfter::new(inner.clone(), n));
            let result = open(failing).and_then(|repo| {
                (scenario.operation)(&src, &repo)
                    .map_err(snapsync_store::StoreError::invalid_argument)
            });
            let what = format!("failing from mutation {n} of {} ({result:?})", log.len());
            check_cut(&scenario, &what, &src, inner.fork(), &before, &after);
        }
    }
}
