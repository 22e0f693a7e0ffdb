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
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    pub stream_options: Option<StreamOptions>,
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
    /// Choices asked for (1 to [`MAX_CHOICES`]): each decoded as its own sequence after the shared prompt.
    pub n: Option<usize>,
    /// Each answer token's log-probability, with `top_logprobs` (0–20) alternatives.
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
}

/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 8;

/// The number of choices a request's `n` asks for, or why it cannot.
fn choices(n: Option<usize>) -> Result<usize, RuntimeError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n),
        n => Err(RuntimeError::Input(format!(
            "n is {n}: a request asks for 1 to {MAX_CHOICES} choices"
        ))),
    }
}

/// The roles a message may have (`developer` is read as `system`, as OpenAI defines it).
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// `stop`: one string or several.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize, Debug, Clone)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
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
    /// Whether a stream ends with a chunk holding only the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Whether the request offered tools (so `<tool_call>` blocks in the answer are calls).
    pub tools: bool,
    /// Choices to decode (`n`), each its own sequence after the prompt.
    pub n: usize,
}

/// The error of a request that does not fit in the context.
fn too_long(context: usize, prompt: usize, max_new_tokens: usize) -> RuntimeError {
    RuntimeError::Input(format!(
        "this model's context is {context} tokens; the prompt has {prompt} and asks for {max_new_tokens} more"
    ))
}

/// How long and in which mode a planned request decodes.
struct Limits {
    max_new_tokens: usize,
    thinking: bool,
    thinking_budget: Option<usize>,
    raw: bool,
    logprobs: Option<usize>,
}

impl Planned {
    /// A non-streamed plan of `prompt` with these sampling parameters (checked), limits and stop strings.
    fn settle(
        prompt: Vec<u32>,
        kv_tokens: usize,
        sampling: SamplingParams,
        limits: Limits,
        stop: Option<Stop>,
    ) -> Result<Planned, RuntimeError> {
        sampling.check()?;
        let stop = match stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        Ok(Planned {
            kv_tokens,
            prompt,
            opts: ChatOptions {
                max_new_tokens: limits.max_new_tokens,
                sampling,
                thinking: limits.thinking,
                thinking_budget: limits.thinking_budget,
                stop,
                cancel: Some(Arc::new(AtomicBool::new(false))),
                raw: limits.raw,
                logprobs: limits.logprobs,
            },
            stream: false,
            include_usage: false,
            tools: false,
            n: 1,
        })
    }

    /// The options of choice `i` (of `n`): the request's, with the sampling seed advanced by `i`, so seeded
    /// choices differ from each other and choice 0 is what `n = 1` gives.
    pub fn choice_options(&self, i: usize) -> ChatOptions {
        let mut opts = self.opts.clone();
        opts.sampling.seed = opts.sampling.seed.wrapping_add(i as u64);
        opts
    }

    /// The plan with the request's streaming choices, whether it offered tools, and its choices.
    fn streamed(
        self,
        stream: bool,
        options: Option<StreamOptions>,
        tools: bool,
        n: usize,
    ) -> Planned {
        Planned {
            stream,
            include_usage: options.is_some_and(|o| o.include_usage),
            tools,
            n,
            ..self
        }
    }
}

impl ChatRequest {
    /// Parses a JSON body; every error names what is wrong.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, RuntimeError> {
        let req: ChatRequest = serde_json::from_slice(body)
            .map_err(|e| RuntimeError::Input(format!("invalid request body: {e}")))?;
        let mut req = req;
        if req.messages.is_empty() {
            return Err(RuntimeError::Input("messages must not be empty".into()));
        }
        choices(req.n)?;
        match (req.logprobs, req.top_logprobs) {
            (_, Some(k)) if k > 20 => {
                return Err(RuntimeError::Input(format!(
                    "top_logprobs is {k}: at most 20"
                )))
            }
            (Some(true), _) | (_, None) => {}
            (_, Some(_)) => {
                return Err(RuntimeError::Input(
                    "top_logprobs needs \"logprobs\": true".into(),
                ))
            }
        }
        for (i, m) in req.messages.iter_mut().enumerate() {
            let bad = |what: String| RuntimeError::Input(format!("messages[{i}]: {what}"));
            let role = m["role"]
                .as_str()
                .ok_or_else(|| bad("needs a string \"role\"".into()))?;
            if !ROLES.contains(&role) {
                return Err(bad(format!(
                    "unknown role {role:?} (one of {})",
                    ROLES.join(", ")
                )));
            }
            if role == "developer" {
                m["role"] = "system".into();
            }
            // A list of content parts (OpenAI's newer shape) is its text parts, joined.
            if let Some(parts) = m["content"].as_array() {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(bad(format!(
                                "content[{j}] is {}: only text parts are supported",
                                kind.map_or("not a text part".to_string(), |k| format!(
                                    "a {k:?} part"
                                ))
                            )))
                        }
                    }
                }
                m["content"] = text.into();
            }
            if !(m["content"].is_string() || m["content"].is_null()) {
                return Err(bad(
                    "\"content\" must be a string, a list of text parts, or null".into(),
                ));
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
            return Err(too_long(context, prompt.len(), max_new_tokens));
        }
        let sampling = self.sampling.over(SamplingParams::for_mode(thinking));
        let opts = Limits {
            max_new_tokens,
            thinking,
            thinking_budget: budget,
            raw: false,
            logprobs: (self.logprobs == Some(true)).then(|| self.top_logprobs.unwrap_or(0)),
        };
        let n = choices(self.n)?;
        Planned::settle(prompt, fixed + max_new_tokens, sampling, opts, self.stop)
            .map(|p| p.streamed(self.stream, self.stream_options, tools, n))
    }
}

/// A text completion request (`/v1/completions`): a raw `prompt` (text, or token ids) continued as is — no
/// chat template, no thinking block; control-token strings in the text are control tokens (the client owns
/// the whole prompt).
#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's default is 16.
    pub max_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingOverrides,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub echo: Option<bool>,
    pub logprobs: Option<Value>,
    pub suffix: Option<String>,
}

/// `prompt`: a string, token ids, or a list holding one of those.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

impl CompletionRequest {
    /// Parses a JSON body; every error names what is wrong.
    pub fn parse(body: &[u8]) -> Result<CompletionRequest, RuntimeError> {
        let req: CompletionRequest = serde_json::from_slice(body)
            .map_err(|e| RuntimeError::Input(format!("invalid request body: {e}")))?;
        let refuse = |what: &str| Err(RuntimeError::Input(what.to_string()));
        choices(req.n)?;
        if req.echo == Some(true) {
            return refuse("echo is not supported");
        }
        if req.logprobs.as_ref().is_some_and(|l| !l.is_null()) {
            return refuse("logprobs are not supported");
        }
        if req.suffix.is_some() {
            return refuse("suffix is not supported");
        }
        Ok(req)
    }

    /// Tokenizes the prompt and settles the options for a model whose sequences hold `context` tokens.
    pub fn plan(self, text: &TextModel, context: usize) -> Result<Planned, RuntimeError> {
        let prompt = match self.prompt {
            PromptInput::Text(t) => text.tokenizer.encode(&t)?,
            PromptInput::Ids(ids) => ids,
            PromptInput::Texts(mut t) if t.len() == 1 => text.tokenizer.encode(&t.remove(0))?,
            PromptInput::IdLists(mut l) if l.len() == 1 => l.remove(0),
            _ => {
                return Err(RuntimeError::Input(
                    "prompt: one prompt per request (a string or a list of token ids)".into(),
                ))
            }
        };
        if prompt.is_empty() {
            return Err(RuntimeError::Input("prompt is empty".into()));
        }
        let vocab = text.tokenizer.vocab_size();
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::Input(format!(
                "prompt: token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        let max_new_tokens = self.max_tokens.unwrap_or(16);
        if prompt.len() + max_new_tokens > context {
            return Err(too_long(context, prompt.len(), max_new_tokens));
        }
        let sampling = self.sampling.over(SamplingParams::for_mode(false));
        let opts = Limits {
            max_new_tokens,
            thinking: false,
            thinking_budget: None,
            raw: true,
            logprobs: None,
        };
        let kv_tokens = prompt.len() + max_new_tokens;
        let n = choices(self.n)?;
        Planned::settle(prompt, kv_tokens, sampling, opts, self.stop)
            .map(|p| p.streamed(self.stream, self.stream_options, false, n))
    }
}

#[cfg(test)]
mod tests {
    use super::{ChatRequest, MAX_CHOICES};

    fn parse(body: serde_json::Value) -> Result<ChatRequest, String> {
        ChatRequest::parse(body.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn logprobs_are_asked_for_within_bounds() {
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert!(
            parse(serde_json::json!({"messages": msgs, "logprobs": true, "top_logprobs": 20}))
                .is_ok()
        );
        assert_eq!(
            parse(serde_json::json!({"messages": msgs, "top_logprobs": 2})).unwrap_err(),
            "top_logprobs needs \"logprobs\": true"
        );
        assert_eq!(
            parse(serde_json::json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}))
                .unwrap_err(),
            "top_logprobs is 21: at most 20"
        );
    }

    #[test]
    fn content_parts_are_joined_and_roles_checked() {
        let req = parse(serde_json::json!({"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        ]}))
        .unwrap();
        assert_eq!(req.messages[0]["role"], "system");
        assert_eq!(req.messages[1]["content"], "Hello, world");
        let image = parse(
            serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}),
        );
        assert!(image
            .unwrap_err()
            .contains("content[0] is a \"image_url\" part"));
        let role = parse(serde_json::json!({"messages": [{"role": "wizard", "content": "hi"}]}));
        assert!(role.unwrap_err().contains("unknown role \"wizard\""));
        for n in [0, MAX_CHOICES + 1] {
            let refused =
                parse(serde_json::json!({"n": n, "messages": [{"role": "user", "content": "hi"}]}));
            assert!(refused.unwrap_err().contains(&format!("n is {n}")));
        }
        for n in [1, 3, MAX_CHOICES] {
            assert!(parse(
                serde_json::json!({"n": n, "messages": [{"role": "user", "content": "hi"}]})
            )
            .is_ok());
        }
        let number = parse(serde_json::json!({"messages": [{"role": "user", "content": 7}]}));
        assert!(number.unwrap_err().contains("must be a string"));
    }
}
