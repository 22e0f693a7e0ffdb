//! The closed set of operations, their attributes, and the typing rule of each.
//!
//! Activations are always f32; weights may be f32, bf16 or f16 and are widened where they are read.
//! Every op's result type follows from its attributes and its inputs' types ([`Op::infer`]), except the
//! two leaves: [`Op::Input`] (fixed types) and [`Op::Weight`] (carries its declared type).
//!
//! A few fused ops produce several tensors at once (a [`Type::Tuple`]); [`Op::Select`] picks one out, and
//! no other op reads a tuple.

use crate::rope::RopeSpec;
use crate::types::{DType, Dim, Shape, TensorType, Type};

/// Which graph input a [`Op::Input`] node stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// `i32[T]`: the token ids fed in this call.
    TokenIds,
    /// `i32[T]`: each token's absolute position (tokens already cached + its index).
    Positions,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::TokenIds => "token_ids",
            InputKind::Positions => "positions",
        }
    }

    pub fn from_name(s: &str) -> Option<InputKind> {
        [InputKind::TokenIds, InputKind::Positions]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// Which half of a layer's KV cache a [`Op::KvAppend`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    K,
    V,
}

impl KvKind {
    pub fn name(self) -> &'static str {
        match self {
            KvKind::K => "k",
            KvKind::V => "v",
        }
    }

    pub fn from_name(s: &str) -> Option<KvKind> {
        match s {
            "k" => Some(KvKind::K),
            "v" => Some(KvKind::V),
            _ => None,
        }
    }
}

/// One operation. Inputs are listed per variant in order; `[..., K]` means any leading dims.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    // ---- leaves ----
    /// A runtime input; see [`InputKind`].
    Input(InputKind),
    /// A tensor bound from the checkpoint at load time. A `name` containing `{e}` is an expert stack:
    /// its type has a leading expert dim `E` and row `e` is the checkpoint tensor named with `{e}` → e.
    /// With `shard`, a rank of a sharded model binds only its slice of the checkpoint tensor, and `ty` is
    /// the slice's type.
    Weight {
        name: String,
        ty: TensorType,
        shard: Option<Shard>,
    },

    // ---- data movement ----
    /// (table `[V, H]`, ids `i32[...]`) → `f32[..., H]`: rows of the table.
    Embedding,
    /// (x) → x with another shape of the same element count; row-major order is unchanged.
    Reshape {
        shape: Shape,
    },
    /// (x `f32[..., E]`, idx `i32[..., k]`) → `f32[..., k]`: `out[.., j] = x[.., idx[.., j]]`.
    GatherLast,

    // ---- matrix products ----
    /// (x `f32[..., K]`, w `[N, K]`) → `f32[..., N]`: `x · wᵀ`, weights in Hugging Face `[out, in]` layout.
    Linear,
    /// (x `f32[S, j, K]` with j = 1 or k, ids `i32[S, k]`, w `[E, N, K]`) → `f32[S, k, N]`:
    /// slot `j` of token `s` multiplies by expert `ids[s, j]`'s matrix (a grouped GEMM over the chosen experts).
    ExpertLinear,

    // ---- fused ops (made by fusion passes, never by lowering) ----
    /// (x `f32[..., K]`, w_gate `[N, K]`, w_up `[N, K]`) → `f32[..., N]`: `silu(x · w_gateᵀ) · (x · w_upᵀ)`,
    /// both products in one kernel with the gating in its epilogue.
    SwiGlu,
    /// (x `f32[S, j, K]`, ids `i32[S, k]`, w_gate `[E, N, K]`, w_up `[E, N, K]`) → `f32[S, k, N]`: [`Op::SwiGlu`]
    /// per selected expert, as [`Op::ExpertLinear`] selects them.
    ExpertSwiGlu,

    /// (a `f32[..., D]`, b like a, w `[D]`) → (`a + b`, `rms_norm(a + b, w)`): the residual add and the next
    /// RMSNorm in one pass over the row.
    AddRmsNorm {
        eps: f64,
    },
    /// (x `f32[T, H]`, w_router `[E, H]`) → (ids `i32[T, k]`, weights `f32[T, k]`): router matmul, f32
    /// softmax, top-k (largest first, ties to the lower index) and, with `renorm`, weights divided by their
    /// sum — the whole MoE routing in one kernel.
    MoeRoute {
        k: u32,
        renorm: bool,
    },
    /// (x `f32[..., K]`, w_1 `[N_1, K]`, …, w_n `[N_n, K]`) → (`f32[..., N_1]`, …): `n` projections of the
    /// same activation as one GEMM over the concatenated output features.
    LinearGroup {
        n: u32,
    },
    /// (t, a tuple) → its element `index`. A view: no data moves.
    Select {
        index: u32,
    },

    /// (x `f32[S, H, d]`, w `[d]`, positions `i32[S]`) → like x: per-head RMSNorm then RoPE, one kernel.
    /// With `cache`, the result is appended to that (layer, kind) KV cache, as [`Op::KvAppend`] would, and the
    /// node's value is the whole cache `f32[KV, H, d]`.
    NormRope {
        eps: f64,
        rope: RopeSpec,
        cache: Option<(u32, KvKind)>,
    },

    // ---- normalisation and positions ----
    /// (x `f32[..., D]`, w `[D]`) → like x: `w · x / sqrt(mean(x²) + eps)` over the last axis.
    RmsNorm {
        eps: f64,
    },
    /// (x `f32[S, H, d]`, positions `i32[S]`) → like x: rotate-half RoPE over the last axis.
    Rope(RopeSpec),

    // ---- attention ----
    /// (x `f32[T, H, d]`) → `f32[KV, H, d]`: appends x to the cache of (`layer`, `kind`) and returns the
    /// whole cache. The only op with state; each (layer, kind) appears once per graph.
    KvAppend {
        layer: u32,
        kind: KvKind,
    },
    /// (q `f32[T, Hq, d]`, k `f32[KV, Hkv, d]`, v `f32[KV, Hkv, dv]`) → `f32[T, Hq, dv]`: causal softmax
    /// attention where query t sits at position KV − T + t; query head h reads kv head h / (Hq / Hkv).
    Attention {
        scale: f64,
    },

    // ---- elementwise (binary ops broadcast a dim of 1 against any dim; ranks must agree) ----
    Add,
    Mul,
    Div,
    /// x · sigmoid(x).
    Silu,

    // ---- reductions and routing ----
    /// Softmax over the last axis.
    Softmax,
    /// Sum over `axis`, which is removed.
    ReduceSum {
        axis: u32,
    },
    /// (x `f32[..., E]`) → `i32[..., k]`: indices of the k largest, largest first, ties to the lower index.
    TopK {
        k: u32,
    },

    // ---- collectives (between the ranks of a sharded model; see [`Shard`]) ----
    /// (x `f32[...]`) → like x: the sum of x over the ranks that hold distinct parts of what made it — of
    /// `ranks` ranks splitting it into `parts` parts, rank `r` counts when it is the first of its part
    /// (`r · parts mod ranks < parts`); the others' x is computed but not added.
    AllReduce {
        parts: u32,
        ranks: u32,
    },
    /// (x `f32[..., n]`) → `f32[..., n · ranks]`: every rank's x side by side, rank `r`'s at columns
    /// `r·n .. (r+1)·n`.
    AllGather {
        ranks: u32,
    },
}

/// The slice of a checkpoint tensor one rank of a sharded model binds: the tensor is cut into `parts`
/// equal parts along `axis`, and rank `r` of `ranks` binds part `r · parts / ranks` — its own part when
/// `parts == ranks`, one shared with its neighbours when there are fewer parts than ranks (a model with
/// fewer KV heads than ranks, whose ranks then each compute a head they share). The runtime binds it as
/// the manifest's `q3c_abi::WeightShard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    pub axis: u32,
    pub parts: u32,
    pub ranks: u32,
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Weight { .. } => "weight",
            Op::Embedding => "embedding",
            Op::Reshape { .. } => "reshape",
            Op::GatherLast => "gather_last",
            Op::Linear => "linear",
            Op::ExpertLinear => "expert_linear",
            Op::SwiGlu => "swiglu",
            Op::NormRope { .. } => "norm_rope",
            Op::ExpertSwiGlu => "expert_swiglu",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::MoeRoute { .. } => "moe_route",
            Op::LinearGroup { .. } => "linear_group",
            Op::Select { .. } => "select",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope(_) => "rope",
            Op::KvAppend { .. } => "kv_append",
            Op::Attention { .. } => "attention",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Silu => "silu",
            Op::Softmax => "softmax",
            Op::ReduceSum { .. } => "reduce_sum",
            Op::TopK { .. } => "top_k",
            Op::AllReduce { .. } => "all_reduce",
            Op::AllGather { .. } => "all_gather",
        }
    }

    /// A leaf: a runtime input or a bound weight (no computation).
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input(_) | Op::Weight { .. })
    }

    /// A view of its input's data (`reshape`, `select`): no computation, no copy.
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape { .. } | Op::Select { .. })
    }

    /// The KV cache this op appends to, if any (each may be appended to once per graph).
    pub fn cache(&self) -> Option<(u32, KvKind)> {
        match self {
            Op::KvAppend { layer, kind } => Some((*layer, *kind)),
            Op::NormRope { cache, .. } => *cache,
            _ => None,
        }
    }

    /// Number of inputs the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input(_) | Op::Weight { .. } => 0,
            Op::Reshape { .. }
            | Op::Silu
            | Op::Softmax
            | Op::ReduceSum { .. }
            | Op::TopK { .. }
            | Op::AllReduce { .. }
            | Op::AllGather { .. } => 1,
            Op::KvAppend { .. } | Op::Select { .. } => 1,
            Op::MoeRoute { .. } => 2,
            Op::AddRmsNorm { .. } => 3,
            Op::LinearGroup { n } => 1 + *n as usize,
            Op::Embedding | Op::GatherLast | Op::Linear | Op::RmsNorm { .. } | Op::Rope(_) => 2,
            Op::Add | Op::Mul | Op::Div => 2,
            Op::ExpertLinear | Op::Attention { .. } | Op::SwiGlu | Op::NormRope { .. } => 3,
            Op::ExpertSwiGlu => 4,
        }
    }

    /// The result type given the inputs' types, or why those inputs are not valid for this op.
    pub fn infer(&self, inputs: &[&Type]) -> Result<Type, String> {
        if inputs.len() != self.arity() {
            return Err(format!(
                "takes {} inputs, has {}",
                self.arity(),
                inputs.len()
            ));
        }
        if let Op::Select { index } = self {
            return match inputs[0] {
                Type::Tuple(ts) => ts
                    .get(*index as usize)
                    .cloned()
                    .map(Type::Tensor)
                    .ok_or_else(|| format!("index {index} is out of range for {}", inputs[0])),
                Type::Tensor(t) => Err(format!("reads a tuple, its input is {t}")),
            };
        }
        let tensors = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.tensor()
                    .ok_or_else(|| format!("input {i} is a tuple {t}: only select reads tuples"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match self {
            Op::AddRmsNorm { eps } => {
                let sum = Op::Add.infer_tensor(&tensors[..2])?;
                if &sum != tensors[0] || &sum != tensors[1] {
                    return Err(format!(
                        "a {} and b {} must have the same shape",
                        tensors[0], tensors[1]
                    ));
                }
                let normed = Op::RmsNorm { eps: *eps }.infer_tensor(&[&sum, tensors[2]])?;
                Ok(Type::Tuple(vec![sum, normed]))
            }
            Op::MoeRoute { k, .. } => {
                let (x, w) = (tensors[0], tensors[1]);
                if x.shape.rank() != 2 || x.shape.0[0] != Dim::Seq {
                    return Err(format!("x must be [T, H], is {}", x.shape));
                }
                let logits = Op::Linear.infer_tensor(&[x, w])?;
                let weights = Op::GatherLast
                    .infer_tensor(&[&logits, &Op::TopK { k: *k }.infer_tensor(&[&logits])?])?;
                let ids = TensorType::i32(weights.shape.0.clone());
                Ok(Type::Tuple(vec![ids, weights]))
            }
            Op::LinearGroup { n } => {
                if *n < 2 {
                    return Err(format!("groups at least 2 projections, n = {n}"));
                }
                let outs = tensors[1..]
                    .iter()
                    .map(|w| Op::Linear.infer_tensor(&[tensors[0], w]))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(w) = tensors[2..].iter().find(|w| w.dtype != tensors[1].dtype) {
                    return Err(format!(
                        "weights must share one dtype, have {} and {}",
                        tensors[1].dtype, w.dtype
                    ));
                }
                Ok(Type::Tuple(outs))
            }
            _ => self.infer_tensor(&tensors).map(Type::Tensor),
        }
    }

    /// [`Op::infer`] for the ops that take and give single tensors.
    fn infer_tensor(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        match self {
            Op::AddRmsNorm { .. }
            | Op::MoeRoute { .. }
            | Op::LinearGroup { .. }
            | Op::Select { .. } => Err(format!("{} gives a tuple or reads one", self.name())),
            Op::Input(_) => Ok(TensorType::i32(vec![Dim::Seq])),
            Op::Weight { ty, shard, .. } => {
                if let Some(s) = shard {
                    if s.axis as usize >= ty.shape.rank() || s.parts == 0 || s.parts > s.ranks {
                        return Err(format!(
                            "shard (axis {}, {} parts, {} ranks) does not fit {}",
                            s.axis, s.parts, s.ranks, ty.shape
                        ));
                    }
                }
                if !ty.dtype.is_float() {
                    return Err(format!(
                        "weight dtype must be a float type, is {}",
                        ty.dtype
                    ));
                }
                if !ty.shape.is_static() {
                    return Err(format!("weight shape must be constant, is {}", ty.shape));
                }
                Ok(ty.clone())
            }
            Op::Embedding => {
                let (table, ids) = (inputs[0], inputs[1]);
                float_weight(table, 2, "table")?;
                expect_dtype(ids, DType::I32, "ids")?;
                let mut dims = ids.shape.0.clone();
                dims.push(table.shape.0[1]);
                Ok(TensorType::f32(dims))
            }
            Op::Reshape { shape } => {
                let x = inputs[0];
                if x.shape.volume() != shape.volume() {
                    return Err(format!(
                        "cannot reshape {} to {}: element counts differ",
                        x.shape, shape
                    ));
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::GatherLast => {
                let (x, idx) = (inputs[0], inputs[1]);
                expect_dtype(x, DType::F32, "x")?;
                expect_dtype(idx, DType::I32, "idx")?;
                if x.shape.rank() == 0 || x.shape.rank() != idx.shape.rank() {
                    return Err(format!(
                        "x {} and idx {} must have the same non-zero rank",
                        x.shape, idx.shape
                    ));
                }
                let lead = x.shape.rank() - 1;
                if x.shape.0[..lead] != idx.shape.0[..lead] {
                    return Err(format!(
                        "leading dims of x {} and idx {} differ",
                        x.shape, idx.shape
                    ));
                }
                Ok(TensorType::f32(idx.shape.0.clone()))
            }
            Op::Linear => {
                let (x, w) = (inputs[0], inputs[1]);
                expect_dtype(x, DType::F32, "x")?;
                float_weight(w, 2, "w")?;
                let k = last(x, "x")?;
                if k != w.shape.0[1] {
                    return Err(format!(
                        "x {} has K = {k}, w {} has K = {}",
                        x.shape, w.shape, w.shape.0[1]
                    ));
                }
                let mut dims = x.shape.0.clone();
                *dims.last_mut().expect("rank checked") = w.shape.0[0];
                Ok(TensorType::f32(dims))
            }
            Op::ExpertLinear => {
                let (x, ids, w) = (inputs[0], inputs[1], inputs[2]);
                expect_dtype(x, DType::F32, "x")?;
                expect_dtype(ids, DType::I32, "ids")?;
                float_weight(w, 3, "w")?;
                if x.shape.rank() != 3 || ids.shape.rank() != 2 {
                    return Err(format!(
                        "x must be [S, j, K] and ids [S, k], are {} and {}",
                        x.shape, ids.shape
                    ));
                }
                let (xs, ids_s) = (&x.shape.0, &ids.shape.0);
                if xs[0] != ids_s[0] {
                    return Err(format!("x {} and ids {} disagree on S", x.shape, ids.shape));
                }
                if xs[1] != Dim::Fixed(1) && xs[1] != ids_s[1] {
                    return Err(format!(
                        "x's slot dim must be 1 or k: x {}, ids {}",
                        x.shape, ids.shape
                    ));
                }
                if xs[2] != w.shape.0[2] {
                    return Err(format!(
                        "x {} has K = {}, w {} has K = {}",
                        x.shape, xs[2], w.shape, w.shape.0[2]
                    ));
                }
                Ok(TensorType::f32(vec![xs[0], ids_s[1], w.shape.0[1]]))
            }
            Op::SwiGlu => {
                let gate = Op::Linear.infer_tensor(&[inputs[0], inputs[1]])?;
                let up = Op::Linear.infer_tensor(&[inputs[0], inputs[2]])?;
                same_type(gate, up, "w_gate", "w_up")
            }
            Op::NormRope { eps, rope, cache } => {
                let normed = Op::RmsNorm { eps: *eps }.infer_tensor(&[inputs[0], inputs[1]])?;
                let rotated = Op::Rope(rope.clone()).infer_tensor(&[&normed, inputs[2]])?;
                match cache {
                    Some((layer, kind)) => Op::KvAppend {
                        layer: *layer,
                        kind: *kind,
                    }
                    .infer_tensor(&[&rotated]),
                    None => Ok(rotated),
                }
            }
            Op::ExpertSwiGlu => {
                let gate = Op::ExpertLinear.infer_tensor(&[inputs[0], inputs[1], inputs[2]])?;
                let up = Op::ExpertLinear.infer_tensor(&[inputs[0], inputs[1], inputs[3]])?;
                same_type(gate, up, "w_gate", "w_up")
            }
            Op::RmsNorm { eps } => {
                let (x, w) = (inputs[0], inputs[1]);
                expect_dtype(x, DType::F32, "x")?;
                float_weight(w, 1, "w")?;
                if last(x, "x")? != w.shape.0[0] {
                    return Err(format!(
                        "x {} and weight {} disagree on the normalised dim",
                        x.shape, w.shape
                    ));
                }
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(format!("eps must be finite and non-negative, is {eps}"));
                }
                Ok(x.clone())
            }
            Op::Rope(spec) => {
                let (x, pos) = (inputs[0], inputs[1]);
                expect_dtype(x, DType::F32, "x")?;
                expect_dtype(pos, DType::I32, "positions")?;
                if x.shape.rank() != 3 || pos.shape.rank() != 1 || x.shape.0[0] != pos.shape.0[0] {
                    return Err(format!(
                        "x must be [S, H, d] and positions [S], are {} and {}",
                        x.shape, pos.shape
                    ));
                }
                match x.shape.0[2] {
                    Dim::Fixed(d) if d % 2 == 0 => {}
                    d => return Err(format!("head dim must be a constant even number, is {d}")),
                }
                spec.check()?;
                Ok(x.clone())
            }
            Op::KvAppend { .. } => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                if x.shape.rank() != 3 || x.shape.0[0] != Dim::Seq {
                    return Err(format!("x must be [T, H, d], is {}", x.shape));
                }
                Ok(TensorType::f32(vec![Dim::Kv, x.shape.0[1], x.shape.0[2]]))
            }
            Op::Attention { scale } => {
                let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
                for (t, n) in [(q, "q"), (k, "k"), (v, "v")] {
                    expect_dtype(t, DType::F32, n)?;
                    if t.shape.rank() != 3 {
                        return Err(format!("{n} must have rank 3, is {}", t.shape));
                    }
                }
                let (qs, ks, vs) = (&q.shape.0, &k.shape.0, &v.shape.0);
                if qs[0] != Dim::Seq || ks[0] != Dim::Kv || vs[0] != Dim::Kv {
                    return Err(format!(
                        "q must be [T, ..], k and v [KV, ..]: {}, {}, {}",
                        q.shape, k.shape, v.shape
                    ));
                }
                if ks[1] != vs[1] || qs[2] != ks[2] {
                    return Err(format!(
                        "q {}, k {}, v {} disagree on heads or head dim",
                        q.shape, k.shape, v.shape
                    ));
                }
                match (qs[1], ks[1]) {
                    (Dim::Fixed(hq), Dim::Fixed(hkv)) if hkv > 0 && hq % hkv == 0 => {}
                    (hq, hkv) => {
                        return Err(format!(
                            "{hq} query heads do not divide evenly over {hkv} kv heads"
                        ))
                    }
                }
                if !(scale.is_finite() && *scale > 0.0) {
                    return Err(format!("scale must be finite and positive, is {scale}"));
                }
                Ok(TensorType::f32(vec![Dim::Seq, qs[1], vs[2]]))
            }
            Op::Add | Op::Mul | Op::Div => {
                let (a, b) = (inputs[0], inputs[1]);
                expect_dtype(a, DType::F32, "lhs")?;
                expect_dtype(b, DType::F32, "rhs")?;
                broadcast(&a.shape, &b.shape).map(|s| TensorType::new(DType::F32, s))
            }
            Op::Silu | Op::Softmax => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                last(x, "x")?;
                Ok(x.clone())
            }
            Op::ReduceSum { axis } => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                let axis = *axis as usize;
                if axis >= x.shape.rank() {
                    return Err(format!("axis {axis} out of range for {}", x.shape));
                }
                let mut dims = x.shape.0.clone();
                dims.remove(axis);
                Ok(TensorType::f32(dims))
            }
            Op::TopK { k } => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                match last(x, "x")? {
                    Dim::Fixed(e) if *k >= 1 && u64::from(*k) <= e => {}
                    e => return Err(format!("k = {k} must be between 1 and the last dim {e}")),
                }
                let mut dims = x.shape.0.clone();
                *dims.last_mut().expect("rank checked") = Dim::Fixed(u64::from(*k));
                Ok(TensorType::i32(dims))
            }
            Op::AllReduce { parts, ranks } => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                if *parts == 0 || parts > ranks {
                    return Err(format!("{parts} parts cannot be held by {ranks} ranks"));
                }
                Ok(x.clone())
            }
            Op::AllGather { ranks } => {
                let x = inputs[0];
                expect_dtype(x, DType::F32, "x")?;
                let Dim::Fixed(n) = last(x, "x")? else {
                    return Err(format!("the last dim must be fixed, x is {}", x.shape));
                };
                if *ranks == 0 {
                    return Err("no ranks to gather from".into());
                }
                let mut dims = x.shape.0.clone();
                *dims.last_mut().expect("rank checked") = Dim::Fixed(n * u64::from(*ranks));
                Ok(TensorType::f32(dims))
            }
        }
    }
}

fn same_type(a: TensorType, b: TensorType, an: &str, bn: &str) -> Result<TensorType, String> {
    if a == b {
        Ok(a)
    } else {
        Err(format!("{an} gives {a} but {bn} gives {b}"))
    }
}

fn expect_dtype(t: &TensorType, dtype: DType, what: &str) -> Result<(), String> {
    if t.dtype == dtype {
        Ok(())
    } else {
        Err(format!("{what} must be {dtype}, is {}", t.dtype))
    }
}

fn float_weight(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, is {}", t.dtype));
    }
    if t.shape.rank() != rank || !t.shape.is_static() {
        return Err(format!(
            "{what} must be a constant rank-{rank} shape, is {}",
            t.shape
        ));
    }
    Ok(())
}

fn last(t: &TensorType, what: &str) -> Result<Dim, String> {
    t.shape
        .last()
        .ok_or_else(|| format!("{what} must have rank >= 1"))
}

fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, String> {
    if a.rank() != b.rank() {
        return Err(format!("ranks of {a} and {b} differ"));
    }
    let one = Dim::Fixed(1);
    a.0.iter()
        .zip(&b.0)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Ok(x),
            (d, o) | (o, d) if o == one => Ok(d),
            _ => Err(format!("{a} and {b} do not broadcast")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Shape)
}
