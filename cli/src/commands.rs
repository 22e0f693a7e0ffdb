//! The subcommands and what they print.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use q3c_models::{registry, Checkpoint, ModelSource};
use q3c_runtime::{generate, GenerateOptions, ReferenceModel, Session};

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
    },
    /// Run a prompt through a model and write its logits (f32 [T, vocab]) to a safetensors file.
    Logits {
        /// Model directory: config.json and safetensors weights.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_name = "IDS")]
        prompt_ids: String,
        /// Output safetensors file; holds one tensor `logits`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Continue a prompt of token ids.
    Generate {
        /// Model directory: config.json and safetensors weights.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_name = "IDS")]
        prompt_ids: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// 0 for greedy decoding; above 0 samples from softmax(logits / temperature).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sampler seed (same seed, same output).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Do not stop at the config's end-of-sequence ids.
        #[arg(long)]
        ignore_eos: bool,
        /// Print one JSON object ({"ids": [...], ...}) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the released models q3c knows by name.
    Models,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ir { model, dot, out } => {
            let cfg = ModelSource::parse(&model).config()?;
            let graph = q3c_compiler::lower(&cfg).context("lowering failed (a q3c bug)")?;
            let text = if dot {
                q3c_ir::dot::to_dot(&graph)
            } else {
                q3c_ir::text::print(&graph)
            };
            match out {
                Some(path) => write_atomically(&path, text.as_bytes()),
                None => print_stdout(&text),
            }
        }
        Command::Logits {
            model,
            prompt_ids,
            out,
        } => {
            let ids = parse_ids(&prompt_ids)?;
            let model = load_reference(&model)?;
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
            max_new_tokens,
            temperature,
            seed,
            ignore_eos,
            json,
        } => {
            let ids = parse_ids(&prompt_ids)?;
            let (cfg, model) = load_reference_with_config(&model)?;
            let stop_ids = if ignore_eos {
                vec![]
            } else {
                cfg.eos_token_ids.clone()
            };
            let opts = GenerateOptions {
                max_new_tokens,
                temperature,
                seed,
                stop_ids,
            };
            let start = std::time::Instant::now();
            let out = generate(&mut model.session(), &ids, &opts)?;
            let secs = start.elapsed().as_secs_f64();
            let stopped = out.last().is_some_and(|id| opts.stop_ids.contains(id));
            if json {
                let obj = serde_json::json!({
                    "ids": out,
                    "prompt_tokens": ids.len(),
                    "generated_tokens": out.len(),
                    "finish_reason": if stopped { "stop" } else { "length" },
                    "seconds": secs,
                });
                print_stdout(&format!("{obj}\n"))
            } else {
                let list: Vec<String> = out.iter().map(u32::to_string).collect();
                print_stdout(&format!("{}\n", list.join(" ")))?;
                eprintln!(
                    "{} tokens in {secs:.2} s ({})",
                    out.len(),
                    if stopped { "stopped" } else { "length" }
                );
                Ok(())
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

fn load_reference(dir: &Path) -> Result<ReferenceModel> {
    Ok(load_reference_with_config(dir)?.1)
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
