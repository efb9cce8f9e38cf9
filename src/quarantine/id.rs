//! Quarantine item ids and UTC calendar dates (for ids, sidecars and the archive's day folders).
//!
//! An id is `YYYYMMDDTHHMMSSZ-<instance>-<pid>-<16 hex digits>`: the time makes a listing sort by age,
//! the instance name (the configured host name) and process id keep two moat processes sharing one
//! directory apart, and 64 random bits keep ids of one process in one second apart. The store also
//! refuses to replace an existing item (it links, never renames over), so even a collision loses nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest id accepted from a command line.
const MAX_ID_LEN: usize = 200;

/// A new id for an item stored at `now` by `instance`.
pub fn new_id(instance: &str, now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, mo, d, h, mi, s) = utc(secs);
    let host: String =
        instance.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).take(64).collect();
    let host = if host.is_empty() { "moat".to_string() } else { host };
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{host}-{}-{:016x}", std::process::id(), random_u64())
}

/// Whether `id` can name an item: the characters ids are made of, no path separator, not empty.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// 64 random bits from the system's generator; if that fails, the time and a counter (still unique within
/// this process, and the pid separates processes).
fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (u64::from(nanos) << 32) ^ SEQ.fetch_add(1, Ordering::Relaxed)
}

/// (year, month, day, hour, minute, second) in UTC of Unix time `secs` (proleptic Gregorian calendar;
/// Howard Hinnant's `civil_from_days`).
pub fn utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// RFC 3339 UTC time of Unix time `secs`, e.g. `2026-12-04T15:48:35Z`.
pub fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_399_315), "2026-12-04T15:48:35Z");
    }

    #[test]
    fn ids_are_valid_sortable_and_distinct() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_399_315);
        let a = new_id("mx1.example.org", t);
        let b = new_id("mx1.example.org", t);
        assert!(a.starts_with("20261204T154835Z-mx1.example.org-"), "{a}");
        assert_ne!(a, b);
        assert!(is_valid(&a) && is_valid(&new_id("bad/host name", t)));
        for bad in ["", "../x", "a/b", ".hidden", "x y", &"a".repeat(201)] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
