//! Format version 1, frozen: the envelope, a manifest, a catalog and snapshot
//! identities pinned to exact bytes, and a small version-1 repository committed as a
//! fixture (`tests/fixtures/v1-repo`) that every future version must read.
//!
//! A change that makes one of these fail changes the on-disk format: it needs a new
//! format version and a reader for the old one, never an edit of the pinned bytes.
//! Since version 2 (manifests in parts) this code writes version 2, so the version-1
//! pins are read back here rather than written; `format_v2.rs` pins what it writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use snapsync_core::{BlockId, BlockRef, Delta, Hint, Origin, SnapshotId, Timestamp};
use snapsync_repo::format::{
    self, Catalog, CatalogSnapshot, Manifest, ManifestHeader, SourceHints, MAGIC_CATALOG,
    MAGIC_MANIFEST,
};

fn id(byte: u8) -> BlockId {
    BlockId([byte; 32])
}

fn snapshot_id() -> SnapshotId {
    SnapshotId::derive("raw:0123abcd", "vm", "s1", Timestamp::new(1_700_000_000, 5))
}

fn manifest() -> Manifest {
    let mut entries = BTreeMap::new();
    entries.insert(0, BlockRef::Data(id(0xaa)));
    entries.insert(3, BlockRef::Zero);
    Manifest {
        header: ManifestHeader {
            volume: "vm".into(),
            name: "s1".into(),
            id: snapshot_id(),
            created: Timestamp::new(1_700_000_000, 5),
            size: 16384,
            block_size: 4096,
            delta_base: Some(id(0x11)),
            depth: 1,
            root: Some(id(0x22)),
            packs: vec![id(0x33)],
        },
        delta: Delta {
            block_count: 4,
            entries,
        },
    }
}

fn catalog() -> Catalog {
    Catalog {
        volume: "vm".into(),
        generation: 2,
        origin: Some(Origin {
            volume: "base".into(),
            snapshot: "gold".into(),
            id: SnapshotId([0x44; 32]),
        }),
        snapshots: vec![CatalogSnapshot {
            name: "s1".into(),
            id: snapshot_id(),
            created: Timestamp::new(1_700_000_000, 5),
            size: 16384,
            manifest: id(0x55),
        }],
        hints: vec![SourceHints {
            source_system: "raw:0123abcd".into(),
            source_volume: "vm".into(),
            snapshots: vec![Hint {
                source_snapshot: "s1".into(),
                id: snapshot_id(),
                created: Timestamp::new(1_700_000_000, 5),
                local_volume: "vm".into(),
                local_snapshot: "s1".into(),
            }],
        }],
    }
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 20-byte envelope header: magic, version 1, payload length.
fn envelope_header(magic: &str, len: usize) -> String {
    format!(
        "{}01000000{}",
        hex(magic.as_bytes()),
        hex(&(len as u64).to_le_bytes())
    )
}

#[test]
fn snapshot_identities_are_pinned() {
    assert_eq!(
        snapshot_id().to_hex(),
        "b740fedad556e3fafe3fd27df308eae8d998392f4f50fbf72a1310e1946df55e"
    );
}

#[test]
fn the_envelope_is_pinned() {
    let bytes = unhex(
        "534e53594d414e49010000000800000000000000736e617073796e63\
         433c3cb171c94b672421d51d6948eeba9a99c8772235f5acb7f13c746c0ffd46",
    );
    assert_eq!(
        format::decode_envelope(MAGIC_MANIFEST, &bytes, "golden").unwrap(),
        b"snapsync"
    );
}

const MANIFEST_HEADER_JSON: &str = r#"{"volume":"vm","name":"s1","id":"b740fedad556e3fafe3fd27df308eae8d998392f4f50fbf72a1310e1946df55e","created":{"secs":1700000000,"nanos":5},"size":16384,"block_size":4096,"delta_base":"1111111111111111111111111111111111111111111111111111111111111111","depth":1,"root":"2222222222222222222222222222222222222222222222222222222222222222","packs":["3333333333333333333333333333333333333333333333333333333333333333"]}"#;

#[test]
fn a_manifest_is_pinned() {
    let entries = format!(
        // block count 4, 2 entries: block 0 data (id aa..), block 3 zero.
        "{}{}{}01{}{}00",
        hex(&4u64.to_le_bytes()),
        hex(&2u64.to_le_bytes()),
        hex(&0u64.to_le_bytes()),
        "aa".repeat(32),
        hex(&3u64.to_le_bytes()),
    );
    let payload_len = 4 + MANIFEST_HEADER_JSON.len() + entries.len() / 2;
    let want = format!(
        "{}{}{}{}{}",
        envelope_header("SNSYMANI", payload_len),
        hex(&(MANIFEST_HEADER_JSON.len() as u32).to_le_bytes()),
        hex(MANIFEST_HEADER_JSON.as_bytes()),
        entries,
        "7a2111c751cf8e768afde877e95f43330f629455f291f5c45d5ab7717d305ef6",
    );
    let bytes = unhex(&want);
    assert_eq!(
        format::decode_manifest(&bytes, "golden").unwrap(),
        manifest()
    );
}

const CATALOG_JSON: &str = r#"{"volume":"vm","generation":2,"origin":{"volume":"base","snapshot":"gold","id":"4444444444444444444444444444444444444444444444444444444444444444"},"snapshots":[{"name":"s1","id":"b740fedad556e3fafe3fd27df308eae8d998392f4f50fbf72a1310e1946df55e","created":{"secs":1700000000,"nanos":5},"size":16384,"manifest":"5555555555555555555555555555555555555555555555555555555555555555"}],"hints":[{"source_system":"raw:0123abcd","source_volume":"vm","snapshots":[{"source_snapshot":"s1","id":"b740fedad556e3fafe3fd27df308eae8d998392f4f50fbf72a1310e1946df55e","created":{"secs":1700000000,"nanos":5},"local_volume":"vm","local_snapshot":"s1"}]}]}"#;

#[test]
fn a_catalog_is_pinned() {
    let want = format!(
        "{}{}{}",
        envelope_header("SNSYCATL", CATALOG_JSON.len()),
        hex(CATALOG_JSON.as_bytes()),
        "c95fce89fa55f074c8c829c700253d79cead0247720845f15a314baaf08b7aa0",
    );
    let bytes = unhex(&want);
    let back: Catalog = format::decode_json(MAGIC_CATALOG, &bytes, "golden").unwrap();
    assert_eq!(back, catalog());
}

// ---- The committed version-1 repository ----

const BS: u64 = 4096;

/// Where the fixture lives in the source tree.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-repo")
}

/// What the fixture holds, volume -> snapshot -> (age, bytes), and `clone`'s lineage:
/// random, compressible and zero blocks, an incremental, and a clone.
fn fixture_source() -> snapsync_store::memory::MemoryStore {
    use snapsync_store::sample::pseudo_random;
    let block = |k: u64| -> Vec<u8> {
        match k % 4 {
            0 => vec![0; BS as usize],
            1 => (0..BS).map(|i| (i % 13) as u8 + k as u8).collect(),
            _ => pseudo_random(k, BS as usize),
        }
    };
    let s1: Vec<u8> = (0..16).flat_map(block).collect();
    let mut s2 = s1.clone();
    for k in [2u64, 5, 9] {
        let at = (k * BS) as usize;
        s2[at..at + BS as usize].copy_from_slice(&pseudo_random(100 + k, BS as usize));
    }
    let mut c1 = s1.clone();
    c1[..BS as usize].copy_from_slice(&pseudo_random(200, BS as usize));
    let t = |s: i64| Timestamp::new(1_700_000_000 + s, 0);
    let src = snapsync_store::memory::MemoryStore::new("v1-fixture", BS);
    src.add_snapshot("vm", "s1", t(10), s1);
    src.add_snapshot("vm", "s2", t(20), s2);
    src.add_snapshot("clone", "c1", t(30), c1);
    src.set_origin(
        "clone",
        Origin {
            volume: "vm".into(),
            snapshot: "s1".into(),
            id: SnapshotId::derive("mem:v1-fixture", "vm", "s1", t(10)),
        },
    );
    src
}

/// Wrote the fixture (once, when the format was frozen, with the version-1 code):
/// `SNAPSYNC_WRITE_V1_FIXTURE=1 cargo test -p snapsync-repo --test format_v1 -- --ignored`.
/// Kept as the record of how it was made; today's code would write version 2.
#[test]
#[ignore = "writes the committed fixture; run only to create it"]
fn write_the_v1_fixture() {
    if std::env::var_os("SNAPSYNC_WRITE_V1_FIXTURE").is_none() {
        return;
    }
    let dir = fixture_dir();
    assert!(
        !dir.exists(),
        "{} exists: the fixture is never rewritten",
        dir.display()
    );
    let repo = snapsync_repo::Repository::init(snapsync_repo::Location::Local(dir), BS).unwrap();
    let src = fixture_source();
    snapsync_engine::replicate(
        &src,
        &repo,
        &snapsync_engine::ReplicateOptions::default(),
        &snapsync_store::NoProgress,
        &mut |_| {},
    )
    .unwrap();
}

/// Copy a directory tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn the_committed_v1_repository_reads_verifies_and_takes_new_snapshots() {
    use snapsync_store::{SnapshotSource, Store};
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("v1-repo");
    copy_tree(&fixture_dir(), &copy);
    let repo = snapsync_repo::Repository::open(snapsync_repo::Location::Local(copy)).unwrap();
    assert_eq!(repo.block_size(), BS);
    let src = fixture_source();
    let want = src.list().unwrap();
    let got = repo.list().unwrap();
    assert_eq!(
        got, want,
        "volumes, snapshots, identities, ages, sizes and lineage"
    );
    for volume in &want {
        for snapshot in &volume.snapshots {
            let mut reader = repo.open_snapshot(&volume.name, &snapshot.name).unwrap();
            let mut bytes = vec![0u8; snapshot.size as usize];
            reader.read_at(0, &mut bytes).unwrap();
            assert!(
                bytes == *src.content(&volume.name, &snapshot.name).unwrap(),
                "{}@{} reads back different bytes",
                volume.name,
                snapshot.name
            );
        }
    }
    let hints = snapsync_store::SnapshotSink::hints(&repo, "mem:v1-fixture", "vm").unwrap();
    assert_eq!(hints.len(), 2, "{hints:?}");
    let report = repo.verify(true, &snapsync_store::NoProgress).unwrap();
    assert!(report.ok, "{report:?}");
    // This version also writes into it: an incremental against the fixture's s2.
    let mut s3 = src.content("vm", "s2").unwrap().to_vec();
    s3[..BS as usize].fill(0x5a);
    src.add_snapshot("vm", "s3", Timestamp::new(1_700_000_040, 0), s3.clone());
    let reports = snapsync_engine::replicate(
        &src,
        &repo,
        &snapsync_engine::ReplicateOptions::default(),
        &snapsync_store::NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].base.as_deref(), Some("s2"));
    assert!(repo.verify(true, &snapsync_store::NoProgress).unwrap().ok);
}
