//! Pre-quantized checkpoints from the CLI: `q3c quantize` and `q3c random-weights --quantize` write them,
//! `q3c compile` picks their format up, the runtime binds their packed bytes as they are (copied or mapped
//! in place) with the very logits of quantizing at load, and every mismatch is one clear error.
#![cfg(feature = "llvm")]

use std::path::Path;

mod common;
use common::*;

use q3c_tests::fixtures_dir;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The logits file `q3c logits` writes for `so` over `weights` (extra flags appended).
fn logits(so: &Path, weights: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let g = q3c_tests::golden("moe");
    let mut args = vec![
        "logits",
        "--model",
        path(so),
        "--weights",
        path(weights),
        "--threads",
        "2",
    ];
    let ids = ids_arg(&g.prompt_ids);
    args.extend(["--prompt-ids", &ids, "--out", path(out)]);
    args.extend_from_slice(extra);
    ok(&args);
    std::fs::read(out).unwrap()
}

#[test]
fn pre_quantized_checkpoints_bind_as_they_are() {
    if !q3c_tests::cpu_feature("avx512vnni", "pre-quantized checkpoints") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let moe = fixtures_dir().join("moe");
    let q4 = tmp.path().join("moe-q4");
    ok(&["quantize", path(&moe), "--to", "q4", "-o", path(&q4)]);
    assert!(q4.join("config.json").is_file());
    // Packed: smaller than the f32 original.
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&q4) * 3 < size(&moe),
        "{} vs {}",
        size(&q4),
        size(&moe)
    );

    // `compile` takes the checkpoint's format without --quantize.
    let so = tmp.path().join("q4.so");
    ok(&["compile", path(&q4), "-o", path(&so)]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", path(&so), "--json"])).unwrap();
    let experts = json["weights"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"].as_str().unwrap().contains(".experts."))
        .collect::<Vec<_>>();
    assert!(!experts.is_empty() && experts.iter().all(|w| w["kernel_dtype"] == "q4"));

    // Bound as they are (copied, or mapped in place): the logits of quantizing the original at load.
    let at_load = logits(&so, &moe, &tmp.path().join("a.st"), &[]);
    let packed = logits(&so, &q4, &tmp.path().join("b.st"), &[]);
    let mapped = logits(&so, &q4, &tmp.path().join("c.st"), &["--mmap-weights"]);
    assert_eq!(at_load, packed, "pre-quantized vs quantized at load");
    assert_eq!(at_load, mapped, "mapped in place");

    // Mismatches: an artifact reading the weights unquantized or as q8, the reference executor, quantizing
    // twice, a truncated file.
    let plain = tmp.path().join("plain.so");
    ok(&[
        "compile",
        path(&moe),
        "--quantize",
        "none",
        "-o",
        path(&plain),
    ]);
    let out = tmp.path().join("x.st");
    let run = |so: &Path| {
        q3c(&[
            "logits",
            "--model",
            path(so),
            "--weights",
            path(&q4),
            "--prompt-ids",
            "1,2",
            "--out",
            path(&out),
        ])
    };
    assert_error(&run(&plain), "compile with --quantize q4");
    let q8 = tmp.path().join("q8.so");
    ok(&["compile", path(&moe), "--quantize", "q8", "-o", path(&q8)]);
    assert_error(&run(&q8), "but the artifact reads it as q8");
    assert!(!out.exists(), "nothing written on failure");
    assert_error(
        &q3c(&["generate", "--model", path(&q4), "--prompt-ids", "1,2"]),
        "is pre-quantized (q4)",
    );
    assert_error(
        &q3c(&[
            "quantize",
            path(&q4),
            "--to",
            "q8",
            "-o",
            path(&tmp.path().join("again")),
        ]),
        "already pre-quantized",
    );
    let cut = tmp.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(q4.join("config.json"), cut.join("config.json")).unwrap();
    let bytes = std::fs::read(q4.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    assert_error(
        &q3c(&[
            "logits",
            "--model",
            path(&so),
            "--weights",
            path(&cut),
            "--prompt-ids",
            "1",
            "--out",
            path(&out),
        ]),
        "truncated or corrupt",
    );
}

#[test]
fn random_pre_quantized_weights_equal_quantizing_random_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fixtures_dir().join("moe").join("config.json");
    let (plain, direct, converted) = (
        tmp.path().join("plain"),
        tmp.path().join("direct"),
        tmp.path().join("converted"),
    );
    ok(&[
        "random-weights",
        path(&cfg),
        "--dtype",
        "bf16",
        "--seed",
        "3",
        "-o",
        path(&plain),
    ]);
    ok(&[
        "random-weights",
        path(&cfg),
        "--dtype",
        "bf16",
        "--seed",
        "3",
        "--quantize",
        "q4",
        "-o",
        path(&direct),
    ]);
    ok(&[
        "quantize",
        path(&plain),
        "--to",
        "q4",
        "-o",
        path(&converted),
    ]);
    let file = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        file(&direct) == file(&converted),
        "the same bytes either way"
    );
}
