//! RFC 3339 timestamps without a date library: milliseconds since the Unix epoch.

/// Formats `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC). Digits
/// are written by hand: every rendered poll answer has up to three of these,
/// and `format!` with padding costs several times more in the VM.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let rem = secs % 86_400;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(days);
    let mut out = String::with_capacity(24);
    let fields: [(u64, usize, char); 7] = [
        (u64::try_from(year).unwrap_or(0), 4, '-'),
        (u64::from(month), 2, '-'),
        (u64::from(day), 2, 'T'),
        (rem / 3600, 2, ':'),
        ((rem % 3600) / 60, 2, ':'),
        (rem % 60, 2, '.'),
        (ms % 1000, 3, 'Z'),
    ];
    for (n, width, after) in fields {
        push_padded(&mut out, n, width);
        out.push(after);
    }
    out
}

/// `n` in decimal, with leading zeros to at least `width` digits.
fn push_padded(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut len = 0;
    while n > 0 || len < width {
        if let Some(d) = digits.get_mut(19 - len) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        len += 1;
        if len == digits.len() {
            break;
        }
    }
    for &d in digits.iter().skip(20 - len) {
        out.push(char::from(d));
    }
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01, after Howard Hinnant's algorithm.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month) of `secs` since the epoch.
pub fn year_month(secs: u64) -> (i64, u32) {
    let (year, month, _) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    (year, month)
}

/// Reads an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z` (or `+00:00`) as
/// milliseconds since the epoch; `None` for anything else.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let digits = b.get(from..from + len)?;
        digits.iter().all(u8::is_ascii_digit).then_some(())?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let punct = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if punct.iter().any(|(i, c)| b.get(*i) != Some(c)) || !matches!(b.get(10), Some(b'T' | b't')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let mut rest = b.get(19..)?;
    let mut millis = 0u64;
    if rest.first() == Some(&b'.') {
        let digits = rest
            .iter()
            .skip(1)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let frac = std::str::from_utf8(rest.get(1..1 + digits)?).ok()?;
        let first3: String = frac.chars().chain("000".chars()).take(3).collect();
        millis = first3.parse().ok()?;
        rest = rest.get(1 + digits..)?;
    }
    if !matches!(rest, b"Z" | b"z" | b"+00:00") {
        return None;
    }
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = u64::try_from(days_from_civil(i64::from(year), month, day)).ok()?;
    let secs = days * 86_400 + u64::from(hour) * 3600 + u64::from(minute) * 60 + u64::from(second);
    Some(secs * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_digits_match_format() {
        let by_format = |ms: u64| {
            let (secs, rem) = (ms / 1000, (ms / 1000) % 86_400);
            let (year, month, day) = civil_from_days((secs / 86_400) as i64);
            format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                (rem % 3600) / 60,
                rem % 60,
                ms % 1000
            )
        };
        let mut ms = 1u64;
        while ms < u64::MAX / 7 {
            for at in [ms, ms + 999, ms * 3 + 17] {
                assert_eq!(rfc3339(at), by_format(at), "{at}");
            }
            ms = ms * 7 + 1;
        }
        assert_eq!(rfc3339(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_467_600_123), "2026-11-23T21:00:00.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn reads_what_it_writes_and_refuses_the_rest() {
        for ms in [0, 951_782_400_000, 1_795_467_600_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339("2027-06-30T00:00:00Z"),
            Some(1_814_313_600_000)
        );
        assert_eq!(
            parse_rfc3339("2027-06-30T00:00:00+00:00"),
            Some(1_814_313_600_000)
        );
        for bad in [
            "2027-06-30",
            "2027-06-30T00:00:00",
            "2027-06-30T00:00:00+02:00",
            "2027-02-29T00:00:00Z",
            "2027-13-01T00:00:00Z",
            "2027-06-30T24:00:00Z",
            "2027-06-30T00:00:00.Z",
            "27-06-30T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        for days in [-1000, 0, 1, 59, 365, 11_016, 47_481] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
