//! `q3c serve`: the OpenAI-compatible HTTP server (`crate::server`) over a loaded model.

use std::io::Write;

use anyhow::{bail, Result};

use crate::model_args::ChatModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: ChatModelArgs,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Model name in responses and /v1/models (default: the file or directory name).
    #[arg(long)]
    name: Option<String>,
    /// Requests decoding at once, batched together: each step of the model runs the next token of every
    /// one of them (and chunks of new prompts) in one pass; more wait in line.
    #[arg(long, alias = "parallel", default_value_t = 4)]
    max_concurrent: usize,
    /// Most tokens one batched step feeds: every running request's next token, then chunks of waiting
    /// prompts up to this (a long prompt is fed over several steps instead of stalling the others).
    #[arg(long, default_value_t = 512)]
    batch_tokens: usize,
    /// Tokens of KV cache in all, shared by running and kept requests (default: room for every running and
    /// every kept request to hold the model's whole context; memory is taken only as used).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Most requests waiting for a slot; more are answered 503 with `Retry-After: 1`.
    #[arg(long, default_value_t = 256)]
    queue: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if args.batch_tokens == 0 {
        bail!("--batch-tokens must be at least 1");
    }
    if args.ctx_size == Some(0) {
        bail!("--ctx-size must be at least 1");
    }
    let name = args.name.clone().unwrap_or_else(|| {
        args.target
            .model
            .file_stem()
            .map_or("q3c".into(), |s| s.to_string_lossy().into_owned())
    });
    let rest = Serving {
        host: args.host.clone(),
        port: args.port,
        max_concurrent: args.max_concurrent,
        batch_tokens: args.batch_tokens,
        ctx_size: args.ctx_size,
        queue: args.queue,
    };
    let Args { target, .. } = args;
    let (text, model) = target.load()?;
    // The model serves until the process ends; kept sessions borrow it.
    let model: &'static q3c_runtime::Model = Box::leak(Box::new(model));
    let served = serve(model, &rest, text, name);
    // It is never dropped: the other ranks of a sharded model are told to stop here.
    model.release_followers();
    served
}

/// The settings `serve` runs with besides the model.
struct Serving {
    host: String,
    port: u16,
    max_concurrent: usize,
    batch_tokens: usize,
    ctx_size: Option<usize>,
    queue: usize,
}

/// Serves `model` until the server stops.
fn serve(
    model: &'static q3c_runtime::Model,
    args: &Serving,
    text: q3c_runtime::text::TextModel,
    name: String,
) -> Result<()> {
    let context = model.context();
    // Requests hold sequences of one batch, fed by one scheduler; at most max_concurrent are running and
    // as many kept for their prompts' prefixes, each up to the context.
    let kv_tokens = args.ctx_size.unwrap_or(2 * args.max_concurrent * context);
    let scheduler = q3c_runtime::Scheduler::start(model, kv_tokens, args.batch_tokens);
    let batch = scheduler.stats();
    let served = crate::server::Served {
        sessions: crate::prompt_cache::PromptCache::new(scheduler, args.max_concurrent),
        text,
        name,
        context,
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(args.max_concurrent)),
        parallel: args.max_concurrent,
        queue: args.queue,
        metrics: crate::metrics::Metrics {
            batch,
            ..Default::default()
        },
    };
    crate::server::run(served, &format!("{}:{}", args.host, args.port), |addr| {
        println!("q3c serve: listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })
}
