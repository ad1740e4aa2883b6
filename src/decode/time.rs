//! Timestamps as the schema's `format`s define them.

use chrono::{DateTime, NaiveDate};

const EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// RFC 3339 (`2026-11-21T18:04:05.123Z`, `...+01:00`) → microseconds since the epoch, UTC.
pub fn parse_date_time(s: &str) -> Result<i64, ()> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .map_err(|_| ())
}

/// `YYYY-MM-DD` → days since the epoch.
pub fn parse_date(s: &str) -> Result<i32, ()> {
    use chrono::Datelike;
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.num_days_from_ce() - EPOCH_DAYS_FROM_CE)
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_formats() {
        assert_eq!(parse_date_time("1970-01-01T00:00:01Z"), Ok(1_000_000));
        assert_eq!(parse_date_time("1970-01-01T01:00:00.5+01:00"), Ok(500_000));
        assert!(parse_date_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_date_time("2026-11-21 10:00").is_err());
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert!(parse_date("21/11/2026").is_err());
    }
}
