//! Snapshot ages.
//!
//! Age (creation time) orders snapshots of a volume on every system, so it is kept with
//! nanosecond precision: qcow2 records nanoseconds and file systems keep them in mtimes.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Seconds and nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z; negative before.
    pub secs: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nanos: u32,
}

impl Timestamp {
    /// Build from parts; nanoseconds past a second carry into `secs`.
    pub fn new(secs: i64, nanos: u32) -> Self {
        Self {
            secs: secs.saturating_add(i64::from(nanos / 1_000_000_000)),
            nanos: nanos % 1_000_000_000,
        }
    }

    /// From a [`SystemTime`] (e.g. a file's modification time).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self::new(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Self::new(secs, nanos)
            }
        }
    }

    /// Total nanoseconds since the epoch, for distances between ages.
    pub fn as_nanos(&self) -> i128 {
        i128::from(self.secs) * 1_000_000_000 + i128::from(self.nanos)
    }

    /// Absolute distance in nanoseconds.
    pub fn distance(&self, other: &Timestamp) -> u128 {
        (self.as_nanos() - other.as_nanos()).unsigned_abs()
    }

    /// Whether this is a time a snapshot can have: nanoseconds below one second and a
    /// date that can be written out (years -9999 to 9999). Deserialized timestamps may be
    /// anything; a receiver checks them before it commits one.
    pub fn is_valid(&self) -> bool {
        self.nanos < 1_000_000_000 && ::time::OffsetDateTime::from_unix_timestamp(self.secs).is_ok()
    }

    /// RFC 3339 in UTC, with nanoseconds when non-zero.
    pub fn to_rfc3339(&self) -> String {
        match ::time::OffsetDateTime::from_unix_timestamp_nanos(self.as_nanos()) {
            Ok(dt) => dt
                .format(&::time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| format!("@{}.{:09}", self.secs, self.nanos)),
            Err(_) => format!("@{}.{:09}", self.secs, self.nanos),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

/// Milliseconds since the Unix epoch (UTC): the daemon's clock, and the precision of
/// [`rfc3339`] times.
pub type Millis = i64;

/// Milliseconds since the epoch as RFC 3339 (UTC, to the millisecond), for times that
/// are read by people as well as programs (the daemon's state and status, the chains a
/// server reports); a missing value is `null`.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Millis;

    /// Millis as RFC 3339 (UTC, milliseconds).
    pub fn format(t: Millis) -> String {
        let nanos = i128::from(t) * 1_000_000;
        match ::time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(dt) => dt
                .replace_nanosecond(dt.nanosecond() / 1_000_000 * 1_000_000)
                .unwrap_or(dt)
                .format(&::time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| t.to_string()),
            Err(_) => t.to_string(),
        }
    }

    /// RFC 3339 back to millis.
    pub fn parse(s: &str) -> Option<Millis> {
        let dt = ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
            .ok()?;
        Millis::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
    }

    /// For `#[serde(with)]`.
    pub fn serialize<S: Serializer>(t: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// For `#[serde(with)]`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))
    }

    /// The same for `Option<Millis>`.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        use super::Millis;

        /// For `#[serde(with)]`.
        pub fn serialize<S: Serializer>(t: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::format(*t)),
                None => s.serialize_none(),
            }
        }

        /// For `#[serde(with)]`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => super::parse(&s).map(Some).ok_or_else(|| {
                    serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time"))
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(Timestamp::new(0, 0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp::new(1_700_000_000, 5).to_rfc3339(),
            "2023-11-14T22:13:20.000000005Z"
        );
    }

    #[test]
    fn order_and_distance() {
        let a = Timestamp::new(10, 999_999_999);
        let b = Timestamp::new(11, 0);
        assert!(a < b);
        assert_eq!(a.distance(&b), 1);
        assert_eq!(
            Timestamp::new(1, 1_500_000_000),
            Timestamp::new(2, 500_000_000)
        );
    }

    #[test]
    fn millis_round_trip() {
        for t in [0, 1_699_920_000_123, -5_000, 1_700_000_000_000] {
            assert_eq!(rfc3339::parse(&rfc3339::format(t)), Some(t));
        }
        assert_eq!(
            rfc3339::format(1_699_920_000_123),
            "2023-11-14T00:00:00.123Z"
        );
    }
}
