//! Which stored items expire: those older than the retention, then the oldest until the rest fits the
//! disk budget. Pure, shared by the quarantine store and the archive directory.

use crate::metrics::ExpiryReason;

/// One stored item, as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When it was stored, Unix seconds, and the nanoseconds within that second (orders items stored in
    /// one second).
    pub time: u64,
    pub nanos: u32,
    /// The bytes it takes.
    pub bytes: u64,
}

/// The limits: `max_age` in seconds and `max_bytes`; 0 means no limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub max_age: u64,
    pub max_bytes: u64,
}

/// The indices of `entries` to remove at Unix time `now`, each with its reason, oldest first.
pub fn plan(entries: &[Entry], now: u64, limits: Limits) -> Vec<(usize, ExpiryReason)> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| (entries[i].time, entries[i].nanos));
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut out = Vec::new();
    for i in order {
        let e = entries[i];
        let reason = if limits.max_age > 0 && now.saturating_sub(e.time) > limits.max_age {
            ExpiryReason::Age
        } else if limits.max_bytes > 0 && total > limits.max_bytes {
            ExpiryReason::Budget
        } else {
            break;
        };
        total -= e.bytes;
        out.push((i, reason));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_then_budget_oldest_first() {
        let e = |time, bytes| Entry { time, nanos: 0, bytes };
        let entries = [e(300, 10), e(100, 10), e(200, 10), e(400, 10)];
        let none = plan(&entries, 1000, Limits::default());
        assert!(none.is_empty());
        let aged = plan(&entries, 1000, Limits { max_age: 750, max_bytes: 0 });
        assert_eq!(aged, [(1, ExpiryReason::Age), (2, ExpiryReason::Age)]);
        let both = plan(&entries, 1000, Limits { max_age: 850, max_bytes: 15 });
        assert_eq!(both, [(1, ExpiryReason::Age), (2, ExpiryReason::Budget), (0, ExpiryReason::Budget)]);
        assert_eq!(plan(&entries, 1000, Limits { max_age: 0, max_bytes: 40 }), []);
    }
}
