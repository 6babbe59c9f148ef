//! Pure helpers for agentctl's human output and argument checks: relative and wall-clock
//! times, tables, shell-like quoting, sizes, signal names.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (the API's time unit).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A span in the two largest units, rounded down: "0s", "45s", "3m12s", "2h05m", "3d04h".
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// How long ago `then_ms` was (a time in the future counts as "0s").
pub fn age(then_ms: u64, now_ms: u64) -> String {
    span(now_ms.saturating_sub(then_ms))
}

/// How long until `then_ms`; a time already past is "-" and the overrun ("-3s").
pub fn until(then_ms: u64, now_ms: u64) -> String {
    if then_ms >= now_ms {
        span(then_ms - now_ms)
    } else {
        format!("-{}", span(now_ms - then_ms))
    }
}

/// A wall-clock time in the local time zone: "2026-11-26 08:34:12.123".
pub fn clock(ms: u64) -> String {
    clock_at_offset(ms, local_offset_secs(ms))
}

/// The local time zone's offset from UTC at `ms`, in seconds (0 if unknown).
fn local_offset_secs(ms: u64) -> i64 {
    let t = (ms / 1000) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own; an all-zero tm is valid.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            0
        } else {
            tm.tm_gmtoff
        }
    }
}

/// `ms` since the epoch shifted by `offset_secs`, as "YYYY-MM-DD HH:MM:SS.mmm".
pub fn clock_at_offset(ms: u64, offset_secs: i64) -> String {
    let total = (ms / 1000) as i64 + offset_secs;
    let (days, secs) = (total.div_euclid(86400), total.rem_euclid(86400));
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A byte count in binary units: "512B", "1.5KiB", "2.0GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// A command line as a shell would read it back: words with anything but
/// `[A-Za-z0-9_@%+=:,./-]` go in single quotes.
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// Signal names as the kernel numbers them on x86-64 and arm64 (1..=31).
const SIGNALS: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// Checks a signal given as a name ("TERM", "sigterm", "SIGTERM") or a number ("15",
/// up to 64 for real-time signals) and returns what to send the daemon: the bare upper-case
/// name for a known signal, else the number.
pub fn parse_signal(text: &str) -> Result<String, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<u32>() {
        return match n {
            1..=31 => Ok(SIGNALS[n as usize - 1].to_string()),
            32..=64 => Ok(n.to_string()),
            _ => Err(format!("no signal number {n} (1-64)")),
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let name = match name {
        "IOT" => "ABRT",
        "POLL" => "IO",
        "CLD" => "CHLD",
        other => other,
    };
    if SIGNALS.contains(&name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "unknown signal \"{text}\" (a name like TERM, INT, KILL, HUP, or a number)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(999), "0s");
        assert_eq!(span(45_000), "45s");
        assert_eq!(span(192_000), "3m12s");
        assert_eq!(span(2 * 3_600_000 + 5 * 60_000 + 7_000), "2h05m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(age(10_000, 70_000), "1m00s");
        assert_eq!(age(80_000, 70_000), "0s");
        assert_eq!(until(100_000, 70_000), "30s");
        assert_eq!(until(67_000, 70_000), "-3s");
    }

    #[test]
    fn clocks() {
        assert_eq!(clock_at_offset(0, 0), "1970-01-01 00:00:00.000");
        // 2024-02-29 23:59:59.5 UTC (a leap day).
        assert_eq!(
            clock_at_offset(1_709_251_199_500, 0),
            "2024-02-29 23:59:59.500"
        );
        // One hour east of UTC crosses midnight into March.
        assert_eq!(
            clock_at_offset(1_709_251_199_500, 3600),
            "2024-03-01 00:59:59.500"
        );
        assert_eq!(
            clock_at_offset(1_764_145_452_123, -5 * 3600),
            "2025-11-26 03:24:12.123"
        );
        assert_eq!(clock(0).len(), "1970-01-01 00:00:00.000".len());
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(2 << 30), "2.0GiB");
    }

    #[test]
    fn quoting() {
        let words: Vec<String> = ["sh", "-c", "echo 'hi' $X", "", "a=b/c.d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            shell_join(&words),
            r#"sh -c 'echo '\''hi'\'' $X' '' a=b/c.d"#
        );
    }

    #[test]
    fn tables() {
        let rows = vec![
            vec!["abc".to_string(), "running".to_string(), "x".to_string()],
            vec!["d".to_string(), "exited".to_string(), "y z".to_string()],
        ];
        assert_eq!(
            table(&["ID", "STATE", "COMMAND"], &rows),
            "ID   STATE    COMMAND\nabc  running  x\nd    exited   y z\n"
        );
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), "TERM");
        assert_eq!(parse_signal("sigint").unwrap(), "INT");
        assert_eq!(parse_signal("SIGKILL").unwrap(), "KILL");
        assert_eq!(parse_signal("9").unwrap(), "KILL");
        assert_eq!(parse_signal("1").unwrap(), "HUP");
        assert_eq!(parse_signal("34").unwrap(), "34");
        assert_eq!(parse_signal("iot").unwrap(), "ABRT");
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(
            parse_signal("SIGFOO")
                .unwrap_err()
                .contains("unknown signal")
        );
    }
}
