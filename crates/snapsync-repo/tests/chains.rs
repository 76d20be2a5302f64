//! Tintri chains in the repository: insertion with re-base, clones, prune, gc, chain
//! depth; and a property test of all of them against a model (the source's bytes).

use proptest::prelude::*;
use snapsync_core::{Extent, ExtentList};
use snapsync_core::{KeepPolicy, Origin, Timestamp};
use snapsync_engine::{replicate, restore, ReplicateOptions, SnapshotReport};
use snapsync_repo::{Location, PruneOptions, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{NoProgress, SnapshotRef, SnapshotSource, Store};

const BS: u64 = 4096;

fn t(s: i64) -> Timestamp {
    Timestamp::new(1_700_000_000 + s, 0)
}

thread_local! {
    /// Whether this test's repositories are encrypted (format version 3): every test
    /// runs on its own thread, and those below marked "both" run once each way.
    static ENCRYPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `test` on a plain and on an encrypted repository.
fn both(test: fn()) {
    for encrypted in [false, true] {
        ENCRYPTED.with(|e| e.set(encrypted));
        test();
    }
}

/// Options that open this test's repositories (a passphrase when encrypted, with a
/// cheap key derivation: the tests are not about Argon2id's cost).
fn options() -> snapsync_repo::RepoOptions {
    let o = snapsync_repo::RepoOptions::default().with_part_entries(5);
    if ENCRYPTED.with(|e| e.get()) {
        let kdf = snapsync_repo::KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        o.with_credentials(snapsync_repo::Credentials::default().with_passphrase("test"))
            .with_kdf(kdf)
    } else {
        o
    }
}

/// A repository whose manifests are split into parts of a few entries, so that every
/// chain operation here crosses part boundaries (the default holds 16 Ki entries).
fn repo(dir: &std::path::Path) -> Repository {
    let location = Location::Local(dir.join("repo"));
    let r = if ENCRYPTED.with(|e| e.get()) {
        Repository::init_encrypted(location, BS, &options()).unwrap()
    } else {
        Repository::init_with(location, BS, &options()).unwrap()
    };
    assert_eq!(r.is_encrypted(), ENCRYPTED.with(|e| e.get()));
    r
}

fn reopen(dir: &std::path::Path) -> Repository {
    Repository::open_with(Location::Local(dir.join("repo")), &options()).unwrap()
}

fn send(src: &MemoryStore, dst: &Repository, snapshot: Option<&str>) -> Vec<SnapshotReport> {
    let opts = ReplicateOptions::default().with_snapshot(snapshot.map(String::from));
    replicate(src, dst, &opts, &NoProgress, &mut |_| {}).unwrap()
}

fn read(repo: &Repository, volume: &str, snap: &str) -> Vec<u8> {
    let info = repo.volume(volume).unwrap().snapshot(snap).unwrap().clone();
    let mut r = repo.open_snapshot(volume, snap).unwrap();
    let mut out = vec![0u8; info.size as usize];
    r.read_at(0, &mut out).unwrap();
    out
}

fn entries(repo: &Repository, volume: &str, snap: &str) -> usize {
    let cat = repo.catalog(volume).unwrap().unwrap();
    let s = cat.snapshots.iter().find(|s| s.name == snap).unwrap();
    repo.manifest(&s.manifest).unwrap().delta.len()
}

#[test]
fn inserting_an_older_snapshot_rebases_its_younger_neighbour() {
    both(inserting_an_older_snapshot_rebases_its_younger_neighbour_once);
}

fn inserting_an_older_snapshot_rebases_its_younger_neighbour_once() {
    let dir = tempfile::tempdir().unwrap();
    let dst = repo(dir.path());
    let src = MemoryStore::new("src", BS);
    let s1 = pseudo_random(1, 64 * BS as usize);
    // s3 changes blocks 0..20; s5 keeps 0..16 of those changes and more.
    let mut s3 = s1.clone();
    s3[..20 * BS as usize].copy_from_slice(&pseudo_random(3, 20 * BS as usize));
    let mut s5 = s3.clone();
    s5[16 * BS as usize..24 * BS as usize].copy_from_slice(&pseudo_random(5, 8 * BS as usize));
    src.add_snapshot("vm", "s1", t(10), s1.clone());
    src.add_snapshot("vm", "s3", t(30), s3.clone());
    src.add_snapshot("vm", "s5", t(50), s5.clone());
    send(&src, &dst, Some("s1"));
    send(&src, &dst, Some("s5"));
    let s5_before = entries(&dst, "vm", "s5");
    assert_eq!(s5_before, 24);
    let r = send(&src, &dst, Some("s3"));
    assert_eq!(r[0].inserted_before.as_deref(), Some("s5"));
    // s5 now only differs from s3 in blocks 16..24: 16 entries became redundant.
    let s5_after = entries(&dst, "vm", "s5");
    assert_eq!(s5_after, 8);
    assert_eq!(r[0].redundant_entries_removed, 16);
    let s3_entries = entries(&dst, "vm", "s3");
    // No more metadata than without the re-base (s3's delta + s5's old delta).
    assert!(s3_entries + s5_after <= s3_entries + s5_before);
    for (name, want) in [("s1", &s1), ("s3", &s3), ("s5", &s5)] {
        assert!(&read(&dst, "vm", name) == want, "{name}");
    }
    assert!(dst.verify(true, &NoProgress).unwrap().ok);
}

#[test]
fn a_rebase_that_would_add_entries_is_not_made() {
    both(a_rebase_that_would_add_entries_is_not_made_once);
}

fn a_rebase_that_would_add_entries_is_not_made_once() {
    let dir = tempfile::tempdir().unwrap();
    let dst = repo(dir.path());
    let src = MemoryStore::new("src", BS);
    let s1 = pseudo_random(1, 32 * BS as usize);
    let mut s3 = s1.clone();
    s3[..16 * BS as usize].copy_from_slice(&pseudo_random(3, 16 * BS as usize));
    let mut s5 = s1.clone();
    s5[31 * BS as usize] ^= 1; // s5 reverts everything s3 changed
    src.add_snapshot("vm", "s1", t(10), s1);
    src.add_snapshot("vm", "s3", t(30), s3);
    src.add_snapshot("vm", "s5", t(50), s5.clone());
    send(&src, &dst, Some("s1"));
    send(&src, &dst, Some("s5"));
    let r = send(&src, &dst, Some("s3"));
    assert_eq!(r[0].inserted_before.as_deref(), Some("s5"));
    assert_eq!(r[0].redundant_entries_removed, 0);
    assert_eq!(entries(&dst, "vm", "s5"), 1);
    assert!(read(&dst, "vm", "s5") == s5);
}

#[test]
fn prune_merges_removed_deltas_and_gc_reclaims_space() {
    both(prune_merges_removed_deltas_and_gc_reclaims_space_once);
}

fn prune_merges_removed_deltas_and_gc_reclaims_space_once() {
    let dir = tempfile::tempdir().unwrap();
    let dst = repo(dir.path());
    let src = MemoryStore::new("src", BS);
    let mut data = pseudo_random(1, 64 * BS as usize);
    let mut versions = vec![];
    for k in 0..6 {
        // Each snapshot rewrites most of the volume, so most old data becomes garbage.
        let off = (k * 4) as usize * BS as usize;
        data[off..off + 40 * BS as usize].copy_from_slice(&pseudo_random(10 + k, 40 * BS as usize));
        src.add_snapshot("vm", &format!("s{k}"), t(k as i64 * 86400), data.clone());
        versions.push(data.clone());
    }
    send(&src, &dst, None);
    let before = dir_size(&dir.path().join("repo/packs"));
    let report = dst
        .prune(&PruneOptions::new(KeepPolicy {
            last: 2,
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(report.volumes[0].removed, ["s0", "s1", "s2", "s3"]);
    let names: Vec<_> = dst
        .volume("vm")
        .unwrap()
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["s4", "s5"]);
    let gc = dst.gc().unwrap();
    assert!(
        gc.bytes_freed > 0
            && gc.manifests_deleted >= 4
            && gc.packs_repacked + gc.packs_deleted >= 1,
        "{gc:?}"
    );
    let after = dir_size(&dir.path().join("repo/packs"));
    assert!(after < before, "{after} >= {before}");
    for k in [4, 5] {
        assert!(read(&dst, "vm", &format!("s{k}")) == versions[k]);
    }
    let v = dst.verify(true, &NoProgress).unwrap();
    assert!(v.ok, "{v:?}");
    // A replication after gc still deduplicates correctly against what is left.
    src.add_snapshot("vm", "s6", t(7 * 86400), versions[5].clone());
    let r = send(&src, &dst, Some("s6"));
    assert_eq!(r[0].sent_bytes, 0, "{r:?}");
    assert!(read(&dst, "vm", "s6") == versions[5]);
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        dir_size(&e.path())
                    } else {
                        e.metadata().unwrap().len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn deep_chains_stay_cheap_to_read() {
    both(deep_chains_stay_cheap_to_read_once);
}

fn deep_chains_stay_cheap_to_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let dst = repo(dir.path());
    let src = MemoryStore::new("src", BS);
    let mut data = pseudo_random(1, 256 * BS as usize);
    for k in 0..200u64 {
        let off = ((k * 37) % 250) as usize * BS as usize;
        data[off..off + 2 * BS as usize].copy_from_slice(&pseudo_random(100 + k, 2 * BS as usize));
        src.add_snapshot("vm", &format!("s{k:03}"), t(k as i64), data.clone());
        send(&src, &dst, None);
    }
    let reopened = reopen(dir.path());
    let cat = reopened.catalog("vm").unwrap().unwrap();
    // Snapshot number k resolves through at most popcount(k) + 1 manifests (8 for the
    // 200th), and only the first is a full map: the metadata grows with the changes.
    let mut full_maps = 0;
    for (k, s) in cat.snapshots.iter().enumerate() {
        let mut n = 0;
        let mut cur = Some(s.manifest);
        while let Some(id) = cur {
            n += 1;
            cur = reopened.manifest(&id).unwrap().header.delta_base;
        }
        assert!(
            n <= (k as u32).count_ones() + 1,
            "{} resolves through {n} manifests",
            s.name
        );
        full_maps += usize::from(n == 1);
    }
    assert_eq!(full_maps, 1);
    let time = |name: &str| {
        let r = reopen(dir.path());
        let out = dir.path().join(format!("{name}.img"));
        let start = std::time::Instant::now();
        restore(&r, "vm", name, &out, &NoProgress).unwrap();
        start.elapsed()
    };
    let first = time("s000");
    let last = time("s199");
    println!("restore of snapshot 1: {first:?}; of snapshot 200: {last:?}");
    assert!(std::fs::read(dir.path().join("s199.img")).unwrap() == data);
}

#[test]
fn a_clone_is_stored_against_its_origin_and_keeps_lineage_onward() {
    both(a_clone_is_stored_against_its_origin_and_keeps_lineage_onward_once);
}

fn a_clone_is_stored_against_its_origin_and_keeps_lineage_onward_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = repo(&dir.path().join("a"));
    let b = repo(&dir.path().join("b"));
    let src = MemoryStore::new("src", BS);
    let golden = pseudo_random(1, 64 * BS as usize);
    src.add_snapshot("golden", "base", t(1), golden.clone());
    let id = src.volume("golden").unwrap().snapshots[0].id;
    src.set_origin(
        "vm",
        Origin {
            volume: "golden".into(),
            snapshot: "base".into(),
            id,
        },
    );
    let mut vm = golden.clone();
    vm[..BS as usize].copy_from_slice(&pseudo_random(9, BS as usize));
    src.add_snapshot("vm", "s1", t(2), vm.clone());
    let r = send(&src, &a, Some("s1"));
    assert_eq!(r.len(), 2, "the parent goes first");
    assert_eq!(r[1].sent_bytes, BS);
    assert_eq!(entries(&a, "vm", "s1"), 1);
    // Onward: the repository is now the source; lineage and identities carry over.
    let r = replicate(
        &a,
        &b,
        &ReplicateOptions::default().with_volumes(vec!["vm".into()]),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].read_bytes, BS);
    assert_eq!(b.volume("vm").unwrap().origin.unwrap().volume, "golden");
    assert!(read(&b, "vm", "s1") == vm);
}

#[derive(Debug, Clone)]
enum Op {
    Replicate(usize),
    ReplicateAll,
    Prune(u32),
    Gc,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..8).prop_map(Op::Replicate),
        Just(Op::ReplicateAll),
        (1u32..4).prop_map(Op::Prune),
        Just(Op::Gc),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Any sequence of out-of-order replications (of a volume and of a clone of it),
    /// prunes and gcs leaves every remaining snapshot restoring exactly as the source
    /// (the model) says, and verify clean.
    #[test]
    fn chains_survive_any_sequence(
        writes in proptest::collection::vec(proptest::collection::vec((0usize..12, any::<u8>()), 1..4), 4..7),
        ops in proptest::collection::vec(arb_op(), 1..10),
        encrypted in any::<bool>(),
    ) {
        ENCRYPTED.with(|e| e.set(encrypted));
        let dir = tempfile::tempdir().unwrap();
        let dst = repo(dir.path());
        let src = MemoryStore::new("src", BS);
        let mut data = vec![0u8; 12 * BS as usize];
        let mut names = vec![];
        for (k, w) in writes.iter().enumerate() {
            for (block, fill) in w {
                let off = block * BS as usize;
                data[off..off + BS as usize].fill(*fill);
            }
            let name = format!("s{k}");
            src.add_snapshot("vm", &name, t(k as i64 * 3600), data.clone());
            names.push(("vm", name));
        }
        let origin = src.volume("vm").unwrap().snapshots[1].clone();
        src.set_origin("clone", Origin { volume: "vm".into(), snapshot: origin.name.clone(), id: origin.id });
        let mut c = src.content("vm", &origin.name).unwrap().to_vec();
        c[..100].fill(0xee);
        src.add_snapshot("clone", "c1", t(4000), c.clone());
        c[5000..5100].fill(0xdd);
        src.add_snapshot("clone", "c2", t(8000), c);
        names.push(("clone", "c1".into()));
        names.push(("clone", "c2".into()));
        for op in ops {
            match op {
                Op::Replicate(k) => {
                    let (vol, name) = &names[k % names.len()];
                    let opts = ReplicateOptions::default().with_volumes(vec![vol.to_string()]).with_snapshot(Some(name.clone()));
                    replicate(&src, &dst, &opts, &NoProgress, &mut |_| {}).unwrap();
                }
                Op::ReplicateAll => { send(&src, &dst, None); }
                Op::Prune(n) => {
                    if !dst.list().unwrap().is_empty() {
                        dst.prune(&PruneOptions::new(KeepPolicy { last: n, ..Default::default() }).with_force(true)).unwrap();
                    }
                }
                Op::Gc => { dst.gc().unwrap(); }
            }
            for v in dst.list().unwrap() {
                for s in &v.snapshots {
                    let want = src.content(&v.name, &s.name).unwrap();
                    prop_assert!(read(&dst, &v.name, &s.name) == *want, "{}@{}", v.name, s.name);
                }
            }
        }
        // As a source, the repository reports exactly the blocks that differ between any
        // two of its snapshots (of a volume, or a clone and its origin's volume), however
        // their chains were inserted into, re-based and pruned.
        let all: Vec<(String, String)> = dst
            .list()
            .unwrap()
            .into_iter()
            .flat_map(|v| v.snapshots.into_iter().map(move |s| (v.name.clone(), s.name)))
            .collect();
        for (tv, ts) in &all {
            for (bv, bs) in &all {
                let d = dst.diff(tv, ts, Some(SnapshotRef::new(bv, bs))).unwrap();
                let target = src.content(tv, ts).unwrap();
                let base = src.content(bv, bs).unwrap();
                prop_assert_eq!(target.len(), base.len());
                let mut want = ExtentList::new();
                for (k, (a, b)) in target.chunks(BS as usize).zip(base.chunks(BS as usize)).enumerate() {
                    if a != b {
                        want.push(Extent::new(k as u64 * BS, BS));
                    }
                }
                prop_assert_eq!(d.changed(), want, "{}@{} against {}@{}", tv, ts, bv, bs);
                for e in d.zero.as_slice() {
                    prop_assert!(
                        target[e.offset as usize..e.end() as usize].iter().all(|b| *b == 0),
                        "{}@{} against {}@{}: zero extent {:?} holds data", tv, ts, bv, bs, e
                    );
                }
            }
        }
        let report = dst.verify(true, &NoProgress).unwrap();
        prop_assert!(report.ok, "{:?}", report);
    }
}

#[test]
fn a_source_that_estimates_diffs_gets_the_smallest_delta_not_the_nearest() {
    both(a_source_that_estimates_diffs_gets_the_smallest_delta_not_the_nearest_once);
}

fn a_source_that_estimates_diffs_gets_the_smallest_delta_not_the_nearest_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = repo(&dir.path().join("a"));
    let b = repo(&dir.path().join("b"));
    let src = MemoryStore::new("src", BS);
    let s1 = pseudo_random(1, 64 * BS as usize);
    let mut s2 = s1.clone();
    s2[..48 * BS as usize].copy_from_slice(&pseudo_random(2, 48 * BS as usize));
    let mut s3 = s1.clone(); // back to s1, plus one block
    s3[60 * BS as usize] ^= 1;
    src.add_snapshot("vm", "s1", t(0), s1);
    src.add_snapshot("vm", "s2", t(100), s2);
    src.add_snapshot("vm", "s3", t(101), s3.clone());
    send(&src, &a, None);
    // b holds s1 and s2; s2 is nearest to s3 in age, s1 is nearest in content.
    for s in ["s1", "s2"] {
        let o = ReplicateOptions::default().with_snapshot(Some(s.into()));
        replicate(&a, &b, &o, &NoProgress, &mut |_| {}).unwrap();
    }
    let r = replicate(
        &a,
        &b,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r[0].snapshot, "s3");
    assert_eq!(r[0].base.as_deref(), Some("s1"));
    assert_eq!(r[0].base_reason, snapsync_core::BaseReason::SmallestDiff);
    assert_eq!(r[0].read_bytes, BS);
    assert!(read(&b, "vm", "s3") == s3);
}

#[test]
fn reading_a_snapshot_needs_no_listing() {
    both(reading_a_snapshot_needs_no_listing_once);
}

fn reading_a_snapshot_needs_no_listing_once() {
    let dir = tempfile::tempdir().unwrap();
    let dst = repo(dir.path());
    let src = MemoryStore::new("src", BS);
    let mut data = pseudo_random(1, 64 * BS as usize);
    for k in 0..20 {
        data[k * BS as usize] ^= 0xff;
        src.add_snapshot("vm", &format!("s{k:02}"), t(k as i64), data.clone());
        send(&src, &dst, None);
    }
    let fresh = reopen(dir.path());
    let before = fresh.listings_made();
    let out = dir.path().join("out.img");
    restore(&fresh, "vm", "s19", &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(
        fresh.listings_made(),
        before,
        "restore listed the repository"
    );
    // After gc repacks, the pack hints are stale: reading falls back to the full index.
    dst.prune(
        &PruneOptions::new(KeepPolicy {
            last: 1,
            ..Default::default()
        })
        .with_force(true),
    )
    .unwrap();
    dst.gc().unwrap();
    let fresh = reopen(dir.path());
    restore(&fresh, "vm", "s19", &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn a_repository_replaced_under_an_open_one_is_refused_not_written_into() {
    both(a_repository_replaced_under_an_open_one_is_refused_not_written_into_once);
}

fn a_repository_replaced_under_an_open_one_is_refused_not_written_into_once() {
    // A long-running server holds the repository open; someone deletes it and runs
    // `init` again at the same place. The old block index would have the next receive
    // deduplicate against packs that are gone.
    let dir = tempfile::tempdir().unwrap();
    let src = MemoryStore::new("src", BS);
    let s1 = pseudo_random(7, 16 * BS as usize);
    src.add_snapshot("vm", "s1", t(10), s1.clone());
    let open = repo(dir.path());
    send(&src, &open, Some("s1"));
    std::fs::remove_dir_all(dir.path().join("repo")).unwrap();
    let fresh = repo(dir.path());
    src.add_snapshot("vm", "s2", t(20), s1);
    let e = replicate(
        &src,
        &open,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("was replaced while open"), "{e}");
    // Nothing was written into the new repository, which still works.
    assert!(fresh.list().unwrap().iter().all(|v| v.snapshots.is_empty()));
    send(&src, &fresh, None);
    assert_eq!(read(&fresh, "vm", "s2"), read(&fresh, "vm", "s1"));
}
