//! A deterministic Llama-style BPE tokenizer (byte fallback, `▁` word marker) for demo checkpoints,
//! written as the files transformers' `AutoTokenizer` / `AutoProcessor` load.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::prompt::LLAVA_15_CHAT_TEMPLATE;

/// Files and ids of a generated demo tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoTokenizer {
    /// Number of tokens including the added `<image>` and `<pad>` (Python's `len(tokenizer)`).
    pub vocab_size: usize,
    /// `<s>`, added at the start of every encoding.
    pub bos_id: u32,
    /// `</s>`.
    pub eos_id: u32,
    /// `<unk>` (never produced: unknown characters fall back to byte tokens).
    pub unk_id: u32,
    /// `<pad>`.
    pub pad_id: u32,
    /// `<image>`, the placeholder the processor expands.
    pub image_id: u32,
}

/// Errors while generating the demo tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum DemoTokenizerError {
    /// The requested vocabulary cannot be built from the built-in corpus.
    #[error("demo tokenizer: a vocabulary of {requested} tokens is not possible (must be {min}..={max})")]
    VocabSize { requested: usize, min: usize, max: usize },
    /// The tokenizers crate rejected a component.
    #[error("demo tokenizer: {0}")]
    Build(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sentencepiece's word-start marker, which stands for a space.
const SPACE: char = '\u{2581}';
const UNK: &str = "<unk>";
const BOS: &str = "<s>";
const EOS: &str = "</s>";
const PAD: &str = "<pad>";
const IMAGE: &str = "<image>";
/// `<unk>`, `<s>`, `</s>` and the 256 byte tokens come first, as in Llama's vocabulary.
const FIXED_TOKENS: usize = 3 + 256;
/// `<image>` and `<pad>` are added after the model vocabulary, as in llava-1.5-hf.
const ADDED_TOKENS: usize = 2;

/// Text the merges are learned from. It has no `<` or `>`, so no merge can spell a special or
/// byte token.
const CORPUS: &str = "The picture shows a small brown dog sitting on a green lawn in front of a white house.
A woman is riding a red bicycle down a quiet street lined with tall trees.
Two children are playing with a yellow ball on the beach while the sun sets over the sea.
What is shown in this image? The image shows a cat sleeping on a blue sofa next to a window.
Describe the scene in detail. There is a wooden table with a bowl of fresh fruit, a glass of water and an open book.
How many people are in the photo? There are three people standing near the door of a train.
What colour is the car? The car is black, and it is parked beside a red fire hydrant.
Is there anything unusual about this picture? Yes, a horse is standing inside a kitchen, which is not something you see every day.
The sky is clear and bright blue, with a few white clouds drifting above the mountains.
A man in a dark jacket is holding an umbrella because it is raining heavily in the city.
The street sign says stop, and behind it there is a bus waiting at the traffic light.
A plate of pasta with tomato sauce and cheese sits on a kitchen counter beside a knife and a fork.
The building in the background is very old, with large windows and a tall clock tower.
On the left side of the image you can see a boat floating on a calm lake surrounded by forest.
The bird on the branch has bright orange feathers and a short black beak.
Can you read the text on the sign? The sign reads open every day from nine in the morning until six in the evening.
The man is wearing a helmet and skiing down a snowy slope while other people watch from the lift.
A group of friends are sitting around a table, eating pizza and laughing together.
The laptop on the desk is open, and there is a cup of coffee and a pair of glasses next to it.
This is a photograph of a busy market where people are buying vegetables, bread and flowers.
The giraffe is eating leaves from the top of a tree while a zebra stands in the grass below.
A young girl is flying a kite in a wide field on a windy afternoon.
The train is crossing a long bridge over a river, and the water below is dark and fast.
There are many boats in the harbour, and the houses on the hill are painted in different colours.
The kitchen has white cabinets, a silver refrigerator and a small plant on the windowsill.
Please answer the question using a single word or phrase.
Answer with the option letter from the given choices directly.
The elephant is walking slowly across the dusty road, followed by a smaller elephant.
Someone has left a skateboard and a backpack on the bench in the park.
The pizza has slices of pepperoni, green peppers, onions and melted cheese on top.
A surfer is riding a large wave, and the ocean spray is catching the light of the morning sun.
The bathroom is clean and bright, with a mirror above the sink and towels hanging on the wall.
Look at the image carefully and explain what the people are doing and why.
They appear to be waiting for the bus, because they are standing at the stop and looking down the road.
The clock on the wall shows that it is ten past four in the afternoon.
A teddy bear is sitting on the bed, and the room is decorated with pictures of stars and planets.
The player is about to hit the tennis ball with his racket, and the crowd is watching closely.
In the centre of the photo there is a large cake with candles, so it is probably a birthday party.
The road is wet, the lights of the shops are reflected on it, and the night is quiet.
Thank you for the question. I think the answer is that the animal is a sheep, not a goat.
The weather looks cold, since everyone is wearing a coat, a hat and gloves.
An airplane is flying low over the airport, and several other planes are parked near the terminal.
The vase on the shelf holds a bunch of purple and white flowers.
A cow is standing in the middle of a field with a fence and a barn behind it.
The motorcycle is parked on the side of the road next to a small cafe with chairs outside.
This image contains a chart showing that the number of visitors grew every year.
The answer is yes. The answer is no. It is hard to tell from this picture.
Hello, how can I help you today? I can describe images, answer questions and explain what I see.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
USER: What is in the image? ASSISTANT: A dog is running on the grass.
USER: Where was this photo taken? ASSISTANT: It was probably taken in a park; there are trees, benches and a pond.
It's 7:30 and the shop (on the corner) is closed - try again at 9 or 10!
The prices were 1, 2, 3, 4, 5, 6, 7, 8, 9 and 0 dollars; \"cheap\" she said, and/or \"fine\".
";

/// Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.json
/// into `dir`; the same `target_vocab` always gives byte-identical files.
pub fn write_demo_tokenizer(dir: &Path, target_vocab: usize) -> Result<DemoTokenizer, DemoTokenizerError> {
    let (tokenizer, ids) = build_demo_tokenizer(target_vocab)?;
    let json = tokenizer.to_string(true).map_err(|e| DemoTokenizerError::Build(e.to_string()))?;
    write(dir, "tokenizer.json", json)?;
    write(dir, "tokenizer_config.json", pretty(&tokenizer_config(&ids))?)?;
    write(dir, "special_tokens_map.json", pretty(&special_tokens_map())?)?;
    write(dir, "chat_template.json", pretty(&json!({ "chat_template": LLAVA_15_CHAT_TEMPLATE }))?)?;
    Ok(ids)
}

/// Builds the tokenizer: learned BPE over the corpus, Llama-2 (non-legacy) pre-tokenizer and
/// decoder, `<s>` prepended by the post-processor.
pub fn build_demo_tokenizer(target_vocab: usize) -> Result<(Tokenizer, DemoTokenizer), DemoTokenizerError> {
    let alphabet = alphabet();
    let min = FIXED_TOKENS + alphabet.len() + ADDED_TOKENS;
    let learned = learn_merges(&alphabet, target_vocab.saturating_sub(min));
    let max = min + learned.tokens.len();
    if target_vocab < min || max < target_vocab {
        let max = min + learn_merges(&alphabet, usize::MAX).tokens.len();
        return Err(DemoTokenizerError::VocabSize { requested: target_vocab, min, max });
    }

    let mut tokens: Vec<String> = [UNK, BOS, EOS].map(String::from).to_vec();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(alphabet.iter().map(char::to_string));
    tokens.extend(learned.tokens);
    let vocab: Vocab = tokens.iter().zip(0u32..).map(|(t, id)| (t.clone(), id)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, learned.merges)
        .unk_token(UNK.into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| DemoTokenizerError::Build(format!("BPE: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    // Like transformers' LlamaConverter with legacy=False: spaces become `▁`, and one is prepended
    // only at the start of the input, not after special tokens (llava-1.5-hf's legacy normalizer
    // adds one after `<image>`), so prompts with placeholders decode back to themselves.
    tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE, PrependScheme::First, false)));
    let replace = Replace::new(SPACE.to_string(), " ").map_err(|e| DemoTokenizerError::Build(e.to_string()))?;
    tokenizer.with_decoder(Some(Sequence::new(vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    let bos_id = 1;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS}:1 $B:1")))
        .map_err(DemoTokenizerError::Build)?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| DemoTokenizerError::Build(format!("post-processor: {e}")))?;
    tokenizer.with_post_processor(Some(post));
    let specials = [UNK, BOS, EOS, IMAGE, PAD].map(|t| AddedToken::from(t, true));
    tokenizer.add_special_tokens(specials).map_err(|e| DemoTokenizerError::Build(format!("special tokens: {e}")))?;

    let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| DemoTokenizerError::Build(format!("{t} has no id")));
    let ids = DemoTokenizer {
        vocab_size: tokenizer.get_vocab_size(true),
        bos_id: id(BOS)?,
        eos_id: id(EOS)?,
        unk_id: id(UNK)?,
        pad_id: id(PAD)?,
        image_id: id(IMAGE)?,
    };
    if ids.vocab_size != target_vocab || ids.bos_id != bos_id {
        return Err(DemoTokenizerError::Build(format!("built {ids:?} for a vocabulary of {target_vocab}")));
    }
    Ok((tokenizer, ids))
}

/// Single-character tokens: the word marker and printable ASCII; anything else falls back to bytes.
fn alphabet() -> Vec<char> {
    let mut chars: Vec<char> = (0x21u8..=0x7e).map(char::from).collect();
    chars.push(SPACE);
    chars
}

/// Merges learned from the corpus and the new tokens they produce, in order.
struct Learned {
    merges: Vec<(String, String)>,
    tokens: Vec<String>,
}

/// Classic BPE training, stopping after `new_tokens` tokens or when every word is one token.
/// The most frequent adjacent pair is merged first; ties go to the lexicographically smallest
/// pair, so the result does not depend on hash order.
fn learn_merges(alphabet: &[char], new_tokens: usize) -> Learned {
    let mut symbols: Vec<String> = alphabet.iter().map(char::to_string).collect();
    let mut index: HashMap<String, u32> = symbols.iter().cloned().zip(0u32..).collect();
    let mut words: Vec<(Vec<u32>, u64)> = Vec::new();
    for (word, count) in corpus_words() {
        let ids = word.chars().map(|c| index.get(&c.to_string()).copied()).collect::<Option<Vec<u32>>>();
        // Characters outside the alphabet never occur in the corpus; skipping keeps this total.
        if let Some(ids) = ids {
            words.push((ids, count));
        }
    }
    let mut learned = Learned { merges: Vec::new(), tokens: Vec::new() };
    while learned.tokens.len() < new_tokens {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (ids, count) in &words {
            for pair in ids.windows(2) {
                *pairs.entry((pair[0], pair[1])).or_default() += count;
            }
        }
        let key = |&(pair, count): &((u32, u32), u64)| {
            (count, std::cmp::Reverse((symbols[pair.0 as usize].clone(), symbols[pair.1 as usize].clone())))
        };
        let Some(((left, right), _)) = pairs.into_iter().max_by_key(key) else { break };
        let merged = format!("{}{}", symbols[left as usize], symbols[right as usize]);
        let new_id = match index.get(&merged) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(symbols.len()).unwrap_or(u32::MAX);
                symbols.push(merged.clone());
                index.insert(merged.clone(), id);
                learned.tokens.push(merged);
                id
            }
        };
        learned.merges.push((symbols[left as usize].clone(), symbols[right as usize].clone()));
        for (ids, _) in &mut words {
            merge_pair(ids, (left, right), new_id);
        }
    }
    learned
}

/// Replaces each non-overlapping occurrence of `pair` (left to right) with `new_id`.
fn merge_pair(ids: &mut Vec<u32>, pair: (u32, u32), new_id: u32) {
    let mut out = Vec::with_capacity(ids.len());
    let mut i = 0;
    while i < ids.len() {
        if i + 1 < ids.len() && (ids[i], ids[i + 1]) == pair {
            out.push(new_id);
            i += 2;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    *ids = out;
}

/// Corpus words with counts, split like sentencepiece: a `▁` before each whitespace-separated
/// word, letter runs kept together, digits and punctuation on their own.
fn corpus_words() -> BTreeMap<String, u64> {
    let mut words = BTreeMap::new();
    for word in CORPUS.split_whitespace() {
        let mut piece = String::from(SPACE);
        for c in word.chars() {
            let joins =
                c.is_ascii_alphabetic() && piece.chars().last().is_some_and(|p| p.is_ascii_alphabetic() || p == SPACE);
            if !joins && piece != SPACE.to_string() {
                *words.entry(std::mem::take(&mut piece)).or_insert(0) += 1;
            }
            piece.push(c);
        }
        *words.entry(piece).or_insert(0) += 1;
    }
    words
}

/// tokenizer_config.json for transformers: a plain fast tokenizer over tokenizer.json, so both
/// transformers 4.x and 5.x load it without rebuilding the pre-tokenizer or post-processor.
fn tokenizer_config(ids: &DemoTokenizer) -> Value {
    let added: serde_json::Map<String, Value> = [(ids.unk_id, UNK), (ids.bos_id, BOS), (ids.eos_id, EOS), (ids.image_id, IMAGE), (ids.pad_id, PAD)]
        .into_iter()
        .map(|(id, content)| {
            let token = json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true});
            (id.to_string(), token)
        })
        .collect();
    json!({
        "added_tokens_decoder": added,
        "additional_special_tokens": [IMAGE],
        "bos_token": BOS,
        "chat_template": LLAVA_15_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS,
        "model_max_length": 4096,
        // Llama's tokenizers produce no token_type_ids; generate() rejects them.
        "model_input_names": ["input_ids", "attention_mask"],
        "pad_token": PAD,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK
    })
}

/// special_tokens_map.json, with tokens as serialized `AddedToken`s like Llama's.
fn special_tokens_map() -> Value {
    let token = |content: &str| json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    json!({
        "additional_special_tokens": [token(IMAGE)],
        "bos_token": token(BOS),
        "eos_token": token(EOS),
        "pad_token": token(PAD),
        "unk_token": token(UNK)
    })
}

fn pretty(value: &Value) -> Result<String, DemoTokenizerError> {
    serde_json::to_string_pretty(value).map_err(|e| DemoTokenizerError::Build(e.to_string()))
}

fn write(dir: &Path, name: &str, mut text: String) -> Result<(), DemoTokenizerError> {
    text.push('\n');
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| DemoTokenizerError::Io { path, source })
}

#[cfg(test)]
mod tests;
