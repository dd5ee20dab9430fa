//! Unit tests of request validation (ranges, combinations, conversion to template messages).

use super::*;
use crate::protocol::{ChatRequest, ErrorCode};

fn settings() -> ValidationSettings {
    ValidationSettings {
        served_model_name: "demo".into(),
        images: ImageLimits::default(),
        default_budget: None,
        detail_low_budget: 0.7,
    }
}

fn check(json: serde_json::Value) -> Result<ValidRequest, ValidationError> {
    let req: ChatRequest = serde_json::from_value(json).unwrap();
    validate(req, &settings())
}

fn param_of(json: serde_json::Value) -> String {
    match check(json) {
        Err(ValidationError::Invalid { param, .. }) => param,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn user(text: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": text}])
}

#[test]
fn defaults_are_openai_defaults() {
    let v = check(serde_json::json!({"messages": user("hi")})).unwrap();
    assert_eq!(v.params.sampling.temperature, 1.0);
    assert_eq!(v.params.sampling.top_p, 1.0);
    assert_eq!(v.params.max_tokens, usize::MAX);
    assert!(!v.stream && !v.include_usage && v.logprobs.is_none());
    assert_eq!(v.pruning, PruningChoice::Off);
    assert_eq!(v.messages, vec![ChatMessage::text("user", "hi")]);
}

#[test]
fn ranges_and_combinations_name_their_field() {
    let m = user("hi");
    assert_eq!(param_of(serde_json::json!({"messages": m, "temperature": 2.5})), "temperature");
    assert_eq!(param_of(serde_json::json!({"messages": m, "top_p": 0.0})), "top_p");
    assert_eq!(param_of(serde_json::json!({"messages": m, "max_tokens": 0})), "max_tokens");
    assert_eq!(param_of(serde_json::json!({"messages": m, "max_completion_tokens": -3})), "max_completion_tokens");
    assert_eq!(param_of(serde_json::json!({"messages": m, "n": 2})), "n");
    assert_eq!(param_of(serde_json::json!({"messages": m, "stop": ["a", "b", "c", "d", "e"]})), "stop");
    assert_eq!(param_of(serde_json::json!({"messages": m, "logprobs": true, "top_logprobs": 21})), "top_logprobs");
    assert_eq!(param_of(serde_json::json!({"messages": m, "top_logprobs": 2})), "top_logprobs");
    assert_eq!(
        param_of(serde_json::json!({"messages": m, "stream_options": {"include_usage": true}})),
        "stream_options"
    );
    assert_eq!(param_of(serde_json::json!({"messages": m, "pruning": {"budget": 1.0}})), "pruning.budget");
    assert_eq!(param_of(serde_json::json!({"messages": m, "pruning": {"budget": 0.5, "recipe_id": "x"}})), "pruning");
    assert_eq!(param_of(serde_json::json!({"messages": m, "pruning": {}})), "pruning");
    assert_eq!(param_of(serde_json::json!({"messages": m, "presence_penalty": 0.5})), "presence_penalty");
    assert_eq!(param_of(serde_json::json!({"messages": m, "tools": [{"type": "function"}]})), "tools");
    assert_eq!(
        param_of(serde_json::json!({"messages": m, "response_format": {"type": "json_object"}})),
        "response_format"
    );
    assert_eq!(param_of(serde_json::json!({"messages": []})), "messages");
    assert_eq!(param_of(serde_json::json!({"messages": [{"role": "assistant"}]})), "messages[0].content");
}

#[test]
fn neutral_values_of_unsupported_fields_pass() {
    let v = check(serde_json::json!({
        "messages": user("hi"), "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
        "tools": [], "response_format": {"type": "text"}, "n": 1, "user": "someone"
    }));
    assert!(v.is_ok(), "{v:?}");
}

#[test]
fn unknown_model_is_its_own_error() {
    let e = check(serde_json::json!({"model": "gpt-4o", "messages": user("hi")})).unwrap_err();
    assert!(matches!(e, ValidationError::UnknownModel { .. }), "{e:?}");
}

#[test]
fn options_carry_through() {
    let v = check(serde_json::json!({
        "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "seed": 3, "stop": "x",
        "stream": true, "stream_options": {"include_usage": true},
        "logprobs": true, "top_logprobs": 3, "return_tokens_as_token_ids": true,
        "pruning": {"recipe_id": "r1"}
    }))
    .unwrap();
    assert_eq!(v.params.max_tokens, 7, "max_completion_tokens wins");
    assert_eq!(v.params.sampling.seed, Some(3));
    assert_eq!(v.params.sampling.top_logprobs, 3);
    assert_eq!(v.params.stop, vec!["x"]);
    assert!(v.stream && v.include_usage);
    assert_eq!(v.logprobs, Some(LogprobOptions { top: 3, as_token_ids: true }));
    assert_eq!(v.pruning, PruningChoice::RecipeId("r1".into()));
    assert_eq!(v.messages[0].role, "system");
    assert_eq!(v.messages[1].content, vec![ContentPart::Text("look".into()), ContentPart::Image]);
    assert_eq!(v.images.len(), 1);
    assert_eq!(v.images[0].param, "messages[1].content[1].image_url.url");
}

#[test]
fn image_count_limit_and_default_budget() {
    let part = serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
    let parts: Vec<_> = (0..9).map(|_| part.clone()).collect();
    let e = check(serde_json::json!({"messages": [{"role": "user", "content": parts}]})).unwrap_err();
    assert!(matches!(e, ValidationError::Invalid { code: ErrorCode::TooManyImages, .. }), "{e:?}");
    let req: ChatRequest = serde_json::from_value(serde_json::json!({"messages": user("hi")})).unwrap();
    let v = validate(req, &ValidationSettings { default_budget: Some(0.4), ..settings() }).unwrap();
    assert_eq!(v.pruning, PruningChoice::Budget(0.4));
}
