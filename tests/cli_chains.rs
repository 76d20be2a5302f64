//! End-to-end: out-of-order replication into the middle of a chain, prune, gc, and gc
//! running while a replication runs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

// 2023-11-14T01:00:00Z, so that two snapshots a day fall on the same UTC day.
const T0: u64 = 1_699_923_600;
const H: u64 = 3600;
const D: u64 = 86400;

fn names(repo: &str, volume: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&ok(&["list", repo, "--json"])).unwrap();
    v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == volume)
        .map(|x| {
            x["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn restore_eq(repo: &str, target: &str, want: &[u8], dir: &Path) {
    let out = dir.join(format!("{}.out", target.replace('@', "_")));
    ok(&["restore", repo, target, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "{target} differs");
}

#[test]
fn out_of_order_s1_s5_then_s3_is_inserted_and_s5_rebased() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(1, 8 * MIB);
    let mut s3 = s1.clone();
    s3[..MIB].copy_from_slice(&random(3, MIB));
    let mut s5 = s3.clone();
    s5[4 * MIB..5 * MIB].copy_from_slice(&random(5, MIB));
    write_image(&images, "vm", "s1", &s1, T0);
    write_image(&images, "vm", "s3", &s3, T0 + 3 * H);
    write_image(&images, "vm", "s5", &s5, T0 + 4 * H);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    replicate_json(&[&src, &repo, "--snapshot", "s1"]);
    let r5 = replicate_json(&[&src, &repo, "--snapshot", "s5"]);
    assert_eq!(r5[0]["base"], "s1");
    assert!(r5[0]["inserted_before"].is_null());
    let r3 = replicate_json(&[&src, &repo, "--snapshot", "s3"]);
    // s3 is nearer in age to s5 (1 h) than to s1 (3 h): the younger base is chosen.
    assert_eq!(r3[0]["base"], "s5");
    assert_eq!(r3[0]["base_reason"], "nearest-younger");
    assert_eq!(r3[0]["inserted_before"], "s5");
    // s5 kept s3's 1 MiB change: those 16 entries of 64 KiB are now redundant.
    assert_eq!(num(&r3[0], "redundant_entries_removed"), 16);
    // Only the 1 MiB where s3 and s5 differ was read and sent.
    assert_eq!(num(&r3[0], "read_bytes"), MIB as u64);
    assert_eq!(names(&repo, "vm"), ["s1", "s3", "s5"]);
    for (n, want) in [("s1", &s1), ("s3", &s3), ("s5", &s5)] {
        restore_eq(&repo, &format!("vm@{n}"), want, dir.path());
    }
    ok(&["verify", &repo, "--read-data"]);
}

#[test]
fn prune_keeps_the_right_snapshots_protects_the_replication_base_and_gc_reclaims() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(1, 4 * MIB);
    let mut versions = Vec::new();
    // Two a day for five days, each rewriting most of the volume.
    let times: Vec<u64> = (0..5)
        .flat_map(|d| [T0 + d * D, T0 + d * D + 2 * H])
        .collect();
    for (k, t) in times.iter().enumerate() {
        let off = (k % 4) * 256 * 1024;
        data[off..off + 3 * MIB].copy_from_slice(&random(100 + k as u64, 3 * MIB));
        write_image(&images, "vm", &format!("s{k}"), &data, *t);
        versions.push(data.clone());
    }
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    assert_eq!(replicate_json(&[&src, &repo]).len(), 10);

    let dry: serde_json::Value = serde_json::from_str(&ok(&[
        "prune",
        &repo,
        "--keep-last",
        "2",
        "--keep-daily",
        "3",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(names(&repo, "vm").len(), 10, "dry run changed something");
    let kept: Vec<String> = dry["volumes"][0]["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    // last 2: s8, s9; daily 3: newest of each of the last 3 days: s9, s7, s5.
    assert_eq!(kept, ["s5", "s7", "s8", "s9"]);

    ok(&["prune", &repo, "--keep-last", "2", "--keep-daily", "3"]);
    assert_eq!(names(&repo, "vm"), ["s5", "s7", "s8", "s9"]);

    // A second source (another host) feeds the same volume with an older snapshot: its
    // newest snapshot here is its replication base and survives --keep-last 1.
    let other = dir.path().join("other");
    write_image(&other, "vm", "x1", &random(7, 4 * MIB), T0 - D);
    replicate_json(&[&format!("raw:{}", other.display()), &repo]);
    let p: serde_json::Value =
        serde_json::from_str(&ok(&["prune", &repo, "--keep-last", "1", "--json"])).unwrap();
    let kept = &p["volumes"][0]["kept"];
    assert!(kept.to_string().contains("replication-base"), "{kept}");
    assert_eq!(names(&repo, "vm"), ["x1", "s9"]);
    ok(&["prune", &repo, "--keep-last", "1", "--force"]);
    assert_eq!(names(&repo, "vm"), ["s9"]);
    let out = run(&["prune", &repo]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "prune without rules is a usage error"
    );

    let packs = |r: &str| dir_bytes(&Path::new(r).join("packs"));
    let before = packs(&repo);
    let gc: serde_json::Value = serde_json::from_str(&ok(&["gc", &repo, "--json"])).unwrap();
    assert!(num(&gc, "bytes_freed") > 0);
    let after = packs(&repo);
    assert!(
        after * 2 < before,
        "gc freed too little: {before} -> {after}"
    );
    ok(&["verify", &repo, "--read-data"]);
    restore_eq(&repo, "vm@s9", &versions[9], dir.path());
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        dir_bytes(&e.path())
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn gc_while_a_replication_runs_both_succeed_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(1, 16 * MIB);
    write_image(&images, "vm", "s1", &s1, T0);
    let mut s2 = s1.clone();
    s2[..8 * MIB].copy_from_slice(&random(2, 8 * MIB));
    write_image(&images, "vm", "s2", &s2, T0 + H);
    let big = random(3, 160 * MIB);
    // s3 shares s1's data (dedup) and adds a lot of new data.
    let mut s3 = s1.clone();
    s3.extend_from_slice(&big);
    write_image(&images, "vm", "s3", &s3, T0 + 2 * H);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    replicate_json(&[&src, &repo, "--snapshot", "s1"]);
    replicate_json(&[&src, &repo, "--snapshot", "s2"]);
    // Make s1's unique blocks garbage, so gc has something to delete.
    ok(&["prune", &repo, "--keep-last", "1", "--force"]);

    let mut child = bin()
        .args(["replicate", &src, &repo, "--snapshot", "s3", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let locks = Path::new(&repo).join("locks");
    let start = Instant::now();
    while !std::fs::read_dir(&locks)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("session-"))
        })
        .unwrap_or(false)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no session lock appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "replication ended too early"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let gc = run(&["gc", &repo, "--json"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&["verify", &repo, "--read-data"]);
    restore_eq(&repo, "vm@s3", &s3, dir.path());
    restore_eq(&repo, "vm@s2", &s2, dir.path());
    // And gc again, with nothing running: still consistent.
    ok(&["gc", &repo]);
    ok(&["verify", &repo, "--read-data"]);
    restore_eq(&repo, "vm@s3", &s3, dir.path());
}
