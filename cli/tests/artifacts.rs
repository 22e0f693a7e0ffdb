//! `q3c compile` / `inspect` and running `.so` artifacts from the CLI, including every kind of bad artifact.

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

use q3c_tests::{copy_fixture, fixtures_dir, golden};

fn compile(model: &Path, out: &Path) {
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
}

fn cc_shared(dir: &Path, source: &str) -> std::path::PathBuf {
    let c = dir.join("lib.c");
    let so = dir.join("lib.so");
    std::fs::write(&c, source).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .status()
        .unwrap();
    assert!(status.success());
    so
}

#[test]
fn compile_inspect_and_generate_from_the_so() {
    let tmp = tempfile::tempdir().unwrap();
    let so = tmp.path().join("moe.so");
    compile(&fixtures_dir().join("moe"), &so);
    let text = ok(&["inspect", so.to_str().unwrap()]);
    let abi = format!("q3c artifact (ABI {}", q3c_abi::ABI_VERSION);
    assert!(text.contains(&abi), "{text}");
    assert!(
        text.contains("3 layers, hidden 64, heads 4/2 x 16, vocab 512, MoE 8 experts top-2"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", so.to_str().unwrap(), "--json"])).unwrap();
    let cfg = q3c_models::resolve(fixtures_dir().join("moe").to_str().unwrap()).unwrap();
    assert_eq!(
        json["weights"].as_array().unwrap().len(),
        q3c_models::tensors::expected_tensors(&cfg).len()
    );
    // The defaults: every fusion pass, and the best code generator in the build.
    assert_eq!(json["fusion"], "all");
    let best = if cfg!(feature = "llvm") {
        "llvm"
    } else {
        "cranelift"
    };
    assert_eq!(json["backend"], best);
    // An f32 checkpoint keeps an exact (f32) KV cache; a bf16 one gets f16 (half the bytes), or what
    // --kv-dtype says.
    assert_eq!(json["kv"]["dtype"], "f32");
    assert!(text.contains("(f32), per token 768 bytes"), "{text}");
    let kv_of = |extra: &[&str]| {
        let bf16 = tmp.path().join("bf16.so");
        let dir = fixtures_dir().join("tied_bf16");
        let mut args = vec![
            "compile",
            dir.to_str().unwrap(),
            "-o",
            bf16.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", bf16.to_str().unwrap(), "--json"])).unwrap();
        json["kv"]["dtype"].as_str().unwrap().to_string()
    };
    assert_eq!(kv_of(&[]), "f16");
    assert_eq!(kv_of(&["--kv-dtype", "f32"]), "f32");
    assert_eq!(kv_of(&["--kv-dtype", "q8"]), "q8");

    let g = golden("moe");
    let ids: Vec<String> = g.prompt_ids.iter().map(u32::to_string).collect();
    let weights = fixtures_dir().join("moe");
    for threads in ["1", "2"] {
        let out = ok(&[
            "generate",
            "--model",
            so.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--threads",
            threads,
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ]);
        let got = json_ids(&out);
        assert_eq!(got, g.greedy_ids);
    }
}

#[test]
fn a_relative_artifact_path_is_found_in_the_current_directory() {
    let tmp = tempfile::tempdir().unwrap();
    compile(
        &fixtures_dir().join("dense_gqa"),
        &tmp.path().join("rel.so"),
    );
    let weights = fixtures_dir().join("dense_gqa");
    let out = Command::new(env!("CARGO_BIN_EXE_q3c"))
        .current_dir(tmp.path())
        .args([
            "generate",
            "--model",
            "rel.so",
            "--weights",
            weights.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn all_eight_released_configs_compile() {
    let tmp = tempfile::tempdir().unwrap();
    for name in q3c_models::registry::names() {
        let so = tmp.path().join(format!("{name}.so"));
        compile(Path::new(name), &so);
        let text = ok(&["inspect", so.to_str().unwrap()]);
        assert!(text.contains("vocab 151936"), "{name}: {text}");
    }
}

#[test]
fn bad_artifacts_and_mismatched_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixtures_dir().join("dense_gqa");
    let w = weights.to_str().unwrap();
    let run = |so: &Path, weights: &str| {
        q3c(&[
            "generate",
            "--model",
            so.to_str().unwrap(),
            "--weights",
            weights,
            "--prompt-ids",
            "1,2",
        ])
    };

    // Another ABI version.
    let other = tempfile::tempdir().unwrap();
    let so = cc_shared(other.path(), "const unsigned q3c_abi_version = 99;\n");
    assert_error(
        &run(&so, w),
        &format!(
            "built for q3c ABI version 99, this runtime speaks version {}",
            q3c_abi::ABI_VERSION
        ),
    );
    assert_error(&q3c(&["inspect", so.to_str().unwrap()]), "ABI version 99");
    // A shared library that is not q3c's.
    let other = tempfile::tempdir().unwrap();
    let so = cc_shared(other.path(), "int answer(void) { return 42; }\n");
    assert_error(
        &run(&so, w),
        "not a q3c artifact (no `q3c_abi_version` symbol)",
    );
    // Not a shared library at all, and a truncated one.
    let junk = tmp.path().join("junk.so");
    std::fs::write(&junk, b"definitely not ELF").unwrap();
    assert_error(&run(&junk, w), "not a loadable shared library");
    let good = tmp.path().join("dense.so");
    compile(&weights, &good);
    let bytes = std::fs::read(&good).unwrap();
    let cut = tmp.path().join("cut.so");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    assert_error(&run(&cut, w), "not a loadable shared library");
    // No --weights.
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            good.to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]),
        "give its weights with --weights DIR",
    );
    // Weights of another model.
    let moe = fixtures_dir().join("moe");
    assert_error(
        &run(&good, moe.to_str().unwrap()),
        "these weights are not for the model compiled into",
    );
    // Right tensors, wrong dtype: compile the tied bf16 model as if it were f32.
    let f32_cfg = copy_fixture("tied_bf16");
    let cfg_path = f32_cfg.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"bfloat16\"", "\"float32\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let f32_so = tmp.path().join("f32.so");
    compile(&cfg_path, &f32_so);
    let bf16 = fixtures_dir().join("tied_bf16");
    assert_error(
        &run(&f32_so, bf16.to_str().unwrap()),
        "is bf16 in the checkpoint, the artifact was compiled for f32",
    );
    // Unknown target CPU, and nothing written on failure.
    let never = tmp.path().join("never.so");
    assert_error(
        &q3c(&[
            "compile",
            "Qwen3-0.6B",
            "-o",
            never.to_str().unwrap(),
            "--target-cpu",
            "pentium-pro",
        ]),
        "unknown CPU 'pentium-pro'",
    );
    assert!(!never.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn random_weights_then_bench_reports_json() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    // A small config from a fixture, random f16 weights.
    let cfg = fixtures_dir().join("moe_sparse_step").join("config.json");
    ok(&[
        "random-weights",
        cfg.to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--dtype",
        "f16",
        "--seed",
        "7",
    ]);
    let written = q3c_models::Qwen3Config::from_file(&model.join("config.json")).unwrap();
    assert_eq!(written.torch_dtype, q3c_models::DType::F16);
    let ckpt = q3c_models::Checkpoint::open(&model).unwrap();
    ckpt.check(&written).unwrap();
    let so = tmp.path().join("m.so");
    compile(&model, &so);
    let out = ok(&[
        "bench",
        "--model",
        so.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--prompt-len",
        "16",
        "--gen",
        "4",
        "--reps",
        "1",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        r["prefill_tok_s"].as_f64().unwrap() > 0.0 && r["decode_tok_s"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    // The memory after load covers at least the weights bound in it (f16 widened to f32: twice the file).
    let weights = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        r["load_s"].as_f64().unwrap() > 0.0
            && r["resident_after_load_bytes"].as_u64().unwrap() > weights,
        "{r}"
    );
    assert_eq!(
        (
            r["prompt_len"].as_u64(),
            r["gen"].as_u64(),
            r["threads"].as_u64()
        ),
        (Some(16), Some(4), Some(2))
    );
    assert!(r["depth"].is_null(), "{r}");
    // --depth: both figures after that many tokens of context (as llama-bench -d).
    let bench = |depth: &str| {
        ok(&[
            "bench",
            "--model",
            so.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--prompt-len",
            "8",
            "--gen",
            "2",
            "--reps",
            "1",
            "--depth",
            depth,
            "--json",
        ])
    };
    let r: serde_json::Value = serde_json::from_str(&bench("40")).unwrap();
    assert_eq!(r["depth"].as_u64(), Some(40), "{r}");
    assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    // Past the model's positions: one clear error, no giant cache.
    let too_deep = q3c(&[
        "bench",
        "--model",
        so.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--depth",
        "100000",
        "--reps",
        "1",
    ]);
    assert_error(&too_deep, "positions; the model has");
}

#[test]
fn jit_runs_the_same_code_in_process() {
    let g = golden("yarn");
    let ids: Vec<String> = g.prompt_ids.iter().map(u32::to_string).collect();
    let model = fixtures_dir().join("yarn");
    let out = ok(&[
        "generate",
        "--jit",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--prompt-ids",
        &ids.join(","),
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--json",
    ]);
    let got = json_ids(&out);
    assert_eq!(got, g.greedy_ids);
    assert_error(
        &q3c(&[
            "generate",
            "--jit",
            "--model",
            "Qwen3-0.6B",
            "--prompt-ids",
            "1",
        ]),
        "--jit needs --model to be a model directory",
    );
}

#[test]
fn the_so_exports_only_the_abi_and_imports_only_libm() {
    for backend in q3c_tests::backends() {
        let tmp = tempfile::tempdir().unwrap();
        let so = tmp.path().join("m.so");
        let moe = fixtures_dir().join("moe");
        ok(&[
            "compile",
            moe.to_str().unwrap(),
            "--backend",
            backend,
            "--fusion",
            "all",
            "-o",
            so.to_str().unwrap(),
        ]);
        check_symbols(&so, backend);
    }
}

/// The artifact at `so` exports exactly the ABI's four symbols and imports nothing beyond libm.
fn check_symbols(so: &Path, backend: &str) {
    let nm = |flag: &str| {
        let out = Command::new("nm")
            .args(["-D", flag])
            .arg(so)
            .output()
            .expect("nm (binutils) runs");
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().last().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let mut exported = nm("--defined-only");
    exported.sort();
    assert_eq!(
        exported,
        [
            "q3c_abi_version",
            "q3c_forward",
            "q3c_manifest",
            "q3c_manifest_len"
        ],
        "{backend}"
    );
    for sym in nm("--undefined-only") {
        let name = sym.split('@').next().unwrap();
        assert!(
            ["expf", "cosf", "sinf", "sincosf", "fmaf"].contains(&name),
            "{backend}: unexpected import {sym}"
        );
    }
}

#[test]
fn bench_compare_fusion_prints_the_table_and_writes_the_chart() {
    let model = fixtures_dir().join("moe");
    let dir = tempfile::tempdir().unwrap();
    let (svg, html) = (dir.path().join("f.svg"), dir.path().join("f.html"));
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--compare-fusion",
        "--threads",
        "1",
        "--prompt-len",
        "4",
        "--gen",
        "2",
        "--reps",
        "1",
    ];
    let json = ok(&[
        &args[..],
        &["--json", "--strategy", "none", "--strategy", "all"],
    ]
    .concat());
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (none, all) = (&rows[0], &rows[1]);
    assert_eq!(
        (none["strategy"].as_str(), all["strategy"].as_str()),
        (Some("none"), Some("all"))
    );
    // Figures the IR fixes: fusion removes kernels and activation traffic.
    let bytes = |r: &serde_json::Value| {
        r["traffic"]["bytes_written"].as_u64().unwrap()
            + r["traffic"]["bytes_read"].as_u64().unwrap()
    };
    assert!(all["kernels"].as_u64() < none["kernels"].as_u64());
    assert!(bytes(all) < bytes(none));
    for r in [none, all] {
        assert!(
            r["prefill_tok_s"].as_f64().unwrap() > 0.0 && r["decode_tok_s"].as_f64().unwrap() > 0.0
        );
    }

    // The default strategies: none, each pass, all; with the chart files.
    let table = ok(&[
        &args[..],
        &[
            "--svg",
            svg.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
        ],
    ]
    .concat());
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        names[..7],
        [
            "none",
            "norm-rope",
            "swiglu",
            "residual-norm",
            "qkv",
            "moe-route",
            "all"
        ]
    );
    assert!(table.lines().nth(1).unwrap().contains("(1.00)"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect").count() == 5 * 7);
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(html.contains("<table>") && html.contains("<svg") && html.contains("residual-norm"));

    assert_error(
        &q3c(&[
            "bench",
            "--model",
            "model.so",
            "--weights",
            ".",
            "--compare-fusion",
        ]),
        "give --model a model directory",
    );
    assert_error(
        &q3c(&[&args[..], &["--strategy", "quantum"]].concat()),
        "unknown fusion pass 'quantum'",
    );
}
