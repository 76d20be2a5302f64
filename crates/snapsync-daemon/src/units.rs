//! The quantities a config file writes as text: durations (`"90s"`, `"1h30m"`) and
//! rates (`"200MiB/s"`). Parsed by hand because both are small, and an operator's typo
//! must come back as one sentence naming what was expected.

use std::fmt;
use std::time::Duration;

/// A rate in bytes per second, from `"200MiB/s"`, `"50MB/s"`, `"1.5GiB/s"`, `"800K/s"`.
///
/// `K`, `M`, `G` (and `KiB`, `MiB`, `GiB`) are powers of 1024, as in `export
/// --cache-size`; `KB`, `MB`, `GB` are powers of 1000, as network links are sold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    bytes_per_second: u32,
}

/// The fastest limit a token bucket here counts (one cell a byte, a `u32` of them per
/// second). A faster link needs no limit from snapsync.
pub const MAX_RATE: u64 = u32::MAX as u64;

impl Rate {
    /// Bytes a second, at least 1.
    pub fn bytes_per_second(self) -> u32 {
        self.bytes_per_second
    }

    /// A rate of `bytes` a second; `None` for zero or more than [`MAX_RATE`].
    pub fn new(bytes: u64) -> Option<Self> {
        match u32::try_from(bytes) {
            Ok(b) if b > 0 => Some(Self {
                bytes_per_second: b,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", human_bytes(u64::from(self.bytes_per_second)))
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!(
                "{s:?} is not a rate: write a size per second, such as \"200MiB/s\" or \"50MB/s\""
            )
        };
        let amount = s.trim().strip_suffix("/s").ok_or_else(expected)?;
        let bytes = parse_size(amount).ok_or_else(expected)?;
        Rate::new(bytes).ok_or_else(|| {
            if bytes == 0 {
                format!("{s:?}: a limit of zero would stop every transfer; leave bwlimit out for none")
            } else {
                format!(
                    "{s:?} is more than {} a second, the most a limit here counts; leave bwlimit out for none",
                    human_bytes(MAX_RATE)
                )
            }
        })
    }
}

/// A size: a decimal number (fractions allowed) and an optional unit.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    let v = (n * factor).round();
    (v.is_finite() && (0.0..1e19).contains(&v)).then_some(v as u64)
}

/// Parse a duration: one or more `NUMBER UNIT` terms (`ms`, `s`, `m`, `h`, `d`), such as
/// `"30s"`, `"6h"`, `"1h30m"`. Zero is refused: no timer here means "at once".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || {
        format!("{s:?} is not a duration: write a number and a unit (ms, s, m, h, d), such as \"30s\", \"6h\" or \"1h30m\"")
    };
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(expected());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(expected());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| expected())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(expected()),
        };
        rest = rest[unit_len..].trim_start();
        let term = unit
            .checked_mul(u32::try_from(n).map_err(|_| expected())?)
            .ok_or_else(expected)?;
        total = total.checked_add(term).ok_or_else(expected)?;
    }
    if total.is_zero() {
        return Err(format!("{s:?}: a duration must be longer than zero"));
    }
    Ok(total)
}

/// A duration as the config writes it back: `"1h30m"`, `"45s"`, `"250ms"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, len) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out += &format!("{}{unit}", secs / len);
            secs %= len;
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// Bytes for people: `"12.0 MiB"`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = |s: &str| s.parse::<Rate>().map(|r| r.bytes_per_second());
        assert_eq!(r("200MiB/s"), Ok(200 << 20));
        assert_eq!(r("50MB/s"), Ok(50_000_000));
        assert_eq!(r("1.5GiB/s"), Ok(3 << 29));
        assert_eq!(r("800K/s"), Ok(800 << 10));
        assert_eq!(r("16 MiB/s"), Ok(16 << 20));
        assert_eq!(r("4096/s"), Ok(4096));
        assert!(r("200MiB").unwrap_err().contains("not a rate"));
        assert!(r("0MiB/s").unwrap_err().contains("zero"));
        assert!(r("5GiB/s").unwrap_err().contains("the most"));
        assert!(r("fast/s").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86400)));
        for bad in ["", "30", "s", "3x", "0s", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for d in ["1h30m", "45s", "250ms", "2d3h", "1m"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }
}
