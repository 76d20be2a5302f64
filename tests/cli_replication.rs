//! End-to-end: the real binary, real raw images of tens of MiB, a repository on disk.

mod common;

use common::*;

const T0: u64 = 1_700_000_000;

#[test]
fn full_then_incremental_then_rerun_sends_nothing_and_restores_identical() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(1, 32 * MIB);
    data[8 * MIB..16 * MIB].fill(0); // sparse region
    write_image(&images, "vm", "s1", &data, T0);
    scribble(&mut data, 2, 20, 100 * 1024); // ~2 MiB scattered
    write_image(&images, "vm", "s2", &data, T0 + 3600);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());

    let full = replicate_json(&[&src, &repo, "--snapshot", "s1"]);
    assert_eq!(full.len(), 1);
    assert!(full[0]["base"].is_null());
    assert_eq!(num(&full[0], "read_bytes"), 32 * MIB as u64);
    // Random data does not compress; the zero region costs nothing.
    let sent = num(&full[0], "sent_bytes");
    assert!(
        sent <= 24 * MIB as u64 + 4096 && sent >= 23 * MIB as u64,
        "sent {sent}"
    );

    let incr = replicate_json(&[&src, &repo]);
    assert_eq!(incr.len(), 1);
    assert_eq!(incr[0]["snapshot"], "s2");
    assert_eq!(incr[0]["base"], "s1");
    let changed = num(&incr[0], "changed_bytes");
    // 20 writes of 100 KiB touch at most 3 blocks of 64 KiB each.
    assert!(changed <= 20 * 3 * 65536, "changed {changed}");
    assert!(num(&incr[0], "read_bytes") <= 20 * 3 * 65536);
    assert!(num(&incr[0], "sent_bytes") <= 20 * 3 * 65536);
    assert!(num(&incr[0], "sent_bytes") >= 20 * 100 * 1024);
    for key in [
        "volume",
        "snapshot",
        "base",
        "changed_bytes",
        "read_bytes",
        "sent_bytes",
        "dedup_bytes",
        "duration_ms",
    ] {
        assert!(incr[0].get(key).is_some(), "{key} missing");
    }

    assert!(
        replicate_json(&[&src, &repo]).is_empty(),
        "rerun sent something"
    );
    assert!(replicate_json(&[&src, &repo, "--snapshot", "s2"]).is_empty());

    let s2_out = dir.path().join("s2.out");
    ok(&["restore", &repo, "vm@s2", s2_out.to_str().unwrap()]);
    assert!(
        std::fs::read(&s2_out).unwrap() == data,
        "restore of s2 differs"
    );
    let s1_out = dir.path().join("s1.out");
    ok(&["restore", &repo, "vm@s1", s1_out.to_str().unwrap()]);
    let original = std::fs::read(images.join("vm/s1.img")).unwrap();
    assert!(std::fs::read(&s1_out).unwrap() == original);
    // Sparse: the 8 MiB zero region is a hole.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&s1_out).unwrap().blocks() * 512;
    assert!(
        blocks < 26 * MIB as u64,
        "restore is not sparse: {blocks} bytes allocated"
    );

    let list: serde_json::Value = serde_json::from_str(&ok(&["list", &repo, "--json"])).unwrap();
    let vol = &list["volumes"][0];
    assert_eq!(vol["name"], "vm");
    assert_eq!(num(vol, "size"), 32 * MIB as u64);
    let snaps = vol["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["created"], "2023-11-14T22:13:20Z");
    assert_eq!(snaps[0]["id"].as_str().unwrap().len(), 64);
    // Identity is preserved: the source lists the same ids (and says where its ages
    // came from, which a repository records rather than derives).
    let src_list: serde_json::Value = serde_json::from_str(&ok(&["list", &src, "--json"])).unwrap();
    let mut src_snaps = src_list["volumes"][0]["snapshots"].clone();
    for s in src_snaps.as_array_mut().unwrap() {
        assert_eq!(s["age_from"], "mtime", "{s}");
        s.as_object_mut().unwrap().remove("age_from");
    }
    assert_eq!(src_snaps, vol["snapshots"]);

    let verify: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(verify["ok"], true);
}

#[test]
fn dedup_across_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let data = random(5, 16 * MIB);
    write_image(&images, "a", "s1", &data, T0);
    let mut other = data.clone();
    scribble(&mut other, 6, 4, 64 * 1024);
    write_image(&images, "b", "s1", &other, T0);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    let r = replicate_json(&[&src, &repo]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[1]["volume"], "b");
    assert!(num(&r[1], "sent_bytes") <= 8 * 65536, "{}", r[1]);
    assert!(num(&r[1], "dedup_bytes") >= 15 * MIB as u64);
}

#[test]
fn base_is_found_through_hints_after_older_snapshots_vanish_at_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(9, 16 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    scribble(&mut data, 10, 4, 100 * 1024);
    write_image(&images, "vm", "s2", &data, T0 + 60);
    let repo = init_repo(dir.path(), &[]);
    let src = format!("raw:{}", images.display());
    assert_eq!(replicate_json(&[&src, &repo]).len(), 2);
    // The source expires s1 and takes s3.
    std::fs::remove_file(images.join("vm/s1.img")).unwrap();
    scribble(&mut data, 11, 4, 100 * 1024);
    write_image(&images, "vm", "s3", &data, T0 + 120);
    let r = replicate_json(&[&src, &repo]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["base"], "s2");
    assert!(num(&r[0], "sent_bytes") <= 4 * 3 * 65536);
    let out = dir.path().join("s3.out");
    ok(&["restore", &repo, "vm@s3", out.to_str().unwrap()]);
    assert!(std::fs::read(out).unwrap() == data);
}

#[test]
fn cascade_repository_to_repository_stays_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(21, 8 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    let a = init_repo(&dir.path().join("a"), &[]);
    let b = init_repo(&dir.path().join("b"), &[]);
    let src = format!("raw:{}", images.display());
    replicate_json(&[&src, &a]);
    replicate_json(&[&a, &b]);
    scribble(&mut data, 22, 2, 64 * 1024);
    write_image(&images, "vm", "s2", &data, T0 + 10);
    replicate_json(&[&src, &a]);
    let r = replicate_json(&[&a, &b]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["base"], "s1");
    assert!(num(&r[0], "read_bytes") <= 4 * 65536);
    let ids = |url: &str| {
        let v: serde_json::Value = serde_json::from_str(&ok(&["list", url, "--json"])).unwrap();
        let mut snaps = v["volumes"][0]["snapshots"].clone();
        // Only a raw: source says where its ages came from.
        for s in snaps.as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("age_from");
        }
        snaps
    };
    assert_eq!(ids(&b), ids(&src));
    let out = dir.path().join("s2.out");
    ok(&["restore", &b, "vm@s2", out.to_str().unwrap()]);
    assert!(std::fs::read(out).unwrap() == data);
}

#[test]
fn diff_reports_changed_extents() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(31, 4 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    data[MIB + 5] ^= 1;
    data[3 * MIB..3 * MIB + 65536].fill(0);
    write_image(&images, "vm", "s2", &data, T0 + 1);
    let src = format!("raw:{}", images.display());
    let d: serde_json::Value =
        serde_json::from_str(&ok(&["diff", &src, "vm@s2", "--base", "s1", "--json"])).unwrap();
    assert_eq!(d["changed_bytes"], 2 * 65536);
    assert_eq!(
        d["extents"],
        serde_json::json!([[MIB, 65536], [3 * MIB, 65536]])
    );
    let repo = init_repo(dir.path(), &["--block-size", "4096"]);
    replicate_json(&[&src, &repo]);
    let d: serde_json::Value =
        serde_json::from_str(&ok(&["diff", &repo, "vm@s2", "--base", "s1", "--json"])).unwrap();
    // The repository knows 4 KiB blocks: a finer diff, from metadata alone.
    assert_eq!(
        d["extents"],
        serde_json::json!([[MIB, 4096], [3 * MIB, 65536]])
    );
    assert_eq!(d["changed_bytes"], 4096 + 65536);
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(&["replicate"]).status.code(), Some(2));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    let missing = dir.path().join("nothing");
    for args in [
        vec!["list", missing.to_str().unwrap()],
        vec!["verify", "raw:/tmp"],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("snapsync: error: "), "{err}");
        assert!(!err.contains("panicked"));
    }
    let repo = init_repo(dir.path(), &[]);
    let out = run(&["init", &repo]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&[
        "init",
        dir.path().join("r2").to_str().unwrap(),
        "--block-size",
        "1000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    let out = run(&["restore", &repo, "vm@nope", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(1));
    // A target that can name no snapshot is a usage error (tests/cli_usage.rs has more).
    let out = run(&["restore", &repo, "no-at-sign", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
}
