"""Expected chat-template renderings from HF transformers, for `src/model/prompt.rs` tests.

Renders each case through `LlavaProcessor.apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)` -- the path a llava-hf checkpoint takes in transformers -- and writes
tests/fixtures/chat_template_expected.json. Needs transformers and jinja2 only (no torch).

    python tests/reference/chat_template_reference.py
"""

import json
import sys
from pathlib import Path

import jinja2
import transformers
from tokenizers import Tokenizer, models
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "chat_template_expected.json"

# `chat_template` of llava-hf/llava-1.5-7b-hf/chat_template.json on the hub.
LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Exercises what transformers' Jinja setup adds or configures: trim_blocks/lstrip_blocks,
# loop controls, whitespace-controlled generation tags, tojson options, special tokens,
# Python string methods, and Python-style printing of None/bools/lists/dicts/floats.
COMPAT = """{{ bos_token }}
{%- for message in messages %}
    {%- if loop.first and message['role'] == 'system' %}
[SYS] {{ message['content'][0]['text'].strip().upper() }}
        {% continue %}
    {%- endif %}
    {% if message.role == 'assistant' %}
  {%- generation -%}
    {{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{{ eos_token }}
  {%- endgeneration %}

    {% else %}
<{{ message.role | upper }}>
        {% for part in message.content %}
            {% if part.type == 'image' %}
[img]
            {% else %}
  {{ part.text.replace('  ', ' ').title() }}|{{ part.text.split(' ') | length }}|{{ part.text.startswith('Hi') }}
            {% endif %}
            {% if loop.index > 2 %}{% break %}{% endif %}
        {% endfor %}
    {% endif %}
{% endfor %}
{{ messages | tojson }}
{{ messages[-1] | tojson(indent=2) }}
{{ {"b": 1.5, "a": [1, 2.0, none, true, false, 1e20, 0.00001]} | tojson(sort_keys=true) }}
{{ messages[0] | tojson(separators=[",", ":"], ensure_ascii=true) }}
{{ none }} {{ true }} {{ [1, 'a', none, 2.5, {'k': "it's"}] }} {{ 3 / 2 }} {{ 4 / 2 }} {{ 1e16 * 1 }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}
"""

REJECT = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'user' %}"
    "{{ raise_exception('Conversations must start with a user message, got ' + message['role']) }}"
    "{% endif %}{{ message['role'] }}{% endfor %}"
)

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}


def user(*parts):
    return {"role": "user", "content": list(parts)}


CASES = [
    ("llava_user_image", LLAVA_15, [user(IMAGE, text("What is shown in this image?"))]),
    (
        "llava_system_user",
        LLAVA_15,
        [{"role": "system", "content": [text("You are a helpful assistant.")]}, user(text("Hello!"))],
    ),
    (
        "llava_multi_turn",
        LLAVA_15,
        [
            user(IMAGE, text("What is in the picture?")),
            {"role": "assistant", "content": [text("A cat on a sofa.")]},
            user(text("What colour is it?")),
        ],
    ),
    ("llava_two_images", LLAVA_15, [user(IMAGE, text("Compare these two images."), IMAGE)]),
    (
        "compat",
        COMPAT,
        [
            {"role": "system", "content": [text("  be brief  ")]},
            user(text("Hi  there, \"quoted\" <b>&</b>\ttab é 🦙 \x01"), IMAGE, text("second"), text("dropped")),
            {"role": "assistant", "content": [text("one"), IMAGE, text("two")]},
        ],
    ),
    ("rejected", REJECT, [{"role": "assistant", "content": [text("hello")]}]),
]


def main():
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")), **SPECIAL
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
    )
    cases = []
    for name, template, messages in CASES:
        for add_generation_prompt in (True, False):
            case = {
                "name": name,
                "template": template,
                "special_tokens": SPECIAL,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
            }
            try:
                case["expected"] = processor.apply_chat_template(
                    messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            except jinja2.exceptions.TemplateError as e:
                case["error"] = str(e)
            cases.append(case)
    doc = {
        "generated_by": "tests/reference/chat_template_reference.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
