//! `q3c inspect`: a compiled artifact's manifest, in human form or as JSON.

use std::path::PathBuf;

use anyhow::Result;

use crate::output::print_stdout;

#[derive(clap::Args)]
pub struct Args {
    /// A `.so` made by `q3c compile`.
    artifact: PathBuf,
    /// Print the raw JSON manifest.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let m = q3c_runtime::compiled::read_manifest(&args.artifact)?;
    if args.json {
        return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&m)?));
    }
    print_stdout(&describe(&m))
}

/// The manifest in human form.
fn describe(m: &q3c_abi::Manifest) -> String {
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
        m.kv.bytes_per_token()
    );
    s += &format!(
        "calls:     up to {} tokens, scratch {} bytes per token\n",
        m.max_tokens_per_call, m.scratch_bytes_per_token
    );
    if m.ranks > 1 {
        let sliced = m.weights.iter().filter(|w| w.shard.is_some()).count();
        let experts = m.weights.iter().filter(|w| w.owner.is_some()).count();
        let experts = match experts {
            0 => String::new(),
            n => format!(", {} of {n} experts' tensors", n / m.ranks),
        };
        s += &format!(
            "sharded:   over {} ranks (run with mpirun -np {}): each binds its slice of {sliced} \
             tensors{experts} and holds the kv cache above\n",
            m.ranks, m.ranks
        );
    }
    s += &format!(
        "kernels:   {} per forward call, fusion {}, {} activations in products\n",
        m.kernels, m.fusion, m.matmul_activations
    );
    // Dispatches with another kernel for calls of many rows (tensor-core tiles on GPUs).
    let many: Vec<_> = m
        .launch
        .iter()
        .flat_map(|l| &l.dispatches)
        .filter_map(|d| d.many_rows)
        .collect();
    if let Some(from) = many.iter().map(|r| r.from).min() {
        s += &format!(
            "tensor:    {} product dispatches run on tensor cores in calls of {from} rows or more\n",
            many.len()
        );
    }
    s += &match m.backend.as_str() {
        q3c_abi::cuda::BACKEND => format!(
            "target:    NVIDIA GPU {} and newer (a CUDA artifact: --model runs it with the cuda feature)\n",
            m.target_cpu
        ),
        _ => format!(
            "target:    {} ({})\n",
            m.target_cpu,
            m.required_cpu_features.join(" ")
        ),
    };
    s
}
