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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::rules::eval::Facts;
    use crate::rules::{Phase, RuleSet};

    fn compile(text: &str) -> Result<RuleSet, Vec<String>> {
        RuleSet::from_texts(&[(PathBuf::from("t.toml"), text.to_string())], Path::new("."), &[])
            .map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn conditions_read_the_facts_at_end_of_data() {
        let set = compile(
            "[[rule]]\nid = \"d\"\nwhen = { all = [{ dmarc = \"fail\" }, { dmarc_policy = \"reject\" }] }\naction = \"reject\"\n\
             [[rule]]\nid = \"z\"\nwhen = { dnsbl = [\"zen\", \"other\"] }\nscore = 1.0\n\
             [[rule]]\nid = \"k\"\nwhen = { dkim = \"PASS\" }\nscore = -1.0\n",
        )
        .unwrap();
        let mut auth = AuthFacts { dmarc: Some("fail"), dmarc_policy: Some("reject"), ..Default::default() };
        let facts = |a: &AuthFacts| {
            let f = Facts {
                ip: "192.0.2.1".parse().unwrap(),
                client_name: None,
                listener: "mx",
                helo: None,
                auth_user: None,
                mail_from: None,
                rcpts: &[],
                size: 1,
                content: None,
                auth: None,
            };
            set.hits(Phase::Data, &Facts { auth: Some(a), ..f })
        };
        assert_eq!(facts(&auth), [0]);
        auth.dmarc_policy = Some("quarantine");
        auth.dnsbl = vec!["zen".into()];
        auth.dkim = vec!["fail", "pass"];
        assert_eq!(facts(&auth), [1, 2]);
    }

    #[test]
    fn unknown_results_are_refused_with_their_line() {
        let e = compile("[[rule]]\nid = \"s\"\nwhen = { spf = \"failed\" }\nscore = 1.0\n").unwrap_err();
        assert!(e[0].contains("t.toml:3") && e[0].contains("unknown result \"failed\""), "{e:?}");
        let e = compile("[[rule]]\nid = \"p\"\nwhen = { dmarc_policy = \"pass\" }\nscore = 1.0\n").unwrap_err();
        assert!(e[0].contains("quarantine"), "{e:?}");
    }
}
