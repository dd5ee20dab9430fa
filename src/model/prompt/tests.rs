//! Tests for chat-template loading, rendering (against transformers' output) and image expansion.

use std::path::Path;

use serde::Deserialize;

use super::*;

/// `chat_template` of llava-hf/llava-1.5-7b-hf/chat_template.json on the hub, kept apart from
/// [`LLAVA_15_CHAT_TEMPLATE`] so a change there is caught here.
const LLAVA_15_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    special_tokens: std::collections::BTreeMap<String, String>,
    messages: Vec<FixtureMessage>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct FixtureMessage {
    role: String,
    content: Vec<FixturePart>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum FixturePart {
    Text { text: String },
    Image,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn to_messages(messages: &[FixtureMessage]) -> Vec<ChatMessage> {
    let part = |p: &FixturePart| match p {
        FixturePart::Text { text } => ContentPart::Text(text.clone()),
        FixturePart::Image => ContentPart::Image,
    };
    messages
        .iter()
        .map(|m| ChatMessage { role: m.role.clone(), content: m.content.iter().map(part).collect() })
        .collect()
}

#[test]
fn renders_like_transformers_llava_processor() {
    let fixture = fixture();
    assert!(fixture.cases.len() >= 12);
    for case in &fixture.cases {
        let label = format!("{} (add_generation_prompt={})", case.name, case.add_generation_prompt);
        if case.name.starts_with("llava") {
            assert_eq!(case.template, LLAVA_15_TEMPLATE, "{label}: fixture uses another template");
        }
        let token = |k: &str| case.special_tokens.get(k).cloned();
        let special = SpecialTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            unk_token: token("unk_token"),
            pad_token: token("pad_token"),
        };
        let template = ChatTemplate::new(case.template.as_str(), case.name.as_str(), special).unwrap();
        let got = template.render(&to_messages(&case.messages), case.add_generation_prompt);
        match (&case.expected, &case.error, got) {
            (Some(want), None, Ok(got)) => assert_eq!(&got, want, "{label}"),
            (None, Some(want), Err(PromptError::Rejected { message })) => assert_eq!(&message, want, "{label}"),
            (_, _, got) => panic!("{label}: got {got:?}"),
        }
    }
}

#[test]
fn templates_can_move_to_the_model_thread() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ChatTemplate>();
}

#[test]
fn demo_template_is_llava_15() {
    assert_eq!(LLAVA_15_CHAT_TEMPLATE, LLAVA_15_TEMPLATE);
}

#[test]
fn llava_prompt_for_one_image() {
    let template = ChatTemplate::new(LLAVA_15_TEMPLATE, "llava", SpecialTokens::default()).unwrap();
    let messages =
        [ChatMessage { role: "user".into(), content: vec![ContentPart::Image, ContentPart::Text("Hi?".into())] }];
    assert_eq!(template.render(&messages, true).unwrap(), "USER: <image>\nHi? ASSISTANT:");
    // String content is one text part, as processors expect.
    assert_eq!(ChatMessage::text("user", "Hi?").content, vec![ContentPart::Text("Hi?".into())]);
    assert_eq!(count_images(&messages), 1);
}

#[test]
fn image_tokens_expand_like_llava_processor() {
    let prompt = "USER: <image>\n<image>\nCompare. ASSISTANT:";
    assert_eq!(count_image_placeholders(prompt, "<image>"), 2);
    assert_eq!(
        expand_image_tokens(prompt, "<image>", 3),
        "USER: <image><image><image>\n<image><image><image>\nCompare. ASSISTANT:"
    );
    assert_eq!(expand_image_tokens(prompt, "<image>", 0), "USER: \n\nCompare. ASSISTANT:");
    assert_eq!(count_image_placeholders("<image><image>", "<image>"), 2);
    assert_eq!(count_image_placeholders("no images", "<image>"), 0);
    assert_eq!(expand_image_tokens("a<image>b", "", 4), "a<image>b");
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn from_dir_prefers_jinja_then_json_then_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "tokenizer_config.json",
        r#"{"bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"}, "eos_token": "</s>",
            "pad_token": null, "chat_template": "config {{ bos_token }}{{ eos_token }}{{ pad_token }}"}"#,
    );
    let render = |d: &Path| ChatTemplate::from_dir(d).unwrap().render(&[], true).unwrap();
    assert_eq!(render(d), "config <s></s>");
    write(d, "chat_template.json", r#"{"chat_template": "json {{ bos_token }}"}"#);
    assert_eq!(render(d), "json <s>");
    write(d, "chat_template.jinja", "jinja {{ eos_token }}\n");
    assert_eq!(render(d), "jinja </s>");
    let t = ChatTemplate::from_dir(d).unwrap();
    assert!(t.origin().ends_with("chat_template.jinja"));
    assert_eq!(t.source(), "jinja {{ eos_token }}\n");
    assert_eq!(t.special_tokens().pad_token, None);
}

#[test]
fn tokenizer_config_named_templates_use_default() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}"#,
    );
    assert_eq!(ChatTemplate::from_dir(dir.path()).unwrap().render(&[], false).unwrap(), "plain");
    write(dir.path(), "tokenizer_config.json", r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#);
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("chat_template") && err.contains("default"), "{err}");
}

#[test]
fn errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = ChatTemplate::from_dir(d).unwrap_err().to_string();
    for looked_for in ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"] {
        assert!(err.contains(looked_for), "{err}");
    }

    write(d, "tokenizer_config.json", r#"{"eos_token": 7}"#);
    let err = ChatTemplate::from_dir(d).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("eos_token"), "{err}");

    write(d, "tokenizer_config.json", "{}");
    write(d, "chat_template.json", r#"{"template": "x"}"#);
    let err = ChatTemplate::from_dir(d).unwrap_err().to_string();
    assert!(err.contains("chat_template.json") && err.contains("chat_template"), "{err}");

    write(d, "chat_template.jinja", "{% for m in messages %}");
    let err = ChatTemplate::from_dir(d).unwrap_err();
    assert!(matches!(err, PromptError::Compile { .. }), "{err:?}");
    assert!(err.to_string().contains("chat_template.jinja"), "{err}");
}

#[test]
fn render_errors_that_are_not_rejections_name_the_origin() {
    let t = ChatTemplate::new("{{ messages[0].content.nope.deeper }}", "custom", SpecialTokens::default()).unwrap();
    let err = t.render(&[ChatMessage::text("user", "x")], true).unwrap_err();
    assert!(matches!(err, PromptError::Render { .. }) && err.to_string().contains("custom"), "{err}");
}

#[test]
fn strftime_now_prints_todays_date() {
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "date", SpecialTokens::default()).unwrap();
    let date = t.render(&[], true).unwrap();
    let bytes = date.as_bytes();
    assert_eq!(date.len(), 10, "{date}");
    assert!(date.starts_with("20") && bytes[4] == b'-' && bytes[7] == b'-', "{date}");
}

#[test]
fn image_token_comes_from_processor_config() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(image_token_from_dir(dir.path()).unwrap(), DEFAULT_IMAGE_TOKEN);
    write(dir.path(), "processor_config.json", r#"{"patch_size": 14}"#);
    assert_eq!(image_token_from_dir(dir.path()).unwrap(), "<image>");
    write(dir.path(), "processor_config.json", r#"{"image_token": "<img>", "patch_size": 14}"#);
    assert_eq!(image_token_from_dir(dir.path()).unwrap(), "<img>");
    write(dir.path(), "processor_config.json", r#"{"image_token": 3}"#);
    let err = image_token_from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("processor_config.json") && err.contains("image_token"), "{err}");
}

#[test]
fn each_image_expands_to_its_own_count() {
    let prompt = "USER: <image>\n<image>\nCompare. <image> ASSISTANT:";
    assert_eq!(
        expand_image_tokens_each(prompt, "<image>", &[2, 1, 3]),
        "USER: <image><image>\n<image>\nCompare. <image><image><image> ASSISTANT:"
    );
    assert_eq!(expand_image_tokens_each("a<image>b", "", &[4]), "a<image>b");
    assert_eq!(expand_image_tokens_each("no images", "<image>", &[]), "no images");
}
