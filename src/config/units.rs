//! Values with units in the configuration: sizes (`"50MiB"`) and durations (`"30s"`).
//!
//! Both deserialize from strings (or plain integers: bytes and seconds) so a config file always says
//! what it means.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A size in bytes, written `"512"`, `"64KiB"`, `"50MiB"`, `"1GiB"` (also `KB`/`MB`/`GB` as powers of 1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses a size with an optional unit suffix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"50MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration, written `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"` (a bare number means seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parses a duration with a unit suffix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
        };
        Ok(Span(d))
    }
}

impl From<Duration> for Span {
    fn from(d: Duration) -> Self {
        Span(d)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                u64::try_from(v)
                    .map(|v| Span(Duration::from_secs(v)))
                    .map_err(|_| E::custom("duration must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                Span::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A span of whole seconds (for defaults).
pub(crate) fn secs(n: u64) -> Span {
    Span(Duration::from_secs(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("512").unwrap().0, 512);
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("50MiB").unwrap().0, 50 << 20);
        assert_eq!(ByteSize::parse("2MB").unwrap().0, 2_000_000);
        assert!(ByteSize::parse("12XB").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(Span::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Span::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(Span::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Span::parse("7").unwrap().0, Duration::from_secs(7));
        assert!(Span::parse("5 weeks").is_err());
    }
}
