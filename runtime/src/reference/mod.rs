//! The reference executor: runs the IR node by node in plain Rust with f32 tensors.
//!
//! Clarity over speed: every op is one function in [`kernels`], weights are widened to f32 once at load
//! time, reductions accumulate in f64. The KV cache lives in the [`ReferenceSession`]; a forward pass
//! stages its appends and commits them only when the whole pass succeeded.

pub mod kernels;

use std::collections::HashMap;

use q3c_ir::{Graph, InputKind, KvKind, NodeId, Op};
use q3c_models::tensors::{expert_tensor, EXPERT_PLACEHOLDER};
use q3c_models::Checkpoint;

use crate::error::RuntimeError;
use crate::session::{Logits, Session};

/// A bound weight: f32 values and their shape.
struct Weight {
    data: Vec<f32>,
    shape: Vec<usize>,
}

/// A graph with its weights bound, ready to open sessions on.
pub struct ReferenceModel {
    graph: Graph,
    order: Vec<NodeId>,
    /// Position in `order` of each node.
    slot: HashMap<NodeId, usize>,
    /// For each position, the last position that reads it (values are dropped after).
    last_use: Vec<usize>,
    weights: HashMap<NodeId, Weight>,
    /// RoPE inverse frequencies per rope node.
    inv_freq: HashMap<NodeId, Vec<f32>>,
    output: NodeId,
    vocab: usize,
}

impl ReferenceModel {
    /// Verifies `graph`, then binds every weight node from the checkpoint (widening to f32).
    /// `output` names the graph output to return as logits.
    pub fn new(
        graph: Graph,
        ckpt: &Checkpoint,
        output: &str,
    ) -> Result<ReferenceModel, RuntimeError> {
        q3c_ir::verify(&graph)?;
        if let Some(id) = graph
            .node_ids()
            .into_iter()
            .find(|&id| sharded(&graph.node(id).op))
        {
            return Err(RuntimeError::Input(format!(
                "the reference executor runs one process, and this graph is one rank's of a sharded model ({} at node {id:?}); compile it and run it with mpirun",
                graph.node(id).op.name()
            )));
        }
        let order = graph
            .topo_order()
            .map_err(|_| RuntimeError::Internal("verified graph has a cycle".into()))?;
        let slot: HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let out_id = graph.output(output).ok_or_else(|| {
            RuntimeError::Internal(format!("the graph has no output named {output}"))
        })?;
        let mut last_use: Vec<usize> = (0..order.len()).collect();
        for (pos, &id) in order.iter().enumerate() {
            for input in graph.inputs(id) {
                last_use[slot[&input]] = last_use[slot[&input]].max(pos);
            }
        }
        last_use[slot[&out_id]] = usize::MAX;

        let mut weights = HashMap::new();
        let mut inv_freq = HashMap::new();
        let mut vocab = 0;
        for &id in &order {
            match &graph.node(id).op {
                Op::Weight { name, ty, .. } => {
                    let shape = ty.shape.resolve(0, 0);
                    weights.insert(id, bind(ckpt, name, &shape)?);
                }
                Op::Rope(spec) | Op::NormRope { rope: spec, .. } => {
                    let d = graph.node(id).tensor().shape.resolve(0, 0)[2];
                    inv_freq.insert(id, spec.inv_freq(d));
                }
                Op::Embedding => {
                    let table = graph.inputs(id)[0];
                    vocab = graph.node(table).tensor().shape.resolve(0, 0)[0];
                }
                _ => {}
            }
        }
        Ok(ReferenceModel {
            graph,
            order,
            slot,
            last_use,
            weights,
            inv_freq,
            output: out_id,
            vocab,
        })
    }

    /// A new session with an empty KV cache.
    pub fn session(&self) -> ReferenceSession<'_> {
        ReferenceSession {
            model: self,
            cache: HashMap::new(),
            position: 0,
        }
    }

    /// The graph being executed.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

/// Reads one weight (or an expert stack) from the checkpoint and checks its shape.
fn bind(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Weight, RuntimeError> {
    let fetch = |name: &str, want: &[usize]| {
        let t = ckpt.get(name).ok_or_else(|| RuntimeError::Weight {
            name: name.into(),
            message: "missing from the checkpoint".into(),
        })?;
        if t.shape != want {
            return Err(RuntimeError::Weight {
                name: name.into(),
                message: format!("has shape {:?}, the graph expects {want:?}", t.shape),
            });
        }
        if let Some(packed) = t.packed {
            return Err(RuntimeError::Weight {
                name: name.into(),
                message: format!(
                    "is pre-quantized ({}); the reference executor reads plain checkpoints — run an \
                     artifact compiled with --quantize {}",
                    packed.format, packed.format
                ),
            });
        }
        Ok(t.to_f32())
    };
    let data = if name.contains(EXPERT_PLACEHOLDER) {
        let mut data = Vec::with_capacity(shape.iter().product());
        for e in 0..shape[0] {
            data.extend(fetch(&expert_tensor(name, e), &shape[1..])?);
        }
        data
    } else {
        fetch(name, shape)?
    };
    Ok(Weight {
        data,
        shape: shape.to_vec(),
    })
}

/// Cached keys or values per (layer, K/V), `[KV, H, d]` row-major.
type KvCache = HashMap<(u32, KvKind), Vec<f32>>;

/// Appends `rows` to cache `key` in the staged copy (starting from the committed cache) and returns the whole
/// staged cache.
fn append(cache: &KvCache, staged: &mut KvCache, key: (u32, KvKind), rows: &[f32]) -> Vec<f32> {
    let mut full = cache.get(&key).cloned().unwrap_or_default();
    full.extend_from_slice(rows);
    staged.insert(key, full.clone());
    full
}

/// One sequence's state: the KV cache per (layer, K/V) and how many tokens it holds.
pub struct ReferenceSession<'m> {
    model: &'m ReferenceModel,
    cache: KvCache,
    position: usize,
}

/// A computed value: f32 or i32 data with its resolved shape, a borrowed weight, or a tuple of values.
#[derive(Clone)]
enum Value<'a> {
    F32(Vec<f32>, Vec<usize>),
    I32(Vec<i32>, Vec<usize>),
    Weight(&'a Weight),
    Tuple(Vec<Value<'a>>),
}

impl Value<'_> {
    fn f32(&self) -> Result<(&[f32], &[usize]), RuntimeError> {
        match self {
            Value::F32(d, s) => Ok((d, s)),
            Value::Weight(w) => Ok((&w.data, &w.shape)),
            Value::I32(..) | Value::Tuple(_) => {
                Err(RuntimeError::Internal("expected an f32 value".into()))
            }
        }
    }

    /// Number of elements (of a tensor value; 0 for a tuple).
    fn len(&self) -> usize {
        match self {
            Value::F32(d, _) => d.len(),
            Value::I32(d, _) => d.len(),
            Value::Weight(w) => w.data.len(),
            Value::Tuple(_) => 0,
        }
    }

    fn i32(&self) -> Result<(&[i32], &[usize]), RuntimeError> {
        match self {
            Value::I32(d, s) => Ok((d, s)),
            _ => Err(RuntimeError::Internal("expected an i32 value".into())),
        }
    }
}

impl ReferenceSession<'_> {
    fn run(&self, ids: &[u32]) -> Result<(Logits, KvCache), RuntimeError> {
        let m = self.model;
        let t = ids.len();
        let kv = self.position + t;
        let mut values: Vec<Option<Value>> = (0..m.order.len()).map(|_| None).collect();
        let mut staged = HashMap::new();
        for (pos, &id) in m.order.iter().enumerate() {
            let node = m.graph.node(id);
            let inputs = m.graph.inputs(id);
            let arg = |i: usize| {
                values[m.slot[&inputs[i]]]
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Internal("value dropped before use".into()))
            };
            let shapes: Vec<Vec<usize>> = node
                .ty
                .elements()
                .iter()
                .map(|e| e.shape.resolve(t, kv))
                .collect();
            let shape = shapes[0].clone();
            let f32_out = |data: Vec<f32>| Value::F32(data, shape.clone());
            let f32_at = |i: usize, data: Vec<f32>| Value::F32(data, shapes[i].clone());
            let value = match &node.op {
                Op::Input(InputKind::TokenIds) => {
                    Value::I32(ids.iter().map(|&i| i as i32).collect(), shape.clone())
                }
                Op::Input(InputKind::Positions) => Value::I32(
                    (self.position..kv).map(|p| p as i32).collect(),
                    shape.clone(),
                ),
                Op::Weight { .. } => Value::Weight(&m.weights[&id]),
                Op::Embedding => {
                    let (table, ts) = arg(0)?.f32()?;
                    let (tok, _) = arg(1)?.i32()?;
                    if let Some(&bad) = tok.iter().find(|&&i| i < 0 || i as usize >= ts[0]) {
                        return Err(RuntimeError::Input(format!(
                            "token id {bad} is outside the vocabulary (0..{})",
                            ts[0]
                        )));
                    }
                    f32_out(kernels::embedding(table, ts[1], tok))
                }
                Op::Reshape { .. } => match arg(0)? {
                    Value::I32(d, _) => Value::I32(d.clone(), shape.clone()),
                    v => f32_out(v.f32()?.0.to_vec()),
                },
                Op::Linear => {
                    let ((x, xs), (w, ws)) = (arg(0)?.f32()?, arg(1)?.f32()?);
                    f32_out(kernels::linear(x, xs[xs.len() - 1], w, ws[0]))
                }
                Op::ExpertLinear => {
                    let ((x, xs), (e, es), (w, ws)) =
                        (arg(0)?.f32()?, arg(1)?.i32()?, arg(2)?.f32()?);
                    if let Some(&bad) = e.iter().find(|&&i| i < 0 || i as usize >= ws[0]) {
                        return Err(RuntimeError::Internal(format!(
                            "expert id {bad} out of range"
                        )));
                    }
                    f32_out(kernels::expert_linear(x, xs[1], xs[2], e, es[1], w, ws[1]))
                }
                Op::SwiGlu => {
                    let ((x, xs), (g, gs), (u, _)) =
                        (arg(0)?.f32()?, arg(1)?.f32()?, arg(2)?.f32()?);
                    let k = xs[xs.len() - 1];
                    let gate = kernels::linear(x, k, g, gs[0]);
                    let up = kernels::linear(x, k, u, gs[0]);
                    f32_out(kernels::gated(&gate, &up))
                }
                Op::ExpertSwiGlu => {
                    let ((x, xs), (e, es)) = (arg(0)?.f32()?, arg(1)?.i32()?);
                    let ((g, gs), (u, _)) = (arg(2)?.f32()?, arg(3)?.f32()?);
                    if let Some(&bad) = e.iter().find(|&&i| i < 0 || i as usize >= gs[0]) {
                        return Err(RuntimeError::Internal(format!(
                            "expert id {bad} out of range"
                        )));
                    }
                    let gate = kernels::expert_linear(x, xs[1], xs[2], e, es[1], g, gs[1]);
                    let up = kernels::expert_linear(x, xs[1], xs[2], e, es[1], u, gs[1]);
                    f32_out(kernels::gated(&gate, &up))
                }
                Op::RmsNorm { eps } => {
                    let ((x, _), (w, _)) = (arg(0)?.f32()?, arg(1)?.f32()?);
                    f32_out(kernels::rms_norm(x, w, *eps))
                }
                Op::AddRmsNorm { eps } => {
                    let ((a, _), (b, _), (w, _)) = (arg(0)?.f32()?, arg(1)?.f32()?, arg(2)?.f32()?);
                    let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
                    let normed = kernels::rms_norm(&sum, w, *eps);
                    Value::Tuple(vec![f32_at(0, sum), f32_at(1, normed)])
                }
                Op::MoeRoute { k, renorm } => {
                    let ((x, xs), (w, ws)) = (arg(0)?.f32()?, arg(1)?.f32()?);
                    let (k, e) = (*k as usize, ws[0]);
                    let probs = kernels::softmax(&kernels::linear(x, xs[1], w, e), e);
                    let ids = kernels::top_k(&probs, e, k);
                    let mut weights = kernels::gather_last(&probs, e, &ids, k);
                    if *renorm {
                        for row in weights.chunks_mut(k) {
                            let sum: f32 = row.iter().sum();
                            row.iter_mut().for_each(|p| *p /= sum);
                        }
                    }
                    Value::Tuple(vec![Value::I32(ids, shapes[0].clone()), f32_at(1, weights)])
                }
                Op::LinearGroup { .. } => {
                    let (x, xs) = arg(0)?.f32()?;
                    let k = xs[xs.len() - 1];
                    let outs = (1..inputs.len())
                        .map(|i| {
                            let (w, ws) = arg(i)?.f32()?;
                            Ok(f32_at(i - 1, kernels::linear(x, k, w, ws[0])))
                        })
                        .collect::<Result<Vec<_>, RuntimeError>>()?;
                    Value::Tuple(outs)
                }
                Op::Select { index } => match arg(0)? {
                    Value::Tuple(elements) => elements[*index as usize].clone(),
                    _ => return Err(RuntimeError::Internal("select of a non-tuple".into())),
                },
                Op::Rope(spec) => {
                    let ((x, xs), (p, _)) = (arg(0)?.f32()?, arg(1)?.i32()?);
                    f32_out(kernels::rope(x, xs[1], xs[2], p, spec, &m.inv_freq[&id]))
                }
                Op::NormRope { eps, rope, cache } => {
                    let ((x, xs), (w, _), (p, _)) =
                        (arg(0)?.f32()?, arg(1)?.f32()?, arg(2)?.i32()?);
                    let normed = kernels::rms_norm(x, w, *eps);
                    let rotated = kernels::rope(&normed, xs[1], xs[2], p, rope, &m.inv_freq[&id]);
                    match cache {
                        Some(key) => f32_out(append(&self.cache, &mut staged, *key, &rotated)),
                        None => f32_out(rotated),
                    }
                }
                Op::KvAppend { layer, kind } => {
                    let (x, _) = arg(0)?.f32()?;
                    f32_out(append(&self.cache, &mut staged, (*layer, *kind), x))
                }
                Op::Attention { scale } => {
                    let ((q, qs), (k, ks), (v, vs)) =
                        (arg(0)?.f32()?, arg(1)?.f32()?, arg(2)?.f32()?);
                    f32_out(kernels::attention(
                        q, k, v, t, kv, qs[1], ks[1], qs[2], vs[2], *scale,
                    ))
                }
                Op::Add | Op::Mul | Op::Div => {
                    let ((a, sa), (b, sb)) = (arg(0)?.f32()?, arg(1)?.f32()?);
                    let f = match node.op {
                        Op::Add => |x: f32, y: f32| x + y,
                        Op::Mul => |x: f32, y: f32| x * y,
                        _ => |x: f32, y: f32| x / y,
                    };
                    f32_out(kernels::broadcast(a, sa, b, sb, f).0)
                }
                Op::Silu => f32_out(kernels::silu(arg(0)?.f32()?.0)),
                Op::Softmax => {
                    let (x, xs) = arg(0)?.f32()?;
                    f32_out(kernels::softmax(x, xs[xs.len() - 1]))
                }
                Op::ReduceSum { axis } => {
                    let (x, xs) = arg(0)?.f32()?;
                    f32_out(kernels::reduce_sum(x, xs, *axis as usize))
                }
                Op::TopK { k } => {
                    let (x, xs) = arg(0)?.f32()?;
                    Value::I32(
                        kernels::top_k(x, xs[xs.len() - 1], *k as usize),
                        shape.clone(),
                    )
                }
                Op::AllReduce { .. } | Op::AllGather { .. } => {
                    return Err(RuntimeError::Internal(
                        "a collective in the reference executor".into(),
                    ))
                }
                Op::GatherLast => {
                    let ((x, xs), (idx, is)) = (arg(0)?.f32()?, arg(1)?.i32()?);
                    f32_out(kernels::gather_last(
                        x,
                        xs[xs.len() - 1],
                        idx,
                        is[is.len() - 1],
                    ))
                }
            };
            let lens: Vec<usize> = match &value {
                Value::Tuple(elements) => elements.iter().map(Value::len).collect(),
                v => vec![v.len()],
            };
            let want: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
            if lens != want {
                return Err(RuntimeError::Internal(format!(
                    "{} produced {lens:?} values for shapes {shapes:?}",
                    node.op.name()
                )));
            }
            values[pos] = Some(value);
            for input in &inputs {
                let s = m.slot[input];
                if m.last_use[s] == pos {
                    values[s] = None;
                }
            }
        }
        match values[m.slot[&m.output]].take() {
            Some(Value::F32(data, shape)) if shape.len() == 2 => Ok((
                Logits {
                    rows: shape[0],
                    vocab: shape[1],
                    data,
                },
                staged,
            )),
            _ => Err(RuntimeError::Internal(
                "the output is not an f32 matrix".into(),
            )),
        }
    }
}

impl Session for ReferenceSession<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        if ids.is_empty() {
            return Err(RuntimeError::Input("no token ids to run".into()));
        }
        let (logits, staged) = self.run(ids)?;
        self.cache.extend(staged);
        self.position += ids.len();
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.position
    }

    fn reset(&mut self) {
        self.cache.clear();
        self.position = 0;
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.position {
            return;
        }
        for rows in self.cache.values_mut() {
            let row = rows.len() / self.position;
            rows.truncate(len * row);
        }
        self.position = len;
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab
    }
}

/// Whether `op` belongs to one rank of a sharded model: a collective, or a weight slice.
fn sharded(op: &Op) -> bool {
    matches!(
        op,
        Op::AllReduce { .. } | Op::AllGather { .. } | Op::Weight { shard: Some(_), .. }
    )
}
