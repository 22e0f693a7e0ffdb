//! Text generation from the CLI: `generate --prompt/--chat` and the interactive `chat`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use q3c_runtime::chat::{self, ChatOptions, ChatOutput, Piece};
use q3c_runtime::text::{Message, TextModel};
use q3c_runtime::{SamplingOverrides, SamplingParams, Session};

/// Sampling flags; unset ones take the mode's defaults (Qwen3's recommendations for chat, greedy for raw
/// prompts).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 for greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0: all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens holding this much probability (1: all).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p × the most likely one (0: none).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Subtracted from the logits of tokens already generated (0 to 2).
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Divides the logits of tokens seen in the prompt or output (1: off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Sampler seed (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The flags over `defaults`.
    pub fn over(&self, defaults: SamplingParams) -> SamplingParams {
        SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            repetition_penalty: self.repetition_penalty,
            seed: Some(self.seed),
        }
        .over(defaults)
    }
}

/// Where the tokenizer files are: `--tokenizer`, else the model directory, else the weights directory.
pub fn tokenizer_dir(
    explicit: Option<&Path>,
    model: &Path,
    weights: Option<&Path>,
) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    weights.map(Path::to_path_buf).context(
        "text prompts need the tokenizer: give --weights DIR (with tokenizer.json) or --tokenizer DIR",
    )
}

/// `generate --chat --json`: the output object.
pub fn chat_json(out: &ChatOutput, seconds: f64) -> serde_json::Value {
    let mut v = serde_json::to_value(out).expect("ChatOutput serialises");
    v["seconds"] = seconds.into();
    v
}

/// The interactive chat loop over stdin/stdout.
pub fn repl(
    session: &mut dyn Session,
    text: &TextModel,
    sampling: &SamplingArgs,
    max_new_tokens: usize,
    budget: Option<usize>,
    hide_thinking: bool,
    system: Option<String>,
) -> Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut messages: Vec<Message> = Vec::new();
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    let mut enable_thinking = true;
    // Ids in the session's KV cache, to feed only what a new turn adds.
    let mut cached: Vec<u32> = Vec::new();
    eprintln!("q3c chat: type a message; /think and /no_think switch thinking, /reset clears, /quit ends.");
    loop {
        print!("\n> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/think" => {
                enable_thinking = true;
                eprintln!("(thinking on)");
                continue;
            }
            "/no_think" => {
                enable_thinking = false;
                eprintln!("(thinking off)");
                continue;
            }
            "/reset" => {
                messages.retain(|m| m["role"] == "system");
                session.reset();
                cached.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(serde_json::json!({"role": "user", "content": line}));
        let (ids, thinking) = text.prompt(&messages, None, enable_thinking, budget)?;
        // Continue the cache when the new prompt extends it; otherwise start over.
        let feed = if ids.starts_with(&cached) && ids.len() > cached.len() {
            &ids[cached.len()..]
        } else {
            session.reset();
            &ids[..]
        };
        let opts = ChatOptions {
            max_new_tokens,
            sampling: sampling.over(SamplingParams::for_mode(thinking)),
            thinking,
            thinking_budget: budget,
            stop: Vec::new(),
            cancel: None,
            raw: false,
            logprobs: None,
        };
        let start = Instant::now();
        let mut in_reasoning = false;
        let out = chat::decode(session, &text.tokenizer, feed, &opts, |piece| {
            let _ = match piece {
                Piece::Reasoning(t) if !hide_thinking => {
                    in_reasoning = true;
                    write!(stdout, "\x1b[2m{t}\x1b[0m")
                }
                Piece::Reasoning(_) => Ok(()),
                Piece::Content(t) => {
                    if in_reasoning {
                        in_reasoning = false;
                        let _ = writeln!(stdout, "\n");
                    }
                    write!(stdout, "{t}")
                }
                Piece::Logprob(_) => Ok(()),
            };
            let _ = stdout.flush();
        })?;
        let secs = start.elapsed().as_secs_f64();
        let generated = out.thinking_tokens + out.answer_tokens;
        eprintln!(
            "\n\x1b[2m[{} thinking + {} answer tokens{}, {:.1} tok/s]\x1b[0m",
            out.thinking_tokens,
            out.answer_tokens,
            if out.budget_hit { ", budget hit" } else { "" },
            generated as f64 / secs.max(1e-9)
        );
        cached = ids;
        cached.extend_from_slice(&out.ids);
        messages.push(serde_json::json!({
            "role": "assistant",
            "content": out.content,
            "reasoning_content": out.reasoning,
        }));
    }
}

/// Checks a `--thinking-budget`/`--chat` combination.
pub fn check_chat_flags(chat: bool, budget: Option<usize>, no_thinking: bool) -> Result<()> {
    if !chat && (budget.is_some() || no_thinking) {
        bail!("--thinking-budget and --no-thinking apply to chat prompts: add --chat");
    }
    Ok(())
}
