//! The daemon's TOML config: parsed strictly, every mistake reported with its line and
//! field, so that `snapsync daemon --check` and a reload on SIGHUP can say exactly what
//! to fix.
//!
//! Parsing goes through a raw form whose fields that need checks across the file (job
//! names, URLs, retention) keep their byte spans ([`toml::Spanned`]); values with a
//! syntax of their own (schedules, rates, durations) parse inside deserialization, so
//! that toml attaches the span of the offending value to their error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use snapsync_core::KeepPolicy;
use toml::Spanned;

use crate::schedule::Schedule;
use crate::units::{parse_duration, Rate};
use crate::web::{self, WebToken};

/// Where the control socket is when the config does not say.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/snapsync/control.sock";
/// Where `snapsync status` and `run-job` look for the config without `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/snapsync/snapsync.toml";

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The `[[job]]` tables, in file order.
    pub jobs: Vec<JobConfig>,
}

/// The `[daemon]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DaemonConfig {
    /// Run history and each destination's known base, kept across restarts.
    pub state_dir: PathBuf,
    /// The unix socket `snapsync status` and `run-job` talk to.
    pub control_socket: PathBuf,
    /// Where `/metrics` (and the status page) is served over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The token that opens the status page on a non-loopback `metrics_listen`
    /// (`web_token_file`, read when the config is).
    pub web_token: Option<WebToken>,
    /// A limit on the bytes all jobs together send.
    pub bwlimit: Option<Rate>,
}

/// One `[[job]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobConfig {
    /// Its name: in status, metrics labels and `run-job`.
    pub name: String,
    /// The source store's URL.
    pub source: String,
    /// The volumes replicated; all when empty.
    pub volumes: Vec<String>,
    /// When it runs.
    pub schedule: Schedule,
    /// Destination URLs, each replicated to against its own base.
    pub destinations: Vec<String>,
    /// A limit on the bytes this job sends (to all its destinations together).
    pub bwlimit: Option<Rate>,
    /// A run still going after this long is cancelled.
    pub timeout: Option<Duration>,
    /// What each repository destination keeps after a run.
    pub retention: Option<Retention>,
    /// Facts about the URLs, from the caller's [`UrlCheck`].
    pub source_kind: SourceKind,
}

/// `[job.retention]`: the prune flags, applied to each repository destination after
/// every run. There is no `force`: a destination's replication base is always kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// The `keep_*` rules.
    pub policy: KeepPolicy,
    /// Also run `gc` after a prune that removed snapshots (space is only freed then).
    pub gc: bool,
}

/// What the caller says a source URL is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceKind {
    /// Snapshots made by someone else (raw, qcow2, a repository, a remote store).
    #[default]
    Listed,
    /// Snapshots snapsync takes and removes itself (a running VM's checkpoints): each
    /// run takes one, and the source keeps what destinations still need as a base.
    Checkpoints,
}

/// What the caller says a destination URL is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationKind {
    /// A repository this process can prune (`file://`, `s3://`, a path).
    Repository,
    /// A store behind a server (`snapsync://`): pruned on its server, not from here.
    Remote,
}

/// Checks URLs while a config is parsed. The daemon crate does not know the URL syntax
/// of every store (that is the `snapsync` library's), so the caller passes it in.
pub trait UrlCheck {
    /// Whether `url` can be a source, and which kind.
    fn source(&self, url: &str) -> Result<SourceKind, String>;
    /// Whether `url` can be a destination, and which kind.
    fn destination(&self, url: &str) -> Result<DestinationKind, String>;
    /// A canonical name of the store `url` names, so that a job whose source is another
    /// job's destination is recognised however each URL is written.
    fn identity(&self, url: &str) -> String {
        url.to_string()
    }
}

/// A mistake (or, as a warning, a doubt) in a config file, at a line and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, {field}: {message}")]
#[non_exhaustive]
pub struct Finding {
    /// 1-based line.
    pub line: usize,
    /// The field, as a dotted path (`job.schedule`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a config cannot be used.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is wrong at a line.
    #[error("config {path}: {finding}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where and what.
        finding: Finding,
    },
}

/// A parsed config, with the doubts worth logging.
#[derive(Debug)]
#[non_exhaustive]
pub struct Loaded {
    /// The config.
    pub config: Config,
    /// Things that work but are probably not what was meant.
    pub warnings: Vec<Finding>,
}

/// Read and check the config at `path`. Relative paths in it are relative to its
/// directory.
pub fn load(path: &Path, urls: &dyn UrlCheck) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, urls).map_err(|finding| ConfigError::Invalid {
        path: path.to_path_buf(),
        finding,
    })
}

/// Only the control socket of the config at `path`, for `status` and `run-job`: they
/// must work while the file holds an edit the running daemon has not taken (or refused).
pub fn control_socket(path: &Path) -> Result<PathBuf, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    #[derive(Deserialize)]
    struct Outer {
        daemon: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        control_socket: Option<PathBuf>,
    }
    let socket = match toml::from_str::<Outer>(&text) {
        Ok(outer) => outer.daemon.control_socket,
        // A file an edit broke: the line that names the socket still does.
        Err(e) => Some(
            control_socket_line(&text).ok_or_else(|| ConfigError::Invalid {
                path: path.to_path_buf(),
                finding: finding_from_toml(&text, &e),
            })?,
        ),
    }
    .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    Ok(path.parent().unwrap_or(Path::new(".")).join(socket))
}

/// The value of a `control_socket = "..."` line, read without a TOML parser.
fn control_socket_line(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "control_socket").then(|| value.trim().trim_matches('"').into())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: RawDaemon,
    #[serde(default)]
    job: Vec<Spanned<RawJob>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_dir: PathBuf,
    control_socket: Option<PathBuf>,
    metrics_listen: Option<Listen>,
    web_token_file: Option<Spanned<PathBuf>>,
    bwlimit: Option<FromText<Rate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    source: Spanned<String>,
    volumes: Option<Vec<Spanned<String>>>,
    schedule: FromText<Schedule>,
    destinations: Spanned<Vec<Spanned<String>>>,
    bwlimit: Option<FromText<Rate>>,
    timeout: Option<Timeout>,
    retention: Option<Spanned<RawRetention>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    #[serde(default)]
    keep_last: u32,
    #[serde(default)]
    keep_hourly: u32,
    #[serde(default)]
    keep_daily: u32,
    #[serde(default)]
    keep_weekly: u32,
    #[serde(default)]
    keep_monthly: u32,
    #[serde(default)]
    gc: bool,
    force: Option<Spanned<bool>>,
}

/// A value parsed from a string by its `FromStr`, whose error becomes a toml error at
/// the value's span.
struct FromText<T>(T);

impl<'de, T: std::str::FromStr<Err = String>> Deserialize<'de> for FromText<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(FromText).map_err(serde::de::Error::custom)
    }
}

struct Timeout(Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Timeout)
            .map_err(serde::de::Error::custom)
    }
}

struct Listen(SocketAddr);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parsed = match s.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}").parse(),
            None => s.parse(),
        };
        parsed.map(Listen).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not an address to listen on: write IP:PORT, such as \"127.0.0.1:9811\""
            ))
        })
    }
}

/// Parse and check config `text`; relative paths are relative to `base`.
pub fn parse(text: &str, base: &Path, urls: &dyn UrlCheck) -> Result<Loaded, Finding> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| finding_from_toml(text, &e))?;
    let at = |span: std::ops::Range<usize>, field: &str, message: String| Finding {
        line: line_of(text, span.start),
        field: field.to_string(),
        message,
    };
    let mut warnings = Vec::new();
    let web_token = match &raw.daemon.web_token_file {
        Some(f) => Some(
            WebToken::load(&base.join(f.get_ref()))
                .map_err(|e| at(f.span(), "daemon.web_token_file", e))?,
        ),
        None => None,
    };
    if let Some(addr) = raw.daemon.metrics_listen.as_ref().map(|l| l.0) {
        if !web::is_loopback(addr) && web_token.is_none() {
            warnings.push(Finding {
                line: line_of(text, text.find("metrics_listen").unwrap_or(0)),
                field: "daemon.metrics_listen".into(),
                message: format!("{addr} is not a loopback address: /metrics is served there, the status page and /api only with web_token_file"),
            });
        }
    }
    let daemon = DaemonConfig {
        state_dir: base.join(raw.daemon.state_dir),
        control_socket: base.join(
            raw.daemon
                .control_socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
        ),
        metrics_listen: raw.daemon.metrics_listen.map(|l| l.0),
        web_token,
        bwlimit: raw.daemon.bwlimit.map(|r| r.0),
    };
    let mut jobs: Vec<JobConfig> = Vec::new();
    for job in raw.job {
        let job_span = job.span();
        let job = job.into_inner();
        let name = job.name.get_ref().clone();
        if let Err(e) = snapsync_core::validate_name("job", &name) {
            return Err(at(job.name.span(), "job.name", e.to_string()));
        }
        if jobs.iter().any(|j| j.name == name) {
            return Err(at(
                job.name.span(),
                "job.name",
                format!("a second job named {name:?}: job names are unique"),
            ));
        }
        let checked = check_job(job, &name, &at, urls, &mut warnings)?;
        if checked.timeout.is_none() {
            warnings.push(at(
                job_span.clone(),
                "job.timeout",
                format!("job {name:?} has no timeout: a run that hangs (a stalled network, a stopped server) holds the job until it ends"),
            ));
        }
        jobs.push(checked);
    }
    Ok(Loaded {
        config: Config { daemon, jobs },
        warnings,
    })
}

type At<'a> = dyn Fn(std::ops::Range<usize>, &str, String) -> Finding + 'a;

/// Check one job's fields against each other and the URL syntax.
fn check_job(
    job: RawJob,
    name: &str,
    at: &At<'_>,
    urls: &dyn UrlCheck,
    warnings: &mut Vec<Finding>,
) -> Result<JobConfig, Finding> {
    let source_kind = urls
        .source(job.source.get_ref())
        .map_err(|e| at(job.source.span(), "job.source", e))?;
    let mut volumes = Vec::new();
    for v in job.volumes.unwrap_or_default() {
        snapsync_core::validate_name("volume", v.get_ref())
            .map_err(|e| at(v.span(), "job.volumes", e.to_string()))?;
        volumes.push(v.into_inner());
    }
    let list_span = job.destinations.span();
    let mut destinations: Vec<String> = Vec::new();
    let mut remote = Vec::new();
    for d in job.destinations.into_inner() {
        let kind = urls
            .destination(d.get_ref())
            .map_err(|e| at(d.span(), "job.destinations", e))?;
        if destinations.contains(d.get_ref()) {
            return Err(at(
                d.span(),
                "job.destinations",
                format!("{:?} is listed twice", d.get_ref()),
            ));
        }
        if urls.identity(d.get_ref()) == urls.identity(job.source.get_ref()) {
            return Err(at(
                d.span(),
                "job.destinations",
                format!("{:?} is the job's source", d.get_ref()),
            ));
        }
        if kind == DestinationKind::Remote {
            remote.push((d.span(), d.get_ref().clone()));
        }
        destinations.push(d.into_inner());
    }
    if destinations.is_empty() {
        return Err(at(
            list_span,
            "job.destinations",
            format!("job {name:?} has no destinations"),
        ));
    }
    let retention = match job.retention {
        None => None,
        Some(r) => {
            for (span, url) in &remote {
                warnings.push(at(
                    span.clone(),
                    "job.destinations",
                    format!("{url:?} is pruned on its server, not by this daemon: job {name:?}'s retention skips it"),
                ));
            }
            Some(check_retention(r, at)?)
        }
    };
    Ok(JobConfig {
        name: name.to_string(),
        source: job.source.into_inner(),
        volumes,
        schedule: job.schedule.0,
        destinations,
        bwlimit: job.bwlimit.map(|r| r.0),
        timeout: job.timeout.map(|t| t.0),
        retention,
        source_kind,
    })
}

/// `[job.retention]`: no `force`, and at least one rule.
fn check_retention(r: Spanned<RawRetention>, at: &At<'_>) -> Result<Retention, Finding> {
    let span = r.span();
    let r = r.into_inner();
    if let Some(f) = r.force {
        return Err(at(
            f.span(),
            "job.retention.force",
            "there is no force here: retention always keeps each destination's replication base"
                .into(),
        ));
    }
    let policy = KeepPolicy {
        last: r.keep_last,
        hourly: r.keep_hourly,
        daily: r.keep_daily,
        weekly: r.keep_weekly,
        monthly: r.keep_monthly,
    };
    if policy.is_empty() {
        return Err(at(
            span,
            "job.retention",
            "no keep_* rule: retention would remove every snapshot but the replication base; set at least one (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)".into(),
        ));
    }
    Ok(Retention { policy, gc: r.gc })
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A toml error as a [`Finding`]: its line, and the field named by the key on that line
/// (or above it, in a value spread over lines) under the nearest table header.
fn finding_from_toml(text: &str, e: &toml::de::Error) -> Finding {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return Finding {
            line: 1,
            field: "(file)".into(),
            message,
        };
    };
    let line = line_of(text, span.start);
    let lines: Vec<&str> = text.lines().collect();
    let mut key = None;
    let mut table = None;
    for l in lines[..line.min(lines.len())].iter().rev() {
        let t = l.trim();
        if t.starts_with('[') {
            table = Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_string());
            break;
        }
        if key.is_none() {
            if let Some((k, _)) = t.split_once('=') {
                key = Some(k.trim().trim_matches('"').to_string());
            }
        }
    }
    // "missing field `x`" points at the table: name the field it wants.
    if key.is_none() {
        key = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .map(str::to_string);
    }
    let field = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (Some(t), None) => t,
        (None, Some(k)) => k,
        (None, None) => "(top level)".into(),
    };
    Finding {
        line,
        field,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts any URL; `snapsync://` ones are remote, `qemu://` ones take checkpoints.
    struct AnyUrl;

    impl UrlCheck for AnyUrl {
        fn source(&self, url: &str) -> Result<SourceKind, String> {
            if url.starts_with("bad:") {
                return Err(format!("{url:?} has an unknown scheme"));
            }
            Ok(if url.starts_with("qemu:") {
                SourceKind::Checkpoints
            } else {
                SourceKind::Listed
            })
        }
        fn destination(&self, url: &str) -> Result<DestinationKind, String> {
            if url.starts_with("raw:") {
                return Err(format!("{url:?} is a source only"));
            }
            Ok(if url.starts_with("snapsync://") {
                DestinationKind::Remote
            } else {
                DestinationKind::Repository
            })
        }
    }

    const GOOD: &str = r#"
[daemon]
state_dir = "/var/lib/snapsync"
control_socket = "/run/snapsync/control.sock"
metrics_listen = "127.0.0.1:9811"
bwlimit = "200MiB/s"

[[job]]
name = "vm101"
source = "qemu:///run/vm101.qmp"
volumes = ["disk0"]
schedule = "*/15 * * * *"
destinations = ["/backup/repo", "s3://bucket/repo", "snapsync://dr:7070/repo"]
bwlimit = "50MiB/s"
timeout = "6h"
[job.retention]
keep_last = 24
keep_daily = 14

[[job]]
name = "images"
source = "raw:/var/lib/images"
schedule = "every 30s"
destinations = [
    "/backup/repo",
]
"#;

    fn parse_str(text: &str) -> Result<Loaded, Finding> {
        parse(text, Path::new("/etc/snapsync"), &AnyUrl)
    }

    fn err(text: &str) -> Finding {
        parse_str(text).expect_err("an error")
    }

    #[test]
    fn the_issue_example_parses() {
        let loaded = parse_str(GOOD).unwrap();
        let c = &loaded.config;
        assert_eq!(c.daemon.state_dir, Path::new("/var/lib/snapsync"));
        assert_eq!(
            c.daemon.metrics_listen,
            Some("127.0.0.1:9811".parse().unwrap())
        );
        assert_eq!(c.daemon.bwlimit, Rate::new(200 << 20));
        assert_eq!(c.jobs.len(), 2);
        let j = &c.jobs[0];
        assert_eq!(j.name, "vm101");
        assert_eq!(j.volumes, ["disk0"]);
        assert_eq!(j.destinations.len(), 3);
        assert_eq!(j.timeout, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(j.source_kind, SourceKind::Checkpoints);
        let r = j.retention.unwrap();
        assert_eq!((r.policy.last, r.policy.daily, r.gc), (24, 14, false));
        assert_eq!(c.jobs[1].schedule.to_string(), "every 30s");
        // The remote destination is not pruned from here; the second job has no timeout.
        let w: Vec<_> = loaded
            .warnings
            .iter()
            .map(|w| (w.line, w.field.as_str()))
            .collect();
        assert_eq!(w, [(13, "job.destinations"), (20, "job.timeout")]);
    }

    #[test]
    fn relative_paths_are_relative_to_the_config() {
        let text = "[daemon]\nstate_dir = \"state\"\ncontrol_socket = \"run/c.sock\"\n";
        let c = parse_str(text).unwrap().config;
        assert_eq!(c.daemon.state_dir, Path::new("/etc/snapsync/state"));
        assert_eq!(
            c.daemon.control_socket,
            Path::new("/etc/snapsync/run/c.sock")
        );
    }

    /// Replace `from` by `to` in the good config and return the error.
    fn broken(from: &str, to: &str) -> Finding {
        assert!(GOOD.contains(from), "{from}");
        err(&GOOD.replacen(from, to, 1))
    }

    #[test]
    fn mistakes_name_their_line_and_field() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            ("*/15 * * * *", "*/15 * * *", 12, "job.schedule", "5 fields"),
            (
                "every 30s",
                "every 30",
                23,
                "job.schedule",
                "not a duration",
            ),
            ("\"50MiB/s\"", "\"50MiB\"", 14, "job.bwlimit", "not a rate"),
            (
                "\"200MiB/s\"",
                "\"fast\"",
                6,
                "daemon.bwlimit",
                "not a rate",
            ),
            ("\"6h\"", "\"6 hours\"", 15, "job.timeout", "not a duration"),
            (
                "127.0.0.1:9811",
                "127.0.0.1",
                5,
                "daemon.metrics_listen",
                "IP:PORT",
            ),
            (
                "keep_daily = 14",
                "keep_dayly = 14",
                18,
                "job.retention.keep_dayly",
                "unknown field",
            ),
            (
                "keep_daily = 14",
                "force = true",
                18,
                "job.retention.force",
                "always keeps",
            ),
            (
                "name = \"images\"",
                "name = \"vm101\"",
                21,
                "job.name",
                "a second job",
            ),
            (
                "name = \"images\"",
                "name = \"my job\"",
                21,
                "job.name",
                "letters",
            ),
            (
                "\"/backup/repo\",\n]",
                "\"raw:/x\",\n]",
                25,
                "job.destinations",
                "source only",
            ),
            ("[\"disk0\"]", "[\"disk 0\"]", 11, "job.volumes", "volume"),
            (
                "keep_last = 24\nkeep_daily = 14",
                "gc = true",
                16,
                "job.retention",
                "no keep_",
            ),
            (
                "source = \"raw:",
                "source = \"bad:",
                22,
                "job.source",
                "unknown scheme",
            ),
            (
                "keep_last = 24",
                "keep_last = -1",
                17,
                "job.retention.keep_last",
                "invalid value",
            ),
        ];
        for (from, to, line, field, says) in cases {
            let f = broken(from, to);
            assert_eq!(
                (f.line, f.field.as_str()),
                (*line, *field),
                "{from:?} -> {to:?}: {f}"
            );
            assert!(f.message.contains(says), "{from:?} -> {to:?}: {f}");
        }
    }

    #[test]
    fn the_control_socket_is_found_in_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[daemon]\nstate_dir = \"/s\"\ncontrol_socket = \"/run/x.sock\"\n[[job]\n",
        )
        .unwrap();
        assert_eq!(control_socket(&p).unwrap(), Path::new("/run/x.sock"));
        std::fs::write(&p, "[daemon]\nstate_dir = \"/s\"\n").unwrap();
        assert_eq!(
            control_socket(&p).unwrap(),
            Path::new(DEFAULT_CONTROL_SOCKET)
        );
        std::fs::write(&p, "[daemon\n").unwrap();
        assert!(control_socket(&p).is_err());
    }

    #[test]
    fn missing_and_misplaced_fields() {
        let f = broken("schedule = \"every 30s\"\n", "");
        assert_eq!((f.line, f.field.as_str()), (20, "job.schedule"), "{f}");
        assert!(f.message.contains("missing field"), "{f}");
        let f = err("[daemon]\ncontrol_socket = \"/x\"\n");
        assert_eq!(f.field, "daemon.state_dir", "{f}");
        let f = err("[daemon]\nstate_dir = \"/s\"\nstate_dri = \"/t\"\n");
        assert_eq!((f.line, f.field.as_str()), (3, "daemon.state_dri"), "{f}");
        let f = err("[daemon]\nstate_dir = \"/s\"\n[[job]]\nname = \"a\"\nsource = \"raw:/x\"\nschedule = \"every 1s\"\ndestinations = []\n");
        assert_eq!((f.line, f.field.as_str()), (7, "job.destinations"), "{f}");
        let f = err("[daemon]\nstate_dir = \"/s\"\n[[job]]\nname = \"a\"\nsource = \"raw:/x\"\nschedule = \"every 1s\"\ndestinations = [\"/r\", \"/r\"]\n");
        assert_eq!((f.line, f.field.as_str()), (7, "job.destinations"), "{f}");
        assert!(f.message.contains("twice"), "{f}");
        let f = err("[daemon\nstate_dir = 1\n");
        assert_eq!(f.line, 1, "{f}");
    }

    #[test]
    fn the_web_token_file_is_read_and_checked_where_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.token"),
            "# page\nweb-token-0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("short.token"), "abc\n").unwrap();
        let text = |listen: &str, file: &str| {
            format!("[daemon]\nstate_dir = \"s\"\nmetrics_listen = \"{listen}\"\nweb_token_file = \"{file}\"\n")
        };
        let good = parse(&text("0.0.0.0:9811", "web.token"), dir.path(), &AnyUrl).unwrap();
        let token = good.config.daemon.web_token.clone().unwrap();
        assert!(token.matches("web-token-0123456789abcdef") && !token.matches("web-token"));
        assert!(good.warnings.is_empty(), "{:?}", good.warnings);
        for (file, says) in [
            ("missing.token", "cannot read"),
            ("short.token", "at least 16"),
        ] {
            let f = parse(&text("0.0.0.0:1", file), dir.path(), &AnyUrl).unwrap_err();
            assert_eq!(
                (f.line, f.field.as_str()),
                (4, "daemon.web_token_file"),
                "{f}"
            );
            assert!(f.message.contains(says) && f.message.contains(file), "{f}");
        }
        // Not loopback, no token: /metrics only, said as a warning.
        let open = "[daemon]\nstate_dir = \"s\"\nmetrics_listen = \"0.0.0.0:9811\"\n";
        let w = parse(open, dir.path(), &AnyUrl).unwrap().warnings;
        assert_eq!(
            (w[0].line, w[0].field.as_str()),
            (3, "daemon.metrics_listen")
        );
        assert!(w[0].message.contains("web_token_file"), "{}", w[0]);
        let local = open.replace("0.0.0.0", "127.0.0.1");
        assert!(parse(&local, dir.path(), &AnyUrl)
            .unwrap()
            .warnings
            .is_empty());
    }
}
