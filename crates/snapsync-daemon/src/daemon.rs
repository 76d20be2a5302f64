//! The daemon: one loop that owns all state and makes every decision, runs on threads
//! of their own, and listeners that ask the loop through [`Api`].
//!
//! The loop waits on one channel of [`Event`]s (a run ended, a listener asks, a signal
//! came) with a timeout until the scheduler's next wake-up or a run's deadline, then
//! asks the [`Scheduler`] what to do at the current time. Nothing else touches the
//! scheduler, the state directory or the metrics' run counts, so there is no lock to
//! get wrong and status is always a consistent picture.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{error, info, warn};

use crate::api::{Api, Event, Handle};
use crate::config::{self, Config, ConfigError, JobConfig};
use crate::control::{self, ControlError};
use crate::http::{self, Routes};
use crate::limit::{Bandwidth, Cancel, CancelReason, Limits};
use crate::metrics::{DestinationSeed, Metrics};
use crate::record::{Bases, RunRecord, RunResult};
use crate::repository::{self, Samples};
use crate::retention::{self, Protected};
use crate::runner::{self, now_millis, Counters, RunOutcome, RunRequest};
use crate::schedule::Millis;
use crate::scheduler::{Action, JobSpec, Scheduler, Trigger};
use crate::state::{JobState, LastRun, Running, StateDir, StateError};
use crate::status::{
    self, DaemonStatus, DestinationChains, DestinationStatus, JobChains, JobStatus,
    RepositoryStatus, RunningStatus, Status,
};
use crate::stores::Stores;
use crate::units::format_duration;
use crate::web::Access;

/// How long runs get to end after SIGTERM before the daemon exits without them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A run its timeout cancelled that has not ended this long after (blocked on a store
/// that does not answer) is abandoned: recorded as timed out, its job free to run again.
/// Its thread can no longer commit anything (its receives refuse to once cancelled).
pub const ABANDON_AFTER: Duration = Duration::from_secs(5);
/// The loop wakes at least this often (a clock that jumps is noticed).
const MAX_SLEEP: Millis = 60_000;

/// Why the daemon cannot start.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The metrics listener.
    #[error("cannot listen on {addr} (metrics_listen): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Threads for the listeners.
    #[error("cannot start the daemon's listeners: {0}")]
    Runtime(#[source] std::io::Error),
}

/// A run going on.
#[derive(Debug)]
struct Going {
    id: u64,
    trigger: Trigger,
    started: Millis,
    destinations: Vec<String>,
    cancel: Cancel,
    deadline: Option<(Millis, Duration)>,
    /// When its timeout cancelled it.
    cancelled_at: Option<Millis>,
    counters: Arc<Counters>,
    waiters: Vec<Waiter>,
}

type Waiter = tokio::sync::oneshot::Sender<Result<RunRecord, String>>;

/// A started daemon: its sockets are bound, its state loaded; [`Daemon::run`] runs it.
#[derive(Debug)]
pub struct Daemon {
    core: Core,
    rx: Receiver<Event>,
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct Core {
    config_path: PathBuf,
    config: Config,
    config_error: Option<String>,
    jobs: BTreeMap<String, Arc<JobConfig>>,
    stores: Arc<dyn Stores>,
    sched: Scheduler,
    state_dir: StateDir,
    states: BTreeMap<String, JobState>,
    /// Each repository destination's size over time.
    samples: Samples,
    going: BTreeMap<String, Going>,
    waiting: BTreeMap<String, Vec<Waiter>>,
    metrics: Arc<Metrics>,
    global: Option<Arc<Bandwidth>>,
    job_limits: BTreeMap<String, Arc<Bandwidth>>,
    tx: Sender<Event>,
    started: Millis,
    metrics_addr: Option<SocketAddr>,
    stopping: Option<Millis>,
}

impl std::fmt::Debug for dyn Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stores")
    }
}

impl Daemon {
    /// Load the config at `config_path`, lock its state directory, bind its control
    /// socket and metrics listener. Problems are reported here, before anything runs.
    pub fn start(config_path: &Path, stores: Arc<dyn Stores>) -> Result<Self, DaemonError> {
        let loaded = config::load(config_path, stores.as_ref())?;
        for w in &loaded.warnings {
            warn!("config {}: {w}", config_path.display());
        }
        let config = loaded.config;
        let state_dir = StateDir::open(&config.daemon.state_dir)?;
        let states = state_dir.load()?;
        let samples = state_dir.load_samples()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::new());
        let (runtime, metrics_addr) = listen(&config, Api::new(tx.clone()), metrics.clone())?;
        let mut core = Core {
            config_path: config_path.to_path_buf(),
            global: config.daemon.bwlimit.map(|r| Arc::new(Bandwidth::new(r))),
            config,
            config_error: None,
            jobs: BTreeMap::new(),
            stores,
            sched: Scheduler::new(),
            state_dir,
            states,
            samples,
            going: BTreeMap::new(),
            waiting: BTreeMap::new(),
            metrics,
            job_limits: BTreeMap::new(),
            tx,
            started: now_millis(),
            metrics_addr,
            stopping: None,
        };
        let jobs = core.config.jobs.clone();
        core.apply_jobs(jobs, now_millis());
        Ok(Self { core, rx, runtime })
    }

    /// Tells the running daemon to reload or stop.
    pub fn handle(&self) -> Handle {
        Handle::new(self.core.tx.clone())
    }

    /// Asks the running daemon, as the listeners do.
    pub fn api(&self) -> Api {
        Api::new(self.core.tx.clone())
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> &Path {
        &self.core.config.daemon.control_socket
    }

    /// The address `/metrics` is served on (port 0 in the config: the one bound).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.core.metrics_addr
    }

    /// The number of jobs configured.
    pub fn jobs(&self) -> usize {
        self.core.jobs.len()
    }

    /// Run until [`Handle::shutdown`]; runs still going then are cancelled and waited
    /// for up to [`SHUTDOWN_GRACE`].
    pub fn run(mut self) -> Result<(), DaemonError> {
        info!(jobs = self.core.jobs.len(), "daemon started");
        loop {
            let now = now_millis();
            if self.core.stopping.is_none() {
                self.core.poll(now);
            }
            self.core.enforce_deadlines(now);
            if let Some(deadline) = self.core.stopping {
                if self.core.going.is_empty() || now >= deadline {
                    break;
                }
            }
            let wake = self.core.next_wakeup(now).clamp(now, now + MAX_SLEEP);
            match self
                .rx
                .recv_timeout(Duration::from_millis((wake - now) as u64))
            {
                Ok(event) => self.core.handle(event, now_millis()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.core.stopped();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
        Ok(())
    }
}

/// Bind the control socket and the metrics listener, and serve them on a runtime of
/// their own; returns it and the metrics' address.
fn listen(
    config: &Config,
    api: Api,
    metrics: Arc<Metrics>,
) -> Result<(tokio::runtime::Runtime, Option<SocketAddr>), DaemonError> {
    let control = control::bind(&config.daemon.control_socket)?;
    let http = match config.daemon.metrics_listen {
        Some(addr) => {
            Some(http::bind(addr).map_err(|source| DaemonError::Listen { addr, source })?)
        }
        None => None,
    };
    let metrics_addr = http.as_ref().and_then(http::local_addr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("snapsync-listen")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.spawn(control::serve(control, api.clone()));
    if let (Some(l), Some(addr)) = (http, metrics_addr) {
        let web = Access::of(addr, config.daemon.web_token.clone());
        runtime.spawn(http::serve(l, Arc::new(Routes { metrics, api, web })));
    }
    Ok((runtime, metrics_addr))
}

impl Core {
    fn handle(&mut self, event: Event, now: Millis) {
        match event {
            Event::Finished(outcome) => self.finished(*outcome, now),
            Event::Status(reply) => {
                let _ = reply.send(self.status(now));
            }
            Event::Chains(job, reply) => {
                let _ = reply.send(self.chains(&job));
            }
            Event::RunJob(job, reply) => {
                if self.stopping.is_some() {
                    let _ = reply.send(Err("the daemon is stopping".into()));
                } else if !self.sched.request(&job) {
                    let _ = reply.send(Err(format!("no job named {job:?}")));
                } else {
                    info!(job = %job, "run requested");
                    self.waiting.entry(job).or_default().push(reply);
                }
            }
            Event::Reload => self.reload(now),
            Event::Shutdown => self.stop(now),
        }
    }

    fn poll(&mut self, now: Millis) {
        for action in self.sched.poll(now) {
            match action {
                Action::Start {
                    job,
                    destinations,
                    trigger,
                } => self.start(&job, destinations, trigger, now),
                Action::Skip { job, slot } => self.skipped(&job, slot),
            }
        }
        for job in self.jobs.keys() {
            let next = self.sched.view(job).and_then(|v| v.next_slot);
            self.metrics.next_run(job, next);
        }
    }

    fn next_wakeup(&self, now: Millis) -> Millis {
        let deadlines = self
            .going
            .values()
            .filter(|g| g.cancel.reason().is_none())
            .filter_map(|g| g.deadline.map(|d| d.0));
        let abandon = self.going.values().filter_map(|g| {
            g.cancelled_at
                .map(|c| c + ABANDON_AFTER.as_millis() as Millis)
        });
        let stop = self.stopping.into_iter();
        let sched = self.sched.next_wakeup().filter(|_| self.stopping.is_none());
        sched
            .into_iter()
            .chain(deadlines)
            .chain(abandon)
            .chain(stop)
            .min()
            .unwrap_or(now + MAX_SLEEP)
    }

    fn skipped(&mut self, job: &str, slot: Millis) {
        let st = self.states.entry(job.to_string()).or_default();
        st.skipped_runs += 1;
        self.metrics.skipped(job);
        let since = self.going.get(job).map_or(0, |g| g.started);
        info!(job, slot = %crate::record::rfc3339::format(slot), "skipped: the run started at {} is still going", crate::record::rfc3339::format(since));
        self.save(job);
    }

    fn save(&mut self, job: &str) {
        if let Some(st) = self.states.get(job) {
            if let Err(e) = self.state_dir.save(job, st) {
                error!(job, "cannot save the job's state: {e}");
            }
        }
    }
}

mod runs;
mod view;
