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

/// Parses JSONL text; errors name the 1-based line and the problem. Blank lines are skipped.
pub fn parse_dataset(jsonl: &str, image_dir: &Path) -> Result<Vec<DatasetSample>, PruneError> {
    let mut samples = Vec::new();
    for (i, raw) in jsonl.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |m: String| PruneError::InvalidInput(format!("dataset line {line_no}: {m}"));
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        if line.text.trim().is_empty() {
            return Err(bad("`text` is empty".into()));
        }
        let question_id = match line.question_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(bad(format!("`question_id` must be a string or number, got {other}"))),
        };
        let image = image_dir.join(&line.image);
        if !image.is_file() {
            return Err(bad(format!("image {} not found", image.display())));
        }
        samples.push(DatasetSample { question_id, image, text: line.text });
    }
    if samples.is_empty() {
        return Err(PruneError::InvalidInput("the dataset has no samples".into()));
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
}
