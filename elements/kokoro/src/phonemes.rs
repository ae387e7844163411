//! Text → Kokoro token ids (no GStreamer types): normalisation, clause splitting, phonemisation
//! with libespeak-ng (the C library), the phoneme vocabulary, and chunking under the model's
//! 510-token limit.
//!
//! libespeak-ng 1.51's `espeak_TextToPhonemes` drops punctuation, which Kokoro needs for
//! prosody, and reads past clause ends; so text is cut at punctuation here (keeping "3.5",
//! "7:30" and "1,000" whole), each piece is phonemised alone and its mark appended again.

use regex::Regex;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::path::Path;
use std::sync::{LazyLock, Mutex};

/// Most ids one model call takes (the style table has 510 rows, indexed by the id count).
pub const MAX_TOKENS: usize = 509;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start espeak-ng: {0}")]
    Espeak(String),
    #[error("cannot read the Kokoro vocabulary {path}: {why}")]
    Vocab { path: String, why: String },
}

/// The phoneme → id table from Kokoro's `vocab.json`.
#[derive(Debug, Clone)]
pub struct Vocab {
    ids: HashMap<char, i64>,
}

impl Vocab {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let err = |why: String| Error::Vocab {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let table = value
            .get("vocab")
            .and_then(|v| v.as_object())
            .ok_or("no \"vocab\" object")?;
        let mut ids = HashMap::new();
        for (key, id) in table {
            let mut chars = key.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return Err(format!("entry {key:?} is not one character"));
            };
            let id = id
                .as_i64()
                .ok_or(format!("entry {key:?} has no integer id"))?;
            ids.insert(c, id);
        }
        if ids.is_empty() {
            return Err("the vocabulary is empty".into());
        }
        Ok(Self { ids })
    }

    /// Ids of the characters of `phonemes` that are in the table (others are dropped).
    pub fn encode(&self, phonemes: &str) -> Vec<i64> {
        phonemes
            .chars()
            .filter_map(|c| self.ids.get(&c).copied())
            .collect()
    }
}

/// One piece of speech: its phonemes and ids (at most [`MAX_TOKENS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub phonemes: String,
    pub ids: Vec<i64>,
}

/// Turns one sentence (or any text) into chunks the model can take, in order. Text with nothing
/// to say (only punctuation, emoji) gives no chunks.
pub fn chunks(text: &str, language: &str, vocab: &Vocab) -> Result<Vec<Chunk>, Error> {
    let text = normalise(text);
    let mut pieces = Vec::new();
    for (words, mark) in clauses(&text) {
        let mut phonemes = if words.chars().any(char::is_alphanumeric) {
            phonemise(&words, language)?
        } else {
            String::new()
        };
        if let Some(mark) = mark
            && !phonemes.is_empty()
        {
            phonemes.push(mark);
        }
        if !phonemes.is_empty() {
            pieces.push(phonemes);
        }
    }
    Ok(pack(pieces, vocab))
}

/// Packs phonemised clauses into chunks of at most [`MAX_TOKENS`] ids, cutting between
/// clauses, else between words, else anywhere.
fn pack(pieces: Vec<String>, vocab: &Vocab) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    let mut current = String::new();
    let mut current_ids = 0;
    let space = vocab.encode(" ").len();
    let flush = |current: &mut String, out: &mut Vec<Chunk>| {
        let phonemes = std::mem::take(current).trim().to_string();
        let ids = vocab.encode(&phonemes);
        if !ids.is_empty() {
            out.push(Chunk { phonemes, ids });
        }
    };
    for piece in pieces {
        for word in split_to_fit(&piece, vocab) {
            let ids = vocab.encode(&word).len();
            if current.is_empty() {
                current = word;
                current_ids = ids;
            } else if current_ids + space + ids > MAX_TOKENS {
                flush(&mut current, &mut out);
                current = word;
                current_ids = ids;
            } else {
                current.push(' ');
                current.push_str(&word);
                current_ids += space + ids;
            }
        }
    }
    flush(&mut current, &mut out);
    out
}

/// `piece` whole if it fits, else its words (and a word longer than the limit in slices).
fn split_to_fit(piece: &str, vocab: &Vocab) -> Vec<String> {
    if vocab.encode(piece).len() <= MAX_TOKENS {
        return vec![piece.to_string()];
    }
    let mut out = Vec::new();
    for word in piece.split_whitespace() {
        if vocab.encode(word).len() <= MAX_TOKENS {
            out.push(word.to_string());
        } else {
            let chars: Vec<char> = word.chars().collect();
            out.extend(chars.chunks(MAX_TOKENS).map(|c| c.iter().collect()));
        }
    }
    out
}

/// Splits text at punctuation into `(words, mark)` pairs. Marks inside numbers ("3.5", "7:30",
/// "1,000") do not split. Dashes become commas, the other marks are kept as Kokoro knows them.
fn clauses(text: &str) -> Vec<(String, Option<char>)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut words = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let digit = |j: Option<usize>| {
            j.and_then(|j| chars.get(j))
                .is_some_and(char::is_ascii_digit)
        };
        let in_number =
            matches!(c, '.' | ',' | ':') && digit(i.checked_sub(1)) && digit(Some(i + 1));
        let mark = match c {
            _ if in_number => None,
            '.' | ',' | ';' | ':' | '!' | '?' | '…' => Some(c),
            '—' | '–' => Some(','),
            _ => None,
        };
        match mark {
            Some(m) => {
                // A run of marks ("?!", "...") keeps the first.
                if !words.trim().is_empty() {
                    out.push((std::mem::take(&mut words), Some(m)));
                }
                words.clear();
            }
            None => words.push(c),
        }
    }
    if !words.trim().is_empty() {
        out.push((words, None));
    }
    out
}

static ESPEAK: Mutex<Option<Result<String, String>>> = Mutex::new(None);

/// IPA phonemes of `text` (no punctuation in it) in `language` (an espeak-ng voice such as
/// `en-us`). espeak-ng is one global instance: calls are serialised.
pub fn phonemise(text: &str, language: &str) -> Result<String, Error> {
    use espeakng_sys::*;
    let mut guard = ESPEAK.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        // SAFETY: called once, under the lock, before any other espeak-ng call.
        let rate = unsafe {
            espeak_Initialize(
                espeak_AUDIO_OUTPUT_AUDIO_OUTPUT_SYNCHRONOUS,
                0,
                std::ptr::null(),
                0,
            )
        };
        *guard = Some(if rate > 0 {
            Ok(String::new())
        } else {
            Err("espeak_Initialize failed (is the espeak-ng-data package installed?)".into())
        });
    }
    match guard.as_mut().expect("set above") {
        Err(why) => return Err(Error::Espeak(why.clone())),
        Ok(current) if current != language => {
            let name = CString::new(language)
                .map_err(|_| Error::Espeak(format!("bad language {language:?}")))?;
            // SAFETY: espeak-ng is initialised; the lock serialises access.
            let status = unsafe { espeak_SetVoiceByName(name.as_ptr()) };
            if status != espeak_ERROR_EE_OK {
                return Err(Error::Espeak(format!(
                    "espeak-ng has no voice for language {language:?}"
                )));
            }
            *current = language.to_string();
        }
        Ok(_) => {}
    }
    let input = CString::new(text.replace('\0', " ")).expect("NULs replaced");
    let mut ptr = input.as_ptr() as *const c_void;
    let mut out = String::new();
    while !ptr.is_null() {
        // SAFETY: `ptr` points into `input` (NUL-terminated, alive for the loop); espeak-ng
        // advances it clause by clause and sets it to NULL at the end.
        let result = unsafe {
            espeak_TextToPhonemes(&mut ptr, espeakCHARS_UTF8 as i32, espeakPHONEMES_IPA as i32)
        };
        if result.is_null() {
            break;
        }
        // SAFETY: espeak-ng returns a NUL-terminated string valid until its next call.
        let phonemes = unsafe { CStr::from_ptr(result) }.to_string_lossy();
        let phonemes = phonemes.trim();
        if !phonemes.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(phonemes);
        }
    }
    Ok(out)
}

/// Rewrites what espeak-ng reads badly or not at all: money, units, clock times with a leading
/// zero, `&`, and symbols with no sound (emoji) which are dropped.
pub fn normalise(text: &str) -> String {
    static RULES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
        let r = |p: &str| Regex::new(p).expect("valid pattern");
        vec![
            (r(r"\$(\d+)\.(\d\d)\b"), "$1 dollars $2 cents"),
            (r(r"\$(\d+(?:,\d{3})*)"), "$1 dollars"),
            (r(r"€(\d+(?:[.,]\d+)?)"), "$1 euros"),
            (r(r"£(\d+(?:[.,]\d+)?)"), "$1 pounds"),
            (r(r"\b(\d{1,2}):00\b"), "$1 o'clock"),
            (r(r"\b(\d{1,2}):0(\d)\b"), "$1 oh $2"),
            (r(r"(\d)\s?km/h\b"), "$1 kilometres per hour"),
            (r(r"(\d)\s?mph\b"), "$1 miles per hour"),
            (r(r"(\d)\s?km\b"), "$1 kilometres"),
            (r(r"(\d)\s?cm\b"), "$1 centimetres"),
            (r(r"(\d)\s?mm\b"), "$1 millimetres"),
            (r(r"(\d)\s?kg\b"), "$1 kilograms"),
            (r(r"(\d)\s?mg\b"), "$1 milligrams"),
            (r(r"(\d)\s?ml\b"), "$1 millilitres"),
            (r(r"(\d)\s?kHz\b"), "$1 kilohertz"),
            (r(r"(\d)\s?Hz\b"), "$1 hertz"),
            (r(r"(\d)\s?GB\b"), "$1 gigabytes"),
            (r(r"(\d)\s?MB\b"), "$1 megabytes"),
            (r(r"(\d)\s?°C\b"), "$1 degrees Celsius"),
            (r(r"(\d)\s?°F\b"), "$1 degrees Fahrenheit"),
            (r(r"\s&\s"), " and "),
        ]
    });
    let mut text: String = text
        .chars()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' => '\'',
            '\n' | '\t' | '\r' => ' ',
            _ => c,
        })
        .filter(|c| {
            c.is_alphanumeric() || c.is_whitespace() || ".,;:!?'\"-()…—–%$€£°/+=@#&*".contains(*c)
        })
        .collect();
    for (re, with) in RULES.iter() {
        text = re.replace_all(&text, *with).into_owned();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocab {
        let chars = "abcdefghijklmnopqrstuvwxyzæçðøŋœɐɑɒɔəɚɛɜɡɪɹɾʃʊʌʒʔˈˌːθᵻ ,.!?;:…";
        let table: Vec<String> = chars
            .chars()
            .enumerate()
            .map(|(i, c)| format!("{:?}: {}", c.to_string(), i + 1))
            .collect();
        Vocab::parse(&format!("{{\"vocab\": {{{}}}}}", table.join(", "))).unwrap()
    }

    #[test]
    fn clauses_keep_numbers_whole() {
        let got = clauses("At 7:30, walk 3.5 km; pay 1,000 dollars. Done?!");
        let marks: Vec<Option<char>> = got.iter().map(|(_, m)| *m).collect();
        assert_eq!(marks, [Some(','), Some(';'), Some('.'), Some('?')]);
        assert!(
            got[0].0.contains("7:30") && got[1].0.contains("3.5") && got[2].0.contains("1,000")
        );
    }

    #[test]
    fn normalises_what_espeak_reads_badly() {
        assert_eq!(normalise("It costs $4.99."), "It costs 4 dollars 99 cents.");
        assert_eq!(
            normalise("Walk 3.5 km at 7:05 😀"),
            "Walk 3.5 kilometres at 7 oh 5 "
        );
        assert_eq!(normalise("9:00 & tea"), "9 o'clock and tea");
    }

    #[test]
    fn phonemises_with_punctuation_and_stress() {
        let v = vocab();
        let got = chunks("Hello, world! Dr. Smith.", "en-us", &v).unwrap();
        assert_eq!(got.len(), 1);
        let p = &got[0].phonemes;
        assert!(p.contains("həlˈoʊ,") && p.contains("wˈɜːld!"), "{p}");
        assert!(p.contains("dˈɑːktɚ"), "{p}");
        assert!(chunks("!!! 😀 ...", "en-us", &v).unwrap().is_empty());
    }

    #[test]
    fn long_text_is_chunked_under_the_limit() {
        let v = vocab();
        let text = "This is a rather long sentence about nothing in particular, ".repeat(60);
        let got = chunks(&text, "en-us", &v).unwrap();
        assert!(got.len() > 3, "{}", got.len());
        assert!(
            got.iter()
                .all(|c| !c.ids.is_empty() && c.ids.len() <= MAX_TOKENS)
        );
        // Cuts fall between clauses: every chunk but the last ends with the clause's comma.
        assert!(
            got[..got.len() - 1]
                .iter()
                .all(|c| c.phonemes.ends_with(','))
        );
    }

    #[test]
    fn unknown_language_is_an_error() {
        let err = phonemise("hello", "xx-nonexistent")
            .unwrap_err()
            .to_string();
        assert!(err.contains("xx-nonexistent"), "{err}");
        // And the right one still works afterwards.
        assert!(!phonemise("hello", "en-us").unwrap().is_empty());
    }
}
