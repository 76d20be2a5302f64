//! Runs against real stores: an in-memory source (the reference store), repositories
//! on disk as destinations, one destination that cannot be opened, and one served by a
//! real `snapsync serve` server on 127.0.0.1 that is not a repository.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapsync_core::{KeepPolicy, Timestamp};
use snapsync_repo::{Location, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::{NoProgress, SnapshotSource, Store, StoreError};

use super::*;
use crate::config::{DestinationKind, Retention, SourceKind, UrlCheck};
use crate::limit::{Bandwidth, Cancel, CancelReason, Limits};
use crate::schedule::Schedule;
use crate::stores::{BoxError, JobDestination, JobSource, Stores};
use crate::units::Rate;

const BS: u64 = 4096;

/// A source that takes its own snapshots, as a running VM does: each run adds one,
/// and finishing keeps the newest N.
struct CheckpointSource {
    store: MemoryStore,
    seed: u8,
}

impl JobSource for CheckpointSource {
    fn source(&self) -> &dyn SnapshotSource {
        &self.store
    }
    fn take_snapshot(
        &mut self,
        _: &[String],
        name: &str,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        if self.store.content("disk", name).is_some() {
            return Err(StoreError::AlreadyExists { what: name.into() });
        }
        let mut content = vec![1u8; 64 * 1024];
        content[..4096].fill(self.seed);
        self.store.add_snapshot("disk", name, at, content);
        Ok(true)
    }
    fn finish(&mut self, keep: usize) -> Result<(), StoreError> {
        let snaps = self.store.volume("disk")?.snapshots;
        for s in snaps.iter().take(snaps.len().saturating_sub(keep)) {
            self.store.remove_snapshot("disk", &s.name);
        }
        Ok(())
    }
}

struct Listed(MemoryStore);

impl JobSource for Listed {
    fn source(&self) -> &dyn SnapshotSource {
        &self.0
    }
}

struct TestStores {
    source: MemoryStore,
    checkpoints: bool,
    seed: Mutex<u8>,
    repos: BTreeMap<String, PathBuf>,
    down: Mutex<BTreeSet<String>>,
    /// Destinations served over the protocol: their `snapsync+http://` URLs.
    served: BTreeMap<String, String>,
}

const SERVE_TOKEN: &str = "runner-test-token-0123456789";

/// Serve `store` as `mem` on 127.0.0.1; its URL.
fn serve_memory(store: MemoryStore) -> String {
    use snapsync_remote::{ServedStore, Server, ServerConfig, Tokens};
    let server = Server::bind(
        ServerConfig::plaintext(
            vec![("mem".into(), Arc::new(store) as Arc<dyn ServedStore>)],
            Tokens::parse(SERVE_TOKEN).unwrap(),
        ),
        "127.0.0.1:0",
    )
    .unwrap();
    let port = server.spawn().unwrap().port();
    format!("snapsync+http://127.0.0.1:{port}/mem")
}

/// A `snapsync://` destination, as the binary opens one: a sink, and a view the server
/// answers for.
struct Remote(snapsync_remote::RemoteStore);

impl JobDestination for Remote {
    fn sink(&self) -> &dyn snapsync_store::SnapshotSink {
        &self.0
    }
    fn view(&self) -> Option<&dyn repository::RepositoryView> {
        Some(&self.0)
    }
}

impl UrlCheck for TestStores {
    fn source(&self, _: &str) -> Result<SourceKind, String> {
        Ok(if self.checkpoints {
            SourceKind::Checkpoints
        } else {
            SourceKind::Listed
        })
    }
    fn destination(&self, _: &str) -> Result<DestinationKind, String> {
        Ok(DestinationKind::Repository)
    }
}

impl Stores for TestStores {
    fn open_source(&self, _: &str) -> Result<Box<dyn JobSource>, BoxError> {
        if self.checkpoints {
            let mut seed = self.seed.lock().unwrap();
            *seed += 1;
            Ok(Box::new(CheckpointSource {
                store: self.source.clone(),
                seed: *seed,
            }))
        } else {
            Ok(Box::new(Listed(self.source.clone())))
        }
    }
    fn open_destination(&self, url: &str) -> Result<Box<dyn JobDestination>, BoxError> {
        if self.down.lock().unwrap().contains(url) {
            return Err(format!("{url}: connection refused").into());
        }
        if let Some(u) = self.served.get(url) {
            let options = snapsync_remote::ClientOptions::new(SERVE_TOKEN);
            return Ok(Box::new(Remote(snapsync_remote::RemoteStore::open(
                u, options,
            )?)));
        }
        Ok(Box::new(Repository::open(Location::Local(
            self.repos[url].clone(),
        ))?))
    }
}

fn stores(dir: &std::path::Path, checkpoints: bool) -> TestStores {
    let mut repos = BTreeMap::new();
    for name in ["one", "two"] {
        let p = dir.join(name);
        Repository::init(Location::Local(p.clone()), BS).unwrap();
        repos.insert(name.to_string(), p);
    }
    TestStores {
        source: MemoryStore::new("src", BS),
        checkpoints,
        seed: Mutex::new(0),
        repos,
        down: Mutex::new(BTreeSet::new()),
        served: BTreeMap::new(),
    }
}

fn job(checkpoints: bool, retention: Option<Retention>) -> Arc<JobConfig> {
    Arc::new(JobConfig {
        name: "j".into(),
        source: "mem:src".into(),
        volumes: vec![],
        schedule: "every 1s".parse::<Schedule>().unwrap(),
        destinations: vec!["one".into(), "two".into()],
        bwlimit: None,
        timeout: None,
        retention,
        source_kind: if checkpoints {
            SourceKind::Checkpoints
        } else {
            SourceKind::Listed
        },
    })
}

fn request(
    job: &Arc<JobConfig>,
    id: u64,
    known: &BTreeMap<String, Bases>,
    now: Millis,
) -> RunRequest {
    RunRequest {
        job: job.clone(),
        id,
        trigger: Trigger::Scheduled,
        destinations: job.destinations.clone(),
        known: known.clone(),
        downstream: BTreeMap::new(),
        limits: Limits::default(),
        cancel: Cancel::new(),
        counters: Arc::default(),
        now,
        sample: job.destinations.clone(),
        known_chains: BTreeMap::new(),
    }
}

fn names(repo: &std::path::Path, volume: &str) -> Vec<String> {
    let r = Repository::open(Location::Local(repo.to_path_buf())).unwrap();
    r.volume(volume)
        .map(|v| v.snapshots.into_iter().map(|s| s.name).collect())
        .unwrap_or_default()
}

#[test]
fn a_destination_that_is_down_fails_alone_and_its_lag_grows() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), false);
    let t0 = 1_700_000_000;
    s.source
        .add_snapshot("vm", "mon", Timestamp::new(t0, 0), vec![7; 32768]);
    s.source
        .add_snapshot("vm", "tue", Timestamp::new(t0 + 86400, 0), vec![8; 32768]);
    s.down.lock().unwrap().insert("two".into());
    let j = job(false, None);
    let out = run(&s, request(&j, 1, &BTreeMap::new(), now_millis()));
    let by_url: BTreeMap<&str, &DestinationRun> = out
        .record
        .destinations
        .iter()
        .map(|d| (d.url.as_str(), d))
        .collect();
    assert_eq!(by_url["one"].result, RunResult::Success);
    assert_eq!(by_url["one"].snapshots, 2);
    assert_eq!(by_url["one"].lag_seconds, Some(0.0));
    assert_eq!(by_url["two"].result, RunResult::Failure);
    assert!(by_url["two"]
        .error
        .as_deref()
        .unwrap()
        .contains("connection refused"));
    // Nothing at "two": its lag is the age of the oldest snapshot.
    let lag = by_url["two"].lag_seconds.unwrap();
    assert!(lag > (now_millis() / 1000 - t0 - 5) as f64, "{lag}");
    assert_eq!(names(&s.repos["one"], "vm"), ["mon", "tue"]);
    assert_eq!(out.bases["one"]["vm"].snapshot, "tue");
    assert!(!out.bases.contains_key("two"));
}

#[test]
fn a_timeout_cancels_cleanly_and_commits_nothing_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), false);
    let data = snapsync_store::sample::pseudo_random(1, 4 << 20);
    s.source
        .add_snapshot("vm", "big", Timestamp::new(1_700_000_000, 0), data);
    let j = job(false, None);
    let mut req = request(&j, 1, &BTreeMap::new(), now_millis());
    req.destinations = vec!["one".into()];
    // 256 KiB/s: 4 MiB would take 16 s.
    req.limits = Limits::new([Arc::new(Bandwidth::new(Rate::new(256 << 10).unwrap()))]);
    let cancel = req.cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cancel.cancel(CancelReason::Timeout(Duration::from_millis(500)));
    });
    let t = std::time::Instant::now();
    let out = run(&s, req);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let d = &out.record.destinations[0];
    assert_eq!(d.result, RunResult::Timeout, "{d:?}");
    assert!(
        d.error.as_deref().unwrap().contains("timeout of 500ms"),
        "{d:?}"
    );
    assert!(names(&s.repos["one"], "vm").is_empty());
    let r = Repository::open(Location::Local(s.repos["one"].clone())).unwrap();
    assert!(r.verify(true, &NoProgress).unwrap().ok);
}

#[test]
fn a_checkpoint_source_keeps_the_base_of_a_destination_that_is_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), true);
    let j = job(true, None);
    let mut known: BTreeMap<String, Bases> = BTreeMap::new();
    let mut now = 1_700_000_000_000;
    // Run 1: both destinations get the first checkpoint.
    let out = run(&s, request(&j, 1, &known, now));
    assert!(out.record.succeeded(), "{:?}", out.record);
    let first = out.record.snapshot.clone().unwrap();
    known = out.bases;
    // "two" goes down for more runs than the source keeps by default.
    s.down.lock().unwrap().insert("two".into());
    for id in 2..(DEFAULT_KEEP_SNAPSHOTS as u64 + 6) {
        now += 60_000;
        let out = run(&s, request(&j, id, &known, now));
        known = out.bases;
        assert_eq!(known["two"]["disk"].snapshot, first);
    }
    let listed = s.source.volume("disk").unwrap().snapshots;
    assert!(
        listed.iter().any(|c| c.name == first),
        "the base of \"two\" was removed"
    );
    // Back up: "two" gets an incremental against its base, not everything.
    s.down.lock().unwrap().clear();
    now += 60_000;
    let out = run(&s, request(&j, 99, &known, now));
    assert!(out.record.succeeded(), "{:?}", out.record);
    let two = out
        .record
        .destinations
        .iter()
        .find(|d| d.url == "two")
        .unwrap();
    assert!(two.changed_bytes <= 4096, "{two:?}");
    // Caught up, the source goes back to its default.
    let out = run(&s, request(&j, 100, &out.bases, now + 60_000));
    assert!(out.record.succeeded());
    assert_eq!(
        s.source.volume("disk").unwrap().snapshots.len(),
        DEFAULT_KEEP_SNAPSHOTS
    );
}

#[test]
fn a_second_run_in_the_same_second_takes_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), true);
    let j = job(true, None);
    let now = 1_700_000_000_000;
    let first = run(&s, request(&j, 1, &BTreeMap::new(), now));
    let second = run(&s, request(&j, 2, &first.bases, now + 300));
    assert!(second.record.succeeded(), "{:?}", second.record);
    let (a, b) = (
        first.record.snapshot.unwrap(),
        second.record.snapshot.unwrap(),
    );
    assert_eq!(b, format!("{a}-1"));
}

#[test]
fn retention_prunes_each_destination_but_not_a_cascades_base() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), false);
    for i in 0..5 {
        s.source.add_snapshot(
            "vm",
            &format!("s{i}"),
            Timestamp::new(1_700_000_000 + i * 3600, 0),
            vec![i as u8; 8192],
        );
    }
    let policy = KeepPolicy {
        last: 2,
        ..KeepPolicy::default()
    };
    let j = job(false, Some(Retention { policy, gc: true }));
    let mut req = request(&j, 1, &BTreeMap::new(), now_millis());
    // A job replicating from "two" onwards holds s1 as its base.
    req.downstream.insert(
        "two".into(),
        BTreeMap::from([("vm".into(), BTreeSet::from(["s1".into()]))]),
    );
    let out = run(&s, req);
    assert!(out.record.succeeded(), "{:?}", out.record);
    assert_eq!(names(&s.repos["one"], "vm"), ["s3", "s4"]);
    assert_eq!(names(&s.repos["two"], "vm"), ["s0", "s1", "s2", "s3", "s4"]);
    let two = out
        .record
        .destinations
        .iter()
        .find(|d| d.url == "two")
        .unwrap();
    assert!(two.retention_held[0].contains("\"vm@s1\""), "{two:?}");
    let one = out
        .record
        .destinations
        .iter()
        .find(|d| d.url == "one")
        .unwrap();
    assert_eq!(one.pruned, ["vm@s0", "vm@s1", "vm@s2"]);
}

#[test]
fn lag_is_measured_between_snapshot_ages() {
    let l = vec![snapsync_core::VolumeInfo {
        name: "v".into(),
        size: 1,
        origin: None,
        snapshots: [10, 20, 50]
            .iter()
            .map(|t| snapsync_core::SnapshotInfo {
                name: format!("s{t}"),
                id: snapsync_core::SnapshotId::derive("x", "v", "s", Timestamp::new(*t, 0)),
                created: Timestamp::new(*t, 0),
                size: 1,
            })
            .collect(),
    }];
    let base = |t: i64| {
        Bases::from([(
            "v".into(),
            Base {
                snapshot: "x".into(),
                created: t * 1000,
            },
        )])
    };
    assert_eq!(lag_seconds(&l, &base(50), 100_000), 0.0);
    assert_eq!(lag_seconds(&l, &base(20), 100_000), 30.0);
    assert_eq!(lag_seconds(&l, &Bases::new(), 100_000), 90.0);
    assert_eq!(snapshot_name(1_699_920_001_500), "20231114T000001Z");
}

#[test]
fn a_run_reads_its_repositories_chains_and_size_and_a_clones_origin() {
    let dir = tempfile::tempdir().unwrap();
    let s = stores(dir.path(), false);
    let t0 = 1_700_000_000;
    s.source
        .add_snapshot("vm", "mon", Timestamp::new(t0, 0), vec![7; 32768]);
    let mut tue = vec![7; 32768];
    tue[..BS as usize].fill(9);
    s.source
        .add_snapshot("vm", "tue", Timestamp::new(t0 + 86400, 0), tue);
    let mon = s.source.list().unwrap()[0].snapshots[0].clone();
    s.source.add_snapshot(
        "copy",
        "wed",
        Timestamp::new(t0 + 2 * 86400, 0),
        vec![7; 32768],
    );
    s.source.set_origin(
        "copy",
        snapsync_core::Origin {
            volume: "vm".into(),
            snapshot: "mon".into(),
            id: mon.id,
        },
    );
    s.down.lock().unwrap().insert("two".into());
    let j = job(false, None);
    let mut req = request(&j, 1, &BTreeMap::new(), now_millis());
    req.sample = vec![];
    let out = run(&s, req);
    assert!(
        !out.views.contains_key("two"),
        "a destination down is not read"
    );
    let view = &out.views["one"];
    // Sampled although not asked to: the run changed the repository.
    let sample = view.sample.as_ref().unwrap();
    assert_eq!((sample.volumes, sample.snapshots), (2, 3));
    assert_eq!(sample.logical_bytes, 3 * 32768);
    let repo = Repository::open(Location::Local(s.repos["one"].clone())).unwrap();
    assert_eq!(sample.stored_bytes, repo.stored_bytes().unwrap());
    assert!(
        sample.stored_bytes < sample.logical_bytes,
        "dedup and compression"
    );

    let chains = view.chains.as_ref().unwrap();
    let by: BTreeMap<&str, &Chain> = chains.iter().map(|c| (c.volume.as_str(), c)).collect();
    let vm = &by["vm"].snapshots;
    assert_eq!(
        (vm[0].name.as_str(), vm[0].full, vm[0].depth),
        ("mon", true, 0)
    );
    assert_eq!(
        (vm[1].name.as_str(), vm[1].full, vm[1].depth),
        ("tue", false, 1)
    );
    let base = vm[1].base.as_ref().unwrap();
    assert_eq!(
        (base.volume.as_str(), base.snapshot.as_str()),
        ("vm", "mon")
    );
    let copy = by["copy"];
    let origin = copy.origin.as_ref().unwrap();
    assert_eq!(
        (origin.volume.as_str(), origin.snapshot.as_str()),
        ("vm", "mon")
    );
    // A clone's delta is named by its origin's volume.
    let wed = &copy.snapshots[0];
    if let Some(b) = &wed.base {
        assert_eq!((b.volume.as_str(), b.snapshot.as_str()), ("vm", "mon"));
    } else {
        assert!(wed.full);
    }

    // The next run reads no manifest it read before: what it was told stands.
    let mut req = request(&j, 2, &out.bases, now_millis());
    req.sample = vec![];
    let mut known = repository::known(chains);
    for v in known.values_mut() {
        v.depth += 100; // as if read before with another depth: not read again
    }
    req.known_chains.insert("one".into(), known);
    let again = run(&s, req);
    let view = &again.views["one"];
    assert!(
        view.sample.is_none(),
        "nothing changed, not asked to: no sample"
    );
    let depths: Vec<u32> = view
        .chains
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|c| c.snapshots.iter().map(|l| l.depth))
        .collect();
    assert!(depths.iter().all(|&d| d >= 100), "{depths:?}");
}

/// A served destination that is not a repository is replicated to, and the server's
/// refusal to show a size or chains is what the run says of its view (for the page),
/// not counted as a failure of the run.
#[test]
fn a_served_store_that_is_not_a_repository_has_its_refusal_as_the_views_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = stores(dir.path(), false);
    let served = MemoryStore::new("served", BS);
    s.served.insert("mem".into(), serve_memory(served.clone()));
    s.source.add_snapshot(
        "vm",
        "mon",
        Timestamp::new(1_700_000_000, 0),
        vec![7; 32768],
    );
    let mut j = (*job(false, None)).clone();
    j.destinations = vec!["one".into(), "mem".into()];
    let j = Arc::new(j);
    let out = run(&s, request(&j, 1, &BTreeMap::new(), now_millis()));
    assert!(out.record.succeeded(), "{:?}", out.record);
    assert_eq!(*served.content("vm", "mon").unwrap(), vec![7; 32768]);
    let view = &out.views["mem"];
    assert!(view.chains.is_none() && view.sample.is_none(), "{view:?}");
    assert_eq!(
        view.problem.as_deref(),
        Some("unsupported: store \"mem\" is not a repository: it has no size or chains to show")
    );
    let local = &out.views["one"];
    assert!(
        local.problem.is_none() && local.chains.is_some(),
        "{local:?}"
    );
}
