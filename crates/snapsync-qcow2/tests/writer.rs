//! The writer must produce images that `qemu-img check` finds clean and
//! `qemu-img compare` finds equal to the source data.

mod common;

use std::process::Command;

use common::*;
use snapsync_qcow2::{ExtentKind, Qcow2Image, Qcow2Writer, View, DEFAULT_CLUSTER_SIZE};

/// Source data with data runs, zero runs and an unaligned tail.
fn source(size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    let mut st = 0x2545_f491_4f6c_dd1du64;
    let mut pos = 0;
    while pos < size {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        let run = (st % 200_000) as usize + 1;
        let end = (pos + run).min(size);
        if !st.is_multiple_of(3) {
            for (i, b) in d[pos..end].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(st as u8) | 1;
            }
        }
        pos = end;
    }
    d
}

fn roundtrip(size: usize, cluster: u64, chunk_clusters: usize) {
    let dir = tmp();
    let raw = p(dir.path(), "src.raw");
    let img = p(dir.path(), "out.qcow2");
    let data = source(size);
    std::fs::write(&raw, &data).unwrap();
    let mut w = Qcow2Writer::new(&img, size as u64, cluster).unwrap();
    let step = cluster as usize * chunk_clusters;
    for (i, chunk) in data.chunks(step).enumerate() {
        // Skip some all-zero chunks entirely, pass others through (the
        // writer must leave zero clusters unallocated either way).
        if i % 2 == 0 && chunk.iter().all(|&b| b == 0) {
            continue;
        }
        w.write_at((i * step) as u64, chunk).unwrap();
    }
    w.finish().unwrap();

    let check = Command::new("qemu-img")
        .args(["check", &s(&img)])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "qemu-img check failed: {out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(out.contains("No errors were found"), "{out}");
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &s(&img),
        &s(&raw),
    ]);

    let opened = Qcow2Image::open(&img).unwrap();
    assert_eq!(opened.version(), 3);
    assert_eq!(opened.virtual_size(), (size as u64).next_multiple_of(512));
    let mut back = read_view(&opened, View::Active);
    assert!(back[size..].iter().all(|&b| b == 0));
    back.truncate(size);
    assert_same(&back, &data, "writer roundtrip");
    // Zero clusters are not allocated.
    let alloc = opened.allocated(View::Active).unwrap();
    let mut padded = data.clone();
    padded.resize(back.len().next_multiple_of(512), 0);
    check_diff(&[], &padded, &alloc, cluster, true, "writer allocation");
    assert!(alloc.iter().all(|e| e.kind == ExtentKind::Data));
}

#[test]
fn roundtrip_default_cluster() {
    roundtrip(5 * 1024 * 1024 + 3000, DEFAULT_CLUSTER_SIZE, 3);
}

#[test]
fn roundtrip_512() {
    // 512-byte clusters: 64 clusters per L2 table, many L2 tables, and a
    // refcount table spanning several clusters.
    roundtrip(3 * 1024 * 1024 + 100, 512, 7);
}

#[test]
fn roundtrip_2m() {
    roundtrip(9 * 1024 * 1024, 2 * 1024 * 1024, 1);
}

#[test]
fn empty_and_all_zero_images() {
    let dir = tmp();
    for (name, size) in [("zero.qcow2", 0u64), ("sparse.qcow2", 1 << 30)] {
        let img = p(dir.path(), name);
        let mut w = Qcow2Writer::new(&img, size, DEFAULT_CLUSTER_SIZE).unwrap();
        if size > 0 {
            w.write_at(0, &vec![0u8; 65536 * 4]).unwrap();
        }
        w.finish().unwrap();
        let out = qemu_img(&["check", &s(&img)]);
        assert!(out.contains("No errors"), "{out}");
        let opened = Qcow2Image::open(&img).unwrap();
        assert!(opened.allocated(View::Active).unwrap().is_empty());
    }
}

#[test]
fn writer_rejects_bad_requests() {
    let dir = tmp();
    let img = p(dir.path(), "bad.qcow2");
    assert!(Qcow2Writer::new(&img, 1 << 20, 1000).is_err());
    assert!(Qcow2Writer::new(&img, 1 << 20, 4 << 20).is_err());
    assert!(Qcow2Writer::new(&img, u64::MAX, 512).is_err());
    let mut w = Qcow2Writer::new(&img, 1 << 20, 4096).unwrap();
    assert!(w.write_at(100, &[1]).is_err());
    w.write_at(8192, &[1; 5000]).unwrap();
    assert!(w.write_at(8192, &[1]).is_err(), "not increasing");
    assert!(
        w.write_at(12288, &[1]).is_err(),
        "overlaps the previous partial cluster"
    );
    assert!(w.write_at(1 << 20, &[1]).is_err(), "past the end");
    w.write_at(16384, &[2; 4096]).unwrap();
    w.finish().unwrap();
    let out = qemu_img(&["check", &s(&img)]);
    assert!(out.contains("No errors"), "{out}");
}

/// `restore_qcow2` reports progress by the one contract: one phase, advanced by exactly
/// the bytes it announced and read, then finished.
#[test]
fn restore_reports_progress_of_what_it_reads() {
    use snapsync_store::memory::MemoryStore;
    use snapsync_store::RecordedProgress;

    let dir = tmp();
    let src = MemoryStore::new("src", 4096);
    // Data in the last, partial cluster too: the total is what is read, not the
    // cluster-aligned extent past the end.
    let mut data = vec![0u8; (1 << 20) + 1000];
    data[300_000..400_000].fill(9);
    data[(1 << 20) + 10] = 1;
    src.add_snapshot("vm", "s1", snapsync_core::Timestamp::new(1, 0), data);
    let progress = RecordedProgress::default();
    let out = p(dir.path(), "out.qcow2");
    let stats =
        snapsync_qcow2::restore_qcow2(&src, "vm", "s1", &out, DEFAULT_CLUSTER_SIZE, &progress)
            .unwrap();
    let phases = progress.phases();
    assert_eq!(phases.len(), 1, "{phases:?}");
    assert_eq!(phases[0].label, "vm@s1");
    assert!(stats.read_bytes > 0 && stats.read_bytes < 1 << 20);
    assert_eq!(phases[0].total_bytes, stats.read_bytes);
    assert_eq!(phases[0].done_bytes, stats.read_bytes);
    assert!(phases[0].finished);
}
