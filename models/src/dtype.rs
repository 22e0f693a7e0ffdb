//! Storage dtypes of checkpoint tensors.

use std::fmt;

/// The element types a checkpoint's weights may be stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Parses transformers' spelling (`float32`, `bfloat16`, `float16`; `torch.` prefix allowed).
    pub fn from_torch_name(s: &str) -> Option<DType> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" | "float" => Some(DType::F32),
            "bfloat16" => Some(DType::BF16),
            "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// transformers' spelling (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Short name (`f32`, `bf16`, `f16`), as in the IR's text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
