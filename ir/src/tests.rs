//! Tests of the text form, the verifier and DOT export on small hand-written graphs.

use crate::text::{parse, print};
use crate::*;

/// A small attention block touching every op family, written in the text form.
const BLOCK: &str = "\
; a toy layer
%0 = input kind=token_ids : i32[T]
%1 = input kind=positions : i32[T]
%2 = weight name=\"embed\" : bf16[32, 8]
%3 = embedding %2, %0 : f32[T, 8]
%4 = weight name=\"norm\" : f32[8]
%5 = rms_norm eps=1e-6 %3, %4 : f32[T, 8]
%6 = weight name=\"q\" : f16[8, 8]
%7 = linear %5, %6 : f32[T, 8]
%8 = reshape shape=[T, 2, 4] %7 : f32[T, 2, 4]
%9 = rope theta=10000.0 yarn_factor=4.0 yarn_original=16 yarn_attention_factor=1.138629436111989 yarn_beta_fast=32.0 yarn_beta_slow=1.0 yarn_truncate=true %8, %1 : f32[T, 2, 4]
%10 = kv_append layer=0 kind=k %9 : f32[KV, 2, 4]
%11 = kv_append layer=0 kind=v %8 : f32[KV, 2, 4]
%12 = attention scale=0.5 %9, %10, %11 : f32[T, 2, 4]
%13 = reshape shape=[T, 8] %12 : f32[T, 8]
%14 = add %3, %13 : f32[T, 8]
%15 = weight name=\"router\" : f32[4, 8]
%16 = linear %14, %15 : f32[T, 4]
%17 = softmax %16 : f32[T, 4]
%18 = top_k k=2 %17 : i32[T, 2]
%19 = gather_last %17, %18 : f32[T, 2]
%20 = reduce_sum axis=1 %19 : f32[T]
%21 = reshape shape=[T, 1] %20 : f32[T, 1]
%22 = div %19, %21 : f32[T, 2]
%23 = reshape shape=[T, 1, 8] %14 : f32[T, 1, 8]
%24 = weight name=\"experts.{e}.up\" : bf16[4, 6, 8]
%25 = expert_linear %23, %18, %24 : f32[T, 2, 6]
%26 = silu %25 : f32[T, 2, 6]
%27 = mul %26, %25 : f32[T, 2, 6]
output hidden = %14
output up = %27
";

#[test]
fn text_form_round_trips() {
    let g = parse(BLOCK).unwrap();
    verify(&g).unwrap();
    let printed = print(&g);
    let again = parse(&printed).unwrap();
    assert_eq!(print(&again), printed);
    // Same nodes in the same order with the same ops.
    let (a, b) = (g.topo_order().unwrap(), again.topo_order().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(g.node(*x), again.node(*y));
    }
    // The printed form is the hand-written one minus the comment line.
    let expected: String = BLOCK.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert_eq!(printed, expected);
}

#[test]
fn builder_infers_the_types_the_text_declares() {
    let mut g = Graph::new();
    let ids = g.add(Op::Input(InputKind::TokenIds), &[]).unwrap();
    let table = g
        .add(
            Op::Weight {
                name: "embed".into(),
                ty: TensorType::new(DType::BF16, Shape::fixed(&[32, 8])),
                shard: None,
            },
            &[],
        )
        .unwrap();
    let x = g.add(Op::Embedding, &[table, ids]).unwrap();
    assert_eq!(
        *g.node(x).tensor(),
        TensorType::f32(vec![Dim::Seq, Dim::Fixed(8)])
    );
    let bad = g.add(Op::Linear, &[x, ids]);
    assert_eq!(bad.unwrap_err().op, "linear");
}

#[test]
fn verifier_reports_every_broken_node() {
    let broken = "\
%0 = input kind=token_ids : i32[T]
%1 = weight name=\"w\" : f32[4, 8]
%2 = weight name=\"w\" : f32[8, 8]
%3 = embedding %1, %0 : f32[T, 5]
%4 = linear %3, %2 : f32[T, 8]
%5 = top_k k=9 %4 : i32[T, 9]
%6 = input kind=token_ids : i32[T]
%7 = add %4 : f32[T, 8]
output x = %4
";
    let g = parse(broken).unwrap();
    let errors = verify(&g).unwrap_err().0;
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(
        has("%2 = weight: weight \"w\" is already bound by %1"),
        "{text:?}"
    );
    assert!(
        has("%3 = embedding: declared type f32[T, 5] but its inputs give f32[T, 8]"),
        "{text:?}"
    );
    assert!(has("%4 = linear: x [T, 5] has K = 5"), "{text:?}");
    assert!(
        has("%5 = top_k: k = 9 must be between 1 and the last dim 8"),
        "{text:?}"
    );
    assert!(
        has("%6 = input: input token_ids appears more than once"),
        "{text:?}"
    );
    assert!(
        has("%7 = add: takes 2 inputs, its input slots are [0]"),
        "{text:?}"
    );
    assert_eq!(errors.len(), 6, "{text:?}");
}

#[test]
fn verifier_finds_cycles_and_missing_outputs() {
    let mut g = parse("%0 = input kind=token_ids : i32[T]\n%1 = silu %0 : i32[T]\n").unwrap();
    let ids = g.node_ids();
    g.add_raw_edge(ids[1], ids[0], 0);
    let text = verify(&g).unwrap_err().to_string();
    assert!(text.contains("is on a cycle"), "{text}");
    assert!(text.contains("the graph has no outputs"), "{text}");
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        (
            "%0 = frobnicate : f32[T]",
            "line 1: unknown op 'frobnicate'",
        ),
        (
            "%0 = input kind=token_ids : i32[T]\n%1 = silu %7 : f32[T]",
            "line 2: %7 is used before it is defined",
        ),
        (
            "%0 = rms_norm %1 : f32[T]",
            "line 1: %1 is used before it is defined",
        ),
        (
            "%0 = input kind=token_ids : q8[T]",
            "line 1: unknown dtype 'q8'",
        ),
        (
            "%0 = top_k k=two : i32[T]",
            "line 1: attribute 'k' has a bad value 'two'",
        ),
        (
            "%0 = silu bogus=1 : f32[T]",
            "line 1: silu has no attribute 'bogus'",
        ),
        ("output x = %3", "line 1: %3 is not defined"),
    ];
    for (text, want) in cases {
        assert_eq!(parse(text).unwrap_err().to_string(), want, "{text}");
    }
}

#[test]
fn dead_nodes_are_removed_and_uses_replaced() {
    let mut g = parse(BLOCK).unwrap();
    let hidden = g.output("hidden").unwrap();
    let up = g.output("up").unwrap();
    g.replace_uses(up, hidden);
    let removed = g.remove_dead();
    assert!(removed > 0);
    verify(&g).unwrap();
    assert!(g
        .weights()
        .iter()
        .all(|(_, name, _)| !name.contains("experts")));
}

#[test]
fn dot_export_has_every_node_and_edge() {
    let g = parse(BLOCK).unwrap();
    let dot = dot::to_dot(&g);
    assert!(dot.starts_with("digraph q3c {"));
    assert_eq!(dot.matches(" [label=\"%").count(), g.len());
    let edges: usize = g.node_ids().iter().map(|&id| g.inputs(id).len()).sum();
    let edge_lines = dot
        .lines()
        .filter(|l| l.contains(" -> n") && l.contains("[label="))
        .count();
    assert_eq!(edge_lines, edges);
    assert_eq!(dot.matches("-> out_").count(), 2);
    assert!(dot.contains("experts.{e}.up"));
}

#[test]
fn a_cache_writing_norm_rope_counts_as_the_caches_append() {
    let text = "\
%0 = input kind=token_ids : i32[T]
%1 = input kind=positions : i32[T]
%2 = weight name=\"embed\" : f32[16, 8]
%3 = embedding %2, %0 : f32[T, 8]
%4 = reshape shape=[T, 2, 4] %3 : f32[T, 2, 4]
%5 = weight name=\"k_norm\" : f32[4]
%6 = norm_rope eps=1e-6 theta=10000.0 cache_layer=0 cache_kind=k %4, %5, %1 : f32[KV, 2, 4]
%7 = kv_append layer=0 kind=k %4 : f32[KV, 2, 4]
output y = %6
output z = %7
";
    let g = parse(text).unwrap();
    assert_eq!(print(&g), text);
    let errors = verify(&g).unwrap_err().to_string();
    assert!(
        errors.contains("%7 = kv_append: KV cache (layer 0, k) is appended to more than once"),
        "{errors}"
    );
    let ok = parse(&text.replace(
        "%7 = kv_append layer=0 kind=k",
        "%7 = kv_append layer=0 kind=v",
    ))
    .unwrap();
    verify(&ok).unwrap();
}

/// Multi-result fused ops and `select`, in the text form.
const TUPLES: &str = "\
%0 = input kind=token_ids : i32[T]
%1 = weight name=\"embed\" : f32[16, 8]
%2 = embedding %1, %0 : f32[T, 8]
%3 = weight name=\"q\" : bf16[8, 8]
%4 = weight name=\"k\" : bf16[4, 8]
%5 = linear_group n=2 %2, %3, %4 : (f32[T, 8], f32[T, 4])
%6 = select index=0 %5 : f32[T, 8]
%7 = weight name=\"norm\" : bf16[8]
%8 = add_rms_norm eps=1e-6 %2, %6, %7 : (f32[T, 8], f32[T, 8])
%9 = select index=1 %8 : f32[T, 8]
%10 = weight name=\"router\" : f32[4, 8]
%11 = moe_route k=2 renorm=true %9, %10 : (i32[T, 2], f32[T, 2])
%12 = select index=1 %11 : f32[T, 2]
output w = %12
";

#[test]
fn tuples_round_trip_and_verify() {
    let g = parse(TUPLES).unwrap();
    verify(&g).unwrap();
    assert_eq!(print(&g), TUPLES);
    let route = g.inputs(g.output("w").unwrap())[0];
    assert_eq!(
        g.node(route).ty,
        Type::Tuple(vec![
            TensorType::i32(vec![Dim::Seq, Dim::Fixed(2)]),
            TensorType::f32(vec![Dim::Seq, Dim::Fixed(2)]),
        ])
    );
}

#[test]
fn tuples_are_read_only_through_select() {
    // A linear reading the tuple, a select past its end, and an output naming a tuple.
    let bad = TUPLES
        .replace(
            "%6 = select index=0 %5 : f32[T, 8]",
            "%6 = linear %5, %3 : f32[T, 8]",
        )
        .replace(
            "%12 = select index=1 %11 : f32[T, 2]",
            "%12 = select index=2 %11 : f32[T, 2]",
        )
        .replace("output w = %12", "output w = %12\noutput t = %8");
    let errors = verify(&parse(&bad).unwrap()).unwrap_err().to_string();
    assert!(
        errors.contains("%6 = linear: input 0 is a tuple"),
        "{errors}"
    );
    assert!(
        errors.contains("%12 = select: index 2 is out of range"),
        "{errors}"
    );
    assert!(errors.contains("output \"t\" names a tuple"), "{errors}");
}
