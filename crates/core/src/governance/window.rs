//! Counting windows: a count and a unit (`30s`, `1m`, `1h`, `1d`, `1w`,
//! `1M`), fixed and aligned to UTC. A window of n units starts at every
//! multiple of n units since 1970-01-01T00:00Z: weeks counted from Monday
//! 1970-01-05, months from January 1970; so `1d` is the UTC day and `1M` the
//! calendar month.

use crate::time::{days_from_civil, year_month};

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// 1970-01-05, a Monday: where weeks are counted from.
const FIRST_MONDAY: u64 = 4 * DAY;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A fixed number of seconds.
    Seconds(u64),
    /// From Monday 1970-01-05.
    Weeks,
    Months,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    count: u64,
    unit: Unit,
    /// As configured, e.g. `1m`.
    pub text: String,
}

impl Window {
    /// Reads `30s`, `1m`, `1h`, `1d`, `1w` or `1M`: from 1 s to 12 months.
    pub fn parse(text: &str) -> Result<Window, String> {
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let count: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a window: a count then s, m, h, d, w or M"))?;
        let (unit, longest) = match unit {
            "s" => (Unit::Seconds(1), 366 * DAY),
            "m" => (Unit::Seconds(MINUTE), 366 * DAY / MINUTE),
            "h" => (Unit::Seconds(HOUR), 366 * DAY / HOUR),
            "d" => (Unit::Seconds(DAY), 366),
            "w" => (Unit::Weeks, 52),
            "M" => (Unit::Months, 12),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (s, m, h, d, w or M)"
                ))
            }
        };
        if count == 0 || count > longest {
            return Err(format!(
                "{text:?}: a window is from 1 s to 12 months ({longest} at most in this unit)"
            ));
        }
        Ok(Window {
            count,
            unit,
            text: text.to_string(),
        })
    }

    /// Where the window holding `now_s` starts, in seconds since the epoch.
    pub fn start(&self, now_s: u64) -> u64 {
        match self.unit {
            Unit::Seconds(unit) => {
                let len = self.count * unit;
                now_s - now_s % len
            }
            Unit::Weeks => {
                let len = self.count * WEEK;
                let since = i128::from(now_s) - i128::from(FIRST_MONDAY);
                let start = since.div_euclid(i128::from(len)) * i128::from(len);
                u64::try_from(start + i128::from(FIRST_MONDAY)).unwrap_or(0)
            }
            Unit::Months => {
                let months = months_since_1970(now_s);
                month_start(months - months % self.count)
            }
        }
    }

    /// Where the window holding `now_s` ends (the next one starts).
    pub fn end(&self, now_s: u64) -> u64 {
        let start = self.start(now_s);
        match self.unit {
            Unit::Seconds(unit) => start + self.count * unit,
            Unit::Weeks => start + self.count * WEEK,
            Unit::Months => month_start(months_since_1970(start) + self.count),
        }
    }

    /// The length in seconds of the window holding `now_s`.
    pub fn length(&self, now_s: u64) -> u64 {
        self.end(now_s) - self.start(now_s)
    }
}

fn months_since_1970(secs: u64) -> u64 {
    let (year, month) = year_month(secs);
    u64::try_from((year - 1970) * 12).unwrap_or(0) + u64::from(month) - 1
}

fn month_start(months: u64) -> u64 {
    let year = 1970 + i64::try_from(months / 12).unwrap_or(0);
    let month = u32::try_from(months % 12).unwrap_or(0) + 1;
    u64::try_from(days_from_civil(year, month, 1)).unwrap_or(0) * DAY
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339;

    fn at(text: &str) -> u64 {
        parse_rfc3339(text).unwrap() / 1000
    }

    fn bounds(window: &str, now: &str) -> (u64, u64) {
        let w = Window::parse(window).unwrap();
        (w.start(at(now)), w.end(at(now)))
    }

    #[test]
    fn windows_are_aligned_to_utc() {
        let now = "2026-12-06T10:14:37Z";
        assert_eq!(
            bounds("30s", now),
            (at("2026-12-06T10:14:30Z"), at("2026-12-06T10:15:00Z"))
        );
        assert_eq!(
            bounds("1m", now),
            (at("2026-12-06T10:14:00Z"), at("2026-12-06T10:15:00Z"))
        );
        assert_eq!(
            bounds("1h", now),
            (at("2026-12-06T10:00:00Z"), at("2026-12-06T11:00:00Z"))
        );
        assert_eq!(
            bounds("1d", now),
            (at("2026-12-06T00:00:00Z"), at("2026-12-07T00:00:00Z"))
        );
        // 2026-11-30 is a Monday.
        assert_eq!(
            bounds("1w", now),
            (at("2026-11-30T00:00:00Z"), at("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            bounds("1M", now),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        // Three months from January 1970: October to December.
        assert_eq!(
            bounds("3M", now),
            (at("2026-10-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            bounds("12M", "2028-02-29T12:00:00Z"),
            (at("2028-01-01T00:00:00Z"), at("2029-01-01T00:00:00Z"))
        );
        // February of a leap year is 29 days long.
        assert_eq!(
            Window::parse("1M")
                .unwrap()
                .length(at("2028-02-10T00:00:00Z")),
            29 * DAY
        );
        assert_eq!(Window::parse("2s").unwrap().length(at(now)), 2);
    }

    #[test]
    fn a_window_reaches_from_its_start_to_the_next() {
        for text in ["7s", "5m", "2h", "3d", "2w", "1M", "5M"] {
            let w = Window::parse(text).unwrap();
            let mut t = at("2026-01-01T00:00:00Z");
            for _ in 0..50 {
                let (start, end) = (w.start(t), w.end(t));
                assert!(start <= t && t < end, "{text} at {t}");
                assert_eq!(
                    w.start(end),
                    end,
                    "{text}: the next window starts at the end"
                );
                t = end + (end - start) / 3;
            }
        }
    }

    #[test]
    fn bad_windows_are_refused_naming_the_text() {
        for bad in [
            "", "m", "0m", "1x", "1.5h", "-1d", "13M", "53w", "367d", "1 m", "1mm",
        ] {
            let e = Window::parse(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        for good in ["1s", "31622400s", "366d", "52w", "12M"] {
            assert!(Window::parse(good).is_ok(), "{good}");
        }
    }
}
