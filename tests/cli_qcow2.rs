//! End-to-end tests of the qcow2 store through the binary, with qemu-img as the oracle:
//! internal snapshots and backing chains restore byte-identical to `qemu-img convert`,
//! diffs cover every changed byte and no more than the changed clusters, incremental
//! replications read and send in proportion to the clusters written, clones send only
//! their own clusters, `restore --format qcow2` passes `qemu-img check` and `compare`,
//! and broken images fail with one line.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const K64: u64 = 64 << 10;

fn create(img: &Path, opts: &str, backing: Option<(&str, &str)>, size: Option<u64>) {
    let mut a: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    a.extend(["-o".into(), opts.to_string()]);
    if let Some((b, f)) = backing {
        a.extend(["-b".into(), b.into(), "-F".into(), f.into()]);
    }
    a.push(img.to_str().unwrap().into());
    if let Some(n) = size {
        a.push(n.to_string());
    }
    qemu_img(&a.iter().map(String::as_str).collect::<Vec<_>>());
}

fn snap(img: &Path, name: &str) {
    qemu_img(&["snapshot", "-c", name, img.to_str().unwrap()]);
}

/// Write distinct random clusters (no dedup between them) at the given cluster indices.
fn write_clusters(img: &Path, cluster: u64, indices: &[u64], seed: u64) {
    for &i in indices {
        qemu_write(
            img,
            "qcow2",
            i * cluster,
            &random(seed * 1_000_003 + i, cluster as usize),
        );
    }
}

fn url(p: &Path) -> String {
    format!("qcow2://{}", p.display())
}

fn list_json(store: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["list", store, "--json"])).unwrap()
}

fn volume<'a>(l: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    l["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {l}"))
}

fn snapshot_size(store: &str, vol: &str, name: &str) -> u64 {
    let l = list_json(store);
    let v = volume(&l, vol);
    let s = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {vol}@{name} in {l}"));
    num(s, "size")
}

/// Restore `vol@name` from `store` as raw and compare with `want`.
fn restores_to(store: &str, vol: &str, name: &str, want: &[u8], dir: &Path) {
    let out = dir.join(format!("restored-{vol}-{name}.raw"));
    ok(&[
        "restore",
        store,
        &format!("{vol}@{name}"),
        out.to_str().unwrap(),
    ]);
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(got.len(), want.len(), "{store} {vol}@{name}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{store} {vol}@{name}: differs from qemu-img at byte {i}");
    }
}

/// `restore --format qcow2`, then `qemu-img check` and `qemu-img compare` against
/// `want` (raw bytes).
fn restores_to_qcow2(store: &str, vol: &str, name: &str, want: &[u8], dir: &Path) {
    let out = dir.join(format!("restored-{vol}-{name}.qcow2"));
    let raw = dir.join(format!("want-{vol}-{name}.raw"));
    std::fs::write(&raw, want).unwrap();
    let (o, r) = (out.to_str().unwrap(), raw.to_str().unwrap());
    ok(&[
        "restore",
        store,
        &format!("{vol}@{name}"),
        o,
        "--format",
        "qcow2",
    ]);
    qemu_img(&["check", "-q", "-f", "qcow2", o]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", o, r]);
    // Zero clusters stay unallocated.
    let zero_clusters = want
        .chunks(K64 as usize)
        .filter(|c| c.iter().all(|b| *b == 0))
        .count() as u64;
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", o])).unwrap();
    let size = num(&info, "virtual-size");
    let allocated =
        serde_json::from_str::<serde_json::Value>(&qemu_img(&["map", "--output=json", o]))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| num(e, "length"))
            .sum::<u64>();
    assert!(
        allocated <= size.next_multiple_of(K64) - zero_clusters * K64,
        "{vol}@{name}: {allocated} bytes allocated with {zero_clusters} zero clusters"
    );
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&raw).unwrap();
}

/// `diff --json` extents: must cover every changed byte, and every cluster (of
/// `cluster` bytes) they touch must hold a changed byte.
fn check_diff_cli(store: &str, target: &str, base: &str, old: &[u8], new: &[u8], cluster: u64) {
    let d: serde_json::Value =
        serde_json::from_str(&ok(&["diff", store, target, "--base", base, "--json"])).unwrap();
    let ext: Vec<(u64, u64)> = d["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect();
    let mut old = old.to_vec();
    old.resize(new.len(), 0);
    let mut covered = vec![false; new.len()];
    for &(o, l) in &ext {
        covered[o as usize..(o + l) as usize].fill(true);
        for c in o / cluster..(o + l).div_ceil(cluster) {
            let (a, b) = (
                (c * cluster) as usize,
                (((c + 1) * cluster) as usize).min(new.len()),
            );
            assert!(
                new[a..b] != old[a..b],
                "{target} vs {base}: extent ({o}, {l}) covers unchanged cluster {c}"
            );
        }
    }
    if let Some(i) = (0..new.len()).find(|&i| new[i] != old[i] && !covered[i]) {
        panic!("{target} vs {base}: byte {i} changed but is not in the diff {ext:?}");
    }
    for z in d["zero_extents"].as_array().unwrap() {
        let (o, l) = (
            z[0].as_u64().unwrap() as usize,
            z[1].as_u64().unwrap() as usize,
        );
        assert!(
            new[o..o + l].iter().all(|b| *b == 0),
            "zero extent has data"
        );
    }
}

fn reports_by_snapshot(
    reports: &[serde_json::Value],
) -> std::collections::HashMap<String, serde_json::Value> {
    reports
        .iter()
        .map(|r| {
            (
                format!(
                    "{}@{}",
                    r["volume"].as_str().unwrap(),
                    r["snapshot"].as_str().unwrap()
                ),
                r.clone(),
            )
        })
        .collect()
}

#[test]
fn internal_snapshots_replicate_incrementally_and_restore_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("vm.qcow2");
    let size = 8 << 20;
    create(&img, "cluster_size=65536", None, Some(size));
    let first: Vec<u64> = (0..128).filter(|i| i % 4 != 1).collect();
    write_clusters(&img, K64, &first, 1);
    snap(&img, "s1");
    let second = [3u64, 17, 18, 50, 77, 100, 101, 102, 120, 127];
    write_clusters(&img, K64, &second, 2);
    snap(&img, "s2");
    // Then zeros, a discard, a partial write and growth.
    qemu_io(
        &img,
        "qcow2",
        &[
            format!("write -q -z {} {}", 20 * K64, 2 * K64),
            format!("discard -q {} {}", 40 * K64, K64),
            format!("write -q -P 0x77 {} 4096", 60 * K64 + 8192),
        ],
    );
    qemu_img(&["resize", "-q", img.to_str().unwrap(), "9M"]);
    write_clusters(&img, K64, &[140], 3);
    snap(&img, "s3");
    let store = url(&images);

    let l = list_json(&store);
    let v = volume(&l, "vm");
    let names: Vec<&str> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2", "s3"]);
    assert!(v["origin"].is_null());

    let mut content = Vec::new();
    for s in ["s1", "s2", "s3"] {
        let n = snapshot_size(&store, "vm", s);
        content.push(qemu_raw(&img, Some(s), n));
    }
    assert_eq!(content[2].len(), 9 << 20);
    check_diff_cli(&store, "vm@s2", "s1", &content[0], &content[1], K64);
    check_diff_cli(&store, "vm@s3", "s2", &content[1], &content[2], K64);
    check_diff_cli(&store, "vm@s3", "s1", &content[0], &content[2], K64);

    let repo = init_repo(dir.path(), &[]);
    let reports = replicate_json(&[&store, &repo]);
    let by = reports_by_snapshot(&reports);
    assert_eq!(reports.len(), 3, "{reports:?}");
    let full = &by["vm@s1"];
    assert!(full["base"].is_null());
    // A full replication reads only the allocated clusters.
    assert_eq!(num(full, "read_bytes"), first.len() as u64 * K64, "{full}");
    let inc = &by["vm@s2"];
    assert_eq!(inc["base"], "s1");
    let written = second.len() as u64 * K64;
    assert_eq!(num(inc, "read_bytes"), written, "{inc}");
    let sent = num(inc, "sent_bytes");
    assert!(
        sent >= written * 9 / 10 && sent <= written + written / 20 + 4096,
        "sent {sent} for {written} bytes of new clusters: {inc}"
    );
    let third = &by["vm@s3"];
    assert_eq!(third["base"], "s2");
    // 2 zero clusters are known zero without reading (qemu-io's discard is ignored
    // without `-d unmap`); the partly rewritten cluster and the one written past the old
    // end are read, and nothing else: growth adds zeros the base's padding already has.
    assert_eq!(num(third, "changed_bytes"), 4 * K64, "{third}");
    assert_eq!(num(third, "read_bytes"), 2 * K64, "{third}");

    for (k, s) in ["s1", "s2", "s3"].iter().enumerate() {
        restores_to(&repo, "vm", s, &content[k], dir.path());
        restores_to(&store, "vm", s, &content[k], dir.path());
    }
    restores_to_qcow2(&store, "vm", "s3", &content[2], dir.path());
    restores_to_qcow2(&repo, "vm", "s2", &content[1], dir.path());

    // Nothing left to send; a new snapshot is incremental from the newest.
    assert!(replicate_json(&[&store, &repo]).is_empty());
    write_clusters(&img, K64, &[5], 4);
    snap(&img, "s4");
    let r = replicate_json(&[&store, &repo]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["base"], "s3");
    assert_eq!(num(&r[0], "read_bytes"), K64);
}

/// v2 base (compat=0.10, 4 KiB clusters) <- mid <- { a <- a-top, b <- b-top }: layers
/// are snapshots, a and b are clones of a@mid.
#[test]
fn backing_chains_and_clones() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let base = images.join("base.qcow2");
    create(&base, "compat=0.10,cluster_size=4096", None, Some(4 << 20));
    let base_clusters: Vec<u64> = (0..64).map(|i| i * 3).collect();
    write_clusters(&base, 16384, &base_clusters, 10);
    let mid = images.join("mid.qcow2");
    create(
        &mid,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
        None,
    );
    write_clusters(&mid, K64, &[1, 2, 30], 11);
    let a = images.join("a.qcow2");
    create(&a, "cluster_size=65536", Some(("mid.qcow2", "qcow2")), None);
    write_clusters(&a, K64, &[4, 5, 6, 7], 12);
    let a_top = images.join("a-top.qcow2");
    create(
        &a_top,
        "cluster_size=65536",
        Some(("a.qcow2", "qcow2")),
        None,
    );
    let b = images.join("b.qcow2");
    create(&b, "cluster_size=65536", Some(("mid.qcow2", "qcow2")), None);
    write_clusters(&b, K64, &[8, 9], 13);
    let b_top = images.join("b-top.qcow2");
    create(
        &b_top,
        "cluster_size=65536",
        Some(("b.qcow2", "qcow2")),
        None,
    );
    write_clusters(&b_top, K64, &[10], 14);
    snap(&b_top, "b-now");
    let store = url(&images);

    let l = list_json(&store);
    let va = volume(&l, "a-top");
    let vb = volume(&l, "b-top");
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(va), ["base", "mid", "a"]);
    assert_eq!(names(vb), ["b", "b-now"]);
    assert_eq!(vb["origin"]["volume"], "a-top");
    assert_eq!(vb["origin"]["snapshot"], "mid");
    assert_eq!(l["volumes"].as_array().unwrap().len(), 2);
    let text = ok(&["list", &store]);
    assert!(text.contains("(clone of a-top@mid)"), "{text}");

    let layers = [
        ("a-top", "base", &base),
        ("a-top", "mid", &mid),
        ("a-top", "a", &a),
        ("b-top", "b", &b),
    ];
    let mut content = std::collections::HashMap::new();
    for (v, s, path) in layers {
        let n = snapshot_size(&store, v, s);
        content.insert(s, qemu_raw(path, None, n));
    }
    let n = snapshot_size(&store, "b-top", "b-now");
    content.insert("b-now", qemu_raw(&b_top, Some("b-now"), n));
    check_diff_cli(
        &store,
        "a-top@a",
        "mid",
        &content["mid"],
        &content["a"],
        K64,
    );
    check_diff_cli(
        &store,
        "b-top@b",
        "a-top@mid",
        &content["mid"],
        &content["b"],
        K64,
    );
    check_diff_cli(
        &store,
        "b-top@b-now",
        "b",
        &content["b"],
        &content["b-now"],
        K64,
    );

    let repo = init_repo(dir.path(), &[]);
    let ra = reports_by_snapshot(&replicate_json(&[&store, &repo, "--volume", "a-top"]));
    assert_eq!(ra.len(), 3);
    assert_eq!(num(&ra["a-top@mid"], "read_bytes"), 3 * K64);
    assert_eq!(num(&ra["a-top@a"], "read_bytes"), 4 * K64);
    // Clone b after a: a delta against a@mid, so only b's own clusters.
    let rb = reports_by_snapshot(&replicate_json(&[&store, &repo, "--volume", "b-top"]));
    assert_eq!(rb.len(), 2, "{rb:?}");
    let first = &rb["b-top@b"];
    assert_eq!(first["base"], "mid", "{first}");
    assert_eq!(num(first, "read_bytes"), 2 * K64, "{first}");
    let sent = num(first, "sent_bytes");
    assert!(sent > K64 && sent <= 2 * K64 + 4096, "{first}");
    assert_eq!(num(&rb["b-top@b-now"], "read_bytes"), K64);

    for (v, s, _) in layers {
        restores_to(&repo, v, s, &content[s], dir.path());
    }
    restores_to(&repo, "b-top", "b-now", &content["b-now"], dir.path());
    restores_to_qcow2(&store, "b-top", "b-now", &content["b-now"], dir.path());
    restores_to_qcow2(&store, "a-top", "base", &content["base"], dir.path());
}

/// Compressed (zlib, zstd), extended L2, 512-byte and 2 MiB clusters, a raw backing
/// file: each replicates and restores byte-identical, also as qcow2.
#[test]
fn compressed_extended_l2_and_odd_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    for (k, c) in data.chunks_mut(K64 as usize).enumerate() {
        match k % 3 {
            0 => c.copy_from_slice(&random(k as u64, c.len())),
            1 => c.fill(k as u8),
            _ => {}
        }
    }
    std::fs::write(&src, &data).unwrap();
    let s = src.to_str().unwrap();
    let mk = |name: &str, opts: &str, compress: bool| {
        let img = images.join(name);
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts];
        if compress {
            a.push("-c");
        }
        a.extend([s, img.to_str().unwrap()]);
        qemu_img(&a);
        snap(&img, "one");
        write_clusters(&img, 4096, &[3, 200, 500], 7);
        qemu_io(&img, "qcow2", &["write -q -z 1048576 65536".to_string()]);
        snap(&img, "two");
        img
    };
    let imgs = [
        mk("zlib.qcow2", "compression_type=zlib", true),
        mk("zstd.qcow2", "compression_type=zstd", true),
        mk("ext.qcow2", "extended_l2=on,cluster_size=131072", false),
        mk("tiny.qcow2", "cluster_size=512", false),
        mk("huge.qcow2", "cluster_size=2097152", false),
    ];
    // A raw backing file under a qcow2 overlay.
    let over = images.join("over.qcow2");
    create(
        &over,
        "cluster_size=65536",
        Some(("../src.raw", "raw")),
        None,
    );
    write_clusters(&over, K64, &[2], 8);
    snap(&over, "one");

    // The raw base lies outside the store's directory: allowed by the URL.
    let store = format!("{}?backing=any", url(&images));
    let repo = init_repo(dir.path(), &[]);
    let reports = replicate_json(&[&store, &repo]);
    let by = reports_by_snapshot(&reports);
    for img in &imgs {
        let v = img.file_stem().unwrap().to_str().unwrap();
        let mut prev: Option<Vec<u8>> = None;
        for sn in ["one", "two"] {
            let want = qemu_raw(img, Some(sn), snapshot_size(&store, v, sn));
            restores_to(&repo, v, sn, &want, dir.path());
            if let Some(p) = &prev {
                // 3 small writes and one zeroed 64 KiB range, whatever the cluster size.
                let r = &by[&format!("{v}@two")];
                assert!(num(r, "read_bytes") <= 4 * K64.max(2 << 20), "{r}");
                // Rewriting part of a cluster a snapshot shares copies the whole cluster
                // (extended L2 too: one host offset per cluster), so the diff is exact
                // to the cluster.
                let cluster = match v {
                    "huge" => 2 << 20,
                    "ext" => 131072,
                    _ => 512,
                };
                if v != "zlib" && v != "zstd" {
                    check_diff_cli(
                        &store,
                        &format!("{v}@two"),
                        "one",
                        p,
                        &want,
                        cluster.max(512),
                    );
                }
            }
            prev = Some(want);
        }
        restores_to_qcow2(&store, v, "two", prev.as_ref().unwrap(), dir.path());
    }
    let want = qemu_raw(&over, Some("one"), snapshot_size(&store, "over", "one"));
    restores_to(&repo, "over", "one", &want, dir.path());
    // The raw backing file is a snapshot of the overlay's volume too.
    let l = list_json(&store);
    assert_eq!(volume(&l, "over")["snapshots"][0]["name"], "src", "{l}");
}

fn one_line_error(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("snapsync: error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn broken_and_encrypted_images_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        enc.to_str().unwrap(),
        "1M",
    ]);
    let err = one_line_error(&run(&["list", &url(&enc)]));
    assert!(
        err.contains("enc.qcow2") && err.contains("encryption"),
        "{err}"
    );

    let bad = dir.path().join("bad.qcow2");
    create(&bad, "cluster_size=65536", None, Some(1 << 20));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(200)
        .unwrap();
    let repo = init_repo(dir.path(), &[]);
    let err = one_line_error(&run(&["replicate", &url(&bad), &repo]));
    assert!(
        err.contains("bad.qcow2") && err.contains("malformed"),
        "{err}"
    );

    let not = dir.path().join("plain.raw");
    std::fs::write(&not, vec![0u8; 4096]).unwrap();
    let err = one_line_error(&run(&["list", &url(&not)]));
    assert!(err.contains("not a qcow2 image"), "{err}");

    let good = dir.path().join("ok.qcow2");
    create(&good, "cluster_size=65536", None, Some(1 << 20));
    snap(&good, "s");
    let err = one_line_error(&run(&["replicate", &repo, &url(&good)]));
    assert!(err.contains("source only"), "{err}");
    let err = one_line_error(&run(&[
        "restore",
        &url(&good),
        "ok@nope",
        "/tmp/x.qcow2",
        "--format",
        "qcow2",
    ]));
    assert!(err.contains("ok@nope"), "{err}");
    let _: PathBuf = good;
}
