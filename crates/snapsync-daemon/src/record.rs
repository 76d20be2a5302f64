//! What a run did, as kept in the state directory and shown by `status --json` (one
//! type for both, so the history an operator reads is the one the daemon keeps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schedule::Millis;
use crate::scheduler::Trigger;

/// How a run ended for one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    /// Every selected snapshot is at the destination (and retention applied).
    Success,
    /// Something failed; `error` says what.
    Failure,
    /// Cancelled at the job's timeout.
    Timeout,
    /// Cancelled because the daemon stopped.
    Cancelled,
}

impl RunResult {
    /// As in metrics labels and status.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Timeout => "timeout",
            RunResult::Cancelled => "cancelled",
        }
    }

    /// Every result, for metrics that show zero counts too.
    pub const ALL: [RunResult; 4] = [
        RunResult::Success,
        RunResult::Failure,
        RunResult::Timeout,
        RunResult::Cancelled,
    ];
}

/// The newest snapshot of one volume that both the source and a destination hold: the
/// base its next replication is sent against, and what lag is measured from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// The source's name for it.
    pub snapshot: String,
    /// Its age.
    #[serde(with = "rfc3339")]
    pub created: Millis,
}

/// Per volume, a destination's [`Base`].
pub type Bases = BTreeMap<String, Base>;

/// One destination's part of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DestinationRun {
    /// The destination's URL, as in the config.
    pub url: String,
    /// How it ended.
    pub result: RunResult,
    /// The one-line error, when it failed.
    pub error: Option<String>,
    /// Snapshots replicated.
    pub snapshots: u64,
    /// Bytes the source reported changed.
    pub changed_bytes: u64,
    /// Bytes stored at (or sent to) the destination, after dedup and compression.
    pub sent_bytes: u64,
    /// Wall time of this destination's part.
    pub duration_ms: u64,
    /// Lag after the run, in seconds (see [`crate::runner::lag_seconds`]).
    pub lag_seconds: Option<f64>,
    /// Snapshots retention removed, `VOLUME@SNAPSHOT`.
    #[serde(default)]
    pub pruned: Vec<String>,
    /// Volumes retention left alone because pruning them would remove what a job
    /// replicating from this destination needs as its base, with why.
    #[serde(default)]
    pub retention_held: Vec<String>,
}

impl DestinationRun {
    /// A destination's part of a run before anything happened: a success so far, with
    /// nothing sent, that the run fills in (or [`crate::runner::failed`] marks failed).
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            result: RunResult::Success,
            error: None,
            snapshots: 0,
            changed_bytes: 0,
            sent_bytes: 0,
            duration_ms: 0,
            lag_seconds: None,
            pruned: Vec::new(),
            retention_held: Vec::new(),
        }
    }
}

/// One run of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The job.
    pub job: String,
    /// Its number within the job, from 1.
    pub id: u64,
    /// Why it ran.
    pub trigger: Trigger,
    /// When it started.
    #[serde(with = "rfc3339")]
    pub started: Millis,
    /// Wall time.
    pub duration_ms: u64,
    /// The snapshot the run took, for sources that take them.
    pub snapshot: Option<String>,
    /// A problem of the source after replication (cleaning up a running VM): logged
    /// and shown, without failing destinations that received their snapshot.
    pub source_error: Option<String>,
    /// Each destination the run replicated to.
    pub destinations: Vec<DestinationRun>,
}

impl RunRecord {
    /// Whether every destination succeeded.
    pub fn succeeded(&self) -> bool {
        self.destinations
            .iter()
            .all(|d| d.result == RunResult::Success)
    }
}

/// RFC 3339 in milliseconds, readable in the state files and in status (in snapsync-core,
/// as the chains a `snapsync serve` answers with carry such times too).
pub use snapsync_core::time::rfc3339;
