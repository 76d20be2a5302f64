//! [`Qcow2Store`] over backing chains and clones: every snapshot reads like qemu-img's
//! conversion, and every diff (between any two snapshots, across clones too) covers
//! every changed byte and says zero only where the target reads zeros.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use snapsync_qcow2::{DiffExtent, ExtentKind, Qcow2Store};
use snapsync_store::{SnapshotRef, SnapshotSource, Store};

const M: u64 = 1 << 20;

fn create(img: &Path, opts: &str, backing: Option<(&str, &str)>, size: Option<u64>) {
    let mut a = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
    ];
    a.extend(["-o".into(), opts.to_string()]);
    if let Some((b, f)) = backing {
        a.extend(["-b".into(), b.to_string(), "-F".into(), f.to_string()]);
    }
    a.push(s(img));
    if let Some(n) = size {
        a.push(n.to_string());
    }
    let r: Vec<&str> = a.iter().map(String::as_str).collect();
    qemu_img(&r);
}

/// base.raw <- mid.qcow2 <- { a.qcow2 (a1, a2), b.qcow2 (b1), bmid.qcow2 <- cc.qcow2 }.
fn build(dir: &Path) -> Vec<(String, String, PathBuf, Option<String>)> {
    let base = dir.join("base.raw");
    let mut raw = vec![0u8; (3 * M) as usize];
    for (k, chunk) in raw.chunks_mut(4096).enumerate() {
        if k % 3 != 0 {
            chunk.fill((k % 251) as u8 + 1);
        }
    }
    std::fs::write(&base, &raw).unwrap();
    let mid = dir.join("mid.qcow2");
    create(&mid, "cluster_size=65536", Some(("base.raw", "raw")), None);
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -q -P 0x21 65536 131072".into(),
            "write -q -z 524288 65536".into(),
            "write -q -P 0x22 1000000 5000".into(),
        ],
    );
    let a = dir.join("a.qcow2");
    create(&a, "cluster_size=65536", Some(("mid.qcow2", "qcow2")), None);
    qemu_io(&a, "qcow2", &["write -q -P 0x31 0 65536".into()]);
    qemu_img(&["snapshot", "-c", "a1", &s(&a)]);
    qemu_io(
        &a,
        "qcow2",
        &[
            "write -q -P 0x32 2097152 65536".into(),
            "write -q -z 131072 65536".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "a2", &s(&a)]);
    let b = dir.join("b.qcow2");
    create(
        &b,
        "cluster_size=16384,extended_l2=on",
        Some(("mid.qcow2", "qcow2")),
        Some(4 * M),
    );
    qemu_io(
        &b,
        "qcow2",
        &[
            "write -q -P 0x41 1024 2048".into(),
            format!("write -q -P 0x42 {} 8192", 3 * M + 4096),
        ],
    );
    qemu_img(&["snapshot", "-c", "b1", &s(&b)]);
    let bmid = dir.join("bmid.qcow2");
    create(
        &bmid,
        "cluster_size=4096",
        Some(("mid.qcow2", "qcow2")),
        None,
    );
    qemu_io(&bmid, "qcow2", &["write -q -P 0x51 40960 4096".into()]);
    let cc = dir.join("cc.qcow2");
    create(
        &cc,
        "cluster_size=65536",
        Some(("bmid.qcow2", "qcow2")),
        None,
    );
    vec![
        ("a".into(), "base".into(), base, None),
        ("a".into(), "mid".into(), mid, None),
        ("a".into(), "a1".into(), a.clone(), Some("a1".into())),
        ("a".into(), "a2".into(), a, Some("a2".into())),
        ("b".into(), "b1".into(), b, Some("b1".into())),
        ("cc".into(), "bmid".into(), bmid, None),
    ]
}

fn expected(path: &Path, snap: Option<&str>, size: u64) -> Vec<u8> {
    let mut v = if path.extension().is_some_and(|e| e == "raw") {
        std::fs::read(path).unwrap()
    } else {
        to_raw(path, snap)
    };
    v.resize(size as usize, 0);
    v
}

fn as_extents(d: &snapsync_store::Diff) -> Vec<DiffExtent> {
    let mut v: Vec<DiffExtent> = d
        .data
        .as_slice()
        .iter()
        .map(|e| (e, ExtentKind::Data))
        .chain(d.zero.as_slice().iter().map(|e| (e, ExtentKind::Zero)))
        .map(|(e, kind)| DiffExtent {
            offset: e.offset,
            len: e.len,
            kind,
        })
        .collect();
    v.sort_by_key(|e| e.offset);
    v
}

#[test]
fn chains_and_clones_read_and_diff_like_qemu() {
    let dir = tmp();
    let snaps = build(dir.path());
    let store = Qcow2Store::open(dir.path()).unwrap();
    let listed = store.list().unwrap();
    let names: Vec<_> = listed.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "cc"]);
    let a = &listed[0];
    assert_eq!(
        a.snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["base", "mid", "a1", "a2"]
    );
    assert!(a.origin.is_none());
    for clone in &listed[1..] {
        let o = clone.origin.as_ref().expect("a clone has an origin");
        assert_eq!((o.volume.as_str(), o.snapshot.as_str()), ("a", "mid"));
        assert_eq!(o.id, a.snapshot("mid").unwrap().id);
    }
    assert_eq!(listed[1].snapshots.len(), 1);
    assert_eq!(listed[2].snapshots[0].name, "bmid");

    let mut contents = Vec::new();
    for (vol, name, path, internal) in &snaps {
        let info = store.volume(vol).unwrap().snapshot(name).unwrap().clone();
        let want = expected(path, internal.as_deref(), info.size);
        let mut got = vec![0u8; want.len()];
        let mut r = store.open_snapshot(vol, name).unwrap();
        for (k, chunk) in got.chunks_mut(100_003).enumerate() {
            r.read_at(k as u64 * 100_003, chunk).unwrap();
        }
        assert_same(&got, &want, &format!("{vol}@{name}"));
        contents.push(want);
    }
    let meta_before = store.metadata_bytes_read();
    let data_before = store.data_bytes_read();
    for (i, (tv, tn, _, _)) in snaps.iter().enumerate() {
        let none = store.diff(tv, tn, None).unwrap();
        check_diff(
            &[],
            &contents[i],
            &as_extents(&none),
            512,
            false,
            &format!("{tv}@{tn} full"),
        );
        for (j, (bv, bn, _, _)) in snaps.iter().enumerate() {
            let d = store.diff(tv, tn, Some(SnapshotRef::new(bv, bn))).unwrap();
            let what = format!("{tv}@{tn} against {bv}@{bn}");
            check_diff(
                &contents[j],
                &contents[i],
                &as_extents(&d),
                512,
                false,
                &what,
            );
            if i == j {
                assert!(d.changed().is_empty(), "{what}: not empty");
            }
            assert_eq!(
                store.estimate_diff(tv, tn, SnapshotRef::new(bv, bn)),
                Some(d.changed().total_len())
            );
        }
    }
    assert_eq!(
        store.data_bytes_read(),
        data_before,
        "diffs read guest data"
    );
    println!(
        "{} metadata bytes for every diff",
        store.metadata_bytes_read() - meta_before
    );

    // Minimal where the metadata says exactly what was written.
    let d = store
        .diff("a", "a2", Some(SnapshotRef::new("a", "a1")))
        .unwrap();
    check_diff(
        &contents[2],
        &contents[3],
        &as_extents(&d),
        65536,
        true,
        "a2 vs a1",
    );
    let d = store
        .diff("b", "b1", Some(SnapshotRef::new("a", "mid")))
        .unwrap();
    // Extended L2 with 16 KiB clusters: 512-byte subclusters, so exactly the bytes written.
    assert_eq!(d.changed().total_len(), 2048 + 8192, "b1 vs a@mid: {d:?}");
    assert!(d.zero.is_empty());
}

#[test]
fn broken_images_are_named() {
    let dir = tmp();
    let img = dir.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &s(&img),
        "1M",
    ]);
    let e = Qcow2Store::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("enc.qcow2") && e.contains("encryption"), "{e}");
    std::fs::remove_file(&img).unwrap();
    let bad = dir.path().join("bad.qcow2");
    create(&bad, "cluster_size=65536", None, Some(M));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(300)
        .unwrap();
    let e = Qcow2Store::open(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.qcow2") && e.contains("malformed"), "{e}");
    println!("{e}");
    let missing = dir.path().join("orphan.qcow2");
    std::fs::remove_file(&bad).unwrap();
    let gone = dir.path().join("gone.qcow2");
    create(&gone, "cluster_size=65536", None, Some(M));
    create(
        &missing,
        "cluster_size=65536",
        Some(("gone.qcow2", "qcow2")),
        Some(M),
    );
    std::fs::remove_file(&gone).unwrap();
    let e = Qcow2Store::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("gone.qcow2"), "{e}");
}
