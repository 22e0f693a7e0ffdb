"""Renders Qwen3's chat template with transformers and records the text and token ids.

Writes tests/reference/chat_templates.json: for each case the conversation, the render options, the prompt
text `apply_chat_template` produces and its token ids. The Rust tests render the same cases with minijinja
and tokenize with the `tokenizers` crate, and must agree exactly.

    .venv/bin/python tests/reference/make_chat_fixtures.py
"""

import json
import pathlib

from transformers import AutoTokenizer

HERE = pathlib.Path(__file__).parent
TOKENIZER = HERE / "tokenizer"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, \"now\".",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Name, e.g. Zürich"}, "days": {"type": "integer", "default": 1}},
            "required": ["city"],
        },
    },
}

CASES = [
    ("user only, thinking default", [{"role": "user", "content": "Hello!"}], {}),
    ("thinking off", [{"role": "user", "content": "Hello!"}], {"enable_thinking": False}),
    ("thinking on explicitly", [{"role": "user", "content": "Hello!"}], {"enable_thinking": True}),
    (
        "system prompt",
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2? /no_think"}],
        {},
    ),
    (
        "multi-turn drops earlier thinking",
        [
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "<think>\nSmall ones: 2, 3.\n</think>\n\n2"},
            {"role": "user", "content": "Another? /think"},
        ],
        {},
    ),
    (
        "reasoning_content field",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
        ],
        {"add_generation_prompt": False},
    ),
    (
        "tools and tool responses",
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Zürich and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                ],
            },
            {"role": "tool", "content": "{\"temp\": 3}"},
            {"role": "tool", "content": "{\"temp\": -2}"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        "unicode and special text",
        [{"role": "user", "content": "naïve café 🦙 — «quotes» \"and\" \\ backslash\ttab"}],
        {"enable_thinking": False},
    ),
]


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    out = []
    for name, messages, opts in CASES:
        kwargs = {"add_generation_prompt": opts.get("add_generation_prompt", True)}
        if "enable_thinking" in opts:
            kwargs["enable_thinking"] = opts["enable_thinking"]
        if "tools" in opts:
            kwargs["tools"] = opts["tools"]
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = tok.encode(text, add_special_tokens=False)
        out.append({"name": name, "messages": messages, "options": opts, "text": text, "ids": ids})
    path = HERE / "chat_templates.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} cases to {path}")


if __name__ == "__main__":
    main()
