//! Sentence and clause boundaries in text, for speaking a reply while it is still being written.
//!
//! [`SentenceSplitter`] takes text as it streams in (tokens from an LLM) and hands out each
//! sentence as soon as its end is certain; [`sentences`] splits finished text. A boundary is a
//! `.`, `!`, `?`, `…` or a line break followed by white space (or the end, for finished text),
//! with closing quotes and brackets kept with the sentence. Not boundaries: decimals and times
//! ("3.5", "7:30"), common abbreviations ("Dr.", "e.g.", "a.m."), initials ("J. R. R.") and
//! list numbers at the start of a line ("1. ").
//!
//! [`SentenceSplitter::first_clause`] also ends the *first* piece at a clause mark (`,` `;` `:`
//! `—` followed by white space), so that speech can start before the first sentence is done:
//! "Sure, the capital of France is Paris." gives "Sure," and then the rest.
//! [`SentenceSplitter::first_words`] also ends the first piece after so many words when no mark
//! came before ("The capital of France" and then "is Paris."): speech starts sooner still, at
//! some cost to the first sentence's intonation. [`opening`] does the same to one finished
//! sentence (for a speech stream that has nothing playing yet).

const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "a.m",
    "p.m", "approx", "no", "fig", "inc", "ltd", "co", "corp", "dept", "est", "gen", "gov", "lt",
    "col", "sgt", "capt", "rev", "u.s", "u.k", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
];

/// Whether the `.` ending `before` ends a word that is an abbreviation, an initial or a list
/// number, rather than a sentence. `line_start`: `before` begins at the start of a line.
fn is_abbreviation(before: &str, line_start: bool) -> bool {
    let word = before
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    let letters: Vec<char> = word.chars().collect();
    // A single capital initial ("J.") or dotted initials ("U.S").
    if letters.len() == 1 && letters[0].is_uppercase() {
        return true;
    }
    // "1." at the start of a line: a list item, not a sentence.
    if !word.is_empty() && word.len() <= 2 && word.chars().all(|c| c.is_ascii_digit()) {
        let ahead = &before[..before.len() - word.len()];
        return match ahead.rfind('\n') {
            Some(nl) => ahead[nl..].trim().is_empty(),
            None => line_start && ahead.trim().is_empty(),
        };
    }
    false
}

/// Where a sentence ending with the character `c` at `i` ends (past closing marks and quotes).
enum Boundary {
    At(usize),
    No,
    /// Depends on text not yet seen ("3." may become "3.5").
    Undecided,
}

/// The marks that end a sentence.
const SENTENCE_ENDS: [char; 4] = ['.', '!', '?', '…'];
/// Closing quotes and brackets, which stay with the sentence they close.
const CLOSING: [char; 7] = ['"', '\'', '”', '’', ')', ']', '»'];

/// Whether the character `c` at byte `i` of `text` ends a sentence. `finished`: nothing more will
/// follow `text`; `line_start`: `text` begins at the start of a line.
fn boundary_after(text: &str, i: usize, c: char, finished: bool, line_start: bool) -> Boundary {
    let mut end = i + c.len_utf8();
    if c == '\n' {
        return Boundary::At(end);
    }
    if !SENTENCE_ENDS.contains(&c) {
        return Boundary::No;
    }
    // Runs of marks ("?!", "...") and closing quotes or brackets stay with the sentence.
    let rest = &text[end..];
    for ch in rest.chars() {
        if SENTENCE_ENDS.contains(&ch) || CLOSING.contains(&ch) {
            end += ch.len_utf8();
        } else {
            break;
        }
    }
    match text[end..].chars().next() {
        None if !finished => return Boundary::Undecided,
        None => {}
        Some(next) if !next.is_whitespace() => return Boundary::No, // "3.5", "e.g.x"
        Some(_) => {}
    }
    if c == '.' && end == i + 1 && is_abbreviation(&text[..i], line_start) {
        return Boundary::No;
    }
    Boundary::At(end)
}

/// Splits finished text into sentences (trimmed, empty ones dropped).
pub fn sentences(text: &str) -> Vec<String> {
    let mut splitter = SentenceSplitter::default();
    let mut out = splitter.push(text);
    out.extend(splitter.finish());
    out
}

/// Splits a sentence's opening off its rest, as [`SentenceSplitter::first_words`] would: at the
/// first clause mark, or after `words` words. `None` when `words` is 0, or the sentence is too
/// short for it (a rest of fewer than two words is not worth a seam).
pub fn opening(sentence: &str, words: usize) -> Option<(String, String)> {
    if words == 0 {
        return None;
    }
    let mut splitter = SentenceSplitter::first_words(words);
    let mut pieces = splitter.push(sentence);
    pieces.extend(splitter.finish());
    let mut pieces = pieces.into_iter();
    let (head, rest) = (pieces.next()?, pieces.collect::<Vec<_>>().join(" "));
    (rest.split_whitespace().count() >= 2).then_some((head, rest))
}

/// Whether `piece` ends a sentence: with `.`, `!`, `?` or `…` (closing quotes and brackets aside),
/// not a clause mark or a word.
pub fn ends_sentence(piece: &str) -> bool {
    piece
        .trim_end()
        .trim_end_matches(CLOSING)
        .ends_with(SENTENCE_ENDS)
}

/// Splits streamed text into sentences as soon as each is complete.
#[derive(Debug)]
pub struct SentenceSplitter {
    pending: String,
    /// Byte offset in `pending` from which to look for the next boundary.
    scanned: usize,
    /// `pending` begins at the start of a line.
    line_start: bool,
    /// A clause mark ends the next piece (until one piece has been handed out).
    clause: bool,
    /// With `clause`: so many words end the first piece too (0: no limit).
    words: usize,
}

impl Default for SentenceSplitter {
    fn default() -> Self {
        Self {
            pending: String::new(),
            scanned: 0,
            line_start: true,
            clause: false,
            words: 0,
        }
    }
}

/// Whether the character `c` at byte `i` of `text` is a clause mark followed by white space.
fn clause_after(text: &str, i: usize, c: char) -> Boundary {
    if !matches!(c, ',' | ';' | ':' | '—') || text[..i].trim().is_empty() {
        return Boundary::No;
    }
    let end = i + c.len_utf8();
    match text[end..].chars().next() {
        None => Boundary::Undecided,
        // "1,000" and "7:30" go on.
        Some(next) if !next.is_whitespace() => Boundary::No,
        Some(_) => Boundary::At(end),
    }
}

impl SentenceSplitter {
    /// A splitter whose first piece ends at the first clause mark or sentence end, whichever
    /// comes first; sentences after that.
    pub fn first_clause() -> Self {
        Self {
            clause: true,
            ..Self::default()
        }
    }

    /// Like [`Self::first_clause`], and the first piece ends after `words` words at most.
    pub fn first_words(words: usize) -> Self {
        Self {
            clause: true,
            words,
            ..Self::default()
        }
    }

    /// Adds text; returns the sentences it completed.
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.pending.push_str(text);
        self.split(false)
    }

    /// The text left over at the end of the stream, if any.
    pub fn finish(&mut self) -> Vec<String> {
        let out = self.split(true);
        self.clear();
        out
    }

    /// Drops whatever is pending (a cancelled reply).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.scanned = 0;
        self.line_start = true;
    }

    fn split(&mut self, finished: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = self.scanned;
        while let Some(c) = self.pending[i..].chars().next() {
            let line_start = if start == 0 {
                self.line_start
            } else {
                self.pending[..start].ends_with('\n')
            };
            let text = &self.pending[start..];
            let boundary = match boundary_after(text, i - start, c, finished, line_start) {
                Boundary::No if self.clause && out.is_empty() => {
                    match clause_after(text, i - start, c) {
                        Boundary::Undecided if finished => Boundary::No,
                        Boundary::No
                            if self.words > 0
                                && c.is_whitespace()
                                && text[..i - start].split_whitespace().count() >= self.words =>
                        {
                            Boundary::At(i - start)
                        }
                        b => b,
                    }
                }
                b => b,
            };
            match boundary {
                Boundary::At(end) => {
                    let sentence = self.pending[start..start + end].trim();
                    if !sentence.is_empty() {
                        out.push(sentence.to_string());
                    }
                    start += end;
                    i = start;
                }
                Boundary::Undecided => break,
                Boundary::No => i += c.len_utf8(),
            }
        }
        if !out.is_empty() {
            self.clause = false;
        }
        if finished {
            let rest = self.pending[start..].trim();
            if !rest.is_empty() {
                out.push(rest.to_string());
            }
            start = self.pending.len();
            i = start;
        }
        if start > 0 {
            self.line_start = self.pending[..start].ends_with('\n');
        }
        self.pending.drain(..start);
        self.scanned = i - start;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_finished_text() {
        assert_eq!(
            sentences("Hello there. How are you? Fine!  "),
            ["Hello there.", "How are you?", "Fine!"]
        );
        assert_eq!(
            sentences("Dr. Smith walked 3.5 km at 7:30 a.m. on Monday. Then he slept."),
            [
                "Dr. Smith walked 3.5 km at 7:30 a.m. on Monday.",
                "Then he slept."
            ]
        );
        assert_eq!(
            sentences("He said \"Stop.\" Then left... Really?!"),
            ["He said \"Stop.\"", "Then left...", "Really?!"]
        );
        assert_eq!(
            sentences("J. R. R. Tolkien wrote it."),
            ["J. R. R. Tolkien wrote it."]
        );
        assert_eq!(
            sentences("Steps:\n1. Boil.\n2. Eat."),
            ["Steps:", "1. Boil.", "2. Eat."]
        );
        assert_eq!(sentences("no end mark"), ["no end mark"]);
        assert!(sentences("   ").is_empty());
    }

    #[test]
    fn streams_sentences_as_soon_as_they_are_complete() {
        let mut s = SentenceSplitter::default();
        let mut got = Vec::new();
        for token in [
            "The", " capital", " is", " Paris", ".", " It", " has", " 2", ".", "1", " million",
            " people", ".", " Nice", "!",
        ] {
            got.push(s.push(token));
        }
        // "Paris." is out once the space after it arrives; "2." waits for the "1".
        assert_eq!(got[5], ["The capital is Paris."]);
        assert!(
            got.iter()
                .flatten()
                .all(|x| !x.contains("2.") || x.contains("2.1"))
        );
        assert_eq!(got[13], ["It has 2.1 million people."]);
        assert_eq!(s.finish(), ["Nice!"]);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn the_first_piece_may_end_at_a_clause() {
        let text = "Sure, the capital of France is Paris, a city of 2,100,000 people. Yes, it is.";
        let whole = [
            "Sure,",
            "the capital of France is Paris, a city of 2,100,000 people.",
            "Yes, it is.",
        ];
        for size in 1..6 {
            let got = in_chunks(SentenceSplitter::first_clause(), text, size);
            assert_eq!(got, whole, "chunks of {size}");
        }
        // A sentence that ends before any clause mark is the first piece; "7:30" is no clause.
        let mut s = SentenceSplitter::first_clause();
        let mut got = s.push("At 7:30 we eat. Then, we sleep. ");
        got.extend(s.finish());
        assert_eq!(got, ["At 7:30 we eat.", "Then, we sleep."]);
        // The mark is out as soon as the space after it arrives.
        let mut s = SentenceSplitter::first_clause();
        assert!(s.push("Well,").is_empty());
        assert_eq!(s.push(" I"), ["Well,"]);
    }

    #[test]
    fn first_words_end_the_first_piece_when_no_mark_comes() {
        let text = "The capital of France is Paris. It is on the Seine.";
        for size in 1..=text.len() {
            let got = in_chunks(SentenceSplitter::first_words(4), text, size);
            assert_eq!(
                got,
                ["The capital of France", "is Paris.", "It is on the Seine."],
                "chunks of {size}"
            );
        }
        // A mark or a sentence end that comes first still ends it; later pieces are sentences.
        let mut s = SentenceSplitter::first_words(4);
        let mut got = s.push("Sure, the capital of France is Paris. ");
        got.extend(s.finish());
        assert_eq!(got, ["Sure,", "the capital of France is Paris."]);
        let mut s = SentenceSplitter::first_words(4);
        let mut got = s.push("Yes. It is.");
        got.extend(s.finish());
        assert_eq!(got, ["Yes.", "It is."]);
    }

    #[test]
    fn a_sentence_opening_comes_off_its_rest() {
        let split = |s: &str, n| opening(s, n).map(|(h, r)| format!("{h}|{r}"));
        assert_eq!(
            split("The capital of France is Paris.", 2).as_deref(),
            Some("The capital|of France is Paris.")
        );
        assert_eq!(
            split("Sure, the capital is Paris.", 3).as_deref(),
            Some("Sure,|the capital is Paris.")
        );
        // Off, too short to split, or a one-word rest: the sentence stays whole.
        assert_eq!(split("The capital of France is Paris.", 0), None);
        assert_eq!(split("Hello there.", 2), None);
        assert_eq!(split("Hello there, friend.", 2), None);
        assert_eq!(
            split("Paris is lovely now.", 2).as_deref(),
            Some("Paris is|lovely now.")
        );
    }

    #[test]
    fn pieces_that_end_a_sentence() {
        for yes in [
            "Paris.",
            "Really?!",
            "He said \"Stop.\"",
            "Wait… ",
            "(Yes.)",
        ] {
            assert!(ends_sentence(yes), "{yes}");
        }
        for no in ["Sure,", "The capital", "Well:", "7:30", ""] {
            assert!(!ends_sentence(no), "{no}");
        }
    }

    #[test]
    fn any_chunking_gives_the_same_sentences() {
        let text =
            "Mr. Brown paid $4.99 at 10:05 p.m. yesterday. Wow… that's cheap! Isn't it? Yes.";
        let whole = sentences(text);
        for size in 1..8 {
            let got = in_chunks(SentenceSplitter::default(), text, size);
            assert_eq!(got, whole, "chunks of {size}");
        }
    }

    /// What `s` hands out when `text` streams in pieces of `size` characters.
    fn in_chunks(mut s: SentenceSplitter, text: &str, size: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut got = Vec::new();
        for chunk in chars.chunks(size) {
            got.extend(s.push(&chunk.iter().collect::<String>()));
        }
        got.extend(s.finish());
        got
    }
}
