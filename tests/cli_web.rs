//! The daemon's status page, end to end: a real daemon replicating raw images to a
//! local repository and a served one, its page loaded in headless Chromium (Debian's
//! chromium + chromium-driver, driven by Python's selenium: tests/web/page.py), and
//! what the browser drew compared with `snapsync status --json`; and who may read it.

mod common;

use std::path::Path;
use std::process::Command;

use common::daemon::*;
use common::*;
use serde_json::Value;

const T0: u64 = 1_700_000_000;
const HOUR: u64 = 3600;
const WEB_TOKEN: &str = "web-page-token-0123456789";

/// `run-job NAME`, waiting for its end; whether every destination succeeded.
fn run_job(config: &Path, name: &str) -> bool {
    run(&["run-job", name, "--config", config.to_str().unwrap()])
        .status
        .success()
}

/// The status document without the time it was made (which differs by request).
fn without_now(mut v: Value) -> Value {
    v["daemon"]["now"] = Value::Null;
    v
}

/// Run tests/web/page.py on `url`; what the browser drew.
fn browse(url: &str, screenshot: &Path, measure: usize) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/page.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([url, screenshot.to_str().unwrap()])
        .args(["--measure", &measure.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "page.py (needs chromium, chromium-driver and selenium; scripts/test.sh installs them): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_page_shows_what_status_says_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    let mut data = random(1, 2 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    let local = init_repo(d, &[]);
    let served_dir = d.join("served");
    std::fs::create_dir_all(&served_dir).unwrap();
    let served = init_repo(&served_dir, &[]);
    let (mut server, port) = serve(d, &served, 0);
    let remote = format!("snapsync+http://127.0.0.1:{port}/repo");
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other = init_repo(&other, &[]);
    // Hourly: the runs are the ones run-job asks for, so status holds still while the
    // browser reads it; lag turns red past two hours.
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"images\"\nsource = \"raw:{0}\"\nschedule = \"every 1h\"\ndestinations = [\"{local}\", \"{remote}\"]\ntimeout = \"60s\"\n\n[[job]]\nname = \"copy\"\nsource = \"{local}\"\nschedule = \"every 1h\"\ndestinations = [\"{other}\"]\ntimeout = \"60s\"\n",
            images.display()
        ),
    );
    let daemon = DaemonProc::start(&config, &[]);
    let addr = daemon.metrics.clone().unwrap();
    // The first scheduled runs (a new job runs at once), then three of our own.
    wait_for("the first runs", 60, || {
        let s = daemon.status();
        ["images", "copy"].iter().all(|j| {
            job(&s, j)["recent_runs"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
                && job(&s, j)["running"].is_null()
        })
    });
    scribble(&mut data, 2, 8, 4096);
    write_image(&images, "vm", "s2", &data, T0 + HOUR);
    assert!(run_job(&config, "images"));
    server.kill().unwrap();
    server.wait().unwrap();
    scribble(&mut data, 3, 8, 4096);
    write_image(&images, "vm", "s3", &data, T0 + 5 * HOUR);
    assert!(
        !run_job(&config, "images"),
        "the served destination is down"
    );
    assert!(run_job(&config, "copy"));

    let shot_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_web");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("status-page.png");
    // The down destination is retried with a growing backoff: read the page until no
    // retry ran while the browser was reading it.
    let mut attempts = 0;
    let (page, status) = loop {
        let before = without_now(daemon.status());
        let page = browse(&format!("http://{addr}/"), &shot, 200);
        let status = daemon.status();
        if without_now(status.clone()) == before {
            break (page, status);
        }
        attempts += 1;
        assert!(attempts < 6, "status keeps changing");
    };
    assert!(page["problem"].is_null(), "{page}");

    // The table: a row per job and destination, results and lag as status has them,
    // red where lag is past twice the interval.
    let rows = page["rows"].as_array().unwrap();
    let mut expected = Vec::new();
    for j in status["jobs"].as_array().unwrap() {
        for dd in j["destinations"].as_array().unwrap() {
            expected.push((j["name"].clone(), dd["url"].clone()));
        }
    }
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r["job"].clone(), r["url"].clone()))
        .collect();
    assert_eq!(got, expected);
    for r in rows {
        let j = job(&status, r["job"].as_str().unwrap());
        let dd = destination(
            &status,
            r["job"].as_str().unwrap(),
            r["url"].as_str().unwrap(),
        );
        assert_eq!(r["result"], dd["last_run"]["result"], "{r}");
        assert_eq!(r["lag"].as_f64(), dd["lag_seconds"].as_f64(), "{r}");
        let late =
            dd["lag_seconds"].as_f64().unwrap() > 2.0 * j["interval_seconds"].as_f64().unwrap();
        assert_eq!(r["late"], late, "{r}");
    }
    let row = |url: &str| rows.iter().find(|r| r["url"] == url).unwrap();
    let down = row(&remote);
    assert_eq!(down["result"], "failure");
    assert_eq!(down["result_class"], "bad");
    assert!(
        down["result_text"].as_str().unwrap().contains("127.0.0.1"),
        "{down}"
    );
    assert_eq!(down["lag"].as_f64(), Some(4.0 * HOUR as f64));
    assert_eq!(down["late"], true);
    assert_eq!(down["lag_text"], "4 h");
    assert_eq!(row(&local)["result_class"], "ok");
    assert_eq!(row(&local)["late"], false);

    // One point per run, per series; one per sample of each repository.
    for j in status["jobs"].as_array().unwrap() {
        let n = j["recent_runs"].as_array().unwrap().len() as u64;
        let drawn = &page["runs"][j["name"].as_str().unwrap()];
        assert_eq!(
            (drawn["changed"].as_u64(), drawn["sent"].as_u64()),
            (Some(n), Some(n)),
            "{drawn}"
        );
    }
    // Three runs of ours and the down destination's retries.
    let runs = job(&status, "images")["recent_runs"].as_array().unwrap();
    assert!(runs.len() >= 3);
    let repos = status["repositories"].as_array().unwrap();
    let urls: Vec<_> = repos.iter().map(|r| r["url"].as_str().unwrap()).collect();
    assert_eq!(
        urls,
        [local.as_str(), other.as_str()],
        "snapsync:// stores are not sampled"
    );
    for r in repos {
        let n = r["samples"].as_array().unwrap().len() as u64;
        let last = r["samples"].as_array().unwrap().last().unwrap();
        assert!(last["stored_bytes"].as_u64().unwrap() > 0);
        // Three snapshots of 2 MiB at each.
        assert!(
            last["logical_bytes"].as_u64().unwrap() >= 4 * MIB as u64,
            "{last}"
        );
        let drawn = &page["repositories"][r["url"].as_str().unwrap()];
        assert_eq!(drawn["stored"].as_u64(), Some(n), "{drawn}");
        assert!(drawn["ratio"].as_str().unwrap().ends_with('×'), "{drawn}");
    }

    // The chains of the first job, as the repository holds them: in age order, the
    // first a full map, each delta based on an older snapshot, the replication base
    // marked; the served destination is not read from here.
    let chains = page["chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "{page}");
    let c = &chains[0];
    assert_eq!(
        (c["url"].as_str(), c["volume"].as_str()),
        (Some(local.as_str()), Some("vm"))
    );
    let names: Vec<_> = c["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, snapshots(&local, "vm"));
    assert_eq!(names, ["s1", "s2", "s3"]);
    let snaps = c["snapshots"].as_array().unwrap();
    assert_eq!(snaps[0]["full"], true);
    for (i, s) in snaps.iter().enumerate().skip(1) {
        assert_eq!(s["full"], false, "{s}");
        let base = s["base"].as_str().unwrap().strip_prefix("vm@").unwrap();
        assert!(names[..i].contains(&base), "{s}");
    }
    assert_eq!(c["arcs"], 2);
    let protected: Vec<_> = snaps
        .iter()
        .filter(|s| s["protected"] == true)
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        protected,
        [
            destination(&status, "images", &local)["bases"]["vm"]["snapshot"]
                .as_str()
                .unwrap()
        ]
    );

    // 200 jobs of three destinations and twenty runs each: drawn in well under a second.
    let m = &page["measure"];
    assert_eq!(
        (m["rows"].as_u64(), m["charts"].as_u64()),
        (Some(600), Some(200)),
        "{m}"
    );
    eprintln!(
        "drawing 200 jobs took {:.0} ms (a status document of {} KiB)",
        m["ms"].as_f64().unwrap(),
        m["bytes"].as_u64().unwrap() / 1024
    );
    assert!(m["ms"].as_f64().unwrap() < 2000.0, "{m}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());

    // /api/status is what status --json prints.
    let (code, _, body) = get(&addr, "/api/status", &[]);
    assert_eq!(code, 200);
    assert_eq!(
        without_now(serde_json::from_str(&body).unwrap()),
        without_now(daemon.status())
    );
}

#[test]
fn on_a_non_loopback_address_the_page_needs_the_token_and_metrics_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = d.join("images");
    write_image(&images, "vm", "s1", &random(5, MIB), T0);
    let repo = init_repo(d, &[]);
    let jobs = format!(
        "[[job]]\nname = \"images\"\nsource = \"raw:{}\"\nschedule = \"every 1h\"\ndestinations = [\"{repo}\"]\ntimeout = \"60s\"\n",
        images.display()
    );
    let on_all = |extra: &str| {
        let c = write_config(d, extra, &jobs);
        let text = std::fs::read_to_string(&c)
            .unwrap()
            .replace("127.0.0.1:0", "0.0.0.0:0");
        std::fs::write(&c, text).unwrap();
        c
    };
    // The daemon decides by the address it listens on: 0.0.0.0 is not loopback, even
    // for a request that arrives over 127.0.0.1.
    let config = on_all("");
    let out = run(&["daemon", "--config", config.to_str().unwrap(), "--check"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("web_token_file"));
    let mut daemon = DaemonProc::start(&config, &[]);
    let port = daemon
        .metrics
        .clone()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let addr = format!("127.0.0.1:{port}");
    for path in ["/", "/api/status", "/api/chains?job=images"] {
        let (code, _, body) = get(
            &addr,
            path,
            &[&format!("Authorization: Bearer {WEB_TOKEN}")],
        );
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("web_token_file"), "{body}");
    }
    let (code, _, body) = get(&addr, "/metrics", &[]);
    assert_eq!(code, 200);
    assert!(body.contains("snapsync_job_running"));
    assert_eq!(daemon.stop(), Some(0));

    // With a token file: the token opens it, as a header or a link.
    let token_file = d.join("web.token");
    std::fs::write(&token_file, format!("# the status page\n{WEB_TOKEN}\n")).unwrap();
    let config = on_all("web_token_file = \"web.token\"");
    let daemon = DaemonProc::start(&config, &[]);
    for (path, header) in [
        ("/api/status", String::new()),
        ("/", String::new()),
        (
            "/api/status",
            "Authorization: Bearer not-the-token-0123456789".into(),
        ),
        ("/?token=not-the-token-0123456789", String::new()),
    ] {
        let headers: Vec<&str> = [header.as_str()]
            .into_iter()
            .filter(|h| !h.is_empty())
            .collect();
        let (code, head, body) = get(&addr_of(&daemon), path, &headers);
        assert_eq!(code, 401, "{path} {header}: {body}");
        assert!(
            head.to_lowercase().contains("www-authenticate: bearer"),
            "{head}"
        );
    }
    let bearer = format!("Authorization: Bearer {WEB_TOKEN}");
    let (code, _, body) = get(&addr_of(&daemon), "/api/status", &[&bearer]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        without_now(serde_json::from_str(&body).unwrap()),
        without_now(daemon.status())
    );
    let (code, head, body) = get(&addr_of(&daemon), &format!("/?token={WEB_TOKEN}"), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        head.contains("text/html") && body.contains("snapsync daemon"),
        "{head}"
    );
    let (code, _, body) = get(
        &addr_of(&daemon),
        &format!("/api/chains?job=nope&token={WEB_TOKEN}"),
        &[],
    );
    assert_eq!((code, body.trim()), (404, "no job named \"nope\""));
    assert_eq!(get(&addr_of(&daemon), "/metrics", &[]).0, 200);

    // A token file that is not one: --check names the line and the field.
    std::fs::write(&token_file, "short\n").unwrap();
    let out = run(&["daemon", "--config", config.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 5, daemon.web_token_file") && err.contains("at least 16"),
        "{err}"
    );
}

/// 127.0.0.1 and the port of a daemon listening on 0.0.0.0.
fn addr_of(d: &DaemonProc) -> String {
    let port = d.metrics.as_deref().unwrap().rsplit_once(':').unwrap().1;
    format!("127.0.0.1:{port}")
}
