//! `q3c quantize`: a pre-quantized copy of a checkpoint (8 or 4 bits), which an artifact compiled with the
//! same `--quantize` binds as it is — no re-quantization at every load.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use q3c_models::tensors::expected_tensors;
use q3c_models::writer::{plan_tensors, write_safetensors, Packer};
use q3c_models::{Checkpoint, Qwen3Config};

use crate::codegen::Quantize;
use crate::packing::PlanPacker;

#[derive(clap::Args)]
pub struct Args {
    /// A model directory (config.json + safetensors).
    model: PathBuf,
    /// The format: q8 (8-bit groups of 32, f32 scales) or q4 (4-bit groups of 32, f16 scales; the
    /// logits matrix in 6 bits).
    #[arg(long, value_enum)]
    to: Quantize,
    /// Output directory: model.safetensors with the packed tensors, config and tokenizer files copied.
    #[arg(short, long)]
    out: PathBuf,
}

/// Files copied beside the weights when present.
const COPIED: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

pub fn run(args: Args) -> Result<()> {
    let start = std::time::Instant::now();
    if args.to == Quantize::None {
        bail!("--to must be q8 or q4");
    }
    let cfg = Qwen3Config::from_file(&args.model.join("config.json"))?;
    let ckpt = Checkpoint::open(&args.model)?;
    ckpt.check(&cfg)?;
    if let Some(format) = ckpt.packed_formats().first() {
        bail!(
            "{} is already pre-quantized ({format}); quantize the original checkpoint",
            args.model.display()
        );
    }
    if args.out.exists() && std::fs::canonicalize(&args.out)? == std::fs::canonicalize(&args.model)?
    {
        bail!("--out must be another directory than the model's");
    }
    let packer = PlanPacker::new(&cfg, args.to)?;
    let specs = expected_tensors(&cfg);
    for spec in &specs {
        let t = ckpt.get(&spec.name).expect("checked");
        if t.dtype != cfg.torch_dtype {
            bail!(
                "tensor {} is {} but the config says {}; a checkpoint of one dtype is needed",
                spec.name,
                t.dtype,
                cfg.torch_dtype
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let plan = plan_tensors(&specs, cfg.torch_dtype, Some(&packer));
    let path = args.out.join(q3c_models::checkpoint::SINGLE_FILE);
    write_safetensors(&path, &plan.tensors, &plan.metadata, |i| {
        let (spec, t) = (&specs[i], ckpt.get(&specs[i].name).expect("checked"));
        Ok(match plan.packed[i] {
            Some(_) => packer.pack(&spec.name, &spec.shape, &t.to_f32()),
            None => t.bytes.to_vec(),
        })
    })?;
    for f in COPIED {
        let from = args.model.join(f);
        if from.is_file() {
            std::fs::copy(&from, args.out.join(f))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    let bytes = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let before: u64 = ckpt.files().map(bytes).sum();
    eprintln!(
        "quantized {} of {} tensors to {} into {} ({:.2} GB -> {:.2} GB) in {:.1} s",
        packer.count(),
        specs.len(),
        args.to.dtype().expect("q8 or q4"),
        args.out.display(),
        before as f64 / 1e9,
        bytes(&path) as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
