//! Evaluation datasets: the LLaVA eval JSONL (`{"question_id", "image", "text"}` plus an optional
//! `answer` or `label`, a string or a list of acceptable strings), images relative to a folder.
//! POPE files (`label` yes/no), multiple choice (options in the question, a letter as answer) and
//! VQA short answers all use this shape; the answer kind comes from `--format` or the labels.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::answer::{infer_kind, AnswerKind};
use super::EvalError;

/// One evaluation item.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSample {
    /// The line's `question_id` as text.
    pub question_id: String,
    /// Image path, resolved against the image folder.
    pub image: PathBuf,
    /// The question as the user asks it.
    pub text: String,
    /// Acceptable answers; empty when the dataset has no labels.
    pub labels: Vec<String>,
    /// How answers are read.
    pub kind: AnswerKind,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Label {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Line {
    question_id: serde_json::Value,
    image: String,
    text: String,
    #[serde(default)]
    answer: Option<Label>,
    #[serde(default)]
    label: Option<Label>,
}

/// Parses JSONL text. `kind` forces the answer kind; `None` infers it per line from the labels
/// (yes/no -> POPE, a capital letter -> multiple choice, else VQA). Errors name the 1-based line.
pub fn parse_eval_dataset(
    jsonl: &str,
    image_dir: &Path,
    kind: Option<AnswerKind>,
) -> Result<Vec<EvalSample>, EvalError> {
    let mut samples = parse_eval_records(jsonl, kind)?;
    for (line, s) in &mut samples {
        s.image = image_dir.join(&s.image);
        if !s.image.is_file() {
            return Err(EvalError::Dataset(format!("line {line}: image {} not found", s.image.display())));
        }
    }
    Ok(samples.into_iter().map(|(_, s)| s).collect())
}

/// Parses JSONL text without touching the filesystem: each sample with its 1-based line, its
/// `image` as written in the file (the caller resolves and reads it, e.g. inside a data root).
pub fn parse_eval_records(jsonl: &str, kind: Option<AnswerKind>) -> Result<Vec<(usize, EvalSample)>, EvalError> {
    let mut samples = Vec::new();
    for (i, raw) in jsonl.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |m: String| EvalError::Dataset(format!("line {}: {m}", i + 1));
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        if line.text.trim().is_empty() {
            return Err(bad("`text` is empty".into()));
        }
        let question_id = match line.question_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(bad(format!("`question_id` must be a string or number, got {other}"))),
        };
        let labels = match line.answer.or(line.label) {
            None => Vec::new(),
            Some(Label::One(s)) => vec![s],
            Some(Label::Many(v)) => v,
        };
        let kind = kind.unwrap_or_else(|| infer_kind(&labels));
        samples
            .push((i + 1, EvalSample { question_id, image: PathBuf::from(line.image), text: line.text, labels, kind }));
    }
    if samples.is_empty() {
        return Err(EvalError::Dataset("the dataset has no samples".into()));
    }
    Ok(samples)
}

/// Reads and parses a JSONL dataset file.
pub fn load_eval_dataset(
    path: &Path,
    image_dir: &Path,
    kind: Option<AnswerKind>,
) -> Result<Vec<EvalSample>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Dataset(format!("{}: {e}", path.display())))?;
    parse_eval_dataset(&text, image_dir, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_image() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        dir
    }

    #[test]
    fn reads_pope_choice_vqa_and_unlabelled_lines() {
        let dir = dir_with_image();
        let text = [
            r#"{"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes"}"#,
            r#"{"question_id": "q2", "image": "a.png", "text": "Which animal?\nA. cat\nB. dog\nAnswer with the option's letter.", "answer": "B"}"#,
            r#"{"question_id": 3, "image": "a.png", "text": "What colour is it?", "answer": ["red", "dark red"]}"#,
            "",
            r#"{"question_id": 4, "image": "a.png", "text": "Describe it."}"#,
        ]
        .join("\n");
        let s = parse_eval_dataset(&text, dir.path(), None).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!((s[0].kind, s[0].labels.as_slice()), (AnswerKind::YesNo, &["yes".to_string()][..]));
        assert_eq!(s[1].kind, AnswerKind::Choice);
        assert_eq!(s[1].question_id, "q2");
        assert_eq!(s[2].kind, AnswerKind::Vqa);
        assert_eq!(s[2].labels.len(), 2);
        assert!(s[3].labels.is_empty());
        let forced = parse_eval_dataset(&text, dir.path(), Some(AnswerKind::Vqa)).unwrap();
        assert!(forced.iter().all(|s| s.kind == AnswerKind::Vqa));
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = dir_with_image();
        let e =
            parse_eval_dataset("{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"ok\"}\nnope", dir.path(), None)
                .unwrap_err()
                .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_eval_dataset(r#"{"question_id": 1, "image": "b.png", "text": "t"}"#, dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.png not found"), "{e}");
        let e = parse_eval_dataset(r#"{"question_id": [1], "image": "a.png", "text": "t"}"#, dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("question_id"), "{e}");
        let e =
            parse_eval_dataset(r#"{"question_id": 1, "image": "a.png", "text": "t", "answer": 3}"#, dir.path(), None)
                .unwrap_err()
                .to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(parse_eval_dataset("\n", dir.path(), None).is_err());
    }
}
