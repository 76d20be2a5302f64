//! Format version 2, frozen: a manifest head with its entries inline, a head with a part
//! table, and a part, pinned to the BLAKE3 of their exact bytes (and their structure
//! spelled out), so that a change to what version 2 writes is seen here and bumps the
//! version instead of silently changing the format.

use snapsync_core::{BlockId, BlockRef, SnapshotId, Timestamp};
use snapsync_repo::format::{self, ManifestHeader, PartRef, MAGIC_MANIFEST, MAGIC_MANIFEST_PART};

fn header(full: bool) -> ManifestHeader {
    ManifestHeader {
        volume: "vm".into(),
        name: "s2".into(),
        id: SnapshotId([0x44; 32]),
        created: Timestamp::new(1_700_000_000, 5),
        size: 16384,
        block_size: 4096,
        delta_base: (!full).then_some(BlockId([0x11; 32])),
        depth: if full { 0 } else { 6 },
        root: full.then_some(BlockId([0x22; 32])),
        packs: vec![BlockId([0x33; 32])],
    }
}

fn entries() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0u64.to_le_bytes());
    v.push(1);
    v.extend_from_slice(&[0xaa; 32]);
    v.extend_from_slice(&3u64.to_le_bytes());
    v.push(0);
    v
}

fn pinned(bytes: &[u8], magic: &[u8; 8], want: &str) {
    assert_eq!(&bytes[..8], magic);
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes(), "version 2");
    assert_eq!(blake3::hash(bytes).to_hex().as_str(), want);
}

#[test]
fn an_inline_manifest_is_pinned() {
    let bytes = format::encode_manifest_head(&header(false), 4, 2, &[], &entries());
    let json = serde_json::to_vec(&header(false)).unwrap();
    // header length, header, block count, entry count, part count 0, entries inline.
    let at = 20 + 4 + json.len();
    assert_eq!(&bytes[at..at + 8], &4u64.to_le_bytes());
    assert_eq!(&bytes[at + 8..at + 16], &2u64.to_le_bytes());
    assert_eq!(&bytes[at + 16..at + 20], &0u32.to_le_bytes());
    assert_eq!(&bytes[at + 20..bytes.len() - 32], &entries()[..]);
    assert!(
        !String::from_utf8_lossy(&json).contains("root"),
        "deltas have no root"
    );
    pinned(&bytes, MAGIC_MANIFEST, PIN_INLINE);
    let m = format::decode_manifest(&bytes, "golden").unwrap();
    assert_eq!(m.header, header(false));
    assert_eq!(m.delta.entries.len(), 2);
    assert_eq!(m.delta.entries[&3], BlockRef::Zero);
}

#[test]
fn a_manifest_in_parts_and_a_part_are_pinned() {
    let part = format::encode_part(2, &entries());
    pinned(&part, MAGIC_MANIFEST_PART, PIN_PART);
    let part_ref = PartRef {
        first: 0,
        last: 3,
        count: 2,
        id: BlockId(*blake3::hash(&part).as_bytes()),
    };
    assert_eq!(
        format::decode_part(&part, &part_ref, 4, "golden").unwrap(),
        vec![
            (0, BlockRef::Data(BlockId([0xaa; 32]))),
            (3, BlockRef::Zero)
        ]
    );
    let head = format::encode_manifest_head(&header(true), 4, 2, &[part_ref], &[]);
    let json = serde_json::to_vec(&header(true)).unwrap();
    let at = 20 + 4 + json.len() + 16;
    assert_eq!(&head[at..at + 4], &1u32.to_le_bytes(), "one part");
    assert_eq!(&head[at + 4..at + 12], &0u64.to_le_bytes());
    assert_eq!(&head[at + 12..at + 20], &3u64.to_le_bytes());
    assert_eq!(&head[at + 20..at + 28], &2u64.to_le_bytes());
    assert_eq!(&head[at + 28..at + 60], part_ref.id.as_bytes());
    assert_eq!(head.len(), at + 60 + 32);
    pinned(&head, MAGIC_MANIFEST, PIN_HEAD);
    // A part that does not match its table entry is refused.
    let wrong = PartRef {
        last: 2,
        ..part_ref
    };
    assert!(format::decode_part(&part, &wrong, 4, "golden").is_err());
}

const PIN_INLINE: &str = "3af33c26b2abd6a4c7ccf579c4b2a0df41171a619056d35f62a829311543b545";
const PIN_PART: &str = "97080709b1cd5ae41686cab94be9a15c381b124b437f692efab2f2e580e43bc9";
const PIN_HEAD: &str = "0002e8b746235d97c31f31c229b1a583ec4bf40f2e05c88aa9b02be5fe5e8394";
