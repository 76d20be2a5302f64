//! The loop's side of runs: starting them, their ends, deadlines, reloads and stopping.

use super::*;

impl Core {
    /// Start a run of `job` on a thread of its own.
    pub(super) fn start(
        &mut self,
        job: &str,
        destinations: Vec<String>,
        trigger: Trigger,
        now: Millis,
    ) {
        let Some(cfg) = self.jobs.get(job).cloned() else {
            return;
        };
        if self.going.contains_key(job) {
            // The scheduler never does this; a job removed and added back by a reload
            // while its run goes on could.
            self.skipped(job, now);
            return;
        }
        let (id, known) = self.mark_started(job, &destinations, trigger, now);
        let req = self.request(cfg, id, trigger, destinations, known, now);
        info!(job, run = id, trigger = trigger.as_str(), destinations = %req.destinations.join(" "), "run started");
        self.metrics.running(job, true);
        self.going.insert(
            job.to_string(),
            Going {
                id,
                trigger,
                started: now,
                destinations: req.destinations.clone(),
                cancel: req.cancel.clone(),
                deadline: req.job.timeout.map(|t| (now + t.as_millis() as Millis, t)),
                cancelled_at: None,
                counters: req.counters.clone(),
                waiters: self.waiting.remove(job).unwrap_or_default(),
            },
        );
        self.spawn(req);
    }

    /// Record in the job's state file that a run started (so that a crash during it is
    /// caught up at the next start); returns its number and what its destinations hold.
    fn mark_started(
        &mut self,
        job: &str,
        destinations: &[String],
        trigger: Trigger,
        now: Millis,
    ) -> (u64, BTreeMap<String, Bases>) {
        let st = self.states.entry(job.to_string()).or_default();
        st.runs_started += 1;
        let id = st.runs_started;
        st.last_start = Some(now);
        st.running = Some(Running {
            id,
            trigger,
            started: now,
            destinations: destinations.to_vec(),
        });
        let known = st
            .destinations
            .iter()
            .map(|(d, s)| (d.clone(), s.bases.clone()))
            .collect();
        self.save(job);
        (id, known)
    }

    fn request(
        &self,
        job: Arc<JobConfig>,
        id: u64,
        trigger: Trigger,
        destinations: Vec<String>,
        known: BTreeMap<String, Bases>,
        now: Millis,
    ) -> RunRequest {
        let downstream = job
            .destinations
            .iter()
            .map(|d| (d.clone(), self.downstream_of(d)))
            .collect();
        let limits = Limits::new(
            self.job_limits
                .get(&job.name)
                .cloned()
                .into_iter()
                .chain(self.global.clone()),
        );
        let every =
            (job.schedule.interval(now).as_millis() as Millis).min(repository::SAMPLE_EVERY);
        let sample = destinations
            .iter()
            .filter(|d| {
                let last = self.samples.get(*d).and_then(|v| v.last()).map(|s| s.at);
                last.is_none_or(|at| now - at >= every)
            })
            .cloned()
            .collect();
        let known_chains = self
            .states
            .get(&job.name)
            .map(|st| {
                st.destinations
                    .iter()
                    .map(|(d, s)| (d.clone(), repository::known(&s.chains)))
                    .collect()
            })
            .unwrap_or_default();
        RunRequest {
            job,
            id,
            trigger,
            destinations,
            known,
            downstream,
            limits,
            cancel: Cancel::new(),
            counters: Arc::new(Counters::default()),
            now,
            sample,
            known_chains,
        }
    }

    /// Run `req` on a thread that reports its end to the loop, whatever happens to it.
    fn spawn(&self, req: RunRequest) {
        let (job, id, trigger, now) = (req.job.clone(), req.id, req.trigger, req.now);
        let (destinations, known) = (req.destinations.clone(), req.known.clone());
        let cancel = req.cancel.clone();
        let failed = move |why: &str| {
            failed_run(
                &job.name,
                id,
                trigger,
                now,
                &destinations,
                known,
                &cancel,
                why,
            )
        };
        let stores = self.stores.clone();
        let tx = self.tx.clone();
        let (thread_tx, thread_failed) = (tx.clone(), failed.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("run-{}", req.job.name))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runner::run(stores.as_ref(), req)
                }))
                .unwrap_or_else(|_| thread_failed("internal error: the run panicked"));
                let _ = thread_tx.send(Event::Finished(Box::new(outcome)));
            });
        if let Err(e) = spawned {
            let outcome = failed(&format!("cannot start a thread for the run: {e}"));
            let _ = tx.send(Event::Finished(Box::new(outcome)));
        }
    }

    /// What jobs replicating from `url` need it to keep: the bases of their destinations.
    fn downstream_of(&self, url: &str) -> Protected {
        let me = self.stores.identity(url);
        let bases = self
            .jobs
            .values()
            .filter(|j| self.stores.identity(&j.source) == me)
            .filter_map(|j| self.states.get(&j.name))
            .flat_map(|st| st.destinations.values().map(|d| &d.bases));
        retention::protected(bases)
    }

    /// A run ended: record it, tell the scheduler, the metrics and whoever waits.
    pub(super) fn finished(&mut self, outcome: RunOutcome, now: Millis) {
        let record = outcome.record;
        let job = record.job.clone();
        if self.going.get(&job).map(|g| g.id) != Some(record.id) {
            warn!(job = %job, run = record.id, "an abandoned run ended at last, after {} ms", record.duration_ms);
            return;
        }
        let going = self.going.remove(&job);
        let results: Vec<(String, bool)> = record
            .destinations
            .iter()
            .map(|d| (d.url.clone(), d.result == RunResult::Success))
            .collect();
        self.sched.finished(&job, now, &results);
        let backoff = self.sched.view(&job).map(|v| v.backoff).unwrap_or_default();
        let st = self.states.entry(job.clone()).or_default();
        st.running = None;
        for (url, bases) in outcome.bases {
            st.destinations.entry(url).or_default().bases = bases;
        }
        for (url, lag) in &outcome.lags {
            st.destinations.entry(url.clone()).or_default().lag_seconds = *lag;
            self.metrics.lag(&job, url, *lag);
        }
        let mut sampled = false;
        for (url, view) in outcome.views {
            let ds = st.destinations.entry(url.clone()).or_default();
            ds.view_problem = view.problem;
            if let Some(chains) = view.chains {
                ds.chains = chains;
                ds.chains_read = Some(now);
            }
            if let Some(sample) = view.sample {
                let v = self.samples.entry(url).or_default();
                repository::push_sample(v, sample, repository::MAX_SAMPLES);
                sampled = true;
            }
        }
        for d in &record.destinations {
            let ds = st.destinations.entry(d.url.clone()).or_default();
            ds.backoff = backoff.get(&d.url).copied().unwrap_or_default();
            if d.result == RunResult::Success {
                ds.last_success = Some(record.started + d.duration_ms as Millis);
            }
            ds.last_run = Some(LastRun {
                id: record.id,
                trigger: record.trigger,
                started: record.started,
                run: d.clone(),
            });
        }
        st.push_run(record.clone());
        self.save(&job);
        if sampled {
            if let Err(e) = self.state_dir.save_samples(&self.samples) {
                error!("cannot save the repositories' size samples: {e}");
            }
        }
        self.metrics
            .finished(&record, &|url| backoff.get(url).map_or(0, |b| b.failures));
        self.metrics.running(&job, false);
        log_run(&record);
        for w in going.map(|g| g.waiters).unwrap_or_default() {
            let _ = w.send(Ok(record.clone()));
        }
    }

    /// Cancel runs past their timeout, and abandon those that do not end after it.
    pub(super) fn enforce_deadlines(&mut self, now: Millis) {
        let mut stuck = Vec::new();
        for (job, g) in &mut self.going {
            if let Some((at, timeout)) = g.deadline {
                if at <= now && g.cancel.reason().is_none() {
                    warn!(job = %job, run = g.id, "run passed its timeout of {}: cancelling it", format_duration(timeout));
                    g.cancel.cancel(CancelReason::Timeout(timeout));
                    g.cancelled_at = Some(now);
                }
            }
            if g.cancelled_at
                .is_some_and(|c| c + ABANDON_AFTER.as_millis() as Millis <= now)
            {
                stuck.push(job.clone());
            }
        }
        for job in stuck {
            self.abandon(&job, now);
        }
    }

    /// Record a cancelled run that does not end as timed out, and free its job.
    fn abandon(&mut self, job: &str, now: Millis) {
        let Some(g) = self.going.get(job) else {
            return;
        };
        let reason = g.cancel.reason().map(|r| r.to_string()).unwrap_or_default();
        let why = format!(
            "{reason}, and did not stop within {} s (a store that does not answer): abandoned; it can commit nothing more",
            ABANDON_AFTER.as_secs()
        );
        let known = self
            .states
            .get(job)
            .map(|st| {
                st.destinations
                    .iter()
                    .map(|(d, s)| (d.clone(), s.bases.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let outcome = failed_run(
            job,
            g.id,
            g.trigger,
            g.started,
            &g.destinations,
            known,
            &g.cancel,
            &why,
        );
        self.finished(outcome, now);
    }

    /// SIGTERM: cancel every run, refuse new ones, give them the grace period.
    pub(super) fn stop(&mut self, now: Millis) {
        if self.stopping.is_some() {
            return;
        }
        info!(running = self.going.len(), "stopping");
        self.stopping = Some(now + SHUTDOWN_GRACE.as_millis() as Millis);
        for g in self.going.values() {
            g.cancel.cancel(CancelReason::Shutdown);
        }
        for (_, waiters) in std::mem::take(&mut self.waiting) {
            for w in waiters {
                let _ = w.send(Err("the daemon is stopping".into()));
            }
        }
    }

    /// The loop has ended: runs still going are abandoned (their state says so, and the
    /// next start runs their job again at once); the control socket goes.
    pub(super) fn stopped(&mut self) {
        for (job, g) in &self.going {
            warn!(job = %job, run = g.id, "run abandoned at exit: nothing it had not committed is kept; the job runs again at the next start");
        }
        let _ = std::fs::remove_file(&self.config.daemon.control_socket);
        info!("stopped");
    }

    /// SIGHUP: read the config again; a config with a mistake is refused.
    pub(super) fn reload(&mut self, now: Millis) {
        let loaded = match config::load(&self.config_path, self.stores.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                error!("config not reloaded, running on with the previous one: {e}");
                self.config_error = Some(e.to_string());
                return;
            }
        };
        for w in &loaded.warnings {
            warn!("config {}: {w}", self.config_path.display());
        }
        let new = loaded.config;
        let old = &self.config.daemon;
        if new.daemon.state_dir != old.state_dir
            || new.daemon.control_socket != old.control_socket
            || new.daemon.metrics_listen != old.metrics_listen
            || new.daemon.web_token != old.web_token
        {
            warn!("config reloaded, but state_dir, control_socket, metrics_listen and web_token_file change only at a restart");
        }
        if new.daemon.bwlimit != old.bwlimit {
            self.global = new.daemon.bwlimit.map(|r| Arc::new(Bandwidth::new(r)));
        }
        self.apply_jobs(new.jobs.clone(), now);
        self.config = Config {
            daemon: crate::config::DaemonConfig {
                bwlimit: new.daemon.bwlimit,
                ..self.config.daemon.clone()
            },
            jobs: new.jobs,
        };
        self.config_error = None;
        info!(jobs = self.jobs.len(), "config reloaded");
    }

    /// Make `jobs` the configured jobs.
    pub(super) fn apply_jobs(&mut self, jobs: Vec<JobConfig>, now: Millis) {
        let specs = jobs
            .iter()
            .map(|j| JobSpec {
                name: j.name.clone(),
                schedule: j.schedule.clone(),
                destinations: j.destinations.clone(),
            })
            .collect();
        let states = &self.states;
        self.sched.configure(
            specs,
            &|name| states.get(name).map(JobState::recovered),
            now,
        );
        let mut limits = BTreeMap::new();
        for j in &jobs {
            if let Some(rate) = j.bwlimit {
                let b = match self.job_limits.remove(&j.name) {
                    Some(b) if b.rate() == rate => b,
                    _ => Arc::new(Bandwidth::new(rate)),
                };
                limits.insert(j.name.clone(), b);
            }
            let seeds: Vec<DestinationSeed> = j
                .destinations
                .iter()
                .map(|d| {
                    let s = self
                        .states
                        .get(&j.name)
                        .and_then(|st| st.destinations.get(d))
                        .cloned()
                        .unwrap_or_default();
                    DestinationSeed::new(d, s.backoff.failures, s.last_success, s.lag_seconds)
                })
                .collect();
            self.metrics.job(&j.name, &seeds);
        }
        self.job_limits = limits;
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        let removed: Vec<String> = self
            .waiting
            .keys()
            .filter(|j| !names.contains(&j.as_str()))
            .cloned()
            .collect();
        for job in removed {
            for w in self.waiting.remove(&job).unwrap_or_default() {
                let _ = w.send(Err(format!("job {job:?} was removed from the config")));
            }
        }
        self.jobs = jobs
            .into_iter()
            .map(|j| (j.name.clone(), Arc::new(j)))
            .collect();
    }
}

/// One line per run, and one per destination that failed.
fn log_run(r: &RunRecord) {
    let ok = r
        .destinations
        .iter()
        .filter(|d| d.result == RunResult::Success)
        .count();
    let changed: u64 = r.destinations.iter().map(|d| d.changed_bytes).sum();
    let sent: u64 = r.destinations.iter().map(|d| d.sent_bytes).sum();
    let line = format!(
        "run finished: {ok} of {} destinations succeeded in {:.1} s",
        r.destinations.len(),
        r.duration_ms as f64 / 1000.0
    );
    if ok == r.destinations.len() {
        info!(job = %r.job, run = r.id, trigger = r.trigger.as_str(), changed_bytes = changed, sent_bytes = sent, "{line}");
    } else {
        warn!(job = %r.job, run = r.id, trigger = r.trigger.as_str(), changed_bytes = changed, sent_bytes = sent, "{line}");
    }
    for d in r
        .destinations
        .iter()
        .filter(|d| d.result != RunResult::Success)
    {
        error!(job = %r.job, run = r.id, destination = %d.url, result = d.result.as_str(), "{}", d.error.as_deref().unwrap_or("failed"));
    }
    if let Some(e) = &r.source_error {
        error!(job = %r.job, run = r.id, "{e}");
    }
}

/// The outcome of a run that could not run, whose thread panicked (a bug) or that was
/// abandoned: every destination failed with `why` (a timeout if `cancel` says so).
#[allow(clippy::too_many_arguments)]
fn failed_run(
    job: &str,
    id: u64,
    trigger: Trigger,
    started: Millis,
    destinations: &[String],
    known: BTreeMap<String, Bases>,
    cancel: &Cancel,
    why: &str,
) -> RunOutcome {
    RunOutcome {
        record: RunRecord {
            job: job.to_string(),
            id,
            trigger,
            started,
            duration_ms: (now_millis() - started).max(0) as u64,
            snapshot: None,
            source_error: None,
            destinations: destinations
                .iter()
                .map(|d| runner::failed(d, cancel, why.to_string()))
                .collect(),
        },
        bases: known,
        lags: BTreeMap::new(),
        views: BTreeMap::new(),
    }
}
