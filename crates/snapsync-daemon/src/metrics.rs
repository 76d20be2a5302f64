//! Prometheus metrics (OpenMetrics text, `prometheus-client`), served at `/metrics`.
//!
//! Counters start at zero with the process, as Prometheus expects (its `rate()` and
//! `increase()` handle resets); gauges that describe the replicated data rather than
//! the process (last success, lag, failures in a row) are seeded from the state
//! directory at start, so an alert on them does not clear because the daemon restarted.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::record::{RunRecord, RunResult};
use crate::schedule::Millis;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_prometheus`]'s text.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabels {
    job: String,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    job: String,
    destination: String,
    result: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<DestLabels, Histogram, fn() -> Histogram>;

/// Run durations: from a second to a day.
fn duration_histogram() -> Histogram {
    Histogram::new([
        1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0,
        86400.0,
    ])
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<ResultLabels, Counter>,
    last_success: Family<DestLabels, FloatGauge>,
    duration: HistogramFamily,
    changed: Family<DestLabels, Counter>,
    sent: Family<DestLabels, Counter>,
    lag: Family<DestLabels, FloatGauge>,
    failures: Family<DestLabels, Gauge>,
    running: Family<JobLabels, Gauge>,
    skipped: Family<JobLabels, Counter>,
    next_run: Family<JobLabels, FloatGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn dest(job: &str, destination: &str) -> DestLabels {
    DestLabels {
        job: job.to_string(),
        destination: destination.to_string(),
    }
}

fn job_labels(job: &str) -> JobLabels {
    JobLabels {
        job: job.to_string(),
    }
}

fn seconds(t: Millis) -> f64 {
    t as f64 / 1000.0
}

impl Metrics {
    /// Every metric, registered and empty.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            runs: Family::default(),
            last_success: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            changed: Family::default(),
            sent: Family::default(),
            lag: Family::default(),
            failures: Family::default(),
            running: Family::default(),
            skipped: Family::default(),
            next_run: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "snapsync_job_runs",
            "Runs per job and destination, by result (success, failure, timeout, cancelled)",
            m.runs.clone(),
        );
        registry.register(
            "snapsync_job_last_success_timestamp_seconds",
            "When a run last succeeded for the destination (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "snapsync_job_duration_seconds",
            "Wall time of each destination's part of a run",
            m.duration.clone(),
        );
        registry.register(
            "snapsync_changed_bytes",
            "Bytes the source reported changed in the snapshots replicated",
            m.changed.clone(),
        );
        registry.register(
            "snapsync_sent_bytes",
            "Bytes stored at or sent to the destination, after dedup and compression",
            m.sent.clone(),
        );
        registry.register(
            "snapsync_replication_lag_seconds",
            "How much older the newest snapshot at the destination is than the source's newest",
            m.lag.clone(),
        );
        registry.register(
            "snapsync_destination_consecutive_failures",
            "Failed runs in a row for the destination",
            m.failures.clone(),
        );
        registry.register(
            "snapsync_job_running",
            "Whether a run of the job is going on",
            m.running.clone(),
        );
        registry.register(
            "snapsync_job_skipped_runs",
            "Scheduled runs skipped because the previous run was still going",
            m.skipped.clone(),
        );
        registry.register(
            "snapsync_job_next_run_timestamp_seconds",
            "When the job's schedule next runs it (Unix time)",
            m.next_run.clone(),
        );
        Self { registry, ..m }
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// The metrics in Prometheus' own text format (0.0.4), for scrapers that do not ask
    /// for OpenMetrics (`promtool check metrics`, `curl`): the same samples, with a
    /// counter's family named as its samples are (`x_total`) and no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// A job is configured: its series exist from now on (at zero), and its gauges
    /// start from what the state directory says.
    pub fn job(&self, job: &str, destinations: &[DestinationSeed]) {
        let _ = self.running.get_or_create(&job_labels(job));
        let _ = self.skipped.get_or_create(&job_labels(job));
        for d in destinations {
            let l = dest(job, &d.url);
            for r in RunResult::ALL {
                let _ = self.runs.get_or_create(&ResultLabels {
                    job: job.to_string(),
                    destination: d.url.clone(),
                    result: r.as_str().to_string(),
                });
            }
            let _ = self.changed.get_or_create(&l);
            let _ = self.sent.get_or_create(&l);
            self.failures.get_or_create(&l).set(i64::from(d.failures));
            if let Some(t) = d.last_success {
                self.last_success.get_or_create(&l).set(seconds(t));
            }
            if let Some(lag) = d.lag_seconds {
                self.lag.get_or_create(&l).set(lag);
            }
        }
    }

    /// A run of `job` started (`true`) or ended.
    pub fn running(&self, job: &str, running: bool) {
        self.running
            .get_or_create(&job_labels(job))
            .set(i64::from(running));
    }

    /// A slot of `job` was skipped.
    pub fn skipped(&self, job: &str) {
        self.skipped.get_or_create(&job_labels(job)).inc();
    }

    /// When `job` runs next.
    pub fn next_run(&self, job: &str, at: Option<Millis>) {
        match at {
            Some(t) => {
                self.next_run
                    .get_or_create(&job_labels(job))
                    .set(seconds(t));
            }
            None => {
                self.next_run.remove(&job_labels(job));
            }
        }
    }

    /// A run ended: count it for each destination it included.
    pub fn finished(&self, run: &RunRecord, failures: &dyn Fn(&str) -> u32) {
        let end = run.started + run.duration_ms as Millis;
        for d in &run.destinations {
            let l = dest(&run.job, &d.url);
            self.runs
                .get_or_create(&ResultLabels {
                    job: run.job.clone(),
                    destination: d.url.clone(),
                    result: d.result.as_str().to_string(),
                })
                .inc();
            self.duration
                .get_or_create(&l)
                .observe(d.duration_ms as f64 / 1000.0);
            self.changed.get_or_create(&l).inc_by(d.changed_bytes);
            self.sent.get_or_create(&l).inc_by(d.sent_bytes);
            if d.result == RunResult::Success {
                self.last_success.get_or_create(&l).set(seconds(end));
            }
            self.failures
                .get_or_create(&l)
                .set(i64::from(failures(&d.url)));
        }
    }

    /// A destination's lag.
    pub fn lag(&self, job: &str, destination: &str, lag_seconds: Option<f64>) {
        let l = dest(job, destination);
        match lag_seconds {
            Some(s) => {
                self.lag.get_or_create(&l).set(s);
            }
            None => {
                self.lag.remove(&l);
            }
        }
    }
}

/// OpenMetrics text as Prometheus text 0.0.4. The two differ, for what is encoded
/// here, only in a counter family's name (OpenMetrics names it without `_total`, its
/// samples with) and the closing `# EOF`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What the state directory says of a destination, for [`Metrics::job`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DestinationSeed {
    /// The destination's URL.
    pub url: String,
    /// Failed runs in a row.
    pub failures: u32,
    /// Last success.
    pub last_success: Option<Millis>,
    /// Lag after the last run.
    pub lag_seconds: Option<f64>,
}

impl DestinationSeed {
    /// A seed for `url`.
    pub fn new(
        url: &str,
        failures: u32,
        last_success: Option<Millis>,
        lag_seconds: Option<f64>,
    ) -> Self {
        Self {
            url: url.to_string(),
            failures,
            last_success,
            lag_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DestinationRun;
    use crate::scheduler::Trigger;

    #[test]
    fn the_issues_names_are_there() {
        let m = Metrics::new();
        m.job(
            "vm101",
            &[DestinationSeed::new(
                "/backup/repo",
                0,
                Some(1_000),
                Some(2.5),
            )],
        );
        m.running("vm101", true);
        m.skipped("vm101");
        m.next_run("vm101", Some(60_000));
        m.finished(
            &RunRecord {
                job: "vm101".into(),
                id: 1,
                trigger: Trigger::Scheduled,
                started: 1_000,
                duration_ms: 2_000,
                snapshot: None,
                source_error: None,
                destinations: vec![DestinationRun {
                    url: "/backup/repo".into(),
                    result: RunResult::Success,
                    error: None,
                    snapshots: 1,
                    changed_bytes: 100,
                    sent_bytes: 40,
                    duration_ms: 2_000,
                    lag_seconds: Some(0.0),
                    pruned: vec![],
                    retention_held: vec![],
                }],
            },
            &|_| 0,
        );
        let text = m.encode();
        for line in [
            "snapsync_job_runs_total{job=\"vm101\",destination=\"/backup/repo\",result=\"success\"} 1",
            "snapsync_job_runs_total{job=\"vm101\",destination=\"/backup/repo\",result=\"failure\"} 0",
            "snapsync_job_last_success_timestamp_seconds{job=\"vm101\",destination=\"/backup/repo\"} 3.0",
            "snapsync_job_duration_seconds_count{job=\"vm101\",destination=\"/backup/repo\"} 1",
            "snapsync_changed_bytes_total{job=\"vm101\",destination=\"/backup/repo\"} 100",
            "snapsync_sent_bytes_total{job=\"vm101\",destination=\"/backup/repo\"} 40",
            "snapsync_replication_lag_seconds{job=\"vm101\",destination=\"/backup/repo\"} 2.5",
            "snapsync_job_running{job=\"vm101\"} 1",
            "snapsync_job_skipped_runs_total{job=\"vm101\"} 1",
            "snapsync_job_next_run_timestamp_seconds{job=\"vm101\"} 60.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let prom = m.encode_prometheus();
        assert!(
            prom.contains("# TYPE snapsync_job_runs_total counter\n"),
            "{prom}"
        );
        assert!(
            prom.contains("# TYPE snapsync_job_running gauge\n"),
            "{prom}"
        );
        assert!(!prom.contains("# EOF"));
    }
}
