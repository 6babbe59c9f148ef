//! Human units in policies and flags: sizes ("512M", "2GiB", 1048576) and durations
//! ("30s", "10m", "1h30m", "250ms"). Parsing returns a plain message; the caller adds the
//! file, line and key.

use std::time::Duration;

/// Parses a size in bytes: a bare integer, or a number with K, M, G or T (powers of
/// 1024; "KiB", "MB", "k" are accepted the same way, since memory limits are page-based).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "expected a size like \"512M\" or \"2G\", got \"{text}\""
        ));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "expected a size like \"512M\" or \"2G\" (units K, M, G, T), got unit \"{other}\""
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a size like \"512M\" or \"2G\", got \"{text}\""))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("size \"{text}\" is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses a duration: a sequence of number+unit pairs (ms, s, m, h, d), or a bare number
/// of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(
            "expected a duration like \"30s\", \"10m\" or \"1h\", got an empty string".into(),
        );
    }
    if let Ok(secs) = t.parse::<f64>() {
        return seconds(secs, text);
    }
    let mut total = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let unit_end = rest[num_end..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| num_end + i);
        let number: f64 = rest[..num_end].parse().map_err(|_| {
            format!("expected a duration like \"30s\", \"10m\" or \"1h30m\", got \"{text}\"")
        })?;
        let scale = match &rest[num_end..unit_end] {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            unit => {
                return Err(format!(
                    "unknown duration unit \"{unit}\" in \"{text}\" (use ms, s, m, h, d)"
                ));
            }
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    seconds(total, text)
}

fn seconds(secs: f64, text: &str) -> Result<Duration, String> {
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration \"{text}\" is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12X").unwrap_err().contains("unit \"x\""));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(
            parse_duration("5y")
                .unwrap_err()
                .contains("unknown duration unit")
        );
    }
}
