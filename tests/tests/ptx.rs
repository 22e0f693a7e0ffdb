//! The LLVM backend's PTX: every kernel of every fixture's graph (unfused and fully fused) becomes a PTX
//! entry point, and NVIDIA's `ptxas` assembles the module for sm_80 and sm_90.
//!
//! Needs `ptxas` (PyPI `nvidia-cuda-nvcc-cu12`) on `PATH` or named by `$PTXAS`; `.ci/run` installs it.
#![cfg(feature = "llvm")]

use std::path::{Path, PathBuf};
use std::process::Command;

use q3c_ir::DType;
use q3c_tests::*;

fn ptxas() -> PathBuf {
    let path = std::env::var_os("PTXAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("ptxas"));
    match Command::new(&path).arg("--version").output() {
        Ok(o) if o.status.success() => path,
        _ => panic!(
            "ptxas not found ({}): pip install nvidia-cuda-nvcc-cu12 and put its nvidia/cuda_nvcc/bin on PATH, \
             or set PTXAS",
            path.display()
        ),
    }
}

/// Writes `ptx` to `file` and assembles it with `ptxas` for `gpu`, which must succeed with a cubin.
fn assemble(ptxas: &Path, ptx: &str, gpu: &str, file: &Path) {
    std::fs::write(file, ptx).unwrap();
    let cubin = file.with_extension("cubin");
    let out = Command::new(ptxas)
        .arg(format!("-arch={gpu}"))
        .arg(file)
        .arg("-o")
        .arg(&cubin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: ptxas failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(&cubin).unwrap().len() > 0);
}

#[test]
fn every_kernel_assembles_with_ptxas_for_sm80_and_sm90() {
    let ptxas = ptxas();
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (cfg, _) = open_fixture(name);
        for fusion in ["none", "all"] {
            let graph = fused_graph(&cfg, fusion);
            let kernels = graph
                .topo_order()
                .unwrap()
                .into_iter()
                .filter(|&id| !graph.node(id).op.is_leaf() && !graph.node(id).op.is_view())
                .count();
            let expert_products = graph
                .topo_order()
                .unwrap()
                .into_iter()
                .filter(|&id| q3c_backend_common::launch::is_expert_product(&graph.node(id).op))
                .count();
            // sm_90 with an f16 KV cache (conversions in PTX), sm_80 with f32, sm_89 with q8 (bytes and
            // scales).
            for (gpu, kv_dtype) in [
                ("sm_80", DType::F32),
                ("sm_90", DType::F16),
                ("sm_89", DType::Q8),
            ] {
                let opts = q3c_backend_llvm::PtxOptions {
                    gpu: gpu.into(),
                    max_tokens_per_call: 16,
                    fusion: fusion.into(),
                    kv_dtype,
                    quantize: None,
                    bf16_activations: false,
                };
                let m = q3c_backend_llvm::compile_ptx(&graph, &cfg, q3c_compiler::LOGITS, &opts)
                    .unwrap();
                // One dispatch per node, plus the steps around grouped expert products (a gather and a
                // scatter each, and a grouping per MoE layer) and the one moving the logit rows together.
                let helpers = m
                    .kernels
                    .iter()
                    .filter(|k| k.starts_with("q3c_moe_"))
                    .count();
                let compact = m
                    .kernels
                    .iter()
                    .filter(|k| k.starts_with("q3c_compact_"))
                    .count();
                assert_eq!(compact, 1, "{name} {fusion}");
                assert_eq!(
                    m.kernels.len() - helpers - compact,
                    kernels,
                    "{name} {fusion}"
                );
                let moe_layers = (0..cfg.num_hidden_layers)
                    .filter(|&l| cfg.moe.is_some() && cfg.is_sparse_layer(l))
                    .count();
                assert_eq!(helpers, 2 * expert_products + moe_layers, "{name} {fusion}");
                let distinct: std::collections::BTreeSet<&String> = m.kernels.iter().collect();
                assert_eq!(
                    m.ptx.matches(".visible .entry ").count(),
                    distinct.len(),
                    "{name} {fusion} {gpu}: one entry point per distinct kernel"
                );
                assert!(
                    distinct.len() < kernels,
                    "{name} {fusion}: the layers' identical kernels are shared"
                );
                for k in distinct {
                    assert!(m.ptx.contains(&format!(".visible .entry {k}(")), "{k}");
                }
                assert!(m.ptx.contains(&format!(".target {gpu}")));
                let file = tmp.path().join(format!("{name}-{fusion}-{gpu}.ptx"));
                assemble(&ptxas, &m.ptx, gpu, &file);
            }
        }
    }
}

#[test]
fn unknown_gpus_are_refused() {
    let (cfg, _) = open_fixture("dense_gqa");
    let graph = fused_graph(&cfg, "none");
    for gpu in ["sm_9000", "gfx90a", ""] {
        let opts = q3c_backend_llvm::PtxOptions {
            gpu: gpu.into(),
            max_tokens_per_call: 16,
            fusion: "none".into(),
            kv_dtype: DType::F32,
            quantize: None,
            bf16_activations: false,
        };
        let err = q3c_backend_llvm::compile_ptx(&graph, &cfg, q3c_compiler::LOGITS, &opts)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("GPU"), "{gpu}: {err}");
    }
}

/// `--quantize q8|q4` on GPUs: every fixture's products over quantized panels, dense and experts' (where
/// their shapes make panels), assemble with `ptxas` for sm_80 and sm_90.
#[test]
fn quantized_products_assemble_with_ptxas() {
    let ptxas = ptxas();
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (cfg, _) = open_fixture(name);
        let graph = fused_graph(&cfg, "all");
        for (gpu, quantize) in [("sm_80", DType::Q8), ("sm_90", DType::Q4)] {
            let opts = q3c_backend_llvm::PtxOptions {
                gpu: gpu.into(),
                max_tokens_per_call: 16,
                fusion: "all".into(),
                kv_dtype: DType::F16,
                quantize: Some(quantize),
                bf16_activations: false,
            };
            let m =
                q3c_backend_llvm::compile_ptx(&graph, &cfg, q3c_compiler::LOGITS, &opts).unwrap();
            let kind = quantize.to_string();
            assert!(
                m.manifest.weights.iter().any(|w| w.kernel_dtype == kind),
                "{name} {gpu}: no weight bound as {kind}"
            );
            // The experts' matrices too where they make whole panels and groups.
            if let Some(moe) = &cfg.moe {
                let quantized = m
                    .manifest
                    .weights
                    .iter()
                    .filter(|w| w.name.contains(".experts."))
                    .all(|w| w.kernel_dtype == kind);
                let panels = moe.moe_intermediate_size.is_multiple_of(32);
                assert_eq!(quantized, panels, "{name} {gpu}: expert weights as {kind}");
            }
            assemble(
                &ptxas,
                &m.ptx,
                gpu,
                &tmp.path().join(format!("{name}-{kind}-{gpu}.ptx")),
            );
        }
    }
}

/// bf16 activations on GPUs: every fixture's shape with bf16 weights, fully fused, gets a tensor-core kernel
/// (`_tc`, named by its dispatches' `many_rows`) beside each product kernel over bf16 weights, and `ptxas`
/// assembles their `mma.sync` tiles and `cvt.rn.bf16x2.f32` roundings for sm_80 and sm_90; a GPU without
/// bf16 tensor cores is refused with one clear error.
#[test]
fn tensor_core_kernels_assemble_with_ptxas_and_older_gpus_are_refused() {
    let ptxas = ptxas();
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (mut cfg, _) = open_fixture(name);
        cfg.torch_dtype = q3c_models::DType::BF16;
        let graph = fused_graph(&cfg, "all");
        for gpu in ["sm_80", "sm_90", "sm_75"] {
            let opts = q3c_backend_llvm::PtxOptions {
                gpu: gpu.into(),
                max_tokens_per_call: 64,
                fusion: "all".into(),
                kv_dtype: DType::F16,
                quantize: None,
                bf16_activations: true,
            };
            let compiled = q3c_backend_llvm::compile_ptx(&graph, &cfg, q3c_compiler::LOGITS, &opts);
            if gpu == "sm_75" {
                let err = compiled.err().expect("bf16 activations refused on sm_75");
                assert!(err.to_string().contains("tensor cores"), "{name}: {err}");
                continue;
            }
            let m = compiled.unwrap();
            let tensor: Vec<_> = m
                .launch
                .dispatches
                .iter()
                .filter_map(|d| d.many_rows)
                .collect();
            assert!(!tensor.is_empty(), "{name} {gpu}: no tensor-core kernel");
            for t in &tensor {
                let kernel = &m.launch.kernels[t.kernel];
                assert!(kernel.ends_with("_tc"), "{name}: {kernel}");
                assert!(
                    m.ptx.contains(&format!(".visible .entry {kernel}(")),
                    "{kernel}"
                );
            }
            assert!(m
                .ptx
                .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
            assert!(m.ptx.contains("cvt.rn.bf16x2.f32"));
            assert_eq!(m.manifest.matmul_activations, "bf16");
            let file = tmp.path().join(format!("{name}-bf16-{gpu}.ptx"));
            assemble(&ptxas, &m.ptx, gpu, &file);
        }
    }
}
