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

/// RFC 3339 for the time of day, readable in the state files and in status; a
/// missing value is `null`.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::schedule::Millis;

    /// Millis as RFC 3339 (UTC, milliseconds).
    pub fn format(t: Millis) -> String {
        let nanos = i128::from(t) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(dt) => dt
                .replace_nanosecond(dt.nanosecond() / 1_000_000 * 1_000_000)
                .unwrap_or(dt)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| t.to_string()),
            Err(_) => t.to_string(),
        }
    }

    /// RFC 3339 back to millis.
    pub fn parse(s: &str) -> Option<Millis> {
        let dt =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        Millis::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
    }

    /// For `#[serde(with)]`.
    pub fn serialize<S: Serializer>(t: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// For `#[serde(with)]`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))
    }

    /// The same for `Option<Millis>`.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        use crate::schedule::Millis;

        /// For `#[serde(with)]`.
        pub fn serialize<S: Serializer>(t: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::format(*t)),
                None => s.serialize_none(),
            }
        }

        /// For `#[serde(with)]`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => super::parse(&s).map(Some).ok_or_else(|| {
                    serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time"))
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn times_round_trip() {
        for t in [0, 1_699_920_000_123, -5_000, 1_700_000_000_000] {
            assert_eq!(rfc3339::parse(&rfc3339::format(t)), Some(t));
        }
        assert_eq!(
            rfc3339::format(1_699_920_000_123),
            "2023-11-14T00:00:00.123Z"
        );
    }
}
