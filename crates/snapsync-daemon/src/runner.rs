//! One run of a job: open the source (take a snapshot if it is a running VM),
//! replicate to each selected destination in parallel, each against its own base,
//! apply retention, and measure every destination's lag.
//!
//! A run is synchronous and blocking, on a thread of its own; it never panics on a
//! store's failure and never fails as a whole: what went wrong is in the
//! [`RunRecord`] of each destination. Its bases and lags go back to the daemon, which
//! owns all state.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use snapsync_core::{common_snapshots, Timestamp, VolumeInfo};
use snapsync_engine::ReplicateOptions;
use snapsync_store::{SnapshotSink, Store, StoreError};
use tracing::{debug, warn};

use crate::config::{JobConfig, SourceKind};
pub use crate::guard::Counters;
use crate::guard::{CountingProgress, GuardedSink, GuardedSource};
use crate::limit::{Cancel, CancelReason, Limits};
use crate::record::{Base, Bases, DestinationRun, RunRecord, RunResult};
use crate::repository::{self, Chain, Known, Sample};

use crate::retention::{self, Protected};
use crate::schedule::Millis;
use crate::scheduler::Trigger;
use crate::stores::{one_line, JobSource, Stores};

/// Checkpoints a VM source keeps per disk when no destination needs more.
pub const DEFAULT_KEEP_SNAPSHOTS: usize = 8;

/// Everything one run needs; built by the daemon from its config and state.
#[derive(Debug)]
#[non_exhaustive]
pub struct RunRequest {
    /// The job.
    pub job: Arc<JobConfig>,
    /// The run's number.
    pub id: u64,
    /// Why it runs.
    pub trigger: Trigger,
    /// The destinations to replicate to this time.
    pub destinations: Vec<String>,
    /// What every destination of the job is known to hold (from earlier runs).
    pub known: BTreeMap<String, Bases>,
    /// Per destination, what jobs replicating from it need it to keep.
    pub downstream: BTreeMap<String, Protected>,
    /// Bandwidth buckets.
    pub limits: Limits,
    /// Cancellation (timeout, shutdown).
    pub cancel: Cancel,
    /// Bytes moved so far.
    pub counters: Arc<Counters>,
    /// When it starts.
    pub now: Millis,
    /// The repository destinations to take a size sample of after replicating even when
    /// the run changes nothing there (one that it changes is sampled anyway).
    pub sample: Vec<String>,
    /// Per destination, what earlier runs read of its manifests (for its chains).
    pub known_chains: BTreeMap<String, Known>,
}

/// What a run did.
#[derive(Debug)]
#[non_exhaustive]
pub struct RunOutcome {
    /// The record kept and shown.
    pub record: RunRecord,
    /// What every destination of the job holds now (known bases where it was not
    /// reached).
    pub bases: BTreeMap<String, Bases>,
    /// Every destination's lag in seconds, `None` where unknown.
    pub lags: BTreeMap<String, Option<f64>>,
    /// What was read of the repository destinations for the status page.
    pub views: BTreeMap<String, RepositoryView>,
}

/// What a run read of one repository destination after replicating to it.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RepositoryView {
    /// Its size, when asked for ([`RunRequest::sample`]).
    pub sample: Option<Sample>,
    /// The chains of the job's volumes.
    pub chains: Option<Vec<Chain>>,
    /// Why the size or the chains could not be read, one line (the page shows it beside
    /// the last view read; a served store that is not a repository, or an older server,
    /// says so here).
    pub problem: Option<String>,
}

/// Wall-clock milliseconds.
pub fn now_millis() -> Millis {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

fn millis_of(t: Timestamp) -> Millis {
    Millis::try_from(t.as_nanos() / 1_000_000).unwrap_or(Millis::MAX)
}

/// Run `req` to the end.
pub fn run(stores: &dyn Stores, req: RunRequest) -> RunOutcome {
    let started = Instant::now();
    let mut record = RunRecord {
        job: req.job.name.clone(),
        id: req.id,
        trigger: req.trigger,
        started: req.now,
        duration_ms: 0,
        snapshot: None,
        source_error: None,
        destinations: Vec::new(),
    };
    let mut bases = req.known.clone();
    let mut views = BTreeMap::new();
    let listing = match open_source(stores, &req) {
        Err(e) => {
            record.destinations = all_failed(&req, &format!("source {}: {e}", req.job.source));
            Vec::new()
        }
        Ok(mut source) => {
            let listing =
                replicate_from(stores, &req, &source, &mut record, &mut bases, &mut views);
            record.snapshot = source.snapshot.clone();
            record.source_error = finish_source(&mut source.source, &req, &listing, &bases);
            listing
        }
    };
    let lags = lags(&req, &listing, &bases);
    for d in &mut record.destinations {
        d.lag_seconds = lags.get(&d.url).copied().flatten();
    }
    record.duration_ms = started.elapsed().as_millis() as u64;
    RunOutcome {
        record,
        bases,
        lags,
        views,
    }
}

/// List the source and replicate to every selected destination; what they hold now
/// goes into `bases`. Returns the source's listing (of the job's volumes).
fn replicate_from(
    stores: &dyn Stores,
    req: &RunRequest,
    source: &Opened,
    record: &mut RunRecord,
    bases: &mut BTreeMap<String, Bases>,
    views: &mut BTreeMap<String, RepositoryView>,
) -> Vec<VolumeInfo> {
    let guarded = GuardedSource {
        inner: source.source.source(),
        cancel: &req.cancel,
    };
    let listing = match guarded.list() {
        Ok(l) => selected(l, &req.job.volumes),
        Err(e) => {
            let line = format!("source {}: {}", req.job.source, one_line(&e));
            record.destinations = all_failed(req, &line);
            return Vec::new();
        }
    };
    let results = to_destinations(stores, req, &guarded, source.snapshot.as_deref(), &listing);
    for (url, (run, fresh, view)) in results {
        if let Some(b) = fresh {
            bases.insert(url.clone(), b);
        }
        if let Some(v) = view {
            views.insert(url, v);
        }
        record.destinations.push(run);
    }
    listing
}

/// Every destination of the job's lag, from what it holds (`None` when the source
/// could not be listed).
fn lags(
    req: &RunRequest,
    listing: &[VolumeInfo],
    bases: &BTreeMap<String, Bases>,
) -> BTreeMap<String, Option<f64>> {
    let now = now_millis();
    req.job
        .destinations
        .iter()
        .map(|d| {
            let b = bases.get(d).cloned().unwrap_or_default();
            let lag = (!listing.is_empty()).then(|| lag_seconds(listing, &b, now));
            (d.clone(), lag)
        })
        .collect()
}

/// Every selected destination failed with `line`.
fn all_failed(req: &RunRequest, line: &str) -> Vec<DestinationRun> {
    req.destinations
        .iter()
        .map(|d| failed(d, &req.cancel, line.to_string()))
        .collect()
}

/// An opened source and the snapshot this run took of it, if it takes them.
struct Opened {
    source: Box<dyn JobSource>,
    snapshot: Option<String>,
}

fn open_source(stores: &dyn Stores, req: &RunRequest) -> Result<Opened, String> {
    req.cancel.check().map_err(|e| one_line(&e))?;
    let mut source = stores
        .open_source(&req.job.source)
        .map_err(|e| one_line(e.as_ref()))?;
    if let Some(interrupt) = source.interrupter() {
        req.cancel.on_cancel(interrupt);
    }
    let mut snapshot = None;
    if req.job.source_kind == SourceKind::Checkpoints {
        let at = Timestamp::new(
            req.now.div_euclid(1000),
            (req.now.rem_euclid(1000) * 1_000_000) as u32,
        );
        // Named after the second; a retry in the same second as the run before it
        // takes the name with a suffix.
        let base = snapshot_name(req.now);
        for attempt in 0..3 {
            let name = match attempt {
                0 => base.clone(),
                n => format!("{base}-{n}"),
            };
            match source.take_snapshot(&req.job.volumes, &name, at) {
                Ok(taken) => {
                    snapshot = taken.then_some(name);
                    break;
                }
                Err(StoreError::AlreadyExists { .. }) if attempt < 2 => continue,
                Err(e) => return Err(format!("taking snapshot {name:?}: {}", one_line(&e))),
            }
        }
    }
    Ok(Opened { source, snapshot })
}

/// The name of a snapshot a run takes at `t`: the UTC time, `YYYYMMDDTHHMMSSZ`, as
/// `snapsync replicate` names a running VM's checkpoints.
pub fn snapshot_name(t: Millis) -> String {
    let t = crate::record::rfc3339::format(t.div_euclid(1000) * 1000);
    let seconds = t.split('.').next().unwrap_or(&t).trim_end_matches('Z');
    seconds.replace(['-', ':'], "") + "Z"
}

fn selected(listing: Vec<VolumeInfo>, volumes: &[String]) -> Vec<VolumeInfo> {
    listing
        .into_iter()
        .filter(|v| volumes.is_empty() || volumes.contains(&v.name))
        .collect()
}

type DestResult = (DestinationRun, Option<Bases>, Option<RepositoryView>);

/// Replicate to every selected destination at once, each on a thread of its own.
fn to_destinations(
    stores: &dyn Stores,
    req: &RunRequest,
    source: &GuardedSource<'_>,
    snapshot: Option<&str>,
    listing: &[VolumeInfo],
) -> Vec<(String, DestResult)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = req
            .destinations
            .iter()
            .map(|url| {
                let h = std::thread::Builder::new()
                    .name(format!("dest-{}", req.job.name))
                    .spawn_scoped(scope, move || {
                        to_destination(stores, req, source, snapshot, listing, url)
                    });
                (url.clone(), h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(url, h)| {
                let result = match h.map_err(|e| e.to_string()).and_then(|h| {
                    h.join()
                        .map_err(|_| "internal error: the replication thread panicked".to_string())
                }) {
                    Ok(r) => r,
                    Err(e) => (failed(&url, &req.cancel, e), None, None),
                };
                (url, result)
            })
            .collect()
    })
}

/// Replicate to one destination, then prune it.
fn to_destination(
    stores: &dyn Stores,
    req: &RunRequest,
    source: &GuardedSource<'_>,
    snapshot: Option<&str>,
    listing: &[VolumeInfo],
    url: &str,
) -> DestResult {
    let t = Instant::now();
    let dest = match stores.open_destination(url) {
        Ok(d) => d,
        Err(e) => return (failed(url, &req.cancel, one_line(e.as_ref())), None, None),
    };
    let sink = GuardedSink {
        inner: dest.sink(),
        cancel: &req.cancel,
        limits: &req.limits,
        counters: &req.counters,
    };
    let mut run = DestinationRun::new(url);
    let replicated = replicate(req, source, &sink, snapshot, &mut run);
    let mut outcome = replicated;
    if outcome.is_ok() {
        outcome = apply_retention(req, dest.repository(), listing, url, &mut run);
    }
    // What the destination holds now, whatever happened (unless cancelled: then
    // nothing more is asked of it).
    let fresh = match req.cancel.check() {
        Ok(()) => source
            .system_id()
            .and_then(|system| bases_at(&sink, &system, listing))
            .map_err(|e| warn!(job = %req.job.name, destination = url, "cannot read what the destination holds: {}", one_line(&e)))
            .ok(),
        Err(_) => None,
    };
    if let Err(e) = outcome {
        run.result = result_of_failure(&req.cancel);
        run.error = Some(e);
    }
    run.duration_ms = t.elapsed().as_millis() as u64;
    let view = match (req.cancel.check(), dest.view()) {
        (Ok(()), Some(repo)) => {
            let changed = run.snapshots > 0 || !run.pruned.is_empty();
            Some(read_view(req, repo, listing, url, changed))
        }
        _ => None,
    };
    (run, fresh, view)
}

/// Read what the status page shows of repository destination `url`, local or served
/// (not counted in the run's duration; a failure to read is logged, said in
/// [`RepositoryView::problem`] and leaves the last view shown).
fn read_view(
    req: &RunRequest,
    repo: &dyn repository::RepositoryView,
    listing: &[VolumeInfo],
    url: &str,
    changed: bool,
) -> RepositoryView {
    let mut problem = None;
    let mut failed = |what: &str, e: StoreError| {
        let line = one_line(&e);
        warn!(job = %req.job.name, destination = url, "cannot read the repository's {what} for status: {line}");
        problem.get_or_insert(line);
    };
    let sample = (changed || req.sample.iter().any(|u| u == url))
        .then(|| repository::sample(repo, now_millis()))
        .and_then(|r| r.map_err(|e| failed("size", e)).ok());
    let volumes: Vec<String> = listing.iter().map(|v| v.name.clone()).collect();
    let empty = Known::new();
    let known = req.known_chains.get(url).unwrap_or(&empty);
    let chains = repo
        .chains(&volumes, known)
        .map_err(|e| failed("chains", e))
        .ok();
    RepositoryView {
        sample,
        chains,
        problem,
    }
}

/// Replicate what the run sends to `sink`, adding what was sent to `run`.
fn replicate(
    req: &RunRequest,
    source: &GuardedSource<'_>,
    sink: &GuardedSink<'_>,
    snapshot: Option<&str>,
    run: &mut DestinationRun,
) -> Result<(), String> {
    let options = ReplicateOptions::default()
        .with_volumes(req.job.volumes.clone())
        .with_snapshot(snapshot.map(str::to_string));
    let url = run.url.clone();
    snapsync_engine::replicate(
        source,
        sink,
        &options,
        &CountingProgress(&req.counters),
        &mut |r| {
            run.snapshots += 1;
            run.changed_bytes += r.changed_bytes;
            run.sent_bytes += r.sent_bytes;
            debug!(job = %req.job.name, destination = %url, volume = %r.volume, snapshot = %r.snapshot, sent = r.sent_bytes, "replicated");
        },
    )
    .map(|_| ())
    .map_err(|e| one_line(&e))
}

/// Prune a repository destination after a successful replication.
fn apply_retention(
    req: &RunRequest,
    repo: Option<&snapsync_repo::Repository>,
    listing: &[VolumeInfo],
    url: &str,
    run: &mut DestinationRun,
) -> Result<(), String> {
    let (Some(retention), Some(repo)) = (&req.job.retention, repo) else {
        return Ok(());
    };
    req.cancel.check().map_err(|e| one_line(&e))?;
    let volumes: Vec<String> = listing.iter().map(|v| v.name.clone()).collect();
    let empty = Protected::new();
    let keep = req.downstream.get(url).unwrap_or(&empty);
    let pruned = retention::prune(repo, retention, &volumes, keep)
        .map_err(|e| format!("retention: {}", one_line(&e)))?;
    run.pruned = pruned.removed;
    run.retention_held = pruned.held;
    Ok(())
}

/// Per volume of `listing`, the newest snapshot `sink` holds of it.
pub fn bases_at(
    sink: &dyn SnapshotSink,
    source_system: &str,
    listing: &[VolumeInfo],
) -> Result<Bases, StoreError> {
    let dest_volumes = sink.list()?;
    let mut bases = Bases::new();
    for v in listing {
        let hints = sink.hints(source_system, &v.name)?;
        let newest = common_snapshots(v, None, &hints, &dest_volumes)
            .into_iter()
            .max_by_key(|c| (c.source.created, c.source.name.clone()));
        if let Some(c) = newest {
            bases.insert(
                v.name.clone(),
                Base {
                    snapshot: c.source.name,
                    created: millis_of(c.source.created),
                },
            );
        }
    }
    Ok(bases)
}

/// How far a destination is behind, in seconds: per volume, how much older the newest
/// snapshot it holds is than the source's newest; for a volume it holds nothing of, the
/// age of the source's oldest snapshot at `now` (everything is missing, since then). The
/// largest over the volumes; 0 when the source has no snapshots.
pub fn lag_seconds(listing: &[VolumeInfo], bases: &Bases, now: Millis) -> f64 {
    listing
        .iter()
        .filter_map(|v| {
            let newest = millis_of(v.snapshots.last()?.created);
            let lag = match bases.get(&v.name) {
                Some(b) => newest - b.created,
                None => now - millis_of(v.snapshots.first()?.created),
            };
            Some(lag.max(0))
        })
        .max()
        .map_or(0.0, |ms| ms as f64 / 1000.0)
}

/// End the run at the source: a checkpoint-taking source keeps what any destination
/// needs. Returns a problem worth showing, if any.
fn finish_source(
    source: &mut Box<dyn JobSource>,
    req: &RunRequest,
    listing: &[VolumeInfo],
    bases: &BTreeMap<String, Bases>,
) -> Option<String> {
    let keep = retention::protected(bases.values());
    let n = retention::checkpoints_to_keep(listing, &keep, DEFAULT_KEEP_SNAPSHOTS);
    if n > 4 * DEFAULT_KEEP_SNAPSHOTS {
        warn!(job = %req.job.name, kept = n, "keeping {n} snapshots per volume at the source: a destination is far behind and still needs its base");
    }
    source.finish(n).err().map(|e| {
        let line = format!(
            "cleaning up the source {}: {}",
            req.job.source,
            one_line(&e)
        );
        warn!(job = %req.job.name, "{line}");
        line
    })
}

fn result_of_failure(cancel: &Cancel) -> RunResult {
    match cancel.reason() {
        Some(CancelReason::Timeout(_)) => RunResult::Timeout,
        Some(CancelReason::Shutdown) => RunResult::Cancelled,
        None => RunResult::Failure,
    }
}

/// A destination's part of a run that failed with `error`.
pub fn failed(url: &str, cancel: &Cancel, error: String) -> DestinationRun {
    DestinationRun {
        result: result_of_failure(cancel),
        error: Some(error),
        ..DestinationRun::new(url)
    }
}

/// The counters' current values: bytes processed and sent.
pub fn progress(counters: &Counters) -> (u64, u64) {
    (
        counters.done.load(Ordering::Relaxed),
        counters.sent.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests;
