//! What `snapsync status --json` prints: the daemon's view of every job and
//! destination, built by the daemon's loop (the one owner of its state) on request.
//!
//! The same document is meant for any reader of the daemon's state (the status page
//! reads it as `/api/status`, byte for byte what `status --json` prints): everything a
//! table of jobs × destinations, a chart of recent runs or of a repository's size, or a
//! lag alert needs is here, times in RFC 3339 (UTC), sizes in bytes, durations in
//! seconds or milliseconds as named. `version` changes only when a field changes
//! meaning or goes away; fields are added freely (`repositories` was, with the page).
//! A volume's chain, which grows with the snapshots kept, is apart ([`JobChains`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{rfc3339, Base, RunRecord};
use crate::repository::{Chain, Sample};
use crate::schedule::Millis;
use crate::scheduler::Trigger;
use crate::state::LastRun;

/// The document's version.
pub const VERSION: u32 = 1;
/// Runs per job in [`JobStatus::recent_runs`].
pub const RECENT_RUNS: usize = 20;

/// The whole status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// [`VERSION`].
    pub version: u32,
    /// The daemon itself.
    pub daemon: DaemonStatus,
    /// Every configured job, in config order.
    pub jobs: Vec<JobStatus>,
    /// Every repository destination of the configured jobs that has been sampled, in
    /// the order the jobs first name them: its size over time.
    #[serde(default)]
    pub repositories: Vec<RepositoryStatus>,
}

/// A repository destination's size over time (see [`crate::repository`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepositoryStatus {
    /// URL, as in the config.
    pub url: String,
    /// Samples, oldest first (at most [`crate::repository::MAX_SAMPLES`]).
    pub samples: Vec<Sample>,
}

/// What `/api/chains?job=NAME` answers: per destination, the chains of the job's
/// volumes as the last run read them. Apart from the status document because it grows
/// with the snapshots kept (the page asks for one job's when it is picked).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobChains {
    /// [`VERSION`].
    pub version: u32,
    /// The job.
    pub job: String,
    /// Each destination, in config order.
    pub destinations: Vec<DestinationChains>,
}

/// One destination's chains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DestinationChains {
    /// URL, as in the config.
    pub url: String,
    /// When they were read (`None`: never, or it is not a repository).
    #[serde(with = "rfc3339::option")]
    pub read: Option<Millis>,
    /// Why the last attempt to read them (or the size) failed, one line; `None` when it
    /// succeeded. The chains shown are then those of `read`.
    pub problem: Option<String>,
    /// Per volume, its replication base: what retention never removes.
    pub bases: BTreeMap<String, Base>,
    /// Per volume, its snapshots and their delta bases.
    pub volumes: Vec<Chain>,
}

/// The daemon itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DaemonStatus {
    /// Its process id.
    pub pid: u32,
    /// When it started.
    #[serde(with = "rfc3339")]
    pub started: Millis,
    /// The time the document was made.
    #[serde(with = "rfc3339")]
    pub now: Millis,
    /// Its config file.
    pub config: String,
    /// Where `/metrics` is served, if anywhere (the address bound).
    pub metrics_listen: Option<String>,
    /// The last reload's problem, when the config file holds a mistake the daemon
    /// refused (it runs on with the config before).
    pub config_error: Option<String>,
}

/// One job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobStatus {
    /// Name.
    pub name: String,
    /// Source URL.
    pub source: String,
    /// Its schedule, as written.
    pub schedule: String,
    /// The usual time between runs, for judging lag (red past twice this, say).
    pub interval_seconds: f64,
    /// Its timeout, if it has one.
    pub timeout_seconds: Option<f64>,
    /// When its schedule next runs it.
    #[serde(with = "rfc3339::option")]
    pub next_run: Option<Millis>,
    /// The run going on.
    pub running: Option<RunningStatus>,
    /// Whether a `run-job` waits for the current run to end.
    pub run_requested: bool,
    /// Slots skipped because a run was still going (since the state directory was made).
    pub skipped_runs: u64,
    /// Each destination.
    pub destinations: Vec<DestinationStatus>,
    /// The last runs, newest first (at most [`RECENT_RUNS`]).
    pub recent_runs: Vec<RunRecord>,
}

/// A run going on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunningStatus {
    /// Its number.
    pub id: u64,
    /// Why it runs.
    pub trigger: Trigger,
    /// When it started.
    #[serde(with = "rfc3339")]
    pub started: Millis,
    /// The destinations it replicates to.
    pub destinations: Vec<String>,
    /// Bytes of snapshots processed so far.
    pub processed_bytes: u64,
    /// Bytes stored or sent so far.
    pub sent_bytes: u64,
    /// Why it is being cancelled, if it is.
    pub cancelling: Option<String>,
}

/// One destination of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DestinationStatus {
    /// URL, as in the config.
    pub url: String,
    /// Its part of the last run that included it.
    pub last_run: Option<LastRun>,
    /// When a run last succeeded for it.
    #[serde(with = "rfc3339::option")]
    pub last_success: Option<Millis>,
    /// How much older the newest snapshot it holds is than the source's newest, in
    /// seconds, as of the job's last run (see [`crate::runner::lag_seconds`]).
    pub lag_seconds: Option<f64>,
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// When it is retried, while failing.
    #[serde(with = "rfc3339::option")]
    pub next_retry: Option<Millis>,
    /// Per volume, the newest snapshot it shares with the source (its next base).
    pub bases: BTreeMap<String, Base>,
}
