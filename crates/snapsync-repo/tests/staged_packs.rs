//! Packs written to staging files while they fill (local repositories): a committed
//! receive leaves none behind, an abandoned one removes its own, and `gc` deletes one
//! left by a killed process.

use snapsync_core::{BlockId, SnapshotId, SnapshotInfo, Timestamp};
use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_repo::{Location, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{
    BlockContent, Compressed, IncomingBlock, NoProgress, ReceiveRequest, SnapshotSink,
    SnapshotSource,
};

const BS: u64 = 4096;

fn t(s: i64) -> Timestamp {
    Timestamp::new(1_700_000_000 + s, 0)
}

/// Files directly under `packs/` whose name says they are staging files.
fn staging_files(repo: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(repo.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("staging-"))
        .collect()
}

#[test]
fn staging_files_are_published_removed_or_collected() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Repository::init(Location::Local(root.clone()), BS).unwrap();
    let src = MemoryStore::new("src", BS);
    let data = pseudo_random(1, 300 * BS as usize);
    src.add_snapshot("vm", "s1", t(0), data.clone());
    replicate(
        &src,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(staging_files(&root), Vec::<String>::new());

    // A receive abandoned after writing blocks (its pack half full) removes its file.
    let info = SnapshotInfo {
        name: "s2".into(),
        id: SnapshotId::derive("src", "vm", "s2", t(60)),
        created: t(60),
        size: 4 * BS,
    };
    let mut rx = repo
        .begin_receive(ReceiveRequest {
            volume: "vm".into(),
            snapshot: info,
            base: None,
            source_system: "src".into(),
            source_volume: "vm".into(),
            source_snapshot: "s2".into(),
            origin: None,
        })
        .unwrap();
    let block = pseudo_random(2, BS as usize);
    rx.write(vec![IncomingBlock {
        index: 0,
        content: BlockContent::Data {
            id: BlockId::of(&block),
            data: block.into(),
            compressed: Compressed::NotTried,
        },
    }])
    .unwrap();
    assert_eq!(
        staging_files(&root).len(),
        1,
        "the pack is written as it fills"
    );
    drop(rx);
    assert_eq!(staging_files(&root), Vec::<String>::new());

    // One left by a killed process is in no index: gc deletes it, and nothing else.
    let leftover = root.join("packs/staging-00112233445566778899aabbccddeeff");
    std::fs::write(&leftover, b"SNSYPACK half a pack").unwrap();
    let gc = repo.gc().unwrap();
    assert!(!leftover.exists(), "{gc:?}");
    assert!(repo.verify(true, &NoProgress).unwrap().ok);
    let mut r = repo.open_snapshot("vm", "s1").unwrap();
    let mut back = vec![0u8; data.len()];
    r.read_at(0, &mut back).unwrap();
    assert!(back == data);
}
