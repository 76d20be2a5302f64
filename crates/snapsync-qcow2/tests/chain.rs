//! Backing chains: every layer must read like `qemu-img convert -O raw
//! LAYER`, and chain diffs must cover every change between layers.

mod common;

use std::path::Path;

use common::*;
use snapsync_qcow2::{BackingRule, Chain, ExtentKind, LayerFormat, Qcow2Error, Qcow2Image, View};

/// Open a chain under the default rule: backing files beside the top image.
fn open_chain(top: &Path) -> Result<Chain, Qcow2Error> {
    Chain::open(top, &BackingRule::beside(top)?)
}

const C: u64 = 4096;
const N: u64 = 4 << 20;

fn build_qcow2_chain(dir: &Path) -> Vec<std::path::PathBuf> {
    let base = p(dir, "base.qcow2");
    let mid = p(dir, "mid.qcow2");
    let top = p(dir, "top.qcow2");
    let o = format!("cluster_size={C}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        &s(&base),
        &N.to_string(),
    ]);
    qemu_io(
        &base,
        "qcow2",
        &[
            format!("write -P 0x11 0 {}", 8 * C),
            format!("write -P 0x12 {} {}", N / 2, 16 * C),
            format!("write -P 0x13 {} {}", N - C, C),
        ],
    );
    // Relative backing names: resolved against the overlay's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&mid),
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &[
            format!("write -P 0x21 {} {}", 2 * C, C),
            format!("write -z {} {}", 4 * C, 2 * C),
            format!("write -P 0x22 {} 700", N / 4 + 100),
            format!("discard {} {}", N / 2 + 4 * C, 2 * C),
        ],
    );
    // Extended L2 in the top layer (subcluster granularity across a chain).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,extended_l2=on",
        "-b",
        &s(&mid),
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            format!("write -P 0x31 {} 2048", 3 * C),
            format!("write -z {} {}", N / 2, 4096),
            format!("write -P 0x32 {} {}", N / 3 / 4096 * 4096, 3 * 2048),
        ],
    );
    vec![base, mid, top]
}

fn verify_chain(paths: &[std::path::PathBuf], formats: &[LayerFormat]) {
    let top = paths.last().unwrap();
    let chain = open_chain(top).unwrap();
    let layers = chain.layers();
    assert_eq!(layers.len(), paths.len());
    let raws: Vec<Vec<u8>> = paths
        .iter()
        .map(|lp| {
            if lp.extension().is_some_and(|e| e == "raw") {
                std::fs::read(lp).unwrap()
            } else {
                to_raw(lp, None)
            }
        })
        .collect();
    for (k, l) in layers.iter().enumerate() {
        assert_eq!(l.format, formats[k]);
        assert_eq!(
            std::fs::canonicalize(&l.path).unwrap(),
            std::fs::canonicalize(&paths[k]).unwrap()
        );
        assert_eq!(l.virtual_size, raws[k].len() as u64);
        let mut ours = vec![0u8; l.virtual_size as usize];
        let step = 50_000;
        for (i, chunk) in ours.chunks_mut(step).enumerate() {
            chain.read_at(k, (i * step) as u64, chunk).unwrap();
        }
        assert_same(&ours, &raws[k], &format!("layer {k}"));
    }
    for to in 0..layers.len() {
        let ext = chain.diff(to, None).unwrap();
        check_diff(
            &[],
            &raws[to],
            &ext,
            C,
            false,
            &format!("full allocation of layer {to}"),
        );
        for from in 0..to {
            let ext = chain.diff(to, Some(from)).unwrap();
            // Zero clusters over already-zero data are legitimately
            // reported, so only check coverage here.
            check_diff(
                &raws[from],
                &raws[to],
                &ext,
                C,
                false,
                &format!("diff {from}->{to}"),
            );
        }
    }
    assert!(chain.diff(1, Some(1)).is_err());
    assert!(chain.diff(layers.len(), None).is_err());
    let mut b = [0u8; 2];
    assert!(chain
        .read_at(0, layers[0].virtual_size - 1, &mut b)
        .is_err());
}

#[test]
fn qcow2_chain_reads_and_diffs() {
    let dir = tmp();
    let paths = build_qcow2_chain(dir.path());
    verify_chain(&paths, &[LayerFormat::Qcow2; 3]);
    // Layer images are accessible; the middle layer's own allocation is small.
    let chain = open_chain(&paths[2]).unwrap();
    let mid = chain.image(1).unwrap();
    assert_eq!(mid.backing_file(), Some("base.qcow2"));
    assert_eq!(mid.backing_format(), Some("qcow2"));
    assert!(chain.metadata_bytes_read() > 0);
    // The single-image diff of a layer is its own allocation: what it wrote is
    // Data, what it zeroed (by write -z, or by a discard, which QEMU turns into a
    // zero cluster when there is a backing file so that it does not show through)
    // is Zero, and what it left to the layer below is not listed at all.
    let ext = mid.diff(View::Active, None).unwrap();
    let kind_at = |offset: u64| {
        ext.iter()
            .find(|e| e.offset <= offset && offset < e.end())
            .map(|e| e.kind)
    };
    for offset in [2 * C, 3 * C - 1] {
        assert_eq!(
            kind_at(offset),
            Some(ExtentKind::Data),
            "written at {offset}"
        );
    }
    for offset in [4 * C, 6 * C - 1, N / 2 + 4 * C, N / 2 + 6 * C - 1] {
        assert_eq!(
            kind_at(offset),
            Some(ExtentKind::Zero),
            "zeroed at {offset}"
        );
    }
    for offset in [0, C, 7 * C, N - 1] {
        assert_eq!(kind_at(offset), None, "left to the layer below at {offset}");
    }
}

#[test]
fn raw_base_and_growing_overlay() {
    let dir = tmp();
    let base = p(dir.path(), "base.raw");
    let top = p(dir.path(), "top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", &s(&base), "1M"]);
    qemu_io(
        &base,
        "raw",
        &[
            "write -P 0x41 0 65536".into(),
            "write -P 0x42 1000000 48576".into(),
        ],
    );
    // Overlay twice as large as its base: beyond 1 MiB reads zeros.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&top),
        "2M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x43 4096 4096".into(),
            "write -P 0x44 1044480 8192".into(),
        ],
    );
    verify_chain(&[base, top], &[LayerFormat::Raw, LayerFormat::Qcow2]);
}

#[test]
fn single_image_chain() {
    let dir = tmp();
    let img = p(dir.path(), "one.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&img), "1M"]);
    qemu_io(&img, "qcow2", &["write -P 0x55 0 4096".into()]);
    let chain = open_chain(&img).unwrap();
    assert_eq!(chain.layers().len(), 1);
    assert_eq!(chain.diff(0, None).unwrap().len(), 1);
}

fn set_backing(img: &Path, backing: &str) {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        "qcow2",
        &s(img),
    ]);
}

#[test]
fn cyclic_chains_are_refused() {
    let dir = tmp();
    let a = p(dir.path(), "a.qcow2");
    let b = p(dir.path(), "b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&b), "1M"]);
    set_backing(&a, "b.qcow2");
    set_backing(&b, "a.qcow2");
    let err = open_chain(&a).unwrap_err();
    assert!(matches!(err, Qcow2Error::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("cycle"), "{err}");

    let selfref = p(dir.path(), "self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&selfref), "1M"]);
    set_backing(&selfref, "self.qcow2");
    assert!(open_chain(&selfref)
        .unwrap_err()
        .to_string()
        .contains("cycle"));

    // Missing backing file: an I/O error naming the path.
    let orphan = p(dir.path(), "orphan.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&orphan), "1M"]);
    set_backing(&orphan, "does-not-exist.qcow2");
    let err = open_chain(&orphan).unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
    // The image alone still opens.
    assert!(Qcow2Image::open(&orphan).is_ok());
}

#[test]
fn unsupported_backing_format() {
    let dir = tmp();
    let a = p(dir.path(), "a.qcow2");
    let b = p(dir.path(), "b.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &s(&b), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.vmdk",
        "-F",
        "vmdk",
        &s(&a),
    ]);
    let err = open_chain(&a).unwrap_err();
    assert!(matches!(err, Qcow2Error::Unsupported { .. }), "{err}");
}
