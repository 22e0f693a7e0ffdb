//! The subcommands, one file each, each with its own typed arguments and `run`.

mod bench;
mod chat;
mod compile;
mod generate;
mod inspect;
mod ir;
mod logits;
mod models;
mod probe;
mod quantize;
mod random_weights;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// q3c: an ahead-of-time compiler for Qwen3 models.
#[derive(Parser)]
#[command(name = "q3c", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's graph IR (text form, or Graphviz with --dot).
    Ir(ir::Args),
    /// Compile a model ahead of time into a shared library (weights are bound at load time).
    Compile(compile::Args),
    /// Print a compiled artifact's manifest.
    Inspect(inspect::Args),
    /// Run a prompt through a model and write its logits (f32 [T, vocab]) to a safetensors file.
    Logits(logits::Args),
    /// Continue a prompt: token ids, text, or (with --chat) a user message through the chat template.
    Generate(generate::Args),
    /// Chat with a model in the terminal: streamed answers, thinking shown dimmed, tokens/s per answer.
    Chat(chat::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health).
    Serve(serve::Args),
    /// Measure this machine's limits: read memory bandwidth (bounds decode) and f32 FMA peak (bounds prefill).
    Probe(probe::Args),
    /// List the released models q3c knows by name.
    Models,
    /// Measure prefill and decode speed (like llama-bench's pp and tg).
    Bench(bench::Args),
    /// Write a checkpoint of random weights for MODEL (for benchmarks and smoke tests).
    RandomWeights(random_weights::Args),
    /// Write a pre-quantized copy of a checkpoint (q8 or q4), bound as it is by artifacts compiled with the same --quantize.
    Quantize(quantize::Args),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ir(args) => ir::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Models => models::run(),
        Command::Bench(args) => bench::run(args),
        Command::RandomWeights(args) => random_weights::run(args),
        Command::Quantize(args) => quantize::run(args),
    }
}
