//! Weight binding edge cases on real fixtures: tied checkpoints carrying lm_head, sharded files,
//! and checkpoints that belong to another model.

use q3c_models::Checkpoint;
use q3c_runtime::{ReferenceModel, Session};
use q3c_tests::*;

#[test]
fn a_tied_checkpoint_that_still_stores_lm_head_works() {
    let g = golden("tied_bf16");
    let tmp = copy_fixture("tied_bf16");
    // Rewrite the checkpoint with an extra lm_head.weight (garbage values: it must be ignored).
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    let garbage = vec![0x7fu8; embed.data().len()];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    views.push((
        "lm_head.weight".into(),
        safetensors::tensor::TensorView::new(embed.dtype(), embed.shape().to_vec(), &garbage)
            .unwrap(),
    ));
    let out = tmp.path().join("rewritten.safetensors");
    safetensors::serialize_to_file(views, None, &out).unwrap();
    drop(st);
    std::fs::rename(&out, &path).unwrap();

    let cfg = q3c_models::Qwen3Config::from_file(&tmp.path().join("config.json")).unwrap();
    assert!(cfg.tie_word_embeddings);
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    assert!(ckpt.get("lm_head.weight").is_some());
    ckpt.check(&cfg).unwrap();
    let model = ReferenceModel::new(
        q3c_compiler::lower(&cfg).unwrap(),
        &ckpt,
        q3c_compiler::LOGITS,
    )
    .unwrap();
    let logits = model.session().forward(&g.prompt_ids).unwrap();
    assert!(max_abs_diff(&logits.data, &g.logits) <= LOGIT_TOLERANCE);
}

#[test]
fn the_sharded_fixture_is_really_sharded() {
    let (_, ckpt) = open_fixture("sharded_f16");
    assert!(ckpt.files().count() > 1);
    assert!(fixtures_dir()
        .join("sharded_f16/model.safetensors.index.json")
        .is_file());
}

#[test]
fn weights_of_another_model_are_reported_by_name() {
    let (moe_cfg, _) = open_fixture("moe");
    let (_, dense_ckpt) = open_fixture("dense_gqa");
    let err = dense_ckpt.check(&moe_cfg).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor model.layers.0.mlp.gate.weight (expected shape [8, 64])"),
        "{err}"
    );
    assert!(
        err.contains(
            "tensor model.layers.0.self_attn.q_proj.weight has shape [128, 64], expected [64, 64]"
        ),
        "{err}"
    );
    assert!(
        err.contains("unexpected tensor model.layers.0.mlp.gate_proj.weight"),
        "{err}"
    );
    // Binding without the check still refuses, naming the tensor.
    let graph = q3c_compiler::lower(&moe_cfg).unwrap();
    let err = ReferenceModel::new(graph, &dense_ckpt, q3c_compiler::LOGITS)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("weight model.layers.0.self_attn.q_proj.weight: has shape [128, 64]"),
        "{err}"
    );
}
