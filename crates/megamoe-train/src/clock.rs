//! Wall-clock times as text: UTC date-times for run-directory names and
//! console lines (`2026-11-30 01:02:03`), and short durations (`1h02m`, `3m05s`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    /// Year, e.g. 2026.
    pub year: i64,
    /// Month 1-12.
    pub month: u32,
    /// Day of the month 1-31.
    pub day: u32,
    /// Hour 0-23.
    pub hour: u32,
    /// Minute 0-59.
    pub minute: u32,
    /// Second 0-59.
    pub second: u32,
}

impl UtcTime {
    /// The UTC time of `t` (times before 1970 count as 1970-01-01 00:00:00).
    pub fn of(t: SystemTime) -> UtcTime {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Civil date from days since 1970-01-01 (H. Hinnant's `civil_from_days`).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        UtcTime {
            year,
            month,
            day,
            hour: (rem / 3_600) as u32,
            minute: (rem % 3_600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// Now, in UTC.
    pub fn now() -> UtcTime {
        UtcTime::of(SystemTime::now())
    }

    /// `20261130-010203`: sorts by time, safe in file names.
    pub fn compact(&self) -> String {
        format!(
            "{:04}{:02}{:02}-{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `01:02:03` (time of day).
    pub fn time_of_day(&self) -> String {
        format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

impl std::fmt::Display for UtcTime {
    /// `2026-11-30 01:02:03 UTC`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// A duration as `45s`, `3m05s` or `2h04m` (rounded down to the shown unit).
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> UtcTime {
        UtcTime::of(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn known_dates_convert_exactly() {
        // Each value below is a date whose Unix time is known independently
        // (`date -u -d @N`), including a leap day and a century leap year.
        assert_eq!(at(0).to_string(), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400).to_string(), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_709_210_096).to_string(), "2024-02-29 12:34:56 UTC");
        assert_eq!(at(4_107_542_399).to_string(), "2100-02-28 23:59:59 UTC");
        assert_eq!(at(4_107_542_400).to_string(), "2100-03-01 00:00:00 UTC");
        assert_eq!(at(1_798_675_323).compact(), "20261231-000203");
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(short_duration(Duration::from_secs(45)), "45s");
        assert_eq!(short_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(short_duration(Duration::from_secs(7_440)), "2h04m");
    }
}
