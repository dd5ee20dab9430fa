//! The original LLaVA prompt as LLaVA-HR builds it: the `vicuna_v1` conversation, rendered as a
//! chat template, and `tokenizer_image_token`'s tokenization (each text chunk between images
//! tokenized on its own, the leading BOS kept once).

use tokenizers::Tokenizer;

use super::prompt::{ChatTemplate, SpecialTokens};
use super::{ModelError, Result};

/// `conv_vicuna_v1`: the default system line, `USER: `/`ASSISTANT: ` roles, a space after a user
/// turn and `</s>` after an assistant turn; images go first in a user turn, each as
/// `<image>\n` (LLaVA's `DEFAULT_IMAGE_TOKEN + '\n' + question`), then its text.
/// A system message replaces the default system line.
pub const VICUNA_V1_TEMPLATE: &str = concat!(
    "{%- if messages and messages[0]['role'] == 'system' -%}",
    "{{- messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}",
    "{%- else -%}",
    "{{- \"A chat between a curious user and an artificial intelligence assistant. ",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" -}}",
    "{%- endif -%}",
    "{{- ' ' -}}",
    "{%- for message in messages if message['role'] != 'system' -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- 'ASSISTANT: ' -}}",
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}",
    "{{- '</s>' -}}",
    "{%- else -%}",
    "{{- 'USER: ' -}}",
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}",
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}",
    "{{- ' ' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
);

/// The placeholder the template writes for an image.
pub const HR_IMAGE_TOKEN: &str = "<image>";

/// The compiled `vicuna_v1` template.
pub fn vicuna_v1() -> Result<ChatTemplate> {
    Ok(ChatTemplate::new(VICUNA_V1_TEMPLATE, "vicuna_v1 (LLaVA-HR)", SpecialTokens::default())?)
}

/// `tokenizer_image_token`: tokenizes the chunks of `text` between image placeholders separately
/// (each with the tokenizer's special tokens), keeps the first chunk's BOS once, and puts
/// `counts[i]` copies of `image_id` where image i was.
pub fn tokenize_chunks(tokenizer: &Tokenizer, text: &str, image_id: u32, counts: &[usize]) -> Result<Vec<u32>> {
    let chunks: Vec<&str> = text.split(HR_IMAGE_TOKEN).collect();
    if chunks.len() != counts.len() + 1 {
        return Err(ModelError::InvalidInput(format!(
            "the prompt has {} image placeholders but {} images were given",
            chunks.len() - 1,
            counts.len()
        )));
    }
    let encoded: Vec<Vec<u32>> = chunks
        .iter()
        .map(|c| {
            tokenizer.encode(*c, true).map(|e| e.get_ids().to_vec()).map_err(|e| ModelError::Tokenizer(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let bos = tokenizer.token_to_id("<s>");
    // The reference strips the first id of every chunk when the first chunk starts with BOS.
    let offset = usize::from(bos.is_some() && encoded[0].first().copied() == bos);
    let mut ids = Vec::new();
    if offset == 1 {
        ids.push(encoded[0][0]);
    }
    for (i, chunk) in encoded.iter().enumerate() {
        if i > 0 {
            ids.extend(std::iter::repeat_n(image_id, counts[i - 1]));
        }
        ids.extend(chunk.iter().skip(offset));
    }
    Ok(ids)
}
