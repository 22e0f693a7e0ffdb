//! `q3c bench --compare-fusion`: one model compiled under several fusion strategies, measured side by side.
//!
//! Every strategy is compiled to a real `.so` (timed: lowering, passes, code generation and linking) and
//! loaded with the same weights. Speeds are measured in alternating rounds — one repetition of every
//! strategy per round. A strategy's speed ratio is the median over the rounds of its speed over the
//! baseline's in the same round, so a burst of load on a shared machine spoils one round, not the verdict;
//! the absolute figures shown are the best round's.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use q3c_compiler::metrics::Traffic;
use q3c_compiler::Strategy;
use q3c_models::ModelSource;
use q3c_runtime::CompiledModel;

use crate::bench;

/// One strategy's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub strategy: String,
    /// Kernels per forward call, and per layer (the call's kernels over the layer count).
    pub kernels: usize,
    pub kernels_per_layer: f64,
    /// Activation traffic per token, from the fused graph.
    pub traffic: Traffic,
    pub compile_s: f64,
    /// Best prefill and decode speed over the rounds.
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Prefill and decode speed in each round.
    pub prefill_rounds: Vec<f64>,
    pub decode_rounds: Vec<f64>,
}

/// What to measure.
pub struct Settings {
    pub threads: usize,
    pub prompt_len: usize,
    pub gen: usize,
    pub rounds: usize,
    pub max_tokens: usize,
    /// Code generator of the artifacts (resolved: not `auto`).
    pub backend: crate::codegen::Backend,
}

/// The strategies compared when none are named: `none`, each pass alone, then `all`.
pub fn default_strategies() -> Vec<Strategy> {
    let mut s = vec![Strategy::none()];
    s.extend(
        q3c_compiler::pipeline::PASSES
            .iter()
            .map(|p| Strategy::parse(p.name).expect("a pass name parses")),
    );
    s.push(Strategy::parse("all").expect("'all' parses"));
    s
}

/// Compiles `model_dir` under each strategy into `work_dir`, then measures them in alternating rounds
/// (after one untimed warm-up round).
pub fn run(
    model_dir: &Path,
    strategies: &[Strategy],
    work_dir: &Path,
    settings: &Settings,
) -> Result<Vec<Row>> {
    if !model_dir.is_dir() {
        bail!(
            "--compare-fusion compiles the model under each strategy: give --model a model directory \
             (config.json + safetensors), not {}",
            model_dir.display()
        );
    }
    let cfg = ModelSource::Directory(model_dir.to_path_buf()).config()?;
    let mut rows = Vec::new();
    let mut models = Vec::new();
    for (i, strategy) in strategies.iter().enumerate() {
        let so = work_dir.join(format!("strategy{i}.so"));
        let start = Instant::now();
        let (manifest, graph) = crate::codegen::compile_artifact(
            &cfg,
            strategy,
            &crate::codegen::CpuCodegen {
                backend: settings.backend,
                target_cpu: "native",
                max_tokens: settings.max_tokens,
                bf16_activations: false,
                quantize: crate::codegen::Quantize::None,
                kv_dtype: q3c_ir::DType::F32,
                shards: 1,
                moe_split: q3c_compiler::MoeSplit::default(),
            },
            &so,
        )?;
        let compile_s = start.elapsed().as_secs_f64();
        rows.push(Row {
            strategy: strategy.name().to_string(),
            kernels: manifest.kernels,
            kernels_per_layer: manifest.kernels as f64 / cfg.num_hidden_layers as f64,
            traffic: q3c_compiler::metrics::traffic(&graph),
            compile_s,
            prefill_tok_s: 0.0,
            decode_tok_s: 0.0,
            prefill_rounds: Vec::new(),
            decode_rounds: Vec::new(),
        });
        models.push(CompiledModel::load(&so, model_dir, settings.threads)?);
    }
    // One untimed pass over every model first: page in the weights and start the threads.
    for round in 0..=settings.rounds.max(1) {
        for (row, model) in rows.iter_mut().zip(&models) {
            let mut session = model.session_with_capacity(settings.prompt_len + settings.gen);
            let vocab = cfg.vocab_size;
            let work = bench::Workload {
                prompt_len: settings.prompt_len,
                gen: settings.gen,
                depth: None,
                reps: 1,
            };
            let r = bench::run(&mut session, vocab, work, settings.threads)?;
            if round == 0 {
                continue;
            }
            row.prefill_tok_s = row.prefill_tok_s.max(r.prefill_tok_s);
            row.decode_tok_s = row.decode_tok_s.max(r.decode_tok_s);
            row.prefill_rounds.push(r.prefill_tok_s);
            row.decode_rounds.push(r.decode_tok_s);
        }
    }
    Ok(rows)
}

/// One figure of the comparison.
pub struct Column {
    pub name: &'static str,
    pub value: fn(&Row) -> f64,
    pub lower_is_better: bool,
    /// For measured speeds: the value in each round (the ratio is then the median of per-round ratios).
    pub rounds: Option<fn(&Row) -> &[f64]>,
}

/// The figures compared, in table order.
pub const COLUMNS: [Column; 5] = [
    Column {
        name: "kernels/layer",
        value: |r| r.kernels_per_layer,
        lower_is_better: true,
        rounds: None,
    },
    Column {
        name: "act. bytes/token",
        value: |r| r.traffic.bytes() as f64,
        lower_is_better: true,
        rounds: None,
    },
    Column {
        name: "compile s",
        value: |r| r.compile_s,
        lower_is_better: true,
        rounds: None,
    },
    Column {
        name: "prefill tok/s",
        value: |r| r.prefill_tok_s,
        lower_is_better: false,
        rounds: Some(|r| &r.prefill_rounds),
    },
    Column {
        name: "decode tok/s",
        value: |r| r.decode_tok_s,
        lower_is_better: false,
        rounds: Some(|r| &r.decode_rounds),
    },
];

/// Each column of `row` as a ratio to the baseline row (the first); speeds as the median of the per-round
/// ratios.
pub fn ratios(rows: &[Row], row: &Row) -> Vec<f64> {
    let base = &rows[0];
    COLUMNS
        .iter()
        .map(|c| {
            c.rounds
                .and_then(|rounds| median_ratio(rounds(row), rounds(base)))
                .unwrap_or_else(|| (c.value)(row) / (c.value)(base))
        })
        .collect()
}

/// The median of `a[i] / b[i]`, or `None` without rounds.
fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    let n = r.len();
    Some(if n % 2 == 1 {
        r[n / 2]
    } else {
        (r[n / 2 - 1] + r[n / 2]) / 2.0
    })
}

/// The table: each figure with its ratio to the first row in parentheses.
pub fn table(rows: &[Row], settings: &Settings) -> String {
    let mut s = format!(
        "{:<34}{:>18}{:>22}{:>16}{:>20}{:>20}\n",
        "strategy",
        COLUMNS[0].name,
        COLUMNS[1].name,
        COLUMNS[2].name,
        format!("pp{} tok/s", settings.prompt_len),
        format!("tg{} tok/s", settings.gen)
    );
    for row in rows {
        let r = ratios(rows, row);
        s += &format!(
            "{:<34}{:>18}{:>22}{:>16}{:>20}{:>20}\n",
            row.strategy,
            format!("{:.1} ({:.2})", row.kernels_per_layer, r[0]),
            format!("{} ({:.2})", row.traffic.bytes(), r[1]),
            format!("{:.2} ({:.2})", row.compile_s, r[2]),
            format!("{:.1} ({:.2})", row.prefill_tok_s, r[3]),
            format!("{:.1} ({:.2})", row.decode_tok_s, r[4]),
        );
    }
    s += &format!(
        "(ratios to {} in parentheses; {} threads, {} alternating rounds: best speed shown, ratio = median of per-round ratios)\n",
        rows[0].strategy, settings.threads, settings.rounds
    );
    s
}
