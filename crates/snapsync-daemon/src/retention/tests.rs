use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use snapsync_core::{KeepPolicy, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo};
use snapsync_repo::{Location, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::{NoProgress, Store};

use super::*;
use crate::config::Retention;
use crate::record::Base;

fn listing(counts: &[usize]) -> Vec<VolumeInfo> {
    counts
        .iter()
        .enumerate()
        .map(|(v, n)| VolumeInfo {
            name: format!("v{v}"),
            size: 1,
            origin: None,
            snapshots: (0..*n)
                .map(|i| SnapshotInfo {
                    name: format!("c{i}"),
                    id: SnapshotId::derive("q", "v", &format!("c{i}"), Timestamp::new(i as i64, 0)),
                    created: Timestamp::new(i as i64, 0),
                    size: 1,
                })
                .collect(),
        })
        .collect()
}

proptest! {
    /// Keeping the newest N of each volume keeps every protected checkpoint still
    /// listed, and N is no larger than that needs (or the default).
    #[test]
    fn kept_checkpoints_cover_every_base(
        counts in proptest::collection::vec(0usize..30, 1..4),
        picks in proptest::collection::vec((0usize..4, 0usize..35), 0..6),
        default in 1usize..10,
    ) {
        let l = listing(&counts);
        let mut keep = Protected::new();
        for (v, i) in &picks {
            keep.entry(format!("v{v}")).or_default().insert(format!("c{i}"));
        }
        let n = checkpoints_to_keep(&l, &keep, default);
        prop_assert!(n >= default);
        let mut needed = default;
        for v in &l {
            let kept: BTreeSet<&str> = v.snapshots.iter().rev().take(n).map(|s| s.name.as_str()).collect();
            for s in keep.get(&v.name).into_iter().flatten() {
                if v.snapshot(s).is_some() {
                    prop_assert!(kept.contains(s.as_str()), "{}@{s} removed", v.name);
                    let pos = v.snapshots.iter().position(|x| &x.name == s).unwrap();
                    needed = needed.max(v.snapshots.len() - pos);
                }
            }
        }
        prop_assert_eq!(n, needed);
    }
}

/// A repository holding `count` snapshots (`s0` oldest) of volumes `a` and `b`,
/// replicated from one source, so the newest is the repository's replication base.
fn repository(dir: &std::path::Path, count: usize) -> Repository {
    let repo = Repository::init(Location::Local(dir.join("repo")), 4096).unwrap();
    let src = MemoryStore::new("src", 4096);
    for i in 0..count {
        for v in ["a", "b"] {
            let content = vec![i as u8 + 1; 8192];
            src.add_snapshot(
                v,
                &format!("s{i}"),
                Timestamp::new(1_000 + i as i64 * 3600, 0),
                content,
            );
        }
    }
    snapsync_engine::replicate(&src, &repo, &Default::default(), &NoProgress, &mut |_| {}).unwrap();
    repo
}

fn names(repo: &Repository, volume: &str) -> Vec<String> {
    repo.volume(volume)
        .unwrap()
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Against a model: with `keep_last k`, a volume loses every snapshot but its newest
    /// k and its replication base (the newest), unless that would remove a snapshot a
    /// downstream destination holds as its base: then it loses nothing.
    #[test]
    fn prune_keeps_every_base(
        count in 2usize..7,
        last in 1u32..4,
        downstream in proptest::collection::vec(0usize..7, 0..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let repo = repository(dir.path(), count);
        let mut bases = Bases::new();
        for (k, i) in downstream.iter().enumerate() {
            if *i < count {
                // One downstream destination per pick, all for volume "a".
                bases.insert(format!("a#{k}"), Base { snapshot: format!("s{i}"), created: 0 });
            }
        }
        let keep: Protected = {
            let mut p = Protected::new();
            for b in bases.values() {
                p.entry("a".to_string()).or_default().insert(b.snapshot.clone());
            }
            p
        };
        let retention = Retention { policy: KeepPolicy { last, ..KeepPolicy::default() }, gc: true };
        let out = prune(&repo, &retention, &["a".into(), "b".into(), "absent".into()], &keep).unwrap();

        let all: Vec<String> = (0..count).map(|i| format!("s{i}")).collect();
        let by_policy: Vec<String> = all.iter().skip(count.saturating_sub(last as usize)).cloned().collect();
        let model_b = by_policy.clone();
        let removed_a: Vec<&String> = all.iter().filter(|s| !by_policy.contains(s)).collect();
        let hit = removed_a.iter().any(|s| keep.get("a").is_some_and(|p| p.contains(*s)));
        let model_a = if hit { all.clone() } else { by_policy };
        prop_assert_eq!(names(&repo, "a"), model_a);
        prop_assert_eq!(names(&repo, "b"), model_b);
        prop_assert_eq!(out.held.len(), usize::from(hit));
        for s in keep.get("a").into_iter().flatten() {
            prop_assert!(names(&repo, "a").contains(s));
        }
        // What is left reads back.
        let report = repo.verify(false, &NoProgress).unwrap();
        prop_assert!(report.ok, "{:?}", report);
    }
}

#[test]
fn held_volumes_name_the_snapshot() {
    let keep: Protected = BTreeMap::from([("a".to_string(), BTreeSet::from(["s1".to_string()]))]);
    let removed_a = vec!["s0".to_string(), "s1".to_string()];
    let removed_b = vec!["s1".to_string()];
    let held = held_volumes(
        [("a", removed_a.as_slice()), ("b", removed_b.as_slice())],
        &keep,
    );
    assert_eq!(held, [("a".to_string(), "s1".to_string())]);
}
