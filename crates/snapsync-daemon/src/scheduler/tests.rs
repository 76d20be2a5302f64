use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn every(secs: u64) -> Schedule {
    Schedule::Every(Duration::from_secs(secs))
}

fn spec(name: &str, schedule: Schedule, dests: &[&str]) -> JobSpec {
    JobSpec {
        name: name.into(),
        schedule,
        destinations: dests.iter().map(|d| d.to_string()).collect(),
    }
}

fn scheduler(specs: Vec<JobSpec>, now: Millis) -> Scheduler {
    let mut s = Scheduler::new();
    s.configure(specs, &|_| None, now);
    s
}

fn start(job: &str, dests: &[&str], trigger: Trigger) -> Action {
    Action::Start {
        job: job.into(),
        destinations: dests.iter().map(|d| d.to_string()).collect(),
        trigger,
    }
}

#[test]
fn every_runs_at_once_then_each_interval() {
    let mut s = scheduler(vec![spec("a", every(10), &["d"])], 0);
    assert_eq!(s.poll(0), [start("a", &["d"], Trigger::Scheduled)]);
    assert_eq!(s.next_wakeup(), Some(10_000));
    s.finished("a", 3_000, &[("d".into(), true)]);
    assert_eq!(s.poll(9_999), []);
    assert_eq!(s.poll(10_000), [start("a", &["d"], Trigger::Scheduled)]);
}

#[test]
fn cron_waits_for_its_first_slot() {
    let mut s = scheduler(
        vec![spec("a", "*/15 * * * *".parse().unwrap(), &["d"])],
        1_000,
    );
    assert_eq!(s.poll(1_000), []);
    assert_eq!(s.next_wakeup(), Some(900_000));
    assert_eq!(s.poll(900_000), [start("a", &["d"], Trigger::Scheduled)]);
}

#[test]
fn a_slot_during_a_run_is_skipped_once_however_many_pass() {
    let mut s = scheduler(vec![spec("a", every(1), &["d"])], 0);
    assert_eq!(s.poll(0).len(), 1);
    // Five slots pass while the run goes on: polled late, one skip.
    assert_eq!(
        s.poll(5_500),
        [Action::Skip {
            job: "a".into(),
            slot: 1_000
        }]
    );
    assert_eq!(s.next_wakeup(), Some(6_500));
    assert_eq!(s.poll(6_000), []);
    assert_eq!(s.poll(6_500).len(), 1, "another skip at the next slot");
    s.finished("a", 7_000, &[("d".into(), true)]);
    assert_eq!(s.poll(7_000), []);
    assert_eq!(s.poll(7_500), [start("a", &["d"], Trigger::Scheduled)]);
}

#[test]
fn a_failing_destination_backs_off_alone() {
    let mut s = scheduler(vec![spec("a", every(1), &["good", "bad"])], 0);
    assert_eq!(
        s.poll(0),
        [start("a", &["good", "bad"], Trigger::Scheduled)]
    );
    let results = |bad| vec![("good".to_string(), true), ("bad".to_string(), bad)];
    s.finished("a", 100, &results(false));
    // Retry after 1 s: at 1_100. The slot at 1_000 runs the good one only.
    assert_eq!(s.poll(1_000), [start("a", &["good"], Trigger::Scheduled)]);
    s.finished("a", 1_050, &[("good".into(), true)]);
    assert_eq!(s.next_wakeup(), Some(1_100));
    assert_eq!(s.poll(1_100), [start("a", &["bad"], Trigger::Retry)]);
    s.finished("a", 1_200, &[("bad".into(), false)]);
    let b = s.view("a").unwrap().backoff["bad"];
    assert_eq!(
        b,
        Backoff {
            failures: 2,
            retry_at: Some(3_200)
        }
    );
    assert_eq!(s.poll(2_000), [start("a", &["good"], Trigger::Scheduled)]);
    s.finished("a", 2_100, &[("good".into(), true)]);
    assert_eq!(s.poll(3_000), [start("a", &["good"], Trigger::Scheduled)]);
    s.finished("a", 3_100, &[("good".into(), true)]);
    assert_eq!(s.poll(3_200), [start("a", &["bad"], Trigger::Retry)]);
    s.finished("a", 3_300, &[("bad".into(), true)]);
    assert_eq!(s.view("a").unwrap().backoff["bad"], Backoff::default());
    assert_eq!(
        s.poll(4_000),
        [start("a", &["good", "bad"], Trigger::Scheduled)]
    );
}

#[test]
fn backoff_doubles_up_to_a_cap() {
    let mut b = Backoff::default();
    let mut gaps = Vec::new();
    for _ in 0..12 {
        b.failed(0);
        gaps.push(b.retry_at.unwrap());
    }
    assert_eq!(&gaps[..4], [1_000, 2_000, 4_000, 8_000]);
    assert_eq!(*gaps.last().unwrap(), RETRY_MAX);
}

#[test]
fn a_manual_run_waits_for_the_running_one() {
    let mut s = scheduler(vec![spec("a", every(60), &["x", "y"])], 0);
    assert_eq!(s.poll(0).len(), 1);
    assert!(s.request("a"));
    assert!(!s.request("nope"));
    assert_eq!(s.poll(10), []);
    s.finished("a", 20, &[("x".into(), true), ("y".into(), false)]);
    // Manual: every destination, even one backing off.
    assert_eq!(s.next_wakeup(), Some(Millis::MIN));
    assert_eq!(s.poll(20), [start("a", &["x", "y"], Trigger::Manual)]);
}

#[test]
fn a_restart_catches_up_once() {
    let recovered = |last_start, interrupted| {
        move |_: &str| {
            Some(Recovered {
                last_start: Some(last_start),
                interrupted,
                backoff: BTreeMap::new(),
            })
        }
    };
    // Down for an hour across four 15-minute slots: one run at start.
    let cron: Schedule = "*/15 * * * *".parse().unwrap();
    let mut s = Scheduler::new();
    s.configure(
        vec![spec("a", cron.clone(), &["d"])],
        &recovered(0, false),
        3_700_000,
    );
    assert_eq!(s.poll(3_700_000), [start("a", &["d"], Trigger::CatchUp)]);
    s.finished("a", 3_710_000, &[("d".into(), true)]);
    assert_eq!(s.poll(3_710_000), []);
    assert_eq!(s.next_wakeup(), Some(4_500_000));
    // Restarted before the next slot, the last run complete: nothing to catch up.
    let mut s = Scheduler::new();
    s.configure(
        vec![spec("a", cron.clone(), &["d"])],
        &recovered(900_000, false),
        1_000_000,
    );
    assert_eq!(s.poll(1_000_000), []);
    // The last run was cut short by a crash: run again at once.
    let mut s = Scheduler::new();
    s.configure(
        vec![spec("a", cron, &["d"])],
        &recovered(900_000, true),
        1_000_000,
    );
    assert_eq!(s.poll(1_000_000), [start("a", &["d"], Trigger::CatchUp)]);
}

#[test]
fn a_reload_keeps_what_it_can() {
    let mut s = scheduler(vec![spec("a", every(10), &["x", "y"])], 0);
    assert_eq!(s.poll(0).len(), 1);
    s.configure(
        vec![spec("a", every(10), &["x"]), spec("b", every(5), &["z"])],
        &|_| None,
        1_000,
    );
    let v = s.view("a").unwrap();
    assert!(v.running, "the run goes on");
    assert_eq!(v.next_slot, Some(10_000));
    assert_eq!(s.poll(1_000), [start("b", &["z"], Trigger::Scheduled)]);
    // A changed schedule counts from the last start.
    s.configure(vec![spec("a", every(3), &["x"])], &|_| None, 2_000);
    assert_eq!(s.view("a").unwrap().next_slot, Some(3_000));
    assert!(s.view("b").is_none());
}

/// A random day of jobs driven only at the wake-ups the scheduler asks for, runs
/// taking random times and destinations failing at random.
#[derive(Debug, Clone)]
struct World {
    intervals: Vec<u64>,
    durations: Vec<u32>,
    fail_pattern: Vec<bool>,
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(1u64..20, 1..4),
        proptest::collection::vec(1u32..40_000, 16),
        proptest::collection::vec(any::<bool>(), 16),
    )
        .prop_map(|(intervals, durations, fail_pattern)| World {
            intervals,
            durations,
            fail_pattern,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn runs_never_overlap_and_nothing_happens_between_wakeups(w in world()) {
        let specs: Vec<JobSpec> = w.intervals.iter().enumerate()
            .map(|(i, s)| spec(&format!("j{i}"), every(*s), &["good", "flaky"]))
            .collect();
        let mut s = scheduler(specs, 0);
        // job -> (end time, destinations of the run)
        let mut running: BTreeMap<String, (Millis, Vec<String>)> = BTreeMap::new();
        let mut k = 0usize;
        let mut now = 0;
        let mut flaky_retry_at: BTreeMap<String, Millis> = BTreeMap::new();
        while now < 600_000 {
            for a in s.poll(now) {
                match a {
                    Action::Start { job, destinations, trigger } => {
                        prop_assert!(!running.contains_key(&job), "{job} overlaps");
                        if let Some(t) = flaky_retry_at.get(&job) {
                            if trigger != Trigger::Manual && destinations.contains(&"flaky".to_string()) {
                                prop_assert!(now >= *t, "{job} retried before its backoff");
                            }
                        }
                        let d = Millis::from(w.durations[k % w.durations.len()]);
                        k += 1;
                        running.insert(job, (now + d, destinations));
                    }
                    Action::Skip { job, .. } => prop_assert!(running.contains_key(&job)),
                }
            }
            // Nothing is due strictly between now and the wake-up.
            let wake = s.next_wakeup().unwrap_or(Millis::MAX);
            let next_end = running.values().map(|(e, _)| *e).min().unwrap_or(Millis::MAX);
            let next = wake.min(next_end);
            prop_assert!(next > now, "no progress at {now}");
            if next - now > 1 {
                let mut probe = s.clone();
                prop_assert_eq!(probe.poll(now + (next - now) / 2), vec![]);
            }
            now = next;
            let ended: Vec<String> = running.iter().filter(|(_, (e, _))| *e <= now).map(|(j, _)| j.clone()).collect();
            for job in ended {
                let (_, dests) = running.remove(&job).unwrap();
                let fail = w.fail_pattern[k % w.fail_pattern.len()];
                let results: Vec<(String, bool)> = dests.iter()
                    .map(|d| (d.clone(), d != "flaky" || !fail)).collect();
                s.finished(&job, now, &results);
                if let Some(b) = s.view(&job).unwrap().backoff.get("flaky") {
                    match b.retry_at {
                        Some(t) => { flaky_retry_at.insert(job.clone(), t); }
                        None => { flaky_retry_at.remove(&job); }
                    }
                }
            }
        }
    }
}
