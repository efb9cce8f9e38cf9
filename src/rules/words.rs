//! Literal word lists (`body_words`, `subject_words`): every word of every rule of one field in ONE
//! Aho-Corasick automaton, so the cost of a field is one pass over its text whatever the number of rules,
//! like the per-field regex sets of [`super::compile`].
//!
//! Matching is whole-word and ASCII case-insensitive, and any run of whitespace in the text or in a word
//! counts as one space, so `"wire transfer"` also finds `Wire\r\n  Transfer` in a wrapped body. The
//! automaton is driven byte by byte over the text as it is, so no normalized copy of a body is made.

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::{dfa, nfa::contiguous, Anchored, MatchKind, PatternID};

/// The longest word or phrase accepted, in bytes. Phrases are short; the cap bounds the look-behind
/// buffer of the scan (and refuses an entry that is surely a paste error).
pub const MAX_WORD_LEN: usize = 256;

/// Up to this many pattern bytes a DFA is built (fastest, but its memory grows with states × byte
/// classes); past it the contiguous NFA (a few times smaller, somewhat slower). aho-corasick's own
/// automatic choice switches at 100 patterns; counting bytes tracks the real size better.
const DFA_MAX_BYTES: usize = 20_000;

/// The automaton of one field.
#[derive(Debug)]
enum Machine {
    Dfa(dfa::DFA),
    Nfa(contiguous::NFA),
}

/// The compiled words of one field.
#[derive(Debug)]
pub struct WordSet {
    machine: Machine,
    /// Per pattern: whether its first and last bytes are word characters, i.e. whether a boundary is
    /// required before and after it (a word like `$$$` needs none).
    edges: Vec<(bool, bool)>,
}

/// Whether `b` is part of a word: ASCII letters and digits. Everything else, including every non-ASCII
/// byte, separates words.
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// A word as it is matched: trimmed, inner whitespace runs made one space; an error if empty or too long.
pub fn normalize(word: &str) -> Result<String, String> {
    let w = word.split_ascii_whitespace().collect::<Vec<_>>().join(" ");
    if w.is_empty() {
        return Err("a word list entry is empty".into());
    }
    if w.len() > MAX_WORD_LEN {
        return Err(format!("word list entry longer than {MAX_WORD_LEN} bytes: {:.40}...", w));
    }
    Ok(w)
}

impl WordSet {
    /// Builds the automaton of normalized, distinct `words` (see [`normalize`]); pattern `i` is `words[i]`.
    pub fn new(words: &[String]) -> Result<WordSet, String> {
        if let Some(w) = words.iter().find(|w| w.is_empty() || w.len() > MAX_WORD_LEN) {
            return Err(format!("word list entry empty or longer than {MAX_WORD_LEN} bytes: {:.40}", w));
        }
        let bytes: usize = words.iter().map(String::len).sum();
        let machine = if bytes <= DFA_MAX_BYTES {
            dfa::DFA::builder()
                .match_kind(MatchKind::Standard)
                .ascii_case_insensitive(true)
                .build(words)
                .map(Machine::Dfa)
        } else {
            contiguous::NFA::builder()
                .match_kind(MatchKind::Standard)
                .ascii_case_insensitive(true)
                .build(words)
                .map(Machine::Nfa)
        }
        .map_err(|e| format!("word list too large: {e}"))?;
        let edges = words
            .iter()
            .map(|w| {
                let b = w.as_bytes();
                (b.first().copied().is_some_and(is_word_byte), b.last().copied().is_some_and(is_word_byte))
            })
            .collect();
        Ok(WordSet { machine, edges })
    }

    /// The number of patterns.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Marks in `found` (one flag per pattern) every word that occurs in any of `texts`.
    pub fn scan<'t>(&self, texts: impl IntoIterator<Item = &'t str>) -> Vec<bool> {
        let mut found = vec![false; self.edges.len()];
        for t in texts {
            match &self.machine {
                Machine::Dfa(a) => Scan::new(a, &self.edges, &mut found).run(t.as_bytes()),
                Machine::Nfa(a) => Scan::new(a, &self.edges, &mut found).run(t.as_bytes()),
            }
            if found.iter().all(|&f| f) {
                break;
            }
        }
        found
    }
}

/// The look-behind kept while scanning: at least the longest pattern plus the byte before it, rounded
/// to a power of two so the ring index is a mask, not a division (about 10% faster scans).
const BEHIND: usize = (MAX_WORD_LEN + 1).next_power_of_two();

/// One pass over one text.
struct Scan<'a, A> {
    aut: &'a A,
    edges: &'a [(bool, bool)],
    found: &'a mut [bool],
    /// The last [`BEHIND`] bytes of the normalized text, as a ring indexed by position.
    ring: [u8; BEHIND],
    /// Bytes of normalized text so far.
    pos: usize,
    /// Patterns that ended at the last byte and still need the next one to be a non-word byte.
    pending: Vec<usize>,
}

impl<'a, A: Automaton> Scan<'a, A> {
    fn new(aut: &'a A, edges: &'a [(bool, bool)], found: &'a mut [bool]) -> Self {
        Scan { aut, edges, found, ring: [b' '; BEHIND], pos: 0, pending: Vec::new() }
    }

    /// Feeds `text` with whitespace runs folded into one space (leading whitespace dropped).
    fn run(mut self, text: &[u8]) {
        let Ok(mut sid) = self.aut.start_state(Anchored::No) else { return };
        let mut in_space = true;
        for &b in text {
            let b = if b.is_ascii_whitespace() {
                if in_space {
                    continue;
                }
                in_space = true;
                b' '
            } else {
                in_space = false;
                b
            };
            sid = self.step(sid, b);
        }
        // The end of the text is a boundary.
        for p in std::mem::take(&mut self.pending) {
            self.found[p] = true;
        }
    }

    fn step(&mut self, sid: StateID, b: u8) -> StateID {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            if !is_word_byte(b) {
                for p in pending {
                    self.found[p] = true;
                }
            }
        }
        self.ring[self.pos & (BEHIND - 1)] = b;
        self.pos += 1;
        let sid = self.aut.next_state(Anchored::No, sid, b);
        if self.aut.is_match(sid) {
            for i in 0..self.aut.match_len(sid) {
                self.matched(self.aut.match_pattern(sid, i));
            }
        }
        sid
    }

    /// Pattern `p` ends at the byte just fed: check the byte before it now, the byte after it later.
    fn matched(&mut self, pid: PatternID) {
        let p = pid.as_usize();
        if self.found.get(p).is_none_or(|&f| f) {
            return;
        }
        let (left, right) = self.edges.get(p).copied().unwrap_or((false, false));
        let len = self.aut.pattern_len(pid);
        if left {
            // The byte before the match; the text's start (nothing before) is a boundary.
            let before = self.pos.checked_sub(len + 1).map(|i| self.ring[i & (BEHIND - 1)]);
            if before.is_some_and(is_word_byte) {
                return;
            }
        }
        if right {
            self.pending.push(p);
        } else {
            self.found[p] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(words: &[&str]) -> WordSet {
        let w: Vec<String> = words.iter().map(|w| normalize(w).unwrap()).collect();
        WordSet::new(&w).unwrap()
    }

    #[test]
    fn whole_words_case_insensitive_across_whitespace() {
        let s = set(&["cheap meds", "wire transfer", "$$$", "win"]);
        assert_eq!(s.scan(["Buy CHEAP\r\n   Meds now"]), [true, false, false, false]);
        assert_eq!(s.scan(["urgent: wire transfer."]), [false, true, false, false]);
        assert_eq!(s.scan(["make $$$fast"]), [false, false, true, false]);
        assert_eq!(s.scan(["you win"]), [false, false, false, true]);
        assert_eq!(s.scan(["win!"]), [false, false, false, true]);
    }

    #[test]
    fn parts_of_words_do_not_match() {
        let s = set(&["cheap meds", "win"]);
        assert_eq!(s.scan(["cheap medsXL", "xcheap meds", "windows", "twin", "w i n"]), [false, false]);
        // But an occurrence later in the text, or in another text, does.
        assert_eq!(s.scan(["windows", "we win"]), [false, true]);
        assert_eq!(s.scan(["twin win"]), [false, true]);
    }

    #[test]
    fn overlapping_words_all_reported() {
        let s = set(&["transfer", "wire transfer", "money wire"]);
        assert_eq!(s.scan(["send money wire transfer"]), [true, true, true]);
    }

    #[test]
    fn non_ascii_neighbours_separate_words() {
        let s = set(&["meds"]);
        assert_eq!(s.scan(["\u{201c}meds\u{201d}"]), [true]);
    }

    #[test]
    fn large_lists_use_the_nfa_and_still_match() {
        let words: Vec<String> = (0..3000).map(|i| format!("spamword{i}")).collect();
        let s = WordSet::new(&words).unwrap();
        assert!(matches!(s.machine, Machine::Nfa(_)));
        let hits = s.scan(["a spamword2999 b spamword29x"]);
        assert!(hits[2999] && !hits[29] && hits.iter().filter(|&&h| h).count() == 1);
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(normalize("  \t ").is_err());
        assert!(normalize(&"x".repeat(MAX_WORD_LEN + 1)).is_err());
        assert_eq!(normalize("  wire \n transfer ").unwrap(), "wire transfer");
    }

    proptest::proptest! {
        #[test]
        fn scan_agrees_with_a_naive_search(text in "[a-c ]{0,40}", word in "[a-c]{1,3}") {
            let s = set(&[&word]);
            let norm = text.split_ascii_whitespace().collect::<Vec<_>>();
            let expected = norm.iter().any(|w| *w == word);
            proptest::prop_assert_eq!(s.scan([text.as_str()])[0], expected);
        }
    }
}
