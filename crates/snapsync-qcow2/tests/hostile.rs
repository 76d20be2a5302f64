//! Hostile and corrupted inputs: every case must produce an error (or a
//! consistent result), never a panic, hang or huge allocation.

mod common;

use common::*;
use snapsync_qcow2::fuzzing::exercise;
use snapsync_qcow2::{Qcow2Error, Qcow2Image, View};

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn set32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn set64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

fn open_mem(b: &[u8]) -> Result<Qcow2Image, Qcow2Error> {
    Qcow2Image::from_source(Box::new(b.to_vec()), "test".into())
}

/// A small but feature-rich image: 512-byte clusters, data, zero
/// clusters, two snapshots.
fn sample(opts: &str) -> Vec<u8> {
    let dir = tmp();
    let img = p(dir.path(), "s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &s(&img), "256K"]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x61 0 4096".into(),
            "write -P 0x62 65536 1000".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "one", &s(&img)]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -z 0 1024".into(),
            "write -P 0x63 131072 20000".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "two", &s(&img)]);
    qemu_io(&img, "qcow2", &["discard 65536 512".into()]);
    std::fs::read(&img).unwrap()
}

fn samples() -> Vec<Vec<u8>> {
    vec![
        sample("cluster_size=512"),
        sample("cluster_size=512,compat=0.10"),
        sample("cluster_size=16384,extended_l2=on"),
    ]
}

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn truncated_files_never_panic() {
    for img in samples() {
        assert!(open_mem(&img).is_ok());
        let l1_off = be64(&img, 40) as usize;
        for len in
            (0..img.len())
                .step_by(97)
                .chain([0, 3, 71, 72, 103, 104, 111, l1_off, l1_off + 1])
        {
            let cut = &img[..len.min(img.len())];
            exercise(cut);
            if len <= l1_off {
                assert!(open_mem(cut).is_err(), "truncated at {len} opened");
            }
        }
    }
}

#[test]
fn header_bit_flips_never_panic() {
    for img in samples() {
        for byte in 0..256.min(img.len()) {
            for bit in 0..8 {
                let mut m = img.clone();
                m[byte] ^= 1 << bit;
                exercise(&m);
            }
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let mut st = 0x9e37_79b9_7f4a_7c15u64;
    for img in samples() {
        for _ in 0..1500 {
            let mut m = img.clone();
            for _ in 0..1 + rng(&mut st) % 4 {
                let at = (rng(&mut st) % m.len() as u64) as usize;
                m[at] = rng(&mut st) as u8;
            }
            exercise(&m);
        }
    }
}

#[test]
fn huge_l1_size_is_refused() {
    let img = sample("cluster_size=512");
    let mut m = img.clone();
    set32(&mut m, 36, u32::MAX);
    let err = open_mem(&m).unwrap_err();
    assert!(matches!(err, Qcow2Error::TooLarge { .. }), "{err}");
    // Within the global cap but past the end of the file.
    let mut m = img.clone();
    set32(&mut m, 36, 1_000_000);
    let err = open_mem(&m).unwrap_err();
    assert!(matches!(err, Qcow2Error::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("L1"), "{err}");
    // A virtual size needing more L1 entries than the table has.
    let mut m = img.clone();
    set64(&mut m, 24, 1 << 40);
    assert!(open_mem(&m).is_err());
    let mut m = img;
    set64(&mut m, 24, u64::MAX);
    assert!(matches!(
        open_mem(&m).unwrap_err(),
        Qcow2Error::TooLarge { .. }
    ));
}

#[test]
fn snapshot_table_out_of_file() {
    let img = sample("cluster_size=512");
    let mut m = img.clone();
    set64(&mut m, 64, 1 << 40);
    let err = open_mem(&m).unwrap_err();
    assert!(matches!(err, Qcow2Error::Malformed { .. }), "{err}");
    let mut m = img.clone();
    set32(&mut m, 60, 1_000_000);
    assert!(matches!(
        open_mem(&m).unwrap_err(),
        Qcow2Error::TooLarge { .. }
    ));
    // More entries than the table holds: runs off the end of the file.
    let mut m = img.clone();
    set32(&mut m, 60, 60_000);
    assert!(open_mem(&m).is_err());
    // Snapshot L1 table pointing out of the file: that entry is skipped and named,
    // the image stays readable (QEMU lists it too).
    let mut m = img.clone();
    let snap = be64(&m, 64) as usize;
    set64(&mut m, snap, 1 << 50);
    let opened = open_mem(&m).unwrap();
    let before = open_mem(&img).unwrap();
    assert_eq!(opened.snapshots().len() + 1, before.snapshots().len());
    let damaged = opened.damaged_snapshots();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0].index, 0);
    assert_eq!(damaged[0].name, before.snapshots()[0].name);
    assert!(
        damaged[0].reason.contains("past the end"),
        "{:?}",
        damaged[0]
    );
    // Offset 0 names the field that says 0, not "not aligned at byte 0".
    let mut m = img.clone();
    set64(&mut m, snap, 0);
    let damaged = open_mem(&m).unwrap().damaged_snapshots()[0].reason.clone();
    assert!(
        damaged.contains("offset 0 (the header)")
            && damaged.contains(&format!("at byte offset {snap}")),
        "{damaged}"
    );
    let mut m = img.clone();
    set64(&mut m, 40, 0);
    let err = open_mem(&m).unwrap_err().to_string();
    assert!(
        err.contains("offset 0 (the header)") && err.contains("at byte offset 40"),
        "{err}"
    );
    let mut m = img;
    set64(&mut m, 64, 0);
    let err = open_mem(&m).unwrap_err().to_string();
    assert!(
        err.contains("no snapshot table") && err.contains("at byte offset 64"),
        "{err}"
    );
}

#[test]
fn encryption_and_feature_bits() {
    let img = sample("cluster_size=512");
    let mut m = img.clone();
    set32(&mut m, 32, 1);
    let err = open_mem(&m).unwrap_err();
    assert!(matches!(err, Qcow2Error::Unsupported { .. }));
    assert!(err.to_string().contains("encryption"), "{err}");

    let mut m = img.clone();
    set64(&mut m, 72, 1 << 7);
    let err = open_mem(&m).unwrap_err();
    assert!(
        err.to_string().contains("incompatible feature bit 7"),
        "{err}"
    );

    let mut m = img.clone();
    set64(&mut m, 72, 1 << 2);
    let err = open_mem(&m).unwrap_err();
    assert!(err.to_string().contains("external data file"), "{err}");

    // Dirty and corrupt bits are noted, not refused.
    let mut m = img.clone();
    set64(&mut m, 72, 0b11);
    let opened = open_mem(&m).unwrap();
    assert!(opened.is_dirty() && opened.is_marked_corrupt());

    // Unknown compatible/autoclear bits are fine.
    let mut m = img.clone();
    set64(&mut m, 80, 1 << 40);
    set64(&mut m, 88, 1 << 40);
    assert!(open_mem(&m).is_ok());

    let mut m = img.clone();
    set32(&mut m, 4, 4);
    assert!(open_mem(&m).unwrap_err().to_string().contains("version 4"));
    let mut m = img.clone();
    set32(&mut m, 20, 30);
    assert!(open_mem(&m)
        .unwrap_err()
        .to_string()
        .contains("cluster_bits"));
    let mut m = img.clone();
    m[0] = b'X';
    assert!(open_mem(&m).unwrap_err().to_string().contains("magic"));
    // Extended L2 with 512-byte clusters would mean 16-byte subclusters.
    let mut m = img;
    set64(&mut m, 72, 1 << 4);
    assert!(matches!(
        open_mem(&m).unwrap_err(),
        Qcow2Error::Unsupported { .. }
    ));
}

#[test]
fn unknown_bit_named_from_feature_table() {
    let dir = tmp();
    let img = p(dir.path(), "f.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&img), "1M"]);
    let mut m = std::fs::read(&img).unwrap();
    // qemu writes a feature name table; rename the "dirty" entry to bit 9.
    let hl = be32(&m, 100) as usize;
    let mut pos = hl;
    let mut patched = false;
    while pos + 8 <= 65536 {
        let (t, l) = (be32(&m, pos), be32(&m, pos + 4) as usize);
        if t == 0 {
            break;
        }
        if t == 0x6803_f857 {
            m[pos + 8 + 1] = 9; // first entry: incompatible bit 0 -> 9
            patched = true;
        }
        pos += 8 + l.div_ceil(8) * 8;
    }
    assert!(patched);
    set64(&mut m, 72, 1 << 9);
    let err = open_mem(&m).unwrap_err();
    assert!(err.to_string().contains("bit 9 (dirty bit)"), "{err}");
}

#[test]
fn broken_tables() {
    let img = sample("cluster_size=512");
    let l1 = be64(&img, 40) as usize;
    let first = be64(&img, l1);
    assert_ne!(first, 0);

    // Two L1 entries sharing one L2 table.
    let mut m = img.clone();
    set64(&mut m, l1 + 8, first);
    let opened = open_mem(&m).unwrap();
    assert!(opened.allocated(View::Active).is_err());
    assert!(opened.diff(View::Active, Some(View::Snapshot(0))).is_err());

    // L1 entry pointing past the end of the file.
    let mut m = img.clone();
    set64(&mut m, l1, 1 << 40);
    let opened = open_mem(&m).unwrap();
    let err = opened.allocated(View::Active).unwrap_err();
    assert!(err.to_string().contains("L2 table"), "{err}");
    let mut b = [0u8; 16];
    assert!(opened.read_at(View::Active, 0, &mut b).is_err());

    // Unaligned L2 entry (needs clusters larger than 512 bytes).
    let mut m = sample("cluster_size=4096");
    let l1b = be64(&m, 40) as usize;
    let l2 = (be64(&m, l1b) & 0x00ff_ffff_ffff_fe00) as usize;
    set64(&mut m, l2 + 8, (1 << 63) | 0x1200);
    let opened = open_mem(&m).unwrap();
    let err = opened.allocated(View::Active).unwrap_err();
    assert!(err.to_string().contains("unaligned"), "{err}");

    // Bad view index and out-of-range reads.
    let opened = open_mem(&img).unwrap();
    assert!(opened.allocated(View::Snapshot(7)).is_err());
    assert!(opened
        .read_at(View::Active, 256 * 1024 - 1, &mut b)
        .is_err());
    assert!(opened.read_at(View::Active, u64::MAX, &mut b).is_err());
}

#[test]
fn nonexistent_and_non_qcow2_files() {
    let dir = tmp();
    assert!(matches!(
        Qcow2Image::open(&p(dir.path(), "nope")).unwrap_err(),
        Qcow2Error::Io { .. }
    ));
    let raw = p(dir.path(), "raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert!(Qcow2Image::open(&raw).is_err());
}
