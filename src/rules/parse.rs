//! The rule file format (`rules/*.toml`): serde types, and errors that carry `file:line:col`.
//!
//! This is the syntax only; [`super::compile`] turns the parsed files into a [`super::RuleSet`]. Unknown
//! keys are errors (`deny_unknown_fields`), so a typo never silently disables a rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// One problem in a rule or list file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
    }
}

impl std::error::Error for RuleError {}

impl RuleError {
    /// An error at byte offset `at` of `text` (the file's contents).
    pub fn at(file: &Path, text: &str, at: usize, message: impl Into<String>) -> RuleError {
        let (line, col) = line_col(text, at);
        RuleError { file: file.to_owned(), line, col, message: message.into() }
    }

    /// An error with no position in a file (a missing file, an unreadable directory).
    pub fn file(file: &Path, message: impl Into<String>) -> RuleError {
        RuleError { file: file.to_owned(), line: 0, col: 0, message: message.into() }
    }
}

/// 1-based line and column of byte offset `at`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// One rule file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    #[serde(default, rename = "list")]
    pub lists: Vec<Spanned<ListSpec>>,
    pub scores: Option<ScoresSpec>,
    /// Behaviour limits (`super::limits`).
    #[serde(default, rename = "limit")]
    pub limits: Vec<super::limits::LimitSpec>,
    /// Greylisting (`super::limits`); at most one file may have it.
    pub greylist: Option<Spanned<super::limits::GreylistSpec>>,
}

/// `[scores]`: thresholds compared with a message's summed score at end of data.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoresSpec {
    pub tag_at: Option<f64>,
    pub reject_at: Option<f64>,
    /// Put in front of the Subject of a message that reaches `tag_at` (no rule's prefix applied).
    pub subject_prefix: Option<Spanned<String>>,
}

/// `[[rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across all files; a metric label and audit value.
    pub id: Spanned<String>,
    #[serde(default)]
    pub description: String,
    /// The condition tree.
    pub when: Spanned<CondSpec>,
    /// What a hit does; `score` is implied when only `score` is given.
    pub action: Option<Spanned<ActionKind>>,
    /// The reply for `reject`/`tempfail`, e.g. `"550 5.7.1 text"`.
    pub reply: Option<Spanned<String>>,
    /// Added to the message's score (`action = "score"`).
    pub score: Option<f64>,
    /// Headers a `tag` or `quarantine` hit adds.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// For `tag`: put in front of the relayed message's Subject (`"[SPAM] "`).
    pub subject_prefix: Option<Spanned<String>>,
    /// For `quarantine`: relay the message after keeping the copy (default false: discard it).
    #[serde(default)]
    pub deliver: bool,
}

/// `action = "..."`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Accept,
    Reject,
    Tempfail,
    Discard,
    Tag,
    Score,
    Quarantine,
}

impl ActionKind {
    /// A stable label for the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Accept => "accept",
            ActionKind::Reject => "reject",
            ActionKind::Tempfail => "tempfail",
            ActionKind::Discard => "discard",
            ActionKind::Tag => "tag",
            ActionKind::Score => "score",
            ActionKind::Quarantine => "quarantine",
        }
    }
}

/// A string (a regex) or a list of strings (exact entries).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StrOrList {
    One(String),
    Many(Vec<String>),
}

/// `header = { name = "...", regex = "..." }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    pub name: String,
    pub regex: String,
}

/// `in_list = "name"` or `in_list = { list = "name", field = "url_domain" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum InListSpec {
    Name(String),
    Full { list: String, field: Option<String> },
}

/// One node of a condition tree: exactly one key must be set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CondSpec {
    pub all: Option<Vec<Spanned<CondSpec>>>,
    pub any: Option<Vec<Spanned<CondSpec>>>,
    pub not: Option<Box<Spanned<CondSpec>>>,
    pub client_ip: Option<Vec<String>>,
    /// Regex on the client's forward-confirmed reverse DNS name (never matches when there is none).
    pub client_name: Option<String>,
    pub helo: Option<String>,
    pub mail_from: Option<StrOrList>,
    pub rcpt_to: Option<StrOrList>,
    pub auth_user: Option<StrOrList>,
    pub listener: Option<Vec<String>>,
    pub size_over: Option<u64>,
    pub header: Option<HeaderSpec>,
    pub subject: Option<String>,
    pub from_display_spoof: Option<bool>,
    pub body: Option<String>,
    pub url_domain: Option<StrOrList>,
    pub attachment_name: Option<String>,
    pub attachment_ext: Option<Vec<String>>,
    /// MIME types or `type/*`, matched against declared and sniffed attachment types.
    pub attachment_type: Option<Vec<String>>,
    /// Bytes; any attachment whose decoded size exceeds it.
    pub attachment_size_over: Option<u64>,
    /// A zip attachment whose entries could not all be listed.
    pub archive_unreadable: Option<bool>,
    /// A zip attachment with an encrypted entry.
    pub archive_encrypted: Option<bool>,
    pub mime_parts_over: Option<usize>,
    /// Nesting depth of multiparts and attached messages.
    pub mime_depth_over: Option<usize>,
    /// Literal words or phrases, whole-word and ASCII case-insensitive, in the decoded Subject.
    pub subject_words: Option<Vec<String>>,
    /// Literal words or phrases, whole-word and ASCII case-insensitive, in the decoded text parts.
    pub body_words: Option<Vec<String>>,
    pub missing_header: Option<String>,
    pub in_list: Option<InListSpec>,
}

/// `[[list]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSpec {
    pub name: String,
    pub kind: ListKind,
    /// Relative to the rules directory.
    pub file: PathBuf,
    /// Load into a bloom filter (for millions of entries); membership then has false positives.
    #[serde(default)]
    pub bloom: bool,
    /// The bloom filter's false-positive rate.
    pub fp_rate: Option<f64>,
}

/// What a list holds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Ip,
    Domain,
    Address,
    Hash,
}

/// Parses one rule file's text.
pub fn parse_file(path: &Path, text: &str) -> Result<FileSpec, RuleError> {
    toml::from_str::<FileSpec>(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        RuleError::at(path, text, at, e.message().trim_end().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_has_position() {
        let text = "[[rule]]\nid = \"a\"\nwhen = { helo = \"x\" }\nactoin = \"reject\"\n";
        let e = parse_file(Path::new("r.toml"), text).unwrap_err();
        assert_eq!((e.line, e.col), (4, 1), "{e}");
        assert!(e.message.contains("actoin"), "{e}");
    }

    #[test]
    fn nested_unknown_leaf_has_position() {
        let text =
            "[[rule]]\nid = \"a\"\nwhen = { all = [ { helo = \"x\" }, { hello = \"y\" } ] }\naction = \"reject\"\n";
        let e = parse_file(Path::new("r.toml"), text).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.col > 20, "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
    }
}
