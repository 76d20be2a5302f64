//! When a job runs: a cron expression, or `every DURATION`.

use std::fmt;
use std::time::Duration;

use crate::cron::Cron;
use crate::units::{format_duration, parse_duration};

/// Milliseconds since the Unix epoch: the scheduler's clock, a plain number so that its
/// tests say "at 12 s" rather than build system times.
pub type Millis = i64;

/// A job's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// At the seconds a cron expression matches (UTC).
    Cron(Cron),
    /// Every so long, counted from the start of the previous run: `"every 30s"`.
    Every(Duration),
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().strip_prefix("every ") {
            Some(d) => Ok(Schedule::Every(parse_duration(d)?)),
            None => s.parse().map(Schedule::Cron),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(c) => c.fmt(f),
            Schedule::Every(d) => write!(f, "every {}", format_duration(*d)),
        }
    }
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

impl Schedule {
    /// The first slot strictly after `t`; `None` when there is none (a cron expression
    /// that matches no time in the years searched).
    pub fn next_after(&self, t: Millis) -> Option<Millis> {
        match self {
            Schedule::Every(d) => t.checked_add(millis(*d)),
            Schedule::Cron(c) => c
                .next_after(t.div_euclid(1000))
                .and_then(|s| s.checked_mul(1000)),
        }
    }

    /// When a job that has never run runs first: at once for `every`, which promises
    /// a run each interval from the start; at the next matching time for cron, which
    /// promises those times.
    pub fn first(&self, now: Millis) -> Option<Millis> {
        match self {
            Schedule::Every(_) => Some(now),
            Schedule::Cron(_) => self.next_after(now),
        }
    }

    /// The usual time between two runs, for judging lag: the interval of `every`, or
    /// the shortest gap between the next few matches of a cron expression after `now`.
    pub fn interval(&self, now: Millis) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron(_) => {
                let mut gaps = Vec::new();
                let mut t = now;
                for _ in 0..8 {
                    let Some(next) = self.next_after(t) else {
                        break;
                    };
                    if t != now {
                        gaps.push(next - t);
                    }
                    t = next;
                }
                let ms = gaps.into_iter().min().unwrap_or(86_400_000);
                Duration::from_millis(ms.max(0) as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_and_cron() {
        let e: Schedule = "every 30s".parse().unwrap();
        assert_eq!(e, Schedule::Every(Duration::from_secs(30)));
        assert_eq!(e.to_string(), "every 30s");
        assert_eq!(e.first(5_000), Some(5_000));
        assert_eq!(e.next_after(5_000), Some(35_000));
        let c: Schedule = "*/15 * * * *".parse().unwrap();
        assert_eq!(c.to_string(), "*/15 * * * *");
        assert_eq!(c.next_after(0), Some(900_000));
        assert_eq!(c.next_after(899_999), Some(900_000));
        assert_eq!(c.next_after(900_000), Some(1_800_000));
        assert_eq!(c.first(1), Some(900_000));
        assert_eq!(c.interval(12_345), Duration::from_secs(900));
        let daily: Schedule = "30 2 * * *".parse().unwrap();
        assert_eq!(daily.interval(0), Duration::from_secs(86400));
        assert!("every 0s".parse::<Schedule>().is_err());
        assert!("every".parse::<Schedule>().is_err());
        assert!("hourly".parse::<Schedule>().is_err());
    }
}
