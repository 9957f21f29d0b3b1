//! Kubernetes resource quantities (`10M`, `1.5Gi`, `500k`, `1e6`), as the pod bandwidth
//! annotations carry them.
//!
//! The grammar is apimachinery's `resource.Quantity`: a decimal number with an optional
//! fraction, then a binary suffix (`Ki`..`Ei`), a decimal one (`n`, `u`, `m`, `k`, `M`..`E`) or
//! an exponent (`e3`, `E-2`). [`parse_value`] gives what `Quantity.Value()` gives: the value
//! rounded up to an integer.

/// The integer value of `s` (rounded up, as `Quantity.Value()`), or a message saying what is
/// wrong. Negative quantities and values beyond `u64` are errors: the callers want amounts.
pub fn parse_value(s: &str) -> Result<u64, String> {
    let bad = |why: &str| Err(format!("{s:?} is not a quantity: {why}"));
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.starts_with('-') {
        return bad("it is negative");
    }
    let num_len = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(num_len);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return bad("no number");
    }
    // The digits as one integer, scaled down by 10^frac.len() below.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return bad("too many digits");
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| format!("{s:?}: bad digits"))?
    };
    let (base, exp): (u128, i32) = match suffix {
        "" => (10, 0),
        "Ki" => (2, 10),
        "Mi" => (2, 20),
        "Gi" => (2, 30),
        "Ti" => (2, 40),
        "Pi" => (2, 50),
        "Ei" => (2, 60),
        "n" => (10, -9),
        "u" => (10, -6),
        "m" => (10, -3),
        "k" => (10, 3),
        "M" => (10, 6),
        "G" => (10, 9),
        "T" => (10, 12),
        "P" => (10, 15),
        "E" => (10, 18),
        _ => match suffix.strip_prefix(['e', 'E']) {
            Some(e) => match e.parse::<i32>() {
                Ok(e) if (-30..=30).contains(&e) => (10, e),
                _ => return bad("bad exponent"),
            },
            None => return bad("unknown suffix"),
        },
    };
    // value = mantissa * base^exp / 10^frac, rounded up.
    let mut num = mantissa;
    let mut den: u128 = 10u128.pow(frac.len() as u32);
    let scale = base.pow(exp.unsigned_abs());
    let scaled = if exp >= 0 {
        num.checked_mul(scale).map(|n| num = n)
    } else {
        den.checked_mul(scale).map(|d| den = d)
    };
    if scaled.is_none() {
        return bad("too large");
    }
    u64::try_from(num.div_ceil(den)).or_else(|_| bad("too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_value;

    #[test]
    fn quantities_parse_as_apimachinery_values() {
        for (s, v) in [
            ("0", 0),
            ("1", 1),
            ("1k", 1_000),
            ("10M", 10_000_000),
            ("1.5M", 1_500_000),
            ("1Ki", 1024),
            ("1.5Gi", 1_610_612_736),
            ("2P", 2_000_000_000_000_000),
            ("1e6", 1_000_000),
            ("1E3", 1_000),
            ("+5", 5),
            ("1500m", 2),
            ("1m", 1),
            ("0.5", 1),
            (".5k", 500),
        ] {
            assert_eq!(parse_value(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn bad_quantities_are_errors() {
        for s in [
            "", "k", "-1M", "1.2.3", "10X", "1Mi5", "1e", "1e99", "99E", "1 M",
        ] {
            assert!(parse_value(s).is_err(), "{s} parsed");
        }
    }
}
