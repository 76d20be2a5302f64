//! The daemon's loop answers everything through one channel of [`Event`]s; [`Api`] is
//! how the listeners (the control socket, HTTP) ask it, so that each listener is a thin
//! translation of its protocol and a new one (a status page) adds no state of its own.

use crate::record::RunRecord;
use crate::runner::RunOutcome;
use crate::status::{JobChains, Status};

/// What the daemon's loop is told.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A run ended.
    Finished(Box<RunOutcome>),
    /// Status is asked for.
    Status(tokio::sync::oneshot::Sender<Status>),
    /// A job's chains are asked for (`None`: no such job).
    Chains(String, tokio::sync::oneshot::Sender<Option<JobChains>>),
    /// A run of a job is asked for; the answer comes when it has run.
    RunJob(
        String,
        tokio::sync::oneshot::Sender<Result<RunRecord, String>>,
    ),
    /// Read the config file again (SIGHUP).
    Reload,
    /// Stop (SIGTERM, SIGINT).
    Shutdown,
}

/// Asks the daemon's loop.
#[derive(Clone, Debug)]
pub struct Api {
    tx: crossbeam_channel::Sender<Event>,
}

const GONE: &str = "the daemon is stopping";

impl Api {
    pub(crate) fn new(tx: crossbeam_channel::Sender<Event>) -> Self {
        Self { tx }
    }

    /// The status document.
    pub async fn status(&self) -> Result<Status, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Event::Status(reply))
            .map_err(|_| GONE.to_string())?;
        answer.await.map_err(|_| GONE.to_string())
    }

    /// The chains of `job`'s volumes at its destinations (`None`: no such job).
    pub async fn chains(&self, job: &str) -> Result<Option<JobChains>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Event::Chains(job.to_string(), reply))
            .map_err(|_| GONE.to_string())?;
        answer.await.map_err(|_| GONE.to_string())
    }

    /// Run `job` now (after its current run, if one is going) and return how it went.
    pub async fn run_job(&self, job: &str) -> Result<RunRecord, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Event::RunJob(job.to_string(), reply))
            .map_err(|_| GONE.to_string())?;
        answer.await.map_err(|_| GONE.to_string())?
    }
}

/// Tells a running daemon to reload or stop, from any thread (a signal handler's).
#[derive(Clone, Debug)]
pub struct Handle {
    tx: crossbeam_channel::Sender<Event>,
}

impl Handle {
    pub(crate) fn new(tx: crossbeam_channel::Sender<Event>) -> Self {
        Self { tx }
    }

    /// Read the config file again; a config with a mistake is refused and logged, and
    /// the daemon runs on with the one it had.
    pub fn reload(&self) {
        let _ = self.tx.send(Event::Reload);
    }

    /// Stop: runs going on are cancelled (what they committed stays, what they had not
    /// is abandoned), and [`crate::Daemon::run`] returns within the grace period.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
}
