//! Cron expressions: 5 fields (`minute hour day-of-month month day-of-week`) or 6 with
//! seconds first, matched in UTC.
//!
//! Written here rather than taken from a crate because the whole of it is a bit set per
//! field and one "next match" walk, and because its two rules that surprise people are
//! then stated where they are implemented: day-of-month and day-of-week combine with
//! OR when both are restricted (Vixie cron's rule, which every crontab in the wild
//! assumes), and times are UTC (a schedule that skips or repeats an hour twice a year
//! is worse than one an operator has to convert once).

use std::fmt;

use time::{Date, Month, OffsetDateTime, Time};

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether the day-of-month field was `*` (or `*/N`): then only day-of-week counts.
    days_any: bool,
    /// Whether the day-of-week field was `*` (or `*/N`): then only day-of-month counts.
    weekdays_any: bool,
    text: String,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One field's name, range and the names its values may go by.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The value of the first name (months count from 1, weekdays from 0).
    name_base: u32,
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    name_base: 0,
};
const DAY: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
    name_base: 0,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    name_base: 1,
};
/// 0 and 7 are both Sunday.
const WEEKDAY: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    name_base: 0,
};

impl Field {
    fn value(&self, s: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + self.name_base);
        }
        match s.parse::<u32>() {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => Err(format!(
                "{} {s:?} is not in {}-{}",
                self.name, self.min, self.max
            )),
        }
    }

    /// The set of values `spec` names (`*`, `*/N`, `A`, `A-B`, `A-B/N`, `A/N`, lists).
    fn parse(&self, spec: &str) -> Result<u64, String> {
        let mut bits = 0u64;
        for part in spec.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => match s.parse::<u32>() {
                    Ok(n) if n > 0 => (r, n),
                    _ => {
                        return Err(format!(
                            "{} step {s:?} is not a whole number above 0",
                            self.name
                        ))
                    }
                },
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{} range {range:?} runs backwards", self.name));
                }
                (a, b)
            } else {
                let a = self.value(range)?;
                // `A/N` is "from A on, every N".
                (a, if part.contains('/') { self.max } else { a })
            };
            for v in (lo..=hi).step_by(step as usize) {
                bits |= 1 << v;
            }
        }
        if self.name == WEEKDAY.name && bits & (1 << 7) != 0 {
            bits = (bits | 1) & !(1 << 7);
        }
        Ok(bits)
    }
}

impl std::str::FromStr for Cron {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let expanded = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(format!(
                    "a cron schedule has 5 fields (minute hour day month weekday) or 6 (seconds first); {text:?} has {n}"
                ))
            }
        };
        let any = |f: &str| f == "*" || f.starts_with("*/");
        let cron = Cron {
            seconds: SECOND.parse(sec)?,
            minutes: MINUTE.parse(rest[0])?,
            hours: HOUR.parse(rest[1])?,
            days: DAY.parse(rest[2])?,
            months: MONTH.parse(rest[3])?,
            weekdays: WEEKDAY.parse(rest[4])?,
            days_any: any(rest[2]),
            weekdays_any: any(rest[4]),
            text: text.to_string(),
        };
        if !cron.can_match() {
            return Err(format!("{text:?} names a day that no month has"));
        }
        Ok(cron)
    }
}

/// Latest year searched for a match: an expression that matches nothing before then
/// (February 30th) matches nothing.
const SEARCH_YEARS: i32 = 8;

impl Cron {
    /// Whether the day-of-month field can match in some month it allows (not `30 2`).
    fn can_match(&self) -> bool {
        if self.days_any || !self.weekdays_any {
            return true;
        }
        (1..=12u8).filter(|m| self.months & (1 << m) != 0).any(|m| {
            let month = Month::try_from(m).expect("1-12");
            // 2024 is a leap year: the longest February.
            let len = u32::from(month.length(2024));
            (1..=len).any(|d| self.days & (1 << d) != 0)
        })
    }

    fn day_matches(&self, date: Date) -> bool {
        let dom = self.days & (1 << date.day()) != 0;
        let dow = self.weekdays & (1 << date.weekday().number_days_from_sunday()) != 0;
        match (self.days_any, self.weekdays_any) {
            (false, false) => dom || dow,
            (true, false) => dow,
            (false, true) => dom,
            (true, true) => true,
        }
    }

    /// Whether the second starting at `t` (Unix seconds, UTC) matches.
    pub fn matches(&self, t: i64) -> bool {
        let Ok(dt) = OffsetDateTime::from_unix_timestamp(t) else {
            return false;
        };
        self.months & (1 << u8::from(dt.month())) != 0
            && self.day_matches(dt.date())
            && self.hours & (1 << dt.hour()) != 0
            && self.minutes & (1 << dt.minute()) != 0
            && self.seconds & (1 << dt.second()) != 0
    }

    /// The first matching second strictly after `t` (Unix seconds, UTC), or `None` when
    /// there is none in the next years.
    ///
    /// It walks from the largest field down, jumping to the start of the next month, day,
    /// hour or minute when a field does not match, so it takes a few dozen steps at most
    /// per year searched rather than one per second.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = OffsetDateTime::from_unix_timestamp(t.checked_add(1)?).ok()?;
        let limit = start.year() + SEARCH_YEARS;
        let mut dt = start;
        loop {
            if dt.year() > limit {
                return None;
            }
            let (date, time) = (dt.date(), dt.time());
            dt = if self.months & (1 << u8::from(date.month())) == 0 {
                first_of_next_month(date)?
            } else if !self.day_matches(date) {
                date.next_day()?.midnight().assume_utc()
            } else if self.hours & (1 << time.hour()) == 0 {
                dt.replace_time(Time::from_hms(time.hour(), 0, 0).ok()?) + time::Duration::HOUR
            } else if self.minutes & (1 << time.minute()) == 0 {
                dt.replace_time(Time::from_hms(time.hour(), time.minute(), 0).ok()?)
                    + time::Duration::MINUTE
            } else if self.seconds & (1 << time.second()) == 0 {
                dt + time::Duration::SECOND
            } else {
                return Some(dt.unix_timestamp());
            };
        }
    }
}

fn first_of_next_month(date: Date) -> Option<OffsetDateTime> {
    let (year, month) = match date.month() {
        Month::December => (date.year() + 1, Month::January),
        m => (date.year(), m.next()),
    };
    Some(
        Date::from_calendar_date(year, month, 1)
            .ok()?
            .midnight()
            .assume_utc(),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cron(s: &str) -> Cron {
        s.parse().unwrap()
    }

    /// 2023-11-14T00:00:00Z, a Tuesday.
    const T0: i64 = 1_699_920_000;

    fn brute_next(c: &Cron, t: i64, step: i64, window: i64) -> Option<i64> {
        let mut x = t + 1;
        // Align to the step (minutes for 5-field expressions, whose seconds are 0).
        x += (step - x.rem_euclid(step)) % step;
        while x <= t + window {
            if c.matches(x) {
                return Some(x);
            }
            x += step;
        }
        None
    }

    #[test]
    fn common_expressions() {
        let every15 = cron("*/15 * * * *");
        assert_eq!(every15.next_after(T0), Some(T0 + 900));
        assert_eq!(every15.next_after(T0 - 1), Some(T0));
        assert_eq!(every15.next_after(T0 + 899), Some(T0 + 900));
        let s = cron("*/2 * * * * *");
        assert_eq!(s.next_after(T0), Some(T0 + 2));
        assert_eq!(s.next_after(T0 + 1), Some(T0 + 2));
        // Daily at 02:30: the same day.
        assert_eq!(
            cron("30 2 * * *").next_after(T0),
            Some(T0 + 2 * 3600 + 1800)
        );
        // Mondays at midnight: the 20th (T0 is Tuesday the 14th).
        assert_eq!(cron("0 0 * * mon").next_after(T0), Some(T0 + 6 * 86400));
        // 7 is Sunday too.
        assert_eq!(cron("0 0 * * 7").next_after(T0), Some(T0 + 5 * 86400));
        // First of the month or any Sunday (OR when both are restricted): Sunday 19th.
        assert_eq!(cron("0 0 1 * sun").next_after(T0), Some(T0 + 5 * 86400));
        // Leap day: the next one is 2024-02-29.
        assert_eq!(cron("0 0 29 feb *").next_after(T0), Some(1_709_164_800));
        assert_eq!(cron("@hourly").next_after(T0), Some(T0 + 3600));
        assert_eq!(
            cron("0 12 * dec,jan,feb *").next_after(T0),
            Some(T0 + 17 * 86400 + 12 * 3600)
        );
    }

    #[test]
    fn mistakes_name_the_field() {
        let e = |s: &str| s.parse::<Cron>().unwrap_err();
        assert!(e("* * * *").contains("has 4"), "{}", e("* * * *"));
        assert!(e("60 * * * *").contains("minute \"60\""));
        assert!(e("* 24 * * *").contains("hour"));
        assert!(e("* * 0 * *").contains("day of month"));
        assert!(e("* * * 13 *").contains("month"));
        assert!(e("* * * * 8").contains("day of week"));
        assert!(e("*/0 * * * *").contains("step"));
        assert!(e("5-1 * * * *").contains("backwards"));
        assert!(e("0 0 30 2 *").contains("no month"));
    }

    fn field(max: u32) -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            (1..=max.max(1)).prop_map(|n| format!("*/{n}")),
            (0..=max).prop_map(|a| a.to_string()),
            (0..=max, 0..=max).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (0..=max, 0..=max, 1..5u32).prop_map(|(a, b, s)| format!(
                "{}-{}/{s}",
                a.min(b),
                a.max(b)
            )),
            (0..=max, 0..=max).prop_map(|(a, b)| format!("{a},{b}")),
        ]
    }

    fn five_fields() -> impl Strategy<Value = String> {
        (field(59), field(23), field(30), field(11), field(6)).prop_map(|(m, h, d, mo, w)| {
            // Days and months start at 1.
            let shift = |f: String| {
                f.split(',')
                    .map(|p| {
                        let (r, s) = p.split_once('/').map_or((p, None), |(r, s)| (r, Some(s)));
                        let r = if r == "*" {
                            r.to_string()
                        } else {
                            r.split('-')
                                .map(|v| (v.parse::<u32>().unwrap() + 1).to_string())
                                .collect::<Vec<_>>()
                                .join("-")
                        };
                        s.map_or(r.clone(), |s| format!("{r}/{s}"))
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("{m} {h} {} {} {w}", shift(d), shift(mo))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// The jumping walk finds what checking every minute finds.
        #[test]
        fn next_after_is_the_first_match(expr in five_fields(), offset in 0i64..400 * 86400) {
            let Ok(c) = expr.parse::<Cron>() else { return Ok(()) };
            let t = T0 + offset;
            // Six weeks of minutes: enough for any expression whose days are not rare.
            let window = 42 * 86400;
            let brute = brute_next(&c, t, 60, window);
            let fast = c.next_after(t);
            match brute {
                Some(b) => prop_assert_eq!(fast, Some(b), "{}", expr),
                None => prop_assert!(fast.is_none_or(|f| f > t + window), "{} {:?}", expr, fast),
            }
        }

        #[test]
        fn seconds_fields_too(sec in field(59), min in field(59), offset in 0i64..86400) {
            let expr = format!("{sec} {min} * * * *");
            let c: Cron = expr.parse().unwrap();
            let t = T0 + offset;
            prop_assert_eq!(c.next_after(t), brute_next(&c, t, 1, 7200), "{}", expr);
        }

        /// What a field parses to, against a model: the values each part names.
        #[test]
        fn field_values_match_a_model(spec in field(59)) {
            let bits = MINUTE.parse(&spec).unwrap();
            let mut model = 0u64;
            for part in spec.split(',') {
                let (r, step) = part.split_once('/').map_or((part, 1), |(r, s)| (r, s.parse().unwrap()));
                let (lo, hi) = match r {
                    "*" => (0, 59),
                    r => match r.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => { let a: u32 = r.parse().unwrap(); (a, if part.contains('/') { 59 } else { a }) }
                    },
                };
                let mut v = lo;
                while v <= hi { model |= 1 << v; v += step; }
            }
            prop_assert_eq!(bits, model);
        }
    }
}
