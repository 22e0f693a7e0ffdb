//! `q3c random-weights`: a checkpoint of random weights for any config (benchmarks, smoke tests).

use std::path::PathBuf;

use anyhow::Result;
use q3c_models::ModelSource;

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
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ModelSource::parse(&args.model).config()?;
    let dtype = match args.dtype {
        Dtype::F32 => q3c_models::DType::F32,
        Dtype::Bf16 => q3c_models::DType::BF16,
        Dtype::F16 => q3c_models::DType::F16,
    };
    Ok(q3c_models::random::write_checkpoint(
        &cfg,
        dtype,
        args.seed,
        &args.out,
        args.tokenizer.as_deref(),
    )?)
}
