//! Usage errors: every malformed store URL or snapshot target, given to any command
//! that takes one, exits 2 with one line naming it before any store is touched; names
//! are quoted in messages; the environment's limits are checked; `serve` warns about
//! token-file entries for stores it does not serve.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};

use common::*;

/// URLs that can name no store.
const BAD_URLS: &[&str] = &[
    "",
    "s3://",
    "s3:///prefix",
    "s3://bucket/a//b",
    "snapsync://host",
    "snapsync://host:7000",
    "snapsync://host/repo",
    "snapsync+http://:7000/repo",
    "snapsync://host:7000/a b",
    "file://",
    "file://relative/repo",
    "raw:",
    "raw://",
    "qcow2:",
    "qcow2://",
    "qcow2://relative/vm.qcow2",
    "ftp://host/x",
    "http://host/x",
    "raw:/tmp?color=red",
    "raw:/tmp?layout=by-date",
    "raw:/tmp?layout=",
    "raw:/tmp?layout=by-snapshot&layout=by-volume",
    "raw:/tmp?layout=by-snapshot&color=red",
    "raw:?layout=by-snapshot",
    "file:///tmp/repo?x=1",
    "s3://bucket/prefix?region=eu",
    "qcow2:///tmp/vm.qcow2?backing=anything",
    "qcow2:///tmp/vm.qcow2?backing=any&x=1",
];

/// Targets that can name no snapshot.
const BAD_TARGETS: &[&str] = &[
    "vm@", "@snap", "vm", "", "vm@a@b", "vm@a\nb", "v m@s", "vm@-x",
];

/// A usage error: exit 2, one line, the snapsync prefix, no panic.
fn usage_error(args: &[&str], out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.starts_with("snapsync: error: "), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

#[test]
fn malformed_urls_are_usage_errors_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    let out_file = dir.path().join("out.img");
    let out_file = out_file.to_str().unwrap();
    for &url in BAD_URLS {
        let store = format!("name={url}");
        let commands: Vec<Vec<&str>> = vec![
            vec!["list", url],
            vec!["diff", url, "vm@s1"],
            vec!["replicate", url, &repo],
            vec!["replicate", &repo, url],
            vec!["restore", url, "vm@s1", out_file],
            vec!["verify", url],
            vec!["prune", url, "--keep-last", "1"],
            vec!["gc", url],
            vec!["init", url],
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                "/nonexistent/tokens",
                "--insecure-plaintext",
                "--store",
                &store,
            ],
        ];
        for args in commands {
            let err = usage_error(&args, &run(&args));
            if !url.is_empty() {
                assert!(
                    err.contains(&format!("{url:?}")),
                    "{args:?}: not named: {err}"
                );
            }
        }
    }
    // Nothing was written where the restore would have gone.
    assert!(!std::path::Path::new(out_file).exists());
    let err = usage_error(
        &["list", "qcow2://vm.qcow2"],
        &run(&["list", "qcow2://vm.qcow2"]),
    );
    assert!(
        err.contains("qcow2:///") && err.contains("qcow2:relative"),
        "{err}"
    );
}

#[test]
fn malformed_targets_and_names_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    let out_file = dir.path().join("out.img");
    let out_file = out_file.to_str().unwrap();
    for &target in BAD_TARGETS {
        for args in [
            vec!["diff", &repo, target],
            vec!["diff", &repo, "vm@s1", "--base", target],
            vec!["restore", &repo, target, out_file],
        ] {
            if args[3..].contains(&"--base") && !target.contains('@') {
                continue; // a bare --base is a snapshot name, checked below
            }
            let err = usage_error(&args, &run(&args));
            assert!(
                err.contains(&format!("{target:?}")),
                "{args:?}: not named: {err}"
            );
        }
    }
    // A name with a newline, wherever it is given, is quoted: one line, the newline
    // shown as `\n`.
    let name = "a\nb";
    for args in [
        vec!["diff", &repo, "vm@s1", "--base", name],
        vec!["replicate", &repo, &repo, "--snapshot", name],
        vec!["replicate", &repo, &repo, "--volume", name],
        vec!["prune", &repo, "--keep-last", "1", "--volume", name],
    ] {
        let err = usage_error(&args, &run(&args));
        assert!(err.contains(r#""a\nb""#), "{args:?}: {err}");
    }
    // And a command that needs a rule exits 2 without it.
    usage_error(&["prune", &repo], &run(&["prune", &repo]));
}

#[test]
fn a_missing_snapshot_is_named_quoted() {
    // Past the command line's checks: the store's own message quotes the name, as every
    // message naming a volume or snapshot does.
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    let out = run(&["diff", &repo, "vm@s1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(r#"snapshot "vm@s1""#),
        "name not quoted: {err}"
    );
}

#[test]
fn bad_limits_in_the_environment_are_errors_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    for var in ["SNAPSYNC_LOCK_WAIT_SECS", "SNAPSYNC_RETRY_TIMEOUT_SECS"] {
        for value in ["soon", "-1", "1.5"] {
            let out = run_env(&["gc", &repo], &[(var.into(), value.into())]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{var}={value}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains(&format!("{var}={value:?}")), "{err}");
        }
        ok_env(&["gc", &repo], &[(var.into(), "5".into())]);
    }
}

#[test]
fn serve_warns_about_token_entries_for_stores_it_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    let tokens = dir.path().join("tokens");
    // CRLF line ends, as a file edited on Windows has them.
    std::fs::write(
        &tokens,
        "# tokens\r\nAAAAAAAAAAAAAAAAAAAA repo rw\r\nBBBBBBBBBBBBBBBBBBBB rpeo ro\r\n",
    )
    .unwrap();
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--token-file",
            tokens.to_str().unwrap(),
            "--store",
            &format!("repo={repo}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(ready.contains("serving repo"), "{ready}");
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("line 3") && warnings[0].contains(r#""rpeo""#),
        "{err}"
    );

    // A token outside printable ASCII is refused, naming its line.
    std::fs::write(
        &tokens,
        "AAAAAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBBBBBé repo ro\n",
    )
    .unwrap();
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--insecure-plaintext",
        "--token-file",
        tokens.to_str().unwrap(),
        "--store",
        &format!("repo={repo}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 2") && err.contains("ASCII"), "{err}");
}

#[test]
fn raw_layouts_are_url_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let data = random(3, 2 * MIB);
    // By volume (the default, also when named).
    write_image(
        &dir.path().join("by-volume"),
        "vm",
        "s1",
        &data,
        1_700_000_000,
    );
    let by_volume = dir.path().join("by-volume");
    let listing = |url: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&["list", url, "--json"])).unwrap()
    };
    let plain = listing(&format!("raw:{}", by_volume.display()));
    let named = listing(&format!("raw:{}?layout=by-volume", by_volume.display()));
    assert_eq!(plain, named);
    assert_eq!(plain["volumes"][0]["name"], "vm");
    // Its mtime is older than its birth: the age is the mtime, and says so.
    assert_eq!(plain["volumes"][0]["snapshots"][0]["age_from"], "mtime");
    assert_eq!(
        plain["volumes"][0]["snapshots"][0]["created"],
        "2023-11-14T22:13:20Z"
    );

    // By snapshot: DIR/<snapshot>/<volume>.img; an image directly in DIR is skipped
    // with the layout's form.
    let by_snapshot = dir.path().join("by-snapshot");
    for (snap, vols) in [("mon", &["vm", "db"][..]), ("tue", &["vm"][..])] {
        std::fs::create_dir_all(by_snapshot.join(snap)).unwrap();
        for v in vols {
            std::fs::write(by_snapshot.join(snap).join(format!("{v}.img")), &data).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::write(by_snapshot.join("stray.img"), b"x").unwrap();
    let url = format!("raw:{}?layout=by-snapshot", by_snapshot.display());
    let l = listing(&url);
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(l["volumes"][0]["name"], "db", "{l}");
    assert_eq!(names(&l["volumes"][0]), ["mon"]);
    assert_eq!(l["volumes"][1]["name"], "vm");
    assert_eq!(names(&l["volumes"][1]), ["mon", "tue"]);
    // A snapshot directory's birth time where the file system records one.
    let recorded = std::fs::metadata(by_snapshot.join("mon"))
        .unwrap()
        .created()
        .is_ok();
    for s in l["volumes"][1]["snapshots"].as_array().unwrap() {
        assert_eq!(
            s["age_from"],
            if recorded { "btime" } else { "mtime" },
            "{l}"
        );
    }
    let skipped = l["skipped"].to_string();
    assert!(skipped.contains("SNAPSHOT/VOLUME.img"), "{skipped}");
    // Read through the layout: a diff and a restore.
    let d: serde_json::Value =
        serde_json::from_str(&ok(&["diff", &url, "vm@tue", "--base", "mon", "--json"])).unwrap();
    assert_eq!(num(&d, "changed_bytes"), 0, "{d}");
    let repo = init_repo(dir.path(), &[]);
    assert_eq!(replicate_json(&[&url, &repo]).len(), 3);
    let out = dir.path().join("db.out");
    ok(&["restore", &repo, "db@mon", out.to_str().unwrap()]);
    assert!(std::fs::read(out).unwrap() == data);
}
