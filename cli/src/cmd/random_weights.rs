//! `q3c random-weights`: a checkpoint of random weights for any config (benchmarks, smoke tests).

use std::path::PathBuf;

use anyhow::Result;
use q3c_models::ModelSource;

use crate::codegen::Quantize;
use crate::packing::PlanPacker;

/// `--dtype`: the weights' dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

#[derive(clap::Args)]
pub struct Args {
    /// A registry name, a config.json, or a model directory.
    model: String,
    /// Output directory (config.json + model.safetensors).
    #[arg(short, long)]
    out: PathBuf,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Copy tokenizer.json and tokenizer_config.json from this directory.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Write the weights pre-quantized (q8 or q4, as `q3c quantize` would from the --dtype checkpoint),
    /// one tensor at a time: a full-size Qwen3-30B-A3B without its 61 GB bf16 original.
    #[arg(long, value_enum, default_value_t = Quantize::None)]
    quantize: Quantize,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ModelSource::parse(&args.model).config()?;
    let dtype = match args.dtype {
        Dtype::F32 => q3c_models::DType::F32,
        Dtype::Bf16 => q3c_models::DType::BF16,
        Dtype::F16 => q3c_models::DType::F16,
    };
    let packer = match args.quantize {
        Quantize::None => None,
        format => Some(PlanPacker::new(&cfg, format)?),
    };
    Ok(q3c_models::random::write_checkpoint_packed(
        &cfg,
        dtype,
        args.seed,
        &args.out,
        args.tokenizer.as_deref(),
        packer
            .as_ref()
            .map(|p| p as &dyn q3c_models::writer::Packer),
    )?)
}
