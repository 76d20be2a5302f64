//! The scheduler's decisions, without a clock or threads: given the time and what it was
//! told (runs started and finished, runs asked for), which runs start now, which slots
//! are skipped, and when to ask again.
//!
//! The caller owns time and execution (the daemon's loop, or a test stepping through a
//! day in microseconds), in the style of raft-rs: it calls [`Scheduler::poll`] with
//! the current time, starts what it is told, reports each end with
//! [`Scheduler::finished`], and sleeps until [`Scheduler::next_wakeup`] or an event.
//! Every rule of the "Behaviour" that is about time is here and tested here:
//! runs of a job never overlap (a slot that comes while one runs is skipped, and
//! counted once however many slots passed); a failing destination is retried with
//! exponential backoff and only it; after a restart a missed slot (or a run cut short
//! by a crash) is caught up once, not once per missed slot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schedule::{Millis, Schedule};

/// The first retry of a failed destination comes this long after the failure.
pub const RETRY_FIRST: Millis = 1_000;
/// Retries back off exponentially up to this.
pub const RETRY_MAX: Millis = 300_000;

/// Why a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Its schedule came.
    Scheduled,
    /// A slot passed while the daemon was down, or a run was cut short by a crash.
    CatchUp,
    /// Destinations that failed, retried after their backoff.
    Retry,
    /// `snapsync run-job`.
    Manual,
}

impl Trigger {
    /// As in status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::CatchUp => "catch-up",
            Trigger::Retry => "retry",
            Trigger::Manual => "manual",
        }
    }
}

/// A job as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    /// Name.
    pub name: String,
    /// When it runs.
    pub schedule: Schedule,
    /// Its destinations, each with a backoff of its own.
    pub destinations: Vec<String>,
}

/// A failing destination's retry state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Failures in a row.
    pub failures: u32,
    /// When it is tried next; `None` when it is not failing.
    pub retry_at: Option<Millis>,
}

impl Backoff {
    fn due(&self, now: Millis) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }

    fn failed(&mut self, now: Millis) {
        self.failures = self.failures.saturating_add(1);
        let shift = (self.failures - 1).min(30);
        self.retry_at = Some(now + (RETRY_FIRST << shift).min(RETRY_MAX));
    }
}

/// What a restarted daemon tells the scheduler about a job, from its persisted state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// When its last run started.
    pub last_start: Option<Millis>,
    /// Whether that run never finished (the daemon died during it).
    pub interrupted: bool,
    /// Each destination's backoff.
    pub backoff: BTreeMap<String, Backoff>,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a run of `job` to `destinations`.
    Start {
        /// Job.
        job: String,
        /// The destinations this run replicates to (those not backing off).
        destinations: Vec<String>,
        /// Why.
        trigger: Trigger,
    },
    /// A slot of `job` came while it was still running: not run, counted.
    Skip {
        /// Job.
        job: String,
        /// The slot skipped (the latest, when several passed).
        slot: Millis,
    },
}

#[derive(Clone, Debug)]
struct JobState {
    spec: JobSpec,
    next_slot: Option<Millis>,
    catch_up: bool,
    running: bool,
    manual: bool,
    last_start: Option<Millis>,
    backoff: BTreeMap<String, Backoff>,
}

/// A job's scheduling state, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobView {
    /// The next slot of its schedule.
    pub next_slot: Option<Millis>,
    /// Whether a run is going.
    pub running: bool,
    /// Whether a manual run waits for the current one to end.
    pub manual_pending: bool,
    /// Each destination's backoff.
    pub backoff: BTreeMap<String, Backoff>,
}

/// The scheduler. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Scheduler {
    jobs: BTreeMap<String, JobState>,
}

impl Scheduler {
    /// A scheduler with no jobs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the jobs, at start and on reload. A job already known keeps its state (a
    /// running run, backoffs of destinations it still has, its next slot unless its
    /// schedule changed); a new one starts from what `recovered` says of it.
    pub fn configure(
        &mut self,
        specs: Vec<JobSpec>,
        recovered: &dyn Fn(&str) -> Option<Recovered>,
        now: Millis,
    ) {
        let mut jobs = BTreeMap::new();
        for spec in specs {
            let state = match self.jobs.remove(&spec.name) {
                Some(mut old) => {
                    if old.spec.schedule != spec.schedule {
                        old.next_slot = next_slot(&spec.schedule, old.last_start, now);
                    }
                    old.backoff.retain(|d, _| spec.destinations.contains(d));
                    old.spec = spec;
                    old
                }
                None => fresh(spec, recovered, now),
            };
            jobs.insert(state.spec.name.clone(), state);
        }
        self.jobs = jobs;
    }

    /// The runs to start and slots to skip at `now`.
    pub fn poll(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        for job in self.jobs.values_mut() {
            let slot = job.next_slot.filter(|&s| s <= now);
            if job.running {
                if let Some(slot) = slot {
                    job.next_slot = job.spec.schedule.next_after(now);
                    job.catch_up = false;
                    actions.push(Action::Skip {
                        job: job.spec.name.clone(),
                        slot,
                    });
                }
                continue;
            }
            if let Some(start) = job.due(slot.is_some(), now) {
                actions.push(start);
            }
        }
        actions
    }

    /// `job`'s run ended at `now`; `results` says which destinations succeeded.
    pub fn finished(&mut self, job: &str, now: Millis, results: &[(String, bool)]) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        j.running = false;
        for (dest, ok) in results {
            if !j.spec.destinations.contains(dest) {
                continue;
            }
            let b = j.backoff.entry(dest.clone()).or_default();
            if *ok {
                *b = Backoff::default();
            } else {
                b.failed(now);
            }
        }
    }

    /// Ask for a run of `job` as soon as it is not running; `false` if there is no
    /// such job.
    pub fn request(&mut self, job: &str) -> bool {
        match self.jobs.get_mut(job) {
            Some(j) => {
                j.manual = true;
                true
            }
            None => false,
        }
    }

    /// When [`Scheduler::poll`] next has something to do, unless told of an event first.
    pub fn next_wakeup(&self) -> Option<Millis> {
        self.jobs
            .values()
            .flat_map(|j| {
                let idle = !j.running;
                let manual = (idle && j.manual).then_some(Millis::MIN);
                let retries = j
                    .backoff
                    .values()
                    .filter_map(move |b| b.retry_at.filter(|_| idle));
                j.next_slot.into_iter().chain(manual).chain(retries)
            })
            .min()
    }

    /// A job's state, for status.
    pub fn view(&self, job: &str) -> Option<JobView> {
        self.jobs.get(job).map(|j| JobView {
            next_slot: j.next_slot,
            running: j.running,
            manual_pending: j.manual,
            backoff: j.backoff.clone(),
        })
    }
}

/// The next slot of a job whose last run started at `last_start`: the schedule's next
/// after it, or now if that has passed (catching up once, whatever number of slots
/// passed), or the schedule's first for a job that never ran.
fn next_slot(schedule: &Schedule, last_start: Option<Millis>, now: Millis) -> Option<Millis> {
    match last_start {
        Some(t) => schedule.next_after(t).map(|n| n.max(now)),
        None => schedule.first(now),
    }
}

fn fresh(spec: JobSpec, recovered: &dyn Fn(&str) -> Option<Recovered>, now: Millis) -> JobState {
    let r = recovered(&spec.name).unwrap_or_default();
    let mut next = next_slot(&spec.schedule, r.last_start, now);
    if r.interrupted {
        next = Some(now);
    }
    let catch_up = r.last_start.is_some() && next == Some(now);
    let backoff = r
        .backoff
        .into_iter()
        .filter(|(d, _)| spec.destinations.contains(d))
        .collect();
    JobState {
        spec,
        next_slot: next,
        catch_up,
        running: false,
        manual: false,
        last_start: r.last_start,
        backoff,
    }
}

impl JobState {
    /// The run to start now, if any, for a job that is not running; `slot_due` says
    /// whether its schedule's slot has come.
    fn due(&mut self, slot_due: bool, now: Millis) -> Option<Action> {
        let all = self.spec.destinations.clone();
        let (destinations, trigger) = if self.manual {
            (all, Trigger::Manual)
        } else if slot_due {
            let ready: Vec<String> = all
                .into_iter()
                .filter(|d| self.backoff(d).due(now))
                .collect();
            let trigger = if self.catch_up {
                Trigger::CatchUp
            } else {
                Trigger::Scheduled
            };
            (ready, trigger)
        } else {
            let retry: Vec<String> = all
                .into_iter()
                .filter(|d| self.backoff(d).retry_at.is_some_and(|t| t <= now))
                .collect();
            (retry, Trigger::Retry)
        };
        if slot_due || self.manual {
            self.next_slot = self.spec.schedule.next_after(now);
            self.catch_up = false;
        }
        self.manual = false;
        if destinations.is_empty() {
            return None;
        }
        self.running = true;
        self.last_start = Some(now);
        Some(Action::Start {
            job: self.spec.name.clone(),
            destinations,
            trigger,
        })
    }

    fn backoff(&self, dest: &str) -> Backoff {
        self.backoff.get(dest).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
