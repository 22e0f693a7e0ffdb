//! `q3c ir`: a model's graph IR, lowered and rewritten by a fusion strategy.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use q3c_compiler::Strategy;
use q3c_models::ModelSource;

use crate::output::{print_stdout, write_atomically};

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        model,
        dot,
        out,
        fusion,
        after,
        dump_all,
        time_passes,
    } = args;
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
