//! Tests for the demo tokenizer: ids agree with transformers, output is deterministic, and any
//! UTF-8 encodes without `<unk>`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use super::*;
use crate::model::prompt::{ChatMessage, ChatTemplate, ContentPart};

#[derive(Deserialize)]
struct Fixture {
    vocab_size: usize,
    special_ids: BTreeMap<String, u32>,
    chat_prompt: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    decoded: String,
    decoded_skip_special: String,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/demo_tokenizer_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn ids_and_decoding_match_transformers() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let ids = write_demo_tokenizer(dir.path(), fixture.vocab_size).unwrap();
    assert_eq!(ids.vocab_size, fixture.vocab_size);
    let special = |name: &str| fixture.special_ids[name];
    assert_eq!(
        (ids.bos_id, ids.eos_id, ids.unk_id, ids.pad_id, ids.image_id),
        (special("bos"), special("eos"), special("unk"), special("pad"), special("image"))
    );

    // Load from disk, as the model loader does, so the written JSON is what is tested.
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    for case in &fixture.cases {
        let enc = tok.encode(case.text.as_str(), true).unwrap();
        assert_eq!(enc.get_ids(), case.ids.as_slice(), "{:?}", case.text);
        assert_eq!(enc.get_tokens(), case.tokens.as_slice(), "{:?}", case.text);
        let plain = tok.encode(case.text.as_str(), false).unwrap();
        assert_eq!(tok.decode(plain.get_ids(), false).unwrap(), case.decoded, "{:?}", case.text);
        assert_eq!(tok.decode(&case.ids, true).unwrap(), case.decoded_skip_special, "{:?}", case.text);
    }

    // The chat template written next to it renders what transformers rendered.
    let template = ChatTemplate::from_dir(dir.path()).unwrap();
    let messages = [ChatMessage {
        role: "user".into(),
        content: vec![ContentPart::Image, ContentPart::Text("What is this?".into())],
    }];
    assert_eq!(template.render(&messages, true).unwrap(), fixture.chat_prompt);
    assert_eq!(template.special_tokens().bos_token.as_deref(), Some("<s>"));
}

#[test]
fn writing_twice_gives_identical_bytes() {
    for vocab in [512, 1000] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_eq!(write_demo_tokenizer(a.path(), vocab).unwrap(), write_demo_tokenizer(b.path(), vocab).unwrap());
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"] {
            let read = |d: &Path| std::fs::read(d.join(name)).unwrap();
            assert_eq!(read(a.path()), read(b.path()), "{name} differs between runs (vocab {vocab})");
        }
    }
}

#[test]
fn vocabulary_size_is_exact_within_the_corpus_range() {
    let min = FIXED_TOKENS + alphabet().len() + ADDED_TOKENS;
    assert_eq!(build_demo_tokenizer(min).unwrap().1.vocab_size, min);
    assert_eq!(build_demo_tokenizer(777).unwrap().1.vocab_size, 777);
    for bad in [0, min - 1, 100_000] {
        match build_demo_tokenizer(bad) {
            Err(DemoTokenizerError::VocabSize { requested, min: lo, max }) => {
                assert_eq!((requested, lo), (bad, min));
                assert!(max >= 1000, "the corpus only supports {max} tokens");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn any_utf8_encodes_without_unk_and_round_trips() {
    let (tok, ids) = build_demo_tokenizer(512).unwrap();
    // Every 97th scalar value across all planes (U+2581 `▁` itself is not among them: it
    // decodes to a space by design).
    let chars: String = (0u32..0x11_0000).step_by(97).filter_map(char::from_u32).collect();
    for chunk in chars.chars().collect::<Vec<_>>().chunks(64) {
        // A leading letter, because the `▁` prefix absorbs a leading space on decode.
        let text: String = std::iter::once('x').chain(chunk.iter().copied()).collect();
        let enc = tok.encode(text.as_str(), false).unwrap();
        assert!(!enc.get_ids().contains(&ids.unk_id), "<unk> in {text:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
}

#[test]
fn image_placeholders_are_single_special_tokens() {
    let (tok, ids) = build_demo_tokenizer(512).unwrap();
    let enc = tok.encode("<image>".repeat(576), true).unwrap();
    assert_eq!(enc.get_ids().len(), 577);
    assert_eq!(enc.get_ids()[0], ids.bos_id);
    assert!(enc.get_ids()[1..].iter().all(|&id| id == ids.image_id));
    // Text before an image is unaffected by it.
    let before = tok.encode("Describe it.", false).unwrap();
    let with_image = tok.encode("Describe it.<image>", false).unwrap();
    assert_eq!(&with_image.get_ids()[..before.len()], before.get_ids());
    assert_eq!(with_image.get_ids()[before.len()..], [ids.image_id]);
    // Image tokens are special: skipping them leaves nothing.
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "");
}
