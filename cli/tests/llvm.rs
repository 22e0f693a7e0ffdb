//! `q3c compile --backend llvm` from the CLI: the `.so` it writes runs like Cranelift's and reproduces
//! transformers' greedy ids, `--target nvptx` writes PTX, and misuse gets one clear error.

use std::path::Path;

mod common;
use common::*;

use q3c_tests::fixtures_dir;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn misuse_of_backend_flags_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixtures_dir().join("moe");
    let out = tmp.path().join("x.ptx");
    let cranelift = |extra: &[&str]| {
        let mut args = vec![
            "compile",
            path(&moe),
            "--backend",
            "cranelift",
            "-o",
            path(&out),
        ];
        args.extend_from_slice(extra);
        q3c(&args)
    };
    assert_error(
        &cranelift(&["--target", "nvptx"]),
        "--target nvptx needs --backend llvm",
    );
    assert_error(
        &cranelift(&["--bf16-activations"]),
        "--activations bf16 needs --backend llvm",
    );
    assert_error(
        &cranelift(&["--quantize", "q8"]),
        "--quantize q8 needs --backend llvm",
    );
    assert_error(
        &cranelift(&["--quantize", "q4"]),
        "--quantize q4 needs --backend llvm",
    );
    assert_error(&cranelift(&["--quantize", "q3"]), "q3");
    assert_error(
        &q3c(&["compile", path(&moe), "--backend", "gcc", "-o", path(&out)]),
        "gcc",
    );
    if !cfg!(feature = "llvm") {
        assert_error(
            &q3c(&["compile", path(&moe), "--backend", "llvm", "-o", path(&out)]),
            "--features llvm",
        );
    }
    assert!(!out.exists(), "nothing written on failure");
}

#[cfg(feature = "llvm")]
#[test]
fn llvm_so_generates_transformers_greedy_ids_and_ptx_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixtures_dir().join("moe");
    let so = tmp.path().join("moe.so");
    ok(&[
        "compile",
        path(&moe),
        "--backend",
        "llvm",
        "--fusion",
        "all",
        "-o",
        path(&so),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", path(&so), "--json"])).unwrap();
    assert_eq!(json["backend"], "llvm");
    assert_eq!(json["fusion"], "all");
    assert_eq!(json["matmul_activations"], "f32");
    let g = q3c_tests::golden("moe");
    let out = ok(&[
        "generate",
        "--model",
        path(&so),
        "--weights",
        path(&moe),
        "--threads",
        "2",
        "--prompt-ids",
        &ids_arg(&g.prompt_ids),
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(json_ids(&out), g.greedy_ids);

    // 4-bit weights from the CLI (VNNI): experts included, the logits matrix in q6; the answer is the
    // model's own (greedy ids of a 4-bit model need not match transformers'; the kernels are checked
    // against the decoded weights in tests/compiled.rs).
    if q3c_tests::cpu_feature("avx512vnni", "q4 weights from the CLI") {
        let q4 = tmp.path().join("moe-q4.so");
        ok(&["compile", path(&moe), "--quantize", "q4", "-o", path(&q4)]);
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", path(&q4), "--json"])).unwrap();
        let dtype_of = |needle: &str| {
            json["weights"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["name"].as_str().unwrap().contains(needle))
                .map(|w| w["kernel_dtype"].as_str().unwrap().to_string())
                .unwrap()
        };
        assert_eq!(dtype_of(".experts.0.down_proj"), "q4");
        assert_eq!(dtype_of("lm_head"), "q6");
        let out = ok(&[
            "generate",
            "--model",
            path(&q4),
            "--weights",
            path(&moe),
            "--prompt-ids",
            &ids_arg(&g.prompt_ids),
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        assert_eq!(json_ids(&out).len(), 8);
    }

    let ptx = tmp.path().join("moe.ptx");
    ok(&[
        "compile",
        path(&moe),
        "--backend",
        "llvm",
        "--target",
        "nvptx",
        "--gpu",
        "sm_80",
        "-o",
        path(&ptx),
    ]);
    let text = std::fs::read_to_string(&ptx).unwrap();
    assert!(text.contains(".target sm_80") && text.contains(".visible .entry q3c_k"));

    let bad = tmp.path().join("bad.so");
    assert_error(
        &q3c(&[
            "compile",
            path(&moe),
            "--backend",
            "llvm",
            "--target-cpu",
            "pentium2",
            "-o",
            path(&bad),
        ]),
        "unknown CPU 'pentium2'",
    );
    assert_error(
        &q3c(&[
            "compile",
            path(&moe),
            "--backend",
            "llvm",
            "--target",
            "nvptx",
            "--gpu",
            "sm_9000",
            "-o",
            path(&bad),
        ]),
        "GPU 'sm_9000'",
    );
    assert!(!bad.exists());
}

/// With no flags, a bf16 checkpoint gets bf16 activations where the CPU has AVX512_BF16 (the fast path,
/// held to bf16 rounding in tests/compiled.rs); an f32 checkpoint, or `--activations f32`, stays exact.
#[cfg(feature = "llvm")]
#[test]
fn default_activations_follow_the_weights_and_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let activations = |model: &str, extra: &[&str]| {
        let so = tmp.path().join("a.so");
        let dir = fixtures_dir().join(model);
        let mut args = vec!["compile", path(&dir), "-o", path(&so)];
        args.extend_from_slice(extra);
        ok(&args);
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", path(&so), "--json"])).unwrap();
        json["matmul_activations"].as_str().unwrap().to_string()
    };
    assert_eq!(activations("moe", &[]), "f32", "f32 weights");
    assert_eq!(activations("tied_bf16", &["--activations", "f32"]), "f32");
    assert_eq!(
        activations("tied_bf16", &["--target-cpu", "x86-64-v3"]),
        "f32",
        "no AVX512_BF16 on the target"
    );
    if q3c_tests::cpu_feature("avx512bf16", "bf16 activations by default") {
        assert_eq!(activations("tied_bf16", &[]), "bf16");
    }
}

/// `q3c compile --target cuda` writes a CUDA artifact that `inspect` reads. Where q3c has CUDA support and
/// the machine an NVIDIA GPU it generates the ids the CPU artifact does; elsewhere running it fails with
/// one clear message saying what is missing. A cut-short artifact and quantized weights for a MoE model's GPU
/// artifact are refused; a dense model compiles with q8 weights for GPUs too.
#[cfg(feature = "llvm")]
#[test]
fn cuda_artifacts_compile_inspect_and_run_or_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures_dir().join("dense_gqa");
    let art = tmp.path().join("model.q3c");
    let compile_model = |model: &Path, extra: &[&str]| {
        let mut args = vec!["compile", path(model), "--target", "cuda", "-o", path(&art)];
        args.extend_from_slice(extra);
        q3c(&args)
    };
    let compile = |extra: &[&str]| compile_model(&model, extra);
    // bf16 activations on a GPU without bf16 tensor cores are refused, nothing written; MoE models take
    // quantized weights on GPUs too.
    assert_error(
        &compile(&["--gpu", "sm_75", "--activations", "bf16"]),
        "bf16 activations on GPUs run on bf16 tensor cores, which sm_75 lacks",
    );
    assert!(!art.exists());
    assert!(
        compile_model(&fixtures_dir().join("moe"), &["--quantize", "q4"])
            .status
            .success()
    );
    std::fs::remove_file(&art).unwrap();
    assert!(compile(&["--quantize", "q8"]).status.success());
    let shown = ok(&["inspect", "--json", path(&art)]);
    assert!(shown.contains("\"kernel_dtype\": \"q8\""), "{shown}");
    std::fs::remove_file(&art).unwrap();
    // A bf16 checkpoint gets bf16 activations and tensor-core kernels by default; an f32 one neither.
    let bf16 = fixtures_dir().join("tied_bf16");
    assert!(compile_model(&bf16, &[]).status.success());
    let shown = ok(&["inspect", path(&art)]);
    assert!(
        shown.contains("bf16 activations in products")
            && shown.contains("run on tensor cores in calls of 64 rows or more"),
        "{shown}"
    );
    std::fs::remove_file(&art).unwrap();
    assert!(compile(&["--gpu", "sm_80"]).status.success());
    let shown = ok(&["inspect", path(&art)]);
    assert!(
        shown.contains("llvm-nvptx") && shown.contains("sm_80"),
        "{shown}"
    );
    assert!(
        shown.contains("f32 activations") && !shown.contains("tensor cores"),
        "{shown}"
    );
    let generate = |artifact: &Path| {
        q3c(&[
            "generate",
            "--model",
            path(artifact),
            "--weights",
            path(&model),
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "8",
        ])
    };
    let out = generate(&art);
    if !cfg!(feature = "cuda") {
        assert_error(&out, "this q3c was built without CUDA support");
    } else if !q3c_runtime::compiled::cuda_available() {
        eprintln!("skipped: running the CUDA artifact: no NVIDIA driver found on this machine");
        assert_error(&out, "no NVIDIA driver found");
    } else {
        let cpu = tmp.path().join("cpu.so");
        ok(&["compile", path(&model), "-o", path(&cpu)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, generate(&cpu).stdout);
    }
    let bytes = std::fs::read(&art).unwrap();
    let cut = tmp.path().join("cut.q3c");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_error(&generate(&cut), "truncated CUDA artifact");
    assert_error(&q3c(&["inspect", path(&cut)]), "truncated CUDA artifact");
}
