//! Internal snapshots of real qemu-made images: every view must read
//! exactly like `qemu-img convert -l snapshot.name=...`, and diffs must
//! cover every changed byte while staying within changed clusters.

mod common;

use std::path::Path;

use common::*;
use snapsync_qcow2::{ExtentKind, Qcow2Image, View};

/// Writes before snapshot s1, expressed relative to the cluster size `c`
/// and virtual size `n`.
fn writes_a(c: u64, n: u64) -> Vec<String> {
    vec![
        format!("write -P 0xab 0 {}", 3 * c),
        format!("write -P 0xac {} {}", 5 * c + 100, c),
        format!("write -P 0xad {} {}", n / 2, 4 * c),
        format!("write -P 0xae {} {}", n - 2 * c, 2 * c),
        format!("write -P 0xaf {} {}", n / 4 + 2 * c, 3 * c),
    ]
}

fn writes_b(c: u64, n: u64) -> Vec<String> {
    vec![
        format!("write -P 0xcd {c} {c}"),
        format!("write -z {} {}", 5 * c, 2 * c),
        format!("discard {} {}", n / 2 + c, c),
        format!("write -P 0xce {} {}", n / 4, c + 7 * 512),
        format!("write -P 0xcf {} 512", 7 * c + 512.min(c / 2)),
        format!("write -z {} {}", n / 4 + 3 * c, c),
    ]
}

fn writes_c(c: u64, n: u64) -> Vec<String> {
    vec![
        format!("write -P 0xef {} {}", 2 * c, c),
        format!("write -z {} {}", n - 2 * c, c),
        format!("write -P 0xf0 {} 1024", n / 3 / 512 * 512),
        format!("discard {} {}", n / 4 + 2 * c, c),
    ]
}

/// Check every view against qemu and every interesting diff against the
/// raw conversions.
fn verify(img_path: &Path, expect_snaps: &[&str]) {
    let img = Qcow2Image::open(img_path).unwrap();
    let names: Vec<&str> = img.snapshots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, expect_snaps);
    let c = img.cluster_size();
    let mut raws = Vec::new();
    for (i, name) in expect_snaps.iter().enumerate() {
        let mut theirs = to_raw(img_path, Some(name));
        let ours = read_view(&img, View::Snapshot(i));
        // QEMU presents a snapshot at the current image size; the snapshot's
        // own disk size may be smaller (image resized later).
        if theirs.len() > ours.len() {
            assert!(theirs[ours.len()..].iter().all(|&b| b == 0));
            theirs.truncate(ours.len());
        }
        assert_same(
            &ours,
            &theirs,
            &format!("{} snapshot {name}", img_path.display()),
        );
        raws.push((View::Snapshot(i), theirs));
    }
    let theirs = to_raw(img_path, None);
    assert_same(&read_view(&img, View::Active), &theirs, "active view");
    raws.push((View::Active, theirs));

    // Pairwise diffs, older -> newer and newer -> older.
    for (ti, (tv, traw)) in raws.iter().enumerate() {
        for (bi, (bv, braw)) in raws.iter().enumerate() {
            if ti == bi {
                continue;
            }
            let before = img.metadata_bytes_read();
            let data_before = img.data_bytes_read();
            let ext = img.diff(*tv, Some(*bv)).unwrap();
            assert_eq!(img.data_bytes_read(), data_before, "diff read guest data");
            // Metadata only, and at most both views' L1 tables and every L2 table
            // once (the tables are cached, so a second diff may read none).
            let read = img.metadata_bytes_read() - before;
            let bound = std::fs::metadata(img_path).unwrap().len();
            assert!(
                read <= bound,
                "diff {tv:?} vs {bv:?} read {read} bytes of metadata, more than the file's {bound}"
            );
            check_diff(braw, traw, &ext, c, true, &format!("diff {tv:?} vs {bv:?}"));
        }
        // Full allocation map: covers every non-zero byte.
        let ext = img.diff(*tv, None).unwrap();
        assert_eq!(ext, img.allocated(*tv).unwrap());
        check_diff(&[], traw, &ext, c, false, &format!("allocation of {tv:?}"));
    }
}

fn scenario(create_opts: &str, cluster: u64, size: u64) {
    let dir = tmp();
    let img = p(dir.path(), "img.qcow2");
    let opts = format!("cluster_size={cluster}{create_opts}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        &s(&img),
        &size.to_string(),
    ]);
    qemu_io(&img, "qcow2", &writes_a(cluster, size));
    qemu_img(&["snapshot", "-c", "s1", &s(&img)]);
    qemu_io(&img, "qcow2", &writes_b(cluster, size));
    qemu_img(&["snapshot", "-c", "s2", &s(&img)]);
    qemu_io(&img, "qcow2", &writes_c(cluster, size));
    verify(&img, &["s1", "s2"]);
    let opened = Qcow2Image::open(&img).unwrap();
    assert_eq!(opened.virtual_size(), size);
    assert_eq!(opened.cluster_size(), cluster);
    let s1 = &opened.snapshots()[0];
    assert_eq!(s1.id, "1");
    assert_eq!(s1.disk_size, size);
    assert!(s1.date_sec > 1_600_000_000);
}

#[test]
fn v3_cluster_512() {
    scenario("", 512, 2 << 20);
}

#[test]
fn v3_cluster_4k() {
    scenario("", 4096, 4 << 20);
}

#[test]
fn v3_cluster_64k() {
    scenario("", 65536, 8 << 20);
}

#[test]
fn v3_cluster_2m() {
    scenario("", 2 << 20, 32 << 20);
}

#[test]
fn v2_compat_010() {
    scenario(",compat=0.10", 4096, 4 << 20);
    let dir = tmp();
    let img = p(dir.path(), "v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        &s(&img),
        "1M",
    ]);
    assert_eq!(Qcow2Image::open(&img).unwrap().version(), 2);
}

#[test]
fn extended_l2_64k() {
    scenario(",extended_l2=on", 65536, 8 << 20);
}

#[test]
fn extended_l2_16k() {
    scenario(",extended_l2=on", 16384, 4 << 20);
}

#[test]
fn extended_l2_2m() {
    scenario(",extended_l2=on", 2 << 20, 32 << 20);
}

fn compressed(compression: Option<&str>, cluster: u64, extl2: bool) {
    let dir = tmp();
    let src = p(dir.path(), "src.qcow2");
    let img = p(dir.path(), "img.qcow2");
    let size = 4u64 << 20;
    let opts = format!("cluster_size={cluster}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        &s(&src),
        &size.to_string(),
    ]);
    let mut w = writes_a(cluster, size);
    // Incompressible-ish data too: several patterns across a range.
    for k in 0..16u64 {
        w.push(format!(
            "write -P {} {} {}",
            0x10 + k,
            20 * cluster + k * 777,
            777
        ));
    }
    qemu_io(&src, "qcow2", &w);
    let mut o = format!("cluster_size={cluster}");
    if let Some(ct) = compression {
        o.push_str(&format!(",compression_type={ct}"));
    }
    if extl2 {
        o.push_str(",extended_l2=on");
    }
    qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &o, &s(&src), &s(&img)]);
    {
        let opened = Qcow2Image::open(&img).unwrap();
        let alloc = opened.allocated(View::Active).unwrap();
        assert!(alloc.iter().any(|e| e.kind == ExtentKind::Data));
        assert_same(
            &read_view(&opened, View::Active),
            &to_raw(&img, None),
            "compressed image",
        );
    }
    qemu_img(&["snapshot", "-c", "s1", &s(&img)]);
    qemu_io(&img, "qcow2", &writes_b(cluster, size));
    qemu_img(&["snapshot", "-c", "s2", &s(&img)]);
    qemu_io(&img, "qcow2", &writes_c(cluster, size));
    verify(&img, &["s1", "s2"]);
}

#[test]
fn compressed_zlib() {
    compressed(None, 65536, false);
    compressed(None, 512, false);
}

#[test]
fn compressed_zstd() {
    compressed(Some("zstd"), 65536, false);
    compressed(Some("zstd"), 4096, false);
}

#[test]
fn compressed_zstd_extended_l2() {
    compressed(Some("zstd"), 65536, true);
}

#[test]
fn snapshot_after_resize_has_own_disk_size() {
    let dir = tmp();
    let img = p(dir.path(), "img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &s(&img),
        "1M",
    ]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 8192".into(),
            "write -P 0x12 1040384 8192".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "small", &s(&img)]);
    qemu_img(&["resize", "-q", &s(&img), "3M"]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x13 2097152 4096".into(),
            "write -P 0x14 0 4096".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "big", &s(&img)]);
    let opened = Qcow2Image::open(&img).unwrap();
    assert_eq!(opened.snapshots()[0].disk_size, 1 << 20);
    assert_eq!(opened.snapshots()[1].disk_size, 3 << 20);
    verify(&img, &["small", "big"]);
}
