//! `q3c bench`: prefill and decode speed of one model (like llama-bench's pp and tg), or, with
//! `--compare-fusion`, one model compiled under several fusion strategies side by side (`crate::compare`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use q3c_compiler::Strategy;

use crate::codegen::Backend;
use crate::model_args::ModelArgs;
use crate::output::{default_threads, print_json, print_stdout, write_atomically};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens decoded one at a time for the decode measurement.
    #[arg(long, default_value_t = 64)]
    gen: usize,
    /// Repetitions; the best of each figure is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Measure both figures after this many tokens already in the cache, as llama-bench's -d (the decode
    /// then starts from that context, not after the prompt). Default: decode follows the prompt.
    #[arg(long, conflicts_with = "compare_fusion")]
    depth: Option<usize>,
    /// Decode this many sequences together (each with its own prompt of --prompt-len), as
    /// llama-batched-bench: prompts fed in one batched pass, then --gen steps of one token per sequence;
    /// reports the aggregate and per-sequence rates.
    #[arg(long, value_name = "B", conflicts_with_all = ["compare_fusion", "depth"])]
    batch: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Compile --model (a model directory) under each fusion strategy and compare them in one table:
    /// kernels per layer, activation bytes per token, compile time, prefill and decode speed.
    #[arg(long)]
    compare_fusion: bool,
    /// With --compare-fusion: a strategy to compare (repeatable; default none, each pass, all).
    /// The first is the baseline of the ratios.
    #[arg(
        long = "strategy",
        value_name = "STRATEGY",
        requires = "compare_fusion"
    )]
    strategies: Vec<String>,
    /// With --compare-fusion: the code generator of every strategy's artifact.
    #[arg(long, value_enum, default_value_t = Backend::Auto, requires = "compare_fusion")]
    backend: Backend,
    /// With --compare-fusion: also write the table and a chart as an HTML page.
    #[arg(long, value_name = "FILE", requires = "compare_fusion")]
    html: Option<PathBuf>,
    /// With --compare-fusion: also write the chart as SVG.
    #[arg(long, value_name = "FILE", requires = "compare_fusion")]
    svg: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt_len == 0 {
        bail!("--prompt-len must be at least 1");
    }
    let threads = args.model.threads.unwrap_or_else(default_threads);
    if args.compare_fusion {
        return compare(args, threads);
    }
    let loading = std::time::Instant::now();
    let model = args.model.load()?;
    let load_s = loading.elapsed().as_secs_f64();
    // What the model runs on (a rank of a sharded model takes its share of the host's cores).
    let threads = match &model {
        q3c_runtime::Model::Compiled(m) => m.threads_per_call(),
        _ => threads,
    };
    let resident = crate::bench::resident_bytes();
    let tokens = args.depth.unwrap_or(0) + args.prompt_len + args.gen + 1;
    if tokens > model.max_positions() {
        bail!(
            "--depth {} + --prompt-len {} + --gen {} need {tokens} positions; the model has {}",
            args.depth.unwrap_or(0),
            args.prompt_len,
            args.gen,
            model.max_positions()
        );
    }
    // (--batch and --depth exclude each other.)
    let work = crate::bench::Workload {
        prompt_len: args.prompt_len,
        gen: args.gen,
        depth: args.depth,
        reps: args.reps,
    };
    if let Some(sequences) = args.batch {
        if sequences == 0 {
            bail!("--batch must be at least 1");
        }
        // Each sequence holds whole cache blocks.
        let mut batch = model.batch(sequences * tokens.next_multiple_of(q3c_abi::KV_BLOCK_TOKENS));
        let mut r = crate::bench::run_batch(&mut *batch, sequences, work, threads)?;
        r.load_s = load_s;
        r.resident_after_load_bytes = resident;
        if args.json {
            return print_json(&r);
        }
        return print_stdout(&format!(
            "batch of {sequences}: pp{} {:.2} tok/s (mean {:.2}); tg{} {:.2} tok/s aggregate, {:.2} per \
             sequence (mean {:.2})\n({} threads, best of {})\n",
            args.prompt_len,
            r.prefill_tok_s,
            r.prefill_mean_tok_s,
            args.gen,
            r.decode_tok_s,
            r.decode_per_sequence_tok_s,
            r.decode_mean_tok_s,
            r.threads,
            r.repetitions
        ));
    }
    let mut session = model.session_with_capacity(tokens);
    let vocab = session.vocab_size();
    let mut r = crate::bench::run(&mut *session, vocab, work, threads)?;
    r.load_s = load_s;
    r.resident_after_load_bytes = resident;
    if let q3c_runtime::Model::Compiled(m) = &model {
        if m.collective_stats().is_some() {
            let ranks = m.manifest().ranks;
            let stats = || m.collective_stats().unwrap_or_default();
            r.collectives = Some(crate::bench::collective_cost(
                &mut *session,
                ranks,
                args.gen,
                stats,
            )?);
        }
    }
    if args.json {
        return print_json(&r);
    }
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    let kv = match model.kv_bytes_per_token() {
        Some((dtype, bytes)) => format!(
            "; KV cache {dtype}, {:.1} MB per 1000 tokens",
            bytes as f64 / 1e3
        ),
        None => String::new(),
    };
    eprintln!(
        "loaded in {load_s:.1} s; resident after load: {}{kv}",
        resident.map_or("unknown".into(), gb)
    );
    if let Some(c) = &r.collectives {
        eprintln!(
            "sharded over {} ranks (rank 0's resident memory above): {} collectives per decode step, {:.1} µs ({:.1}% of the step), {:.1} KB",
            c.ranks,
            c.per_step,
            c.seconds_per_step * 1e6,
            100.0 * c.share,
            c.bytes_per_step as f64 / 1e3
        );
    }
    let at = args.depth.map(|d| format!(" @ d{d}")).unwrap_or_default();
    print_stdout(&format!(
        "pp{}{at}: {:.2} tok/s (mean {:.2} ± {:.2})\ntg{}{at}: {:.2} tok/s (mean {:.2} ± {:.2})\n\
         ({} threads, best of {})\n",
        args.prompt_len,
        r.prefill_tok_s,
        r.prefill_mean_tok_s,
        r.prefill_std_tok_s,
        args.gen,
        r.decode_tok_s,
        r.decode_mean_tok_s,
        r.decode_std_tok_s,
        r.threads,
        r.repetitions
    ))
}

/// `--compare-fusion`.
fn compare(args: Args, threads: usize) -> Result<()> {
    let strategies = if args.strategies.is_empty() {
        crate::compare::default_strategies()
    } else {
        args.strategies
            .iter()
            .map(|s| Strategy::parse(s))
            .collect::<Result<_, _>>()?
    };
    let settings = crate::compare::Settings {
        threads,
        prompt_len: args.prompt_len,
        gen: args.gen,
        rounds: args.reps,
        max_tokens: 256,
        backend: args.backend.resolve()?,
    };
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let rows = crate::compare::run(&args.model.model, &strategies, work.path(), &settings)?;
    let title = format!("q3c fusion strategies: {}", args.model.model.display());
    if let Some(path) = &args.svg {
        write_atomically(path, crate::chart::svg(&rows, &title).as_bytes())?;
    }
    if let Some(path) = &args.html {
        write_atomically(
            path,
            crate::chart::html(&rows, &settings, &title).as_bytes(),
        )?;
    }
    if args.json {
        return print_json(&rows);
    }
    print_stdout(&crate::compare::table(&rows, &settings))
}
