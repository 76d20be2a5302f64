//! The state directory: each job's run history, backoffs and the bases its destinations
//! hold, so that a restart (or a `kill -9`) loses nothing.
//!
//! One small JSON file per job (`jobs/NAME.json`) rather than one for the daemon: a run
//! rewrites only its job's file, which stays a few tens of KiB however many jobs there
//! are. Each is written whole to a temporary file, synced, and renamed over the old one
//! (then the directory is synced), so a crash leaves the old file or the new one. A lock
//! on `lock` keeps two daemons from sharing one directory.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::{rfc3339, Bases, DestinationRun, RunRecord};
use crate::repository::{Chain, Samples};
use crate::schedule::Millis;
use crate::scheduler::{Backoff, Recovered, Trigger};

/// Runs kept per job.
pub const HISTORY: usize = 50;
/// The version of the files' layout.
const VERSION: u32 = 1;

/// What could go wrong with the state directory.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or locking failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the directory.
    #[error("state directory {0} is in use by another snapsync daemon")]
    Locked(PathBuf),
    /// A file is not what this daemon wrote.
    #[error("state file {path}: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// A run that started and has not finished (while the daemon runs; found at start, the
/// daemon died during it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// Its number.
    pub id: u64,
    /// Why.
    pub trigger: Trigger,
    /// When.
    #[serde(with = "rfc3339")]
    pub started: Millis,
    /// To where.
    pub destinations: Vec<String>,
}

/// What is known of one destination of a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationState {
    /// Its retry state.
    pub backoff: Backoff,
    /// When a run last succeeded for it.
    #[serde(with = "rfc3339::option", default)]
    pub last_success: Option<Millis>,
    /// Its lag after the last run of the job.
    pub lag_seconds: Option<f64>,
    /// The newest snapshot per volume it shares with the source.
    #[serde(default)]
    pub bases: Bases,
    /// Its part of the last run that included it, and that run's number, trigger and
    /// start.
    pub last_run: Option<LastRun>,
    /// For a repository: the chains of the job's volumes, as last read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<Chain>,
    /// When they were read.
    #[serde(with = "rfc3339::option", default)]
    pub chains_read: Option<Millis>,
    /// Why the last read of its chains or size failed (`None` when it succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_problem: Option<String>,
}

/// A destination's part of a run, with the run it was part of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// The run's number.
    pub id: u64,
    /// Why it ran.
    pub trigger: Trigger,
    /// When it started.
    #[serde(with = "rfc3339")]
    pub started: Millis,
    /// What happened at this destination.
    #[serde(flatten)]
    pub run: DestinationRun,
}

/// One job's file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Layout version.
    pub version: u32,
    /// Runs started so far (the last run's number).
    pub runs_started: u64,
    /// When the last run started.
    #[serde(with = "rfc3339::option", default)]
    pub last_start: Option<Millis>,
    /// The run going on, if any.
    pub running: Option<Running>,
    /// Slots skipped because a run was still going.
    pub skipped_runs: u64,
    /// Per destination URL.
    #[serde(default)]
    pub destinations: BTreeMap<String, DestinationState>,
    /// The last runs, oldest first.
    #[serde(default)]
    pub runs: VecDeque<RunRecord>,
}

impl JobState {
    /// What the scheduler needs of it after a restart.
    pub fn recovered(&self) -> Recovered {
        Recovered {
            last_start: self.last_start,
            interrupted: self.running.is_some(),
            backoff: self
                .destinations
                .iter()
                .map(|(d, s)| (d.clone(), s.backoff))
                .collect(),
        }
    }

    /// Add a finished run to the history.
    pub fn push_run(&mut self, run: RunRecord) {
        self.runs.push_back(run);
        while self.runs.len() > HISTORY {
            self.runs.pop_front();
        }
    }
}

/// The state directory, locked.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateDir {
    /// Create (if need be) and lock `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let jobs = dir.join("jobs");
        std::fs::create_dir_all(&jobs).map_err(io(&jobs))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every job's state found (jobs no longer configured too).
    pub fn load(&self) -> Result<BTreeMap<String, JobState>, StateError> {
        let jobs = self.dir.join("jobs");
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&jobs).map_err(io(&jobs))? {
            let path = entry.map_err(io(&jobs))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let text = std::fs::read(&path).map_err(io(&path))?;
            let state: JobState =
                serde_json::from_slice(&text).map_err(|e| StateError::Malformed {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            out.insert(name.to_string(), state);
        }
        Ok(out)
    }

    /// Write `job`'s state atomically.
    pub fn save(&self, job: &str, state: &JobState) -> Result<(), StateError> {
        let mut state = state.clone();
        state.version = VERSION;
        let bytes = serde_json::to_vec_pretty(&state).expect("serialisable");
        write_atomically(&self.dir.join("jobs"), &format!("{job}.json"), &bytes)
    }

    /// The repositories' size samples (none when the file is not there yet).
    pub fn load_samples(&self) -> Result<Samples, StateError> {
        let path = self.dir.join(SAMPLES);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Samples::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let file: SamplesFile =
            serde_json::from_slice(&text).map_err(|e| StateError::Malformed {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        Ok(file.repositories)
    }

    /// Write the repositories' size samples atomically.
    pub fn save_samples(&self, samples: &Samples) -> Result<(), StateError> {
        let file = SamplesFile {
            version: VERSION,
            repositories: samples.clone(),
        };
        let bytes = serde_json::to_vec(&file).expect("serialisable");
        write_atomically(&self.dir, SAMPLES, &bytes)
    }
}

/// The file of repository size samples, in the state directory.
const SAMPLES: &str = "repositories.json";

#[derive(Serialize, Deserialize)]
struct SamplesFile {
    version: u32,
    repositories: Samples,
}

/// Write `dir/name` whole to a temporary file, sync it, rename it over the old one and
/// sync the directory: a crash leaves the old file or the new one.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RunResult;

    fn run(id: u64) -> RunRecord {
        RunRecord {
            job: "a".into(),
            id,
            trigger: Trigger::Scheduled,
            started: 1_000 * id as i64,
            duration_ms: 5,
            snapshot: None,
            source_error: None,
            destinations: vec![DestinationRun {
                url: "/r".into(),
                result: RunResult::Success,
                error: None,
                snapshots: 1,
                changed_bytes: 10,
                sent_bytes: 5,
                duration_ms: 5,
                lag_seconds: Some(0.0),
                pruned: vec![],
                retention_held: vec![],
            }],
        }
    }

    #[test]
    fn saved_state_reloads_and_the_directory_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert!(matches!(
            StateDir::open(dir.path()),
            Err(StateError::Locked(_))
        ));
        let mut j = JobState {
            last_start: Some(7_000),
            running: Some(Running {
                id: 3,
                trigger: Trigger::Manual,
                started: 7_000,
                destinations: vec!["/r".into()],
            }),
            ..JobState::default()
        };
        for id in 1..=(HISTORY as u64 + 5) {
            j.push_run(run(id));
        }
        j.destinations
            .insert("/r".into(), DestinationState::default());
        s.save("a", &j).unwrap();
        let loaded = s.load().unwrap();
        let back = &loaded["a"];
        assert_eq!(back.runs.len(), HISTORY);
        assert_eq!(back.runs[0].id, 6);
        assert_eq!(back.last_start, Some(7_000));
        assert!(back.recovered().interrupted);
        assert_eq!(back.version, VERSION);
        // Nothing but the job's file is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        // The repositories' samples, in a file of their own.
        assert!(s.load_samples().unwrap().is_empty());
        let mut samples = crate::repository::Samples::new();
        samples.insert(
            "/r".into(),
            vec![serde_json::from_str(
                r#"{"at":"2023-11-14T00:00:00.000Z","stored_bytes":5,"logical_bytes":9,"volumes":1,"snapshots":2}"#,
            )
            .unwrap()],
        );
        s.save_samples(&samples).unwrap();
        assert_eq!(s.load_samples().unwrap(), samples);
        drop(s);
        assert!(StateDir::open(dir.path()).is_ok(), "the lock goes with it");
    }
}
