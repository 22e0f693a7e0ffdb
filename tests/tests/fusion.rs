//! Every fusion strategy gives the logits of `none` (within 1e-4) on every golden fixture, through the
//! reference executor and through the `.so` of every backend in the build, and still matches transformers.

use q3c_compiler::pipeline::PASSES;
use q3c_runtime::{CompiledModel, ReferenceModel, Session};
use q3c_tests::*;

/// `all` and each pass alone.
fn strategies() -> Vec<String> {
    let mut s = vec!["all".to_string()];
    s.extend(PASSES.iter().map(|p| p.name.to_string()));
    s
}

#[test]
fn every_strategy_equals_none_on_every_fixture() {
    for name in FIXTURES {
        let g = golden(name);
        let (cfg, ckpt) = open_fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let none_so = compile_with(&g.dir, tmp.path(), 16, "none");
        let none = CompiledModel::load(&none_so, &g.dir, 2)
            .unwrap()
            .session()
            .forward(&g.prompt_ids)
            .unwrap();
        for fusion in strategies() {
            // The reference executor runs the fused graph too: the fused ops' meaning, checked without codegen.
            let reference =
                ReferenceModel::new(fused_graph(&cfg, &fusion), &ckpt, q3c_compiler::LOGITS)
                    .unwrap();
            let r = reference.session().forward(&g.prompt_ids).unwrap();
            assert!(
                max_abs_diff(&r.data, &none.data) <= 1e-4,
                "{name} {fusion}: reference on the fused graph"
            );

            for backend in artifact_kinds() {
                let dir = tempfile::tempdir().unwrap();
                let so = compile_by(backend, &g.dir, dir.path(), 16, &fusion);
                let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
                assert_eq!(model.manifest().fusion, fusion);
                assert_eq!(model.manifest().backend, backend);
                let fused = model.session().forward(&g.prompt_ids).unwrap();
                let diff = max_abs_diff(&fused.data, &none.data);
                assert!(
                    diff <= 1e-4,
                    "{name} {fusion} {backend}: compiled fused vs none differ by {diff:e}"
                );
                assert!(
                    max_abs_diff(&fused.data, &g.logits) <= LOGIT_TOLERANCE,
                    "{name} {fusion} {backend}: vs transformers"
                );
                assert_eq!(
                    greedy_continuation(&mut model.session(), &g),
                    g.greedy_ids,
                    "{name} {fusion} {backend}"
                );
            }
        }
    }
}

#[test]
fn swiglu_removes_the_gate_and_up_kernels() {
    let (cfg, _) = open_fixture("moe");
    let count = |g: &q3c_ir::Graph, op: q3c_ir::Op| {
        g.node_ids()
            .iter()
            .filter(|&&id| g.node(id).op == op)
            .count()
    };
    let (none, fused) = (fused_graph(&cfg, "none"), fused_graph(&cfg, "swiglu"));
    // 3 layers: layers 0 and 2 are sparse, layer 1 dense (mlp_only_layers [1]).
    assert_eq!(
        (
            count(&none, q3c_ir::Op::Silu),
            count(&fused, q3c_ir::Op::Silu)
        ),
        (3, 0)
    );
    assert_eq!(
        (
            count(&fused, q3c_ir::Op::SwiGlu),
            count(&fused, q3c_ir::Op::ExpertSwiGlu)
        ),
        (1, 2)
    );
    assert_eq!(
        count(&fused, q3c_ir::Op::ExpertLinear),
        2,
        "only the down projections stay"
    );
    assert_eq!(
        none.len() - fused.len(),
        3 * 3,
        "per layer: silu, mul and one projection fewer"
    );
}
