//! `snapsync daemon`, `status` and `run-job`, end to end: real daemons on schedules of
//! a second replicating raw images into local, S3 (moto) and served repositories, with
//! destinations that fail, runs that time out, limits that hold, kill -9 and restarts.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::Value;

const T0: u64 = 1_700_000_000;
const HOUR: u64 = 3600;
/// `GET /metrics` over HTTP/1.1.
fn scrape(addr: &str) -> String {
    let (code, head, body) = get(addr, "/metrics", &[]);
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body
}

/// Check `text` with Prometheus' own parser.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample whose name and labels start with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
}

#[test]
fn fans_out_to_three_repositories_and_one_that_goes_down_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    let data = random(1, 2 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    let local = init_repo(d, &[]);
    common::s3::endpoint();
    let bucket = common::s3::create_bucket();
    let s3 = format!("s3://{bucket}/repo");
    ok(&["init", &s3]);
    let served_dir = d.join("served");
    std::fs::create_dir_all(&served_dir).unwrap();
    let served = init_repo(&served_dir, &[]);
    let (mut server, port) = serve(d, &served, 0);
    let remote = format!("snapsync+http://127.0.0.1:{port}/repo");
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"images\"\nsource = \"raw:{}\"\nschedule = \"every 1s\"\ndestinations = [\"{local}\", \"{s3}\", \"{remote}\"]\ntimeout = \"60s\"\n",
            images.display()
        ),
    );
    let mut daemon = DaemonProc::start(&config, &[]);
    let holds = |snap: &str, urls: &[&str]| {
        urls.iter()
            .all(|u| snapshots(u, "vm").contains(&snap.to_string()))
    };
    wait_for("s1 at all three", 60, || {
        holds("s1", &[&local, &s3, &served])
    });

    // A new snapshot at the source reaches all three.
    let mut data2 = data.clone();
    scribble(&mut data2, 2, 4, 4096);
    write_image(&images, "vm", "s2", &data2, T0 + HOUR);
    wait_for("s2 at all three", 30, || {
        holds("s2", &[&local, &s3, &served])
    });

    // The server goes down: the others keep replicating, its failures are counted.
    server.kill().unwrap();
    server.wait().unwrap();
    scribble(&mut data2, 3, 4, 4096);
    write_image(&images, "vm", "s3", &data2, T0 + 2 * HOUR);
    wait_for("s3 at the two others", 30, || holds("s3", &[&local, &s3]));
    wait_for("two failures of the served one", 30, || {
        destination(&daemon.status(), "images", &remote)["consecutive_failures"].as_u64() >= Some(2)
    });
    let status = daemon.status();
    let down = destination(&status, "images", &remote);
    assert_eq!(down["last_run"]["result"], "failure", "{down}");
    assert!(
        down["last_run"]["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{down}"
    );
    assert_eq!(down["lag_seconds"], 3600.0, "{down}");
    assert_eq!(down["bases"]["vm"]["snapshot"], "s2");
    for url in [&local, &s3] {
        let up = destination(&status, "images", url);
        assert_eq!(up["last_run"]["result"], "success", "{up}");
        assert_eq!(up["lag_seconds"], 0.0, "{up}");
        // What status says each holds is what it holds.
        assert_eq!(up["bases"]["vm"]["snapshot"], "s3");
    }

    // The metrics say the same, and parse.
    let text = scrape(daemon.metrics.as_deref().unwrap());
    promtool_check(&text);
    let labels = |url: &str| format!("{{job=\"images\",destination=\"{url}\"");
    assert!(
        sample(
            &text,
            &format!(
                "snapsync_job_runs_total{},result=\"failure\"}}",
                labels(&remote)
            )
        ) >= 2.0
    );
    assert!(
        sample(
            &text,
            &format!(
                "snapsync_job_runs_total{},result=\"success\"}}",
                labels(&local)
            )
        ) >= 3.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("snapsync_replication_lag_seconds{}}}", labels(&remote))
        ),
        3600.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("snapsync_replication_lag_seconds{}}}", labels(&s3))
        ),
        0.0
    );
    assert!(
        sample(
            &text,
            &format!("snapsync_sent_bytes_total{}}}", labels(&local))
        ) >= 2.0 * MIB as f64
    );
    assert!(
        sample(
            &text,
            &format!(
                "snapsync_job_last_success_timestamp_seconds{}}}",
                labels(&s3)
            )
        ) > T0 as f64
    );
    assert!(sample(&text, "snapsync_job_duration_seconds_count{job=\"images\"") >= 1.0);

    // Back up on the same port: it catches up.
    let (mut server, _) = serve(d, &served, port);
    wait_for("s3 at the served one", 60, || holds("s3", &[&served]));
    wait_for("its lag back to 0", 30, || {
        let s = daemon.status();
        let dd = destination(&s, "images", &remote);
        dd["lag_seconds"] == 0.0 && dd["consecutive_failures"] == 0
    });
    assert_eq!(daemon.stop(), Some(0));
    server.kill().unwrap();
    server.wait().unwrap();
    for url in [&local, &s3, &served] {
        ok(&["verify", url]);
    }
}

#[test]
fn run_job_answers_with_its_result_and_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(4, MIB), T0);
    let repo = init_repo(d, &[]);
    let not_a_repo = d.join("empty");
    std::fs::create_dir_all(&not_a_repo).unwrap();
    // Once a year: only run-job runs them.
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"good\"\nsource = \"raw:{0}\"\nschedule = \"0 0 1 1 *\"\ndestinations = [\"{repo}\"]\ntimeout = \"1m\"\n\n[[job]]\nname = \"bad\"\nsource = \"raw:{0}\"\nschedule = \"0 0 1 1 *\"\ndestinations = [\"{1}\"]\ntimeout = \"1m\"\n",
            images.display(),
            not_a_repo.display()
        ),
    );
    let c = config.to_str().unwrap();
    let mut daemon = DaemonProc::start(&config, &["--log-format", "json"]);
    let record: Value =
        serde_json::from_str(&ok(&["run-job", "good", "--config", c, "--json"])).unwrap();
    assert_eq!(record["id"], 1);
    assert_eq!(record["trigger"], "manual");
    assert_eq!(record["destinations"][0]["result"], "success", "{record}");
    assert_eq!(record["destinations"][0]["snapshots"], 1);
    let out = run(&["run-job", "bad", "--config", c]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failure") && text.contains("error:"),
        "{text}"
    );
    let out = run(&["run-job", "nope", "--config", c]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job named \"nope\""));
    let before = daemon.status();
    let good = destination(&before, "good", &repo).clone();
    assert_eq!(good["last_run"]["result"], "success");
    assert_eq!(
        job(&before, "good")["recent_runs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(job(&before, "good")["next_run"]
        .as_str()
        .unwrap()
        .contains("-01-01T00:00:00"));
    assert_eq!(daemon.stop(), Some(0));
    // --log-format json: every log line is a JSON object; one line per run, one per
    // destination that failed.
    let log: Vec<Value> = daemon
        .log()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let finished: Vec<&Value> = log
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("run finished")
        })
        .collect();
    assert_eq!(finished.len(), 2, "{log:?}");
    assert!(
        log.iter()
            .any(|l| l["level"] == "ERROR"
                && l["fields"]["destination"].as_str() == not_a_repo.to_str()),
        "{log:?}"
    );

    let mut daemon = DaemonProc::start(&config, &[]);
    let after = daemon.status();
    assert_eq!(
        destination(&after, "good", &repo)["last_success"],
        good["last_success"]
    );
    assert_eq!(
        job(&after, "good")["recent_runs"],
        job(&before, "good")["recent_runs"]
    );
    assert_eq!(
        job(&after, "bad")["destinations"][0]["consecutive_failures"],
        1
    );
    let record: Value =
        serde_json::from_str(&ok(&["run-job", "good", "--config", c, "--json"])).unwrap();
    assert_eq!(record["id"], 2, "numbering goes on after a restart");
    assert_eq!(record["destinations"][0]["snapshots"], 0);
    // Human status names what failed.
    let text = ok(&["status", "--config", c]);
    assert!(text.contains("good") && text.contains("error:"), "{text}");
    assert_eq!(daemon.stop(), Some(0));
}

/// Jobs into two encrypted repositories with different passphrases: the daemon given
/// both (`--password-file`, repeatable) replicates into each, incrementally, deriving
/// each key once however often it opens them, and its status page reads their size and
/// chains; a daemon given none reports the destinations failed with the one-line "is
/// encrypted" error and keeps running.
#[test]
fn jobs_replicate_into_encrypted_repositories_given_their_passphrases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(41, MIB), T0);
    let cheap: Vec<(String, String)> = [
        ("SNAPSYNC_KDF_MEMORY_KIB", "64"),
        ("SNAPSYNC_KDF_ITERATIONS", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut repos = Vec::new();
    let mut pw_args = Vec::new();
    for k in 0..2 {
        let repo = d.join(format!("sealed{k}")).to_str().unwrap().to_string();
        let pw = d.join(format!("pw{k}"));
        std::fs::write(&pw, format!("passphrase number {k}\n")).unwrap();
        let pw = pw.to_str().unwrap().to_string();
        ok_env(
            &["init", &repo, "--encryption", "--password-file", &pw],
            &cheap,
        );
        pw_args.extend(["--password-file".to_string(), pw]);
        repos.push(repo);
    }
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"sealed\"\nsource = \"raw:{}\"\nschedule = \"0 0 1 1 *\"\ndestinations = [\"{}\", \"{}\"]\ntimeout = \"1m\"\n",
            images.display(),
            repos[0],
            repos[1]
        ),
    );
    let c = config.to_str().unwrap();

    // Without the passphrases: each destination fails with the one line, the daemon runs on.
    let mut daemon = DaemonProc::start(&config, &[]);
    let out = run(&["run-job", "sealed", "--config", c, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    for dest in record["destinations"].as_array().unwrap() {
        assert_eq!(dest["result"], "failure", "{record}");
        let error = dest["error"].as_str().unwrap();
        assert!(
            error.contains("is encrypted") && !error.contains('\n'),
            "{error}"
        );
    }
    assert_eq!(daemon.stop(), Some(0));

    let pw: Vec<&str> = pw_args.iter().map(String::as_str).collect();
    let mut daemon = DaemonProc::start(&config, &pw);
    let record: Value =
        serde_json::from_str(&ok(&["run-job", "sealed", "--config", c, "--json"])).unwrap();
    for dest in record["destinations"].as_array().unwrap() {
        assert_eq!(dest["result"], "success", "{record}");
        assert_eq!(dest["snapshots"], 1);
    }
    let mut s2 = std::fs::read(images.join("vm/s1.img")).unwrap();
    s2[..4096].fill(0x42);
    write_image(&images, "vm", "s2", &s2, T0 + HOUR);
    let record: Value =
        serde_json::from_str(&ok(&["run-job", "sealed", "--config", c, "--json"])).unwrap();
    for (k, dest) in record["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(dest["result"], "success", "{record}");
        assert!(
            dest["sent_bytes"].as_u64().unwrap() < MIB as u64 / 4,
            "incremental: {dest}"
        );
        let listed = ok(&["list", &repos[k], "--json", pw[2 * k], pw[2 * k + 1]]);
        assert!(
            listed.contains("\"s1\"") && listed.contains("\"s2\""),
            "{listed}"
        );
    }
    // The status page's view of each sealed repository: read with its passphrase.
    let metrics = daemon.metrics.clone().unwrap();
    let (code, _, body) = get(&metrics, "/api/chains?job=sealed", &[]);
    assert_eq!(code, 200, "{body}");
    let chains: Value = serde_json::from_str(&body).unwrap();
    let destinations = chains["destinations"].as_array().unwrap();
    assert_eq!(destinations.len(), 2, "{chains}");
    for dest in destinations {
        assert!(dest["problem"].is_null(), "{dest}");
        let snaps = dest["volumes"][0]["snapshots"].as_array().unwrap();
        let names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["s1", "s2"], "{dest}");
        assert_eq!(snaps[1]["base"]["snapshot"], "s1", "a delta on s1: {dest}");
    }
    assert_eq!(daemon.stop(), Some(0));
    // Two runs and the page's reads opened each repository several times; each pair of
    // passphrase and key object was derived (Argon2id) once, then remembered: at most
    // 2 x 2 derivations, where every open deriving again would have made at least six.
    let derived = daemon
        .log()
        .iter()
        .filter(|l| l.contains("derived the wrapping key"))
        .count();
    assert!(
        (2..=4).contains(&derived),
        "{derived} derivations: {:?}",
        daemon.log()
    );
}

#[test]
fn a_run_past_its_timeout_is_cancelled_and_slots_meanwhile_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "big", &random(5, 8 * MIB), T0);
    let repo = init_repo(d, &[]);
    // 8 MiB at 1 MiB/s would take 8 s; the run is cancelled at 2 s. Slots come each
    // second meanwhile.
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"slow\"\nsource = \"raw:{}\"\nschedule = \"every 1s\"\ndestinations = [\"{repo}\"]\nbwlimit = \"1MiB/s\"\ntimeout = \"2s\"\n",
            images.display()
        ),
    );
    let mut daemon = DaemonProc::start(&config, &[]);
    wait_for("a run that timed out", 30, || {
        job(&daemon.status(), "slow")["recent_runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["destinations"][0]["result"] == "timeout")
    });
    let status = daemon.status();
    let j = job(&status, "slow");
    let timed_out = j["recent_runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destinations"][0]["result"] == "timeout")
        .unwrap();
    let dest = &timed_out["destinations"][0];
    assert!(
        dest["error"].as_str().unwrap().contains("timeout of 2s"),
        "{dest}"
    );
    let ms = timed_out["duration_ms"].as_u64().unwrap();
    assert!((1900..5000).contains(&ms), "cancelled after {ms} ms");
    assert!(j["skipped_runs"].as_u64().unwrap() >= 1, "{j}");
    let text = scrape(daemon.metrics.as_deref().unwrap());
    promtool_check(&text);
    assert!(sample(&text, "snapsync_job_skipped_runs_total{job=\"slow\"}") >= 1.0);
    assert!(sample(&text, "snapsync_job_runs_total{job=\"slow\",destination=") >= 0.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("snapsync_job_runs_total")
                && l.contains("result=\"timeout\"")
                && !l.ends_with(" 0")),
        "{text}"
    );
    // SIGTERM during a run: it is cancelled and recorded, and the daemon exits 0 well
    // within the grace period.
    wait_for("a run going", 10, || {
        let s = daemon.status();
        let r = &job(&s, "slow")["running"];
        !r.is_null() && r["cancelling"].is_null()
    });
    let t = Instant::now();
    assert_eq!(daemon.stop(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let state: Value =
        serde_json::from_slice(&std::fs::read(d.join("state/jobs/slow.json")).unwrap()).unwrap();
    assert!(state["running"].is_null(), "{state}");
    let last = &state["runs"].as_array().unwrap().last().unwrap()["destinations"][0];
    assert!(
        last["result"] == "cancelled" || last["result"] == "timeout",
        "{last}"
    );
    // Nothing was committed half-done.
    assert!(snapshots(&repo, "vm").is_empty());
    ok(&["verify", &repo, "--read-data"]);
}

#[test]
fn jobs_share_the_daemons_bandwidth_limit() {
    // 64 MiB under 16 MiB/s for both jobs together (job "a" alone may go faster).
    assert_bandwidth_held(
        "bwlimit = \"16MiB/s\"",
        ["bwlimit = \"64MiB/s\"\n", ""],
        32 * MIB,
    );
}

#[test]
fn a_jobs_own_bandwidth_limit_holds_its_rate() {
    // One job limited to 16 MiB/s, the daemon not limited: 64 MiB take 4 s.
    assert_bandwidth_held("", ["bwlimit = \"16MiB/s\"\n"], 64 * MIB);
}

/// Run one job per entry of `job_limits` (each its own image of `image` bytes, all to
/// one repository) at once under the daemon's `daemon_limit`, and check that the
/// 64 MiB they send together take between 3.5 and 5 s: 16 MiB/s.
fn assert_bandwidth_held<const N: usize>(daemon_limit: &str, job_limits: [&str; N], image: usize) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = init_repo(d, &[]);
    let mut jobs = String::new();
    let names: Vec<String> = (0..N).map(|k| format!("j{k}")).collect();
    for (k, limit) in job_limits.iter().enumerate() {
        let src = d.join(&names[k]);
        write_image(
            &src,
            &format!("v{k}"),
            "s1",
            &random(6 + k as u64, image),
            T0,
        );
        jobs += &format!(
            "[[job]]\nname = \"{}\"\nsource = \"raw:{}\"\nschedule = \"0 0 1 1 *\"\ndestinations = [\"{repo}\"]\n{limit}timeout = \"1m\"\n\n",
            names[k],
            src.display()
        );
    }
    let config = write_config(d, daemon_limit, &jobs);
    let c = config.to_str().unwrap().to_string();
    let mut daemon = DaemonProc::start(&config, &[]);
    let runs: Vec<Value> = names
        .iter()
        .map(|j| {
            let (c, j) = (c.clone(), j.clone());
            std::thread::spawn(move || -> Value {
                serde_json::from_str(&ok(&["run-job", &j, "--config", &c, "--json"])).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut sent = 0;
    let (mut first, mut last) = (i64::MAX, 0i64);
    for r in &runs {
        let dest = &r["destinations"][0];
        assert_eq!(dest["result"], "success", "{r}");
        sent += dest["sent_bytes"].as_u64().unwrap();
        let started = time_ms(r["started"].as_str().unwrap());
        first = first.min(started);
        last = last.max(started + r["duration_ms"].as_i64().unwrap());
    }
    assert!(sent >= 63 * MIB as u64, "{sent}");
    let secs = (last - first) as f64 / 1000.0;
    assert!(
        (3.5..=5.0).contains(&secs),
        "64 MiB at 16 MiB/s took {secs} s"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// Milliseconds since the epoch of an RFC 3339 time as status writes it.
fn time_ms(s: &str) -> i64 {
    let out = Command::new("date")
        .args(["-u", "-d", s, "+%s%3N"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn kill_9_mid_run_then_a_restart_catches_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(8, 16 * MIB), T0);
    let repo = init_repo(d, &[]);
    // Hourly, so the only runs are the first and the catch-up; slowed so that the
    // first is still going when the daemon is killed.
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"vm\"\nsource = \"raw:{}\"\nschedule = \"every 1h\"\ndestinations = [\"{repo}\"]\nbwlimit = \"4MiB/s\"\ntimeout = \"1m\"\n",
            images.display()
        ),
    );
    let daemon = DaemonProc::start(&config, &[]);
    wait_for("bytes sent", 20, || {
        job(&daemon.status(), "vm")["running"]["sent_bytes"].as_u64() > Some(0)
    });
    daemon.kill9();
    ok(&["verify", &repo, "--read-data"]);
    assert!(snapshots(&repo, "vm").is_empty());

    // The stale control socket is replaced, the state lock was the kernel's.
    let mut daemon = DaemonProc::start(&config, &[]);
    wait_for("the catch-up run", 30, || {
        !job(&daemon.status(), "vm")["recent_runs"]
            .as_array()
            .unwrap()
            .is_empty()
            && job(&daemon.status(), "vm")["running"].is_null()
    });
    let status = daemon.status();
    let runs = job(&status, "vm")["recent_runs"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        runs.len(),
        1,
        "one catch-up, not one per missed slot: {runs:?}"
    );
    assert_eq!(runs[0]["trigger"], "catch-up");
    assert_eq!(runs[0]["id"], 2, "the killed run was number 1");
    assert_eq!(runs[0]["destinations"][0]["result"], "success", "{runs:?}");
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(snapshots(&repo, "vm"), ["s1"]);
    ok(&["verify", &repo, "--read-data"]);
}

#[test]
fn sighup_reloads_and_a_broken_config_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(9, MIB), T0);
    let repo = init_repo(d, &[]);
    let one = |name: &str, schedule: &str| {
        format!(
            "[[job]]\nname = \"{name}\"\nsource = \"raw:{}\"\nschedule = \"{schedule}\"\ndestinations = [\"{repo}\"]\ntimeout = \"1m\"\n\n",
            images.display()
        )
    };
    let config = write_config(d, "", &one("a", "0 0 1 1 *"));
    let mut daemon = DaemonProc::start(&config, &[]);
    assert_eq!(daemon.status()["jobs"].as_array().unwrap().len(), 1);

    write_config(d, "", &one("a", "0 0 1 1"));
    daemon.signal("-HUP");
    wait_for("the refusal", 10, || {
        !daemon.status()["daemon"]["config_error"].is_null()
    });
    let status = daemon.status();
    let e = status["daemon"]["config_error"].as_str().unwrap();
    assert!(e.contains("line 9, job.schedule"), "{e}");
    assert_eq!(
        job(&status, "a")["schedule"],
        "0 0 1 1 *",
        "the old config runs on"
    );
    assert!(daemon
        .log()
        .iter()
        .any(|l| l.contains("config not reloaded")));

    write_config(d, "", &(one("a", "0 0 1 1 *") + &one("b", "every 1h")));
    daemon.signal("-HUP");
    wait_for("job b", 10, || {
        daemon.status()["jobs"].as_array().unwrap().len() == 2
    });
    assert!(daemon.status()["daemon"]["config_error"].is_null());
    wait_for("job b's first run", 20, || {
        destination(&daemon.status(), "b", &repo)["last_run"]["result"] == "success"
    });
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn check_names_the_line_and_field_of_a_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = "[[job]]\nname = \"a\"\nsource = \"raw:/srv/images\"\nschedule = \"*/15 * * * *\"\ndestinations = [\"/backup/repo\", \"s3://bucket/repo\"]\ntimeout = \"6h\"\n";
    let config = write_config(d, "", good);
    let c = config.to_str().unwrap();
    let out = ok(&["daemon", "--config", c, "--check"]);
    assert!(out.contains("ok, 1 jobs"), "{out}");
    // The documented sample is a valid config.
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/snapsync.toml");
    assert!(ok(&["daemon", "--config", sample, "--check"]).contains("ok, 2 jobs"));
    for (from, to, says) in [
        (
            "*/15 * * * *",
            "*/15 * * *",
            "line 9, job.schedule: a cron schedule has 5 fields",
        ),
        (
            "\"/backup/repo\"",
            "\"raw:/backup\"",
            "line 10, job.destinations: \"raw:/backup\" is a source only",
        ),
        (
            "timeout = \"6h\"",
            "timeout = \"6 hours\"",
            "line 11, job.timeout",
        ),
        (
            "raw:/srv/images",
            "ftp://srv/images",
            "line 8, job.source: store URL \"ftp://srv/images\": unknown scheme",
        ),
    ] {
        write_config(d, "", &good.replace(from, to));
        let out = run(&["daemon", "--config", c, "--check"]);
        assert_eq!(out.status.code(), Some(1), "{from} -> {to}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{from} -> {to}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// A qemu-storage-daemon on a qcow2 disk (node `disk0`) holding `initial`, with its
/// QMP socket and a writable NBD export `guest` standing in for the guest.
struct Vm {
    child: Child,
    qmp: PathBuf,
    guest: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(dir: &Path, initial: &[u8]) -> Vm {
    let raw = dir.join("initial.raw");
    std::fs::write(&raw, initial).unwrap();
    let image = dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let (qmp, guest) = (dir.join("qmp.sock"), dir.join("guest.sock"));
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                image.display()
            ),
            "--chardev",
            &format!("socket,path={},server=on,wait=off,id=qmp", qmp.display()),
            "--monitor",
            "chardev=qmp",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", guest.display()),
            "--export",
            "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
        ])
        .spawn()
        .expect("qemu-storage-daemon (qemu-utils)");
    wait_for("qemu-storage-daemon", 20, || qmp.exists() && guest.exists());
    Vm { child, qmp, guest }
}

impl Vm {
    fn url(&self) -> String {
        format!("qemu://{}?nbd={}", self.qmp.display(), self.guest.display())
    }

    fn write(&self, byte: u8, offset: usize, len: usize) {
        let target = format!("nbd+unix:///guest?socket={}", self.guest.display());
        qemu_io(
            Path::new(&target),
            "raw",
            &[format!("write -P {byte} {offset} {len}")],
        );
    }
}

#[test]
fn a_vms_checkpoints_stay_while_a_destination_that_is_down_needs_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut disk = random(10, 8 * MIB);
    let vm = start_vm(d, &disk);
    let local = init_repo(&d.join("local"), &[]);
    let served_dir = d.join("served");
    std::fs::create_dir_all(&served_dir).unwrap();
    let served = init_repo(&served_dir, &[]);
    let (mut server, port) = serve(d, &served, 0);
    let remote = format!("snapsync+http://127.0.0.1:{port}/repo");
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"vm\"\nsource = \"{}\"\nschedule = \"every 1s\"\ndestinations = [\"{local}\", \"{remote}\"]\ntimeout = \"30s\"\n",
            vm.url()
        ),
    );
    let mut daemon = DaemonProc::start(&config, &[]);
    wait_for("the first checkpoint at both", 30, || {
        let s = daemon.status();
        [&local, &remote]
            .iter()
            .all(|u| destination(&s, "vm", u)["last_run"]["result"] == "success")
    });
    server.kill().unwrap();
    server.wait().unwrap();
    let base = destination(&daemon.status(), "vm", &remote)["bases"]["disk0"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // The guest writes while the served repository is down, and more checkpoints are
    // taken than the source keeps by default (8).
    vm.write(1, MIB, 65536);
    disk[MIB..MIB + 65536].fill(1);
    let runs = |s: &Value| job(s, "vm")["recent_runs"][0]["id"].as_u64().unwrap_or(0);
    let at_kill = runs(&daemon.status());
    wait_for("ten more runs", 60, || {
        runs(&daemon.status()) >= at_kill + 10
    });
    vm.write(2, 5 * MIB, 65536);
    disk[5 * MIB..5 * MIB + 65536].fill(2);
    assert_eq!(
        destination(&daemon.status(), "vm", &remote)["bases"]["disk0"]["snapshot"],
        base.as_str()
    );

    // Back: it gets an incremental from its old base, which the source kept.
    let (mut server, _) = serve(d, &served, port);
    wait_for("the served one to catch up", 60, || {
        let s = daemon.status();
        let dd = destination(&s, "vm", &remote);
        dd["last_run"]["result"] == "success" && dd["lag_seconds"] == 0.0
    });
    let status = daemon.status();
    let catch_up = job(&status, "vm")["recent_runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| {
            r["destinations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["url"] == remote.as_str() && d["result"] == "success")
        })
        .next()
        .unwrap()
        .clone();
    assert!(
        catch_up["changed_bytes"].as_u64().unwrap() <= 2 * 65536,
        "not from its base: {catch_up}"
    );
    let newest = destination(&status, "vm", &remote)["bases"]["disk0"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(daemon.stop(), Some(0));
    server.kill().unwrap();
    server.wait().unwrap();
    // The newest checkpoint at the served repository is the disk, bit for bit, and the
    // source is back to its default of checkpoints kept.
    let out = d.join("restored.raw");
    ok(&[
        "restore",
        &served,
        &format!("disk0@{newest}"),
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == disk);
    let listed: Value = serde_json::from_str(&ok(&["list", &vm.url(), "--json"])).unwrap();
    assert_eq!(
        listed["volumes"][0]["snapshots"].as_array().unwrap().len(),
        8,
        "{listed}"
    );
    ok(&["verify", &served, "--read-data"]);
}

#[test]
fn a_run_stuck_on_a_store_that_does_not_answer_is_abandoned_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(11, MIB), T0);
    let served_dir = d.join("served");
    std::fs::create_dir_all(&served_dir).unwrap();
    let served = init_repo(&served_dir, &[]);
    let (mut server, port) = serve(d, &served, 0);
    let remote = format!("snapsync+http://127.0.0.1:{port}/repo");
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"vm\"\nsource = \"raw:{}\"\nschedule = \"0 0 1 1 *\"\ndestinations = [\"{remote}\"]\ntimeout = \"2s\"\n",
            images.display()
        ),
    );
    let c = config.to_str().unwrap();
    let mut daemon = DaemonProc::start(&config, &[]);
    // The server stops answering: connections are accepted, requests never answered.
    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    let out = run(&["run-job", "vm", "--config", c, "--json"]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dest = &record["destinations"][0];
    assert_eq!(dest["result"], "timeout", "{record}");
    assert!(
        dest["error"].as_str().unwrap().contains("abandoned"),
        "{record}"
    );
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(job(&daemon.status(), "vm")["running"].is_null());
    // Answering again, the abandoned run ends without committing; the next run works.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("the abandoned run to end", 30, || {
        daemon
            .log()
            .iter()
            .any(|l| l.contains("an abandoned run ended at last"))
    });
    assert!(snapshots(&served, "vm").is_empty());
    let record: Value =
        serde_json::from_str(&ok(&["run-job", "vm", "--config", c, "--json"])).unwrap();
    assert_eq!(record["destinations"][0]["result"], "success", "{record}");
    assert_eq!(snapshots(&served, "vm"), ["s1"]);
    assert_eq!(daemon.stop(), Some(0));
    server.kill().unwrap();
    server.wait().unwrap();
}

/// The shipped unit file is one systemd accepts (`systemd-analyze verify`: unknown
/// directives, bad values, a missing binary), with the binary path pointed at the one
/// under test and the shipped sample config, which `--check` must accept.
#[test]
fn the_systemd_unit_and_the_sample_config_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sample = root.join("contrib/snapsync.toml");
    let out = bin()
        .args(["daemon", "--config", sample.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(root.join("contrib/systemd/snapsync.service"))
        .unwrap()
        .replace("/usr/local/bin/snapsync", env!("CARGO_BIN_EXE_snapsync"))
        .replace("/etc/snapsync/snapsync.toml", sample.to_str().unwrap());
    let path = dir.path().join("snapsync.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
