//! The raw bytes behind every vocabulary entry, for OpenAI's `logprobs[].bytes`: a token's
//! decoded text alone is wrong for byte-fallback pieces (`<0xE2>` is the byte 0xE2, not text)
//! and for byte-level BPE (`Ġ` is a space).
//!
//! Which mapping applies is read from the tokenizer's decoder: a `ByteLevel` decoder means GPT-2's
//! byte-to-unicode table; otherwise SentencePiece conventions (`▁` is a space, `ByteFallback`
//! pieces `<0xHH>` are single bytes).

use std::collections::HashMap;

use tokenizers::Tokenizer;

/// Bytes of every token id, computed once per model.
#[derive(Debug, Clone, Default)]
pub struct TokenBytes {
    bytes: Vec<Vec<u8>>,
}

impl TokenBytes {
    /// Builds the table for every id the tokenizer knows (added tokens included).
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let decoder = tokenizer.get_decoder().and_then(|d| serde_json::to_value(d).ok()).unwrap_or_default();
        let mut types = Vec::new();
        collect_types(&decoder, &mut types);
        let byte_level = types.iter().any(|t| t == "ByteLevel");
        let byte_fallback = types.iter().any(|t| t == "ByteFallback");
        let unicode_to_byte: HashMap<char, u8> = gpt2_bytes_to_unicode().into_iter().map(|(b, c)| (c, b)).collect();
        let size = tokenizer.get_vocab_size(true);
        let bytes = (0..size as u32)
            .map(|id| {
                let Some(piece) = tokenizer.id_to_token(id) else { return Vec::new() };
                let special = tokenizer.get_added_vocabulary().is_special_token(&piece);
                if special {
                    piece.into_bytes()
                } else if byte_level {
                    piece.chars().flat_map(|c| byte_level_char(c, &unicode_to_byte)).collect()
                } else {
                    sentencepiece_bytes(&piece, byte_fallback)
                }
            })
            .collect();
        Self { bytes }
    }

    /// The bytes of `id` (empty for an id outside the vocabulary).
    pub fn get(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The token as text: its bytes read as UTF-8, with U+FFFD for a partial character.
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.get(id)).into_owned()
    }
}

/// Every `"type"` value anywhere in the decoder's JSON (sequences nest).
fn collect_types(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(t)) = map.get("type") {
                out.push(t.clone());
            }
            map.values().for_each(|x| collect_types(x, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| collect_types(x, out)),
        _ => {}
    }
}

fn byte_level_char(c: char, table: &HashMap<char, u8>) -> Vec<u8> {
    match table.get(&c) {
        Some(&b) => vec![b],
        None => c.to_string().into_bytes(),
    }
}

/// `▁` → space; `<0xHH>` → the byte HH when the tokenizer has byte fallback.
fn sentencepiece_bytes(piece: &str, byte_fallback: bool) -> Vec<u8> {
    if byte_fallback {
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
            if hex.len() == 2 {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    return vec![b];
                }
            }
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's reversible byte → printable-char table (`bytes_to_unicode` in the reference code).
fn gpt2_bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut n = 0u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, char::from(b))
            } else {
                let c = char::from_u32(256 + n).unwrap_or('?');
                n += 1;
                (b, c)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_pieces_map_to_their_bytes() {
        assert_eq!(sentencepiece_bytes("<0xE2>", true), vec![0xE2]);
        assert_eq!(sentencepiece_bytes("<0xE2>", false), b"<0xE2>".to_vec());
        assert_eq!(sentencepiece_bytes("\u{2581}hello", true), b" hello".to_vec());
        assert_eq!(sentencepiece_bytes("<0xZZ>", true), b"<0xZZ>".to_vec());
    }

    #[test]
    fn gpt2_table_is_a_bijection_with_space_as_g_dot() {
        let table = gpt2_bytes_to_unicode();
        let inverse: HashMap<char, u8> = table.iter().map(|&(b, c)| (c, b)).collect();
        assert_eq!(inverse.len(), 256);
        assert_eq!(byte_level_char('Ġ', &inverse), vec![b' ']);
        assert_eq!(byte_level_char('a', &inverse), vec![b'a']);
    }
}
