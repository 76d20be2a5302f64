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

mod fixture;
use fixture::BS;

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

/// Where the fixture lives in the source tree.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-repo")
}

/// The memory store the fixture was replicated from (its name is in the hints).
const SOURCE: &str = "v1-fixture";

/// Wrote the fixture (once, when the format was frozen, with the version-1 code):
/// `SNAPSYNC_WRITE_V1_FIXTURE=1 cargo test -p snapsync-repo --test format_v1 -- --ignored`.
/// Kept as the record of how it was made; today's code would write version 2.
#[test]
#[ignore = "writes the committed fixture; run only to create it"]
fn write_the_v1_fixture() {
    let Some(dir) = fixture::dir_to_write("SNAPSYNC_WRITE_V1_FIXTURE", fixture_dir()) else {
        return;
    };
    let repo = snapsync_repo::Repository::init(snapsync_repo::Location::Local(dir), BS).unwrap();
    fixture::replicate(&fixture::fixture_source(SOURCE), &repo);
}

#[test]
fn the_committed_v1_repository_reads_verifies_and_takes_new_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("v1-repo");
    fixture::copy_tree(&fixture_dir(), &copy);
    let repo = snapsync_repo::Repository::open(snapsync_repo::Location::Local(copy)).unwrap();
    fixture::check_reads_verifies_and_takes_new_snapshots(&repo, &fixture::fixture_source(SOURCE));
}
