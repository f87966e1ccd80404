//! Bandwidth rates on the command line (`outrelay leases limit --rate 200Mbit`).
//!
//! A RATE is a number (decimal fraction allowed) and a unit, per second:
//! - bits, decimal: `bit`, `kbit`, `Mbit`, `Gbit`, `Tbit` (`Mbit` = 10^6 bit = 125 000 bytes);
//! - bytes, decimal: `B`, `kB`, `MB`, `GB`, `TB`; binary: `KiB`, `MiB`, `GiB`, `TiB`;
//! - no unit: bytes;
//! - `0` or `unlimited`: no limit.
//!
//! An optional `/s` or `ps` after the unit is accepted (`200Mbit/s`, `200Mbps`). The result is
//! bytes per second, rounded down; a rate that is not 0 but rounds down to 0 is refused (0 means
//! no limit).

/// Why a RATE was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    /// Nothing given.
    #[error("empty rate")]
    Empty,
    /// The number part is not a decimal number.
    #[error("`{0}` is not a number (e.g. 200Mbit, 1.5Gbit, 50MB, 1000000)")]
    Number(String),
    /// An unknown unit.
    #[error(
        "unknown unit `{0}` (bit, kbit, Mbit, Gbit, Tbit, B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    )]
    Unit(String),
    /// Below one byte per second but not 0.
    #[error("below 1 byte per second (use 0 or `unlimited` for no limit)")]
    TooSmall,
    /// Beyond u64 bytes per second.
    #[error("too large")]
    TooLarge,
}

/// Parses a RATE into bytes per second (0 = unlimited).
///
/// # Errors
/// [`RateError`].
pub fn parse_bytes_per_s(text: &str) -> Result<u64, RateError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(RateError::Empty);
    }
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(RateError::Number(t.to_owned()));
    }
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("ps"))
        .unwrap_or(unit);
    // (multiplier, divisor): bytes per second = number * multiplier / divisor.
    let (mul, div): (u128, u128) = match unit {
        "" | "B" => (1, 1),
        "kB" | "KB" => (1_000, 1),
        "MB" => (1_000_000, 1),
        "GB" => (1_000_000_000, 1),
        "TB" => (1_000_000_000_000, 1),
        "KiB" => (1 << 10, 1),
        "MiB" => (1 << 20, 1),
        "GiB" => (1 << 30, 1),
        "TiB" => (1 << 40, 1),
        "b" | "bit" => (1, 8),
        "kbit" | "Kbit" | "kb" | "Kb" => (1_000, 8),
        "Mbit" | "mbit" | "Mb" => (1_000_000, 8),
        "Gbit" | "gbit" | "Gb" => (1_000_000_000, 8),
        "Tbit" | "tbit" | "Tb" => (1_000_000_000_000, 8),
        other => return Err(RateError::Unit(other.to_owned())),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && frac.is_empty())
        || frac.contains('.')
        || frac.len() > 18
        || whole.len() > 30
    {
        return Err(RateError::Number(number.to_owned()));
    }
    let digits = |s: &str| -> Result<u128, RateError> {
        if s.is_empty() {
            return Ok(0);
        }
        s.parse::<u128>()
            .map_err(|_| RateError::Number(number.to_owned()))
    };
    let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(0));
    let fixed = digits(whole)?
        .checked_mul(scale)
        .and_then(|w| w.checked_add(digits(frac).ok()?))
        .ok_or(RateError::TooLarge)?;
    let bytes = fixed
        .checked_mul(mul)
        .ok_or(RateError::TooLarge)?
        .checked_div(scale * div)
        .ok_or(RateError::TooLarge)?;
    if bytes == 0 && fixed != 0 {
        return Err(RateError::TooSmall);
    }
    u64::try_from(bytes).map_err(|_| RateError::TooLarge)
}

/// A rate for people: the largest decimal bit unit it is a whole number of tenths of, then the
/// exact bytes per second (`200 Mbit/s (25000000 B/s)`); 0 is `unlimited`.
pub fn show(bytes_per_s: u64) -> String {
    if bytes_per_s == 0 {
        return "unlimited".to_owned();
    }
    let bits = u128::from(bytes_per_s) * 8;
    let (value, unit) = [
        (1_000_000_000_000u128, "Tbit/s"),
        (1_000_000_000, "Gbit/s"),
        (1_000_000, "Mbit/s"),
        (1_000, "kbit/s"),
    ]
    .into_iter()
    .find(|(u, _)| bits >= *u)
    .unwrap_or((1, "bit/s"));
    let tenths = bits * 10 / value;
    let human = if tenths % 10 == 0 {
        format!("{} {unit}", tenths / 10)
    } else {
        format!("{}.{} {unit}", tenths / 10, tenths % 10)
    };
    format!("{human} ({bytes_per_s} B/s)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_decimal_and_become_bytes() {
        assert_eq!(parse_bytes_per_s("200Mbit"), Ok(25_000_000));
        assert_eq!(parse_bytes_per_s("1.5Gbit"), Ok(187_500_000));
        assert_eq!(parse_bytes_per_s("10Gbit"), Ok(1_250_000_000));
        assert_eq!(parse_bytes_per_s("10Mbit/s"), Ok(1_250_000));
        assert_eq!(parse_bytes_per_s("10Mbps"), Ok(1_250_000));
        assert_eq!(parse_bytes_per_s("8kbit"), Ok(1_000));
        assert_eq!(parse_bytes_per_s("1Tbit"), Ok(125_000_000_000));
        assert_eq!(parse_bytes_per_s("8bit"), Ok(1));
    }

    #[test]
    fn bytes_plain_decimal_and_binary() {
        assert_eq!(parse_bytes_per_s("50MB"), Ok(50_000_000));
        assert_eq!(parse_bytes_per_s("1000000"), Ok(1_000_000));
        assert_eq!(parse_bytes_per_s("1000000B"), Ok(1_000_000));
        assert_eq!(parse_bytes_per_s("2kB"), Ok(2_000));
        assert_eq!(parse_bytes_per_s("1MiB"), Ok(1_048_576));
        assert_eq!(parse_bytes_per_s("0.5GB"), Ok(500_000_000));
        assert_eq!(parse_bytes_per_s(" 3 MB "), Ok(3_000_000));
    }

    #[test]
    fn zero_and_unlimited_mean_no_limit() {
        assert_eq!(parse_bytes_per_s("0"), Ok(0));
        assert_eq!(parse_bytes_per_s("0Mbit"), Ok(0));
        assert_eq!(parse_bytes_per_s("unlimited"), Ok(0));
        assert_eq!(parse_bytes_per_s("Unlimited"), Ok(0));
    }

    #[test]
    fn bad_rates_are_refused_with_a_reason() {
        assert_eq!(parse_bytes_per_s(""), Err(RateError::Empty));
        assert_eq!(
            parse_bytes_per_s("fast"),
            Err(RateError::Number("fast".into()))
        );
        assert_eq!(
            parse_bytes_per_s("200Mbyte"),
            Err(RateError::Unit("Mbyte".into()))
        );
        assert_eq!(parse_bytes_per_s("10mB"), Err(RateError::Unit("mB".into())));
        assert_eq!(
            parse_bytes_per_s("1.2.3Mbit"),
            Err(RateError::Number("1.2.3".into()))
        );
        assert_eq!(parse_bytes_per_s("."), Err(RateError::Number(".".into())));
        assert_eq!(
            parse_bytes_per_s("-5MB"),
            Err(RateError::Number("-5MB".into()))
        );
        assert_eq!(parse_bytes_per_s("4bit"), Err(RateError::TooSmall));
        assert_eq!(
            parse_bytes_per_s("99999999999999999999TB"),
            Err(RateError::TooLarge)
        );
    }

    #[test]
    fn show_is_readable_and_exact() {
        assert_eq!(show(0), "unlimited");
        assert_eq!(show(25_000_000), "200 Mbit/s (25000000 B/s)");
        assert_eq!(show(187_500_000), "1.5 Gbit/s (187500000 B/s)");
        assert_eq!(show(1), "8 bit/s (1 B/s)");
    }
}
