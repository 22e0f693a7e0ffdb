//! Chat decoding with Qwen3's hybrid thinking: the `<think>` block, its budget, and the split of the
//! output into reasoning and content.
//!
//! With thinking on, the answer is preceded by `<think>\n … </think>\n\n`. If the model does not open the
//! block itself, the decoder does (`<think>\n` into the KV cache), so a budget always applies. When the
//! model has generated `budget` tokens inside the block without closing it, the decoder appends
//! [`EARLY_STOP`] (Qwen's sentence and `</think>\n\n`) to the KV cache and the model continues with the
//! answer. With thinking off (a budget of 0, `enable_thinking: false`, or a trailing `/no_think`), the
//! block is empty: `<think>\n\n</think>\n\n`, written by the template or, if the prompt lacks it, by the
//! decoder.
//!
//! `max_new_tokens` (a request's `max_tokens`) bounds every token after the prompt, those the decoder
//! inserts included, and the reasoning holds the block as the model sees it, early-stop sentence included.

mod request;
mod tools;

pub use request::{ChatRequest, CompletionRequest, Planned, Stop, TemplateKwargs, MAX_CHOICES};

pub use tools::{parse_tool_calls, ToolCallStream};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::RuntimeError;
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;
use crate::text::{Message, StreamDecoder, Tokenizer};

/// What the decoder appends when the budget runs out (Qwen's recipe, see `shared/qwen3/SPEC.md`).
pub const EARLY_STOP: &str = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>\n\n";
/// Opens a thinking block the model did not open.
pub const THINK_OPEN: &str = "<think>\n";
/// An empty thinking block: how a non-thinking answer starts.
pub const EMPTY_THINK: &str = "<think>\n\n</think>\n\n";
/// Generation stops at these (Qwen3's `<|im_end|>` and `<|endoftext|>`).
pub const STOP_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// One request's decoding settings.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// Most tokens of the answer as the model sees it: generated ones and those the decoder inserts (the
    /// opening `<think>`, the early-stop sentence, an empty block) alike, as `max_tokens` bounds them.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Whether the answer starts with a thinking block (see [`thinking_enabled`]).
    pub thinking: bool,
    /// Most tokens generated inside the thinking block; `None` for no limit.
    pub thinking_budget: Option<usize>,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Set from another thread (or the piece callback) to stop early, e.g. when a client disconnects.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The prompt is raw text (a completion, not a chat turn): no thinking block is opened or closed, and
    /// every generated token is answer text, leading newlines kept.
    pub raw: bool,
    /// Report each answer token's log-probability and this many most likely alternatives
    /// ([`Piece::Logprob`], [`ChatOutput::logprobs`]); `None`: none.
    pub logprobs: Option<usize>,
}

/// Whether a request thinks: `enable_thinking` (default on), unless the budget is 0 or the latest `/think`
/// or `/no_think` in a user or system turn is `/no_think` (the model follows the latest).
pub fn thinking_enabled(
    messages: &[Message],
    enable_thinking: bool,
    budget: Option<usize>,
) -> bool {
    enable_thinking && budget != Some(0) && latest_switch(messages) != Some(false)
}

/// The last `/think` (true) or `/no_think` (false) written in a user or system turn.
pub fn latest_switch(messages: &[Message]) -> Option<bool> {
    let mut latest = None;
    for m in messages {
        if !matches!(m["role"].as_str(), Some("user" | "system")) {
            continue;
        }
        let text = m["content"].as_str().unwrap_or_default();
        let think = text.rfind("/think");
        let no_think = text.rfind("/no_think");
        latest = match (think, no_think) {
            (Some(a), Some(b)) => Some(a > b),
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (None, None) => latest,
        };
    }
    latest
}

/// The most tokens a request can put in the KV cache: the prompt, the generated tokens, and what the
/// decoder may insert (an opening `<think>\n` and the early-stop text, or an empty block).
pub fn kv_tokens(
    tok: &Tokenizer,
    prompt: usize,
    max_new_tokens: usize,
) -> Result<usize, RuntimeError> {
    let inserted = tok.encode(THINK_OPEN)?.len()
        + tok.encode(EARLY_STOP)?.len()
        + tok.encode(EMPTY_THINK)?.len();
    Ok(prompt + max_new_tokens + inserted)
}

/// A piece of streamed output.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Reasoning(String),
    Content(String),
    /// The log-probability of an answer token just sampled (with [`ChatOptions::logprobs`]); its text
    /// follows in a `Content` piece (at once, or later when it completes a character or a stop string
    /// might begin there).
    Logprob(TokenLogprob),
}

/// An answer token's log-probability under the model (the log-softmax of its logits, before any
/// sampling transform), with the most likely alternatives.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    /// The most likely tokens at that step and their log-probabilities, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

impl TokenLogprob {
    /// Token `id`'s entry, with the `top` most likely tokens of `logits`.
    fn of(
        tok: &Tokenizer,
        logits: &[f32],
        id: u32,
        top: usize,
    ) -> Result<TokenLogprob, RuntimeError> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let norm = max + sum.ln() as f32;
        let mut best: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(best.len());
        if top > 0 {
            let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
            best.select_nth_unstable_by(top - 1, by_logit);
            best.truncate(top);
            best.sort_by(by_logit);
        } else {
            best.clear();
        }
        Ok(TokenLogprob {
            id,
            token: tok.decode(&[id])?,
            logprob: logits[id as usize] - norm,
            top: best
                .into_iter()
                .map(|t| Ok((t, tok.decode(&[t])?, logits[t as usize] - norm)))
                .collect::<Result<_, RuntimeError>>()?,
        })
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// Stopped through [`ChatOptions::cancel`].
    Cancelled,
}

/// The result of one request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatOutput {
    /// Every id after the prompt, inserted ones included, in KV-cache order.
    pub ids: Vec<u32>,
    /// `ids` as text, special tokens included.
    pub text: String,
    /// The thinking block's text as the model sees it: the model's thinking, then the decoder's early-stop
    /// sentence when the budget cut it short.
    pub reasoning: String,
    /// The answer, without the stop token or stop string.
    pub content: String,
    /// Tokens the model generated inside the thinking block.
    pub thinking_tokens: usize,
    /// Whether the budget cut the thinking short.
    pub budget_hit: bool,
    /// Tokens the model generated for the answer (a final stop token included).
    pub answer_tokens: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens that were already in the session's KV cache (not fed again).
    pub cached_tokens: usize,
    pub finish_reason: FinishReason,
    /// With [`ChatOptions::logprobs`]: each answer token's log-probability (stop tokens left out).
    pub logprobs: Vec<TokenLogprob>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    /// Thinking on, block not open yet.
    Opening,
    Thinking,
    Answer,
}

/// The ids of special tokens the decoder needs, looked up once.
struct Specials {
    think_open: u32,
    think_close: u32,
    stops: Vec<u32>,
}

impl Specials {
    fn of(tok: &Tokenizer) -> Result<Specials, RuntimeError> {
        let id = |t: &str| {
            tok.token_id(t)
                .ok_or_else(|| RuntimeError::Input(format!("the tokenizer has no {t} token")))
        };
        Ok(Specials {
            think_open: id("<think>")?,
            think_close: id("</think>")?,
            stops: STOP_TOKENS
                .iter()
                .map(|t| id(t))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Runs a chat request: feeds `prompt` (a rendered conversation ending in the assistant header) to a
/// fresh or continued session and decodes the answer, calling `on_piece` with each piece of text as soon as
/// it is complete.
pub fn decode(
    session: &mut dyn Session,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &ChatOptions,
    on_piece: impl FnMut(Piece),
) -> Result<ChatOutput, RuntimeError> {
    decode_after(session, tok, prompt, 0, opts, on_piece)
}

/// [`decode`] where the session's KV cache already holds `prompt[..cached]` (and nothing else): only the
/// rest of the prompt is fed (`cached` below `prompt.len()`).
pub fn decode_after(
    session: &mut dyn Session,
    tok: &Tokenizer,
    prompt: &[u32],
    cached: usize,
    opts: &ChatOptions,
    mut on_piece: impl FnMut(Piece),
) -> Result<ChatOutput, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Input("the prompt is empty".into()));
    }
    if cached >= prompt.len() {
        return Err(RuntimeError::Input(format!(
            "{cached} cached tokens leave nothing of a {}-token prompt to feed",
            prompt.len()
        )));
    }
    let sp = Specials::of(tok)?;
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut context: Vec<u32> = prompt.to_vec();
    let mut generated: Vec<u32> = Vec::new();
    let mut out = ChatOutput {
        ids: Vec::new(),
        text: String::new(),
        reasoning: String::new(),
        content: String::new(),
        thinking_tokens: 0,
        budget_hit: false,
        answer_tokens: 0,
        prompt_tokens: prompt.len(),
        cached_tokens: cached,
        finish_reason: FinishReason::Length,
        logprobs: Vec::new(),
    };
    let (mut reasoning, mut answer) = (StreamDecoder::new(), StreamDecoder::new());
    let mut text = Text {
        keep_newlines: opts.raw,
        ..Text::default()
    };
    let mut stopped_by_string = false;

    let closed = tok.encode("</think>\n\n")?;
    let mut phase = if opts.thinking && !opts.raw {
        Phase::Opening
    } else {
        Phase::Answer
    };
    let mut logits = session.forward_last(&prompt[cached..])?;
    let max = opts.max_new_tokens;
    // Without thinking, the answer starts after an empty block; write it unless the template did (if it
    // does not fit in `max`, nothing is generated).
    let mut room = true;
    if !opts.raw && !opts.thinking && !prompt.ends_with(&closed) {
        let forced = tok.encode(EMPTY_THINK)?;
        room = forced.len() <= max;
        if room {
            logits = feed(session, &forced, &mut context, &mut out.ids)?;
        }
    }
    while room && out.ids.len() < max {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            out.finish_reason = FinishReason::Cancelled;
            break;
        }
        if phase == Phase::Thinking && opts.thinking_budget == Some(out.thinking_tokens) {
            let forced = tok.encode(EARLY_STOP)?;
            if out.ids.len() + forced.len() > max {
                break;
            }
            logits = feed(session, &forced, &mut context, &mut out.ids)?;
            out.budget_hit = true;
            phase = Phase::Answer;
            // The sentence is part of the thinking the model sees: the reasoning shows it too.
            let tail = reasoning.finish(tok)?;
            text.reasoning(&tail, &mut on_piece);
            // (Without its last newline, as the final reasoning is trimmed: stream and message agree.)
            let sentence = EARLY_STOP.split("</think>").next().unwrap_or_default();
            text.reasoning(sentence.trim_end_matches('\n'), &mut on_piece);
        }
        let next = sampler.sample(&logits, &context, &generated);
        generated.push(next);
        match phase {
            Phase::Opening if next != sp.think_open => {
                // The model did not open the block: open it, and let the model start again inside it.
                let forced = tok.encode(THINK_OPEN)?;
                if out.ids.len() + forced.len() > max {
                    break;
                }
                logits = feed(session, &forced, &mut context, &mut out.ids)?;
                generated.pop();
                phase = Phase::Thinking;
                continue;
            }
            Phase::Opening => phase = Phase::Thinking,
            _ if sp.stops.contains(&next) => {
                out.ids.push(next);
                if phase == Phase::Answer {
                    out.answer_tokens += 1;
                }
                out.finish_reason = FinishReason::Stop;
                break;
            }
            Phase::Thinking if next == sp.think_close => phase = Phase::Answer,
            Phase::Thinking => {
                out.thinking_tokens += 1;
                if let Some(piece) = reasoning.push(tok, next)? {
                    text.reasoning(&piece, &mut on_piece);
                }
            }
            Phase::Answer => {
                out.answer_tokens += 1;
                if let Some(top) = opts.logprobs {
                    let lp = TokenLogprob::of(tok, &logits, next, top)?;
                    on_piece(Piece::Logprob(lp.clone()));
                    out.logprobs.push(lp);
                }
                if let Some(piece) = answer.push(tok, next)? {
                    if text.content(&piece, &opts.stop, &mut on_piece) {
                        out.ids.push(next);
                        out.finish_reason = FinishReason::Stop;
                        stopped_by_string = true;
                        break;
                    }
                }
            }
        }
        out.ids.push(next);
        context.push(next);
        if out.ids.len() < max {
            logits = session.forward_last(&[next])?;
        }
    }
    let tail = reasoning.finish(tok)?;
    text.reasoning(&tail, &mut on_piece);
    if !stopped_by_string {
        let tail = answer.finish(tok)?;
        if text.content(&tail, &opts.stop, &mut on_piece) {
            out.finish_reason = FinishReason::Stop;
        } else {
            // A held-back tail that never became a stop string is part of the answer.
            let held = std::mem::take(&mut text.held);
            text.emit(&held, &mut on_piece);
        }
    }
    out.text = tok.decode(&out.ids)?;
    out.reasoning = text.reasoning.trim_end_matches('\n').to_string();
    out.content = text.content;
    Ok(out)
}

/// Feeds inserted tokens into the KV cache and returns the logits after them.
fn feed(
    session: &mut dyn Session,
    forced: &[u32],
    context: &mut Vec<u32>,
    ids: &mut Vec<u32>,
) -> Result<Vec<f32>, RuntimeError> {
    ids.extend_from_slice(forced);
    context.extend_from_slice(forced);
    session.forward_last(forced)
}

/// The reasoning and content texts as streamed: leading newlines dropped (as the chat template drops
/// them), and the content cut at the first stop string.
#[derive(Default)]
struct Text {
    reasoning: String,
    content: String,
    /// Content not yet streamed because it might be the start of a stop string.
    held: String,
    /// Keep the answer's leading newlines (raw completions).
    keep_newlines: bool,
}

impl Text {
    fn reasoning(&mut self, piece: &str, on_piece: &mut impl FnMut(Piece)) {
        let piece = if self.reasoning.is_empty() {
            piece.trim_start_matches('\n')
        } else {
            piece
        };
        if !piece.is_empty() {
            self.reasoning.push_str(piece);
            on_piece(Piece::Reasoning(piece.to_string()));
        }
    }

    /// Adds answer text; returns true when a stop string was reached.
    fn content(&mut self, piece: &str, stop: &[String], on_piece: &mut impl FnMut(Piece)) -> bool {
        let mut pending = std::mem::take(&mut self.held) + piece;
        if self.content.is_empty() && !self.keep_newlines {
            pending = pending.trim_start_matches('\n').to_string();
        }
        if let Some(at) = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| pending.find(s.as_str()))
            .min()
        {
            self.emit(&pending[..at], on_piece);
            return true;
        }
        // Hold back a tail that could still grow into a stop string.
        let keep = stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = pending.len() - keep;
        self.emit(&pending[..cut], on_piece);
        self.held = pending[cut..].to_string();
        false
    }

    fn emit(&mut self, piece: &str, on_piece: &mut impl FnMut(Piece)) {
        if !piece.is_empty() {
            self.content.push_str(piece);
            on_piece(Piece::Content(piece.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Message {
        serde_json::json!({"role": "user", "content": text})
    }

    #[test]
    fn the_latest_switch_wins() {
        let sys = serde_json::json!({"role": "system", "content": "Be brief. /no_think"});
        assert_eq!(latest_switch(&[user("hi")]), None);
        assert_eq!(latest_switch(&[sys.clone(), user("hi")]), Some(false));
        assert_eq!(latest_switch(&[sys.clone(), user("go /think")]), Some(true));
        assert_eq!(latest_switch(&[user("/think then /no_think")]), Some(false));
        // Assistant turns do not switch.
        let said = serde_json::json!({"role": "assistant", "content": "/think"});
        assert_eq!(latest_switch(&[sys, said]), Some(false));
        assert!(thinking_enabled(&[user("hi")], true, None));
        assert!(!thinking_enabled(&[user("hi")], true, Some(0)));
        assert!(!thinking_enabled(&[user("hi")], false, None));
        assert!(!thinking_enabled(&[user("hi /no_think")], true, Some(5)));
    }

    #[test]
    fn stop_strings_cut_the_answer_and_partial_matches_are_held_back() {
        let stop = vec!["STOP".to_string(), "\n\nQ:".to_string()];
        let mut text = Text::default();
        let mut streamed = Vec::new();
        let mut on = |p: Piece| streamed.push(p);
        assert!(!text.content("\nHello ST", &stop, &mut on));
        // "ST" could begin "STOP": held back; the leading newline is dropped as the template drops it.
        assert_eq!(text.content, "Hello ");
        assert!(!text.content("AR", &stop, &mut on));
        assert_eq!(text.content, "Hello STAR");
        assert!(text.content("t\n\nQ: next", &stop, &mut on));
        assert_eq!(text.content, "Hello STARt");
        let joined: String = streamed
            .iter()
            .map(|p| match p {
                Piece::Content(t) => t.as_str(),
                Piece::Reasoning(_) | Piece::Logprob(_) => unreachable!(),
            })
            .collect();
        assert_eq!(joined, text.content);
    }
}
