//! End-to-end on S3: the real binary against a real S3 server (moto), through a TCP
//! proxy where a test needs to kill the server or make it ignore `If-None-Match`.

mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::s3::{self, Proxy, ProxyMode};
use common::*;

const T0: u64 = 1_700_000_000;

/// `s3://BUCKET/repo` in a fresh bucket (starting the server if needed), initialised.
fn s3_repo() -> (String, String) {
    s3::endpoint();
    let bucket = s3::create_bucket();
    let url = format!("s3://{bucket}/repo");
    ok(&["init", &url]);
    (bucket, url)
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn list_json(store: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["list", store, "--json"])).unwrap()
}

/// `(name, id)` of every snapshot of `volume` in `store`.
fn snapshot_ids(store: &str, volume: &str) -> Vec<(String, String)> {
    let l = list_json(store);
    let v = l["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume} in {store}: {l}"));
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn restore_equals(store: &str, target: &str, expected: &[u8], dir: &std::path::Path) {
    let out = dir.join(format!("{}.restored", target.replace('@', "-")));
    ok(&["restore", store, target, out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "restore of {target} from {store} differs"
    );
    std::fs::remove_file(out).unwrap();
}

fn verify_clean(store: &str) {
    let out = run(&["verify", store, "--read-data", "--json"]);
    assert!(
        out.status.success(),
        "verify --read-data {store} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn raw_to_s3_full_incremental_restore_verify() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(11, 64 * MIB);
    data[8 * MIB..16 * MIB].fill(0);
    let s1 = data.clone();
    write_image(&images, "vm", "s1", &data, T0);
    scribble(&mut data, 12, 20, 100 * 1024);
    write_image(&images, "vm", "s2", &data, T0 + 3600);
    let (_, url) = s3_repo();
    let src = format!("raw:{}", images.display());

    let t = Instant::now();
    let full = replicate_json(&[&src, &url, "--snapshot", "s1"]);
    let secs = t.elapsed().as_secs_f64();
    let sent = num(&full[0], "sent_bytes");
    assert!(full[0]["base"].is_null());
    assert!(
        sent >= 55 * MIB as u64 && sent <= 56 * MIB as u64 + 4096,
        "sent {sent}"
    );
    eprintln!(
        "raw -> s3 (moto): {:.1} MiB of packs in {secs:.2} s = {:.1} MiB/s",
        sent as f64 / MIB as f64,
        sent as f64 / MIB as f64 / secs
    );

    let incr = replicate_json(&[&src, &url]);
    assert_eq!(incr.len(), 1);
    assert_eq!(incr[0]["snapshot"], "s2");
    assert_eq!(incr[0]["base"], "s1");
    assert!(num(&incr[0], "sent_bytes") <= 20 * 3 * 65536);
    assert!(
        replicate_json(&[&src, &url]).is_empty(),
        "rerun sent something"
    );

    let names: Vec<String> = snapshot_ids(&url, "vm").into_iter().map(|x| x.0).collect();
    assert_eq!(names, ["s1", "s2"]);
    restore_equals(&url, "vm@s1", &s1, dir.path());
    restore_equals(&url, "vm@s2", &data, dir.path());
    verify_clean(&url);
}

#[test]
fn two_replicators_into_one_s3_repository_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_, url) = s3_repo();

    // Two hosts, two volumes, at the same time.
    let a = dir.path().join("host-a");
    let b = dir.path().join("host-b");
    let da = random(21, 40 * MIB);
    let db = random(22, 40 * MIB);
    write_image(&a, "vm-a", "s1", &da, T0);
    write_image(&b, "vm-b", "s1", &db, T0);
    let spawn = |src: &std::path::Path| {
        bin()
            .args([
                "replicate",
                &format!("raw:{}", src.display()),
                &url,
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn(&a), spawn(&b));
    for p in [pa, pb] {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(snapshot_ids(&url, "vm-a").len(), 1);
    assert_eq!(snapshot_ids(&url, "vm-b").len(), 1);
    restore_equals(&url, "vm-a@s1", &da, dir.path());
    restore_equals(&url, "vm-b@s1", &db, dir.path());

    // The same volume and snapshot from two hosts holding identical images: the same
    // name, but each host's snapshot has its own identity. One commits; the other
    // either finds it already there or loses the race and says so.
    let c = dir.path().join("host-c");
    let d = dir.path().join("host-d");
    let dc = random(23, 40 * MIB);
    write_image(&c, "vm", "s1", &dc, T0);
    write_image(&d, "vm", "s1", &dc, T0);
    let (pc, pd) = (spawn(&c), spawn(&d));
    let outs: Vec<Output> = [pc, pd]
        .into_iter()
        .map(|p| p.wait_with_output().unwrap())
        .collect();
    let succeeded = outs.iter().filter(|o| o.status.success()).count();
    assert!(succeeded >= 1, "{outs:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = one_line_error(o);
        eprintln!("same volume from two hosts, the loser: {err}");
        assert!(err.contains("vm@s1") || err.contains("vm"), "{err}");
        assert!(err.contains("already exists"), "{err}");
    }
    let ids = snapshot_ids(&url, "vm");
    assert_eq!(ids.len(), 1, "{ids:?}");
    restore_equals(&url, "vm@s1", &dc, dir.path());

    // And two hosts that share the snapshot's identity (the same source system): both
    // succeed, the loser of the commit race finding its snapshot already committed.
    let e = dir.path().join("host-e");
    let f = dir.path().join("host-f");
    let de = random(24, 40 * MIB);
    write_image(&e, "vm2", "s1", &de, T0);
    write_image(&f, "vm2", "s1", &de, T0);
    ok(&["list", &format!("raw:{}", e.display())]);
    std::fs::create_dir_all(f.join(".snapsync")).unwrap();
    std::fs::copy(e.join(".snapsync/system-id"), f.join(".snapsync/system-id")).unwrap();
    let (pe, pf) = (spawn(&e), spawn(&f));
    for p in [pe, pf] {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(snapshot_ids(&url, "vm2").len(), 1);
    restore_equals(&url, "vm2@s1", &de, dir.path());
    verify_clean(&url);
}

#[test]
fn server_killed_mid_replication_then_rerun_sends_only_what_was_missing() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let small = random(31, 4 * MIB);
    write_image(&images, "vm", "s1", &small, T0);
    let big = random(32, 160 * MIB);
    write_image(&images, "vm", "s2", &big, T0 + 60);
    let src = format!("raw:{}", images.display());

    s3::endpoint();
    let bucket = s3::create_bucket();
    let url = format!("s3://{bucket}/repo");
    let mut proxy = Proxy::start(ProxyMode::Transparent);
    let env = s3::env_via(&proxy.endpoint(), 3);
    ok_env(&["init", &url], &env);
    ok_env(&["replicate", &src, &url, "--snapshot", "s1"], &env);
    let before: Vec<String> = s3::list_objects(&bucket, "repo/index/")
        .into_iter()
        .map(|x| x.0)
        .collect();

    // The server dies as the third pack index of s2 is about to be written: two packs
    // (64 MiB) and their indexes are stored, others are in flight.
    proxy.kill_before_put("/repo/index/", 3);
    let t = Instant::now();
    let out = run_env(&["replicate", &src, &url, "--json"], &env);
    let err = one_line_error(&out);
    assert!(err.contains("s3://") || err.contains("127.0.0.1"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?} to give up",
        t.elapsed()
    );
    eprintln!("killed mid-replication: {err}");

    proxy.restart();
    // The earlier snapshot is intact, the cut one invisible.
    let names: Vec<String> = {
        let out = ok_env(&["list", &url, "--json"], &env);
        let l: serde_json::Value = serde_json::from_str(&out).unwrap();
        l["volumes"][0]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names, ["s1"]);
    restore_equals(&url, "vm@s1", &small, dir.path());
    verify_clean(&url);

    // What survived: packs whose index was written (blocks are stored uncompressed,
    // random data, 16-byte pack header).
    let packs: std::collections::HashMap<String, u64> = s3::list_objects(&bucket, "repo/packs/")
        .into_iter()
        .map(|(k, size)| (k.rsplit('/').next().unwrap().to_string(), size))
        .collect();
    let stored: u64 = s3::list_objects(&bucket, "repo/index/")
        .into_iter()
        .filter(|(k, _)| !before.contains(k))
        .map(|(k, _)| packs[k.rsplit('/').next().unwrap()] - 16)
        .sum();
    assert!(stored >= 64 * MIB as u64, "only {stored} bytes survived");

    let up0 = proxy.bytes_up();
    let rerun = json_lines(&ok_env(&["replicate", &src, &url, "--json"], &env));
    let up = proxy.bytes_up() - up0;
    assert_eq!(rerun.len(), 1);
    assert_eq!(rerun[0]["snapshot"], "s2");
    let sent = num(&rerun[0], "sent_bytes");
    assert_eq!(
        sent + stored,
        160 * MIB as u64,
        "rerun sent {sent}, {stored} survived"
    );
    assert!(
        up >= sent && up <= sent + 2 * MIB as u64,
        "{up} bytes went to the server for {sent} bytes of new blocks"
    );
    eprintln!(
        "rerun after the kill: sent {} MiB of 160 MiB ({} MiB survived), {} bytes on the wire",
        sent / MIB as u64,
        stored / MIB as u64,
        up
    );
    restore_equals(&url, "vm@s2", &big, dir.path());
    verify_clean(&url);
}

#[test]
fn a_server_that_ignores_if_none_match_is_refused() {
    s3::endpoint();
    let bucket = s3::create_bucket();
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(ProxyMode::StripIfNoneMatch);
    let out = run_env(&["init", &url], &s3::env_via(&proxy.endpoint(), 3));
    let err = one_line_error(&out);
    eprintln!("refused: {err}");
    assert!(err.contains("If-None-Match"), "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("overwrote"), "{err}");
    // Nothing is left behind: no config, no probe.
    assert_eq!(s3::list_objects(&bucket, ""), vec![]);
    // The same bucket straight to the server is fine.
    ok(&["init", &url]);
}

#[test]
fn a_dead_server_is_a_clear_error_within_the_retry_bound() {
    s3::endpoint();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let t = Instant::now();
    let out = run_env(&["init", "s3://nobody/repo"], &s3::env_via(&dead, 2));
    let err = one_line_error(&out);
    assert!(err.contains("s3://nobody/repo"), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(err.matches("refused").count(), 1, "repeats itself: {err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn cascade_raw_to_local_to_s3_to_local_stays_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(41, 24 * MIB);
    write_image(&images, "vm", "s1", &data, T0);
    scribble(&mut data, 42, 10, 64 * 1024);
    write_image(&images, "vm", "s2", &data, T0 + 3600);
    let raw = format!("raw:{}", images.display());
    let near = init_repo(dir.path(), &[]);
    let (_, cloud) = s3_repo();
    let far = format!("file://{}", dir.path().join("far").display());
    ok(&["init", &far]);

    let hops = [(&raw, &near), (&near, &cloud), (&cloud, &far)];
    for (src, dst) in hops {
        let r = replicate_json(&[src, dst, "--snapshot", "s1"]);
        assert_eq!(r.len(), 1, "{src} -> {dst}");
    }
    for (src, dst) in hops {
        let r = replicate_json(&[src, dst]);
        assert_eq!(r.len(), 1, "{src} -> {dst}: {r:?}");
        assert_eq!(r[0]["snapshot"], "s2");
        assert_eq!(r[0]["base"], "s1", "{src} -> {dst}: {r:?}");
        let sent = num(&r[0], "sent_bytes");
        assert!(sent <= 10 * 2 * 65536, "{src} -> {dst} sent {sent}");
    }
    let ids = snapshot_ids(&near, "vm");
    assert_eq!(snapshot_ids(&cloud, "vm"), ids);
    assert_eq!(snapshot_ids(&far, "vm"), ids);
    restore_equals(&far, "vm@s2", &data, dir.path());
    verify_clean(&cloud);
    verify_clean(&far);
}

#[test]
fn prune_and_gc_on_s3_keep_chains_valid_and_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut data = random(41, 4 * MIB);
    let mut versions = Vec::new();
    for k in 0..4u64 {
        let off = (k as usize) * 256 * 1024;
        data[off..off + 2 * MIB].copy_from_slice(&random(50 + k, 2 * MIB));
        write_image(&images, "vm", &format!("s{k}"), &data, T0 + k * 3600);
        versions.push(data.clone());
    }
    let (_bucket, url) = s3_repo();
    let src = format!("raw:{}", images.display());
    assert_eq!(
        json_lines(&ok(&["replicate", &src, &url, "--json"])).len(),
        4
    );
    ok(&["prune", &url, "--keep-last", "2"]);
    let names: Vec<String> = snapshot_ids(&url, "vm")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["s2", "s3"]);
    let gc: serde_json::Value = serde_json::from_str(&ok(&["gc", &url, "--json"])).unwrap();
    assert!(gc["bytes_freed"].as_u64().unwrap() > 0, "{gc}");
    verify_clean(&url);
    restore_equals(&url, "vm@s2", &versions[2], dir.path());
    restore_equals(&url, "vm@s3", &versions[3], dir.path());
}
