//! Whether a tokenized prompt, and the answer asked for, fit the model's context.
//!
//! The check runs on the token counts alone: image tokens are counted from each image's header
//! size (a NeXT image takes 1,176 to 2,928 tokens depending on it), so a prompt whose images do
//! not fit is refused before any image is decoded or preprocessed, naming the image part whose
//! tokens first reach the limit.

use std::ops::Range;

use super::ValidationError;
use crate::protocol::ErrorCode;

/// The lengths the check needs, from a tokenized or a prepared prompt.
#[derive(Debug, Clone, Copy)]
pub struct PromptShape<'a> {
    /// Tokens in the whole prompt.
    pub tokens: usize,
    /// Each image's token range, in order.
    pub image_spans: &'a [Range<usize>],
    /// Each image's (height, width).
    pub image_sizes: &'a [(u32, u32)],
}

/// Refuses a prompt that leaves no room in `max_context` for a generated token, and a client's
/// `max_tokens` (named by `max_tokens_param`) larger than the room it leaves.
///
/// `image_parts` name the request's image parts in prompt order (`messages[i].content[j]`,
/// [`super::ImageRef::part`]); when the prompt is too long and an image's span is where the
/// running total reaches the context, the error names that image's part, otherwise `messages`.
pub fn check(
    prompt: PromptShape<'_>,
    image_parts: &[String],
    max_context: usize,
    max_tokens_param: Option<&str>,
    max_tokens: usize,
) -> Result<(), ValidationError> {
    let visual: usize = prompt.image_spans.iter().map(|s| s.len()).sum();
    if prompt.tokens >= max_context {
        // The first image whose last token reaches the limit, unless text before it already did.
        let crossing = prompt.image_spans.iter().position(|s| s.end >= max_context).filter(|&i| {
            let span = &prompt.image_spans[i];
            span.start < max_context
        });
        if let (Some(i), true) = (crossing, image_parts.len() == prompt.image_spans.len()) {
            let span = &prompt.image_spans[i];
            let before: usize = prompt.image_spans[..=i].iter().map(|s| s.len()).sum();
            let (h, w) = prompt.image_sizes.get(i).copied().unwrap_or_default();
            return Err(ValidationError::invalid(
                image_parts[i].as_str(),
                ErrorCode::ContextLengthExceeded,
                format!(
                    "this {w}x{h} image takes {} tokens and brings the prompt to {} tokens ({} text and {before} \
                     image tokens so far; {} tokens with {visual} image tokens in all), past what the \
                     model's {max_context}-token context holds with room for one generated token",
                    span.len(),
                    span.end,
                    span.end - before,
                    prompt.tokens
                ),
            ));
        }
        return Err(ValidationError::invalid(
            "messages",
            ErrorCode::ContextLengthExceeded,
            format!(
                "the prompt is {} tokens ({visual} of them image tokens); the model's context is {max_context}",
                prompt.tokens
            ),
        ));
    }
    if let Some(param) = max_tokens_param {
        let left = max_context - prompt.tokens;
        if max_tokens > left {
            return Err(ValidationError::invalid(
                param,
                ErrorCode::ContextLengthExceeded,
                format!(
                    "{param} is {max_tokens} but the prompt is {} tokens of the model's {max_context}-token context, \
                     which leaves {left}",
                    prompt.tokens
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::images::{ImageRef, ImageSource};

    fn image(part: &str) -> String {
        let r = ImageRef { param: format!("{part}.image_url.url"), source: ImageSource::Data(Vec::new()) };
        r.part().to_string()
    }

    fn param(e: ValidationError) -> (String, String) {
        match e {
            ValidationError::Invalid { param, message, code: ErrorCode::ContextLengthExceeded } => (param, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_image_whose_tokens_reach_the_context_is_named() {
        let images = [image("messages[0].content[0]"), image("messages[1].content[2]")];
        let spans = [5..105, 110..310];
        let sizes = [(10, 20), (30, 40)];
        let shape = |tokens| PromptShape { tokens, image_spans: &spans, image_sizes: &sizes };
        // 320 tokens fit a context of 321, not 320 (no room for an answer).
        assert!(check(shape(320), &images, 321, None, usize::MAX).is_ok());
        // The second image's tokens reach a context of 300.
        let (p, m) = param(check(shape(320), &images, 300, None, usize::MAX).unwrap_err());
        assert_eq!(p, "messages[1].content[2]");
        assert!(m.contains("40x30 image takes 200 tokens") && m.contains("310 tokens (10 text and 300 image"), "{m}");
        // The first image's last token at the limit: the first one is named.
        let (p, _) = param(check(shape(320), &images, 105, None, usize::MAX).unwrap_err());
        assert_eq!(p, "messages[0].content[0]");
        // Text after the last image crosses, and text before the first one: the messages.
        let (p, m) = param(check(shape(320), &images, 320, None, usize::MAX).unwrap_err());
        assert_eq!(p, "messages");
        assert!(m.contains("320 tokens (300 of them image tokens)"), "{m}");
        let (p, _) = param(check(shape(320), &images, 4, None, usize::MAX).unwrap_err());
        assert_eq!(p, "messages");
        // A max_tokens the context cannot honour names its parameter.
        let (p, m) = param(check(shape(320), &images, 400, Some("max_tokens"), 81).unwrap_err());
        assert_eq!(p, "max_tokens");
        assert!(m.contains("leaves 80"), "{m}");
        assert!(check(shape(320), &images, 400, Some("max_tokens"), 80).is_ok());
    }
}
