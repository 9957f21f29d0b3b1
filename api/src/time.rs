//! RFC 3339 timestamps as the CRI log format and the Docker API write them, without a date
//! crate: UTC only on output, any offset on input.

/// `2016-10-06T00:17:09.669794202Z`: UTC, always nine fractional digits (sorts as text, and
/// parses with Go's `time.RFC3339Nano`).
pub fn rfc3339_nano(ns: i64) -> String {
    let (year, month, day, hour, min, sec) = civil(ns.div_euclid(1_000_000_000));
    let nanos = ns.rem_euclid(1_000_000_000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}.{nanos:09}Z")
}

/// The UTC calendar time of `secs` since the epoch: (year, month, day, hour, minute, second),
/// by Howard Hinnant's `civil_from_days`.
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (sod / 3600) as u32,
        (sod % 3600 / 60) as u32,
        (sod % 60) as u32,
    )
}

/// Nanoseconds since the epoch of an RFC 3339 time (`2016-10-06T00:17:09.669794202Z`, any
/// number of fractional digits, `Z` or `±hh:mm`); `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac[..digits].bytes().enumerate() {
            if i < 9 {
                nanos = nanos * 10 + i64::from(c - b'0');
            }
        }
        for _ in digits..9 {
            nanos *= 10;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.get(1..)?;
            let (h, m) = o.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
        }
    };
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_nano() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nano(1_475_713_029_669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
        assert_eq!(
            rfc3339_nano(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339_nano(4_102_444_799_999_999_999),
            "2099-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        for ns in [
            0,
            1_475_713_029_669_794_202,
            951_782_400_000_000_001,
            4_102_444_799_999_999_999,
        ] {
            assert_eq!(parse_rfc3339(&rfc3339_nano(ns)), Some(ns));
        }
        assert_eq!(
            parse_rfc3339("2016-10-06T02:17:09.5+02:00"),
            Some(1_475_713_029_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2016-10-06T00:17:09Z"),
            Some(1_475_713_029_000_000_000)
        );
        for bad in [
            "",
            "2016-10-06",
            "2016-13-06T00:17:09Z",
            "2016-10-06T00:17:09",
            "2016-10-06T00:17:09.Z",
            "x016-10-06T00:17:09Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
