//! The DNS and sender-authentication metric families: their names, closed label sets and helpers.
//! Zone labels are the `[[dns.zone]]` names from the configuration, a closed set.

use metrics::counter;

/// Blocklist queries, by zone (configured name) and result.
pub const DNS_QUERIES_TOTAL: &str = "moat_dns_queries_total";
/// Lookups answered from moat's DNS cache or not, by cache.
pub const DNS_CACHE_TOTAL: &str = "moat_dns_cache_total";
/// SPF, DKIM, DMARC and ARC results, by method and result.
pub const SENDER_AUTH_TOTAL: &str = "moat_sender_auth_total";
/// Submissions moat DKIM-signed or could not sign, by result.
pub const DKIM_SIGNED_TOTAL: &str = "moat_dkim_signed_total";

/// Declares a closed label set with its values.
macro_rules! labels {
    ($(#[$m:meta])* $name:ident { $($v:ident => $l:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($v,)+ }
        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $l,)+ }
            }
        }
    };
}

labels! {
    /// `result` of [`DNS_QUERIES_TOTAL`].
    DnsResult {
        Listed => "listed",
        NotListed => "not_listed",
        Refused => "refused",
        Timeout => "timeout",
        Error => "error",
    }
}

labels! {
    /// `cache` of [`DNS_CACHE_TOTAL`].
    DnsCacheKind {
        Dnsbl => "dnsbl",
        Txt => "txt",
        Mx => "mx",
        A => "a",
        Aaaa => "aaaa",
        Ptr => "ptr",
    }
}

labels! {
    /// `method` of [`SENDER_AUTH_TOTAL`].
    AuthMethod {
        Spf => "spf",
        Dkim => "dkim",
        Dmarc => "dmarc",
        Arc => "arc",
    }
}

labels! {
    /// `result` of [`SENDER_AUTH_TOTAL`] (RFC 8601 result names).
    AuthOutcome {
        Pass => "pass",
        Fail => "fail",
        SoftFail => "softfail",
        Neutral => "neutral",
        None => "none",
        TempError => "temperror",
        PermError => "permerror",
        Policy => "policy",
    }
}

labels! {
    /// `result` of [`DKIM_SIGNED_TOTAL`].
    SignResult {
        Signed => "signed",
        NoKey => "no_key",
        Error => "error",
    }
}

impl AuthOutcome {
    /// From an RFC 8601 result name; unknown names count as `none`.
    pub fn from_name(s: &str) -> AuthOutcome {
        AuthOutcome::ALL.iter().copied().find(|o| o.as_str() == s).unwrap_or(AuthOutcome::None)
    }
}

/// Starts the closed-label series at 0.
pub(super) fn initialise() {
    for &c in DnsCacheKind::ALL {
        counter!(DNS_CACHE_TOTAL, "cache" => c.as_str(), "result" => "hit").absolute(0);
        counter!(DNS_CACHE_TOTAL, "cache" => c.as_str(), "result" => "miss").absolute(0);
    }
    for &m in AuthMethod::ALL {
        for &r in AuthOutcome::ALL {
            counter!(SENDER_AUTH_TOTAL, "method" => m.as_str(), "result" => r.as_str()).absolute(0);
        }
    }
    for &r in SignResult::ALL {
        counter!(DKIM_SIGNED_TOTAL, "result" => r.as_str()).absolute(0);
    }
}

/// Counts one blocklist query of the zone named `zone` (a configured name).
pub fn dns_query(zone: &str, result: DnsResult) {
    counter!(DNS_QUERIES_TOTAL, "zone" => zone.to_owned(), "result" => result.as_str()).increment(1);
}

/// Counts a cache lookup.
pub fn dns_cache(cache: DnsCacheKind, hit: bool) {
    counter!(DNS_CACHE_TOTAL, "cache" => cache.as_str(), "result" => if hit { "hit" } else { "miss" }).increment(1);
}

/// Counts one SPF/DKIM/DMARC/ARC result.
pub fn sender_auth(method: AuthMethod, result: AuthOutcome) {
    counter!(SENDER_AUTH_TOTAL, "method" => method.as_str(), "result" => result.as_str()).increment(1);
}

/// Counts a signing attempt.
pub fn dkim_signed(result: SignResult) {
    counter!(DKIM_SIGNED_TOTAL, "result" => result.as_str()).increment(1);
}
