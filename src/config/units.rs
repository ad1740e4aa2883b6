//! Human-readable durations (`"500ms"`, `"5m"`) and sizes (`"128MiB"`, `"8MB"`).
//!
//! Both deserialize from a string or a bare integer (seconds for durations, bytes for sizes),
//! and fail with a message that shows the expected form, so `sluice validate` can print
//! `sink.parquet.max_file_size: expected a size like "128MiB", got "big"`.

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer};

/// A duration written as `"250ms"`, `"30s"`, `"5m"` or a whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A size in bytes written as `"128MiB"`, `"64KB"`, `"512"` or a whole number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

/// Parses `"250ms"`, `"1h 30m"` and friends.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("expected a duration like \"500ms\" or \"5m\", got {text:?}"))
}

/// Parses `"128MiB"` (binary units), `"64MB"` (decimal units) or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("expected a size like \"128MiB\", got {text:?}");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Accepts a string (parsed by `parse`) or a non-negative integer (mapped by `from_int`),
/// the two ways people write these values in TOML.
struct StringOrInt<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
    from_int: fn(u64) -> T,
}

impl<T> de::Visitor<'_> for StringOrInt<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok((self.from_int)(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => Ok((self.from_int)(v)),
            Err(_) => Err(E::custom(format!("expected a non-negative value, got {v}"))),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringOrInt {
            expecting: "a duration like \"500ms\" or a number of seconds",
            parse: |s| parse_duration(s).map(HumanDuration),
            from_int: |secs| HumanDuration(Duration::from_secs(secs)),
        })
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringOrInt {
            expecting: "a size like \"128MiB\" or a number of bytes",
            parse: |s| parse_size(s).map(HumanSize),
            from_int: HumanSize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("64 KB").unwrap(), 64_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(
            parse_size("big").unwrap_err(),
            "expected a size like \"128MiB\", got \"big\""
        );
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn deserialize_from_string_or_int() {
        let s: HumanSize = serde_json::from_str("\"1KiB\"").unwrap();
        assert_eq!(s, HumanSize(1024));
        let s: HumanSize = serde_json::from_str("2048").unwrap();
        assert_eq!(s, HumanSize(2048));
        let d: HumanDuration = serde_json::from_str("3").unwrap();
        assert_eq!(d, HumanDuration(Duration::from_secs(3)));
        assert!(serde_json::from_str::<HumanSize>("-1").is_err());
        assert!(serde_json::from_str::<HumanDuration>("true").is_err());
    }
}
