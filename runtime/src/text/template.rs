//! The chat template: the model's own Jinja template from `tokenizer_config.json`, rendered with
//! minijinja the way transformers' `apply_chat_template` renders it.
//!
//! Like transformers: `trim_blocks` and `lstrip_blocks` on, Python string methods (`startswith`, `split`,
//! `strip`, ...) available, `tojson` as Python's `json.dumps(ensure_ascii=False)` (`", "` and `": "`
//! separators, keys in the order given), and `raise_exception(msg)` failing the render.

use std::path::Path;

use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::error::RuntimeError;

/// A conversation turn as the template sees it: OpenAI-style JSON
/// (`{"role": "user", "content": "..."}`, assistant turns with `reasoning_content` or `tool_calls`,
/// `{"role": "tool", "content": "..."}` for tool responses).
pub type Message = serde_json::Value;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// What to render besides the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Tool definitions (JSON schemas), listed in the system turn.
    pub tools: Option<Vec<serde_json::Value>>,
    /// End with the assistant's turn header, ready for generation.
    pub add_generation_prompt: bool,
    /// Qwen3's switch; `None` leaves it undefined (the template's default: thinking on).
    pub enable_thinking: Option<bool>,
}

impl ChatTemplate {
    /// The `chat_template` of a model directory's `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<ChatTemplate, RuntimeError> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            RuntimeError::Input(format!(
                "cannot read {} (needed for the chat template): {e}",
                path.display()
            ))
        })?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::Input(format!("{} is not JSON: {e}", path.display())))?;
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            // A list of named templates: take "default".
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    RuntimeError::Input(format!("{}: no default chat template", path.display()))
                })?,
            _ => {
                return Err(RuntimeError::Input(format!(
                    "{} has no chat_template",
                    path.display()
                )))
            }
        };
        ChatTemplate::new(source)
    }

    /// Compiles a template source.
    pub fn new(source: String) -> Result<ChatTemplate, RuntimeError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| RuntimeError::Input(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` into the prompt text.
    pub fn render(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> Result<String, RuntimeError> {
        if messages.is_empty() {
            return Err(RuntimeError::Input("no messages to render".into()));
        }
        for (i, m) in messages.iter().enumerate() {
            if !m["role"].is_string() {
                return Err(RuntimeError::Input(format!(
                    "message {i} has no \"role\" string"
                )));
            }
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::Value::from(messages.to_vec()),
        );
        if let Some(tools) = &opts.tools {
            ctx.insert("tools".into(), serde_json::Value::from(tools.clone()));
        }
        ctx.insert(
            "add_generation_prompt".into(),
            opts.add_generation_prompt.into(),
        );
        if let Some(thinking) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), thinking.into());
        }
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| RuntimeError::Internal(e.to_string()))?;
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| RuntimeError::Input(format!("the chat template failed: {e:#}")))
    }
}

/// Python's `json.dumps(value, ensure_ascii=False)`.
fn tojson(value: &Value) -> Result<Value, Error> {
    let mut out = String::new();
    write_json(value, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &Value, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                if v.as_i64().is_some() {
                    out.push_str(&i.to_string());
                    return Ok(());
                }
            }
            let f = f64::try_from(v.clone())?;
            // Python prints floats with a fraction or an exponent: 1.0, 1e-06.
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&format!("{f}"));
            }
        }
        ValueKind::String => push_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn push_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
