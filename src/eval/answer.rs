//! Answer normalisation and scoring for the dataset kinds `fitprune eval` reads: POPE yes/no,
//! multiple choice (a letter, ScienceQA/MMBench style) and short-answer VQA (the VQAv2 / GQA
//! normalisation: lowercase, punctuation and articles stripped, number words as digits).

use serde::{Deserialize, Serialize};

/// How a sample's answer is read and compared with its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AnswerKind {
    /// POPE: the answer is "yes" unless it says no/not (the POPE evaluation script's rule).
    // The CLI spells it yes-no; the admin API takes that spelling too.
    #[serde(alias = "yes-no")]
    YesNo,
    /// The first option letter (A-Z) the answer names, e.g. "B", "(B)", "B. cat".
    Choice,
    /// VQAv2-normalised short answer, compared for equality.
    Vqa,
}

/// Number words VQAv2's evaluation maps to digits.
const NUMBERS: [(&str, &str); 11] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
];
const TEN: (&str, &str) = ("ten", "10");
const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// VQAv2-style normalisation: lowercase; punctuation becomes a space except a period or comma
/// inside a number (`1,000`, `2.5` stay); articles dropped; number words as digits; whitespace
/// collapsed. A trailing period of the sentence goes too.
pub fn normalize_vqa(text: &str) -> String {
    let lower = text.trim().to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    let mut cleaned = String::with_capacity(lower.len());
    for (i, &c) in chars.iter().enumerate() {
        let digit_around = |d: isize| {
            usize::try_from(i as isize + d).ok().and_then(|j| chars.get(j)).is_some_and(char::is_ascii_digit)
        };
        let keep_in_number = (c == '.' || c == ',') && digit_around(-1) && digit_around(1);
        if c.is_alphanumeric() || c.is_whitespace() || keep_in_number {
            cleaned.push(c);
        } else if c == '\'' {
            // "don't" -> "dont", as VQA's contraction handling ends up comparing.
        } else {
            cleaned.push(' ');
        }
    }
    let words: Vec<String> = cleaned
        .split_whitespace()
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            NUMBERS.iter().chain(std::iter::once(&TEN)).find(|(word, _)| *word == w).map_or(w, |(_, d)| *d).to_string()
        })
        .collect();
    words.join(" ")
}

/// POPE's reading of an answer: "no" when the first sentence contains the word no or not
/// (`pope_eval.py`: take the text before the first period, `no`/`not` in its words -> no), else "yes".
pub fn read_yes_no(text: &str) -> &'static str {
    let first = text.split('.').next().unwrap_or("");
    let normalized = normalize_vqa(first);
    if normalized.split_whitespace().any(|w| w == "no" || w == "not") {
        "no"
    } else {
        "yes"
    }
}

/// The option letter an answer names: a leading letter ("B", "B.", "B)", "(B)") or a letter
/// standing alone later ("The answer is C"). `None` when no letter stands out.
pub fn read_choice(text: &str) -> Option<char> {
    let trimmed = text.trim().trim_start_matches(['(', '[']);
    let mut chars = trimmed.chars();
    if let Some(first) = chars.next() {
        let next = chars.next();
        if first.is_ascii_uppercase() && next.is_none_or(|n| !n.is_alphanumeric()) {
            return Some(first);
        }
    }
    trimmed
        .split(|c: char| !c.is_alphanumeric())
        .find(|w| w.len() == 1 && w.chars().all(|c| c.is_ascii_uppercase()))
        .and_then(|w| w.chars().next())
}

/// The answer in comparable form for `kind` (what agreement and accuracy compare).
pub fn canonical(kind: AnswerKind, text: &str) -> String {
    match kind {
        AnswerKind::YesNo => read_yes_no(text).to_string(),
        AnswerKind::Choice => read_choice(text).map(String::from).unwrap_or_default(),
        AnswerKind::Vqa => normalize_vqa(text),
    }
}

/// Whether a model answer matches any of the labels (VQAv2 lists several human answers; a
/// single match counts, the simple form of VQA accuracy used for GQA-style exact match).
pub fn is_correct(kind: AnswerKind, answer: &str, labels: &[String]) -> bool {
    let got = canonical(kind, answer);
    labels.iter().any(|l| {
        let want = match kind {
            // Labels are clean; read them with the VQA normaliser so "Yes" and "yes." both work.
            AnswerKind::YesNo => normalize_vqa(l),
            AnswerKind::Choice => read_choice(l).map(String::from).unwrap_or_else(|| l.trim().to_string()),
            AnswerKind::Vqa => normalize_vqa(l),
        };
        !got.is_empty() && got == want
    })
}

/// The kind a label suggests when the dataset does not say: yes/no labels are POPE-style, a single
/// capital letter is multiple choice, anything else short-answer VQA.
pub fn infer_kind(labels: &[String]) -> AnswerKind {
    let all = |f: &dyn Fn(&str) -> bool| !labels.is_empty() && labels.iter().all(|l| f(l.trim()));
    if all(&|l| matches!(normalize_vqa(l).as_str(), "yes" | "no")) {
        AnswerKind::YesNo
    } else if all(&|l| l.len() == 1 && l.chars().all(|c| c.is_ascii_uppercase())) {
        AnswerKind::Choice
    } else {
        AnswerKind::Vqa
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vqa_normalisation_follows_vqav2() {
        assert_eq!(normalize_vqa("Two."), "2");
        assert_eq!(normalize_vqa("  The Red  Ball! "), "red ball");
        assert_eq!(normalize_vqa("an apple"), "apple");
        assert_eq!(normalize_vqa("1,000"), "1,000");
        assert_eq!(normalize_vqa("2.5 m"), "2.5 m");
        assert_eq!(normalize_vqa("yes, it is"), "yes it is");
        assert_eq!(normalize_vqa("don't"), "dont");
        assert_eq!(normalize_vqa("none"), "0");
        assert_eq!(normalize_vqa("ten"), "10");
        assert_eq!(normalize_vqa("there are three"), "there are 3");
        assert_eq!(normalize_vqa(""), "");
    }

    #[test]
    fn yes_no_reads_like_pope() {
        assert_eq!(read_yes_no("Yes"), "yes");
        assert_eq!(read_yes_no("No, there is not."), "no");
        assert_eq!(read_yes_no("There is not a cat."), "no");
        assert_eq!(read_yes_no("Yes. There is no dog though."), "yes");
        assert_eq!(read_yes_no("nothing"), "yes", "only the words no/not count");
    }

    #[test]
    fn choice_letters() {
        assert_eq!(read_choice("B"), Some('B'));
        assert_eq!(read_choice("(C) a cat"), Some('C'));
        assert_eq!(read_choice("D. blue"), Some('D'));
        assert_eq!(read_choice("The answer is A."), Some('A'));
        assert_eq!(read_choice("Apple"), None);
        assert_eq!(read_choice("i think so"), None);
    }

    #[test]
    fn correctness_by_kind() {
        let l = |s: &str| vec![s.to_string()];
        assert!(is_correct(AnswerKind::YesNo, "Yes, there is.", &l("yes")));
        assert!(!is_correct(AnswerKind::YesNo, "No", &l("yes")));
        assert!(is_correct(AnswerKind::Choice, "(B) dog", &l("B")));
        assert!(!is_correct(AnswerKind::Choice, "A", &l("B")));
        assert!(is_correct(AnswerKind::Vqa, "Two", &l("2")));
        assert!(is_correct(AnswerKind::Vqa, "the blue one", &l("blue one")));
        assert!(!is_correct(AnswerKind::Vqa, "", &l("")), "an empty answer is never right");
        assert!(is_correct(AnswerKind::Vqa, "cat", &["dog".into(), "cat".into()]));
    }

    #[test]
    fn kinds_inferred_from_labels() {
        assert_eq!(infer_kind(&["yes".into()]), AnswerKind::YesNo);
        assert_eq!(infer_kind(&["No".into()]), AnswerKind::YesNo);
        assert_eq!(infer_kind(&["C".into()]), AnswerKind::Choice);
        assert_eq!(infer_kind(&["red".into()]), AnswerKind::Vqa);
        assert_eq!(infer_kind(&[]), AnswerKind::Vqa);
    }
}
