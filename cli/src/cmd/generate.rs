//! `q3c generate`: continue token ids or text, or answer a chat message with Qwen3's thinking block.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use q3c_runtime::chat::{ChatOptions, Piece};
use q3c_runtime::text::{TextModel, Tokenizer};
use q3c_runtime::{generate, GenerateOptions, SamplingParams};

use crate::model_args::ModelArgs;
use crate::output::{parse_ids, print_stdout};
use crate::textgen::{self, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(
        long,
        value_name = "IDS",
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    prompt_ids: Option<String>,
    /// Text to continue; with --chat, the user's message.
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Apply the model's chat template to --prompt and decode with Qwen3's thinking block.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// With --chat: a system prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: most tokens generated inside the thinking block (0: no thinking).
    #[arg(long, value_name = "N")]
    thinking_budget: Option<usize>,
    /// With --chat: answer without thinking (enable_thinking false).
    #[arg(long)]
    no_thinking: bool,
    /// Directory with tokenizer.json and tokenizer_config.json (default: the model or weights directory).
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// With --chat: stop the answer at this string (repeatable).
    #[arg(long, requires = "chat")]
    stop: Vec<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Do not stop at the config's end-of-sequence ids (raw prompts).
    #[arg(long, conflicts_with = "chat")]
    ignore_eos: bool,
    /// Print one JSON object ({"ids": [...], ...}) instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    textgen::check_chat_flags(args.chat, args.thinking_budget, args.no_thinking)?;
    if args.chat {
        return chat(args);
    }
    let text_dir = || {
        textgen::tokenizer_dir(
            args.tokenizer.as_deref(),
            &args.model.model,
            args.model.weights.as_deref(),
        )
    };
    let (ids, tok) = match (&args.prompt_ids, &args.prompt) {
        (Some(list), _) => (parse_ids(list)?, None),
        (None, Some(text)) => {
            let tok = Tokenizer::from_dir(&text_dir()?)?;
            (tok.encode(text)?, Some(tok))
        }
        (None, None) => bail!("give --prompt-ids or --prompt"),
    };
    if ids.is_empty() {
        bail!("--prompt: the text has no tokens");
    }
    let model = args.model.load()?;
    let stop_ids = if args.ignore_eos {
        vec![]
    } else {
        model.eos_token_ids().to_vec()
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.over(SamplingParams::greedy()),
        stop_ids,
    };
    let start = std::time::Instant::now();
    let out = generate(&mut *model.session(), &ids, &opts)?;
    let secs = start.elapsed().as_secs_f64();
    let stopped = out.last().is_some_and(|id| opts.stop_ids.contains(id));
    let text = tok.as_ref().map(|t| t.decode(&out)).transpose()?;
    if args.json {
        let mut obj = serde_json::json!({
            "ids": out,
            "prompt_tokens": ids.len(),
            "generated_tokens": out.len(),
            "finish_reason": if stopped { "stop" } else { "length" },
            "seconds": secs,
        });
        if let Some(text) = text {
            obj["text"] = text.into();
        }
        return print_stdout(&format!("{obj}\n"));
    }
    match text {
        Some(text) => print_stdout(&format!("{text}\n"))?,
        None => {
            let list: Vec<String> = out.iter().map(u32::to_string).collect();
            print_stdout(&format!("{}\n", list.join(" ")))?
        }
    }
    eprintln!(
        "{} tokens in {secs:.2} s ({})",
        out.len(),
        if stopped { "stopped" } else { "length" }
    );
    Ok(())
}

/// `--chat`: the prompt through the chat template, decoded with the thinking block and its budget.
fn chat(args: Args) -> Result<()> {
    let dir = textgen::tokenizer_dir(
        args.tokenizer.as_deref(),
        &args.model.model,
        args.model.weights.as_deref(),
    )?;
    let text = TextModel::load(&dir)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    let user = args
        .prompt
        .as_deref()
        .expect("clap: --chat requires --prompt");
    messages.push(serde_json::json!({"role": "user", "content": user}));
    let (ids, thinking) = text.prompt(&messages, None, !args.no_thinking, args.thinking_budget)?;
    let opts = ChatOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.over(SamplingParams::for_mode(thinking)),
        thinking,
        thinking_budget: args.thinking_budget,
        stop: args.stop.clone(),
        cancel: None,
        raw: false,
        logprobs: None,
    };
    opts.sampling.check()?;
    let model = args.model.load()?;
    let start = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    let json = args.json;
    let out = q3c_runtime::chat::decode(
        &mut *model.session(),
        &text.tokenizer,
        &ids,
        &opts,
        |piece| {
            if !json {
                let _ = match piece {
                    Piece::Reasoning(t) => write!(std::io::stderr(), "{t}"),
                    Piece::Content(t) => write!(stdout, "{t}"),
                    Piece::Logprob(_) => Ok(()),
                };
                let _ = stdout.flush();
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    if json {
        return print_stdout(&format!("{}\n", textgen::chat_json(&out, secs)));
    }
    print_stdout("\n")?;
    eprintln!(
        "[{} thinking + {} answer tokens{} in {secs:.2} s]",
        out.thinking_tokens,
        out.answer_tokens,
        if out.budget_hit { ", budget hit" } else { "" }
    );
    Ok(())
}
