//! Timestamps as text, written straight into a caller's buffer: RFC 3339 in UTC with milliseconds (audit
//! records) and the RFC 5322 date of the `Received` header. Both run once or twice per relayed message, so
//! they write their digits by hand instead of going through `format!` and its machinery, and allocate nothing.
//!
//! Times before 1970 are clamped to the epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// A point in time split into its calendar fields (UTC, proleptic Gregorian).
struct Civil {
    /// Days since 1970-01-01.
    days: u64,
    year: u64,
    month: u64,
    day: u64,
    /// Seconds into the day.
    secs: u64,
    millis: u32,
}

impl Civil {
    fn of(t: SystemTime) -> Civil {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let secs = since.as_secs();
        let days = secs / 86_400;
        let (year, month, day) = civil_from_days(days);
        Civil { days, year, month, day, secs: secs % 86_400, millis: since.subsec_millis() }
    }

    /// `hh:mm:ss`.
    fn push_time(&self, out: &mut String) {
        push2(out, self.secs / 3600);
        out.push(':');
        push2(out, self.secs % 3600 / 60);
        out.push(':');
        push2(out, self.secs % 60);
    }
}

/// Appends `t` as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T09:03:07.250Z`.
pub fn push_rfc3339(out: &mut String, t: SystemTime) {
    let c = Civil::of(t);
    push_year(out, c.year);
    out.push('-');
    push2(out, c.month);
    out.push('-');
    push2(out, c.day);
    out.push('T');
    c.push_time(out);
    out.push('.');
    push_digit(out, u64::from(c.millis) / 100);
    push2(out, u64::from(c.millis) % 100);
    out.push('Z');
}

/// Appends `t` as an RFC 5322 date in UTC (section 3.3), e.g. `Sun, 29 Nov 2026 05:13:21 +0000`.
pub fn push_rfc5322(out: &mut String, t: SystemTime) {
    let c = Civil::of(t);
    out.push_str(WEEKDAYS[(c.days % 7) as usize]);
    out.push_str(", ");
    push2(out, c.day);
    out.push(' ');
    // `month` is 1..=12 by construction (civil_from_days).
    out.push_str(MONTHS[(c.month - 1) as usize % 12]);
    out.push(' ');
    push_year(out, c.year);
    out.push(' ');
    c.push_time(out);
    out.push_str(" +0000");
}

/// The year with at least four digits.
fn push_year(out: &mut String, year: u64) {
    if year >= 10_000 {
        push_year(out, year / 10);
        push_digit(out, year % 10);
        return;
    }
    push2(out, year / 100);
    push2(out, year % 100);
}

/// Two digits of `n` (below 100).
fn push2(out: &mut String, n: u64) {
    push_digit(out, n / 10 % 10);
    push_digit(out, n % 10);
}

fn push_digit(out: &mut String, d: u64) {
    out.push(char::from(b'0' + (d % 10) as u8));
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The `format!`-based RFC 3339 writer this module replaced, kept as the oracle.
    fn old_rfc3339(t: SystemTime) -> String {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since.subsec_millis()
        )
    }

    /// The httpdate-based RFC 5322 date this module replaced, kept as the oracle.
    fn old_rfc5322(t: SystemTime) -> String {
        let s = httpdate::fmt_http_date(t);
        s.strip_suffix(" GMT").map(|d| format!("{d} +0000")).unwrap_or(s)
    }

    fn rfc3339(t: SystemTime) -> String {
        let mut s = String::new();
        push_rfc3339(&mut s, t);
        s
    }

    fn rfc5322(t: SystemTime) -> String {
        let mut s = String::new();
        push_rfc5322(&mut s, t);
        s
    }

    /// The last second httpdate can format (9999-12-31T23:59:59).
    const LAST_HTTPDATE: u64 = 253_402_300_799;

    #[test]
    fn known_dates() {
        let at = |ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc5322(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322(UNIX_EPOCH + Duration::from_secs(1_796_015_601)), "Mon, 30 Nov 2026 05:13:21 +0000");
        let far = UNIX_EPOCH + Duration::from_secs(LAST_HTTPDATE + 1);
        assert_eq!(rfc3339(far), old_rfc3339(far), "five-digit years");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn rfc3339_matches_format(ms in 0u64..(LAST_HTTPDATE + 1) * 1000 * 20) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            prop_assert_eq!(rfc3339(t), old_rfc3339(t));
        }

        #[test]
        fn rfc3339_matches_format_near_now(ms in 1_700_000_000_000u64..2_200_000_000_000, nanos in 0u32..1_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_nanos(u64::from(nanos));
            prop_assert_eq!(rfc3339(t), old_rfc3339(t));
        }

        #[test]
        fn rfc5322_matches_httpdate(secs in 0u64..=LAST_HTTPDATE, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            prop_assert_eq!(rfc5322(t), old_rfc5322(t));
        }

        #[test]
        fn rfc5322_matches_httpdate_near_now(secs in 1_700_000_000u64..2_200_000_000) {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            prop_assert_eq!(rfc5322(t), old_rfc5322(t));
        }
    }
}
