//! End-to-end faults: a killed replication, damaged packs and manifests, foreign files.
//! In every case: a clear one-line error, exit 1, and earlier snapshots intact.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const T0: u64 = 1_700_000_000;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else if !p.to_string_lossy().contains('#') {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn stderr_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn kill_9_mid_transfer_loses_nothing_and_a_rerun_completes_reusing_packs() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(1, 8 * MIB);
    write_image(&images, "vm", "s1", &s1, T0);
    let s2 = random(2, 192 * MIB);
    write_image(&images, "vm", "s2", &s2, T0 + 60);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    replicate_json(&[&src, &repo, "--snapshot", "s1"]);
    // A pack counts for the rerun once its index is stored (packs go first).
    let indexes = Path::new(&repo).join("index");
    let before = files_under(&indexes).len();

    let mut child = bin()
        .args(["replicate", &src, &repo, "--json"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while files_under(&indexes).len() < before + 1 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no pack appeared"
        );
        if child.try_wait().unwrap().is_some() {
            panic!("replication finished before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());

    // Nothing partial is visible, and what was committed is intact.
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", &repo, "--json"])).unwrap();
    assert_eq!(list["volumes"][0]["snapshots"].as_array().unwrap().len(), 1);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let out = dir.path().join("s1.out");
    ok(&["restore", &repo, "vm@s1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == s1);

    // The rerun completes and does not resend the packs already stored.
    let r = replicate_json(&[&src, &repo]);
    assert_eq!(r.len(), 1);
    let sent = num(&r[0], "sent_bytes");
    assert!(
        sent <= 192 * MIB as u64 - 32 * MIB as u64,
        "rerun resent everything: {sent}"
    );
    assert!(num(&r[0], "dedup_bytes") >= 32 * MIB as u64);
    let out = dir.path().join("s2.out");
    ok(&["restore", &repo, "vm@s2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == s2);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

/// Two volumes, one snapshot each, in a 4 KiB-block repository.
fn two_volume_repo(dir: &Path) -> (String, Vec<u8>) {
    let images = dir.join("images");
    let a = random(3, 2 * MIB);
    write_image(&images, "vm", "s1", &a, T0);
    write_image(&images, "other", "s1", &random(4, MIB), T0);
    let repo = init_repo(dir, &["--block-size", "4096"]);
    replicate_json(&[&format!("raw:{}", images.display()), &repo]);
    (repo, a)
}

#[test]
fn a_flipped_byte_in_a_pack_is_found_and_the_snapshot_named() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = two_volume_repo(dir.path());
    ok(&["verify", &repo, "--read-data"]);
    let packs = files_under(&Path::new(&repo).join("packs"));
    // Find the pack holding vm's data: the one with blocks of seed 3.
    let needle = &random(3, 2 * MIB)[4096 * 7..4096 * 7 + 64];
    let (pack, pos) = packs
        .iter()
        .find_map(|p| {
            let b = std::fs::read(p).unwrap();
            b.windows(64)
                .position(|w| w == needle)
                .map(|i| (p.clone(), i))
        })
        .expect("block found uncompressed in a pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[pos + 10] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();

    let out = run(&["verify", &repo, "--read-data"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr_line(&out);
    assert!(err.contains("vm@s1"), "{err}");
    assert!(!err.contains("other@s1"), "{err}");
    assert!(stdout.contains("damaged snapshot vm@s1"), "{stdout}");
    assert!(
        stdout.contains(&pack.file_name().unwrap().to_string_lossy().to_string()),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&run(&["verify", &repo, "--read-data", "--json"]).stdout).unwrap();
    assert_eq!(json["ok"], false);
    assert_eq!(json["damaged"][0]["volume"], "vm");
    // Restoring the damaged snapshot fails clearly rather than writing bad data.
    let out = run(&[
        "restore",
        &repo,
        "vm@s1",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("damaged"));
    // The other volume is unaffected.
    ok(&[
        "restore",
        &repo,
        "other@s1",
        dir.path().join("y").to_str().unwrap(),
    ]);
}

#[test]
fn truncated_or_foreign_manifests_give_clear_errors() {
    for damage in ["truncate", "foreign"] {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = two_volume_repo(dir.path());
        let manifests = files_under(&Path::new(&repo).join("manifests"));
        assert_eq!(manifests.len(), 2);
        for m in &manifests {
            let bytes = std::fs::read(m).unwrap();
            match damage {
                "truncate" => std::fs::write(m, &bytes[..bytes.len() / 2]).unwrap(),
                _ => std::fs::write(m, b"#!/bin/sh\necho this is not a manifest\n").unwrap(),
            }
        }
        let out = run(&[
            "restore",
            &repo,
            "vm@s1",
            dir.path().join("x").to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{damage}");
        let err = stderr_line(&out);
        assert!(err.contains("manifests/"), "{damage}: {err}");
        let out = run(&["verify", &repo]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr_line(&out);
        assert!(err.contains("vm@s1") && err.contains("other@s1"), "{err}");
        // Listing reads catalogs only and still works.
        ok(&["list", &repo]);
    }
}

#[test]
fn foreign_or_missing_repository_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = two_volume_repo(dir.path());
    let config = Path::new(&repo).join("config");
    let good = std::fs::read(&config).unwrap();
    std::fs::write(&config, b"PK\x03\x04 a zip file").unwrap();
    let out = run(&["list", &repo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("foreign"));
    std::fs::write(&config, &good).unwrap();

    let cat = files_under(&Path::new(&repo).join("volumes/vm"))[0].clone();
    std::fs::write(&cat, b"garbage").unwrap();
    let out = run(&["list", &repo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("volumes/vm"));

    let empty = dir.path().join("not-a-repo");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(&["list", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("snapsync init"));
}

#[test]
fn a_malformed_raw_source_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "list",
        &format!("raw:{}", dir.path().join("missing").display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    stderr_line(&out);
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = run(&["list", &format!("raw:{}", file.display())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("not a directory"));
}
