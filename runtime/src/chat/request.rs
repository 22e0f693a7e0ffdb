//! Chat requests in the OpenAI shape (`messages`, `max_tokens`, `temperature`, `stop`, `tools`, ...) plus
//! Qwen3's `enable_thinking` (also as `chat_template_kwargs.enable_thinking`) and `thinking_budget`, turned
//! into a prompt and [`ChatOptions`]. Shared by the HTTP server and the C API.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::{kv_tokens, ChatOptions};
use crate::error::RuntimeError;
use crate::sampling::{SamplingOverrides, SamplingParams};
use crate::text::TextModel;

/// The fields of a chat request q3c reads; others are ignored.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    /// `temperature`, `top_p`, `top_k`, `min_p`, `presence_penalty`, `repetition_penalty`, `seed`.
    #[serde(flatten)]
    pub sampling: SamplingOverrides,
    pub stop: Option<Stop>,
    pub tools: Option<Vec<Value>>,
    pub enable_thinking: Option<bool>,
    pub thinking_budget: Option<usize>,
    pub chat_template_kwargs: Option<TemplateKwargs>,
}

/// `stop`: one string or several.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The template arguments a request may set.
#[derive(Deserialize, Debug, Clone)]
pub struct TemplateKwargs {
    pub enable_thinking: Option<bool>,
}

/// A request ready to decode.
pub struct Planned {
    pub prompt: Vec<u32>,
    pub opts: ChatOptions,
    /// KV-cache capacity the request needs (prompt, answer and the decoder's insertions).
    pub kv_tokens: usize,
    pub stream: bool,
    /// Whether the request offered tools (so `<tool_call>` blocks in the answer are calls).
    pub tools: bool,
}

impl ChatRequest {
    /// Parses a JSON body; every error names what is wrong.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, RuntimeError> {
        let req: ChatRequest = serde_json::from_slice(body)
            .map_err(|e| RuntimeError::Input(format!("invalid request body: {e}")))?;
        if req.messages.is_empty() {
            return Err(RuntimeError::Input("messages must not be empty".into()));
        }
        for (i, m) in req.messages.iter().enumerate() {
            if !m["role"].is_string() || !(m["content"].is_string() || m["content"].is_null()) {
                return Err(RuntimeError::Input(format!(
                    "messages[{i}] needs a string \"role\" and a string (or null) \"content\""
                )));
            }
        }
        Ok(req)
    }

    /// Renders the prompt and settles the options for a model whose conversations hold `context` tokens.
    /// Sampling defaults to Qwen3's recommendation for the request's mode.
    pub fn plan(self, text: &TextModel, context: usize) -> Result<Planned, RuntimeError> {
        let enable = self
            .enable_thinking
            .or(self.chat_template_kwargs.and_then(|k| k.enable_thinking))
            .unwrap_or(true);
        let budget = self.thinking_budget;
        let tools = self.tools.as_ref().is_some_and(|t| !t.is_empty());
        let (prompt, thinking) = text.prompt(&self.messages, self.tools, enable, budget)?;
        let fixed = kv_tokens(&text.tokenizer, prompt.len(), 0)?;
        let room = context.saturating_sub(fixed);
        let max_new_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(room);
        if fixed >= context || max_new_tokens > room {
            return Err(RuntimeError::Input(format!(
                "this model's context is {context} tokens; the prompt has {} and asks for {max_new_tokens} more",
                prompt.len()
            )));
        }
        let sampling = self.sampling.over(SamplingParams::for_mode(thinking));
        sampling.check()?;
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        Ok(Planned {
            kv_tokens: fixed + max_new_tokens,
            prompt,
            opts: ChatOptions {
                max_new_tokens,
                sampling,
                thinking,
                thinking_budget: budget,
                stop,
                cancel: Some(Arc::new(AtomicBool::new(false))),
            },
            stream: self.stream,
            tools,
        })
    }
}
