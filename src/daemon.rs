//! `snapsync daemon`, `status` and `run-job`: the edge of the `snapsync-daemon` crate.
//! Here are only what the crate leaves to its caller: opening stores from URLs (with
//! the same environment as every other command), signals, and printing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use snapsync::{AnyStore, StoreUrl};
use snapsync_core::Timestamp;
use snapsync_daemon::config::{self, DestinationKind, SourceKind, UrlCheck};
use snapsync_daemon::control::{self, Request};
use snapsync_daemon::record::{rfc3339, RunRecord, RunResult};
use snapsync_daemon::status::Status;
use snapsync_daemon::stores::{BoxError, JobDestination, JobSource, Stores};
use snapsync_daemon::units::human_bytes;
use snapsync_repo::Repository;
use snapsync_store::view::RepositoryView;
use snapsync_store::{SnapshotSink, SnapshotSource, StoreError};

use crate::stores::ClientArgs;

/// Stores opened as the command line opens them: `SNAPSYNC_TOKEN`, `SNAPSYNC_CA`,
/// `SNAPSYNC_RETRY_TIMEOUT_SECS` and the others apply to the daemon's jobs too.
#[derive(Debug)]
struct CliStores;

impl UrlCheck for CliStores {
    fn source(&self, url: &str) -> Result<SourceKind, String> {
        match StoreUrl::parse(url).map_err(|e| e.to_string())? {
            StoreUrl::Qemu { .. } => Ok(SourceKind::Checkpoints),
            _ => Ok(SourceKind::Listed),
        }
    }

    fn destination(&self, url: &str) -> Result<DestinationKind, String> {
        match StoreUrl::parse(url).map_err(|e| e.to_string())? {
            StoreUrl::Repo(_) => Ok(DestinationKind::Repository),
            StoreUrl::Remote(_) => Ok(DestinationKind::Remote),
            _ => Err(format!(
                "{url:?} is a source only: a destination is a repository (a path, file://, s3://) or a snapsync:// store"
            )),
        }
    }

    fn identity(&self, url: &str) -> String {
        match StoreUrl::parse(url) {
            Ok(StoreUrl::Repo(location)) => location.to_string(),
            _ => url.to_string(),
        }
    }
}

impl Stores for CliStores {
    fn open_source(&self, url: &str) -> Result<Box<dyn JobSource>, BoxError> {
        Ok(Box::new(AnySource(ClientArgs::default().open(url)?)))
    }

    fn open_destination(&self, url: &str) -> Result<Box<dyn JobDestination>, BoxError> {
        let store = ClientArgs::default().open(url)?;
        store.sink()?;
        Ok(Box::new(AnyDestination(store)))
    }
}

/// Any store as a job's source; a running VM's checkpoints are taken and cleaned up.
struct AnySource(AnyStore);

impl JobSource for AnySource {
    fn source(&self) -> &dyn SnapshotSource {
        self.0.source()
    }

    fn take_snapshot(
        &mut self,
        volumes: &[String],
        name: &str,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        match &mut self.0 {
            AnyStore::Qemu(q) => q.take_checkpoints(volumes, name, at).map(|()| true),
            _ => Ok(false),
        }
    }

    fn interrupter(&self) -> Option<Box<dyn Fn() + Send + Sync>> {
        match &self.0 {
            AnyStore::Qemu(q) => {
                let i = q.interrupter();
                Some(Box::new(move || i.interrupt()))
            }
            _ => None,
        }
    }

    fn finish(&mut self, keep_at_least: usize) -> Result<(), StoreError> {
        if let AnyStore::Qemu(q) = &mut self.0 {
            q.set_keep_checkpoints(keep_at_least.max(snapsync_qemu::DEFAULT_KEEP_CHECKPOINTS));
            q.finish()?;
        }
        Ok(())
    }
}

/// A repository or a `snapsync://` store as a job's destination.
struct AnyDestination(AnyStore);

impl JobDestination for AnyDestination {
    fn sink(&self) -> &dyn SnapshotSink {
        self.0.sink().expect("checked when opened")
    }

    fn repository(&self) -> Option<&Repository> {
        self.0.repository().ok()
    }

    fn view(&self) -> Option<&dyn RepositoryView> {
        self.0.view()
    }
}

/// `snapsync daemon --config FILE [--check]`.
pub fn daemon(config_path: &Path, check: bool) -> Result<ExitCode> {
    if check {
        let loaded = config::load(config_path, &CliStores)?;
        for w in &loaded.warnings {
            eprintln!("warning: {}: {w}", config_path.display());
        }
        println!(
            "{}: ok, {} jobs",
            config_path.display(),
            loaded.config.jobs.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let d = snapsync_daemon::Daemon::start(config_path, Arc::new(CliStores))?;
    let handle = d.handle();
    let stop = handle.clone();
    crate::signals::watch(move || handle.reload(), move || stop.shutdown())?;
    // One line on stdout when ready: scripts and tests wait for it.
    println!(
        "snapsync: daemon running {} jobs; control socket {}{}",
        d.jobs(),
        d.control_socket().display(),
        d.metrics_addr()
            .map(|a| format!("; metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    d.run()?;
    Ok(ExitCode::SUCCESS)
}

fn socket(config_path: Option<&Path>) -> Result<PathBuf> {
    let path = config_path.unwrap_or(Path::new(config::DEFAULT_CONFIG));
    Ok(config::control_socket(path)?)
}

/// `snapsync status [--config FILE] [--json]`.
pub fn status(config_path: Option<&Path>, json: bool) -> Result<ExitCode> {
    let reply = control::request(&socket(config_path)?, &Request::Status)?;
    let status = reply.status.context("the daemon sent no status")?;
    if json {
        println!("{}", serde_json::to_string(&status).expect("serialisable"));
    } else {
        print_status(&status);
    }
    Ok(ExitCode::SUCCESS)
}

/// `snapsync run-job NAME [--config FILE] [--json]`: exits 0 when every destination
/// succeeded, 1 otherwise.
pub fn run_job(name: &str, config_path: Option<&Path>, json: bool) -> Result<ExitCode> {
    let request = Request::RunJob {
        job: name.to_string(),
    };
    let reply = control::request(&socket(config_path)?, &request)?;
    let run = reply.run.context("the daemon sent no run")?;
    if json {
        println!("{}", serde_json::to_string(&run).expect("serialisable"));
    } else {
        print_run(&run);
    }
    if run.succeeded() {
        Ok(ExitCode::SUCCESS)
    } else {
        if !json {
            let failed: Vec<&str> = run
                .destinations
                .iter()
                .filter(|d| d.result != RunResult::Success)
                .map(|d| d.url.as_str())
                .collect();
            eprintln!(
                "snapsync: error: job {name:?} run {} failed for {}",
                run.id,
                failed.join(", ")
            );
        }
        Ok(ExitCode::from(1))
    }
}

fn lag(seconds: Option<f64>) -> String {
    match seconds {
        None => "lag unknown".into(),
        Some(s) => format!(
            "lag {}",
            snapsync_daemon::units::format_duration(std::time::Duration::from_secs(s as u64))
        ),
    }
}

fn print_run(run: &RunRecord) {
    println!(
        "job {:?} run {} ({}): {:.1} s",
        run.job,
        run.id,
        run.trigger.as_str(),
        run.duration_ms as f64 / 1000.0
    );
    for d in &run.destinations {
        println!(
            "  {:<40} {:<9} {} snapshots, changed {}, sent {}, {}{}",
            d.url,
            d.result.as_str(),
            d.snapshots,
            human_bytes(d.changed_bytes),
            human_bytes(d.sent_bytes),
            lag(d.lag_seconds),
            d.error
                .as_ref()
                .map(|e| format!("\n    error: {e}"))
                .unwrap_or_default()
        );
    }
}

fn print_status(s: &Status) {
    if s.jobs.is_empty() {
        println!("no jobs");
    }
    if let Some(e) = &s.daemon.config_error {
        println!("config not reloaded: {e}");
    }
    for j in &s.jobs {
        let running = j
            .running
            .as_ref()
            .map(|r| {
                format!(
                    ", running since {} (run {})",
                    rfc3339::format(r.started),
                    r.id
                )
            })
            .unwrap_or_default();
        println!(
            "{}  {}  next run {}{running}, {} skipped",
            j.name,
            j.schedule,
            j.next_run.map_or("-".into(), rfc3339::format),
            j.skipped_runs
        );
        for d in &j.destinations {
            let last = d.last_run.as_ref().map_or("never run".to_string(), |r| {
                format!(
                    "{} at {} ({:.1} s, changed {}, sent {})",
                    r.run.result.as_str(),
                    rfc3339::format(r.started),
                    r.run.duration_ms as f64 / 1000.0,
                    human_bytes(r.run.changed_bytes),
                    human_bytes(r.run.sent_bytes)
                )
            });
            let retry = d
                .next_retry
                .map(|t| {
                    format!(
                        ", {} failures, retry at {}",
                        d.consecutive_failures,
                        rfc3339::format(t)
                    )
                })
                .unwrap_or_default();
            println!("  {:<40} {last}, {}{retry}", d.url, lag(d.lag_seconds));
            if let Some(e) = d.last_run.as_ref().and_then(|r| r.run.error.as_ref()) {
                println!("    error: {e}");
            }
        }
    }
}
