//! Performance: a 64 GiB sparse image with ~1% of clusters rewritten
//! between two snapshots. The diff must read only metadata and be fast.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::*;
use snapsync_qcow2::{ExtentKind, Qcow2Image, Qcow2Store, View};
use snapsync_store::{SnapshotRef, SnapshotSource};

const CLUSTER: u64 = 65536;
const SIZE: u64 = 64 << 30;

/// Deterministic xorshift so the test is reproducible.
fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn scattered(count: usize, seed: u64) -> BTreeSet<u64> {
    let clusters = SIZE / CLUSTER;
    let mut st = seed;
    let mut set = BTreeSet::new();
    while set.len() < count {
        set.insert(rng(&mut st) % clusters);
    }
    set
}

fn write_clusters(img: &std::path::Path, set: &BTreeSet<u64>, pattern: u8) {
    let cmds: Vec<String> = set
        .iter()
        .map(|c| format!("write -q -P {pattern} {} 512", c * CLUSTER + 1024))
        .collect();
    qemu_io(img, "qcow2", &cmds);
}

#[test]
fn diff_64g_one_percent() {
    let dir = tmp();
    let img = p(dir.path(), "big.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        &s(&img),
        "64G",
    ]);
    let count = (SIZE / CLUSTER / 100) as usize; // 1% of 1 Mi clusters
    let t0 = Instant::now();
    let first = scattered(count, 0x1234_5678_9abc_def1);
    write_clusters(&img, &first, 0x5a);
    qemu_img(&["snapshot", "-c", "s1", &s(&img)]);
    let second = scattered(count, 0x0fed_cba9_8765_4321);
    write_clusters(&img, &second, 0xa5);
    qemu_img(&["snapshot", "-c", "s2", &s(&img)]);
    println!("building the image took {:?}", t0.elapsed());

    let opened = Qcow2Image::open(&img).unwrap();
    let after_open = opened.metadata_bytes_read();
    let t = Instant::now();
    let ext = opened
        .diff(View::Snapshot(1), Some(View::Snapshot(0)))
        .unwrap();
    let elapsed = t.elapsed();
    let meta = opened.metadata_bytes_read() - after_open;
    println!(
        "diff of 64 GiB image, {} changed clusters: {} extents, {meta} metadata bytes read, {elapsed:?}",
        second.len(),
        ext.len()
    );
    assert_eq!(opened.data_bytes_read(), 0, "diff must not read guest data");
    // Two L1 tables (128 entries each) and at most one L2 table per
    // 512 MiB of guest space for each of the two views.
    let l2_tables = SIZE / (CLUSTER / 8 * CLUSTER);
    assert!(
        meta <= 2 * 128 * 8 + 2 * l2_tables * CLUSTER,
        "read {meta} bytes"
    );
    assert!(elapsed.as_secs_f64() < 5.0, "diff took {elapsed:?}");

    // Exactly the clusters written after s1 (rewrites of clusters shared
    // with s1 get new host clusters, new ones are newly allocated).
    let mut got = BTreeSet::new();
    for e in &ext {
        assert_eq!(e.kind, ExtentKind::Data);
        assert_eq!(e.offset % CLUSTER, 0);
        assert_eq!(e.len % CLUSTER, 0);
        for c in e.offset / CLUSTER..e.end() / CLUSTER {
            got.insert(c);
        }
    }
    assert_eq!(got, second);

    // Spot-check contents of a few changed clusters.
    let mut buf = vec![0u8; 512];
    for &c in second.iter().take(20) {
        opened
            .read_at(View::Snapshot(1), c * CLUSTER + 1024, &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0xa5));
    }
    // A second diff is served from the L2 cache.
    let before = opened.metadata_bytes_read();
    let t = Instant::now();
    let again = opened
        .diff(View::Snapshot(1), Some(View::Snapshot(0)))
        .unwrap();
    println!("cached diff took {:?}", t.elapsed());
    assert_eq!(again, ext);
    assert_eq!(opened.metadata_bytes_read(), before);

    // The same diff through the store API, as the engine asks for it (estimate for the
    // choice of base, then the diff itself), from a freshly opened store.
    let store = Qcow2Store::open(&img).unwrap();
    let after_open = store.metadata_bytes_read();
    let t = Instant::now();
    let estimate = store
        .estimate_diff("big", "s2", SnapshotRef::new("big", "s1"))
        .unwrap();
    let d = store
        .diff("big", "s2", Some(SnapshotRef::new("big", "s1")))
        .unwrap();
    let elapsed = t.elapsed();
    let meta = store.metadata_bytes_read() - after_open;
    println!(
        "store: estimate + diff of 64 GiB image: {} changed bytes, {meta} metadata bytes read, {} data bytes read, {elapsed:?}",
        d.changed().total_len(),
        store.data_bytes_read()
    );
    assert_eq!(estimate, second.len() as u64 * CLUSTER);
    assert_eq!(d.data.total_len(), second.len() as u64 * CLUSTER);
    assert!(d.zero.is_empty());
    assert_eq!(
        store.data_bytes_read(),
        0,
        "the store's diff read guest data"
    );
    assert!(
        meta <= 2 * 128 * 8 + 2 * l2_tables * CLUSTER,
        "store read {meta} bytes"
    );
    assert!(elapsed.as_secs_f64() < 5.0, "store diff took {elapsed:?}");
}
