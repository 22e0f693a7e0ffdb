//! Element types, symbolic dimensions and tensor types.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// Token ids, positions and expert indices.
    I32,
    /// Not a tensor type: the storage format of weights a backend asked the runtime to quantize (8-bit
    /// groups of [`Q8_GROUP`] along the last axis, one f32 scale each; layout in `q3c_abi::Q8_LAYOUT`),
    /// and of a KV cache in 8-bit groups (layout in `q3c_abi::kv_head_row_bytes`). A kernel's element of
    /// it is the signed byte, its group's scale applied apart.
    Q8,
    /// Not a tensor type: 4-bit weights (groups of [`Q8_GROUP`], one f16 scale each; layout in
    /// `q3c_abi::Q4_LAYOUT`), multiplied like [`DType::Q8`] weights once unpacked in registers.
    Q4,
    /// Not a tensor type: 6-bit weights (groups of [`Q8_GROUP`], one f16 scale each; layout in
    /// `q3c_abi::Q6_LAYOUT`), the logits matrix of a [`DType::Q4`] model, multiplied like [`DType::Q4`]
    /// weights with two more bits per value unpacked in registers.
    Q6,
}

/// Elements per scale of [`DType::Q8`] weights.
pub const Q8_GROUP: usize = 32;
/// Rows of a [`DType::Q8`] matrix interleaved into one panel (one 512-bit VNNI product covers 4 elements
/// of each of 16 rows).
pub const Q8_PANEL: usize = 16;

impl DType {
    /// Every dtype, in text-form order.
    pub const ALL: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::I32];

    /// The name used in the text form (`f32`, `bf16`, `f16`, `i32`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::Q8 => "q8",
            DType::Q4 => "q4",
            DType::Q6 => "q6",
        }
    }

    /// Parses a text-form name.
    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            // Per element, rounded up: a whole matrix's bytes come from the runtime's layout functions.
            DType::Q8 | DType::Q4 | DType::Q6 => 1,
        }
    }

    /// True for the packed weight formats (q8, q4, q6) the runtime binds in panels for VNNI products.
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Q4 | DType::Q6)
    }

    /// True for the floating-point types weights may be stored in.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32) && !self.is_quantized()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension of a shape: a constant, or one of the two lengths known only at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(u64),
    /// `T`: the number of tokens fed in this call (prompt length in prefill, 1 in decode).
    Seq,
    /// `KV`: tokens in the KV cache after this call (earlier tokens plus `T`).
    Kv,
}

impl Dim {
    /// The concrete size once `T` and `KV` are known.
    pub fn resolve(self, seq: usize, kv: usize) -> usize {
        match self {
            Dim::Fixed(n) => n as usize,
            Dim::Seq => seq,
            Dim::Kv => kv,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Seq => f.write_str("T"),
            Dim::Kv => f.write_str("KV"),
        }
    }
}

/// A tensor shape, outermost dimension first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape of constant dims.
    pub fn fixed(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// The last dimension, if any.
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }

    /// Concrete sizes once `T` and `KV` are known.
    pub fn resolve(&self, seq: usize, kv: usize) -> Vec<usize> {
        self.0.iter().map(|d| d.resolve(seq, kv)).collect()
    }

    /// Element count as (product of constant dims, count of `T` dims, count of `KV` dims),
    /// which is how two shapes with symbolic dims are compared for a reshape.
    pub fn volume(&self) -> (u64, usize, usize) {
        let mut fixed = 1u64;
        let (mut seq, mut kv) = (0, 0);
        for d in &self.0 {
            match d {
                Dim::Fixed(n) => fixed = fixed.saturating_mul(*n),
                Dim::Seq => seq += 1,
                Dim::Kv => kv += 1,
            }
        }
        (fixed, seq, kv)
    }

    /// True when no dim is symbolic.
    pub fn is_static(&self) -> bool {
        self.0.iter().all(|d| matches!(d, Dim::Fixed(_)))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Element type and shape of a node's result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    pub fn f32(dims: Vec<Dim>) -> TensorType {
        TensorType::new(DType::F32, Shape(dims))
    }

    pub fn i32(dims: Vec<Dim>) -> TensorType {
        TensorType::new(DType::I32, Shape(dims))
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// The type of a node's value: one tensor, or a tuple of tensors. Only multi-result fused ops (made by
/// fusion passes) produce tuples, and only [`crate::Op::Select`] reads them; every other op takes and gives
/// tensors.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Tensor(TensorType),
    Tuple(Vec<TensorType>),
}

impl Type {
    /// The tensor type, or `None` for a tuple.
    pub fn tensor(&self) -> Option<&TensorType> {
        match self {
            Type::Tensor(t) => Some(t),
            Type::Tuple(_) => None,
        }
    }

    /// The tensors this value consists of: one for a tensor, the elements of a tuple.
    pub fn elements(&self) -> &[TensorType] {
        match self {
            Type::Tensor(t) => std::slice::from_ref(t),
            Type::Tuple(ts) => ts,
        }
    }
}

impl From<TensorType> for Type {
    fn from(t: TensorType) -> Type {
        Type::Tensor(t)
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Tensor(t) => write!(f, "{t}"),
            Type::Tuple(ts) => {
                f.write_str("(")?;
                for (i, t) in ts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                f.write_str(")")
            }
        }
    }
}
