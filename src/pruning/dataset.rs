//! Calibration datasets in the authors' JSONL format: one `{"question_id", "image", "text"}`
//! object per line, images relative to an image folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::PruneError;

/// One calibration sample.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSample {
    /// The line's `question_id` as text (ints and strings both occur).
    pub question_id: String,
    /// Image path, resolved against the image folder.
    pub image: PathBuf,
    /// The question.
    pub text: String,
}

#[derive(Deserialize)]
struct Line {
    question_id: serde_json::Value,
    image: String,
    text: String,
}

/// One parsed line, its image path not yet resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetLine {
    /// 1-based line number, for errors about this sample.
    pub line: usize,
    /// The line's `question_id` as text.
    pub question_id: String,
    /// The image path as written (relative to the image folder).
    pub image: String,
    /// The question.
    pub text: String,
}

/// Parses JSONL text into at most `max_samples` lines; errors name the 1-based line and the
/// problem but never quote the line (the server reads datasets an admin points it at, and an
/// error must not become a way to read a file back). Blank lines are skipped.
pub fn parse_lines(jsonl: &str, max_samples: usize) -> Result<Vec<DatasetLine>, PruneError> {
    let mut lines = Vec::new();
    for (i, raw) in jsonl.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |m: String| PruneError::InvalidInput(format!("dataset line {line_no}: {m}"));
        if lines.len() == max_samples {
            return Err(PruneError::InvalidInput(format!("the dataset has more than {max_samples} samples")));
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(describe(&e)))?;
        if line.text.trim().is_empty() {
            return Err(bad("`text` is empty".into()));
        }
        let question_id = match line.question_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(bad("`question_id` must be a string or number".into())),
        };
        lines.push(DatasetLine { line: line_no, question_id, image: line.image, text: line.text });
    }
    if lines.is_empty() {
        return Err(PruneError::InvalidInput("the dataset has no samples".into()));
    }
    Ok(lines)
}

/// A JSON error without the input it quotes (serde's "invalid type: string \"...\"" would).
fn describe(e: &serde_json::Error) -> String {
    let expected = "expected an object with `question_id` (string or number), `image` and `text` (strings)";
    match e.classify() {
        serde_json::error::Category::Data => match e.to_string().strip_prefix("missing field `") {
            Some(rest) => format!("missing field `{}`", rest.split('`').next().unwrap_or("")),
            None => expected.to_string(),
        },
        _ => format!("not valid JSON at column {}; {expected}", e.column()),
    }
}

/// Parses JSONL text, resolving images against `image_dir` (which must hold them): the CLI's
/// reading of a dataset on the local machine.
pub fn parse_dataset(jsonl: &str, image_dir: &Path) -> Result<Vec<DatasetSample>, PruneError> {
    let mut samples = Vec::new();
    for line in parse_lines(jsonl, usize::MAX)? {
        let image = image_dir.join(&line.image);
        if !image.is_file() {
            return Err(PruneError::InvalidInput(format!(
                "dataset line {}: image {} not found",
                line.line,
                image.display()
            )));
        }
        samples.push(DatasetSample { question_id: line.question_id, image, text: line.text });
    }
    Ok(samples)
}

/// Reads and parses a JSONL dataset file.
pub fn load_dataset(path: &Path, image_dir: &Path) -> Result<Vec<DatasetSample>, PruneError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PruneError::InvalidInput(format!("dataset {}: {e}", path.display())))?;
    parse_dataset(&text, image_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authors_format_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let ok = "{\"question_id\": 7, \"image\": \"a.png\", \"text\": \"What?\"}\n\n{\"question_id\": \"q2\", \"image\": \"a.png\", \"text\": \"Why?\"}\n";
        let s = parse_dataset(ok, dir.path()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].question_id, "7");
        assert_eq!(s[1].text, "Why?");

        let missing = "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"ok\"}\n{\"question_id\": 2, \"text\": \"no image\"}";
        let e = parse_dataset(missing, dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("image"), "{e}");
        let e = parse_dataset("not json", dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = parse_dataset("{\"question_id\": 1, \"image\": \"b.png\", \"text\": \"t\"}", dir.path()).unwrap_err();
        assert!(e.to_string().contains("b.png not found"), "{e}");
        assert!(parse_dataset("\n\n", dir.path()).is_err());
    }

    #[test]
    fn errors_never_quote_the_file_and_the_sample_cap_stops_early() {
        for text in ["\"root:x:0:0:secret\"", "{\"question_id\": 1, \"image\": 7, \"text\": \"secret\"}", "secret"] {
            let e = parse_lines(text, 10).unwrap_err().to_string();
            assert!(e.contains("line 1") && !e.contains("secret") && !e.contains("root"), "{e}");
        }
        let line = "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"q\"}\n";
        assert_eq!(parse_lines(&line.repeat(3), 3).unwrap().len(), 3);
        let e = parse_lines(&line.repeat(4), 3).unwrap_err().to_string();
        assert!(e.contains("more than 3 samples"), "{e}");
    }
}
