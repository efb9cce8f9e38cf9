//! What DNS lists and sender authentication found for one transaction, as rule conditions read them
//! (`dnsbl = "zen"`, `uribl = "dbl"`, `spf = "fail"`, `dkim = "pass"`, `dmarc = "fail"`,
//! `dmarc_policy = "reject"`). The DNS list and sender-authentication stages fill it in
//! [`crate::pipeline::TxnContext::ext`]; the rules stage reads it at end of data.

/// The facts; every list empty when the stage did not run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthFacts {
    /// Names of the `dnsbl`, `dnswl` and `rhsbl` zones that listed the client, its HELO name, the
    /// envelope sender's or the From header's domain.
    pub dnsbl: Vec<String>,
    /// Names of the `uribl` zones that listed a URL domain of the body.
    pub uribl: Vec<String>,
    /// The SPF result of the MAIL FROM identity (RFC 8601 name).
    pub spf: Option<&'static str>,
    /// The SPF result of the HELO identity.
    pub spf_helo: Option<&'static str>,
    /// One result per DKIM signature; `["none"]` for an unsigned message.
    pub dkim: Vec<&'static str>,
    /// The DMARC result.
    pub dmarc: Option<&'static str>,
    /// The From domain's published policy (`none`, `quarantine`, `reject`) when DMARC was evaluated.
    pub dmarc_policy: Option<&'static str>,
    /// The ARC chain's result.
    pub arc: Option<&'static str>,
}

/// Which fact a condition reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKey {
    Dnsbl,
    Uribl,
    Spf,
    SpfHelo,
    Dkim,
    Dmarc,
    DmarcPolicy,
    Arc,
}

/// The RFC 8601 result names a `spf`/`dkim`/`dmarc`/`arc` condition may name.
const RESULTS: &[&str] = &["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"];
const POLICIES: &[&str] = &["none", "quarantine", "reject"];

impl AuthKey {
    /// Checks the values a condition names: result names must be known (a typo would never match).
    pub fn check(self, values: &[String]) -> Result<(), String> {
        let allowed = match self {
            AuthKey::Dnsbl | AuthKey::Uribl => return Ok(()),
            AuthKey::DmarcPolicy => POLICIES,
            _ => RESULTS,
        };
        match values.iter().find(|v| !allowed.contains(&v.to_ascii_lowercase().as_str())) {
            Some(v) => Err(format!("unknown result {v:?}: use one of {}", allowed.join(", "))),
            None if values.is_empty() => Err("empty list of results".into()),
            None => Ok(()),
        }
    }
}

impl AuthFacts {
    /// The values of one fact.
    pub fn values(&self, key: AuthKey) -> Vec<&str> {
        match key {
            AuthKey::Dnsbl => self.dnsbl.iter().map(String::as_str).collect(),
            AuthKey::Uribl => self.uribl.iter().map(String::as_str).collect(),
            AuthKey::Spf => self.spf.into_iter().collect(),
            AuthKey::SpfHelo => self.spf_helo.into_iter().collect(),
            AuthKey::Dkim => self.dkim.clone(),
            AuthKey::Dmarc => self.dmarc.into_iter().collect(),
            AuthKey::DmarcPolicy => self.dmarc_policy.into_iter().collect(),
            AuthKey::Arc => self.arc.into_iter().collect(),
        }
    }

    /// Whether the fact has any of `wanted` (ASCII case-insensitive).
    pub fn has(&self, key: AuthKey, wanted: &[String]) -> bool {
        self.values(key).iter().any(|v| wanted.iter().any(|w| w.eq_ignore_ascii_case(v)))
    }
}
