//! The block index cached between processes (`RepoOptions::cache_dir`): a later
//! process starts from it instead of reading every pack index again, and never trusts
//! it after a gc.

use snapsync_core::Timestamp;
use snapsync_engine::{replicate, restore, ReplicateOptions, SnapshotReport};
use snapsync_repo::{Location, PruneOptions, RepoOptions, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::NoProgress;

const BS: u64 = 4096;

fn open(root: &std::path::Path, cache: Option<&std::path::Path>) -> Repository {
    let o = RepoOptions::default().with_cache_dir(cache.map(|c| c.to_path_buf()));
    Repository::open_with(Location::Local(root.to_path_buf()), &o).unwrap()
}

/// A new repository of `BS` blocks (`root`, its cache dir `cache` beside it, both in
/// `dir`), and a memory source holding `vm@s1` (`s1`, 64 blocks).
struct Setup {
    dir: tempfile::TempDir,
    root: std::path::PathBuf,
    cache: std::path::PathBuf,
    src: MemoryStore,
    s1: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let cache = dir.path().join("cache");
    Repository::init(Location::Local(root.clone()), BS).unwrap();
    let src = MemoryStore::new("src", BS);
    let s1 = pseudo_random(1, 64 * BS as usize);
    src.add_snapshot("vm", "s1", Timestamp::new(1_700_000_000, 0), s1.clone());
    Setup {
        dir,
        root,
        cache,
        src,
        s1,
    }
}

/// Replicate what `src` holds into `repo` (a process of its own when `repo` is a
/// fresh `Repository`).
fn send(src: &MemoryStore, repo: &Repository) -> Vec<SnapshotReport> {
    replicate(
        src,
        repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap()
}

fn read(repo: &Repository, snapshot: &str, dir: &std::path::Path) -> Result<Vec<u8>, String> {
    let out = dir.join(format!("{snapshot}.out"));
    let _ = std::fs::remove_file(&out);
    restore(repo, "vm", snapshot, &out, &NoProgress).map_err(|e| e.to_string())?;
    Ok(std::fs::read(out).unwrap())
}

#[test]
fn a_later_process_starts_from_the_cache_and_a_gc_discards_it() {
    let Setup {
        dir,
        root,
        cache,
        src,
        s1,
    } = setup();
    let mut s2 = s1.clone();
    s2[..BS as usize].fill(7);
    // Each replication in a process of its own (a fresh `Repository`).
    send(&src, &open(&root, Some(&cache)));
    // Cached after the commit, with the packs it stored (not only as it was loaded).
    let repo_id = open(&root, None).repository_id().to_string();
    let state = cache.join(&repo_id).join("index").join("state.json");
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let packs = cached["packs"].as_array().unwrap().len();
    assert!(packs > 0 && packs == std::fs::read_dir(root.join("index")).unwrap().count());
    src.add_snapshot("vm", "s2", Timestamp::new(1_700_000_100, 0), s2.clone());
    send(&src, &open(&root, Some(&cache)));
    assert!(state.exists(), "cached");

    // Proof that a later process uses it: with one pack's index object gone (nothing
    // but a gc deletes one), the cached process still finds that pack's blocks.
    let index_dir = root.join("index");
    let first_index = std::fs::read_dir(&index_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let saved = std::fs::read(&first_index).unwrap();
    std::fs::remove_file(&first_index).unwrap();
    let cached = open(&root, Some(&cache));
    assert!(read(&cached, "s1", dir.path()).unwrap() == s1);
    assert!(read(&cached, "s2", dir.path()).unwrap() == s2);
    let uncached = open(&root, None);
    assert!(
        read(&uncached, "s1", dir.path()).is_err(),
        "without the cache the index is gone"
    );
    std::fs::write(&first_index, saved).unwrap();

    // A gc (after a prune) invalidates the cache for every process.
    let gc_side = open(&root, Some(&cache));
    gc_side
        .prune(
            &PruneOptions::new(snapsync_core::KeepPolicy {
                last: 1,
                ..Default::default()
            })
            .with_force(true),
        )
        .unwrap();
    gc_side.gc().unwrap();
    let after = open(&root, Some(&cache));
    assert!(read(&after, "s2", dir.path()).unwrap() == s2);
    assert!(after.verify(true, &NoProgress).unwrap().ok);
    // The next replication loads the whole index again and caches it anew.
    let mut s3 = s2.clone();
    s3[5 * BS as usize..6 * BS as usize].fill(9);
    src.add_snapshot("vm", "s3", Timestamp::new(1_700_000_200, 0), s3.clone());
    send(&src, &after);
    assert!(read(&open(&root, Some(&cache)), "s3", dir.path()).unwrap() == s3);
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(s["gc_epochs"], 1, "rebuilt after the gc");
}

/// Records of the cache damaged on disk (a cached run's pages are checked as they are
/// read, not when it is opened): the process that meets the damage rebuilds the index
/// from the repository and answers right, and the next process caches it anew.
#[test]
fn a_damaged_cache_is_rebuilt_and_nothing_is_lost() {
    let Setup {
        dir,
        root,
        cache,
        src,
        s1,
    } = setup();
    send(&src, &open(&root, Some(&cache)));
    let repo_id = open(&root, None).repository_id().to_string();
    let index = cache.join(&repo_id).join("index");
    let runs = |state: &std::path::Path| -> Vec<String> {
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
        let names = s["runs"].as_array().unwrap().iter();
        names.map(|r| r.as_str().unwrap().to_string()).collect()
    };
    let damaged = runs(&index.join("state.json"));
    assert!(!damaged.is_empty(), "the replication cached its index");
    for name in &damaged {
        // A location word of the first record (after the magic and the salt).
        let path = index.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[24 + 36] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    }

    let repo = open(&root, Some(&cache));
    assert!(read(&repo, "s1", dir.path()).unwrap() == s1, "read right");
    let rebuilt = runs(&index.join("state.json"));
    assert!(
        rebuilt.iter().all(|r| !damaged.contains(r)),
        "the damage was met, and the index rebuilt and cached anew: {rebuilt:?}"
    );
    let mut s2 = s1.clone();
    s2[..BS as usize].fill(3);
    src.add_snapshot("vm", "s2", Timestamp::new(1_700_000_100, 0), s2.clone());
    let reports = send(&src, &repo);
    assert_eq!(reports[0].base.as_deref(), Some("s1"));
    let later = open(&root, Some(&cache));
    assert!(read(&later, "s2", dir.path()).unwrap() == s2);
    assert!(read(&later, "s1", dir.path()).unwrap() == s1);
    assert!(later.verify(true, &NoProgress).unwrap().ok);
}
