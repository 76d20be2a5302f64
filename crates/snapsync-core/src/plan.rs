//! Replication planning: which snapshots to send, and against which base.
//!
//! This is the decision half of the Pure Storage seed's coordinator, kept free of I/O:
//! the engine gathers the source listing, the destination's hints and listing, and this
//! module answers. Hints are only trusted when both sides still have the snapshot.

use std::collections::HashMap;

use serde::Serialize;

use crate::ids::SnapshotId;
use crate::snapshot::{Hint, SnapshotInfo, VolumeInfo};

/// A snapshot both the source and the destination hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommonSnapshot {
    /// The source's view of it.
    pub source: SnapshotInfo,
    /// The source volume holding it: the replicated volume itself, or for a clone the
    /// volume it was cloned from.
    pub source_volume: String,
    /// Destination volume holding it.
    pub dest_volume: String,
    /// Destination snapshot name holding it.
    pub dest_snapshot: String,
}

/// Why a base was chosen; reported by `replicate --json` as `base_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseReason {
    /// The nearest common snapshot older than (or as old as) the target.
    NearestOlder,
    /// The nearest common snapshot, younger than the target.
    NearestYounger,
    /// The common snapshot with the smallest estimated difference.
    SmallestDiff,
    /// Nothing in common: a full replication.
    NoCommonBase,
}

impl BaseReason {
    /// The string used in JSON output.
    pub fn as_str(&self) -> &'static str {
        match self {
            BaseReason::NearestOlder => "nearest-older",
            BaseReason::NearestYounger => "nearest-younger",
            BaseReason::SmallestDiff => "smallest-diff",
            BaseReason::NoCommonBase => "no-common-base",
        }
    }
}

/// The chosen base, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChoice {
    /// The base, or `None` for a full replication.
    pub base: Option<CommonSnapshot>,
    /// Why.
    pub reason: BaseReason,
}

/// The snapshots of `source` that the destination holds, found through the
/// destination's hints and, failing those, through identities in the destination's
/// same-named volume (a cascade or a rebuilt hint store). Hints naming a snapshot that
/// either side no longer has are dropped.
///
/// For a clone, `origin` is the snapshot (in `origin_volume`) it was cloned from: it is
/// common too when the destination holds its identity in any volume, so a clone's first
/// replication is a delta against its parent.
pub fn common_snapshots(
    source: &VolumeInfo,
    origin: Option<(&str, &SnapshotInfo)>,
    hints: &[Hint],
    dest_volumes: &[VolumeInfo],
) -> Vec<CommonSnapshot> {
    let dest_has = |volume: &str, name: &str, id: &SnapshotId| {
        dest_volumes
            .iter()
            .find(|v| v.name == volume)
            .and_then(|v| v.snapshot(name))
            .is_some_and(|s| &s.id == id)
    };
    let mut out: HashMap<SnapshotId, CommonSnapshot> = HashMap::new();
    for h in hints {
        let Some(src) = source.snapshot_by_id(&h.id) else {
            continue;
        };
        if dest_has(&h.local_volume, &h.local_snapshot, &h.id) {
            out.entry(h.id).or_insert_with(|| CommonSnapshot {
                source: src.clone(),
                source_volume: source.name.clone(),
                dest_volume: h.local_volume.clone(),
                dest_snapshot: h.local_snapshot.clone(),
            });
        }
    }
    if let Some(dv) = dest_volumes.iter().find(|v| v.name == source.name) {
        for s in &dv.snapshots {
            if let Some(src) = source.snapshot_by_id(&s.id) {
                out.entry(s.id).or_insert_with(|| CommonSnapshot {
                    source: src.clone(),
                    source_volume: source.name.clone(),
                    dest_volume: dv.name.clone(),
                    dest_snapshot: s.name.clone(),
                });
            }
        }
    }
    if let Some((origin_volume, o)) = origin {
        let held = dest_volumes.iter().find_map(|v| {
            v.snapshot_by_id(&o.id)
                .map(|s| (v.name.clone(), s.name.clone()))
        });
        if let Some((dest_volume, dest_snapshot)) = held {
            out.entry(o.id).or_insert_with(|| CommonSnapshot {
                source: o.clone(),
                source_volume: origin_volume.to_string(),
                dest_volume,
                dest_snapshot,
            });
        }
    }
    let mut v: Vec<CommonSnapshot> = out.into_values().collect();
    v.sort_by(|a, b| (a.source.created, &a.source.name).cmp(&(b.source.created, &b.source.name)));
    v
}

/// Choose the base for replicating `target`: among `common` (excluding the target
/// itself), the one nearest in age, preferring the older on a tie. When `estimates`
/// gives a difference size for candidates (sources that can estimate cheaply, from
/// metadata), the smallest estimated difference wins instead, ties going to the nearest.
pub fn choose_base(
    target: &SnapshotInfo,
    common: &[CommonSnapshot],
    estimates: Option<&HashMap<SnapshotId, u64>>,
) -> BaseChoice {
    let candidates: Vec<&CommonSnapshot> =
        common.iter().filter(|c| c.source.id != target.id).collect();
    let nearness = |c: &CommonSnapshot| {
        (
            c.source.created.distance(&target.created),
            c.source.created > target.created,
            c.source.name.clone(),
        )
    };
    let nearest = candidates.iter().min_by_key(|c| nearness(c)).copied();
    let Some(nearest) = nearest else {
        return BaseChoice {
            base: None,
            reason: BaseReason::NoCommonBase,
        };
    };
    let age_reason = if nearest.source.created > target.created {
        BaseReason::NearestYounger
    } else {
        BaseReason::NearestOlder
    };
    if let Some(est) = estimates {
        let best = candidates
            .iter()
            .filter_map(|c| est.get(&c.source.id).map(|cost| (*cost, nearness(c), *c)))
            .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        if let Some((cost, _, best)) = best {
            let nearest_cost = est.get(&nearest.source.id).copied();
            if best.source.id != nearest.source.id && nearest_cost.is_none_or(|n| cost < n) {
                return BaseChoice {
                    base: Some(best.clone()),
                    reason: BaseReason::SmallestDiff,
                };
            }
        }
    }
    BaseChoice {
        base: Some(nearest.clone()),
        reason: age_reason,
    }
}

/// The source snapshots the destination lacks, oldest first: what `replicate` without
/// `--snapshot` sends.
pub fn missing_snapshots<'a>(
    source: &'a VolumeInfo,
    common: &[CommonSnapshot],
) -> Vec<&'a SnapshotInfo> {
    let mut v: Vec<&SnapshotInfo> = source
        .snapshots
        .iter()
        .filter(|s| !common.iter().any(|c| c.source.id == s.id))
        .collect();
    v.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use crate::Origin;
    use std::collections::HashSet;

    fn snap(name: &str, t: i64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            id: SnapshotId::derive("src", "vol", name, Timestamp::new(t, 0)),
            created: Timestamp::new(t, 0),
            size: 100,
        }
    }

    fn volume(snaps: &[SnapshotInfo]) -> VolumeInfo {
        VolumeInfo {
            name: "vol".into(),
            size: 100,
            snapshots: snaps.to_vec(),
            origin: None,
        }
    }

    fn hint(s: &SnapshotInfo) -> Hint {
        Hint {
            source_snapshot: s.name.clone(),
            id: s.id,
            created: s.created,
            local_volume: "vol".into(),
            local_snapshot: s.name.clone(),
        }
    }

    #[test]
    fn stale_hints_are_dropped_and_nearest_base_chosen() {
        let (s1, s2, s3, s4) = (
            snap("s1", 10),
            snap("s2", 20),
            snap("s3", 30),
            snap("s4", 40),
        );
        // Source lost s1; destination lost s2; both have s3.
        let source = volume(&[s2.clone(), s3.clone(), s4.clone()]);
        let dest = vec![volume(&[s1.clone(), s3.clone()])];
        let hints = vec![hint(&s1), hint(&s2), hint(&s3)];
        let common = common_snapshots(&source, None, &hints, &dest);
        assert_eq!(common.len(), 1);
        assert_eq!(common[0].source.name, "s3");
        let choice = choose_base(&s4, &common, None);
        assert_eq!(choice.reason, BaseReason::NearestOlder);
        assert_eq!(choice.base.unwrap().dest_snapshot, "s3");
        let missing: Vec<_> = missing_snapshots(&source, &common)
            .iter()
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(missing, vec!["s2", "s4"]);
        // s2 is older than the only common snapshot: the base is younger.
        assert_eq!(
            choose_base(&s2, &common, None).reason,
            BaseReason::NearestYounger
        );
    }

    #[test]
    fn no_common_base_and_tie_prefers_older() {
        let (s1, s2, s3) = (snap("s1", 10), snap("s2", 20), snap("s3", 30));
        assert_eq!(choose_base(&s2, &[], None).reason, BaseReason::NoCommonBase);
        let source = volume(&[s1.clone(), s2.clone(), s3.clone()]);
        let dest = vec![volume(&[s1.clone(), s3.clone()])];
        let common = common_snapshots(&source, None, &[], &dest);
        let c = choose_base(&s2, &common, None);
        assert_eq!(c.base.unwrap().dest_snapshot, "s1");
        assert_eq!(c.reason, BaseReason::NearestOlder);
    }

    #[test]
    fn smallest_estimate_wins_over_nearest() {
        let (s1, s2, s3) = (snap("s1", 10), snap("s2", 20), snap("s3", 30));
        let source = volume(&[s1.clone(), s2.clone(), s3.clone()]);
        let dest = vec![volume(&[s1.clone(), s2.clone()])];
        let common = common_snapshots(&source, None, &[], &dest);
        let est: HashMap<_, _> = [(s1.id, 5u64), (s2.id, 50u64)].into();
        let c = choose_base(&s3, &common, Some(&est));
        assert_eq!(c.reason, BaseReason::SmallestDiff);
        assert_eq!(c.base.unwrap().dest_snapshot, "s1");
        let est: HashMap<_, _> = [(s1.id, 50u64), (s2.id, 5u64)].into();
        assert_eq!(
            choose_base(&s3, &common, Some(&est)).reason,
            BaseReason::NearestOlder
        );
    }

    /// Where the destination holds (or claims to hold) one source snapshot `i`.
    #[derive(Clone, Copy, Debug)]
    enum Held {
        /// Not at all.
        No,
        /// In the same-named volume, under the same name.
        SameName,
        /// In the same-named volume, under another name (a rebuilt hint store finds it).
        Renamed,
        /// In another volume: found only through a hint.
        Elsewhere,
        /// Not held, but the same-named volume has a snapshot of the same name and
        /// another identity (a trap for matching by name).
        NameClash,
    }

    fn held() -> impl Strategy<Value = Held> {
        prop_oneof![
            Just(Held::No),
            Just(Held::SameName),
            Just(Held::Renamed),
            Just(Held::Elsewhere),
            Just(Held::NameClash)
        ]
    }

    fn at(volume: &str, name: &str, t: i64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            id: SnapshotId::derive("src", volume, name, Timestamp::new(t, 0)),
            created: Timestamp::new(t, 0),
            size: 100,
        }
    }

    fn dest_volume(name: &str, snapshots: Vec<SnapshotInfo>) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            size: 100,
            snapshots,
            origin: None,
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Base selection against a model: random source snapshots (ages may tie), each
        /// held by the destination in one of the ways above, hinted or not, stale hints,
        /// a clone's origin held or not, and random diff estimates.
        #[test]
        fn base_selection_matches_model(
            snaps in proptest::collection::vec((0i64..12, held(), any::<bool>()), 1..8),
            target_pick in any::<prop::sample::Index>(),
            stale_hints in proptest::collection::vec(0i64..12, 0..3),
            origin in proptest::option::of((0i64..12, any::<bool>())),
            estimates in proptest::option::of(proptest::collection::vec(proptest::option::of(0u64..4), 8)),
        ) {
            let source_snaps: Vec<SnapshotInfo> =
                snaps.iter().enumerate().map(|(i, (t, _, _))| at("vol", &format!("s{i}"), *t)).collect();
            let parent = origin.map(|(t, held)| (at("base", "p", t), held));
            let source = VolumeInfo {
                origin: parent.as_ref().map(|(p, _)| Origin {
                    volume: "base".into(),
                    snapshot: p.name.clone(),
                    id: p.id,
                }),
                ..volume(&source_snaps)
            };
            let (mut same, mut other, mut hints) = (Vec::new(), Vec::new(), Vec::new());
            let mut expected = HashSet::new();
            let hint_to = |s: &SnapshotInfo, volume: &str, name: &str| Hint {
                local_volume: volume.into(),
                local_snapshot: name.into(),
                ..hint(s)
            };
            for (i, (s, (_, how, hinted))) in source_snaps.iter().zip(&snaps).enumerate() {
                let (volume, name) = match how {
                    Held::No => ("vol", s.name.clone()),
                    Held::SameName => ("vol", s.name.clone()),
                    Held::Renamed => ("vol", format!("d{i}")),
                    Held::Elsewhere => ("other", format!("o{i}")),
                    Held::NameClash => ("vol", s.name.clone()),
                };
                match how {
                    Held::No => {}
                    Held::NameClash => same.push(at("elsewhere", &s.name, 99)),
                    _ => {
                        let copy = SnapshotInfo { name: name.clone(), ..s.clone() };
                        if volume == "vol" { same.push(copy) } else { other.push(copy) }
                        if volume == "vol" || *hinted {
                            expected.insert(s.id);
                        }
                    }
                }
                if *hinted {
                    hints.push(hint_to(s, volume, &name));
                }
            }
            // Hints naming snapshots the source no longer has, some still at the destination.
            for (j, t) in stale_hints.iter().enumerate() {
                let gone = at("vol", &format!("gone{j}"), *t);
                if j % 2 == 0 {
                    other.push(gone.clone());
                }
                hints.push(hint_to(&gone, "other", &gone.name));
            }
            if let Some((p, true)) = &parent {
                other.push(SnapshotInfo { name: "held-parent".into(), ..p.clone() });
                expected.insert(p.id);
            }
            let dest = vec![dest_volume("vol", same), dest_volume("other", other)];

            let common = common_snapshots(
                &source,
                parent.as_ref().map(|(p, _)| ("base", p)),
                &hints,
                &dest,
            );
            // Exactly the snapshots both sides hold, each where the destination holds it.
            let got: HashSet<SnapshotId> = common.iter().map(|c| c.source.id).collect();
            prop_assert_eq!(&got, &expected);
            prop_assert_eq!(got.len(), common.len());
            for c in &common {
                let d = dest.iter().find(|v| v.name == c.dest_volume).and_then(|v| v.snapshot(&c.dest_snapshot));
                prop_assert_eq!(d.map(|d| d.id), Some(c.source.id));
                let from_parent = parent.as_ref().is_some_and(|(p, _)| p.id == c.source.id);
                prop_assert_eq!(&c.source_volume, if from_parent { "base" } else { "vol" });
            }
            let missing: Vec<&str> = missing_snapshots(&source, &common).iter().map(|s| s.name.as_str()).collect();
            let mut want_missing: Vec<&SnapshotInfo> = source_snaps.iter().filter(|s| !expected.contains(&s.id)).collect();
            want_missing.sort_by_key(|s| (s.created, s.name.clone()));
            prop_assert_eq!(missing, want_missing.iter().map(|s| s.name.as_str()).collect::<Vec<_>>());

            let target = &source_snaps[target_pick.index(source_snaps.len())];
            let candidates: Vec<&CommonSnapshot> = common.iter().filter(|c| c.source.id != target.id).collect();
            let d = |c: &CommonSnapshot| c.source.created.distance(&target.created);
            let younger = |c: &CommonSnapshot| c.source.created > target.created;

            // By age: the nearest; on a tie the older, then the first by name.
            let by_age = choose_base(target, &common, None);
            let Some(nearest) = by_age.base.clone() else {
                prop_assert!(candidates.is_empty());
                prop_assert_eq!(by_age.reason, BaseReason::NoCommonBase);
                return Ok(());
            };
            prop_assert!(candidates.contains(&&nearest), "the base is common and not the target");
            for c in &candidates {
                let beaten = d(&nearest) < d(c)
                    || (d(&nearest) == d(c) && !younger(&nearest) && younger(c))
                    || (d(&nearest) == d(c) && younger(&nearest) == younger(c) && nearest.source.name <= c.source.name);
                prop_assert!(beaten, "{} chosen over nearer {}", nearest.source.name, c.source.name);
            }
            prop_assert_eq!(
                by_age.reason,
                if younger(&nearest) { BaseReason::NearestYounger } else { BaseReason::NearestOlder }
            );
            // A clone of which the destination holds nothing yet is a delta against its origin.
            if let Some((p, true)) = &parent {
                if candidates.iter().all(|c| c.source.id == p.id) {
                    prop_assert_eq!(nearest.source.id, p.id);
                    prop_assert_eq!(&nearest.dest_snapshot, "held-parent");
                }
            }

            // With estimates: the smallest estimate wins when strictly smaller than the
            // nearest's (or the nearest has none); ties go to the nearer.
            let Some(costs) = estimates else { return Ok(()) };
            let est: HashMap<SnapshotId, u64> = common
                .iter()
                .zip(&costs)
                .filter_map(|(c, cost)| cost.map(|n| (c.source.id, n)))
                .collect();
            let choice = choose_base(target, &common, Some(&est));
            let cost = |c: &CommonSnapshot| est.get(&c.source.id).copied();
            let cheapest = candidates.iter().filter_map(|c| cost(c)).min();
            match (cheapest, cost(&nearest)) {
                (Some(min), n) if n.is_none_or(|n| min < n) => {
                    prop_assert_eq!(choice.reason, BaseReason::SmallestDiff);
                    let base = choice.base.expect("a base");
                    prop_assert_eq!(cost(&base), Some(min));
                    for c in candidates.iter().filter(|c| cost(c) == Some(min)) {
                        prop_assert!(d(&base) <= d(c), "{} chosen over nearer {} of equal cost", base.source.name, c.source.name);
                    }
                }
                _ => prop_assert_eq!(choice, by_age),
            }
        }
    }
}
