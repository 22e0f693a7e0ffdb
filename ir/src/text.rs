//! The text form: one line per node in dependency order, then the outputs. [`print`] and [`parse`] agree:
//! `print(&parse(&print(g))?) == print(g)` for every graph.
//!
//! ```text
//! ; comment
//! %0 = input kind=token_ids : i32[T]
//! %1 = weight name="model.embed_tokens.weight" : bf16[512, 64]
//! %2 = embedding %1, %0 : f32[T, 64]
//! %3 = rms_norm eps=1e-6 %2, %4 : f32[T, 64]
//! output logits = %3
//! ```
//!
//! Each line is `%N = OP ATTR=VALUE... ARGS : TYPE`. The type is checked against the op's inferred type by
//! [`crate::verify`]; for `weight` it is the declaration itself. Node numbers are positions in
//! [`crate::Graph::topo_order`], so the same graph always prints the same way.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{Graph, NodeId};
use crate::op::{InputKind, KvKind, Op, Shard};
use crate::rope::{RopeSpec, Yarn};
use crate::types::{DType, Dim, Shape, TensorType, Type};

/// The text-form number of every node: its position in dependency order (insertion order if cyclic).
pub fn numbering(graph: &Graph) -> HashMap<NodeId, usize> {
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    order
        .into_iter()
        .enumerate()
        .map(|(n, id)| (id, n))
        .collect()
}

/// Prints a graph in the text form.
pub fn print(graph: &Graph) -> String {
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    let numbers = numbering(graph);
    let mut out = String::new();
    for id in order {
        let node = graph.node(id);
        write!(out, "%{} = {}", numbers[&id], node.op.name()).unwrap();
        for (key, value) in attrs(&node.op) {
            write!(out, " {key}={value}").unwrap();
        }
        let args: Vec<String> = graph
            .inputs(id)
            .iter()
            .map(|i| format!("%{}", numbers[i]))
            .collect();
        if !args.is_empty() {
            write!(out, " {}", args.join(", ")).unwrap();
        }
        writeln!(out, " : {}", node.ty).unwrap();
    }
    for (name, id) in graph.outputs() {
        match numbers.get(id) {
            Some(n) => writeln!(out, "output {name} = %{n}").unwrap(),
            None => writeln!(out, "; output {name} names a removed node").unwrap(),
        }
    }
    out
}

fn attrs(op: &Op) -> Vec<(&'static str, String)> {
    match op {
        Op::Input(kind) => vec![("kind", kind.name().into())],
        Op::Weight { name, shard, .. } => {
            let mut a = vec![("name", quote(name))];
            if let Some(s) = shard {
                a.push(("shard_axis", s.axis.to_string()));
                a.push(("shard_parts", s.parts.to_string()));
                a.push(("shard_ranks", s.ranks.to_string()));
            }
            a
        }
        Op::Reshape { shape } => vec![("shape", shape.to_string())],
        Op::RmsNorm { eps } => vec![("eps", format!("{eps:?}"))],
        Op::Rope(spec) => rope_attrs(spec),
        Op::NormRope { eps, rope, cache } => {
            let mut a = vec![("eps", format!("{eps:?}"))];
            a.extend(rope_attrs(rope));
            if let Some((layer, kind)) = cache {
                a.push(("cache_layer", layer.to_string()));
                a.push(("cache_kind", kind.name().into()));
            }
            a
        }
        Op::KvAppend { layer, kind } => {
            vec![("layer", layer.to_string()), ("kind", kind.name().into())]
        }
        Op::Attention { scale } => vec![("scale", format!("{scale:?}"))],
        Op::ReduceSum { axis } => vec![("axis", axis.to_string())],
        Op::TopK { k } => vec![("k", k.to_string())],
        Op::AddRmsNorm { eps } => vec![("eps", format!("{eps:?}"))],
        Op::MoeRoute { k, renorm } => vec![("k", k.to_string()), ("renorm", renorm.to_string())],
        Op::LinearGroup { n } => vec![("n", n.to_string())],
        Op::Select { index } => vec![("index", index.to_string())],
        Op::AllReduce { parts, ranks } => {
            vec![("parts", parts.to_string()), ("ranks", ranks.to_string())]
        }
        Op::AllGather { ranks } => vec![("ranks", ranks.to_string())],
        Op::Embedding | Op::GatherLast | Op::Linear | Op::ExpertLinear => vec![],
        Op::SwiGlu | Op::ExpertSwiGlu => vec![],
        Op::Add | Op::Mul | Op::Div | Op::Silu | Op::Softmax => vec![],
    }
}

fn rope_attrs(spec: &RopeSpec) -> Vec<(&'static str, String)> {
    let mut a = vec![("theta", format!("{:?}", spec.theta))];
    if let Some(y) = &spec.yarn {
        a.push(("yarn_factor", format!("{:?}", y.factor)));
        a.push((
            "yarn_original",
            y.original_max_position_embeddings.to_string(),
        ));
        a.push(("yarn_attention_factor", format!("{:?}", y.attention_factor)));
        a.push(("yarn_beta_fast", format!("{:?}", y.beta_fast)));
        a.push(("yarn_beta_slow", format!("{:?}", y.beta_slow)));
        a.push(("yarn_truncate", y.truncate.to_string()));
    }
    a
}

fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A line of text form that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Node(usize),
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
}

fn tokenize(line: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut chars = line.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == ';' {
            break;
        } else if c == '%' {
            chars.next();
            let mut digits = String::new();
            while let Some(&(_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                digits.push(d);
                chars.next();
            }
            toks.push(Tok::Node(digits.parse().map_err(|_| {
                format!("expected a node number after '%' at column {}", start + 1)
            })?));
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => s.push(chars.next().ok_or("unterminated string")?.1),
                    Some((_, '"')) => break,
                    Some((_, ch)) => s.push(ch),
                    None => return Err("unterminated string".into()),
                }
            }
            toks.push(Tok::Str(s));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut s = String::new();
            while let Some(&(_, d)) = chars
                .peek()
                .filter(|(_, d)| d.is_ascii_alphanumeric() || *d == '_')
            {
                s.push(d);
                chars.next();
            }
            toks.push(Tok::Ident(s));
        } else if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' {
            let mut s = String::new();
            while let Some(&(_, d)) = chars
                .peek()
                .filter(|(_, d)| d.is_ascii_alphanumeric() || matches!(d, '.' | '-' | '+'))
            {
                s.push(d);
                chars.next();
            }
            toks.push(Tok::Num(s));
        } else if "=,:[]()".contains(c) {
            toks.push(Tok::Punct(c));
            chars.next();
        } else {
            return Err(format!(
                "unexpected character '{c}' at column {}",
                start + 1
            ));
        }
    }
    Ok(toks)
}

struct Cursor {
    toks: Vec<Tok>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn punct(&mut self, c: char) -> Result<(), String> {
        match self.next() {
            Some(Tok::Punct(p)) if p == c => Ok(()),
            other => Err(format!(
                "expected '{c}', found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            other => Err(format!(
                "expected a name, found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn shape(&mut self) -> Result<Shape, String> {
        self.punct('[')?;
        let mut dims = Vec::new();
        if self.peek() == Some(&Tok::Punct(']')) {
            self.next();
            return Ok(Shape(dims));
        }
        loop {
            dims.push(match self.next() {
                Some(Tok::Ident(s)) if s == "T" => Dim::Seq,
                Some(Tok::Ident(s)) if s == "KV" => Dim::Kv,
                Some(Tok::Num(n)) => {
                    Dim::Fixed(n.parse().map_err(|_| format!("bad dimension '{n}'"))?)
                }
                other => {
                    return Err(format!(
                        "expected a dimension, found {}",
                        describe(other.as_ref())
                    ))
                }
            });
            match self.next() {
                Some(Tok::Punct(',')) => {}
                Some(Tok::Punct(']')) => return Ok(Shape(dims)),
                other => {
                    return Err(format!(
                        "expected ',' or ']' in a shape, found {}",
                        describe(other.as_ref())
                    ))
                }
            }
        }
    }

    fn tensor_type(&mut self) -> Result<TensorType, String> {
        let name = self.ident()?;
        let dtype = DType::from_name(&name).ok_or_else(|| format!("unknown dtype '{name}'"))?;
        Ok(TensorType::new(dtype, self.shape()?))
    }

    /// A tensor type, or a tuple `(t1, t2, ...)` of them.
    fn value_type(&mut self) -> Result<Type, String> {
        if self.peek() != Some(&Tok::Punct('(')) {
            return self.tensor_type().map(Type::Tensor);
        }
        self.next();
        let mut elements = vec![self.tensor_type()?];
        loop {
            match self.next() {
                Some(Tok::Punct(',')) => elements.push(self.tensor_type()?),
                Some(Tok::Punct(')')) => return Ok(Type::Tuple(elements)),
                other => {
                    return Err(format!(
                        "expected ',' or ')' in a tuple type, found {}",
                        describe(other.as_ref())
                    ))
                }
            }
        }
    }
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "end of line".into(),
        Some(Tok::Node(n)) => format!("'%{n}'"),
        Some(Tok::Ident(s)) | Some(Tok::Num(s)) => format!("'{s}'"),
        Some(Tok::Str(s)) => format!("\"{s}\""),
        Some(Tok::Punct(c)) => format!("'{c}'"),
    }
}

/// An attribute value as written.
enum Value {
    Word(String),
    Str(String),
    Shape(Shape),
}

struct Attrs(HashMap<String, Value>);

impl Attrs {
    fn take(&mut self, key: &str) -> Result<Value, String> {
        self.0
            .remove(key)
            .ok_or_else(|| format!("missing attribute '{key}'"))
    }

    fn word(&mut self, key: &str) -> Result<String, String> {
        match self.take(key)? {
            Value::Word(w) => Ok(w),
            _ => Err(format!("attribute '{key}' must be a number or name")),
        }
    }

    fn num<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, String> {
        let w = self.word(key)?;
        w.parse()
            .map_err(|_| format!("attribute '{key}' has a bad value '{w}'"))
    }

    fn finish(self, op: &str) -> Result<(), String> {
        match self.0.keys().next() {
            Some(k) => Err(format!("{op} has no attribute '{k}'")),
            None => Ok(()),
        }
    }
}

fn build_op(name: &str, mut a: Attrs, ty: &Type) -> Result<Op, String> {
    let op = match name {
        "input" => {
            let k = a.word("kind")?;
            Op::Input(InputKind::from_name(&k).ok_or_else(|| format!("unknown input kind '{k}'"))?)
        }
        "weight" => match (a.take("name")?, ty) {
            (Value::Str(n), Type::Tensor(ty)) => Op::Weight {
                name: n,
                ty: ty.clone(),
                shard: if a.0.contains_key("shard_axis") {
                    Some(Shard {
                        axis: a.num("shard_axis")?,
                        parts: a.num("shard_parts")?,
                        ranks: a.num("shard_ranks")?,
                    })
                } else {
                    None
                },
            },
            (Value::Str(_), Type::Tuple(_)) => return Err("a weight cannot be a tuple".into()),
            _ => return Err("attribute 'name' must be a quoted string".into()),
        },
        "embedding" => Op::Embedding,
        "reshape" => match a.take("shape")? {
            Value::Shape(shape) => Op::Reshape { shape },
            _ => return Err("attribute 'shape' must be a shape like [T, 64]".into()),
        },
        "gather_last" => Op::GatherLast,
        "linear" => Op::Linear,
        "expert_linear" => Op::ExpertLinear,
        "swiglu" => Op::SwiGlu,
        "expert_swiglu" => Op::ExpertSwiGlu,
        "rms_norm" => Op::RmsNorm { eps: a.num("eps")? },
        "rope" => Op::Rope(parse_rope(&mut a)?),
        "norm_rope" => {
            let eps = a.num("eps")?;
            let rope = parse_rope(&mut a)?;
            let cache = if a.0.contains_key("cache_layer") {
                let layer = a.num("cache_layer")?;
                let k = a.word("cache_kind")?;
                Some((
                    layer,
                    KvKind::from_name(&k).ok_or_else(|| format!("unknown cache kind '{k}'"))?,
                ))
            } else {
                None
            };
            Op::NormRope { eps, rope, cache }
        }
        "kv_append" => {
            let layer = a.num("layer")?;
            let k = a.word("kind")?;
            Op::KvAppend {
                layer,
                kind: KvKind::from_name(&k).ok_or_else(|| format!("unknown cache kind '{k}'"))?,
            }
        }
        "attention" => Op::Attention {
            scale: a.num("scale")?,
        },
        "add" => Op::Add,
        "mul" => Op::Mul,
        "div" => Op::Div,
        "silu" => Op::Silu,
        "softmax" => Op::Softmax,
        "reduce_sum" => Op::ReduceSum {
            axis: a.num("axis")?,
        },
        "top_k" => Op::TopK { k: a.num("k")? },
        "add_rms_norm" => Op::AddRmsNorm { eps: a.num("eps")? },
        "moe_route" => Op::MoeRoute {
            k: a.num("k")?,
            renorm: a.num("renorm")?,
        },
        "linear_group" => Op::LinearGroup { n: a.num("n")? },
        "select" => Op::Select {
            index: a.num("index")?,
        },
        "all_reduce" => Op::AllReduce {
            parts: a.num("parts")?,
            ranks: a.num("ranks")?,
        },
        "all_gather" => Op::AllGather {
            ranks: a.num("ranks")?,
        },
        other => return Err(format!("unknown op '{other}'")),
    };
    a.finish(name)?;
    Ok(op)
}

fn parse_rope(a: &mut Attrs) -> Result<RopeSpec, String> {
    let theta = a.num("theta")?;
    let yarn = if a.0.contains_key("yarn_factor") {
        Some(Yarn {
            factor: a.num("yarn_factor")?,
            original_max_position_embeddings: a.num("yarn_original")?,
            attention_factor: a.num("yarn_attention_factor")?,
            beta_fast: a.num("yarn_beta_fast")?,
            beta_slow: a.num("yarn_beta_slow")?,
            truncate: a.num("yarn_truncate")?,
        })
    } else {
        None
    };
    Ok(RopeSpec { theta, yarn })
}

/// Reads a graph from the text form. Types are taken as written; run [`crate::verify`] to check them.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut graph = Graph::new();
    let mut ids: HashMap<usize, NodeId> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| ParseError {
            line: i + 1,
            message,
        };
        let toks = tokenize(line).map_err(err)?;
        if toks.is_empty() {
            continue;
        }
        let mut c = Cursor { toks, pos: 0 };
        match c.next() {
            Some(Tok::Ident(kw)) if kw == "output" => {
                let name = c.ident().map_err(err)?;
                c.punct('=').map_err(err)?;
                let node = match c.next() {
                    Some(Tok::Node(n)) => *ids
                        .get(&n)
                        .ok_or_else(|| err(format!("%{n} is not defined")))?,
                    other => {
                        return Err(err(format!(
                            "expected a node, found {}",
                            describe(other.as_ref())
                        )))
                    }
                };
                if let Some(extra) = c.next() {
                    return Err(err(format!(
                        "unexpected {} after the output",
                        describe(Some(&extra))
                    )));
                }
                graph.set_output(&name, node);
            }
            Some(Tok::Node(n)) => {
                if ids.contains_key(&n) {
                    return Err(err(format!("%{n} is defined twice")));
                }
                c.punct('=').map_err(err)?;
                let op_name = c.ident().map_err(err)?;
                let mut attrs = HashMap::new();
                let mut args = Vec::new();
                loop {
                    match c.next() {
                        Some(Tok::Ident(key)) => {
                            c.punct('=').map_err(err)?;
                            let value = match c.peek() {
                                Some(Tok::Punct('[')) => Value::Shape(c.shape().map_err(err)?),
                                Some(Tok::Str(_)) => match c.next() {
                                    Some(Tok::Str(s)) => Value::Str(s),
                                    _ => unreachable!("peeked a string"),
                                },
                                Some(Tok::Num(_)) | Some(Tok::Ident(_)) => match c.next() {
                                    Some(Tok::Num(s)) | Some(Tok::Ident(s)) => Value::Word(s),
                                    _ => unreachable!("peeked a word"),
                                },
                                other => {
                                    return Err(err(format!(
                                        "expected a value for '{key}', found {}",
                                        describe(other)
                                    )))
                                }
                            };
                            if attrs.insert(key.clone(), value).is_some() {
                                return Err(err(format!("attribute '{key}' given twice")));
                            }
                        }
                        Some(Tok::Node(a)) => {
                            args.push(*ids.get(&a).ok_or_else(|| {
                                err(format!("%{a} is used before it is defined"))
                            })?);
                            if c.peek() == Some(&Tok::Punct(',')) {
                                c.next();
                            }
                        }
                        Some(Tok::Punct(':')) => break,
                        other => {
                            return Err(err(format!(
                                "expected an attribute, argument or ':', found {}",
                                describe(other.as_ref())
                            )))
                        }
                    }
                }
                let ty = c.value_type().map_err(err)?;
                if let Some(extra) = c.next() {
                    return Err(err(format!(
                        "unexpected {} after the type",
                        describe(Some(&extra))
                    )));
                }
                let op = build_op(&op_name, Attrs(attrs), &ty).map_err(err)?;
                ids.insert(n, graph.add_with_type(op, &args, ty));
            }
            other => {
                return Err(err(format!(
                    "expected '%N = ...' or 'output', found {}",
                    describe(other.as_ref())
                )))
            }
        }
    }
    Ok(graph)
}
