//! Reading snapshots back out of a repository: blocks stored plain and compressed,
//! zero, repeated (adjacent and not), spread over packs by a delta; reads of any size at
//! any offset; damage found whichever way a block is stored.

use snapsync_core::Timestamp;
use snapsync_engine::{replicate, restore, ReplicateOptions};
use snapsync_repo::{Location, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{NoProgress, SnapshotSource};

const BS: usize = 4096;

fn t(s: i64) -> Timestamp {
    Timestamp::new(1_700_000_000 + s, 0)
}

/// A block that zstd shrinks a lot.
fn compressible(seed: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| b"snapsync block "[(i + seed as usize) % 15] ^ (i / 512) as u8)
        .collect()
}

/// Blocks of every kind, a size that is not a whole number of blocks.
fn mixed_content() -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..300u64 {
        let block = match i % 7 {
            0 => vec![0u8; BS],
            1 | 4 => compressible(i % 3),
            3 => pseudo_random(1_000 + (i % 5), BS),
            _ => pseudo_random(i, BS),
        };
        v.extend_from_slice(&block);
    }
    // A run of one repeated block, adjacent copies.
    let same = pseudo_random(77, BS);
    for b in 100..110 {
        v[b * BS..(b + 1) * BS].copy_from_slice(&same);
    }
    v.extend_from_slice(&pseudo_random(9, 1234));
    v
}

fn send(src: &MemoryStore, dst: &Repository) {
    replicate(
        src,
        dst,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
}

/// Read with pieces of `step` bytes, then once past the end.
fn read_in_steps(repo: &Repository, snap: &str, len: usize, step: usize) -> Vec<u8> {
    let mut r = repo.open_snapshot("vm", snap).unwrap();
    let mut out = vec![0xAAu8; len];
    let mut off = 0;
    while off < len {
        let n = step.min(len - off);
        r.read_at(off as u64, &mut out[off..off + n]).unwrap();
        off += n;
    }
    let mut past = vec![0xAAu8; 3 * BS];
    r.read_at(len as u64 - 100, &mut past).unwrap();
    assert!(
        past[100..].iter().all(|&b| b == 0),
        "past the end reads zeros"
    );
    out
}

#[test]
fn every_kind_of_block_reads_back_at_any_offset_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(Location::Local(dir.path().join("repo")), BS as u64).unwrap();
    let src = MemoryStore::new("src", BS as u64);
    let s1 = mixed_content();
    let mut s2 = s1.clone();
    // Scattered changes: s2's blocks come from two packs, out of order.
    for (k, b) in [3usize, 50, 51, 105, 200, 299].into_iter().enumerate() {
        let new = if k % 2 == 0 {
            pseudo_random(500 + k as u64, BS)
        } else {
            compressible(7)
        };
        s2[b * BS..(b + 1) * BS].copy_from_slice(&new);
    }
    src.add_snapshot("vm", "s1", t(1), s1.clone());
    src.add_snapshot("vm", "s2", t(2), s2.clone());
    send(&src, &repo);

    for (snap, content) in [("s1", &s1), ("s2", &s2)] {
        for step in [
            1,
            1000,
            BS - 1,
            BS,
            BS + 1,
            3 * BS + 7,
            64 * BS,
            content.len(),
        ] {
            let got = read_in_steps(&repo, snap, content.len(), step);
            assert!(got == *content, "{snap} read in pieces of {step} differs");
        }
        // Unaligned reads in both directions, each from a fresh position.
        let mut r = repo.open_snapshot("vm", snap).unwrap();
        for (off, len) in [(BS * 100 - 1, 2 * BS + 2), (5, 10), (BS * 7 + 3, BS * 20)] {
            let mut buf = vec![0xAAu8; len];
            r.read_at(off as u64, &mut buf).unwrap();
            assert!(buf == content[off..off + len], "{snap} at {off}+{len}");
        }
        let out = dir.path().join(format!("{snap}.img"));
        restore(&repo, "vm", snap, &out, &NoProgress).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *content,
            "restore of {snap}"
        );
    }

    // By id, repeated ids included.
    let ids: Vec<_> = [1usize, 2, 3, 1, 100, 101, 8]
        .iter()
        .map(|b| snapsync_core::BlockId::of(&s1[b * BS..(b + 1) * BS]))
        .collect();
    let blocks = repo.read_blocks(&ids).unwrap();
    for (b, got) in [1usize, 2, 3, 1, 100, 101, 8].iter().zip(blocks) {
        assert_eq!(got, &s1[b * BS..(b + 1) * BS]);
    }
}

/// Flip one byte at `pos` of the only pack and expect reading `content` to fail naming
/// the damage.
fn assert_damage_found(content: Vec<u8>, locate: impl Fn(&[u8]) -> usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Repository::init(Location::Local(root.clone()), BS as u64).unwrap();
    let src = MemoryStore::new("src", BS as u64);
    src.add_snapshot("vm", "s1", t(1), content.clone());
    send(&src, &repo);
    let packs: Vec<_> = walk(&root.join("packs"));
    assert_eq!(packs.len(), 1);
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    let pos = locate(&bytes);
    bytes[pos] ^= 0x40;
    std::fs::write(&packs[0], &bytes).unwrap();

    let fresh = Repository::open(Location::Local(root)).unwrap();
    let mut r = fresh.open_snapshot("vm", "s1").unwrap();
    let mut out = vec![0u8; content.len()];
    let err = r.read_at(0, &mut out).unwrap_err().to_string();
    assert!(err.contains("damaged"), "{err}");
}

#[test]
fn a_damaged_block_is_found_whether_stored_plain_or_compressed() {
    // Plain: random blocks are stored as they are; flip a byte inside the third one.
    let random = pseudo_random(3, 16 * BS);
    let third = random[2 * BS..3 * BS].to_vec();
    assert_damage_found(random, |pack| {
        pack.windows(BS)
            .position(|w| w == third)
            .expect("stored plain")
            + 100
    });
    // Compressed: every block is one zstd frame; flip a byte in the middle of the pack.
    let text: Vec<u8> = (0..16).flat_map(|i| compressible(i % 3 + 1)).collect();
    assert_damage_found(text, |pack| pack.len() / 2);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_volume_that_shrinks_then_grows_reads_zeros_where_it_was_cut() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(Location::Local(dir.path().join("repo")), BS as u64).unwrap();
    let src = MemoryStore::new("src", BS as u64);
    let s1 = pseudo_random(1, 40 * BS);
    // Cut to 10.5 blocks, then grown back to 40 with two new blocks near the end.
    let s2 = s1[..10 * BS + BS / 2].to_vec();
    let mut s3 = s2.clone();
    s3.resize(40 * BS, 0);
    s3[30 * BS..32 * BS].copy_from_slice(&pseudo_random(3, 2 * BS));
    src.add_snapshot("vm", "s1", t(1), s1.clone());
    src.add_snapshot("vm", "s2", t(2), s2.clone());
    src.add_snapshot("vm", "s3", t(3), s3.clone());
    send(&src, &repo);
    for (snap, content) in [("s1", &s1), ("s2", &s2), ("s3", &s3)] {
        for step in [BS - 1, 8 * BS, content.len()] {
            let got = read_in_steps(&repo, snap, content.len(), step);
            assert!(got == *content, "{snap} read in pieces of {step} differs");
        }
    }
}
