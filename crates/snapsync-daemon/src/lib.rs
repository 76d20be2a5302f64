//! snapsync's daemon: replication jobs run on schedules, each fanned out to several
//! destinations, with retention, bandwidth limits, timeouts, run history, metrics and
//! a status command (`snapsync daemon`, `snapsync status`, `snapsync run-job`).
//!
//! # Design, and why
//!
//! **Decisions are pure, execution is not.** When runs start, which slots are skipped,
//! when a failing destination is retried and what a restart catches up on are decided
//! by [`scheduler::Scheduler`], which has no clock and no threads: it is told the time
//! and what happened, and answers with actions (raft-rs style). That is what makes the
//! rules testable at the scale of days in microseconds, and property-tested: runs of a
//! job never overlap, nothing is due between the wake-ups it asks for, backoff holds.
//! Cron matching ([`cron`]) and retention's "what must stay" ([`retention`]) are pure
//! functions too, each checked against a simple model.
//!
//! **One owner of state.** The daemon ([`Daemon`]) is one loop that owns the
//! scheduler, the state directory and the run bookkeeping; runs execute on threads of
//! their own and report back through the loop's channel, and the listeners (the control
//! socket, HTTP) ask it through the same channel ([`api::Api`]). No lock is shared, a
//! status is a consistent picture, and a listener (the status page of [`web`]) is a
//! translation of its protocol with no state of its own.
//!
//! **The engine is used as it is.** A run calls the same `replicate` as `snapsync
//! replicate`, per destination, so each destination replicates against its own base
//! (its hints), on its own thread: one that fails or hangs does not hold the others'
//! data back. Timeouts, shutdown and bandwidth limits are imposed from outside by
//! wrapping the source and the destination (reads and writes check a
//! [`limit::Cancel`], bytes written are charged to [`limit::Bandwidth`] token buckets,
//! per job and for the daemon, measured as the destination reports them), and a
//! cancelled snapshot is never committed: its receive is dropped, which the repository
//! guarantees abandons it. A run that does not stop when cancelled (blocked on a store
//! that does not answer) is abandoned shortly after, so no job is held forever.
//!
//! **Nothing that a destination needs is removed.** Retention prunes each repository
//! destination with the repository's own prune, never forced, so each destination's
//! replication base stays; a destination that is itself another job's source also
//! keeps that job's destinations' bases; a source whose snapshots snapsync takes (a
//! running VM's checkpoints) keeps every one from the oldest base some destination —
//! even one that has been down for days — still needs ([`retention`]).
//!
//! **State survives anything.** Each job's history, backoffs and the bases its
//! destinations hold are one JSON file in `state_dir`, written atomically ([`state`]);
//! a run in progress is marked there, so after a `kill -9` the next start runs the job
//! at once, once, rather than once per slot it missed.
//!
//! **The page reads what runs read.** What the status page shows of a repository
//! destination beyond the run history — its size over time, its volumes' chains — is
//! read by the run that just wrote there, on its thread ([`repository`]), and kept by
//! the loop; a page request never touches a store.
//!
//! **Stores come from the caller.** Opening a store from a URL is the `snapsync`
//! library's, whose package also holds the binary that runs this daemon: depending on it
//! here would be a cycle. The binary passes a [`stores::Stores`] built on
//! `snapsync::open`; tests pass real stores opened directly.

pub mod api;
pub mod config;
pub mod control;
pub mod cron;
mod daemon;
mod guard;
pub mod http;
pub mod limit;
pub mod metrics;
pub mod record;
pub mod repository;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod status;
pub mod stores;
pub mod units;
pub mod web;

pub use api::Handle;
pub use config::{Config, ConfigError, JobConfig};
pub use daemon::{Daemon, DaemonError, ABANDON_AFTER, SHUTDOWN_GRACE};
pub use stores::{JobDestination, JobSource, Stores};
