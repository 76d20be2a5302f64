//! The shared conformance suite, run against [`Qcow2Store`] over images built by
//! qemu-img/qemu-io from the standard fixture (internal snapshots), in several formats.

mod common;

use common::*;
use snapsync_qcow2::Qcow2Store;
use snapsync_store::conformance::{check_source, standard_fixture, Fixture};

/// The standard fixture with every size rounded up to 512 bytes (zero padding): qcow2
/// virtual sizes are whole sectors (`qemu-img create`/`resize` round up), so a
/// snapshot of 640 KiB + 100 bytes cannot exist. Sizes stay non-multiples of the
/// cluster size and the growing snapshot still grows.
///
/// Version 2 images record no per-snapshot size and QEMU cannot resize them once they
/// have snapshots, so for them (`grow: false`) every snapshot of a volume is padded to
/// the volume's final size instead.
fn fixture(grow: bool) -> Fixture {
    let mut f = standard_fixture();
    for v in &mut f.volumes {
        let max = v
            .snapshots
            .iter()
            .map(|s| s.content.len())
            .max()
            .unwrap_or(0);
        for s in &mut v.snapshots {
            let n = if grow { s.content.len() } else { max }.next_multiple_of(512);
            s.content.resize(n, 0);
        }
    }
    f
}

/// Build `DIR/<volume>.qcow2` per fixture volume, one internal snapshot per fixture
/// snapshot (dates patched to the fixture's ages), written cluster by cluster.
fn build(dir: &std::path::Path, f: &Fixture, opts: &str, cluster: usize) {
    for v in &f.volumes {
        let img = dir.join(format!("{}.qcow2", v.name));
        let first = v.snapshots[0].content.len();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            &s(&img),
            &first.to_string(),
        ]);
        let mut prev = vec![0u8; first];
        for snap in &v.snapshots {
            apply_clusters(&img, &prev, &snap.content, cluster);
            qemu_img(&["snapshot", "-c", &snap.name, &s(&img)]);
            prev = snap.content.clone();
        }
        for snap in &v.snapshots {
            set_snapshot_date(
                &img,
                &snap.name,
                u32::try_from(snap.created.secs).unwrap(),
                snap.created.nanos,
            );
        }
        qemu_img(&["check", "-q", &s(&img)]);
    }
}

fn run(opts: &str, cluster: usize) {
    let dir = tmp();
    let f = fixture(!opts.contains("compat=0.10"));
    build(dir.path(), &f, opts, cluster);
    let store = Qcow2Store::open(dir.path()).unwrap();
    check_source(&store, &f, cluster as u64);
    assert!(store.data_bytes_read() > 0);
    // Every snapshot also reads like qemu-img's own conversion.
    for v in &f.volumes {
        let img = dir.path().join(format!("{}.qcow2", v.name));
        for snap in &v.snapshots {
            // `convert -l` shows a snapshot at the image's current size (zero-padded).
            let mut qemu = to_raw(&img, Some(&snap.name));
            assert!(qemu[snap.content.len()..].iter().all(|b| *b == 0));
            qemu.truncate(snap.content.len());
            assert_same(
                &snap.content,
                &qemu,
                &format!("{opts}: fixture vs qemu for {}@{}", v.name, snap.name),
            );
        }
    }
}

#[test]
fn conformance_v3_64k() {
    run("cluster_size=65536", 65536);
}

#[test]
fn conformance_v2_4k() {
    run("compat=0.10,cluster_size=4096", 4096);
}

#[test]
fn conformance_extended_l2_32k() {
    run("cluster_size=32768,extended_l2=on", 32768);
}

#[test]
fn a_single_image_is_one_volume_named_after_its_stem() {
    let dir = tmp();
    let f = fixture(true);
    build(dir.path(), &f, "cluster_size=65536", 65536);
    let store = Qcow2Store::open(&dir.path().join("alpha.qcow2")).unwrap();
    let listed = snapsync_store::Store::list(&store).unwrap();
    assert_eq!(listed.len(), 1);
    let one = Fixture {
        volumes: vec![f.volumes[0].clone()],
    };
    check_source(&store, &one, 65536);
}
