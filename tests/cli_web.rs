//! The daemon's status page, end to end: a real daemon replicating raw images to a
//! local repository and a served one, and qcow2 images with a clone, its page loaded in
//! headless Chromium (Debian's chromium + chromium-driver, driven by Python's selenium:
//! tests/web/page.py), and what the browser drew compared with `snapsync status --json`
//! and with what `list --json` says of the repositories; and who may read it.

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

/// `list --json` of `url` (a `snapsync://` one with the servers' token).
fn listed(url: &str) -> Value {
    let env = [("SNAPSYNC_TOKEN".to_string(), TOKEN.to_string())];
    serde_json::from_str(&ok_env(&["list", url, "--json"], &env)).unwrap()
}

/// Per volume of a `list --json`, its snapshots' names in age order.
fn listed_names(list: &Value) -> Vec<(String, Vec<String>)> {
    let str_of = |v: &Value| v.as_str().unwrap().to_string();
    list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let snaps = v["snapshots"].as_array().unwrap();
            (
                str_of(&v["name"]),
                snaps.iter().map(|s| str_of(&s["name"])).collect(),
            )
        })
        .collect()
}

/// A `list --json`'s snapshots: how many, and their sizes added up.
fn listed_totals(list: &Value) -> (u64, u64) {
    let snaps: Vec<&Value> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["snapshots"].as_array().unwrap())
        .collect();
    (
        snaps.len() as u64,
        snaps.iter().map(|s| num(s, "size")).sum(),
    )
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
    // What the served repository holds, asked through its server: the page must show
    // it after the server is gone (the last view read stays).
    let served_list = listed(&remote);
    assert_eq!(
        listed_names(&served_list),
        [("vm".to_string(), vec!["s1".to_string(), "s2".to_string()])]
    );
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
        [local.as_str(), remote.as_str(), other.as_str()],
        "a snapsync:// repository is sampled through its server"
    );
    // Its last sample (taken while it was up) says what `list` says of it.
    let served_samples = repos[1]["samples"].as_array().unwrap();
    let last = served_samples.last().unwrap();
    let (count, logical) = listed_totals(&served_list);
    assert_eq!(
        (num(last, "volumes"), num(last, "snapshots")),
        (1, count),
        "{last}"
    );
    assert_eq!(num(last, "logical_bytes"), logical, "{last}");
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

    // The chains of the first job at both destinations, as each repository holds them
    // (the served one as its server said before it went down): in age order, the
    // first a full map, each delta based on an older snapshot, the replication base
    // marked.
    let chains = page["chains"].as_array().unwrap();
    let drawn: Vec<_> = chains
        .iter()
        .map(|c| (c["url"].as_str().unwrap(), c["volume"].as_str().unwrap()))
        .collect();
    assert_eq!(drawn, [(local.as_str(), "vm"), (remote.as_str(), "vm")]);
    let served_names = listed_names(&served_list)[0].1.clone();
    for (c, held) in chains.iter().zip([snapshots(&local, "vm"), served_names]) {
        let url = c["url"].as_str().unwrap();
        let names: Vec<_> = c["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, held, "{url}");
        let snaps = c["snapshots"].as_array().unwrap();
        assert_eq!(snaps[0]["full"], true);
        for (i, s) in snaps.iter().enumerate().skip(1) {
            assert_eq!(s["full"], false, "{s}");
            let base = s["base"].as_str().unwrap().strip_prefix("vm@").unwrap();
            assert!(names[..i].contains(&base), "{s}");
        }
        assert_eq!(c["arcs"].as_u64(), Some(names.len() as u64 - 1), "{url}");
        let protected: Vec<_> = snaps
            .iter()
            .filter(|s| s["protected"] == true)
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        let base = &destination(&status, "images", url)["bases"]["vm"]["snapshot"];
        assert_eq!(protected, [base.as_str().unwrap()], "{url}");
    }
    assert_eq!(snapshots(&local, "vm"), ["s1", "s2", "s3"]);
    // Both were read, and the served one's last read (before it went down) succeeded.
    for d in page["dests"].as_array().unwrap() {
        assert!(d["read"].is_string(), "{d}");
        assert!(d["problem"].is_null(), "{d}");
    }

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

/// A clone's chain is marked with its origin: qcow2 images sharing a backing file are
/// clones of it; a real daemon job replicates the volume and its clone, and the browser
/// shows the clone's origin as the repository's listing has it.
#[test]
fn a_clone_s_origin_is_marked_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vms = d.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let image = |name: &str| vms.join(format!("{name}.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image("base").to_str().unwrap(),
        "2M",
    ]);
    qemu_write(&image("base"), "qcow2", 0, &random(21, MIB));
    // a and b on the same backing file: b is a clone of a@base (the shared layer
    // belongs to the volume sorting first); each has a snapshot of its own.
    for (name, seed) in [("a", 22), ("b", 23)] {
        let top = image(name);
        let top = top.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
        ]);
        qemu_write(&image(name), "qcow2", MIB as u64, &random(seed, 64 * 1024));
        qemu_img(&["snapshot", "-c", &format!("{name}1"), top]);
    }
    let repo = init_repo(d, &[]);
    let config = write_config(
        d,
        "",
        &format!(
            "[[job]]\nname = \"vms\"\nsource = \"qcow2://{}\"\nschedule = \"every 1h\"\ndestinations = [\"{repo}\"]\ntimeout = \"60s\"\n",
            vms.display()
        ),
    );
    let daemon = DaemonProc::start(&config, &[]);
    let addr = daemon.metrics.clone().unwrap();
    wait_for("the first run", 60, || {
        let s = daemon.status();
        let j = job(&s, "vms");
        j["recent_runs"].as_array().is_some_and(|r| !r.is_empty()) && j["running"].is_null()
    });
    let status = daemon.status();
    let last = &job(&status, "vms")["recent_runs"][0]["destinations"][0];
    assert_eq!(last["result"], "success", "{last}");

    let list = listed(&repo);
    let clone = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "b")
        .unwrap();
    let origin = format!(
        "{}@{}",
        clone["origin"]["volume"].as_str().unwrap(),
        clone["origin"]["snapshot"].as_str().unwrap()
    );
    assert_eq!(origin, "a@base");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_web/clone.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let page = browse(&format!("http://{addr}/"), &shot, 0);
    let chains = page["chains"].as_array().unwrap();
    let by = |v: &str| chains.iter().find(|c| c["volume"] == v).unwrap();
    assert_eq!(listed_names(&list).len(), chains.len(), "{page}");
    assert!(by("a")["origin"].is_null(), "{page}");
    let b = by("b");
    assert_eq!(b["origin"].as_str(), Some(origin.as_str()), "{b}");
    assert_eq!(
        b["origin_text"].as_str(),
        Some(format!("clone of {origin}").as_str())
    );
    let names: Vec<_> = b["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, snapshots(&repo, "b"));
    // The clone's first snapshot is a delta of its origin (or a full map).
    let first = &b["snapshots"][0];
    assert!(
        first["full"] == true || first["base"] == origin.as_str(),
        "{first}"
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
