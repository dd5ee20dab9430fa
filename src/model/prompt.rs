//! Chat prompts: finding a model's chat template the way transformers does, rendering messages
//! with it like `processor.apply_chat_template(messages, tokenize=False)`, and expanding image
//! placeholders like `LlavaProcessor` before the caller tokenizes.

mod jinja;

use std::path::{Path, PathBuf};

use minijinja::{Environment, Value};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// `chat_template` of llava-hf/llava-1.5-7b-hf's chat_template.json (written into demo checkpoints).
pub const LLAVA_15_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// The placeholder LLaVA processors use when `processor_config.json` names none.
pub const DEFAULT_IMAGE_TOKEN: &str = "<image>";

const JINJA_FILE: &str = "chat_template.jinja";
const TEMPLATE_JSON_FILE: &str = "chat_template.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const PROCESSOR_CONFIG_FILE: &str = "processor_config.json";

/// Errors while loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A file exists but could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or a field has the wrong type (`field` is its path in the file).
    #[error("{path}: field `{field}`: {source}")]
    Json {
        path: PathBuf,
        field: String,
        #[source]
        source: serde_json::Error,
    },
    /// A field is well-formed JSON but unusable.
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    /// The directory has no chat template in any of the places transformers looks.
    #[error(
        "{dir}: no chat template (looked for {JINJA_FILE}, `chat_template` in {TEMPLATE_JSON_FILE} \
         and `chat_template` in {TOKENIZER_CONFIG_FILE})"
    )]
    NoTemplate { dir: PathBuf },
    /// The template is not valid Jinja (for minijinja).
    #[error("chat template from {origin} does not compile: {source:#}")]
    Compile {
        origin: String,
        #[source]
        source: minijinja::Error,
    },
    /// The template called `raise_exception`, i.e. it rejects this conversation.
    #[error("the chat template rejected the conversation: {message}")]
    Rejected { message: String },
    /// Rendering failed for another reason.
    #[error("chat template from {origin} failed to render: {source:#}")]
    Render {
        origin: String,
        #[source]
        source: minijinja::Error,
    },
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    /// Text, rendered as `{"type": "text", "text": ...}`.
    Text(String),
    /// An image slot, rendered as `{"type": "image"}`; the pixels travel separately.
    Image,
}

/// A chat message in the shape transformers processors expect: a role and a list of parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text and image parts in order; string content is one text part.
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A message whose content is a single string (one text part).
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self { role: role.into(), content: vec![ContentPart::Text(text.into())] }
    }

    /// How many image parts this message carries.
    pub fn image_count(&self) -> usize {
        self.content.iter().filter(|p| matches!(p, ContentPart::Image)).count()
    }

    /// The template's view of the message; key order matches Python dicts so `tojson` agrees.
    fn to_value(&self) -> Value {
        let parts: Vec<Value> = self
            .content
            .iter()
            .map(|part| match part {
                ContentPart::Text(text) => {
                    Value::from_iter([("type", Value::from("text")), ("text", Value::from(text.as_str()))])
                }
                ContentPart::Image => Value::from_iter([("type", Value::from("image"))]),
            })
            .collect();
        Value::from_iter([("role", Value::from(self.role.as_str())), ("content", Value::from(parts))])
    }
}

/// Special tokens from `tokenizer_config.json` that templates may reference by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`, e.g. `<s>`.
    pub bos_token: Option<String>,
    /// `eos_token`, e.g. `</s>`.
    pub eos_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
}

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    special: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("special", &self.special).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in error messages.
    pub fn new(
        source: impl Into<String>,
        origin: impl Into<String>,
        special: SpecialTokens,
    ) -> Result<Self, PromptError> {
        let (source, origin) = (source.into(), origin.into());
        let env =
            jinja::environment(&source).map_err(|e| PromptError::Compile { origin: origin.clone(), source: e })?;
        Ok(Self { env, source, origin, special })
    }

    /// Loads the template of a model directory in transformers' order of preference:
    /// `chat_template.jinja`, then `chat_template.json`, then `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: TokenizerConfig =
            if config_path.is_file() { read_json(&config_path)? } else { TokenizerConfig::default() };
        let special = config.special_tokens();
        let origin = |p: &Path| p.display().to_string();

        let jinja_path = dir.join(JINJA_FILE);
        if jinja_path.is_file() {
            let source = read_text(&jinja_path)?;
            return Self::new(source, origin(&jinja_path), special);
        }
        let json_path = dir.join(TEMPLATE_JSON_FILE);
        if json_path.is_file() {
            let file: TemplateJson = read_json(&json_path)?;
            return Self::new(file.chat_template, origin(&json_path), special);
        }
        match config.chat_template {
            Some(TemplateField::Single(source)) => Self::new(source, origin(&config_path), special),
            // Several named templates: transformers uses the one called "default".
            Some(TemplateField::Named(list)) => match list.into_iter().find(|t| t.name == "default") {
                Some(t) => Self::new(t.template, format!("{} (\"default\")", origin(&config_path)), special),
                None => Err(PromptError::Field {
                    path: config_path,
                    field: "chat_template".into(),
                    message: "is a list of named templates without one named \"default\"".into(),
                }),
            },
            None => Err(PromptError::NoTemplate { dir: dir.to_path_buf() }),
        }
    }

    /// The template text as loaded (before generation tags are rewritten).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file path, or what the caller passed to [`Self::new`]).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The special tokens passed to the template.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages` like `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, PromptError> {
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        // The variables transformers' render_jinja_template passes, then the tokenizer's
        // special_tokens_map (only the tokens that are set, as in Python).
        let mut ctx = vec![
            ("messages", Value::from(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        let special = [
            ("bos_token", &self.special.bos_token),
            ("eos_token", &self.special.eos_token),
            ("unk_token", &self.special.unk_token),
            ("pad_token", &self.special.pad_token),
        ];
        ctx.extend(special.into_iter().filter_map(|(k, v)| Some((k, Value::from(v.as_deref()?)))));
        let render_err = |source: minijinja::Error| match rejection(&source) {
            Some(message) => PromptError::Rejected { message },
            None => PromptError::Render { origin: self.origin.clone(), source },
        };
        let template = self.env.get_template(jinja::TEMPLATE_NAME).map_err(render_err)?;
        template.render(Value::from_iter(ctx)).map_err(render_err)
    }
}

/// The message of a `raise_exception` call somewhere in the error's source chain.
fn rejection(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<jinja::Raised>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// Number of image placeholders in a rendered prompt (non-overlapping, like Python's `str.count`).
pub fn count_image_placeholders(prompt: &str, image_token: &str) -> usize {
    if image_token.is_empty() {
        return 0;
    }
    prompt.matches(image_token).count()
}

/// Repeats every `image_token` `num_image_tokens` times, as `LlavaProcessor` does before
/// tokenizing, so each image has one token per visual feature.
pub fn expand_image_tokens(prompt: &str, image_token: &str, num_image_tokens: usize) -> String {
    if image_token.is_empty() {
        return prompt.to_string();
    }
    prompt.replace(image_token, &image_token.repeat(num_image_tokens))
}

/// Repeats the i-th `image_token` `counts[i]` times (NeXT: each image's own count, as
/// `LlavaNextProcessor` expands them in order). Placeholders beyond `counts` stay as they are.
pub fn expand_image_tokens_each(prompt: &str, image_token: &str, counts: &[usize]) -> String {
    if image_token.is_empty() {
        return prompt.to_string();
    }
    let mut out = String::with_capacity(prompt.len() + counts.iter().sum::<usize>() * image_token.len());
    let mut pieces = prompt.split(image_token);
    out.push_str(pieces.next().unwrap_or_default());
    for (i, piece) in pieces.enumerate() {
        out.push_str(&image_token.repeat(counts.get(i).copied().unwrap_or(1)));
        out.push_str(piece);
    }
    out
}

/// Total image parts over all messages (must equal the images supplied with them).
pub fn count_images(messages: &[ChatMessage]) -> usize {
    messages.iter().map(ChatMessage::image_count).sum()
}

/// The image placeholder of a model directory: `image_token` in `processor_config.json`, else `<image>`.
pub fn image_token_from_dir(dir: &Path) -> Result<String, PromptError> {
    let path = dir.join(PROCESSOR_CONFIG_FILE);
    if !path.is_file() {
        return Ok(DEFAULT_IMAGE_TOKEN.to_string());
    }
    let config: ProcessorConfig = read_json(&path)?;
    Ok(config.image_token.unwrap_or_else(|| DEFAULT_IMAGE_TOKEN.to_string()))
}

/// The fields of `tokenizer_config.json` that matter for templates.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
    #[serde(default)]
    unk_token: Option<TokenField>,
    #[serde(default)]
    pad_token: Option<TokenField>,
}

impl TokenizerConfig {
    fn special_tokens(&self) -> SpecialTokens {
        let content = |t: &Option<TokenField>| t.as_ref().map(|t| t.content().to_string());
        SpecialTokens {
            bos_token: content(&self.bos_token),
            eos_token: content(&self.eos_token),
            unk_token: content(&self.unk_token),
            pad_token: content(&self.pad_token),
        }
    }
}

/// `chat_template` in tokenizer_config.json: one template, or a list of named ones.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a template string or a list of {\"name\", \"template\"} objects")]
enum TemplateField {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token: a plain string or a serialized `AddedToken` (`{"content": ...}`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a token string or an AddedToken object with `content`")]
enum TokenField {
    Plain(String),
    Added { content: String },
}

impl TokenField {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) | Self::Added { content: s } => s,
        }
    }
}

/// `chat_template.json`.
#[derive(Debug, Deserialize)]
struct TemplateJson {
    chat_template: String,
}

/// The field of `processor_config.json` that matters for prompts.
#[derive(Debug, Deserialize)]
struct ProcessorConfig {
    #[serde(default)]
    image_token: Option<String>,
}

fn read_text(path: &Path) -> Result<String, PromptError> {
    std::fs::read_to_string(path).map_err(|source| PromptError::Io { path: path.to_path_buf(), source })
}

/// Parses a JSON file, reporting the path of the offending field on error.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PromptError> {
    let text = read_text(path)?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| PromptError::Json {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        source: e.into_inner(),
    })
}

#[cfg(test)]
mod tests;
