//! Retention policies: which snapshots `prune` keeps.
//!
//! The rules mean what they mean in restic and sanoid: `--keep-last N` keeps the N
//! newest snapshots; `--keep-hourly N` keeps, for each of the N most recent hours that
//! have snapshots, the newest snapshot of that hour; likewise daily, weekly (ISO weeks)
//! and monthly. Buckets are in UTC. A snapshot is kept if any rule keeps it.

use std::collections::BTreeMap;

use crate::snapshot::SnapshotInfo;

/// How many snapshots each rule keeps; zero disables a rule.
///
/// With the `clap` feature it is also the `--keep-*` flags of a command line, so a
/// program's flags and the policy cannot drift apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct KeepPolicy {
    /// Keep the N newest snapshots.
    #[cfg_attr(feature = "clap", arg(long = "keep-last", default_value_t = 0))]
    pub last: u32,
    /// Keep the newest snapshot of each of the last N hours that have snapshots.
    #[cfg_attr(feature = "clap", arg(long = "keep-hourly", default_value_t = 0))]
    pub hourly: u32,
    /// Same, per day.
    #[cfg_attr(feature = "clap", arg(long = "keep-daily", default_value_t = 0))]
    pub daily: u32,
    /// Same, per ISO week.
    #[cfg_attr(feature = "clap", arg(long = "keep-weekly", default_value_t = 0))]
    pub weekly: u32,
    /// Same, per month.
    #[cfg_attr(feature = "clap", arg(long = "keep-monthly", default_value_t = 0))]
    pub monthly: u32,
}

impl KeepPolicy {
    /// Whether no rule is set (such a policy would remove everything).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// For each snapshot name, the rules that keep it; names absent are removed.
pub fn apply_policy(
    snapshots: &[SnapshotInfo],
    policy: &KeepPolicy,
) -> BTreeMap<String, Vec<&'static str>> {
    let mut newest_first: Vec<&SnapshotInfo> = snapshots.iter().collect();
    newest_first.sort_by(|a, b| (b.created, &b.name).cmp(&(a.created, &a.name)));
    let mut kept: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for s in newest_first.iter().take(policy.last as usize) {
        kept.entry(s.name.clone()).or_default().push("last");
    }
    type Bucket = fn(&::time::OffsetDateTime) -> (i32, u32, u32, u32);
    let rules: [(&'static str, u32, Bucket); 4] = [
        ("hourly", policy.hourly, |t| {
            (t.year(), t.ordinal() as u32, t.hour() as u32, 0)
        }),
        ("daily", policy.daily, |t| {
            (t.year(), t.ordinal() as u32, 0, 0)
        }),
        ("weekly", policy.weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            (y, w as u32, 0, 0)
        }),
        ("monthly", policy.monthly, |t| {
            (t.year(), t.month() as u32, 0, 0)
        }),
    ];
    for (name, count, bucket) in rules {
        let mut left = count;
        let mut last = None;
        for s in &newest_first {
            if left == 0 {
                break;
            }
            let Ok(t) = ::time::OffsetDateTime::from_unix_timestamp(s.created.secs) else {
                continue;
            };
            let b = bucket(&t);
            if last != Some(b) {
                last = Some(b);
                left -= 1;
                kept.entry(s.name.clone()).or_default().push(name);
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SnapshotId, Timestamp};

    fn snaps(times: &[i64]) -> Vec<SnapshotInfo> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| SnapshotInfo {
                name: format!("s{i}"),
                id: SnapshotId::derive("x", "v", &format!("s{i}"), Timestamp::new(*t, 0)),
                created: Timestamp::new(*t, 0),
                size: 1,
            })
            .collect()
    }

    #[test]
    fn keep_last_and_buckets_like_restic() {
        const H: i64 = 3600;
        const D: i64 = 86400;
        // 2023-11-14 00:00 UTC is a Tuesday.
        let t0 = 1_699_920_000;
        let s = snaps(&[
            t0,
            t0 + 10,
            t0 + H,
            t0 + H + 5,
            t0 + D,
            t0 + 2 * D,
            t0 + 40 * D,
        ]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                last: 2,
                ..Default::default()
            },
        );
        assert_eq!(k.keys().collect::<Vec<_>>(), ["s5", "s6"]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                hourly: 3,
                ..Default::default()
            },
        );
        // Newest per hour for the 3 newest hours with snapshots.
        assert_eq!(k.keys().collect::<Vec<_>>(), ["s4", "s5", "s6"]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                daily: 10,
                ..Default::default()
            },
        );
        assert_eq!(k.keys().collect::<Vec<_>>(), ["s3", "s4", "s5", "s6"]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                weekly: 2,
                ..Default::default()
            },
        );
        assert_eq!(k.keys().collect::<Vec<_>>(), ["s5", "s6"]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                monthly: 5,
                ..Default::default()
            },
        );
        assert_eq!(k.keys().collect::<Vec<_>>(), ["s5", "s6"]);
        let k = apply_policy(
            &s,
            &KeepPolicy {
                last: 1,
                daily: 2,
                ..Default::default()
            },
        );
        assert_eq!(k["s6"], ["last", "daily"]);
        assert_eq!(k["s5"], ["daily"]);
        assert!(apply_policy(&s, &KeepPolicy::default()).is_empty());
    }
}
