//! `q3c logits`: the logits of a prompt, as one f32 tensor `logits` [T, vocab] in a safetensors file.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::model_args::ModelArgs;
use crate::output::{parse_ids, write_atomically};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_name = "IDS")]
    prompt_ids: String,
    /// Output safetensors file; holds one tensor `logits`.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let ids = parse_ids(&args.prompt_ids)?;
    let model = args.model.load()?;
    let logits = model.session().forward(&ids)?;
    let bytes: Vec<u8> = logits.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![logits.rows, logits.vocab],
        &bytes,
    )
    .context("building the logits tensor")?;
    let data = safetensors::serialize([("logits", view)], None).context("serialising logits")?;
    write_atomically(&args.out, &data)
}
