//! Writing a safetensors file one tensor at a time, so that a checkpoint larger than memory (a full
//! Qwen3-30B-A3B) never has to be held whole; written beside its destination and renamed into place, so a
//! failure leaves nothing half-written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::checkpoint::{Packed, PACKED_KEY};
use crate::random::WriteError;
use crate::tensors::TensorSpec;
use crate::DType;

/// Which tensors a checkpoint stores pre-quantized, and their packed bytes (`q3c quantize`, `q3c
/// random-weights --quantize`).
pub trait Packer {
    /// How tensor `name` of `shape` is stored pre-quantized, and its packed byte length; `None`: plain.
    fn packing(&self, name: &str, shape: &[usize]) -> Option<(Packed, usize)>;
    /// The packed bytes of tensor `name` (`shape`) from its row-major values.
    fn pack(&self, name: &str, shape: &[usize], values: &[f32]) -> Vec<u8>;
}

/// The tensors of a checkpoint about to be written, with the metadata naming the pre-quantized ones.
pub struct TensorPlan {
    pub tensors: Vec<OutTensor>,
    /// `packed[i]`: how tensor `i` is packed, if it is.
    pub packed: Vec<Option<Packed>>,
    pub metadata: BTreeMap<String, String>,
}

/// The file layout of tensors `specs` stored as `dtype`, those `packer` chooses pre-quantized.
pub fn plan_tensors(specs: &[TensorSpec], dtype: DType, packer: Option<&dyn Packer>) -> TensorPlan {
    let mut tensors = Vec::new();
    let mut packed = Vec::new();
    let mut listed = serde_json::Map::new();
    for t in specs {
        let numel: usize = t.shape.iter().product();
        match packer.and_then(|p| p.packing(&t.name, &t.shape)) {
            Some((how, len)) => {
                listed.insert(
                    t.name.clone(),
                    serde_json::json!({"format": how.format, "layout": how.layout,
                        "shape": t.shape, "dtype": dtype.name()}),
                );
                tensors.push(OutTensor {
                    name: t.name.clone(),
                    dtype: safetensors::Dtype::U8,
                    shape: vec![len],
                    len,
                });
                packed.push(Some(how));
            }
            None => {
                tensors.push(OutTensor {
                    name: t.name.clone(),
                    dtype: st_dtype(dtype),
                    shape: t.shape.clone(),
                    len: numel * dtype.size(),
                });
                packed.push(None);
            }
        }
    }
    let mut metadata = BTreeMap::new();
    if !listed.is_empty() {
        metadata.insert(
            PACKED_KEY.to_string(),
            serde_json::Value::Object(listed).to_string(),
        );
    }
    TensorPlan {
        tensors,
        packed,
        metadata,
    }
}

/// The safetensors dtype of `dtype`.
pub fn st_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// `v` rounded to `dtype` (to nearest even), as f32.
pub fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    }
}

/// `values` (representable in `dtype`) as little-endian `dtype` bytes, in chunks over the machine's threads.
pub fn to_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    let size = dtype.size();
    let mut bytes = vec![0u8; values.len() * size];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = values.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (part, out) in values.chunks(chunk).zip(bytes.chunks_mut(chunk * size)) {
            s.spawn(move || {
                for (&v, o) in part.iter().zip(out.chunks_exact_mut(size)) {
                    match dtype {
                        DType::F32 => o.copy_from_slice(&v.to_le_bytes()),
                        DType::BF16 => o.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        DType::F16 => o.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    }
                }
            });
        }
    });
    bytes
}

/// One tensor of the file: its safetensors dtype, shape and byte length.
pub struct OutTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub len: usize,
}

/// Writes `tensors` into the safetensors file `path`, with `metadata` as its `__metadata__`; `data(i)`
/// gives tensor `i`'s bytes (exactly `tensors[i].len` of them), called in order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(usize) -> Result<Vec<u8>, WriteError>,
) -> Result<(), WriteError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0;
    for t in tensors {
        let dtype = serde_json::to_value(t.dtype).map_err(|e| WriteError(e.to_string()))?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + t.len]}),
        );
        offset += t.len;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| WriteError(e.to_string()))?;
    // The data starts 8-byte aligned (as the safetensors crate writes it).
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let io = |e: std::io::Error| WriteError(format!("writing {}: {e}", path.display()));
    let result = (|| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&json).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() != t.len {
                return Err(WriteError(format!(
                    "{}: {} bytes, expected {} (a q3c bug)",
                    t.name,
                    bytes.len(),
                    t.len
                )));
            }
            out.write_all(&bytes).map_err(io)?;
        }
        out.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
