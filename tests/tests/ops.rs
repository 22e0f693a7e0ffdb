//! Every op, fused ones included, on every backend of this build against the reference executor (as ggml's
//! `test-backend-ops`): a small graph per case, run as a prompt of 21 tokens (4-row register tiles and a
//! leftover row), one decoded token and a second chunk of 3, through the Cranelift `.so`, the Cranelift
//! JIT, the LLVM `.so` and the LLVM GPU flavour launched on the CPU (where built).
//!
//! Sizes are chosen to leave tails at every vector width (37 = 2·16 + 5 = 9·4 + 1, 20, 12). A case's input
//! rows come from embedding tables (ids pick the rows), and its result goes through a last linear "head"
//! (the logits the runtime returns), so that every op runs in the same position it has in a model.
//!
//! Tolerances: the reference accumulates in f64; a compiled kernel in f32. A dot product of `k` terms in
//! f32 is off by at most `k·u·Σ|xᵢwᵢ|` (u = 2⁻²⁴); with values below 1 in magnitude and `k ≤ 64`, one
//! product is within 64·6e-8·64 ≈ 2.4e-4 and typically (errors of random sign) within √k of that ≈ 3e-5.
//! Each case states its bound: [`EXACT`] where only the head accumulates, [`CHAINED`] where the op itself
//! accumulates too or uses the inline `e^x` (relative error 5e-7). A NaN or an infinity anywhere fails.

use q3c_ir::{DType, Dim, Graph, InputKind, KvKind, NodeId, Op, RopeSpec, Shape, TensorType, Yarn};
use q3c_models::{Checkpoint, Qwen3Config};
use q3c_runtime::generate::SplitMix64;
use q3c_runtime::{CompiledModel, ReferenceModel, Session};
use q3c_tests::{artifact_kinds, compile_graph, jit_graph, max_abs_diff};

/// Rows of every embedding table, and width of the logits.
const VOCAB: usize = 24;
/// Bound for cases where only the head (k ≤ 48) accumulates: 48·u·Σ|terms| with Σ ≤ 48·2 (inputs up to
/// 2 after a norm) ≈ 2.7e-4 worst case.
const EXACT: f32 = 3e-4;
/// Bound for cases whose op accumulates (k ≤ 64) before the head, or uses the inline `e^x`: the op's own
/// error (≤ 2.4e-4 · the head's Σ|w| ≤ 48 in the worst case, ~1e-4 · √48 typically) plus [`EXACT`].
const CHAINED: f32 = 1e-3;

/// The forward calls every case runs in one session: a prompt, one decoded token, another chunk. 21 prompt
/// tokens: five 4-row tiles and a leftover row, a whole 16-key attention block (with the keys after each
/// query masked) and a tail of single keys.
const CALLS: [&[u32]; 3] = [
    &[
        3, 17, 0, 9, 22, 4, 4, 13, 20, 1, 7, 16, 2, 11, 19, 5, 8, 23, 14, 6, 10,
    ],
    &[5],
    &[11, 1, 23],
];

/// A graph under construction with its weights (names, shapes, dtypes, values).
struct Case {
    name: String,
    g: Graph,
    ids: NodeId,
    positions: NodeId,
    weights: Vec<(String, Vec<usize>, DType, Vec<f32>)>,
    rng: SplitMix64,
    dtype: DType,
    /// Caches the case writes: (kv heads, head_dim) of layer 0 (every case has at most one layer).
    kv: Option<(usize, usize)>,
    tol: f32,
}

fn fixed(n: usize) -> Dim {
    Dim::Fixed(n as u64)
}

impl Case {
    fn new(name: &str, dtype: DType, tol: f32) -> Case {
        let mut g = Graph::new();
        let ids = g.add(Op::Input(InputKind::TokenIds), &[]).unwrap();
        let positions = g.add(Op::Input(InputKind::Positions), &[]).unwrap();
        Case {
            name: format!("{name} ({dtype})"),
            g,
            ids,
            positions,
            weights: Vec::new(),
            rng: SplitMix64(name.len() as u64 * 7919 + 17),
            dtype,
            kv: None,
            tol,
        }
    }

    /// A weight of the case's dtype with values uniform in `lo..hi` (rounded to the dtype, so the reference
    /// reads exactly what the kernels read).
    fn weight_in(&mut self, name: &str, shape: &[usize], lo: f32, hi: f32) -> NodeId {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|_| {
                let v = lo + (hi - lo) * self.rng.next_f64() as f32;
                match self.dtype {
                    DType::BF16 => half::bf16::from_f32(v).to_f32(),
                    _ => v,
                }
            })
            .collect();
        self.weights
            .push((name.into(), shape.to_vec(), self.dtype, values));
        let ty = TensorType::new(self.dtype, Shape(shape.iter().map(|&d| fixed(d)).collect()));
        self.g
            .add(
                Op::Weight {
                    name: name.into(),
                    ty,
                    shard: None,
                },
                &[],
            )
            .unwrap()
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.weight_in(name, shape, -1.0, 1.0)
    }

    /// `f32[T, width]` activations: rows of a fresh embedding table, values in `lo..hi`.
    fn rows_in(&mut self, width: usize, lo: f32, hi: f32) -> NodeId {
        let name = format!("x{}", self.weights.len());
        let table = self.weight_in(&name, &[VOCAB, width], lo, hi);
        self.g.add(Op::Embedding, &[table, self.ids]).unwrap()
    }

    fn rows(&mut self, width: usize) -> NodeId {
        self.rows_in(width, -1.0, 1.0)
    }

    fn add(&mut self, op: Op, inputs: &[NodeId]) -> NodeId {
        self.g
            .add(op.clone(), inputs)
            .unwrap_or_else(|e| panic!("{}: {op:?}: {e}", self.name))
    }

    fn reshape(&mut self, x: NodeId, dims: &[usize]) -> NodeId {
        let mut shape = vec![Dim::Seq];
        shape.extend(dims.iter().map(|&d| fixed(d)));
        self.add(
            Op::Reshape {
                shape: Shape(shape),
            },
            &[x],
        )
    }

    /// Flattens `out` (`[T, ...]` f32) and projects it to the logits through the head.
    fn finish(mut self, out: NodeId) -> Case {
        let width: usize = self.g.node(out).tensor().shape.resolve(1, 1)[1..]
            .iter()
            .product();
        let flat = if self.g.node(out).tensor().shape.rank() > 2 {
            self.reshape(out, &[width])
        } else {
            out
        };
        let head = self.weight("head", &[VOCAB, width]);
        let logits = self.add(Op::Linear, &[flat, head]);
        self.g.set_output(q3c_compiler::LOGITS, logits);
        self
    }
}

fn yarn() -> RopeSpec {
    RopeSpec {
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 4.0,
            original_max_position_embeddings: 4,
            attention_factor: 1.0 + 0.1 * 4f64.ln(),
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
        }),
    }
}

fn plain_rope() -> RopeSpec {
    RopeSpec {
        theta: 10000.0,
        yarn: None,
    }
}

/// Every case, in f32 and bf16 weights.
fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for dt in [DType::F32, DType::BF16] {
        all.extend(cases_of(dt));
    }
    all
}

fn cases_of(dt: DType) -> Vec<Case> {
    let mut out = Vec::new();

    let mut c = Case::new("embedding", dt, EXACT);
    let x = c.rows(37);
    out.push(c.finish(x));

    for (k, n) in [(37, 20), (64, 48), (40, 6)] {
        let mut c = Case::new(&format!("linear {n}x{k}"), dt, CHAINED);
        let x = c.rows(k);
        let w = c.weight("w", &[n, k]);
        let y = c.add(Op::Linear, &[x, w]);
        out.push(c.finish(y));
    }

    let mut c = Case::new("linear over [T, 3, 20]", dt, CHAINED);
    let x = c.rows(60);
    let x = c.reshape(x, &[3, 20]);
    let w = c.weight("w", &[12, 20]);
    let y = c.add(Op::Linear, &[x, w]);
    out.push(c.finish(y));

    let mut c = Case::new("swiglu", dt, CHAINED);
    let x = c.rows(37);
    let (gate, up) = (c.weight("gate", &[20, 37]), c.weight("up", &[20, 37]));
    let y = c.add(Op::SwiGlu, &[x, gate, up]);
    out.push(c.finish(y));

    let mut c = Case::new("linear_group", dt, CHAINED);
    let x = c.rows(37);
    let ws: Vec<NodeId> = (0..3)
        .map(|i| c.weight(&format!("w{i}"), &[16, 37]))
        .collect();
    let group = c.add(Op::LinearGroup { n: 3 }, &[x, ws[0], ws[1], ws[2]]);
    let parts: Vec<NodeId> = (0..3)
        .map(|i| c.add(Op::Select { index: i }, &[group]))
        .collect();
    let s = c.add(Op::Add, &[parts[0], parts[1]]);
    let s = c.add(Op::Mul, &[s, parts[2]]);
    out.push(c.finish(s));

    for (experts, k, renorm) in [(6, 2, true), (4, 3, false)] {
        // Routed by the unfused ops: softmax, top_k, gather_last (and the renormalisation).
        let mut c = Case::new(&format!("expert_linear e{experts} k{k}"), dt, CHAINED);
        let x = c.rows(37);
        let router = c.weight("router", &[experts, 37]);
        let logits = c.add(Op::Linear, &[x, router]);
        let probs = c.add(Op::Softmax, &[logits]);
        let chosen = c.add(Op::TopK { k: k as u32 }, &[probs]);
        let mut p = c.add(Op::GatherLast, &[probs, chosen]);
        if renorm {
            let sum = c.add(Op::ReduceSum { axis: 1 }, &[p]);
            let sum = c.reshape(sum, &[1]);
            p = c.add(Op::Div, &[p, sum]);
        }
        let x3 = c.reshape(x, &[1, 37]);
        let gate = c.weight("mlp.experts.{e}.gate", &[experts, 12, 37]);
        let h = c.add(Op::ExpertLinear, &[x3, chosen, gate]);
        let h = c.add(Op::Silu, &[h]);
        let down = c.weight("mlp.experts.{e}.down", &[experts, 20, 12]);
        let y = c.add(Op::ExpertLinear, &[h, chosen, down]);
        let p = c.reshape(p, &[k, 1]);
        let y = c.add(Op::Mul, &[y, p]);
        let y = c.add(Op::ReduceSum { axis: 1 }, &[y]);
        out.push(c.finish(y));

        // Routed by the fused kernel, experts as fused SwiGLU.
        let mut c = Case::new(
            &format!("moe_route + expert_swiglu e{experts} k{k}"),
            dt,
            CHAINED,
        );
        let x = c.rows(37);
        let router = c.weight("router", &[experts, 37]);
        let route = c.add(
            Op::MoeRoute {
                k: k as u32,
                renorm,
            },
            &[x, router],
        );
        let chosen = c.add(Op::Select { index: 0 }, &[route]);
        let p = c.add(Op::Select { index: 1 }, &[route]);
        let x3 = c.reshape(x, &[1, 37]);
        let gate = c.weight("mlp.experts.{e}.gate", &[experts, 12, 37]);
        let up = c.weight("mlp.experts.{e}.up", &[experts, 12, 37]);
        let y = c.add(Op::ExpertSwiGlu, &[x3, chosen, gate, up]);
        let p = c.reshape(p, &[k, 1]);
        let y = c.add(Op::Mul, &[y, p]);
        let y = c.add(Op::ReduceSum { axis: 1 }, &[y]);
        out.push(c.finish(y));
    }

    let mut c = Case::new("rms_norm", dt, CHAINED);
    let x = c.rows(37);
    let w = c.weight_in("norm", &[37], 0.5, 1.5);
    let y = c.add(Op::RmsNorm { eps: 1e-6 }, &[x, w]);
    out.push(c.finish(y));

    let mut c = Case::new("add_rms_norm", dt, CHAINED);
    let (a, b) = (c.rows(37), c.rows(37));
    let w = c.weight_in("norm", &[37], 0.5, 1.5);
    let t = c.add(Op::AddRmsNorm { eps: 1e-6 }, &[a, b, w]);
    let sum = c.add(Op::Select { index: 0 }, &[t]);
    let norm = c.add(Op::Select { index: 1 }, &[t]);
    let y = c.add(Op::Mul, &[sum, norm]);
    out.push(c.finish(y));

    for (name, spec) in [("rope", plain_rope()), ("rope yarn", yarn())] {
        let mut c = Case::new(name, dt, EXACT);
        let x = c.rows(30);
        let x = c.reshape(x, &[3, 10]);
        let y = c.add(Op::Rope(spec), &[x, c.positions]);
        out.push(c.finish(y));
    }

    let mut c = Case::new("norm_rope", dt, CHAINED);
    let x = c.rows(36);
    let x = c.reshape(x, &[3, 12]);
    let w = c.weight_in("qn", &[12], 0.5, 1.5);
    let y = c.add(
        Op::NormRope {
            eps: 1e-6,
            rope: yarn(),
            cache: None,
        },
        &[x, w, c.positions],
    );
    out.push(c.finish(y));

    // d = 32: whole vectors at every width; 12 and 20: tails.
    for (d, fused) in [(12, false), (20, false), (32, false), (12, true)] {
        let (hq, hkv) = (4, 2);
        let mut c = Case::new(
            &format!(
                "kv_append + attention d{d}{}",
                if fused { " (norm_rope writes k)" } else { "" }
            ),
            dt,
            CHAINED,
        );
        c.kv = Some((hkv, d));
        let q = c.rows(hq * d);
        let q = c.reshape(q, &[hq, d]);
        let k = c.rows(hkv * d);
        let k = c.reshape(k, &[hkv, d]);
        let v = c.rows(hkv * d);
        let v = c.reshape(v, &[hkv, d]);
        let k = if fused {
            let w = c.weight_in("kn", &[d], 0.5, 1.5);
            c.add(
                Op::NormRope {
                    eps: 1e-6,
                    rope: plain_rope(),
                    cache: Some((0, KvKind::K)),
                },
                &[k, w, c.positions],
            )
        } else {
            c.add(
                Op::KvAppend {
                    layer: 0,
                    kind: KvKind::K,
                },
                &[k],
            )
        };
        let v = c.add(
            Op::KvAppend {
                layer: 0,
                kind: KvKind::V,
            },
            &[v],
        );
        let scale = 1.0 / (d as f64).sqrt();
        let y = c.add(Op::Attention { scale }, &[q, k, v]);
        out.push(c.finish(y));
    }

    for (name, op) in [("add", Op::Add), ("mul", Op::Mul), ("div", Op::Div)] {
        // [T, 3, 13] with [T, 1, 13] broadcast along the middle dim, and a plain [T, 37] pair.
        let mut c = Case::new(&format!("{name} broadcast"), dt, EXACT);
        let a = c.rows(39);
        let a = c.reshape(a, &[3, 13]);
        let b = c.rows_in(13, 0.5, 2.0);
        let b = c.reshape(b, &[1, 13]);
        let y = c.add(op.clone(), &[a, b]);
        out.push(c.finish(y));
        let mut c = Case::new(name, dt, EXACT);
        let (a, b) = (c.rows(37), c.rows_in(37, 0.5, 2.0));
        let y = c.add(op, &[a, b]);
        out.push(c.finish(y));
    }

    let mut c = Case::new("silu", dt, EXACT);
    let x = c.rows_in(37, -6.0, 6.0);
    let y = c.add(Op::Silu, &[x]);
    out.push(c.finish(y));

    let mut c = Case::new("softmax", dt, EXACT);
    let x = c.rows_in(33, -4.0, 4.0);
    let x = c.reshape(x, &[3, 11]);
    let y = c.add(Op::Softmax, &[x]);
    out.push(c.finish(y));

    for axis in [1, 2] {
        let mut c = Case::new(&format!("reduce_sum axis {axis}"), dt, EXACT);
        let x = c.rows(15);
        let x = c.reshape(x, &[3, 5]);
        let y = c.add(Op::ReduceSum { axis }, &[x]);
        out.push(c.finish(y));
    }

    // Values on a coarse grid, so rows hold ties: the lower index must win.
    let mut c = Case::new("top_k + gather_last (ties)", dt, EXACT);
    let x = c.rows_in(9, -2.0, 2.0);
    let last = c.weights.len() - 1;
    for v in &mut c.weights[last].3 {
        *v = (*v * 2.0).round() / 2.0;
    }
    let chosen = c.add(Op::TopK { k: 4 }, &[x]);
    let y = c.add(Op::GatherLast, &[x, chosen]);
    out.push(c.finish(y));

    out
}

/// Writes the case's config (VOCAB wide, its cache geometry) and weights into `dir`.
fn write(case: &Case, dir: &std::path::Path) -> Qwen3Config {
    let (kv_heads, head_dim) = case.kv.unwrap_or((1, 8));
    let cfg = serde_json::json!({
        "model_type": "qwen3",
        "vocab_size": VOCAB,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": kv_heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = case
        .weights
        .iter()
        .flat_map(|(name, shape, dt, values)| {
            let expanded: Vec<(String, Vec<usize>, &[f32])> =
                if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER) {
                    let per = values.len() / shape[0];
                    (0..shape[0])
                        .map(|e| {
                            (
                                q3c_models::tensors::expert_tensor(name, e),
                                shape[1..].to_vec(),
                                &values[e * per..(e + 1) * per],
                            )
                        })
                        .collect()
                } else {
                    vec![(name.clone(), shape.clone(), values.as_slice())]
                };
            expanded.into_iter().map(move |(n, s, v)| {
                let (st, bytes) = match dt {
                    DType::BF16 => (
                        safetensors::Dtype::BF16,
                        v.iter()
                            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                            .collect(),
                    ),
                    _ => (
                        safetensors::Dtype::F32,
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ),
                };
                (n, s, st, bytes)
            })
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, dt, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    Qwen3Config::from_file(&dir.join("config.json")).unwrap()
}

/// The logits of every call in [`CALLS`], in one session.
fn run(session: &mut dyn Session) -> Vec<Vec<f32>> {
    CALLS
        .iter()
        .map(|ids| session.forward(ids).expect("forward").data)
        .collect()
}

/// Compares `got` (from `executor`) with the reference: a message per failing call.
fn compare(case: &Case, executor: &str, got: &[Vec<f32>], want: &[Vec<f32>]) -> Vec<String> {
    let mut failures = Vec::new();
    for (call, (g, w)) in got.iter().zip(want).enumerate() {
        let diff = max_abs_diff(g, w);
        if diff.is_nan() || diff > case.tol {
            failures.push(format!(
                "{} on {executor}, call {call}: max |Δ| {diff:e} > {:e}",
                case.name, case.tol
            ));
        }
    }
    failures
}

/// The executors of this build for one case: (name, model). `max_tokens` 8 and 4 make the prompt run in
/// chunks.
fn executors(
    case: &Case,
    cfg: &Qwen3Config,
    dir: &std::path::Path,
) -> Vec<(String, CompiledModel)> {
    let mut out = Vec::new();
    for backend in artifact_kinds() {
        for max_tokens in [8, 4] {
            let so = compile_graph(backend, &case.g, cfg, dir, max_tokens, "none");
            let model = CompiledModel::load(&so, dir, 2).expect("load");
            out.push((format!("{backend} .so (max {max_tokens} tokens)"), model));
        }
    }
    out.push(("cranelift jit".into(), jit_graph(&case.g, cfg, dir, 8, 1)));
    out
}

#[test]
fn every_op_on_every_backend_matches_the_reference() {
    let mut failures = Vec::new();
    let mut worst = 0f32;
    for case in &cases() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(case, dir.path());
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let reference = ReferenceModel::new(case.g.clone(), &ckpt, q3c_compiler::LOGITS)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = run(&mut reference.session());
        assert!(
            want.iter().flatten().all(|v| v.is_finite()),
            "{}: the reference is not finite",
            case.name
        );
        for (name, model) in executors(case, &cfg, dir.path()) {
            let got = run(&mut model.session());
            for (g, w) in got.iter().zip(&want) {
                let d = max_abs_diff(g, w);
                if d.is_finite() {
                    worst = worst.max(d);
                }
            }
            failures.extend(compare(case, &name, &got, &want));
        }
    }
    eprintln!("largest |Δ| over every op and backend: {worst:e}");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A NaN injected into the weights one backend reads (the reference reads the clean ones) fails the
/// comparison: the suite cannot pass a kernel that produces NaN.
#[test]
fn an_injected_nan_fails_the_suite() {
    let case = cases_of(DType::F32)
        .into_iter()
        .find(|c| c.name.starts_with("linear 20x37"))
        .unwrap();
    let (clean, poisoned) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = write(&case, clean.path());
    let mut bad = Case {
        weights: case.weights.clone(),
        ..Case::new("poisoned", DType::F32, EXACT)
    };
    bad.weights.iter_mut().find(|w| w.0 == "w").unwrap().3[5] = f32::NAN;
    bad.kv = case.kv;
    write(&bad, poisoned.path());
    let ckpt = Checkpoint::open(clean.path()).unwrap();
    let reference = ReferenceModel::new(case.g.clone(), &ckpt, q3c_compiler::LOGITS).unwrap();
    let want = run(&mut reference.session());
    for backend in artifact_kinds() {
        let so = compile_graph(backend, &case.g, &cfg, poisoned.path(), 8, "none");
        let model = CompiledModel::load(&so, poisoned.path(), 2).unwrap();
        let got = run(&mut model.session());
        assert!(
            got.iter().flatten().any(|v| v.is_nan()),
            "{backend}: no NaN came through"
        );
        let failures = compare(&case, backend, &got, &want);
        assert_eq!(failures.len(), CALLS.len(), "{backend}: {failures:?}");
    }
}

/// The comparison fails on a NaN in the output, even where the other side is finite and every other value
/// agrees: the check that would let a kernel writing NaN pass is `f32::max`-folding, which ignores NaN.
#[test]
fn a_nan_fails_the_comparison() {
    let case = Case::new("nan", DType::F32, EXACT);
    let want = vec![vec![0.5f32, 1.0, -2.0]];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let got = vec![vec![0.5f32, bad, -2.0]];
        assert_eq!(compare(&case, "test", &got, &want).len(), 1, "{bad}");
        assert_eq!(compare(&case, "test", &want, &got).len(), 1, "{bad}");
    }
    assert!(compare(&case, "test", &want, &want).is_empty());
}
