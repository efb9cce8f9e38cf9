//! One user's sending baseline, kept as one small binary value in the store (at most ~700 bytes): hourly
//! averages of messages, recipients and distinct recipient domains (exponentially weighted), the current and
//! previous hour's counts, and the client networks the user sent from recently. Pure: no I/O, no clock of
//! its own.

use std::net::IpAddr;

use crate::config::AccountsConfig;

const HOUR_MS: u64 = 3_600_000;
/// Distinct recipient domains remembered per hour; past this the count saturates (far above any floor).
const MAX_DOMAINS: usize = 128;
/// Client networks remembered per user; the least recently used one goes first.
const MAX_NETS: usize = 8;
/// Encoding version (first byte).
const VERSION: u8 = 1;

/// Which measure broke out of the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Messages = 0,
    Recipients = 1,
    Domains = 2,
}

impl Measure {
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Messages => "messages",
            Measure::Recipients => "recipients",
            Measure::Domains => "recipient domains",
        }
    }
}

/// Why an account is to be suspended, with the numbers.
#[derive(Clone, Debug, PartialEq)]
pub enum Breach {
    /// The last hour's `recent` is above `limit` (from the hourly `average` and the floor).
    Rate { measure: Measure, recent: f64, average: f64, limit: f64 },
    /// `messages` within an hour from a network the user had never used.
    NewNetwork { network: String, messages: u32 },
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breach::Rate { measure, recent, average, limit } => write!(
                f,
                "{:.0} {} in the last hour, limit {limit:.0} (hourly average {average:.1})",
                recent,
                measure.as_str()
            ),
            Breach::NewNetwork { network, messages } => {
                write!(f, "{messages} messages within an hour from a network never used before ({network})")
            }
        }
    }
}

/// A client network the user sent from.
#[derive(Clone, Debug, PartialEq)]
struct Net {
    /// The network's address (IPv4 as mapped IPv6), masked to /24 or /64.
    addr: u128,
    first_ms: u64,
    last_ms: u64,
    /// Messages from it since it was first seen (saturating).
    messages: u32,
}

/// The baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    created_ms: u64,
    /// The hour (`ms / HOUR_MS`) `cur` counts.
    hour: u64,
    /// Hours folded into the averages (the first one sets them).
    hours: u32,
    avg: [f64; 3],
    cur: [u32; 3],
    prev: [u32; 3],
    /// FNV-1a hashes of this hour's recipient domains.
    domains: Vec<u32>,
    nets: Vec<Net>,
}

/// The network `ip` belongs to, as a number: IPv4 /24 (as a mapped IPv6 address), IPv6 /64.
pub fn network_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()) & !0xff,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()) & !0xff,
            None => u128::from(a) & (u128::MAX << 64),
        },
    }
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0193))
}

impl Profile {
    /// A new baseline, started now.
    pub fn new(now_ms: u64) -> Profile {
        Profile {
            created_ms: now_ms,
            hour: now_ms / HOUR_MS,
            hours: 0,
            avg: [0.0; 3],
            cur: [0; 3],
            prev: [0; 3],
            domains: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Moves to the hour of `now_ms`, folding the finished hours into the averages.
    fn roll(&mut self, now_ms: u64, cfg: &AccountsConfig) {
        let hour = now_ms / HOUR_MS;
        if hour <= self.hour {
            return;
        }
        let gap = hour - self.hour;
        let half_life_hours = (cfg.half_life.get().as_secs_f64() / 3600.0).max(1.0);
        let keep = 0.5f64.powf(1.0 / half_life_hours);
        for i in 0..3 {
            let c = f64::from(self.cur[i]);
            self.avg[i] = if self.hours == 0 { c } else { self.avg[i] * keep + c * (1.0 - keep) };
            // The empty hours in between weigh in as zeros.
            self.avg[i] *= keep.powf((gap - 1) as f64);
        }
        self.prev = if gap == 1 { self.cur } else { [0; 3] };
        self.cur = [0; 3];
        self.domains.clear();
        self.hours = self.hours.saturating_add(u32::try_from(gap).unwrap_or(u32::MAX));
        self.hour = hour;
    }

    /// Counts one message to `rcpts` from `ip` at `now_ms`, then judges the account.
    pub fn record(&mut self, now_ms: u64, ip: IpAddr, rcpts: &[String], cfg: &AccountsConfig) -> Option<Breach> {
        self.roll(now_ms, cfg);
        self.cur[0] = self.cur[0].saturating_add(1);
        self.cur[1] = self.cur[1].saturating_add(u32::try_from(rcpts.len()).unwrap_or(u32::MAX));
        for r in rcpts {
            let h = fnv1a(r.rsplit_once('@').map_or("", |(_, d)| d));
            if self.domains.len() < MAX_DOMAINS && !self.domains.contains(&h) {
                self.domains.push(h);
            }
        }
        self.cur[2] = self.domains.len() as u32;
        let net = self.see(network_of(ip), now_ms, cfg);
        self.judge(now_ms, net, ip, cfg)
    }

    /// Notes a message from network `addr`; returns its index.
    fn see(&mut self, addr: u128, now_ms: u64, cfg: &AccountsConfig) -> usize {
        let forget = cfg.keep_for.get().as_millis() as u64;
        self.nets.retain(|n| now_ms.saturating_sub(n.last_ms) < forget);
        let i = match self.nets.iter().position(|n| n.addr == addr) {
            Some(i) => i,
            None => {
                if self.nets.len() >= MAX_NETS {
                    if let Some(oldest) = self.nets.iter().enumerate().min_by_key(|(_, n)| n.last_ms).map(|(i, _)| i) {
                        self.nets.swap_remove(oldest);
                    }
                }
                self.nets.push(Net { addr, first_ms: now_ms, last_ms: now_ms, messages: 0 });
                self.nets.len() - 1
            }
        };
        let n = &mut self.nets[i];
        n.last_ms = now_ms;
        n.messages = n.messages.saturating_add(1);
        i
    }

    fn judge(&self, now_ms: u64, net: usize, ip: IpAddr, cfg: &AccountsConfig) -> Option<Breach> {
        let warm = now_ms.saturating_sub(self.created_ms) >= cfg.warmup.get().as_millis() as u64;
        let frac = (now_ms % HOUR_MS) as f64 / HOUR_MS as f64;
        let floors = [cfg.floor_messages, cfg.floor_recipients, cfg.floor_domains];
        for (i, measure) in [Measure::Messages, Measure::Recipients, Measure::Domains].into_iter().enumerate() {
            // The last hour, estimated from this hour and the share of the previous one still in it.
            let recent = f64::from(self.cur[i]) + f64::from(self.prev[i]) * (1.0 - frac);
            let floor = f64::from(floors[i]);
            let limit = if warm { floor.max(cfg.factor * self.avg[i]) } else { cfg.factor * floor };
            if recent > limit {
                return Some(Breach::Rate { measure, recent, average: self.avg[i], limit });
            }
        }
        let n = &self.nets[net];
        let new = now_ms.saturating_sub(n.first_ms) < HOUR_MS
            && n.first_ms.saturating_sub(self.created_ms) >= cfg.warmup.get().as_millis() as u64
            && self.nets.iter().any(|o| o.first_ms < n.first_ms);
        if warm && new && cfg.new_network_messages > 0 && n.messages > cfg.new_network_messages {
            let network = crate::rules::limits::network(ip, 24, 64);
            return Some(Breach::NewNetwork { network, messages: n.messages });
        }
        None
    }

    /// Forgets the current and previous hours (after an administrator resumed the account).
    pub fn forgive(&mut self) {
        self.cur = [0; 3];
        self.prev = [0; 3];
        self.domains.clear();
        for n in &mut self.nets {
            n.messages = 0;
        }
    }

    // === encoding ===

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + 4 * self.domains.len() + 36 * self.nets.len());
        b.push(VERSION);
        b.extend_from_slice(&self.created_ms.to_le_bytes());
        b.extend_from_slice(&self.hour.to_le_bytes());
        b.extend_from_slice(&self.hours.to_le_bytes());
        for i in 0..3 {
            b.extend_from_slice(&self.avg[i].to_le_bytes());
            b.extend_from_slice(&self.cur[i].to_le_bytes());
            b.extend_from_slice(&self.prev[i].to_le_bytes());
        }
        b.push(self.domains.len() as u8);
        for d in &self.domains {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.push(self.nets.len() as u8);
        for n in &self.nets {
            b.extend_from_slice(&n.addr.to_le_bytes());
            b.extend_from_slice(&n.first_ms.to_le_bytes());
            b.extend_from_slice(&n.last_ms.to_le_bytes());
            b.extend_from_slice(&n.messages.to_le_bytes());
        }
        b
    }

    /// Reads the stored form; `None` when it is not one (another version, a damaged value).
    pub fn decode(b: &[u8]) -> Option<Profile> {
        let mut r = Reader(b);
        if r.take::<1>()?[0] != VERSION {
            return None;
        }
        let created_ms = u64::from_le_bytes(r.take()?);
        let hour = u64::from_le_bytes(r.take()?);
        let hours = u32::from_le_bytes(r.take()?);
        let (mut avg, mut cur, mut prev) = ([0.0; 3], [0; 3], [0; 3]);
        for i in 0..3 {
            avg[i] = f64::from_le_bytes(r.take()?);
            cur[i] = u32::from_le_bytes(r.take()?);
            prev[i] = u32::from_le_bytes(r.take()?);
        }
        let nd = usize::from(r.take::<1>()?[0]).min(MAX_DOMAINS);
        let domains = (0..nd).map(|_| r.take().map(u32::from_le_bytes)).collect::<Option<Vec<_>>>()?;
        let nn = usize::from(r.take::<1>()?[0]).min(MAX_NETS);
        let mut nets = Vec::with_capacity(nn);
        for _ in 0..nn {
            let addr = u128::from_le_bytes(r.take()?);
            let first_ms = u64::from_le_bytes(r.take()?);
            let last_ms = u64::from_le_bytes(r.take()?);
            let messages = u32::from_le_bytes(r.take()?);
            nets.push(Net { addr, first_ms, last_ms, messages });
        }
        Some(Profile { created_ms, hour, hours, avg, cur, prev, domains, nets })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let cfg = AccountsConfig::default();
        let mut p = Profile::new(10 * HOUR_MS);
        let rcpts = vec!["a@one.example".to_string(), "b@two.example".to_string()];
        p.record(10 * HOUR_MS + 5, "192.0.2.1".parse().unwrap(), &rcpts, &cfg);
        p.record(12 * HOUR_MS, "2001:db8::1".parse().unwrap(), &rcpts, &cfg);
        assert_eq!(Profile::decode(&p.encode()), Some(p.clone()));
        assert_eq!(Profile::decode(&p.encode()[..20]), None);
        assert_eq!(Profile::decode(b"\x02rest"), None);
    }
}
