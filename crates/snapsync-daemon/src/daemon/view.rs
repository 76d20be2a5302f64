//! The status document, from the loop's state.

use super::*;

impl Core {
    pub(super) fn status(&self, now: Millis) -> Status {
        Status {
            version: status::VERSION,
            daemon: DaemonStatus {
                pid: std::process::id(),
                started: self.started,
                now,
                config: self.config_path.display().to_string(),
                metrics_listen: self.metrics_addr.map(|a| a.to_string()),
                config_error: self.config_error.clone(),
            },
            jobs: self
                .config
                .jobs
                .iter()
                .filter_map(|j| self.jobs.get(&j.name))
                .map(|j| self.job_status(j, now))
                .collect(),
            repositories: self.repositories(),
        }
    }

    /// The sampled repository destinations of the configured jobs, each once.
    fn repositories(&self) -> Vec<RepositoryStatus> {
        let mut out: Vec<RepositoryStatus> = Vec::new();
        for url in self.config.jobs.iter().flat_map(|j| &j.destinations) {
            if out.iter().any(|r| &r.url == url) {
                continue;
            }
            if let Some(samples) = self.samples.get(url).filter(|s| !s.is_empty()) {
                out.push(RepositoryStatus {
                    url: url.clone(),
                    samples: samples.clone(),
                });
            }
        }
        out
    }

    /// What `/api/chains?job=NAME` answers.
    pub(super) fn chains(&self, job: &str) -> Option<JobChains> {
        let cfg = self.jobs.get(job)?;
        let st = self.states.get(job);
        let destinations = cfg
            .destinations
            .iter()
            .map(|url| {
                let ds = st
                    .and_then(|s| s.destinations.get(url))
                    .cloned()
                    .unwrap_or_default();
                DestinationChains {
                    url: url.clone(),
                    read: ds.chains_read,
                    problem: ds.view_problem,
                    bases: ds.bases,
                    volumes: ds.chains,
                }
            })
            .collect();
        Some(JobChains {
            version: status::VERSION,
            job: job.to_string(),
            destinations,
        })
    }

    fn job_status(&self, job: &JobConfig, now: Millis) -> JobStatus {
        let view = self.sched.view(&job.name);
        let empty = JobState::default();
        let st = self.states.get(&job.name).unwrap_or(&empty);
        let running = self.going.get(&job.name).map(|g| {
            let (processed_bytes, sent_bytes) = runner::progress(&g.counters);
            RunningStatus {
                id: g.id,
                trigger: g.trigger,
                started: g.started,
                destinations: g.destinations.clone(),
                processed_bytes,
                sent_bytes,
                cancelling: g.cancel.reason().map(|r| r.to_string()),
            }
        });
        let destinations = job
            .destinations
            .iter()
            .map(|url| {
                let ds = st.destinations.get(url).cloned().unwrap_or_default();
                let backoff = view
                    .as_ref()
                    .and_then(|v| v.backoff.get(url).copied())
                    .unwrap_or(ds.backoff);
                DestinationStatus {
                    url: url.clone(),
                    last_run: ds.last_run,
                    last_success: ds.last_success,
                    lag_seconds: ds.lag_seconds,
                    consecutive_failures: backoff.failures,
                    next_retry: backoff.retry_at,
                    bases: ds.bases,
                }
            })
            .collect();
        JobStatus {
            name: job.name.clone(),
            source: job.source.clone(),
            schedule: job.schedule.to_string(),
            interval_seconds: job.schedule.interval(now).as_secs_f64(),
            timeout_seconds: job.timeout.map(|t| t.as_secs_f64()),
            next_run: view.as_ref().and_then(|v| v.next_slot),
            running,
            run_requested: view.as_ref().is_some_and(|v| v.manual_pending),
            skipped_runs: st.skipped_runs,
            destinations,
            recent_runs: st
                .runs
                .iter()
                .rev()
                .take(status::RECENT_RUNS)
                .cloned()
                .collect(),
        }
    }
}
