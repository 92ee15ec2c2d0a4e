//! Times as the attribution records keep them (Unix microseconds) and as people read and
//! write them (RFC 3339, UTC), and the day a time falls in (a store file per UTC day).

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::AttributionError;

/// Now, Unix microseconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The UTC day of `micros`, counted from 1970-01-01.
pub fn day(micros: u64) -> u32 {
    (micros / 86_400_000_000) as u32
}

/// `YYYY-MM-DD` of a day number.
pub fn day_name(day: u32) -> String {
    match OffsetDateTime::from_unix_timestamp(i64::from(day) * 86_400) {
        Ok(t) => t.date().to_string(),
        Err(_) => format!("day-{day}"),
    }
}

/// The day a `YYYY-MM-DD` names.
pub fn day_of_name(name: &str) -> Option<u32> {
    let t = OffsetDateTime::parse(&format!("{name}T00:00:00Z"), &Rfc3339).ok()?;
    u32::try_from(t.unix_timestamp() / 86_400).ok()
}

/// `micros` as RFC 3339 in UTC, to the microsecond.
pub fn rfc3339(micros: u64) -> String {
    let nanos = i128::from(micros) * 1000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{micros}us"))
}

/// An RFC 3339 time (e.g. `2026-12-05T12:03:00Z`, or with an offset) as Unix microseconds.
pub fn parse(text: &str) -> Result<u64, AttributionError> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        AttributionError::Time(format!(
            "{text:?} is not an RFC 3339 time such as 2026-12-05T12:03:00Z: {e}"
        ))
    })?;
    u64::try_from(t.unix_timestamp_nanos() / 1000)
        .map_err(|_| AttributionError::Time(format!("{text:?} is before 1970")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_back_as_written() {
        let t = parse("2026-12-05T12:03:00.250Z").unwrap();
        assert_eq!(rfc3339(t), "2026-12-05T12:03:00.25Z");
        assert_eq!(parse("2026-12-05T13:03:00.250+01:00").unwrap(), t);
        assert_eq!(day_name(day(t)), "2026-12-05");
        assert_eq!(day_of_name("2026-12-05"), Some(day(t)));
        assert!(parse("12:03").is_err());
    }
}
