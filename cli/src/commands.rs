//! The subcommands and what they print.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use q3c_compiler::Strategy;
use q3c_models::{registry, Checkpoint, ModelSource};
use q3c_runtime::chat::{ChatOptions, Piece};
use q3c_runtime::text::Tokenizer;
use q3c_runtime::{
    generate, CompiledModel, GenerateOptions, ReferenceModel, Residency, SamplingParams, Session,
};

use crate::textgen::{self, SamplingArgs};
use q3c_runtime::text::TextModel;

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
    Ir {
        /// A registry name (e.g. Qwen3-8B), a config.json, or a model directory.
        model: String,
        /// Print Graphviz DOT instead of the text form.
        #[arg(long)]
        dot: bool,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Fusion strategy to run: none, all, or a comma list of passes.
        #[arg(long, default_value = "none")]
        fusion: String,
        /// Print the graph after this pass (of the strategy; defaults the strategy to all).
        #[arg(long, value_name = "PASS", conflicts_with = "dump_all")]
        after: Option<String>,
        /// Print the graph before the passes and after each one.
        #[arg(long)]
        dump_all: bool,
        /// Report each pass's time and rewrites on standard error.
        #[arg(long)]
        time_passes: bool,
    },
    /// Compile a model ahead of time into a shared library (weights are bound at load time).
    Compile {
        /// A registry name (e.g. Qwen3-8B), a config.json, or a model directory.
        model: String,
        /// Output artifact.
        #[arg(short, long, default_value = "model.so")]
        out: PathBuf,
        /// Code generator: cranelift, or llvm (needs a q3c built with `--features llvm`).
        #[arg(long, default_value = "cranelift", value_parser = crate::codegen::BACKENDS)]
        backend: String,
        /// What to generate: a CPU `.so`, or (LLVM only) a PTX module with every kernel for --gpu.
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "nvptx"])]
        target: String,
        /// With --target nvptx: the GPU architecture (sm_80, sm_90, ...).
        #[arg(long, default_value = "sm_90")]
        gpu: String,
        /// CPU to generate code for: native, or a CPU name (x86-64-v2, x86-64-v3, x86-64-v4, znver4, ...).
        #[arg(long, default_value = "native")]
        target_cpu: String,
        /// LLVM: matrix products over bf16 weights round activations to bf16 and use AVX512_BF16
        /// dot products (about 2x the f32 rate; what llama.cpp does for bf16 models).
        #[arg(long)]
        bf16_activations: bool,
        /// LLVM: bind the linear matrices as 8-bit groups of 32 with an f32 scale each (quantized at load)
        /// and multiply them with AVX512-VNNI on activations quantized the same way (like llama.cpp's Q8_0).
        #[arg(long, default_value = "none", value_parser = ["none", "q8"])]
        quantize: String,
        /// Most tokens per forward call (longer prompts run in chunks); sizes the scratch memory.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Fusion strategy: none, all, or a comma list of passes (see `q3c ir --help`).
        #[arg(long, default_value = "none")]
        fusion: String,
    },
    /// Print a compiled artifact's manifest.
    Inspect {
        /// A `.so` made by `q3c compile`.
        artifact: PathBuf,
        /// Print the raw JSON manifest.
        #[arg(long)]
        json: bool,
    },
    /// Run a prompt through a model and write its logits (f32 [T, vocab]) to a safetensors file.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_name = "IDS")]
        prompt_ids: String,
        /// Output safetensors file; holds one tensor `logits`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Continue a prompt: token ids, text, or (with --chat) a user message through the chat template.
    Generate {
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
    },
    /// Chat with a model in the terminal: streamed answers, thinking shown dimmed, tokens/s per answer.
    Chat {
        #[command(flatten)]
        target: ChatModelArgs,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Most tokens inside each thinking block.
        #[arg(long, value_name = "N")]
        thinking_budget: Option<usize>,
        /// Do not print the thinking.
        #[arg(long)]
        hide_thinking: bool,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 2048)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health).
    Serve {
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
        /// Requests decoding at once (each holds its own KV cache); more wait in line.
        #[arg(long, default_value_t = 4)]
        max_concurrent: usize,
    },
    /// Measure this machine's limits: read memory bandwidth (bounds decode) and f32 FMA peak (bounds prefill).
    Probe {
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Size of the bandwidth probe's buffer in MiB (well above the last-level cache).
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the released models q3c knows by name.
    Models,
    /// Measure prefill and decode speed (like llama-bench's pp and tg).
    Bench {
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
        #[arg(
            long,
            default_value = "cranelift",
            value_parser = crate::codegen::BACKENDS,
            requires = "compare_fusion"
        )]
        backend: String,
        /// With --compare-fusion: also write the table and a chart as an HTML page.
        #[arg(long, value_name = "FILE", requires = "compare_fusion")]
        html: Option<PathBuf>,
        /// With --compare-fusion: also write the chart as SVG.
        #[arg(long, value_name = "FILE", requires = "compare_fusion")]
        svg: Option<PathBuf>,
    },
    /// Write a checkpoint of random weights for MODEL (for benchmarks and smoke tests).
    RandomWeights {
        /// A registry name, a config.json, or a model directory.
        model: String,
        /// Output directory (config.json + model.safetensors).
        #[arg(short, long)]
        out: PathBuf,
        /// Weight dtype.
        #[arg(long, default_value = "bf16", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Copy tokenizer.json and tokenizer_config.json from this directory.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
}

/// Which model to run: a model directory (reference executor), or a compiled artifact plus weights.
#[derive(clap::Args)]
struct ModelArgs {
    /// A model directory (config.json + safetensors; runs the reference executor) or a compiled `.so`.
    #[arg(long)]
    model: PathBuf,
    /// The weights directory, when --model is a compiled `.so`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Threads for a compiled model (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Compile --model (a model directory) in process with cranelift-jit and run that code.
    #[arg(long)]
    jit: bool,
    /// Read a compiled model's weights in place from the memory-mapped checkpoint instead of copying them
    /// into huge-page memory: quicker load and no second copy, slower decode.
    #[arg(long)]
    mmap_weights: bool,
}

/// The model a chat surface (`chat`, `serve`) runs: positional, with its tokenizer.
#[derive(clap::Args)]
struct ChatModelArgs {
    /// A compiled `.so` (with --weights) or a model directory.
    model: PathBuf,
    /// The weights directory (with tokenizer.json and tokenizer_config.json), for a `.so`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Threads for a compiled model (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Directory with the tokenizer files (default: the model or weights directory).
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Read a compiled model's weights in place from the memory-mapped checkpoint instead of copying them
    /// into huge-page memory: quicker load and no second copy, slower decode.
    #[arg(long)]
    mmap_weights: bool,
}

impl ChatModelArgs {
    /// Loads the tokenizer and chat template, then the model.
    fn load(self) -> Result<(TextModel, Loaded)> {
        let dir = textgen::tokenizer_dir(
            self.tokenizer.as_deref(),
            &self.model,
            self.weights.as_deref(),
        )?;
        let text = TextModel::load(&dir)?;
        let args = ModelArgs {
            model: self.model,
            weights: self.weights,
            threads: self.threads,
            jit: false,
            mmap_weights: self.mmap_weights,
        };
        let (loaded, _) = Loaded::load(&args)?;
        Ok((text, loaded))
    }
}

/// A loaded model of either kind.
pub(crate) enum Loaded {
    Reference(Box<ReferenceModel>),
    Compiled(Box<CompiledModel>),
}

impl ModelArgs {
    fn residency(&self) -> Residency {
        if self.mmap_weights {
            Residency::Mapped
        } else {
            Residency::Copied
        }
    }
}

impl Loaded {
    fn load(args: &ModelArgs) -> Result<(Loaded, Vec<u32>)> {
        if args.jit {
            return Self::load_jit(args);
        }
        if args.model.is_dir() {
            if args.weights.is_some() {
                bail!(
                    "--weights is only for a compiled --model .so; {} is a model directory",
                    args.model.display()
                );
            }
            if args.mmap_weights {
                bail!(
                    "--mmap-weights is only for a compiled --model .so (or --jit); {} runs on the reference executor",
                    args.model.display()
                );
            }
            let (cfg, model) = load_reference_with_config(&args.model)?;
            return Ok((Loaded::Reference(Box::new(model)), cfg.eos_token_ids));
        }
        if !args.model.is_file() {
            bail!(
                "--model {}: no such file or directory",
                args.model.display()
            );
        }
        let weights = args.weights.as_ref().with_context(|| {
            format!(
                "--model {} is a compiled artifact: give its weights with --weights DIR",
                args.model.display()
            )
        })?;
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        let model = CompiledModel::load_with(&args.model, weights, threads, args.residency())?;
        let eos = model.config().eos_token_ids.clone();
        Ok((Loaded::Compiled(Box::new(model)), eos))
    }

    /// Compiles the model directory in process and binds its weights (or those of --weights).
    fn load_jit(args: &ModelArgs) -> Result<(Loaded, Vec<u32>)> {
        if !args.model.is_dir() {
            bail!(
                "--jit needs --model to be a model directory (config.json + weights), not {}",
                args.model.display()
            );
        }
        let cfg = ModelSource::Directory(args.model.clone()).config()?;
        let graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
        let opts = q3c_backend_cranelift::CompileOptions::default();
        let jit = q3c_backend_cranelift::compile_jit(&graph, &cfg, q3c_compiler::LOGITS, &opts)?;
        let weights = args.weights.as_deref().unwrap_or(&args.model);
        let threads = args.threads.unwrap_or_else(default_threads);
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        // SAFETY: `forward` and `manifest` come from the same JIT compilation, kept alive by `code`.
        let model = unsafe {
            CompiledModel::from_code(
                jit.forward,
                jit.manifest,
                Box::new(jit.code),
                weights,
                threads,
                args.residency(),
            )?
        };
        Ok((Loaded::Compiled(Box::new(model)), cfg.eos_token_ids))
    }

    fn session(&self) -> Box<dyn Session + '_> {
        match self {
            Loaded::Reference(m) => Box::new(m.session()),
            Loaded::Compiled(m) => Box::new(m.session()),
        }
    }

    /// A session whose KV cache holds `tokens` (the reference executor's cache grows as needed).
    pub(crate) fn session_with_capacity(&self, tokens: usize) -> Box<dyn Session + '_> {
        match self {
            Loaded::Reference(m) => Box::new(m.session()),
            Loaded::Compiled(m) => Box::new(m.session_with_capacity(tokens)),
        }
    }

    /// Most tokens a served conversation may hold: a compiled model's `max_position_embeddings` (no limit of
    /// its own for the reference executor), capped at 8 × the default session context.
    fn context(&self) -> usize {
        let limit = match self {
            Loaded::Reference(_) => usize::MAX,
            Loaded::Compiled(m) => m.config().max_position_embeddings,
        };
        limit.min(q3c_runtime::compiled::DEFAULT_CONTEXT * 8)
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ir {
            model,
            dot,
            out,
            fusion,
            after,
            dump_all,
            time_passes,
        } => {
            let cfg = ModelSource::parse(&model).config()?;
            let mut graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
            let strategy = match (&after, fusion.as_str()) {
                (Some(pass), "none") => Strategy::parse(pass)?,
                _ => Strategy::parse(&fusion)?,
            };
            if let Some(pass) = &after {
                if !strategy.passes().iter().any(|p| p.name == pass) {
                    bail!(
                        "--after {pass}: that pass is not in the strategy '{}'",
                        strategy.name()
                    );
                }
            }
            let render = |g: &q3c_ir::Graph| {
                if dot {
                    q3c_ir::dot::to_dot(g)
                } else {
                    q3c_ir::text::print(g)
                }
            };
            let mut text = String::new();
            if dump_all {
                text += &format!("; ==== {model}: lowered ====\n{}", render(&graph));
            }
            q3c_compiler::pipeline::run(&mut graph, &strategy, true, |report, g| {
                if time_passes {
                    eprintln!(
                        "pass {:<12} {:>9.3} ms  {:>5} rewrites  {:>6} nodes after",
                        report.pass,
                        report.elapsed.as_secs_f64() * 1e3,
                        report.rewrites,
                        report.nodes_after
                    );
                }
                if dump_all {
                    text += &format!("; ==== after {} ====\n{}", report.pass, render(g));
                } else if after.as_deref() == Some(report.pass) {
                    text = render(g);
                }
            })?;
            if !dump_all && after.is_none() {
                text = render(&graph);
            }
            match out {
                Some(path) => write_atomically(&path, text.as_bytes()),
                None => print_stdout(&text),
            }
        }
        Command::Compile {
            model,
            out,
            backend,
            target,
            gpu,
            target_cpu,
            bf16_activations,
            quantize,
            max_tokens,
            fusion,
        } => {
            let cfg = ModelSource::parse(&model).config()?;
            let start = std::time::Instant::now();
            let strategy = Strategy::parse(&fusion)?;
            if target == "nvptx" {
                if backend != "llvm" {
                    bail!("--target nvptx needs --backend llvm");
                }
                let graph = fused_graph(&cfg, &strategy)?;
                let (ptx, kernels) =
                    crate::codegen::compile_ptx(&graph, &cfg, &gpu, max_tokens, strategy.name())?;
                write_atomically(&out, ptx.as_bytes())?;
                eprintln!(
                    "compiled {model} to PTX for {gpu} into {} ({kernels} kernels) in {:.2} s",
                    out.display(),
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            let how = crate::codegen::CpuCodegen {
                backend: &backend,
                target_cpu: &target_cpu,
                max_tokens,
                bf16_activations,
                weights_q8: quantize == "q8",
            };
            let (manifest, _) = compile_artifact(&cfg, &strategy, &how, &out)?;
            eprintln!(
                "compiled {model} with {backend} into {} ({} kernels, {} weights) in {:.2} s",
                out.display(),
                manifest.kernels,
                manifest.weights.len(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Inspect { artifact, json } => {
            let m = q3c_runtime::compiled::read_manifest(&artifact)?;
            if json {
                return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&m)?));
            }
            print_stdout(&describe_manifest(&m))
        }
        Command::Logits {
            model,
            prompt_ids,
            out,
        } => {
            let ids = parse_ids(&prompt_ids)?;
            let (model, _) = Loaded::load(&model)?;
            let logits = model.session().forward(&ids)?;
            let bytes: Vec<u8> = logits.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![logits.rows, logits.vocab],
                &bytes,
            )
            .context("building the logits tensor")?;
            let data =
                safetensors::serialize([("logits", view)], None).context("serialising logits")?;
            write_atomically(&out, &data)
        }
        Command::Generate {
            model,
            prompt_ids,
            prompt,
            chat,
            system,
            thinking_budget,
            no_thinking,
            tokenizer,
            stop,
            max_new_tokens,
            sampling,
            ignore_eos,
            json,
        } => {
            textgen::check_chat_flags(chat, thinking_budget, no_thinking)?;
            let text_dir = || {
                textgen::tokenizer_dir(tokenizer.as_deref(), &model.model, model.weights.as_deref())
            };
            if chat {
                let text = TextModel::load(&text_dir()?)?;
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(serde_json::json!({"role": "system", "content": system}));
                }
                let user = prompt.expect("clap: --chat requires --prompt");
                messages.push(serde_json::json!({"role": "user", "content": user}));
                let (ids, thinking) =
                    text.prompt(&messages, None, !no_thinking, thinking_budget)?;
                let opts = ChatOptions {
                    max_new_tokens,
                    sampling: sampling.over(SamplingParams::for_mode(thinking)),
                    thinking,
                    thinking_budget,
                    stop,
                    cancel: None,
                };
                opts.sampling.check()?;
                let (loaded, _) = Loaded::load(&model)?;
                let start = std::time::Instant::now();
                let mut stdout = std::io::stdout();
                let out = q3c_runtime::chat::decode(
                    &mut *loaded.session(),
                    &text.tokenizer,
                    &ids,
                    &opts,
                    |piece| {
                        if !json {
                            let _ = match piece {
                                Piece::Reasoning(t) => write!(std::io::stderr(), "{t}"),
                                Piece::Content(t) => write!(stdout, "{t}"),
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
                return Ok(());
            }
            let (ids, tok) = match (prompt_ids, prompt) {
                (Some(list), _) => (parse_ids(&list)?, None),
                (None, Some(text)) => {
                    let tok = Tokenizer::from_dir(&text_dir()?)?;
                    (tok.encode(&text)?, Some(tok))
                }
                (None, None) => bail!("give --prompt-ids or --prompt"),
            };
            if ids.is_empty() {
                bail!("--prompt: the text has no tokens");
            }
            let (model, eos) = Loaded::load(&model)?;
            let stop_ids = if ignore_eos { vec![] } else { eos };
            let opts = GenerateOptions {
                max_new_tokens,
                sampling: sampling.over(SamplingParams::greedy()),
                stop_ids,
            };
            let start = std::time::Instant::now();
            let out = generate(&mut *model.session(), &ids, &opts)?;
            let secs = start.elapsed().as_secs_f64();
            let stopped = out.last().is_some_and(|id| opts.stop_ids.contains(id));
            let text = tok.as_ref().map(|t| t.decode(&out)).transpose()?;
            if json {
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
                print_stdout(&format!("{obj}\n"))
            } else {
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
        }
        Command::Chat {
            target,
            system,
            thinking_budget,
            hide_thinking,
            max_new_tokens,
            sampling,
        } => {
            let (text, loaded) = target.load()?;
            let mut session = loaded.session();
            textgen::repl(
                &mut *session,
                &text,
                &sampling,
                max_new_tokens,
                thinking_budget,
                hide_thinking,
                system,
            )
        }
        Command::Bench {
            model,
            prompt_len,
            gen,
            reps,
            json,
            compare_fusion,
            strategies,
            backend,
            html,
            svg,
        } => {
            if prompt_len == 0 {
                bail!("--prompt-len must be at least 1");
            }
            let threads = model.threads.unwrap_or_else(default_threads);
            if compare_fusion {
                let strategies = if strategies.is_empty() {
                    crate::compare::default_strategies()
                } else {
                    strategies
                        .iter()
                        .map(|s| Strategy::parse(s))
                        .collect::<Result<_, _>>()?
                };
                let settings = crate::compare::Settings {
                    threads,
                    prompt_len,
                    gen,
                    rounds: reps,
                    max_tokens: 256,
                    backend,
                };
                let work = tempfile::tempdir().context("creating a temporary directory")?;
                let rows = crate::compare::run(&model.model, &strategies, work.path(), &settings)?;
                let title = format!("q3c fusion strategies: {}", model.model.display());
                if let Some(path) = &svg {
                    write_atomically(path, crate::chart::svg(&rows, &title).as_bytes())?;
                }
                if let Some(path) = &html {
                    write_atomically(
                        path,
                        crate::chart::html(&rows, &settings, &title).as_bytes(),
                    )?;
                }
                return if json {
                    print_stdout(&format!("{}\n", serde_json::to_string(&rows)?))
                } else {
                    print_stdout(&crate::compare::table(&rows, &settings))
                };
            }
            let (loaded, _) = Loaded::load(&model)?;
            let mut session = loaded.session();
            let vocab = session.vocab_size();
            let r = crate::bench::run(&mut *session, vocab, prompt_len, gen, threads, reps)?;
            if json {
                print_stdout(&format!("{}\n", serde_json::to_string(&r)?))
            } else {
                print_stdout(&format!(
                    "pp{prompt_len}: {:.2} tok/s (mean {:.2} ± {:.2})\ntg{gen}: {:.2} tok/s (mean {:.2} ± {:.2})\n\
                     ({} threads, best of {})\n",
                    r.prefill_tok_s,
                    r.prefill_mean_tok_s,
                    r.prefill_std_tok_s,
                    r.decode_tok_s,
                    r.decode_mean_tok_s,
                    r.decode_std_tok_s,
                    r.threads,
                    r.repetitions
                ))
            }
        }
        Command::RandomWeights {
            model,
            out,
            dtype,
            seed,
            tokenizer,
        } => {
            let cfg = ModelSource::parse(&model).config()?;
            let dtype = match dtype.as_str() {
                "f32" => q3c_models::DType::F32,
                "f16" => q3c_models::DType::F16,
                _ => q3c_models::DType::BF16,
            };
            Ok(q3c_models::random::write_checkpoint(
                &cfg,
                dtype,
                seed,
                &out,
                tokenizer.as_deref(),
            )?)
        }
        Command::Serve {
            target,
            port,
            host,
            name,
            max_concurrent,
        } => {
            if max_concurrent == 0 {
                bail!("--max-concurrent must be at least 1");
            }
            let name = name.unwrap_or_else(|| {
                target
                    .model
                    .file_stem()
                    .map_or("q3c".into(), |s| s.to_string_lossy().into_owned())
            });
            let (text, engine) = target.load()?;
            let context = engine.context();
            let served = crate::serve::Served {
                engine,
                text,
                name,
                context,
                slots: std::sync::Arc::new(tokio::sync::Semaphore::new(max_concurrent)),
            };
            crate::serve::run(served, &format!("{host}:{port}"), |addr| {
                println!("q3c serve: listening on http://{addr}");
                let _ = std::io::stdout().flush();
            })
        }
        Command::Probe { threads, mib, json } => {
            if mib == 0 {
                bail!("--mib must be at least 1");
            }
            let limits = crate::probe::run(threads.unwrap_or_else(default_threads), mib);
            if json {
                print_stdout(&format!("{}\n", serde_json::to_string(&limits)?))
            } else {
                print_stdout(&format!(
                    "read bandwidth: {:.1} GB/s\nf32 FMA peak:   {:.1} GFLOP/s ({})\n({} threads)\n",
                    limits.read_gb_s, limits.fma_gflop_s, limits.isa, limits.threads
                ))
            }
        }
        Command::Models => {
            let mut text = String::new();
            for name in registry::names() {
                let cfg = registry::lookup(name).expect("registry name");
                let kind = match &cfg.moe {
                    Some(m) => format!(
                        "MoE {} experts, top-{}",
                        m.num_experts, m.num_experts_per_tok
                    ),
                    None => "dense".into(),
                };
                text += &format!(
                    "{name:<16} {:>7.2}B params  {:>2} layers  {:>2}/{} heads  {kind}{}\n",
                    cfg.parameter_count() as f64 / 1e9,
                    cfg.num_hidden_layers,
                    cfg.num_attention_heads,
                    cfg.num_key_value_heads,
                    if cfg.tie_word_embeddings {
                        ", tied"
                    } else {
                        ""
                    },
                );
            }
            print_stdout(&text)
        }
    }
}

/// `cfg` lowered and rewritten by `strategy`'s passes.
fn fused_graph(cfg: &q3c_models::Qwen3Config, strategy: &Strategy) -> Result<q3c_ir::Graph> {
    let mut graph = q3c_compiler::lower(cfg).context("lowering failed (a q3c bug)")?;
    q3c_compiler::pipeline::run(&mut graph, strategy, true, |_, _| {})?;
    Ok(graph)
}

/// Lowers `cfg`, runs `strategy`'s passes, compiles as `how` says and links the artifact at `out`.
/// Returns the artifact's manifest and the fused graph.
pub(crate) fn compile_artifact(
    cfg: &q3c_models::Qwen3Config,
    strategy: &Strategy,
    how: &crate::codegen::CpuCodegen,
    out: &Path,
) -> Result<(q3c_abi::Manifest, q3c_ir::Graph)> {
    let graph = fused_graph(cfg, strategy)?;
    let (object, manifest) = crate::codegen::compile_object(&graph, cfg, strategy.name(), how)?;
    q3c_backend_common::link_shared(&object, out)?;
    Ok((manifest, graph))
}

/// All cores.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Parses `1,2,3` into token ids.
fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--prompt-ids: '{s}' is not a token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--prompt-ids: give at least one token id, e.g. --prompt-ids 1,2,3");
    }
    Ok(ids)
}

fn load_reference_with_config(dir: &Path) -> Result<(q3c_models::Qwen3Config, ReferenceModel)> {
    if !dir.is_dir() {
        bail!("--model {}: not a directory (expected a model directory with config.json and safetensors weights)", dir.display());
    }
    let cfg = ModelSource::Directory(dir.to_path_buf()).config()?;
    let ckpt = Checkpoint::open(dir)?;
    ckpt.check(&cfg)
        .with_context(|| format!("weights in {}", dir.display()))?;
    let graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
    let model = ReferenceModel::new(graph, &ckpt, q3c_compiler::LOGITS)?;
    Ok((cfg, model))
}

/// The manifest in human form.
fn describe_manifest(m: &q3c_abi::Manifest) -> String {
    let c = &m.config;
    let mut s = String::new();
    s += &format!(
        "q3c artifact (ABI {}, q3c {}, backend {})\n",
        m.abi_version, m.compiler_version, m.backend
    );
    s += &format!(
        "model:     {} layers, hidden {}, heads {}/{} x {}, vocab {}, {}\n",
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        m.vocab_size,
        if c.get("num_experts").is_some() {
            format!(
                "MoE {} experts top-{}",
                c["num_experts"], c["num_experts_per_tok"]
            )
        } else {
            "dense".into()
        }
    );
    s += &format!(
        "weights:   {} tensors, dtype {}\n",
        m.weights.len(),
        c["torch_dtype"].as_str().unwrap_or("?")
    );
    s += &format!(
        "kv cache:  {} layers x {} kv heads x {} ({}), per token {} bytes\n",
        m.kv.layers,
        m.kv.kv_heads,
        m.kv.head_dim,
        m.kv.dtype,
        2 * m.kv.layers * m.kv.kv_heads * m.kv.head_dim * 4
    );
    s += &format!(
        "calls:     up to {} tokens, scratch {} bytes per token\n",
        m.max_tokens_per_call, m.scratch_bytes_per_token
    );
    s += &format!(
        "kernels:   {} per forward call, fusion {}\n",
        m.kernels, m.fusion
    );
    s += &format!(
        "target:    {} ({})\n",
        m.target_cpu,
        m.required_cpu_features.join(" ")
    );
    s
}

/// Writes `data` to a temporary file beside `path`, then renames it into place: never half-written.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Prints to stdout; a closed pipe (`q3c ir ... | head`) is not an error.
fn print_stdout(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}
