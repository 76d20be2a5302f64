//! The engine between two in-memory stores: planning and data movement without disks.

use proptest::prelude::*;
use snapsync_core::{BaseReason, Timestamp};
use snapsync_engine::{replicate, ReplicateOptions, SnapshotReport};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{NoProgress, Store};

const BS: u64 = 4096;

fn run(src: &MemoryStore, dst: &MemoryStore, opts: &ReplicateOptions) -> Vec<SnapshotReport> {
    replicate(src, dst, opts, &NoProgress, &mut |_| {}).unwrap()
}

fn t(s: i64) -> Timestamp {
    Timestamp::new(1_000 + s, 0)
}

#[test]
fn full_then_incremental_then_nothing() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    let mut content = pseudo_random(1, 64 * BS as usize);
    src.add_snapshot("vol", "s1", t(1), content.clone());
    content[5 * BS as usize] ^= 1;
    src.add_snapshot("vol", "s2", t(2), content.clone());

    let reports = run(&src, &dst, &ReplicateOptions::default());
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].base, None);
    assert_eq!(reports[0].base_reason, BaseReason::NoCommonBase);
    assert_eq!(reports[0].sent_bytes, 64 * BS);
    assert_eq!(reports[1].base.as_deref(), Some("s1"));
    assert_eq!(reports[1].read_bytes, BS);
    assert_eq!(reports[1].sent_bytes, BS);
    assert_eq!(
        dst.content("vol", "s2").unwrap().as_slice(),
        content.as_slice()
    );

    assert!(run(&src, &dst, &ReplicateOptions::default()).is_empty());
    let one = ReplicateOptions::default().with_snapshot(Some("s2".into()));
    assert!(run(&src, &dst, &one).is_empty());
}

#[test]
fn base_found_through_hints_after_source_lost_older_snapshots() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    let mut content = pseudo_random(2, 32 * BS as usize);
    for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
        content[i * BS as usize] ^= 0xff;
        src.add_snapshot("vol", name, t(i as i64), content.clone());
    }
    run(
        &src,
        &dst,
        &ReplicateOptions::default().with_snapshot(Some("s1".into())),
    );
    run(
        &src,
        &dst,
        &ReplicateOptions::default().with_snapshot(Some("s2".into())),
    );
    src.remove_snapshot("vol", "s1");
    dst.remove_snapshot("vol", "s2");
    content[20 * BS as usize] ^= 1;
    src.add_snapshot("vol", "s4", t(4), content.clone());
    // s1 is gone at the source, s2 at the destination: nothing in common, full.
    let r = run(
        &src,
        &dst,
        &ReplicateOptions::default().with_snapshot(Some("s3".into())),
    );
    assert_eq!(r[0].base, None);
    let r = run(&src, &dst, &ReplicateOptions::default());
    let names: Vec<_> = r
        .iter()
        .map(|x| (x.snapshot.clone(), x.base.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("s2".into(), Some("s3".into())),
            ("s4".into(), Some("s3".into()))
        ]
    );
    assert_eq!(r[0].base_reason, BaseReason::NearestYounger);
    assert_eq!(r[1].sent_bytes, BS);
    assert_eq!(
        dst.content("vol", "s4").unwrap().as_slice(),
        content.as_slice()
    );
}

#[test]
fn dedup_across_volumes_and_zero_blocks_cost_nothing() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    let mut content = pseudo_random(3, 16 * BS as usize);
    content[..4 * BS as usize].fill(0);
    src.add_snapshot("a", "s1", t(1), content.clone());
    src.add_snapshot("b", "s1", t(1), content.clone());
    let r = run(&src, &dst, &ReplicateOptions::default());
    assert_eq!(r[0].sent_bytes, 12 * BS);
    assert_eq!(r[1].sent_bytes, 0);
    assert_eq!(r[1].dedup_bytes, 12 * BS);
}

#[test]
fn unknown_volume_or_snapshot_is_an_error() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    src.add_snapshot("a", "s1", t(1), vec![1; 100]);
    let bad = ReplicateOptions::default().with_volumes(vec!["zz".into()]);
    assert!(replicate(&src, &dst, &bad, &NoProgress, &mut |_| {}).is_err());
    let bad = ReplicateOptions::default().with_snapshot(Some("zz".into()));
    assert!(replicate(&src, &dst, &bad, &NoProgress, &mut |_| {}).is_err());
}

#[test]
fn a_clone_replicates_as_a_delta_against_its_parent_which_is_sent_first() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    let golden = pseudo_random(7, 64 * BS as usize);
    src.add_snapshot("golden", "base", t(1), golden.clone());
    src.add_snapshot("golden", "later", t(5), pseudo_random(8, 64 * BS as usize));
    let parent = src
        .volume("golden")
        .unwrap()
        .snapshot("base")
        .unwrap()
        .clone();
    let mut vm = golden.clone();
    vm[3 * BS as usize..4 * BS as usize].fill(9);
    src.set_origin(
        "vm",
        snapsync_core::Origin {
            volume: "golden".into(),
            snapshot: "base".into(),
            id: parent.id,
        },
    );
    src.add_snapshot("vm", "s1", t(2), vm.clone());
    // Only the clone is asked for: its parent snapshot goes first, then the clone as a
    // delta of one block against it.
    let r = run(
        &src,
        &dst,
        &ReplicateOptions::default().with_volumes(vec!["vm".into()]),
    );
    let got: Vec<_> = r
        .iter()
        .map(|x| (x.volume.as_str(), x.snapshot.as_str(), x.base.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("golden", "base", None),
            ("vm", "s1", Some("base".to_string()))
        ]
    );
    assert_eq!(r[1].read_bytes, BS);
    assert_eq!(r[1].sent_bytes, BS);
    assert_eq!(dst.content("vm", "s1").unwrap().as_slice(), vm.as_slice());
    assert_eq!(dst.volume("vm").unwrap().origin.unwrap().snapshot, "base");
    assert!(dst.content("golden", "later").is_none());
}

fn arb_snapshots() -> impl Strategy<Value = Vec<(usize, Vec<(usize, u8)>)>> {
    // Each snapshot: a size in blocks-ish and writes (block, fill byte) on the previous.
    proptest::collection::vec(
        (
            1usize..12,
            proptest::collection::vec((0usize..12, 0u8..4), 0..5),
        ),
        1..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Replicating snapshots in any order leaves every one byte-identical at the
    /// destination (model: the source's bytes), whatever base the planner picks.
    #[test]
    fn any_order_restores_exactly(snaps in arb_snapshots(), order in proptest::collection::vec(0usize..6, 1..10), odd in 0usize..1000) {
        let src = MemoryStore::new("src", 1000);
        let dst = MemoryStore::new("dst", 512);
        let mut content: Vec<u8> = Vec::new();
        for (k, (blocks, writes)) in snaps.iter().enumerate() {
            content.resize(blocks * 700 + odd % 300, 0);
            for (b, fill) in writes {
                let off = (b * 700).min(content.len());
                let end = (off + 700).min(content.len());
                content[off..end].fill(*fill);
            }
            src.add_snapshot("vol", &format!("s{k}"), t(k as i64), content.clone());
        }
        for o in order {
            let name = format!("s{}", o % snaps.len());
            run(&src, &dst, &ReplicateOptions::default().with_snapshot(Some(name)));
        }
        run(&src, &dst, &ReplicateOptions::default());
        for k in 0..snaps.len() {
            let name = format!("s{k}");
            prop_assert_eq!(dst.content("vol", &name), src.content("vol", &name));
        }
    }
}
